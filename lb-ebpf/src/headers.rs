//! Bounds-checked parsing of Ethernet / IPv4 or IPv6 / TCP / UDP headers.

use lb_common::{
    csum,
    uapi::{
        ETH_P_IP, ETH_P_IPV6, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ROUTING,
        IPPROTO_TCP, IPPROTO_UDP,
    },
    Ipv6Bytes, DSR_HEADER6_LEN, DSR_OPTION6_DATA_LEN, DSR_OPTION6_TYPE, DSR_OPTION_LEN,
    DSR_OPTION_TYPE,
};

pub const ETH_HLEN: usize = 14;
/// Where the EtherType sits, after the two MAC addresses.
pub const ETH_TYPE_OFF: usize = 12;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_HLEN: usize = 20;
pub const L4_OFF: usize = IP_OFF + IP_HLEN;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// Field offsets within an IPv4 header.
pub mod ipv4 {
    pub const TOT_LEN: usize = 2;
    /// Flags and fragment offset.
    pub const FRAG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CSUM: usize = 10;
    pub const SADDR: usize = 12;
    pub const DADDR: usize = 16;
}

/// Field offsets within a TCP header.
pub mod tcp {
    pub const SPORT: usize = 0;
    pub const DPORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK_SEQ: usize = 8;
    /// Data offset (header length in words) in the high nibble.
    pub const DOFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const CSUM: usize = 16;
}

/// Field offsets within an IPv6 header (RFC 8200 3).
pub mod ipv6 {
    /// The fixed header's length.
    pub const HLEN: usize = 40;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const SADDR: usize = 8;
    pub const DADDR: usize = 24;
    /// Extension headers skipped before the L4 header, at most.
    pub const MAX_EXT_HEADERS: usize = 4;
}

pub const IP6_SADDR_OFF: usize = IP_OFF + ipv6::SADDR;
pub const IP6_DADDR_OFF: usize = IP_OFF + ipv6::DADDR;
pub const IP_TOT_LEN_OFF: usize = IP_OFF + ipv4::TOT_LEN;
pub const IP_CSUM_OFF: usize = IP_OFF + ipv4::CSUM;
pub const IP_SADDR_OFF: usize = IP_OFF + ipv4::SADDR;
pub const IP_DADDR_OFF: usize = IP_OFF + ipv4::DADDR;
pub const L4_SPORT_OFF: usize = L4_OFF + tcp::SPORT;
pub const L4_DPORT_OFF: usize = L4_OFF + tcp::DPORT;
/// Where the checksum sits in a UDP header.
const UDP_CSUM: usize = 6;

/// Farther than any header the parser reads (IPv6 extension headers
/// included).
const MAX_HEADERS_LEN: usize = 0x3fff;

/// TTL of packets the programs build (RSTs).
pub const DEFAULT_TTL: u8 = 64;
/// More-fragments flag and fragment offset, network order mask.
const IP_FRAG_MASK: u16 = 0x3fff;
/// Don't fragment.
pub const IP_DF: u16 = 0x4000;
/// The fragment offset alone.
const IP_FRAG_OFFSET_MASK: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the data path needs to know of a packet, for an address family
/// whose addresses are `A` (`u32` or `Ipv6Bytes`). Addresses and ports stay
/// in network byte order, as read from the packet. `repr(C)`: the two
/// addresses sit side by side, as in the IPv6 header, so one helper call
/// copies both.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flow<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Offset of the L4 header (after any IPv6 extension headers).
    pub l4_off: usize,
    /// Offset of the L4 checksum field.
    pub l4_csum_off: usize,
    /// The IP packet's length, header included (host order).
    pub ip_tot_len: u16,
}

pub type Flow4 = Flow<u32>;
pub type Flow6 = Flow<Ipv6Bytes>;

/// What a packet of one family is to the load balancer.
pub enum Parsed<F> {
    /// Not something the load balancer translates: pass untouched.
    Other,
    /// A fragment (IPv4, or an IPv6 fragment header): its L4 header is
    /// absent or incomplete.
    Fragment,
    /// Shorter than the headers it claims: pass untouched, counted.
    Malformed,
    Flow(F),
    /// A packet with the DSR option (IPv4) or header (IPv6): a request
    /// another node forwarded to a backend here with direct server return.
    /// Never rewritten; `dsr_origin` and `dsr_origin6` read the frontend
    /// (kept out of this enum, which every hook's frame holds).
    DsrRequest(F),
}

/// The frontend a DSR request was sent to, from its option (network
/// order): what the replies' source becomes.
#[derive(Clone, Copy)]
pub struct DsrOrigin {
    pub addr: u32,
    pub port: u16,
}

/// The network layer a frame carries, by its EtherType.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Ipv4,
    Ipv6,
    Other,
}

/// Returns a pointer to a `T` at `offset`, or `None` when it would run past
/// the end of the packet.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    // An offset kept in a map (the IPv6 scratch) is unknown to the
    // verifier until bounded here.
    if offset > MAX_HEADERS_LEN {
        return None;
    }
    let len = core::mem::size_of::<T>();
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    // SAFETY: bounds checked by ptr_at; packet data may be unaligned.
    ptr_at::<T>(start, end, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// The ports and flags of a TCP or UDP header.
struct L4 {
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    csum_off: usize,
}

/// The TCP or UDP header at `off`, of which the IP header claims `claimed`
/// bytes onwards; None when it is shorter than its fixed header.
#[inline(always)]
fn parse_l4(start: usize, end: usize, proto: u8, off: usize, claimed: usize) -> Option<L4> {
    let (l4_len, csum) = if proto == IPPROTO_TCP {
        (TCP_HLEN, tcp::CSUM)
    } else {
        (UDP_HLEN, UDP_CSUM)
    };
    if claimed < l4_len {
        return None;
    }
    let ports = read::<[u16; 2]>(start, end, off)?;
    ptr_at::<u8>(start, end, off + l4_len - 1)?;
    let tcp_flags = if proto == IPPROTO_TCP {
        read::<u8>(start, end, off + tcp::FLAGS).unwrap_or(0)
    } else {
        0
    };
    Some(L4 {
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        csum_off: off + csum,
    })
}

/// The network layer of the frame between `start` and `end` (packet data
/// pointers); each family's headers are then parsed by `parse4`/`parse6`.
#[inline(always)]
pub fn l3(start: usize, end: usize) -> L3 {
    match read::<u16>(start, end, ETH_TYPE_OFF).map(u16::from_be) {
        Some(ETH_P_IP) => L3::Ipv4,
        Some(ETH_P_IPV6) => L3::Ipv6,
        _ => L3::Other,
    }
}

/// An IPv4 frame's headers.
#[inline(always)]
pub fn parse4(start: usize, end: usize) -> Parsed<Flow4> {
    let Some(ver_ihl) = read::<u8>(start, end, IP_OFF) else {
        return Parsed::Malformed;
    };
    // IPv4 with IP options is left to the kernel (the fixed offsets of the
    // rewrites assume a 20-byte header), but for the DSR option alone.
    let dsr = match ver_ihl {
        0x45 => false,
        IHL_WITH_DSR_OPTION if dsr_origin(start, end).is_some() => true,
        _ => return Parsed::Other,
    };
    // Field by field: a copy of the whole header would cost a stack slot
    // per byte.
    if ptr_at::<[u8; IP_HLEN]>(start, end, IP_OFF).is_none() {
        return Parsed::Malformed;
    }
    let (Some(tot_len), Some(frag), Some(proto), Some(addrs)) = (
        read::<u16>(start, end, IP_OFF + ipv4::TOT_LEN),
        read::<u16>(start, end, IP_OFF + ipv4::FRAG_OFF),
        read::<u8>(start, end, IP_OFF + ipv4::PROTOCOL),
        read::<[u32; 2]>(start, end, IP_OFF + ipv4::SADDR),
    ) else {
        return Parsed::Malformed;
    };
    let frag = u16::from_be(frag);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Other;
    }
    // A DSR request the entry node's kernel fragmented (no don't-fragment)
    // still teaches its reply entry by its first fragment, which has the
    // ports.
    let first_fragment = frag & IP_FRAG_OFFSET_MASK == 0;
    if frag & IP_FRAG_MASK != 0 && !(dsr && first_fragment) {
        return Parsed::Fragment;
    }
    let ip_tot_len = u16::from_be(tot_len);
    let l4_off = if dsr {
        L4_OFF + DSR_OPTION_LEN as usize
    } else {
        L4_OFF
    };
    let l4_claimed = (ip_tot_len as usize).saturating_sub(l4_off - IP_OFF);
    let Some(l4) = parse_l4(start, end, proto, l4_off, l4_claimed) else {
        return Parsed::Malformed;
    };
    let flow = Flow {
        saddr: addrs[0],
        daddr: addrs[1],
        sport: l4.sport,
        dport: l4.dport,
        proto,
        tcp_flags: l4.tcp_flags,
        l4_off,
        l4_csum_off: l4.csum_off,
        ip_tot_len,
    };
    if dsr {
        Parsed::DsrRequest(flow)
    } else {
        Parsed::Flow(flow)
    }
}

/// The IPv4 header `ip` grown by the DSR option naming the frontend `flow`
/// was sent to (`flow.daddr`, `flow.dport`: from before the rewrite), its
/// lengths and checksum made whole again. The L4 checksum does not cover
/// IP options, so it stays as it is.
#[inline(always)]
pub fn with_dsr_option(
    ip: &[u8; IP_HLEN],
    flow: &Flow4,
) -> [u8; IP_HLEN + DSR_OPTION_LEN as usize] {
    let mut h = [0u8; IP_HLEN + DSR_OPTION_LEN as usize];
    h[..IP_HLEN].copy_from_slice(ip);
    h[0] = IHL_WITH_DSR_OPTION;
    let tot_len = u16::from_be_bytes([h[2], h[3]]).wrapping_add(u16::from(DSR_OPTION_LEN));
    h[ipv4::TOT_LEN..ipv4::TOT_LEN + 2].copy_from_slice(&tot_len.to_be_bytes());
    h[IP_HLEN] = DSR_OPTION_TYPE;
    h[IP_HLEN + 1] = DSR_OPTION_LEN;
    h[IP_HLEN + 2..IP_HLEN + 4].copy_from_slice(&flow.dport.to_ne_bytes());
    h[IP_HLEN + 4..].copy_from_slice(&flow.daddr.to_ne_bytes());
    h[ipv4::CSUM..ipv4::CSUM + 2].copy_from_slice(&[0, 0]);
    let check = !csum::fold(csum::sum_bytes(&h));
    h[ipv4::CSUM..ipv4::CSUM + 2].copy_from_slice(&check.to_ne_bytes());
    h
}

/// Whether the IPv4 header of the frame is as long as the fixed header and
/// the DSR option (a cheap test before a parse that tells for sure).
#[inline(always)]
pub fn carries_dsr_option(start: usize, end: usize) -> bool {
    read::<u8>(start, end, IP_OFF).is_some_and(is_dsr_header)
}

/// Whether an IPv4 header's first byte (version and header length) is
/// that of a header with the DSR option.
#[inline(always)]
pub fn is_dsr_header(ver_ihl: u8) -> bool {
    ver_ihl == IHL_WITH_DSR_OPTION
}

/// Version 4 and a header of 28 bytes: the fixed one and the DSR option.
const IHL_WITH_DSR_OPTION: u8 = 0x40 | ((IP_HLEN as u8 + DSR_OPTION_LEN) / 4);

/// The DSR option right after the fixed IPv4 header, if that is what the
/// options are.
#[inline(always)]
pub fn dsr_origin(start: usize, end: usize) -> Option<DsrOrigin> {
    let opt = read::<[u8; DSR_OPTION_LEN as usize]>(start, end, L4_OFF)?;
    if opt[0] != DSR_OPTION_TYPE || opt[1] != DSR_OPTION_LEN {
        return None;
    }
    Some(DsrOrigin {
        port: u16::from_ne_bytes([opt[2], opt[3]]),
        addr: u32::from_ne_bytes([opt[4], opt[5], opt[6], opt[7]]),
    })
}

/// IPv6: the fixed header, then hop-by-hop, routing and destination
/// options headers (at most `MAX_EXT_HEADERS`) up to TCP or UDP. A fragment
/// header makes it a fragment; anything else (ICMPv6 and so neighbour
/// discovery, ESP, ...) is not the load balancer's.
#[inline(always)]
pub fn parse6(start: usize, end: usize, out: &mut Flow6) -> Parsed<()> {
    // The addresses are left to the hook, which copies them straight into
    // `out` with a helper: read here, their bytes would be spilled to the
    // stack one by one.
    if ptr_at::<[u8; ipv6::HLEN]>(start, end, IP_OFF).is_none() {
        return Parsed::Malformed;
    }
    let Some(first) = read::<[u8; 8]>(start, end, IP_OFF) else {
        return Parsed::Malformed;
    };
    if first[0] >> 4 != 6 {
        return Parsed::Other;
    }
    let payload_len = u16::from_be_bytes([first[ipv6::PAYLOAD_LEN], first[ipv6::PAYLOAD_LEN + 1]]);
    let ip_end = IP_OFF + ipv6::HLEN + payload_len as usize;
    let mut next = first[ipv6::NEXT_HEADER];
    let dsr = next == IPPROTO_DSTOPTS && dsr_origin6(start, end).is_some();
    let mut off = IP_OFF + ipv6::HLEN;
    let mut i = 0;
    while i < ipv6::MAX_EXT_HEADERS && next != IPPROTO_TCP && next != IPPROTO_UDP {
        // Every extension header starts with its next header and (but for
        // a fragment header) its length in 8-byte units beyond the first.
        let Some(ext) = read::<[u8; 2]>(start, end, off) else {
            return Parsed::Malformed;
        };
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT if ext[0] == IPPROTO_TCP || ext[0] == IPPROTO_UDP => {
                return Parsed::Fragment;
            }
            _ => return Parsed::Other,
        }
        i += 1;
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Parsed::Other;
    }
    if off > ip_end {
        return Parsed::Malformed;
    }
    let Some(l4) = parse_l4(start, end, next, off, ip_end - off) else {
        return Parsed::Malformed;
    };
    out.sport = l4.sport;
    out.dport = l4.dport;
    out.proto = next;
    out.tcp_flags = l4.tcp_flags;
    out.l4_off = off;
    out.l4_csum_off = l4.csum_off;
    out.ip_tot_len = (ipv6::HLEN as u16).saturating_add(payload_len);
    if dsr {
        Parsed::DsrRequest(())
    } else {
        Parsed::Flow(())
    }
}

/// The frontend an IPv6 DSR request names: its destination options header
/// right after the fixed header, if that is the DSR one.
#[inline(always)]
pub fn dsr_origin6(start: usize, end: usize) -> Option<(Ipv6Bytes, u16)> {
    let h = read::<[u8; 4]>(start, end, IP_OFF + ipv6::HLEN)?;
    let ours =
        h[1] == DSR_HEADER6_LEN / 8 - 1 && h[2] == DSR_OPTION6_TYPE && h[3] == DSR_OPTION6_DATA_LEN;
    if !ours {
        return None;
    }
    let port = read::<u16>(start, end, IP_OFF + ipv6::HLEN + 4)?;
    let addr = read::<Ipv6Bytes>(start, end, IP_OFF + ipv6::HLEN + 6)?;
    Some((addr, port))
}

/// The destination options header that names the frontend `flow` was sent
/// to (`flow.daddr`, `flow.dport`: from before the rewrite) to the
/// backend's node, in front of the header `next` (TCP or UDP).
#[inline(always)]
pub fn dsr_header6(next: u8, flow: &Flow6) -> [u8; DSR_HEADER6_LEN as usize] {
    let mut h = [0u8; DSR_HEADER6_LEN as usize];
    h[0] = next;
    h[1] = DSR_HEADER6_LEN / 8 - 1;
    h[2] = DSR_OPTION6_TYPE;
    h[3] = DSR_OPTION6_DATA_LEN;
    h[4..6].copy_from_slice(&flow.dport.to_ne_bytes());
    let mut i = 0;
    while i < 4 {
        h[6 + 4 * i..10 + 4 * i].copy_from_slice(&flow.daddr[i].to_ne_bytes());
        i += 1;
    }
    // PadN of no data bytes: the header ends on 8 bytes.
    h[22] = 1;
    h
}
