//! Packet tests of masquerading (BPF_PROG_TEST_RUN): which source port a
//! masqueraded flow gets, how long a closed flow's port stays taken, and
//! what a failed or collided attempt leaves behind.

use std::net::Ipv4Addr;

use lb_common::{stats, Ct4Value, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_OPENING};
use lb_lab::{
    packet::{self, Tuple, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    packet_harness::{Harness, Program},
    privileged_test,
};
use lb_userspace::{node::masquerade_ports, translate::NodeInfo};
use serde_json::json;

use lb_lab::packet_harness::NODE;
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// A harness masquerading to `ranges`, with a NodePort Service (TCP and
/// UDP 30080) of one backend, BACKEND:8080.
fn nodeport(ranges: &str) -> Harness {
    let ranges = masquerade_ports::parse_list(ranges).expect("ranges");
    let mut h = Harness::with_masquerade_ports(&ranges);
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
        "endpoints": [{"addresses": [BACKEND.to_string()], "nodeName": "n1"}]});
    h.program_objects(&node, &[svc], &[slice]);
    h
}

fn from_client(sport: u16) -> Tuple {
    Tuple {
        src: CLIENT,
        sport,
        dst: NODE,
        dport: 30080,
    }
}

/// Sends a SYN from client port `sport` through `wire`: the masquerade
/// port it got, or None when it was dropped.
fn syn(h: &Harness, wire: Program, sport: u16) -> Option<u16> {
    let (verdict, out) = h.run(
        wire,
        &packet::tcp(&from_client(sport), TCP_SYN, 1, &[], &[]),
    );
    (verdict == wire.pass()).then(|| packet::parse(&out).sport)
}

#[privileged_test]
fn masquerade_ports_are_handed_out_in_turn_across_the_ranges() {
    for wire in Program::WIRE {
        let h = nodeport("2000-2002,3000-3001");
        let ports: Vec<Option<u16>> = (0..5).map(|i| syn(&h, wire, 40000 + i)).collect();
        assert_eq!(
            ports,
            vec![Some(2000), Some(2001), Some(2002), Some(3000), Some(3001)],
            "{wire:?}"
        );
    }
}

/// A segment from the backend to masquerade port `port` (leaving its pod).
fn from_backend(h: &Harness, port: u16, flags: u8) -> (u32, Vec<u8>) {
    let t = Tuple {
        src: BACKEND,
        sport: 8080,
        dst: NODE,
        dport: port,
    };
    h.run(Program::TcPod, &packet::tcp(&t, flags, 9000, &[], &[]))
}

/// A segment from the client on its flow (after the SYN).
fn from_client_again(h: &Harness, wire: Program, sport: u16, flags: u8) {
    let (verdict, _) = h.run(wire, &packet::tcp(&from_client(sport), flags, 2, &[], &[]));
    assert_eq!(verdict, wire.pass(), "{wire:?}: client segment {flags:#x}");
}

/// The reply entry that reserves masquerade port `port`.
fn reply_entry(h: &Harness, port: u16) -> Option<(lb_common::Ct4Key, Ct4Value)> {
    h.conntrack()
        .into_iter()
        .find(|(k, _)| k.direction == CT_DIR_REPLY && u16::from_be(k.dport) == port)
}

fn lifetime_s(key: &lb_common::Ct4Key, value: &Ct4Value) -> u64 {
    lb_common::ct_lifetime_ns(key.proto, value.flags) / 1_000_000_000
}

#[privileged_test]
fn a_closed_flows_port_is_not_given_out_again_before_time_wait_ends() {
    for wire in Program::WIRE {
        let mut h = nodeport("2000-2002");
        // Three connections open, talk and close (the backend first, as a
        // server with Connection: close does): each port is now in the
        // backend's TIME_WAIT.
        for (i, port) in [2000u16, 2001, 2002].into_iter().enumerate() {
            let sport = 40000 + i as u16;
            assert_eq!(syn(&h, wire, sport), Some(port), "{wire:?}");
            from_backend(&h, port, TCP_SYN | TCP_ACK);
            from_client_again(&h, wire, sport, TCP_ACK);
            from_backend(&h, port, TCP_FIN | TCP_ACK);
            from_client_again(&h, wire, sport, TCP_FIN | TCP_ACK);
        }
        // Every port toward this backend is in TIME_WAIT: a new flow is
        // dropped and counted, not handed a port the backend would answer
        // with the old connection's ACK.
        let before = h.stat(stats::SNAT_PORTS_EXHAUSTED);
        assert_eq!(syn(&h, wire, 41000), None, "{wire:?}");
        assert_eq!(h.stat(stats::SNAT_PORTS_EXHAUSTED), before + 1, "{wire:?}");
        // Closed 30 s ago: past the closing entry's 10 s lifetime, still
        // within TIME_WAIT.
        let (key, mut value) = reply_entry(&h, 2000).expect("entry of port 2000");
        value.last_seen_ns = value.last_seen_ns.saturating_sub(30_000_000_000);
        h.set_conntrack(key, value);
        assert_eq!(syn(&h, wire, 41000), None, "{wire:?}: 30 s after the close");
        // Once 2 MSL have passed since its last packet, a port is free.
        let (key, mut value) = reply_entry(&h, 2001).expect("entry of port 2001");
        value.last_seen_ns = value
            .last_seen_ns
            .saturating_sub(lb_common::SNAT_TIME_WAIT_NS + 1_000_000_000);
        h.set_conntrack(key, value);
        assert_eq!(syn(&h, wire, 41001), Some(2001), "{wire:?}");
    }
}

#[privileged_test]
fn established_flows_live_long_and_failed_attempts_do_not() {
    for wire in Program::WIRE {
        let h = nodeport("2000-2009");
        // A handshake that completes: both entries lose their opening flag.
        let open = syn(&h, wire, 40000).expect("a port");
        from_backend(&h, open, TCP_SYN | TCP_ACK);
        from_client_again(&h, wire, 40000, TCP_ACK);
        let (k, v) = reply_entry(&h, open).expect("reply entry");
        assert_eq!(v.flags & (CT_FLAG_OPENING | CT_FLAG_CLOSING), 0, "{wire:?}");
        assert_eq!(lifetime_s(&k, &v), 6 * 3600, "{wire:?}");

        // A SYN the backend answers with an old connection's ACK (the
        // collision the hold prevents), and the client's RST: nothing
        // long-lived stays, and the client's retry gets another port.
        let collided = syn(&h, wire, 40001).expect("a port");
        from_backend(&h, collided, TCP_ACK);
        from_client_again(&h, wire, 40001, TCP_RST);
        for (k, v) in h.conntrack() {
            if v.backend_id != 0 && (k.sport == 40001u16.to_be() || k.dport == collided.to_be()) {
                assert!(lifetime_s(&k, &v) <= 60, "{wire:?}: {k:?} {v:?} lives long");
            }
        }
        let retry = syn(&h, wire, 40001).expect("a port for the retry");
        assert_ne!(
            retry, collided,
            "{wire:?}: the retry must not reuse the port"
        );

        // A SYN nobody answers lives a minute (the kernel keeps SYN_SENT
        // two), and keeps its port reserved meanwhile.
        let unanswered = syn(&h, wire, 40002).expect("a port");
        let (k, v) = reply_entry(&h, unanswered).expect("reply entry");
        assert_ne!(v.flags & CT_FLAG_OPENING, 0, "{wire:?}");
        assert_eq!(lifetime_s(&k, &v), 60, "{wire:?}");
    }
}

#[privileged_test]
fn a_close_seen_on_either_side_closes_both_entries() {
    for wire in Program::WIRE {
        let h = nodeport("2000-2009");
        let port = syn(&h, wire, 40000).expect("a port");
        from_backend(&h, port, TCP_SYN | TCP_ACK);
        from_client_again(&h, wire, 40000, TCP_ACK);
        // The backend resets: the client's next SYN on the same port is a
        // new connection, with a new masquerade port.
        from_backend(&h, port, TCP_RST);
        for (k, v) in h.conntrack() {
            assert_ne!(v.flags & CT_FLAG_CLOSING, 0, "{wire:?}: {k:?} not closing");
        }
        let again = syn(&h, wire, 40000).expect("a port");
        assert_ne!(again, port, "{wire:?}: a new connection, a new port");
    }
}

/// A pod reaching itself through a Service is masqueraded, and the tc
/// program sends the translated packet straight to the device the FIB
/// routes it to (its source is now a node address, which input routing
/// would drop as spoofed). The lookup must not wait for the next hop's
/// neighbour entry (BPF_FIB_LOOKUP_SKIP_NEIGH; `bpf_redirect_neigh`
/// resolves it): here the gateway has none, and the packet must still be
/// redirected, not handed to the stack.
#[privileged_test]
fn a_hairpin_packet_is_redirected_before_its_next_hop_is_resolved() {
    let ns = lb_lab::Netns::create(&format!("lbt-{}-fib", std::process::id()))
        .expect("a network namespace");
    for cmd in [
        "ip link add d0 type veth peer name d1",
        "ip link set d0 up",
        "ip addr add 10.99.0.1/24 dev d0",
        "ip route add 10.244.0.0/16 via 10.99.0.2 dev d0",
        "sysctl -qw net.ipv4.ip_forward=1",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>()).expect(cmd);
    }
    let mut h = Harness::new();
    let pod = Ipv4Addr::new(10, 244, 0, 9);
    h.program(&[(80, lb_userspace::model::Protocol::Tcp, &[(pod, 8080)])]);
    let to_itself = Tuple {
        src: pod,
        sport: 40000,
        dst: lb_lab::packet_harness::SVC,
        dport: 80,
    };
    let syn = packet::tcp(&to_itself, TCP_SYN, 1, &[], &[]);
    let (verdict, out) = ns.run_in(|| h.run(Program::TcPod, &syn));
    let p = packet::parse(&out);
    assert_eq!((p.src, p.dst), (NODE, pod), "masqueraded hairpin: {p:?}");
    assert_eq!(
        verdict,
        lb_lab::packet_harness::TC_ACT_REDIRECT,
        "redirected to the egress device without a neighbour entry"
    );
}

/// While an agent moves a wire interface from XDP to tc, both run: tc sees
/// the packets XDP already translated. It must leave them, and the
/// conntrack entries XDP made for them, alone.
#[privileged_test]
fn tc_on_the_wire_leaves_what_xdp_before_it_translated() {
    let h = nodeport("2000-2009");
    let sent = packet::tcp(&from_client(40000), TCP_SYN, 1, &[], &[]);
    let (verdict, translated) = h.run(Program::Xdp, &sent);
    assert_eq!(verdict, Program::Xdp.pass());
    let (verdict, after_tc) = h.run(Program::TcWire, &translated);
    assert_eq!(verdict, Program::TcWire.pass());
    assert_eq!(after_tc, translated, "tc changed a packet XDP translated");
    let port = packet::parse(&translated).sport;
    let (_, reply) = from_backend(&h, port, TCP_SYN | TCP_ACK);
    let r = packet::parse(&reply);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (NODE, 30080, CLIENT, 40000),
        "the SYN-ACK is still translated back: {r:?}"
    );
}

/// Two CPUs that read a backend's masquerade cursor at once both write
/// back one past it, so the cursor falls one behind the ports claimed. A
/// flow that walked over busy ports moves the cursor past the one it
/// claimed, so such lags do not add up: here the cursor is set back after
/// each of 40 new flows (a lost update each time), and every flow gets a
/// port at once. Before, the 17th found 16 busy ports and was dropped.
#[privileged_test]
fn a_cursor_set_back_by_racing_cpus_never_exhausts_the_ports() {
    for wire in Program::WIRE {
        let mut h = nodeport("2000-2999");
        for i in 0..40u16 {
            assert_eq!(
                syn(&h, wire, 41_000 + i),
                Some(2000 + i),
                "{wire:?} flow {i}"
            );
            let map = h.ebpf.map_mut("lb4_snat_cursor").expect("the cursor map");
            let mut cursor: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map).unwrap();
            // The only backend has id 1.
            let at = cursor.get(&1, 0).unwrap();
            cursor.set(1, at - 1, 0).unwrap();
        }
        assert_eq!(h.stat(stats::SNAT_PORTS_EXHAUSTED), 0, "{wire:?}");
    }
}
