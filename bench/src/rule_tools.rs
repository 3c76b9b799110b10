//! Running iptables and nft inside a network namespace: feeding them a
//! rule file with a time limit, kube-proxy's jump rules, and flushing.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::kube_proxy;
use lb_lab::Netns;

/// Runs `cmd` with `input` on stdin, killed after `limit`; returns how
/// long it took from start to exit.
pub fn feed(mut cmd: Command, input: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    // The tools read their input as they go: written from a thread of its
    // own, so the time limit below holds while they are still reading.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let result = wait_limited(&mut child, &cmd, started, limit);
    // A killed reader ends the write with an error; that is no news.
    let written = writer.join().expect("writer thread");
    if result.is_ok() {
        written.map_err(|e| format!("writing to {cmd:?}: {e}"))?;
    }
    result
}

fn wait_limited(
    child: &mut std::process::Child,
    cmd: &Command,
    started: Instant,
    limit: Duration,
) -> Result<Duration, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let took = started.elapsed();
                if status.success() {
                    return Ok(took);
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("{cmd:?} failed ({status}): {}", err.trim()));
            }
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish in {} s", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Creates kube-proxy's chains and the jumps into them from the built-in
/// chains, with `binary` (`iptables-legacy` or `iptables-nft`).
pub fn install_iptables_jumps(ns: &Netns, binary: &str) -> Result<()> {
    for args in kube_proxy::IPTABLES_JUMPS {
        let mut full = vec![binary, "-w"];
        full.extend_from_slice(args);
        ns.exec(&full)?;
    }
    Ok(())
}

/// Removes every rule and user chain of the nat and filter tables.
pub fn flush_iptables(ns: &Netns, binary: &str) -> Result<()> {
    for table in ["nat", "filter"] {
        ns.exec(&[binary, "-w", "-t", table, "-F"])?;
        ns.exec(&[binary, "-w", "-t", table, "-X"])?;
    }
    Ok(())
}
