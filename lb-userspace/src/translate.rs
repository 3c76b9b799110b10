//! The pure translation: Services + EndpointSlices -> the frontends and
//! backends the data path must serve. No I/O, so it is unit tested with
//! hand-built objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use std::borrow::Borrow;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{
    MAX_BACKENDS_PER_SERVICE, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_EXTERNAL_LOCAL,
    SVC_FLAG_INTERNAL_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    SVC_FLAG_TWO_SCOPES,
};

use crate::model::{
    BackendSet, Conflict, DesiredState, Ipv4Prefix, L4Addr, Protocol, ServiceEntry, ServiceName,
    Shadowed,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy (kube-proxy honours it too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless (no virtual IP) whatever their spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Something that could not be expressed in the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateError {
    /// e.g. `Service default/web` or `Service default/web port dns`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub errors: Vec<TranslateError>,
    /// Services none of whose ports could be translated because the Service
    /// itself is invalid: their previous entries should be kept.
    pub failed_services: BTreeSet<ServiceName>,
    /// healthCheckNodePorts this node serves.
    pub health_checks: Vec<crate::health_check::HealthCheck>,
    /// Entries whose frontend a Service that sorts first holds.
    pub shadowed: Shadowed,
}

pub fn service_name(svc: &Service) -> ServiceName {
    ServiceName {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().unwrap_or_default(),
    }
}

/// What translation needs to know about the node it programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Endpoints whose `nodeName` is this are local (traffic policy Local).
    pub name: String,
    /// Addresses NodePorts are served on.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// `topology.kubernetes.io/zone` of the node, for topology hints.
    pub zone: Option<String>,
}

/// Translates every Service and its EndpointSlices for a node without
/// NodePort addresses, name or zone (tests and tools).
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
) -> Translation {
    translate_on(&NodeInfo::default(), services, slices)
}

/// Translates every Service and its EndpointSlices for `node`.
/// Takes owned objects or references alike, so a caller with a store can
/// translate without copying it.
pub fn translate_on<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    node: &NodeInfo,
    services: &[S],
    slices: &[E],
) -> Translation {
    let mut slices_by_service: BTreeMap<ServiceName, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let slice: &EndpointSlice = slice.borrow();
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let name = ServiceName {
            namespace: slice
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: svc.clone(),
        };
        slices_by_service.entry(name).or_default().push(slice);
    }

    let mut out = Translation::default();
    for svc in services {
        let svc: &Service = svc.borrow();
        let name = service_name(svc);
        let empty = Vec::new();
        let slices = slices_by_service.get(&name).unwrap_or(&empty);
        out.health_checks
            .extend(crate::health_check::health_check_of(
                node, &name, svc, slices,
            ));
        match translate_service(node, svc, &name, slices, &mut out.errors) {
            Ok(entries) => {
                for entry in entries {
                    if let Some(c) = out.state.claim(entry, &mut out.shadowed) {
                        out.errors.push(c.into());
                    }
                }
            }
            Err(reason) => {
                out.errors.push(TranslateError {
                    object: format!("Service {name}"),
                    reason,
                });
                out.failed_services.insert(name);
            }
        }
    }
    out
}

impl From<Conflict> for TranslateError {
    fn from(c: Conflict) -> Self {
        TranslateError {
            object: format!("Service {}", c.loser),
            reason: format!(
                "frontend {} is already used by Service {} (of two claims the first name in order wins)",
                c.frontend, c.winner
            ),
        }
    }
}

/// Keeps the previous entries (held or waiting) of Services that failed
/// as a whole, so a bad edit does not take down what was already serving.
pub fn carry_over_failed(
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
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Annotations that turn topology hints on (current and deprecated names).
const TOPOLOGY_MODE_ANNOTATIONS: [&str; 2] = [
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
];
const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// One endpoint of a Service port with what the traffic policies read.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: L4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    /// Zones of `hints.forZones` (None: no hints).
    zone_hints: Option<Vec<String>>,
}

/// Translates one Service with its slices: its entries, or why the whole
/// Service cannot be programmed. Per-port problems go to `errors`.
pub fn translate_service(
    node: &NodeInfo,
    svc: &Service,
    name: &ServiceName,
    slices: &[&EndpointSlice],
    errors: &mut Vec<TranslateError>,
) -> Result<Vec<ServiceEntry>, String> {
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return Ok(Vec::new());
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err("the Service has no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(Vec::new()),
        Some("") | None => return Err("spec.clusterIP is empty (manifests must carry the address an API server would allocate)".into()),
        Some(ip) => ip,
    };
    let addr = parse_ipv4(cluster_ip, "clusterIP")?;
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(svc_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(format!("type {svc_type:?} is not a Service type"));
    }
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|ip| parse_ipv4(ip, "externalIPs entry"))
        .collect::<Result<Vec<_>, _>>()?;
    let lb_ips = if svc_type == "LoadBalancer" {
        svc.status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            // ipMode Proxy: the load balancer proxies, traffic arrives for
            // the node, not for the ingress address.
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref())
            .map(|ip| parse_ipv4(ip, "status.loadBalancer.ingress ip"))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let source_ranges = source_ranges(svc)?;
    let affinity_timeout = match spec.session_affinity.as_deref() {
        Some("ClientIP") => spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(Ok(DEFAULT_AFFINITY_TIMEOUT), |t| {
                u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=86_400).contains(t))
                    .ok_or_else(|| {
                        format!("sessionAffinity timeoutSeconds {t} is not in 1..=86400")
                    })
            })?,
        None | Some("None") => 0,
        Some(other) => return Err(format!("sessionAffinity {other:?} is not supported")),
    };
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let topology = !internal_local
        && (spec.traffic_distribution.as_deref() == Some("PreferClose")
            || svc.metadata.annotations.as_ref().is_some_and(|a| {
                TOPOLOGY_MODE_ANNOTATIONS
                    .iter()
                    .any(|k| a.get(*k).is_some_and(|v| v.eq_ignore_ascii_case("auto")))
            }));

    let mut entries = Vec::new();
    for port in spec.ports.as_deref().unwrap_or_default() {
        let port_name = port.name.clone().unwrap_or_default();
        let object = if port_name.is_empty() {
            format!("Service {name} port {}", port.port)
        } else {
            format!("Service {name} port {port_name}")
        };
        let proto = match Protocol::from_k8s(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(reason) => {
                errors.push(TranslateError { object, reason });
                continue;
            }
        };
        let Some(svc_port) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            errors.push(TranslateError {
                object,
                reason: format!("port {} is not in 1..=65535", port.port),
            });
            continue;
        };
        let node_port = match port.node_port {
            Some(p) if svc_type != "ClusterIP" => match u16::try_from(p).ok().filter(|p| *p != 0) {
                Some(p) => Some(p),
                None => {
                    errors.push(TranslateError {
                        object,
                        reason: format!("nodePort {p} is not in 1..=65535"),
                    });
                    continue;
                }
            },
            _ => None,
        };
        let mut endpoints = BTreeMap::new();
        // In name order: when two slices disagree about one address, the
        // outcome must not depend on the order they arrived in.
        let mut slices = slices.to_vec();
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for slice in slices {
            collect_endpoints(
                slice,
                &port_name,
                proto,
                node,
                publish_not_ready,
                &mut endpoints,
                errors,
            );
        }
        let endpoints: Vec<Endpoint> = endpoints.into_values().collect();
        if endpoints.len() > MAX_BACKENDS_PER_SERVICE as usize {
            errors.push(TranslateError {
                object,
                reason: format!(
                    "{} endpoints exceed the data path's limit of {MAX_BACKENDS_PER_SERVICE} per Service port",
                    endpoints.len()
                ),
            });
            continue;
        }
        let cluster = backend_set(&endpoints, |_| true, topology.then_some(node));
        let local = backend_set(&endpoints, |e| e.local, None);
        let internal = if internal_local {
            local.clone()
        } else {
            cluster.clone()
        };
        let entry = |frontend: L4Addr,
                     flags: u16,
                     backends: BackendSet,
                     internal_set: Option<BackendSet>| ServiceEntry {
            service: name.clone(),
            port_name: port_name.clone(),
            frontend,
            backends,
            internal: internal_set,
            flags: flags
                | if internal_local {
                    SVC_FLAG_INTERNAL_LOCAL
                } else {
                    0
                },
            affinity_timeout,
            source_ranges: if flags & SVC_FLAG_LOAD_BALANCER != 0 {
                source_ranges.clone()
            } else {
                Vec::new()
            },
        };
        entries.push(entry(
            L4Addr {
                addr,
                port: svc_port,
                proto,
            },
            SVC_FLAG_CLUSTER_IP,
            internal.clone(),
            None,
        ));
        // External frontends: Local policy serves outside traffic from this
        // node's endpoints, unmasqueraded; this node's pods still get the
        // internal set (as kube-proxy short-circuits them).
        let mut external = |addr: Ipv4Addr, port: u16, kind: u16| {
            let (flags, backends, internal_set) = if external_local {
                (
                    kind | SVC_FLAG_EXTERNAL_LOCAL | SVC_FLAG_TWO_SCOPES,
                    local.clone(),
                    Some(internal.clone()),
                )
            } else {
                (kind, cluster.clone(), None)
            };
            let flags = if kind == SVC_FLAG_LOAD_BALANCER && !source_ranges.is_empty() {
                flags | SVC_FLAG_SOURCE_RANGES
            } else {
                flags
            };
            entries.push(entry(
                L4Addr { addr, port, proto },
                flags,
                backends,
                internal_set,
            ));
        };
        if let Some(np) = node_port {
            for a in &node.nodeport_addresses {
                external(*a, np, SVC_FLAG_NODE_PORT);
            }
        }
        for a in &external_ips {
            external(*a, svc_port, SVC_FLAG_EXTERNAL_IP);
        }
        for a in &lb_ips {
            external(*a, svc_port, SVC_FLAG_LOAD_BALANCER);
        }
    }
    Ok(entries)
}

fn parse_ipv4(text: &str, what: &str) -> Result<Ipv4Addr, String> {
    match text.parse::<Ipv4Addr>() {
        Ok(a) => Ok(a),
        Err(_) if text.parse::<std::net::Ipv6Addr>().is_ok() => Err(format!(
            "{what} {text} is IPv6, which the data path does not serve yet"
        )),
        Err(_) => Err(format!("{what} {text:?} is not an IP address")),
    }
}

/// `spec.loadBalancerSourceRanges`, or the older annotation when the spec
/// has none (kube-proxy reads both the same way).
fn source_ranges(svc: &Service) -> Result<Vec<Ipv4Prefix>, String> {
    let from_spec: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default();
    let texts = if from_spec.is_empty() {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|v| {
                v.split(',')
                    .map(str::to_owned)
                    .filter(|s| !s.trim().is_empty())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        from_spec
    };
    let mut out = Vec::new();
    for t in texts {
        if t.contains(':') {
            // An IPv6 range cannot match IPv4 traffic; kube-proxy's IPv4
            // rules skip it the same way.
            continue;
        }
        out.push(
            t.parse::<Ipv4Prefix>()
                .map_err(|e| format!("loadBalancerSourceRanges: {e}"))?,
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The backends for new flows among `endpoints` that pass `scope`, the way
/// kube-proxy picks them: ready ones (narrowed by topology hints when every
/// one has hints and some name this node's zone); when none is ready,
/// serving terminating ones. Terminating endpoints not chosen are kept.
fn backend_set(
    endpoints: &[Endpoint],
    scope: impl Fn(&Endpoint) -> bool,
    topology: Option<&NodeInfo>,
) -> BackendSet {
    let in_scope: Vec<&Endpoint> = endpoints.iter().filter(|e| scope(e)).collect();
    let mut active: Vec<&Endpoint> = in_scope.iter().copied().filter(|e| e.ready).collect();
    if let Some(zone) = topology.and_then(|n| n.zone.as_deref()) {
        let usable = !active.is_empty()
            && active.iter().all(|e| e.zone_hints.is_some())
            && active
                .iter()
                .any(|e| e.zone_hints.iter().flatten().any(|z| z == zone));
        if usable {
            active.retain(|e| e.zone_hints.iter().flatten().any(|z| z == zone));
        }
    }
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

/// Adds the endpoints of `slice` for the Service port named `port_name`
/// (matched by name and protocol, as kube-proxy does).
fn collect_endpoints(
    slice: &EndpointSlice,
    port_name: &str,
    proto: Protocol,
    node: &NodeInfo,
    publish_not_ready: bool,
    out: &mut BTreeMap<L4Addr, Endpoint>,
    errors: &mut Vec<TranslateError>,
) {
    if slice.address_type != "IPv4" {
        return;
    }
    let slice_name = format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        slice.metadata.name.as_deref().unwrap_or("")
    );
    let Some(port) = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
        p.name.as_deref().unwrap_or("") == port_name
            && Protocol::from_k8s(p.protocol.as_deref()) == Ok(proto)
    }) else {
        return;
    };
    let Some(port_number) = port
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
    else {
        errors.push(TranslateError {
            object: format!("EndpointSlice {slice_name}"),
            reason: format!("port {port_name:?} has no valid number"),
        });
        return;
    };
    for endpoint in &slice.endpoints {
        let c = endpoint.conditions.as_ref();
        // Nil `ready` and `serving` mean unknown, which consumers treat as
        // true; nil `terminating` means false.
        let ready = c.and_then(|c| c.ready).unwrap_or(true) || publish_not_ready;
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        // All addresses of an endpoint are fungible; use the first, like kube-proxy.
        let Some(first) = endpoint.addresses.first() else {
            continue;
        };
        let Ok(addr) = first.parse::<Ipv4Addr>() else {
            errors.push(TranslateError {
                object: format!("EndpointSlice {slice_name}"),
                reason: format!("endpoint address {first:?} is not an IPv4 address"),
            });
            continue;
        };
        let addr = L4Addr {
            addr,
            port: port_number,
            proto,
        };
        let zone_hints = endpoint
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .filter(|z| !z.is_empty())
            .map(|z| z.iter().map(|z| z.name.clone()).collect());
        let local = !node.name.is_empty() && endpoint.node_name.as_deref() == Some(&node.name);
        // The same address in two slices (a slice being replaced): the
        // readier copy wins.
        let e = Endpoint {
            addr,
            ready: ready && !terminating,
            serving,
            terminating,
            local,
            zone_hints,
        };
        match out.get(&addr) {
            Some(old) if old.ready || !e.ready => {}
            _ => {
                out.insert(addr, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_SLICES: &[EndpointSlice] = &[];
    use serde_json::json;

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("test Service must deserialize")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("test EndpointSlice must deserialize")
    }

    fn ep(ip: &str, ready: Option<bool>) -> serde_json::Value {
        match ready {
            Some(r) => json!({"addresses": [ip], "conditions": {"ready": r}}),
            None => json!({"addresses": [ip]}),
        }
    }

    fn web_service() -> Service {
        service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
            ]}
        }))
    }

    fn web_slice(name: &str, endpoints: Vec<serde_json::Value>) -> EndpointSlice {
        slice(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints
        }))
    }

    fn addr(s: &str, port: u16, proto: Protocol) -> L4Addr {
        L4Addr {
            addr: s.parse().unwrap(),
            port,
            proto,
        }
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
        assert_eq!(db.service.namespace, "default");
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
        other_ns.metadata.namespace = Some("other".into());
        let mut v6 = web_slice("web-v6", vec![ep("fd00::1", None)]);
        v6.address_type = "IPv6".into();
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
        assert!(
            t.errors[0].reason.contains("SCTP"),
            "{}",
            t.errors[0].reason
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
        assert_eq!(t.state.len(), 2);
        assert_eq!(t.errors.len(), 2);
        assert!(t
            .errors
            .iter()
            .any(|e| e.object == "Service default/bad" && e.reason.contains("not an IP")));
        assert!(t
            .errors
            .iter()
            .any(|e| e.object == "Service default/six" && e.reason.contains("IPv6")));
    }

    #[test]
    fn a_service_that_turns_invalid_keeps_its_previous_entries() {
        let good = translate(
            &[web_service()],
            &[web_slice("w", vec![ep("10.244.0.5", None)])],
        );
        let mut broken = web_service();
        broken.spec.as_mut().unwrap().cluster_ip = Some("garbage".into());
        let mut t = translate(&[broken], &[web_slice("w", vec![ep("10.244.0.5", None)])]);
        assert!(t.state.is_empty());
        carry_over_failed(&mut t, &good.state, &good.shadowed);
        assert_eq!(t.state, good.state);
    }

    #[test]
    fn duplicate_frontends_are_reported_not_merged() {
        let mut other = web_service();
        other.metadata.name = Some("web2".into());
        let t = translate(&[web_service(), other], NO_SLICES);
        assert_eq!(t.state.len(), 2);
        assert!(t.errors.iter().any(|e| e.reason.contains("already used")));
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            nodeport_addresses: vec!["10.0.0.1".parse().unwrap(), "10.0.1.1".parse().unwrap()],
            zone: Some("z1".into()),
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

    fn policy_service(extra: serde_json::Value) -> Service {
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
        let sl = web_slice(
            "w",
            vec![
                ep_full("10.244.0.5", false, false, false, "n1"),
                ep_full("10.244.1.5", true, true, false, "n2"),
            ],
        );
        let t = translate_on(&node(), &[svc], &[sl]);
        let e = entry_for(&t, "10.96.0.10", 80);
        assert_eq!(
            e.backends.active,
            vec![addr("10.244.0.5", 8080, Protocol::Tcp)]
        );
        assert_ne!(e.flags & SVC_FLAG_INTERNAL_LOCAL, 0);
    }

    #[test]
    fn topology_hints_apply_only_when_every_endpoint_has_one_for_some_zone() {
        let svc =
            policy_service(json!({"type": "ClusterIP", "trafficDistribution": "PreferClose"}));
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
            t.errors[0].reason.contains("loadBalancerSourceRanges"),
            "{:?}",
            t.errors
        );
    }

    fn errors_of<'a>(t: &'a Translation, object: &str) -> Vec<&'a str> {
        t.errors
            .iter()
            .filter(|e| e.object == object)
            .map(|e| e.reason.as_str())
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
        let mut services: Vec<Service> = bad_services.into_iter().map(service).collect();
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
            assert!(t.failed_services.iter().any(|s| s.name == name));
        }
        for (port, needle) in [
            ("zero", "not in 1..=65535"),
            ("big", "not in 1..=65535"),
            ("neg", "not in 1..=65535"),
            ("proto", "QUIC"),
            ("np", "nodePort 0"),
        ] {
            let object = format!("Service default/ports port {port}");
            let errors = errors_of(&t, &object);
            assert!(
                errors.len() == 1 && errors[0].contains(needle),
                "{object}: {errors:?}"
            );
        }
        assert!(entry_for(&t, "10.96.1.4", 83).backends.active.is_empty());
        let slice_errors = errors_of(&t, "EndpointSlice shop/web-bad");
        assert!(
            slice_errors.iter().any(|e| e.contains("10.244.0.300")),
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
        assert!(t.errors[0].reason.contains(&over.to_string()));
        assert!(entry_for(&t, "10.96.0.10", 80).backends.active.is_empty());
        assert!(t.state.get(&addr("10.96.3.1", 80, Protocol::Tcp)).is_none());
    }
}
