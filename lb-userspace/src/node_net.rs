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

/// Destroys the UDP sockets of this network namespace connected to
/// `backends` (`ss -K`, sock_diag SOCK_DESTROY): a socket connected at
/// connect() time to a backend that is gone would otherwise send into the
/// void for its whole life. The application gets ECONNABORTED and, like a
/// resolver does, connects again, to a live backend.
pub fn destroy_udp_sockets_to(backends: &[std::net::SocketAddrV4]) -> Result<()> {
    // One filter per call, bounded: ss takes `dst A:P or dst B:Q ...`.
    for chunk in backends.chunks(64) {
        let mut args: Vec<String> = vec!["-K".into(), "-u".into(), "-n".into(), "-H".into()];
        for (i, b) in chunk.iter().enumerate() {
            if i > 0 {
                args.push("or".into());
            }
            args.push("dst".into());
            args.push(b.to_string());
        }
        let out = std::process::Command::new("ss")
            .args(&args)
            .output()
            .context("running ss -K (iproute2)")?;
        if !out.status.success() {
            anyhow::bail!(
                "ss -K failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let n = String::from_utf8_lossy(&out.stdout).lines().count();
        if n > 0 {
            log::info!("closed {n} UDP socket(s) connected to deleted backends {chunk:?}");
        }
    }
    Ok(())
}
