//! The agent: loads and attaches the BPF programs, turns Services and
//! EndpointSlices into map contents with a pure function, and writes the
//! maps in an order that never shows packets a half-written Service.

mod compact_btree;
pub mod datapath;
mod l4_addr_map;
pub mod model;
pub mod node;
pub mod seccomp_profile;
pub mod serve;
mod sorted_vec_set;
pub mod source;
pub mod sync;
#[cfg(test)]
mod test_objects;
pub mod translate;

/// The BPF object built from lb-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
