//! A client the lab starts as its own process (in a pod's or the node's
//! namespace, and in the lab's cgroup, where the agent's socket hooks
//! apply). Prints one line per answer, tab separated, for the test to read.
//!
//! ADDR:PORT is either family: 10.96.0.10:80 or [fd00:96::40]:80.
//!
//!   lab-client tcp ADDR:PORT N        N connections: "peer\tanswer" (getpeername, whoami)
//!   lab-client udp ADDR:PORT N        N datagrams, each from a new unconnected socket
//!                                     (a new flow): "from\tanswer"
//!   lab-client udp-one-socket ADDR:PORT N
//!                                     N datagrams from one unconnected socket (one flow)
//!   lab-client udp-connected ADDR:PORT N MS
//!                                     one connected socket, a datagram every MS ms:
//!                                     "peer\tanswer" or "peer\terror: ..."
//!   lab-client bench ADDR:PORT N [P]  N x 10 ms of new connections (connect, one
//!                                     request, close) from P threads (default 1),
//!                                     then as long of requests on one connection:
//!                                     one line "conns_per_s\tX\trr_per_s\tY\t
//!                                     rr_p50_us\tZ\trr_p99_us\tW\tk_us_per_conn\tK\t
//!                                     k_us_per_rr\tR" (K, R: the machine's kernel CPU
//!                                     time, system + irq + softirq of every CPU,
//!                                     per connection and per request)

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
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
    // Bounded: at most 100,000 requests (or 1,000 s of benchmark).
    let n = n.min(100_000);
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
            let mut s = UdpSocket::bind(unspecified_of(&to)).expect("bind");
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            for _ in 0..n {
                if mode == "udp" {
                    s = UdpSocket::bind(unspecified_of(&to)).expect("bind");
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                }
                let mut buf = [0u8; 512];
                let r = s.send_to(b"whoami", to).and_then(|_| s.recv_from(&mut buf));
                match r {
                    Ok((len, from)) => {
                        println!("{from}\t{}", String::from_utf8_lossy(&buf[..len]));
                    }
                    Err(e) => println!("-\terror: {e}"),
                }
            }
        }
        "udp-connected" => {
            let interval: u64 = args.get(3).and_then(|m| m.parse().ok()).unwrap_or(100);
            let s = UdpSocket::bind(unspecified_of(&to)).expect("bind");
            s.connect(to).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(interval.max(50) * 3)))
                .unwrap();
            for _ in 0..n {
                let mut buf = [0u8; 512];
                let peer = s
                    .peer_addr()
                    .map_or_else(|e| format!("error: {e}"), |p| p.to_string());
                let r = s.send(b"whoami").and_then(|_| s.recv(&mut buf));
                match r {
                    Ok(len) => println!("{peer}\t{}", String::from_utf8_lossy(&buf[..len])),
                    Err(e) => {
                        println!("{peer}\terror: {e}");
                        // Closed under us (ECONNABORTED leaves it
                        // unconnected): connect again, as a resolver does.
                        if s.peer_addr().is_err() {
                            s.connect(to).expect("reconnect");
                            println!("{to}\treconnected");
                        }
                    }
                }
                let _ = std::io::stdout().flush();
                std::thread::sleep(Duration::from_millis(interval));
            }
        }
        "bench" => {
            // Bounded: at most 64 threads.
            let parallel = args
                .get(3)
                .map_or(1, |p| p.parse().unwrap_or_else(|_| usage()));
            bench(
                to,
                Duration::from_millis(n as u64 * 10),
                parallel.clamp(1, 64),
            );
        }
        _ => usage(),
    }
}

/// Connection rate (from `parallel` threads, so as many connections are in
/// flight), then request/response rate and latency on one connection, each
/// for `phase`; with the kernel CPU time each took.
fn bench(to: SocketAddr, phase: Duration, parallel: usize) {
    let kernel = kernel_cpu_us();
    let started = std::time::Instant::now();
    let conns: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..parallel)
            .map(|_| s.spawn(|| connections_for(to, phase)))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("bench thread"))
            .sum()
    });
    let conn_rate = conns as f64 / started.elapsed().as_secs_f64();
    let k_per_conn = kernel_cpu_us().saturating_sub(kernel) as f64 / conns.max(1) as f64;
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut lat = Vec::new();
    let kernel = kernel_cpu_us();
    let started = std::time::Instant::now();
    let mut line = String::new();
    while started.elapsed() < phase {
        let t = std::time::Instant::now();
        s.write_all(b"ping\n").expect("request");
        line.clear();
        reader.read_line(&mut line).expect("answer");
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let rr_rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    let k_per_rr = kernel_cpu_us().saturating_sub(kernel) as f64 / lat.len().max(1) as f64;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "conns_per_s\t{conn_rate:.0}\trr_per_s\t{rr_rate:.0}\trr_p50_us\t{:.1}\trr_p99_us\t{:.1}\tk_us_per_conn\t{k_per_conn:.2}\tk_us_per_rr\t{k_per_rr:.2}",
        pct(0.5),
        pct(0.99)
    );
}

/// New connections one after the other for `phase`; how many.
fn connections_for(to: SocketAddr, phase: Duration) -> u64 {
    let started = std::time::Instant::now();
    let mut conns = 0;
    while started.elapsed() < phase {
        bench_connection(to).expect("connection during the benchmark");
        conns += 1;
    }
    conns
}

/// The kernel CPU time of the whole machine so far, in microseconds:
/// system, irq and softirq time of every CPU (`/proc/stat`, not
/// namespaced), which is where a packet's path costs, whoever it is for.
fn kernel_cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq ...
    let kernel: u64 = [2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    kernel * 1_000_000 / hz.max(1)
}

/// One connection, one request, closed with a RST (SO_LINGER 0): a normal
/// close leaves the client's port in TIME_WAIT for a minute, and thousands
/// of those make connect() itself the slowest part of the benchmark.
fn bench_connection(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"ping\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    Ok(())
}

/// Where a client of `to` binds: the any-address of its family, port 0.
fn unspecified_of(to: &SocketAddr) -> SocketAddr {
    let any: IpAddr = if to.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(any, 0)
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
