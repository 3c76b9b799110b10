//! The data path's header parser, compiled for userspace from the very
//! source the BPF object is built from (no copy, nothing changed in the BPF
//! build), fuzzed with proptest. Each packet is placed so that it ends at a
//! page whose successor is inaccessible: a read past its end faults at once.
//! The verdict must agree with a reference reading of the bytes.

#[allow(dead_code)]
#[path = "../../lb-ebpf/src/headers.rs"]
mod headers;

use headers::{parse, Parsed};
use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

const PAGE: usize = 4096;

/// Two pages, the second PROT_NONE: `place` copies a packet to end exactly
/// at the boundary.
struct GuardedPage {
    base: *mut u8,
}

impl GuardedPage {
    fn new() -> Self {
        // SAFETY: an anonymous private mapping; checked for failure.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        // SAFETY: the second page lies inside the mapping just made.
        let r =
            unsafe { libc::mprotect(base.cast::<u8>().add(PAGE).cast(), PAGE, libc::PROT_NONE) };
        assert_eq!(r, 0, "mprotect");
        Self { base: base.cast() }
    }

    /// Copies `p` to end at the guard page; returns (start, end) as the
    /// program sees data and data_end.
    fn place(&mut self, p: &[u8]) -> (usize, usize) {
        assert!(p.len() <= PAGE);
        // SAFETY: the destination is within the writable first page.
        unsafe {
            let start = self.base.add(PAGE - p.len());
            std::ptr::copy_nonoverlapping(p.as_ptr(), start, p.len());
            (start as usize, self.base as usize + PAGE)
        }
    }
}

impl Drop for GuardedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new().
        unsafe { libc::munmap(self.base.cast(), 2 * PAGE) };
    }
}

/// What the parser should say, read straight off the bytes.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Other,
    Fragment,
    Malformed,
    /// saddr, daddr, sport, dport (as in the packet), proto.
    Flow([u8; 4], [u8; 4], [u8; 2], [u8; 2], u8),
}

fn expected(p: &[u8]) -> Expected {
    if p.len() < 14 || p[12..14] != [0x08, 0x00] {
        return Expected::Other;
    }
    if p.len() < 15 {
        return Expected::Malformed;
    }
    if p[14] != 0x45 {
        return Expected::Other;
    }
    if p.len() < 34 {
        return Expected::Malformed;
    }
    let proto = p[23];
    let l4_len = match proto {
        6 => 20,
        17 => 8,
        _ => return Expected::Other,
    };
    if u16::from_be_bytes([p[20], p[21]]) & 0x3fff != 0 {
        return Expected::Fragment;
    }
    let total = u16::from_be_bytes([p[16], p[17]]) as usize;
    if total < 20 + l4_len || p.len() < 34 + l4_len {
        return Expected::Malformed;
    }
    let a = |i: usize| [p[i], p[i + 1], p[i + 2], p[i + 3]];
    Expected::Flow(a(26), a(30), [p[34], p[35]], [p[36], p[37]], proto)
}

fn verdict(p: &Parsed) -> Expected {
    match p {
        Parsed::Other => Expected::Other,
        Parsed::Fragment => Expected::Fragment,
        Parsed::Malformed => Expected::Malformed,
        Parsed::Flow(f) => Expected::Flow(
            f.saddr.to_ne_bytes(),
            f.daddr.to_ne_bytes(),
            f.sport.to_ne_bytes(),
            f.dport.to_ne_bytes(),
            f.proto,
        ),
    }
}

/// A valid Ethernet/IPv4/TCP-or-UDP packet with random fields.
fn valid_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        any::<[u8; 8]>(),
        any::<[u8; 12]>(),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(udp, addrs_ports, rest, payload)| {
            let l4_len = if udp { 8 } else { 20 };
            let mut p = vec![0u8; 12];
            p.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            p.extend_from_slice(&((20 + l4_len + payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, if udp { 17 } else { 6 }, 0, 0]);
            p.extend_from_slice(&addrs_ports);
            p.extend_from_slice(&rest[..4]); // ports
            p.extend_from_slice(&rest[4..l4_len.min(12)]);
            p.resize(34 + l4_len, 0);
            p.extend_from_slice(&payload);
            p
        })
}

/// Valid packets with a few bytes overwritten and a random cut, and plain
/// random bytes.
fn fuzzed_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..100),
        (
            valid_packet(),
            prop::collection::vec((0..80usize, any::<u8>()), 0..4),
            prop::option::of(0..80usize),
        )
            .prop_map(|(mut p, writes, cut)| {
                for (i, b) in writes {
                    if let Some(x) = p.get_mut(i) {
                        *x = b;
                    }
                }
                if let Some(cut) = cut {
                    p.truncate(cut);
                }
                p
            }),
    ]
}

#[test]
fn the_bpf_header_parser_never_reads_past_the_packet_and_agrees_with_a_reference() {
    let cases = 20_000;
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let page = std::cell::RefCell::new(GuardedPage::new());
    let flows = std::cell::Cell::new(0usize);
    let result = runner.run(&fuzzed_packet(), |p| {
        let (start, end) = page.borrow_mut().place(&p);
        let got = verdict(&parse(start, end));
        flows.set(flows.get() + usize::from(matches!(got, Expected::Flow(..))));
        prop_assert_eq!(got, expected(&p), "packet {:02x?}", p);
        Ok(())
    });
    let flows = flows.get();
    eprintln!("{cases} packets (deterministic seed), {flows} parsed as flows");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(flows > cases as usize / 10, "too few valid flows: {flows}");
}
