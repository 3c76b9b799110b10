//! The maps of one address family as the kernel holds them (`lb4_*` or
//! `lb6_*`), and how the family-neutral entries of `MapContents` are
//! written in them and read back: the writer and the reader are written
//! once, over [`RawFamily`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError},
    Pod,
};
use lb_common::{
    ipv6::{octets, words},
    map_names, Backend4, Backend6, BackendMatchKey, RevNat4, RevNat6, RevNatId, Service4Key,
    Service4Value, Service6Key, SourceRange4, SourceRange6, SOURCE_RANGE_PREFIX_BITS,
};

use crate::{
    model::{Family, IpPrefix},
    sync::{
        differ::{BackendEntry, BackendId, MapContents, MapOp, RevNatEntry, SlotKey},
        map_batch::BatchStopped,
        map_writer::{
            batch, delete_run, fd, ignore_missing, put_run, write_error, BatchKind, WriteError,
        },
    },
};

/// The raw map types of one family and their conversions.
pub trait RawFamily {
    const FAMILY: Family;
    /// Names of the services, backends, reverse NAT, backend-match and
    /// source-range maps.
    const NAMES: [&'static str; 5];
    type ServiceKey: Pod;
    type Backend: Pod + Default;
    type RevNat: Pod;
    type SourceRange: Pod;

    fn service_key(k: &SlotKey) -> Self::ServiceKey;
    fn slot_key(k: &Self::ServiceKey) -> SlotKey;
    fn backend(b: &BackendEntry) -> Self::Backend;
    /// None for a free id (zeros).
    fn backend_entry(b: &Self::Backend) -> Option<BackendEntry>;
    fn rev_nat(r: &RevNatEntry) -> Self::RevNat;
    fn rev_nat_entry(r: &Self::RevNat) -> RevNatEntry;
    fn source_range(rev_nat_id: RevNatId, r: &IpPrefix) -> Self::SourceRange;
    /// The reverse NAT id and the address of a source range.
    fn range_parts(r: &Self::SourceRange) -> (RevNatId, IpAddr);
}

/// `lb4_*`.
pub struct Ipv4Maps;
/// `lb6_*`.
pub struct Ipv6Maps;

/// Only the family's own addresses are routed to its maps
/// ([`MapOp::family`] reads the address it converts).
fn ipv4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => unreachable!("IPv6 address {a} written to an IPv4 map"),
    }
}

fn ipv6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => unreachable!("IPv4 address {a} written to an IPv6 map"),
    }
}

/// An IPv4 address as the maps hold it (network order in a u32).
fn raw4(addr: IpAddr) -> u32 {
    u32::from_ne_bytes(ipv4(addr).octets())
}

fn from_raw4(addr: u32) -> IpAddr {
    IpAddr::V4(addr.to_ne_bytes().into())
}

impl RawFamily for Ipv4Maps {
    const FAMILY: Family = Family::Ipv4;
    const NAMES: [&'static str; 5] = [
        map_names::SERVICES,
        map_names::BACKENDS,
        map_names::REV_NAT,
        map_names::BACKEND_MATCH,
        map_names::SOURCE_RANGES,
    ];
    type ServiceKey = Service4Key;
    type Backend = Backend4;
    type RevNat = RevNat4;
    type SourceRange = SourceRange4;

    fn service_key(k: &SlotKey) -> Service4Key {
        Service4Key {
            addr: raw4(k.addr),
            port: k.port.to_be(),
            backend_slot: k.backend_slot,
            proto: k.proto,
            scope: k.scope,
            _pad: [0; 2],
        }
    }

    fn slot_key(k: &Service4Key) -> SlotKey {
        SlotKey {
            addr: from_raw4(k.addr),
            port: u16::from_be(k.port),
            backend_slot: k.backend_slot,
            proto: k.proto,
            scope: k.scope,
        }
    }

    fn backend(b: &BackendEntry) -> Backend4 {
        Backend4 {
            addr: raw4(b.addr),
            port: b.port.to_be(),
            proto: b.proto,
            state: b.state,
            zone: b.zone,
            _pad: [0; 3],
        }
    }

    fn backend_entry(b: &Backend4) -> Option<BackendEntry> {
        (b.addr != 0).then(|| BackendEntry {
            addr: from_raw4(b.addr),
            port: u16::from_be(b.port),
            proto: b.proto,
            state: b.state,
            zone: b.zone,
        })
    }

    fn rev_nat(r: &RevNatEntry) -> RevNat4 {
        RevNat4 {
            addr: raw4(r.addr),
            port: r.port.to_be(),
            _pad: 0,
        }
    }

    fn rev_nat_entry(r: &RevNat4) -> RevNatEntry {
        RevNatEntry {
            addr: from_raw4(r.addr),
            port: u16::from_be(r.port),
        }
    }

    fn source_range(rev_nat_id: RevNatId, r: &IpPrefix) -> SourceRange4 {
        SourceRange4 {
            rev_nat_id,
            addr: raw4(r.addr),
        }
    }

    fn range_parts(r: &SourceRange4) -> (RevNatId, IpAddr) {
        (r.rev_nat_id, from_raw4(r.addr))
    }
}

impl RawFamily for Ipv6Maps {
    const FAMILY: Family = Family::Ipv6;
    const NAMES: [&'static str; 5] = [
        map_names::SERVICES6,
        map_names::BACKENDS6,
        map_names::REV_NAT6,
        map_names::BACKEND_MATCH6,
        map_names::SOURCE_RANGES6,
    ];
    type ServiceKey = Service6Key;
    type Backend = Backend6;
    type RevNat = RevNat6;
    type SourceRange = SourceRange6;

    fn service_key(k: &SlotKey) -> Service6Key {
        Service6Key {
            addr: words(ipv6(k.addr).octets()),
            port: k.port.to_be(),
            backend_slot: k.backend_slot,
            proto: k.proto,
            scope: k.scope,
            _pad: [0; 2],
        }
    }

    fn slot_key(k: &Service6Key) -> SlotKey {
        SlotKey {
            addr: IpAddr::V6(octets(k.addr).into()),
            port: u16::from_be(k.port),
            backend_slot: k.backend_slot,
            proto: k.proto,
            scope: k.scope,
        }
    }

    fn backend(b: &BackendEntry) -> Backend6 {
        Backend6 {
            addr: words(ipv6(b.addr).octets()),
            port: b.port.to_be(),
            proto: b.proto,
            state: b.state,
            zone: b.zone,
            _pad: [0; 3],
        }
    }

    fn backend_entry(b: &Backend6) -> Option<BackendEntry> {
        (b.addr != [0; 4]).then(|| BackendEntry {
            addr: IpAddr::V6(octets(b.addr).into()),
            port: u16::from_be(b.port),
            proto: b.proto,
            state: b.state,
            zone: b.zone,
        })
    }

    fn rev_nat(r: &RevNatEntry) -> RevNat6 {
        RevNat6 {
            addr: words(ipv6(r.addr).octets()),
            port: r.port.to_be(),
            _pad: 0,
        }
    }

    fn rev_nat_entry(r: &RevNat6) -> RevNatEntry {
        RevNatEntry {
            addr: IpAddr::V6(octets(r.addr).into()),
            port: u16::from_be(r.port),
        }
    }

    fn source_range(rev_nat_id: RevNatId, r: &IpPrefix) -> SourceRange6 {
        SourceRange6 {
            rev_nat_id,
            addr: words(ipv6(r.addr).octets()),
        }
    }

    fn range_parts(r: &SourceRange6) -> (RevNatId, IpAddr) {
        (r.rev_nat_id, IpAddr::V6(octets(r.addr).into()))
    }
}

/// The maps one family's Services are written to.
pub struct FamilyMaps<F: RawFamily> {
    pub services: HashMap<MapData, F::ServiceKey, Service4Value>,
    /// Indexed by backend id; a free id holds zeros.
    pub backends: Array<MapData, F::Backend>,
    pub rev_nat: HashMap<MapData, RevNatId, F::RevNat>,
    pub backend_match: HashMap<MapData, BackendMatchKey, u8>,
    pub source_ranges: LpmTrie<MapData, F::SourceRange, u8>,
    /// Entries the maps above hold at most, read once.
    capacity: Capacity,
}

/// Entries each batch-written map of a family holds at most.
#[derive(Clone, Copy, Debug)]
struct Capacity {
    services: usize,
    backends: usize,
    rev_nat: usize,
    backend_match: usize,
}

pub(crate) fn match_key(rev_nat_id: RevNatId, backend: BackendId) -> BackendMatchKey {
    BackendMatchKey {
        backend_id: backend.id,
        rev_nat_id,
    }
}

impl<F: RawFamily> FamilyMaps<F> {
    /// The family's maps, each from `map` by name (taken out of a loaded
    /// object, or opened from its pin).
    pub fn from_maps(mut map: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let [services, backends, rev_nat, backend_match, source_ranges] = F::NAMES;
        let services = HashMap::try_from(map(services)?)?;
        let backends = Array::try_from(map(backends)?)?;
        let rev_nat = HashMap::try_from(map(rev_nat)?)?;
        let backend_match = HashMap::try_from(map(backend_match)?)?;
        let max = |m: &MapData| -> Result<usize> { Ok(m.info()?.max_entries() as usize) };
        let capacity = Capacity {
            services: max(services.map())?,
            backends: max(backends.map())?,
            rev_nat: max(rev_nat.map())?,
            backend_match: max(backend_match.map())?,
        };
        Ok(Self {
            services,
            backends,
            rev_nat,
            backend_match,
            source_ranges: LpmTrie::try_from(map(source_ranges)?)?,
            capacity,
        })
    }

    /// Entries the map a run of `kind` goes to holds at most.
    pub(crate) fn capacity(&self, kind: BatchKind) -> usize {
        let c = &self.capacity;
        match kind {
            BatchKind::Backends => c.backends,
            BatchKind::PutRevNat | BatchKind::DeleteRevNat => c.rev_nat,
            BatchKind::PutService | BatchKind::DeleteService => c.services,
            BatchKind::PutBackendMatch | BatchKind::DeleteBackendMatch => c.backend_match,
        }
    }

    fn range_key(rev_nat_id: RevNatId, r: &IpPrefix) -> Key<F::SourceRange> {
        Key::new(
            SOURCE_RANGE_PREFIX_BITS + u32::from(r.len),
            F::source_range(rev_nat_id, r),
        )
    }

    /// One slot, looked up in the kernel.
    pub(crate) fn service(&self, key: &SlotKey) -> Option<Service4Value> {
        self.services.get(&F::service_key(key), 0).ok()
    }

    /// Adds what the family's maps hold to `c`.
    pub(crate) fn read_into(&self, c: &mut MapContents) -> Result<(), MapError> {
        // A few thousand entries a syscall: a backends array alone has
        // 131,072 slots to read when the agent adopts its maps.
        for (k, v) in batch::<_, F::ServiceKey, Service4Value>(&self.services)? {
            c.insert_service(F::slot_key(&k), v);
        }
        for (id, v) in batch::<_, u32, F::Backend>(&self.backends)? {
            if let Some(entry) = F::backend_entry(&v) {
                let family = F::FAMILY;
                c.insert_backend(BackendId { family, id }, entry);
            }
        }
        for (k, v) in batch::<_, RevNatId, F::RevNat>(&self.rev_nat)? {
            c.insert_rev_nat(k, F::rev_nat_entry(&v));
        }
        for (k, state) in batch::<_, BackendMatchKey, u8>(&self.backend_match)? {
            let backend = BackendId {
                family: F::FAMILY,
                id: k.backend_id,
            };
            c.backend_match.insert((k.rev_nat_id, backend), state);
        }
        for k in self.source_ranges.keys() {
            let k = k?;
            let len = k.prefix_len().saturating_sub(SOURCE_RANGE_PREFIX_BITS) as u8;
            let (rev, addr) = F::range_parts(&k.data());
            c.source_ranges.insert((rev, IpPrefix { addr, len }));
        }
        Ok(())
    }

    /// One write (of this family).
    pub(crate) fn apply(&mut self, op: &MapOp) -> Result<(), WriteError> {
        let r = match op {
            MapOp::PutBackend(b, v) => self.backends.set(b.id, F::backend(v), 0),
            MapOp::PutRevNat(id, v) => self.rev_nat.insert(id, F::rev_nat(v), 0),
            MapOp::PutService(k, v) => self.services.insert(F::service_key(k), v, 0),
            MapOp::DeleteService(k) => {
                return ignore_missing(self.services.remove(&F::service_key(k)))
            }
            MapOp::DeleteRevNat(id, _) => return ignore_missing(self.rev_nat.remove(id)),
            MapOp::DeleteBackend(b) => self.backends.set(b.id, F::Backend::default(), 0),
            MapOp::PutBackendMatch(rev, b, state) => {
                self.backend_match.insert(match_key(*rev, *b), state, 0)
            }
            MapOp::DeleteBackendMatch(rev, b) => {
                return ignore_missing(self.backend_match.remove(&match_key(*rev, *b)))
            }
            MapOp::PutSourceRange(rev, r) => {
                self.source_ranges.insert(&Self::range_key(*rev, r), 1, 0)
            }
            MapOp::DeleteSourceRange(rev, r) => {
                return ignore_missing(self.source_ranges.remove(&Self::range_key(*rev, r)))
            }
        };
        r.map_err(write_error)
    }

    /// One batch syscall (or a few) for `ops`, all of one `BatchKind` and
    /// of this family.
    pub(crate) fn write_batch(&self, ops: &[MapOp]) -> Result<(), BatchStopped> {
        let Some(kind) = ops.first().and_then(BatchKind::of) else {
            return Ok(());
        };
        match kind {
            BatchKind::Backends => put_run(fd(&self.backends), ops, |op| match op {
                MapOp::PutBackend(b, v) => Some((b.id, F::backend(v))),
                MapOp::DeleteBackend(b) => Some((b.id, F::Backend::default())),
                _ => None,
            }),
            BatchKind::PutRevNat => put_run(fd(&self.rev_nat), ops, |op| match op {
                MapOp::PutRevNat(id, v) => Some((*id, F::rev_nat(v))),
                _ => None,
            }),
            BatchKind::PutService => put_run(fd(&self.services), ops, |op| match op {
                MapOp::PutService(k, v) => Some((F::service_key(k), *v)),
                _ => None,
            }),
            BatchKind::PutBackendMatch => put_run(fd(&self.backend_match), ops, |op| match *op {
                MapOp::PutBackendMatch(rev, b, state) => Some((match_key(rev, b), state)),
                _ => None,
            }),
            BatchKind::DeleteRevNat => delete_run(fd(&self.rev_nat), ops, |op| match *op {
                MapOp::DeleteRevNat(id, _) => Some(id),
                _ => None,
            }),
            BatchKind::DeleteService => delete_run(fd(&self.services), ops, |op| match op {
                MapOp::DeleteService(k) => Some(F::service_key(k)),
                _ => None,
            }),
            BatchKind::DeleteBackendMatch => {
                delete_run(fd(&self.backend_match), ops, |op| match *op {
                    MapOp::DeleteBackendMatch(rev, b) => Some(match_key(rev, b)),
                    _ => None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_written_in_network_order_and_read_back_equal() {
        let slot = SlotKey {
            addr: "fd00::10".parse().unwrap(),
            port: 443,
            backend_slot: 3,
            proto: 6,
            scope: 1,
        };
        let raw = Ipv6Maps::service_key(&slot);
        assert_eq!(
            raw.addr,
            words("fd00::10".parse::<Ipv6Addr>().unwrap().octets())
        );
        assert_eq!(raw.port.to_ne_bytes(), 443u16.to_be_bytes());
        assert_eq!(Ipv6Maps::slot_key(&raw), slot);
        let v4 = SlotKey {
            addr: "10.96.0.10".parse().unwrap(),
            ..slot
        };
        let raw4 = Ipv4Maps::service_key(&v4);
        assert_eq!(raw4.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(Ipv4Maps::slot_key(&raw4), v4);

        let backend = BackendEntry {
            addr: "fd00:244::5".parse().unwrap(),
            port: 8080,
            proto: 17,
            state: 0,
            zone: 2,
        };
        assert_eq!(
            Ipv6Maps::backend_entry(&Ipv6Maps::backend(&backend)),
            Some(backend)
        );
        assert_eq!(Ipv6Maps::backend_entry(&Backend6::default()), None);
        let rev = RevNatEntry {
            addr: "fd00::10".parse().unwrap(),
            port: 53,
        };
        assert_eq!(Ipv6Maps::rev_nat_entry(&Ipv6Maps::rev_nat(&rev)), rev);
        let range: IpPrefix = "2001:db8::/32".parse().unwrap();
        let raw = Ipv6Maps::source_range(7, &range);
        assert_eq!(Ipv6Maps::range_parts(&raw), (7, range.addr));
    }
}
