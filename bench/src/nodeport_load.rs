//! NodePort under a busy node's load, side by side in one run: new
//! connections at a fixed rate from the external client to the NodePort of
//! `examples/rolling-update.yaml` (4 pods that close first, so they hold
//! TIME_WAIT), through the agent, through kube-proxy's iptables rules for
//! the same Service (the kernel's NAT), and through the previous release
//! when one is given. Each mode gets a fresh lab (fresh pods, so no
//! TIME_WAIT left by another mode) on the NIC-like wire, where the previous
//! release's XDP is correct.

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use crate::{kube_proxy, progress, rule_tools};
use lb_lab::{
    rate_load::{self, RateLoad, RateReport},
    Lab, Wire, NODE_WIRE_ADDR,
};

const IPTABLES: &str = "iptables-legacy";
const NODE_PORT: u16 = 30081;

/// How a mode serves the NodePort.
#[derive(Clone, Debug)]
pub enum Mode {
    Ours,
    /// The agent of an earlier release, at this path.
    Previous(PathBuf),
    KubeProxyIptables,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Ours => "ours",
            Mode::Previous(_) => "previous release (45d8f59)",
            Mode::KubeProxyIptables => "kube-proxy iptables",
        }
    }
}

pub struct Row {
    pub mode: &'static str,
    pub report: RateReport,
    /// New flows the data path found no masquerade port for (ours only).
    pub(crate) ports_exhausted: Option<u64>,
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/rolling-update.yaml")
}

/// The web Service's NodePort as kube-proxy programs it.
fn iptables_rules(lab: &Lab) -> String {
    let endpoints = lab.pods.values().map(|p| (p.ip.into(), 8080)).collect();
    let web = kube_proxy::ServicePort {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "http".into(),
        cluster_ip: std::net::Ipv4Addr::new(10, 96, 0, 30).into(),
        port: 80,
        protocol: "tcp",
        endpoints,
        node_port: Some(NODE_PORT),
    };
    kube_proxy::iptables_full(&[web])
}

/// Sets `mode` up in `lab`.
fn serve(lab: &mut Lab, mode: &Mode) -> Result<()> {
    match mode {
        Mode::Ours => lab.agent().start(),
        Mode::Previous(binary) => {
            lab.agent_binary = Some(binary.clone());
            lab.agent_defaults.clear();
            lab.agent().start()
        }
        Mode::KubeProxyIptables => {
            rule_tools::install_iptables_jumps(&lab.node, IPTABLES)?;
            let mut cmd = lab.node.command(IPTABLES.to_owned() + "-restore");
            cmd.arg("--noflush");
            rule_tools::feed(cmd, &iptables_rules(lab), Duration::from_secs(30))
                .map_err(anyhow::Error::msg)
                .context("iptables-restore")?;
            Ok(())
        }
    }
}

/// Runs `rate` new connections a second for `seconds` in each mode.
pub fn measure(rate: u32, seconds: u64, modes: &[Mode]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for mode in modes {
        progress(&format!(
            "NodePort load: {} at {rate}/s for {seconds} s",
            mode.name()
        ));
        let mut lab = Lab::from_manifest_files_on(Wire::Nic, &[example()])?;
        serve(&mut lab, mode)?;
        crate::wait_for_quiet();
        let load = RateLoad {
            what: mode.name().into(),
            to: SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT).into(),
            rate,
            duration: Duration::from_secs(seconds),
            threads: 8,
        };
        let report = rate_load::run(&lab.ext.path(), &load);
        progress(&format!("NodePort load: {report}"));
        let ports_exhausted =
            matches!(mode, Mode::Ours).then(|| lab.datapath_stat("snat_ports_exhausted"));
        rows.push(Row {
            mode: mode.name(),
            report,
            ports_exhausted,
        });
    }
    Ok(rows)
}

pub fn markdown(rows: &[Row], rate: u32, seconds: u64) -> String {
    let mut s = String::from("## NodePort under load: masquerade ports and TIME_WAIT\n\n");
    s.push_str(&format!(
        "{rate} new TCP connections a second for {seconds} s from the external client to a NodePort whose 4 pods close each connection first (so each holds the masqueraded 4-tuple in TIME_WAIT for 60 s), through each mode in a fresh lab (NIC-like wire). A SYN retransmission (the client's `TcpExtTCPSynRetrans`) is a connection that met a backend's TIME_WAIT or a dropped SYN: it costs the client a second. Latency is from connect to the server's close.\n\n"
    ));
    s.push_str("| mode | connections/s | failed | SYN retransmissions | p50 | p90 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            r.mode,
            r.report.rate(),
            r.report.failed,
            r.report.syn_retransmissions,
            ms(r.report.percentile(0.5)),
            ms(r.report.percentile(0.9)),
            ms(r.report.percentile(0.99)),
            ms(r.report.latencies.last().copied().unwrap_or_default()),
        ));
    }
    for r in rows.iter().filter(|r| r.ports_exhausted.is_some()) {
        s.push_str(&format!(
            "\n{}: `snat_ports_exhausted` {}.\n",
            r.mode,
            r.ports_exhausted.unwrap_or_default()
        ));
    }
    s.push('\n');
    s
}
