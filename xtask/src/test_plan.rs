//! `cargo xtask test`: builds every test once, then runs the test binaries
//! themselves: unit and packet tests first, then the lab tests, those that
//! only check behaviour several at a time, and those that measure timing
//! (gaps in answers, SYN retransmissions under load) one at a time. Each
//! binary's output is kept and printed whole when it ends, with its time.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The package whose integration tests (tests/tests/*.rs) are the lab
/// tests. The lab, fixture and bench crates (lb-lab, lb-kube-fixtures,
/// lb-bench) hold only unit tests, run with the other unit tests.
const TESTS_PACKAGE: &str = "lb-tests";

/// How a test binary of the tests crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Beside other such binaries, with this many test threads.
    Shared(u32),
    /// With nothing else running: its tests judge time.
    Alone,
}

/// The lab test binaries (tests/tests/*.rs) and how they run; one missing
/// here fails the plan, so a new file cannot be left out.
const LAB_TESTS: &[(&str, Run)] = &[
    ("deploy", Run::Shared(4)),
    ("parser_fuzz", Run::Shared(1)),
    ("packet", Run::Shared(2)),
    ("packet_ipv6", Run::Shared(2)),
    ("masquerade", Run::Shared(2)),
    ("bench_rules", Run::Shared(1)),
    ("lab", Run::Shared(2)),
    ("service_types", Run::Shared(3)),
    ("socket_lb", Run::Shared(2)),
    ("security", Run::Shared(1)),
    ("kubernetes", Run::Shared(2)),
    ("multi_node", Run::Shared(2)),
    ("dual_stack", Run::Shared(2)),
    ("health", Run::Shared(2)),
    ("memory_limit", Run::Shared(1)),
    ("container", Run::Shared(1)),
    ("reliability", Run::Alone),
    ("nodeport_load", Run::Alone),
];

/// Binaries of the Shared kind running at once (two cores).
const SHARED_AT_ONCE: usize = 2;

/// A test executable cargo built.
#[derive(Clone, Debug)]
struct TestBinary {
    /// `lb-userspace lib lb_userspace`, `lb-tests test lab`, ...
    name: String,
    package: String,
    target: String,
    kind: String,
    path: PathBuf,
    /// The package folder (cargo runs tests there).
    dir: PathBuf,
}

/// Builds the tests (`cargo test --no-run`) and lists their executables.
fn build_tests(root: &Path) -> Result<Vec<TestBinary>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["test", "--workspace", "--exclude", "lb-ebpf", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed ({})", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), true) = (
            msg["executable"].as_str(),
            msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true,
        ) else {
            continue;
        };
        let target = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kind = msg["target"]["kind"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        let package = msg["package_id"]
            .as_str()
            .map(package_name)
            .unwrap_or_default();
        bins.push(TestBinary {
            name: format!("{package} {kind} {target}"),
            package,
            target,
            kind,
            path: PathBuf::from(exe),
            dir: manifest.parent().map(Path::to_owned).unwrap_or_default(),
        });
    }
    Ok(bins)
}

/// The package name in a package id: `path+file:///src/lb/tests#lb-tests@0.1.0`,
/// or `path+file:///src/lb/lb-common#0.1.0` when it is the folder's name.
fn package_name(id: &str) -> String {
    let (url, tail) = id.rsplit_once('#').unwrap_or((id, ""));
    match tail.split_once('@') {
        Some((name, _)) => name.to_owned(),
        None => url.rsplit('/').next().unwrap_or(url).to_owned(),
    }
}

/// A test binary running, its output going to a file.
struct Running {
    bin: TestBinary,
    child: Child,
    log: PathBuf,
    started: Instant,
}

fn start(
    bin: &TestBinary,
    threads: Option<u32>,
    logs: &Path,
    env: &[(String, String)],
) -> Result<Running> {
    let log = logs.join(format!("{}-{}.log", bin.kind, bin.target));
    let file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(&bin.path);
    if let Some(t) = threads {
        cmd.arg(format!("--test-threads={t}"));
    }
    cmd.current_dir(&bin.dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.path.display()))?;
    Ok(Running {
        bin: bin.clone(),
        child,
        log,
        started: Instant::now(),
    })
}

/// Waits for `r`, prints its output whole, returns whether it passed.
fn finish(mut r: Running, summary: &mut Vec<(String, Duration, bool)>) -> Result<bool> {
    let status = r.child.wait()?;
    let took = r.started.elapsed();
    let output = std::fs::read_to_string(&r.log).unwrap_or_default();
    println!(
        "\n==== {} ({:.0} s, {}) ====\n{output}",
        r.bin.name,
        took.as_secs_f64(),
        if status.success() { "ok" } else { "FAILED" }
    );
    summary.push((r.bin.name.clone(), took, status.success()));
    Ok(status.success())
}

/// Runs the binaries of `queue`, `at_once` at a time.
fn run_pool(
    queue: Vec<(TestBinary, Option<u32>)>,
    at_once: usize,
    logs: &Path,
    env: &[(String, String)],
    summary: &mut Vec<(String, Duration, bool)>,
) -> Result<bool> {
    let mut queue: VecDeque<_> = queue.into();
    let mut running: Vec<Running> = Vec::new();
    let mut ok = true;
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < at_once {
            let Some((bin, threads)) = queue.pop_front() else {
                break;
            };
            println!("[test] running {}", bin.name);
            running.push(start(&bin, threads, logs, env)?);
        }
        // The first to end is reported first.
        let done = loop {
            if let Some(i) = running
                .iter_mut()
                .position(|r| matches!(r.child.try_wait(), Ok(Some(_))))
            {
                break i;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        ok &= finish(running.remove(done), summary)?;
    }
    Ok(ok)
}

/// The lab test binaries and the unit ones; an error when a lab test file
/// has no place in [`LAB_TESTS`].
fn split_plan(bins: Vec<TestBinary>) -> Result<(Vec<TestBinary>, Vec<TestBinary>)> {
    let (lab, unit): (Vec<_>, Vec<_>) = bins
        .into_iter()
        .partition(|b| b.kind == "test" && b.package == TESTS_PACKAGE);
    for b in &lab {
        if !LAB_TESTS.iter().any(|(t, _)| *t == b.target) {
            bail!(
                "tests/tests/{}.rs is not in xtask's LAB_TESTS: say how it runs",
                b.target
            );
        }
    }
    Ok((lab, unit))
}

/// The whole plan; `env` goes to every test binary.
pub fn run(root: &Path, env: &[(String, String)]) -> Result<()> {
    let started = Instant::now();
    let bins = build_tests(root)?;
    let logs = crate::target_dir().join("test-logs");
    std::fs::create_dir_all(&logs)?;
    let (lab, unit) = split_plan(bins)?;
    let mut summary = Vec::new();
    let mut ok = run_pool(
        unit.into_iter().map(|b| (b, None)).collect(),
        SHARED_AT_ONCE,
        &logs,
        env,
        &mut summary,
    )?;
    let of = |run: fn(Run) -> Option<Option<u32>>| -> Vec<(TestBinary, Option<u32>)> {
        LAB_TESTS
            .iter()
            .filter_map(|(t, r)| Some((lab.iter().find(|b| b.target == *t)?.clone(), run(*r)?)))
            .collect()
    };
    let shared = of(|r| match r {
        Run::Shared(t) => Some(Some(t)),
        Run::Alone => None,
    });
    let alone = of(|r| match r {
        Run::Alone => Some(Some(1)),
        Run::Shared(_) => None,
    });
    ok &= run_pool(shared, SHARED_AT_ONCE, &logs, env, &mut summary)?;
    ok &= run_pool(alone, 1, &logs, env, &mut summary)?;
    println!(
        "\n==== summary ({:.0} s in all) ====",
        started.elapsed().as_secs_f64()
    );
    for (name, took, passed) in &summary {
        println!(
            "{:>6.0} s  {:<6}  {name}",
            took.as_secs_f64(),
            if *passed { "ok" } else { "FAILED" }
        );
    }
    if !ok {
        bail!("some tests failed (see their output above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(package: &str, kind: &str, target: &str) -> TestBinary {
        TestBinary {
            name: format!("{package} {kind} {target}"),
            package: package.into(),
            target: target.into(),
            kind: kind.into(),
            path: PathBuf::new(),
            dir: PathBuf::new(),
        }
    }

    #[test]
    fn lab_tests_are_the_tests_crates_integration_tests() {
        let (lab, unit) = split_plan(vec![
            bin("lb-tests", "test", "lab"),
            bin("lb-lab", "lib", "lb_lab"),
            bin("lb-kube-fixtures", "lib", "lb_kube_fixtures"),
            bin("lb-bench", "bin", "lb-bench"),
            bin("lb-userspace", "lib", "lb_userspace"),
        ])
        .unwrap();
        assert_eq!(lab.len(), 1);
        assert_eq!(lab[0].target, "lab");
        assert_eq!(unit.len(), 4);
    }

    #[test]
    fn a_test_file_missing_from_the_plan_fails_it() {
        let err = split_plan(vec![bin("lb-tests", "test", "not_planned")]).unwrap_err();
        assert!(err.to_string().contains("tests/tests/not_planned.rs"));
    }

    #[test]
    fn every_test_file_has_a_place_in_the_plan() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tests");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                assert!(
                    LAB_TESTS.iter().any(|(t, _)| *t == stem),
                    "{} is not in LAB_TESTS",
                    path.display()
                );
            }
        }
    }
}
