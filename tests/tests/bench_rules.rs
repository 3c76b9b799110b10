//! The kube-proxy rule sets `cargo xtask bench` compares against must be
//! real: they load into iptables and ip6tables (both backends) and
//! nftables (`table ip` and `table ip6`), their one-endpoint updates apply,
//! and they really translate a client pod's connections, over IPv4 and over
//! IPv6, to every endpoint of the probed Service. A benchmark against rules
//! that do not work would compare against nothing.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_bench::{
    filler_services,
    kube_proxy::{self, Family, RuleFamily, FAMILIES},
    rule_tools::{feed, flush_iptables, install_iptables_jumps},
    traffic::{
        flush_rules, install_iptables, install_nft, pod_endpoints, pods_only_lab, probe_addr,
        service_set, PROBE_LAST, PROBE_MIDDLE,
    },
};
use lb_lab::{privileged_test, tcp_ask, Lab, Netns};

/// 30 new connections from the client pod to `to`: which pods answered.
fn answers(lab: &Lab, to: &str) -> BTreeMap<String, usize> {
    let to: SocketAddr = to.parse().expect("an address");
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

/// iptables (legacy backend, ip6tables for IPv6) and nftables (the
/// family's table) rules for the pods' addresses of each family, one
/// family at a time: both probed Services reach every pod.
#[privileged_test]
fn kube_proxy_iptables_and_nftables_rules_translate_to_every_endpoint_in_both_families() {
    let (lab, _) = pods_only_lab().expect("build the lab");
    type Install = fn(&Lab, &[kube_proxy::ServicePort]) -> anyhow::Result<()>;
    for family in FAMILIES {
        let pods = pod_endpoints(&lab, family);
        assert!(pods.iter().all(|(ip, _)| Family::of(*ip) == family));
        let set = service_set(family, 41, 4, &pods);
        // Without rules nothing answers there: the answers below are theirs.
        flush_rules(&lab).expect("flush");
        let last: SocketAddr = probe_addr(&set, PROBE_LAST).unwrap().parse().unwrap();
        let unanswered = lab
            .client
            .ns
            .run_in(|| tcp_ask(last, "hello", Duration::from_secs(1)));
        assert!(
            unanswered.is_err(),
            "{family}: {last} answered with no rules"
        );
        for (mode, install) in [
            ("iptables", install_iptables as Install),
            ("nftables", install_nft),
        ] {
            flush_rules(&lab).expect("flush");
            install(&lab, &set)
                .unwrap_or_else(|e| panic!("installing {family} {mode} rules: {e:#}"));
            for probe in [PROBE_LAST, PROBE_MIDDLE] {
                let to = probe_addr(&set, probe).expect("probe");
                let seen = answers(&lab, &to);
                assert_eq!(
                    seen.len(),
                    pods.len(),
                    "{family} {mode}, {probe} ({to}): every endpoint answers, got {seen:?}"
                );
            }
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

/// 20 Services x 3 endpoints load with `binary` (`iptables-legacy`,
/// `ip6tables-nft`...), and a partial restore removes one endpoint.
fn iptables_full_and_partial(ns: &Netns, binary: &str, ports: &mut [kube_proxy::ServicePort]) {
    install_iptables_jumps(ns, binary).expect("jump rules");
    let restore_bin = format!("{binary}-restore");
    let args = ["-w", "--noflush"];
    restore(ns, &restore_bin, &args, &kube_proxy::iptables_full(ports));
    let dnat = |ns: &Netns| {
        ns.exec(&[&format!("{binary}-save"), "-t", "nat"])
            .expect("save")
            .lines()
            .filter(|l| l.contains("-j DNAT"))
            .count()
    };
    assert_eq!(dnat(ns), 60, "{binary}: one DNAT per endpoint");
    // One endpoint removed from Service 7: its chain goes, the rest stays.
    let removed = ports[7].endpoints.pop().unwrap();
    let partial = kube_proxy::iptables_partial(ports, &ports[7], &[removed]);
    restore(ns, &restore_bin, &args, &partial);
    assert_eq!(
        dnat(ns),
        59,
        "{binary}: the removed endpoint's DNAT is gone"
    );
    ports[7].endpoints.push(removed);
    flush_iptables(ns, binary).expect("flush");
}

/// The same Services load into `family`'s nftables table, and one
/// transaction of the changed chains removes one endpoint.
fn nft_full_and_update(ns: &Netns, family: Family, ports: &mut [kube_proxy::ServicePort]) {
    restore(
        ns,
        "nft",
        &["-f", "-"],
        &kube_proxy::nft_full(family, ports),
    );
    let dnat = |ns: &Netns| {
        ns.exec(&["nft", "list", "table", family.nft(), "kube-proxy"])
            .expect("list")
            .lines()
            .filter(|l| l.contains("dnat "))
            .count()
    };
    assert_eq!(dnat(ns), 60, "nft {}: one dnat per endpoint", family.nft());
    let removed = ports[7].endpoints.pop().unwrap();
    let update = kube_proxy::nft_update(&ports[7], &[removed]);
    restore(ns, "nft", &["-f", "-"], &update);
    assert_eq!(
        dnat(ns),
        59,
        "nft {}: the removed endpoint's chain is gone",
        family.nft()
    );
    ports[7].endpoints.push(removed);
}

#[privileged_test]
fn kube_proxy_full_and_partial_syncs_load_with_every_backend_in_both_families() {
    let ns = Netns::create(&format!("lbt-{}-rules", std::process::id())).expect("netns");
    for family in FAMILIES {
        let mut ports = filler_services(family, 20, 3);
        for backend in ["legacy", "nft"] {
            let binary = format!("{}-{backend}", family.iptables());
            iptables_full_and_partial(&ns, &binary, &mut ports);
        }
        nft_full_and_update(&ns, family, &mut ports);
    }
}
