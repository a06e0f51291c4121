//! Arbitrary UDP payloads (raw, or IPv6 behind valid VXLAN/Ethernet headers, from IPv4 and
//! IPv6 underlay sources) through `decap`, placed in a buffer with bytes before and after the
//! datagram (as in a receive slot): must never panic, every range it returns must lie inside
//! the datagram, nothing outside the datagram is written, and the bytes after it (which
//! could complete a truncated request) do not change the verdict. Delivered packets then go
//! through the receive path's checksum completion and super-packet check.
#![no_main]

mod common;

use flannel_core::dataplane::offload::{finish_rx_checksum, rx_super_packet, RxChecksum};
use flannel_core::dataplane::{decap, DecapVerdict, VXLAN_HEADROOM};
use libfuzzer_sys::fuzz_target;

/// VXLAN (VNI 1) + Ethernet headers for IPv6 to `dst`, from a peer's MAC.
fn ipv6_frame_to(dst: [u8; 6]) -> Vec<u8> {
    let mut h = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    h.extend_from_slice(&dst);
    h.extend_from_slice(&[2, 0, 0, 0, 1, 7, 0x86, 0xdd]);
    h
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Some((&shape, raw)) = rest.split_first() else {
        return;
    };
    // Raw datagrams, or the fuzzer's bytes as an IPv6 packet behind valid headers (to our
    // MAC, or to our solicited-node group: the NDP responder), so v6 inner paths are reached.
    let datagram: Vec<u8> = match shape % 4 {
        1 => ipv6_frame_to(common::LOCAL_MAC.0),
        2 => ipv6_frame_to([0x33, 0x33, 0xff, 0, 0, 0]),
        _ => Vec::new(),
    }
    .into_iter()
    .chain(raw.iter().copied())
    .collect();
    let datagram = &datagram[..];
    // Mostly a known peer (over IPv4 or IPv6), sometimes a stranger.
    let src = common::peer_ip(if sel < 240 { 2 + sel % 7 } else { 99 });
    let (table, local) = (common::table(), common::local());
    let offset = usize::from(sel % 4);
    let slack = usize::from(sel / 4 % 48);
    let mut buf = vec![0u8; offset];
    buf.extend_from_slice(datagram);
    let end = buf.len();
    // Slack: the datagram's own bytes again (so a cut request would find its tail there).
    buf.extend(datagram.iter().chain(std::iter::repeat(&0x5a)).take(slack));
    let before = buf.clone();
    let v = decap(&mut buf, offset..end, src, table, &local);
    assert_eq!(buf[..offset], before[..offset]);
    assert_eq!(buf[end..], before[end..]);
    let mut exact = before[..end].to_vec();
    assert_eq!(
        decap(&mut exact, offset..end, src, table, &local),
        v,
        "verdict depends on slack"
    );
    match v {
        DecapVerdict::Deliver { packet } => {
            assert!(packet.start == offset + VXLAN_HEADROOM && packet.end <= end);
            assert!(matches!(buf[packet.start] >> 4, 4 | 6));
            // The receive path's checksum completion and super-packet hand-over: only the
            // packet's checksum field may change, and a completed checksum verifies.
            let outside = (buf[..packet.start].to_vec(), buf[packet.end..].to_vec());
            let mut p = buf[packet.clone()].to_vec();
            let orig = p.clone();
            let r = finish_rx_checksum(&mut p);
            let changed = p.iter().zip(&orig).filter(|(a, b)| a != b).count();
            match r {
                RxChecksum::Completed => {
                    assert!((1..=2).contains(&changed));
                    assert_eq!(finish_rx_checksum(&mut p.clone()), RxChecksum::Untouched);
                }
                _ => assert_eq!(p, orig),
            }
            let mut q = orig.clone();
            let mtu = 68 + usize::from(sel) * 8;
            if let Some(h) = rx_super_packet(&mut q, mtu) {
                assert!(q.len() > mtu && usize::from(h.hdr_len) < mtu);
                assert!(usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 <= q.len());
            }
            assert!(q.iter().zip(&orig).filter(|(a, b)| a != b).count() <= 2);
            assert_eq!((&buf[..packet.start], &buf[packet.end..]), (&outside.0[..], &outside.1[..]));
        }
        DecapVerdict::Reply { dst, frame } => {
            assert_eq!(dst, src);
            assert!(frame.start == offset && frame.end <= end);
        }
        DecapVerdict::Drop(_) => assert_eq!(buf, before),
    }
});
