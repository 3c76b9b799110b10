//! Per-packet cost of picking a backend for a new flow of an external
//! frontend: at random against Maglev, side by side. Two LoadBalancer
//! Services of the same endpoints in one loaded object, one annotated
//! for Maglev (its table written as the agent writes it); new flows' SYNs
//! from outside through `lb_xdp_from_wire` and `lb_tc_from_wire`, in
//! turns, timed as `datapath` times them (one test run a packet, the
//! empty program's figure subtracted, the median of a batch, the least
//! of the batches). Both masquerade, as external traffic with
//! externalTrafficPolicy Cluster does.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use aya::programs::{SchedClassifier, Xdp};
use lb_lab::{
    packet::{self, Tuple},
    packet_harness::{Harness, NODE},
};
use lb_userspace::{model::LbAlgorithm, translate::NodeInfo};
use serde_json::{json, Value};

use crate::{
    datapath::{batch, programs, Hook},
    progress,
};

/// The LoadBalancer addresses of the two Services.
const RANDOM_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const MAGLEV_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

/// New-flow cost of one hook with each algorithm, in ns.
#[derive(Clone, Copy, Debug)]
pub struct SelectionCosts {
    pub hook: Hook,
    pub random_ns: f64,
    pub maglev_ns: f64,
}

/// A LoadBalancer Service `name` at `lb` with `endpoints` endpoints, and
/// its slice.
fn objects(name: &str, lb: Ipv4Addr, k: u16, endpoints: usize, maglev: bool) -> (Value, Value) {
    let algorithm = if maglev { "maglev" } else { "random" };
    let svc = json!({"metadata": {"name": name, "namespace": "default",
            "annotations": {"lb-agent.io/lb-algorithm": algorithm}},
        "spec": {"type": "LoadBalancer", "clusterIP": format!("10.96.1.{k}"),
            "ports": [{"name": "t", "port": 80, "nodePort": 30080 + k, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}}});
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| json!({"addresses": [backend(e).to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice = json!({"metadata": {"name": format!("{name}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "t", "port": 8080, "protocol": "TCP"}]});
    (svc, slice)
}

fn backend(e: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 9, 10 + e as u8)
}

/// A packet harness whose empty programs (what a measurement subtracts)
/// are loaded too.
pub(crate) fn harness_with_empty_programs() -> Result<Harness> {
    let mut h = Harness::new();
    for hook in Hook::ALL {
        let name = hook.empty();
        let p = h
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?;
        match hook {
            Hook::Xdp => <&mut Xdp>::try_from(p)?.load()?,
            Hook::Tc => <&mut SchedClassifier>::try_from(p)?.load()?,
        }
    }
    Ok(h)
}

/// The harness with both Services programmed and the Maglev table written.
fn harness(endpoints: usize) -> Result<Harness> {
    if !(1..=200).contains(&endpoints) {
        bail!("--endpoints 1..=200");
    }
    let mut h = harness_with_empty_programs()?;
    let node = NodeInfo {
        name: "n1".into(),
        nodeport_addresses: vec![NODE.into()],
        ipv6_off: true,
        lb_algorithm: LbAlgorithm::Random,
        ..NodeInfo::default()
    };
    let (s1, l1) = objects("random", RANDOM_LB, 1, endpoints, false);
    let (s2, l2) = objects("maglev", MAGLEV_LB, 2, endpoints, true);
    h.program_objects(&node, &[s1, s2], &[l1, l2]);
    h.write_maglev_tables("bench");
    Ok(h)
}

/// Measures both algorithms on both hooks, `batches` rounds of `count`
/// new flows each, the algorithms in turns.
pub fn measure(endpoints: usize, batches: usize, count: usize) -> Result<Vec<SelectionCosts>> {
    progress("backend selection: random against Maglev");
    let h = harness(endpoints)?;
    let backends: Vec<Ipv4Addr> = (0..endpoints).map(backend).collect();
    let to_backend = |out: &[u8]| -> Result<()> {
        let p = packet::parse(out);
        if !backends.contains(&p.dst) || p.dport != 8080 || !p.l4_checksum_ok {
            bail!("not translated to a backend: {p:?}");
        }
        Ok(())
    };
    let mut flow = 0u32;
    let mut out = Vec::new();
    for hook in Hook::ALL {
        let (wire, empty) = programs(&h.ebpf, hook)?;
        let mut best = [f64::MAX; 2];
        for _ in 0..batches {
            for (i, lb) in [RANDOM_LB, MAGLEV_LB].into_iter().enumerate() {
                let mut syn = |_| {
                    flow += 1;
                    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 0)) + flow);
                    packet::tcp_syn(&Tuple {
                        src,
                        sport: 40_000,
                        dst: lb,
                        dport: 80,
                    })
                };
                let e = batch(empty, count, &mut syn, &|_| Ok(()))?;
                let nf = batch(wire, count, &mut syn, &to_backend)?;
                best[i] = best[i].min(nf - e);
            }
        }
        out.push(SelectionCosts {
            hook,
            random_ns: best[0],
            maglev_ns: best[1],
        });
    }
    Ok(out)
}

/// The report section.
pub fn markdown(costs: &[SelectionCosts], endpoints: usize) -> String {
    let mut s = format!(
        "\n### Backend selection: random against Maglev\n\nA new flow's SYN from outside to a LoadBalancer address of {endpoints} endpoints (masqueraded), ns, side by side in one object:\n\n| hook | random | Maglev | Maglev / random |\n| --- | ---: | ---: | ---: |\n"
    );
    for c in costs {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} |\n",
            c.hook.name(),
            c.random_ns,
            c.maglev_ns,
            c.maglev_ns / c.random_ns
        ));
    }
    s
}
