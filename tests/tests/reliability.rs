//! Reliability under the changes a cluster goes through while clients keep
//! calling: rolling updates, agent crashes and upgrades, churn of other
//! Services, a full conntrack map. Every test counts every request and
//! prints `LOAD <what>: N requests, F failed, longest gap G ms` lines.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use lb_kube_fixtures::{
    apiserver::Resource,
    churn::{self, ApiChange as ChurnChange, ChurnService},
    rollout::{complete, next_steps, PodPhase, RolloutParams, RolloutPod, Step},
    workload::{self, LabObject},
};
use lb_lab::{
    kube_lab::{example, KubeLab},
    load::{Load, LoadKind, LoadReport, LoadSet},
    on_each_wire, privileged_test, Lab, Wire, NODE_NAME, NODE_WIRE_ADDR, NODE_WIRE_ADDR6,
};
use lb_userspace::model::Family;

on_each_wire!(
    a_rolling_update_under_load_fails_no_request,
    agent_kill_restart_and_upgrade_under_load_fail_no_connection,
    a_thousand_services_churning_for_a_minute_leave_the_stable_one_untouched_and_the_maps_exact,
    a_full_conntrack_map_evicts_idle_flows_only_and_deleted_backends_are_swept,
    a_flooded_affinity_map_keeps_active_clients_on_their_backend,
);

// The previous release attached XDP to the wire whatever it was, which
// corrupts partial checksums (the bug this release fixes): on a software
// wire it fails before any upgrade. So the upgrade runs on the NIC-like
// wire, twice: to XDP again (the program swapped in its pinned link), and
// to tc (`--wire-hook tc`, as auto chooses on a veth), which leaves the
// XDP link passing everything.
#[privileged_test]
fn an_upgrade_from_the_previous_release_keeping_xdp_under_load_fails_no_request() {
    an_upgrade_from_the_previous_release_under_load_fails_no_request("xdp");
}

#[privileged_test]
fn an_upgrade_from_the_previous_release_moving_to_tc_under_load_fails_no_request() {
    an_upgrade_from_the_previous_release_under_load_fails_no_request("tc");
}

/// A DaemonSet rolled back to the previous release. That release cannot
/// read this one's maps (32-bit reverse NAT ids, more counters): it
/// creates them anew, so connections open across the rollback may fail,
/// but it must take the node over and serve every Service.
#[privileged_test]
fn a_rollback_to_the_previous_release_takes_the_node_over() {
    let Some(previous) = previous_agent("a_rollback_to_the_previous_release_takes_the_node_over")
    else {
        return;
    };
    let this = AgentBuild {
        binary: None,
        // The previous release serves the wire with XDP only.
        flags: vec!["--wire-hook".into(), "xdp".into()],
    };
    let previous = AgentBuild {
        binary: Some(previous.into()),
        flags: Vec::new(),
    };
    let (k, across) = roll_the_agent_under_load(this, previous);
    k.wait_readyz(200, Duration::from_secs(30));
    let log = k.lab.agent_log();
    assert!(
        log.contains("lb4_reverse_nat has another layout"),
        "the previous release re-creates the maps whose layout this one changed: {log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let reports = across.finish();
    let failed: usize = reports.iter().map(|r| r.failed.len()).sum();
    println!("requests failed across the rollback: {failed}");
    // Every client started after the rollback gets through.
    let mut after = web_clients(&k.lab, 40_000);
    add_sticky_web_clients(&mut after, &k.lab);
    std::thread::sleep(Duration::from_secs(2));
    let reports = after.finish_and_assert_none_failed();
    assert!(
        reports.iter().all(|r| r.sent > 10),
        "each client sent requests"
    );
}

/// An agent to run: a binary (None: this build) and its flags.
struct AgentBuild {
    binary: Option<std::path::PathBuf>,
    flags: Vec<String>,
}

/// A DaemonSet rollout from `from` to `to` on the NIC-like wire while the
/// web Services' clients run: `from` serves, gets SIGTERM, and `to`
/// starts. Returns the lab and the clients, still running.
fn roll_the_agent_under_load(from: AgentBuild, to: AgentBuild) -> (KubeLab, LoadSet) {
    let mut k = KubeLab::from_manifests_on(Wire::Nic, &[example("rolling-update.yaml")]);
    k.publish();
    publish_sticky_web(&k);
    k.lab.agent_binary = from.binary;
    k.lab.agent_defaults = from.flags;
    k.start_agent();
    // Its readiness says it wrote its maps (the previous release's maps
    // have layouts this version's readers do not read).
    k.wait_readyz(200, Duration::from_secs(30));
    let mut clients = web_clients(&k.lab, 40_000);
    add_sticky_web_clients(&mut clients, &k.lab);
    std::thread::sleep(Duration::from_secs(1));
    k.lab.stop_agent();
    k.lab.agent_binary = to.binary;
    k.lab.agent_defaults = to.flags;
    k.start_agent();
    (k, clients)
}

/// The previous release's agent, or None (and a SKIPPED line) where it
/// cannot be built; under CI it must be there.
fn previous_agent(test: &str) -> Option<std::ffi::OsString> {
    let previous = std::env::var_os(PREVIOUS_AGENT);
    if previous.is_none() {
        let why = std::env::var(PREVIOUS_AGENT_UNAVAILABLE).ok();
        assert!(!(std::env::var("CI").as_deref() == Ok("true") && why.is_none()), "{PREVIOUS_AGENT} is not set: run the tests with `cargo xtask test`, which builds the previous release");
        println!(
            "SKIPPED {test}: {}",
            why.unwrap_or_else(|| format!("{PREVIOUS_AGENT} is not set (`cargo xtask test` builds the previous release and sets it)"))
        );
    }
    previous
}

const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 80);
const WEB_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_WIRE_ADDR, 30081);
const WEB6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30), 80, 0, 0);
const WEB6_NODE_PORT: SocketAddrV6 = SocketAddrV6::new(NODE_WIRE_ADDR6, 30081, 0, 0);
const WEB_OWNER: &str = "Deployment/web";

/// New connections every 5 ms and a long-lived connection (a request every
/// 10 ms) to the Service's ClusterIP from the client pod and to its NodePort
/// from the external client, over IPv4.
fn web_clients(lab: &Lab, max: usize) -> LoadSet {
    let mut set = LoadSet::default();
    add_web_clients(&mut set, lab, max, (WEB.into(), WEB_NODE_PORT.into()));
    set
}

/// The same clients over both families: the Service is dual-stack.
fn dual_stack_web_clients(lab: &Lab, max: usize) -> LoadSet {
    let mut set = web_clients(lab, max);
    add_web_clients(&mut set, lab, max, (WEB6.into(), WEB6_NODE_PORT.into()));
    set
}

/// The clients of one family, to (ClusterIP, NodePort).
fn add_web_clients(set: &mut LoadSet, lab: &Lab, max: usize, to: (SocketAddr, SocketAddr)) {
    let five = Duration::from_millis(5);
    let ten = Duration::from_millis(10);
    let family = if to.0.is_ipv6() { "IPv6" } else { "IPv4" };
    for (ns, to, via) in [
        (lab.client.ns.path(), to.0, "ClusterIP"),
        (lab.ext.path(), to.1, "NodePort"),
    ] {
        set.add(Load::start(
            ns.clone(),
            to,
            LoadKind::NewConnections,
            &format!("{family} {via} new connections"),
            five,
            max,
        ));
        set.add(Load::start(
            ns,
            to,
            LoadKind::LongLived,
            &format!("{family} {via} long-lived connection"),
            ten,
            max,
        ));
    }
}

fn web_lab(wire: Wire) -> KubeLab {
    web_lab_with(wire, &[])
}

/// `web_lab` with the agent given `extra` flags.
fn web_lab_with(wire: Wire, extra: &[&str]) -> KubeLab {
    let mut k = KubeLab::from_manifests_on(wire, &[example("rolling-update.yaml")]);
    assert_eq!(k.lab.pods_of(WEB_OWNER).len(), 4, "4 replicas");
    k.publish();
    k.start_agent_extra(extra);
    let pods = k.lab.pods_of(WEB_OWNER);
    k.wait_programmed(WEB, Some(k.pod_ips(&pods)), "initial");
    k
}

/// The Deployment's next version: the same objects with a changed image,
/// so the pods get a new pod-template-hash, names and (free) addresses.
fn next_version_pods(lab: &Lab) -> Vec<workload::LabPod> {
    let mut objects: Vec<LabObject> = lab
        .state
        .objects
        .iter()
        .filter(|o| matches!(o, LabObject::Deployment(_)))
        .cloned()
        .collect();
    for o in &mut objects {
        if let LabObject::Deployment(d) = o {
            let c = &mut d
                .spec
                .as_mut()
                .unwrap()
                .template
                .spec
                .as_mut()
                .unwrap()
                .containers[0];
            c.image = Some("registry.k8s.io/e2e-test-images/agnhost:2.48".into());
        }
    }
    let taken: BTreeSet<Ipv4Addr> = lab.state.pod_specs.iter().map(|p| p.ip).collect();
    let mut free = (20u8..=250)
        .map(|i| Ipv4Addr::new(10, 244, 0, i))
        .filter(|ip| !taken.contains(ip));
    let mut pods = workload::pods_for_workloads(&objects, &mut free, NODE_NAME).unwrap();
    for p in &mut pods {
        p.ready = false;
    }
    pods
}

/// The pods that answered requests (`answered_by`) of these reports.
fn answered(reports: &[LoadReport]) -> BTreeMap<String, usize> {
    let mut all = BTreeMap::new();
    for r in reports {
        for (pod, n) in &r.answered_by {
            *all.entry(pod.clone()).or_insert(0) += n;
        }
    }
    all
}

/// On the NIC-like wire the external frontends pick by Maglev: their
/// tables are rebuilt as the slots change under the clients' NodePort
/// load (the software wire keeps random selection).
fn a_rolling_update_under_load_fails_no_request(wire: Wire) {
    let maglev = wire == Wire::Nic;
    let mut k = web_lab_with(
        wire,
        if maglev {
            &["--lb-algorithm", "maglev"]
        } else {
            &[]
        },
    );
    if maglev {
        let hashed = k
            .snapshot()
            .iter()
            .filter(|s| s.lb_algorithm == lb_userspace::model::LbAlgorithm::Maglev)
            .count();
        assert!(hashed >= 2, "the NodePorts of both families are Maglev's");
    }
    let deployment = k
        .lab
        .state
        .objects
        .iter()
        .find_map(|o| match o {
            LabObject::Deployment(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    let params = RolloutParams::from_deployment(&deployment).expect("rollout parameters");
    let old_names = k.lab.pods_of(WEB_OWNER);
    let mut new_specs = next_version_pods(&k.lab).into_iter();
    let clients = dual_stack_web_clients(&k.lab, 20_000);
    std::thread::sleep(Duration::from_millis(500));

    // The clock starts with the old pods long available.
    let start = Instant::now()
        .checked_sub(params.min_ready + Duration::from_secs(1))
        .expect("the clock is past the readiness delay");
    let mut pods: Vec<RolloutPod> = old_names
        .iter()
        .map(|n| RolloutPod {
            name: n.clone(),
            new: false,
            phase: PodPhase::Ready,
            since: Duration::ZERO,
        })
        .collect();
    let mut terminated_at = BTreeMap::new();
    let mut new_names = Vec::new();
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        assert!(Instant::now() < deadline, "rollout stuck: {pods:#?}");
        let now = start.elapsed();
        if complete(&params, &pods, now) {
            break;
        }
        let steps = next_steps(&params, &pods, now);
        for step in &steps {
            match step {
                Step::CreateNew => {
                    let spec = new_specs.next().expect("one new pod per replica");
                    println!("{now:?}: create {} (not ready)", spec.name);
                    new_names.push(spec.name.clone());
                    pods.push(RolloutPod {
                        name: spec.name.clone(),
                        new: true,
                        phase: PodPhase::Starting,
                        since: now,
                    });
                    k.lab.add_pod(spec).expect("start a new pod");
                }
                Step::MarkReady(name) => {
                    println!("{now:?}: {name} ready");
                    k.lab.set_pod_ready(name, true);
                    let p = pods.iter_mut().find(|p| &p.name == name).unwrap();
                    p.phase = PodPhase::Ready;
                    p.since = now;
                }
                Step::Terminate(name) => {
                    // The kubelet's SIGTERM and the EndpointSlice update race
                    // in a cluster; here the signal goes first.
                    println!("{now:?}: terminate {name}");
                    k.lab.terminate_pod(name);
                    terminated_at.insert(name.clone(), Instant::now());
                    let p = pods.iter_mut().find(|p| &p.name == name).unwrap();
                    p.phase = PodPhase::Terminating;
                    p.since = now;
                }
                Step::Remove(name) => {
                    println!("{now:?}: grace over, kill and remove {name}");
                    k.lab.remove_pod(name);
                    pods.retain(|p| &p.name != name);
                }
            }
        }
        if !steps.is_empty() {
            k.publish();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rollout_took = start
        .elapsed()
        .saturating_sub(params.min_ready + Duration::from_secs(1));
    // Some traffic on the finished state before the clients stop.
    std::thread::sleep(Duration::from_millis(500));
    let reports = clients.finish_and_assert_none_failed();
    println!("rollout took {rollout_took:?}");

    let by = answered(&reports);
    for n in &new_names {
        assert!(by.contains_key(n), "new pod {n} got traffic: {by:?}");
    }
    k.wait_programmed(
        WEB,
        Some(k.pod_ips(&new_names)),
        "after the rollout only new pods",
    );
    // The maps, and with Maglev every table, are what the Services say.
    let (equal, text) = k.check(if maglev {
        &["--lb-algorithm", "maglev"]
    } else {
        &[]
    });
    assert!(equal, "{text}");
    // Long-lived connections were closed by their terminating servers
    // (" bye") and opened again: at least once each, never failed.
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert!(r.connections >= 2, "{r}");
    }
    // Terminating pods get no new connections once the agent has seen the
    // EndpointSlice (within milliseconds here; 2 s allowed for a slow
    // machine, still short of their 3 s grace period).
    for r in reports
        .iter()
        .filter(|r| r.what.contains("new connections"))
    {
        for (pod, at) in &terminated_at {
            if let Some(last) = r.last_answer.get(pod) {
                let after = last.saturating_duration_since(*at);
                println!(
                    "{}: {pod} answered a new connection {after:?} after its termination began",
                    r.what
                );
                assert!(
                    after < Duration::from_secs(2),
                    "{}: terminating {pod} still got new connections {after:?} after SIGTERM",
                    r.what
                );
            }
        }
    }
}

/// A long-lived connection that keeps its one connection (no reconnect)
/// and its one backend through everything.
fn assert_kept_its_backend(r: &LoadReport) {
    assert_eq!(r.connections, 1, "{r}");
    assert_eq!(
        r.answered_by.len(),
        1,
        "one backend for the whole connection: {r}"
    );
}

/// Both families' conntrack maps, sized by --conntrack-max.
const CONNTRACK_MAPS: [&str; 2] = [
    lb_common::map_names::CONNTRACK,
    lb_common::map_names::CONNTRACK6,
];

fn agent_kill_restart_and_upgrade_under_load_fail_no_connection(wire: Wire) {
    let mut k = web_lab(wire);
    let clients = dual_stack_web_clients(&k.lab, 40_000);
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        k.lab.kill_agent();
        std::thread::sleep(Duration::from_millis(300));
        k.start_agent();
        assert!(
            k.lab.agent_log().contains("adopted pinned maps"),
            "round {round}: the restarted agent adopts the pinned maps"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // An upgrade that changes a map's layout: the new agent sizes its
    // conntrack map differently, so the pinned one cannot be adopted. The
    // old programs keep serving until the new maps are filled; flows keep
    // their backends across the switch.
    k.lab.kill_agent();
    k.start_agent_extra(&["--conntrack-max", "65536"]);
    let log = k.lab.agent_log();
    for map in CONNTRACK_MAPS {
        assert!(
            log.contains(&format!(
                "pinned map {} has another layout: its entries are copied to a new one",
                k.lab.pin_dir.join(map).display()
            )),
            "{map} is migrated:\n{log}"
        );
        let shown = lb_lab::run(&[
            "bpftool",
            "-j",
            "map",
            "show",
            "pinned",
            k.lab.pin_dir.join(map).to_str().unwrap(),
        ])
        .expect("bpftool map show");
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(
            shown["max_entries"], 65536,
            "{map}: the new size is in place: {shown}"
        );
    }
    let wait = Instant::now() + Duration::from_secs(10);
    while !k
        .lab
        .agent_log()
        .contains("migration of pinned maps finished")
    {
        assert!(
            Instant::now() < wait,
            "migration never finished:\n{}",
            k.lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for map in CONNTRACK_MAPS {
        assert!(
            !k.lab.pin_dir.join(format!("{map}_old")).exists(),
            "{map}: the old map's pin is gone after the migration"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    // And back to the default size, the same way.
    k.lab.kill_agent();
    k.start_agent();
    let wait = Instant::now() + Duration::from_secs(10);
    while k
        .lab
        .agent_log()
        .matches("migration of pinned maps finished")
        .count()
        < 2
    {
        assert!(
            Instant::now() < wait,
            "second migration never finished:\n{}",
            k.lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let reports = clients.finish_and_assert_none_failed();
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert_kept_its_backend(r);
    }
    let pods = k.lab.pods_of(WEB_OWNER);
    k.wait_programmed(WEB, Some(k.pod_ips(&pods)), "after the restarts");
}

fn apply_changes(k: &KubeLab, changes: Vec<ChurnChange>) {
    let mut apply = Vec::new();
    for c in changes {
        match c {
            ChurnChange::Apply(v) => apply.push(v),
            ChurnChange::Delete(kind, name) => {
                let resource = if kind == "Service" {
                    Resource::Services
                } else {
                    Resource::EndpointSlices
                };
                k.api.delete(resource, churn::NAMESPACE, &name);
            }
        }
    }
    k.api.apply_all(&apply).expect("apply");
}

fn a_thousand_services_churning_for_a_minute_leave_the_stable_one_untouched_and_the_maps_exact(
    wire: Wire,
) {
    const SERVICES: usize = 1000;
    const SEED: u64 = 0x5eed_1b07;
    let churn_for = Duration::from_mins(1);
    let mut k = KubeLab::from_manifests_on(wire, &[example("rolling-update.yaml")]);
    k.publish();
    let mut rng = churn::Rng::new(SEED);
    let mut services: Vec<ChurnService> = (0..SERVICES).map(ChurnService::new).collect();
    for s in &mut services {
        s.mutate(&mut rng);
        s.exists = true;
    }
    apply_changes(
        &k,
        services
            .iter()
            .flat_map(lb_kube_fixtures::churn::ChurnService::objects)
            .collect(),
    );
    k.start_agent();
    let pods = k.lab.pods_of(WEB_OWNER);
    k.wait_programmed(WEB, Some(k.pod_ips(&pods)), "initial");
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, text) = k.check(&[]);
        if ok {
            println!("before the churn: {text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never converged before the churn: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let clients = web_clients(&k.lab, 40_000);
    let started = Instant::now();
    let (mut rounds, mut changed) = (0usize, BTreeMap::<&str, usize>::new());
    // Bounded by time and by rounds: 20 Services every 50 ms.
    while started.elapsed() < churn_for && rounds < 5_000 {
        rounds += 1;
        let mut batch = Vec::new();
        for _ in 0..20 {
            let s = &mut services[rng.below(SERVICES as u64) as usize];
            *changed.entry(s.mutate(&mut rng)).or_default() += 1;
            batch.extend(s.objects());
        }
        apply_changes(&k, batch);
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "churn: seed {SEED:#x}, {rounds} rounds in {:?}, changes {changed:?}",
        started.elapsed()
    );
    // The agent catches up; then the maps must equal the desired state.
    let deadline = Instant::now() + Duration::from_mins(1);
    let converged = loop {
        let (ok, text) = k.check(&[]);
        if ok {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "maps never equalled the desired state after the churn:\n{text}\n{}",
            k.lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("after the churn: {converged}");
    assert!(
        converged.contains("maps equal the desired state"),
        "{converged}"
    );
    let reports = clients.finish_and_assert_none_failed();
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert_kept_its_backend(r);
    }

    // The check can fail: one master slot removed behind the agent's back
    // is named.
    let victim = services
        .iter()
        .find(|s| s.exists)
        .expect("a Service exists");
    let frontend = lb_userspace::model::L4Addr {
        addr: victim.cluster_ip().into(),
        port: victim.port,
        proto: lb_userspace::model::Protocol::Tcp,
    };
    let mut maps = lb_userspace::datapath::loader::open_pinned(&k.lab.pin_dir).expect("open maps");
    lb_userspace::sync::map_writer::MapWriter::apply(
        &mut maps,
        &lb_userspace::sync::differ::MapOp::DeleteService(lb_userspace::sync::differ::master_key(
            &frontend,
        )),
    )
    .expect("delete a master slot");
    let (ok, text) = k.check(&[]);
    assert!(!ok, "a missing frontend fails the check: {text}");
    assert!(
        text.contains(&format!("{frontend} external: missing from the maps")),
        "{text}"
    );
}

const NGINX_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const METRICS: &str = "127.0.0.1:10249";
const METRICS_PORT: u16 = 10249;

/// The value of `name` (samples matching every part, summed); it must be
/// exported.
fn metric(text: &str, name: &str, parts: &[&str]) -> f64 {
    assert!(
        text.lines()
            .any(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p))),
        "no metric {name} {parts:?} in:\n{text}"
    );
    lb_lab::metric_sum(text, name, parts)
}

/// A restarted agent sweeps at once what its predecessor left. An entry
/// whose backend id is free (the backend deleted just before the stop,
/// the old agent's sweep not yet run) must go when the new agent starts,
/// not an interval later: by then a sync may have handed its id to another
/// backend, and the entry would send its flow there.
#[privileged_test]
fn a_restarted_agent_sweeps_what_its_predecessor_left_at_once() {
    let mut lab = Lab::from_manifest_files(&[example("nginx-deployment.yaml")]).expect("lab");
    let flags = [
        "--conntrack-sweep-interval",
        "1h",
        "--metrics-addr",
        METRICS,
    ];
    lab.agent().flags(&flags).start().expect("start the agent");
    lab.stop_agent();
    put_stale_conntrack_entry(&lab, STALE_BACKEND_ID);
    assert_eq!(conntrack_entries_of(&lab, STALE_BACKEND_ID), 1);
    lab.agent()
        .flags(&flags)
        .start()
        .expect("restart the agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = 1;
    while Instant::now() < deadline {
        left = conntrack_entries_of(&lab, STALE_BACKEND_ID);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(left, 0, "the entry of a free backend id was swept at start");
    let m = lab.scrape_metrics(METRICS_PORT);
    let swept = metric(&m, "lb_conntrack_swept_total", &["backend_gone"]);
    assert!(swept >= 1.0, "the sweep counted it: {swept}");
}

/// A backend id no backend of the lab has.
const STALE_BACKEND_ID: u32 = 1000;

/// A fresh UDP conntrack entry of a flow to backend `id`, as an agent
/// leaves it when it stops right after deleting that backend.
fn put_stale_conntrack_entry(lab: &Lab, id: u32) {
    let key = lb_common::Ct4Key {
        saddr: u32::from(Ipv4Addr::new(172, 31, 9, 9)).to_be(),
        daddr: u32::from(*NGINX_UDP.ip()).to_be(),
        sport: 40_000u16.to_be(),
        dport: NGINX_UDP.port().to_be(),
        proto: lb_common::IPPROTO_UDP,
        direction: lb_common::CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let value = lb_common::Ct4Value {
        last_seen_ns: lb_userspace::datapath::conntrack_sweep::monotonic_ns(),
        backend_id: id,
        ..Default::default()
    };
    pinned_conntrack(lab)
        .insert(key, value, 0)
        .expect("put the entry");
}

/// The lab's pinned IPv4 conntrack map.
fn pinned_conntrack(
    lab: &Lab,
) -> aya::maps::HashMap<aya::maps::MapData, lb_common::Ct4Key, lb_common::Ct4Value> {
    let pin = lab.pin_dir.join(lb_common::map_names::CONNTRACK);
    let data = aya::maps::MapData::from_pin(&pin).expect("open conntrack");
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("conntrack map")
}

/// Conntrack entries that name backend `id`.
fn conntrack_entries_of(lab: &Lab, id: u32) -> usize {
    pinned_conntrack(lab)
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.backend_id == id)
        .count()
}

/// New UDP flows from `flows` distinct source ports of the client pod, each
/// one datagram (answers are not awaited).
fn fill_conntrack(lab: &Lab, to: impl Into<SocketAddr>, flows: u16) -> usize {
    let to = to.into();
    let any: IpAddr = if to.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    lab.client.ns.run_in(|| {
        let mut sent = 0;
        for port in 20_000..20_000 + flows {
            let Ok(s) = std::net::UdpSocket::bind((any, port)) else {
                continue;
            };
            if s.send_to(b"fill", to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

/// `fill_conntrack` twice, 200 ms apart; the flows sent.
fn fill_conntrack_twice(lab: &Lab, to: impl Into<SocketAddr> + Copy, flows: u16) -> usize {
    (0..2)
        .map(|_| {
            let sent = fill_conntrack(lab, to, flows);
            std::thread::sleep(Duration::from_millis(200));
            sent
        })
        .sum()
}

/// The conntrack map the pressure tests fill: a small one, swept every
/// second.
const CAPACITY: usize = 4096;

/// A lab of `examples` whose agent has a `CAPACITY`-entry conntrack map
/// per family, swept every second, and serves metrics.
fn conntrack_pressure_lab(wire: Wire, examples: [&str; 2]) -> Lab {
    let examples = examples.map(example);
    let mut lab = Lab::from_manifest_files_on(wire, &examples).expect("build the lab");
    lab.agent()
        .flags(&[
            "--conntrack-max",
            &CAPACITY.to_string(),
            "--conntrack-sweep-interval",
            "1s",
            "--metrics-addr",
            METRICS,
        ])
        .start()
        .expect("start the agent");
    lab
}

/// A UDP client asking `to` every 10 ms from the client pod.
fn udp_flow(lab: &Lab, to: impl Into<SocketAddr>, what: &str) -> Load {
    let ten = Duration::from_millis(10);
    Load::start(
        lab.client.ns.path(),
        to,
        LoadKind::UdpFlow,
        what,
        ten,
        40_000,
    )
}

fn a_full_conntrack_map_evicts_idle_flows_only_and_deleted_backends_are_swept(wire: Wire) {
    const FILL_FLOWS: u16 = 20_000;
    let mut lab = conntrack_pressure_lab(wire, ["nginx-deployment.yaml", "rolling-update.yaml"]);
    let mut clients = web_clients(&lab, 40_000);
    clients.add(udp_flow(&lab, NGINX_UDP, "UDP flow"));
    std::thread::sleep(Duration::from_millis(500));

    // Five times the map's size in new flows, twice over.
    let filled = fill_conntrack_twice(&lab, NGINX_UDP, FILL_FLOWS);
    println!("filler: {filled} new UDP flows into a conntrack map of {CAPACITY} entries");
    assert!(filled > 30_000, "the filler ran: {filled}");

    // A backend deleted: its entries are swept, and a UDP flow on it
    // moves to another backend without a lost answer.
    let nginx_pods = lab.pods_of("Deployment/nginx-deployment");
    let stale_flow = lab.client.ns.run_in(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let ask = |s: &std::net::UdpSocket, n: usize| {
        s.send_to(format!("stale {n}").as_bytes(), NGINX_UDP)
            .expect("send");
        let mut buf = [0u8; 256];
        let (len, _) = s
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("stale UDP flow, request {n}: no answer: {e}"));
        String::from_utf8_lossy(&buf[..len]).into_owned()
    };
    let victim = ask(&stale_flow, 0);
    assert!(nginx_pods.contains(&victim), "{victim}");
    let victim_ip = lab.pods[&victim].ip;
    let maps = lb_userspace::datapath::loader::open_pinned(&lab.pin_dir).expect("maps");
    let victim_id = maps
        .read_contents()
        .expect("read maps")
        .backend_id(&lb_userspace::model::L4Addr {
            addr: victim_ip.into(),
            port: 80,
            proto: lb_userspace::model::Protocol::Udp,
        })
        .expect("the victim's backend id");
    let before = conntrack_entries_of(&lab, victim_id);
    assert!(before > 0, "the filler left entries on {victim}");
    lab.state.excluded.insert(victim.clone());
    lab.apply_manifests().expect("remove the victim's endpoint");
    lab.remove_pod(&victim);
    let mut answers = Vec::new();
    for n in 1..=50 {
        answers.push(ask(&stale_flow, n));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        answers
            .iter()
            .all(|a| a != &victim && nginx_pods.contains(a)),
        "the stale UDP flow moved to a live backend: {answers:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut left = before;
    while Instant::now() < deadline {
        left = conntrack_entries_of(&lab, victim_id);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("entries of the deleted backend: {before} before, {left} after the sweep");
    assert_eq!(left, 0, "the sweep removed the deleted backend's entries");

    std::thread::sleep(Duration::from_secs(2));
    let reports = clients.finish_and_assert_none_failed();
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert_kept_its_backend(r);
    }
    let m = lab.scrape_metrics(METRICS_PORT);
    let inserted = metric(&m, "lb_datapath_packets_total", &["ct_inserted"]);
    let evictions = metric(&m, "lb_conntrack_evictions_total", &[]);
    let present = metric(&m, "lb_conntrack_entries", &[]);
    let swept = metric(&m, "lb_conntrack_swept_total", &["backend_gone"]);
    println!(
        "conntrack: {inserted} entries inserted, {evictions} evicted, {present} present, {swept} swept (backend gone)"
    );
    assert!(present <= CAPACITY as f64, "{present}");
    assert!(
        evictions >= inserted - CAPACITY as f64 - swept - 1000.0 && evictions > 0.0,
        "evictions counted: {evictions} of {inserted} inserted"
    );
    // Some of the victim's entries may have been evicted before the sweep
    // (the clients keep adding entries), most not.
    assert!(
        swept >= before as f64 / 2.0,
        "the sweep removed most of the {before} entries and counted them: {swept}"
    );
}

/// The IPv6 side of examples/dual-stack.yaml's `echo` Service (UDP 80).
const ECHO6_UDP: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x40), 80, 0, 0);

/// The IPv6 conntrack map under the same pressure (software wire): five
/// times its size in new IPv6 UDP flows while IPv6 clients (TCP ClusterIP,
/// NodePort, long-lived, and a UDP flow) keep working; its evictions are
/// counted as IPv6's, and IPv4's stay at zero.
#[privileged_test]
fn a_full_ipv6_conntrack_map_evicts_idle_flows_only() {
    let lab = conntrack_pressure_lab(Wire::Software, ["dual-stack.yaml", "rolling-update.yaml"]);
    let mut clients = LoadSet::default();
    add_web_clients(
        &mut clients,
        &lab,
        40_000,
        (WEB6.into(), WEB6_NODE_PORT.into()),
    );
    clients.add(udp_flow(&lab, ECHO6_UDP, "IPv6 UDP flow"));
    std::thread::sleep(Duration::from_millis(500));
    let filled = fill_conntrack_twice(&lab, ECHO6_UDP, 10_000);
    println!("filler: {filled} new IPv6 UDP flows into a conntrack map of {CAPACITY} entries");
    assert!(filled > 15_000, "the filler ran: {filled}");
    std::thread::sleep(Duration::from_secs(3));
    let reports = clients.finish_and_assert_none_failed();
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert_kept_its_backend(r);
    }
    let m = lab.scrape_metrics(METRICS_PORT);
    let of = |name: &str, parts: &[&str], family: &str| {
        let label = format!("family=\"{family}\"");
        let mut parts = parts.to_vec();
        parts.push(&label);
        metric(&m, name, &parts)
    };
    let inserted = of("lb_datapath_packets_total", &["ct_inserted"], "ipv6");
    let evictions = of("lb_conntrack_evictions_total", &[], "ipv6");
    let present = of("lb_conntrack_entries", &[], "ipv6");
    println!("IPv6 conntrack: {inserted} entries inserted, {evictions} evicted, {present} present");
    assert!(present <= CAPACITY as f64, "{present}");
    assert!(
        evictions >= inserted - CAPACITY as f64 - 1000.0 && evictions > 0.0,
        "evictions counted as IPv6's: {evictions} of {inserted} inserted"
    );
    let evicted4 = of("lb_conntrack_evictions_total", &[], "ipv4");
    assert!(evicted4 < 0.5, "no IPv4 flow was evicted: {evicted4}");
}

const STICKY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);
const STICKY6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11), 80, 0, 0);

/// Gives the external client `n` more addresses in 10.78.0.0/16 (and the
/// node a route back to them): `n` more clients.
/// `n` addresses of `family` on the external client, routed to from the
/// node: that many clients.
fn add_client_addresses(lab: &Lab, n: u16, family: Family) -> Vec<IpAddr> {
    let addrs: Vec<IpAddr> = (0..n)
        .map(|i| match family {
            Family::Ipv4 => Ipv4Addr::new(10, 78, (i / 250) as u8, (i % 250 + 1) as u8).into(),
            Family::Ipv6 => Ipv6Addr::new(0xfd00, 0x7a, 0, 0, 0, 0, 1, i + 1).into(),
        })
        .collect();
    let batch: String = addrs.iter().fold(String::new(), |mut batch, a| {
        use std::fmt::Write;
        // IPv6: no duplicate address detection, so they are usable at once;
        // deprecated (preferred_lft 0), so the client's own connections
        // keep its address: source selection (RFC 6724) would otherwise
        // pick any of them. Bound explicitly, they still send.
        let _ = match a {
            IpAddr::V4(a) => writeln!(batch, "addr add {a}/32 dev eth0"),
            IpAddr::V6(a) => writeln!(batch, "addr add {a}/128 dev eth0 nodad preferred_lft 0"),
        };
        batch
    });
    let path = lab.dir.join("client-addrs");
    std::fs::write(&path, batch).unwrap();
    lb_lab::run(&["ip", "-n", &lab.ext.name, "-batch", path.to_str().unwrap()])
        .expect("add client addresses");
    let route: &[&str] = match family {
        Family::Ipv4 => &["ip", "route", "add", "10.78.0.0/16", "via", "10.77.0.2"],
        Family::Ipv6 => &[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:7a::/64",
            "via",
            "fd00:77::2",
        ],
    };
    lab.node.exec(route).expect("route to the clients");
    addrs
}

/// One UDP datagram to `to` from each address: that many new clients of a
/// ClientIP-affinity Service.
fn flood_affinity(lab: &Lab, to: SocketAddr, from: &[IpAddr]) -> usize {
    lab.ext.run_in(|| {
        from.iter()
            .filter(|a| {
                std::net::UdpSocket::bind((**a, 0))
                    .and_then(|s| s.send_to(b"flood", to))
                    .is_ok()
            })
            .count()
    })
}

/// Entries in `family`'s affinity map.
fn affinity_entries(lab: &Lab, family: Family) -> usize {
    use lb_common::{map_names, Affinity4Key, Affinity4Value, Affinity6Key};
    let open = |name| {
        let data = aya::maps::MapData::from_pin(lab.pin_dir.join(name)).expect("open affinity");
        aya::maps::Map::LruHashMap(data)
    };
    match family {
        Family::Ipv4 => {
            let map: aya::maps::HashMap<_, Affinity4Key, Affinity4Value> =
                aya::maps::HashMap::try_from(open(map_names::AFFINITY)).expect("affinity map");
            map.keys().filter_map(Result::ok).count()
        }
        Family::Ipv6 => {
            let map: aya::maps::HashMap<_, Affinity6Key, Affinity4Value> =
                aya::maps::HashMap::try_from(open(map_names::AFFINITY6)).expect("affinity map");
            map.keys().filter_map(Result::ok).count()
        }
    }
}

fn a_flooded_affinity_map_keeps_active_clients_on_their_backend(wire: Wire) {
    flooded_affinity_map(wire, Family::Ipv4);
}

/// The same over IPv6, on the software wire: the IPv6 affinity map is
/// sized by the same flag.
#[privileged_test]
fn a_flooded_ipv6_affinity_map_keeps_active_clients_on_their_backend() {
    flooded_affinity_map(Wire::Software, Family::Ipv6);
}

/// A dual-stack ClientIP-affinity Service over the nginx pods; active
/// clients of `family` stay on their backend while 5,000 new clients of
/// that family flood its 1,024-entry affinity map.
fn flooded_affinity_map(wire: Wire, family: Family) {
    const CAPACITY: usize = 1024;
    const CLIENTS: u16 = 5000;
    let mut text = std::fs::read_to_string(example("nginx-deployment.yaml")).unwrap();
    text.push_str(
        "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: nginx-sticky}\nspec:\n  \
         ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.11, \"fd00:96::11\"]\n  \
         selector: {app: nginx}\n  sessionAffinity: ClientIP\n  ports:\n  \
         - {name: tcp, port: 80, protocol: TCP, targetPort: 80}\n  \
         - {name: udp, port: 80, protocol: UDP, targetPort: 80}\n",
    );
    let sticky: SocketAddr = match family {
        Family::Ipv4 => STICKY.into(),
        Family::Ipv6 => STICKY6.into(),
    };
    let (objects, _) = workload::parse_lab_objects(&text).expect("parse");
    let mut lab = Lab::from_objects_on(wire, objects).expect("build the lab");
    lab.agent()
        .flags(&["--affinity-max", &CAPACITY.to_string()])
        .start()
        .expect("start the agent");
    let mut clients = LoadSet::default();
    for (ns, what) in [
        (lab.client.ns.path(), "pod client, ClientIP affinity"),
        (lab.ext.path(), "external client, ClientIP affinity"),
    ] {
        clients.add(Load::start(
            ns,
            sticky,
            LoadKind::NewConnections,
            &format!("{family} {what}"),
            Duration::from_millis(10),
            40_000,
        ));
    }
    let addrs = add_client_addresses(&lab, CLIENTS, family);
    std::thread::sleep(Duration::from_millis(500));
    let mut flooded = 0;
    for _ in 0..2 {
        flooded += flood_affinity(&lab, sticky, &addrs);
        std::thread::sleep(Duration::from_millis(300));
    }
    let entries = affinity_entries(&lab, family);
    println!(
        "{family} affinity: {flooded} datagrams from {CLIENTS} new clients into a map of {CAPACITY}; {entries} entries left"
    );
    assert!(
        flooded >= 2 * CLIENTS as usize - 10,
        "the flood ran: {flooded}"
    );
    assert!(entries <= CAPACITY, "{entries}");
    std::thread::sleep(Duration::from_millis(500));
    let reports = clients.finish_and_assert_none_failed();
    for r in &reports {
        assert_eq!(
            r.answered_by.len(),
            1,
            "an active client stays on its backend: {r}"
        );
    }
}

/// Set by `cargo xtask test`: an lb-agent built from the previous release
/// (or why it could not be built).
const PREVIOUS_AGENT: &str = "LB_PREVIOUS_AGENT_BIN";
const PREVIOUS_AGENT_UNAVAILABLE: &str = "LB_PREVIOUS_AGENT_UNAVAILABLE";

fn an_upgrade_from_the_previous_release_under_load_fails_no_request(new_hook: &str) {
    let Some(previous) =
        previous_agent("an_upgrade_from_the_previous_release_under_load_fails_no_request")
    else {
        return;
    };
    let previous = AgentBuild {
        binary: Some(previous.into()),
        // Its flags are the previous release's (it has no --wire-hook).
        flags: Vec::new(),
    };
    let this = AgentBuild {
        binary: None,
        flags: vec!["--wire-hook".into(), new_hook.into()],
    };
    let (k, clients) = roll_the_agent_under_load(previous, this);
    let log = k.lab.agent_log();
    println!(
        "the new agent over the previous release's maps:\n{}",
        log.lines()
            .filter(|l| l.contains("not kept") || l.contains("adopted") || l.contains("migrat"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log.contains(&format!(
            "lb_stats is not kept (14 entries, now {})",
            lb_common::map_spec::STATS.max_entries
        )) && log.contains(&format!(
            "lb_config is not kept (4 entries, now {})",
            lb_common::config::COUNT
        )),
        "the release changed map layouts (the stats map grew, the config map shrank): {log}"
    );
    // Reverse NAT ids grew to 32 bits: the id map is converted, so the
    // flows the previous release tracked keep naming their frontends.
    assert!(
        log.contains(r#"("lb4_reverse_nat", 4)"#),
        "the four frontends' reverse NAT entries converted from 16-bit ids: {log}"
    );
    let converted = log
        .lines()
        .find(|l| l.contains("migrating pinned maps of an older layout"))
        .unwrap_or_default();
    assert!(
        converted.contains(r#"("lb4_affinity", "#) && !converted.contains(r#"("lb4_affinity", 0)"#),
        "the ClientIP Service's affinity entries converted: {log}"
    );
    // The previous release served the wire with XDP. Moving to tc leaves
    // XDP passing everything rather than detach it (which resets a veth's
    // or NIC's rings); staying on XDP swaps the program in the pinned link.
    let links = lb_userspace::datapath::attach::links_dir(&k.lab.pin_dir);
    let expected: &[(&str, bool)] = match new_hook {
        "tc" => &[
            ("tcwire_eth0", true),
            ("xdppass_eth0", true),
            ("xdp_eth0", false),
        ],
        _ => &[
            ("tcwire_eth0", false),
            ("xdppass_eth0", false),
            ("xdp_eth0", true),
        ],
    };
    for (pin, present) in expected {
        assert_eq!(
            links.join(pin).exists(),
            *present,
            "to {new_hook}: link pin {pin}: {:?}",
            std::fs::read_dir(&links)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let reports = clients.finish_and_assert_none_failed();
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert_kept_its_backend(r);
    }
    for r in reports.iter().filter(|r| r.what.contains("ClientIP")) {
        assert_eq!(
            r.answered_by.len(),
            1,
            "{}: one pod before and after the upgrade: {:?}",
            r.what,
            r.answered_by
        );
    }
    let (ok, text) = k.check(&[]);
    assert!(
        ok,
        "after the upgrade the maps equal the desired state: {text}"
    );
}

const STICKY_WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 32), 80);
const STICKY_WEB_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_WIRE_ADDR, 30082);

/// A ClientIP-affinity NodePort Service over the web pods, published to
/// the API server fixture.
fn publish_sticky_web(k: &KubeLab) {
    let service = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-sticky", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": STICKY_WEB.ip().to_string(),
            "clusterIPs": [STICKY_WEB.ip().to_string()], "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack", "selector": {"app": "web"},
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                "nodePort": STICKY_WEB_NODE_PORT.port()}]}});
    let endpoints: Vec<serde_json::Value> = (k.lab.pods_of(WEB_OWNER).iter())
        .map(|p| {
            serde_json::json!({"addresses": [k.lab.pods[p].ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": NODE_NAME})
        })
        .collect();
    let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-sticky-abc", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web-sticky"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints});
    k.api
        .apply_all(&[service, slice])
        .expect("publish web-sticky");
}

/// New connections to the ClientIP Service from the client pod and from
/// outside: each client keeps one pod.
fn add_sticky_web_clients(set: &mut LoadSet, lab: &Lab) {
    for (ns, to, via) in [
        (lab.client.ns.path(), STICKY_WEB, "ClusterIP"),
        (lab.ext.path(), STICKY_WEB_NODE_PORT, "NodePort"),
    ] {
        set.add(Load::start(
            ns,
            to,
            LoadKind::NewConnections,
            &format!("IPv4 ClientIP {via} new connections"),
            Duration::from_millis(5),
            40_000,
        ));
    }
}
