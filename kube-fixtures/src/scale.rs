//! A large cluster's objects for the API server fixture: Service `i` in
//! namespace `bench` with one TCP port, and its EndpointSlice of ready
//! endpoints on one node. Shared by the control-plane bench and the
//! memory-limit check.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// Service `i`'s ClusterIP.
pub fn service_ip(i: usize) -> Ipv4Addr {
    // 10.96.0.0/12 holds a million addresses; skip .0 of each /24.
    let n = (i / 255) * 256 + i % 255 + 1;
    Ipv4Addr::new(10, 96 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// Endpoint `e` of Service `i`.
pub(crate) fn endpoint_ip(i: usize, e: usize) -> Ipv4Addr {
    let n = i * 256 + e + 1;
    Ipv4Addr::new(10, 128 + (n >> 16) as u8 % 64, (n >> 8) as u8, n as u8)
}

/// Service `i`, as a client would create it (the fixture defaults it).
pub fn service(i: usize) -> Value {
    json!({"kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": service_ip(i).to_string(), "selector": {"app": format!("app-{i}")},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

/// Service `i`'s EndpointSlice with `endpoints` ready endpoints, all on
/// the node named `node`.
pub fn slice(i: usize, endpoints: usize, node: &str) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            json!({"addresses": [endpoint_ip(i, e).to_string()], "conditions": {"ready": true},
                   "nodeName": node})
        })
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}
