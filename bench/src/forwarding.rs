//! Entry-node cost of external traffic to a backend on another node:
//! masquerading (`snat`) against direct server return (`dsr`), side by
//! side. Two LoadBalancer Services of the same remote endpoints in one
//! loaded object, one annotated `lb-agent.io/lb-mode: dsr`; through
//! `lb_xdp_from_wire` and `lb_tc_from_wire` in turns, timed as `datapath`
//! times them (one test run a packet, the empty program's figure
//! subtracted, the median of a batch, the least of the batches):
//! - a new flow's SYN (SNAT claims a masquerade port; DSR adds the option);
//! - a request segment of an established connection (64 bytes of data);
//! - the reply segment, which only SNAT brings back through the entry
//!   node (with DSR the backend's node sends it to the client).
//!
//! `measure_lab` then runs real traffic through three nodes of the lab,
//! both modes side by side: connection rate, latency, kernel CPU.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context, Result};
use aya::programs::TestRunOptions;
use lb_lab::{
    cluster::{node_addr, node_name, Cluster},
    packet::{self, Tuple, TCP_ACK},
    packet_harness::{Harness, NODE},
    sibling_binary, Wire,
};
use lb_userspace::{model::LbMode, translate::NodeInfo};
use serde_json::{json, Value};

use crate::{
    datapath::{batch, programs, Hook, Runner},
    progress,
    selection::harness_with_empty_programs,
    traffic::{bench_client, ClientNumbers},
};

const SNAT_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const DSR_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 50);
/// Data in a request segment and in its reply (within the 512 bytes the
/// test runs copy out).
const REQUEST_BYTES: usize = 64;
const REPLY_BYTES: usize = 256;

/// Entry-node costs of one mode on one hook, in ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModeCosts {
    pub new_flow_ns: f64,
    pub request_ns: f64,
    /// None: the reply does not come back through the entry node.
    pub reply_ns: Option<f64>,
}

impl ModeCosts {
    /// Each figure at its least of `self` and `other`.
    fn least(&self, other: &Self) -> Self {
        Self {
            new_flow_ns: self.new_flow_ns.min(other.new_flow_ns),
            request_ns: self.request_ns.min(other.request_ns),
            reply_ns: self.reply_ns.zip(other.reply_ns).map(|(a, b)| a.min(b)),
        }
    }

    /// What the entry node spends on one request and its reply.
    pub fn per_request_ns(&self) -> f64 {
        self.request_ns + self.reply_ns.unwrap_or(0.0)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ForwardingCosts {
    pub hook: Hook,
    pub snat: ModeCosts,
    pub dsr: ModeCosts,
}

/// A LoadBalancer Service `name` at `lb` in `mode`, of one endpoint on
/// another node, and its slice.
fn objects(name: &str, lb: Ipv4Addr, k: u16, mode: &str) -> (Value, Value) {
    let svc = json!({"metadata": {"name": name, "namespace": "default",
            "annotations": {"lb-agent.io/lb-mode": mode}},
        "spec": {"type": "LoadBalancer", "clusterIP": format!("10.96.2.{k}"),
            "ports": [{"name": "t", "port": 80, "nodePort": 30180 + k, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}}});
    let slice = json!({"metadata": {"name": format!("{name}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [BACKEND.to_string()], "nodeName": "n2",
            "conditions": {"ready": true}}],
        "ports": [{"name": "t", "port": 8080, "protocol": "TCP"}]});
    (svc, slice)
}

fn harness() -> Result<Harness> {
    let mut h = harness_with_empty_programs()?;
    let node = NodeInfo {
        name: "n1".into(),
        nodeport_addresses: vec![NODE.into()],
        ipv6_off: true,
        lb_mode: LbMode::Snat,
        ..NodeInfo::default()
    };
    let (s1, l1) = objects("snat", SNAT_LB, 1, "snat");
    let (s2, l2) = objects("dsr", DSR_LB, 2, "dsr");
    h.program_objects(&node, &[s1, s2], &[l1, l2]);
    Ok(h)
}

/// The client of flow `n`.
fn client(n: u32, lb: Ipv4Addr) -> Tuple {
    Tuple {
        src: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 21, 0, 0)) + n),
        sport: 40_000,
        dst: lb,
        dport: 80,
    }
}

fn to_backend(out: &[u8]) -> Result<()> {
    let p = packet::parse(out);
    if p.dst != BACKEND || p.dport != 8080 || !p.l4_checksum_ok || !p.ip_checksum_ok {
        bail!("not translated to the backend: {p:?}");
    }
    Ok(())
}

/// One batch of each packet kind of `lb`'s mode through `wire`; `flow`
/// numbers new flows' clients.
fn measure_mode(
    wire: &dyn Runner,
    empty: &dyn Runner,
    lb: Ipv4Addr,
    flow: &mut u32,
    count: usize,
) -> Result<ModeCosts> {
    let mut syn = |_| {
        *flow += 1;
        packet::tcp_syn(&client(*flow, lb))
    };
    let e = batch(empty, count, &mut syn, &|_| Ok(()))?;
    let new_flow_ns = batch(wire, count, &mut syn, &to_backend)? - e;
    // The last new flow is the established one: its SYN went through.
    let established = client(*flow, lb);
    let data = [b'r'; REQUEST_BYTES];
    let request = packet::tcp(&established, TCP_ACK, 2, &[], &data);
    let e = batch(empty, count, &mut |_| request.clone(), &|_| Ok(()))?;
    let request_ns = batch(wire, count, &mut |_| request.clone(), &to_backend)? - e;
    let reply_ns = if lb == SNAT_LB {
        Some(measure_reply(wire, &request, count, e)?)
    } else {
        None
    };
    Ok(ModeCosts {
        new_flow_ns,
        request_ns,
        reply_ns,
    })
}

/// The reply to `request` of a masqueraded flow, as it comes back from the
/// backend to the masquerade address and port, through `wire` (its cost
/// less the empty program's, `empty_ns`).
fn measure_reply(wire: &dyn Runner, request: &[u8], count: usize, empty_ns: f64) -> Result<f64> {
    let mut out = vec![0u8; 512];
    let r = wire.run(TestRunOptions {
        data_in: Some(request),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    let masqueraded = packet::parse(&out[..r.data_size_out as usize]);
    let reply = packet::tcp(
        &Tuple {
            src: BACKEND,
            sport: 8080,
            dst: masqueraded.src,
            dport: masqueraded.sport,
        },
        TCP_ACK,
        7,
        &[],
        &[b'a'; REPLY_BYTES],
    );
    let from_frontend = |out: &[u8]| {
        let p = packet::parse(out);
        if p.src != SNAT_LB || p.sport != 80 || !p.l4_checksum_ok {
            bail!("reply not translated back: {p:?}");
        }
        Ok(())
    };
    Ok(batch(wire, count, &mut |_| reply.clone(), &from_frontend)? - empty_ns)
}

/// Measures both modes on both hooks, `batches` rounds of `count` packets
/// of each kind, the modes in turns.
pub fn measure(batches: usize, count: usize) -> Result<Vec<ForwardingCosts>> {
    progress("entry node: SNAT against DSR");
    let h = harness()?;
    let mut flow = 0u32;
    let mut out = Vec::new();
    for hook in Hook::ALL {
        let (wire, empty) = programs(&h.ebpf, hook)?;
        let mut best = [ModeCosts::default(); 2];
        for round in 0..batches {
            for (i, lb) in [SNAT_LB, DSR_LB].into_iter().enumerate() {
                let c = measure_mode(wire, empty, lb, &mut flow, count)?;
                best[i] = if round == 0 { c } else { best[i].least(&c) };
            }
        }
        out.push(ForwardingCosts {
            hook,
            snat: best[0],
            dsr: best[1],
        });
    }
    Ok(out)
}

/// The report section.
pub fn markdown(costs: &[ForwardingCosts]) -> String {
    let mut s = format!(
        "\n### Entry node: SNAT against direct server return\n\nExternal TCP to a LoadBalancer address whose backend is on another node, ns of BPF per packet on the entry node, side by side in one object. A request carries {REQUEST_BYTES} bytes, its reply {REPLY_BYTES}; with DSR the reply goes from the backend's node to the client and never reaches the entry node, which so forwards one packet per request instead of two and {REQUEST_BYTES} bytes instead of {}:\n\n| hook | new flow SNAT | new flow DSR | request SNAT | request DSR | reply SNAT | per request SNAT | per request DSR | DSR / SNAT per request |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        REQUEST_BYTES + REPLY_BYTES
    );
    for c in costs {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
            c.hook.name(),
            c.snat.new_flow_ns,
            c.dsr.new_flow_ns,
            c.snat.request_ns,
            c.dsr.request_ns,
            c.snat.reply_ns.unwrap_or(0.0),
            c.snat.per_request_ns(),
            c.dsr.per_request_ns(),
            c.dsr.per_request_ns() / c.snat.per_request_ns(),
        ));
    }
    s
}

/// The lab's LoadBalancer addresses of the two Services.
const LAB_SNAT_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 120);
const LAB_DSR_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 121);

/// One mode's client numbers through the three-node lab.
pub struct LabRow {
    pub mode: &'static str,
    pub numbers: ClientNumbers,
}

/// Three nodes on the NIC-like wire (XDP), the nginx example's pods one
/// on each, and two LoadBalancer Services of node-3's pod alone, one
/// `snat` and one `dsr`, both reached from outside via node-1.
fn lab_cluster() -> Result<Cluster> {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx-deployment.yaml");
    let mut c = Cluster::from_manifest_files(Wire::Nic, 3, &[example])?;
    let pod = c.pods_on(2).pop().context("a pod on node-3")?;
    let endpoint = json!({"addresses": [c.pod(&pod).ip.to_string()],
        "conditions": {"ready": true}, "nodeName": node_name(3)});
    for (name, lb, k, mode) in [
        ("snat", LAB_SNAT_LB, 1, "snat"),
        ("dsr", LAB_DSR_LB, 2, "dsr"),
    ] {
        let spec = json!({"type": "LoadBalancer", "clusterIP": format!("10.96.3.{k}"),
            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30280 + k}]});
        let status = json!({"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}});
        let annotations = json!({"lb-agent.io/lb-mode": mode});
        c.state
            .put_annotated_service(name, annotations, spec, status, vec![endpoint.clone()]);
    }
    c.write_manifests()?;
    c.start_agents()?;
    for lb in [LAB_SNAT_LB, LAB_DSR_LB] {
        let (lb, via) = (format!("{lb}/32"), node_addr(1).to_string());
        c.ext.exec(&["ip", "route", "add", &lb, "via", &via])?;
    }
    Ok(c)
}

/// Connection rate, request/response latency and the machine's kernel
/// CPU per request, from outside through node-1 to node-3's pod, `snat`
/// and `dsr` in turns, `rounds` runs of `ms` per phase each (medians).
/// SNAT's connections (about 15,000 a second here) all take masquerade
/// ports toward the one pod, which a closed flow holds for 120 s: more
/// than about 2 s of them in all would exhaust the 33,512 ports and fail
/// connections (DSR takes none), so longer runs are refused.
pub fn measure_lab(ms: u64, rounds: usize) -> Result<Vec<LabRow>> {
    if ms * rounds as u64 > 2000 {
        bail!("--ms x --rounds above 2000 would run SNAT out of masquerade ports");
    }
    progress("entry node: SNAT against DSR through three nodes");
    let c = lab_cluster()?;
    let bin = sibling_binary("lab-client", "LAB_CLIENT_BIN")?;
    let mut runs: [Vec<ClientNumbers>; 2] = Default::default();
    crate::wait_for_quiet();
    for _ in 0..rounds {
        for (i, (mode, lb)) in [("snat", LAB_SNAT_LB), ("dsr", LAB_DSR_LB)]
            .into_iter()
            .enumerate()
        {
            let to = format!("{lb}:80");
            let numbers = bench_client(c.ext.command(&bin), &to, ms)
                .with_context(|| format!("{mode} through three nodes"))?;
            runs[i].push(numbers);
        }
    }
    let [snat, dsr] = runs.map(|r| ClientNumbers::median_of(&r));
    Ok(vec![
        LabRow {
            mode: "snat",
            numbers: snat,
        },
        LabRow {
            mode: "dsr",
            numbers: dsr,
        },
    ])
}

/// The lab section of the report.
pub fn lab_markdown(rows: &[LabRow], ms: u64, rounds: usize) -> String {
    let mut s = format!(
        "\n### Through three nodes: SNAT against direct server return\n\nFrom the external client via node-1 (XDP on the NIC-like wire) to a LoadBalancer address whose one pod runs on node-3, a Service of each mode, in turns: connections (connect, 1-byte request and reply, close) and request/response on one kept connection, {ms} ms per phase, medians of {rounds} runs. With DSR node-3 answers the client itself: the replies skip node-1. Kernel CPU is the whole machine's (all three nodes share it) per request:\n\n| mode | conns/s | req/s | p50 µs | p99 µs | kernel µs per request | kernel µs per connection |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for r in rows {
        let n = &r.numbers;
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            r.mode,
            n.conns_per_s,
            n.rr_per_s,
            n.rr_p50_us,
            n.rr_p99_us,
            n.kernel_us_per_rr,
            n.kernel_us_per_conn
        ));
    }
    s
}
