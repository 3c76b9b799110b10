//! The kube-proxy rule sets `cargo xtask bench` compares against must be
//! real: they load into iptables (both backends) and nftables, their
//! one-endpoint updates apply, and they really translate a client pod's
//! connections to every endpoint of the probed Service. A benchmark
//! against rules that do not work would compare against nothing.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use lb_bench::{
    filler_services,
    kube_proxy::{self, Family},
    rule_tools::{feed, flush_iptables, install_iptables_jumps},
    traffic::{
        flush_rules, install_iptables, install_nft, pods_only_lab, probe_addr, service_set,
        PROBE_LAST, PROBE_MIDDLE,
    },
};
use lb_lab::{privileged_test, tcp_ask, Lab, Netns};

/// 30 new connections from the client pod to `to`: which pods answered.
fn answers(lab: &Lab, to: &str) -> BTreeMap<String, usize> {
    let to: SocketAddrV4 = to.parse().expect("an address");
    lab.client.ns.run_in(|| {
        let mut seen = BTreeMap::new();
        for i in 0..30 {
            let pod = tcp_ask(to, "hello", Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
            *seen.entry(pod).or_insert(0) += 1;
        }
        seen
    })
}

#[privileged_test]
fn kube_proxy_iptables_and_nftables_rules_translate_to_every_endpoint() {
    let (lab, pods) = pods_only_lab().expect("build the lab");
    let set = service_set(Family::Ipv4, 41, 4, &pods);
    for (mode, install) in [
        (
            "iptables",
            install_iptables as fn(&Lab, &[kube_proxy::ServicePort]) -> anyhow::Result<()>,
        ),
        ("nftables", install_nft),
    ] {
        flush_rules(&lab).expect("flush");
        install(&lab, &set).unwrap_or_else(|e| panic!("installing {mode} rules: {e:#}"));
        for probe in [PROBE_LAST, PROBE_MIDDLE] {
            let to = probe_addr(&set, probe).expect("probe");
            let seen = answers(&lab, &to);
            assert_eq!(
                seen.len(),
                pods.len(),
                "{mode}, {probe}: every endpoint answers, got {seen:?}"
            );
        }
    }
    flush_rules(&lab).expect("flush");
    lab.assert_no_checksum_errors();
}

fn restore(ns: &Netns, program: &str, args: &[&str], input: &str) {
    let mut cmd = ns.command(program);
    cmd.args(args);
    if let Err(e) = feed(cmd, input, Duration::from_mins(1)) {
        panic!("{program} {args:?}: {e}");
    }
}

#[privileged_test]
fn kube_proxy_full_and_partial_syncs_load_with_every_backend() {
    let ns = Netns::create(&format!("lbt-{}-rules", std::process::id())).expect("netns");
    let mut ports = filler_services(Family::Ipv4, 20, 3);
    for binary in ["iptables-legacy", "iptables-nft"] {
        install_iptables_jumps(&ns, binary).expect("jump rules");
        let restore_bin = format!("{binary}-restore");
        restore(
            &ns,
            &restore_bin,
            &["-w", "--noflush"],
            &kube_proxy::iptables_full(&ports),
        );
        let dnat = |ns: &Netns| {
            ns.exec(&[&format!("{binary}-save"), "-t", "nat"])
                .expect("save")
                .lines()
                .filter(|l| l.contains("-j DNAT"))
                .count()
        };
        assert_eq!(dnat(&ns), 60, "{binary}: one DNAT per endpoint");
        // One endpoint removed from Service 7: its chain goes, the rest stays.
        let removed = ports[7].endpoints.pop().unwrap();
        restore(
            &ns,
            &restore_bin,
            &["-w", "--noflush"],
            &kube_proxy::iptables_partial(&ports, &ports[7], &[removed]),
        );
        assert_eq!(
            dnat(&ns),
            59,
            "{binary}: the removed endpoint's DNAT is gone"
        );
        ports[7].endpoints.push(removed);
        flush_iptables(&ns, binary).expect("flush");
    }
    restore(
        &ns,
        "nft",
        &["-f", "-"],
        &kube_proxy::nft_full(Family::Ipv4, &ports),
    );
    let dnat = |ns: &Netns| {
        ns.exec(&["nft", "list", "table", "ip", "kube-proxy"])
            .expect("list")
            .lines()
            .filter(|l| l.contains("dnat to"))
            .count()
    };
    assert_eq!(dnat(&ns), 60, "nft: one dnat per endpoint");
    let removed = ports[7].endpoints.pop().unwrap();
    restore(
        &ns,
        "nft",
        &["-f", "-"],
        &kube_proxy::nft_update(&ports[7], &[removed]),
    );
    assert_eq!(dnat(&ns), 59, "nft: the removed endpoint's chain is gone");
}
