//! A hash of an inner packet's flow, to pick the outer UDP source port per flow as the
//! kernel's vxlan driver does (RFC 7348 §5): the receiver's `SO_REUSEPORT` group then spreads
//! flows over its sockets while every packet of one flow takes the same socket.

/// Hashes the addresses, protocol and (for TCP/UDP, unfragmented) ports of an inner IPv4
/// or IPv6 packet. Anything unparsable hashes to 0. Both directions of a flow may differ.
pub fn flow_hash(packet: &[u8]) -> u32 {
    let (fields, proto, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            // Only the first fragment (offset 0, no MF) carries the ports.
            let unfragmented = packet[6] & 0x3f == 0 && packet[7] == 0;
            (&packet[12..20], packet[9], unfragmented.then_some(ihl))
        }
        Some(6) if packet.len() >= 40 => (&packet[8..40], packet[6], Some(40)),
        _ => return 0,
    };
    let mut h: u32 = 0x811c_9dc5 ^ u32::from(proto);
    let mut mix = |b: u8| h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    fields.iter().copied().for_each(&mut mix);
    if matches!(proto, 6 | 17) {
        if let Some(ports) = l4.and_then(|o| packet.get(o..o + 4)) {
            ports.iter().copied().for_each(&mut mix);
        }
    }
    // Finalize so that the low bits (used modulo a small pool) depend on every input byte.
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^ (h >> 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src_port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 3]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p
    }

    #[test]
    fn same_flow_same_hash_and_ports_spread() {
        let a = v4(40000);
        let mut a2 = a.clone();
        a2[30] = 99; // payload / sequence bytes do not matter
        assert_eq!(flow_hash(&a), flow_hash(&a2));
        // 64 flows differing only in the source port land in both halves of a pool of 2
        // and in at least 12 of 16 slots.
        let slots: std::collections::HashSet<u32> =
            (0..64).map(|i| flow_hash(&v4(40000 + i)) % 16).collect();
        assert!(slots.len() >= 12, "{slots:?}");
        assert!(slots.iter().any(|s| s % 2 == 0) && slots.iter().any(|s| s % 2 == 1));
        assert_eq!(flow_hash(&[0x45, 0]), 0);
        assert_eq!(flow_hash(&[]), 0);
    }

    proptest::proptest! {
        /// Any bytes hash without panicking; bytes past the ports (payload) never change
        /// the hash of an IPv4 or IPv6 packet, so a flow keeps its source port.
        #[test]
        fn any_bytes_hash_and_payload_never_moves_a_flow(
            mut p in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            version in 4u8..=6,
            at in 64usize..120,
            byte in proptest::prelude::any::<u8>(),
        ) {
            if let Some(b) = p.first_mut() {
                *b = (version << 4) | (*b & 0x0f);
            }
            let h = flow_hash(&p);
            // The IPv4 header is at most 60 bytes and the ports follow it: offset 64 on is
            // payload for both families.
            if let Some(b) = p.get_mut(at) {
                *b ^= byte;
            }
            proptest::prop_assert_eq!(flow_hash(&p), h);
        }
    }

    #[test]
    fn fragments_hash_on_addresses_only() {
        let mut a = v4(1);
        let mut b = v4(2);
        for p in [&mut a, &mut b] {
            p[7] = 0x10; // a later fragment: no ports
        }
        assert_eq!(flow_hash(&a), flow_hash(&b));
    }
}
