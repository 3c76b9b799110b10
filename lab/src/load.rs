//! Clients that keep calling a Service from inside a lab namespace while a
//! test changes things underneath, counting every request: how many were
//! sent, which failed and why, the longest time without an answer, and who
//! answered. Every loop is bounded by a request budget as well as a stop
//! flag.

use std::{
    collections::BTreeMap,
    fmt,
    io::Write,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{ask_on, in_netns, tcp_ask};

/// How long one request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A UDP request is sent again when no answer came this long.
pub(crate) const UDP_RETRY_AFTER: Duration = Duration::from_millis(300);
/// How often a UDP request is sent before it counts as failed.
pub(crate) const UDP_ATTEMPTS: usize = 3;

/// A gap this long between answers means a retransmission.
pub(crate) const LOST_PACKET_GAP: Duration = Duration::from_millis(900);

/// What a client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadKind {
    /// A new TCP connection for every request.
    NewConnections,
    /// One TCP connection kept open, a request on it every interval. A
    /// server that says goodbye (" bye", a graceful shutdown) is followed
    /// by a new connection, as HTTP clients do after `Connection: close`;
    /// an answer that never comes or a reset connection is a failure.
    LongLived,
    /// One UDP socket (one flow: same source port) sending a datagram
    /// every interval and waiting for the answer, sending it again after
    /// 300 ms without one (as resolvers do), at most 3 times.
    UdpFlow,
}

/// The counts of one client.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub what: String,
    pub sent: usize,
    pub failed: Vec<String>,
    /// The longest time between two answers (or from start to the first).
    pub(crate) longest_gap: Duration,
    /// When the longest gap ended (UTC, as the agent logs), to find what
    /// happened then.
    pub(crate) longest_gap_ended: Option<chrono::DateTime<chrono::Utc>>,
    /// Answers per pod name.
    pub answered_by: BTreeMap<String, usize>,
    /// When each pod answered last.
    pub last_answer: BTreeMap<String, Instant>,
    /// Connections opened (LongLived: 1 + reconnects after a goodbye).
    pub connections: usize,
    /// UDP requests sent again after a timeout (a datagram lost somewhere).
    pub(crate) udp_retries: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} requests, {} failed, longest gap {} ms (ended {}), {} connections, {} UDP retries, answered by {:?}",
            self.what,
            self.sent,
            self.failed.len(),
            self.longest_gap.as_millis(),
            self.longest_gap_ended
                .map(|t| t.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_default(),
            self.connections,
            self.udp_retries,
            self.answered_by
        )
    }
}

impl LoadReport {
    /// Prints the counts (the closing note reports them) and requires that
    /// the client ran and that no request failed.
    pub fn assert_none_failed(&self) {
        println!("LOAD {self}");
        self.check();
    }

    fn check(&self) {
        assert!(self.sent >= 20, "{}: the client ran: {self}", self.what);
        // A lost SYN is retransmitted after 1 s: a gap that long means the
        // data path dropped a connection's first packet, even if the
        // request then succeeded.
        assert!(
            self.longest_gap < LOST_PACKET_GAP,
            "{}: no packet lost (a retransmission shows as a gap of 1 s): {self}",
            self.what
        );
        assert!(
            self.failed.is_empty(),
            "{}: no request may fail: {self}\nfailures: {:#?}",
            self.what,
            self.failed
        );
    }
}

/// A client running in its own thread.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts a client in the network namespace `netns` calling `to` every
    /// `interval`, for at most `max` requests.
    pub fn start(
        netns: PathBuf,
        to: impl Into<SocketAddr>,
        kind: LoadKind,
        what: &str,
        interval: Duration,
        max: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let what = what.to_owned();
        let to = to.into();
        let handle = std::thread::spawn(move || {
            in_netns(&netns, || {
                let mut client = Client::new(to, kind);
                let mut r = LoadReport {
                    what,
                    ..Default::default()
                };
                let mut last_ok = Instant::now();
                while !flag.load(Ordering::SeqCst) && r.sent < max {
                    r.sent += 1;
                    match client.request(r.sent) {
                        Ok(pod) => {
                            if last_ok.elapsed() > r.longest_gap {
                                r.longest_gap = last_ok.elapsed();
                                r.longest_gap_ended = Some(chrono::Utc::now());
                            }
                            last_ok = Instant::now();
                            *r.answered_by.entry(pod.clone()).or_default() += 1;
                            r.last_answer.insert(pod, last_ok);
                        }
                        Err(e) => r.failed.push(format!("request {}: {e}", r.sent)),
                    }
                    std::thread::sleep(interval);
                }
                r.connections = client.connections;
                r.udp_retries = client.udp_retries;
                r
            })
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the client and returns its counts.
    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("client runs")
            .join()
            .expect("client thread panicked")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Client {
    to: SocketAddr,
    kind: LoadKind,
    stream: Option<TcpStream>,
    udp: Option<UdpSocket>,
    connections: usize,
    udp_retries: usize,
}

impl Client {
    fn new(to: SocketAddr, kind: LoadKind) -> Self {
        Self {
            to,
            kind,
            stream: None,
            udp: None,
            connections: 0,
            udp_retries: 0,
        }
    }

    /// One request; the answering pod's name.
    fn request(&mut self, n: usize) -> std::io::Result<String> {
        match self.kind {
            LoadKind::NewConnections => {
                self.connections += 1;
                tcp_ask(self.to, "probe", REQUEST_TIMEOUT).map(|a| pod_name(&a))
            }
            LoadKind::LongLived => {
                if self.stream.is_none() {
                    let s = TcpStream::connect_timeout(&self.to, REQUEST_TIMEOUT)?;
                    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                    self.connections += 1;
                    self.stream = Some(s);
                }
                let stream = self.stream.as_mut().expect("connected above");
                match ask_on(stream, "probe") {
                    Ok(answer) => {
                        if answer.ends_with(" bye") {
                            self.stream = None;
                        }
                        Ok(pod_name(&answer))
                    }
                    Err(e) => {
                        // Counted as failed; the next request reconnects.
                        self.stream = None;
                        Err(e)
                    }
                }
            }
            LoadKind::UdpFlow => {
                if self.udp.is_none() {
                    let any: SocketAddr = if self.to.is_ipv6() {
                        "[::]:0".parse().expect("an address")
                    } else {
                        "0.0.0.0:0".parse().expect("an address")
                    };
                    let s = UdpSocket::bind(any)?;
                    s.set_read_timeout(Some(UDP_RETRY_AFTER))?;
                    self.connections += 1;
                    self.udp = Some(s);
                }
                let s = self.udp.as_ref().expect("bound above");
                // As a resolver does: the same question again after a
                // timeout. The answer must come from the Service address
                // (reverse NAT) and echo this request's sequence number.
                let msg = format!("seq:{n}");
                for attempt in 0..UDP_ATTEMPTS {
                    if attempt > 0 {
                        self.udp_retries += 1;
                    }
                    s.send_to(msg.as_bytes(), self.to)?;
                    let deadline = Instant::now() + UDP_RETRY_AFTER;
                    let mut buf = [0u8; 512];
                    // Bounded: each read waits at most UDP_RETRY_AFTER.
                    while Instant::now() < deadline {
                        let Ok((len, from)) = s.recv_from(&mut buf) else {
                            break;
                        };
                        let answer = String::from_utf8_lossy(&buf[..len]).into_owned();
                        if from != self.to {
                            return Err(std::io::Error::other(format!(
                                "answer from {from}, not from the Service {}: {answer}",
                                self.to
                            )));
                        }
                        if answer.ends_with(&format!(" {msg}")) {
                            return Ok(pod_name(&answer));
                        }
                    }
                }
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer to {UDP_ATTEMPTS} attempts"),
                ))
            }
        }
    }
}

/// The pod name an answer starts with.
fn pod_name(answer: &str) -> String {
    answer.split_whitespace().next().unwrap_or("").to_owned()
}

/// Several clients started together and reported together.
#[derive(Default)]
pub struct LoadSet {
    loads: Vec<Load>,
}

impl LoadSet {
    pub fn add(&mut self, load: Load) {
        self.loads.push(load);
    }

    /// Stops every client and prints every report.
    pub fn finish(self) -> Vec<LoadReport> {
        let reports: Vec<LoadReport> = self.loads.into_iter().map(Load::finish).collect();
        for r in &reports {
            println!("LOAD {r}");
        }
        let _ = std::io::stdout().flush();
        reports
    }

    /// Stops every client; prints every report, then requires none failed.
    pub fn finish_and_assert_none_failed(self) -> Vec<LoadReport> {
        let reports = self.finish();
        for r in &reports {
            r.check();
        }
        reports
    }
}
