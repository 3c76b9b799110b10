//! The agent: loads and attaches the BPF programs, turns Services and
//! EndpointSlices into map contents with a pure function, and writes the
//! maps in an order that never shows packets a half-written Service.

pub mod api_client;
pub mod attach;
pub mod checker;
pub mod conntrack_sweep;
pub mod differ;
pub mod health_check;
pub mod inspect;
pub mod k8s;
pub mod kube_access;
pub mod loader;
pub mod manifests;
pub mod map_batch;
pub mod map_writer;
pub mod masquerade_ports;
pub mod metrics;
pub mod model;
pub mod node_net;
pub mod objects;
pub mod programmer;
pub mod proxy_health;
pub mod pseudo_fs;
pub mod seccomp_profile;
#[cfg(test)]
mod sync_proptest;
#[cfg(test)]
mod test_objects;
pub mod translate;
pub mod wire_hook;

/// The BPF object built from lb-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
