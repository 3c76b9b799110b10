//! Project tasks: `cargo xtask <setup|build|test|lint|demo|run|image|bench>`.
//!
//! Every task first runs `setup`, which makes a fresh machine ready and is
//! cheap when everything is already there.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

mod bench;
mod image;
mod lint;
mod setup;
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
  lint             cargo fmt --check and clippy (warnings as errors, the
                   workspace lint table) on the host crates and on lb-ebpf
                   for its BPF target
  image [--debug] [--tag NAME] [--save FILE.tar] [--agent-bin PATH]
                   build the agent's container image offline with podman
                   (FROM scratch: the agent and its C libraries; default
                   tag localhost/lb-agent:latest, release build); --save
                   also writes it as an OCI archive to load on nodes
  bench [--quick]  measure (release build) against kube-proxy's iptables and
                   nftables rules and write bench/results/<date>.md with plots;
                   --quick is a smoke run of a few minutes";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::setup(),
        Some("build") => setup::setup().and_then(|()| build(args.iter().any(|a| a == "--release"))),
        Some("test") => setup::setup().and_then(|()| test(&args[1..])),
        Some("demo") => setup::setup().and_then(|()| demo()),
        Some("run") => setup::setup().and_then(|()| run_agent(&args[1..])),
        Some("lint") => setup::setup().and_then(|()| lint::lint()),
        Some("image") => setup::setup()
            .and_then(|()| image::ImageRequest::parse(&args[1..]))
            .and_then(|request| image::build(&request).map(drop)),
        Some("bench") => {
            setup::setup().and_then(|()| bench::bench(args.iter().any(|a| a == "--quick")))
        }
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

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` (a relative one
/// from the workspace root, where xtask runs cargo), else `target/`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
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

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    if on_ci() {
        // A CI run builds once from scratch: incremental caches would only
        // take disk, which a CI machine may have little of.
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

fn on_ci() -> bool {
    env::var_os("CI").is_some_and(|v| v == "true" || v == "1")
}

/// Prints the free disk space where the build goes: a build that ran out
/// of it fails with an error far from the cause.
fn report_free_disk(when: &str) {
    if let Some(df) = output(
        Command::new("df")
            .args(["-h", "--output=avail,size"])
            .arg(workspace_root()),
    ) {
        let avail = df.lines().nth(1).unwrap_or("?").trim().to_string();
        println!("[test] disk {when}: {avail} (free, size)");
    }
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
    let dir = target_dir().join("previous-release");
    let binary = dir.join("lb-agent");
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
    let build_dir = dir.join("target");
    // Without debug info, and only the binary kept: a second workspace's
    // build would otherwise hold about as much disk as the main one.
    sh(cargo()
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &build_dir)
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .args(["build", "-p", "lb-userspace", "--bin", "lb-agent"]))?;
    std::fs::copy(build_dir.join("debug/lb-agent"), &binary)?;
    std::fs::remove_dir_all(&build_dir)?;
    std::fs::remove_dir_all(&src)?;
    std::fs::remove_file(&archive)?;
    std::fs::write(&stamp, PREVIOUS_RELEASE)?;
    Ok(Ok(binary))
}

fn test(extra: &[String]) -> Result<()> {
    report_free_disk("before the build");
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
        agent_bin: Some(target_dir().join("debug/lb-agent")),
    })?;
    let env = [previous, ("LB_AGENT_IMAGE".to_string(), image)];
    report_free_disk("before the test build");
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
    sh(Command::new(target_dir().join("debug/lb-lab"))
        .arg("demo")
        .arg(workspace_root().join("examples")))
}

fn run_agent(args: &[String]) -> Result<()> {
    build(false)?;
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    sh(Command::new(target_dir().join("debug/lb-agent"))
        .arg("run")
        .args(args))
}
