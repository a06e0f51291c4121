//! Data-plane micro-benchmarks: header encap/decap, peer lookup, checksum vs copy, TSO split,
//! the receive path per batch (decap + checksum check + coalesce of 64 datagrams).
//!
//! Run: `cargo bench -p flannel-core --bench dataplane -- --warm-up-time 1 --measurement-time 2`;
//! HTML reports (with charts) land in `target/criterion/report/index.html`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use flannel_core::dataplane::coalesce::Coalescer;
use flannel_core::dataplane::offload::{finish_rx_checksum, gso_split, VirtioNetHdr};
use flannel_core::dataplane::{
    decap, encap, DecapVerdict, EncapVerdict, IcmpLimiter, LocalVtep, PeerTable, RemoteVtep,
    VXLAN_HEADROOM,
};
use flannel_core::wire::{checksum, ipv4, tcp, IpProtocol, MacAddr};
use ipnet::{IpNet, Ipv4Net};

/// `n` peers with /24 subnets 10.x.y.0/24 and public IPs 198.18.x.y.
fn table(n: usize) -> PeerTable {
    PeerTable::new((0..n).map(|i| {
        let (hi, lo) = ((i >> 8) as u8, i as u8);
        let net = Ipv4Net::new(Ipv4Addr::new(10, hi, lo, 0), 24).unwrap();
        let vtep = RemoteVtep {
            public_ip: IpAddr::V4(Ipv4Addr::new(198, 18, hi, lo)),
            mac: MacAddr([2, 0, 0, 0, hi, lo]),
            vni: 1,
        };
        (IpNet::V4(net), vtep)
    }))
}

/// A node with VTEP `mac` and address `addr`, owning `addr`/24.
fn local(mac: MacAddr, addr: Ipv4Addr) -> LocalVtep {
    LocalVtep {
        vni: 1,
        mac,
        addr_v4: Some(addr),
        addr_v6: None,
        error_source_v4: None,
        error_source_v6: None,
        subnet_v4: Some(Ipv4Net::new(addr, 24).unwrap()),
        subnet_v6: None,
    }
}

/// An IPv4/UDP packet of `len` bytes from 10.255.0.5 to `dst`.
fn ipv4_packet(dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    let repr = ipv4::Repr {
        src_addr: Ipv4Addr::new(10, 255, 0, 5),
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: len - 20,
        hop_limit: 64,
    };
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
        .unwrap();
    p
}

fn bench_encap_decap(c: &mut Criterion) {
    let peers = table(100);
    let me = local(MacAddr([2, 0, 0, 0, 0xff, 1]), Ipv4Addr::new(10, 255, 0, 0));
    let inner = ipv4_packet(Ipv4Addr::new(10, 0, 42, 7), 1400);
    let mut buf = vec![0u8; VXLAN_HEADROOM];
    buf.extend_from_slice(&inner);
    let range = VXLAN_HEADROOM..buf.len();

    let mut icmp = IcmpLimiter::default();
    let mut g = c.benchmark_group("header");
    g.bench_function("encap_1400B_100_peers", |b| {
        b.iter(|| {
            // Consume the verdict as the IO layer does (match, read the fields).
            match encap(
                black_box(&mut buf),
                black_box(range.clone()),
                &peers,
                &me,
                &mut icmp,
                Duration::ZERO,
            ) {
                EncapVerdict::Transmit { dst, frame } => {
                    black_box(dst);
                    black_box(frame.len())
                }
                _ => 0,
            }
        })
    });

    // The receiving side: the frame just built, decapsulated by the peer 10.0.42.0/24.
    let EncapVerdict::Transmit { frame, .. } = encap(
        &mut buf,
        range.clone(),
        &peers,
        &me,
        &mut icmp,
        Duration::ZERO,
    ) else {
        panic!("encap setup failed")
    };
    let mut datagram = buf[frame].to_vec();
    let rx_local = local(MacAddr([2, 0, 0, 0, 0, 42]), Ipv4Addr::new(10, 0, 42, 0));
    let mut rx_peers: Vec<(IpNet, RemoteVtep)> = table(99).iter().map(|(n, v)| (*n, *v)).collect();
    rx_peers.push((
        "10.255.0.0/24".parse().unwrap(),
        RemoteVtep {
            public_ip: "198.18.255.1".parse().unwrap(),
            mac: me.mac,
            vni: 1,
        },
    ));
    let rx_peers = PeerTable::new(rx_peers);
    let src: IpAddr = "198.18.255.1".parse().unwrap();
    let n = datagram.len();
    // Measure the delivering path (every check passes), not an early drop.
    let setup = decap(&mut datagram.clone(), 0..n, src, &rx_peers, &rx_local);
    assert!(
        matches!(setup, DecapVerdict::Deliver { .. }),
        "decap setup: {setup:?}"
    );
    g.bench_function("decap_1400B_100_peers", |b| {
        b.iter(|| {
            let v = decap(
                black_box(&mut datagram),
                black_box(0..n),
                black_box(src),
                &rx_peers,
                &rx_local,
            );
            match v {
                DecapVerdict::Deliver { packet } => black_box(packet.len()),
                _ => 0,
            }
        })
    });
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("peer_lookup");
    for n in [1usize, 100, 5000] {
        let t = table(n);
        // 1024 destinations spread over the table's subnets, plus some misses.
        let dsts: Vec<IpAddr> = (0..1024u32)
            .map(|i| {
                let k = (i as usize * 7919) % (n + n / 8 + 1);
                IpAddr::V4(Ipv4Addr::new(
                    10,
                    (k >> 8) as u8,
                    k as u8,
                    (i % 250) as u8 + 1,
                ))
            })
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &t, |b, t| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(t.lookup(black_box(dsts[i])))
            })
        });
    }
    g.finish();
}

fn bench_checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for n in [64usize, 512, 1400, 9000] {
        let data: Vec<u8> = (0..n + 1).map(|i| (i * 31 + 7) as u8).collect();
        let src = &data[1..]; // deliberately unaligned
        let mut dst = vec![0u8; n];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("sum", n), src, |b, s| {
            b.iter(|| checksum::sum(black_box(s)))
        });
        g.bench_with_input(BenchmarkId::new("copy", n), src, |b, s| {
            b.iter(|| {
                black_box(&mut dst[..]).copy_from_slice(black_box(s));
            })
        });
    }
    g.finish();
}

fn bench_gso(c: &mut Criterion) {
    // A 64 KB TSO super-packet split into 1398-byte segments (inner MTU 1450).
    let payload = 1398 * 46;
    let mut p = ipv4_packet(Ipv4Addr::new(10, 0, 42, 7), 20 + 20 + payload);
    p[9] = 6;
    {
        let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
        ip.fill_checksum();
    }
    let mut t = tcp::Packet::new_unchecked(&mut p[20..]);
    t.set_header_len(20);
    t.set_flags(tcp::TcpFlags::ACK | tcp::TcpFlags::PSH);
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1398,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut arena = Vec::with_capacity(70_000);
    let mut g = c.benchmark_group("gso_split");
    g.throughput(Throughput::Bytes(p.len() as u64));
    g.bench_function("tcp4_64KB_mss1398", |b| {
        b.iter(|| black_box(gso_split(black_box(&p), &hdr, &mut arena, VXLAN_HEADROOM).unwrap()))
    });
    g.finish();
}

/// The receive path per batch: 64 VXLAN datagrams of one TCP flow (1400-byte inner
/// segments, as one `recvmmsg` or UDP GRO batch brings them) decapsulated, checksum-checked
/// ([`finish_rx_checksum`]) and merged by the coalescer into two TSO writes (64 KB each at
/// most). "finished": the sender finished every inner checksum (a real wire); "unfinished":
/// a kernel sender's offload left them unfinished (a veth link in kind), so each is
/// completed first.
fn bench_rx_batch(c: &mut Criterion) {
    const BATCH: usize = 64;
    const SLOT: usize = 2048;
    let me = LocalVtep {
        vni: 1,
        mac: MacAddr([2, 0, 0, 0, 0, 42]),
        addr_v4: Some(Ipv4Addr::new(10, 0, 42, 0)),
        addr_v6: None,
        error_source_v4: None,
        error_source_v6: None,
        subnet_v4: Some("10.0.42.0/24".parse().unwrap()),
        subnet_v6: None,
    };
    let peers = table(100);
    let src_peer = peers
        .iter()
        .find(|(n, _)| n.contains(&IpAddr::V4(Ipv4Addr::new(10, 0, 7, 1))))
        .map(|(_, v)| *v)
        .unwrap();
    let (s, d) = (
        IpAddr::V4(Ipv4Addr::new(10, 0, 7, 5)),
        IpAddr::V4(Ipv4Addr::new(10, 0, 42, 7)),
    );
    let mss = 1400 - 40;
    let batch = |unfinished: bool| -> Vec<u8> {
        let mut buf = vec![0u8; BATCH * SLOT];
        for i in 0..BATCH {
            let mut p = vec![0u8; 1400];
            let repr = ipv4::Repr {
                src_addr: Ipv4Addr::new(10, 0, 7, 5),
                dst_addr: Ipv4Addr::new(10, 0, 42, 7),
                next_header: IpProtocol::Tcp,
                payload_len: 1380,
                hop_limit: 64,
            };
            repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
                .unwrap();
            {
                let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
                ip.set_ident(100 + i as u16);
                ip.set_frag(true, false, 0);
                ip.fill_checksum();
            }
            for (k, b) in p[40..].iter_mut().enumerate() {
                *b = (k * 7 + i) as u8;
            }
            let mut t = tcp::Packet::new_unchecked(&mut p[20..]);
            t.set_src_port(40000);
            t.set_dst_port(5201);
            t.set_seq_number(1000 + (i * mss) as u32);
            t.set_ack_number(77);
            t.set_header_len(20);
            t.set_flags(tcp::TcpFlags::ACK);
            t.set_window_len(500);
            t.fill_checksum(&s, &d);
            if unfinished {
                let ph = checksum::pseudo_header(&s, &d, 6, 1380);
                p[36..38].copy_from_slice(&ph.to_be_bytes());
            }
            let at = i * SLOT;
            buf[at] = 0x08;
            buf[at + 4..at + 7].copy_from_slice(&[0, 0, 1]);
            buf[at + 8..at + 14].copy_from_slice(&me.mac.0);
            buf[at + 14..at + 20].copy_from_slice(&src_peer.mac.0);
            buf[at + 20..at + 22].copy_from_slice(&0x0800u16.to_be_bytes());
            buf[at + VXLAN_HEADROOM..at + VXLAN_HEADROOM + 1400].copy_from_slice(&p);
        }
        buf
    };
    let mut g = c.benchmark_group("rx_batch");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, unfinished) in [
        ("64x1400B_tcp_finished", false),
        ("64x1400B_tcp_unfinished", true),
    ] {
        let template = batch(unfinished);
        let mut coalescer = Coalescer::new();
        let mut packets = Vec::with_capacity(BATCH);
        let mut run = |buf: &mut Vec<u8>| {
            packets.clear();
            for i in 0..BATCH {
                let d = i * SLOT..i * SLOT + VXLAN_HEADROOM + 1400;
                if let DecapVerdict::Deliver { packet } =
                    decap(buf, d, src_peer.public_ip, &peers, &me)
                {
                    black_box(finish_rx_checksum(&mut buf[packet.clone()]));
                    packets.push(packet);
                }
            }
            coalescer.coalesce(buf, &packets);
            black_box(coalescer.writes().len())
        };
        let mut check = template.clone();
        // 64 x 1360 payload bytes exceed one 64 KB super-packet: two merged writes.
        assert_eq!(run(&mut check), 2, "{name}: two merged writes");
        g.bench_function(name, |b| {
            b.iter_batched_ref(|| template.clone(), &mut run, BatchSize::LargeInput)
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_encap_decap,
    bench_lookup,
    bench_checksum,
    bench_gso,
    bench_rx_batch
);
criterion_main!(benches);
