//! `cargo xtask bench`: the benchmarks on release builds, side by side
//! with kube-proxy's rule sets, written to bench/results/ with plots.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    build, output, previous_release_agent, setup::install_missing, target_dir, workspace_root,
};

/// Debian packages the benchmark adds to setup's (which has iptables and
/// nftables): the plotter.
const BENCH_APT_PACKAGES: &[(&str, &str)] = &[("gnuplot-nox", "gnuplot")];

/// What one benchmark run measures, full or quick.
struct BenchPlan {
    datapath_sizes: &'static str,
    /// Conntrack capacities the per-packet cost is also measured at (the
    /// smallest size), besides the default.
    datapath_conntrack: &'static str,
    programming_sizes: &'static str,
    traffic_sizes: &'static str,
    /// Seconds an external tool may take to install one rule set.
    tool_limit_s: &'static str,
    changes: &'static str,
    traffic_ms: &'static str,
    traffic_rounds: &'static str,
    control_plane_services: &'static str,
    control_plane_changes: &'static str,
    /// Changes with `--id-wrap`: 256 pairs wrap the backend ids once.
    id_wrap_changes: &'static str,
    /// Seconds of NodePort load at 1,000 new connections a second.
    nodeport_seconds: &'static str,
}

const FULL: BenchPlan = BenchPlan {
    datapath_sizes: "1,1000,10000,30000,100000",
    datapath_conntrack: "4096,16384,65536,1048576",
    programming_sizes: "1,1000,10000,30000,100000",
    traffic_sizes: "1,1000,10000,30000,100000",
    tool_limit_s: "180",
    changes: "50",
    traffic_ms: "1000",
    traffic_rounds: "3",
    control_plane_services: "10000",
    control_plane_changes: "300",
    id_wrap_changes: "1200",
    nodeport_seconds: "60",
};

const QUICK: BenchPlan = BenchPlan {
    datapath_sizes: "1,1000",
    datapath_conntrack: "4096",
    programming_sizes: "1,1000",
    traffic_sizes: "1,1000",
    tool_limit_s: "60",
    changes: "20",
    traffic_ms: "300",
    traffic_rounds: "1",
    control_plane_services: "1000",
    control_plane_changes: "100",
    id_wrap_changes: "600",
    nodeport_seconds: "10",
};

/// Runs one lb-bench measurement: progress streams to the terminal, the
/// markdown section it prints is returned.
fn bench_section(name: &str, args: &[&str]) -> Result<String> {
    let bin = target_dir().join("release/lb-bench");
    let started = std::time::Instant::now();
    println!("[bench] {name}: lb-bench {}", args.join(" "));
    let out = Command::new(bin)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running lb-bench {}", args[0]))?;
    if !out.status.success() {
        bail!("lb-bench {} failed ({})", args[0], out.status);
    }
    let section = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{section}");
    println!(
        "[bench] {name}: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(section)
}

fn first_line(cmd: &mut Command) -> String {
    output(cmd)
        .and_then(|o| o.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the benchmarks on release builds and writes a markdown report
/// with PNG plots beside it.
pub fn bench(quick: bool) -> Result<()> {
    install_missing("benchmark packages (gnuplot)", BENCH_APT_PACKAGES)?;
    build(true)?;
    let root = workspace_root();
    let started = std::time::Instant::now();
    let plan = if quick { &QUICK } else { &FULL };
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let stem = format!("{date}{}", if quick { "-quick" } else { "" });
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let mut report = format!(
        "# lb benchmark results, {date}{}\n\n",
        if quick { " (--quick)" } else { "" }
    );
    report.push_str(&machine_section(&root));
    report.push_str(&measurements(plan, &dir, &stem)?);
    let took = started.elapsed().as_secs_f64();
    report.push_str(&format!(
        "Whole run: {:.0} min {:.0} s (release build not included). Reproduce with `cargo xtask bench{}` (as root).\n",
        (took / 60.0).floor(),
        took % 60.0,
        if quick { " --quick" } else { "" }
    ));
    let file = dir.join(format!("{stem}.md"));
    std::fs::write(&file, report)?;
    println!("[bench] report written to {} ({took:.0} s)", file.display());
    Ok(())
}

/// The machine and versions the figures were measured on.
fn machine_section(root: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let commit = first_line(Command::new("git").args(["-C"]).arg(root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]));
    format!(
        "## Machine and versions\n\n- kernel: {}\n- CPU: {cpu}, {cores} cores; memory: {}\n- {}; aya 0.14, aya-ebpf 0.2.1\n- lb commit {commit}\n- {}; {}\n- IPVS: {}\n\n",
        first_line(Command::new("uname").args(["-srm"])),
        first_line(Command::new("sh").args(["-c", "free -h | awk '/Mem:/ {print $2}'"])),
        first_line(Command::new("rustc").arg("-V")),
        first_line(Command::new("iptables").arg("-V")),
        first_line(Command::new("nft").arg("-v")),
        if Path::new("/proc/net/ip_vs").exists() {
            "present, not measured"
        } else {
            "not in this kernel (no /proc/net/ip_vs, no loadable modules): kube-proxy's IPVS mode cannot be measured here"
        },
    )
}

/// Every lb-bench measurement of `plan`, in order: rule programming last,
/// since the kernel frees the huge iptables and nftables rule sets of its
/// namespaces in the background for minutes, which would load the machine
/// under the traffic runs.
fn measurements(plan: &BenchPlan, dir: &Path, stem: &str) -> Result<String> {
    let mut report = String::new();
    let dir = dir.to_string_lossy();
    let prefix = format!("{stem}-");
    report.push_str(&bench_section(
        "per-packet cost",
        &[
            "datapath",
            "--sizes",
            plan.datapath_sizes,
            "--conntrack",
            plan.datapath_conntrack,
            "--endpoints",
            "4",
        ],
    )?);
    report.push_str(&bench_section(
        "traffic through the lab",
        &[
            "traffic",
            "--sizes",
            plan.traffic_sizes,
            "--endpoints",
            "4",
            "--ms",
            plan.traffic_ms,
            "--rounds",
            plan.traffic_rounds,
            "--plot-dir",
            &dir,
            "--plot-prefix",
            &prefix,
        ],
    )?);
    report.push_str(&bench_section(
        "SNAT against DSR through three nodes",
        // Its defaults: more SNAT connections than these would run out of
        // masquerade ports (a closed flow holds its port for 120 s).
        &["forwarding"],
    )?);
    for source in ["api", "manifests"] {
        report.push_str(&control_plane(
            &format!("control plane ({source})"),
            plan,
            plan.control_plane_changes,
            &["--source", source],
        )?);
    }
    report.push_str(&control_plane(
        "control plane past a wrap of the backend ids (api)",
        plan,
        plan.id_wrap_changes,
        &["--id-wrap"],
    )?);
    report.push_str(&nodeport_load(plan)?);
    report.push_str(&bench_section(
        "rule programming",
        &[
            "programming",
            "--sizes",
            plan.programming_sizes,
            "--endpoints",
            "4",
            "--changes",
            plan.changes,
            "--limit-s",
            plan.tool_limit_s,
        ],
    )?);
    Ok(report)
}

/// `lb-bench control-plane` at the plan's size, 10 endpoints a Service,
/// with `changes` and `extra` flags.
fn control_plane(name: &str, plan: &BenchPlan, changes: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec![
        "control-plane",
        "--services",
        plan.control_plane_services,
        "--endpoints",
        "10",
        "--changes",
        changes,
    ];
    args.extend_from_slice(extra);
    bench_section(name, &args)
}

/// NodePort under load, beside the previous release when it can be built.
fn nodeport_load(plan: &BenchPlan) -> Result<String> {
    let mut args = vec![
        "nodeport-load",
        "--rate",
        "1000",
        "--seconds",
        plan.nodeport_seconds,
    ];
    let previous = previous_release_agent()?;
    let previous_path = previous.as_ref().map(|p| p.to_string_lossy().into_owned());
    match &previous_path {
        Ok(path) => args.extend(["--previous-agent", path.as_str()]),
        Err(why) => {
            println!("[bench] the previous release is left out of the NodePort load: {why}");
        }
    }
    bench_section("NodePort under load", &args)
}
