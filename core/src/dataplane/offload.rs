//! TUN offloads: the `virtio_net_hdr` that precedes each packet on a TUN device opened with
//! `IFF_VNET_HDR`, checksum completion for `VIRTIO_NET_HDR_F_NEEDS_CSUM`, and software
//! segmentation of TSO/USO super-packets.
//!
//! A VXLAN datagram carries one inner frame no larger than the inner MTU, so every
//! super-packet read from TUN is split here into MTU-sized segments before encapsulation.
//! [`gso_split`] writes the segments into one caller-owned arena at a fixed stride with
//! headroom in front of each, so the IO layer encapsulates each in place with
//! [`super::encap`] and can hand the whole arena to one UDP GSO send (`UDP_SEGMENT` = stride)
//! when the headroom is [`super::VXLAN_HEADROOM`].
//!
//! Packets without GSO need no copy: read from TUN at `buf[VXLAN_HEADROOM - VirtioNetHdr::LEN..]`
//! so the packet itself starts at `VXLAN_HEADROOM`, parse the header, call
//! [`complete_partial_checksum`] on the packet if `F_NEEDS_CSUM` is set, and encapsulate in
//! place: the VXLAN and Ethernet headers overwrite the consumed `virtio_net_hdr`.

use std::net::IpAddr;
use std::ops::Range;

use super::DropReason;
use crate::wire::{checksum, ipv4, ipv6, tcp, udp, IpProtocol};

/// Most segments one super-packet may produce. 64 KiB at Linux's smallest MSS (48 bytes,
/// `tcp_min_snd_mss`) is about 1,366; anything more is a bogus header.
pub const MAX_SEGMENTS: usize = 1500;

/// The `struct virtio_net_hdr` (10 bytes, little-endian as with `TUNSETVNETLE` or on a
/// little-endian host) that the kernel puts in front of each packet on an `IFF_VNET_HDR` TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly or-ed with [`VirtioNetHdr::GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (not trusted: the kernel may report the whole linear part).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

/// The segmentation type of a [`VirtioNetHdr`], without the ECN bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GsoKind {
    /// Not a super-packet.
    None,
    /// TCP over IPv4 (TSO4).
    TcpV4,
    /// TCP over IPv6 (TSO6).
    TcpV6,
    /// UDP segmentation (USO, `GSO_UDP_L4`), either IP version.
    UdpL4,
    /// Anything else (including the deprecated UFO, type 3).
    Other(u8),
}

impl VirtioNetHdr {
    /// Size on the wire.
    pub const LEN: usize = 10;
    /// The checksum is partial: complete it from `csum_start` (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The checksum has been validated (`VIRTIO_NET_HDR_F_DATA_VALID`).
    pub const F_DATA_VALID: u8 = 2;
    /// Not a GSO packet.
    pub const GSO_NONE: u8 = 0;
    /// TCPv4 segmentation.
    pub const GSO_TCPV4: u8 = 1;
    /// UDP fragmentation offload (deprecated, unsupported).
    pub const GSO_UDP: u8 = 3;
    /// TCPv6 segmentation.
    pub const GSO_TCPV6: u8 = 4;
    /// UDP segmentation.
    pub const GSO_UDP_L4: u8 = 5;
    /// The ECN bit: the TCP super-packet had CWR set.
    pub const GSO_ECN: u8 = 0x80;

    /// Reads the first [`VirtioNetHdr::LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<VirtioNetHdr, DropReason> {
        let Some(b) = bytes.first_chunk::<{ Self::LEN }>() else {
            return Err(DropReason::Truncated);
        };
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Writes the header into the first [`VirtioNetHdr::LEN`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<(), DropReason> {
        let dst = out.get_mut(..Self::LEN).ok_or(DropReason::Truncated)?;
        dst.copy_from_slice(&self.to_bytes());
        Ok(())
    }

    /// The segmentation type.
    pub fn gso_kind(&self) -> GsoKind {
        match self.gso_type & !Self::GSO_ECN {
            Self::GSO_NONE => GsoKind::None,
            Self::GSO_TCPV4 => GsoKind::TcpV4,
            Self::GSO_TCPV6 => GsoKind::TcpV6,
            Self::GSO_UDP_L4 => GsoKind::UdpL4,
            other => GsoKind::Other(other),
        }
    }

    /// True if the checksum must be completed before the packet leaves.
    pub fn needs_csum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }
}

/// Completes a partial checksum: the kernel stored the pseudo-header sum in the checksum
/// field; fold everything from `csum_start` to the end of `packet` and store the complement at
/// `csum_start + csum_offset` (a zero result is stored as `0xffff`, as Linux does).
pub fn complete_partial_checksum(
    packet: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), DropReason> {
    let at = csum_start
        .checked_add(csum_offset)
        .ok_or(DropReason::BadOffload)?;
    let end = at.checked_add(2).ok_or(DropReason::BadOffload)?;
    if end > packet.len() {
        return Err(DropReason::BadOffload);
    }
    let c = !checksum::sum(packet.get(csum_start..).unwrap_or(&[]));
    let c = if c == 0 { 0xffff } else { c };
    let field = packet.get_mut(at..end).ok_or(DropReason::BadOffload)?;
    field.copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// What [`finish_rx_checksum`] found in a received inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RxChecksum {
    /// Not unfinished: no TCP/UDP checksum here we look at, or its field is not the bare
    /// pseudo-header sum. Left as is and not verified (the kernel verifies it).
    Untouched,
    /// The field held the pseudo-header sum, yet the checksum verified as is (a finished
    /// checksum that happens to equal it). Left as is.
    Valid,
    /// The field held the pseudo-header sum a sender's checksum offload leaves
    /// (`CHECKSUM_PARTIAL` that crossed a veth and met no NIC): completed in place.
    Completed,
}

/// Completes the inner TCP/UDP checksum of a received packet if its sender's offload left it
/// unfinished, as a NIC would have on the wire.
///
/// Linux stores the folded pseudo-header sum in the checksum field of a `CHECKSUM_PARTIAL`
/// packet (`tcp_v4_send_check`, `udp4_hwcsum`, and their IPv6 twins). Only when the field
/// holds exactly that value is the packet summed (one pass): if it verifies as is it stays,
/// else the field gets the complement of the sum. Every other packet costs a pseudo-header
/// sum and a compare; bad checksums of any other kind are left for the kernel to drop.
/// IPv4 fragments, IPv6 extension headers and zero UDP checksums (IPv4: none) are left
/// alone. `packet` is one IP packet, trimmed to its length (as [`super::decap`] delivers).
#[inline]
pub fn finish_rx_checksum(packet: &mut [u8]) -> RxChecksum {
    let Some((l4_start, proto, v6)) = rx_transport(packet) else {
        return RxChecksum::Untouched;
    };
    let field_at = match proto {
        IpProtocol::Tcp => tcp::CHECKSUM_OFFSET,
        _ => udp::CHECKSUM_OFFSET,
    };
    let (addrs, rest) = packet.split_at_mut(l4_start);
    let l4_len = rest.len();
    let min = if proto == IpProtocol::Tcp {
        tcp::HEADER_LEN
    } else {
        udp::HEADER_LEN
    };
    if l4_len < min || l4_len > usize::from(u16::MAX) {
        return RxChecksum::Untouched;
    }
    if proto == IpProtocol::Udp && usize::from(u16::from_be_bytes([rest[4], rest[5]])) != l4_len {
        return RxChecksum::Untouched;
    }
    let addr_bytes = if v6 {
        addrs.get(8..40)
    } else {
        addrs.get(12..20)
    };
    let Some(addr_bytes) = addr_bytes else {
        return RxChecksum::Untouched;
    };
    let ph = checksum::add(
        checksum::sum(addr_bytes),
        checksum::add(u8::from(proto).into(), l4_len as u16),
    );
    let field = u16::from_be_bytes([rest[field_at], rest[field_at + 1]]);
    if field != ph {
        return RxChecksum::Untouched;
    }
    let s = checksum::sum(rest);
    if checksum::add(ph, s) == 0xffff {
        return RxChecksum::Valid;
    }
    let c = match !s {
        0 => 0xffff,
        c => c,
    };
    rest[field_at..field_at + 2].copy_from_slice(&c.to_be_bytes());
    RxChecksum::Completed
}

/// The virtio header that hands a received TCP super-packet longer than `mtu` to the kernel
/// as TSO, or None if `packet` is not one.
///
/// A kernel VXLAN sender whose underlay link keeps GSO on (veth, as in kind) puts a whole TCP
/// super-packet of up to 64 KB in one datagram, its checksum unfinished; written to TUN as
/// is it exceeds the MTU and is dropped when forwarded. With this header (`GSO_TCPV4`/`V6`,
/// `gso_size` = what fits `mtu` after its headers, `F_NEEDS_CSUM`) the kernel keeps it as
/// one packet and segments it only where it must. The checksum field must then hold the
/// pseudo-header sum: kept if it does (the sender's unfinished checksum), set if the
/// checksum verifies in full; a packet with any other checksum gets None (delivered as is,
/// for the kernel to drop).
pub fn rx_super_packet(packet: &mut [u8], mtu: usize) -> Option<VirtioNetHdr> {
    if packet.len() <= mtu {
        return None;
    }
    let (l4_start, proto, v6) = rx_transport(packet)?;
    if proto != IpProtocol::Tcp {
        return None;
    }
    let l4 = packet.get(l4_start..)?;
    let thl = usize::from(*l4.get(12)? >> 4) * 4;
    let hdrs = l4_start + thl;
    if thl < tcp::HEADER_LEN || hdrs >= packet.len() || hdrs >= mtu {
        return None;
    }
    let addr_bytes = if v6 {
        packet.get(8..40)?
    } else {
        packet.get(12..20)?
    };
    let l4_len = packet.len() - l4_start;
    let ph = checksum::add(
        checksum::sum(addr_bytes),
        checksum::add(
            u8::from(IpProtocol::Tcp).into(),
            u16::try_from(l4_len).ok()?,
        ),
    );
    let at = l4_start + tcp::CHECKSUM_OFFSET;
    let field = u16::from_be_bytes([packet[at], packet[at + 1]]);
    if field != ph {
        if checksum::add(ph, checksum::sum(&packet[l4_start..])) != 0xffff {
            return None;
        }
        packet[at..at + 2].copy_from_slice(&ph.to_be_bytes());
    }
    Some(VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: if v6 {
            VirtioNetHdr::GSO_TCPV6
        } else {
            VirtioNetHdr::GSO_TCPV4
        },
        hdr_len: hdrs as u16,
        gso_size: u16::try_from(mtu - hdrs).ok()?,
        csum_start: l4_start as u16,
        csum_offset: tcp::CHECKSUM_OFFSET as u16,
    })
}

/// The transport header's offset and protocol of an unfragmented IPv4 or extension-free IPv6
/// packet carrying TCP or UDP whose length fields match `p`'s length, and whether it is IPv6.
#[inline]
fn rx_transport(p: &[u8]) -> Option<(usize, IpProtocol, bool)> {
    let (start, proto, total) = match p.first()? >> 4 {
        4 => {
            let h = p.get(..ipv4::HEADER_LEN)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0;
            if fragment || ihl < ipv4::HEADER_LEN {
                return None;
            }
            (ihl, h[9], usize::from(u16::from_be_bytes([h[2], h[3]])))
        }
        6 => {
            let h = p.get(..ipv6::HEADER_LEN)?;
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            (ipv6::HEADER_LEN, h[6], ipv6::HEADER_LEN + plen)
        }
        _ => return None,
    };
    let proto = IpProtocol::from(proto);
    if total != p.len() || start > total || !matches!(proto, IpProtocol::Tcp | IpProtocol::Udp) {
        return None;
    }
    Some((start, proto, p[0] >> 4 == 6))
}

/// Where [`gso_split`] put the segments in its arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    count: usize,
    stride: usize,
    headroom: usize,
    last_len: usize,
}

impl Segments {
    /// Number of segments.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if there are none (never the case after a successful split).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Distance between the starts of consecutive segments. With a headroom of
    /// [`super::VXLAN_HEADROOM`] it is also the length of every encapsulated frame but the
    /// last, i.e. the UDP GSO segment size.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The IP packet of segment `i` in the arena (`headroom` free bytes precede it).
    pub fn packet(&self, i: usize) -> Option<Range<usize>> {
        if i >= self.count {
            return None;
        }
        let start = i * self.stride + self.headroom;
        let len = if i + 1 == self.count {
            self.last_len
        } else {
            self.stride - self.headroom
        };
        Some(start..start + len)
    }

    /// Every segment's packet range, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.count).filter_map(|i| self.packet(i))
    }
}

/// Where the headers of a super-packet are.
#[derive(Debug, Clone, Copy)]
struct Layout {
    v4: bool,
    tcp: bool,
    /// IP header length.
    ip_len: usize,
    /// IP + transport header length.
    hdrs: usize,
    /// Packet length according to the IP header.
    total: usize,
    src: IpAddr,
    dst: IpAddr,
}

/// IPv6 extension headers (hop-by-hop, routing, fragment, ESP, AH, destination options).
fn is_ipv6_ext(nh: IpProtocol) -> bool {
    matches!(u8::from(nh), 0 | 43 | 44 | 50 | 51 | 60)
}

fn layout(input: &[u8], kind: GsoKind) -> Result<Layout, DropReason> {
    let want = match kind {
        GsoKind::TcpV4 | GsoKind::TcpV6 => IpProtocol::Tcp,
        GsoKind::UdpL4 => IpProtocol::Udp,
        GsoKind::None | GsoKind::Other(_) => return Err(DropReason::UnsupportedGso),
    };
    let (v4, ip_len, total, proto, src, dst) = match input.first().map(|b| b >> 4) {
        Some(4) if kind != GsoKind::TcpV6 => {
            let p = ipv4::Packet::new_checked(input).map_err(DropReason::from_wire)?;
            if p.more_frags() || p.frag_offset() != 0 {
                return Err(DropReason::BadOffload);
            }
            let t = usize::from(p.total_len());
            (
                true,
                p.header_len(),
                t,
                p.next_header(),
                p.src_addr().into(),
                p.dst_addr().into(),
            )
        }
        Some(6) if kind != GsoKind::TcpV4 => {
            let p = ipv6::Packet::new_checked(input).map_err(DropReason::from_wire)?;
            if is_ipv6_ext(p.next_header()) {
                return Err(DropReason::UnsupportedGso);
            }
            let t = p.total_len();
            (
                false,
                ipv6::HEADER_LEN,
                t,
                p.next_header(),
                p.src_addr().into(),
                p.dst_addr().into(),
            )
        }
        None => return Err(DropReason::Truncated),
        Some(4 | 6) => return Err(DropReason::BadOffload),
        Some(_) => return Err(DropReason::MalformedIp),
    };
    if proto != want {
        return Err(DropReason::BadOffload);
    }
    let l4 = input.get(ip_len..total).ok_or(DropReason::Truncated)?;
    let l4_len = if want == IpProtocol::Tcp {
        tcp::Packet::new_checked(l4).map_err(|e| match e {
            crate::wire::WireError::Truncated { .. } => DropReason::Truncated,
            _ => DropReason::BadOffload,
        })?;
        tcp::Packet::new_unchecked(l4).header_len()
    } else {
        if l4.len() < udp::HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        udp::HEADER_LEN
    };
    Ok(Layout {
        v4,
        tcp: want == IpProtocol::Tcp,
        ip_len,
        hdrs: ip_len + l4_len,
        total,
        src,
        dst,
    })
}

/// Splits a TSO (TCPv4/TCPv6) or USO (UDP) super-packet `input` (the IP packet after its
/// [`VirtioNetHdr`]) into segments of `hdr.gso_size` payload bytes each.
///
/// `out` is cleared and filled with the segments, each preceded by `headroom` zero bytes, at
/// a fixed [`Segments::stride`]. Each segment gets a copy of the IP and transport headers
/// (IPv4 options and TCP options included) with: IPv4 total length, ID incremented per
/// segment and header checksum; IPv6 payload length; TCP sequence number advanced, FIN and
/// PSH only on the last segment, CWR only on the first; UDP length; and a full transport
/// checksum. A packet without GSO (`GSO_NONE`) is copied as one segment, its partial checksum
/// completed if `F_NEEDS_CSUM` is set. `out` keeps its capacity across calls, so a reused
/// arena does not allocate.
pub fn gso_split(
    input: &[u8],
    hdr: &VirtioNetHdr,
    out: &mut Vec<u8>,
    headroom: usize,
) -> Result<Segments, DropReason> {
    out.clear();
    let kind = hdr.gso_kind();
    if kind == GsoKind::None {
        out.resize(headroom, 0);
        out.extend_from_slice(input);
        if hdr.needs_csum() {
            let packet = out.get_mut(headroom..).unwrap_or(&mut []);
            complete_partial_checksum(packet, hdr.csum_start.into(), hdr.csum_offset.into())?;
        }
        return Ok(Segments {
            count: 1,
            stride: headroom + input.len(),
            headroom,
            last_len: input.len(),
        });
    }
    let l = layout(input, kind)?;
    let gso = usize::from(hdr.gso_size);
    if gso == 0 || l.hdrs + gso > usize::from(u16::MAX) {
        return Err(DropReason::BadOffload);
    }
    let (headers, payload) = match (input.get(..l.hdrs), input.get(l.hdrs..l.total)) {
        (Some(h), Some(p)) => (h, p),
        _ => return Err(DropReason::Truncated),
    };
    let count = payload.len().div_ceil(gso).max(1);
    if count > MAX_SEGMENTS {
        return Err(DropReason::TooManySegments);
    }
    let stride = headroom + l.hdrs + gso;
    out.reserve(count * stride);
    let (ident, seq) = first_ident_seq(headers, &l);
    let mut chunks = payload.chunks(gso);
    for i in 0..count {
        let chunk = chunks.next().unwrap_or(&[]);
        let seg_start = out.len();
        out.resize(seg_start + headroom, 0);
        out.extend_from_slice(headers);
        out.extend_from_slice(chunk);
        let seg = out.get_mut(seg_start + headroom..).unwrap_or(&mut []);
        fix_segment(seg, &l, i, count, ident, seq.wrapping_add((i * gso) as u32));
    }
    Ok(Segments {
        count,
        stride,
        headroom,
        last_len: l.hdrs + payload.len() - (count - 1) * gso,
    })
}

/// The super-packet's IPv4 ID and TCP sequence number (zero where absent).
fn first_ident_seq(headers: &[u8], l: &Layout) -> (u16, u32) {
    let ident = if l.v4 {
        ipv4::Packet::new_unchecked(headers).ident()
    } else {
        0
    };
    let seq = match headers.get(l.ip_len..) {
        Some(t) if l.tcp && t.len() >= tcp::HEADER_LEN => {
            tcp::Packet::new_unchecked(t).seq_number()
        }
        _ => 0,
    };
    (ident, seq)
}

/// Rewrites the headers of segment `i` of `count` in place (`seg` = IP header onward).
fn fix_segment(seg: &mut [u8], l: &Layout, i: usize, count: usize, ident: u16, seq: u32) {
    let len = seg.len();
    if seg.len() < l.hdrs {
        return;
    }
    if l.v4 {
        let mut ip = ipv4::Packet::new_unchecked(&mut *seg);
        ip.set_total_len(len as u16);
        ip.set_ident(ident.wrapping_add(i as u16));
        ip.fill_checksum();
    } else {
        ipv6::Packet::new_unchecked(&mut *seg).set_payload_len((len - ipv6::HEADER_LEN) as u16);
    }
    let l4 = &mut seg[l.ip_len..];
    if l.tcp {
        let mut t = tcp::Packet::new_unchecked(l4);
        t.set_seq_number(seq);
        let mut flags = t.flags();
        if i + 1 != count {
            flags = flags.without(tcp::TcpFlags::FIN | tcp::TcpFlags::PSH);
        }
        if i != 0 {
            flags = flags.without(tcp::TcpFlags::CWR);
        }
        t.set_flags(flags);
        t.fill_checksum(&l.src, &l.dst);
    } else {
        let mut u = udp::Packet::new_unchecked(l4);
        u.set_len((len - l.ip_len) as u16);
        u.fill_checksum(&l.src, &l.dst);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn hdr_bytes_round_trip() {
        let h = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_ECN,
            hdr_len: 66,
            gso_size: 1398,
            csum_start: 20,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 66, 0, 0x76, 0x05, 20, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b), Ok(h));
        assert_eq!(h.gso_kind(), GsoKind::TcpV4);
        assert!(h.needs_csum());
        assert_eq!(VirtioNetHdr::parse(&b[..9]), Err(DropReason::Truncated));
        let mut out = [0u8; 12];
        h.emit(&mut out).unwrap();
        assert_eq!(&out[..10], &b);
        assert_eq!(h.emit(&mut out[..9]), Err(DropReason::Truncated));
        let kinds = [
            (0, GsoKind::None),
            (4, GsoKind::TcpV6),
            (5, GsoKind::UdpL4),
            (3, GsoKind::Other(3)),
        ];
        for (t, k) in kinds {
            assert_eq!(VirtioNetHdr { gso_type: t, ..h }.gso_kind(), k);
        }
    }

    /// An IPv4 packet with the pseudo-header sum in its transport checksum field, as the kernel
    /// hands out CHECKSUM_PARTIAL packets.
    fn partial_v4(proto: u8, l4: &[u8], csum_off: usize) -> Vec<u8> {
        let s = Ipv4Addr::new(10, 244, 1, 5);
        let d = Ipv4Addr::new(10, 244, 2, 7);
        let mut p = ipv4_packet(s, d, proto, l4);
        let ph = checksum::pseudo_header(&s.into(), &d.into(), proto, l4.len() as u32);
        p[20 + csum_off..22 + csum_off].copy_from_slice(&ph.to_be_bytes());
        p
    }

    #[test]
    fn completes_partial_tcp_and_udp_checksums() {
        let mut tcp_seg = vec![0u8; 20];
        tcp_seg[12] = 0x50;
        tcp_seg.extend_from_slice(b"some payload, odd length");
        let mut p = partial_v4(6, &tcp_seg, 16);
        complete_partial_checksum(&mut p, 20, 16).unwrap();
        let (s, d) = (IpAddr::from([10, 244, 1, 5]), IpAddr::from([10, 244, 2, 7]));
        assert!(tcp::Packet::new_checked(&p[20..])
            .unwrap()
            .verify_checksum(&s, &d));
        let mut u = vec![0x12, 0x34, 0x00, 0x35, 0, 0, 0, 0];
        u.extend_from_slice(b"dns?");
        let ul = u.len() as u16;
        u[4..6].copy_from_slice(&ul.to_be_bytes());
        let mut p = partial_v4(17, &u, 6);
        complete_partial_checksum(&mut p, 20, 6).unwrap();
        let up = udp::Packet::new_checked(&p[20..]).unwrap();
        assert!(up.verify_checksum(&s, &d));
        assert_ne!(up.checksum(), 0);
    }

    #[test]
    fn partial_checksum_bounds() {
        let mut p = vec![0u8; 40];
        assert_eq!(
            complete_partial_checksum(&mut p, 20, 19),
            Err(DropReason::BadOffload)
        );
        assert_eq!(
            complete_partial_checksum(&mut p, 41, 0),
            Err(DropReason::BadOffload)
        );
        assert_eq!(
            complete_partial_checksum(&mut p, usize::MAX, 2),
            Err(DropReason::BadOffload)
        );
        assert_eq!(complete_partial_checksum(&mut p, 20, 18), Ok(()));
        assert_eq!(&p[38..40], &[0xff, 0xff], "zero sum stored as 0xffff");
    }

    /// A TCP (6) or UDP (17) packet, IPv4 or IPv6, with a valid checksum over `payload`.
    fn finished(v6: bool, proto: u8, payload: &[u8]) -> (Vec<u8>, IpAddr, IpAddr) {
        let mut l4 = if proto == 6 {
            let mut t = vec![0u8; 20];
            t[..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
            t[12] = 0x50;
            t[13] = 0x18;
            t
        } else {
            let mut u = vec![0x30, 0x39, 0x00, 0x35, 0, 0, 0, 0];
            let ul = (8 + payload.len()) as u16;
            u[4..6].copy_from_slice(&ul.to_be_bytes());
            u
        };
        l4.extend_from_slice(payload);
        let (mut p, s, d, ip_len): (Vec<u8>, IpAddr, IpAddr, usize) = if v6 {
            let (s, d) = v6addrs();
            (ipv6_packet(s, d, proto, &l4), s.into(), d.into(), 40)
        } else {
            (ipv4_packet(S4, D4, proto, &l4), S4.into(), D4.into(), 20)
        };
        if proto == 6 {
            tcp::Packet::new_unchecked(&mut p[ip_len..]).fill_checksum(&s, &d);
        } else {
            udp::Packet::new_unchecked(&mut p[ip_len..]).fill_checksum(&s, &d);
        }
        (p, s, d)
    }

    /// `p` with its transport checksum field replaced by the pseudo-header sum, as a sender's
    /// checksum offload leaves it; and the field's offset.
    fn unfinished(p: &[u8], s: IpAddr, d: IpAddr) -> (Vec<u8>, usize) {
        let v6 = p[0] >> 4 == 6;
        let ip_len = if v6 { 40 } else { 20 };
        let proto = if v6 { p[6] } else { p[9] };
        let at = ip_len + if proto == 6 { 16 } else { 6 };
        let ph = checksum::pseudo_header(&s, &d, proto, (p.len() - ip_len) as u32);
        let mut q = p.to_vec();
        q[at..at + 2].copy_from_slice(&ph.to_be_bytes());
        (q, at)
    }

    fn transport_verifies(p: &[u8], s: IpAddr, d: IpAddr) -> bool {
        let v6 = p[0] >> 4 == 6;
        let (ip_len, proto) = if v6 { (40, p[6]) } else { (20, p[9]) };
        if proto == 6 {
            tcp::Packet::new_checked(&p[ip_len..])
                .unwrap()
                .verify_checksum(&s, &d)
        } else {
            let u = udp::Packet::new_checked(&p[ip_len..]).unwrap();
            u.checksum() != 0 && u.verify_checksum(&s, &d)
        }
    }

    proptest! {
        /// TX completion (the path of every pure ACK a pod sends through TUN) against RFC
        /// 1071's plain loop, on ACK-sized and larger segments with any header bytes: the
        /// pseudo-header bytes plus the completed segment must sum to 0xffff.
        #[test]
        fn tx_completion_matches_the_reference_sum(
            v6 in any::<bool>(),
            seg in proptest::collection::vec(any::<u8>(), 20..1600),
            addrs in any::<[u8; 32]>(),
        ) {
            use crate::wire::checksum::tests::naive_sum;
            let mut seg = seg;
            seg[12] = 0x50;
            let (s, d): (IpAddr, IpAddr) = if v6 {
                let s: [u8; 16] = addrs[..16].try_into().unwrap();
                let d: [u8; 16] = addrs[16..].try_into().unwrap();
                (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
            } else {
                let s: [u8; 4] = addrs[..4].try_into().unwrap();
                let d: [u8; 4] = addrs[4..8].try_into().unwrap();
                (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into())
            };
            let mut p = match (s, d) {
                (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, 6, &seg),
                (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, 6, &seg),
                _ => unreachable!(),
            };
            let ip_len = if v6 { 40 } else { 20 };
            let ph = checksum::pseudo_header(&s, &d, 6, seg.len() as u32);
            p[ip_len + 16..ip_len + 18].copy_from_slice(&ph.to_be_bytes());
            complete_partial_checksum(&mut p, ip_len, 16).unwrap();
            let mut bytes = Vec::new();
            match (s, d) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    bytes.extend_from_slice(&s.octets());
                    bytes.extend_from_slice(&d.octets());
                    bytes.extend_from_slice(&[0, 6]);
                    bytes.extend_from_slice(&(seg.len() as u16).to_be_bytes());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    bytes.extend_from_slice(&s.octets());
                    bytes.extend_from_slice(&d.octets());
                    bytes.extend_from_slice(&(seg.len() as u32).to_be_bytes());
                    bytes.extend_from_slice(&[0, 0, 0, 6]);
                }
                _ => unreachable!(),
            }
            bytes.extend_from_slice(&p[ip_len..]);
            prop_assert_eq!(naive_sum(&bytes), 0xffff);
        }
    }

    #[test]
    fn rx_completes_unfinished_tcp_and_udp_v4_v6() {
        for v6 in [false, true] {
            for proto in [6u8, 17] {
                let (good, s, d) = finished(v6, proto, b"hello, partial checksum!!");
                let (mut p, at) = unfinished(&good, s, d);
                assert!(!transport_verifies(&p, s, d));
                assert_eq!(finish_rx_checksum(&mut p), RxChecksum::Completed);
                assert!(transport_verifies(&p, s, d), "v6={v6} proto={proto}");
                assert_eq!(p[..at], good[..at]);
                assert_eq!(p[at + 2..], good[at + 2..]);
                // Finished now: a second pass leaves it alone.
                let again = p.clone();
                assert_ne!(finish_rx_checksum(&mut p), RxChecksum::Completed);
                assert_eq!(p, again);
            }
        }
    }

    #[test]
    fn rx_leaves_valid_bad_and_foreign_packets_alone() {
        for v6 in [false, true] {
            for proto in [6u8, 17] {
                let (good, s, d) = finished(v6, proto, b"payload");
                let mut p = good.clone();
                assert_eq!(finish_rx_checksum(&mut p), RxChecksum::Untouched);
                assert_eq!(p, good);
                // Any other bad checksum: delivered unchanged for the kernel to drop.
                let mut bad = good.clone();
                *bad.last_mut().unwrap() ^= 0x40;
                let before = bad.clone();
                assert_eq!(finish_rx_checksum(&mut bad), RxChecksum::Untouched);
                assert_eq!(bad, before);
                assert!(!transport_verifies(&bad, s, d));
                // Unfinished but cut short or padded: the length no longer matches, untouched.
                let (part, _) = unfinished(&good, s, d);
                let mut short = part[..part.len() - 1].to_vec();
                assert_eq!(finish_rx_checksum(&mut short), RxChecksum::Untouched);
            }
        }
        // IPv4 UDP without a checksum (zero) stays without one.
        let (mut p, _, _) = finished(false, 17, b"x");
        p[26..28].fill(0);
        let before = p.clone();
        assert_eq!(finish_rx_checksum(&mut p), RxChecksum::Untouched);
        assert_eq!(p, before);
        // A fragment's checksum covers the whole datagram: never touched.
        let (good, s, d) = finished(false, 6, b"fragment");
        let (mut frag, _) = unfinished(&good, s, d);
        frag[6] = 0x20; // MF
        ipv4::Packet::new_unchecked(&mut frag[..]).fill_checksum();
        let before = frag.clone();
        assert_eq!(finish_rx_checksum(&mut frag), RxChecksum::Untouched);
        assert_eq!(frag, before);
        // ICMP, garbage, empty.
        let mut icmp = ipv4_packet(S4, D4, 1, &[8, 0, 0, 0]);
        assert_eq!(finish_rx_checksum(&mut icmp), RxChecksum::Untouched);
        assert_eq!(finish_rx_checksum(&mut []), RxChecksum::Untouched);
        assert_eq!(finish_rx_checksum(&mut [0x45; 30]), RxChecksum::Untouched);
    }

    #[test]
    fn rx_keeps_a_finished_checksum_that_equals_the_pseudo_header_sum() {
        // Choose two payload bytes so that the finished checksum is the pseudo-header sum.
        let (good, s, d) = finished(false, 6, &[0u8; 12]);
        let (mut p, at) = unfinished(&good, s, d);
        let ph = u16::from_be_bytes([p[at], p[at + 1]]);
        let w = !checksum::add(ph, checksum::sum(&p[20..]));
        p[40..42].copy_from_slice(&w.to_be_bytes());
        assert!(transport_verifies(&p, s, d));
        let before = p.clone();
        assert_eq!(finish_rx_checksum(&mut p), RxChecksum::Valid);
        assert_eq!(p, before);
    }

    proptest! {
        #[test]
        fn rx_completion_matches_a_sender_that_finished_it(
            v6 in any::<bool>(),
            tcp_proto in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            let proto = if tcp_proto { 6 } else { 17 };
            let (good, s, d) = finished(v6, proto, &payload);
            let (mut p, at) = unfinished(&good, s, d);
            let r = finish_rx_checksum(&mut p);
            prop_assert!(r == RxChecksum::Completed || r == RxChecksum::Valid);
            prop_assert!(transport_verifies(&p, s, d));
            // Same bytes as the sender's finished packet (0 and 0xffff are the same sum).
            let norm = |x: &[u8]| match u16::from_be_bytes([x[at], x[at + 1]]) { 0 => 0xffff, c => c };
            prop_assert_eq!(norm(&p), norm(&good));
            prop_assert_eq!(&p[..at], &good[..at]);
            prop_assert_eq!(&p[at + 2..], &good[at + 2..]);
        }

        #[test]
        fn rx_never_changes_a_packet_it_does_not_complete(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            v in prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()],
            corrupt in any::<(usize, u8)>(),
        ) {
            let mut p = bytes;
            if let Some(b) = p.first_mut() { *b = v; }
            if !p.is_empty() {
                let i = corrupt.0 % p.len();
                p[i] ^= corrupt.1;
            }
            let before = p.clone();
            match finish_rx_checksum(&mut p) {
                RxChecksum::Completed => {
                    prop_assert_eq!(p.len(), before.len());
                    prop_assert_eq!(p.iter().zip(&before).filter(|(a, b)| a != b).count() <= 2, true);
                }
                _ => prop_assert_eq!(p, before),
            }
        }
    }

    #[derive(Debug, Clone)]
    struct Tso {
        v6: bool,
        ip_opts: usize,
        tcp_opts: usize,
        seq: u32,
        ident: u16,
        flags: u8,
        payload: Vec<u8>,
        gso: u16,
    }

    impl Tso {
        /// A super-packet without IP or TCP options, sequence number and IPv4 ID 1.
        fn plain(v6: bool, flags: u8, payload: Vec<u8>, gso: u16) -> Tso {
            Tso {
                v6,
                ip_opts: 0,
                tcp_opts: 0,
                seq: 1,
                ident: 1,
                flags,
                payload,
                gso,
            }
        }
    }

    fn arb_tso() -> impl Strategy<Value = Tso> {
        (
            any::<bool>(),
            0usize..=10,
            0usize..=10,
            any::<u32>(),
            any::<u16>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..9000),
            8u16..1500,
        )
            .prop_map(|(v6, io, to, seq, ident, flags, payload, gso)| Tso {
                v6,
                ip_opts: if v6 { 0 } else { io * 4 },
                tcp_opts: to * 4,
                seq,
                ident,
                flags,
                payload,
                gso,
            })
    }

    const S4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const D4: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);

    fn v6addrs() -> (Ipv6Addr, Ipv6Addr) {
        (
            "fd10:244:1::5".parse().unwrap(),
            "fd10:244:2::7".parse().unwrap(),
        )
    }

    /// Builds the super-packet and its virtio header.
    fn build(t: &Tso) -> (Vec<u8>, VirtioNetHdr) {
        let mut l4 = vec![0u8; 20 + t.tcp_opts];
        {
            let mut p = tcp::Packet::new_unchecked(&mut l4[..]);
            p.set_src_port(40000);
            p.set_dst_port(5201);
            p.set_seq_number(t.seq);
            p.set_ack_number(0xdead_beef);
            p.set_header_len(20 + t.tcp_opts);
            p.set_flags(tcp::TcpFlags(t.flags));
            p.set_window_len(502);
            p.set_urgent_ptr(0);
        }
        for (i, b) in l4[20..].iter_mut().enumerate() {
            *b = 1 + (i as u8 % 3); // NOP-ish option bytes
        }
        l4.extend_from_slice(&t.payload);
        let mut p = if t.v6 {
            let (s, d) = v6addrs();
            ipv6_packet(s, d, 6, &l4)
        } else {
            let mut p = vec![0u8; 20 + t.ip_opts];
            p.extend_from_slice(&l4);
            let total = p.len() as u16;
            let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
            ip.set_version(4);
            ip.set_header_len(20 + t.ip_opts);
            ip.set_total_len(total);
            ip.set_ident(t.ident);
            ip.set_frag(true, false, 0);
            ip.set_hop_limit(64);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr(S4);
            ip.set_dst_addr(D4);
            for b in &mut p[20..20 + t.ip_opts] {
                *b = 1; // NOP options
            }
            ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
            p
        };
        let ip_len = if t.v6 { 40 } else { 20 + t.ip_opts };
        // Garbage in the checksum field: the split must not depend on it.
        p[ip_len + 16] = 0x5a;
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: if t.v6 {
                VirtioNetHdr::GSO_TCPV6
            } else {
                VirtioNetHdr::GSO_TCPV4
            },
            hdr_len: (ip_len + 20 + t.tcp_opts) as u16,
            gso_size: t.gso,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        (p, hdr)
    }

    proptest! {
        #[test]
        fn tso_split_reassembles_and_verifies(t in arb_tso(), headroom in prop_oneof![Just(22usize), 0usize..40]) {
            let (input, hdr) = build(&t);
            let mut arena = vec![0xcc; 7];
            let segs = gso_split(&input, &hdr, &mut arena, headroom).unwrap();
            let gso = usize::from(t.gso);
            let want = t.payload.len().div_ceil(gso).max(1);
            prop_assert_eq!(segs.len(), want);
            let ip_len = if t.v6 { 40 } else { 20 + t.ip_opts };
            let hdrs = ip_len + 20 + t.tcp_opts;
            let mut joined = Vec::new();
            let (s, d): (IpAddr, IpAddr) = if t.v6 {
                let (s, d) = v6addrs();
                (s.into(), d.into())
            } else {
                (S4.into(), D4.into())
            };
            for (i, r) in segs.iter().enumerate() {
                prop_assert_eq!(r.start, i * segs.stride() + headroom);
                prop_assert!(arena[r.start - headroom..r.start].iter().all(|b| *b == 0));
                let seg = &arena[r.clone()];
                let last = i + 1 == segs.len();
                if !last {
                    prop_assert_eq!(seg.len(), hdrs + gso);
                }
                // IP header.
                if t.v6 {
                    let p = ipv6::Packet::new_checked(seg).unwrap();
                    prop_assert_eq!(p.total_len(), seg.len());
                    prop_assert_eq!(&seg[..4], &input[..4]);
                    prop_assert_eq!(&seg[6..40], &input[6..40]);
                } else {
                    let p = ipv4::Packet::new_checked(seg).unwrap();
                    prop_assert_eq!(usize::from(p.total_len()), seg.len());
                    prop_assert_eq!(p.ident(), t.ident.wrapping_add(i as u16));
                    prop_assert!(verifies(&seg[..ip_len]), "IPv4 header checksum");
                    prop_assert_eq!(&seg[6..10], &input[6..10]);
                    prop_assert_eq!(&seg[12..ip_len], &input[12..ip_len]);
                }
                // TCP header.
                let tp = tcp::Packet::new_checked(&seg[ip_len..]).unwrap();
                prop_assert_eq!(tp.seq_number(), t.seq.wrapping_add((i * gso) as u32));
                let mut f = t.flags;
                if !last { f &= !(0x01 | 0x08); }
                if i != 0 { f &= !0x80; }
                prop_assert_eq!(tp.flags().0, f);
                prop_assert_eq!(&seg[ip_len + 8..ip_len + 13], &input[ip_len + 8..ip_len + 13]);
                prop_assert_eq!(&seg[ip_len + 14..ip_len + 16], &input[ip_len + 14..ip_len + 16]);
                prop_assert_eq!(&seg[ip_len + 18..hdrs], &input[ip_len + 18..hdrs]);
                // Naive checksum: pseudo-header bytes + segment.
                let mut ph = Vec::new();
                match (s, d) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        ph.extend_from_slice(&s.octets());
                        ph.extend_from_slice(&d.octets());
                        ph.extend_from_slice(&[0, 6]);
                        ph.extend_from_slice(&((seg.len() - ip_len) as u16).to_be_bytes());
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        ph.extend_from_slice(&s.octets());
                        ph.extend_from_slice(&d.octets());
                        ph.extend_from_slice(&((seg.len() - ip_len) as u32).to_be_bytes());
                        ph.extend_from_slice(&[0, 0, 0, 6]);
                    }
                    _ => unreachable!(),
                }
                ph.extend_from_slice(&seg[ip_len..]);
                prop_assert!(verifies(&ph), "TCP checksum of segment {}", i);
                joined.extend_from_slice(&seg[hdrs..]);
            }
            prop_assert_eq!(joined, t.payload);
        }

        #[test]
        fn uso_split_verifies(payload in proptest::collection::vec(any::<u8>(), 1..5000),
                              gso in 4u16..1400, v6 in any::<bool>()) {
            let mut u = vec![0x30, 0x39, 0x14, 0x51, 0, 0, 0, 0];
            u.extend_from_slice(&payload);
            let ul = u.len() as u16;
            u[4..6].copy_from_slice(&ul.to_be_bytes());
            let (input, s, d): (Vec<u8>, IpAddr, IpAddr) = if v6 {
                let (s, d) = v6addrs();
                (ipv6_packet(s, d, 17, &u), s.into(), d.into())
            } else {
                (ipv4_packet(S4, D4, 17, &u), S4.into(), D4.into())
            };
            let hdr = VirtioNetHdr { flags: 1, gso_type: VirtioNetHdr::GSO_UDP_L4, hdr_len: 0, gso_size: gso,
                                     csum_start: 0, csum_offset: 6 };
            let mut arena = Vec::new();
            let segs = gso_split(&input, &hdr, &mut arena, 22).unwrap();
            let ip_len = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for r in segs.iter() {
                let seg = &arena[r];
                let up = udp::Packet::new_checked(&seg[ip_len..]).unwrap();
                prop_assert_eq!(usize::from(up.len()), seg.len() - ip_len);
                prop_assert!(up.verify_checksum(&s, &d));
                prop_assert_ne!(up.checksum(), 0);
                joined.extend_from_slice(up.payload());
            }
            prop_assert_eq!(joined, payload);
        }

        #[test]
        fn garbage_never_panics(hdr in any::<[u8; 10]>(), bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                v in prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()]) {
            let mut bytes = bytes;
            if let Some(b) = bytes.first_mut() { *b = v; }
            let h = VirtioNetHdr::parse(&hdr).unwrap();
            let mut arena = Vec::new();
            if let Ok(segs) = gso_split(&bytes, &h, &mut arena, 22) {
                for r in segs.iter() {
                    prop_assert!(r.end <= arena.len());
                }
            }
            let _ = complete_partial_checksum(&mut bytes, h.csum_start.into(), h.csum_offset.into());
        }
    }

    proptest! {
        #[test]
        fn rx_super_packets_become_tso_that_splits_into_valid_segments(
            t in arb_tso(), mtu in 576usize..9000, finished_csum in any::<bool>(),
        ) {
            let (mut p, _) = build(&t);
            let ip_len = if t.v6 { 40 } else { 20 + t.ip_opts };
            let hdrs = ip_len + 20 + t.tcp_opts;
            let (s, d): (IpAddr, IpAddr) = if t.v6 {
                let (s, d) = v6addrs();
                (s.into(), d.into())
            } else {
                (S4.into(), D4.into())
            };
            // As the sender left it (pseudo-header sum), or finished.
            let ph = checksum::pseudo_header(&s, &d, 6, (p.len() - ip_len) as u32);
            p[ip_len + 16..ip_len + 18].copy_from_slice(&ph.to_be_bytes());
            if finished_csum {
                complete_partial_checksum(&mut p, ip_len, 16).unwrap();
            }
            let got = rx_super_packet(&mut p, mtu);
            if p.len() <= mtu {
                prop_assert_eq!(got, None);
                return Ok(());
            }
            let hdr = got.unwrap();
            prop_assert_eq!(usize::from(hdr.hdr_len), hdrs);
            prop_assert_eq!(&p[ip_len + 16..ip_len + 18], &ph.to_be_bytes()[..]);
            // What the kernel does with it: every segment fits the MTU and verifies.
            let mut arena = Vec::new();
            let segs = gso_split(&p, &hdr, &mut arena, 0).unwrap();
            let mut joined = Vec::new();
            for r in segs.iter() {
                let seg = &arena[r];
                prop_assert!(seg.len() <= mtu);
                prop_assert!(tcp::Packet::new_checked(&seg[ip_len..]).unwrap().verify_checksum(&s, &d));
                joined.extend_from_slice(&seg[hdrs..]);
            }
            prop_assert_eq!(joined, t.payload);
        }
    }

    #[test]
    fn rx_super_packet_refuses_what_it_cannot_hand_over() {
        let t = Tso::plain(false, 0x10, vec![7; 5000], 1000);
        let (mut p, _) = build(&t);
        // A bad checksum that is not the pseudo-header sum: left for the kernel to drop.
        p[36..38].copy_from_slice(&[0x12, 0x34]);
        let before = p.clone();
        assert_eq!(rx_super_packet(&mut p, 1450), None);
        assert_eq!(p, before);
        // Fits the MTU: not a super-packet.
        assert_eq!(rx_super_packet(&mut p, 9000), None);
        // UDP is not handed over as TSO.
        let (mut u, _, _) = finished(false, 17, &[1; 3000]);
        assert_eq!(rx_super_packet(&mut u, 1450), None);
        // Headers as large as the MTU.
        let (mut q, _) = build(&t);
        assert_eq!(rx_super_packet(&mut q, 40), None);
    }

    #[test]
    fn rejects_inconsistent_headers() {
        let t = Tso::plain(false, 0x18, vec![1; 3000], 1000);
        let (input, hdr) = build(&t);
        let mut arena = Vec::new();
        let split = |input: &[u8], hdr: &VirtioNetHdr, arena: &mut Vec<u8>| {
            gso_split(input, hdr, arena, 22).map(|s| s.len())
        };
        assert_eq!(split(&input, &hdr, &mut arena), Ok(3));
        let bad_headers = [
            (VirtioNetHdr { gso_size: 0, ..hdr }, DropReason::BadOffload),
            (
                VirtioNetHdr { gso_size: 1, ..hdr },
                DropReason::TooManySegments,
            ),
            (VirtioNetHdr { gso_type: 4, ..hdr }, DropReason::BadOffload),
            (
                VirtioNetHdr { gso_type: 3, ..hdr },
                DropReason::UnsupportedGso,
            ),
            (VirtioNetHdr { gso_type: 5, ..hdr }, DropReason::BadOffload),
        ];
        for (bad, reason) in &bad_headers {
            assert_eq!(split(&input, bad, &mut arena), Err(*reason), "{bad:?}");
        }
        for cut in [&input[..input.len() - 1], &input[..30]] {
            assert_eq!(split(cut, &hdr, &mut arena), Err(DropReason::Truncated));
        }
        assert_eq!(split(&[], &hdr, &mut arena), Err(DropReason::Truncated));
        let mut frag = input.clone();
        ipv4::Packet::new_unchecked(&mut frag[..]).set_frag(false, true, 0);
        assert_eq!(split(&frag, &hdr, &mut arena), Err(DropReason::BadOffload));
        let mut badtcp = input.clone();
        badtcp[32] = 0x30; // data offset 3
        assert_eq!(
            split(&badtcp, &hdr, &mut arena),
            Err(DropReason::BadOffload)
        );
        let (s, d) = v6addrs();
        let hbh = ipv6_packet(s, d, 0, &[6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            split(&hbh, &VirtioNetHdr { gso_type: 4, ..hdr }, &mut arena),
            Err(DropReason::UnsupportedGso)
        );
    }

    #[test]
    fn gso_none_copies_and_completes_checksum() {
        let mut tcp_seg = vec![0u8; 20];
        tcp_seg[12] = 0x50;
        tcp_seg.extend_from_slice(b"abc");
        let p = partial_v4(6, &tcp_seg, 16);
        let hdr = VirtioNetHdr {
            flags: 1,
            gso_type: 0,
            hdr_len: 40,
            gso_size: 0,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut arena = Vec::new();
        let segs = gso_split(&p, &hdr, &mut arena, 22).unwrap();
        assert_eq!(segs.len(), 1);
        let r = segs.packet(0).unwrap();
        assert_eq!(r, 22..22 + p.len());
        assert_eq!(segs.packet(1), None);
        let (s, d) = (IpAddr::from(S4), IpAddr::from(D4));
        assert!(tcp::Packet::new_checked(&arena[r][20..])
            .unwrap()
            .verify_checksum(&s, &d));
        let bad = VirtioNetHdr {
            csum_start: 200,
            ..hdr
        };
        assert_eq!(
            gso_split(&p, &bad, &mut arena, 22),
            Err(DropReason::BadOffload)
        );
    }

    #[test]
    fn arena_capacity_is_reused() {
        let t = Tso {
            tcp_opts: 12,
            seq: 7,
            ident: 0,
            ..Tso::plain(true, 0x19, vec![9; 64_000], 1398)
        };
        let (input, hdr) = build(&t);
        let mut arena = Vec::new();
        let n = gso_split(&input, &hdr, &mut arena, 22).unwrap();
        assert_eq!(n.len(), 46);
        assert_eq!(n.stride(), 22 + 40 + 32 + 1398);
        let cap = arena.capacity();
        let ptr = arena.as_ptr();
        gso_split(&input, &hdr, &mut arena, 22).unwrap();
        assert_eq!((arena.capacity(), arena.as_ptr()), (cap, ptr));
    }
}
