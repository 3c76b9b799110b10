//! Types shared by the BPF programs and the agent: map keys and values, map
//! names and sizes, flags and statistics indices.
//!
//! Every type is `#[repr(C)]` with explicit padding so the kernel, the BPF
//! object's BTF and the agent agree on the bytes. Addresses and ports are kept
//! in network byte order, as they appear in packets.
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod csum;
pub mod icmp;
pub mod icmp6;
pub mod ipv6;
pub mod map_spec;
pub mod uapi;

/// Default bpffs folder where the agent pins its maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb-agent";

/// Names of the maps, as the BPF object declares them and as they are
/// pinned (from [`map_spec`]).
pub mod map_names {
    use crate::map_spec;

    pub const SERVICES: &str = map_spec::SERVICES.name;
    pub const BACKENDS: &str = map_spec::BACKENDS.name;
    pub const REV_NAT: &str = map_spec::REV_NAT.name;
    pub const CONNTRACK: &str = map_spec::CONNTRACK.name;
    pub const STATS: &str = map_spec::STATS.name;
    pub const SERVICE_STATS: &str = map_spec::SERVICE_STATS.name;
    pub const AFFINITY: &str = map_spec::AFFINITY.name;
    pub const BACKEND_MATCH: &str = map_spec::BACKEND_MATCH.name;
    pub const SOURCE_RANGES: &str = map_spec::SOURCE_RANGES.name;
    pub const CONFIG: &str = map_spec::CONFIG.name;
    pub const SOCK_REV: &str = map_spec::SOCK_REV.name;
    pub const SOCK_FWD: &str = map_spec::SOCK_FWD.name;
    pub const SNAT_CURSOR: &str = map_spec::SNAT_CURSOR.name;
    pub const CONNTRACK_PREV: &str = map_spec::CONNTRACK_PREV.name;
    pub const SERVICES6: &str = map_spec::SERVICES6.name;
    pub const BACKENDS6: &str = map_spec::BACKENDS6.name;
    pub const REV_NAT6: &str = map_spec::REV_NAT6.name;
    pub const CONNTRACK6: &str = map_spec::CONNTRACK6.name;
    pub const AFFINITY6: &str = map_spec::AFFINITY6.name;
    pub const BACKEND_MATCH6: &str = map_spec::BACKEND_MATCH6.name;
    pub const SOURCE_RANGES6: &str = map_spec::SOURCE_RANGES6.name;
    pub const SNAT_CURSOR6: &str = map_spec::SNAT_CURSOR6.name;
    pub const SOCK_REV6: &str = map_spec::SOCK_REV6.name;
    pub const SOCK_FWD6: &str = map_spec::SOCK_FWD6.name;
    pub const MAGLEV: &str = map_spec::MAGLEV.name;
    pub const CONNTRACK6_PREV: &str = map_spec::CONNTRACK6_PREV.name;
    /// The pinned maps, in the order of `map_spec::ALL`.
    pub const ALL: [&str; map_spec::ALL.len()] = {
        let mut names = [""; map_spec::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = map_spec::ALL[i].name;
            i += 1;
        }
        names
    };
}

/// Names of the programs' load-time globals (set by the loader).
pub mod global_names {
    /// `SnatPorts`: the masquerade port ranges.
    pub const SNAT_PORTS: &str = "SNAT_PORTS";
    /// `DatapathConfig`: the masquerade address and the socket LB mode.
    pub const DATAPATH_CONFIG: &str = "DATAPATH_CONFIG";
}

/// Names of the BPF programs in the object.
pub mod program_names {
    /// XDP, on interfaces where packets arrive from the wire, for drivers
    /// that deliver complete checksums (an acceleration, chosen per interface).
    pub const XDP_FROM_WIRE: &str = "lb_xdp_from_wire";
    /// tc ingress (tcx) on interfaces facing the wire: right for every
    /// checksum state, so the default.
    pub const TC_FROM_WIRE: &str = "lb_tc_from_wire";
    /// tc ingress on the host side of each pod's veth (packets leaving pods).
    pub const TC_FROM_POD: &str = "lb_tc_from_pod";
    /// XDP that passes everything, for veth peers receiving XDP_TX frames
    /// and a wire interface moved to tc (see the agent's attach).
    pub const XDP_PASS: &str = "lb_xdp_pass";
    /// tc that passes everything: the benchmark's baseline.
    pub const TC_PASS: &str = "lb_tc_pass";
    /// cgroup socket hooks (socket-level load balancing).
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
    /// Their IPv6 twins (IPv4-mapped addresses go through the IPv4 maps).
    pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "lb_sock_getpeername6";
}

/// Default capacities, from [`map_spec`].
pub const MAX_SERVICE_SLOTS: u32 = map_spec::SERVICES.max_entries;
pub const MAX_BACKENDS: u32 = map_spec::BACKENDS.max_entries;
pub const MAX_REV_NAT: u32 = map_spec::REV_NAT.max_entries;
pub const MAX_CONNTRACK: u32 = map_spec::CONNTRACK.max_entries;
pub const MAX_AFFINITY: u32 = map_spec::AFFINITY.max_entries;
/// Most backends one Service port can have: slots 1..=N of the services map
/// are numbered by a u16, as are the master's count and terminating_count.
/// The data path never walks the slots (it picks one at random and looks it
/// up), so a large N costs map entries, not time per packet.
pub const MAX_BACKENDS_PER_SERVICE: u16 = u16::MAX;

/// A reverse NAT id: one per frontend (address and port; TCP and UDP
/// share it), over both families. Releases before 32-bit ids wrote 16-bit
/// ones; where an entry the data path writes kept its size (conntrack,
/// backend match, source ranges), the high half sits in what was zero
/// padding, so those entries read the same (both sides are little-endian).
pub type RevNatId = u32;

pub use ipv6::{
    Affinity6Key, Backend6, Ct6Key, Ct6Value, Ipv6Bytes, RevNat6, Service6Key, SockFwd6Key,
    SockRev6Key, SockRev6Value, SourceRange6,
};
pub use uapi::{IPPROTO_TCP, IPPROTO_UDP};

/// Key of the services map. `backend_slot` 0 is the master entry of a Service
/// port; slots 1..=count point at backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Service4Key {
    /// Service address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    pub backend_slot: u16,
    pub proto: u8,
    /// `SCOPE_*`: which traffic a frontend's backend set is for.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Traffic from outside the node, and all traffic of single-scope frontends.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Traffic from pods on this node, for frontends whose external traffic
/// policy is Local (flag `SVC_FLAG_TWO_SCOPES` on the external master).
pub const SCOPE_INTERNAL: u8 = 1;

/// Value of the services map. On the master slot: `count` active backends,
/// flags, `rev_nat_id`. On backend slots: `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Service4Value {
    pub backend_id: u32,
    /// Session affinity timeout in seconds (master slot; 0 = no affinity).
    pub affinity_timeout: u32,
    /// Number of backend slots a reader may index (master slot).
    pub count: u16,
    /// Terminating backends in slots `count+1..=count+terminating_count`
    /// (master slot): never chosen for new flows, kept so flows that use
    /// them go on until the endpoint is gone.
    pub terminating_count: u16,
    /// `SVC_FLAG_*` bits (master slot).
    pub flags: u16,
    pub _pad: u16,
    pub rev_nat_id: RevNatId,
}

pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// externalTrafficPolicy Local: external traffic keeps its source address
/// and only goes to this node's endpoints (no masquerade).
pub const SVC_FLAG_EXTERNAL_LOCAL: u16 = 1 << 4;
/// Pod traffic uses the `SCOPE_INTERNAL` master and slots of the frontend.
pub const SVC_FLAG_TWO_SCOPES: u16 = 1 << 5;
/// Sources must match the frontend's `loadBalancerSourceRanges`.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 6;
/// internalTrafficPolicy Local (informational: the slots hold only local
/// endpoints).
pub const SVC_FLAG_INTERNAL_LOCAL: u16 = 1 << 7;
/// Maglev: a new flow takes the backend slot its 5-tuple hash picks in the
/// frontend's table (`lb_maglev`), the same on every node; random when
/// the table is missing or names a slot past `count`.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 8;
/// Direct server return: external traffic to a backend on another node
/// keeps its client source; the first packet of a TCP flow (its SYN) and
/// every UDP datagram carry the frontend in an IPv4 option
/// (`DSR_OPTION_*`) or an IPv6 destination options header
/// (`DSR_OPTION6_*`), from which the backend's node rewrites the replies
/// and sends them to the client itself.
pub const SVC_FLAG_DSR: u16 = 1 << 9;
/// Frontends reached from outside the node.
pub const SVC_FLAGS_EXTERNAL: u16 =
    SVC_FLAG_NODE_PORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOAD_BALANCER;

/// A backend (an endpoint address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend4 {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// Index of the backend's zone (0 = unknown), for topology hints.
    pub zone: u8,
    pub _pad: [u8; 3],
}

pub const BACKEND_STATE_ACTIVE: u8 = 0;
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// Value of the reverse NAT map: what a reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNat4 {
    /// Service address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Conntrack key: the packet's 5-tuple as seen on the wire plus a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Client -> service address (before DNAT).
pub const CT_DIR_FORWARD: u8 = 0;
/// Backend -> client (before reverse NAT).
pub const CT_DIR_REPLY: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ct4Value {
    /// `bpf_ktime_get_ns` of the last packet that refreshed the entry.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    /// Low half of the reverse NAT id (see [`Ct4Value::rev_nat_id`]).
    pub rev_nat_id_low: u16,
    /// `CT_FLAG_*`.
    pub flags: u16,
    /// With `CT_FLAG_SNAT`: on the forward entry, the source the flow was
    /// masqueraded to; on the reply entry, the client's own address and
    /// port, restored on replies. Network byte order.
    pub nat_addr: u32,
    pub nat_port: u16,
    /// High half of the reverse NAT id: padding, zero, in releases with
    /// 16-bit ids, so their entries are adopted as they are.
    pub rev_nat_id_high: u16,
}

/// The reverse NAT id of a conntrack value, split around `flags` so the
/// layout of releases with 16-bit ids holds (see [`RevNatId`]).
macro_rules! split_rev_nat_id {
    ($value:ty) => {
        impl $value {
            #[inline(always)]
            pub fn rev_nat_id(&self) -> RevNatId {
                RevNatId::from(self.rev_nat_id_low) | RevNatId::from(self.rev_nat_id_high) << 16
            }

            #[inline(always)]
            pub fn set_rev_nat_id(&mut self, id: RevNatId) {
                self.rev_nat_id_low = id as u16;
                self.rev_nat_id_high = (id >> 16) as u16;
            }
        }
    };
}
split_rev_nat_id!(Ct4Value);
split_rev_nat_id!(ipv6::Ct6Value);

/// A FIN or RST was seen: the entry expires after `CT_CLOSING_LIFETIME_NS`.
pub const CT_FLAG_CLOSING: u16 = 1 << 0;
/// The flow's source was masqueraded (NodePort and friends with
/// externalTrafficPolicy Cluster, or a pod reaching itself).
pub const CT_FLAG_SNAT: u16 = 1 << 1;
/// Packets of the flow are sent straight to their egress device after
/// translation: their addresses would look spoofed to the kernel's input
/// routing (a local address as source arriving on a pod's veth).
pub const CT_FLAG_REDIRECT: u16 = 1 << 2;

/// A TCP entry created by a SYN whose handshake has not been seen to
/// complete in the entry's direction (forward: the client's first ACK;
/// reply: the backend's SYN-ACK). It lives `CT_OPENING_LIFETIME_NS`, so a
/// failed or collided attempt leaves nothing long-lived behind.
pub const CT_FLAG_OPENING: u16 = 1 << 3;
/// Forward entry: the flow is forwarded with direct server return (its
/// SYN or datagrams get the DSR option). Reply entry: learned from a DSR
/// option on the backend's node; its backend id is unknown (0), so the
/// agent's sweep ages it out instead of matching it to a backend.
pub const CT_FLAG_DSR: u16 = 1 << 4;

/// The IPv4 option a DSR request carries to the backend's node: type (copied
/// on fragmentation, class 0, number 30: RFC 4727's experiment number),
/// length, then the frontend's port and address in network order.
pub const DSR_OPTION_TYPE: u8 = 0x80 | 0x1e;
/// The option's length, which is also what it adds to the packet: a whole
/// number of 32-bit words, so the header needs no padding.
pub const DSR_OPTION_LEN: u8 = 8;

/// IPv6 carries the frontend in a destination options header (RFC 8200
/// 4.6) right after the fixed header: next header, length, then an option
/// of this type (RFC 4727's experiment number; its top bits: skipped by a
/// node that does not know it, unchanged en route), `DSR_OPTION6_DATA_LEN`
/// bytes of port and address, and a 2-byte PadN to end on 8 bytes.
pub const DSR_OPTION6_TYPE: u8 = 0x1e;
pub const DSR_OPTION6_DATA_LEN: u8 = 18;
/// What the header adds to the packet.
pub const DSR_HEADER6_LEN: u8 = 24;

/// Ports tried for a new masqueraded flow before it is dropped (counted
/// as `snat_ports_exhausted`).
pub const SNAT_PORT_TRIES: u32 = 16;
/// Most port ranges masquerading draws from.
pub const SNAT_PORT_RANGES_MAX: usize = 4;

/// The source ports masqueraded flows get: up to `SNAT_PORT_RANGES_MAX`
/// ranges `start[i]..start[i]+len[i]` (host order; `len` 0: unused),
/// chosen by the agent around the node's own ephemeral and reserved ports
/// and the NodePort range. A load-time global of the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SnatPorts {
    pub start: [u16; SNAT_PORT_RANGES_MAX],
    pub len: [u16; SNAT_PORT_RANGES_MAX],
}

impl SnatPorts {
    /// How many ports the ranges hold.
    #[inline(always)]
    pub fn total(&self) -> u32 {
        let mut n = 0u32;
        let mut i = 0;
        while i < SNAT_PORT_RANGES_MAX {
            n += u32::from(self.len[i]);
            i += 1;
        }
        n
    }

    /// The `index`th port of the ranges (host order); `index < total()`.
    #[inline(always)]
    pub fn port_at(&self, index: u32) -> u16 {
        let (first, _, offset) = self.locate(index);
        first + offset
    }

    /// Where the `index`th port is: (first port of its range, the range's
    /// length, the port's offset in it). (0, 0, 0) past the end.
    #[inline(always)]
    pub fn locate(&self, index: u32) -> (u16, u16, u16) {
        let mut rest = index;
        let mut i = 0;
        while i < SNAT_PORT_RANGES_MAX {
            let len = u32::from(self.len[i]);
            if rest < len {
                return (self.start[i], self.len[i], rest as u16);
            }
            rest -= len;
            i += 1;
        }
        (0, 0, 0)
    }
}

/// Session affinity (ClientIP): which backend a client last used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Affinity4Key {
    /// `AFFINITY_CLIENT_ADDR`: the client's IPv4 address;
    /// `AFFINITY_CLIENT_NETNS`: its network namespace cookie, folded to 32
    /// bits (the socket path, where the source address is not known yet; a
    /// pod has one namespace and one address).
    pub client: u32,
    /// TCP and UDP of one address and port share a reverse NAT id.
    pub rev_nat_id: RevNatId,
    pub proto: u8,
    pub client_kind: u8,
    pub _pad: [u8; 2],
}

pub const AFFINITY_CLIENT_ADDR: u8 = 0;
pub const AFFINITY_CLIENT_NETNS: u8 = 1;

/// Socket-level translations, for `recvmsg4` and `getpeername4`: which
/// Service a socket's backend address stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRev4Key {
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// An unconnected UDP socket's backend per Service frontend, so its
/// datagrams to a Service stay one flow on one backend, as on the packet
/// paths (until that backend leaves the Service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockFwd4Key {
    pub cookie: u64,
    /// Service address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRev4Value {
    /// Service address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: RevNatId,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Affinity4Value {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Present while `backend_id` is a backend of the frontend with
/// `rev_nat_id`, with its `BACKEND_MATCH_*` state. Backends are shared by
/// every Service that has the same endpoint, so a flow or an affinity entry
/// checks here that its backend still belongs to its own Service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendMatchKey {
    pub backend_id: u32,
    pub rev_nat_id: RevNatId,
}

/// Chosen for new flows (and by session affinity).
pub const BACKEND_MATCH_ACTIVE: u8 = 1;
/// Kept for flows that already use it.
pub const BACKEND_MATCH_TERMINATING: u8 = 2;

/// Data of a `loadBalancerSourceRanges` LPM trie key: the prefix length
/// covers `rev_nat_id` (32 bits) plus the range's mask bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRange4 {
    pub rev_nat_id: RevNatId,
    /// Network byte order.
    pub addr: u32,
}

/// Socket-level load balancing off: the per-packet paths do the work.
pub const SOCKET_LB_OFF: u32 = 0;
/// Every socket in the attached cgroup.
pub const SOCKET_LB_ALL: u32 = 1;
/// Sockets of the host network namespace only (pods use the per-packet path).
pub const SOCKET_LB_HOST: u32 = 2;

/// Bits of `SourceRange4` before the address.
pub const SOURCE_RANGE_PREFIX_BITS: u32 = 32;

/// Indices of the config array: what the agent changes while the
/// programs run. What is fixed for a load is in [`DatapathConfig`].
pub mod config {
    /// Non-zero while a conntrack map of an older layout is being migrated:
    /// a lookup that misses falls back to `lb4_conntrack_prev` and moves the
    /// entry over, so flows keep their backends across the switch.
    pub const CT_MIGRATING: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// What the agent sets once per load of the programs: a load-time global
/// (`global_names::DATAPATH_CONFIG`), read without a map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// The agent's (host) network namespace cookie, for `SOCKET_LB_HOST`.
    pub host_netns_cookie: u64,
    /// The node address masqueraded flows get as source (network order;
    /// 0: masquerading off, such flows are dropped and counted).
    pub masquerade_addr: u32,
    /// `SOCKET_LB_*`.
    pub socket_lb_mode: u32,
    /// The node's IPv6 masquerade address (all zero: masquerading IPv6
    /// flows is off).
    pub masquerade_addr6: Ipv6Bytes,
    /// Entries of every Maglev table (a prime; 0: no tables).
    pub maglev_table_size: u32,
    pub _pad: u32,
}

/// A Maglev table is an array of u64 words, each holding four u16 slot
/// numbers (entry `i` in word `i / 4`, bits `16 * (i % 4)`), so an entry
/// costs 2 bytes of the array's 8-byte elements.
pub const MAGLEV_ENTRIES_PER_WORD: u32 = 4;
/// Words of the largest table (65,537 entries, Katran's size).
pub const MAGLEV_MAX_WORDS: u32 = 65_537_u32.div_ceil(MAGLEV_ENTRIES_PER_WORD);

/// How long an idle entry keeps its backend, as in the kernel's conntrack.
pub const CT_TCP_LIFETIME_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_UDP_LIFETIME_NS: u64 = 60 * 1_000_000_000;
pub const CT_CLOSING_LIFETIME_NS: u64 = 10 * 1_000_000_000;
/// A TCP entry whose handshake was not seen to complete (`CT_FLAG_OPENING`).
pub const CT_OPENING_LIFETIME_NS: u64 = 60 * 1_000_000_000;
/// After a masqueraded TCP flow closed (or its attempt failed), its
/// masquerade port is not given out again toward the same backend for
/// this long: either end may hold the 4-tuple in TIME_WAIT (Linux: 60 s),
/// and a new SYN on it would meet the old connection's ACK. 120 s is the
/// kernel NAT's TIME_WAIT timeout, 2 MSL.
pub const SNAT_TIME_WAIT_NS: u64 = 120 * 1_000_000_000;

/// How long an entry with `flags` of protocol `proto` lives without packets.
#[inline(always)]
pub fn ct_lifetime_ns(proto: u8, flags: u16) -> u64 {
    if flags & CT_FLAG_CLOSING != 0 {
        CT_CLOSING_LIFETIME_NS
    } else if proto != IPPROTO_TCP {
        CT_UDP_LIFETIME_NS
    } else if flags & CT_FLAG_OPENING != 0 {
        CT_OPENING_LIFETIME_NS
    } else {
        CT_TCP_LIFETIME_NS
    }
}

/// How long an idle entry must be kept: its lifetime, and for the reply
/// entry of a masqueraded TCP flow that closed or never opened, at least
/// `SNAT_TIME_WAIT_NS`, since that entry is what reserves its masquerade
/// port toward its backend.
#[inline(always)]
pub fn ct_hold_ns(proto: u8, direction: u8, flags: u16) -> u64 {
    let lifetime = ct_lifetime_ns(proto, flags);
    let reserves_port = direction == CT_DIR_REPLY && flags & CT_FLAG_SNAT != 0;
    if reserves_port && proto == IPPROTO_TCP && flags & (CT_FLAG_CLOSING | CT_FLAG_OPENING) != 0 {
        if lifetime > SNAT_TIME_WAIT_NS {
            lifetime
        } else {
            SNAT_TIME_WAIT_NS
        }
    } else {
        lifetime
    }
}

/// Refresh `last_seen_ns` at most this often, to keep writes off the hot path.
pub const CT_REFRESH_INTERVAL_NS: u64 = 1_000_000_000;

/// Per-CPU packet and byte counters of one Service frontend (addr:port),
/// indexed by its reverse NAT id: packets translated towards a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceStats {
    pub packets: u64,
    /// IP bytes (header included).
    pub bytes: u64,
}

/// Indices of the per-CPU statistics array.
pub mod stats {
    /// Packets that matched a Service and were translated to a backend.
    pub const SERVICE_FORWARDED: u32 = 0;
    /// Replies whose source was translated back to the Service address.
    pub const REVERSE_NATTED: u32 = 1;
    /// New conntrack entries (new flows to a Service).
    pub const CT_CREATED: u32 = 2;
    /// To a Service with no backend: answered with a TCP RST or an ICMP
    /// port unreachable.
    pub const NO_BACKEND_REJECTED: u32 = 3;
    /// To a Service with no backend, and no answer was sent: dropped. The
    /// total of the `no_backend_dropped_*` reasons (`RejectFailure`).
    pub const NO_BACKEND_DROPPED: u32 = 4;
    /// A slot pointed at a backend id that is not in the backends map.
    pub const BACKEND_MISSING: u32 = 5;
    /// Packets too short for the headers they claim: passed untouched.
    pub const MALFORMED_PASSED: u32 = 6;
    /// IPv4 fragments addressed to a Service: passed untouched.
    pub const FRAGMENT_PASSED: u32 = 7;
    /// A rewrite of the packet failed: dropped. The total of the
    /// `rewrite_failed_*` reasons (`RewriteFailure`).
    pub const REWRITE_FAILED: u32 = 8;
    /// A source outside the frontend's loadBalancerSourceRanges: dropped.
    pub const SOURCE_RANGE_DROPPED: u32 = 9;
    /// No masquerade address or port range set, or the claim of a
    /// masquerade port failed: dropped. (Ports all in use:
    /// `SNAT_PORTS_EXHAUSTED`.)
    pub const SNAT_FAILED: u32 = 10;
    /// New flows that went to their client's affinity backend.
    pub const AFFINITY_HIT: u32 = 11;
    /// External traffic policy Local without a local endpoint: dropped.
    pub const NO_LOCAL_BACKEND_DROPPED: u32 = 12;
    /// connect()/sendmsg() to a Service translated at the socket.
    pub const SOCK_TRANSLATED: u32 = 13;
    /// Conntrack entries the data path added (not updates of one present).
    pub const CT_INSERTED: u32 = 14;
    /// Conntrack entries the data path removed (a new SYN over a reply
    /// entry of an ended flow).
    pub const CT_REMOVED: u32 = 15;
    /// Conntrack entries the agent's sweep removed (expired, or their
    /// backend was deleted); written by the agent into CPU 0's slot.
    pub const CT_SWEPT: u32 = 16;
    /// New masqueraded flows that found no free masquerade port toward
    /// their backend (every port tried is in use or in TIME_WAIT): dropped.
    pub const SNAT_PORTS_EXHAUSTED: u32 = 17;
    /// Packets a node forwarded with direct server return (the DSR option
    /// added, or a flow's later packets, which go without it).
    pub const DSR_FORWARDED: u32 = 18;
    /// Reply entries a backend's node learned from a DSR option.
    pub const DSR_LEARNED: u32 = 19;
    /// DSR options naming a frontend this node does not serve: passed on,
    /// nothing learned (the replies go out untranslated).
    pub const DSR_UNKNOWN_FRONTEND: u32 = 20;
    /// DSR datagrams the option would have made too big for the wire, with
    /// don't-fragment set: answered with ICMP fragmentation needed and the
    /// MTU less the option, so the client's path MTU makes room for it.
    pub const DSR_FRAG_NEEDED: u32 = 21;
    /// The first of the `RewriteFailure` counters, one per reason.
    const REWRITE_FAILED_BY: u32 = 22;
    /// The first of the `RejectFailure` counters, one per reason.
    const NO_BACKEND_DROPPED_BY: u32 = REWRITE_FAILED_BY + RewriteFailure::COUNT;
    pub const COUNT: u32 = NO_BACKEND_DROPPED_BY + RejectFailure::COUNT;
    /// Every counter is kept per family: IPv4's at its index, IPv6's this
    /// much further.
    pub const IPV6_OFFSET: u32 = COUNT;
    /// The entries of the statistics array: every counter of both families.
    pub const ENTRIES: u32 = 2 * COUNT;

    /// Why a translated packet could not be rewritten (it is dropped).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u32)]
    pub enum RewriteFailure {
        /// A field the parser found is no longer within the packet.
        OutOfBounds = 0,
        /// A checksum helper refused the update.
        Checksum = 1,
        /// Writing the new address or port into the packet failed.
        Store = 2,
        /// Making room for the DSR option failed.
        Resize = 3,
    }

    impl RewriteFailure {
        const COUNT: u32 = 4;

        /// Its counter (counted beside the total `REWRITE_FAILED`).
        #[inline(always)]
        pub const fn counter(self) -> u32 {
            REWRITE_FAILED_BY + self as u32
        }
    }

    /// Why a packet to a Service without backends got no answer (a TCP RST
    /// or an ICMP port unreachable) and was dropped instead.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u32)]
    pub enum RejectFailure {
        /// Not a packet to answer: a segment with payload, or a RST.
        NotAnswerable = 0,
        /// Its headers could not be read or are no longer within the packet.
        OutOfBounds = 1,
        /// A checksum helper refused the update.
        Checksum = 2,
        /// Writing the answer's bytes failed.
        Store = 3,
        /// Growing or trimming the packet to the answer's size failed.
        Resize = 4,
        /// Sending the answer back out failed.
        Redirect = 5,
    }

    impl RejectFailure {
        const COUNT: u32 = 6;

        /// Its counter (counted beside the total `NO_BACKEND_DROPPED`).
        #[inline(always)]
        pub const fn counter(self) -> u32 {
            NO_BACKEND_DROPPED_BY + self as u32
        }
    }

    impl From<RewriteFailure> for RejectFailure {
        fn from(f: RewriteFailure) -> Self {
            match f {
                RewriteFailure::OutOfBounds => Self::OutOfBounds,
                RewriteFailure::Checksum => Self::Checksum,
                RewriteFailure::Store => Self::Store,
                RewriteFailure::Resize => Self::Resize,
            }
        }
    }

    pub const NAMES: [&str; COUNT as usize] = [
        "service_forwarded",
        "reverse_natted",
        "ct_created",
        "no_backend_rejected",
        "no_backend_dropped",
        "backend_missing",
        "malformed_passed",
        "fragment_passed",
        "rewrite_failed",
        "source_range_dropped",
        "snat_failed",
        "affinity_hit",
        "no_local_backend_dropped",
        "sock_translated",
        "ct_inserted",
        "ct_removed",
        "ct_swept",
        "snat_ports_exhausted",
        "dsr_forwarded",
        "dsr_learned",
        "dsr_unknown_frontend",
        "dsr_frag_needed",
        "rewrite_failed_out_of_bounds",
        "rewrite_failed_checksum",
        "rewrite_failed_store",
        "rewrite_failed_resize",
        "no_backend_dropped_not_answerable",
        "no_backend_dropped_out_of_bounds",
        "no_backend_dropped_checksum",
        "no_backend_dropped_store",
        "no_backend_dropped_resize",
        "no_backend_dropped_redirect",
    ];
}

#[cfg(feature = "user")]
mod user {
    use super::{
        Affinity4Key, Affinity4Value, Backend4, BackendMatchKey, Ct4Key, Ct4Value, DatapathConfig,
        RevNat4, Service4Key, Service4Value, ServiceStats, SnatPorts, SockFwd4Key, SockRev4Key,
        SockRev4Value, SourceRange4,
    };
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no
    // invalid bit patterns (checked by bytemuck's derive).
    unsafe impl aya::Pod for Service4Key {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity4Value {}
    unsafe impl aya::Pod for BackendMatchKey {}
    unsafe impl aya::Pod for SourceRange4 {}
    unsafe impl aya::Pod for SockRev4Key {}
    unsafe impl aya::Pod for SockRev4Value {}
    unsafe impl aya::Pod for SockFwd4Key {}
    unsafe impl aya::Pod for SnatPorts {}
    unsafe impl aya::Pod for DatapathConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Service4Key>(), 12);
        assert_eq!(size_of::<Service4Value>(), 20);
        assert_eq!(size_of::<Backend4>(), 12);
        assert_eq!(size_of::<RevNat4>(), 8);
        assert_eq!(size_of::<Ct4Key>(), 16);
        assert_eq!(size_of::<Ct4Value>(), 24);
        assert_eq!(size_of::<Affinity4Key>(), 12);
        assert_eq!(size_of::<Affinity4Value>(), 16);
        assert_eq!(size_of::<BackendMatchKey>(), 8);
        assert_eq!(size_of::<SourceRange4>(), 8);
        assert_eq!(size_of::<SockRev4Key>(), 16);
        assert_eq!(size_of::<SockRev4Value>(), 12);
        assert_eq!(size_of::<SockFwd4Key>(), 16);
    }

    /// Entries the data path wrote with 16-bit reverse NAT ids are adopted
    /// as they are where their size did not change.
    #[test]
    fn entries_written_with_16_bit_ids_read_the_same() {
        let id16 = 0xbeef_u16.to_le_bytes();
        let mut ct4 = [0u8; 24];
        ct4[12..14].copy_from_slice(&id16);
        ct4[14..16].copy_from_slice(&CT_FLAG_SNAT.to_le_bytes());
        let ct4: Ct4Value = bytemuck::pod_read_unaligned(&ct4);
        assert_eq!((ct4.rev_nat_id(), ct4.flags), (0xbeef, CT_FLAG_SNAT));
        let mut ct6 = [0u8; 40];
        ct6[12..14].copy_from_slice(&id16);
        ct6[32..34].copy_from_slice(&8080_u16.to_be_bytes());
        let ct6: ipv6::Ct6Value = bytemuck::pod_read_unaligned(&ct6);
        assert_eq!((ct6.rev_nat_id(), ct6.nat_port), (0xbeef, 8080_u16.to_be()));
        let mut key = [0u8; 8];
        key[0..4].copy_from_slice(&7_u32.to_le_bytes());
        key[4..6].copy_from_slice(&id16);
        let key: BackendMatchKey = bytemuck::pod_read_unaligned(&key);
        assert_eq!((key.backend_id, key.rev_nat_id), (7, 0xbeef));
    }

    #[test]
    fn a_32_bit_id_round_trips_through_a_conntrack_value() {
        let mut v = Ct4Value::default();
        v.set_rev_nat_id(0x0003_0002);
        assert_eq!((v.rev_nat_id_low, v.rev_nat_id_high), (2, 3));
        assert_eq!(v.rev_nat_id(), 0x0003_0002);
        let mut v = ipv6::Ct6Value::default();
        v.set_rev_nat_id(RevNatId::MAX);
        assert_eq!(v.rev_nat_id(), RevNatId::MAX);
    }

    #[test]
    fn failure_reasons_have_their_own_named_counters() {
        use stats::{RejectFailure, RewriteFailure, NAMES};
        let name = |i: u32| NAMES[i as usize];
        assert_eq!(
            name(RewriteFailure::OutOfBounds.counter()),
            "rewrite_failed_out_of_bounds"
        );
        assert_eq!(
            name(RewriteFailure::Store.counter()),
            "rewrite_failed_store"
        );
        assert_eq!(
            name(RejectFailure::NotAnswerable.counter()),
            "no_backend_dropped_not_answerable"
        );
        assert_eq!(
            name(RejectFailure::Redirect.counter()),
            "no_backend_dropped_redirect"
        );
        assert_eq!(RejectFailure::Redirect.counter() + 1, stats::COUNT);
    }

    #[test]
    fn uapi_values_are_the_kernels() {
        assert_eq!(i32::from(uapi::ETH_P_IP), libc::ETH_P_IP);
        assert_eq!(i32::from(uapi::AF_INET), libc::AF_INET);
        assert_eq!(i32::from(uapi::IPPROTO_TCP), libc::IPPROTO_TCP);
        assert_eq!(i32::from(uapi::IPPROTO_UDP), libc::IPPROTO_UDP);
        assert_eq!(uapi::ECONNREFUSED, libc::ECONNREFUSED);
        assert_eq!(i32::from(uapi::ETH_P_IPV6), libc::ETH_P_IPV6);
        assert_eq!(i32::from(uapi::AF_INET6), libc::AF_INET6);
        assert_eq!(i32::from(uapi::IPPROTO_HOPOPTS), libc::IPPROTO_HOPOPTS);
        assert_eq!(i32::from(uapi::IPPROTO_ROUTING), libc::IPPROTO_ROUTING);
        assert_eq!(i32::from(uapi::IPPROTO_FRAGMENT), libc::IPPROTO_FRAGMENT);
        assert_eq!(i32::from(uapi::IPPROTO_DSTOPTS), libc::IPPROTO_DSTOPTS);
        assert_eq!(i32::from(uapi::IPPROTO_ICMPV6), libc::IPPROTO_ICMPV6);
    }

    #[test]
    fn every_pinned_map_has_a_name_of_its_own() {
        for (i, a) in map_spec::ALL.iter().enumerate() {
            assert_eq!(map_names::ALL[i], a.name);
            assert!(
                map_spec::ALL[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }
}
