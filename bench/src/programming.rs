//! Rule programming: the time to install N Services from nothing, and to
//! apply one endpoint change, for the agent's sync engine (translation,
//! plan and map writes into real BPF maps) and for `iptables-restore` and
//! `nft -f` of the rules kube-proxy would write for the same Services.
//! Each family on its own: IPv4 Services against iptables and `table ip`,
//! IPv6 ones against ip6tables and `table ip6`, as kube-proxy's proxier of
//! each family writes them.
//!
//! iptables and nft run in a network namespace made for the purpose (and
//! removed after), so the host's own rules are never touched.

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_userspace::{datapath::loader, model::ServiceName, source::objects::ServiceChange};

use crate::{
    filler_services,
    kube_proxy::{self, Family, RuleFamily},
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

/// The iptables backends compared: the legacy (x_tables) one and the
/// nf_tables one (Debian's default `iptables`); kube-proxy uses whichever
/// the host does.
const IPTABLES_BACKENDS: [&str; 2] = ["legacy", "nft"];

/// The binary of iptables backend `slot` for `family`: `iptables-legacy`,
/// `ip6tables-nft`...
fn iptables_binary(family: Family, slot: usize) -> String {
    format!("{}-{}", family.iptables(), IPTABLES_BACKENDS[slot])
}

/// The external tools of a row, as progress and the give-up list name
/// them: the two iptables binaries, then `nft ip` or `nft ip6`.
fn tools(family: Family) -> [String; 3] {
    [
        iptables_binary(family, 0),
        iptables_binary(family, 1),
        format!("nft {}", family.nft()),
    ]
}

#[derive(Clone, Debug)]
pub struct ProgrammingRow {
    pub services: usize,
    /// Of the Services, and of the rule sets they are compared with.
    pub family: Family,
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
) -> (usize, Vec<(IpAddr, u16)>) {
    let i = (c * 7919) % ports.len();
    let mut removed = Vec::new();
    if ports[i].endpoints.len() == endpoints {
        let family = ports[i].family();
        ports[i]
            .endpoints
            .push((crate::filler_endpoint_ip(family, i, 63), 8080));
    } else {
        removed.extend(ports[i].endpoints.pop());
    }
    (i, removed)
}

/// The agent's sync engine on fresh, unpinned maps.
fn ours(family: Family, n: usize, endpoints: usize, changes: usize) -> Result<Programming> {
    // Sized as the capacity flags would be for this set (and its changes).
    let sizes = crate::map_sizes(n, n * endpoints + changes, n * (1 + endpoints) + changes);
    let mut ebpf = crate::load_sized(sizes)?;
    let maps = loader::take_maps(&mut ebpf)?;
    let mut programmer = crate::programmer_on(maps, &sizes);
    let mut ports = filler_services(family, n, endpoints);
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
                name: ports[i].name.as_str().into(),
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

/// `binary` (`iptables-legacy`, `ip6tables-nft`...) of `family`'s rules.
fn iptables(
    (binary, family): (&str, Family),
    n: usize,
    endpoints: usize,
    changes: usize,
    limit: Duration,
) -> Result<(Programming, usize)> {
    let ns = Netns::create(&format!("lbt-{}-bench-ipt", std::process::id()))?;
    install_iptables_jumps(&ns, binary).context("kube-proxy's jump rules")?;
    let mut ports = filler_services(family, n, endpoints);
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

/// `nft -f` of `family`'s table (`ip` or `ip6 kube-proxy`).
fn nftables(
    family: Family,
    n: usize,
    endpoints: usize,
    changes: usize,
    limit: Duration,
) -> Result<Programming> {
    let ns = Netns::create(&format!("lbt-{}-bench-nft", std::process::id()))?;
    let mut ports = filler_services(family, n, endpoints);
    let text = kube_proxy::nft_full(family, &ports);
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

/// Tools that did not finish at a smaller size: (tool, size).
type GaveUp = Vec<(String, usize)>;

/// Measures every mode at each size, for each of `families` (IPv4 and
/// IPv6 rows side by side). `changes` endpoint changes each (fewer for
/// iptables at large sizes, where one takes seconds). A tool that takes
/// longer than `limit` to install is stopped there and not run at larger
/// sizes.
pub fn measure(
    sizes: &[usize],
    families: &[Family],
    endpoints: usize,
    changes: usize,
    limit: Duration,
) -> Result<Vec<ProgrammingRow>> {
    let mut rows = Vec::new();
    let mut gave_up = GaveUp::new();
    for &n in sizes {
        for &family in families {
            let row = measure_row(family, n, endpoints, changes, limit, &gave_up)?;
            for (tool, p) in tools(family).into_iter().zip(row.theirs()) {
                if p.install
                    .as_ref()
                    .is_err_and(|e| e.starts_with("did not finish"))
                {
                    gave_up.push((tool, n));
                }
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Every mode at one size and family; tools in `gave_up` are not run.
fn measure_row(
    family: Family,
    n: usize,
    endpoints: usize,
    changes: usize,
    limit: Duration,
    gave_up: &GaveUp,
) -> Result<ProgrammingRow> {
    let skipped = |tool: &str| -> Option<Programming> {
        let (_, at) = gave_up.iter().find(|(t, _)| t == tool)?;
        Some(Programming {
            install: Err(format!("not run (over the limit at {})", thousands(*at))),
            changes: Vec::new(),
        })
    };
    let secs = limit.as_secs();
    progress(&format!(
        "programming {n} {family} Services x {endpoints} endpoints: lb-agent's sync engine"
    ));
    let ours = ours(family, n, endpoints, changes)?;
    // A change takes seconds for iptables at these sizes.
    let few = match n {
        0..10_000 => changes,
        10_000..30_000 => changes.min(10),
        _ => changes.min(5),
    };
    let tools = tools(family);
    let mut row = ProgrammingRow {
        services: n,
        family,
        ours,
        iptables: Default::default(),
        nftables: Programming::default(),
        iptables_rules: 0,
    };
    for (slot, binary) in tools[..2].iter().enumerate() {
        row.iptables[slot] = if let Some(p) = skipped(binary) {
            p
        } else {
            progress(&format!(
                "programming {n} {family} Services: {binary}-restore (limit {secs} s)"
            ));
            let (p, rules) = iptables((binary, family), n, endpoints, few, limit)?;
            row.iptables_rules = rules;
            p
        };
    }
    row.nftables = if let Some(p) = skipped(&tools[2]) {
        p
    } else {
        progress(&format!(
            "programming {n} {family} Services: nft -f, table {} kube-proxy (limit {secs} s)",
            family.nft()
        ));
        nftables(family, n, endpoints, few, limit)?
    };
    let show = |p: &Programming| match &p.install {
        Ok(d) => ms(*d),
        Err(e) => e.clone(),
    };
    let theirs: Vec<String> = tools
        .iter()
        .zip(row.theirs())
        .map(|(tool, p)| format!("{tool} {}", show(p)))
        .collect();
    progress(&format!(
        "install {n} {family}: ours {}, {}",
        show(&row.ours),
        theirs.join(", ")
    ));
    Ok(row)
}

impl ProgrammingRow {
    /// The external tools' figures, in `tools` order.
    fn theirs(&self) -> [&Programming; 3] {
        [&self.iptables[0], &self.iptables[1], &self.nftables]
    }
}

fn ratio(ours: &Result<Duration, String>, theirs: &Result<Duration, String>) -> String {
    match (ours, theirs) {
        (Ok(a), Ok(b)) => format!("{:.3}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

fn show(r: &Result<Duration, String>) -> String {
    match r {
        Ok(d) => ms(*d),
        Err(e) => e.clone(),
    }
}

/// "p50 (p99) [count]" of one mode's endpoint changes.
fn changes_cell(p: &Programming) -> String {
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
}

fn p50(p: &Programming) -> Result<Duration, String> {
    if p.changes.is_empty() {
        Err(String::new())
    } else {
        Ok(percentile(&p.changes, 0.5))
    }
}

pub fn markdown(rows: &[ProgrammingRow], endpoints: usize, limit: Duration) -> String {
    let mut s = String::from("## Rule programming\n\n");
    s.push_str(&format!(
        "Install: N Services x {endpoints} endpoints from nothing, for each family on its own: IPv4 Services, and IPv6 SingleStack ones (kube-proxy runs one proxier per family: ip6tables, and nftables' `table ip6 kube-proxy`). Ours: the agent's sync engine (translation of the Service and EndpointSlice objects, plan, one map write per entry: aya 0.14 has no batch update) into fresh BPF maps. iptables: `iptables-restore --noflush` (`ip6tables-restore` for IPv6) of kube-proxy's full-sync input, with the legacy backend and the nf_tables one ({}); nftables: `nft -f` of kube-proxy's nftables-mode rules in one transaction, as kube-proxy sends them ({}). One endpoint change: one endpoint added to or removed from one Service; ours: the agent's incremental sync of that Service; iptables: kube-proxy's partial restore (KUBE-SERVICES rewritten whole, plus the changed Service's chains); nftables: the changed Service's chains in one transaction. External tools are timed from process start to exit, as kube-proxy waits for them, and stopped after {} s.\n\n",
        version("iptables"),
        version("nft"),
        limit.as_secs(),
    ));
    s.push_str("| Services | family | ip(6)tables rules | install: ours | ip(6)tables-legacy | ip(6)tables-nft | nftables | ours/legacy | ours/ip(6)tables-nft | ours/nftables |\n| ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let theirs = r.theirs();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            thousands(r.services),
            r.family,
            thousands(r.iptables_rules),
            show(&r.ours.install),
            theirs.map(|p| show(&p.install)).join(" | "),
            theirs
                .map(|p| ratio(&r.ours.install, &p.install))
                .join(" | "),
        ));
    }
    s.push_str("\n| Services | family | one endpoint change, p50 (p99) [count]: ours | ip(6)tables-legacy | ip(6)tables-nft | nftables | ours/legacy (p50) | ours/ip(6)tables-nft (p50) | ours/nftables (p50) |\n| ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let theirs = r.theirs();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            thousands(r.services),
            r.family,
            changes_cell(&r.ours),
            theirs.map(changes_cell).join(" | "),
            theirs.map(|p| ratio(&p50(&r.ours), &p50(p))).join(" | "),
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
