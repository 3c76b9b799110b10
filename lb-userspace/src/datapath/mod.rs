//! The BPF side as the agent handles it: loading the object and its pinned
//! maps (`loader`, with migration of older layouts: `map_copy`), attaching
//! the programs (`attach`, `wire_hook` for the choice between tc and
//! XDP), sweeping conntrack, and reading it all back (`inspect`,
//! `map_memory`).

pub mod attach;
pub mod conntrack_sweep;
pub mod inspect;
pub mod loader;
mod map_copy;
pub mod map_memory;
pub mod map_sizing;
pub(crate) mod pseudo_fs;
pub mod wire_hook;

/// The statistics array's index of `counter` (`lb_common::stats`) of
/// `family`: each family has its own counters.
pub fn stats_index(family: crate::model::Family, counter: u32) -> u32 {
    match family {
        crate::model::Family::Ipv4 => counter,
        crate::model::Family::Ipv6 => lb_common::stats::IPV6_OFFSET + counter,
    }
}
