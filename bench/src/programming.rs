//! Rule programming: the time to install N Services from nothing, and to
//! apply one endpoint change, for the agent's sync engine (translation,
//! plan and map writes into real BPF maps) and for `iptables-restore` and
//! `nft -f` of the rules kube-proxy would write for the same Services.
//!
//! iptables and nft run in a network namespace made for the purpose (and
//! removed after), so the host's own rules are never touched.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::Ebpf;
use lb_userspace::{
    datapath::loader,
    model::ServiceName,
    serve::metrics::Metrics,
    source::objects::ServiceChange,
    sync::{differ::MapContents, map_writer::BpfMaps, programmer::Programmer},
};

use crate::{
    filler_services,
    kube_proxy::{self, Family},
    ms, percentile, progress,
    rule_tools::{feed, install_iptables_jumps},
    thousands, typed_objects, BENCH_NAMESPACE,
};
use lb_lab::Netns;

/// One mode's figures at one size.
#[derive(Clone, Debug)]
pub struct Programming {
    /// Err: it did not finish, or could not hold this many (the reason).
    pub install: Result<Duration, String>,
    /// Sorted single endpoint change times.
    pub changes: Vec<Duration>,
}

impl Default for Programming {
    fn default() -> Self {
        Self {
            install: Err("not run".into()),
            changes: Vec::new(),
        }
    }
}

/// The iptables binaries compared: the legacy (x_tables) backend and the
/// nf_tables one (Debian's default `iptables`); kube-proxy uses whichever
/// the host does.
pub(crate) const IPTABLES_BACKENDS: [&str; 2] = ["iptables-legacy", "iptables-nft"];

#[derive(Clone, Debug, Default)]
pub struct ProgrammingRow {
    pub services: usize,
    pub ours: Programming,
    /// One per IPTABLES_BACKENDS.
    pub iptables: [Programming; 2],
    pub nftables: Programming,
    /// iptables-restore input size for a full sync, in rules.
    pub(crate) iptables_rules: usize,
}

/// Change `c` of a run: one Service (spread over the set) gets an endpoint
/// more, or loses the one it got, so every mode sees the same changes.
/// Returns the Service's index and the endpoint it lost, if any.
fn toggle_endpoint(
    ports: &mut [kube_proxy::ServicePort],
    c: usize,
    endpoints: usize,
) -> (usize, Vec<(std::net::IpAddr, u16)>) {
    let i = (c * 7919) % ports.len();
    let mut removed = Vec::new();
    if ports[i].endpoints.len() == endpoints {
        ports[i]
            .endpoints
            .push((crate::filler_endpoint_ip(Family::Ipv4, i, 63), 8080));
    } else {
        removed.extend(ports[i].endpoints.pop());
    }
    (i, removed)
}

/// The agent's sync engine on fresh, unpinned maps.
fn ours(n: usize, endpoints: usize, changes: usize) -> Result<Programming> {
    let mut ebpf = Ebpf::load(lb_userspace::EBPF_OBJECT).context("loading the BPF object")?;
    let maps = loader::take_maps(&mut ebpf)?;
    let mut programmer: Programmer<BpfMaps> =
        Programmer::new(maps, MapContents::default(), Metrics::new());
    let mut ports = filler_services(Family::Ipv4, n, endpoints);
    let (services, mut slices) = typed_objects(&ports);
    let started = Instant::now();
    let report = programmer.full_sync(&services, &slices);
    let took = started.elapsed();
    if !report.errors.is_empty() {
        return Ok(Programming {
            install: Err(format!(
                "does not fit the maps: {} of {} Services failed ({})",
                report.errors.len(),
                n,
                report.errors[0]
            )),
            changes: Vec::new(),
        });
    }
    let mut times = Vec::with_capacity(changes);
    for c in 0..changes {
        let (i, _) = toggle_endpoint(&mut ports, c, endpoints);
        slices[i] = crate::typed_object(&ports[i]).1;
        let change = ServiceChange {
            name: ServiceName {
                namespace: BENCH_NAMESPACE.into(),
                name: ports[i].name.clone(),
            },
            service: Some(&services[i]),
            slices: vec![&slices[i]],
        };
        let started = Instant::now();
        let report = programmer.sync_services(&[change]);
        times.push(started.elapsed());
        if !report.errors.is_empty() || report.writes == 0 {
            bail!("endpoint change {c} was not applied: {:?}", report.errors);
        }
    }
    times.sort();
    Ok(Programming {
        install: Ok(took),
        changes: times,
    })
}

fn iptables(
    binary: &str,
    n: usize,
    endpoints: usize,
    changes: usize,
    limit: Duration,
) -> Result<(Programming, usize)> {
    let ns = Netns::create(&format!("lbt-{}-bench-ipt", std::process::id()))?;
    install_iptables_jumps(&ns, binary).context("kube-proxy's jump rules")?;
    let mut ports = filler_services(Family::Ipv4, n, endpoints);
    let text = kube_proxy::iptables_full(&ports);
    let rules = text.lines().filter(|l| l.starts_with("-A ")).count();
    let restore = || {
        let mut c = ns.command(format!("{binary}-restore"));
        c.args(["-w", "--noflush"]);
        c
    };
    let install = feed(restore(), &text, limit);
    drop(text);
    let mut times = Vec::new();
    if install.is_ok() {
        for c in 0..changes {
            let (i, removed) = toggle_endpoint(&mut ports, c, endpoints);
            let text = kube_proxy::iptables_partial(&ports, &ports[i], &removed);
            match feed(restore(), &text, limit) {
                Ok(d) => times.push(d),
                Err(e) => bail!("{binary}-restore of one endpoint change: {e}"),
            }
        }
    }
    times.sort();
    Ok((
        Programming {
            install,
            changes: times,
        },
        rules,
    ))
}

fn nftables(n: usize, endpoints: usize, changes: usize, limit: Duration) -> Result<Programming> {
    let ns = Netns::create(&format!("lbt-{}-bench-nft", std::process::id()))?;
    let mut ports = filler_services(Family::Ipv4, n, endpoints);
    let text = kube_proxy::nft_full(Family::Ipv4, &ports);
    let nft = || {
        let mut c = ns.command("nft");
        c.args(["-f", "-"]);
        c
    };
    let install = feed(nft(), &text, limit);
    drop(text);
    let mut times = Vec::new();
    if install.is_ok() {
        for c in 0..changes {
            let (i, removed) = toggle_endpoint(&mut ports, c, endpoints);
            let text = kube_proxy::nft_update(&ports[i], &removed);
            match feed(nft(), &text, limit) {
                Ok(d) => times.push(d),
                Err(e) => bail!("nft -f of one endpoint change: {e}"),
            }
        }
    }
    times.sort();
    Ok(Programming {
        install,
        changes: times,
    })
}

/// Measures every mode at each size. `changes` endpoint changes each
/// (fewer for iptables at large sizes, where one takes seconds). A tool
/// that takes longer than `limit` to install is stopped there and not run
/// at larger sizes.
pub fn measure(
    sizes: &[usize],
    endpoints: usize,
    changes: usize,
    limit: Duration,
) -> Result<Vec<ProgrammingRow>> {
    let mut rows: Vec<ProgrammingRow> = Vec::new();
    // Tools that did not finish at a smaller size: (tool, size).
    let mut gave_up: Vec<(String, usize)> = Vec::new();
    let skipped = |gave_up: &[(String, usize)], tool: &str| -> Option<Programming> {
        gave_up
            .iter()
            .find(|(t, _)| t == tool)
            .map(|(_, at)| Programming {
                install: Err(format!("not run (over the limit at {})", thousands(*at))),
                changes: Vec::new(),
            })
    };
    for &n in sizes {
        progress(&format!(
            "programming {n} Services x {endpoints} endpoints: lb-agent's sync engine"
        ));
        let ours = ours(n, endpoints, changes)?;
        // A change takes seconds for iptables at these sizes.
        let few = match n {
            0..10_000 => changes,
            10_000..30_000 => changes.min(10),
            _ => changes.min(5),
        };
        let mut ipt: [Programming; 2] = Default::default();
        let mut rules = 0;
        for (slot, binary) in IPTABLES_BACKENDS.iter().enumerate() {
            ipt[slot] = if let Some(p) = skipped(&gave_up, binary) {
                p
            } else {
                progress(&format!(
                    "programming {n} Services: {binary}-restore (limit {} s)",
                    limit.as_secs()
                ));
                let (p, r) = iptables(binary, n, endpoints, few, limit)?;
                rules = r;
                p
            };
        }
        let nftables = if let Some(p) = skipped(&gave_up, "nft") {
            p
        } else {
            progress(&format!(
                "programming {n} Services: nft -f (limit {} s)",
                limit.as_secs()
            ));
            nftables(n, endpoints, few, limit)?
        };
        for (tool, p) in [
            (IPTABLES_BACKENDS[0], &ipt[0]),
            (IPTABLES_BACKENDS[1], &ipt[1]),
            ("nft", &nftables),
        ] {
            if p.install
                .as_ref()
                .is_err_and(|e| e.starts_with("did not finish"))
            {
                gave_up.push((tool.to_owned(), n));
            }
        }
        let show = |p: &Programming| match &p.install {
            Ok(d) => ms(*d),
            Err(e) => e.clone(),
        };
        progress(&format!(
            "install {n}: ours {}, {} {}, {} {}, nftables {}",
            show(&ours),
            IPTABLES_BACKENDS[0],
            show(&ipt[0]),
            IPTABLES_BACKENDS[1],
            show(&ipt[1]),
            show(&nftables),
        ));
        rows.push(ProgrammingRow {
            services: n,
            ours,
            iptables: ipt,
            nftables,
            iptables_rules: rules,
        });
    }
    Ok(rows)
}

fn ratio(ours: &Result<Duration, String>, theirs: &Result<Duration, String>) -> String {
    match (ours, theirs) {
        (Ok(a), Ok(b)) => format!("{:.3}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

pub fn markdown(rows: &[ProgrammingRow], endpoints: usize, limit: Duration) -> String {
    let mut s = String::from("## Rule programming\n\n");
    s.push_str(&format!(
        "Install: N Services x {endpoints} endpoints from nothing. Ours: the agent's sync engine (translation of the Service and EndpointSlice objects, plan, one map write per entry: aya 0.14 has no batch update) into fresh BPF maps. iptables: `iptables-restore --noflush` of kube-proxy's full-sync input, with the legacy backend and the nf_tables one ({}); nftables: `nft -f` of kube-proxy's nftables-mode rules in one transaction, as kube-proxy sends them ({}). One endpoint change: one endpoint added to or removed from one Service; ours: the agent's incremental sync of that Service; iptables: kube-proxy's partial restore (KUBE-SERVICES rewritten whole, plus the changed Service's chains); nftables: the changed Service's chains in one transaction. External tools are timed from process start to exit, as kube-proxy waits for them, and stopped after {} s.\n\n",
        version("iptables"),
        version("nft"),
        limit.as_secs(),
    ));
    s.push_str("| Services | iptables rules | install: ours | iptables-legacy | iptables-nft | nftables | ours/legacy | ours/iptables-nft | ours/nftables |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let show = |r: &Result<Duration, String>| match r {
        Ok(d) => ms(*d),
        Err(e) => e.clone(),
    };
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(r.services),
            thousands(r.iptables_rules),
            show(&r.ours.install),
            show(&r.iptables[0].install),
            show(&r.iptables[1].install),
            show(&r.nftables.install),
            ratio(&r.ours.install, &r.iptables[0].install),
            ratio(&r.ours.install, &r.iptables[1].install),
            ratio(&r.ours.install, &r.nftables.install),
        ));
    }
    s.push_str("\n| Services | one endpoint change, p50 (p99) [count]: ours | iptables-legacy | iptables-nft | nftables | ours/legacy (p50) | ours/iptables-nft (p50) | ours/nftables (p50) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let pair = |p: &Programming| {
        if p.changes.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} ({}) [{}]",
                ms(percentile(&p.changes, 0.5)),
                ms(percentile(&p.changes, 0.99)),
                p.changes.len()
            )
        }
    };
    let p50 = |p: &Programming| {
        if p.changes.is_empty() {
            Err(String::new())
        } else {
            Ok(percentile(&p.changes, 0.5))
        }
    };
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(r.services),
            pair(&r.ours),
            pair(&r.iptables[0]),
            pair(&r.iptables[1]),
            pair(&r.nftables),
            ratio(&p50(&r.ours), &p50(&r.iptables[0])),
            ratio(&p50(&r.ours), &p50(&r.iptables[1])),
            ratio(&p50(&r.ours), &p50(&r.nftables)),
        ));
    }
    s.push_str("\nRatios are ours/theirs: below 1, ours is faster.\n\n");
    s
}

/// A tool's version line, for the report.
pub fn version(tool: &str) -> String {
    Command::new(tool)
        .arg(if tool == "nft" { "-v" } else { "-V" })
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{tool}: version unknown"))
}
