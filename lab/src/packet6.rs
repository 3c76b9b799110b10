//! Builds Ethernet/IPv6/TCP|UDP packets with valid checksums, optionally
//! with extension headers, and reads them back: the IPv6 side of `packet`.

use std::net::Ipv6Addr;

use lb_common::{csum, ipv6::words};

use crate::packet::{CLIENT_MAC, NODE_MAC};

pub const IP6_OFF: usize = 14;
pub const IP6_HLEN: usize = 40;

/// Next-header numbers of the extension headers the builders can add.
pub const HOP_BY_HOP: u8 = 0;
pub const DEST_OPTS: u8 = 60;
pub const FRAGMENT: u8 = 44;

#[derive(Clone, Copy, Debug)]
pub struct Tuple6 {
    pub src: Ipv6Addr,
    pub sport: u16,
    pub dst: Ipv6Addr,
    pub dport: u16,
}

/// The checksum of an L4 segment over its IPv6 pseudo header.
fn l4_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, seg: &[u8]) -> u16 {
    let pseudo = csum::pseudo_header_sum6(
        &words(src.octets()),
        &words(dst.octets()),
        proto,
        seg.len() as u32,
    );
    csum::checksum(seg, pseudo)
}

/// Extension headers of `kinds` (8 bytes each, options as padding), the
/// last one pointing at `proto`.
fn ext_headers(kinds: &[u8], proto: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, _) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(proto);
        // Next header, length 0 (8 bytes), then a PadN option of 4 bytes
        // (or, for a fragment header, offset 0 with more-fragments set).
        let mut h = [next, 0, 1, 4, 0, 0, 0, 0];
        if kinds[i] == FRAGMENT {
            h = [next, 0, 0, 1, 0, 0, 0, 7];
        }
        out.extend_from_slice(&h);
    }
    out
}

/// An IPv6 packet carrying `seg` (its checksum field already set) of
/// protocol `proto`, behind extension headers of `kinds`.
fn ipv6_packet(t: &Tuple6, proto: u8, kinds: &[u8], seg: &[u8]) -> Vec<u8> {
    let ext = ext_headers(kinds, proto);
    let mut p = Vec::with_capacity(128);
    p.extend_from_slice(&NODE_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&((ext.len() + seg.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[kinds.first().copied().unwrap_or(proto), 64]);
    p.extend_from_slice(&t.src.octets());
    p.extend_from_slice(&t.dst.octets());
    p.extend_from_slice(&ext);
    p.extend_from_slice(seg);
    p
}

/// A TCP segment with `flags` and `payload`, behind extension headers of
/// `kinds`.
pub fn tcp6(t: &Tuple6, flags: u8, kinds: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut seg = vec![0u8; 20];
    seg[0..2].copy_from_slice(&t.sport.to_be_bytes());
    seg[2..4].copy_from_slice(&t.dport.to_be_bytes());
    seg[4..8].copy_from_slice(&1000u32.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    seg.extend_from_slice(payload);
    let c = l4_checksum(&t.src, &t.dst, 6, &seg);
    seg[16..18].copy_from_slice(&c.to_ne_bytes());
    ipv6_packet(t, 6, kinds, &seg)
}

/// A UDP datagram with `payload`.
pub fn udp6(t: &Tuple6, payload: &[u8]) -> Vec<u8> {
    let mut seg = vec![0u8; 8];
    seg[0..2].copy_from_slice(&t.sport.to_be_bytes());
    seg[2..4].copy_from_slice(&t.dport.to_be_bytes());
    seg[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(payload);
    let c = csum::udp6_nonzero(l4_checksum(&t.src, &t.dst, 17, &seg));
    seg[6..8].copy_from_slice(&c.to_ne_bytes());
    ipv6_packet(t, 17, &[], &seg)
}

/// An ICMPv6 neighbour solicitation for `target` (checksum left zero: no
/// program may touch it, whatever it holds).
pub fn neighbour_solicitation(t: &Tuple6, target: Ipv6Addr) -> Vec<u8> {
    let mut msg = vec![135, 0, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&target.octets());
    ipv6_packet(t, 58, &[], &msg)
}

/// What a test needs to know of an IPv6 packet that came out of a program.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Checked over the pseudo header and the whole segment.
    pub l4_checksum_ok: bool,
    /// The extension headers between the IPv6 header and L4, as they are.
    pub ext_headers: Vec<u8>,
}

/// Parses an IPv6 TCP/UDP packet, walking its extension headers, and
/// verifies the L4 checksum.
pub fn parse6(p: &[u8]) -> Parsed6 {
    assert!(
        p.len() >= IP6_OFF + IP6_HLEN + 8,
        "packet too short: {}",
        p.len()
    );
    let ip = &p[IP6_OFF..IP6_OFF + IP6_HLEN];
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let end = IP6_OFF + IP6_HLEN + payload_len;
    assert!(
        p.len() >= end,
        "payload length {payload_len} exceeds the packet"
    );
    let (mut next, mut off) = (ip[6], IP6_OFF + IP6_HLEN);
    while next != 6 && next != 17 {
        next = p[off];
        off += (p[off + 1] as usize + 1) * 8;
    }
    let seg = &p[off..end];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    Parsed6 {
        src,
        dst,
        sport: u16::from_be_bytes([seg[0], seg[1]]),
        dport: u16::from_be_bytes([seg[2], seg[3]]),
        proto: next,
        tcp_flags: if next == 6 { seg[13] } else { 0 },
        l4_checksum_ok: l4_checksum(&src, &dst, next, seg) == 0,
        ext_headers: p[IP6_OFF + IP6_HLEN..off].to_vec(),
    }
}

/// An ICMPv6 error that came out of a program: type, code, whether its
/// checksum (over the IPv6 pseudo header) holds, and the quoted packet's
/// destination port.
#[derive(Debug, PartialEq, Eq)]
pub struct Icmp6Error {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub kind: (u8, u8),
    pub checksum_ok: bool,
    pub quoted_dport: u16,
}

/// Parses an ICMPv6 error answering a datagram (no extension headers).
pub fn parse_icmp6_error(p: &[u8]) -> Icmp6Error {
    let ip = &p[IP6_OFF..IP6_OFF + IP6_HLEN];
    assert_eq!(ip[6], 58, "not ICMPv6: {p:02x?}");
    let end = IP6_OFF + IP6_HLEN + u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let msg = &p[IP6_OFF + IP6_HLEN..end];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let quoted_l4 = 8 + IP6_HLEN;
    Icmp6Error {
        src,
        dst,
        kind: (msg[0], msg[1]),
        checksum_ok: l4_checksum(&src, &dst, 58, msg) == 0,
        quoted_dport: u16::from_be_bytes([msg[quoted_l4 + 2], msg[quoted_l4 + 3]]),
    }
}
