//! A client the lab starts as its own process (in a pod's or the node's
//! namespace, and in the lab's cgroup, where the agent's socket hooks
//! apply). Prints one line per answer, tab separated, for the test to read.
//!
//!   lab-client tcp ADDR:PORT N        N connections: "peer\tanswer" (getpeername, whoami)
//!   lab-client udp ADDR:PORT N        N datagrams, each from a new unconnected socket
//!                                     (a new flow): "from\tanswer"
//!   lab-client udp-one-socket ADDR:PORT N
//!                                     N datagrams from one unconnected socket (one flow)
//!   lab-client udp-connected ADDR:PORT N MS
//!                                     one connected socket, a datagram every MS ms:
//!                                     "peer\tanswer" or "peer\terror: ..."

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: lab-client tcp|udp|udp-connected ADDR:PORT N [MS]");
        std::process::exit(2)
    };
    let (Some(mode), Some(to), Some(n)) = (args.first(), args.get(1), args.get(2)) else {
        usage()
    };
    let to: SocketAddr = to.parse().unwrap_or_else(|_| usage());
    let n: usize = n.parse().unwrap_or_else(|_| usage());
    // Bounded: at most 10,000 requests.
    let n = n.min(10_000);
    match mode.as_str() {
        "tcp" => {
            for _ in 0..n {
                match tcp_once(to) {
                    Ok((peer, answer)) => println!("{peer}\t{answer}"),
                    Err(e) => println!("-\terror: {e}"),
                }
            }
        }
        "udp" | "udp-one-socket" => {
            let mut s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            for _ in 0..n {
                if mode == "udp" {
                    s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                }
                let mut buf = [0u8; 512];
                let r = s.send_to(b"whoami", to).and_then(|_| s.recv_from(&mut buf));
                match r {
                    Ok((len, from)) => {
                        println!("{from}\t{}", String::from_utf8_lossy(&buf[..len]))
                    }
                    Err(e) => println!("-\terror: {e}"),
                }
            }
        }
        "udp-connected" => {
            let interval: u64 = args.get(3).and_then(|m| m.parse().ok()).unwrap_or(100);
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(to).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(interval.max(50) * 3)))
                .unwrap();
            for _ in 0..n {
                let mut buf = [0u8; 512];
                let peer = s
                    .peer_addr()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|e| format!("error: {e}"));
                let r = s.send(b"whoami").and_then(|_| s.recv(&mut buf));
                match r {
                    Ok(len) => println!("{peer}\t{}", String::from_utf8_lossy(&buf[..len])),
                    Err(e) => println!("{peer}\terror: {e}"),
                }
                let _ = std::io::stdout().flush();
                std::thread::sleep(Duration::from_millis(interval));
            }
        }
        _ => usage(),
    }
}

fn tcp_once(to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(b"whoami\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((peer, line.trim().to_owned()))
}
