//! `lb-agent run`: the servers, then the loop that follows the source
//! (manifests or the API server) and programs every change.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_userspace::{
    datapath::loader,
    serve::metrics::{InvalidLabel, Metrics, ResourceLabel},
    serve::proxy_health::{self, ProxyHealth},
    source::api_client,
    source::k8s::{self, ClusterState, Work},
    source::manifests::{ManifestError, ManifestSource},
    sync::map_writer::BpfMaps,
    sync::programmer::{Programmer, SyncReport},
};
use tokio::signal::unix::{signal, SignalKind};

use super::{
    args::{HealthzAddr, RunArgs},
    datapath::{setup_datapath, DataPath, SyncLog},
};

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

pub(crate) async fn run(pin_dir: &Path, args: RunArgs) -> Result<()> {
    if args.cleanup {
        for p in loader::cleanup(pin_dir)? {
            println!("removed {}", p.display());
        }
        return Ok(());
    }
    let (metrics, proxy) = serve_endpoints(&args);
    // The API client first: an address that cannot work is refused before
    // anything is attached.
    let api = match &args.source.manifests {
        Some(_) => None,
        None => Some(api_client::client(&args.source.api_options()).await?),
    };
    // The watches start before the data path loads: the verifier and the
    // lists take about as long, so they run side by side.
    let mut watches = api
        .as_ref()
        .map(|client| Watches::start(client.clone(), &args));
    let reading = args.source.manifests.clone().map(read_manifests_aside);
    let (mut dp, mut programmer) =
        load_while_listing(pin_dir, &args, &metrics, &proxy, watches.as_mut()).await?;
    let mut log = SyncLog {
        ready_file: args.ready_file.clone(),
        generation: 0,
    };
    let mut sig = signals()?;
    match (api, args.source.manifests.clone()) {
        (None, Some(_)) => {
            let read = reading.expect("started with the manifests");
            run_manifests(
                read.await.context("the manifest reading thread")?,
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
            spawn_api_probe(client, args.source.api_timeout, metrics.clone());
            run_kubernetes(
                watches.expect("started with the client"),
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

/// The metrics and proxy health endpoints, serving from now on (each
/// only if its address is set).
fn serve_endpoints(args: &RunArgs) -> (Arc<Metrics>, Arc<ProxyHealth>) {
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
    (metrics, proxy)
}

/// The manifests of `dir`, read while the data path loads, on a thread of
/// their own: the agent exits at once if the data path fails to load,
/// without waiting for them (the runtime would wait for a blocking task).
fn read_manifests_aside(
    dir: std::path::PathBuf,
) -> tokio::sync::oneshot::Receiver<(ManifestSource, Vec<ManifestError>)> {
    let (done, read) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut source = ManifestSource::new(dir);
        let errors = source.read(true);
        let _ = done.send((source, errors));
    });
    read
}

/// What a manifest sync reads before it programs.
enum ManifestRead {
    /// Nothing: the files were read, with these errors.
    Done(Vec<ManifestError>),
    /// Every file (the first read, SIGHUP).
    All,
    /// The files that changed.
    Changed,
}

/// Programs the manifests, then every change to them; `first_read`: the
/// source that read them all once, and the errors it found.
async fn run_manifests(
    first_read: (ManifestSource, Vec<ManifestError>),
    args: &RunArgs,
    dp: &mut DataPath,
    programmer: &mut Programmer<BpfMaps>,
    log: &mut SyncLog,
    metrics: &Arc<Metrics>,
    sig: &mut Signals,
) -> Result<()> {
    let (mut source, errors) = first_read;
    let mut sync = |source: &mut ManifestSource,
                    read: ManifestRead,
                    log: &mut SyncLog,
                    dp: &mut DataPath|
     -> Result<()> {
        let started = Instant::now();
        let manifest_errors = match read {
            ManifestRead::Done(errors) => errors,
            ManifestRead::All => source.read(true),
            ManifestRead::Changed => source.read(false),
        };
        let mut report = programmer.full_sync(&source.services(), &source.slices());
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
    sync(&mut source, ManifestRead::Done(errors), log, dp)?;
    let mut tick = tokio::time::interval(args.poll_interval);
    loop {
        tokio::select! {
            _ = sig.hup.recv() => {
                log::info!("SIGHUP: re-reading {}", source.dir().display());
                dp.proxy.queued_update();
                sync(&mut source, ManifestRead::All, log, dp)?;
            }
            _ = sig.term.recv() => break,
            _ = sig.int.recv() => break,
            _ = tick.tick() => {
                if source.changed() {
                    dp.proxy.queued_update();
                    sync(&mut source, ManifestRead::Changed, log, dp)?;
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

/// The watches of Services, EndpointSlices and the Node, and what they
/// delivered before the loop started.
struct Watches {
    rx: tokio::sync::mpsc::Receiver<k8s::Change>,
    state: ClusterState,
    received: Work,
    started: Instant,
}

impl Watches {
    fn start(client: kube::Client, args: &RunArgs) -> Self {
        if args.node.node_name.is_none() {
            log::warn!("no --node-name / NODE_NAME: node-local information is not watched");
        }
        Self {
            rx: k8s::start_watches(client, args.node.node_name.clone()),
            state: ClusterState::default(),
            received: Work::default(),
            started: Instant::now(),
        }
    }
}

/// Loads the data path on a blocking thread while what the watches
/// deliver meanwhile goes into their state.
async fn load_while_listing(
    pin_dir: &Path,
    args: &RunArgs,
    metrics: &Arc<Metrics>,
    proxy: &Arc<ProxyHealth>,
    mut watches: Option<&mut Watches>,
) -> Result<(DataPath, Programmer<BpfMaps>)> {
    let setup = {
        let (pin_dir, args) = (pin_dir.to_owned(), args.clone());
        let (metrics, proxy) = (metrics.clone(), proxy.clone());
        tokio::task::spawn_blocking(move || setup_datapath(&pin_dir, &args, &metrics, &proxy))
    };
    tokio::pin!(setup);
    loop {
        let change = async {
            match watches.as_deref_mut() {
                Some(w) => w.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = &mut setup => return done.context("the data path setup thread")?,
            Some(c) = change => {
                let w = watches.as_deref_mut().expect("a change came from the watches");
                w.state.apply(c, &mut w.received);
            }
        }
    }
}

async fn run_kubernetes(
    watches: Watches,
    args: &RunArgs,
    dp: &mut DataPath,
    programmer: &mut Programmer<BpfMaps>,
    log: &mut SyncLog,
    metrics: &Arc<Metrics>,
    sig: &mut Signals,
) -> Result<()> {
    let Watches {
        mut rx,
        mut state,
        received,
        started: watching,
    } = watches;
    let mut pending = Some(received);
    let mut needs_full = true;
    let mut tick = tokio::time::interval(args.poll_interval);
    loop {
        // Timed from the first change received, not from the wait for it.
        let (work, started) = if let Some(work) = pending.take() {
            (work, Instant::now())
        } else {
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
            (receive_batch(first, &mut rx, &mut state), started)
        };
        note_received(&work, &state, dp, metrics);
        needs_full |= work.full_resync;
        needs_full |= args.node.zone.is_none() && follow_node_zone(&state, programmer);
        // Nothing is written before both lists are complete: a restarted agent
        // keeps serving what the pinned maps hold until it knows the truth.
        if !state.synced() {
            continue;
        }
        if needs_full && log.generation == 0 {
            log::info!(
                "the lists of Services and EndpointSlices were complete {:?} after the watches started",
                watching.elapsed()
            );
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

/// Sets the agent's malloc arenas (`malloc_arenas`), unless
/// MALLOC_ARENA_MAX says otherwise.
pub(crate) fn set_malloc_arenas(args: &RunArgs) {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let arenas = malloc_arenas(args.backends_max, args.source.manifests.is_none());
        // SAFETY: mallopt only sets an allocator parameter; called before
        // the runtime's threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Malloc arenas for the agent: glibc gives threads arenas of their own
/// (up to eight per core), and each keeps its freed memory.
///
/// One, for maps sized for at most the default number of backends (up to
/// 10,000 Services x 10 endpoints): the watches' and the sync's threads
/// each kept their arenas full of freed memory (at 10,000 x 10, peak 110
/// -> 90 MiB with one; 68.6-69.5 MiB with two, against 61.2-62.6 with one).
///
/// Two past that, from the API server, as only a large cluster needs more
/// backends: the lists' decoding threads and the thread that stores what
/// they decoded then stop waiting on one arena's lock (futex wakes were
/// 14 % of the agent's samples during the lists). Lists of 100,000 IPv6
/// Services x 10 took 3.0-3.4 s instead of 4.0-5.8 s, for a peak 6-14 MiB
/// (1-3 %) higher. Manifests are read on one thread: at 100,000 Services
/// two arenas took as long (8.94-9.04 s against 8.97-9.09 s to the first
/// sync) and a re-read peaked at up to 602 MiB, against 473 with one.
fn malloc_arenas(backends_max: u32, from_api: bool) -> i32 {
    if from_api && backends_max > lb_common::MAX_BACKENDS {
        2
    } else {
        1
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

#[cfg(test)]
mod tests {
    use super::malloc_arenas;

    #[test]
    fn two_arenas_only_for_a_large_cluster_listed_from_the_api_server() {
        let large = lb_common::MAX_BACKENDS + 1;
        assert_eq!(malloc_arenas(large, true), 2);
        assert_eq!(malloc_arenas(large, false), 1);
        assert_eq!(malloc_arenas(lb_common::MAX_BACKENDS, true), 1);
        assert_eq!(malloc_arenas(lb_common::MAX_BACKENDS, false), 1);
    }
}
