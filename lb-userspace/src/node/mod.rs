//! Facts of the node the agent runs on: its addresses and interfaces
//! (`node_net`) and the ports masquerading may use (`masquerade_ports`).

pub mod masquerade_ports;
pub mod node_net;
