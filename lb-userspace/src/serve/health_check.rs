//! healthCheckNodePort, the serving half: for every health check the
//! Services ask of this node (`translate::health`), an HTTP server on its
//! port, on the node's NodePort addresses as kube-proxy does, answering
//! what the check reports and 503 while the proxy is unhealthy.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    metrics::{listen_everywhere, listen_on},
    proxy_health::ProxyHealth,
};
use crate::translate::health::{response, HealthCheck};

/// The listeners, per health check port one on each NodePort address, kept
/// equal to the checks the Services ask for.
pub struct HealthServer {
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    listeners: BTreeMap<u16, Vec<JoinHandle<()>>>,
    addresses: Vec<IpAddr>,
    proxy: Arc<ProxyHealth>,
}

impl HealthServer {
    /// Health checks served on `addresses` (the NodePort addresses; all of
    /// the node's when empty), reporting `proxy`'s health too.
    pub fn new(addresses: Vec<IpAddr>, proxy: Arc<ProxyHealth>) -> Self {
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

    /// One listener on each address for `port` (with no addresses: on
    /// every address of both families); None (logged, retried on the next
    /// update) when one cannot be bound.
    fn listen(&self, port: u16) -> Option<Vec<JoinHandle<()>>> {
        let bound: Vec<(SocketAddr, std::io::Result<TcpListener>)> = if self.addresses.is_empty() {
            let every = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            vec![(every, listen_everywhere(port))]
        } else {
            self.addresses
                .iter()
                .map(|a| SocketAddr::from((*a, port)))
                .map(|addr| (addr, listen_on(addr)))
                .collect()
        };
        let mut listeners = Vec::new();
        for (addr, listener) in bound {
            match listener {
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
            let head = super::metrics::read_request_head(&mut stream, 2048).await;
            let head = String::from_utf8_lossy(&head);
            let request = super::metrics::parse_request(&head);
            let super::metrics::Request::Read { head_only, .. } = request else {
                let refusal = super::metrics::refusal(&request);
                super::metrics::answer_and_close(&mut stream, &refusal).await;
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
            let resp = super::metrics::http_response(status, &headers, &body, head_only);
            super::metrics::answer_and_close(&mut stream, &resp).await;
        });
    }
}
