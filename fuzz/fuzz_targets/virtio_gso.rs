//! Arbitrary `virtio_net_hdr` + packet through `gso_split` and `complete_partial_checksum`:
//! must never panic, and segments must lie inside the arena at the promised stride.
#![no_main]

use flannel_core::dataplane::offload::{complete_partial_checksum, gso_split, VirtioNetHdr};
use flannel_core::dataplane::VXLAN_HEADROOM;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(hdr) = VirtioNetHdr::parse(data) else { return };
    let packet = &data[VirtioNetHdr::LEN..];
    let mut arena = Vec::new();
    if let Ok(segs) = gso_split(packet, &hdr, &mut arena, VXLAN_HEADROOM) {
        assert!(!segs.is_empty());
        for (i, r) in segs.iter().enumerate() {
            assert_eq!(r.start, i * segs.stride() + VXLAN_HEADROOM);
            assert!(r.end <= arena.len());
        }
    }
    let mut copy = packet.to_vec();
    let _ = complete_partial_checksum(&mut copy, hdr.csum_start.into(), hdr.csum_offset.into());
});
