//! What the maps hold, with the reverse indexes planning needs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{Backend4, RevNat4, Service4Key, Service4Value};

use super::{backend_addr, frontend_of, rev_key};
use crate::model::{Ipv4Prefix, L4Addr};

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
    pub(crate) fn insert_service(&mut self, k: Service4Key, v: Service4Value) {
        if let Some(old) = self.services.insert(k, v) {
            self.unref(&k, &old);
        }
        if k.backend_slot == 0 {
            *self.master_users.entry(v.rev_nat_id).or_insert(0) += 1;
        } else {
            *self.slot_users.entry(v.backend_id).or_insert(0) += 1;
        }
    }

    pub(crate) fn remove_service(&mut self, k: &Service4Key) {
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
    pub(crate) fn backend_in_use(&self, id: u32) -> bool {
        self.slot_users.contains_key(&id)
    }

    /// Whether a master slot uses reverse NAT `id`.
    pub(crate) fn rev_nat_in_use(&self, id: u16) -> bool {
        self.master_users.contains_key(&id)
    }

    pub(crate) fn insert_backend(&mut self, id: u32, v: Backend4) {
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

    pub(crate) fn remove_backend(&mut self, id: u32) {
        if let Some(addr) = self.backends.remove(&id).and_then(|o| backend_addr(&o)) {
            if self.backend_ids.get(&addr) == Some(&id) {
                self.backend_ids.remove(&addr);
            }
        }
    }

    pub(crate) fn insert_rev_nat(&mut self, id: u16, v: RevNat4) {
        self.next_rev_nat_id = self.next_rev_nat_id.max(u32::from(id) + 1);
        if let Some(old) = self.rev_nat.insert(id, v) {
            let key = rev_key(&old);
            if self.rev_ids.get(&key) == Some(&id) {
                self.rev_ids.remove(&key);
            }
        }
        self.rev_ids.entry(rev_key(&v)).or_insert(id);
    }

    pub(crate) fn remove_rev_nat(&mut self, id: u16) {
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

    pub(crate) fn rev_nat_id(&self, addr: Ipv4Addr, port: u16) -> Option<u16> {
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
