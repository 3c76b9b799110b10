//! Clients the tests run inside lab namespaces: one TCP line, one UDP
//! datagram, one HTTP GET, and a reader of Prometheus text. Each takes an
//! address of either family (`SocketAddrV4`, `SocketAddrV6`, `SocketAddr`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
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
