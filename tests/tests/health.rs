//! The proxy's health as kube-proxy reports it: `/healthz` and `/livez` on
//! `--healthz-addr` (0.0.0.0:10256), 503 once a received change could not
//! be written for `--healthz-timeout` or (`/healthz` only) while the node
//! is being drained; healthCheckNodePorts answering 503 while the proxy is
//! unhealthy, and listening on the NodePort addresses only.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_kube_fixtures::apiserver::Resource;
use lb_lab::{
    http_get, on_each_source, privileged_test, tcp_ask, Lab, Source, Wire, NODE_NAME,
    NODE_WIRE_ADDR, NODE_WIRE_ADDR6,
};
use serde_json::{json, Value};

on_each_source!(
    healthz_and_livez_answer_as_kube_proxys_do,
    a_change_that_cannot_be_written_makes_the_proxy_unhealthy_until_it_can,
    health_check_ports_listen_on_the_nodeport_addresses_only,
);

const TIMEOUT: Duration = Duration::from_secs(2);
const HEALTH_CHECK_PORT: u16 = 32100;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);

fn lab(source: Source) -> Lab {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let lab =
        Lab::from_manifest_files_with(source, Wire::Software, &[example]).expect("build the lab");
    lab.ext
        .exec(&[
            "ip",
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            &NODE_WIRE_ADDR.to_string(),
        ])
        .expect("route to the LoadBalancer address");
    lab
}

/// GET `path` on `addr` from inside the node: (status, JSON body).
fn get(lab: &Lab, addr: SocketAddr, path: &str) -> (u16, Value) {
    let (code, body) = lab
        .node
        .run_in(|| http_get(addr, path, TIMEOUT))
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn proxy_health(lab: &Lab, path: &str) -> (u16, Value) {
    get(lab, SocketAddr::from((Ipv4Addr::LOCALHOST, 10256)), path)
}

fn health_check(lab: &Lab) -> (u16, Value) {
    get(
        lab,
        SocketAddr::from((NODE_WIRE_ADDR, HEALTH_CHECK_PORT)),
        "/",
    )
}

/// Publishes a Local LoadBalancer Service with a health check port and
/// every pod as a local endpoint.
fn publish_local_lb(lab: &mut Lab) {
    let eps: Vec<Value> = lab
        .pods
        .values()
        .map(|p| {
            json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true},
            "nodeName": NODE_NAME})
        })
        .collect();
    lab.put_extra_service(
        "hc",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.31", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": HEALTH_CHECK_PORT,
            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30080},
                      {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": 30080}]}),
        json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}),
        eps,
    );
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not in 15 s");
}

fn healthz_and_livez_answer_as_kube_proxys_do(source: Source, _wire: Wire) {
    let mut lab = lab(source);
    // The DaemonSet's flag: its probes go to this port.
    lab.agent()
        .flags(&["--metrics-addr", "0.0.0.0:10249"])
        .start()
        .expect("start lb-agent");
    // 0.0.0.0 (both flags' form) means every address, IPv6 ones included:
    // an IPv6-only node's kubelet probes the node's IPv6 address.
    for (port, path) in [(10256, "/healthz"), (10249, "/readyz")] {
        let at = SocketAddr::from((NODE_WIRE_ADDR6, port));
        assert_eq!(get(&lab, at, path).0, 200, "{at}{path}");
    }
    let (code, body) = proxy_health(&lab, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["nodeEligible"], true, "{body}");
    assert!(
        body["lastUpdated"].is_string() && body["currentTime"].is_string(),
        "{body}"
    );
    let (code, body) = proxy_health(&lab, "/livez");
    assert_eq!(code, 200, "{body}");
    assert!(body.get("nodeEligible").is_none(), "{body}");
    assert_eq!(proxy_health(&lab, "/other").0, 404);
}

fn a_change_that_cannot_be_written_makes_the_proxy_unhealthy_until_it_can(
    source: Source,
    _wire: Wire,
) {
    let mut lab = lab(source);
    publish_local_lb(&mut lab);
    lab.write_manifests().unwrap();
    // Room for 15 backends: the health checked Service's 6 fit.
    lab.agent()
        .flags(&["--backends-max", "16", "--healthz-timeout", "2s"])
        .start()
        .expect("start lb-agent");
    assert_eq!(health_check(&lab).0, 200);
    // 40 more backends cannot be written: the change waits.
    let many: Vec<Value> = (100..120)
        .map(|i| json!({"addresses": [format!("10.244.0.{i}")], "conditions": {"ready": true}}))
        .collect();
    lab.put_extra_service(
        "big",
        json!({"clusterIP": "10.96.0.90", "ports": [
            {"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "udp", "port": 80, "protocol": "UDP"}]}),
        json!({}),
        many,
    );
    lab.apply_manifests().expect("agent reads the change");
    wait_for("/healthz 503", || proxy_health(&lab, "/healthz").0 == 503);
    assert_eq!(proxy_health(&lab, "/livez").0, 503);
    let (code, body) = health_check(&lab);
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        (
            body["serviceProxyHealthy"].clone(),
            body["localEndpoints"].clone()
        ),
        (json!(false), json!(3))
    );
    // What was programmed keeps serving meanwhile.
    let answer = lab
        .ext
        .run_in(|| tcp_ask(SocketAddrV4::new(LB_IP, 80), "whoami", TIMEOUT));
    assert!(answer.is_ok(), "{answer:?}");
    // The Service that did not fit goes: everything is written again.
    lab.state.extra_manifests.remove("big.yaml");
    lab.apply_manifests().expect("agent reads the change");
    wait_for("/healthz 200", || proxy_health(&lab, "/healthz").0 == 200);
    assert_eq!(health_check(&lab).0, 200);
}

fn health_check_ports_listen_on_the_nodeport_addresses_only(source: Source, _wire: Wire) {
    let mut lab = lab(source);
    publish_local_lb(&mut lab);
    lab.write_manifests().unwrap();
    lab.agent().start().expect("start lb-agent");
    assert_eq!(health_check(&lab).0, 200);
    // And on the node's IPv6 NodePort address: a dual-stack cluster's
    // load balancers may check over either family.
    let (code, body) = get(
        &lab,
        SocketAddr::from((NODE_WIRE_ADDR6, HEALTH_CHECK_PORT)),
        "/",
    );
    assert_eq!(code, 200, "over IPv6: {body}");
    assert_eq!(body["localEndpoints"], lab.pods.len(), "{body}");
    for loopback in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTH_CHECK_PORT)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, HEALTH_CHECK_PORT)),
    ] {
        let refused = lab
            .node
            .run_in(|| TcpStream::connect_timeout(&loopback, TIMEOUT));
        assert!(refused.is_err(), "the health check listens on {loopback}");
    }
}

/// kube-proxy's /healthz drains a node that is going away (being deleted,
/// or tainted by the cluster autoscaler); /livez does not.
#[privileged_test]
fn a_node_being_drained_fails_healthz_but_not_livez() {
    let mut lab = lab(Source::Api);
    lab.agent().start().expect("start lb-agent");
    assert_eq!(proxy_health(&lab, "/healthz").0, 200);
    let api = &lab.api.as_ref().expect("the API fixture").server;
    let taint = json!({"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"});
    api.apply(
        &json!({"kind": "Node", "metadata": {"name": NODE_NAME}, "spec": {"taints": [taint]}}),
    )
    .expect("taint the node");
    wait_for("/healthz 503", || proxy_health(&lab, "/healthz").0 == 503);
    assert_eq!(proxy_health(&lab, "/healthz").1["nodeEligible"], false);
    assert_eq!(proxy_health(&lab, "/livez").0, 200);
    api.apply(&json!({"kind": "Node", "metadata": {"name": NODE_NAME}}))
        .expect("untaint the node");
    wait_for("/healthz 200", || proxy_health(&lab, "/healthz").0 == 200);
    assert!(api.get(Resource::Nodes, "", NODE_NAME).is_some());
}
