//! The agent's image run the way the DaemonSet runs it, with podman: the
//! container's command, arguments, environment, securityContext (capabilities,
//! seccomp profile, no privilege escalation, read-only root) and host
//! folders are read from deploy/lb-agent.yaml, so the test follows the
//! manifest. Host folders are replaced by the lab's own (its bpffs folder,
//! its cgroup), never the machine's.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Names the image under test; `cargo xtask test` builds it from this
/// checkout's agent (`cargo xtask image`).
pub const IMAGE_ENV: &str = "LB_AGENT_IMAGE";

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The image under test, if one was built.
pub fn image_under_test() -> Option<String> {
    std::env::var(IMAGE_ENV).ok().filter(|s| !s.is_empty())
}

/// Podman with the project's settings (deploy/image/containers.conf).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", repo_path("deploy/image/containers.conf"));
    c
}

/// The DaemonSet's pod template spec.
pub fn daemon_set_pod() -> Value {
    let path = repo_path("deploy/lb-agent.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).expect("a YAML document");
        if doc["kind"] == "DaemonSet" {
            return doc["spec"]["template"]["spec"].clone();
        }
    }
    panic!("no DaemonSet in {}", path.display())
}

/// The container (or init container) `name` of the pod spec.
pub fn container_of<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|list| pod[list].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
}

/// What the DaemonSet's values that come from the cluster are, here.
#[derive(Default)]
pub struct ClusterFacts {
    /// `fieldRef: spec.nodeName`.
    pub node_name: String,
    /// `configMapKeyRef` values, by `ConfigMap/key`.
    pub config_maps: BTreeMap<String, String>,
    /// Host paths of hostPath volumes, replaced by the lab's folders.
    pub host_paths: BTreeMap<String, PathBuf>,
    /// What the kubelet adds: the service account's folder and the
    /// `kubernetes` Service's variables.
    pub service_account_dir: Option<PathBuf>,
    pub kubelet_env: Vec<(String, String)>,
}

/// `podman run` options for a container of the pod spec: the runtime's
/// view of its securityContext, environment and volume mounts.
pub fn run_options(pod: &Value, container: &Value, facts: &ClusterFacts) -> Vec<String> {
    let mut options = security_options(&container["securityContext"]);
    for (name, value) in env_of(container, facts)
        .into_iter()
        .chain(facts.kubelet_env.clone())
    {
        options.push(format!("--env={name}={value}"));
    }
    options.extend(mounts_of(pod, container, facts));
    if let Some(dir) = &facts.service_account_dir {
        options.push(format!(
            "--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            dir.display()
        ));
    }
    options
}

/// Capabilities, seccomp, privilege escalation and the read-only root.
pub fn security_options(security: &Value) -> Vec<String> {
    assert_ne!(security["privileged"], true, "the agent is not privileged");
    let mut options = Vec::new();
    let caps = |list: &Value| -> Vec<String> {
        list.as_array()
            .map(|l| l.iter().map(|c| c.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    for cap in caps(&security["capabilities"]["drop"]) {
        options.push(format!("--cap-drop={cap}"));
    }
    for cap in caps(&security["capabilities"]["add"]) {
        options.push(format!("--cap-add={cap}"));
    }
    let seccomp = &security["seccompProfile"];
    match seccomp["type"].as_str() {
        // podman's own default profile stands for the cluster's runtime
        // default; none set is taken as a cluster that enforces it.
        Some("RuntimeDefault") | None => {}
        Some("Unconfined") => options.push("--security-opt=seccomp=unconfined".into()),
        Some("Localhost") => {
            let file = seccomp["localhostProfile"]
                .as_str()
                .expect("localhostProfile");
            let path = repo_path("deploy/seccomp").join(file);
            assert!(path.is_file(), "{} is shipped", path.display());
            options.push(format!("--security-opt=seccomp={}", path.display()));
        }
        Some(other) => panic!("seccompProfile type {other}"),
    }
    if security["allowPrivilegeEscalation"] == false {
        options.push("--security-opt=no-new-privileges".into());
    }
    if security["readOnlyRootFilesystem"] == true {
        options.push("--read-only".into());
    }
    options
}

fn env_of(container: &Value, facts: &ClusterFacts) -> Vec<(String, String)> {
    let Some(env) = container["env"].as_array() else {
        return Vec::new();
    };
    env.iter()
        .map(|var| {
            let name = var["name"].as_str().unwrap().to_owned();
            let from = &var["valueFrom"];
            let value = if let Some(v) = var["value"].as_str() {
                v.to_owned()
            } else if from["fieldRef"]["fieldPath"] == "spec.nodeName" {
                facts.node_name.clone()
            } else if let Some(map) = from["configMapKeyRef"]["name"].as_str() {
                let key = format!("{map}/{}", from["configMapKeyRef"]["key"].as_str().unwrap());
                facts
                    .config_maps
                    .get(&key)
                    .unwrap_or_else(|| panic!("no value given for ConfigMap key {key}"))
                    .clone()
            } else {
                panic!("env {name}: a source the test does not know: {var}")
            };
            (name, value)
        })
        .collect()
}

fn mounts_of(pod: &Value, container: &Value, facts: &ClusterFacts) -> Vec<String> {
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let Some(mounts) = container["volumeMounts"].as_array() else {
        return Vec::new();
    };
    mounts
        .iter()
        .map(|m| {
            let volume = volumes[m["name"].as_str().unwrap()];
            let host = volume["hostPath"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("volume {volume}: only hostPath volumes are known"));
            let lab = facts
                .host_paths
                .get(host)
                .unwrap_or_else(|| panic!("no lab folder given for the host's {host}"));
            let mut options = Vec::new();
            if m["readOnly"] == true {
                options.push("ro");
            }
            if m["mountPropagation"] == "HostToContainer" {
                options.push("rslave");
            }
            let suffix = if options.is_empty() {
                String::new()
            } else {
                format!(":{}", options.join(","))
            };
            format!(
                "--volume={}:{}{suffix}",
                lab.display(),
                m["mountPath"].as_str().unwrap()
            )
        })
        .collect()
}

/// The container's `command` and `args`, as Kubernetes passes them: the
/// command replaces the image's entrypoint.
pub fn command_of(container: &Value) -> (String, Vec<String>) {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|l| l.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let command = strings(&container["command"]);
    assert!(!command.is_empty(), "the DaemonSet names the command");
    (
        serde_json::to_string(&command).unwrap(),
        strings(&container["args"]),
    )
}

/// A container the test started; removed (`podman rm -f`) when dropped,
/// also when the test fails.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `podman run --detach` with `options`, the image and `args`.
    pub fn start(name: &str, options: &[String], image: &str, args: &[String]) -> Result<Self> {
        let _ = podman().args(["rm", "--force", name]).output();
        let out = podman()
            .args(["run", "--detach", "--name", name])
            .args(options)
            .arg(image)
            .args(args)
            .output()?;
        // The guard exists before the check: a container that was created
        // but failed to start is removed too.
        let container = Self { name: name.into() };
        check(&out, "podman run")?;
        Ok(container)
    }

    /// `podman restart`: SIGTERM, then the same container started again,
    /// as the kubelet restarts a pod's container.
    pub fn restart(&self) -> Result<()> {
        check(
            &podman()
                .args(["restart", "--time", "30", &self.name])
                .output()?,
            "podman restart",
        )
    }

    pub fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// The container's state (`running`, `exited`, ...).
    pub fn state(&self) -> String {
        podman()
            .args(["inspect", "--format", "{{.State.Status}}", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- container {} ----\n{}", self.name, self.logs());
        }
        let _ = podman()
            .args(["rm", "--force", "--time", "5", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// How long a container `run_to_end` starts may run.
const RUN_TO_END_LIMIT: std::time::Duration = std::time::Duration::from_mins(2);

/// Runs a container to its end (`podman run --rm`); its exit status and
/// output.
pub fn run_to_end(options: &[String], image: &str, args: &[String]) -> Result<Output> {
    Ok(podman()
        .args(["run", "--rm"])
        // A run that never ends is killed rather than holding up the test.
        .arg(format!("--timeout={}", RUN_TO_END_LIMIT.as_secs()))
        .args(options)
        .arg(image)
        .args(args)
        .output()?)
}

fn check(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The image's size in bytes.
pub fn image_size(image: &str) -> Result<u64> {
    let out = podman()
        .args(["image", "inspect", "--format", "{{.Size}}", image])
        .output()?;
    check(&out, "podman image inspect")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("image size")
}
