//! One Kubernetes node of the lab: a network namespace with its agent,
//! pinned maps, cgroup and manifest folder, pods (each a namespace with a
//! veth to the node and a `lab-server`) and a client pod.
//!
//! Pods are routed like Calico does it: a /32 on eth0 and a default route
//! via 169.254.1.1, answered by a static neighbour entry for the host veth.
//! IPv6 the same way beside it: a /128 (`pod_ip6`: 10.244.k.n is
//! fd00:10:244:k::n) and a default route via the link-local fe80::1, also
//! a static neighbour entry; the node routes each pod's /128 to its veth.
//! The host side of each pod's veth has tx checksum offload off, so packets
//! the node forwards into a pod get their checksum finalized there: where a
//! wrongly updated partial checksum turns into a wrong full one, counted by
//! the pod's stack.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Deref,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    client::http_get,
    netns::{run, sibling_binary, ChildGuard, Netns, LAB_CGROUP_ROOT},
};
use lb_kube_fixtures::workload::{pod_ip6, LabPod};

const POD_GATEWAY: &str = "169.254.1.1";
/// The pods' IPv6 next hop: link-local, so it needs no route of its own.
const POD_GATEWAY6: &str = "fe80::1";

/// A pod: its namespace, veth pair and (for backends) its server.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (`pod_ip6` of `ip`).
    pub ip6: Ipv6Addr,
    pub(crate) host_if: String,
    // Field order matters: the server dies before its namespace goes.
    // Held so the server is killed with the pod.
    pub(super) server: Option<ChildGuard>,
    pub ns: Netns,
}

/// Where a node sits and what it is called.
#[derive(Clone, Debug)]
pub(crate) struct NodeSpec {
    /// The lab's id plus a suffix: names the namespaces, pins and cgroup.
    pub id: String,
    /// The Kubernetes node name.
    pub name: String,
    pub client_ip: Ipv4Addr,
}

pub struct LabNode {
    /// The Kubernetes node name (`name` is the namespace's, through Deref).
    pub node_name: String,
    pub id: String,
    /// Scratch folder: manifests/, agent.log, ready.
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    /// The node's cgroup (v2): the agent's socket hooks attach here, and
    /// `command_in_cgroup` starts processes in it.
    pub cgroup: PathBuf,
    agent: Option<ChildGuard>,
    /// The lb-agent binary to start (None: the one built with the tests).
    pub agent_binary: Option<PathBuf>,
    /// A program and its arguments the agent is started under (e.g.
    /// `setpriv` with fewer capabilities); empty: the agent itself.
    pub agent_wrapper: Vec<String>,
    /// Flags every start of the agent gets (the wire's `--wire-hook`).
    pub agent_defaults: Vec<String>,
    /// Start the agent without `--interfaces eth0`, so it finds the wire
    /// by the node's default routes, as the DaemonSet's agent does.
    pub wire_from_default_route: bool,
    /// Where the agent reads the desired state: None, this node's manifest
    /// folder; else these flags (`--kubeconfig PATH`).
    pub(crate) source_flags: Option<Vec<String>>,
    pub pods: BTreeMap<String, Pod>,
    pub client: Pod,
    next_if: u32,
    lab_server: PathBuf,
    /// Last: goes after the pods, whose veths end in it.
    pub netns: Netns,
}

impl Deref for LabNode {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.netns
    }
}

impl LabNode {
    /// The node's namespace (forwarding on), its client pod, its scratch
    /// folder and cgroup. Its wire (eth0) is the caller's to add.
    pub(crate) fn create(spec: &NodeSpec) -> Result<Self> {
        let dir = std::env::temp_dir().join(&spec.id);
        fs::create_dir_all(dir.join("manifests"))?;
        let netns = Netns::create(&format!("{}-node", spec.id))?;
        crate::wire::make_router(&netns)?;
        let client_ns = Netns::create(&format!("{}-client", spec.id))?;
        lb_userspace::datapath::attach::ensure_cgroup2(Path::new(LAB_CGROUP_ROOT))?;
        let cgroup = PathBuf::from(LAB_CGROUP_ROOT).join(&spec.id);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut node = Self {
            node_name: spec.name.clone(),
            id: spec.id.clone(),
            dir,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&spec.id),
            cgroup,
            agent: None,
            agent_binary: None,
            agent_wrapper: Vec::new(),
            agent_defaults: Vec::new(),
            wire_from_default_route: false,
            source_flags: None,
            pods: BTreeMap::new(),
            client: Pod {
                name: "client".into(),
                ip: spec.client_ip,
                ip6: pod_ip6(spec.client_ip),
                host_if: String::new(),
                server: None,
                ns: client_ns,
            },
            next_if: 1,
            lab_server: sibling_binary("lab-server", "LAB_SERVER_BIN")?,
            netns,
        };
        node.client.host_if = node.wire_pod(&node.client.ns.name.clone(), spec.client_ip)?;
        Ok(node)
    }

    /// Connects a pod namespace to the node and returns the host veth name.
    fn wire_pod(&mut self, pod_ns: &str, ip: Ipv4Addr) -> Result<String> {
        let i = self.next_if;
        self.next_if += 1;
        let host_if = format!("lxc{i}");
        let host_mac = format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
        let pod_mac = format!("02:00:00:01:{:02x}:{:02x}", i >> 8, i & 0xff);
        let node = &self.netns.name;
        run(&[
            "ip", "-n", node, "link", "add", &host_if, "address", &host_mac, "type", "veth",
            "peer", "name", "eth0", "address", &pod_mac, "netns", pod_ns,
        ])?;
        run(&["ip", "-n", node, "link", "set", &host_if, "up"])?;
        // Forwarding from node to pod finalizes checksums here: the link
        // where partial checksums would turn into wrong ones.
        self.netns.exec(&["ethtool", "-K", &host_if, "tx", "off"])?;
        let ip_s = ip.to_string();
        run(&[
            "ip",
            "-n",
            node,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &host_if,
        ])?;
        run(&[
            "ip",
            "-n",
            node,
            "neigh",
            "replace",
            &ip_s,
            "lladdr",
            &pod_mac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ])?;
        run(&["ip", "-n", pod_ns, "link", "set", "eth0", "up"])?;
        run(&[
            "ip",
            "-n",
            pod_ns,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "eth0",
        ])?;
        run(&[
            "ip",
            "-n",
            pod_ns,
            "route",
            "add",
            POD_GATEWAY,
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        run(&[
            "ip",
            "-n",
            pod_ns,
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY,
            "dev",
            "eth0",
        ])?;
        run(&[
            "ip",
            "-n",
            pod_ns,
            "neigh",
            "replace",
            POD_GATEWAY,
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        self.wire_pod_ip6(pod_ns, &host_if, &host_mac, &pod_mac, pod_ip6(ip))?;
        Ok(host_if)
    }

    /// The IPv6 half of `wire_pod`, built the same way: the pod's /128
    /// routed to its veth with a static neighbour on the node; in the pod
    /// a default route via a link-local gateway the host veth answers for.
    fn wire_pod_ip6(
        &self,
        pod_ns: &str,
        host_if: &str,
        host_mac: &str,
        pod_mac: &str,
        ip6: Ipv6Addr,
    ) -> Result<()> {
        let node = self.netns.name.as_str();
        let ip6_s = ip6.to_string();
        let host = format!("{ip6}/128");
        run(&[
            "ip", "-n", node, "-6", "route", "add", &host, "dev", host_if,
        ])?;
        run(&[
            "ip",
            "-n",
            node,
            "-6",
            "neigh",
            "replace",
            &ip6_s,
            "lladdr",
            pod_mac,
            "dev",
            host_if,
            "nud",
            "permanent",
        ])?;
        crate::wire::address(pod_ns, "eth0", &host)?;
        run(&[
            "ip",
            "-n",
            pod_ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY6,
            "dev",
            "eth0",
        ])?;
        run(&[
            "ip",
            "-n",
            pod_ns,
            "-6",
            "neigh",
            "replace",
            POD_GATEWAY6,
            "lladdr",
            host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Creates a pod's namespace and starts its server; the pod is ready
    /// when the server listens.
    pub(crate) fn start_pod(&mut self, spec: &LabPod) -> Result<()> {
        let ns = Netns::create(&format!("{}-p{}", self.id, self.next_if))?;
        let host_if = self.wire_pod(&ns.name.clone(), spec.ip)?;
        let mut cmd = ns.command(&self.lab_server);
        cmd.args(["--name", &spec.name]);
        let mut ports = std::collections::BTreeSet::new();
        for p in &spec.ports {
            let flag = if p.protocol == "UDP" {
                "--udp"
            } else {
                "--tcp"
            };
            if ports.insert((flag, p.port)) {
                cmd.args([flag, &p.port.to_string()]);
            }
        }
        let server = spawn_until_ready(cmd).with_context(|| format!("pod {}", spec.name))?;
        self.pods.insert(
            spec.name.clone(),
            Pod {
                name: spec.name.clone(),
                ip: spec.ip,
                ip6: pod_ip6(spec.ip),
                host_if,
                server: Some(server),
                ns,
            },
        );
        Ok(())
    }

    /// Sends SIGTERM to a pod's server (a kubelet starting its termination).
    pub(crate) fn signal_terminate(&self, pod: &str) {
        if let Some(server) = self.pods.get(pod).and_then(|p| p.server.as_ref()) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
        }
    }

    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// How this node's agent is to be started: on the node's source (its
    /// manifest folder, or the flags the lab set, e.g. `--kubeconfig`) with
    /// `--node-name`, plus what the caller adds:
    /// `node.agent().flags(&["--socket-lb", "off"]).start()`.
    pub fn agent(&mut self) -> AgentLaunch<'_> {
        let mut flags = self.source_flags.clone().unwrap_or_else(|| {
            vec![
                "--manifests".into(),
                self.manifest_dir().to_string_lossy().into_owned(),
            ]
        });
        flags.extend(["--node-name".into(), self.node_name.clone()]);
        AgentLaunch { node: self, flags }
    }

    /// Starts lb-agent with these flags (and the lab's per-node ones)
    /// without waiting for a sync.
    fn spawn_agent(&mut self, source: &[&str]) -> Result<()> {
        let agent = match &self.agent_binary {
            Some(path) => path.clone(),
            None => sibling_binary("lb-agent", "LB_AGENT_BIN")?,
        };
        let _ = fs::remove_file(self.dir.join("ready"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let mut command = match self.agent_wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut c = self.netns.command(wrapper);
                c.args(args).arg(agent);
                c
            }
            None => self.netns.command(agent),
        };
        let defaults: Vec<&String> = self
            .agent_defaults
            .iter()
            .filter(|_| !source.contains(&"--wire-hook"))
            .collect();
        let child = command
            .args(["--pin-dir", &self.pin_dir.to_string_lossy(), "run"])
            .args(source)
            .args(defaults)
            // The socket hooks go on the node's own cgroup, never on the
            // machine's root: only processes the lab puts there are affected.
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(if self.wire_from_default_route {
                &[][..]
            } else {
                &["--interfaces", "eth0"][..]
            })
            .args(["--pod-interfaces", "lxc*"])
            .args(["--poll-interval", "100ms", "--ready-file"])
            .arg(self.dir.join("ready"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.agent = Some(ChildGuard(child));
        Ok(())
    }

    /// A command that runs `program` in network namespace `ns` and in this
    /// node's cgroup (so the agent's socket hooks apply to it). It moves
    /// itself into the cgroup before it execs, so no socket escapes.
    pub fn command_in_cgroup(&self, ns: &Netns, program: &Path) -> Command {
        let mut c = ns.command("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
            .arg(&self.cgroup)
            .arg(program);
        c
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.0.id())
    }

    /// Kills the agent without warning (a crash, an OOM kill).
    pub fn kill_agent(&mut self) {
        if let Some(mut guard) = self.agent.take() {
            let _ = guard.0.kill();
            let _ = guard.0.wait();
        }
    }

    /// Stops the agent (SIGTERM, as a DaemonSet rollout would).
    pub fn stop_agent(&mut self) {
        if let Some(mut guard) = self.agent.take() {
            // SAFETY: signal to our own child.
            unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = guard.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's sync generation (0 before the first sync).
    pub fn generation(&self) -> u64 {
        fs::read_to_string(self.dir.join("ready"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("generation ").and_then(|g| g.parse().ok()))
            })
            .unwrap_or(0)
    }

    pub fn wait_for_generation(&mut self, at_least: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.generation() >= at_least {
                return Ok(());
            }
            if let Some(agent) = self.agent.as_mut() {
                if let Ok(Some(status)) = agent.0.try_wait() {
                    bail!(
                        "lb-agent of {} exited ({status}) before sync {at_least}:\n{}",
                        self.node_name,
                        self.agent_log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "lb-agent of {} did not reach sync {at_least} in 20 s:\n{}",
            self.node_name,
            self.agent_log()
        )
    }

    /// A data path counter (`lb_common::stats::NAMES`), as `lb-agent stats`
    /// reports it from this node's pinned maps.
    pub fn datapath_stat(&self, name: &str) -> u64 {
        let stats = self.agent_command_json(&["stats", "--output", "json"]);
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
    }

    /// A data path counter of one family (`ipv4` or `ipv6`), as
    /// `lb-agent stats --family` reports it.
    pub fn datapath_stat_of(&self, name: &str, family: &str) -> u64 {
        let stats = self.agent_command_json(&["stats", "--output", "json", "--family", family]);
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
    }

    /// `lb-agent --pin-dir <this node's> ARGS` in the node, its JSON output.
    pub fn agent_command_json(&self, args: &[&str]) -> serde_json::Value {
        let agent = sibling_binary("lb-agent", "LB_AGENT_BIN").expect("lb-agent binary");
        let pin_dir = self.pin_dir.to_string_lossy().into_owned();
        let mut cmd = vec![
            agent.to_string_lossy().into_owned(),
            "--pin-dir".into(),
            pin_dir,
        ];
        cmd.extend(args.iter().map(std::string::ToString::to_string));
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = self
            .netns
            .exec(&cmd)
            .unwrap_or_else(|e| panic!("lb-agent {args:?}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lb-agent {args:?}: {e}: {out}"))
    }

    /// The agent's `/metrics`, scraped inside the node namespace from
    /// `--metrics-addr 127.0.0.1:port`.
    pub fn scrape_metrics(&self, port: u16) -> String {
        let (code, body) = self
            .netns
            .run_in(|| {
                http_get(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    "/metrics",
                    Duration::from_secs(2),
                )
            })
            .expect("scrape /metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// The namespaces of this node: its own, its client pod's, its pods'.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.netns, &self.client.ns];
        all.extend(self.pods.values().map(|p| &p.ns));
        all
    }
}

/// A node's agent about to start (see `LabNode::agent`).
pub struct AgentLaunch<'a> {
    node: &'a mut LabNode,
    flags: Vec<String>,
}

impl AgentLaunch<'_> {
    /// More flags after the source and node ones.
    pub fn flags(mut self, extra: &[&str]) -> Self {
        self.flags.extend(extra.iter().map(|f| (*f).to_owned()));
        self
    }

    /// These flags instead of the node's source and `--node-name` (the
    /// lab's own, such as `--pin-dir` and `--interfaces`, still come).
    pub fn only(mut self, flags: &[&str]) -> Self {
        self.flags = flags.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    /// Starts it and waits for its first sync.
    pub fn start(self) -> Result<()> {
        let node = self.node;
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        node.spawn_agent(&flags)?;
        node.wait_for_generation(1)
    }

    /// Starts it without waiting for a sync.
    pub fn spawn(self) -> Result<()> {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.node.spawn_agent(&flags)
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.stop_agent();
        if std::thread::panicking() {
            eprintln!(
                "---- lb-agent log of {} ({}) ----\n{}",
                self.node_name,
                self.id,
                self.agent_log()
            );
        }
        let _ = lb_userspace::datapath::loader::cleanup(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.dir);
        remove_cgroup(&self.cgroup);
        // Pods, the client and the node's namespace go with their fields.
    }
}

/// Removes a cgroup once its processes are gone (bounded wait).
fn remove_cgroup(cgroup: &Path) {
    for _ in 0..50 {
        if fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
            break;
        }
        if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain signal to a process the lab started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `cmd` with its stdout piped and waits (at most 10 s) for it to
/// print "ready".
fn spawn_until_ready(mut cmd: Command) -> Result<ChildGuard> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == "ready" => Ok(guard),
        other => bail!("the server did not become ready: {other:?}"),
    }
}
