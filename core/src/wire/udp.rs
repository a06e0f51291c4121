//! UDP headers (RFC 768).

use std::net::IpAddr;

use super::{be16, checksum, need, put16, IpProtocol, WireError};

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;

/// Offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 6;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// A zero-copy view of a UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`HEADER_LEN`]. Use [`Packet::new_checked`] for received bytes.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking: whole header, length field ≥ 8 and ≤ buffer.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let p = Packet { buffer };
        p.check_len()?;
        Ok(p)
    }

    /// Checks the lengths described at [`Packet::new_checked`].
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        need(len, HEADER_LEN)?;
        let l = usize::from(self.len());
        if l < HEADER_LEN {
            return Err(WireError::Malformed("UDP length"));
        }
        need(len, l)
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Length field (header + payload).
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// True if the length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The datagram up to the length field (header included).
    fn datagram(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(..usize::from(self.len()))
            .unwrap_or(&[])
    }

    /// The payload (up to the length field).
    pub fn payload(&self) -> &[u8] {
        self.datagram().get(HEADER_LEN..).unwrap_or(&[])
    }

    /// True if the checksum verifies against the pseudo-header of `src` → `dst`. A zero
    /// checksum means "none" over IPv4 (RFC 768) and is accepted there only.
    pub fn verify_checksum(&self, src: &IpAddr, dst: &IpAddr) -> bool {
        if self.checksum() == 0 {
            return src.is_ipv4();
        }
        let d = self.datagram();
        let ph = checksum::pseudo_header(src, dst, IpProtocol::Udp.into(), d.len() as u32);
        checksum::add(ph, checksum::sum(d)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, v);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, v);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, v);
    }

    /// Computes and stores the checksum over the datagram (up to the length field); a result
    /// of zero is sent as `0xffff` (RFC 768).
    pub fn fill_checksum(&mut self, src: &IpAddr, dst: &IpAddr) {
        self.set_checksum(0);
        let d = self.datagram();
        let ph = checksum::pseudo_header(src, dst, IpProtocol::Udp.into(), d.len() as u32);
        let c = !checksum::add(ph, checksum::sum(d));
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        self.buffer
            .as_mut()
            .get_mut(HEADER_LEN..end)
            .unwrap_or(&mut [])
    }
}

/// The fields of a UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload length.
    pub payload_len: usize,
}

impl Repr {
    /// Reads a checked datagram's header. The checksum is not verified here (see
    /// [`Packet::verify_checksum`]).
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        packet.check_len()?;
        Ok(Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload_len: usize::from(packet.len()) - HEADER_LEN,
        })
    }

    /// Header length in bytes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header with a zero checksum; call [`Packet::fill_checksum`] once the payload
    /// is in place. Fails if the length does not fit 16 bits.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Packet<T>,
    ) -> Result<(), WireError> {
        need(packet.buffer.as_ref().len(), HEADER_LEN)?;
        let len = u16::try_from(HEADER_LEN + self.payload_len)
            .map_err(|_| WireError::Malformed("UDP length"))?;
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(len);
        packet.set_checksum(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A VXLAN datagram header as the Linux kernel sends it: 8472 → 8472, 58 bytes.
    const HEADER: [u8; 8] = [0xd4, 0x31, 0x21, 0x18, 0x00, 0x3a, 0x00, 0x00];

    #[test]
    fn parse_fixture() {
        let mut v = HEADER.to_vec();
        v.resize(58, 7);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.src_port(), 54321);
        assert_eq!(p.dst_port(), 8472);
        assert_eq!(p.len(), 58);
        assert_eq!(p.payload().len(), 50);
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.payload_len, 50);
        assert!(Packet::new_checked(&v[..57]).is_err());
        let mut short = v.clone();
        short[5] = 7;
        assert_eq!(
            Packet::new_checked(&short[..]).unwrap_err(),
            WireError::Malformed("UDP length")
        );
    }

    #[test]
    fn checksum_fill_and_verify() {
        let s = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let d = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        let mut v = HEADER.to_vec();
        v.resize(58, 7);
        let mut p = Packet::new_unchecked(&mut v[..]);
        assert!(p.verify_checksum(&s, &d), "zero = none over IPv4");
        p.fill_checksum(&s, &d);
        assert_ne!(p.checksum(), 0);
        assert!(p.verify_checksum(&s, &d));
        assert!(!p.verify_checksum(&d, &IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3))));
        let s6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        p.set_checksum(0);
        assert!(!p.verify_checksum(&s6, &s6), "zero is invalid over IPv6");
        p.fill_checksum(&s6, &s6);
        assert!(p.verify_checksum(&s6, &s6));
    }

    proptest! {
        #[test]
        fn emit_parse_identity(sp in any::<u16>(), dp in any::<u16>(), len in 0usize..3000) {
            let repr = Repr { src_port: sp, dst_port: dp, payload_len: len };
            let mut buf = vec![0u8; HEADER_LEN + len];
            repr.emit(&mut Packet::new_unchecked(&mut buf[..])).unwrap();
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&buf[..]).unwrap()), Ok(repr));
        }

        #[test]
        fn filled_checksum_verifies(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                    s in any::<[u8; 16]>(), d in any::<[u8; 16]>()) {
            let (s, d) = (IpAddr::V6(s.into()), IpAddr::V6(d.into()));
            let mut buf = vec![0u8; HEADER_LEN];
            buf.extend_from_slice(&payload);
            let repr = Repr { src_port: 1, dst_port: 2, payload_len: payload.len() };
            let mut p = Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut p).unwrap();
            p.fill_checksum(&s, &d);
            prop_assert!(p.verify_checksum(&s, &d));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = Repr::parse(&p);
                let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
                let _ = (p.payload(), p.verify_checksum(&a, &a));
            }
        }
    }
}
