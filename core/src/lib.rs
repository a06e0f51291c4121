//! flannel-core: the sans-IO packet core of flannel-rs.
//!
//! * [`wire`] is zero-copy views over packet bytes (Ethernet, ARP, IPv4, IPv6, ICMP/ICMPv6,
//!   UDP, TCP, VXLAN) and the internet checksum.
//! * [`dataplane`] is the packet core: peer table, encap/decap returning verdicts, TSO split,
//!   receive coalescing, the ICMP error rate limit, drop counters, and the TUN and socket
//!   traits the packet loop is generic over.
//!
//! The rule, kept by construction: this crate does no IO. Its dependencies are pure
//! computation (thiserror, ipnet, multiversion, bytemuck); it has no tokio, libc, netlink or
//! serde, reads no clock (callers pass the time in) and logs nothing (callers count
//! verdicts). Everything that talks to the OS lives in the `flannel-rs` crate, which
//! re-exports these modules as `flannel_rs::wire` and `flannel_rs::dataplane`. The test
//! `tests/no_io_deps.rs` fails if a forbidden dependency appears.

pub mod dataplane;
pub mod wire;
