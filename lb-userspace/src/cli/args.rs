//! The command line: subcommands, flags and their parsers.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::DEFAULT_PIN_DIR;
use lb_userspace::{
    datapath::attach::{default_route_interfaces, SocketLbMode, XdpAttachMode},
    datapath::map_sizing,
    datapath::wire_hook::WireHookMode,
    model::{LbAlgorithm, LbMode},
    node::masquerade_ports::PortRange,
    node::node_net,
    source::api_client::{self, ApiClientOptions, ApiServerAddress},
    translate::maglev,
};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF/XDP Service load balancer for Kubernetes (kube-proxy replacement)"
)]
pub(crate) struct Cli {
    /// bpffs folder holding the pinned maps.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
    pub(crate) pin_dir: PathBuf,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Only this address family's counters (each is kept per family);
        /// without it, the sum of both.
        #[arg(long, value_enum)]
        family: Option<FamilyArg>,
    },
    /// Print each pinned map's capacity and the memory the kernel charges
    /// for it (its fdinfo's memlock), and their total.
    Maps {
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
pub(crate) enum Output {
    Table,
    Json,
}

/// An address family, as `--family` names it.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum FamilyArg {
    Ipv4,
    Ipv6,
}

impl From<FamilyArg> for lb_userspace::model::Family {
    fn from(f: FamilyArg) -> Self {
        match f {
            FamilyArg::Ipv4 => Self::Ipv4,
            FamilyArg::Ipv6 => Self::Ipv6,
        }
    }
}

/// Where the agent finds (or mounts) the cgroup v2 root by default.
pub(crate) const DEFAULT_CGROUP_ROOT: &str = "/run/lb-agent/cgroupv2";

/// What the translation depends on about this node.
#[derive(clap::Args, Clone)]
pub(crate) struct NodeArgs {
    /// This node's name (for node-local decisions), as in the DaemonSet's downward API.
    #[arg(long, env = "NODE_NAME")]
    pub(crate) node_name: Option<String>,
    /// Interfaces facing the wire, where the wire hook (tc or XDP, see
    /// --wire-hook) attaches (comma separated). Default: the interfaces
    /// that hold a default route (IPv4 or IPv6).
    #[arg(long, value_delimiter = ',')]
    pub(crate) interfaces: Vec<String>,
    /// Serve NodePorts on the local addresses inside these CIDRs (comma
    /// separated, IPv4 or IPv6), like kube-proxy's --nodeport-addresses.
    /// Default: the addresses of the --interfaces (the wire-facing ones),
    /// IPv4 and IPv6 (not link-local).
    #[arg(long, value_delimiter = ',')]
    pub(crate) nodeport_addresses: Vec<lb_userspace::model::IpPrefix>,
    /// This node's zone, for EndpointSlice topology hints. Default: the
    /// Node's `topology.kubernetes.io/zone` label (Kubernetes source only).
    #[arg(long)]
    pub(crate) zone: Option<String>,
    /// Serve the IPv6 side of Services: `on`, `off`, or `auto` (on when a
    /// NodePort address of this node is IPv6, as on a dual-stack or
    /// IPv6-only node). Off, the IPv6 maps hold one entry each (no memory
    /// for them) and IPv6 addresses of Services are passed over.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub(crate) ipv6: Ipv6Mode,
    /// How new flows to external frontends (NodePort, LoadBalancer,
    /// externalIPs) with externalTrafficPolicy Cluster pick a backend:
    /// `random`, or `maglev` (consistent hashing of the flow's 5-tuple:
    /// every node picks the same backend, so a flow that moves to another
    /// node keeps it). A Service's `lb-agent.io/lb-algorithm` annotation
    /// (`random` or `maglev`) overrides it. ClusterIPs stay random.
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Random)]
    pub(crate) lb_algorithm: LbAlgorithm,
    /// How external traffic (NodePort, LoadBalancer, externalIPs) with
    /// externalTrafficPolicy Cluster reaches a backend on another node:
    /// `snat` (the source masqueraded to this node, replies back through
    /// it, as kube-proxy), `dsr` (direct server return: the client's
    /// address kept, the backend's node answers the client itself; the
    /// frontend travels in an IPv4 option or an IPv6 destination options
    /// header) or `hybrid` (DSR for TCP, SNAT for UDP). A Service's
    /// `lb-agent.io/lb-mode` annotation overrides it. Every node must run
    /// an agent that understands the option; pair with `--lb-algorithm
    /// maglev` so a flow keeps its backend when it enters another node.
    #[arg(long, value_enum, default_value_t = LbMode::Snat)]
    pub(crate) lb_mode: LbMode,
}

/// How Maglev tables are built: every node of a cluster must agree.
#[derive(clap::Args, Clone)]
pub(crate) struct MaglevArgs {
    /// Entries of each Maglev table, a prime up to 65537 (Cilium's
    /// default 16381, Katran's 65537): each backend gets 1/N of them to
    /// within N/size; a table costs 2 bytes an entry. Every node of a
    /// cluster must use the same.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = parse_maglev_table_size)]
    pub(crate) maglev_table_size: u32,
    /// The key of the Maglev permutation: every node of a cluster must be
    /// given the same text, or their tables differ.
    #[arg(long, default_value = "lb-agent")]
    pub(crate) maglev_hash_seed: String,
}

/// `--ipv6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Ipv6Mode {
    Auto,
    On,
    Off,
}

impl NodeArgs {
    /// The interfaces facing the wire: --interfaces, or those holding a
    /// default route.
    pub(crate) fn wire(&self) -> Vec<String> {
        if self.interfaces.is_empty() {
            default_route_interfaces()
        } else {
            self.interfaces.clone()
        }
    }

    /// Whether this node serves IPv6 (`--ipv6`), given its NodePort addresses.
    pub(crate) fn serves_ipv6(&self, nodeport_addresses: &[std::net::IpAddr]) -> bool {
        match self.ipv6 {
            Ipv6Mode::On => true,
            Ipv6Mode::Off => false,
            Ipv6Mode::Auto => nodeport_addresses.iter().any(std::net::IpAddr::is_ipv6),
        }
    }

    pub(crate) fn nodeport_addresses(&self, wire: &[String]) -> Result<Vec<std::net::IpAddr>> {
        let addresses = node_net::interface_addresses()?;
        Ok(node_net::nodeport_addresses(
            &addresses,
            wire,
            &self.nodeport_addresses,
        ))
    }
}

#[derive(clap::Args, Clone)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    /// The agent's node flags, so the desired state is the one it computes.
    #[command(flatten)]
    pub(crate) node: NodeArgs,
    /// The agent's Maglev flags, so the tables expected are the ones it
    /// builds.
    #[command(flatten)]
    pub(crate) maglev: MaglevArgs,
}

/// Where Services and EndpointSlices come from.
#[derive(clap::Args, Clone)]
pub(crate) struct SourceArgs {
    /// Read Services and EndpointSlices from this folder of manifests (YAML/JSON,
    /// multi-document) instead of the Kubernetes API. `run` re-reads it when a
    /// file changes or on SIGHUP and writes only the difference.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub(crate) manifests: Option<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig. Without it (and without
    /// --manifests) the in-cluster config is used, or the default kubeconfig.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// The API server's own address (https://HOST:PORT: a control-plane
    /// node or the load balancer in front of them). Required in a pod: the
    /// in-cluster address is the `kubernetes` Service, which nothing
    /// translates after a node reboot until this agent has read the API.
    /// `kubernetes-service` keeps the in-cluster address (where another
    /// proxy still translates it). With --kubeconfig, replaces its server.
    #[arg(long, env = api_client::API_SERVER_ENV, value_parser = api_client::parse_api_server)]
    pub(crate) api_server: Option<ApiServerAddress>,
    /// Every API request must connect and start answering within this;
    /// the API server is probed this often, and after three times this
    /// without an answer /readyz reports not ready (the data path keeps
    /// what it last programmed).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) api_timeout: Duration,
}

impl SourceArgs {
    pub(crate) fn api_options(&self) -> ApiClientOptions<'_> {
        ApiClientOptions {
            kubeconfig: self.kubeconfig.as_deref(),
            api_server: self.api_server.as_ref(),
            timeout: self.api_timeout,
        }
    }
}

#[derive(clap::Args, Clone)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    #[command(flatten)]
    pub(crate) node: NodeArgs,
    /// Serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:10249;
    /// 0.0.0.0 is every address of both families).
    #[arg(long)]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Serve kube-proxy's /healthz and /livez here (the address cloud load
    /// balancers probe for externalTrafficPolicy Cluster); `off` to not.
    /// 0.0.0.0 is every address of both families.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_healthz_addr)]
    pub(crate) healthz_addr: HealthzAddr,
    /// How long a received change may wait to be written before /healthz,
    /// /livez and every healthCheckNodePort report 503 (kube-proxy: twice
    /// its sync period, 60 s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub(crate) healthz_timeout: Duration,
    /// Capacity of the backends map (one entry per distinct endpoint
    /// address, port and protocol). A Service whose backends do not fit is
    /// left as it was, reported, and makes /healthz 503 after
    /// --healthz-timeout.
    #[arg(long, default_value_t = lb_common::MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(16..=(1 << 24)))]
    pub(crate) backends_max: u32,
    /// Capacity of the services map: a slot per Service frontend (ClusterIP,
    /// NodePort, externalIP, LoadBalancer address, per port) plus one per
    /// backend of each, and of the backend-match map (one entry per backend
    /// slot). Entries are allocated as they are written (about 16 bytes a
    /// slot of capacity when empty). A frontend that does not fit is left
    /// as it was, reported, and counted in lb_map_write_failures_total.
    #[arg(long, default_value_t = lb_common::MAX_SERVICE_SLOTS,
          value_parser = clap::value_parser!(u32).range(16..=(1 << 26)))]
    pub(crate) services_max: u32,
    /// Capacity of reverse NAT ids: one per frontend address and port
    /// (TCP and UDP of a port share one), over both families. It sizes the
    /// reverse NAT maps, the Maglev table map and the per-CPU Service
    /// counters (16 bytes an id on every CPU: 1 MiB a CPU at the default).
    /// A frontend that gets no id is left as it was and reported.
    #[arg(long, default_value_t = lb_common::MAX_REV_NAT,
          value_parser = clap::value_parser!(u32).range(16..=(1 << 22)))]
    pub(crate) frontends_max: u32,
    /// Host-side pod veth names where tc attaches (`*` wildcards, comma separated).
    /// Rescanned every --poll-interval, so new pods are covered.
    #[arg(long, value_delimiter = ',', default_value = "lxc*,veth*,cali*")]
    pub(crate) pod_interfaces: Vec<String>,
    /// The program on the --interfaces: `tc` (tcx, right for every
    /// checksum state), `xdp` (faster, but corrupts packets that arrive
    /// with partial checksums, as from a veth), or `auto`: XDP in native
    /// mode on NIC drivers known to deliver complete checksums, tc on
    /// everything else (veth, tap, bridges, unknown drivers).
    #[arg(long, value_enum, default_value_t = WireHookMode::Auto)]
    pub(crate) wire_hook: WireHookMode,
    /// How XDP attaches where --wire-hook xdp puts it (auto: native, else
    /// generic). `--wire-hook auto` uses native mode only.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
    pub(crate) xdp_mode: XdpAttachMode,
    /// How often to look for changed manifests and new pod interfaces.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub(crate) poll_interval: Duration,
    /// Written (atomically) after every sync with its generation and outcome.
    #[arg(long)]
    pub(crate) ready_file: Option<PathBuf>,
    /// Source address of masqueraded flows (NodePort, externalIPs and
    /// LoadBalancer traffic with externalTrafficPolicy Cluster, and pods
    /// reaching themselves through a Service). Default: the first NodePort
    /// address.
    #[arg(long)]
    pub(crate) masquerade_address: Option<std::net::Ipv4Addr>,
    /// Source address of masqueraded IPv6 flows (as --masquerade-address
    /// for IPv4). Default: the first IPv6 NodePort address.
    #[arg(long)]
    pub(crate) masquerade_address6: Option<std::net::Ipv6Addr>,
    /// Source ports of masqueraded flows (comma separated ports and
    /// FIRST-LAST ranges, at most 4). They must not overlap the node's
    /// ephemeral ports (net.ipv4.ip_local_port_range), its reserved ports
    /// (net.ipv4.ip_local_reserved_ports) or --nodeport-range. Default:
    /// 1024-65535 without those. A closed flow's port is kept 120 s (TIME_WAIT),
    /// so one backend takes at most (ports / 120 s) new masqueraded
    /// connections per second.
    #[arg(long, value_delimiter = ',')]
    pub(crate) masquerade_ports: Vec<PortRange>,
    /// The cluster's NodePort range (the API server's
    /// --service-node-port-range), kept out of the masquerade ports.
    #[arg(long, default_value = "30000-32767")]
    pub(crate) nodeport_range: PortRange,
    /// Socket-level load balancing (cgroup connect/sendmsg/recvmsg/getpeername
    /// hooks): `all` sockets in --cgroup, the `host` network namespace only,
    /// or `off` (the per-packet paths do all the work).
    #[arg(long, value_enum, default_value_t = SocketLbMode::All)]
    pub(crate) socket_lb: SocketLbMode,
    /// The cgroup v2 folder the socket hooks attach to. The default is the
    /// v2 root, mounted there when it is not yet (the root covers every
    /// process of the node, also where /sys/fs/cgroup holds v1 controllers).
    #[arg(long, default_value = DEFAULT_CGROUP_ROOT)]
    pub(crate) cgroup: PathBuf,
    /// Capacity of the conntrack map (an LRU: two entries a flow; the least
    /// recently used are evicted when it is full). A pinned map of another
    /// size is migrated entry by entry, flows keeping their backends.
    /// Default: from --map-size-ratio.
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..))]
    pub(crate) conntrack_max: Option<u32>,
    /// Capacity of the session affinity map (an LRU: one entry per client
    /// and frontend with ClientIP affinity; idle clients are evicted first).
    /// Default: from --map-size-ratio.
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..))]
    pub(crate) affinity_max: Option<u32>,
    /// Capacity of the socket LB's maps (LRUs: an entry per connected
    /// socket to a Service, and per unconnected UDP socket and Service).
    /// Default: from --map-size-ratio.
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..))]
    pub(crate) socket_lb_max: Option<u32>,
    #[command(flatten)]
    pub(crate) maglev: MaglevArgs,
    /// The share of the node's memory (MemTotal) the flow-state maps
    /// (conntrack, affinity, socket LB, of each family served) may take
    /// together when their capacity flags are not given: each gets its
    /// built-in default scaled to fit (at least 131,072 conntrack, 65,536
    /// socket and 16,384 affinity entries). 0.0025 gives a 16 GiB node
    /// about 40 MiB of them. The sizes are logged at start and shown by
    /// `lb-agent maps`.
    #[arg(long, default_value_t = map_sizing::DEFAULT_RATIO, value_parser = parse_ratio)]
    pub(crate) map_size_ratio: f64,
    /// How often the conntrack map is swept for entries of deleted backends
    /// and expired ones (also soon after a sync that deleted backends).
    #[arg(long, default_value = "30s", value_parser = parse_sweep_interval)]
    pub(crate) conntrack_sweep_interval: Duration,
    /// Remove everything the agent installed (pinned links, which detaches the
    /// programs, and pinned maps) and exit. Same as `lb-agent cleanup`.
    #[arg(long)]
    pub(crate) cleanup: bool,
}

/// `--maglev-table-size`: a prime the Maglev permutation can use.
fn parse_maglev_table_size(s: &str) -> Result<u32, String> {
    let size: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    maglev::build(&[], size, &maglev::HashSeed::default())
        .map(|_| size)
        .map_err(|e| e.to_string())
}

/// `--map-size-ratio`: a share of memory, above 0 and at most a half.
fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 0.5 => Ok(r),
        _ => Err(format!("{s:?} is not a ratio in (0, 0.5]")),
    }
}

/// `--healthz-addr`: an address, or off.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HealthzAddr(pub(crate) Option<std::net::SocketAddr>);

pub(crate) fn parse_healthz_addr(s: &str) -> Result<HealthzAddr, String> {
    match s {
        "" | "off" => Ok(HealthzAddr(None)),
        _ => s
            .parse()
            .map(|a| HealthzAddr(Some(a)))
            .map_err(|e| format!("{s:?}: {e}")),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    // A plain number is seconds.
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    if s.is_empty() {
        return Err("an empty duration".into());
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            _ => return Err(format!("bad duration unit in {s:?} (use h, m, s or ms)")),
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("duration {s:?} is too long"))?;
        rest = tail;
    }
    Ok(total)
}

/// At least a second: a pass over a full map is a lot of syscalls.
pub(crate) fn parse_sweep_interval(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(|d| {
        if d >= Duration::from_secs(1) {
            Ok(d)
        } else {
            Err(format!("{s:?} is under a second"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_go_units_and_plain_seconds() {
        let ok = [
            ("30", 30_000),
            ("30s", 30_000),
            ("500ms", 500),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("1m30s250ms", 90_250),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in [
            "",
            "s",
            "1d",
            "1.5s",
            "-1s",
            "1h x",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn maglev_table_sizes_must_be_primes_up_to_65537() {
        assert_eq!(parse_maglev_table_size("16381"), Ok(16_381));
        assert_eq!(parse_maglev_table_size("65537"), Ok(65_537));
        assert!(parse_maglev_table_size("16384").is_err());
        assert!(parse_maglev_table_size("65539").is_err());
        assert!(parse_maglev_table_size("x").is_err());
    }

    #[test]
    fn map_size_ratios_are_above_zero_and_at_most_a_half() {
        assert_eq!(parse_ratio("0.0025"), Ok(0.0025));
        for bad in ["0", "-0.1", "0.6", "NaN", "x"] {
            assert!(parse_ratio(bad).is_err(), "{bad}");
        }
    }
}
