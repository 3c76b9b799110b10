//! The pure translation: Services + EndpointSlices (as `objects` reads
//! them) -> the frontends and backends the data path must serve. No I/O, so
//! it is unit tested with hand-built objects.
//!
//! Endpoints are chosen the way kube-proxy's CategorizeEndpoints chooses
//! them: ready ones, narrowed by topology hints (node hints when every
//! ready endpoint has one and one names this node, else zone hints the
//! same way) for the cluster-wide set; when none is ready, serving
//! terminating ones. Each address family is served on its own: a Service
//! has a side per family of its clusterIPs (as the API server allocated
//! them for its ipFamilyPolicy), whose frontends are that family's
//! clusterIP, externalIPs, LoadBalancer ingress and NodePort addresses,
//! with backends from the EndpointSlices of that family only. An address
//! of a family the Service has no clusterIP of is passed over (noted in
//! `Translation::notes`), never a reason to drop the other side.

pub(crate) mod health;
mod invalid;
pub mod maglev;

pub use invalid::Invalid;
pub(crate) use invalid::{ObjectKind, TranslateError};

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    MAX_BACKENDS_PER_SERVICE, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DSR, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_INTERNAL_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_MAGLEV,
    SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

pub use crate::source::objects::{HEADLESS_LABEL, SERVICE_NAME_LABEL};
use crate::{
    model::{
        BackendSet, Conflict, DesiredState, Family, IpPrefix, L4Addr, LbAlgorithm, LbMode,
        MaglevWeights, Protocol, ServiceEntry, ServiceName, Shadowed,
    },
    source::objects::{
        Addr, AddressType, Affinity, Hints, PortInfo, ServiceInfo, ServiceKind, SliceInfo,
    },
};

#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub errors: Vec<TranslateError>,
    /// What was passed over on purpose (addresses of a family the Service
    /// has no clusterIP of): for debug logs.
    pub notes: Vec<String>,
    /// Services none of whose ports could be translated because the Service
    /// itself is invalid: their previous entries should be kept.
    pub failed_services: BTreeSet<ServiceName>,
    /// healthCheckNodePorts this node serves.
    pub health_checks: Vec<health::HealthCheck>,
    /// Entries whose frontend a Service that sorts first holds.
    pub shadowed: Shadowed,
}

/// What translation needs to know about the node it programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Endpoints whose `nodeName` is this are local (traffic policy Local).
    pub name: String,
    /// Addresses NodePorts are served on (each to its family's side).
    pub nodeport_addresses: Vec<IpAddr>,
    /// `topology.kubernetes.io/zone` of the node, for topology hints.
    pub zone: Option<String>,
    /// IPv6 is off on this node (`--ipv6 off`, or auto on a node without
    /// IPv6): the IPv6 side of every Service is passed over (noted).
    pub ipv6_off: bool,
    /// For external frontends of Services without the annotation
    /// (`--lb-algorithm`).
    pub lb_algorithm: LbAlgorithm,
    /// For external frontends of Services without the annotation
    /// (`--lb-mode`).
    pub lb_mode: LbMode,
}

/// Translates every Service and its EndpointSlices for a node without
/// NodePort addresses, name or zone (tests and tools).
pub fn translate<S: Borrow<ServiceInfo>, E: Borrow<SliceInfo>>(
    services: &[S],
    slices: &[E],
) -> Translation {
    translate_on(&NodeInfo::default(), services, slices)
}

/// Translates every Service and its EndpointSlices for `node`.
/// Takes owned objects or references alike, so a caller with a store can
/// translate without copying it.
pub fn translate_on<S: Borrow<ServiceInfo>, E: Borrow<SliceInfo>>(
    node: &NodeInfo,
    services: &[S],
    slices: &[E],
) -> Translation {
    let mut slices_by_service: BTreeMap<&ServiceName, Vec<&SliceInfo>> = BTreeMap::new();
    for slice in slices {
        let slice: &SliceInfo = slice.borrow();
        if let Some(svc) = &slice.service {
            slices_by_service.entry(svc).or_default().push(slice);
        }
    }
    let mut out = Translation::default();
    for svc in services {
        let svc: &ServiceInfo = svc.borrow();
        let slices = slices_by_service
            .get(&svc.name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        out.health_checks
            .extend(health::health_check_of(node, svc, slices));
        let result = translate_service(node, svc, slices, &mut out.errors, &mut out.notes);
        claim_all(&mut out, svc, result);
    }
    out
}

/// Claims the frontends of one Service's entries, or records why the
/// whole Service failed.
fn claim_all(out: &mut Translation, svc: &ServiceInfo, result: Result<Vec<ServiceEntry>, Invalid>) {
    match result {
        Ok(entries) => {
            for entry in entries {
                if let Some(c) = out.state.claim(entry, &mut out.shadowed) {
                    out.errors.push(c.into());
                }
            }
        }
        Err(reason) => {
            out.errors.push(TranslateError {
                kind: ObjectKind::Service,
                object: format!("Service {}", svc.name),
                reason,
            });
            out.failed_services.insert(svc.name.clone());
        }
    }
}

impl From<Conflict> for TranslateError {
    fn from(c: Conflict) -> Self {
        TranslateError {
            kind: ObjectKind::Service,
            object: format!("Service {}", c.loser),
            reason: Invalid::FrontendTaken {
                frontend: c.frontend,
                winner: c.winner,
            },
        }
    }
}

/// Keeps the previous entries (held or waiting) of Services that failed
/// as a whole, so a bad edit does not take down what was already serving:
/// with `translate_on`, the whole-translation reference a full sync (which
/// re-translates in place) is checked against.
#[cfg(test)]
pub(crate) fn carry_over_failed(
    translation: &mut Translation,
    previous: &DesiredState,
    previous_shadowed: &Shadowed,
) {
    let kept = previous
        .entries()
        .values()
        .chain(previous_shadowed.entries())
        .filter(|e| translation.failed_services.contains(&e.service));
    for entry in kept {
        if let Some(c) = translation
            .state
            .claim(entry.clone(), &mut translation.shadowed)
        {
            translation.errors.push(c.into());
        }
    }
}

/// Session affinity timeout kube-proxy uses when the Service gives none.
pub(crate) const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// One endpoint of a Service port with what the traffic policies read.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: L4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    hints: Option<Arc<Hints>>,
}

impl Endpoint {
    fn zone_hints(&self) -> &[Arc<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    fn node_hints(&self) -> &[Arc<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }
}

/// The addresses of one family a Service is served on.
struct Frontends {
    family: Family,
    cluster_ip: IpAddr,
    external_ips: Vec<IpAddr>,
    ingress_ips: Vec<IpAddr>,
}

/// What is read once per Service and used for each of its ports.
struct ServiceRules {
    /// One side per family of the clusterIPs, the primary first.
    sides: Vec<Frontends>,
    affinity_timeout: u32,
    /// Of both families: each frontend takes its own family's.
    source_ranges: Vec<IpPrefix>,
    /// External frontends with externalTrafficPolicy Cluster pick by
    /// Maglev (with Local each node has its own backends: nothing to
    /// agree on).
    maglev: bool,
    /// How external frontends with externalTrafficPolicy Cluster reach
    /// other nodes' backends (with Local nothing is masqueraded anyway).
    lb_mode: LbMode,
    /// The Maglev frontends' endpoint weights, if the Service gives any.
    maglev_weights: Option<Arc<MaglevWeights>>,
}

/// Translates one Service with its slices: its entries, or why the whole
/// Service cannot be programmed. Per-port problems go to `errors`, what is
/// passed over on purpose to `notes`.
pub(crate) fn translate_service(
    node: &NodeInfo,
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    errors: &mut Vec<TranslateError>,
    notes: &mut Vec<String>,
) -> Result<Vec<ServiceEntry>, Invalid> {
    if svc.ignored.is_some() {
        return Ok(Vec::new());
    }
    if let ServiceKind::Unknown(t) = &svc.kind {
        return Err(Invalid::NotAServiceType(t.to_string()));
    }
    let mut sides = frontends(svc, notes)?;
    if node.ipv6_off && sides.iter().any(|s| s.family == Family::Ipv6) {
        sides.retain(|s| s.family != Family::Ipv6);
        notes.push(format!(
            "Service {}: IPv6 is off on this node (--ipv6); its IPv6 side is passed over",
            svc.name
        ));
    }
    let rules = ServiceRules {
        sides,
        affinity_timeout: affinity_timeout(&svc.affinity)?,
        source_ranges: source_ranges(svc)?,
        maglev: annotated(svc, svc.lb_algorithm.as_ref(), Invalid::LbAlgorithm, errors)
            .unwrap_or(node.lb_algorithm)
            == LbAlgorithm::Maglev
            && !svc.external_local,
        lb_mode: annotated(svc, svc.lb_mode.as_ref(), Invalid::LbMode, errors)
            .unwrap_or(node.lb_mode),
        maglev_weights: annotated(
            svc,
            svc.maglev_weights.as_ref(),
            Invalid::MaglevWeights,
            errors,
        ),
    };
    // In name order: when two slices disagree about one address, the
    // outcome must not depend on the order they arrived in.
    let mut slices = slices.to_vec();
    slices.sort_by(|a, b| a.name.cmp(&b.name));
    let mut entries = Vec::new();
    for port in &svc.ports {
        match port_entries(node, svc, &rules, port, &slices, errors) {
            Ok(mut e) => entries.append(&mut e),
            Err(reason) => errors.push(TranslateError {
                kind: ObjectKind::ServicePort,
                object: port_object(svc, port),
                reason,
            }),
        }
    }
    Ok(entries)
}

/// A Service annotation's value: what it gives, else None (an annotation
/// that gives nothing is reported as `invalid`, and the caller's default
/// applies).
fn annotated<T: Clone>(
    svc: &ServiceInfo,
    annotation: Option<&Result<T, Box<str>>>,
    invalid: fn(String) -> Invalid,
    errors: &mut Vec<TranslateError>,
) -> Option<T> {
    match annotation? {
        Ok(value) => Some(value.clone()),
        Err(text) => {
            errors.push(TranslateError {
                kind: ObjectKind::Service,
                object: format!("Service {}", svc.name),
                reason: invalid(text.to_string()),
            });
            None
        }
    }
}

fn port_object(svc: &ServiceInfo, port: &PortInfo) -> String {
    if port.name.is_empty() {
        format!("Service {} port {}", svc.name, port.port)
    } else {
        format!("Service {} port {}", svc.name, port.name)
    }
}

/// The addresses of each address list as IP addresses; an address that
/// is none is an error for the Service.
fn addresses(addrs: &[Addr], field: &'static str) -> Result<Vec<IpAddr>, Invalid> {
    addrs
        .iter()
        .map(|a| match a {
            Addr::V4(a) => Ok(IpAddr::V4(*a)),
            Addr::V6(a) => Ok(IpAddr::V6(*a)),
            Addr::Invalid(t) => Err(Invalid::NotAnAddress {
                field,
                value: t.to_string(),
            }),
        })
        .collect()
}

/// A side per family of the clusterIPs (the first clusterIP of each
/// family), with the externalIPs and ingress addresses of that family.
/// Addresses of a family without a clusterIP are noted and passed over.
fn frontends(svc: &ServiceInfo, notes: &mut Vec<String>) -> Result<Vec<Frontends>, Invalid> {
    if svc.cluster_ips.is_empty() {
        return Err(Invalid::NoClusterIp);
    }
    let cluster = addresses(&svc.cluster_ips, "clusterIP")?;
    let external = addresses(&svc.external_ips, "externalIPs entry")?;
    let ingress = if svc.kind == ServiceKind::LoadBalancer {
        addresses(&svc.ingress_ips, "status.loadBalancer.ingress ip")?
    } else {
        Vec::new()
    };
    let mut sides: Vec<Frontends> = Vec::new();
    for ip in cluster {
        let family = Family::of(ip);
        if sides.iter().any(|s| s.family == family) {
            continue;
        }
        let of_family = |list: &[IpAddr]| -> Vec<IpAddr> {
            list.iter()
                .copied()
                .filter(|a| Family::of(*a) == family)
                .collect()
        };
        sides.push(Frontends {
            family,
            cluster_ip: ip,
            external_ips: of_family(&external),
            ingress_ips: of_family(&ingress),
        });
    }
    if svc.require_dual_stack && sides.len() < 2 {
        notes.push(format!(
            "Service {}: ipFamilyPolicy RequireDualStack but clusterIPs has one family; serving it",
            svc.name
        ));
    }
    let served = |a: &IpAddr| sides.iter().any(|s| s.family == Family::of(*a));
    for a in external.iter().chain(&ingress).filter(|a| !served(a)) {
        notes.push(format!(
            "Service {}: {a} is {}, a family it has no clusterIP of; passed over",
            svc.name,
            Family::of(*a)
        ));
    }
    Ok(sides)
}

fn affinity_timeout(affinity: &Affinity) -> Result<u32, Invalid> {
    match affinity {
        Affinity::None => Ok(0),
        Affinity::ClientIp {
            timeout_seconds: None,
        } => Ok(DEFAULT_AFFINITY_TIMEOUT),
        Affinity::ClientIp {
            timeout_seconds: Some(t),
        } => u32::try_from(*t)
            .ok()
            .filter(|t| (1..=86_400).contains(t))
            .ok_or(Invalid::AffinityTimeout(*t)),
        Affinity::Unsupported(other) => Err(Invalid::UnsupportedAffinity(other.to_string())),
    }
}

/// The `loadBalancerSourceRanges` of both families; each frontend takes
/// those of its own family (a range cannot match the other family's
/// traffic: kube-proxy's per-family rules split them the same way).
fn source_ranges(svc: &ServiceInfo) -> Result<Vec<IpPrefix>, Invalid> {
    let mut out = Vec::new();
    for t in &svc.source_ranges {
        out.push(t.parse::<IpPrefix>()?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A port number of a Service (1..=65535).
fn port_number(n: i32, field: &'static str) -> Result<u16, Invalid> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(Invalid::PortNumber { field, value: n })
}

/// The entries of one Service port: for each family's side, its ClusterIP
/// frontend and its external ones (NodePorts, externalIPs, LoadBalancer
/// ingress).
fn port_entries(
    node: &NodeInfo,
    svc: &ServiceInfo,
    rules: &ServiceRules,
    port: &PortInfo,
    slices: &[&SliceInfo],
    errors: &mut Vec<TranslateError>,
) -> Result<Vec<ServiceEntry>, Invalid> {
    let proto = port.protocol.clone()?;
    let svc_port = port_number(port.port, "port")?;
    let node_port = match port.node_port {
        Some(p) if svc.kind != ServiceKind::ClusterIp => Some(port_number(p, "nodePort")?),
        _ => None,
    };
    let mut entries = Vec::new();
    for side in &rules.sides {
        let endpoints = port_endpoints(node, port, proto, side.family, slices, errors);
        if endpoints.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(Invalid::TooManyEndpoints(endpoints.len()));
        }
        let sets = BackendSets::new(&endpoints, node, svc.internal_local);
        let build = EntryBuilder {
            svc,
            rules,
            port_name: &port.name,
            sets: &sets,
        };
        entries.push(build.cluster_ip(L4Addr {
            addr: side.cluster_ip,
            port: svc_port,
            proto,
        }));
        let mut external = |addr: IpAddr, port: u16, kind: u16| {
            entries.push(build.external(L4Addr { addr, port, proto }, kind));
        };
        if let Some(np) = node_port {
            let node_addrs = node.nodeport_addresses.iter();
            for a in node_addrs.filter(|a| Family::of(**a) == side.family) {
                external(*a, np, SVC_FLAG_NODE_PORT);
            }
        }
        for a in &side.external_ips {
            external(*a, svc_port, SVC_FLAG_EXTERNAL_IP);
        }
        for a in &side.ingress_ips {
            external(*a, svc_port, SVC_FLAG_LOAD_BALANCER);
        }
    }
    Ok(entries)
}

/// The backend sets of one port: cluster-wide (with topology), this
/// node's, and the one pods use (internalTrafficPolicy).
struct BackendSets {
    cluster: BackendSet,
    local: BackendSet,
    internal: BackendSet,
}

impl BackendSets {
    fn new(endpoints: &[Endpoint], node: &NodeInfo, internal_local: bool) -> Self {
        let topology = topology_mode(endpoints, node);
        let cluster = backend_set(endpoints, |_| true, &topology);
        let local = backend_set(endpoints, |e| e.local, &TopologyMode::None);
        let internal = if internal_local {
            local.clone()
        } else {
            cluster.clone()
        };
        Self {
            cluster,
            local,
            internal,
        }
    }
}

/// Makes the entries of one port's frontends.
struct EntryBuilder<'a> {
    svc: &'a ServiceInfo,
    rules: &'a ServiceRules,
    port_name: &'a str,
    sets: &'a BackendSets,
}

impl EntryBuilder<'_> {
    fn entry(
        &self,
        frontend: L4Addr,
        flags: u16,
        backends: BackendSet,
        internal: Option<BackendSet>,
    ) -> ServiceEntry {
        let internal_flag = if self.svc.internal_local {
            SVC_FLAG_INTERNAL_LOCAL
        } else {
            0
        };
        ServiceEntry {
            service: self.svc.name.clone(),
            port_name: self.port_name.to_owned(),
            frontend,
            backends,
            internal,
            flags: flags | internal_flag,
            affinity_timeout: self.rules.affinity_timeout,
            source_ranges: if flags & SVC_FLAG_LOAD_BALANCER != 0 {
                self.source_ranges_of(frontend.family()).collect()
            } else {
                Vec::new()
            },
            maglev_weights: if flags & SVC_FLAG_MAGLEV != 0 {
                self.rules.maglev_weights.clone()
            } else {
                None
            },
        }
    }

    fn cluster_ip(&self, frontend: L4Addr) -> ServiceEntry {
        self.entry(
            frontend,
            SVC_FLAG_CLUSTER_IP,
            self.sets.internal.clone(),
            None,
        )
    }

    /// An external frontend: with externalTrafficPolicy Local, outside
    /// traffic goes to this node's endpoints unmasqueraded and this node's
    /// pods keep the internal set (as kube-proxy short-circuits them).
    fn external(&self, frontend: L4Addr, kind: u16) -> ServiceEntry {
        let (mut flags, backends, internal) = if self.svc.external_local {
            (
                kind | SVC_FLAG_EXTERNAL_LOCAL | SVC_FLAG_TWO_SCOPES,
                self.sets.local.clone(),
                Some(self.sets.internal.clone()),
            )
        } else {
            (kind, self.sets.cluster.clone(), None)
        };
        let ranged = self.source_ranges_of(frontend.family()).next().is_some();
        if kind == SVC_FLAG_LOAD_BALANCER && ranged {
            flags |= SVC_FLAG_SOURCE_RANGES;
        }
        if self.rules.maglev {
            flags |= SVC_FLAG_MAGLEV;
        }
        if self.rules.lb_mode.dsr_for(frontend.proto) && !self.svc.external_local {
            flags |= SVC_FLAG_DSR;
        }
        self.entry(frontend, flags, backends, internal)
    }

    /// The source ranges that apply to frontends of `family`.
    fn source_ranges_of(&self, family: Family) -> impl Iterator<Item = IpPrefix> + '_ {
        let ranges = self.rules.source_ranges.iter();
        ranges.copied().filter(move |r| r.family() == family)
    }
}

/// Which endpoints topology hints leave to this node (kube-proxy's
/// topologyModeFromHints).
#[derive(Debug, PartialEq, Eq)]
enum TopologyMode {
    /// No hints to use: every endpoint.
    None,
    /// Endpoints hinted for this node.
    SameNode(String),
    /// Endpoints hinted for this node's zone.
    SameZone(String),
}

/// Node hints when every ready endpoint has some and one names this node;
/// else zone hints the same way for the node's zone; else none.
fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo) -> TopologyMode {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    let usable = |hints: fn(&Endpoint) -> &[Arc<str>], want: &str| {
        ready.iter().all(|e| !hints(e).is_empty())
            && ready.iter().any(|e| hints(e).iter().any(|h| &**h == want))
    };
    if !node.name.is_empty() && usable(Endpoint::node_hints, &node.name) {
        return TopologyMode::SameNode(node.name.clone());
    }
    match node.zone.as_deref() {
        Some(zone) if usable(Endpoint::zone_hints, zone) => TopologyMode::SameZone(zone.to_owned()),
        _ => TopologyMode::None,
    }
}

fn available(e: &Endpoint, mode: &TopologyMode) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode(n) => e.node_hints().iter().any(|h| &**h == n),
        TopologyMode::SameZone(z) => e.zone_hints().iter().any(|h| &**h == z),
    }
}

/// The backends for new flows among `endpoints` that pass `scope`, the way
/// kube-proxy picks them: ready ones available to this node's topology;
/// when none is ready, serving terminating ones. Terminating endpoints not
/// chosen are kept for the flows they have.
fn backend_set(
    endpoints: &[Endpoint],
    scope: impl Fn(&Endpoint) -> bool,
    topology: &TopologyMode,
) -> BackendSet {
    let in_scope: Vec<&Endpoint> = endpoints.iter().filter(|e| scope(e)).collect();
    let mut active: Vec<&Endpoint> = in_scope
        .iter()
        .copied()
        .filter(|e| e.ready && available(e, topology))
        .collect();
    if active.is_empty() {
        active = in_scope
            .iter()
            .copied()
            .filter(|e| e.serving && e.terminating)
            .collect();
    }
    let active: Vec<L4Addr> = active.iter().map(|e| e.addr).collect();
    let terminating = in_scope
        .iter()
        .filter(|e| e.terminating && !active.contains(&e.addr))
        // A UDP flow has no end to wait for: it moves off an endpoint that
        // stopped serving; TCP connections run to their end.
        .filter(|e| e.serving || e.addr.proto == Protocol::Tcp)
        .map(|e| e.addr)
        .collect();
    BackendSet {
        active,
        terminating,
    }
}

/// The endpoints of one Service port over all its slices of `family`.
fn port_endpoints(
    node: &NodeInfo,
    port: &PortInfo,
    proto: Protocol,
    family: Family,
    slices: &[&SliceInfo],
    errors: &mut Vec<TranslateError>,
) -> Vec<Endpoint> {
    let mut endpoints = BTreeMap::new();
    let want = match family {
        Family::Ipv4 => AddressType::Ipv4,
        Family::Ipv6 => AddressType::Ipv6,
    };
    for slice in slices.iter().filter(|s| s.address_type == want) {
        collect_endpoints(slice, &port.name, proto, node, &mut endpoints, errors);
    }
    endpoints.into_values().collect()
}

/// Adds the endpoints of `slice` (of an address type the data path
/// serves) for the Service port named `port_name` (matched by name and
/// protocol, as kube-proxy does).
fn collect_endpoints(
    slice: &SliceInfo,
    port_name: &str,
    proto: Protocol,
    node: &NodeInfo,
    out: &mut BTreeMap<L4Addr, Endpoint>,
    errors: &mut Vec<TranslateError>,
) {
    let family = match slice.address_type {
        AddressType::Ipv4 => Family::Ipv4,
        AddressType::Ipv6 => Family::Ipv6,
        AddressType::Other(_) => return,
    };
    let Some(port) = slice
        .ports
        .iter()
        .find(|p| &*p.name == port_name && p.protocol.as_ref() == Ok(&proto))
    else {
        return;
    };
    let object = || format!("EndpointSlice {}", slice.display_name());
    let Some(port_number) = port
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
    else {
        errors.push(TranslateError {
            kind: ObjectKind::EndpointSlice,
            object: object(),
            reason: Invalid::EndpointPortNumber(port_name.to_string()),
        });
        return;
    };
    for endpoint in &slice.endpoints {
        let addr = match &endpoint.address {
            None => continue,
            Some(Addr::V4(a)) if family == Family::Ipv4 => IpAddr::V4(*a),
            Some(Addr::V6(a)) if family == Family::Ipv6 => IpAddr::V6(*a),
            Some(other) => {
                errors.push(TranslateError {
                    kind: ObjectKind::EndpointSlice,
                    object: object(),
                    reason: Invalid::EndpointWrongFamily(other.clone(), family),
                });
                continue;
            }
        };
        let e = Endpoint {
            addr: L4Addr {
                addr,
                port: port_number,
                proto,
            },
            ready: endpoint.ready,
            serving: endpoint.serving,
            terminating: endpoint.terminating,
            local: !node.name.is_empty() && endpoint.node.as_deref() == Some(node.name.as_str()),
            hints: endpoint.hints.clone(),
        };
        // The same address in two slices (a slice being replaced): the
        // readier copy wins.
        match out.get(&e.addr) {
            Some(old) if old.ready || !e.ready => {}
            _ => {
                out.insert(e.addr, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_SLICES: &[SliceInfo] = &[];
    use serde_json::json;

    use crate::test_objects::{l4_addr as addr, service, slice};

    fn ep(ip: &str, ready: Option<bool>) -> serde_json::Value {
        match ready {
            Some(r) => json!({"addresses": [ip], "conditions": {"ready": r}}),
            None => json!({"addresses": [ip]}),
        }
    }

    fn web_service() -> ServiceInfo {
        service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
            ]}
        }))
    }

    fn web_slice(name: &str, endpoints: Vec<serde_json::Value>) -> SliceInfo {
        slice(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints
        }))
    }

    #[test]
    fn several_named_ports_resolve_from_the_slice_ports() {
        let t = translate(
            &[web_service()],
            &[web_slice(
                "web-abc",
                vec![ep("10.244.0.5", Some(true)), ep("10.244.0.4", None)],
            )],
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let http = &t.state.entries()[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            http.backends.active,
            vec![
                addr("10.244.0.4", 8080, Protocol::Tcp),
                addr("10.244.0.5", 8080, Protocol::Tcp)
            ]
        );
        assert_eq!(http.port_name, "http");
        let dns = &t.state.entries()[&addr("10.96.0.10", 53, Protocol::Udp)];
        assert_eq!(
            dns.backends.active,
            vec![
                addr("10.244.0.4", 5353, Protocol::Udp),
                addr("10.244.0.5", 5353, Protocol::Udp)
            ]
        );
    }

    #[test]
    fn not_ready_endpoints_are_excluded() {
        let t = translate(
            &[web_service()],
            &[web_slice(
                "web-abc",
                vec![ep("10.244.0.5", Some(false)), ep("10.244.0.6", Some(true))],
            )],
        );
        let http = &t.state.entries()[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            http.backends.active,
            vec![addr("10.244.0.6", 8080, Protocol::Tcp)]
        );
    }

    #[test]
    fn endpoints_merge_across_slices_without_duplicates() {
        let t = translate(
            &[web_service()],
            &[
                web_slice("a", vec![ep("10.244.0.5", None)]),
                web_slice("b", vec![ep("10.244.0.6", None), ep("10.244.0.5", None)]),
            ],
        );
        let http = &t.state.entries()[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(http.backends.active.len(), 2);
    }

    #[test]
    fn service_without_endpoints_still_has_a_frontend() {
        let t = translate(&[web_service()], NO_SLICES);
        let http = &t.state.entries()[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert!(
            http.backends.active.is_empty(),
            "clients must be refused, so the frontend exists"
        );
    }

    #[test]
    fn selectorless_service_uses_a_manual_slice() {
        let svc = service(json!({
            "metadata": {"name": "db"},
            "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 5432}]}
        }));
        let manual = slice(json!({
            "metadata": {"name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"port": 5432}],
            "endpoints": [{"addresses": ["192.0.2.42"]}]
        }));
        let t = translate(&[svc], &[manual]);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let db = &t.state.entries()[&addr("10.96.5.5", 5432, Protocol::Tcp)];
        assert_eq!(
            db.backends.active,
            vec![addr("192.0.2.42", 5432, Protocol::Tcp)]
        );
        assert_eq!(&*db.service.namespace, "default");
    }

    #[test]
    fn headless_and_external_name_services_produce_no_entries() {
        let headless = service(
            json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        );
        let labelled = service(
            json!({"metadata": {"name": "l", "labels": {"service.kubernetes.io/headless": ""}}, "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}),
        );
        let external = service(
            json!({"metadata": {"name": "x"}, "spec": {"type": "ExternalName", "externalName": "example.org"}}),
        );
        let other_proxy = service(
            json!({"metadata": {"name": "o", "labels": {"service.kubernetes.io/service-proxy-name": "other"}}, "spec": {"clusterIP": "10.96.0.8", "ports": [{"port": 80}]}}),
        );
        let t = translate(&[headless, labelled, external, other_proxy], NO_SLICES);
        assert!(t.state.is_empty());
        assert!(t.errors.is_empty(), "{:?}", t.errors);
    }

    #[test]
    fn slices_of_other_namespaces_or_families_are_ignored() {
        let mut other_ns = web_slice("web-x", vec![ep("10.244.9.9", None)]);
        other_ns.namespace = "other".into();
        other_ns.service.as_mut().unwrap().namespace = "other".into();
        let mut v6 = web_slice("web-v6", vec![ep("fd00::1", None)]);
        v6.address_type = crate::source::objects::AddressType::Ipv6;
        let t = translate(&[web_service()], &[other_ns, v6]);
        assert!(t.state.entries()[&addr("10.96.0.10", 80, Protocol::Tcp)]
            .backends
            .active
            .is_empty());
    }

    #[test]
    fn unsupported_protocol_skips_only_that_port() {
        let svc = service(json!({
            "metadata": {"name": "mixed"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "a", "port": 80}, {"name": "s", "port": 9, "protocol": "SCTP"}]}
        }));
        let t = translate(&[svc], NO_SLICES);
        assert_eq!(t.state.len(), 1);
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.errors[0].object, "Service default/mixed port s");
        assert_eq!(
            t.errors[0].reason,
            Invalid::Protocol(crate::model::UnsupportedProtocol("SCTP".into()))
        );
    }

    #[test]
    fn invalid_service_is_reported_and_others_still_translate() {
        let bad = service(
            json!({"metadata": {"name": "bad"}, "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}}),
        );
        let v6 = service(
            json!({"metadata": {"name": "six"}, "spec": {"clusterIP": "fd00::10", "ports": [{"port": 80}]}}),
        );
        let t = translate(&[bad, web_service(), v6], NO_SLICES);
        // web's two ports and six's one (IPv6 is served too).
        assert_eq!(t.state.len(), 3);
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert!(t.errors.iter().any(|e| e.object == "Service default/bad"
            && matches!(
                e.reason,
                Invalid::NotAnAddress {
                    field: "clusterIP",
                    ..
                }
            )));
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        entry_for(&t, "fd00::10", 80);
    }

    #[test]
    fn a_service_that_turns_invalid_keeps_its_previous_entries() {
        let good = translate(
            &[web_service()],
            &[web_slice("w", vec![ep("10.244.0.5", None)])],
        );
        let mut broken = web_service();
        broken.cluster_ips = vec![crate::source::objects::Addr::parse("garbage")];
        let mut t = translate(&[broken], &[web_slice("w", vec![ep("10.244.0.5", None)])]);
        assert!(t.state.is_empty());
        carry_over_failed(&mut t, &good.state, &good.shadowed);
        assert_eq!(t.state, good.state);
    }

    #[test]
    fn duplicate_frontends_are_reported_not_merged() {
        let mut other = web_service();
        other.name.name = "web2".into();
        let t = translate(&[web_service(), other], NO_SLICES);
        assert_eq!(t.state.len(), 2);
        assert!(t
            .errors
            .iter()
            .any(|e| matches!(e.reason, Invalid::FrontendTaken { .. })));
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            nodeport_addresses: vec!["10.0.0.1".parse().unwrap(), "10.0.1.1".parse().unwrap()],
            zone: Some("z1".into()),
            ipv6_off: false,
            lb_algorithm: LbAlgorithm::Random,
            lb_mode: LbMode::Snat,
        }
    }

    fn ep_full(
        ip: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
        node: &str,
    ) -> serde_json::Value {
        json!({"addresses": [ip], "nodeName": node,
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn policy_service(extra: serde_json::Value) -> ServiceInfo {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "nodePort": 30080}
            ]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2", "ipMode": "Proxy"}]}}
        });
        for (k, val) in extra.as_object().unwrap() {
            v["spec"][k] = val.clone();
        }
        service(v)
    }

    fn entry_for<'a>(t: &'a Translation, a: &str, port: u16) -> &'a ServiceEntry {
        t.state
            .get(&addr(a, port, Protocol::Tcp))
            .unwrap_or_else(|| panic!("no frontend {a}:{port}: {:?}", t.state.entries().keys()))
    }

    /// `policy_service` with the lb-algorithm annotation set to `value`.
    fn annotated(value: &str, extra: serde_json::Value) -> ServiceInfo {
        let mut svc = policy_service(extra);
        svc.lb_algorithm = Some(LbAlgorithm::parse(value).ok_or_else(|| value.into()));
        svc
    }

    #[test]
    fn maglev_is_chosen_per_service_for_external_frontends_with_cluster_policy() {
        let sl = || web_slice("w", vec![ep_full("10.244.0.5", true, true, false, "n1")]);
        let maglev = |t: &Translation, a, port| entry_for(t, a, port).flags & SVC_FLAG_MAGLEV != 0;
        // By annotation, on a node that defaults to random.
        let t = translate_on(&node(), &[annotated("maglev", json!({}))], &[sl()]);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert!(maglev(&t, "10.0.0.1", 30080) && maglev(&t, "192.0.2.1", 80));
        assert!(!maglev(&t, "10.96.0.10", 80), "ClusterIPs stay random");
        // By the node's default, and the annotation turns it off.
        let node = NodeInfo {
            lb_algorithm: LbAlgorithm::Maglev,
            ..node()
        };
        let t = translate_on(&node, &[policy_service(json!({}))], &[sl()]);
        assert!(maglev(&t, "10.0.0.1", 30080));
        let t = translate_on(&node, &[annotated("random", json!({}))], &[sl()]);
        assert!(!maglev(&t, "10.0.0.1", 30080));
        // externalTrafficPolicy Local: each node has its own backends.
        let local = annotated("maglev", json!({"externalTrafficPolicy": "Local"}));
        let t = translate_on(&node, &[local], &[sl()]);
        assert!(!maglev(&t, "10.0.0.1", 30080));
    }

    #[test]
    fn dsr_is_chosen_per_service_and_protocol_for_external_frontends_with_cluster_policy() {
        let sl = || web_slice("w", vec![ep_full("10.244.0.5", true, true, false, "n1")]);
        let ports = json!({"ports": [
            {"name": "http", "port": 80, "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}
        ]});
        let dsr = |t: &Translation, a: &str, port, proto| {
            let entry = t.state.get(&addr(a, port, proto)).expect("frontend");
            entry.flags & SVC_FLAG_DSR != 0
        };
        let with_mode = |mode: &str, extra: serde_json::Value| {
            let mut svc = policy_service(extra);
            svc.lb_mode = Some(LbMode::parse(mode).ok_or_else(|| mode.into()));
            svc
        };
        let (tcp, udp) = (Protocol::Tcp, Protocol::Udp);
        // By annotation, on a node that defaults to SNAT.
        let t = translate_on(&node(), &[with_mode("dsr", ports.clone())], &[sl()]);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert!(dsr(&t, "10.0.0.1", 30080, tcp) && dsr(&t, "192.0.2.1", 80, tcp));
        assert!(dsr(&t, "10.0.0.1", 30053, udp));
        assert!(
            !dsr(&t, "10.96.0.10", 80, tcp),
            "ClusterIPs stay on the node"
        );
        // Hybrid: TCP only.
        let t = translate_on(&node(), &[with_mode("hybrid", ports.clone())], &[sl()]);
        assert!(dsr(&t, "10.0.0.1", 30080, tcp) && !dsr(&t, "10.0.0.1", 30053, udp));
        // The node's default, and an annotation that turns it off.
        let node = NodeInfo {
            lb_mode: LbMode::Dsr,
            ..node()
        };
        let t = translate_on(&node, &[policy_service(ports.clone())], &[sl()]);
        assert!(dsr(&t, "192.0.2.1", 53, udp));
        let t = translate_on(&node, &[with_mode("snat", ports.clone())], &[sl()]);
        assert!(!dsr(&t, "192.0.2.1", 80, tcp));
        // externalTrafficPolicy Local keeps the source without it.
        let mut local = ports.clone();
        local["externalTrafficPolicy"] = json!("Local");
        let t = translate_on(&node, &[policy_service(local)], &[sl()]);
        assert!(!dsr(&t, "10.0.0.1", 30080, tcp));
        // An unknown mode is reported and the node's applies.
        let t = translate_on(&node, &[with_mode("direct", ports)], &[sl()]);
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert!(t.errors[0].to_string().contains("direct"));
        assert!(dsr(&t, "10.0.0.1", 30080, tcp));
    }

    #[test]
    fn maglev_weights_reach_the_maglev_frontends_and_a_bad_list_is_reported() {
        let sl = || web_slice("w", vec![ep_full("10.244.0.5", true, true, false, "n1")]);
        let weighted = |text: &str| {
            let mut svc = annotated("maglev", json!({}));
            svc.maglev_weights = Some(
                MaglevWeights::parse(text)
                    .map(Arc::new)
                    .ok_or_else(|| text.into()),
            );
            svc
        };
        let t = translate_on(&node(), &[weighted("10.244.0.5=3")], &[sl()]);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let weights = entry_for(&t, "10.0.0.1", 30080).maglev_weights.clone();
        let five: IpAddr = "10.244.0.5".parse().unwrap();
        assert_eq!(weights.map(|w| w.of(&five)), Some(3));
        assert!(
            entry_for(&t, "10.96.0.10", 80).maglev_weights.is_none(),
            "a ClusterIP has no table"
        );
        let t = translate_on(&node(), &[weighted("10.244.0.5=heavy")], &[sl()]);
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert!(t.errors[0].to_string().contains("maglev-weights"));
        assert!(entry_for(&t, "10.0.0.1", 30080).maglev_weights.is_none());
    }

    #[test]
    fn an_unknown_lb_algorithm_is_reported_and_the_node_default_applies() {
        let sl = web_slice("w", vec![ep_full("10.244.0.5", true, true, false, "n1")]);
        let t = translate_on(&node(), &[annotated("round-robin", json!({}))], &[sl]);
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert!(
            t.errors[0].to_string().contains("round-robin"),
            "{}",
            t.errors[0]
        );
        assert_eq!(entry_for(&t, "10.0.0.1", 30080).flags, SVC_FLAG_NODE_PORT);
    }

    #[test]
    fn nodeports_lb_ingress_and_external_ips_become_frontends() {
        let svc = policy_service(json!({"externalIPs": ["198.51.100.7"]}));
        let sl = web_slice("w", vec![ep_full("10.244.0.5", true, true, false, "n1")]);
        let t = translate_on(&node(), &[svc], &[sl]);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(entry_for(&t, "10.96.0.10", 80).flags, SVC_FLAG_CLUSTER_IP);
        assert_eq!(entry_for(&t, "10.0.0.1", 30080).flags, SVC_FLAG_NODE_PORT);
        assert_eq!(entry_for(&t, "10.0.1.1", 30080).flags, SVC_FLAG_NODE_PORT);
        assert_eq!(entry_for(&t, "192.0.2.1", 80).flags, SVC_FLAG_LOAD_BALANCER);
        assert_eq!(
            entry_for(&t, "198.51.100.7", 80).flags,
            SVC_FLAG_EXTERNAL_IP
        );
        // ipMode Proxy: the load balancer proxies to the nodes.
        assert!(t.state.get(&addr("192.0.2.2", 80, Protocol::Tcp)).is_none());
        assert_eq!(t.state.len(), 5);
    }

    #[test]
    fn external_traffic_policy_local_uses_local_endpoints_outside_and_all_inside() {
        let svc = policy_service(json!({"externalTrafficPolicy": "Local"}));
        let sl = web_slice(
            "w",
            vec![
                ep_full("10.244.0.5", true, true, false, "n1"),
                ep_full("10.244.1.5", true, true, false, "n2"),
            ],
        );
        let t = translate_on(&node(), &[svc], &[sl]);
        let np = entry_for(&t, "10.0.0.1", 30080);
        assert_eq!(
            np.backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)]
        );
        assert_eq!(np.internal.as_ref().unwrap().active.len(), 2);
        assert_eq!(
            np.flags,
            SVC_FLAG_NODE_PORT | SVC_FLAG_EXTERNAL_LOCAL | SVC_FLAG_TWO_SCOPES
        );
        let cip = entry_for(&t, "10.96.0.10", 80);
        assert_eq!(cip.backends.active.len(), 2);
        assert!(cip.internal.is_none());
    }

    #[test]
    fn terminating_endpoints_are_kept_and_used_only_when_nothing_is_ready() {
        let svc = policy_service(json!({"type": "ClusterIP"}));
        let one_ready = web_slice(
            "w",
            vec![
                ep_full("10.244.0.5", true, true, false, "n1"),
                ep_full("10.244.0.6", false, true, true, "n1"),
                ep_full("10.244.0.7", false, false, false, "n1"),
            ],
        );
        let t = translate_on(&node(), std::slice::from_ref(&svc), &[one_ready]);
        let e = entry_for(&t, "10.96.0.10", 80);
        assert_eq!(
            e.backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)]
        );
        assert_eq!(
            e.backends.terminating,
            vec![addr("10.244.0.6", 8080, Protocol::Tcp)]
        );

        let none_ready = web_slice(
            "w",
            vec![
                ep_full("10.244.0.6", false, true, true, "n1"),
                ep_full("10.244.0.8", false, false, true, "n1"),
            ],
        );
        let t = translate_on(&node(), &[svc], &[none_ready]);
        let e = entry_for(&t, "10.96.0.10", 80);
        assert_eq!(
            e.backends.active,
            vec![addr("10.244.0.6", 8080, Protocol::Tcp)]
        );
        // Not serving, but TCP connections to it may still be open.
        assert_eq!(
            e.backends.terminating,
            vec![addr("10.244.0.8", 8080, Protocol::Tcp)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_and_publish_not_ready() {
        let svc = policy_service(
            json!({"type": "ClusterIP", "internalTrafficPolicy": "Local",
            "publishNotReadyAddresses": true}),
        );
        // The EndpointSlice controller marks every endpoint of such a
        // Service ready; kube-proxy reads the slice, not the Service.
        let sl = web_slice(
            "w",
            vec![
                ep_full("10.244.0.5", true, false, false, "n1"),
                ep_full("10.244.0.6", false, false, false, "n1"),
                ep_full("10.244.1.5", true, true, false, "n2"),
            ],
        );
        let t = translate_on(&node(), &[svc], &[sl]);
        let e = entry_for(&t, "10.96.0.10", 80);
        assert_eq!(
            e.backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)],
            "local only, and only what the slice calls ready"
        );
        assert_ne!(e.flags & SVC_FLAG_INTERNAL_LOCAL, 0);
    }

    #[test]
    fn topology_hints_apply_only_when_every_endpoint_has_one_for_some_zone() {
        // Like kube-proxy, the slice's hints decide, not the Service: this
        // one names no traffic distribution and no topology annotation.
        let svc = policy_service(json!({"type": "ClusterIP"}));
        let hinted = |ip: &str, zone: &str| json!({"addresses": [ip], "nodeName": "x", "hints": {"forZones": [{"name": zone}]}});
        let all_hinted = web_slice(
            "w",
            vec![hinted("10.244.0.5", "z1"), hinted("10.244.0.6", "z2")],
        );
        let t = translate_on(&node(), std::slice::from_ref(&svc), &[all_hinted]);
        assert_eq!(
            entry_for(&t, "10.96.0.10", 80).backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)]
        );
        let one_unhinted = web_slice(
            "w",
            vec![hinted("10.244.0.5", "z1"), ep("10.244.0.6", None)],
        );
        let t = translate_on(&node(), &[svc], &[one_unhinted]);
        assert_eq!(entry_for(&t, "10.96.0.10", 80).backends.active.len(), 2);
    }

    #[test]
    fn node_hints_come_before_zone_hints() {
        let svc = policy_service(json!({"type": "ClusterIP"}));
        let hinted = |ip: &str, node: &str, zone: &str| {
            json!({"addresses": [ip], "nodeName": node,
            "hints": {"forNodes": [{"name": node}], "forZones": [{"name": zone}]}})
        };
        let sl = web_slice(
            "w",
            vec![
                hinted("10.244.0.5", "n1", "z1"),
                hinted("10.244.0.6", "n9", "z1"),
                hinted("10.244.1.5", "n2", "z2"),
            ],
        );
        let t = translate_on(
            &node(),
            std::slice::from_ref(&svc),
            std::slice::from_ref(&sl),
        );
        assert_eq!(
            entry_for(&t, "10.96.0.10", 80).backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)],
            "PreferSameNode: this node's endpoint"
        );
        // On a node no endpoint is hinted for: the zone's.
        let other = NodeInfo {
            name: "n7".into(),
            ..node()
        };
        let t = translate_on(&other, &[svc], &[sl]);
        assert_eq!(
            entry_for(&t, "10.96.0.10", 80).backends.active,
            vec![
                addr("10.244.0.5", 8080, Protocol::Tcp),
                addr("10.244.0.6", 8080, Protocol::Tcp)
            ],
            "PreferSameZone: the zone's endpoints"
        );
    }

    #[test]
    fn topology_still_applies_to_external_ports_under_internal_policy_local() {
        let svc = policy_service(json!({"internalTrafficPolicy": "Local"}));
        let hinted = |ip: &str, node: &str, zone: &str| {
            json!({"addresses": [ip], "nodeName": node,
            "hints": {"forZones": [{"name": zone}]}})
        };
        let sl = web_slice(
            "w",
            vec![
                hinted("10.244.0.5", "n1", "z1"),
                hinted("10.244.1.5", "n2", "z2"),
            ],
        );
        let t = translate_on(&node(), &[svc], &[sl]);
        assert_eq!(
            entry_for(&t, "10.0.0.1", 30080).backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)],
            "the NodePort (Cluster policy) uses the zone's endpoints"
        );
        assert_eq!(
            entry_for(&t, "10.96.0.10", 80).backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)],
            "the ClusterIP this node's"
        );
    }

    #[test]
    fn each_family_is_served_on_its_own() {
        let svc = service(json!({"metadata": {"name": "dual", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "fd00::10",
                "clusterIPs": ["fd00::10", "10.96.0.10"], "ipFamilies": ["IPv6", "IPv4"],
                "ipFamilyPolicy": "PreferDualStack",
                "externalIPs": ["2001:db8::7", "192.0.2.7"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "2001:db8::100"}, {"ip": "192.0.2.100"}]}}}));
        let t = translate_on(&dual_node(), &[svc], NO_SLICES);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        for (a, p) in [
            ("10.96.0.10", 80),
            ("192.0.2.7", 80),
            ("192.0.2.100", 80),
            ("10.0.0.1", 30080),
            ("fd00::10", 80),
            ("2001:db8::7", 80),
            ("2001:db8::100", 80),
            ("fd00:1::1", 30080),
        ] {
            entry_for(&t, a, p);
        }
        assert_eq!(t.state.len(), 8, "{:?}", t.state.entries().keys());
    }

    #[test]
    fn a_node_without_ipv6_serves_the_ipv4_side_and_notes_the_other() {
        let svc = service(json!({"metadata": {"name": "dual", "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": "fd00::10",
                "clusterIPs": ["fd00::10", "10.96.0.10"], "ipFamilies": ["IPv6", "IPv4"],
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}));
        let node = NodeInfo {
            ipv6_off: true,
            ..dual_node()
        };
        let t = translate_on(&node, &[svc], NO_SLICES);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        entry_for(&t, "10.96.0.10", 80);
        entry_for(&t, "10.0.0.1", 30080);
        assert_eq!(t.state.len(), 2, "{:?}", t.state.entries().keys());
        assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
        assert!(t.notes[0].contains("IPv6 is off"), "{:?}", t.notes);
    }

    fn dual_node() -> NodeInfo {
        NodeInfo {
            nodeport_addresses: vec!["10.0.0.1".parse().unwrap(), "fd00:1::1".parse().unwrap()],
            ..node()
        }
    }

    fn dual_service(cluster_ips: serde_json::Value, families: serde_json::Value) -> ServiceInfo {
        service(json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                "ipFamilies": families, "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}))
    }

    fn slice_of(name: &str, address_type: &str, ips: &[&str]) -> SliceInfo {
        let endpoints: Vec<serde_json::Value> = ips.iter().map(|ip| ep(ip, None)).collect();
        slice(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": address_type,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
    }

    fn active(t: &Translation, a: &str, port: u16) -> Vec<String> {
        let e = entry_for(t, a, port);
        e.backends.active.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn slices_give_backends_to_their_own_family_merged_over_slices() {
        let slices = [
            slice_of("web-4a", "IPv4", &["10.244.0.5"]),
            slice_of("web-6a", "IPv6", &["fd00:244::5"]),
            slice_of("web-6b", "IPv6", &["fd00:244::6", "fd00:244::5"]),
            slice_of("web-4b", "IPv4", &["10.244.0.6"]),
        ];
        for families in [json!(["IPv4", "IPv6"]), json!(["IPv6", "IPv4"])] {
            let ips = if families[0] == "IPv4" {
                json!(["10.96.0.10", "fd00::10"])
            } else {
                json!(["fd00::10", "10.96.0.10"])
            };
            let t = translate_on(&dual_node(), &[dual_service(ips, families)], &slices);
            assert!(t.errors.is_empty(), "{:?}", t.errors);
            assert!(t.notes.is_empty(), "{:?}", t.notes);
            let v4 = ["10.244.0.5:8080/TCP", "10.244.0.6:8080/TCP"];
            let v6 = ["[fd00:244::5]:8080/TCP", "[fd00:244::6]:8080/TCP"];
            assert_eq!(active(&t, "10.96.0.10", 80), v4);
            assert_eq!(active(&t, "10.0.0.1", 30080), v4);
            assert_eq!(active(&t, "fd00::10", 80), v6);
            assert_eq!(active(&t, "fd00:1::1", 30080), v6);
            assert_eq!(t.state.len(), 4);
        }
    }

    #[test]
    fn an_ipv6_only_service_is_served_on_ipv6_alone() {
        let svc = service(json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": "fd00::10", "ipFamilies": ["IPv6"],
                "ipFamilyPolicy": "SingleStack", "externalIPs": ["192.0.2.7"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}));
        let slices = [slice_of("web-6", "IPv6", &["fd00:244::5"])];
        let t = translate_on(&dual_node(), &[svc], &slices);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(active(&t, "fd00::10", 80), ["[fd00:244::5]:8080/TCP"]);
        assert_eq!(active(&t, "fd00:1::1", 30080), ["[fd00:244::5]:8080/TCP"]);
        assert_eq!(t.state.len(), 2, "{:?}", t.state.entries().keys());
        // The IPv4 externalIP has no IPv4 side to belong to.
        assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
    }

    #[test]
    fn require_dual_stack_with_one_cluster_ip_is_noted_and_served() {
        let t = translate_on(
            &dual_node(),
            &[dual_service(json!(["10.96.0.10"]), json!(["IPv4"]))],
            NO_SLICES,
        );
        entry_for(&t, "10.96.0.10", 80);
        assert_eq!(t.state.len(), 2);
        assert!(t.notes[0].contains("RequireDualStack"), "{:?}", t.notes);
    }

    #[test]
    fn a_slice_address_of_the_other_family_is_an_error_for_that_endpoint() {
        let slices = [slice_of("web-6", "IPv6", &["10.244.0.5", "fd00:244::5"])];
        let t = translate_on(
            &dual_node(),
            &[dual_service(json!(["fd00::10"]), json!(["IPv6"]))],
            &slices,
        );
        assert_eq!(active(&t, "fd00::10", 80), ["[fd00:244::5]:8080/TCP"]);
        assert_eq!(
            errors_of(&t, "EndpointSlice shop/web-6"),
            [&Invalid::EndpointWrongFamily(
                Addr::V4("10.244.0.5".parse().unwrap()),
                Family::Ipv6
            )]
        );
    }

    #[test]
    fn source_ranges_apply_to_the_frontends_of_their_family() {
        let svc = service(json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00::10"],
                "loadBalancerSourceRanges": ["10.1.2.3/16", "2001:db8::/32"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}, {"ip": "2001:db8::100"}]}}}));
        let t = translate_on(&dual_node(), &[svc], NO_SLICES);
        let v4 = entry_for(&t, "192.0.2.1", 80);
        assert_eq!(v4.source_ranges, vec!["10.1.0.0/16".parse().unwrap()]);
        let v6 = entry_for(&t, "2001:db8::100", 80);
        assert_eq!(v6.source_ranges, vec!["2001:db8::/32".parse().unwrap()]);
        assert_ne!(v6.flags & SVC_FLAG_SOURCE_RANGES, 0);
        assert!(entry_for(&t, "fd00:1::1", 30080).source_ranges.is_empty());

        let bad = service(json!({"metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "fd00::11",
                "loadBalancerSourceRanges": ["2001:db8::/129"], "ports": [{"port": 80}]}}));
        let t = translate_on(&dual_node(), &[bad], NO_SLICES);
        assert!(t.state.is_empty());
        assert!(matches!(t.errors[0].reason, Invalid::SourceRange(_)));
    }

    #[test]
    fn an_invalid_ipv6_address_fails_its_service_only() {
        let bad = service(json!({"metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11", "fd00::zz"],
                "ports": [{"port": 80}]}}));
        let t = translate_on(&dual_node(), &[bad, web_service()], NO_SLICES);
        entry_for(&t, "10.96.0.10", 80);
        assert_eq!(
            errors_of(&t, "Service shop/bad"),
            [&Invalid::NotAnAddress {
                field: "clusterIP",
                value: "fd00::zz".into()
            }]
        );
    }

    #[test]
    fn an_unset_serving_condition_means_serving() {
        let svc = policy_service(json!({"type": "ClusterIP"}));
        let sl = web_slice(
            "w",
            vec![
                json!({"addresses": ["10.244.0.5"], "conditions": {"ready": false, "terminating": true}}),
            ],
        );
        let t = translate_on(&node(), &[svc], &[sl]);
        assert_eq!(
            entry_for(&t, "10.96.0.10", 80).backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)],
            "a terminating endpoint with serving unset is a fallback, as in kube-proxy"
        );
    }

    #[test]
    fn affinity_and_source_ranges_are_carried_and_validated() {
        let svc = policy_service(json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}},
            "loadBalancerSourceRanges": ["10.1.2.3/16", "2001:db8::/32"]}));
        let t = translate_on(&node(), &[svc], NO_SLICES);
        let lb = entry_for(&t, "192.0.2.1", 80);
        assert_eq!(lb.affinity_timeout, 30);
        assert_eq!(lb.source_ranges, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_ne!(lb.flags & SVC_FLAG_SOURCE_RANGES, 0);
        assert!(entry_for(&t, "10.0.0.1", 30080).source_ranges.is_empty());
        assert_eq!(entry_for(&t, "10.96.0.10", 80).affinity_timeout, 30);

        let bad = policy_service(json!({"loadBalancerSourceRanges": ["10.1.2.3/40"]}));
        let t = translate_on(&node(), &[bad], NO_SLICES);
        assert!(t.state.is_empty());
        assert!(
            matches!(t.errors[0].reason, Invalid::SourceRange(_)),
            "{:?}",
            t.errors
        );
    }

    fn errors_of<'a>(t: &'a Translation, object: &str) -> Vec<&'a Invalid> {
        t.errors
            .iter()
            .filter(|e| e.object == object)
            .map(|e| &e.reason)
            .collect()
    }

    #[test]
    fn malformed_objects_are_named_and_leave_the_others_alone() {
        let bad_services = [
            json!({"metadata": {"name": "nospec"}}),
            json!({"metadata": {"name": "noip"}, "spec": {"ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "badip"}, "spec": {"clusterIP": "10.96.0.256", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "badtype"}, "spec": {"type": "Magic", "clusterIP": "10.96.1.1", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "badaffinity"}, "spec": {"clusterIP": "10.96.1.2", "sessionAffinity": "Cookie", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "badext"}, "spec": {"clusterIP": "10.96.1.3", "externalIPs": ["x"], "ports": [{"port": 80}]}}),
        ];
        let bad_ports = service(json!({"metadata": {"name": "ports"}, "spec": {
        "type": "NodePort", "clusterIP": "10.96.1.4", "ports": [
            {"name": "zero", "port": 0},
            {"name": "big", "port": 65536},
            {"name": "neg", "port": -1},
            {"name": "proto", "port": 81, "protocol": "QUIC"},
            {"name": "np", "port": 82, "nodePort": 0},
            {"name": "ok", "port": 83}
        ]}}));
        let bad_slice = slice(json!({
            "metadata": {"name": "web-bad", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.300"]}, {"addresses": []}, {"addresses": ["10.244.0.7"]}]
        }));
        let mut services: Vec<ServiceInfo> = bad_services.into_iter().map(service).collect();
        services.push(bad_ports);
        services.push(web_service());
        let t = translate_on(&node(), &services, &[bad_slice]);
        for name in [
            "nospec",
            "noip",
            "badip",
            "badtype",
            "badaffinity",
            "badext",
        ] {
            let object = format!("Service default/{name}");
            assert_eq!(errors_of(&t, &object).len(), 1, "{object}: {:?}", t.errors);
            assert!(t.failed_services.iter().any(|s| &*s.name == name));
        }
        let port = |field, value| Invalid::PortNumber { field, value };
        for (name, reason) in [
            ("zero", port("port", 0)),
            ("big", port("port", 65536)),
            ("neg", port("port", -1)),
            (
                "proto",
                Invalid::Protocol(crate::model::UnsupportedProtocol("QUIC".into())),
            ),
            ("np", port("nodePort", 0)),
        ] {
            let object = format!("Service default/ports port {name}");
            assert_eq!(errors_of(&t, &object), [&reason], "{object}");
        }
        assert!(entry_for(&t, "10.96.1.4", 83).backends.active.is_empty());
        let slice_errors = errors_of(&t, "EndpointSlice shop/web-bad");
        assert!(
            slice_errors.iter().any(|e| **e
                == Invalid::EndpointWrongFamily(
                    Addr::Invalid("10.244.0.300".into()),
                    Family::Ipv4
                )),
            "{:?}",
            t.errors
        );
        // The good Service is untouched: its valid endpoint is there.
        assert_eq!(
            entry_for(&t, "10.96.0.10", 80).backends.active,
            vec![addr("10.244.0.7", 8080, Protocol::Tcp)]
        );
    }

    #[test]
    fn one_address_twice_in_a_slice_or_in_two_slices_is_one_backend_whatever_the_order() {
        let dup = |name: &str, ready: bool| {
            web_slice(
                name,
                vec![
                    ep("10.244.0.5", Some(ready)),
                    ep("10.244.0.5", Some(ready)),
                    ep("10.244.0.6", None),
                ],
            )
        };
        let a = dup("a", false);
        let b = dup("b", true);
        let one = translate(&[web_service()], &[a.clone(), b.clone()]);
        let other = translate(&[web_service()], &[b, a]);
        assert!(one.errors.is_empty(), "{:?}", one.errors);
        assert_eq!(one.state, other.state);
        let http = entry_for(&one, "10.96.0.10", 80);
        assert_eq!(
            http.backends.active,
            vec![
                addr("10.244.0.5", 8080, Protocol::Tcp),
                addr("10.244.0.6", 8080, Protocol::Tcp)
            ],
            "the ready copy wins, once"
        );
    }

    #[test]
    fn port_65535_works_everywhere_and_port_0_is_rejected() {
        let svc = service(json!({"metadata": {"name": "edge"}, "spec": {
        "type": "NodePort", "clusterIP": "10.96.2.1", "ports": [
            {"name": "max", "port": 65535, "nodePort": 65535, "protocol": "UDP"},
            {"name": "zero", "port": 0}
        ]}}));
        let sl = slice(json!({
            "metadata": {"name": "edge-1", "labels": {"kubernetes.io/service-name": "edge"}},
            "addressType": "IPv4",
            "ports": [{"name": "max", "port": 65535, "protocol": "UDP"}, {"name": "zero", "port": 0}],
            "endpoints": [{"addresses": ["10.244.3.3"]}]
        }));
        let t = translate_on(&node(), &[svc], &[sl]);
        let max = t
            .state
            .get(&addr("10.96.2.1", 65535, Protocol::Udp))
            .unwrap();
        assert_eq!(
            max.backends.active,
            vec![addr("10.244.3.3", 65535, Protocol::Udp)]
        );
        assert!(t
            .state
            .get(&addr("10.0.0.1", 65535, Protocol::Udp))
            .is_some());
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert_eq!(t.errors[0].object, "Service default/edge port zero");
    }

    #[test]
    fn ten_thousand_backends_fit_one_service_and_more_than_the_slots_is_an_error() {
        let ips = crate::test_objects::pod_ips(20, 10_000);
        let big = crate::test_objects::ready_slice("a", "a-1", 8080, &ips);
        let svc = crate::test_objects::cluster_ip("a", "10.96.3.1", 80);
        let t = translate(std::slice::from_ref(&svc), std::slice::from_ref(&big));
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(entry_for(&t, "10.96.3.1", 80).backends.active.len(), 10_000);

        let over = MAX_BACKENDS_PER_SERVICE as usize + 1;
        let too_many = crate::test_objects::ready_slice(
            "a",
            "a-2",
            8080,
            &crate::test_objects::pod_ips(21, over - 10_000),
        );
        let other = web_service();
        let t = translate(&[svc, other], &[big, too_many]);
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert_eq!(t.errors[0].object, "Service default/a port http");
        assert_eq!(t.errors[0].reason, Invalid::TooManyEndpoints(over));
        assert!(entry_for(&t, "10.96.0.10", 80).backends.active.is_empty());
        assert!(t.state.get(&addr("10.96.3.1", 80, Protocol::Tcp)).is_none());
    }
}
