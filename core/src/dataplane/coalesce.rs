//! Receive-side coalescing (software GRO for the TUN write path).
//!
//! The kernel's own `vxlan` device hands its stack one TCP super-packet per burst of segments
//! (GRO); a TUN daemon that writes one inner packet per VXLAN datagram makes the kernel
//! process every segment separately. [`Coalescer`] takes the inner packets decapsulated from
//! one receive batch and merges consecutive TCP segments of one flow into one TSO
//! super-packet with a [`VirtioNetHdr`] (`GSO_TCPV4`/`GSO_TCPV6`, `F_NEEDS_CSUM`), which the
//! kernel accepts on a TUN opened with `IFF_VNET_HDR`. Everything else is written as it came,
//! behind a zeroed header.
//!
//! Only what the kernel's GRO would merge is merged: same addresses and ports, consecutive
//! sequence numbers, IP and TCP headers identical except for the per-segment fields (IPv4
//! total length, ID incrementing by one, header checksum; IPv6 payload length; TCP sequence
//! number and checksum; PSH on the last segment only), flags ACK (+PSH), no IPv4 options,
//! fragments or IPv6 extension headers, every segment as large as the first but the last.
//! So [`super::offload::gso_split`] on a merged packet gives back the original segments byte
//! for byte.
//!
//! Checksums: a merged packet is marked `F_NEEDS_CSUM`, so the kernel trusts its payload. A
//! UDP socket only proves that the outer checksum was right when it was non-zero, and a
//! sender may have encapsulated a bad inner segment, so every segment's IPv4 header checksum
//! and TCP checksum is verified here before it is merged; a segment that fails is written
//! unmerged and left to the kernel to drop.
//!
//! Order: packets of one flow stay in order; packets of different flows may be reordered
//! around a merged packet (as with GRO). Merging is bounded: at most [`MAX_SEGMENTS`]
//! segments and [`MAX_LEN`] bytes per super-packet, at most [`MAX_OPEN_FLOWS`] flows open
//! for merging at once, so the work per packet is constant.

use std::net::IpAddr;
use std::ops::Range;

use super::offload::VirtioNetHdr;
use crate::wire::{checksum, ipv4, ipv6, tcp, IpProtocol};

/// Most segments merged into one super-packet (the size of a UDP GRO batch).
pub const MAX_SEGMENTS: usize = 64;

/// Largest super-packet, IP header included (IPv4 total length is 16 bits).
pub const MAX_LEN: usize = 65_535;

/// Flows open for merging at once; opening one more closes the oldest (GRO keeps 8 per
/// bucket).
pub const MAX_OPEN_FLOWS: usize = 8;

const ACK: u8 = tcp::TcpFlags::ACK.0;
const PSH: u8 = tcp::TcpFlags::PSH.0;

/// One TUN write planned by [`Coalescer::coalesce`]: a virtio header, then the bytes of
/// [`Coalescer::pieces`] in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunWrite {
    /// The header to write in front: zeroed for a packet written as it came, TSO with a
    /// partial checksum for a merged one.
    pub hdr: VirtioNetHdr,
    /// Number of original packets in this write.
    pub segments: usize,
    /// Sum of the original packets' lengths.
    pub bytes: usize,
    /// Length of each original packet but the last (only meaningful when `segments > 1`).
    seg_len: usize,
    /// Indexes into the coalescer's piece list.
    pieces: (usize, usize),
}

impl TunWrite {
    /// The lengths of the original packets this write carries, in order.
    pub fn segment_lens(&self) -> impl Iterator<Item = usize> {
        let (n, seg, bytes) = (self.segments, self.seg_len, self.bytes);
        (0..n).map(move |i| {
            if i + 1 < n {
                seg
            } else {
                bytes - seg * (n - 1)
            }
        })
    }
}

/// What the header check found out about one input packet.
#[derive(Debug, Clone, Copy, Default)]
struct Info {
    /// Start of the packet in the buffer.
    start: usize,
    /// Length of the packet.
    len: usize,
    /// IP header length (0 when the packet is not TCP as far as this module can tell).
    ip_len: usize,
    /// IP + TCP header length of a mergeable segment.
    hdrs: usize,
    /// TCP sequence number.
    seq: u32,
    /// IPv4 ID (0 for IPv6).
    ident: u16,
    /// TCP flags.
    flags: u8,
    /// IPv6 (else IPv4).
    v6: bool,
    /// Addresses and ports are readable (the packet has a flow).
    has_flow: bool,
    /// May be merged (see the module documentation).
    mergeable: bool,
    /// Its checksums were verified and failed.
    csum_bad: bool,
}

impl Info {
    fn payload(&self) -> usize {
        self.len - self.hdrs
    }
}

/// A planned write while the batch is being read: a chain of packets.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Index of the first packet.
    head: usize,
    /// Index of the last packet.
    last: usize,
    /// Packets in the chain.
    count: usize,
    /// Total bytes of the merged packet so far (head headers + all payloads).
    len: usize,
    /// Sum of the original lengths.
    bytes: usize,
    /// Payload size of the head: every segment but the last has exactly this much.
    gso: usize,
    /// Sequence number the next segment must have.
    next_seq: u32,
    /// The head's checksums were verified.
    verified: bool,
}

/// Plans the TUN writes for one batch of received inner packets, merging TCP segments.
///
/// Reusable: its vectors keep their capacity, so steady-state batches do not allocate.
#[derive(Debug, Default)]
pub struct Coalescer {
    infos: Vec<Info>,
    /// Per input packet: the next packet of its chain (`usize::MAX` for none).
    next: Vec<usize>,
    items: Vec<Item>,
    /// Items open for merging, oldest first (indexes into `items`).
    open: Vec<usize>,
    writes: Vec<TunWrite>,
    pieces: Vec<Range<usize>>,
    /// Packets of the last batch whose checksums were verified and failed.
    bad_checksums: u64,
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Plans the writes for `packets` (IP packets in `buf`, in the order they arrived, each
    /// range exactly one packet as [`super::decap`] delivers them). The headers of a merged
    /// packet's first segment are rewritten in place; its later segments' headers are left
    /// alone and skipped by the pieces. Results: [`Coalescer::writes`], in order.
    pub fn coalesce(&mut self, buf: &mut [u8], packets: &[Range<usize>]) {
        self.infos.clear();
        self.next.clear();
        self.items.clear();
        self.open.clear();
        self.writes.clear();
        self.pieces.clear();
        self.bad_checksums = 0;
        for (i, r) in packets.iter().enumerate() {
            let info = buf
                .get(r.clone())
                .map(|p| inspect(p, r.start))
                .unwrap_or_default();
            self.infos.push(info);
            self.next.push(usize::MAX);
            self.place(buf, i);
        }
        for it in 0..self.items.len() {
            self.emit(buf, packets, it);
        }
    }

    /// The planned writes, in the order to write them.
    pub fn writes(&self) -> &[TunWrite] {
        &self.writes
    }

    /// Packets of the last batch found with a bad IPv4 header or TCP checksum while
    /// verifying them for a merge (each counted once; they are written unmerged, as they
    /// came, for the kernel to drop). Packets never considered for a merge are not verified.
    pub fn bad_checksums(&self) -> u64 {
        self.bad_checksums
    }

    /// The byte ranges of `buf` that follow `w.hdr`, in order.
    pub fn pieces(&self, w: &TunWrite) -> &[Range<usize>] {
        self.pieces.get(w.pieces.0..w.pieces.1).unwrap_or(&[])
    }

    /// Appends packet `i` to an open chain of its flow or starts a chain with it.
    fn place(&mut self, buf: &[u8], i: usize) {
        let Some(&info) = self.infos.get(i) else {
            return;
        };
        if info.has_flow {
            let found = self.open.iter().rposition(|&it| {
                self.items
                    .get(it)
                    .and_then(|item| self.infos.get(item.head))
                    .is_some_and(|head| same_flow(buf, head, &info))
            });
            if let Some(pos) = found {
                let it = self.open.remove(pos);
                if info.mergeable && self.try_append(buf, it, i) {
                    let open = self.items.get(it).is_some_and(|item| {
                        let last = self.infos.get(item.last).copied().unwrap_or_default();
                        last.payload() == item.gso
                            && last.flags & PSH == 0
                            && item.count < MAX_SEGMENTS
                    });
                    if open {
                        self.open.push(it);
                    }
                    return;
                }
            }
        }
        let it = self.items.len();
        self.items.push(Item {
            head: i,
            last: i,
            count: 1,
            len: info.len,
            bytes: info.len,
            gso: if info.mergeable { info.payload() } else { 0 },
            next_seq: info
                .seq
                .wrapping_add(info.len.wrapping_sub(info.hdrs) as u32),
            verified: false,
        });
        if info.mergeable && info.flags & PSH == 0 {
            if self.open.len() >= MAX_OPEN_FLOWS {
                self.open.remove(0);
            }
            self.open.push(it);
        }
    }

    /// Appends packet `i` to item `it` if the kernel's GRO would; checks checksums last.
    fn try_append(&mut self, buf: &[u8], it: usize, i: usize) -> bool {
        let (Some(item), Some(&q)) = (self.items.get(it).copied(), self.infos.get(i)) else {
            return false;
        };
        let Some(&h) = self.infos.get(item.head) else {
            return false;
        };
        let fits = q.hdrs == h.hdrs
            && q.ip_len == h.ip_len
            && q.payload() <= item.gso
            && q.seq == item.next_seq
            && (h.v6 || q.ident == h.ident.wrapping_add(item.count as u16))
            && q.flags & !PSH == h.flags
            && item.count < MAX_SEGMENTS
            && item.len + q.payload() <= MAX_LEN
            && same_headers(buf, &h, &q);
        if !fits {
            return false;
        }
        if !item.verified {
            if !self.verify(buf, item.head) {
                return false;
            }
            if let Some(x) = self.items.get_mut(it) {
                x.verified = true;
            }
        }
        if !self.verify(buf, i) {
            return false;
        }
        if let Some(n) = self.next.get_mut(item.last) {
            *n = i;
        }
        if let Some(x) = self.items.get_mut(it) {
            x.last = i;
            x.count += 1;
            x.len += q.payload();
            x.bytes += q.len;
            x.next_seq = q.seq.wrapping_add(q.payload() as u32);
        }
        true
    }

    /// Verifies packet `i`'s checksums; a failure is remembered (not verified again) and
    /// counted.
    fn verify(&mut self, buf: &[u8], i: usize) -> bool {
        let Some(info) = self.infos.get_mut(i) else {
            return false;
        };
        if info.csum_bad {
            return false;
        }
        if checksums_ok(buf, info) {
            return true;
        }
        info.csum_bad = true;
        self.bad_checksums += 1;
        false
    }

    /// Turns item `it` into a write: rewrites the head's headers if it merged anything.
    fn emit(&mut self, buf: &mut [u8], packets: &[Range<usize>], it: usize) {
        let Some(item) = self.items.get(it).copied() else {
            return;
        };
        let first = self.pieces.len();
        let Some(head_range) = packets.get(item.head).cloned() else {
            return;
        };
        if item.count == 1 {
            self.pieces.push(head_range);
            self.writes.push(TunWrite {
                hdr: VirtioNetHdr::default(),
                segments: 1,
                bytes: item.bytes,
                seg_len: item.bytes,
                pieces: (first, first + 1),
            });
            return;
        }
        let Some(&h) = self.infos.get(item.head) else {
            return;
        };
        let last_flags = self
            .infos
            .get(item.last)
            .map_or(0, |l| l.flags & (PSH | ACK));
        let Some(head) = buf.get_mut(head_range.clone()) else {
            return;
        };
        rewrite_head(head, &h, item.len, last_flags);
        self.pieces.push(head_range);
        let mut p = self.next.get(item.head).copied().unwrap_or(usize::MAX);
        while let Some(&q) = self.infos.get(p) {
            self.pieces.push(q.start + q.hdrs..q.start + q.len);
            p = self.next.get(p).copied().unwrap_or(usize::MAX);
        }
        let gso_type = if h.v6 {
            VirtioNetHdr::GSO_TCPV6
        } else {
            VirtioNetHdr::GSO_TCPV4
        };
        self.writes.push(TunWrite {
            hdr: VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type,
                hdr_len: h.hdrs as u16,
                gso_size: item.gso as u16,
                csum_start: h.ip_len as u16,
                csum_offset: tcp::CHECKSUM_OFFSET as u16,
            },
            segments: item.count,
            bytes: item.bytes,
            seg_len: h.hdrs + item.gso,
            pieces: (first, self.pieces.len()),
        });
    }
}

/// Reads what coalescing needs from the packet `p` found at `start`.
fn inspect(p: &[u8], start: usize) -> Info {
    let mut info = Info {
        start,
        len: p.len(),
        ..Info::default()
    };
    let (v6, ip_len, total, proto, plain) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= ipv4::HEADER_LEN => {
            let ip = ipv4::Packet::new_unchecked(p);
            let ihl = ip.header_len();
            // DF only: no MF, no fragment offset, no reserved flag.
            let unfragmented = !ip.more_frags() && ip.frag_offset() == 0 && !ip.reserved_flag();
            let total = usize::from(ip.total_len());
            (
                false,
                ihl,
                total,
                ip.next_header(),
                ihl == ipv4::HEADER_LEN && unfragmented,
            )
        }
        Some(6) if p.len() >= ipv6::HEADER_LEN => {
            let ip = ipv6::Packet::new_unchecked(p);
            (
                true,
                ipv6::HEADER_LEN,
                ip.total_len(),
                ip.next_header(),
                true,
            )
        }
        _ => return info,
    };
    if proto != IpProtocol::Tcp || ip_len < ipv4::HEADER_LEN || p.len() < ip_len + 4 {
        return info;
    }
    info.v6 = v6;
    info.ip_len = ip_len;
    info.has_flow = true;
    let Some(t) = p.get(ip_len..).filter(|t| t.len() >= tcp::HEADER_LEN) else {
        return info;
    };
    let seg = tcp::Packet::new_unchecked(t);
    let thl = seg.header_len();
    info.flags = seg.flags().0;
    info.seq = seg.seq_number();
    info.hdrs = ip_len + thl;
    if !v6 {
        info.ident = ipv4::Packet::new_unchecked(p).ident();
    }
    info.mergeable = plain
        && total == p.len()
        && thl >= tcp::HEADER_LEN
        && info.hdrs < p.len()
        && (info.flags == ACK || info.flags == ACK | PSH);
    if !info.mergeable {
        info.hdrs = 0;
    }
    info
}

/// Same IP version, addresses and TCP ports.
fn same_flow(buf: &[u8], a: &Info, b: &Info) -> bool {
    if a.v6 != b.v6 {
        return false;
    }
    let addrs = if a.v6 { 8..40 } else { 12..20 };
    let field = |x: &Info, r: Range<usize>| buf.get(x.start + r.start..x.start + r.end);
    let ports = |x: &Info| field(x, x.ip_len..x.ip_len + 4);
    let (Some(aa), Some(ba), Some(ap), Some(bp)) =
        (field(a, addrs.clone()), field(b, addrs), ports(a), ports(b))
    else {
        return false;
    };
    aa == ba && ap == bp
}

/// Every header byte equal except the per-segment fields: IPv4 total length, ID and header
/// checksum, IPv6 payload length, TCP sequence number, flags (compared by the caller) and
/// checksum.
fn same_headers(buf: &[u8], h: &Info, q: &Info) -> bool {
    let (Some(a), Some(b)) = (
        buf.get(h.start..h.start + h.hdrs),
        buf.get(q.start..q.start + q.hdrs),
    ) else {
        return false;
    };
    let ip: &[Range<usize>] = if h.v6 {
        &[0..4, 6..40]
    } else {
        &[0..2, 6..10, 12..20]
    };
    let t = h.ip_len;
    let tcp = [t..t + 4, t + 8..t + 13, t + 14..t + 16, t + 18..h.hdrs];
    ip.iter()
        .cloned()
        .chain(tcp)
        .all(|r| a.get(r.clone()) == b.get(r))
}

/// True if the IPv4 header checksum (IPv4) and the TCP checksum of segment `s` verify.
fn checksums_ok(buf: &[u8], s: &Info) -> bool {
    let Some(p) = buf.get(s.start..s.start + s.len) else {
        return false;
    };
    if !s.v6 && p.get(..s.ip_len).is_none_or(|h| checksum::sum(h) != 0xffff) {
        return false;
    }
    let Some((src, dst)) = addresses(p, s.v6) else {
        return false;
    };
    p.get(s.ip_len..)
        .is_some_and(|t| tcp::Packet::new_unchecked(t).verify_checksum(&src, &dst))
}

/// Source and destination address of the IPv6 (`v6`) or IPv4 packet `p`, if its fixed
/// header is present.
fn addresses(p: &[u8], v6: bool) -> Option<(IpAddr, IpAddr)> {
    if v6 {
        let ip = ipv6::Packet::new_unchecked(p.get(..ipv6::HEADER_LEN)?);
        Some((ip.src_addr().into(), ip.dst_addr().into()))
    } else {
        let ip = ipv4::Packet::new_unchecked(p.get(..ipv4::HEADER_LEN)?);
        Some((ip.src_addr().into(), ip.dst_addr().into()))
    }
}

/// Makes the head segment's headers describe the whole super-packet of `len` bytes: IP
/// length (and IPv4 header checksum), the last segment's PSH, and the pseudo-header sum in
/// the TCP checksum field as `F_NEEDS_CSUM` requires.
fn rewrite_head(head: &mut [u8], h: &Info, len: usize, last_flags: u8) {
    if head.len() < h.hdrs {
        return;
    }
    if h.v6 {
        let plen = (len - ipv6::HEADER_LEN) as u16;
        ipv6::Packet::new_unchecked(&mut *head).set_payload_len(plen);
    } else {
        let mut ip = ipv4::Packet::new_unchecked(&mut *head);
        ip.set_total_len(len as u16);
        ip.fill_checksum();
    }
    let t = h.ip_len;
    let addrs = addresses(head, h.v6);
    let mut seg = tcp::Packet::new_unchecked(&mut head[t..]);
    seg.set_flags(tcp::TcpFlags(seg.flags().0 | (last_flags & PSH)));
    let Some((src, dst)) = addrs else {
        return;
    };
    let ph = checksum::pseudo_header(&src, &dst, IpProtocol::Tcp.into(), (len - t) as u32);
    seg.set_checksum(ph);
}

/// TCP packet builders for the coalescer's tests and, with the `test-util` feature, the main
/// crate's (TUN) tests.
#[cfg(any(test, feature = "test-util"))]
pub mod fixtures {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::offload::gso_split;
    use super::super::testutil::*;
    use super::*;

    /// A TCP super-packet (IPv4 or IPv6) with valid checksums, as the kernel would hand it:
    /// 10.244.1.`flow`:40000+`flow` → 10.244.2.7:5201 (fd10:244:1::`flow` → fd10:244:2::7).
    pub fn tcp_packet(
        v6: bool,
        flow: u8,
        seq: u32,
        flags: u8,
        opts: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&(40_000 + u16::from(flow)).to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        t[12] = (((20 + opts.len()) / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&502u16.to_be_bytes());
        t.extend_from_slice(opts);
        t.extend_from_slice(payload);
        let mut p = if v6 {
            ipv6_packet(
                Ipv6Addr::new(0xfd10, 0x244, 1, 0, 0, 0, 0, u16::from(flow)),
                "fd10:244:2::7".parse().unwrap(),
                6,
                &t,
            )
        } else {
            let mut p = ipv4_packet(
                Ipv4Addr::new(10, 244, 1, flow),
                Ipv4Addr::new(10, 244, 2, 7),
                6,
                &t,
            );
            p[4..6].copy_from_slice(&0x4000u16.to_be_bytes());
            p[6] = 0x40; // DF
            p[10..12].fill(0);
            let c = checksum::checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p
        };
        let ip_len = if v6 { 40 } else { 20 };
        let (src, dst) = addresses(&p, v6).unwrap();
        tcp::Packet::new_unchecked(&mut p[ip_len..]).fill_checksum(&src, &dst);
        p
    }

    /// Splits a super-packet into segments of `mss` payload bytes, as a sender's TSO would.
    pub fn segments(sup: &[u8], mss: u16) -> Vec<Vec<u8>> {
        let v6 = sup[0] >> 4 == 6;
        let ip_len = if v6 { 40 } else { 20 };
        let thl = usize::from(sup[ip_len + 12] >> 4) * 4;
        let hdr = VirtioNetHdr {
            flags: 0,
            gso_type: if v6 {
                VirtioNetHdr::GSO_TCPV6
            } else {
                VirtioNetHdr::GSO_TCPV4
            },
            hdr_len: (ip_len + thl) as u16,
            gso_size: mss,
            csum_start: 0,
            csum_offset: 0,
        };
        let mut arena = Vec::new();
        let segs = gso_split(sup, &hdr, &mut arena, 0).unwrap();
        segs.iter().map(|r| arena[r].to_vec()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::offload::{complete_partial_checksum, gso_split};
    use super::super::testutil::*;
    use super::fixtures::*;
    use super::*;
    use proptest::prelude::*;

    /// Lays `packets` out in one buffer with `gap` bytes of junk before each.
    fn layout(packets: &[Vec<u8>], gap: usize) -> (Vec<u8>, Vec<Range<usize>>) {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for p in packets {
            buf.extend(std::iter::repeat_n(0xa5, gap));
            ranges.push(buf.len()..buf.len() + p.len());
            buf.extend_from_slice(p);
        }
        (buf, ranges)
    }

    /// Runs the coalescer and turns every write back into packets: merged writes are split
    /// with `gso_split`, others taken as they are. Also checks each write's header.
    fn roundtrip(packets: &[Vec<u8>], gap: usize) -> (Vec<Vec<u8>>, Vec<TunWrite>) {
        let (mut buf, ranges) = layout(packets, gap);
        let mut c = Coalescer::new();
        c.coalesce(&mut buf, &ranges);
        let mut out = Vec::new();
        for w in c.writes() {
            let bytes: Vec<u8> = c
                .pieces(w)
                .iter()
                .flat_map(|r| buf[r.clone()].to_vec())
                .collect();
            assert_eq!(w.segment_lens().sum::<usize>(), w.bytes);
            if w.segments == 1 {
                assert_eq!(w.hdr, VirtioNetHdr::default());
                out.push(bytes);
                continue;
            }
            check_super(&bytes, &w.hdr);
            let mut arena = Vec::new();
            let segs = gso_split(&bytes, &w.hdr, &mut arena, 0).unwrap();
            assert_eq!(segs.len(), w.segments);
            let lens: Vec<usize> = segs.iter().map(|r| r.len()).collect();
            assert_eq!(lens, w.segment_lens().collect::<Vec<_>>());
            out.extend(segs.iter().map(|r| arena[r].to_vec()));
        }
        (out, c.writes().to_vec())
    }

    /// What the kernel checks of a TSO packet written to TUN: header fields consistent with
    /// the packet, and the checksum field holding the pseudo-header sum so that completing
    /// it gives a correct checksum over the whole super-packet.
    fn check_super(p: &[u8], h: &VirtioNetHdr) {
        let v6 = p[0] >> 4 == 6;
        let ip_len = if v6 { 40 } else { 20 };
        assert_eq!(h.flags, VirtioNetHdr::F_NEEDS_CSUM);
        let want = if v6 {
            VirtioNetHdr::GSO_TCPV6
        } else {
            VirtioNetHdr::GSO_TCPV4
        };
        assert_eq!(h.gso_type, want);
        assert_eq!(usize::from(h.csum_start), ip_len);
        assert_eq!(h.csum_offset, 16);
        let thl = usize::from(p[ip_len + 12] >> 4) * 4;
        assert_eq!(usize::from(h.hdr_len), ip_len + thl);
        if v6 {
            assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])) + 40, p.len());
        } else {
            assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
            assert!(verifies(&p[..20]));
        }
        let mut full = p.to_vec();
        complete_partial_checksum(&mut full, ip_len, 16).unwrap();
        let (src, dst) = addresses(&full, v6).unwrap();
        assert!(tcp::Packet::new_unchecked(&full[ip_len..]).verify_checksum(&src, &dst));
    }

    #[test]
    fn one_flow_becomes_one_super_packet() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
            let sup = tcp_packet(
                v6,
                1,
                1000,
                ACK | PSH,
                &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                &payload,
            );
            let segs = segments(&sup, 1388);
            assert_eq!(segs.len(), 4);
            let (out, writes) = roundtrip(&segs, 22);
            assert_eq!(writes.len(), 1, "v6={v6}");
            assert_eq!(writes[0].segments, 4);
            assert_eq!(writes[0].hdr.gso_size, 1388);
            assert_eq!(writes[0].bytes, segs.iter().map(Vec::len).sum::<usize>());
            assert_eq!(out, segs);
        }
    }

    #[test]
    fn interleaved_flows_merge_separately() {
        let a = segments(&tcp_packet(false, 1, 5, ACK, &[], &[1u8; 3000]), 1000);
        let b = segments(&tcp_packet(true, 2, 9, ACK, &[], &[2u8; 3000]), 1000);
        let mixed = vec![
            a[0].clone(),
            b[0].clone(),
            a[1].clone(),
            b[1].clone(),
            a[2].clone(),
            b[2].clone(),
        ];
        let (out, writes) = roundtrip(&mixed, 3);
        assert_eq!(writes.len(), 2);
        assert_eq!(out, [a, b].concat());
    }

    #[test]
    fn bad_checksums_are_counted_once() {
        let segs = segments(&tcp_packet(false, 1, 5, ACK, &[], &[3u8; 4000]), 1000);
        let mut c = Coalescer::new();
        let (mut buf, ranges) = layout(&segs, 22);
        c.coalesce(&mut buf, &ranges);
        assert_eq!((c.writes().len(), c.bad_checksums()), (1, 0));
        // Segment 1's TCP checksum and segment 2's IPv4 header checksum are bad: each is
        // verified against its own chain candidates more than once but counted once.
        let mut bad = segs.clone();
        bad[1][60] ^= 1;
        bad[2][10] ^= 1;
        let (mut buf, ranges) = layout(&bad, 22);
        c.coalesce(&mut buf, &ranges);
        assert_eq!(c.bad_checksums(), 2);
        assert!(c.writes().iter().all(|w| w.segments == 1));
        // Reset per batch.
        let (mut buf, ranges) = layout(&segs, 22);
        c.coalesce(&mut buf, &ranges);
        assert_eq!(c.bad_checksums(), 0);
    }

    #[test]
    fn what_gro_would_not_merge_passes_through() {
        let segs = segments(&tcp_packet(false, 1, 5, ACK, &[], &[3u8; 3000]), 1000);
        assert_eq!(
            roundtrip(&segs, 22).1.len(),
            1,
            "control: the unchanged flow merges"
        );
        type Mutation = fn(&mut Vec<Vec<u8>>);
        let cases: [(&str, Mutation); 10] = [
            ("sequence gap", |s| {
                s.remove(1);
            }),
            ("bad TCP checksum", |s| s[1][60] ^= 1),
            ("bad IPv4 header checksum", |s| s[1][10] ^= 1),
            ("TTL differs", |s| {
                s[1][8] -= 1;
                refill(&mut s[1]);
            }),
            ("IPv4 ID not incrementing", |s| {
                s[1][5] = s[1][5].wrapping_add(5);
                refill(&mut s[1]);
            }),
            ("window differs", |s| {
                s[1][35] ^= 1;
                refill(&mut s[1]);
            }),
            ("ACK number differs", |s| {
                s[1][31] ^= 1;
                refill(&mut s[1]);
            }),
            ("FIN", |s| {
                s[1][33] |= 0x01;
                refill(&mut s[1]);
            }),
            ("CWR", |s| {
                s[1][33] |= 0x80;
                refill(&mut s[1]);
            }),
            ("IPv4 options", |s| {
                for p in s.iter_mut() {
                    let mut q = p[..20].to_vec();
                    q[0] = 0x46;
                    q.extend_from_slice(&[1, 1, 1, 0]);
                    q.extend_from_slice(&p[20..]);
                    let n = q.len() as u16;
                    q[2..4].copy_from_slice(&n.to_be_bytes());
                    *p = q;
                    refill(p);
                }
            }),
        ];
        for (name, mutate) in cases {
            let mut s = segs.clone();
            mutate(&mut s);
            let (out, writes) = roundtrip(&s, 22);
            assert_eq!(out, s, "{name}");
            assert!(writes.iter().all(|w| w.segments == 1), "{name}: {writes:?}");
        }
        // PSH ends a super-packet: the segments after it start a new one.
        let mut s = segs.clone();
        s[0][33] |= PSH;
        refill(&mut s[0]);
        let (out, writes) = roundtrip(&s, 22);
        assert_eq!(out, s);
        assert_eq!(
            writes.iter().map(|w| w.segments).collect::<Vec<_>>(),
            [1, 2]
        );
        // A larger segment after a smaller one, and a fragment: not merged either.
        let a = segments(&tcp_packet(false, 1, 5, ACK, &[], &[3u8; 1500]), 1000);
        let b = tcp_packet(false, 1, 1505, ACK, &[], &[4u8; 900]);
        let mut c = tcp_packet(false, 1, 2405, ACK, &[], &[4u8; 900]);
        c[6] |= 0x20; // MF
        refill(&mut c);
        let input = vec![a[0].clone(), a[1].clone(), b, c];
        let (out, writes) = roundtrip(&input, 0);
        assert_eq!(out, input);
        assert_eq!(
            writes.iter().map(|w| w.segments).collect::<Vec<_>>(),
            [2, 1, 1]
        );
    }

    #[test]
    fn super_packets_stop_at_the_limits() {
        let segs = segments(
            &tcp_packet(false, 1, 5, ACK, &[], &[9u8; 100 * 64 + 50]),
            64,
        );
        assert_eq!(segs.len(), 101);
        let (out, writes) = roundtrip(&segs, 22);
        assert_eq!(out, segs);
        assert_eq!(
            writes.iter().map(|w| w.segments).collect::<Vec<_>>(),
            [64, 37]
        );
        // IPv6, 60-byte headers: 46 segments of 1400 fill 64,460 bytes, one more would not fit.
        let segs = [
            segments(&tcp_packet(true, 1, 5, ACK, &[], &[9u8; 1400 * 30]), 1400),
            segments(
                &tcp_packet(true, 1, 5 + 1400 * 30, ACK, &[], &[9u8; 1400 * 30]),
                1400,
            ),
        ]
        .concat();
        let (out, writes) = roundtrip(&segs, 22);
        assert_eq!(out, segs);
        assert_eq!(
            writes.iter().map(|w| w.segments).collect::<Vec<_>>(),
            [46, 14]
        );
        for w in &writes {
            assert!(w.bytes - (w.segments - 1) * 60 <= MAX_LEN);
        }
    }

    #[test]
    fn open_flows_are_bounded() {
        for (nflows, writes_expected) in [
            (MAX_OPEN_FLOWS, MAX_OPEN_FLOWS),
            (MAX_OPEN_FLOWS + 1, 2 * (MAX_OPEN_FLOWS + 1)),
        ] {
            let flows: Vec<Vec<Vec<u8>>> = (0..nflows as u8)
                .map(|f| segments(&tcp_packet(false, f, 100, ACK, &[], &[f; 2000]), 1000))
                .collect();
            // Round robin: every flow's first segment, then every flow's second.
            let input: Vec<Vec<u8>> = (0..2)
                .flat_map(|i| flows.iter().map(move |f| f[i].clone()))
                .collect();
            let (out, writes) = roundtrip(&input, 5);
            // With one flow too many, each flow was evicted before its second segment came.
            assert_eq!(writes.len(), writes_expected, "{nflows} flows");
            for f in &flows {
                let got: Vec<&Vec<u8>> = out.iter().filter(|p| f.contains(p)).collect();
                assert_eq!(got, f.iter().collect::<Vec<_>>());
            }
        }
    }

    /// Recomputes the IPv4 header checksum and the TCP checksum of an IPv4 segment.
    fn refill(p: &mut [u8]) {
        let ihl = usize::from(p[0] & 15) * 4;
        p[10..12].fill(0);
        let c = checksum::checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let (src, dst) = addresses(p, false).unwrap();
        tcp::Packet::new_unchecked(&mut p[ihl..]).fill_checksum(&src, &dst);
    }

    /// The flow a test packet belongs to as its bytes say: version, addresses, protocol and,
    /// for TCP, ports; `None` for anything unreadable.
    fn flow_of(p: &[u8]) -> Option<Vec<u8>> {
        let (addrs, proto, l4) = match p.first()? >> 4 {
            4 => (p.get(12..20)?, *p.get(9)?, usize::from(p[0] & 15) * 4),
            6 => (p.get(8..40)?, *p.get(6)?, 40),
            _ => return None,
        };
        let mut k = vec![p[0] >> 4, proto];
        k.extend_from_slice(addrs);
        match p.get(l4..l4 + 4) {
            Some(ports) if proto == 6 && l4 >= 20 => k.extend_from_slice(ports),
            _ => k.push(0xff),
        }
        Some(k)
    }

    fn arb_flow() -> impl Strategy<Value = Vec<Vec<u8>>> {
        (
            any::<bool>(),
            0u8..4,
            any::<u32>(),
            any::<bool>(),
            0usize..=10,
            1usize..12_000,
            16u16..1500,
        )
            .prop_map(|(v6, flow, seq, psh, opt_words, len, mss)| {
                let opts: Vec<u8> = (0..opt_words * 4).map(|i| i as u8 | 1).collect();
                let payload: Vec<u8> = (0..len)
                    .map(|i| (i * 31 + usize::from(flow)) as u8)
                    .collect();
                let flags = if psh { ACK | PSH } else { ACK };
                segments(&tcp_packet(v6, flow, seq, flags, &opts, &payload), mss)
            })
    }

    proptest! {
        #[test]
        fn merged_then_split_gives_the_segments_back(segs in arb_flow(), gap in 0usize..40) {
            let (out, writes) = roundtrip(&segs, gap);
            prop_assert_eq!(&out, &segs);
            if segs.len() > 1 {
                prop_assert!(writes.len() < segs.len());
            }
            let total: usize = segs.iter().map(Vec::len).sum();
            prop_assert_eq!(writes.iter().map(|w| w.bytes).sum::<usize>(), total);
        }

        #[test]
        fn mixed_batches_keep_every_packet_and_each_flows_order(
            flows in proptest::collection::vec(arb_flow(), 1..4),
            order in proptest::collection::vec(any::<u8>(), 0..300),
            others in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..4),
            flips in proptest::collection::vec((any::<u16>(), any::<u16>(), any::<u8>()), 0..4),
            gap in 0usize..30,
        ) {
            // Interleave the flows (and some junk) in a random order.
            let mut queues: Vec<std::collections::VecDeque<Vec<u8>>> =
                flows.into_iter().map(Into::into).collect();
            queues.push(others.into());
            let mut input = Vec::new();
            let mut k = order.into_iter().cycle();
            while queues.iter().any(|q| !q.is_empty()) {
                let pick = usize::from(k.next().unwrap_or(0)) % queues.len();
                if let Some(p) = queues[pick].pop_front() {
                    input.push(p);
                } else if let Some(q) = queues.iter_mut().find(|q| !q.is_empty()) {
                    input.extend(q.pop_front());
                }
            }
            // Corrupt a few bytes anywhere.
            for (which, at, x) in flips {
                if input.is_empty() { break; }
                let n = input.len();
                let p = &mut input[usize::from(which) % n];
                if !p.is_empty() {
                    let l = p.len();
                    p[usize::from(at) % l] ^= x;
                }
            }
            let (out, _) = roundtrip(&input, gap);
            let mut a = out.clone();
            let mut b = input.clone();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
            let mut keys: Vec<Option<Vec<u8>>> = input.iter().map(|p| flow_of(p)).collect();
            keys.dedup();
            for key in keys {
                let want: Vec<&Vec<u8>> = input.iter().filter(|p| flow_of(p) == key).collect();
                let got: Vec<&Vec<u8>> = out.iter().filter(|p| flow_of(p) == key).collect();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn arbitrary_input_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            ranges in proptest::collection::vec((0usize..450, 0usize..450), 0..12),
        ) {
            let mut buf = bytes;
            let ranges: Vec<Range<usize>> = ranges.into_iter().map(|(a, b)| a..b).collect();
            let mut c = Coalescer::new();
            c.coalesce(&mut buf, &ranges);
            prop_assert_eq!(c.writes().iter().map(|w| w.segments).sum::<usize>(), ranges.len());
        }
    }
}
