//! The receive-side TCP coalescer (software GRO), two ways. Raw: arbitrary bytes as packets;
//! must not panic and must not write outside the packets. Generated: TCP segments with valid
//! checksums built from the input over 12 flows (more than `MAX_OPEN_FLOWS`, so open flows
//! are evicted), IPv4 and IPv6, mostly mergeable (consecutive sequence numbers and IDs, equal
//! sizes) with some breaks (gaps, PSH, short segments, bad checksums); every merged write
//! must split back with `gso_split` into exactly the input segments, in order per flow.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use flannel_core::dataplane::coalesce::Coalescer;
use flannel_core::dataplane::offload::{gso_split, VirtioNetHdr};
use flannel_core::wire::{checksum, tcp};
use libfuzzer_sys::fuzz_target;

/// Junk bytes in front of every packet and after the last one.
const GAP: usize = 5;
const FLOWS: u8 = 12;
const MAX_PACKETS: usize = 200;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(rest);
    } else {
        generated(rest);
    }
});

/// `packets` in one buffer, `GAP` bytes of 0xa5 before each and after the last.
fn layout(packets: &[Vec<u8>]) -> (Vec<u8>, Vec<Range<usize>>) {
    let mut buf = Vec::new();
    let mut ranges = Vec::new();
    for p in packets {
        buf.extend_from_slice(&[0xa5; GAP]);
        ranges.push(buf.len()..buf.len() + p.len());
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(&[0xa5; GAP]);
    (buf, ranges)
}

/// Runs the coalescer; checks that only packet bytes changed and every piece lies in a
/// packet; returns the bytes of each write (header, payload).
fn run(packets: &[Vec<u8>]) -> Vec<(VirtioNetHdr, usize, Vec<u8>)> {
    let (mut buf, ranges) = layout(packets);
    let before = buf.clone();
    let mut c = Coalescer::new();
    c.coalesce(&mut buf, &ranges);
    let inside = |i: usize| ranges.iter().any(|r| r.contains(&i));
    for (i, (a, b)) in buf.iter().zip(&before).enumerate() {
        assert!(
            a == b || inside(i),
            "byte {i} outside every packet was written"
        );
    }
    let mut out = Vec::new();
    let mut total = 0;
    for w in c.writes() {
        let mut bytes = Vec::new();
        for p in c.pieces(w) {
            assert!(
                ranges.iter().any(|r| r.start <= p.start && p.end <= r.end),
                "piece {p:?} not inside one packet"
            );
            bytes.extend_from_slice(&buf[p.clone()]);
        }
        assert_eq!(w.segment_lens().sum::<usize>(), w.bytes);
        total += w.segments;
        out.push((w.hdr, w.segments, bytes));
    }
    assert_eq!(total, packets.len(), "every packet written exactly once");
    out
}

fn raw(data: &[u8]) {
    // The first up to 16 bytes choose packet lengths; the rest is the packet bytes.
    let (lens, body) = data.split_at(data.len().min(16));
    let mut packets = Vec::new();
    let mut at = 0usize;
    for &l in lens {
        let len = usize::from(l) * 8 + 20;
        let Some(p) = body.get(at..at + len) else {
            break;
        };
        packets.push(p.to_vec());
        at += len;
    }
    let _ = run(&packets);
}

fn addrs(flow: u8) -> (IpAddr, IpAddr) {
    if flow % 3 == 2 {
        (
            IpAddr::V6(Ipv6Addr::new(0xfd10, 0x244, 1, 0, 0, 0, 0, u16::from(flow))),
            IpAddr::V6("fd10:244:2::7".parse().unwrap()),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(10, 244, 1, flow)),
            IpAddr::V4(Ipv4Addr::new(10, 244, 2, 7)),
        )
    }
}

/// A TCP segment of `flow` with valid IPv4 header and TCP checksums.
fn segment(flow: u8, id: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = addrs(flow);
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&(40_000 + u16::from(flow)).to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&502u16.to_be_bytes());
    t.extend_from_slice(payload);
    let mut p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((20 + t.len()) as u16).to_be_bytes());
            h.extend_from_slice(&id.to_be_bytes());
            h.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = checksum::checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(t.len() as u16).to_be_bytes());
            h.extend_from_slice(&[6, 64]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => unreachable!(),
    };
    let ip_len = p.len();
    p.extend_from_slice(&t);
    tcp::Packet::new_unchecked(&mut p[ip_len..]).fill_checksum(&src, &dst);
    p
}

/// Per flow: next sequence number, next IPv4 ID, segment size.
#[derive(Clone, Copy)]
struct Flow {
    seq: u32,
    id: u16,
    mss: usize,
}

fn generated(data: &[u8]) {
    let mut flows: Vec<Flow> = (0..FLOWS)
        .map(|f| Flow {
            seq: 1000 * u32::from(f),
            id: 100 * u16::from(f),
            mss: 64 + 16 * usize::from(f),
        })
        .collect();
    let mut packets = Vec::new();
    for op in data.chunks_exact(3).take(MAX_PACKETS) {
        let (f, a, b) = (op[0] % FLOWS, op[1], op[2]);
        let fl = &mut flows[usize::from(f)];
        // Mostly full-size segments; sometimes a short one (ends a merge).
        let len = if a & 0xc0 == 0xc0 {
            usize::from(a & 0x3f)
        } else {
            fl.mss
        };
        let payload: Vec<u8> = (0..len).map(|i| b.wrapping_add(i as u8)).collect();
        let flags = match b & 0x0f {
            0 => 0x18, // ACK|PSH
            1 => 0x11, // ACK|FIN
            2 => 0x02, // SYN
            _ => 0x10, // ACK
        };
        if b & 0x30 == 0x30 {
            fl.seq = fl.seq.wrapping_add(7); // a gap
        }
        if b & 0xc0 == 0xc0 {
            fl.id = fl.id.wrapping_add(3); // an ID jump
        }
        let mut p = segment(f, fl.id, fl.seq, flags, &payload);
        fl.seq = fl.seq.wrapping_add(len as u32);
        fl.id = fl.id.wrapping_add(1);
        if a & 0x3f == 0x3f {
            let last = p.len() - 1;
            p[last] ^= 0x01; // a bad TCP checksum (or a corrupt header byte when no payload)
        }
        packets.push(p);
    }
    let writes = run(&packets);
    // Split every write back into segments.
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut arena = Vec::new();
    for (hdr, n, bytes) in writes {
        if n == 1 {
            assert_eq!(hdr, VirtioNetHdr::default());
            out.push(bytes);
            continue;
        }
        assert!(hdr.needs_csum(), "{hdr:?}");
        let segs = gso_split(&bytes, &hdr, &mut arena, 0).expect("merged packet splits");
        assert_eq!(segs.len(), n);
        out.extend(segs.iter().map(|r| arena[r].to_vec()));
    }
    // Same packets, same order within each flow (flows are told apart by source address).
    let key = |p: &[u8]| -> Vec<u8> {
        if p[0] >> 4 == 6 {
            p[8..24].to_vec()
        } else {
            p[12..16].to_vec()
        }
    };
    let mut want: BTreeMap<Vec<u8>, Vec<&[u8]>> = BTreeMap::new();
    for p in &packets {
        want.entry(key(p)).or_default().push(p);
    }
    let mut got: BTreeMap<Vec<u8>, Vec<&[u8]>> = BTreeMap::new();
    for p in &out {
        got.entry(key(p)).or_default().push(p);
    }
    assert_eq!(got, want);
}
