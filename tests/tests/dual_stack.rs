//! IPv6 and dual-stack Services (examples/dual-stack.yaml), from both
//! sources of desired state and over both kinds of wire where the wire
//! carries the traffic:
//!
//! - the lab itself is dual-stack with the agent running: pods, the node
//!   and the external client reach each other over IPv6 without any
//!   Service (neighbour discovery included), routes are as planned, and
//!   nothing is left behind;
//! - a dual-stack ClusterIP answers over IPv4 and IPv6 from a pod (TCP and
//!   UDP), a NodePort on the node's IPv6 wire address from the external
//!   client, a SingleStack IPv6 Service answers, IPv6 externalIPs and
//!   LoadBalancer ingress addresses answer from the wire, an IPv6 Service
//!   without endpoints is refused at once (RST, ICMPv6 port unreachable),
//!   and a dual-stack Service reaches a backend on the other node of a
//!   cluster over IPv6.
//!
//! Every test ends with zero checksum errors (IPv4 and IPv6 counters) in
//! every namespace.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_lab::{
    client::probe_path_mtu,
    cluster::{node_addr6, Cluster, CLUSTER_EXT_ADDR6},
    http_get, on_each_source, on_each_source_and_wire, on_each_wire, ping6,
    report_checksum_counters, tcp_ask, udp_ask, Lab, Netns, Source, Wire, EXT_CLIENT_ADDR6,
    NODE_NAME, NODE_WIRE_ADDR, NODE_WIRE_ADDR6,
};
use serde_json::{json, Value};

on_each_source_and_wire!(the_lab_is_dual_stack_with_the_agent_running);
on_each_wire!(two_nodes_route_each_others_ipv6_pod_ranges);
on_each_source!(an_ipv6_only_node_finds_its_wire_by_its_ipv6_default_route);

// The Service tests: each source, each wire where the wire carries the
// traffic, as `on_each_source!` and friends declare them (module names
// start with `service_` beside those of the tests above).
lb_lab::lab_test_variants!(
    service_manifests,
    Manifests,
    Software,
    a_dual_stack_cluster_ip_answers_over_both_families_from_a_pod,
    ipv6_internal_local_policy_and_terminating_fallback,
    ipv6_topology_hints_keep_traffic_in_the_node_zone,
    a_dual_stack_cluster_ip_answers_over_both_families_from_the_node,
    a_pod_hairpins_back_to_itself_over_ipv6,
    ipv6_session_affinity_keeps_a_client_on_one_backend,
    an_ipv6_only_service_answers_from_a_pod_and_the_wire
);
lb_lab::lab_test_variants!(
    service_api,
    Api,
    Software,
    a_dual_stack_cluster_ip_answers_over_both_families_from_a_pod,
    ipv6_internal_local_policy_and_terminating_fallback,
    ipv6_topology_hints_keep_traffic_in_the_node_zone,
    a_dual_stack_cluster_ip_answers_over_both_families_from_the_node,
    a_pod_hairpins_back_to_itself_over_ipv6,
    ipv6_session_affinity_keeps_a_client_on_one_backend,
    an_ipv6_only_service_answers_from_a_pod_and_the_wire
);
lb_lab::lab_test_variants!(
    service_manifests_software_wire,
    Manifests,
    Software,
    a_node_port_answers_on_the_nodes_ipv6_wire_address,
    ipv6_node_port_with_local_policy_and_source_ranges,
    ipv6_external_ip_and_load_balancer_ingress_answer_from_the_wire,
    an_ipv6_service_without_endpoints_refuses_at_once
);
lb_lab::lab_test_variants!(
    service_manifests_nic_wire,
    Manifests,
    Nic,
    a_node_port_answers_on_the_nodes_ipv6_wire_address,
    ipv6_external_ip_and_load_balancer_ingress_answer_from_the_wire,
    an_ipv6_service_without_endpoints_refuses_at_once
);
lb_lab::lab_test_variants!(
    service_api_software_wire,
    Api,
    Software,
    a_node_port_answers_on_the_nodes_ipv6_wire_address,
    ipv6_external_ip_and_load_balancer_ingress_answer_from_the_wire
);
lb_lab::lab_test_variants!(
    service_api_nic_wire,
    Api,
    Nic,
    a_node_port_answers_on_the_nodes_ipv6_wire_address,
    ipv6_node_port_with_local_policy_and_source_ranges,
    ipv6_external_ip_and_load_balancer_ingress_answer_from_the_wire
);
// A cluster's agents read manifest files only.
lb_lab::lab_test_variants!(
    service_cluster_software_wire,
    Manifests,
    Software,
    a_dual_stack_service_reaches_a_backend_on_the_other_node_over_ipv6,
    ipv6_node_ports_reach_the_other_node_and_local_policy_health_checks_answer,
    ipv6_dsr_keeps_the_client_and_answers_from_the_backends_node
);
lb_lab::lab_test_variants!(
    service_cluster_nic_wire,
    Manifests,
    Nic,
    a_dual_stack_service_reaches_a_backend_on_the_other_node_over_ipv6,
    ipv6_node_ports_reach_the_other_node_and_local_policy_health_checks_answer,
    ipv6_dsr_keeps_the_client_and_answers_from_the_backends_node
);

const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests per check: with two backends chosen at random, one is missed
/// with probability 2^-19.
const REQUESTS: usize = 20;
const PORT: u16 = 80;
const NODE_PORT: u16 = 30090;
/// Documentation addresses (RFC 3849) the external client routes via the
/// node: an externalIP and a LoadBalancer ingress.
const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/dual-stack.yaml")
}

/// The lab of the dual-stack example (two pods), its agent reading
/// `source` and running.
fn example_lab(source: Source, wire: Wire) -> Lab {
    let mut lab = Lab::from_manifest_files_with(source, wire, &[example()]).expect("build the lab");
    assert_eq!(lab.pods.len(), 2, "the example Deployment has 2 replicas");
    lab.agent().start().expect("start lb-agent");
    lab
}

/// The pod names of the lab, sorted.
fn pod_names(lab: &Lab) -> Vec<String> {
    lab.pods.keys().cloned().collect()
}

/// `n` TCP "whoami" requests from `ns`, a new connection each: (answering
/// pod, source address it saw) counted. Every request must be answered.
fn whoami_tcp(ns: &Netns, to: SocketAddr, n: usize) -> BTreeMap<(String, IpAddr), usize> {
    ns.run_in(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let answer = tcp_ask(to, "whoami", TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP request {i} to {to}: {e}"));
            *seen.entry(parse_whoami(&answer)).or_insert(0) += 1;
        }
        seen
    })
}

/// The same over UDP, each answer from `to` itself (the reverse
/// translation), each datagram from a new socket (a new flow).
fn whoami_udp(ns: &Netns, to: SocketAddr, n: usize) -> BTreeMap<(String, IpAddr), usize> {
    ns.run_in(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let (answer, from) = udp_ask(to, "whoami", TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP request {i} to {to}: {e}"));
            assert_eq!(from, to, "UDP answer {i} comes from the Service address");
            *seen.entry(parse_whoami(&answer)).or_insert(0) += 1;
        }
        seen
    })
}

/// "pod-name peer-address:port" as lab-server answers "whoami".
fn parse_whoami(answer: &str) -> (String, IpAddr) {
    let (pod, peer) = answer.trim().split_once(' ').expect("name and peer");
    let peer: SocketAddr = peer.parse().unwrap_or_else(|e| panic!("peer {peer}: {e}"));
    (pod.to_owned(), peer.ip())
}

fn pods_in(seen: &BTreeMap<(String, IpAddr), usize>) -> Vec<String> {
    let mut pods: Vec<String> = seen.keys().map(|(p, _)| p.clone()).collect();
    pods.dedup();
    pods
}

fn sources_in(seen: &BTreeMap<(String, IpAddr), usize>) -> Vec<IpAddr> {
    let mut sources: Vec<IpAddr> = seen.keys().map(|(_, s)| *s).collect();
    sources.sort();
    sources.dedup();
    sources
}

/// An ICMPv6 echo from `ns` to `to` is answered: neighbour discovery and
/// routing work both ways (with the agent's programs attached).
fn assert_pings(ns: &Netns, to: Ipv6Addr, what: &str) {
    ns.run_in(|| ping6(to, TIMEOUT))
        .unwrap_or_else(|e| panic!("{what}: ping {to} from {}: {e}", ns.name));
}

/// Every route of `ip -6 route` in `ns`, one per line.
fn ipv6_routes(ns: &Netns) -> String {
    ns.exec(&["ip", "-6", "route", "show"])
        .expect("ip -6 route")
}

/// The node routes each pod's /128 to its veth, the pods go via the
/// link-local gateway, the external client via the node's wire address.
fn assert_ipv6_routes(lab: &Lab) {
    let node = ipv6_routes(&lab.node.netns);
    for pod in lab.pods.values().chain([&lab.client]) {
        assert!(
            node.lines()
                .any(|l| l.starts_with(&format!("{} dev lxc", pod.ip6))),
            "the node routes {} to its veth:\n{node}",
            pod.ip6
        );
        let in_pod = ipv6_routes(&pod.ns);
        assert!(
            in_pod.contains("default via fe80::1 dev eth0"),
            "pod {} goes via the link-local gateway:\n{in_pod}",
            pod.name
        );
    }
    let ext = ipv6_routes(&lab.ext);
    for cidr in [lb_lab::SERVICE_CIDR6, lb_lab::POD_CIDR6] {
        assert!(
            ext.contains(&format!("{cidr} via {NODE_WIRE_ADDR6} dev eth0")),
            "the external client routes {cidr} via the node:\n{ext}"
        );
    }
}

/// Without any Service: the client pod reaches each pod over IPv6 and
/// IPv4 (sources kept), the external client reaches each pod over IPv6,
/// the pods and the external client ping the node; and once the lab is
/// dropped, none of its namespaces or pins are left.
fn the_lab_is_dual_stack_with_the_agent_running(source: Source, wire: Wire) {
    let lab = example_lab(source, wire);
    assert_ipv6_routes(&lab);
    let client = &lab.client;
    for pod in lab.pods.values() {
        for (to, want_source) in [
            (
                SocketAddr::new(pod.ip6.into(), PORT),
                IpAddr::from(client.ip6),
            ),
            (
                SocketAddr::new(pod.ip.into(), PORT),
                IpAddr::from(client.ip),
            ),
        ] {
            let seen = whoami_tcp(&client.ns, to, 2);
            assert_eq!(pods_in(&seen), vec![pod.name.clone()], "{to}");
            assert_eq!(sources_in(&seen), vec![want_source], "{to}");
            let seen = client.ns.run_in(|| udp_ask(to, "whoami", TIMEOUT));
            let (answer, from) = seen.unwrap_or_else(|e| panic!("UDP to {to}: {e}"));
            assert_eq!(from, to);
            assert_eq!(parse_whoami(&answer), (pod.name.clone(), want_source));
        }
        let to = SocketAddr::new(pod.ip6.into(), PORT);
        let seen = whoami_tcp(&lab.ext, to, 2);
        assert_eq!(sources_in(&seen), vec![IpAddr::from(EXT_CLIENT_ADDR6)]);
        assert_pings(&pod.ns, NODE_WIRE_ADDR6, "pod to node");
    }
    assert_pings(&client.ns, NODE_WIRE_ADDR6, "client pod to node");
    assert_pings(&lab.ext, NODE_WIRE_ADDR6, "external client to node");
    assert_pings(&lab.node.netns, EXT_CLIENT_ADDR6, "node to external client");
    // The check can fail: nobody has this address on the wire.
    let nobody: Ipv6Addr = "fd00:77::99".parse().expect("an address");
    let short = Duration::from_millis(300);
    assert!(lab.ext.run_in(|| ping6(nobody, short)).is_err());
    report_checksum_counters("dual-stack lab, no Service", &lab.checksum_errors());
    assert_nothing_left_after(lab);
}

/// Drops the lab and checks its namespaces and pinned maps are gone.
fn assert_nothing_left_after(lab: Lab) {
    let id = lab.id.clone();
    let pins = lab.pin_dir.clone();
    drop(lab);
    let namespaces = lb_lab::run(&["ip", "netns", "list"]).expect("ip netns list");
    assert!(
        !namespaces.lines().any(|l| l.starts_with(&format!("{id}-"))),
        "namespaces of {id} left:\n{namespaces}"
    );
    assert!(!pins.exists(), "{} left", pins.display());
}

/// Two nodes with one pod each: the client pod of node-1 reaches node-2's
/// pod over IPv6 directly (routed pod ranges, agents running), source
/// kept; the nodes ping each other's IPv6 wire address.
fn two_nodes_route_each_others_ipv6_pod_ranges(wire: Wire) {
    let mut c = Cluster::from_manifest_files(wire, 2, &[example()]).expect("build the cluster");
    c.start_agents().expect("start the agents");
    let remote = c.pods_on(1);
    assert_eq!(remote.len(), 1);
    let pod = c.pod(&remote[0]);
    let client = &c.nodes[0].client;
    let to = SocketAddr::new(pod.ip6.into(), PORT);
    let seen = whoami_tcp(&client.ns, to, 3);
    assert_eq!(pods_in(&seen), remote);
    assert_eq!(sources_in(&seen), vec![IpAddr::from(client.ip6)]);
    assert_pings(&c.nodes[0].netns, node_addr6(2), "node-1 to node-2");
    assert_pings(&c.ext, node_addr6(1), "external client to node-1");
    report_checksum_counters("dual-stack cluster, no Service", &c.checksum_errors());
}

/// (a) Both ClusterIPs of `echo` (IPv4 first) and of `echo-nodeport`
/// (IPv6 first) answer from the client pod over TCP and UDP, from both
/// pods, with the client's own address of that family as the source.
fn a_dual_stack_cluster_ip_answers_over_both_families_from_a_pod(source: Source, _wire: Wire) {
    let lab = example_lab(source, Wire::Software);
    let client = &lab.client;
    for service in ["echo", "echo-nodeport"] {
        let ips = lab.cluster_ips(service);
        assert_eq!(ips.len(), 2, "{service} is dual-stack: {ips:?}");
        for ip in ips {
            let to = SocketAddr::new(ip, PORT);
            let own = if ip.is_ipv6() {
                IpAddr::from(client.ip6)
            } else {
                IpAddr::from(client.ip)
            };
            for seen in [
                whoami_tcp(&client.ns, to, REQUESTS),
                whoami_udp(&client.ns, to, REQUESTS),
            ] {
                assert_eq!(pods_in(&seen), pod_names(&lab), "{service} {to}");
                assert_eq!(sources_in(&seen), vec![own], "{service} {to}");
            }
        }
    }
    assert_pings(
        &client.ns,
        NODE_WIRE_ADDR6,
        "client pod to node, agent serving",
    );
    report_checksum_counters("dual-stack ClusterIP", &lab.checksum_errors());
}

/// A dual-stack ClusterIP answers over both families from a process of
/// the node (socket-level load balancing: connect4 and connect6, getpeername
/// showing the Service address), TCP and UDP, from both pods.
fn a_dual_stack_cluster_ip_answers_over_both_families_from_the_node(source: Source, _wire: Wire) {
    let lab = example_lab(source, Wire::Software);
    let bin = lb_lab::sibling_binary("lab-client", "LAB_CLIENT_BIN").expect("lab-client binary");
    for ip in lab.cluster_ips("echo") {
        let to = SocketAddr::new(ip, PORT).to_string();
        for mode in ["tcp", "udp"] {
            let out = lab
                .command_in_cgroup(&lab.node, &bin)
                .args([mode, to.as_str(), &REQUESTS.to_string()])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run lab-client");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let lines = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut pods = std::collections::BTreeSet::new();
            for line in lines.lines() {
                let (peer, answer) = line.split_once('\t').unwrap_or((line, ""));
                assert!(!answer.starts_with("error"), "{mode} {to}: {lines}");
                assert_eq!(peer, to, "{mode}: the peer is the Service address");
                pods.insert(answer.split(' ').next().unwrap_or_default().to_owned());
            }
            assert_eq!(
                pods.into_iter().collect::<Vec<_>>(),
                pod_names(&lab),
                "{mode} {to} from the node"
            );
        }
    }
    assert!(lab.datapath_stat("sock_translated") >= 4 * REQUESTS as u64);
    report_checksum_counters("dual-stack ClusterIP from the node", &lab.checksum_errors());
}

/// (b) The NodePort of `echo-nodeport` answers from the external client
/// on the node's IPv6 wire address (and still on its IPv4 one), TCP and
/// UDP, from both pods; neighbour discovery on the wire keeps working.
fn a_node_port_answers_on_the_nodes_ipv6_wire_address(source: Source, wire: Wire) {
    let lab = example_lab(source, wire);
    assert_pings(&lab.ext, NODE_WIRE_ADDR6, "external client to node");
    for ip in [IpAddr::from(NODE_WIRE_ADDR6), IpAddr::from(NODE_WIRE_ADDR)] {
        let to = SocketAddr::new(ip, NODE_PORT);
        assert_eq!(
            pods_in(&whoami_tcp(&lab.ext, to, REQUESTS)),
            pod_names(&lab),
            "TCP {to}"
        );
        assert_eq!(
            pods_in(&whoami_udp(&lab.ext, to, REQUESTS)),
            pod_names(&lab),
            "UDP {to}"
        );
    }
    assert_pings(&lab.ext, NODE_WIRE_ADDR6, "external client to node, after");
    report_checksum_counters("dual-stack NodePort", &lab.checksum_errors());
}

/// (c) `echo-ipv6` (SingleStack IPv6) answers from the client pod, TCP
/// and UDP, from both pods, and from the external client, which routes
/// the IPv6 Service range via the node.
fn an_ipv6_only_service_answers_from_a_pod_and_the_wire(source: Source, _wire: Wire) {
    let lab = example_lab(source, Wire::Software);
    let ips = lab.cluster_ips("echo-ipv6");
    assert_eq!(ips.len(), 1);
    assert!(ips[0].is_ipv6(), "{ips:?}");
    let to = SocketAddr::new(ips[0], PORT);
    let seen = whoami_tcp(&lab.client.ns, to, REQUESTS);
    assert_eq!(pods_in(&seen), pod_names(&lab));
    assert_eq!(sources_in(&seen), vec![IpAddr::from(lab.client.ip6)]);
    let seen = whoami_udp(&lab.client.ns, to, REQUESTS);
    assert_eq!(pods_in(&seen), pod_names(&lab));
    let seen = whoami_tcp(&lab.ext, to, REQUESTS);
    assert_eq!(pods_in(&seen), pod_names(&lab));
    report_checksum_counters("IPv6-only Service", &lab.checksum_errors());
}

/// (d) Two nodes, one `echo` pod on each: node-1's client pod reaches both
/// through the IPv6 ClusterIP, the one on node-2 across the wire, with its
/// own IPv6 address kept as the source; UDP answers come from the Service.
fn a_dual_stack_service_reaches_a_backend_on_the_other_node_over_ipv6(_source: Source, wire: Wire) {
    let mut c = Cluster::from_manifest_files(wire, 2, &[example()]).expect("build the cluster");
    c.start_agents().expect("start the agents");
    let mut all: Vec<String> = c.placement.keys().cloned().collect();
    all.sort();
    let ip6: Ipv6Addr = "fd00:96::40".parse().expect("echo's IPv6 ClusterIP");
    let to = SocketAddr::new(ip6.into(), PORT);
    let client = &c.nodes[0].client;
    let seen = whoami_tcp(&client.ns, to, REQUESTS);
    assert_eq!(
        pods_in(&seen),
        all,
        "node-1's client reaches both nodes' pods"
    );
    assert_eq!(sources_in(&seen), vec![IpAddr::from(client.ip6)]);
    let seen = whoami_udp(&client.ns, to, REQUESTS);
    assert_eq!(pods_in(&seen), all);
    report_checksum_counters("dual-stack across nodes", &c.checksum_errors());
}

/// (e) Two nodes over IPv6, from the cluster's external client: a NodePort
/// on either node's IPv6 address reaches the pod on the other node,
/// masqueraded to the entry node's IPv6 address; with externalTrafficPolicy
/// Local only the node's own pod answers, the client's IPv6 address kept,
/// the other node drops, and each node's healthCheckNodePort says so over
/// IPv6 (200 and 503).
fn ipv6_node_ports_reach_the_other_node_and_local_policy_health_checks_answer(
    _source: Source,
    wire: Wire,
) {
    let mut c = Cluster::from_manifest_files(wire, 2, &[example()]).expect("build the cluster");
    let on = |c: &Cluster, k: usize| c.pods_on(k - 1);
    assert_eq!((on(&c, 1).len(), on(&c, 2).len()), (1, 1), "one pod a node");
    for (k, other) in [(1usize, 2usize), (2, 1)] {
        let np = 30100 + k as u16;
        let spec = json!({"type": "NodePort", "clusterIPs": [format!("fd00:96::5{k}")],
            "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP", "nodePort": np}]});
        let pods = on(&c, other);
        publish6_in_cluster(&mut c, &format!("np6-{k}"), spec, &pods);
        let to = SocketAddr::new(node_addr6(k).into(), np);
        let seen = whoami_tcp(&c.ext, to, REQUESTS);
        assert_eq!(
            pods_in(&seen),
            on(&c, other),
            "node-{k} to node-{other}'s pod"
        );
        assert_eq!(
            sources_in(&seen),
            vec![IpAddr::from(node_addr6(k))],
            "masqueraded"
        );
    }
    let spec = json!({"type": "LoadBalancer", "clusterIPs": ["fd00:96::53"],
        "externalTrafficPolicy": "Local", "healthCheckNodePort": HEALTH_PORT,
        "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP", "nodePort": 30103}]});
    let local = on(&c, 1);
    publish6_in_cluster(&mut c, "local6", spec, &local);
    let seen = whoami_tcp(
        &c.ext,
        SocketAddr::new(node_addr6(1).into(), 30103),
        REQUESTS,
    );
    assert_eq!(pods_in(&seen), on(&c, 1), "only node-1's own pod");
    assert_eq!(sources_in(&seen), vec![IpAddr::from(CLUSTER_EXT_ADDR6)]);
    let to_node2 = SocketAddr::new(node_addr6(2).into(), 30103);
    let refused = c
        .ext
        .run_in(|| tcp_ask(to_node2, "whoami", Duration::from_millis(500)));
    assert!(
        refused.is_err(),
        "node-2 has no local endpoint: {refused:?}"
    );
    for (k, want) in [(1usize, 200u16), (2, 503)] {
        let at = SocketAddr::new(node_addr6(k).into(), HEALTH_PORT);
        let (code, body) = c
            .ext
            .run_in(|| http_get(at, "/", TIMEOUT))
            .unwrap_or_else(|e| panic!("health check of node-{k} over IPv6: {e}"));
        assert_eq!(code, want, "health check of node-{k}: {body}");
    }
    report_checksum_counters("IPv6 NodePorts across nodes", &c.checksum_errors());
}

/// (f) Direct server return over IPv6 (`lb-agent.io/lb-mode: dsr`): a
/// NodePort on node-1's IPv6 address to node-2's pod, which sees the
/// client's own address and answers it from the NodePort itself (node-1
/// reverse-translates nothing); a UDP datagram that fills the wire's MTU
/// has no room for the 24-byte destination options header: node-1 answers
/// Packet Too Big with 1,476, the client's path MTU to the node drops to
/// it, and a datagram that fits is answered.
fn ipv6_dsr_keeps_the_client_and_answers_from_the_backends_node(_source: Source, wire: Wire) {
    let mut c = Cluster::from_manifest_files(wire, 2, &[example()]).expect("build the cluster");
    let spec = json!({"type": "NodePort", "clusterIPs": ["fd00:96::54"],
        "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP", "nodePort": 30104},
                  {"name": "udp", "port": PORT, "protocol": "UDP", "nodePort": 30104}]});
    let pods = c.pods_on(1);
    let dsr = json!({"lb-agent.io/lb-mode": "dsr"});
    publish6_annotated(&mut c, "dsr6", dsr, spec, &pods);
    let to = SocketAddr::new(node_addr6(1).into(), 30104);
    let reverse_natted = c.nodes[0].datapath_stat_of("reverse_natted", "ipv6");
    let seen = whoami_tcp(&c.ext, to, REQUESTS);
    assert_eq!(pods_in(&seen), pods, "node-2's pod");
    assert_eq!(
        sources_in(&seen),
        vec![IpAddr::from(CLUSTER_EXT_ADDR6)],
        "the client kept"
    );
    assert!(c.nodes[1].datapath_stat_of("dsr_learned", "ipv6") >= REQUESTS as u64);
    assert_eq!(
        c.nodes[0].datapath_stat_of("reverse_natted", "ipv6"),
        reverse_natted,
        "replies skip node-1"
    );
    let (mtu, answer) = c.ext.run_in(|| {
        let s = UdpSocket::bind((CLUSTER_EXT_ADDR6, 0)).expect("bind");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        // 1,452 bytes of payload: 1,500 with the UDP and IPv6 headers.
        probe_path_mtu(&s, 1452, 48).expect("EMSGSIZE, then an answer to one that fits")
    });
    assert_eq!(mtu, 1476, "the wire's 1,500 less the header");
    assert_eq!(answer, pods[0]);
    report_checksum_counters("IPv6 direct server return", &c.checksum_errors());
}

/// The health check port of the Local policy Service across nodes.
const HEALTH_PORT: u16 = 30290;

/// An IPv6-only Service of the cluster with `pods` (IPv6, on their nodes)
/// as its endpoints; starts the agents the first time.
fn publish6_in_cluster(c: &mut Cluster, name: &str, spec: Value, pods: &[String]) {
    publish6_annotated(c, name, json!({}), spec, pods);
}

/// `publish6_in_cluster` with `annotations` on the Service.
fn publish6_annotated(
    c: &mut Cluster,
    name: &str,
    annotations: Value,
    spec: Value,
    pods: &[String],
) {
    let mut spec = spec;
    spec["ipFamilies"] = json!(["IPv6"]);
    spec["ipFamilyPolicy"] = json!("SingleStack");
    let eps = pods
        .iter()
        .map(|p| {
            let node = lb_lab::cluster::node_name(c.placement[p] + 1);
            json!({"addresses": [c.pod(p).ip6.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node, "targetRef": {"kind": "Pod", "name": p, "namespace": "default"}})
        })
        .collect();
    c.state
        .put_annotated_dual_stack_service(name, annotations, spec, json!({}), &[("IPv6", eps)]);
    if c.nodes[0].agent_pid().is_some() {
        c.apply_manifests().expect("agents pick up the change");
    } else {
        c.write_manifests().expect("manifests");
        c.start_agents().expect("start the agents");
    }
}

/// An IPv6-only node, started as the DaemonSet starts the agent (no
/// `--interfaces`): its wire has no IPv4 address and its only default
/// route is IPv6's. The agent finds the wire by that route, serves IPv6
/// (`--ipv6 auto`), and the NodePort answers on the node's IPv6 address
/// from outside, masqueraded to it.
fn an_ipv6_only_node_finds_its_wire_by_its_ipv6_default_route(source: Source, _wire: Wire) {
    let mut lab =
        Lab::from_manifest_files_with(source, Wire::Software, &[example()]).expect("build the lab");
    for cmd in [
        &["ip", "-4", "addr", "flush", "dev", "eth0"][..],
        &[
            "ip",
            "-6",
            "route",
            "replace",
            "default",
            "via",
            "fd00:77::2",
            "dev",
            "eth0",
        ],
    ] {
        lab.node.exec(cmd).expect("an IPv6-only wire");
    }
    // And no IPv4 anywhere else: the external client, the client pod, the
    // pods (their servers listen on both families).
    let flush = ["ip", "-4", "addr", "flush", "dev", "eth0"];
    lab.ext.exec(&flush).expect("external client IPv6-only");
    lab.client.ns.exec(&flush).expect("client pod IPv6-only");
    for pod in lab.pods.values() {
        pod.ns.exec(&flush).expect("pod IPv6-only");
    }
    lab.wire_from_default_route = true;
    lab.agent().start().expect("start lb-agent");
    let status = lab.agent_command_json(&["status", "--output", "json"]);
    assert!(
        status["wire"].to_string().contains("eth0"),
        "the wire is eth0: {status}"
    );
    let to = SocketAddr::new(NODE_WIRE_ADDR6.into(), NODE_PORT);
    let seen = whoami_tcp(&lab.ext, to, REQUESTS);
    assert_eq!(pods_in(&seen), pod_names(&lab), "TCP {to}");
    assert_eq!(
        sources_in(&seen),
        vec![IpAddr::from(NODE_WIRE_ADDR6)],
        "masqueraded"
    );
    assert_eq!(
        pods_in(&whoami_udp(&lab.ext, to, REQUESTS)),
        pod_names(&lab),
        "UDP {to}"
    );
    // echo-ipv6, SingleStack IPv6.
    let echo6: IpAddr = "fd00:96::42".parse().expect("an address");
    let seen = whoami_tcp(&lab.client.ns, SocketAddr::new(echo6, PORT), REQUESTS);
    assert_eq!(
        pods_in(&seen),
        pod_names(&lab),
        "the IPv6 ClusterIP from a pod"
    );
    report_checksum_counters("IPv6-only node", &lab.checksum_errors());
}

/// The external client's route to the IPv6 externalIP and LoadBalancer
/// addresses (2001:db8::/64), via the node.
fn route_external_addresses(lab: &Lab) {
    lab.ext
        .exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "2001:db8::/64",
            "via",
            &NODE_WIRE_ADDR6.to_string(),
        ])
        .expect("route to the external addresses");
}

/// An endpoint of `pod` with its address of `family`, ready, on this node.
fn ready_endpoint(lab: &Lab, pod: &str, family: &str) -> Value {
    let p = &lab.pods[pod];
    let address = if family == "IPv6" {
        p.ip6.to_string()
    } else {
        p.ip.to_string()
    };
    json!({"addresses": [address],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": NODE_NAME, "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}})
}

/// A LoadBalancer Service, IPv6 first, with an IPv6 externalIP and an IPv6
/// ingress address: both answer from the external client (which routes
/// them via the node), TCP and UDP, from both pods.
fn ipv6_external_ip_and_load_balancer_ingress_answer_from_the_wire(source: Source, wire: Wire) {
    let mut lab = example_lab(source, wire);
    route_external_addresses(&lab);
    let pods = pod_names(&lab);
    let slices: Vec<(&str, Vec<Value>)> = ["IPv6", "IPv4"]
        .into_iter()
        .map(|f| (f, pods.iter().map(|p| ready_endpoint(&lab, p, f)).collect()))
        .collect();
    let spec = json!({"type": "LoadBalancer", "clusterIPs": ["fd00:96::50", "10.96.0.50"],
        "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack",
        "externalIPs": [EXTERNAL_IP6.to_string()],
        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30091},
                  {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": 30091}]});
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP6.to_string()}]}});
    lab.put_dual_stack_service("lb6", spec, status, &slices);
    lab.apply_manifests()
        .expect("the agent picks up the Service");
    for ip in [EXTERNAL_IP6, LB_IP6] {
        let to = SocketAddr::new(ip.into(), PORT);
        assert_eq!(
            pods_in(&whoami_tcp(&lab.ext, to, REQUESTS)),
            pods,
            "TCP {to}"
        );
        assert_eq!(
            pods_in(&whoami_udp(&lab.ext, to, REQUESTS)),
            pods,
            "UDP {to}"
        );
    }
    report_checksum_counters("IPv6 externalIP and ingress", &lab.checksum_errors());
}

/// How a connection attempt from `ns` to `to` failed, and after how long:
/// TCP connect, or a connected UDP socket's answer.
fn refusal(ns: &Netns, to: SocketAddr, udp: bool) -> (Option<ErrorKind>, Duration) {
    ns.run_in(|| {
        let started = Instant::now();
        let result = if udp {
            let s = UdpSocket::bind(lb_lab::client::unspecified_of(&to)).expect("bind");
            s.connect(to).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.send(b"hello").expect("send");
            s.recv(&mut [0u8; 64]).map(drop)
        } else {
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map(drop)
        };
        (result.err().map(|e| e.kind()), started.elapsed())
    })
}

/// An IPv6 Service whose selector matches nothing is refused at once over
/// TCP (a RST) and UDP (an ICMPv6 port unreachable), from a pod and from
/// the wire, every time, as its IPv4 twin is (lab.rs).
fn an_ipv6_service_without_endpoints_refuses_at_once(source: Source, wire: Wire) {
    let mut lab = example_lab(source, wire);
    lab.state.extra_manifests.insert(
        "empty6.yaml".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty6}\nspec:\n  clusterIP: \"fd00:96::99\"\n  ipFamilies: [IPv6]\n  selector: {app: nothing-matches}\n  ports: [{name: tcp, port: 80}, {name: udp, port: 80, protocol: UDP}]\n".into(),
    );
    lab.apply_manifests()
        .expect("the agent picks up the Service");
    let to = SocketAddr::new("fd00:96::99".parse::<IpAddr>().expect("address"), PORT);
    for (who, ns) in [
        ("client pod", &lab.client.ns),
        ("external client", &lab.ext),
    ] {
        for attempt in 0..3 {
            for udp in [false, true] {
                let (err, elapsed) = refusal(ns, to, udp);
                let what = format!(
                    "{who}, {} attempt {attempt}",
                    if udp { "UDP" } else { "TCP" }
                );
                assert_eq!(
                    err,
                    Some(ErrorKind::ConnectionRefused),
                    "{what} after {elapsed:?}"
                );
                assert!(elapsed < Duration::from_secs(1), "{what}: took {elapsed:?}");
            }
        }
    }
    report_checksum_counters("IPv6 Service without endpoints", &lab.checksum_errors());
}

/// An IPv6-only Service `name` with endpoints on `pods` (their IPv6
/// addresses), published to the agent.
fn publish6(lab: &mut Lab, name: &str, spec: Value, pods: &[String]) {
    publish6_with_status(lab, name, spec, json!({}), pods);
}

fn publish6_with_status(lab: &mut Lab, name: &str, spec: Value, status: Value, pods: &[String]) {
    let eps = pods
        .iter()
        .map(|p| ready_endpoint(lab, p, "IPv6"))
        .collect();
    let mut spec = spec;
    spec["ipFamilies"] = json!(["IPv6"]);
    spec["ipFamilyPolicy"] = json!("SingleStack");
    spec["ports"] = json!([{"name": "tcp", "port": PORT, "protocol": "TCP", "nodePort": 30092},
                           {"name": "udp", "port": PORT, "protocol": "UDP", "nodePort": 30092}]);
    lab.put_dual_stack_service(name, spec, status, &[("IPv6", eps)]);
    lab.apply_manifests()
        .expect("the agent picks up the Service");
}

/// A pod reaches itself through its IPv6 Service: masqueraded to the
/// node's IPv6 address (`--masquerade-address6`'s default), TCP and UDP.
fn a_pod_hairpins_back_to_itself_over_ipv6(source: Source, _wire: Wire) {
    let mut lab = example_lab(source, Wire::Software);
    let first = pod_names(&lab)[0].clone();
    publish6(
        &mut lab,
        "hairpin6",
        json!({"clusterIPs": ["fd00:96::26"]}),
        std::slice::from_ref(&first),
    );
    let to = SocketAddr::new("fd00:96::26".parse::<IpAddr>().expect("address"), PORT);
    let pod_ns = &lab.pods[&first].ns;
    for seen in [
        whoami_tcp(pod_ns, to, REQUESTS),
        whoami_udp(pod_ns, to, REQUESTS),
    ] {
        assert_eq!(
            pods_in(&seen),
            vec![first.clone()],
            "the pod reaches itself"
        );
        assert_eq!(
            sources_in(&seen),
            vec![IpAddr::from(NODE_WIRE_ADDR6)],
            "hairpin traffic is masqueraded to the node's IPv6 address"
        );
    }
    report_checksum_counters("IPv6 hairpin", &lab.checksum_errors());
}

/// ClientIP session affinity over IPv6: one client keeps one backend, TCP
/// and UDP, where without it connections spread.
fn ipv6_session_affinity_keeps_a_client_on_one_backend(source: Source, _wire: Wire) {
    let mut lab = example_lab(source, Wire::Software);
    let pods = pod_names(&lab);
    let spec = json!({"clusterIPs": ["fd00:96::27"], "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}});
    publish6(&mut lab, "affinity6", spec, &pods);
    let to = SocketAddr::new("fd00:96::27".parse::<IpAddr>().expect("address"), PORT);
    let seen = whoami_tcp(&lab.client.ns, to, 30);
    assert_eq!(pods_in(&seen).len(), 1, "ClientIP affinity, TCP: {seen:?}");
    let seen = whoami_udp(&lab.client.ns, to, 30);
    assert_eq!(pods_in(&seen).len(), 1, "ClientIP affinity, UDP: {seen:?}");
    publish6(
        &mut lab,
        "affinity6",
        json!({"clusterIPs": ["fd00:96::27"]}),
        &pods,
    );
    let seen = whoami_tcp(&lab.client.ns, to, 30);
    assert_eq!(pods_in(&seen), pods, "affinity off: connections spread");
    assert!(lab.datapath_stat("affinity_hit") > 0);
    report_checksum_counters("IPv6 session affinity", &lab.checksum_errors());
}

/// externalTrafficPolicy Local on an IPv6 NodePort keeps the external
/// client's address; loadBalancerSourceRanges (an IPv6 prefix) let only
/// the sources inside reach the LoadBalancer address, the others dropped
/// and counted.
fn ipv6_node_port_with_local_policy_and_source_ranges(source: Source, wire: Wire) {
    let mut lab = example_lab(source, wire);
    route_external_addresses(&lab);
    let pods = pod_names(&lab);
    let node_port = SocketAddr::new(IpAddr::from(NODE_WIRE_ADDR6), 30092);
    let ingress = SocketAddr::new(IpAddr::from(LB_IP6), PORT);
    let spec = |ranges: &str| {
        json!({"type": "LoadBalancer", "clusterIPs": ["fd00:96::28"],
            "externalTrafficPolicy": "Local", "loadBalancerSourceRanges": [ranges]})
    };
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP6.to_string()}]}});
    publish6_with_status(
        &mut lab,
        "local6",
        spec("fd00:77::/64"),
        status.clone(),
        &pods,
    );
    for to in [node_port, ingress] {
        for seen in [
            whoami_tcp(&lab.ext, to, REQUESTS),
            whoami_udp(&lab.ext, to, REQUESTS),
        ] {
            assert_eq!(pods_in(&seen), pods, "both local pods answer at {to}");
            assert_eq!(
                sources_in(&seen),
                vec![IpAddr::from(EXT_CLIENT_ADDR6)],
                "the client's own IPv6 address reaches the pod from {to}"
            );
        }
    }
    publish6_with_status(&mut lab, "local6", spec("2001:db8:1::/64"), status, &pods);
    let refused = lab
        .ext
        .run_in(|| TcpStream::connect_timeout(&ingress, Duration::from_millis(700)));
    assert!(refused.is_err(), "a source outside the ranges is let in");
    let dropped = lab.datapath_stat("source_range_dropped");
    assert!(dropped > 0);
    assert_eq!(
        lab.datapath_stat_of("source_range_dropped", "ipv6"),
        dropped,
        "the drops are counted as IPv6's"
    );
    report_checksum_counters("IPv6 Local policy and ranges", &lab.checksum_errors());
}

/// An IPv6 endpoint of `pod` with these conditions, on node `node`.
fn endpoint6(lab: &Lab, pod: &str, conditions: [bool; 3], node: &str) -> Value {
    let [ready, serving, terminating] = conditions;
    json!({"addresses": [lab.pods[pod].ip6.to_string()],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node, "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}})
}

/// An IPv6-only Service with the given endpoints.
fn publish6_endpoints(lab: &mut Lab, name: &str, spec: Value, eps: Vec<Value>) {
    let mut spec = spec;
    spec["ipFamilies"] = json!(["IPv6"]);
    spec["ipFamilyPolicy"] = json!("SingleStack");
    spec["ports"] = json!([{"name": "tcp", "port": PORT, "protocol": "TCP"},
                           {"name": "udp", "port": PORT, "protocol": "UDP"}]);
    lab.put_dual_stack_service(name, spec, json!({}), &[("IPv6", eps)]);
    lab.apply_manifests()
        .expect("the agent picks up the Service");
}

/// Topology hints over IPv6: with every endpoint hinted, a pod reaches
/// only the endpoints hinted for the node's zone (`--zone`); with one
/// endpoint unhinted the hints are ignored, as kube-proxy does.
fn ipv6_topology_hints_keep_traffic_in_the_node_zone(source: Source, _wire: Wire) {
    let mut lab =
        Lab::from_manifest_files_with(source, Wire::Software, &[example()]).expect("build the lab");
    lab.agent()
        .flags(&["--zone", "zone-a"])
        .start()
        .expect("start lb-agent");
    let all = pod_names(&lab);
    let hinted = |lab: &Lab, pod: &str, zone: Option<&str>| {
        let mut e = endpoint6(lab, pod, [true, true, false], NODE_NAME);
        if let Some(zone) = zone {
            e["hints"] = json!({"forZones": [{"name": zone}]});
        }
        e
    };
    let spec = json!({"clusterIPs": ["fd00:96::2b"], "trafficDistribution": "PreferClose"});
    let to = SocketAddr::new("fd00:96::2b".parse::<IpAddr>().expect("address"), PORT);
    for (zone_of_second, expected, what) in [
        (
            Some("zone-b"),
            vec![all[0].clone()],
            "only zone-a's endpoint",
        ),
        (None, all.clone(), "one endpoint unhinted: every endpoint"),
    ] {
        let eps = vec![
            hinted(&lab, &all[0], Some("zone-a")),
            hinted(&lab, &all[1], zone_of_second),
        ];
        publish6_endpoints(&mut lab, "topo6", spec.clone(), eps);
        for seen in [
            whoami_tcp(&lab.client.ns, to, REQUESTS),
            whoami_udp(&lab.client.ns, to, REQUESTS),
        ] {
            assert_eq!(pods_in(&seen), expected, "{what}");
        }
    }
    report_checksum_counters("IPv6 topology hints", &lab.checksum_errors());
}

/// internalTrafficPolicy Local over IPv6: a pod reaches only this node's
/// endpoint, with its own address; and with no ready endpoint left the
/// serving terminating ones take new flows (kube-proxy's fallback).
fn ipv6_internal_local_policy_and_terminating_fallback(source: Source, _wire: Wire) {
    let mut lab = example_lab(source, Wire::Software);
    let all = pod_names(&lab);
    let eps = vec![
        endpoint6(&lab, &all[0], [true, true, false], NODE_NAME),
        endpoint6(&lab, &all[1], [true, true, false], "other-node"),
    ];
    let spec = json!({"clusterIPs": ["fd00:96::29"], "internalTrafficPolicy": "Local"});
    publish6_endpoints(&mut lab, "itp6", spec, eps);
    let to = SocketAddr::new("fd00:96::29".parse::<IpAddr>().expect("address"), PORT);
    for seen in [
        whoami_tcp(&lab.client.ns, to, REQUESTS),
        whoami_udp(&lab.client.ns, to, REQUESTS),
    ] {
        assert_eq!(
            pods_in(&seen),
            vec![all[0].clone()],
            "only this node's endpoint"
        );
        assert_eq!(sources_in(&seen), vec![IpAddr::from(lab.client.ip6)]);
    }
    let eps = vec![
        endpoint6(&lab, &all[0], [false, false, true], NODE_NAME),
        endpoint6(&lab, &all[1], [false, true, true], NODE_NAME),
    ];
    publish6_endpoints(
        &mut lab,
        "term6",
        json!({"clusterIPs": ["fd00:96::2a"]}),
        eps,
    );
    let to = SocketAddr::new("fd00:96::2a".parse::<IpAddr>().expect("address"), PORT);
    for seen in [
        whoami_tcp(&lab.client.ns, to, REQUESTS),
        whoami_udp(&lab.client.ns, to, REQUESTS),
    ] {
        assert_eq!(
            pods_in(&seen),
            vec![all[1].clone()],
            "no ready endpoint: the serving terminating one"
        );
    }
    report_checksum_counters("IPv6 ITP Local and fallback", &lab.checksum_errors());
}
