//! The desired state of the data path, independent of map ids and bytes.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{compact_btree::compacted, l4_addr_map::L4AddrMap, sorted_vec_set::SortedVecSet};
use serde::Serialize;

/// How new flows of an external frontend (NodePort, LoadBalancer,
/// externalIPs) pick a backend: `--lb-algorithm`, or a Service's
/// `lb-agent.io/lb-algorithm` annotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    /// Any active backend, at random (as kube-proxy).
    #[default]
    Random,
    /// Maglev consistent hashing of the flow's 5-tuple: every node picks
    /// the same backend for the same flow.
    Maglev,
}

impl LbAlgorithm {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "random" => Some(Self::Random),
            "maglev" => Some(Self::Maglev),
            _ => None,
        }
    }
}

/// How external traffic (NodePort, LoadBalancer, externalIPs) with
/// externalTrafficPolicy Cluster reaches a backend on another node:
/// `--lb-mode`, or a Service's `lb-agent.io/lb-mode` annotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LbMode {
    /// The source is masqueraded to the node, so replies come back through
    /// it (as kube-proxy).
    #[default]
    Snat,
    /// Direct server return: the client's address is kept, the backend's
    /// node answers the client itself.
    Dsr,
    /// DSR for TCP, SNAT for UDP (whose every datagram would otherwise
    /// carry the DSR option, 8 bytes of the path MTU).
    Hybrid,
}

impl LbMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "snat" => Some(Self::Snat),
            "dsr" => Some(Self::Dsr),
            "hybrid" => Some(Self::Hybrid),
            _ => None,
        }
    }

    /// Whether frontends of `proto` go with direct server return.
    pub fn dsr_for(self, proto: Protocol) -> bool {
        match self {
            Self::Snat => false,
            Self::Dsr => true,
            Self::Hybrid => proto == Protocol::Tcp,
        }
    }
}

/// Maglev weights of a Service's endpoints by address
/// (`lb-agent.io/maglev-weights: "10.244.1.5=3,10.244.2.7=1"`): an
/// endpoint's share of a Maglev table relative to the others'; one not
/// listed weighs 1, weight 0 gives it no entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MaglevWeights(BTreeMap<IpAddr, u16>);

impl MaglevWeights {
    /// `address=weight` pairs separated by commas (spaces allowed); None
    /// when a pair is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let mut weights = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (addr, weight) = pair.split_once('=')?;
            weights.insert(addr.trim().parse().ok()?, weight.trim().parse().ok()?);
        }
        Some(Self(weights))
    }

    /// The weight of the endpoint at `addr`.
    pub fn of(&self, addr: &IpAddr) -> u16 {
        self.0.get(addr).copied().unwrap_or(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub(crate) fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Parses a Kubernetes protocol name ("TCP" when absent).
    pub(crate) fn from_k8s(name: Option<&str>) -> Result<Self, UnsupportedProtocol> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(UnsupportedProtocol(other.into())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// An IP address family: each has its own maps in the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// Its name in metric labels and JSON: `ipv4` or `ipv6`.
    pub fn label(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }

    /// Bits in an address of the family.
    pub fn bits(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// One value per address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerFamily<T> {
    pub ipv4: T,
    pub ipv6: T,
}

impl<T> std::ops::Index<Family> for PerFamily<T> {
    type Output = T;

    fn index(&self, family: Family) -> &T {
        match family {
            Family::Ipv4 => &self.ipv4,
            Family::Ipv6 => &self.ipv6,
        }
    }
}

impl<T> std::ops::IndexMut<Family> for PerFamily<T> {
    fn index_mut(&mut self, family: Family) -> &mut T {
        match family {
            Family::Ipv4 => &mut self.ipv4,
            Family::Ipv6 => &mut self.ipv6,
        }
    }
}

/// An address, port and protocol: a Service frontend or a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct L4Addr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl L4Addr {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

/// IPv6 frontends print as `[addr]:port/proto`, as in URLs.
impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

/// `namespace/name` of a Service. Shared text: the store, the desired
/// state and their indexes each keep a copy per Service or frontend, and a
/// copy is two reference counts, not two strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// As `{"namespace": .., "name": ..}` (serde's `rc` feature is off).
impl Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ServiceName", 2)?;
        st.serialize_field("namespace", &*self.namespace)?;
        st.serialize_field("name", &*self.name)?;
        st.end()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The backends of one frontend for one kind of traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendSet {
    /// Chosen for new flows, sorted and without duplicates.
    pub active: Vec<L4Addr>,
    /// Terminating endpoints not in `active`: never chosen, kept so flows
    /// that already use them go on until the endpoint is gone.
    pub terminating: Vec<L4Addr>,
}

impl BackendSet {
    pub fn all(&self) -> impl Iterator<Item = &L4Addr> {
        self.active.iter().chain(&self.terminating)
    }
}

/// An IPv4 or IPv6 prefix (a `loadBalancerSourceRanges` entry, a
/// `--nodeport-addresses` filter), its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// `addr` with the bits past `len` cleared (`len` at most the family's bits).
fn masked(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl IpPrefix {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether `addr` is in the prefix (never for the other family).
    pub fn contains(&self, addr: IpAddr) -> bool {
        Family::of(addr) == self.family() && masked(addr, self.len) == self.addr
    }
}

/// A protocol the data path does not carry (SCTP, or a name Kubernetes
/// does not know).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("protocol {0} is not supported by the data path")]
pub struct UnsupportedProtocol(pub String);

/// Why a text is not an IP prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not an IPv4 or IPv6 CIDR")]
    NotAPrefix(String),
    #[error("{0:?} has an invalid prefix length")]
    Length(String),
}

/// `a.b.c.d/n` or `x::y/n`; a bare address is a prefix of its full length.
impl std::str::FromStr for IpPrefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| PrefixError::NotAPrefix(s.into()))?;
        let bits = Family::of(addr).bits();
        let len: u8 = match len {
            None => bits,
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| *l <= bits)
                .ok_or_else(|| PrefixError::Length(s.into()))?,
        };
        Ok(Self {
            addr: masked(addr, len),
            len,
        })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One frontend of a Service port and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub service: ServiceName,
    pub port_name: String,
    pub frontend: L4Addr,
    /// For traffic from outside the node, and for all traffic when
    /// `internal` is None.
    pub backends: BackendSet,
    /// For traffic from this node's pods, when it differs (an external
    /// frontend with externalTrafficPolicy Local).
    pub internal: Option<BackendSet>,
    /// `SVC_FLAG_*`.
    pub flags: u16,
    /// ClientIP session affinity timeout in seconds (0: none).
    pub affinity_timeout: u32,
    /// `loadBalancerSourceRanges` (empty: every source).
    pub source_ranges: Vec<IpPrefix>,
    /// A Maglev frontend's endpoint weights, when the Service gives any
    /// (shared by its frontends: one pointer each).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "shared_weights"
    )]
    pub maglev_weights: Option<std::sync::Arc<MaglevWeights>>,
}

/// Serializes the weights behind their pointer (serde's `rc` feature is
/// off). The signature is serde's `serialize_with`.
#[allow(clippy::ref_option)]
fn shared_weights<S: serde::Serializer>(
    weights: &Option<std::sync::Arc<MaglevWeights>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    weights.as_deref().serialize(s)
}

impl ServiceEntry {
    /// Every backend the entry keeps in the maps, in both scopes.
    pub(crate) fn all_backends(&self) -> impl Iterator<Item = &L4Addr> {
        self.backends
            .all()
            .chain(self.internal.iter().flat_map(BackendSet::all))
    }
}

/// Everything the data path should serve, keyed by frontend, with how many
/// entries use each backend (so a change can tell which backends it orphans
/// without scanning everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    entries: BTreeMap<L4Addr, ServiceEntry>,
    backend_users: L4AddrMap<u32>,
    /// Frontends per Service, so a one-Service change does not scan them all.
    by_service: HashMap<ServiceName, SortedVecSet<L4Addr>>,
    /// Frontends of each family.
    frontends: PerFamily<usize>,
    /// Active backends over all entries, per family.
    active_backends: PerFamily<usize>,
}

impl DesiredState {
    pub fn entries(&self) -> &BTreeMap<L4Addr, ServiceEntry> {
        &self.entries
    }

    pub fn get(&self, frontend: &L4Addr) -> Option<&ServiceEntry> {
        self.entries.get(frontend)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn backend_count(&self) -> usize {
        self.active_backends.ipv4 + self.active_backends.ipv6
    }

    /// Frontends and active backends (over all entries) of each family.
    pub(crate) fn counts(&self) -> (PerFamily<usize>, PerFamily<usize>) {
        (self.frontends, self.active_backends)
    }

    /// Whether any entry balances over `backend`.
    pub(crate) fn uses_backend(&self, backend: &L4Addr) -> bool {
        self.backend_users.contains_key(backend)
    }

    /// Inserts or replaces the entry of its frontend.
    pub fn insert(&mut self, entry: ServiceEntry) {
        let frontend = entry.frontend;
        self.remove(&frontend);
        for b in entry.all_backends() {
            *self.backend_users.get_or_insert_with(b, || 0) += 1;
        }
        self.frontends[frontend.family()] += 1;
        self.active_backends[frontend.family()] += entry.backends.active.len();
        self.by_service
            .entry(entry.service.clone())
            .or_default()
            .insert(frontend);
        self.entries.insert(frontend, entry);
    }

    pub fn remove(&mut self, frontend: &L4Addr) -> Option<ServiceEntry> {
        let old = self.entries.remove(frontend)?;
        self.frontends[frontend.family()] -= 1;
        self.active_backends[frontend.family()] -= old.backends.active.len();
        if let Some(set) = self.by_service.get_mut(&old.service) {
            set.remove(frontend);
            if set.is_empty() {
                self.by_service.remove(&old.service);
            }
        }
        for b in old.all_backends() {
            if let Some(n) = self.backend_users.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    self.backend_users.remove(b);
                }
            }
        }
        Some(old)
    }

    /// Rebuilds the entries' B-tree with full nodes (after a full sync,
    /// which inserts them in Service order, not frontend order).
    pub(crate) fn compact(&mut self) {
        self.entries = compacted(std::mem::take(&mut self.entries));
    }

    /// Whether `service` holds exactly `entries`: the same frontends, each
    /// entry equal.
    pub(crate) fn holds_exactly(&self, service: &ServiceName, entries: &[ServiceEntry]) -> bool {
        let held = self.by_service.get(service);
        let mut frontends: Vec<L4Addr> = entries.iter().map(|e| e.frontend).collect();
        frontends.sort_unstable();
        held.is_some_and(|h| h.iter().eq(frontends.iter()))
            && entries
                .iter()
                .all(|e| self.entries.get(&e.frontend) == Some(e))
    }

    /// The Services that have entries.
    pub(crate) fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.by_service.keys()
    }

    /// Frontends that belong to `service`.
    pub(crate) fn frontends_of(&self, service: &ServiceName) -> Vec<L4Addr> {
        self.by_service
            .get(service)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Entries whose frontend another Service holds, by frontend and Service:
/// the next in line takes over when the holder lets go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shadowed(BTreeMap<L4Addr, BTreeMap<ServiceName, ServiceEntry>>);

impl Shadowed {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every waiting entry.
    pub fn entries(&self) -> impl Iterator<Item = &ServiceEntry> {
        self.0.values().flat_map(|m| m.values())
    }

    /// The Services that have waiting entries.
    pub(crate) fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.0.values().flat_map(|m| m.keys())
    }

    pub(crate) fn has_service(&self, service: &ServiceName) -> bool {
        self.0.values().any(|m| m.contains_key(service))
    }

    fn insert(&mut self, entry: ServiceEntry) {
        self.0
            .entry(entry.frontend)
            .or_default()
            .insert(entry.service.clone(), entry);
    }

    fn take_first(&mut self, frontend: &L4Addr) -> Option<ServiceEntry> {
        let waiting = self.0.get_mut(frontend)?;
        let first = waiting.pop_first().map(|(_, e)| e);
        if waiting.is_empty() {
            self.0.remove(frontend);
        }
        first
    }
}

/// Two Services claim one frontend: `loser` waits while `winner` has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub frontend: L4Addr,
    pub winner: ServiceName,
    pub loser: ServiceName,
}

impl DesiredState {
    /// Claims `entry`'s frontend for its Service. When another Service
    /// holds it, the one whose `namespace/name` sorts first wins, so the
    /// outcome does not depend on the order objects arrive in (a full sync
    /// and a series of incremental ones agree); the other entry waits in
    /// `shadowed`.
    pub fn claim(&mut self, entry: ServiceEntry, shadowed: &mut Shadowed) -> Option<Conflict> {
        let frontend = entry.frontend;
        let holder = match self.entries.get(&frontend) {
            None => {
                self.insert(entry);
                return None;
            }
            Some(held) if held.service == entry.service => {
                self.insert(entry);
                return None;
            }
            Some(held) => held.service.clone(),
        };
        let conflict = if entry.service < holder {
            let loser = self.remove(&frontend).expect("held");
            let winner = entry.service.clone();
            self.insert(entry);
            shadowed.insert(loser);
            Conflict {
                frontend,
                winner,
                loser: holder,
            }
        } else {
            let loser = entry.service.clone();
            shadowed.insert(entry);
            Conflict {
                frontend,
                winner: holder,
                loser,
            }
        };
        Some(conflict)
    }

    /// Drops every entry of `service`, held or waiting; a frontend it held
    /// goes to the next Service in line. Returns the frontends it held.
    pub fn release(&mut self, service: &ServiceName, shadowed: &mut Shadowed) -> Vec<L4Addr> {
        shadowed.0.retain(|_, waiting| {
            waiting.remove(service);
            !waiting.is_empty()
        });
        let held = self.frontends_of(service);
        for f in &held {
            self.remove(f);
            if let Some(next) = shadowed.take_first(f) {
                self.insert(next);
            }
        }
        held
    }
}

impl FromIterator<ServiceEntry> for DesiredState {
    fn from_iter<I: IntoIterator<Item = ServiceEntry>>(iter: I) -> Self {
        let mut s = DesiredState::default();
        for e in iter {
            s.insert(e);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_weights_parse_address_weight_pairs_and_default_to_one() {
        let w = MaglevWeights::parse(" 10.1.0.1=3, fd00::5=0 ,").unwrap();
        assert_eq!(w.of(&"10.1.0.1".parse().unwrap()), 3);
        assert_eq!(w.of(&"fd00::5".parse().unwrap()), 0);
        assert_eq!(w.of(&"10.1.0.2".parse().unwrap()), 1, "not listed");
        for bad in ["10.1.0.1", "10.1.0.1=x", "pod=2", "10.1.0.1=70000"] {
            assert_eq!(MaglevWeights::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefixes_of_both_families_parse_with_their_host_bits_cleared() {
        let p: IpPrefix = "10.1.2.3/8".parse().unwrap();
        assert_eq!(p.to_string(), "10.0.0.0/8");
        assert!(p.contains("10.9.9.9".parse().unwrap()));
        assert!(!p.contains("::ffff:10.9.9.9".parse().unwrap()));
        let p: IpPrefix = "2001:db8::1/32".parse().unwrap();
        assert_eq!(p.to_string(), "2001:db8::/32");
        assert!(p.contains("2001:db8:ffff::2".parse().unwrap()));
        assert!(!p.contains("2001:db9::".parse().unwrap()));
        assert_eq!("fd00::7".parse::<IpPrefix>().unwrap().len, 128);
        assert_eq!("0.0.0.0/0".parse::<IpPrefix>().unwrap().len, 0);
        assert!(matches!(
            "10.0.0.0/33".parse::<IpPrefix>(),
            Err(PrefixError::Length(_))
        ));
        assert!(matches!(
            "fd00::/129".parse::<IpPrefix>(),
            Err(PrefixError::Length(_))
        ));
        assert!(matches!(
            "web".parse::<IpPrefix>(),
            Err(PrefixError::NotAPrefix(_))
        ));
    }

    #[test]
    fn ipv6_frontends_print_in_brackets() {
        let f = L4Addr {
            addr: "fd00::10".parse().unwrap(),
            port: 80,
            proto: Protocol::Tcp,
        };
        assert_eq!(f.to_string(), "[fd00::10]:80/TCP");
        let f = L4Addr {
            addr: "10.96.0.10".parse().unwrap(),
            ..f
        };
        assert_eq!(f.to_string(), "10.96.0.10:80/TCP");
    }
}
