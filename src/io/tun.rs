//! The TUN device: open, configure offloads, read and write whole packets.
//!
//! With `vnet_hdr` every read and write carries a 10-byte `virtio_net_hdr` in front of the
//! IP packet; that is how the kernel hands over partial checksums and TSO super-packets.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// The TUN clone device every userspace data plane needs.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Opening [`TUN_PATH`] failed (carried inside the `io::Error` so callers can tell this
/// deployment problem apart from later configuration errors).
#[derive(Debug, thiserror::Error)]
#[error("cannot open {TUN_PATH}: {0}")]
pub struct TunOpenError(pub io::Error);

/// Length of the `virtio_net_hdr` that prefixes every packet when `vnet_hdr` is on (defined
/// once, by the header's wire format in the core).
pub const VNET_HDR_LEN: usize = crate::dataplane::offload::VirtioNetHdr::LEN;

/// Which kernel offloads the TUN device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunOffload {
    /// Prefix packets with a `virtio_net_hdr` and accept partial checksums (TUN_F_CSUM).
    pub vnet_hdr: bool,
    /// Also accept TCP segmentation offload (TSO4/TSO6 super-packets up to 64 KiB).
    pub tso: bool,
}

/// An open TUN device. Closing it removes a non-persistent device with its addresses/routes;
/// a persistent one ([`Tun::set_persist`]) stays, routes included, until it is deleted.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    offload: TunOffload,
    /// The device was created multi-queue (`IFF_MULTI_QUEUE`): more queues can attach.
    multi_queue: bool,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates (or attaches to) the single-queue TUN device `name` in the calling thread's
    /// namespace.
    pub fn open(name: &str, offload: TunOffload) -> io::Result<Tun> {
        Tun::open_queue(name, offload, false)
    }

    /// Opens `n` queues of the TUN device `name`: one descriptor of a single-queue device
    /// when `n` is 1, else `n` queues of a multi-queue device (`IFF_MULTI_QUEUE`), between
    /// which the kernel spreads what it routes to the device by flow hash. Attaching with
    /// the other queue mode than the device was created with fails with `EINVAL`.
    pub fn open_queues(name: &str, offload: TunOffload, n: usize) -> io::Result<Vec<Tun>> {
        (0..n.max(1))
            .map(|_| Tun::open_queue(name, offload, n > 1))
            .collect()
    }

    /// Attaches one more queue to the multi-queue device this descriptor is attached to.
    pub fn attach_queue(&self) -> io::Result<Tun> {
        if !self.multi_queue {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("TUN device {} was created single-queue", self.name),
            ));
        }
        Tun::open_queue(&self.name, self.offload, true)
    }

    /// Detaches this queue from its multi-queue device (`TUNSETQUEUE`): the kernel stops
    /// putting packets in it at once, for every process holding the same open file (whose
    /// reads then fail with `EBADFD`). Closing it would not, while another process holds it.
    pub fn detach_queue(&self) -> io::Result<()> {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_DETACH_QUEUE,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads an ifreq-sized struct; `req` is one and outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the device is multi-queue (more queues can be attached).
    pub fn multi_queue(&self) -> bool {
        self.multi_queue
    }

    fn open_queue(name: &str, offload: TunOffload, multi_queue: bool) -> io::Result<Tun> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        // SAFETY: the path is a valid NUL-terminated string; open has no other preconditions.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), TunOpenError(e)));
        }
        // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        if offload.vnet_hdr {
            req.flags |= IFF_VNET_HDR;
        }
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct; `req` is one and outlives
        // the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_offload(&fd, offload)?;
        // SAFETY: the kernel NUL-terminated the name it chose within IFNAMSIZ bytes.
        let actual = unsafe { CStr::from_ptr(req.name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tun {
            fd,
            name: actual,
            offload,
            multi_queue,
        })
    }

    /// Adopts a TUN descriptor another process opened (handed over with `SCM_RIGHTS`): checks
    /// that it is attached to a TUN device named `name` with the packet format `offload`
    /// needs (no packet info, vnet header), then sets the offloads again.
    pub fn adopt(fd: OwnedFd, name: &str, offload: TunOffload) -> io::Result<Tun> {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq-sized struct; `req` is one and outlives the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel NUL-terminated the device name within IFNAMSIZ bytes.
        let actual = unsafe { CStr::from_ptr(req.name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let want = IFF_TUN | IFF_NO_PI | if offload.vnet_hdr { IFF_VNET_HDR } else { 0 };
        let mask = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
        if actual != name || req.flags & mask != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "handed-over descriptor is TUN {actual:?} with flags {:#x}, want {name:?} with {want:#x}",
                    req.flags
                ),
            ));
        }
        set_nonblocking(&fd)?;
        set_offload(&fd, offload)?;
        Ok(Tun {
            fd,
            name: actual,
            offload,
            multi_queue: req.flags & IFF_MULTI_QUEUE != 0,
        })
    }

    /// Makes the device outlive this descriptor (`TUNSETPERSIST`): when the process exits or
    /// crashes, the device keeps its address and routes and the next start attaches to it.
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(on)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The descriptor, to hand over to a successor process.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads this device was opened with.
    pub fn offload(&self) -> TunOffload {
        self.offload
    }

    /// Reads one packet (with its vnet header when enabled). Returns `Ok(None)` if nothing
    /// arrived within `timeout`, so callers can check for shutdown.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        read_with_timeout(self.fd.as_raw_fd(), buf, timeout)
    }

    /// Reads one packet if one is queued, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        read_nonblocking(self.fd.as_raw_fd(), buf)
    }

    /// Writes one packet (with its vnet header when enabled).
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.send_gather(packet, &[], &[])
    }

    /// Writes one packet gathered from `hdr` (its vnet header) and the `pieces` of `buf`, in
    /// order, with one `writev`. With `vnet_hdr`, `hdr` may describe a TSO super-packet
    /// (`GSO_TCPV4`/`GSO_TCPV6` with a partial checksum): the kernel accepts those on write
    /// whatever `TUNSETOFFLOAD` enabled, which only governs what it hands to reads.
    pub fn send_gather(
        &self,
        hdr: &[u8],
        buf: &[u8],
        pieces: &[std::ops::Range<usize>],
    ) -> io::Result<()> {
        const MAX: usize = 130;
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX];
        let mut n = 0;
        for part in std::iter::once(Some(hdr)).chain(pieces.iter().map(|r| buf.get(r.clone()))) {
            let (Some(part), Some(slot)) = (part, iov.get_mut(n)) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "gather write: piece out of range or too many pieces",
                ));
            };
            *slot = libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            };
            n += 1;
        }
        loop {
            // SAFETY: the first `n` iovecs describe live, readable slices of `hdr` and `buf`
            // that outlive the call; writev only reads through them.
            let rc = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => wait_fd(self.fd.as_raw_fd(), libc::POLLOUT, 100)?,
                _ => return Err(err),
            };
        }
    }
}

impl crate::dataplane::ports::TunPort for Tun {
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        Tun::recv(self, buf, timeout)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Tun::try_recv(self, buf)
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        wait_readable(self.fd.as_raw_fd(), timeout)
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        Tun::send(self, packet)
    }

    fn send_gather(
        &self,
        hdr: &[u8],
        buf: &[u8],
        pieces: &[std::ops::Range<usize>],
    ) -> io::Result<()> {
        Tun::send_gather(self, hdr, buf, pieces)
    }
}

/// Sets the vnet header size and the offloads the kernel may hand to reads (per open file).
fn set_offload(fd: &OwnedFd, offload: TunOffload) -> io::Result<()> {
    if offload.vnet_hdr {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut flags = TUN_F_CSUM;
        if offload.tso {
            flags |= TUN_F_TSO4 | TUN_F_TSO6;
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` or `timeout_ms` passes; true when ready.
pub(crate) fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(n > 0)
}

/// Sets `O_NONBLOCK` (a file status flag: shared with every process holding the same open
/// file, which for a handed-over descriptor is already set).
fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn read_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: the pointer and length describe the live, writable `buf`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}

fn read_with_timeout(fd: RawFd, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
    if let Some(n) = read_nonblocking(fd, buf)? {
        return Ok(Some(n));
    }
    if !wait_readable(fd, timeout)? {
        return Ok(None);
    }
    read_nonblocking(fd, buf)
}

/// Waits up to `timeout` for `fd` to be readable.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    wait_fd(fd, libc::POLLIN, ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::coalesce::fixtures::{segments, tcp_packet};
    use crate::dataplane::coalesce::Coalescer;
    use std::process::Command;

    /// A network namespace of this test, deleted on drop (also when the test panics).
    struct Ns(String);

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn ip(ns: &str, args: &str) {
        let mut all = vec!["-n", ns];
        all.extend(args.split_whitespace());
        let out = Command::new("ip").args(&all).output().expect("ip");
        assert!(out.status.success(), "ip {args}: {out:?}");
    }

    fn in_ns(ns: &str, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// A packet socket on `ifname` that sees IP packets (link header stripped).
    fn capture(ifname: &str) -> OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0);
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a live sockaddr_ll and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        fd
    }

    /// What `original` looks like after one router hop: TTL / hop limit one less, IPv4 header
    /// checksum updated.
    fn forwarded(original: &[u8]) -> Vec<u8> {
        let mut p = original.to_vec();
        if p[0] >> 4 == 4 {
            p[8] -= 1;
            p[10..12].fill(0);
            let c = crate::wire::checksum::checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            p[7] -= 1;
        }
        p
    }

    /// The kernel takes a super-packet built by the coalescer on a TUN write and, forwarding
    /// it out of a device without segmentation offload, cuts it into exactly the segments
    /// the sender had put on the wire.
    #[test]
    fn kernel_resegments_coalesced_writes_byte_for_byte() {
        if !netns_harness::privileged_test_guard("kernel_resegments_coalesced_writes_byte_for_byte")
        {
            return;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // The TUN routes into `ns`, which forwards out of va; vb is in `sink`, which does not
        // forward, so every segment is seen exactly once.
        let ns = Ns(format!("frs-tun-{}-{nanos}", std::process::id()));
        let sink = Ns(format!("{}-sink", ns.0));
        for n in [&ns.0, &sink.0] {
            let out = Command::new("ip")
                .args(["netns", "add", n])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let n = ns.0.clone();
        let sink_name = sink.0.clone();
        let (tun, sink_name) = std::thread::spawn(move || {
            crate::io::netns::enter_named(&n).expect("enter netns");
            let tun = Tun::open(
                "tgso0",
                TunOffload {
                    vnet_hdr: true,
                    tso: true,
                },
            )
            .expect("open TUN");
            ip(
                &n,
                &format!("link add va type veth peer name vb address 02:00:00:00:00:0b netns {sink_name}"),
            );
            ip(&n, "link set lo up");
            ip(&n, "link set tgso0 up");
            ip(&n, "link set va up");
            ip(&sink_name, "link set vb up");
            ip(&n, "addr add 10.244.1.254/24 dev tgso0");
            ip(&n, "addr add fd10:244:1::ffff/64 dev tgso0 nodad");
            ip(&n, "addr add 10.244.2.1/24 dev va");
            ip(&n, "addr add fd10:244:2::1/64 dev va nodad");
            ip(&n, "neigh add 10.244.2.7 lladdr 02:00:00:00:00:0b dev va nud permanent");
            ip(&n, "neigh add fd10:244:2::7 lladdr 02:00:00:00:00:0b dev va nud permanent");
            in_ns(&n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            in_ns(&n, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            // Software segmentation and checksums before va, as on a NIC without offloads.
            in_ns(&n, &["ethtool", "-K", "va", "tx", "off", "tso", "off", "gso", "off"]);
            (tun, sink_name)
        })
        .join()
        .expect("namespace setup");
        let cap = std::thread::spawn(move || {
            crate::io::netns::enter_named(&sink_name).expect("enter sink netns");
            capture("vb")
        })
        .join()
        .expect("capture socket");
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: the option value is a live timeval and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                cap.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);

        for v6 in [false, true] {
            let opts = [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3];
            let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
            let sup = tcp_packet(v6, 1, 77, 0x18, &opts, &payload);
            let segs = segments(&sup, 1388);
            assert_eq!(segs.len(), 15);
            // As the RX thread has them: each segment behind 22 bytes of VXLAN + Ethernet.
            let mut buf = Vec::new();
            let mut ranges = Vec::new();
            for s in &segs {
                buf.extend_from_slice(&[0xee; 22]);
                ranges.push(buf.len()..buf.len() + s.len());
                buf.extend_from_slice(s);
            }
            let mut c = Coalescer::new();
            c.coalesce(&mut buf, &ranges);
            assert_eq!(c.writes().len(), 1);
            let w = c.writes()[0];
            assert_eq!(w.segments, 15);
            tun.send_gather(&w.hdr.to_bytes(), &buf, c.pieces(&w))
                .expect("the kernel accepts the TSO write");

            let mut got = Vec::new();
            let mut frame = vec![0u8; 70_000];
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                // SAFETY: the pointer and length describe the live `frame`.
                let n = unsafe {
                    libc::recv(cap.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0)
                };
                if n < 0 {
                    break; // quiet for 200 ms: everything arrived
                }
                let p = &frame[..n as usize];
                let to_pod = if v6 {
                    p.len() > 40 && p[0] >> 4 == 6 && p[6] == 6 && p[24..40] == segs[0][24..40]
                } else {
                    p.len() > 20 && p[0] >> 4 == 4 && p[9] == 6 && p[16..20] == segs[0][16..20]
                };
                if to_pod {
                    got.push(p.to_vec());
                }
            }
            let want: Vec<Vec<u8>> = segs.iter().map(|s| forwarded(s)).collect();
            let seqs = |v: &[Vec<u8>]| {
                v.iter()
                    .map(|p| (p.len(), p[if v6 { 44 } else { 24 }..][..4].to_vec()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                got.len(),
                want.len(),
                "v6={v6} got {:?} want {:?}",
                seqs(&got),
                seqs(&want)
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "v6={v6} segment {i}");
            }
        }
        drop(tun);
        drop(ns);
    }
}
