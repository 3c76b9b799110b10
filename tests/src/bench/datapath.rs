//! Per-packet cost of `lb_xdp_from_wire`, through BPF_PROG_TEST_RUN, as the
//! number of Services grows.
//!
//! Each packet is its own test run (repeat 1): a repeated run would feed the
//! program the packet it rewrote itself (the kernel does not restore the
//! frame between repeats), which is no longer Service traffic. The kernel
//! times only the program; an empty XDP program (`lb_xdp_pass`) timed the
//! same way is subtracted, which takes out the timer and call overhead.
//! A figure is the median of one batch of single runs; the reported one is
//! the minimum over batches (the least disturbed by the rest of the machine).
//! The kernel's clock here counts in steps of about 10 ns, so figures move
//! in such steps.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::program_names;
use lb_userspace::{
    differ::MapContents, loader, map_writer::BpfMaps, metrics::Metrics, programmer::Programmer,
};

use super::{filler_services, kube_proxy::ServicePort, median, progress, typed_objects};
use crate::packet::{self, Tuple, TCP_ACK};

const XDP_PASS: u32 = 2;

/// The cost of one packet kind at one number of Services, in ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketCosts {
    pub services: usize,
    /// The empty program's own figure (subtracted from the others).
    pub empty_ns: f64,
    /// A SYN of a new flow: service lookup, backend pick, conntrack entries
    /// created, DNAT with checksum fix-up.
    pub new_flow_ns: f64,
    /// A packet of an established flow: conntrack hit, backend lookup, DNAT.
    pub established_ns: f64,
    /// A packet to an address that is no Service: parse and miss.
    pub not_service_ns: f64,
}

/// One batch: `count` single test runs of `program`, on packets made by
/// `packet(i)`; returns the median ns. The first output is checked with
/// `check`, so a bench that measured the wrong path fails instead.
fn batch(
    program: &Xdp,
    count: usize,
    packet: &mut dyn FnMut(usize) -> Vec<u8>,
    check: &dyn Fn(&[u8]) -> Result<()>,
) -> Result<f64> {
    let mut samples = Vec::with_capacity(count);
    let mut out = vec![0u8; 512];
    for i in 0..count {
        let input = packet(i);
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        if r.return_value != XDP_PASS {
            bail!("verdict {} instead of XDP_PASS", r.return_value);
        }
        if i == 0 {
            check(&out[..r.data_size_out as usize])?;
        }
        samples.push(r.duration.as_nanos() as f64);
    }
    Ok(median(samples))
}

/// One loaded object whose maps hold one size's Services.
struct Instance {
    services: usize,
    ebpf: Ebpf,
    /// Keeps the maps (taken out of `ebpf`) open.
    _programmer: Programmer<BpfMaps>,
    probe: ServicePort,
}

fn instance(n: usize, endpoints: usize) -> Result<Instance> {
    let mut ebpf = Ebpf::load(lb_userspace::EBPF_OBJECT).context("loading the BPF object")?;
    for name in [program_names::XDP_FROM_WIRE, program_names::XDP_PASS] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    let maps = loader::take_maps(&mut ebpf)?;
    let mut programmer: Programmer<BpfMaps> =
        Programmer::new(maps, MapContents::default(), Metrics::new());
    let ports = filler_services(n, endpoints);
    let (services, slices) = typed_objects(&ports);
    let report = programmer.full_sync(&services, &slices);
    if !report.errors.is_empty() {
        bail!(
            "{n} Services do not fit the maps: {} errors, first: {}",
            report.errors.len(),
            report.errors[0]
        );
    }
    // The probed Service: the last one programmed.
    let probe = ports.last().context("at least one Service")?.clone();
    Ok(Instance {
        services: n,
        ebpf,
        _programmer: programmer,
        probe,
    })
}

/// Measures at each size in `sizes`, `batches` batches of `count` packets
/// per figure. Every size has its own loaded object and maps, and the
/// batches go round the sizes in turn, so a noisy moment of the machine
/// hits them all alike instead of one size's figures.
pub fn measure(
    sizes: &[usize],
    endpoints: usize,
    batches: usize,
    count: usize,
) -> Result<Vec<PacketCosts>> {
    let mut instances = Vec::new();
    for &n in sizes {
        progress(&format!(
            "per packet: programming {n} Services into their own maps"
        ));
        instances.push(instance(n, endpoints)?);
    }
    let mut best: Vec<PacketCosts> = sizes
        .iter()
        .map(|&n| PacketCosts {
            services: n,
            empty_ns: f64::MAX,
            new_flow_ns: f64::MAX,
            established_ns: f64::MAX,
            not_service_ns: f64::MAX,
        })
        .collect();
    let mut flow = 0usize;
    for b in 0..batches {
        progress(&format!("per packet: batch {} of {batches}", b + 1));
        for (inst, best) in instances.iter().zip(best.iter_mut()) {
            let xdp: &Xdp = inst
                .ebpf
                .program(program_names::XDP_FROM_WIRE)
                .context("XDP program")?
                .try_into()?;
            let empty: &Xdp = inst
                .ebpf
                .program(program_names::XDP_PASS)
                .context("empty program")?
                .try_into()?;
            let probe = &inst.probe;
            let backends: Vec<Ipv4Addr> = probe.endpoints.iter().map(|e| e.0).collect();
            let to_backend = |out: &[u8]| -> Result<()> {
                let p = packet::parse(out);
                if !backends.contains(&p.dst) || p.dport != 8080 || !p.l4_checksum_ok {
                    bail!("not translated to a backend: {p:?}");
                }
                Ok(())
            };
            let untouched = |out: &[u8]| -> Result<()> {
                let p = packet::parse(out);
                if p.dst != NOT_A_SERVICE {
                    bail!("a non-Service packet was changed: {p:?}");
                }
                Ok(())
            };
            let established = Tuple {
                src: Ipv4Addr::new(172, 31, 255, 1),
                sport: 40_000,
                dst: probe.cluster_ip,
                dport: probe.port,
            };
            let ack = packet::tcp(&established, TCP_ACK, 1, &[], b"x");
            let other = packet::tcp(
                &Tuple {
                    dst: NOT_A_SERVICE,
                    ..established
                },
                TCP_ACK,
                1,
                &[],
                b"x",
            );
            // The flow's first packet creates its conntrack entry.
            batch(xdp, 1, &mut |_| packet::tcp_syn(&established), &to_backend)?;
            let e = batch(empty, count, &mut |_| ack.clone(), &|_| Ok(()))?;
            // New flows: a client address never seen before, each.
            let nf = batch(
                xdp,
                count,
                &mut |_| {
                    flow += 1;
                    packet::tcp_syn(&Tuple {
                        src: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + flow as u32),
                        ..established
                    })
                },
                &to_backend,
            )?;
            let est = batch(xdp, count, &mut |_| ack.clone(), &to_backend)?;
            let ns = batch(xdp, count, &mut |_| other.clone(), &untouched)?;
            best.empty_ns = best.empty_ns.min(e);
            best.new_flow_ns = best.new_flow_ns.min(nf - e);
            best.established_ns = best.established_ns.min(est - e);
            best.not_service_ns = best.not_service_ns.min(ns - e);
        }
    }
    for (c, inst) in best.iter().zip(&instances) {
        progress(&format!(
            "per packet at {} Services: new flow {:.0} ns, established {:.0} ns, not a Service {:.0} ns (empty program {:.0} ns)",
            inst.services, c.new_flow_ns, c.established_ns, c.not_service_ns, c.empty_ns
        ));
    }
    Ok(best)
}

/// An address no Service has.
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// The report section.
pub fn markdown(costs: &[PacketCosts], endpoints: usize, batches: usize, count: usize) -> String {
    let mut s = String::from("## Per-packet cost of the XDP program\n\n");
    s.push_str(&format!(
        "BPF_PROG_TEST_RUN of `lb_xdp_from_wire`, one packet per run, ns per packet minus the empty program's (`lb_xdp_pass`, same packet, same way); median of {count} runs, minimum over {batches} batches taken in turns across the sizes (each size has its own maps). Services have {endpoints} endpoints each; the probed one is the last programmed.\n\n"
    ));
    s.push_str("| Services | new flow (SYN: lookup, pick, conntrack, DNAT) | established flow (conntrack hit, DNAT) | not a Service (parse, miss) | empty program |\n| ---: | ---: | ---: | ---: | ---: |\n");
    for c in costs {
        s.push_str(&format!(
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns |\n",
            super::thousands(c.services),
            c.new_flow_ns,
            c.established_ns,
            c.not_service_ns,
            c.empty_ns
        ));
    }
    if let (Some(first), Some(last)) = (costs.first(), costs.last()) {
        s.push_str(&format!(
            "\nFrom {} to {} Services: new flow x{:.2}, established x{:.2}.\n",
            super::thousands(first.services),
            super::thousands(last.services),
            last.new_flow_ns / first.new_flow_ns,
            last.established_ns / first.established_ns
        ));
    }
    s.push('\n');
    s
}
