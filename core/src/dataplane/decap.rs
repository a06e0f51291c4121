//! Underlay → TUN: validate a VXLAN datagram and unwrap its inner packet, or answer ARP (and
//! NDP, module `ndp`).

use std::net::IpAddr;
use std::ops::Range;

use super::{
    headroom_mut, inspect_ip, ndp, write_headers, DecapVerdict, DropReason, LocalVtep, PeerTable,
    VXLAN_HEADROOM,
};
use crate::wire::{arp, ethernet, vxlan, EtherType};

/// Decapsulates the VXLAN datagram `buf[datagram]` (the UDP payload) received from `src`.
///
/// Call once per datagram received on the VXLAN port. Checks, in order: `src` is a peer's
/// public IP, the datagram holds VXLAN + Ethernet headers, the I flag, the VNI equals ours,
/// the inner destination MAC is ours (broadcast only for ARP, our solicited-node group only
/// for IPv6), and the EtherType.
///
/// IPv4/IPv6 packets are delivered, trimmed to their header's length, only if the peer whose
/// subnet contains the inner source is the one at `src` (a peer cannot speak for another
/// node's pods) and the inner destination is in our own subnet (we relay for nobody). An ARP
/// request for our VTEP address from an address in the sending peer's subnet is answered in
/// place (the reply is a VXLAN datagram for `src`), and so is an IPv6 neighbour solicitation
/// for it (module `ndp`). Nothing outside `buf[datagram]` is read
/// or written.
#[inline]
pub fn decap(
    buf: &mut [u8],
    datagram: Range<usize>,
    src: IpAddr,
    table: &PeerTable,
    local: &LocalVtep,
) -> DecapVerdict {
    match checked_decap(buf, datagram, src, table, local) {
        // Only a known peer's datagram passes the source binding, so the source lookup is
        // needed on drops only: the delivering path does one hash probe, not two.
        DecapVerdict::Drop(r) if r != DropReason::InvalidBuffer && !table.is_known_source(src) => {
            DecapVerdict::Drop(DropReason::UnknownSource)
        }
        v => v,
    }
}

/// [`decap`] without the unknown-source check: every verdict but `Drop` implies that `src`
/// is the public IP of the peer owning the inner source.
#[inline]
fn checked_decap(
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
    let Some(hdr) = d.first_chunk::<VXLAN_HEADROOM>() else {
        return DecapVerdict::Drop(DropReason::Truncated);
    };
    let (vxlan_hdr, eth_hdr) = hdr.split_at(vxlan::HEADER_LEN);
    let vxlan_hdr = vxlan::Packet::new_unchecked(vxlan_hdr);
    if !vxlan_hdr.vni_valid() {
        return DecapVerdict::Drop(DropReason::VxlanFlagNotSet);
    }
    if vxlan_hdr.vni() != local.vni {
        return DecapVerdict::Drop(DropReason::WrongVni);
    }
    let eth = ethernet::Frame::new_unchecked(eth_hdr);
    let (dst_mac, ethertype) = (eth.dst_addr(), eth.ethertype());
    let for_us = dst_mac == local.mac
        || (dst_mac.is_broadcast() && ethertype == EtherType::Arp)
        || (ethertype == EtherType::Ipv6
            && local
                .addr_v6
                .is_some_and(|a| dst_mac == ndp::solicited_node_mac(a)));
    if !for_us {
        return DecapVerdict::Drop(DropReason::WrongDstMac);
    }
    let inner_start = start + VXLAN_HEADROOM;
    let inner = &d[VXLAN_HEADROOM..];
    match ethertype {
        EtherType::Ipv4 | EtherType::Ipv6 => {
            let want = if ethertype == EtherType::Ipv4 { 4 } else { 6 };
            let info = match inspect_ip(inner) {
                Ok(info) if info.version == want => info,
                Ok(_) => return DecapVerdict::Drop(DropReason::MalformedIp),
                Err(r) => return DecapVerdict::Drop(r),
            };
            if want == 6 {
                if let Some(v) = ndp::answer_ndp(buf, start..end, src, table, local) {
                    return v;
                }
            }
            if !sent_by_owner(table, info.src, src) {
                return DecapVerdict::Drop(DropReason::InnerSourceMismatch);
            }
            if !local.owns(info.dst) {
                return DecapVerdict::Drop(DropReason::InnerDestinationForeign);
            }
            DecapVerdict::Deliver {
                packet: inner_start..inner_start + info.len,
            }
        }
        EtherType::Arp => answer_arp(buf, start..end, src, table, local),
        EtherType::Vlan | EtherType::QinQ => DecapVerdict::Drop(DropReason::VlanTagged),
        EtherType::Unknown(_) => DecapVerdict::Drop(DropReason::UnsupportedEtherType),
    }
}

/// True if the peer whose subnet contains `inner_src` has the public IP `outer_src`.
#[inline]
fn sent_by_owner(table: &PeerTable, inner_src: IpAddr, outer_src: IpAddr) -> bool {
    table.owns_source(outer_src, inner_src)
}

/// Answers an ARP request for our VTEP address by rewriting the datagram `buf[datagram]`
/// into a reply. The request must lie within the datagram, and so does the reply (it is
/// never longer than the request).
fn answer_arp(
    buf: &mut [u8],
    datagram: Range<usize>,
    src: IpAddr,
    table: &PeerTable,
    local: &LocalVtep,
) -> DecapVerdict {
    let Range { start, end } = datagram;
    let arp_at = start + VXLAN_HEADROOM;
    let Some(bytes) = buf.get(arp_at..end) else {
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
    if !sent_by_owner(table, request.source_protocol_addr.into(), src) {
        return DecapVerdict::Drop(DropReason::InnerSourceMismatch);
    }
    let reply = arp::Repr {
        operation: arp::Operation::Reply,
        source_hardware_addr: local.mac,
        source_protocol_addr: our_ip,
        target_hardware_addr: request.source_hardware_addr,
        target_protocol_addr: request.source_protocol_addr,
    };
    let reply_end = arp_at + arp::PACKET_LEN;
    if reply_end > end {
        return DecapVerdict::Drop(DropReason::Truncated);
    }
    let Some(hdr) = headroom_mut(buf, start) else {
        return DecapVerdict::Drop(DropReason::Truncated);
    };
    let (vni, dst_mac) = (local.vni, request.source_hardware_addr);
    write_headers(hdr, vni, dst_mac, local.mac, EtherType::Arp);
    match buf.get_mut(arp_at..reply_end) {
        Some(a) => reply.emit(&mut arp::Packet::new_unchecked(a)),
        None => return DecapVerdict::Drop(DropReason::Truncated),
    }
    DecapVerdict::Reply {
        dst: src,
        frame: start..reply_end,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use crate::wire::{arp, ipv4, vxlan, EtherType, MacAddr};
    use proptest::prelude::*;

    /// We are node 2, receiving from node 1.
    fn local() -> LocalVtep {
        test_node(2)
    }

    fn sender() -> RemoteVtep {
        test_peer(1)
    }

    /// Another node: 10.244.3.0/24 at 198.18.0.3.
    fn third() -> RemoteVtep {
        test_peer(3)
    }

    fn table() -> PeerTable {
        test_table(&[1, 3])
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
        run_as(d, sender().public_ip, &local())
    }

    /// Decapsulates a copy of `d` received from `src` by `me`.
    fn run_as(d: &[u8], src: IpAddr, me: &LocalVtep) -> DecapVerdict {
        run_at(d, 0, src, me).1
    }

    /// Decapsulates `d` received from `src` by `me`, placed at `offset` in a buffer: the
    /// buffer afterwards and the verdict.
    fn run_at(d: &[u8], offset: usize, src: IpAddr, me: &LocalVtep) -> (Vec<u8>, DecapVerdict) {
        let mut b = vec![0xee; offset];
        b.extend_from_slice(d);
        let v = decap(&mut b, offset..offset + d.len(), src, &table(), me);
        (b, v)
    }

    #[test]
    fn delivers_ipv4_trimmed() {
        let mut d = datagram(0x08, 1, local().mac, 0x0800, &inner());
        d.extend_from_slice(&[0; 6]); // Ethernet padding
        let (_, v) = run_at(&d, 3, sender().public_ip, &local());
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
        let stranger = "198.18.0.99".parse().unwrap();
        assert_eq!(
            run_as(&good, stranger, &local()),
            DecapVerdict::Drop(DropReason::UnknownSource)
        );
        let mut b = good.clone();
        let past_the_end = 0..good.len() + 1;
        assert_eq!(
            decap(&mut b, past_the_end, sender().public_ip, &table(), &local()),
            DecapVerdict::Drop(DropReason::InvalidBuffer)
        );
        let (us, other) = (local().mac, MacAddr([0x02, 0, 0, 0, 0, 9]));
        // IPv4 EtherType with an IPv6 packet, a short packet, a lying total length, IHL < 5.
        let six = ipv6_packet(
            "fd10:244:1::1".parse().unwrap(),
            "fd10:244:2::1".parse().unwrap(),
            17,
            &[0; 8],
        );
        let mut long = inner();
        long[3] += 1;
        let mut bad = inner();
        bad[0] = 0x44;
        let ip = inner();
        use DropReason::*;
        let cases: [(Vec<u8>, DropReason); 15] = [
            (good[..21].to_vec(), Truncated),
            (Vec::new(), Truncated),
            (datagram(0x00, 1, us, 0x0800, &ip), VxlanFlagNotSet),
            (datagram(0x08, 2, us, 0x0800, &ip), WrongVni),
            (datagram(0x08, 1, other, 0x0800, &ip), WrongDstMac),
            (
                datagram(0x08, 1, MacAddr::BROADCAST, 0x0800, &ip),
                WrongDstMac,
            ),
            (datagram(0x08, 1, us, 0x8100, &ip), VlanTagged),
            (datagram(0x08, 1, us, 0x88a8, &ip), VlanTagged),
            (datagram(0x08, 1, us, 0x88cc, &ip), UnsupportedEtherType),
            (datagram(0x08, 1, us, 0x0800, &six), MalformedIp),
            (datagram(0x08, 1, us, 0x0800, &ip[..19]), Truncated),
            (datagram(0x08, 1, us, 0x0800, &long), Truncated),
            (datagram(0x08, 1, us, 0x0800, &bad), MalformedIp),
            (datagram(0x08, 1, us, 0x0800, &[]), Truncated),
            (datagram(0x08, 1, us, 0x86dd, &six[..39]), Truncated),
        ];
        for (i, (d, reason)) in cases.iter().enumerate() {
            assert_eq!(run(d), DecapVerdict::Drop(*reason), "case {i}");
        }
        assert!(matches!(
            run(&datagram(0x08, 1, us, 0x86dd, &six)),
            DecapVerdict::Deliver { .. }
        ));
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
            let (buf, v) = run_at(&d, 4, sender().public_ip, &local());
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
        assert_eq!(
            run_as(&d, sender().public_ip, &no_v4),
            drop(DropReason::ArpNotForUs)
        );
    }

    /// An inner packet `src` → `dst` (IPv4 or IPv6 by the addresses) in a datagram for us.
    fn ip_datagram(src: &str, dst: &str) -> Vec<u8> {
        let p = match (src.parse().unwrap(), dst.parse().unwrap()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, 17, &[0; 8]),
            (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, 17, &[0; 8]),
            _ => panic!("mixed families"),
        };
        let et = if p[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
        datagram(0x08, 1, local().mac, et, &p)
    }

    /// `v4` or `v6`, whichever has the family of the address `addr`.
    fn of_family<'a>(addr: &str, v4: &'a str, v6: &'a str) -> &'a str {
        if addr.contains(':') {
            v6
        } else {
            v4
        }
    }

    #[test]
    fn inner_source_must_belong_to_the_sending_peer() {
        let drop = |r| DecapVerdict::Drop(r);
        let mismatch = drop(DropReason::InnerSourceMismatch);
        for (src, dst) in [
            ("10.244.1.5", "10.244.2.7"),
            ("10.244.1.0", "10.244.2.0"), // VTEP to VTEP
            ("fd10:244:1::5", "fd10:244:2::7"),
        ] {
            assert!(
                matches!(run(&ip_datagram(src, dst)), DecapVerdict::Deliver { .. }),
                "{src} -> {dst}"
            );
        }
        // Another node's pod, a node-less address, an address outside every subnet.
        for src in [
            "10.244.3.9",
            "10.244.9.9",
            "192.168.1.1",
            "fd10:244:3::9",
            "fd10:99::1",
        ] {
            let dst = of_family(src, "10.244.2.7", "fd10:244:2::7");
            assert_eq!(run(&ip_datagram(src, dst)), mismatch, "{src}");
        }
        // The same frame is fine from the owner of the source subnet.
        let d = ip_datagram("10.244.3.9", "10.244.2.7");
        assert!(matches!(
            run_as(&d, third().public_ip, &local()),
            DecapVerdict::Deliver { .. }
        ));
        // IPv4-mapped outer source counts as the IPv4 address.
        let mapped = "::ffff:198.18.0.3".parse().unwrap();
        assert!(matches!(
            run_as(&d, mapped, &local()),
            DecapVerdict::Deliver { .. }
        ));
    }

    #[test]
    fn inner_destination_must_be_ours() {
        let foreign = DecapVerdict::Drop(DropReason::InnerDestinationForeign);
        for dst in [
            "10.244.3.7",
            "10.244.1.7",
            "10.245.2.7",
            "8.8.8.8",
            "fd10:244:3::7",
        ] {
            let src = of_family(dst, "10.244.1.5", "fd10:244:1::5");
            assert_eq!(run(&ip_datagram(src, dst)), foreign, "{dst}");
        }
        // Without a subnet of that family nothing of it is delivered.
        let mut no_v6 = local();
        no_v6.subnet_v6 = None;
        let d = ip_datagram("fd10:244:1::5", "fd10:244:2::7");
        assert_eq!(run_as(&d, sender().public_ip, &no_v6), foreign);
        let mut no_v4 = local();
        no_v4.subnet_v4 = None;
        let d = ip_datagram("10.244.1.5", "10.244.2.0");
        assert_eq!(run_as(&d, sender().public_ip, &no_v4), foreign);
    }

    #[test]
    fn arp_only_from_the_senders_subnet() {
        let mut req = arp_request(Ipv4Addr::new(10, 244, 2, 0), 1);
        // Sender protocol address 10.244.3.0: another node's VTEP.
        req[14..18].copy_from_slice(&[10, 244, 3, 0]);
        assert_eq!(
            run(&datagram(0x08, 1, MacAddr::BROADCAST, 0x0806, &req)),
            DecapVerdict::Drop(DropReason::InnerSourceMismatch)
        );
    }

    /// `d` at offset 2 of a buffer with `slack` bytes of 0x5a after it.
    fn with_slack(d: &[u8], slack: usize) -> (Vec<u8>, Range<usize>) {
        let mut b = vec![0x5au8; 2];
        b.extend_from_slice(d);
        b.resize(b.len() + slack, 0x5a);
        (b, 2..2 + d.len())
    }

    #[test]
    fn truncated_arp_never_reads_or_writes_past_the_datagram() {
        // The bytes after the datagram would complete the request: they must not be used.
        let full = datagram(
            0x08,
            1,
            MacAddr::BROADCAST,
            0x0806,
            &arp_request(Ipv4Addr::new(10, 244, 2, 0), 1),
        );
        for cut in [1, 4, 27] {
            let short = &full[..full.len() - cut];
            let mut b = short.to_vec();
            b.extend_from_slice(&full[full.len() - cut..]);
            b.extend_from_slice(&[0x5a; 64]);
            let before = b.clone();
            let v = decap(
                &mut b,
                0..short.len(),
                sender().public_ip,
                &table(),
                &local(),
            );
            assert_eq!(v, DecapVerdict::Drop(DropReason::Truncated), "cut {cut}");
            assert_eq!(b, before, "buffer changed (cut {cut})");
        }
        // A complete request with slack: the reply stays within the datagram.
        let (mut b, r) = with_slack(&full, 64);
        let before = b.clone();
        let v = decap(&mut b, r.clone(), sender().public_ip, &table(), &local());
        let DecapVerdict::Reply { frame, .. } = v else {
            panic!("{v:?}")
        };
        assert!(frame.start == r.start && frame.end <= r.end);
        assert_eq!(b[..r.start], before[..r.start]);
        assert_eq!(b[r.end..], before[r.end..]);
    }

    proptest! {
        #[test]
        fn slack_is_never_touched_and_ranges_stay_inside(
            tail in proptest::collection::vec(any::<u8>(), 0..80),
            et in prop_oneof![Just(0x0800u16), Just(0x86dd), Just(0x0806)],
            bcast in any::<bool>(), slack in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let dst = if bcast { MacAddr::BROADCAST } else { local().mac };
            let d = datagram(0x08, 1, dst, et, &tail);
            let mut b = vec![0x5au8; 3];
            b.extend_from_slice(&d);
            b.extend_from_slice(&slack);
            let r = 3..3 + d.len();
            let before = b.clone();
            let v = decap(&mut b, r.clone(), sender().public_ip, &table(), &local());
            prop_assert_eq!(&b[..r.start], &before[..r.start]);
            prop_assert_eq!(&b[r.end..], &before[r.end..]);
            match v {
                DecapVerdict::Deliver { packet } => prop_assert!(packet.start >= r.start && packet.end <= r.end),
                DecapVerdict::Reply { frame, .. } => prop_assert!(frame.start == r.start && frame.end <= r.end),
                DecapVerdict::Drop(_) => prop_assert_eq!(&b, &before),
            }
        }

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
