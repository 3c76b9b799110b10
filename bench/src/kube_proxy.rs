//! Rule sets shaped the way kube-proxy writes them, for the benchmark's
//! side-by-side runs: iptables mode (`iptables-restore` or
//! `ip6tables-restore` input) and nftables mode (`nft -f` input), for the
//! same Services and endpoints the agent gets, of either address family.
//!
//! The shapes follow kube-proxy's proxiers (1.31): in iptables mode every
//! packet walks KUBE-SERVICES rule by rule until its ClusterIP matches, then
//! a KUBE-SVC chain picks an endpoint with `statistic --mode random` and a
//! KUBE-SEP chain DNATs; in nftables mode one verdict-map lookup on
//! (address . protocol . port) finds the service chain, `numgen random`
//! picks an endpoint chain. Masquerade marks (0x4000) as kube-proxy sets
//! them with a cluster CIDR. Chain names carry a 16-character base32 hash
//! as kube-proxy's do (a different hash function: only the shape matters).
//!
//! kube-proxy runs one proxier per family: IPv6 Services get the same
//! chains through `ip6tables-restore`, and in nftables mode a table of
//! their own, `table ip6 kube-proxy`. The family is data here (`Family`),
//! taken from each Service's address (the agent's `Family`, with the
//! rule syntax of each in `RuleFamily`): one code path writes both.

use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr},
};

pub use lb_userspace::model::Family;

/// Both families, in the order they are measured and reported.
pub const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

/// What a family changes in kube-proxy's rules.
pub trait RuleFamily: Copy {
    /// The iptables binaries' prefix: `iptables` or `ip6tables`.
    fn iptables(self) -> &'static str;
    /// nft's table family, also its address match keyword (`ip daddr`).
    fn nft(self) -> &'static str;
    /// The cluster CIDR (the lab's pods): traffic from outside it to a
    /// ClusterIP is masqueraded.
    fn cluster_cidr(self) -> &'static str;
    /// The type of nft's address map keys.
    fn nft_addr_type(self) -> &'static str;
    /// What kube-proxy leaves out of NodePort matching: loopback.
    fn loopback(self) -> &'static str;
}

impl RuleFamily for Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }

    fn nft(self) -> &'static str {
        match self {
            Family::Ipv4 => "ip",
            Family::Ipv6 => "ip6",
        }
    }

    fn cluster_cidr(self) -> &'static str {
        match self {
            Family::Ipv4 => "10.244.0.0/16",
            Family::Ipv6 => "fd00:10:244::/48",
        }
    }

    fn nft_addr_type(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4_addr",
            Family::Ipv6 => "ipv6_addr",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.0/8",
            Family::Ipv6 => "::1",
        }
    }
}

/// "10.0.0.1:80" or "[fd00::1]:80", as DNAT targets are written.
fn addr_port(ep: (IpAddr, u16)) -> String {
    SocketAddr::from(ep).to_string()
}

/// One Service port and its endpoints, as both modes program it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// Its family decides the rule set's.
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    /// Of the same family as `cluster_ip`.
    pub endpoints: Vec<(IpAddr, u16)>,
    /// Also a NodePort (externalTrafficPolicy Cluster) on this port.
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn family(&self) -> Family {
        Family::of(self.cluster_ip)
    }

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

    fn sep_chain(&self, ep: (IpAddr, u16)) -> String {
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

    /// nftables mode's endpoint chain; an IPv6 address's colons become
    /// dots there, as kube-proxy writes it (chain names cannot hold them).
    fn nft_endpoint_chain(&self, ep: (IpAddr, u16)) -> String {
        let addr = ep.0.to_string().replace(':', ".");
        let base = format!(
            "{}/{}/{}/{}__{addr}/{}",
            self.namespace, self.name, self.protocol, self.port_name, ep.1
        );
        format!("endpoint-{}-{base}", &hash16(&base)[..8])
    }
}

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
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/{} --dport {} -j {}",
            s.port_name(),
            s.cluster_ip,
            s.family().bits(),
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
    let family = s.family();
    let _ = writeln!(decl, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{} cluster IP\" -m {p} -p {p} ! -s {} -d {}/{} --dport {} -j KUBE-MARK-MASQ",
        s.port_name(),
        family.cluster_cidr(),
        s.cluster_ip,
        family.bits(),
        s.port,
        p = s.protocol
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = s.sep_chain(*ep);
        if i + 1 < n {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {}\" -m statistic --mode random --probability {:.10} -j {sep}",
                s.port_name(),
                addr_port(*ep),
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {}\" -j {sep}",
                s.port_name(),
                addr_port(*ep)
            );
        }
    }
    for ep in &s.endpoints {
        let sep = s.sep_chain(*ep);
        let _ = writeln!(decl, ":{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment \"{}\" -s {}/{} -j KUBE-MARK-MASQ",
            s.port_name(),
            ep.0,
            family.bits()
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment \"{}\" -m {p} -p {p} -j DNAT --to-destination {}",
            s.port_name(),
            addr_port(*ep),
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
    removed_endpoints: &[(IpAddr, u16)],
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

/// The table, its base chains and the verdict maps (nftables mode), in
/// `family`'s table: `ip kube-proxy` or `ip6 kube-proxy`.
pub fn nft_base(family: Family) -> String {
    let t = format!("{} kube-proxy", family.nft());
    let (ip, addr_type, lo) = (family.nft(), family.nft_addr_type(), family.loopback());
    format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add chain {t} services\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state invalid drop\n\
         add map {t} service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services fib daddr type local {ip} daddr != {lo} meta l4proto . th dport vmap @service-nodeports\n",
    )
}

/// One Service's chains: its endpoint chains, then the service chain (it
/// names them), with `flush` first when `replace` (an update).
fn push_nft_service(out: &mut String, s: &ServicePort, replace: bool) {
    if s.endpoints.is_empty() {
        return;
    }
    let ip = s.family().nft();
    let t = format!("{ip} kube-proxy");
    let add_chain = |out: &mut String, chain: &str| {
        let _ = writeln!(out, "add chain {t} {chain}");
        if replace {
            let _ = writeln!(out, "flush chain {t} {chain}");
        }
    };
    for ep in &s.endpoints {
        let chain = s.nft_endpoint_chain(*ep);
        add_chain(out, &chain);
        let _ = writeln!(
            out,
            "add rule {t} {chain} {ip} saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule {t} {chain} meta l4proto {} dnat {ip} to {}",
            s.protocol,
            addr_port(*ep)
        );
    }
    let chain = s.nft_service_chain();
    add_chain(out, &chain);
    let _ = writeln!(
        out,
        "add rule {t} {chain} {ip} daddr {} {} dport {} {ip} saddr != {} jump mark-for-masquerade",
        s.cluster_ip,
        s.protocol,
        s.port,
        s.family().cluster_cidr()
    );
    let targets: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", s.nft_endpoint_chain(*ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
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
        "add element {} kube-proxy service-ips {{ {} . {} . {} : goto {} }}",
        s.family().nft(),
        s.cluster_ip,
        s.protocol,
        s.port,
        s.nft_service_chain()
    );
}

/// A full sync: `nft -f` input creating everything for `services`, all of
/// `family` (kube-proxy's table of that family).
pub fn nft_full(family: Family, services: &[ServicePort]) -> String {
    debug_assert!(services.iter().all(|s| s.family() == family));
    let mut out = nft_base(family);
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
pub fn nft_update(changed: &ServicePort, removed_endpoints: &[(IpAddr, u16)]) -> String {
    let mut out = String::new();
    push_nft_service(&mut out, changed, true);
    for ep in removed_endpoints {
        let _ = writeln!(
            out,
            "delete chain {} kube-proxy {}",
            changed.family().nft(),
            changed.nft_endpoint_chain(*ep)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn svc_of(family: Family, i: u8, endpoints: usize) -> ServicePort {
        let (cluster_ip, endpoint): (IpAddr, fn(u8, u8) -> IpAddr) = match family {
            Family::Ipv4 => (Ipv4Addr::new(10, 96, 0, i).into(), |i, e| {
                Ipv4Addr::new(10, 244, i, e).into()
            }),
            Family::Ipv6 => (
                Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, i.into()).into(),
                |i, e| Ipv6Addr::new(0xfd00, 0x10, 0x244, i.into(), 0, 0, 0, e.into()).into(),
            ),
        };
        ServicePort {
            node_port: None,
            namespace: "default".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            cluster_ip,
            port: 80,
            protocol: "tcp",
            endpoints: (0..endpoints)
                .map(|e| (endpoint(i, e as u8 + 1), 8080))
                .collect(),
        }
    }

    fn svc(i: u8, endpoints: usize) -> ServicePort {
        svc_of(Family::Ipv4, i, endpoints)
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
        let text = nft_full(Family::Ipv4, &services);
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
    fn ipv6_rules_use_ip6_syntax_and_the_ipv6_cluster_cidr() {
        let services = [svc_of(Family::Ipv6, 1, 2)];
        let ipt = iptables_full(&services);
        assert!(ipt.contains("-d fd00:96::1/128 --dport 80"), "{ipt}");
        assert!(ipt.contains("! -s fd00:10:244::/48"), "{ipt}");
        assert!(
            ipt.contains("-s fd00:10:244:1::1/128 -j KUBE-MARK-MASQ"),
            "{ipt}"
        );
        assert!(
            ipt.contains("--to-destination [fd00:10:244:1::2]:8080"),
            "{ipt}"
        );
        let nft = nft_full(Family::Ipv6, &services);
        assert!(nft.lines().all(|l| l.contains(" ip6 kube-proxy ")), "{nft}");
        assert!(
            !nft.contains(" ip daddr") && !nft.contains(" ip saddr"),
            "{nft}"
        );
        assert!(nft.contains("type ipv6_addr . inet_proto"), "{nft}");
        assert!(nft.contains("dnat ip6 to [fd00:10:244:1::1]:8080"), "{nft}");
        assert!(nft.contains("ip6 saddr != fd00:10:244::/48"), "{nft}");
        assert!(nft.contains("ip6 daddr != ::1"), "{nft}");
        assert!(
            nft.contains("{ fd00:96::1 . tcp . 80 : goto service-"),
            "{nft}"
        );
        let removed = services[0].endpoints[1];
        let update = nft_update(&services[0], &[removed]);
        assert!(
            update.contains("delete chain ip6 kube-proxy endpoint-"),
            "{update}"
        );
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
