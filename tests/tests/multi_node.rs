//! Two nodes, each with its own agent, pins and pods, on one wire (see
//! lb_lab::cluster): what crosses nodes. ClusterIP to pods on the
//! other node, NodePort and LoadBalancer addresses on either node to
//! remote backends (masqueraded), externalTrafficPolicy Local and the
//! healthCheckNodePort of each node, a backend removed, one node's
//! agent killed and restarted under load while the other keeps serving,
//! Maglev, and direct server return on three nodes.
//! Each runs on both kinds of wire, with zero checksum errors anywhere.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    time::Duration,
};

use lb_lab::{
    ask_on,
    client::{probe_path_mtu, set_dont_fragment},
    cluster::{node_addr, node_name, Cluster, CLUSTER_EXT_ADDR},
    http_get,
    load::{Load, LoadKind, LoadSet},
    on_each_wire, report_checksum_counters, tcp_ask, udp_ask, Netns, Wire,
};
use serde_json::{json, Value};

on_each_wire!(
    cluster_ip_reaches_pods_on_the_other_node,
    node_port_and_load_balancer_on_either_node_reach_remote_backends,
    external_traffic_policy_local_serves_only_local_pods_and_health_checks_say_so,
    a_removed_remote_backend_gets_no_new_connections,
    one_nodes_agent_killed_and_restarted_under_load_loses_nothing,
    maglev_sends_a_flow_to_the_same_backend_whichever_node_it_enters,
    dsr_keeps_the_client_and_a_connection_survives_a_move_to_another_node,
    dsr_datagrams_too_big_for_the_option_teach_the_client_a_smaller_path_mtu,
    dsr_backends_added_and_retired_under_load_fail_no_request,
);

const TIMEOUT: Duration = Duration::from_secs(2);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const HEALTH_PORT: u16 = 32_000;

/// Two nodes with the nginx example's 3 pods: two on node-1, one on node-2.
fn cluster(wire: Wire) -> Cluster {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let c = Cluster::from_manifest_files(wire, 2, &[example]).expect("build the cluster");
    assert_eq!(c.pods_on(0).len(), 2);
    assert_eq!(c.pods_on(1).len(), 1);
    c
}

fn endpoint(c: &Cluster, pod: &str) -> Value {
    let node = node_name(c.placement[pod] + 1);
    json!({"addresses": [c.pod(pod).ip.to_string()],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": node, "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}})
}

fn ports(node_port: Option<u16>) -> Value {
    match node_port {
        Some(np) => json!([{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": np},
                           {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": np}]),
        None => json!([{"name": "tcp", "port": 80, "protocol": "TCP"},
                       {"name": "udp", "port": 80, "protocol": "UDP"}]),
    }
}

/// Publishes Service `name` with endpoints `pods` and starts the agents
/// (or waits for them to apply it).
fn publish(c: &mut Cluster, name: &str, spec: Value, status: Value, pods: &[String]) {
    let endpoints = pods.iter().map(|p| endpoint(c, p)).collect();
    c.state.put_extra_service(name, spec, status, endpoints);
    if c.nodes[0].agent_pid().is_some() {
        c.apply_manifests().expect("agents pick up the change");
    } else {
        c.write_manifests().expect("manifests");
        c.start_agents().expect("start the agents");
    }
}

/// `n` TCP "whoami" requests from `ns`: (answering pod, source it saw) counted.
fn whoami(ns: &Netns, to: SocketAddrV4, n: usize) -> BTreeMap<(String, Ipv4Addr), usize> {
    ns.run_in(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let answer = tcp_ask(to, "whoami", TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP request {i} to {to}: {e}"));
            let (pod, peer) = answer.trim().split_once(' ').expect("name and peer");
            let peer: SocketAddrV4 = peer.parse().expect("peer address");
            *seen.entry((pod.to_owned(), *peer.ip())).or_insert(0) += 1;
        }
        seen
    })
}

/// `n` UDP requests from `ns`, each answered from `to` itself.
fn udp_answers(ns: &Netns, to: SocketAddrV4, n: usize) -> Vec<String> {
    ns.run_in(|| {
        (0..n)
            .map(|i| {
                let (answer, from) = udp_ask(to, "hello", TIMEOUT)
                    .unwrap_or_else(|e| panic!("UDP request {i} to {to}: {e}"));
                assert_eq!(from, SocketAddr::V4(to), "the answer comes from {to}");
                answer
            })
            .collect()
    })
}

fn pods_and_sources(seen: &BTreeMap<(String, Ipv4Addr), usize>) -> (Vec<String>, Vec<Ipv4Addr>) {
    let mut pods: Vec<String> = seen.keys().map(|(p, _)| p.clone()).collect();
    let mut sources: Vec<Ipv4Addr> = seen.keys().map(|(_, s)| *s).collect();
    pods.sort();
    pods.dedup();
    sources.sort();
    sources.dedup();
    (pods, sources)
}

fn cluster_ip_reaches_pods_on_the_other_node(wire: Wire) {
    let mut c = cluster(wire);
    let remote = c.pods_on(1);
    let spec = json!({"clusterIP": "10.96.0.40", "ports": ports(None)});
    publish(&mut c, "remote", spec, json!({}), &remote);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), 80);
    let client = &c.nodes[0].client;
    let (pods, sources) = pods_and_sources(&whoami(&client.ns, to, 30));
    assert_eq!(pods, remote, "node-1's client reaches node-2's pod");
    assert_eq!(sources, vec![client.ip], "the client's address is kept");
    for answer in udp_answers(&client.ns, to, 30) {
        assert_eq!(answer, remote[0]);
    }
    report_checksum_counters("ClusterIP across nodes", &c.checksum_errors());
}

fn node_port_and_load_balancer_on_either_node_reach_remote_backends(wire: Wire) {
    let mut c = cluster(wire);
    c.ext
        .exec(&[
            "ip",
            "route",
            "add",
            &format!("{LB_IP}/32"),
            "via",
            &node_addr(1).to_string(),
        ])
        .expect("route to the LoadBalancer address via node-1");
    for (k, remote_of) in [(1usize, 1usize), (2, 0)] {
        // NodePort on node k, backends only on the other node.
        let pods = c.pods_on(remote_of);
        let name = format!("np{k}");
        let np = 30090 + k as u16;
        let spec = json!({"type": "NodePort", "clusterIP": format!("10.96.0.{}", 40 + k),
            "ports": ports(Some(np))});
        publish(&mut c, &name, spec, json!({}), &pods);
        let to = SocketAddrV4::new(node_addr(k), np);
        let (answered, sources) = pods_and_sources(&whoami(&c.ext, to, 20));
        assert_eq!(
            answered, pods,
            "NodePort on node-{k} to the other node's pods"
        );
        assert_eq!(sources, vec![node_addr(k)], "masqueraded to node-{k}");
        for answer in udp_answers(&c.ext, to, 20) {
            assert!(pods.contains(&answer), "{answer}");
        }
    }
    let remote = c.pods_on(1);
    let spec =
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.45", "ports": ports(Some(30095))});
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    publish(&mut c, "lb", spec, status, &remote);
    let to = SocketAddrV4::new(LB_IP, 80);
    let (answered, sources) = pods_and_sources(&whoami(&c.ext, to, 20));
    assert_eq!(answered, remote, "the LoadBalancer address via node-1");
    assert_eq!(sources, vec![node_addr(1)]);
    report_checksum_counters(
        "NodePort and LoadBalancer across nodes",
        &c.checksum_errors(),
    );
}

fn external_traffic_policy_local_serves_only_local_pods_and_health_checks_say_so(wire: Wire) {
    let mut c = cluster(wire);
    let local = c.pods_on(0);
    let spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.46",
        "externalTrafficPolicy": "Local", "healthCheckNodePort": HEALTH_PORT,
        "ports": ports(Some(30096))});
    publish(&mut c, "local", spec, json!({}), &local);
    let to = SocketAddrV4::new(node_addr(1), 30096);
    let (answered, sources) = pods_and_sources(&whoami(&c.ext, to, 20));
    assert_eq!(answered, local, "only node-1's own pods");
    assert_eq!(
        sources,
        vec![CLUSTER_EXT_ADDR],
        "the client's address is kept"
    );
    // node-2 has no local endpoint: its NodePort drops (as kube-proxy
    // does), and its health check tells the load balancer to steer away.
    let to_node2 = SocketAddrV4::new(node_addr(2), 30096);
    let refused = c
        .ext
        .run_in(|| tcp_ask(to_node2, "whoami", Duration::from_millis(500)));
    assert!(
        refused.is_err(),
        "node-2 has no local endpoint: {refused:?}"
    );
    for (k, want) in [(1usize, 200u16), (2, 503)] {
        let at = SocketAddr::from((node_addr(k), HEALTH_PORT));
        let (code, body) = c
            .ext
            .run_in(|| http_get(at, "/", TIMEOUT))
            .unwrap_or_else(|e| panic!("health check of node-{k}: {e}"));
        assert_eq!(code, want, "health check of node-{k}: {body}");
    }
    report_checksum_counters("externalTrafficPolicy Local", &c.checksum_errors());
}

fn a_removed_remote_backend_gets_no_new_connections(wire: Wire) {
    let mut c = cluster(wire);
    let all: Vec<String> = c.placement.keys().cloned().collect();
    let spec = json!({"type": "NodePort", "clusterIP": "10.96.0.47", "ports": ports(Some(30097))});
    publish(&mut c, "all", spec.clone(), json!({}), &all);
    let to = SocketAddrV4::new(node_addr(1), 30097);
    let (answered, _) = pods_and_sources(&whoami(&c.ext, to, 40));
    assert_eq!(answered.len(), 3, "every pod answers: {answered:?}");
    // The pod on node-2 leaves the Service.
    let gone = c.pods_on(1)[0].clone();
    let rest: Vec<String> = all.iter().filter(|p| **p != gone).cloned().collect();
    publish(&mut c, "all", spec, json!({}), &rest);
    let (answered, _) = pods_and_sources(&whoami(&c.ext, to, 40));
    assert!(!answered.contains(&gone), "{gone} got a new connection");
    let to_node2 = SocketAddrV4::new(node_addr(2), 30097);
    let (answered, _) = pods_and_sources(&whoami(&c.ext, to_node2, 20));
    assert!(
        !answered.contains(&gone),
        "{gone} got a new connection via node-2"
    );
    report_checksum_counters("backend removal across nodes", &c.checksum_errors());
}

fn one_nodes_agent_killed_and_restarted_under_load_loses_nothing(wire: Wire) {
    let mut c = cluster(wire);
    let all: Vec<String> = c.placement.keys().cloned().collect();
    let spec = json!({"type": "NodePort", "clusterIP": "10.96.0.48", "ports": ports(Some(30098))});
    publish(&mut c, "web", spec, json!({}), &all);
    let mut clients = LoadSet::default();
    for k in [1usize, 2] {
        let to = SocketAddrV4::new(node_addr(k), 30098);
        for (kind, what, every) in [
            (LoadKind::NewConnections, "new connections", 5),
            (LoadKind::LongLived, "long-lived connection", 10),
        ] {
            clients.add(Load::start(
                c.ext.path(),
                to,
                kind,
                &format!("NodePort on node-{k}, {what}"),
                Duration::from_millis(every),
                20_000,
            ));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    c.nodes[0].kill_agent();
    std::thread::sleep(Duration::from_secs(1));
    c.nodes[0].agent().start().expect("restart node-1's agent");
    std::thread::sleep(Duration::from_secs(1));
    let reports = clients.finish_and_assert_none_failed();
    for r in reports.iter().filter(|r| r.what.contains("long-lived")) {
        assert_eq!(r.connections, 1, "{r}: the connection survived");
    }
    report_checksum_counters("an agent restarted under load", &c.checksum_errors());
}

/// The pod answering one UDP datagram sent from the external client's
/// `port` to `to` (a fixed 5-tuple per port).
fn udp_from_port(ns: &Netns, port: u16, to: SocketAddrV4) -> String {
    ns.run_in(|| {
        let s = std::net::UdpSocket::bind((CLUSTER_EXT_ADDR, port)).expect("bind");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.send_to(b"hello", to).expect("send");
        let mut buf = [0u8; 512];
        let (n, _) = s
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("UDP from port {port} to {to}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
}

/// Maglev (the `lb-agent.io/lb-algorithm` annotation): each agent builds
/// the Service's table from the same backends, so a flow picks the same
/// backend whichever node it enters. A LoadBalancer address with pods on
/// both nodes is reached from outside via node-1, then, the route moved
/// to node-2 (as when a router's ECMP set changes), again: each of 40 UDP
/// flows (fixed client ports) is answered by the same pod both times. At
/// random, 40 flows over 3 pods would all agree once in 3^40.
fn maglev_sends_a_flow_to_the_same_backend_whichever_node_it_enters(wire: Wire) {
    let mut c = cluster(wire);
    route_lb_ip_via(&c.ext, "add", 1);
    let pods: Vec<String> = c.pods_on(0).into_iter().chain(c.pods_on(1)).collect();
    let endpoints = pods.iter().map(|p| endpoint(&c, p)).collect();
    let spec =
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.46", "ports": ports(Some(30096))});
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    let maglev = json!({"lb-agent.io/lb-algorithm": "maglev"});
    c.state
        .put_annotated_service("maglev", maglev, spec, status, endpoints);
    c.write_manifests().expect("manifests");
    c.start_agents().expect("start the agents");
    let to = SocketAddrV4::new(LB_IP, 80);
    let flows = 41_000..41_040_u16;
    let via_node1: Vec<String> = flows
        .clone()
        .map(|p| udp_from_port(&c.ext, p, to))
        .collect();
    route_lb_ip_via(&c.ext, "replace", 2);
    let via_node2: Vec<String> = flows.map(|p| udp_from_port(&c.ext, p, to)).collect();
    assert_eq!(
        via_node1, via_node2,
        "every flow reaches the same pod through either node"
    );
    let mut spread = via_node1.clone();
    spread.sort();
    spread.dedup();
    assert_eq!(
        spread,
        {
            let mut p = pods.clone();
            p.sort();
            p
        },
        "the flows spread over every pod"
    );
    report_checksum_counters("Maglev across nodes", &c.checksum_errors());
}

/// Three nodes with the nginx example's 3 pods, one on each, and a
/// LoadBalancer Service (TCP and UDP port 80) of node-3's pod alone in
/// direct server return with Maglev, reached from outside via node-1.
fn dsr_cluster(wire: Wire) -> (Cluster, String) {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let mut c = Cluster::from_manifest_files(wire, 3, &[example]).expect("build the cluster");
    let backend = c.pods_on(2).pop().expect("a pod on node-3");
    let endpoints = vec![endpoint(&c, &backend)];
    put_dsr_service(&mut c, endpoints);
    c.write_manifests().expect("manifests");
    c.start_agents().expect("start the agents");
    route_lb_ip_via(&c.ext, "add", 1);
    (c, backend)
}

/// The LoadBalancer Service of `dsr_cluster` with `endpoints`.
fn put_dsr_service(c: &mut Cluster, endpoints: Vec<Value>) {
    let spec =
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.47", "ports": ports(Some(30097))});
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    let annotations = json!({"lb-agent.io/lb-mode": "dsr", "lb-agent.io/lb-algorithm": "maglev"});
    c.state
        .put_annotated_service("dsr", annotations, spec, status, endpoints);
}

/// Under load from outside via node-1 (new connections every 5 ms, a
/// long-lived connection, a UDP flow), node-1's own pod joins node-3's
/// (a backend on the entry node: answered there, through its reply
/// entry), then node-2's joins, then node-3's is retired (terminating,
/// as in a rolling update, then removed): no request fails, and the
/// long-lived connection keeps going (on node-3's pod while it
/// terminates, then anew).
fn dsr_backends_added_and_retired_under_load_fail_no_request(wire: Wire) {
    let (mut c, node3_pod) = dsr_cluster(wire);
    let to = SocketAddrV4::new(LB_IP, 80);
    let mut clients = LoadSet::default();
    for (kind, what, every) in [
        (LoadKind::NewConnections, "DSR new connections", 5),
        (LoadKind::LongLived, "DSR long-lived connection", 10),
        (LoadKind::UdpFlow, "DSR UDP flow", 10),
    ] {
        let every = Duration::from_millis(every);
        clients.add(Load::start(c.ext.path(), to, kind, what, every, 20_000));
    }
    let node1_pod = c.pods_on(0)[0].clone();
    let node2_pod = c.pods_on(1)[0].clone();
    let steps: [&[(&str, bool)]; 4] = [
        &[(&node3_pod, true), (&node1_pod, true)],
        &[(&node3_pod, true), (&node1_pod, true), (&node2_pod, true)],
        &[(&node3_pod, false), (&node1_pod, true), (&node2_pod, true)],
        &[(&node1_pod, true), (&node2_pod, true)],
    ];
    for step in steps {
        std::thread::sleep(Duration::from_millis(700));
        let endpoints = step
            .iter()
            .map(|(pod, ready)| endpoint_in_state(&c, pod, *ready))
            .collect();
        put_dsr_service(&mut c, endpoints);
        c.apply_manifests().expect("agents pick up the change");
    }
    std::thread::sleep(Duration::from_millis(700));
    let reports = clients.finish_and_assert_none_failed();
    assert!(reports.iter().all(|r| r.sent > 100), "{reports:?}");
    assert!(c.nodes[2].datapath_stat("dsr_learned") > 0);
    report_checksum_counters("DSR backends churned under load", &c.checksum_errors());
}

/// `endpoint`, ready or else terminating (still serving).
fn endpoint_in_state(c: &Cluster, pod: &str, ready: bool) -> Value {
    let mut e = endpoint(c, pod);
    e["conditions"] = json!({"ready": ready, "serving": true, "terminating": !ready});
    e
}

/// Routes the LoadBalancer address from outside (`ext`) via node `k`
/// (1-based).
fn route_lb_ip_via(ext: &Netns, verb: &str, k: usize) {
    let via = node_addr(k).to_string();
    ext.exec(&["ip", "route", verb, &format!("{LB_IP}/32"), "via", &via])
        .expect("route to the LoadBalancer address");
}

/// Direct server return (`lb-agent.io/lb-mode: dsr`): node-1 forwards to
/// node-3's pod without masquerading, so the pod sees the client's own
/// address, and node-3 answers the client itself from the LoadBalancer
/// address (TCP connects and UDP answers come from it): node-1 sees no
/// reply. Then one connection, 10 requests in, moves to node-2 (the route
/// changes, as when a router's ECMP set does): Maglev gives it the same
/// backend there, node-3 still answers, and all 20 requests are answered
/// with no reset. Masqueraded, the move would break it: node-2 would
/// present the pod another source mid-stream.
fn dsr_keeps_the_client_and_a_connection_survives_a_move_to_another_node(wire: Wire) {
    let (c, backend) = dsr_cluster(wire);
    let to = SocketAddrV4::new(LB_IP, 80);
    let replies_via_node1 = c.nodes[0].datapath_stat("reverse_natted");
    let (pods, sources) = pods_and_sources(&whoami(&c.ext, to, 20));
    assert_eq!(pods, vec![backend.clone()]);
    assert_eq!(sources, vec![CLUSTER_EXT_ADDR], "the pod sees the client");
    for answer in udp_answers(&c.ext, to, 10) {
        assert_eq!(answer, backend);
    }
    // node-1's NodePort too: node-3 answers from node-1's address.
    let node_port = SocketAddrV4::new(node_addr(1), 30097);
    let (_, sources) = pods_and_sources(&whoami(&c.ext, node_port, 10));
    assert_eq!(
        sources,
        vec![CLUSTER_EXT_ADDR],
        "NodePort: the pod sees the client"
    );
    assert!(c.nodes[0].datapath_stat("dsr_forwarded") >= 40);
    assert!(c.nodes[2].datapath_stat("dsr_learned") >= 30);
    assert_eq!(
        c.nodes[0].datapath_stat("reverse_natted"),
        replies_via_node1,
        "replies skip the entry node"
    );

    let ext = &c.ext;
    let answers = ext.run_in(|| {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), TIMEOUT).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut answers = Vec::new();
        for i in 0..20 {
            if i == 10 {
                route_lb_ip_via(ext, "replace", 2);
            }
            let answer = ask_on(&mut s, "whoami")
                .unwrap_or_else(|e| panic!("request {i} on one connection: {e}"));
            answers.push(answer);
        }
        answers
    });
    let expected = format!("{backend} {CLUSTER_EXT_ADDR}:");
    for (i, a) in answers.iter().enumerate() {
        assert!(a.starts_with(&expected), "request {i}: {a}");
    }
    assert!(
        c.nodes[1].datapath_stat("dsr_forwarded") >= 10,
        "node-2 carried the second half"
    );
    report_checksum_counters("direct server return", &c.checksum_errors());
}

/// A UDP datagram that fills the wire's MTU with don't-fragment set has
/// no room for the DSR option: the entry node answers ICMP fragmentation
/// needed with the MTU less the option's 8 bytes, the client's kernel
/// lowers its path MTU to the Service, and the next datagram that fits
/// is answered.
fn dsr_datagrams_too_big_for_the_option_teach_the_client_a_smaller_path_mtu(wire: Wire) {
    let (c, backend) = dsr_cluster(wire);
    let to = SocketAddrV4::new(LB_IP, 80);
    let mtu = c.ext.run_in(|| {
        let s = std::net::UdpSocket::bind((CLUSTER_EXT_ADDR, 0)).expect("bind");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        set_dont_fragment(&s).expect("IP_MTU_DISCOVER");
        // 1,472 bytes of payload: 1,500 with the UDP and IPv4 headers.
        let (mtu, answer) =
            probe_path_mtu(&s, 1472, 28).expect("EMSGSIZE, then an answer to one that fits");
        assert_eq!(answer, backend);
        mtu
    });
    assert_eq!(mtu, 1492, "the wire's 1,500 less the option");
    assert!(c.nodes[0].datapath_stat("dsr_frag_needed") >= 1);
}
