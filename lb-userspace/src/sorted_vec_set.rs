//! A set of a few elements in a sorted vector: a Service's frontends or
//! EndpointSlices, usually one or two. A `BTreeSet` allocates a whole node
//! (room for eleven) for the first; at 10,000 Services the store's and the
//! desired state's indexes by Service took about 6 MB that way.

/// A sorted, deduplicated vector with the few set operations the indexes
/// need; iteration is in order, as a `BTreeSet`'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SortedVecSet<T>(Vec<T>);

impl<T> Default for SortedVecSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SortedVecSet<T> {
    /// False when it was there already.
    pub(crate) fn insert(&mut self, value: T) -> bool {
        match self.0.binary_search(&value) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, value);
                true
            }
        }
    }

    /// False when it was not there.
    pub(crate) fn remove(&mut self, value: &T) -> bool {
        match self.0.binary_search(value) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::SortedVecSet;

    #[test]
    fn keeps_one_of_each_in_order() {
        let mut s = SortedVecSet::default();
        assert!(s.insert(3));
        assert!(s.insert(1));
        assert!(!s.insert(3));
        assert!(s.insert(2));
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(s.remove(&2));
        assert!(!s.remove(&2));
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), [1, 3]);
        assert!(s.remove(&1) && s.remove(&3) && s.is_empty());
    }
}
