//! Reaching the Kubernetes API server: where it is, how long a request may
//! take, and whether it still answers.
//!
//! Without kube-proxy, the `kubernetes` Service's ClusterIP (what a pod's
//! in-cluster config points at) works only once this agent has programmed
//! it, which it cannot do before it has read the API. So, like other
//! kube-proxy replacements, the agent asks for the API server's real
//! address, and refuses a Service address that nothing translates yet.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use kube::{
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};

/// `--api-server kubernetes-service`: the in-cluster address
/// (KUBERNETES_SERVICE_HOST/PORT), for clusters where another proxy still
/// translates the `kubernetes` Service.
pub const KUBERNETES_SERVICE_SETTING: &str = "kubernetes-service";

/// The environment variable the DaemonSet sets `--api-server` from.
pub const API_SERVER_ENV: &str = "LB_API_SERVER";

/// Where the API server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiServerAddress {
    /// Reached directly: a control-plane address or its load balancer.
    Url(http::Uri),
    /// The in-cluster Service address, accepted only while it answers.
    KubernetesService,
}

/// Parses `--api-server`: `https://HOST:PORT` (or http), or
/// `kubernetes-service`.
pub fn parse_api_server(s: &str) -> Result<ApiServerAddress, String> {
    if s == KUBERNETES_SERVICE_SETTING {
        return Ok(ApiServerAddress::KubernetesService);
    }
    let help = "set it to the API server's own address, e.g. https://192.0.2.10:6443 \
                (a control-plane node or the load balancer in front of them)";
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}): {help}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("https" | "http"));
    let path_ok = matches!(uri.path(), "" | "/");
    match uri.host() {
        Some(h) if scheme_ok && path_ok && !h.is_empty() => Ok(ApiServerAddress::Url(uri)),
        _ => Err(format!("{s:?} is not an https://HOST[:PORT] URL: {help}")),
    }
}

/// How the agent talks to the API server.
pub struct ApiClientOptions<'a> {
    pub kubeconfig: Option<&'a Path>,
    pub api_server: Option<&'a ApiServerAddress>,
    /// Connecting, and waiting for a response to begin: every request.
    pub timeout: Duration,
}

/// A response body that stops arriving (a list page, a watch that sends
/// not even bookmarks) is cut after this. Longer than a watch's own
/// 290 s, so a quiet watch is ended by the server, not by us.
const STALLED_BODY_TIMEOUT: Duration = Duration::from_mins(5);

/// A client whose every request is bounded in time.
pub async fn client(opts: &ApiClientOptions<'_>) -> Result<Client> {
    let config = config(opts).await?;
    refuse_untranslated_service_address(&config.cluster_url, opts.timeout).await?;
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&tower::timeout::TimeoutLayer::new(opts.timeout))
        .build())
}

async fn config(opts: &ApiClientOptions<'_>) -> Result<Config> {
    if opts.kubeconfig.is_none() && opts.api_server.is_none() && would_use_in_cluster_config() {
        bail!(
            "in a pod, the API server address is required: set --api-server or \
             {API_SERVER_ENV} (deploy/lb-agent.yaml: the lb-agent-api-server ConfigMap) to \
             its own address, e.g. https://192.0.2.10:6443. The in-cluster address is the \
             `kubernetes` Service, which only this agent translates once kube-proxy is gone, \
             so after a node reboot it could not be reached. \
             `--api-server {KUBERNETES_SERVICE_SETTING}` keeps it, for clusters where another \
             proxy still translates it"
        );
    }
    let mut config = match opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster or default kubeconfig")?,
    };
    match opts.api_server {
        Some(ApiServerAddress::Url(url)) => config.cluster_url = url.clone(),
        Some(ApiServerAddress::KubernetesService) | None => {}
    }
    config.connect_timeout = Some(opts.timeout);
    config.read_timeout = Some(STALLED_BODY_TIMEOUT);
    // Count the read timeout from each request, not from when a pooled
    // connection went idle.
    config.reset_reader_on_write = true;
    Ok(config)
}

/// Whether, without --kubeconfig, the in-cluster config would be used: in
/// a pod (the kubelet sets KUBERNETES_SERVICE_HOST) with no kubeconfig
/// file ($KUBECONFIG, ~/.kube/config), which kube's inference prefers.
fn would_use_in_cluster_config() -> bool {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    let default_kubeconfig = env("HOME")
        .map(|home| Path::new(&home).join(".kube/config"))
        .is_some_and(|p| p.exists());
    env("KUBERNETES_SERVICE_HOST").is_some() && env("KUBECONFIG").is_none() && !default_kubeconfig
}

/// The `kubernetes` Service's address, as the kubelet tells every pod
/// (KUBERNETES_PORT=tcp://IP:PORT, set even when the pod overrides
/// KUBERNETES_SERVICE_HOST).
pub(crate) fn kubernetes_service_address() -> Option<SocketAddr> {
    let v = std::env::var("KUBERNETES_PORT").ok()?;
    v.strip_prefix("tcp://")?.parse().ok()
}

/// Where `url` connects, when its host is an address (not a name).
pub(crate) fn url_address(url: &http::Uri) -> Option<SocketAddr> {
    let host = url.host()?.trim_matches(['[', ']']);
    let ip: IpAddr = host.parse().ok()?;
    let port = url.port_u16().unwrap_or(match url.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    Some(SocketAddr::new(ip, port))
}

/// Refuses an API server address that is the `kubernetes` Service when
/// nothing on this node answers there yet (no kube-proxy, and not this
/// agent's maps from before a restart): the watches could never start.
pub(crate) async fn refuse_untranslated_service_address(
    url: &http::Uri,
    timeout: Duration,
) -> Result<()> {
    let (Some(target), Some(service)) = (url_address(url), kubernetes_service_address()) else {
        return Ok(());
    };
    if target != service {
        return Ok(());
    }
    let connect = tokio::net::TcpStream::connect(target);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(_)) => {
            log::warn!(
                "the API server address {target} is the `kubernetes` Service: it answers now \
                 (another proxy, or this agent's maps from before a restart, translate it), \
                 but not after a node reboot without kube-proxy; set --api-server / \
                 {API_SERVER_ENV} to the API server's own address"
            );
            Ok(())
        }
        Ok(Err(e)) => bail!(untranslated_message(target, &e.to_string())),
        Err(_) => bail!(untranslated_message(
            target,
            &format!("no answer in {timeout:?}")
        )),
    }
}

fn untranslated_message(target: SocketAddr, why: &str) -> String {
    format!(
        "the API server address {target} is the `kubernetes` Service's ClusterIP, and \
         nothing on this node translates it yet ({why}): this agent is what would, once it \
         has read the API. Set --api-server / {API_SERVER_ENV} (deploy/lb-agent.yaml: the \
         lb-agent-api-server ConfigMap) to the API server's own address, e.g. \
         https://192.0.2.10:6443"
    )
}

/// Whether the API server answers, from probes: a quiet cluster sends no
/// watch events, and a hung server sends nothing at all, so silence on
/// the watches says nothing.
#[derive(Debug)]
pub(crate) struct Reachability {
    last_answer: Instant,
    last_failure: Instant,
    failures: u32,
    /// Not ready after this long without an answer.
    unready_after: Duration,
}

/// What a probe's outcome changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReachabilityChange {
    None,
    /// The first answer after failures.
    Recovered {
        failures: u32,
        down_for: Duration,
    },
    /// No answer for `unready_after`: not ready from now on.
    BecameUnready,
}

impl Reachability {
    pub fn new(now: Instant, unready_after: Duration) -> Self {
        Self {
            last_answer: now,
            last_failure: now,
            failures: 0,
            unready_after,
        }
    }

    pub fn answered(&mut self, now: Instant) -> ReachabilityChange {
        let change = match self.failures {
            0 => ReachabilityChange::None,
            failures => ReachabilityChange::Recovered {
                failures,
                down_for: now.saturating_duration_since(self.last_answer),
            },
        };
        self.last_answer = now;
        self.failures = 0;
        change
    }

    pub fn failed(&mut self, now: Instant) -> ReachabilityChange {
        let was_unready = self.failures > 0 && self.unready_at(self.last_failure);
        self.failures += 1;
        self.last_failure = now;
        if self.unready(now) && !was_unready {
            ReachabilityChange::BecameUnready
        } else {
            ReachabilityChange::None
        }
    }

    /// Unready once probes have failed for `unready_after`.
    pub fn unready(&self, now: Instant) -> bool {
        self.failures > 0 && self.unready_at(now)
    }

    fn unready_at(&self, t: Instant) -> bool {
        t.saturating_duration_since(self.last_answer) >= self.unready_after
    }

    pub(crate) fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_answer)
    }
}

/// Probes that many timeouts make the agent unready.
pub(crate) const UNREADY_AFTER_TIMEOUTS: u32 = 3;

/// Asks the API server for its version every `timeout`, each ask bounded
/// by `timeout`, and reports through `report(reachable, unready)`.
pub async fn probe_forever(client: Client, timeout: Duration, report: impl Fn(bool, bool)) {
    let mut state = Reachability::new(Instant::now(), timeout * UNREADY_AFTER_TIMEOUTS);
    let mut tick = tokio::time::interval(timeout);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let outcome = tokio::time::timeout(timeout, client.apiserver_version()).await;
        let now = Instant::now();
        let ok = matches!(outcome, Ok(Ok(_)));
        let change = if ok {
            state.answered(now)
        } else {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer in {timeout:?}"),
            };
            log::warn!(
                "API server probe failed ({why}); no answer for {:?}, retrying every {timeout:?}",
                state.silent_for(now)
            );
            state.failed(now)
        };
        log_change(&change, state.unready_after);
        report(ok, state.unready(now));
    }
}

fn log_change(change: &ReachabilityChange, unready_after: Duration) {
    match change {
        ReachabilityChange::None => {}
        ReachabilityChange::Recovered { failures, down_for } => log::info!(
            "API server answers again after {failures} failed probes ({down_for:?}): ready"
        ),
        ReachabilityChange::BecameUnready => log::error!(
            "API server unreachable for {unready_after:?}: /readyz reports not ready; the data \
             path keeps serving what was last programmed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_setting_is_a_url_or_the_service_keyword() {
        assert_eq!(
            parse_api_server("kubernetes-service"),
            Ok(ApiServerAddress::KubernetesService)
        );
        for good in [
            "https://192.0.2.10:6443",
            "https://api.example.com",
            "http://127.0.0.1:8080/",
            "https://[2001:db8::1]:6443",
        ] {
            assert!(
                matches!(parse_api_server(good), Ok(ApiServerAddress::Url(_))),
                "{good}"
            );
        }
        // The DaemonSet's placeholder, and other mistakes.
        for bad in [
            "https://<api-server-address>:6443",
            "192.0.2.10:6443",
            "ftp://192.0.2.10",
            "https://192.0.2.10:6443/api",
            "",
        ] {
            let e = parse_api_server(bad).expect_err(bad);
            assert!(e.contains("API server's own address"), "{bad}: {e}");
        }
    }

    #[test]
    fn url_address_only_for_literal_addresses() {
        let a = |s: &str| url_address(&s.parse().unwrap());
        assert_eq!(
            a("https://10.96.0.1"),
            Some("10.96.0.1:443".parse().unwrap())
        );
        assert_eq!(a("http://10.0.0.1"), Some("10.0.0.1:80".parse().unwrap()));
        assert_eq!(
            a("https://[fd00::1]:6443"),
            Some("[fd00::1]:6443".parse().unwrap())
        );
        assert_eq!(a("https://kubernetes.default.svc"), None);
    }

    #[test]
    fn unready_only_after_failing_for_the_whole_window() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut r = Reachability::new(t0, Duration::from_secs(30));
        assert_eq!(r.answered(s(10)), ReachabilityChange::None);
        // Failures within the window: still ready.
        assert_eq!(r.failed(s(20)), ReachabilityChange::None);
        assert!(!r.unready(s(20)));
        assert_eq!(r.failed(s(39)), ReachabilityChange::None);
        assert_eq!(r.failed(s(40)), ReachabilityChange::BecameUnready);
        assert!(r.unready(s(40)));
        assert_eq!(r.failed(s(50)), ReachabilityChange::None, "said once");
        assert_eq!(
            r.answered(s(60)),
            ReachabilityChange::Recovered {
                failures: 4,
                down_for: Duration::from_secs(50)
            }
        );
        assert!(!r.unready(s(100)), "no failure since the answer");
    }
}
