//! Copying a pinned map's entries into a map of this version's layout
//! (see the loader's migration): as they are when key and value kept their
//! sizes, or converted from the layouts of releases with 16-bit reverse NAT
//! ids, whose entries grew when the ids became 32-bit.

use std::{os::fd::AsFd, path::Path};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, MapData};
use aya_obj::generated::BPF_NOEXIST;
use bytemuck::{Pod, Zeroable};
use lb_common::{
    map_names as n, Affinity4Key, Affinity4Value, Affinity6Key, Backend4, Backend6,
    BackendMatchKey, Ct4Key, Ct4Value, Ct6Key, Ct6Value, Ipv6Bytes, RevNat4, RevNat6, RevNatId,
    SockFwd4Key, SockFwd6Key, SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value,
};

/// The layouts of releases with 16-bit reverse NAT ids, where they differ
/// in size from this version's. (Conntrack values, backend-match keys and
/// source ranges kept their sizes and bytes: see `lb_common::RevNatId`.)
mod ids16 {
    use super::{Ipv6Bytes, Pod, Zeroable};

    #[repr(C)]
    #[derive(Clone, Copy, Pod, Zeroable)]
    pub struct Affinity4Key {
        pub client: u32,
        pub rev_nat_id: u16,
        pub proto: u8,
        pub client_kind: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Pod, Zeroable)]
    pub struct Affinity6Key {
        pub client: Ipv6Bytes,
        pub rev_nat_id: u16,
        pub proto: u8,
        pub client_kind: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Pod, Zeroable)]
    pub struct SockRev4Value {
        pub addr: u32,
        pub port: u16,
        pub rev_nat_id: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Pod, Zeroable)]
    pub struct SockRev6Value {
        pub addr: Ipv6Bytes,
        pub port: u16,
        pub rev_nat_id: u16,
    }

    // SAFETY: repr(C), Copy, no padding (checked by bytemuck's derive).
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity6Key {}
    unsafe impl aya::Pod for SockRev4Value {}
    unsafe impl aya::Pod for SockRev6Value {}
}

/// (map, key size, value size) of the layouts with 16-bit reverse NAT ids
/// that `copy_map` converts.
pub(crate) const CONVERTED_FROM_16_BIT_IDS: [(&str, u32, u32); 6] = {
    use core::mem::size_of;
    const fn sizes<K, V>(name: &'static str) -> (&'static str, u32, u32) {
        (name, size_of::<K>() as u32, size_of::<V>() as u32)
    }
    [
        sizes::<u16, RevNat4>(n::REV_NAT),
        sizes::<u16, RevNat6>(n::REV_NAT6),
        sizes::<ids16::Affinity4Key, Affinity4Value>(n::AFFINITY),
        sizes::<ids16::Affinity6Key, Affinity4Value>(n::AFFINITY6),
        sizes::<SockRev4Key, ids16::SockRev4Value>(n::SOCK_REV),
        sizes::<SockRev6Key, ids16::SockRev6Value>(n::SOCK_REV6),
    ]
};

/// Whether the entries of `name` with this key and value size are
/// converted from 16-bit reverse NAT ids.
pub(crate) fn converted_from_16_bit_ids(name: &str, key_size: u32, value_size: u32) -> bool {
    CONVERTED_FROM_16_BIT_IDS.contains(&(name, key_size, value_size))
}

fn open_pin(path: &Path) -> Result<MapData> {
    MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))
}

/// Copies the entries of a hash (or LRU hash) into another, each through
/// `convert`; with `BPF_NOEXIST`, so what the new map already holds wins.
fn copy_hash_with<K0: aya::Pod, V0: aya::Pod, K: aya::Pod, V: aya::Pod>(
    from: &Path,
    to: &Path,
    convert: fn(K0, V0) -> (K, V),
) -> Result<usize> {
    let from = open_pin(from)?;
    let entries: Vec<(K0, V0)> = crate::sync::map_batch::lookup_all(from.fd().as_fd())?;
    let mut to: HashMap<_, K, V> =
        HashMap::try_from(aya::maps::Map::from_map_data(open_pin(to)?)?)?;
    Ok(entries
        .into_iter()
        .map(|(k, v)| convert(k, v))
        .filter(|(k, v)| to.insert(k, v, u64::from(BPF_NOEXIST)).is_ok())
        .count())
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(from: &Path, to: &Path) -> Result<usize> {
    copy_hash_with::<K, V, K, V>(from, to, |k, v| (k, v))
}

/// Copies backends, by id, from a hash (older versions) or an array; `used`
/// tells a backend from a free slot (zeros).
fn copy_backends<B: aya::Pod>(from: &Path, to: &Path, used: fn(&B) -> bool) -> Result<usize> {
    let mut to: Array<_, B> = Array::try_from(aya::maps::Map::from_map_data(open_pin(to)?)?)?;
    // The same batch read serves a hash (older versions) and an array.
    let from = open_pin(from)?;
    let entries: Vec<(u32, B)> = crate::sync::map_batch::lookup_all(from.fd().as_fd())?;
    let entries = entries.into_iter().filter(|(_, b)| used(b));
    let mut copied = 0;
    for (id, b) in entries {
        if id < to.len() && to.set(id, b, 0).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}

fn affinity4_key(k: ids16::Affinity4Key, v: Affinity4Value) -> (Affinity4Key, Affinity4Value) {
    let key = Affinity4Key {
        client: k.client,
        rev_nat_id: RevNatId::from(k.rev_nat_id),
        proto: k.proto,
        client_kind: k.client_kind,
        _pad: [0; 2],
    };
    (key, v)
}

fn affinity6_key(k: ids16::Affinity6Key, v: Affinity4Value) -> (Affinity6Key, Affinity4Value) {
    let key = Affinity6Key {
        client: k.client,
        rev_nat_id: RevNatId::from(k.rev_nat_id),
        proto: k.proto,
        client_kind: k.client_kind,
        _pad: [0; 2],
    };
    (key, v)
}

fn sock_rev4_value(k: SockRev4Key, v: ids16::SockRev4Value) -> (SockRev4Key, SockRev4Value) {
    let value = SockRev4Value {
        addr: v.addr,
        port: v.port,
        _pad: 0,
        rev_nat_id: RevNatId::from(v.rev_nat_id),
    };
    (k, value)
}

fn sock_rev6_value(k: SockRev6Key, v: ids16::SockRev6Value) -> (SockRev6Key, SockRev6Value) {
    let value = SockRev6Value {
        addr: v.addr,
        port: v.port,
        _pad: 0,
        rev_nat_id: RevNatId::from(v.rev_nat_id),
    };
    (k, value)
}

/// Copies a map with 16-bit reverse NAT ids into this version's layout.
fn convert_16_bit_ids(name: &str, old: &Path, new: &Path) -> Result<usize> {
    match name {
        n::REV_NAT => copy_hash_with(old, new, |k: u16, v: RevNat4| (RevNatId::from(k), v)),
        n::REV_NAT6 => copy_hash_with(old, new, |k: u16, v: RevNat6| (RevNatId::from(k), v)),
        n::AFFINITY => copy_hash_with(old, new, affinity4_key),
        n::AFFINITY6 => copy_hash_with(old, new, affinity6_key),
        n::SOCK_REV => copy_hash_with(old, new, sock_rev4_value),
        n::SOCK_REV6 => copy_hash_with(old, new, sock_rev6_value),
        other => bail!("no conversion from 16-bit reverse NAT ids for {other}"),
    }
}

/// Copies the entries of the map `name` pinned at `old` into the one at
/// `new`, converting them when `old` has the layout of 16-bit reverse NAT
/// ids. Returns how many were copied.
pub(crate) fn copy_map(name: &str, old: &Path, new: &Path) -> Result<usize> {
    let info =
        aya::maps::MapInfo::from_pin(old).with_context(|| format!("reading {}", old.display()))?;
    if converted_from_16_bit_ids(name, info.key_size(), info.value_size()) {
        return convert_16_bit_ids(name, old, new);
    }
    match name {
        n::CONNTRACK => copy_hash::<Ct4Key, Ct4Value>(old, new),
        n::AFFINITY => copy_hash::<Affinity4Key, Affinity4Value>(old, new),
        n::SOCK_REV => copy_hash::<SockRev4Key, SockRev4Value>(old, new),
        n::SOCK_FWD => copy_hash::<SockFwd4Key, u32>(old, new),
        n::BACKENDS => copy_backends::<Backend4>(old, new, |b| b.addr != 0),
        // Whole, also when `--frontends-max` shrank: a frontend keeps its id,
        // so replies of its open connections keep finding their entry (only
        // the per-CPU counters, an array of the new size, miss ids above it).
        n::REV_NAT => copy_hash::<RevNatId, RevNat4>(old, new),
        n::BACKEND_MATCH | n::BACKEND_MATCH6 => copy_hash::<BackendMatchKey, u8>(old, new),
        n::CONNTRACK6 => copy_hash::<Ct6Key, Ct6Value>(old, new),
        n::AFFINITY6 => copy_hash::<Affinity6Key, Affinity4Value>(old, new),
        n::SOCK_REV6 => copy_hash::<SockRev6Key, SockRev6Value>(old, new),
        n::SOCK_FWD6 => copy_hash::<SockFwd6Key, u32>(old, new),
        n::BACKENDS6 => copy_backends::<Backend6>(old, new, |b| b.addr != [0; 4]),
        n::REV_NAT6 => copy_hash::<RevNatId, RevNat6>(old, new),
        other => bail!("no migration for {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_16_bit_layouts_are_the_previous_sizes_and_differ_from_todays() {
        let today = |name: &str| {
            let s = lb_common::map_spec::ALL
                .iter()
                .find(|s| s.name == name)
                .unwrap();
            (s.key_size, s.value_size)
        };
        let previous = [
            (n::REV_NAT, 2, 8),
            (n::REV_NAT6, 2, 20),
            (n::AFFINITY, 8, 16),
            (n::AFFINITY6, 20, 16),
            (n::SOCK_REV, 16, 8),
            (n::SOCK_REV6, 32, 20),
        ];
        assert_eq!(CONVERTED_FROM_16_BIT_IDS, previous);
        for (name, key, value) in previous {
            assert_ne!(today(name), (key, value), "{name}");
        }
    }

    #[test]
    fn a_converted_entry_keeps_every_field() {
        let old = ids16::Affinity6Key {
            client: [1, 2, 3, 4],
            rev_nat_id: 0xfffe,
            proto: 17,
            client_kind: 1,
        };
        let v = Affinity4Value {
            last_used_ns: 9,
            backend_id: 7,
            _pad: 0,
        };
        let (k, kept) = affinity6_key(old, v);
        assert_eq!(
            (k.client, k.rev_nat_id, k.proto, k.client_kind),
            ([1, 2, 3, 4], 0xfffe, 17, 1)
        );
        assert_eq!(kept, v);
        let old = ids16::SockRev4Value {
            addr: 0x0a00_0001,
            port: 80,
            rev_nat_id: 3,
        };
        let (_, v) = sock_rev4_value(SockRev4Key::default(), old);
        assert_eq!((v.addr, v.port, v.rev_nat_id), (0x0a00_0001, 80, 3));
    }
}
