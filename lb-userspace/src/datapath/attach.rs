//! Attaches the programs: tc ingress (or XDP, see `wire_hook`) on
//! interfaces facing the wire, tc ingress on the host side of pod veths.
//! Pod interfaces come and go with pods, so they are rescanned and new ones
//! attached.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf,
};
use lb_common::program_names;

use crate::datapath::wire_hook::{self, WireHook, WireHookMode, WireHookReason};

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic when the driver lacks it.
    Auto,
    Native,
    Generic,
}

/// Interfaces of the current network namespace: (ifindex, name).
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Shell-style match with `*` as the only wildcard.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Interfaces holding a default route of either family: where packets
/// from the wire arrive. An IPv6-only node has only an IPv6 one.
pub fn default_route_interfaces() -> Vec<String> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let (v4, v6) = (read("/proc/net/route"), read("/proc/net/ipv6_route"));
    let mut out: Vec<String> = Vec::new();
    for name in ipv4_default_route_interfaces(&v4).chain(ipv6_default_route_interfaces(&v6)) {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    }
    out
}

/// The interfaces of the default routes in `/proc/net/route` (destination
/// and mask 0).
fn ipv4_default_route_interfaces(text: &str) -> impl Iterator<Item = &str> {
    text.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then_some(f[0])
    })
}

/// The interfaces of the default routes (`::/0`) in `/proc/net/ipv6_route`:
/// destination, prefix length, source, its length, next hop, metric,
/// refcount, use, flags, device. Routes that are down or reject (the
/// kernel lists an unreachable default on `lo`) are left out.
fn ipv6_default_route_interfaces(text: &str) -> impl Iterator<Item = &str> {
    const ANY: &str = "00000000000000000000000000000000";
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
        let usable =
            flags & u32::from(libc::RTF_UP) != 0 && flags & u32::from(libc::RTF_REJECT) == 0;
        (f.len() == 10 && f[0] == ANY && f[1] == "00" && usable && f[9] != "lo").then_some(f[9])
    })
}

/// Attachments, each held by a link pinned under `<pin-dir>/links`, so the
/// data path keeps running when the agent exits or restarts. A restarted
/// agent swaps its freshly loaded program into the pinned link atomically
/// (`bpf_link_update`): packets never see the hook empty.
pub struct Attachments {
    /// Pod interfaces attached, by name, with the ifindex they had.
    pod_ifaces: BTreeMap<String, u32>,
    /// Wire interfaces: never taken for pod interfaces.
    wire_ifaces: Vec<String>,
    pod_patterns: Vec<String>,
    links_dir: PathBuf,
}

/// The hook a wire interface got, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireAttachment {
    pub interface: String,
    pub hook: WireHook,
    /// The interface's driver (`ethtool -i`), "unknown" when it has none.
    pub driver: String,
    pub reason: WireHookReason,
    pub attached: Attached,
}

impl std::fmt::Display for WireAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wire hook on {}: {} ({:?}): {}",
            self.interface,
            self.hook,
            self.attached,
            self.reason.explain(self.hook, &self.driver)
        )
    }
}

/// How an attachment came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link, now pinned.
    New(&'static str),
    /// A link pinned by a previous agent, now running this agent's program.
    Replaced,
}

impl Attachments {
    /// Loads the programs every node needs: tc on pods and on the wire,
    /// and XDP's pass-through. `lb_xdp_from_wire` is loaded when a wire
    /// interface first gets XDP (with `--wire-hook auto`, only NICs known
    /// to deliver complete checksums do), sparing its verification on
    /// nodes that never use it.
    pub fn new(ebpf: &mut Ebpf, pin_dir: &Path, pod_patterns: Vec<String>) -> Result<Self> {
        load_programs(
            ebpf,
            &[
                program_names::TC_FROM_POD,
                program_names::TC_FROM_WIRE,
                program_names::XDP_PASS,
            ],
        )?;
        let links_dir = links_dir(pin_dir);
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        Ok(Self {
            pod_ifaces: BTreeMap::new(),
            wire_ifaces: Vec::new(),
            pod_patterns,
            links_dir,
        })
    }

    fn pin_path(&self, kind: &str, iface: &str) -> PathBuf {
        self.links_dir.join(format!("{kind}_{iface}"))
    }

    /// Attaches the wire hook `mode` asks for to `iface`, and removes the
    /// other one if a previous agent left it (after the new one is in
    /// place: for that moment both run, and the second finds nothing left
    /// to translate).
    pub fn attach_wire(
        &mut self,
        ebpf: &mut Ebpf,
        iface: &str,
        mode: WireHookMode,
        xdp_mode: XdpAttachMode,
    ) -> Result<WireAttachment> {
        self.wire_ifaces.push(iface.to_owned());
        let driver = wire_hook::driver(iface).unwrap_or_else(|| "unknown".into());
        let (mut hook, mut reason) = wire_hook::choose(mode, &driver);
        let mut how = None;
        if hook == WireHook::Xdp {
            let xdp_mode = match reason {
                // Generic XDP runs on the skb blind to its checksum state.
                WireHookReason::CompleteChecksums => XdpAttachMode::Native,
                _ => xdp_mode,
            };
            match self.attach_xdp(ebpf, iface, xdp_mode) {
                Ok(attached) => how = Some(attached),
                Err(e) if reason == WireHookReason::CompleteChecksums => {
                    log::warn!("native XDP on {iface} failed ({e:#}); using tc");
                    (hook, reason) = (WireHook::Tc, WireHookReason::NoNativeXdp);
                }
                Err(e) => return Err(e),
            }
        }
        let attached = match how {
            Some(a) => a,
            None => self.attach_tc_wire(ebpf, iface)?,
        };
        match hook {
            WireHook::Tc => self.neutralize_xdp(ebpf, iface)?,
            // Detaching tcx resets nothing.
            WireHook::Xdp => {
                let _ = std::fs::remove_file(self.pin_path("tcwire", iface));
            }
        }
        Ok(WireAttachment {
            interface: iface.to_owned(),
            hook,
            driver,
            reason,
            attached,
        })
    }

    /// An XDP link a previous agent left on an interface that now gets tc
    /// keeps running, with the pass-through program swapped in atomically:
    /// detaching XDP makes veth (and many NIC drivers) reset their receive
    /// rings, dropping the packets in them. Pinned as `xdppass_<iface>`.
    fn neutralize_xdp(&self, ebpf: &mut Ebpf, iface: &str) -> Result<()> {
        let pin = self.pin_path("xdp", iface);
        let Some(fd) = adopt_pinned(&pin) else {
            return Ok(());
        };
        let pass: &mut Xdp = program(ebpf, program_names::XDP_PASS)?.try_into()?;
        match XdpLink::try_from(fd)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(pass.attach_to_link(l)?))
        {
            Ok(_) => {
                std::fs::rename(&pin, self.pin_path("xdppass", iface))
                    .with_context(|| format!("renaming {}", pin.display()))?;
                log::info!(
                    "XDP on {iface} now passes every packet to tc (left attached: detaching it would reset the device's rings)"
                );
            }
            Err(e) => {
                log::warn!(
                    "pinned XDP link {} could not be reused ({e}); detaching it",
                    pin.display()
                );
                let _ = std::fs::remove_file(&pin);
            }
        }
        Ok(())
    }

    fn attach_xdp(&self, ebpf: &mut Ebpf, iface: &str, mode: XdpAttachMode) -> Result<Attached> {
        let pin = self.pin_path("xdp", iface);
        let pass_pin = self.pin_path("xdppass", iface);
        if !pin.exists() && pass_pin.exists() {
            // A pass-through link left by a move to tc serves XDP again.
            std::fs::rename(&pass_pin, &pin)
                .with_context(|| format!("renaming {}", pass_pin.display()))?;
        }
        load_programs(ebpf, &[program_names::XDP_FROM_WIRE])?;
        let xdp: &mut Xdp = program(ebpf, program_names::XDP_FROM_WIRE)?.try_into()?;
        if let Some(fd) = adopt_pinned(&pin) {
            match XdpLink::try_from(fd)
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(xdp.attach_to_link(l)?))
            {
                Ok(_) => return Ok(Attached::Replaced),
                Err(e) => {
                    log::warn!(
                        "pinned XDP link {} could not be reused ({e}); attaching anew",
                        pin.display()
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let (id, how) = match mode {
            XdpAttachMode::Native => (xdp.attach(iface, XdpMode::Driver)?, "native"),
            XdpAttachMode::Generic => (xdp.attach(iface, XdpMode::Skb)?, "generic"),
            XdpAttachMode::Auto => match xdp.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, "native"),
                Err(e) => {
                    log::warn!("native XDP on {iface} failed ({e}); using generic XDP");
                    (
                        xdp.attach(iface, XdpMode::Skb)
                            .with_context(|| format!("attaching XDP to {iface}"))?,
                        "generic",
                    )
                }
            },
        };
        let link: FdLink = xdp
            .take_link(id)?
            .try_into()
            .context("XDP attached without a bpf_link (kernel < 5.9?)")?;
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(Attached::New(how))
    }

    fn attach_tc_wire(&self, ebpf: &mut Ebpf, iface: &str) -> Result<Attached> {
        self.attach_tc(ebpf, program_names::TC_FROM_WIRE, "tcwire", iface)
    }

    fn attach_pod(&self, ebpf: &mut Ebpf, name: &str) -> Result<Attached> {
        self.attach_tc(ebpf, program_names::TC_FROM_POD, "tc", name)
    }

    /// tc ingress (tcx) of `program` on `name`, pinned as `<kind>_<name>`.
    fn attach_tc(
        &self,
        ebpf: &mut Ebpf,
        program_name: &str,
        kind: &str,
        name: &str,
    ) -> Result<Attached> {
        let pin = self.pin_path(kind, name);
        let tc: &mut SchedClassifier = program(ebpf, program_name)?.try_into()?;
        if let Some(fd) = adopt_pinned(&pin) {
            match SchedClassifierLink::try_from(fd)
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(tc.attach_to_link(l)?))
            {
                Ok(_) => return Ok(Attached::Replaced),
                Err(e) => {
                    // A pod re-created with the same veth name: the old link died with the old veth.
                    log::info!(
                        "pinned tc link {} is stale ({e}); attaching anew",
                        pin.display()
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let id = tc.attach(name, TcAttachType::Ingress)?;
        let link: FdLink = tc
            .take_link(id)?
            .try_into()
            .context("tc attached without tcx (kernel < 6.6?)")?;
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(Attached::New("tcx"))
    }

    /// Attaches tc to pod interfaces that match the patterns and are new
    /// (or were re-created), and drops the pins of vanished ones.
    pub fn refresh_pod_interfaces(&mut self, ebpf: &mut Ebpf) -> Result<Vec<(String, Attached)>> {
        let present: BTreeMap<String, u32> = interfaces()
            .into_iter()
            .filter(|(_, n)| {
                self.pod_patterns.iter().any(|p| glob_match(p, n)) && !self.wire_ifaces.contains(n)
            })
            .map(|(i, n)| (n, i))
            .collect();
        let gone: Vec<String> = self
            .pod_ifaces
            .iter()
            .filter(|(n, i)| present.get(*n) != Some(i))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            self.pod_ifaces.remove(&name);
            if !present.contains_key(&name) {
                let _ = std::fs::remove_file(self.pin_path("tc", &name));
            }
        }
        let mut attached = Vec::new();
        for (name, index) in present {
            if self.pod_ifaces.contains_key(&name) {
                continue;
            }
            match self.attach_pod(ebpf, &name) {
                Ok(how) => {
                    self.pod_ifaces.insert(name.clone(), index);
                    attached.push((name, how));
                }
                // The veth may vanish between listing and attaching.
                Err(e) => log::warn!("attaching tc to {name}: {e:#}"),
            }
        }
        Ok(attached)
    }
}

/// Socket-level load balancing, as `--socket-lb` sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLbMode {
    /// Every socket in the cgroup: pods and the host.
    All,
    /// Sockets of the host network namespace only; pods use the per-packet
    /// path (for meshes that intercept pod traffic themselves).
    Host,
    /// Not attached: the per-packet paths do all the work.
    Off,
}

impl SocketLbMode {
    pub fn config_value(self) -> u32 {
        match self {
            SocketLbMode::All => lb_common::SOCKET_LB_ALL,
            SocketLbMode::Host => lb_common::SOCKET_LB_HOST,
            SocketLbMode::Off => lb_common::SOCKET_LB_OFF,
        }
    }
}

const SOCK_PROGRAMS: [&str; 8] = [
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_SENDMSG6,
    program_names::SOCK_RECVMSG6,
    program_names::SOCK_GETPEERNAME6,
];

impl Attachments {
    /// Attaches the socket hooks to `cgroup` (a cgroup v2 folder; the root
    /// covers every process of the node), pinned like the others. A link a
    /// previous agent pinned is replaced only after the new one is in place:
    /// for that moment both run, and the second finds nothing to translate.
    pub fn attach_cgroup(&self, ebpf: &mut Ebpf, cgroup: &Path) -> Result<()> {
        if !is_cgroup2(cgroup) {
            bail!("{} is not a cgroup v2 folder", cgroup.display());
        }
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in SOCK_PROGRAMS {
            let pin = self.pin_path("cgroup", name);
            let previous = adopt_pinned(&pin);
            let prog: &mut CgroupSockAddr = program(ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            // With bpf_link the kernel takes no flags and always lets other
            // programs (and a previous agent's link) run alongside.
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .context("cgroup hook attached without a bpf_link (kernel < 5.7?)")?;
            let tmp = pin.with_file_name(format!(
                "{}_new",
                pin.file_name().and_then(|n| n.to_str()).unwrap_or("link")
            ));
            let _ = std::fs::remove_file(&tmp);
            link.pin(&tmp)
                .with_context(|| format!("pinning {}", tmp.display()))?;
            std::fs::rename(&tmp, &pin).with_context(|| format!("replacing {}", pin.display()))?;
            // The previous agent's link goes with its last reference.
            drop(previous);
        }
        Ok(())
    }

    /// Detaches the socket hooks (mode off): their pins were their last
    /// references.
    pub fn detach_cgroup(&self) {
        for name in SOCK_PROGRAMS {
            let _ = std::fs::remove_file(self.pin_path("cgroup", name));
        }
    }
}

fn is_cgroup2(path: &Path) -> bool {
    crate::datapath::pseudo_fs::is(path, crate::datapath::pseudo_fs::CGROUP2_SUPER_MAGIC)
}

/// Makes sure `path` is a cgroup v2 folder: it is one, or it is mounted
/// there now (hosts with cgroup v1 controllers still have the v2 hierarchy,
/// it is only not mounted; its root holds every process).
pub fn ensure_cgroup2(path: &Path) -> Result<()> {
    if is_cgroup2(path) {
        return Ok(());
    }
    if path.exists() && std::fs::read_dir(path)?.next().is_some() {
        bail!(
            "{} is not a cgroup v2 folder (and not empty, so nothing is mounted over it)",
            path.display()
        );
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    crate::datapath::pseudo_fs::mount("cgroup2", path)
        .with_context(|| format!("mounting cgroup2 on {}", path.display()))?;
    log::info!("mounted the cgroup v2 hierarchy on {}", path.display());
    Ok(())
}

/// This process's network namespace cookie (SO_NETNS_COOKIE).
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("a socket to ask")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt SO_NETNS_COOKIE");
    }
    Ok(cookie)
}

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// The wire hooks pinned under `pin_dir`: (interface, hook), by interface.
pub(crate) fn pinned_wire_hooks(pin_dir: &Path) -> Vec<(String, WireHook)> {
    let mut out: Vec<(String, WireHook)> = std::fs::read_dir(links_dir(pin_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("tcwire_") {
                Some((iface.to_owned(), WireHook::Tc))
            } else {
                name.strip_prefix("xdp_")
                    .map(|iface| (iface.to_owned(), WireHook::Xdp))
            }
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Pod interfaces with tc pinned under `pin_dir`.
pub(crate) fn pinned_pod_hooks(pin_dir: &Path) -> Vec<String> {
    pinned_links_named(pin_dir, "tc_")
}

/// The pinned links whose names start with `prefix`, without it, sorted.
pub(crate) fn pinned_links_named(pin_dir: &Path, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(links_dir(pin_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix(prefix)
                .map(str::to_owned)
        })
        .collect();
    out.sort();
    out
}

fn adopt_pinned(pin: &Path) -> Option<FdLink> {
    if !pin.exists() {
        return None;
    }
    match PinnedLink::from_pin(pin) {
        Ok(p) => Some(FdLink::from(p)),
        Err(e) => {
            log::warn!("cannot open pinned link {}: {e}", pin.display());
            let _ = std::fs::remove_file(pin);
            None
        }
    }
}

/// Loads (verifies) the named XDP and tc programs that are not loaded
/// yet, one thread each: the verifier's time is most of the agent's start
/// (about 0.45 s for each program that carries the NAT core), and each
/// program is verified on its own.
fn load_programs(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    let wanted: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, p)| names.contains(name) && p.fd().is_err())
        .collect();
    std::thread::scope(|scope| {
        let loads: Vec<_> = wanted
            .into_iter()
            .map(|(name, p)| scope.spawn(move || load_program(name, p)))
            .collect();
        // Scoped: every thread is joined before this returns, also when
        // one failed.
        loads.into_iter().try_for_each(|l| {
            l.join()
                .unwrap_or_else(|_| bail!("a program loader thread panicked"))
        })
    })
}

/// Loads one program; the kernel says only EPERM/EACCES (or a verifier
/// line), so the error names what a container must add.
fn load_program(name: &str, p: &mut Program) -> Result<()> {
    let (kind, loaded) = match p {
        Program::Xdp(x) => ("XDP", x.load()),
        Program::SchedClassifier(t) => ("tc", t.load()),
        _ => bail!("{name} is not an XDP or tc program"),
    };
    loaded.with_context(|| {
        format!("loading the {kind} program {name} (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)")
    })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    match ebpf.program_mut(name) {
        Some(p) => Ok(p),
        None => bail!("program {name} missing from the BPF object"),
    }
}

#[cfg(test)]
mod tests {
    use super::{glob_match, ipv4_default_route_interfaces, ipv6_default_route_interfaces};

    #[test]
    fn default_routes_of_both_families_name_the_wire() {
        let v4 =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            ipv4_default_route_interfaces(v4).collect::<Vec<_>>(),
            ["eth0"]
        );
        let any = "00000000000000000000000000000000";
        let v6 = format!(
            "{any} 00 {any} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 ens5\n\
             fd000077000000000000000000000000 40 {any} 00 {any} 00000100 00000001 00000000 00000001 ens5\n\
             {any} 00 {any} 00 {any} ffffffff 00000001 00000000 00200200 lo\n\
             {any} 00 {any} 00 {any} 00000400 00000001 00000000 00000000 eth9\n"
        );
        assert_eq!(
            ipv6_default_route_interfaces(&v6).collect::<Vec<_>>(),
            ["ens5"],
            "the up, non-reject ::/0 only"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("lxc*", "lxc12ab"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(glob_match("v*h*", "veth9"));
        assert!(!glob_match("lxc*", "eth0"));
        assert!(glob_match("a*c", "abc"));
        assert!(!glob_match("ab*bc", "abc"));
    }
}
