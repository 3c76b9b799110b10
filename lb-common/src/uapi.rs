//! Linux UAPI values the programs need that aya's bindings leave out (they
//! cover bpf.h, not the socket, Ethernet or errno headers). The agent's
//! tests check each against libc.

/// `<linux/if_ether.h>`: the IPv4 EtherType (host order).
pub const ETH_P_IP: u16 = 0x0800;
/// `<linux/socket.h>`: the IPv4 address family (socket addresses, FIB lookups).
pub const AF_INET: u8 = 2;
/// `<linux/in.h>`.
pub const IPPROTO_TCP: u8 = 6;
/// `<linux/in.h>`.
pub const IPPROTO_UDP: u8 = 17;
/// `<asm-generic/errno.h>`: what connect() to a Service without endpoints
/// returns.
pub const ECONNREFUSED: i32 = 111;
