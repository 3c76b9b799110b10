//! Backend and reverse NAT ids: handed out past the highest ever used,
//! then from the holes, never one a plan already gave.

use std::collections::{BTreeMap, BTreeSet};

use super::BackendId;
use crate::model::PerFamily;

/// Hands out the lowest ids not in use in `used` (a map's keys).
pub(super) struct IdAllocator<'a, K, V> {
    used: &'a BTreeMap<K, V>,
    next: u32,
    max: u32,
    wrapped: bool,
    /// Handed out by this allocator: not in `used` yet, and not free.
    handed: BTreeSet<u32>,
    /// Handed out, then given back by a Service that did not fit.
    released: Vec<u32>,
}

pub(super) trait IntoU32 {
    fn into_u32(self) -> u32;
}

impl IntoU32 for &u32 {
    fn into_u32(self) -> u32 {
        *self
    }
}

impl IntoU32 for &u16 {
    fn into_u32(self) -> u32 {
        u32::from(*self)
    }
}

impl<'a, K: Ord + Copy + TryFrom<u32>, V> IdAllocator<'a, K, V>
where
    for<'k> &'k K: IntoU32,
{
    /// `start`: where the search begins (ids below it were used before).
    pub(super) fn new(used: &'a BTreeMap<K, V>, max: u32, start: u32) -> Self {
        Self {
            used,
            next: start.max(1),
            max,
            wrapped: false,
            handed: BTreeSet::new(),
            released: Vec::new(),
        }
    }

    /// Makes `id` free to hand out again in this plan, unless it is above
    /// the limit (kept by a map adopted from a run with a larger one).
    pub(super) fn release(&mut self, id: u32) {
        if id <= self.max {
            self.released.push(id);
        }
    }

    /// Past the highest id ever used first (O(1) while ids last), then the
    /// holes from 1 up.
    pub(super) fn allocate(&mut self) -> Option<u32> {
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

/// A set of backend ids, a bit per id of each family: ids are dense from
/// 1, and a plan of 100,000 backends keeps them in 25 KB, not the 1.5 MB
/// of a B-tree set.
#[derive(Default)]
pub(super) struct BackendIdSet(PerFamily<Vec<u64>>);

impl BackendIdSet {
    /// False when it was there already.
    pub(super) fn insert(&mut self, id: BackendId) -> bool {
        let (word, bit) = Self::place(id.id);
        let words = &mut self.0[id.family];
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        let fresh = words[word] & bit == 0;
        words[word] |= bit;
        fresh
    }

    pub(super) fn contains(&self, id: &BackendId) -> bool {
        let (word, bit) = Self::place(id.id);
        self.0[id.family].get(word).is_some_and(|w| w & bit != 0)
    }

    fn place(id: u32) -> (usize, u64) {
        ((id / 64) as usize, 1 << (id % 64))
    }
}

#[cfg(test)]
mod backend_id_set_tests {
    use super::BackendIdSet;
    use crate::{model::Family, sync::differ::BackendId};

    #[test]
    fn holds_ids_of_each_family_apart() {
        let id = |family, id| BackendId { family, id };
        let mut set = BackendIdSet::default();
        assert!(set.insert(id(Family::Ipv4, 1)));
        assert!(!set.insert(id(Family::Ipv4, 1)));
        assert!(set.insert(id(Family::Ipv6, 1)));
        assert!(set.insert(id(Family::Ipv4, 1_000_000)));
        assert!(set.contains(&id(Family::Ipv4, 1_000_000)));
        assert!(!set.contains(&id(Family::Ipv4, 999_999)));
        assert!(!set.contains(&id(Family::Ipv6, 64)));
        assert!(set.contains(&id(Family::Ipv6, 1)));
    }
}

#[cfg(test)]
mod allocator_tests {
    use std::collections::BTreeMap;

    use super::IdAllocator;

    #[test]
    fn an_id_above_the_limit_is_kept_by_its_user_but_never_handed_out() {
        // Ids 2 and 9 are in use, from a run whose limit was larger.
        let used: BTreeMap<u16, u8> = [(2, 0), (9, 0)].into();
        let mut ids = IdAllocator::new(&used, 4, 1);
        ids.release(9);
        let handed: Vec<u32> = std::iter::from_fn(|| ids.allocate()).collect();
        assert_eq!(handed, [1, 3, 4]);
        ids.release(3);
        assert_eq!(ids.allocate(), Some(3));
    }
}
