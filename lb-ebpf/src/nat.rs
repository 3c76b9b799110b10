//! Service translation shared by the XDP and tc programs: reverse NAT for
//! replies, service lookup, source ranges, backend selection (session
//! affinity, random otherwise), masquerade, conntrack and DNAT. The two
//! hooks differ only in how they rewrite bytes (`Rewriter`) and in whether
//! the packet comes from outside the node or from one of its pods (`Hook`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use lb_common::{
    config, stats, Affinity4Key, Affinity4Value, Backend4, Ct4Key, Ct4Value, Service4Key,
    Service4Value, AFFINITY_CLIENT_ADDR, BACKEND_MATCH_ACTIVE, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_FLAG_CLOSING, CT_FLAG_REDIRECT, CT_FLAG_SNAT, CT_REFRESH_INTERVAL_NS, IPPROTO_TCP,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SNAT_PORT_COUNT, SNAT_PORT_MIN, SNAT_PORT_TRIES,
    SVC_FLAGS_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use crate::{
    headers::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{
        self, backend, backend_match, conntrack_insert, conntrack_ptr, count, count_service,
        source_allowed, AFFINITY, CONNTRACK, CONNTRACK_PREV, REV_NAT, SERVICES,
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
/// rejected), or `drop` when it could not build one (counted as dropped).
#[inline(always)]
pub fn rejected<T>(answer: Result<T, ()>, drop: T) -> T {
    match answer {
        Ok(action) => {
            count(stats::NO_BACKEND_REJECTED);
            action
        }
        Err(()) => {
            count(stats::NO_BACKEND_DROPPED);
            drop
        }
    }
}

/// Rewrites addresses and ports with the checksum updates the hook needs.
pub trait Rewriter {
    fn rewrite_dst(&self, flow: &Flow, addr: u32, port: u16) -> Result<(), ()>;
    fn rewrite_src(&self, flow: &Flow, addr: u32, port: u16) -> Result<(), ()>;
}

#[inline(always)]
fn lifetime_ns(flow: &Flow, ct: &Ct4Value) -> u64 {
    lb_common::ct_lifetime_ns(flow.proto, ct.flags)
}

#[inline(always)]
fn closing(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

#[inline(always)]
pub fn handle<R: Rewriter>(rw: &R, flow: &Flow, hook: Hook) -> Action {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The service lookup comes first, as in Cilium: packets to a Service
    // skip the reply lookup. A reply's destination is a client (or the
    // masquerade address on a port above the NodePort range), never a
    // Service frontend, so no reply is taken for Service traffic.
    let Some((svc_key, svc)) =
        lookup_service(flow.daddr, flow.dport, flow.proto, hook == Hook::Pod)
    else {
        if let Some(action) = reverse_nat(rw, flow, now) {
            return action;
        }
        forget_reply_entry_on_syn(flow);
        return Action::Pass;
    };
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(svc.rev_nat_id, flow.saddr) {
        count(stats::SOURCE_RANGE_DROPPED);
        return Action::Drop;
    }

    let fwd_key = Ct4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let found = conntrack_ptr(&fwd_key);
    if let Some(ct_ptr) = found {
        // SAFETY: the pointer comes from a successful lookup.
        let ct = unsafe { *ct_ptr };
        let new_syn = flow.proto == IPPROTO_TCP
            && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && ct.flags & CT_FLAG_CLOSING != 0;
        let fresh = now.saturating_sub(ct.last_seen_ns) < lifetime_ns(flow, &ct);
        if fresh && !new_syn {
            // A flow keeps its backend for as long as that backend exists.
            // A UDP flow has no end that would let go of it, so it moves as
            // soon as the backend leaves its Service (kube-proxy flushes such
            // UDP conntrack entries); a TCP connection runs to its end.
            let live = backend(ct.backend_id).filter(|_| {
                flow.proto == IPPROTO_TCP || backend_match(ct.backend_id, ct.rev_nat_id).is_some()
            });
            if let Some(backend) = live {
                if closing(flow) && ct.flags & CT_FLAG_CLOSING == 0 {
                    unsafe { (*ct_ptr).flags |= CT_FLAG_CLOSING };
                }
                if now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
                    unsafe { (*ct_ptr).last_seen_ns = now };
                    // The reply entry may have been evicted under LRU pressure.
                    insert_reply_entry(flow, &backend, &ct, now);
                }
                return translate(rw, flow, &backend, &ct);
            }
            count(stats::BACKEND_MISSING);
        }
    }

    if svc.count == 0 {
        return if hook == Hook::Wire && svc.flags & SVC_FLAG_EXTERNAL_LOCAL != 0 {
            // Like kube-proxy: no local endpoint for Local external traffic
            // is a drop (the load balancer's health check steers away).
            count(stats::NO_LOCAL_BACKEND_DROPPED);
            Action::Drop
        } else if flow.proto == IPPROTO_TCP {
            Action::RejectTcp
        } else {
            Action::RejectUdp
        };
    }
    let client = Affinity4Key {
        client: flow.saddr,
        rev_nat_id: svc.rev_nat_id,
        proto: flow.proto,
        client_kind: AFFINITY_CLIENT_ADDR,
    };
    let Some(backend_id) = select_backend(&svc, &svc_key, &client, now) else {
        count(stats::BACKEND_MISSING);
        return Action::Drop;
    };
    let Some(backend) = backend(backend_id) else {
        count(stats::BACKEND_MISSING);
        return Action::Drop;
    };
    remember_affinity(&svc, &client, backend_id, now);

    // External traffic is masqueraded unless its policy is Local, so replies
    // come back through this node; a pod reaching itself through a Service
    // is too, or its own address would arrive as a source from outside.
    let external = svc.flags & SVC_FLAGS_EXTERNAL != 0;
    let hairpin = backend.addr == flow.saddr;
    let masquerade =
        hairpin || (hook == Hook::Wire && external && svc.flags & SVC_FLAG_EXTERNAL_LOCAL == 0);
    let mut ct = Ct4Value {
        last_seen_ns: now,
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        flags: if closing(flow) { CT_FLAG_CLOSING } else { 0 },
        nat_addr: 0,
        nat_port: 0,
        _pad: 0,
    };
    if external {
        ct.flags |= CT_FLAG_REDIRECT;
    }
    if masquerade {
        let Some((addr, port)) = masquerade_source(flow, &backend, now) else {
            count(stats::SNAT_FAILED);
            return Action::Drop;
        };
        ct.flags |= CT_FLAG_SNAT | CT_FLAG_REDIRECT;
        ct.nat_addr = addr;
        ct.nat_port = port;
    }
    // Without a conntrack entry the flow would still work packet by packet,
    // only without backend stickiness, so a full map is not fatal (except
    // for masqueraded flows, whose replies need it).
    conntrack_insert(&fwd_key, &ct, found.is_none());
    insert_reply_entry(flow, &backend, &ct, now);
    count(stats::CT_CREATED);
    translate(rw, flow, &backend, &ct)
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
            let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
            if now.saturating_sub(a.last_used_ns) < timeout_ns
                && backend_match(a.backend_id, svc.rev_nat_id) == Some(BACKEND_MATCH_ACTIVE)
            {
                count(stats::AFFINITY_HIT);
                return Some(a.backend_id);
            }
        }
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % svc.count as u32) as u16 + 1;
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
#[inline(always)]
fn forget_reply_entry_on_syn(flow: &Flow) {
    if flow.proto != IPPROTO_TCP || flow.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
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
    if CONNTRACK.remove(&key).is_ok() {
        count(stats::CT_REMOVED);
    }
    // While a migration runs, the old map would hand the entry back.
    let _ = CONNTRACK_PREV.remove(&key);
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
    let key = Service4Key {
        addr,
        port,
        backend_slot: 0,
        proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once; the agent replaces whole entries.
    let svc = (unsafe { SERVICES.get(key) }).copied()?;
    if internal && svc.flags & SVC_FLAG_TWO_SCOPES != 0 {
        let internal_key = Service4Key {
            scope: SCOPE_INTERNAL,
            ..key
        };
        if let Some(v) = (unsafe { SERVICES.get(internal_key) }).copied() {
            return Some((internal_key, v));
        }
    }
    Some((key, svc))
}

/// A source address and port for a masqueraded flow: the node's
/// masquerade address and a port whose reply tuple is free (or stale).
#[inline(always)]
fn masquerade_source(flow: &Flow, backend: &Backend4, now: u64) -> Option<(u32, u16)> {
    let addr = maps::config(config::MASQUERADE_ADDR);
    if addr == 0 {
        return None;
    }
    // Start where the client's own tuple hashes to, so a client's flows
    // spread over the range without a shared cursor.
    // Multiplicative hashing leaves the high bits best mixed; then probe
    // consecutive ports.
    let start = (flow.saddr ^ ((flow.sport as u32) << 16) ^ flow.dport as u32)
        .wrapping_mul(0x9e37_79b1)
        >> 16;
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        let port = (SNAT_PORT_MIN + ((start + i) % SNAT_PORT_COUNT as u32) as u16).to_be();
        let key = Ct4Key {
            saddr: backend.addr,
            daddr: addr,
            sport: backend.port,
            dport: port,
            proto: flow.proto,
            direction: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        // SAFETY: the pointer comes from a successful lookup.
        match conntrack_ptr(&key).map(|p| unsafe { &*p }) {
            None => return Some((addr, port)),
            Some(ct) if now.saturating_sub(ct.last_seen_ns) >= lifetime_ns(flow, ct) => {
                return Some((addr, port))
            }
            Some(_) => {}
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn translate<R: Rewriter>(rw: &R, flow: &Flow, backend: &Backend4, ct: &Ct4Value) -> Action {
    let mut done = rw.rewrite_dst(flow, backend.addr, backend.port);
    if done.is_ok() && ct.flags & CT_FLAG_SNAT != 0 {
        done = rw.rewrite_src(flow, ct.nat_addr, ct.nat_port);
    }
    match done {
        Ok(()) => {
            count(stats::SERVICE_FORWARDED);
            count_service(ct.rev_nat_id, flow.ip_tot_len);
            if ct.flags & CT_FLAG_SNAT != 0 {
                Action::Redirect
            } else {
                Action::Translated
            }
        }
        Err(()) => {
            count(stats::REWRITE_FAILED);
            Action::Drop
        }
    }
}

/// The entry replies of the flow `fwd` describes are matched against:
/// backend -> client, or backend -> masquerade address when masqueraded.
#[inline(always)]
fn insert_reply_entry(flow: &Flow, backend: &Backend4, fwd: &Ct4Value, now: u64) {
    let snat = fwd.flags & CT_FLAG_SNAT != 0;
    let key = Ct4Key {
        saddr: backend.addr,
        daddr: if snat { fwd.nat_addr } else { flow.saddr },
        sport: backend.port,
        dport: if snat { fwd.nat_port } else { flow.sport },
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let value = Ct4Value {
        last_seen_ns: now,
        backend_id: fwd.backend_id,
        rev_nat_id: fwd.rev_nat_id,
        flags: fwd.flags & (CT_FLAG_SNAT | CT_FLAG_REDIRECT),
        nat_addr: if snat { flow.saddr } else { 0 },
        nat_port: if snat { flow.sport } else { 0 },
        _pad: 0,
    };
    conntrack_insert(&key, &value, false);
}

/// A reply from a backend to a client of a Service gets the Service's
/// address and port as its source, and a masqueraded one the client's
/// address and port as its destination.
#[inline(always)]
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
    let ct = unsafe { *ct_ptr };
    // A leftover of a flow that ended must not touch a new one that reuses
    // its addresses and ports.
    if now.saturating_sub(ct.last_seen_ns) >= lifetime_ns(flow, &ct) {
        return None;
    }
    let rev = unsafe { REV_NAT.get(ct.rev_nat_id) }.copied()?;
    if closing(flow) && ct.flags & CT_FLAG_CLOSING == 0 {
        unsafe { (*ct_ptr).flags |= CT_FLAG_CLOSING };
    }
    if now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        unsafe { (*ct_ptr).last_seen_ns = now };
    }
    let mut done = rw.rewrite_src(flow, rev.addr, rev.port);
    if done.is_ok() && ct.flags & CT_FLAG_SNAT != 0 {
        done = rw.rewrite_dst(flow, ct.nat_addr, ct.nat_port);
    }
    Some(match done {
        Ok(()) => {
            count(stats::REVERSE_NATTED);
            if ct.flags & CT_FLAG_REDIRECT != 0 {
                Action::Redirect
            } else {
                Action::Translated
            }
        }
        Err(()) => {
            count(stats::REWRITE_FAILED);
            Action::Drop
        }
    })
}
