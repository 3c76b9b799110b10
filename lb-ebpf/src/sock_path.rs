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
    stats,
    uapi::{AF_INET, ECONNREFUSED},
    SockFwd4Key, SockRev4Key, SockRev4Value, AFFINITY_CLIENT_NETNS, IPPROTO_TCP, IPPROTO_UDP,
    SOCKET_LB_ALL, SOCKET_LB_HOST, SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    family::{Client, V4},
    maps::{self, backend, backend_match, count, SOCK_FWD, SOCK_REV},
    nat::{lookup_service, remember_affinity, select_backend},
};

/// Let the syscall go on (with the possibly rewritten address).
const ALLOW: i32 = 1;
/// Fail the syscall (with the error set by `bpf_set_retval`).
const REJECT: i32 = 0;

#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) }
}

#[inline(always)]
fn enabled(ctx: &SockAddrContext) -> bool {
    let config = maps::datapath_config();
    match config.socket_lb_mode {
        SOCKET_LB_ALL => true,
        SOCKET_LB_HOST => netns_cookie(ctx) == config.host_netns_cookie,
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
    let Some((addr, port, proto)) = service_request(ctx, sticky) else {
        return ALLOW;
    };
    let Some((frontend, svc)) = lookup_service::<V4>(addr, port, proto, true) else {
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
    let sa = ctx.sock_addr;
    let fwd_key = SockFwd4Key {
        cookie: unsafe { bpf_get_socket_cookie(sa as *mut _) },
        addr,
        port,
        proto,
        _pad: 0,
    };
    if sticky {
        if let Some(backend) = kept_backend(&fwd_key, svc.rev_nat_id) {
            connect_to(ctx, &backend);
            return ALLOW;
        }
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cookie = netns_cookie(ctx);
    let client = Client {
        id: (cookie ^ (cookie >> 32)) as u32,
        rev_nat_id: svc.rev_nat_id,
        proto,
        kind: AFFINITY_CLIENT_NETNS,
    };
    let Some((backend_id, backend)) =
        select_backend::<V4>(&svc, &frontend, &client, now).and_then(|id| Some((id, backend(id)?)))
    else {
        count(stats::BACKEND_MISSING);
        return ALLOW;
    };
    remember_affinity::<V4>(&svc, &client, backend_id, now);
    if sticky {
        let _ = SOCK_FWD.insert(fwd_key, backend_id, 0);
    }
    let key = SockRev4Key {
        cookie: fwd_key.cookie,
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
    connect_to(ctx, &backend);
    ALLOW
}

/// The destination (address, port in network order, protocol) of a
/// connect() or sendmsg() this hook may translate: IPv4 TCP or UDP, socket
/// LB on for the socket's namespace. A connected UDP socket translated
/// here would stay on its backend after that backend is gone: the agent
/// closes such sockets in its own (host) namespace; in pods they are left
/// to the per-packet path, which moves them to a live backend by itself.
#[inline(always)]
fn service_request(ctx: &SockAddrContext, sticky: bool) -> Option<(u32, u16, u8)> {
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
    if family != u32::from(AF_INET) || !enabled(ctx) {
        return None;
    }
    let proto = [IPPROTO_TCP, IPPROTO_UDP]
        .into_iter()
        .find(|p| u32::from(*p) == protocol)?;
    if !sticky
        && proto == IPPROTO_UDP
        && netns_cookie(ctx) != maps::datapath_config().host_netns_cookie
    {
        return None;
    }
    // user_port holds the port in network order in its low 16 bits.
    Some((addr, port as u16, proto))
}

/// The backend an unconnected UDP socket already sends this Service's
/// datagrams to, while it is still one of the Service's backends.
#[inline(always)]
fn kept_backend(fwd_key: &SockFwd4Key, rev_nat_id: u16) -> Option<lb_common::Backend4> {
    let id = unsafe { SOCK_FWD.get(*fwd_key) }.copied()?;
    backend_match(id, rev_nat_id)?;
    backend(id)
}

/// Points the socket's destination at `backend`.
#[inline(always)]
fn connect_to(ctx: &SockAddrContext, backend: &lb_common::Backend4) {
    let sa = ctx.sock_addr;
    // SAFETY: as above; the verifier allows writing these two fields.
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = u32::from(backend.port);
    }
    count(stats::SOCK_TRANSLATED);
}

/// recvmsg4 and getpeername4: a backend's address becomes the Service's
/// again, for sockets translated above.
pub fn restore(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (family, addr, port) = unsafe { ((*sa).user_family, (*sa).user_ip4, (*sa).user_port) };
    if family != u32::from(AF_INET) {
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
            (*sa).user_port = u32::from(v.port);
        }
    }
    ALLOW
}
