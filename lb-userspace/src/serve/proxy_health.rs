//! The proxy's own health, as kube-proxy reports it on `--healthz-addr`
//! (default 0.0.0.0:10256), which cloud load balancers probe for Services
//! with externalTrafficPolicy Cluster:
//!
//! - healthy while no change it received waits longer than the timeout to
//!   be written (a change counts as written when its sync put everything
//!   in the maps; a map that is full keeps it waiting), and while starting;
//! - `/healthz`: 200 when healthy and the node is eligible (not being
//!   deleted, not tainted ToBeDeletedByClusterAutoscaler), else 503, so
//!   load balancers drain a node before it goes; body
//!   `{"lastUpdated": ..., "currentTime": ..., "nodeEligible": ...}`;
//! - `/livez`: the same without the node's state.
//!
//! healthCheckNodePort answers (see `health_check`) say 503 too while the
//! proxy is unhealthy.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use chrono::{DateTime, SecondsFormat, Utc};

use super::metrics::{
    answer_and_close, http_response, parse_request, read_request_head, refusal, Request,
};

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet written arrived.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

#[derive(Debug)]
pub struct ProxyHealth {
    state: Mutex<State>,
    timeout: Duration,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                // Eligible until the Node says otherwise, as kube-proxy.
                node_eligible: true,
            }),
            timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change arrived that a sync has to write.
    pub fn queued_update(&self) {
        self.lock().oldest_pending.get_or_insert_with(Instant::now);
    }

    /// Everything received so far is written.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(SystemTime::now());
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// The proxy's own health, the node's state left out.
    pub(crate) fn is_healthy(&self) -> bool {
        self.lock()
            .oldest_pending
            .is_none_or(|t| t.elapsed() < self.timeout)
    }

    /// Status line and body of `/healthz` (`with_node`) or `/livez`.
    pub fn answer(&self, with_node: bool) -> (&'static str, String) {
        let healthy = self.is_healthy();
        let (last, eligible) = {
            let s = self.lock();
            (s.last_updated, s.node_eligible)
        };
        let now = SystemTime::now();
        let ok = healthy && (eligible || !with_node);
        // As kube-proxy: a healthy answer says "updated now".
        let last = if ok { Some(now) } else { last };
        let time = |t: Option<SystemTime>| {
            t.map_or_else(
                || "0001-01-01T00:00:00Z".into(),
                |t| DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Nanos, true),
            )
        };
        let body = if with_node {
            serde_json::json!({"lastUpdated": time(last), "currentTime": time(Some(now)), "nodeEligible": eligible})
        } else {
            serde_json::json!({"lastUpdated": time(last), "currentTime": time(Some(now))})
        };
        let status = if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        (status, body.to_string())
    }
}

/// Serves `/healthz` and `/livez` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, health: Arc<ProxyHealth>) -> std::io::Result<()> {
    let listener = crate::serve::metrics::bind(addr).await?;
    log::info!("proxy health (/healthz, /livez) on http://{addr}");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let head = read_request_head(&mut stream, 2048).await;
            let head = String::from_utf8_lossy(&head);
            let request = parse_request(&head);
            let response = match request {
                Request::Read { path, head_only } => {
                    let which = match path {
                        "/healthz" => Some(true),
                        "/livez" => Some(false),
                        _ => None,
                    };
                    match which {
                        Some(with_node) => {
                            let (status, body) = health.answer(with_node);
                            let headers = [
                                ("Content-Type", "application/json".to_owned()),
                                ("X-Content-Type-Options", "nosniff".to_owned()),
                            ];
                            http_response(status, &headers, &body, head_only)
                        }
                        None => http_response("404 Not Found", &[], "not found\n", head_only),
                    }
                }
                _ => refusal(&request),
            };
            answer_and_close(&mut stream, &response).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_until_a_change_waits_past_the_timeout() {
        let h = ProxyHealth::new(Duration::from_millis(50));
        assert!(h.is_healthy(), "healthy while starting");
        h.queued_update();
        assert!(h.is_healthy(), "a change not late yet");
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.is_healthy());
        assert_eq!(h.answer(true).0, "503 Service Unavailable");
        h.updated();
        assert!(h.is_healthy());
        assert_eq!(h.answer(false).0, "200 OK");
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_not_livez() {
        let h = ProxyHealth::new(Duration::from_mins(1));
        h.set_node_eligible(false);
        let (status, body) = h.answer(true);
        assert_eq!(status, "503 Service Unavailable");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(h.answer(false).0, "200 OK");
    }
}
