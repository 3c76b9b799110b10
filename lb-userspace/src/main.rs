//! lb-agent: the userspace half of the load balancer.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::{map_names, stats, DEFAULT_PIN_DIR};
use lb_userspace::{
    datapath::attach::{
        default_route_interfaces, ensure_cgroup2, netns_cookie, Attachments, SocketLbMode,
        XdpAttachMode,
    },
    datapath::inspect,
    datapath::loader,
    datapath::wire_hook::WireHookMode,
    node::masquerade_ports::{self, PortRange},
    node::node_net,
    seccomp_profile,
    serve::health_check::HealthServer,
    serve::metrics::{render_counters, InvalidLabel, Metrics, ResourceLabel, WireHookLabel},
    serve::proxy_health::{self, ProxyHealth},
    source::api_client::{self, ApiClientOptions, ApiServerAddress},
    source::k8s::{self, ClusterState, Work},
    source::manifests::ManifestSource,
    sync::map_writer::BpfMaps,
    sync::programmer::{Programmer, SyncReport},
    translate::NodeInfo,
};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF/XDP Service load balancer for Kubernetes (kube-proxy replacement)"
)]
struct Cli {
    /// bpffs folder holding the pinned maps.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data path and keep its maps equal to the desired Services.
    Run(Box<RunArgs>),
    /// Print the Services and backends the pinned maps hold.
    Services {
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print where the programs are attached: each wire interface's hook
    /// (tc or XDP), its driver and why, the pod interfaces, the socket hooks.
    Status {
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the data path's packet counters (summed over CPUs).
    Stats {
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Compare the pinned maps with the desired state, entry by entry;
    /// exits 1 when they differ, listing every difference.
    Check(Box<CheckArgs>),
    /// Remove the pinned links (which detaches the programs) and maps.
    Cleanup,
    /// Print the seccomp profile the agent's container needs (the system
    /// calls the agent makes, `bpf` among them, which the runtimes' default
    /// profile refuses), or write it to --output, e.g. into the kubelet's
    /// /var/lib/kubelet/seccomp for a Localhost profile.
    SeccompProfile {
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Where the agent finds (or mounts) the cgroup v2 root by default.
const DEFAULT_CGROUP_ROOT: &str = "/run/lb-agent/cgroupv2";

/// What the translation depends on about this node.
#[derive(clap::Args)]
struct NodeArgs {
    /// This node's name (for node-local decisions), as in the DaemonSet's downward API.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Interfaces facing the wire, where the wire hook (tc or XDP, see
    /// --wire-hook) attaches (comma separated). Default: the interfaces
    /// that hold a default route.
    #[arg(long, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Serve NodePorts on the local addresses inside these CIDRs (comma
    /// separated), like kube-proxy's --nodeport-addresses. Default: the
    /// addresses of the --interfaces (the wire-facing ones).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<lb_userspace::model::Ipv4Prefix>,
    /// This node's zone, for EndpointSlice topology hints. Default: the
    /// Node's `topology.kubernetes.io/zone` label (Kubernetes source only).
    #[arg(long)]
    zone: Option<String>,
}

impl NodeArgs {
    /// The interfaces facing the wire: --interfaces, or those holding a
    /// default route.
    fn wire(&self) -> Vec<String> {
        if self.interfaces.is_empty() {
            default_route_interfaces()
        } else {
            self.interfaces.clone()
        }
    }

    fn nodeport_addresses(&self, wire: &[String]) -> Result<Vec<std::net::Ipv4Addr>> {
        let addresses = node_net::interface_addresses()?;
        Ok(node_net::nodeport_addresses(
            &addresses,
            wire,
            &self.nodeport_addresses,
        ))
    }
}

#[derive(clap::Args)]
struct CheckArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The agent's node flags, so the desired state is the one it computes.
    #[command(flatten)]
    node: NodeArgs,
}

/// Where Services and EndpointSlices come from.
#[derive(clap::Args)]
struct SourceArgs {
    /// Read Services and EndpointSlices from this folder of manifests (YAML/JSON,
    /// multi-document) instead of the Kubernetes API. `run` re-reads it when a
    /// file changes or on SIGHUP and writes only the difference.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig. Without it (and without
    /// --manifests) the in-cluster config is used, or the default kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's own address (https://HOST:PORT: a control-plane
    /// node or the load balancer in front of them). Required in a pod: the
    /// in-cluster address is the `kubernetes` Service, which nothing
    /// translates after a node reboot until this agent has read the API.
    /// `kubernetes-service` keeps the in-cluster address (where another
    /// proxy still translates it). With --kubeconfig, replaces its server.
    #[arg(long, env = api_client::API_SERVER_ENV, value_parser = api_client::parse_api_server)]
    api_server: Option<ApiServerAddress>,
    /// Every API request must connect and start answering within this;
    /// the API server is probed this often, and after three times this
    /// without an answer /readyz reports not ready (the data path keeps
    /// what it last programmed).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    api_timeout: Duration,
}

impl SourceArgs {
    fn api_options(&self) -> ApiClientOptions<'_> {
        ApiClientOptions {
            kubeconfig: self.kubeconfig.as_deref(),
            api_server: self.api_server.as_ref(),
            timeout: self.api_timeout,
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:10249).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Serve kube-proxy's /healthz and /livez here (the address cloud load
    /// balancers probe for externalTrafficPolicy Cluster); `off` to not.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_healthz_addr)]
    healthz_addr: HealthzAddr,
    /// How long a received change may wait to be written before /healthz,
    /// /livez and every healthCheckNodePort report 503 (kube-proxy: twice
    /// its sync period, 60 s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    healthz_timeout: Duration,
    /// Capacity of the backends map (one entry per distinct endpoint
    /// address, port and protocol). A Service whose backends do not fit is
    /// left as it was, reported, and makes /healthz 503 after
    /// --healthz-timeout.
    #[arg(long, default_value_t = lb_common::MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(16..=(1 << 24)))]
    backends_max: u32,
    /// Host-side pod veth names where tc attaches (`*` wildcards, comma separated).
    /// Rescanned every --poll-interval, so new pods are covered.
    #[arg(long, value_delimiter = ',', default_value = "lxc*,veth*,cali*")]
    pod_interfaces: Vec<String>,
    /// The program on the --interfaces: `tc` (tcx, right for every
    /// checksum state), `xdp` (faster, but corrupts packets that arrive
    /// with partial checksums, as from a veth), or `auto`: XDP in native
    /// mode on NIC drivers known to deliver complete checksums, tc on
    /// everything else (veth, tap, bridges, unknown drivers).
    #[arg(long, value_enum, default_value_t = WireHookMode::Auto)]
    wire_hook: WireHookMode,
    /// How XDP attaches where --wire-hook xdp puts it (auto: native, else
    /// generic). `--wire-hook auto` uses native mode only.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
    xdp_mode: XdpAttachMode,
    /// How often to look for changed manifests and new pod interfaces.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Written (atomically) after every sync with its generation and outcome.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Source address of masqueraded flows (NodePort, externalIPs and
    /// LoadBalancer traffic with externalTrafficPolicy Cluster, and pods
    /// reaching themselves through a Service). Default: the first NodePort
    /// address.
    #[arg(long)]
    masquerade_address: Option<std::net::Ipv4Addr>,
    /// Source ports of masqueraded flows (comma separated ports and
    /// FIRST-LAST ranges, at most 4). They must not overlap the node's
    /// ephemeral ports (net.ipv4.ip_local_port_range), its reserved ports
    /// (net.ipv4.ip_local_reserved_ports) or --nodeport-range. Default:
    /// 1024-65535 without those. A closed flow's port is kept 120 s (TIME_WAIT),
    /// so one backend takes at most (ports / 120 s) new masqueraded
    /// connections per second.
    #[arg(long, value_delimiter = ',')]
    masquerade_ports: Vec<PortRange>,
    /// The cluster's NodePort range (the API server's
    /// --service-node-port-range), kept out of the masquerade ports.
    #[arg(long, default_value = "30000-32767")]
    nodeport_range: PortRange,
    /// Socket-level load balancing (cgroup connect/sendmsg/recvmsg/getpeername
    /// hooks): `all` sockets in --cgroup, the `host` network namespace only,
    /// or `off` (the per-packet paths do all the work).
    #[arg(long, value_enum, default_value_t = SocketLbMode::All)]
    socket_lb: SocketLbMode,
    /// The cgroup v2 folder the socket hooks attach to. The default is the
    /// v2 root, mounted there when it is not yet (the root covers every
    /// process of the node, also where /sys/fs/cgroup holds v1 controllers).
    #[arg(long, default_value = DEFAULT_CGROUP_ROOT)]
    cgroup: PathBuf,
    /// Capacity of the conntrack map (an LRU: two entries a flow; the least
    /// recently used are evicted when it is full). A pinned map of another
    /// size is migrated entry by entry, flows keeping their backends.
    #[arg(long, default_value_t = lb_common::MAX_CONNTRACK,
          value_parser = clap::value_parser!(u32).range(64..))]
    conntrack_max: u32,
    /// Capacity of the session affinity map (an LRU: one entry per client
    /// and frontend with ClientIP affinity; idle clients are evicted first).
    #[arg(long, default_value_t = lb_common::MAX_AFFINITY,
          value_parser = clap::value_parser!(u32).range(64..))]
    affinity_max: u32,
    /// How often the conntrack map is swept for entries of deleted backends
    /// and expired ones (also soon after a sync that deleted backends).
    #[arg(long, default_value = "30s", value_parser = parse_sweep_interval)]
    conntrack_sweep_interval: Duration,
    /// Remove everything the agent installed (pinned links, which detaches the
    /// programs, and pinned maps) and exit. Same as `lb-agent cleanup`.
    #[arg(long)]
    cleanup: bool,
}

/// `--healthz-addr`: an address, or off.
#[derive(Clone, Copy, Debug)]
struct HealthzAddr(Option<std::net::SocketAddr>);

fn parse_healthz_addr(s: &str) -> Result<HealthzAddr, String> {
    match s {
        "" | "off" => Ok(HealthzAddr(None)),
        _ => s
            .parse()
            .map(|a| HealthzAddr(Some(a)))
            .map_err(|e| format!("{s:?}: {e}")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("bad duration unit in {s:?} (use ms or s)")),
    }
}

/// At least a second: a pass over a full map is a lot of syscalls.
fn parse_sweep_interval(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(|d| {
        if d >= Duration::from_secs(1) {
            Ok(d)
        } else {
            Err(format!("{s:?} is under a second"))
        }
    })
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(&cli.pin_dir, *args)),
        Command::Services { output } => {
            let maps = loader::open_pinned(&cli.pin_dir)?;
            let services = inspect::programmed_services(&maps.read_contents()?);
            match output {
                Output::Table => print!("{}", inspect::render_table(&services)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&services)?),
            }
            Ok(())
        }
        Command::Stats { output } => print_stats(&cli.pin_dir, output),
        Command::Status { output } => {
            let status = inspect::attach_status(&cli.pin_dir);
            match output {
                Output::Table => print!("{}", inspect::render_status(&status)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
            }
            Ok(())
        }
        Command::Check(args) => {
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(check(&cli.pin_dir, &args)));
            match report {
                Ok(report) if report.is_equal() => {
                    println!("{report}");
                    Ok(())
                }
                Ok(report) => {
                    print!("{report}");
                    std::process::exit(1)
                }
                // Told apart from "the maps differ".
                Err(e) => {
                    eprintln!("lb-agent check: {e:#}");
                    std::process::exit(2)
                }
            }
        }
        Command::Cleanup => {
            for p in loader::cleanup(&cli.pin_dir)? {
                println!("removed {}", p.display());
            }
            Ok(())
        }
        Command::SeccompProfile { output: None } => {
            print!("{}", seccomp_profile::PROFILE);
            Ok(())
        }
        Command::SeccompProfile { output: Some(path) } => {
            seccomp_profile::write(&path)?;
            println!("wrote {}", path.display());
            Ok(())
        }
    }
}

/// Translates the source the way the agent does and compares the result
/// with the pinned maps.
async fn check(
    pin_dir: &Path,
    args: &CheckArgs,
) -> Result<lb_userspace::sync::checker::CheckReport> {
    let wire = args.node.wire();
    let mut node = NodeInfo {
        name: args.node.node_name.clone().unwrap_or_default(),
        nodeport_addresses: args.node.nodeport_addresses(&wire)?,
        zone: args.node.zone.clone(),
    };
    let (services, slices) = if let Some(dir) = &args.source.manifests {
        let (set, errors) = ManifestSource::new(dir).read();
        for e in errors {
            eprintln!("manifest: {e}");
        }
        (set.services, set.slices)
    } else {
        let client = api_client::client(&args.source.api_options()).await?;
        let (services, slices, zone) =
            k8s::list_once(client, args.node.node_name.as_deref()).await?;
        if node.zone.is_none() {
            node.zone = zone;
        }
        (services, slices)
    };
    let translation = lb_userspace::translate::translate_on(&node, &services, &slices);
    for e in &translation.errors {
        eprintln!("not programmable: {e}");
    }
    let maps = loader::open_pinned(pin_dir)?;
    let contents = maps.read_contents().context("reading the pinned maps")?;
    Ok(lb_userspace::sync::checker::check(
        &translation.state,
        &contents,
    ))
}

fn print_stats(pin_dir: &Path, output: Output) -> Result<()> {
    let path = loader::map_pin_path(pin_dir, map_names::STATS);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let array: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    let mut rows = Vec::new();
    for (i, name) in stats::NAMES.iter().enumerate() {
        let total: u64 = array.get(&(i as u32), 0)?.iter().sum();
        rows.push((*name, total));
    }
    match output {
        Output::Table => {
            for (name, v) in rows {
                println!("{name:<22} {v}");
            }
        }
        Output::Json => {
            let m: serde_json::Map<String, serde_json::Value> = rows
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect();
            println!("{}", serde_json::Value::Object(m));
        }
    }
    Ok(())
}

/// What every sync reports to logs and the ready file.
struct SyncLog {
    ready_file: Option<PathBuf>,
    generation: u64,
}

impl SyncLog {
    fn record(&mut self, kind: &str, report: &SyncReport, started: Instant) -> Result<()> {
        self.generation += 1;
        for e in &report.errors {
            log::error!("{e}");
        }
        log::info!(
            "sync {} ({kind}): {} frontends, {} backends, {} map writes, {} errors, {:?}",
            self.generation,
            report.frontends,
            report.backends,
            report.writes,
            report.errors.len(),
            started.elapsed()
        );
        if let Some(path) = &self.ready_file {
            let tmp = path.with_extension("tmp");
            fs::write(
                &tmp,
                format!(
                    "generation {}\nfrontends {}\nbackends {}\nwrites {}\nerrors {}\n",
                    self.generation,
                    report.frontends,
                    report.backends,
                    report.writes,
                    report.errors.len()
                ),
            )?;
            fs::rename(&tmp, path)?;
        }
        Ok(())
    }
}

/// The loaded data path, and the node-side servers that go with it.
struct DataPath {
    ebpf: aya::Ebpf,
    attachments: Attachments,
    health: HealthServer,
    /// The proxy's own health (`--healthz-addr`, healthCheckNodePorts).
    proxy: Arc<ProxyHealth>,
    socket_lb: SocketLbMode,
    pin_dir: PathBuf,
    /// Interfaces facing the wire.
    wire: Vec<String>,
    wire_hook: WireHookMode,
    xdp_mode: XdpAttachMode,
    cgroup: PathBuf,
    /// Pinned maps of an older layout being migrated.
    pinned: loader::PinnedState,
    /// Whether this agent's programs are attached (after its first sync).
    attached: bool,
    /// Wakes the conntrack sweep, which runs once this agent's programs
    /// are attached (before, the old programs' maps are not its to judge).
    sweep: Option<std::sync::mpsc::SyncSender<()>>,
    sweep_interval: Duration,
    metrics: Arc<Metrics>,
}

impl DataPath {
    /// What follows every sync, whichever the source: names for metrics,
    /// health check ports, stale UDP sockets, this agent's programs
    /// attached (after its first sync), the sweep woken, readiness, and the
    /// proxy's health (updated when everything reached the maps).
    fn after_sync(
        &mut self,
        programmer: &mut Programmer<BpfMaps>,
        report: &SyncReport,
    ) -> Result<()> {
        publish_names(programmer);
        self.health.update(programmer.health.values());
        self.close_stale_udp(report);
        self.attach_after_first_sync(&mut programmer.writer)?;
        self.wake_sweep(report);
        self.metrics.set_ready();
        if report.complete {
            self.proxy.updated();
        }
        for note in &report.notes {
            log::debug!("{note}");
        }
        Ok(())
    }

    /// Host sockets connected (translated at connect()) to UDP backends a
    /// sync deleted are closed; pods' connected UDP goes per packet and
    /// moves by itself.
    fn close_stale_udp(&self, report: &SyncReport) {
        if self.socket_lb == SocketLbMode::Off || report.deleted_udp_backends.is_empty() {
            return;
        }
        if let Err(e) = node_net::destroy_udp_sockets_to(&report.deleted_udp_backends).map(|_| ()) {
            log::warn!("closing UDP sockets connected to deleted backends: {e:#}");
        }
    }

    /// A sync that deleted backends left conntrack entries to sweep.
    fn wake_sweep(&self, report: &SyncReport) {
        if let Some(tx) = self.sweep.as_ref().filter(|_| report.deleted_backends > 0) {
            // Full: a sweep is already due.
            let _ = tx.try_send(());
        }
    }

    fn refresh_pods(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        for (name, how) in self.attachments.refresh_pod_interfaces(&mut self.ebpf)? {
            log::info!("tc on pod interface {name}: {how:?}");
        }
        Ok(())
    }

    /// Attaches this agent's programs once its maps hold the desired state
    /// (after the first sync). Until then the previous agent's programs, if
    /// any, keep serving from their maps; pinned links are swapped
    /// atomically, so no packet sees an empty hook or a half-filled map.
    fn attach_after_first_sync(&mut self, maps: &mut BpfMaps) -> Result<()> {
        if self.attached {
            return Ok(());
        }
        for iface in &self.wire {
            let a = self.attachments.attach_wire(
                &mut self.ebpf,
                iface,
                self.wire_hook,
                self.xdp_mode,
            )?;
            log::info!("{a}");
            self.metrics.record_wire_hook(WireHookLabel {
                interface: a.interface.clone(),
                hook: a.hook.name().into(),
                driver: a.driver.clone(),
                reason: a.reason.label().into(),
            });
        }
        if self.socket_lb == SocketLbMode::Off {
            self.attachments.detach_cgroup();
        } else {
            if self.cgroup == Path::new(DEFAULT_CGROUP_ROOT) {
                ensure_cgroup2(&self.cgroup)?;
            }
            self.attachments
                .attach_cgroup(&mut self.ebpf, &self.cgroup)?;
            log::info!(
                "socket-level load balancing ({:?}) on cgroup {}",
                self.socket_lb,
                self.cgroup.display()
            );
        }
        self.attached = true;
        self.refresh_pods()?;
        if !self.pinned.migrated.is_empty() {
            // The old programs are gone from every hook: what they wrote
            // last is copied, then lookups stop falling back to the old map.
            let copied = loader::finish_migration(&self.pin_dir, &self.pinned)?;
            maps.set_conntrack_migrating(false)
                .context("ending the conntrack migration")?;
            log::info!(
                "migration of pinned maps finished (entries copied after the switch: {copied:?})"
            );
            self.pinned.migrated.clear();
        }
        self.sweep = Some(lb_userspace::datapath::conntrack_sweep::start(
            self.pin_dir.clone(),
            self.sweep_interval,
            self.metrics.clone(),
        )?);
        Ok(())
    }
}

fn setup_datapath(
    pin_dir: &Path,
    args: &RunArgs,
    metrics: &Arc<Metrics>,
    proxy: &Arc<ProxyHealth>,
) -> Result<(DataPath, Programmer<BpfMaps>)> {
    let NodeSide {
        wire,
        nodeport_addresses,
        datapath,
    } = node_side(args)?;
    let config = loader::LoadConfig {
        sizes: loader::MapSizes {
            conntrack: args.conntrack_max,
            affinity: args.affinity_max,
            backends: args.backends_max,
        },
        snat_ports: snat_ports(args)?,
        datapath,
    };
    let (mut ebpf, pinned) = loader::load(pin_dir, &config)?;
    let (maps, current, pinned) = adopt_maps(pin_dir, &mut ebpf, pinned)?;
    let attachments = Attachments::new(&mut ebpf, pin_dir, args.pod_interfaces.clone())?;
    for iface in &wire {
        node_net::set_accept_local(iface)?;
    }
    let dp = DataPath {
        ebpf,
        attachments,
        health: HealthServer::new(nodeport_addresses.clone(), proxy.clone()),
        proxy: proxy.clone(),
        socket_lb: args.socket_lb,
        pin_dir: pin_dir.to_owned(),
        wire,
        wire_hook: args.wire_hook,
        xdp_mode: args.xdp_mode,
        cgroup: args.cgroup.clone(),
        pinned,
        attached: false,
        sweep: None,
        sweep_interval: args.conntrack_sweep_interval,
        metrics: metrics.clone(),
    };
    install_datapath_metrics(pin_dir, metrics)?;
    let mut programmer = Programmer::new(maps, current, metrics.clone());
    programmer.limits.backend_ids = args.backends_max - 1;
    programmer.node = NodeInfo {
        name: args.node.node_name.clone().unwrap_or_default(),
        nodeport_addresses,
        zone: args.node.zone.clone(),
    };
    Ok((dp, programmer))
}

/// The loaded object's maps with what they hold: pinned maps adopted (of
/// an older layout, their ids copied first, so the agent reads the maps it
/// adopts), the conntrack migration flag set.
fn adopt_maps(
    pin_dir: &Path,
    ebpf: &mut aya::Ebpf,
    mut pinned: loader::PinnedState,
) -> Result<(
    BpfMaps,
    lb_userspace::sync::differ::MapContents,
    loader::PinnedState,
)> {
    if !pinned.migrated.is_empty() {
        // Then a first copy of flow-independent state. Conntrack is looked
        // up in the old map on a miss and written to both until the switch
        // is over.
        let copied = loader::copy_before_switch(pin_dir, &mut pinned)?;
        log::info!("migrating pinned maps of an older layout: {copied:?} entries copied");
    }
    let mut maps = loader::take_maps(ebpf)?;
    let current = maps.read_contents().context("reading the pinned maps")?;
    if !current.services.is_empty() {
        log::info!(
            "adopted pinned maps at {}: {} service slots, {} backends",
            pin_dir.display(),
            current.services.len(),
            current.backends.len()
        );
    }
    maps.set_conntrack_migrating(pinned.conntrack_migrated().is_some())
        .context("writing the conntrack migration flag")?;
    Ok((maps, current, pinned))
}

/// The node's side of the data path, found before the programs load: the
/// wire interfaces, the NodePort addresses, and the load-time
/// configuration (masquerade address, socket LB mode).
struct NodeSide {
    wire: Vec<String>,
    nodeport_addresses: Vec<std::net::Ipv4Addr>,
    datapath: lb_common::DatapathConfig,
}

fn node_side(args: &RunArgs) -> Result<NodeSide> {
    let wire = args.node.wire();
    if wire.is_empty() {
        log::warn!("no interface faces the wire (no default route and no --interfaces): XDP is not attached");
    }
    let nodeport_addresses = args.node.nodeport_addresses(&wire)?;
    let masquerade = args
        .masquerade_address
        .or_else(|| nodeport_addresses.first().copied());
    match masquerade {
        Some(a) => log::info!("NodePorts on {nodeport_addresses:?}; masquerading to {a}"),
        None => log::warn!(
            "no NodePort address and no --masquerade-address: flows that need masquerading are dropped (counted as snat_failed)"
        ),
    }
    let datapath = lb_common::DatapathConfig {
        host_netns_cookie: netns_cookie()?,
        masquerade_addr: masquerade.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        socket_lb_mode: args.socket_lb.config_value(),
    };
    Ok(NodeSide {
        wire,
        nodeport_addresses,
        datapath,
    })
}

/// The masquerade port ranges: --masquerade-ports checked against the
/// node's own ports, or the default carved around them.
fn snat_ports(args: &RunArgs) -> Result<lb_common::SnatPorts> {
    let node = masquerade_ports::read_node_ports(args.nodeport_range)
        .context("reading the node's ephemeral and reserved ports")?;
    let ranges = if args.masquerade_ports.is_empty() {
        masquerade_ports::default_ranges(&node)?
    } else {
        masquerade_ports::check_ranges(&args.masquerade_ports, &node)
            .context("--masquerade-ports")?;
        args.masquerade_ports.clone()
    };
    log::info!(
        "masquerade ports {} ({} ports; node ephemeral ports {}, reserved {}, NodePorts {})",
        masquerade_ports::display(&ranges),
        masquerade_ports::count(&ranges),
        node.ephemeral,
        masquerade_ports::display(&node.reserved),
        node.node_port_range
    );
    Ok(masquerade_ports::to_global(&ranges)?)
}

/// Per-Service and data path counters, read from the per-CPU maps at scrape time.
fn install_datapath_metrics(pin_dir: &Path, metrics: &Arc<Metrics>) -> Result<()> {
    let open = |name: &str| aya::maps::MapData::from_pin(loader::map_pin_path(pin_dir, name));
    let stats: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(map_names::STATS)?))?;
    let svc_stats: aya::maps::PerCpuArray<_, lb_common::ServiceStats> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(
            map_names::SERVICE_STATS,
        )?))?;
    let names = REV_NAT_NAMES.clone();
    *metrics.datapath.lock().expect("metrics lock") = Box::new(move || {
        let mut rows = Vec::new();
        for (i, name) in stats::NAMES.iter().enumerate() {
            let v: u64 = stats.get(&(i as u32), 0).map_or(0, |p| p.iter().sum());
            rows.push((vec![("counter", (*name).to_owned())], v));
        }
        let mut out = render_counters(
            "lb_datapath_packets",
            "Data path events by kind, summed over CPUs",
            &rows,
        );
        let (mut packets, mut bytes) = (Vec::new(), Vec::new());
        for (id, (service, frontend)) in names.lock().expect("names lock").iter() {
            let Ok(per_cpu) = svc_stats.get(&u32::from(*id), 0) else {
                continue;
            };
            let (p, b) = per_cpu
                .iter()
                .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes));
            let labels = vec![("service", service.clone()), ("frontend", frontend.clone())];
            packets.push((labels.clone(), p));
            bytes.push((labels, b));
        }
        out.push_str(&render_counters(
            "lb_service_packets",
            "Packets translated to a backend per Service frontend",
            &packets,
        ));
        out.push_str(&render_counters(
            "lb_service_bytes",
            "IP bytes translated to a backend per Service frontend",
            &bytes,
        ));
        out
    });
    Ok(())
}

type NameTable = Arc<std::sync::Mutex<std::collections::BTreeMap<u16, (String, String)>>>;
static REV_NAT_NAMES: std::sync::LazyLock<NameTable> = std::sync::LazyLock::new(Default::default);

fn publish_names(p: &mut Programmer<BpfMaps>) {
    if let Some(names) = p.take_changed_names() {
        *REV_NAT_NAMES.lock().expect("names lock") = names;
    }
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

fn signals() -> Result<Signals> {
    Ok(Signals {
        hup: signal(SignalKind::hangup())?,
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    })
}

async fn run(pin_dir: &Path, args: RunArgs) -> Result<()> {
    if args.cleanup {
        for p in loader::cleanup(pin_dir)? {
            println!("removed {}", p.display());
        }
        return Ok(());
    }
    let metrics = Metrics::new();
    if let Some(addr) = args.metrics_addr {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = lb_userspace::serve::metrics::serve(addr, m).await {
                log::error!("metrics endpoint on {addr} failed: {e}");
            }
        });
    }
    let proxy = ProxyHealth::new(args.healthz_timeout);
    if let HealthzAddr(Some(addr)) = args.healthz_addr {
        let p = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy_health::serve(addr, p).await {
                log::error!("proxy health endpoint on {addr} failed: {e}");
            }
        });
    }
    // The API client first: an address that cannot work is refused before
    // anything is attached.
    let api = match &args.source.manifests {
        Some(_) => None,
        None => Some(api_client::client(&args.source.api_options()).await?),
    };
    let (mut dp, mut programmer) = setup_datapath(pin_dir, &args, &metrics, &proxy)?;
    let mut log = SyncLog {
        ready_file: args.ready_file.clone(),
        generation: 0,
    };
    let mut sig = signals()?;
    match (api, args.source.manifests.clone()) {
        (None, Some(dir)) => {
            run_manifests(
                &dir,
                &args,
                &mut dp,
                &mut programmer,
                &mut log,
                &metrics,
                &mut sig,
            )
            .await?;
        }
        (Some(client), _) => {
            spawn_api_probe(client.clone(), args.source.api_timeout, metrics.clone());
            run_kubernetes(
                client,
                &args,
                &mut dp,
                &mut programmer,
                &mut log,
                &metrics,
                &mut sig,
            )
            .await?;
        }
        (None, None) => unreachable!("no manifests means the API source"),
    }
    log::info!(
        "exiting: the programs stay attached through links pinned at {} (`lb-agent cleanup` removes them)",
        pin_dir.display()
    );
    Ok(())
}

async fn run_manifests(
    dir: &Path,
    args: &RunArgs,
    dp: &mut DataPath,
    programmer: &mut Programmer<BpfMaps>,
    log: &mut SyncLog,
    metrics: &Arc<Metrics>,
    sig: &mut Signals,
) -> Result<()> {
    let mut source = ManifestSource::new(dir);
    let mut sync =
        |source: &mut ManifestSource, log: &mut SyncLog, dp: &mut DataPath| -> Result<()> {
            let started = Instant::now();
            let (set, manifest_errors) = source.read();
            let mut report = programmer.full_sync(&set.services, &set.slices);
            for e in manifest_errors {
                metrics
                    .invalid_objects
                    .get_or_create(&InvalidLabel {
                        kind: "manifest".into(),
                    })
                    .inc();
                report.errors.insert(0, format!("manifest: {e}"));
            }
            dp.after_sync(programmer, &report)?;
            log.record("manifests", &report, started)
        };
    dp.proxy.queued_update();
    sync(&mut source, log, dp)?;
    let mut tick = tokio::time::interval(args.poll_interval);
    loop {
        tokio::select! {
            _ = sig.hup.recv() => {
                log::info!("SIGHUP: re-reading {}", dir.display());
                dp.proxy.queued_update();
                sync(&mut source, log, dp)?;
            }
            _ = sig.term.recv() => break,
            _ = sig.int.recv() => break,
            _ = tick.tick() => {
                if source.changed() {
                    dp.proxy.queued_update();
                    sync(&mut source, log, dp)?;
                }
                dp.refresh_pods()?;
            }
        }
    }
    Ok(())
}

/// Most changes folded into one sync; a burst (a relist) is written at once.
const MAX_BATCH: usize = 20_000;

/// Probes the API server in the background, for /readyz and the
/// `lb_api_server_up` metric.
fn spawn_api_probe(client: kube::Client, timeout: Duration, metrics: Arc<Metrics>) {
    tokio::spawn(api_client::probe_forever(
        client,
        timeout,
        move |reachable, unready| metrics.set_api_server(reachable, unready),
    ));
}

async fn run_kubernetes(
    client: kube::Client,
    args: &RunArgs,
    dp: &mut DataPath,
    programmer: &mut Programmer<BpfMaps>,
    log: &mut SyncLog,
    metrics: &Arc<Metrics>,
    sig: &mut Signals,
) -> Result<()> {
    if args.node.node_name.is_none() {
        log::warn!("no --node-name / NODE_NAME: node-local information is not watched");
    }
    let mut rx = k8s::start_watches(client, args.node.node_name.clone());
    let mut state = ClusterState::default();
    let mut needs_full = true;
    let mut tick = tokio::time::interval(args.poll_interval);
    loop {
        let first = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => anyhow::bail!("the watches ended"),
            },
            _ = sig.term.recv() => break,
            _ = sig.int.recv() => break,
            _ = sig.hup.recv() => { needs_full = true; continue; }
            _ = tick.tick() => { dp.refresh_pods()?; continue; }
        };
        let started = Instant::now();
        let work = receive_batch(first, &mut rx, &mut state);
        note_received(&work, &state, dp, metrics);
        needs_full |= work.full_resync;
        needs_full |= args.node.zone.is_none() && follow_node_zone(&state, programmer);
        // Nothing is written before both lists are complete: a restarted agent
        // keeps serving what the pinned maps hold until it knows the truth.
        if !state.synced() {
            continue;
        }
        let Some((kind, report)) = program(&state, &work, needs_full, programmer) else {
            continue;
        };
        let now = chrono::Utc::now();
        for t in state.take_triggers(&work.dirty, needs_full) {
            let secs = (now - t).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics.programming_latency.observe(secs.max(0.0));
        }
        needs_full = false;
        dp.after_sync(programmer, &report)?;
        log.record(kind, &report, started)?;
    }
    Ok(())
}

/// `first` and whatever else has arrived, up to MAX_BATCH changes, applied
/// to the cluster state.
fn receive_batch(
    first: k8s::Change,
    rx: &mut tokio::sync::mpsc::Receiver<k8s::Change>,
    state: &mut ClusterState,
) -> Work {
    let mut work = Work::default();
    state.apply(first, &mut work);
    for _ in 1..MAX_BATCH {
        let Ok(c) = rx.try_recv() else {
            break;
        };
        state.apply(c, &mut work);
    }
    work
}

/// What received changes mean before they are written: the node's
/// eligibility and a pending update for /healthz, relists in the metrics.
fn note_received(work: &Work, state: &ClusterState, dp: &DataPath, metrics: &Metrics) {
    dp.proxy.set_node_eligible(state.node_eligible());
    if !work.dirty.is_empty() || work.full_resync {
        dp.proxy.queued_update();
    }
    for r in &work.restarts {
        log::info!("watch of {r} restarted with a relist: full resync");
        metrics
            .watch_restarts
            .get_or_create(&ResourceLabel {
                resource: (*r).into(),
            })
            .inc();
    }
}

/// Takes the Node's zone label when --zone is not given; true when it
/// changed (topology hints must be evaluated again).
fn follow_node_zone(state: &ClusterState, programmer: &mut Programmer<BpfMaps>) -> bool {
    let zone = state.node_zone();
    if zone == programmer.node.zone {
        return false;
    }
    log::info!("node zone is now {zone:?}: topology hints re-evaluated");
    programmer.node.zone = zone;
    true
}

/// A full sync, or the changed Services only; None when nothing changed.
fn program(
    state: &ClusterState,
    work: &Work,
    needs_full: bool,
    programmer: &mut Programmer<BpfMaps>,
) -> Option<(&'static str, SyncReport)> {
    if needs_full {
        let report = programmer.full_sync(&state.all_services(), &state.all_slices());
        release_freed_memory();
        Some(("full", report))
    } else if work.dirty.is_empty() {
        None
    } else {
        let changes = state.changes(&work.dirty);
        Some(("incremental", programmer.sync_services(&changes)))
    }
}

/// A full sync (a relist of a large cluster) allocates and frees a lot at
/// once; glibc keeps freed memory in its arenas unless asked to return it.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
