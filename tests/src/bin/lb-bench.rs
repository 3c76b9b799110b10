//! lb-bench: measurements behind `cargo xtask bench`.
//!
//! `lb-bench control-plane --services N --endpoints M --changes K` drives the
//! real lb-agent (with the data path attached in a lab node) from the API
//! server fixture and measures, end to end:
//! - initial programming of N Services x M endpoints: from the agent's start
//!   to its first full sync written (and the sync's own duration, from its log);
//! - K single-EndpointSlice changes: from the fixture storing the change to
//!   the new backend count being visible in the pinned services map
//!   (p50/p99/max), each change one endpoint added or removed;
//! - the agent's RSS after the initial sync and at the end (and its peak).
//!
//! `lb-bench socket-lb [ROUNDS] [MS]` compares, from a client pod to a
//! ClusterIP, socket-level load balancing with per-packet NAT: connection
//! rate and request/response rate and latency, in alternating rounds.
//!
//! It prints a markdown section on stdout; progress goes to stderr.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::Service4Key;
use lb_tests::{
    apiserver::ApiServer,
    lab::{Lab, NODE_NAME},
};
use lb_userspace::{
    differ::master_key,
    loader,
    model::{L4Addr, Protocol},
};
use serde_json::{json, Value};

struct Args {
    services: usize,
    endpoints: usize,
    changes: usize,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args {
        services: 10_000,
        endpoints: 10,
        changes: 300,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("bad value for {flag}"))
        };
        match flag.as_str() {
            "--services" => a.services = value()?,
            "--endpoints" => a.endpoints = value()?,
            "--changes" => a.changes = value()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.services == 0 || a.services > 60_000 || a.endpoints == 0 || a.endpoints > 200 {
        bail!("--services must be 1..=60000 and --endpoints 1..=200");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("control-plane") => control_plane(parse_args(&args[1..])?),
        Some("socket-lb") => {
            let rounds = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5).clamp(1, 50);
            let ms = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(2000u64).clamp(100, 60_000);
            socket_lb(rounds, ms)
        }
        _ => bail!("usage: lb-bench control-plane [--services N] [--endpoints M] [--changes K] | socket-lb [ROUNDS] [MS]"),
    }
}

fn service_ip(i: usize) -> Ipv4Addr {
    // 10.96.0.0/12 holds a million addresses; skip .0 of each /24.
    let n = (i / 255) * 256 + i % 255 + 1;
    Ipv4Addr::new(10, 96 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn endpoint_ip(i: usize, e: usize) -> Ipv4Addr {
    let n = i * 256 + e + 1;
    Ipv4Addr::new(10, 128 + (n >> 16) as u8 % 64, (n >> 8) as u8, n as u8)
}

fn service(i: usize) -> Value {
    json!({"kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": service_ip(i).to_string(), "selector": {"app": format!("app-{i}")},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

fn slice(i: usize, endpoints: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            json!({"addresses": [endpoint_ip(i, e).to_string()], "conditions": {"ready": true},
                   "nodeName": NODE_NAME})
        })
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The sync duration the agent logged for its first (full) sync.
fn first_sync_duration(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("sync 1 (full)"))
        .and_then(|l| l.rsplit(", ").next())
        .map(str::to_owned)
}

fn control_plane(a: Args) -> Result<()> {
    let mut lab = Lab::from_objects(Vec::new())?;
    let api = ApiServer::start_in(Some(lab.node.path()))?;
    api.apply(&json!({"kind": "Node", "metadata": {"name": NODE_NAME}}))?;
    eprintln!(
        "[bench] control plane: storing {} Services x {} endpoints in the API server fixture",
        a.services, a.endpoints
    );
    let mut objects = Vec::with_capacity(a.services * 2);
    for i in 0..a.services {
        objects.push(service(i));
        objects.push(slice(i, a.endpoints));
    }
    api.apply_all(&objects)?;
    drop(objects);
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;

    eprintln!("[bench] starting lb-agent and waiting for its first full sync");
    let started = Instant::now();
    let kc = kubeconfig.to_string_lossy().into_owned();
    lab.spawn_agent_with(&["--kubeconfig", &kc, "--node-name", NODE_NAME])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while lab.generation() < 1 {
        if Instant::now() > deadline {
            bail!("no first sync in 300 s:\n{}", lab.agent_log());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let initial = started.elapsed();
    let pid = lab.agent_pid().context("agent runs")?;
    let (rss_after_sync, _) = rss_kib(pid);
    let maps = loader::open_pinned(&lab.pin_dir)?;
    let key_of = |i: usize| -> Service4Key {
        master_key(&L4Addr {
            addr: service_ip(i),
            port: 80,
            proto: Protocol::Tcp,
        })
    };
    let count_of = |i: usize| maps.services.get(&key_of(i), 0).ok().map(|v| v.count);
    for i in [0, a.services / 2, a.services - 1] {
        if count_of(i) != Some(a.endpoints as u16) {
            bail!(
                "Service {i} is not fully programmed after the first sync: {:?}",
                count_of(i)
            );
        }
    }

    eprintln!("[bench] {} single-EndpointSlice changes", a.changes);
    let mut latencies = Vec::with_capacity(a.changes);
    let mut sizes = vec![a.endpoints; a.services];
    // A fixed-seed LCG: the same Services are changed in every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..a.changes {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (seed >> 33) as usize % a.services;
        let new = if sizes[i] == a.endpoints {
            a.endpoints + 1
        } else {
            a.endpoints
        };
        let t0 = Instant::now();
        api.apply(&slice(i, new))?;
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if count_of(i) == Some(new as u16) {
                break;
            }
            if Instant::now() > deadline {
                bail!("change {n} (Service {i} to {new} endpoints) not programmed in 10 s");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(t0.elapsed());
        sizes[i] = new;
        // Changes arrive one at a time, as single edits do in a cluster.
        std::thread::sleep(Duration::from_millis(2));
    }
    latencies.sort();
    let (rss_end, rss_peak) = rss_kib(pid);
    let sync = first_sync_duration(&lab.agent_log()).unwrap_or_else(|| "?".into());
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "### Control plane: {} Services x {} endpoints ({} backends)\n",
        a.services,
        a.endpoints,
        a.services * a.endpoints
    );
    println!("| Measure | Value |\n| --- | --- |");
    println!(
        "| Agent start to first full sync written (list + translate + write, BPF load included) | {} |",
        ms(initial)
    );
    println!("| First full sync alone (translate + write, agent log) | {sync} |");
    println!(
        "| EndpointSlice change to map, p50 ({} changes) | {} |",
        latencies.len(),
        ms(percentile(&latencies, 0.50))
    );
    println!(
        "| EndpointSlice change to map, p99 | {} |",
        ms(percentile(&latencies, 0.99))
    );
    println!(
        "| EndpointSlice change to map, max | {} |",
        ms(*latencies.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "| Agent RSS after first sync / at end / peak | {:.1} / {:.1} / {:.1} MiB |",
        rss_after_sync as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    );
    println!();
    Ok(())
}

/// Picks one number out of a run.
type Metric = fn(&ClientNumbers) -> f64;

/// One lab-client benchmark run's numbers.
#[derive(Default, Clone, Copy)]
struct ClientNumbers {
    conns_per_s: f64,
    rr_per_s: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
}

fn run_client_bench(lab: &Lab, ms: u64) -> Result<ClientNumbers> {
    let bin = lb_tests::lab::sibling_binary("lab-client", "LAB_CLIENT_BIN")?;
    let out = lab
        .command_in_cgroup(&lab.client.ns, &bin)
        .args(["bench", "10.96.0.10:80", &(ms / 10).to_string()])
        .output()?;
    if !out.status.success() {
        bail!("lab-client bench: {}", String::from_utf8_lossy(&out.stderr));
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
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Socket LB on vs off, from a client pod to the nginx example's ClusterIP,
/// in alternating rounds of one run so both see the same machine noise.
fn socket_lb(rounds: usize, ms: u64) -> Result<()> {
    let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/nginx-deployment.yaml");
    let mut lab = Lab::from_manifest_files(&[example])?;
    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 0..rounds {
        for mode in ["all", "off"] {
            lab.stop_agent();
            lab.start_agent_extra(&["--socket-lb", mode])?;
            let n = run_client_bench(&lab, ms)?;
            eprintln!(
                "[bench] round {round} socket-lb {mode}: {:.0} conn/s, {:.0} req/s, p50 {:.1} us, p99 {:.1} us",
                n.conns_per_s, n.rr_per_s, n.rr_p50_us, n.rr_p99_us
            );
            if mode == "all" {
                on.push(n)
            } else {
                off.push(n)
            }
        }
    }
    let m = |v: &[ClientNumbers], f: Metric| median(v.iter().map(f).collect());
    println!("## Socket-level load balancing vs per-packet NAT\n");
    println!(
        "A client pod to a ClusterIP with 3 backends (the nginx example), {rounds} alternating rounds of {ms} ms per phase; medians over rounds. On: translated at connect() (cgroup hooks); off: tc translates every packet.\n"
    );
    println!("| | socket LB on | off (per packet) | on / off |");
    println!("| --- | --- | --- | --- |");
    let rows: [(&str, Metric); 4] = [
        ("connections/s (connect, request, close)", |n| n.conns_per_s),
        ("requests/s on one connection", |n| n.rr_per_s),
        ("request/response p50 (us)", |n| n.rr_p50_us),
        ("request/response p99 (us)", |n| n.rr_p99_us),
    ];
    for (name, f) in rows {
        let (a, b) = (m(&on, f), m(&off, f));
        println!("| {name} | {a:.1} | {b:.1} | {:.2} |", a / b);
    }
    println!();
    lab.assert_no_checksum_errors();
    Ok(())
}
