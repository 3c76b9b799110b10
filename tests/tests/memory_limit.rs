//! The DaemonSet's memory limit (deploy/lb-agent.yaml) against what the
//! agent is charged at 10,000 Services x 10 endpoints read from the API
//! server fixture, through relists. The agent runs in a memory cgroup with
//! exactly that limit, as its container would: it must not be killed, and
//! its peak (its own pages plus the kernel memory of the BPF maps it
//! created, both charged to the pod) must leave a fifth of the limit free
//! for what a real cluster adds (larger objects, more labels and ports).
//! The memory request must cover what it holds once settled.

use std::time::{Duration, Instant};

use lb_bench::traffic::{map_memlock_kib, rss_kib};
use lb_kube_fixtures::{apiserver::ApiServer, scale};
use lb_lab::{
    container::{container_of, daemon_set_pod},
    memcg::{parse_quantity, MemoryCgroup},
    privileged_test, Lab, NODE_NAME,
};
use lb_userspace::{
    datapath::loader,
    model::{L4Addr, Protocol},
    sync::differ::master_key,
};
use serde_json::{json, Value};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;
const RELISTS: u64 = 2;

/// `resources.<kind>.memory` of the lb-agent container (`limits` or
/// `requests`), as written.
fn daemon_set_memory(kind: &str) -> String {
    let pod = daemon_set_pod();
    container_of(&pod, "lb-agent")["resources"][kind]["memory"]
        .as_str()
        .unwrap_or_else(|| panic!("resources.{kind}.memory is set"))
        .to_owned()
}

/// Waits until the agent has written sync `generation`.
fn wait_generation(lab: &mut Lab, generation: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_mins(5);
    while lab.generation() < generation {
        assert!(
            Instant::now() < deadline,
            "{what}: no sync {generation} in 300 s\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[privileged_test]
fn the_daemon_sets_memory_limit_covers_10k_services_through_relists() {
    let quantity = daemon_set_memory("limits");
    let limit = parse_quantity(&quantity).expect("a memory quantity");
    let requested = daemon_set_memory("requests");
    let request = parse_quantity(&requested).expect("a memory quantity");
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);

    // Dropped after the lab (declared first): its processes are gone then.
    let cgroup = MemoryCgroup::create(&format!("lb-memory-{}", std::process::id()), limit)
        .expect("a memory cgroup (cgroup v2 memory controller, or v1's)");
    let mut lab = Lab::from_objects(Vec::new()).expect("lab");
    let api = ApiServer::start_in(Some(lab.node.path())).expect("API server fixture");
    api.apply(&json!({"kind": "Node", "metadata": {"name": NODE_NAME}}))
        .unwrap();
    let objects: Vec<Value> = (0..SERVICES)
        .flat_map(|i| [scale::service(i), scale::slice(i, ENDPOINTS, NODE_NAME)])
        .collect();
    api.apply_all(&objects).unwrap();
    drop(objects);
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    lab.node.agent_wrapper = cgroup.wrapper();
    let kc = kubeconfig.to_string_lossy().into_owned();
    // As the DaemonSet runs it: the API source, socket LB on every socket.
    lab.agent()
        .only(&[
            "--kubeconfig",
            &kc,
            "--node-name",
            NODE_NAME,
            "--socket-lb",
            "all",
        ])
        .spawn()
        .expect("spawn lb-agent");
    wait_generation(&mut lab, 1, "first sync");
    let maps = loader::open_pinned(&lab.pin_dir).expect("pinned maps");
    let backends_of = |i: usize| {
        let key = master_key(&L4Addr {
            addr: scale::service_ip(i).into(),
            port: 80,
            proto: Protocol::Tcp,
        });
        maps.service(&key).map(|v| v.count)
    };
    for i in [0, SERVICES / 2, SERVICES - 1] {
        assert_eq!(backends_of(i), Some(ENDPOINTS as u16), "Service {i}");
    }

    // Relists: every watch restarts with a full list and a full sync, the
    // moment the store holds the old objects and the new list at once.
    for n in 1..=RELISTS {
        let before = lab.generation();
        api.expire_watches();
        wait_generation(&mut lab, before + 1, "sync after a relist");
        let relisted = lab.agent_log().matches("restarted with a relist").count() as u64;
        assert!(relisted >= n, "relist {n} not seen:\n{}", lab.agent_log());
    }
    for i in [0, SERVICES - 1] {
        assert_eq!(backends_of(i), Some(ENDPOINTS as u16), "Service {i}");
    }

    let pid = lab.agent_pid().expect("the agent runs");
    let (rss_now_kib, rss_peak_kib) = rss_kib(pid);
    let maps_kib = map_memlock_kib(pid);
    let settled = (rss_now_kib + maps_kib) * 1024;
    let charged_peak = cgroup.peak().unwrap();
    let oom_kills = cgroup.oom_kills().unwrap();
    let agent_and_maps = (rss_peak_kib + maps_kib) * 1024;
    println!(
        "MEMORY: limit {quantity} ({:.0} MiB, cgroup {:?}); agent peak RSS {:.1} MiB + BPF maps \
         {:.1} MiB = {:.1} MiB ({:.0}% of the limit); cgroup peak {:.1} MiB (page cache \
         included), now {:.1} MiB; OOM kills {oom_kills}",
        mib(limit),
        cgroup.version,
        rss_peak_kib as f64 / 1024.0,
        maps_kib as f64 / 1024.0,
        mib(agent_and_maps),
        100.0 * agent_and_maps as f64 / limit as f64,
        mib(charged_peak),
        mib(cgroup.current().unwrap_or(0)),
    );
    println!(
        "MEMORY: request {requested} ({:.0} MiB); settled: agent RSS {:.1} MiB + BPF maps = {:.1} MiB",
        mib(request),
        rss_now_kib as f64 / 1024.0,
        mib(settled)
    );
    // The scheduler reserves the request: it covers what the agent holds
    // once settled, so the node is not overcommitted by it.
    assert!(
        settled <= request && request <= limit,
        "deploy/lb-agent.yaml's memory request {requested} is below the settled {:.1} MiB \
         (or above the limit {quantity}): raise it",
        mib(settled)
    );
    assert_eq!(oom_kills, 0, "the limit killed the agent");
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "the agent is gone:\n{}",
        lab.agent_log()
    );
    assert!(
        agent_and_maps * 5 <= limit * 4,
        "deploy/lb-agent.yaml's memory limit {quantity} leaves less than a fifth free over the \
         measured peak of {:.1} MiB: raise it",
        mib(agent_and_maps)
    );
    let projected = on_a_bigger_node(agent_and_maps, &lab.pin_dir);
    assert!(
        projected * 5 <= limit * 4,
        "on a {BIG_NODE_GIB} GiB node the flow-state maps grow to {:.1} MiB in all: \
         {quantity} leaves less than a fifth free",
        mib(projected)
    );
}

/// The largest node the DaemonSet's limit is meant for, serving both
/// families (the README's figure).
const BIG_NODE_GIB: u64 = 64;

/// The measured peak with this node's flow-state maps (sized from its
/// memory by the default --map-size-ratio) replaced by a big node's.
fn on_a_bigger_node(agent_and_maps: u64, pin_dir: &std::path::Path) -> u64 {
    use lb_userspace::datapath::map_sizing::{
        node_memory, size_flow_state, Requested, DEFAULT_RATIO,
    };
    let ipv6_here = lb_userspace::datapath::map_memory::pinned_usage(pin_dir)
        .expect("pinned maps")
        .iter()
        .any(|m| m.map == "lb6_conntrack" && m.max_entries > 1);
    let here = size_flow_state(
        node_memory().unwrap(),
        DEFAULT_RATIO,
        ipv6_here,
        Requested::default(),
    );
    let big = size_flow_state(
        BIG_NODE_GIB << 30,
        DEFAULT_RATIO,
        true,
        Requested::default(),
    );
    println!(
        "MEMORY: flow-state maps here {:.1} MiB (IPv6 {ipv6_here}), on a {BIG_NODE_GIB} GiB \
         node {:.1} MiB",
        here.cost_bytes as f64 / f64::from(1 << 20),
        big.cost_bytes as f64 / f64::from(1 << 20)
    );
    agent_and_maps - here.cost_bytes + big.cost_bytes
}
