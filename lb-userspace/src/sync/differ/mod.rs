//! Turns desired state vs. what the maps hold into an ordered list of map
//! writes. The order is what keeps packets safe without transactions:
//! backends, reverse NAT, backend slots, then the master slot (the count a
//! reader trusts) last; deletions run the other way round. Both families
//! are planned together: each write goes to the maps of the family its
//! address names, backend ids are per family and reverse NAT ids one space.

//!
//! `contents`: the maps' entries and the indexes planning reads;
//! `ids`: handing out backend and reverse NAT ids; `planner`: the phases.

mod contents;
mod entry_ids;
mod ids;
mod planner;

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    RevNatId, Service4Value, BACKEND_STATE_ACTIVE, MAX_BACKENDS, MAX_REV_NAT, SCOPE_EXTERNAL,
};

pub use contents::MapContents;
pub use planner::IdCursors;
pub(crate) use planner::{plan_and_write, plan_scoped};

use crate::model::{DesiredState, Family, IpPrefix, L4Addr, Protocol, ServiceName};

/// A key of the services maps (`lb4_services` or `lb6_services`: the
/// address's family), in host terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub addr: IpAddr,
    /// Host byte order.
    pub port: u16,
    pub backend_slot: u16,
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
}

impl SlotKey {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// The backend a (non-master) slot's value points at: one of the
    /// slot's own family.
    pub fn backend(&self, value: &Service4Value) -> BackendId {
        BackendId {
            family: self.family(),
            id: value.backend_id,
        }
    }
}

/// A backend id: an index of its family's backends array (each family has
/// its own ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    pub family: Family,
    pub id: u32,
}

/// IPv4 ids print as numbers (as before there were two families).
impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.family {
            Family::Ipv4 => write!(f, "{}", self.id),
            Family::Ipv6 => write!(f, "{} (IPv6)", self.id),
        }
    }
}

/// An entry of a backends array (of the address's family), in host terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendEntry {
    pub addr: IpAddr,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    pub zone: u8,
}

/// An entry of a reverse NAT map (of the address's family): what replies'
/// source is restored to. Ids are one space over both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNatEntry {
    pub addr: IpAddr,
    /// Host byte order.
    pub port: u16,
}

pub(crate) fn rev_key(r: &RevNatEntry) -> (IpAddr, u16) {
    (r.addr, r.port)
}

/// One write to the maps. Each goes to the maps of one family
/// ([`MapOp::family`]): the address it carries says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(BackendId, BackendEntry),
    PutRevNat(RevNatId, RevNatEntry),
    PutService(SlotKey, Service4Value),
    DeleteService(SlotKey),
    /// Reverse NAT id, backend (of the frontend's family), `BACKEND_MATCH_*`.
    PutBackendMatch(RevNatId, BackendId, u8),
    DeleteBackendMatch(RevNatId, BackendId),
    PutSourceRange(RevNatId, IpPrefix),
    DeleteSourceRange(RevNatId, IpPrefix),
    DeleteRevNat(RevNatId, Family),
    DeleteBackend(BackendId),
}

impl MapOp {
    /// Whose maps the write goes to.
    pub fn family(&self) -> Family {
        match self {
            MapOp::PutBackend(id, _)
            | MapOp::DeleteBackend(id)
            | MapOp::PutBackendMatch(_, id, _)
            | MapOp::DeleteBackendMatch(_, id) => id.family,
            MapOp::PutRevNat(_, r) => Family::of(r.addr),
            MapOp::PutService(k, _) | MapOp::DeleteService(k) => k.family(),
            MapOp::PutSourceRange(_, r) | MapOp::DeleteSourceRange(_, r) => r.family(),
            MapOp::DeleteRevNat(_, family) => *family,
        }
    }
}

/// A write and the frontend it belongs to, so a failure can be confined to
/// that Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedOp {
    pub op: MapOp,
    pub frontend: Option<L4Addr>,
}

/// Why the writes of a Service could not be planned.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free backend id: all {limit} are in use")]
    BackendIdsExhausted { limit: u32 },
    #[error("no free reverse-NAT id: all {limit} are in use")]
    RevNatIdsExhausted { limit: u32 },
}

/// How many ids the maps have room for: the map sizes, smaller in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdLimits {
    /// Backend ids of each family are 1..=backend_ids (0 means none).
    pub backend_ids: u32,
    /// Reverse NAT ids (of both families) are 1..=rev_nat_ids.
    pub rev_nat_ids: u32,
}

impl Default for IdLimits {
    fn default() -> Self {
        Self {
            // Ids index the backends array.
            backend_ids: MAX_BACKENDS - 1,
            // 0 means none.
            rev_nat_ids: MAX_REV_NAT - 1,
        }
    }
}

/// A Service left out of a plan: it keeps what the maps hold for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplanned {
    pub service: ServiceName,
    pub frontends: Vec<L4Addr>,
    pub error: PlanError,
}

/// The ordered writes, and the Services that did not fit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<PlannedOp>,
    pub unplanned: Vec<Unplanned>,
    /// Where the plan stopped handing out ids.
    pub cursors: IdCursors,
}

pub fn master_key(frontend: &L4Addr) -> SlotKey {
    slot_key(frontend, 0)
}

pub(crate) fn slot_key(frontend: &L4Addr, slot: u16) -> SlotKey {
    scoped_slot_key(frontend, SCOPE_EXTERNAL, slot)
}

pub(crate) fn scoped_slot_key(frontend: &L4Addr, scope: u8, slot: u16) -> SlotKey {
    SlotKey {
        addr: frontend.addr,
        port: frontend.port,
        backend_slot: slot,
        proto: frontend.proto.number(),
        scope,
    }
}

pub(crate) fn frontend_of(key: &SlotKey) -> Option<L4Addr> {
    Some(L4Addr {
        addr: key.addr,
        port: key.port,
        proto: Protocol::from_number(key.proto)?,
    })
}

pub(crate) fn backend_value(b: &L4Addr) -> BackendEntry {
    BackendEntry {
        addr: b.addr,
        port: b.port,
        proto: b.proto.number(),
        state: BACKEND_STATE_ACTIVE,
        zone: 0,
    }
}

pub(crate) fn backend_addr(b: &BackendEntry) -> Option<L4Addr> {
    Some(L4Addr {
        addr: b.addr,
        port: b.port,
        proto: Protocol::from_number(b.proto)?,
    })
}

pub(crate) fn rev_nat_value(f: &L4Addr) -> RevNatEntry {
    RevNatEntry {
        addr: f.addr,
        port: f.port,
    }
}

/// The slots of `frontend` present in `services`, master included.
pub(crate) fn slots_of<'a>(
    services: &'a BTreeMap<SlotKey, Service4Value>,
    frontend: &L4Addr,
) -> impl Iterator<Item = (&'a SlotKey, &'a Service4Value)> + 'a {
    let lo = SlotKey {
        backend_slot: 0,
        proto: 0,
        scope: 0,
        ..master_key(frontend)
    };
    let hi = SlotKey {
        backend_slot: u16::MAX,
        proto: u8::MAX,
        scope: u8::MAX,
        ..master_key(frontend)
    };
    let proto = frontend.proto.number();
    services
        .range(lo..=hi)
        .filter(move |(k, _)| k.proto == proto)
}

/// Plans the writes that take the maps from `current` to `desired`.
pub fn plan(current: &MapContents, desired: &DesiredState) -> Plan {
    plan_within(current, desired, &IdLimits::default())
}

/// Plans as `plan` does, with ids up to `limits` (maps of other sizes).
pub fn plan_within(current: &MapContents, desired: &DesiredState, limits: &IdLimits) -> Plan {
    plan_scoped(current, desired, None, limits)
}

/// Checks what a packet could see in `maps`: every master's slots up to its
/// count exist and point at existing backends, and its reverse NAT exists.
/// Returns the first violation.
#[cfg(test)]
pub(crate) fn reader_violation(maps: &MapContents) -> Option<String> {
    for (key, master) in maps.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        match maps.rev_nat.get(&master.rev_nat_id) {
            None => {
                return Some(format!(
                    "{key:?}: reverse NAT {} missing",
                    master.rev_nat_id
                ))
            }
            // Written to the other family's map: the data path misses it.
            Some(r) if Family::of(r.addr) != key.family() => {
                return Some(format!(
                    "{key:?}: reverse NAT {} is {r:?}",
                    master.rev_nat_id
                ))
            }
            Some(_) => {}
        }
        for slot in 1..=master.count {
            let slot_key = SlotKey {
                backend_slot: slot,
                ..*key
            };
            let Some(v) = maps.services.get(&slot_key) else {
                return Some(format!("{key:?}: slot {slot} of {} missing", master.count));
            };
            if !maps.backends[key.family()].contains_key(&v.backend_id) {
                return Some(format!(
                    "{key:?}: slot {slot} points at missing backend {}",
                    v.backend_id
                ));
            }
        }
    }
    None
}
