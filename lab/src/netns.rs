//! Network namespaces and processes the lab creates, each removed by a
//! guard when dropped (also on panic), and a sweep for the leftovers of
//! runs that were killed.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Names of everything a lab creates start with this, then the pid of the
/// process that made it: the sweep removes what dead processes left.
pub(crate) const NETNS_PREFIX: &str = "lbt-";
/// Where the lab mounts (once) the cgroup v2 hierarchy for its cgroups.
pub(crate) const LAB_CGROUP_ROOT: &str = "/run/lb-lab/cgroupv2";

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
        // No duplicate address detection: IPv6 addresses (link-local ones
        // included) are usable at once, not tentative for a second.
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
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

    /// The kernel's checksum error counters in this namespace, both
    /// families: (TcpInCsumErrors, UdpInCsumErrors + Udp6InCsumErrors,
    /// IcmpInCsumErrors + Icmp6InCsumErrors), as `nstat` reports them
    /// (TCP counts both families in one counter).
    pub fn checksum_errors(&self) -> (u64, u64, u64) {
        let (snmp, snmp6) = self.run_in(|| {
            (
                fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp"),
                // Absent when the kernel has no IPv6.
                fs::read_to_string("/proc/thread-self/net/snmp6").unwrap_or_default(),
            )
        });
        (
            snmp_counter(&snmp, "Tcp:", "InCsumErrors"),
            snmp_counter(&snmp, "Udp:", "InCsumErrors") + snmp6_counter(&snmp6, "Udp6InCsumErrors"),
            snmp_counter(&snmp, "Icmp:", "InCsumErrors")
                + snmp6_counter(&snmp6, "Icmp6InCsumErrors"),
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

/// A counter of /proc/net/snmp6 (one `Name value` per line).
fn snmp6_counter(snmp6: &str, field: &str) -> u64 {
    snmp6
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(char::is_whitespace)?;
            (name == field).then(|| value.trim().parse().ok())?
        })
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

/// Removes namespaces and pins left by lab processes that no longer exist
/// (a test killed with SIGKILL cannot run its guards).
pub(crate) fn sweep_stale() {
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
                // A container test's folder holds the agent's pin folder.
                let _ = lb_userspace::datapath::loader::cleanup(&e.path().join("lb-agent"));
                let _ = lb_userspace::datapath::loader::cleanup(&e.path());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    // A lab's folder (agent log, manifests) of a process that was killed.
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) && e.path().is_dir() {
                let _ = fs::remove_dir_all(e.path());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_both_snmp_formats() {
        let snmp = "Udp: InDatagrams NoPorts InErrors InCsumErrors\nUdp: 10 0 2 2\n";
        assert_eq!(snmp_counter(snmp, "Udp:", "InCsumErrors"), 2);
        assert_eq!(snmp_counter(snmp, "Tcp:", "InCsumErrors"), 0);
        let snmp6 = "Icmp6InCsumErrors               \t3\nUdp6InCsumErrors                \t0\n";
        assert_eq!(snmp6_counter(snmp6, "Icmp6InCsumErrors"), 3);
        assert_eq!(snmp6_counter(snmp6, "Udp6InCsumErrors"), 0);
        assert_eq!(snmp6_counter(snmp6, "UdpLite6InCsumErrors"), 0);
    }
}
