//! What differs between IPv4 and IPv6 for the NAT core: the address type
//! and the maps. `nat` is written once over [`Family`]; [`V4`] and [`V6`]
//! bind it to the lb4_ and lb6_ maps.
//!
//! The core works on generic views ([`Tuple`], [`Ct`], [`SvcKey`], ...)
//! laid out byte for byte like each family's map types in `lb_common`
//! (checked at compile time below), so a view is handed to a map as a
//! pointer cast, never copied: every copy of a 40-byte IPv6 key would cost
//! stack, of which a BPF call chain has 512 bytes in all.

use core::mem::{offset_of, size_of, MaybeUninit};

use lb_common::{
    Affinity4Key, Affinity4Value, Affinity6Key, Backend4, Backend6, BackendMatchKey, Ct4Key,
    Ct4Value, Ct6Key, Ct6Value, Ipv6Bytes, RevNat4, RevNat6, RevNatId, Service4Key, Service4Value,
    Service6Key, SourceRange4, SourceRange6, SOURCE_RANGE_PREFIX_BITS,
};

use crate::{maps, nat::NewFlow};

/// An address of a family, as packets and maps hold it.
pub trait Addr: Copy + PartialEq {
    /// The padding that ends a conntrack value of this family.
    type CtPad: Copy + Default;
    /// The unspecified address (0.0.0.0 or ::): "none" in a value.
    const UNSPECIFIED: Self;
    /// The address mixed into a flow hash, `h` the hash so far.
    fn mix_into(&self, h: u32) -> u32;
}

impl Addr for u32 {
    type CtPad = [u8; 0];
    const UNSPECIFIED: Self = 0;

    #[inline(always)]
    fn mix_into(&self, h: u32) -> u32 {
        crate::nat::mix(h, *self)
    }
}

impl Addr for Ipv6Bytes {
    type CtPad = u32;
    const UNSPECIFIED: Self = [0; 4];

    #[inline(always)]
    fn mix_into(&self, h: u32) -> u32 {
        let h = crate::nat::mix(h, self[0]);
        let h = crate::nat::mix(h, self[1]);
        let h = crate::nat::mix(h, self[2]);
        crate::nat::mix(h, self[3])
    }
}

/// A conntrack key (`Ct4Key`, `Ct6Key`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// A conntrack value (`Ct4Value`, `Ct6Value`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ct<A: Addr> {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    rev_nat_id_low: u16,
    pub flags: u16,
    pub nat_addr: A,
    pub nat_port: u16,
    rev_nat_id_high: u16,
    _pad: A::CtPad,
}

impl<A: Addr> Ct<A> {
    #[inline(always)]
    pub fn new(
        last_seen_ns: u64,
        backend_id: u32,
        rev_nat_id: RevNatId,
        flags: u16,
        nat: (A, u16),
    ) -> Self {
        Self {
            last_seen_ns,
            backend_id,
            rev_nat_id_low: rev_nat_id as u16,
            flags,
            nat_addr: nat.0,
            nat_port: nat.1,
            rev_nat_id_high: (rev_nat_id >> 16) as u16,
            _pad: Default::default(),
        }
    }

    /// The id, whose halves sit apart (see `lb_common::Ct4Value`).
    #[inline(always)]
    pub fn rev_nat_id(&self) -> RevNatId {
        RevNatId::from(self.rev_nat_id_low) | RevNatId::from(self.rev_nat_id_high) << 16
    }
}

/// A backend (`Backend4`, `Backend6`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Backend<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub zone: u8,
    pub _pad: [u8; 3],
}

/// A reverse NAT entry (`RevNat4`, `RevNat6`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RevNat<A> {
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
}

/// A services map key (`Service4Key`, `Service6Key`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SvcKey<A> {
    pub addr: A,
    pub port: u16,
    pub backend_slot: u16,
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Who session affinity remembers (`Affinity4Key`, `Affinity6Key`): a
/// client address (`AFFINITY_CLIENT_ADDR`), or on the socket path a network
/// namespace (`AFFINITY_CLIENT_NETNS`, its cookie folded into the address).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Client<A> {
    pub id: A,
    pub rev_nat_id: RevNatId,
    pub proto: u8,
    pub kind: u8,
    pub _pad: [u8; 2],
}

/// A view `$view` has the layout of `$map`: same size, fields at the same
/// offsets.
macro_rules! same_layout {
    ($view:ty, $map:ty, $($field:ident = $map_field:ident),+) => {
        const _: () = assert!(size_of::<$view>() == size_of::<$map>());
        $(const _: () = assert!(offset_of!($view, $field) == offset_of!($map, $map_field));)+
    };
}

macro_rules! family_layouts {
    ($a:ty, $ct_key:ty, $ct_value:ty, $backend:ty, $rev:ty, $svc:ty, $aff:ty) => {
        same_layout!(
            Tuple<$a>,
            $ct_key,
            saddr = saddr,
            daddr = daddr,
            sport = sport,
            dport = dport,
            proto = proto,
            direction = direction
        );
        same_layout!(
            Ct<$a>,
            $ct_value,
            last_seen_ns = last_seen_ns,
            backend_id = backend_id,
            rev_nat_id_low = rev_nat_id_low,
            flags = flags,
            nat_addr = nat_addr,
            nat_port = nat_port,
            rev_nat_id_high = rev_nat_id_high
        );
        same_layout!(
            Backend<$a>,
            $backend,
            addr = addr,
            port = port,
            proto = proto,
            state = state,
            zone = zone
        );
        same_layout!(RevNat<$a>, $rev, addr = addr, port = port);
        same_layout!(
            SvcKey<$a>,
            $svc,
            addr = addr,
            port = port,
            backend_slot = backend_slot,
            proto = proto,
            scope = scope
        );
        same_layout!(
            Client<$a>,
            $aff,
            id = client,
            rev_nat_id = rev_nat_id,
            proto = proto,
            kind = client_kind
        );
    };
}

family_layouts!(
    u32,
    Ct4Key,
    Ct4Value,
    Backend4,
    RevNat4,
    Service4Key,
    Affinity4Key
);
family_layouts!(
    Ipv6Bytes,
    Ct6Key,
    Ct6Value,
    Backend6,
    RevNat6,
    Service6Key,
    Affinity6Key
);

/// `v` as the map type `M` it has the layout of (see `family_layouts!`).
#[inline(always)]
fn cast<V, M>(v: &V) -> &M {
    const { assert!(size_of::<V>() == size_of::<M>()) };
    // SAFETY: same size and field offsets, checked at compile time; all
    // fields are plain integers, and the padding is explicit.
    unsafe { &*(v as *const V).cast::<M>() }
}

/// An address family's maps, as the NAT core uses them.
pub trait Family {
    type Addr: Addr;
    /// Where this family's counters start in the statistics array.
    const STATS: u32;

    fn service(key: &SvcKey<Self::Addr>) -> Option<Service4Value>;
    /// The backend with this id, if the id is in use.
    fn backend(id: u32) -> Option<Backend<Self::Addr>>;
    /// The `BACKEND_MATCH_*` state of a backend in a frontend.
    fn backend_match(backend_id: u32, rev_nat_id: RevNatId) -> Option<u8>;
    fn rev_nat(id: RevNatId) -> Option<RevNat<Self::Addr>>;
    fn source_allowed(rev_nat_id: RevNatId, saddr: &Self::Addr) -> bool;
    fn affinity(client: &Client<Self::Addr>) -> Option<Affinity4Value>;
    fn remember_affinity(client: &Client<Self::Addr>, v: &Affinity4Value);
    /// The masquerade port cursor of a backend.
    fn snat_cursor(backend_id: u32) -> Option<*mut u64>;
    /// The node's masquerade address (`UNSPECIFIED`: none set).
    fn masquerade_addr() -> Self::Addr;

    /// The entry of `t`, for update in place.
    fn ct_ptr(t: &Tuple<Self::Addr>) -> Option<*mut Ct<Self::Addr>>;
    /// Records an entry (a present one is replaced); `known_absent`: the
    /// caller just looked it up and found nothing.
    fn ct_insert(t: &Tuple<Self::Addr>, ct: &Ct<Self::Addr>, known_absent: bool);
    /// Records an entry only if its key is free; true when it did.
    fn ct_insert_new(t: &Tuple<Self::Addr>, ct: &Ct<Self::Addr>) -> bool;
    /// Removes the entry of `t`; true when there was one.
    fn ct_remove(t: &Tuple<Self::Addr>) -> bool;
    /// This CPU's room for the state of a packet to a Service.
    fn scratch() -> Option<*mut MaybeUninit<NewFlow<Self::Addr>>>;
}

/// IPv4: the lb4_ maps.
pub struct V4;
/// IPv6: the lb6_ maps.
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const STATS: u32 = 0;

    #[inline(always)]
    fn service(key: &SvcKey<u32>) -> Option<Service4Value> {
        // SAFETY: copied out at once; the agent replaces whole entries.
        unsafe { maps::SERVICES.get(cast::<_, Service4Key>(key)) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend<u32>> {
        let b = maps::BACKENDS.get(id)?;
        // A free id holds zeros.
        (b.addr != 0).then(|| *cast::<Backend4, Backend<u32>>(b))
    }

    #[inline(always)]
    fn backend_match(backend_id: u32, rev_nat_id: RevNatId) -> Option<u8> {
        maps::backend_match(backend_id, rev_nat_id)
    }

    #[inline(always)]
    fn rev_nat(id: RevNatId) -> Option<RevNat<u32>> {
        // SAFETY: copied out at once.
        unsafe { maps::REV_NAT.get(id) }.map(|r| *cast::<RevNat4, RevNat<u32>>(r))
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: RevNatId, saddr: &u32) -> bool {
        let data = SourceRange4 {
            rev_nat_id,
            addr: *saddr,
        };
        let key = aya_ebpf::btf_maps::lpm_trie::Key::new(SOURCE_RANGE_PREFIX_BITS + 32, data);
        maps::SOURCE_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn affinity(client: &Client<u32>) -> Option<Affinity4Value> {
        // SAFETY: copied out at once.
        unsafe { maps::AFFINITY.get(cast::<_, Affinity4Key>(client)) }.copied()
    }

    #[inline(always)]
    fn remember_affinity(client: &Client<u32>, v: &Affinity4Value) {
        let _ = maps::AFFINITY.insert(cast::<_, Affinity4Key>(client), v, 0);
    }

    #[inline(always)]
    fn snat_cursor(backend_id: u32) -> Option<*mut u64> {
        maps::SNAT_CURSOR.get_ptr_mut(backend_id)
    }

    #[inline(always)]
    fn masquerade_addr() -> u32 {
        maps::datapath_config().masquerade_addr
    }

    #[inline(always)]
    fn ct_ptr(t: &Tuple<u32>) -> Option<*mut Ct<u32>> {
        let key = cast::<_, Ct4Key>(t);
        maps::conntrack_ptr(&maps::CONNTRACK, &maps::CONNTRACK_PREV, key).map(<*mut _>::cast)
    }

    #[inline(always)]
    fn ct_insert(t: &Tuple<u32>, ct: &Ct<u32>, known_absent: bool) {
        let (key, value) = (cast::<_, Ct4Key>(t), cast::<_, Ct4Value>(ct));
        maps::conntrack_insert::<Self, _, _, _, _>(
            &maps::CONNTRACK,
            &maps::CONNTRACK_PREV,
            key,
            value,
            known_absent,
        );
    }

    #[inline(always)]
    fn ct_insert_new(t: &Tuple<u32>, ct: &Ct<u32>) -> bool {
        let (key, value) = (cast::<_, Ct4Key>(t), cast::<_, Ct4Value>(ct));
        maps::conntrack_insert_new::<Self, _, _, _, _>(
            &maps::CONNTRACK,
            &maps::CONNTRACK_PREV,
            key,
            value,
        )
    }

    #[inline(always)]
    fn ct_remove(t: &Tuple<u32>) -> bool {
        let key = cast::<_, Ct4Key>(t);
        maps::conntrack_remove(&maps::CONNTRACK, &maps::CONNTRACK_PREV, key)
    }

    #[inline(always)]
    fn scratch() -> Option<*mut MaybeUninit<NewFlow<u32>>> {
        maps::FLOW4_SCRATCH.get_ptr_mut(0)
    }
}

impl Family for V6 {
    type Addr = Ipv6Bytes;
    const STATS: u32 = lb_common::stats::IPV6_OFFSET;

    #[inline(always)]
    fn service(key: &SvcKey<Ipv6Bytes>) -> Option<Service4Value> {
        // SAFETY: copied out at once; the agent replaces whole entries.
        unsafe { maps::SERVICES6.get(cast::<_, Service6Key>(key)) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend<Ipv6Bytes>> {
        let b = maps::BACKENDS6.get(id)?;
        // A free id holds zeros.
        (b.addr != Ipv6Bytes::UNSPECIFIED).then(|| *cast::<Backend6, Backend<Ipv6Bytes>>(b))
    }

    #[inline(always)]
    fn backend_match(backend_id: u32, rev_nat_id: RevNatId) -> Option<u8> {
        let key = BackendMatchKey {
            backend_id,
            rev_nat_id,
        };
        // SAFETY: copied out at once.
        unsafe { maps::BACKEND_MATCH6.get(key) }.copied()
    }

    #[inline(always)]
    fn rev_nat(id: RevNatId) -> Option<RevNat<Ipv6Bytes>> {
        // SAFETY: copied out at once.
        unsafe { maps::REV_NAT6.get(id) }.map(|r| *cast::<RevNat6, RevNat<Ipv6Bytes>>(r))
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: RevNatId, saddr: &Ipv6Bytes) -> bool {
        let data = SourceRange6 {
            rev_nat_id,
            addr: *saddr,
        };
        let key = aya_ebpf::btf_maps::lpm_trie::Key::new(SOURCE_RANGE_PREFIX_BITS + 128, data);
        maps::SOURCE_RANGES6.get(&key).is_some()
    }

    #[inline(always)]
    fn affinity(client: &Client<Ipv6Bytes>) -> Option<Affinity4Value> {
        // SAFETY: copied out at once.
        unsafe { maps::AFFINITY6.get(cast::<_, Affinity6Key>(client)) }.copied()
    }

    #[inline(always)]
    fn remember_affinity(client: &Client<Ipv6Bytes>, v: &Affinity4Value) {
        let _ = maps::AFFINITY6.insert(cast::<_, Affinity6Key>(client), v, 0);
    }

    #[inline(always)]
    fn snat_cursor(backend_id: u32) -> Option<*mut u64> {
        maps::SNAT_CURSOR6.get_ptr_mut(backend_id)
    }

    #[inline(always)]
    fn masquerade_addr() -> Ipv6Bytes {
        maps::datapath_config().masquerade_addr6
    }

    #[inline(always)]
    fn ct_ptr(t: &Tuple<Ipv6Bytes>) -> Option<*mut Ct<Ipv6Bytes>> {
        let key = cast::<_, Ct6Key>(t);
        maps::conntrack_ptr(&maps::CONNTRACK6, &maps::CONNTRACK6_PREV, key).map(<*mut _>::cast)
    }

    #[inline(always)]
    fn ct_insert(t: &Tuple<Ipv6Bytes>, ct: &Ct<Ipv6Bytes>, known_absent: bool) {
        let (key, value) = (cast::<_, Ct6Key>(t), cast::<_, Ct6Value>(ct));
        maps::conntrack_insert::<Self, _, _, _, _>(
            &maps::CONNTRACK6,
            &maps::CONNTRACK6_PREV,
            key,
            value,
            known_absent,
        );
    }

    #[inline(always)]
    fn ct_insert_new(t: &Tuple<Ipv6Bytes>, ct: &Ct<Ipv6Bytes>) -> bool {
        let (key, value) = (cast::<_, Ct6Key>(t), cast::<_, Ct6Value>(ct));
        maps::conntrack_insert_new::<Self, _, _, _, _>(
            &maps::CONNTRACK6,
            &maps::CONNTRACK6_PREV,
            key,
            value,
        )
    }

    #[inline(always)]
    fn ct_remove(t: &Tuple<Ipv6Bytes>) -> bool {
        let key = cast::<_, Ct6Key>(t);
        maps::conntrack_remove(&maps::CONNTRACK6, &maps::CONNTRACK6_PREV, key)
    }

    #[inline(always)]
    fn scratch() -> Option<*mut MaybeUninit<NewFlow<Ipv6Bytes>>> {
        let scratch = maps::FLOW6_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: a field of this CPU's value; no reference is made.
        Some(unsafe { &raw mut (*scratch).start })
    }
}
