//! Backend and reverse NAT ids: handed out round the id space from where
//! the last plan stopped (next fit), never one a plan already gave.

use std::collections::{BTreeMap, BTreeSet};

use super::BackendId;
use crate::model::PerFamily;

/// Hands out ids not in use in `used` (a map's keys), from a cursor that
/// goes round the id space: a freed id is handed out again only after
/// every other id had its turn (conntrack and affinity entries of a
/// deleted backend or frontend still name it until they are swept), and a
/// plan looks at the ids after the last one handed out, not at every id in
/// use from 1 (a million of them in a large cluster, at every sync once
/// the ids have wrapped).
pub(super) struct IdAllocator<'a, K, V> {
    used: &'a BTreeMap<K, V>,
    /// The next id to look at.
    next: u32,
    max: u32,
    /// Ids looked at since one was last handed out: a whole round of them
    /// means none is free.
    looked_in_vain: u32,
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
    /// `cursor`: where the last plan stopped; 0 when no plan ran since the
    /// maps were adopted, and the search starts past the highest id in use.
    pub(super) fn new(used: &'a BTreeMap<K, V>, max: u32, cursor: u32) -> Self {
        let next = match cursor {
            0 => used.keys().next_back().map_or(1, |k| k.into_u32() + 1),
            c => c,
        };
        Self {
            used,
            next,
            max,
            looked_in_vain: 0,
            handed: BTreeSet::new(),
            released: Vec::new(),
        }
    }

    /// Where the next plan's search starts.
    pub(super) fn cursor(&self) -> u32 {
        self.next
    }

    /// Makes `id` free to hand out again in this plan, unless it is above
    /// the limit (kept by a map adopted from a run with a larger one).
    pub(super) fn release(&mut self, id: u32) {
        if id <= self.max {
            self.released.push(id);
        }
    }

    /// The first id from the cursor on that is free, round the id space
    /// once at most; after a round in vain, None at once.
    pub(super) fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.released.pop() {
            return Some(id);
        }
        while self.looked_in_vain < self.max {
            if self.next == 0 || self.next > self.max {
                self.next = 1;
            }
            let start = self.next;
            let id = self.first_unused_from(start)?;
            self.looked_in_vain += id.min(self.max + 1) - start;
            self.next = id;
            if id > self.max {
                continue;
            }
            self.next = id + 1;
            self.looked_in_vain += 1;
            // Ids handed out earlier in this plan come round again after
            // a wrap: they are taken even though `used` does not show it.
            if self.handed.insert(id) {
                self.looked_in_vain = 0;
                return Some(id);
            }
        }
        None
    }

    /// The first id from `from` on that `used` does not hold: past a run
    /// of ids in use, walked in order (a million of them, once a round,
    /// where the ids were handed out densely at the first sync).
    fn first_unused_from(&self, from: u32) -> Option<u32> {
        let mut id = from;
        for (key, _) in self.used.range(K::try_from(from).ok()?..) {
            if key.into_u32() != id {
                break;
            }
            id += 1;
        }
        Some(id)
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

    #[test]
    fn ids_are_handed_out_from_the_cursor_round_the_id_space() {
        // Id 1 was freed, after the cursor passed it: 5 and 6 first.
        let used: BTreeMap<u32, u8> = [(2, 0), (3, 0), (4, 0)].into();
        let mut ids = IdAllocator::new(&used, 6, 5);
        let handed: Vec<u32> = std::iter::from_fn(|| ids.allocate()).collect();
        assert_eq!(handed, [5, 6, 1]);
        // The next plan starts where this one stopped.
        assert_eq!(ids.cursor(), 2);
    }

    #[test]
    fn without_a_cursor_the_search_starts_past_the_highest_id_in_use() {
        let used: BTreeMap<u32, u8> = [(1, 0), (7, 0)].into();
        let mut ids = IdAllocator::new(&used, 9, 0);
        assert_eq!(ids.allocate(), Some(8));
        assert_eq!(
            IdAllocator::new(&BTreeMap::<u32, u8>::new(), 9, 0).allocate(),
            Some(1)
        );
    }

    #[test]
    fn a_run_of_ids_in_use_is_walked_past_to_the_first_hole() {
        let used: BTreeMap<u32, u8> = (1..=1000).filter(|i| *i != 600).map(|i| (i, 0)).collect();
        let mut ids = IdAllocator::new(&used, 2000, 1);
        assert_eq!(ids.allocate(), Some(600));
        assert_eq!(ids.allocate(), Some(1001));
        // Ids above the limit, kept from a larger one, are passed over.
        let mut ids = IdAllocator::new(&used, 599, 590);
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn after_a_round_in_vain_no_id_is_looked_at_again() {
        let used: BTreeMap<u32, u8> = (1..=1000).map(|i| (i, 0)).collect();
        let mut ids = IdAllocator::new(&used, 1000, 400);
        assert_eq!(ids.allocate(), None);
        let stopped_at = ids.cursor();
        assert_eq!(ids.allocate(), None);
        assert_eq!(ids.cursor(), stopped_at);
        ids.release(17);
        assert_eq!(ids.allocate(), Some(17));
    }
}
