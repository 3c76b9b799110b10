//! Per-packet cost of the wire hook, `lb_xdp_from_wire` and
//! `lb_tc_from_wire` side by side, for IPv4 and IPv6, through
//! BPF_PROG_TEST_RUN, as the number of Services grows (each size has that
//! many Services of each family).
//!
//! Each packet is its own test run (repeat 1): a repeated run would feed the
//! program the packet it rewrote itself (the kernel does not restore the
//! frame between repeats), which is no longer Service traffic. The kernel
//! times only the program; an empty program of the same kind (`lb_xdp_pass`,
//! `lb_tc_pass`) timed the same way is subtracted, which takes out the timer
//! and call overhead (tc's includes building an skb).
//! A figure is the median of one batch of single runs; the reported one is
//! the minimum over batches (the least disturbed by the rest of the machine).
//! The kernel's clock here counts in steps of about 10 ns, so figures move
//! in such steps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::program_names;
use lb_userspace::{
    datapath::loader, model::Family, sync::map_writer::BpfMaps, sync::programmer::Programmer,
};

use crate::{filler_services, kube_proxy::ServicePort, median, progress, typed_objects};
use lb_lab::{
    packet::{self, Tuple, TCP_ACK, TCP_SYN},
    packet6::{self, Tuple6},
};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// The wire hooks measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    pub(crate) fn program(self) -> &'static str {
        match self {
            Hook::Xdp => program_names::XDP_FROM_WIRE,
            Hook::Tc => program_names::TC_FROM_WIRE,
        }
    }

    pub(crate) fn empty(self) -> &'static str {
        match self {
            Hook::Xdp => program_names::XDP_PASS,
            Hook::Tc => program_names::TC_PASS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "XDP",
            Hook::Tc => "tc",
        }
    }
}

/// What one measured instance holds: its Services (that many of each
/// family) and the capacity of its conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    pub services: usize,
    pub conntrack: u32,
}

impl Setup {
    /// `services` Services with the agent's default conntrack capacity.
    pub fn default_conntrack(services: usize) -> Self {
        Self {
            services,
            conntrack: loader::MapSizes::default().conntrack,
        }
    }
}

/// The cost of one packet kind at one setup, in ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketCosts {
    pub services: usize,
    /// The conntrack maps' capacity (entries of each family).
    pub conntrack: u32,
    pub hook: Option<Hook>,
    pub family: Option<Family>,
    /// The empty program's own figure (subtracted from the others).
    pub(crate) empty_ns: f64,
    /// A SYN of a new flow: service lookup, backend pick, conntrack entries
    /// created, DNAT with checksum fix-up.
    pub(crate) new_flow_ns: f64,
    /// A packet of an established flow: conntrack hit, backend lookup, DNAT.
    pub(crate) established_ns: f64,
    /// A packet to an address that is no Service: parse and miss.
    pub(crate) not_service_ns: f64,
}

/// One batch: `count` single test runs of `program`, on packets made by
/// `packet(i)`; returns the median ns. The first output is checked with
/// `check`, so a bench that measured the wrong path fails instead.
pub(crate) fn batch(
    program: &dyn Runner,
    count: usize,
    packet: &mut dyn FnMut(usize) -> Vec<u8>,
    check: &dyn Fn(&[u8]) -> Result<()>,
) -> Result<f64> {
    let mut samples = Vec::with_capacity(count);
    let mut out = vec![0u8; 512];
    for i in 0..count {
        let input = packet(i);
        let r = program
            .run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        if r.return_value != program.pass() {
            bail!("verdict {} instead of passing on", r.return_value);
        }
        if i == 0 {
            check(&out[..r.data_size_out as usize])?;
        }
        samples.push(r.duration.as_nanos() as f64);
    }
    Ok(median(samples))
}

/// An XDP or tc program run by BPF_PROG_TEST_RUN.
pub(crate) trait Runner {
    fn run(
        &self,
        opts: TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>;
    /// The verdict of a packet that goes on.
    fn pass(&self) -> u32;
}

impl Runner for Xdp {
    fn run(
        &self,
        opts: TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError> {
        self.test_run(opts)
    }
    fn pass(&self) -> u32 {
        XDP_PASS
    }
}

impl Runner for SchedClassifier {
    fn run(
        &self,
        opts: TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError> {
        self.test_run(opts)
    }
    fn pass(&self) -> u32 {
        TC_ACT_OK
    }
}

/// One loaded object whose maps hold one setup's Services.
struct Instance {
    setup: Setup,
    ebpf: Ebpf,
    /// Keeps the maps (taken out of `ebpf`) open.
    _programmer: Programmer<BpfMaps>,
    probe: ServicePort,
    /// The probed IPv6 Service (the last programmed).
    probe6: ServicePort,
}

fn instance(setup: Setup, endpoints: usize) -> Result<Instance> {
    let n = setup.services;
    // n Services of each family; reverse NAT ids are one space over both.
    let sizes = loader::MapSizes {
        conntrack: setup.conntrack,
        ..crate::map_sizes(2 * n, n * endpoints, n * (1 + endpoints))
    };
    let mut ebpf = crate::load_sized(sizes)?;
    for hook in Hook::ALL {
        for name in [hook.program(), hook.empty()] {
            let p = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?;
            match hook {
                Hook::Xdp => <&mut Xdp>::try_from(p)?.load(),
                Hook::Tc => <&mut SchedClassifier>::try_from(p)?.load(),
            }
            .with_context(|| format!("loading {name}"))?;
        }
    }
    let maps = loader::take_maps(&mut ebpf)?;
    let mut programmer = crate::programmer_on(maps, &sizes);
    let ports = filler_services(Family::Ipv4, n, endpoints);
    let ports6 = filler_services(Family::Ipv6, n, endpoints);
    let (mut services, mut slices) = typed_objects(&ports);
    let (services6, slices6) = typed_objects(&ports6);
    services.extend(services6);
    slices.extend(slices6);
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
    let probe6 = ports6.last().context("at least one Service")?.clone();
    Ok(Instance {
        setup,
        ebpf,
        _programmer: programmer,
        probe,
        probe6,
    })
}

/// Measures each setup, `batches` batches of `count` packets per figure.
/// Every setup has its own loaded object and maps, and the batches go
/// round the setups in turn, so a noisy moment of the machine hits them
/// all alike instead of one setup's figures.
pub fn measure(
    setups: &[Setup],
    endpoints: usize,
    batches: usize,
    count: usize,
) -> Result<Vec<PacketCosts>> {
    let mut instances = Vec::new();
    for &setup in setups {
        progress(&format!(
            "per packet: programming {} Services into their own maps (conntrack capacity {})",
            setup.services, setup.conntrack
        ));
        instances.push(instance(setup, endpoints)?);
    }
    let kinds: Vec<(Hook, Family)> = Hook::ALL
        .iter()
        .flat_map(|h| [Family::Ipv4, Family::Ipv6].map(|f| (*h, f)))
        .collect();
    let mut best: Vec<PacketCosts> = kinds
        .iter()
        .flat_map(|(hook, family)| {
            setups.iter().map(|setup| PacketCosts {
                services: setup.services,
                conntrack: setup.conntrack,
                hook: Some(*hook),
                family: Some(*family),
                empty_ns: f64::MAX,
                new_flow_ns: f64::MAX,
                established_ns: f64::MAX,
                not_service_ns: f64::MAX,
            })
        })
        .collect();
    let mut flow = 0usize;
    for b in 0..batches {
        progress(&format!("per packet: batch {} of {batches}", b + 1));
        for (i, (hook, family)) in kinds.iter().enumerate() {
            for (j, inst) in instances.iter().enumerate() {
                let best = &mut best[i * setups.len() + j];
                let got = match family {
                    Family::Ipv4 => measure_once(inst, *hook, count, &mut flow)?,
                    Family::Ipv6 => measure_once6(inst, *hook, count, &mut flow)?,
                };
                best.empty_ns = best.empty_ns.min(got.empty_ns);
                best.new_flow_ns = best.new_flow_ns.min(got.new_flow_ns);
                best.established_ns = best.established_ns.min(got.established_ns);
                best.not_service_ns = best.not_service_ns.min(got.not_service_ns);
            }
        }
    }
    for c in &best {
        progress(&format!(
            "per packet, {} {} at {} Services, conntrack capacity {}: new flow {:.0} ns, established {:.0} ns, not a Service {:.0} ns (empty program {:.0} ns)",
            c.hook.map(Hook::name).unwrap_or_default(), c.family.map(|f| f.to_string()).unwrap_or_default(), c.services, c.conntrack, c.new_flow_ns, c.established_ns, c.not_service_ns, c.empty_ns
        ));
    }
    Ok(best)
}

/// The wire program of `hook` and its empty twin, loaded in `ebpf`.
pub(crate) fn programs(ebpf: &Ebpf, hook: Hook) -> Result<(&dyn Runner, &dyn Runner)> {
    let program = |name: &str| -> Result<&dyn Runner> {
        let p = ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?;
        Ok(match hook {
            Hook::Xdp => <&Xdp>::try_from(p)? as &dyn Runner,
            Hook::Tc => <&SchedClassifier>::try_from(p)? as &dyn Runner,
        })
    };
    Ok((program(hook.program())?, program(hook.empty())?))
}

/// The packets of one family's probe: a SYN of the established flow, the
/// SYN of new flow `i`, an ACK of the established flow and one to an
/// address no Service has; with the checks of a translated and of an
/// untouched output.
struct Probe<'a> {
    first_syn: Vec<u8>,
    new_syn: &'a dyn Fn(usize) -> Vec<u8>,
    ack: Vec<u8>,
    other: Vec<u8>,
    to_backend: &'a dyn Fn(&[u8]) -> Result<()>,
    untouched: &'a dyn Fn(&[u8]) -> Result<()>,
}

/// One batch of each packet kind of `probe` through `hook` of `inst`;
/// `flow` numbers the new flows' clients (never seen before).
fn measure_probe(
    inst: &Instance,
    hook: Hook,
    count: usize,
    flow: &mut usize,
    probe: &Probe,
) -> Result<PacketCosts> {
    let (wire, empty) = programs(&inst.ebpf, hook)?;
    // The flow's first packet creates its conntrack entry.
    batch(wire, 1, &mut |_| probe.first_syn.clone(), probe.to_backend)?;
    let e = batch(empty, count, &mut |_| probe.ack.clone(), &|_| Ok(()))?;
    let nf = batch(
        wire,
        count,
        &mut |_| {
            *flow += 1;
            (probe.new_syn)(*flow)
        },
        probe.to_backend,
    )?;
    let est = batch(wire, count, &mut |_| probe.ack.clone(), probe.to_backend)?;
    let ns = batch(wire, count, &mut |_| probe.other.clone(), probe.untouched)?;
    Ok(PacketCosts {
        services: inst.setup.services,
        conntrack: inst.setup.conntrack,
        hook: Some(hook),
        family: None,
        empty_ns: e,
        new_flow_ns: nf - e,
        established_ns: est - e,
        not_service_ns: ns - e,
    })
}

/// The IPv4 probe: the last programmed Service.
fn measure_once(
    inst: &Instance,
    hook: Hook,
    count: usize,
    flow: &mut usize,
) -> Result<PacketCosts> {
    let probe = &inst.probe;
    let IpAddr::V4(cluster_ip) = probe.cluster_ip else {
        bail!("the IPv4 probe has an IPv6 address");
    };
    let backends: Vec<IpAddr> = probe.endpoints.iter().map(|e| e.0).collect();
    let to_backend = |out: &[u8]| -> Result<()> {
        let p = packet::parse(out);
        if !backends.contains(&p.dst.into()) || p.dport != 8080 || !p.l4_checksum_ok {
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
        dst: cluster_ip,
        dport: probe.port,
    };
    let new_syn = |i: usize| {
        packet::tcp_syn(&Tuple {
            src: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i as u32),
            ..established
        })
    };
    let other = Tuple {
        dst: NOT_A_SERVICE,
        ..established
    };
    let packets = Probe {
        first_syn: packet::tcp_syn(&established),
        new_syn: &new_syn,
        ack: packet::tcp(&established, TCP_ACK, 1, &[], b"x"),
        other: packet::tcp(&other, TCP_ACK, 1, &[], b"x"),
        to_backend: &to_backend,
        untouched: &untouched,
    };
    let costs = measure_probe(inst, hook, count, flow, &packets)?;
    Ok(PacketCosts {
        family: Some(Family::Ipv4),
        ..costs
    })
}

/// An address no Service has.
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const NOT_A_SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 1);

/// The IPv6 probe: the last programmed IPv6 Service.
fn measure_once6(
    inst: &Instance,
    hook: Hook,
    count: usize,
    flow: &mut usize,
) -> Result<PacketCosts> {
    let probe = &inst.probe6;
    let IpAddr::V6(cluster_ip) = probe.cluster_ip else {
        bail!("the IPv6 probe has an IPv4 address");
    };
    let backends: Vec<IpAddr> = probe.endpoints.iter().map(|e| e.0).collect();
    let to_backend = |out: &[u8]| -> Result<()> {
        let p = packet6::parse6(out);
        if !backends.contains(&p.dst.into()) || p.dport != 8080 || !p.l4_checksum_ok {
            bail!("not translated to a backend: {p:?}");
        }
        Ok(())
    };
    let untouched = |out: &[u8]| -> Result<()> {
        let p = packet6::parse6(out);
        if p.dst != NOT_A_SERVICE6 {
            bail!("a non-Service packet was changed: {p:?}");
        }
        Ok(())
    };
    let established = Tuple6 {
        src: Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, 0xffff, 1),
        sport: 40_000,
        dst: cluster_ip,
        dport: probe.port,
    };
    let new_syn = |i: usize| {
        let src = Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
        packet6::tcp6(&Tuple6 { src, ..established }, TCP_SYN, &[], &[])
    };
    let other = Tuple6 {
        dst: NOT_A_SERVICE6,
        ..established
    };
    let packets = Probe {
        first_syn: packet6::tcp6(&established, TCP_SYN, &[], &[]),
        new_syn: &new_syn,
        ack: packet6::tcp6(&established, TCP_ACK, &[], b"x"),
        other: packet6::tcp6(&other, TCP_ACK, &[], b"x"),
        to_backend: &to_backend,
        untouched: &untouched,
    };
    let costs = measure_probe(inst, hook, count, flow, &packets)?;
    Ok(PacketCosts {
        family: Some(Family::Ipv6),
        ..costs
    })
}

/// The report sections: the Services sizes at the default conntrack
/// capacity, then the other capacities (if any were measured).
pub fn markdown(costs: &[PacketCosts], endpoints: usize, batches: usize, count: usize) -> String {
    let default = loader::MapSizes::default().conntrack;
    let (at_default, others): (Vec<PacketCosts>, Vec<PacketCosts>) =
        costs.iter().partition(|c| c.conntrack == default);
    let mut s = sizes_markdown(&at_default, endpoints, batches, count);
    if !others.is_empty() {
        s.push_str(&capacity_markdown(costs, batches, count));
    }
    s
}

/// The section of the Services sizes.
fn sizes_markdown(costs: &[PacketCosts], endpoints: usize, batches: usize, count: usize) -> String {
    let mut s = String::from("## Per-packet cost of the wire hook: XDP and tc\n\n");
    s.push_str(&format!(
        "BPF_PROG_TEST_RUN of `lb_xdp_from_wire` and `lb_tc_from_wire` (the same NAT core; tc updates checksums with the skb helpers, right for partial checksums, which XDP cannot be), one packet per run, ns per packet minus the empty program's of the same kind (`lb_xdp_pass`, `lb_tc_pass`: same packet, same way); median of {count} runs, minimum over {batches} batches taken in turns across the sizes and hooks (each size has its own maps). Services have {endpoints} endpoints each; the probed one is the last programmed.\n\n"
    ));
    s.push_str("| Services (of each family) | hook | family | new flow (SYN: lookup, pick, conntrack, DNAT) | established flow (conntrack hit, DNAT) | not a Service (parse, miss) | empty program |\n| ---: | --- | --- | ---: | ---: | ---: | ---: |\n");
    for c in costs {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns |\n",
            crate::thousands(c.services),
            c.hook.map(Hook::name).unwrap_or_default(),
            c.family.map(|f| f.to_string()).unwrap_or_default(),
            c.new_flow_ns,
            c.established_ns,
            c.not_service_ns,
            c.empty_ns
        ));
    }
    s.push('\n');
    for size in costs
        .iter()
        .map(|c| c.services)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let of = |h: Hook, f: Family| {
            costs
                .iter()
                .find(|c| c.services == size && c.hook == Some(h) && c.family == Some(f))
        };
        if let (Some(x), Some(t)) = (of(Hook::Xdp, Family::Ipv4), of(Hook::Tc, Family::Ipv4)) {
            s.push_str(&format!(
                "- {} Services, IPv4, tc / XDP: new flow x{:.2}, established x{:.2}, not a Service x{:.2}.\n",
                crate::thousands(size),
                t.new_flow_ns / x.new_flow_ns,
                t.established_ns / x.established_ns,
                t.not_service_ns / x.not_service_ns.max(1.0),
            ));
        }
        for h in Hook::ALL {
            if let (Some(v4), Some(v6)) = (of(h, Family::Ipv4), of(h, Family::Ipv6)) {
                s.push_str(&format!(
                    "- {} Services, {}, IPv6 / IPv4: new flow x{:.2}, established x{:.2}, not a Service x{:.2}.\n",
                    crate::thousands(size),
                    h.name(),
                    v6.new_flow_ns / v4.new_flow_ns,
                    v6.established_ns / v4.established_ns,
                    v6.not_service_ns / v4.not_service_ns.max(1.0),
                ));
            }
        }
    }
    s.push('\n');
    s
}

/// The section of the conntrack capacities, at the smallest number of
/// Services measured with more than one capacity.
fn capacity_markdown(costs: &[PacketCosts], batches: usize, count: usize) -> String {
    let Some(services) = costs
        .iter()
        .filter(|c| {
            costs
                .iter()
                .any(|o| o.services == c.services && o.conntrack != c.conntrack)
        })
        .map(|c| c.services)
        .min()
    else {
        return String::new();
    };
    let mut rows: Vec<&PacketCosts> = costs.iter().filter(|c| c.services == services).collect();
    rows.sort_by_key(|c| {
        (
            c.conntrack,
            c.hook.map(Hook::name),
            c.family.map(|f| f.to_string()),
        )
    });
    // Each batch starts one established flow and `count` new ones per
    // hook, two entries each, in each family's map.
    let entries = batches * (count + 1) * Hook::ALL.len() * 2;
    let mut s = String::from("## New flows against the conntrack capacity\n\n");
    s.push_str(&format!(
        "The same packets at {services} Service(s), with conntrack maps of each capacity (entries of each family; the kernel gives an LRU hash map a bucket of 16 bytes per entry of capacity, and an element per entry). A new flow looks up and inserts two entries, forward and reply, each in a bucket at a random place; an established flow finds the same entry again. Over the run each family's map gets {} entries: a smaller capacity is full and evicts. The capacities were measured in turns, in one run.\n\n",
        crate::thousands(entries)
    ));
    s.push_str("| conntrack capacity | hook | family | new flow | established flow |\n| ---: | --- | --- | ---: | ---: |\n");
    for c in &rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} ns | {:.0} ns |\n",
            crate::thousands(c.conntrack as usize),
            c.hook.map(Hook::name).unwrap_or_default(),
            c.family.map(|f| f.to_string()).unwrap_or_default(),
            c.new_flow_ns,
            c.established_ns,
        ));
    }
    s.push('\n');
    let smallest = rows.iter().map(|c| c.conntrack).min().unwrap_or_default();
    let default = loader::MapSizes::default().conntrack;
    for c in rows
        .iter()
        .filter(|c| c.conntrack == default && default != smallest)
    {
        if let Some(small) = rows
            .iter()
            .find(|o| o.conntrack == smallest && o.hook == c.hook && o.family == c.family)
        {
            s.push_str(&format!(
                "- {} {}: a new flow at the default capacity ({}) costs x{:.2} of one at {}.\n",
                c.hook.map(Hook::name).unwrap_or_default(),
                c.family.map(|f| f.to_string()).unwrap_or_default(),
                crate::thousands(default as usize),
                c.new_flow_ns / small.new_flow_ns,
                crate::thousands(smallest as usize),
            ));
        }
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(services: usize, conntrack: u32, hook: Hook, new_flow_ns: f64) -> PacketCosts {
        PacketCosts {
            services,
            conntrack,
            hook: Some(hook),
            family: Some(Family::Ipv4),
            new_flow_ns,
            established_ns: 60.0,
            ..Default::default()
        }
    }

    #[test]
    fn other_capacities_get_their_own_section_and_ratio() {
        let default = loader::MapSizes::default().conntrack;
        let all = [
            costs(1, default, Hook::Xdp, 500.0),
            costs(1000, default, Hook::Xdp, 510.0),
            costs(1, 4096, Hook::Xdp, 250.0),
        ];
        let s = markdown(&all, 4, 1, 10);
        let (sizes, capacities) = s
            .split_once("## New flows against the conntrack capacity")
            .expect("a capacity section");
        assert!(sizes.contains("| 1,000 | XDP | IPv4 | 510 ns"));
        assert!(!sizes.contains("250 ns"), "{sizes}");
        assert!(capacities.contains("| 4,096 | XDP | IPv4 | 250 ns | 60 ns |"));
        assert!(!capacities.contains("510 ns"), "{capacities}");
        assert!(
            capacities.contains("costs x2.00 of one at 4,096"),
            "{capacities}"
        );
    }

    #[test]
    fn one_capacity_has_no_capacity_section() {
        let default = loader::MapSizes::default().conntrack;
        let s = markdown(&[costs(1, default, Hook::Tc, 500.0)], 4, 1, 10);
        assert!(!s.contains("conntrack capacity"), "{s}");
    }
}
