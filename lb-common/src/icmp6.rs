//! ICMPv6 "port unreachable" (RFC 4443 3.1, code 4) for a UDP datagram to
//! an IPv6 Service without endpoints: the IPv6 twin of [`crate::icmp`],
//! built the same way in place. The program opens 48 bytes in front of the
//! datagram, writes Ethernet, IPv6 (`IP6_FIRST_BYTES`, the addresses) and
//! ICMPv6 (`header`, `checksum`) there field by field, and trims the packet
//! to `PORT_UNREACHABLE_LEN`: the quoted IPv6 header and first 8 UDP bytes
//! never move. Only datagrams whose UDP header follows the IPv6 header
//! directly are answered (a quote must show it).

use crate::{csum, uapi::IPPROTO_ICMPV6};

pub const ETH_LEN: usize = 14;
pub const IP6_LEN: usize = 40;
pub const ICMP6_HDR_LEN: usize = 8;
/// Bytes of the original datagram quoted after its IPv6 header: the UDP
/// header, which the client's stack needs to find its socket.
pub const QUOTED_L4_LEN: usize = 8;
/// Room to open in front of the datagram.
pub const GROW: usize = IP6_LEN + ICMP6_HDR_LEN;
/// Length of the new head the program writes.
pub const HEAD_LEN: usize = ETH_LEN + IP6_LEN + ICMP6_HDR_LEN;
/// Length of the whole answer.
pub const PORT_UNREACHABLE_LEN: usize = HEAD_LEN + IP6_LEN + QUOTED_L4_LEN;

const ICMP6_DST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
const ICMP6_PACKET_TOO_BIG: u8 = 2;

/// What an ICMPv6 error answering a datagram tells the client: its type,
/// code and 32-bit parameter. A struct, not an enum, for the reason
/// `icmp::Unreachable` gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreachable6 {
    kind: u8,
    code: u8,
    mtu: u32,
}

impl Unreachable6 {
    /// No backend: the socket fails (ECONNREFUSED).
    pub const PORT: Self = Self {
        kind: ICMP6_DST_UNREACH,
        code: ICMP6_PORT_UNREACH,
        mtu: 0,
    };

    /// The datagram does not fit the path (RFC 4443 3.2): the client's
    /// path MTU to the Service drops to `mtu`.
    #[inline(always)]
    pub const fn packet_too_big(mtu: u32) -> Self {
        Self {
            kind: ICMP6_PACKET_TOO_BIG,
            code: 0,
            mtu,
        }
    }
}
const HOP_LIMIT: u8 = 64;

/// The UDP checksum field as it will be when the answer leaves the node
/// (see `icmp::quoted_udp_check`: a partial checksum is finished by the
/// kernel over the 8 quoted bytes only). `saddr` and `daddr` are the
/// datagram's.
#[inline(always)]
pub fn quoted_udp_check(saddr: &[u32; 4], daddr: &[u32; 4], udp: &[u8; QUOTED_L4_LEN]) -> u16 {
    let check = u16::from_ne_bytes([udp[6], udp[7]]);
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
    let pseudo = csum::pseudo_header_sum6(saddr, daddr, 17, u32::from(udp_len));
    if check != 0 && check == csum::fold(pseudo) {
        csum::udp6_nonzero(!csum::fold(csum::sum_bytes(udp)))
    } else {
        check
    }
}

/// The first 8 bytes of the answer's IPv6 header: version, no traffic
/// class or flow label, payload length, ICMPv6, hop limit.
pub const IP6_FIRST_BYTES: [u8; 8] = {
    let len = ((ICMP6_HDR_LEN + IP6_LEN + QUOTED_L4_LEN) as u16).to_be_bytes();
    [0x60, 0, 0, 0, len[0], len[1], IPPROTO_ICMPV6, HOP_LIMIT]
};

/// The ICMPv6 checksum of the answer from the Service `src` to the client
/// `dst`, given the unfolded sum of the quoted bytes as they sit in the
/// packet, whose UDP checksum field holds `sent` and will hold `quoted`
/// when the answer leaves (`quoted_udp_check`). The field itself is left
/// as sent: a partial checksum is finished by the kernel, which sums the
/// field too.
#[inline(always)]
pub fn checksum(
    src: &[u32; 4],
    dst: &[u32; 4],
    quote_sum: u32,
    sent: u16,
    quoted: u16,
    why: Unreachable6,
) -> u16 {
    let icmp_len = (ICMP6_HDR_LEN + IP6_LEN + QUOTED_L4_LEN) as u32;
    let pseudo = csum::pseudo_header_sum6(src, dst, IPPROTO_ICMPV6, icmp_len);
    let mtu = why.mtu.to_be_bytes();
    let kind = u32::from(u16::from_ne_bytes([why.kind, why.code]))
        + u32::from(u16::from_ne_bytes([mtu[0], mtu[1]]))
        + u32::from(u16::from_ne_bytes([mtu[2], mtu[3]]));
    let quote = u32::from(csum::fold(quote_sum)) + u32::from(!sent) + u32::from(quoted);
    !csum::fold(u32::from(csum::fold(pseudo)) + kind + quote)
}

/// The ICMPv6 header: what `why` reports, `check`.
#[inline(always)]
pub fn header(check: u16, why: Unreachable6) -> [u8; ICMP6_HDR_LEN] {
    let c = check.to_ne_bytes();
    let m = why.mtu.to_be_bytes();
    [why.kind, why.code, c[0], c[1], m[0], m[1], m[2], m[3]]
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::*;
    use crate::ipv6::words;

    const CLIENT: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const SVC: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99];

    fn datagram() -> ([u8; 40], [u8; 8]) {
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&13u16.to_be_bytes());
        ip[6] = 17;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&CLIENT);
        ip[24..40].copy_from_slice(&SVC);
        // sport 40000, dport 53, length 13 (5 bytes of payload).
        let udp = [0x9c, 0x40, 0, 53, 0, 13, 0x12, 0x34];
        (ip, udp)
    }

    /// The datagram as a pod sends it: its UDP checksum left partial (the
    /// pseudo-header's folded sum, for the NIC or the kernel to finish).
    fn partial_datagram() -> ([u8; 40], [u8; 8]) {
        let (ip, mut udp) = datagram();
        let pseudo = csum::fold(csum::pseudo_header_sum6(
            &words(CLIENT),
            &words(SVC),
            17,
            13,
        ));
        udp[6..8].copy_from_slice(&pseudo.to_ne_bytes());
        (ip, udp)
    }

    /// The quoted bytes (IPv6 header, UDP header) and their sum.
    fn quote_of(ip: &[u8; 40], udp: &[u8; 8]) -> ([u8; 48], u32) {
        let mut quote = [0u8; 48];
        quote[..40].copy_from_slice(ip);
        quote[40..].copy_from_slice(udp);
        (quote, csum::sum_bytes(&quote))
    }

    #[test]
    fn answer_has_a_valid_checksum_and_quotes_the_datagram() {
        let (ip, udp) = datagram();
        let check = quoted_udp_check(&words(CLIENT), &words(SVC), &udp);
        assert_eq!(
            check,
            u16::from_ne_bytes([0x12, 0x34]),
            "a full checksum stays"
        );
        let (quote, quote_sum) = quote_of(&ip, &udp);
        let sent = u16::from_ne_bytes([udp[6], udp[7]]);
        let icmp = checked_message(&quote, quote_sum, sent, check, PORT);
        assert_eq!(icmp[0..2], [1, 4], "destination unreachable, port");
        assert_eq!(
            IP6_FIRST_BYTES[4..8],
            [0, 56, 58, 64],
            "length, ICMPv6, hop limit"
        );
    }

    const PORT: Unreachable6 = Unreachable6::PORT;

    /// The ICMPv6 message from the service's address to the client that
    /// quotes `quote`, its checksum checked over the whole message.
    fn checked_message(
        quote: &[u8],
        quote_sum: u32,
        sent: u16,
        quoted: u16,
        why: Unreachable6,
    ) -> Vec<u8> {
        let icmp_check = checksum(&words(SVC), &words(CLIENT), quote_sum, sent, quoted, why);
        let mut icmp = header(icmp_check, why).to_vec();
        icmp.extend_from_slice(quote);
        let pseudo = csum::pseudo_header_sum6(&words(SVC), &words(CLIENT), 58, icmp.len() as u32);
        assert_eq!(csum::checksum(&icmp, pseudo), 0, "ICMPv6 checksum");
        icmp
    }

    #[test]
    fn packet_too_big_carries_the_mtu_under_a_valid_checksum() {
        let (ip, udp) = datagram();
        let (quote, quote_sum) = quote_of(&ip, &udp);
        let sent = u16::from_ne_bytes([udp[6], udp[7]]);
        let why = Unreachable6::packet_too_big(1476);
        let icmp = checked_message(&quote, quote_sum, sent, sent, why);
        assert_eq!(icmp[0..2], [2, 0], "packet too big");
        assert_eq!(icmp[4..8], 1476u32.to_be_bytes(), "MTU");
    }

    #[test]
    fn a_partial_checksum_left_in_the_quote_and_finished_by_the_kernel_checks_out() {
        let (ip, udp) = partial_datagram();
        let pseudo = u16::from_ne_bytes([udp[6], udp[7]]);
        let quoted = quoted_udp_check(&words(CLIENT), &words(SVC), &udp);
        let (mut quote, quote_sum) = quote_of(&ip, &udp);
        let icmp_check = checksum(&words(SVC), &words(CLIENT), quote_sum, pseudo, quoted, PORT);
        // What the kernel's skb_checksum_help does to the field on the way.
        let finished = csum::checksum(&udp, 0);
        quote[46..48].copy_from_slice(&finished.to_ne_bytes());
        let mut icmp = header(icmp_check, PORT).to_vec();
        icmp.extend_from_slice(&quote);
        let pseudo = csum::pseudo_header_sum6(&words(SVC), &words(CLIENT), 58, icmp.len() as u32);
        assert_eq!(
            csum::checksum(&icmp, pseudo),
            0,
            "ICMPv6 checksum once finished"
        );
    }

    #[test]
    fn a_partial_checksum_is_quoted_as_the_kernel_will_finish_it() {
        let (_, udp) = partial_datagram();
        let check = quoted_udp_check(&words(CLIENT), &words(SVC), &udp);
        assert_eq!(check, csum::checksum(&udp, 0));
    }
}
