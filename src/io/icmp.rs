//! ICMP echo ("ping") over a raw IPv4 socket: the one peer-probing implementation shared by
//! `flanneld doctor` and the daemon's prober.
//!
//! A raw socket (`SOCK_RAW`, `IPPROTO_ICMP`, needs `CAP_NET_RAW`) rather than an unprivileged
//! `SOCK_DGRAM` ping socket: flanneld runs as root (or with NET_RAW, as kube-flannel.yml
//! grants), while ping sockets depend on `net.ipv4.ping_group_range`, which is "1 0"
//! (disabled) by default in every new network namespace. The socket acts in the namespace of
//! the thread that opens it; the kernel chooses the source address from the route, so a probe
//! to a peer's VTEP leaves over the overlay device with this node's VTEP address.
//!
//! The socket sees every ICMP packet of the namespace: an `ICMP_FILTER` keeps only echo
//! replies, and replies are matched on identifier, sequence number and source address.
//! Probing is bounded: one outstanding request per target, sends paced by [`SEND_GAP`].

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::wire::icmp::{self, ECHO_REPLY, ECHO_REQUEST};
use crate::wire::{ipv4, IpProtocol};

/// `ICMP_FILTER` socket option of `SOL_RAW` (linux/icmp.h).
const ICMP_FILTER: libc::c_int = 1;
/// Payload of every request, so probes are recognisable in captures.
const PAYLOAD: &[u8] = b"flannel-rs probe";
/// Pause after each request: at most ~500 requests per second leave this node.
pub const SEND_GAP: Duration = Duration::from_millis(2);
/// Targets per round: sequence numbers of one round must not wrap.
const CHUNK: usize = 4096;
/// Upper bound on stale packets discarded before a round.
const MAX_DRAIN: usize = 4096;

/// An echo reply seen on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply {
    /// Who answered (the IPv4 source address).
    pub from: Ipv4Addr,
    /// ICMP identifier.
    pub ident: u16,
    /// ICMP sequence number.
    pub seq: u16,
}

/// The echo payload that makes a request an IPv4 packet of `packet_len` bytes (20-byte header,
/// 8-byte ICMP header): the probe marker repeated, never shorter than it, at most 64 KiB.
pub fn sized_payload(packet_len: usize) -> Vec<u8> {
    let len = packet_len.saturating_sub(28).clamp(PAYLOAD.len(), 65_507);
    PAYLOAD.iter().copied().cycle().take(len).collect()
}

/// An ICMP echo request message (no IP header) with a valid checksum.
pub fn echo_request(ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut msg = vec![0u8; icmp::HEADER_LEN + payload.len()];
    let mut p = icmp::Packet::new_unchecked(&mut msg[..]);
    p.set_header(ECHO_REQUEST, 0);
    p.set_echo(ident, seq);
    p.payload_mut().copy_from_slice(payload);
    p.fill_checksum();
    msg
}

/// Parses what a raw IPv4 ICMP socket delivers (IP header, then ICMP) as an echo reply; `None`
/// for anything else or anything truncated or with a wrong ICMP checksum.
pub fn parse_echo_reply(packet: &[u8]) -> Option<EchoReply> {
    let ip = ipv4::Packet::new_checked(packet).ok()?;
    if ip.version() != 4 || ip.next_header() != IpProtocol::Icmp {
        return None;
    }
    let msg = icmp::Packet::new_checked(ip.payload()).ok()?;
    if msg.msg_type() != ECHO_REPLY || msg.code() != 0 || !msg.verify_checksum() {
        return None;
    }
    Some(EchoReply {
        from: ip.src_addr(),
        ident: msg.ident(),
        seq: msg.seq(),
    })
}

/// A raw ICMP socket sending echo requests and collecting the replies to them.
#[derive(Debug)]
pub struct Pinger {
    fd: OwnedFd,
    ident: u16,
    next_seq: u16,
    payload: Vec<u8>,
}

impl Pinger {
    /// Opens the socket in the calling thread's network namespace (needs `CAP_NET_RAW`).
    pub fn open() -> io::Result<Pinger> {
        // SAFETY: socket() takes constants and returns a new descriptor or -1.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we own exclusively from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Deliver echo replies only (the filter's set bits are the types dropped).
        let filter: u32 = !(1u32 << ECHO_REPLY);
        // SAFETY: the option value points at a live u32 of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_RAW,
                ICMP_FILTER,
                (&filter as *const u32).cast(),
                mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut id = [0u8; 4];
        // Any identifier works; a random one keeps concurrent pingers' replies apart.
        let _ = getrandom::fill(&mut id);
        Ok(Pinger {
            fd,
            ident: u16::from_be_bytes([id[0], id[1]]),
            next_seq: u16::from_be_bytes([id[2], id[3]]),
            payload: PAYLOAD.to_vec(),
        })
    }

    /// From now on, requests are IPv4 packets of `packet_len` bytes (header included; at least
    /// the default size) with Don't Fragment set and this host's cached path MTU ignored
    /// (`IP_PMTUDISC_PROBE`): a reply proves that packets of that size cross the path. Used
    /// to check the overlay MTU end to end.
    pub fn sized_dont_fragment(&mut self, packet_len: usize) -> io::Result<()> {
        let probe: libc::c_int = libc::IP_PMTUDISC_PROBE;
        // SAFETY: the option value points at a live c_int of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&probe as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.payload = sized_payload(packet_len);
        Ok(())
    }

    /// The ICMP identifier of this pinger's requests.
    pub fn ident(&self) -> u16 {
        self.ident
    }

    /// Probes every target with up to `tries` echo requests, waiting `timeout` for the
    /// replies of each round; returns, per target, whether it answered. Blocking: call it from
    /// a dedicated thread (`spawn_blocking` in async code). Takes at least
    /// `targets.len() * SEND_GAP` per round.
    pub fn probe(&mut self, targets: &[Ipv4Addr], tries: u32, timeout: Duration) -> Vec<bool> {
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
        targets: &[Ipv4Addr],
        pending: &[usize],
        timeout: Duration,
        answered: &mut [bool],
    ) {
        self.drain();
        let mut outstanding: HashMap<u16, usize> = HashMap::with_capacity(pending.len());
        for &i in pending {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            if self.send(targets[i], seq).is_ok() {
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
            let n = match self.recv(&mut buf, left) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let Some(reply) = buf.get(..n).and_then(parse_echo_reply) else {
                continue;
            };
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
        for _ in 0..MAX_DRAIN {
            if self.recv_now(&mut buf).is_err() {
                return;
            }
        }
    }

    /// One queued packet into `buf` without waiting (`WouldBlock` when none is queued).
    fn recv_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is live and writable for its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn send(&self, dst: Ipv4Addr, seq: u16) -> io::Result<()> {
        let msg = echo_request(self.ident, seq, &self.payload);
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value before filling it in.
        let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: buffer and address point at live memory of the lengths passed.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
                (&sa as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for one packet; `None` on timeout.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Ok(None);
        }
        match self.recv_now(buf) {
            Ok(n) => Ok(Some(n)),
            // Readable but taken meanwhile: an empty read, not a timeout.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_requests_have_the_asked_packet_length() {
        assert_eq!(20 + echo_request(1, 2, &sized_payload(1450)).len(), 1450);
        assert_eq!(20 + echo_request(1, 2, &sized_payload(8950)).len(), 8950);
        assert_eq!(sized_payload(10), PAYLOAD);
        assert!(sized_payload(1450).starts_with(PAYLOAD));
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
                from: src,
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
            proptest::prop_assert_eq!(got, Some(EchoReply { from: src, ident, seq }));
        }
    }
}
