//! NodePort under the load of a busy node: 1,000 new connections a second
//! from outside to the 4 pods of `examples/rolling-update.yaml`, for longer
//! than the default masquerade ports (33,512) take to come round at 250 new
//! connections a second per backend (134 s). The pods close first, so each
//! backend holds every masquerade tuple it saw in TIME_WAIT for 60 s: a
//! masquerade port handed out again within that time gets the old
//! connection's ACK instead of a SYN-ACK, and the client retransmits its
//! SYN a second later. No SYN may be retransmitted and no connection fail.
//!
//! IPv4 on both kinds of wire; IPv6 (the Service is dual-stack, the
//! NodePort on the node's IPv6 wire address, masqueraded to its IPv6
//! address from IPv6 port ranges of their own) on the software wire, whose
//! partial checksums are the harder case.

use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    time::Duration,
};

use lb_lab::{
    on_each_wire, privileged_test,
    rate_load::{self, RateLoad},
    Lab, Wire, NODE_WIRE_ADDR, NODE_WIRE_ADDR6,
};

on_each_wire!(nodeport_at_1000_new_connections_a_second_never_meets_a_backends_time_wait);

#[privileged_test]
fn ipv6_nodeport_at_1000_new_connections_a_second_never_meets_a_backends_time_wait() {
    let to = SocketAddrV6::new(NODE_WIRE_ADDR6, NODE_PORT, 0, 0);
    nodeport_load(Wire::Software, to.into());
}

const NODE_PORT: u16 = 30081;

/// Long enough for every backend's masquerade ports to come round once.
const DURATION: Duration = Duration::from_secs(140);

fn nodeport_at_1000_new_connections_a_second_never_meets_a_backends_time_wait(wire: Wire) {
    nodeport_load(wire, SocketAddrV4::new(NODE_WIRE_ADDR, NODE_PORT).into());
}

fn nodeport_load(wire: Wire, to: SocketAddr) {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/rolling-update.yaml");
    let mut lab = Lab::from_manifest_files_on(wire, &[example]).expect("build the lab");
    assert_eq!(lab.pods.len(), 4, "the example has 4 replicas");
    // Room for every flow of the run (two entries each, reply entries of
    // closed flows kept 120 s): the test is about ports, not LRU pressure.
    lab.agent()
        .flags(&["--conntrack-max", "524288"])
        .start()
        .expect("start lb-agent");
    let family = if to.is_ipv6() { "IPv6" } else { "IPv4" };
    let load = RateLoad {
        what: format!("{family} NodePort new connections to {to}, {wire:?} wire"),
        to,
        rate: 1000,
        duration: DURATION,
        threads: 8,
    };
    let report = rate_load::run(&lab.ext.path(), &load);
    println!("RATE {report}");
    // Every counter, read once, so that a failure shows what the data path
    // saw (a packet passed as malformed, a rewrite that failed, ...).
    let stats = lab.agent_command_json(&["stats", "--output", "json"]);
    let counter = |name: &str| {
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    let exhausted = counter("snat_ports_exhausted");
    println!("RATE snat_ports_exhausted {exhausted}");
    let counters: Vec<String> = lb_common::stats::NAMES
        .iter()
        .map(|name| (name, counter(name)))
        .filter(|(_, n)| *n != 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    println!("RATE data path counters: {}", counters.join(" "));
    assert!(
        report.attempted as f64 >= 0.9 * 1000.0 * DURATION.as_secs_f64(),
        "the load ran at the rate asked: {report}"
    );
    assert_eq!(report.failed, 0, "{report}: {:?}", report.failures);
    assert_eq!(report.syn_retransmissions, 0, "{report}");
    assert_eq!(exhausted, 0, "no new flow found every port taken");
    lab.assert_no_checksum_errors();
}
