//! The lab with the Kubernetes API server fixture: the real lb-agent
//! binary, started with `--kubeconfig`, watches an API server
//! (kube-fixtures/src/apiserver.rs) that speaks the real list/watch protocol.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_userspace::{datapath::inspect, datapath::loader, model::Protocol};
use serde_json::{json, Value};

use lb_kube_fixtures::apiserver::ApiServer;

use crate::{http_get, Lab, Wire, NODE_NAME};

const TIMEOUT: Duration = Duration::from_secs(2);
pub const NGINX: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const METRICS_PORT: u16 = 10249;
/// How long the agent may take to apply a change (watch backoff included).
pub const CONVERGE: Duration = Duration::from_secs(30);

/// A file of the repository's examples/ folder.
pub fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// The lab, with its API server listening inside the node namespace, where
/// the agent runs (no traffic to it leaves the lab).
pub struct KubeLab {
    pub lab: Lab,
    pub api: ApiServer,
    pub kubeconfig: PathBuf,
}

impl KubeLab {
    /// The lab of the nginx example (3 replicas).
    pub fn nginx() -> Self {
        let k = Self::from_manifests(&[example("nginx-deployment.yaml")]);
        assert_eq!(k.lab.pods.len(), 3, "the example Deployment has 3 replicas");
        k
    }

    /// The lab of these manifest files, with the API server (nothing
    /// published yet).
    pub(crate) fn from_manifests(files: &[PathBuf]) -> Self {
        Self::from_manifests_on(Wire::Software, files)
    }

    /// The same on `wire`.
    pub fn from_manifests_on(wire: Wire, files: &[PathBuf]) -> Self {
        let lab = Lab::from_manifest_files_on(wire, files).expect("build the lab");
        let api = ApiServer::start_in(Some(lab.node.path())).expect("start the API server fixture");
        api.apply(&json!({"kind": "Node", "metadata": {"name": NODE_NAME,
            "labels": {"topology.kubernetes.io/zone": "lab-a"}}}))
            .expect("node");
        let kubeconfig = lab.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
        Self {
            lab,
            api,
            kubeconfig,
        }
    }

    /// The lab with the example published, the agent running and the
    /// nginx Service programmed with all three pods.
    pub fn serving() -> (Self, SocketAddrV4, Vec<String>) {
        let mut k = Self::nginx();
        k.publish();
        k.start_agent();
        let nginx = SocketAddrV4::new(NGINX, 80);
        let pods = k.lab.pods_of("Deployment/nginx-deployment");
        k.wait_programmed(nginx, Some(k.pod_ips(&pods)), "initial");
        (k, nginx, pods)
    }

    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            "--kubeconfig".into(),
            self.kubeconfig.to_string_lossy().into_owned(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{METRICS_PORT}"),
        ]
    }

    pub fn start_agent(&mut self) {
        self.start_agent_extra(&[]);
    }

    /// `start_agent` with more flags.
    pub fn start_agent_extra(&mut self, extra: &[&str]) {
        let mut flags = self.agent_flags();
        flags.extend(extra.iter().map(std::string::ToString::to_string));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.lab
            .agent()
            .only(&flags)
            .start()
            .expect("start lb-agent");
    }

    /// Runs `lb-agent check` against the lab's API server in the node
    /// namespace, with the node flags the lab starts the agent with and
    /// `extra`: (exit success, output).
    pub fn check(&self, extra: &[&str]) -> (bool, String) {
        let agent = crate::sibling_binary("lb-agent", "LB_AGENT_BIN").expect("lb-agent");
        let out = self
            .lab
            .node
            .command(&agent)
            .args(["--pin-dir", self.lab.pin_dir.to_str().unwrap(), "check"])
            .args(["--kubeconfig", self.kubeconfig.to_str().unwrap()])
            .args(["--node-name", NODE_NAME, "--interfaces", "eth0"])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run lb-agent check");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Publishes the lab's Services and the EndpointSlices of its ready pods.
    pub fn publish(&self) {
        let mut objects: Vec<Value> = self
            .lab
            .services()
            .iter()
            .map(|s| serde_json::to_value(s).expect("service json"))
            .collect();
        objects.extend(
            self.lab
                .endpoint_slices()
                .iter()
                .map(|s| serde_json::to_value(s).expect("slice json")),
        );
        self.api.apply_all(&objects).expect("apply");
    }

    /// Everything the pinned maps hold, as `lb-agent services` shows it.
    pub fn snapshot(&self) -> Vec<inspect::ProgrammedService> {
        let maps = loader::open_pinned(&self.lab.pin_dir).expect("open the pinned maps");
        inspect::programmed_services(&maps.read_contents().expect("read the pinned maps"))
    }

    /// Backends programmed for `frontend`, as addresses (None: no such frontend).
    pub fn programmed(
        &self,
        frontend: SocketAddrV4,
        proto: Protocol,
    ) -> Option<BTreeSet<Ipv4Addr>> {
        let maps = loader::open_pinned(&self.lab.pin_dir).ok()?;
        let contents = maps.read_contents().ok()?;
        inspect::programmed_services(&contents)
            .into_iter()
            .find(|s| {
                s.frontend.addr == std::net::IpAddr::V4(*frontend.ip())
                    && s.frontend.port == frontend.port()
                    && s.frontend.proto == proto
            })
            .map(|s| {
                s.backends
                    .iter()
                    .filter_map(|b| match b.backend?.addr {
                        std::net::IpAddr::V4(a) => Some(a),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .collect()
            })
    }

    /// Waits until the TCP frontend's backends are exactly `want` (None: absent).
    pub fn wait_programmed(
        &self,
        frontend: SocketAddrV4,
        want: Option<BTreeSet<Ipv4Addr>>,
        what: &str,
    ) {
        let deadline = Instant::now() + CONVERGE;
        let mut got = None;
        while Instant::now() < deadline {
            got = self.programmed(frontend, Protocol::Tcp);
            if got == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "{what}: {frontend} did not converge in {CONVERGE:?}: want {want:?}, maps hold {got:?}\n{}",
            self.lab.agent_log()
        );
    }

    pub fn pod_ips(&self, names: &[String]) -> BTreeSet<Ipv4Addr> {
        names.iter().map(|n| self.lab.pods[n].ip).collect()
    }

    pub fn metrics(&self) -> String {
        self.lab.scrape_metrics(METRICS_PORT)
    }

    pub fn readyz(&self) -> Option<u16> {
        self.lab
            .node
            .run_in(|| {
                http_get(
                    SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
                    "/readyz",
                    TIMEOUT,
                )
            })
            .ok()
            .map(|(code, _)| code)
    }

    /// Polls `/readyz` until it answers `want`; returns how long that took.
    pub fn wait_readyz(&self, want: u16, within: Duration) -> Duration {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.readyz() == Some(want) {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "/readyz did not answer {want} within {within:?} (last: {:?})\n{}",
            self.readyz(),
            self.lab.agent_log()
        );
    }
}
