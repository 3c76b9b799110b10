//! The desired state of the data path, independent of map ids and bytes.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Parses a Kubernetes protocol name ("TCP" when absent).
    pub fn from_k8s(name: Option<&str>) -> Result<Self, String> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(format!(
                "protocol {other} is not supported by the data path"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// An address, port and protocol: a Service frontend or a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct L4Addr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One frontend of a Service port and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub service: ServiceName,
    pub port_name: String,
    pub frontend: L4Addr,
    /// Ready backends, sorted and without duplicates.
    pub backends: Vec<L4Addr>,
    /// `SVC_FLAG_*`.
    pub flags: u16,
}

/// Everything the data path should serve, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub entries: BTreeMap<L4Addr, ServiceEntry>,
}
