//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), the pure half:
//! a lookup table of prime size per frontend, filled from its backends'
//! preference lists. Every node given the same backends, weights, size and
//! seed builds the same table, whatever order it learnt the backends in;
//! and removing one of N backends moves about 1/N of the entries, those
//! of the removed backend and few others. A flow's 5-tuple hash picks an
//! entry, so all nodes send a flow to the same backend without sharing
//! state. No maps here: the table names backends by their sorted position.

use std::{hash::Hasher, net::IpAddr};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::model::L4Addr;

/// Katran's and Cilium's sizes are 65,537 and 16,381; a table of M entries
/// over N backends gives each 1/N of them to within N/M.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// Entries are u16 backend positions: a table holds at most that many
/// entries and backends.
pub const MAX_TABLE_SIZE: u32 = 65_537;

/// The cluster-wide key of the preference hash: every agent must be given
/// the same one, or their tables differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashSeed(pub [u8; 16]);

/// A backend as every node names it (backend ids are node-local), and its
/// share of the table relative to the others' (0: no entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    pub addr: L4Addr,
    pub weight: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not a prime (the permutation needs one)")]
    NotPrime(u32),
    #[error("Maglev table size {0} is over {MAX_TABLE_SIZE}")]
    TooLarge(u32),
    #[error("Maglev table of {size} entries cannot hold {backends} backends")]
    TooManyBackends { size: u32, backends: usize },
}

/// A built table: `entries[i]` is a position in `backends` (sorted by
/// address, weight 0 left out). Empty when no backend has a weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backends: Vec<L4Addr>,
    pub entries: Vec<u16>,
}

/// Builds the table of `size` entries (a prime) for `backends`.
pub fn build(
    backends: &[MaglevBackend],
    size: u32,
    seed: &HashSeed,
) -> Result<MaglevTable, MaglevError> {
    check_size(size, backends.len())?;
    let mut chosen: Vec<MaglevBackend> =
        backends.iter().filter(|b| b.weight > 0).copied().collect();
    chosen.sort_by_key(|b| b.addr);
    chosen.dedup_by_key(|b| b.addr);
    let table = MaglevTable {
        backends: chosen.iter().map(|b| b.addr).collect(),
        entries: Vec::new(),
    };
    if chosen.is_empty() {
        return Ok(table);
    }
    let mut lists: Vec<Preferences> = chosen
        .iter()
        .map(|b| Preferences::of(&b.addr, size, seed))
        .collect();
    Ok(MaglevTable {
        entries: fill(&chosen, &mut lists, size),
        ..table
    })
}

fn check_size(size: u32, backends: usize) -> Result<(), MaglevError> {
    if size > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge(size));
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    if backends > size as usize || backends > usize::from(u16::MAX) {
        return Err(MaglevError::TooManyBackends { size, backends });
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..=n.isqrt()).all(|d| !n.is_multiple_of(d))
}

/// One backend's walk over the table: entry `offset`, then every `skip`
/// further (mod the prime size, so the walk visits every entry once).
struct Preferences {
    offset: u64,
    skip: u64,
    /// How far along the walk the backend is.
    next: u64,
}

impl Preferences {
    fn of(addr: &L4Addr, size: u32, seed: &HashSeed) -> Self {
        let mut hasher = SipHasher13::new_with_key(&seed.0);
        hasher.write(&canonical_bytes(addr));
        let hash = hasher.finish128();
        let size = u64::from(size);
        Self {
            offset: hash.h1 % size,
            skip: hash.h2 % (size - 1) + 1,
            next: 0,
        }
    }

    /// The backend's next preferred entry that is still free.
    fn claim(&mut self, table: &[u16], size: u64) -> usize {
        // Bounded: the walk visits every entry within `size` steps, and
        // the caller only asks while one is free.
        for _ in 0..size {
            let entry = ((self.offset + self.next * self.skip) % size) as usize;
            self.next += 1;
            if table[entry] == FREE {
                return entry;
            }
        }
        unreachable!("a free entry is always found within the table's size")
    }
}

const FREE: u16 = u16::MAX;

/// Turns in rounds: the heaviest backends claim an entry every round, the
/// others in proportion to their weight (whatever its scale), until the
/// table is full. Equal weights give Maglev's plain round robin.
fn fill(backends: &[MaglevBackend], lists: &mut [Preferences], size: u32) -> Vec<u16> {
    let mut table = vec![FREE; size as usize];
    let heaviest = backends
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut filled = 0u32;
    // Bounded: the heaviest backend claims an entry every round.
    for round in 0..u64::from(size) {
        for (position, (backend, list)) in backends.iter().zip(lists.iter_mut()).enumerate() {
            let weight = u64::from(backend.weight);
            let due = (round + 1) * weight / heaviest - round * weight / heaviest;
            if due == 0 {
                continue;
            }
            let entry = list.claim(&table, u64::from(size));
            table[entry] = position as u16;
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
    table
}

/// The bytes a backend is hashed by, the same on every node and version:
/// the address (4 or 16 bytes), the port (big-endian) and the protocol.
fn canonical_bytes(addr: &L4Addr) -> Vec<u8> {
    let mut out = match addr.addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    out.extend_from_slice(&addr.port.to_be_bytes());
    out.push(addr.proto.number());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    const SEED: HashSeed = HashSeed(*b"lb-maglev-seed-1");

    fn backend(i: u32) -> MaglevBackend {
        MaglevBackend {
            addr: L4Addr {
                addr: std::net::Ipv4Addr::from(0x0af4_0000 + i).into(),
                port: 8080,
                proto: Protocol::Tcp,
            },
            weight: 1,
        }
    }

    fn backends(n: u32) -> Vec<MaglevBackend> {
        (0..n).map(backend).collect()
    }

    /// The backend address of every entry.
    fn owners(t: &MaglevTable) -> Vec<L4Addr> {
        t.entries
            .iter()
            .map(|&i| t.backends[usize::from(i)])
            .collect()
    }

    #[test]
    fn the_same_backends_in_any_order_build_the_same_table() {
        let forward = backends(10);
        let mut backward = forward.clone();
        backward.reverse();
        let a = build(&forward, DEFAULT_TABLE_SIZE, &SEED).unwrap();
        let b = build(&backward, DEFAULT_TABLE_SIZE, &SEED).unwrap();
        assert_eq!(a, b);
        let other_seed = build(&forward, DEFAULT_TABLE_SIZE, &HashSeed([7; 16])).unwrap();
        assert_ne!(a.entries, other_seed.entries, "the seed changes the table");
    }

    #[test]
    fn equal_weights_get_equal_shares() {
        for n in [1, 3, 10, 100] {
            let t = build(&backends(n), DEFAULT_TABLE_SIZE, &SEED).unwrap();
            assert_eq!(t.entries.len(), DEFAULT_TABLE_SIZE as usize);
            let mut count = vec![0u32; n as usize];
            for &e in &t.entries {
                count[usize::from(e)] += 1;
            }
            let (lo, hi) = (DEFAULT_TABLE_SIZE / n, DEFAULT_TABLE_SIZE.div_ceil(n));
            assert!(
                count.iter().all(|c| (lo..=hi).contains(c)),
                "{n} backends: {count:?}"
            );
        }
    }

    #[test]
    fn weights_set_the_shares() {
        // The scale of the weights does not matter, only their ratio.
        for (light, heavy) in [(1, 2), (10_000, 20_000)] {
            let mut set = backends(3);
            set[0].weight = light;
            set[1].weight = heavy;
            set[2].weight = 0;
            let t = build(&set, DEFAULT_TABLE_SIZE, &SEED).unwrap();
            assert_eq!(t.backends.len(), 2, "weight 0 has no entries");
            let entries = t.entries.iter().filter(|&&e| e == 1).count() as f64;
            let share = entries / f64::from(DEFAULT_TABLE_SIZE);
            assert!(
                (share - 2.0 / 3.0).abs() < 0.001,
                "{light}:{heavy}: {share}"
            );
        }
    }

    /// The entries whose backend changed when `removed` of `n` backends
    /// left, as a fraction of a table of `size`.
    fn moved_after_removing(n: u32, removed: u32, size: u32) -> f64 {
        let all = backends(n);
        let before = owners(&build(&all, size, &SEED).unwrap());
        let rest: Vec<_> = all
            .iter()
            .copied()
            .filter(|b| *b != backend(removed))
            .collect();
        let after = owners(&build(&rest, size, &SEED).unwrap());
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        moved as f64 / f64::from(size)
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_entries() {
        for size in [DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE] {
            for n in [3, 10, 100] {
                let moved = moved_after_removing(n, n / 2, size);
                let ideal = 1.0 / f64::from(n);
                println!(
                    "maglev: M = {size}, removing 1 of {n} backends moved {:.2}% of the entries (its own: {:.2}%)",
                    moved * 100.0,
                    ideal * 100.0
                );
                // The removed backend's own entries must move; Maglev moves
                // some more (fewer the more entries each backend has), far
                // from a modulo hash's (N-1)/N.
                assert!(moved >= ideal * 0.99, "{size}, {n}: {moved}");
                assert!(moved <= ideal * 2.5, "{size}, {n}: {moved}");
            }
        }
    }

    #[test]
    fn sizes_that_cannot_work_are_refused() {
        assert_eq!(
            build(&backends(3), 16_380, &SEED),
            Err(MaglevError::NotPrime(16_380))
        );
        assert_eq!(
            build(&backends(3), 131_071, &SEED),
            Err(MaglevError::TooLarge(131_071))
        );
        assert_eq!(
            build(&backends(20), 17, &SEED),
            Err(MaglevError::TooManyBackends {
                size: 17,
                backends: 20
            })
        );
        assert!(build(&[], 17, &SEED).unwrap().entries.is_empty());
    }
}
