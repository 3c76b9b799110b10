//! The lab's desired state, as the control plane holds it: Deployments,
//! ReplicaSets and Services (examples users know), the pods they make,
//! which of them are left out of EndpointSlices, and extra manifests a
//! test writes by hand. It is rendered to manifest files that each node's
//! agent reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use lb_kube_fixtures::workload::{self, LabObject, LabPod};

#[derive(Default)]
pub struct Workloads {
    pub objects: Vec<LabObject>,
    /// Extra manifests (Services, EndpointSlices) written as they are.
    pub extra_manifests: BTreeMap<String, String>,
    pub pod_specs: Vec<LabPod>,
    /// Pods left out of EndpointSlices (as if deleted or not ready).
    pub excluded: BTreeSet<String>,
}

/// Reads the Deployments, ReplicaSets and Services of manifest files.
pub(crate) fn objects_of_files(files: &[PathBuf]) -> Result<Vec<LabObject>> {
    let mut objects = Vec::new();
    for file in files {
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let (objs, _skipped) = workload::parse_lab_objects(&text)
            .with_context(|| format!("parsing {}", file.display()))?;
        objects.extend(objs);
    }
    Ok(objects)
}

impl Workloads {
    pub fn new(objects: Vec<LabObject>) -> Self {
        Self {
            objects,
            ..Default::default()
        }
    }

    /// The Services of the objects.
    pub fn services(&self) -> Vec<Service> {
        self.objects
            .iter()
            .filter_map(|o| match o {
                LabObject::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// The EndpointSlices the control plane would derive from the pods
    /// that run (`running`) and are not excluded.
    pub fn endpoint_slices(&self, running: impl Fn(&str) -> bool) -> Vec<EndpointSlice> {
        let pods: Vec<LabPod> = self
            .pod_specs
            .iter()
            .filter(|p| !self.excluded.contains(&p.name) && running(&p.name))
            .cloned()
            .collect();
        workload::endpoint_slices_for_services(&self.objects, &pods)
    }

    /// The manifest files of the state: (file name, text).
    pub(crate) fn manifest_files(
        &self,
        running: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>> {
        let mut services = String::new();
        for s in self.services() {
            services.push_str("---\n");
            services.push_str(&serde_yaml::to_string(&s)?);
        }
        let mut slices = String::new();
        for slice in self.endpoint_slices(running) {
            slices.push_str("---\n");
            slices.push_str(&serde_yaml::to_string(&slice)?);
        }
        let mut files = vec![
            ("services.yaml".to_owned(), services),
            ("endpointslices.yaml".to_owned(), slices),
        ];
        files.extend(
            self.extra_manifests
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Ok(files)
    }

    /// Adds Service `name` in `default` (its spec and status given) and one
    /// EndpointSlice with `endpoints` for ports 80/TCP and 80/UDP to the
    /// extra manifests.
    pub fn put_extra_service(
        &mut self,
        name: &str,
        spec: serde_json::Value,
        status: serde_json::Value,
        endpoints: Vec<serde_json::Value>,
    ) {
        self.put_annotated_service(name, serde_json::json!({}), spec, status, endpoints);
    }

    /// `put_extra_service` with annotations on the Service.
    pub fn put_annotated_service(
        &mut self,
        name: &str,
        annotations: serde_json::Value,
        spec: serde_json::Value,
        status: serde_json::Value,
        endpoints: Vec<serde_json::Value>,
    ) {
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": spec, "status": status});
        self.put_service_manifest(name, &svc, &[("IPv4", endpoints)]);
    }

    /// Adds Service `name` in `default` (its spec and status given) and one
    /// EndpointSlice per address family (`IPv4`, `IPv6`) with its
    /// endpoints, for ports 80/TCP and 80/UDP, to the extra manifests: a
    /// dual-stack Service as the control plane publishes it.
    pub fn put_dual_stack_service(
        &mut self,
        name: &str,
        spec: serde_json::Value,
        status: serde_json::Value,
        slices: &[(&str, Vec<serde_json::Value>)],
    ) {
        let none = serde_json::json!({});
        self.put_annotated_dual_stack_service(name, none, spec, status, slices);
    }

    /// `put_dual_stack_service` with `annotations` on the Service.
    pub fn put_annotated_dual_stack_service(
        &mut self,
        name: &str,
        annotations: serde_json::Value,
        spec: serde_json::Value,
        status: serde_json::Value,
        slices: &[(&str, Vec<serde_json::Value>)],
    ) {
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": spec, "status": status});
        self.put_service_manifest(name, &svc, slices);
    }

    /// The Service and its slices (one per (family, endpoints)) as the
    /// extra manifest `<name>.yaml`.
    fn put_service_manifest(
        &mut self,
        name: &str,
        svc: &serde_json::Value,
        slices: &[(&str, Vec<serde_json::Value>)],
    ) {
        let mut text = serde_yaml::to_string(svc).expect("Service as YAML");
        for (i, (family, endpoints)) in slices.iter().enumerate() {
            // The first keeps the name single-stack Services always had.
            let slice_name = match i {
                0 => format!("{name}-abc"),
                _ => format!("{name}-{}", family.to_lowercase()),
            };
            let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": "default",
                    "labels": {"kubernetes.io/service-name": name}},
                "addressType": family,
                "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"},
                          {"name": "udp", "port": 80, "protocol": "UDP"}],
                "endpoints": endpoints});
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(&slice).expect("EndpointSlice as YAML"));
        }
        self.extra_manifests.insert(format!("{name}.yaml"), text);
    }

    /// The ClusterIP of the Service `name`.
    pub fn cluster_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.objects.iter().find_map(|o| match o {
            LabObject::Service(s) if s.metadata.name.as_deref() == Some(name) => {
                s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok()
            }
            _ => None,
        })
    }

    /// The cluster IPs of the Service `name`, one per family in the order
    /// of its `clusterIPs` (its `clusterIP` when it has no list).
    pub fn cluster_ips(&self, name: &str) -> Vec<IpAddr> {
        let spec = self.objects.iter().find_map(|o| match o {
            LabObject::Service(s) if s.metadata.name.as_deref() == Some(name) => s.spec.clone(),
            _ => None,
        });
        let Some(spec) = spec else {
            return Vec::new();
        };
        let list = match spec.cluster_ips.filter(|l| !l.is_empty()) {
            Some(list) => list,
            None => spec.cluster_ip.into_iter().collect(),
        };
        list.iter().filter_map(|ip| ip.parse().ok()).collect()
    }

    /// Pod names of the Deployment/ReplicaSet owner (`Kind/name`).
    pub fn pods_of(&self, owner: &str) -> Vec<String> {
        self.pod_specs
            .iter()
            .filter(|p| p.owner == owner)
            .map(|p| p.name.clone())
            .collect()
    }

    /// Sets a pod's readiness (what its readiness probe reports).
    pub fn set_pod_ready(&mut self, name: &str, ready: bool) {
        if let Some(spec) = self.pod_specs.iter_mut().find(|p| p.name == name) {
            spec.ready = ready;
        }
    }
}

/// Writes `files` into `dir` atomically (the agent never reads half a
/// file), leaving unchanged ones alone (a rewrite would trigger a sync of
/// its own, which a test could take for its change) and removing others.
/// Returns how many files changed.
pub(crate) fn write_files(dir: &Path, scratch: &Path, files: &[(String, String)]) -> Result<usize> {
    let wanted: BTreeSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let mut changed = 0;
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !wanted.contains(name.as_str()) {
            fs::remove_file(e.path())?;
            changed += 1;
        }
    }
    for (name, text) in files {
        if fs::read_to_string(dir.join(name)).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        let tmp = scratch.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, dir.join(name))?;
        changed += 1;
    }
    Ok(changed)
}
