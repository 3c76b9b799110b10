//! Property test of translation, differ and writer together: random
//! Services and EndpointSlices, changed at random, programmed both by full
//! syncs and by incremental ones. After every step both fake maps must hold
//! exactly what translate's output (read independently, per Service) calls
//! for, as `lb-agent check` compares them: entry by entry, backend and
//! reverse NAT ids compared by what they name. Services are IPv4, IPv6 or
//! dual-stack, with slices of either family.

use std::collections::{BTreeMap, BTreeSet};

use crate::source::objects::{ServiceInfo, SliceInfo};
use proptest::{
    prelude::*,
    sample::select,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use serde_json::{json, Value};

use crate::{
    model::{DesiredState, Family, L4Addr, PerFamily, ServiceEntry, ServiceName},
    serve::metrics::Metrics,
    source::objects::ServiceChange,
    sync::checker,
    sync::differ::{plan_and_write, plan_scoped, IdLimits, MapContents},
    sync::map_writer::fake::CheckingWriter,
    sync::map_writer::record,
    sync::programmer::Programmer,
    test_objects::{service, slice},
    translate::{self, NodeInfo},
};

const SERVICES: usize = 5;
const SLICES_PER_SERVICE: usize = 2;

#[derive(Clone, Debug)]
struct PortSpec {
    name: &'static str,
    port: i32,
    proto: &'static str,
    node_port: i32,
}

#[derive(Clone, Debug)]
struct ServiceSpec {
    cluster_ip: &'static str,
    /// A second clusterIP (the other family, or not: bad input too).
    second_cluster_ip: Option<&'static str>,
    svc_type: &'static str,
    ports: Vec<PortSpec>,
    external_local: bool,
    internal_local: bool,
    affinity_timeout: Option<i32>,
    lb_ip: Option<&'static str>,
    source_range: Option<&'static str>,
    external_ip: Option<&'static str>,
    publish_not_ready: bool,
    prefer_close: bool,
}

#[derive(Clone, Debug)]
struct EndpointSpec {
    ip: &'static str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: &'static str,
    zone: Option<&'static str>,
}

#[derive(Clone, Debug)]
struct SliceSpec {
    address_type: &'static str,
    ports: Vec<(&'static str, i32, &'static str)>,
    endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Debug)]
enum Change {
    PutService(usize, ServiceSpec),
    DeleteService(usize),
    PutSlice(usize, usize, SliceSpec),
    DeleteSlice(usize, usize),
}

// Small pools, so Services collide on frontends and slices on addresses.
const CLUSTER_IPS: [&str; 13] = [
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.4",
    "10.96.0.5",
    "10.96.0.6",
    "10.96.0.300",
    "None",
    "fd00::96:1",
    "fd00::96:2",
    "fd00::96:1",
];
const SECOND_CLUSTER_IPS: [Option<&str>; 7] = [
    None,
    None,
    Some("fd00::96:1"),
    Some("fd00::96:3"),
    Some("fd00::96:2"),
    Some("10.96.0.1"),
    Some("fd00::96:zz"),
];
const PROTOS: [&str; 4] = ["TCP", "TCP", "UDP", "SCTP"];
const POD_IPS: [&str; 7] = [
    "10.244.0.1",
    "10.244.0.2",
    "10.244.0.3",
    "10.244.1.1",
    "10.244.1.2",
    "10.244.0.1",
    "fd00::1",
];

/// The address an endpoint drawn as `ip` has in a slice of `address_type`:
/// IPv6 slices get IPv6 twins of the pool, and one address of the other
/// family each way (an error for that endpoint).
fn slice_address(address_type: &str, ip: &'static str) -> &'static str {
    if address_type != "IPv6" {
        return ip;
    }
    match ip {
        "10.244.0.1" => "fd00:244::1",
        "10.244.0.2" => "fd00:244::2",
        "10.244.0.3" => "fd00:244::3",
        "10.244.1.1" => "fd00:244:1::1",
        "10.244.1.2" => "fd00:244:1::2",
        _ => "10.244.0.1",
    }
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (
        select(vec!["p0", "p1"]),
        select(vec![80, 80, 80, 65535, 0]),
        select(PROTOS.to_vec()),
        select(vec![30000, 30001, 65535]),
    )
        .prop_map(|(name, port, proto, node_port)| PortSpec {
            name,
            port,
            proto,
            node_port,
        })
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        (
            select(CLUSTER_IPS.to_vec()),
            select(SECOND_CLUSTER_IPS.to_vec()),
            select(vec![
                "ClusterIP",
                "ClusterIP",
                "NodePort",
                "LoadBalancer",
                "ExternalName",
            ]),
            prop::collection::vec(port_spec(), 1..3),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            select(vec![None, None, None, Some(30), Some(0)]),
            prop::option::of(select(vec!["192.0.2.1", "192.0.2.2", "2001:db8::1"])),
            prop::option::of(select(vec![
                "10.0.0.0/8",
                "0.0.0.0/0",
                "10.0.0.0/8",
                "10.1.0.0/40",
                "2001:db8::/32",
                "fd00::/129",
            ])),
            prop::option::of(select(vec!["198.51.100.1", "10.96.0.2", "2001:db8::7"])),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (cluster_ip, second_cluster_ip, svc_type, ports, external_local, internal_local),
                (
                    affinity_timeout,
                    lb_ip,
                    source_range,
                    external_ip,
                    publish_not_ready,
                    prefer_close,
                ),
            )| ServiceSpec {
                cluster_ip,
                second_cluster_ip,
                svc_type,
                ports,
                external_local,
                internal_local,
                affinity_timeout,
                lb_ip,
                source_range,
                external_ip,
                publish_not_ready,
                prefer_close,
            },
        )
}

fn endpoint_spec() -> impl Strategy<Value = EndpointSpec> {
    (
        select(POD_IPS.to_vec()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        select(vec!["n1", "n2"]),
        prop::option::of(select(vec!["z1", "z2"])),
    )
        .prop_map(
            |(ip, ready, serving, terminating, node, zone)| EndpointSpec {
                ip,
                ready,
                serving,
                terminating,
                node,
                zone,
            },
        )
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        select(vec!["IPv4", "IPv4", "IPv6"]),
        prop::collection::vec(
            (
                select(vec!["p0", "p1"]),
                select(vec![8080, 8080, 8080, 65535, 0]),
                select(PROTOS.to_vec()),
            ),
            1..4,
        ),
        prop::collection::vec(endpoint_spec(), 0..6),
    )
        .prop_map(|(address_type, ports, endpoints)| SliceSpec {
            address_type,
            ports,
            endpoints,
        })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0..SERVICES, service_spec()).prop_map(|(s, spec)| Change::PutService(s, spec)),
        1 => (0..SERVICES).prop_map(Change::DeleteService),
        4 => (0..SERVICES, 0..SLICES_PER_SERVICE, slice_spec())
            .prop_map(|(s, i, spec)| Change::PutSlice(s, i, spec)),
        1 => (0..SERVICES, 0..SLICES_PER_SERVICE).prop_map(|(s, i)| Change::DeleteSlice(s, i)),
    ]
}

fn service_name(i: usize) -> String {
    format!("s{i}")
}

fn service_object(i: usize, spec: &ServiceSpec) -> ServiceInfo {
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.proto, "nodePort": p.node_port}))
        .collect();
    let mut v = json!({
        "metadata": {"name": service_name(i), "namespace": "default"},
        "spec": {
            "type": spec.svc_type,
            "clusterIP": spec.cluster_ip,
            "ports": ports,
            "externalTrafficPolicy": if spec.external_local { "Local" } else { "Cluster" },
            "internalTrafficPolicy": if spec.internal_local { "Local" } else { "Cluster" },
            "publishNotReadyAddresses": spec.publish_not_ready,
        }
    });
    if let Some(second) = spec.second_cluster_ip {
        v["spec"]["clusterIPs"] = json!([spec.cluster_ip, second]);
    }
    if let Some(t) = spec.affinity_timeout {
        v["spec"]["sessionAffinity"] = json!("ClientIP");
        v["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    if let Some(ip) = spec.lb_ip {
        v["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
    }
    if let Some(r) = spec.source_range {
        v["spec"]["loadBalancerSourceRanges"] = json!([r]);
    }
    if let Some(ip) = spec.external_ip {
        v["spec"]["externalIPs"] = json!([ip]);
    }
    if spec.prefer_close {
        v["spec"]["trafficDistribution"] = json!("PreferClose");
    }
    service(v)
}

fn slice_object(svc: usize, i: usize, spec: &SliceSpec) -> SliceInfo {
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto}))
        .collect();
    let endpoints: Vec<Value> = spec
        .endpoints
        .iter()
        .map(|e| {
            let ip = slice_address(spec.address_type, e.ip);
            let mut v = json!({"addresses": [ip], "nodeName": e.node, "conditions": {
                "ready": e.ready, "serving": e.serving, "terminating": e.terminating}});
            if let Some(z) = e.zone {
                v["hints"] = json!({"forZones": [{"name": z}]});
            }
            v
        })
        .collect();
    slice(json!({
        "metadata": {"name": format!("{}-{i}", service_name(svc)), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name(svc)}},
        "addressType": spec.address_type,
        "ports": ports,
        "endpoints": endpoints
    }))
}

/// The objects as the API would hold them.
#[derive(Default)]
struct World {
    services: BTreeMap<usize, ServiceInfo>,
    slices: BTreeMap<(usize, usize), SliceInfo>,
}

impl World {
    /// Applies `c` and returns the Service it concerns.
    fn apply(&mut self, c: &Change) -> usize {
        match c {
            Change::PutService(s, spec) => {
                self.services.insert(*s, service_object(*s, spec));
                *s
            }
            Change::DeleteService(s) => {
                self.services.remove(s);
                *s
            }
            Change::PutSlice(s, i, spec) => {
                self.slices.insert((*s, *i), slice_object(*s, *i, spec));
                *s
            }
            Change::DeleteSlice(s, i) => {
                self.slices.remove(&(*s, *i));
                *s
            }
        }
    }

    fn slices_of(&self, s: usize) -> Vec<&SliceInfo> {
        self.slices
            .range((s, 0)..(s + 1, 0))
            .map(|(_, v)| v)
            .collect()
    }
}

/// The expected winners, computed without the programmer: every Service
/// translated on its own, a Service that fails as a whole keeps its last
/// good entries, and of two claims on one frontend the first name wins.
#[derive(Default)]
struct Oracle {
    last_good: BTreeMap<usize, Vec<ServiceEntry>>,
}

impl Oracle {
    fn expected(&mut self, node: &NodeInfo, world: &World) -> BTreeMap<L4Addr, ServiceEntry> {
        self.last_good.retain(|s, _| world.services.contains_key(s));
        for (s, svc) in &world.services {
            let mut errors = Vec::new();
            if let Ok(mut entries) = translate::translate_service(
                node,
                svc,
                &world.slices_of(*s),
                &mut errors,
                &mut Vec::new(),
            ) {
                // One Service listing a frontend twice: the last port wins.
                let mut seen = BTreeSet::new();
                entries.reverse();
                entries.retain(|e| seen.insert(e.frontend));
                self.last_good.insert(*s, entries);
            }
        }
        let mut winners: BTreeMap<L4Addr, ServiceEntry> = BTreeMap::new();
        for entries in self.last_good.values() {
            for e in entries {
                // last_good iterates in name order ("s0" < "s1" < ...).
                winners.entry(e.frontend).or_insert_with(|| e.clone());
            }
        }
        winners
    }
}

/// The desired state the maps must equal: the oracle's entries.
fn desired_state(entries: &BTreeMap<L4Addr, ServiceEntry>) -> DesiredState {
    let mut d = DesiredState::default();
    for e in entries.values() {
        d.insert(e.clone());
    }
    d
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "n1".into(),
        nodeport_addresses: vec!["10.0.0.1".parse().unwrap(), "fd00:1::1".parse().unwrap()],
        zone: Some("z1".into()),
        ipv6_off: false,
        // External frontends carry the Maglev flag through every plan.
        lb_algorithm: crate::model::LbAlgorithm::Maglev,
        lb_mode: crate::model::LbMode::Dsr,
    }
}

fn programmer() -> Programmer<CheckingWriter> {
    let mut p = Programmer::new(
        CheckingWriter::default(),
        MapContents::default(),
        Metrics::new(),
    );
    p.node = node();
    p
}

/// Applies `changes` one by one through both paths and checks each step.
fn check_changes(changes: &[Change]) -> Result<(), TestCaseError> {
    let mut world = World::default();
    let mut oracle = Oracle::default();
    let mut full = programmer();
    let mut incremental = programmer();
    for (n, c) in changes.iter().enumerate() {
        let s = world.apply(c);
        let name = ServiceName {
            namespace: "default".into(),
            name: service_name(s).into(),
        };
        let slices = world.slices_of(s);
        let report = incremental.sync_services(&[ServiceChange {
            name,
            service: world.services.get(&s),
            slices,
        }]);
        let services: Vec<&ServiceInfo> = world.services.values().collect();
        let slices: Vec<&SliceInfo> = world.slices.values().collect();
        let before = full.current.clone();
        let (desired_before, shadowed_before) = (full.desired.clone(), full.shadowed.clone());
        let full_report = full.full_sync(&services, &slices);
        let context = || format!("after change {n} ({c:?})");
        // A full sync re-translates Service by Service in place; the whole
        // translation at once (with the failed Services' entries carried
        // over) must agree.
        let mut bulk = translate::translate_on(&full.node, &services, &slices);
        translate::carry_over_failed(&mut bulk, &desired_before, &shadowed_before);
        prop_assert_eq!(
            &bulk.state,
            &full.desired,
            "{}: bulk translation",
            context()
        );
        prop_assert_eq!(
            &bulk.shadowed,
            &full.shadowed,
            "{}: bulk shadowed",
            context()
        );
        check_phased_planning(&before, &full.desired, &full.limits)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", context())))?;
        for (path, p, r) in [
            ("incremental", &incremental, &report),
            ("full", &full, &full_report),
        ] {
            prop_assert!(
                p.unprogrammed().is_empty(),
                "{}: {path} left frontends out: {:?} ({:?})",
                context(),
                p.unprogrammed(),
                r.errors
            );
            prop_assert_eq!(&p.current, &p.writer.maps, "{}: {} mirror", context(), path);
            prop_assert_eq!(
                p.current.entries_per_family(),
                counted_per_family(&p.current),
                "{}: {} entries per family",
                context(),
                path
            );
        }
        let expected = oracle.expected(&node(), &world);
        // The same entry-by-entry comparison `lb-agent check` makes, ids
        // compared by what they name.
        let want = desired_state(&expected);
        for (path, p) in [("incremental", &incremental), ("full", &full)] {
            let r = checker::check(&want, &p.writer.maps);
            prop_assert!(r.is_equal(), "{}: {} maps: {}", context(), path, r);
        }
        prop_assert_eq!(
            &incremental.desired,
            &full.desired,
            "{}: desired states differ",
            context()
        );
        COVERAGE.with(|c| {
            let mut c = c.borrow_mut();
            c.steps += 1;
            c.frontends += expected.len();
            let ipv6 = || expected.values().filter(|e| e.frontend.addr.is_ipv6());
            c.ipv6_frontends += ipv6().count();
            c.ipv6_backend_slots += ipv6().map(|e| e.all_backends().count()).sum::<usize>();
            c.ipv6_source_ranges += ipv6().map(|e| e.source_ranges.len()).sum::<usize>();
            let scopes = || {
                expected
                    .values()
                    .flat_map(|e| std::iter::once(&e.backends).chain(e.internal.as_ref()))
            };
            c.backend_slots += scopes().map(|set| set.all().count()).sum::<usize>();
            c.steps_with_contested_frontends += usize::from(!incremental.shadowed.is_empty());
            c.terminating_masters += scopes().filter(|set| !set.terminating.is_empty()).count();
            c.internal_scope_masters += expected.values().filter(|e| e.internal.is_some()).count();
            c.source_ranges += expected
                .values()
                .map(|e| e.source_ranges.len())
                .sum::<usize>();
            c.reported_errors += full_report.errors.len();
        });
        // Converged: nothing left to write.
        let again = crate::sync::differ::plan(&full.current, &full.desired);
        prop_assert!(again.ops.is_empty(), "{}: {:?}", context(), again.ops);
    }
    Ok(())
}

/// Planning in parts, each written before the next is planned (as syncs
/// do), gives the ops of one whole plan: for a full plan and for
/// one scoped to every frontend.
/// Service slots and reverse NAT entries of each family, counted.
fn counted_per_family(c: &MapContents) -> (PerFamily<usize>, PerFamily<usize>) {
    let mut slots = PerFamily::<usize>::default();
    let mut revs = PerFamily::<usize>::default();
    for key in c.services.keys() {
        slots[key.family()] += 1;
    }
    for r in c.rev_nat.values() {
        revs[Family::of(r.addr)] += 1;
    }
    (slots, revs)
}

fn check_phased_planning(
    current: &MapContents,
    desired: &DesiredState,
    limits: &IdLimits,
) -> Result<(), String> {
    let every: BTreeSet<L4Addr> = current
        .frontends()
        .chain(desired.entries().keys().copied())
        .collect();
    for scope in [None, Some(&every)] {
        let whole = plan_scoped(current, desired, scope, limits);
        let mut phased = Vec::new();
        let mut mirror = current.clone();
        // Parts of three writes: many part boundaries in small cases.
        let unplanned = plan_and_write(&mut mirror, desired, scope, limits, 3, |ops, maps| {
            for o in ops {
                record(maps, &o.op);
            }
            phased.extend_from_slice(ops);
        });
        if whole.ops != phased || whole.unplanned != unplanned {
            return Err(format!(
                "scope {:?}: phased planning differs:\nwhole {:?}\nphased {phased:?}",
                scope.map(BTreeSet::len),
                whole.ops
            ));
        }
    }
    Ok(())
}

/// What the generated cases exercised, so a generator that drifts into
/// trivial cases fails instead of passing quietly.
#[derive(Debug, Default)]
struct Coverage {
    steps: usize,
    frontends: usize,
    ipv6_frontends: usize,
    ipv6_backend_slots: usize,
    ipv6_source_ranges: usize,
    backend_slots: usize,
    steps_with_contested_frontends: usize,
    terminating_masters: usize,
    internal_scope_masters: usize,
    source_ranges: usize,
    reported_errors: usize,
}

thread_local! {
    static COVERAGE: std::cell::RefCell<Coverage> = std::cell::RefCell::new(Coverage::default());
}

#[test]
fn full_and_incremental_syncs_program_exactly_the_translation() {
    let config = Config {
        cases: 384,
        // Failures are shrunk and printed; nothing to persist in the tree.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let result = runner.run(&prop::collection::vec(change(), 1..32), |changes| {
        check_changes(&changes)
    });
    // A failing case stops the run early: its message says more than the
    // coverage of the cases before it.
    if let Err(e) = result {
        panic!("{e}");
    }
    COVERAGE.with(|c| {
        let c = c.borrow();
        eprintln!("384 cases (deterministic seed): {c:?}");
        assert!(
            c.backend_slots > 1000
                && c.steps_with_contested_frontends > 100
                && c.terminating_masters > 100
                && c.ipv6_backend_slots > 500
                && c.ipv6_source_ranges > 20,
            "the generator no longer reaches the interesting cases: {c:?}"
        );
    });
}
