//! Where a lab's agent reads the desired state: the manifest folder, or the
//! API server fixture (listening inside the node's namespace), which serves
//! the same objects as a real API server does after defaulting. Tests that
//! run with both sources check that the agent serves the same Services the
//! same way whichever it reads.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::node::LabNode;
use lb_kube_fixtures::apiserver::{ApiServer, Resource};

/// The source a lab's agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--manifests DIR`.
    Manifests,
    /// `--kubeconfig` to the API server fixture.
    Api,
}

impl Source {
    pub const ALL: [Source; 2] = [Source::Manifests, Source::Api];
}

/// (kind, namespace, name).
type Key = (String, String, String);

/// The fixture, and what the lab published to it last.
pub struct ApiSource {
    pub server: ApiServer,
    pub kubeconfig: PathBuf,
    published: BTreeMap<Key, Value>,
}

impl ApiSource {
    /// Starts the fixture in `node`'s namespace, with the Node object.
    pub fn start(node: &LabNode, node_name: &str) -> Result<Self> {
        let server =
            ApiServer::start_in(Some(node.path())).context("start the API server fixture")?;
        // As a dual-stack cluster registers it: a pod range and an
        // address of each family.
        server.apply(&json!({"kind": "Node", "metadata": {"name": node_name},
            "spec": {"podCIDR": "10.244.0.0/24",
                "podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": crate::NODE_WIRE_ADDR.to_string()},
                {"type": "InternalIP", "address": crate::NODE_WIRE_ADDR6.to_string()},
                {"type": "Hostname", "address": node_name}]}}))?;
        let kubeconfig = node.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig())?;
        Ok(Self {
            server,
            kubeconfig,
            published: BTreeMap::new(),
        })
    }

    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            "--kubeconfig".into(),
            self.kubeconfig.to_string_lossy().into_owned(),
        ]
    }

    /// Makes the fixture hold exactly the Services and EndpointSlices of
    /// `files` (manifest texts): changed objects applied, gone ones
    /// deleted. Returns how many objects changed.
    pub fn publish(&mut self, files: &[(String, String)]) -> Result<usize> {
        let wanted = objects_of(files)?;
        let mut changed = 0;
        let gone: Vec<Key> = self
            .published
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let resource = if key.0 == "Service" {
                Resource::Services
            } else {
                Resource::EndpointSlices
            };
            self.server.delete(resource, &key.1, &key.2);
            self.published.remove(&key);
            changed += 1;
        }
        let new: Vec<Value> = wanted
            .iter()
            .filter(|(k, v)| self.published.get(*k) != Some(*v))
            .map(|(_, v)| v.clone())
            .collect();
        if !new.is_empty() {
            self.server.apply_all(&new)?;
            changed += new.len();
        }
        self.published = wanted;
        Ok(changed)
    }
}

/// The Services and EndpointSlices of manifest texts, keyed.
fn objects_of(files: &[(String, String)]) -> Result<BTreeMap<Key, Value>> {
    let mut out = BTreeMap::new();
    for (name, text) in files {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = Value::deserialize(doc).with_context(|| format!("manifest {name}"))?;
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            if !matches!(kind.as_str(), "Service" | "EndpointSlice") {
                continue;
            }
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            let obj_name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            out.insert((kind, ns, obj_name), v);
        }
    }
    Ok(out)
}
