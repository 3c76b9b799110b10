//! Direct server return over IPv6 through two nodes' data paths (see the
//! IPv4 twin, `packet/dsr.rs`): the frontend travels in a destination
//! options header.

use std::net::Ipv6Addr;

use lb_common::{stats, CT_FLAG_DSR, DSR_OPTION6_DATA_LEN, DSR_OPTION6_TYPE};
use lb_lab::{
    packet::{TCP_ACK, TCP_SYN},
    packet6::{parse6, tcp6, udp6, Tuple6},
    packet_harness::{Harness, Program},
    privileged_test,
};
use lb_userspace::{model::LbMode, translate::NodeInfo};
use serde_json::json;

const FRONTEND: &str = "fd00:51::31";
const BACKEND: &str = "fd00:244:0:3::5";
const CLIENT: &str = "fd00:172::1";

fn addr(a: &str) -> Ipv6Addr {
    a.parse().unwrap()
}

/// The entry node and the backend's node, each serving an IPv6
/// externalIP Service (TCP and UDP port 80) whose one endpoint runs on
/// node n2, in `mode`.
fn two_nodes(mode: LbMode) -> [Harness; 2] {
    let node = NodeInfo {
        name: "n1".into(),
        lb_mode: mode,
        ..NodeInfo::default()
    };
    let svc = json!({"metadata": {"name": "dsr6", "namespace": "default"},
        "spec": {"clusterIP": "fd00:96::31", "ipFamilies": ["IPv6"], "externalIPs": [FRONTEND],
            "ports": [{"name": "t", "port": 80, "protocol": "TCP"},
                      {"name": "u", "port": 80, "protocol": "UDP"}]}});
    let slice = json!({"metadata": {"name": "dsr6-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "dsr6"}},
        "addressType": "IPv6",
        "endpoints": [{"addresses": [BACKEND], "nodeName": "n2"}],
        "ports": [{"name": "t", "port": 8080, "protocol": "TCP"},
                  {"name": "u", "port": 8080, "protocol": "UDP"}]});
    Harness::two_nodes(&node, &svc, [slice.clone(), slice])
}

fn from_client(sport: u16) -> Tuple6 {
    Tuple6 {
        src: addr(CLIENT),
        sport,
        dst: addr(FRONTEND),
        dport: 80,
    }
}

/// The destination options header that names FRONTEND:80 in front of
/// `next`.
fn dsr_header(next: u8) -> Vec<u8> {
    let mut h = vec![next, 2, DSR_OPTION6_TYPE, DSR_OPTION6_DATA_LEN, 0, 80];
    h.extend_from_slice(&addr(FRONTEND).octets());
    h.extend_from_slice(&[1, 0]);
    h
}

/// The entry node keeps the client's address and names the frontend in
/// the SYN alone (and in every datagram); the backend's node learns from
/// it, and its pod's replies leave from the frontend. With `snat` the SYN
/// is masqueraded and carries nothing.
#[privileged_test]
fn ipv6_dsr_keeps_the_client_address_and_the_backends_node_answers_as_the_frontend() {
    for (i, wire) in Program::WIRE.into_iter().enumerate() {
        let [entry, backend_node] = two_nodes(LbMode::Dsr);
        let client = from_client(40_000 + i as u16);
        let (verdict, syn) = entry.run(wire, &tcp6(&client, TCP_SYN, &[], &[]));
        assert_eq!(verdict, wire.pass(), "{wire:?}");
        let p = parse6(&syn);
        assert_eq!((p.src, p.sport), (addr(CLIENT), client.sport), "{wire:?}");
        assert_eq!((p.dst, p.dport), (addr(BACKEND), 8080), "{wire:?}");
        assert!(p.l4_checksum_ok, "{wire:?}: {p:?}");
        assert_eq!(
            p.ext_headers,
            dsr_header(6),
            "{wire:?}: the SYN names the frontend"
        );
        let (_, ack) = entry.run(wire, &tcp6(&client, TCP_ACK, &[], &[]));
        let p = parse6(&ack);
        assert_eq!(p.dst, addr(BACKEND), "{wire:?}");
        assert!(p.ext_headers.is_empty(), "{wire:?}: later segments go bare");
        let (_, datagram) = entry.run(wire, &udp6(&client, b"hi"));
        let p = parse6(&datagram);
        assert_eq!(p.ext_headers, dsr_header(17), "{wire:?}: every datagram");
        assert!(p.l4_checksum_ok, "{wire:?}: {p:?}");

        let (verdict, _) = backend_node.run(wire, &syn);
        assert_eq!(verdict, wire.pass(), "{wire:?}: the SYN goes on to the pod");
        assert_eq!(backend_node.stat6(stats::DSR_LEARNED), 1, "{wire:?}");
        assert!(backend_node
            .conntrack6()
            .iter()
            .any(|(_, v)| v.flags & CT_FLAG_DSR != 0));
        let reply = Tuple6 {
            src: addr(BACKEND),
            sport: 8080,
            dst: addr(CLIENT),
            dport: client.sport,
        };
        let (_, out) = backend_node.run(Program::TcPod, &tcp6(&reply, TCP_SYN | TCP_ACK, &[], &[]));
        let p = parse6(&out);
        assert_eq!(
            (p.src, p.sport),
            (addr(FRONTEND), 80),
            "{wire:?}: from the frontend"
        );
        assert_eq!((p.dst, p.dport), (addr(CLIENT), client.sport), "{wire:?}");
        assert!(p.l4_checksum_ok, "{wire:?}: {p:?}");

        let [snat, _] = two_nodes(LbMode::Snat);
        let (_, out) = snat.run(wire, &tcp6(&client, TCP_SYN, &[], &[]));
        let p = parse6(&out);
        assert_ne!(p.src, addr(CLIENT), "{wire:?}: snat masquerades");
        assert!(p.ext_headers.is_empty(), "{wire:?}");
    }
}
