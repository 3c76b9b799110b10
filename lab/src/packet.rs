//! Builds Ethernet/IPv4/TCP|UDP packets with valid checksums and reads them
//! back, for packet-level tests of the BPF programs.

use std::net::Ipv4Addr;

use lb_common::csum;

pub const ETH_HLEN: usize = 14;
pub const IP_OFF: usize = 14;
pub const L4_OFF: usize = 34;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Copy, Debug)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(128);
    p.extend_from_slice(&NODE_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn ipv4_header(t: &Tuple, proto: u8, l4_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&t.src.octets());
    h[16..20].copy_from_slice(&t.dst.octets());
    let c = csum::checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    h
}

fn l4_checksum(t: &Tuple, proto: u8, seg: &[u8]) -> u16 {
    let pseudo = csum::pseudo_header_sum(
        u32::from_ne_bytes(t.src.octets()),
        u32::from_ne_bytes(t.dst.octets()),
        proto,
        seg.len() as u16,
    );
    csum::checksum(seg, pseudo)
}

/// A TCP segment with the given flags, sequence number, options and payload.
pub fn tcp(t: &Tuple, flags: u8, seq: u32, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let hlen = 20 + options.len();
    let mut seg = vec![0u8; hlen];
    seg[0..2].copy_from_slice(&t.sport.to_be_bytes());
    seg[2..4].copy_from_slice(&t.dport.to_be_bytes());
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    if flags & TCP_ACK != 0 {
        seg[8..12].copy_from_slice(&7777u32.to_be_bytes());
    }
    seg[12] = ((hlen / 4) as u8) << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
    seg[20..].copy_from_slice(options);
    seg.extend_from_slice(payload);
    let c = l4_checksum(t, 6, &seg);
    seg[16..18].copy_from_slice(&c.to_ne_bytes());
    let mut p = eth(0x0800);
    p.extend_from_slice(&ipv4_header(t, 6, seg.len()));
    p.extend_from_slice(&seg);
    p
}

/// A SYN as Linux sends it (MSS, SACK-permitted, timestamps, window scale).
pub fn tcp_syn(t: &Tuple) -> Vec<u8> {
    let opts = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    tcp(t, TCP_SYN, 1000, &opts, &[])
}

/// A UDP datagram; `with_checksum: false` sends the "no checksum" zero.
pub fn udp(t: &Tuple, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let mut seg = vec![0u8; 8];
    seg[0..2].copy_from_slice(&t.sport.to_be_bytes());
    seg[2..4].copy_from_slice(&t.dport.to_be_bytes());
    seg[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(payload);
    if with_checksum {
        let c = match l4_checksum(t, 17, &seg) {
            0 => 0xffff,
            c => c,
        };
        seg[6..8].copy_from_slice(&c.to_ne_bytes());
    }
    let mut p = eth(0x0800);
    p.extend_from_slice(&ipv4_header(t, 17, seg.len()));
    p.extend_from_slice(&seg);
    p
}

/// An ICMP echo request.
pub fn icmp_echo(t: &Tuple) -> Vec<u8> {
    let mut seg = vec![8u8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    let c = csum::checksum(&seg, 0);
    seg[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut p = eth(0x0800);
    p.extend_from_slice(&ipv4_header(t, 1, seg.len()));
    p.extend_from_slice(&seg);
    p
}

/// An ARP request (who-has `t.dst` tell `t.src`).
pub fn arp(t: &Tuple) -> Vec<u8> {
    let mut p = eth(0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&t.src.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&t.dst.octets());
    p
}

/// An IPv6 TCP SYN (the data path leaves IPv6 alone for now).
pub fn ipv6_tcp() -> Vec<u8> {
    let mut p = eth(0x86dd);
    p.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 2, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p
}

/// Turns a packet into a non-first fragment (offset 8 bytes), fixing the IP checksum.
pub fn as_fragment(mut p: Vec<u8>) -> Vec<u8> {
    p[IP_OFF + 6] = 0x00;
    p[IP_OFF + 7] = 0x01;
    refresh_ip_checksum(&mut p);
    p
}

/// Inserts 4 bytes of IP options (NOPs plus end), fixing lengths and checksum.
pub fn with_ip_options(p: &[u8]) -> Vec<u8> {
    let mut out = p[..IP_OFF + 20].to_vec();
    out[IP_OFF] = 0x46;
    let tot = u16::from_be_bytes([out[IP_OFF + 2], out[IP_OFF + 3]]) + 4;
    out[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&tot.to_be_bytes());
    out.extend_from_slice(&[1, 1, 1, 0]);
    out.extend_from_slice(&p[IP_OFF + 20..]);
    refresh_ip_checksum(&mut out);
    out
}

/// Recomputes the IPv4 header checksum (options included).
pub fn refresh_ip_checksum(p: &mut [u8]) {
    let ihl = ((p[IP_OFF] & 0xf) as usize) * 4;
    p[IP_OFF + 10] = 0;
    p[IP_OFF + 11] = 0;
    let c = csum::checksum(&p[IP_OFF..IP_OFF + ihl], 0);
    p[IP_OFF + 10..IP_OFF + 12].copy_from_slice(&c.to_ne_bytes());
}

/// What a test needs to know of a packet that came out of a program.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ip_checksum_ok: bool,
    /// Checked over the pseudo header and the whole segment.
    pub l4_checksum_ok: bool,
    pub udp_checksum_zero: bool,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The IP options, after the fixed 20 bytes of the header.
    pub ip_options: Vec<u8>,
    pub(crate) total_len: usize,
}

/// Parses an IPv4 TCP/UDP packet (its header options included) and
/// verifies checksums.
pub fn parse(p: &[u8]) -> Parsed {
    assert!(p.len() >= L4_OFF + 8, "packet too short: {} bytes", p.len());
    let ihl = ((p[IP_OFF] & 0xf) as usize) * 4;
    assert!(
        ihl >= 20 && p.len() >= IP_OFF + ihl + 8,
        "IP header length {ihl}"
    );
    let ip = &p[IP_OFF..IP_OFF + ihl];
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert!(
        p.len() >= IP_OFF + tot,
        "IP total length {tot} exceeds the packet ({} bytes)",
        p.len()
    );
    let seg = &p[IP_OFF + ihl..IP_OFF + tot];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let t = Tuple {
        src,
        dst,
        sport: 0,
        dport: 0,
    };
    let udp_zero = proto == 17 && seg[6] == 0 && seg[7] == 0;
    Parsed {
        src,
        dst,
        sport: u16::from_be_bytes([seg[0], seg[1]]),
        dport: u16::from_be_bytes([seg[2], seg[3]]),
        proto,
        tcp_flags: if proto == 6 { seg[13] } else { 0 },
        seq: if proto == 6 {
            u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]])
        } else {
            0
        },
        ack: if proto == 6 {
            u32::from_be_bytes([seg[8], seg[9], seg[10], seg[11]])
        } else {
            0
        },
        ip_checksum_ok: csum::checksum(ip, 0) == 0,
        l4_checksum_ok: udp_zero || l4_checksum(&t, proto, seg) == 0,
        udp_checksum_zero: udp_zero,
        dst_mac: p[0..6].try_into().unwrap(),
        src_mac: p[6..12].try_into().unwrap(),
        ip_options: ip[20..].to_vec(),
        total_len: IP_OFF + tot,
    }
}
