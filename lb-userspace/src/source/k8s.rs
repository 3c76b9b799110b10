//! The Kubernetes source: kube-rs watchers on Services, EndpointSlices and
//! this node, folded into an indexed store (a reflector that also knows which
//! slices belong to which Service), so a change re-translates only the
//! Services it touches. A relist (410 Gone, a dropped watch) ends in a full
//! resync that converges the maps and removes what no longer exists.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use crate::sorted_vec_set::SortedVecSet;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        watcher::{self, Event},
        WatchStreamExt,
    },
    Api, Client,
};
use tokio::sync::mpsc;

use crate::{
    model::ServiceName,
    source::{
        listed::{ListedService, ListedSlice},
        objects::{
            ServiceChange, ServiceInfo, SliceInfo, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL,
        },
    },
};

/// Objects this agent leaves alone, as kube-proxy does: Services of another
/// proxy, and headless ones (their slices carry the label too).
pub(crate) fn proxy_label_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// What the watches would deliver, read once (for `lb-agent check`):
/// Services, EndpointSlices and this node's zone label.
pub async fn list_once(
    client: Client,
    node_name: Option<&str>,
) -> Result<(Vec<ServiceInfo>, Vec<SliceInfo>, Option<String>)> {
    let params = kube::api::ListParams::default().labels(&proxy_label_selector());
    let services = Api::<Service>::all(client.clone())
        .list(&params)
        .await
        .context("listing Services")?
        .items;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&params)
        .await
        .context("listing EndpointSlices")?
        .items;
    let zone = match node_name {
        Some(name) => Api::<Node>::all(client)
            .get_opt(name)
            .await
            .with_context(|| format!("reading Node {name}"))?
            .and_then(|n| NodeFacts::from(&n).zone),
        None => None,
    };
    Ok((
        services.iter().map(ServiceInfo::from).collect(),
        slices.iter().map(SliceInfo::from).collect(),
        zone,
    ))
}

/// What the agent reads of its own Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// `topology.kubernetes.io/zone`, for topology hints.
    pub zone: Option<String>,
    /// Not being deleted and not tainted ToBeDeletedByClusterAutoscaler:
    /// kube-proxy's `/healthz` says 503 otherwise, so load balancers drain
    /// the node before it goes.
    pub eligible: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub(crate) const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl From<&Node> for NodeFacts {
    fn from(n: &Node) -> Self {
        let deleting = n.metadata.deletion_timestamp.is_some();
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        NodeFacts {
            zone: n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("topology.kubernetes.io/zone"))
                .cloned(),
            eligible: !deleting && !tainted,
        }
    }
}

/// A change from one of the watches, already in the slim form the store
/// keeps: each watch converts its objects on its own task, so the channel
/// (`CHANGES_IN_FLIGHT`) holds slim objects rather than whole Kubernetes
/// ones, and the conversion runs beside the store's work.
pub enum Change {
    Service(Event<ServiceInfo>),
    Slice(Event<SliceInfo>),
    Node(Event<NodeFacts>),
    /// The watch of `resource` failed (it retries with backoff).
    WatchError(&'static str, String),
}

/// Objects per page of a list. Each watch holds a page's whole objects
/// (with their managedFields) while it converts them. Through two relists
/// of 10,000 Services x 10 endpoints the agent's peak was 69.3-70.1 MiB at
/// 250, 66.7-67.7 at 100 and no lower at 50; lists took as long at 100 as
/// at 250 (kube's default is 500), 8% longer at 50.
const LIST_PAGE_SIZE: u32 = 100;

/// Changes the watches may have converted ahead of the store. During a
/// relist each is a second copy of an object the store still holds: at
/// 4,096 the agent's peak through relists of 10,000 Services x 10
/// endpoints was 2 MiB higher than at 256, and the lists no faster.
const CHANGES_IN_FLIGHT: usize = 256;

/// Starts the watches; their events arrive on the returned channel.
pub fn start_watches(client: Client, node_name: Option<String>) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(CHANGES_IN_FLIGHT);
    let selector = proxy_label_selector();
    let svc_cfg = watcher::Config::default()
        .labels(&selector)
        .page_size(LIST_PAGE_SIZE);
    spawn_watch(
        Api::<ListedService>::all(client.clone()),
        svc_cfg.clone(),
        tx.clone(),
        "services",
        |e| Change::Service(slim(e, |s: ListedService| ServiceInfo::from(s.0))),
    );
    spawn_watch(
        Api::<ListedSlice>::all(client.clone()),
        svc_cfg,
        tx.clone(),
        "endpointslices",
        |e| Change::Slice(slim(e, SliceInfo::from)),
    );
    if let Some(node) = node_name {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        spawn_watch(Api::<Node>::all(client), cfg, tx, "nodes", |e| {
            Change::Node(slim(e, |n: Node| NodeFacts::from(&n)))
        });
    }
    rx
}

/// The event with its object converted by `convert`.
fn slim<K, T>(event: Event<K>, convert: impl Fn(K) -> T) -> Event<T> {
    match event {
        Event::Apply(k) => Event::Apply(convert(k)),
        Event::Delete(k) => Event::Delete(convert(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(convert(k)),
        Event::InitDone => Event::InitDone,
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    tx: mpsc::Sender<Change>,
    resource: &'static str,
    wrap: fn(Event<K>) -> Change,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(ev) => wrap(ev),
                Err(e) => Change::WatchError(resource, e.to_string()),
            };
            if tx.send(change).await.is_err() {
                break;
            }
        }
    });
}

/// An EndpointSlice's identity: (namespace, name), the slice's own text.
type SliceKey = (Arc<str>, Arc<str>);

fn slice_key(s: &SliceInfo) -> SliceKey {
    (s.namespace.clone(), s.name.clone())
}

/// What a batch of changes asks of the programmer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub dirty: BTreeSet<ServiceName>,
    pub full_resync: bool,
    /// Watch restarts seen in this batch, per resource.
    pub restarts: Vec<&'static str>,
}

/// The store: every Service and EndpointSlice the watches report, indexed
/// by Service.
#[derive(Default)]
pub struct ClusterState {
    /// Boxed: a hash table keeps a slot for every fourth of its capacity
    /// empty, and a slot of the object itself (288 and 152 bytes) would
    /// make those dearer than the object's box.
    pub services: HashMap<ServiceName, Box<ServiceInfo>>,
    slices: HashMap<SliceKey, Box<SliceInfo>>,
    by_service: HashMap<ServiceName, SortedVecSet<SliceKey>>,
    pub node: Option<NodeFacts>,
    /// What a list (the first, or a relist) returned so far, None when
    /// none is under way. A list updates the store in place as its objects
    /// arrive (each is the API's current version), and what it did not
    /// return is deleted when it is done: the store never holds a large
    /// cluster twice. Until then, objects deleted while the watch was
    /// down are still there, as in a store that swaps the list in whole.
    listed_services: Option<HashSet<ServiceName>>,
    listed_slices: Option<HashSet<SliceKey>>,
    pub services_synced: bool,
    pub slices_synced: bool,
    /// Trigger times of slice changes not yet written, per Service.
    pending_triggers: HashMap<ServiceName, Vec<DateTime<Utc>>>,
}

impl ClusterState {
    pub fn synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }

    /// References, not copies: a full sync of a large cluster must not
    /// double the store in memory.
    pub fn all_services(&self) -> Vec<&ServiceInfo> {
        self.services.values().map(|s| &**s).collect()
    }

    pub fn all_slices(&self) -> Vec<&SliceInfo> {
        self.slices.values().map(|s| &**s).collect()
    }

    /// The Services in `names` with their slices, for an incremental sync.
    pub fn changes<'a>(&'a self, names: &BTreeSet<ServiceName>) -> Vec<ServiceChange<'a>> {
        names
            .iter()
            .map(|name| ServiceChange {
                name: name.clone(),
                service: self.services.get(name).map(|s| &**s),
                slices: self
                    .by_service
                    .get(name)
                    .map(|keys| {
                        keys.iter()
                            .filter_map(|k| self.slices.get(k).map(|s| &**s))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Takes the trigger times of changes now written, for the latency metric.
    pub fn take_triggers(
        &mut self,
        written: &BTreeSet<ServiceName>,
        all: bool,
    ) -> Vec<DateTime<Utc>> {
        if all {
            // Taken, not drained: after a first sync the table would keep
            // room for every Service.
            let pending = std::mem::take(&mut self.pending_triggers);
            return pending.into_values().flatten().collect();
        }
        written
            .iter()
            .filter_map(|n| self.pending_triggers.remove(n))
            .flatten()
            .collect()
    }

    /// Notes a slice's trigger time unless the version the store holds
    /// has it already (a relist or resync repeats objects).
    fn note_trigger(&mut self, slice: &SliceInfo) {
        let (Some(service), Some(t)) = (slice.service.clone(), slice.trigger_time) else {
            return;
        };
        let stored = self.slices.get(&slice_key(slice));
        if stored
            .and_then(|s| s.trigger_time)
            .is_some_and(|seen| seen >= t)
        {
            return;
        }
        self.pending_triggers.entry(service).or_default().push(t);
    }

    fn put_slice(&mut self, slice: SliceInfo, work: &mut Work) {
        let key = slice_key(&slice);
        if let Some(old) = self.slices.get(&key).and_then(|s| s.service.clone()) {
            if let Some(keys) = self.by_service.get_mut(&old) {
                keys.remove(&key);
            }
            work.dirty.insert(old);
        }
        if let Some(svc) = slice.service.clone() {
            self.by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
            work.dirty.insert(svc);
        }
        self.slices.insert(key, Box::new(slice));
    }

    fn remove_slice(&mut self, key: &SliceKey, work: &mut Work) {
        if let Some(old) = self.slices.remove(key) {
            if let Some(svc) = old.service {
                if let Some(keys) = self.by_service.get_mut(&svc) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_service.remove(&svc);
                    }
                }
                work.dirty.insert(svc);
            }
        }
    }

    /// Folds one change into the store and notes what it asks for. Objects
    /// are kept as translation reads them (`objects`), nothing more.
    pub fn apply(&mut self, change: Change, work: &mut Work) {
        match change {
            Change::Service(ev) => self.apply_service(ev, work),
            Change::Slice(ev) => self.apply_slice(ev, work),
            Change::Node(ev) => self.apply_node(ev, work),
            Change::WatchError(resource, e) => {
                log::warn!("watch of {resource} failed, retrying: {e}");
            }
        }
    }

    fn apply_service(&mut self, ev: Event<ServiceInfo>, work: &mut Work) {
        match ev {
            Event::Apply(s) => {
                work.dirty.insert(s.name.clone());
                self.services.insert(s.name.clone(), Box::new(s));
            }
            Event::Delete(s) => {
                self.services.remove(&s.name);
                work.dirty.insert(s.name);
            }
            Event::Init => {
                if self.services_synced {
                    work.restarts.push("services");
                }
                self.listed_services = Some(HashSet::new());
            }
            Event::InitApply(s) => {
                if let Some(listed) = &mut self.listed_services {
                    listed.insert(s.name.clone());
                }
                // An unchanged object keeps its place: a relist that
                // replaced every one would scatter the heap.
                if self.services.get(&s.name).is_none_or(|old| **old != s) {
                    self.services.insert(s.name.clone(), Box::new(s));
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.listed_services.take() {
                    self.services.retain(|name, _| listed.contains(name));
                }
                self.services_synced = true;
                work.full_resync = true;
            }
        }
    }

    fn apply_slice(&mut self, ev: Event<SliceInfo>, work: &mut Work) {
        match ev {
            Event::Apply(s) => {
                self.note_trigger(&s);
                self.put_slice(s, work);
            }
            Event::Delete(s) => self.remove_slice(&slice_key(&s), work),
            Event::Init => {
                if self.slices_synced {
                    work.restarts.push("endpointslices");
                }
                self.listed_slices = Some(HashSet::new());
            }
            Event::InitApply(s) => {
                self.note_trigger(&s);
                if let Some(listed) = &mut self.listed_slices {
                    listed.insert(slice_key(&s));
                }
                // Unchanged: kept in place, as Services are. Changed: the
                // list's end asks for a full resync.
                if self.slices.get(&slice_key(&s)).is_none_or(|old| **old != s) {
                    self.put_slice(s, &mut Work::default());
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.listed_slices.take() {
                    let gone: Vec<SliceKey> = (self.slices.keys())
                        .filter(|k| !listed.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.remove_slice(&key, &mut Work::default());
                    }
                }
                self.slices_synced = true;
                work.full_resync = true;
            }
        }
    }

    fn apply_node(&mut self, ev: Event<NodeFacts>, work: &mut Work) {
        match ev {
            Event::Apply(n) | Event::InitApply(n) => self.node = Some(n),
            Event::Delete(_) => self.node = None,
            Event::Init => {
                if self.node.is_some() {
                    work.restarts.push("nodes");
                }
            }
            Event::InitDone => {}
        }
    }
}

impl ClusterState {
    /// This node's `topology.kubernetes.io/zone`, for topology hints.
    pub fn node_zone(&self) -> Option<String> {
        self.node.as_ref()?.zone.clone()
    }

    /// Whether this node may take traffic (see `NodeFacts::eligible`);
    /// true until its Node says otherwise, as in kube-proxy.
    pub fn node_eligible(&self) -> bool {
        self.node.as_ref().is_none_or(|n| n.eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::objects::TRIGGER_TIME_ANNOTATION;
    use serde_json::json;

    fn svc_object(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
        .unwrap()
    }

    fn svc(name: &str, ip: &str) -> ServiceInfo {
        svc_object(name, ip).into()
    }

    fn slice(name: &str, svc: &str, ip: &str, trigger: Option<&str>) -> SliceInfo {
        let mut annotations = serde_json::Map::new();
        if let Some(t) = trigger {
            annotations.insert(TRIGGER_TIME_ANNOTATION.into(), t.into());
        }
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc}, "annotations": annotations},
            "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [{"addresses": [ip]}]}))
        .map(|s: EndpointSlice| s.into())
        .unwrap()
    }

    fn name(n: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: n.into(),
        }
    }

    /// Applies `changes` in order; what they ask for.
    fn apply_all(st: &mut ClusterState, changes: impl IntoIterator<Item = Change>) -> Work {
        let mut w = Work::default();
        for c in changes {
            st.apply(c, &mut w);
        }
        w
    }

    #[test]
    fn relist_replaces_the_store_and_asks_for_a_full_resync() {
        let mut st = ClusterState::default();
        let w = apply_all(
            &mut st,
            [
                Change::Service(Event::Init),
                Change::Service(Event::InitApply(svc("a", "10.96.0.1"))),
                Change::Service(Event::InitApply(svc("b", "10.96.0.2"))),
                Change::Service(Event::InitDone),
            ],
        );
        assert!(w.full_resync && w.restarts.is_empty());
        assert_eq!(st.services.len(), 2);
        // A relist (410 Gone) that no longer has b: b is gone from the store.
        let w = apply_all(
            &mut st,
            [
                Change::Service(Event::Init),
                Change::Service(Event::InitApply(svc("a", "10.96.0.1"))),
                Change::Service(Event::InitDone),
            ],
        );
        assert_eq!(w.restarts, vec!["services"]);
        assert!(w.full_resync);
        assert!(!st.services.contains_key(&name("b")));
    }

    #[test]
    fn a_slice_relist_updates_in_place_and_deletes_what_it_did_not_return() {
        let mut st = ClusterState::default();
        apply_all(
            &mut st,
            [
                Change::Slice(Event::Init),
                Change::Slice(Event::InitApply(slice("s1", "a", "10.244.0.1", None))),
                Change::Slice(Event::InitApply(slice("s2", "b", "10.244.0.2", None))),
                Change::Slice(Event::InitDone),
            ],
        );
        let mut w = Work::default();
        st.apply(Change::Slice(Event::Init), &mut w);
        st.apply(
            Change::Slice(Event::InitApply(slice("s1", "a", "10.244.0.9", None))),
            &mut w,
        );
        // Mid-list: s1 is the new version, s2 still there.
        let a = &st.changes(&[name("a")].into())[0];
        let address = a.slices[0].endpoints[0].address.clone();
        assert_eq!(
            address,
            Some(crate::source::objects::Addr::parse("10.244.0.9"))
        );
        assert_eq!(st.changes(&[name("b")].into())[0].slices.len(), 1);
        st.apply(Change::Slice(Event::InitDone), &mut w);
        assert!(w.full_resync);
        assert_eq!(w.restarts, vec!["endpointslices"]);
        assert!(st.changes(&[name("b")].into())[0].slices.is_empty());
        assert_eq!(st.slices.len(), 1);
    }

    #[test]
    fn slice_events_dirty_their_service_and_follow_relabels() {
        let mut st = ClusterState::default();
        let mut w = Work::default();
        st.apply(
            Change::Slice(Event::Apply(slice("s1", "a", "10.244.0.1", None))),
            &mut w,
        );
        assert_eq!(w.dirty, [name("a")].into());
        // The slice moves to Service b: both need work.
        let mut w = Work::default();
        st.apply(
            Change::Slice(Event::Apply(slice("s1", "b", "10.244.0.1", None))),
            &mut w,
        );
        assert_eq!(w.dirty, [name("a"), name("b")].into());
        assert!(st.changes(&[name("a")].into())[0].slices.is_empty());
        assert_eq!(st.changes(&[name("b")].into())[0].slices.len(), 1);
        let mut w = Work::default();
        st.apply(
            Change::Slice(Event::Delete(slice("s1", "b", "10.244.0.1", None))),
            &mut w,
        );
        assert_eq!(w.dirty, [name("b")].into());
        assert!(st.changes(&[name("b")].into())[0].slices.is_empty());
    }

    #[test]
    fn trigger_times_are_counted_once_per_change() {
        let mut st = ClusterState::default();
        let mut w = Work::default();
        let t1 = "2026-11-22T08:00:00Z";
        st.apply(
            Change::Slice(Event::Apply(slice("s1", "a", "10.244.0.1", Some(t1)))),
            &mut w,
        );
        // The same object again (a resync or relist) adds nothing.
        st.apply(
            Change::Slice(Event::Apply(slice("s1", "a", "10.244.0.1", Some(t1)))),
            &mut w,
        );
        let got = st.take_triggers(&[name("a")].into(), false);
        assert_eq!(got.len(), 1);
        st.apply(
            Change::Slice(Event::Apply(slice(
                "s1",
                "a",
                "10.244.0.2",
                Some("2026-11-22T08:00:05Z"),
            ))),
            &mut w,
        );
        assert_eq!(st.take_triggers(&[name("a")].into(), false).len(), 1);
    }

    #[test]
    fn the_store_keeps_what_translation_reads_status_included() {
        let mut st = ClusterState::default();
        let mut s = svc_object("a", "10.96.0.1");
        s.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                "x".repeat(1000),
            )]
            .into(),
        );
        s.spec.as_mut().unwrap().type_ = Some("LoadBalancer".into());
        s.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}]}}))
                .unwrap(),
        );
        st.apply(
            Change::Service(slim(Event::Apply(s.clone()), ServiceInfo::from)),
            &mut Work::default(),
        );
        assert_eq!(
            *st.services[&name("a")],
            ServiceInfo::from(&s),
            "the same as the manifest source keeps"
        );
        assert_eq!(
            st.services[&name("a")].ingress_ips,
            vec![crate::source::objects::Addr::parse("192.0.2.9")]
        );
    }
}
