//! IPv6 fixed headers (RFC 8200 §3). Extension headers are not parsed: the data plane only
//! needs addresses, lengths and the first next-header value.

use std::net::Ipv6Addr;

use super::{be16, need, put16, IpProtocol, WireError};

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

mod field {
    pub const VER_TC_FLOW: usize = 0;
    pub const LENGTH: usize = 4;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// A zero-copy view of an IPv6 packet.
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

    /// Wraps a buffer after checking it holds the fixed header and the payload length it
    /// claims. The version is checked by [`Repr::parse`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let p = Packet { buffer };
        p.check_len()?;
        Ok(p)
    }

    /// Checks the lengths described at [`Packet::new_checked`].
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        need(len, HEADER_LEN)?;
        need(len, self.total_len())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version nibble (6 for IPv6).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TC_FLOW] >> 4
    }

    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        let b = self.buffer.as_ref();
        (b[0] << 4) | (b[1] >> 4)
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        let b = self.buffer.as_ref();
        (u32::from(b[1] & 0x0f) << 16) | u32::from(be16(b, 2))
    }

    /// Payload length (everything after the fixed header, extension headers included).
    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Fixed header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// Next header (first extension header or upper-layer protocol).
    pub fn next_header(&self) -> IpProtocol {
        self.buffer.as_ref()[field::NXT_HDR].into()
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv6Addr {
        addr_at(self.buffer.as_ref(), field::SRC)
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        addr_at(self.buffer.as_ref(), field::DST)
    }

    /// The payload (trailing bytes beyond the payload length excluded).
    pub fn payload(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(HEADER_LEN..self.total_len())
            .unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version, traffic class and flow label.
    pub fn set_version_tc_flow(&mut self, version: u8, traffic_class: u8, flow_label: u32) {
        let b = self.buffer.as_mut();
        b[0] = (version << 4) | (traffic_class >> 4);
        b[1] = (traffic_class << 4) | ((flow_label >> 16) as u8 & 0x0f);
        put16(b, 2, flow_label as u16);
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, v);
    }

    /// Sets the next header.
    pub fn set_next_header(&mut self, v: IpProtocol) {
        self.buffer.as_mut()[field::NXT_HDR] = v.into();
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, v: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = v;
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC..field::SRC + 16].copy_from_slice(&a.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST..field::DST + 16].copy_from_slice(&a.octets());
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        self.buffer
            .as_mut()
            .get_mut(HEADER_LEN..end)
            .unwrap_or(&mut [])
    }
}

/// The fields of an IPv6 fixed header the data plane cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Source address.
    pub src_addr: Ipv6Addr,
    /// Destination address.
    pub dst_addr: Ipv6Addr,
    /// Next header.
    pub next_header: IpProtocol,
    /// Payload length.
    pub payload_len: usize,
    /// Hop limit.
    pub hop_limit: u8,
}

impl Repr {
    /// Parses a checked packet (version 6).
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        packet.check_len()?;
        if packet.version() != 6 {
            return Err(WireError::Malformed("IPv6 version"));
        }
        Ok(Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.payload_len()),
            hop_limit: packet.hop_limit(),
        })
    }

    /// Header length in bytes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the fixed header (traffic class and flow label zero) into `packet`.
    ///
    /// Fails if `payload_len` does not fit 16 bits (jumbograms are not supported).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Packet<T>,
    ) -> Result<(), WireError> {
        need(packet.buffer.as_ref().len(), HEADER_LEN)?;
        let len = u16::try_from(self.payload_len)
            .map_err(|_| WireError::Malformed("IPv6 payload length"))?;
        packet.set_version_tc_flow(6, 0, 0);
        packet.set_payload_len(len);
        packet.set_next_header(self.next_header);
        packet.set_hop_limit(self.hop_limit);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixture() -> Vec<u8> {
        let mut v = vec![
            0x60, 0x0a, 0xbc, 0xde, 0x00, 0x08, 0x11,
            0x40, // ver 6, tc 0x00, flow 0xabcde, len 8, UDP, hl 64
        ];
        v.extend_from_slice(&"fd10:244:1::5".parse::<Ipv6Addr>().unwrap().octets());
        v.extend_from_slice(&"fd10:244:2::7".parse::<Ipv6Addr>().unwrap().octets());
        v.extend_from_slice(&[1, 2, 3, 4, 0, 8, 0, 0]);
        v
    }

    #[test]
    fn parse_fixture() {
        let v = fixture();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0);
        assert_eq!(p.flow_label(), 0xabcde);
        assert_eq!(p.payload_len(), 8);
        assert_eq!(p.next_header(), IpProtocol::Udp);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr().to_string(), "fd10:244:1::5");
        assert_eq!(p.dst_addr().to_string(), "fd10:244:2::7");
        assert_eq!(p.payload(), &[1, 2, 3, 4, 0, 8, 0, 0]);
    }

    #[test]
    fn length_checks() {
        let v = fixture();
        assert_eq!(
            Packet::new_checked(&v[..39]).unwrap_err(),
            WireError::Truncated { need: 40, have: 39 }
        );
        assert_eq!(
            Packet::new_checked(&v[..47]).unwrap_err(),
            WireError::Truncated { need: 48, have: 47 }
        );
        let mut v4 = v;
        v4[0] = 0x45;
        let p = Packet::new_checked(&v4[..]).unwrap();
        assert_eq!(Repr::parse(&p), Err(WireError::Malformed("IPv6 version")));
    }

    proptest! {
        #[test]
        fn emit_parse_identity(s in any::<[u8; 16]>(), d in any::<[u8; 16]>(), nh in any::<u8>(),
                               len in 0usize..2000, hl in any::<u8>()) {
            let repr = Repr { src_addr: s.into(), dst_addr: d.into(), next_header: nh.into(),
                              payload_len: len, hop_limit: hl };
            let mut buf = vec![0u8; HEADER_LEN + len];
            repr.emit(&mut Packet::new_unchecked(&mut buf[..])).unwrap();
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&buf[..]).unwrap()), Ok(repr));
        }

        #[test]
        fn tc_flow_round_trip(tc in any::<u8>(), flow in 0u32..(1 << 20)) {
            let mut buf = [0u8; HEADER_LEN];
            let mut p = Packet::new_unchecked(&mut buf[..]);
            p.set_version_tc_flow(6, tc, flow);
            prop_assert_eq!((p.version(), p.traffic_class(), p.flow_label()), (6, tc, flow));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = Repr::parse(&p);
                let _ = p.payload();
            }
        }
    }
}
