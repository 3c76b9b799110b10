//! This node's network facts the data path depends on: the IPv4 and IPv6
//! addresses of its interfaces (NodePort addresses, the masquerade
//! sources) and the interface setting masqueraded traffic needs.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};

use crate::model::IpPrefix;

/// The address of an interface address entry, if it is one of a family
/// the data path serves and not link-local IPv6 (fe80::/10: no Service
/// traffic arrives for it, and it needs an interface to mean anything).
///
/// # Safety
/// `sa` points at a sockaddr whose `sa_family` says its real type.
unsafe fn served_address(sa: *const libc::sockaddr) -> Option<IpAddr> {
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
            (!link_local).then_some(IpAddr::V6(a))
        }
        _ => None,
    }
}

/// IPv4 and IPv6 (not link-local) addresses of every interface, by
/// interface name, in the kernel's order.
pub fn interface_addresses() -> Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
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
        let Some(addr) = (unsafe { served_address(ifa.ifa_addr) }) else {
            continue;
        };
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
    all: &BTreeMap<String, Vec<IpAddr>>,
    wire: &[String],
    filter: &[IpPrefix],
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = if filter.is_empty() {
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
///
/// Set over rtnetlink (RTM_SETLINK, IFLA_INET_CONF), not by writing
/// /proc/sys: container runtimes mount /proc/sys read-only in every
/// container that is not privileged, and CAP_NET_ADMIN is all this needs.
pub fn set_accept_local(iface: &str) -> Result<()> {
    let name = std::ffi::CString::new(iface).context("interface name")?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("interface {iface}"));
    }
    set_ipv4_devconf(index, IPV4_DEVCONF_ACCEPT_LOCAL, 1).with_context(|| {
        format!("setting net.ipv4.conf.{iface}.accept_local=1 (needs CAP_NET_ADMIN)")
    })?;
    // What the kernel now holds, read back (reading works on a read-only
    // /proc/sys).
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    match fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(v) => anyhow::bail!("{path} is {} after setting it to 1", v.trim()),
        Err(e) => Err(e).with_context(|| format!("reading {path}")),
    }
}

const NETLINK_ROUTE: libc::c_int = 0;
const RTM_SETLINK: u16 = 19;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET_CONF: u16 = 1;
/// `IPV4_DEVCONF_ACCEPT_LOCAL` of linux/ip.h.
const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;

/// Sets one IPv4 per-interface setting (what /proc/sys/net/ipv4/conf/IF/*
/// shows) of interface `index` with one RTM_SETLINK and waits for its ack.
fn set_ipv4_devconf(index: u32, setting: u16, value: u32) -> Result<()> {
    // nlattr: length (header included), type; payloads padded to 4 bytes.
    let attr = |kind: u16, payload: &[u8]| {
        let mut a = Vec::with_capacity(4 + payload.len());
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a
    };
    let conf = attr(setting, &value.to_ne_bytes());
    let af_spec = attr(
        IFLA_AF_SPEC,
        &attr(libc::AF_INET as u16, &attr(IFLA_INET_CONF, &conf)),
    );
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifinfo = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    ifinfo.extend_from_slice(&(index as i32).to_ne_bytes());
    ifinfo.extend_from_slice(&[0; 8]);
    let len = 16 + ifinfo.len() + af_spec.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&ifinfo);
    msg.extend_from_slice(&af_spec);

    let sock = Netlink::open(NETLINK_ROUTE)?;
    sock.send(&msg).context("RTM_SETLINK")?;
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).context("RTM_SETLINK ack")?;
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(-err)).context("RTM_SETLINK");
        }
        return Ok(());
    }
    anyhow::bail!("RTM_SETLINK: no netlink ack")
}

/// Destroys the UDP sockets of this network namespace connected to
/// `backends` (sock_diag SOCK_DESTROY, what `ss -K` does): a socket
/// connected at connect() time to a backend that is gone would otherwise
/// send into the void for its whole life. The application gets
/// ECONNABORTED and, like a resolver does, connects again, to a live
/// backend. Both families: an IPv6 socket connected to an IPv4-mapped
/// address (`::ffff:a.b.c.d`) counts as connected to that IPv4 backend.
/// Returns how many sockets were closed.
pub fn destroy_udp_sockets_to(backends: &[std::net::SocketAddr]) -> Result<usize> {
    let diag = Netlink::open(NETLINK_SOCK_DIAG)?;
    let mut closed = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for id in diag.udp_sockets(family)? {
            if !backends.contains(&sockid_destination(family, &id)) {
                continue;
            }
            match diag.destroy_udp(family, &id) {
                Ok(()) => closed += 1,
                // Closed meanwhile by its owner.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("SOCK_DESTROY"),
            }
        }
    }
    if closed > 0 {
        log::info!("closed {closed} UDP socket(s) connected to deleted backends {backends:?}");
    }
    Ok(closed)
}

/// The destination of an `inet_diag_sockid` (sport, dport, src[16],
/// dst[16], if, cookie) of `family`; an IPv4-mapped one as IPv4.
fn sockid_destination(family: u8, id: &[u8; SOCKID_LEN]) -> std::net::SocketAddr {
    let port = u16::from_be_bytes([id[2], id[3]]);
    let ip = if family == libc::AF_INET as u8 {
        std::net::IpAddr::V4(Ipv4Addr::from(u32::from_be_bytes(
            id[20..24].try_into().unwrap(),
        )))
    } else {
        let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&id[20..36]).unwrap());
        v6.to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
    };
    std::net::SocketAddr::new(ip, port)
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;

/// A netlink socket (closed on drop): sock_diag, or rtnetlink for settings.
struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    fn open(protocol: libc::c_int) -> Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("netlink socket (protocol {protocol})"));
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid fd and option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self(fd))
    }

    fn raw(&self) -> libc::c_int {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    /// nlmsghdr + inet_diag_req_v2 for UDP over `family`, all states.
    fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
        let len = 16 + 8 + SOCKID_LEN;
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        m.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
        m.extend_from_slice(id);
        m
    }

    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::send(self.raw(), msg.as_ptr() as *const _, msg.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(self.raw(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The `inet_diag_sockid` of every UDP socket of `family` in the
    /// namespace.
    fn udp_sockets(&self, family: u8) -> Result<Vec<[u8; SOCKID_LEN]>> {
        self.send(&Self::request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[0; SOCKID_LEN],
        ))
        .context("sock_diag dump request")?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: a dump ends with NLMSG_DONE; 100,000 reads is far past
        // any real number of sockets.
        for _ in 0..100_000 {
            let n = self.recv(&mut buf).context("sock_diag dump")?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                if len < 16 || off + len > n {
                    anyhow::bail!("malformed sock_diag message");
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let err = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                        return Err(std::io::Error::from_raw_os_error(-err))
                            .context("sock_diag dump");
                    }
                    SOCK_DIAG_BY_FAMILY if len >= 16 + 4 + SOCKID_LEN => {
                        let id = &buf[off + 16 + 4..off + 16 + 4 + SOCKID_LEN];
                        out.push(id.try_into().unwrap());
                    }
                    _ => {}
                }
                off += (len + 3) & !3;
            }
        }
        anyhow::bail!("sock_diag dump did not end")
    }

    fn destroy_udp(&self, family: u8, id: &[u8; SOCKID_LEN]) -> std::io::Result<()> {
        self.send(&Self::request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            family,
            id,
        ))?;
        let mut buf = [0u8; 256];
        let n = self.recv(&mut buf)?;
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(-err));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sockid_destinations_of_both_families_and_ipv4_mapped_ones() {
        let mut id = [0u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[20..24].copy_from_slice(&[10, 244, 0, 5]);
        let v4: std::net::SocketAddr = "10.244.0.5:53".parse().unwrap();
        assert_eq!(sockid_destination(libc::AF_INET as u8, &id), v4);
        let mapped: std::net::Ipv6Addr = "::ffff:10.244.0.5".parse().unwrap();
        id[20..36].copy_from_slice(&mapped.octets());
        assert_eq!(sockid_destination(libc::AF_INET6 as u8, &id), v4);
        let v6: std::net::Ipv6Addr = "fd00:10:244::5".parse().unwrap();
        id[20..36].copy_from_slice(&v6.octets());
        let want: std::net::SocketAddr = "[fd00:10:244::5]:53".parse().unwrap();
        assert_eq!(sockid_destination(libc::AF_INET6 as u8, &id), want);
    }

    use super::*;

    fn sockaddr6(a: Ipv6Addr) -> libc::sockaddr_in6 {
        // SAFETY: all-zero is a valid sockaddr_in6.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = a.octets();
        sa
    }

    #[test]
    fn global_ipv6_addresses_count_and_link_local_ones_do_not() {
        let read = |a: &str| {
            let sa = sockaddr6(a.parse().unwrap());
            // SAFETY: a sockaddr_in6 whose family says so.
            unsafe { served_address(std::ptr::from_ref(&sa).cast()) }
        };
        assert_eq!(read("fd00:1::1"), Some("fd00:1::1".parse().unwrap()));
        assert_eq!(read("2001:db8::5"), Some("2001:db8::5".parse().unwrap()));
        assert_eq!(read("fe80::1"), None);
        assert_eq!(read("febf::1"), None);
    }

    #[test]
    fn nodeport_addresses_of_both_families_from_the_wire_or_the_filter() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let all = BTreeMap::from([
            ("eth0".to_owned(), vec![ip("10.0.0.1"), ip("fd00:1::1")]),
            ("lo".to_owned(), vec![ip("127.0.0.1"), ip("::1")]),
            (
                "eth1".to_owned(),
                vec![ip("192.168.1.1"), ip("2001:db8::1")],
            ),
        ]);
        let wire = ["eth0".to_owned()];
        assert_eq!(
            nodeport_addresses(&all, &wire, &[]),
            [ip("10.0.0.1"), ip("fd00:1::1")]
        );
        let filter: Vec<IpPrefix> = ["2001:db8::/32", "0.0.0.0/0", "::/0"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let mut got = nodeport_addresses(&all, &wire, &filter);
        got.sort();
        assert_eq!(
            got,
            [
                ip("10.0.0.1"),
                ip("192.168.1.1"),
                ip("2001:db8::1"),
                ip("fd00:1::1")
            ]
        );
    }
}
