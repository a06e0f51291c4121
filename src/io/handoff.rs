//! Passing descriptors between processes over a Unix stream socket (`SCM_RIGHTS`), for the
//! userspace data plane's handover from a running flanneld to its successor.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries (a TUN queue and a socket for each of up to 8
/// queues).
pub const MAX_FDS: usize = 16;
/// Control buffer: room for one `SCM_RIGHTS` header (16 bytes) and [`MAX_FDS`] ints,
/// 8-byte aligned, with a word to spare.
const CMSG_WORDS: usize = 2 + MAX_FDS / 2 + 1;

/// Sends `msg` with `fds` attached (one `sendmsg`). The receiver gets its own descriptors
/// for the same open files.
pub fn send_with_fds(stream: &UnixStream, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS || msg.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptor message: empty or too many descriptors",
        ));
    }
    let mut cbuf = [0u64; CMSG_WORDS];
    let payload = std::mem::size_of_val(fds) as u32;
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // SAFETY: msg_control points at `cbuf`, whose 8 * CMSG_WORDS bytes hold
        // CMSG_SPACE(4 * MAX_FDS) = 16 + 4 * MAX_FDS bytes, so CMSG_FIRSTHDR returns a pointer inside it (never null).
        let cmsg = unsafe { &mut *libc::CMSG_FIRSTHDR(&hdr) };
        cmsg.cmsg_level = libc::SOL_SOCKET;
        cmsg.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: pure size computation.
        cmsg.cmsg_len = unsafe { libc::CMSG_LEN(payload) } as usize;
        // SAFETY: CMSG_DATA points `payload` bytes inside `cbuf` (checked above); the ints
        // are written unaligned-safe one by one.
        let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
        for (i, fd) in fds.iter().enumerate() {
            // SAFETY: `i < fds.len() <= MAX_FDS`, within the data area sized for them.
            unsafe { data.add(i).write_unaligned(fd.as_raw_fd()) };
        }
    }
    loop {
        // SAFETY: `hdr` points at `iov` (describing the live `msg`) and at `cbuf`, both alive
        // for the call; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            if n as usize != msg.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "descriptor message sent in part",
                ));
            }
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message into `buf` with the descriptors attached to it (close-on-exec).
/// Returns the bytes read (0 at end of stream) and the descriptors.
pub fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cbuf = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cbuf.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: `hdr` points at `iov` (the live, writable `buf`) and at `cbuf` with their
        // sizes; both outlive the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `hdr` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only within
    // msg_controllen bytes of `cbuf` and return null at the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&hdr) };
    while !cmsg.is_null() {
        // SAFETY: non-null pointers from CMSG_FIRSTHDR/NXTHDR point at a complete header.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: pure size computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = c.cmsg_len.saturating_sub(header) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the kernel wrote `count` ints after the header, inside `cbuf`.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: within the `count` ints just described.
                let raw = unsafe { data.add(i).read_unaligned() };
                if raw >= 0 {
                    // SAFETY: the kernel installed this descriptor for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&hdr, cmsg) };
    }
    if hdr.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptor message: control data truncated",
        ));
    }
    Ok((n, fds))
}

/// The user ID of the process at the other end (`SO_PEERCRED`).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    peer_cred(stream).map(|c| c.uid)
}

/// The process ID at the other end (`SO_PEERCRED`; as seen in our PID namespace, 0 if not
/// visible).
pub fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    peer_cred(stream).map(|c| u32::try_from(c.pid).unwrap_or(0))
}

fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the option value points at `cred` with its size in `len`; both outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// This process's effective user ID.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_socket_pair_and_stay_usable() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (mut p1, p2) = UnixStream::pair().expect("payload pair");
        send_with_fds(&a, b"fds\n", &[p2.as_fd()]).expect("send");
        drop(p2);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"fds\n");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the other end of the payload pair.
        let mut got = UnixStream::from(fds.into_iter().next().expect("fd"));
        p1.write_all(b"hello").expect("write");
        let mut five = [0u8; 5];
        got.read_exact(&mut five).expect("read");
        assert_eq!(&five, b"hello");
        assert_eq!(peer_uid(&a).expect("cred"), effective_uid());
    }

    #[test]
    fn a_message_without_descriptors_yields_none() {
        let (a, b) = UnixStream::pair().expect("pair");
        send_with_fds(&a, b"no\n", &[]).expect("send");
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"no\n");
        assert!(fds.is_empty());
        drop(a);
        assert_eq!(recv_with_fds(&b, &mut buf).expect("eof").0, 0);
    }
}
