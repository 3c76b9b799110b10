//! `lb-agent check`: do the maps hold exactly the desired state? Both sides
//! are brought into one form that does not depend on the ids the agent
//! handed out (backends and reverse NAT entries by address), then compared
//! entry by entry. Written apart from the differ on purpose: a bug in the
//! planning must not hide itself in the check.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    RevNatId, BACKEND_MATCH_ACTIVE, BACKEND_MATCH_TERMINATING, SCOPE_EXTERNAL, SCOPE_INTERNAL,
};

use crate::{
    model::{BackendSet, DesiredState, Family, IpPrefix, L4Addr},
    sync::differ::{backend_addr, frontend_of, scoped_slot_key, BackendId, MapContents, SlotKey},
};

/// The master slot of one frontend and scope, and its backend slots in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ScopeView {
    count: u16,
    terminating_count: u16,
    flags: u16,
    affinity_timeout: u32,
    /// The reverse NAT entry the master names (None: missing).
    rev_nat: Option<(IpAddr, u16)>,
    /// Slots 1..=count+terminating_count; None: missing slot or backend.
    slots: Vec<Option<L4Addr>>,
}

/// Everything the data path reads, by address.
#[derive(Debug, Default, PartialEq, Eq)]
struct View {
    frontends: BTreeMap<(L4Addr, u8), ScopeView>,
    /// (Service address and port, backend) -> `BACKEND_MATCH_*`.
    backend_match: BTreeMap<((IpAddr, u16), L4Addr), u8>,
    source_ranges: BTreeSet<((IpAddr, u16), IpPrefix)>,
}

/// The outcome of a check.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Frontend scopes, backend-match and source-range entries compared.
    pub compared: usize,
    /// Backend entries and reverse NAT entries in the maps.
    pub backends: usize,
    pub rev_nat: usize,
    /// Every difference, one line each (empty: equal).
    pub differences: Vec<String>,
}

impl CheckReport {
    pub fn is_equal(&self) -> bool {
        self.differences.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_equal() {
            write!(
                f,
                "maps equal the desired state: {} entries compared ({} backends, {} reverse NAT entries)",
                self.compared, self.backends, self.rev_nat
            )
        } else {
            writeln!(
                f,
                "{} differences between the maps and the desired state ({} entries compared):",
                self.differences.len(),
                self.compared
            )?;
            for d in &self.differences {
                writeln!(f, "  {d}")?;
            }
            Ok(())
        }
    }
}

fn scope_name(scope: u8) -> &'static str {
    match scope {
        SCOPE_EXTERNAL => "external",
        SCOPE_INTERNAL => "internal",
        _ => "unknown",
    }
}

fn expected(desired: &DesiredState) -> View {
    let mut view = View::default();
    for (f, entry) in desired.entries() {
        let scopes: [(u8, Option<&BackendSet>); 2] = [
            (SCOPE_EXTERNAL, Some(&entry.backends)),
            (SCOPE_INTERNAL, entry.internal.as_ref()),
        ];
        for (scope, set) in scopes {
            let Some(set) = set else { continue };
            view.frontends.insert(
                (*f, scope),
                ScopeView {
                    count: set.active.len() as u16,
                    terminating_count: set.terminating.len() as u16,
                    flags: entry.flags,
                    affinity_timeout: entry.affinity_timeout,
                    rev_nat: Some((f.addr, f.port)),
                    slots: set.all().map(|b| Some(*b)).collect(),
                },
            );
        }
        let group = (f.addr, f.port);
        for set in std::iter::once(&entry.backends).chain(entry.internal.as_ref()) {
            // Active in any scope or protocol of the port wins over terminating.
            for b in &set.terminating {
                view.backend_match
                    .entry((group, *b))
                    .or_insert(BACKEND_MATCH_TERMINATING);
            }
            for b in &set.active {
                view.backend_match.insert((group, *b), BACKEND_MATCH_ACTIVE);
            }
        }
        view.source_ranges
            .extend(entry.source_ranges.iter().map(|r| (group, *r)));
    }
    view
}

/// The maps' view, and what is wrong with them on their own (entries
/// nothing points at, ids that resolve to nothing).
fn actual(maps: &MapContents) -> (View, Vec<String>) {
    let mut reading = Reading::default();
    reading.frontends(maps);
    reading.stray_slots(maps);
    reading.memberships(maps);
    reading.unused_entries(maps);
    reading.duplicate_backends(maps);
    (reading.view, reading.problems)
}

/// The maps read back in address terms, and what does not fit together.
#[derive(Default)]
struct Reading {
    view: View,
    problems: Vec<String>,
    used_backends: BTreeSet<BackendId>,
    used_revs: BTreeSet<RevNatId>,
    slots_seen: BTreeSet<SlotKey>,
}

/// The address and port a reverse NAT id restores, if it exists.
fn rev_of(maps: &MapContents, id: RevNatId) -> Option<(IpAddr, u16)> {
    maps.rev_nat.get(&id).map(|r| (r.addr, r.port))
}

/// The backend entry `id` names, as an address.
fn backend_of(maps: &MapContents, id: BackendId) -> Option<L4Addr> {
    maps.backends[id.family].get(&id.id).and_then(backend_addr)
}

impl Reading {
    /// Every master and the slots up to its count.
    fn frontends(&mut self, maps: &MapContents) {
        for (key, master) in maps.services.iter().filter(|(k, _)| k.backend_slot == 0) {
            self.slots_seen.insert(*key);
            let Some(f) = frontend_of(key) else {
                self.problems
                    .push(format!("master slot with unknown protocol {}", key.proto));
                continue;
            };
            self.used_revs.insert(master.rev_nat_id);
            let n = master.count as usize + master.terminating_count as usize;
            let mut slots = Vec::with_capacity(n);
            for slot in 1..=n {
                let k = scoped_slot_key(&f, key.scope, slot as u16);
                self.slots_seen.insert(k);
                slots.push(maps.services.get(&k).and_then(|v| {
                    // A slot names a backend of its frontend's family.
                    let id = k.backend(v);
                    self.used_backends.insert(id);
                    backend_of(maps, id)
                }));
            }
            self.view.frontends.insert(
                (f, key.scope),
                ScopeView {
                    count: master.count,
                    terminating_count: master.terminating_count,
                    flags: master.flags,
                    affinity_timeout: master.affinity_timeout,
                    rev_nat: rev_of(maps, master.rev_nat_id),
                    slots,
                },
            );
        }
    }

    /// Slots no master's count reaches.
    fn stray_slots(&mut self, maps: &MapContents) {
        for key in maps
            .services
            .keys()
            .filter(|k| !self.slots_seen.contains(k))
        {
            self.problems.push(match frontend_of(key) {
                Some(f) => format!(
                    "{f} {} slot {}: past its master's count (or no master)",
                    scope_name(key.scope),
                    key.backend_slot
                ),
                None => format!("slot with unknown protocol {}", key.proto),
            });
        }
    }

    /// Backend matches and source ranges, by address.
    fn memberships(&mut self, maps: &MapContents) {
        for (&(rev_id, backend_id), &state) in &maps.backend_match {
            let backend = backend_of(maps, backend_id);
            match (rev_of(maps, rev_id), backend) {
                (Some(group), Some(b)) => {
                    self.view.backend_match.insert((group, b), state);
                }
                _ => self.problems.push(format!(
                    "backend match (reverse NAT {rev_id}, backend {backend_id}) names a missing entry"
                )),
            }
        }
        for &(rev_id, prefix) in &maps.source_ranges {
            match rev_of(maps, rev_id) {
                Some(group) => {
                    self.view.source_ranges.insert((group, prefix));
                }
                None => self.problems.push(format!(
                    "source range {prefix} of reverse NAT {rev_id}, which does not exist"
                )),
            }
        }
    }

    /// Backends in no slot, reverse NAT entries of no frontend.
    fn unused_entries(&mut self, maps: &MapContents) {
        for id in maps.backend_ids() {
            if !self.used_backends.contains(&id) {
                let b = maps.backends[id.family].get(&id.id).and_then(backend_addr);
                self.problems.push(format!(
                    "backend {id} ({}) is in no slot",
                    b.map_or("invalid".into(), |a| a.to_string())
                ));
            }
        }
        for (id, r) in &maps.rev_nat {
            if !self.used_revs.contains(id) {
                self.problems.push(format!(
                    "reverse NAT {id} ({}) is used by no frontend",
                    SocketAddr::new(r.addr, r.port)
                ));
            }
        }
    }

    fn duplicate_backends(&mut self, maps: &MapContents) {
        let mut by_addr: BTreeMap<L4Addr, Vec<u32>> = BTreeMap::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            for (id, b) in &maps.backends[family] {
                if let Some(a) = backend_addr(b) {
                    by_addr.entry(a).or_default().push(*id);
                }
            }
        }
        for (a, ids) in by_addr.iter().filter(|(_, ids)| ids.len() > 1) {
            self.problems
                .push(format!("backend {a} has several ids: {ids:?}"));
        }
    }
}

fn show_slots(slots: &[Option<L4Addr>]) -> String {
    slots
        .iter()
        .map(|s| s.map_or("<missing>".into(), |a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn compare_scope(want: &ScopeView, got: &ScopeView) -> Vec<String> {
    let mut d = Vec::new();
    if (want.count, want.terminating_count) != (got.count, got.terminating_count) {
        d.push(format!(
            "count {}+{} terminating, maps hold {}+{}",
            want.count, want.terminating_count, got.count, got.terminating_count
        ));
    }
    if want.flags != got.flags {
        d.push(format!(
            "flags {:#x}, maps hold {:#x}",
            want.flags, got.flags
        ));
    }
    if want.affinity_timeout != got.affinity_timeout {
        d.push(format!(
            "affinity timeout {}, maps hold {}",
            want.affinity_timeout, got.affinity_timeout
        ));
    }
    if want.rev_nat != got.rev_nat {
        d.push(format!(
            "reverse NAT {:?}, maps hold {:?}",
            want.rev_nat, got.rev_nat
        ));
    }
    if want.slots != got.slots {
        d.push(format!(
            "backends [{}], maps hold [{}]",
            show_slots(&want.slots),
            show_slots(&got.slots)
        ));
    }
    d
}

/// Compares what the maps hold with the desired state, entry by entry.
pub fn check(desired: &DesiredState, maps: &MapContents) -> CheckReport {
    let want = expected(desired);
    let (got, mut differences) = actual(maps);
    let mut report = CheckReport {
        backends: maps.backends.ipv4.len() + maps.backends.ipv6.len(),
        rev_nat: maps.rev_nat.len(),
        ..Default::default()
    };
    let keys: BTreeSet<&(L4Addr, u8)> = want.frontends.keys().chain(got.frontends.keys()).collect();
    for key @ (f, scope) in keys {
        report.compared += 1;
        let what = format!("{f} {}", scope_name(*scope));
        match (want.frontends.get(key), got.frontends.get(key)) {
            (Some(w), Some(g)) => differences.extend(
                compare_scope(w, g)
                    .into_iter()
                    .map(|d| format!("{what}: {d}")),
            ),
            (Some(w), None) => differences.push(format!(
                "{what}: missing from the maps (want backends [{}])",
                show_slots(&w.slots)
            )),
            (None, Some(g)) => differences.push(format!(
                "{what}: in the maps but not desired (backends [{}])",
                show_slots(&g.slots)
            )),
            (None, None) => unreachable!("key from one of the two"),
        }
    }
    let keys: BTreeSet<_> = want
        .backend_match
        .keys()
        .chain(got.backend_match.keys())
        .collect();
    for key @ ((addr, port), b) in keys {
        report.compared += 1;
        let (w, g) = (want.backend_match.get(key), got.backend_match.get(key));
        if w != g {
            differences.push(format!(
                "backend match {addr}:{port} -> {b}: want {w:?}, maps hold {g:?}"
            ));
        }
    }
    for r in want.source_ranges.symmetric_difference(&got.source_ranges) {
        let side = if want.source_ranges.contains(r) {
            "missing from the maps"
        } else {
            "in the maps but not desired"
        };
        differences.push(format!(
            "source range {} of {}:{}: {side}",
            r.1, r.0 .0, r.0 .1
        ));
    }
    report.compared += want.source_ranges.len().max(got.source_ranges.len());
    report.differences = differences;
    report
}

#[cfg(test)]
mod tests {
    use lb_common::Service4Value;

    use super::*;
    use crate::{
        serve::metrics::Metrics,
        sync::differ::{master_key, slot_key, MapOp},
        sync::map_writer::MapWriter,
        sync::programmer::Programmer,
    };

    /// Maps that take every write; the programmer's record of them is
    /// what they hold.
    struct AcceptingMaps;

    impl MapWriter for AcceptingMaps {
        fn apply(&mut self, _: &MapOp) -> Result<(), crate::sync::map_writer::WriteError> {
            Ok(())
        }
    }

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_yaml::from_str(s).unwrap()
    }

    /// A Service with two ready endpoints and one terminating, programmed
    /// into in-memory maps by the real programmer.
    fn programmed() -> (DesiredState, MapContents) {
        let svc: k8s_openapi::api::core::v1::Service = yaml(
            "metadata: {name: web, namespace: default}\n\
             spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80, targetPort: 8080}]}",
        );
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = yaml(
            "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\n\
             ports: [{name: http, port: 8080, protocol: TCP}]\n\
             endpoints:\n\
             - {addresses: [10.244.0.10], conditions: {ready: true}}\n\
             - {addresses: [10.244.0.11], conditions: {ready: true}}\n\
             - {addresses: [10.244.0.12], conditions: {ready: false, serving: true, terminating: true}}\n",
        );
        let mut p = Programmer::new(AcceptingMaps, MapContents::default(), Metrics::new());
        let report = p.full_sync(
            &[crate::source::objects::ServiceInfo::from(svc)],
            &[crate::source::objects::SliceInfo::from(slice)],
        );
        assert!(report.errors.is_empty(), "{report:?}");
        (p.desired.clone(), p.current.clone())
    }

    /// A dual-stack Service, IPv6 first, with a slice of each family.
    fn programmed_dual_stack() -> (DesiredState, MapContents) {
        let svc: k8s_openapi::api::core::v1::Service = yaml(
            "metadata: {name: web, namespace: default}\n\
             spec: {clusterIP: 'fd00::30', clusterIPs: ['fd00::30', 10.96.0.30],\n\
               ipFamilies: [IPv6, IPv4], ports: [{port: 80}]}\n",
        );
        let slice = |family: &str, ips: &str| -> crate::source::objects::SliceInfo {
            let s: k8s_openapi::api::discovery::v1::EndpointSlice = yaml(&format!(
                "metadata: {{name: web-{family}, namespace: default,\n\
                   labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: {family}\n\
                 ports: [{{port: 8080}}]\n\
                 endpoints: [{ips}]\n"
            ));
            s.into()
        };
        let slices = [
            slice(
                "IPv4",
                "{addresses: [10.244.0.10]}, {addresses: [10.244.0.11]}",
            ),
            slice("IPv6", "{addresses: ['fd00:244::10']}"),
        ];
        let mut p = Programmer::new(AcceptingMaps, MapContents::default(), Metrics::new());
        let report = p.full_sync(&[crate::source::objects::ServiceInfo::from(svc)], &slices);
        assert!(report.errors.is_empty(), "{report:?}");
        (p.desired.clone(), p.current.clone())
    }

    #[test]
    fn both_families_are_compared_and_a_mixed_up_id_is_named() {
        let (desired, maps) = programmed_dual_stack();
        let r = check(&desired, &maps);
        assert!(r.is_equal(), "{r}");
        assert_eq!(r.backends, 3, "{r}");
        let v6 = L4Addr {
            addr: "fd00::30".parse().unwrap(),
            ..web()
        };
        // The IPv6 slot names IPv4 backend 2: the check resolves it in the
        // IPv6 array, where it is missing.
        let mut m = maps.clone();
        let slot = *m.services.get(&slot_key(&v6, 1)).unwrap();
        m.insert_service(
            slot_key(&v6, 1),
            Service4Value {
                backend_id: 2,
                ..slot
            },
        );
        let r = check(&desired, &m);
        assert!(
            r.differences
                .iter()
                .any(|d| d.contains("[fd00::30]:80/TCP external") && d.contains("<missing>")),
            "{r}"
        );
        // The IPv6 frontend gone from the maps.
        let mut m = maps;
        m.remove_service(&master_key(&v6));
        m.remove_service(&slot_key(&v6, 1));
        let r = check(&desired, &m);
        assert!(
            r.differences
                .iter()
                .any(|d| d.contains("[fd00::30]:80/TCP external: missing from the maps")),
            "{r}"
        );
    }

    fn web() -> L4Addr {
        L4Addr {
            addr: IpAddr::from([10, 96, 0, 30]),
            port: 80,
            proto: crate::model::Protocol::Tcp,
        }
    }

    #[test]
    fn programmed_maps_equal_the_desired_state() {
        let (desired, maps) = programmed();
        let r = check(&desired, &maps);
        assert!(r.is_equal(), "{r}");
        // One frontend scope, three backend-match entries.
        assert_eq!(r.compared, 4, "{r}");
    }

    #[test]
    fn every_kind_of_corruption_is_named() {
        let (desired, maps) = programmed();
        let find = |maps: &MapContents, what: &str| {
            let r = check(&desired, maps);
            assert!(
                r.differences.iter().any(|d| d.contains(what)),
                "want a difference mentioning {what:?}: {r}"
            );
        };
        // A slot pointing at another backend.
        let mut m = maps.clone();
        let other = *m.services.get(&slot_key(&web(), 2)).unwrap();
        m.insert_service(slot_key(&web(), 1), other);
        find(&m, "backends [");
        // A master with the wrong count.
        let mut m = maps.clone();
        let master = Service4Value {
            count: 1,
            ..*m.services.get(&master_key(&web())).unwrap()
        };
        m.insert_service(master_key(&web()), master);
        find(&m, "count 2+1 terminating, maps hold 1+1");
        // A frontend that should not exist.
        let mut m = maps.clone();
        let ghost = L4Addr { port: 81, ..web() };
        m.insert_service(master_key(&ghost), master);
        find(
            &m,
            "10.96.0.30:81/TCP external: in the maps but not desired",
        );
        // A backend nothing uses.
        let mut m = maps.clone();
        m.insert_backend(
            BackendId {
                family: Family::Ipv4,
                id: 999,
            },
            crate::sync::differ::BackendEntry {
                addr: IpAddr::from([10, 244, 9, 9]),
                port: 80,
                proto: 6,
                state: 0,
                zone: 0,
            },
        );
        find(&m, "backend 999 (10.244.9.9:80/TCP) is in no slot");
        // A lost backend-match entry.
        let mut m = maps.clone();
        let k = *m.backend_match.keys().next().unwrap();
        m.backend_match.remove(&k);
        find(&m, "maps hold None");
        // The whole frontend missing.
        let mut m = maps;
        for k in [
            master_key(&web()),
            slot_key(&web(), 1),
            slot_key(&web(), 2),
            slot_key(&web(), 3),
        ] {
            m.remove_service(&k);
        }
        find(&m, "10.96.0.30:80/TCP external: missing from the maps");
    }
}
