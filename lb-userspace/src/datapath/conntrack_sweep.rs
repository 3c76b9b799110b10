//! The conntrack sweep: a background thread that reads the conntrack maps
//! of both families (in batches) now and then, and soon after a sync that
//! deleted backends; removes entries whose backend was deleted and entries
//! past their lifetime (the same rules for IPv4 and IPv6, each entry's
//! backend looked up in its own family's array); and counts what the LRU
//! maps evicted on their own when full. The kernel keeps no eviction count,
//! so it is derived, per family: every entry the data path added (each
//! family has its own counters) was removed by the data path, removed by a
//! sweep, is still present, or was evicted.

use std::{
    collections::HashSet,
    os::fd::AsFd,
    path::PathBuf,
    sync::{mpsc, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{
        Array, HashMap as BpfHashMap, IterableMap, MapData, MapInfo, PerCpuArray, PerCpuValues,
    },
    Pod,
};
use aya_obj::generated::BPF_NOEXIST;
use lb_common::{
    ct_hold_ns, map_names, stats, Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value,
    CT_DIR_REPLY, CT_FLAG_DSR,
};

use crate::{
    datapath::{loader, stats_index},
    model::{Family, PerFamily},
    serve::metrics::{FamilyLabel, Metrics, ReasonLabel},
};

/// Why a sweep removes an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepReason {
    /// Its backend id is free: the backend was deleted.
    BackendGone,
    /// No packet for longer than its lifetime.
    Expired,
}

impl SweepReason {
    pub fn label(self) -> &'static str {
        match self {
            SweepReason::BackendGone => "backend_gone",
            SweepReason::Expired => "expired",
        }
    }
}

/// The conntrack and backend types of one family, as the sweep reads them.
pub trait CtFamily {
    type Key: Pod;
    type Value: Pod;
    type Backend: Pod;
    /// Protocol and direction of a key.
    fn flow(key: &Self::Key) -> (u8, u8);
    /// Last packet, flags and backend id of a value.
    fn state(value: &Self::Value) -> (u64, u16, u32);
    /// Whether a backends array entry holds a backend (a free id is zeros).
    fn holds_backend(b: &Self::Backend) -> bool;
}

/// `lb4_conntrack` and `lb4_backends`.
pub struct Ct4;
/// `lb6_conntrack` and `lb6_backends`.
pub struct Ct6;

impl CtFamily for Ct4 {
    type Key = Ct4Key;
    type Value = Ct4Value;
    type Backend = Backend4;
    fn flow(k: &Ct4Key) -> (u8, u8) {
        (k.proto, k.direction)
    }
    fn state(v: &Ct4Value) -> (u64, u16, u32) {
        (v.last_seen_ns, v.flags, v.backend_id)
    }
    fn holds_backend(b: &Backend4) -> bool {
        b.addr != 0
    }
}

impl CtFamily for Ct6 {
    type Key = Ct6Key;
    type Value = Ct6Value;
    type Backend = Backend6;
    fn flow(k: &Ct6Key) -> (u8, u8) {
        (k.proto, k.direction)
    }
    fn state(v: &Ct6Value) -> (u64, u16, u32) {
        (v.last_seen_ns, v.flags, v.backend_id)
    }
    fn holds_backend(b: &Backend6) -> bool {
        b.addr != [0; 4]
    }
}

/// Whether an IPv4 entry goes (see [`verdict_of`]).
pub fn verdict(
    key: &Ct4Key,
    value: &Ct4Value,
    now_ns: u64,
    backend_live: impl FnOnce(u32) -> bool,
) -> Option<SweepReason> {
    verdict_of::<Ct4>(key, value, now_ns, backend_live)
}

/// Whether an entry goes, given the monotonic clock and whether its
/// backend id is in use. An entry goes once idle past its hold: its
/// lifetime, longer for a reply entry that reserves a masquerade port
/// through TIME_WAIT (the data path stops translating with it earlier).
/// Otherwise it goes when its backend id is no longer in use.
pub fn verdict_of<F: CtFamily>(
    key: &F::Key,
    value: &F::Value,
    now_ns: u64,
    backend_live: impl FnOnce(u32) -> bool,
) -> Option<SweepReason> {
    let (proto, direction) = F::flow(key);
    let (last_seen_ns, flags, backend_id) = F::state(value);
    let hold = ct_hold_ns(proto, direction, flags);
    // A reply entry learned from a DSR option names no backend of this
    // node's maps: it only ages out.
    let learned = direction == CT_DIR_REPLY && flags & CT_FLAG_DSR != 0;
    if now_ns.saturating_sub(last_seen_ns) >= hold {
        Some(SweepReason::Expired)
    } else if !learned && !backend_live(backend_id) {
        Some(SweepReason::BackendGone)
    } else {
        None
    }
}

/// Entries the map dropped on its own: added, minus removed by anyone,
/// minus still present (never below zero: a migration adds entries the
/// data path did not insert).
pub fn evicted(inserted: u64, removed: u64, swept: u64, present: u64) -> u64 {
    inserted.saturating_sub(removed + swept + present)
}

/// The data path's conntrack counters, read before a pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCounters {
    pub inserted: u64,
    pub removed: u64,
    pub swept: u64,
}

/// After a pass that saw `seen` entries and removed `removed_now` of them:
/// (entries present, evictions so far). The pass's removals count as swept
/// as they leave `present`, or each would count as an eviction too.
pub fn account(before: CtCounters, seen: u64, removed_now: u64) -> (u64, u64) {
    let present = seen.saturating_sub(removed_now);
    let evicted = evicted(
        before.inserted,
        before.removed,
        before.swept + removed_now,
        present,
    );
    (present, evicted)
}

/// What one sweep saw and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SweepReport {
    /// Entries present after the sweep.
    pub present: u64,
    pub backend_gone: u64,
    pub expired: u64,
    /// Evictions so far (derived).
    pub evicted: u64,
}

/// Now, on the clock conntrack entries are stamped with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given. The data path
    // stamps entries with bpf_ktime_get_coarse_ns, the same clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One family's conntrack map and the backends its entries name.
struct CtTable<F: CtFamily> {
    conntrack: BpfHashMap<MapData, F::Key, F::Value>,
    backends: Array<MapData, F::Backend>,
}

/// What a pass over one family's map saw and removed.
#[derive(Debug, Default)]
struct TablePass {
    seen: u64,
    backend_gone: u64,
    expired: u64,
}

impl<F: CtFamily> CtTable<F> {
    fn open(pin_dir: &std::path::Path, conntrack: &str, backends: &str) -> Result<Self> {
        let open = |name| loader::open_pinned_map(pin_dir, name);
        Ok(Self {
            conntrack: BpfHashMap::try_from(open(conntrack)?)?,
            backends: Array::try_from(open(backends)?)?,
        })
    }

    fn backend_live(&self, id: u32) -> bool {
        id != 0
            && self
                .backends
                .get(&id, 0)
                .is_ok_and(|b| F::holds_backend(&b))
    }

    /// Reads the map and removes the entries that go.
    fn pass(&mut self) -> Result<TablePass> {
        let now = monotonic_ns();
        // Only a backend found live is remembered for the pass; one found
        // gone is looked up again right before its entries are removed.
        let mut live: HashSet<u32> = HashSet::new();
        let entries: Vec<(F::Key, F::Value)> =
            crate::sync::map_batch::lookup_all(self.conntrack.map().fd().as_fd())
                .context("reading the conntrack map")?;
        let mut report = TablePass {
            seen: entries.len() as u64,
            ..Default::default()
        };
        let mut doomed = Vec::new();
        for (key, value) in entries {
            let is_live = |id: u32| live.contains(&id) || self.backend_live(id);
            if verdict_of::<F>(&key, &value, now, is_live).is_some() {
                doomed.push(key);
            } else {
                live.insert(F::state(&value).2);
            }
        }
        for key in &doomed {
            // Judged again at the last moment: the flow may have sent a
            // packet, or a sync may have given its backend id to a new
            // backend whose fresh entries must stay.
            let Ok(value) = self.conntrack.get(key, 0) else {
                continue;
            };
            let live = |id| self.backend_live(id);
            if verdict_of::<F>(key, &value, monotonic_ns(), live).is_none() {
                continue;
            }
            match self.remove_if_doomed(key) {
                Some(SweepReason::BackendGone) => report.backend_gone += 1,
                Some(SweepReason::Expired) => report.expired += 1,
                None => {}
            }
        }
        Ok(report)
    }

    /// Removes `key` and judges what it held at that moment: a new flow
    /// may have taken the key (a client reusing its port) since the last
    /// look, and then gets its entry back at once (unless a newer one is
    /// there already). Removing by key alone would drop the new flow's
    /// entry, and its next packet would meet another backend: a reset.
    fn remove_if_doomed(&mut self, key: &F::Key) -> Option<SweepReason> {
        let fd = self.conntrack.map().fd().as_fd();
        let taken: Option<F::Value> = crate::sync::map_batch::take(fd, key).ok()?;
        let live = |id| self.backend_live(id);
        let (why, put_back) = judge_taken(taken, |v| verdict_of::<F>(key, v, monotonic_ns(), live));
        if let Some(value) = put_back {
            let _ = self.conntrack.insert(key, value, u64::from(BPF_NOEXIST));
        }
        why
    }
}

/// A value the sweep took out of the map: why it is gone, or (a new flow
/// wrote it after the sweep last looked) the value to put back.
fn judge_taken<V>(
    taken: Option<V>,
    verdict: impl Fn(&V) -> Option<SweepReason>,
) -> (Option<SweepReason>, Option<V>) {
    match taken {
        None => (None, None),
        Some(v) => match verdict(&v) {
            Some(why) => (Some(why), None),
            None => (None, Some(v)),
        },
    }
}

/// The maps a sweep works on, opened from their pins.
pub(crate) struct Sweeper {
    ipv4: CtTable<Ct4>,
    ipv6: CtTable<Ct6>,
    stats: PerCpuArray<MapData, u64>,
    /// Of each family's map (both are sized by --conntrack-max; IPv6's
    /// holds one entry when IPv6 is off).
    capacity: PerFamily<u32>,
}

impl Sweeper {
    pub fn open(pin_dir: &std::path::Path) -> Result<Self> {
        let capacity_of =
            |name| MapInfo::from_pin(loader::map_pin_path(pin_dir, name)).map(|i| i.max_entries());
        let capacity = PerFamily {
            ipv4: capacity_of(map_names::CONNTRACK)?,
            ipv6: capacity_of(map_names::CONNTRACK6)?,
        };
        let stats = loader::open_pinned_map(pin_dir, map_names::STATS)?;
        Ok(Self {
            ipv4: CtTable::open(pin_dir, map_names::CONNTRACK, map_names::BACKENDS)?,
            ipv6: CtTable::open(pin_dir, map_names::CONNTRACK6, map_names::BACKENDS6)?,
            stats: PerCpuArray::try_from(stats)?,
            capacity,
        })
    }

    fn counter(&self, family: Family, counter: u32) -> u64 {
        let index = stats_index(family, counter);
        self.stats.get(&index, 0).map_or(0, |v| v.iter().sum())
    }

    /// Adds `n` to the agent's own counter of `family` (CPU 0's slot of
    /// `CT_SWEPT`; the data path never writes it).
    fn add_swept(&mut self, family: Family, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let index = stats_index(family, stats::CT_SWEPT);
        let mut values: Vec<u64> = self.stats.get(&index, 0)?.iter().copied().collect();
        values[0] += n;
        self.stats.set(index, PerCpuValues::try_from(values)?, 0)?;
        Ok(())
    }

    /// New masqueraded flows dropped so far, both families, because every
    /// port toward their backend was taken (in use or in TIME_WAIT).
    pub fn snat_ports_exhausted(&self) -> u64 {
        [Family::Ipv4, Family::Ipv6]
            .into_iter()
            .map(|f| self.counter(f, stats::SNAT_PORTS_EXHAUSTED))
            .sum()
    }

    /// The family's conntrack counters, read before a pass.
    fn counters(&self, family: Family) -> CtCounters {
        CtCounters {
            inserted: self.counter(family, stats::CT_INSERTED),
            removed: self.counter(family, stats::CT_REMOVED),
            swept: self.counter(family, stats::CT_SWEPT),
        }
    }

    /// One pass over both families' maps.
    pub fn sweep(&mut self) -> Result<PerFamily<SweepReport>> {
        // Read first: entries added during the walk may be seen present
        // but are not counted as inserted, so evictions come out low, never
        // high (the metric only grows). This pass's own removals are added
        // to `swept` below, as they are taken out of `present`.
        let before = PerFamily {
            ipv4: self.counters(Family::Ipv4),
            ipv6: self.counters(Family::Ipv6),
        };
        let passes = PerFamily {
            ipv4: self.ipv4.pass()?,
            ipv6: self.ipv6.pass().context("IPv6")?,
        };
        let mut out = PerFamily::<SweepReport>::default();
        for family in [Family::Ipv4, Family::Ipv6] {
            let pass = &passes[family];
            let report = &mut out[family];
            report.backend_gone = pass.backend_gone;
            report.expired = pass.expired;
            let swept_now = pass.backend_gone + pass.expired;
            self.add_swept(family, swept_now)?;
            (report.present, report.evicted) = account(before[family], pass.seen, swept_now);
        }
        Ok(out)
    }
}

/// Sets the metrics of one family's sweep; `evicted_reported`: the
/// evictions the metric already counts.
fn record_sweep(metrics: &Metrics, family: Family, r: &SweepReport, evicted_reported: &mut u64) {
    let label = FamilyLabel::of(family);
    metrics
        .conntrack_entries
        .get_or_create(&label)
        .set(i64::try_from(r.present).unwrap_or(i64::MAX));
    for (why, n) in [
        (SweepReason::BackendGone, r.backend_gone),
        (SweepReason::Expired, r.expired),
    ] {
        metrics
            .conntrack_swept
            .get_or_create(&ReasonLabel {
                family: family.label(),
                reason: why.label().into(),
            })
            .inc_by(n);
    }
    // Created at the first sweep, so a family without evictions shows 0.
    let evictions = metrics.conntrack_evictions.get_or_create(&label);
    if r.evicted > *evicted_reported {
        evictions.inc_by(r.evicted - *evicted_reported);
        *evicted_reported = r.evicted;
    }
    if r.backend_gone + r.expired > 0 {
        log::info!("conntrack sweep ({family}): {r:?}");
    }
}

/// Starts the sweep thread: a pass at once, then one every `interval`, and
/// after a wake-up sent on the returned channel, at most one pass per
/// `interval` or 5 s (a pass over a full map takes a while). It ends when
/// the channel's sender is dropped. The first pass clears what a previous
/// agent left: entries of backends it deleted just before it stopped,
/// whose ids this agent's syncs could otherwise hand out again before the
/// interval's first pass.
pub fn start(
    pin_dir: PathBuf,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> Result<mpsc::SyncSender<()>> {
    let mut sweeper = Sweeper::open(&pin_dir)?;
    for family in [Family::Ipv4, Family::Ipv6] {
        let capacity = sweeper.capacity[family];
        metrics
            .conntrack_capacity
            .get_or_create(&FamilyLabel::of(family))
            .set(i64::from(capacity));
    }
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("conntrack-sweep".into())
        .spawn(move || {
            let mut evicted_reported = PerFamily::<u64>::default();
            let mut exhausted_reported = sweeper.snat_ports_exhausted();
            loop {
                match sweeper.sweep() {
                    Ok(reports) => {
                        for family in [Family::Ipv4, Family::Ipv6] {
                            let reported = &mut evicted_reported[family];
                            record_sweep(&metrics, family, &reports[family], reported);
                        }
                    }
                    Err(e) => log::warn!("conntrack sweep failed: {e:#}"),
                }
                let exhausted = sweeper.snat_ports_exhausted();
                if exhausted > exhausted_reported {
                    log::warn!(
                        "{} new masqueraded flows were dropped: every masquerade port toward their backend was in use or in TIME_WAIT (snat_ports_exhausted); widen --masquerade-ports",
                        exhausted - exhausted_reported
                    );
                    exhausted_reported = exhausted;
                }
                std::thread::sleep(interval.min(Duration::from_secs(5)));
                match rx.recv_timeout(interval) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .context("starting the conntrack sweep thread")?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use lb_common::{
        CT_DIR_FORWARD, CT_FLAG_CLOSING, CT_FLAG_OPENING, CT_FLAG_SNAT, IPPROTO_TCP, IPPROTO_UDP,
    };

    use super::*;

    #[test]
    fn a_reply_entry_learned_from_dsr_only_ages_out() {
        let now = 100_000 * 1_000_000_000;
        let live = |id| id == 7;
        let (mut k, v) = entry(IPPROTO_TCP, 100_000 - 60, CT_FLAG_DSR, 0);
        k.direction = CT_DIR_REPLY;
        assert_eq!(verdict(&k, &v, now, live), None, "no backend id to match");
        let (k, v) = entry(IPPROTO_UDP, 100_000 - 61, CT_FLAG_DSR, 0);
        let k = Ct4Key {
            direction: CT_DIR_REPLY,
            ..k
        };
        assert_eq!(verdict(&k, &v, now, live), Some(SweepReason::Expired));
        // A DSR flow's forward entry, on the entry node, has its backend.
        let (mut k, v) = entry(IPPROTO_TCP, 100_000 - 1, CT_FLAG_DSR, 8);
        k.direction = CT_DIR_FORWARD;
        assert_eq!(verdict(&k, &v, now, live), Some(SweepReason::BackendGone));
    }

    fn entry(proto: u8, last_seen_s: u64, flags: u16, backend_id: u32) -> (Ct4Key, Ct4Value) {
        (
            Ct4Key {
                proto,
                ..Default::default()
            },
            Ct4Value {
                last_seen_ns: last_seen_s * 1_000_000_000,
                backend_id,
                flags,
                ..Default::default()
            },
        )
    }

    #[test]
    fn entries_go_when_expired_or_their_backend_is_deleted() {
        let now = 100_000 * 1_000_000_000;
        let live = |id| id == 7;
        let (k, v) = entry(IPPROTO_UDP, 100_000 - 30, 0, 7);
        assert_eq!(verdict(&k, &v, now, live), None, "UDP seen 30 s ago");
        let (k, v) = entry(IPPROTO_UDP, 100_000 - 61, 0, 7);
        assert_eq!(verdict(&k, &v, now, live), Some(SweepReason::Expired));
        let (k, v) = entry(IPPROTO_TCP, 100_000 - 3600, 0, 7);
        assert_eq!(verdict(&k, &v, now, live), None, "TCP lives 6 h");
        let (k, v) = entry(IPPROTO_TCP, 100_000 - 11, CT_FLAG_CLOSING, 7);
        assert_eq!(verdict(&k, &v, now, live), Some(SweepReason::Expired));
        let (k, v) = entry(IPPROTO_TCP, 100_000 - 1, 0, 8);
        assert_eq!(verdict(&k, &v, now, live), Some(SweepReason::BackendGone));
        let (k, v) = entry(IPPROTO_TCP, 100_000 - 61, CT_FLAG_OPENING, 7);
        assert_eq!(
            verdict(&k, &v, now, live),
            Some(SweepReason::Expired),
            "a handshake never seen to complete lives a minute"
        );
    }

    #[test]
    fn ipv6_entries_go_by_the_same_rules() {
        let now = 100_000 * 1_000_000_000;
        let live = |id| id == 7;
        let entry6 = |proto, last_seen_s: u64, backend_id| {
            let key = Ct6Key {
                proto,
                ..Default::default()
            };
            let value = Ct6Value {
                last_seen_ns: last_seen_s * 1_000_000_000,
                backend_id,
                ..Default::default()
            };
            (key, value)
        };
        let (k, v) = entry6(IPPROTO_UDP, 100_000 - 30, 7);
        assert_eq!(verdict_of::<Ct6>(&k, &v, now, live), None);
        let (k, v) = entry6(IPPROTO_UDP, 100_000 - 61, 7);
        let expired = verdict_of::<Ct6>(&k, &v, now, live);
        assert_eq!(expired, Some(SweepReason::Expired));
        let (k, v) = entry6(IPPROTO_TCP, 100_000 - 1, 8);
        let gone = verdict_of::<Ct6>(&k, &v, now, live);
        assert_eq!(gone, Some(SweepReason::BackendGone));
        assert!(!Ct6::holds_backend(&Backend6::default()));
    }

    #[test]
    fn a_closed_masqueraded_flow_keeps_its_port_through_time_wait() {
        let now = 100_000 * 1_000_000_000;
        let live = |_| true;
        let reply = |last_seen_s: u64, flags: u16| {
            let (mut k, v) = entry(IPPROTO_TCP, last_seen_s, flags, 7);
            k.direction = CT_DIR_REPLY;
            (k, v)
        };
        let (k, v) = reply(100_000 - 60, CT_FLAG_SNAT | CT_FLAG_CLOSING);
        assert_eq!(verdict(&k, &v, now, live), None, "closed 60 s ago");
        let (k, v) = reply(100_000 - 121, CT_FLAG_SNAT | CT_FLAG_CLOSING);
        assert_eq!(verdict(&k, &v, now, live), Some(SweepReason::Expired));
        let (k, v) = reply(100_000 - 90, CT_FLAG_SNAT | CT_FLAG_OPENING);
        assert_eq!(verdict(&k, &v, now, live), None, "a failed attempt too");
        let (k, v) = reply(100_000 - 60, CT_FLAG_CLOSING);
        assert_eq!(
            verdict(&k, &v, now, live),
            Some(SweepReason::Expired),
            "no masquerade port to keep"
        );
    }

    #[test]
    fn an_entry_a_new_flow_rewrote_since_the_last_look_is_put_back() {
        // Judged expired at the look; a client reused its port since, so
        // what the removal takes out is the new flow's fresh entry.
        let now = 1_000 * 1_000_000_000;
        let (key, fresh) = entry(IPPROTO_TCP, 999, CT_FLAG_OPENING, 1);
        let judge = |v: &Ct4Value| verdict(&key, v, now, |_| true);
        assert_eq!(judge_taken(Some(fresh), judge), (None, Some(fresh)));
        let (_, stale) = entry(IPPROTO_TCP, 1, CT_FLAG_CLOSING, 1);
        assert_eq!(
            judge_taken(Some(stale), judge),
            (Some(SweepReason::Expired), None)
        );
        assert_eq!(judge_taken(None, judge), (None, None));
    }

    #[test]
    fn a_pass_that_removes_entries_does_not_count_them_as_evicted() {
        // The report's case: after a sync that deleted a backend, a pass
        // saw 962 entries and swept 212 of them; nothing was evicted (the
        // old accounting said 212).
        let before = CtCounters {
            inserted: 1_002,
            removed: 0,
            swept: 40,
        };
        assert_eq!(account(before, 962, 212), (750, 0));
        // 10 evicted before the pass stay counted.
        assert_eq!(account(before, 952, 212), (740, 10));
    }

    #[test]
    fn evictions_are_what_nobody_removed_and_is_not_there() {
        assert_eq!(evicted(1000, 10, 40, 200), 750);
        assert_eq!(evicted(100, 0, 0, 100), 0);
        // Migrated entries were never inserted here.
        assert_eq!(evicted(100, 0, 0, 150), 0);
    }
}
