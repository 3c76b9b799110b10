//! A paced load of new TCP connections, as a busy node sees them: each
//! connection sends `once`, reads the answer and sees the server close
//! first (so the backend holds the 4-tuple in TIME_WAIT, as nginx does
//! with `Connection: close`). Counts failures, the client's SYN
//! retransmissions (`TcpExtTCPSynRetrans`) and latency percentiles.

use std::{
    fmt,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::in_netns;

/// How long one connection may take before it counts as failed: longer
/// than a SYN retransmission (1 s), so a lost SYN shows as a retransmission
/// and a slow connection, not as a failure of its own.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct RateLoad {
    pub what: String,
    pub to: SocketAddr,
    /// New connections per second, over all threads.
    pub rate: u32,
    pub duration: Duration,
    pub threads: u32,
}

#[derive(Clone, Debug, Default)]
pub struct RateReport {
    pub what: String,
    pub attempted: u64,
    pub failed: u64,
    /// The first few failures, for the message.
    pub failures: Vec<String>,
    pub syn_retransmissions: u64,
    pub elapsed: Duration,
    /// Connection latencies (connect to the server's close), sorted.
    pub latencies: Vec<Duration>,
}

impl RateReport {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    pub fn rate(&self) -> f64 {
        self.attempted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for RateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "{}: {} connections in {:.0} s ({:.0}/s), {} failed, {} SYN retransmissions, latency p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.1} ms",
            self.what,
            self.attempted,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.failed,
            self.syn_retransmissions,
            ms(self.percentile(0.5)),
            ms(self.percentile(0.9)),
            ms(self.percentile(0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
        )
    }
}

/// One connection: connect, ask `once`, read the answer and the close.
fn one_connection(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, CONNECTION_TIMEOUT)?;
    s.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
    s.write_all(b"once\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    if !answer.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a whole answer",
        ));
    }
    Ok(())
}

/// `TcpExtTCPSynRetrans` of the calling thread's network namespace.
pub fn syn_retransmissions() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names = lines[0].split_whitespace();
    let values = lines[1].split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// One thread's share: connections `t`, `t + threads`, ... each at its
/// scheduled time (start + index / rate), until the duration is over.
fn run_thread(load: &RateLoad, t: u32, start: Instant) -> RateReport {
    let mut r = RateReport::default();
    let per = Duration::from_secs_f64(1.0 / f64::from(load.rate));
    for i in (u64::from(t)..).step_by(load.threads as usize) {
        let at = start + per.mul_f64(i as f64);
        // Slow connections (a lost SYN costs a second, a timeout three) put
        // the thread behind its schedule: it stops with the window anyway,
        // and the connections it did not make lower the rate reported.
        if at >= start + load.duration || Instant::now() >= start + load.duration {
            break;
        }
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let began = Instant::now();
        r.attempted += 1;
        match one_connection(load.to) {
            Ok(()) => r.latencies.push(began.elapsed()),
            Err(e) => {
                r.failed += 1;
                if r.failures.len() < 10 {
                    r.failures.push(format!("connection {i}: {e}"));
                }
            }
        }
    }
    r
}

/// Runs `load` from the network namespace at `netns`.
pub fn run(netns: &Path, load: &RateLoad) -> RateReport {
    let before = in_netns(netns, syn_retransmissions);
    let start = Instant::now() + Duration::from_millis(50);
    let parts: Vec<RateReport> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load.threads)
            .map(|t| {
                let netns: PathBuf = netns.to_owned();
                s.spawn(move || in_netns(&netns, || run_thread(load, t, start)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .collect()
    });
    let mut report = RateReport {
        what: load.what.clone(),
        elapsed: start.elapsed(),
        ..Default::default()
    };
    for p in parts {
        report.attempted += p.attempted;
        report.failed += p.failed;
        report.failures.extend(p.failures);
        report.latencies.extend(p.latencies);
    }
    report.latencies.sort();
    report.syn_retransmissions = in_netns(netns, syn_retransmissions).saturating_sub(before);
    report
}
