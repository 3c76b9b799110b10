//! The lab's pod server: answers every TCP line and every UDP datagram with
//! its pod name, on the ports it is given. Prints "ready" once all sockets
//! listen, so the lab knows the pod is ready.
//!
//! A line `once` is answered with the pod name and the connection closed
//! by the server, as an HTTP/1.0 server (or one sending `Connection:
//! close`) does: the server's side then holds the 4-tuple in TIME_WAIT.
//!
//! On SIGTERM it shuts down the way a well-behaved server in a terminating
//! pod does: it keeps accepting (Services may still route new connections
//! to it until the EndpointSlice says it is terminating), and it closes
//! each open connection after the next answer, which ends with " bye" so
//! the client knows to reconnect (HTTP's `Connection: close`). The kubelet
//! (the lab) kills it when the grace period is over.
//!
//! It listens on both families: one socket per port on [::], which takes
//! IPv4 too (as v4-mapped addresses, shown as plain IPv4 ones).
//!
//! Usage: lab-server --name POD [--tcp PORT]... [--udp PORT]...

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

static TERMINATING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATING.store(true, Ordering::SeqCst);
}

/// A peer as the client knows itself: an IPv4 one without its v4-mapped
/// IPv6 form.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Where a port listens: [::] (both families), or 0.0.0.0 when the
/// kernel has no IPv6.
fn listen_addresses(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        SocketAddr::from(([0, 0, 0, 0], port)),
    ]
}

fn serve_tcp(stream: TcpStream, name: String) {
    let peer = stream.peer_addr().ok().map(canonical);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        // "whoareyou" lets a test see the source address the backend saw.
        let mut answer = if line.trim() == "whoami" {
            format!("{name} {}", peer.map(|p| p.to_string()).unwrap_or_default())
        } else {
            name.clone()
        };
        let closing = TERMINATING.load(Ordering::SeqCst) || line.trim() == "once";
        if TERMINATING.load(Ordering::SeqCst) {
            answer.push_str(" bye");
        }
        answer.push('\n');
        if writer.write_all(answer.as_bytes()).is_err() || closing {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

fn main() {
    let mut name = String::from("unnamed");
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => name = value,
            "--tcp" => tcp.push(value.parse::<u16>().expect("TCP port")),
            "--udp" => udp.push(value.parse::<u16>().expect("UDP port")),
            other => panic!("unknown flag {other}"),
        }
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    let mut threads = Vec::new();
    for port in tcp {
        let listener = TcpListener::bind(&listen_addresses(port)[..])
            .unwrap_or_else(|e| panic!("bind TCP {port}: {e}"));
        let name = name.clone();
        threads.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || serve_tcp(stream, name));
            }
        }));
    }
    for port in udp {
        let socket = UdpSocket::bind(&listen_addresses(port)[..])
            .unwrap_or_else(|e| panic!("bind UDP {port}: {e}"));
        let name = name.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let answer = if &buf[..n] == b"whoami" {
                    format!("{name} {}", canonical(from))
                } else if buf[..n].starts_with(b"seq:") {
                    // Echoed, so a client can match answers to requests.
                    format!("{name} {}", String::from_utf8_lossy(&buf[..n]))
                } else {
                    name.clone()
                };
                let _ = socket.send_to(answer.as_bytes(), from);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}
