//! The maps, declared with BTF so `bpftool map dump` shows field names.
//! Each is sized by its entry in `lb_common::map_spec`, and checked
//! against it at compile time (name, key and value sizes).

use core::mem::MaybeUninit;

use crate::{family::Family, headers::Flow6, nat::NewFlow};
use aya_ebpf::{
    bindings::{self, BPF_ANY, BPF_NOEXIST},
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    config, map_spec as spec, stats, Affinity4Key, Affinity4Value, Affinity6Key, Backend4,
    Backend6, BackendMatchKey, Ct4Key, Ct4Value, Ct6Key, Ct6Value, DatapathConfig, Ipv6Bytes,
    RevNat4, RevNat6, RevNatId, Service4Key, Service4Value, Service6Key, ServiceStats, SnatPorts,
    SockFwd4Key, SockFwd6Key, SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value, SourceRange4,
    SourceRange6,
};

/// The masquerade port ranges, set by the loader (`global_names::SNAT_PORTS`).
#[unsafe(no_mangle)]
static SNAT_PORTS: SnatPorts = SnatPorts {
    start: [0; lb_common::SNAT_PORT_RANGES_MAX],
    len: [0; lb_common::SNAT_PORT_RANGES_MAX],
};

#[inline(always)]
pub fn snat_ports() -> SnatPorts {
    // SAFETY: a plain read; volatile so the compiler does not fold the
    // zero it was compiled with (the loader rewrites it).
    unsafe { core::ptr::read_volatile(&SNAT_PORTS) }
}

/// The masquerade address and socket LB mode, set by the loader
/// (`global_names::DATAPATH_CONFIG`).
#[unsafe(no_mangle)]
static DATAPATH_CONFIG: DatapathConfig = DatapathConfig {
    host_netns_cookie: 0,
    masquerade_addr: 0,
    socket_lb_mode: 0,
    masquerade_addr6: [0; 4],
    maglev_table_size: 0,
    _pad: 0,
};

#[inline(always)]
pub fn datapath_config() -> DatapathConfig {
    // SAFETY: as for `snat_ports`.
    unsafe { core::ptr::read_volatile(&DATAPATH_CONFIG) }
}

/// Whether a declaration matches its entry in the table (compile time).
macro_rules! check_spec {
    ($spec:expr, $name:literal, $key:ty, $value:ty) => {
        const _: () = assert!(
            $spec.declared_as::<$key, $value>($name),
            concat!($name, " differs from lb_common::map_spec")
        );
    };
}

/// Per backend id, the index of the next masquerade port to try toward
/// that backend: ports are handed out in turn, so one comes back only
/// after all the others were given out (the ranges' size divided by the
/// rate of new flows to that backend).
#[btf_map(name = "lb4_snat_cursor")]
pub static SNAT_CURSOR: Array<u64, { spec::SNAT_CURSOR.max_entries as usize }> = Array::new();

/// Entries are allocated on update, so a large ceiling costs nothing idle.
const NO_PREALLOC: usize = bindings::BPF_F_NO_PREALLOC as usize;

/// Inner maps may have fewer entries than the template: tables are sized
/// by the agent's `--maglev-table-size`.
const INNER_MAP: usize = bindings::BPF_F_INNER_MAP as usize;

/// A frontend's Maglev table: u64 words of four u16 slot numbers.
pub type MaglevTable = Array<u64, { lb_common::MAGLEV_MAX_WORDS as usize }, INNER_MAP>;

#[btf_map(name = "lb_maglev")]
pub static MAGLEV: HashOfMaps<
    u32,
    MaglevTable,
    { spec::MAGLEV.max_entries as usize },
    NO_PREALLOC,
> = HashOfMaps::new();

#[btf_map(name = "lb4_services")]
pub static SERVICES: HashMap<
    Service4Key,
    Service4Value,
    { spec::SERVICES.max_entries as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Indexed by backend id: the agent hands ids out densely from 1, and an
/// array lookup is inlined by the verifier where a hash lookup costs some
/// 30 ns on every packet. A free id holds zeros (address 0).
#[btf_map(name = "lb4_backends")]
pub static BACKENDS: Array<Backend4, { spec::BACKENDS.max_entries as usize }> = Array::new();

#[btf_map(name = "lb4_reverse_nat")]
pub static REV_NAT: HashMap<
    RevNatId,
    RevNat4,
    { spec::REV_NAT.max_entries as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "lb4_conntrack")]
pub static CONNTRACK: LruHashMap<Ct4Key, Ct4Value, { spec::CONNTRACK.max_entries as usize }> =
    LruHashMap::new();

/// The conntrack map of the agent version being replaced, while its entries
/// are migrated (see `config::CT_MIGRATING`); one entry otherwise.
#[btf_map(name = "lb4_conntrack_prev")]
pub static CONNTRACK_PREV: LruHashMap<
    Ct4Key,
    Ct4Value,
    { spec::CONNTRACK_PREV.max_entries as usize },
> = LruHashMap::new();

/// The conntrack entry of `key` in `map`. While an older map is migrated,
/// a miss looks in `prev` (the old map) and moves the entry over, so a
/// flow created by the previous programs keeps its backend (and its replies
/// their reverse NAT). Keys and values go to the helpers by reference: a
/// copy costs stack. Generic over the family's key and value.
#[inline(always)]
pub fn conntrack_ptr<K, V, const N: usize, const P: usize>(
    map: &LruHashMap<K, V, N>,
    prev: &LruHashMap<K, V, P>,
    key: &K,
) -> Option<*mut V> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    if config(config::CT_MIGRATING) == 0 {
        return None;
    }
    // SAFETY: the helper copies the value before the map is touched again.
    let old = unsafe { prev.get(key) }?;
    let _ = map.insert(key, old, 0);
    map.get_ptr_mut(key)
}

/// Records a conntrack entry; `known_absent`: the caller just looked the
/// key up and found nothing. While a migration runs it goes into the old
/// map too: hooks still running the previous programs (they switch one by
/// one) then see flows the new ones started, such as a reply's entry.
#[inline(always)]
pub fn conntrack_insert<F: Family, K, V, const N: usize, const P: usize>(
    map: &LruHashMap<K, V, N>,
    prev: &LruHashMap<K, V, P>,
    key: &K,
    value: &V,
    known_absent: bool,
) {
    // A new key is counted, so the agent can tell evictions (inserted -
    // removed - present) from updates. An LRU update takes a free node
    // before it looks at the key, so a present key is not first tried with
    // BPF_NOEXIST: that would cost a second node (and, in a full map, an
    // eviction) for nothing.
    // SAFETY: only tested for presence.
    let absent = known_absent || unsafe { map.get(key) }.is_none();
    if !(absent && conntrack_insert_new::<F, _, _, N, P>(map, prev, key, value)) {
        let _ = map.insert(key, value, u64::from(BPF_ANY));
        mirror_to_prev(prev, key, value);
    }
}

/// Records a conntrack entry only if its key is free (atomically: of two
/// CPUs claiming one key, one wins). True when it did.
#[inline(always)]
pub fn conntrack_insert_new<F: Family, K, V, const N: usize, const P: usize>(
    map: &LruHashMap<K, V, N>,
    prev: &LruHashMap<K, V, P>,
    key: &K,
    value: &V,
) -> bool {
    if map.insert(key, value, u64::from(BPF_NOEXIST)).is_err() {
        return false;
    }
    count::<F>(stats::CT_INSERTED);
    mirror_to_prev(prev, key, value);
    true
}

/// Removes a conntrack entry; while a migration runs, from the old map
/// too, which would otherwise hand it back.
#[inline(always)]
pub fn conntrack_remove<K, V, const N: usize, const P: usize>(
    map: &LruHashMap<K, V, N>,
    prev: &LruHashMap<K, V, P>,
    key: &K,
) -> bool {
    let _ = prev.remove(key);
    map.remove(key).is_ok()
}

#[inline(always)]
fn mirror_to_prev<K, V, const P: usize>(prev: &LruHashMap<K, V, P>, key: &K, value: &V) {
    if config(config::CT_MIGRATING) != 0 {
        let _ = prev.insert(key, value, 0);
    }
}

#[btf_map(name = "lb_stats")]
pub static STATS: PerCpuArray<u64, { spec::STATS.max_entries as usize }> = PerCpuArray::new();

#[btf_map(name = "lb4_svc_stats")]
pub static SERVICE_STATS: PerCpuArray<ServiceStats, { spec::SERVICE_STATS.max_entries as usize }> =
    PerCpuArray::new();

#[btf_map(name = "lb4_affinity")]
pub static AFFINITY: LruHashMap<
    Affinity4Key,
    Affinity4Value,
    { spec::AFFINITY.max_entries as usize },
> = LruHashMap::new();

#[btf_map(name = "lb4_backend_match")]
pub static BACKEND_MATCH: HashMap<
    BackendMatchKey,
    u8,
    { spec::BACKEND_MATCH.max_entries as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "lb4_source_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRange4, u8, { spec::SOURCE_RANGES.max_entries as usize }> =
    LpmTrie::new();

#[btf_map(name = "lb4_sock_rev")]
pub static SOCK_REV: LruHashMap<
    SockRev4Key,
    SockRev4Value,
    { spec::SOCK_REV.max_entries as usize },
> = LruHashMap::new();

#[btf_map(name = "lb4_sock_fwd")]
pub static SOCK_FWD: LruHashMap<SockFwd4Key, u32, { spec::SOCK_FWD.max_entries as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb_config")]
pub static CONFIG: Array<u32, { spec::CONFIG.max_entries as usize }> = Array::new();

/// Per-CPU room for an IPv6 packet's parsed headers: off the stack, which
/// the NAT core's call chain needs for its IPv6 keys and values (BPF
/// allows 512 bytes in all). Programs run to completion on a CPU, so no
/// two packets share it at once. Not pinned: it holds nothing between
/// packets.
#[btf_map(name = "lb6_flow_scratch")]
pub static FLOW6_SCRATCH: PerCpuArray<Scratch6, 1> = PerCpuArray::new();

/// The state of an IPv4 packet's lookup, off the stack as for IPv6.
#[btf_map(name = "lb4_flow_scratch")]
pub static FLOW4_SCRATCH: PerCpuArray<MaybeUninit<NewFlow<u32>>, 1> = PerCpuArray::new();

/// An IPv6 packet's parsed headers and the state of its lookup.
pub struct Scratch6 {
    pub flow: Flow6,
    pub start: MaybeUninit<NewFlow<Ipv6Bytes>>,
}

// The IPv6 twins.
#[btf_map(name = "lb6_services")]
pub static SERVICES6: HashMap<
    Service6Key,
    Service4Value,
    { spec::SERVICES6.max_entries as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "lb6_backends")]
pub static BACKENDS6: Array<Backend6, { spec::BACKENDS6.max_entries as usize }> = Array::new();

#[btf_map(name = "lb6_reverse_nat")]
pub static REV_NAT6: HashMap<
    RevNatId,
    RevNat6,
    { spec::REV_NAT6.max_entries as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "lb6_conntrack")]
pub static CONNTRACK6: LruHashMap<Ct6Key, Ct6Value, { spec::CONNTRACK6.max_entries as usize }> =
    LruHashMap::new();

/// The previous agent's IPv6 conntrack map while it is migrated, as
/// `CONNTRACK_PREV` for IPv4.
#[btf_map(name = "lb6_conntrack_prev")]
pub static CONNTRACK6_PREV: LruHashMap<
    Ct6Key,
    Ct6Value,
    { spec::CONNTRACK6_PREV.max_entries as usize },
> = LruHashMap::new();

#[btf_map(name = "lb6_affinity")]
pub static AFFINITY6: LruHashMap<
    Affinity6Key,
    Affinity4Value,
    { spec::AFFINITY6.max_entries as usize },
> = LruHashMap::new();

#[btf_map(name = "lb6_backend_match")]
pub static BACKEND_MATCH6: HashMap<
    BackendMatchKey,
    u8,
    { spec::BACKEND_MATCH6.max_entries as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "lb6_source_ranges")]
pub static SOURCE_RANGES6: LpmTrie<
    SourceRange6,
    u8,
    { spec::SOURCE_RANGES6.max_entries as usize },
> = LpmTrie::new();

#[btf_map(name = "lb6_snat_cursor")]
pub static SNAT_CURSOR6: Array<u64, { spec::SNAT_CURSOR6.max_entries as usize }> = Array::new();

#[btf_map(name = "lb6_sock_rev")]
pub static SOCK_REV6: LruHashMap<
    SockRev6Key,
    SockRev6Value,
    { spec::SOCK_REV6.max_entries as usize },
> = LruHashMap::new();

#[btf_map(name = "lb6_sock_fwd")]
pub static SOCK_FWD6: LruHashMap<SockFwd6Key, u32, { spec::SOCK_FWD6.max_entries as usize }> =
    LruHashMap::new();

// Each declaration above against its entry in the table.
check_spec!(spec::SNAT_CURSOR, "lb4_snat_cursor", u32, u64);
check_spec!(spec::SERVICES, "lb4_services", Service4Key, Service4Value);
check_spec!(spec::MAGLEV, "lb_maglev", u32, u32);
check_spec!(spec::BACKENDS, "lb4_backends", u32, Backend4);
check_spec!(spec::REV_NAT, "lb4_reverse_nat", RevNatId, RevNat4);
check_spec!(spec::CONNTRACK, "lb4_conntrack", Ct4Key, Ct4Value);
check_spec!(spec::CONNTRACK_PREV, "lb4_conntrack_prev", Ct4Key, Ct4Value);
check_spec!(spec::STATS, "lb_stats", u32, u64);
check_spec!(spec::SERVICE_STATS, "lb4_svc_stats", u32, ServiceStats);
check_spec!(spec::AFFINITY, "lb4_affinity", Affinity4Key, Affinity4Value);
check_spec!(
    spec::BACKEND_MATCH,
    "lb4_backend_match",
    BackendMatchKey,
    u8
);
check_spec!(
    spec::SOURCE_RANGES,
    "lb4_source_ranges",
    spec::LpmKey<SourceRange4>,
    u8
);
check_spec!(spec::SOCK_REV, "lb4_sock_rev", SockRev4Key, SockRev4Value);
check_spec!(spec::SOCK_FWD, "lb4_sock_fwd", SockFwd4Key, u32);
check_spec!(spec::CONFIG, "lb_config", u32, u32);
check_spec!(spec::SERVICES6, "lb6_services", Service6Key, Service4Value);
check_spec!(spec::BACKENDS6, "lb6_backends", u32, Backend6);
check_spec!(spec::REV_NAT6, "lb6_reverse_nat", RevNatId, RevNat6);
check_spec!(spec::CONNTRACK6, "lb6_conntrack", Ct6Key, Ct6Value);
check_spec!(
    spec::CONNTRACK6_PREV,
    "lb6_conntrack_prev",
    Ct6Key,
    Ct6Value
);
check_spec!(
    spec::AFFINITY6,
    "lb6_affinity",
    Affinity6Key,
    Affinity4Value
);
check_spec!(
    spec::BACKEND_MATCH6,
    "lb6_backend_match",
    BackendMatchKey,
    u8
);
check_spec!(
    spec::SOURCE_RANGES6,
    "lb6_source_ranges",
    spec::LpmKey<SourceRange6>,
    u8
);
check_spec!(spec::SNAT_CURSOR6, "lb6_snat_cursor", u32, u64);
check_spec!(spec::SOCK_REV6, "lb6_sock_rev", SockRev6Key, SockRev6Value);
check_spec!(spec::SOCK_FWD6, "lb6_sock_fwd", SockFwd6Key, u32);

/// The `BACKEND_MATCH_*` state of a backend in a frontend (None: not one
/// of its backends).
#[inline(always)]
pub fn backend_match(backend_id: u32, rev_nat_id: RevNatId) -> Option<u8> {
    let key = BackendMatchKey {
        backend_id,
        rev_nat_id,
    };
    unsafe { BACKEND_MATCH.get(key) }.copied()
}

#[inline(always)]
pub fn config(index: u32) -> u32 {
    CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
pub fn count_service(rev_nat_id: RevNatId, bytes: u16) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += u64::from(bytes);
        }
    }
}

/// Counts one event of `F`'s packets (`lb_common::stats`).
#[inline(always)]
pub fn count<F: Family>(counter: u32) {
    if let Some(counter) = STATS.get_ptr_mut(F::STATS + counter) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}
