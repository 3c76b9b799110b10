//! tc ingress (tcx), on the host side of pod veths and on interfaces facing
//! the wire. A packet's L4 checksum may be only partial there (the sender's
//! stack left it to "hardware": a pod, or a node whose wire is a veth, as in
//! kind), a state XDP cannot see, so every L4 checksum update goes through
//! the skb checksum helpers, which update the field correctly in every
//! state (partial, complete, or verified by the NIC). Addresses, ports and
//! the IPv4 header checksum (never partial) are written in place, as the
//! store helper would write them.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET, bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    helpers::{
        bpf_csum_diff, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head,
        bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    programs::TcContext,
};
use lb_common::{
    csum,
    icmp::{self, Unreachable},
    icmp6::{self, Unreachable6},
    stats::{RejectFailure, RewriteFailure},
    uapi::{AF_INET, AF_INET6, ETH_P_IPV6, IPPROTO_DSTOPTS},
    Ipv6Bytes, DSR_HEADER6_LEN, DSR_OPTION_LEN, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    family::{V4, V6},
    headers::{
        dsr_header6, dsr_origin, dsr_origin6, ipv4, ipv6, l3, parse4, parse6, ptr_at, tcp,
        with_dsr_option, Flow, Flow4, Flow6, Parsed, ETH_HLEN, ETH_TYPE_OFF, IP6_DADDR_OFF,
        IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_DF, IP_HLEN, IP_OFF, IP_SADDR_OFF,
        IP_TOT_LEN_OFF, L3, L4_DPORT_OFF, L4_OFF, L4_SPORT_OFF, TCP_HLEN,
    },
    maps::FLOW6_SCRATCH,
    nat::{self, Action, Hook, Rewriter},
    xdp_path::{flow_of, reset_header, tcp_header_len},
};

/// tc verdicts as the classifier returns them.
const OK: i32 = TC_ACT_OK;
const SHOT: i32 = TC_ACT_SHOT;

/// tc on a pod's veth: packets the pod sends.
pub fn from_pod(ctx: &TcContext) -> i32 {
    handle(ctx, Hook::Pod)
}

/// tc on an interface facing the wire: packets from other machines.
pub fn from_wire(ctx: &TcContext) -> i32 {
    handle(ctx, Hook::Wire)
}

#[inline(always)]
fn handle(ctx: &TcContext, hook: Hook) -> i32 {
    // Direct packet access needs the headers in the linear part of the skb:
    // an IPv6 header and TCP's (an IPv4 packet's fit in that).
    let want = ((IP_OFF + ipv6::HLEN + TCP_HLEN) as u32).min(ctx.len());
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(want);
    }
    match l3(ctx.data(), ctx.data_end()) {
        L3::Ipv4 => handle4(ctx, hook),
        L3::Ipv6 => handle6(ctx, hook),
        L3::Other => OK,
    }
}

/// Each family's path in a function of its own: inlined side by side their
/// frames would add up past BPF's 512 bytes of stack.
#[inline(never)]
fn handle4(ctx: &TcContext, hook: Hook) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let parsed = parse4(start, end);
    if let Parsed::DsrRequest(flow) = parsed {
        if let Some(origin) = dsr_origin(start, end).filter(|_| hook == Hook::Wire) {
            nat::learn_dsr_reply::<V4>(&flow, origin.addr, origin.port);
        }
        return OK;
    }
    let Some(flow) = flow_of::<V4, _>(parsed) else {
        return OK;
    };
    let rw = TcRewriter { ctx };
    match nat::handle::<V4, _>(&rw, &flow, hook) {
        // From a pod, a node address as source would look spoofed to input
        // routing; from the wire the agent lets it in (accept_local), as
        // it does for XDP, and the kernel routes it on.
        Action::Redirect if hook == Hook::Pod => redirect_to_egress4(ctx),
        Action::Pass | Action::Translated | Action::Redirect => OK,
        Action::Drop => SHOT,
        Action::RejectTcp => nat::rejected::<V4, _>(tcp_reset(ctx, &flow), SHOT),
        Action::RejectUdp => nat::rejected::<V4, _>(udp_unreachable(ctx, Unreachable::PORT), SHOT),
        Action::TranslatedWithDsrOption => match push_dsr_option(ctx, &flow) {
            Ok(()) => OK,
            Err(why) => {
                nat::dsr_option_failed::<V4>(why);
                SHOT
            }
        },
        // Counted as dsr_frag_needed (see the XDP hook).
        Action::FragNeeded(mtu) => {
            udp_unreachable(ctx, Unreachable::frag_needed(mtu)).unwrap_or(SHOT)
        }
    }
}

#[inline(never)]
fn handle6(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(scratch) = FLOW6_SCRATCH.get_ptr_mut(0) else {
        return OK;
    };
    // SAFETY: this CPU's slot, no other user while the program runs.
    let scratch = unsafe { &mut *scratch };
    let flow = &mut scratch.flow;
    let parsed = parse6_linear(ctx, flow);
    let dsr_request = matches!(parsed, Parsed::DsrRequest(()));
    if !dsr_request && flow_of::<V6, _>(parsed).is_none() {
        return OK;
    }
    // Both addresses in one copy, straight into the flow (see `parse6`).
    let addrs = (&raw mut flow.saddr).cast::<core::ffi::c_void>();
    let len = 2 * core::mem::size_of::<Ipv6Bytes>() as u32;
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, IP6_SADDR_OFF as u32, addrs, len) } != 0
    {
        return OK;
    }
    let flow = &scratch.flow;
    if dsr_request {
        let origin = dsr_origin6(ctx.data(), ctx.data_end()).filter(|_| hook == Hook::Wire);
        if let Some((addr, port)) = origin {
            nat::learn_dsr_reply::<V6>(flow, addr, port);
        }
        return OK;
    }
    let rw = TcRewriter { ctx };
    match nat::handle::<V6, _>(&rw, flow, hook) {
        // IPv6 has no accept_local: a node address as source is dropped by
        // input routing from the wire too, so both hooks send it out.
        Action::Redirect => redirect_to_egress6(ctx),
        Action::Pass | Action::Translated => OK,
        Action::TranslatedWithDsrOption => match push_dsr_header6(ctx, flow) {
            Ok(()) => OK,
            Err(why) => {
                nat::dsr_option_failed::<V6>(why);
                SHOT
            }
        },
        Action::Drop => SHOT,
        Action::RejectTcp => nat::rejected::<V6, _>(tcp_reset6(ctx, flow), SHOT),
        Action::RejectUdp => {
            nat::rejected::<V6, _>(udp_unreachable6(ctx, flow, Unreachable6::PORT), SHOT)
        }
        // Counted as dsr_frag_needed (see the XDP hook).
        Action::FragNeeded(mtu) => {
            let too_big = Unreachable6::packet_too_big(u32::from(mtu));
            udp_unreachable6(ctx, flow, too_big).unwrap_or(SHOT)
        }
    }
}

/// Most header bytes pulled into the linear part of the skb for an IPv6
/// packet whose extension headers reach past the first pull.
const MAX_HEADERS_PULL: u32 = 256;

/// IPv6 extension headers may reach past the first pull: a packet that
/// has some gets a larger one before it is parsed.
#[inline(always)]
fn parse6_linear(ctx: &TcContext, out: &mut Flow6) -> Parsed<()> {
    let next = ctx
        .load::<u8>(IP_OFF + ipv6::NEXT_HEADER)
        .unwrap_or(IPPROTO_TCP);
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let more = ctx.len().min(MAX_HEADERS_PULL);
    if next != IPPROTO_TCP && next != IPPROTO_UDP && linear < more {
        let _ = ctx.pull_data(more);
    }
    parse6(ctx.data(), ctx.data_end(), out)
}

/// Turns a UDP datagram to a Service without backends into an ICMP port
/// unreachable, sent back where it came from (see lb_common::icmp for why the
/// quoted checksum is predicted rather than copied). Not inlined, like
/// `tcp_reset`: their buffers stay out of the translation's frame.
#[inline(never)]
fn udp_unreachable(ctx: &TcContext, why: Unreachable) -> Result<i32, RejectFailure> {
    let eth: [u8; icmp::ETH_LEN] = ctx.load(0).map_err(|_| RejectFailure::OutOfBounds)?;
    let ip: [u8; icmp::IP_LEN] = ctx.load(IP_OFF).map_err(|_| RejectFailure::OutOfBounds)?;
    let udp: [u8; icmp::QUOTED_L4_LEN] =
        ctx.load(L4_OFF).map_err(|_| RejectFailure::OutOfBounds)?;
    let check = icmp::quoted_udp_check(&ip, &udp);
    let mut head = icmp::port_unreachable_head(&eth, &ip, &udp, check);
    why.apply(&mut head);
    if unsafe { bpf_skb_change_head(ctx.skb.skb, icmp::GROW as u32, 0) } != 0 {
        return Err(RejectFailure::Resize);
    }
    ctx.store(0, &head, 0).map_err(|_| RejectFailure::Store)?;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, icmp::PORT_UNREACHABLE_LEN as u32, 0) } != 0 {
        return Err(RejectFailure::Resize);
    }
    redirect_back(ctx)
}

/// Out of the interface the packet came in by: into the pod that sent it,
/// or back onto the wire towards the client.
#[inline(always)]
fn redirect_back(ctx: &TcContext) -> Result<i32, RejectFailure> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ret = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if ret != TC_ACT_REDIRECT {
        return Err(RejectFailure::Redirect);
    }
    Ok(ret)
}

/// Sends a translated packet straight out of the device the FIB routes its
/// new destination to. Its source may now be a node address (a NodePort
/// reply, a masqueraded flow), which the kernel's input routing would drop
/// as spoofed on a pod's veth. Without a route it goes to the stack.
#[inline(never)]
fn redirect_to_egress4(ctx: &TcContext) -> i32 {
    let Ok(addrs) = ctx.load::<[u32; 2]>(IP_SADDR_OFF) else {
        return OK;
    };
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions).
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_3.ipv4_src = addrs[0];
    params.__bindgen_anon_4.ipv4_dst = addrs[1];
    redirect_by_fib(ctx, &mut params)
}

/// As `redirect_to_egress4`, for IPv6.
#[inline(never)]
fn redirect_to_egress6(ctx: &TcContext) -> i32 {
    let Ok(addrs) = ctx.load::<[[u32; 4]; 2]>(IP6_SADDR_OFF) else {
        return OK;
    };
    // SAFETY: as in `redirect_to_egress4`.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.__bindgen_anon_3.ipv6_src = addrs[0];
    params.__bindgen_anon_4.ipv6_dst = addrs[1];
    redirect_by_fib(ctx, &mut params)
}

#[inline(always)]
fn redirect_by_fib(ctx: &TcContext, params: &mut FibParams) -> i32 {
    // tot_len 0 skips the MTU check: pod packets may be GSO super-frames.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The neighbour is bpf_redirect_neigh's to resolve: with SKIP_NEIGH the
    // lookup succeeds whether or not the next hop's address is known yet.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return OK;
    }
    // The neighbour subsystem resolves the next hop's MAC address.
    unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

struct TcRewriter<'a> {
    ctx: &'a TcContext,
}

/// Which end of the packet a rewrite changes: where its address and port
/// sit and what they hold now.
struct End<A> {
    addr_off: usize,
    port_off: usize,
    old_addr: A,
    old_port: u16,
}

impl TcRewriter<'_> {
    /// See `nat::too_big_by`.
    #[inline(always)]
    fn too_big_by(&self, grow: u8) -> Option<u16> {
        nat::too_big_by(self.ctx.skb.skb.cast(), grow)
    }

    /// UDP's zero checksum means "none" over IPv4: the helper leaves it so.
    #[inline(always)]
    fn mangled<A>(flow: &crate::headers::Flow<A>) -> u64 {
        if flow.proto == IPPROTO_TCP {
            0
        } else {
            u64::from(BPF_F_MARK_MANGLED_0)
        }
    }

    /// A header field of the packet, written in place: the linear part
    /// holds every header the parse read. Written before the checksum
    /// helpers run (they move the packet under any pointer taken before).
    #[inline(always)]
    fn field<T>(&self, offset: usize) -> Result<*mut T, RewriteFailure> {
        ptr_at::<T>(self.ctx.data(), self.ctx.data_end(), offset).ok_or(RewriteFailure::OutOfBounds)
    }

    /// The L4 checksum's update for a changed port, after the port.
    #[inline(always)]
    fn port_checksum<A>(
        &self,
        flow: &crate::headers::Flow<A>,
        end: &End<A>,
        port: u16,
    ) -> Result<(), RewriteFailure> {
        self.ctx
            .l4_csum_replace(
                flow.l4_csum_off,
                u64::from(end.old_port),
                u64::from(port),
                Self::mangled(flow) | 2,
            )
            .map_err(|_| RewriteFailure::Checksum)
    }

    /// The IPv4 header checksum is always whole (never left to the NIC):
    /// updated here with the address, in place.
    #[inline(always)]
    fn rewrite4(
        &self,
        flow: &Flow4,
        end: End<u32>,
        addr: u32,
        port: u16,
    ) -> Result<(), RewriteFailure> {
        let ip_addr = self.field::<u32>(end.addr_off)?;
        let ip_csum = self.field::<u16>(IP_CSUM_OFF)?;
        let l4_port = self.field::<u16>(end.port_off)?;
        // SAFETY: every pointer was bounds checked above.
        unsafe {
            let c = csum::replace4(ip_csum.read_unaligned(), end.old_addr, addr);
            ip_csum.write_unaligned(c);
            ip_addr.write_unaligned(addr);
            l4_port.write_unaligned(port);
        }
        // Addresses are in the pseudo header: with BPF_F_PSEUDO_HDR the helper
        // also fixes a partial checksum, which covers only that header.
        self.ctx
            .l4_csum_replace(
                flow.l4_csum_off,
                u64::from(end.old_addr),
                u64::from(addr),
                u64::from(BPF_F_PSEUDO_HDR) | Self::mangled(flow) | 4,
            )
            .map_err(|_| RewriteFailure::Checksum)?;
        self.port_checksum(flow, &end, port)
    }

    /// A 16-byte address does not fit the helper's 2- or 4-byte update: its
    /// difference goes in as a sum (size 0), still as a pseudo header field.
    #[inline(always)]
    fn rewrite6(
        &self,
        flow: &Flow6,
        end: End<Ipv6Bytes>,
        addr: Ipv6Bytes,
        port: u16,
    ) -> Result<(), RewriteFailure> {
        let ip_addr = self.field::<Ipv6Bytes>(end.addr_off)?;
        let l4_port = self.field::<u16>(end.port_off)?;
        // SAFETY: both pointers were bounds checked above.
        unsafe {
            ip_addr.write_unaligned(addr);
            l4_port.write_unaligned(port);
        }
        let diff = csum::diff16(&end.old_addr, &addr);
        self.ctx
            .l4_csum_replace(
                flow.l4_csum_off,
                0,
                u64::from(diff),
                u64::from(BPF_F_PSEUDO_HDR) | Self::mangled(flow),
            )
            .map_err(|_| RewriteFailure::Checksum)?;
        self.port_checksum(flow, &end, port)
    }
}

impl Rewriter<V4> for TcRewriter<'_> {
    #[inline(always)]
    fn rewrite_dst(&self, flow: &Flow4, addr: u32, port: u16) -> Result<(), RewriteFailure> {
        let end = End {
            addr_off: IP_DADDR_OFF,
            port_off: L4_DPORT_OFF,
            old_addr: flow.daddr,
            old_port: flow.dport,
        };
        self.rewrite4(flow, end, addr, port)
    }

    #[inline(always)]
    fn rewrite_src(&self, flow: &Flow4, addr: u32, port: u16) -> Result<(), RewriteFailure> {
        let end = End {
            addr_off: IP_SADDR_OFF,
            port_off: L4_SPORT_OFF,
            old_addr: flow.saddr,
            old_port: flow.sport,
        };
        self.rewrite4(flow, end, addr, port)
    }

    #[inline(always)]
    fn dsr_option_too_big(&self, _flow: &Flow4) -> Option<u16> {
        let frag = self.ctx.load::<u16>(IP_OFF + ipv4::FRAG_OFF).ok()?;
        if u16::from_be(frag) & IP_DF == 0 {
            // The kernel fragments it, the option copied into each piece.
            return None;
        }
        self.too_big_by(DSR_OPTION_LEN)
    }
}

impl Rewriter<V6> for TcRewriter<'_> {
    #[inline(always)]
    fn rewrite_dst(&self, flow: &Flow6, addr: Ipv6Bytes, port: u16) -> Result<(), RewriteFailure> {
        let end = End {
            addr_off: IP6_DADDR_OFF,
            port_off: flow.l4_off + tcp::DPORT,
            old_addr: flow.daddr,
            old_port: flow.dport,
        };
        self.rewrite6(flow, end, addr, port)
    }

    #[inline(always)]
    fn rewrite_src(&self, flow: &Flow6, addr: Ipv6Bytes, port: u16) -> Result<(), RewriteFailure> {
        let end = End {
            addr_off: IP6_SADDR_OFF,
            port_off: flow.l4_off + tcp::SPORT,
            old_addr: flow.saddr,
            old_port: flow.sport,
        };
        self.rewrite6(flow, end, addr, port)
    }

    /// IPv6 is never fragmented on the way: too big is too big.
    #[inline(always)]
    fn dsr_option_too_big(&self, _flow: &Flow6) -> Option<u16> {
        self.too_big_by(DSR_HEADER6_LEN)
    }
}

/// Answers a TCP segment to a Service without backends with a RST, sent
/// back where it came from. Built from the segment itself with the checksum
/// helpers, so it is right whether the segment's checksum was partial or full.
#[inline(never)]
fn tcp_reset(ctx: &TcContext, flow: &Flow4) -> Result<i32, RejectFailure> {
    reset_segment(ctx, flow)?;
    let store = |_| RejectFailure::Store;
    let old_tot = flow.ip_tot_len.to_be();
    let new_tot = ((IP_HLEN + TCP_HLEN) as u16).to_be();
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_tot), u64::from(new_tot), 2)
        .map_err(|_| RejectFailure::Checksum)?;
    ctx.store(IP_TOT_LEN_OFF, &new_tot, 0).map_err(store)?;
    ctx.store(IP_SADDR_OFF, &flow.daddr, 0).map_err(store)?;
    ctx.store(IP_DADDR_OFF, &flow.saddr, 0).map_err(store)?;
    send_back(ctx, (ETH_HLEN + IP_HLEN + TCP_HLEN) as u32)
}

/// `tcp_reset` for IPv6 (no header checksum; the payload length instead of
/// the total). Only a segment right behind the IPv6 header is answered.
#[inline(never)]
fn tcp_reset6(ctx: &TcContext, flow: &Flow6) -> Result<i32, RejectFailure> {
    if flow.l4_off != IP_OFF + ipv6::HLEN {
        return Err(RejectFailure::NotAnswerable);
    }
    reset_segment(ctx, flow)?;
    let store = |_| RejectFailure::Store;
    let payload_len = (TCP_HLEN as u16).to_be();
    ctx.store(IP_OFF + ipv6::PAYLOAD_LEN, &payload_len, 0)
        .map_err(store)?;
    ctx.store(IP6_SADDR_OFF, &flow.daddr, 0).map_err(store)?;
    ctx.store(IP6_DADDR_OFF, &flow.saddr, 0).map_err(store)?;
    send_back(ctx, (IP_OFF + ipv6::HLEN + TCP_HLEN) as u32)
}

/// The TCP header of a reset in place of the segment's (either family):
/// only segments without payload are answered (a SYN, or a bare ACK/FIN
/// of a flow whose Service lost its backends); others are dropped.
#[inline(always)]
fn reset_segment<A>(ctx: &TcContext, flow: &Flow<A>) -> Result<(), RejectFailure> {
    let l4_off = flow.l4_off;
    let old: [u8; TCP_HLEN] = ctx.load(l4_off).map_err(|_| RejectFailure::OutOfBounds)?;
    let doff = tcp_header_len(&old);
    if doff < TCP_HLEN || flow.ip_tot_len as usize != (l4_off - IP_OFF) + doff {
        return Err(RejectFailure::NotAnswerable);
    }
    let new = reset_header(&old, flow).ok_or(RejectFailure::NotAnswerable)?;
    update_reset_checksum(ctx, l4_off, &old, new, doff)?;
    let store = |_| RejectFailure::Store;
    let before_csum: [u8; tcp::CSUM] = [
        new[0], new[1], new[2], new[3], new[4], new[5], new[6], new[7], new[8], new[9], new[10],
        new[11], new[12], new[13], new[14], new[15],
    ];
    ctx.store(l4_off, &before_csum, 0).map_err(store)?;
    // The checksum field itself is already updated in place.
    let after_csum = [new[tcp::CSUM + 2], new[tcp::CSUM + 3]];
    ctx.store(l4_off + tcp::CSUM + 2, &after_csum, 0)
        .map_err(store)
}

/// Swaps the MAC addresses, trims the packet to `len` and sends it back
/// out of the interface it came in by.
#[inline(always)]
fn send_back(ctx: &TcContext, len: u32) -> Result<i32, RejectFailure> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| RejectFailure::OutOfBounds)?;
    let swapped = [
        macs[6], macs[7], macs[8], macs[9], macs[10], macs[11], macs[0], macs[1], macs[2], macs[3],
        macs[4], macs[5],
    ];
    ctx.store(0, &swapped, 0)
        .map_err(|_| RejectFailure::Store)?;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(RejectFailure::Resize);
    }
    redirect_back(ctx)
}

/// Turns a UDP datagram to an IPv6 Service without backends into an
/// ICMPv6 port unreachable (see lb_common::icmp6), sent back where it
/// came from. Written field by field into the room opened in front of
/// the datagram: a whole new head built on the stack would not fit.
#[inline(never)]
fn udp_unreachable6(
    ctx: &TcContext,
    flow: &Flow6,
    why: Unreachable6,
) -> Result<i32, RejectFailure> {
    const QUOTE_OFF: usize = icmp6::HEAD_LEN;
    const QUOTE_LEN: usize = icmp6::IP6_LEN + icmp6::QUOTED_L4_LEN;
    if flow.l4_off != IP_OFF + ipv6::HLEN {
        return Err(RejectFailure::NotAnswerable);
    }
    let (bounds, store) = (|_| RejectFailure::OutOfBounds, |_| RejectFailure::Store);
    let udp: [u8; icmp6::QUOTED_L4_LEN] = ctx.load(flow.l4_off).map_err(bounds)?;
    let quoted = icmp6::quoted_udp_check(&flow.saddr, &flow.daddr, &udp);
    let sent = u16::from_ne_bytes([udp[6], udp[7]]);
    let macs: [u8; 12] = ctx.load(0).map_err(bounds)?;
    if unsafe { bpf_skb_change_head(ctx.skb.skb, icmp6::GROW as u32, 0) } != 0 {
        return Err(RejectFailure::Resize);
    }
    // The datagram's IPv6 header and UDP bytes now sit where the answer
    // quotes them, untouched (see `icmp6::checksum`).
    let mut quote: [u8; QUOTE_LEN] = ctx.load(QUOTE_OFF).map_err(bounds)?;
    let quote_sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote.as_mut_ptr() as *mut u32,
            QUOTE_LEN as u32,
            0,
        )
    };
    if quote_sum < 0 {
        return Err(RejectFailure::Checksum);
    }
    let icmp_check = icmp6::checksum(
        &flow.daddr,
        &flow.saddr,
        quote_sum as u32,
        sent,
        quoted,
        why,
    );
    ctx.store(
        icmp6::ETH_LEN + icmp6::IP6_LEN,
        &icmp6::header(icmp_check, why),
        0,
    )
    .map_err(store)?;
    ctx.store(IP_OFF, &icmp6::IP6_FIRST_BYTES, 0)
        .map_err(store)?;
    ctx.store(IP6_SADDR_OFF, &flow.daddr, 0).map_err(store)?;
    ctx.store(IP6_DADDR_OFF, &flow.saddr, 0).map_err(store)?;
    // The frame's own addresses, which `send_back` swaps.
    ctx.store(0, &macs, 0).map_err(store)?;
    ctx.store(ETH_TYPE_OFF, &ETH_P_IPV6.to_be(), 0)
        .map_err(store)?;
    send_back(ctx, icmp6::PORT_UNREACHABLE_LEN as u32)
}

/// The TCP checksum of the reset: the old header (checksum field as zero)
/// and its options summed out, the new header summed in, a diff the helper
/// applies only where the checksum covers the segment (not to a partial
/// checksum, which covers only the pseudo header); then the pseudo
/// header's new length. Swapping addresses changes neither its sum nor
/// the IP header's.
#[inline(always)]
fn update_reset_checksum(
    ctx: &TcContext,
    l4_off: usize,
    old: &[u8; TCP_HLEN],
    mut new: [u8; TCP_HLEN],
    doff: usize,
) -> Result<(), RejectFailure> {
    let mut from = [0u8; TCP_HLEN + 40];
    from[..TCP_HLEN].copy_from_slice(old);
    from[tcp::CSUM] = 0;
    from[tcp::CSUM + 1] = 0;
    let opt_len = doff - TCP_HLEN;
    if opt_len > 0 && opt_len <= 40 {
        // The raw helper: the length is bounded 1..=40 here, which the
        // verifier needs to see (aya's wrapper may clamp it to zero).
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                (l4_off + TCP_HLEN) as u32,
                from.as_mut_ptr().add(TCP_HLEN) as *mut _,
                opt_len as u32,
            )
        };
        if ret != 0 {
            return Err(RejectFailure::OutOfBounds);
        }
    }
    let diff = unsafe {
        bpf_csum_diff(
            from.as_mut_ptr() as *mut u32,
            from.len() as u32,
            new.as_mut_ptr() as *mut u32,
            new.len() as u32,
            0,
        )
    };
    if diff < 0 {
        return Err(RejectFailure::Checksum);
    }
    let csum_off = l4_off + tcp::CSUM;
    ctx.l4_csum_replace(csum_off, 0, u64::from(diff as u32), 0)
        .map_err(|_| RejectFailure::Checksum)?;
    let old_l4_len = (doff as u16).to_be();
    let new_l4_len = (TCP_HLEN as u16).to_be();
    // IPv6's 32-bit upper-layer length changes in its low 16 bits only.
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_l4_len),
        u64::from(new_l4_len),
        u64::from(BPF_F_PSEUDO_HDR) | 2,
    )
    .map_err(|_| RejectFailure::Checksum)
}

/// The helper opens the room between the fixed IPv4 header and L4 (the
/// L4 header stays where a partial checksum's start points); the
/// header, grown by the option, is then written whole.
#[inline(never)]
fn push_dsr_option(ctx: &TcContext, flow: &Flow4) -> Result<(), RewriteFailure> {
    let ip: [u8; IP_HLEN] = ctx.load(IP_OFF).map_err(|_| RewriteFailure::OutOfBounds)?;
    ctx.adjust_room(i32::from(DSR_OPTION_LEN), BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| RewriteFailure::Resize)?;
    ctx.store(IP_OFF, &with_dsr_option(&ip, flow), 0)
        .map_err(|_| RewriteFailure::Store)
}

/// The helper opens the room between the IPv6 header and L4 (which stays
/// where a partial checksum's start points); the destination options
/// header naming the frontend goes there, and the IPv6 header's next
/// header and payload length say so. Only in front of TCP or UDP (see the
/// XDP hook's `push_dsr_header6`).
#[inline(never)]
fn push_dsr_header6(ctx: &TcContext, flow: &Flow6) -> Result<(), RewriteFailure> {
    const GROW: usize = DSR_HEADER6_LEN as usize;
    if flow.l4_off != IP_OFF + ipv6::HLEN {
        return Err(RewriteFailure::Resize);
    }
    let bounds = |_| RewriteFailure::OutOfBounds;
    let next: u8 = ctx.load(IP_OFF + ipv6::NEXT_HEADER).map_err(bounds)?;
    let len: u16 = ctx.load(IP_OFF + ipv6::PAYLOAD_LEN).map_err(bounds)?;
    ctx.adjust_room(GROW as i32, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| RewriteFailure::Resize)?;
    let store = |_| RewriteFailure::Store;
    let len = u16::from_be(len).wrapping_add(GROW as u16).to_be();
    ctx.store(IP_OFF + ipv6::PAYLOAD_LEN, &len, 0)
        .map_err(store)?;
    ctx.store(IP_OFF + ipv6::NEXT_HEADER, &IPPROTO_DSTOPTS, 0)
        .map_err(store)?;
    ctx.store(flow.l4_off, &dsr_header6(next, flow), 0)
        .map_err(store)
}
