//! Applies planned writes to the maps. A write that fails (a full map, say)
//! fails that Service only: its later writes are skipped so it keeps what it
//! had, and every other Service goes on.

use std::{collections::BTreeSet, os::fd::AsFd};

use aya::{
    maps::{Array, IterableMap, MapData, MapError},
    Pod,
};
use lb_common::{config, RevNatId, Service4Value};

use crate::{
    model::{Family, L4Addr},
    sync::{
        differ::{BackendId, MapContents, MapOp, Plan, PlannedOp, SlotKey},
        family_maps::{FamilyMaps, Ipv4Maps, Ipv6Maps},
        map_batch::{delete_all, update_all, BatchStopped},
    },
};

/// Where writes go: the BPF maps, or a simulation in tests.
pub trait MapWriter {
    fn apply(&mut self, op: &MapOp) -> Result<(), WriteError>;

    /// Applies `ops`, a run of one `BatchKind`, in order; on failure, how
    /// many went in before the one that failed, and why. Readers see what
    /// they would see if the ops were applied one at a time (the default).
    fn apply_batch(&mut self, ops: &[MapOp]) -> Result<(), (usize, WriteError)> {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Entries the map a run of `kind` in `family` goes to holds at most
    /// (None: not known, so no run is known to fit).
    fn capacity(&self, _kind: BatchKind, _family: Family) -> Option<usize> {
        None
    }

    /// As `apply_batch`, for a run its map has room for whole: the writer
    /// may write the halves `split_point` gives at the same time, in any
    /// order between them. Room matters: in a map that fills up, which
    /// Services fit must not depend on which half came first.
    fn apply_batch_with_room(&mut self, ops: &[MapOp]) -> Result<(), RunStopped> {
        self.apply_batch(ops).map_err(RunStopped::from)
    }
}

/// Where a run stopped: the ops before `written` went in, the one at
/// `written` failed with `error`, and the ops of `also` went in too (the
/// second half of a split run, written while the first one failed).
#[derive(Debug)]
pub struct RunStopped {
    pub written: usize,
    pub error: WriteError,
    pub also: std::ops::Range<usize>,
}

impl From<(usize, WriteError)> for RunStopped {
    fn from((written, error): (usize, WriteError)) -> Self {
        Self {
            written,
            error,
            also: 0..0,
        }
    }
}

/// Writes that go to one map with one command, so a run of them (of one
/// family: [`MapOp::family`]) can be one batch syscall. Source ranges (an
/// LPM trie, which has no batch operations) are written one by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// Puts and deletes (zeroing) of the backends array.
    Backends,
    PutRevNat,
    DeleteRevNat,
    PutService,
    DeleteService,
    PutBackendMatch,
    DeleteBackendMatch,
}

impl BatchKind {
    pub fn of(op: &MapOp) -> Option<Self> {
        Some(match op {
            MapOp::PutBackend(..) | MapOp::DeleteBackend(_) => Self::Backends,
            MapOp::PutRevNat(..) => Self::PutRevNat,
            MapOp::DeleteRevNat(..) => Self::DeleteRevNat,
            MapOp::PutService(..) => Self::PutService,
            MapOp::DeleteService(_) => Self::DeleteService,
            MapOp::PutBackendMatch(..) => Self::PutBackendMatch,
            MapOp::DeleteBackendMatch(..) => Self::DeleteBackendMatch,
            MapOp::PutSourceRange(..) | MapOp::DeleteSourceRange(..) => return None,
        })
    }
}

/// Why a map write did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The map has no room for another entry.
    #[error("map is full ({0})")]
    Full(String),
    /// The kernel refused the write for another reason.
    #[error("{0}")]
    Refused(String),
    /// Not attempted: a backend or reverse NAT write it needs failed.
    #[error("a backend or reverse NAT write it needs failed")]
    DependencyFailed,
}

/// A write that failed, and the frontend it belonged to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedWrite {
    pub frontend: Option<L4Addr>,
    pub op: MapOp,
    pub error: WriteError,
}

impl std::fmt::Display for FailedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error {
            WriteError::DependencyFailed => write!(f, "{}", self.error),
            _ => write!(f, "{:?}: {}", self.op, self.error),
        }
    }
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub applied: usize,
    /// Writes that failed or were held back, with their frontends.
    pub failed: Vec<FailedWrite>,
    /// Frontends left as they were because a write of theirs, or one they
    /// depend on, failed.
    pub failed_frontends: BTreeSet<L4Addr>,
}

/// Applies `plan` in order, keeping `current` equal to what was written,
/// and takes its id cursors. Until a write fails, runs of one `BatchKind`
/// go as one batch; after that, one by one, since what later writes may do
/// then depends on which failed.
pub fn apply_plan(
    writer: &mut dyn MapWriter,
    plan: &Plan,
    current: &mut MapContents,
) -> ApplyReport {
    plan.cursors.record(current);
    let mut run = PlanRun::default();
    run.apply(writer, &plan.ops, current);
    run.report
}

/// Writes per batch at most: a full sync's runs (110,000 slots at 10,000
/// Services x 10 endpoints) would otherwise be copied whole into the
/// writer's key and value buffers. Two syscalls' worth (`map_batch`'s
/// chunks are 4,096).
const MAX_BATCH: usize = 8192;

/// Writes a plan that arrives in parts (a phase at a time), as
/// `apply_plan` writes a whole one: a write that failed holds back what
/// depends on it in the later parts too.
#[derive(Default)]
pub struct PlanRun {
    report: ApplyReport,
    held: HeldBack,
    /// The ops of the batch being written, kept from batch to batch.
    batch: Vec<MapOp>,
}

impl PlanRun {
    /// Applies the next part of the plan.
    pub fn apply(
        &mut self,
        writer: &mut dyn MapWriter,
        plan: &[PlannedOp],
        current: &mut MapContents,
    ) {
        let mut i = 0;
        while i < plan.len() {
            let batch = if self.report.failed.is_empty() {
                self.batchable(&plan[i..], current)
            } else {
                0
            };
            if batch > 1 {
                i += self.apply_batch(writer, &plan[i..i + batch], current);
            } else {
                self.apply_one(writer, &plan[i], current);
                i += 1;
            }
        }
    }

    /// What was written and what failed, over every part.
    pub fn finish(self) -> ApplyReport {
        self.report
    }

    /// How many steps from the first form a run of one batch kind, none
    /// held back.
    fn batchable(&self, steps: &[PlannedOp], current: &MapContents) -> usize {
        let Some(kind) = steps.first().and_then(|s| BatchKind::of(&s.op)) else {
            return 0;
        };
        let family = steps[0].op.family();
        steps
            .iter()
            .take(MAX_BATCH)
            .take_while(|s| {
                BatchKind::of(&s.op) == Some(kind)
                    && s.op.family() == family
                    && !self.held.blocks(s, current)
            })
            .count()
    }

    /// Applies a run as one batch; returns how many steps it used up (all,
    /// or those before the one that failed and that one).
    fn apply_batch(
        &mut self,
        writer: &mut dyn MapWriter,
        steps: &[PlannedOp],
        current: &mut MapContents,
    ) -> usize {
        self.batch.clear();
        self.batch.extend(steps.iter().map(|s| s.op));
        let result = if has_room(&*writer, &self.batch, current) {
            writer.apply_batch_with_room(&self.batch)
        } else {
            writer.apply_batch(&self.batch).map_err(RunStopped::from)
        };
        let (written, failed, also) = match result {
            Ok(()) => (self.batch.len(), None, 0..0),
            Err(s) => (s.written, Some(s.error), s.also),
        };
        // What went in past the failure is in the maps, so in the mirror
        // too; the one-by-one retry of the rest puts it again.
        for op in self.batch[..written].iter().chain(&self.batch[also]) {
            record(current, op);
        }
        self.report.applied += written;
        match failed {
            None => written,
            Some(error) => {
                self.fail(&steps[written], error);
                written + 1
            }
        }
    }

    fn apply_one(
        &mut self,
        writer: &mut dyn MapWriter,
        step: &PlannedOp,
        current: &mut MapContents,
    ) {
        let report = &mut self.report;
        if step
            .frontend
            .is_some_and(|f| report.failed_frontends.contains(&f))
        {
            return;
        }
        let op = &step.op;
        if self.held.blocks(step, current) {
            if let (Some(f), MapOp::PutService(..)) = (step.frontend, op) {
                report.failed_frontends.insert(f);
                report.failed.push(FailedWrite {
                    frontend: Some(f),
                    op: *op,
                    error: WriteError::DependencyFailed,
                });
            }
            return;
        }
        match writer.apply(op) {
            Ok(()) => {
                report.applied += 1;
                record(current, op);
            }
            Err(error) => self.fail(step, error),
        }
    }

    /// Notes a write that failed: what it holds back, its frontend.
    fn fail(&mut self, step: &PlannedOp, error: WriteError) {
        self.held.note_failed(&step.op);
        if let Some(f) = step.frontend {
            self.report.failed_frontends.insert(f);
        }
        self.report.failed.push(FailedWrite {
            frontend: step.frontend,
            op: step.op,
            error,
        });
    }
}

/// Whether the map of a run of puts has room for all of it, counting every
/// put as a new key and every entry of the kind the mirror holds (of both
/// families) as taken. Backend ids are handed out within the array.
fn has_room(writer: &dyn MapWriter, ops: &[MapOp], current: &MapContents) -> bool {
    let Some((kind, family)) = ops
        .first()
        .and_then(|op| Some((BatchKind::of(op)?, op.family())))
    else {
        return false;
    };
    let taken = match kind {
        BatchKind::PutService => current.services.len(),
        BatchKind::PutBackendMatch => current.backend_match.len(),
        BatchKind::PutRevNat => current.rev_nat.len(),
        BatchKind::Backends => 0,
        _ => return false,
    };
    writer
        .capacity(kind, family)
        .is_some_and(|c| taken + ops.len() <= c)
}

/// What earlier failed writes hold back.
#[derive(Default)]
struct HeldBack {
    backends: BTreeSet<BackendId>,
    /// Reverse NAT ids whose entry, backend set or source ranges could not
    /// be written: a master must not turn them on.
    revs: BTreeSet<RevNatId>,
}

impl HeldBack {
    fn note_failed(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend(id, _) => {
                self.backends.insert(id);
            }
            MapOp::PutRevNat(id, _)
            | MapOp::PutBackendMatch(id, ..)
            | MapOp::PutSourceRange(id, _) => {
                self.revs.insert(id);
            }
            _ => {}
        }
    }

    /// Whether `step` must wait for a write that failed.
    fn blocks(&self, step: &PlannedOp, current: &MapContents) -> bool {
        match &step.op {
            MapOp::PutService(k, v) if k.backend_slot == 0 => self.revs.contains(&v.rev_nat_id),
            // A slot of a frontend whose backend set could not be written
            // stays as it was, like its master.
            MapOp::PutService(k, v) => {
                self.backends.contains(&k.backend(v))
                    || step.frontend.is_some_and(|f| {
                        current
                            .rev_nat_id(f.addr, f.port)
                            .is_some_and(|id| self.revs.contains(&id))
                    })
            }
            // Still referenced by a slot whose update failed: keep it.
            MapOp::DeleteBackend(id) => current.backend_in_use(*id),
            MapOp::DeleteRevNat(id, _) => current.rev_nat_in_use(*id),
            _ => false,
        }
    }
}

/// Mirrors a successful write in `maps`.
pub fn record(maps: &mut MapContents, op: &MapOp) {
    match *op {
        MapOp::PutBackend(id, v) => maps.insert_backend(id, v),
        MapOp::PutRevNat(id, v) => maps.insert_rev_nat(id, v),
        MapOp::PutService(k, v) => maps.insert_service(k, v),
        MapOp::DeleteService(k) => maps.remove_service(&k),
        MapOp::DeleteRevNat(id, _) => maps.remove_rev_nat(id),
        MapOp::DeleteBackend(id) => maps.remove_backend(id),
        MapOp::PutBackendMatch(rev, b, state) => {
            maps.backend_match.insert((rev, b), state);
        }
        MapOp::DeleteBackendMatch(rev, b) => {
            maps.backend_match.remove(&(rev, b));
        }
        MapOp::PutSourceRange(rev, r) => {
            maps.source_ranges.insert((rev, r));
        }
        MapOp::DeleteSourceRange(rev, r) => {
            maps.source_ranges.remove(&(rev, r));
        }
    }
}

/// The agent's maps in the kernel: each family's, and the configuration.
pub struct BpfMaps {
    pub ipv4: FamilyMaps<Ipv4Maps>,
    pub ipv6: FamilyMaps<Ipv6Maps>,
    pub config: Array<MapData, u32>,
    /// `lb_maglev` (None: pins of an agent from before Maglev).
    pub maglev: Option<crate::sync::maglev_tables::OuterMaglev>,
}

impl BpfMaps {
    /// Reads everything the maps of both families hold (to adopt maps a
    /// previous agent pinned).
    pub fn read_contents(&self) -> Result<MapContents, MapError> {
        let mut c = MapContents::default();
        self.ipv4.read_into(&mut c)?;
        self.ipv6.read_into(&mut c)?;
        Ok(c)
    }

    /// The slot `key` names, from its family's services map (None: absent
    /// or unreadable).
    pub fn service(&self, key: &SlotKey) -> Option<Service4Value> {
        match key.family() {
            Family::Ipv4 => self.ipv4.service(key),
            Family::Ipv6 => self.ipv6.service(key),
        }
    }
}

/// Every entry of `map`, read in batches.
pub(crate) fn batch<M: IterableMap<K, V>, K: Pod, V: Pod>(
    map: &M,
) -> Result<Vec<(K, V)>, MapError> {
    crate::sync::map_batch::lookup_all(map.map().fd().as_fd()).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })
    })
}

pub(crate) fn ignore_missing(r: Result<(), MapError>) -> Result<(), WriteError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(write_error(e)),
    }
}

/// E2BIG from an update means the map is full.
pub(crate) fn write_error(e: MapError) -> WriteError {
    match e {
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
            WriteError::Full(s.io_error.to_string())
        }
        e => WriteError::Refused(e.to_string()),
    }
}

impl BpfMaps {
    /// Turns the data path's fall back to the old conntrack map on or off
    /// (see `loader::PinnedState`).
    pub fn set_conntrack_migrating(&mut self, on: bool) -> Result<(), MapError> {
        self.config.set(config::CT_MIGRATING, u32::from(on), 0)
    }
}

impl MapWriter for BpfMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), WriteError> {
        match op.family() {
            Family::Ipv4 => self.ipv4.apply(op),
            Family::Ipv6 => self.ipv6.apply(op),
        }
    }

    fn apply_batch(&mut self, ops: &[MapOp]) -> Result<(), (usize, WriteError)> {
        self.write_ops(ops, false).map_err(|s| (s.written, s.error))
    }

    fn capacity(&self, kind: BatchKind, family: Family) -> Option<usize> {
        Some(match family {
            Family::Ipv4 => self.ipv4.capacity(kind),
            Family::Ipv6 => self.ipv6.capacity(kind),
        })
    }

    fn apply_batch_with_room(&mut self, ops: &[MapOp]) -> Result<(), RunStopped> {
        self.write_ops(ops, true)
    }
}

impl BpfMaps {
    /// Writes a run as batches (`split`: long runs of puts from two
    /// threads); an absent key of a delete is passed over.
    fn write_ops(&self, ops: &[MapOp], split: bool) -> Result<(), RunStopped> {
        let mut done = 0;
        while done < ops.len() {
            let rest = &ops[done..];
            let Err((stopped, also)) = self.write_batch(rest, split) else {
                return Ok(());
            };
            let deleting = matches!(
                BatchKind::of(&rest[0]),
                Some(
                    BatchKind::DeleteRevNat
                        | BatchKind::DeleteService
                        | BatchKind::DeleteBackendMatch
                )
            );
            // An absent key stops a delete batch; it is no failure, as
            // for a delete one by one: go on after it.
            if deleting && stopped.error.raw_os_error() == Some(libc::ENOENT) {
                done += stopped.written + 1;
                continue;
            }
            return Err(RunStopped {
                written: done + stopped.written,
                error: io_write_error(&stopped.error),
                also: done + also.start..done + also.end,
            });
        }
        Ok(())
    }

    /// Batch syscalls for `ops`, all of one `BatchKind` and one family;
    /// with `split`, a long run of puts as two halves written at once
    /// (`split_point`): the kernel's own work is a third of a large sync,
    /// and a node has more than one CPU. On failure (the room was there:
    /// say ENOMEM), where the first failure in plan order stopped, and
    /// which ops of the second half went in anyway (empty unless the
    /// first half failed).
    fn write_batch(
        &self,
        ops: &[MapOp],
        split: bool,
    ) -> Result<(), (BatchStopped, std::ops::Range<usize>)> {
        let Some(mid) = split_point(ops, PARALLEL_WRITES_MIN).filter(|_| split) else {
            return self.write_run(ops).map_err(|s| (s, 0..0));
        };
        let (first, second) = ops.split_at(mid);
        let (first, second) = std::thread::scope(|s| {
            let second = s.spawn(|| self.write_run(second));
            (self.write_run(first), second.join())
        });
        // A panic of the writing thread is the agent's own bug: go on
        // panicking, as one thread would have.
        let second = second.unwrap_or_else(|p| std::panic::resume_unwind(p));
        match (first, second) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(s)) => Err((
                BatchStopped {
                    written: mid + s.written,
                    error: s.error,
                },
                0..0,
            )),
            (Err(f), second) => {
                let went_in = second.map_or_else(|s| s.written, |()| ops.len() - mid);
                Err((f, mid..mid + went_in))
            }
        }
    }

    fn write_run(&self, ops: &[MapOp]) -> Result<(), BatchStopped> {
        match ops.first().map(MapOp::family) {
            None => Ok(()),
            Some(Family::Ipv4) => self.ipv4.write_batch(ops),
            Some(Family::Ipv6) => self.ipv6.write_batch(ops),
        }
    }
}

/// Puts per run below which a run is written from one thread: a thread
/// costs tens of microseconds, 4,096 puts a few milliseconds.
const PARALLEL_WRITES_MIN: usize = 4096;

/// Where a run of `ops` (one `BatchKind`, one family) splits into two
/// halves that may be written at the same time, in any order between
/// them: None for a run shorter than `min_len` or one that must stay in
/// order. Within one phase, puts of backends, reverse NAT entries and
/// memberships depend on none of each other; service slots split between
/// two frontends, so each frontend's slots still go before its master.
/// Deletes stay whole (an absent key stops a batch).
pub(crate) fn split_point(ops: &[MapOp], min_len: usize) -> Option<usize> {
    if ops.len() < min_len.max(2) {
        return None;
    }
    let mid = ops.len() / 2;
    let frontend = |op: &MapOp| match op {
        MapOp::PutService(k, _) => Some((k.addr, k.port, k.proto)),
        _ => None,
    };
    match BatchKind::of(&ops[0])? {
        BatchKind::PutService => {
            let before = frontend(&ops[mid - 1])?;
            (mid..ops.len()).find(|&i| frontend(&ops[i]) != Some(before))
        }
        BatchKind::PutRevNat | BatchKind::PutBackendMatch => Some(mid),
        BatchKind::Backends if ops.iter().all(|op| matches!(op, MapOp::PutBackend(..))) => {
            Some(mid)
        }
        _ => None,
    }
}

/// Writes the entry `entry` gives for each op of a run, as batches. Every
/// op of a run has one (they are of one `BatchKind`), so the kernel's
/// count of entries written is a count of ops.
pub(crate) fn put_run<K: Pod, V: Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    ops: &[MapOp],
    entry: impl Fn(&MapOp) -> Option<(K, V)>,
) -> Result<(), BatchStopped> {
    let (keys, values): (Vec<K>, Vec<V>) = ops.iter().filter_map(entry).unzip();
    debug_assert_eq!(keys.len(), ops.len(), "a run of one kind");
    update_all(map, &keys, &values)
}

/// Deletes the key `key` gives for each op of a run, as batches.
pub(crate) fn delete_run<K: Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    ops: &[MapOp],
    key: impl Fn(&MapOp) -> Option<K>,
) -> Result<(), BatchStopped> {
    let keys: Vec<K> = ops.iter().filter_map(key).collect();
    debug_assert_eq!(keys.len(), ops.len(), "a run of one kind");
    delete_all(map, &keys)
}

/// The file descriptor of one of the agent's maps.
pub(crate) fn fd<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M) -> std::os::fd::BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// E2BIG from an update means the map is full.
fn io_write_error(e: &std::io::Error) -> WriteError {
    if e.raw_os_error() == Some(libc::E2BIG) {
        WriteError::Full(e.to_string())
    } else {
        WriteError::Refused(e.to_string())
    }
}

/// An in-memory stand-in for the maps, for tests of the write order.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::sync::differ::reader_violation;

    /// How many entries each fake map takes (None: no limit).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Capacity {
        pub service_slots: Option<usize>,
        pub rev_nat: Option<usize>,
        pub backend_match: Option<usize>,
        pub source_ranges: Option<usize>,
    }

    /// Applies writes to an in-memory copy and checks, after every single
    /// write, that a packet could not see a half-written Service.
    #[derive(Default)]
    pub(crate) struct CheckingWriter {
        pub maps: MapContents,
        pub writes: Vec<MapOp>,
        /// Fail puts of slots of this frontend port (a "full map").
        pub full_for_port: Option<u16>,
        pub capacity: Capacity,
        /// Refuse every put of a slot once this many went in (the kernel
        /// out of memory, say), however much room the map has.
        pub slot_puts_before_refusal: Option<usize>,
        /// Puts of slots that went in.
        pub slot_puts: usize,
    }

    fn full(limit: Option<usize>, len: usize, exists: bool) -> bool {
        !exists && limit.is_some_and(|l| len >= l)
    }

    impl MapWriter for CheckingWriter {
        fn apply(&mut self, op: &MapOp) -> Result<(), WriteError> {
            if let (Some(port), MapOp::PutService(k, _)) = (self.full_for_port, op) {
                if k.port == port {
                    return Err(WriteError::Full("injected".into()));
                }
            }
            if matches!(op, MapOp::PutService(..)) {
                if self
                    .slot_puts_before_refusal
                    .is_some_and(|n| self.slot_puts >= n)
                {
                    return Err(WriteError::Refused("injected: out of memory".into()));
                }
                self.slot_puts += 1;
            }
            let m = &self.maps;
            let c = &self.capacity;
            let at_limit = match op {
                MapOp::PutService(k, _) => full(
                    c.service_slots,
                    m.services.len(),
                    m.services.contains_key(k),
                ),
                MapOp::PutRevNat(id, _) => {
                    full(c.rev_nat, m.rev_nat.len(), m.rev_nat.contains_key(id))
                }
                MapOp::PutBackendMatch(rev, b, _) => full(
                    c.backend_match,
                    m.backend_match.len(),
                    m.backend_match.contains_key(&(*rev, *b)),
                ),
                MapOp::PutSourceRange(rev, r) => full(
                    c.source_ranges,
                    m.source_ranges.len(),
                    m.source_ranges.contains(&(*rev, *r)),
                ),
                _ => false,
            };
            if at_limit {
                return Err(WriteError::Full("fake capacity".into()));
            }
            record(&mut self.maps, op);
            self.writes.push(*op);
            if let Some(v) = reader_violation(&self.maps) {
                panic!("after {op:?} a reader sees: {v}");
            }
            Ok(())
        }

        fn capacity(&self, kind: BatchKind, _family: Family) -> Option<usize> {
            let c = &self.capacity;
            let limit = match kind {
                BatchKind::PutService | BatchKind::DeleteService => c.service_slots,
                BatchKind::PutRevNat | BatchKind::DeleteRevNat => c.rev_nat,
                BatchKind::PutBackendMatch | BatchKind::DeleteBackendMatch => c.backend_match,
                BatchKind::Backends => None,
            };
            Some(limit.unwrap_or(usize::MAX))
        }

        /// As `BpfMaps` splits a run (`split_point`, here from two ops
        /// on), with the second half written first: the order between the
        /// halves that readers may see. The count on failure is the real
        /// writer's.
        fn apply_batch_with_room(&mut self, ops: &[MapOp]) -> Result<(), RunStopped> {
            let Some(mid) = split_point(ops, 2) else {
                return self.apply_batch(ops).map_err(RunStopped::from);
            };
            let (first, second) = ops.split_at(mid);
            let second = self.apply_batch(second);
            if let Err((written, error)) = self.apply_batch(first) {
                let went_in = second.map_or_else(|(i, _)| i, |()| ops.len() - mid);
                return Err(RunStopped {
                    written,
                    error,
                    also: mid..mid + went_in,
                });
            }
            second.map_err(|(i, e)| RunStopped::from((mid + i, e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::CheckingWriter, *};
    use crate::{
        model::{BackendSet, DesiredState, Protocol, ServiceEntry, ServiceName},
        sync::differ::plan,
    };
    use lb_common::SVC_FLAG_CLUSTER_IP;

    fn l4(ip: &str, port: u16) -> L4Addr {
        L4Addr {
            addr: ip.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn state(services: &[(u16, &[&str])]) -> DesiredState {
        let mut s = DesiredState::default();
        for (port, backends) in services {
            let frontend = l4("10.96.0.10", *port);
            let mut backends: Vec<L4Addr> = backends.iter().map(|b| l4(b, 8080)).collect();
            backends.sort();
            s.insert(ServiceEntry {
                service: ServiceName {
                    namespace: "default".into(),
                    name: format!("svc{port}").into(),
                },
                port_name: String::new(),
                frontend,
                backends: BackendSet {
                    active: backends,
                    terminating: Vec::new(),
                },
                internal: None,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                source_ranges: Vec::new(),
                maglev_weights: None,
            });
        }
        s
    }

    fn converge(
        w: &mut CheckingWriter,
        current: &mut MapContents,
        desired: &DesiredState,
    ) -> ApplyReport {
        let p = plan(current, desired);
        assert!(p.unplanned.is_empty(), "{:?}", p.unplanned);
        let report = apply_plan(w, &p, current);
        assert_eq!(*current, w.maps, "the mirror must equal what was written");
        report
    }

    /// A split run whose first half fails after its second half went in:
    /// the second half is in the maps, so it is in the mirror, even when
    /// putting it again fails too.
    #[test]
    fn what_a_split_run_wrote_past_its_failure_is_recorded() {
        let backends: &[&str] = &["10.244.0.2", "10.244.0.3"];
        let desired = state(&[
            (80, backends),
            (81, backends),
            (82, backends),
            (83, backends),
        ]);
        // The slots and masters of 82 and 83 (the second half, written
        // first) go in; every later put of a slot is refused.
        let mut w = CheckingWriter {
            slot_puts_before_refusal: Some(6),
            ..Default::default()
        };
        let mut current = MapContents::default();
        let report = converge(&mut w, &mut current, &desired);
        assert!(!report.failed.is_empty());
        for port in [82, 83] {
            let master = crate::sync::differ::master_key(&l4("10.96.0.10", port));
            assert!(current.services.contains_key(&master), "{port}");
        }
    }

    /// Conntrack entries of a deleted backend name its id until they are
    /// swept: the id must not name a new backend meanwhile.
    #[test]
    fn a_freed_backend_id_is_not_handed_out_again_at_once() {
        let mut w = CheckingWriter::default();
        let mut current = MapContents::default();
        converge(
            &mut w,
            &mut current,
            &state(&[(80, &["10.244.0.2", "10.244.0.3"])]),
        );
        let freed = current.backend_id(&l4("10.244.0.3", 8080)).unwrap();
        converge(&mut w, &mut current, &state(&[(80, &["10.244.0.2"])]));
        assert!(!current.backends.ipv4.contains_key(&freed));
        converge(
            &mut w,
            &mut current,
            &state(&[(80, &["10.244.0.2", "10.244.0.9"])]),
        );
        let new = current.backend_id(&l4("10.244.0.9", 8080)).unwrap();
        assert!(new > freed, "freed id {freed} handed out again as {new}");
    }

    #[test]
    fn every_intermediate_state_is_safe_and_the_end_state_matches() {
        let steps: Vec<DesiredState> = vec![
            state(&[(80, &["10.244.0.2", "10.244.0.3", "10.244.0.4"])]),
            state(&[(80, &["10.244.0.2", "10.244.0.4"]), (81, &[])]),
            state(&[(80, &["10.244.0.9"]), (81, &["10.244.0.2", "10.244.0.3"])]),
            state(&[(81, &["10.244.0.3"])]),
            state(&[]),
        ];
        let mut w = CheckingWriter::default();
        let mut current = MapContents::default();
        for desired in &steps {
            let report = converge(&mut w, &mut current, desired);
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            // Converged: planning again writes nothing.
            assert!(
                plan(&current, desired).ops.is_empty(),
                "not converged for {desired:?}"
            );
            let masters = current
                .services
                .keys()
                .filter(|k| k.backend_slot == 0)
                .count();
            assert_eq!(masters, desired.len());
        }
        assert_eq!(
            current,
            MapContents::default(),
            "deleting everything leaves empty maps"
        );
    }

    #[test]
    fn new_service_writes_master_after_its_slots_and_backends() {
        let mut w = CheckingWriter::default();
        let mut current = MapContents::default();
        converge(
            &mut w,
            &mut current,
            &state(&[(80, &["10.244.0.2", "10.244.0.3"])]),
        );
        let kinds: Vec<&str> = w
            .writes
            .iter()
            .map(|op| match op {
                MapOp::PutBackend(..) => "backend",
                MapOp::PutRevNat(..) => "revnat",
                MapOp::PutService(k, _) if k.backend_slot == 0 => "master",
                MapOp::PutService(..) => "slot",
                MapOp::PutBackendMatch(..) => "match",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            ["backend", "backend", "revnat", "match", "match", "slot", "slot", "master"]
        );
    }

    /// One Service port on an IPv4 and an IPv6 address, a backend each.
    fn dual_stack(v6_backends: &[&str]) -> DesiredState {
        let mut s = state(&[(80, &["10.244.0.2", "10.244.0.3"])]);
        let mut backends: Vec<L4Addr> = v6_backends.iter().map(|b| l4(b, 8080)).collect();
        backends.sort();
        s.insert(ServiceEntry {
            frontend: l4("fd00::10", 80),
            backends: BackendSet {
                active: backends,
                terminating: Vec::new(),
            },
            ..s.get(&l4("10.96.0.10", 80)).unwrap().clone()
        });
        s
    }

    #[test]
    fn backend_ids_are_per_family_and_reverse_nat_ids_one_space() {
        let mut w = CheckingWriter::default();
        let mut current = MapContents::default();
        let desired = dual_stack(&["fd00:244::2", "fd00:244::3"]);
        converge(&mut w, &mut current, &desired);
        let ids = |family: Family| current.backends[family].keys().copied().collect::<Vec<_>>();
        assert_eq!(ids(Family::Ipv4), [1, 2]);
        assert_eq!(ids(Family::Ipv6), [1, 2]);
        let revs: Vec<(RevNatId, bool)> = current
            .rev_nat
            .iter()
            .map(|(id, r)| (*id, r.addr.is_ipv6()))
            .collect();
        assert_eq!(revs, [(1, false), (2, true)]);
        // Each family's writes keep the order: backends, reverse NAT,
        // memberships, slots, master last.
        let v6_kinds: Vec<&str> = w
            .writes
            .iter()
            .filter(|op| op.family() == Family::Ipv6)
            .map(|op| match op {
                MapOp::PutBackend(..) => "backend",
                MapOp::PutRevNat(..) => "revnat",
                MapOp::PutService(k, _) if k.backend_slot == 0 => "master",
                MapOp::PutService(..) => "slot",
                MapOp::PutBackendMatch(..) => "match",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            v6_kinds,
            ["backend", "backend", "revnat", "match", "match", "slot", "slot", "master"]
        );
        // Removing the IPv6 side frees its ids, and leaves IPv4 alone.
        w.writes.clear();
        converge(
            &mut w,
            &mut current,
            &state(&[(80, &["10.244.0.2", "10.244.0.3"])]),
        );
        assert!(w.writes.iter().all(|op| op.family() == Family::Ipv6));
        assert!(current.backends.ipv6.is_empty());
        assert_eq!(current.rev_nat.len(), 1);
        assert!(plan(&w.maps.clone(), &dual_stack(&[])).unplanned.is_empty());
    }

    #[test]
    fn removing_a_backend_rewrites_only_what_changed() {
        let mut w = CheckingWriter::default();
        let mut current = MapContents::default();
        converge(
            &mut w,
            &mut current,
            &state(&[
                (80, &["10.244.0.2", "10.244.0.3", "10.244.0.4"]),
                (81, &["10.244.0.7"]),
            ]),
        );
        w.writes.clear();
        converge(
            &mut w,
            &mut current,
            &state(&[(80, &["10.244.0.2", "10.244.0.4"]), (81, &["10.244.0.7"])]),
        );
        // slot 2 now -> .4, master count 3 -> 2, slot 3 deleted, .3 leaves
        // the Service's backend set, backend .3 deleted.
        assert_eq!(w.writes.len(), 5, "{:?}", w.writes);
        assert!(
            matches!(w.writes[1], MapOp::PutService(k, v) if k.backend_slot == 0 && v.count == 2)
        );
        assert!(matches!(w.writes[2], MapOp::DeleteService(k) if k.backend_slot == 3));
        assert!(matches!(w.writes[3], MapOp::DeleteBackendMatch(..)));
        assert!(matches!(w.writes[4], MapOp::DeleteBackend(_)));
    }

    #[test]
    fn ids_are_kept_across_plans_and_after_adoption() {
        let mut w = CheckingWriter::default();
        let mut current = MapContents::default();
        converge(&mut w, &mut current, &state(&[(80, &["10.244.0.2"])]));
        // A restarted agent starts from what the maps hold: nothing to do.
        let adopted = w.maps.clone();
        assert!(plan(&adopted, &state(&[(80, &["10.244.0.2"])]))
            .ops
            .is_empty());
    }

    #[test]
    fn a_full_map_fails_one_service_and_leaves_it_invisible() {
        let mut w = CheckingWriter {
            full_for_port: Some(81),
            ..Default::default()
        };
        let mut current = MapContents::default();
        let report = converge(
            &mut w,
            &mut current,
            &state(&[(80, &["10.244.0.2"]), (81, &["10.244.0.3"])]),
        );
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert_eq!(report.failed[0].frontend, Some(l4("10.96.0.10", 81)));
        assert!(current
            .services
            .contains_key(&crate::sync::differ::master_key(&l4("10.96.0.10", 80))));
        assert!(!current
            .services
            .contains_key(&crate::sync::differ::master_key(&l4("10.96.0.10", 81))));
    }
}
