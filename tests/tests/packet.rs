//! Packet tests: crafted packets through the real BPF programs with
//! BPF_PROG_TEST_RUN, checking bytes, verdicts and checksums.

use std::net::Ipv4Addr;

use lb_common::csum;
use lb_lab::{
    packet::{self, Tuple, TCP_ACK, TCP_RST, TCP_SYN},
    packet_harness::{
        default_masquerade_ports, Harness, Program, CLIENT, SVC, TC_ACT_OK, TC_ACT_REDIRECT,
        TC_ACT_SHOT, XDP_PASS, XDP_TX,
    },
    privileged_test,
};
use lb_userspace::{model::Protocol, translate::NodeInfo};
use serde_json::json;

#[path = "packet/dsr.rs"]
mod dsr;

fn to_svc(sport: u16, dport: u16) -> Tuple {
    Tuple {
        src: CLIENT,
        sport,
        dst: SVC,
        dport,
    }
}

const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const B2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);
const B3: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);

#[privileged_test]
fn tcp_syn_to_cluster_ip_is_translated_with_valid_checksums_by_xdp_and_tc() {
    let mut h = Harness::new();
    h.program(&[(80, Protocol::Tcp, &[(B1, 8080)])]);
    for (hook, sport) in [("xdp", 40000u16), ("tc", 40001)] {
        let syn = packet::tcp_syn(&to_svc(sport, 80));
        let (verdict, out) = if hook == "xdp" {
            h.run_xdp(&syn)
        } else {
            h.run_tc(&syn)
        };
        let ok = if hook == "xdp" { XDP_PASS } else { TC_ACT_OK };
        assert_eq!(verdict, ok, "{hook}: verdict");
        let p = packet::parse(&out);
        assert_eq!(
            (p.dst, p.dport),
            (B1, 8080),
            "{hook}: destination must be the backend"
        );
        assert_eq!(
            (p.src, p.sport),
            (CLIENT, sport),
            "{hook}: source must be kept"
        );
        assert!(p.ip_checksum_ok, "{hook}: IP checksum invalid");
        assert!(p.l4_checksum_ok, "{hook}: TCP checksum invalid");
        assert_eq!(out.len(), syn.len());
    }
}

#[privileged_test]
fn udp_datagram_to_cluster_ip_is_translated_and_reply_is_reverse_natted() {
    let mut h = Harness::new();
    h.program(&[(53, Protocol::Udp, &[(B2, 5353)])]);
    let t = to_svc(33333, 53);
    for (hook, run) in [("xdp", 0), ("tc", 1)] {
        let dgram = packet::udp(&t, b"query", true);
        let (verdict, out) = if run == 0 {
            h.run_xdp(&dgram)
        } else {
            h.run_tc(&dgram)
        };
        assert_eq!(
            verdict,
            if run == 0 { XDP_PASS } else { TC_ACT_OK },
            "{hook}"
        );
        let p = packet::parse(&out);
        assert_eq!((p.dst, p.dport), (B2, 5353), "{hook}");
        assert!(
            p.ip_checksum_ok && p.l4_checksum_ok,
            "{hook}: checksums {p:?}"
        );

        // The backend's answer leaves its pod (tc) or arrives from the wire (XDP).
        let reply = packet::udp(
            &Tuple {
                src: B2,
                sport: 5353,
                dst: CLIENT,
                dport: 33333,
            },
            b"answer",
            true,
        );
        let (verdict, out) = if run == 0 {
            h.run_xdp(&reply)
        } else {
            h.run_tc(&reply)
        };
        assert_eq!(
            verdict,
            if run == 0 { XDP_PASS } else { TC_ACT_OK },
            "{hook} reply"
        );
        let p = packet::parse(&out);
        assert_eq!(
            (p.src, p.sport),
            (SVC, 53),
            "{hook}: reply source must be the Service"
        );
        assert_eq!((p.dst, p.dport), (CLIENT, 33333));
        assert!(
            p.ip_checksum_ok && p.l4_checksum_ok,
            "{hook}: reply checksums {p:?}"
        );
    }
}

/// A sync large enough that its runs of slots and memberships are written
/// as two halves at once (from 4,096 writes a run): the maps read back hold
/// exactly what the writer recorded, and the first and last frontends are
/// served over every backend.
#[privileged_test]
fn a_large_sync_written_from_two_threads_reads_back_as_recorded() {
    const FRONTENDS: u32 = 1_000;
    let backends: Vec<(Ipv4Addr, u16)> = (0..10u8)
        .map(|i| (Ipv4Addr::new(10, 244, 1, 10 + i), 8080))
        .collect();
    let first = u32::from(Ipv4Addr::new(10, 101, 0, 1));
    let mut h = Harness::new();
    h.program_frontends(
        (first..first + FRONTENDS).map(Ipv4Addr::from),
        (80, Protocol::Tcp),
        &backends,
    );
    let read = h.maps.read_contents().expect("read the maps");
    assert_eq!(read.services.len(), 11 * FRONTENDS as usize);
    assert_eq!(read.backend_match.len(), 10 * FRONTENDS as usize);
    assert!(
        read == h.current,
        "the maps hold other entries than recorded"
    );
    for (n, dst) in [first, first + FRONTENDS - 1].into_iter().enumerate() {
        let t = Tuple {
            src: CLIENT,
            sport: 41_000 + n as u16,
            dst: Ipv4Addr::from(dst),
            dport: 80,
        };
        let (verdict, out) = h.run_xdp(&packet::tcp_syn(&t));
        let p = packet::parse(&out);
        assert_eq!(verdict, XDP_PASS);
        assert!(backends.contains(&(p.dst, p.dport)), "{p:?}");
    }
}

/// Reverse NAT ids are 32-bit: with 70,000 frontends, the last one's id
/// is past 16 bits, and its flows are translated, kept on their backend
/// (UDP checks the backend still belongs to the frontend, by id) and their
/// replies restored (the reverse NAT entry, found by the conntrack entry's
/// id).
#[privileged_test]
fn a_frontend_whose_reverse_nat_id_is_past_16_bits_is_translated_and_its_replies_restored() {
    const FRONTENDS: u32 = 70_000;
    let first = u32::from(Ipv4Addr::new(10, 100, 0, 1));
    let mut h = Harness::with_frontends(131_072);
    h.program_frontends(
        (first..first + FRONTENDS).map(Ipv4Addr::from),
        (53, Protocol::Udp),
        &[(B2, 5353)],
    );
    let last = Ipv4Addr::from(first + FRONTENDS - 1);
    let id = (h.current.rev_nat_id(std::net::IpAddr::V4(last), 53))
        .expect("the last frontend has an id");
    assert!(id > u32::from(u16::MAX), "id {id}");
    let to_last = Tuple {
        src: CLIENT,
        sport: 33333,
        dst: last,
        dport: 53,
    };
    for (hook, program) in [("xdp", Program::Xdp), ("tc", Program::TcPod)] {
        for _ in 0..2 {
            let (_, out) = h.run(program, &packet::udp(&to_last, b"query", true));
            let p = packet::parse(&out);
            assert_eq!((p.dst, p.dport), (B2, 5353), "{hook}: {p:?}");
        }
        let reply = Tuple {
            src: B2,
            sport: 5353,
            dst: CLIENT,
            dport: 33333,
        };
        let (_, out) = h.run(program, &packet::udp(&reply, b"answer", true));
        let p = packet::parse(&out);
        assert_eq!((p.src, p.sport), (last, 53), "{hook}: reply {p:?}");
        assert!(p.ip_checksum_ok && p.l4_checksum_ok, "{hook}: {p:?}");
    }
    let ids: Vec<u32> = h.conntrack().iter().map(|(_, v)| v.rev_nat_id()).collect();
    assert!(
        ids.iter().all(|i| *i == id),
        "conntrack ids {ids:?}, want {id}"
    );
}

#[privileged_test]
fn tcp_reply_gets_the_service_address_as_source() {
    let mut h = Harness::new();
    h.program(&[(80, Protocol::Tcp, &[(B1, 8080)])]);
    let (_, _) = h.run_tc(&packet::tcp_syn(&to_svc(41000, 80)));
    let synack = packet::tcp(
        &Tuple {
            src: B1,
            sport: 8080,
            dst: CLIENT,
            dport: 41000,
        },
        TCP_SYN | TCP_ACK,
        5,
        &[],
        &[],
    );
    let (verdict, out) = h.run_tc(&synack);
    assert_eq!(verdict, TC_ACT_OK);
    let p = packet::parse(&out);
    assert_eq!((p.src, p.sport), (SVC, 80));
    assert!(p.ip_checksum_ok && p.l4_checksum_ok, "{p:?}");
}

#[privileged_test]
fn udp_without_checksum_keeps_zero() {
    let mut h = Harness::new();
    h.program(&[(53, Protocol::Udp, &[(B2, 5353)])]);
    for run in 0..2 {
        let dgram = packet::udp(&to_svc(30000 + run, 53), b"q", false);
        let (_, out) = if run == 0 {
            h.run_xdp(&dgram)
        } else {
            h.run_tc(&dgram)
        };
        let p = packet::parse(&out);
        assert_eq!(p.dst, B2);
        assert!(
            p.udp_checksum_zero,
            "a zero UDP checksum means none and must stay zero"
        );
        assert!(p.ip_checksum_ok);
    }
}

#[privileged_test]
fn a_flow_keeps_its_backend_and_flows_spread_over_backends() {
    let mut h = Harness::new();
    h.program(&[(80, Protocol::Tcp, &[(B1, 8080), (B2, 8080), (B3, 8080)])]);
    let mut seen = std::collections::BTreeMap::new();
    for sport in 20000..20150u16 {
        let first = packet::parse(&h.run_xdp(&packet::tcp_syn(&to_svc(sport, 80))).1).dst;
        for _ in 0..3 {
            let ack = packet::tcp(&to_svc(sport, 80), TCP_ACK, 1001, &[], b"GET /");
            assert_eq!(
                packet::parse(&h.run_xdp(&ack).1).dst,
                first,
                "flow {sport} changed backend"
            );
        }
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        3,
        "150 flows must reach all 3 backends: {seen:?}"
    );
    for (b, n) in &seen {
        assert!(
            *n >= 25,
            "backend {b} got {n} of 150 flows (fair share 50): {seen:?}"
        );
    }
}

#[privileged_test]
fn non_service_truncated_and_malformed_packets_pass_byte_identical() {
    let mut h = Harness::new();
    h.program(&[
        (80, Protocol::Tcp, &[(B1, 8080)]),
        (53, Protocol::Udp, &[(B2, 5353)]),
    ]);
    let other = Tuple {
        src: CLIENT,
        sport: 1234,
        dst: Ipv4Addr::new(10, 96, 0, 11),
        dport: 80,
    };
    let wrong_port = to_svc(1234, 81);
    let syn = packet::tcp_syn(&to_svc(1234, 80));
    let mut bad_len = syn.clone();
    bad_len[packet::IP_OFF + 2..packet::IP_OFF + 4].copy_from_slice(&30u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("other address", packet::tcp_syn(&other)),
        ("other port", packet::tcp_syn(&wrong_port)),
        (
            "wrong protocol for the port",
            packet::udp(&to_svc(1234, 80), b"x", true),
        ),
        ("ARP", packet::arp(&to_svc(0, 0))),
        ("IPv6", packet::ipv6_tcp()),
        (
            "ICMP to the service address",
            packet::icmp_echo(&to_svc(0, 0)),
        ),
        (
            "fragment to the service",
            packet::as_fragment(packet::udp(&to_svc(1234, 53), b"frag", true)),
        ),
        ("IP options to the service", packet::with_ip_options(&syn)),
        ("TCP header cut short", syn[..packet::L4_OFF + 12].to_vec()),
        (
            "UDP header cut short",
            packet::udp(&to_svc(1234, 53), b"", true)[..packet::L4_OFF + 4].to_vec(),
        ),
        ("IP header cut short", syn[..packet::IP_OFF + 10].to_vec()),
        ("IP total length shorter than its headers", bad_len),
        // The kernel refuses test input shorter than an Ethernet header.
        (
            "Ethernet header alone, claiming IPv4",
            syn[..packet::ETH_HLEN].to_vec(),
        ),
    ];
    for (name, pkt) in cases {
        let (verdict, out) = h.run_xdp(&pkt);
        assert_eq!(verdict, XDP_PASS, "XDP: {name}");
        assert_eq!(out, pkt, "XDP must not touch: {name}");
        // BPF_PROG_TEST_RUN refuses (EINVAL) skb input of an IPv4 frame
        // shorter than an IP header, so tc sees those only from the stack.
        if pkt.len() >= packet::IP_OFF + 20 {
            let (verdict, out) = h.run_tc(&pkt);
            assert_eq!(verdict, TC_ACT_OK, "tc: {name}");
            assert_eq!(out, pkt, "tc must not touch: {name}");
        }
    }
}

#[privileged_test]
fn tcp_to_a_service_without_endpoints_is_answered_with_a_reset() {
    let mut h = Harness::new();
    h.program(&[(80, Protocol::Tcp, &[])]);
    let syn = packet::tcp_syn(&to_svc(45000, 80));
    for hook in ["xdp", "tc"] {
        let (verdict, out) = if hook == "xdp" {
            h.run_xdp(&syn)
        } else {
            h.run_tc(&syn)
        };
        assert_eq!(
            verdict,
            if hook == "xdp" {
                XDP_TX
            } else {
                TC_ACT_REDIRECT
            },
            "{hook}"
        );
        let p = packet::parse(&out);
        assert_eq!(
            p.tcp_flags,
            TCP_RST | TCP_ACK,
            "{hook}: RST|ACK expected: {p:?}"
        );
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (SVC, 80, CLIENT, 45000),
            "{hook}: {p:?}"
        );
        assert_eq!(p.ack, 1001, "{hook}: acknowledges the SYN");
        assert_eq!(p.seq, 0);
        assert!(
            p.ip_checksum_ok && p.l4_checksum_ok,
            "{hook}: checksums {p:?}"
        );
        assert_eq!(
            (p.src_mac, p.dst_mac),
            (packet::NODE_MAC, packet::CLIENT_MAC),
            "{hook}: MACs swapped"
        );
        assert_eq!(out.len(), 54, "{hook}: options trimmed");
    }
    // An ACK-bearing segment gets a RST whose sequence is that ACK.
    let ack = packet::tcp(&to_svc(45001, 80), TCP_ACK, 1, &[], &[]);
    let (_, out) = h.run_tc(&ack);
    let p = packet::parse(&out);
    assert_eq!((p.tcp_flags, p.seq), (TCP_RST, 7777));
    assert!(p.l4_checksum_ok);
    let (verdict, _) = h.run_tc(&packet::udp(&to_svc(45002, 80), b"x", true));
    assert_eq!(verdict, TC_ACT_OK, "UDP to a TCP-only Service is not ours");
}

/// A segment with payload to a Service without endpoints: XDP answers it
/// with a RST (it rebuilds the whole packet); tc does not (its checksum
/// helpers cannot take the payload out of a partial checksum), so it
/// drops it and counts it under its own reason, beside the total.
#[privileged_test]
fn a_segment_with_payload_to_a_service_without_endpoints_is_dropped_by_tc_and_counted_by_reason() {
    use lb_common::stats::{self, RejectFailure};
    let mut h = Harness::new();
    h.program(&[(80, Protocol::Tcp, &[])]);
    let data = packet::tcp(&to_svc(45003, 80), TCP_ACK, 1, &[], b"GET /");
    assert_eq!(h.run_xdp(&data).0, XDP_TX, "xdp answers");
    assert_eq!(h.stat(stats::NO_BACKEND_REJECTED), 1);
    assert_eq!(h.run_tc(&data).0, TC_ACT_SHOT, "tc drops");
    assert_eq!(h.stat(stats::NO_BACKEND_DROPPED), 1);
    assert_eq!(h.stat(RejectFailure::NotAnswerable.counter()), 1);
    assert_eq!(h.stat(RejectFailure::OutOfBounds.counter()), 0);
    assert_eq!(h.stat(stats::REWRITE_FAILED), 0);
}

/// Checks an ICMP port unreachable answering `sent`; `finished_check` is
/// the quoted UDP checksum once the kernel has finished a partial one.
fn assert_port_unreachable(hook: &str, sent: &[u8], out: &[u8], finished_check: [u8; 2]) {
    assert_eq!(
        out.len(),
        70,
        "{hook}: Ethernet + IPv4 + ICMP + quoted 28 bytes"
    );
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&sent[6..12], &sent[0..6]),
        "{hook}: MACs swapped"
    );
    assert_eq!(out[23], 1, "{hook}: ICMP");
    assert_eq!(
        &out[26..30],
        &SVC.octets(),
        "{hook}: from the Service address"
    );
    assert_eq!(&out[30..34], &CLIENT.octets(), "{hook}: to the client");
    assert_eq!(csum::checksum(&out[14..34], 0), 0, "{hook}: IPv4 checksum");
    assert_eq!(
        (out[34], out[35]),
        (3, 3),
        "{hook}: destination/port unreachable"
    );
    assert_eq!(
        &out[42..62],
        &sent[14..34],
        "{hook}: quotes the IPv4 header"
    );
    assert_eq!(
        &out[62..68],
        &sent[34..40],
        "{hook}: quotes the UDP ports and length"
    );
    let mut icmp = out[34..70].to_vec();
    icmp[34..36].copy_from_slice(&finished_check);
    assert_eq!(csum::checksum(&icmp, 0), 0, "{hook}: ICMP checksum");
}

#[privileged_test]
fn udp_to_a_service_without_endpoints_is_answered_with_port_unreachable() {
    let mut h = Harness::new();
    h.program(&[(53, Protocol::Udp, &[])]);
    for payload in [&b""[..], b"x", &[7u8; 1200]] {
        let sent = packet::udp(&to_svc(45003, 53), payload, true);
        let check = [sent[40], sent[41]];
        let (verdict, out) = h.run_xdp(&sent);
        assert_eq!(verdict, XDP_TX);
        assert_port_unreachable("xdp", &sent, &out, check);
        let (verdict, out) = h.run_tc(&sent);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_port_unreachable("tc", &sent, &out, check);
    }
    // A pod's datagram with a partial checksum (the pseudo header sum): the
    // answer's ICMP checksum covers the value the kernel will finish it to.
    let mut sent = packet::udp(&to_svc(45004, 53), b"abc", false);
    let pseudo = csum::fold(csum::pseudo_header_sum(
        u32::from_ne_bytes(CLIENT.octets()),
        u32::from_ne_bytes(SVC.octets()),
        17,
        11,
    ));
    sent[40..42].copy_from_slice(&pseudo.to_ne_bytes());
    let (verdict, out) = h.run_tc(&sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let finished = csum::checksum(&out[62..70], 0).to_ne_bytes();
    assert_port_unreachable("tc, partial checksum", &sent, &out, finished);
}

#[privileged_test]
fn a_deleted_backend_moves_its_flows_to_a_live_one() {
    let mut h = Harness::new();
    h.program(&[(53, Protocol::Udp, &[(B1, 5353)])]);
    let t = to_svc(50000, 53);
    assert_eq!(
        packet::parse(&h.run_xdp(&packet::udp(&t, b"1", true)).1).dst,
        B1
    );
    h.program(&[(53, Protocol::Udp, &[(B2, 5353)])]);
    assert_eq!(
        packet::parse(&h.run_xdp(&packet::udp(&t, b"2", true)).1).dst,
        B2
    );
}

use lb_lab::packet_harness::NODE;

#[privileged_test]
fn nodeport_from_the_wire_is_masqueraded_and_its_reply_restored() {
    for wire in Program::WIRE {
        for proto in ["tcp", "udp"] {
            nodeport_round_trip(wire, proto);
        }
    }
}

/// A NodePort service of one backend (B1:8080) on node address NODE.
fn nodeport_harness(h: &mut Harness) {
    let node = NodeInfo {
        name: "n1".into(),
        nodeport_addresses: vec![NODE.into()],
        zone: None,
        ipv6_off: false,
        lb_algorithm: lb_userspace::model::LbAlgorithm::Random,
        lb_mode: lb_userspace::model::LbMode::Snat,
    };
    let svc = json!({"metadata": {"name": "np", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [
            {"name": "t", "port": 80, "nodePort": 30080, "protocol": "TCP"},
            {"name": "u", "port": 80, "nodePort": 30080, "protocol": "UDP"}]}});
    let slice = json!({"metadata": {"name": "np-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "np"}},
        "addressType": "IPv4",
        "ports": [{"name": "t", "port": 8080, "protocol": "TCP"}, {"name": "u", "port": 8080, "protocol": "UDP"}],
        "endpoints": [{"addresses": [B1.to_string()], "nodeName": "n1"}]});
    h.program_objects(&node, &[svc], &[slice]);
}

fn nodeport_round_trip(wire: Program, proto: &str) {
    let mut h = Harness::new();
    nodeport_harness(&mut h);
    let to_node = Tuple {
        src: CLIENT,
        sport: 45000,
        dst: NODE,
        dport: 30080,
    };
    let sent = if proto == "tcp" {
        packet::tcp(&to_node, TCP_SYN, 1000, &[], &[])
    } else {
        packet::udp(&to_node, b"question", true)
    };
    let (verdict, out) = h.run(wire, &sent);
    assert_eq!(verdict, wire.pass(), "{wire:?} {proto}");
    let p = packet::parse(&out);
    assert_eq!(
        (p.dst, p.dport),
        (B1, 8080),
        "{wire:?} {proto}: DNAT: {p:?}"
    );
    assert_eq!(p.src, NODE, "{wire:?} {proto}: masqueraded: {p:?}");
    assert!(
        default_masquerade_ports()
            .iter()
            .any(|r| (r.first..=r.last).contains(&p.sport)),
        "{wire:?} {proto}: masquerade port {} outside the ranges",
        p.sport
    );
    assert!(
        p.ip_checksum_ok && p.l4_checksum_ok,
        "{wire:?} {proto}: {p:?}"
    );
    let again = packet::parse(&h.run(wire, &sent).1);
    assert_eq!(
        again.sport, p.sport,
        "{wire:?} {proto}: a flow keeps its port"
    );

    // The backend's reply, leaving its pod: both ends restored.
    let back = Tuple {
        src: B1,
        sport: 8080,
        dst: NODE,
        dport: p.sport,
    };
    let reply = if proto == "tcp" {
        packet::tcp(&back, TCP_SYN | TCP_ACK, 5000, &[], &[])
    } else {
        packet::udp(&back, b"answer", true)
    };
    let (verdict, out) = h.run_tc(&reply);
    assert!(
        verdict == TC_ACT_OK || verdict == TC_ACT_REDIRECT,
        "{proto}: verdict {verdict}"
    );
    let r = packet::parse(&out);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (NODE, 30080, CLIENT, 45000),
        "{wire:?} {proto}: reply restored: {r:?}"
    );
    assert!(r.ip_checksum_ok && r.l4_checksum_ok, "{proto}: {r:?}");
}

#[privileged_test]
fn a_direct_connection_reusing_a_translated_tuple_is_left_alone() {
    let mut h = Harness::new();
    h.program(&[(80, Protocol::Tcp, &[(B1, 8080)])]);
    // A translated connection from client port 40000 leaves a reply entry
    // for B1:8080 -> client:40000.
    let syn = packet::tcp(&to_svc(40000, 80), TCP_SYN, 1, &[], &[]);
    assert_eq!(packet::parse(&h.run_tc(&syn).1).dst, B1);
    // Then the same port connects to B1 directly (socket LB, or a pod to a
    // pod): its SYN passes, and its replies must keep B1 as their source.
    let direct = Tuple {
        src: CLIENT,
        sport: 40000,
        dst: B1,
        dport: 8080,
    };
    let (verdict, out) = h.run_tc(&packet::tcp(&direct, TCP_SYN, 100, &[], &[]));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(packet::parse(&out).dst, B1);
    let back = Tuple {
        src: B1,
        sport: 8080,
        dst: CLIENT,
        dport: 40000,
    };
    let (verdict, out) = h.run_tc(&packet::tcp(&back, TCP_SYN | TCP_ACK, 500, &[], &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let p = packet::parse(&out);
    assert_eq!(
        (p.src, p.sport),
        (B1, 8080),
        "the direct connection's SYN-ACK was rewritten by a leftover: {p:?}"
    );
}

/// xorshift64*: a small deterministic generator, so a failing packet can be
/// reproduced from the printed seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The frontend a packet is service traffic for, read straight off the
/// bytes: Ethernet + IPv4 with a 20-byte header, TCP or UDP, not a
/// fragment, total length and captured length covering the L4 header, and
/// (address, port, protocol) programmed. Everything else must pass as is.
fn service_frontend(p: &[u8], frontends: &[(Ipv4Addr, u16, u8)]) -> Option<(Ipv4Addr, u16, u8)> {
    let ip = packet::IP_OFF;
    if p.len() < ip + 20 || p[12..14] != [0x08, 0x00] || p[ip] != 0x45 {
        return None;
    }
    let proto = p[ip + 9];
    let l4_len = match proto {
        6 => 20,
        17 => 8,
        _ => return None,
    };
    let frag = u16::from_be_bytes([p[ip + 6], p[ip + 7]]) & 0x3fff;
    let total = u16::from_be_bytes([p[ip + 2], p[ip + 3]]) as usize;
    if frag != 0 || total < 20 + l4_len || p.len() < packet::L4_OFF + l4_len {
        return None;
    }
    let dst = Ipv4Addr::new(p[ip + 16], p[ip + 17], p[ip + 18], p[ip + 19]);
    let dport = u16::from_be_bytes([p[packet::L4_OFF + 2], p[packet::L4_OFF + 3]]);
    frontends
        .iter()
        .copied()
        .find(|f| *f == (dst, dport, proto))
}

/// Ethernet + IPv4 + TCP/UDP headers with random fields (addresses and
/// ports mostly from small pools so some hit a Service), random IHL,
/// fragment bits, total length, checksums and payload.
fn random_headers(rng: &mut XorShift) -> Vec<u8> {
    let svc_ports = [80u16, 53, 81, 0, 65535];
    let dst = match rng.below(4) {
        0 | 1 => SVC,
        2 => Ipv4Addr::new(10, 96, 0, 11),
        _ => Ipv4Addr::from(rng.next() as u32),
    };
    // Never a backend: a packet from one could be a tracked flow's reply.
    let src = match rng.below(3) {
        0 => CLIENT,
        1 => Ipv4Addr::new(192, 0, 2, rng.next() as u8),
        _ => Ipv4Addr::new(172, 16, rng.next() as u8, rng.next() as u8),
    };
    let any_proto = rng.next() as u8;
    let proto = rng.pick(&[6u8, 6, 17, 17, 1, 47, any_proto]);
    let sport = rng.next() as u16;
    let dport = if rng.below(3) == 0 {
        rng.next() as u16
    } else {
        rng.pick(&svc_ports)
    };
    let t = Tuple {
        src,
        sport,
        dst,
        dport,
    };
    let payload_len = rng.below(40);
    let payload = rng.bytes(payload_len);
    let mut p = if proto == 17 {
        packet::udp(&t, &payload, rng.below(2) == 0)
    } else {
        let mut p = packet::tcp(&t, rng.next() as u8, rng.next() as u32, &[], &payload);
        p[packet::IP_OFF + 9] = proto;
        p
    };
    let ip = packet::IP_OFF;
    match rng.below(10) {
        0 => p[ip] = 0x40 | rng.below(16) as u8, // any IHL
        1 => p[ip] = rng.next() as u8,           // any version and IHL
        2 => p = packet::with_ip_options(&p),
        _ => {}
    }
    match rng.below(8) {
        0 => p[ip + 6] |= 0x20, // more fragments
        1 => p[ip + 7] = rng.next() as u8 | 1,
        _ => {}
    }
    if rng.below(5) == 0 {
        let len = rng.next() as u16 % 80;
        p[ip + 2..ip + 4].copy_from_slice(&len.to_be_bytes());
    }
    if rng.below(5) == 0 {
        // Garbage checksums: the programs must not care.
        p[ip + 10] = rng.next() as u8;
        let l4_csum = packet::L4_OFF + if proto == 17 { 6 } else { 16 };
        if l4_csum < p.len() {
            p[l4_csum] = rng.next() as u8;
        }
    }
    if rng.below(4) == 0 {
        let cut = packet::ETH_HLEN + rng.below(p.len() - packet::ETH_HLEN + 1);
        p.truncate(cut);
    }
    p
}

/// Tallies of one fuzz run, printed at the end.
#[derive(Debug, Default)]
struct FuzzCounts {
    sent: usize,
    passed_untouched: usize,
    translated: usize,
    tc_refused_by_kernel: usize,
}

/// Runs `pkt` through both programs: a packet that is not service traffic
/// must come out byte-identical with XDP_PASS / TC_ACT_OK; service traffic
/// must come out with only its destination and checksums changed.
fn check_fuzzed(
    h: &Harness,
    kind: &str,
    pkt: &[u8],
    frontends: &[(Ipv4Addr, u16, u8)],
    backends: &[(Ipv4Addr, u16)],
    counts: &mut FuzzCounts,
) {
    let frontend = service_frontend(pkt, frontends);
    // (hook, verdict and bytes out unless the kernel refused the input, pass verdict)
    type HookRun<'a> = (&'a str, Option<(u32, Vec<u8>)>, u32);
    let hooks: [HookRun; 2] = [
        ("xdp", Some(h.run_xdp(pkt)), XDP_PASS),
        (
            "tc",
            match h.try_run_tc(pkt) {
                Ok(r) => Some(r),
                // The kernel's own check on skb input (an IPv4 frame shorter
                // than an IP header); the stack never hands tc such a frame.
                Err(_) if pkt.len() < packet::IP_OFF + 20 => {
                    counts.tc_refused_by_kernel += 1;
                    None
                }
                Err(e) => panic!("{kind}: tc test run failed on {pkt:02x?}: {e}"),
            },
            TC_ACT_OK,
        ),
    ];
    for (hook, result, ok) in hooks {
        let Some((verdict, out)) = result else {
            continue;
        };
        counts.sent += 1;
        assert_eq!(verdict, ok, "{hook} {kind}: verdict for {pkt:02x?}");
        let Some(f) = frontend else {
            assert_eq!(out, pkt, "{hook} {kind}: not service traffic, yet modified");
            counts.passed_untouched += 1;
            continue;
        };
        assert_eq!(out.len(), pkt.len(), "{hook} {kind}: length changed");
        let l4_csum = packet::L4_OFF + if f.2 == 17 { 6 } else { 16 };
        let may_change = |i: usize| {
            (packet::IP_OFF + 10..packet::IP_OFF + 12).contains(&i)
                || (packet::IP_OFF + 16..packet::IP_OFF + 20).contains(&i)
                || (packet::L4_OFF + 2..packet::L4_OFF + 4).contains(&i)
                || (l4_csum..l4_csum + 2).contains(&i)
        };
        for (i, (a, b)) in pkt.iter().zip(&out).enumerate() {
            assert!(
                a == b || may_change(i),
                "{hook} {kind}: byte {i} changed ({a:#04x} -> {b:#04x}) in {pkt:02x?}"
            );
        }
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let dport = u16::from_be_bytes([out[36], out[37]]);
        assert!(
            backends.contains(&(dst, dport)),
            "{hook} {kind}: {f:?} went to {dst}:{dport}"
        );
        counts.translated += 1;
    }
}

#[privileged_test]
fn thousands_of_random_truncated_and_malformed_packets_leave_non_service_traffic_untouched() {
    let seed = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed0f_1bc0_ffee_u64);
    let mut rng = XorShift(seed);
    let mut h = Harness::new();
    h.program(&[
        (80, Protocol::Tcp, &[(B1, 8080)]),
        (53, Protocol::Udp, &[(B2, 5353)]),
        (65535, Protocol::Tcp, &[(B3, 65535)]),
    ]);
    let frontends = [(SVC, 80, 6), (SVC, 53, 17), (SVC, 65535, 6)];
    let backends = [(B1, 8080), (B2, 5353), (B3, 65535)];
    let mut counts = FuzzCounts::default();

    // Random bytes, often claiming IPv4 (and a 20-byte header) so they get
    // past the first checks.
    for _ in 0..8000 {
        let len = packet::ETH_HLEN + rng.below(120);
        let mut p = rng.bytes(len);
        if rng.below(2) == 0 {
            p[12..14].copy_from_slice(&[0x08, 0x00]);
            if len > packet::IP_OFF && rng.below(2) == 0 {
                p[packet::IP_OFF] = 0x45;
            }
        }
        check_fuzzed(&h, "random bytes", &p, &frontends, &backends, &mut counts);
    }
    // Valid-looking headers with random fields.
    for _ in 0..16000 {
        let p = random_headers(&mut rng);
        check_fuzzed(&h, "random headers", &p, &frontends, &backends, &mut counts);
    }
    // A valid service packet cut at every length.
    let syn = packet::tcp(&to_svc(45000, 80), TCP_SYN, 1, &[2, 4, 5, 0xb4], b"hello");
    let dgram = packet::udp(&to_svc(45001, 53), b"query", true);
    for full in [&syn, &dgram] {
        for len in packet::ETH_HLEN..=full.len() {
            check_fuzzed(
                &h,
                "truncated",
                &full[..len],
                &frontends,
                &backends,
                &mut counts,
            );
        }
    }
    // Service packets with options, fragment bits, bad IHL, bad total length.
    for full in [&syn, &dgram] {
        let ip = packet::IP_OFF;
        let mut variants = vec![
            packet::with_ip_options(full),
            packet::as_fragment(full.clone()),
        ];
        for ihl in 0..16u8 {
            let mut p = full.clone();
            p[ip] = 0x40 | ihl;
            variants.push(p);
        }
        for total in [0u16, 19, 20, 27, 39, 40, 41, 1500, u16::MAX] {
            let mut p = full.clone();
            p[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            variants.push(p);
        }
        let mut more_fragments = full.clone();
        more_fragments[ip + 6] |= 0x20;
        variants.push(more_fragments);
        for p in variants {
            check_fuzzed(
                &h,
                "malformed service packet",
                &p,
                &frontends,
                &backends,
                &mut counts,
            );
        }
    }
    eprintln!("seed {seed:#x} (set LB_FUZZ_SEED to replay): {counts:?}");
    assert!(counts.sent > 45_000, "{counts:?}");
    assert!(
        counts.translated > 500 && counts.passed_untouched > 40_000,
        "the generator must reach both kinds: {counts:?}"
    );
}

#[privileged_test]
fn a_service_with_ten_thousand_backends_spreads_new_flows_over_all_of_them() {
    const N: usize = 10_000;
    let mut h = Harness::new();
    let backend = |i: usize| Ipv4Addr::new(10, 20, (i >> 8) as u8, i as u8);
    let addresses: Vec<String> = (0..N).map(|i| backend(i).to_string()).collect();
    h.program_objects(
        &NodeInfo::default(),
        &[json!({
            "metadata": {"name": "big", "namespace": "default"},
            "spec": {"clusterIP": SVC.to_string(), "ports": [{"name": "http", "port": 80}]}
        })],
        &[json!({
            "metadata": {"name": "big-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "big"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>()
        })],
    );
    let mut chosen = std::collections::BTreeSet::new();
    let flows = 4000u16;
    for i in 0..flows {
        let (verdict, out) = h.run_xdp(&packet::tcp_syn(&Tuple {
            src: Ipv4Addr::new(192, 0, 2, (i % 200) as u8),
            sport: 20000 + i,
            dst: SVC,
            dport: 80,
        }));
        assert_eq!(verdict, XDP_PASS);
        let p = packet::parse(&out);
        assert_eq!(p.dport, 8080);
        assert!(p.ip_checksum_ok && p.l4_checksum_ok, "{p:?}");
        let [_, _, hi, lo] = p.dst.octets();
        let index = (hi as usize) << 8 | lo as usize;
        assert!(
            index < N && p.dst == backend(index),
            "{} is not a backend",
            p.dst
        );
        chosen.insert(index);
    }
    let above_old_limit = chosen.iter().filter(|i| **i >= 4096).count();
    eprintln!(
        "{flows} SYNs reached {} distinct backends of {N}, {above_old_limit} of them past slot 4096, highest {:?}",
        chosen.len(),
        chosen.last()
    );
    // 4,000 uniform picks of 10,000: about 3,300 distinct, 59% past 4096.
    assert!(chosen.len() > 3000, "{} distinct", chosen.len());
    assert!(above_old_limit > 1500, "{above_old_limit} past slot 4096");
    assert!(chosen.last().is_some_and(|i| *i >= N - 100));
}

/// The agent writes runs of entries as batch syscalls: in order, a delete
/// of an absent key is no failure, and a write the map refuses stops the
/// batch there, reporting how many went in before it.
#[privileged_test]
fn batched_map_writes_go_in_order_skip_absent_deletes_and_stop_at_a_refused_write() {
    use lb_common::{Service4Value, MAX_BACKENDS};
    use lb_userspace::{
        model::Family,
        sync::{
            differ::{BackendEntry, BackendId, MapOp, SlotKey},
            map_writer::{MapWriter, WriteError},
        },
    };
    use std::net::IpAddr;
    let mut h = Harness::new();
    let key = |slot: u16| SlotKey {
        addr: IpAddr::from([10, 96, 9, 9]),
        port: 80,
        backend_slot: slot,
        proto: 6,
        scope: 0,
    };
    let value = |id: u32| Service4Value {
        backend_id: id,
        ..Default::default()
    };
    let puts: Vec<MapOp> = (1..=5000u16)
        .map(|s| MapOp::PutService(key(s), value(u32::from(s))))
        .collect();
    h.maps
        .apply_batch(&puts)
        .expect("5,000 puts in two batches");
    let held = h.maps.read_contents().expect("read").services;
    assert_eq!(held.len(), 5000);
    assert_eq!(held.get(&key(4321)), Some(&value(4321)));

    // Slot 9,999 was never written: deleting it is no failure.
    let deletes: Vec<MapOp> = [1u16, 9999, 2, 3]
        .iter()
        .map(|s| MapOp::DeleteService(key(*s)))
        .collect();
    h.maps
        .apply_batch(&deletes)
        .expect("absent keys are skipped");
    let held = h.maps.read_contents().expect("read").services;
    assert_eq!(held.len(), 4997);
    assert!(!held.contains_key(&key(3)));

    // An id past the array's end is refused (E2BIG): the batch stops there.
    let backend = BackendEntry {
        addr: IpAddr::from([10, 244, 0, 9]),
        port: 8080,
        proto: 6,
        state: 0,
        zone: 0,
    };
    let id = |id: u32| BackendId {
        family: Family::Ipv4,
        id,
    };
    let writes = [
        MapOp::PutBackend(id(7), backend),
        MapOp::PutBackend(id(MAX_BACKENDS + 1), backend),
        MapOp::PutBackend(id(8), backend),
    ];
    let (written, error) = h.maps.apply_batch(&writes).expect_err("refused");
    assert_eq!(written, 1);
    assert!(matches!(error, WriteError::Full(_)), "{error:?}");
    let backends = h.maps.read_contents().expect("read").backends.ipv4;
    assert!(backends.contains_key(&7) && !backends.contains_key(&8));
}

/// Two nodes' data paths (harnesses), each with an externalIP Service of
/// `backends` endpoints annotated `algorithm`, its Maglev table written
/// under one seed; the backends listed to each in another order.
fn two_nodes(algorithm: &str, backends: &[Ipv4Addr]) -> [Harness; 2] {
    two_annotated_nodes(json!({"lb-agent.io/lb-algorithm": algorithm}), backends)
}

/// `two_nodes` with the Service annotated `annotations`.
fn two_annotated_nodes(annotations: serde_json::Value, backends: &[Ipv4Addr]) -> [Harness; 2] {
    let node = NodeInfo {
        name: "n1".into(),
        nodeport_addresses: vec![NODE.into()],
        zone: None,
        ipv6_off: true,
        lb_algorithm: lb_userspace::model::LbAlgorithm::Random,
        lb_mode: lb_userspace::model::LbMode::Snat,
    };
    let svc = json!({"metadata": {"name": "ext", "namespace": "default",
            "annotations": annotations},
        "spec": {"clusterIP": "10.96.0.30", "externalIPs": ["198.51.100.30"],
            "ports": [{"name": "t", "port": 80, "protocol": "TCP"}]}});
    let slice = |order: &[Ipv4Addr]| {
        let eps: Vec<_> = order
            .iter()
            .map(|b| json!({"addresses": [b.to_string()], "nodeName": "n2"}))
            .collect();
        json!({"metadata": {"name": "ext-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "t", "port": 8080, "protocol": "TCP"}]})
    };
    let mut reversed = backends.to_vec();
    reversed.reverse();
    Harness::two_nodes(&node, &svc, [slice(backends), slice(&reversed)])
}

/// The backend each of `flows` new flows from outside gets on `h`.
fn first_backends(h: &Harness, wire: Program, flows: u32) -> Vec<Ipv4Addr> {
    (0..flows)
        .map(|i| {
            let t = Tuple {
                src: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 0, 1)) + i),
                sport: 40_000 + i as u16,
                dst: Ipv4Addr::new(198, 51, 100, 30),
                dport: 80,
            };
            let (verdict, out) = h.run(wire, &packet::tcp(&t, TCP_SYN, 1, &[], &[]));
            assert_eq!(verdict, wire.pass(), "{wire:?} flow {i}");
            packet::parse(&out).dst
        })
        .collect()
}

/// With Maglev, a new flow's backend depends on the flow alone: two
/// nodes that learnt the backends in other orders send each of 60 flows
/// to the same one, on XDP and tc, and every backend gets flows. At
/// random they disagree.
#[privileged_test]
fn maglev_gives_a_flow_the_same_backend_on_every_node() {
    let backends: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(10, 244, 3, i)).collect();
    for wire in Program::WIRE {
        let [a, b] = two_nodes("maglev", &backends);
        let on_a = first_backends(&a, wire, 60);
        assert_eq!(on_a, first_backends(&b, wire, 60), "{wire:?}");
        let mut used = on_a.clone();
        used.sort();
        used.dedup();
        assert_eq!(used, backends, "{wire:?}: every backend gets flows");
        let [a, b] = two_nodes("random", &backends);
        assert_ne!(
            first_backends(&a, wire, 60),
            first_backends(&b, wire, 60),
            "{wire:?}: at random the nodes disagree"
        );
    }
}

/// Maglev weights (`lb-agent.io/maglev-weights`): of 400 new flows, the
/// backend weighing 3 gets about three quarters, the one weighing 0 none,
/// on XDP and tc, and both nodes agree on every flow.
#[privileged_test]
fn maglev_weights_set_each_backends_share_of_new_flows() {
    let backends: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(10, 244, 3, i)).collect();
    let annotations = json!({"lb-agent.io/lb-algorithm": "maglev",
        "lb-agent.io/maglev-weights": "10.244.3.1=3,10.244.3.3=0"});
    for wire in Program::WIRE {
        let [a, b] = two_annotated_nodes(annotations.clone(), &backends);
        let on_a = first_backends(&a, wire, 400);
        assert_eq!(on_a, first_backends(&b, wire, 400), "{wire:?}");
        let share = |k: usize| on_a.iter().filter(|b| **b == backends[k]).count();
        assert_eq!(share(2), 0, "{wire:?}: weight 0 gets no flow");
        let heavy = share(0) as f64 / 400.0;
        assert!((heavy - 0.75).abs() < 0.08, "{wire:?}: {heavy}");
    }
}
