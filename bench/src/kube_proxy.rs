//! Rule sets shaped the way kube-proxy writes them, for the benchmark's
//! side-by-side runs: iptables mode (`iptables-restore` input) and nftables
//! mode (`nft -f` input), for the same Services and endpoints the agent gets.
//!
//! The shapes follow kube-proxy's proxiers (1.31): in iptables mode every
//! packet walks KUBE-SERVICES rule by rule until its ClusterIP matches, then
//! a KUBE-SVC chain picks an endpoint with `statistic --mode random` and a
//! KUBE-SEP chain DNATs; in nftables mode one verdict-map lookup on
//! (address . protocol . port) finds the service chain, `numgen random`
//! picks an endpoint chain. Masquerade marks (0x4000) as kube-proxy sets
//! them with a cluster CIDR. Chain names carry a 16-character base32 hash
//! as kube-proxy's do (a different hash function: only the shape matters).

use std::{fmt::Write, net::Ipv4Addr};

/// One Service port and its endpoints, as both modes program it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// Also a NodePort (externalTrafficPolicy Cluster) on this port.
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// kube-proxy's "namespace/name:port" service port name.
    fn port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            hash16(&format!("{}{}", self.port_name(), self.protocol))
        )
    }

    /// The KUBE-EXT chain of a NodePort (kube-proxy 1.24+).
    fn ext_chain(&self) -> String {
        format!(
            "KUBE-EXT-{}",
            hash16(&format!("{}{}", self.port_name(), self.protocol))
        )
    }

    fn sep_chain(&self, ep: (Ipv4Addr, u16)) -> String {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!(
                "{}{}{}:{}",
                self.port_name(),
                self.protocol,
                ep.0,
                ep.1
            ))
        )
    }

    /// nftables mode's "service-HASH-ns/name/proto/port" chain.
    fn nft_service_chain(&self) -> String {
        let base = format!(
            "{}/{}/{}/{}",
            self.namespace, self.name, self.protocol, self.port_name
        );
        format!("service-{}-{base}", &hash16(&base)[..8])
    }

    fn nft_endpoint_chain(&self, ep: (Ipv4Addr, u16)) -> String {
        let base = format!(
            "{}/{}/{}/{}__{}/{}",
            self.namespace, self.name, self.protocol, self.port_name, ep.0, ep.1
        );
        format!("endpoint-{}-{base}", &hash16(&base)[..8])
    }
}

/// The cluster CIDR: traffic from outside it to a ClusterIP is masqueraded.
pub(crate) const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// 16 characters of base32 over a 64-bit FNV-1a hash of `s`.
fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // 64 bits give 12.8 base32 digits; a second round fills 16.
    let mut h2 = h.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(16);
    for i in 0..16 {
        let src = if i < 12 { &mut h } else { &mut h2 };
        out.push(ALPHABET[(*src & 31) as usize] as char);
        *src >>= 5;
    }
    out
}

/// Jumps from the built-in chains into kube-proxy's, installed once (kube-proxy
/// adds them with `iptables -I`, outside its restore input).
pub(crate) const IPTABLES_JUMPS: &[&[&str]] = &[
    &["-t", "nat", "-N", "KUBE-SERVICES"],
    &["-t", "nat", "-N", "KUBE-POSTROUTING"],
    &["-t", "filter", "-N", "KUBE-FORWARD"],
    &[
        "-t",
        "nat",
        "-I",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    ],
    &[
        "-t",
        "nat",
        "-I",
        "OUTPUT",
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    ],
    &[
        "-t",
        "nat",
        "-I",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "kubernetes postrouting rules",
        "-j",
        "KUBE-POSTROUTING",
    ],
    &[
        "-t",
        "filter",
        "-I",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "kubernetes forwarding rules",
        "-j",
        "KUBE-FORWARD",
    ],
];

fn push_fixed_nat_chains(out: &mut String) {
    out.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
}

/// NodePorts with externalTrafficPolicy Cluster: KUBE-NODEPORTS jumps to
/// the port's KUBE-EXT chain, which marks for masquerade and goes on to the
/// Service's KUBE-SVC chain.
fn push_node_port_chains(decl: &mut String, rules: &mut String, s: &ServicePort) {
    let (Some(np), false) = (s.node_port, s.endpoints.is_empty()) else {
        return;
    };
    let ext = s.ext_chain();
    let _ = writeln!(decl, ":{ext} - [0:0]");
    let _ = writeln!(
        rules,
        "-A KUBE-NODEPORTS -m comment --comment \"{}\" -m {p} -p {p} --dport {np} -j {ext}",
        s.port_name(),
        p = s.protocol
    );
    let _ = writeln!(
        rules,
        "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
        s.port_name()
    );
    let _ = writeln!(rules, "-A {ext} -j {}", s.svc_chain());
}

fn push_services_chain(out: &mut String, services: &[ServicePort]) {
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            s.port_name(),
            s.cluster_ip,
            s.port,
            s.svc_chain(),
            p = s.protocol
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

/// A Service's KUBE-SVC chain and its KUBE-SEP chains (declarations go
/// to `decl`, rules to `rules`, as iptables-restore wants them).
fn push_service_chains(decl: &mut String, rules: &mut String, s: &ServicePort) {
    if s.endpoints.is_empty() {
        return;
    }
    let svc = s.svc_chain();
    let _ = writeln!(decl, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{} cluster IP\" -m {p} -p {p} ! -s {CLUSTER_CIDR} -d {}/32 --dport {} -j KUBE-MARK-MASQ",
        s.port_name(),
        s.cluster_ip,
        s.port,
        p = s.protocol
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = s.sep_chain(*ep);
        if i + 1 < n {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {}:{}\" -m statistic --mode random --probability {:.10} -j {sep}",
                s.port_name(),
                ep.0,
                ep.1,
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {}:{}\" -j {sep}",
                s.port_name(),
                ep.0,
                ep.1
            );
        }
    }
    for ep in &s.endpoints {
        let sep = s.sep_chain(*ep);
        let _ = writeln!(decl, ":{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment \"{}\" -s {}/32 -j KUBE-MARK-MASQ",
            s.port_name(),
            ep.0
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment \"{}\" -m {p} -p {p} -j DNAT --to-destination {}:{}",
            s.port_name(),
            ep.0,
            ep.1,
            p = s.protocol
        );
    }
}

const FILTER_TABLE: &str = "*filter\n\
:KUBE-FORWARD - [0:0]\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
COMMIT\n";

const NAT_FIXED_DECLS: &str = ":KUBE-SERVICES - [0:0]\n\
:KUBE-NODEPORTS - [0:0]\n\
:KUBE-POSTROUTING - [0:0]\n\
:KUBE-MARK-MASQ - [0:0]\n";

/// A full sync: `iptables-restore --noflush` input that (re)writes every
/// kube-proxy chain for `services`, in their order (the first is matched
/// first, the last walks the whole KUBE-SERVICES chain).
pub fn iptables_full(services: &[ServicePort]) -> String {
    let mut decl = String::from("*nat\n");
    decl.push_str(NAT_FIXED_DECLS);
    let mut rules = String::new();
    push_fixed_nat_chains(&mut rules);
    push_services_chain(&mut rules, services);
    for s in services {
        push_service_chains(&mut decl, &mut rules, s);
        push_node_port_chains(&mut decl, &mut rules, s);
    }
    let mut out = String::from(FILTER_TABLE);
    out.push_str(&decl);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// A partial sync after one Service's endpoints changed, as kube-proxy has
/// done since 1.27 (MinimizeIPTablesRestore): KUBE-SERVICES and the fixed
/// chains are rewritten whole, then only the changed Service's chains, and
/// the chains of endpoints it no longer has are deleted.
pub fn iptables_partial(
    services: &[ServicePort],
    changed: &ServicePort,
    removed_endpoints: &[(Ipv4Addr, u16)],
) -> String {
    let mut decl = String::from("*nat\n");
    decl.push_str(NAT_FIXED_DECLS);
    let mut rules = String::new();
    push_fixed_nat_chains(&mut rules);
    push_services_chain(&mut rules, services);
    push_service_chains(&mut decl, &mut rules, changed);
    for ep in removed_endpoints {
        let sep = changed.sep_chain(*ep);
        let _ = writeln!(decl, ":{sep} - [0:0]");
        let _ = writeln!(rules, "-X {sep}");
    }
    let mut out = decl;
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// The table, its base chains and the verdict maps (nftables mode).
pub(crate) fn nft_base() -> String {
    String::from(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add chain ip kube-proxy services\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n\
         add rule ip kube-proxy filter-forward ct state invalid drop\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n",
    )
}

/// One Service's chains: its endpoint chains, then the service chain (it
/// names them), with `flush` first when `replace` (an update).
fn push_nft_service(out: &mut String, s: &ServicePort, replace: bool) {
    if s.endpoints.is_empty() {
        return;
    }
    for ep in &s.endpoints {
        let chain = s.nft_endpoint_chain(*ep);
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        if replace {
            let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} meta l4proto {} dnat to {}:{}",
            s.protocol, ep.0, ep.1
        );
    }
    let chain = s.nft_service_chain();
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    if replace {
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} {} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.cluster_ip, s.protocol, s.port
    );
    let targets: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", s.nft_endpoint_chain(*ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        targets.join(" , ")
    );
}

fn push_nft_element(out: &mut String, s: &ServicePort) {
    if s.endpoints.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "add element ip kube-proxy service-ips {{ {} . {} . {} : goto {} }}",
        s.cluster_ip,
        s.protocol,
        s.port,
        s.nft_service_chain()
    );
}

/// A full sync: `nft -f` input creating everything for `services`.
pub fn nft_full(services: &[ServicePort]) -> String {
    let mut out = nft_base();
    out.push_str(&nft_chains(services));
    out.push_str(&nft_elements(services));
    out
}

/// The service and endpoint chains of `services` (after `nft_base`).
pub(crate) fn nft_chains(services: &[ServicePort]) -> String {
    let mut out = String::new();
    for s in services {
        push_nft_service(&mut out, s, false);
    }
    out
}

/// The `service-ips` elements of `services` (after their chains).
pub(crate) fn nft_elements(services: &[ServicePort]) -> String {
    let mut out = String::new();
    for s in services {
        push_nft_element(&mut out, s);
    }
    out
}

/// One Service's endpoints changed: kube-proxy's nftables mode sends only
/// that Service's chains in one transaction, and deletes the chains of
/// endpoints it no longer has.
pub fn nft_update(changed: &ServicePort, removed_endpoints: &[(Ipv4Addr, u16)]) -> String {
    let mut out = String::new();
    push_nft_service(&mut out, changed, true);
    for ep in removed_endpoints {
        let _ = writeln!(
            out,
            "delete chain ip kube-proxy {}",
            changed.nft_endpoint_chain(*ep)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(i: u8, endpoints: usize) -> ServicePort {
        ServicePort {
            node_port: None,
            namespace: "default".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, i),
            port: 80,
            protocol: "tcp",
            endpoints: (0..endpoints)
                .map(|e| (Ipv4Addr::new(10, 244, i, e as u8 + 1), 8080))
                .collect(),
        }
    }

    #[test]
    fn iptables_full_walks_services_in_order_and_splits_probability_evenly() {
        let services = [svc(1, 3), svc(2, 1), svc(3, 0)];
        let text = iptables_full(&services);
        let jumps: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains(" -d "))
            .collect();
        assert_eq!(
            jumps.len(),
            2,
            "a Service without endpoints gets no jump:\n{text}"
        );
        assert!(jumps[0].contains("-d 10.96.0.1/32"), "{}", jumps[0]);
        assert!(jumps[1].contains("-d 10.96.0.2/32"), "{}", jumps[1]);
        assert!(text.lines().last().is_some_and(|l| l == "COMMIT"));
        let svc1 = services[0].svc_chain();
        let probabilities: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc1} ")) && l.contains("-> "))
            .map(|l| {
                l.split("--probability ")
                    .nth(1)
                    .map_or("last", |p| p.split(' ').next().unwrap())
            })
            .collect();
        assert_eq!(probabilities, ["0.3333333333", "0.5000000000", "last"]);
        let dnats = text.lines().filter(|l| l.contains("-j DNAT")).count();
        assert_eq!(dnats, 4);
        // Every chain a rule jumps to is declared.
        for line in text.lines().filter(|l| l.starts_with("-A ")) {
            let target = line
                .rsplit("-j ")
                .next()
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            if target.starts_with("KUBE-") {
                assert!(
                    text.contains(&format!(":{target} - [0:0]")),
                    "{target} is not declared"
                );
            }
        }
    }

    #[test]
    fn iptables_partial_rewrites_the_services_chain_and_only_the_changed_service() {
        let mut services = vec![svc(1, 3), svc(2, 2)];
        let removed = services[1].endpoints.pop().unwrap();
        let text = iptables_partial(&services, &services[1], &[removed]);
        // The unchanged Service appears only as the target of its jump.
        let untouched = services[0].svc_chain();
        assert!(text
            .lines()
            .filter(|l| l.contains(&untouched))
            .all(|l| l.starts_with("-A KUBE-SERVICES")));
        assert!(text.contains(&format!("-X {}", services[1].sep_chain(removed))));
        assert!(text.contains(&format!(":{} - [0:0]", services[1].svc_chain())));
    }

    #[test]
    fn nft_full_maps_each_service_once_and_names_every_endpoint_chain() {
        let services = [svc(1, 2), svc(2, 0)];
        let text = nft_full(&services);
        let elements: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add element"))
            .collect();
        assert_eq!(elements.len(), 1);
        assert!(elements[0].contains("10.96.0.1 . tcp . 80 : goto service-"));
        let vmap = text
            .lines()
            .find(|l| l.contains("numgen random mod 2"))
            .unwrap();
        for ep in &services[0].endpoints {
            let chain = services[0].nft_endpoint_chain(*ep);
            assert!(vmap.contains(&chain), "{vmap} lacks {chain}");
            assert!(text.contains(&format!("add chain ip kube-proxy {chain}\n")));
        }
    }

    #[test]
    fn chain_names_are_stable_distinct_and_within_iptables_limits() {
        let a = svc(1, 2);
        let b = svc(2, 2);
        assert_eq!(a.svc_chain(), svc(1, 2).svc_chain());
        assert_ne!(a.svc_chain(), b.svc_chain());
        assert_ne!(a.sep_chain(a.endpoints[0]), a.sep_chain(a.endpoints[1]));
        // iptables chain names are at most 28 characters.
        assert_eq!(a.svc_chain().len(), 25);
        assert_eq!(a.sep_chain(a.endpoints[0]).len(), 25);
    }
}
