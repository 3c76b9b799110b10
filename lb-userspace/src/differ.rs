//! Turns desired state vs. what the maps hold into an ordered list of map
//! writes. The order is what keeps packets safe without transactions:
//! backends, reverse NAT, backend slots, then the master slot (the count a
//! reader trusts) last; deletions run the other way round.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    Backend4, RevNat4, Service4Key, Service4Value, BACKEND_MATCH_ACTIVE, BACKEND_MATCH_TERMINATING,
    BACKEND_STATE_ACTIVE, MAX_BACKENDS, MAX_REV_NAT, SCOPE_EXTERNAL, SCOPE_INTERNAL,
};

use crate::model::{
    BackendSet, DesiredState, Ipv4Prefix, L4Addr, Protocol, ServiceEntry, ServiceName,
};

/// What the maps hold (or will hold), in map terms, with the reverse
/// indexes planning needs (kept in step by `insert_*`/`remove_*`).
#[derive(Clone, Debug, Default)]
pub struct MapContents {
    pub services: BTreeMap<Service4Key, Service4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub rev_nat: BTreeMap<u16, RevNat4>,
    /// (reverse NAT id, backend id) -> `BACKEND_MATCH_*`: which backends
    /// belong to which frontend (flows and affinity check it).
    pub backend_match: BTreeMap<(u16, u32), u8>,
    /// loadBalancerSourceRanges per reverse NAT id.
    pub source_ranges: BTreeSet<(u16, Ipv4Prefix)>,
    backend_ids: HashMap<L4Addr, u32>,
    rev_ids: HashMap<(Ipv4Addr, u16), u16>,
    /// How many backend slots point at each backend id.
    slot_users: HashMap<u32, u32>,
    /// How many master slots use each reverse NAT id.
    master_users: HashMap<u16, u32>,
    /// One past the highest backend and reverse NAT ids ever written:
    /// where the search for a free id starts, so a freed id is not handed
    /// out again until the ids wrap (conntrack and affinity entries of a
    /// deleted backend or frontend still name it until they are swept).
    pub next_backend_id: u32,
    pub next_rev_nat_id: u32,
}

/// Equal when the maps hold the same entries (the indexes follow from
/// them; the id cursors are planning history, not contents).
impl PartialEq for MapContents {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.backends == other.backends
            && self.rev_nat == other.rev_nat
            && self.backend_match == other.backend_match
            && self.source_ranges == other.source_ranges
    }
}

impl Eq for MapContents {}

impl MapContents {
    pub fn insert_service(&mut self, k: Service4Key, v: Service4Value) {
        if let Some(old) = self.services.insert(k, v) {
            self.unref(&k, &old);
        }
        if k.backend_slot == 0 {
            *self.master_users.entry(v.rev_nat_id).or_insert(0) += 1;
        } else {
            *self.slot_users.entry(v.backend_id).or_insert(0) += 1;
        }
    }

    pub fn remove_service(&mut self, k: &Service4Key) {
        if let Some(old) = self.services.remove(k) {
            self.unref(k, &old);
        }
    }

    fn unref(&mut self, k: &Service4Key, old: &Service4Value) {
        if k.backend_slot == 0 {
            decrement(&mut self.master_users, &old.rev_nat_id);
        } else {
            decrement(&mut self.slot_users, &old.backend_id);
        }
    }

    /// Whether a backend slot points at backend `id`.
    pub fn backend_in_use(&self, id: u32) -> bool {
        self.slot_users.contains_key(&id)
    }

    /// Whether a master slot uses reverse NAT `id`.
    pub fn rev_nat_in_use(&self, id: u16) -> bool {
        self.master_users.contains_key(&id)
    }

    pub fn insert_backend(&mut self, id: u32, v: Backend4) {
        self.next_backend_id = self.next_backend_id.max(id + 1);
        if let Some(old) = self.backends.insert(id, v).and_then(|o| backend_addr(&o)) {
            if self.backend_ids.get(&old) == Some(&id) {
                self.backend_ids.remove(&old);
            }
        }
        if let Some(addr) = backend_addr(&v) {
            self.backend_ids.entry(addr).or_insert(id);
        }
    }

    pub fn remove_backend(&mut self, id: u32) {
        if let Some(addr) = self.backends.remove(&id).and_then(|o| backend_addr(&o)) {
            if self.backend_ids.get(&addr) == Some(&id) {
                self.backend_ids.remove(&addr);
            }
        }
    }

    pub fn insert_rev_nat(&mut self, id: u16, v: RevNat4) {
        self.next_rev_nat_id = self.next_rev_nat_id.max(id as u32 + 1);
        if let Some(old) = self.rev_nat.insert(id, v) {
            let key = rev_key(&old);
            if self.rev_ids.get(&key) == Some(&id) {
                self.rev_ids.remove(&key);
            }
        }
        self.rev_ids.entry(rev_key(&v)).or_insert(id);
    }

    pub fn remove_rev_nat(&mut self, id: u16) {
        if let Some(old) = self.rev_nat.remove(&id) {
            let key = rev_key(&old);
            if self.rev_ids.get(&key) == Some(&id) {
                self.rev_ids.remove(&key);
            }
        }
    }

    pub fn backend_id(&self, addr: &L4Addr) -> Option<u32> {
        self.backend_ids.get(addr).copied()
    }

    pub fn rev_nat_id(&self, addr: Ipv4Addr, port: u16) -> Option<u16> {
        self.rev_ids.get(&(addr, port)).copied()
    }

    /// Frontends that have a master slot.
    pub fn frontends(&self) -> impl Iterator<Item = L4Addr> + '_ {
        self.services
            .keys()
            .filter(|k| k.backend_slot == 0)
            .filter_map(frontend_of)
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

fn rev_key(r: &RevNat4) -> (Ipv4Addr, u16) {
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
            rev_nat_ids: (MAX_REV_NAT - 1).min(u16::MAX as u32),
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

pub fn slot_key(frontend: &L4Addr, slot: u16) -> Service4Key {
    scoped_slot_key(frontend, SCOPE_EXTERNAL, slot)
}

pub fn scoped_slot_key(frontend: &L4Addr, scope: u8, slot: u16) -> Service4Key {
    Service4Key {
        addr: u32::from_ne_bytes(frontend.addr.octets()),
        port: frontend.port.to_be(),
        backend_slot: slot,
        proto: frontend.proto.number(),
        scope,
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

/// Hands out the lowest ids not in use in `used` (a map's keys).
struct IdAllocator<'a, K, V> {
    used: &'a BTreeMap<K, V>,
    next: u32,
    max: u32,
    wrapped: bool,
    /// Handed out by this allocator: not in `used` yet, and not free.
    handed: BTreeSet<u32>,
    /// Handed out, then given back by a Service that did not fit.
    released: Vec<u32>,
}

trait IntoU32 {
    fn into_u32(self) -> u32;
}

impl IntoU32 for &u32 {
    fn into_u32(self) -> u32 {
        *self
    }
}

impl IntoU32 for &u16 {
    fn into_u32(self) -> u32 {
        *self as u32
    }
}

impl<'a, K: Ord + Copy + TryFrom<u32>, V> IdAllocator<'a, K, V>
where
    for<'k> &'k K: IntoU32,
{
    /// `start`: where the search begins (ids below it were used before).
    fn new(used: &'a BTreeMap<K, V>, max: u32, start: u32) -> Self {
        Self {
            used,
            next: start.max(1),
            max,
            wrapped: false,
            handed: BTreeSet::new(),
            released: Vec::new(),
        }
    }

    fn release(&mut self, id: u32) {
        self.released.push(id);
    }

    /// Past the highest id ever used first (O(1) while ids last), then the
    /// holes from 1 up.
    fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.released.pop() {
            return Some(id);
        }
        if !self.wrapped {
            let past_used = self.used.keys().next_back().map_or(1, |k| k.into_u32() + 1);
            self.next = self.next.max(past_used);
        }
        loop {
            if self.next > self.max {
                if self.wrapped {
                    return None;
                }
                self.wrapped = true;
                self.next = 1;
            }
            let id = self.next;
            self.next += 1;
            let key = K::try_from(id).ok()?;
            // After wrapping, ids handed out earlier in this plan come round
            // again: they are taken even though `used` does not show it.
            if !self.used.contains_key(&key) && self.handed.insert(id) {
                return Some(id);
            }
        }
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
pub fn plan(current: &MapContents, desired: &DesiredState) -> Plan {
    plan_scoped(current, desired, None, &IdLimits::default())
}

/// Plans the writes for the frontends in `touched` only (None: all of them).
/// An incremental change touches the frontends of the Services that changed,
/// before and after, so its cost does not grow with the number of Services.
///
/// A Service whose new backends or frontends find no free id is left out
/// whole (in `Plan::unplanned`): it keeps what the maps hold for it, and
/// every other Service is planned as usual.
pub fn plan_scoped(
    current: &MapContents,
    desired: &DesiredState,
    touched: Option<&BTreeSet<L4Addr>>,
    limits: &IdLimits,
) -> Plan {
    let mut ops = Vec::new();
    let candidate_entries: Vec<&ServiceEntry> = match touched {
        None => desired.entries().values().collect(),
        Some(t) => t.iter().filter_map(|f| desired.get(f)).collect(),
    };
    // Ids are handed out Service by Service (in name order, so which ones
    // fit a nearly full map does not depend on arrival order), and a
    // Service gets all of its ids or none.
    let mut by_service: BTreeMap<&ServiceName, Vec<&ServiceEntry>> = BTreeMap::new();
    for e in candidate_entries {
        by_service.entry(&e.service).or_default().push(e);
    }
    let mut backend_alloc = IdAllocator::new(
        &current.backends,
        limits.backend_ids,
        current.next_backend_id,
    );
    let mut rev_alloc = IdAllocator::new(
        &current.rev_nat,
        limits.rev_nat_ids,
        current.next_rev_nat_id,
    );
    let mut new_backend_ids: BTreeMap<L4Addr, u32> = BTreeMap::new();
    let mut new_rev_ids: BTreeMap<(Ipv4Addr, u16), u16> = BTreeMap::new();
    let mut entries: Vec<&ServiceEntry> = Vec::new();
    let mut unplanned = Vec::new();
    let mut failed: BTreeSet<L4Addr> = BTreeSet::new();
    for (service, svc_entries) in by_service {
        let mut fresh_backends: Vec<L4Addr> = Vec::new();
        let mut fresh_revs: Vec<(Ipv4Addr, u16)> = Vec::new();
        let mut error = None;
        'ids: for entry in &svc_entries {
            for b in entry.all_backends() {
                if current.backend_id(b).is_some() || new_backend_ids.contains_key(b) {
                    continue;
                }
                let Some(id) = backend_alloc.allocate() else {
                    error = Some(PlanError::BackendIdsExhausted {
                        limit: limits.backend_ids,
                    });
                    break 'ids;
                };
                new_backend_ids.insert(*b, id);
                fresh_backends.push(*b);
            }
            let f = entry.frontend;
            if current.rev_nat_id(f.addr, f.port).is_some()
                || new_rev_ids.contains_key(&(f.addr, f.port))
            {
                continue;
            }
            let Some(id) = rev_alloc.allocate() else {
                error = Some(PlanError::RevNatIdsExhausted {
                    limit: limits.rev_nat_ids,
                });
                break 'ids;
            };
            new_rev_ids.insert((f.addr, f.port), id as u16);
            fresh_revs.push((f.addr, f.port));
        }
        match error {
            None => entries.extend(svc_entries),
            Some(error) => {
                for b in fresh_backends {
                    backend_alloc.release(new_backend_ids.remove(&b).expect("just allocated"));
                }
                for r in fresh_revs {
                    rev_alloc.release(new_rev_ids.remove(&r).expect("just allocated") as u32);
                }
                let frontends: Vec<L4Addr> = svc_entries.iter().map(|e| e.frontend).collect();
                failed.extend(frontends.iter().copied());
                unplanned.push(Unplanned {
                    service: service.clone(),
                    frontends,
                    error,
                });
            }
        }
    }

    // 1. Backends first: a slot must never point at a missing backend.
    let mut wanted_backends: BTreeSet<u32> = BTreeSet::new();
    for entry in &entries {
        for b in entry.all_backends() {
            let id = current
                .backend_id(b)
                .or_else(|| new_backend_ids.get(b).copied())
                .expect("allocated above");
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
    // Backends the slots of unplanned frontends point at stay.
    for f in &failed {
        for (k, v) in slots_of(&current.services, f) {
            if k.backend_slot != 0 {
                wanted_backends.insert(v.backend_id);
            }
        }
    }
    let backend_id = |b: &L4Addr| {
        current
            .backend_id(b)
            .or_else(|| new_backend_ids.get(b).copied())
    };

    // 2. Reverse NAT before a Service becomes visible, so its first reply
    // already finds it.
    let mut wanted_rev = BTreeSet::new();
    for entry in &entries {
        let f = entry.frontend;
        let id = current
            .rev_nat_id(f.addr, f.port)
            .or_else(|| new_rev_ids.get(&(f.addr, f.port)).copied())
            .expect("allocated above");
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
    let rev_id = |f: &L4Addr| {
        current
            .rev_nat_id(f.addr, f.port)
            .or_else(|| new_rev_ids.get(&(f.addr, f.port)).copied())
    };

    // 2b. Which backends belong to the frontend (flows and session affinity
    // check it) and source ranges, before a master
    // turns them on. TCP and UDP of one port share a reverse NAT id, so
    // these are planned per address and port.
    let mut groups: BTreeSet<(Ipv4Addr, u16)> = BTreeSet::new();
    match touched {
        None => {
            groups.extend(desired.entries().keys().map(|f| (f.addr, f.port)));
            groups.extend(current.rev_nat.values().map(rev_key));
        }
        Some(t) => groups.extend(t.iter().map(|f| (f.addr, f.port))),
    }
    let mut extra_deletes = Vec::new();
    for &(addr, port) in &groups {
        let Some(rev) = current
            .rev_nat_id(addr, port)
            .or_else(|| new_rev_ids.get(&(addr, port)).copied())
        else {
            continue;
        };
        let mut matches: BTreeMap<(u16, u32), u8> = BTreeMap::new();
        let mut ranges = BTreeSet::new();
        // An unplanned frontend keeps its entries, so nothing of the
        // address and port it shares is deleted.
        let mut keep_all = false;
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let frontend = L4Addr { addr, port, proto };
            if failed.contains(&frontend) {
                keep_all = true;
                continue;
            }
            let Some(e) = desired.get(&frontend) else {
                continue;
            };
            for set in std::iter::once(&e.backends).chain(e.internal.as_ref()) {
                for b in &set.terminating {
                    let id = backend_id(b).expect("allocated in step 1");
                    matches
                        .entry((rev, id))
                        .or_insert(BACKEND_MATCH_TERMINATING);
                }
                for b in &set.active {
                    let id = backend_id(b).expect("allocated in step 1");
                    matches.insert((rev, id), BACKEND_MATCH_ACTIVE);
                }
            }
            ranges.extend(e.source_ranges.iter().map(|r| (rev, *r)));
        }
        let tag = Some(L4Addr {
            addr,
            port,
            proto: Protocol::Tcp,
        });
        for (m, state) in &matches {
            if current.backend_match.get(m) != Some(state) {
                ops.push(PlannedOp {
                    op: MapOp::PutBackendMatch(m.0, m.1, *state),
                    frontend: None,
                });
            }
        }
        for r in &ranges {
            if !current.source_ranges.contains(r) {
                ops.push(PlannedOp {
                    op: MapOp::PutSourceRange(r.0, r.1),
                    frontend: None,
                });
            }
        }
        if keep_all {
            continue;
        }
        for m in current
            .backend_match
            .range((rev, 0)..=(rev, u32::MAX))
            .map(|(k, _)| k)
        {
            if !matches.contains_key(m) {
                extra_deletes.push(PlannedOp {
                    op: MapOp::DeleteBackendMatch(m.0, m.1),
                    frontend: tag,
                });
            }
        }
        for r in current.source_ranges.iter().filter(|(id, _)| *id == rev) {
            if !ranges.contains(r) {
                extra_deletes.push(PlannedOp {
                    op: MapOp::DeleteSourceRange(r.0, r.1),
                    frontend: None,
                });
            }
        }
    }

    // 3. Per frontend and scope: slots 1..=n, then the master (count) last,
    // then the slots past the new count. The internal scope goes first: the
    // external master's flag sends pod traffic to it.
    for entry in &entries {
        let f = entry.frontend;
        let tag = Some(f);
        let rev_nat_id = rev_id(&f).expect("allocated in step 2");
        let scopes: [(u8, Option<&BackendSet>); 2] = [
            (SCOPE_INTERNAL, entry.internal.as_ref()),
            (SCOPE_EXTERNAL, Some(&entry.backends)),
        ];
        for (scope, set) in scopes {
            let Some(set) = set else {
                continue;
            };
            let mut n = 0u16;
            for b in set.all() {
                n += 1;
                let key = scoped_slot_key(&f, scope, n);
                let id = backend_id(b).expect("allocated in step 1");
                let value = Service4Value {
                    backend_id: id,
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
                count: set.active.len() as u16,
                terminating_count: set.terminating.len() as u16,
                rev_nat_id,
                flags: entry.flags,
                affinity_timeout: entry.affinity_timeout,
                ..Default::default()
            };
            let key = scoped_slot_key(&f, scope, 0);
            if current.services.get(&key) != Some(&master) {
                ops.push(PlannedOp {
                    op: MapOp::PutService(key, master),
                    frontend: tag,
                });
            }
        }
        for (key, _) in slots_of(&current.services, &f) {
            let len = match key.scope {
                SCOPE_EXTERNAL => Some(entry.backends.all().count()),
                SCOPE_INTERNAL => entry.internal.as_ref().map(|s| s.all().count()),
                _ => None,
            };
            let stale = match len {
                Some(len) => key.backend_slot as usize > len,
                None => true,
            };
            if stale {
                ops.push(PlannedOp {
                    op: MapOp::DeleteService(*key),
                    frontend: tag,
                });
            }
        }
    }

    // 4. Frontends that are gone: master first, so lookups miss at once.
    let candidates: Vec<L4Addr> = match touched {
        None => current.frontends().collect(),
        Some(t) => t.iter().copied().collect(),
    };
    let mut orphan_backends = BTreeSet::new();
    let mut orphan_revs = BTreeSet::new();
    for f in candidates.iter().filter(|f| desired.get(f).is_none()) {
        let mut slots: Vec<(Service4Key, Service4Value)> = slots_of(&current.services, f)
            .map(|(k, v)| (*k, *v))
            .collect();
        // Masters (slot 0) first, external before internal.
        slots.sort_by_key(|(k, _)| (k.backend_slot, k.scope));
        for (key, value) in slots {
            if key.backend_slot == 0 {
                orphan_revs.insert(value.rev_nat_id);
            } else {
                orphan_backends.insert(value.backend_id);
            }
            ops.push(PlannedOp {
                op: MapOp::DeleteService(key),
                frontend: Some(*f),
            });
        }
    }
    ops.extend(extra_deletes);
    if touched.is_none() {
        // Malformed leftovers (unknown protocol numbers) go too.
        for key in current.services.keys().filter(|k| frontend_of(k).is_none()) {
            ops.push(PlannedOp {
                op: MapOp::DeleteService(*key),
                frontend: None,
            });
        }
    }

    // 5. Reverse NAT and backends nobody uses any more.
    match touched {
        None => {
            orphan_revs.extend(current.rev_nat.keys().filter(|id| !wanted_rev.contains(id)));
            orphan_backends.extend(
                current
                    .backends
                    .keys()
                    .filter(|id| !wanted_backends.contains(id)),
            );
        }
        Some(_) => {
            // Backends the touched frontends used before this change.
            for f in candidates.iter().filter(|f| !failed.contains(f)) {
                for (k, v) in slots_of(&current.services, f) {
                    if k.backend_slot != 0 {
                        orphan_backends.insert(v.backend_id);
                    }
                }
            }
        }
    }
    for id in orphan_revs {
        let Some(r) = current.rev_nat.get(&id) else {
            continue;
        };
        if !wanted_rev.contains(&id) && !desired_uses_rev(desired, r) {
            ops.push(PlannedOp {
                op: MapOp::DeleteRevNat(id),
                frontend: None,
            });
        }
    }
    for id in orphan_backends {
        let Some(b) = current.backends.get(&id) else {
            continue;
        };
        let still_used = wanted_backends.contains(&id)
            || backend_addr(b).is_some_and(|a| desired.uses_backend(&a));
        if !still_used {
            ops.push(PlannedOp {
                op: MapOp::DeleteBackend(id),
                frontend: None,
            });
        }
    }
    Plan { ops, unplanned }
}

/// Whether a frontend of `desired` still restores to this address and port
/// (TCP and UDP of one port share a reverse NAT entry).
fn desired_uses_rev(desired: &DesiredState, r: &RevNat4) -> bool {
    let (addr, port) = rev_key(r);
    [Protocol::Tcp, Protocol::Udp].iter().any(|proto| {
        desired
            .get(&L4Addr {
                addr,
                port,
                proto: *proto,
            })
            .is_some()
    })
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
