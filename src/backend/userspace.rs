//! The userspace VXLAN data plane: a TUN device and a UDP socket, one thread per direction,
//! for each of N queues (a multi-queue TUN device and a `SO_REUSEPORT` socket group). An RX
//! thread also sends the few answers its own TUN writes produced, so they do not wait for
//! the TX thread to wake.
//!
//! Control flow: the daemon builds a [`PeerTable`] from the current peers and swaps it in
//! atomically ([`UserspaceVxlan::sync`]); the packet threads load it per packet and never
//! block on the control plane. Per-packet outcomes are counted in [`Counters`], not logged.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
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
    decap, encap, flow_hash, Counters, DecapVerdict, DropReason, EncapVerdict, IcmpLimiter,
    LocalVtep, PeerTable, RemoteVtep, VXLAN_HEADROOM,
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
/// Most packets an RX thread forwards from TUN after a write (the answers its write
/// produced); more is left to the queue's TX thread, so receiving never starves.
const REPLY_DRAIN: usize = 8;
/// Most queues (TUN queues, sockets, and TX + RX thread pairs) one data plane runs.
pub const MAX_QUEUES: usize = 8;
/// Send sockets (source ports) per queue when there are several queues: flows are spread
/// over `SENDERS_PER_QUEUE * queues` source ports, so that a receiver's `SO_REUSEPORT`
/// group, which hashes the 4-tuple, spreads them over its sockets.
const SENDERS_PER_QUEUE: usize = 4;
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
    /// Queues: 1 is a single-queue TUN device and one socket; N > 1 a multi-queue device
    /// with N queues, N `SO_REUSEPORT` sockets on the VXLAN port, a TX and an RX thread per
    /// queue, and per-flow outer source ports (capped at [`MAX_QUEUES`]).
    pub queues: usize,
    /// With several queues: steer each packet to the queue of the CPU it is processed on
    /// and pin each queue's threads to that CPU ([`crate::io::steer`]). Off: the kernel's
    /// flow hash picks queues and threads run anywhere (a predecessor's steering is removed).
    pub cpu_steering: bool,
}

/// The default number of queues: one per CPU the process may run on, at most
/// [`MAX_QUEUES`].
pub fn default_queues() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_QUEUES)
}

/// Descriptors of a running data plane handed over by the previous flanneld
/// ([`crate::backend::handoff`]): its TUN queues and its UDP sockets.
#[derive(Debug)]
pub struct Inherited {
    /// The TUN queue descriptors (the same open files the predecessor reads); at least one.
    pub tuns: Vec<std::os::fd::OwnedFd>,
    /// The UDP sockets (the same sockets, with their receive queues).
    pub socks: Vec<std::os::fd::OwnedFd>,
}

/// The descriptors of a data plane.
#[derive(Debug)]
struct Io {
    tuns: Vec<Arc<Tun>>,
    /// Bound to the VXLAN port: they receive (and send, with one queue).
    socks: Vec<VxlanSocket>,
    /// With several queues: sockets on ephemeral ports the TX threads send from, picked
    /// per inner flow. Not handed over (a successor binds its own).
    senders: Vec<Arc<VxlanSocket>>,
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
    /// Packets read per TUN queue (TX threads) and per socket (RX threads).
    queue_stats: Arc<QueueStats>,
    /// The device queues and sockets (boxed: the daemon's plane enum holds this struct);
    /// None once handed over and closed.
    io: Option<Box<Io>>,
    local: Arc<LocalVtep>,
    port: u16,
    tso: bool,
    mtu: usize,
    device: String,
    /// CPU steering is in place: the packet threads pin themselves to their queue's CPU.
    steering: bool,
}

/// Sets up (or, with `on` false or a single queue, removes) CPU steering on the device and
/// the socket group; true when it is in place. A failure is logged and leaves the kernel's
/// flow hash in charge.
fn steer_by_cpu(tuns: &[Tun], socks: &[VxlanSocket], on: bool) -> bool {
    use crate::io::steer::{steer_group_by_cpu, steer_tun_by_cpu};
    let (Some(tun), Some(sock)) = (tuns.first(), socks.first()) else {
        return false;
    };
    let want = on && tuns.len() > 1 && socks.len() > 1;
    let set = steer_tun_by_cpu(tun.as_fd(), want)
        .and_then(|()| steer_group_by_cpu(sock.as_fd(), socks.len() as u32, want));
    match set {
        Ok(()) => want,
        Err(e) if want => {
            warn!(error = %e, "CPU steering not available; queues are picked by flow hash");
            let _ = steer_tun_by_cpu(tun.as_fd(), false);
            let _ = steer_group_by_cpu(sock.as_fd(), socks.len() as u32, false);
            false
        }
        Err(e) => {
            debug!(error = %e, "could not remove CPU steering");
            false
        }
    }
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
        let n = cfg.queues.clamp(1, MAX_QUEUES);
        let (tuns, socks) = match inherited {
            Some(inh) => adopt(cfg, inh, offload, addr, n)?,
            None => (
                Tun::open_queues(&cfg.device, offload, n)?,
                VxlanSocket::bind_group(addr, POLL, n)?,
            ),
        };
        let senders = match tuns.len().max(socks.len()) {
            1 => Vec::new(),
            q => (0..q * SENDERS_PER_QUEUE)
                .map(|_| VxlanSocket::bind_sender(cfg.bind).map(Arc::new))
                .collect::<io::Result<_>>()?,
        };
        if let Some(first) = tuns.first() {
            first.set_persist(true)?;
        }
        if cfg.tso {
            let gro = socks.iter().all(|s| s.enable_gro());
            debug!(gro, "UDP receive offload");
        }
        let steering = steer_by_cpu(&tuns, &socks, cfg.cpu_steering);
        debug!(
            tun_queues = tuns.len(),
            sockets = socks.len(),
            "userspace data plane queues"
        );
        Ok(UserspaceVxlan {
            table: Arc::new(ArcSwap::from_pointee(PeerTable::new(Vec::new()))),
            counters: Arc::new(Counters::new()),
            io_errors: Arc::new(IoErrors::default()),
            stop: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
            queue_stats: Arc::new(QueueStats::new(tuns.len(), socks.len())),
            io: Some(Box::new(Io {
                tuns: tuns.into_iter().map(Arc::new).collect(),
                socks,
                senders,
            })),
            local: Arc::new(cfg.local),
            port: cfg.port,
            tso: cfg.tso,
            mtu: cfg.mtu,
            device: cfg.device.clone(),
            steering,
        })
    }

    /// Starts the packet threads (once; later calls do nothing). Call it after the first
    /// [`UserspaceVxlan::sync`]: a predecessor keeps forwarding until then, and packets read
    /// with an empty table would be answered "unreachable".
    pub fn serve(&mut self) -> io::Result<()> {
        let Some(io) = &self.io else {
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
            queue_stats: self.queue_stats.clone(),
            pin: self.steering,
        };
        let socks = io
            .socks
            .iter()
            .map(|s| s.try_clone().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let queues = Queues {
            tuns: io.tuns.clone(),
            socks,
            senders: io.senders.clone(),
        };
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
        let io = self.io.as_ref()?;
        Some(Handover {
            tuns: io.tuns.clone(),
            socks: io.socks.iter().filter_map(|s| s.try_clone().ok()).collect(),
            stop: self.stop.clone(),
            live: self.live.clone(),
        })
    }

    /// The number of TUN queues and of sockets bound to the VXLAN port (0 once closed).
    pub fn queues(&self) -> (usize, usize) {
        self.io
            .as_ref()
            .map_or((0, 0), |io| (io.tuns.len(), io.socks.len()))
    }

    /// What each packet thread read.
    pub fn queue_stats(&self) -> &Arc<QueueStats> {
        &self.queue_stats
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
    tuns: Vec<Arc<Tun>>,
    socks: Vec<VxlanSocket>,
    stop: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

impl Handover {
    /// The TUN queue descriptors and the socket descriptors, in the order [`Inherited`]
    /// holds them; None without a socket.
    #[allow(clippy::type_complexity)]
    pub fn fds(
        &self,
    ) -> Option<(
        Vec<std::os::fd::BorrowedFd<'_>>,
        Vec<std::os::fd::BorrowedFd<'_>>,
    )> {
        if self.socks.is_empty() || self.tuns.is_empty() {
            return None;
        }
        Some((
            self.tuns.iter().map(|t| t.as_fd()).collect(),
            self.socks.iter().map(|s| s.as_fd()).collect(),
        ))
    }

    /// Detaches every TUN queue but the first, for a successor that takes only one (handover
    /// protocol version 1): their flows move to the first queue now rather than being lost
    /// until our descriptors close.
    pub fn keep_one_queue(&self) {
        for t in self.tuns.iter().skip(1) {
            if let Err(e) = t.detach_queue() {
                warn!(error = %e, "could not detach a TUN queue");
            }
        }
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
    queue_stats: Arc<QueueStats>,
    /// Pin each packet thread to its queue's CPU (CPU steering is in place).
    pin: bool,
}

/// What each packet thread read: packets per TUN queue (TX threads) and messages (a
/// datagram or a UDP GRO batch) per socket (RX threads).
#[derive(Debug)]
pub struct QueueStats {
    tx: Vec<AtomicU64>,
    rx: Vec<AtomicU64>,
}

impl QueueStats {
    /// Zeroed counters for `tuns` TX and `socks` RX threads.
    pub fn new(tuns: usize, socks: usize) -> QueueStats {
        QueueStats {
            tx: (0..tuns).map(|_| AtomicU64::new(0)).collect(),
            rx: (0..socks).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn count(list: &[AtomicU64], queue: usize, n: usize) {
        if let Some(c) = list.get(queue) {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// `(TX reads, RX reads)` per queue index.
    pub fn snapshot(&self) -> Vec<(u64, u64)> {
        let get = |l: &[AtomicU64], i: usize| l.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
        (0..self.tx.len().max(self.rx.len()))
            .map(|i| (get(&self.tx, i), get(&self.rx, i)))
            .collect()
    }
}

/// Adopts the handed-over descriptors and brings them to `n` queues: extra TUN queues are
/// detached (the kernel moves their flows to the others at once) and closed; missing ones
/// are attached to the multi-queue device and bound into the `SO_REUSEPORT` group. Every
/// handed-over socket is kept: one closed here stays in the group, receiving, until the
/// predecessor closes its copy too. A device
/// created single-queue (or sockets bound without `SO_REUSEPORT`, by a version before
/// multi-queue) cannot grow: then fewer are served, with a warning; the next start without
/// a handover recreates the device.
fn adopt(
    cfg: &UserspaceConfig,
    inh: Inherited,
    offload: TunOffload,
    addr: SocketAddr,
    n: usize,
) -> io::Result<(Vec<Tun>, Vec<VxlanSocket>)> {
    let mut tuns = inh
        .tuns
        .into_iter()
        .map(|fd| Tun::adopt(fd, &cfg.device, offload))
        .collect::<io::Result<Vec<_>>>()?;
    let Some(first) = tuns.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no TUN descriptor handed over",
        ));
    };
    let multi_queue = first.multi_queue();
    let mut socks = Vec::new();
    for fd in inh.socks {
        match VxlanSocket::adopt(fd, addr, POLL) {
            Ok(s) => socks.push(s),
            Err(e) => warn!(error = %e, "not using a handed-over socket"),
        }
    }
    if socks.is_empty() {
        warn!("no usable handed-over socket; binding new ones");
        socks = VxlanSocket::bind_group(addr, POLL, n)?;
    }
    for extra in tuns.drain(n.min(tuns.len())..) {
        if let Err(e) = extra.detach_queue() {
            warn!(error = %e, "could not detach a handed-over TUN queue");
        }
    }
    while tuns.len() < n {
        match tuns[0].attach_queue() {
            Ok(t) => tuns.push(t),
            Err(e) => {
                warn!(error = %e, multi_queue, want = n, serving = tuns.len(),
                    "cannot attach more queues to the handed-over TUN device; serving fewer (a start without a handover recreates it multi-queue)");
                break;
            }
        }
    }
    while socks.len() < tuns.len() {
        match VxlanSocket::join_group(addr, POLL) {
            Ok(s) => socks.push(s),
            Err(e) => {
                warn!(error = %e, want = tuns.len(), serving = socks.len(),
                    "cannot add sockets beside the handed-over ones (bound without SO_REUSEPORT?); receiving on fewer");
                break;
            }
        }
    }
    Ok((tuns, socks))
}

/// The descriptors the packet threads serve: TX thread `i` reads `tuns[i]`, RX thread `j`
/// receives on `socks[j]`; each writes/sends on a queue of the other kind picked by index.
struct Queues<T, S> {
    tuns: Vec<Arc<T>>,
    socks: Vec<Arc<S>>,
    /// Per-flow send sockets (empty: TX thread `i` sends on `socks[i % socks.len()]`).
    senders: Vec<Arc<S>>,
}

/// Starts a TX thread per TUN queue and an RX thread per socket, appending them to
/// `threads`; each counts itself in `shared.live` while it runs.
fn spawn_loops<T: TunPort + 'static, S: DatagramPort + 'static>(
    shared: &Shared,
    queues: Queues<T, S>,
    threads: &mut Vec<JoinHandle<()>>,
) -> io::Result<()> {
    let Queues {
        tuns,
        socks,
        senders,
    } = queues;
    if tuns.is_empty() || socks.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no TUN queue or no socket",
        ));
    }
    let senders: Arc<[Arc<S>]> = senders.into();
    let (n_tx, n_rx) = (tuns.len(), socks.len());
    let tx_states: Vec<Arc<Mutex<TxState>>> = (0..n_tx)
        .map(|_| Arc::new(Mutex::new(TxState::new())))
        .collect();
    let plan = (0..n_tx)
        .map(|i| ("tx", i, n_tx, Worker::run_tx as fn(&Worker<T, S>)))
        .chain((0..n_rx).map(|j| ("rx", j, n_rx, Worker::run_rx as fn(&Worker<T, S>))));
    for (name, q, n, run) in plan {
        let w = Worker {
            shared: shared.clone(),
            tun: tuns[q % n_tx].clone(),
            tx: tx_states[q % n_tx].clone(),
            tun_queue: q % n_tx,
            sock: socks[q % n_rx].clone(),
            senders: senders.clone(),
            queue: q,
        };
        let live = shared.live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(format!("vxlan-{name}{q}"))
            .spawn(move || {
                if w.pin {
                    match crate::io::steer::pin_thread_to_queue(q, n) {
                        Ok(cpu) => debug!(thread = name, queue = q, ?cpu, "pinned"),
                        Err(e) => {
                            warn!(error = %e, thread = name, "could not pin to the queue's CPU")
                        }
                    }
                }
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
    Ok(())
}

/// Frames encapsulated back to back in a TX thread's buffer, waiting to leave together in
/// one UDP GSO send: same socket, same peer, every frame as long as the first but the last.
struct TxBatch<'a, S> {
    /// Where the first frame starts.
    base: usize,
    /// Where the last frame ends: the next packet is read right after it.
    used: usize,
    /// Length of the first frame.
    stride: usize,
    frames: usize,
    /// The socket and peer of every frame; None while the batch is empty.
    to: Option<(&'a S, IpAddr)>,
}

impl<S> Default for TxBatch<'_, S> {
    fn default() -> Self {
        TxBatch {
            base: 0,
            used: 0,
            stride: 0,
            frames: 0,
            to: None,
        }
    }
}

impl<S> TxBatch<'_, S> {
    /// Whether a frame of `len` bytes from `sock` to `dst` can follow the batched ones.
    fn accepts(&self, sock: &S, dst: IpAddr, len: usize) -> bool {
        self.to
            .is_some_and(|(s, d)| std::ptr::eq(s, sock) && d == dst && len <= self.stride)
            && !self.full()
            && self.used - self.base + len <= MAX_GSO_BYTES
    }

    /// Nothing can follow: as many segments as one send takes, or a last, shorter frame.
    fn full(&self) -> bool {
        self.frames >= MAX_GSO_SEGMENTS
            || (self.used - self.base) != self.frames * self.stride
            || self.used - self.base + self.stride > MAX_GSO_BYTES
    }
}

/// The TX side of one TUN queue, held by whichever thread reads the queue (its TX thread,
/// or the RX thread forwarding what its own TUN write produced): one reader at a time, so
/// a flow's packets leave in the order they were read.
struct TxState {
    /// Packets are read into it and encapsulated in place, back to back while batching.
    buf: Vec<u8>,
    /// Segments of a TSO super-packet.
    arena: Vec<u8>,
    /// UDP GSO works (until the kernel first refuses it).
    gso_ok: bool,
    icmp: IcmpLimiter,
    epoch: Instant,
}

impl TxState {
    fn new() -> TxState {
        TxState {
            buf: vec![0u8; MAX_GSO_BYTES + BUF_LEN],
            arena: Vec::with_capacity(2 * BUF_LEN),
            gso_ok: true,
            icmp: IcmpLimiter::default(),
            epoch: Instant::now(),
        }
    }
}

/// One packet thread's view: the shared state and the queue it serves.
struct Worker<T, S> {
    shared: Shared,
    /// The TUN queue this thread reads (TX) or writes (RX), and its TX side.
    tun: Arc<T>,
    tx: Arc<Mutex<TxState>>,
    /// Index of `tun` among the TUN queues.
    tun_queue: usize,
    sock: Arc<S>,
    /// Per-flow send sockets; empty: send on `sock`.
    senders: Arc<[Arc<S>]>,
    /// This thread's index among the TX (or RX) threads.
    queue: usize,
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

    /// TUN → VXLAN: waits for the queue to be readable, then drains it
    /// ([`Worker::drain_tun`]).
    fn run_tx(&self) {
        let mut readable = true;
        while !self.stop.load(Ordering::Relaxed) {
            let drained = if readable {
                let mut st = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
                self.drain_tun(&mut st, usize::MAX, false)
            } else {
                Ok(())
            };
            match drained.and_then(|()| self.tun.wait_readable(POLL)) {
                Ok(r) => readable = r,
                Err(e) => {
                    // EBADFD: a successor detached this queue (it serves fewer); nothing to
                    // read here, and nothing to report.
                    if e.raw_os_error() != Some(libc::EBADFD) {
                        warn!(error = %e, "TUN read failed");
                    }
                    readable = true;
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// Reads the TUN queue until it is empty, `limit` packets were read, or (`small_only`)
    /// a TSO super-packet was read, and sends what was read. A packet is read so that its
    /// vnet header ends exactly where the VXLAN + Ethernet headroom ends; encap then
    /// overwrites the consumed vnet header. TSO super-packets are split into an arena laid
    /// out for one UDP GSO send per batch. Other packets are read back to back into the
    /// buffer and encapsulated in place, so that a run of equal-sized frames to one peer (a
    /// UDP flood, a train of ACKs) leaves in one UDP GSO send; a batch is sent as soon as
    /// the queue is empty, so no packet waits for another. ICMP errors the core builds are
    /// rate limited like the kernel's (1000/s, bursts of 50).
    fn drain_tun(&self, st: &mut TxState, limit: usize, small_only: bool) -> io::Result<()> {
        let TxState {
            buf,
            arena,
            gso_ok,
            icmp,
            epoch,
        } = st;
        let mut batch = TxBatch::default();
        let off = VXLAN_HEADROOM - VNET_HDR_LEN;
        for _ in 0..limit {
            if batch.used + BUF_LEN > buf.len() {
                self.flush(buf, &mut batch, gso_ok);
            }
            let at = batch.used + off;
            let window = &mut buf[at..at + BUF_LEN - off];
            let n = match self.tun.try_recv(window) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    self.flush(buf, &mut batch, gso_ok);
                    return Err(e);
                }
            };
            let end = at + n;
            let packet = batch.used + VXLAN_HEADROOM..end;
            QueueStats::count(&self.queue_stats.tx, self.tun_queue, 1);
            let now = epoch.elapsed();
            let hdr = match VirtioNetHdr::parse(buf.get(at..end).unwrap_or_default()) {
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
                    let p = &mut buf[packet.clone()];
                    if let Err(reason) = complete_partial_checksum(p, start, offset) {
                        self.counters.count_drop(reason);
                        continue;
                    }
                }
                if let Some(to) = self.encap_one(buf, packet, &table, (icmp, now)) {
                    self.batch_frame(buf, &mut batch, to, gso_ok);
                }
                continue;
            }
            // In order: the frames read before this super-packet leave first.
            self.flush(buf, &mut batch, gso_ok);
            let segs = match gso_split(&buf[packet], &hdr, arena, VXLAN_HEADROOM) {
                Ok(s) => s,
                Err(reason) => {
                    self.counters.count_drop(reason);
                    continue;
                }
            };
            if segs.len() == 1 {
                let Some(p) = segs.packet(0) else { continue };
                self.encap_and_send(arena, p, &table, (icmp, now));
            } else {
                self.send_segments(arena, &segs, &table, gso_ok, (icmp, now));
            }
            if small_only {
                break;
            }
        }
        self.flush(buf, &mut batch, gso_ok);
        Ok(())
    }

    /// Sends what this RX thread's TUN writes just produced, unless the TX thread is
    /// reading the queue already. The kernel answers a packet written to TUN in the
    /// writer's context (an echo reply, a request's response, a TCP ACK) and queues the
    /// answer on this TUN queue (the queue a flow was written to, or with CPU steering the
    /// queue of this CPU); sent from here, it does not wait for the TX thread's wake-up
    /// (tens of µs on a VM). Only a few packets and no bulk: a TSO super-packet read ends
    /// it, the rest is the TX thread's.
    fn forward_replies(&self) {
        let mut st = match self.tx.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        // Errors are the TX thread's to report.
        let _ = self.drain_tun(&mut st, REPLY_DRAIN, true);
    }

    /// Adds the frame just encapsulated at `buf[frame]` (right after the batch's frames) to
    /// the batch, sending the batch first if the frame cannot join it (another peer or
    /// socket, a longer frame, no room left) and afterwards if nothing can follow it.
    fn batch_frame<'a>(
        &'a self,
        buf: &[u8],
        batch: &mut TxBatch<'a, S>,
        (sock, dst, frame): (&'a S, IpAddr, std::ops::Range<usize>),
        gso_ok: &mut bool,
    ) {
        debug_assert_eq!(frame.start, batch.used);
        if !batch.accepts(sock, dst, frame.len()) {
            self.flush(buf, batch, gso_ok);
            *batch = TxBatch {
                base: frame.start,
                used: frame.start,
                stride: frame.len(),
                frames: 0,
                to: Some((sock, dst)),
            };
        }
        batch.used = frame.end;
        batch.frames += 1;
        if batch.full() {
            self.flush(buf, batch, gso_ok);
        }
    }

    /// Sends the batched frames and empties the batch (the next read lands at the start of
    /// `buf` again).
    fn flush(&self, buf: &[u8], batch: &mut TxBatch<'_, S>, gso_ok: &mut bool) {
        if let Some((sock, dst)) = batch.to.take() {
            let frames = buf.get(batch.base..batch.used).unwrap_or_default();
            self.send_frames(sock, frames, batch.stride, dst, gso_ok);
        }
        *batch = TxBatch::default();
    }

    /// Writes an error the core built in `buf[packet]` (e.g. ICMP net unreachable) back to
    /// TUN.
    fn reply_to_tun(&self, buf: &mut [u8], packet: std::ops::Range<usize>) {
        match self.write_plain(buf, packet) {
            Ok(()) => self.counters.count_reply(),
            Err(_) => self.io_errors.count_tun_write_failure(),
        }
    }

    /// Encapsulates one packet in place: the socket to send it from, the peer and the
    /// frame; None when an error went back to TUN instead or the drop was counted. `icmp`
    /// is the error rate limit and the time now.
    fn encap_one(
        &self,
        buf: &mut [u8],
        packet: std::ops::Range<usize>,
        table: &PeerTable,
        icmp: (&mut IcmpLimiter, Duration),
    ) -> Option<(&S, IpAddr, std::ops::Range<usize>)> {
        let sock = self.sender(buf.get(packet.clone()).unwrap_or_default());
        match encap(buf, packet, table, &self.local, icmp.0, icmp.1) {
            EncapVerdict::Transmit { dst, frame } => Some((sock, dst, frame)),
            EncapVerdict::ReplyToTun { packet } => {
                self.reply_to_tun(buf, packet);
                None
            }
            EncapVerdict::Drop(reason) => {
                self.counters.count_drop(reason);
                None
            }
        }
    }

    /// Encapsulates and sends one packet on its own.
    fn encap_and_send(
        &self,
        buf: &mut [u8],
        packet: std::ops::Range<usize>,
        table: &PeerTable,
        icmp: (&mut IcmpLimiter, Duration),
    ) {
        let Some((sock, dst, frame)) = self.encap_one(buf, packet, table, icmp) else {
            return;
        };
        let len = frame.len();
        match sock.send_to(&buf[frame], SocketAddr::new(dst, self.port)) {
            Ok(()) => self.counters.count_tx(len),
            Err(_) => self.io_errors.count_send_failure(),
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
        let first = segs
            .packet(0)
            .and_then(|p| arena.get(p))
            .unwrap_or_default();
        let sock = self.sender(first);
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
        self.send_frames(
            sock,
            arena.get(..frames).unwrap_or_default(),
            stride,
            dst,
            gso_ok,
        );
    }

    /// Sends `frames`, consecutive VXLAN frames of `stride` bytes (the last may be shorter),
    /// to `dst` with UDP GSO in sends of at most 64 KiB; falls back to one send per frame
    /// from the first time the kernel refuses GSO.
    fn send_frames(&self, sock: &S, frames: &[u8], stride: usize, dst: IpAddr, gso_ok: &mut bool) {
        let to = SocketAddr::new(dst, self.port);
        let stride = stride.max(1);
        let per_send = (MAX_GSO_BYTES / stride).clamp(1, MAX_GSO_SEGMENTS);
        for chunk in frames.chunks(per_send * stride) {
            let sent = if *gso_ok && chunk.len() > stride {
                match sock.send_gso(chunk, stride as u16, to) {
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
                    match sock.send_to(seg, to) {
                        Ok(()) => self.counters.count_tx(seg.len()),
                        Err(_) => self.io_errors.count_send_failure(),
                    }
                }
            }
        }
    }

    /// The socket to send an inner `packet` from: with several queues, one of the per-flow
    /// senders (so every packet of a flow leaves from the same source port).
    fn sender(&self, packet: &[u8]) -> &S {
        match self.senders.len() {
            0 => &self.sock,
            n => &self.senders[flow_hash(packet) as usize % n],
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
            QueueStats::count(&self.queue_stats.rx, self.queue, msgs.len());
            let table = self.table.load();
            packets.clear();
            // A TSO super-packet went to TUN: bulk traffic, whose answers (ACKs) can wait
            // for the TX thread.
            let mut bulk = false;
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
                                bulk = true;
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
            bulk |= self.write_batch(&mut buf, &mut packets, &mut coalescer);
            if !bulk {
                self.forward_replies();
            }
        }
    }

    /// Writes the decapsulated `packets` to TUN (merged where possible) and clears the list;
    /// true if a merged super-packet was written.
    fn write_batch(
        &self,
        buf: &mut [u8],
        packets: &mut Vec<std::ops::Range<usize>>,
        coalescer: &mut Coalescer,
    ) -> bool {
        if packets.is_empty() {
            return false;
        }
        if !self.coalesce {
            for p in packets.drain(..) {
                self.deliver_one(buf, p);
            }
            return false;
        }
        let mut merged = false;
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
                _ => {
                    merged = true;
                    self.tun.send_gather(&w.hdr.to_bytes(), buf, pieces)
                }
            };
            match sent {
                Ok(()) => w.segment_lens().for_each(|l| self.counters.count_rx(l)),
                Err(_) => self.io_errors.count_tun_write_failure(),
            }
        }
        merged
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
