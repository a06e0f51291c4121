//! VXLAN headers (RFC 7348 §5): 8 bytes in front of the inner Ethernet frame.
//!
//! ```text
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! On receipt the I flag must be set and every reserved bit is ignored; on send the reserved
//! bits are zero.

use super::{need, WireError};

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;

/// The "VNI is valid" flag.
pub const FLAG_I: u8 = 0x08;

/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// The standard UDP port (IANA 4789); flannel uses the Linux default 8472 instead.
pub const IANA_PORT: u16 = 4789;

/// flannel's default VXLAN UDP port (the Linux kernel's historical default).
pub const FLANNEL_PORT: u16 = 8472;

/// A zero-copy view of a VXLAN header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`HEADER_LEN`]. Use [`Packet::new_checked`] for received bytes.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking it holds the header.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        need(buffer.as_ref().len(), HEADER_LEN)?;
        Ok(Packet { buffer })
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The flags byte.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    /// True if the I (valid VNI) flag is set.
    #[inline]
    pub fn vni_valid(&self) -> bool {
        self.flags() & FLAG_I != 0
    }

    /// The 24-bit VNI.
    #[inline]
    pub fn vni(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([0, b[4], b[5], b[6]])
    }

    /// The inner Ethernet frame.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes a whole header: the I flag, reserved bits zero, and the low 24 bits of `vni`.
    #[inline]
    pub fn set_header(&mut self, vni: u32) {
        let v = (vni & MAX_VNI) << 8;
        let b = self.buffer.as_mut();
        b[0..4].copy_from_slice(&[FLAG_I, 0, 0, 0]);
        b[4..8].copy_from_slice(&v.to_be_bytes());
    }

    /// The inner Ethernet frame, mutable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

/// A VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
}

impl Repr {
    /// Parses a checked header: the I flag must be set; reserved bits are ignored.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        need(packet.buffer.as_ref().len(), HEADER_LEN)?;
        if !packet.vni_valid() {
            return Err(WireError::Malformed("VXLAN flags: I bit not set"));
        }
        Ok(Repr { vni: packet.vni() })
    }

    /// Header length in bytes.
    #[inline]
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header (reserved bits zero). Fails if the VNI does not fit 24 bits.
    #[inline]
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Packet<T>,
    ) -> Result<(), WireError> {
        need(packet.buffer.as_ref().len(), HEADER_LEN)?;
        if self.vni > MAX_VNI {
            return Err(WireError::Malformed("VXLAN VNI wider than 24 bits"));
        }
        packet.set_header(self.vni);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_header_vni_1() {
        // What Linux sends for VNI 1.
        let b = [0x08, 0, 0, 0, 0, 0, 0x01, 0];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.vni_valid());
        assert_eq!(Repr::parse(&p), Ok(Repr { vni: 1 }));
        let mut out = [0xffu8; 8];
        Repr { vni: 1 }
            .emit(&mut Packet::new_unchecked(&mut out[..]))
            .unwrap();
        assert_eq!(out, b);
    }

    #[test]
    fn reserved_bits_ignored_on_receipt() {
        let b = [0xff, 0xff, 0xff, 0xff, 0x12, 0x34, 0x56, 0xff];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p), Ok(Repr { vni: 0x123456 }));
    }

    #[test]
    fn i_flag_required() {
        let b = [0xf7, 0, 0, 0, 0, 0, 1, 0];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(Repr::parse(&p).is_err());
        assert!(Packet::new_checked(&b[..7]).is_err());
    }

    #[test]
    fn wide_vni_rejected_on_emit() {
        let mut out = [0u8; 8];
        assert!(Repr { vni: 1 << 24 }
            .emit(&mut Packet::new_unchecked(&mut out[..]))
            .is_err());
    }

    proptest! {
        #[test]
        fn emit_parse_identity(vni in 0u32..=MAX_VNI, junk in any::<[u8; 8]>()) {
            let mut buf = junk;
            Repr { vni }.emit(&mut Packet::new_unchecked(&mut buf[..])).unwrap();
            prop_assert_eq!(buf[0], FLAG_I);
            prop_assert_eq!(&buf[1..4], &[0, 0, 0]);
            prop_assert_eq!(buf[7], 0);
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&buf[..]).unwrap()), Ok(Repr { vni }));
        }
    }
}
