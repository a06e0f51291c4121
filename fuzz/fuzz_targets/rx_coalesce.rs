//! Arbitrary decapsulated packets through the receive-side TCP coalescer (software GRO).
#![no_main]

use flannel_rs::dataplane::coalesce::Coalescer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First bytes choose packet lengths; the rest is the packet bytes.
    let (lens, body) = data.split_at(data.len().min(8));
    let mut buf = body.to_vec();
    let mut packets = Vec::new();
    let mut at = 0usize;
    for &l in lens {
        let len = usize::from(l) * 8 + 20;
        if at + len > buf.len() {
            break;
        }
        packets.push(at..at + len);
        at += len;
    }
    let mut c = Coalescer::new();
    c.coalesce(&mut buf, &packets);
    for w in c.writes() {
        let _ = c.pieces(w);
    }
});
