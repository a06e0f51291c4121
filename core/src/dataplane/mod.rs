//! The sans-IO packet core of the userspace VXLAN backend.
//!
//! The IO layer reads an inner IP packet from TUN (with [`VXLAN_HEADROOM`] bytes free in front
//! of it) and calls [`encap`]; it receives a VXLAN datagram from the UDP socket and calls
//! [`decap`]. Each returns a verdict saying what to send where, with ranges into the same
//! buffer: headers are written in place, payloads are never copied. Offloaded TUN
//! super-packets are split by [`offload::gso_split`] into an arena already laid out for
//! in-place encapsulation.
//!
//! Nothing here does IO, reads a clock, allocates on the per-packet path (except the
//! caller-owned GSO arena) or logs: every outcome is a verdict, and every drop has a
//! [`DropReason`] that the caller counts in [`Counters`].

mod batch;
pub mod coalesce;
mod counters;
mod decap;
mod drop;
mod encap;
mod flow;
mod ndp;
pub mod offload;
mod peers;
pub mod ports;
mod ratelimit;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::wire::{ethernet, vxlan, EtherType, MacAddr};

pub use batch::gro_datagrams;
pub use counters::{Counters, CountersSnapshot};
pub use decap::decap;
pub use drop::DropReason;
pub use encap::encap;
pub use flow::flow_hash;
pub use peers::PeerTable;
pub use ratelimit::IcmpLimiter;

/// Bytes the IO layer must leave free in front of an inner packet: 8 (VXLAN) + 14 (inner
/// Ethernet).
pub const VXLAN_HEADROOM: usize = 22;

/// A remote node's VTEP, from its lease: where to send frames for its pod subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteVtep {
    /// Underlay address of the remote node (the lease's `PublicIP`/`PublicIPv6`).
    pub public_ip: IpAddr,
    /// The remote VTEP MAC (`VtepMAC` in the lease's backend data): inner destination MAC.
    pub mac: MacAddr,
    /// The remote VNI (`VNI` in the lease's backend data), written in the VXLAN header.
    pub vni: u32,
}

/// This node's VTEP: what the kernel's `flannel.<VNI>` device would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalVtep {
    /// VNI accepted on receive.
    pub vni: u32,
    /// Our VTEP MAC: inner source MAC on send, required inner destination MAC on receive.
    pub mac: MacAddr,
    /// Our VTEP IPv4 address (the subnet's network address, e.g. `10.244.1.0`): answers ARP
    /// and sources ICMP errors.
    pub addr_v4: Option<Ipv4Addr>,
    /// Our VTEP IPv6 address: sources ICMPv6 errors.
    pub addr_v6: Option<Ipv6Addr>,
    /// Source of the ICMP errors we write back to TUN, when it must differ from `addr_v4`:
    /// the kernel drops packets arriving on TUN from one of its own addresses (a "martian"
    /// with `accept_local=0`), and our VTEP address is assigned to the TUN device. The
    /// daemon uses Network's first address, which no node has.
    pub error_source_v4: Option<Ipv4Addr>,
    /// Same for ICMPv6.
    pub error_source_v6: Option<Ipv6Addr>,
    /// Our IPv4 pod subnet (the lease's): decapsulated IPv4 packets must be addressed into
    /// it. `None`: no IPv4 packet is delivered.
    pub subnet_v4: Option<Ipv4Net>,
    /// Our IPv6 pod subnet: same for IPv6.
    pub subnet_v6: Option<Ipv6Net>,
}

impl LocalVtep {
    /// True if `dst` is in our own subnet of its family (our VTEP address included).
    #[inline]
    pub fn owns(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(a) => self.subnet_v4.is_some_and(|n| n.contains(&a)),
            IpAddr::V6(a) => self.subnet_v6.is_some_and(|n| n.contains(&a)),
        }
    }
}

/// What to do with a packet read from TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncapVerdict {
    /// Send `buf[frame]` (VXLAN header + inner Ethernet + packet) as one UDP datagram to
    /// `dst` on the VXLAN port.
    Transmit {
        /// The remote node's public IP.
        dst: IpAddr,
        /// The VXLAN payload to send.
        frame: Range<usize>,
    },
    /// No peer owns the destination: write `buf[packet]` (an ICMP/ICMPv6 destination
    /// unreachable addressed to the sender) back to TUN.
    ReplyToTun {
        /// The ICMP error packet.
        packet: Range<usize>,
    },
    /// Drop the packet and count the reason.
    Drop(DropReason),
}

/// What to do with a VXLAN datagram received from the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecapVerdict {
    /// Write `buf[packet]` (the inner IP packet, trimmed to its header's length) to TUN.
    Deliver {
        /// The inner IP packet.
        packet: Range<usize>,
    },
    /// Send `buf[frame]` (a VXLAN datagram, e.g. an ARP reply) back to `dst` on the VXLAN
    /// port.
    Reply {
        /// The sender's public IP.
        dst: IpAddr,
        /// The VXLAN payload to send.
        frame: Range<usize>,
    },
    /// Drop the datagram and count the reason.
    Drop(DropReason),
}

const _: () = assert!(VXLAN_HEADROOM == vxlan::HEADER_LEN + ethernet::HEADER_LEN);

/// The 22 bytes of `buf` starting at `at`, if present.
#[inline]
fn headroom_mut(buf: &mut [u8], at: usize) -> Option<&mut [u8; VXLAN_HEADROOM]> {
    buf.get_mut(at..)?.first_chunk_mut::<VXLAN_HEADROOM>()
}

/// Writes the 22-byte VXLAN + Ethernet header template into `hdr`.
#[inline]
fn write_headers(
    hdr: &mut [u8; VXLAN_HEADROOM],
    vni: u32,
    dst: MacAddr,
    src: MacAddr,
    ethertype: EtherType,
) {
    let (vxlan_hdr, eth_hdr) = hdr.split_at_mut(vxlan::HEADER_LEN);
    vxlan::Packet::new_unchecked(vxlan_hdr).set_header(vni);
    let mut eth = ethernet::Frame::new_unchecked(eth_hdr);
    eth.set_dst_addr(dst);
    eth.set_src_addr(src);
    eth.set_ethertype(ethertype);
}

/// A validated inner IP packet: its length per its header and its addresses.
#[derive(Debug, Clone, Copy)]
struct IpInfo {
    /// Version (4 or 6).
    version: u8,
    /// Total length according to the header (≤ the bytes present).
    len: usize,
    /// Source address.
    src: IpAddr,
    /// Destination address.
    dst: IpAddr,
}

/// Validates an IP packet enough to forward it: version, header and total lengths.
#[inline]
fn inspect_ip(p: &[u8]) -> Result<IpInfo, DropReason> {
    use crate::wire::{ipv4, ipv6};
    match p.first().map(|b| b >> 4) {
        None => Err(DropReason::Truncated),
        Some(4) => {
            let pkt = ipv4::Packet::new_checked(p).map_err(DropReason::from_wire)?;
            Ok(IpInfo {
                version: 4,
                len: usize::from(pkt.total_len()),
                src: pkt.src_addr().into(),
                dst: pkt.dst_addr().into(),
            })
        }
        Some(6) => {
            let pkt = ipv6::Packet::new_checked(p).map_err(DropReason::from_wire)?;
            Ok(IpInfo {
                version: 6,
                len: pkt.total_len(),
                src: pkt.src_addr().into(),
                dst: pkt.dst_addr().into(),
            })
        }
        Some(_) => Err(DropReason::MalformedIp),
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod testutil {
    //! Packet builders shared by the data-plane tests (and, with the `test-util` feature, by
    //! the main crate's tests).
    use super::*;
    use crate::wire::{ipv4, ipv6, IpProtocol};
    use ipnet::IpNet;

    /// An IPv4 packet with `payload` and a valid header checksum.
    pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 20 + payload.len()];
        let repr = ipv4::Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::from(proto),
            payload_len: payload.len(),
            hop_limit: 64,
        };
        repr.emit(&mut ipv4::Packet::new_unchecked(&mut v[..]))
            .unwrap();
        v[20..].copy_from_slice(payload);
        v
    }

    /// An IPv6 packet with `payload`.
    pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 40 + payload.len()];
        let repr = ipv6::Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::from(nh),
            payload_len: payload.len(),
            hop_limit: 64,
        };
        repr.emit(&mut ipv6::Packet::new_unchecked(&mut v[..]))
            .unwrap();
        v[40..].copy_from_slice(payload);
        v
    }

    /// Test node `n` (1 to 6) as its own VTEP: VNI 1, MAC 02:nn:00:00:00:0n (aa, bb, cc, … for
    /// 1, 2, 3, …), subnets 10.244.n.0/24 and fd10:244:n::/64, VTEP addresses their first.
    pub fn test_node(n: u8) -> LocalVtep {
        LocalVtep {
            vni: 1,
            mac: MacAddr([0x02, 0x99 + 0x11 * n, 0, 0, 0, n]),
            addr_v4: Some(Ipv4Addr::new(10, 244, n, 0)),
            addr_v6: Some(Ipv6Addr::new(0xfd10, 0x244, u16::from(n), 0, 0, 0, 0, 0)),
            error_source_v4: None,
            error_source_v6: None,
            subnet_v4: Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).ok(),
            subnet_v6: Ipv6Net::new(
                Ipv6Addr::new(0xfd10, 0x244, u16::from(n), 0, 0, 0, 0, 0),
                64,
            )
            .ok(),
        }
    }

    /// Test node `n` as its peers see it: [`test_node`]'s MAC and VNI at 198.18.0.n.
    pub fn test_peer(n: u8) -> RemoteVtep {
        let node = test_node(n);
        RemoteVtep {
            public_ip: Ipv4Addr::new(198, 18, 0, n).into(),
            mac: node.mac,
            vni: node.vni,
        }
    }

    /// A peer table holding test nodes `nodes` ([`test_peer`]) with both their subnets.
    pub fn test_table(nodes: &[u8]) -> PeerTable {
        PeerTable::new(nodes.iter().flat_map(|&n| {
            let node = test_node(n);
            let subnets = [node.subnet_v4.map(IpNet::V4), node.subnet_v6.map(IpNet::V6)];
            subnets
                .into_iter()
                .flatten()
                .map(move |s| (s, test_peer(n)))
        }))
    }

    /// `packet` placed after `headroom` zero bytes, with `tail` spare bytes after it.
    pub fn with_headroom(packet: &[u8], headroom: usize, tail: usize) -> (Vec<u8>, Range<usize>) {
        let mut v = vec![0u8; headroom];
        v.extend_from_slice(packet);
        v.resize(v.len() + tail, 0);
        (v, headroom..headroom + packet.len())
    }

    /// [`encap`] with a fresh (full) ICMP limiter at time zero.
    pub fn encap_now(
        buf: &mut [u8],
        packet: Range<usize>,
        table: &PeerTable,
        local: &LocalVtep,
    ) -> EncapVerdict {
        encap(
            buf,
            packet,
            table,
            local,
            &mut IcmpLimiter::default(),
            std::time::Duration::ZERO,
        )
    }

    /// True if the one's-complement sum of `data` verifies (is 0xffff).
    #[cfg(test)]
    pub fn verifies(data: &[u8]) -> bool {
        crate::wire::checksum::tests::naive_sum(data) == 0xffff
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use ipnet::IpNet;
    use proptest::prelude::*;

    fn arb_public() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u16>().prop_map(|x| IpAddr::V4(Ipv4Addr::new(198, 18, (x >> 8) as u8, x as u8))),
            any::<u16>().prop_map(|x| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, x))),
        ]
    }

    fn arb_mac() -> impl Strategy<Value = MacAddr> {
        any::<[u8; 6]>().prop_map(MacAddr::local_unicast)
    }

    /// An inner packet from node A's subnet to node B's, IPv4 or IPv6, any payload.
    fn arb_inner() -> impl Strategy<Value = Vec<u8>> {
        let v4 = (
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..1500),
        )
            .prop_map(|(s, d, p, pl)| {
                ipv4_packet(
                    Ipv4Addr::new(10, 244, 1, s),
                    Ipv4Addr::new(10, 244, 2, d),
                    p,
                    &pl,
                )
            });
        let v6 = (
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..1500),
        )
            .prop_map(|(s, d, nh, pl)| {
                let s = Ipv6Addr::from((0xfd10_0244_0001_0000u128 << 64) | u128::from(s));
                let d = Ipv6Addr::from((0xfd10_0244_0002_0000u128 << 64) | u128::from(d));
                ipv6_packet(s, d, nh, &pl)
            });
        prop_oneof![v4, v6]
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    proptest! {
        #[test]
        fn encap_then_decap_is_identity(
            inner in arb_inner(), vni in 0u32..=crate::wire::vxlan::MAX_VNI,
            pub_a in arb_public(), pub_b in arb_public(), mac_a in arb_mac(), mac_b in arb_mac(),
            headroom in 22usize..64, tail in 0usize..16, rx_offset in 0usize..8,
        ) {
            prop_assume!(pub_a != pub_b);
            let node = |mac, v4: &str, v6: &str| LocalVtep {
                vni, mac, addr_v4: None, addr_v6: None, error_source_v4: None, error_source_v6: None,
                subnet_v4: v4.parse().ok(), subnet_v6: v6.parse().ok(),
            };
            let a = node(mac_a, "10.244.1.0/24", "fd10:244:1::/64");
            let b = node(mac_b, "10.244.2.0/24", "fd10:244:2::/64");
            let table_a = PeerTable::new([
                (net("10.244.2.0/24"), RemoteVtep { public_ip: pub_b, mac: mac_b, vni }),
                (net("fd10:244:2::/64"), RemoteVtep { public_ip: pub_b, mac: mac_b, vni }),
            ]);
            let table_b = PeerTable::new([
                (net("10.244.1.0/24"), RemoteVtep { public_ip: pub_a, mac: mac_a, vni }),
                (net("fd10:244:1::/64"), RemoteVtep { public_ip: pub_a, mac: mac_a, vni }),
            ]);
            let (mut tx, range) = with_headroom(&inner, headroom, tail);
            let v = encap_now(&mut tx, range, &table_a, &a);
            let EncapVerdict::Transmit { dst, frame } = v else {
                return Err(TestCaseError::fail(format!("{v:?}")));
            };
            prop_assert_eq!(dst, pub_b);
            prop_assert_eq!(frame.len(), VXLAN_HEADROOM + inner.len());
            // "The network": the UDP payload lands at some offset of B's receive buffer.
            let mut rx = vec![0xa5u8; rx_offset];
            rx.extend_from_slice(&tx[frame]);
            let n = rx.len();
            let v = decap(&mut rx, rx_offset..n, pub_a, &table_b, &b);
            let DecapVerdict::Deliver { packet } = v else {
                return Err(TestCaseError::fail(format!("{v:?}")));
            };
            prop_assert_eq!(&rx[packet], &inner[..]);
        }
    }
}
