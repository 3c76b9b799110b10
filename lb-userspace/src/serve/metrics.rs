//! Prometheus metrics and health endpoints: `/metrics`, `/healthz`,
//! `/readyz` (ready once the first full sync is written).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use crate::serve::datapath_metrics::{DatapathCollector, DatapathCounters};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

/// `family="ipv4"` or `"ipv6"`: what is counted per address family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub family: &'static str,
}

impl FamilyLabel {
    pub fn of(family: crate::model::Family) -> Self {
        Self {
            family: family.label(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub family: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WireHookLabel {
    pub interface: String,
    pub hook: String,
    pub driver: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidLabel {
    pub kind: String,
}

/// kube-proxy's buckets for network_programming_duration_seconds:
/// 0.25 s and 0.5 s, then 1..59 s by 1, 60..115 s by 5, 120..300 s by 30.
pub(crate) fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    /// Per family.
    pub services: Family<FamilyLabel, Gauge>,
    pub backends: Family<FamilyLabel, Gauge>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub watch_restarts: Family<ResourceLabel, Counter>,
    pub invalid_objects: Family<InvalidLabel, Counter>,
    pub map_write_failures: Counter,
    /// Conntrack entries present at the last sweep, and the capacity of
    /// the map, per family (both are sized by --conntrack-max).
    pub conntrack_entries: Family<FamilyLabel, Gauge>,
    pub conntrack_capacity: Family<FamilyLabel, Gauge>,
    /// Entries the full LRU map dropped on its own, per family.
    pub conntrack_evictions: Family<FamilyLabel, Counter>,
    /// Entries the sweep removed, by family and reason.
    pub conntrack_swept: Family<ReasonLabel, Counter>,
    /// 1 per wire interface, labelled with its hook and why.
    pub wire_hooks: Family<WireHookLabel, Gauge>,
    ready: AtomicBool,
    /// 1 while the API server answers its probe.
    pub api_server_up: Gauge,
    /// Set after the API server has not answered for long (API mode).
    api_unready: AtomicBool,
    /// Counters read from the BPF maps at every scrape.
    pub datapath: Arc<DatapathCounters>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("lb");
        // Sync durations: from sub-millisecond incremental writes to full
        // syncs of large clusters.
        let sync_duration = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ]);
        let programming_latency = Histogram::new(network_programming_buckets());
        let m = Metrics {
            sync_duration,
            programming_latency,
            services: Family::default(),
            backends: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            watch_restarts: Family::default(),
            invalid_objects: Family::default(),
            map_write_failures: Counter::default(),
            conntrack_entries: Family::default(),
            conntrack_capacity: Family::default(),
            conntrack_evictions: Family::default(),
            conntrack_swept: Family::default(),
            wire_hooks: Family::default(),
            ready: AtomicBool::new(false),
            api_server_up: Gauge::default(),
            api_unready: AtomicBool::new(false),
            datapath: Arc::default(),
            registry: Registry::default(),
        };
        m.register_sync_metrics(&mut registry);
        m.register_datapath_metrics(&mut registry);
        registry.register_collector(Box::new(DatapathCollector(m.datapath.clone())));
        Arc::new(Metrics { registry, ..m })
    }

    /// What syncs write and how long they take.
    fn register_sync_metrics(&self, registry: &mut Registry) {
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to compute and write one sync to the BPF maps",
            self.sync_duration.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to its endpoints being written to the maps",
            self.programming_latency.clone(),
        );
        registry.register(
            "services_programmed",
            "Service frontends in the maps, per family",
            self.services.clone(),
        );
        registry.register(
            "backends_programmed",
            "Backend slots in the maps, per family",
            self.backends.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each BPF map the agent writes",
            self.map_entries.clone(),
        );
        registry.register(
            "map_max_entries",
            "Capacity of each BPF map",
            self.map_capacity.clone(),
        );
        registry.register(
            "watch_restarts",
            "Times a Kubernetes watch was restarted with a full relist",
            self.watch_restarts.clone(),
        );
        registry.register(
            "invalid_objects",
            "Objects (or Service ports) skipped because the data path cannot express them",
            self.invalid_objects.clone(),
        );
        registry.register(
            "map_write_failures",
            "BPF map writes that failed",
            self.map_write_failures.clone(),
        );
    }

    /// The data path's own state: conntrack, hooks, the API server.
    fn register_datapath_metrics(&self, registry: &mut Registry) {
        registry.register(
            "conntrack_entries",
            "Conntrack entries present at the last sweep, per family",
            self.conntrack_entries.clone(),
        );
        registry.register(
            "conntrack_max_entries",
            "Capacity of each family's conntrack map (--conntrack-max)",
            self.conntrack_capacity.clone(),
        );
        registry.register(
            "conntrack_evictions",
            "Conntrack entries the full LRU map evicted (added, minus removed, minus present), per family",
            self.conntrack_evictions.clone(),
        );
        registry.register(
            "conntrack_swept",
            "Conntrack entries the sweep removed, per family: backend_gone (deleted backend) or expired",
            self.conntrack_swept.clone(),
        );
        registry.register(
            "wire_hook",
            "1 per interface facing the wire: its hook (tc or xdp), driver and the reason for the choice",
            self.wire_hooks.clone(),
        );
        registry.register(
            "api_server_up",
            "1 while the Kubernetes API server answers the agent's probe (API mode)",
            self.api_server_up.clone(),
        );
    }

    /// `lb_wire_hook{interface,hook,driver,reason} 1` for one wire interface.
    pub fn record_wire_hook(&self, label: WireHookLabel) {
        self.wire_hooks.get_or_create(&label).set(1);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Ready, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.ready.load(Ordering::SeqCst) {
            Err("first sync not done\n")
        } else if self.api_unready.load(Ordering::SeqCst) {
            Err("the Kubernetes API server does not answer\n")
        } else {
            Ok(())
        }
    }

    /// What the API server probe found.
    pub fn set_api_server(&self, reachable: bool, unready: bool) {
        self.api_server_up.set(i64::from(reachable));
        self.api_unready.store(unready, Ordering::SeqCst);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Reads an HTTP request head, bounded in size (`max` bytes) and time
/// (5 s), for the agent's small servers that answer and close.
pub(crate) async fn read_request_head(stream: &mut tokio::net::TcpStream, max: usize) -> Vec<u8> {
    let mut buf = vec![0u8; max];
    let mut n = 0;
    while n < buf.len() {
        match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read(&mut buf[n..]),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(k)) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    buf.truncate(n);
    buf
}

/// Sends `response` and closes the connection gracefully: a body the
/// client sent (a refused POST's, say) and the server never read would make
/// the close a reset, which can destroy the answer before the client reads
/// it. So: our FIN first, then discard what comes, bounded in bytes and time.
pub(crate) async fn answer_and_close(stream: &mut tokio::net::TcpStream, response: &str) {
    if stream.write_all(response.as_bytes()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// A request as the agent's HTTP servers see it. They only report state,
/// so GET and HEAD are all they serve: nothing a client sends can change
/// what the agent does.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// GET, or HEAD (the same answer without its body), of `path` (the
    /// query left out).
    Read { path: &'a str, head_only: bool },
    /// Any other method: answered 405, nothing else happens.
    MethodNotAllowed,
    /// Not an HTTP request line (or nothing before the timeout): 400.
    Malformed,
}

/// Reads the request line of `head`. Methods are case-sensitive (RFC 9110).
pub(crate) fn parse_request(head: &str) -> Request<'_> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None)
            if target.starts_with('/') && version.starts_with("HTTP/1.") =>
        {
            let path = target.split('?').next().unwrap_or(target);
            match method {
                "GET" => Request::Read {
                    path,
                    head_only: false,
                },
                "HEAD" => Request::Read {
                    path,
                    head_only: true,
                },
                _ => Request::MethodNotAllowed,
            }
        }
        _ => Request::Malformed,
    }
}

/// An HTTP/1.1 answer after which the connection closes. `head_only` (for
/// HEAD) leaves the body out but keeps its Content-Length.
pub(crate) fn http_response(
    status: &str,
    headers: &[(&str, String)],
    body: &str,
    head_only: bool,
) -> String {
    let mut resp = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        let _ = write!(resp, "{name}: {value}\r\n");
    }
    let _ = write!(
        resp,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        resp.push_str(body);
    }
    resp
}

/// The answer to a request that is no GET or HEAD, or no request at all.
pub fn refusal(request: &Request<'_>) -> String {
    let text = |s: &str| {
        vec![
            ("Content-Type", "text/plain".to_owned()),
            ("Allow", s.to_owned()),
        ]
    };
    match request {
        Request::MethodNotAllowed => http_response(
            "405 Method Not Allowed",
            &text("GET, HEAD"),
            "only GET and HEAD are served\n",
            false,
        ),
        _ => http_response(
            "400 Bad Request",
            &text("GET, HEAD"),
            "not an HTTP request\n",
            false,
        ),
    }
}

/// Binds `addr`. The IPv4 wildcard (`0.0.0.0`, the flags' defaults, as
/// kube-proxy's) means every address of the node: it listens on both
/// families, so the kubelet's probes reach it on an IPv6-only node too.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        listen_everywhere(addr.port())
    } else {
        TcpListener::bind(addr).await
    }
}

/// A listener on `port` of every address of both families (`[::]` with
/// IPV6_V6ONLY off), or of every IPv4 address where the node has no IPv6.
pub(crate) fn listen_everywhere(port: u16) -> std::io::Result<TcpListener> {
    listen_dual_stack(port).or_else(|_| listen_on((std::net::Ipv4Addr::UNSPECIFIED, port).into()))
}

/// A listener on one address, bound synchronously (from the sync loop too).
pub(crate) fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

fn listen_dual_stack(port: u16) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let socket = tokio::net::TcpSocket::new_v6()?;
    let off: libc::c_int = 0;
    // SAFETY: IPV6_V6ONLY takes an int, read from a live local.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv6Addr::UNSPECIFIED, port).into())?;
    socket.listen(1024)
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = bind(addr).await?;
    log::info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let head = read_request_head(&mut stream, 4096).await;
            let head = String::from_utf8_lossy(&head);
            let request = parse_request(&head);
            let Request::Read { path, head_only } = request else {
                answer_and_close(&mut stream, &refusal(&request)).await;
                return;
            };
            let (status, ctype, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                ),
                "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/readyz" => match metrics.readiness() {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
                    Err(why) => ("503 Service Unavailable", "text/plain", why.to_owned()),
                },
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let resp = http_response(
                status,
                &[("Content-Type", ctype.to_owned())],
                &body,
                head_only,
            );
            answer_and_close(&mut stream, &resp).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_kube_proxy() {
        let b = network_programming_buckets();
        assert_eq!(&b[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert!(b.contains(&59.0) && b.contains(&60.0) && b.contains(&115.0) && b.contains(&300.0));
        assert!(!b.contains(&61.0));
        assert!(b.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert_eq!(b.len(), 2 + 59 + 12 + 7);
    }

    #[test]
    fn before_the_data_path_is_loaded_a_scrape_has_no_datapath_counters() {
        let m = Metrics::new();
        m.services
            .get_or_create(&FamilyLabel::of(crate::model::Family::Ipv6))
            .set(3);
        let text = m.render();
        assert!(
            text.contains("lb_services_programmed{family=\"ipv6\"} 3"),
            "{text}"
        );
        assert!(!text.contains("lb_datapath_packets"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn only_get_and_head_are_read_requests() {
        assert_eq!(
            parse_request("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Request::Read {
                path: "/metrics",
                head_only: false
            }
        );
        assert_eq!(
            parse_request("HEAD /readyz HTTP/1.0\r\n\r\n"),
            Request::Read {
                path: "/readyz",
                head_only: true
            }
        );
        for method in [
            "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get",
        ] {
            assert_eq!(
                parse_request(&format!("{method} /readyz HTTP/1.1\r\n\r\n")),
                Request::MethodNotAllowed,
                "{method}"
            );
        }
        for junk in [
            "",
            "GET",
            "GET /metrics",
            "GET metrics HTTP/1.1",
            "GET / SPDY/3",
            "GET / HTTP/1.1 x",
        ] {
            assert_eq!(parse_request(junk), Request::Malformed, "{junk:?}");
        }
    }

    #[test]
    fn head_answers_keep_the_length_and_drop_the_body() {
        let get = http_response("200 OK", &[], "hello", false);
        let head = http_response("200 OK", &[], "hello", true);
        assert!(get.ends_with("\r\n\r\nhello"), "{get:?}");
        assert!(
            head.ends_with("\r\n\r\n") && head.contains("Content-Length: 5\r\n"),
            "{head:?}"
        );
        let refused = refusal(&Request::MethodNotAllowed);
        assert!(
            refused.starts_with("HTTP/1.1 405 ") && refused.contains("Allow: GET, HEAD\r\n"),
            "{refused:?}"
        );
    }
}
