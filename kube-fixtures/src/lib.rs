//! Kubernetes fixtures for the lab, the tests and the benches: an API
//! server that speaks the real list/watch protocol (`apiserver`), the
//! controllers the lab does not run (`workload`: manifests to pods and
//! EndpointSlices; `rollout`: a Deployment's rolling update), and generated
//! objects (`scale`: a large cluster's; `churn`: Services changing at
//! random). Objects and protocol only: nothing here builds namespaces or
//! runs the agent.

mod api_defaults;
pub mod apiserver;
pub mod churn;
pub mod rollout;
pub mod scale;
pub mod workload;
