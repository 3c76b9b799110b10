//! Lab tests: real sockets through the real programs, in a node built from
//! network namespaces (see the lb_lab crate). Links between node and pods
//! finalize checksums; tests that send from the external client run on both
//! kinds of wire (partial checksums from a software peer, complete ones
//! from a NIC), so a checksum mistake shows up as a failed request or a
//! counted error.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_lab::{ask_on, in_netns, on_each_wire, privileged_test, tcp_ask, udp_ask, Lab, Wire};

const TIMEOUT: Duration = Duration::from_secs(2);
const NGINX: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn nginx_lab() -> Lab {
    nginx_lab_on(Wire::Software)
}

fn nginx_lab_on(wire: Wire) -> Lab {
    let mut lab = Lab::from_manifest_files_on(wire, &[example("nginx-deployment.yaml")])
        .expect("build the lab");
    assert_eq!(lab.pods.len(), 3, "the example Deployment has 3 replicas");
    lab.agent().start().expect("start lb-agent");
    lab
}

/// Sends `n` TCP requests (new connection each) and `n` UDP requests and
/// counts the answering pods; every request must succeed.
fn spread(
    lab: &Lab,
    from_ext: bool,
    to: SocketAddrV4,
    n: usize,
) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let ns = if from_ext { &lab.ext } else { &lab.client.ns };
    ns.run_in(|| {
        let (mut tcp, mut udp) = (BTreeMap::new(), BTreeMap::new());
        for i in 0..n {
            let pod = tcp_ask(to, "hello", TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP request {i} to {to} failed: {e}"));
            *tcp.entry(pod).or_insert(0) += 1;
            let (pod, from) = udp_ask(to, "hello", TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP request {i} to {to} failed: {e}"));
            assert_eq!(
                from,
                SocketAddr::V4(to),
                "UDP reply must come from the Service address"
            );
            *udp.entry(pod).or_insert(0) += 1;
        }
        (tcp, udp)
    })
}

fn assert_fair(lab: &Lab, counts: &BTreeMap<String, usize>, total: usize, what: &str) {
    let pods = lab.pods.len();
    assert_eq!(
        counts.len(),
        pods,
        "{what}: every backend must answer: {counts:?}"
    );
    for (pod, n) in counts {
        assert!(lab.pods.contains_key(pod), "{what}: unknown answer {pod:?}");
        assert!(
            *n * pods * 2 >= total,
            "{what}: {pod} got {n} of {total}, under half its fair share: {counts:?}"
        );
    }
}

#[privileged_test]
fn client_pod_reaches_every_backend_of_a_cluster_ip_over_tcp_and_udp() {
    let lab = nginx_lab();
    let (tcp, udp) = spread(&lab, false, SocketAddrV4::new(NGINX, 80), 300);
    assert_fair(&lab, &tcp, 300, "TCP");
    assert_fair(&lab, &udp, 300, "UDP");
    lab.assert_no_checksum_errors();
}

on_each_wire!(
    external_client_reaches_every_backend_of_a_cluster_ip,
    should_be_rejected_when_no_endpoints_exist,
);

fn external_client_reaches_every_backend_of_a_cluster_ip(wire: Wire) {
    let lab = nginx_lab_on(wire);
    let (tcp, udp) = spread(&lab, true, SocketAddrV4::new(NGINX, 80), 150);
    assert_fair(&lab, &tcp, 150, "TCP from the wire");
    assert_fair(&lab, &udp, 150, "UDP from the wire");
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn source_pod_ip_is_preserved_to_the_backend() {
    let lab = nginx_lab();
    let answer = lab
        .client
        .ns
        .run_in(|| tcp_ask(SocketAddrV4::new(NGINX, 80), "whoami", TIMEOUT))
        .expect("whoami");
    let seen = answer
        .split_whitespace()
        .nth(1)
        .expect("server answers name and peer");
    assert!(
        seen.starts_with(&format!("{}:", lab.client.ip)),
        "backend saw {seen}, not the client pod"
    );
}

#[privileged_test]
fn a_connection_keeps_its_backend_for_its_whole_life() {
    let mut lab = nginx_lab();
    let to = SocketAddrV4::new(NGINX, 80);
    let (tx_open, rx_open) = std::sync::mpsc::channel();
    let (tx_done, rx_done) = std::sync::mpsc::channel::<()>();
    let ns_path = lab.client.ns.path();
    let client = std::thread::spawn(move || {
        in_netns(&ns_path, move || {
            let mut conn =
                TcpStream::connect_timeout(&SocketAddr::V4(to), TIMEOUT).expect("connect");
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            let first = ask_on(&mut conn, "hello").expect("first request");
            tx_open.send(first.clone()).unwrap();
            // Keep talking while other connections churn and a backend goes.
            let mut answers = vec![first];
            let deadline = Instant::now() + Duration::from_secs(20);
            while rx_done.try_recv().is_err() && Instant::now() < deadline {
                answers.push(ask_on(&mut conn, "hello").expect("request on the kept connection"));
                std::thread::sleep(Duration::from_millis(20));
            }
            answers
        })
    });
    let mine = rx_open
        .recv_timeout(Duration::from_secs(5))
        .expect("the kept connection opened");
    lab.client.ns.run_in(|| {
        for _ in 0..100 {
            tcp_ask(to, "hello", TIMEOUT).expect("churn connection");
        }
    });
    let other = lab.pods.keys().find(|p| **p != mine).unwrap().clone();
    lab.state.excluded.insert(other);
    lab.apply_manifests().expect("apply");
    std::thread::sleep(Duration::from_millis(300));
    tx_done.send(()).unwrap();
    let answers = client.join().expect("client thread");
    assert!(
        answers.len() > 5,
        "too few requests on the kept connection: {}",
        answers.len()
    );
    assert!(
        answers.iter().all(|a| *a == mine),
        "the connection changed backend: {answers:?}"
    );
    lab.assert_no_checksum_errors();
}

fn should_be_rejected_when_no_endpoints_exist(wire: Wire) {
    let mut lab =
        Lab::from_manifest_files_on(wire, &[example("nginx-deployment.yaml")]).expect("lab");
    lab.state.extra_manifests.insert(
        "empty.yaml".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  clusterIP: 10.96.0.99\n  selector: {app: nothing-matches}\n  ports: [{name: tcp, port: 80}, {name: udp, port: 80, protocol: UDP}]\n".into(),
    );
    lab.write_manifests().unwrap();
    lab.agent().start().expect("agent");
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 80);
    // Several times each: a refusal must come every time, not only once.
    for (who, ns) in [
        ("client pod", &lab.client.ns),
        ("external client", &lab.ext),
    ] {
        for attempt in 0..5 {
            let (result, elapsed) = ns.run_in(|| {
                let started = Instant::now();
                (
                    TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5)),
                    started.elapsed(),
                )
            });
            let err = result.err().unwrap_or_else(|| {
                panic!("{who}: connecting to a Service without endpoints succeeded")
            });
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "{who}, TCP attempt {attempt}: {err} after {elapsed:?}"
            );
            assert!(
                elapsed < Duration::from_secs(1),
                "{who}, TCP attempt {attempt}: refusal took {elapsed:?}"
            );
            // UDP: an ICMP port unreachable fails a connected socket at once.
            let (result, elapsed) = ns.run_in(|| {
                let started = Instant::now();
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.connect(to).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.send(b"hello").expect("send");
                let mut buf = [0u8; 64];
                (s.recv(&mut buf), started.elapsed())
            });
            let err = result.err().unwrap_or_else(|| {
                panic!("{who}: a UDP answer came from a Service without endpoints")
            });
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "{who}, UDP attempt {attempt}: {err} after {elapsed:?}"
            );
            assert!(
                elapsed < Duration::from_secs(1),
                "{who}, UDP attempt {attempt}: refusal took {elapsed:?}"
            );
        }
    }
    // The other Service is unaffected.
    lab.client
        .ns
        .run_in(|| tcp_ask(SocketAddrV4::new(NGINX, 80), "hello", TIMEOUT))
        .expect("nginx still works");
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn removing_a_backend_from_the_manifests_stops_new_connections_to_it() {
    let mut lab = nginx_lab();
    let removed = lab.pods.keys().next().unwrap().clone();
    lab.state.excluded.insert(removed.clone());
    lab.apply_manifests().expect("apply");
    let (tcp, udp) = spread(&lab, false, SocketAddrV4::new(NGINX, 80), 90);
    for counts in [&tcp, &udp] {
        assert!(
            !counts.contains_key(&removed),
            "{removed} still gets new connections: {counts:?}"
        );
        assert_eq!(
            counts.len(),
            2,
            "both remaining backends must answer: {counts:?}"
        );
    }
    // And it comes back when it is an endpoint again.
    lab.state.excluded.clear();
    lab.apply_manifests().expect("apply");
    let (tcp, _) = spread(&lab, false, SocketAddrV4::new(NGINX, 80), 90);
    assert!(
        tcp.contains_key(&removed),
        "{removed} must be reachable again: {tcp:?}"
    );
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn a_bad_manifest_is_reported_and_the_other_services_keep_working() {
    let mut lab = nginx_lab();
    lab.state.extra_manifests.insert(
        "broken.yaml".into(),
        "kind: Service\n  spec: [unbalanced\n".into(),
    );
    lab.state.extra_manifests.insert(
        "sctp.yaml".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: sctp-only}\nspec:\n  clusterIP: 10.96.0.77\n  ports: [{port: 9, protocol: SCTP}]\n".into(),
    );
    lab.apply_manifests().expect("apply");
    let log = lab.agent_log();
    assert!(
        log.contains("broken.yaml"),
        "the unparsable file must be named:\n{log}"
    );
    assert!(
        log.contains("Service default/sctp-only port 9") && log.contains("SCTP"),
        "the inexpressible Service must be named with its reason:\n{log}"
    );
    let (tcp, udp) = spread(&lab, false, SocketAddrV4::new(NGINX, 80), 30);
    assert_eq!(
        tcp.values().sum::<usize>() + udp.values().sum::<usize>(),
        60
    );
}

/// What `kubectl get services,endpointslices -o yaml` writes is one
/// `List` document: its Service is served through its EndpointSlice.
#[privileged_test]
fn a_service_and_its_slice_in_a_list_document_are_served() {
    let mut lab = nginx_lab();
    let (name, pod) = lab.pods.iter().next().unwrap();
    let (name, ip) = (name.clone(), pod.ip);
    let dumped = format!(
        "apiVersion: v1
kind: List
metadata: {{resourceVersion: \"\"}}
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: dumped, namespace: default}}
  spec: {{clusterIP: 10.96.0.78, ports: [{{name: http, port: 80, protocol: TCP}}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {{name: dumped-1, namespace: default,
    labels: {{kubernetes.io/service-name: dumped}}}}
  addressType: IPv4
  endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}]
  ports: [{{name: http, port: 80, protocol: TCP}}]
"
    );
    lab.state
        .extra_manifests
        .insert("dumped.yaml".into(), dumped);
    lab.apply_manifests().expect("apply");
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 78), 80);
    let answer = lab.client.ns.run_in(|| tcp_ask(to, "hello", TIMEOUT));
    assert_eq!(answer.expect("the listed Service answers"), name);
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn replicaset_example_serves_its_cluster_ip_and_node_port_services_cluster_ips() {
    let mut lab = Lab::from_manifest_files(&[example("frontend-replicaset.yaml")]).expect("lab");
    assert_eq!(lab.pods.len(), 4, "the example ReplicaSet has 4 replicas");
    lab.agent().start().expect("agent");
    for svc in ["frontend", "frontend-nodeport"] {
        let ip = lab
            .cluster_ip(svc)
            .unwrap_or_else(|| panic!("{svc} has a clusterIP"));
        let counts = lab.client.ns.run_in(|| {
            let mut c = BTreeMap::new();
            for _ in 0..200 {
                *c.entry(tcp_ask(SocketAddrV4::new(ip, 80), "hello", TIMEOUT).expect("request"))
                    .or_insert(0) += 1;
            }
            c
        });
        assert_fair(&lab, &counts, 200, svc);
    }
    lab.assert_no_checksum_errors();
}

#[privileged_test]
fn an_agent_recreates_pinned_maps_of_an_older_layout_and_serves() {
    let mut lab =
        Lab::from_manifest_files(&[example("nginx-deployment.yaml")]).expect("build the lab");
    // What an agent of an earlier version left: a conntrack map whose values
    // were 16 bytes (they are 24 now).
    std::fs::create_dir_all(&lab.pin_dir).unwrap();
    let ct = lab.pin_dir.join("lb4_conntrack");
    let ct = ct.to_str().unwrap();
    lb_lab::run(&[
        "bpftool",
        "map",
        "create",
        ct,
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        "16",
        "entries",
        "1024",
        "name",
        "lb4_conntrack",
    ])
    .expect("create an old-layout map");
    // And a backends map of the same key and value sizes, but a hash (it
    // is an array now): sizes alone would let it be adopted, and the
    // program load would then fail on the type.
    let backends = lab.pin_dir.join("lb4_backends");
    let backends = backends.to_str().unwrap();
    lb_lab::run(&[
        "bpftool",
        "map",
        "create",
        backends,
        "type",
        "hash",
        "key",
        "4",
        "value",
        "12",
        "entries",
        &lb_common::MAX_BACKENDS.to_string(),
        "name",
        "lb4_backends",
        "flags",
        "1",
    ])
    .expect("create an old-type backends map");
    lab.agent()
        .start()
        .expect("the agent starts over pins of an older layout");
    let shown = lb_lab::run(&["bpftool", "-j", "map", "show", "pinned", backends]).unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["type"], "array", "recreated as an array: {shown}");
    let (tcp, udp) = spread(&lab, false, SocketAddrV4::new(NGINX, 80), 30);
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    assert_eq!(udp.len(), 3, "{udp:?}");
    let shown = lb_lab::run(&["bpftool", "-j", "map", "show", "pinned", ct]).unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["bytes_value"], 24,
        "recreated with today's layout: {shown}"
    );
    assert!(
        lab.agent_log().contains("lb4_conntrack is not kept ("),
        "the agent says what it dropped"
    );
}

/// The trap tc on the wire avoids, shown with the lab's own counters: XDP
/// forced onto a wire whose peer hands over partial checksums (a veth with
/// offload on, as in kind) updates them as if they were complete, and the
/// pods behind links that finalize checksums count the damage. The same
/// traffic with the default hook (tc there) counts none (the software-wire
/// tests above).
#[privileged_test]
fn xdp_forced_onto_a_software_wire_corrupts_checksums_and_the_lab_counts_them() {
    let mut lab = Lab::from_manifest_files_on(Wire::Software, &[example("nginx-deployment.yaml")])
        .expect("build the lab");
    lab.agent()
        .flags(&["--wire-hook", "xdp"])
        .start()
        .expect("start lb-agent");
    assert!(
        lab.agent_log()
            .contains("chosen by --wire-hook xdp; driver veth may deliver partial checksums"),
        "the agent says why XDP is risky here:\n{}",
        lab.agent_log()
    );
    let to = SocketAddrV4::new(NGINX, 80);
    lab.ext.run_in(|| {
        for _ in 0..50 {
            let _ = tcp_ask(to, "hello", Duration::from_millis(200));
            let _ = udp_ask(to, "hello", Duration::from_millis(200));
        }
    });
    let errors: u64 = lab
        .checksum_errors()
        .iter()
        .map(|(_, tcp, udp, icmp)| tcp + udp + icmp)
        .sum();
    println!("CHECKSUMS XDP forced onto a software wire: {errors} errors");
    assert!(errors > 0, "XDP on partial checksums must show as errors");
}
