//! Underlay → TUN: validate a VXLAN datagram and unwrap its inner packet, or answer ARP.

use std::net::IpAddr;
use std::ops::Range;

use super::{
    headroom_mut, inspect_ip, write_headers, DecapVerdict, DropReason, LocalVtep, PeerTable,
    VXLAN_HEADROOM,
};
use crate::wire::{arp, vxlan, EtherType, MacAddr};

/// Decapsulates the VXLAN datagram `buf[datagram]` (the UDP payload) received from `src`.
///
/// Call once per datagram received on the VXLAN port. Checks, in order: `src` is a peer's
/// public IP, the datagram holds VXLAN + Ethernet headers, the I flag, the VNI equals ours,
/// the inner destination MAC is ours (broadcast only for ARP), and the EtherType. IPv4/IPv6
/// packets are delivered trimmed to their header's length; an ARP request for our VTEP
/// address is answered in place (the reply is a VXLAN datagram for `src`).
pub fn decap(
    buf: &mut [u8],
    datagram: Range<usize>,
    src: IpAddr,
    table: &PeerTable,
    local: &LocalVtep,
) -> DecapVerdict {
    let Range { start, end } = datagram;
    let Some(d) = buf.get(start..end) else {
        return DecapVerdict::Drop(DropReason::InvalidBuffer);
    };
    if !table.is_known_source(src) {
        return DecapVerdict::Drop(DropReason::UnknownSource);
    }
    let Some(hdr) = d.first_chunk::<VXLAN_HEADROOM>() else {
        return DecapVerdict::Drop(DropReason::Truncated);
    };
    if hdr[0] & vxlan::FLAG_I == 0 {
        return DecapVerdict::Drop(DropReason::VxlanFlagNotSet);
    }
    let vni = u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]);
    if vni != local.vni {
        return DecapVerdict::Drop(DropReason::WrongVni);
    }
    let dst_mac = MacAddr([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13]]);
    let ethertype = EtherType::from(u16::from_be_bytes([hdr[20], hdr[21]]));
    let for_us = dst_mac == local.mac || (dst_mac.is_broadcast() && ethertype == EtherType::Arp);
    if !for_us {
        return DecapVerdict::Drop(DropReason::WrongDstMac);
    }
    let inner_start = start + VXLAN_HEADROOM;
    let inner = &d[VXLAN_HEADROOM..];
    match ethertype {
        EtherType::Ipv4 | EtherType::Ipv6 => {
            let want = if ethertype == EtherType::Ipv4 { 4 } else { 6 };
            match inspect_ip(inner) {
                Ok(info) if info.version == want => DecapVerdict::Deliver {
                    packet: inner_start..inner_start + info.len,
                },
                Ok(_) => DecapVerdict::Drop(DropReason::MalformedIp),
                Err(r) => DecapVerdict::Drop(r),
            }
        }
        EtherType::Arp => answer_arp(buf, start, src, local),
        EtherType::Vlan | EtherType::QinQ => DecapVerdict::Drop(DropReason::VlanTagged),
        EtherType::Unknown(_) => DecapVerdict::Drop(DropReason::UnsupportedEtherType),
    }
}

/// Answers an ARP request for our VTEP address by rewriting the datagram at `buf[start..]`
/// into a reply.
fn answer_arp(buf: &mut [u8], start: usize, src: IpAddr, local: &LocalVtep) -> DecapVerdict {
    let arp_at = start + VXLAN_HEADROOM;
    let Some(bytes) = buf.get(arp_at..) else {
        return DecapVerdict::Drop(DropReason::Truncated);
    };
    let request = match arp::Packet::new_checked(bytes).and_then(|p| arp::Repr::parse(&p)) {
        Ok(r) => r,
        Err(crate::wire::WireError::Truncated { .. }) => {
            return DecapVerdict::Drop(DropReason::Truncated)
        }
        Err(_) => return DecapVerdict::Drop(DropReason::MalformedArp),
    };
    let Some(our_ip) = local.addr_v4 else {
        return DecapVerdict::Drop(DropReason::ArpNotForUs);
    };
    if request.operation != arp::Operation::Request || request.target_protocol_addr != our_ip {
        return DecapVerdict::Drop(DropReason::ArpNotForUs);
    }
    let reply = arp::Repr {
        operation: arp::Operation::Reply,
        source_hardware_addr: local.mac,
        source_protocol_addr: our_ip,
        target_hardware_addr: request.source_hardware_addr,
        target_protocol_addr: request.source_protocol_addr,
    };
    let end = arp_at + arp::PACKET_LEN;
    let Some(hdr) = headroom_mut(buf, start) else {
        return DecapVerdict::Drop(DropReason::Truncated);
    };
    let (vni, dst_mac) = (local.vni, request.source_hardware_addr);
    write_headers(hdr, vni, dst_mac, local.mac, EtherType::Arp.into());
    match buf.get_mut(arp_at..end) {
        Some(a) => reply.emit(&mut arp::Packet::new_unchecked(a)),
        None => return DecapVerdict::Drop(DropReason::Truncated),
    }
    DecapVerdict::Reply {
        dst: src,
        frame: start..end,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use crate::wire::{arp, ipv4, vxlan, EtherType, MacAddr};
    use ipnet::IpNet;
    use proptest::prelude::*;

    fn local() -> LocalVtep {
        LocalVtep {
            vni: 1,
            mac: MacAddr([0x02, 0xbb, 0, 0, 0, 2]),
            addr_v4: Some(Ipv4Addr::new(10, 244, 2, 0)),
            addr_v6: Some("fd10:244:2::".parse().unwrap()),
            error_source_v4: None,
            error_source_v6: None,
        }
    }

    fn sender() -> RemoteVtep {
        RemoteVtep {
            public_ip: "198.18.0.1".parse().unwrap(),
            mac: MacAddr([0x02, 0xaa, 0, 0, 0, 1]),
            vni: 1,
        }
    }

    fn table() -> PeerTable {
        PeerTable::new([("10.244.1.0/24".parse::<IpNet>().unwrap(), sender())])
    }

    /// A VXLAN datagram: header with `flags`/`vni`, Ethernet `dst` ← sender, `ethertype`, `payload`.
    fn datagram(flags: u8, vni: u32, dst: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags, 0, 0, 0];
        v.extend_from_slice(&(vni << 8).to_be_bytes());
        v.extend_from_slice(&dst.0);
        v.extend_from_slice(&sender().mac.0);
        v.extend_from_slice(&ethertype.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn inner() -> Vec<u8> {
        ipv4_packet(
            Ipv4Addr::new(10, 244, 1, 5),
            Ipv4Addr::new(10, 244, 2, 7),
            17,
            &[1, 2, 3, 4, 0, 8, 0, 0],
        )
    }

    fn run(d: &[u8]) -> DecapVerdict {
        let mut b = d.to_vec();
        decap(&mut b, 0..d.len(), sender().public_ip, &table(), &local())
    }

    #[test]
    fn delivers_ipv4_trimmed() {
        let mut d = datagram(0x08, 1, local().mac, 0x0800, &inner());
        d.extend_from_slice(&[0; 6]); // Ethernet padding
        let mut buf = vec![0u8; 3];
        buf.extend_from_slice(&d);
        let v = decap(
            &mut buf,
            3..3 + d.len(),
            sender().public_ip,
            &table(),
            &local(),
        );
        assert_eq!(
            v,
            DecapVerdict::Deliver {
                packet: 25..25 + inner().len()
            }
        );
    }

    #[test]
    fn reserved_bits_are_ignored() {
        let mut d = datagram(0xff, 1, local().mac, 0x0800, &inner());
        d[1..4].copy_from_slice(&[0xff; 3]);
        d[7] = 0xff;
        assert!(matches!(run(&d), DecapVerdict::Deliver { .. }));
    }

    #[test]
    fn each_check_has_its_reason() {
        let good = datagram(0x08, 1, local().mac, 0x0800, &inner());
        let mut b = good.clone();
        let stranger = "198.18.0.99".parse().unwrap();
        assert_eq!(
            decap(&mut b, 0..good.len(), stranger, &table(), &local()),
            DecapVerdict::Drop(DropReason::UnknownSource)
        );
        assert_eq!(
            decap(
                &mut b,
                0..good.len() + 1,
                sender().public_ip,
                &table(),
                &local()
            ),
            DecapVerdict::Drop(DropReason::InvalidBuffer)
        );
        let drop = |r| DecapVerdict::Drop(r);
        assert_eq!(run(&good[..21]), drop(DropReason::Truncated));
        assert_eq!(run(&[]), drop(DropReason::Truncated));
        assert_eq!(
            run(&datagram(0x00, 1, local().mac, 0x0800, &inner())),
            drop(DropReason::VxlanFlagNotSet)
        );
        assert_eq!(
            run(&datagram(0x08, 2, local().mac, 0x0800, &inner())),
            drop(DropReason::WrongVni)
        );
        let other = MacAddr([0x02, 0, 0, 0, 0, 9]);
        assert_eq!(
            run(&datagram(0x08, 1, other, 0x0800, &inner())),
            drop(DropReason::WrongDstMac)
        );
        assert_eq!(
            run(&datagram(0x08, 1, MacAddr::BROADCAST, 0x0800, &inner())),
            drop(DropReason::WrongDstMac)
        );
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x8100, &inner())),
            drop(DropReason::VlanTagged)
        );
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x88a8, &inner())),
            drop(DropReason::VlanTagged)
        );
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x88cc, &inner())),
            drop(DropReason::UnsupportedEtherType)
        );
        // IPv4 EtherType with an IPv6 packet, a short packet, a lying total length.
        let six = ipv6_packet(
            "fd10:244:1::1".parse().unwrap(),
            "fd10:244:2::1".parse().unwrap(),
            17,
            &[0; 8],
        );
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x0800, &six)),
            drop(DropReason::MalformedIp)
        );
        assert!(matches!(
            run(&datagram(0x08, 1, local().mac, 0x86dd, &six)),
            DecapVerdict::Deliver { .. }
        ));
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x0800, &inner()[..19])),
            drop(DropReason::Truncated)
        );
        let mut long = inner();
        long[3] += 1;
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x0800, &long)),
            drop(DropReason::Truncated)
        );
        let mut bad = inner();
        bad[0] = 0x44; // IHL below 5

        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x0800, &bad)),
            drop(DropReason::MalformedIp)
        );
        assert_eq!(
            run(&datagram(0x08, 1, local().mac, 0x0800, &[])),
            drop(DropReason::Truncated)
        );
    }

    fn arp_request(target: Ipv4Addr, op: u16) -> Vec<u8> {
        let r = arp::Repr {
            operation: op.into(),
            source_hardware_addr: sender().mac,
            source_protocol_addr: Ipv4Addr::new(10, 244, 1, 0),
            target_hardware_addr: MacAddr::ZERO,
            target_protocol_addr: target,
        };
        let mut v = vec![0u8; 28];
        r.emit(&mut arp::Packet::new_unchecked(&mut v[..]));
        v
    }

    #[test]
    fn answers_arp_for_our_address() {
        for dst in [MacAddr::BROADCAST, local().mac] {
            let mut payload = arp_request(Ipv4Addr::new(10, 244, 2, 0), 1);
            payload.extend_from_slice(&[0; 18]); // minimum-frame padding
            let d = datagram(0x08, 1, dst, 0x0806, &payload);
            let mut buf = vec![0xeeu8; 4];
            buf.extend_from_slice(&d);
            let v = decap(
                &mut buf,
                4..4 + d.len(),
                sender().public_ip,
                &table(),
                &local(),
            );
            let DecapVerdict::Reply { dst: to, frame } = v else {
                panic!("{v:?}")
            };
            assert_eq!(to, sender().public_ip);
            assert_eq!(frame, 4..4 + 22 + 28);
            let f = &buf[frame];
            let vx = vxlan::Packet::new_checked(f).unwrap();
            assert_eq!(vxlan::Repr::parse(&vx), Ok(vxlan::Repr { vni: 1 }));
            assert_eq!(&f[1..4], &[0, 0, 0]);
            let eth = crate::wire::ethernet::Frame::new_checked(vx.payload()).unwrap();
            assert_eq!(eth.dst_addr(), sender().mac);
            assert_eq!(eth.src_addr(), local().mac);
            assert_eq!(eth.ethertype(), EtherType::Arp);
            let a = arp::Repr::parse(&arp::Packet::new_checked(eth.payload()).unwrap()).unwrap();
            assert_eq!(a.operation, arp::Operation::Reply);
            assert_eq!(a.source_hardware_addr, local().mac);
            assert_eq!(a.source_protocol_addr, Ipv4Addr::new(10, 244, 2, 0));
            assert_eq!(a.target_hardware_addr, sender().mac);
            assert_eq!(a.target_protocol_addr, Ipv4Addr::new(10, 244, 1, 0));
        }
    }

    #[test]
    fn other_arp_is_dropped() {
        let drop = |r| DecapVerdict::Drop(r);
        let b = MacAddr::BROADCAST;
        assert_eq!(
            run(&datagram(
                0x08,
                1,
                b,
                0x0806,
                &arp_request(Ipv4Addr::new(10, 244, 2, 1), 1)
            )),
            drop(DropReason::ArpNotForUs)
        );
        assert_eq!(
            run(&datagram(
                0x08,
                1,
                b,
                0x0806,
                &arp_request(Ipv4Addr::new(10, 244, 2, 0), 2)
            )),
            drop(DropReason::ArpNotForUs)
        );
        assert_eq!(
            run(&datagram(
                0x08,
                1,
                b,
                0x0806,
                &arp_request(Ipv4Addr::new(10, 244, 2, 0), 1)[..27]
            )),
            drop(DropReason::Truncated)
        );
        let mut foreign = arp_request(Ipv4Addr::new(10, 244, 2, 0), 1);
        foreign[1] = 6; // IEEE 802 hardware type
        assert_eq!(
            run(&datagram(0x08, 1, b, 0x0806, &foreign)),
            drop(DropReason::MalformedArp)
        );
        let mut no_v4 = local();
        no_v4.addr_v4 = None;
        let d = datagram(
            0x08,
            1,
            b,
            0x0806,
            &arp_request(Ipv4Addr::new(10, 244, 2, 0), 1),
        );
        let mut buf = d.clone();
        assert_eq!(
            decap(&mut buf, 0..d.len(), sender().public_ip, &table(), &no_v4),
            drop(DropReason::ArpNotForUs)
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120),
                                start in 0usize..10, cut in 0usize..10) {
            let mut b = bytes.clone();
            let end = b.len().saturating_sub(cut);
            let _ = decap(&mut b, start..end, sender().public_ip, &table(), &local());
        }

        #[test]
        fn plausible_garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..80),
                                          et in prop_oneof![Just(0x0800u16), Just(0x86dd), Just(0x0806), any::<u16>()],
                                          bcast in any::<bool>()) {
            let dst = if bcast { MacAddr::BROADCAST } else { local().mac };
            let d = datagram(0x08, 1, dst, et, &tail);
            let v = run(&d);
            if let DecapVerdict::Deliver { packet } = &v {
                prop_assert!(packet.end <= d.len());
                prop_assert!(packet.len() >= ipv4::HEADER_LEN);
            }
        }
    }
}
