//! Kubernetes objects for tests, built from JSON the way the API serves them
//! and read the way both sources read them (`objects`).

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Value};

use crate::{
    model::{L4Addr, Protocol},
    source::objects::{ServiceInfo, SliceInfo},
};

/// An address (text), port and protocol.
pub(crate) fn l4_addr(addr: &str, port: u16, proto: Protocol) -> L4Addr {
    L4Addr {
        addr: addr
            .parse()
            .unwrap_or_else(|e| panic!("address {addr}: {e}")),
        port,
        proto,
    }
}

pub fn service(v: Value) -> ServiceInfo {
    let s: Service =
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("Service {v}: {e}"));
    ServiceInfo::from(s)
}

pub fn slice(v: Value) -> SliceInfo {
    let s: EndpointSlice =
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("EndpointSlice {v}: {e}"));
    SliceInfo::from(s)
}

/// A ClusterIP Service `default/<name>` with one TCP port `http`.
pub fn cluster_ip(name: &str, ip: &str, port: i32) -> ServiceInfo {
    service(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": port}]}
    }))
}

/// A slice of `default/<service>` with port `http` = `port` and ready
/// endpoints at `ips`.
pub(crate) fn ready_slice(service: &str, slice_name: &str, port: i32, ips: &[String]) -> SliceInfo {
    let endpoints: Vec<Value> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    slice(json!({
        "metadata": {"name": slice_name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
}

/// `n` distinct pod addresses from 10.(base).0.1 on.
pub fn pod_ips(base: u8, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let i = i as u32 + 1;
            format!("10.{base}.{}.{}", (i >> 8) & 0xff, i & 0xff)
        })
        .collect()
}
