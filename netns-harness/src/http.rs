//! A minimal HTTP/1.1 client for the run's control plane (etcd's JSON gateway, the test
//! Kubernetes API server). The servers listen inside the run's control-plane namespace, so the
//! connection is opened from a helper thread that entered that namespace: the harness itself
//! stays in the root namespace and no address is ever added there.
//!
//! One request per connection (`Connection: close`); bodies with `Content-Length`, chunked
//! encoding or read to end of stream; responses bounded in size and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::sys;

/// Largest response body accepted.
const MAX_RESPONSE: usize = 32 << 20;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// True for 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "HTTP {} body is not JSON: {}",
                self.status,
                self.text().chars().take(200).collect::<String>()
            )
        })
    }
}

/// Opens a TCP connection to `addr` from inside network namespace `ns`.
pub fn connect_in_ns(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let ns_owned = ns.to_string();
    let handle = std::thread::Builder::new()
        .name("netns-connect".into())
        .spawn(move || -> std::io::Result<TcpStream> {
            sys::enter_netns(&ns_owned)?;
            TcpStream::connect_timeout(&addr, timeout)
        })
        .context("spawn connect thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("connect thread panicked"))?
        .with_context(|| format!("connect to {addr} in namespace {ns}"))
}

/// Sends one request and reads the whole response (`timeout` bounds the whole exchange).
pub fn request(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_in_ns(ns, addr, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nUser-Agent: netns-harness\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let line = format!("{method} http://{addr}{path}");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .with_context(|| format!("send {line}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{line}: no complete response within {timeout:?}");
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_RESPONSE {
                    bail!("{line}: response larger than {MAX_RESPONSE} bytes");
                }
                if complete(&raw) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read response of {line}")),
        }
    }
    parse_response(&raw).with_context(|| format!("response of {line}"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A parsed response head.
struct Head {
    status: u16,
    /// (lower-cased name, value).
    headers: Vec<(String, String)>,
    /// Offset of the body in the raw response.
    body_start: usize,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length").and_then(|v| v.parse().ok())
    }
}

/// The status line and headers, once the whole head arrived.
fn split_head(raw: &[u8]) -> Option<Head> {
    let end = find(raw, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Head {
        status,
        headers,
        body_start: end + 4,
    })
}

/// True once a response with a known length is complete (servers may keep the connection
/// open despite `Connection: close`).
fn complete(raw: &[u8]) -> bool {
    let Some(head) = split_head(raw) else {
        return false;
    };
    if head.chunked() {
        return dechunk(&raw[head.body_start..]).is_ok_and(|(_, done)| done);
    }
    match head.content_length() {
        Some(len) => raw.len() >= head.body_start + len,
        None => false,
    }
}

/// Decodes a chunked body: (data, saw the last chunk).
fn dechunk(mut b: &[u8]) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(b, b"\r\n") else {
            return Ok((out, false));
        };
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        let data_start = eol + 2;
        if size == 0 {
            return Ok((out, true));
        }
        let data_end = data_start
            .checked_add(size)
            .ok_or_else(|| anyhow!("chunk size overflow"))?;
        if b.len() < data_end + 2 {
            return Ok((out, false));
        }
        out.extend_from_slice(&b[data_start..data_end]);
        b = &b[data_end + 2..];
    }
}

/// Parses a complete raw response.
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let head =
        split_head(raw).ok_or_else(|| anyhow!("no HTTP response head ({} bytes)", raw.len()))?;
    let rest = &raw[head.body_start..];
    let body = if head.chunked() {
        dechunk(rest)?.0
    } else if let Some(len) = head.content_length() {
        rest.get(..len)
            .ok_or_else(|| anyhow!("body shorter than Content-Length {len}"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status: head.status,
        body,
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (etcd's JSON gateway encodes keys and values so).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard (or URL-safe) base64, padding optional.
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            b'\r' | b'\n' => continue,
            _ => bail!("invalid base64 character {:?}", char::from(c)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrip() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            (
                "/coreos.com/network/config",
                "L2NvcmVvcy5jb20vbmV0d29yay9jb25maWc=",
            ),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
        }
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn responses_parse() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert!(complete(raw));
        assert!(!complete(&raw[..raw.len() - 5]));
        let r = parse_response(raw).unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "abcde"));
        assert!(!r.ok());
        assert!(parse_response(b"garbage").is_err());
    }
}
