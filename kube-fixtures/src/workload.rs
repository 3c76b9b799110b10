//! The control plane the lab does not have: Deployments, ReplicaSets and
//! Services read from manifests become the pods and EndpointSlices that the
//! Kubernetes controllers would create for them, so the examples users know
//! run unchanged. Pure: no I/O, no processes, deterministic output.
//!
//! What is imitated, and from where:
//! - pod names: `<deployment>-<pod-template-hash>-<5 chars>` and
//!   `<replicaset>-<5 chars>`, in the alphabet Kubernetes uses for generated
//!   names (the random parts are derived from names and indexes here);
//! - the API server's validation of workload selectors and container ports;
//! - the EndpointSlice controller: label selection, named targetPorts matched
//!   by name and protocol, one slice per distinct resolved port list, at most
//!   100 endpoints per slice, a placeholder slice when nothing matches, and
//!   the `ready`/`serving`/`terminating` conditions.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        core::v1::{
            Container, ObjectReference, PodTemplateSpec, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use serde::Deserialize;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the controller that owns an EndpointSlice.
pub(crate) const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] the in-tree controller writes.
pub(crate) const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// Label the Deployment controller adds to the pods (and ReplicaSet) of one template.
pub(crate) const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// Label the EndpointSlice controller puts on the slices of headless Services.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The EndpointSlice controller's default `--max-endpoints-per-slice`.
pub(crate) const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// Characters of generated names: no vowels (no accidental words) and no
/// look-alikes such as 0/o or 1/l (from Kubernetes' `util/rand`).
const NAME_ALPHABET: &[u8; 27] = b"bcdfghjklmnpqrstvwxz2456789";
/// Length of the random part of a `generateName`.
const SUFFIX_LEN: usize = 5;
/// A `generateName` base is cut so that base + suffix fits a 63-char label.
const MAX_GENERATE_NAME_BASE: usize = 63 - SUFFIX_LEN;
const DEFAULT_NAMESPACE: &str = "default";
const DEFAULT_PROTOCOL: &str = "TCP";

/// One manifest object the lab understands.
#[derive(Clone, Debug, PartialEq)]
pub enum LabObject {
    Deployment(Deployment),
    ReplicaSet(ReplicaSet),
    Service(Service),
}

impl LabObject {
    pub fn kind(&self) -> &'static str {
        match self {
            LabObject::Deployment(_) => "Deployment",
            LabObject::ReplicaSet(_) => "ReplicaSet",
            LabObject::Service(_) => "Service",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            LabObject::Deployment(d) => &d.metadata,
            LabObject::ReplicaSet(r) => &r.metadata,
            LabObject::Service(s) => &s.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// The object's namespace, `default` when the manifest names none.
    pub fn namespace(&self) -> &str {
        namespace_of(self.metadata())
    }

    /// `Kind namespace/name`, for messages.
    fn describe(&self) -> String {
        format!("{} {}/{}", self.kind(), self.namespace(), self.name())
    }
}

/// A pod the lab must create.
#[derive(Clone, Debug, PartialEq)]
pub struct LabPod {
    /// Unique in its namespace, e.g. `nginx-deployment-7c5b4f9d8-x2k9q`.
    pub name: String,
    pub namespace: String,
    /// The template's labels, plus `pod-template-hash` for Deployment pods
    /// (as the Deployment controller adds it).
    pub labels: BTreeMap<String, String>,
    /// `Deployment/<name>` or `ReplicaSet/<name>`.
    pub owner: String,
    /// The ports of every container of the template (sidecars included).
    pub ports: Vec<ContainerPort>,
    pub ip: Ipv4Addr,
    /// Created ready; the lab flips it to imitate failing readiness probes.
    pub ready: bool,
    /// Being deleted (its grace period runs): not ready, still serving
    /// while `ready` (its probe) holds.
    pub terminating: bool,
    pub node_name: String,
}

/// A pod's IPv6 address beside its IPv4 one `a.b.c.d`: `fd00:a:b:c::d`,
/// the decimal octets written as the hex groups (10.244.1.5 becomes
/// fd00:10:244:1::5), so one can be read off the other and node k's pods
/// (10.244.k.0/24) are fd00:10:244:k::/64.
pub fn pod_ip6(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    // A decimal octet read as hex is at most 0x255: it fits a group.
    let group = |octet: u8| u16::from_str_radix(&octet.to_string(), 16).expect("decimal digits");
    Ipv6Addr::new(0xfd00, group(a), group(b), group(c), 0, 0, 0, group(d))
}

impl LabPod {
    /// The pod's IPv6 address (see `pod_ip6`).
    pub fn ip6(&self) -> Ipv6Addr {
        pod_ip6(self.ip)
    }

    /// The pod's address of family `family` (`IPv4` or `IPv6`).
    pub fn ip_of_family(&self, family: &str) -> IpAddr {
        if family == "IPv6" {
            IpAddr::V6(self.ip6())
        } else {
            IpAddr::V4(self.ip)
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`; `TCP` when the manifest names none.
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadError {
    /// Document `document` (1-based) of a YAML stream could not be read.
    Parse { document: usize, reason: String },
    /// An object the API server would have rejected.
    Invalid { object: String, reason: String },
    /// The address pool ran dry before `pod` got an IP.
    OutOfAddresses { pod: String },
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::Parse { document, reason } => write!(f, "document {document}: {reason}"),
            WorkloadError::Invalid { object, reason } => write!(f, "{object}: {reason}"),
            WorkloadError::OutOfAddresses { pod } => {
                write!(f, "no pod address left for pod {pod}")
            }
        }
    }
}

impl std::error::Error for WorkloadError {}

/// Parses a multi-document YAML stream. Kinds other than apps/v1 Deployment
/// and ReplicaSet and v1 Service are skipped and noted in the returned
/// strings; a document that cannot be read is an error naming its 1-based
/// index and the reason.
pub fn parse_lab_objects(yaml: &str) -> Result<(Vec<LabObject>, Vec<String>), WorkloadError> {
    let mut objects = Vec::new();
    let mut skipped = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let document = i + 1;
        let error = |reason: String| WorkloadError::Parse { document, reason };
        let value = match serde_yaml::Value::deserialize(doc) {
            // Empty documents (a leading `---`, comments only) are not objects.
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => return Err(error(e.to_string())),
        };
        let field = |key: &str| value.get(key).and_then(serde_yaml::Value::as_str);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            return Err(error(
                "not a Kubernetes object: apiVersion or kind is missing".into(),
            ));
        };
        let (api_version, kind) = (api_version.to_owned(), kind.to_owned());
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("")
            .to_owned();
        // Match on apiVersion too: a Knative `Service` is not a core Service.
        let object = match (api_version.as_str(), kind.as_str()) {
            ("apps/v1", "Deployment") => serde_yaml::from_value(value).map(LabObject::Deployment),
            ("apps/v1", "ReplicaSet") => serde_yaml::from_value(value).map(LabObject::ReplicaSet),
            ("v1", "Service") => serde_yaml::from_value(value).map(LabObject::Service),
            _ => {
                skipped.push(format!(
                    "document {document}: {api_version} {kind} {name:?} skipped \
                     (the lab reads apps/v1 Deployment and ReplicaSet, and v1 Service)"
                ));
                continue;
            }
        }
        .map_err(|e| error(format!("{kind} {name:?}: {e}")))?;
        if name.is_empty() {
            return Err(error(format!("{kind}: metadata.name is missing")));
        }
        objects.push(object);
    }
    Ok((objects, skipped))
}

/// The parts of a Deployment or ReplicaSet that make pods.
struct Workload<'a> {
    object: &'a LabObject,
    replicas: usize,
    selector: &'a LabelSelector,
    /// `None` only when no pods are wanted.
    template: Option<&'a PodTemplateSpec>,
}

impl<'a> Workload<'a> {
    fn from_object(object: &'a LabObject) -> Result<Option<Self>, WorkloadError> {
        let invalid = |reason: &str| WorkloadError::Invalid {
            object: object.describe(),
            reason: reason.to_owned(),
        };
        let (replicas, selector, template) = match object {
            LabObject::Deployment(d) => {
                let spec = d.spec.as_ref().ok_or_else(|| invalid("spec is missing"))?;
                (spec.replicas, &spec.selector, Some(&spec.template))
            }
            LabObject::ReplicaSet(r) => {
                let spec = r.spec.as_ref().ok_or_else(|| invalid("spec is missing"))?;
                (spec.replicas, &spec.selector, spec.template.as_ref())
            }
            LabObject::Service(_) => return Ok(None),
        };
        if object.name().is_empty() {
            return Err(invalid("metadata.name is missing"));
        }
        // The API server defaults replicas to 1 and rejects negative counts.
        let replicas = usize::try_from(replicas.unwrap_or(1))
            .map_err(|_| invalid("spec.replicas must not be negative"))?;
        if replicas > 0 && template.is_none() {
            return Err(invalid("spec.template is missing"));
        }
        Ok(Some(Workload {
            object,
            replicas,
            selector,
            template,
        }))
    }

    /// The checks the API server makes before it stores the object; gives
    /// the pods' ports.
    fn validate(&self) -> Result<Vec<ContainerPort>, WorkloadError> {
        let invalid = |reason: String| WorkloadError::Invalid {
            object: self.object.describe(),
            reason,
        };
        let Some(template) = self.template else {
            return Ok(Vec::new());
        };
        let labels = template_labels(template);
        // apps/v1 requires a selector, and it must select the template's pods:
        // otherwise the controller would create pods forever.
        let selector_is_empty = self
            .selector
            .match_labels
            .as_ref()
            .is_none_or(std::collections::BTreeMap::is_empty)
            && self
                .selector
                .match_expressions
                .as_ref()
                .is_none_or(std::vec::Vec::is_empty);
        if selector_is_empty {
            return Err(invalid("spec.selector must not be empty".into()));
        }
        if !selector_matches(self.selector, &labels).map_err(invalid)? {
            return Err(invalid(
                "spec.selector does not match spec.template.metadata.labels".into(),
            ));
        }
        let spec = template
            .spec
            .as_ref()
            .ok_or_else(|| invalid("spec.template.spec is missing".into()))?;
        if spec.containers.is_empty() {
            return Err(invalid(
                "spec.template.spec.containers must not be empty".into(),
            ));
        }
        pod_ports(template).map_err(invalid)
    }
}

/// Expands every Deployment and ReplicaSet into `spec.replicas` pods
/// (default 1), in object order, taking IPs from `ips` in order. Every pod
/// is ready and placed on `node_name`. Names are derived from the objects
/// (and, for Deployments, from the pod template, so a changed template gives
/// new names as a rollout would), never random.
pub fn pods_for_workloads(
    objects: &[LabObject],
    ips: &mut dyn Iterator<Item = Ipv4Addr>,
    node_name: &str,
) -> Result<Vec<LabPod>, WorkloadError> {
    let mut taken = HashSet::new();
    let mut pods = Vec::new();
    for object in objects {
        let Some(workload) = Workload::from_object(object)? else {
            continue;
        };
        let ports = workload.validate()?;
        let Some(template) = workload.template else {
            continue;
        };
        let namespace = object.namespace();
        let mut labels = template_labels(template);
        let prefix = match object {
            LabObject::Deployment(_) => {
                let hash =
                    pod_template_hash(template).map_err(|reason| WorkloadError::Invalid {
                        object: object.describe(),
                        reason,
                    })?;
                labels.insert(POD_TEMPLATE_HASH_LABEL.into(), hash.clone());
                // The pods belong to the ReplicaSet `<deployment>-<hash>`.
                format!("{}-{hash}-", object.name())
            }
            _ => format!("{}-", object.name()),
        };
        for index in 0..workload.replicas {
            let name = generate_name(&prefix, namespace, index, &mut taken);
            let ip = ips.next().ok_or_else(|| WorkloadError::OutOfAddresses {
                pod: format!("{namespace}/{name}"),
            })?;
            pods.push(LabPod {
                name,
                namespace: namespace.to_owned(),
                labels: labels.clone(),
                owner: format!("{}/{}", object.kind(), object.name()),
                ports: ports.clone(),
                ip,
                ready: true,
                terminating: false,
                node_name: node_name.to_owned(),
            });
        }
    }
    Ok(pods)
}

/// The EndpointSlices the EndpointSlice controller would write for every
/// Service with a non-empty selector (selector-less Services are the user's
/// to fill; ExternalName Services have no endpoints). Endpoints are the pods
/// of the Service's namespace whose labels carry every key/value of the
/// selector. Pods are grouped by the list of Service ports they resolve, one
/// slice (or more, past [`MAX_ENDPOINTS_PER_SLICE`]) per group; a port a pod
/// cannot resolve (a named targetPort it lacks for that protocol) is left out
/// of that pod's list, as Kubernetes does. A Service that selects no pod
/// gets one empty placeholder slice, also as Kubernetes does.
pub fn endpoint_slices_for_services(objects: &[LabObject], pods: &[LabPod]) -> Vec<EndpointSlice> {
    let mut taken = HashSet::new();
    let mut slices = Vec::new();
    for object in objects {
        if let LabObject::Service(service) = object {
            slices.extend(slices_for_service(service, pods, &mut taken));
        }
    }
    slices
}

fn slices_for_service(
    service: &Service,
    pods: &[LabPod],
    taken: &mut HashSet<(String, String)>,
) -> Vec<EndpointSlice> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let namespace = namespace_of(&service.metadata);
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let service_ports = spec.ports.as_deref().unwrap_or_default();

    // Groups in order of first appearance, so the output follows pod order.
    let mut groups: Vec<(Vec<EndpointPort>, Vec<Endpoint>)> = Vec::new();
    let selected = pods.iter().filter(|pod| {
        pod.namespace == namespace
            && selector
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    });
    for pod in selected {
        let ports: Vec<EndpointPort> = service_ports
            .iter()
            .filter_map(|sp| {
                let port = resolve_target_port(sp, pod)?;
                Some(EndpointPort {
                    name: Some(sp.name.clone().unwrap_or_default()),
                    protocol: Some(service_port_protocol(sp).to_owned()),
                    port: Some(i32::from(port)),
                    app_protocol: sp.app_protocol.clone(),
                })
            })
            .collect();
        let endpoint = pod_endpoint(pod, publish_not_ready);
        match groups.iter_mut().find(|(p, _)| *p == ports) {
            Some((_, endpoints)) => endpoints.push(endpoint),
            None => groups.push((ports, vec![endpoint])),
        }
    }
    if groups.is_empty() {
        groups.push((Vec::new(), Vec::new()));
    }

    let mut slices = Vec::new();
    // One set of slices per address family, as the controller writes them
    // for a dual-stack Service.
    for family in service_families(spec) {
        for (ports, endpoints) in &groups {
            // `chunks` yields nothing for the placeholder's empty list.
            let chunks: Vec<&[Endpoint]> = if endpoints.is_empty() {
                vec![&[]]
            } else {
                endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).collect()
            };
            for chunk in chunks {
                let slice_name = generate_name(
                    &format!("{}-", service.metadata.name.as_deref().unwrap_or("")),
                    namespace,
                    slices.len(),
                    taken,
                );
                slices.push(EndpointSlice {
                    metadata: slice_metadata(service, slice_name),
                    address_type: family.clone(),
                    endpoints: chunk
                        .iter()
                        .map(|e| endpoint_of_family(e, &family))
                        .collect(),
                    // The API omits an empty list.
                    ports: (!ports.is_empty()).then(|| ports.clone()),
                });
            }
        }
    }
    slices
}

/// The address families a Service's endpoints are published in:
/// `ipFamilies`, else those of its cluster IPs, else IPv4 (what the API
/// server defaults on a single-stack IPv4 cluster).
fn service_families(spec: &ServiceSpec) -> Vec<String> {
    if let Some(families) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) {
        return families.clone();
    }
    let ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter());
    let mut families: Vec<String> = Vec::new();
    for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
        let family = if ip.is_ipv6() { "IPv6" } else { "IPv4" };
        if !families.iter().any(|f| f == family) {
            families.push(family.to_owned());
        }
    }
    if families.is_empty() {
        families.push("IPv4".to_owned());
    }
    families
}

/// An endpoint (built with the pod's IPv4 address) with its address in
/// `family`.
fn endpoint_of_family(endpoint: &Endpoint, family: &str) -> Endpoint {
    let mut e = endpoint.clone();
    if family == "IPv6" {
        e.addresses = e
            .addresses
            .iter()
            .map(|a| {
                a.parse()
                    .map_or_else(|_| a.clone(), |ip| pod_ip6(ip).to_string())
            })
            .collect();
    }
    e
}

fn slice_metadata(service: &Service, name: String) -> ObjectMeta {
    let service_name = service.metadata.name.clone().unwrap_or_default();
    // The controller copies the Service's labels, then sets its own.
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    let headless = service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    if headless {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        labels.remove(HEADLESS_LABEL);
    }
    labels.insert(SERVICE_NAME_LABEL.into(), service_name.clone());
    labels.insert(MANAGED_BY_LABEL.into(), ENDPOINTSLICE_CONTROLLER.into());
    ObjectMeta {
        generate_name: Some(format!("{service_name}-")),
        name: Some(name),
        namespace: Some(namespace_of(&service.metadata).to_owned()),
        labels: Some(labels),
        owner_references: Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Service".into(),
            name: service_name,
            uid: service.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..Default::default()
    }
}

fn pod_endpoint(pod: &LabPod, publish_not_ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![pod.ip.to_string()],
        conditions: Some(EndpointConditions {
            // publishNotReadyAddresses overrides `ready` only: `serving`
            // still tells the truth about the pod. A terminating pod is
            // never ready otherwise (the controller's compatibility rule).
            ready: Some(publish_not_ready || (pod.ready && !pod.terminating)),
            serving: Some(pod.ready),
            terminating: Some(pod.terminating),
        }),
        node_name: (!pod.node_name.is_empty()).then(|| pod.node_name.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_port_protocol(port: &ServicePort) -> &str {
    port.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL)
}

/// The pod's port for one Service port, as the EndpointSlice controller
/// finds it: a number is used as-is, a name must match a container port of
/// the same protocol, and a missing targetPort defaults to `port`.
fn resolve_target_port(service_port: &ServicePort, pod: &LabPod) -> Option<u16> {
    match &service_port.target_port {
        // The API server defaults an unset (or zero) targetPort to `port`.
        None | Some(IntOrString::Int(0)) => u16::try_from(service_port.port).ok(),
        Some(IntOrString::String(name)) if name.is_empty() => u16::try_from(service_port.port).ok(),
        Some(IntOrString::Int(number)) => u16::try_from(*number).ok().filter(|p| *p != 0),
        Some(IntOrString::String(name)) => {
            let protocol = service_port_protocol(service_port);
            pod.ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()) && p.protocol == protocol)
                .map(|p| p.port)
        }
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn template_labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// Ports of the containers, then of the sidecars (init containers that keep
/// running), the order in which Kubernetes searches them for a named port.
fn pod_ports(template: &PodTemplateSpec) -> Result<Vec<ContainerPort>, String> {
    let Some(spec) = template.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let containers: Vec<&Container> = spec.containers.iter().chain(sidecars).collect();
    let mut ports = Vec::new();
    for container in containers {
        for port in container.ports.iter().flatten() {
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    format!(
                        "container {:?}: containerPort {} is not in 1-65535",
                        container.name, port.container_port
                    )
                })?;
            let protocol = port.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL);
            if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
                return Err(format!(
                    "container {:?}: protocol {protocol:?} is not TCP, UDP or SCTP",
                    container.name
                ));
            }
            ports.push(ContainerPort {
                name: port.name.clone().filter(|n| !n.is_empty()),
                port: number,
                protocol: protocol.to_owned(),
            });
        }
    }
    Ok(ports)
}

/// Whether `selector` selects `labels`; an error for a malformed requirement.
fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let mut expressions_match = true;
    for requirement in selector.match_expressions.iter().flatten() {
        let values = requirement.values.as_deref().unwrap_or_default();
        let value = labels.get(&requirement.key);
        let key = &requirement.key;
        let matched = match requirement.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "selector requirement on {key:?}: values must not be empty for {}",
                    requirement.operator
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "selector requirement on {key:?}: values must be empty for {}",
                    requirement.operator
                ));
            }
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => {
                return Err(format!(
                    "selector requirement on {key:?}: unknown operator {other:?}"
                ));
            }
        };
        expressions_match &= matched;
    }
    Ok(labels_match && expressions_match)
}

/// The Deployment controller's pod-template-hash: FNV-1a (32 bit) of the
/// template, printed in decimal and mapped onto the name alphabet, which is
/// why real hashes hold only the characters of "bcdf456789". Kubernetes
/// hashes its own dump of the Go struct; the JSON stands in for it here.
fn pod_template_hash(template: &PodTemplateSpec) -> Result<String, String> {
    let json =
        serde_json::to_vec(template).map_err(|e| format!("spec.template cannot be hashed: {e}"))?;
    Ok(fnv1a32(&json)
        .to_string()
        .bytes()
        .map(|b| char::from(NAME_ALPHABET[usize::from(b) % NAME_ALPHABET.len()]))
        .collect())
}

/// `prefix` + 5 characters, unique within `namespace` among the names in
/// `taken`: what `metadata.generateName` gives, but derived from `prefix`
/// and `index` instead of random. A clash (unlikely) moves on to the next
/// candidate, as the API server's generator retries.
fn generate_name(
    prefix: &str,
    namespace: &str,
    index: usize,
    taken: &mut HashSet<(String, String)>,
) -> String {
    let base = truncate(prefix, MAX_GENERATE_NAME_BASE);
    let mut attempt = 0u64;
    loop {
        let mut h = fnv1a64(format!("{namespace}/{prefix}/{index}/{attempt}").as_bytes());
        let mut name = base.to_owned();
        for _ in 0..SUFFIX_LEN {
            name.push(char::from(NAME_ALPHABET[(h % 27) as usize]));
            h /= 27;
        }
        if taken.insert((namespace.to_owned(), name.clone())) {
            return name;
        }
        attempt += 1;
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    const NGINX: &str = include_str!("../../examples/nginx-deployment.yaml");
    const FRONTEND: &str = include_str!("../../examples/frontend-replicaset.yaml");

    fn ips() -> impl Iterator<Item = Ipv4Addr> {
        (2..=250).map(|i| Ipv4Addr::new(10, 244, 0, i))
    }

    fn parse(yaml: &str) -> Vec<LabObject> {
        let (objects, skipped) = parse_lab_objects(yaml).expect("manifest must parse");
        assert_eq!(skipped, Vec::<String>::new());
        objects
    }

    fn pods_of(objects: &[LabObject]) -> Vec<LabPod> {
        pods_for_workloads(objects, &mut ips(), "lab-node").expect("pods")
    }

    fn service(v: serde_json::Value) -> LabObject {
        let mut v = v;
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Service");
        LabObject::Service(serde_json::from_value(v).expect("test Service must deserialize"))
    }

    fn deployment(v: serde_json::Value) -> LabObject {
        let mut v = v;
        v["apiVersion"] = json!("apps/v1");
        v["kind"] = json!("Deployment");
        LabObject::Deployment(serde_json::from_value(v).expect("test Deployment must deserialize"))
    }

    fn simple_deployment(name: &str, replicas: i32, labels: serde_json::Value) -> LabObject {
        deployment(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "i"}]}
                }
            }
        }))
    }

    fn pod(name: &str, labels: &[(&str, &str)], ports: &[(&str, u16, &str)], last: u8) -> LabPod {
        LabPod {
            name: name.into(),
            namespace: "default".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            owner: "ReplicaSet/test".into(),
            ports: ports
                .iter()
                .map(|(n, port, proto)| ContainerPort {
                    name: Some((*n).into()),
                    port: *port,
                    protocol: (*proto).into(),
                })
                .collect(),
            ip: Ipv4Addr::new(10, 244, 0, last),
            ready: true,
            terminating: false,
            node_name: "lab-node".into(),
        }
    }

    /// (port name, protocol, port) of a slice, for compact assertions.
    fn slice_ports(slice: &EndpointSlice) -> Vec<(String, String, i32)> {
        slice
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap(),
                    p.protocol.clone().unwrap(),
                    p.port.unwrap(),
                )
            })
            .collect()
    }

    fn addresses(slice: &EndpointSlice) -> Vec<&str> {
        slice
            .endpoints
            .iter()
            .map(|e| e.addresses[0].as_str())
            .collect()
    }

    fn slices_of<'a>(slices: &'a [EndpointSlice], service: &str) -> Vec<&'a EndpointSlice> {
        slices
            .iter()
            .filter(|s| s.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL] == service)
            .collect()
    }

    fn in_alphabet(s: &str) -> bool {
        s.bytes().all(|b| NAME_ALPHABET.contains(&b))
    }

    #[test]
    fn nginx_example_makes_three_pods_and_one_slice() {
        let objects = parse(NGINX);
        assert_eq!(objects.len(), 2);
        let pods = pods_of(&objects);
        assert_eq!(pods.len(), 3);
        for (i, pod) in pods.iter().enumerate() {
            let parts: Vec<&str> = pod.name.rsplitn(3, '-').collect();
            let [suffix, hash, base] = parts[..] else {
                panic!("unexpected pod name {}", pod.name);
            };
            assert_eq!(base, "nginx-deployment");
            assert!(
                (1..=10).contains(&hash.len()) && in_alphabet(hash),
                "{hash}"
            );
            assert_eq!(suffix.len(), 5);
            assert!(in_alphabet(suffix), "{suffix}");
            assert_eq!(pod.labels["app"], "nginx");
            assert_eq!(pod.labels[POD_TEMPLATE_HASH_LABEL], hash);
            assert_eq!(pod.owner, "Deployment/nginx-deployment");
            assert_eq!(pod.namespace, "default");
            assert_eq!(pod.ip, Ipv4Addr::new(10, 244, 0, 2 + i as u8));
            assert_eq!(pod.node_name, "lab-node");
            assert!(pod.ready);
            assert_eq!(
                pod.ports,
                vec![
                    ContainerPort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: "TCP".into()
                    },
                    ContainerPort {
                        name: Some("http-udp".into()),
                        port: 80,
                        protocol: "UDP".into()
                    },
                ]
            );
        }

        let slices = endpoint_slices_for_services(&objects, &pods);
        assert_eq!(slices.len(), 1);
        let slice = &slices[0];
        assert_eq!(
            slice_ports(slice),
            vec![
                ("http".into(), "TCP".into(), 80),
                ("udp".into(), "UDP".into(), 80)
            ]
        );
        assert_eq!(addresses(slice), ["10.244.0.2", "10.244.0.3", "10.244.0.4"]);
        assert_eq!(slice.address_type, "IPv4");
        let meta = &slice.metadata;
        let name = meta.name.as_deref().unwrap();
        assert!(name.starts_with("my-nginx-") && name.len() == "my-nginx-".len() + 5);
        assert_eq!(meta.namespace.as_deref(), Some("default"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "my-nginx");
        assert_eq!(labels[MANAGED_BY_LABEL], ENDPOINTSLICE_CONTROLLER);
        assert_eq!(labels["run"], "my-nginx", "Service labels are copied");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Service", "my-nginx")
        );
        assert_eq!(owner.controller, Some(true));
        let endpoint = &slice.endpoints[0];
        let target = endpoint.target_ref.as_ref().unwrap();
        assert_eq!(target.kind.as_deref(), Some("Pod"));
        assert_eq!(target.name.as_deref(), Some(pods[0].name.as_str()));
        assert_eq!(endpoint.node_name.as_deref(), Some("lab-node"));
        assert_eq!(
            endpoint.conditions,
            Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false)
            })
        );
    }

    #[test]
    fn frontend_example_makes_four_pods_and_resolves_named_port() {
        let objects = parse(FRONTEND);
        assert_eq!(objects.len(), 3);
        let pods = pods_of(&objects);
        assert_eq!(pods.len(), 4);
        for pod in &pods {
            let suffix = pod.name.strip_prefix("frontend-").expect(&pod.name);
            assert!(suffix.len() == 5 && in_alphabet(suffix), "{}", pod.name);
            assert_eq!(pod.owner, "ReplicaSet/frontend");
            assert!(!pod.labels.contains_key(POD_TEMPLATE_HASH_LABEL));
        }
        let slices = endpoint_slices_for_services(&objects, &pods);
        assert_eq!(slices.len(), 2);
        for service in ["frontend", "frontend-nodeport"] {
            let of = slices_of(&slices, service);
            assert_eq!(of.len(), 1, "{service}");
            assert_eq!(slice_ports(of[0]), vec![(String::new(), "TCP".into(), 80)]);
            assert_eq!(of[0].endpoints.len(), 4);
        }
    }

    #[test]
    fn example_services_carry_cluster_ips_in_the_service_range() {
        for yaml in [NGINX, FRONTEND] {
            for object in parse(yaml) {
                let LabObject::Service(svc) = object else {
                    continue;
                };
                let ip: Ipv4Addr = svc
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .expect("clusterIP")
                    .parse()
                    .expect("IPv4 clusterIP");
                // 10.96.0.0/12
                assert_eq!(
                    u32::from(ip) >> 20,
                    u32::from(Ipv4Addr::new(10, 96, 0, 0)) >> 20
                );
            }
        }
    }

    #[test]
    fn other_kinds_are_skipped_and_noted() {
        let yaml = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\n---\n\
                    apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: kn}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: {clusterIP: 10.96.0.9}\n";
        let (objects, skipped) = parse_lab_objects(yaml).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!((objects[0].kind(), objects[0].name()), ("Service", "svc"));
        assert_eq!(objects[0].namespace(), "default");
        assert_eq!(skipped.len(), 2);
        assert!(skipped[0].starts_with("document 1:") && skipped[0].contains("ConfigMap"));
        assert!(skipped[1].starts_with("document 2:") && skipped[1].contains("knative"));
    }

    #[test]
    fn bad_documents_are_errors_naming_the_document() {
        let wrong_type = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n\
                          apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\nspec: {replicas: many}\n";
        match parse_lab_objects(wrong_type) {
            Err(WorkloadError::Parse {
                document: 2,
                reason,
            }) => {
                assert!(reason.contains("Deployment"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let no_kind = "metadata: {name: a}\n";
        assert!(matches!(
            parse_lab_objects(no_kind),
            Err(WorkloadError::Parse { document: 1, .. })
        ));
        let syntax = "apiVersion: v1\nkind: Service\nmetadata: {name: a\n";
        assert!(matches!(
            parse_lab_objects(syntax),
            Err(WorkloadError::Parse { document: 1, .. })
        ));
        let unnamed = "apiVersion: v1\nkind: Service\nmetadata: {}\n";
        assert!(matches!(
            parse_lab_objects(unnamed),
            Err(WorkloadError::Parse { document: 1, .. })
        ));
    }

    #[test]
    fn selector_must_match_every_key() {
        let objects = [service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "web", "tier": "front"},
                     "ports": [{"port": 80}]}
        }))];
        let pods = [
            pod(
                "both",
                &[("app", "web"), ("tier", "front"), ("x", "y")],
                &[],
                2,
            ),
            pod("app-only", &[("app", "web")], &[], 3),
            pod("wrong-value", &[("app", "web"), ("tier", "back")], &[], 4),
        ];
        let slices = endpoint_slices_for_services(&objects, &pods);
        assert_eq!(slices.len(), 1);
        assert_eq!(addresses(&slices[0]), ["10.244.0.2"]);
        assert_eq!(
            slice_ports(&slices[0]),
            vec![(String::new(), "TCP".into(), 80)]
        );
    }

    #[test]
    fn services_only_select_pods_of_their_namespace() {
        let objects = [service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "web"}, "ports": [{"port": 80}]}
        }))];
        let mut in_shop = pod("a", &[("app", "web")], &[], 3);
        in_shop.namespace = "shop".into();
        let pods = [pod("b", &[("app", "web")], &[], 2), in_shop];
        let slices = endpoint_slices_for_services(&objects, &pods);
        assert_eq!(slices.len(), 1);
        assert_eq!(addresses(&slices[0]), ["10.244.0.3"]);
        assert_eq!(slices[0].metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn named_target_port_matches_name_and_protocol() {
        let objects = [service(json!({
            "metadata": {"name": "dns"},
            "spec": {"clusterIP": "10.96.0.53", "selector": {"app": "dns"}, "ports": [
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns"},
                {"name": "dns-udp", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                {"name": "metrics", "port": 9153, "targetPort": 9100},
                {"name": "same", "port": 8080}
            ]}
        }))];
        // The same name on both protocols with different numbers.
        let pods = [pod(
            "dns-1",
            &[("app", "dns")],
            &[("dns", 5353, "TCP"), ("dns", 5354, "UDP")],
            2,
        )];
        let slices = endpoint_slices_for_services(&objects, &pods);
        assert_eq!(slices.len(), 1);
        assert_eq!(
            slice_ports(&slices[0]),
            vec![
                ("dns-tcp".into(), "TCP".into(), 5353),
                ("dns-udp".into(), "UDP".into(), 5354),
                ("metrics".into(), "TCP".into(), 9100),
                ("same".into(), "TCP".into(), 8080),
            ]
        );
    }

    #[test]
    fn tcp_named_port_is_not_used_for_a_udp_service_port() {
        let objects = [service(json!({
            "metadata": {"name": "dns"},
            "spec": {"clusterIP": "10.96.0.53", "selector": {"app": "dns"}, "ports": [
                {"name": "dns-udp", "port": 53, "protocol": "UDP", "targetPort": "dns"}
            ]}
        }))];
        let pods = [pod("dns-1", &[("app", "dns")], &[("dns", 5353, "TCP")], 2)];
        let slices = endpoint_slices_for_services(&objects, &pods);
        // The pod is selected but resolves no port: its slice lists none, so
        // no consumer sends UDP to it.
        assert_eq!(slices.len(), 1);
        assert_eq!(slice_ports(&slices[0]), vec![]);
        assert_eq!(slices[0].ports, None);
        assert_eq!(addresses(&slices[0]), ["10.244.0.2"]);
    }

    #[test]
    fn different_numbers_for_a_port_name_make_separate_slices() {
        let objects = [service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 80}
            ]}
        }))];
        let pods = [
            pod("old-1", &[("app", "web")], &[("http", 8080, "TCP")], 2),
            pod("new-1", &[("app", "web")], &[("http", 9090, "TCP")], 3),
            pod("old-2", &[("app", "web")], &[("http", 8080, "TCP")], 4),
            pod("none", &[("app", "web")], &[("other", 1234, "TCP")], 5),
        ];
        let slices = endpoint_slices_for_services(&objects, &pods);
        assert_eq!(slices.len(), 3);
        assert_eq!(
            slice_ports(&slices[0]),
            vec![
                ("http".into(), "TCP".into(), 8080),
                ("udp".into(), "UDP".into(), 80)
            ]
        );
        assert_eq!(addresses(&slices[0]), ["10.244.0.2", "10.244.0.4"]);
        assert_eq!(
            slice_ports(&slices[1]),
            vec![
                ("http".into(), "TCP".into(), 9090),
                ("udp".into(), "UDP".into(), 80)
            ]
        );
        assert_eq!(addresses(&slices[1]), ["10.244.0.3"]);
        // Without the named port the pod still serves the numeric one.
        assert_eq!(
            slice_ports(&slices[2]),
            vec![("udp".into(), "UDP".into(), 80)]
        );
        assert_eq!(addresses(&slices[2]), ["10.244.0.5"]);
        let names: HashSet<_> = slices.iter().map(|s| s.metadata.name.clone()).collect();
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn not_ready_pods_are_listed_not_ready_unless_published() {
        let make = |publish: bool| {
            service(json!({
                "metadata": {"name": "web"},
                "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "web"},
                         "publishNotReadyAddresses": publish, "ports": [{"port": 80}]}
            }))
        };
        let mut sick = pod("sick", &[("app", "web")], &[], 3);
        sick.ready = false;
        let pods = [pod("well", &[("app", "web")], &[], 2), sick];
        let conditions = |publish: bool| -> Vec<(Option<bool>, Option<bool>, Option<bool>)> {
            let slices = endpoint_slices_for_services(&[make(publish)], &pods);
            assert_eq!(slices.len(), 1);
            slices[0]
                .endpoints
                .iter()
                .map(|e| {
                    let c = e.conditions.clone().unwrap();
                    (c.ready, c.serving, c.terminating)
                })
                .collect()
        };
        assert_eq!(
            conditions(false),
            [
                (Some(true), Some(true), Some(false)),
                (Some(false), Some(false), Some(false))
            ]
        );
        assert_eq!(
            conditions(true),
            [
                (Some(true), Some(true), Some(false)),
                (Some(true), Some(false), Some(false))
            ]
        );
    }

    #[test]
    fn selectorless_and_external_name_services_get_no_slice() {
        let objects = [
            service(json!({
                "metadata": {"name": "manual"},
                "spec": {"clusterIP": "10.96.0.40", "ports": [{"port": 80}]}
            })),
            service(json!({
                "metadata": {"name": "empty"},
                "spec": {"clusterIP": "10.96.0.41", "selector": {}, "ports": [{"port": 80}]}
            })),
            service(json!({
                "metadata": {"name": "external"},
                "spec": {"type": "ExternalName", "externalName": "example.com",
                         "selector": {"app": "web"}}
            })),
        ];
        let pods = [pod("web", &[("app", "web")], &[], 2)];
        assert_eq!(endpoint_slices_for_services(&objects, &pods), vec![]);
    }

    #[test]
    fn a_service_selecting_nothing_gets_an_empty_placeholder() {
        let objects = [service(json!({
            "metadata": {"name": "lonely"},
            "spec": {"clusterIP": "10.96.0.42", "selector": {"app": "nobody"}, "ports": [{"port": 80}]}
        }))];
        let slices =
            endpoint_slices_for_services(&objects, &[pod("web", &[("app", "web")], &[], 2)]);
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.is_empty());
        assert_eq!(slices[0].ports, None);
    }

    #[test]
    fn headless_services_get_slices_marked_headless() {
        let objects = [service(json!({
            "metadata": {"name": "db"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}
        }))];
        let slices = endpoint_slices_for_services(&objects, &[pod("db", &[("app", "db")], &[], 2)]);
        assert_eq!(slices.len(), 1);
        assert!(slices[0]
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key(HEADLESS_LABEL));
    }

    #[test]
    fn slices_hold_at_most_one_hundred_endpoints() {
        let objects = [
            simple_deployment("big", 150, json!({"app": "big"})),
            service(json!({
                "metadata": {"name": "big"},
                "spec": {"clusterIP": "10.96.0.43", "selector": {"app": "big"}, "ports": [{"port": 80}]}
            })),
        ];
        let mut pool =
            (0..150u32).map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i));
        let pods = pods_for_workloads(&objects, &mut pool, "n").unwrap();
        let slices = endpoint_slices_for_services(&objects, &pods);
        let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, [100, 50]);
        assert_ne!(slices[0].metadata.name, slices[1].metadata.name);
    }

    #[test]
    fn names_are_deterministic_and_unique() {
        let objects = [
            simple_deployment("web", 200, json!({"app": "web"})),
            // Same template, so the same pod-template-hash: names still differ.
            simple_deployment("web2", 3, json!({"app": "web"})),
            LabObject::ReplicaSet(
                serde_json::from_value(json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {"name": "web"},
                    "spec": {"replicas": 20, "selector": {"matchLabels": {"app": "rs"}},
                             "template": {"metadata": {"labels": {"app": "rs"}},
                                          "spec": {"containers": [{"name": "c"}]}}}
                }))
                .unwrap(),
            ),
        ];
        let mut pool = (0..=255u8).map(|i| Ipv4Addr::new(10, 244, 1, i));
        let first = pods_for_workloads(&objects, &mut pool, "n").unwrap();
        let mut pool = (0..=255u8).map(|i| Ipv4Addr::new(10, 244, 1, i));
        let second = pods_for_workloads(&objects, &mut pool, "n").unwrap();
        assert_eq!(first, second);
        assert_eq!(first.len(), 223);
        let names: HashSet<&str> = first.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), first.len());
        let ips: HashSet<Ipv4Addr> = first.iter().map(|p| p.ip).collect();
        assert_eq!(ips.len(), first.len());
        // A changed template is a new ReplicaSet, so new names, as in a rollout.
        let hash = |o: &LabObject| {
            pods_of(std::slice::from_ref(o))[0].labels[POD_TEMPLATE_HASH_LABEL].clone()
        };
        assert_eq!(hash(&objects[0]), hash(&objects[1]));
        assert_ne!(
            hash(&objects[0]),
            hash(&simple_deployment(
                "web",
                1,
                json!({"app": "web", "v": "2"})
            ))
        );
    }

    #[test]
    fn a_generated_name_clash_moves_on_to_another_name() {
        let mut taken = HashSet::new();
        let first = generate_name("web-", "default", 0, &mut taken);
        let again = generate_name("web-", "default", 0, &mut taken);
        assert_ne!(first, again);
        // Another namespace may hold the same name.
        assert_eq!(
            generate_name("web-", "other", 0, &mut taken).len(),
            first.len()
        );
        let long = "x".repeat(80);
        assert_eq!(generate_name(&long, "default", 0, &mut taken).len(), 63);
    }

    #[test]
    fn running_out_of_addresses_is_an_error() {
        let objects = parse(FRONTEND);
        let mut pool = (2..=4).map(|i| Ipv4Addr::new(10, 244, 0, i));
        match pods_for_workloads(&objects, &mut pool, "n") {
            Err(WorkloadError::OutOfAddresses { pod }) => {
                assert!(pod.starts_with("default/frontend-"), "{pod}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn replicas_default_to_one_and_zero_makes_none() {
        let mut one = simple_deployment("one", 1, json!({"app": "one"}));
        if let LabObject::Deployment(d) = &mut one {
            d.spec.as_mut().unwrap().replicas = None;
        }
        let zero = simple_deployment("zero", 0, json!({"app": "zero"}));
        let pods = pods_of(&[one, zero]);
        assert_eq!(pods.len(), 1);
        assert!(pods[0].name.starts_with("one-"));
    }

    #[test]
    fn workload_selector_must_select_the_template() {
        let with_selector = |selector: serde_json::Value| {
            deployment(json!({
                "metadata": {"name": "web"},
                "spec": {"selector": selector,
                         "template": {"metadata": {"labels": {"app": "web", "tier": "front"}},
                                      "spec": {"containers": [{"name": "c"}]}}}
            }))
        };
        let result = |selector| pods_for_workloads(&[with_selector(selector)], &mut ips(), "n");
        let is_invalid = |r: Result<Vec<LabPod>, WorkloadError>| match r {
            Err(WorkloadError::Invalid { object, .. }) => object == "Deployment default/web",
            _ => false,
        };
        assert!(result(json!({"matchLabels": {"app": "web"}})).is_ok());
        assert!(is_invalid(result(json!({"matchLabels": {"app": "api"}}))));
        assert!(is_invalid(result(json!({}))));
        assert!(result(json!({"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["web", "api"]},
            {"key": "tier", "operator": "Exists"},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "tier", "operator": "NotIn", "values": ["back"]}
        ]}))
        .is_ok());
        assert!(is_invalid(result(json!({"matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["front"]}
        ]}))));
        assert!(is_invalid(result(json!({"matchExpressions": [
            {"key": "app", "operator": "Like", "values": ["w*"]}
        ]}))));
        assert!(is_invalid(result(json!({"matchExpressions": [
            {"key": "app", "operator": "In"}
        ]}))));
    }

    #[test]
    fn bad_container_ports_are_rejected() {
        let with_port = |port: serde_json::Value| {
            deployment(json!({
                "metadata": {"name": "web"},
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "c", "ports": [port]}]}}}
            }))
        };
        for bad in [
            json!({"containerPort": 70000}),
            json!({"containerPort": 0}),
            json!({"containerPort": 80, "protocol": "ICMP"}),
        ] {
            assert!(
                matches!(
                    pods_for_workloads(&[with_port(bad.clone())], &mut ips(), "n"),
                    Err(WorkloadError::Invalid { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn sidecar_ports_count_but_plain_init_container_ports_do_not() {
        let objects = [deployment(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                         "initContainers": [
                             {"name": "init", "ports": [{"containerPort": 1, "name": "init"}]},
                             {"name": "proxy", "restartPolicy": "Always",
                              "ports": [{"containerPort": 15001, "name": "proxy"}]}
                         ],
                         "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]
                     }}}
        }))];
        let ports: Vec<(Option<String>, u16)> = pods_of(&objects)[0]
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.port))
            .collect();
        assert_eq!(ports, [(None, 8080), (Some("proxy".into()), 15001)]);
    }

    #[test]
    fn pod_ipv6_addresses_mirror_the_ipv4_ones() {
        assert_eq!(
            pod_ip6(Ipv4Addr::new(10, 244, 1, 5)),
            "fd00:10:244:1::5".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            pod_ip6(Ipv4Addr::new(10, 244, 0, 255)),
            "fd00:10:244:0::255".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn a_dual_stack_service_gets_one_slice_per_family_in_the_order_of_ip_families() {
        let mut objects = vec![simple_deployment("web", 2, json!({"app": "web"}))];
        objects.push(service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIPs": ["fd00:96::40", "10.96.0.40"], "ipFamilies": ["IPv6", "IPv4"],
                "ipFamilyPolicy": "RequireDualStack", "selector": {"app": "web"},
                "ports": [{"port": 80}]}
        })));
        let pods = pods_of(&objects);
        let slices = endpoint_slices_for_services(&objects, &pods);
        let families: Vec<&str> = slices.iter().map(|s| s.address_type.as_str()).collect();
        assert_eq!(families, ["IPv6", "IPv4"]);
        let addresses = |s: &EndpointSlice| -> Vec<String> {
            s.endpoints.iter().map(|e| e.addresses[0].clone()).collect()
        };
        let v4: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
        let v6: Vec<String> = pods.iter().map(|p| p.ip6().to_string()).collect();
        assert_eq!(addresses(&slices[0]), v6);
        assert_eq!(addresses(&slices[1]), v4);
        assert_ne!(slices[0].metadata.name, slices[1].metadata.name);
    }

    #[test]
    fn an_ipv6_only_service_gets_only_an_ipv6_slice() {
        let mut objects = vec![simple_deployment("web", 1, json!({"app": "web"}))];
        objects.push(service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "fd00:96::42", "selector": {"app": "web"},
                "ports": [{"port": 80}]}
        })));
        let slices = endpoint_slices_for_services(&objects, &pods_of(&objects));
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].address_type, "IPv6");
    }
}
