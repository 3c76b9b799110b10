//! The lb-agent binary's own modules (the library holds the agent's logic).

pub(crate) mod args;
pub(crate) mod commands;
pub(crate) mod datapath;
pub(crate) mod run;
