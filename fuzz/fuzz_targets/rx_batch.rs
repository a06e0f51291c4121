//! A receive batch as the UDP socket hands it over (a message of several datagrams laid end
//! to end by UDP GRO, with the rest of its 64 KiB slot holding stale bytes), split with
//! `gro_datagrams` and decapsulated in place datagram by datagram, as the rx loop does. The
//! split must cover the message exactly, and decap must neither read (results may not depend
//! on it) nor write anything outside the datagram it is given.
#![no_main]

mod common;

use flannel_core::dataplane::{decap, gro_datagrams, DecapVerdict, VXLAN_HEADROOM};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let offset = usize::from(head[0] & 0x3f);
    // 0: not coalesced; else a segment size of 1..=2047 bytes.
    let segment = usize::from(u16::from_be_bytes([head[1], head[2]]) & 0x7ff);
    let slack = usize::from(head[3] & 0x7f);
    let (table, local) = (common::table(), common::local());
    let src = common::peer_ip(2 + head[3] % 7);

    let ranges: Vec<_> = gro_datagrams(offset, body.len(), segment).collect();
    let mut at = offset;
    for r in &ranges {
        assert_eq!(r.start, at, "{ranges:?}");
        assert!(r.start <= r.end);
        if segment > 0 {
            assert!(r.len() <= segment, "{ranges:?}");
        }
        assert!(!r.is_empty() || body.is_empty(), "{ranges:?}");
        at = r.end;
    }
    assert_eq!(at, offset + body.len());
    let want = if body.is_empty() || segment == 0 {
        1
    } else {
        body.len().div_ceil(segment)
    };
    assert_eq!(ranges.len(), want);

    let mut buf = vec![0x5au8; offset];
    buf.extend_from_slice(body);
    buf.resize(buf.len() + slack, 0xa5);
    // With the top bit of head[3], every datagram gets a valid VXLAN + Ethernet header for
    // us (EtherType from its own byte 21), so the inner checks are reached often.
    if head[3] & 0x80 != 0 {
        for r in &ranges {
            if let Some(h) = buf
                .get_mut(r.start..r.end)
                .and_then(|d| d.get_mut(..VXLAN_HEADROOM))
            {
                let et = [[0x08, 0x00], [0x86, 0xdd], [0x08, 0x06], [h[20], h[21]]]
                    [usize::from(h[21] & 3)];
                h[..8].copy_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
                h[8..14].copy_from_slice(&common::LOCAL_MAC.0);
                h[20..22].copy_from_slice(&et);
            }
        }
    }
    for r in ranges {
        let before = buf.clone();
        let v = decap(&mut buf, r.clone(), src, table, &local);
        assert_eq!(
            buf[..r.start],
            before[..r.start],
            "wrote before the datagram"
        );
        assert_eq!(buf[r.end..], before[r.end..], "wrote after the datagram");
        // The verdict must not depend on bytes outside the datagram.
        let mut other = before.clone();
        other[..r.start].fill(0xff);
        other[r.end..].fill(0xff);
        let v2 = decap(&mut other, r.clone(), src, table, &local);
        assert_eq!(v, v2);
        match v {
            DecapVerdict::Deliver { packet } => {
                assert!(packet.start == r.start + VXLAN_HEADROOM && packet.end <= r.end)
            }
            DecapVerdict::Reply { frame, .. } => {
                assert!(frame.start == r.start && frame.end <= r.end)
            }
            DecapVerdict::Drop(_) => assert_eq!(buf, before),
        }
    }
});
