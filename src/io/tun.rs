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
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// Length of the `virtio_net_hdr` that prefixes every packet when `vnet_hdr` is on.
pub const VNET_HDR_LEN: usize = 10;

/// Which kernel offloads the TUN device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunOffload {
    /// Prefix packets with a `virtio_net_hdr` and accept partial checksums (TUN_F_CSUM).
    pub vnet_hdr: bool,
    /// Also accept TCP segmentation offload (TSO4/TSO6 super-packets up to 64 KiB).
    pub tso: bool,
}

/// An open TUN device. Closing it removes a non-persistent device with its addresses/routes.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    offload: TunOffload,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name` in the calling thread's namespace.
    pub fn open(name: &str, offload: TunOffload) -> io::Result<Tun> {
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
            return Err(io::Error::last_os_error());
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
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct; `req` is one and outlives
        // the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
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
        // SAFETY: the kernel NUL-terminated the name it chose within IFNAMSIZ bytes.
        let actual = unsafe { CStr::from_ptr(req.name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tun {
            fd,
            name: actual,
            offload,
        })
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
        loop {
            // SAFETY: the pointer and length describe the live `packet` slice.
            let n =
                unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            if n >= 0 {
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
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    if !wait_fd(fd, libc::POLLIN, ms)? {
        return Ok(None);
    }
    read_nonblocking(fd, buf)
}
