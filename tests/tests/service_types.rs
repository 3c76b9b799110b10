//! Lab tests of the Service API beyond ClusterIP: NodePort, LoadBalancer,
//! externalIPs, traffic policies, session affinity, terminating endpoints
//! and hairpin. Each is named after the sig-network e2e test it mirrors.
//! Services and EndpointSlices are written by hand so each test controls
//! endpoint conditions and node names exactly.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_lab::{
    on_each_source, on_each_source_and_wire, tcp_ask, udp_ask, Lab, Netns, Source, Wire,
    EXT_CLIENT_ADDR, NODE_NAME, NODE_WIRE_ADDR,
};
use serde_json::{json, Value};

on_each_source_and_wire!(
    a_dual_stack_service_is_served_on_its_ipv4_side_whatever_the_order,
    source_ranges_given_by_annotation_are_honoured,
    should_be_able_to_create_a_functioning_nodeport_service_and_release_it_on_delete,
    should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols,
    should_preserve_the_client_source_with_external_traffic_policy_local_and_only_use_local_endpoints,
    loadbalancer_ingress_is_served_and_source_ranges_let_only_those_sources_in,
    should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node,
    should_have_session_affinity_work_switch_and_time_out_for_nodeport_service,
    should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_external_traffic_policy_local,
    should_fail_health_check_node_port_if_there_are_only_terminating_endpoints,
    should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service,
);

on_each_source!(
    should_have_session_affinity_work_switch_and_time_out_for_service_with_type_clusterip,
    should_allow_pods_to_hairpin_back_to_themselves_through_services,
    should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster,
    should_respect_internal_traffic_policy_local_pod_to_pod,
    should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service,
    should_be_able_to_change_the_type_from_external_name_to_cluster_ip_and_back,
    should_serve_multiport_endpoints_from_pods,
    should_be_updated_after_adding_or_deleting_ports,
    topology_hints_keep_traffic_in_the_node_zone_when_every_endpoint_has_one,
    should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local,
    publish_not_ready_addresses_serves_endpoints_that_are_not_ready,
);

const TIMEOUT: Duration = Duration::from_secs(2);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const NODE_PORT: u16 = 30080;
const SECOND_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

/// A lab with the nginx example's three pods (TCP and UDP on port 80) and
/// routes from the external client to the test's external addresses.
/// The same on `wire`, the agent reading `source`.
fn lab_on(source: Source, wire: Wire) -> Lab {
    let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/nginx-deployment.yaml");
    let lab = Lab::from_manifest_files_with(source, wire, &[example]).expect("build the lab");
    assert_eq!(lab.pods.len(), 3);
    lab.ext
        .exec(&[
            "ip",
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            &NODE_WIRE_ADDR.to_string(),
        ])
        .expect("route to external addresses");
    lab
}

fn pod_names(lab: &Lab) -> Vec<String> {
    lab.pods.keys().cloned().collect()
}

/// An endpoint of pod `name` with conditions and a node.
fn endpoint(
    lab: &Lab,
    name: &str,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: &str,
) -> Value {
    json!({"addresses": [lab.pods[name].ip.to_string()],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node, "targetRef": {"kind": "Pod", "name": name, "namespace": "default"}})
}

/// The first pod terminating (still serving) on this node, the others
/// ready on another node.
fn local_terminating_remote_ready(lab: &Lab, all: &[String]) -> Vec<Value> {
    vec![
        endpoint(lab, &all[0], false, true, true, NODE_NAME),
        endpoint(lab, &all[1], true, true, false, "other-node"),
        endpoint(lab, &all[2], true, true, false, "other-node"),
    ]
}

fn ready(lab: &Lab, name: &str) -> Value {
    endpoint(lab, name, true, true, false, NODE_NAME)
}

/// Writes Service `name` and its EndpointSlice without starting an agent.
fn publish_without_agent(lab: &mut Lab, name: &str, spec: Value, endpoints: Vec<Value>) {
    lab.put_extra_service(name, spec, json!({}), endpoints);
    lab.write_manifests().unwrap();
}

/// Writes Service `name` (its spec given) and one EndpointSlice with
/// `endpoints` for ports 80/TCP and 80/UDP, and waits for the agent.
fn publish(lab: &mut Lab, name: &str, spec: Value, status: Value, endpoints: Vec<Value>) {
    lab.put_extra_service(name, spec, status, endpoints);
    if lab.agent_pid().is_some() {
        lab.apply_manifests().expect("agent picks up the change");
    } else {
        lab.write_manifests().unwrap();
        lab.agent().start().expect("start lb-agent");
    }
}

fn ports(node_port: bool) -> Value {
    if node_port {
        json!([{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": NODE_PORT},
               {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": NODE_PORT}])
    } else {
        json!([{"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "udp", "port": 80, "protocol": "UDP"}])
    }
}

/// `n` TCP requests ("whoami", new connection each) from `ns`: the answering
/// pod and the source address it saw, counted.
fn whoami_tcp(ns: &Netns, to: SocketAddrV4, n: usize) -> BTreeMap<(String, Ipv4Addr), usize> {
    ns.run_in(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let answer = tcp_ask(to, "whoami", TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP request {i} to {to} failed: {e}"));
            *seen.entry(parse_whoami(&answer)).or_insert(0) += 1;
        }
        seen
    })
}

fn whoami_udp(ns: &Netns, to: SocketAddrV4, n: usize) -> BTreeMap<(String, Ipv4Addr), usize> {
    ns.run_in(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let (answer, from) = udp_ask(to, "whoami", TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP request {i} to {to} failed: {e}"));
            assert_eq!(from, SocketAddr::V4(to), "UDP reply must come from {to}");
            *seen.entry(parse_whoami(&answer)).or_insert(0) += 1;
        }
        seen
    })
}

fn parse_whoami(answer: &str) -> (String, Ipv4Addr) {
    let (pod, peer) = answer
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("not a whoami answer: {answer:?}"));
    let peer: SocketAddrV4 = peer.parse().expect("peer address");
    (pod.to_owned(), *peer.ip())
}

fn pods_of(seen: &BTreeMap<(String, Ipv4Addr), usize>) -> Vec<String> {
    let mut p: Vec<String> = seen.keys().map(|(p, _)| p.clone()).collect();
    p.dedup();
    p
}

fn sources_of(seen: &BTreeMap<(String, Ipv4Addr), usize>) -> Vec<Ipv4Addr> {
    let mut s: Vec<Ipv4Addr> = seen.keys().map(|(_, a)| *a).collect();
    s.sort();
    s.dedup();
    s
}

fn connect_fails(ns: &Netns, to: SocketAddrV4) -> bool {
    ns.run_in(|| {
        TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_millis(700)).is_err()
    })
}

fn should_be_able_to_create_a_functioning_nodeport_service_and_release_it_on_delete(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    // A second node address: NodePorts are served on every one of them.
    lab.node
        .exec(&[
            "ip",
            "addr",
            "add",
            &format!("{SECOND_NODE_ADDR}/24"),
            "dev",
            "eth0",
        ])
        .expect("second node address");
    let all = pod_names(&lab);
    let eps = all.iter().map(|p| ready(&lab, p)).collect();
    publish(
        &mut lab,
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.20", "ports": ports(true)}),
        json!({}),
        eps,
    );
    let second = SocketAddrV4::new(SECOND_NODE_ADDR, NODE_PORT);
    assert_eq!(
        pods_of(&whoami_tcp(&lab.ext, second, 30)),
        all,
        "the NodePort on the second node address"
    );
    assert_eq!(pods_of(&whoami_udp(&lab.ext, second, 30)), all);
    let to = SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT);
    let tcp = whoami_tcp(&lab.ext, to, 30);
    assert_eq!(
        pods_of(&tcp),
        all,
        "external TCP to the NodePort reaches every pod"
    );
    assert_eq!(
        sources_of(&tcp),
        vec![NODE_WIRE_ADDR],
        "externalTrafficPolicy Cluster masquerades to the node"
    );
    let udp = whoami_udp(&lab.ext, to, 30);
    assert_eq!(
        pods_of(&udp),
        all,
        "external UDP to the NodePort reaches every pod"
    );
    assert_eq!(sources_of(&udp), vec![NODE_WIRE_ADDR]);
    // A pod reaching the node's address at the NodePort.
    let from_pod = whoami_tcp(&lab.client.ns, to, 30);
    assert_eq!(
        pods_of(&from_pod),
        all,
        "a pod reaches the NodePort on the node address"
    );
    lab.assert_no_checksum_errors();
    assert_no_nat_failures(&lab);

    // should release NodePorts on delete
    lab.state.extra_manifests.remove("np.yaml");
    lab.apply_manifests().unwrap();
    assert!(
        connect_fails(&lab.ext, to),
        "the NodePort still answers after the Service was deleted"
    );
}

fn should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let eps: Vec<Value> = all.iter().map(|p| ready(&lab, p)).collect();
    publish(
        &mut lab,
        "t",
        json!({"clusterIP": "10.96.0.21",
        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"}]}),
        json!({}),
        eps.clone(),
    );
    let to = SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT);
    assert!(
        connect_fails(&lab.ext, to),
        "no NodePort before the type change"
    );
    publish(
        &mut lab,
        "t",
        json!({"type": "NodePort", "clusterIP": "10.96.0.21", "ports": ports(true)}),
        json!({}),
        eps,
    );
    assert_eq!(pods_of(&whoami_tcp(&lab.ext, to, 30)), all);
    assert_eq!(pods_of(&whoami_udp(&lab.ext, to, 30)), all);
    lab.assert_no_checksum_errors();
}

fn should_preserve_the_client_source_with_external_traffic_policy_local_and_only_use_local_endpoints(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    // The third pod is "on another node": Local external traffic skips it.
    let eps = vec![
        ready(&lab, &all[0]),
        ready(&lab, &all[1]),
        endpoint(&lab, &all[2], true, true, false, "other-node"),
    ];
    publish(
        &mut lab,
        "local",
        json!({"type": "NodePort", "clusterIP": "10.96.0.22",
        "externalTrafficPolicy": "Local", "ports": ports(true)}),
        json!({}),
        eps,
    );
    let to = SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT);
    let seen = whoami_tcp(&lab.ext, to, 30);
    assert_eq!(
        pods_of(&seen),
        all[..2].to_vec(),
        "only this node's endpoints"
    );
    assert_eq!(
        sources_of(&seen),
        vec![EXT_CLIENT_ADDR],
        "the client's own address is preserved"
    );
    let seen = whoami_udp(&lab.ext, to, 30);
    assert_eq!(sources_of(&seen), vec![EXT_CLIENT_ADDR]);
    // Pods on the node use the cluster-wide endpoints (kube-proxy's
    // short-circuit for internal traffic to external addresses).
    let from_pod = whoami_tcp(&lab.client.ns, to, 30);
    assert_eq!(pods_of(&from_pod), all);
    lab.assert_no_checksum_errors();
}

fn loadbalancer_ingress_is_served_and_source_ranges_let_only_those_sources_in(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let eps: Vec<Value> = all.iter().map(|p| ready(&lab, p)).collect();
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    let spec = |ranges: &[&str]| {
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.23",
        "loadBalancerSourceRanges": ranges, "ports": ports(true)})
    };
    publish(
        &mut lab,
        "lb",
        spec(&["10.77.0.0/24"]),
        status.clone(),
        eps.clone(),
    );
    let to = SocketAddrV4::new(LB_IP, 80);
    assert_eq!(
        pods_of(&whoami_tcp(&lab.ext, to, 30)),
        all,
        "the ingress address is served"
    );
    assert_eq!(pods_of(&whoami_udp(&lab.ext, to, 30)), all);
    // The NodePort fallback of a LoadBalancer Service.
    let np = SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT);
    assert_eq!(pods_of(&whoami_tcp(&lab.ext, np, 30)), all);

    publish(&mut lab, "lb", spec(&["10.99.0.0/16"]), status, eps);
    assert!(
        connect_fails(&lab.ext, to),
        "a source outside loadBalancerSourceRanges got in"
    );
    assert!(
        lab.datapath_stat("source_range_dropped") > 0,
        "the drop is counted"
    );
    // The NodePort is not subject to the ranges, as in kube-proxy.
    assert_eq!(pods_of(&whoami_tcp(&lab.ext, np, 30)), all);
    lab.assert_no_checksum_errors();
}

/// What a real cluster sends for a dual-stack Service whose primary family
/// is IPv6: its IPv4 ClusterIP, externalIP and LoadBalancer address are
/// served from pods and from the wire; the IPv6 ones do not take the
/// Service down.
fn a_dual_stack_service_is_served_on_its_ipv4_side_whatever_the_order(source: Source, wire: Wire) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let eps: Vec<Value> = all.iter().map(|p| ready(&lab, p)).collect();
    let spec = json!({"type": "LoadBalancer", "clusterIP": "fd00::50",
        "clusterIPs": ["fd00::50", "10.96.0.50"], "ipFamilies": ["IPv6", "IPv4"],
        "ipFamilyPolicy": "PreferDualStack",
        "externalIPs": ["2001:db8::50", EXTERNAL_IP.to_string()], "ports": ports(true)});
    let status =
        json!({"loadBalancer": {"ingress": [{"ip": "2001:db8::100"}, {"ip": LB_IP.to_string()}]}});
    publish(&mut lab, "dual", spec, status, eps);
    let cluster = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 50), 80);
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, cluster, 40)), all);
    assert_eq!(pods_of(&whoami_udp(&lab.client.ns, cluster, 40)), all);
    for to in [
        SocketAddrV4::new(EXTERNAL_IP, 80),
        SocketAddrV4::new(LB_IP, 80),
        SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT),
    ] {
        assert_eq!(pods_of(&whoami_tcp(&lab.ext, to, 40)), all, "{to}");
    }
    lab.assert_no_checksum_errors();
}

/// `loadBalancerSourceRanges` given by the older annotation, as kube-proxy
/// reads it when the spec has none.
fn source_ranges_given_by_annotation_are_honoured(source: Source, wire: Wire) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let eps: Vec<Value> = all.iter().map(|p| ready(&lab, p)).collect();
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    let spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.51", "ports": ports(true)});
    let to = SocketAddrV4::new(LB_IP, 80);
    for (ranges, allowed) in [("10.77.0.0/24, 10.1.0.0/16", true), ("10.99.0.0/16", false)] {
        let annotations = json!({"service.beta.kubernetes.io/load-balancer-source-ranges": ranges});
        lab.state.put_annotated_service(
            "ann",
            annotations,
            spec.clone(),
            status.clone(),
            eps.clone(),
        );
        if lab.agent_pid().is_some() {
            lab.apply_manifests().expect("agent picks up the change");
        } else {
            lab.write_manifests().unwrap();
            lab.agent().start().expect("start lb-agent");
        }
        if allowed {
            assert_eq!(pods_of(&whoami_tcp(&lab.ext, to, 40)), all, "{ranges}");
        } else {
            assert!(connect_fails(&lab.ext, to), "{ranges}: the client got in");
        }
    }
    lab.assert_no_checksum_errors();
}

/// Masqueraded traffic must never have been dropped for want of a port or
/// by a failed rewrite.
fn assert_no_nat_failures(lab: &Lab) {
    for name in ["snat_failed", "rewrite_failed", "backend_missing"] {
        assert_eq!(lab.datapath_stat(name), 0, "data path counter {name}");
    }
}

fn should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let eps = all.iter().map(|p| ready(&lab, p)).collect();
    publish(
        &mut lab,
        "ext",
        json!({"clusterIP": "10.96.0.24",
        "externalIPs": [EXTERNAL_IP.to_string()], "ports": ports(false)}),
        json!({}),
        eps,
    );
    let to = SocketAddrV4::new(EXTERNAL_IP, 80);
    let seen = whoami_tcp(&lab.ext, to, 30);
    assert_eq!(pods_of(&seen), all);
    assert_eq!(
        sources_of(&seen),
        vec![NODE_WIRE_ADDR],
        "masqueraded like a NodePort"
    );
    assert_eq!(pods_of(&whoami_udp(&lab.ext, to, 30)), all);
    lab.assert_no_checksum_errors();
    assert_no_nat_failures(&lab);
}

fn affinity_spec(kind: &str, affinity: Option<u32>) -> Value {
    let mut spec =
        json!({"type": kind, "clusterIP": "10.96.0.25", "ports": ports(kind == "NodePort")});
    if let Some(t) = affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    spec
}

fn check_affinity(lab: &mut Lab, kind: &str, ns_ext: bool) {
    let all = pod_names(lab);
    let eps: Vec<Value> = all.iter().map(|p| ready(lab, p)).collect();
    let to = if kind == "NodePort" {
        SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 25), 80)
    };
    publish(
        lab,
        "aff",
        affinity_spec(kind, Some(600)),
        json!({}),
        eps.clone(),
    );
    let client = if ns_ext { &lab.ext } else { &lab.client.ns };
    let seen = whoami_tcp(client, to, 30);
    assert_eq!(
        pods_of(&seen).len(),
        1,
        "ClientIP affinity: one backend for 30 connections: {seen:?}"
    );
    let seen = whoami_udp(client, to, 30);
    assert_eq!(
        pods_of(&seen).len(),
        1,
        "ClientIP affinity for UDP flows: {seen:?}"
    );

    // should be able to switch session affinity
    publish(
        lab,
        "aff",
        affinity_spec(kind, None),
        json!({}),
        eps.clone(),
    );
    let client = if ns_ext { &lab.ext } else { &lab.client.ns };
    let seen = whoami_tcp(client, to, 40);
    assert!(
        pods_of(&seen).len() > 1,
        "affinity off: connections spread: {seen:?}"
    );
    publish(
        lab,
        "aff",
        affinity_spec(kind, Some(600)),
        json!({}),
        eps.clone(),
    );
    let client = if ns_ext { &lab.ext } else { &lab.client.ns };
    let seen = whoami_tcp(client, to, 30);
    assert_eq!(pods_of(&seen).len(), 1, "affinity back on: {seen:?}");

    // should have session affinity timeout work: after the timeout a new
    // connection is balanced afresh; over several rounds it lands elsewhere.
    publish(lab, "aff", affinity_spec(kind, Some(1)), json!({}), eps);
    let client = if ns_ext { &lab.ext } else { &lab.client.ns };
    let first = pods_of(&whoami_tcp(client, to, 5));
    assert_eq!(first.len(), 1, "within the timeout: one backend");
    let mut moved = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        let now = pods_of(&whoami_tcp(client, to, 1));
        if now != first {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "after the affinity timeout the client never reached another backend in 8 tries"
    );
    lab.assert_no_checksum_errors();
}

fn should_have_session_affinity_work_switch_and_time_out_for_service_with_type_clusterip(
    source: Source,
    _wire: Wire,
) {
    let mut lab = lab_on(source, Wire::Software);
    check_affinity(&mut lab, "ClusterIP", false);
}

fn should_have_session_affinity_work_switch_and_time_out_for_nodeport_service(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    check_affinity(&mut lab, "NodePort", true);
}

fn should_allow_pods_to_hairpin_back_to_themselves_through_services(source: Source, _wire: Wire) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let eps = vec![ready(&lab, &all[0])];
    publish(
        &mut lab,
        "hairpin",
        json!({"clusterIP": "10.96.0.26", "ports": ports(false)}),
        json!({}),
        eps,
    );
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 26), 80);
    let pod = &lab.pods[&all[0]];
    let seen = whoami_tcp(&pod.ns, to, 30);
    assert_eq!(
        pods_of(&seen),
        vec![all[0].clone()],
        "the pod reaches itself"
    );
    assert_eq!(
        sources_of(&seen),
        vec![NODE_WIRE_ADDR],
        "hairpin traffic is masqueraded to the node"
    );
    let seen = whoami_udp(&pod.ns, to, 30);
    assert_eq!(pods_of(&seen), vec![all[0].clone()]);
    lab.assert_no_checksum_errors();
    assert_no_nat_failures(&lab);
}

fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster(
    source: Source,
    _wire: Wire,
) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 27), 80);
    // One ready, two serving and terminating: only the ready one gets new flows.
    let eps = vec![
        ready(&lab, &all[0]),
        endpoint(&lab, &all[1], false, true, true, NODE_NAME),
        endpoint(&lab, &all[2], false, true, true, NODE_NAME),
    ];
    publish(
        &mut lab,
        "term",
        json!({"clusterIP": "10.96.0.27", "ports": ports(false)}),
        json!({}),
        eps,
    );
    assert_eq!(
        pods_of(&whoami_tcp(&lab.client.ns, to, 30)),
        vec![all[0].clone()]
    );
    // No ready endpoint left: the serving terminating ones take traffic.
    let eps = vec![
        endpoint(&lab, &all[1], false, true, true, NODE_NAME),
        endpoint(&lab, &all[2], false, true, true, NODE_NAME),
        endpoint(&lab, &all[0], false, false, true, NODE_NAME),
    ];
    publish(
        &mut lab,
        "term",
        json!({"clusterIP": "10.96.0.27", "ports": ports(false)}),
        json!({}),
        eps,
    );
    assert_eq!(
        pods_of(&whoami_tcp(&lab.client.ns, to, 30)),
        all[1..].to_vec()
    );
    assert_eq!(
        pods_of(&whoami_udp(&lab.client.ns, to, 30)),
        all[1..].to_vec()
    );
}

fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_external_traffic_policy_local(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let eps = local_terminating_remote_ready(&lab, &all);
    publish(
        &mut lab,
        "termlocal",
        json!({"type": "NodePort", "clusterIP": "10.96.0.28",
        "externalTrafficPolicy": "Local", "ports": ports(true)}),
        json!({}),
        eps,
    );
    let to = SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT);
    let seen = whoami_tcp(&lab.ext, to, 30);
    assert_eq!(
        pods_of(&seen),
        vec![all[0].clone()],
        "the local serving terminating endpoint"
    );
    assert_eq!(sources_of(&seen), vec![EXT_CLIENT_ADDR]);
    lab.assert_no_checksum_errors();
}

fn should_respect_internal_traffic_policy_local_pod_to_pod(source: Source, _wire: Wire) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let eps = vec![
        ready(&lab, &all[0]),
        endpoint(&lab, &all[1], true, true, false, "other-node"),
        endpoint(&lab, &all[2], true, true, false, "other-node"),
    ];
    publish(
        &mut lab,
        "itp",
        json!({"clusterIP": "10.96.0.29", "internalTrafficPolicy": "Local",
        "ports": ports(false)}),
        json!({}),
        eps,
    );
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 29), 80);
    let seen = whoami_tcp(&lab.client.ns, to, 30);
    assert_eq!(
        pods_of(&seen),
        vec![all[0].clone()],
        "only this node's endpoint"
    );
    assert_eq!(
        sources_of(&seen),
        vec![lb_lab::CLIENT_POD_ADDR],
        "source pod IP preserved"
    );
    assert_eq!(
        pods_of(&whoami_udp(&lab.client.ns, to, 30)),
        vec![all[0].clone()]
    );
}

fn should_fail_health_check_node_port_if_there_are_only_terminating_endpoints(
    source: Source,
    wire: Wire,
) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.31",
        "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100, "ports": ports(true)});
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    let health = SocketAddr::V4(SocketAddrV4::new(NODE_WIRE_ADDR, 32100));
    let check = |lab: &Lab| -> (u16, Value) {
        let (code, body) = lab
            .ext
            .run_in(|| lb_lab::http_get(health, "/healthz", TIMEOUT))
            .expect("health check answers");
        (code, serde_json::from_str(&body).expect("JSON body"))
    };
    // Two local ready endpoints (one remote one does not count).
    let eps = vec![
        ready(&lab, &all[0]),
        ready(&lab, &all[1]),
        endpoint(&lab, &all[2], true, true, false, "other-node"),
    ];
    publish(&mut lab, "hc", spec.clone(), status.clone(), eps);
    let (code, body) = check(&lab);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["localEndpoints"], 2, "{body}");
    assert_eq!(body["service"]["name"], "hc");
    // Only terminating local endpoints (still serving): unhealthy, so the
    // load balancer drains the node, while the data path still uses them.
    let eps = vec![
        endpoint(&lab, &all[0], false, true, true, NODE_NAME),
        endpoint(&lab, &all[1], false, true, true, NODE_NAME),
        endpoint(&lab, &all[2], true, true, false, "other-node"),
    ];
    publish(&mut lab, "hc", spec, status, eps);
    let (code, body) = check(&lab);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["localEndpoints"], 0);
    let seen = whoami_tcp(&lab.ext, SocketAddrV4::new(LB_IP, 80), 30);
    assert_eq!(
        pods_of(&seen),
        all[..2].to_vec(),
        "terminating local endpoints still serve"
    );
    // Deleted Service: the port closes.
    lab.state.extra_manifests.remove("hc.yaml");
    lab.apply_manifests().unwrap();
    assert!(connect_fails(
        &lab.ext,
        SocketAddrV4::new(NODE_WIRE_ADDR, 32100)
    ));
    lab.assert_no_checksum_errors();
}

/// Sends from one UDP socket (one flow) until `want` answers, bounded.
fn udp_flow_reaches(sock: &std::net::UdpSocket, want: &str, tries: usize) -> Vec<String> {
    let mut answers = Vec::new();
    for _ in 0..tries {
        sock.send(b"hello").expect("send");
        let mut buf = [0u8; 256];
        if let Ok(n) = sock.recv(&mut buf) {
            let a = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = a == want;
            answers.push(a);
            if done {
                break;
            }
        } else {
            answers.push("(no answer)".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    answers
}

fn check_udp_flow_follows_pod_cycle(node_port: bool, source: Source, wire: Wire) {
    let mut lab = lab_on(source, wire);
    let all = pod_names(&lab);
    let ty = if node_port { "NodePort" } else { "ClusterIP" };
    let spec = json!({"type": ty, "clusterIP": "10.96.0.33", "ports": ports(node_port)});
    let (first_eps, second_eps) = (vec![ready(&lab, &all[0])], vec![ready(&lab, &all[1])]);
    publish(&mut lab, "udp", spec.clone(), json!({}), first_eps);
    let (to, ns) = if node_port {
        (SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT), &lab.ext)
    } else {
        (
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 33), 80),
            &lab.client.ns,
        )
    };
    // One socket, one flow, kept across the change, as the e2e client does.
    let sock = ns.run_in(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    });
    let first = udp_flow_reaches(&sock, &all[0], 20);
    assert_eq!(
        first.last(),
        Some(&all[0]),
        "the flow reaches the first pod: {first:?}"
    );
    // The server pod is replaced: its endpoint goes, a new one comes.
    publish(&mut lab, "udp", spec, json!({}), second_eps);
    let after = udp_flow_reaches(&sock, &all[1], 20);
    assert_eq!(
        after.last(),
        Some(&all[1]),
        "the same UDP flow must move to the new pod: {after:?}"
    );
    assert!(after.len() <= 2, "the flow moved late: {after:?}");
    lab.assert_no_checksum_errors();
}

fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service(
    source: Source,
    _wire: Wire,
) {
    check_udp_flow_follows_pod_cycle(false, source, Wire::Software);
}

fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service(
    source: Source,
    wire: Wire,
) {
    check_udp_flow_follows_pod_cycle(true, source, wire);
}

fn should_be_able_to_change_the_type_from_external_name_to_cluster_ip_and_back(
    source: Source,
    _wire: Wire,
) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let eps: Vec<Value> = all.iter().map(|p| ready(&lab, p)).collect();
    let external_name = json!({"type": "ExternalName", "externalName": "db.example.com"});
    publish(
        &mut lab,
        "en",
        external_name.clone(),
        json!({}),
        eps.clone(),
    );
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 34), 80);
    assert!(
        connect_fails(&lab.client.ns, to),
        "an ExternalName Service has no virtual IP"
    );
    publish(
        &mut lab,
        "en",
        json!({"type": "ClusterIP", "clusterIP": "10.96.0.34", "ports": ports(false)}),
        json!({}),
        eps.clone(),
    );
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, to, 30)), all);
    publish(&mut lab, "en", external_name, json!({}), eps);
    assert!(
        connect_fails(&lab.client.ns, to),
        "back to ExternalName: the ClusterIP is gone"
    );
}

/// A lab whose two pods listen on two TCP ports (80 "http", 81 "admin"),
/// with a Service over them built by the lab's controller.
fn multiport_lab(source: Source, service_ports: Value) -> Lab {
    let yaml = format!(
        r"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: multi}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: multi}}}}
  template:
    metadata: {{labels: {{app: multi}}}}
    spec:
      containers:
      - name: server
        image: lab-server
        ports:
        - {{containerPort: 80, name: http}}
        - {{containerPort: 81, name: admin}}
---
apiVersion: v1
kind: Service
metadata: {{name: multi}}
spec:
  clusterIP: 10.96.0.40
  selector: {{app: multi}}
  ports: {service_ports}
"
    );
    let (objects, _) = lb_kube_fixtures::workload::parse_lab_objects(&yaml).expect("parse");
    let mut lab = Lab::from_objects_with(source, Wire::Software, objects).expect("build the lab");
    lab.agent().start().expect("start lb-agent");
    lab
}

fn set_multi_ports(lab: &mut Lab, ports: Value) {
    for o in &mut lab.state.objects {
        if let lb_kube_fixtures::workload::LabObject::Service(s) = o {
            s.spec.as_mut().unwrap().ports = Some(serde_json::from_value(ports.clone()).unwrap());
        }
    }
    lab.apply_manifests().expect("agent picks up the ports");
}

fn should_serve_multiport_endpoints_from_pods(source: Source, _wire: Wire) {
    let lab = multiport_lab(
        source,
        json!([
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "admin", "port": 8081, "targetPort": "admin"}
        ]),
    );
    let pods = pod_names(&lab);
    assert_eq!(pods.len(), 2);
    for port in [80, 8081] {
        let seen = whoami_tcp(
            &lab.client.ns,
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), port),
            20,
        );
        assert_eq!(pods_of(&seen), pods, "Service port {port}");
    }
    lab.assert_no_checksum_errors();
}

fn should_be_updated_after_adding_or_deleting_ports(source: Source, _wire: Wire) {
    let mut lab = multiport_lab(
        source,
        json!([{"name": "http", "port": 80, "targetPort": "http"}]),
    );
    let pods = pod_names(&lab);
    let addr = |port| SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), port);
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, addr(80), 30)), pods);
    assert!(
        connect_fails(&lab.client.ns, addr(8081)),
        "port not added yet"
    );
    set_multi_ports(
        &mut lab,
        json!([
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "admin", "port": 8081, "targetPort": "admin"}
        ]),
    );
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, addr(80), 30)), pods);
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, addr(8081), 30)), pods);
    set_multi_ports(
        &mut lab,
        json!([{"name": "admin", "port": 8081, "targetPort": "admin"}]),
    );
    assert!(
        connect_fails(&lab.client.ns, addr(80)),
        "deleted port still served"
    );
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, addr(8081), 30)), pods);
}

fn topology_hints_keep_traffic_in_the_node_zone_when_every_endpoint_has_one(
    source: Source,
    _wire: Wire,
) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let hinted = |lab: &Lab, pod: &str, zone: &str| {
        let mut e = ready(lab, pod);
        e["hints"] = json!({"forZones": [{"name": zone}]});
        e
    };
    let spec = json!({"clusterIP": "10.96.0.35", "trafficDistribution": "PreferClose",
        "ports": ports(false)});
    let eps = vec![
        hinted(&lab, &all[0], "zone-a"),
        hinted(&lab, &all[1], "zone-a"),
        hinted(&lab, &all[2], "zone-b"),
    ];
    // The agent runs in zone-a.
    publish_without_agent(&mut lab, "topo", spec.clone(), eps);
    lab.agent()
        .flags(&["--zone", "zone-a"])
        .start()
        .expect("start lb-agent");
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 35), 80);
    assert_eq!(
        pods_of(&whoami_tcp(&lab.client.ns, to, 30)),
        all[..2].to_vec()
    );
    // One endpoint without a hint: hints are ignored, as kube-proxy does.
    let mut eps = vec![
        hinted(&lab, &all[0], "zone-a"),
        hinted(&lab, &all[1], "zone-a"),
        ready(&lab, &all[2]),
    ];
    eps[2]["hints"] = Value::Null;
    publish(&mut lab, "topo", spec, json!({}), eps);
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, to, 40)), all);
}

fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local(
    source: Source,
    _wire: Wire,
) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let eps = local_terminating_remote_ready(&lab, &all);
    publish(
        &mut lab,
        "itpterm",
        json!({"clusterIP": "10.96.0.36", "internalTrafficPolicy": "Local", "ports": ports(false)}),
        json!({}),
        eps,
    );
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 36), 80);
    assert_eq!(
        pods_of(&whoami_tcp(&lab.client.ns, to, 30)),
        vec![all[0].clone()]
    );
    assert_eq!(
        pods_of(&whoami_udp(&lab.client.ns, to, 30)),
        vec![all[0].clone()]
    );
}

fn publish_not_ready_addresses_serves_endpoints_that_are_not_ready(source: Source, _wire: Wire) {
    let mut lab = lab_on(source, Wire::Software);
    let all = pod_names(&lab);
    let not_ready: Vec<Value> = all
        .iter()
        .map(|p| endpoint(&lab, p, false, false, false, NODE_NAME))
        .collect();
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 37), 80);
    let spec = |publish_not_ready: bool| {
        json!({"clusterIP": "10.96.0.37", "publishNotReadyAddresses": publish_not_ready,
            "ports": ports(false)})
    };
    publish(&mut lab, "pnr", spec(false), json!({}), not_ready.clone());
    assert!(
        connect_fails(&lab.client.ns, to),
        "not-ready endpoints must not serve"
    );
    // The Service flag alone changes nothing (kube-proxy reads the slice)...
    publish(&mut lab, "pnr", spec(true), json!({}), not_ready);
    assert!(
        connect_fails(&lab.client.ns, to),
        "the slice still says not ready"
    );
    // ...until the EndpointSlice controller rewrites the slice for it: the
    // same pods, ready (published), not serving.
    let published: Vec<Value> = all
        .iter()
        .map(|p| endpoint(&lab, p, true, false, false, NODE_NAME))
        .collect();
    publish(&mut lab, "pnr", spec(true), json!({}), published);
    assert_eq!(pods_of(&whoami_tcp(&lab.client.ns, to, 30)), all);
}
