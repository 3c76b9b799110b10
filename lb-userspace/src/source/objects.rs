//! What translation reads of Services and EndpointSlices, and nothing
//! more: both sources (the API watches and the manifest folder) turn every
//! object into these before they keep it, and translation reads only
//! these. So the two sources cannot differ in what they keep (a source
//! that dropped `status` once lost every LoadBalancer address), and a
//! large cluster costs what translation needs, not whole objects.
//!
//! Parsed once, as kube-proxy's ServicePortInfo is: addresses are parsed
//! here (a bad one kept as `Addr::Invalid`, for translation to report with
//! the Service's name); endpoint conditions get their API defaults.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, LazyLock, Mutex},
};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::model::{
    LbAlgorithm, LbMode, MaglevWeights, Protocol, ServiceName, UnsupportedProtocol,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy (kube-proxy honours it too).
pub(crate) const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless (no virtual IP) whatever their spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The annotation kube-proxy measures network programming latency from.
pub(crate) const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Chooses a Service's `LbAlgorithm` (`random` or `maglev`) over
/// `--lb-algorithm`.
pub const LB_ALGORITHM_ANNOTATION: &str = "lb-agent.io/lb-algorithm";
/// Chooses a Service's `LbMode` (`snat`, `dsr` or `hybrid`) over
/// `--lb-mode`.
pub const LB_MODE_ANNOTATION: &str = "lb-agent.io/lb-mode";
/// Weights of a Service's endpoints in its Maglev tables (`MaglevWeights`).
pub const MAGLEV_WEIGHTS_ANNOTATION: &str = "lb-agent.io/maglev-weights";

/// A closed-set annotation of a Service: its value parsed, or the text
/// that names none (reported by translation).
fn annotation<T>(
    svc: &Service,
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<Result<T, Box<str>>> {
    let value = svc.metadata.annotations.as_ref()?.get(name)?;
    Some(parse(value).ok_or_else(|| value.as_str().into()))
}
/// The older way to give `loadBalancerSourceRanges` (kube-proxy reads it
/// when the spec has none).
pub(crate) const SOURCE_RANGES_ANNOTATION: &str =
    "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Every annotation translation reads: the watches keep these and skip
/// the others (`listed`), so one read here must be listed here too.
pub(crate) const ANNOTATIONS_READ: [&str; 5] = [
    TRIGGER_TIME_ANNOTATION,
    LB_ALGORITHM_ANNOTATION,
    LB_MODE_ANNOTATION,
    MAGLEV_WEIGHTS_ANNOTATION,
    SOURCE_RANGES_ANNOTATION,
];

/// An address as a Service or endpoint gives it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// Not an IP address: reported by translation.
    Invalid(Box<str>),
}

impl Addr {
    pub fn parse(text: &str) -> Self {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Addr::V4(a),
            Ok(IpAddr::V6(a)) => Addr::V6(a),
            Err(_) => Addr::Invalid(text.into()),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::V4(a) => write!(f, "{a}"),
            Addr::V6(a) => write!(f, "{a}"),
            Addr::Invalid(t) => write!(f, "{t:?}"),
        }
    }
}

/// `spec.type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
    Unknown(Box<str>),
}

/// Why this agent leaves a Service alone, as kube-proxy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// `service.kubernetes.io/service-proxy-name`: another proxy's.
    OtherProxy,
    /// `clusterIP: None`, or the `service.kubernetes.io/headless` label.
    Headless,
    ExternalName,
}

/// `spec.sessionAffinity` with its timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Affinity {
    None,
    ClientIp { timeout_seconds: Option<i32> },
    Unsupported(Box<str>),
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub name: Arc<str>,
    /// The protocol, or why it is not one the data path serves.
    pub protocol: Result<Protocol, UnsupportedProtocol>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// A Service as translation reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: ServiceName,
    pub ignored: Option<Ignored>,
    pub kind: ServiceKind,
    /// `spec.clusterIPs` (one per family, the primary first), or
    /// `spec.clusterIP` when an object carries only that (manifests).
    pub cluster_ips: Vec<Addr>,
    /// `spec.ipFamilyPolicy` RequireDualStack: a single clusterIP is noted.
    pub require_dual_stack: bool,
    pub external_ips: Vec<Addr>,
    /// `status.loadBalancer.ingress` addresses, without those of ipMode
    /// Proxy (the load balancer proxies: traffic arrives for the node).
    pub ingress_ips: Vec<Addr>,
    /// `spec.loadBalancerSourceRanges`, else the annotation's, as written.
    pub source_ranges: Vec<Box<str>>,
    pub ports: Vec<PortInfo>,
    pub affinity: Affinity,
    pub external_local: bool,
    pub internal_local: bool,
    pub health_check_node_port: Option<i32>,
    /// The `lb-agent.io/lb-algorithm` annotation: an algorithm, or the
    /// text it does not name one with.
    pub lb_algorithm: Option<Result<LbAlgorithm, Box<str>>>,
    /// The `lb-agent.io/lb-mode` annotation: a mode, or the text it does
    /// not name one with.
    pub lb_mode: Option<Result<LbMode, Box<str>>>,
    /// The `lb-agent.io/maglev-weights` annotation: the weights, or the
    /// text that does not give them.
    pub maglev_weights: Option<Result<Arc<MaglevWeights>, Box<str>>>,
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressType {
    Ipv4,
    Ipv6,
    /// FQDN (deprecated) or unknown: not served.
    Other(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Arc<str>,
    pub protocol: Result<Protocol, UnsupportedProtocol>,
    pub port: Option<i32>,
}

/// One endpoint, its conditions with the API's defaults (ready and
/// serving true when unset, terminating false), as kube-proxy reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The first address (all of an endpoint's are fungible, kube-proxy
    /// uses the first); None when it has none.
    pub address: Option<Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<Arc<str>>,
    /// `hints`, when it names a zone or a node (most endpoints have none:
    /// one pointer for them, at 100,000 endpoints 4 MiB less than two
    /// empty lists each).
    pub hints: Option<Arc<Hints>>,
}

/// `hints.forZones` and `hints.forNodes` of an endpoint.
#[derive(Debug, PartialEq, Eq)]
pub struct Hints {
    pub zones: Box<[Arc<str>]>,
    pub nodes: Box<[Arc<str>]>,
}

impl EndpointInfo {
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    pub fn node_hints(&self) -> &[Arc<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }
}

/// An EndpointSlice as translation reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The Service of the `kubernetes.io/service-name` label.
    pub service: Option<ServiceName>,
    pub address_type: AddressType,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`.
    pub trigger_time: Option<DateTime<Utc>>,
}

/// Node names, zones, namespaces and port names repeat across every
/// endpoint or object: one copy each, kept for the agent's life (a cluster
/// has few of each).
fn intern(text: &str) -> Arc<str> {
    static STRINGS: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Default::default);
    let mut strings = STRINGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = strings.get(text) {
        return s.clone();
    }
    let s: Arc<str> = text.into();
    strings.insert(s.clone());
    s
}

pub fn service_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ServiceName {
    ServiceName {
        namespace: intern(meta.namespace.as_deref().unwrap_or("default")),
        name: meta.name.as_deref().unwrap_or_default().into(),
    }
}

impl From<&Service> for ServiceInfo {
    fn from(svc: &Service) -> Self {
        let default_spec = ServiceSpec::default();
        let spec = svc.spec.as_ref().unwrap_or(&default_spec);
        ServiceInfo {
            name: service_name(&svc.metadata),
            ignored: ignored(svc, spec),
            kind: kind(spec.type_.as_deref()),
            cluster_ips: cluster_ips(spec),
            require_dual_stack: spec.ip_family_policy.as_deref() == Some("RequireDualStack"),
            external_ips: spec
                .external_ips
                .iter()
                .flatten()
                .map(|a| Addr::parse(a))
                .collect(),
            ingress_ips: ingress_ips(svc),
            source_ranges: source_ranges(svc, spec),
            ports: spec.ports.iter().flatten().map(port_info).collect(),
            affinity: affinity(spec),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec.health_check_node_port,
            lb_algorithm: annotation(svc, LB_ALGORITHM_ANNOTATION, LbAlgorithm::parse),
            lb_mode: annotation(svc, LB_MODE_ANNOTATION, LbMode::parse),
            maglev_weights: annotation(svc, MAGLEV_WEIGHTS_ANNOTATION, |text| {
                MaglevWeights::parse(text).map(Arc::new)
            }),
        }
    }
}

impl From<Service> for ServiceInfo {
    fn from(svc: Service) -> Self {
        ServiceInfo::from(&svc)
    }
}

fn ignored(svc: &Service, spec: &ServiceSpec) -> Option<Ignored> {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Some(Ignored::OtherProxy);
    }
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL))
        || spec.cluster_ip.as_deref() == Some("None")
    {
        return Some(Ignored::Headless);
    }
    (spec.type_.as_deref() == Some("ExternalName")).then_some(Ignored::ExternalName)
}

fn kind(type_: Option<&str>) -> ServiceKind {
    match type_.unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceKind::ClusterIp,
        "NodePort" => ServiceKind::NodePort,
        "LoadBalancer" => ServiceKind::LoadBalancer,
        "ExternalName" => ServiceKind::ExternalName,
        other => ServiceKind::Unknown(other.into()),
    }
}

fn cluster_ips(spec: &ServiceSpec) -> Vec<Addr> {
    let listed = spec.cluster_ips.iter().flatten();
    let single = spec.cluster_ip.iter();
    let texts: Vec<&String> = if spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty()) {
        listed.collect()
    } else {
        single.collect()
    };
    texts
        .into_iter()
        .filter(|t| !t.is_empty() && *t != "None")
        .map(|t| Addr::parse(t))
        .collect()
}

fn ingress_ips(svc: &Service) -> Vec<Addr> {
    svc.status
        .iter()
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_deref())
        .map(Addr::parse)
        .collect()
}

fn source_ranges(svc: &Service, spec: &ServiceSpec) -> Vec<Box<str>> {
    let from_spec: Vec<Box<str>> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .map(Into::into)
        .collect();
    if !from_spec.is_empty() {
        return from_spec;
    }
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Into::into)
                .collect()
        })
        .unwrap_or_default()
}

fn port_info(p: &k8s_openapi::api::core::v1::ServicePort) -> PortInfo {
    PortInfo {
        name: intern(p.name.as_deref().unwrap_or_default()),
        protocol: Protocol::from_k8s(p.protocol.as_deref()),
        port: p.port,
        node_port: p.node_port,
    }
}

fn affinity(spec: &ServiceSpec) -> Affinity {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Affinity::None,
        Some("ClientIP") => Affinity::ClientIp {
            timeout_seconds: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
        },
        Some(other) => Affinity::Unsupported(other.into()),
    }
}

impl From<&EndpointSlice> for SliceInfo {
    fn from(slice: &EndpointSlice) -> Self {
        let endpoints = slice.endpoints.iter().map(endpoint_info).collect();
        SliceInfo::from_parts(
            &slice.metadata,
            &slice.address_type,
            slice.ports.as_deref().unwrap_or_default(),
            endpoints,
        )
    }
}

impl From<EndpointSlice> for SliceInfo {
    fn from(slice: EndpointSlice) -> Self {
        SliceInfo::from(&slice)
    }
}

fn endpoint_info(e: &Endpoint) -> EndpointInfo {
    EndpointInfo::from_parts(
        e.addresses.first().map(|a| Addr::parse(a)),
        e.conditions.as_ref(),
        e.node_name.as_deref(),
        e.hints.as_ref(),
    )
}

impl EndpointInfo {
    /// From what translation reads of an endpoint: its first address
    /// (parsed), its conditions, node name and hints.
    pub(crate) fn from_parts(
        address: Option<Addr>,
        conditions: Option<&EndpointConditions>,
        node_name: Option<&str>,
        hints: Option<&EndpointHints>,
    ) -> Self {
        EndpointInfo {
            address,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node: node_name.map(intern),
            hints: hints.and_then(hints_of),
        }
    }
}

fn hints_of(hints: &EndpointHints) -> Option<Arc<Hints>> {
    let zones: Box<[Arc<str>]> = (hints.for_zones.iter().flatten())
        .map(|z| intern(&z.name))
        .collect();
    let nodes: Box<[Arc<str>]> = (hints.for_nodes.iter().flatten())
        .map(|n| intern(&n.name))
        .collect();
    (!zones.is_empty() || !nodes.is_empty()).then(|| Arc::new(Hints { zones, nodes }))
}

impl SliceInfo {
    /// From an EndpointSlice's parts, its endpoints already read.
    pub(crate) fn from_parts(
        meta: &ObjectMeta,
        address_type: &str,
        ports: &[EndpointPort],
        endpoints: Vec<EndpointInfo>,
    ) -> Self {
        let service = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|svc| ServiceName {
                namespace: intern(meta.namespace.as_deref().unwrap_or("default")),
                name: svc.as_str().into(),
            });
        SliceInfo {
            namespace: intern(meta.namespace.as_deref().unwrap_or("default")),
            name: meta.name.as_deref().unwrap_or_default().into(),
            service,
            address_type: match address_type {
                "IPv4" => AddressType::Ipv4,
                "IPv6" => AddressType::Ipv6,
                other => AddressType::Other(other.into()),
            },
            ports: ports
                .iter()
                .map(|p| SlicePort {
                    name: intern(p.name.as_deref().unwrap_or_default()),
                    protocol: Protocol::from_k8s(p.protocol.as_deref()),
                    port: p.port,
                })
                .collect(),
            endpoints,
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// `namespace/name`, for messages.
    pub(crate) fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One Service to translate again: its object (None: deleted) and its
/// slices, as a source hands changes to the programmer.
pub struct ServiceChange<'a> {
    pub name: ServiceName,
    pub service: Option<&'a ServiceInfo>,
    pub slices: Vec<&'a SliceInfo>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(v: serde_json::Value) -> ServiceInfo {
        ServiceInfo::from(serde_json::from_value::<Service>(v).expect("a Service"))
    }

    #[test]
    fn what_the_api_server_sends_is_kept_whatever_the_source() {
        let s = service(json!({
            "metadata": {"name": "web", "namespace": "shop",
                "annotations": {SOURCE_RANGES_ANNOTATION: "10.0.0.0/8, 192.0.2.0/24"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "fd00::10",
                "clusterIPs": ["fd00::10", "10.96.0.10"], "ipFamilies": ["IPv6", "IPv4"],
                "externalIPs": ["192.0.2.7", "2001:db8::7"],
                "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster",
                "healthCheckNodePort": 32000, "sessionAffinity": "None",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.100"}, {"ip": "192.0.2.101", "ipMode": "Proxy"},
                {"ip": "2001:db8::100"}]}}
        }));
        assert_eq!(s.kind, ServiceKind::LoadBalancer);
        assert_eq!(
            s.cluster_ips,
            vec![Addr::parse("fd00::10"), Addr::parse("10.96.0.10")]
        );
        assert_eq!(s.external_ips.len(), 2);
        assert_eq!(
            s.ingress_ips,
            vec![Addr::parse("192.0.2.100"), Addr::parse("2001:db8::100")],
            "ipMode Proxy left out"
        );
        assert_eq!(
            s.source_ranges,
            vec!["10.0.0.0/8".into(), "192.0.2.0/24".into()]
        );
        assert!(s.external_local && !s.internal_local);
        assert_eq!(s.health_check_node_port, Some(32000));
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.ignored, None);
    }

    #[test]
    fn the_lb_algorithm_annotation_is_read_and_an_unknown_value_kept_for_the_report() {
        let with = |value: Option<&str>| {
            let annotations = value.map_or(json!({}), |v| json!({LB_ALGORITHM_ANNOTATION: v}));
            service(
                json!({"metadata": {"name": "a", "annotations": annotations},
                "spec": {"clusterIP": "10.96.0.1"}}),
            )
            .lb_algorithm
        };
        assert_eq!(with(None), None);
        assert_eq!(with(Some("maglev")), Some(Ok(LbAlgorithm::Maglev)));
        assert_eq!(with(Some("random")), Some(Ok(LbAlgorithm::Random)));
        assert_eq!(with(Some("Maglev")), Some(Err("Maglev".into())));
    }

    #[test]
    fn the_lb_mode_and_maglev_weights_annotations_are_read() {
        let svc = service(json!({"metadata": {"name": "a", "annotations": {
                LB_MODE_ANNOTATION: "hybrid", MAGLEV_WEIGHTS_ANNOTATION: "10.0.0.1=2"}},
            "spec": {"clusterIP": "10.96.0.1"}}));
        assert_eq!(svc.lb_mode, Some(Ok(LbMode::Hybrid)));
        let weights = svc.maglev_weights.unwrap().unwrap();
        assert_eq!(weights.of(&"10.0.0.1".parse().unwrap()), 2);
        let svc = service(json!({"metadata": {"name": "a", "annotations": {
                LB_MODE_ANNOTATION: "direct", MAGLEV_WEIGHTS_ANNOTATION: "a=b"}},
            "spec": {"clusterIP": "10.96.0.1"}}));
        assert_eq!(svc.lb_mode, Some(Err("direct".into())));
        assert_eq!(svc.maglev_weights, Some(Err("a=b".into())));
    }

    #[test]
    fn services_other_proxies_own_and_headless_ones_are_marked() {
        let s = service(
            json!({"metadata": {"name": "a", "labels": {SERVICE_PROXY_NAME_LABEL: "x"}},
            "spec": {"clusterIP": "10.96.0.1"}}),
        );
        assert_eq!(s.ignored, Some(Ignored::OtherProxy));
        let s = service(json!({"metadata": {"name": "a"}, "spec": {"clusterIP": "None"}}));
        assert_eq!(s.ignored, Some(Ignored::Headless));
        let s = service(json!({"metadata": {"name": "a"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}));
        assert_eq!(s.ignored, Some(Ignored::ExternalName));
    }

    #[test]
    fn endpoint_conditions_get_the_api_defaults() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "default",
                "labels": {SERVICE_NAME_LABEL: "web"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2026-12-03T10:00:00Z"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.244.0.1"]},
                {"addresses": ["10.244.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.244.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "nodeName": "n1", "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]}}]
        }))
        .unwrap();
        let s = SliceInfo::from(&slice);
        assert_eq!(s.service.as_ref().map(|n| &*n.name), Some("web"));
        assert!(s.trigger_time.is_some());
        let e = &s.endpoints;
        assert!(
            e[0].ready && e[0].serving && !e[0].terminating,
            "unset: ready, serving"
        );
        assert!(
            !e[1].ready && e[1].serving,
            "serving unset means true, whatever ready says"
        );
        assert!(e[2].serving && e[2].terminating);
        assert_eq!(e[2].zone_hints(), [Arc::from("a")]);
        assert_eq!(e[2].node_hints(), [Arc::from("n1")]);
        assert!(
            Arc::ptr_eq(e[2].node.as_ref().unwrap(), &e[2].node_hints()[0]),
            "interned"
        );
    }
}
