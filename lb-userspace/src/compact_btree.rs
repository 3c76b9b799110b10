//! B-trees rebuilt with full nodes. Entries that arrive mostly in key
//! order (a first sync's slots, ids counting up) leave every node a growing
//! B-tree splits half empty; the maps' mirror and the desired state are
//! rebuilt after large syncs.

use std::collections::BTreeMap;

/// `map` rebuilt with full nodes. `append` merges in bulk, filling each
/// node, and frees the old nodes as it reads them: no copy of the whole
/// map at once (`collect` would gather every entry in a vector first).
pub(crate) fn compacted<K: Ord, V>(mut map: BTreeMap<K, V>) -> BTreeMap<K, V> {
    let mut fresh = BTreeMap::new();
    // Into an empty map, `append` would only swap the two.
    if let Some((k, v)) = map.pop_first() {
        fresh.insert(k, v);
    }
    fresh.append(&mut map);
    fresh
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::compacted;

    #[test]
    fn a_compacted_map_keeps_every_entry() {
        for n in [0usize, 1, 2, 11, 12, 1000] {
            let map: BTreeMap<usize, usize> = (0..n).map(|i| (i * 7 % (n + 1), i)).collect();
            assert_eq!(compacted(map.clone()), map, "{n} entries");
        }
    }
}
