//! Which program serves an interface facing the wire, and why.
//!
//! A packet can reach the wire hook with only a partial L4 checksum (the
//! sender's stack left the rest to "hardware") whenever the interface's
//! peer is software: a veth whose other end keeps checksum offload on, as
//! in a node that is a container (kind, k3d, containerlab), a tap, a
//! netkit. XDP cannot see that state, and its software checksum update is
//! wrong for it. tc (tcx) works on the skb, whose checksum helpers are
//! right in every state, so tc is the default; XDP is an acceleration for
//! drivers of real NICs, whose packets come off a wire with complete
//! checksums.

use std::fmt;

/// `--wire-hook`: how the hook of each wire interface is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WireHookMode {
    /// XDP (native) on drivers known to deliver complete checksums, tc
    /// everywhere else.
    Auto,
    /// tc (tcx) on every wire interface.
    Tc,
    /// XDP on every wire interface, whatever its driver (`--xdp-mode`).
    Xdp,
}

/// The program an interface got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireHook {
    Tc,
    Xdp,
}

impl WireHook {
    pub fn name(self) -> &'static str {
        match self {
            WireHook::Tc => "tc",
            WireHook::Xdp => "xdp",
        }
    }
}

impl fmt::Display for WireHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an interface got its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireHookReason {
    /// `--wire-hook tc` or `xdp`.
    Chosen,
    /// A NIC driver whose packets carry complete checksums.
    CompleteChecksums,
    /// A software device (veth, tun, ...) or a driver not known to deliver
    /// complete checksums.
    MaybePartialChecksums,
    /// The driver has no native XDP here (XDP's generic mode runs on the
    /// skb without seeing its checksum state, so tc is used instead).
    NoNativeXdp,
}

impl WireHookReason {
    /// A label value for metrics.
    pub fn label(self) -> &'static str {
        match self {
            WireHookReason::Chosen => "chosen",
            WireHookReason::CompleteChecksums => "complete_checksums",
            WireHookReason::MaybePartialChecksums => "maybe_partial_checksums",
            WireHookReason::NoNativeXdp => "no_native_xdp",
        }
    }

    /// The reason in words, for logs and `lb-agent status`.
    pub(crate) fn explain(self, hook: WireHook, driver: &str) -> String {
        match (self, hook) {
            (WireHookReason::Chosen, WireHook::Xdp) if !complete_checksums(driver) => format!(
                "chosen by --wire-hook xdp; driver {driver} may deliver partial checksums, which XDP corrupts"
            ),
            (WireHookReason::Chosen, _) => format!("chosen by --wire-hook {hook}"),
            (WireHookReason::CompleteChecksums, _) => {
                format!("driver {driver} delivers complete checksums: XDP is safe and faster")
            }
            (WireHookReason::MaybePartialChecksums, _) => format!(
                "driver {driver} may deliver partial checksums (a software peer): tc handles every checksum state"
            ),
            (WireHookReason::NoNativeXdp, _) => {
                format!("driver {driver} has no native XDP here: tc instead of generic XDP")
            }
        }
    }
}

/// NIC drivers whose received packets carry complete checksums, so XDP's
/// software update is right. virtio_net is one: attaching XDP turns its
/// guest checksum offload off, so the host finalizes checksums.
const COMPLETE_CHECKSUM_DRIVERS: &[&str] = &[
    "virtio_net",
    "ixgbe",
    "ixgbevf",
    "i40e",
    "iavf",
    "ice",
    "idpf",
    "igb",
    "igc",
    "mlx4_en",
    "mlx5_core",
    "bnxt_en",
    "ena",
    "gve",
    "nfp",
    "qede",
    "sfc",
    "mvneta",
    "mvpp2",
    "stmmac",
    "fec",
    "lan743x",
    "ionic",
];

/// Whether `driver` is one whose packets carry complete checksums.
pub(crate) fn complete_checksums(driver: &str) -> bool {
    COMPLETE_CHECKSUM_DRIVERS.contains(&driver)
}

/// The hook `mode` asks for on an interface with `driver` (native XDP is
/// then tried; see [`WireHookReason::NoNativeXdp`]).
pub fn choose(mode: WireHookMode, driver: &str) -> (WireHook, WireHookReason) {
    match mode {
        WireHookMode::Tc => (WireHook::Tc, WireHookReason::Chosen),
        WireHookMode::Xdp => (WireHook::Xdp, WireHookReason::Chosen),
        WireHookMode::Auto if complete_checksums(driver) => {
            (WireHook::Xdp, WireHookReason::CompleteChecksums)
        }
        WireHookMode::Auto => (WireHook::Tc, WireHookReason::MaybePartialChecksums),
    }
}

/// The kernel's `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h):
/// the ioctl answers for the caller's network namespace, where sysfs shows
/// the one it was mounted in.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// ETHTOOL_GDRVINFO from the same header.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// The driver of interface `iface` (`ethtool -i`), or None when the
/// device answers no driver query.
pub fn driver(iface: &str) -> Option<String> {
    // SAFETY: zeroed is a valid value of both plain C structs.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a drvinfo.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_uses_xdp_only_where_checksums_are_complete() {
        assert_eq!(
            choose(WireHookMode::Auto, "veth"),
            (WireHook::Tc, WireHookReason::MaybePartialChecksums)
        );
        assert_eq!(
            choose(WireHookMode::Auto, "tun").0,
            WireHook::Tc,
            "a tap's peer is software"
        );
        assert_eq!(choose(WireHookMode::Auto, "").0, WireHook::Tc, "unknown");
        assert_eq!(
            choose(WireHookMode::Auto, "mlx5_core"),
            (WireHook::Xdp, WireHookReason::CompleteChecksums)
        );
        assert_eq!(choose(WireHookMode::Auto, "virtio_net").0, WireHook::Xdp);
    }

    #[test]
    fn a_chosen_hook_is_kept_and_its_risk_said() {
        assert_eq!(
            choose(WireHookMode::Xdp, "veth"),
            (WireHook::Xdp, WireHookReason::Chosen)
        );
        assert_eq!(choose(WireHookMode::Tc, "ixgbe").0, WireHook::Tc);
        let why = WireHookReason::Chosen.explain(WireHook::Xdp, "veth");
        assert!(why.contains("partial checksums"), "{why}");
    }

    #[test]
    fn the_driver_of_loopback_is_read() {
        // Loopback answers no drvinfo on most kernels; either way no panic,
        // and an interface that does not exist has none.
        let _ = driver("lo");
        assert_eq!(driver("no-such-if0"), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }
}
