//! `lb-agent services`: what the pinned maps hold, as a table or JSON.

use std::fmt::Write as _;

use lb_common::{
    SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT,
};
use serde::Serialize;

use crate::{
    differ::{backend_addr, frontend_of, MapContents},
    model::L4Addr,
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ProgrammedService {
    pub frontend: L4Addr,
    pub kind: Vec<&'static str>,
    pub rev_nat_id: u16,
    pub backends: Vec<ProgrammedBackend>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub id: u32,
    /// None when the slot points at a backend id that does not exist.
    pub backend: Option<L4Addr>,
}

pub fn programmed_services(maps: &MapContents) -> Vec<ProgrammedService> {
    let mut out = Vec::new();
    for (key, master) in maps.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        let Some(frontend) = frontend_of(key) else {
            continue;
        };
        let mut kind = Vec::new();
        for (flag, name) in [
            (SVC_FLAG_CLUSTER_IP, "ClusterIP"),
            (SVC_FLAG_NODE_PORT, "NodePort"),
            (SVC_FLAG_EXTERNAL_IP, "ExternalIP"),
            (SVC_FLAG_LOAD_BALANCER, "LoadBalancer"),
        ] {
            if master.flags & flag != 0 {
                kind.push(name);
            }
        }
        let backends = (1..=master.count)
            .filter_map(|slot| {
                maps.services.get(&lb_common::Service4Key {
                    backend_slot: slot,
                    ..*key
                })
            })
            .map(|v| ProgrammedBackend {
                id: v.backend_id,
                backend: maps.backends.get(&v.backend_id).and_then(backend_addr),
            })
            .collect();
        out.push(ProgrammedService {
            frontend,
            kind,
            rev_nat_id: master.rev_nat_id,
            backends,
        });
    }
    out
}

pub fn render_table(services: &[ProgrammedService]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:<10} {:>6} {:>8}  BACKENDS",
        "FRONTEND", "TYPE", "REVNAT", "COUNT"
    );
    for svc in services {
        let backends: Vec<String> = svc
            .backends
            .iter()
            .map(|b| match &b.backend {
                Some(a) => format!("{}:{}", a.addr, a.port),
                None => format!("<missing id {}>", b.id),
            })
            .collect();
        let _ = writeln!(
            s,
            "{:<24} {:<10} {:>6} {:>8}  {}",
            svc.frontend.to_string(),
            svc.kind.join(","),
            svc.rev_nat_id,
            svc.backends.len(),
            if backends.is_empty() {
                "(none: clients are refused)".to_owned()
            } else {
                backends.join(" ")
            }
        );
    }
    s
}
