//! healthCheckNodePort: for a LoadBalancer Service with
//! externalTrafficPolicy Local, an HTTP server on that port tells the
//! cloud load balancer whether this node has a local endpoint to send to,
//! with kube-proxy's answer: 200 and the count when it has ready ones and
//! the proxy itself is healthy (see `proxy_health`), 503 when it has none,
//! only terminating ones, or the proxy is not healthy. It listens on the
//! node's NodePort addresses, as kube-proxy does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    model::ServiceName,
    objects::{AddressType, ServiceInfo, ServiceKind, SliceInfo},
    proxy_health::ProxyHealth,
    translate::NodeInfo,
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
pub fn health_check_of(
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
    let mut local = BTreeSet::new();
    for slice in slices
        .iter()
        .filter(|s| s.address_type == AddressType::Ipv4)
    {
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
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (status, body.to_string())
}

/// The listeners, per health check port one on each NodePort address, kept
/// equal to the checks the Services ask for.
pub struct HealthServer {
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    listeners: BTreeMap<u16, Vec<JoinHandle<()>>>,
    addresses: Vec<Ipv4Addr>,
    proxy: Arc<ProxyHealth>,
}

impl HealthServer {
    /// Health checks served on `addresses` (the NodePort addresses; all of
    /// the node's when empty), reporting `proxy`'s health too.
    pub fn new(addresses: Vec<Ipv4Addr>, proxy: Arc<ProxyHealth>) -> Self {
        Self {
            checks: Arc::default(),
            listeners: BTreeMap::new(),
            addresses,
            proxy,
        }
    }

    /// Opens ports that are new, closes ports no Service asks for any more,
    /// and updates what every port reports. A port that cannot be bound is
    /// logged and retried on the next update.
    pub fn update<'a>(&mut self, wanted: impl IntoIterator<Item = &'a HealthCheck>) {
        let mut by_port = BTreeMap::new();
        for c in wanted {
            if let Some(other) = by_port.insert(c.port, c.clone()) {
                log::warn!(
                    "healthCheckNodePort {} is claimed by {} and {}; serving {}",
                    c.port,
                    other.service,
                    c.service,
                    c.service
                );
            }
        }
        self.listeners.retain(|port, tasks| {
            let keep = by_port.contains_key(port) && tasks.iter().all(|t| !t.is_finished());
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for port in by_port.keys() {
            if !self.listeners.contains_key(port) {
                if let Some(tasks) = self.listen(*port) {
                    self.listeners.insert(*port, tasks);
                }
            }
        }
        *self.checks.lock().expect("health checks lock") = by_port;
    }

    /// One listener on each address for `port`; None (logged, retried on
    /// the next update) when one cannot be bound.
    fn listen(&self, port: u16) -> Option<Vec<JoinHandle<()>>> {
        let addresses = if self.addresses.is_empty() {
            vec![Ipv4Addr::UNSPECIFIED]
        } else {
            self.addresses.clone()
        };
        let mut listeners = Vec::new();
        for a in addresses {
            let addr = SocketAddr::from((a, port));
            let bound = std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            });
            match bound {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    log::error!("healthCheckNodePort {addr}: cannot listen: {e}");
                    return None;
                }
            }
        }
        Some(
            listeners
                .into_iter()
                .map(|l| {
                    let (checks, proxy) = (self.checks.clone(), self.proxy.clone());
                    tokio::spawn(serve(l, port, checks, proxy))
                })
                .collect(),
        )
    }

    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

async fn serve(
    listener: TcpListener,
    port: u16,
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    proxy: Arc<ProxyHealth>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let (checks, proxy) = (checks.clone(), proxy.clone());
        tokio::spawn(async move {
            // Any path gets the answer, as with kube-proxy; but only to a
            // read (GET or HEAD), since the answer is all the port is for.
            let head = crate::metrics::read_request_head(&mut stream, 2048).await;
            let head = String::from_utf8_lossy(&head);
            let request = crate::metrics::parse_request(&head);
            let crate::metrics::Request::Read { head_only, .. } = request else {
                let refusal = crate::metrics::refusal(&request);
                crate::metrics::answer_and_close(&mut stream, &refusal).await;
                return;
            };
            let check = checks
                .lock()
                .expect("health checks lock")
                .get(&port)
                .cloned();
            let Some(check) = check else {
                return;
            };
            let (status, body) = response(&check, proxy.is_healthy());
            let headers = [
                ("Content-Type", "application/json".to_owned()),
                ("X-Content-Type-Options", "nosniff".to_owned()),
                (
                    "X-Load-Balancing-Endpoint-Weight",
                    check.local_endpoints.to_string(),
                ),
            ];
            let resp = crate::metrics::http_response(status, &headers, &body, head_only);
            crate::metrics::answer_and_close(&mut stream, &resp).await;
        });
    }
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
