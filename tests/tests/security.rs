//! Security of a running agent, each claim against the real agent in the
//! lab: its pinned maps and links, its folder and files are closed to an
//! unprivileged user; its HTTP ports only report; the DaemonSet's
//! capabilities are enough and each is needed; and packets dropped by
//! `loadBalancerSourceRanges` are counted exactly.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_lab::{
    bpf_access,
    capabilities::{
        capability_bit, daemon_set_capabilities, effective_capabilities, like_a_container_with,
    },
    on_each_wire, privileged_test, sibling_binary, tcp_ask, Lab, Wire, EXT_CLIENT_ADDR, NODE_NAME,
    NODE_WIRE_ADDR,
};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(2);
const METRICS_PORT: u16 = 10249;
/// kube-proxy's `/healthz` and `/livez` (`--healthz-addr`).
const PROXY_HEALTH_PORT: u16 = 10256;
const HEALTH_CHECK_PORT: u16 = 32100;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const NODE_PORT: u16 = 30080;
/// nobody:nogroup, the user an intruder on the node would be at best.
const UNPRIVILEGED: u32 = 65534;

/// A lab with the nginx example's three pods (TCP and UDP on port 80) and a
/// route from the external client to the LoadBalancer address.
fn lab() -> Lab {
    lab_on(Wire::Software)
}

fn lab_on(wire: Wire) -> Lab {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let lab = Lab::from_manifest_files_on(wire, &[example]).expect("build the lab");
    assert_eq!(lab.pods.len(), 3, "the nginx example has three replicas");
    lab.ext
        .exec(&[
            "ip",
            "route",
            "add",
            &format!("{LB_IP}/32"),
            "via",
            &NODE_WIRE_ADDR.to_string(),
        ])
        .expect("route to the LoadBalancer address");
    lab
}

/// Writes LoadBalancer Service `name` on LB_IP (spec fields from `extra`)
/// with every lab pod as a ready local endpoint, for 80/TCP and 80/UDP.
fn write_load_balancer(lab: &mut Lab, name: &str, extra: Value) {
    let mut spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40",
        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": NODE_PORT},
                  {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": NODE_PORT}]});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let endpoints: Vec<Value> = lab
        .pods
        .values()
        .map(|p| {
            json!({"addresses": [p.ip.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": NODE_NAME})
        })
        .collect();
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    lab.put_extra_service(name, spec, status, endpoints);
    lab.write_manifests().expect("write the manifests");
}

/// The lab with the agent serving metrics on METRICS_PORT and a
/// healthCheckNodePort (a Local LoadBalancer Service) on HEALTH_CHECK_PORT.
fn lab_with_agent_ports() -> Lab {
    let mut lab = lab();
    write_load_balancer(
        &mut lab,
        "local-lb",
        json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": HEALTH_CHECK_PORT}),
    );
    lab.agent()
        .flags(&["--metrics-addr", &format!("0.0.0.0:{METRICS_PORT}")])
        .start()
        .expect("start lb-agent");
    lab
}

/// An HTTP/1.1 request with `method` (and a small body for methods that
/// carry one), from the node namespace to its loopback. Returns the status,
/// the head and the body.
fn http(lab: &Lab, port: u16, method: &str, path: &str) -> (u16, String, String) {
    // Health check ports listen on the NodePort addresses, as kube-proxy's.
    let ip = if port == HEALTH_CHECK_PORT {
        NODE_WIRE_ADDR
    } else {
        Ipv4Addr::LOCALHOST
    };
    let to = SocketAddr::from((ip, port));
    lab.node.run_in(|| {
        let mut s = TcpStream::connect_timeout(&to, TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {to} for {method} {path}: {e}"));
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        // A 16 KiB body (more than one read of the request head): the
        // server leaves it unread, and must still answer and close, not
        // reset the connection.
        let body = if ["GET", "HEAD"].contains(&method) {
            String::new()
        } else {
            format!("ready=false&pad={}", "x".repeat(16 * 1024))
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path} on {to}: {e}"));
        let mut text = String::new();
        s.read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{method} {path} on {to}: {e}"));
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{method} {path} on {to}: no HTTP answer: {text:?}"));
        let code = head
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path} on {to}: bad status line: {head:?}"));
        (code, head.to_owned(), body.to_owned())
    })
}

/// Everything under the pin dir: (map pins, link pins, folders).
fn pins(pin_dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
    let (mut maps, mut links, mut dirs) = (Vec::new(), Vec::new(), vec![pin_dir.to_owned()]);
    let mut i = 0;
    while i < dirs.len() {
        let dir = dirs[i].clone();
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if dir == pin_dir {
                maps.push(path);
            } else {
                links.push(path);
            }
        }
        i += 1;
    }
    (maps, links, dirs)
}

/// An array map pinned in the agent's pin dir, that the root control may
/// write and unlink without touching the agent's own pins. Unpinned on drop.
struct DecoyPin(PathBuf);

impl DecoyPin {
    fn plant(pin_dir: &Path) -> Self {
        let path = pin_dir.join("zz_security_test_decoy");
        let map = bpf_access::create_array(1).expect("create the decoy map");
        bpf_access::obj_pin(&map, &path).expect("pin the decoy map");
        Self(path)
    }
}

impl Drop for DecoyPin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What `access-probe` reported: the identity line, if any, and each
/// attempt with `None` for success or the errno.
struct ProbeReport {
    identity: Option<String>,
    outcomes: Vec<(String, Option<i32>)>,
}

fn probe(as_user: Option<u32>, attempts: &[String]) -> ProbeReport {
    // A binary of the lab crate: built by `cargo build --bins`, as the
    // agent and lab-server are.
    let bin = sibling_binary("access-probe", "ACCESS_PROBE_BIN").expect("access-probe binary");
    let mut cmd = Command::new(bin);
    if let Some(uid) = as_user {
        cmd.args(["--as", &uid.to_string()]);
    }
    let out = cmd.args(attempts).output().expect("run access-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "access-probe failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut report = ProbeReport {
        identity: None,
        outcomes: Vec::new(),
    };
    for line in stdout.lines() {
        if let Some(id) = line.strip_prefix("identity ") {
            report.identity = Some(id.to_owned());
            continue;
        }
        let (attempt, outcome) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("access-probe line {line:?}"));
        let errno = outcome.strip_prefix("errno ").map(|e| {
            e.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("access-probe outcome {outcome:?}"))
        });
        report.outcomes.push((attempt.to_owned(), errno));
    }
    assert_eq!(
        report.outcomes.len(),
        attempts.len(),
        "one outcome per attempt: {stdout}"
    );
    report
}

fn attempts<'a>(kinds: &[&str], paths: impl IntoIterator<Item = &'a PathBuf>) -> Vec<String> {
    paths
        .into_iter()
        .flat_map(|p| kinds.iter().map(move |k| format!("{k}:{}", p.display())))
        .collect()
}

/// The socket inodes among a process's open files, and the other files it
/// holds open (paths).
fn open_files(pid: u32) -> (BTreeSet<u64>, Vec<PathBuf>) {
    let (mut sockets, mut files) = (BTreeSet::new(), Vec::new());
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&fd_dir).unwrap_or_else(|e| panic!("{fd_dir}: {e}")) {
        let Ok(target) = fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            sockets.insert(inode.parse().unwrap());
        } else if target.starts_with('/') {
            files.push(PathBuf::from(target));
        }
    }
    (sockets, files)
}

/// Local ports of the listening TCP sockets among `inodes`, from the
/// process's view of its network namespace.
fn listening_tcp_ports(pid: u32, inodes: &BTreeSet<u64>) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for row in text.lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; st 0A is LISTEN; inode is field 9.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(&f[9].parse().unwrap_or(0)) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// Paths of the filesystem-bound unix sockets among `inodes`.
fn unix_socket_paths(pid: u32, inodes: &BTreeSet<u64>) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|row| {
            let f: Vec<&str> = row.split_whitespace().collect();
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = f.get(7)?;
            (inodes.contains(&inode) && path.starts_with('/')).then(|| path.to_string())
        })
        .collect()
}

#[privileged_test]
fn pins_folders_files_and_sockets_of_the_agent_are_closed_to_unprivileged_users() {
    let lab = lab_with_agent_ports();
    let (maps, links, dirs) = pins(&lab.pin_dir);
    assert!(
        maps.len() >= lb_common::map_spec::ALL.len(),
        "every map is pinned: {maps:?}"
    );
    assert!(!links.is_empty(), "program links are pinned under {dirs:?}");
    let pin_dir_mode = fs::metadata(&lab.pin_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(pin_dir_mode, 0o700, "{} is private", lab.pin_dir.display());
    let ready_file = lab.dir.join("ready");
    let decoy = DecoyPin::plant(&lab.pin_dir);
    let all_pins: Vec<PathBuf> = maps
        .iter()
        .chain(&links)
        .cloned()
        .chain([decoy.0.clone()])
        .collect();
    let new_entries: Vec<PathBuf> = dirs.iter().map(|d| d.join("intruder")).collect();

    // The intruder: every way in, on every pin and folder.
    let mut intrusions = attempts(&["obj-get", "obj-get-ro", "unlink"], &all_pins);
    intrusions.extend(attempts(&["map-rewrite"], &maps));
    intrusions.extend(attempts(&["mkdir", "symlink"], &new_entries));
    intrusions.extend(attempts(&["list"], &dirs));
    intrusions.extend(attempts(&["open-write"], [&ready_file]));
    let report = probe(Some(UNPRIVILEGED), &intrusions);
    let identity = report.identity.expect("the probe says who it is");
    for want in [
        "Uid=65534,65534,65534,65534",
        "Gid=65534,65534,65534,65534",
        "CapInh=0000000000000000",
        "CapPrm=0000000000000000",
        "CapEff=0000000000000000",
        "CapAmb=0000000000000000",
    ] {
        assert!(
            identity.contains(want),
            "the probe must run unprivileged ({want}): {identity}"
        );
    }
    let let_in: Vec<_> = report
        .outcomes
        .iter()
        .filter(|(_, errno)| !matches!(errno, Some(libc::EACCES | libc::EPERM)))
        .collect();
    assert!(
        let_in.is_empty(),
        "uid {UNPRIVILEGED} must get EACCES or EPERM on every attempt, got (None = it worked): {let_in:?}"
    );
    assert_eq!(
        pins(&lab.pin_dir).0.len(),
        maps.len() + 1,
        "no pin went away"
    );

    // The control: root makes the same attempts work (on the decoy where
    // they would change something), so the denials above are the kernel's
    // permission checks, not wrong paths.
    // Links open read-write only (the kernel refuses BPF_F_RDONLY on them).
    let mut controls = attempts(&["obj-get-ro"], &maps);
    controls.extend(attempts(&["obj-get"], &links));
    controls.extend(attempts(&["obj-get", "map-rewrite"], [&decoy.0]));
    controls.extend(attempts(&["mkdir", "symlink"], &new_entries));
    controls.extend(attempts(&["list"], &dirs));
    controls.extend(attempts(&["open-write"], [&ready_file]));
    controls.extend(attempts(&["unlink"], [&decoy.0]));
    let control = probe(None, &controls);
    let failed: Vec<_> = control
        .outcomes
        .iter()
        .filter(|(_, errno)| errno.is_some())
        .collect();
    assert!(
        failed.is_empty(),
        "root's control attempts must work: {failed:?}"
    );
    let eperm = report
        .outcomes
        .iter()
        .filter(|(_, e)| *e == Some(libc::EPERM))
        .count();
    eprintln!(
        "{} pins ({} maps, {} links, 1 decoy), {} folders: {} attempts as uid {UNPRIVILEGED}, all denied ({eperm} EPERM, {} EACCES); {} root control attempts, all worked",
        all_pins.len(),
        maps.len(),
        links.len(),
        dirs.len(),
        report.outcomes.len(),
        report.outcomes.len() - eperm,
        control.outcomes.len()
    );

    // Sockets and files: the agent listens only where it reports, binds no
    // unix socket in the filesystem, and no file it holds or wrote is
    // writable by others.
    let pid = lab.agent_pid().expect("the agent runs");
    let (sockets, files) = open_files(pid);
    assert_eq!(
        listening_tcp_ports(pid, &sockets),
        BTreeSet::from([METRICS_PORT, HEALTH_CHECK_PORT, PROXY_HEALTH_PORT]),
        "the agent's listening TCP sockets"
    );
    assert_eq!(
        unix_socket_paths(pid, &sockets),
        Vec::<String>::new(),
        "unix sockets the agent bound in the filesystem"
    );
    let ready = fs::metadata(&ready_file).expect("the ready file");
    assert_eq!(
        (ready.uid(), ready.mode() & 0o022),
        (0, 0),
        "the ready file is root's and not writable by group or others"
    );
    for file in files.iter().filter(|f| !f.starts_with("/dev")) {
        let Ok(meta) = fs::metadata(file) else {
            continue;
        };
        assert_eq!(
            meta.mode() & 0o002,
            0,
            "{} (open in the agent) is writable by others",
            file.display()
        );
    }
}

/// What a write attempt could change: the metrics, readiness, the health
/// check's answer, the programmed Services and the sync generation.
fn observable_state(lab: &Lab) -> BTreeMap<&'static str, String> {
    let agent = lb_lab::sibling_binary("lb-agent", "LB_AGENT_BIN").unwrap();
    let services = lab
        .node
        .exec(&[
            &agent.to_string_lossy(),
            "--pin-dir",
            &lab.pin_dir.to_string_lossy(),
            "services",
        ])
        .expect("lb-agent services");
    let readyz = http(lab, METRICS_PORT, "GET", "/readyz");
    let health = http(lab, HEALTH_CHECK_PORT, "GET", "/");
    BTreeMap::from([
        ("metrics", http(lab, METRICS_PORT, "GET", "/metrics").2),
        ("readyz", format!("{} {}", readyz.0, readyz.2)),
        ("health check", format!("{} {}", health.0, health.2)),
        ("services", services),
        ("generation", lab.generation().to_string()),
    ])
}

#[privileged_test]
fn metrics_and_health_ports_answer_only_reads_and_writes_change_nothing() {
    let lab = lab_with_agent_ports();
    let before = observable_state(&lab);
    assert!(before["readyz"].starts_with("200"), "{before:?}");
    assert!(
        before["health check"].starts_with("200")
            && before["health check"].contains("\"localEndpoints\":3"),
        "{before:?}"
    );

    let writes = ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"];
    let mut refused = 0;
    for (port, paths) in [
        (
            METRICS_PORT,
            &["/metrics", "/readyz", "/healthz", "/", "/debug/pprof"][..],
        ),
        (HEALTH_CHECK_PORT, &["/", "/healthz"][..]),
        (PROXY_HEALTH_PORT, &["/healthz", "/livez"][..]),
    ] {
        for method in writes {
            for path in paths {
                let (code, head, _) = http(&lab, port, method, path);
                assert_eq!(code, 405, "{method} {path} on port {port}: {head}");
                assert!(
                    head.contains("Allow: GET, HEAD"),
                    "{method} {path} on port {port}: {head}"
                );
                refused += 1;
            }
        }
    }
    let unknown = ["/admin", "/debug/pprof/", "/quitquitquit", "/metrics/reset"];
    for path in unknown {
        assert_eq!(http(&lab, METRICS_PORT, "GET", path).0, 404, "GET {path}");
    }
    let (code, head, body) = http(&lab, METRICS_PORT, "HEAD", "/metrics");
    assert_eq!((code, body.as_str()), (200, ""), "HEAD /metrics: {head}");
    let (code, _, body) = http(&lab, HEALTH_CHECK_PORT, "HEAD", "/");
    assert_eq!((code, body.as_str()), (200, ""), "HEAD on the health check");

    let after = observable_state(&lab);
    assert_eq!(
        before, after,
        "refused writes changed what the agent reports"
    );
    eprintln!(
        "{refused} write requests refused with 405, {} unknown paths 404, state unchanged",
        unknown.len()
    );
}

#[privileged_test]
fn daemon_set_capabilities_are_enough_and_each_one_is_needed() {
    let caps = daemon_set_capabilities();
    let mut lab = lab();
    let cluster_ip = lab.cluster_ip("my-nginx").expect("the example's ClusterIP");
    let to = SocketAddrV4::new(cluster_ip, 80);

    lab.agent_wrapper = like_a_container_with(&caps);
    lab.agent()
        .start()
        .unwrap_or_else(|e| panic!("the agent with only {caps:?}: {e}"));
    let pid = lab.agent_pid().unwrap();
    let want: u64 = caps.iter().map(|c| 1u64 << capability_bit(c)).sum();
    assert_eq!(
        effective_capabilities(pid),
        want,
        "the agent runs with exactly {caps:?}"
    );
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        mounts.lines().any(|m| {
            let f: Vec<&str> = m.split_whitespace().collect();
            f.get(4) == Some(&"/proc/sys")
                && f.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro"))
        }),
        "the agent sees /proc/sys read-only, as in a container"
    );
    let answering_pods = |lab: &Lab| -> BTreeSet<String> {
        lab.client.ns.run_in(|| {
            (0..30)
                .map(|i| {
                    let answer = tcp_ask(to, "whoami", TIMEOUT)
                        .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
                    answer
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect()
        })
    };
    let all_pods: BTreeSet<String> = lab.pods.keys().cloned().collect();
    assert_eq!(answering_pods(&lab), all_pods, "30 connections to {to}");
    // A restart adopts the pinned maps and links, which takes other calls
    // (opening pins, replacing a link's program) than a first start.
    lab.stop_agent();
    lab.agent()
        .start()
        .unwrap_or_else(|e| panic!("the agent restarted with only {caps:?}: {e}"));
    assert_eq!(
        answering_pods(&lab),
        all_pods,
        "30 connections after a restart"
    );
    assert!(
        lab.agent_log().contains("adopted pinned maps")
            && lab.agent_log().contains("wire hook on eth0: tc (Replaced)"),
        "the restarted agent adopted the pins:\n{}",
        lab.agent_log()
    );
    lab.stop_agent();
    lb_userspace::datapath::loader::cleanup(&lab.pin_dir).expect("remove the pins");

    for missing in &caps {
        let rest: Vec<&String> = caps.iter().filter(|c| *c != missing).collect();
        lab.agent_wrapper = like_a_container_with(&rest);
        let log_before = lab.agent_log().len();
        let outcome = lab.agent().start();
        let log = lab.agent_log()[log_before..].to_owned();
        lab.stop_agent();
        let _ = lb_userspace::datapath::loader::cleanup(&lab.pin_dir);
        let error = outcome.err().unwrap_or_else(|| {
            panic!("the agent works without {missing}: remove it from the DaemonSet\n{log}")
        });
        let failure = log.split_once("Error:").map_or_else(
            || panic!("no error reported without {missing}: {error}\n{log}"),
            |(_, f)| f,
        );
        let reason = failure.lines().next().unwrap_or_default().trim();
        assert!(
            reason.contains(&format!("CAP_{missing}")),
            "without {missing} the error must name it: {reason}"
        );
        let cause = failure
            .lines()
            .find(|l| l.contains("os error"))
            .unwrap_or_default()
            .trim();
        eprintln!("without {missing}: {reason} ({cause})");
    }
}

on_each_wire!(source_range_drops_are_counted_exactly_and_allowed_sources_are_not);

fn source_range_drops_are_counted_exactly_and_allowed_sources_are_not(wire: Wire) {
    const REQUESTS: u64 = 40;
    // Outside the allowed range, on the external client next to its own.
    const DISALLOWED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
    let mut lab = lab_on(wire);
    lab.ext
        .exec(&[
            "ip",
            "addr",
            "add",
            &format!("{DISALLOWED}/32"),
            "dev",
            "eth0",
        ])
        .expect("a second client address");
    write_load_balancer(
        &mut lab,
        "ranged-lb",
        json!({"loadBalancerSourceRanges": [format!("{EXT_CLIENT_ADDR}/32")]}),
    );
    lab.agent()
        .flags(&["--metrics-addr", &format!("0.0.0.0:{METRICS_PORT}")])
        .start()
        .expect("start lb-agent");
    let to = SocketAddrV4::new(LB_IP, 80);
    let dropped = |lab: &Lab| lab.datapath_stat("source_range_dropped");
    let start = dropped(&lab);

    // UDP, so one request is one packet: no retransmission blurs the count.
    let answered = lab.ext.run_in(|| {
        let s = UdpSocket::bind((DISALLOWED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for _ in 0..REQUESTS {
            s.send_to(b"whoami", to).unwrap();
        }
        let mut buf = [0u8; 256];
        s.recv_from(&mut buf).is_ok()
    });
    assert!(
        !answered,
        "{DISALLOWED} is outside the ranges but got an answer"
    );
    assert_eq!(
        dropped(&lab) - start,
        REQUESTS,
        "each of {REQUESTS} datagrams from {DISALLOWED} is one drop"
    );

    let answers = lab.ext.run_in(|| {
        let s = UdpSocket::bind((EXT_CLIENT_ADDR, 0)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        (0..REQUESTS)
            .filter(|_| {
                s.send_to(b"whoami", to).unwrap();
                let mut buf = [0u8; 256];
                s.recv_from(&mut buf).is_ok()
            })
            .count() as u64
    });
    assert_eq!(
        answers, REQUESTS,
        "{EXT_CLIENT_ADDR} is allowed: every request answered"
    );
    let total = dropped(&lab);
    assert_eq!(
        total - start,
        REQUESTS,
        "allowed requests are not counted as drops"
    );

    let (_, _, metrics) = http(&lab, METRICS_PORT, "GET", "/metrics");
    let line = format!(
        "lb_datapath_packets_total{{counter=\"source_range_dropped\",family=\"ipv4\"}} {total}"
    );
    assert!(
        metrics.lines().any(|l| l == line),
        "/metrics shows `{line}`:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("source_range"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{REQUESTS} requests from {DISALLOWED}: {REQUESTS} drops counted; {REQUESTS} from {EXT_CLIENT_ADDR}: answered, 0 counted"
    );
}
