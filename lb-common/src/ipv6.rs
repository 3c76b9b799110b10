//! The IPv6 twins of the IPv4 map types: the same fields and meanings, with
//! 16-byte addresses (network byte order, as in packets). Values that hold
//! no address ([`crate::Service4Value`], [`crate::Affinity4Value`],
//! [`crate::BackendMatchKey`]) are shared by both families.

use crate::RevNatId;
use bytemuck::{Pod, Zeroable};

/// An IPv6 address: its 16 bytes in network order, as four words read
/// from memory with native loads (the way a packet holds them). Words, not
/// bytes: the BPF backend copies and compares 4-byte-aligned data with
/// word loads, but byte arrays through a byte-by-byte memcpy call that
/// costs the verifier dearly.
pub type Ipv6Bytes = [u32; 4];

/// The words of an address's octets (`Ipv6Addr::octets()`).
pub const fn words(octets: [u8; 16]) -> Ipv6Bytes {
    let mut w = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        w[i] = u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ]);
        i += 1;
    }
    w
}

/// The octets of an address held as words (for `Ipv6Addr::from`).
pub const fn octets(words: Ipv6Bytes) -> [u8; 16] {
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        o[4 * i] = b[0];
        o[4 * i + 1] = b[1];
        o[4 * i + 2] = b[2];
        o[4 * i + 3] = b[3];
        i += 1;
    }
    o
}

/// Key of `lb6_services` (see [`crate::Service4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Service6Key {
    pub addr: Ipv6Bytes,
    /// Network byte order.
    pub port: u16,
    pub backend_slot: u16,
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// A backend of `lb6_backends` (see [`crate::Backend4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend6 {
    pub addr: Ipv6Bytes,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// Index of the backend's zone (0 = unknown).
    pub zone: u8,
    pub _pad: [u8; 3],
}

/// Value of `lb6_reverse_nat` (see [`crate::RevNat4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNat6 {
    pub addr: Ipv6Bytes,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `lb6_conntrack` (see [`crate::Ct4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ct6Key {
    pub saddr: Ipv6Bytes,
    pub daddr: Ipv6Bytes,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of `lb6_conntrack` (see [`crate::Ct4Value`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ct6Value {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    /// Low half of the reverse NAT id (see [`crate::Ct4Value::rev_nat_id`]).
    pub rev_nat_id_low: u16,
    /// `CT_FLAG_*`.
    pub flags: u16,
    pub nat_addr: Ipv6Bytes,
    pub nat_port: u16,
    /// High half of the reverse NAT id: padding, zero, in releases with
    /// 16-bit ids.
    pub rev_nat_id_high: u16,
    pub _pad: u32,
}

/// Key of `lb6_affinity` (see [`crate::Affinity4Key`]); a socket-path
/// client (`AFFINITY_CLIENT_NETNS`) keeps its folded cookie in the first
/// four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Affinity6Key {
    pub client: Ipv6Bytes,
    pub rev_nat_id: RevNatId,
    pub proto: u8,
    pub client_kind: u8,
    pub _pad: [u8; 2],
}

/// Data of a `lb6_source_ranges` LPM trie key: the prefix length covers
/// `rev_nat_id` (`SOURCE_RANGE_PREFIX_BITS`) plus the range's mask bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRange6 {
    pub rev_nat_id: RevNatId,
    pub addr: Ipv6Bytes,
}

/// Key of `lb6_sock_rev` (see [`crate::SockRev4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRev6Key {
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: Ipv6Bytes,
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of `lb6_sock_rev` (see [`crate::SockRev4Value`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRev6Value {
    /// Service address and port, network byte order.
    pub addr: Ipv6Bytes,
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: RevNatId,
}

/// Key of `lb6_sock_fwd` (see [`crate::SockFwd4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockFwd6Key {
    pub cookie: u64,
    /// Service address and port, network byte order.
    pub addr: Ipv6Bytes,
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

#[cfg(feature = "user")]
mod user {
    use super::{
        Affinity6Key, Backend6, Ct6Key, Ct6Value, RevNat6, Service6Key, SockFwd6Key, SockRev6Key,
        SockRev6Value, SourceRange6,
    };
    // SAFETY: repr(C), Copy, explicit padding, no invalid bit patterns
    // (checked by bytemuck's derive).
    unsafe impl aya::Pod for Service6Key {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for RevNat6 {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Value {}
    unsafe impl aya::Pod for Affinity6Key {}
    unsafe impl aya::Pod for SourceRange6 {}
    unsafe impl aya::Pod for SockRev6Key {}
    unsafe impl aya::Pod for SockRev6Value {}
    unsafe impl aya::Pod for SockFwd6Key {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn words_and_octets_round_trip() {
        let o = [0xfd, 0, 0, 0x96, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x10];
        assert_eq!(octets(words(o)), o);
        // The first word holds the first four bytes as memory does.
        assert_eq!(words(o)[0].to_ne_bytes(), [0xfd, 0, 0, 0x96]);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Service6Key>(), 24);
        assert_eq!(size_of::<Backend6>(), 24);
        assert_eq!(size_of::<RevNat6>(), 20);
        assert_eq!(size_of::<Ct6Key>(), 40);
        assert_eq!(size_of::<Ct6Value>(), 40);
        assert_eq!(size_of::<Affinity6Key>(), 24);
        assert_eq!(size_of::<SourceRange6>(), 20);
        assert_eq!(size_of::<SockRev6Key>(), 32);
        assert_eq!(size_of::<SockRev6Value>(), 24);
        assert_eq!(size_of::<SockFwd6Key>(), 32);
    }
}
