//! Service translation shared by the XDP and tc programs: reverse NAT for
//! replies, service lookup, backend selection, conntrack and DNAT. The two
//! hooks differ only in how they rewrite bytes (`Rewriter`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{
    stats, Backend4, Ct4Key, Ct4Value, Service4Key, CT_CLOSING_LIFETIME_NS, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_FLAG_CLOSING, CT_REFRESH_INTERVAL_NS, CT_TCP_LIFETIME_NS, CT_UDP_LIFETIME_NS,
    IPPROTO_TCP,
};

use crate::{
    headers::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{count, count_service, BACKENDS, CONNTRACK, REV_NAT, SERVICES},
};

pub enum Action {
    /// Not service traffic (or left to the kernel): pass untouched.
    Pass,
    /// Rewritten: pass on to the kernel's routing.
    Translated,
    /// TCP to a Service with no backend: answer with a RST.
    RejectTcp,
    Drop,
}

/// Rewrites addresses and ports with the checksum updates the hook needs.
pub trait Rewriter {
    fn rewrite_dst(&self, flow: &Flow, addr: u32, port: u16) -> Result<(), ()>;
    fn rewrite_src(&self, flow: &Flow, addr: u32, port: u16) -> Result<(), ()>;
}

#[inline(always)]
fn lifetime_ns(flow: &Flow, ct: &Ct4Value) -> u64 {
    if ct.flags & CT_FLAG_CLOSING != 0 {
        CT_CLOSING_LIFETIME_NS
    } else if flow.proto == IPPROTO_TCP {
        CT_TCP_LIFETIME_NS
    } else {
        CT_UDP_LIFETIME_NS
    }
}

#[inline(always)]
fn closing(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

#[inline(always)]
pub fn handle<R: Rewriter>(rw: &R, flow: &Flow) -> Action {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(action) = reverse_nat(rw, flow, now) {
        return action;
    }
    let svc_key = Service4Key {
        addr: flow.daddr,
        port: flow.dport,
        backend_slot: 0,
        proto: flow.proto,
        scope: 0,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once; the agent replaces whole entries.
    let Some(svc) = (unsafe { SERVICES.get(svc_key) }).copied() else {
        return Action::Pass;
    };

    let fwd_key = Ct4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    if let Some(ct_ptr) = CONNTRACK.get_ptr_mut(fwd_key) {
        // SAFETY: the pointer comes from a successful lookup.
        let ct = unsafe { *ct_ptr };
        let new_syn = flow.proto == IPPROTO_TCP
            && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && ct.flags & CT_FLAG_CLOSING != 0;
        let fresh = now.saturating_sub(ct.last_seen_ns) < lifetime_ns(flow, &ct);
        if fresh && !new_syn {
            // A flow keeps its backend for as long as that backend exists.
            if let Some(backend) = unsafe { BACKENDS.get(ct.backend_id) }.copied() {
                if closing(flow) && ct.flags & CT_FLAG_CLOSING == 0 {
                    unsafe { (*ct_ptr).flags |= CT_FLAG_CLOSING };
                }
                if now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
                    unsafe { (*ct_ptr).last_seen_ns = now };
                    // The reply entry may have been evicted under LRU pressure.
                    insert_reply_entry(flow, &backend, ct.backend_id, ct.rev_nat_id, now);
                }
                return translate(rw, flow, &backend, ct.rev_nat_id);
            }
            count(stats::BACKEND_MISSING);
        }
    }

    if svc.count == 0 {
        return if flow.proto == IPPROTO_TCP {
            count(stats::NO_BACKEND_REJECTED);
            Action::RejectTcp
        } else {
            count(stats::NO_BACKEND_DROPPED);
            Action::Drop
        };
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % svc.count as u32) as u16 + 1;
    let slot_key = Service4Key {
        backend_slot: slot,
        ..svc_key
    };
    let Some(slot_value) = (unsafe { SERVICES.get(slot_key) }).copied() else {
        count(stats::BACKEND_MISSING);
        return Action::Drop;
    };
    let Some(backend) = (unsafe { BACKENDS.get(slot_value.backend_id) }).copied() else {
        count(stats::BACKEND_MISSING);
        return Action::Drop;
    };
    let ct = Ct4Value {
        last_seen_ns: now,
        backend_id: slot_value.backend_id,
        rev_nat_id: svc.rev_nat_id,
        flags: if closing(flow) { CT_FLAG_CLOSING } else { 0 },
    };
    // Without a conntrack entry the flow would still work packet by packet,
    // only without backend stickiness, so a full map is not fatal.
    let _ = CONNTRACK.insert(fwd_key, ct, 0);
    insert_reply_entry(flow, &backend, slot_value.backend_id, svc.rev_nat_id, now);
    count(stats::CT_CREATED);
    translate(rw, flow, &backend, svc.rev_nat_id)
}

#[inline(always)]
fn translate<R: Rewriter>(rw: &R, flow: &Flow, backend: &Backend4, rev_nat_id: u16) -> Action {
    match rw.rewrite_dst(flow, backend.addr, backend.port) {
        Ok(()) => {
            count(stats::SERVICE_FORWARDED);
            count_service(rev_nat_id, flow.ip_tot_len);
            Action::Translated
        }
        Err(()) => {
            count(stats::REWRITE_FAILED);
            Action::Drop
        }
    }
}

#[inline(always)]
fn insert_reply_entry(flow: &Flow, backend: &Backend4, backend_id: u32, rev_nat_id: u16, now: u64) {
    let key = Ct4Key {
        saddr: backend.addr,
        daddr: flow.saddr,
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let value = Ct4Value {
        last_seen_ns: now,
        backend_id,
        rev_nat_id,
        flags: 0,
    };
    let _ = CONNTRACK.insert(key, value, 0);
}

/// A reply from a backend to a client of a Service gets the Service's
/// address and port as its source.
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
    let ct_ptr = CONNTRACK.get_ptr_mut(key)?;
    let ct = unsafe { *ct_ptr };
    let rev = unsafe { REV_NAT.get(ct.rev_nat_id) }.copied()?;
    if now.saturating_sub(ct.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        unsafe { (*ct_ptr).last_seen_ns = now };
    }
    Some(match rw.rewrite_src(flow, rev.addr, rev.port) {
        Ok(()) => {
            count(stats::REVERSE_NATTED);
            Action::Translated
        }
        Err(()) => {
            count(stats::REWRITE_FAILED);
            Action::Drop
        }
    })
}
