//! lb-agent: the userspace half of the load balancer.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::{map_names, stats, DEFAULT_PIN_DIR};
use lb_userspace::{
    attach::{default_route_interfaces, Attachments, XdpAttachMode},
    differ::{self, MapContents},
    inspect, loader,
    manifests::ManifestSource,
    map_writer::{apply_plan, BpfMaps},
    model::DesiredState,
    translate,
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
    Run(RunArgs),
    /// Print the Services and backends the pinned maps hold.
    Services {
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the data path's packet counters (summed over CPUs).
    Stats {
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove the pinned maps. Programs detach when the agent exits.
    Cleanup,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Folder of Service and EndpointSlice manifests (YAML/JSON, multi-document). Re-read when a
    /// file changes or on SIGHUP; only the difference is written.
    #[arg(long)]
    manifests: PathBuf,
    /// Interfaces facing the wire, where XDP attaches (comma separated).
    /// Default: the interfaces that hold a default route.
    #[arg(long, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Host-side pod veth names where tc attaches (`*` wildcards, comma separated).
    /// Rescanned every --poll-interval, so new pods are covered.
    #[arg(long, value_delimiter = ',', default_value = "lxc*,veth*,cali*")]
    pod_interfaces: Vec<String>,
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
    xdp_mode: XdpAttachMode,
    /// How often to look for changed manifests and new pod interfaces.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Written (atomically) after every sync with its generation and outcome.
    #[arg(long)]
    ready_file: Option<PathBuf>,
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

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(&cli.pin_dir, args)),
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
        Command::Cleanup => {
            for p in loader::cleanup(&cli.pin_dir)? {
                println!("removed {}", p.display());
            }
            Ok(())
        }
    }
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

struct Agent {
    maps: BpfMaps,
    current: MapContents,
    previous: DesiredState,
    source: ManifestSource,
    generation: u64,
    ready_file: Option<PathBuf>,
}

impl Agent {
    /// Reads the manifests and writes the difference to the maps.
    fn sync(&mut self) -> Result<()> {
        let started = Instant::now();
        let (set, manifest_errors) = self.source.read();
        for e in &manifest_errors {
            log::error!("manifest: {e}");
        }
        let mut t = translate::translate(&set.services, &set.slices);
        for e in &t.errors {
            log::error!("cannot program {e}");
        }
        translate::carry_over_failed(&mut t, &self.previous);
        let plan = differ::plan(&self.current, &t.state)?;
        let report = apply_plan(&mut self.maps, &plan, &mut self.current);
        for (frontend, reason) in &report.failed {
            match frontend {
                Some(f) => {
                    log::error!("programming {f} failed, it keeps its previous state: {reason}")
                }
                None => log::error!("map write failed: {reason}"),
            }
        }
        self.previous = t.state;
        self.generation += 1;
        let backends: usize = self
            .previous
            .entries
            .values()
            .map(|e| e.backends.len())
            .sum();
        log::info!(
            "sync {}: {} frontends, {} backends, {} map writes, {} errors, {:?}",
            self.generation,
            self.previous.entries.len(),
            backends,
            report.applied,
            manifest_errors.len() + t.errors.len() + report.failed.len(),
            started.elapsed()
        );
        if let Some(path) = &self.ready_file {
            let tmp = path.with_extension("tmp");
            fs::write(
                &tmp,
                format!(
                    "generation {}\nfrontends {}\nbackends {}\nwrites {}\nerrors {}\n",
                    self.generation,
                    self.previous.entries.len(),
                    backends,
                    report.applied,
                    manifest_errors.len() + t.errors.len() + report.failed.len()
                ),
            )?;
            fs::rename(&tmp, path)?;
        }
        Ok(())
    }
}

async fn run(pin_dir: &Path, args: RunArgs) -> Result<()> {
    let mut ebpf = loader::load(pin_dir)?;
    let maps = loader::take_maps(&mut ebpf)?;
    let current = maps.read_contents().context("reading the pinned maps")?;
    if !current.services.is_empty() {
        log::info!(
            "adopted pinned maps at {}: {} service slots, {} backends",
            pin_dir.display(),
            current.services.len(),
            current.backends.len()
        );
    }
    let mut attachments = Attachments::new(&mut ebpf, args.pod_interfaces.clone())?;
    let wire = if args.interfaces.is_empty() {
        default_route_interfaces()
    } else {
        args.interfaces.clone()
    };
    if wire.is_empty() {
        log::warn!("no interface faces the wire (no default route and no --interfaces): XDP is not attached");
    }
    for iface in &wire {
        let mode = attachments.attach_wire(&mut ebpf, iface, args.xdp_mode)?;
        log::info!("XDP attached to {iface} ({mode})");
    }
    for name in attachments.refresh_pod_interfaces(&mut ebpf)? {
        log::info!("tc attached to pod interface {name}");
    }

    let mut agent = Agent {
        maps,
        current,
        previous: DesiredState::default(),
        source: ManifestSource::new(&args.manifests),
        generation: 0,
        ready_file: args.ready_file.clone(),
    };
    agent.sync()?;

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(args.poll_interval);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                log::info!("SIGHUP: re-reading {}", args.manifests.display());
                agent.sync()?;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if agent.source.changed() {
                    agent.sync()?;
                }
                for name in attachments.refresh_pod_interfaces(&mut ebpf)? {
                    log::info!("tc attached to pod interface {name}");
                }
            }
        }
    }
    log::info!(
        "exiting: programs detach, maps stay pinned at {} (`lb-agent cleanup` removes them)",
        pin_dir.display()
    );
    Ok(())
}
