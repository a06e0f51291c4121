//! ICMP echo ("ping") over raw sockets, IPv4 and IPv6: the one peer-probing implementation
//! shared by `flanneld doctor` and the daemon's prober.
//!
//! Raw sockets (`SOCK_RAW` with `IPPROTO_ICMP` / `IPPROTO_ICMPV6`, need `CAP_NET_RAW`) rather
//! than unprivileged `SOCK_DGRAM` ping sockets: flanneld runs as root (or with NET_RAW, as
//! kube-flannel.yml grants), while ping sockets depend on `net.ipv4.ping_group_range`, which
//! is "1 0" (disabled) by default in every new network namespace. The sockets act in the
//! namespace of the thread that opens them; the kernel chooses the source address from the
//! route, so a probe to a peer's VTEP leaves over the overlay device with this node's VTEP
//! address.
//!
//! Each socket sees every ICMP (ICMPv6) packet of the namespace: a filter (`ICMP_FILTER`,
//! `ICMP6_FILTER`) keeps only echo replies, and replies are matched on identifier, sequence
//! number and source address. The kernel computes and verifies the ICMPv6 checksum of a raw
//! `IPPROTO_ICMPV6` socket itself (RFC 3542 §3.1). Probing is bounded: one outstanding
//! request per target, sends paced by [`SEND_GAP`]; one round covers both families.

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::udp::setsockopt_int;
use crate::wire::icmp::{self, EchoKind};
use crate::wire::{ipv4, IpProtocol};

/// `ICMP_FILTER` socket option of `SOL_RAW` (linux/icmp.h).
const ICMP_FILTER: libc::c_int = 1;
/// `ICMPV6_FILTER` socket option of `IPPROTO_ICMPV6` (linux/icmpv6.h).
const ICMP6_FILTER: libc::c_int = 1;
/// Payload of every request, so probes are recognisable in captures.
const PAYLOAD: &[u8] = b"flannel-rs probe";
/// Pause after each request: at most ~500 requests per second leave this node.
pub const SEND_GAP: Duration = Duration::from_millis(2);
/// Targets per round: sequence numbers of one round must not wrap.
const CHUNK: usize = 4096;
/// Upper bound on stale packets discarded before a round.
const MAX_DRAIN: usize = 4096;

/// An echo reply seen on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply {
    /// Who answered.
    pub from: IpAddr,
    /// ICMP identifier.
    pub ident: u16,
    /// ICMP sequence number.
    pub seq: u16,
}

/// IP and ICMP header bytes in front of an echo payload: 28 for IPv4, 48 for IPv6.
const fn overhead(kind: EchoKind) -> usize {
    match kind {
        EchoKind::V4 => 20 + icmp::HEADER_LEN,
        EchoKind::V6 => 40 + icmp::HEADER_LEN,
    }
}

/// The echo payload that makes a request of `kind` an IP packet of `packet_len` bytes (IP
/// header without options, 8-byte ICMP header): the probe marker repeated, never shorter
/// than it, at most 64 KiB.
pub fn sized_payload(kind: EchoKind, packet_len: usize) -> Vec<u8> {
    let len = packet_len
        .saturating_sub(overhead(kind))
        .clamp(PAYLOAD.len(), 65_507);
    PAYLOAD.iter().copied().cycle().take(len).collect()
}

/// Parses what a raw IPv4 ICMP socket delivers (IP header, then ICMP) as an echo reply; `None`
/// for anything else or anything truncated or with a wrong ICMP checksum.
pub fn parse_echo_reply(packet: &[u8]) -> Option<EchoReply> {
    let ip = ipv4::Packet::new_checked(packet).ok()?;
    if ip.version() != 4 || ip.next_header() != IpProtocol::Icmp {
        return None;
    }
    let (ident, seq) = icmp::parse_echo_reply(EchoKind::V4, ip.payload())?;
    Some(EchoReply {
        from: IpAddr::V4(ip.src_addr()),
        ident,
        seq,
    })
}

/// Parses what a raw ICMPv6 socket delivers (the ICMPv6 message only, checksum verified by
/// the kernel) from `from` as an echo reply.
pub fn parse_echo_reply_v6(msg: &[u8], from: Ipv6Addr) -> Option<EchoReply> {
    let (ident, seq) = icmp::parse_echo_reply(EchoKind::V6, msg)?;
    Some(EchoReply {
        from: IpAddr::V6(from),
        ident,
        seq,
    })
}

const fn kind_of(ip: &IpAddr) -> EchoKind {
    match ip {
        IpAddr::V4(_) => EchoKind::V4,
        IpAddr::V6(_) => EchoKind::V6,
    }
}

/// A raw socket of `kind` that delivers echo replies only.
fn open_socket(kind: EchoKind) -> io::Result<OwnedFd> {
    let (domain, proto) = match kind {
        EchoKind::V4 => (libc::AF_INET, libc::IPPROTO_ICMP),
        EchoKind::V6 => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: socket() takes constants and returns a new descriptor or -1.
    let raw = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we own exclusively from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The filters' set bits are the types dropped: all but the echo reply.
    let reply = usize::from(kind.reply());
    let rc = match kind {
        EchoKind::V4 => {
            let filter: u32 = !(1u32 << reply);
            // SAFETY: the option value points at a live u32 of the length passed.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_RAW,
                    ICMP_FILTER,
                    (&filter as *const u32).cast(),
                    mem::size_of::<u32>() as libc::socklen_t,
                )
            }
        }
        EchoKind::V6 => {
            let mut filter = [u32::MAX; 8];
            filter[reply >> 5] &= !(1u32 << (reply & 31));
            // SAFETY: the option value points at a live struct icmp6_filter (8 u32).
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_ICMPV6,
                    ICMP6_FILTER,
                    filter.as_ptr().cast(),
                    mem::size_of_val(&filter) as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Raw ICMP and ICMPv6 sockets sending echo requests and collecting the replies to them.
#[derive(Debug)]
pub struct Pinger {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
    ident: u16,
    next_seq: u16,
    /// Requests are IP packets of this size (`None`: the marker payload only).
    packet_len: Option<usize>,
}

impl Pinger {
    /// Opens the sockets of the families of `targets` (IPv4 when there are none) in the
    /// calling thread's network namespace (needs `CAP_NET_RAW`).
    pub fn open_for(targets: &[IpAddr]) -> io::Result<Pinger> {
        let want = |v6: bool| targets.iter().any(|t| t.is_ipv6() == v6);
        let v4 = (want(false) || targets.is_empty())
            .then(|| open_socket(EchoKind::V4))
            .transpose()?;
        let v6 = want(true)
            .then(|| open_socket(EchoKind::V6))
            .transpose()
            .map_err(|e| io::Error::new(e.kind(), format!("IPv6 (ICMPv6): {e}")))?;
        let mut id = [0u8; 4];
        // Any identifier works; a random one keeps concurrent pingers' replies apart.
        let _ = getrandom::fill(&mut id);
        Ok(Pinger {
            v4,
            v6,
            ident: u16::from_be_bytes([id[0], id[1]]),
            next_seq: u16::from_be_bytes([id[2], id[3]]),
            packet_len: None,
        })
    }

    /// Whether this pinger has a socket for the family of every target.
    pub fn covers(&self, targets: &[IpAddr]) -> bool {
        targets.iter().all(|t| self.socket(kind_of(t)).is_some())
    }

    fn socket(&self, kind: EchoKind) -> Option<&OwnedFd> {
        match kind {
            EchoKind::V4 => self.v4.as_ref(),
            EchoKind::V6 => self.v6.as_ref(),
        }
    }

    /// From now on, requests are IP packets of `packet_len` bytes (header included; at least
    /// the default size) that are never fragmented (IPv4: Don't Fragment; IPv6: no local
    /// fragmentation) and ignore this host's cached path MTU (`PMTUDISC_PROBE`): a reply
    /// proves that packets of that size cross the path. Used to check the overlay MTU end to
    /// end.
    pub fn sized_dont_fragment(&mut self, packet_len: usize) -> io::Result<()> {
        if let Some(fd) = &self.v4 {
            setsockopt_int(
                fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            )?;
        }
        if let Some(fd) = &self.v6 {
            setsockopt_int(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            )?;
            setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)?;
        }
        self.packet_len = Some(packet_len);
        Ok(())
    }

    /// The ICMP identifier of this pinger's requests.
    pub fn ident(&self) -> u16 {
        self.ident
    }

    /// Probes every target with up to `tries` echo requests, waiting `timeout` for the
    /// replies of each round (both families at once); returns, per target, whether it
    /// answered (never, for a family this pinger has no socket for). Blocking: call it from a
    /// dedicated thread (`spawn_blocking` in async code). Takes at least
    /// `targets.len() * SEND_GAP` per round.
    pub fn probe(&mut self, targets: &[IpAddr], tries: u32, timeout: Duration) -> Vec<bool> {
        let mut answered = vec![false; targets.len()];
        for (c, chunk) in targets.chunks(CHUNK).enumerate() {
            let base = c * CHUNK;
            for _ in 0..tries.max(1) {
                let pending: Vec<usize> =
                    (0..chunk.len()).filter(|&i| !answered[base + i]).collect();
                if pending.is_empty() {
                    break;
                }
                self.round(
                    chunk,
                    &pending,
                    timeout,
                    &mut answered[base..base + chunk.len()],
                );
            }
        }
        answered
    }

    /// One request to each pending target, then replies until all answered or the deadline.
    fn round(
        &mut self,
        targets: &[IpAddr],
        pending: &[usize],
        timeout: Duration,
        answered: &mut [bool],
    ) {
        self.drain();
        let mut outstanding: HashMap<u16, usize> = HashMap::with_capacity(pending.len());
        let payloads = [EchoKind::V4, EchoKind::V6].map(|k| match self.packet_len {
            Some(len) => sized_payload(k, len),
            None => PAYLOAD.to_vec(),
        });
        for &i in pending {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            let payload = &payloads[usize::from(targets[i].is_ipv6())];
            if self.send(targets[i], seq, payload).is_ok() {
                outstanding.insert(seq, i);
            }
            std::thread::sleep(SEND_GAP);
        }
        let deadline = Instant::now() + timeout;
        // Room for a reply as large as any request (jumbo overlay MTUs).
        let mut buf = vec![0u8; 65_536];
        while !outstanding.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let reply = match self.recv(&mut buf, left) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let Some(reply) = reply else { continue };
            if reply.ident != self.ident {
                continue;
            }
            if let Some(&i) = outstanding.get(&reply.seq) {
                if targets.get(i) == Some(&reply.from) {
                    outstanding.remove(&reply.seq);
                    if let Some(a) = answered.get_mut(i) {
                        *a = true;
                    }
                }
            }
        }
    }

    /// Discards what queued up since the last round (other pingers' replies), so a full
    /// receive buffer cannot drop this round's replies.
    fn drain(&self) {
        let mut buf = [0u8; 1500];
        for fd in [&self.v4, &self.v6].into_iter().flatten() {
            for _ in 0..MAX_DRAIN {
                if recv_from(fd, &mut buf).is_err() {
                    break;
                }
            }
        }
    }

    fn send(&self, dst: IpAddr, seq: u16, payload: &[u8]) -> io::Result<()> {
        let kind = kind_of(&dst);
        let fd = self
            .socket(kind)
            .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        let msg = icmp::echo_request(kind, self.ident, seq, payload);
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value before filling it.
        let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let len = match dst {
            IpAddr::V4(ip) => {
                // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
                let sa = unsafe {
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
                mem::size_of::<libc::sockaddr_in>()
            }
            IpAddr::V6(ip) => {
                // SAFETY: as above.
                let sa = unsafe {
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr.s6_addr = ip.octets();
                mem::size_of::<libc::sockaddr_in6>()
            }
        };
        // SAFETY: buffer and address point at live memory of the lengths passed.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
                (&ss as *const libc::sockaddr_storage).cast(),
                len as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for one packet on either socket; `None` on timeout,
    /// `Some(None)` for a packet that is not an echo reply.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<Option<EchoReply>>> {
        let socks: Vec<(EchoKind, &OwnedFd)> = [(EchoKind::V4, &self.v4), (EchoKind::V6, &self.v6)]
            .into_iter()
            .filter_map(|(k, fd)| fd.as_ref().map(|fd| (k, fd)))
            .collect();
        let mut pfds: Vec<libc::pollfd> = socks
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfds` is a live array of as many pollfds as passed.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Ok(None);
        }
        let Some(&(kind, fd)) = socks
            .iter()
            .zip(&pfds)
            .find(|(_, p)| p.revents != 0)
            .map(|(s, _)| s)
        else {
            return Ok(Some(None));
        };
        match recv_from(fd, buf) {
            Ok((n, from)) => Ok(Some(match (kind, from) {
                (EchoKind::V4, _) => buf.get(..n).and_then(parse_echo_reply),
                (EchoKind::V6, Some(IpAddr::V6(from))) => {
                    buf.get(..n).and_then(|m| parse_echo_reply_v6(m, from))
                }
                (EchoKind::V6, _) => None,
            })),
            // Readable but taken meanwhile: nothing, not a timeout.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(None)),
            Err(e) => Err(e),
        }
    }
}

/// One queued packet into `buf` without waiting (`WouldBlock` when none is queued), with its
/// source address.
fn recv_from(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Option<IpAddr>)> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the buffer and the address are live and writable for the lengths passed.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let from = match i32::from(ss.ss_family) {
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6) into the storage.
            let sa =
                unsafe { &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)))
        }
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into the storage.
            let sa =
                unsafe { &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))))
        }
        _ => None,
    };
    Ok((n, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::icmp::{ECHO_REPLY, ECHO_REQUEST};

    fn echo_request(ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        icmp::echo_request(EchoKind::V4, ident, seq, payload)
    }

    #[test]
    fn sized_requests_have_the_asked_packet_length() {
        let v4 = |len| sized_payload(EchoKind::V4, len);
        assert_eq!(20 + echo_request(1, 2, &v4(1450)).len(), 1450);
        assert_eq!(20 + echo_request(1, 2, &v4(8950)).len(), 8950);
        assert_eq!(v4(10), PAYLOAD);
        assert!(v4(1450).starts_with(PAYLOAD));
        let v6 = icmp::echo_request(EchoKind::V6, 1, 2, &sized_payload(EchoKind::V6, 1430));
        assert_eq!(40 + v6.len(), 1430);
        assert_eq!(sized_payload(EchoKind::V6, 40), PAYLOAD);
    }

    /// An IPv4 header (no options) from `src` in front of `icmp`.
    fn ip(src: Ipv4Addr, icmp: &[u8]) -> Vec<u8> {
        let total = u16::try_from(20 + icmp.len()).expect("small");
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&[10, 244, 1, 0]);
        p.extend_from_slice(icmp);
        p
    }

    fn reply(ident: u16, seq: u16) -> Vec<u8> {
        let mut m = echo_request(ident, seq, PAYLOAD);
        // The same message as an echo reply (type 0), checksum recomputed.
        let mut p = icmp::Packet::new_unchecked(&mut m[..]);
        p.set_msg_type(ECHO_REPLY);
        p.fill_checksum();
        m
    }

    #[test]
    fn request_has_valid_checksum_and_fields() {
        let m = echo_request(0x1234, 7, b"abc");
        assert_eq!(m[0], ECHO_REQUEST);
        assert_eq!(&m[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(&m[8..], b"abc");
        assert!(icmp::Packet::new_checked(&m[..]).unwrap().verify_checksum());
    }

    #[test]
    fn parses_replies_and_rejects_the_rest() {
        let src = Ipv4Addr::new(10, 244, 2, 0);
        let ok = ip(src, &reply(0xbeef, 42));
        assert_eq!(
            parse_echo_reply(&ok),
            Some(EchoReply {
                from: IpAddr::V4(src),
                ident: 0xbeef,
                seq: 42
            })
        );
        // Requests, truncation, bad checksum, other protocols, IPv6, empty.
        assert_eq!(parse_echo_reply(&ip(src, &echo_request(1, 1, b""))), None);
        assert_eq!(parse_echo_reply(&ok[..25]), None);
        let mut bad = ok.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(parse_echo_reply(&bad), None);
        let mut udp = ok.clone();
        udp[9] = 17;
        assert_eq!(parse_echo_reply(&udp), None);
        let mut v6 = ok.clone();
        v6[0] = 0x60;
        assert_eq!(parse_echo_reply(&v6), None);
        assert_eq!(parse_echo_reply(&[]), None);
        let mut short_ihl = ok;
        short_ihl[0] = 0x44;
        assert_eq!(parse_echo_reply(&short_ihl), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let _ = parse_echo_reply(&bytes);
        }

        #[test]
        fn reply_round_trip(ident in 0u16.., seq in 0u16.., a in 0u8.., b in 0u8..) {
            let src = Ipv4Addr::new(10, a, b, 0);
            let got = parse_echo_reply(&ip(src, &reply(ident, seq)));
            proptest::prop_assert_eq!(got, Some(EchoReply { from: IpAddr::V4(src), ident, seq }));
        }

        #[test]
        fn v6_reply_round_trip(ident in 0u16.., seq in 0u16.., host in 0u64..) {
            let from = Ipv6Addr::from((0x2001_0db8_0042_0002u128 << 64) | u128::from(host));
            let mut m = icmp::echo_request(EchoKind::V6, ident, seq, PAYLOAD);
            // An ICMPv6 request is not a reply; turned into one (type 129) it is.
            proptest::prop_assert_eq!(parse_echo_reply_v6(&m, from), None);
            m[0] = icmp::V6_ECHO_REPLY;
            proptest::prop_assert_eq!(
                parse_echo_reply_v6(&m, from),
                Some(EchoReply { from: IpAddr::V6(from), ident, seq })
            );
        }
    }
}
