//! The wire between the lab's nodes and its external client, in the two
//! kinds real clusters have: a software peer that leaves checksum offload
//! on (a node that is a container: kind, k3d; packets arrive with partial
//! checksums) and a NIC-like one whose senders finalize checksums (a
//! physical network).

use anyhow::{Context, Result};

use crate::netns::{run, Netns};

/// What the wire hands the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// veths with default offloads: partial checksums cross the wire. The
    /// agent's `--wire-hook auto` puts tc here.
    Software,
    /// Senders finalize checksums (tx offload off), as NICs deliver them;
    /// the lab's agents are told `--wire-hook xdp` there, the hook auto
    /// would choose on such a NIC.
    Nic,
}

impl Wire {
    pub const ALL: [Wire; 2] = [Wire::Software, Wire::Nic];

    /// The flags every agent on this wire starts with.
    pub fn agent_flags(self) -> Vec<String> {
        match self {
            Wire::Software => Vec::new(),
            Wire::Nic => vec!["--wire-hook".into(), "xdp".into()],
        }
    }

    /// Prepares the sending side of wire interface `iface` in namespace `ns`.
    pub(crate) fn configure(self, ns: &str, iface: &str) -> Result<()> {
        if self == Wire::Nic {
            run(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", iface, "tx", "off",
            ])?;
        }
        Ok(())
    }

    /// Whether the peers of a node's wire interface run the pass-through
    /// XDP program: a veth wakes its peer for frames the node's XDP sends
    /// back (XDP_TX: a RST, an ICMP error) only when the peer runs XDP
    /// itself (a NIC needs nothing of the sort); tc's answers need none.
    pub(crate) fn peers_need_xdp(self) -> bool {
        self == Wire::Nic
    }
}

/// A veth pair: `a_if` in namespace `a`, `b_if` in `b`, both up.
pub fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
    run(&[
        "ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
    ])
    .with_context(|| format!("veth {a}:{a_if} <-> {b}:{b_if}"))?;
    run(&["ip", "-n", a, "link", "set", a_if, "up"])?;
    run(&["ip", "-n", b, "link", "set", b_if, "up"])?;
    Ok(())
}

/// Adds `addr/prefix` (either family) to `iface` of namespace `ns`; an
/// IPv6 one without duplicate address detection, usable at once.
pub fn address(ns: &str, iface: &str, cidr: &str) -> Result<()> {
    let mut cmd = vec!["ip", "-n", ns, "addr", "add", cidr, "dev", iface];
    if cidr.contains(':') {
        cmd.push("nodad");
    }
    run(&cmd)?;
    Ok(())
}

/// Adds a route to `cidr` via `gateway` in namespace `ns` (either family:
/// `ip` takes it from the addresses).
pub fn route(ns: &str, cidr: &str, gateway: &str) -> Result<()> {
    run(&["ip", "-n", ns, "route", "add", cidr, "via", gateway])?;
    Ok(())
}

/// Forwarding on (both families), reverse path filtering off: a node
/// routes for its pods.
pub(crate) fn make_router(ns: &Netns) -> Result<()> {
    ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        "net.ipv6.conf.all.forwarding=1",
    ])?;
    Ok(())
}

/// Attaches the object's pass-through XDP program to `eth0` of the
/// current network namespace (see `lb_xdp_pass`).
pub(crate) fn attach_xdp_pass() -> Result<aya::Ebpf> {
    attach_xdp_pass_to("eth0")
}

/// The same on interface `iface`.
pub(crate) fn attach_xdp_pass_to(iface: &str) -> Result<aya::Ebpf> {
    let mut ebpf = aya::Ebpf::load(lb_userspace::EBPF_OBJECT)?;
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(lb_common::program_names::XDP_PASS)
        .context("lb_xdp_pass missing from the BPF object")?
        .try_into()?;
    prog.load()?;
    prog.attach(iface, aya::programs::XdpMode::Driver)?;
    Ok(ebpf)
}
