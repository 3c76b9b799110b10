//! A memory cgroup with a limit, as a pod's container gets from
//! `resources.limits.memory`: what a process in it is charged (its pages,
//! and the kernel memory of the BPF maps it creates), its peak, and whether
//! the limit killed anything. cgroup v2 where the memory controller is
//! there, else v1's memory hierarchy (hybrid machines); removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::LAB_CGROUP_ROOT;

const V1_MEMORY: &str = "/sys/fs/cgroup/memory";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

pub struct MemoryCgroup {
    pub path: PathBuf,
    pub version: CgroupVersion,
}

impl MemoryCgroup {
    /// Creates cgroup `name` limited to `limit` bytes, without swap.
    pub fn create(name: &str, limit: u64) -> Result<Self> {
        let v2_root = Path::new(LAB_CGROUP_ROOT);
        lb_userspace::datapath::attach::ensure_cgroup2(v2_root)?;
        let v2 = fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let cg = if v2 {
            // Children get the controller only when the parent hands it down.
            fs::write(v2_root.join("cgroup.subtree_control"), "+memory")
                .context("enabling the memory controller for the lab's cgroups")?;
            Self {
                path: v2_root.join(name),
                version: CgroupVersion::V2,
            }
        } else if Path::new(V1_MEMORY).join("memory.limit_in_bytes").exists() {
            Self {
                path: Path::new(V1_MEMORY).join(name),
                version: CgroupVersion::V1,
            }
        } else {
            bail!("no memory controller: neither cgroup v2's nor a v1 hierarchy at {V1_MEMORY}");
        };
        fs::create_dir_all(&cg.path).with_context(|| format!("creating {}", cg.path.display()))?;
        cg.set_limit(limit)?;
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        fs::write(self.path.join(file), value)
            .with_context(|| format!("writing {value} to {}", self.path.join(file).display()))
    }

    fn read_u64(&self, file: &str) -> Result<u64> {
        let p = self.path.join(file);
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: {text:?}", p.display()))
    }

    fn set_limit(&self, limit: u64) -> Result<()> {
        match self.version {
            CgroupVersion::V2 => {
                self.write("memory.max", &limit.to_string())?;
                if self.path.join("memory.swap.max").exists() {
                    self.write("memory.swap.max", "0")?;
                }
            }
            CgroupVersion::V1 => {
                self.write("memory.limit_in_bytes", &limit.to_string())?;
                // memory+swap no higher than memory: no swapping out of it.
                if self.path.join("memory.memsw.limit_in_bytes").exists() {
                    self.write("memory.memsw.limit_in_bytes", &limit.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The file a process writes its pid to, to join.
    pub(crate) fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// A command prefix that moves itself into this cgroup, then execs
    /// the rest: `sh -c '...' PROCS PROGRAM ARGS...`.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            self.procs_file().to_string_lossy().into_owned(),
        ]
    }

    /// The most ever charged, in bytes (pages, page cache and kernel
    /// memory, the BPF maps included).
    pub fn peak(&self) -> Result<u64> {
        match self.version {
            CgroupVersion::V2 => self.read_u64("memory.peak"),
            CgroupVersion::V1 => self.read_u64("memory.max_usage_in_bytes"),
        }
    }

    /// Charged now, in bytes.
    pub fn current(&self) -> Result<u64> {
        match self.version {
            CgroupVersion::V2 => self.read_u64("memory.current"),
            CgroupVersion::V1 => self.read_u64("memory.usage_in_bytes"),
        }
    }

    /// Processes the limit killed.
    pub fn oom_kills(&self) -> Result<u64> {
        let (file, key) = match self.version {
            CgroupVersion::V2 => ("memory.events", "oom_kill "),
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill "),
        };
        let text = fs::read_to_string(self.path.join(file))?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Bounded: the processes in it are the caller's to stop first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && self.path.exists() {
            if Instant::now() > deadline {
                eprintln!("memcg: {} not removed", self.path.display());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A Kubernetes memory quantity (`256Mi`, `1Gi`, `500M`, `1000`) in bytes.
pub fn parse_quantity(q: &str) -> Result<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let n: u64 = number.parse().with_context(|| format!("quantity {q:?}"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => bail!("quantity {q:?}: unit {suffix:?} not handled"),
    };
    Ok(n * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_quantity("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity("1000").unwrap(), 1000);
        assert!(parse_quantity("1.5Gi").is_err());
    }
}
