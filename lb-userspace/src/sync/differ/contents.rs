//! What the maps hold, with the reverse indexes planning needs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_common::{RevNatId, Service4Value};

use super::{backend_addr, frontend_of, rev_key, BackendEntry, BackendId, RevNatEntry, SlotKey};
use crate::model::{Family, IpPrefix, L4Addr, PerFamily};
use crate::{compact_btree::compacted, l4_addr_map::L4AddrMap};

/// What the maps of both families hold (or will hold), in map terms, with
/// the reverse indexes planning needs (kept in step by
/// `insert_*`/`remove_*`). Each entry's address says its family's maps.
#[derive(Clone, Debug, Default)]
pub struct MapContents {
    pub services: BTreeMap<SlotKey, Service4Value>,
    /// Per family: backend ids are each family's own.
    pub backends: PerFamily<BTreeMap<u32, BackendEntry>>,
    /// Reverse NAT ids are one space over both families.
    pub rev_nat: BTreeMap<RevNatId, RevNatEntry>,
    /// (reverse NAT id, backend) -> `BACKEND_MATCH_*`: which backends
    /// belong to which frontend (flows and affinity check it).
    pub backend_match: BTreeMap<(RevNatId, BackendId), u8>,
    /// loadBalancerSourceRanges per reverse NAT id.
    pub source_ranges: BTreeSet<(RevNatId, IpPrefix)>,
    /// Ids in the family of the address.
    backend_ids: L4AddrMap<u32>,
    rev_ids: HashMap<(IpAddr, u16), RevNatId>,
    /// How many backend slots point at each backend.
    slot_users: HashMap<BackendId, u32>,
    /// How many master slots use each reverse NAT id.
    master_users: HashMap<RevNatId, u32>,
    /// Entries of `services` and of `rev_nat` per family, for the maps'
    /// fill metrics after every sync (counted, they were a walk of every
    /// reverse NAT entry: 2 ms a sync at 100,000 Services).
    slots_per_family: PerFamily<usize>,
    rev_nats_per_family: PerFamily<usize>,
    /// Where the last plan stopped handing out backend and reverse NAT
    /// ids: the next search starts there and goes round the id space, so a
    /// freed id is not handed out again until every other id had its turn
    /// (conntrack and affinity entries of a deleted backend or frontend
    /// still name it until they are swept). 0 until a plan ran: past the
    /// highest id in use (`IdAllocator::new`).
    pub next_backend_id: PerFamily<u32>,
    pub next_rev_nat_id: u32,
    /// Sizes of the ordered maps when last rebuilt (`compact_grown`):
    /// services, backends of each family, backend match.
    rebuilt_at: [usize; 4],
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
    /// Rebuilds the ordered maps with full nodes. Entries mostly arrive in
    /// key order (a frontend's slots, ids counting up), and a B-tree that
    /// grows at its right edge leaves every node it splits half empty: at
    /// 10,000 Services x 10 endpoints, about 7 MB of the mirror's 23.
    pub(crate) fn compact(&mut self) {
        self.services = compacted(std::mem::take(&mut self.services));
        for family in [Family::Ipv4, Family::Ipv6] {
            self.backends[family] = compacted(std::mem::take(&mut self.backends[family]));
        }
        self.backend_match = compacted(std::mem::take(&mut self.backend_match));
        self.rebuilt_at = [
            self.services.len(),
            self.backends.ipv4.len(),
            self.backends.ipv6.len(),
            self.backend_match.len(),
        ];
    }

    /// Rebuilds the ordered maps that grew by half since they were last
    /// rebuilt (and by `REBUILD_MIN` at least), so that a map filled in key
    /// order (a first sync) keeps at most a third of its entries in half
    /// empty nodes while it grows; the rebuilds cost about three times the
    /// inserts.
    pub(crate) fn compact_grown(&mut self) {
        let [services, v4, v6, matches] = &mut self.rebuilt_at;
        rebuild_grown(&mut self.services, services);
        rebuild_grown(&mut self.backends.ipv4, v4);
        rebuild_grown(&mut self.backends.ipv6, v6);
        rebuild_grown(&mut self.backend_match, matches);
    }

    pub(crate) fn insert_service(&mut self, k: SlotKey, v: Service4Value) {
        match self.services.insert(k, v) {
            Some(old) => self.unref(&k, &old),
            None => self.slots_per_family[k.family()] += 1,
        }
        if k.backend_slot == 0 {
            *self.master_users.entry(v.rev_nat_id).or_insert(0) += 1;
        } else {
            *self.slot_users.entry(k.backend(&v)).or_insert(0) += 1;
        }
    }

    pub(crate) fn remove_service(&mut self, k: &SlotKey) {
        if let Some(old) = self.services.remove(k) {
            self.unref(k, &old);
            self.slots_per_family[k.family()] -= 1;
        }
    }

    fn unref(&mut self, k: &SlotKey, old: &Service4Value) {
        if k.backend_slot == 0 {
            decrement(&mut self.master_users, &old.rev_nat_id);
        } else {
            decrement(&mut self.slot_users, &k.backend(old));
        }
    }

    /// Service slots (masters included) and reverse NAT entries of each
    /// family.
    pub(crate) fn entries_per_family(&self) -> (PerFamily<usize>, PerFamily<usize>) {
        (self.slots_per_family, self.rev_nats_per_family)
    }

    /// Whether a backend slot points at backend `id`.
    pub(crate) fn backend_in_use(&self, id: BackendId) -> bool {
        self.slot_users.contains_key(&id)
    }

    /// Whether a master slot uses reverse NAT `id`.
    pub(crate) fn rev_nat_in_use(&self, id: RevNatId) -> bool {
        self.master_users.contains_key(&id)
    }

    pub(crate) fn insert_backend(&mut self, backend: BackendId, v: BackendEntry) {
        let BackendId { family, id } = backend;
        let old = self.backends[family].insert(id, v);
        if let Some(old) = old.and_then(|o| backend_addr(&o)) {
            if self.backend_ids.get(&old) == Some(&id) {
                self.backend_ids.remove(&old);
            }
        }
        // An entry filed in the other family's array is not found by address.
        if let Some(addr) = backend_addr(&v).filter(|a| a.family() == family) {
            self.backend_ids.get_or_insert_with(&addr, || id);
        }
    }

    pub(crate) fn remove_backend(&mut self, backend: BackendId) {
        let BackendId { family, id } = backend;
        let old = self.backends[family].remove(&id);
        if let Some(addr) = old.and_then(|o| backend_addr(&o)) {
            if addr.family() == family && self.backend_ids.get(&addr) == Some(&id) {
                self.backend_ids.remove(&addr);
            }
        }
    }

    pub(crate) fn insert_rev_nat(&mut self, id: RevNatId, v: RevNatEntry) {
        self.rev_nats_per_family[Family::of(v.addr)] += 1;
        if let Some(old) = self.rev_nat.insert(id, v) {
            self.rev_nats_per_family[Family::of(old.addr)] -= 1;
            let key = rev_key(&old);
            if self.rev_ids.get(&key) == Some(&id) {
                self.rev_ids.remove(&key);
            }
        }
        self.rev_ids.entry(rev_key(&v)).or_insert(id);
    }

    pub(crate) fn remove_rev_nat(&mut self, id: RevNatId) {
        if let Some(old) = self.rev_nat.remove(&id) {
            self.rev_nats_per_family[Family::of(old.addr)] -= 1;
            let key = rev_key(&old);
            if self.rev_ids.get(&key) == Some(&id) {
                self.rev_ids.remove(&key);
            }
        }
    }

    pub fn backend_id(&self, addr: &L4Addr) -> Option<u32> {
        self.backend_ids.get(addr).copied()
    }

    pub fn rev_nat_id(&self, addr: IpAddr, port: u16) -> Option<RevNatId> {
        self.rev_ids.get(&(addr, port)).copied()
    }

    /// Every backend id of both families.
    pub(crate) fn backend_ids(&self) -> impl Iterator<Item = BackendId> + '_ {
        [Family::Ipv4, Family::Ipv6]
            .into_iter()
            .flat_map(move |family| {
                self.backends[family]
                    .keys()
                    .map(move |&id| BackendId { family, id })
            })
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

/// Entries a map must have grown by before `compact_grown` rebuilds it.
const REBUILD_MIN: usize = 8192;

fn rebuild_grown<K: Ord, V>(map: &mut BTreeMap<K, V>, rebuilt_at: &mut usize) {
    let len = map.len();
    if len < *rebuilt_at {
        *rebuilt_at = len;
    } else if len >= *rebuilt_at + (*rebuilt_at / 2).max(REBUILD_MIN) {
        *map = compacted(std::mem::take(map));
        *rebuilt_at = len;
    }
}
