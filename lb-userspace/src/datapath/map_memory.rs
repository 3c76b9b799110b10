//! What each pinned map costs: the kernel's own figure, the `memlock` line
//! of the map's fdinfo (what the kernel charges for it, and on cgroup v2
//! what counts against the agent's pod memory when the map was created).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use anyhow::Result;
use lb_common::map_spec;
use serde::Serialize;

use crate::datapath::loader;

/// One pinned map's size and memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub max_entries: u32,
    /// Bytes the kernel charges for the map.
    pub memory_bytes: u64,
}

/// The `memlock` figure of `fdinfo` text (a `/proc/<pid>/fdinfo/<fd>`).
pub fn parse_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What the map behind `fd` costs, from this process's fdinfo.
pub fn memory_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    parse_memlock(&text).ok_or_else(|| io::Error::other("no memlock line in the map's fdinfo"))
}

/// Every pinned map under `pin_dir` with its capacity and memory.
pub fn pinned_usage(pin_dir: &Path) -> Result<Vec<MapUsage>> {
    map_spec::ALL
        .iter()
        .map(|spec| {
            let path = loader::map_pin_path(pin_dir, spec.name);
            let data = aya::maps::MapData::from_pin(&path)
                .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
            Ok(MapUsage {
                map: spec.name,
                max_entries: data.info()?.max_entries(),
                memory_bytes: memory_of(data.fd().as_fd())?,
            })
        })
        .collect()
}

/// `lb-agent maps` as a table: each map, its capacity, its memory, and the total.
pub fn render_table(usage: &[MapUsage]) -> String {
    let mut out = format!(
        "{:<20} {:>12} {:>14}\n",
        "MAP", "MAX ENTRIES", "MEMORY (KiB)"
    );
    for u in usage {
        out.push_str(&format!(
            "{:<20} {:>12} {:>14}\n",
            u.map,
            u.max_entries,
            u.memory_bytes / 1024
        ));
    }
    let total: u64 = usage.iter().map(|u| u.memory_bytes).sum();
    out.push_str(&format!(
        "{:<20} {:>12} {:>14}\n",
        "total",
        "",
        total / 1024
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memlock_line_is_read_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2053\nmap_type:\t9\n\
                      key_size:\t16\nvalue_size:\t24\nmax_entries:\t262144\nmap_flags:\t0x0\n\
                      map_extra:\t0x0\nmemlock:\t29360128\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(parse_memlock(fdinfo), Some(29_360_128));
        assert_eq!(parse_memlock("map_type:\t1\n"), None);
    }
}
