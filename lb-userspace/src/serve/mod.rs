//! What the agent serves over HTTP: metrics and readiness (`metrics`),
//! kube-proxy's /healthz and /livez (`proxy_health`), and every
//! healthCheckNodePort (`health_check`).

pub mod datapath_metrics;
pub mod health_check;
pub mod metrics;
pub mod proxy_health;
