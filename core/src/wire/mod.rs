//! Wire formats: zero-copy views over packet bytes.
//!
//! Each header has a `Packet<T: AsRef<[u8]>>` (or `Frame`) view with a checked constructor
//! (`new_checked` validates every length the accessors rely on, so accessors cannot panic
//! afterwards), getters, setters on `AsMut<[u8]>`, and a `Repr` that parses a view into plain
//! values and emits them back. Only what flannel's data plane needs is modelled.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod mac;
pub mod tcp;
pub mod udp;
pub mod vxlan;

pub use ethernet::EtherType;
pub use ip::IpProtocol;
pub use mac::MacAddr;

/// Why bytes are not a valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the header, or than the length a header field claims.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A field holds an impossible value (a version, a header length, a length smaller than
    /// its header).
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A well-formed value this implementation does not handle (e.g. a non-Ethernet ARP).
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// A checksum does not verify.
    #[error("bad {0} checksum")]
    Checksum(&'static str),
}

/// Fails with [`WireError::Truncated`] unless `have >= need`.
#[inline]
pub(crate) fn need(have: usize, need: usize) -> Result<(), WireError> {
    if have < need {
        Err(WireError::Truncated { need, have })
    } else {
        Ok(())
    }
}

/// Reads a big-endian u16 at `at`. Callers guarantee the bounds (checked constructors).
#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at`. Callers guarantee the bounds (checked constructors).
#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Writes a big-endian u16 at `at`.
#[inline]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u32 at `at`.
#[inline]
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
