//! lb-bench: measurements behind `cargo xtask bench`.
//!
//! `lb-bench control-plane --services N --endpoints M --changes K
//! [--source api|manifests]` drives the real lb-agent (with the data path
//! attached in a lab node) from the API server fixture or a manifest folder
//! and measures, end to end:
//! - initial programming of N Services x M endpoints: from the agent's start
//!   to its first full sync written (and the sync's own duration, from its log);
//! - K single-EndpointSlice changes: from the fixture storing the change to
//!   the new backend count being visible in the pinned services map
//!   (p50/p99/max), each change one endpoint added or removed;
//! - the agent's RSS after the initial sync and at the end, and its peak
//!   before and through two relists (SIGHUP for manifests).
//!
//! `lb-bench datapath|programming|traffic --sizes 1,1000,...` run the
//! measurements of the `lb_bench` library (per-packet cost, rule programming vs
//! iptables-restore and nft, traffic through the lab vs kube-proxy's
//! iptables and nftables modes, agent memory).
//!
//! `lb-bench forwarding` runs traffic through three lab nodes to a
//! LoadBalancer address with SNAT and with direct server return side by
//! side (`datapath` ends with their per-packet cost on the entry node).
//!
//! Each prints a markdown section on stdout; progress goes to stderr.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lb_bench::scale_source::ScaleSource;
use lb_bench::{
    datapath::Setup,
    kube_proxy::{Family, FAMILIES},
    percentile,
    traffic::rss_kib,
};
use lb_kube_fixtures::scale::{service_addr, ScaleFamily, DISTINCT_ENDPOINTS};
use lb_lab::{Lab, Source};
use lb_userspace::{
    datapath::loader,
    model::{L4Addr, Protocol},
    sync::differ::master_key,
};

struct Args {
    services: usize,
    endpoints: usize,
    changes: usize,
    source: Source,
    family: ScaleFamily,
    /// Changes in pairs on one Service (an endpoint added, then removed)
    /// and room for `ID_WRAP_ROOM` backend ids past the Services' own: the
    /// ids wrap every `ID_WRAP_ROOM` pairs, as after long churn.
    id_wrap: bool,
}

/// Free backend ids with `--id-wrap`.
const ID_WRAP_ROOM: usize = 256;

fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args {
        services: 10_000,
        endpoints: 10,
        changes: 300,
        source: Source::Api,
        family: ScaleFamily::Ipv4,
        id_wrap: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("bad value for {flag}"))
        };
        match flag.as_str() {
            "--services" => a.services = value()?,
            "--endpoints" => a.endpoints = value()?,
            "--changes" => a.changes = value()?,
            "--id-wrap" => a.id_wrap = true,
            "--source" => {
                a.source = match it.next().map(String::as_str) {
                    Some("api") => Source::Api,
                    Some("manifests") => Source::Manifests,
                    other => bail!("--source api|manifests, not {other:?}"),
                }
            }
            "--family" => {
                a.family = match it.next().map(String::as_str) {
                    Some("ipv4") => ScaleFamily::Ipv4,
                    Some("ipv6") => ScaleFamily::Ipv6,
                    other => bail!("--family ipv4|ipv6, not {other:?}"),
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    // A change adds an endpoint; every one has an address of its own.
    let max_endpoints = DISTINCT_ENDPOINTS - 1;
    if a.services == 0 || a.services > 200_000 || a.endpoints == 0 || a.endpoints > max_endpoints {
        bail!("--services must be 1..=200000 and --endpoints 1..={max_endpoints}");
    }
    Ok(a)
}

const USAGE: &str = "usage: lb-bench control-plane [--services N] [--endpoints M] [--changes K] [--source api|manifests]
                            [--family ipv4|ipv6] (single-stack Services of that family; default ipv4)
                            [--id-wrap] (changes in pairs, an endpoint added then removed, with room
                            for 256 more backend ids: the ids wrap every 256 pairs)
       lb-bench datapath    --sizes N,N,... [--endpoints E] [--batches B] [--count K] [--conntrack C,C,...]
                            (--conntrack: conntrack capacities to measure at the smallest size too,
                            besides the default)
       lb-bench programming --sizes N,N,... [--endpoints E] [--changes K] [--limit-s S] [--family ipv4|ipv6|both]
                            (--family: which Services to install, IPv4 ones against iptables and
                            nft's table ip, IPv6 ones against ip6tables and table ip6; default both)
       lb-bench rules       --services N --format iptables|nft [--endpoints E] [--family ipv4|ipv6]
       lb-bench forwarding  [--ms MS] [--rounds R]
       lb-bench traffic     --sizes N,N,... [--endpoints E] [--ms MS] [--rounds R] [--plot-dir DIR] [--plot-prefix P]
       lb-bench nodeport-load [--rate R] [--seconds S] [--previous-agent PATH]";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("control-plane") => control_plane(parse_args(&args[1..])?),
        Some("datapath") => datapath(Flags::parse(&args[1..])?),
        Some("forwarding") => forwarding(Flags::parse(&args[1..])?),
        Some("programming") => programming(Flags::parse(&args[1..])?),
        Some("rules") => rules(Flags::parse(&args[1..])?),
        Some("traffic") => traffic(Flags::parse(&args[1..])?),
        Some("nodeport-load") => nodeport_load(Flags::parse(&args[1..])?),
        _ => bail!("{USAGE}"),
    }
}

/// `lb-bench datapath`: per-packet costs of the programs (BPF_PROG_TEST_RUN),
/// of backend selection, and of the forwarding modes on the entry node.
fn datapath(f: Flags) -> Result<()> {
    let (endpoints, batches, count) = (
        f.num("endpoints", 4)?,
        f.num("batches", 5)?,
        f.num("count", 2000)?,
    );
    let costs = lb_bench::datapath::measure(&f.setups()?, endpoints, batches, count)?;
    print!(
        "{}",
        lb_bench::datapath::markdown(&costs, endpoints, batches, count)
    );
    let selection = lb_bench::selection::measure(endpoints, batches, count)?;
    print!("{}", lb_bench::selection::markdown(&selection, endpoints));
    let forwarding = lb_bench::forwarding::measure(batches, count)?;
    print!("{}", lb_bench::forwarding::markdown(&forwarding));
    Ok(())
}

/// `lb-bench forwarding`: traffic through three lab nodes to a
/// LoadBalancer address, with SNAT and with direct server return.
fn forwarding(f: Flags) -> Result<()> {
    let (ms, rounds) = (f.num("ms", 1000)? as u64, f.num("rounds", 2)?);
    let rows = lb_bench::forwarding::measure_lab(ms, rounds)?;
    print!("{}", lb_bench::forwarding::lab_markdown(&rows, ms, rounds));
    Ok(())
}

/// `lb-bench programming`: programming Services at each size, our maps
/// against iptables-restore and nft.
fn programming(f: Flags) -> Result<()> {
    let endpoints = f.num("endpoints", 4)?;
    let limit = Duration::from_secs(f.num("limit-s", 600)? as u64);
    let rows = lb_bench::programming::measure(
        &f.sizes()?,
        &f.families()?,
        endpoints,
        f.num("changes", 50)?,
        limit,
    )?;
    print!(
        "{}",
        lb_bench::programming::markdown(&rows, endpoints, limit)
    );
    Ok(())
}

/// `lb-bench rules`: prints the kube-proxy-shaped rules the benchmark
/// compares against.
fn rules(f: Flags) -> Result<()> {
    let family = match f.families()?.as_slice() {
        _ if f.get("family").is_none() => Family::Ipv4,
        [one] => *one,
        _ => bail!("rules: --family ipv4 or ipv6 (one rule set is printed)\n{USAGE}"),
    };
    let (n, endpoints) = (f.num("services", 1)?, f.num("endpoints", 4)?);
    let ports = lb_bench::filler_services(family, n, endpoints);
    match f.get("format").as_deref() {
        Some("iptables") => print!("{}", lb_bench::kube_proxy::iptables_full(&ports)),
        Some("nft") => print!("{}", lb_bench::kube_proxy::nft_full(family, &ports)),
        _ => bail!("--format iptables|nft\n{USAGE}"),
    }
    Ok(())
}

/// `lb-bench traffic`: traffic through the lab at each size against
/// kube-proxy's iptables and nftables modes, with plots.
fn traffic(f: Flags) -> Result<()> {
    let (endpoints, ms, rounds) = (
        f.num("endpoints", 4)?,
        f.num("ms", 1000)? as u64,
        f.num("rounds", 3)?,
    );
    let rows = lb_bench::traffic::measure(&f.sizes()?, endpoints, ms, rounds)?;
    print!(
        "{}",
        lb_bench::traffic::markdown(&rows, endpoints, ms, rounds)
    );
    if let Some(dir) = f.get("plot-dir") {
        let prefix = f.get("plot-prefix").unwrap_or_default();
        let files = lb_bench::plot::draw(&rows, std::path::Path::new(&dir), &prefix)?;
        println!("Plots (against the number of Services, all modes):\n");
        for file in files {
            println!("![{file}]({file})");
        }
        println!();
    }
    Ok(())
}

/// `lb-bench nodeport-load`: NodePort connections at a steady rate, ours
/// (and the previous release's) against kube-proxy's iptables mode.
fn nodeport_load(f: Flags) -> Result<()> {
    let (rate, seconds) = (f.num("rate", 1000)? as u32, f.num("seconds", 60)? as u64);
    let mut modes = vec![lb_bench::nodeport_load::Mode::Ours];
    if let Some(previous) = f.get("previous-agent") {
        modes.push(lb_bench::nodeport_load::Mode::Previous(previous.into()));
    }
    modes.push(lb_bench::nodeport_load::Mode::KubeProxyIptables);
    let rows = lb_bench::nodeport_load::measure(rate, seconds, &modes)?;
    print!(
        "{}",
        lb_bench::nodeport_load::markdown(&rows, rate, seconds)
    );
    Ok(())
}

/// `--name value` pairs.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Self> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .with_context(|| format!("unexpected {flag}\n{USAGE}"))?;
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            pairs.push((name.to_owned(), value.clone()));
        }
        Ok(Self(pairs))
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn num(&self, name: &str, default: usize) -> Result<usize> {
        self.get(name).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("bad --{name} {v}"))
        })
    }

    /// `--family ipv4|ipv6|both` (default: both, or IPv4 for `rules`).
    fn families(&self) -> Result<Vec<Family>> {
        Ok(match self.get("family").as_deref() {
            None | Some("both") => FAMILIES.to_vec(),
            Some("ipv4") => vec![Family::Ipv4],
            Some("ipv6") => vec![Family::Ipv6],
            Some(other) => bail!("bad --family {other}: ipv4, ipv6 or both"),
        })
    }

    /// The datapath bench's setups: each of `--sizes` at the default
    /// conntrack capacity, and the smallest size at each `--conntrack`
    /// capacity.
    fn setups(&self) -> Result<Vec<Setup>> {
        let sizes = self.sizes()?;
        let mut setups: Vec<Setup> = sizes.iter().map(|&n| Setup::default_conntrack(n)).collect();
        let smallest = sizes.iter().copied().min().unwrap_or(1);
        for v in self.get("conntrack").iter().flat_map(|v| v.split(',')) {
            let conntrack: u32 = v
                .trim()
                .parse()
                .with_context(|| format!("bad conntrack capacity {v}"))?;
            if !(1024..=1 << 24).contains(&conntrack) {
                bail!("conntrack capacities must be 1024..=16777216");
            }
            let setup = Setup {
                services: smallest,
                conntrack,
            };
            if !setups.contains(&setup) {
                setups.push(setup);
            }
        }
        Ok(setups)
    }

    fn sizes(&self) -> Result<Vec<usize>> {
        let v = self.get("sizes").context("--sizes N,N,... is required")?;
        let sizes: Vec<usize> = v
            .split(',')
            .map(|s| s.trim().parse().with_context(|| format!("bad size {s}")))
            .collect::<Result<_>>()?;
        if sizes.is_empty() || sizes.iter().any(|&n| n == 0 || n > 200_000) {
            bail!("sizes must be 1..=200000");
        }
        Ok(sizes)
    }
}

/// The sync duration the agent logged for its first (full) sync.
fn first_sync_duration(log: &str) -> Option<String> {
    log.lines()
        // The manifest source's sync includes reading its files.
        .find(|l| l.contains("sync 1 (full)") || l.contains("sync 1 (manifests)"))
        .and_then(|l| l.rsplit(", ").next())
        .map(str::to_owned)
}

/// The first duration the agent logged on the line containing `what`.
fn logged_duration(log: &str, what: &str) -> String {
    log.lines()
        .find(|l| l.contains(what))
        .and_then(|l| l.split(what).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map_or_else(|| "?".into(), |d| d.trim_end_matches([':', ',']).to_owned())
}

fn control_plane(a: Args) -> Result<()> {
    let mut lab = Lab::from_objects(Vec::new())?;
    let mut source = ScaleSource::store(a.source, &lab, a.family, a.services, a.endpoints)?;
    let capacity = capacity(&a);
    let initial = start_and_wait_for_first_sync(&mut lab, &source, &capacity)?;
    let pid = lab.agent_pid().context("agent runs")?;
    let (rss_after_sync, _) = rss_kib(pid);
    let maps = loader::open_pinned(&lab.pin_dir)?;
    let count_of = |i: usize| {
        let key = master_key(&L4Addr {
            addr: service_addr(a.family, i),
            port: 80,
            proto: Protocol::Tcp,
        });
        maps.service(&key).map(|v| v.count)
    };
    for i in [0, a.services / 2, a.services - 1] {
        if count_of(i) != Some(a.endpoints as u16) {
            bail!(
                "Service {i} is not fully programmed after the first sync: {:?}",
                count_of(i)
            );
        }
    }
    let (latencies, additions) = change_latencies(&mut source, &a, count_of)?;
    let (_, rss_peak_before_relists) = rss_kib(pid);
    relist(&mut lab, &source)?;
    if let Some(l) = lab
        .agent_log()
        .lines()
        .find(|l| l.contains("data path loaded in "))
    {
        eprintln!("[bench] {l}");
    }
    let (rss_end, rss_peak) = rss_kib(pid);
    let report = ControlPlaneReport {
        initial,
        first_sync: first_sync_duration(&lab.agent_log()).unwrap_or_else(|| "?".into()),
        datapath_loaded: logged_duration(&lab.agent_log(), "data path loaded in "),
        lists_complete: logged_duration(&lab.agent_log(), "were complete "),
        latencies,
        additions,
        rss_kib: [rss_after_sync, rss_end, rss_peak_before_relists, rss_peak],
    };
    report.print(&a);
    Ok(())
}

/// The agent's capacity flags: room for the changes, or with `--id-wrap`
/// exactly `ID_WRAP_ROOM` backend ids past the Services' own (id 0 is
/// none).
fn capacity(a: &Args) -> Vec<String> {
    let mut flags = lb_bench::capacity_flags(a.services, a.endpoints, a.changes);
    if a.id_wrap {
        if let Some(at) = flags.iter().position(|f| f == "--backends-max") {
            flags.drain(at..at + 2);
        }
        let ids = a.services * a.endpoints + ID_WRAP_ROOM + 1;
        flags.extend(["--backends-max".to_owned(), ids.to_string()]);
    }
    flags
}

/// Makes the agent read everything again `RELISTS` times (a relist of its
/// watches, or SIGHUP to the manifest source) and waits for each full
/// sync: the moment the store holds the old objects and the new ones.
fn relist(lab: &mut Lab, source: &ScaleSource) -> Result<()> {
    eprintln!("[bench] {RELISTS} relists");
    for _ in 0..RELISTS {
        let before = lab.generation();
        source.relist(lab)?;
        let deadline = Instant::now() + Duration::from_mins(5);
        while lab.generation() <= before {
            if Instant::now() > deadline {
                bail!("no sync after a relist in 300 s:\n{}", lab.agent_log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Relists `control_plane` measures through.
const RELISTS: usize = 2;

/// Starts the agent on the fixture and returns the time to its first
/// full sync.
fn start_and_wait_for_first_sync(
    lab: &mut Lab,
    source: &ScaleSource,
    capacity: &[String],
) -> Result<Duration> {
    eprintln!("[bench] starting lb-agent and waiting for its first full sync");
    let started = Instant::now();
    let mut flags = source.agent_flags();
    flags.extend(capacity.iter().map(String::as_str));
    let agent = lab.agent();
    if source.replaces_source_flags() {
        agent.only(&flags).spawn()?;
    } else {
        agent.flags(&flags).spawn()?;
    }
    let deadline = Instant::now() + Duration::from_mins(5);
    while lab.generation() < 1 {
        if Instant::now() > deadline {
            bail!("no first sync in 300 s:\n{}", lab.agent_log());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(started.elapsed())
}

/// Applies single-EndpointSlice changes one at a time and returns, sorted,
/// how long each took to reach the maps (`count_of`: a Service's count),
/// and how long those that added an endpoint (a new backend id) took.
fn change_latencies(
    source: &mut ScaleSource,
    a: &Args,
    count_of: impl Fn(usize) -> Option<u16>,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    eprintln!("[bench] {} single-EndpointSlice changes", a.changes);
    let mut latencies = Vec::with_capacity(a.changes);
    let mut additions = Vec::with_capacity(a.changes);
    let mut sizes = vec![a.endpoints; a.services];
    // A fixed-seed LCG: the same Services are changed in every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    for n in 0..a.changes {
        // With --id-wrap the odd changes take back what the even ones added.
        if !a.id_wrap || n % 2 == 0 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            i = (seed >> 33) as usize % a.services;
        }
        let new = if sizes[i] == a.endpoints {
            a.endpoints + 1
        } else {
            a.endpoints
        };
        let t0 = Instant::now();
        source.set_endpoints(i, new)?;
        let deadline = t0 + Duration::from_secs(10);
        while count_of(i) != Some(new as u16) {
            if Instant::now() > deadline {
                bail!("change {n} (Service {i} to {new} endpoints) not programmed in 10 s");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(t0.elapsed());
        if new > a.endpoints {
            additions.push(t0.elapsed());
        }
        sizes[i] = new;
        // Changes arrive one at a time, as single edits do in a cluster.
        std::thread::sleep(Duration::from_millis(2));
    }
    latencies.sort();
    additions.sort();
    Ok((latencies, additions))
}

/// What `control_plane` measured.
struct ControlPlaneReport {
    initial: Duration,
    first_sync: String,
    /// Maps created and programs verified (agent log).
    datapath_loaded: String,
    /// From the watches' start to both lists complete (agent log).
    lists_complete: String,
    latencies: Vec<Duration>,
    /// Of the changes that added an endpoint.
    additions: Vec<Duration>,
    /// After the first sync, at the end, peak before the relists, peak.
    rss_kib: [u64; 4],
}

impl ControlPlaneReport {
    fn print(&self, a: &Args) {
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        let latencies = &self.latencies;
        let source = match a.source {
            Source::Api => "the API server fixture",
            Source::Manifests => {
                "a manifest folder, read every 100 ms (a change's latency includes the wait; the first sync alone includes reading the files)"
            }
        };
        println!(
            "### Control plane: {} {:?} Services x {} endpoints ({} backends), from {source}\n",
            a.services,
            a.family,
            a.endpoints,
            a.services * a.endpoints
        );
        println!("| Measure | Value |\n| --- | --- |");
        if a.id_wrap {
            println!(
                "| Backend ids free past the Services' own (--id-wrap: each change added and removed again, the ids wrap every {ID_WRAP_ROOM} pairs) | {ID_WRAP_ROOM} |"
            );
        }
        println!(
            "| Agent start to first full sync written (list + translate + write, BPF load included) | {} |",
            ms(self.initial)
        );
        println!(
            "| of which: data path loaded (maps, program verification; agent log) | {} |",
            self.datapath_loaded
        );
        println!(
            "| of which: Services and EndpointSlices listed (agent log) | {} |",
            self.lists_complete
        );
        println!(
            "| First full sync alone (translate + write, agent log) | {} |",
            self.first_sync
        );
        println!(
            "| EndpointSlice change to map, p50 ({} changes) | {} |",
            latencies.len(),
            ms(percentile(latencies, 0.50))
        );
        println!(
            "| EndpointSlice change to map, p99 | {} |",
            ms(percentile(latencies, 0.99))
        );
        println!(
            "| EndpointSlice change to map, max | {} |",
            ms(*latencies.last().unwrap_or(&Duration::ZERO))
        );
        if a.id_wrap {
            let add = &self.additions;
            println!(
                "| of which adding an endpoint (a new backend id), p50 / p99 ({} changes) | {} / {} |",
                add.len(),
                ms(percentile(add, 0.50)),
                ms(percentile(add, 0.99))
            );
        }
        let mib = self.rss_kib.map(|k| k as f64 / 1024.0);
        println!(
            "| Agent RSS after first sync / at end / peak | {:.1} / {:.1} / {:.1} MiB |",
            mib[0], mib[1], mib[3]
        );
        println!(
            "| Agent RSS peak before / through {RELISTS} relists | {:.1} / {:.1} MiB |",
            mib[2], mib[3]
        );
        println!();
    }
}
