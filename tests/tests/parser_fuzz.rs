//! The data path's header parser, compiled for userspace from the very
//! source the BPF object is built from (no copy, nothing changed in the BPF
//! build), fuzzed with proptest. Each packet is placed so that it ends at a
//! page whose successor is inaccessible: a read past its end faults at once.
//! The verdict must agree with a reference reading of the bytes.

#[allow(dead_code)]
#[path = "../../lb-ebpf/src/headers.rs"]
mod headers;

use headers::{dsr_origin, dsr_origin6, l3, parse4, parse6, Flow, Parsed, L3};
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

/// saddr, daddr, sport, dport (as in the packet), proto.
type Tuple4 = ([u8; 4], [u8; 4], [u8; 2], [u8; 2], u8);

/// What the parser found of an IPv4 flow.
fn tuple4(f: &Flow<u32>) -> Tuple4 {
    (
        f.saddr.to_ne_bytes(),
        f.daddr.to_ne_bytes(),
        f.sport.to_ne_bytes(),
        f.dport.to_ne_bytes(),
        f.proto,
    )
}

/// What the parser should say, read straight off the bytes.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Other,
    Fragment,
    Malformed,
    Flow(Tuple4),
    /// IPv6: sport, dport, proto, L4 offset (the hooks copy the addresses
    /// in themselves).
    Flow6([u8; 2], [u8; 2], u8, usize),
    /// IPv4 with the DSR option: the flow, then the option's port and
    /// address (as in the packet).
    Dsr(Tuple4, [u8; 2], [u8; 4]),
    /// IPv6 with the DSR destination options header: the flow as `Flow6`,
    /// then the header's port and address.
    Dsr6([u8; 2], [u8; 2], u8, usize, [u8; 2], [u8; 16]),
}

fn expected(p: &[u8]) -> Expected {
    if p.len() >= 14 && p[12..14] == [0x86, 0xdd] {
        return expected6(p);
    }
    if p.len() < 14 || p[12..14] != [0x08, 0x00] {
        return Expected::Other;
    }
    if p.len() < 15 {
        return Expected::Malformed;
    }
    // Options are the kernel's, but for the DSR option alone (type 0x9e,
    // length 8) right after the fixed header.
    let dsr = p[14] == 0x47;
    if p[14] != 0x45 && !dsr {
        return Expected::Other;
    }
    if dsr && (p.len() < 42 || p[34] != 0x9e || p[35] != 8) {
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
    let frag = u16::from_be_bytes([p[20], p[21]]);
    let offset = frag & 0x1fff;
    // A DSR request's first fragment has its ports: it is read.
    if frag & 0x3fff != 0 && !(dsr && offset == 0) {
        return Expected::Fragment;
    }
    let header = if dsr { 28 } else { 20 };
    let total = u16::from_be_bytes([p[16], p[17]]) as usize;
    if total < header + l4_len || p.len() < 14 + header + l4_len {
        return Expected::Malformed;
    }
    let a = |i: usize| [p[i], p[i + 1], p[i + 2], p[i + 3]];
    let l4 = 14 + header;
    let (sport, dport) = ([p[l4], p[l4 + 1]], [p[l4 + 2], p[l4 + 3]]);
    let flow = (a(26), a(30), sport, dport, proto);
    if dsr {
        Expected::Dsr(flow, [p[36], p[37]], a(38))
    } else {
        Expected::Flow(flow)
    }
}

/// IPv6: up to four hop-by-hop, routing or destination options headers,
/// then TCP or UDP; a fragment header before either makes a fragment.
fn expected6(p: &[u8]) -> Expected {
    if p.len() < 54 {
        return Expected::Malformed;
    }
    if p[14] >> 4 != 6 {
        return Expected::Other;
    }
    let ip_end = 54 + u16::from_be_bytes([p[18], p[19]]) as usize;
    let (mut next, mut off) = (p[20], 54);
    for _ in 0..4 {
        if next == 6 || next == 17 {
            break;
        }
        if p.len() < off + 2 {
            return Expected::Malformed;
        }
        match next {
            0 | 43 | 60 => (next, off) = (p[off], off + (p[off + 1] as usize + 1) * 8),
            44 if p[off] == 6 || p[off] == 17 => return Expected::Fragment,
            _ => return Expected::Other,
        }
    }
    let l4_len = match next {
        6 => 20,
        17 => 8,
        _ => return Expected::Other,
    };
    if off > ip_end || ip_end - off < l4_len || p.len() < off + l4_len {
        return Expected::Malformed;
    }
    let (sport, dport) = ([p[off], p[off + 1]], [p[off + 2], p[off + 3]]);
    // The DSR header: destination options first, 24 bytes, its option of
    // type 0x1e with 18 bytes of port and address.
    if p[20] == 60 && p.len() >= 76 && p[55..58] == [2, 0x1e, 18] {
        let addr: [u8; 16] = p[60..76].try_into().unwrap();
        return Expected::Dsr6(sport, dport, next, off, [p[58], p[59]], addr);
    }
    Expected::Flow6(sport, dport, next, off)
}

fn parsed(start: usize, end: usize) -> Expected {
    match l3(start, end) {
        L3::Other => Expected::Other,
        L3::Ipv4 => match parse4(start, end) {
            Parsed::Flow(f) => Expected::Flow(tuple4(&f)),
            Parsed::DsrRequest(f) => {
                let origin = dsr_origin(start, end).expect("the option");
                Expected::Dsr(
                    tuple4(&f),
                    origin.port.to_ne_bytes(),
                    origin.addr.to_ne_bytes(),
                )
            }
            other => plain(&other),
        },
        L3::Ipv6 => {
            let mut f = Flow {
                saddr: [0; 4],
                daddr: [0; 4],
                sport: 0,
                dport: 0,
                proto: 0,
                tcp_flags: 0,
                l4_off: 0,
                l4_csum_off: 0,
                ip_tot_len: 0,
            };
            match parse6(start, end, &mut f) {
                Parsed::Flow(()) => Expected::Flow6(
                    f.sport.to_ne_bytes(),
                    f.dport.to_ne_bytes(),
                    f.proto,
                    f.l4_off,
                ),
                Parsed::DsrRequest(()) => {
                    let (addr, port) = dsr_origin6(start, end).expect("the header");
                    let mut bytes = [0u8; 16];
                    for (i, w) in addr.iter().enumerate() {
                        bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    Expected::Dsr6(
                        f.sport.to_ne_bytes(),
                        f.dport.to_ne_bytes(),
                        f.proto,
                        f.l4_off,
                        port.to_ne_bytes(),
                        bytes,
                    )
                }
                other => plain(&other),
            }
        }
    }
}

fn plain<F>(p: &Parsed<F>) -> Expected {
    match p {
        Parsed::Other | Parsed::Flow(_) | Parsed::DsrRequest(..) => Expected::Other,
        Parsed::Fragment => Expected::Fragment,
        Parsed::Malformed => Expected::Malformed,
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

/// `valid_packet` forwarded with direct server return: the DSR option
/// after its IPv4 header, some as a first fragment.
fn valid_dsr_packet() -> impl Strategy<Value = Vec<u8>> {
    (valid_packet(), any::<[u8; 6]>(), any::<bool>()).prop_map(|(p, origin, first_fragment)| {
        let mut out = p[..34].to_vec();
        out[14] = 0x47;
        let total = u16::from_be_bytes([out[16], out[17]]) + 8;
        out[16..18].copy_from_slice(&total.to_be_bytes());
        if first_fragment {
            out[20] |= 0x20;
        }
        out.extend_from_slice(&[0x9e, 8]);
        out.extend_from_slice(&origin);
        out.extend_from_slice(&p[34..]);
        out
    })
}

/// `valid_packet6` without extension headers, forwarded with direct server
/// return: the DSR destination options header in front of its L4 header.
fn valid_dsr_packet6() -> impl Strategy<Value = Vec<u8>> {
    (valid_packet6(), any::<[u8; 18]>()).prop_map(|(p, origin)| {
        let mut out = p[..54].to_vec();
        let next = out[20];
        out[20] = 60;
        let len = u16::from_be_bytes([out[18], out[19]]) + 24;
        out[18..20].copy_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[next, 2, 0x1e, 18]);
        out.extend_from_slice(&origin);
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&p[54..]);
        out
    })
}

/// A valid Ethernet/IPv6/TCP-or-UDP packet, with up to three extension
/// headers (hop-by-hop, routing, destination options, fragment) between.
fn valid_packet6() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        any::<[u8; 32]>(),
        prop::collection::vec((prop::sample::select(vec![0u8, 43, 60, 44]), 0..2u8), 0..3),
        any::<[u8; 20]>(),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(udp, addrs, exts, l4, payload)| {
            let proto = if udp { 17 } else { 6 };
            let l4_len = if udp { 8 } else { 20 };
            let mut body = Vec::new();
            let kinds: Vec<u8> = exts.iter().map(|e| e.0).chain([proto]).collect();
            for (i, (_, len)) in exts.iter().enumerate() {
                let size = (*len as usize + 1) * 8;
                let mut h = vec![0u8; size];
                h[0] = kinds[i + 1];
                h[1] = if kinds[i] == 44 { 0 } else { *len };
                body.extend_from_slice(&h[..if kinds[i] == 44 { 8 } else { size }]);
            }
            body.extend_from_slice(&l4[..l4_len]);
            body.extend_from_slice(&payload);
            let mut p = vec![0u8; 12];
            p.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            p.extend_from_slice(&(body.len() as u16).to_be_bytes());
            p.extend_from_slice(&[kinds[0], 64]);
            p.extend_from_slice(&addrs);
            p.extend_from_slice(&body);
            p
        })
}

/// Valid packets of both families with a few bytes overwritten and a
/// random cut, and plain random bytes.
fn fuzzed_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..100),
        (
            prop_oneof![
                valid_packet(),
                valid_packet6(),
                valid_dsr_packet(),
                valid_dsr_packet6()
            ],
            prop::collection::vec((0..110usize, any::<u8>()), 0..4),
            prop::option::of(0..140usize),
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
    let flows6 = std::cell::Cell::new(0usize);
    let dsr = std::cell::Cell::new(0usize);
    let result = runner.run(&fuzzed_packet(), |p| {
        let (start, end) = page.borrow_mut().place(&p);
        let got = parsed(start, end);
        flows.set(flows.get() + usize::from(matches!(got, Expected::Flow(..))));
        flows6.set(flows6.get() + usize::from(matches!(got, Expected::Flow6(..))));
        dsr.set(dsr.get() + usize::from(matches!(got, Expected::Dsr(..) | Expected::Dsr6(..))));
        prop_assert_eq!(got, expected(&p), "packet {:02x?}", p);
        Ok(())
    });
    let (flows, flows6, dsr) = (flows.get(), flows6.get(), dsr.get());
    eprintln!(
        "{cases} packets (deterministic seed), {flows} IPv4 and {flows6} IPv6 flows, {dsr} DSR requests"
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        flows > cases as usize / 20,
        "too few valid IPv4 flows: {flows}"
    );
    assert!(
        flows6 > cases as usize / 20,
        "too few valid IPv6 flows: {flows6}"
    );
    assert!(dsr > cases as usize / 20, "too few DSR requests: {dsr}");
}
