//! Arbitrary inner packets (as read from TUN) through `encap`: must never panic; frames and
//! ICMP replies must lie inside the buffer and be well-formed.
#![no_main]

mod common;

use std::time::Duration;

use flannel_core::dataplane::{encap, EncapVerdict, IcmpLimiter, VXLAN_HEADROOM};
use flannel_core::wire::{ipv4, ipv6};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, packet)) = data.split_first() else { return };
    let (table, local) = (common::table(), common::local());
    let headroom = VXLAN_HEADROOM + usize::from(sel % 64);
    let tail = usize::from(sel / 64) * 16;
    let mut buf = vec![0u8; headroom];
    buf.extend_from_slice(packet);
    buf.resize(buf.len() + tail, 0);
    let range = headroom..headroom + packet.len();
    let mut icmp = IcmpLimiter::default();
    match encap(&mut buf, range.clone(), table, &local, &mut icmp, Duration::ZERO) {
        EncapVerdict::Transmit { frame, .. } => {
            assert_eq!(frame.start, headroom - VXLAN_HEADROOM);
            assert!(frame.end <= range.end);
            assert_eq!(buf[frame.start], 0x08);
        }
        EncapVerdict::ReplyToTun { packet } => {
            assert!(packet.end <= buf.len());
            let p = &buf[packet];
            match p[0] >> 4 {
                4 => assert!(ipv4::Repr::parse(&ipv4::Packet::new_checked(p).unwrap()).is_ok()),
                6 => assert!(ipv6::Packet::new_checked(p).is_ok()),
                v => panic!("reply with IP version {v}"),
            }
        }
        EncapVerdict::Drop(_) => {}
    }
});
