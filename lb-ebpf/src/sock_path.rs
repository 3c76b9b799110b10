//! Socket-level load balancing (cgroup sock_addr hooks): connect() and
//! sendmsg() to a Service address go straight to a backend, so the flow's
//! packets carry the backend's address and no per-packet path translates
//! them again; recvmsg() and getpeername() show the application the Service
//! address it asked for. Same maps, same choices as the packet paths.
//!
//! Written once over the family ([`SockFamily`]); the IPv6 hooks hand an
//! IPv4-mapped address (`::ffff:10.96.0.10`, a dual-stack socket reaching
//! an IPv4 Service) to the IPv4 side and map the answer back.

use aya_ebpf::{
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use lb_common::{
    stats,
    uapi::{AF_INET, AF_INET6, ECONNREFUSED},
    Ipv6Bytes, RevNatId, SockFwd4Key, SockFwd6Key, SockRev4Key, SockRev4Value, SockRev6Key,
    SockRev6Value, AFFINITY_CLIENT_NETNS, IPPROTO_TCP, IPPROTO_UDP, SOCKET_LB_ALL, SOCKET_LB_HOST,
    SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    family::{Backend, Client, Family, V4, V6},
    maps::{self, count, SOCK_FWD, SOCK_FWD6, SOCK_REV, SOCK_REV6},
    nat::{lookup_service, remember_affinity, select_backend},
};

/// Let the syscall go on (with the possibly rewritten address).
const ALLOW: i32 = 1;
/// Fail the syscall (with the error set by `bpf_set_retval`).
const REJECT: i32 = 0;

/// The socket maps of a family.
pub trait SockFamily: Family {
    /// The netns cookie as a client id (`AFFINITY_CLIENT_NETNS`).
    fn netns_client(cookie: u64) -> Self::Addr;
    /// The backend an unconnected UDP socket sends a frontend's datagrams to.
    fn kept(cookie: u64, to: &Request<Self::Addr>) -> Option<u32>;
    fn keep(cookie: u64, to: &Request<Self::Addr>, backend_id: u32);
    /// Remembers which frontend a socket's backend stands for.
    fn remember(
        cookie: u64,
        backend: &Backend<Self::Addr>,
        to: &Request<Self::Addr>,
        rev: RevNatId,
    );
    /// The frontend the socket's backend `addr:port` stands for.
    fn restored(cookie: u64, addr: Self::Addr, port: u16) -> Option<(Self::Addr, u16)>;
}

/// A connect() or sendmsg() destination: address and port in network
/// order, protocol.
#[derive(Clone, Copy)]
pub struct Request<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
}

impl SockFamily for V4 {
    #[inline(always)]
    fn netns_client(cookie: u64) -> u32 {
        (cookie ^ (cookie >> 32)) as u32
    }

    #[inline(always)]
    fn kept(cookie: u64, to: &Request<u32>) -> Option<u32> {
        // SAFETY: copied out at once.
        unsafe { SOCK_FWD.get(fwd4_key(cookie, to)) }.copied()
    }

    #[inline(always)]
    fn keep(cookie: u64, to: &Request<u32>, backend_id: u32) {
        let _ = SOCK_FWD.insert(fwd4_key(cookie, to), backend_id, 0);
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: &Backend<u32>, to: &Request<u32>, rev: RevNatId) {
        let key = SockRev4Key {
            cookie,
            addr: backend.addr,
            port: backend.port,
            _pad: 0,
        };
        let value = SockRev4Value {
            addr: to.addr,
            port: to.port,
            _pad: 0,
            rev_nat_id: rev,
        };
        let _ = SOCK_REV.insert(key, value, 0);
    }

    #[inline(always)]
    fn restored(cookie: u64, addr: u32, port: u16) -> Option<(u32, u16)> {
        let key = SockRev4Key {
            cookie,
            addr,
            port,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { SOCK_REV.get(key) }.map(|v| (v.addr, v.port))
    }
}

#[inline(always)]
fn fwd4_key(cookie: u64, to: &Request<u32>) -> SockFwd4Key {
    SockFwd4Key {
        cookie,
        addr: to.addr,
        port: to.port,
        proto: to.proto,
        _pad: 0,
    }
}

#[inline(always)]
fn fwd6_key(cookie: u64, to: &Request<Ipv6Bytes>) -> SockFwd6Key {
    SockFwd6Key {
        cookie,
        addr: to.addr,
        port: to.port,
        proto: to.proto,
        _pad: [0; 5],
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn netns_client(cookie: u64) -> Ipv6Bytes {
        [(cookie ^ (cookie >> 32)) as u32, 0, 0, 0]
    }

    #[inline(always)]
    fn kept(cookie: u64, to: &Request<Ipv6Bytes>) -> Option<u32> {
        // SAFETY: copied out at once.
        unsafe { SOCK_FWD6.get(fwd6_key(cookie, to)) }.copied()
    }

    #[inline(always)]
    fn keep(cookie: u64, to: &Request<Ipv6Bytes>, backend_id: u32) {
        let _ = SOCK_FWD6.insert(fwd6_key(cookie, to), backend_id, 0);
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: &Backend<Ipv6Bytes>, to: &Request<Ipv6Bytes>, rev: RevNatId) {
        let key = SockRev6Key {
            cookie,
            addr: backend.addr,
            port: backend.port,
            _pad: [0; 6],
        };
        let value = SockRev6Value {
            addr: to.addr,
            port: to.port,
            _pad: 0,
            rev_nat_id: rev,
        };
        let _ = SOCK_REV6.insert(key, value, 0);
    }

    #[inline(always)]
    fn restored(cookie: u64, addr: Ipv6Bytes, port: u16) -> Option<(Ipv6Bytes, u16)> {
        let key = SockRev6Key {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        };
        // SAFETY: copied out at once.
        unsafe { SOCK_REV6.get(key) }.map(|v| (v.addr, v.port))
    }
}

#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) }
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) }
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
    match request4(ctx, false) {
        Some(to) => translate::<V4>(ctx, &to, false, write4),
        None => ALLOW,
    }
}

/// sendmsg4 (unconnected UDP): each datagram's destination becomes the
/// socket's backend for that Service, chosen once and kept while it stays
/// one of the Service's backends.
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    match request4(ctx, true) {
        Some(to) => translate::<V4>(ctx, &to, true, write4),
        None => ALLOW,
    }
}

/// connect6: as connect4; an IPv4-mapped destination through the IPv4 maps.
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    translate6(ctx, false)
}

/// sendmsg6: as sendmsg4.
pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    translate6(ctx, true)
}

#[inline(always)]
fn translate6(ctx: &SockAddrContext, sticky: bool) -> i32 {
    match request6(ctx, sticky) {
        Some(Request6::Mapped(to)) => translate::<V4>(ctx, &to, sticky, write_mapped),
        Some(Request6::Native(to)) => translate::<V6>(ctx, &to, sticky, write6),
        None => ALLOW,
    }
}

#[inline(always)]
fn translate<F: SockFamily>(
    ctx: &SockAddrContext,
    to: &Request<F::Addr>,
    sticky: bool,
    write: fn(&SockAddrContext, &Backend<F::Addr>),
) -> i32 {
    let Some((frontend, svc)) = lookup_service::<F>(to.addr, to.port, to.proto, true) else {
        return ALLOW;
    };
    // The client's address is not known before the socket is bound, so
    // source ranges are left to the per-packet path.
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        return ALLOW;
    }
    if svc.count == 0 {
        count::<F>(stats::NO_BACKEND_REJECTED);
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    let cookie = socket_cookie(ctx);
    if sticky {
        let kept = F::kept(cookie, to)
            .filter(|id| F::backend_match(*id, svc.rev_nat_id).is_some())
            .and_then(F::backend);
        if let Some(backend) = kept {
            connect_to::<F>(ctx, &backend, write);
            return ALLOW;
        }
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let client = Client {
        id: F::netns_client(netns_cookie(ctx)),
        rev_nat_id: svc.rev_nat_id,
        proto: to.proto,
        kind: AFFINITY_CLIENT_NETNS,
        _pad: [0; 2],
    };
    let Some((backend_id, backend)) = select_backend::<F>(&svc, &frontend, &client, now, None)
        .and_then(|id| Some((id, F::backend(id)?)))
    else {
        count::<F>(stats::BACKEND_MISSING);
        return ALLOW;
    };
    remember_affinity::<F>(&svc, &client, backend_id, now);
    if sticky {
        F::keep(cookie, to, backend_id);
    }
    F::remember(cookie, &backend, to, svc.rev_nat_id);
    connect_to::<F>(ctx, &backend, write);
    ALLOW
}

/// Whether the hook may translate a `protocol` socket of its namespace:
/// TCP or UDP, socket LB on for the namespace. A connected UDP socket
/// translated here would stay on its backend after that backend is gone:
/// the agent closes such sockets in its own (host) namespace; in pods they
/// are left to the per-packet path, which moves them to a live backend by
/// itself.
#[inline(always)]
fn protocol_of(ctx: &SockAddrContext, protocol: u32, sticky: bool) -> Option<u8> {
    if !enabled(ctx) {
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
    Some(proto)
}

/// The destination of an IPv4 connect() or sendmsg() this hook may
/// translate.
#[inline(always)]
fn request4(ctx: &SockAddrContext, sticky: bool) -> Option<Request<u32>> {
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
    if family != u32::from(AF_INET) {
        return None;
    }
    // user_port holds the port in network order in its low 16 bits.
    Some(Request {
        addr,
        port: port as u16,
        proto: protocol_of(ctx, protocol, sticky)?,
    })
}

/// An IPv6 socket's destination: an IPv6 Service, or an IPv4-mapped one.
enum Request6 {
    Native(Request<Ipv6Bytes>),
    Mapped(Request<u32>),
}

/// `::ffff:0:0/96` as the first three words of an address in memory.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

#[inline(always)]
fn request6(ctx: &SockAddrContext, sticky: bool) -> Option<Request6> {
    let sa = ctx.sock_addr;
    // SAFETY: as in `request4`; user_ip6 is read word by word, as the
    // verifier requires.
    let (family, addr, port, protocol) = unsafe {
        (
            (*sa).user_family,
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    if family != u32::from(AF_INET6) {
        return None;
    }
    let proto = protocol_of(ctx, protocol, sticky)?;
    let port = port as u16;
    if addr[..3] == V4_MAPPED_PREFIX {
        let addr = addr[3];
        return Some(Request6::Mapped(Request { addr, port, proto }));
    }
    Some(Request6::Native(Request { addr, port, proto }))
}

/// Points the socket's destination at `backend`.
#[inline(always)]
fn connect_to<F: Family>(
    ctx: &SockAddrContext,
    backend: &Backend<F::Addr>,
    write: fn(&SockAddrContext, &Backend<F::Addr>),
) {
    write(ctx, backend);
    count::<F>(stats::SOCK_TRANSLATED);
}

fn write4(ctx: &SockAddrContext, backend: &Backend<u32>) {
    let sa = ctx.sock_addr;
    // SAFETY: as above; the verifier allows writing these fields.
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = u32::from(backend.port);
    }
}

fn write6(ctx: &SockAddrContext, backend: &Backend<Ipv6Bytes>) {
    set_ip6(ctx, backend.addr, backend.port);
}

/// An IPv4 backend for an IPv6 socket, as an IPv4-mapped address.
fn write_mapped(ctx: &SockAddrContext, backend: &Backend<u32>) {
    set_ip6(ctx, mapped(backend.addr), backend.port);
}

#[inline(always)]
fn mapped(addr: u32) -> Ipv6Bytes {
    [
        V4_MAPPED_PREFIX[0],
        V4_MAPPED_PREFIX[1],
        V4_MAPPED_PREFIX[2],
        addr,
    ]
}

#[inline(always)]
fn set_ip6(ctx: &SockAddrContext, addr: Ipv6Bytes, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: as above; written word by word, as the verifier requires.
    unsafe {
        (*sa).user_ip6[0] = addr[0];
        (*sa).user_ip6[1] = addr[1];
        (*sa).user_ip6[2] = addr[2];
        (*sa).user_ip6[3] = addr[3];
        (*sa).user_port = u32::from(port);
    }
}

/// recvmsg4 and getpeername4: a backend's address becomes the Service's
/// again, for sockets translated above.
pub fn restore4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (family, addr, port) = unsafe { ((*sa).user_family, (*sa).user_ip4, (*sa).user_port) };
    if family != u32::from(AF_INET) {
        return ALLOW;
    }
    if let Some((addr, port)) = V4::restored(socket_cookie(ctx), addr, port as u16) {
        unsafe {
            (*sa).user_ip4 = addr;
            (*sa).user_port = u32::from(port);
        }
    }
    ALLOW
}

/// recvmsg6 and getpeername6: as `restore4`, an IPv4-mapped backend
/// through the IPv4 map.
pub fn restore6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `request6`.
    let (family, addr, port) = unsafe {
        (
            (*sa).user_family,
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port as u16,
        )
    };
    if family != u32::from(AF_INET6) {
        return ALLOW;
    }
    let cookie = socket_cookie(ctx);
    let restored = if addr[..3] == V4_MAPPED_PREFIX {
        V4::restored(cookie, addr[3], port).map(|(a, p)| (mapped(a), p))
    } else {
        V6::restored(cookie, addr, port)
    };
    if let Some((addr, port)) = restored {
        set_ip6(ctx, addr, port);
    }
    ALLOW
}
