//! The userspace VXLAN data plane: a TUN device and a UDP socket, one thread per direction.
//!
//! Control flow: the daemon builds a [`PeerTable`] from the current peers and swaps it in
//! atomically ([`UserspaceVxlan::sync`]); the packet threads load it per packet and never
//! block on the control plane. Per-packet outcomes are counted in [`Counters`], not logged.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{debug, warn};

use crate::backend::Peer;
use crate::dataplane::coalesce::Coalescer;
use crate::dataplane::offload::{
    complete_partial_checksum, finish_rx_checksum, gso_split, rx_super_packet, GsoKind, Segments,
    VirtioNetHdr,
};
use crate::dataplane::ports::{DatagramPort, TunPort};
use crate::dataplane::{
    decap, encap, Counters, DecapVerdict, DropReason, EncapVerdict, IcmpLimiter, LocalVtep,
    PeerTable, RemoteVtep, VXLAN_HEADROOM,
};
use crate::io::tun::{Tun, TunOffload, VNET_HDR_LEN};
use crate::io::udp::VxlanSocket;
use crate::wire::MacAddr;

/// How often blocked reads wake up to look for shutdown.
const POLL: Duration = Duration::from_millis(200);
/// Receive buffers hold the largest datagram plus room for a vnet header.
const BUF_LEN: usize = 65_536 + 64;
/// Largest UDP payload one GSO send may carry.
const MAX_GSO_BYTES: usize = 65_000;
/// Most segments the kernel accepts in one UDP GSO send (UDP_MAX_SEGMENTS on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Messages per receive call (`recvmmsg`); each may hold a UDP GRO batch.
const RX_SLOTS: usize = 64;
/// Bytes per receive slot: the largest UDP payload (UDP GRO batches stay below 64 KiB too),
/// plus an odd amount so that slot starts do not all fall into the same cache sets.
const RX_SLOT: usize = 65_536 + 320;

/// What the userspace data plane needs to start.
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    /// TUN device name (`flannel.<VNI>`).
    pub device: String,
    /// Our VNI.
    pub vni: u32,
    /// UDP port for VXLAN (flannel's default 8472).
    pub port: u16,
    /// Underlay address the socket binds to.
    pub bind: IpAddr,
    /// Our VTEP MAC, published in the lease.
    pub mac: MacAddr,
    /// Our VTEP addresses (the lease subnets' network addresses).
    pub local: LocalVtep,
    /// Accept TCP super-packets from the kernel (TSO) and segment them here, sending the
    /// segments with UDP GSO; on receive, use UDP GRO and merge TCP segments into
    /// super-packets for the TUN. Off means one packet per TUN read and write.
    pub tso: bool,
    /// The TUN device's MTU: a received inner TCP packet longer than this (a kernel sender's
    /// GSO super-packet that crossed a link with GSO on) is written as TSO with segments
    /// that fit it.
    pub mtu: usize,
}

/// Descriptors of a running data plane handed over by the previous flanneld
/// ([`crate::backend::handoff`]): its TUN device and its UDP socket.
#[derive(Debug)]
pub struct Inherited {
    /// The TUN descriptor (the same open file the predecessor reads).
    pub tun: std::os::fd::OwnedFd,
    /// The UDP socket (the same socket, with its receive queue).
    pub sock: std::os::fd::OwnedFd,
}

/// A userspace data plane: the device and socket, and once [`UserspaceVxlan::serve`] ran,
/// the packet threads. The TUN device is persistent: stopping, dropping or crashing leaves
/// it in place with its address and routes, and the next start attaches to it.
#[derive(Debug)]
pub struct UserspaceVxlan {
    table: Arc<ArcSwap<PeerTable>>,
    counters: Arc<Counters>,
    io_errors: Arc<IoErrors>,
    stop: Arc<AtomicBool>,
    /// Packet threads still running (a handover waits for 0).
    live: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    /// The device and socket; None once handed over and closed.
    io: Option<(Arc<Tun>, VxlanSocket)>,
    local: Arc<LocalVtep>,
    port: u16,
    tso: bool,
    mtu: usize,
    device: String,
}

impl UserspaceVxlan {
    /// Opens (or attaches to) the persistent TUN device and binds the socket, or adopts the
    /// predecessor's descriptors; a handed-over socket bound elsewhere (the port or address
    /// changed) is closed and a new one bound. No packet is read before
    /// [`UserspaceVxlan::serve`]. The device is configured (address, MTU, routes) by the
    /// caller.
    pub fn start(
        cfg: &UserspaceConfig,
        inherited: Option<Inherited>,
    ) -> io::Result<UserspaceVxlan> {
        let offload = TunOffload {
            vnet_hdr: true,
            tso: cfg.tso,
        };
        let addr = SocketAddr::new(cfg.bind, cfg.port);
        let (tun, sock) = match inherited {
            Some(inh) => {
                let tun = Tun::adopt(inh.tun, &cfg.device, offload)?;
                let sock = match VxlanSocket::adopt(inh.sock, addr, POLL) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "not using the handed-over socket; binding a new one");
                        VxlanSocket::bind(addr, POLL)?
                    }
                };
                (tun, sock)
            }
            None => (
                Tun::open(&cfg.device, offload)?,
                VxlanSocket::bind(addr, POLL)?,
            ),
        };
        tun.set_persist(true)?;
        if cfg.tso {
            let gro = sock.enable_gro();
            debug!(gro, "UDP receive offload");
        }
        Ok(UserspaceVxlan {
            table: Arc::new(ArcSwap::from_pointee(PeerTable::new(Vec::new()))),
            counters: Arc::new(Counters::new()),
            io_errors: Arc::new(IoErrors::default()),
            stop: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
            io: Some((Arc::new(tun), sock)),
            local: Arc::new(cfg.local),
            port: cfg.port,
            tso: cfg.tso,
            mtu: cfg.mtu,
            device: cfg.device.clone(),
        })
    }

    /// Starts the packet threads (once; later calls do nothing). Call it after the first
    /// [`UserspaceVxlan::sync`]: a predecessor keeps forwarding until then, and packets read
    /// with an empty table would be answered "unreachable".
    pub fn serve(&mut self) -> io::Result<()> {
        let Some((tun, sock)) = &self.io else {
            return Ok(());
        };
        if !self.threads.is_empty() {
            return Ok(());
        }
        let shared = Shared {
            io_errors: self.io_errors.clone(),
            table: self.table.clone(),
            counters: self.counters.clone(),
            stop: self.stop.clone(),
            live: self.live.clone(),
            local: self.local.clone(),
            port: self.port,
            coalesce: self.tso,
            mtu: self.mtu,
        };
        let queues = vec![(tun.clone(), Arc::new(sock.try_clone()?))];
        spawn_loops(&shared, queues, &mut self.threads)?;
        Ok(())
    }

    /// Whether the packet threads were started (or the plane was handed over and closed).
    pub fn serving(&self) -> bool {
        !self.threads.is_empty() || self.io.is_none()
    }

    /// What a handover needs: the descriptors to pass on and a way to stop reading them.
    /// None once closed.
    pub fn handover(&self) -> Option<Handover> {
        let (tun, sock) = self.io.as_ref()?;
        Some(Handover {
            tun: tun.clone(),
            sock: sock.try_clone().ok(),
            stop: self.stop.clone(),
            live: self.live.clone(),
        })
    }

    /// After a handover: stops the threads (already stopped) and closes our descriptors, so
    /// that only the successor holds the device (if it crashes, its restart can attach).
    pub fn close_handed_over(&mut self) {
        self.stop_threads();
        self.io = None;
    }

    /// The TUN device name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Packet and drop counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// IO failure counters.
    pub fn io_errors(&self) -> &Arc<IoErrors> {
        &self.io_errors
    }

    /// Remote subnets in the peer table the packet threads use now.
    pub fn peer_table_len(&self) -> usize {
        self.table.load().len()
    }

    /// Replaces the peer table with one built from `peers` (the checked peer set: nothing
    /// is re-checked or diffed here, the table is rebuilt whole and swapped in).
    pub fn sync(&self, peers: &[Peer]) {
        let entries = plan_table(peers);
        debug!(peers = entries.len(), "userspace peer table swapped");
        self.table.store(Arc::new(PeerTable::new(entries)));
    }

    /// Stops the packet threads (each finishes the packet it holds) and closes our
    /// descriptors. The device stays, with its address and routes.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for UserspaceVxlan {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The parts of a running data plane a handover to a successor uses, shareable with the
/// thread that talks to it.
#[derive(Debug)]
pub struct Handover {
    tun: Arc<Tun>,
    sock: Option<VxlanSocket>,
    stop: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

impl Handover {
    /// The TUN and socket descriptors, in the order [`Inherited`] expects.
    pub fn fds(&self) -> Option<[std::os::fd::BorrowedFd<'_>; 2]> {
        Some([self.tun.as_fd(), self.sock.as_ref()?.as_fd()])
    }

    /// Stops reading: every packet thread finishes the packet (or batch) it holds and
    /// exits. Returns whether they all did within `limit`.
    pub fn release(&self, limit: Duration) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + limit;
        while self.live.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Whether [`Handover::release`] was called.
    pub fn released(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The pure part of [`UserspaceVxlan::sync`]: the table entries of the vxlan peers (intake
/// hands a vxlan node no other kind).
pub fn plan_table(peers: &[Peer]) -> Vec<(ipnet::IpNet, RemoteVtep)> {
    peers
        .iter()
        .filter_map(|p| {
            let (mac, vni) = p.vtep()?;
            let vtep = RemoteVtep {
                public_ip: p.public_ip,
                mac,
                vni,
            };
            Some((p.subnet, vtep))
        })
        .collect()
}

/// IO failures of the packet threads (the sans-IO core's [`Counters`] cover verdicts).
#[derive(Debug, Default)]
pub struct IoErrors {
    send_failed: AtomicU64,
    tun_write_failed: AtomicU64,
    panics: AtomicU64,
}

impl IoErrors {
    fn count_send_failure(&self) {
        self.send_failed.fetch_add(1, Ordering::Relaxed);
    }

    fn count_tun_write_failure(&self) {
        self.tun_write_failed.fetch_add(1, Ordering::Relaxed);
    }

    fn count_panic(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    /// Packet loops restarted after a panic (a bug: should stay 0).
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// UDP sends the kernel refused.
    pub fn send_failed(&self) -> u64 {
        self.send_failed.load(Ordering::Relaxed)
    }

    /// TUN writes the kernel refused.
    pub fn tun_write_failed(&self) -> u64 {
        self.tun_write_failed.load(Ordering::Relaxed)
    }
}

/// What every packet thread of one data plane shares.
#[derive(Clone)]
struct Shared {
    io_errors: Arc<IoErrors>,
    table: Arc<ArcSwap<PeerTable>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Packet threads still running.
    live: Arc<AtomicUsize>,
    local: Arc<LocalVtep>,
    port: u16,
    /// Merge received TCP segments into super-packets before writing them to TUN.
    coalesce: bool,
    /// The TUN MTU (see [`UserspaceConfig::mtu`]).
    mtu: usize,
}

/// Starts a TX and an RX thread for every `(TUN queue, socket)` pair, appending them to
/// `threads`; each counts itself in `shared.live` while it runs.
fn spawn_loops<T: TunPort + 'static, S: DatagramPort + 'static>(
    shared: &Shared,
    queues: Vec<(Arc<T>, Arc<S>)>,
    threads: &mut Vec<JoinHandle<()>>,
) -> io::Result<()> {
    for (q, (tun, sock)) in queues.into_iter().enumerate() {
        for (name, run) in [
            ("tx", Worker::run_tx as fn(&Worker<T, S>)),
            ("rx", Worker::run_rx as fn(&Worker<T, S>)),
        ] {
            let w = Worker {
                shared: shared.clone(),
                tun: tun.clone(),
                sock: sock.clone(),
            };
            let live = shared.live.clone();
            live.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("vxlan-{name}{q}"))
                .spawn(move || {
                    w.guarded(name, run);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// One packet thread's view: the shared state and the queue it serves.
struct Worker<T, S> {
    shared: Shared,
    tun: Arc<T>,
    sock: Arc<S>,
}

impl<T, S> std::ops::Deref for Worker<T, S> {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl<T: TunPort, S: DatagramPort> Worker<T, S> {
    /// Runs a packet loop until shutdown. Nothing in it should panic; if something does
    /// anyway, the loop is restarted (and counted) rather than leaving the node silently
    /// without a data path.
    fn guarded(self, name: &str, run: fn(&Worker<T, S>)) {
        while !self.stop.load(Ordering::Relaxed) {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&self)));
            if result.is_err() {
                self.io_errors.count_panic();
                tracing::error!(thread = name, "packet loop panicked; restarting it");
                // A loop that panics at once again must not spin; the daemon exits after
                // repeated panics (daemon::PANIC_LIMIT).
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// TUN → VXLAN. The packet is read so that its vnet header ends exactly where the
    /// VXLAN + Ethernet headroom ends; encap then overwrites the consumed vnet header. TSO
    /// super-packets are split into an arena laid out for one UDP GSO send per batch. ICMP
    /// errors the core builds are rate limited like the kernel's (1000/s, bursts of 50).
    fn run_tx(&self) {
        let epoch = Instant::now();
        let mut icmp = IcmpLimiter::default();
        let mut buf = vec![0u8; BUF_LEN];
        let mut arena = Vec::with_capacity(2 * BUF_LEN);
        let mut gso_ok = true;
        let off = VXLAN_HEADROOM - VNET_HDR_LEN;
        while !self.stop.load(Ordering::Relaxed) {
            let n = match self.tun.recv(&mut buf[off..], POLL) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            let end = off + n;
            let now = epoch.elapsed();
            let hdr = match VirtioNetHdr::parse(buf.get(off..end).unwrap_or_default()) {
                Ok(h) => h,
                Err(reason) => {
                    self.counters.count_drop(reason);
                    continue;
                }
            };
            let table = self.table.load();
            if hdr.gso_kind() == GsoKind::None {
                if hdr.needs_csum() {
                    let (start, offset) = (hdr.csum_start.into(), hdr.csum_offset.into());
                    let packet = &mut buf[VXLAN_HEADROOM..end];
                    if let Err(reason) = complete_partial_checksum(packet, start, offset) {
                        self.counters.count_drop(reason);
                        continue;
                    }
                }
                self.encap_and_send(&mut buf, VXLAN_HEADROOM..end, &table, (&mut icmp, now));
                continue;
            }
            let segs = match gso_split(&buf[VXLAN_HEADROOM..end], &hdr, &mut arena, VXLAN_HEADROOM)
            {
                Ok(s) => s,
                Err(reason) => {
                    self.counters.count_drop(reason);
                    continue;
                }
            };
            if segs.len() == 1 {
                let Some(p) = segs.packet(0) else { continue };
                self.encap_and_send(&mut arena, p, &table, (&mut icmp, now));
            } else {
                self.send_segments(&mut arena, &segs, &table, &mut gso_ok, (&mut icmp, now));
            }
        }
    }

    /// Writes an error the core built in `buf[packet]` (e.g. ICMP net unreachable) back to
    /// TUN.
    fn reply_to_tun(&self, buf: &mut [u8], packet: std::ops::Range<usize>) {
        match self.write_plain(buf, packet) {
            Ok(()) => self.counters.count_reply(),
            Err(_) => self.io_errors.count_tun_write_failure(),
        }
    }

    /// Encapsulates and sends one packet; `icmp` is the error rate limit and the time now.
    fn encap_and_send(
        &self,
        buf: &mut [u8],
        packet: std::ops::Range<usize>,
        table: &PeerTable,
        icmp: (&mut IcmpLimiter, Duration),
    ) {
        match encap(buf, packet, table, &self.local, icmp.0, icmp.1) {
            EncapVerdict::Transmit { dst, frame } => {
                let len = frame.len();
                match self
                    .sock
                    .send_to(&buf[frame], SocketAddr::new(dst, self.port))
                {
                    Ok(()) => self.counters.count_tx(len),
                    Err(_) => self.io_errors.count_send_failure(),
                }
            }
            EncapVerdict::ReplyToTun { packet } => self.reply_to_tun(buf, packet),
            EncapVerdict::Drop(reason) => self.counters.count_drop(reason),
        }
    }

    /// Encapsulates every segment in place and sends them with UDP GSO in batches that fit
    /// one datagram send (64 KiB); falls back to one send per segment if the kernel refuses.
    fn send_segments(
        &self,
        arena: &mut [u8],
        segs: &Segments,
        table: &PeerTable,
        gso_ok: &mut bool,
        icmp: (&mut IcmpLimiter, Duration),
    ) {
        let (limiter, now) = icmp;
        let stride = segs.stride();
        let mut dst = None;
        let mut frames = 0usize;
        for (i, p) in segs.iter().enumerate() {
            match encap(arena, p, table, &self.local, limiter, now) {
                EncapVerdict::Transmit { dst: d, frame } => {
                    debug_assert_eq!(frame.start, i * stride);
                    dst = Some(d);
                    frames = frame.end;
                }
                // Every segment has the same destination: one verdict stands for all.
                EncapVerdict::ReplyToTun { packet } => {
                    self.reply_to_tun(arena, packet);
                    return;
                }
                EncapVerdict::Drop(reason) => {
                    self.counters.count_drop(reason);
                    return;
                }
            }
        }
        let Some(dst) = dst else { return };
        let to = SocketAddr::new(dst, self.port);
        let per_send = (MAX_GSO_BYTES / stride).clamp(1, MAX_GSO_SEGMENTS);
        let mut start = 0;
        while start < frames {
            let stop = (start + per_send * stride).min(frames);
            let chunk = &arena[start..stop];
            let sent = if *gso_ok && chunk.len() > stride {
                match self.sock.send_gso(chunk, stride as u16, to) {
                    Ok(()) => true,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                        ) =>
                    {
                        warn!(error = %e, "UDP GSO refused; sending segments one by one from now on");
                        *gso_ok = false;
                        false
                    }
                    Err(_) => {
                        self.io_errors.count_send_failure();
                        true
                    }
                }
            } else {
                false
            };
            if sent {
                for seg in chunk.chunks(stride) {
                    self.counters.count_tx(seg.len());
                }
            } else {
                for seg in chunk.chunks(stride) {
                    match self.sock.send_to(seg, to) {
                        Ok(()) => self.counters.count_tx(seg.len()),
                        Err(_) => self.io_errors.count_send_failure(),
                    }
                }
            }
            start = stop;
        }
    }

    /// VXLAN → TUN. One `recvmmsg` fetches a batch of messages (each a datagram or a UDP
    /// GRO run of them); every datagram is decapsulated in place, an inner checksum a
    /// sender's offload left unfinished is completed (links that pass `CHECKSUM_PARTIAL`,
    /// e.g. veth in kind); the inner packets are
    /// merged into TCP super-packets where the kernel's GRO would have merged them and
    /// written with one TUN write each. Unmerged packets are written with a zeroed vnet
    /// header placed over the already-parsed tail of their inner Ethernet header.
    fn run_rx(&self) {
        let mut buf = vec![0u8; RX_SLOTS * RX_SLOT];
        let mut msgs = Vec::with_capacity(RX_SLOTS);
        let mut packets = Vec::with_capacity(RX_SLOTS);
        let mut coalescer = Coalescer::new();
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.sock.recv_batch(&mut buf, RX_SLOT, &mut msgs) {
                warn!(error = %e, "UDP receive failed");
                std::thread::sleep(POLL);
                continue;
            }
            if msgs.is_empty() {
                continue;
            }
            let table = self.table.load();
            packets.clear();
            for m in &msgs {
                if m.truncated {
                    self.counters.count_drop(DropReason::Truncated);
                    continue;
                }
                for d in m.datagrams() {
                    match decap(&mut buf, d, m.src.ip(), &table, &self.local) {
                        DecapVerdict::Deliver { packet } => {
                            let p = buf.get_mut(packet.clone()).unwrap_or_default();
                            if let Some(hdr) = rx_super_packet(p, self.mtu) {
                                // In order: what came before it first.
                                self.write_batch(&mut buf, &mut packets, &mut coalescer);
                                let len = packet.len();
                                match self.tun.send_gather(&hdr.to_bytes(), &buf, &[packet]) {
                                    Ok(()) => self.counters.count_rx(len),
                                    Err(_) => self.io_errors.count_tun_write_failure(),
                                }
                                continue;
                            }
                            self.counters.record_rx_checksum(finish_rx_checksum(p));
                            packets.push(packet)
                        }
                        DecapVerdict::Reply { dst, frame } => {
                            let _ = self
                                .sock
                                .send_to(&buf[frame], SocketAddr::new(dst, self.port));
                            self.counters.count_reply();
                        }
                        DecapVerdict::Drop(reason) => self.counters.count_drop(reason),
                    }
                }
            }
            self.write_batch(&mut buf, &mut packets, &mut coalescer);
        }
    }

    /// Writes the decapsulated `packets` to TUN (merged where possible) and clears the list.
    fn write_batch(
        &self,
        buf: &mut [u8],
        packets: &mut Vec<std::ops::Range<usize>>,
        coalescer: &mut Coalescer,
    ) {
        if packets.is_empty() {
            return;
        }
        if !self.coalesce {
            for p in packets.drain(..) {
                self.deliver_one(buf, p);
            }
            return;
        }
        coalescer.coalesce(buf, packets);
        packets.clear();
        self.counters.count_rx_csum_bad(coalescer.bad_checksums());
        for w in coalescer.writes() {
            let pieces = coalescer.pieces(w);
            let sent = match pieces {
                [one] if w.segments == 1 => {
                    self.deliver_one(buf, one.clone());
                    continue;
                }
                _ => self.tun.send_gather(&w.hdr.to_bytes(), buf, pieces),
            };
            match sent {
                Ok(()) => w.segment_lens().for_each(|l| self.counters.count_rx(l)),
                Err(_) => self.io_errors.count_tun_write_failure(),
            }
        }
    }

    /// Writes one decapsulated inner packet to TUN.
    fn deliver_one(&self, buf: &mut [u8], packet: std::ops::Range<usize>) {
        let len = packet.len();
        match self.write_plain(buf, packet) {
            Ok(()) => self.counters.count_rx(len),
            Err(_) => self.io_errors.count_tun_write_failure(),
        }
    }

    /// Writes `buf[packet]` to TUN behind a zeroed vnet header: in place when the bytes in
    /// front of it are free (after decap, or in the TX headroom), else with a gather write.
    fn write_plain(&self, buf: &mut [u8], packet: std::ops::Range<usize>) -> std::io::Result<()> {
        match packet.start.checked_sub(VNET_HDR_LEN) {
            Some(start) if packet.end <= buf.len() => {
                buf[start..packet.start].fill(0);
                self.tun.send(&buf[start..packet.end])
            }
            _ => self
                .tun
                .send_gather(&[0; VNET_HDR_LEN], buf, std::slice::from_ref(&packet)),
        }
    }
}

#[cfg(test)]
#[path = "userspace_tests.rs"]
mod tests;
