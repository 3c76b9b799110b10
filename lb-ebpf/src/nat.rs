//! Service translation shared by the XDP and tc programs: reverse NAT for
//! replies, service lookup, source ranges, backend selection (session
//! affinity, random otherwise), masquerade, conntrack and DNAT. The two
//! hooks differ only in how they rewrite bytes (`Rewriter`) and in whether
//! the packet comes from outside the node or from one of its pods (`Hook`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use lb_common::{
    ct_hold_ns,
    stats::{self, RejectFailure, RewriteFailure},
    Affinity4Key, Affinity4Value, Backend4, Ct4Key, Ct4Value, RevNat4, Service4Key, Service4Value,
    AFFINITY_CLIENT_ADDR, BACKEND_MATCH_ACTIVE, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING,
    CT_FLAG_OPENING, CT_FLAG_REDIRECT, CT_FLAG_SNAT, CT_REFRESH_INTERVAL_NS, IPPROTO_TCP,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SNAT_PORT_TRIES, SVC_FLAGS_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL,
    SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use crate::{
    headers::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{
        self, backend, backend_match, conntrack_insert, conntrack_insert_new, conntrack_ptr, count,
        count_service, snat_ports, source_allowed, AFFINITY, CONNTRACK, CONNTRACK_PREV, REV_NAT,
        SERVICES, SNAT_CURSOR,
    },
};

pub enum Action {
    /// Not service traffic (or left to the kernel): pass untouched.
    Pass,
    /// Rewritten: pass on to the kernel's routing.
    Translated,
    /// Rewritten, and its addresses would look spoofed to the kernel's
    /// input routing: send it straight to the egress device.
    Redirect,
    /// TCP to a Service with no backend: answer with a RST.
    RejectTcp,
    /// UDP to a Service with no backend: answer with ICMP port unreachable.
    RejectUdp,
    Drop,
}

/// Where the packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// From the wire (XDP): external traffic.
    Wire,
    /// From a pod on this node (tc on its veth).
    Pod,
}

/// The hook's verdict for a rejection: the answer it built (counted as
/// rejected), or `drop` when it could not build one (counted as dropped,
/// in total and by reason).
#[inline(always)]
pub fn rejected<T>(answer: Result<T, RejectFailure>, drop: T) -> T {
    match answer {
        Ok(action) => {
            count(stats::NO_BACKEND_REJECTED);
            action
        }
        Err(why) => {
            count(stats::NO_BACKEND_DROPPED);
            count(why.counter());
            drop
        }
    }
}

/// Rewrites addresses and ports with the checksum updates the hook needs.
pub trait Rewriter {
    fn rewrite_dst(&self, flow: &Flow, addr: u32, port: u16) -> Result<(), RewriteFailure>;
    fn rewrite_src(&self, flow: &Flow, addr: u32, port: u16) -> Result<(), RewriteFailure>;
}

/// Why a masqueraded flow got no source address and port (dropped).
#[derive(Clone, Copy)]
enum SnatFailure {
    /// No masquerade address or port ranges are configured, or the
    /// backend's port cursor is missing.
    Unavailable,
    /// Every port tried toward the backend is held by another flow.
    PortsExhausted,
}

impl SnatFailure {
    #[inline(always)]
    fn counter(self) -> u32 {
        match self {
            Self::Unavailable => stats::SNAT_FAILED,
            Self::PortsExhausted => stats::SNAT_PORTS_EXHAUSTED,
        }
    }
}

#[inline(always)]
fn lifetime_ns(flow: &Flow, ct: &Ct4Value) -> u64 {
    lb_common::ct_lifetime_ns(flow.proto, ct.flags)
}

#[inline(always)]
fn closing(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// A TCP SYN that opens a connection (not a SYN-ACK).
#[inline(always)]
fn opening_syn(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn fresh(flow: &Flow, ct: &Ct4Value, now: u64) -> bool {
    now.saturating_sub(ct.last_seen_ns) < lifetime_ns(flow, ct)
}

/// The verdict on a parsed packet, rewritten in place by `rw`. Its steps
/// are not inlined: each keeps its locals in a frame of its own, so the
/// deepest chain of frames stays within BPF's 512 bytes of stack.
#[inline(always)]
pub fn handle<R: Rewriter>(rw: &R, flow: &Flow, hook: Hook) -> Action {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The service lookup comes first, as in Cilium: packets to a Service
    // skip the reply lookup. A reply's destination is a client (or the
    // masquerade address on a port outside the NodePort range), never a
    // Service frontend, so no reply is taken for Service traffic.
    // Built in place, so this frame holds one copy of it.
    let mut start = NewFlow {
        svc_key: Service4Key {
            addr: flow.daddr,
            port: flow.dport,
            backend_slot: 0,
            proto: flow.proto,
            scope: SCOPE_EXTERNAL,
            _pad: [0; 2],
        },
        svc: Service4Value::default(),
        fwd_key: Ct4Key {
            saddr: flow.saddr,
            daddr: flow.daddr,
            sport: flow.sport,
            dport: flow.dport,
            proto: flow.proto,
            direction: CT_DIR_FORWARD,
            _pad: [0; 2],
        },
        hook,
        known_absent: true,
        now,
    };
    let Some(svc) = find_service(&mut start.svc_key, hook == Hook::Pod) else {
        if let Some(action) = reverse_nat(rw, flow, now) {
            return action;
        }
        forget_reply_entry_on_syn(flow, hook, now);
        return Action::Pass;
    };
    start.svc = svc;
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(svc.rev_nat_id, flow.saddr) {
        count(stats::SOURCE_RANGE_DROPPED);
        return Action::Drop;
    }
    if let Some(ct_ptr) = conntrack_ptr(&start.fwd_key) {
        if let Some(action) = follow_flow(rw, flow, ct_ptr, now) {
            return action;
        }
        start.known_absent = false;
    }
    if start.svc.count == 0 {
        return no_backend(flow, hook, &start.svc);
    }
    new_flow(rw, flow, &start)
}

/// What a new flow to a Service starts from (one argument: BPF functions
/// take at most five).
struct NewFlow {
    svc_key: Service4Key,
    svc: Service4Value,
    fwd_key: Ct4Key,
    hook: Hook,
    /// The caller looked the forward key up and found nothing.
    known_absent: bool,
    now: u64,
}

/// A packet of a flow conntrack knows goes to the flow's backend while the
/// entry is fresh and the backend exists; None: the flow picks anew.
#[inline(never)]
fn follow_flow<R: Rewriter>(
    rw: &R,
    flow: &Flow,
    ct_ptr: *mut Ct4Value,
    now: u64,
) -> Option<Action> {
    // SAFETY: the pointer comes from a successful lookup.
    let ct = unsafe { *ct_ptr };
    // A SYN on a closed flow's tuple is a new connection.
    let new_syn = opening_syn(flow) && ct.flags & CT_FLAG_CLOSING != 0;
    if !fresh(flow, &ct, now) || new_syn {
        return None;
    }
    // A flow keeps its backend for as long as that backend exists. A UDP
    // flow has no end that would let go of it, so it moves as soon as the
    // backend leaves its Service (kube-proxy flushes such UDP conntrack
    // entries); a TCP connection runs to its end.
    let live = backend(ct.backend_id).filter(|_| {
        flow.proto == IPPROTO_TCP || backend_match(ct.backend_id, ct.rev_nat_id).is_some()
    });
    let Some(backend) = live else {
        count(stats::BACKEND_MISSING);
        return None;
    };
    let ct = update_forward_entry(flow, ct_ptr, &ct, &backend, now);
    Some(translate(rw, flow, &backend, &ct))
}

/// Keeps a forward entry's state: closing on a FIN or RST, open once the
/// client acknowledges the handshake, refreshed now and then. Its reply
/// entry follows a close (it reserves the masquerade port) and each
/// refresh (it may have been evicted under LRU pressure).
#[inline(always)]
fn update_forward_entry(
    flow: &Flow,
    ct_ptr: *mut Ct4Value,
    ct: &Ct4Value,
    backend: &Backend4,
    now: u64,
) -> Ct4Value {
    let mut flags = ct.flags;
    if closing(flow) {
        flags |= CT_FLAG_CLOSING;
    }
    if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        flags &= !CT_FLAG_OPENING;
    }
    let refresh = now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS;
    if flags != ct.flags {
        unsafe { (*ct_ptr).flags = flags };
    }
    if refresh {
        unsafe { (*ct_ptr).last_seen_ns = now };
    }
    let updated = Ct4Value { flags, ..*ct };
    if refresh || (flags ^ ct.flags) & CT_FLAG_CLOSING != 0 {
        refresh_reply_entry(flow, backend, &updated, now);
    }
    updated
}

/// A Service port without backends: a RST or an ICMP error, except for
/// external traffic of a Local policy, which kube-proxy drops (the load
/// balancer's health check steers away).
#[inline(always)]
fn no_backend(flow: &Flow, hook: Hook, svc: &Service4Value) -> Action {
    if hook == Hook::Wire && svc.flags & SVC_FLAG_EXTERNAL_LOCAL != 0 {
        count(stats::NO_LOCAL_BACKEND_DROPPED);
        Action::Drop
    } else if flow.proto == IPPROTO_TCP {
        Action::RejectTcp
    } else {
        Action::RejectUdp
    }
}

/// Whether a new flow's source is masqueraded: external traffic unless
/// its policy is Local, so replies come back through this node; and a pod
/// reaching itself through a Service, or its own address would arrive as
/// a source from outside.
#[inline(always)]
fn masquerades(flow: &Flow, hook: Hook, svc: &Service4Value, backend: &Backend4) -> bool {
    let external = svc.flags & SVC_FLAGS_EXTERNAL != 0;
    backend.addr == flow.saddr
        || (hook == Hook::Wire && external && svc.flags & SVC_FLAG_EXTERNAL_LOCAL == 0)
}

/// A new flow: pick a backend, record both conntrack entries (claiming a
/// masquerade port when the flow needs one) and translate.
#[inline(never)]
fn new_flow<R: Rewriter>(rw: &R, flow: &Flow, start: &NewFlow) -> Action {
    let svc = &start.svc;
    let now = start.now;
    let client = Affinity4Key {
        client: flow.saddr,
        rev_nat_id: svc.rev_nat_id,
        proto: flow.proto,
        client_kind: AFFINITY_CLIENT_ADDR,
    };
    let Some((backend_id, backend)) =
        select_backend(svc, &start.svc_key, &client, now).and_then(|id| Some((id, backend(id)?)))
    else {
        count(stats::BACKEND_MISSING);
        return Action::Drop;
    };
    remember_affinity(svc, &client, backend_id, now);
    let mut ct = Ct4Value {
        last_seen_ns: now,
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        flags: new_entry_flags(flow, svc),
        nat_addr: 0,
        nat_port: 0,
        _pad: 0,
    };
    if masquerades(flow, start.hook, svc, &backend) {
        ct.flags |= CT_FLAG_SNAT | CT_FLAG_REDIRECT;
        match masquerade_source(flow, &backend, &ct, now) {
            Ok((addr, port)) => {
                ct.nat_addr = addr;
                ct.nat_port = port;
            }
            Err(why) => {
                count(why.counter());
                return Action::Drop;
            }
        }
    } else {
        insert_reply_entry(flow, &backend, &ct, now);
    }
    // Without a forward entry the flow would still work packet by packet,
    // only without backend stickiness, so a full map is not fatal.
    conntrack_insert(&start.fwd_key, &ct, start.known_absent);
    count(stats::CT_CREATED);
    translate(rw, flow, &backend, &ct)
}

#[inline(always)]
fn new_entry_flags(flow: &Flow, svc: &Service4Value) -> u16 {
    let mut flags = 0;
    if closing(flow) {
        flags |= CT_FLAG_CLOSING;
    }
    if opening_syn(flow) {
        flags |= CT_FLAG_OPENING;
    }
    if svc.flags & SVC_FLAGS_EXTERNAL != 0 {
        flags |= CT_FLAG_REDIRECT;
    }
    flags
}

/// The client's affinity backend while it is fresh and still an active
/// backend of the frontend; otherwise a random active slot.
#[inline(always)]
pub fn select_backend(
    svc: &Service4Value,
    svc_key: &Service4Key,
    client: &Affinity4Key,
    now: u64,
) -> Option<u32> {
    if svc.affinity_timeout != 0 {
        let key = *client;
        if let Some(a) = unsafe { AFFINITY.get(key) }.copied() {
            let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
            if now.saturating_sub(a.last_used_ns) < timeout_ns
                && backend_match(a.backend_id, svc.rev_nat_id) == Some(BACKEND_MATCH_ACTIVE)
            {
                count(stats::AFFINITY_HIT);
                return Some(a.backend_id);
            }
        }
    }
    // checked_rem: no panic path (the verifier refuses one in a function).
    let pick = unsafe { bpf_get_prandom_u32() }.checked_rem(u32::from(svc.count))?;
    let slot = pick as u16 + 1;
    let slot_key = Service4Key {
        backend_slot: slot,
        ..*svc_key
    };
    unsafe { SERVICES.get(slot_key) }.map(|v| v.backend_id)
}

/// A TCP SYN straight to an address that is no Service (a pod, or a backend
/// chosen at connect() by the socket path) opens a new connection: a reply
/// entry left for its reversed tuple by an earlier translated connection
/// (same client port, same backend) would rewrite its replies to come from
/// a Service, and the client would never see its SYN-ACK.
///
/// On the wire, the SYN may instead be one a hook before this one already
/// translated: while an agent switches an interface from XDP to tc both
/// run, and tc sees XDP's output. There the entry XDP just made is kept:
/// only a closing one, or one idle for a while, is a leftover.
#[inline(always)]
fn forget_reply_entry_on_syn(flow: &Flow, hook: Hook, now: u64) {
    if !opening_syn(flow) {
        return;
    }
    let key = Ct4Key {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    if hook == Hook::Wire {
        // SAFETY: only read.
        let leftover = unsafe { CONNTRACK.get(key) }.is_none_or(|ct| {
            ct.flags & CT_FLAG_CLOSING != 0
                || now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS
        });
        if !leftover {
            return;
        }
    }
    if CONNTRACK.remove(key).is_ok() {
        count(stats::CT_REMOVED);
    }
    // While a migration runs, the old map would hand the entry back.
    let _ = CONNTRACK_PREV.remove(key);
}

/// Records the client's choice for session affinity.
#[inline(always)]
pub fn remember_affinity(svc: &Service4Value, client: &Affinity4Key, backend_id: u32, now: u64) {
    if svc.affinity_timeout != 0 {
        let value = Affinity4Value {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(*client, value, 0);
    }
}

/// The master of the frontend (addr, port, proto) in network order, in
/// the internal scope when `internal` and the frontend has two.
#[inline(always)]
pub fn lookup_service(
    addr: u32,
    port: u16,
    proto: u8,
    internal: bool,
) -> Option<(Service4Key, Service4Value)> {
    let mut key = Service4Key {
        addr,
        port,
        backend_slot: 0,
        proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    let svc = find_service(&mut key, internal)?;
    Some((key, svc))
}

/// The master of the frontend `key` names (its external scope), in the
/// internal scope when `internal` and the frontend has two (`key` then
/// names that scope).
#[inline(always)]
pub fn find_service(key: &mut Service4Key, internal: bool) -> Option<Service4Value> {
    // SAFETY: the value is copied out at once; the agent replaces whole entries.
    let svc = (unsafe { SERVICES.get(*key) }).copied()?;
    if internal && svc.flags & SVC_FLAG_TWO_SCOPES != 0 {
        key.scope = SCOPE_INTERNAL;
        if let Some(v) = (unsafe { SERVICES.get(*key) }).copied() {
            return Some(v);
        }
        key.scope = SCOPE_EXTERNAL;
    }
    Some(svc)
}

/// A source address and port for a masqueraded flow: the node's
/// masquerade address and the next port of the ranges, in turn per
/// backend, whose reply entry is free: absent, or idle past its hold (a
/// closed flow's port waits out TIME_WAIT). The reply entry is claimed
/// here, atomically.
#[inline(always)]
fn masquerade_source(
    flow: &Flow,
    backend: &Backend4,
    fwd: &Ct4Value,
    now: u64,
) -> Result<(u32, u16), SnatFailure> {
    let addr = maps::datapath_config().masquerade_addr;
    let ports = snat_ports();
    let total = ports.total();
    if addr == 0 || total == 0 {
        return Err(SnatFailure::Unavailable);
    }
    let cursor = SNAT_CURSOR
        .get_ptr_mut(fwd.backend_id)
        .ok_or(SnatFailure::Unavailable)?;
    // Not atomic: two CPUs may read the same value and start at the same
    // port, and then the claim below (an insert that fails when the key
    // exists) lets one of them have it and moves the other on.
    // SAFETY: an aligned u64 in an array map value.
    let next = unsafe { *cursor };
    unsafe { *cursor = next.wrapping_add(1) };
    // The range is found once; the probe walks on within it (a loop whose
    // body branches on the range would cost the verifier its paths).
    let (range_first, range_len, offset) = ports.locate((next % u64::from(total)) as u32);
    if range_len == 0 {
        return Err(SnatFailure::Unavailable);
    }
    let reply = Ct4Value {
        last_seen_ns: now,
        backend_id: fwd.backend_id,
        rev_nat_id: fwd.rev_nat_id,
        flags: fwd.flags & REPLY_ENTRY_FLAGS,
        nat_addr: flow.saddr,
        nat_port: flow.sport,
        _pad: 0,
    };
    let mut key = Ct4Key {
        saddr: backend.addr,
        daddr: addr,
        sport: backend.port,
        dport: 0,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        let in_range = ((u32::from(offset) + i) % u32::from(range_len)) as u16;
        key.dport = (range_first + in_range).to_be();
        if claim_reply_entry(&key, &reply, now) {
            return Ok((addr, key.dport));
        }
        i += 1;
    }
    // A run of busy ports: the next flow starts past it.
    unsafe { *cursor = next.wrapping_add(u64::from(SNAT_PORT_TRIES)) };
    Err(SnatFailure::PortsExhausted)
}

/// Takes the reply tuple `key` for a new masqueraded flow if no flow holds
/// it: absent (inserted only if still absent), or idle past its hold.
#[inline(always)]
fn claim_reply_entry(key: &Ct4Key, reply: &Ct4Value, now: u64) -> bool {
    match conntrack_ptr(key) {
        None => conntrack_insert_new(key, reply),
        Some(p) => {
            // SAFETY: the pointer comes from a successful lookup.
            let held = unsafe { *p };
            let hold = ct_hold_ns(key.proto, CT_DIR_REPLY, held.flags);
            if now.saturating_sub(held.last_seen_ns) < hold {
                return false;
            }
            conntrack_insert(key, reply, false);
            true
        }
    }
}

/// The flags a reply entry takes from its forward entry.
const REPLY_ENTRY_FLAGS: u16 = CT_FLAG_SNAT | CT_FLAG_REDIRECT | CT_FLAG_OPENING | CT_FLAG_CLOSING;

#[inline(always)]
fn translate<R: Rewriter>(rw: &R, flow: &Flow, backend: &Backend4, ct: &Ct4Value) -> Action {
    let mut done = rw.rewrite_dst(flow, backend.addr, backend.port);
    if done.is_ok() && ct.flags & CT_FLAG_SNAT != 0 {
        done = rw.rewrite_src(flow, ct.nat_addr, ct.nat_port);
    }
    if done.is_ok() {
        count_service(ct.rev_nat_id, flow.ip_tot_len);
    }
    rewritten(done, stats::SERVICE_FORWARDED, ct.flags & CT_FLAG_SNAT != 0)
}

/// The verdict after a flow's rewrite: counted under `counter`, and sent
/// to its egress device when `redirect` (its source became a node
/// address); dropped and counted, in total and by reason, when it failed.
#[inline(always)]
fn rewritten(done: Result<(), RewriteFailure>, counter: u32, redirect: bool) -> Action {
    if let Err(why) = done {
        count(stats::REWRITE_FAILED);
        count(why.counter());
        return Action::Drop;
    }
    count(counter);
    if redirect {
        Action::Redirect
    } else {
        Action::Translated
    }
}

/// The key replies of the flow `fwd` describes are matched against:
/// backend -> client, or backend -> masquerade address when masqueraded.
#[inline(always)]
fn reply_key(flow: &Flow, backend: &Backend4, fwd: &Ct4Value) -> Ct4Key {
    let snat = fwd.flags & CT_FLAG_SNAT != 0;
    Ct4Key {
        saddr: backend.addr,
        daddr: if snat { fwd.nat_addr } else { flow.saddr },
        sport: backend.port,
        dport: if snat { fwd.nat_port } else { flow.sport },
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn reply_value(flow: &Flow, fwd: &Ct4Value, now: u64) -> Ct4Value {
    let snat = fwd.flags & CT_FLAG_SNAT != 0;
    Ct4Value {
        last_seen_ns: now,
        backend_id: fwd.backend_id,
        rev_nat_id: fwd.rev_nat_id,
        flags: fwd.flags & REPLY_ENTRY_FLAGS,
        nat_addr: if snat { flow.saddr } else { 0 },
        nat_port: if snat { flow.sport } else { 0 },
        _pad: 0,
    }
}

/// The reply entry of a new flow that is not masqueraded: its tuple
/// (backend -> this client's address and port) is now this flow's.
#[inline(always)]
fn insert_reply_entry(flow: &Flow, backend: &Backend4, fwd: &Ct4Value, now: u64) {
    conntrack_insert(
        &reply_key(flow, backend, fwd),
        &reply_value(flow, fwd, now),
        false,
    );
}

/// Refreshes the reply entry of a flow from its forward entry, or puts it
/// back when it was evicted. An entry another flow now holds (its port
/// claimed after an eviction) is left alone.
#[inline(always)]
fn refresh_reply_entry(flow: &Flow, backend: &Backend4, fwd: &Ct4Value, now: u64) {
    let key = reply_key(flow, backend, fwd);
    let want = reply_value(flow, fwd, now);
    let Some(p) = conntrack_ptr(&key) else {
        conntrack_insert_new(&key, &want);
        return;
    };
    // SAFETY: the pointer comes from a successful lookup.
    let have = unsafe { *p };
    let ours = have.backend_id == want.backend_id
        && have.rev_nat_id == want.rev_nat_id
        && have.nat_addr == want.nat_addr
        && have.nat_port == want.nat_port;
    if ours {
        unsafe {
            (*p).last_seen_ns = now;
            (*p).flags |= want.flags & CT_FLAG_CLOSING;
        }
    }
}

/// A reply from a backend to a client of a Service gets the Service's
/// address and port as its source, and a masqueraded one the client's
/// address and port as its destination.
#[inline(never)]
fn reverse_nat<R: Rewriter>(rw: &R, flow: &Flow, now: u64) -> Option<Action> {
    let key = Ct4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let ct_ptr = conntrack_ptr(&key)?;
    // SAFETY: the pointer comes from a successful lookup.
    let ct = unsafe { *ct_ptr };
    // A leftover of a flow that ended must not touch a new one that reuses
    // its addresses and ports.
    if !fresh(flow, &ct, now) {
        return None;
    }
    let rev = unsafe { REV_NAT.get(ct.rev_nat_id) }.copied()?;
    update_reply_entry(flow, ct_ptr, &ct, &rev, now);
    let mut done = rw.rewrite_src(flow, rev.addr, rev.port);
    if done.is_ok() && ct.flags & CT_FLAG_SNAT != 0 {
        done = rw.rewrite_dst(flow, ct.nat_addr, ct.nat_port);
    }
    Some(rewritten(
        done,
        stats::REVERSE_NATTED,
        ct.flags & CT_FLAG_REDIRECT != 0,
    ))
}

/// Keeps a reply entry's state: open once the backend answered the SYN,
/// closing on its FIN or RST (and then its forward entry too), refreshed
/// now and then.
#[inline(always)]
fn update_reply_entry(flow: &Flow, ct_ptr: *mut Ct4Value, ct: &Ct4Value, rev: &RevNat4, now: u64) {
    let mut flags = ct.flags;
    if closing(flow) {
        flags |= CT_FLAG_CLOSING;
    }
    if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        flags &= !CT_FLAG_OPENING;
    }
    if flags != ct.flags {
        unsafe { (*ct_ptr).flags = flags };
    }
    if now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        unsafe { (*ct_ptr).last_seen_ns = now };
    }
    if (flags ^ ct.flags) & CT_FLAG_CLOSING != 0 {
        close_forward_entry(flow, ct, rev);
    }
}

/// Marks the forward entry of the flow whose reply entry is `reply`
/// closing: a SYN the client sends next on that tuple opens a new flow.
#[inline(always)]
fn close_forward_entry(flow: &Flow, reply: &Ct4Value, rev: &RevNat4) {
    let snat = reply.flags & CT_FLAG_SNAT != 0;
    let key = Ct4Key {
        saddr: if snat { reply.nat_addr } else { flow.daddr },
        daddr: rev.addr,
        sport: if snat { reply.nat_port } else { flow.dport },
        dport: rev.port,
        proto: flow.proto,
        direction: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    if let Some(p) = conntrack_ptr(&key) {
        unsafe { (*p).flags |= CT_FLAG_CLOSING };
    }
}
