//! Arbitrary UDP payloads through `decap`: must never panic, and every range it returns must
//! lie inside the datagram.
#![no_main]

mod common;

use flannel_rs::dataplane::{decap, DecapVerdict, VXLAN_HEADROOM};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, datagram)) = data.split_first() else { return };
    // Mostly a known peer, sometimes a stranger.
    let src = common::peer_ip(if sel < 240 { 2 + sel % 5 } else { 99 });
    let (table, local) = (common::table(), common::local());
    let offset = usize::from(sel % 4);
    let mut buf = vec![0u8; offset];
    buf.extend_from_slice(datagram);
    let end = buf.len();
    match decap(&mut buf, offset..end, src, table, &local) {
        DecapVerdict::Deliver { packet } => {
            assert!(packet.start == offset + VXLAN_HEADROOM && packet.end <= end);
            assert!(matches!(buf[packet.start] >> 4, 4 | 6));
        }
        DecapVerdict::Reply { dst, frame } => {
            assert_eq!(dst, src);
            assert!(frame.start == offset && frame.end <= end);
        }
        DecapVerdict::Drop(_) => {}
    }
});
