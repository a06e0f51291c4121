//! ICMP (RFC 792) and ICMPv6 (RFC 4443) messages: the 8-byte header both share.
//!
//! ```text
//! |     Type      |     Code      |          Checksum             |
//! |           Rest of header (echo: Identifier, Sequence)         |
//! ```
//! The ICMP checksum covers the message; the ICMPv6 checksum also covers the IPv6
//! pseudo-header. Used for the destination-unreachable errors the data plane writes back to
//! TUN and for the echo requests and replies of the peer prober.

use std::net::{IpAddr, Ipv6Addr};

use super::{be16, checksum, need, put16, IpProtocol, WireError};

/// Length of the ICMP/ICMPv6 header.
pub const HEADER_LEN: usize = 8;

/// ICMP type: echo reply.
pub const ECHO_REPLY: u8 = 0;
/// ICMP type: destination unreachable.
pub const DEST_UNREACHABLE: u8 = 3;
/// ICMP type: echo request.
pub const ECHO_REQUEST: u8 = 8;
/// ICMP destination-unreachable code: net unreachable (what flannel's old UDP backend sent).
pub const CODE_NET_UNREACHABLE: u8 = 0;
/// ICMPv6 type: destination unreachable.
pub const V6_DEST_UNREACHABLE: u8 = 1;
/// ICMPv6 destination-unreachable code: no route to destination.
pub const V6_CODE_NO_ROUTE: u8 = 0;

/// ICMPv6 type: echo request (RFC 4443 §4.1).
pub const V6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 type: echo reply (RFC 4443 §4.2).
pub const V6_ECHO_REPLY: u8 = 129;

/// ICMPv6 type: neighbour solicitation (RFC 4861 §4.3).
pub const V6_NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 type: neighbour advertisement (RFC 4861 §4.4).
pub const V6_NEIGHBOR_ADVERT: u8 = 136;

/// True if the ICMP type is an informational query or answer (echo, timestamp, information,
/// address mask): the only ICMP messages an ICMP error may be sent about (RFC 1812
/// §4.3.2.7).
pub const fn is_query(msg_type: u8) -> bool {
    matches!(msg_type, 0 | 8 | 13..=18)
}

/// True if the ICMPv6 type is an error message (types below 128, RFC 4443 §2.1): no ICMPv6
/// error may be sent about one.
pub const fn v6_is_error(msg_type: u8) -> bool {
    msg_type < 128
}

mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    pub const IDENT: usize = 4;
    pub const SEQ: usize = 6;
}

/// A zero-copy view of an ICMP or ICMPv6 message (header and body).
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

    /// Wraps a buffer after checking it holds the header.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        need(buffer.as_ref().len(), HEADER_LEN)?;
        Ok(Packet { buffer })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Message code.
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Echo identifier (echo request/reply).
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Echo sequence number (echo request/reply).
    pub fn seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SEQ)
    }

    /// True if the ICMP (IPv4) checksum over the whole message verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::sum(self.buffer.as_ref()) == 0xffff
    }

    /// True if the ICMPv6 checksum (pseudo-header from `src` to `dst` included) verifies.
    pub fn verify_checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        let m = self.buffer.as_ref();
        checksum::add(v6_pseudo_header(src, dst, m.len()), checksum::sum(m)) == 0xffff
    }

    /// Everything after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes type and code, and zeroes the checksum and the rest of the header.
    pub fn set_header(&mut self, msg_type: u8, code: u8) {
        self.buffer.as_mut()[..HEADER_LEN].copy_from_slice(&[msg_type, code, 0, 0, 0, 0, 0, 0]);
    }

    /// Sets the message type.
    pub fn set_msg_type(&mut self, msg_type: u8) {
        self.buffer.as_mut()[field::TYPE] = msg_type;
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    /// Sets the echo identifier and sequence number.
    pub fn set_echo(&mut self, ident: u16, seq: u16) {
        put16(self.buffer.as_mut(), field::IDENT, ident);
        put16(self.buffer.as_mut(), field::SEQ, seq);
    }

    /// Computes and stores the ICMP (IPv4) checksum over the whole message.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(c);
    }

    /// Computes and stores the ICMPv6 checksum, pseudo-header from `src` to `dst` included.
    pub fn fill_checksum_v6(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let m = self.buffer.as_ref();
        let c = !checksum::add(v6_pseudo_header(src, dst, m.len()), checksum::sum(m));
        self.set_checksum(c);
    }

    /// Everything after the header, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

/// Which protocol an echo is: ICMP (over IPv4) or ICMPv6. Both share the message layout and
/// differ in type numbers and checksum coverage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EchoKind {
    /// ICMP over IPv4: types 8/0, checksum over the message.
    V4,
    /// ICMPv6: types 128/129, checksum over the pseudo-header too.
    V6,
}

impl EchoKind {
    /// The echo request type.
    pub const fn request(self) -> u8 {
        match self {
            EchoKind::V4 => ECHO_REQUEST,
            EchoKind::V6 => V6_ECHO_REQUEST,
        }
    }

    /// The echo reply type.
    pub const fn reply(self) -> u8 {
        match self {
            EchoKind::V4 => ECHO_REPLY,
            EchoKind::V6 => V6_ECHO_REPLY,
        }
    }
}

/// An echo request message of `kind` (no IP header). The ICMP checksum is filled; the
/// ICMPv6 one is left zero, since it covers addresses only the sender's kernel knows (a raw
/// `IPPROTO_ICMPV6` socket computes it, RFC 3542 §3.1; others call
/// [`Packet::fill_checksum_v6`]).
pub fn echo_request(kind: EchoKind, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut msg = vec![0u8; HEADER_LEN + payload.len()];
    let mut p = Packet::new_unchecked(&mut msg[..]);
    p.set_header(kind.request(), 0);
    p.set_echo(ident, seq);
    p.payload_mut().copy_from_slice(payload);
    if kind == EchoKind::V4 {
        p.fill_checksum();
    }
    msg
}

/// The identifier and sequence number of `msg` if it is an echo reply of `kind` (code 0); an
/// ICMP reply must also carry a valid checksum. The ICMPv6 checksum is not checked here: a
/// raw ICMPv6 socket's kernel has verified it (others call [`Packet::verify_checksum_v6`]).
pub fn parse_echo_reply(kind: EchoKind, msg: &[u8]) -> Option<(u16, u16)> {
    let p = Packet::new_checked(msg).ok()?;
    let valid = match kind {
        EchoKind::V4 => p.verify_checksum(),
        EchoKind::V6 => true,
    };
    (p.msg_type() == kind.reply() && p.code() == 0 && valid).then(|| (p.ident(), p.seq()))
}

/// The ICMPv6 pseudo-header sum for a message of `len` bytes.
fn v6_pseudo_header(src: &Ipv6Addr, dst: &Ipv6Addr, len: usize) -> u16 {
    checksum::pseudo_header(
        &IpAddr::V6(*src),
        &IpAddr::V6(*dst),
        IpProtocol::Icmpv6.into(),
        len as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn echo_request_round_trip() {
        let mut m = vec![0u8; HEADER_LEN + 3];
        let mut p = Packet::new_unchecked(&mut m[..]);
        p.set_header(ECHO_REQUEST, 0);
        p.set_echo(0x1234, 7);
        p.payload_mut().copy_from_slice(b"abc");
        p.fill_checksum();
        assert_eq!(&m[..2], &[ECHO_REQUEST, 0]);
        assert_eq!(&m[4..], &[0x12, 0x34, 0, 7, b'a', b'b', b'c']);
        let p = Packet::new_checked(&m[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(
            (p.msg_type(), p.code(), p.ident(), p.seq()),
            (8, 0, 0x1234, 7)
        );
        let mut bad = m.clone();
        bad[9] ^= 1;
        assert!(!Packet::new_unchecked(&bad[..]).verify_checksum());
    }

    #[test]
    fn short_buffers_are_rejected() {
        assert!(Packet::new_checked(&[0u8; 7][..]).is_err());
        assert!(Packet::new_checked(&[0u8; 8][..]).is_ok());
    }

    #[test]
    fn query_and_error_types() {
        for t in [0, 8, 13, 14, 15, 16, 17, 18] {
            assert!(is_query(t), "{t}");
        }
        for t in [3, 4, 5, 11, 12, 19, 255] {
            assert!(!is_query(t), "{t}");
        }
        assert!(v6_is_error(1) && v6_is_error(127));
        assert!(!v6_is_error(128) && !v6_is_error(129));
    }

    /// `request` turned into the reply of `kind` (type changed, checksum refilled for ICMP).
    fn answer(kind: EchoKind, mut request: Vec<u8>) -> Vec<u8> {
        let mut p = Packet::new_unchecked(&mut request[..]);
        p.set_msg_type(kind.reply());
        if kind == EchoKind::V4 {
            p.fill_checksum();
        }
        request
    }

    #[test]
    fn echo_of_each_kind() {
        let v4 = echo_request(EchoKind::V4, 0x1234, 7, b"abc");
        assert_eq!(&v4[..2], &[8, 0]);
        assert!(Packet::new_unchecked(&v4[..]).verify_checksum());
        let v6 = echo_request(EchoKind::V6, 0x1234, 7, b"abc");
        assert_eq!(&v6[..8], &[128, 0, 0, 0, 0x12, 0x34, 0, 7]);
        assert_eq!(&v6[8..], b"abc");
        // Requests are not replies; a reply of the other kind is not one either.
        assert_eq!(parse_echo_reply(EchoKind::V4, &v4), None);
        assert_eq!(parse_echo_reply(EchoKind::V6, &v6), None);
        let r6 = answer(EchoKind::V6, v6);
        assert_eq!(parse_echo_reply(EchoKind::V6, &r6), Some((0x1234, 7)));
        assert_eq!(parse_echo_reply(EchoKind::V4, &r6), None);
        let r4 = answer(EchoKind::V4, v4);
        assert_eq!(parse_echo_reply(EchoKind::V4, &r4), Some((0x1234, 7)));
        assert_eq!(parse_echo_reply(EchoKind::V6, &r4), None);
        // A code other than 0, a bad ICMP checksum, a short message.
        let mut coded = r6.clone();
        coded[1] = 1;
        assert_eq!(parse_echo_reply(EchoKind::V6, &coded), None);
        let mut bad = r4.clone();
        bad[10] ^= 1;
        assert_eq!(parse_echo_reply(EchoKind::V4, &bad), None);
        assert_eq!(parse_echo_reply(EchoKind::V6, &r6[..7]), None);
    }

    proptest! {
        #[test]
        fn echo_round_trip(
            v6 in any::<bool>(), ident in any::<u16>(), seq in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            s in any::<u128>(), d in any::<u128>(),
        ) {
            let kind = if v6 { EchoKind::V6 } else { EchoKind::V4 };
            let mut reply = answer(kind, echo_request(kind, ident, seq, &payload));
            prop_assert_eq!(&reply[HEADER_LEN..], &payload[..]);
            prop_assert_eq!(parse_echo_reply(kind, &reply), Some((ident, seq)));
            if v6 {
                // As a peer's kernel sends it: checksummed over the pseudo-header.
                let (src, dst) = (Ipv6Addr::from(s), Ipv6Addr::from(d));
                let mut p = Packet::new_unchecked(&mut reply[..]);
                p.fill_checksum_v6(&src, &dst);
                prop_assert!(Packet::new_unchecked(&reply[..]).verify_checksum_v6(&src, &dst));
                prop_assert_eq!(parse_echo_reply(kind, &reply), Some((ident, seq)));
            }
        }

        #[test]
        fn echo_parse_never_panics(v6 in any::<bool>(), bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let kind = if v6 { EchoKind::V6 } else { EchoKind::V4 };
            let _ = parse_echo_reply(kind, &bytes);
        }

        #[test]
        fn v6_checksum_verifies_and_depends_on_addresses(
            body in proptest::collection::vec(any::<u8>(), 0..64),
            s in any::<u128>(), d in any::<u128>(),
        ) {
            let (src, dst) = (Ipv6Addr::from(s), Ipv6Addr::from(d));
            let mut m = vec![0u8; HEADER_LEN + body.len()];
            let mut p = Packet::new_unchecked(&mut m[..]);
            p.set_header(V6_DEST_UNREACHABLE, V6_CODE_NO_ROUTE);
            p.payload_mut().copy_from_slice(&body);
            p.fill_checksum_v6(&src, &dst);
            let p = Packet::new_unchecked(&m[..]);
            prop_assert!(p.verify_checksum_v6(&src, &dst));
            let other = Ipv6Addr::from(s ^ 1);
            prop_assert!(!p.verify_checksum_v6(&other, &dst));
        }
    }
}
