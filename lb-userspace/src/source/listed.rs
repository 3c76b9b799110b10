//! How the watches and the manifest source decode Services and
//! EndpointSlices: Services into the Kubernetes type, EndpointSlices'
//! endpoints straight into what translation keeps, both without what
//! translation never reads.
//!
//! A real API server sends every object with its `managedFields` (a tree
//! of field names per field manager) and, for objects applied with
//! kubectl, the `last-applied-configuration` annotation (the whole object
//! again, as text). Decoded as they come, those are most of the
//! allocations of a list and most of a page's size while the watch
//! converts it. Here they are skipped while parsing: metadata keeps the
//! name, namespace, resourceVersion (the watch resumes from it), uid,
//! labels, and the annotations translation reads.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec, ServiceStatus},
        discovery::v1::{EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{
    de::{IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};

use super::objects::{Addr, EndpointInfo, SliceInfo, ANNOTATIONS_READ};

/// A Service as the watch keeps it (see the module's note).
#[derive(Clone, Debug)]
pub struct ListedService(pub Service);

/// An EndpointSlice as the watch keeps it (see the module's note), its
/// endpoints read as translation keeps them: a large cluster has ten of
/// them for every Service, and their Kubernetes type holds each address,
/// node name and target reference in a string of its own.
#[derive(Clone, Debug)]
pub struct ListedSlice {
    metadata: ObjectMeta,
    address_type: String,
    ports: Vec<EndpointPort>,
    endpoints: Vec<EndpointInfo>,
}

impl From<ListedSlice> for SliceInfo {
    fn from(s: ListedSlice) -> Self {
        SliceInfo::from_parts(&s.metadata, &s.address_type, &s.ports, s.endpoints)
    }
}

/// The metadata fields kept; any other is skipped unread.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<AnnotationsRead>,
}

impl From<Metadata> for ObjectMeta {
    fn from(m: Metadata) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            resource_version: m.resource_version,
            uid: m.uid,
            labels: m.labels,
            annotations: m.annotations.map(|a| a.0),
            ..ObjectMeta::default()
        }
    }
}

/// The annotations translation reads (`ANNOTATIONS_READ`); the values of
/// the others are skipped unread.
struct AnnotationsRead(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for AnnotationsRead {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(AnnotationsVisitor)
    }
}

struct AnnotationsVisitor;

impl<'de> Visitor<'de> for AnnotationsVisitor {
    type Value = AnnotationsRead;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of annotations")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = BTreeMap::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if ANNOTATIONS_READ.contains(&key.as_ref()) {
                kept.insert(key.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(AnnotationsRead(kept))
    }
}

#[derive(Deserialize)]
struct ServiceFields {
    #[serde(default)]
    metadata: Metadata,
    spec: Option<ServiceSpec>,
    status: Option<ServiceStatus>,
}

impl<'de> Deserialize<'de> for ListedService {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = ServiceFields::deserialize(d)?;
        Ok(ListedService(Service {
            metadata: f.metadata.into(),
            spec: f.spec,
            status: f.status,
        }))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceFields {
    #[serde(default)]
    metadata: Metadata,
    address_type: Option<String>,
    endpoints: Option<Vec<EndpointRead>>,
    ports: Option<Vec<EndpointPort>>,
}

impl<'de> Deserialize<'de> for ListedSlice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SliceFields::deserialize(d).map(ListedSlice::of)
    }
}

impl ListedSlice {
    fn of(f: SliceFields) -> Self {
        let mut endpoints: Vec<EndpointInfo> =
            (f.endpoints.into_iter().flatten()).map(|e| e.0).collect();
        // A list read from text grows by doubling: kept as it is, most
        // slices would hold room for as many endpoints again.
        endpoints.shrink_to_fit();
        ListedSlice {
            metadata: f.metadata.into(),
            address_type: f.address_type.unwrap_or_default(),
            ports: f.ports.unwrap_or_default(),
            endpoints,
        }
    }
}

/// A manifest document of any kind read in one pass: what a Service and
/// an EndpointSlice hold (a Service's spec and status kept as YAML until
/// the kind is known), any other field skipped unread. Read through a
/// generic YAML value first, a slice's endpoints were most of the
/// manifest source's reading time.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ManifestFields {
    pub(crate) kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    spec: Option<serde_yaml::Value>,
    status: Option<serde_yaml::Value>,
    address_type: Option<String>,
    endpoints: Option<Vec<EndpointRead>>,
    ports: Option<Vec<EndpointPort>>,
    /// A `List`'s objects (what `kubectl get -o yaml` writes), each read
    /// as a document of its own once the kind is known.
    items: Option<Vec<serde_yaml::Value>>,
}

/// A manifest document by kind.
#[expect(
    clippy::large_enum_variant,
    reason = "one at a time, moved once into the set"
)]
pub(crate) enum Manifest {
    Service(ListedService),
    Slice(ListedSlice),
    /// A `List` or a typed list (`ServiceList`, ...): its items, and the
    /// kind a typed list gives items that do not name their own.
    List {
        items: Vec<serde_yaml::Value>,
        item_kind: Option<String>,
    },
    /// A kind this agent does not read (Deployments, ConfigMaps, ...).
    Other,
}

impl ManifestFields {
    /// The document's name, for messages.
    pub(crate) fn name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }

    /// The object, by its kind; an error when a Service's spec or status
    /// is not one.
    pub(crate) fn into_manifest(self) -> Result<Manifest, serde_yaml::Error> {
        Ok(match self.kind.as_deref() {
            Some("Service") => Manifest::Service(ListedService(Service {
                metadata: self.metadata.into(),
                spec: self.spec.map(serde_yaml::from_value).transpose()?,
                status: self.status.map(serde_yaml::from_value).transpose()?,
            })),
            Some("EndpointSlice") => Manifest::Slice(ListedSlice::of(SliceFields {
                metadata: self.metadata,
                address_type: self.address_type,
                endpoints: self.endpoints,
                ports: self.ports,
            })),
            Some(list) if list.ends_with("List") => Manifest::List {
                items: self.items.unwrap_or_default(),
                item_kind: (list.strip_suffix("List"))
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned),
            },
            _ => Manifest::Other,
        })
    }

    /// Reads one item of a list; `item_kind` stands for a kind it does not
    /// name.
    pub(crate) fn of_item(
        item: serde_yaml::Value,
        item_kind: Option<&str>,
    ) -> Result<Self, serde_yaml::Error> {
        let mut fields: ManifestFields = serde_yaml::from_value(item)?;
        if fields.kind.as_deref().is_none_or(str::is_empty) {
            fields.kind = item_kind.map(str::to_owned);
        }
        Ok(fields)
    }
}

/// An endpoint read straight into what translation keeps: its text
/// borrowed from the response where it can be, its other fields
/// (`targetRef`, `hostname`, `zone`) skipped unread.
struct EndpointRead(EndpointInfo);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointFields<'a> {
    addresses: Option<FirstAddress>,
    conditions: Option<EndpointConditions>,
    #[serde(borrow)]
    node_name: Option<Cow<'a, str>>,
    hints: Option<EndpointHints>,
}

impl<'de> Deserialize<'de> for EndpointRead {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = EndpointFields::deserialize(d)?;
        Ok(EndpointRead(EndpointInfo::from_parts(
            f.addresses.and_then(|a| a.0),
            f.conditions.as_ref(),
            f.node_name.as_deref(),
            f.hints.as_ref(),
        )))
    }
}

/// The first of an endpoint's addresses (kube-proxy uses the first);
/// the others are skipped unread.
struct FirstAddress(Option<Addr>);

impl<'de> Deserialize<'de> for FirstAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(FirstAddressVisitor)
    }
}

struct FirstAddressVisitor;

impl<'de> Visitor<'de> for FirstAddressVisitor {
    type Value = FirstAddress;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of addresses")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let first = seq.next_element::<Cow<'de, str>>()?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(FirstAddress(first.as_deref().map(Addr::parse)))
    }
}

/// The API resource of a wrapper is its Kubernetes type's.
macro_rules! resource_of {
    ($listed:ty, $k8s:ty, $($meta:tt).+) => {
        impl kube::Resource for $listed {
            type DynamicType = ();
            type Scope = <$k8s as k8s_openapi::Resource>::Scope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$k8s as k8s_openapi::Resource>::KIND.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$k8s as k8s_openapi::Resource>::GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$k8s as k8s_openapi::Resource>::VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$k8s as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.$($meta).+
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.$($meta).+
            }
        }
    };
}

resource_of!(ListedService, Service, 0.metadata);
resource_of!(ListedSlice, EndpointSlice, metadata);

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::Service, api::discovery::v1::EndpointSlice};
    use kube::core::WatchEvent;
    use serde_json::json;

    use super::*;
    use crate::source::objects::{ServiceInfo, SliceInfo, LB_MODE_ANNOTATION};

    /// A Service as a real API server serves one applied with kubectl.
    fn served_service() -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1",
                "resourceVersion": "42", "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"app": "web"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"Service\"}\n",
                    "example.com/owner": "team-a",
                    LB_MODE_ANNOTATION: "dsr"},
                "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                    "apiVersion": "v1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:ports": {}, "f:type": {}}}}]},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                    "targetPort": 8080, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}})
    }

    #[test]
    fn a_service_keeps_what_translation_reads_and_nothing_else() {
        let served = served_service();
        let listed: ListedService = serde_json::from_value(served.clone()).unwrap();
        let full: Service = serde_json::from_value(served).unwrap();
        assert_eq!(ServiceInfo::from(&listed.0), ServiceInfo::from(&full));
        let meta = &listed.0.metadata;
        assert_eq!(meta.managed_fields, None);
        assert_eq!(meta.creation_timestamp, None);
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert_eq!(meta.uid.as_deref(), Some("u-1"));
        let kept: Vec<&str> = meta
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(kept, [LB_MODE_ANNOTATION]);
        assert_eq!(listed.0.status, full.status);
    }

    #[test]
    fn a_slice_without_endpoints_or_ports_decodes_as_empty() {
        let served = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                    "2026-12-03T10:00:00Z"}},
            "addressType": "IPv4", "endpoints": null});
        let listed: ListedSlice = serde_json::from_value(served.clone()).unwrap();
        let full: EndpointSlice = serde_json::from_value(served).unwrap();
        assert!(listed.endpoints.is_empty());
        assert_eq!(SliceInfo::from(listed), SliceInfo::from(&full));
    }

    /// Read from text, as the watch reads a response: strings without
    /// escapes are borrowed, those with escapes copied.
    #[test]
    fn a_served_slice_reads_as_its_kubernetes_type_does() {
        let served = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "shop", "resourceVersion": "9",
                "generateName": "web-", "uid": "u-9",
                "labels": {"kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "managedFields": [{"manager": "kube-controller-manager"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5", "10.244.1.6"],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "node-a", "zone": "zone-1", "hostname": "web-0",
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0",
                        "uid": "p-1"},
                    "hints": {"forZones": [{"name": "zone-1"}]}},
                {"addresses": ["10.244.2.7"], "conditions": {"ready": false,
                    "terminating": true}, "nodeName": "node-b"},
                {"addresses": ["not-an-address"], "conditions": {}},
                {"addresses": []}]});
        let text = serde_json::to_string(&served)
            .unwrap()
            .replace("node-b", r"node\u002db");
        let listed: ListedSlice = serde_json::from_str(&text).unwrap();
        let full: EndpointSlice = serde_json::from_str(&text).unwrap();
        assert_eq!(listed.metadata.resource_version.as_deref(), Some("9"));
        let (listed, full) = (SliceInfo::from(listed), SliceInfo::from(&full));
        assert_eq!(listed, full);
        assert_eq!(listed.endpoints.len(), 4);
        assert_eq!(listed.endpoints[1].node.as_deref(), Some("node-b"));
    }

    #[test]
    fn a_watch_event_decodes_whatever_its_field_order() {
        for event in [
            json!({"type": "MODIFIED", "object": served_service()}),
            json!({"object": served_service(), "type": "MODIFIED"}),
        ] {
            let text = serde_json::to_vec(&event).unwrap();
            let decoded: WatchEvent<ListedService> = serde_json::from_slice(&text).unwrap();
            let WatchEvent::Modified(s) = decoded else {
                panic!("not a MODIFIED event: {decoded:?}");
            };
            assert_eq!(s.0.metadata.name.as_deref(), Some("web"));
        }
    }
}
