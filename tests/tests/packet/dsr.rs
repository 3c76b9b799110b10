//! Direct server return through two nodes' data paths: the entry node's
//! (XDP or tc on the wire) and the backend's node's (the wire hook that
//! learns, tc on the pod's veth that answers).

use std::net::Ipv4Addr;

use lb_common::{stats, CT_DIR_REPLY, CT_FLAG_DSR, DSR_OPTION_LEN, DSR_OPTION_TYPE};
use lb_lab::{
    packet::{self, Tuple, TCP_ACK, TCP_SYN},
    packet_harness::{Harness, Program},
    privileged_test,
};
use lb_userspace::{model::LbMode, translate::NodeInfo};
use serde_json::json;

const FRONTEND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 31);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 5);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);

/// The entry node and the backend's node, each serving an externalIP
/// Service (TCP and UDP port 80) whose one endpoint runs on node n2, in
/// `mode`.
fn two_nodes(mode: LbMode) -> [Harness; 2] {
    let node = NodeInfo {
        name: "n1".into(),
        ipv6_off: true,
        lb_mode: mode,
        ..NodeInfo::default()
    };
    let svc = json!({"metadata": {"name": "dsr", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.31", "externalIPs": [FRONTEND.to_string()],
            "ports": [{"name": "t", "port": 80, "protocol": "TCP"},
                      {"name": "u", "port": 80, "protocol": "UDP"}]}});
    let slice = json!({"metadata": {"name": "dsr-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "dsr"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [BACKEND.to_string()], "nodeName": "n2"}],
        "ports": [{"name": "t", "port": 8080, "protocol": "TCP"},
                  {"name": "u", "port": 8080, "protocol": "UDP"}]});
    Harness::two_nodes(&node, &svc, [slice.clone(), slice])
}

fn from_client(sport: u16) -> Tuple {
    Tuple {
        src: CLIENT,
        sport,
        dst: FRONTEND,
        dport: 80,
    }
}

/// The option that names FRONTEND:80.
fn origin_option() -> Vec<u8> {
    let mut o = vec![DSR_OPTION_TYPE, DSR_OPTION_LEN, 0, 80];
    o.extend_from_slice(&FRONTEND.octets());
    o
}

/// The entry node keeps the client's address and names the frontend in
/// the SYN alone; the backend's node learns from that SYN, and its pod's
/// replies leave with the frontend as source, to the client. Per wire
/// program; with `snat` the same SYN is masqueraded and carries nothing.
#[privileged_test]
fn dsr_keeps_the_client_address_and_the_backends_node_answers_as_the_frontend() {
    for (i, wire) in Program::WIRE.into_iter().enumerate() {
        let [entry, backend_node] = two_nodes(LbMode::Dsr);
        let client = from_client(40_000 + i as u16);
        let (verdict, syn) = entry.run(wire, &packet::tcp(&client, TCP_SYN, 1, &[], &[]));
        assert_eq!(verdict, wire.pass(), "{wire:?}");
        let p = packet::parse(&syn);
        assert_eq!(
            (p.src, p.sport),
            (CLIENT, client.sport),
            "{wire:?}: source kept"
        );
        assert_eq!((p.dst, p.dport), (BACKEND, 8080), "{wire:?}");
        assert!(p.ip_checksum_ok && p.l4_checksum_ok, "{wire:?}: {p:?}");
        assert_eq!(
            p.ip_options,
            origin_option(),
            "{wire:?}: the SYN names the frontend"
        );
        let (_, ack) = entry.run(wire, &packet::tcp(&client, TCP_ACK, 2, &[], &[]));
        let p = packet::parse(&ack);
        assert_eq!(p.dst, BACKEND, "{wire:?}");
        assert!(p.ip_options.is_empty(), "{wire:?}: later segments go bare");
        assert!(entry.stat(stats::DSR_FORWARDED) >= 2, "{wire:?}");

        let (verdict, _) = backend_node.run(wire, &syn);
        assert_eq!(verdict, wire.pass(), "{wire:?}: the SYN goes on to the pod");
        assert_eq!(backend_node.stat(stats::DSR_LEARNED), 1, "{wire:?}");
        let learned = backend_node
            .conntrack()
            .into_iter()
            .find(|(k, v)| k.direction == CT_DIR_REPLY && v.flags & CT_FLAG_DSR != 0);
        assert!(learned.is_some(), "{wire:?}: a reply entry learned");
        let reply = Tuple {
            src: BACKEND,
            sport: 8080,
            dst: CLIENT,
            dport: client.sport,
        };
        let syn_ack = packet::tcp(&reply, TCP_SYN | TCP_ACK, 7, &[], &[]);
        let (_, out) = backend_node.run(Program::TcPod, &syn_ack);
        let p = packet::parse(&out);
        assert_eq!(
            (p.src, p.sport),
            (FRONTEND, 80),
            "{wire:?}: from the frontend"
        );
        assert_eq!((p.dst, p.dport), (CLIENT, client.sport), "{wire:?}");
        assert!(p.ip_checksum_ok && p.l4_checksum_ok, "{wire:?}: {p:?}");

        let [snat, _] = two_nodes(LbMode::Snat);
        let (_, out) = snat.run(wire, &packet::tcp(&client, TCP_SYN, 1, &[], &[]));
        let p = packet::parse(&out);
        assert_ne!(p.src, CLIENT, "{wire:?}: snat masquerades");
        assert!(p.ip_options.is_empty(), "{wire:?}");
    }
}

/// Every UDP datagram names the frontend (nothing tells a flow's first);
/// hybrid masquerades UDP and keeps DSR for TCP.
#[privileged_test]
fn dsr_names_the_frontend_in_every_datagram_and_hybrid_leaves_udp_to_snat() {
    for wire in Program::WIRE {
        let [entry, backend_node] = two_nodes(LbMode::Dsr);
        let client = from_client(41_000);
        for n in 0..3 {
            let (verdict, out) = entry.run(wire, &packet::udp(&client, b"hello", true));
            assert_eq!(verdict, wire.pass(), "{wire:?}");
            let p = packet::parse(&out);
            assert_eq!((p.src, p.dst), (CLIENT, BACKEND), "{wire:?} datagram {n}");
            assert_eq!(p.ip_options, origin_option(), "{wire:?} datagram {n}");
            assert!(p.ip_checksum_ok && p.l4_checksum_ok, "{wire:?}: {p:?}");
            backend_node.run(wire, &out);
        }
        // Learnt once; later datagrams find the entry theirs.
        assert_eq!(backend_node.stat(stats::DSR_LEARNED), 1, "{wire:?}");

        let [hybrid, _] = two_nodes(LbMode::Hybrid);
        let (_, out) = hybrid.run(wire, &packet::udp(&client, b"hello", true));
        let p = packet::parse(&out);
        assert_ne!(p.src, CLIENT, "{wire:?}: hybrid masquerades UDP");
        assert!(p.ip_options.is_empty(), "{wire:?}");
        let (_, out) = hybrid.run(wire, &packet::tcp(&client, TCP_SYN, 1, &[], &[]));
        assert_eq!(packet::parse(&out).ip_options, origin_option(), "{wire:?}");
    }
}

/// An option naming a frontend the node does not serve teaches nothing:
/// it is counted, and the packet goes on untouched.
#[privileged_test]
fn an_option_naming_an_unknown_frontend_teaches_nothing() {
    for wire in Program::WIRE {
        let [entry, backend_node] = two_nodes(LbMode::Dsr);
        let (_, mut syn) = entry.run(
            wire,
            &packet::tcp(&from_client(42_000), TCP_SYN, 1, &[], &[]),
        );
        // The option's address: the last 4 bytes of the 28-byte header.
        let at = 14 + 24;
        syn[at..at + 4].copy_from_slice(&[198, 51, 100, 99]);
        packet::refresh_ip_checksum(&mut syn);
        let (verdict, out) = backend_node.run(wire, &syn);
        assert_eq!(verdict, wire.pass(), "{wire:?}");
        assert_eq!(out, syn, "{wire:?}: untouched");
        assert_eq!(
            backend_node.stat(stats::DSR_UNKNOWN_FRONTEND),
            1,
            "{wire:?}"
        );
        assert_eq!(backend_node.stat(stats::DSR_LEARNED), 0, "{wire:?}");
    }
}
