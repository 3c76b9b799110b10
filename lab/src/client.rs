//! Clients the tests run inside lab namespaces: one TCP line, one UDP
//! datagram, one HTTP GET, and a reader of Prometheus text. Each takes an
//! address of either family (`SocketAddrV4`, `SocketAddrV6`, `SocketAddr`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

/// Sends one line over a new TCP connection and returns the answer line.
pub fn tcp_ask(to: impl Into<SocketAddr>, msg: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    ask_on(&mut s, msg)
}

/// Sends one line on an open connection and reads one answer line.
pub fn ask_on(s: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    s.write_all(format!("{msg}\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before answering",
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
        if answer.len() > 512 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Sends one UDP datagram and returns the answer, with its source address.
pub fn udp_ask(
    to: impl Into<SocketAddr>,
    msg: &str,
    timeout: Duration,
) -> std::io::Result<(String, SocketAddr)> {
    let to = to.into();
    let s = UdpSocket::bind(unspecified_of(&to))?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// The any-address and port 0 of `to`'s family: where a client binds.
pub fn unspecified_of(to: &SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub fn http_get(
    to: impl Into<SocketAddr>,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let to = to.into();
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not HTTP"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Sum of a metric's samples (Prometheus text) whose line starts with
/// `name` and contains every one of `parts`.
pub fn metric_sum(metrics: &str, name: &str, parts: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One ICMPv6 echo to `to`, answered within `timeout` (the lab has no
/// `ping`): proves neighbour discovery and routing both ways. A raw
/// ICMPv6 socket, so it needs CAP_NET_RAW, as lab tests have; the kernel
/// fills in the checksum.
pub fn ping6(to: std::net::Ipv6Addr, timeout: Duration) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let last = std::io::Error::last_os_error;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid fd, option value and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let id = (std::process::id() as u16).to_be_bytes();
    // Echo request: type 128, code 0, checksum (the kernel's), id, seq 1.
    let request = [128u8, 0, 0, 0, id[0], id[1], 0, 1, b'l', b'a', b'b'];
    // SAFETY: an all-zero sockaddr_in6 is valid; the fields are set next.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_addr.s6_addr = to.octets();
    // SAFETY: valid fd, buffer and address of the given lengths.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(last());
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while std::time::Instant::now() < deadline {
        // SAFETY: valid fd and buffer; the socket times out every 100 ms.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        // Raw ICMPv6 sockets get the ICMPv6 message without the IPv6 header.
        if n >= 8 && buf[0] == 129 && buf[4..6] == id {
            return Ok(());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no echo reply from {to} in {timeout:?}"),
    ))
}

/// Sets don't-fragment on an IPv4 socket and has the kernel keep the path
/// MTU that ICMP reports (IP_PMTUDISC_DO).
pub fn set_dont_fragment(s: &UdpSocket) -> std::io::Result<()> {
    let on: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a valid socket and an int option of its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// On a connected UDP socket: sends `full` bytes of payload (the wire's
/// MTU less the `headers`, IP and UDP), expects the ICMP error that draws
/// to fail the next receive (EMSGSIZE), then sends a datagram that fits the
/// path MTU the kernel learned from it. Returns that MTU and the answer.
pub fn probe_path_mtu(
    s: &UdpSocket,
    full: usize,
    headers: usize,
) -> std::io::Result<(u32, String)> {
    s.send(&vec![b'x'; full])?;
    let mut buf = [0u8; 512];
    match s.recv(&mut buf) {
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
        Err(e) => return Err(e),
        Ok(_) => {
            return Err(std::io::Error::other(
                "a datagram too big for the path was answered",
            ))
        }
    }
    let mtu = path_mtu(s)?;
    s.send(&vec![b'y'; mtu as usize - headers])?;
    let n = s.recv(&mut buf)?;
    Ok((mtu, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

/// The path MTU the kernel knows toward a connected socket's peer, of
/// either family (IP_MTU, IPV6_MTU).
pub fn path_mtu(s: &UdpSocket) -> std::io::Result<u32> {
    let (level, name) = match s.local_addr()? {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of_val(&mtu) as libc::socklen_t;
    // SAFETY: a valid socket and an int option of its size.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(mtu as u32)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
