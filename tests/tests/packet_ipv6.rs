//! IPv6 packet tests: crafted packets through the real BPF programs with
//! BPF_PROG_TEST_RUN (XDP and tc on the wire, tc on a pod's veth),
//! checking addresses, ports, verdicts and checksums. The frontends are
//! written straight into the lb6_ maps.

use std::net::Ipv6Addr;

use lb_common::{stats, SVC_FLAG_CLUSTER_IP, SVC_FLAG_NODE_PORT};
use lb_lab::{
    packet::{TCP_ACK, TCP_RST, TCP_SYN},
    packet6::{
        self, neighbour_solicitation, parse6, parse_icmp6_error, tcp6, udp6, Tuple6, DEST_OPTS,
        FRAGMENT, HOP_BY_HOP,
    },
    packet_harness::{
        default_masquerade_ports, Frontend6, Harness, Program, NODE6, TC_ACT_OK, TC_ACT_REDIRECT,
        TC_ACT_SHOT, XDP_DROP,
    },
    privileged_test,
};
use lb_userspace::model::Protocol;

#[path = "packet_ipv6/dsr.rs"]
mod dsr;

const SVC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x100);
const B1: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 1, 0, 0, 0, 5);
const B2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 1, 0, 0, 0, 6);

const ALL: [Program; 3] = [Program::Xdp, Program::TcWire, Program::TcPod];

fn cluster_ip(proto: Protocol, backends: &[(Ipv6Addr, u16)]) -> Frontend6<'_> {
    Frontend6 {
        addr: SVC,
        port: 80,
        proto,
        flags: SVC_FLAG_CLUSTER_IP,
        backends,
    }
}

fn to_svc(sport: u16) -> Tuple6 {
    Tuple6 {
        src: CLIENT,
        sport,
        dst: SVC,
        dport: 80,
    }
}

#[privileged_test]
fn tcp_to_an_ipv6_cluster_ip_is_translated_and_its_reply_restored_on_every_hook() {
    let mut h = Harness::new();
    h.program6(&[cluster_ip(Protocol::Tcp, &[(B1, 8080)])]);
    for (i, program) in ALL.into_iter().enumerate() {
        let sport = 40000 + i as u16;
        let (verdict, out) = h.run(program, &tcp6(&to_svc(sport), TCP_SYN, &[], &[]));
        assert_eq!(verdict, program.pass(), "{program:?}");
        let p = parse6(&out);
        assert_eq!((p.src, p.sport), (CLIENT, sport), "{program:?}: {p:?}");
        assert_eq!((p.dst, p.dport), (B1, 8080), "{program:?}: DNAT: {p:?}");
        assert!(p.l4_checksum_ok, "{program:?}: {p:?}");

        let back = Tuple6 {
            src: B1,
            sport: 8080,
            dst: CLIENT,
            dport: sport,
        };
        let (verdict, out) = h.run(program, &tcp6(&back, TCP_SYN | TCP_ACK, &[], &[]));
        assert_eq!(verdict, program.pass(), "{program:?} reply");
        let r = parse6(&out);
        assert_eq!(
            (r.src, r.sport),
            (SVC, 80),
            "{program:?}: reverse NAT: {r:?}"
        );
        assert_eq!((r.dst, r.dport), (CLIENT, sport), "{program:?}: {r:?}");
        assert!(r.l4_checksum_ok, "{program:?}: {r:?}");
    }
    // A forward and a reply entry per flow, in the IPv6 map.
    assert_eq!(h.conntrack6().len(), 2 * ALL.len());
    assert!(h.conntrack().is_empty(), "nothing in the IPv4 map");
}

#[privileged_test]
fn udp_to_an_ipv6_cluster_ip_is_translated_with_a_valid_checksum() {
    let mut h = Harness::new();
    h.program6(&[cluster_ip(Protocol::Udp, &[(B1, 5353)])]);
    for (i, program) in ALL.into_iter().enumerate() {
        let (verdict, out) = h.run(program, &udp6(&to_svc(41000 + i as u16), b"question"));
        assert_eq!(verdict, program.pass(), "{program:?}");
        let p = parse6(&out);
        assert_eq!(
            (p.dst, p.dport, p.proto),
            (B1, 5353, 17),
            "{program:?}: {p:?}"
        );
        assert!(p.l4_checksum_ok, "{program:?}: {p:?}");
    }
}

/// As over IPv4 (`packet`): with 70,000 IPv6 frontends, the last one's
/// reverse NAT id is past 16 bits, and its flow is translated, kept and
/// its reply restored.
#[privileged_test]
fn an_ipv6_frontend_whose_reverse_nat_id_is_past_16_bits_is_translated_and_restored() {
    const FRONTENDS: u128 = 70_000;
    let first = u128::from(Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1));
    let backends = [(B1, 5353)];
    let frontends: Vec<Frontend6> = (first..first + FRONTENDS)
        .map(|a| Frontend6 {
            addr: Ipv6Addr::from(a),
            port: 53,
            proto: Protocol::Udp,
            flags: SVC_FLAG_CLUSTER_IP,
            backends: &backends,
        })
        .collect();
    let mut h = Harness::with_frontends(131_072);
    h.program6(&frontends);
    let last = Ipv6Addr::from(first + FRONTENDS - 1);
    let id = (h.current.rev_nat_id(std::net::IpAddr::V6(last), 53))
        .expect("the last frontend has an id");
    assert!(id > u32::from(u16::MAX), "id {id}");
    let to_last = Tuple6 {
        src: CLIENT,
        sport: 33333,
        dst: last,
        dport: 53,
    };
    let reply = Tuple6 {
        src: B1,
        sport: 5353,
        dst: CLIENT,
        dport: 33333,
    };
    for program in [Program::Xdp, Program::TcPod] {
        for _ in 0..2 {
            let p = parse6(&h.run(program, &udp6(&to_last, b"question")).1);
            assert_eq!((p.dst, p.dport), (B1, 5353), "{program:?}: {p:?}");
        }
        let p = parse6(&h.run(program, &udp6(&reply, b"answer")).1);
        assert_eq!((p.src, p.sport), (last, 53), "{program:?}: reply {p:?}");
        assert!(p.l4_checksum_ok, "{program:?}: {p:?}");
    }
    let ids: Vec<u32> = h.conntrack6().iter().map(|(_, v)| v.rev_nat_id()).collect();
    assert!(
        ids.iter().all(|i| *i == id),
        "conntrack ids {ids:?}, want {id}"
    );
}

#[privileged_test]
fn extension_headers_are_skipped_and_the_ports_behind_them_translated() {
    let mut h = Harness::new();
    h.program6(&[cluster_ip(Protocol::Tcp, &[(B1, 8080)])]);
    for program in ALL {
        for kinds in [&[HOP_BY_HOP][..], &[DEST_OPTS], &[HOP_BY_HOP, DEST_OPTS]] {
            let syn = tcp6(&to_svc(42000), TCP_SYN, kinds, &[]);
            let (verdict, out) = h.run(program, &syn);
            assert_eq!(verdict, program.pass(), "{program:?} {kinds:?}");
            let p = parse6(&out);
            assert_eq!((p.dst, p.dport), (B1, 8080), "{program:?} {kinds:?}: {p:?}");
            assert!(p.l4_checksum_ok, "{program:?} {kinds:?}: {p:?}");
        }
    }
}

#[privileged_test]
fn fragments_neighbour_discovery_and_truncated_ipv6_pass_byte_identical() {
    let mut h = Harness::new();
    h.program6(&[cluster_ip(Protocol::Tcp, &[(B1, 8080)])]);
    let fragment = tcp6(&to_svc(43000), TCP_SYN, &[FRAGMENT], &[]);
    let solicit = neighbour_solicitation(&to_svc(0), SVC);
    let syn = tcp6(&to_svc(43001), TCP_SYN, &[], &[]);
    for program in ALL {
        let fragments = h.stat6(stats::FRAGMENT_PASSED);
        let (verdict, out) = h.run(program, &fragment);
        assert_eq!((verdict, &out), (program.pass(), &fragment), "{program:?}");
        assert_eq!(
            h.stat6(stats::FRAGMENT_PASSED),
            fragments + 1,
            "{program:?}"
        );
        assert_eq!(h.stat(stats::FRAGMENT_PASSED), 0, "counted as IPv6's only");

        let (verdict, out) = h.run(program, &solicit);
        assert_eq!(
            (verdict, &out),
            (program.pass(), &solicit),
            "{program:?} ND"
        );

        // Cut inside the TCP header: too short for what it claims.
        let malformed = h.stat6(stats::MALFORMED_PASSED);
        let cut = &syn[..packet6::IP6_OFF + packet6::IP6_HLEN + 10];
        let (verdict, out) = h.run(program, cut);
        assert_eq!(
            (verdict, out.as_slice()),
            (program.pass(), cut),
            "{program:?}"
        );
        assert_eq!(
            h.stat6(stats::MALFORMED_PASSED),
            malformed + 1,
            "{program:?}"
        );
    }
    assert!(h.conntrack6().is_empty(), "nothing translated");
}

#[privileged_test]
fn an_ipv6_flow_keeps_its_backend_and_flows_spread_over_backends() {
    let mut h = Harness::new();
    h.program6(&[cluster_ip(Protocol::Tcp, &[(B1, 8080), (B2, 8080)])]);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 44000..44040u16 {
        let first = parse6(
            &h.run(Program::TcPod, &tcp6(&to_svc(sport), TCP_SYN, &[], &[]))
                .1,
        );
        let again = parse6(
            &h.run(Program::TcPod, &tcp6(&to_svc(sport), TCP_ACK, &[], &[]))
                .1,
        );
        assert_eq!(first.dst, again.dst, "port {sport} kept its backend");
        seen.insert(first.dst);
    }
    assert_eq!(seen.len(), 2, "40 flows over two backends: {seen:?}");
}

/// A UDP flow whose backend left the Service moves to a live one on its
/// next packet, on every hook (as over IPv4).
#[privileged_test]
fn an_ipv6_udp_flow_of_a_deleted_backend_moves_to_a_live_one() {
    for program in ALL {
        let mut h = Harness::new();
        h.program6(&[cluster_ip(Protocol::Udp, &[(B1, 5353)])]);
        let t = to_svc(50000);
        let first = parse6(&h.run(program, &udp6(&t, b"1")).1);
        assert_eq!(first.dst, B1, "{program:?}");
        h.program6(&[cluster_ip(Protocol::Udp, &[(B2, 5353)])]);
        let next = parse6(&h.run(program, &udp6(&t, b"2")).1);
        assert_eq!(next.dst, B2, "{program:?}: the flow moved");
    }
}

#[privileged_test]
fn an_ipv6_nodeport_from_the_wire_is_masqueraded_and_its_reply_restored() {
    for wire in Program::WIRE {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            nodeport_round_trip(wire, proto);
        }
    }
}

fn nodeport_round_trip(wire: Program, proto: Protocol) {
    let mut h = Harness::new();
    h.program6(&[Frontend6 {
        addr: NODE6,
        port: 30080,
        proto,
        flags: SVC_FLAG_NODE_PORT,
        backends: &[(B1, 8080)],
    }]);
    let to_node = Tuple6 {
        src: CLIENT,
        sport: 45000,
        dst: NODE6,
        dport: 30080,
    };
    let sent = match proto {
        Protocol::Tcp => tcp6(&to_node, TCP_SYN, &[], &[]),
        Protocol::Udp => udp6(&to_node, b"question"),
    };
    let (verdict, out) = h.run(wire, &sent);
    // tc sends a masqueraded IPv6 packet out by the FIB (no accept_local
    // for IPv6); with no route in the test run it goes on to the stack.
    assert!(
        verdict == wire.pass() || (wire != Program::Xdp && verdict == TC_ACT_REDIRECT),
        "{wire:?} {proto}: verdict {verdict}"
    );
    let p = parse6(&out);
    assert_eq!(
        (p.dst, p.dport),
        (B1, 8080),
        "{wire:?} {proto}: DNAT: {p:?}"
    );
    assert_eq!(p.src, NODE6, "{wire:?} {proto}: masqueraded: {p:?}");
    assert!(
        default_masquerade_ports()
            .iter()
            .any(|r| (r.first..=r.last).contains(&p.sport)),
        "{wire:?} {proto}: masquerade port {} outside the ranges",
        p.sport
    );
    assert!(p.l4_checksum_ok, "{wire:?} {proto}: {p:?}");

    let back = Tuple6 {
        src: B1,
        sport: 8080,
        dst: NODE6,
        dport: p.sport,
    };
    let reply = match proto {
        Protocol::Tcp => tcp6(&back, TCP_SYN | TCP_ACK, &[], &[]),
        Protocol::Udp => udp6(&back, b"answer"),
    };
    let (verdict, out) = h.run(Program::TcPod, &reply);
    assert!(
        verdict == TC_ACT_OK || verdict == TC_ACT_REDIRECT,
        "{proto}: verdict {verdict}"
    );
    let r = parse6(&out);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (NODE6, 30080, CLIENT, 45000),
        "{wire:?} {proto}: reply restored: {r:?}"
    );
    assert!(r.l4_checksum_ok, "{proto}: {r:?}");
}

#[privileged_test]
fn an_ipv6_service_without_endpoints_answers_tcp_with_a_reset_and_udp_with_port_unreachable() {
    let mut h = Harness::new();
    h.program6(&[
        cluster_ip(Protocol::Tcp, &[]),
        cluster_ip(Protocol::Udp, &[]),
    ]);
    for program in ALL {
        let sent = tcp6(&to_svc(46000), TCP_SYN, &[], &[]);
        let (verdict, out) = h.run(program, &sent);
        assert_eq!(verdict, program.answer(), "{program:?} RST");
        let r = parse6(&out);
        assert_eq!(
            (r.src, r.sport, r.dst, r.dport),
            (SVC, 80, CLIENT, 46000),
            "{program:?}"
        );
        assert_eq!(r.tcp_flags, TCP_RST | TCP_ACK, "{program:?}: {r:?}");
        assert!(r.l4_checksum_ok, "{program:?}: {r:?}");

        let (verdict, out) = h.run(program, &udp6(&to_svc(46001), b"question"));
        assert_eq!(verdict, program.answer(), "{program:?} ICMPv6");
        let e = parse_icmp6_error(&out);
        assert_eq!((e.src, e.dst), (SVC, CLIENT), "{program:?}: {e:?}");
        assert_eq!(e.kind, (1, 4), "{program:?}: port unreachable");
        assert!(e.checksum_ok, "{program:?}: {e:?}");
        assert_eq!(e.quoted_dport, 80, "{program:?}: {e:?}");
    }
    // Behind an extension header there is nothing to quote: dropped, counted.
    for program in ALL {
        let dropped = h.stat6(stats::NO_BACKEND_DROPPED);
        let (verdict, _) = h.run(program, &tcp6(&to_svc(46002), TCP_SYN, &[DEST_OPTS], &[]));
        let drop = if program == Program::Xdp {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        };
        assert_eq!(verdict, drop, "{program:?}");
        assert_eq!(
            h.stat6(stats::NO_BACKEND_DROPPED),
            dropped + 1,
            "{program:?}"
        );
    }
}

/// Two nodes' data paths (harnesses) with an IPv6 externalIP Service of
/// `backends` annotated `algorithm`, learnt in other orders, the Maglev
/// tables written under one seed.
fn two_ipv6_nodes(algorithm: &str, backends: &[Ipv6Addr]) -> [Harness; 2] {
    let node = lb_userspace::translate::NodeInfo {
        name: "n1".into(),
        nodeport_addresses: vec![NODE6.into()],
        zone: None,
        ipv6_off: false,
        lb_algorithm: lb_userspace::model::LbAlgorithm::Random,
        lb_mode: lb_userspace::model::LbMode::Snat,
    };
    let svc = serde_json::json!({"metadata": {"name": "ext6", "namespace": "default",
            "annotations": {"lb-agent.io/lb-algorithm": algorithm}},
        "spec": {"clusterIP": "fd00:96::30", "ipFamilies": ["IPv6"],
            "externalIPs": ["fd00:51::30"],
            "ports": [{"name": "t", "port": 80, "protocol": "TCP"}]}});
    let slice = |order: &[Ipv6Addr]| {
        let eps: Vec<_> = order
            .iter()
            .map(|b| serde_json::json!({"addresses": [b.to_string()], "nodeName": "n2"}))
            .collect();
        serde_json::json!({"metadata": {"name": "ext6-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "ext6"}},
            "addressType": "IPv6", "endpoints": eps,
            "ports": [{"name": "t", "port": 8080, "protocol": "TCP"}]})
    };
    let mut reversed = backends.to_vec();
    reversed.reverse();
    Harness::two_nodes(&node, &svc, [slice(backends), slice(&reversed)])
}

/// The backend each of `flows` new IPv6 flows from outside gets on `h`.
fn first_ipv6_backends(h: &Harness, wire: Program, flows: u16) -> Vec<Ipv6Addr> {
    (0..flows)
        .map(|i| {
            let t = Tuple6 {
                src: Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, 1, i),
                sport: 40_000 + i,
                dst: "fd00:51::30".parse().unwrap(),
                dport: 80,
            };
            let (verdict, out) = h.run(wire, &tcp6(&t, TCP_SYN, &[], &[]));
            assert_eq!(verdict, wire.pass(), "{wire:?} flow {i}");
            parse6(&out).dst
        })
        .collect()
}

/// Maglev over IPv6: two nodes that learnt 5 backends in other orders give
/// each of 60 flows the same backend, on XDP and tc, every backend used;
/// at random they disagree.
#[privileged_test]
fn maglev_gives_an_ipv6_flow_the_same_backend_on_every_node() {
    let backends: Vec<Ipv6Addr> = (1..=5)
        .map(|i| Ipv6Addr::new(0xfd00, 0x244, 0, 3, 0, 0, 0, i))
        .collect();
    for wire in Program::WIRE {
        let [a, b] = two_ipv6_nodes("maglev", &backends);
        let on_a = first_ipv6_backends(&a, wire, 60);
        assert_eq!(on_a, first_ipv6_backends(&b, wire, 60), "{wire:?}");
        let mut used = on_a.clone();
        used.sort();
        used.dedup();
        assert_eq!(used, backends, "{wire:?}: every backend gets flows");
        let [a, b] = two_ipv6_nodes("random", &backends);
        assert_ne!(
            first_ipv6_backends(&a, wire, 60),
            first_ipv6_backends(&b, wire, 60),
            "{wire:?}: at random the nodes disagree"
        );
    }
}
