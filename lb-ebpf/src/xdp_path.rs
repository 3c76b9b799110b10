//! XDP on interfaces facing the wire, an acceleration for drivers whose
//! packets carry complete checksums (a physical NIC): it updates them in
//! software (RFC 1624), which is wrong for a partial checksum, so the agent
//! attaches it only where none can arrive (see `lb_tc_from_wire`).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{
    csum, icmp,
    icmp::Unreachable,
    icmp6::{self, Unreachable6},
    stats::{self, RejectFailure, RewriteFailure},
    uapi::{ETH_P_IPV6, IPPROTO_DSTOPTS, IPPROTO_ICMPV6},
    Ipv6Bytes, DSR_HEADER6_LEN, DSR_OPTION_LEN, IPPROTO_TCP,
};

use crate::{
    family::{Family, V4, V6},
    headers::{
        carries_dsr_option, dsr_header6, dsr_origin, dsr_origin6, ipv4, ipv6, is_dsr_header, l3,
        parse4, parse6, ptr_at, tcp, with_dsr_option, Flow, Flow4, Flow6, Parsed, DEFAULT_TTL,
        ETH_HLEN, IP6_DADDR_OFF, IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_DF, IP_HLEN, IP_OFF,
        IP_SADDR_OFF, L3, L4_DPORT_OFF, L4_OFF, L4_SPORT_OFF, TCP_HLEN,
    },
    maps::{count, FLOW6_SCRATCH},
    nat::{self, Action, Hook, Rewriter},
};

pub fn from_wire(ctx: &XdpContext) -> u32 {
    match l3(ctx.data(), ctx.data_end()) {
        L3::Ipv4 if carries_dsr_option(ctx.data(), ctx.data_end()) => learn_dsr_reply4(ctx),
        L3::Ipv4 => finish4(ctx, from_wire4(ctx)),
        L3::Ipv6 => from_wire6(ctx),
        L3::Other => xdp_action::XDP_PASS,
    }
}

/// The flow of a parsed packet; None (counted) for what passes untouched.
#[inline(always)]
pub fn flow_of<F: Family, Fl>(parsed: Parsed<Fl>) -> Option<Fl> {
    match parsed {
        Parsed::Flow(flow) => Some(flow),
        // A hook that learns from DSR requests takes them out before.
        Parsed::Other | Parsed::DsrRequest(..) => None,
        Parsed::Fragment => {
            count::<F>(stats::FRAGMENT_PASSED);
            None
        }
        Parsed::Malformed => {
            count::<F>(stats::MALFORMED_PASSED);
            None
        }
    }
}

/// A DSR request forwarded here by another node: its reply entry learned,
/// passed on to its pod. In a frame beside `from_wire4`'s, which has no
/// room for a second parse.
#[inline(never)]
fn learn_dsr_reply4(ctx: &XdpContext) -> u32 {
    // The header length again, through the helper: a function that only
    // reads the context's packet pointers gets them from LLVM as plain
    // arguments instead, scalars the verifier refuses to read through.
    let mut ver_ihl = 0u8;
    let at = (&raw mut ver_ihl).cast();
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, IP_OFF as u32, at, 1) } != 0 {
        return xdp_action::XDP_PASS;
    }
    if !is_dsr_header(ver_ihl) {
        return xdp_action::XDP_PASS;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if let (Parsed::DsrRequest(flow), Some(origin)) = (parse4(start, end), dsr_origin(start, end)) {
        nat::learn_dsr_reply::<V4>(&flow, origin.addr, origin.port);
    }
    xdp_action::XDP_PASS
}

/// What `from_wire4` decided, in one register (an enum would come back
/// through the caller's stack, which has no byte to spare): a verdict, or
/// an ICMP answer to a UDP datagram, built by the caller (`finish4`) in a
/// frame beside `from_wire4`'s: under it, the two would not fit BPF's 512
/// bytes of stack.
#[derive(Clone, Copy)]
struct Wire4Outcome(u64);

impl Wire4Outcome {
    const ANSWER: u64 = 1 << 32;

    #[inline(always)]
    fn verdict(v: u32) -> Self {
        Self(u64::from(v))
    }

    /// Port unreachable, or fragmentation needed with `mtu` (never 0).
    #[inline(always)]
    fn answer(frag_needed_mtu: Option<u16>) -> Self {
        Self(Self::ANSWER | u64::from(frag_needed_mtu.unwrap_or(0)))
    }
}

/// The XDP verdict for `outcome`: an answer it asks for built and sent.
/// A port unreachable is counted as a rejection; a fragmentation needed
/// was counted as `dsr_frag_needed` (an answer that cannot be built is a
/// datagram lost, which the client's retries or timeout handle).
#[inline(always)]
fn finish4(ctx: &XdpContext, outcome: Wire4Outcome) -> u32 {
    if outcome.0 & Wire4Outcome::ANSWER == 0 {
        return outcome.0 as u32;
    }
    match outcome.0 as u16 {
        0 => nat::rejected::<V4, _>(
            udp_unreachable(ctx, Unreachable::PORT),
            xdp_action::XDP_DROP,
        ),
        mtu => udp_unreachable(ctx, Unreachable::frag_needed(mtu)).unwrap_or(xdp_action::XDP_DROP),
    }
}

/// Each family's path in a function of its own: inlined side by side their
/// frames would add up past BPF's 512 bytes of stack.
#[inline(never)]
fn from_wire4(ctx: &XdpContext) -> Wire4Outcome {
    let Some(flow) = flow_of::<V4, _>(parse4(ctx.data(), ctx.data_end())) else {
        return Wire4Outcome::verdict(xdp_action::XDP_PASS);
    };
    let rw = XdpRewriter { ctx };
    let verdict = match nat::handle::<V4, _>(&rw, &flow, Hook::Wire) {
        // Packets from the wire go on through the kernel's routing; the
        // agent lets the wire interfaces accept a node address as source
        // (accept_local) for masqueraded and reverse-translated ones.
        Action::Pass | Action::Translated | Action::Redirect => xdp_action::XDP_PASS,
        Action::TranslatedWithDsrOption => match push_dsr_option(ctx, &flow) {
            Ok(()) => xdp_action::XDP_PASS,
            Err(why) => {
                nat::dsr_option_failed::<V4>(why);
                xdp_action::XDP_DROP
            }
        },
        Action::Drop => xdp_action::XDP_DROP,
        Action::RejectTcp => nat::rejected::<V4, _>(tcp_reset(ctx, &flow), xdp_action::XDP_DROP),
        Action::RejectUdp => return Wire4Outcome::answer(None),
        Action::FragNeeded(mtu) => return Wire4Outcome::answer(Some(mtu)),
    };
    Wire4Outcome::verdict(verdict)
}

#[inline(never)]
fn from_wire6(ctx: &XdpContext) -> u32 {
    let Some(scratch) = FLOW6_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's slot, no other user while the program runs.
    let scratch = unsafe { &mut *scratch };
    let flow = &mut scratch.flow;
    let parsed = parse6(ctx.data(), ctx.data_end(), flow);
    let dsr_request = matches!(parsed, Parsed::DsrRequest(()));
    if !dsr_request && flow_of::<V6, _>(parsed).is_none() {
        return xdp_action::XDP_PASS;
    }
    // Both addresses in one copy, straight into the flow (see `parse6`).
    let addrs = (&raw mut flow.saddr).cast::<core::ffi::c_void>();
    let len = 2 * core::mem::size_of::<Ipv6Bytes>() as u32;
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, IP6_SADDR_OFF as u32, addrs, len) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let flow = &scratch.flow;
    if dsr_request {
        if let Some((addr, port)) = dsr_origin6(ctx.data(), ctx.data_end()) {
            nat::learn_dsr_reply::<V6>(flow, addr, port);
        }
        return xdp_action::XDP_PASS;
    }
    let rw = XdpRewriter { ctx };
    match nat::handle::<V6, _>(&rw, flow, Hook::Wire) {
        Action::Pass | Action::Translated | Action::Redirect => xdp_action::XDP_PASS,
        Action::TranslatedWithDsrOption => match push_dsr_header6(ctx, flow) {
            Ok(()) => xdp_action::XDP_PASS,
            Err(why) => {
                nat::dsr_option_failed::<V6>(why);
                xdp_action::XDP_DROP
            }
        },
        Action::Drop => xdp_action::XDP_DROP,
        Action::RejectTcp => nat::rejected::<V6, _>(tcp_reset6(ctx, flow), xdp_action::XDP_DROP),
        Action::RejectUdp => nat::rejected::<V6, _>(
            udp_unreachable6(ctx, flow, Unreachable6::PORT),
            xdp_action::XDP_DROP,
        ),
        // Counted as dsr_frag_needed (see `finish4`).
        Action::FragNeeded(mtu) => {
            let too_big = Unreachable6::packet_too_big(u32::from(mtu));
            udp_unreachable6(ctx, flow, too_big).unwrap_or(xdp_action::XDP_DROP)
        }
    }
}

/// Turns a UDP datagram into an ICMP destination unreachable (`why`: port
/// unreachable for a Service without backends, fragmentation needed for a
/// DSR datagram too big) and sends it back out (see lb_common::icmp).
#[inline(never)]
fn udp_unreachable(ctx: &XdpContext, why: Unreachable) -> Result<u32, RejectFailure> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let bounds = RejectFailure::OutOfBounds;
    let eth = ptr_at::<[u8; icmp::ETH_LEN]>(start, end, 0).ok_or(bounds)?;
    let ip = ptr_at::<[u8; icmp::IP_LEN]>(start, end, IP_OFF).ok_or(bounds)?;
    let udp = ptr_at::<[u8; icmp::QUOTED_L4_LEN]>(start, end, L4_OFF).ok_or(bounds)?;
    // SAFETY: bounds checked above.
    let (eth, ip, udp) = unsafe {
        (
            eth.read_unaligned(),
            ip.read_unaligned(),
            udp.read_unaligned(),
        )
    };
    let check = icmp::quoted_udp_check(&ip, &udp);
    let head = icmp::port_unreachable_head(&eth, &ip, &udp, check);
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(icmp::GROW as i32)) } != 0 {
        return Err(RejectFailure::Resize);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let out = ptr_at::<[u8; icmp::HEAD_LEN]>(start, end, 0).ok_or(bounds)?;
    // SAFETY: bounds checked above. Applied in the packet: a second head
    // on the stack would not fit.
    unsafe {
        out.write_unaligned(head);
        why.apply(&mut *out);
    }
    let delta = icmp::PORT_UNREACHABLE_LEN as i32 - (end - start) as i32;
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(RejectFailure::Resize);
    }
    Ok(xdp_action::XDP_TX)
}

/// `udp_unreachable` for IPv6 (see lb_common::icmp6), written field by
/// field into the room opened in front of the datagram (a whole new head
/// built on the stack would not fit). Only a datagram right behind the
/// IPv6 header is answered.
#[inline(never)]
fn udp_unreachable6(
    ctx: &XdpContext,
    flow: &Flow6,
    why: Unreachable6,
) -> Result<u32, RejectFailure> {
    const QUOTE_OFF: usize = icmp6::HEAD_LEN;
    const QUOTE_LEN: usize = icmp6::IP6_LEN + icmp6::QUOTED_L4_LEN;
    if flow.l4_off != IP_OFF + ipv6::HLEN {
        return Err(RejectFailure::NotAnswerable);
    }
    let bounds = RejectFailure::OutOfBounds;
    let (start, end) = (ctx.data(), ctx.data_end());
    let udp = ptr_at::<[u8; icmp6::QUOTED_L4_LEN]>(start, end, flow.l4_off).ok_or(bounds)?;
    let macs = ptr_at::<[u16; 6]>(start, end, 0).ok_or(bounds)?;
    // SAFETY: bounds checked above.
    let (udp, macs) = unsafe { (udp.read_unaligned(), macs.read_unaligned()) };
    let quoted = icmp6::quoted_udp_check(&flow.saddr, &flow.daddr, &udp);
    let sent = u16::from_ne_bytes([udp[6], udp[7]]);
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(icmp6::GROW as i32)) } != 0 {
        return Err(RejectFailure::Resize);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let quote = ptr_at::<[u8; QUOTE_LEN]>(start, end, QUOTE_OFF).ok_or(bounds)?;
    let icmp = ptr_at::<[u8; 8]>(start, end, icmp6::ETH_LEN + icmp6::IP6_LEN).ok_or(bounds)?;
    let eth = ptr_at::<[u16; 7]>(start, end, 0).ok_or(bounds)?;
    let version = ptr_at::<[u8; 4]>(start, end, IP_OFF).ok_or(bounds)?;
    // SAFETY: every pointer is bounds checked (`ptr_at`) before use.
    unsafe {
        let quote_sum = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote.cast::<u32>(),
            QUOTE_LEN as u32,
            0,
        );
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
        icmp.write_unaligned(icmp6::header(icmp_check, why));
        // The frame's own addresses (swapped below) and EtherType.
        let [d0, d1, d2, s0, s1, s2] = macs;
        eth.write_unaligned([d0, d1, d2, s0, s1, s2, ETH_P_IPV6.to_be()]);
        let first = icmp6::IP6_FIRST_BYTES;
        version.write_unaligned([first[0], first[1], first[2], first[3]]);
        let payload_len = (icmp6::PORT_UNREACHABLE_LEN - IP_OFF - ipv6::HLEN) as u16;
        write_ipv6_answer_header(start, end, flow, payload_len, IPPROTO_ICMPV6)?;
    }
    let delta = icmp6::PORT_UNREACHABLE_LEN as i32 - (end - start) as i32;
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(RejectFailure::Resize);
    }
    Ok(xdp_action::XDP_TX)
}

/// `tcp_reset` for IPv6, written field by field in place (arrays of the
/// headers on the stack would not fit it). Only a segment right behind
/// the IPv6 header is answered.
#[inline(never)]
fn tcp_reset6(ctx: &XdpContext, flow: &Flow6) -> Result<u32, RejectFailure> {
    const L4: usize = IP_OFF + ipv6::HLEN;
    if flow.l4_off != L4 {
        return Err(RejectFailure::NotAnswerable);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let bounds = RejectFailure::OutOfBounds;
    let seq_ack = ptr_at::<[u32; 2]>(start, end, L4 + tcp::SEQ).ok_or(bounds)?;
    let doff_flags = ptr_at::<[u8; 2]>(start, end, L4 + tcp::DOFF).ok_or(bounds)?;
    let rest = ptr_at::<[u16; 3]>(start, end, L4 + tcp::FLAGS + 1).ok_or(bounds)?;
    // SAFETY: every pointer is bounds checked (`ptr_at`) before use.
    unsafe {
        let [doff, flags] = doff_flags.read_unaligned();
        let [seq, ack] = seq_ack.read_unaligned();
        let doff = usize::from(doff >> 4) * 4;
        let answer =
            reset_answer(flow, flags, doff, seq, ack).ok_or(RejectFailure::NotAnswerable)?;
        ptr_at::<[u16; 2]>(start, end, L4)
            .ok_or(bounds)?
            .write_unaligned([flow.dport, flow.sport]);
        seq_ack.write_unaligned([answer.seq, answer.ack]);
        let head = [((TCP_HLEN / 4) as u8) << 4, answer.flags];
        doff_flags.write_unaligned(head);
        // Window, checksum, urgent pointer.
        let pseudo =
            csum::pseudo_header_sum6(&flow.daddr, &flow.saddr, IPPROTO_TCP, TCP_HLEN as u32);
        let words = [
            u32::from(flow.dport),
            u32::from(flow.sport),
            answer.seq & 0xffff,
            answer.seq >> 16,
            answer.ack & 0xffff,
            answer.ack >> 16,
            u32::from(u16::from_ne_bytes(head)),
        ];
        let sum = pseudo + words.iter().sum::<u32>();
        rest.write_unaligned([0, !csum::fold(sum), 0]);
        write_ipv6_answer_header(start, end, flow, TCP_HLEN as u16, IPPROTO_TCP)?;
    }
    let delta = (L4 + TCP_HLEN) as i32 - (end - start) as i32;
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(RejectFailure::Resize);
    }
    Ok(xdp_action::XDP_TX)
}

/// The IPv6 header (and Ethernet addresses) of an answer to `flow`, sent
/// back the way it came, carrying `payload_len` bytes of `next_header`.
///
/// # Safety
/// `start`/`end` are the packet's data pointers.
#[inline(always)]
unsafe fn write_ipv6_answer_header(
    start: usize,
    end: usize,
    flow: &Flow6,
    payload_len: u16,
    next_header: u8,
) -> Result<(), RejectFailure> {
    let bounds = RejectFailure::OutOfBounds;
    let len = ptr_at::<[u8; 4]>(start, end, IP_OFF + ipv6::PAYLOAD_LEN).ok_or(bounds)?;
    let saddr = ptr_at::<Ipv6Bytes>(start, end, IP6_SADDR_OFF).ok_or(bounds)?;
    let daddr = ptr_at::<Ipv6Bytes>(start, end, IP6_DADDR_OFF).ok_or(bounds)?;
    let macs = ptr_at::<[u16; 6]>(start, end, 0).ok_or(bounds)?;
    let [l0, l1] = payload_len.to_be_bytes();
    // SAFETY: bounds checked above.
    unsafe {
        len.write_unaligned([l0, l1, next_header, DEFAULT_TTL]);
        saddr.write_unaligned(flow.daddr);
        daddr.write_unaligned(flow.saddr);
        let [d0, d1, d2, s0, s1, s2] = macs.read_unaligned();
        macs.write_unaligned([s0, s1, s2, d0, d1, d2]);
    }
    Ok(())
}

/// What a RST answering a segment carries, in network order.
pub struct ResetAnswer {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

/// The sequence numbers and flags of the RST answering a segment with
/// `flags`, a `doff`-byte header, and `seq`/`ack` as sent (network order);
/// `None` when it is not one to answer (a RST, a header that does not fit).
#[inline(always)]
pub fn reset_answer<A>(
    flow: &Flow<A>,
    flags: u8,
    doff: usize,
    seq: u32,
    ack: u32,
) -> Option<ResetAnswer> {
    use crate::headers::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
    if flags & TCP_RST != 0 {
        return None;
    }
    let tot = flow.ip_tot_len as usize;
    // The IP header with any IPv6 extension headers.
    let ip_hlen = flow.l4_off - IP_OFF;
    if doff < TCP_HLEN || tot < ip_hlen + doff {
        return None;
    }
    let payload = (tot - ip_hlen - doff) as u32;
    if flags & TCP_ACK != 0 {
        return Some(ResetAnswer {
            seq: ack,
            ack: 0,
            flags: TCP_RST,
        });
    }
    let seg_len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
    Some(ResetAnswer {
        seq: 0,
        ack: u32::from_be(seq).wrapping_add(seg_len).to_be(),
        flags: TCP_RST | TCP_ACK,
    })
}

/// Swaps destination and source MAC addresses.
#[inline(always)]
fn swap_macs(e: &mut [u8; ETH_HLEN]) {
    let mac = [e[0], e[1], e[2], e[3], e[4], e[5]];
    e.copy_within(6..12, 0);
    e[6..12].copy_from_slice(&mac);
}

struct XdpRewriter<'a> {
    ctx: &'a XdpContext,
}

impl XdpRewriter<'_> {
    /// See `nat::too_big_by`.
    #[inline(always)]
    fn too_big_by(&self, grow: u8) -> Option<u16> {
        nat::too_big_by(self.ctx.ctx.cast(), grow)
    }

    #[inline(always)]
    fn field<T>(&self, offset: usize) -> Result<*mut T, RewriteFailure> {
        ptr_at::<T>(self.ctx.data(), self.ctx.data_end(), offset).ok_or(RewriteFailure::OutOfBounds)
    }

    /// IPv6 has no header checksum; the addresses are in the L4 one's
    /// pseudo header, and UDP's is never zero.
    #[inline(always)]
    fn rewrite6(
        &self,
        flow: &Flow6,
        addr_off: usize,
        port_off: usize,
        addr: Ipv6Bytes,
        port: u16,
    ) -> Result<(), RewriteFailure> {
        let ip_addr = self.field::<Ipv6Bytes>(addr_off)?;
        let l4_port = self.field::<u16>(port_off)?;
        let l4_csum = self.field::<u16>(flow.l4_csum_off)?;
        // SAFETY: every pointer was bounds checked above.
        unsafe {
            let (old_addr, old_port) = (ip_addr.read_unaligned(), l4_port.read_unaligned());
            let c = csum::replace16(l4_csum.read_unaligned(), &old_addr, &addr);
            let c = csum::replace2(c, old_port, port);
            let c = if flow.proto == IPPROTO_TCP {
                c
            } else {
                csum::udp6_nonzero(c)
            };
            l4_csum.write_unaligned(c);
            ip_addr.write_unaligned(addr);
            l4_port.write_unaligned(port);
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite(
        &self,
        flow: &Flow4,
        addr_off: usize,
        port_off: usize,
        addr: u32,
        port: u16,
    ) -> Result<(), RewriteFailure> {
        let ip_addr = self.field::<u32>(addr_off)?;
        let l4_port = self.field::<u16>(port_off)?;
        let ip_csum = self.field::<u16>(IP_CSUM_OFF)?;
        let l4_csum = self.field::<u16>(flow.l4_csum_off)?;
        // SAFETY: every pointer was bounds checked above.
        unsafe {
            let (old_addr, old_port) = (ip_addr.read_unaligned(), l4_port.read_unaligned());
            ip_csum.write_unaligned(csum::replace4(ip_csum.read_unaligned(), old_addr, addr));
            let c = l4_csum.read_unaligned();
            let c = if flow.proto == IPPROTO_TCP {
                csum::replace2(csum::replace4(c, old_addr, addr), old_port, port)
            } else {
                csum::udp_replace2(csum::udp_replace4(c, old_addr, addr), old_port, port)
            };
            l4_csum.write_unaligned(c);
            ip_addr.write_unaligned(addr);
            l4_port.write_unaligned(port);
        }
        Ok(())
    }
}

impl Rewriter<V4> for XdpRewriter<'_> {
    #[inline(always)]
    fn rewrite_dst(&self, flow: &Flow4, addr: u32, port: u16) -> Result<(), RewriteFailure> {
        self.rewrite(flow, IP_DADDR_OFF, L4_DPORT_OFF, addr, port)
    }

    #[inline(always)]
    fn rewrite_src(&self, flow: &Flow4, addr: u32, port: u16) -> Result<(), RewriteFailure> {
        self.rewrite(flow, IP_SADDR_OFF, L4_SPORT_OFF, addr, port)
    }

    #[inline(always)]
    fn dsr_option_too_big(&self, _flow: &Flow4) -> Option<u16> {
        let frag = self.field::<u16>(IP_OFF + ipv4::FRAG_OFF).ok()?;
        // SAFETY: bounds checked by `field`.
        if u16::from_be(unsafe { frag.read_unaligned() }) & IP_DF == 0 {
            // The kernel fragments it, the option copied into each piece.
            return None;
        }
        self.too_big_by(DSR_OPTION_LEN)
    }
}

impl Rewriter<V6> for XdpRewriter<'_> {
    #[inline(always)]
    fn rewrite_dst(&self, flow: &Flow6, addr: Ipv6Bytes, port: u16) -> Result<(), RewriteFailure> {
        self.rewrite6(flow, IP6_DADDR_OFF, flow.l4_off + tcp::DPORT, addr, port)
    }

    #[inline(always)]
    fn rewrite_src(&self, flow: &Flow6, addr: Ipv6Bytes, port: u16) -> Result<(), RewriteFailure> {
        self.rewrite6(flow, IP6_SADDR_OFF, flow.l4_off + tcp::SPORT, addr, port)
    }

    /// IPv6 is never fragmented on the way: too big is too big.
    #[inline(always)]
    fn dsr_option_too_big(&self, _flow: &Flow6) -> Option<u16> {
        self.too_big_by(DSR_HEADER6_LEN)
    }
}

/// Turns a TCP segment to a Service without backends into the RST the
/// client's stack expects (RFC 9293 3.10.7.1) and sends it back out.
#[inline(never)]
fn tcp_reset(ctx: &XdpContext, flow: &Flow4) -> Result<u32, RejectFailure> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let bounds = RejectFailure::OutOfBounds;
    let eth = ptr_at::<[u8; ETH_HLEN]>(start, end, 0).ok_or(bounds)?;
    let ip = ptr_at::<[u8; IP_HLEN]>(start, end, IP_OFF).ok_or(bounds)?;
    let tcp_hdr = ptr_at::<[u8; TCP_HLEN]>(start, end, L4_OFF).ok_or(bounds)?;
    // SAFETY: bounds checked above.
    let (mut e, mut h, old) = unsafe {
        (
            eth.read_unaligned(),
            ip.read_unaligned(),
            tcp_hdr.read_unaligned(),
        )
    };
    let new = reset_header(&old, flow).ok_or(RejectFailure::NotAnswerable)?;
    swap_macs(&mut e);

    let new_tot_len = (IP_HLEN + TCP_HLEN) as u16;
    h[ipv4::TOT_LEN..ipv4::TOT_LEN + 2].copy_from_slice(&new_tot_len.to_be_bytes());
    h[ipv4::TTL] = DEFAULT_TTL;
    h[ipv4::CSUM..ipv4::CSUM + 2].copy_from_slice(&[0, 0]);
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&h[ipv4::SADDR..ipv4::SADDR + 4]);
    dst.copy_from_slice(&h[ipv4::DADDR..ipv4::DADDR + 4]);
    h[ipv4::SADDR..ipv4::SADDR + 4].copy_from_slice(&dst);
    h[ipv4::DADDR..ipv4::DADDR + 4].copy_from_slice(&src);
    let ip_sum = csum::sum_words(&words10(&h));
    let ip_csum = !csum::fold(ip_sum);
    h[ipv4::CSUM..ipv4::CSUM + 2].copy_from_slice(&ip_csum.to_ne_bytes());

    let mut t = new;
    let pseudo = csum::pseudo_header_sum(
        u32::from_ne_bytes(dst),
        u32::from_ne_bytes(src),
        IPPROTO_TCP,
        TCP_HLEN as u16,
    );
    let tcp_csum = !csum::fold(pseudo + csum::sum_words(&words10(&t)));
    t[tcp::CSUM..tcp::CSUM + 2].copy_from_slice(&tcp_csum.to_ne_bytes());

    unsafe {
        eth.write_unaligned(e);
        ip.write_unaligned(h);
        tcp_hdr.write_unaligned(t);
    }
    let new_len = (ETH_HLEN + IP_HLEN + TCP_HLEN) as i32;
    let delta = new_len - (end - start) as i32;
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(RejectFailure::Resize);
    }
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn words10(b: &[u8; 20]) -> [u16; 10] {
    let mut w = [0u16; 10];
    let mut i = 0;
    while i < 10 {
        w[i] = u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]);
        i += 1;
    }
    w
}

/// The 20-byte TCP header of the RST answering `old` (checksum left zero),
/// or `None` when the segment is not one to answer.
#[inline(always)]
pub fn reset_header<A>(old: &[u8; TCP_HLEN], flow: &Flow<A>) -> Option<[u8; TCP_HLEN]> {
    let word = |i: usize| u32::from_ne_bytes([old[i], old[i + 1], old[i + 2], old[i + 3]]);
    let answer = reset_answer(
        flow,
        old[tcp::FLAGS],
        tcp_header_len(old),
        word(tcp::SEQ),
        word(tcp::ACK_SEQ),
    )?;
    let mut new = [0u8; TCP_HLEN];
    new[tcp::SPORT..tcp::SPORT + 2].copy_from_slice(&old[tcp::DPORT..tcp::DPORT + 2]);
    new[tcp::DPORT..tcp::DPORT + 2].copy_from_slice(&old[tcp::SPORT..tcp::SPORT + 2]);
    new[tcp::SEQ..tcp::SEQ + 4].copy_from_slice(&answer.seq.to_ne_bytes());
    new[tcp::ACK_SEQ..tcp::ACK_SEQ + 4].copy_from_slice(&answer.ack.to_ne_bytes());
    new[tcp::FLAGS] = answer.flags;
    // Five 32-bit words, no options.
    new[tcp::DOFF] = ((TCP_HLEN / 4) as u8) << 4;
    Some(new)
}

/// The TCP header's length in bytes, from its data offset.
#[inline(always)]
pub fn tcp_header_len(hdr: &[u8; TCP_HLEN]) -> usize {
    ((hdr[tcp::DOFF] >> 4) as usize) * 4
}

/// Opens room in front of the frame and moves the Ethernet header
/// into it; the IPv4 header, grown by the option, follows.
#[inline(never)]
fn push_dsr_option(ctx: &XdpContext, flow: &Flow4) -> Result<(), RewriteFailure> {
    const OPT: usize = DSR_OPTION_LEN as usize;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OPT as i32)) } != 0 {
        return Err(RewriteFailure::Resize);
    }
    let eth_was = field::<[u8; ETH_HLEN]>(ctx, OPT)?;
    let ip_was = field::<[u8; IP_HLEN]>(ctx, OPT + ETH_HLEN)?;
    let eth_to = field::<[u8; ETH_HLEN]>(ctx, 0)?;
    let ip_to = field::<[u8; IP_HLEN + OPT]>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by `field`; both old headers are read
    // before anything is written over them.
    unsafe {
        let (eth, ip) = (eth_was.read_unaligned(), ip_was.read_unaligned());
        eth_to.write_unaligned(eth);
        ip_to.write_unaligned(with_dsr_option(&ip, flow));
    }
    Ok(())
}

#[inline(always)]
fn field<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, RewriteFailure> {
    ptr_at::<T>(ctx.data(), ctx.data_end(), offset).ok_or(RewriteFailure::OutOfBounds)
}

/// Opens room in front of the frame and moves the Ethernet and IPv6
/// headers into it; the destination options header naming the frontend
/// follows them. Only in front of TCP or UDP: a packet that has extension
/// headers already is not forwarded with DSR (dropped, counted).
#[inline(never)]
fn push_dsr_header6(ctx: &XdpContext, flow: &Flow6) -> Result<(), RewriteFailure> {
    const GROW: usize = DSR_HEADER6_LEN as usize;
    const HEAD: usize = ETH_HLEN + ipv6::HLEN;
    if flow.l4_off != HEAD {
        return Err(RewriteFailure::Resize);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return Err(RewriteFailure::Resize);
    }
    let was = field::<[u8; HEAD]>(ctx, GROW)?;
    let to = field::<[u8; HEAD]>(ctx, 0)?;
    let ext = field::<[u8; GROW]>(ctx, HEAD)?;
    // SAFETY: bounds checked by `field`; the old headers are read whole
    // before anything is written over them.
    unsafe {
        let mut head = was.read_unaligned();
        let next = head[IP_OFF + ipv6::NEXT_HEADER];
        head[IP_OFF + ipv6::NEXT_HEADER] = IPPROTO_DSTOPTS;
        let at = IP_OFF + ipv6::PAYLOAD_LEN;
        let len = u16::from_be_bytes([head[at], head[at + 1]]).wrapping_add(GROW as u16);
        head[at..at + 2].copy_from_slice(&len.to_be_bytes());
        to.write_unaligned(head);
        ext.write_unaligned(dsr_header6(next, flow));
    }
    Ok(())
}
