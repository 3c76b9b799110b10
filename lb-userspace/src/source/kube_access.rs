//! The Kubernetes API access the agent needs, in RBAC terms. The watches in
//! `k8s` list and watch these; `deploy/lb-agent.yaml` grants exactly this
//! (checked by tests/tests/deploy.rs), and the lab checks every request the
//! agent makes against it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group ("" is the core group).
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

pub const REQUIRED_API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["get", "list", "watch"],
    },
];

/// Whether a request (group, resource, verb) is covered.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    REQUIRED_API_ACCESS
        .iter()
        .any(|a| a.group == group && a.resource == resource && a.verbs.contains(&verb))
}
