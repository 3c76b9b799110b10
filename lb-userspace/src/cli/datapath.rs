//! The agent's data path: the BPF object loaded with its pinned maps
//! adopted, the node-side configuration, and what follows every sync.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_userspace::{
    datapath::attach::{ensure_cgroup2, netns_cookie, Attachments, SocketLbMode, XdpAttachMode},
    datapath::loader,
    datapath::map_sizing,
    datapath::wire_hook::WireHookMode,
    node::masquerade_ports::{self},
    node::node_net,
    serve::health_check::HealthServer,
    serve::metrics::{Metrics, WireHookLabel},
    serve::proxy_health::ProxyHealth,
    sync::maglev_tables::{self, MaglevTables},
    sync::map_writer::BpfMaps,
    sync::programmer::{Programmer, SyncReport},
    translate::NodeInfo,
};

use super::args::{RunArgs, DEFAULT_CGROUP_ROOT};

/// What every sync reports to logs and the ready file.
pub(crate) struct SyncLog {
    pub(crate) ready_file: Option<PathBuf>,
    pub(crate) generation: u64,
}

impl SyncLog {
    pub(crate) fn record(
        &mut self,
        kind: &str,
        report: &SyncReport,
        started: Instant,
    ) -> Result<()> {
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
pub(crate) struct DataPath {
    ebpf: aya::Ebpf,
    attachments: Attachments,
    health: HealthServer,
    /// The proxy's own health (`--healthz-addr`, healthCheckNodePorts).
    pub(crate) proxy: Arc<ProxyHealth>,
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
    /// The Maglev frontends' tables, kept in step with their slots.
    maglev: MaglevTables,
}

impl DataPath {
    /// What follows every sync, whichever the source: names for metrics,
    /// health check ports, stale UDP sockets, this agent's programs
    /// attached (after its first sync), Maglev tables, the sweep woken,
    /// readiness, and the proxy's health (updated when everything reached
    /// the maps).
    pub(crate) fn after_sync(
        &mut self,
        programmer: &mut Programmer<BpfMaps>,
        report: &SyncReport,
    ) -> Result<()> {
        if let Some(names) = programmer.take_changed_names() {
            self.metrics.datapath.set_names(names);
        }
        self.health.update(programmer.health.values());
        self.close_stale_udp(report);
        self.attach_after_first_sync(&mut programmer.writer)?;
        // After the switch: a new frontend is served at random until its
        // table is in, and a restarted agent's first tables (1,000 take a
        // second) do not hold back its programs.
        self.write_maglev_tables(programmer, report);
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

    /// Tables of Maglev frontends whose slots changed; a table that could
    /// not be written leaves its frontend random (logged, counted in
    /// `lb_map_write_failures_total`, and tried again at the next sync).
    fn write_maglev_tables(&mut self, programmer: &mut Programmer<BpfMaps>, sync: &SyncReport) {
        let report = self.maglev.sync(
            &mut programmer.writer,
            &programmer.current,
            &programmer.desired,
            sync.scope.as_ref(),
        );
        if report.written + report.deleted > 0 {
            log::debug!(
                "Maglev tables: {} written, {} deleted",
                report.written,
                report.deleted
            );
        }
        for e in &report.errors {
            log::warn!("{e}");
            self.metrics.map_write_failures.inc();
        }
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

    pub(crate) fn refresh_pods(&mut self) -> Result<()> {
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

/// The flow-state maps' capacities: the flags', else a share of the
/// node's memory (`--map-size-ratio`).
fn flow_state_sizes(args: &RunArgs, ipv6: bool) -> Result<map_sizing::FlowStateSizes> {
    let requested = map_sizing::Requested {
        conntrack: args.conntrack_max,
        affinity: args.affinity_max,
        sockets: args.socket_lb_max,
    };
    let memory = map_sizing::node_memory().context("reading the node's memory")?;
    let sizing = map_sizing::size_flow_state(memory, args.map_size_ratio, ipv6, requested);
    let mib = |b: u64| b / (1 << 20);
    log::info!(
        "flow-state maps: conntrack {}, affinity {}, socket LB {} entries a family ({} MiB; \
         --map-size-ratio {} of {} MiB is {} MiB)",
        sizing.sizes.conntrack,
        sizing.sizes.affinity,
        sizing.sizes.sockets,
        mib(sizing.cost_bytes),
        args.map_size_ratio,
        mib(memory),
        mib(sizing.budget_bytes),
    );
    Ok(sizing.sizes)
}

pub(crate) fn setup_datapath(
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
    let ipv6 = args.node.serves_ipv6(&nodeport_addresses);
    log::info!(
        "IPv6 {} (--ipv6 {:?})",
        if ipv6 { "served" } else { "off" },
        args.node.ipv6
    );
    let config = load_config(args, ipv6, datapath)?;
    let started = Instant::now();
    let (mut ebpf, pinned) = loader::load(pin_dir, &config)?;
    let (maps, current, pinned) = adopt_maps(pin_dir, &mut ebpf, pinned)?;
    let loaded = started.elapsed();
    let attachments = Attachments::new(&mut ebpf, pin_dir, args.pod_interfaces.clone())?;
    log::info!(
        "data path loaded in {:?}: maps created or adopted in {loaded:?}, programs verified in {:?}",
        started.elapsed(),
        started.elapsed().saturating_sub(loaded)
    );
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
        maglev: MaglevTables::new(
            args.maglev.maglev_table_size,
            maglev_tables::seed_of(&args.maglev.maglev_hash_seed),
            maglev_tables::tables_in(&maps),
        )
        .context("--maglev-table-size")?,
    };
    metrics.datapath.open(pin_dir)?;
    let mut programmer = Programmer::new(maps, current, metrics.clone());
    programmer.limits = config.sizes.id_limits();
    programmer.service_slots = args.services_max;
    programmer.node = NodeInfo {
        name: args.node.node_name.clone().unwrap_or_default(),
        nodeport_addresses,
        zone: args.node.zone.clone(),
        ipv6_off: !ipv6,
        lb_algorithm: args.node.lb_algorithm,
        lb_mode: args.node.lb_mode,
    };
    Ok((dp, programmer))
}

/// What the programs are loaded with: map sizes (the flow-state ones
/// from the node's memory unless given), masquerade ports, globals.
fn load_config(
    args: &RunArgs,
    ipv6: bool,
    datapath: lb_common::DatapathConfig,
) -> Result<loader::LoadConfig> {
    let flow_state = flow_state_sizes(args, ipv6)?;
    Ok(loader::LoadConfig {
        sizes: loader::MapSizes {
            conntrack: flow_state.conntrack,
            affinity: flow_state.affinity,
            sockets: flow_state.sockets,
            backends: args.backends_max,
            services: args.services_max,
            frontends: args.frontends_max,
            ipv6,
        },
        snat_ports: snat_ports(args)?,
        datapath,
    })
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
            current.backends.ipv4.len() + current.backends.ipv6.len()
        );
    }
    maps.set_conntrack_migrating(pinned.conntrack_migrated())
        .context("writing the conntrack migration flag")?;
    Ok((maps, current, pinned))
}

/// The node's side of the data path, found before the programs load: the
/// wire interfaces, the NodePort addresses, and the load-time
/// configuration (masquerade address, socket LB mode).
struct NodeSide {
    wire: Vec<String>,
    nodeport_addresses: Vec<IpAddr>,
    datapath: lb_common::DatapathConfig,
}

/// The masquerade source of each family: the flag, else the first
/// NodePort address of the family (logged; None: such flows are dropped).
fn masquerade_addresses(
    args: &RunArgs,
    nodeport_addresses: &[IpAddr],
) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = args.masquerade_address.or_else(|| {
        nodeport_addresses.iter().find_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    });
    let v6 = args.masquerade_address6.or_else(|| {
        nodeport_addresses.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    });
    match v4 {
        Some(a) => log::info!("NodePorts on {nodeport_addresses:?}; masquerading to {a}"),
        None => log::warn!(
            "no NodePort address and no --masquerade-address: flows that need masquerading are dropped (counted as snat_failed)"
        ),
    }
    match v6 {
        Some(a) => log::info!("masquerading IPv6 flows to {a}"),
        None => log::info!(
            "no IPv6 NodePort address and no --masquerade-address6: IPv6 flows that need masquerading are dropped (counted as snat_failed)"
        ),
    }
    (v4, v6)
}

fn node_side(args: &RunArgs) -> Result<NodeSide> {
    let wire = args.node.wire();
    if wire.is_empty() {
        log::warn!("no interface faces the wire (no default route and no --interfaces): XDP is not attached");
    }
    let nodeport_addresses = args.node.nodeport_addresses(&wire)?;
    let (masquerade, masquerade6) = masquerade_addresses(args, &nodeport_addresses);
    let datapath = lb_common::DatapathConfig {
        host_netns_cookie: netns_cookie()?,
        masquerade_addr: masquerade.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        socket_lb_mode: args.socket_lb.config_value(),
        masquerade_addr6: masquerade6.map_or([0; 4], |a| lb_common::ipv6::words(a.octets())),
        maglev_table_size: args.maglev.maglev_table_size,
        _pad: 0,
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
