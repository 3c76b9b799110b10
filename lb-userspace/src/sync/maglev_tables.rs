//! Keeps each Maglev frontend's table in `lb_maglev` in step with its
//! backend slots. A table maps a flow hash to a slot number of the
//! frontend (not to a backend id, which is node-local): it is built from
//! the slots' backend addresses, so every node given the same backends,
//! size and seed sends a flow to the same backend, whatever slot order
//! its own history gave them. Slots are what the planner already keeps
//! reader-safe; the data path checks an entry against the master's count
//! and falls back to random, so a table one sync behind is still safe.
//! A table is replaced whole: a new inner map, filled, then swapped in.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya_obj::generated::BPF_F_INNER_MAP;
use lb_common::{
    RevNatId, Service4Value, MAGLEV_ENTRIES_PER_WORD, SCOPE_EXTERNAL, SVC_FLAG_MAGLEV,
};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::Context;
use aya::maps::{Array, HashOfMaps, IterableMap, Map, MapData, MapError};

use crate::{
    model::{DesiredState, L4Addr, MaglevWeights},
    sync::{
        differ::{backend_addr, frontend_of, master_key, MapContents, SlotKey},
        map_batch::{delete_all, lookup_all, update_all},
        map_writer::BpfMaps,
    },
    translate::maglev::{self, HashSeed, MaglevBackend, MaglevError},
};

/// Where tables are written: `lb_maglev` (or a fake in tests). Each
/// change of the outer map from userspace makes the kernel wait for the
/// programs running (an RCU grace period, some 8 ms here), once per
/// syscall: tables go in and out in batches.
pub trait MaglevMaps {
    /// Replaces the tables of these reverse NAT ids with these words; the
    /// ids whose table could not be written, and why.
    fn put_tables(&mut self, tables: &[(RevNatId, Vec<u64>)]) -> Vec<(RevNatId, String)>;
    /// Removes the tables of these ids (absent ones are no error).
    fn delete_tables(&mut self, ids: &[RevNatId]) -> anyhow::Result<()>;
}

/// Tables built and swapped in per batch: 8 MiB of words at 16,381
/// entries, and one wait of the kernel.
const TABLES_PER_BATCH: usize = 256;

/// A slot a Maglev table is built from: its number, its backend and the
/// backend's weight (`MaglevWeights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSlot {
    pub slot: u16,
    pub backend: L4Addr,
    pub weight: u16,
}

/// The tables written, and how to build them.
#[derive(Debug)]
pub struct MaglevTables {
    size: u32,
    seed: HashSeed,
    /// Per reverse NAT id, the frontend and slots its table was last built
    /// from: a table is rebuilt only when they change (a table is 32 KiB
    /// and a build some 0.3 ms; the slots are a few bytes each).
    written: HashMap<RevNatId, Table>,
    /// Ids that may hold a table this agent did not write (adopted maps):
    /// deleted by the next pass over every frontend unless a table is
    /// written for them.
    unknown: Vec<RevNatId>,
    /// Frontends whose table could not be written: looked at again by the
    /// next pass, whatever its frontends.
    failed: BTreeSet<L4Addr>,
}

/// What a frontend's table is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    frontend: L4Addr,
    slots: Vec<TableSlot>,
}

/// What one pass wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MaglevReport {
    pub written: usize,
    pub deleted: usize,
    pub errors: Vec<String>,
}

impl MaglevTables {
    /// Tables of `size` entries (a prime) under `seed`; `adopted`: the ids
    /// a previous agent left tables for.
    pub fn new(size: u32, seed: HashSeed, adopted: Vec<RevNatId>) -> Result<Self, MaglevError> {
        maglev::build(&[], size, &seed)?;
        Ok(Self {
            size,
            seed,
            written: HashMap::new(),
            unknown: adopted,
            failed: BTreeSet::new(),
        })
    }

    /// Writes the table of every Maglev frontend whose slots (or weights,
    /// from `desired`) changed and deletes those of frontends that are
    /// gone or no longer Maglev: of every frontend, or (an incremental
    /// sync at 100,000 Services would otherwise walk a million slots)
    /// only of `scope`, the frontends a sync may have written.
    pub fn sync(
        &mut self,
        maps: &mut dyn MaglevMaps,
        current: &MapContents,
        desired: &DesiredState,
        scope: Option<&BTreeSet<L4Addr>>,
    ) -> MaglevReport {
        let mut report = MaglevReport::default();
        let scope = scope.map(|s| s | &std::mem::take(&mut self.failed));
        let wanted = maglev_frontends(current, desired, scope.as_ref());
        let changed: Vec<(&RevNatId, &Table)> = wanted
            .iter()
            .filter(|(id, table)| self.written.get(id) != Some(table))
            .collect();
        for batch in changed.chunks(TABLES_PER_BATCH) {
            self.write_batch(maps, batch, &mut report);
        }
        let gone = self.gone(&wanted, scope.as_ref());
        for id in &gone {
            self.written.remove(id);
        }
        match maps.delete_tables(&gone) {
            Ok(()) => report.deleted += gone.len(),
            Err(e) => report
                .errors
                .push(format!("deleting Maglev tables {gone:?}: {e:#}")),
        }
        report
    }

    /// The ids whose table is to go: written (or adopted, in a pass over
    /// every frontend) for a frontend in scope, and no longer wanted.
    fn gone(
        &mut self,
        wanted: &BTreeMap<RevNatId, Table>,
        scope: Option<&BTreeSet<L4Addr>>,
    ) -> Vec<RevNatId> {
        let in_scope = |t: &Table| scope.is_none_or(|s| s.contains(&t.frontend));
        let written = (self.written.iter())
            .filter(|(_, t)| in_scope(t))
            .map(|(id, _)| *id);
        let adopted = match scope {
            None => std::mem::take(&mut self.unknown),
            Some(_) => Vec::new(),
        };
        written
            .chain(adopted)
            .filter(|id| !wanted.contains_key(id))
            .collect()
    }

    /// Builds and writes one batch of tables, noting what went in.
    fn write_batch(
        &mut self,
        maps: &mut dyn MaglevMaps,
        batch: &[(&RevNatId, &Table)],
        report: &mut MaglevReport,
    ) {
        let mut tables = Vec::with_capacity(batch.len());
        for (id, table) in batch {
            match self.words(&table.slots) {
                Ok(words) => tables.push((**id, words)),
                Err(e) => report.errors.push(format!("Maglev table of {id}: {e}")),
            }
        }
        let failed = maps.put_tables(&tables);
        for (id, table) in batch {
            if tables.iter().any(|(t, _)| t == *id) && !failed.iter().any(|(f, _)| f == *id) {
                report.written += 1;
                self.written.insert(**id, (*table).clone());
            } else {
                self.failed.insert(table.frontend);
            }
        }
        for (id, why) in failed {
            report
                .errors
                .push(format!("writing the Maglev table of {id}: {why}"));
        }
    }

    /// The table of a frontend whose active slots are `slots`, packed four
    /// entries a word.
    pub fn words(&self, slots: &[TableSlot]) -> Result<Vec<u64>, MaglevError> {
        let backends: Vec<MaglevBackend> = slots
            .iter()
            .map(|s| MaglevBackend {
                addr: s.backend,
                weight: s.weight,
            })
            .collect();
        let table = maglev::build(&backends, self.size, &self.seed)?;
        let slot_of: BTreeMap<L4Addr, u16> = slots.iter().map(|s| (s.backend, s.slot)).collect();
        let per_word = MAGLEV_ENTRIES_PER_WORD as usize;
        let mut words = vec![0_u64; (self.size as usize).div_ceil(per_word)];
        for (i, position) in table.entries.iter().enumerate() {
            let slot = slot_of[&table.backends[usize::from(*position)]];
            words[i / per_word] |= u64::from(slot) << (16 * (i % per_word));
        }
        Ok(words)
    }
}

/// Per reverse NAT id, the frontend and active slots of every
/// external-scope master flagged Maglev (of the frontends in `scope`, or
/// of all), weighted as its desired entry says.
fn maglev_frontends(
    current: &MapContents,
    desired: &DesiredState,
    scope: Option<&BTreeSet<L4Addr>>,
) -> BTreeMap<RevNatId, Table> {
    let table_of = |key: &SlotKey, master: &Service4Value| {
        let maglev = key.backend_slot == 0
            && key.scope == SCOPE_EXTERNAL
            && master.flags & SVC_FLAG_MAGLEV != 0;
        let frontend = frontend_of(key).filter(|_| maglev)?;
        let weights = desired
            .get(&frontend)
            .and_then(|e| e.maglev_weights.as_deref());
        let slots = active_slots(current, key, master, weights);
        Some((master.rev_nat_id, Table { frontend, slots }))
    };
    match scope {
        None => (current.services.iter())
            .filter_map(|(key, master)| table_of(key, master))
            .collect(),
        Some(frontends) => (frontends.iter())
            .filter_map(|f| {
                let key = master_key(f);
                table_of(&key, current.services.get(&key)?)
            })
            .collect(),
    }
}

fn active_slots(
    current: &MapContents,
    master: &SlotKey,
    value: &Service4Value,
    weights: Option<&MaglevWeights>,
) -> Vec<TableSlot> {
    (1..=value.count)
        .filter_map(|slot| {
            let key = SlotKey {
                backend_slot: slot,
                ..*master
            };
            let backend_id = current.services.get(&key)?.backend_id;
            let backend = backend_addr(current.backends[key.family()].get(&backend_id)?)?;
            let weight = weights.map_or(1, |w| w.of(&backend.addr));
            Some(TableSlot {
                slot,
                backend,
                weight,
            })
        })
        .collect()
}

impl MaglevMaps for BpfMaps {
    fn put_tables(&mut self, tables: &[(RevNatId, Vec<u64>)]) -> Vec<(RevNatId, String)> {
        let Some(outer) = self.maglev.as_ref() else {
            return tables
                .iter()
                .map(|(id, _)| (*id, "no lb_maglev map".into()))
                .collect();
        };
        let mut failed = Vec::new();
        let mut filled = Vec::with_capacity(tables.len());
        for (id, words) in tables {
            match filled_table(words) {
                Ok(inner) => filled.push((*id, inner)),
                Err(e) => failed.push((*id, format!("{e:#}"))),
            }
        }
        let keys: Vec<u32> = filled.iter().map(|(k, _)| *k).collect();
        let fds: Vec<u32> = filled
            .iter()
            .map(|(_, inner)| inner.map().fd().as_fd().as_raw_fd() as u32)
            .collect();
        if let Err(stopped) = update_all(outer.fd.as_fd(), &keys, &fds) {
            let why = format!("swapping it in: {}", stopped.error);
            failed.extend(keys[stopped.written..].iter().map(|k| (*k, why.clone())));
        }
        failed
    }

    fn delete_tables(&mut self, ids: &[RevNatId]) -> anyhow::Result<()> {
        let outer = self.maglev.as_mut().context("no lb_maglev map")?;
        if delete_all(outer.fd.as_fd(), ids).is_ok() {
            return Ok(());
        }
        // A key already absent stops a batch: one by one then.
        for key in ids {
            match outer.map.remove(key) {
                Err(MapError::KeyNotFound) | Ok(()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// `lb_maglev`: aya's map, and its descriptor for the batch syscalls
/// (aya's hash of maps does not lend its own).
pub struct OuterMaglev {
    pub map: HashOfMaps<MapData, u32>,
    fd: OwnedFd,
}

impl OuterMaglev {
    pub fn new(map: Map) -> anyhow::Result<Self> {
        let Map::HashOfMaps(data) = &map else {
            anyhow::bail!("lb_maglev is not a hash of maps");
        };
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Ok(Self {
            map: HashOfMaps::try_from(map)?,
            fd,
        })
    }
}

/// A new inner map holding `words` (not yet in the outer map).
fn filled_table(words: &[u64]) -> anyhow::Result<Array<MapData, u64>> {
    let entries = u32::try_from(words.len())?;
    let inner = Array::<MapData, u64>::create(entries, BPF_F_INNER_MAP)?;
    let indexes: Vec<u32> = (0..entries).collect();
    update_all(inner.map().fd().as_fd(), &indexes, words)
        .map_err(|stopped| stopped.error)
        .context("filling the table")?;
    Ok(inner)
}

/// `lb-agent check`'s part: every Maglev frontend of `current` (the
/// pinned maps read) has the table `tables` would build from its slots,
/// and no other frontend has one. One line per difference.
pub fn check(
    maps: &BpfMaps,
    current: &MapContents,
    desired: &DesiredState,
    tables: &MaglevTables,
) -> Vec<String> {
    let mut differences = Vec::new();
    let wanted = maglev_frontends(current, desired, None);
    for (id, table) in &wanted {
        let expected = match tables.words(&table.slots) {
            Ok(w) => w,
            Err(e) => {
                differences.push(format!("Maglev frontend {id}: {e}"));
                continue;
            }
        };
        match table_in(maps, *id) {
            Err(e) => differences.push(format!("Maglev frontend {id}: no table ({e:#})")),
            Ok(words) if words != expected => {
                let off = (words.iter().zip(&expected))
                    .filter(|(a, b)| a != b)
                    .count();
                differences.push(format!(
                    "Maglev frontend {id}: its table differs from its slots' ({off} of {} words, {} long, {} expected)",
                    expected.len(),
                    words.len(),
                    expected.len()
                ));
            }
            Ok(_) => {}
        }
    }
    for id in tables_in(maps)
        .into_iter()
        .filter(|id| !wanted.contains_key(id))
    {
        differences.push(format!(
            "reverse NAT {id} has a Maglev table but is no Maglev frontend"
        ));
    }
    differences
}

/// The words of reverse NAT id `id`'s table in `lb_maglev`.
fn table_in(maps: &BpfMaps, id: RevNatId) -> anyhow::Result<Vec<u64>> {
    let outer = maps.maglev.as_ref().context("no lb_maglev map")?;
    let inner = outer.map.get(&id, 0)?;
    let mut entries: Vec<(u32, u64)> = lookup_all(inner.fd().as_fd())?;
    entries.sort_unstable_by_key(|(index, _)| *index);
    Ok(entries.into_iter().map(|(_, word)| word).collect())
}

/// Reverse NAT ids that have a table in `lb_maglev` (to adopt its pins).
pub fn tables_in(maps: &BpfMaps) -> Vec<RevNatId> {
    let Some(outer) = &maps.maglev else {
        return Vec::new();
    };
    outer.map.keys().filter_map(Result::ok).collect()
}

/// A seed from the text every agent of a cluster is given
/// (`--maglev-hash-seed`).
pub fn seed_of(text: &str) -> HashSeed {
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;
    let mut hasher = SipHasher13::new();
    hasher.write(text.as_bytes());
    HashSeed(hasher.finish128().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::Protocol,
        sync::{differ, map_writer::record},
    };
    use lb_common::SVC_FLAG_NODE_PORT;

    #[derive(Default)]
    struct FakeMaps {
        tables: BTreeMap<RevNatId, Vec<u64>>,
        writes: usize,
        /// Refuses the next put.
        refuse: bool,
    }

    impl MaglevMaps for FakeMaps {
        fn put_tables(&mut self, tables: &[(RevNatId, Vec<u64>)]) -> Vec<(RevNatId, String)> {
            if std::mem::take(&mut self.refuse) {
                return tables
                    .iter()
                    .map(|(id, _)| (*id, "refused".into()))
                    .collect();
            }
            for (id, words) in tables {
                self.writes += 1;
                self.tables.insert(*id, words.clone());
            }
            Vec::new()
        }

        fn delete_tables(&mut self, ids: &[RevNatId]) -> anyhow::Result<()> {
            for id in ids {
                self.tables.remove(id);
            }
            Ok(())
        }
    }

    fn l4(addr: &str, port: u16) -> L4Addr {
        L4Addr {
            addr: addr.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
        }
    }

    /// The maps after one frontend is programmed with `backends` (in
    /// that slot order) and `flags`, and the desired state they follow.
    fn programmed(backends: &[L4Addr], flags: u16) -> (MapContents, DesiredState) {
        weighted(backends, flags, None)
    }

    /// `programmed` with the Service's Maglev weights.
    fn weighted(
        backends: &[L4Addr],
        flags: u16,
        maglev_weights: Option<std::sync::Arc<MaglevWeights>>,
    ) -> (MapContents, DesiredState) {
        let mut desired = crate::model::DesiredState::default();
        let entry = crate::model::ServiceEntry {
            service: crate::model::ServiceName {
                namespace: "default".into(),
                name: "web".into(),
            },
            port_name: String::new(),
            frontend: l4("10.0.0.1", 30080),
            backends: crate::model::BackendSet {
                active: backends.to_vec(),
                terminating: Vec::new(),
            },
            internal: None,
            flags,
            affinity_timeout: 0,
            source_ranges: Vec::new(),
            maglev_weights,
        };
        assert!(desired
            .claim(entry, &mut crate::model::Shadowed::default())
            .is_none());
        let mut maps = MapContents::default();
        for op in differ::plan(&maps.clone(), &desired).ops {
            record(&mut maps, &op.op);
        }
        (maps, desired)
    }

    fn slot_backend(maps: &MapContents, words: &[u64], entry: usize) -> L4Addr {
        let slot = (words[entry / 4] >> (16 * (entry % 4))) as u16;
        let (key, _) = maps
            .services
            .iter()
            .find(|(k, _)| k.backend_slot == slot)
            .unwrap();
        let id = maps.services[key].backend_id;
        backend_addr(&maps.backends[key.family()][&id]).unwrap()
    }

    #[test]
    fn a_maglev_frontend_gets_a_table_naming_its_slots_and_loses_it_when_gone() {
        let backends: Vec<L4Addr> = (1..=3).map(|i| l4(&format!("10.1.0.{i}"), 80)).collect();
        let (maps, desired) = programmed(&backends, SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV);
        let mut tables = MaglevTables::new(251, seed_of("test"), Vec::new()).unwrap();
        let mut fake = FakeMaps::default();
        let report = tables.sync(&mut fake, &maps, &desired, None);
        assert_eq!(report.written, 1, "{report:?}");
        let (_, words) = fake.tables.iter().next().unwrap();
        assert_eq!(words.len(), 251_usize.div_ceil(4));
        let mut seen = BTreeMap::new();
        for entry in 0..251 {
            *seen.entry(slot_backend(&maps, words, entry)).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "every backend has entries: {seen:?}");
        // Nothing changed: nothing built or written.
        assert_eq!(tables.sync(&mut fake, &maps, &desired, None).written, 0);
        // A fourth backend: the table is rebuilt and names it.
        let four: Vec<L4Addr> = (1..=4).map(|i| l4(&format!("10.1.0.{i}"), 80)).collect();
        let (grown, desired) = programmed(&four, SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV);
        assert_eq!(tables.sync(&mut fake, &grown, &desired, None).written, 1);
        let words = fake.tables.values().next().unwrap().clone();
        assert!((0..251).any(|e| slot_backend(&grown, &words, e) == four[3]));
        // No longer Maglev: the table goes.
        let (plain, desired) = programmed(&backends, SVC_FLAG_NODE_PORT);
        assert_eq!(tables.sync(&mut fake, &plain, &desired, None).deleted, 1);
        assert!(fake.tables.is_empty());
    }

    #[test]
    fn an_incremental_pass_looks_at_its_frontends_and_at_tables_that_failed() {
        let three: Vec<L4Addr> = (1..=3).map(|i| l4(&format!("10.1.0.{i}"), 80)).collect();
        let four: Vec<L4Addr> = (1..=4).map(|i| l4(&format!("10.1.0.{i}"), 80)).collect();
        let maglev = SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV;
        let frontend = l4("10.0.0.1", 30080);
        let (ours, other) = (
            BTreeSet::from([frontend]),
            BTreeSet::from([l4("10.0.0.2", 80)]),
        );
        let mut tables = MaglevTables::new(251, seed_of("test"), Vec::new()).unwrap();
        let mut fake = FakeMaps::default();
        let (maps, desired) = programmed(&three, maglev);
        assert_eq!(tables.sync(&mut fake, &maps, &desired, None).written, 1);
        // Its slots changed, but the sync wrote other frontends only.
        let (grown, desired) = programmed(&four, maglev);
        let report = tables.sync(&mut fake, &grown, &desired, Some(&other));
        assert_eq!(report, MaglevReport::default());
        // Its own sync: refused by the map, then tried again by the next
        // pass, which was about other frontends.
        fake.refuse = true;
        let report = tables.sync(&mut fake, &grown, &desired, Some(&ours));
        assert_eq!((report.written, report.errors.len()), (0, 1), "{report:?}");
        assert_eq!(
            tables
                .sync(&mut fake, &grown, &desired, Some(&other))
                .written,
            1
        );
        // No longer Maglev: gone only when its frontend is in scope.
        let (plain, desired) = programmed(&three, SVC_FLAG_NODE_PORT);
        assert_eq!(
            tables
                .sync(&mut fake, &plain, &desired, Some(&other))
                .deleted,
            0
        );
        assert_eq!(
            tables
                .sync(&mut fake, &plain, &desired, Some(&ours))
                .deleted,
            1
        );
        assert!(fake.tables.is_empty());
    }

    #[test]
    fn two_nodes_with_other_slot_orders_send_every_entry_to_the_same_backend() {
        let backends: Vec<L4Addr> = (1..=5).map(|i| l4(&format!("10.1.0.{i}"), 80)).collect();
        let mut reversed = backends.clone();
        reversed.reverse();
        let (a, b) = (
            programmed(&backends, SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV),
            programmed(&reversed, SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV),
        );
        let (mut fa, mut fb) = (FakeMaps::default(), FakeMaps::default());
        MaglevTables::new(251, seed_of("cluster"), Vec::new())
            .unwrap()
            .sync(&mut fa, &a.0, &a.1, None);
        MaglevTables::new(251, seed_of("cluster"), Vec::new())
            .unwrap()
            .sync(&mut fb, &b.0, &b.1, None);
        let (wa, wb) = (
            &fa.tables.values().next().unwrap(),
            &fb.tables.values().next().unwrap(),
        );
        for entry in 0..251 {
            assert_eq!(
                slot_backend(&a.0, wa, entry),
                slot_backend(&b.0, wb, entry),
                "entry {entry}"
            );
        }
    }

    #[test]
    fn weights_set_each_backends_share_and_a_change_of_them_rebuilds_the_table() {
        let backends: Vec<L4Addr> = (1..=3).map(|i| l4(&format!("10.1.0.{i}"), 80)).collect();
        let flags = SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV;
        let weights = |text: &str| Some(std::sync::Arc::new(MaglevWeights::parse(text).unwrap()));
        // 10.1.0.1 three times the others, 10.1.0.3 none.
        let (maps, desired) = weighted(&backends, flags, weights("10.1.0.1=3, 10.1.0.3=0"));
        let mut tables = MaglevTables::new(251, seed_of("w"), Vec::new()).unwrap();
        let mut fake = FakeMaps::default();
        assert_eq!(tables.sync(&mut fake, &maps, &desired, None).written, 1);
        let words = fake.tables.values().next().unwrap().clone();
        let share = |b: &L4Addr| {
            (0..251)
                .filter(|&e| slot_backend(&maps, &words, e) == *b)
                .count()
        };
        assert_eq!(share(&backends[2]), 0, "weight 0: no entries");
        let (heavy, light) = (share(&backends[0]), share(&backends[1]));
        assert_eq!(heavy + light, 251);
        assert!((heavy as f64 / 251.0 - 0.75).abs() < 0.01, "{heavy} of 251");
        // The same slots with other weights: rebuilt.
        let (_, reweighted) = weighted(&backends, flags, weights("10.1.0.2=5"));
        assert_eq!(tables.sync(&mut fake, &maps, &reweighted, None).written, 1);
    }

    #[test]
    fn adopted_tables_of_frontends_not_maglev_are_deleted() {
        let (maps, desired) = programmed(&[l4("10.1.0.1", 80)], SVC_FLAG_NODE_PORT);
        let mut tables = MaglevTables::new(251, seed_of("x"), vec![7]).unwrap();
        let mut fake = FakeMaps::default();
        fake.tables.insert(7, vec![1]);
        assert_eq!(tables.sync(&mut fake, &maps, &desired, None).deleted, 1);
        assert!(fake.tables.is_empty());
    }

    #[test]
    fn a_size_that_is_not_prime_is_refused() {
        assert!(MaglevTables::new(1000, seed_of("x"), Vec::new()).is_err());
    }
}
