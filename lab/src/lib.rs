//! The lab: Kubernetes nodes built from network namespaces, for tests and
//! the demo. Everything it creates (namespaces, veths, processes, pinned
//! maps, files) is removed by guards when it is dropped, also on panic.
//!
//! One node (`Lab`):
//!
//! ```text
//!  ext client ns ── eth0 (10.77.0.2) ══ eth0 (10.77.0.1) ── node ns
//!   (wire: software or NIC-like)        tc or XDP here    │ routes 10.244.0.x/32
//!                                                          ├─ lxcN ══ eth0 pod ns (server)
//!                                        tc ingress here ──┤   (tx offload off: the node
//!                                                          │    finalizes checksums)
//!                                                          └─ lxcM ══ eth0 client pod ns
//! ```
//!
//! Every namespace is dual-stack; the IPv6 plan (ULA, fd00::/8) mirrors
//! the IPv4 one, DAD off so addresses work at once:
//!
//! | what                  | IPv4            | IPv6                   |
//! |-----------------------|-----------------|------------------------|
//! | node wire (eth0)      | 10.77.0.1/24    | fd00:77::1/64          |
//! | external client       | 10.77.0.2/24    | fd00:77::2/64          |
//! | pod (10.244.k.n)      | /32             | fd00:10:244:k::n/128   |
//! | pod's gateway         | 169.254.1.1     | fe80::1 (link-local)   |
//! | Service range         | 10.96.0.0/12    | fd00:96::/64           |
//! | cluster wire, node k  | 10.78.0.k/24    | fd00:78::k/64          |
//!
//! Several nodes (`Cluster`, see `cluster`): the nodes' and the external
//! client's eth0 on one bridge, routes between the nodes' pod ranges.
//!
//! Beside the lab, what tests and the lab binaries drive it with: the
//! packet builders and harness for BPF_PROG_TEST_RUN (`packet`,
//! `packet_harness`), the privilege gate (`privilege`, and the macros that
//! declare lab tests), load generators (`load`, `rate_load`), the agent in a
//! container or a memory cgroup (`container`, `capabilities`, `memcg`), the
//! lab with the API server fixture (`kube_lab`), and raw bpf(2) probes
//! (`bpf_access`). The binaries: `lab-server` (the pods), `lab-client`
//! (client pods and benches), `access-probe` (security tests) and `lb-lab`
//! (the demo).

pub(crate) mod api_source;
pub mod bpf_access;
pub mod capabilities;
pub mod client;
pub mod cluster;
pub mod container;
pub mod kube_lab;
pub mod load;
mod macros;
pub mod memcg;
pub mod netns;
pub mod node;
pub mod packet;
pub mod packet6;
pub mod packet_harness;
pub mod privilege;
pub mod rate_load;
pub mod state;
pub mod wire;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::{Deref, DerefMut},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Result;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

pub use api_source::Source;
pub use client::{ask_on, http_get, metric_sum, ping6, tcp_ask, udp_ask};
pub use netns::{in_netns, run, sibling_binary, ChildGuard, Netns};
pub(crate) use netns::{sweep_stale, LAB_CGROUP_ROOT};
use node::NodeSpec;
pub use node::{LabNode, Pod};
pub use state::Workloads;
pub use wire::Wire;

/// The one way to declare a test that needs root (see `privilege`).
pub use lb_lab_macros::privileged_test;

use lb_kube_fixtures::workload::{self, LabObject, LabPod};

pub const NODE_WIRE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const EXT_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const CLIENT_POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The node's IPv6 wire address (beside `NODE_WIRE_ADDR`).
pub const NODE_WIRE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
/// The external client's IPv6 address (beside `EXT_CLIENT_ADDR`).
pub const EXT_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
/// Where the lab's IPv6 Service addresses are (the example's, and those
/// the API fixture allocates for dual-stack Services).
pub const SERVICE_CIDR6: &str = "fd00:96::/64";
/// Every pod's IPv6 address (`pod_ip6` of 10.244.0.0/16).
pub const POD_CIDR6: &str = "fd00:10:244::/48";
pub use lb_kube_fixtures::workload::pod_ip6;
pub const NODE_NAME: &str = "lab-node";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new lab id: `lbt-<pid>-<n>`, which the sweep of leftovers reads.
pub(crate) fn new_lab_id() -> String {
    let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{}{}-{n}", netns::NETNS_PREFIX, std::process::id())
}

/// One node, its external client and the desired state its agent reads.
/// Derefs to the node (`lab.pods`, `lab.agent().start()`), which derefs to
/// its namespace.
pub struct Lab {
    pub wire: Wire,
    pub source: Source,
    pub state: Workloads,
    /// The API server fixture the agent watches (Source::Api).
    pub api: Option<api_source::ApiSource>,
    /// Keeps the external client's pass-through XDP program attached;
    /// released inside that namespace (see Drop).
    ext_xdp: Option<aya::Ebpf>,
    pub ext: Netns,
    pub node: LabNode,
}

impl Deref for Lab {
    type Target = LabNode;

    fn deref(&self) -> &LabNode {
        &self.node
    }
}

impl DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut LabNode {
        &mut self.node
    }
}

impl Lab {
    /// Builds the lab on a software wire (see `from_manifest_files_on`).
    pub fn from_manifest_files(manifests: &[PathBuf]) -> Result<Self> {
        Self::from_manifest_files_on(Wire::Software, manifests)
    }

    /// Builds the node, the client pod, the external client on `wire` and
    /// one pod per replica of the Deployments/ReplicaSets in `manifests`.
    pub fn from_manifest_files_on(wire: Wire, manifests: &[PathBuf]) -> Result<Self> {
        Self::from_objects_on(wire, state::objects_of_files(manifests)?)
    }

    pub fn from_objects(objects: Vec<LabObject>) -> Result<Self> {
        Self::from_objects_on(Wire::Software, objects)
    }

    pub fn from_objects_on(wire: Wire, objects: Vec<LabObject>) -> Result<Self> {
        Self::from_objects_with(Source::Manifests, wire, objects)
    }

    /// The lab of `manifests` on `wire`, its agent reading `source`.
    pub fn from_manifest_files_with(
        source: Source,
        wire: Wire,
        manifests: &[PathBuf],
    ) -> Result<Self> {
        Self::from_objects_with(source, wire, state::objects_of_files(manifests)?)
    }

    pub fn from_objects_with(source: Source, wire: Wire, objects: Vec<LabObject>) -> Result<Self> {
        sweep_stale();
        let id = new_lab_id();
        let mut node = LabNode::create(&NodeSpec {
            id: id.clone(),
            name: NODE_NAME.into(),
            client_ip: CLIENT_POD_ADDR,
        })?;
        node.agent_defaults = wire.agent_flags();
        let ext = Netns::create(&format!("{id}-ext"))?;
        wire::veth(&node.name, "eth0", &ext.name, "eth0")?;
        wire::address(&node.name, "eth0", &format!("{NODE_WIRE_ADDR}/24"))?;
        wire::address(&ext.name, "eth0", &format!("{EXT_CLIENT_ADDR}/24"))?;
        wire::address(&node.name, "eth0", &format!("{NODE_WIRE_ADDR6}/64"))?;
        wire::address(&ext.name, "eth0", &format!("{EXT_CLIENT_ADDR6}/64"))?;
        wire.configure(&node.name, "eth0")?;
        wire.configure(&ext.name, "eth0")?;
        let ext_xdp = if wire.peers_need_xdp() {
            Some(ext.run_in(wire::attach_xdp_pass)?)
        } else {
            None
        };
        for cidr in ["10.96.0.0/12", "10.244.0.0/16"] {
            wire::route(&ext.name, cidr, &NODE_WIRE_ADDR.to_string())?;
        }
        for cidr in [SERVICE_CIDR6, POD_CIDR6] {
            wire::route(&ext.name, cidr, &NODE_WIRE_ADDR6.to_string())?;
        }
        let mut ips = (10u8..=250).map(|i| Ipv4Addr::new(10, 244, 0, i));
        let pod_specs = workload::pods_for_workloads(&objects, &mut ips, NODE_NAME)?;
        let api = match source {
            Source::Api => Some(api_source::ApiSource::start(&node, NODE_NAME)?),
            Source::Manifests => None,
        };
        if let Some(api) = &api {
            node.source_flags = Some(api.agent_flags());
        }
        let mut lab = Self {
            wire,
            source,
            state: Workloads::new(objects),
            api,
            ext_xdp,
            ext,
            node,
        };
        for spec in &pod_specs {
            lab.node.start_pod(spec)?;
        }
        lab.state.pod_specs = pod_specs;
        lab.write_manifests()?;
        Ok(lab)
    }

    /// Adds Service `name` and its EndpointSlice to the extra manifests
    /// (written by the next `write_manifests`); see `Workloads`.
    pub fn put_extra_service(
        &mut self,
        name: &str,
        spec: serde_json::Value,
        status: serde_json::Value,
        endpoints: Vec<serde_json::Value>,
    ) {
        self.state.put_extra_service(name, spec, status, endpoints);
    }

    /// Adds dual-stack Service `name` and one EndpointSlice per family
    /// (`("IPv6", endpoints)`, ...) to the extra manifests (written by the
    /// next `write_manifests`); see `Workloads::put_dual_stack_service`.
    pub fn put_dual_stack_service(
        &mut self,
        name: &str,
        spec: serde_json::Value,
        status: serde_json::Value,
        slices: &[(&str, Vec<serde_json::Value>)],
    ) {
        self.state
            .put_dual_stack_service(name, spec, status, slices);
    }

    /// Creates a pod (a new replica) and starts its server.
    pub fn add_pod(&mut self, spec: LabPod) -> Result<()> {
        self.node.start_pod(&spec)?;
        self.state.pod_specs.push(spec);
        Ok(())
    }

    /// Sets a pod's readiness (what its readiness probe reports).
    pub fn set_pod_ready(&mut self, name: &str, ready: bool) {
        self.state.set_pod_ready(name, ready);
    }

    /// Starts a pod's termination as the kubelet does: SIGTERM to its
    /// server, which goes on serving until it is killed; its endpoint
    /// becomes terminating (not ready, still serving).
    pub fn terminate_pod(&mut self, name: &str) {
        if let Some(spec) = self.state.pod_specs.iter_mut().find(|p| p.name == name) {
            spec.terminating = true;
        }
        self.node.signal_terminate(name);
    }

    /// Removes a pod: its server is killed (the end of its grace period)
    /// and its namespace and veth go.
    pub fn remove_pod(&mut self, name: &str) {
        self.node.pods.remove(name);
        self.state.pod_specs.retain(|p| p.name != name);
    }

    /// Publishes the Services and the EndpointSlices the control plane
    /// would derive from the pods: as manifest files, or to the API server
    /// fixture. Returns how many files (objects) changed.
    pub fn write_manifests(&mut self) -> Result<usize> {
        let files = self
            .state
            .manifest_files(|name| self.node.pods.contains_key(name))?;
        match &mut self.api {
            Some(api) => api.publish(&files),
            None => state::write_files(&self.node.manifest_dir(), &self.node.dir, &files),
        }
    }

    /// The Services of the lab's objects.
    pub fn services(&self) -> Vec<Service> {
        self.state.services()
    }

    /// The EndpointSlices of the running, not excluded pods.
    pub fn endpoint_slices(&self) -> Vec<EndpointSlice> {
        self.state
            .endpoint_slices(|name| self.node.pods.contains_key(name))
    }

    /// Rewrites the manifests and waits until the agent has applied them.
    pub fn apply_manifests(&mut self) -> Result<()> {
        let before = self.node.generation();
        let changed = self.write_manifests()?;
        if changed == 0 {
            return Ok(());
        }
        self.node.wait_for_generation(before + 1)?;
        if changed > 1 {
            // The agent may have read the files in two polls: give it two
            // more poll intervals (100 ms each) to pick up the rest.
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// The ClusterIP of the Service `name` in the lab's objects.
    pub fn cluster_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.state.cluster_ip(name)
    }

    /// The cluster IPs (both families of a dual-stack one) of the
    /// Service `name`, in the order of its `clusterIPs`.
    pub fn cluster_ips(&self, name: &str) -> Vec<std::net::IpAddr> {
        self.state.cluster_ips(name)
    }

    /// Pod names of the Deployment/ReplicaSet owner (`Kind/name`).
    pub fn pods_of(&self, owner: &str) -> Vec<String> {
        self.state.pods_of(owner)
    }

    /// Checksum error counters of every namespace of the lab.
    pub fn checksum_errors(&self) -> Vec<(String, u64, u64, u64)> {
        let mut all = self.node.namespaces();
        all.push(&self.ext);
        checksum_errors_of(&all)
    }

    /// Panics with context if any namespace counted a checksum error.
    pub fn assert_no_checksum_errors(&self) {
        assert_no_checksum_errors_in(&self.checksum_errors());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.node.stop_agent();
        // Detach where it was attached: an interface index means nothing
        // in the host's own namespace.
        if let Some(xdp) = self.ext_xdp.take() {
            self.ext.run_in(move || drop(xdp));
        }
        // The node (agent, pins, pods) and the namespaces go with their fields.
    }
}

/// (namespace, TcpInCsumErrors, UdpInCsumErrors, IcmpInCsumErrors) of each;
/// the UDP and ICMP counts include their IPv6 twins (Udp6InCsumErrors,
/// Icmp6InCsumErrors; TCP has one counter for both families).
pub(crate) fn checksum_errors_of(namespaces: &[&Netns]) -> Vec<(String, u64, u64, u64)> {
    namespaces
        .iter()
        .map(|ns| {
            let (tcp, udp, icmp) = ns.checksum_errors();
            (ns.name.clone(), tcp, udp, icmp)
        })
        .collect()
}

/// Panics with the counters of every namespace that counted an error.
pub(crate) fn assert_no_checksum_errors_in(counters: &[(String, u64, u64, u64)]) {
    let bad: Vec<_> = counters
        .iter()
        .filter(|(_, t, u, i)| *t + *u + *i > 0)
        .collect();
    assert!(
        bad.is_empty(),
        "checksum errors (namespace, TcpInCsumErrors, Udp(6)InCsumErrors, Icmp(6)InCsumErrors): {bad:?}"
    );
}

/// Prints the checksum counters of every namespace (the closing notes
/// report them), then requires zero.
pub fn report_checksum_counters(what: &str, counters: &[(String, u64, u64, u64)]) {
    let (tcp, udp, icmp) = counters
        .iter()
        .fold((0, 0, 0), |(t, u, i), (_, a, b, c)| (t + a, u + b, i + c));
    println!(
        "CHECKSUMS {what}: {} namespaces, TcpInCsumErrors {tcp}, UdpInCsumErrors {udp}, IcmpInCsumErrors {icmp}",
        counters.len()
    );
    assert_no_checksum_errors_in(counters);
}
