//! healthCheckNodePort, the pure half: which health check a Service asks
//! of this node (LoadBalancer, externalTrafficPolicy Local, a port), how
//! many ready endpoints it has here, and kube-proxy's answer for it: 200
//! and the count when there are ready ones and the proxy itself is
//! healthy, 503 when there are none, only terminating ones, or the proxy
//! is not healthy. `serve::health_check` listens and answers.

use std::collections::BTreeSet;

use super::NodeInfo;
use crate::{
    model::ServiceName,
    source::objects::{Addr, AddressType, ServiceInfo, ServiceKind, SliceInfo},
};

/// One Service's health check port and what it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceName,
    pub port: u16,
    /// Ready (not terminating) endpoints on this node.
    pub local_endpoints: usize,
}

/// The health check a Service asks of this node, if any.
pub(crate) fn health_check_of(
    node: &NodeInfo,
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
) -> Option<HealthCheck> {
    if svc.ignored.is_some() || svc.kind != ServiceKind::LoadBalancer || !svc.external_local {
        return None;
    }
    let port = u16::try_from(svc.health_check_node_port?)
        .ok()
        .filter(|p| *p != 0)?;
    // Endpoints of the primary family (the first clusterIP's): a
    // dual-stack pod has an address in each family and counts once.
    let primary = match svc.cluster_ips.first() {
        Some(Addr::V6(_)) => AddressType::Ipv6,
        _ => AddressType::Ipv4,
    };
    let mut local = BTreeSet::new();
    for slice in slices.iter().filter(|s| s.address_type == primary) {
        for e in &slice.endpoints {
            let is_local = !node.name.is_empty() && e.node.as_deref() == Some(node.name.as_str());
            if e.ready && is_local {
                if let Some(a) = &e.address {
                    local.insert(a.clone());
                }
            }
        }
    }
    Some(HealthCheck {
        service: svc.name.clone(),
        port,
        local_endpoints: local.len(),
    })
}

/// Status line and JSON body of the answer, as kube-proxy's healthcheck
/// server gives them.
pub fn response(check: &HealthCheck, proxy_healthy: bool) -> (&'static str, String) {
    let status = if check.local_endpoints > 0 && proxy_healthy {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = serde_json::json!({
        "service": check.service,
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (status, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(extra: serde_json::Value) -> ServiceInfo {
        let mut v = json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                "ports": [{"port": 80}]}});
        for (k, val) in extra.as_object().unwrap() {
            v["spec"][k] = val.clone();
        }
        crate::test_objects::service(v)
    }

    fn slice(eps: serde_json::Value) -> SliceInfo {
        crate::test_objects::slice(json!({"metadata": {"name": "web-1", "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": eps}))
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn counts_ready_local_endpoints_only() {
        let s = slice(json!([
            {"addresses": ["10.244.0.5"], "nodeName": "n1", "conditions": {"ready": true}},
            {"addresses": ["10.244.0.6"], "nodeName": "n1", "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.5"], "nodeName": "n2", "conditions": {"ready": true}}
        ]));
        let c = health_check_of(&node(), &svc(json!({})), &[&s]).unwrap();
        assert_eq!((c.port, c.local_endpoints), (32000, 1));
        let (status, body) = response(&c, true);
        assert_eq!(status, "200 OK");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["localEndpoints"], 1);
        assert_eq!(body["service"]["name"], "web");
    }

    #[test]
    fn only_terminating_local_endpoints_is_unhealthy() {
        let s = slice(json!([
            {"addresses": ["10.244.0.6"], "nodeName": "n1", "conditions": {"ready": false, "serving": true, "terminating": true}}
        ]));
        let c = health_check_of(&node(), &svc(json!({})), &[&s]).unwrap();
        assert_eq!(c.local_endpoints, 0);
        assert_eq!(response(&c, true).0, "503 Service Unavailable");
    }

    #[test]
    fn an_unhealthy_proxy_fails_the_check_whatever_its_endpoints() {
        let s = slice(json!([
            {"addresses": ["10.244.0.5"], "nodeName": "n1", "conditions": {"ready": true}}
        ]));
        let c = health_check_of(&node(), &svc(json!({})), &[&s]).unwrap();
        let (status, body) = response(&c, false);
        assert_eq!(status, "503 Service Unavailable");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["serviceProxyHealthy"], false);
        assert_eq!(body["localEndpoints"], 1);
    }

    #[test]
    fn an_ipv6_primary_service_counts_its_ipv6_endpoints_once() {
        let v6 =
            crate::test_objects::slice(json!({"metadata": {"name": "web-2", "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6", "ports": [{"port": 8080}], "endpoints": [
                {"addresses": ["fd00:244::5"], "nodeName": "n1", "conditions": {"ready": true}},
                {"addresses": ["fd00:244::6"], "nodeName": "n1", "conditions": {"ready": true}}
            ]}));
        let v4 = slice(json!([
            {"addresses": ["10.244.0.5"], "nodeName": "n1", "conditions": {"ready": true}}
        ]));
        let ipv6_first =
            svc(json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"]}));
        let c = health_check_of(&node(), &ipv6_first, &[&v4, &v6]).unwrap();
        assert_eq!(c.local_endpoints, 2);
        let c = health_check_of(&node(), &svc(json!({})), &[&v4, &v6]).unwrap();
        assert_eq!(c.local_endpoints, 1);
    }

    #[test]
    fn only_local_loadbalancers_with_a_port_get_one() {
        for extra in [
            json!({"externalTrafficPolicy": "Cluster"}),
            json!({"type": "NodePort"}),
            json!({"healthCheckNodePort": null}),
        ] {
            assert!(
                health_check_of(&node(), &svc(extra.clone()), &[]).is_none(),
                "{extra}"
            );
        }
    }
}
