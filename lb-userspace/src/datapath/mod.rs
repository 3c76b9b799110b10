//! The BPF side as the agent handles it: loading the object and its pinned
//! maps (`loader`, with migration of older layouts), attaching the programs
//! (`attach`, `wire_hook` for the choice between tc and XDP), sweeping
//! conntrack, and reading it all back (`inspect`, `map_memory`).

pub mod attach;
pub mod conntrack_sweep;
pub mod inspect;
pub mod loader;
pub mod map_memory;
pub(crate) mod pseudo_fs;
pub mod wire_hook;
