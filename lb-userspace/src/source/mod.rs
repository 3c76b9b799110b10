//! Where the desired Services and EndpointSlices come from: the Kubernetes
//! API (watched, with a client that times out) or a folder of manifests,
//! both read into one slim type (`objects`) that translation reads.

pub mod api_client;
pub mod k8s;
pub mod kube_access;
mod listed;
pub mod manifests;
pub mod objects;
