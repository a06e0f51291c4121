//! The underlay UDP socket that carries VXLAN datagrams.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

/// Socket buffer size asked for (wireguard-go found ~7 MB removes drops under load).
const SOCKET_BUFFER: libc::c_int = 7 << 20;
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): socket option and control message type.
const UDP_GRO: libc::c_int = 104;
/// Control buffer per received message: one `int` cmsg (UDP_GRO) with room to spare.
const CMSG_WORDS: usize = 8;

pub use crate::dataplane::ports::Received;

/// A bound UDP socket with large buffers and a receive timeout, so loops can see shutdown.
#[derive(Debug)]
pub struct VxlanSocket {
    sock: UdpSocket,
}

impl VxlanSocket {
    /// Binds `addr` (the node's underlay address and the VXLAN port).
    pub fn bind(addr: SocketAddr, recv_timeout: Duration) -> io::Result<VxlanSocket> {
        VxlanSocket::bind_with(addr, false, recv_timeout)
    }

    /// Binds `n` sockets to `addr`: one plain socket when `n` is 1, else a `SO_REUSEPORT`
    /// group between which the kernel spreads received datagrams by their 4-tuple. A port
    /// another socket holds fails with `EADDRINUSE` in both cases (checked first with a plain
    /// bind, so that a group never joins a process that is not handing over to us).
    pub fn bind_group(
        addr: SocketAddr,
        recv_timeout: Duration,
        n: usize,
    ) -> io::Result<Vec<VxlanSocket>> {
        if n <= 1 {
            return Ok(vec![VxlanSocket::bind(addr, recv_timeout)?]);
        }
        drop(VxlanSocket::bind_with(addr, false, recv_timeout)?);
        (0..n)
            .map(|_| VxlanSocket::bind_with(addr, true, recv_timeout))
            .collect()
    }

    /// Binds one more socket into the `SO_REUSEPORT` group at `addr` (fails with
    /// `EADDRINUSE` if the sockets there were bound without it).
    pub fn join_group(addr: SocketAddr, recv_timeout: Duration) -> io::Result<VxlanSocket> {
        VxlanSocket::bind_with(addr, true, recv_timeout)
    }

    /// Binds a socket to `ip` and an ephemeral port, for sending only: datagrams of
    /// different flows leave from different source ports (as the kernel's vxlan driver
    /// does), so the receiver's `SO_REUSEPORT` group spreads them over its sockets.
    pub fn bind_sender(ip: std::net::IpAddr) -> io::Result<VxlanSocket> {
        VxlanSocket::bind_with(SocketAddr::new(ip, 0), false, Duration::from_millis(200))
    }

    fn bind_with(
        addr: SocketAddr,
        reuseport: bool,
        recv_timeout: Duration,
    ) -> io::Result<VxlanSocket> {
        let family = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        if reuseport {
            setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        }
        let (storage, len) = sockaddr_from(addr);
        // SAFETY: `storage` holds a socket address of `len` bytes and outlives the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = UdpSocket::from(fd);
        sock.set_read_timeout(Some(recv_timeout))?;
        let fd = sock.as_raw_fd();
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                // Without CAP_NET_ADMIN the FORCE variant fails; the capped one still helps.
                let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        Ok(VxlanSocket { sock })
    }

    /// Adopts a socket another process bound (handed over with `SCM_RIGHTS`) if it is a UDP
    /// socket bound to `addr`; the receive timeout is set again (it is per socket, so this
    /// also changes the previous owner's, to the same value).
    pub fn adopt(
        fd: std::os::fd::OwnedFd,
        addr: SocketAddr,
        recv_timeout: Duration,
    ) -> io::Result<VxlanSocket> {
        let kind = getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE)?;
        let sock = UdpSocket::from(fd);
        let local = sock.local_addr()?;
        if kind != libc::SOCK_DGRAM || local != addr {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("handed-over socket is bound to {local} (type {kind}), want UDP {addr}"),
            ));
        }
        sock.set_read_timeout(Some(recv_timeout))?;
        Ok(VxlanSocket { sock })
    }

    /// The descriptor, to hand over to a successor process.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.sock.as_fd()
    }

    /// A second handle on the same socket, for another thread.
    pub fn try_clone(&self) -> io::Result<VxlanSocket> {
        Ok(VxlanSocket {
            sock: self.sock.try_clone()?,
        })
    }

    /// Asks the kernel to coalesce datagrams of one sender flow into one receive (`UDP_GRO`,
    /// Linux 5.0). Returns false, leaving it off, where that is unsupported; like
    /// wireguard-go it is only trusted where the option can be read back (5.12+).
    pub fn enable_gro(&self) -> bool {
        let fd = self.sock.as_raw_fd();
        if setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1).is_err() {
            return false;
        }
        if getsockopt_int(fd, libc::SOL_UDP, UDP_GRO).is_ok_and(|v| v != 0) {
            return true;
        }
        let _ = setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 0);
        false
    }

    /// Receives up to `slots` messages with one `recvmmsg`: message `i` lands at
    /// `buf[i * slot_len..]`. Waits (up to the receive timeout) for the first message only.
    /// Fills `out` (cleared first); an empty `out` means the timeout passed.
    pub fn recv_batch(
        &self,
        buf: &mut [u8],
        slot_len: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<()> {
        const MAX: usize = 64;
        out.clear();
        if slot_len == 0 {
            return Ok(());
        }
        let slots = (buf.len() / slot_len).min(MAX);
        // SAFETY: sockaddr_storage and mmsghdr are plain data; all-zero is valid for both.
        let mut names: [libc::sockaddr_storage; MAX] = unsafe { std::mem::zeroed() };
        let mut cbufs = [[0u64; CMSG_WORDS]; MAX];
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX];
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
        for (i, chunk) in buf.chunks_exact_mut(slot_len).take(slots).enumerate() {
            iovs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = cbufs[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<[u64; CMSG_WORDS]>();
        }
        let n = loop {
            // SAFETY: the first `slots` headers point at distinct live slots of `buf`, at
            // their own name and control buffers of the sizes given, all outliving the call;
            // vlen is `slots`. A null timeout means the socket's receive timeout applies.
            let n = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    slots as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(()),
                _ => return Err(err),
            }
        };
        for (i, m) in msgs.iter().enumerate().take(n.min(slots)) {
            let len = (m.msg_len as usize).min(slot_len);
            let Some(src) = sockaddr_to(&names[i], m.msg_hdr.msg_namelen) else {
                continue;
            };
            let segment = gro_segment(&m.msg_hdr).unwrap_or(len).max(1);
            out.push(Received {
                offset: i * slot_len,
                len,
                src,
                segment,
                truncated: m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Receives one datagram; `Ok(None)` when the receive timeout passed.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        match self.sock.recv_from(buf) {
            Ok(r) => Ok(Some(r)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one datagram.
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.sock.send_to(buf, dst).map(|_| ())
    }

    /// Sends `buf` as consecutive datagrams of `segment` bytes (the last may be shorter) in
    /// one call with UDP generic segmentation offload (`UDP_SEGMENT`).
    pub fn send_gso(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()> {
        let mut storage = sockaddr_from(dst);
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // Room for one cmsg carrying a u16, aligned as the kernel expects.
        let mut cbuf = [0u64; 4];
        // SAFETY: msghdr is plain data; zero is a valid initial value for every field.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut storage.0 as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = storage.1;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
        // SAFETY: msg_control points at `cbuf`, large enough for CMSG_SPACE(2) bytes, so the
        // first header and its data lie inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
        loop {
            // SAFETY: every pointer in `msg` refers to locals that outlive the call.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl crate::dataplane::ports::DatagramPort for VxlanSocket {
    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        VxlanSocket::send_to(self, buf, dst)
    }

    fn send_gso(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()> {
        VxlanSocket::send_gso(self, buf, segment, dst)
    }

    fn recv_batch(
        &self,
        buf: &mut [u8],
        slot_len: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<()> {
        VxlanSocket::recv_batch(self, buf, slot_len, out)
    }
}

fn sockaddr_from(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The `UDP_GRO` segment size in a received message's control data, if present.
fn gro_segment(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: `msg` was filled by recvmmsg; its control pointer and (kernel-updated) length
    // describe our live control buffer, and the CMSG_* macros stay within that length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP
                && (*c).cmsg_type == UDP_GRO
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(4) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// The address in a `sockaddr_storage` the kernel filled.
fn sockaddr_to(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is larger
            // and suitably aligned.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn getsockopt_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals; len holds value's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Sets an integer socket option (also the ICMP prober's).
pub(super) fn setsockopt_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_send_arrives_as_segments_on_loopback() {
        let rx =
            VxlanSocket::bind("127.0.0.1:0".parse().unwrap(), Duration::from_millis(500)).unwrap();
        let tx =
            VxlanSocket::bind("127.0.0.1:0".parse().unwrap(), Duration::from_millis(500)).unwrap();
        let dst = rx.local_addr().unwrap();
        let payload: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        match tx.send_gso(&payload, 100, dst) {
            Ok(()) => {}
            // Kernels without UDP GSO: nothing to test here.
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => return,
            Err(e) => panic!("send_gso: {e}"),
        }
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for _ in 0..3 {
            let (n, _) = rx.recv_from(&mut buf).unwrap().expect("segment");
            got.push(buf[..n].to_vec());
        }
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
        assert_eq!(got.concat(), payload);
    }

    /// Both families: the IPv6 plane's socket takes the same GSO/GRO paths.
    #[test]
    fn batch_receive_with_and_without_gro() {
        let payload: Vec<u8> = (0..250u32).map(|i| (i * 3) as u8).collect();
        for (gro, lo) in [false, true]
            .into_iter()
            .flat_map(|g| [(g, "127.0.0.1:0"), (g, "[::1]:0")])
        {
            let rx = VxlanSocket::bind(lo.parse().unwrap(), Duration::from_millis(500)).unwrap();
            let tx = VxlanSocket::bind(lo.parse().unwrap(), Duration::from_millis(500)).unwrap();
            let gro_on = gro && rx.enable_gro();
            println!("gro requested {gro}, enabled {gro_on}");
            let dst = rx.local_addr().unwrap();
            let src = tx.local_addr().unwrap();
            // Three plain datagrams, then one GSO send of 100 + 100 + 50.
            for d in [&b"a"[..], b"bb", b""] {
                tx.send_to(d, dst).unwrap();
            }
            let gso = tx.send_gso(&payload, 100, dst).is_ok();
            let slot = 1000;
            let mut buf = vec![0u8; 8 * slot];
            let mut out = Vec::new();
            let mut got: Vec<(Vec<u8>, usize)> = Vec::new();
            while got.iter().map(|(d, _)| d.len()).sum::<usize>() < 3 + if gso { 250 } else { 0 } {
                rx.recv_batch(&mut buf, slot, &mut out).unwrap();
                assert!(!out.is_empty(), "timed out");
                for m in &out {
                    assert_eq!(m.src, src);
                    assert!(!m.truncated);
                    assert_eq!(m.offset % slot, 0);
                    for d in m.datagrams() {
                        got.push((buf[d].to_vec(), m.segment));
                    }
                }
            }
            let datagrams: Vec<&[u8]> = got.iter().map(|(d, _)| &d[..]).collect();
            let mut want: Vec<&[u8]> = vec![b"a", b"bb", b""];
            if gso {
                want.extend([&payload[..100], &payload[100..200], &payload[200..]]);
            }
            assert_eq!(datagrams, want, "gro={gro} {lo}");
            if gro_on && gso {
                // The GSO send stayed one message, its segment size in the UDP_GRO cmsg.
                assert!(got[3..].iter().all(|(_, seg)| *seg == 100), "{got:?}");
            }
        }
    }

    #[test]
    fn oversized_datagrams_are_flagged_truncated() {
        let rx =
            VxlanSocket::bind("127.0.0.1:0".parse().unwrap(), Duration::from_millis(500)).unwrap();
        let tx =
            VxlanSocket::bind("127.0.0.1:0".parse().unwrap(), Duration::from_millis(500)).unwrap();
        tx.send_to(&[7u8; 300], rx.local_addr().unwrap()).unwrap();
        let mut buf = vec![0u8; 200];
        let mut out = Vec::new();
        rx.recv_batch(&mut buf, 200, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].truncated);
        assert_eq!(out[0].len, 200);
    }

    #[test]
    fn datagram_ranges_follow_the_segment_size() {
        let m = |len, segment| Received {
            offset: 1000,
            len,
            src: "127.0.0.1:1".parse().unwrap(),
            segment,
            truncated: false,
        };
        let r: Vec<_> = m(250, 100).datagrams().collect();
        assert_eq!(r, [1000..1100, 1100..1200, 1200..1250]);
        assert_eq!(m(200, 100).datagrams().count(), 2);
        assert_eq!(m(0, 1).datagrams().collect::<Vec<_>>(), vec![1000..1000]);
        assert_eq!(m(5, 0).datagrams().collect::<Vec<_>>(), vec![1000..1005]);
    }
}
