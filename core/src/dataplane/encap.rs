//! TUN → underlay: wrap an inner IP packet in Ethernet + VXLAN in place.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::time::Duration;

use super::{
    headroom_mut, inspect_ip, write_headers, DropReason, EncapVerdict, IcmpLimiter, IpInfo,
    LocalVtep, PeerTable, VXLAN_HEADROOM,
};
use crate::wire::{icmp, ipv4, ipv6, EtherType, IpProtocol};

/// Encapsulates the inner IP packet `buf[packet]` for the peer owning its destination.
///
/// Call once per packet read from TUN, with at least [`VXLAN_HEADROOM`] bytes of `buf` free
/// in front of `packet`. The VXLAN header (the peer's VNI, I flag) and the inner Ethernet
/// header (remote VTEP MAC ← our MAC, EtherType from the IP version) are written into
/// `buf[packet.start - 22..packet.start]`; the packet is trimmed to its header's length.
///
/// When no peer owns the destination and we have a VTEP address of that family, an
/// ICMP/ICMPv6 destination unreachable for the sender is written into `buf` and returned as
/// [`EncapVerdict::ReplyToTun`] (never for ICMP errors, non-first fragments, or
/// multicast/unspecified addresses). Errors are rate limited by `icmp` at time `now` (the
/// caller's monotonic clock); a suppressed one is the drop `IcmpRateLimited`.
pub fn encap(
    buf: &mut [u8],
    packet: Range<usize>,
    table: &PeerTable,
    local: &LocalVtep,
    icmp: &mut IcmpLimiter,
    now: Duration,
) -> EncapVerdict {
    let Range { start, end } = packet;
    if start < VXLAN_HEADROOM || start > end || end > buf.len() {
        return EncapVerdict::Drop(DropReason::InvalidBuffer);
    }
    let info = match buf.get(start..end).map(inspect_ip) {
        Some(Ok(info)) => info,
        Some(Err(r)) => return EncapVerdict::Drop(r),
        None => return EncapVerdict::Drop(DropReason::InvalidBuffer),
    };
    let Some(peer) = table.lookup(info.dst) else {
        return unreachable(buf, start, &info, local, icmp, now);
    };
    let ethertype = if info.version == 4 {
        EtherType::Ipv4
    } else {
        EtherType::Ipv6
    };
    let frame_start = start - VXLAN_HEADROOM;
    let Some(hdr) = headroom_mut(buf, frame_start) else {
        return EncapVerdict::Drop(DropReason::InvalidBuffer);
    };
    write_headers(hdr, peer.vni, peer.mac, local.mac, ethertype);
    EncapVerdict::Transmit {
        dst: peer.public_ip,
        frame: frame_start..start + info.len,
    }
}

/// Largest ICMP error datagram: 576 bytes for IPv4 (RFC 1812 §4.3.2.3), the minimum MTU 1280
/// for IPv6 (RFC 4443 §2.4(c)).
const MAX_ERROR_V4: usize = 576;
const MAX_ERROR_V6: usize = 1280;
/// IP + ICMP header bytes in front of the quoted packet of an ICMP / ICMPv6 error.
const V4_ERROR_HDR: usize = ipv4::HEADER_LEN + icmp::HEADER_LEN;
const V6_ERROR_HDR: usize = ipv6::HEADER_LEN + icmp::HEADER_LEN;

/// True if RFC 1812 §4.3.2.7 / RFC 4443 §2.4(e) allow an ICMP error about this packet.
fn may_send_error(p: &[u8], info: &IpInfo) -> bool {
    match (info.src, info.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let Ok(pkt) = ipv4::Packet::new_checked(p) else {
                return false;
            };
            let unicast = |a: Ipv4Addr| {
                !(a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback())
            };
            if !unicast(s) || d.is_multicast() || d.is_broadcast() || pkt.frag_offset() != 0 {
                return false;
            }
            if pkt.next_header() == IpProtocol::Icmp {
                // Only informational messages (echo, timestamp, ...) may trigger errors.
                return pkt.payload().first().is_some_and(|t| icmp::is_query(*t));
            }
            true
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let Ok(pkt) = ipv6::Packet::new_checked(p) else {
                return false;
            };
            if s.is_unspecified() || s.is_multicast() || s.is_loopback() || d.is_multicast() {
                return false;
            }
            match pkt.next_header() {
                IpProtocol::Icmpv6 => pkt
                    .payload()
                    .first()
                    .is_some_and(|t| !icmp::v6_is_error(*t)),
                // Fragment header: only the first fragment (offset zero).
                IpProtocol::Ipv6Frag => pkt
                    .payload()
                    .get(2..4)
                    .is_some_and(|o| u16::from_be_bytes([o[0], o[1]]) & 0xfff8 == 0),
                _ => true,
            }
        }
        _ => false,
    }
}

/// Builds a destination-unreachable error for the packet at `buf[start..]` in place, or drops
/// with `NoRoute` when that is not allowed or possible, or with `IcmpRateLimited` when `icmp`
/// has no credit left.
fn unreachable(
    buf: &mut [u8],
    start: usize,
    info: &IpInfo,
    local: &LocalVtep,
    icmp: &mut IcmpLimiter,
    now: Duration,
) -> EncapVerdict {
    let no_route = EncapVerdict::Drop(DropReason::NoRoute);
    let Some(orig) = buf.get(start..start + info.len) else {
        return no_route;
    };
    if !may_send_error(orig, info) {
        return no_route;
    }
    let v4 = local.error_source_v4.or(local.addr_v4);
    let v6 = local.error_source_v6.or(local.addr_v6);
    let (our, hdr_len, max, min_quote) = match (info.src, v4, v6) {
        (IpAddr::V4(_), Some(a), _) => {
            (IpAddr::V4(a), V4_ERROR_HDR, MAX_ERROR_V4, ipv4::HEADER_LEN)
        }
        (IpAddr::V6(_), _, Some(a)) => {
            (IpAddr::V6(a), V6_ERROR_HDR, MAX_ERROR_V6, ipv6::HEADER_LEN)
        }
        _ => return no_route,
    };
    let mut quote = info.len.min(max - hdr_len);
    // Place the error header in front of the quoted original when the headroom allows it,
    // otherwise move the quote back to make room.
    let (reply_start, quote_at) = if start >= hdr_len {
        (start - hdr_len, start)
    } else {
        quote = quote.min(buf.len().saturating_sub(hdr_len));
        if quote < min_quote {
            return no_route;
        }
        buf.copy_within(start..start + quote, hdr_len);
        (0, hdr_len)
    };
    let reply_len = hdr_len + quote;
    let Some(reply) = buf.get_mut(reply_start..reply_start + reply_len) else {
        return no_route;
    };
    if !icmp.allow(now) {
        return EncapVerdict::Drop(DropReason::IcmpRateLimited);
    }
    let icmp_len = reply_len - (hdr_len - icmp::HEADER_LEN);
    match (our, info.src) {
        (IpAddr::V4(ours), IpAddr::V4(sender)) => {
            write_ipv4_header(reply, ours, sender, reply_len);
            let mut msg = icmp::Packet::new_unchecked(&mut reply[ipv4::HEADER_LEN..]);
            msg.set_header(icmp::DEST_UNREACHABLE, icmp::CODE_NET_UNREACHABLE);
            msg.fill_checksum();
        }
        (IpAddr::V6(ours), IpAddr::V6(sender)) => {
            write_ipv6_header(reply, ours, sender, icmp_len);
            let mut msg = icmp::Packet::new_unchecked(&mut reply[ipv6::HEADER_LEN..]);
            msg.set_header(icmp::V6_DEST_UNREACHABLE, icmp::V6_CODE_NO_ROUTE);
            msg.fill_checksum_v6(&ours, &sender);
        }
        _ => return no_route,
    }
    debug_assert_eq!(quote_at, reply_start + hdr_len);
    EncapVerdict::ReplyToTun {
        packet: reply_start..reply_start + reply_len,
    }
}

fn write_ipv4_header(reply: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, total: usize) {
    let repr = ipv4::Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: total - ipv4::HEADER_LEN,
        hop_limit: 64,
    };
    let mut p = ipv4::Packet::new_unchecked(&mut *reply);
    if repr.emit(&mut p).is_ok() {
        // Linux sends ICMP errors with precedence "internetwork control".
        p.set_dscp_ecn(0xc0);
        p.fill_checksum();
    }
}

fn write_ipv6_header(reply: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, payload: usize) {
    let repr = ipv6::Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: payload,
        hop_limit: 64,
    };
    let _ = repr.emit(&mut ipv6::Packet::new_unchecked(reply));
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use crate::wire::{checksum, ethernet, ipv4, ipv6, vxlan, EtherType, IpProtocol};
    use ipnet::IpNet;

    /// We are node 1, sending to node 2.
    fn local() -> LocalVtep {
        test_node(1)
    }

    fn peer() -> RemoteVtep {
        test_peer(2)
    }

    fn table() -> PeerTable {
        test_table(&[2])
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn encap_ipv4_writes_headers() {
        let inner = ipv4_packet(
            v4("10.244.1.5"),
            v4("10.244.2.7"),
            17,
            &[1, 2, 3, 4, 0, 12, 0, 0, 9, 9, 9, 9],
        );
        let (mut buf, range) = with_headroom(&inner, 30, 0);
        let v = encap_now(&mut buf, range, &table(), &local());
        let EncapVerdict::Transmit { dst, frame } = v else {
            panic!("{v:?}")
        };
        assert_eq!(dst, peer().public_ip);
        assert_eq!(frame, 8..30 + inner.len());
        let f = &buf[frame];
        assert_eq!(&f[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        let eth = ethernet::Frame::new_checked(&f[8..]).unwrap();
        assert_eq!(eth.dst_addr(), peer().mac);
        assert_eq!(eth.src_addr(), local().mac);
        assert_eq!(eth.ethertype(), EtherType::Ipv4);
        assert_eq!(eth.payload(), &inner[..]);
    }

    #[test]
    fn encap_ipv6_uses_peer_vni_and_trims() {
        let inner = ipv6_packet(
            "fd10:244:1::5".parse().unwrap(),
            "fd10:244:2::9".parse().unwrap(),
            17,
            &[0; 16],
        );
        let (buf, range) = with_headroom(&inner, 22, 0);
        let mut padded = buf.clone();
        padded.extend_from_slice(&[0xee; 5]);
        let mut t = peer();
        t.vni = 0x123456;
        let table = PeerTable::new([("fd10:244:2::/64".parse::<IpNet>().unwrap(), t)]);
        let v = encap_now(&mut padded, range.start..range.end + 5, &table, &local());
        let EncapVerdict::Transmit { frame, .. } = v else {
            panic!("{v:?}")
        };
        assert_eq!(frame, 0..buf.len(), "trailing bytes trimmed");
        let vx = vxlan::Packet::new_checked(&padded[frame.clone()]).unwrap();
        assert_eq!(vx.vni(), 0x123456);
        assert_eq!(&padded[20..22], &[0x86, 0xdd]);
    }

    #[test]
    fn bad_inputs_give_reasons() {
        let t = table();
        let l = local();
        let ok = ipv4_packet(v4("10.244.1.5"), v4("10.244.2.7"), 17, &[0; 8]);
        let run = |bytes: &[u8], headroom: usize| {
            let (mut b, r) = with_headroom(bytes, headroom, 0);
            encap_now(&mut b, r, &t, &l)
        };
        assert_eq!(run(&ok, 21), EncapVerdict::Drop(DropReason::InvalidBuffer));
        let mut b = vec![0u8; 40];
        assert_eq!(
            encap_now(&mut b, 22..41, &t, &l),
            EncapVerdict::Drop(DropReason::InvalidBuffer)
        );
        #[allow(clippy::reversed_empty_ranges)]
        let rev = 30..25;
        assert_eq!(
            encap_now(&mut b, rev, &t, &l),
            EncapVerdict::Drop(DropReason::InvalidBuffer)
        );
        assert_eq!(run(&[], 22), EncapVerdict::Drop(DropReason::Truncated));
        assert_eq!(
            run(&ok[..19], 22),
            EncapVerdict::Drop(DropReason::Truncated)
        );
        assert_eq!(
            run(&ok[..ok.len() - 1], 22),
            EncapVerdict::Drop(DropReason::Truncated)
        );
        let mut bad_ihl = ok.clone();
        bad_ihl[0] = 0x43;
        assert_eq!(
            run(&bad_ihl, 22),
            EncapVerdict::Drop(DropReason::MalformedIp)
        );
        let mut v5 = ok.clone();
        v5[0] = 0x55;
        assert_eq!(run(&v5, 22), EncapVerdict::Drop(DropReason::MalformedIp));
        let six = ipv6_packet(
            "fd10:244:1::5".parse().unwrap(),
            "fd10:244:2::9".parse().unwrap(),
            17,
            &[0; 8],
        );
        assert_eq!(
            run(&six[..47], 22),
            EncapVerdict::Drop(DropReason::Truncated)
        );
        assert_eq!(
            run(&six[..39], 22),
            EncapVerdict::Drop(DropReason::Truncated)
        );
    }

    #[test]
    fn no_route_builds_icmp_unreachable_v4() {
        let udp = [0x30, 0x39, 0x00, 0x35, 0x00, 0x0c, 0, 0, 1, 2, 3, 4];
        let inner = ipv4_packet(v4("10.244.1.5"), v4("10.99.0.1"), 17, &udp);
        for headroom in [22, 28, 64] {
            let (mut buf, range) = with_headroom(&inner, headroom, 8);
            let v = encap_now(&mut buf, range, &table(), &local());
            let EncapVerdict::ReplyToTun { packet } = v else {
                panic!("{v:?}")
            };
            let p = ipv4::Packet::new_checked(&buf[packet.clone()]).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(p.src_addr(), v4("10.244.1.0"));
            assert_eq!(p.dst_addr(), v4("10.244.1.5"));
            assert_eq!(p.next_header(), IpProtocol::Icmp);
            assert_eq!(usize::from(p.total_len()), packet.len());
            let icmp = p.payload();
            assert_eq!(&icmp[..2], &[3, 0]);
            assert!(verifies(icmp));
            assert_eq!(&icmp[8..], &inner[..], "quotes the whole original");
        }
    }

    #[test]
    fn no_route_builds_icmpv6_unreachable() {
        let s: Ipv6Addr = "fd10:244:1::5".parse().unwrap();
        let inner = ipv6_packet(
            s,
            "fd10:99::1".parse().unwrap(),
            58,
            &[128, 0, 0, 0, 0, 1, 0, 1],
        );
        for headroom in [22, 48, 100] {
            let (mut buf, range) = with_headroom(&inner, headroom, 30);
            let v = encap_now(&mut buf, range, &table(), &local());
            let EncapVerdict::ReplyToTun { packet } = v else {
                panic!("{v:?}")
            };
            let p = ipv6::Packet::new_checked(&buf[packet.clone()]).unwrap();
            assert_eq!(p.src_addr(), local().addr_v6.unwrap());
            assert_eq!(p.dst_addr(), s);
            assert_eq!(p.next_header(), IpProtocol::Icmpv6);
            assert_eq!(p.total_len(), packet.len());
            let icmp = p.payload();
            assert_eq!(&icmp[..2], &[1, 0]);
            let ph =
                checksum::pseudo_header(&p.src_addr().into(), &s.into(), 58, icmp.len() as u32);
            assert_eq!(checksum::add(ph, checksum::sum(icmp)), 0xffff);
            assert_eq!(&icmp[8..], &inner[..]);
        }
    }

    #[test]
    fn icmp_errors_are_rate_limited() {
        let inner = ipv4_packet(v4("10.244.1.5"), v4("10.99.0.1"), 17, &[0; 8]);
        let mut icmp = IcmpLimiter::new(1000, 3);
        let t0 = std::time::Duration::from_secs(7);
        let at = |icmp: &mut IcmpLimiter, t| {
            let (mut buf, range) = with_headroom(&inner, 22, 0);
            encap(&mut buf, range, &table(), &local(), icmp, t)
        };
        let verdicts: Vec<_> = (0..5).map(|_| at(&mut icmp, t0)).collect();
        assert!(verdicts[..3]
            .iter()
            .all(|v| matches!(v, EncapVerdict::ReplyToTun { .. })));
        let limited = EncapVerdict::Drop(DropReason::IcmpRateLimited);
        assert_eq!(verdicts[3..], [limited.clone(), limited.clone()]);
        assert!(matches!(
            at(&mut icmp, t0 + std::time::Duration::from_millis(1)),
            EncapVerdict::ReplyToTun { .. }
        ));
        assert_eq!(
            at(&mut icmp, t0 + std::time::Duration::from_millis(1)),
            limited
        );
        // Packets that get no error anyway do not spend credit, and are `no_route`.
        let err = ipv4_packet(
            v4("10.244.1.5"),
            v4("10.99.0.1"),
            1,
            &[3, 1, 0, 0, 0, 0, 0, 0],
        );
        let (mut buf, range) = with_headroom(&err, 22, 0);
        let t = t0 + std::time::Duration::from_millis(2);
        assert_eq!(
            encap(&mut buf, range, &table(), &local(), &mut icmp, t),
            EncapVerdict::Drop(DropReason::NoRoute)
        );
        assert!(matches!(at(&mut icmp, t), EncapVerdict::ReplyToTun { .. }));
        // Forwarded packets never touch the limiter.
        let ok = ipv4_packet(v4("10.244.1.5"), v4("10.244.2.7"), 17, &[0; 8]);
        let (mut buf, range) = with_headroom(&ok, 22, 0);
        assert!(matches!(
            encap(&mut buf, range, &table(), &local(), &mut icmp, t),
            EncapVerdict::Transmit { .. }
        ));
    }

    #[test]
    fn long_packets_are_quoted_up_to_the_limit() {
        let inner = ipv4_packet(v4("10.244.1.5"), v4("10.99.0.1"), 6, &[7; 1400]);
        let (mut buf, range) = with_headroom(&inner, 22, 0);
        let EncapVerdict::ReplyToTun { packet } = encap_now(&mut buf, range, &table(), &local())
        else {
            panic!()
        };
        assert_eq!(packet.len(), 576);
        assert_eq!(&buf[packet.start + 28..packet.end], &inner[..548]);
    }

    #[test]
    fn no_icmp_about_errors_fragments_or_without_address() {
        let t = table();
        let run = |p: &[u8], l: &LocalVtep| {
            let (mut b, r) = with_headroom(p, 22, 64);
            encap_now(&mut b, r, &t, l)
        };
        let no_route = EncapVerdict::Drop(DropReason::NoRoute);
        let err = ipv4_packet(
            v4("10.244.1.5"),
            v4("10.99.0.1"),
            1,
            &[3, 1, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(run(&err, &local()), no_route);
        let mut frag = ipv4_packet(v4("10.244.1.5"), v4("10.99.0.1"), 17, &[0; 8]);
        ipv4::Packet::new_unchecked(&mut frag[..]).set_frag(false, false, 8);
        assert_eq!(run(&frag, &local()), no_route);
        let mcast = ipv4_packet(v4("10.244.1.5"), v4("239.1.1.1"), 17, &[0; 8]);
        assert_eq!(run(&mcast, &local()), no_route);
        let unspec = ipv4_packet(v4("0.0.0.0"), v4("10.99.0.1"), 17, &[0; 8]);
        assert_eq!(run(&unspec, &local()), no_route);
        let ok = ipv4_packet(v4("10.244.1.5"), v4("10.99.0.1"), 17, &[0; 8]);
        let mut noaddr = local();
        noaddr.addr_v4 = None;
        assert_eq!(run(&ok, &noaddr), no_route);
        let s: Ipv6Addr = "fd10:244:1::5".parse().unwrap();
        let d: Ipv6Addr = "fd10:99::1".parse().unwrap();
        let err6 = ipv6_packet(s, d, 58, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(run(&err6, &local()), no_route);
        let frag6 = ipv6_packet(s, d, 44, &[17, 0, 0x00, 0x08, 0, 0, 0, 1]);
        assert_eq!(run(&frag6, &local()), no_route);
        let first6 = ipv6_packet(s, d, 44, &[17, 0, 0x00, 0x01, 0, 0, 0, 1]);
        assert!(matches!(
            run(&first6, &local()),
            EncapVerdict::ReplyToTun { .. }
        ));
        let mut noaddr6 = local();
        noaddr6.addr_v6 = None;
        assert_eq!(run(&ipv6_packet(s, d, 17, &[0; 8]), &noaddr6), no_route);
    }
}
