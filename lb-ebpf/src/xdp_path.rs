//! XDP on interfaces facing the wire, an acceleration for drivers whose
//! packets carry complete checksums (a physical NIC): it updates them in
//! software (RFC 1624), which is wrong for a partial checksum, so the agent
//! attaches it only where none can arrive (see `lb_tc_from_wire`).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{
    csum, icmp,
    stats::{self, RejectFailure, RewriteFailure},
    Ipv6Bytes, IPPROTO_TCP,
};

use crate::{
    family::{V4, V6},
    headers::{
        ipv4, l3, parse4, parse6, ptr_at, tcp, Flow, Flow4, Flow6, Parsed, DEFAULT_TTL, ETH_HLEN,
        IP6_DADDR_OFF, IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_HLEN, IP_OFF, IP_SADDR_OFF, L3,
        L4_DPORT_OFF, L4_OFF, L4_SPORT_OFF, TCP_HLEN,
    },
    maps::{count, FLOW4_SCRATCH, FLOW6_SCRATCH},
    nat::{self, Action, Hook, Rewriter},
};

pub fn from_wire(ctx: &XdpContext) -> u32 {
    match l3(ctx.data(), ctx.data_end()) {
        L3::Ipv4 => from_wire4(ctx),
        L3::Ipv6 => from_wire6(ctx),
        L3::Other => xdp_action::XDP_PASS,
    }
}

/// The flow of a parsed packet; None (counted) for what passes untouched.
#[inline(always)]
pub fn flow_of<F>(parsed: Parsed<F>) -> Option<F> {
    match parsed {
        Parsed::Flow(flow) => Some(flow),
        Parsed::Other => None,
        Parsed::Fragment => {
            count(stats::FRAGMENT_PASSED);
            None
        }
        Parsed::Malformed => {
            count(stats::MALFORMED_PASSED);
            None
        }
    }
}

/// Each family's path in a function of its own: inlined side by side their
/// frames would add up past BPF's 512 bytes of stack.
#[inline(never)]
fn from_wire4(ctx: &XdpContext) -> u32 {
    let Some(slot) = FLOW4_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's slot, no other user while the program runs.
    let slot = unsafe { &mut *slot };
    let Some(flow) = flow_of(parse4(ctx.data(), ctx.data_end())) else {
        return xdp_action::XDP_PASS;
    };
    let rw = XdpRewriter { ctx };
    match nat::handle::<V4, _>(&rw, &flow, Hook::Wire, slot) {
        // Packets from the wire go on through the kernel's routing; the
        // agent lets the wire interfaces accept a node address as source
        // (accept_local) for masqueraded and reverse-translated ones.
        Action::Pass | Action::Translated | Action::Redirect => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::RejectTcp => nat::rejected(tcp_reset(ctx, &flow), xdp_action::XDP_DROP),
        Action::RejectUdp => nat::rejected(udp_unreachable(ctx), xdp_action::XDP_DROP),
    }
}

#[inline(never)]
fn from_wire6(ctx: &XdpContext) -> u32 {
    let Some(scratch) = FLOW6_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's slot, no other user while the program runs.
    let scratch = unsafe { &mut *scratch };
    let flow = &mut scratch.flow;
    if flow_of(parse6(ctx.data(), ctx.data_end(), flow)).is_none() {
        return xdp_action::XDP_PASS;
    }
    // Both addresses in one copy, straight into the flow (see `parse6`).
    let addrs = (&raw mut flow.saddr).cast::<core::ffi::c_void>();
    let len = 2 * core::mem::size_of::<Ipv6Bytes>() as u32;
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, IP6_SADDR_OFF as u32, addrs, len) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let flow = &scratch.flow;
    let rw = XdpRewriter { ctx };
    match nat::handle::<V6, _>(&rw, flow, Hook::Wire, &mut scratch.start) {
        Action::Pass | Action::Translated | Action::Redirect => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        // Answers over IPv6 (RST, ICMPv6 unreachable) are not built yet.
        Action::RejectTcp | Action::RejectUdp => nat::rejected(
            Err::<u32, _>(RejectFailure::NotAnswerable),
            xdp_action::XDP_DROP,
        ),
    }
}

/// Turns a UDP datagram to a Service without backends into an ICMP port
/// unreachable and sends it back out (see lb_common::icmp).
#[inline(never)]
fn udp_unreachable(ctx: &XdpContext) -> Result<u32, RejectFailure> {
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
    // SAFETY: bounds checked above.
    unsafe { out.write_unaligned(head) };
    let delta = icmp::PORT_UNREACHABLE_LEN as i32 - (end - start) as i32;
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(RejectFailure::Resize);
    }
    Ok(xdp_action::XDP_TX)
}

struct XdpRewriter<'a> {
    ctx: &'a XdpContext,
}

impl XdpRewriter<'_> {
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

    let mac = [e[0], e[1], e[2], e[3], e[4], e[5]];
    e.copy_within(6..12, 0);
    e[6..12].copy_from_slice(&mac);

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
    use crate::headers::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
    let flags = old[tcp::FLAGS];
    if flags & TCP_RST != 0 {
        return None;
    }
    let doff = tcp_header_len(old);
    let tot = flow.ip_tot_len as usize;
    // The IP header with any IPv6 extension headers.
    let ip_hlen = flow.l4_off - IP_OFF;
    if doff < TCP_HLEN || tot < ip_hlen + doff {
        return None;
    }
    let payload = (tot - ip_hlen - doff) as u32;
    let mut new = [0u8; TCP_HLEN];
    new[tcp::SPORT..tcp::SPORT + 2].copy_from_slice(&old[tcp::DPORT..tcp::DPORT + 2]);
    new[tcp::DPORT..tcp::DPORT + 2].copy_from_slice(&old[tcp::SPORT..tcp::SPORT + 2]);
    if flags & TCP_ACK != 0 {
        new[tcp::SEQ..tcp::SEQ + 4].copy_from_slice(&old[tcp::ACK_SEQ..tcp::ACK_SEQ + 4]);
        new[tcp::FLAGS] = TCP_RST;
    } else {
        let mut seq = [0u8; 4];
        seq.copy_from_slice(&old[tcp::SEQ..tcp::SEQ + 4]);
        let seq = u32::from_be_bytes(seq);
        let seg_len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        new[tcp::ACK_SEQ..tcp::ACK_SEQ + 4]
            .copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
        new[tcp::FLAGS] = TCP_RST | TCP_ACK;
    }
    // Five 32-bit words, no options.
    new[tcp::DOFF] = ((TCP_HLEN / 4) as u8) << 4;
    Some(new)
}

/// The TCP header's length in bytes, from its data offset.
#[inline(always)]
pub fn tcp_header_len(hdr: &[u8; TCP_HLEN]) -> usize {
    ((hdr[tcp::DOFF] >> 4) as usize) * 4
}
