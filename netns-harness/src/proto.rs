//! The responders (`netns-harness serve`, one per pod) and the probe clients
//! (`netns-harness probe tcp|udp|dns <ip:port>`): TCP echo, UDP echo, a minimal DNS server
//! that answers `kubernetes.default` with an A record, like the CoreDNS check of field
//! problem P3, and a TCP port that tells a client the source address it arrived from
//! (`netns-harness whoami <ip:port>`: what NAT did on the way).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// TCP echo port of the responders.
pub const TCP_PORT: u16 = 7000;
/// UDP echo port of the responders.
pub const UDP_PORT: u16 = 7001;
/// DNS port of the responders.
pub const DNS_PORT: u16 = 53;
/// TCP port of the responders that answers with the client's address as seen by the pod.
pub const WHOAMI_PORT: u16 = 7002;
/// The name the DNS probe asks for.
pub const DNS_NAME: &str = "kubernetes.default";
/// The A record the responder returns (the conventional kubernetes Service IP).
pub const DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Upper bound of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const MAX_TCP_CONNS: usize = 64;
const MAX_MSG: usize = 4096;

/// Responder settings.
#[derive(Debug, Clone)]
pub struct ServeOpts {
    /// TCP echo port.
    pub tcp_port: u16,
    /// UDP echo port.
    pub udp_port: u16,
    /// DNS port.
    pub dns_port: u16,
    /// Source-address port ([`WHOAMI_PORT`]).
    pub whoami_port: u16,
    /// The responder exits on its own after this long (a safety net if teardown never runs).
    pub lifetime: Duration,
    /// Bind `[::]` (dual-stack sockets: IPv6 and IPv4-mapped clients) instead of 0.0.0.0.
    pub ipv6: bool,
}

impl Default for ServeOpts {
    fn default() -> Self {
        ServeOpts {
            tcp_port: TCP_PORT,
            udp_port: UDP_PORT,
            dns_port: DNS_PORT,
            whoami_port: WHOAMI_PORT,
            lifetime: Duration::from_secs(6 * 3600),
            ipv6: false,
        }
    }
}

/// Runs the responders until `opts.lifetime` elapses. Prints `ready` once every socket is bound.
pub fn serve(opts: &ServeOpts) -> Result<()> {
    let any = if opts.ipv6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let tcp = TcpListener::bind((any, opts.tcp_port)).context("bind tcp")?;
    let udp = UdpSocket::bind((any, opts.udp_port)).context("bind udp")?;
    let dns = UdpSocket::bind((any, opts.dns_port)).context("bind dns")?;
    let whoami = TcpListener::bind((any, opts.whoami_port)).context("bind whoami")?;
    let deadline = Instant::now() + opts.lifetime;
    println!(
        "ready tcp={} udp={} dns={}",
        opts.tcp_port, opts.udp_port, opts.dns_port
    );
    std::io::stdout().flush()?;

    let udp_thread = std::thread::spawn(move || udp_loop(udp, deadline, |q| Some(q.to_vec())));
    let dns_thread = std::thread::spawn(move || udp_loop(dns, deadline, dns_answer));
    let whoami_thread = std::thread::spawn(move || whoami_loop(whoami, deadline));

    tcp.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    while Instant::now() < deadline {
        match tcp.accept() {
            Ok((conn, _)) => {
                if active.load(Ordering::SeqCst) >= MAX_TCP_CONNS {
                    continue; // dropped: the probe sees a reset/EOF and reports it
                }
                active.fetch_add(1, Ordering::SeqCst);
                let active = Arc::clone(&active);
                std::thread::spawn(move || {
                    let _ = tcp_echo(conn);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _ = udp_thread.join();
    let _ = dns_thread.join();
    let _ = whoami_thread.join();
    Ok(())
}

/// Answers each connection with the peer's IP address and a newline, then closes it.
fn whoami_loop(listener: TcpListener, deadline: Instant) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_write_timeout(Some(PROBE_TIMEOUT));
                // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; say a.b.c.d.
                let ip = peer.ip().to_canonical();
                let _ = conn.write_all(format!("{ip}\n").as_bytes());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Connects to a whoami port and returns the address the server saw this connection from.
pub fn probe_whoami(addr: SocketAddr, timeout: Duration) -> Result<std::net::IpAddr> {
    let conn =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    conn.set_read_timeout(Some(timeout))?;
    let mut buf = Vec::new();
    conn.take(64).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{addr} answered {text:?}, not an address"))
}

fn tcp_echo(mut conn: TcpStream) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(PROBE_TIMEOUT))?;
    conn.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_MSG];
    let mut got = 0;
    // One line (or up to MAX_MSG bytes) in, the same bytes out.
    while got < buf.len() {
        let n = conn.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if buf[..got].contains(&b'\n') {
            break;
        }
    }
    conn.write_all(&buf[..got])?;
    Ok(())
}

fn udp_loop(sock: UdpSocket, deadline: Instant, answer: impl Fn(&[u8]) -> Option<Vec<u8>>) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = vec![0u8; MAX_MSG];
    while Instant::now() < deadline {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(reply) = buf.get(..n).and_then(&answer) {
                let _ = sock.send_to(&reply, from);
            }
        }
    }
}

fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{t}", std::process::id())
}

/// TCP request/response: connect, send a line, expect it back. Returns the round-trip time.
pub fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    probe_tcp_sized(addr, timeout, 0)
}

/// Largest request [`probe_tcp_sized`] sends (the responder echoes at most this much).
pub const MAX_TCP_PROBE: usize = MAX_MSG;

/// [`probe_tcp`] with a request padded to `bytes` (at most [`MAX_TCP_PROBE`]; smaller values
/// send the short line): a few KB make the request and the echo span several full-size
/// segments, so GSO/TSO and checksum offload paths are exercised, not only one small packet.
pub fn probe_tcp_sized(addr: SocketAddr, timeout: Duration, bytes: usize) -> Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("tcp connect {addr}"))?;
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(10));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))?;
    let mut msg = format!("netns-harness {}", nonce());
    let want = bytes.min(MAX_TCP_PROBE);
    while msg.len() + 1 < want {
        msg.push(char::from(b'a' + (msg.len() % 26) as u8));
    }
    msg.push('\n');
    s.write_all(msg.as_bytes()).context("tcp send")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < msg.len() {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("tcp read from {addr}"))?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got != msg.as_bytes() {
        bail!(
            "tcp echo from {addr} returned {} bytes, not the request",
            got.len()
        );
    }
    Ok(start.elapsed())
}

/// Sends `req` over UDP and returns the first reply accepted by `accept`; one retransmission
/// halfway through `timeout`.
fn udp_exchange(
    addr: SocketAddr,
    req: &[u8],
    timeout: Duration,
    accept: impl Fn(&[u8]) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    let any = match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sock = UdpSocket::bind((any, 0))?;
    sock.connect(addr)?;
    let mut buf = [0u8; MAX_MSG];
    for attempt in 0..2u32 {
        sock.send(req)
            .with_context(|| format!("udp send to {addr}"))?;
        let until = start + timeout * (attempt + 1) / 2;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))?;
            match sock.recv(&mut buf) {
                Ok(n) if buf.get(..n).is_some_and(&accept) => return Ok(start.elapsed()),
                Ok(_) => continue, // stray or mismatched datagram
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e).with_context(|| format!("udp recv from {addr}")),
            }
        }
    }
    bail!("no reply from {addr} within {timeout:?}")
}

/// UDP request/response against the echo responder.
pub fn probe_udp(addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let msg = format!("netns-harness {}", nonce()).into_bytes();
    udp_exchange(addr, &msg, timeout, |r| r == msg.as_slice())
}

/// DNS-style request/response: asks for `kubernetes.default` A and checks the answer.
pub fn probe_dns(addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = (std::process::id() as u16) ^ (nanos >> 8) as u16;
    let query = dns_query(id, DNS_NAME);
    udp_exchange(
        addr,
        &query,
        timeout,
        |r| matches!(parse_dns_answer(r, id), Ok(ip) if ip == DNS_ANSWER),
    )
    .with_context(|| format!("dns {DNS_NAME} A via {addr}"))
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let l = &label.as_bytes()[..label.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

/// A standard query (RD set) for `name` type A class IN.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    push_name(&mut q, name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads an uncompressed name at `at`; returns (dotted name, offset after it).
fn read_name(b: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    for _ in 0..128 {
        let len = usize::from(*b.get(at)?);
        if len == 0 {
            return Some((labels.join("."), at + 1));
        }
        if len & 0xc0 != 0 {
            return None; // compression is not used in queries
        }
        let label = b.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + len;
    }
    None
}

/// Skips a possibly compressed name; returns the offset after it.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(at)?;
        if len == 0 {
            return Some(at + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        at += 1 + usize::from(len);
    }
    None
}

/// The responder's answer to a DNS query: A [`DNS_ANSWER`] for [`DNS_NAME`] (or its
/// `.svc.cluster.local` form), NXDOMAIN for other names, nothing for garbage.
pub fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    let flags = be16(q, 2)?;
    if flags & 0x8000 != 0 || be16(q, 4)? != 1 {
        return None; // a response, or not exactly one question
    }
    let (name, end) = read_name(q, 12)?;
    let qtype = be16(q, end)?;
    let qclass = be16(q, end + 2)?;
    let question = q.get(12..end + 4)?;
    let name = name.to_ascii_lowercase();
    let known = name == DNS_NAME || name == "kubernetes.default.svc.cluster.local";
    let answer = known && qclass == 1 && (qtype == 1 || qtype == 255);
    let rcode: u16 = if known { 0 } else { 3 };
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(q.get(0..2)?);
    // QR, AA, RD copied, RA, rcode.
    r.extend_from_slice(&(0x8400 | (flags & 0x0100) | 0x0080 | rcode).to_be_bytes());
    r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if answer {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(&DNS_ANSWER.octets());
    }
    Some(r)
}

/// Checks a DNS response to query `id` and returns its first A record.
pub fn parse_dns_answer(r: &[u8], id: u16) -> Result<Ipv4Addr> {
    let short = || anyhow!("truncated DNS response");
    if be16(r, 0).ok_or_else(short)? != id {
        bail!("DNS id mismatch");
    }
    let flags = be16(r, 2).ok_or_else(short)?;
    if flags & 0x8000 == 0 {
        bail!("not a DNS response");
    }
    if flags & 0x000f != 0 {
        bail!("DNS rcode {}", flags & 0x000f);
    }
    let qd = be16(r, 4).ok_or_else(short)?;
    let an = be16(r, 6).ok_or_else(short)?;
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(r, at).ok_or_else(short)? + 4;
    }
    for _ in 0..an {
        at = skip_name(r, at).ok_or_else(short)?;
        let rtype = be16(r, at).ok_or_else(short)?;
        let rdlen = usize::from(be16(r, at + 8).ok_or_else(short)?);
        let rdata = r.get(at + 10..at + 10 + rdlen).ok_or_else(short)?;
        if rtype == 1 && rdlen == 4 {
            return Ok(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        at += 10 + rdlen;
    }
    bail!("DNS response without an A record")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_roundtrip() {
        let q = dns_query(0x1234, DNS_NAME);
        let r = dns_answer(&q).unwrap();
        assert_eq!(parse_dns_answer(&r, 0x1234).unwrap(), DNS_ANSWER);
        assert!(parse_dns_answer(&r, 0x1235).is_err());
        let nx = dns_answer(&dns_query(7, "example.org")).unwrap();
        let err = parse_dns_answer(&nx, 7).unwrap_err();
        assert!(err.to_string().contains("rcode 3"), "{err}");
    }

    #[test]
    fn dns_garbage_never_panics() {
        let q = dns_query(1, DNS_NAME);
        for cut in 0..q.len() {
            let _ = dns_answer(&q[..cut]);
            let _ = parse_dns_answer(&q[..cut], 1);
        }
        let r = dns_answer(&q).unwrap();
        for cut in 0..r.len() {
            assert!(parse_dns_answer(&r[..cut], 1).is_err());
        }
        assert!(dns_answer(&[0xff; 40]).is_none());
    }

    #[test]
    fn loopback_responders() {
        // Ephemeral ports on 127.0.0.1 of whatever namespace runs the unit tests; nothing leaves
        // the host.
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let taddr = tcp.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((c, _)) = tcp.accept() {
                let _ = tcp_echo(c);
            }
        });
        assert!(probe_tcp(taddr, PROBE_TIMEOUT).is_ok());

        let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
        let daddr = dns.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        std::thread::spawn(move || udp_loop(dns, deadline, dns_answer));
        assert!(probe_dns(daddr, PROBE_TIMEOUT).is_ok());

        // Nobody listens: the UDP probe must fail within its bound.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = Instant::now();
        assert!(probe_udp(silent.local_addr().unwrap(), Duration::from_millis(300)).is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
