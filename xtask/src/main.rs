//! Project tasks: `cargo xtask <setup|build|test|demo|run|image|bench>`.
//!
//! Every task first runs `setup`, which makes a fresh machine ready and is
//! cheap when everything is already there.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

mod image;
mod test_plan;

const USAGE: &str = "usage: cargo xtask <command> [args]

commands:
  setup            install what building and testing need (idempotent)
  build [--release] build the agent, the BPF object and the lab binaries
  test [ARGS]      run every test (unit, packet, lab: independent lab test
                   binaries side by side, timing-sensitive ones alone);
                   with ARGS, `cargo test ARGS` instead (one binary, a filter)
  demo             build the lab from examples/, run the agent, send requests
                   from a client pod to each ClusterIP and show who answered
  run -- FLAGS     run `lb-agent run FLAGS` (e.g. --manifests DIR or --kubeconfig)
  image [--debug] [--tag NAME] [--save FILE.tar] [--agent-bin PATH]
                   build the agent's container image offline with podman
                   (FROM scratch: the agent and its C libraries; default
                   tag localhost/lb-agent:latest, release build); --save
                   also writes it as an OCI archive to load on nodes
  bench [--quick]  measure (release build) against kube-proxy's iptables and
                   nftables rules and write bench/results/<date>.md with plots;
                   --quick is a smoke run of a few minutes";

/// Debian packages the tests and the demo use, with a binary that tells
/// whether each is installed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("util-linux", "nsenter"),
    ("bpftool", "bpftool"),
    // The kube-proxy rule sets the benchmark compares against are tested.
    ("iptables", "iptables-legacy-restore"),
    ("nftables", "nft"),
    // The agent's image is built and run in the tests (deploy/image/).
    ("podman", "podman"),
    ("buildah", "buildah"),
    ("runc", "runc"),
    // A throwaway cluster CA for the in-cluster config of the image test.
    ("openssl", "openssl"),
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build") => setup().and_then(|_| build(args.iter().any(|a| a == "--release"))),
        Some("test") => setup().and_then(|_| test(&args[1..])),
        Some("demo") => setup().and_then(|_| demo()),
        Some("run") => setup().and_then(|_| run_agent(&args[1..])),
        Some("image") => setup()
            .and_then(|_| image::ImageRequest::parse(&args[1..]))
            .and_then(|request| image::build(&request).map(drop)),
        Some("bench") => setup().and_then(|_| bench(args.iter().any(|a| a == "--quick"))),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("unknown command {other}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

fn say(msg: &str) {
    println!("[setup] {msg}");
}

/// Runs a command, streaming its output; fails with the command line.
fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(binary: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
        .unwrap_or(false)
}

fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

fn setup() -> Result<()> {
    // 1. The nightly toolchain compiles the BPF object (build-std needs it).
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs) and was not found")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (BPF object needs -Z build-std)");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("no nightly toolchain and it could not be installed")?;
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly does not run")?
        .trim()
        .to_owned();

    // 2. rust-src: build-std=core compiles core for bpfel-unknown-none.
    let core_src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if core_src.is_dir() {
        say("rust-src for nightly: present");
    } else {
        say("adding rust-src to the nightly toolchain");
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
            .context("rust-src could not be installed for the nightly toolchain")?;
    }

    // 3. bpf-linker, built against the nightly's own LLVM: bitcode from one
    // LLVM major cannot be linked by another.
    let verbose =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read the nightly's LLVM version")?
        .to_owned();
    let llvm_dir = home()?.join(".local/lib/rust-llvm/lib");
    std::fs::create_dir_all(&llvm_dir)?;
    // Link every libLLVM of the nightly: libLLVM.so for building bpf-linker,
    // the versioned names for its run-time loader (its rpath points here).
    for entry in std::fs::read_dir(Path::new(&sysroot).join("lib"))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM") {
            let link = llvm_dir.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(entry.path(), &link)?;
            if name.starts_with("libLLVM.so.") {
                let plain = llvm_dir.join("libLLVM.so");
                let _ = std::fs::remove_file(&plain);
                std::os::unix::fs::symlink(entry.path(), &plain)?;
            }
        }
    }
    let linker_ok = |cmd: &mut Command| output(cmd).is_some_and(|v| v.starts_with("bpf-linker"));
    if linker_ok(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
        say(&format!(
            "bpf-linker: present (LLVM {llvm_major} from the nightly)"
        ));
    } else {
        say(&format!(
            "building bpf-linker against the nightly's LLVM {llvm_major} (about 2 minutes)"
        ));
        sh(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm_major}"))
            .env("LLVM_PREFIX", llvm_dir.parent().expect("lib has a parent")))
        .context("bpf-linker could not be built")?;
        if !linker_ok(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
            bail!("bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)");
        }
    }

    // 4. System tools the lab and users need.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        say("system packages: present");
    } else {
        say(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        if !have("apt-get") {
            bail!(
                "missing {} and apt-get is not available: install them by hand",
                missing.join(" ")
            );
        }
        apt_install(&missing)?;
    }

    // 5. bpffs, where the agent pins its maps.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        say("bpffs: mounted at /sys/fs/bpf");
    } else if unsafe_is_root() {
        say("mounting bpffs at /sys/fs/bpf");
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    } else {
        say("bpffs is not mounted at /sys/fs/bpf and this is not root: the agent mounts it when run as root");
    }
    Ok(())
}

fn unsafe_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    sh(&mut c)
}

/// The release the upgrade test starts from: the last one before the map
/// layouts changed (stats and config grew), so the test upgrades across a
/// real layout change.
const PREVIOUS_RELEASE: &str = "45d8f59e986857fa07d38f2f403770bea727c4a1";

/// Builds lb-agent of [`PREVIOUS_RELEASE`] (once; kept under
/// target/previous-release). Err: why it cannot be had here (a shallow
/// clone without that commit); a failing build is an error of its own.
fn previous_release_agent() -> Result<std::result::Result<PathBuf, String>> {
    let root = workspace_root();
    let dir = root.join("target/previous-release");
    let binary = dir.join("target/debug/lb-agent");
    let stamp = dir.join("built-from");
    if binary.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(PREVIOUS_RELEASE)
    {
        return Ok(Ok(binary));
    }
    let has_commit = Command::new("git")
        .current_dir(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has_commit {
        return Ok(Err(format!(
            "commit {PREVIOUS_RELEASE} (the previous release) is not in this clone"
        )));
    }
    println!("[test] building lb-agent of the previous release {PREVIOUS_RELEASE} (once) for the upgrade test");
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = dir.join("src.tar");
    sh(Command::new("git").current_dir(&root).args([
        "archive",
        "--output",
        &archive.to_string_lossy(),
        PREVIOUS_RELEASE,
    ]))?;
    sh(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&src))?;
    sh(cargo()
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .args(["build", "-p", "lb-userspace", "--bin", "lb-agent"]))?;
    std::fs::write(&stamp, PREVIOUS_RELEASE)?;
    Ok(Ok(binary))
}

fn test(extra: &[String]) -> Result<()> {
    // The lab tests run the agent and the pod server binaries.
    build(false)?;
    let previous = match previous_release_agent()? {
        Ok(binary) => (
            "LB_PREVIOUS_AGENT_BIN".to_string(),
            binary.to_string_lossy().into_owned(),
        ),
        Err(why) => {
            println!("[test] the upgrade test will be skipped: {why}");
            ("LB_PREVIOUS_AGENT_UNAVAILABLE".to_string(), why)
        }
    };
    // tests/tests/container.rs runs this build of the agent as an image.
    let image = image::build(&image::ImageRequest {
        debug: true,
        tag: "localhost/lb-agent:test".into(),
        save: None,
        agent_bin: Some(workspace_root().join("target/debug/lb-agent")),
    })?;
    let env = [previous, ("LB_AGENT_IMAGE".to_string(), image)];
    if extra.is_empty() {
        return test_plan::run(&workspace_root(), &env);
    }
    let mut c = cargo();
    c.envs(env)
        .args(["test", "--workspace", "--exclude", "lb-ebpf"])
        .args(extra);
    if !extra.iter().any(|a| a == "--") {
        // Lab tests each build a node of namespaces; on two cores they are
        // steadier one at a time.
        c.args(["--", "--test-threads=1"]);
    }
    sh(&mut c)
}

fn demo() -> Result<()> {
    build(false)?;
    let root = workspace_root();
    sh(Command::new(root.join("target/debug/lb-lab"))
        .arg("demo")
        .arg(root.join("examples")))
}

fn run_agent(args: &[String]) -> Result<()> {
    build(false)?;
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    sh(Command::new(workspace_root().join("target/debug/lb-agent"))
        .arg("run")
        .args(args))
}

/// Debian packages the benchmark adds to setup's (which has iptables and
/// nftables): the plotter.
const BENCH_APT_PACKAGES: &[(&str, &str)] = &[("gnuplot-nox", "gnuplot")];

/// What one benchmark run measures, full or quick.
struct BenchPlan {
    datapath_sizes: &'static str,
    programming_sizes: &'static str,
    traffic_sizes: &'static str,
    /// Seconds an external tool may take to install one rule set.
    tool_limit_s: &'static str,
    changes: &'static str,
    traffic_ms: &'static str,
    traffic_rounds: &'static str,
    control_plane_services: &'static str,
    control_plane_changes: &'static str,
    /// Seconds of NodePort load at 1,000 new connections a second.
    nodeport_seconds: &'static str,
}

const FULL: BenchPlan = BenchPlan {
    datapath_sizes: "1,1000,10000,30000",
    programming_sizes: "1,1000,10000,30000,100000",
    traffic_sizes: "1,1000,10000,30000",
    tool_limit_s: "180",
    changes: "50",
    traffic_ms: "1000",
    traffic_rounds: "3",
    control_plane_services: "10000",
    control_plane_changes: "300",
    nodeport_seconds: "60",
};

const QUICK: BenchPlan = BenchPlan {
    datapath_sizes: "1,1000",
    programming_sizes: "1,1000",
    traffic_sizes: "1,1000",
    tool_limit_s: "60",
    changes: "20",
    traffic_ms: "300",
    traffic_rounds: "1",
    control_plane_services: "1000",
    control_plane_changes: "100",
    nodeport_seconds: "10",
};

/// Runs one lb-bench measurement: progress streams to the terminal, the
/// markdown section it prints is returned.
fn bench_section(name: &str, args: &[&str]) -> Result<String> {
    let bin = workspace_root().join("target/release/lb-bench");
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

fn install_bench_packages() -> Result<()> {
    let missing: Vec<&str> = BENCH_APT_PACKAGES
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        say("benchmark packages (gnuplot): present");
        return Ok(());
    }
    say(&format!(
        "installing Debian packages for the benchmark: {}",
        missing.join(" ")
    ));
    apt_install(&missing)
}

/// `apt-get update` and `apt-get install` of `packages`, non-interactively.
fn apt_install(packages: &[&str]) -> Result<()> {
    sh(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed (root is required)")
}

fn first_line(cmd: &mut Command) -> String {
    output(cmd)
        .and_then(|o| o.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the benchmarks on release builds and writes a markdown report
/// with PNG plots beside it.
fn bench(quick: bool) -> Result<()> {
    install_bench_packages()?;
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
    let mut report = String::new();
    report.push_str(&format!(
        "# lb benchmark results, {date}{}\n\n",
        if quick { " (--quick)" } else { "" }
    ));
    report.push_str("## Machine and versions\n\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = first_line(Command::new("git").args(["-C"]).arg(&root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]));
    report.push_str(&format!(
        "- kernel: {}\n- CPU: {cpu}, {cores} cores; memory: {}\n- {}; aya 0.14, aya-ebpf 0.2.1\n- lb commit {commit}\n- {}; {}\n- IPVS: {}\n\n",
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
    ));
    report.push_str(&bench_section(
        "per-packet cost",
        &[
            "datapath",
            "--sizes",
            plan.datapath_sizes,
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
            &dir.to_string_lossy(),
            "--plot-prefix",
            &format!("{stem}-"),
        ],
    )?);
    report.push_str(&bench_section(
        "control plane",
        &[
            "control-plane",
            "--services",
            plan.control_plane_services,
            "--endpoints",
            "10",
            "--changes",
            plan.control_plane_changes,
        ],
    )?);
    let mut nodeport = vec![
        "nodeport-load",
        "--rate",
        "1000",
        "--seconds",
        plan.nodeport_seconds,
    ];
    let previous = previous_release_agent()?;
    let previous_path = previous.as_ref().map(|p| p.to_string_lossy().into_owned());
    match &previous_path {
        Ok(path) => nodeport.extend(["--previous-agent", path.as_str()]),
        Err(why) => {
            println!("[bench] the previous release is left out of the NodePort load: {why}")
        }
    }
    report.push_str(&bench_section("NodePort under load", &nodeport)?);
    // Rule programming goes last: the kernel frees the huge iptables and
    // nftables rule sets of its namespaces in the background for minutes,
    // which would load the machine under the traffic runs.
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
    let took = started.elapsed().as_secs_f64();
    report.push_str(&format!(
        "Whole run: {:.0} min {:.0} s (release build not included). Reproduce with `cargo xtask bench{}` (as root).\n",
        (took / 60.0).floor(),
        took % 60.0,
        if quick { " --quick" } else { "" }
    ));
    let file = dir.join(format!("{stem}.md"));
    std::fs::write(&file, report)?;
    println!(
        "[bench] report written to {} ({:.0} s)",
        file.display(),
        took
    );
    Ok(())
}
