//! The lab: a Kubernetes node built from network namespaces, for tests and
//! the demo. Everything it creates (namespaces, veths, processes, pinned
//! maps, files) is removed by guards when it is dropped, also on panic.
//!
//! Topology (all inside namespaces the lab creates):
//!
//! ```text
//!  ext client ns ── eth0 (10.77.0.2) ══ eth0 (10.77.0.1) ── node ns
//!   full checksums                       XDP here          │ routes 10.244.0.x/32
//!   (tx offload off, like a NIC)                           ├─ lxcN ══ eth0 pod ns (server)
//!                                        tc ingress here ──┤   (tx offload off: the node
//!                                                          │    finalizes checksums)
//!                                                          └─ lxcM ══ eth0 client pod ns
//! ```
//! Pods are routed like Calico does it: a /32 on eth0 and a default route via
//! 169.254.1.1, answered by a static neighbour entry for the host veth.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::workload::{self, LabObject, LabPod};

pub const NODE_WIRE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const EXT_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const CLIENT_POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const NODE_NAME: &str = "lab-node";
/// Where the lab mounts (once) the cgroup v2 hierarchy for its cgroups.
pub const LAB_CGROUP_ROOT: &str = "/run/lb-lab/cgroupv2";
const NETNS_PREFIX: &str = "lbt-";
const POD_GATEWAY: &str = "169.254.1.1";

/// Runs a command, failing with its stderr.
pub fn run(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with every process still in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs inside this namespace (network only: the mount
    /// namespace stays, so bpffs pins are shared with the host).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let out = self
            .command(cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{cmd:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it
    /// opens live there.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path(), f)
    }

    /// The kernel's checksum error counters in this namespace:
    /// (TcpInCsumErrors, UdpInCsumErrors, IcmpInCsumErrors), as `nstat`
    /// reports them.
    pub fn checksum_errors(&self) -> (u64, u64, u64) {
        let snmp =
            self.run_in(|| fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp"));
        (
            snmp_counter(&snmp, "Tcp:", "InCsumErrors"),
            snmp_counter(&snmp, "Udp:", "InCsumErrors"),
            snmp_counter(&snmp, "Icmp:", "InCsumErrors"),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = run(&["ip", "netns", "pids", &self.name]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain signal to a process in our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("lab: could not delete netns {}: {e}", self.name);
        }
    }
}

/// Runs `f` on a new thread inside the network namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(move || {
            let ns = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    })
}

fn snmp_counter(snmp: &str, section: &str, field: &str) -> u64 {
    let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with(section)).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    names
        .iter()
        .position(|n| *n == field)
        .and_then(|i| values.get(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A process killed on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod: its namespace, veth pair and (for backends) its server.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    // Field order matters: the server dies before its namespace goes.
    // Held so the server is killed with the pod.
    _server: Option<ChildGuard>,
    pub ns: Netns,
}

/// Finds a binary built next to the running one (target/debug), unless
/// `env_var` names it.
pub fn sibling_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {} (build it with `cargo build --bins`, or set {env_var})",
        exe.display()
    )
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Removes namespaces and pins left by lab processes that no longer exist
/// (a test killed with SIGKILL cannot run its guards).
pub fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            return false;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                drop(Netns { name });
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = lb_userspace::loader::cleanup(&e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(LAB_CGROUP_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                if let Ok(procs) = fs::read_to_string(e.path().join("cgroup.procs")) {
                    for pid in procs
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                    {
                        // SAFETY: plain signal to a leftover of a dead lab.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                let _ = fs::remove_dir(e.path());
            }
        }
    }
}

/// Attaches the object's pass-through XDP program to `eth0` of the
/// current network namespace (see `lb_xdp_pass`).
fn attach_xdp_pass() -> Result<aya::Ebpf> {
    let mut ebpf = aya::Ebpf::load(lb_userspace::EBPF_OBJECT)?;
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(lb_common::program_names::XDP_PASS)
        .context("lb_xdp_pass missing from the BPF object")?
        .try_into()?;
    prog.load()?;
    prog.attach("eth0", aya::programs::XdpMode::Driver)?;
    Ok(ebpf)
}

pub struct Lab {
    pub id: String,
    /// Scratch folder: manifests/, agent.log, ready.
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    /// The lab's cgroup (v2): the agent's socket hooks attach here, and
    /// `command_in_cgroup` starts processes in it.
    pub cgroup: PathBuf,
    agent: Option<ChildGuard>,
    /// The lb-agent binary to start (None: the one built with the tests).
    pub agent_binary: Option<PathBuf>,
    /// A program and its arguments the agent is started under (e.g.
    /// `setpriv` with fewer capabilities); empty: the agent itself.
    pub agent_wrapper: Vec<String>,
    pub objects: Vec<LabObject>,
    /// Extra manifests (Services, EndpointSlices) written as they are.
    pub extra_manifests: BTreeMap<String, String>,
    pub pod_specs: Vec<LabPod>,
    /// Pods left out of EndpointSlices (as if deleted or not ready).
    pub excluded: BTreeSet<String>,
    pub pods: BTreeMap<String, Pod>,
    pub client: Pod,
    next_if: u32,
    pub ext: Netns,
    pub node: Netns,
    lab_server: PathBuf,
    /// Keeps the external client's pass-through XDP program attached;
    /// released inside that namespace (see Drop).
    ext_xdp: Option<aya::Ebpf>,
}

impl Lab {
    /// Builds the node, the client pod, the external client and one pod per
    /// replica of the Deployments/ReplicaSets in `manifests`.
    pub fn from_manifest_files(manifests: &[PathBuf]) -> Result<Self> {
        let mut objects = Vec::new();
        for file in manifests {
            let text =
                fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let (objs, _skipped) = workload::parse_lab_objects(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            objects.extend(objs);
        }
        Self::from_objects(objects)
    }

    pub fn from_objects(objects: Vec<LabObject>) -> Result<Self> {
        sweep_stale();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{NETNS_PREFIX}{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(dir.join("manifests"))?;
        let node = Netns::create(&format!("{id}-node"))?;
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            node.exec(&["sysctl", "-qw", sysctl])?;
        }
        let ext = Netns::create(&format!("{id}-ext"))?;
        run(&[
            "ip", "-n", &node.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &ext.name,
        ])?;
        run(&[
            "ip",
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("{NODE_WIRE_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        run(&[
            "ip",
            "-n",
            &ext.name,
            "addr",
            "add",
            &format!("{EXT_CLIENT_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        for ns in [&node, &ext] {
            run(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"])?;
            // Complete checksums on the wire, as a NIC sends and receives them.
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        // The node's XDP answers some packets itself (XDP_TX: a RST, an
        // ICMP port unreachable). veth wakes the peer's receive queue for
        // those frames only if the peer runs XDP too; a physical NIC needs
        // nothing of the sort.
        let ext_xdp = ext.run_in(attach_xdp_pass)?;
        for cidr in ["10.96.0.0/12", "10.244.0.0/16"] {
            run(&[
                "ip",
                "-n",
                &ext.name,
                "route",
                "add",
                cidr,
                "via",
                &NODE_WIRE_ADDR.to_string(),
            ])?;
        }
        let lab_server = sibling_binary("lab-server", "LAB_SERVER_BIN")?;
        let client_ns = Netns::create(&format!("{id}-client"))?;
        lb_userspace::attach::ensure_cgroup2(Path::new(LAB_CGROUP_ROOT))?;
        let cgroup = PathBuf::from(LAB_CGROUP_ROOT).join(&id);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut lab = Self {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            cgroup,
            id,
            dir,
            agent: None,
            agent_binary: None,
            agent_wrapper: Vec::new(),
            objects,
            extra_manifests: BTreeMap::new(),
            pod_specs: Vec::new(),
            excluded: BTreeSet::new(),
            pods: BTreeMap::new(),
            client: Pod {
                name: "client".into(),
                ip: CLIENT_POD_ADDR,
                host_if: String::new(),
                _server: None,
                ns: client_ns,
            },
            next_if: 1,
            ext,
            node,
            lab_server,
            ext_xdp: Some(ext_xdp),
        };
        lab.client.host_if = lab.wire_pod(&lab.client.ns.name.clone(), CLIENT_POD_ADDR)?;
        let mut ips = (10u8..=250).map(|i| Ipv4Addr::new(10, 244, 0, i));
        lab.pod_specs = workload::pods_for_workloads(&lab.objects, &mut ips, NODE_NAME)?;
        for spec in lab.pod_specs.clone() {
            lab.start_pod(&spec)?;
        }
        lab.write_manifests()?;
        Ok(lab)
    }

    /// Connects a pod namespace to the node and returns the host veth name.
    fn wire_pod(&mut self, pod_ns: &str, ip: Ipv4Addr) -> Result<String> {
        let i = self.next_if;
        self.next_if += 1;
        let host_if = format!("lxc{i}");
        let host_mac = format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
        let pod_mac = format!("02:00:00:01:{:02x}:{:02x}", i >> 8, i & 0xff);
        let node = &self.node.name;
        run(&[
            "ip", "-n", node, "link", "add", &host_if, "address", &host_mac, "type", "veth",
            "peer", "name", "eth0", "address", &pod_mac, "netns", pod_ns,
        ])?;
        run(&["ip", "-n", node, "link", "set", &host_if, "up"])?;
        // Forwarding from node to pod finalizes checksums here: the link
        // where partial checksums would turn into wrong ones.
        self.node.exec(&["ethtool", "-K", &host_if, "tx", "off"])?;
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
            &ip.to_string(),
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
        Ok(host_if)
    }

    /// Creates a pod's namespace and starts its server; the pod is ready
    /// when the server listens.
    pub fn start_pod(&mut self, spec: &LabPod) -> Result<()> {
        let ns = Netns::create(&format!("{}-p{}", self.id, self.next_if))?;
        let host_if = self.wire_pod(&ns.name.clone(), spec.ip)?;
        let mut cmd = ns.command(&self.lab_server);
        cmd.args(["--name", &spec.name]);
        let mut ports = BTreeSet::new();
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
            Ok(line) if line.trim() == "ready" => {}
            other => bail!(
                "server of pod {} did not become ready: {other:?}",
                spec.name
            ),
        }
        self.pods.insert(
            spec.name.clone(),
            Pod {
                name: spec.name.clone(),
                ip: spec.ip,
                host_if,
                _server: Some(guard),
                ns,
            },
        );
        Ok(())
    }

    /// Adds Service `name` in `default` (its spec and status given) and one
    /// EndpointSlice with `endpoints` for ports 80/TCP and 80/UDP to the
    /// extra manifests (written by the next `write_manifests`).
    pub fn put_extra_service(
        &mut self,
        name: &str,
        spec: serde_json::Value,
        status: serde_json::Value,
        endpoints: Vec<serde_json::Value>,
    ) {
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec, "status": status});
        let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-abc"), "namespace": "default",
                "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"},
                      {"name": "udp", "port": 80, "protocol": "UDP"}],
            "endpoints": endpoints});
        self.extra_manifests.insert(
            format!("{name}.yaml"),
            format!(
                "{}---\n{}",
                serde_yaml::to_string(&svc).expect("Service as YAML"),
                serde_yaml::to_string(&slice).expect("EndpointSlice as YAML")
            ),
        );
    }

    /// The agent's `/metrics`, scraped inside the node namespace from
    /// `--metrics-addr 127.0.0.1:port`.
    pub fn scrape_metrics(&self, port: u16) -> String {
        let (code, body) = self
            .node
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

    /// A pod address no pod of the lab holds (10.244.0.10 to .250).
    pub fn free_pod_ip(&self) -> Result<Ipv4Addr> {
        let taken: BTreeSet<Ipv4Addr> = self.pod_specs.iter().map(|p| p.ip).collect();
        (10u8..=250)
            .map(|i| Ipv4Addr::new(10, 244, 0, i))
            .find(|ip| !taken.contains(ip) && *ip != CLIENT_POD_ADDR)
            .context("the lab's pod range is used up")
    }

    /// Creates a pod (a new replica) and starts its server.
    pub fn add_pod(&mut self, spec: LabPod) -> Result<()> {
        self.start_pod(&spec)?;
        self.pod_specs.push(spec);
        Ok(())
    }

    /// Sets a pod's readiness (what its readiness probe reports).
    pub fn set_pod_ready(&mut self, name: &str, ready: bool) {
        if let Some(spec) = self.pod_specs.iter_mut().find(|p| p.name == name) {
            spec.ready = ready;
        }
    }

    /// Starts a pod's termination as the kubelet does: SIGTERM to its
    /// server, which goes on serving until it is killed; its endpoint
    /// becomes terminating (not ready, still serving).
    pub fn terminate_pod(&mut self, name: &str) {
        if let Some(spec) = self.pod_specs.iter_mut().find(|p| p.name == name) {
            spec.terminating = true;
        }
        if let Some(server) = self.pods.get(name).and_then(|p| p._server.as_ref()) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
        }
    }

    /// Removes a pod: its server is killed (the end of its grace period)
    /// and its namespace and veth go.
    pub fn remove_pod(&mut self, name: &str) {
        self.pods.remove(name);
        self.pod_specs.retain(|p| p.name != name);
    }

    /// Writes the Services and the EndpointSlices the control plane would
    /// derive from the pods (atomically, so the agent never reads half a file).
    /// Returns how many files changed.
    pub fn write_manifests(&self) -> Result<usize> {
        let mut services = String::new();
        for s in self.services() {
            services.push_str("---\n");
            services.push_str(&serde_yaml::to_string(&s)?);
        }
        let mut slices = String::new();
        for slice in self.endpoint_slices() {
            slices.push_str("---\n");
            slices.push_str(&serde_yaml::to_string(&slice)?);
        }
        let mut files = vec![
            ("services.yaml".to_owned(), services),
            ("endpointslices.yaml".to_owned(), slices),
        ];
        files.extend(
            self.extra_manifests
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let dir = self.dir.join("manifests");
        let wanted: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let mut changed = 0;
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&name) {
                fs::remove_file(e.path())?;
                changed += 1;
            }
        }
        for (name, text) in files {
            // An unchanged file is left alone: rewriting it would trigger a
            // sync of its own, which a test could take for its change.
            if fs::read_to_string(dir.join(&name)).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            let tmp = self.dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, text)?;
            fs::rename(&tmp, dir.join(&name))?;
            changed += 1;
        }
        Ok(changed)
    }

    /// The Services of the lab's objects.
    pub fn services(&self) -> Vec<Service> {
        self.objects
            .iter()
            .filter_map(|o| match o {
                LabObject::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// The EndpointSlices the control plane would derive from the running,
    /// not excluded pods.
    pub fn endpoint_slices(&self) -> Vec<EndpointSlice> {
        let pods: Vec<LabPod> = self
            .pod_specs
            .iter()
            .filter(|p| !self.excluded.contains(&p.name) && self.pods.contains_key(&p.name))
            .cloned()
            .collect();
        workload::endpoint_slices_for_services(&self.objects, &pods)
    }

    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Starts lb-agent in the node namespace on the lab's manifests and
    /// waits for its first sync.
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_extra(&[])
    }

    /// `start_agent` with more agent flags (e.g. `--socket-lb off`).
    pub fn start_agent_extra(&mut self, extra: &[&str]) -> Result<()> {
        let dir = self.manifest_dir().to_string_lossy().into_owned();
        let mut flags = vec!["--manifests", &dir, "--node-name", NODE_NAME];
        flags.extend_from_slice(extra);
        self.start_agent_with(&flags)
    }

    /// A data path counter (`lb_common::stats::NAMES`), as `lb-agent stats`
    /// reports it from the lab's pinned maps.
    pub fn datapath_stat(&self, name: &str) -> u64 {
        let agent = sibling_binary("lb-agent", "LB_AGENT_BIN").expect("lb-agent binary");
        let pin_dir = self.pin_dir.to_string_lossy().into_owned();
        let out = self
            .node
            .exec(&[
                &agent.to_string_lossy(),
                "--pin-dir",
                &pin_dir,
                "stats",
                "--output",
                "json",
            ])
            .expect("lb-agent stats");
        let stats: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
    }

    /// Starts lb-agent with `source` flags (e.g. `--kubeconfig PATH`) and
    /// waits for its first sync.
    pub fn start_agent_with(&mut self, source: &[&str]) -> Result<()> {
        self.spawn_agent_with(source)?;
        self.wait_for_generation(1)
    }

    /// Starts lb-agent with `source` flags without waiting for a sync.
    pub fn spawn_agent_with(&mut self, source: &[&str]) -> Result<()> {
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
                let mut c = self.node.command(wrapper);
                c.args(args).arg(agent);
                c
            }
            None => self.node.command(agent),
        };
        let child = command
            .args(["--pin-dir", &self.pin_dir.to_string_lossy(), "run"])
            .args(source)
            // The socket hooks go on the lab's own cgroup, never on the
            // machine's root: only processes the lab puts there are affected.
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args([
                "--interfaces",
                "eth0",
                "--pod-interfaces",
                "lxc*",
                "--poll-interval",
                "100ms",
                "--ready-file",
            ])
            .arg(self.dir.join("ready"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.agent = Some(ChildGuard(child));
        Ok(())
    }

    /// A command that runs `program` in network namespace `ns` and in the
    /// lab's cgroup (so the agent's socket hooks apply to it). It moves
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
                        "lb-agent exited ({status}) before sync {at_least}:\n{}",
                        self.agent_log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "lb-agent did not reach sync {at_least} in 20 s:\n{}",
            self.agent_log()
        )
    }

    /// Rewrites the manifests and waits until the agent has applied them.
    pub fn apply_manifests(&mut self) -> Result<()> {
        let before = self.generation();
        let changed = self.write_manifests()?;
        if changed == 0 {
            return Ok(());
        }
        self.wait_for_generation(before + 1)?;
        if changed > 1 {
            // The agent may have read the files in two polls: give it two
            // more poll intervals (100 ms each) to pick up the rest.
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// The ClusterIP of the Service `name` in the lab's objects.
    pub fn cluster_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.objects.iter().find_map(|o| match o {
            LabObject::Service(s) if s.metadata.name.as_deref() == Some(name) => {
                s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok()
            }
            _ => None,
        })
    }

    /// Pod names of the Deployment/ReplicaSet owner (`Kind/name`).
    pub fn pods_of(&self, owner: &str) -> Vec<String> {
        self.pod_specs
            .iter()
            .filter(|p| p.owner == owner)
            .map(|p| p.name.clone())
            .collect()
    }

    /// Checksum error counters of every namespace of the lab.
    pub fn checksum_errors(&self) -> Vec<(String, u64, u64, u64)> {
        let mut all: Vec<&Netns> = vec![&self.node, &self.ext, &self.client.ns];
        all.extend(self.pods.values().map(|p| &p.ns));
        all.into_iter()
            .map(|ns| {
                let (tcp, udp, icmp) = ns.checksum_errors();
                (ns.name.clone(), tcp, udp, icmp)
            })
            .collect()
    }

    /// Panics with context if any namespace counted a checksum error.
    pub fn assert_no_checksum_errors(&self) {
        let bad: Vec<_> = self
            .checksum_errors()
            .into_iter()
            .filter(|(_, t, u, i)| *t + *u + *i > 0)
            .collect();
        assert!(
            bad.is_empty(),
            "checksum errors (namespace, TcpInCsumErrors, UdpInCsumErrors, IcmpInCsumErrors): {bad:?}"
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agent();
        if std::thread::panicking() {
            eprintln!(
                "---- lb-agent log of lab {} ----\n{}",
                self.id,
                self.agent_log()
            );
        }
        let _ = lb_userspace::loader::cleanup(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.dir);
        // The cgroup goes once its processes are gone (bounded wait).
        for _ in 0..50 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            if let Ok(procs) = fs::read_to_string(self.cgroup.join("cgroup.procs")) {
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
        // Detach where it was attached: an interface index means nothing
        // in the host's own namespace.
        if let Some(xdp) = self.ext_xdp.take() {
            self.ext.run_in(move || drop(xdp));
        }
        // Pods, client, ext and node namespaces go with their fields.
    }
}

/// Sends one line over a new TCP connection and returns the answer line.
pub fn tcp_ask(to: SocketAddrV4, msg: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    ask_on(&mut s, msg)
}

/// Sends one line on an open connection and reads one answer line.
pub fn ask_on(s: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    s.write_all(format!("{msg}\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before answering",
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
        if answer.len() > 512 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Sends one UDP datagram and returns the answer, with its source address.
pub fn udp_ask(
    to: SocketAddrV4,
    msg: &str,
    timeout: Duration,
) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub fn http_get(to: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not HTTP"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Sum of a metric's samples (Prometheus text) whose line starts with
/// `name` and contains every one of `parts`.
pub fn metric_sum(metrics: &str, name: &str, parts: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
