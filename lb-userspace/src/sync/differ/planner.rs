//! The planner: one method per phase, in the order the writes must reach
//! the maps (see the module above). Ids are allocated first, Service by
//! Service; every later phase resolves a backend or frontend through
//! `NewIds`, which holds what the maps already had plus what was handed
//! out, so a planned entry always resolves. A planned entry's backend ids
//! are also kept in `EntryIds`, in its backends' order, so later phases
//! read them instead of looking each address up again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    RevNatId, Service4Value, BACKEND_MATCH_ACTIVE, BACKEND_MATCH_TERMINATING, SCOPE_EXTERNAL,
    SCOPE_INTERNAL,
};

use super::{
    backend_addr, backend_value,
    entry_ids::{EntryIds, SetIds},
    frontend_of,
    ids::{BackendIdSet, IdAllocator},
    rev_key, rev_nat_value, scoped_slot_key, slots_of, BackendEntry, BackendId, IdLimits,
    MapContents, MapOp, Plan, PlanError, PlannedOp, RevNatEntry, SlotKey, Unplanned,
};
use crate::model::{
    BackendSet, DesiredState, Family, IpPrefix, L4Addr, PerFamily, Protocol, ServiceEntry,
    ServiceName,
};

/// Plans the writes for the frontends in `touched` only (None: all of them).
/// An incremental change touches the frontends of the Services that changed,
/// before and after, so its cost does not grow with the number of Services.
///
/// A Service whose new backends or frontends find no free id is left out
/// whole (in `Plan::unplanned`): it keeps what the maps hold for it, and
/// every other Service is planned as usual.
pub(crate) fn plan_scoped(
    current: &MapContents,
    desired: &DesiredState,
    touched: Option<&BTreeSet<L4Addr>>,
    limits: &IdLimits,
) -> Plan {
    let mut planner = Planner::new(desired, touched);
    let cursors = planner.allocate_ids(current, limits);
    let mut ops = Vec::new();
    for phase in Phase::ALL {
        while !planner.plan(phase, current, usize::MAX) {}
        ops.append(&mut planner.ops);
    }
    Plan {
        ops,
        unplanned: planner.unplanned,
        cursors,
    }
}

/// Plans as `plan_scoped` does, but in parts of about `chunk` writes, each
/// handed to `write` (which applies them and records them in `current`)
/// before the next is planned: a full sync of a large cluster never holds
/// all of its writes at once (at 10,000 Services x 10 endpoints, 320,000
/// of 60 bytes). The ops are the same as `plan_scoped`'s: a phase reads of
/// `current` only entries of its own kind and of the Service or frontend
/// it is planning, which no other part writes, and ids, which earlier
/// phases add as this plan handed them out. Returns the Services left out.
pub(crate) fn plan_and_write(
    current: &mut MapContents,
    desired: &DesiredState,
    touched: Option<&BTreeSet<L4Addr>>,
    limits: &IdLimits,
    chunk: usize,
    mut write: impl FnMut(&[PlannedOp], &mut MapContents),
) -> Vec<Unplanned> {
    let mut planner = Planner::new(desired, touched);
    planner.allocate_ids(current, limits).record(current);
    for phase in Phase::ALL {
        loop {
            let done = planner.plan(phase, current, chunk);
            if !planner.ops.is_empty() {
                write(&planner.ops, current);
            }
            // Kept for the next part: a fresh vector of 8,192 ops per part
            // was memory the allocator handed back and faulted in again.
            planner.ops.clear();
            if done {
                break;
            }
        }
    }
    planner.unplanned
}

/// The phases of a plan, in the order their writes must reach the maps.
#[derive(Clone, Copy)]
enum Phase {
    Backends,
    RevNat,
    Memberships,
    Slots,
    /// Gone frontends, then what nobody uses any more: one phase, as which
    /// ids lost their users is read from the gone frontends' slots.
    Deletes,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Backends,
        Phase::RevNat,
        Phase::Memberships,
        Phase::Slots,
        Phase::Deletes,
    ];
}

/// Ids of backends and frontends: those the maps hold, then those this
/// plan handed out.
#[derive(Default)]
struct NewIds {
    /// Ids in the family of the address.
    backends: BTreeMap<L4Addr, u32>,
    rev_nat: BTreeMap<(IpAddr, u16), RevNatId>,
}

impl NewIds {
    /// Drops the ids the maps now hold (an earlier phase wrote them): a
    /// full sync need not keep 100,000 new backends twice.
    fn forget_written(&mut self, current: &MapContents) {
        self.backends
            .retain(|b, id| current.backend_id(b) != Some(*id));
        self.rev_nat
            .retain(|&(addr, port), id| current.rev_nat_id(addr, port) != Some(*id));
    }

    fn backend(&self, current: &MapContents, b: &L4Addr) -> Option<u32> {
        current
            .backend_id(b)
            .or_else(|| self.backends.get(b).copied())
    }

    fn rev_nat(&self, current: &MapContents, addr: IpAddr, port: u16) -> Option<RevNatId> {
        current
            .rev_nat_id(addr, port)
            .or_else(|| self.rev_nat.get(&(addr, port)).copied())
    }

    /// The id of a backend of a planned entry, which `allocate_ids` gave one.
    fn planned_backend(&self, current: &MapContents, b: &L4Addr) -> BackendId {
        let id = self
            .backend(current, b)
            .expect("allocate_ids gave every backend of a planned entry an id");
        BackendId {
            family: b.family(),
            id,
        }
    }

    /// The reverse NAT id of a planned frontend.
    fn planned_rev_nat(&self, current: &MapContents, f: &L4Addr) -> RevNatId {
        self.rev_nat(current, f.addr, f.port)
            .expect("allocate_ids gave every planned frontend an id")
    }
}

struct Planner<'a> {
    desired: &'a DesiredState,
    touched: Option<&'a BTreeSet<L4Addr>>,
    ids: NewIds,
    /// The backend ids of the entries planned.
    entry_ids: EntryIds,
    /// The entries planned (their Services got every id they need).
    entries: Vec<&'a ServiceEntry>,
    /// Frontends of Services left out: they keep what the maps hold.
    failed: BTreeSet<L4Addr>,
    unplanned: Vec<Unplanned>,
    wanted_backends: BackendIdSet,
    wanted_rev: BTreeSet<RevNatId>,
    ops: Vec<PlannedOp>,
    /// Membership and source range deletions, written after the gone
    /// frontends' slots.
    late_deletes: Vec<PlannedOp>,
    /// See `note_previous_backends`.
    previous_backends: BTreeSet<BackendId>,
    /// Where the current phase goes on: an index in `entries`, or in
    /// `groups` for memberships.
    cursor: usize,
    /// The memberships phase's addresses and ports.
    groups: Vec<(IpAddr, u16)>,
}

impl<'a> Planner<'a> {
    fn new(desired: &'a DesiredState, touched: Option<&'a BTreeSet<L4Addr>>) -> Self {
        Self {
            desired,
            touched,
            ids: NewIds::default(),
            entry_ids: EntryIds::default(),
            entries: Vec::new(),
            failed: BTreeSet::new(),
            unplanned: Vec::new(),
            wanted_backends: BackendIdSet::default(),
            wanted_rev: BTreeSet::new(),
            ops: Vec::new(),
            late_deletes: Vec::new(),
            previous_backends: BTreeSet::new(),
            cursor: 0,
            groups: Vec::new(),
        }
    }

    /// Plans the next part of `phase`: until `chunk` ops are planned or the
    /// phase is done (true). Deletions are planned in one part.
    fn plan(&mut self, phase: Phase, current: &MapContents, chunk: usize) -> bool {
        if self.cursor == 0 {
            self.start(phase, current);
        }
        let done = match phase {
            Phase::Backends => {
                let done = self.for_entries(chunk, |p, e| p.put_entry_backends(current, e));
                if done {
                    self.keep_failed_frontends_backends(current);
                }
                done
            }
            Phase::RevNat => self.for_entries(chunk, |p, e| p.put_entry_rev_nat(current, e)),
            Phase::Memberships => self.put_memberships(current, chunk),
            Phase::Slots => self.for_entries(chunk, |p, e| p.put_entry_slots(current, e)),
            Phase::Deletes => {
                self.delete_gone_frontends(current);
                self.delete_unused_rev_nat_and_backends(current);
                true
            }
        };
        if done {
            self.cursor = 0;
        }
        done
    }

    /// What a phase reads before its first part is planned.
    fn start(&mut self, phase: Phase, current: &MapContents) {
        self.ids.forget_written(current);
        match phase {
            Phase::Memberships => self.groups = self.membership_groups(current),
            Phase::Slots => self.note_previous_backends(current),
            _ => {}
        }
    }

    /// Plans the planned entries from the cursor on, until `chunk` ops are
    /// planned (false) or every entry is (true).
    fn for_entries(
        &mut self,
        chunk: usize,
        mut plan_entry: impl FnMut(&mut Self, &'a ServiceEntry),
    ) -> bool {
        while let Some(&entry) = self.entries.get(self.cursor) {
            self.cursor += 1;
            plan_entry(self, entry);
            if self.ops.len() >= chunk {
                return false;
            }
        }
        true
    }

    fn push(&mut self, op: MapOp, frontend: Option<L4Addr>) {
        self.ops.push(PlannedOp { op, frontend });
    }

    /// Ids are handed out Service by Service (in name order, so which ones
    /// fit a nearly full map does not depend on arrival order), and a
    /// Service gets all of its ids or none.
    fn allocate_ids(&mut self, current: &MapContents, limits: &IdLimits) -> IdCursors {
        let candidates: Vec<&'a ServiceEntry> = match self.touched {
            None => self.desired.entries().values().collect(),
            Some(t) => t.iter().filter_map(|f| self.desired.get(f)).collect(),
        };
        let mut by_service: BTreeMap<&ServiceName, Vec<&'a ServiceEntry>> = BTreeMap::new();
        for e in candidates {
            by_service.entry(&e.service).or_default().push(e);
        }
        let backends = |family| {
            IdAllocator::new(
                &current.backends[family],
                limits.backend_ids,
                current.next_backend_id[family],
            )
        };
        let mut allocators = Allocators {
            backends: PerFamily {
                ipv4: backends(Family::Ipv4),
                ipv6: backends(Family::Ipv6),
            },
            rev_nat: IdAllocator::new(
                &current.rev_nat,
                limits.rev_nat_ids,
                current.next_rev_nat_id,
            ),
            limits: *limits,
        };
        for (service, entries) in by_service {
            match self.allocate_service(current, &entries, &mut allocators) {
                Ok(()) => self.entries.extend(entries),
                Err(error) => {
                    let frontends: Vec<L4Addr> = entries.iter().map(|e| e.frontend).collect();
                    self.failed.extend(frontends.iter().copied());
                    self.unplanned.push(Unplanned {
                        service: service.clone(),
                        frontends,
                        error,
                    });
                }
            }
        }
        IdCursors {
            backends: PerFamily {
                ipv4: allocators.backends.ipv4.cursor(),
                ipv6: allocators.backends.ipv6.cursor(),
            },
            rev_nat: allocators.rev_nat.cursor(),
        }
    }

    /// Every id one Service needs, or none: on failure the ids it got are
    /// given back.
    fn allocate_service(
        &mut self,
        current: &MapContents,
        entries: &[&ServiceEntry],
        allocators: &mut Allocators<'_>,
    ) -> Result<(), PlanError> {
        let mut fresh_backends: Vec<L4Addr> = Vec::new();
        let mut fresh_revs: Vec<(IpAddr, u16)> = Vec::new();
        let mark = self.entry_ids.mark();
        let result = self.allocate_entries(
            current,
            entries,
            allocators,
            &mut fresh_backends,
            &mut fresh_revs,
        );
        if result.is_err() {
            self.entry_ids
                .truncate(mark, entries.iter().map(|e| e.frontend));
            for b in fresh_backends {
                let id = self.ids.backends.remove(&b).expect("just handed out");
                allocators.backends[b.family()].release(id);
            }
            for r in fresh_revs {
                let id = self.ids.rev_nat.remove(&r).expect("just handed out");
                allocators.rev_nat.release(id);
            }
        }
        result
    }

    fn allocate_entries(
        &mut self,
        current: &MapContents,
        entries: &[&ServiceEntry],
        allocators: &mut Allocators<'_>,
        fresh_backends: &mut Vec<L4Addr>,
        fresh_revs: &mut Vec<(IpAddr, u16)>,
    ) -> Result<(), PlanError> {
        for entry in entries {
            self.entry_ids.begin(entry.frontend);
            for b in entry.all_backends() {
                if let Some(id) = self.ids.backend(current, b) {
                    self.entry_ids.push(id);
                    continue;
                }
                let id = allocators.backends[b.family()].allocate().ok_or(
                    PlanError::BackendIdsExhausted {
                        limit: allocators.limits.backend_ids,
                    },
                )?;
                self.ids.backends.insert(*b, id);
                self.entry_ids.push(id);
                fresh_backends.push(*b);
            }
            let f = entry.frontend;
            if self.ids.rev_nat(current, f.addr, f.port).is_some() {
                continue;
            }
            let id = allocators
                .rev_nat
                .allocate()
                .ok_or(PlanError::RevNatIdsExhausted {
                    limit: allocators.limits.rev_nat_ids,
                })?;
            self.ids.rev_nat.insert((f.addr, f.port), id);
            fresh_revs.push((f.addr, f.port));
        }
        Ok(())
    }

    /// Backends first: a slot must never point at a missing backend.
    fn put_entry_backends(&mut self, current: &MapContents, entry: &ServiceEntry) {
        let set = self.entry_ids.of_set(entry, false);
        for (n, b) in entry.all_backends().enumerate() {
            let id = self.backend_id(current, set, n, b);
            if !self.wanted_backends.insert(id) {
                continue;
            }
            let value = backend_value(b);
            if current.backends[id.family].get(&id.id) != Some(&value) {
                self.push(MapOp::PutBackend(id, value), None);
            }
        }
    }

    /// The id of backend `b`, number `n` of a set whose ids start at `set`
    /// (None: an entry this plan did not hand ids to, looked up instead).
    fn backend_id(
        &self,
        current: &MapContents,
        set: Option<SetIds>,
        n: usize,
        b: &L4Addr,
    ) -> BackendId {
        match set {
            Some(set) => self.entry_ids.get(set, n, b),
            None => self.ids.planned_backend(current, b),
        }
    }

    /// The backends the slots of unplanned frontends point at stay.
    fn keep_failed_frontends_backends(&mut self, current: &MapContents) {
        for f in &self.failed {
            for (k, v) in slots_of(&current.services, f) {
                if k.backend_slot != 0 {
                    self.wanted_backends.insert(k.backend(v));
                }
            }
        }
    }

    /// Reverse NAT before a Service becomes visible, so its first reply
    /// already finds it.
    fn put_entry_rev_nat(&mut self, current: &MapContents, entry: &ServiceEntry) {
        let f = entry.frontend;
        let id = self.ids.planned_rev_nat(current, &f);
        if !self.wanted_rev.insert(id) {
            return;
        }
        let value = rev_nat_value(&f);
        if current.rev_nat.get(&id) != Some(&value) {
            self.push(MapOp::PutRevNat(id, value), Some(f));
        }
    }

    /// Which backends belong to the frontend (flows and session affinity
    /// check it) and source ranges, before a master turns them on. TCP and
    /// UDP of one port share a reverse NAT id, so these are planned per
    /// address and port.
    fn put_memberships(&mut self, current: &MapContents, chunk: usize) -> bool {
        while let Some(&(addr, port)) = self.groups.get(self.cursor) {
            self.cursor += 1;
            if let Some(rev) = self.ids.rev_nat(current, addr, port) {
                self.put_group_memberships(current, addr, port, rev);
            }
            if self.ops.len() >= chunk {
                return false;
            }
        }
        self.groups = Vec::new();
        true
    }

    /// The addresses and ports whose memberships this plan looks at.
    fn membership_groups(&self, current: &MapContents) -> Vec<(IpAddr, u16)> {
        let mut groups: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        match self.touched {
            None => {
                groups.extend(self.desired.entries().keys().map(|f| (f.addr, f.port)));
                groups.extend(current.rev_nat.values().map(rev_key));
            }
            Some(t) => groups.extend(t.iter().map(|f| (f.addr, f.port))),
        }
        groups.into_iter().collect()
    }

    fn put_group_memberships(
        &mut self,
        current: &MapContents,
        addr: IpAddr,
        port: u16,
        rev: RevNatId,
    ) {
        let mut matches: BTreeMap<(RevNatId, BackendId), u8> = BTreeMap::new();
        let mut ranges = BTreeSet::new();
        // An unplanned frontend keeps its entries, so nothing of the
        // address and port it shares is deleted.
        let mut keep_all = false;
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let frontend = L4Addr { addr, port, proto };
            if self.failed.contains(&frontend) {
                keep_all = true;
                continue;
            }
            let Some(e) = self.desired.get(&frontend) else {
                continue;
            };
            let sets = [(&e.backends, false)]
                .into_iter()
                .chain(e.internal.as_ref().map(|s| (s, true)));
            for (set, internal) in sets {
                let ids = self.entry_ids.of_set(e, internal);
                let terminating = ids.map(|i| EntryIds::terminating(i, set));
                for (n, b) in set.terminating.iter().enumerate() {
                    let id = self.backend_id(current, terminating, n, b);
                    matches
                        .entry((rev, id))
                        .or_insert(BACKEND_MATCH_TERMINATING);
                }
                for (n, b) in set.active.iter().enumerate() {
                    let id = self.backend_id(current, ids, n, b);
                    matches.insert((rev, id), BACKEND_MATCH_ACTIVE);
                }
            }
            ranges.extend(e.source_ranges.iter().map(|r| (rev, *r)));
        }
        for (m, state) in &matches {
            if current.backend_match.get(m) != Some(state) {
                self.push(MapOp::PutBackendMatch(m.0, m.1, *state), None);
            }
        }
        for r in &ranges {
            if !current.source_ranges.contains(r) {
                self.push(MapOp::PutSourceRange(r.0, r.1), None);
            }
        }
        if !keep_all {
            let tcp = L4Addr {
                addr,
                port,
                proto: Protocol::Tcp,
            };
            self.delete_memberships_not_in(current, rev, &matches, &ranges, tcp);
        }
    }

    fn delete_memberships_not_in(
        &mut self,
        current: &MapContents,
        rev: RevNatId,
        matches: &BTreeMap<(RevNatId, BackendId), u8>,
        ranges: &BTreeSet<(RevNatId, IpPrefix)>,
        tag: L4Addr,
    ) {
        let (lo, hi) = (
            BackendId {
                family: Family::Ipv4,
                id: 0,
            },
            BackendId {
                family: Family::Ipv6,
                id: u32::MAX,
            },
        );
        for m in current
            .backend_match
            .range((rev, lo)..=(rev, hi))
            .map(|(k, _)| k)
        {
            if !matches.contains_key(m) {
                self.late_deletes.push(PlannedOp {
                    op: MapOp::DeleteBackendMatch(m.0, m.1),
                    frontend: Some(tag),
                });
            }
        }
        for r in current.source_ranges.iter().filter(|(id, _)| *id == rev) {
            if !ranges.contains(r) {
                self.late_deletes.push(PlannedOp {
                    op: MapOp::DeleteSourceRange(r.0, r.1),
                    frontend: None,
                });
            }
        }
    }

    /// Per frontend and scope: slots 1..=n, then the master (count) last,
    /// then the slots past the new count. The internal scope goes first:
    /// the external master's flag sends pod traffic to it.
    fn put_entry_slots(&mut self, current: &MapContents, entry: &ServiceEntry) {
        let scopes: [(u8, Option<&BackendSet>); 2] = [
            (SCOPE_INTERNAL, entry.internal.as_ref()),
            (SCOPE_EXTERNAL, Some(&entry.backends)),
        ];
        for (scope, set) in scopes {
            if let Some(set) = set {
                let ids = self.entry_ids.of_set(entry, scope == SCOPE_INTERNAL);
                self.put_scope_slots(current, entry, scope, (set, ids));
            }
        }
        self.delete_slots_past_count(current, entry);
    }

    fn put_scope_slots(
        &mut self,
        current: &MapContents,
        entry: &ServiceEntry,
        scope: u8,
        (set, ids): (&BackendSet, Option<SetIds>),
    ) {
        let f = entry.frontend;
        for (n, b) in set.all().enumerate() {
            let key = scoped_slot_key(&f, scope, n as u16 + 1);
            let value = Service4Value {
                backend_id: self.backend_id(current, ids, n, b).id,
                ..Default::default()
            };
            if current.services.get(&key) != Some(&value) {
                self.push(MapOp::PutService(key, value), Some(f));
            }
        }
        let master = Service4Value {
            count: set.active.len() as u16,
            terminating_count: set.terminating.len() as u16,
            rev_nat_id: self.ids.planned_rev_nat(current, &f),
            flags: entry.flags,
            affinity_timeout: entry.affinity_timeout,
            ..Default::default()
        };
        let key = scoped_slot_key(&f, scope, 0);
        if current.services.get(&key) != Some(&master) {
            self.push(MapOp::PutService(key, master), Some(f));
        }
    }

    fn delete_slots_past_count(&mut self, current: &MapContents, entry: &ServiceEntry) {
        let f = entry.frontend;
        let stale: Vec<SlotKey> = slots_of(&current.services, &f)
            .map(|(k, _)| *k)
            .filter(|key| {
                let len = match key.scope {
                    SCOPE_EXTERNAL => Some(entry.backends.all().count()),
                    SCOPE_INTERNAL => entry.internal.as_ref().map(|s| s.all().count()),
                    _ => None,
                };
                len.is_none_or(|len| key.backend_slot as usize > len)
            })
            .collect();
        for key in stale {
            self.push(MapOp::DeleteService(key), Some(f));
        }
    }

    /// An incremental plan: the backends the touched frontends' slots point
    /// at before this plan's slots are written (which may have dropped
    /// their last user).
    fn note_previous_backends(&mut self, current: &MapContents) {
        if self.touched.is_none() {
            return;
        }
        for f in self.candidates(current) {
            if self.failed.contains(&f) {
                continue;
            }
            for (k, v) in slots_of(&current.services, &f) {
                if k.backend_slot != 0 {
                    self.previous_backends.insert(k.backend(v));
                }
            }
        }
    }

    /// The frontends this plan looks at for deletion.
    fn candidates(&self, current: &MapContents) -> Vec<L4Addr> {
        match self.touched {
            None => current.frontends().collect(),
            Some(t) => t.iter().copied().collect(),
        }
    }

    /// Frontends that are gone: master first, so lookups miss at once;
    /// then the late membership deletions, then (full plans) malformed
    /// leftovers.
    fn delete_gone_frontends(&mut self, current: &MapContents) {
        for f in self.candidates(current) {
            if self.desired.get(&f).is_some() {
                continue;
            }
            let mut slots: Vec<SlotKey> =
                slots_of(&current.services, &f).map(|(k, _)| *k).collect();
            // Masters (slot 0) first, external before internal.
            slots.sort_by_key(|k| (k.backend_slot, k.scope));
            for key in slots {
                self.push(MapOp::DeleteService(key), Some(f));
            }
        }
        let late = std::mem::take(&mut self.late_deletes);
        self.ops.extend(late);
        if self.touched.is_none() {
            // Malformed leftovers (unknown protocol numbers) go too.
            for key in current.services.keys().filter(|k| frontend_of(k).is_none()) {
                self.push(MapOp::DeleteService(*key), None);
            }
        }
    }

    /// Reverse NAT and backends nobody uses any more.
    fn delete_unused_rev_nat_and_backends(&mut self, current: &MapContents) {
        let (orphan_revs, orphan_backends) = self.orphans(current);
        for id in orphan_revs {
            let Some(r) = current.rev_nat.get(&id) else {
                continue;
            };
            if !self.wanted_rev.contains(&id) && !desired_uses_rev(self.desired, r) {
                self.push(MapOp::DeleteRevNat(id, Family::of(r.addr)), None);
            }
        }
        for id in orphan_backends {
            let Some(b) = current.backends[id.family].get(&id.id) else {
                continue;
            };
            let still_used = self.wanted_backends.contains(&id)
                || backend_addr(b).is_some_and(|a| self.desired.uses_backend(&a));
            if !still_used {
                self.push(MapOp::DeleteBackend(id), None);
            }
        }
    }

    /// Reverse NAT and backend ids that may have lost their last user: the
    /// gone frontends' (and in a full plan every unwanted one), or in an
    /// incremental plan those the touched frontends used before.
    fn orphans(&self, current: &MapContents) -> (BTreeSet<RevNatId>, BTreeSet<BackendId>) {
        let mut revs = BTreeSet::new();
        let mut backends = BTreeSet::new();
        let candidates = self.candidates(current);
        for f in candidates.iter().filter(|f| self.desired.get(f).is_none()) {
            for (k, v) in slots_of(&current.services, f) {
                if k.backend_slot == 0 {
                    revs.insert(v.rev_nat_id);
                } else {
                    backends.insert(k.backend(v));
                }
            }
        }
        match self.touched {
            None => {
                revs.extend(
                    current
                        .rev_nat
                        .keys()
                        .filter(|id| !self.wanted_rev.contains(id)),
                );
                backends.extend(
                    current
                        .backend_ids()
                        .filter(|id| !self.wanted_backends.contains(id)),
                );
            }
            Some(_) => backends.extend(self.previous_backends.iter().copied()),
        }
        (revs, backends)
    }
}

/// Where a plan stopped handing out ids, for the next one to go on from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdCursors {
    backends: PerFamily<u32>,
    rev_nat: u32,
}

impl IdCursors {
    /// The next plan of `current` goes on from here.
    pub(crate) fn record(self, current: &mut MapContents) {
        current.next_backend_id = self.backends;
        current.next_rev_nat_id = self.rev_nat;
    }
}

/// The id allocators of one plan and their limits: backend ids per
/// family, reverse NAT ids over both.
struct Allocators<'a> {
    backends: PerFamily<IdAllocator<'a, u32, BackendEntry>>,
    rev_nat: IdAllocator<'a, RevNatId, RevNatEntry>,
    limits: IdLimits,
}

/// Whether a frontend of `desired` still restores to this address and port
/// (TCP and UDP of one port share a reverse NAT entry).
fn desired_uses_rev(desired: &DesiredState, r: &RevNatEntry) -> bool {
    let (addr, port) = rev_key(r);
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .any(|proto| desired.get(&L4Addr { addr, port, proto }).is_some())
}
