//! Traffic through the lab, from a client pod to a ClusterIP, with N
//! Services programmed: connection setup rate and request/response latency
//! for the agent (socket LB on and off), kube-proxy's iptables mode (the
//! probed Service last in KUBE-SERVICES, its worst case, and one in the
//! middle) and its nftables mode; plus the agent's memory at each N.
//!
//! The lab is the nginx example's Deployment (3 pods) without its Service:
//! the probed Services point at those pods and every mode gets the same
//! Service set. iptables and nftables rules go into the lab's node
//! namespace while no agent runs there, and are flushed after.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    filler_services, k8s_objects,
    kube_proxy::{self, Family, RuleFamily, FAMILIES},
    median, progress, rule_tools, thousands,
};
use lb_kube_fixtures::workload::{self, LabObject};
use lb_lab::{sibling_binary, Lab, NODE_NAME};

/// Where a probed Service stands.
pub const PROBE_LAST: &str = "probe-last";
pub const PROBE_MIDDLE: &str = "probe-middle";

/// One client run's numbers (or their medians over runs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientNumbers {
    pub conns_per_s: f64,
    pub(crate) rr_per_s: f64,
    pub(crate) rr_p50_us: f64,
    pub(crate) rr_p99_us: f64,
    /// The machine's kernel CPU time (system, irq, softirq) per new
    /// connection and per request, in microseconds.
    pub(crate) kernel_us_per_conn: f64,
    pub(crate) kernel_us_per_rr: f64,
    /// The lowest and highest `kernel_us_per_conn` over the runs.
    pub(crate) kernel_us_per_conn_range: (f64, f64),
}

/// Connections the client keeps in flight in the connection phase: more
/// than the two cores, so the data path works at the rate a busy node sees.
const IN_FLIGHT: &str = "4";

/// The modes, in the order they run and are reported.
pub(crate) const MODES: &[&str] = &[
    "ours, socket LB",
    "ours, per packet (tc)",
    "iptables, probed last",
    "iptables, probed middle",
    "nftables",
];

#[derive(Clone, Debug, Default)]
pub struct TrafficRow {
    pub services: usize,
    /// Medians over rounds, per mode (index into MODES); None: not run.
    pub modes: Vec<Option<ClientNumbers>>,
    pub(crate) agent_start_to_sync: Duration,
    pub(crate) agent_rss_kib: u64,
    pub(crate) agent_peak_rss_kib: u64,
    pub map_memlock_kib: u64,
    /// Modes that could not be measured, and why (a rule install that
    /// failed).
    pub(crate) not_measured: Vec<String>,
}

/// A probed Service's ClusterIP: 10.96.1.k, or its mirror fd00:96::1:k
/// (the lab's IPv6 Service addresses mirror the IPv4 ones so).
fn probe_ip(family: Family, k: u8) -> IpAddr {
    match family {
        Family::Ipv4 => Ipv4Addr::new(10, 96, 1, k).into(),
        Family::Ipv6 => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 1, k.into()).into(),
    }
}

/// The Service set for N, all of `family` (the pods' addresses too):
/// fillers, a probe in the middle, a probe last.
pub fn service_set(
    family: Family,
    n: usize,
    endpoints: usize,
    pods: &[(IpAddr, u16)],
) -> Vec<kube_proxy::ServicePort> {
    let probe = |name: &str, k: u8| kube_proxy::ServicePort {
        namespace: crate::BENCH_NAMESPACE.into(),
        name: name.into(),
        port_name: "http".into(),
        cluster_ip: probe_ip(family, k),
        port: 80,
        protocol: "tcp",
        endpoints: pods.to_vec(),
        node_port: None,
    };
    if n < 3 {
        let mut v = filler_services(family, n.saturating_sub(1), endpoints);
        v.push(probe(PROBE_LAST, 1));
        return v;
    }
    let mut v = filler_services(family, n - 2, endpoints);
    v.insert(n / 2, probe(PROBE_MIDDLE, 2));
    v.push(probe(PROBE_LAST, 1));
    v
}

pub fn probe_addr(set: &[kube_proxy::ServicePort], name: &str) -> Option<String> {
    set.iter()
        .find(|s| s.name == name)
        .map(|s| SocketAddr::new(s.cluster_ip, s.port).to_string())
}

fn run_client(lab: &Lab, to: &str, ms: u64) -> Result<ClientNumbers> {
    let bin = sibling_binary("lab-client", "LAB_CLIENT_BIN")?;
    bench_client(lab.command_in_cgroup(&lab.client.ns, &bin), to, ms)
}

/// Runs `lab-client bench` (`client`: the binary, in the namespace it
/// runs from) against `to` for `ms` per phase, and reads its numbers.
pub(crate) fn bench_client(mut client: Command, to: &str, ms: u64) -> Result<ClientNumbers> {
    let out = client
        .args(["bench", to, &(ms / 10).max(1).to_string(), IN_FLIGHT])
        .output()?;
    if !out.status.success() {
        bail!(
            "lab-client bench {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.trim().split('\t').collect();
    let get = |k: &str| -> Result<f64> {
        let i = f.iter().position(|x| *x == k).context("missing field")?;
        Ok(f.get(i + 1).context("missing value")?.parse()?)
    };
    Ok(ClientNumbers {
        conns_per_s: get("conns_per_s")?,
        rr_per_s: get("rr_per_s")?,
        rr_p50_us: get("rr_p50_us")?,
        rr_p99_us: get("rr_p99_us")?,
        kernel_us_per_conn: get("k_us_per_conn")?,
        kernel_us_per_rr: get("k_us_per_rr")?,
        kernel_us_per_conn_range: (0.0, 0.0),
    })
}

/// Medians over `rounds` runs, on a quiet machine.
fn client_median(lab: &Lab, to: &str, ms: u64, rounds: usize) -> Result<ClientNumbers> {
    crate::wait_for_quiet();
    let mut runs = Vec::new();
    for _ in 0..rounds {
        runs.push(run_client(lab, to, ms)?);
    }
    Ok(ClientNumbers::median_of(&runs))
}

impl ClientNumbers {
    /// Each figure's median over `runs`, and the range of the kernel CPU
    /// per connection.
    pub(crate) fn median_of(runs: &[ClientNumbers]) -> Self {
        let m = |f: fn(&ClientNumbers) -> f64| median(runs.iter().map(f).collect());
        ClientNumbers {
            conns_per_s: m(|n| n.conns_per_s),
            rr_per_s: m(|n| n.rr_per_s),
            rr_p50_us: m(|n| n.rr_p50_us),
            rr_p99_us: m(|n| n.rr_p99_us),
            kernel_us_per_conn: m(|n| n.kernel_us_per_conn),
            kernel_us_per_rr: m(|n| n.kernel_us_per_rr),
            kernel_us_per_conn_range: runs
                .iter()
                .map(|n| n.kernel_us_per_conn)
                .fold((f64::MAX, 0.0), |(lo, hi), k| (lo.min(k), hi.max(k))),
        }
    }
}

/// (VmRSS, VmHWM) of a process, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Kernel memory of the BPF maps a process holds (fdinfo `memlock`, each
/// map counted once), in KiB.
pub fn map_memlock_kib(pid: u32) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0u64;
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    for fd in fds.flatten() {
        let is_map =
            fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            if seen.insert(id) {
                total += bytes;
            }
        }
    }
    total / 1024
}

/// The iptables backend of the traffic runs: its restore takes seconds
/// where iptables-nft's takes minutes at 10,000 Services (see the rule
/// programming section), and the rules walk the same way per packet.
fn iptables(family: Family) -> String {
    format!("{}-legacy", family.iptables())
}

/// The family of a Service set (IPv4 when empty).
fn family_of(set: &[kube_proxy::ServicePort]) -> Family {
    set.first()
        .map_or(Family::Ipv4, kube_proxy::ServicePort::family)
}

/// nftables rules go in per chunk of this many Services: one transaction
/// of them all grows worse than quadratically (the programming section
/// times that); how they got there does not change how packets see them.
const NFT_CHUNK: usize = 2_000;

/// Removes every rule from the node namespace: nf_tables (nft) and the
/// legacy x_tables ones of both families.
pub fn flush_rules(lab: &Lab) -> Result<()> {
    lab.node.exec(&["nft", "flush", "ruleset"])?;
    for family in FAMILIES {
        rule_tools::flush_iptables(&lab.node, &iptables(family))?;
    }
    Ok(())
}

/// Feeds `input` to `program` in the node namespace.
fn restore(lab: &Lab, program: &[&str], input: &str) -> Result<()> {
    let mut cmd = lab.node.command(program[0]);
    cmd.args(&program[1..]);
    rule_tools::feed(cmd, input, Duration::from_mins(10)).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Installs kube-proxy's iptables-mode rules for `set` in the node
/// namespace (legacy backend, as the traffic runs use; ip6tables for an
/// IPv6 set).
pub fn install_iptables(lab: &Lab, set: &[kube_proxy::ServicePort]) -> Result<()> {
    let binary = iptables(family_of(set));
    rule_tools::install_iptables_jumps(&lab.node, &binary)?;
    restore(
        lab,
        &[&format!("{binary}-restore"), "-w", "--noflush"],
        &kube_proxy::iptables_full(set),
    )
}

/// Installs kube-proxy's nftables-mode rules for `set` in the node
/// namespace (its family's table), in chunks (see NFT_CHUNK).
pub fn install_nft(lab: &Lab, set: &[kube_proxy::ServicePort]) -> Result<()> {
    let base = kube_proxy::nft_base(family_of(set));
    restore(lab, &["nft", "-f", "-"], &base)?;
    for chunk in set.chunks(NFT_CHUNK) {
        restore(lab, &["nft", "-f", "-"], &kube_proxy::nft_chains(chunk))?;
    }
    for chunk in set.chunks(NFT_CHUNK * 4) {
        restore(lab, &["nft", "-f", "-"], &kube_proxy::nft_elements(chunk))?;
    }
    Ok(())
}

/// The lab's pods as endpoints of `family` (port 80): their IPv4 or IPv6
/// addresses (the lab is dual-stack).
pub fn pod_endpoints(lab: &Lab, family: Family) -> Vec<(IpAddr, u16)> {
    let addr = |p: &lb_lab::Pod| match family {
        Family::Ipv4 => IpAddr::from(p.ip),
        Family::Ipv6 => IpAddr::from(p.ip6),
    };
    lab.pods.values().map(|p| (addr(p), 80)).collect()
}

/// The lab of the traffic runs: the nginx example's pods, without its
/// Service (the bench brings its own). Returns the pods' IPv4 (address,
/// port); `pod_endpoints` gives the IPv6 ones.
pub fn pods_only_lab() -> Result<(Lab, Vec<(IpAddr, u16)>)> {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let text = fs::read_to_string(&example)?;
    let (objects, _) = workload::parse_lab_objects(&text)?;
    let objects: Vec<LabObject> = objects
        .into_iter()
        .filter(|o| !matches!(o, LabObject::Service(_)))
        .collect();
    let lab = Lab::from_objects(objects)?;
    let pods = pod_endpoints(&lab, Family::Ipv4);
    if pods.is_empty() {
        bail!("the nginx example gave no pods");
    }
    Ok((lab, pods))
}

/// Measures every mode at each size.
pub fn measure(
    sizes: &[usize],
    endpoints: usize,
    ms: u64,
    rounds: usize,
) -> Result<Vec<TrafficRow>> {
    let (mut lab, pods) = pods_only_lab()?;
    let mut rows = Vec::new();
    for &n in sizes {
        let set = service_set(Family::Ipv4, n, endpoints, &pods);
        let last = probe_addr(&set, PROBE_LAST).expect("a last probe");
        let middle = probe_addr(&set, PROBE_MIDDLE);
        let mut row = TrafficRow {
            services: n,
            modes: vec![None; MODES.len()],
            ..Default::default()
        };

        // Ours: the agent reads the same Services from its manifests.
        let mut docs = String::with_capacity(set.len() * 700);
        for s in &set {
            let (svc, slice) = k8s_objects(s);
            docs.push_str("---\n");
            docs.push_str(&svc.to_string());
            docs.push_str("\n---\n");
            docs.push_str(&slice.to_string());
            docs.push('\n');
        }
        lab.state.extra_manifests.clear();
        lab.state.extra_manifests.insert("bench.yaml".into(), docs);
        lab.write_manifests()?;
        let _ = lb_userspace::datapath::loader::cleanup(&lab.pin_dir);
        for (mode, socket_lb) in [(0, "all"), (1, "off")] {
            progress(&format!("traffic at {n} Services: {}", MODES[mode]));
            let dir = lab.manifest_dir().to_string_lossy().into_owned();
            let mut flags = vec![
                "--manifests".to_owned(),
                dir,
                "--node-name".to_owned(),
                NODE_NAME.to_owned(),
                "--socket-lb".to_owned(),
                socket_lb.to_owned(),
            ];
            flags.extend(crate::capacity_flags(n, endpoints, 0));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let started = std::time::Instant::now();
            lab.agent().only(&flags).spawn()?;
            let deadline = started + Duration::from_mins(10);
            while lab.generation() < 1 {
                if std::time::Instant::now() > deadline {
                    bail!("no first sync in 600 s:\n{}", lab.agent_log());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if mode == 0 {
                row.agent_start_to_sync = started.elapsed();
                let pid = lab.agent_pid().context("the agent runs")?;
                let (rss, peak) = rss_kib(pid);
                row.agent_rss_kib = rss;
                row.agent_peak_rss_kib = peak;
                row.map_memlock_kib = map_memlock_kib(pid);
            }
            row.modes[mode] = Some(client_median(&lab, &last, ms, rounds)?);
            lab.stop_agent();
        }
        lb_userspace::datapath::loader::cleanup(&lab.pin_dir)?;

        // iptables mode.
        progress(&format!(
            "traffic at {n} Services: iptables-restore of kube-proxy's rules"
        ));
        flush_rules(&lab)?;
        if installed(&mut row, "iptables", install_iptables(&lab, &set)) {
            progress(&format!("traffic at {n} Services: {}", MODES[2]));
            row.modes[2] = Some(client_median(&lab, &last, ms, rounds)?);
            if let Some(middle) = &middle {
                progress(&format!("traffic at {n} Services: {}", MODES[3]));
                row.modes[3] = Some(client_median(&lab, middle, ms, rounds)?);
            }
        }
        flush_rules(&lab)?;

        // nftables mode.
        progress(&format!("traffic at {n} Services: {}", MODES[4]));
        if installed(&mut row, "nftables", install_nft(&lab, &set)) {
            row.modes[4] = Some(client_median(&lab, &last, ms, rounds)?);
        }
        flush_rules(&lab)?;

        let show = |m: usize| {
            row.modes[m].map_or("-".into(), |c| {
                format!("{:.0} conn/s, p50 {:.1} us", c.conns_per_s, c.rr_p50_us)
            })
        };
        progress(&format!(
            "at {n} Services: {}",
            (0..MODES.len())
                .map(|m| format!("{}: {}", MODES[m], show(m)))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        rows.push(row);
    }
    lab.assert_no_checksum_errors();
    Ok(rows)
}

/// Whether a mode's rules went in; if not, the row notes why (what a
/// real node would meet: kube-proxy could not program that many
/// Services either).
fn installed(row: &mut TrafficRow, mode: &str, result: Result<()>) -> bool {
    let Err(e) = result else {
        return true;
    };
    let why = format!(
        "{mode} at {} Services: its rules did not install: {e}",
        thousands(row.services)
    );
    progress(&why);
    row.not_measured.push(why);
    false
}

/// The spread of the kernel CPU per connection over the runs.
fn kernel_spread(rows: &[TrafficRow]) -> String {
    let mut s = String::from(
        "### Kernel CPU per new connection, spread over the runs (us, lowest - highest)\n\n| Services |",
    );
    for m in MODES {
        s.push_str(&format!(" {m} |"));
    }
    s.push_str("\n| ---: |");
    s.push_str(&" ---: |".repeat(MODES.len()));
    s.push('\n');
    for r in rows {
        s.push_str(&format!("| {} |", thousands(r.services)));
        for m in &r.modes {
            s.push_str(&m.map_or(" - |".into(), |c| {
                let (lo, hi) = c.kernel_us_per_conn_range;
                format!(" {lo:.1} - {hi:.1} |")
            }));
        }
        s.push('\n');
    }
    s.push('\n');
    s
}

pub fn markdown(rows: &[TrafficRow], endpoints: usize, ms: u64, rounds: usize) -> String {
    let mut s = String::from("## Through the lab: client pod to ClusterIP\n\n");
    s.push_str(&format!(
        "A client pod (`lab-client`) to a ClusterIP whose 3 endpoints are the nginx example's pods, with N Services programmed ({endpoints} endpoints each besides the probed ones). Connections: connect, 1-byte request, 1-byte reply, close (with a RST, so TIME_WAIT does not decide the rate), from {IN_FLIGHT} threads so that many are in flight; latency: request/response on one kept connection. {ms} ms per phase, median of {rounds} runs per mode. iptables (legacy backend) and nftables: kube-proxy's rules in the node namespace, no agent running; ours: the agent on the same Services, socket LB on (translated at connect()) and off (tc per packet). The probed Service is last in KUBE-SERVICES (iptables' worst case) or in the middle.\n\n"
    ));
    type Pick = fn(&ClientNumbers) -> f64;
    let tables: [(&str, Pick, bool); 5] = [
        (
            "Connections per second (higher is better)",
            |c| c.conns_per_s,
            true,
        ),
        (
            "Request/response p50, us (lower is better)",
            |c| c.rr_p50_us,
            false,
        ),
        (
            "Request/response p99, us (lower is better)",
            |c| c.rr_p99_us,
            false,
        ),
        (
            "Kernel CPU per new connection, us: the machine's system + irq + softirq time (every namespace: client, node, pods) over the connections made (lower is better)",
            |c| c.kernel_us_per_conn,
            false,
        ),
        (
            "Kernel CPU per request on a kept connection, us (lower is better)",
            |c| c.kernel_us_per_rr,
            false,
        ),
    ];
    for (title, pick, higher_better) in tables {
        s.push_str(&format!("### {title}\n\n| Services |"));
        for m in MODES {
            s.push_str(&format!(" {m} |"));
        }
        s.push_str(" ours (socket LB) / iptables last | ours (per packet) / iptables last | ours (socket LB) / nftables | ours (per packet) / nftables |\n| ---: |");
        for _ in 0..MODES.len() + 4 {
            s.push_str(" ---: |");
        }
        s.push('\n');
        for r in rows {
            s.push_str(&format!("| {} |", thousands(r.services)));
            for m in &r.modes {
                s.push_str(&m.map_or(" - |".into(), |c| format!(" {:.1} |", pick(&c))));
            }
            for (a, b) in [(0, 2), (1, 2), (0, 4), (1, 4)] {
                let ratio = match (r.modes[a], r.modes[b]) {
                    (Some(x), Some(y)) => {
                        // Always "ours relative to theirs, >1 is better for us".
                        let v = if higher_better {
                            pick(&x) / pick(&y)
                        } else {
                            pick(&y) / pick(&x)
                        };
                        format!(" {v:.2}x |")
                    }
                    _ => " - |".into(),
                };
                s.push_str(&ratio);
            }
            s.push('\n');
        }
        s.push_str("\nRatios: how many times better ours is (above 1: ours is better).\n\n");
    }
    for why in rows.iter().flat_map(|r| &r.not_measured) {
        s.push_str(&format!("- Not measured: {why}\n"));
    }
    s.push('\n');
    s.push_str(&kernel_spread(rows));
    s.push_str("### Agent memory\n\n| Services | agent start to first sync | agent RSS after sync | peak RSS | BPF map memory (memlock, preallocated) |\n| ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2} s | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n",
            thousands(r.services),
            r.agent_start_to_sync.as_secs_f64(),
            r.agent_rss_kib as f64 / 1024.0,
            r.agent_peak_rss_kib as f64 / 1024.0,
            r.map_memlock_kib as f64 / 1024.0
        ));
    }
    s.push('\n');
    s
}
