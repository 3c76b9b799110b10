//! ICMP "port unreachable" for a UDP datagram to a Service without
//! endpoints: the client's stack then fails the socket at once
//! (ECONNREFUSED), as kube-proxy's REJECT rule makes it. The same answer
//! turned into "fragmentation needed" (`Unreachable::apply`) tells a
//! client that a datagram sent with direct server return does not fit the
//! wire once the DSR option is in.
//!
//! Built in place: the program opens 28 bytes of room in front of the
//! datagram, writes the 42 bytes returned here (Ethernet, IPv4, ICMP), and
//! trims the packet to `PORT_UNREACHABLE_LEN`, so the original IPv4 header
//! and the first 8 bytes of UDP, which ICMP quotes, never move.

use crate::csum;

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const ICMP_HDR_LEN: usize = 8;
/// Bytes of the original datagram ICMP quotes after its IPv4 header.
pub const QUOTED_L4_LEN: usize = 8;
/// Room to open in front of the datagram.
pub const GROW: usize = IP_LEN + ICMP_HDR_LEN;
/// Length of the new head the program writes.
pub const HEAD_LEN: usize = ETH_LEN + IP_LEN + ICMP_HDR_LEN;
/// Length of the whole answer.
pub const PORT_UNREACHABLE_LEN: usize = HEAD_LEN + IP_LEN + QUOTED_L4_LEN;

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

/// What a destination unreachable answer tells the client: its code and
/// next-hop MTU. A struct of both, not an enum: passed to a BPF function,
/// an enum's variant without the MTU would leave its register unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreachable {
    code: u8,
    mtu: u16,
}

impl Unreachable {
    /// No backend: the socket fails (ECONNREFUSED).
    pub const PORT: Self = Self {
        code: ICMP_PORT_UNREACH,
        mtu: 0,
    };

    /// The datagram does not fit the path with don't-fragment set: the
    /// client's path MTU to the Service drops to `mtu` (RFC 1191).
    #[inline(always)]
    pub const fn frag_needed(mtu: u16) -> Self {
        Self {
            code: ICMP_FRAG_NEEDED,
            mtu,
        }
    }

    /// Turns a port unreachable head (`port_unreachable_head`) into this
    /// answer in place: its code and next-hop MTU, and the checksum
    /// updated for both (RFC 1624), so no second head is built on the
    /// stack.
    #[inline(always)]
    pub fn apply(self, head: &mut [u8; HEAD_LEN]) {
        let o = ETH_LEN + IP_LEN;
        let check = u16::from_ne_bytes([head[o + 2], head[o + 3]]);
        let was = u16::from_ne_bytes([head[o], head[o + 1]]);
        let now = u16::from_ne_bytes([ICMP_DEST_UNREACH, self.code]);
        let mtu = self.mtu.to_be_bytes();
        let check = csum::replace2(check, was, now);
        let check = csum::replace2(check, 0, u16::from_ne_bytes(mtu));
        head[o + 1] = self.code;
        head[o + 2..o + 4].copy_from_slice(&check.to_ne_bytes());
        head[o + 6..o + 8].copy_from_slice(&mtu);
    }
}

/// The UDP checksum field as it will be when the answer leaves the node.
/// A pod's datagram may carry only a partial checksum (the pseudo header
/// sum, non-inverted); wherever the kernel finalizes it, it will sum just
/// the 8 quoted bytes (all that is left past the checksum start), so that
/// is the value the ICMP checksum must cover.
#[inline(always)]
pub fn quoted_udp_check(ip: &[u8; IP_LEN], udp: &[u8; QUOTED_L4_LEN]) -> u16 {
    let check = u16::from_ne_bytes([udp[6], udp[7]]);
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let pseudo = csum::fold(csum::pseudo_header_sum(saddr, daddr, ip[9], udp_len));
    if check != 0 && check == pseudo {
        match !csum::fold(csum::sum_bytes(udp)) {
            0 => 0xffff,
            c => c,
        }
    } else {
        check
    }
}

/// Ethernet, IPv4 and ICMP headers answering the datagram whose Ethernet
/// and IPv4 headers and first 8 UDP bytes are given; `udp_check` is what
/// the quoted checksum field will hold (`quoted_udp_check`).
#[inline(always)]
pub fn port_unreachable_head(
    eth: &[u8; ETH_LEN],
    ip: &[u8; IP_LEN],
    udp: &[u8; QUOTED_L4_LEN],
    udp_check: u16,
) -> [u8; HEAD_LEN] {
    let mut out = [0u8; HEAD_LEN];
    // Ethernet: back to where it came from.
    let mut i = 0;
    while i < 6 {
        out[i] = eth[6 + i];
        out[6 + i] = eth[i];
        i += 1;
    }
    out[12] = eth[12];
    out[13] = eth[13];

    let mut h = [0u8; IP_LEN];
    h[0] = 0x45;
    h[1] = 0xc0; // internetwork control, as Linux sends ICMP errors
    let tot = (PORT_UNREACHABLE_LEN - ETH_LEN) as u16;
    h[2..4].copy_from_slice(&tot.to_be_bytes());
    h[8] = 64;
    h[9] = IPPROTO_ICMP;
    // From the address the client sent to (the Service), to the client.
    h[12..16].copy_from_slice(&ip[16..20]);
    h[16..20].copy_from_slice(&ip[12..16]);
    let ip_check = !csum::fold(csum::sum_bytes(&h));
    h[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    out[ETH_LEN..ETH_LEN + IP_LEN].copy_from_slice(&h);

    let mut quoted = *udp;
    quoted[6..8].copy_from_slice(&udp_check.to_ne_bytes());
    let icmp_sum = u32::from(u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH]))
        + csum::sum_bytes(ip)
        + csum::sum_bytes(&quoted);
    let icmp_check = !csum::fold(icmp_sum);
    let o = ETH_LEN + IP_LEN;
    out[o] = ICMP_DEST_UNREACH;
    out[o + 1] = ICMP_PORT_UNREACH;
    out[o + 2..o + 4].copy_from_slice(&icmp_check.to_ne_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram() -> ([u8; 14], [u8; 20], [u8; 8]) {
        let eth = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
        let mut ip = [
            0x45, 0, 0, 33, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 244, 0, 2, 10, 96, 0, 99,
        ];
        let c = csum::checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        // sport 40000, dport 53, length 13 (5 bytes of payload), checksum set below.
        let udp = [0x9c, 0x40, 0, 53, 0, 13, 0, 0];
        (eth, ip, udp)
    }

    #[test]
    fn answer_has_valid_checksums_and_quotes_the_datagram() {
        let (eth, ip, mut udp) = datagram();
        udp[6..8].copy_from_slice(&0x1234u16.to_ne_bytes()); // a full checksum
        let check = quoted_udp_check(&ip, &udp);
        assert_eq!(check, 0x1234, "a full checksum is quoted as it is");
        let head = port_unreachable_head(&eth, &ip, &udp, check);
        assert_eq!(&head[0..6], &eth[6..12]);
        assert_eq!(&head[6..12], &eth[0..6]);
        let outer: [u8; 20] = head[14..34].try_into().unwrap();
        assert_eq!(csum::checksum(&outer, 0), 0, "IPv4 header checksum");
        assert_eq!(&outer[12..16], &ip[16..20]);
        assert_eq!(&outer[16..20], &ip[12..16]);
        let mut icmp = head[34..42].to_vec();
        icmp.extend_from_slice(&ip);
        icmp.extend_from_slice(&udp);
        assert_eq!(
            csum::checksum(&icmp, 0),
            0,
            "ICMP checksum over header and quote"
        );
        assert_eq!(icmp[0..2], [3, 3]);
    }

    #[test]
    fn fragmentation_needed_carries_the_mtu_under_a_valid_checksum() {
        let (eth, ip, udp) = datagram();
        let mut head = port_unreachable_head(&eth, &ip, &udp, 0);
        Unreachable::frag_needed(1492).apply(&mut head);
        let mut icmp = head[34..42].to_vec();
        icmp.extend_from_slice(&ip);
        icmp.extend_from_slice(&udp);
        assert_eq!(csum::checksum(&icmp, 0), 0, "ICMP checksum");
        assert_eq!(icmp[0..2], [3, 4], "destination unreachable, frag needed");
        assert_eq!(icmp[6..8], 1492u16.to_be_bytes(), "next-hop MTU");
        let mut same = port_unreachable_head(&eth, &ip, &udp, 0);
        Unreachable::PORT.apply(&mut same);
        assert_eq!(same, port_unreachable_head(&eth, &ip, &udp, 0));
    }

    #[test]
    fn a_partial_checksum_is_quoted_as_the_kernel_will_finish_it() {
        let (_, ip, mut udp) = datagram();
        let pseudo = csum::fold(csum::pseudo_header_sum(
            u32::from_ne_bytes([10, 244, 0, 2]),
            u32::from_ne_bytes([10, 96, 0, 99]),
            17,
            13,
        ));
        udp[6..8].copy_from_slice(&pseudo.to_ne_bytes());
        let check = quoted_udp_check(&ip, &udp);
        // What skb_checksum_help writes: the checksum of the 8 bytes left.
        assert_eq!(check, csum::checksum(&udp, 0));
    }
}
