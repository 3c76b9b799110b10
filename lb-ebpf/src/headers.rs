//! Bounds-checked parsing of Ethernet / IPv4 / TCP / UDP headers.

use lb_common::uapi::{ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
/// Where the EtherType sits, after the two MAC addresses.
const ETH_TYPE_OFF: usize = 12;
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

pub const IP_TOT_LEN_OFF: usize = IP_OFF + ipv4::TOT_LEN;
pub const IP_CSUM_OFF: usize = IP_OFF + ipv4::CSUM;
pub const IP_SADDR_OFF: usize = IP_OFF + ipv4::SADDR;
pub const IP_DADDR_OFF: usize = IP_OFF + ipv4::DADDR;
pub const L4_SPORT_OFF: usize = L4_OFF + tcp::SPORT;
pub const L4_DPORT_OFF: usize = L4_OFF + tcp::DPORT;
pub const TCP_CSUM_OFF: usize = L4_OFF + tcp::CSUM;
/// Where the checksum sits in a UDP header.
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// TTL of packets the programs build (RSTs).
pub const DEFAULT_TTL: u8 = 64;
/// More-fragments flag and fragment offset, network order mask.
const IP_FRAG_MASK: u16 = 0x3fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the data path needs to know of a packet. Addresses and ports stay in
/// network byte order, as read from the packet.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Offset of the L4 checksum field.
    pub l4_csum_off: usize,
    /// Host order.
    pub ip_tot_len: u16,
}

pub enum Parsed {
    /// Not something the load balancer translates: pass untouched.
    Other,
    /// An IPv4 fragment: its L4 header is absent or incomplete.
    Fragment,
    /// Shorter than the headers it claims: pass untouched, counted.
    Malformed,
    Flow(Flow),
}

/// Returns a pointer to a `T` at `offset`, or `None` when it would run past
/// the end of the packet.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
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

/// The IPv4 address at `off` in `hdr`, network order.
#[inline(always)]
fn addr_at(hdr: &[u8; IP_HLEN], off: usize) -> u32 {
    u32::from_ne_bytes([hdr[off], hdr[off + 1], hdr[off + 2], hdr[off + 3]])
}

/// Parses the headers between `start` and `end` (packet data pointers).
#[inline(always)]
pub fn parse(start: usize, end: usize) -> Parsed {
    let Some(eth_type) = read::<u16>(start, end, ETH_TYPE_OFF) else {
        return Parsed::Other;
    };
    if u16::from_be(eth_type) != ETH_P_IP {
        return Parsed::Other;
    }
    let Some(ver_ihl) = read::<u8>(start, end, IP_OFF) else {
        return Parsed::Malformed;
    };
    // IPv4 with IP options is left to the kernel: the fixed offsets below and
    // the checksum fix-ups assume a 20-byte header.
    if ver_ihl != 0x45 {
        return Parsed::Other;
    }
    let Some(hdr) = read::<[u8; IP_HLEN]>(start, end, IP_OFF) else {
        return Parsed::Malformed;
    };
    let frag = u16::from_be_bytes([hdr[ipv4::FRAG_OFF], hdr[ipv4::FRAG_OFF + 1]]);
    let proto = hdr[ipv4::PROTOCOL];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Other;
    }
    if frag & IP_FRAG_MASK != 0 {
        return Parsed::Fragment;
    }
    let ip_tot_len = u16::from_be_bytes([hdr[ipv4::TOT_LEN], hdr[ipv4::TOT_LEN + 1]]);
    let saddr = addr_at(&hdr, ipv4::SADDR);
    let daddr = addr_at(&hdr, ipv4::DADDR);
    let (l4_len, l4_csum_off) = if proto == IPPROTO_TCP {
        (TCP_HLEN, TCP_CSUM_OFF)
    } else {
        (UDP_HLEN, UDP_CSUM_OFF)
    };
    if (ip_tot_len as usize) < IP_HLEN + l4_len {
        return Parsed::Malformed;
    }
    let Some(ports) = read::<[u16; 2]>(start, end, L4_OFF) else {
        return Parsed::Malformed;
    };
    if ptr_at::<u8>(start, end, L4_OFF + l4_len - 1).is_none() {
        return Parsed::Malformed;
    }
    let tcp_flags = if proto == IPPROTO_TCP {
        read::<u8>(start, end, L4_OFF + 13).unwrap_or(0)
    } else {
        0
    };
    Parsed::Flow(Flow {
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        proto,
        tcp_flags,
        l4_csum_off,
        ip_tot_len,
    })
}
