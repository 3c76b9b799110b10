//! Socket-level load balancing in the lab: clients run as their own
//! processes (`lab-client`) inside the lab's cgroup, where the agent's
//! connect/sendmsg/recvmsg/getpeername hooks (both families) apply.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    process::Stdio,
};

use lb_kube_fixtures::workload::LabObject;
use lb_lab::{
    capabilities, privileged_test, sibling_binary, Lab, Netns, CLIENT_POD_ADDR, NODE_WIRE_ADDR,
};
use serde_json::json;

const NGINX: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// An IPv6-only Service over the nginx pods.
const NGINX6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
const NODE_PORT: u16 = 30080;

/// The nginx example plus a NodePort Service and an IPv6-only Service over
/// the same pods, with the agent in socket LB mode `mode`.
fn lab(mode: &str) -> Lab {
    lab_with_agent_under(mode, Vec::new())
}

/// `lab(mode)` with the agent started under `wrapper` (see
/// `Lab::agent_wrapper`).
fn lab_with_agent_under(mode: &str, wrapper: Vec<String>) -> Lab {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let mut lab = Lab::from_manifest_files(&[example]).expect("build the lab");
    let np = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "nginx-np", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.11", "selector": {"app": "nginx"},
            "ports": [{"name": "http", "port": 80, "targetPort": 80, "nodePort": NODE_PORT},
                      {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 80, "nodePort": NODE_PORT}]}});
    let v6 = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "nginx-ipv6", "namespace": "default"},
        "spec": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"],
            "clusterIP": NGINX6.to_string(), "clusterIPs": [NGINX6.to_string()],
            "selector": {"app": "nginx"},
            "ports": [{"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 80}]}});
    for svc in [np, v6] {
        lab.state
            .objects
            .push(LabObject::Service(serde_json::from_value(svc).unwrap()));
    }
    lab.write_manifests().unwrap();
    lab.agent_wrapper = wrapper;
    lab.agent()
        .flags(&["--socket-lb", mode])
        .start()
        .expect("start lb-agent");
    lab
}

/// Runs lab-client in `ns` and the lab's cgroup; its output lines split
/// at the tab.
fn client(lab: &Lab, ns: &Netns, args: &[&str]) -> Vec<(String, String)> {
    let bin = sibling_binary("lab-client", "LAB_CLIENT_BIN").expect("lab-client binary");
    let out = lab
        .command_in_cgroup(ns, &bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run lab-client");
    assert!(
        out.status.success(),
        "lab-client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once('\t').unwrap_or((l, ""));
            (a.to_owned(), b.to_owned())
        })
        .collect()
}

/// The pods that answered; panics on an error line.
fn answering_pods(lines: &[(String, String)]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|(_, answer)| {
            assert!(!answer.starts_with("error"), "a request failed: {lines:?}");
            answer.split(' ').next().unwrap_or_default().to_owned()
        })
        .collect()
}

fn peers(lines: &[(String, String)]) -> BTreeSet<String> {
    lines.iter().map(|(p, _)| p.clone()).collect()
}

fn all_pods(lab: &Lab) -> BTreeSet<String> {
    lab.pods.keys().cloned().collect()
}

#[privileged_test]
fn should_function_for_node_service_http() {
    let lab = lab("all");
    for to in [
        SocketAddrV4::new(NGINX, 80),
        SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT),
    ] {
        node_reaches_over_tcp(&lab, &SocketAddr::V4(to));
    }
    assert!(lab.datapath_stat("sock_translated") >= 60);
}

/// A dual-stack (AF_INET6) socket reaching an IPv4 Service by its
/// IPv4-mapped address goes through connect6 and getpeername6 to the IPv4
/// maps, and sees the mapped Service address as its peer.
#[privileged_test]
fn a_dual_stack_socket_reaches_an_ipv4_service_by_its_ipv4_mapped_address() {
    let lab = lab("all");
    for to in [
        SocketAddrV4::new(NGINX, 80),
        SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT),
    ] {
        let mapped = SocketAddrV6::new(to.ip().to_ipv6_mapped(), to.port(), 0, 0);
        node_reaches_over_tcp(&lab, &SocketAddr::V6(mapped));
    }
    assert!(lab.datapath_stat("sock_translated") >= 60);
}

/// 30 TCP connections of a node process to `to` reach every pod, and
/// getpeername shows `to`, the address the process connected to.
fn node_reaches_over_tcp(lab: &Lab, to: &SocketAddr) {
    let lines = client(lab, &lab.node, &["tcp", &to.to_string(), "30"]);
    assert_eq!(
        answering_pods(&lines),
        all_pods(lab),
        "a node process reaches {to}"
    );
    assert_eq!(
        peers(&lines),
        BTreeSet::from([to.to_string()]),
        "getpeername shows the address the process connected to"
    );
}

#[privileged_test]
fn should_function_for_node_service_udp() {
    let lab = lab("all");
    for to in [
        SocketAddrV4::new(NGINX, 80),
        SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT),
    ] {
        let lines = client(&lab, &lab.node, &["udp", &to.to_string(), "30"]);
        assert_eq!(
            answering_pods(&lines),
            all_pods(&lab),
            "a node process reaches {to}"
        );
        assert_eq!(
            peers(&lines),
            BTreeSet::from([to.to_string()]),
            "replies come from the address the process sent to"
        );
    }
}

#[privileged_test]
fn a_pod_connection_shows_the_pod_to_the_backend_and_the_service_to_the_client() {
    let lab = lab("all");
    let to = SocketAddrV4::new(NGINX, 80);
    let lines = client(&lab, &lab.client.ns, &["tcp", &to.to_string(), "30"]);
    assert_eq!(answering_pods(&lines), all_pods(&lab));
    assert_eq!(
        peers(&lines),
        BTreeSet::from([to.to_string()]),
        "getpeername"
    );
    for (_, answer) in &lines {
        let seen = answer.split(' ').nth(1).unwrap_or_default();
        assert!(
            seen.starts_with(&format!("{CLIENT_POD_ADDR}:")),
            "the backend sees the pod's own address: {answer}"
        );
    }
    let lines = client(&lab, &lab.client.ns, &["udp", &to.to_string(), "30"]);
    assert_eq!(answering_pods(&lines), all_pods(&lab));
    assert_eq!(peers(&lines), BTreeSet::from([to.to_string()]));
    // Translated at the socket: no packet of these flows was translated.
    assert_eq!(lab.datapath_stat("service_forwarded"), 0);
    assert!(lab.datapath_stat("sock_translated") >= 60);
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn socket_lb_off_leaves_the_packet_paths_doing_the_work() {
    let lab = lab("off");
    let to = SocketAddrV4::new(NGINX, 80);
    let lines = client(&lab, &lab.client.ns, &["tcp", &to.to_string(), "30"]);
    assert_eq!(answering_pods(&lines), all_pods(&lab));
    assert_eq!(peers(&lines), BTreeSet::from([to.to_string()]));
    let lines = client(&lab, &lab.client.ns, &["udp", &to.to_string(), "30"]);
    assert_eq!(answering_pods(&lines), all_pods(&lab));
    assert_eq!(lab.datapath_stat("sock_translated"), 0);
    assert!(
        lab.datapath_stat("service_forwarded") >= 60,
        "tc translated them"
    );
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn socket_lb_host_mode_translates_host_sockets_only() {
    let lab = lab("host");
    let to = SocketAddrV4::new(NGINX, 80);
    let lines = client(&lab, &lab.client.ns, &["tcp", &to.to_string(), "30"]);
    assert_eq!(answering_pods(&lines), all_pods(&lab));
    assert_eq!(
        lab.datapath_stat("sock_translated"),
        0,
        "pods use the packet path"
    );
    let lines = client(&lab, &lab.node, &["tcp", &to.to_string(), "30"]);
    assert_eq!(answering_pods(&lines), all_pods(&lab));
    assert_eq!(
        lab.datapath_stat("sock_translated"),
        30,
        "the node's sockets are translated"
    );
}

/// A connected UDP client keeps sending (one datagram per 100 ms) while
/// the backend it uses is deleted; returns its lines before and after.
fn connected_udp_across_backend_deletion(
    lab: &mut Lab,
    from_node: bool,
    to: &str,
) -> (String, Vec<(String, String)>) {
    use std::io::BufRead;
    let bin = sibling_binary("lab-client", "LAB_CLIENT_BIN").expect("lab-client binary");
    let ns = if from_node { &lab.node } else { &lab.client.ns };
    let mut child = lab
        .command_in_cgroup(ns, &bin)
        .args(["udp-connected", to, "80", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start lab-client");
    let stdout = child.stdout.take().unwrap();
    let guard = lb_lab::ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let (a, b) = line.split_once('\t').unwrap_or((&line, ""));
            if tx.send((a.to_owned(), b.to_owned())).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(std::time::Duration::from_secs(3))
            .expect("lab-client went quiet")
    };
    let (_, first) = next();
    let used = first.split(' ').next().unwrap_or_default().to_owned();
    assert!(lab.pods.contains_key(&used), "first answer: {first}");
    lab.state.excluded.insert(used.clone());
    lab.apply_manifests().expect("backend deleted");
    // Drain what was sent before the change landed, then watch.
    let mut after = Vec::new();
    for _ in 0..15 {
        after.push(next());
    }
    drop(guard);
    (used, after)
}

#[privileged_test]
fn a_connected_udp_client_of_a_deleted_backend_reaches_a_live_one() {
    // (The IPv4-mapped twin is the next test.)
    // Last, the node's case with the agent holding only the DaemonSet's
    // capabilities: closing another process's socket (sock_diag destroy)
    // is the one privilege that path adds.
    let daemon_set_caps =
        capabilities::like_a_container_with(&capabilities::daemon_set_capabilities());
    for (from_node, wrapper) in [
        (false, Vec::new()),
        (true, Vec::new()),
        (true, daemon_set_caps),
    ] {
        let who = match (from_node, wrapper.is_empty()) {
            (false, _) => "pod",
            (true, true) => "node process",
            (true, false) => "node process, agent with the DaemonSet's capabilities",
        };
        let mut lab = lab_with_agent_under("all", wrapper);
        let to = SocketAddrV4::new(NGINX, 80).to_string();
        let (gone, after) = connected_udp_across_backend_deletion(&mut lab, from_node, &to);
        let last: Vec<&str> = after[after.len() - 5..]
            .iter()
            .map(|(_, a)| a.split(' ').next().unwrap_or_default())
            .collect();
        assert!(
            last.iter().all(|p| lab.pods.contains_key(*p) && *p != gone),
            "{who}: the last datagrams must reach a live backend, not {gone}: {after:?}"
        );
        if from_node {
            // Translated at connect(): the agent closed the socket, the
            // client saw it and connected again.
            assert!(
                after.iter().any(|(_, a)| a == "reconnected"),
                "{who}: {after:?}"
            );
        } else {
            // Per packet: the flow moved with no error at all.
            assert!(
                after.iter().all(|(_, a)| !a.starts_with("error")),
                "{who}: {after:?}"
            );
        }
    }
}

/// A node process's dual-stack UDP socket connected to an IPv4 Service by
/// its IPv4-mapped address (connect6 through the IPv4 maps) is closed by
/// the agent when its backend is deleted, as an IPv4 socket is: sock_diag
/// finds it among the IPv6 sockets, connected to `::ffff:` the backend.
#[privileged_test]
fn a_dual_stack_udp_socket_of_a_deleted_backend_is_closed_and_reconnects() {
    let mut lab = lab("all");
    let to = SocketAddrV6::new(NGINX.to_ipv6_mapped(), 80, 0, 0).to_string();
    let (gone, after) = connected_udp_across_backend_deletion(&mut lab, true, &to);
    assert_closed_and_reconnected(&lab, &gone, &after);
}

/// A node process's IPv6 UDP socket connected to an IPv6 ClusterIP
/// (connect6 through the IPv6 maps, the socket connected to the backend's
/// IPv6 address) is closed when its backend is deleted, and reconnects.
#[privileged_test]
fn an_ipv6_udp_socket_of_a_deleted_backend_is_closed_and_reconnects() {
    let mut lab = lab("all");
    let to = SocketAddrV6::new(NGINX6, 80, 0, 0).to_string();
    let (gone, after) = connected_udp_across_backend_deletion(&mut lab, true, &to);
    assert_closed_and_reconnected(&lab, &gone, &after);
}

/// The agent closed the node's socket (the client saw it and connected
/// again), and the last datagrams reached a live backend, not `gone`.
fn assert_closed_and_reconnected(lab: &Lab, gone: &str, after: &[(String, String)]) {
    assert!(
        after.iter().any(|(_, a)| a == "reconnected"),
        "the agent closed the socket: {after:?}"
    );
    let last: Vec<&str> = after[after.len() - 5..]
        .iter()
        .map(|(_, a)| a.split(' ').next().unwrap_or_default())
        .collect();
    assert!(
        last.iter().all(|p| lab.pods.contains_key(*p) && *p != gone),
        "the last datagrams must reach a live backend, not {gone}: {after:?}"
    );
}
