//! What the userspace packet loop needs from a TUN device and a UDP socket.
//!
//! The loop (`backend::userspace`) is generic over these two traits: `src/io` implements them
//! for the real descriptors, and tests drive the same loop over in-memory fakes. Only `std`
//! types appear here; nothing in this module does IO.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

/// One message of a [`DatagramPort::recv_batch`]: a datagram, or with UDP GRO several
/// datagrams of one sender laid end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Where the message starts in the batch buffer.
    pub offset: usize,
    /// Bytes received.
    pub len: usize,
    /// The sender.
    pub src: SocketAddr,
    /// Size of each coalesced datagram (the last may be shorter); `len` when not coalesced.
    pub segment: usize,
    /// The message did not fit its slot and was cut (it should be dropped).
    pub truncated: bool,
}

impl Received {
    /// The byte ranges (in the batch buffer) of the datagrams this message holds.
    pub fn datagrams(&self) -> impl Iterator<Item = Range<usize>> {
        super::gro_datagrams(self.offset, self.len, self.segment)
    }
}

/// A TUN-like device: whole IP packets, each behind a 10-byte virtio-net header.
pub trait TunPort: Send + Sync {
    /// Reads one packet (vnet header first) into `buf`; `Ok(None)` when nothing arrived
    /// within `timeout`, so the caller can look for shutdown.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;

    /// Reads one packet if one is queued, without waiting.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.recv(buf, Duration::ZERO)
    }

    /// Waits up to `timeout` for a packet to read, without reading it; false when none
    /// came, so the caller can look for shutdown.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool>;

    /// Writes one packet (vnet header first).
    fn send(&self, packet: &[u8]) -> io::Result<()>;

    /// Writes one packet gathered from `hdr` (its vnet header, possibly describing a TSO
    /// super-packet) and the `pieces` of `buf`, in order.
    fn send_gather(&self, hdr: &[u8], buf: &[u8], pieces: &[Range<usize>]) -> io::Result<()>;
}

/// A UDP-socket-like endpoint for VXLAN datagrams.
pub trait DatagramPort: Send + Sync {
    /// Sends one datagram.
    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()>;

    /// Sends `buf` as consecutive datagrams of `segment` bytes (the last may be shorter),
    /// as UDP GSO does.
    fn send_gso(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()>;

    /// Receives a batch of messages: message `i` lands at `buf[i * slot_len..]`. Waits a
    /// bounded time for the first one; fills `out` (cleared first), empty when none came.
    fn recv_batch(
        &self,
        buf: &mut [u8],
        slot_len: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<()>;
}
