//! The packet loop over in-memory fakes: two nodes' TX and RX threads joined by a fake
//! network, driven through encap → fake socket → decap → fake TUN.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Condvar, Mutex};

use super::*;
use crate::dataplane::coalesce::fixtures::tcp_packet;
use crate::dataplane::ports::Received;
use crate::dataplane::testutil::ipv4_packet;

/// How long a fake read waits before reporting "nothing" (the real POLL is longer; the
/// fakes only need to let the loops see shutdown).
const FAKE_WAIT: Duration = Duration::from_millis(20);
/// Upper bound for anything the tests wait for.
const PATIENCE: Duration = Duration::from_secs(5);

/// An in-memory TUN device: the test queues packets for the TX loop to read and looks at
/// what the RX loop wrote (vnet header included).
#[derive(Default)]
struct FakeTun {
    inbox: Mutex<VecDeque<Vec<u8>>>,
    queued: Condvar,
    written: Mutex<Vec<Vec<u8>>>,
    wrote: Condvar,
    /// Answer every IPv4 packet written, as the kernel answers a ping or a TCP segment in
    /// the writer's context, queueing the answer on the written queue; `wait_readable` never
    /// reports these answers, as if the waiting reader's wake-up were too slow to matter.
    answer: AtomicBool,
    /// Answers queued and not yet read.
    unannounced: AtomicUsize,
}

impl FakeTun {
    /// Queues a packet as the kernel would hand it to a read: vnet header, then IP.
    fn inject(&self, hdr: &VirtioNetHdr, packet: &[u8]) {
        let mut p = hdr.to_bytes().to_vec();
        p.extend_from_slice(packet);
        self.inbox.lock().unwrap().push_back(p);
        self.queued.notify_all();
    }

    /// Waits until at least `n` packets were written; returns them all.
    fn wait_written(&self, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + PATIENCE;
        let mut w = self.written.lock().unwrap();
        while w.len() < n && Instant::now() < deadline {
            w = self.wrote.wait_timeout(w, FAKE_WAIT).unwrap().0;
        }
        w.clone()
    }
}

impl TunPort for FakeTun {
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut q = self.inbox.lock().unwrap();
        if q.is_empty() {
            q = self
                .queued
                .wait_timeout(q, timeout.min(FAKE_WAIT))
                .unwrap()
                .0;
        }
        let Some(p) = q.pop_front() else {
            return Ok(None);
        };
        let _ = self
            .unannounced
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(Some(n))
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let announced = |q: &VecDeque<Vec<u8>>| q.len() > self.unannounced.load(Ordering::SeqCst);
        let q = self.inbox.lock().unwrap();
        if announced(&q) {
            return Ok(true);
        }
        let q = self
            .queued
            .wait_timeout(q, timeout.min(FAKE_WAIT))
            .unwrap()
            .0;
        Ok(announced(&q))
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.send_gather(packet, &[], &[])
    }

    fn send_gather(&self, hdr: &[u8], buf: &[u8], pieces: &[Range<usize>]) -> io::Result<()> {
        let mut p = hdr.to_vec();
        for r in pieces {
            let piece = buf
                .get(r.clone())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "piece out of range"))?;
            p.extend_from_slice(piece);
        }
        if self.answer.load(Ordering::SeqCst) {
            if let Some(reply) = p.get(VNET_HDR_LEN..).and_then(swapped_ipv4) {
                let mut inbox = self.inbox.lock().unwrap();
                inbox.push_back([&[0u8; VNET_HDR_LEN][..], &reply].concat());
                self.unannounced.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.written.lock().unwrap().push(p);
        self.wrote.notify_all();
        Ok(())
    }
}

/// An IPv4 packet's answer: the same protocol and payload from its destination to its
/// source.
fn swapped_ipv4(p: &[u8]) -> Option<Vec<u8>> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    Some(ipv4_packet(addr(16), addr(12), p[9], &p[20..]))
}

/// One receive of the fake network: a datagram, or a UDP GRO run of equal-sized ones.
struct Message {
    src: SocketAddr,
    bytes: Vec<u8>,
    segment: usize,
}

/// The underlay: a queue of messages per socket bound to a destination address; several
/// sockets on one address form a reuseport group that the sender's port picks from, as the
/// kernel's 4-tuple hash does. Datagrams whose sequence
/// number (counted over every datagram sent) is in `lose` vanish, as on a lossy link. A GSO
/// send that loses nothing arrives as one GRO message, as a receiver with `UDP_GRO` sees it.
#[derive(Default)]
struct FakeNet {
    queues: Mutex<HashMap<IpAddr, Vec<VecDeque<Message>>>>,
    arrived: Condvar,
    lose: Mutex<HashSet<usize>>,
    sent: AtomicUsize,
    /// Every send call: the destination and the number of datagrams it carried.
    sends: Mutex<Vec<(IpAddr, usize)>>,
}

impl FakeNet {
    fn deliver(&self, dst: SocketAddr, m: Message) {
        if let Some(group) = self.queues.lock().unwrap().get_mut(&dst.ip()) {
            let n = group.len();
            if let Some(q) = group.get_mut(usize::from(m.src.port()) % n.max(1)) {
                q.push_back(m);
            }
        }
        self.arrived.notify_all();
    }

    /// Takes the next datagram's sequence number; false if it is to be lost.
    fn survives(&self) -> bool {
        let seq = self.sent.fetch_add(1, Ordering::SeqCst);
        !self.lose.lock().unwrap().contains(&seq)
    }
}

/// A socket bound to `addr` on the fake network: receiving slot `slot` of its address's
/// group, or (`slot` None) a send-only socket.
struct FakeSocket {
    addr: SocketAddr,
    net: Arc<FakeNet>,
    slot: Option<usize>,
}

impl FakeSocket {
    /// Binds one more receiving socket into the group at `addr`.
    fn bind(net: &Arc<FakeNet>, addr: SocketAddr) -> FakeSocket {
        let mut queues = net.queues.lock().unwrap();
        let group = queues.entry(addr.ip()).or_default();
        group.push(VecDeque::new());
        FakeSocket {
            addr,
            net: net.clone(),
            slot: Some(group.len() - 1),
        }
    }

    /// A socket that only sends, from `addr`.
    fn sender(net: &Arc<FakeNet>, addr: SocketAddr) -> FakeSocket {
        FakeSocket {
            addr,
            net: net.clone(),
            slot: None,
        }
    }
}

impl DatagramPort for FakeSocket {
    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.net.sends.lock().unwrap().push((dst.ip(), 1));
        if self.net.survives() {
            let m = Message {
                src: self.addr,
                bytes: buf.to_vec(),
                segment: buf.len(),
            };
            self.net.deliver(dst, m);
        }
        Ok(())
    }

    fn send_gso(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()> {
        let seg = usize::from(segment).max(1);
        let count = buf.chunks(seg).count();
        self.net.sends.lock().unwrap().push((dst.ip(), count));
        let kept: Vec<&[u8]> = buf.chunks(seg).filter(|_| self.net.survives()).collect();
        if kept.len() == count {
            let m = Message {
                src: self.addr,
                bytes: buf.to_vec(),
                segment: seg,
            };
            self.net.deliver(dst, m);
        } else {
            for d in kept {
                let m = Message {
                    src: self.addr,
                    bytes: d.to_vec(),
                    segment: d.len(),
                };
                self.net.deliver(dst, m);
            }
        }
        Ok(())
    }

    fn recv_batch(
        &self,
        buf: &mut [u8],
        slot_len: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<()> {
        out.clear();
        let Some(slot) = self.slot else {
            return Ok(());
        };
        let mut queues = self.net.queues.lock().unwrap();
        let empty = |q: &HashMap<IpAddr, Vec<VecDeque<Message>>>| {
            q.get(&self.addr.ip())
                .and_then(|g| g.get(slot))
                .is_some_and(VecDeque::is_empty)
        };
        if empty(&queues) {
            queues = self.net.arrived.wait_timeout(queues, FAKE_WAIT).unwrap().0;
        }
        let Some(q) = queues
            .get_mut(&self.addr.ip())
            .and_then(|g| g.get_mut(slot))
        else {
            return Ok(());
        };
        let slots = buf.len() / slot_len.max(1);
        for (i, slot) in buf.chunks_exact_mut(slot_len).take(slots).enumerate() {
            let Some(m) = q.pop_front() else { break };
            let len = m.bytes.len().min(slot_len);
            slot[..len].copy_from_slice(&m.bytes[..len]);
            out.push(Received {
                offset: i * slot_len,
                len,
                src: m.src,
                segment: m.segment,
                truncated: m.bytes.len() > slot_len,
            });
        }
        Ok(())
    }
}

const PORT: u16 = 8472;

fn public(node: u8) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(198, 18, 0, node).into(), PORT)
}

fn vtep_mac(node: u8) -> MacAddr {
    MacAddr([0x0e, 0, 0, 0, 0, node])
}

/// A node running the real packet loops over fake TUN queues and fake sockets.
struct Node {
    /// The first TUN queue (the only one of a single-queue node).
    tun: Arc<FakeTun>,
    tuns: Vec<Arc<FakeTun>>,
    shared: Shared,
    threads: Vec<JoinHandle<()>>,
}

impl Node {
    /// Node `me` (pod subnet 10.244.<me>.0/24, underlay 198.18.0.<me>) with one peer.
    fn start(net: &Arc<FakeNet>, me: u8, peer: u8, coalesce: bool) -> Node {
        Node::start_queues(net, me, peer, coalesce, 1)
    }

    /// The same with `n` TUN queues, `n` sockets in a reuseport group and, above one queue,
    /// per-flow send sockets, as [`UserspaceVxlan::start`] lays them out.
    fn start_queues(net: &Arc<FakeNet>, me: u8, peer: u8, coalesce: bool, n: usize) -> Node {
        let local = LocalVtep {
            vni: 1,
            mac: vtep_mac(me),
            addr_v4: Some(Ipv4Addr::new(10, 244, me, 0)),
            addr_v6: None,
            error_source_v4: Some(Ipv4Addr::new(10, 244, 0, 1)),
            error_source_v6: None,
            subnet_v4: Some(format!("10.244.{me}.0/24").parse().unwrap()),
            subnet_v6: None,
        };
        let remote = RemoteVtep {
            public_ip: public(peer).ip(),
            mac: vtep_mac(peer),
            vni: 1,
        };
        let table = PeerTable::new([(format!("10.244.{peer}.0/24").parse().unwrap(), remote)]);
        let shared = Shared {
            io_errors: Arc::new(IoErrors::default()),
            table: Arc::new(ArcSwap::from_pointee(table)),
            counters: Arc::new(Counters::new()),
            stop: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicUsize::new(0)),
            local: Arc::new(local),
            port: PORT,
            coalesce,
            mtu: 1450,
            queue_stats: Arc::new(QueueStats::new(n, n)),
            pin: false,
        };
        let tuns: Vec<Arc<FakeTun>> = (0..n).map(|_| Arc::new(FakeTun::default())).collect();
        let socks = (0..n)
            .map(|_| Arc::new(FakeSocket::bind(net, public(me))))
            .collect();
        let senders = match n {
            1 => Vec::new(),
            _ => (0..n * SENDERS_PER_QUEUE)
                .map(|k| {
                    let from = SocketAddr::new(public(me).ip(), 40_000 + k as u16);
                    Arc::new(FakeSocket::sender(net, from))
                })
                .collect(),
        };
        let mut threads = Vec::new();
        let queues = Queues {
            tuns: tuns.clone(),
            socks,
            senders,
        };
        spawn_loops(&shared, queues, &mut threads).unwrap();
        Node {
            tun: tuns[0].clone(),
            tuns,
            shared,
            threads,
        }
    }

    /// Stops the loops; returns how long they took to exit.
    fn stop(mut self) -> Duration {
        let t0 = Instant::now();
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        assert_eq!(self.shared.live.load(Ordering::SeqCst), 0);
        assert_eq!(self.shared.io_errors.panics(), 0);
        t0.elapsed()
    }
}

/// Waits (a bounded time) until `cond` holds.
fn wait_until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A vnet header for a packet with nothing offloaded.
fn plain() -> VirtioNetHdr {
    VirtioNetHdr::parse(&[0; VNET_HDR_LEN]).unwrap()
}

/// The vnet header of a TCP/IPv4 super-packet (40 header bytes) for 1000-byte segments.
fn tso_1000() -> VirtioNetHdr {
    VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1000,
        csum_start: 20,
        csum_offset: 16,
    }
}

/// A small UDP packet from pod 10.244.1.5 to pod `dst`, its payload tagged with `i`.
fn udp_packet(dst: Ipv4Addr, i: u8) -> Vec<u8> {
    udp_sized(dst, i, 16)
}

/// The same with `payload` bytes of payload.
fn udp_sized(dst: Ipv4Addr, i: u8, payload: u16) -> Vec<u8> {
    let mut udp = vec![0u8; 8 + usize::from(payload)];
    udp[0..2].copy_from_slice(&4000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&5000u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(8 + payload).to_be_bytes());
    udp[8..].fill(i);
    ipv4_packet(Ipv4Addr::new(10, 244, 1, 5), dst, 17, &udp)
}

#[test]
fn burst_crosses_with_one_lost_datagram_and_counts_match() {
    let net = Arc::new(FakeNet::default());
    net.lose.lock().unwrap().insert(7);
    let a = Node::start(&net, 1, 2, true);
    let b = Node::start(&net, 2, 1, true);
    let sent: Vec<Vec<u8>> = (0..20)
        .map(|i| udp_packet(Ipv4Addr::new(10, 244, 2, 7), i))
        .collect();
    for p in &sent {
        a.tun.inject(&plain(), p);
    }
    let got = b.tun.wait_written(19);
    // Every packet but the lost eighth arrives, in order, behind a zeroed vnet header.
    let want: Vec<Vec<u8>> = sent
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 7)
        .map(|(_, p)| [&[0u8; VNET_HDR_LEN][..], p].concat())
        .collect();
    assert_eq!(got, want);
    // The loop counts a packet just after writing it.
    wait_until(|| b.shared.counters.snapshot().rx_packets >= 19);
    let (sa, sb) = (a.shared.counters.snapshot(), b.shared.counters.snapshot());
    assert_eq!(sa.tx_packets, 20);
    assert_eq!(sb.rx_packets, 19);
    assert_eq!(sa.total_drops() + sb.total_drops(), 0);
    a.stop();
    b.stop();
}

#[test]
fn tso_super_packet_is_split_sent_with_gso_and_merged_again() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, true);
    let b = Node::start(&net, 2, 1, true);
    let payload: Vec<u8> = (0..8 * 1000u32).map(|i| (i % 251) as u8).collect();
    let sup = tcp_packet(false, 1, 1000, 0x10, &[], &payload);
    a.tun.inject(&tso_1000(), &sup);
    // Eight segments crossed the fake wire in one GSO send (one GRO message) ...
    wait_until(|| b.shared.counters.snapshot().rx_packets >= 8);
    assert_eq!(a.shared.counters.snapshot().tx_packets, 8);
    assert_eq!(b.shared.counters.snapshot().rx_packets, 8);
    // ... and were written to B's TUN as one super-packet again.
    let got = b.tun.wait_written(1);
    assert_eq!(got.len(), 1, "{} writes", got.len());
    let w = VirtioNetHdr::parse(&got[0]).unwrap();
    assert_eq!(w.gso_type, VirtioNetHdr::GSO_TCPV4);
    assert_eq!(w.gso_size, 1000);
    let inner = &got[0][VNET_HDR_LEN..];
    assert_eq!(inner.len(), sup.len());
    assert_eq!(&inner[40..], &payload[..]);
    assert_eq!(&inner[12..20], &sup[12..20], "addresses");
    a.stop();
    b.stop();
}

#[test]
fn without_coalescing_every_segment_is_its_own_write() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, false);
    let b = Node::start(&net, 2, 1, false);
    let payload = vec![0x5a; 3 * 1000];
    let sup = tcp_packet(false, 1, 1000, 0x10, &[], &payload);
    a.tun.inject(&tso_1000(), &sup);
    let got = b.tun.wait_written(3);
    assert_eq!(got.len(), 3);
    for (i, w) in got.iter().enumerate() {
        assert_eq!(&w[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        let seq = u32::from_be_bytes(w[VNET_HDR_LEN + 24..VNET_HDR_LEN + 28].try_into().unwrap());
        assert_eq!(seq, 1000 + 1000 * i as u32);
        assert_eq!(w.len(), VNET_HDR_LEN + 40 + 1000);
    }
    a.stop();
    b.stop();
}

#[test]
fn core_drops_are_counted_and_unreachable_is_answered_on_tun() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, true);
    let b = Node::start(&net, 2, 1, true);
    // No peer owns 10.244.9.0/24: A writes ICMP destination unreachable back to its TUN.
    a.tun
        .inject(&plain(), &udp_packet(Ipv4Addr::new(10, 244, 9, 9), 0));
    let replies = a.tun.wait_written(1);
    wait_until(|| a.shared.counters.snapshot().replies >= 1);
    assert_eq!(replies.len(), 1);
    let icmp = &replies[0][VNET_HDR_LEN..];
    assert_eq!(icmp[9], 1, "ICMP");
    assert_eq!(&icmp[16..20], &[10, 244, 1, 5], "back to the sender");
    assert_eq!(icmp[20], 3, "destination unreachable");
    assert_eq!(a.shared.counters.snapshot().replies, 1);
    // A datagram for another VNI from A, and one from an address that is no peer's.
    let mut frame = vec![0x08, 0, 0, 0, 0, 0, 99, 0];
    frame.extend_from_slice(&vtep_mac(2).0);
    frame.extend_from_slice(&vtep_mac(1).0);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&udp_packet(Ipv4Addr::new(10, 244, 2, 7), 1));
    let from_a = FakeSocket::sender(&net, public(1));
    from_a.send_to(&frame, public(2)).unwrap();
    let stranger = FakeSocket::sender(&net, "203.0.113.9:8472".parse().unwrap());
    frame[4..7].copy_from_slice(&[0, 0, 1]);
    stranger.send_to(&frame, public(2)).unwrap();
    wait_until(|| b.shared.counters.snapshot().total_drops() >= 2);
    let s = b.shared.counters.snapshot();
    assert_eq!(s.drops_for(DropReason::WrongVni), 1);
    assert_eq!(s.drops_for(DropReason::UnknownSource), 1);
    assert_eq!(s.rx_packets, 0);
    assert!(b.tun.written.lock().unwrap().is_empty());
    a.stop();
    b.stop();
}

#[test]
fn shutdown_stops_every_loop_promptly_and_reads_no_more() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, true);
    let tun = a.tun.clone();
    let took = a.stop();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    tun.inject(&plain(), &udp_packet(Ipv4Addr::new(10, 244, 2, 7), 0));
    std::thread::sleep(3 * FAKE_WAIT);
    assert_eq!(
        tun.inbox.lock().unwrap().len(),
        1,
        "a stopped loop read a packet"
    );
    assert_eq!(net.sent.load(Ordering::SeqCst), 0);
}

/// A small UDP packet of flow `flow` (source port 4000 + flow) from pod 10.244.1.5 to pod
/// 10.244.2.7, its payload tagged with `i`.
fn flow_packet(flow: u16, i: u8) -> Vec<u8> {
    let mut p = udp_packet(Ipv4Addr::new(10, 244, 2, 7), i);
    p[20..22].copy_from_slice(&(4000 + flow).to_be_bytes());
    p
}

#[test]
fn several_queues_carry_parallel_flows_each_in_order() {
    const QUEUES: usize = 2;
    const FLOWS: u16 = 16;
    const PER_FLOW: u8 = 20;
    let net = Arc::new(FakeNet::default());
    let a = Node::start_queues(&net, 1, 2, true, QUEUES);
    let b = Node::start_queues(&net, 2, 1, true, QUEUES);
    // The kernel puts a flow on one TUN queue (here: flow number modulo the queues).
    for i in 0..PER_FLOW {
        for f in 0..FLOWS {
            a.tuns[usize::from(f) % QUEUES].inject(&plain(), &flow_packet(f, i));
        }
    }
    let total = usize::from(FLOWS) * usize::from(PER_FLOW);
    wait_until(|| b.shared.counters.snapshot().rx_packets >= total as u64);
    assert_eq!(a.shared.counters.snapshot().tx_packets, total as u64);
    assert_eq!(b.shared.counters.snapshot().rx_packets, total as u64);
    // Every flow arrived whole and in order on one of B's queues.
    let mut seen = HashMap::new();
    for (q, tun) in b.tuns.iter().enumerate() {
        for w in tun.written.lock().unwrap().iter() {
            let p = &w[VNET_HDR_LEN..];
            let flow = u16::from_be_bytes([p[20], p[21]]) - 4000;
            let (queue, tags) = seen.entry(flow).or_insert((q, Vec::new()));
            assert_eq!(*queue, q, "flow {flow} arrived on two queues");
            tags.push(p[28]);
        }
    }
    assert_eq!(seen.len(), usize::from(FLOWS));
    for (flow, (_, tags)) in &seen {
        assert_eq!(*tags, (0..PER_FLOW).collect::<Vec<_>>(), "flow {flow}");
    }
    // Both TX threads of A and both RX threads of B carried traffic.
    let (qa, qb) = (
        a.shared.queue_stats.snapshot(),
        b.shared.queue_stats.snapshot(),
    );
    assert_eq!(qa.len(), QUEUES);
    assert!(qa.iter().all(|(tx, _)| *tx > 0), "{qa:?}");
    assert!(qb.iter().all(|(_, rx)| *rx > 0), "{qb:?}");
    assert_eq!(qa.iter().map(|q| q.0).sum::<u64>(), total as u64);
    a.stop();
    b.stop();
}

#[test]
fn one_queue_sends_from_the_vxlan_port() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, true);
    let b = Node::start_queues(&net, 2, 1, true, 2);
    for f in 0..8 {
        a.tun.inject(&plain(), &flow_packet(f, 0));
    }
    let got: usize = {
        wait_until(|| b.shared.counters.snapshot().rx_packets >= 8);
        b.tuns.iter().map(|t| t.written.lock().unwrap().len()).sum()
    };
    assert_eq!(got, 8);
    // One 4-tuple (port 8472 to 8472): the receiver's group puts it all on one socket.
    let rx: Vec<u64> = b
        .shared
        .queue_stats
        .snapshot()
        .iter()
        .map(|q| q.1)
        .collect();
    assert_eq!(rx.iter().filter(|n| **n > 0).count(), 1, "{rx:?}");
    a.stop();
    b.stop();
}

/// Queues `packets` on `tun` at once, as a burst the kernel queued before the loop ran.
fn inject_burst(tun: &FakeTun, packets: &[Vec<u8>]) {
    let mut q = tun.inbox.lock().unwrap();
    for p in packets {
        q.push_back([&plain().to_bytes()[..], p].concat());
    }
    drop(q);
    tun.queued.notify_all();
}

#[test]
fn queued_small_packets_leave_in_gso_sends_per_peer_and_size_a_lone_one_at_once() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, true);
    let b = Node::start(&net, 2, 1, true);
    let peer = |n: u8| RemoteVtep {
        public_ip: public(n).ip(),
        mac: vtep_mac(n),
        vni: 1,
    };
    let table = PeerTable::new([
        ("10.244.2.0/24".parse().unwrap(), peer(2)),
        ("10.244.3.0/24".parse().unwrap(), peer(3)),
    ]);
    a.shared.table.store(Arc::new(table));
    let to2 = |i: u8| udp_packet(Ipv4Addr::new(10, 244, 2, 7), i);
    let to3 = |i: u8| udp_packet(Ipv4Addr::new(10, 244, 3, 7), i);
    let short = udp_sized(Ipv4Addr::new(10, 244, 2, 7), 20, 12);
    let long = udp_sized(Ipv4Addr::new(10, 244, 3, 7), 0, 24);
    // 20 equal packets and a shorter one to node 2, then 5 to node 3, then 5 longer ones
    // to node 3, then 100 equal ones to node 2: all queued before the loop reads any.
    let mut burst: Vec<Vec<u8>> = (0..20).map(to2).collect();
    burst.push(short);
    burst.extend((0..5).map(to3));
    burst.extend(std::iter::repeat_n(long, 5));
    burst.extend((0..100).map(to2));
    inject_burst(&a.tun, &burst);
    wait_until(|| a.shared.counters.snapshot().tx_packets >= 131);
    let (ip2, ip3) = (public(2).ip(), public(3).ip());
    assert_eq!(
        *net.sends.lock().unwrap(),
        [(ip2, 21), (ip3, 5), (ip3, 5), (ip2, MAX_GSO_SEGMENTS), (ip2, 36)],
        "one send per run of one peer and frame size, the shorter frame last, at most {MAX_GSO_SEGMENTS} per send"
    );
    // Node 2 got its 121 packets intact and in order.
    let got = b.tun.wait_written(121);
    let want: Vec<&Vec<u8>> = burst.iter().filter(|p| p[16..19] == [10, 244, 2]).collect();
    assert_eq!(got.len(), 121);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(&g[VNET_HDR_LEN..], &w[..]);
    }
    // A lone packet is sent on its own, without waiting for company.
    net.sends.lock().unwrap().clear();
    a.tun.inject(&plain(), &to2(7));
    wait_until(|| !net.sends.lock().unwrap().is_empty());
    assert_eq!(*net.sends.lock().unwrap(), [(ip2, 1)]);
    assert_eq!(b.tun.wait_written(122).len(), 122);
    a.stop();
    b.stop();
}

#[test]
fn an_answer_the_kernel_queues_during_a_tun_write_leaves_without_the_tx_thread() {
    let net = Arc::new(FakeNet::default());
    let a = Node::start(&net, 1, 2, true);
    let b = Node::start(&net, 2, 1, true);
    // B's TX thread is never told of the answers: only B's RX thread, which wrote the
    // packet, can send them on.
    b.tun.answer.store(true, Ordering::SeqCst);
    for i in 0..3 {
        let ping = udp_packet(Ipv4Addr::new(10, 244, 2, 7), i);
        a.tun.inject(&plain(), &ping);
        let got = a.tun.wait_written(usize::from(i) + 1);
        let answer = swapped_ipv4(&ping).unwrap();
        assert_eq!(
            got.get(usize::from(i)),
            Some(&[&[0u8; VNET_HDR_LEN][..], &answer].concat()),
            "answer {i} came back"
        );
    }
    // B counts a packet just after sending it, which can be after A wrote it.
    wait_until(|| b.shared.counters.snapshot().tx_packets >= 3);
    assert_eq!(b.shared.counters.snapshot().tx_packets, 3);
    a.stop();
    b.stop();
}
