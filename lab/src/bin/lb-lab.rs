//! lb-lab: the lab as a program. `lb-lab demo DIR` builds a node in network
//! namespaces from the manifests in DIR, runs lb-agent on it, sends requests
//! from a client pod to every ClusterIP and shows which pods answered.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_kube_fixtures::workload::LabObject;
use lb_lab::{tcp_ask, udp_ask, Lab};

const REQUESTS: usize = 100;
/// Failures in a row, from the first request on, after which the demo
/// moves on to the next Service.
const GIVE_UP_AFTER: usize = 3;

/// A Service's name, ClusterIPs (one per family) and (port, protocol) pairs.
type ServicePorts = (String, Vec<std::net::IpAddr>, Vec<(u16, String)>);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(PathBuf::from(
            args.get(1).map_or("examples", String::as_str),
        )),
        _ => bail!("usage: lb-lab demo [MANIFEST_DIR]"),
    }
}

fn demo(dir: PathBuf) -> Result<()> {
    let files = manifest_files(&dir)?;
    println!(
        "lab: building a node from {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut lab = Lab::from_manifest_files(&files)?;
    for pod in &lab.state.pod_specs {
        println!("  pod {:<40} {:<15} ({})", pod.name, pod.ip, pod.owner);
    }
    println!(
        "lab: starting lb-agent in the node namespace (pins under {})",
        lab.pin_dir.display()
    );
    lab.agent().start()?;
    print_agent_tables(&lab)?;
    let services = service_ports(&lab);
    let targets = services.iter().flat_map(|(name, ips, ports)| {
        ips.iter().flat_map(move |ip| {
            ports
                .iter()
                .map(move |(port, proto)| (name, *ip, *port, proto))
        })
    });
    for (name, ip, port, proto) in targets {
        let to = SocketAddr::new(ip, port);
        let started = Instant::now();
        let answers = ask_repeatedly(&lab, to, proto == "UDP");
        println!(
            "client pod -> Service {name} {to}/{proto}: {} {} in {:?}",
            answers.values().sum::<usize>(),
            if proto == "UDP" {
                "datagrams"
            } else {
                "connections"
            },
            started.elapsed()
        );
        for (pod, n) in answers {
            println!("  {n:>4}  {pod}");
        }
    }
    let errors = lab.checksum_errors();
    let total: u64 = errors.iter().map(|(_, t, u, i)| t + u + i).sum();
    println!(
        "\nchecksum errors in all {} namespaces (Tcp + Udp + Icmp InCsumErrors): {total}",
        errors.len()
    );
    println!("lab: cleaning up (namespaces, agent, pinned maps)");
    Ok(())
}

/// The YAML files of `dir`, in name order.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// What the agent says it programmed (`lb-agent services`, `maps`).
fn print_agent_tables(lab: &Lab) -> Result<()> {
    let agent = lb_lab::sibling_binary("lb-agent", "LB_AGENT_BIN")?;
    for command in ["services", "maps"] {
        let table = std::process::Command::new(&agent)
            .args(["--pin-dir", &lab.pin_dir.to_string_lossy(), command])
            .output()?;
        println!(
            "\n$ lb-agent {command}\n{}",
            String::from_utf8_lossy(&table.stdout)
        );
    }
    Ok(())
}

/// Every Service of the manifests: its name, ClusterIPs and ports.
fn service_ports(lab: &Lab) -> Vec<ServicePorts> {
    lab.state
        .objects
        .iter()
        .filter_map(|o| match o {
            LabObject::Service(s) => {
                let spec = s.spec.as_ref()?;
                let ips = lab.cluster_ips(s.metadata.name.as_deref()?);
                let ports = spec
                    .ports
                    .as_ref()?
                    .iter()
                    .map(|p| {
                        (
                            p.port as u16,
                            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        )
                    })
                    .collect();
                Some((s.metadata.name.clone()?, ips, ports))
            }
            _ => None,
        })
        .collect()
}

/// `REQUESTS` requests to `to` from the client pod: how many times each
/// answer (a pod's name, or an error) came back.
fn ask_repeatedly(lab: &Lab, to: SocketAddr, udp: bool) -> BTreeMap<String, usize> {
    lab.client.ns.run_in(|| {
        let mut counts = BTreeMap::new();
        for i in 0..REQUESTS {
            let answer = if udp {
                udp_ask(to, "hello", Duration::from_secs(2)).map(|(a, _)| a)
            } else {
                tcp_ask(to, "hello", Duration::from_secs(2))
            };
            let failed = answer.is_err();
            *counts
                .entry(answer.unwrap_or_else(|e| format!("<error: {e}>")))
                .or_insert(0) += 1;
            // A Service that fails from the start (say its family is
            // not served) is not worth 100 timeouts of 2 s.
            if failed && counts.len() == 1 && i + 1 >= GIVE_UP_AFTER {
                break;
            }
        }
        counts
    })
}
