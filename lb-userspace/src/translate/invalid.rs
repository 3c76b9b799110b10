//! What translation reports about objects it cannot (fully) serve: typed
//! reasons, so callers and tests match on what went wrong rather than on
//! text, and the metric's label comes from the object's kind.

use std::fmt;

use lb_common::MAX_BACKENDS_PER_SERVICE;

use crate::{
    model::{Family, L4Addr, PrefixError, ServiceName, UnsupportedProtocol},
    source::objects::Addr,
};

/// Something that could not be expressed in the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateError {
    pub kind: ObjectKind,
    /// e.g. `Service default/web` or `Service default/web port dns`.
    pub object: String,
    pub reason: Invalid,
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// What a translation error is about (`lb_invalid_objects_total{kind}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Service,
    ServicePort,
    EndpointSlice,
}

impl ObjectKind {
    pub fn label(self) -> &'static str {
        match self {
            ObjectKind::Service => "service",
            ObjectKind::ServicePort => "service_port",
            ObjectKind::EndpointSlice => "endpoint_slice",
        }
    }
}

/// Why an object (a Service, one of its ports, an EndpointSlice) is not
/// served, or not wholly.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("type {0:?} is not a Service type")]
    NotAServiceType(String),
    #[error(
        "spec.clusterIP is empty (manifests must carry the address an API server would allocate)"
    )]
    NoClusterIp,
    #[error("{field} {value:?} is not an IP address")]
    NotAnAddress { field: &'static str, value: String },
    #[error("sessionAffinity timeoutSeconds {0} is not in 1..=86400")]
    AffinityTimeout(i32),
    #[error("annotation lb-agent.io/lb-algorithm {0:?} is not random or maglev (the node's --lb-algorithm applies)")]
    LbAlgorithm(String),
    #[error("annotation lb-agent.io/lb-mode {0:?} is not snat, dsr or hybrid (the node's --lb-mode applies)")]
    LbMode(String),
    #[error("annotation lb-agent.io/maglev-weights {0:?} is not a list of address=weight (0..=65535); every endpoint weighs 1")]
    MaglevWeights(String),
    #[error("sessionAffinity {0:?} is not supported")]
    UnsupportedAffinity(String),
    #[error("loadBalancerSourceRanges: {0}")]
    SourceRange(#[from] PrefixError),
    #[error("{field} {value} is not in 1..=65535")]
    PortNumber { field: &'static str, value: i32 },
    #[error(transparent)]
    Protocol(#[from] UnsupportedProtocol),
    #[error(
        "{0} endpoints exceed the data path's limit of {MAX_BACKENDS_PER_SERVICE} per Service port"
    )]
    TooManyEndpoints(usize),
    #[error("frontend {frontend} is already used by Service {winner} (of two claims the first name in order wins)")]
    FrontendTaken {
        frontend: L4Addr,
        winner: ServiceName,
    },
    #[error("port {0:?} has no valid number")]
    EndpointPortNumber(String),
    #[error("endpoint address {0} is not an {1} address (the slice's addressType)")]
    EndpointWrongFamily(Addr, Family),
}
