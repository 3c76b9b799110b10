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
/// `<linux/if_ether.h>`: the IPv6 EtherType (host order).
pub const ETH_P_IPV6: u16 = 0x86DD;
/// `<linux/socket.h>`: the IPv6 address family.
pub const AF_INET6: u8 = 10;
/// `<linux/in6.h>`: IPv6 extension headers a Service packet may carry
/// before its TCP or UDP header.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// `<linux/in6.h>`.
pub const IPPROTO_ICMPV6: u8 = 58;
