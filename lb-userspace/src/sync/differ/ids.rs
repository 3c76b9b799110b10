//! Backend and reverse NAT ids: handed out past the highest ever used,
//! then from the holes, never one a plan already gave.

use std::collections::{BTreeMap, BTreeSet};

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

    pub(super) fn release(&mut self, id: u32) {
        self.released.push(id);
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
