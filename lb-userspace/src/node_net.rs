//! This node's network facts the data path depends on: the IPv4 addresses
//! of its interfaces (NodePort addresses, the masquerade source) and the
//! interface setting masqueraded traffic needs.

use std::{collections::BTreeMap, ffi::CStr, fs, net::Ipv4Addr};

use anyhow::{Context, Result};

use crate::model::Ipv4Prefix;

/// IPv4 addresses of every interface, by interface name, in the kernel's order.
pub fn interface_addresses() -> Result<BTreeMap<String, Vec<Ipv4Addr>>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null sockaddr; its family says how to read it.
        if unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.entry(name).or_default().push(addr);
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The addresses NodePorts are served on: with `filter` (kube-proxy's
/// --nodeport-addresses), every local address inside one of its prefixes;
/// without, the addresses of the interfaces facing the wire.
pub fn nodeport_addresses(
    all: &BTreeMap<String, Vec<Ipv4Addr>>,
    wire: &[String],
    filter: &[Ipv4Prefix],
) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = if filter.is_empty() {
        wire.iter()
            .filter_map(|w| all.get(w))
            .flatten()
            .copied()
            .collect()
    } else {
        all.values()
            .flatten()
            .copied()
            .filter(|a| filter.iter().any(|p| p.contains(*a)))
            .collect()
    };
    out.retain(|a| !a.is_loopback());
    out.dedup();
    out
}

/// Lets `iface` accept packets whose source is a local address. XDP hands
/// masqueraded flows (source: the node) and translated replies of NodePort
/// flows (source: a node address) to the kernel as if they came from the
/// wire, and input routing drops such packets otherwise.
pub fn set_accept_local(iface: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    fs::write(&path, "1").with_context(|| format!("writing 1 to {path}"))
}
