//! Turns desired state vs. what the maps hold into an ordered list of map
//! writes. The order is what keeps packets safe without transactions:
//! backends, reverse NAT, backend slots, then the master slot (the count a
//! reader trusts) last; deletions run the other way round.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    Backend4, RevNat4, Service4Key, Service4Value, BACKEND_STATE_ACTIVE, MAX_BACKENDS, MAX_REV_NAT,
};

use crate::model::{DesiredState, L4Addr, Protocol};

/// What the maps hold (or will hold), in map terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<Service4Key, Service4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub rev_nat: BTreeMap<u16, RevNat4>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend4),
    PutRevNat(u16, RevNat4),
    PutService(Service4Key, Service4Value),
    DeleteService(Service4Key),
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free backend id: {MAX_BACKENDS} backends are in use")]
    BackendIdsExhausted,
    #[error("no free reverse-NAT id: {MAX_REV_NAT} frontends are in use")]
    RevNatIdsExhausted,
}

pub fn master_key(frontend: &L4Addr) -> Service4Key {
    slot_key(frontend, 0)
}

pub fn slot_key(frontend: &L4Addr, slot: u16) -> Service4Key {
    Service4Key {
        addr: u32::from_ne_bytes(frontend.addr.octets()),
        port: frontend.port.to_be(),
        backend_slot: slot,
        proto: frontend.proto.number(),
        scope: 0,
        _pad: [0; 2],
    }
}

pub fn frontend_of(key: &Service4Key) -> Option<L4Addr> {
    Some(L4Addr {
        addr: key.addr.to_ne_bytes().into(),
        port: u16::from_be(key.port),
        proto: Protocol::from_number(key.proto)?,
    })
}

pub fn backend_value(b: &L4Addr) -> Backend4 {
    Backend4 {
        addr: u32::from_ne_bytes(b.addr.octets()),
        port: b.port.to_be(),
        proto: b.proto.number(),
        state: BACKEND_STATE_ACTIVE,
        zone: 0,
        _pad: [0; 3],
    }
}

pub fn backend_addr(b: &Backend4) -> Option<L4Addr> {
    Some(L4Addr {
        addr: b.addr.to_ne_bytes().into(),
        port: u16::from_be(b.port),
        proto: Protocol::from_number(b.proto)?,
    })
}

fn rev_nat_value(f: &L4Addr) -> RevNat4 {
    RevNat4 {
        addr: u32::from_ne_bytes(f.addr.octets()),
        port: f.port.to_be(),
        _pad: 0,
    }
}

/// Hands out the lowest id not in use, keeping ids that already exist.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    max: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>, max: u32) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 1,
            max,
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        while self.next <= self.max {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

/// The slots of `frontend` present in `services`, master included.
pub fn slots_of<'a>(
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
pub fn plan(current: &MapContents, desired: &DesiredState) -> Result<Vec<PlannedOp>, PlanError> {
    let mut ops = Vec::new();

    // Ids: keep the ones the maps already use, allocate the rest.
    let mut backend_ids: BTreeMap<L4Addr, u32> = BTreeMap::new();
    for (id, b) in &current.backends {
        if let Some(addr) = backend_addr(b) {
            backend_ids.entry(addr).or_insert(*id);
        }
    }
    let mut rev_ids: BTreeMap<(std::net::Ipv4Addr, u16), u16> = BTreeMap::new();
    for (id, r) in &current.rev_nat {
        rev_ids
            .entry((r.addr.to_ne_bytes().into(), u16::from_be(r.port)))
            .or_insert(*id);
    }
    let mut backend_alloc = IdAllocator::new(current.backends.keys().copied(), MAX_BACKENDS);
    let mut rev_alloc =
        IdAllocator::new(current.rev_nat.keys().map(|id| *id as u32), MAX_REV_NAT - 1);

    // 1. Backends first: a slot must never point at a missing backend.
    let mut wanted_backends = BTreeSet::new();
    for entry in desired.entries.values() {
        for b in &entry.backends {
            let id = match backend_ids.get(b) {
                Some(id) => *id,
                None => {
                    let id = backend_alloc
                        .allocate()
                        .ok_or(PlanError::BackendIdsExhausted)?;
                    backend_ids.insert(*b, id);
                    id
                }
            };
            if wanted_backends.insert(id) {
                let value = backend_value(b);
                if current.backends.get(&id) != Some(&value) {
                    ops.push(PlannedOp {
                        op: MapOp::PutBackend(id, value),
                        frontend: None,
                    });
                }
            }
        }
    }

    // 2. Reverse NAT before a Service becomes visible, so its first reply
    // already finds it.
    let mut wanted_rev = BTreeSet::new();
    for entry in desired.entries.values() {
        let f = entry.frontend;
        let id = match rev_ids.get(&(f.addr, f.port)) {
            Some(id) => *id,
            None => {
                let id = rev_alloc.allocate().ok_or(PlanError::RevNatIdsExhausted)? as u16;
                rev_ids.insert((f.addr, f.port), id);
                id
            }
        };
        if wanted_rev.insert(id) {
            let value = rev_nat_value(&f);
            if current.rev_nat.get(&id) != Some(&value) {
                ops.push(PlannedOp {
                    op: MapOp::PutRevNat(id, value),
                    frontend: Some(f),
                });
            }
        }
    }

    // 3. Per frontend: slots 1..=n, then the master (count) last, then the
    // slots past the new count.
    for entry in desired.entries.values() {
        let f = entry.frontend;
        let tag = Some(f);
        for (i, b) in entry.backends.iter().enumerate() {
            let key = slot_key(&f, i as u16 + 1);
            let value = Service4Value {
                backend_id: backend_ids[b],
                ..Default::default()
            };
            if current.services.get(&key) != Some(&value) {
                ops.push(PlannedOp {
                    op: MapOp::PutService(key, value),
                    frontend: tag,
                });
            }
        }
        let master = Service4Value {
            count: entry.backends.len() as u16,
            rev_nat_id: rev_ids[&(f.addr, f.port)],
            flags: entry.flags,
            ..Default::default()
        };
        if current.services.get(&master_key(&f)) != Some(&master) {
            ops.push(PlannedOp {
                op: MapOp::PutService(master_key(&f), master),
                frontend: tag,
            });
        }
        for (key, _) in slots_of(&current.services, &f) {
            if key.backend_slot as usize > entry.backends.len() {
                ops.push(PlannedOp {
                    op: MapOp::DeleteService(*key),
                    frontend: tag,
                });
            }
        }
    }

    // 4. Frontends that are gone: master first, so lookups miss at once.
    let gone: BTreeSet<L4Addr> = current
        .services
        .keys()
        .filter_map(frontend_of)
        .filter(|f| !desired.entries.contains_key(f))
        .collect();
    for f in &gone {
        let mut slots: Vec<Service4Key> = slots_of(&current.services, f).map(|(k, _)| *k).collect();
        slots.sort_by_key(|k| k.backend_slot);
        for key in slots {
            ops.push(PlannedOp {
                op: MapOp::DeleteService(key),
                frontend: Some(*f),
            });
        }
    }
    // Malformed leftovers (unknown protocol numbers) go too.
    for key in current.services.keys().filter(|k| frontend_of(k).is_none()) {
        ops.push(PlannedOp {
            op: MapOp::DeleteService(*key),
            frontend: None,
        });
    }

    // 5. Reverse NAT and backends nobody uses any more.
    for id in current.rev_nat.keys().filter(|id| !wanted_rev.contains(id)) {
        ops.push(PlannedOp {
            op: MapOp::DeleteRevNat(*id),
            frontend: None,
        });
    }
    for id in current
        .backends
        .keys()
        .filter(|id| !wanted_backends.contains(id))
    {
        ops.push(PlannedOp {
            op: MapOp::DeleteBackend(*id),
            frontend: None,
        });
    }
    Ok(ops)
}

/// Checks what a packet could see in `maps`: every master's slots up to its
/// count exist and point at existing backends, and its reverse NAT exists.
/// Returns the first violation.
pub fn reader_violation(maps: &MapContents) -> Option<String> {
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
