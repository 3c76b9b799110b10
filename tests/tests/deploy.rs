//! Checks the cluster manifests in deploy/ without a cluster or privileges:
//! every document parses into its Kubernetes type with no unknown fields,
//! the RBAC grants exactly what the agent reads, and the DaemonSet has what
//! the agent needs to load, pin, attach and report health.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec},
        core::v1::{ConfigMap, Container, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_userspace::source::kube_access::{ApiAccess, REQUIRED_API_ACCESS};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value as Json;

const AGENT_CONTAINER: &str = "lb-agent";
const BPFFS: &str = "/sys/fs/bpf";
const KINDS: &str = "ConfigMap, ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet";

/// Where a document came from, for messages.
#[derive(Clone)]
struct Origin {
    file: PathBuf,
    index: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.index)
    }
}

#[derive(Default)]
struct Manifests {
    config_maps: Vec<(Origin, ConfigMap)>,
    service_accounts: Vec<(Origin, ServiceAccount)>,
    cluster_roles: Vec<(Origin, ClusterRole)>,
    bindings: Vec<(Origin, ClusterRoleBinding)>,
    daemon_sets: Vec<(Origin, DaemonSet)>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `*.yaml` in deploy/, every document in its Kubernetes type.
fn load() -> Manifests {
    let dir = deploy_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("reading deploy/ entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml in {}", dir.display());

    let mut m = Manifests::default();
    for file in files {
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        // Messages name the file as deploy/NAME.
        let shown = Path::new("deploy").join(file.file_name().expect("a file name"));
        for (index, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let origin = Origin {
                file: shown.clone(),
                index,
            };
            let doc = <serde_yaml::Value as serde::Deserialize>::deserialize(de)
                .unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"));
            // A document of only comments is empty, not an object.
            if doc.is_null() {
                continue;
            }
            let json = serde_json::to_value(&doc)
                .unwrap_or_else(|e| panic!("{origin}: not representable as JSON: {e}"));
            let kind = json
                .get("kind")
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("{origin}: no kind"));
            match kind {
                "ConfigMap" => m.config_maps.push((origin.clone(), parse(&origin, &json))),
                "ServiceAccount" => m
                    .service_accounts
                    .push((origin.clone(), parse(&origin, &json))),
                "ClusterRole" => m
                    .cluster_roles
                    .push((origin.clone(), parse(&origin, &json))),
                "ClusterRoleBinding" => m.bindings.push((origin.clone(), parse(&origin, &json))),
                "DaemonSet" => m.daemon_sets.push((origin.clone(), parse(&origin, &json))),
                other => panic!("{origin}: kind {other:?} is not one this test knows ({KINDS})"),
            }
        }
    }
    m
}

/// Deserializes into `T` (which also checks apiVersion and kind) and requires
/// that nothing was dropped: k8s-openapi ignores unknown fields, so a
/// misspelled field would otherwise pass silently.
fn parse<T: DeserializeOwned + Serialize>(origin: &Origin, json: &Json) -> T {
    let typed = T::deserialize(json).unwrap_or_else(|e| {
        panic!(
            "{origin}: does not parse as {}: {e}",
            std::any::type_name::<T>()
        )
    });
    let back = serde_json::to_value(&typed).expect("serialize a k8s-openapi object");
    let mut lost = Vec::new();
    dropped_fields(json, &back, String::new(), &mut lost);
    assert!(
        lost.is_empty(),
        "{origin}: fields unknown to {} or changed by parsing (misspelled?): {lost:?}",
        std::any::type_name::<T>()
    );
    typed
}

/// Paths under `original` that are missing or different in `parsed`.
fn dropped_fields(original: &Json, parsed: &Json, path: String, out: &mut Vec<String>) {
    match (original, parsed) {
        (Json::Object(a), Json::Object(b)) => {
            for (key, value) in a {
                let sub = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => dropped_fields(value, other, sub, out),
                    None => out.push(sub),
                }
            }
        }
        (Json::Array(a), Json::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                dropped_fields(x, y, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        // Quantities may be written as numbers (`cpu: 1`); they parse into strings.
        (Json::Number(n), Json::String(s)) if n.to_string() == *s => {}
        _ => out.push(format!("{path} ({original} became {parsed})")),
    }
}

fn the_daemon_set(m: &Manifests) -> &(Origin, DaemonSet) {
    let [ds] = m.daemon_sets.as_slice() else {
        panic!(
            "expected exactly one DaemonSet in deploy/, found {}",
            m.daemon_sets.len()
        );
    };
    ds
}

fn pod_spec<'a>(origin: &Origin, ds: &'a DaemonSet) -> &'a PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .unwrap_or_else(|| panic!("{origin}: DaemonSet has no pod template spec"))
}

fn agent_container<'a>(origin: &Origin, pod: &'a PodSpec) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == AGENT_CONTAINER)
        .unwrap_or_else(|| panic!("{origin}: no container named {AGENT_CONTAINER:?}"))
}

/// The ServiceAccount the agent's pods run as, as (namespace, name).
fn agent_identity(origin: &Origin, ds: &DaemonSet) -> (String, String) {
    let namespace = ds.metadata.namespace.clone().unwrap_or_else(|| {
        panic!("{origin}: DaemonSet has no metadata.namespace (the binding needs a fixed one)")
    });
    let sa = pod_spec(origin, ds)
        .service_account_name
        .clone()
        .unwrap_or_else(|| {
            panic!("{origin}: pod spec has no serviceAccountName (it would run as `default`)")
        });
    (namespace, sa)
}

/// ClusterRoles bound to the agent's ServiceAccount by ClusterRoleBindings.
fn roles_bound_to_agent(m: &Manifests) -> Vec<&(Origin, ClusterRole)> {
    let (ds_origin, ds) = the_daemon_set(m);
    let (namespace, sa) = agent_identity(ds_origin, ds);
    let mut roles = Vec::new();
    for (origin, binding) in &m.bindings {
        let binds_agent = binding.subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == sa
                && s.namespace.as_deref() == Some(&*namespace)
        });
        if !binds_agent {
            continue;
        }
        let r = &binding.role_ref;
        assert!(
            r.kind == "ClusterRole" && r.api_group == "rbac.authorization.k8s.io",
            "{origin}: roleRef must be an rbac.authorization.k8s.io ClusterRole, is {:?} in {:?}",
            r.kind,
            r.api_group
        );
        let role = m
            .cluster_roles
            .iter()
            .find(|(_, role)| role.metadata.name.as_deref() == Some(&*r.name))
            .unwrap_or_else(|| {
                panic!(
                    "{origin}: binds ClusterRole {:?}, which deploy/ does not define",
                    r.name
                )
            });
        roles.push(role);
    }
    roles
}

#[test]
fn every_document_parses_into_its_type() {
    let m = load();
    assert!(
        !m.service_accounts.is_empty(),
        "deploy/ has no ServiceAccount"
    );
    assert!(!m.cluster_roles.is_empty(), "deploy/ has no ClusterRole");
    assert!(!m.bindings.is_empty(), "deploy/ has no ClusterRoleBinding");
    the_daemon_set(&m);
}

#[test]
fn cluster_role_grants_exactly_the_required_access() {
    let m = load();
    let roles = roles_bound_to_agent(&m);
    assert!(
        !roles.is_empty(),
        "no ClusterRoleBinding binds a ClusterRole to the DaemonSet's ServiceAccount"
    );

    // (group, resource, verb) triples, so grants split across rules compare equal.
    let required: BTreeSet<(String, String, String)> = REQUIRED_API_ACCESS
        .iter()
        .flat_map(|a: &ApiAccess| {
            a.verbs
                .iter()
                .map(move |v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();

    let mut granted = BTreeSet::new();
    for (origin, role) in roles {
        assert!(
            role.aggregation_rule.is_none(),
            "{origin}: aggregationRule would add rules this test cannot see"
        );
        for (i, rule) in role.rules.iter().flatten().enumerate() {
            let at = format!("{origin}: rules[{i}]");
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            for value in groups.iter().chain(&resources).chain(&rule.verbs) {
                assert!(!value.contains('*'), "{at}: wildcard {value:?}");
            }
            assert!(
                rule.resource_names.as_ref().is_none_or(Vec::is_empty),
                "{at}: resourceNames present (the agent reads whole collections)"
            );
            assert!(
                rule.non_resource_urls.as_ref().is_none_or(Vec::is_empty),
                "{at}: nonResourceURLs present (the agent needs none)"
            );
            assert!(
                !groups.is_empty() && !resources.is_empty() && !rule.verbs.is_empty(),
                "{at}: a rule needs apiGroups, resources and verbs"
            );
            for g in &groups {
                for r in &resources {
                    for v in &rule.verbs {
                        granted.insert((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
    }

    let missing: Vec<_> = required.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&required).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ClusterRole differs from lb_userspace::source::kube_access::REQUIRED_API_ACCESS \
         as (apiGroup, resource, verb): missing {missing:?}, not needed {extra:?}"
    );
}

#[test]
fn binding_ties_the_role_to_the_daemon_sets_service_account() {
    let m = load();
    let (ds_origin, ds) = the_daemon_set(&m);
    let (namespace, sa) = agent_identity(ds_origin, ds);
    let defined = m.service_accounts.iter().any(|(_, a)| {
        a.metadata.name.as_deref() == Some(&*sa)
            && a.metadata.namespace.as_deref() == Some(&*namespace)
    });
    assert!(
        defined,
        "{ds_origin}: serviceAccountName {sa:?} has no ServiceAccount in namespace {namespace:?} in deploy/"
    );
    assert!(
        !roles_bound_to_agent(&m).is_empty(),
        "no ClusterRoleBinding has subject ServiceAccount {namespace}/{sa} with a ClusterRole from deploy/"
    );
}

/// The API server's address is a required setting of its own: the
/// DaemonSet reads LB_API_SERVER from a ConfigMap shipped next to it, whose
/// value as shipped the agent refuses (so an unedited apply fails at once,
/// saying what to set, not after the next reboot); nothing points the agent
/// at the `kubernetes` Service.
#[test]
fn the_api_server_address_is_required_and_the_placeholder_refused() {
    use lb_userspace::source::api_client::{
        parse_api_server, API_SERVER_ENV, KUBERNETES_SERVICE_SETTING,
    };
    let m = load();
    let (origin, ds) = the_daemon_set(&m);
    let c = agent_container(origin, pod_spec(origin, ds));
    let env = c.env.iter().flatten();
    let setting = env
        .clone()
        .find(|e| e.name == API_SERVER_ENV)
        .unwrap_or_else(|| panic!("{origin}: no {API_SERVER_ENV} env"));
    let key_ref = setting
        .value_from
        .as_ref()
        .and_then(|v| v.config_map_key_ref.as_ref())
        .unwrap_or_else(|| panic!("{origin}: {API_SERVER_ENV} must come from a ConfigMap key"));
    assert_ne!(
        key_ref.optional,
        Some(true),
        "{origin}: the API server setting must not be optional"
    );
    let (cm_origin, cm) = m
        .config_maps
        .iter()
        .find(|(_, cm)| {
            cm.metadata.name.as_deref() == Some(key_ref.name.as_str())
                && cm.metadata.namespace == ds.metadata.namespace
        })
        .unwrap_or_else(|| {
            panic!(
                "{origin}: ConfigMap {:?} is not in deploy/ (in the DaemonSet's namespace)",
                key_ref.name
            )
        });
    let shipped = cm
        .data
        .as_ref()
        .and_then(|d| d.get(&key_ref.key))
        .unwrap_or_else(|| panic!("{cm_origin}: no key {:?}", key_ref.key));
    let refusal = parse_api_server(shipped)
        .expect_err("the shipped value must be a placeholder the agent refuses");
    assert!(refusal.contains("API server's own address"), "{refusal}");
    // Filled in as the comment says, it is accepted.
    let filled = shipped.replace("<api-server-address>", "192.0.2.10");
    assert!(parse_api_server(&filled).is_ok(), "{filled}");
    for e in env {
        assert!(
            e.name != "KUBERNETES_SERVICE_HOST"
                && e.value.as_deref() != Some(KUBERNETES_SERVICE_SETTING),
            "{origin}: env {} points the agent at the `kubernetes` Service",
            e.name
        );
    }
    let args = c.args.clone().unwrap_or_default();
    assert!(
        flag_value(&args, "--api-server").is_none(),
        "{origin}: --api-server in args would override the ConfigMap"
    );
}

/// The port a probe targets must be the metrics port, by name or number.
fn check_probe(
    origin: &Origin,
    what: &str,
    probe: Option<&Probe>,
    path: &str,
    port: &(String, i32),
) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{origin}: no {what} httpGet probe"));
    assert_eq!(
        get.path.as_deref(),
        Some(path),
        "{origin}: {what} probe path"
    );
    let on_metrics = match &get.port {
        IntOrString::String(name) => *name == port.0,
        IntOrString::Int(n) => *n == port.1,
    };
    assert!(
        on_metrics,
        "{origin}: {what} probe targets port {:?}, not the metrics port {:?}/{}",
        get.port, port.0, port.1
    );
}

/// The value of `--flag=v` or `--flag v` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&prefix) {
            Some(v)
        } else if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

#[test]
fn daemon_set_runs_the_agent_with_what_it_needs() {
    let m = load();
    let (origin, ds) = the_daemon_set(&m);
    let pod = pod_spec(origin, ds);
    let spec = ds.spec.as_ref().expect("pod_spec found it");
    let c = agent_container(origin, pod);
    selects_its_template(origin, spec);
    knows_its_node(origin, pod, c);
    updates_one_node_at_a_time(origin, spec);
    pins_on_the_hosts_bpffs(origin, pod, c);
    propagates_mounts_as_the_api_server_allows(origin, pod);
    may_load_and_attach(origin, c);
    probes_and_serves_metrics_on_one_port(origin, c);
}

fn selects_its_template(origin: &Origin, spec: &DaemonSetSpec) {
    // Selector must select the template, or the API server rejects the DaemonSet.
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector: BTreeMap<String, String> = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| template_labels.get(k) == Some(v)),
        "{origin}: selector.matchLabels {selector:?} does not select template labels {template_labels:?}"
    );
}

fn knows_its_node(origin: &Origin, pod: &PodSpec, c: &Container) {
    // The data path attaches to the node's own interfaces.
    assert_eq!(
        pod.host_network,
        Some(true),
        "{origin}: hostNetwork must be true"
    );

    // Node-local facts come from knowing which node this is.
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap_or_else(|| panic!("{origin}: container has no NODE_NAME env"));
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        field,
        Some("spec.nodeName"),
        "{origin}: NODE_NAME must come from fieldRef spec.nodeName"
    );
}

fn updates_one_node_at_a_time(origin: &Origin, spec: &DaemonSetSpec) {
    // One node at a time loses its agent during an update.
    let strategy = spec
        .update_strategy
        .as_ref()
        .unwrap_or_else(|| panic!("{origin}: no updateStrategy"));
    assert_eq!(
        strategy.type_.as_deref(),
        Some("RollingUpdate"),
        "{origin}: updateStrategy.type"
    );
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1)),
        "{origin}: updateStrategy.rollingUpdate.maxUnavailable"
    );
}

fn pins_on_the_hosts_bpffs(origin: &Origin, pod: &PodSpec, c: &Container) {
    // Pins on the host's bpffs, visible from the container and outliving it.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| vm.mount_path.trim_end_matches('/') == BPFFS)
        .unwrap_or_else(|| panic!("{origin}: no volumeMount at {BPFFS}"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| {
            panic!(
                "{origin}: volumeMount {BPFFS} names volume {:?}, which does not exist",
                mount.name
            )
        });
    let host_path = volume
        .host_path
        .as_ref()
        .map(|h| h.path.trim_end_matches('/'));
    assert_eq!(
        host_path,
        Some(BPFFS),
        "{origin}: volume {:?} must be hostPath {BPFFS}",
        volume.name
    );
    assert!(
        matches!(
            mount.mount_propagation.as_deref(),
            Some("Bidirectional" | "HostToContainer")
        ),
        "{origin}: {BPFFS} mountPropagation must be Bidirectional or HostToContainer, is {:?}",
        mount.mount_propagation
    );
    assert_ne!(
        mount.read_only,
        Some(true),
        "{origin}: {BPFFS} must be writable to pin maps"
    );
}

fn propagates_mounts_as_the_api_server_allows(origin: &Origin, pod: &PodSpec) {
    // The API server rejects Bidirectional propagation in a container that is
    // not privileged; parsing alone does not apply that rule.
    for any in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let any_privileged = any.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
        for vm in any.volume_mounts.iter().flatten() {
            assert!(
                any_privileged || vm.mount_propagation.as_deref() != Some("Bidirectional"),
                "{origin}: container {:?} mounts {} with Bidirectional propagation but is not \
                 privileged, which the API server rejects (use HostToContainer)",
                any.name,
                vm.mount_path
            );
        }
    }
}

fn may_load_and_attach(origin: &Origin, c: &Container) {
    // Loading and attaching: privileged, or at least CAP_BPF and CAP_NET_ADMIN.
    let sc = c.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged) == Some(true);
    let added: BTreeSet<String> = sc
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|caps| caps.add.clone())
        .unwrap_or_default()
        .iter()
        .map(|cap| cap.trim_start_matches("CAP_").to_ascii_uppercase())
        .collect();
    assert!(
        privileged || (added.contains("BPF") && added.contains("NET_ADMIN")),
        "{origin}: container must be privileged or add capabilities BPF and NET_ADMIN (adds {added:?})"
    );
}

fn probes_and_serves_metrics_on_one_port(origin: &Origin, c: &Container) {
    // The metrics port, which the probes and --metrics-addr must agree on.
    let metrics: Vec<_> = c
        .ports
        .iter()
        .flatten()
        .filter(|p| p.name.as_deref() == Some("metrics"))
        .collect();
    let [metrics] = metrics.as_slice() else {
        panic!(
            "{origin}: expected one containerPort named \"metrics\", found {}",
            metrics.len()
        );
    };
    let port = ("metrics".to_string(), metrics.container_port);
    check_probe(
        origin,
        "liveness",
        c.liveness_probe.as_ref(),
        "/healthz",
        &port,
    );
    check_probe(
        origin,
        "readiness",
        c.readiness_probe.as_ref(),
        "/readyz",
        &port,
    );

    // argv = command + args: `lb-agent [--global=flag ...] run ...`.
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    let program = argv.first().map(|p| p.rsplit('/').next().unwrap_or(p));
    assert_eq!(
        program,
        Some("lb-agent"),
        "{origin}: command must start lb-agent (argv {argv:?})"
    );
    let run_at = argv.iter().position(|a| a == "run").filter(|&i| {
        argv[1..i]
            .iter()
            .all(|a| a.starts_with("--") && a.contains('='))
    });
    let Some(run_at) = run_at else {
        panic!("{origin}: argv must be `lb-agent [--flag=value ...] run ...`, is {argv:?}");
    };
    let run_args = &argv[run_at + 1..];
    let addr = flag_value(run_args, "--metrics-addr")
        .unwrap_or_else(|| panic!("{origin}: no --metrics-addr in {run_args:?}"));
    let addr_port: Option<i32> = addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    assert_eq!(
        addr_port,
        Some(metrics.container_port),
        "{origin}: --metrics-addr={addr} must listen on the metrics containerPort"
    );
}
