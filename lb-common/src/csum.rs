//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! All values are taken exactly as they sit in memory (read with native
//! loads): one's complement sums do not depend on byte order as long as every
//! word is read the same way, so callers never swap bytes.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after a 32-bit field changed from `from` to `to`
/// (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nfrom = !from;
    let sum = u32::from(!check) + (nfrom & 0xffff) + (nfrom >> 16) + (to & 0xffff) + (to >> 16);
    !fold(sum)
}

/// New checksum after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!from) + u32::from(to);
    !fold(sum)
}

/// UDP over IPv4: a zero checksum means "none" and stays zero; a computed
/// zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_replace4(check: u16, from: u32, to: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace4(check, from, to) {
        0 => 0xffff,
        c => c,
    }
}

#[inline(always)]
pub fn udp_replace2(check: u16, from: u16, to: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace2(check, from, to) {
        0 => 0xffff,
        c => c,
    }
}

/// One's complement sum of `words` (native 16-bit loads), unfolded.
#[inline(always)]
pub fn sum_words(words: &[u16]) -> u32 {
    let mut sum = 0u32;
    for w in words {
        sum += u32::from(*w);
    }
    sum
}

/// One's complement sum of a fixed-size byte array (native 16-bit loads;
/// an odd last byte is left out), unfolded: what ICMP answers sum of the
/// headers they build and quote.
#[inline(always)]
pub fn sum_bytes<const N: usize>(b: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

/// Full checksum of `bytes` plus an initial unfolded `seed` (e.g. a pseudo
/// header sum). Odd lengths are padded with a zero byte.
pub fn checksum(bytes: &[u8], seed: u32) -> u16 {
    let mut sum = u64::from(seed);
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_ne_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Unfolded sum of the IPv4 pseudo header for TCP/UDP (addresses as in
/// memory, `proto` and `l4_len` host order).
pub fn pseudo_header_sum(saddr: u32, daddr: u32, proto: u8, l4_len: u16) -> u32 {
    (saddr & 0xffff)
        + (saddr >> 16)
        + (daddr & 0xffff)
        + (daddr >> 16)
        + u32::from(u16::from_ne_bytes([0, proto]))
        + u32::from(u16::from_ne_bytes(l4_len.to_be_bytes()))
}

/// New checksum after a 16-byte field (an IPv6 address, as four words)
/// changed from `from` to `to`.
#[inline(always)]
pub fn replace16(check: u16, from: &[u32; 4], to: &[u32; 4]) -> u16 {
    let mut c = check;
    let mut i = 0;
    while i < 4 {
        c = replace4(c, from[i], to[i]);
        i += 1;
    }
    c
}

/// The change to a one's complement sum when a 16-byte field (an IPv6
/// address, as four words) goes from `from` to `to`: the sum of `!from`
/// and `to`, unfolded. What the kernel's checksum helpers take as a diff
/// (`bpf_csum_diff`'s result), computed without a helper call.
#[inline(always)]
pub fn diff16(from: &[u32; 4], to: &[u32; 4]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 4 {
        let nfrom = !from[i];
        sum += (nfrom & 0xffff) + (nfrom >> 16) + (to[i] & 0xffff) + (to[i] >> 16);
        i += 1;
    }
    sum
}

/// A UDP checksum over IPv6 is mandatory (RFC 8200 8.1): a computed zero
/// is sent as 0xffff, and a zero received is updated like any value.
#[inline(always)]
pub fn udp6_nonzero(check: u16) -> u16 {
    if check == 0 {
        0xffff
    } else {
        check
    }
}

/// Unfolded sum of the IPv6 pseudo header for TCP/UDP (RFC 8200 8.1;
/// addresses as in memory, `proto` and `l4_len` host order).
pub fn pseudo_header_sum6(saddr: &[u32; 4], daddr: &[u32; 4], proto: u8, l4_len: u32) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 4 {
        sum += (saddr[i] & 0xffff) + (saddr[i] >> 16) + (daddr[i] & 0xffff) + (daddr[i] >> 16);
        i += 1;
    }
    let len = l4_len.to_be_bytes();
    sum + u32::from(u16::from_ne_bytes([len[0], len[1]]))
        + u32::from(u16::from_ne_bytes([len[2], len[3]]))
        + u32::from(u16::from_ne_bytes([0, proto]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_header(daddr: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 10, 244, 0, 7, 0, 0, 0, 0,
        ];
        h[16..20].copy_from_slice(&daddr);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn a_diff16_applied_as_a_diff_is_replace16() {
        let from = [0x2001_0db8, 0x0000_0001, 0xdead_beef, 0x0000_ffff];
        let to = [0xfd00_0000, 0x0010_0244, 0x0000_0001, 0xffff_0000];
        for check in [0u16, 1, 0x1234, 0xfffe, 0xffff] {
            let by_diff = !fold(u32::from(!check) + u32::from(fold(diff16(&from, &to))));
            assert_eq!(by_diff, replace16(check, &from, &to), "check {check:#x}");
        }
        assert_eq!(
            fold(diff16(&from, &from)),
            0xffff,
            "no change sums to minus zero"
        );
    }

    #[test]
    fn full_checksum_of_a_valid_header_is_zero() {
        let h = ipv4_header([10, 96, 0, 10]);
        assert_eq!(checksum(&h, 0), 0);
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let before = ipv4_header([10, 96, 0, 10]);
        let after = ipv4_header([10, 244, 1, 23]);
        let check = u16::from_ne_bytes([before[10], before[11]]);
        let from = u32::from_ne_bytes([10, 96, 0, 10]);
        let to = u32::from_ne_bytes([10, 244, 1, 23]);
        let updated = replace4(check, from, to);
        assert_eq!(updated.to_ne_bytes(), [after[10], after[11]]);
    }

    #[test]
    fn port_update_matches_recomputation() {
        // A UDP header plus payload, checksummed with its pseudo header.
        let (s, d) = (
            u32::from_ne_bytes([10, 244, 0, 2]),
            u32::from_ne_bytes([10, 96, 0, 10]),
        );
        let mut seg = [0u8, 53, 0, 80, 0, 12, 0, 0, b'p', b'i', b'n', b'g'];
        let c = checksum(&seg, pseudo_header_sum(s, d, 17, 12));
        seg[6..8].copy_from_slice(&c.to_ne_bytes());
        // Rewrite destination port 80 -> 8080 and address -> 10.244.1.23.
        let d2 = u32::from_ne_bytes([10, 244, 1, 23]);
        let from_port = u16::from_ne_bytes([0, 80]);
        let to_port = u16::from_ne_bytes(8080u16.to_be_bytes());
        let mut c2 = udp_replace4(c, d, d2);
        c2 = udp_replace2(c2, from_port, to_port);
        seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
        seg[6..8].copy_from_slice(&c2.to_ne_bytes());
        assert_eq!(checksum(&seg, pseudo_header_sum(s, d2, 17, 12)), 0);
    }

    #[test]
    fn ipv6_address_update_matches_recomputation() {
        use crate::ipv6::words;
        let s = words([0xfd, 0, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let d = words([0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        let d2 = words([0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0xab, 0, 0, 0x23]);
        let mut seg = [0u8, 53, 0, 80, 0, 12, 0, 0, b'p', b'i', b'n', b'g'];
        let c = checksum(&seg, pseudo_header_sum6(&s, &d, 17, 12));
        seg[6..8].copy_from_slice(&c.to_ne_bytes());
        let c2 = udp6_nonzero(replace16(c, &d, &d2));
        seg[6..8].copy_from_slice(&c2.to_ne_bytes());
        assert_eq!(checksum(&seg, pseudo_header_sum6(&s, &d2, 17, 12)), 0);
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
    }

    #[test]
    fn odd_length_is_padded() {
        assert_eq!(checksum(&[0xff], 0), !u16::from_ne_bytes([0xff, 0]));
    }
}
