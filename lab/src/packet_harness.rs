//! The BPF object loaded for BPF_PROG_TEST_RUN, with maps of its own, and
//! helpers to program Services into it and run crafted packets through each
//! program.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{
    map_names, program_names, Ct4Key, Ct4Value, Ct6Key, Ct6Value, DatapathConfig,
    SVC_FLAG_CLUSTER_IP,
};
use lb_userspace::{
    datapath::loader::{self, LoadConfig, MapSizes},
    model::{BackendSet, DesiredState, L4Addr, Protocol, ServiceEntry, ServiceName},
    node::masquerade_ports::{self, PortRange},
    source::objects::{ServiceInfo, SliceInfo},
    sync::differ::{plan_within, IdLimits, MapContents},
    sync::maglev_tables::{seed_of, MaglevTables},
    sync::map_writer::{apply_plan, BpfMaps},
    translate::{maglev, translate_on, NodeInfo},
};
use serde_json::Value;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 100);
/// The node address the harness's programs masquerade to.
pub const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The node's IPv6 masquerade address.
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);

/// An IPv6 frontend to program: address, port, protocol, `SVC_FLAG_*`,
/// backends as (address, port).
pub struct Frontend6<'a> {
    pub addr: Ipv6Addr,
    pub port: u16,
    pub proto: Protocol,
    pub flags: u16,
    pub backends: &'a [(Ipv6Addr, u16)],
}

/// The programs a packet can be run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// XDP on the wire.
    Xdp,
    /// tc on the wire.
    TcWire,
    /// tc on a pod's veth.
    TcPod,
}

impl Program {
    /// The two programs that can serve the wire.
    pub const WIRE: [Program; 2] = [Program::Xdp, Program::TcWire];

    fn name(self) -> &'static str {
        match self {
            Program::Xdp => program_names::XDP_FROM_WIRE,
            Program::TcWire => program_names::TC_FROM_WIRE,
            Program::TcPod => program_names::TC_FROM_POD,
        }
    }

    /// The verdict a translated packet that goes on gets.
    pub fn pass(self) -> u32 {
        match self {
            Program::Xdp => XDP_PASS,
            Program::TcWire | Program::TcPod => TC_ACT_OK,
        }
    }

    /// The verdict of an answer sent back where the packet came from.
    pub fn answer(self) -> u32 {
        match self {
            Program::Xdp => XDP_TX,
            Program::TcWire | Program::TcPod => TC_ACT_REDIRECT,
        }
    }
}

/// The masquerade ports the harness loads with: Linux's defaults carved out.
pub fn default_masquerade_ports() -> Vec<PortRange> {
    masquerade_ports::parse_list("1024-29999,61000-65535").expect("valid ranges")
}

/// A Service port to program: (port, protocol, backends as (address, port)).
type TestService<'a> = (u16, Protocol, &'a [(Ipv4Addr, u16)]);

pub struct Harness {
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
    pub current: MapContents,
    /// What the maps were last taken to (Maglev tables read its weights).
    pub desired: DesiredState,
    /// The ids the maps have room for.
    limits: IdLimits,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_masquerade_ports(&default_masquerade_ports())
    }

    /// A harness whose programs masquerade to ports of `ranges`.
    pub fn with_masquerade_ports(ranges: &[PortRange]) -> Self {
        Self::with_sizes(ranges, MapSizes::default())
    }

    /// A harness whose maps have room for `frontends` reverse NAT ids
    /// (`--frontends-max`).
    pub fn with_frontends(frontends: u32) -> Self {
        let sizes = MapSizes {
            frontends,
            ..MapSizes::default()
        };
        Self::with_sizes(&default_masquerade_ports(), sizes)
    }

    fn with_sizes(ranges: &[PortRange], sizes: MapSizes) -> Self {
        let config = LoadConfig {
            sizes,
            snat_ports: masquerade_ports::to_global(ranges).expect("port ranges"),
            datapath: DatapathConfig {
                masquerade_addr: u32::from_ne_bytes(NODE.octets()),
                masquerade_addr6: lb_common::ipv6::words(NODE6.octets()),
                maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
                ..Default::default()
            },
        };
        // Not pinned: each test gets its own maps.
        let mut ebpf = loader::object_loader(&config)
            .load(lb_userspace::EBPF_OBJECT)
            .expect("load BPF object");
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::XDP_FROM_WIRE)
            .unwrap()
            .try_into()
            .unwrap();
        xdp.load().expect("load XDP program");
        for name in [program_names::TC_FROM_POD, program_names::TC_FROM_WIRE] {
            let tc: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            tc.load().expect("load tc program");
        }
        let maps = loader::take_maps(&mut ebpf).expect("take maps");
        Self {
            ebpf,
            maps,
            current: MapContents::default(),
            desired: DesiredState::default(),
            limits: sizes.id_limits(),
        }
    }

    /// Programs Services: (port, proto, backends as (addr, port)).
    pub fn program(&mut self, services: &[TestService]) {
        let mut desired = DesiredState::default();
        for (port, proto, backends) in services {
            let backends = backends.iter().map(|(a, p)| ((*a).into(), *p));
            desired.insert(cluster_ip_entry(
                format!("svc-{port}"),
                (SVC.into(), *port, *proto),
                backends,
                SVC_FLAG_CLUSTER_IP,
            ));
        }
        self.apply(&desired);
    }

    /// Programs ClusterIP frontends `addrs` (all of one port and protocol)
    /// over the same backends, replacing what was programmed before.
    pub fn program_frontends(
        &mut self,
        addrs: impl Iterator<Item = Ipv4Addr>,
        (port, proto): (u16, Protocol),
        backends: &[(Ipv4Addr, u16)],
    ) {
        let mut desired = DesiredState::default();
        for (i, addr) in addrs.enumerate() {
            let backends = backends.iter().map(|(a, p)| ((*a).into(), *p));
            desired.insert(cluster_ip_entry(
                format!("svc-{i}"),
                (addr.into(), port, proto),
                backends,
                SVC_FLAG_CLUSTER_IP,
            ));
        }
        self.apply(&desired);
    }

    /// Takes the maps from what they hold to `desired`, through the
    /// agent's planner and writer, as a sync does.
    fn apply(&mut self, desired: &DesiredState) {
        let p = plan_within(&self.current, desired, &self.limits);
        assert!(p.unplanned.is_empty(), "{:?}", p.unplanned);
        let report = apply_plan(&mut self.maps, &p, &mut self.current);
        assert!(
            report.failed.is_empty(),
            "{} map writes failed, the first: {:?}",
            report.failed.len(),
            report.failed.first()
        );
        self.desired = desired.clone();
    }

    /// Programs what translation makes of Kubernetes objects for `node`.
    pub fn program_objects(&mut self, node: &NodeInfo, services: &[Value], slices: &[Value]) {
        let services: Vec<ServiceInfo> = services
            .iter()
            .map(|v| {
                serde_json::from_value::<Service>(v.clone())
                    .expect("Service")
                    .into()
            })
            .collect();
        let slices: Vec<SliceInfo> = slices
            .iter()
            .map(|v| {
                serde_json::from_value::<EndpointSlice>(v.clone())
                    .expect("EndpointSlice")
                    .into()
            })
            .collect();
        let t = translate_on(node, &services, &slices);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        self.apply(&t.state);
    }

    /// Writes the Maglev tables of the programmed Maglev frontends, as
    /// the agent does after a sync (seed `seed`).
    pub fn write_maglev_tables(&mut self, seed: &str) {
        let mut tables = MaglevTables::new(maglev::DEFAULT_TABLE_SIZE, seed_of(seed), Vec::new())
            .expect("the default size is a prime");
        let report = tables.sync(&mut self.maps, &self.current, &self.desired, None);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    /// Two nodes' data paths: a harness per slice, each programmed with
    /// `service` and its slice for `node`, Maglev tables written under
    /// one seed (as a cluster's agents would).
    pub fn two_nodes(node: &NodeInfo, service: &Value, slices: [Value; 2]) -> [Harness; 2] {
        slices.map(|slice| {
            let mut h = Harness::new();
            h.program_objects(node, std::slice::from_ref(service), &[slice]);
            h.write_maglev_tables("cluster seed");
            h
        })
    }

    pub fn run_xdp(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.run(Program::Xdp, input)
    }

    pub fn run_tc(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.run(Program::TcPod, input)
    }

    /// Runs `input` through `program`: (verdict, packet out).
    pub fn run(&self, program: Program, input: &[u8]) -> (u32, Vec<u8>) {
        match program {
            Program::Xdp => self.run_xdp_program(input),
            _ => self
                .try_run(program, input)
                .unwrap_or_else(|e| panic!("{program:?} test run: {e}")),
        }
    }

    fn run_xdp_program(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let xdp: &Xdp = self
            .ebpf
            .program(program_names::XDP_FROM_WIRE)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; input.len() + 256];
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("XDP test run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// The kernel refuses some skb input outright (EINVAL); fuzzing must
    /// tell that apart from a verdict.
    pub fn try_run_tc(&self, input: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        self.try_run(Program::TcPod, input)
    }

    /// Runs `input` through a tc program.
    pub(crate) fn try_run(
        &self,
        program: Program,
        input: &[u8],
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let tc: &SchedClassifier = self
            .ebpf
            .program(program.name())
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; input.len() + 256];
        let r = tc.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Vec<(Ct4Key, Ct4Value)> {
        let map = self
            .ebpf
            .map(lb_common::map_names::CONNTRACK)
            .expect("conntrack map");
        let map: aya::maps::HashMap<_, Ct4Key, Ct4Value> =
            aya::maps::HashMap::try_from(map).expect("conntrack is a hash");
        map.iter().map(|r| r.expect("conntrack entry")).collect()
    }

    /// Replaces a conntrack entry (to age it, say).
    pub fn set_conntrack(&mut self, key: Ct4Key, value: Ct4Value) {
        let map = self
            .ebpf
            .map_mut(lb_common::map_names::CONNTRACK)
            .expect("conntrack map");
        let mut map: aya::maps::HashMap<_, Ct4Key, Ct4Value> =
            aya::maps::HashMap::try_from(map).expect("conntrack is a hash");
        map.insert(key, value, 0).expect("conntrack write");
    }

    /// Programs IPv6 frontends through the agent's planner and writer
    /// (as `program` does for IPv4), replacing what was programmed before.
    pub fn program6(&mut self, frontends: &[Frontend6]) {
        let mut desired = DesiredState::default();
        for (i, f) in frontends.iter().enumerate() {
            let backends = f.backends.iter().map(|(a, p)| ((*a).into(), *p));
            desired.insert(cluster_ip_entry(
                format!("svc6-{i}"),
                (f.addr.into(), f.port, f.proto),
                backends,
                f.flags,
            ));
        }
        self.apply(&desired);
    }

    /// Every IPv6 conntrack entry.
    pub fn conntrack6(&self) -> Vec<(Ct6Key, Ct6Value)> {
        let map = self.ebpf.map(map_names::CONNTRACK6).expect("conntrack6");
        let map: aya::maps::HashMap<_, Ct6Key, Ct6Value> =
            aya::maps::HashMap::try_from(map).expect("conntrack6 is a hash");
        map.iter().map(|r| r.expect("conntrack6 entry")).collect()
    }

    /// An IPv6 data path counter (`lb_common::stats`, kept apart from
    /// IPv4's), summed over CPUs.
    pub fn stat6(&self, counter: u32) -> u64 {
        self.stat(lb_common::stats::IPV6_OFFSET + counter)
    }

    /// A data path counter (`lb_common::stats`; IPv4's), summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        let map = self
            .ebpf
            .map(lb_common::map_names::STATS)
            .expect("stats map");
        let stats: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(map).expect("stats is a per-CPU array");
        stats.get(&index, 0).expect("counter").iter().sum()
    }
}

/// A Service entry of `default/<name>` for frontend (address, port,
/// protocol) over `backends` (address, port), all active.
fn cluster_ip_entry(
    name: String,
    (addr, port, proto): (IpAddr, u16, Protocol),
    backends: impl Iterator<Item = (IpAddr, u16)>,
    flags: u16,
) -> ServiceEntry {
    let l4 = |addr, port| L4Addr { addr, port, proto };
    let mut active: Vec<L4Addr> = backends.map(|(a, p)| l4(a, p)).collect();
    active.sort();
    ServiceEntry {
        service: ServiceName {
            namespace: "default".into(),
            name: name.into(),
        },
        port_name: String::new(),
        frontend: l4(addr, port),
        backends: BackendSet {
            active,
            terminating: Vec::new(),
        },
        internal: None,
        flags,
        affinity_timeout: 0,
        source_ranges: Vec::new(),
        maglev_weights: None,
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
