//! Socket-level load balancing (cgroup sock_addr hooks): connect() and
//! sendmsg() to a Service address go straight to a backend, so the flow's
//! packets carry the backend's address and no per-packet path translates
//! them again; recvmsg() and getpeername() show the application the Service
//! address it asked for. Same maps, same choices as the packet paths.

use aya_ebpf::{
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use lb_common::{
    config, stats, Affinity4Key, SockFwd4Key, SockRev4Key, SockRev4Value, AFFINITY_CLIENT_NETNS,
    IPPROTO_TCP, IPPROTO_UDP, SOCKET_LB_ALL, SOCKET_LB_HOST, SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    headers::AF_INET,
    maps::{self, backend, backend_match, count, SOCK_FWD, SOCK_REV},
    nat::{lookup_service, remember_affinity, select_backend},
};

const ECONNREFUSED: i32 = 111;
/// Let the syscall go on (with the possibly rewritten address).
const ALLOW: i32 = 1;
/// Fail the syscall (with the error set by `bpf_set_retval`).
const REJECT: i32 = 0;

#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) }
}

#[inline(always)]
fn host_netns_cookie() -> u64 {
    (maps::config(config::HOST_NETNS_COOKIE_HI) as u64) << 32
        | maps::config(config::HOST_NETNS_COOKIE_LO) as u64
}

#[inline(always)]
fn enabled(ctx: &SockAddrContext) -> bool {
    match maps::config(config::SOCKET_LB_MODE) {
        SOCKET_LB_ALL => true,
        SOCKET_LB_HOST => netns_cookie(ctx) == host_netns_cookie(),
        _ => false,
    }
}

/// connect4: the destination becomes a backend for the socket's life.
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    translate(ctx, false)
}

/// sendmsg4 (unconnected UDP): each datagram's destination becomes the
/// socket's backend for that Service, chosen once and kept while it stays
/// one of the Service's backends.
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    translate(ctx, true)
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, sticky: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; fields are read one by one
    // (the verifier checks each access).
    let (family, addr, port, protocol) = unsafe {
        (
            (*sa).user_family,
            (*sa).user_ip4,
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    if family != AF_INET as u32 || !enabled(ctx) {
        return ALLOW;
    }
    let proto = match protocol {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return ALLOW,
    };
    // A connected UDP socket translated here would stay on its backend
    // after that backend is gone. The agent closes such sockets in its own
    // (host) namespace; in pods they are left to the per-packet path, which
    // moves them to a live backend by itself.
    if !sticky && proto == IPPROTO_UDP && netns_cookie(ctx) != host_netns_cookie() {
        return ALLOW;
    }
    // user_port holds the port in network order in its low 16 bits.
    let port = port as u16;
    let Some((svc_key, svc)) = lookup_service(addr, port, proto, true) else {
        return ALLOW;
    };
    // The client's address is not known before the socket is bound, so
    // source ranges are left to the per-packet path.
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        return ALLOW;
    }
    if svc.count == 0 {
        count(stats::NO_BACKEND_REJECTED);
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let sock_cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    let fwd_key = SockFwd4Key {
        cookie: sock_cookie,
        addr,
        port,
        proto,
        _pad: 0,
    };
    if sticky {
        if let Some(id) = unsafe { SOCK_FWD.get(fwd_key) }.copied() {
            if backend_match(id, svc.rev_nat_id).is_some() {
                if let Some(backend) = backend(id) {
                    unsafe {
                        (*sa).user_ip4 = backend.addr;
                        (*sa).user_port = backend.port as u32;
                    }
                    count(stats::SOCK_TRANSLATED);
                    return ALLOW;
                }
            }
        }
    }
    let cookie = netns_cookie(ctx);
    let client = Affinity4Key {
        client: (cookie ^ (cookie >> 32)) as u32,
        rev_nat_id: svc.rev_nat_id,
        proto,
        client_kind: AFFINITY_CLIENT_NETNS,
    };
    let Some(backend_id) = select_backend(&svc, &svc_key, &client, now) else {
        count(stats::BACKEND_MISSING);
        return ALLOW;
    };
    let Some(backend) = backend(backend_id) else {
        count(stats::BACKEND_MISSING);
        return ALLOW;
    };
    remember_affinity(&svc, &client, backend_id, now);
    if sticky {
        let _ = SOCK_FWD.insert(fwd_key, backend_id, 0);
    }
    let key = SockRev4Key {
        cookie: sock_cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let value = SockRev4Value {
        addr,
        port,
        rev_nat_id: svc.rev_nat_id,
    };
    let _ = SOCK_REV.insert(key, value, 0);
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = backend.port as u32;
    }
    count(stats::SOCK_TRANSLATED);
    ALLOW
}

/// recvmsg4 and getpeername4: a backend's address becomes the Service's
/// again, for sockets translated above.
pub fn restore(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (family, addr, port) = unsafe { ((*sa).user_family, (*sa).user_ip4, (*sa).user_port) };
    if family != AF_INET as u32 {
        return ALLOW;
    }
    let key = SockRev4Key {
        cookie: unsafe { bpf_get_socket_cookie(sa as *mut _) },
        addr,
        port: port as u16,
        _pad: 0,
    };
    if let Some(v) = unsafe { SOCK_REV.get(key) }.copied() {
        unsafe {
            (*sa).user_ip4 = v.addr;
            (*sa).user_port = v.port as u32;
        }
    }
    ALLOW
}
