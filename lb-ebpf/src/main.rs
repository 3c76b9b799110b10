//! BPF programs of the load balancer.
//!
//! - `lb_tc_from_wire` (tc ingress, tcx) runs where packets arrive from the
//!   wire, and `lb_tc_from_pod` on the host side of pod veths. Packets there
//!   may carry only a partial checksum (a pod's, or a node's whose wire is
//!   a veth); the skb checksum helpers are right in every state.
//! - `lb_xdp_from_wire` (XDP) is the wire hook's acceleration for drivers
//!   that deliver complete checksums; it rewrites them in software.
//!
//! All share the service lookup, backend selection and conntrack in `nat`.
#![no_std]
#![no_main]

mod family;
mod headers;
mod maps;
mod nat;
mod sock_path;
mod tc_path;
mod xdp_path;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

#[xdp]
pub fn lb_xdp_from_wire(ctx: XdpContext) -> u32 {
    xdp_path::from_wire(&ctx)
}

/// Passes every packet. For the peer of a veth that receives XDP_TX or
/// XDP_REDIRECT frames (the lab's external client): veth wakes a peer's
/// receive queue for such frames only when the peer has an XDP program, so
/// without one they wait for unrelated traffic to come along.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Passes every packet: the benchmark's baseline for the tc programs.
#[classifier]
pub fn lb_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[classifier]
pub fn lb_tc_from_pod(ctx: TcContext) -> i32 {
    tc_path::from_pod(&ctx)
}

#[classifier]
pub fn lb_tc_from_wire(ctx: TcContext) -> i32 {
    tc_path::from_wire(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock_path::connect4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_path::sendmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_path::restore4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_path::restore4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock_path::connect6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_path::sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_path::restore6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_path::restore6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
