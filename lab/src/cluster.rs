//! Several nodes of the lab, each with its own agent, pins, cgroup,
//! manifest folder and pods, on one wire:
//!
//! ```text
//!                 switch ns: bridge br0
//!        n1 ─────────┬──── n2 ─────────┬──── ext
//!   eth0 10.78.0.1   │  eth0 10.78.0.2 │  eth0 10.78.0.100 (external client)
//!   node-1 ns        │  node-2 ns      │
//!   pods 10.244.1.x  │  pods 10.244.2.x
//! ```
//!
//! Each node routes the other nodes' pod ranges via their wire address,
//! as a routed pod network (Calico without overlay) does. Pods of the
//! desired state are placed on the nodes in turn. IPv6 beside it (see the
//! plan in lib.rs): wire fd00:78::k/64 and ext fd00:78::100, pods
//! fd00:10:244:k::/64, routed between nodes the same way.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    netns::Netns,
    new_lab_id,
    node::{LabNode, NodeSpec, Pod},
    state::{self, Workloads},
    sweep_stale,
    wire::{self, Wire},
};
use lb_kube_fixtures::workload::{self, LabObject};

pub const CLUSTER_EXT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 100);
/// The external client's IPv6 address on the cluster's wire.
pub const CLUSTER_EXT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x78, 0, 0, 0, 0, 0, 0x100);

/// The wire address of node `k` (1-based).
pub fn node_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 0, k as u8)
}

/// The IPv6 wire address of node `k` (1-based): fd00:78::k.
pub fn node_addr6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x78, 0, 0, 0, 0, 0, k as u16)
}

/// The Kubernetes name of node `k` (1-based).
pub fn node_name(k: usize) -> String {
    format!("node-{k}")
}

/// The pod range of node `k` (1-based): 10.244.k.0/24.
pub(crate) fn pod_cidr(k: usize) -> String {
    format!("10.244.{k}.0/24")
}

/// The IPv6 pod range of node `k` (1-based): fd00:10:244:k::/64.
pub(crate) fn pod_cidr6(k: usize) -> String {
    format!("fd00:10:244:{k}::/64")
}

pub struct Cluster {
    pub wire: Wire,
    pub state: Workloads,
    /// Which node (0-based index into `nodes`) each pod runs on.
    pub placement: BTreeMap<String, usize>,
    /// Pass-through XDP programs on the switch's ports and the external
    /// client, released in their namespaces (see Drop).
    xdp: Vec<(PathBuf, aya::Ebpf)>,
    pub ext: Netns,
    pub nodes: Vec<LabNode>,
    pub switch: Netns,
}

impl Cluster {
    pub fn from_manifest_files(wire: Wire, nodes: usize, files: &[PathBuf]) -> Result<Self> {
        Self::new(wire, nodes, state::objects_of_files(files)?)
    }

    /// `count` nodes on `wire`, the pods of `objects` spread over them, the
    /// manifests written; no agent runs yet.
    pub fn new(wire: Wire, count: usize, objects: Vec<LabObject>) -> Result<Self> {
        if !(1..=9).contains(&count) {
            bail!("a cluster of 1 to 9 nodes, not {count}");
        }
        sweep_stale();
        let id = new_lab_id();
        let switch = Netns::create(&format!("{id}-sw"))?;
        // No multicast snooping: without an MLD querier on the wire it
        // could come to drop the solicitations of IPv6 neighbour discovery.
        switch.exec(&[
            "ip",
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        switch.exec(&["ip", "link", "set", "br0", "up"])?;
        let ext = Netns::create(&format!("{id}-ext"))?;
        let mut cluster = Self {
            wire,
            state: Workloads::new(objects),
            placement: BTreeMap::new(),
            xdp: Vec::new(),
            ext,
            nodes: Vec::new(),
            switch,
        };
        cluster.plug(&cluster.ext.name.clone(), "ext", CLUSTER_EXT_ADDR)?;
        wire::address(
            &cluster.ext.name,
            "eth0",
            &format!("{CLUSTER_EXT_ADDR6}/64"),
        )?;
        wire::route(&cluster.ext.name, "10.96.0.0/12", &node_addr(1).to_string())?;
        let via6 = node_addr6(1).to_string();
        wire::route(&cluster.ext.name, crate::SERVICE_CIDR6, &via6)?;
        for k in 1..=count {
            cluster.add_node(&id, k)?;
        }
        for k in 1..=count {
            for j in (1..=count).filter(|j| *j != k) {
                let ns = &cluster.nodes[k - 1].name;
                wire::route(ns, &pod_cidr(j), &node_addr(j).to_string())?;
                wire::route(ns, &pod_cidr6(j), &node_addr6(j).to_string())?;
            }
        }
        cluster.place_pods()?;
        cluster.write_manifests()?;
        Ok(cluster)
    }

    /// Connects `eth0` of namespace `ns_name` to the switch through port
    /// `port`, with `addr`/24.
    fn plug(&mut self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        wire::veth(ns, "eth0", &self.switch.name, port)?;
        wire::address(ns, "eth0", &format!("{addr}/24"))?;
        self.wire.configure(ns, "eth0")?;
        self.switch
            .exec(&["ip", "link", "set", port, "master", "br0"])?;
        if self.wire.peers_need_xdp() {
            let path = self.switch.path();
            let prog = self
                .switch
                .run_in(|| wire::attach_xdp_pass_to(port))
                .with_context(|| format!("pass-through XDP on switch port {port}"))?;
            self.xdp.push((path, prog));
        }
        Ok(())
    }

    fn add_node(&mut self, id: &str, k: usize) -> Result<()> {
        let mut node = LabNode::create(&NodeSpec {
            id: format!("{id}-n{k}"),
            name: node_name(k),
            client_ip: Ipv4Addr::new(10, 244, k as u8, 2),
        })?;
        node.agent_defaults = self.wire.agent_flags();
        let ns_name = node.name.clone();
        self.nodes.push(node);
        self.plug(&ns_name, &format!("n{k}"), node_addr(k))?;
        wire::address(&ns_name, "eth0", &format!("{}/64", node_addr6(k)))
    }

    /// Pods of the workloads, in turn on each node, with addresses from
    /// that node's range; their servers started.
    fn place_pods(&mut self) -> Result<()> {
        let mut specs = workload::pods_for_workloads(
            &self.state.objects,
            &mut std::iter::repeat(Ipv4Addr::UNSPECIFIED),
            "",
        )?;
        let mut next_ip = vec![10u8; self.nodes.len()];
        for (i, spec) in specs.iter_mut().enumerate() {
            let n = i % self.nodes.len();
            spec.node_name = node_name(n + 1);
            spec.ip = Ipv4Addr::new(10, 244, n as u8 + 1, next_ip[n]);
            next_ip[n] += 1;
            self.nodes[n].start_pod(spec)?;
            self.placement.insert(spec.name.clone(), n);
        }
        self.state.pod_specs = specs;
        Ok(())
    }

    /// The pod `name`, wherever it runs.
    pub fn pod(&self, name: &str) -> &Pod {
        let n = self.placement[name];
        &self.nodes[n].pods[name]
    }

    /// The pods that run on node `n` (0-based).
    pub fn pods_on(&self, n: usize) -> Vec<String> {
        self.nodes[n].pods.keys().cloned().collect()
    }

    fn running(&self, name: &str) -> bool {
        self.placement
            .get(name)
            .is_some_and(|n| self.nodes[*n].pods.contains_key(name))
    }

    /// The same manifests for every node's agent. Returns the files changed
    /// in the first node's folder.
    pub fn write_manifests(&self) -> Result<usize> {
        let files = self.state.manifest_files(|name| self.running(name))?;
        let mut changed = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            let c = state::write_files(&node.manifest_dir(), &node.dir, &files)?;
            if i == 0 {
                changed = c;
            }
        }
        Ok(changed)
    }

    /// Starts every node's agent and waits for their first syncs.
    pub fn start_agents(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            // Its manifest folder and name: a cluster's nodes read files.
            node.agent().spawn()?;
        }
        for node in &mut self.nodes {
            node.wait_for_generation(1)?;
        }
        Ok(())
    }

    /// Rewrites the manifests and waits until every running agent applied them.
    pub fn apply_manifests(&mut self) -> Result<()> {
        let before: Vec<u64> = self
            .nodes
            .iter()
            .map(crate::node::LabNode::generation)
            .collect();
        if self.write_manifests()? == 0 {
            return Ok(());
        }
        for (node, before) in self.nodes.iter_mut().zip(before) {
            if node.agent_pid().is_some() {
                node.wait_for_generation(before + 1)?;
            }
        }
        // Files may have been read in two polls (100 ms each).
        std::thread::sleep(Duration::from_millis(250));
        Ok(())
    }

    /// Removes a pod (its server killed, its namespace gone).
    pub fn remove_pod(&mut self, name: &str) {
        if let Some(n) = self.placement.remove(name) {
            self.nodes[n].pods.remove(name);
        }
        self.state.pod_specs.retain(|p| p.name != name);
    }

    /// Checksum error counters of every namespace of the cluster.
    pub fn checksum_errors(&self) -> Vec<(String, u64, u64, u64)> {
        let mut all: Vec<&Netns> = self.nodes.iter().flat_map(|n| n.namespaces()).collect();
        all.push(&self.ext);
        crate::checksum_errors_of(&all)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop_agent();
        }
        for (path, prog) in self.xdp.drain(..) {
            crate::in_netns(&path, move || drop(prog));
        }
    }
}
