//! The backend ids of a plan's entries, resolved once, when ids are
//! handed out. Three later phases (backends, memberships, slots) need every
//! backend's id again; at a million backends, looking each address up in
//! the maps' mirror in every phase was a seventh of a full sync.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::BackendId;
use crate::model::{BackendSet, L4Addr, ServiceEntry};

/// Each planned entry's backend ids, in the order of
/// `ServiceEntry::all_backends`: the external set, then the internal one;
/// in each, the active backends, then the terminating ones.
#[derive(Default)]
pub(super) struct EntryIds {
    ids: Vec<u32>,
    /// Where a frontend's ids start in `ids`.
    start: HashMap<L4Addr, usize, RandomState>,
}

/// Where in `EntryIds` a backend set's ids are: the set's first id.
#[derive(Clone, Copy)]
pub(super) struct SetIds(usize);

impl EntryIds {
    /// Starts the ids of `frontend`'s entry; `push` then adds them in order.
    pub(super) fn begin(&mut self, frontend: L4Addr) {
        self.start.insert(frontend, self.ids.len());
    }

    pub(super) fn push(&mut self, id: u32) {
        self.ids.push(id);
    }

    /// How far the ids go, to give back with `truncate`.
    pub(super) fn mark(&self) -> usize {
        self.ids.len()
    }

    /// Forgets the ids from `mark` on, and the entries of `frontends`
    /// (those of a Service whose ids were given back).
    pub(super) fn truncate(&mut self, mark: usize, frontends: impl Iterator<Item = L4Addr>) {
        self.ids.truncate(mark);
        for f in frontends {
            self.start.remove(&f);
        }
    }

    /// The ids of `entry`'s external set (`internal`: its internal one);
    /// None for an entry this plan gave no ids (not planned).
    pub(super) fn of_set(&self, entry: &ServiceEntry, internal: bool) -> Option<SetIds> {
        let start = *self.start.get(&entry.frontend)?;
        Some(SetIds(if internal {
            start + entry.backends.all().count()
        } else {
            start
        }))
    }

    /// The id of backend `b`, number `n` of the set's `all()` order (the
    /// active ones, then the terminating ones).
    pub(super) fn get(&self, set: SetIds, n: usize, b: &L4Addr) -> BackendId {
        BackendId {
            family: b.family(),
            id: self.ids[set.0 + n],
        }
    }

    /// The ids of `set`'s terminating backends start `active` ids in.
    pub(super) fn terminating(set: SetIds, of: &BackendSet) -> SetIds {
        SetIds(set.0 + of.active.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, Protocol, ServiceName};
    use crate::test_objects::l4_addr as l4;

    fn entry(frontend: L4Addr, external: BackendSet, internal: Option<BackendSet>) -> ServiceEntry {
        ServiceEntry {
            service: ServiceName {
                namespace: "default".into(),
                name: "web".into(),
            },
            port_name: String::new(),
            frontend,
            backends: external,
            internal,
            flags: 0,
            affinity_timeout: 0,
            source_ranges: Vec::new(),
            maglev_weights: None,
        }
    }

    #[test]
    fn each_set_finds_its_ids_and_a_given_back_service_none() {
        let web = l4("10.0.0.1", 80, Protocol::Tcp);
        let dns = l4("10.0.0.2", 80, Protocol::Tcp);
        let (active, leaving, local) = (
            l4("10.244.0.1", 8080, Protocol::Tcp),
            l4("10.244.0.2", 8080, Protocol::Tcp),
            l4("fd00::3", 8080, Protocol::Tcp),
        );
        let external = BackendSet {
            active: vec![active],
            terminating: vec![leaving],
        };
        let internal = BackendSet {
            active: vec![local],
            terminating: vec![],
        };
        let web_entry = entry(web, external, Some(internal));
        let mut ids = EntryIds::default();
        ids.begin(web);
        for id in [7, 8, 9] {
            ids.push(id);
        }
        let ext = ids.of_set(&web_entry, false).unwrap();
        assert_eq!(ids.get(ext, 0, &active).id, 7);
        let term = EntryIds::terminating(ext, &web_entry.backends);
        assert_eq!(ids.get(term, 0, &leaving).id, 8);
        let int = ids.of_set(&web_entry, true).unwrap();
        let got = ids.get(int, 0, &local);
        assert_eq!((got.family, got.id), (Family::Ipv6, 9));

        let mark = ids.mark();
        ids.begin(dns);
        ids.push(10);
        ids.truncate(mark, [dns].into_iter());
        let dns_entry = entry(dns, BackendSet::default(), None);
        assert!(ids.of_set(&dns_entry, false).is_none());
        assert_eq!(ids.mark(), 3);
    }
}
