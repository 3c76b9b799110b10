//! `lb-agent services`: what the pinned maps hold, as a table or JSON.

use std::fmt::Write as _;

use lb_common::{
    RevNatId, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DSR, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER,
    SVC_FLAG_MAGLEV, SVC_FLAG_NODE_PORT,
};
use serde::Serialize;

use crate::{
    datapath::attach,
    model::{L4Addr, LbAlgorithm, LbMode},
    sync::differ::{backend_addr, frontend_of, MapContents, SlotKey},
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ProgrammedService {
    pub frontend: L4Addr,
    pub kind: Vec<&'static str>,
    /// How new flows pick a backend: `maglev` or `random`.
    pub lb_algorithm: LbAlgorithm,
    /// How external traffic reaches other nodes' backends: `snat` or `dsr`.
    pub lb_mode: LbMode,
    pub rev_nat_id: RevNatId,
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
                maps.services.get(&SlotKey {
                    backend_slot: slot,
                    ..*key
                })
            })
            .map(|v| ProgrammedBackend {
                id: v.backend_id,
                // Ids are per family: the frontend's.
                backend: maps.backends[frontend.family()]
                    .get(&v.backend_id)
                    .and_then(backend_addr),
            })
            .collect();
        out.push(ProgrammedService {
            frontend,
            kind,
            lb_algorithm: if master.flags & SVC_FLAG_MAGLEV != 0 {
                LbAlgorithm::Maglev
            } else {
                LbAlgorithm::Random
            },
            lb_mode: if master.flags & SVC_FLAG_DSR != 0 {
                LbMode::Dsr
            } else {
                LbMode::Snat
            },
            rev_nat_id: master.rev_nat_id,
            backends,
        });
    }
    // A stable sort: the scopes of one frontend keep their order.
    out.sort_by_key(|s| row_order(&s.frontend));
    out
}

/// IPv4 rows in the order of earlier versions (the raw key order of
/// `lb4_services`: address and port as their network-order bytes read
/// natively), so output compared over time does not move; IPv6 rows after.
fn row_order(frontend: &L4Addr) -> (u8, u128, u16) {
    match frontend.addr {
        std::net::IpAddr::V4(a) => (
            0,
            u128::from(u32::from_ne_bytes(a.octets())),
            frontend.port.to_be(),
        ),
        std::net::IpAddr::V6(a) => (1, u128::from(a), frontend.port),
    }
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
                // IPv6 in brackets, as addresses with ports are written.
                Some(a) => std::net::SocketAddr::new(a.addr, a.port).to_string(),
                None => format!("<missing id {}>", b.id),
            })
            .collect();
        let _ = writeln!(
            s,
            "{:<24} {:<10} {:>6} {:>8}  {}",
            svc.frontend.to_string(),
            kind_column(svc),
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

/// The frontend's kinds, then `+maglev` on a Maglev one and `+dsr` on
/// one with direct server return.
fn kind_column(svc: &ProgrammedService) -> String {
    let mut column = svc.kind.join(",");
    if svc.lb_algorithm == LbAlgorithm::Maglev {
        column.push_str("+maglev");
    }
    if svc.lb_mode == LbMode::Dsr {
        column.push_str("+dsr");
    }
    column
}

/// `lb-agent status`: where the programs are attached, read from the
/// pinned links, with each wire interface's driver and why it got its hook.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AttachStatus {
    pub wire: Vec<WireStatus>,
    /// Pod interfaces (host side) with tc.
    pub pods: Vec<String>,
    /// Socket hooks (cgroup sock_addr programs) pinned.
    pub socket_hooks: Vec<String>,
    /// Wire interfaces that moved from XDP to tc and keep a pass-through
    /// XDP program (detaching it would reset the device's rings).
    pub xdp_pass_through: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct WireStatus {
    pub interface: String,
    pub hook: &'static str,
    pub driver: String,
    pub why: String,
}

pub fn attach_status(pin_dir: &std::path::Path) -> AttachStatus {
    use crate::datapath::wire_hook::{self, WireHook, WireHookMode, WireHookReason};
    let wire = attach::pinned_wire_hooks(pin_dir)
        .into_iter()
        .map(|(interface, hook)| {
            let driver = wire_hook::driver(&interface).unwrap_or_else(|| "unknown".into());
            // The reason is not stored: auto's choice for this driver, or
            // else a chosen hook (or native XDP missing, for tc on a NIC).
            let why = match wire_hook::choose(WireHookMode::Auto, &driver) {
                (auto, reason) if auto == hook => reason.explain(hook, &driver),
                _ if hook == WireHook::Tc => {
                    format!("chosen by --wire-hook tc, or native XDP failed on driver {driver}")
                }
                _ => WireHookReason::Chosen.explain(hook, &driver),
            };
            WireStatus {
                interface,
                hook: hook.name(),
                driver,
                why,
            }
        })
        .collect();
    AttachStatus {
        wire,
        pods: attach::pinned_pod_hooks(pin_dir),
        socket_hooks: attach::pinned_links_named(pin_dir, "cgroup_lb_sock_"),
        xdp_pass_through: attach::pinned_links_named(pin_dir, "xdppass_"),
    }
}

pub fn render_status(status: &AttachStatus) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:<5} {:<12} WHY",
        "WIRE INTERFACE", "HOOK", "DRIVER"
    );
    for w in &status.wire {
        let _ = writeln!(
            s,
            "{:<16} {:<5} {:<12} {}",
            w.interface, w.hook, w.driver, w.why
        );
    }
    if status.wire.is_empty() {
        let _ = writeln!(s, "(no wire hook pinned)");
    }
    let _ = writeln!(
        s,
        "\npod interfaces with tc: {}{}",
        status.pods.len(),
        if status.pods.is_empty() {
            String::new()
        } else {
            format!(" ({})", status.pods.join(" "))
        }
    );
    if !status.xdp_pass_through.is_empty() {
        let _ = writeln!(
            s,
            "XDP pass-through (an earlier XDP hook, left attached so the device's rings are not reset): {}",
            status.xdp_pass_through.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "socket hooks: {}",
        if status.socket_hooks.is_empty() {
            "none (--socket-lb off)".to_owned()
        } else {
            status.socket_hooks.join(" ")
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn ipv4_rows_keep_the_order_of_the_raw_ipv4_keys_and_ipv6_rows_follow() {
        let mut maps = MapContents::default();
        for a in ["fd00::1", "10.96.1.2", "10.96.0.10"] {
            let f = L4Addr {
                addr: a.parse().unwrap(),
                port: 80,
                proto: Protocol::Tcp,
            };
            let master = lb_common::Service4Value::default();
            maps.insert_service(crate::sync::differ::master_key(&f), master);
        }
        let rows: Vec<String> = programmed_services(&maps)
            .iter()
            .map(|s| s.frontend.to_string())
            .collect();
        // Raw IPv4 keys compare the address bytes read natively.
        let raw = |a: [u8; 4]| u32::from_ne_bytes(a);
        let (first, second) = if raw([10, 96, 1, 2]) < raw([10, 96, 0, 10]) {
            ("10.96.1.2:80/TCP", "10.96.0.10:80/TCP")
        } else {
            ("10.96.0.10:80/TCP", "10.96.1.2:80/TCP")
        };
        assert_eq!(rows, [first, second, "[fd00::1]:80/TCP"]);
    }

    #[test]
    fn ipv6_frontends_and_backends_print_in_brackets() {
        let l4 = |a: &str, port| L4Addr {
            addr: a.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
        };
        let services = [ProgrammedService {
            frontend: l4("fd00::10", 80),
            kind: vec!["ClusterIP"],
            lb_algorithm: LbAlgorithm::Random,
            lb_mode: LbMode::Snat,
            rev_nat_id: 2,
            backends: vec![ProgrammedBackend {
                id: 1,
                backend: Some(l4("fd00:244::5", 8080)),
            }],
        }];
        let table = render_table(&services);
        assert!(table.contains("[fd00::10]:80/TCP"), "{table}");
        assert!(table.contains("[fd00:244::5]:8080"), "{table}");
    }
}
