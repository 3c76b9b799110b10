//! The maps in one table: name, kind, key and value sizes and default
//! capacity. The BPF object sizes its declarations from it (and checks at
//! compile time that each declaration's name and sizes match its entry),
//! the loader checks pinned maps against it, and the agent's flags resize
//! the entries marked as sized by them.

use core::mem::size_of;

use crate::{
    config, stats, Affinity4Key, Affinity4Value, Affinity6Key, Backend4, Backend6, BackendMatchKey,
    Ct4Key, Ct4Value, Ct6Key, Ct6Value, RevNat4, RevNat6, RevNatId, Service4Key, Service4Value,
    Service6Key, ServiceStats, SockFwd4Key, SockFwd6Key, SockRev4Key, SockRev4Value, SockRev6Key,
    SockRev6Value, SourceRange4, SourceRange6,
};

/// The kernel map types the object uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    LpmTrie,
    /// A hash of maps (the values are inner maps' file descriptors).
    HashOfMaps,
}

/// One map of the object, as this version defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The name in the object, and of its pin.
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// The default capacity (see [`MapSpec::sized_by`]).
    pub max_entries: u32,
    /// The agent flag that overrides `max_entries`, if one does.
    pub sized_by: Option<Capacity>,
    /// An IPv6 map: one entry when the agent serves no IPv6 (`--ipv6`).
    pub ipv6: bool,
}

/// Capacities set by the agent's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// `--conntrack-max`.
    Conntrack,
    /// `--affinity-max`.
    Affinity,
    /// `--backends-max` (the backends array and what is indexed by backend id).
    Backends,
    /// `--services-max` (service slots, and backend-match pairs, of which
    /// there is one per backend slot).
    Services,
    /// `--socket-lb-max` (the socket LB's reverse and forward maps).
    Sockets,
    /// `--frontends-max` (reverse NAT ids of both families, and what is
    /// indexed by them: the reverse NAT maps, the per-CPU Service counters,
    /// the Maglev tables).
    Frontends,
}

impl MapSpec {
    const fn of<K, V>(name: &'static str, kind: MapKind, max_entries: u32) -> Self {
        Self {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
            sized_by: None,
            ipv6: false,
        }
    }

    const fn ipv6(self) -> Self {
        Self { ipv6: true, ..self }
    }

    const fn sized_by(self, capacity: Capacity) -> Self {
        Self {
            sized_by: Some(capacity),
            ..self
        }
    }

    /// Whether a declaration named `name` with key `K` and value `V` is
    /// this map (for compile-time checks in the BPF object).
    pub const fn declared_as<K, V>(&self, name: &str) -> bool {
        let (a, b) = (self.name.as_bytes(), name.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        self.key_size as usize == size_of::<K>() && self.value_size as usize == size_of::<V>()
    }
}

use Capacity::{Affinity, Backends, Conntrack, Frontends, Services, Sockets};
use MapKind::{Array, Hash, HashOfMaps, LpmTrie, LruHash, PerCpuArray};

/// An LPM trie key: a 32-bit prefix length in front of the data.
#[repr(C)]
pub struct LpmKey<T> {
    pub prefix_len: u32,
    pub data: T,
}

/// A slot per frontend (its master) and per backend of each frontend.
pub const SERVICES: MapSpec =
    MapSpec::of::<Service4Key, Service4Value>("lb4_services", Hash, 262_144).sized_by(Services);
/// An array indexed by backend id (lookups inlined); a free id holds zeros.
pub const BACKENDS: MapSpec =
    MapSpec::of::<u32, Backend4>("lb4_backends", Array, 131_072).sized_by(Backends);
/// Keyed by reverse NAT id.
pub const REV_NAT: MapSpec =
    MapSpec::of::<RevNatId, RevNat4>("lb4_reverse_nat", Hash, 65_536).sized_by(Frontends);
pub const CONNTRACK: MapSpec =
    MapSpec::of::<Ct4Key, Ct4Value>("lb4_conntrack", LruHash, 262_144).sized_by(Conntrack);
pub const STATS: MapSpec = MapSpec::of::<u32, u64>("lb_stats", PerCpuArray, stats::ENTRIES);
/// Indexed by reverse NAT id.
pub const SERVICE_STATS: MapSpec =
    MapSpec::of::<u32, ServiceStats>("lb4_svc_stats", PerCpuArray, REV_NAT.max_entries)
        .sized_by(Frontends);
pub const AFFINITY: MapSpec =
    MapSpec::of::<Affinity4Key, Affinity4Value>("lb4_affinity", LruHash, 65_536).sized_by(Affinity);
pub const BACKEND_MATCH: MapSpec =
    MapSpec::of::<BackendMatchKey, u8>("lb4_backend_match", Hash, SERVICES.max_entries)
        .sized_by(Services);
pub const SOURCE_RANGES: MapSpec =
    MapSpec::of::<LpmKey<SourceRange4>, u8>("lb4_source_ranges", LpmTrie, 16_384);
pub const CONFIG: MapSpec = MapSpec::of::<u32, u32>("lb_config", Array, config::COUNT);
pub const SOCK_REV: MapSpec =
    MapSpec::of::<SockRev4Key, SockRev4Value>("lb4_sock_rev", LruHash, 262_144).sized_by(Sockets);
pub const SOCK_FWD: MapSpec =
    MapSpec::of::<SockFwd4Key, u32>("lb4_sock_fwd", LruHash, 262_144).sized_by(Sockets);
/// Per backend id: where masquerading looks for its next port toward that
/// backend.
pub const SNAT_CURSOR: MapSpec =
    MapSpec::of::<u32, u64>("lb4_snat_cursor", Array, BACKENDS.max_entries).sized_by(Backends);
/// The previous agent's conntrack map while it is migrated (bound to its
/// pin only then; otherwise an empty one-entry map). Not in [`ALL`].
pub const CONNTRACK_PREV: MapSpec =
    MapSpec::of::<Ct4Key, Ct4Value>("lb4_conntrack_prev", LruHash, 1);

/// Reverse NAT id -> the frontend's Maglev table (an array of
/// `MAGLEV_MAX_WORDS` u64 words at most), for frontends of both families.
/// A table is replaced whole (a new inner map swapped in), so a reader
/// sees the old or the new one, never a mix.
pub const MAGLEV: MapSpec =
    MapSpec::of::<u32, u32>("lb_maglev", HashOfMaps, REV_NAT.max_entries).sized_by(Frontends);

/// The IPv6 twins, sized by the same flags. Backend ids are per family
/// (each indexes its own array); reverse NAT ids are one space over both,
/// so `lb4_svc_stats` counts the frontends of both.
pub const SERVICES6: MapSpec =
    MapSpec::of::<Service6Key, Service4Value>("lb6_services", Hash, SERVICES.max_entries)
        .sized_by(Services)
        .ipv6();
pub const BACKENDS6: MapSpec =
    MapSpec::of::<u32, Backend6>("lb6_backends", Array, BACKENDS.max_entries)
        .sized_by(Backends)
        .ipv6();
pub const REV_NAT6: MapSpec =
    MapSpec::of::<RevNatId, RevNat6>("lb6_reverse_nat", Hash, REV_NAT.max_entries)
        .sized_by(Frontends)
        .ipv6();
pub const CONNTRACK6: MapSpec =
    MapSpec::of::<Ct6Key, Ct6Value>("lb6_conntrack", LruHash, CONNTRACK.max_entries)
        .sized_by(Conntrack)
        .ipv6();
pub const AFFINITY6: MapSpec =
    MapSpec::of::<Affinity6Key, Affinity4Value>("lb6_affinity", LruHash, AFFINITY.max_entries)
        .sized_by(Affinity)
        .ipv6();
pub const BACKEND_MATCH6: MapSpec =
    MapSpec::of::<BackendMatchKey, u8>("lb6_backend_match", Hash, SERVICES.max_entries)
        .sized_by(Services)
        .ipv6();
pub const SOURCE_RANGES6: MapSpec = MapSpec::of::<LpmKey<SourceRange6>, u8>(
    "lb6_source_ranges",
    LpmTrie,
    SOURCE_RANGES.max_entries,
)
.ipv6();
pub const SNAT_CURSOR6: MapSpec =
    MapSpec::of::<u32, u64>("lb6_snat_cursor", Array, BACKENDS.max_entries)
        .sized_by(Backends)
        .ipv6();

/// The previous agent's IPv6 conntrack map while it is migrated, as
/// [`CONNTRACK_PREV`] for IPv4. Not in [`ALL`].
pub const CONNTRACK6_PREV: MapSpec =
    MapSpec::of::<Ct6Key, Ct6Value>("lb6_conntrack_prev", LruHash, 1);

pub const SOCK_REV6: MapSpec =
    MapSpec::of::<SockRev6Key, SockRev6Value>("lb6_sock_rev", LruHash, SOCK_REV.max_entries)
        .sized_by(Sockets)
        .ipv6();
pub const SOCK_FWD6: MapSpec =
    MapSpec::of::<SockFwd6Key, u32>("lb6_sock_fwd", LruHash, SOCK_FWD.max_entries)
        .sized_by(Sockets)
        .ipv6();

/// Every map the agent pins.
pub const ALL: [MapSpec; 24] = [
    SERVICES,
    BACKENDS,
    REV_NAT,
    CONNTRACK,
    STATS,
    SERVICE_STATS,
    AFFINITY,
    BACKEND_MATCH,
    SOURCE_RANGES,
    CONFIG,
    SOCK_REV,
    SOCK_FWD,
    SNAT_CURSOR,
    SERVICES6,
    BACKENDS6,
    REV_NAT6,
    CONNTRACK6,
    AFFINITY6,
    BACKEND_MATCH6,
    SOURCE_RANGES6,
    SNAT_CURSOR6,
    SOCK_REV6,
    SOCK_FWD6,
    MAGLEV,
];
