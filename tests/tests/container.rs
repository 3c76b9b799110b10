//! The agent's image (`cargo xtask image`) run the way the DaemonSet runs
//! it, with podman: command, arguments, environment, capabilities, seccomp
//! profile, no privilege escalation and read-only root from
//! deploy/lb-agent.yaml, in a lab node's network namespace, with the lab's
//! bpffs folder and cgroup in place of the host's, the service account's
//! files and the variables a kubelet gives, against the API server fixture.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_lab::{
    container::{
        command_of, container_of, daemon_set_pod, image_size, image_under_test, repo_path,
        run_options, run_to_end, security_options, ClusterFacts, Container, IMAGE_ENV,
    },
    http_get,
    kube_lab::example,
    load::{Load, LoadKind, LoadSet},
    privileged_test, tcp_ask, Lab, Source, Wire,
};
use serde_json::Value;

const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 80);
const NODE_PORT: u16 = 30081;

/// The image to test, or None after saying why the test skips (a failure
/// under CI=true).
fn image_or_skip(test: &str) -> Option<String> {
    let image = image_under_test();
    if image.is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{test}: {IMAGE_ENV} is not set (`cargo xtask test` builds the image)"
        );
        eprintln!(
            "SKIPPED {test}: no image; `cargo xtask image --debug --tag T` builds one, \
             then set {IMAGE_ENV}=T (`cargo xtask test` does both)"
        );
    }
    image
}

/// The lab's stand-ins for what the cluster gives the DaemonSet's pod.
struct PodHost {
    facts: ClusterFacts,
    /// Stands for the host's /sys/fs/bpf (a folder of the lab's own).
    bpffs: PathBuf,
    seccomp_dir: PathBuf,
}

impl PodHost {
    fn new(lab: &Lab) -> Self {
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/{}-host", lab.id));
        fs::create_dir_all(&bpffs).unwrap();
        let seccomp_dir = lab.dir.join("kubelet-seccomp");
        fs::create_dir_all(&seccomp_dir).unwrap();
        let account = lab.dir.join("serviceaccount");
        fs::create_dir_all(&account).unwrap();
        for (file, content) in [("token", "lab-token"), ("namespace", "kube-system")] {
            fs::write(account.join(file), content).unwrap();
        }
        write_cluster_ca(&account.join("ca.crt"));
        let api = lab.api.as_ref().expect("the API source");
        let facts = ClusterFacts {
            node_name: lab.node_name.clone(),
            config_maps: BTreeMap::from([(
                "lb-agent-api-server/api-server".into(),
                format!("http://{}", api.server.addr()),
            )]),
            host_paths: BTreeMap::from([
                ("/sys/fs/bpf".into(), bpffs.clone()),
                ("/sys/fs/cgroup".into(), lab.cgroup.clone()),
                ("/var/lib/kubelet/seccomp".into(), seccomp_dir.clone()),
            ]),
            service_account_dir: Some(account),
            // As the kubelet sets them for the `kubernetes` Service.
            kubelet_env: [
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
                ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec(),
        };
        Self {
            facts,
            bpffs,
            seccomp_dir,
        }
    }

    /// `podman run` options and arguments for the DaemonSet's container
    /// `name`, in the lab node's network namespace (hostNetwork).
    fn container(&self, lab: &Lab, name: &str) -> (Vec<String>, Vec<String>) {
        let pod = daemon_set_pod();
        let spec = container_of(&pod, name);
        let mut options = run_options(&pod, spec, &self.facts);
        assert_eq!(
            pod["hostNetwork"], true,
            "the agent runs in the node's namespace"
        );
        options.push(format!("--network=ns:{}", lab.netns.path().display()));
        let (command, args) = command_of(spec);
        options.push(format!("--entrypoint={command}"));
        (options, args)
    }
}

/// A throwaway CA certificate: the in-cluster config insists on one (the
/// fixture speaks plain HTTP, so it is never used).
fn write_cluster_ca(path: &std::path::Path) {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=lab-cluster-ca",
            "-days",
            "1",
        ])
        .arg("-out")
        .arg(path)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {out:?}");
}

impl Drop for PodHost {
    fn drop(&mut self) {
        remove_bpffs_dir(&self.bpffs);
    }
}

/// A folder of the host's bpffs given to a container as its own; removed
/// with what the agent pinned in it, also when the test fails.
struct BpffsDir(PathBuf);

impl BpffsDir {
    fn create(name: &str) -> Self {
        let dir = PathBuf::from("/sys/fs/bpf").join(name);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        remove_bpffs_dir(&self.0);
    }
}

fn remove_bpffs_dir(dir: &Path) {
    let _ = lb_userspace::datapath::loader::cleanup(&dir.join("lb-agent"));
    let _ = fs::remove_dir_all(dir);
}

/// Waits until GET `path` on the node's `port` answers `want`; how long
/// that took.
fn wait_http(lab: &Lab, port: u16, path: &str, want: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        let got = lab
            .node
            .run_in(|| http_get(addr, path, Duration::from_secs(1)));
        if matches!(got, Ok((code, _)) if code == want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{path} on {port} did not answer {want} within {within:?}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn loads(lab: &Lab) -> LoadSet {
    let node_port = SocketAddrV4::new(lb_lab::NODE_WIRE_ADDR, NODE_PORT);
    let mut clients = LoadSet::default();
    for (ns, to, what) in [
        (lab.client.ns.path(), CLUSTER_IP, "ClusterIP from a pod"),
        (lab.ext.path(), node_port, "NodePort from outside"),
    ] {
        for (kind, how, every) in [
            (LoadKind::NewConnections, "new connections", 5),
            (LoadKind::LongLived, "long-lived connection", 10),
        ] {
            clients.add(Load::start(
                ns.clone(),
                to,
                kind,
                &format!("{what}, {how}"),
                Duration::from_millis(every),
                20_000,
            ));
        }
    }
    clients
}

/// The image as the DaemonSet runs it: its init container installs the
/// seccomp profile, the agent starts under that profile and serves the
/// lab; a container restart under load fails nothing (the pins are
/// adopted); `lb-agent cleanup` from the image removes every pin.
#[privileged_test]
fn the_image_runs_as_the_daemon_set_serves_survives_a_restart_and_cleans_up() {
    let test = "the image as the DaemonSet runs it";
    let Some(image) = image_or_skip(test) else {
        return;
    };
    let mut lab = Lab::from_manifest_files_with(
        Source::Api,
        Wire::Software,
        &[example("rolling-update.yaml")],
    )
    .expect("build the lab");
    let host = PodHost::new(&lab);
    println!(
        "image {image}: {:.1} MB",
        image_size(&image).unwrap() as f64 / 1e6
    );

    let (options, args) = host.container(&lab, "install-seccomp-profile");
    let out = run_to_end(&options, &image, &args).unwrap();
    assert!(out.status.success(), "init container: {out:?}");
    assert_eq!(
        fs::read_to_string(host.seccomp_dir.join("lb-agent.json")).unwrap(),
        fs::read_to_string(repo_path("deploy/seccomp/lb-agent.json")).unwrap(),
        "the init container installs the shipped profile"
    );

    let (options, mut args) = host.container(&lab, "lb-agent");
    // The lab node has no default route: name its wire, as an admin would.
    args.push("--interfaces=eth0".into());
    let started = Instant::now();
    let agent = Container::start(&format!("{}-agent", lab.id), &options, &image, &args).unwrap();
    let ready = wait_http(&lab, 10249, "/readyz", 200, Duration::from_mins(1));
    println!(
        "container start to /readyz 200 (first sync): {} ms",
        (started.elapsed().max(ready)).as_millis()
    );
    lab.node.pin_dir = host.bpffs.join("lb-agent");
    assert_eq!(agent.state(), "running");

    let all: BTreeSet<String> = lab.pods.keys().cloned().collect();
    let mut answered = BTreeSet::new();
    for _ in 0..40 {
        let answer = lab
            .client
            .ns
            .run_in(|| tcp_ask(CLUSTER_IP, "who", Duration::from_secs(2)))
            .expect("the ClusterIP answers");
        answered.insert(answer);
    }
    assert_eq!(answered, all, "every pod answers through the ClusterIP");

    let clients = loads(&lab);
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    agent.restart().unwrap();
    let ready = wait_http(&lab, 10249, "/readyz", 200, Duration::from_mins(1));
    println!(
        "container restart to /readyz 200: {} ms",
        (restarted.elapsed().max(ready)).as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    for report in clients.finish_and_assert_none_failed() {
        if report.what.contains("long-lived") {
            assert_eq!(report.connections, 1, "{report}: the connection survived");
        }
    }
    let logs = agent.logs();
    let first_sync_after_restart = logs
        .lines()
        .filter(|l| l.contains("sync 1 ("))
        .nth(1)
        .unwrap_or_else(|| panic!("the restarted agent synced:\n{logs}"));
    println!("after the restart: {first_sync_after_restart}");
    assert!(
        first_sync_after_restart.contains(" 0 map writes"),
        "the restarted agent adopted the pinned maps, writing nothing: {first_sync_after_restart}"
    );
    lab.assert_no_checksum_errors();

    // The other commands, from the image under the same profile, as an
    // admin runs them (`podman run IMAGE services`).
    let (mut options, _) = host.container(&lab, "lb-agent");
    options.retain(|o| !o.starts_with("--env=") && !o.starts_with("--entrypoint="));
    let command = |args: &[&str]| {
        let mut all = vec!["--pin-dir=/sys/fs/bpf/lb-agent".to_string()];
        all.extend(args.iter().map(std::string::ToString::to_string));
        run_to_end(&options, &image, &all).unwrap()
    };
    for (args, expect) in [
        (&["services"][..], CLUSTER_IP.to_string()),
        (&["stats"][..], "rewrite_failed".to_string()),
        (&["status"][..], "eth0".to_string()),
    ] {
        let out = command(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&expect),
            "{args:?}: {out:?}"
        );
    }

    drop(agent);
    let out = command(&["cleanup"]);
    assert!(out.status.success(), "cleanup from the image: {out:?}");
    let left: Vec<_> = fs::read_dir(host.bpffs.join("lb-agent"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let in_links: Vec<_> = fs::read_dir(host.bpffs.join("lb-agent/links"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "pins left after cleanup: {left:?} {in_links:?}; cleanup said {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = lab
        .client
        .ns
        .run_in(|| tcp_ask(CLUSTER_IP, "who", Duration::from_secs(1)));
    assert!(
        after.is_err(),
        "nothing translates the ClusterIP any more: {after:?}"
    );
}

/// The runtime's default seccomp profile refuses the agent (bpf(2) needs
/// SYS_ADMIN there), which is why the DaemonSet ships its own; that one
/// allows nothing the default refuses but `bpf`.
#[privileged_test]
fn the_runtime_default_profile_refuses_the_agent_and_the_shipped_one_adds_only_bpf() {
    let test = "seccomp profiles";
    let Some(image) = image_or_skip(test) else {
        return;
    };
    let pod = daemon_set_pod();
    let agent = container_of(&pod, "lb-agent");
    let mut options: Vec<String> = security_options(&agent["securityContext"])
        .into_iter()
        .filter(|o| !o.starts_with("--security-opt=seccomp="))
        .collect();
    let bpffs = BpffsDir::create(&format!("lbt-{}-seccomp", std::process::id()));
    options.extend([
        "--network=none".into(),
        format!("--volume={}:/sys/fs/bpf", bpffs.0.display()),
    ]);
    let args: Vec<String> = ["run", "--manifests=/", "--interfaces=lo", "--socket-lb=off"]
        .map(String::from)
        .to_vec();
    let out = run_to_end(&options, &image, &args).unwrap();
    drop(bpffs);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent ran under the default profile: {log}"
    );
    assert!(
        log.contains("failed to create map") && log.contains("Operation not permitted"),
        "refused at its first map: {log}"
    );

    let shipped = allowed_syscalls(&repo_path("deploy/seccomp/lb-agent.json"));
    let default = allowed_syscalls(&PathBuf::from("/usr/share/containers/seccomp.json"));
    let beyond: Vec<&String> = shipped.difference(&default).collect();
    assert_eq!(
        beyond,
        ["bpf"],
        "what the shipped profile adds to podman's default"
    );
}

/// Every system call a rule of a seccomp profile allows to a container
/// without SYS_ADMIN (rules that need a capability left out; arguments
/// not looked at).
fn allowed_syscalls(path: &PathBuf) -> BTreeSet<String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let profile: Value = serde_json::from_str(&text).unwrap();
    profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|rule| rule["action"] == "SCMP_ACT_ALLOW")
        .filter(|rule| {
            rule["includes"]["caps"]
                .as_array()
                .is_none_or(std::vec::Vec::is_empty)
        })
        .flat_map(|rule| rule["names"].as_array().unwrap())
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}
