//! Default capacities of the flow-state maps (conntrack, session affinity,
//! socket LB) from the node's memory: `--map-size-ratio` of it is what
//! they may take together, shared in the proportions of the built-in
//! defaults, as Cilium's dynamic map size ratio shares its budget. A
//! capacity flag given on the command line wins for its maps.

use lb_common::map_spec::{self, Capacity, MapKind, MapSpec};

/// What the kernel charges a preallocated hash entry besides its key and
/// value (each 8-byte aligned): the element header. Measured with the
/// maps' `memlock` (`lb-agent maps`); `tests/tests/kubernetes.rs` checks
/// the estimate against the maps the agent creates.
const HASH_ELEMENT_HEADER: u64 = 48;
/// And per bucket (a power of two of them, at least the capacity).
const HASH_BUCKET: u64 = 16;

/// Capacities are multiples of this, so a node's memory figure moving by
/// a few pages between boots does not resize (migrate) the maps.
const GRANULE: u32 = 16_384;

/// The most any flow-state map gets (`--conntrack-max`'s own limit).
const MAX_ENTRIES: u32 = 1 << 24;

/// The default ratio: Cilium's `bpf-map-dynamic-size-ratio` default.
pub const DEFAULT_RATIO: f64 = 0.0025;

/// Capacities of the flow-state maps, each for both families' maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowStateSizes {
    pub conntrack: u32,
    pub affinity: u32,
    pub sockets: u32,
}

/// Capacities given by flags (None: from the ratio).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    pub conntrack: Option<u32>,
    pub affinity: Option<u32>,
    pub sockets: Option<u32>,
}

/// The flow-state maps sized for a node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sizing {
    pub sizes: FlowStateSizes,
    /// `ratio` x the node's memory.
    pub budget_bytes: u64,
    /// What the maps of the served families cost at `sizes`.
    pub cost_bytes: u64,
}

/// Sizes the flow-state maps of the served families (IPv4, and IPv6 when
/// `ipv6`) for `node_memory` bytes. Each map gets its default capacity
/// scaled by budget / cost of the defaults, rounded down to a granule
/// and kept between a floor (enough for a small node's flows: Cilium's
/// minimum of its TCP table for conntrack) and `MAX_ENTRIES`.
pub fn size_flow_state(node_memory: u64, ratio: f64, ipv6: bool, requested: Requested) -> Sizing {
    let budget_bytes = (node_memory as f64 * ratio) as u64;
    // Priced at most two buckets an entry (their count is rounded up to a
    // power of two), so the sizes never cost more than the budget.
    let default_cost: u64 = flow_state_specs(ipv6)
        .map(|s| u64::from(s.max_entries) * (element_cost(&s) + 2 * HASH_BUCKET))
        .sum();
    let scale = budget_bytes as f64 / default_cost as f64;
    let scaled = |default: u32, floor: u32| {
        let n = (f64::from(default) * scale) as u64;
        let n = u32::try_from(n).unwrap_or(MAX_ENTRIES);
        (n / GRANULE * GRANULE).clamp(floor, MAX_ENTRIES)
    };
    let sizes = FlowStateSizes {
        conntrack: requested
            .conntrack
            .unwrap_or_else(|| scaled(lb_common::MAX_CONNTRACK, 131_072)),
        affinity: requested
            .affinity
            .unwrap_or_else(|| scaled(lb_common::MAX_AFFINITY, GRANULE)),
        sockets: requested
            .sockets
            .unwrap_or_else(|| scaled(map_spec::SOCK_REV.max_entries, 65_536)),
    };
    Sizing {
        sizes,
        budget_bytes,
        cost_bytes: flow_state_cost(&sizes, ipv6),
    }
}

/// What the flow-state maps of the served families cost at `sizes`.
pub fn flow_state_cost(sizes: &FlowStateSizes, ipv6: bool) -> u64 {
    flow_state_specs(ipv6)
        .map(|s| {
            let entries = match s.sized_by {
                Some(Capacity::Conntrack) => sizes.conntrack,
                Some(Capacity::Affinity) => sizes.affinity,
                _ => sizes.sockets,
            };
            map_cost(&s, entries)
        })
        .sum()
}

/// The preallocated maps sized by the flow-state capacities.
fn flow_state_specs(ipv6: bool) -> impl Iterator<Item = MapSpec> {
    map_spec::ALL.into_iter().filter(move |s| {
        matches!(
            s.sized_by,
            Some(Capacity::Conntrack | Capacity::Affinity | Capacity::Sockets)
        ) && (ipv6 || !s.ipv6)
    })
}

/// What the kernel charges for a preallocated hash map of `entries`.
pub fn map_cost(spec: &MapSpec, entries: u32) -> u64 {
    debug_assert!(matches!(spec.kind, MapKind::LruHash | MapKind::Hash));
    u64::from(entries) * element_cost(spec) + u64::from(entries.next_power_of_two()) * HASH_BUCKET
}

/// An entry's element: key, value and header.
fn element_cost(spec: &MapSpec) -> u64 {
    let align = |n: u32| u64::from(n.div_ceil(8) * 8);
    align(spec.key_size) + align(spec.value_size) + HASH_ELEMENT_HEADER
}

/// `MemTotal` of `/proc/meminfo` text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// The node's memory (`MemTotal`).
pub fn node_memory() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total(&text).ok_or_else(|| std::io::Error::other("no MemTotal line in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       24683520 kB\nMemFree:        21414440 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_683_520 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn the_estimate_matches_the_measured_cost_of_the_default_conntrack_map() {
        // 104 bytes an entry at 262,144 entries (`lb-agent maps`, 6.18).
        let cost = map_cost(&map_spec::CONNTRACK, 262_144);
        assert_eq!(cost, 262_144 * 104);
        assert_eq!(map_cost(&map_spec::CONNTRACK6, 262_144), 262_144 * 144);
    }

    #[test]
    fn sizes_grow_with_memory_and_stay_within_the_budget() {
        let small = size_flow_state(16 * GIB, DEFAULT_RATIO, false, Requested::default());
        let big = size_flow_state(64 * GIB, DEFAULT_RATIO, false, Requested::default());
        assert!(
            big.sizes.conntrack > 3 * small.sizes.conntrack,
            "{small:?} {big:?}"
        );
        for s in [small, big] {
            assert!(s.cost_bytes <= s.budget_bytes, "{s:?}");
            // Granules and the price of buckets leave at most a quarter.
            assert!(s.cost_bytes * 100 >= s.budget_bytes * 75, "{s:?}");
            assert_eq!(s.sizes.conntrack % GRANULE, 0);
        }
    }

    #[test]
    fn serving_ipv6_shares_the_same_budget_between_the_families() {
        let v4 = size_flow_state(64 * GIB, DEFAULT_RATIO, false, Requested::default());
        let both = size_flow_state(64 * GIB, DEFAULT_RATIO, true, Requested::default());
        assert!(both.sizes.conntrack < v4.sizes.conntrack, "{v4:?} {both:?}");
        assert!(both.cost_bytes <= both.budget_bytes, "{both:?}");
    }

    #[test]
    fn a_small_node_gets_the_floors_and_a_huge_one_the_ceiling() {
        let tiny = size_flow_state(GIB, DEFAULT_RATIO, true, Requested::default());
        assert_eq!(
            tiny.sizes,
            FlowStateSizes {
                conntrack: 131_072,
                affinity: GRANULE,
                sockets: 65_536
            }
        );
        let huge = size_flow_state(u64::MAX / 4, 0.5, false, Requested::default());
        assert_eq!(huge.sizes.conntrack, MAX_ENTRIES);
    }

    #[test]
    fn a_capacity_flag_wins_over_the_ratio_for_its_maps_only() {
        let requested = Requested {
            conntrack: Some(4096),
            ..Requested::default()
        };
        let given = size_flow_state(16 * GIB, DEFAULT_RATIO, false, requested);
        let derived = size_flow_state(16 * GIB, DEFAULT_RATIO, false, Requested::default());
        assert_eq!(given.sizes.conntrack, 4096);
        assert_eq!(given.sizes.sockets, derived.sizes.sockets);
        assert_eq!(given.sizes.affinity, derived.sizes.affinity);
    }
}
