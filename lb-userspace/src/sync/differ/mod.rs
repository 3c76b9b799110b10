//! Turns desired state vs. what the maps hold into an ordered list of map
//! writes. The order is what keeps packets safe without transactions:
//! backends, reverse NAT, backend slots, then the master slot (the count a
//! reader trusts) last; deletions run the other way round.

//!
//! `contents`: the maps' entries and the indexes planning reads;
//! `ids`: handing out backend and reverse NAT ids; `planner`: the phases.

mod contents;
mod ids;
mod planner;

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{
    Backend4, RevNat4, Service4Key, Service4Value, BACKEND_STATE_ACTIVE, MAX_BACKENDS, MAX_REV_NAT,
    SCOPE_EXTERNAL,
};

pub use contents::MapContents;
pub(crate) use planner::plan_scoped;

use crate::model::{DesiredState, Ipv4Prefix, L4Addr, Protocol, ServiceName};

pub(crate) fn rev_key(r: &RevNat4) -> (Ipv4Addr, u16) {
    (r.addr.to_ne_bytes().into(), u16::from_be(r.port))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend4),
    PutRevNat(u16, RevNat4),
    PutService(Service4Key, Service4Value),
    DeleteService(Service4Key),
    PutBackendMatch(u16, u32, u8),
    DeleteBackendMatch(u16, u32),
    PutSourceRange(u16, Ipv4Prefix),
    DeleteSourceRange(u16, Ipv4Prefix),
    DeleteRevNat(u16),
    DeleteBackend(u32),
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
    /// Backend ids are 1..=backend_ids (0 means none).
    pub backend_ids: u32,
    /// Reverse NAT ids are 1..=rev_nat_ids.
    pub rev_nat_ids: u32,
}

impl Default for IdLimits {
    fn default() -> Self {
        Self {
            // Ids index the backends array.
            backend_ids: MAX_BACKENDS - 1,
            // Ids are u16 and 0 means none.
            rev_nat_ids: (MAX_REV_NAT - 1).min(u32::from(u16::MAX)),
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
}

pub fn master_key(frontend: &L4Addr) -> Service4Key {
    slot_key(frontend, 0)
}

pub(crate) fn slot_key(frontend: &L4Addr, slot: u16) -> Service4Key {
    scoped_slot_key(frontend, SCOPE_EXTERNAL, slot)
}

pub(crate) fn scoped_slot_key(frontend: &L4Addr, scope: u8, slot: u16) -> Service4Key {
    Service4Key {
        addr: u32::from_ne_bytes(frontend.addr.octets()),
        port: frontend.port.to_be(),
        backend_slot: slot,
        proto: frontend.proto.number(),
        scope,
        _pad: [0; 2],
    }
}

pub(crate) fn frontend_of(key: &Service4Key) -> Option<L4Addr> {
    Some(L4Addr {
        addr: key.addr.to_ne_bytes().into(),
        port: u16::from_be(key.port),
        proto: Protocol::from_number(key.proto)?,
    })
}

pub(crate) fn backend_value(b: &L4Addr) -> Backend4 {
    Backend4 {
        addr: u32::from_ne_bytes(b.addr.octets()),
        port: b.port.to_be(),
        proto: b.proto.number(),
        state: BACKEND_STATE_ACTIVE,
        zone: 0,
        _pad: [0; 3],
    }
}

pub(crate) fn backend_addr(b: &Backend4) -> Option<L4Addr> {
    Some(L4Addr {
        addr: b.addr.to_ne_bytes().into(),
        port: u16::from_be(b.port),
        proto: Protocol::from_number(b.proto)?,
    })
}

pub(crate) fn rev_nat_value(f: &L4Addr) -> RevNat4 {
    RevNat4 {
        addr: u32::from_ne_bytes(f.addr.octets()),
        port: f.port.to_be(),
        _pad: 0,
    }
}

/// The slots of `frontend` present in `services`, master included.
pub(crate) fn slots_of<'a>(
    services: &'a BTreeMap<Service4Key, Service4Value>,
    frontend: &L4Addr,
) -> impl Iterator<Item = (&'a Service4Key, &'a Service4Value)> + 'a {
    let lo = Service4Key {
        backend_slot: 0,
        proto: 0,
        ..master_key(frontend)
    };
    let hi = Service4Key {
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
    plan_scoped(current, desired, None, &IdLimits::default())
}

/// Checks what a packet could see in `maps`: every master's slots up to its
/// count exist and point at existing backends, and its reverse NAT exists.
/// Returns the first violation.
#[cfg(test)]
pub(crate) fn reader_violation(maps: &MapContents) -> Option<String> {
    for (key, master) in maps.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        if !maps.rev_nat.contains_key(&master.rev_nat_id) {
            return Some(format!(
                "{key:?}: reverse NAT {} missing",
                master.rev_nat_id
            ));
        }
        for slot in 1..=master.count {
            let slot_key = Service4Key {
                backend_slot: slot,
                ..*key
            };
            let Some(v) = maps.services.get(&slot_key) else {
                return Some(format!("{key:?}: slot {slot} of {} missing", master.count));
            };
            if !maps.backends.contains_key(&v.backend_id) {
                return Some(format!(
                    "{key:?}: slot {slot} points at missing backend {}",
                    v.backend_id
                ));
            }
        }
    }
    None
}
