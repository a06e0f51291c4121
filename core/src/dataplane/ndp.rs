//! IPv6 neighbour discovery for our VTEP address: what the ARP responder in
//! [`super::decap`] does for IPv4. Kernel peers have permanent neighbour entries for our
//! VTEP address, so solicitations are rare; when one comes (for our address, from the
//! sending peer's subnet or from a link-local address behind the sending peer's VTEP MAC)
//! it is answered in place with a neighbour advertisement. A kernel peer resolving our
//! address sends from its device's link-local address: the solicitation goes to a
//! link-local-scope multicast group, so that is the source the kernel picks.

use std::net::{IpAddr, Ipv6Addr};
use std::ops::Range;

use super::VXLAN_HEADROOM;
use super::{headroom_mut, write_headers, DecapVerdict, DropReason, LocalVtep, PeerTable};
use crate::wire::{ethernet, icmp, ipv6, EtherType, IpProtocol, MacAddr};

/// ICMPv6 NS/NA body: type, code, checksum, flags/reserved, target address.
const ND_LEN: usize = 24;
/// The target (source) link-layer address option: type, length 1 (8 bytes), MAC.
const LLADDR_OPT_LEN: usize = 8;
/// Option type: target link-layer address.
const OPT_TARGET_LLADDR: u8 = 2;
/// NA flags: Solicited and Override (not a router).
const NA_FLAGS: u8 = 0x60;
/// Hop limit every ND message carries (RFC 4861 §7.1.1: anything else is dropped).
const ND_HOP_LIMIT: u8 = 255;

/// The Ethernet address IPv6 multicast to the solicited-node group of `addr` maps to
/// (`33:33:ff:` + its last 24 bits).
pub(super) fn solicited_node_mac(addr: Ipv6Addr) -> MacAddr {
    let o = addr.octets();
    MacAddr([0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// If the IPv6 packet in `buf[datagram]` (after the VXLAN + Ethernet headers) is an ICMPv6
/// neighbour solicitation, its verdict: a neighbour advertisement for `src` written in place
/// when it asks for our VTEP address from an address of the sending peer's subnet, else a
/// drop. `None` for any other packet. Nothing outside `buf[datagram]` is read or written;
/// without room for the target link-layer option (a unicast solicitation without its own
/// option), the answer goes without it, as RFC 4861 §7.2.4 allows.
pub(super) fn answer_ndp(
    buf: &mut [u8],
    datagram: Range<usize>,
    src: IpAddr,
    table: &PeerTable,
    local: &LocalVtep,
) -> Option<DecapVerdict> {
    let Range { start, end } = datagram;
    let ip_at = start + VXLAN_HEADROOM;
    let bytes = buf.get(ip_at..end)?;
    let pkt = ipv6::Packet::new_checked(bytes).ok()?;
    if pkt.next_header() != IpProtocol::Icmpv6 {
        return None;
    }
    let body = pkt.payload();
    if body.first() != Some(&icmp::V6_NEIGHBOR_SOLICIT) {
        return None;
    }
    let drop = |r| Some(DecapVerdict::Drop(r));
    let (asker, hop_limit) = (pkt.src_addr(), pkt.hop_limit());
    let Some(target) = body
        .get(8..ND_LEN)
        .and_then(|t| <[u8; 16]>::try_from(t).ok())
    else {
        return drop(DropReason::NdpNotForUs);
    };
    let valid = hop_limit == ND_HOP_LIMIT
        && body.get(1) == Some(&0)
        && icmp::Packet::new_unchecked(body).verify_checksum_v6(&asker, &pkt.dst_addr());
    let Some(ours) = local.addr_v6 else {
        return drop(DropReason::NdpNotForUs);
    };
    if !valid || Ipv6Addr::from(target) != ours {
        return drop(DropReason::NdpNotForUs);
    }
    let asker_mac = ethernet::Frame::new_unchecked(buf.get(start + 8..ip_at)?).src_addr();
    // Duplicate address detection (unspecified source) is never answered.
    let from_peer = if asker.is_unicast_link_local() {
        table.is_vtep_of(src, asker_mac)
    } else {
        table.owns_source(src, asker.into())
    };
    if !from_peer {
        return drop(DropReason::InnerSourceMismatch);
    }
    let room = end - ip_at;
    let with_opt = ipv6::HEADER_LEN + ND_LEN + LLADDR_OPT_LEN;
    let reply_len = if room >= with_opt {
        with_opt
    } else {
        ipv6::HEADER_LEN + ND_LEN
    };
    let reply = buf.get_mut(ip_at..ip_at + reply_len)?;
    let (ip_hdr, message) = reply.split_at_mut(ipv6::HEADER_LEN);
    let repr = ipv6::Repr {
        src_addr: ours,
        dst_addr: asker,
        next_header: IpProtocol::Icmpv6,
        payload_len: message.len(),
        hop_limit: ND_HOP_LIMIT,
    };
    if repr
        .emit(&mut ipv6::Packet::new_unchecked(&mut *ip_hdr))
        .is_err()
    {
        return drop(DropReason::Truncated);
    }
    message.fill(0);
    message[0] = icmp::V6_NEIGHBOR_ADVERT;
    message[4] = NA_FLAGS;
    message[8..ND_LEN].copy_from_slice(&ours.octets());
    if let Some(opt) = message.get_mut(ND_LEN..ND_LEN + LLADDR_OPT_LEN) {
        opt[0] = OPT_TARGET_LLADDR;
        opt[1] = 1;
        opt[2..].copy_from_slice(&local.mac.0);
    }
    icmp::Packet::new_unchecked(message).fill_checksum_v6(&ours, &asker);
    let hdr = headroom_mut(buf, start)?;
    write_headers(hdr, local.vni, asker_mac, local.mac, EtherType::Ipv6);
    Some(DecapVerdict::Reply {
        dst: src,
        frame: start..ip_at + reply_len,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::*;
    use ipnet::IpNet;

    /// We are node 2; the solicitation comes from node 1's VTEP address over the underlay.
    fn table() -> PeerTable {
        PeerTable::new([
            ("fd10:244:1::/64".parse::<IpNet>().unwrap(), test_peer(1)),
            ("fd10:244:3::/64".parse::<IpNet>().unwrap(), test_peer(3)),
        ])
    }

    fn vtep(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd10, 0x244, n, 0, 0, 0, 0, 0)
    }

    /// A VXLAN datagram holding a neighbour solicitation for `target` from `from`, with the
    /// source link-layer option when `opt`, from node 1's VTEP MAC.
    fn solicitation(from: Ipv6Addr, target: Ipv6Addr, hop_limit: u8, opt: bool) -> Vec<u8> {
        solicitation_from_mac(from, target, hop_limit, opt, test_node(1).mac)
    }

    /// [`solicitation`] with the inner Ethernet source `mac`.
    fn solicitation_from_mac(
        from: Ipv6Addr,
        target: Ipv6Addr,
        hop_limit: u8,
        opt: bool,
        mac: MacAddr,
    ) -> Vec<u8> {
        let mut body = vec![icmp::V6_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&target.octets());
        if opt {
            body.extend_from_slice(&[1, 1]);
            body.extend_from_slice(&test_node(1).mac.0);
        }
        let t = target.octets();
        let group = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        icmp::Packet::new_unchecked(&mut body[..]).fill_checksum_v6(&from, &group);
        let mut ip = ipv6_packet(from, group, 58, &body);
        ip[7] = hop_limit;
        let mut d = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        d.extend_from_slice(&solicited_node_mac(target).0);
        d.extend_from_slice(&mac.0);
        d.extend_from_slice(&0x86ddu16.to_be_bytes());
        d.extend_from_slice(&ip);
        d
    }

    fn run(d: &[u8]) -> (DecapVerdict, Vec<u8>) {
        let mut b = d.to_vec();
        let v = decap(
            &mut b,
            0..d.len(),
            test_peer(1).public_ip,
            &table(),
            &test_node(2),
        );
        (v, b)
    }

    #[test]
    fn answers_a_solicitation_for_our_vtep_address() {
        for opt in [true, false] {
            let d = solicitation(vtep(1), vtep(2), 255, opt);
            let (v, b) = run(&d);
            let DecapVerdict::Reply { dst, frame } = v else {
                panic!("{v:?}")
            };
            assert_eq!(dst, test_peer(1).public_ip);
            let f = &b[frame];
            assert!(f.len() <= d.len(), "the reply stays within the datagram");
            let eth = ethernet::Frame::new_checked(&f[8..]).unwrap();
            assert_eq!(eth.dst_addr(), test_node(1).mac);
            assert_eq!(eth.src_addr(), test_node(2).mac);
            assert_eq!(eth.ethertype(), EtherType::Ipv6);
            let ip = ipv6::Packet::new_checked(eth.payload()).unwrap();
            assert_eq!((ip.src_addr(), ip.dst_addr()), (vtep(2), vtep(1)));
            assert_eq!(ip.hop_limit(), 255);
            let na = ip.payload();
            assert_eq!(na.len(), if opt { 32 } else { 24 });
            assert_eq!(na[0], icmp::V6_NEIGHBOR_ADVERT);
            assert_eq!(na[4], 0x60, "solicited + override");
            assert_eq!(&na[8..24], &vtep(2).octets());
            if opt {
                assert_eq!(&na[24..26], &[2, 1]);
                assert_eq!(&na[26..32], &test_node(2).mac.0);
            }
            assert!(icmp::Packet::new_unchecked(na).verify_checksum_v6(&vtep(2), &vtep(1)));
        }
    }

    /// What a kernel `flannel-v6.<VNI>` sends: the solicitation from its link-local address,
    /// answered when it comes from the sending peer's VTEP MAC, dropped from any other MAC.
    #[test]
    fn answers_a_link_local_solicitation_from_the_peers_vtep() {
        let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x99, 0xaaff, 0xfe00, 1);
        let d = solicitation(link_local, vtep(2), 255, true);
        let (v, b) = run(&d);
        let DecapVerdict::Reply { dst, frame } = v else {
            panic!("{v:?}")
        };
        assert_eq!(dst, test_peer(1).public_ip);
        let eth = ethernet::Frame::new_checked(&b[frame][8..]).unwrap();
        assert_eq!(eth.dst_addr(), test_node(1).mac);
        let ip = ipv6::Packet::new_checked(eth.payload()).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (vtep(2), link_local));
        let na = ip.payload();
        assert_eq!(na[0], icmp::V6_NEIGHBOR_ADVERT);
        assert_eq!(&na[26..32], &test_node(2).mac.0);
        assert!(icmp::Packet::new_unchecked(na).verify_checksum_v6(&vtep(2), &link_local));
        // Node 3's VTEP MAC (or any other) behind node 1's underlay address is not node 1.
        for mac in [test_node(3).mac, MacAddr([0x02, 0, 0, 0, 0, 0x42])] {
            let d = solicitation_from_mac(link_local, vtep(2), 255, true, mac);
            assert_eq!(
                run(&d).0,
                DecapVerdict::Drop(DropReason::InnerSourceMismatch)
            );
        }
    }

    #[test]
    fn other_solicitations_are_dropped() {
        let drop = |d: &[u8]| run(d).0;
        // Another address's solicited-node group is not ours; one sharing ours is checked.
        let other = solicitation(
            vtep(1),
            Ipv6Addr::new(0xfd10, 0x244, 2, 0, 0, 0, 0, 9),
            255,
            true,
        );
        assert_eq!(drop(&other), DecapVerdict::Drop(DropReason::WrongDstMac));
        let same_group = Ipv6Addr::new(0xfd10, 0x244, 2, 1, 0, 0, 0, 0);
        let other = solicitation(vtep(1), same_group, 255, true);
        assert_eq!(drop(&other), DecapVerdict::Drop(DropReason::NdpNotForUs));
        let routed = solicitation(vtep(1), vtep(2), 64, true);
        assert_eq!(drop(&routed), DecapVerdict::Drop(DropReason::NdpNotForUs));
        let mut bad_sum = solicitation(vtep(1), vtep(2), 255, true);
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 1;
        assert_eq!(drop(&bad_sum), DecapVerdict::Drop(DropReason::NdpNotForUs));
        // Node 3's address, sent from node 1's underlay address.
        let spoofed = solicitation(vtep(3), vtep(2), 255, true);
        assert_eq!(
            drop(&spoofed),
            DecapVerdict::Drop(DropReason::InnerSourceMismatch)
        );
        let dad = solicitation(Ipv6Addr::UNSPECIFIED, vtep(2), 255, true);
        assert_eq!(
            drop(&dad),
            DecapVerdict::Drop(DropReason::InnerSourceMismatch)
        );
        // The IPv4 plane has no IPv6 VTEP address.
        let mut b = solicitation(vtep(1), vtep(2), 255, true);
        let len = b.len();
        let v4_only = LocalVtep {
            addr_v6: None,
            subnet_v6: None,
            ..test_node(2)
        };
        let v = decap(&mut b, 0..len, test_peer(1).public_ip, &table(), &v4_only);
        assert_eq!(v, DecapVerdict::Drop(DropReason::WrongDstMac));
    }

    #[test]
    fn truncated_solicitations_never_touch_bytes_past_the_datagram() {
        let d = solicitation(vtep(1), vtep(2), 255, true);
        for cut in 0..d.len() {
            let mut b = d.clone();
            b.extend_from_slice(&[0xa5; 16]);
            let _ = decap(
                &mut b,
                0..cut,
                test_peer(1).public_ip,
                &table(),
                &test_node(2),
            );
            assert!(b[d.len()..].iter().all(|&x| x == 0xa5), "cut {cut}");
            assert_eq!(&b[cut..d.len()], &d[cut..], "cut {cut}");
        }
    }
}
