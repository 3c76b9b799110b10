//! A large cluster's objects for the API server fixture: Service `i` in
//! namespace `bench` with one TCP port, and its EndpointSlice of ready
//! endpoints on one node, of one address family (single-stack IPv4 or
//! IPv6, as a cluster of that family serves them). Shared by the
//! control-plane bench and the memory-limit check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{json, Value};

/// The address family of the Services and endpoints made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleFamily {
    #[default]
    Ipv4,
    Ipv6,
}

impl ScaleFamily {
    /// The EndpointSlice `addressType` of this family.
    fn address_type(self) -> &'static str {
        match self {
            ScaleFamily::Ipv4 => "IPv4",
            ScaleFamily::Ipv6 => "IPv6",
        }
    }
}

/// Service `i`'s IPv4 ClusterIP.
pub fn service_ip(i: usize) -> Ipv4Addr {
    // 10.96.0.0/12 holds a million addresses; skip .0 of each /24.
    let n = (i / 255) * 256 + i % 255 + 1;
    Ipv4Addr::new(10, 96 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// Service `i`'s ClusterIP in `family` (IPv6: in the lab's fd00:96::/64).
pub fn service_addr(family: ScaleFamily, i: usize) -> IpAddr {
    match family {
        ScaleFamily::Ipv4 => service_ip(i).into(),
        ScaleFamily::Ipv6 => {
            Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, (i >> 16) as u16 + 1, i as u16).into()
        }
    }
}

/// Endpoints of one Service with addresses of their own: endpoint `e`
/// past them has the address of the next Service's endpoint
/// `e - DISTINCT_ENDPOINTS` (and the backend with it).
pub const DISTINCT_ENDPOINTS: usize = 32;

/// Endpoint `e` of Service `i`: IPv4 from 10.128.0.0 on (200,000 Services
/// end at 10.225.168.0, below the lab's pods in 10.244.0.0/16), IPv6 in
/// fd00:128::/64.
fn endpoint_addr(family: ScaleFamily, i: usize, e: usize) -> IpAddr {
    let n = i * DISTINCT_ENDPOINTS + e + 1;
    match family {
        ScaleFamily::Ipv4 => {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n as u32).into()
        }
        ScaleFamily::Ipv6 => {
            Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 0)) + n as u128)
                .into()
        }
    }
}

/// Service `i`, as a client would create it (the fixture defaults it).
pub fn service(i: usize) -> Value {
    service_of(ScaleFamily::Ipv4, i)
}

/// Service `i` of `family`, as a client would create it: the ClusterIP
/// alone; the fixture defaults `clusterIPs` and `ipFamilies` from it.
pub fn service_of(family: ScaleFamily, i: usize) -> Value {
    json!({"kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": service_addr(family, i).to_string(), "selector": {"app": format!("app-{i}")},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

/// Service `i`'s EndpointSlice with `endpoints` ready endpoints, all on
/// the node named `node`.
pub fn slice(i: usize, endpoints: usize, node: &str) -> Value {
    slice_of(ScaleFamily::Ipv4, i, endpoints, node)
}

/// Service `i`'s EndpointSlice of `family` with `endpoints` ready
/// endpoints, all on the node named `node`.
pub fn slice_of(family: ScaleFamily, i: usize, endpoints: usize, node: &str) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            json!({"addresses": [endpoint_addr(family, i, e).to_string()], "conditions": {"ready": true},
                   "nodeName": node})
        })
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}},
        "addressType": family.address_type(), "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn addresses_are_distinct_and_of_their_family() {
        for family in [ScaleFamily::Ipv4, ScaleFamily::Ipv6] {
            let mut seen = BTreeSet::new();
            for i in 0..200_000 {
                let ip = service_addr(family, i);
                assert_eq!(ip.is_ipv6(), family == ScaleFamily::Ipv6, "{ip}");
                assert!(seen.insert(ip), "{ip} twice");
            }
            // The first and last Services the bench allows: the address
            // grows with i, so the rest lie between.
            for i in (0..4_000).chain(196_000..200_000) {
                for e in 0..DISTINCT_ENDPOINTS {
                    let ip = endpoint_addr(family, i, e);
                    assert_eq!(ip.is_ipv6(), family == ScaleFamily::Ipv6, "{ip}");
                    assert!(seen.insert(ip), "{ip} twice");
                    if let IpAddr::V4(v4) = ip {
                        // Neither the lab's Service range nor its pods'.
                        assert!(v4.octets()[1] >= 128 && v4.octets()[1] < 244, "{ip}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_ipv6_slice_says_so() {
        let s = slice_of(ScaleFamily::Ipv6, 7, 2, "node");
        assert_eq!(s["addressType"], "IPv6");
        assert_eq!(s["endpoints"][1]["addresses"][0], "fd00:128::e2");
        assert_eq!(
            service_of(ScaleFamily::Ipv6, 7)["spec"]["clusterIP"],
            "fd00:96::1:7"
        );
    }
}
