//! Service translation shared by the XDP and tc programs: reverse NAT for
//! replies, service lookup, source ranges, backend selection (session
//! affinity, random otherwise), masquerade, conntrack and DNAT. The two
//! hooks differ only in how they rewrite bytes (`Rewriter`) and in whether
//! the packet comes from outside the node or from one of its pods (`Hook`).
//! Written once for both address families (`Family`: IPv4 and IPv6 differ
//! in their addresses and maps, not in Service logic).

use aya_ebpf::{
    bindings::bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
    helpers::{bpf_check_mtu, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    ct_hold_ns,
    stats::{self, RejectFailure, RewriteFailure},
    Affinity4Value, Service4Value, AFFINITY_CLIENT_ADDR, BACKEND_MATCH_ACTIVE, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_DSR, CT_FLAG_OPENING, CT_FLAG_REDIRECT, CT_FLAG_SNAT,
    CT_REFRESH_INTERVAL_NS, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_ENTRIES_PER_WORD, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SNAT_PORT_TRIES, SVC_FLAGS_EXTERNAL, SVC_FLAG_DSR, SVC_FLAG_EXTERNAL_LOCAL,
    SVC_FLAG_MAGLEV, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use crate::{
    family::{Addr, Backend, Client, Ct, Family, RevNat, SvcKey, Tuple},
    headers::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{count, count_service, datapath_config, snat_ports, MAGLEV},
};

pub enum Action {
    /// Not service traffic (or left to the kernel): pass untouched.
    Pass,
    /// Rewritten: pass on to the kernel's routing.
    Translated,
    /// Rewritten, and the hook adds the DSR option (IPv4) or header (IPv6)
    /// naming the frontend the packet was sent to, then passes it on. Last
    /// and in the hook: it moves the headers, and its stack would not fit
    /// under the NAT core's frames.
    TranslatedWithDsrOption,
    /// Rewritten, and its addresses would look spoofed to the kernel's
    /// input routing: send it straight to the egress device.
    Redirect,
    /// TCP to a Service with no backend: answer with a RST.
    RejectTcp,
    /// UDP to a Service with no backend: answer with ICMP port unreachable.
    RejectUdp,
    /// A DSR datagram that the option would make too big for the wire
    /// (IPv4: with don't-fragment): answer with ICMP fragmentation needed
    /// or ICMPv6 Packet Too Big and this MTU (the wire's, less the option).
    FragNeeded(u16),
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
pub fn rejected<F: Family, T>(answer: Result<T, RejectFailure>, drop: T) -> T {
    match answer {
        Ok(action) => {
            count::<F>(stats::NO_BACKEND_REJECTED);
            action
        }
        Err(why) => {
            count::<F>(stats::NO_BACKEND_DROPPED);
            count::<F>(why.counter());
            drop
        }
    }
}

/// Rewrites addresses and ports of family `F` with the checksum updates
/// the hook needs.
pub trait Rewriter<F: Family> {
    fn rewrite_dst(
        &self,
        flow: &Flow<F::Addr>,
        addr: F::Addr,
        port: u16,
    ) -> Result<(), RewriteFailure>;
    fn rewrite_src(
        &self,
        flow: &Flow<F::Addr>,
        addr: F::Addr,
        port: u16,
    ) -> Result<(), RewriteFailure>;
    /// None when the packet still fits the wire with what names the DSR
    /// frontend added (or may be fragmented); else the MTU the client must
    /// drop to.
    fn dsr_option_too_big(&self, flow: &Flow<F::Addr>) -> Option<u16>;
}

/// None when the packet of the hook context `ctx` (an `xdp_md` or a
/// `__sk_buff`) still fits its device's MTU `grow` bytes longer; else
/// that MTU less `grow`. Ifindex 0: the device the packet came in by, the
/// wire a DSR request leaves by.
#[inline(always)]
pub fn too_big_by(ctx: *mut core::ffi::c_void, grow: u8) -> Option<u16> {
    let mut mtu = 0u32;
    let verdict = unsafe { bpf_check_mtu(ctx, 0, &raw mut mtu, i32::from(grow), 0) };
    (verdict == i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED))
        .then(|| mtu.saturating_sub(u32::from(grow)) as u16)
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
fn lifetime_ns<A: Addr>(flow: &Flow<A>, ct: &Ct<A>) -> u64 {
    lb_common::ct_lifetime_ns(flow.proto, ct.flags)
}

#[inline(always)]
fn closing<A>(flow: &Flow<A>) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// A TCP SYN that opens a connection (not a SYN-ACK).
#[inline(always)]
fn opening_syn<A>(flow: &Flow<A>) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn fresh<A: Addr>(flow: &Flow<A>, ct: &Ct<A>, now: u64) -> bool {
    now.saturating_sub(ct.last_seen_ns) < lifetime_ns(flow, ct)
}

/// The verdict on a parsed packet, rewritten in place by `rw`. Its steps
/// are not inlined: each keeps its locals in a frame of its own, so the
/// deepest chain of frames stays within BPF's 512 bytes of stack. The
/// state of a packet to a Service is built in the family's per-CPU
/// scratch value (`Family::scratch`), off the stack; other packets never
/// touch it.
#[inline(always)]
pub fn handle<F: Family, R: Rewriter<F>>(rw: &R, flow: &Flow<F::Addr>, hook: Hook) -> Action {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The service lookup comes first, as in Cilium: packets to a Service
    // skip the reply lookup. A reply's destination is a client (or the
    // masquerade address on a port outside the NodePort range), never a
    // Service frontend, so no reply is taken for Service traffic.
    let mut frontend = SvcKey {
        addr: flow.daddr,
        port: flow.dport,
        backend_slot: 0,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    let Some(svc) = find_service::<F>(&mut frontend, hook == Hook::Pod) else {
        if let Some(action) = reverse_nat::<F, R>(rw, flow, now) {
            return action;
        }
        forget_reply_entry_on_syn::<F>(flow, hook, now);
        return Action::Pass;
    };
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !F::source_allowed(svc.rev_nat_id, &flow.saddr) {
        count::<F>(stats::SOURCE_RANGE_DROPPED);
        return Action::Drop;
    }
    let Some(slot) = F::scratch() else {
        // A per-CPU array of one entry always has it.
        return Action::Pass;
    };
    let start = slot.cast::<NewFlow<F::Addr>>();
    // The Service and its key wait in the scratch value, not on the
    // stack, while an established flow is followed: that call's frames
    // come on top of this one.
    // SAFETY: this CPU's slot, no other user while the program runs; the
    // fields are written before `start` is read as a whole.
    unsafe {
        (&raw mut (*start).svc).write(svc);
        (&raw mut (*start).frontend).write(frontend);
    }
    // An established flow needs only its forward entry: the key is built
    // here, and the rest of the scratch value written for new flows alone.
    let fwd = tuple(flow, CT_DIR_FORWARD);
    let mut known_absent = true;
    if let Some(ct_ptr) = F::ct_ptr(&fwd) {
        if let Some(action) = follow_flow::<F, R>(rw, flow, ct_ptr, now) {
            return action;
        }
        known_absent = false;
    }
    // SAFETY: written above.
    let svc = unsafe { &(*start).svc };
    if svc.count == 0 {
        return no_backend::<F>(flow, hook, svc);
    }
    // SAFETY: `start` is this CPU's scratch value, its Service and key
    // written above.
    let start = unsafe { complete_new_flow(start, fwd, hook, known_absent, now) };
    new_flow::<F, R>(rw, flow, start)
}

/// The scratch value of a new flow, whose Service and key are written,
/// with the rest of its fields.
///
/// # Safety
/// `start` is this CPU's scratch value, with `svc` and `frontend` written.
#[inline(always)]
unsafe fn complete_new_flow<'a, A: Addr>(
    start: *mut NewFlow<A>,
    fwd: Tuple<A>,
    hook: Hook,
    known_absent: bool,
    now: u64,
) -> &'a mut NewFlow<A> {
    unsafe {
        (&raw mut (*start).fwd).write(fwd);
        (&raw mut (*start).hook).write(hook);
        (&raw mut (*start).known_absent).write(known_absent);
        (&raw mut (*start).now).write(now);
        (&raw mut (*start).backend).write(Backend {
            addr: A::UNSPECIFIED,
            port: 0,
            proto: 0,
            state: 0,
            zone: 0,
            _pad: [0; 3],
        });
        (&raw mut (*start).ct).write(Ct::new(0, 0, 0, 0, (A::UNSPECIFIED, 0)));
        &mut *start
    }
}

/// The tuple of replies to `flow`'s packet: its ends swapped.
#[inline(always)]
fn reversed<A: Copy>(flow: &Flow<A>) -> Tuple<A> {
    Tuple {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// The flow's own tuple, in `direction`.
#[inline(always)]
fn tuple<A: Copy>(flow: &Flow<A>, direction: u8) -> Tuple<A> {
    Tuple {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

/// What a new flow to a Service starts from (one argument: BPF functions
/// take at most five).
pub struct NewFlow<A: Addr> {
    frontend: SvcKey<A>,
    svc: Service4Value,
    fwd: Tuple<A>,
    hook: Hook,
    /// The caller looked the forward key up and found nothing.
    known_absent: bool,
    now: u64,
    /// Set by `pick_backend`.
    backend: Backend<A>,
    ct: Ct<A>,
}

/// A packet of a flow conntrack knows goes to the flow's backend while the
/// entry is fresh and the backend exists; None: the flow picks anew.
#[inline(never)]
fn follow_flow<F: Family, R: Rewriter<F>>(
    rw: &R,
    flow: &Flow<F::Addr>,
    ct_ptr: *mut Ct<F::Addr>,
    now: u64,
) -> Option<Action> {
    // SAFETY: the pointer comes from a successful lookup.
    let mut ct = unsafe { *ct_ptr };
    // A SYN on a closed flow's tuple is a new connection.
    let new_syn = opening_syn(flow) && ct.flags & CT_FLAG_CLOSING != 0;
    if !fresh(flow, &ct, now) || new_syn {
        return None;
    }
    // A flow keeps its backend for as long as that backend exists. A UDP
    // flow has no end that would let go of it, so it moves as soon as the
    // backend leaves its Service (kube-proxy flushes such UDP conntrack
    // entries); a TCP connection runs to its end.
    let live = F::backend(ct.backend_id).filter(|_| {
        flow.proto == IPPROTO_TCP || F::backend_match(ct.backend_id, ct.rev_nat_id()).is_some()
    });
    let Some(backend) = live else {
        count::<F>(stats::BACKEND_MISSING);
        return None;
    };
    update_forward_entry::<F>(flow, ct_ptr, &mut ct, &backend, now);
    Some(translate::<F, R>(rw, flow, &backend, &ct))
}

/// Keeps a forward entry's state: closing on a FIN or RST, open once the
/// client acknowledges the handshake, refreshed now and then. Its reply
/// entry follows a close (it reserves the masquerade port) and each
/// refresh (it may have been evicted under LRU pressure). `ct`, the
/// caller's copy, is updated too.
#[inline(always)]
fn update_forward_entry<F: Family>(
    flow: &Flow<F::Addr>,
    ct_ptr: *mut Ct<F::Addr>,
    ct: &mut Ct<F::Addr>,
    backend: &Backend<F::Addr>,
    now: u64,
) {
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
    let closed_now = (flags ^ ct.flags) & CT_FLAG_CLOSING != 0;
    ct.flags = flags;
    if refresh || closed_now {
        refresh_reply_entry::<F>(flow, backend, ct, now);
    }
}

/// A Service port without backends: a RST or an ICMP error, except for
/// external traffic of a Local policy, which kube-proxy drops (the load
/// balancer's health check steers away).
#[inline(always)]
fn no_backend<F: Family>(flow: &Flow<F::Addr>, hook: Hook, svc: &Service4Value) -> Action {
    if hook == Hook::Wire && svc.flags & SVC_FLAG_EXTERNAL_LOCAL != 0 {
        count::<F>(stats::NO_LOCAL_BACKEND_DROPPED);
        Action::Drop
    } else if flow.proto == IPPROTO_TCP {
        Action::RejectTcp
    } else {
        Action::RejectUdp
    }
}

/// Whether a new flow's source is masqueraded: external traffic unless
/// its policy is Local or it goes with direct server return, so replies
/// come back through this node; and a pod reaching itself through a
/// Service, or its own address would arrive as a source from outside.
#[inline(always)]
fn masquerades<A: PartialEq>(
    flow: &Flow<A>,
    hook: Hook,
    svc: &Service4Value,
    backend: &Backend<A>,
) -> bool {
    let external = svc.flags & SVC_FLAGS_EXTERNAL != 0;
    let keeps_source = svc.flags & (SVC_FLAG_EXTERNAL_LOCAL | SVC_FLAG_DSR) != 0;
    backend.addr == flow.saddr || (hook == Hook::Wire && external && !keeps_source)
}

/// A new flow, in three steps run one after the other from `handle`, so
/// their frames do not nest: pick a backend, record both conntrack entries
/// (claiming a masquerade port when the flow needs one), translate. What
/// one step hands the next is kept in `start` (for IPv6 a per-CPU scratch
/// value, off the stack).
#[inline(always)]
fn new_flow<F: Family, R: Rewriter<F>>(
    rw: &R,
    flow: &Flow<F::Addr>,
    start: &mut NewFlow<F::Addr>,
) -> Action {
    if !pick_backend::<F>(flow, start) {
        count::<F>(stats::BACKEND_MISSING);
        return Action::Drop;
    }
    if let Err(why) = record_flow::<F>(flow, start) {
        count::<F>(why.counter());
        return Action::Drop;
    }
    count::<F>(stats::CT_CREATED);
    translate::<F, R>(rw, flow, &start.backend, &start.ct)
}

/// Chooses the new flow's backend (session affinity, else at random) and
/// fills `start.backend` and `start.ct`; false when the slot or backend
/// it found is gone.
#[inline(never)]
fn pick_backend<F: Family>(flow: &Flow<F::Addr>, start: &mut NewFlow<F::Addr>) -> bool {
    let svc = &start.svc;
    let client = Client {
        id: flow.saddr,
        rev_nat_id: svc.rev_nat_id,
        proto: flow.proto,
        kind: AFFINITY_CLIENT_ADDR,
        _pad: [0; 2],
    };
    let Some((backend_id, backend)) =
        select_backend::<F>(svc, &start.frontend, &client, start.now, Some(flow))
            .and_then(|id| Some((id, F::backend(id)?)))
    else {
        return false;
    };
    remember_affinity::<F>(svc, &client, backend_id, start.now);
    start.ct = Ct::new(
        start.now,
        backend_id,
        svc.rev_nat_id,
        new_entry_flags::<F>(flow, svc, start.hook),
        (F::Addr::UNSPECIFIED, 0),
    );
    start.backend = backend;
    true
}

/// Records the new flow's reply entry (claiming a masquerade source when
/// it is masqueraded, which sets `start.ct`'s NAT address and port) and
/// its forward entry.
#[inline(never)]
fn record_flow<F: Family>(
    flow: &Flow<F::Addr>,
    start: &mut NewFlow<F::Addr>,
) -> Result<(), SnatFailure> {
    if masquerades(flow, start.hook, &start.svc, &start.backend) {
        start.ct.flags |= CT_FLAG_SNAT | CT_FLAG_REDIRECT;
        let (addr, port) = masquerade_source::<F>(flow, &start.backend, &start.ct, start.now)?;
        start.ct.nat_addr = addr;
        start.ct.nat_port = port;
    } else {
        insert_reply_entry::<F>(flow, &start.backend, &start.ct, start.now);
    }
    // Without a forward entry the flow would still work packet by packet,
    // only without backend stickiness, so a full map is not fatal.
    F::ct_insert(&start.fwd, &start.ct, start.known_absent);
    Ok(())
}

/// A new flow's conntrack flags. Direct server return is for external
/// traffic entering from the wire: a pod's own traffic to a NodePort
/// comes back through this node anyway.
#[inline(always)]
fn new_entry_flags<F: Family>(flow: &Flow<F::Addr>, svc: &Service4Value, hook: Hook) -> u16 {
    let mut flags = 0;
    if hook == Hook::Wire && svc.flags & SVC_FLAG_DSR != 0 {
        flags |= CT_FLAG_DSR;
    }
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
/// backend of the frontend; otherwise the slot the frontend's Maglev table
/// gives `flow` (a packet's flow, on a Maglev frontend), else a random
/// active slot.
#[inline(always)]
pub fn select_backend<F: Family>(
    svc: &Service4Value,
    frontend: &SvcKey<F::Addr>,
    client: &Client<F::Addr>,
    now: u64,
    flow: Option<&Flow<F::Addr>>,
) -> Option<u32> {
    if svc.affinity_timeout != 0 {
        if let Some(a) = F::affinity(client) {
            let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
            if now.saturating_sub(a.last_used_ns) < timeout_ns
                && F::backend_match(a.backend_id, svc.rev_nat_id) == Some(BACKEND_MATCH_ACTIVE)
            {
                count::<F>(stats::AFFINITY_HIT);
                return Some(a.backend_id);
            }
        }
    }
    let maglev = flow
        .filter(|_| svc.flags & SVC_FLAG_MAGLEV != 0)
        .and_then(|f| maglev_slot(svc, f));
    let backend_slot = match maglev {
        Some(slot) => slot,
        // checked_rem: no panic path (the verifier refuses one in a function).
        None => unsafe { bpf_get_prandom_u32() }.checked_rem(u32::from(svc.count))? as u16 + 1,
    };
    let slot = SvcKey {
        backend_slot,
        ..*frontend
    };
    F::service(&slot).map(|v| v.backend_id)
}

/// The backend slot the frontend's Maglev table gives the flow: None
/// without a table, or when the entry names no slot or one past `count`
/// (a table not yet rewritten after the backends shrank).
#[inline(always)]
fn maglev_slot<A: Addr>(svc: &Service4Value, flow: &Flow<A>) -> Option<u16> {
    let entry = flow_hash(flow).checked_rem(datapath_config().maglev_table_size)?;
    let rev_nat_id = svc.rev_nat_id;
    // SAFETY: array entries stay in place; the word is copied at once.
    let word = *unsafe { MAGLEV.get_value(&rev_nat_id, &(entry / MAGLEV_ENTRIES_PER_WORD)) }?;
    let slot = (word >> (16 * (entry % MAGLEV_ENTRIES_PER_WORD))) as u16;
    (slot != 0 && slot <= svc.count).then_some(slot)
}

/// A hash of the flow's 5-tuple (MurmurHash3's 32-bit mixing), the same
/// on every node, so every node's table sends the flow to one backend.
#[inline(always)]
fn flow_hash<A: Addr>(flow: &Flow<A>) -> u32 {
    let h = flow.saddr.mix_into(0);
    let h = flow.daddr.mix_into(h);
    let h = mix(h, (u32::from(flow.sport) << 16) | u32::from(flow.dport));
    let mut h = mix(h, u32::from(flow.proto));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// One 32-bit word into MurmurHash3's state `h`.
#[inline(always)]
pub fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
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
/// only a closing one, or one idle for a while, is a leftover. Not
/// inlined: its keys stay out of `handle`'s frame.
#[inline(never)]
fn forget_reply_entry_on_syn<F: Family>(flow: &Flow<F::Addr>, hook: Hook, now: u64) {
    if !opening_syn(flow) {
        return;
    }
    let key = reversed(flow);
    if hook == Hook::Wire {
        // SAFETY: only read.
        let leftover = F::ct_ptr(&key).is_none_or(|ct| unsafe {
            (*ct).flags & CT_FLAG_CLOSING != 0
                || now.saturating_sub((*ct).last_seen_ns) > CT_REFRESH_INTERVAL_NS
        });
        if !leftover {
            return;
        }
    }
    if F::ct_remove(&key) {
        count::<F>(stats::CT_REMOVED);
    }
}

/// Records the client's choice for session affinity.
#[inline(always)]
pub fn remember_affinity<F: Family>(
    svc: &Service4Value,
    client: &Client<F::Addr>,
    backend_id: u32,
    now: u64,
) {
    if svc.affinity_timeout != 0 {
        let value = Affinity4Value {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        F::remember_affinity(client, &value);
    }
}

/// The master of the frontend (addr, port, proto) in network order, in
/// the internal scope when `internal` and the frontend has two.
#[inline(always)]
pub fn lookup_service<F: Family>(
    addr: F::Addr,
    port: u16,
    proto: u8,
    internal: bool,
) -> Option<(SvcKey<F::Addr>, Service4Value)> {
    let mut frontend = SvcKey {
        addr,
        port,
        backend_slot: 0,
        proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    let svc = find_service::<F>(&mut frontend, internal)?;
    Some((frontend, svc))
}

/// The master of `frontend` (its external scope), in the internal scope
/// when `internal` and the frontend has two (`frontend` then names that
/// scope).
#[inline(always)]
pub fn find_service<F: Family>(
    frontend: &mut SvcKey<F::Addr>,
    internal: bool,
) -> Option<Service4Value> {
    let svc = F::service(frontend)?;
    if internal && svc.flags & SVC_FLAG_TWO_SCOPES != 0 {
        frontend.scope = SCOPE_INTERNAL;
        if let Some(v) = F::service(frontend) {
            return Some(v);
        }
        frontend.scope = SCOPE_EXTERNAL;
    }
    Some(svc)
}

/// A source address and port for a masqueraded flow: the node's
/// masquerade address and the next port of the ranges, in turn per
/// backend, whose reply entry is free: absent, or idle past its hold (a
/// closed flow's port waits out TIME_WAIT). The reply entry is claimed
/// here, atomically. The steps of a new flow (masquerade, reply entry,
/// translation) are functions of their own: side by side in one frame
/// their IPv6 keys and values would not fit BPF's 512 bytes of stack.
#[inline(always)]
fn masquerade_source<F: Family>(
    flow: &Flow<F::Addr>,
    backend: &Backend<F::Addr>,
    fwd: &Ct<F::Addr>,
    now: u64,
) -> Result<(F::Addr, u16), SnatFailure> {
    let addr = F::masquerade_addr();
    let ports = snat_ports();
    let total = ports.total();
    if addr == F::Addr::UNSPECIFIED || total == 0 {
        return Err(SnatFailure::Unavailable);
    }
    let cursor = F::snat_cursor(fwd.backend_id).ok_or(SnatFailure::Unavailable)?;
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
    let reply = Ct::new(
        now,
        fwd.backend_id,
        fwd.rev_nat_id(),
        fwd.flags & REPLY_ENTRY_FLAGS,
        (flow.saddr, flow.sport),
    );
    let mut key = Tuple {
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
        if claim_reply_entry::<F>(&key, &reply, now) {
            if i > 0 {
                // Past the busy ports too: a cursor a racing CPU set back
                // would otherwise lag further behind with every race,
                // until a run of 16 busy ports fails a flow.
                unsafe { *cursor = next.wrapping_add(u64::from(i) + 1) };
            }
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
fn claim_reply_entry<F: Family>(key: &Tuple<F::Addr>, reply: &Ct<F::Addr>, now: u64) -> bool {
    match F::ct_ptr(key) {
        None => F::ct_insert_new(key, reply),
        Some(p) => {
            // Read in place: a copy of the entry would cost stack.
            // SAFETY: the pointer comes from a successful lookup.
            let (flags, last_seen_ns) = unsafe { ((*p).flags, (*p).last_seen_ns) };
            let hold = ct_hold_ns(key.proto, CT_DIR_REPLY, flags);
            if now.saturating_sub(last_seen_ns) < hold {
                return false;
            }
            F::ct_insert(key, reply, false);
            true
        }
    }
}

/// The flags a reply entry takes from its forward entry.
const REPLY_ENTRY_FLAGS: u16 = CT_FLAG_SNAT | CT_FLAG_REDIRECT | CT_FLAG_OPENING | CT_FLAG_CLOSING;

#[inline(never)]
fn translate<F: Family, R: Rewriter<F>>(
    rw: &R,
    flow: &Flow<F::Addr>,
    backend: &Backend<F::Addr>,
    ct: &Ct<F::Addr>,
) -> Action {
    let dsr = ct.flags & CT_FLAG_DSR != 0;
    let with_origin = dsr && carries_dsr_option(flow);
    if with_origin {
        if let Some(mtu) = rw.dsr_option_too_big(flow) {
            count::<F>(stats::DSR_FRAG_NEEDED);
            return Action::FragNeeded(mtu);
        }
    }
    let mut done = rw.rewrite_dst(flow, backend.addr, backend.port);
    if done.is_ok() && ct.flags & CT_FLAG_SNAT != 0 {
        done = rw.rewrite_src(flow, ct.nat_addr, ct.nat_port);
    }
    if done.is_ok() {
        count_service(ct.rev_nat_id(), flow.ip_tot_len);
        if dsr {
            count::<F>(stats::DSR_FORWARDED);
        }
    }
    match rewritten::<F>(done, stats::SERVICE_FORWARDED, ct.flags & CT_FLAG_SNAT != 0) {
        Action::Translated if with_origin => Action::TranslatedWithDsrOption,
        action => action,
    }
}

/// The verdict when the hook failed to add the DSR option: dropped and
/// counted (a rewrite failed for want of room).
#[inline(always)]
pub fn dsr_option_failed<F: Family>(why: RewriteFailure) {
    count::<F>(stats::REWRITE_FAILED);
    count::<F>(why.counter());
}

/// Which packets of a DSR flow name their frontend to the backend's node:
/// a TCP flow's SYN (the backend's node keeps the reply entry it learns
/// for the connection's life) and every UDP datagram (no handshake to
/// tell a flow's first).
#[inline(always)]
fn carries_dsr_option<A>(flow: &Flow<A>) -> bool {
    flow.proto == IPPROTO_UDP || opening_syn(flow)
}

/// On a backend's node: a request another node forwarded with direct
/// server return teaches the reply entry that gives the replies the
/// frontend's address and port as source (kept in the entry's NAT
/// address and port: a NodePort frontend is the entry node's address,
/// which no map of this node holds). The option is not trusted to name
/// any address: the frontend must be one this node serves too, or a
/// NodePort of its own (`dsr_frontend`). A fresh entry of the same
/// frontend is kept, but a SYN starts anew.
#[inline(never)]
pub fn learn_dsr_reply<F: Family>(flow: &Flow<F::Addr>, frontend_addr: F::Addr, port: u16) {
    let Some(svc) = dsr_frontend::<F>(frontend_addr, port, flow.proto) else {
        count::<F>(stats::DSR_UNKNOWN_FRONTEND);
        return;
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = reversed(flow);
    if let Some(p) = F::ct_ptr(&key) {
        // SAFETY: the pointer comes from a successful lookup.
        let ours = unsafe {
            (*p).nat_addr == frontend_addr && (*p).nat_port == port && fresh(flow, &*p, now)
        };
        if ours && !opening_syn(flow) {
            if now.saturating_sub(unsafe { (*p).last_seen_ns }) > CT_REFRESH_INTERVAL_NS {
                unsafe { (*p).last_seen_ns = now };
            }
            return;
        }
    }
    let mut flags = CT_FLAG_DSR | CT_FLAG_REDIRECT;
    if opening_syn(flow) {
        flags |= CT_FLAG_OPENING;
    }
    let reply = Ct::new(now, 0, svc.rev_nat_id, flags, (frontend_addr, port));
    F::ct_insert(&key, &reply, false);
    count::<F>(stats::DSR_LEARNED);
}

/// The master of the frontend a DSR option names, if this node serves it:
/// an external frontend of its own (externalIPs and LoadBalancer addresses
/// are every node's), else, for another node's NodePort, this node's
/// NodePort of that port on its masquerade address.
#[inline(always)]
fn dsr_frontend<F: Family>(addr: F::Addr, port: u16, proto: u8) -> Option<Service4Value> {
    let external = |svc: &Service4Value| svc.flags & SVC_FLAGS_EXTERNAL != 0;
    if let Some((_, svc)) =
        lookup_service::<F>(addr, port, proto, false).filter(|(_, s)| external(s))
    {
        return Some(svc);
    }
    let (_, svc) = lookup_service::<F>(F::masquerade_addr(), port, proto, false)?;
    (svc.flags & SVC_FLAG_NODE_PORT != 0).then_some(svc)
}

/// The verdict after a flow's rewrite: counted under `counter`, and sent
/// to its egress device when `redirect` (its source became a node
/// address); dropped and counted, in total and by reason, when it failed.
#[inline(always)]
fn rewritten<F: Family>(done: Result<(), RewriteFailure>, counter: u32, redirect: bool) -> Action {
    if let Err(why) = done {
        count::<F>(stats::REWRITE_FAILED);
        count::<F>(why.counter());
        return Action::Drop;
    }
    count::<F>(counter);
    if redirect {
        Action::Redirect
    } else {
        Action::Translated
    }
}

/// The key replies of the flow `fwd` describes are matched against:
/// backend -> client, or backend -> masquerade address when masqueraded.
#[inline(always)]
fn reply_key<A: Addr>(flow: &Flow<A>, backend: &Backend<A>, fwd: &Ct<A>) -> Tuple<A> {
    let snat = fwd.flags & CT_FLAG_SNAT != 0;
    Tuple {
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
fn reply_value<F: Family>(flow: &Flow<F::Addr>, fwd: &Ct<F::Addr>, now: u64) -> Ct<F::Addr> {
    let snat = fwd.flags & CT_FLAG_SNAT != 0;
    let nat = if snat {
        (flow.saddr, flow.sport)
    } else {
        (F::Addr::UNSPECIFIED, 0)
    };
    Ct::new(
        now,
        fwd.backend_id,
        fwd.rev_nat_id(),
        fwd.flags & REPLY_ENTRY_FLAGS,
        nat,
    )
}

/// The reply entry of a new flow that is not masqueraded: its tuple
/// (backend -> this client's address and port) is now this flow's.
#[inline(always)]
fn insert_reply_entry<F: Family>(
    flow: &Flow<F::Addr>,
    backend: &Backend<F::Addr>,
    fwd: &Ct<F::Addr>,
    now: u64,
) {
    F::ct_insert(
        &reply_key(flow, backend, fwd),
        &reply_value::<F>(flow, fwd, now),
        false,
    );
}

/// Refreshes the reply entry of a flow from its forward entry, or puts it
/// back when it was evicted. An entry another flow now holds (its port
/// claimed after an eviction) is left alone. Not inlined, for the stack
/// (see `masquerade_source`).
#[inline(never)]
fn refresh_reply_entry<F: Family>(
    flow: &Flow<F::Addr>,
    backend: &Backend<F::Addr>,
    fwd: &Ct<F::Addr>,
    now: u64,
) {
    let key = reply_key(flow, backend, fwd);
    let Some(p) = F::ct_ptr(&key) else {
        F::ct_insert_new(&key, &reply_value::<F>(flow, fwd, now));
        return;
    };
    let snat = fwd.flags & CT_FLAG_SNAT != 0;
    let (nat_addr, nat_port) = if snat {
        (flow.saddr, flow.sport)
    } else {
        (F::Addr::UNSPECIFIED, 0)
    };
    // Compared in place: a copy of the entry would cost stack.
    // SAFETY: the pointer comes from a successful lookup.
    unsafe {
        let ours = (*p).backend_id == fwd.backend_id
            && (*p).rev_nat_id() == fwd.rev_nat_id()
            && (*p).nat_addr == nat_addr
            && (*p).nat_port == nat_port;
        if ours {
            (*p).last_seen_ns = now;
            (*p).flags |= fwd.flags & CT_FLAG_CLOSING;
        }
    }
}

/// A reply from a backend to a client of a Service gets the Service's
/// address and port as its source, and a masqueraded one the client's
/// address and port as its destination.
#[inline(never)]
fn reverse_nat<F: Family, R: Rewriter<F>>(
    rw: &R,
    flow: &Flow<F::Addr>,
    now: u64,
) -> Option<Action> {
    let ct_ptr = F::ct_ptr(&tuple(flow, CT_DIR_REPLY))?;
    // SAFETY: the pointer comes from a successful lookup.
    let ct = unsafe { *ct_ptr };
    // A leftover of a flow that ended must not touch a new one that reuses
    // its addresses and ports.
    if !fresh(flow, &ct, now) {
        return None;
    }
    // A reply entry learnt from a DSR option holds its frontend itself.
    let rev = if ct.flags & CT_FLAG_DSR != 0 {
        RevNat {
            addr: ct.nat_addr,
            port: ct.nat_port,
            _pad: 0,
        }
    } else {
        F::rev_nat(ct.rev_nat_id())?
    };
    update_reply_entry::<F>(flow, ct_ptr, &ct, &rev, now);
    let mut done = rw.rewrite_src(flow, rev.addr, rev.port);
    if done.is_ok() && ct.flags & CT_FLAG_SNAT != 0 {
        done = rw.rewrite_dst(flow, ct.nat_addr, ct.nat_port);
    }
    Some(rewritten::<F>(
        done,
        stats::REVERSE_NATTED,
        ct.flags & CT_FLAG_REDIRECT != 0,
    ))
}

/// Keeps a reply entry's state: open once the backend answered the SYN,
/// closing on its FIN or RST (and then its forward entry too), refreshed
/// now and then.
#[inline(always)]
fn update_reply_entry<F: Family>(
    flow: &Flow<F::Addr>,
    ct_ptr: *mut Ct<F::Addr>,
    ct: &Ct<F::Addr>,
    rev: &RevNat<F::Addr>,
    now: u64,
) {
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
        close_forward_entry::<F>(flow, ct, rev);
    }
}

/// Marks the forward entry of the flow whose reply entry is `reply`
/// closing: a SYN the client sends next on that tuple opens a new flow.
#[inline(always)]
fn close_forward_entry<F: Family>(
    flow: &Flow<F::Addr>,
    reply: &Ct<F::Addr>,
    rev: &RevNat<F::Addr>,
) {
    let snat = reply.flags & CT_FLAG_SNAT != 0;
    let key = Tuple {
        saddr: if snat { reply.nat_addr } else { flow.daddr },
        daddr: rev.addr,
        sport: if snat { reply.nat_port } else { flow.dport },
        dport: rev.port,
        proto: flow.proto,
        direction: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    if let Some(p) = F::ct_ptr(&key) {
        unsafe { (*p).flags |= CT_FLAG_CLOSING };
    }
}
