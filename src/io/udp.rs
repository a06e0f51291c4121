//! The underlay UDP socket that carries VXLAN datagrams.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Socket buffer size asked for (wireguard-go found ~7 MB removes drops under load).
const SOCKET_BUFFER: libc::c_int = 7 << 20;
const UDP_SEGMENT: libc::c_int = 103;

/// A bound UDP socket with large buffers and a receive timeout, so loops can see shutdown.
#[derive(Debug)]
pub struct VxlanSocket {
    sock: UdpSocket,
}

impl VxlanSocket {
    /// Binds `addr` (the node's underlay address and the VXLAN port).
    pub fn bind(addr: SocketAddr, recv_timeout: Duration) -> io::Result<VxlanSocket> {
        let sock = UdpSocket::bind(addr)?;
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

    /// A second handle on the same socket, for another thread.
    pub fn try_clone(&self) -> io::Result<VxlanSocket> {
        Ok(VxlanSocket {
            sock: self.sock.try_clone()?,
        })
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

fn setsockopt_int(
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
}
