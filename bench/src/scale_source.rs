//! Where `lb-bench control-plane` keeps its Services and EndpointSlices
//! (Service `i` with its slice, `lb_kube_fixtures::scale`): the API server
//! fixture, or the lab node's manifest folder, so that both of the agent's
//! sources are measured the way users feed them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lb_kube_fixtures::{
    apiserver::ApiServer,
    scale::{service_of, slice_of, ScaleFamily},
};
use lb_lab::{Lab, Source, NODE_NAME};
use serde_json::{json, Value};

/// Services per manifest file: a change rewrites one file, which the agent
/// alone reads again.
const SERVICES_PER_FILE: usize = 100;

pub struct ScaleSource {
    family: ScaleFamily,
    store: Store,
}

enum Store {
    Api {
        api: ApiServer,
        kubeconfig: String,
    },
    Manifests {
        dir: PathBuf,
        /// Endpoints of each Service's slice, as the files hold them.
        endpoints: Vec<usize>,
    },
}

impl ScaleSource {
    /// Stores `services` Services of `family` with `endpoints` endpoints
    /// each in `source` for the agent of `lab`.
    pub fn store(
        source: Source,
        lab: &Lab,
        family: ScaleFamily,
        services: usize,
        endpoints: usize,
    ) -> Result<Self> {
        eprintln!(
            "[bench] storing {services} {family:?} Services x {endpoints} endpoints ({source:?})"
        );
        let store = match source {
            Source::Api => {
                let api = ApiServer::start_in(Some(lab.node.path()))?;
                api.apply(&json!({"kind": "Node", "metadata": {"name": NODE_NAME}}))?;
                let objects: Vec<Value> = (0..services)
                    .flat_map(|i| {
                        [
                            service_of(family, i),
                            slice_of(family, i, endpoints, NODE_NAME),
                        ]
                    })
                    .collect();
                api.apply_all(&objects)?;
                let path = lab.dir.join("kubeconfig");
                std::fs::write(&path, api.kubeconfig())?;
                let kubeconfig = path.to_string_lossy().into_owned();
                Store::Api { api, kubeconfig }
            }
            Source::Manifests => Store::Manifests {
                dir: lab.node.manifest_dir(),
                endpoints: vec![endpoints; services],
            },
        };
        let source = Self { family, store };
        for file in 0..services.div_ceil(SERVICES_PER_FILE) {
            source.write_file(file)?;
        }
        Ok(source)
    }

    /// The agent's flags for this source (manifests: the lab's folder, which
    /// the lab's agent reads every 100 ms).
    pub fn agent_flags(&self) -> Vec<&str> {
        match &self.store {
            Store::Api { kubeconfig, .. } => {
                vec!["--kubeconfig", kubeconfig, "--node-name", NODE_NAME]
            }
            Store::Manifests { .. } => Vec::new(),
        }
    }

    /// Whether the agent's flags replace the lab's source flags.
    pub fn replaces_source_flags(&self) -> bool {
        matches!(self.store, Store::Api { .. })
    }

    /// Gives Service `i`'s slice `endpoints` endpoints.
    pub fn set_endpoints(&mut self, i: usize, endpoints: usize) -> Result<()> {
        match &mut self.store {
            Store::Api { api, .. } => {
                api.apply(&slice_of(self.family, i, endpoints, NODE_NAME))?;
            }
            Store::Manifests { endpoints: eps, .. } => {
                eps[i] = endpoints;
                self.write_file(i / SERVICES_PER_FILE)?;
            }
        }
        Ok(())
    }

    /// Makes the agent read everything again: the API fixture expires the
    /// watches (a relist, as etcd's compaction causes); the manifest
    /// source gets SIGHUP (every file read again).
    pub fn relist(&self, lab: &Lab) -> Result<()> {
        match &self.store {
            Store::Api { api, .. } => api.expire_watches(),
            Store::Manifests { .. } => {
                let pid = i32::try_from(lab.agent_pid().context("the agent runs")?)?;
                // SAFETY: a signal to the agent this lab started.
                if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
        }
        Ok(())
    }

    /// Writes manifest file `file` (Services `file * SERVICES_PER_FILE`..).
    fn write_file(&self, file: usize) -> Result<()> {
        let Store::Manifests { dir, endpoints } = &self.store else {
            return Ok(());
        };
        let first = file * SERVICES_PER_FILE;
        let last = (first + SERVICES_PER_FILE).min(endpoints.len());
        let mut text = String::new();
        for (i, &n) in endpoints.iter().enumerate().take(last).skip(first) {
            // JSON documents are YAML documents.
            text.push_str(&format!(
                "---\n{}\n---\n{}\n",
                service_of(self.family, i),
                slice_of(self.family, i, n, NODE_NAME)
            ));
        }
        let path = dir.join(format!("scale-{file:05}.yaml"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}
