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
use lb_common::{MAX_BACKENDS_PER_SERVICE, SVC_FLAG_CLUSTER_IP};

use crate::model::{DesiredState, L4Addr, Protocol, ServiceEntry, ServiceName};

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

/// Translates every Service and its EndpointSlices.
/// Takes owned objects or references alike, so a caller with a store can
/// translate without copying it.
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
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
        match translate_service(svc, &name, slices, &mut out.errors) {
            Ok(entries) => {
                for entry in entries {
                    if let Some(existing) = out.state.get(&entry.frontend) {
                        out.errors.push(TranslateError {
                            object: format!("Service {name}"),
                            reason: format!(
                                "frontend {} is already used by Service {}",
                                entry.frontend, existing.service
                            ),
                        });
                        continue;
                    }
                    out.state.insert(entry);
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

/// Keeps the previous entries of Services that failed as a whole, so a bad
/// edit does not take down what was already serving.
pub fn carry_over_failed(translation: &mut Translation, previous: &DesiredState) {
    for (frontend, entry) in previous.entries() {
        if translation.failed_services.contains(&entry.service)
            && translation.state.get(frontend).is_none()
        {
            translation.state.insert(entry.clone());
        }
    }
}

/// Translates one Service with its slices: its entries, or why the whole
/// Service cannot be programmed. Per-port problems go to `errors`.
pub fn translate_service(
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
    let addr: Ipv4Addr = match cluster_ip.parse() {
        Ok(addr) => addr,
        Err(_) if cluster_ip.parse::<std::net::Ipv6Addr>().is_ok() => {
            return Err(format!(
                "clusterIP {cluster_ip} is IPv6, which the data path does not serve yet"
            ));
        }
        Err(_) => return Err(format!("clusterIP {cluster_ip:?} is not an IP address")),
    };

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
        let Ok(svc_port) = u16::try_from(port.port) else {
            errors.push(TranslateError {
                object,
                reason: format!("port {} is out of range", port.port),
            });
            continue;
        };
        if svc_port == 0 {
            errors.push(TranslateError {
                object,
                reason: "port 0 is not valid".into(),
            });
            continue;
        }
        let mut backends = BTreeSet::new();
        for slice in slices {
            collect_backends(slice, &port_name, proto, &mut backends, errors);
        }
        if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            errors.push(TranslateError {
                object,
                reason: format!(
                    "{} backends exceed the data path's limit of {MAX_BACKENDS_PER_SERVICE} per Service port",
                    backends.len()
                ),
            });
            continue;
        }
        entries.push(ServiceEntry {
            service: name.clone(),
            port_name,
            frontend: L4Addr {
                addr,
                port: svc_port,
                proto,
            },
            backends: backends.into_iter().collect(),
            flags: SVC_FLAG_CLUSTER_IP,
        });
    }
    Ok(entries)
}

/// Adds the ready endpoints of `slice` for the Service port named
/// `port_name` (matched by name and protocol, as kube-proxy does).
fn collect_backends(
    slice: &EndpointSlice,
    port_name: &str,
    proto: Protocol,
    out: &mut BTreeSet<L4Addr>,
    errors: &mut Vec<TranslateError>,
) {
    if slice.address_type != "IPv4" {
        return;
    }
    let slice_name = slice.metadata.name.as_deref().unwrap_or("");
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
        // A nil `ready` means unknown, which consumers treat as ready.
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        if !ready {
            continue;
        }
        // All addresses of an endpoint are fungible; use the first, like kube-proxy.
        let Some(first) = endpoint.addresses.first() else {
            continue;
        };
        match first.parse::<Ipv4Addr>() {
            Ok(addr) => {
                out.insert(L4Addr {
                    addr,
                    port: port_number,
                    proto,
                });
            }
            Err(_) => errors.push(TranslateError {
                object: format!("EndpointSlice {slice_name}"),
                reason: format!("endpoint address {first:?} is not an IPv4 address"),
            }),
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
            http.backends,
            vec![
                addr("10.244.0.4", 8080, Protocol::Tcp),
                addr("10.244.0.5", 8080, Protocol::Tcp)
            ]
        );
        assert_eq!(http.port_name, "http");
        let dns = &t.state.entries()[&addr("10.96.0.10", 53, Protocol::Udp)];
        assert_eq!(
            dns.backends,
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
        assert_eq!(http.backends, vec![addr("10.244.0.6", 8080, Protocol::Tcp)]);
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
        assert_eq!(http.backends.len(), 2);
    }

    #[test]
    fn service_without_endpoints_still_has_a_frontend() {
        let t = translate(&[web_service()], NO_SLICES);
        let http = &t.state.entries()[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert!(
            http.backends.is_empty(),
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
        assert_eq!(db.backends, vec![addr("192.0.2.42", 5432, Protocol::Tcp)]);
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
        carry_over_failed(&mut t, &good.state);
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
}
