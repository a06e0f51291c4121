//! Small IPv4/IPv6 prefix and MAC helpers (the harness stays free of flannel-rs and of extra crates).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 prefix `a.b.c.d/len`; `addr` keeps host bits (so `10.244.1.1/24` round-trips).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// Address as written.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Cidr {
    /// Builds a prefix; `len` must be at most 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Cidr> {
        if len > 32 {
            bail!("prefix length {len} > 32");
        }
        Ok(Cidr { addr, len })
    }

    /// The netmask as an integer.
    pub fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The same prefix with host bits cleared.
    pub fn trunc(&self) -> Cidr {
        Cidr {
            addr: self.network(),
            len: self.len,
        }
    }

    /// Number of addresses in the prefix.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// The address `n` positions after the network address, if still inside the prefix.
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        if n >= self.size() {
            return None;
        }
        let base = u64::from(u32::from(self.network()));
        u32::try_from(base + n).ok().map(Ipv4Addr::from)
    }

    /// True when `ip` lies inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// True when `other` lies entirely inside this prefix.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.network())
    }

    /// True when the two prefixes share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// flannel's etcd key form: `10.244.1.0-24`.
    pub fn key(&self) -> String {
        format!("{}-{}", self.network(), self.len)
    }

    /// Parses flannel's key form `a.b.c.d-len` (IPv4 part only; a `&v6` suffix is ignored).
    pub fn from_key(key: &str) -> Result<Cidr> {
        let v4 = key.split('&').next().unwrap_or(key);
        let (a, l) = v4
            .rsplit_once('-')
            .ok_or_else(|| anyhow!("lease key {key:?} is not a.b.c.d-len"))?;
        Cidr::new(
            a.parse().with_context(|| format!("lease key {key:?}"))?,
            l.parse().with_context(|| format!("lease key {key:?}"))?,
        )
    }
}

/// Splits `addr/len` text (either family; `shape` names the expected form in the error).
fn parse_prefix<A>(s: &str, shape: &str) -> Result<(A, u8)>
where
    A: FromStr,
    A::Err: std::error::Error + Send + Sync + 'static,
{
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| anyhow!("{s:?} is not {shape}"))?;
    let addr = a
        .trim()
        .parse()
        .with_context(|| format!("bad address in {s:?}"))?;
    let len = l
        .trim()
        .parse()
        .with_context(|| format!("bad prefix length in {s:?}"))?;
    Ok((addr, len))
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Cidr> {
        let (addr, len) = parse_prefix(s, "a.b.c.d/len")?;
        Cidr::new(addr, len)
    }
}

/// Prefixes serialize as their text form (`10.244.1.0/24`, `fd42:244::/56`).
macro_rules! text_serde {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
text_serde!(Cidr, Cidr6);

/// An IPv6 prefix `a:b::/len`; `addr` keeps host bits (so `fd42:244:0:1::1/64` round-trips).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr6 {
    /// Address as written.
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub len: u8,
}

impl Cidr6 {
    /// Builds a prefix; `len` must be at most 128.
    pub fn new(addr: Ipv6Addr, len: u8) -> Result<Cidr6> {
        if len > 128 {
            bail!("prefix length {len} > 128");
        }
        Ok(Cidr6 { addr, len })
    }

    fn mask(&self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    /// The same prefix with host bits cleared.
    pub fn trunc(&self) -> Cidr6 {
        Cidr6 {
            addr: self.network(),
            len: self.len,
        }
    }

    /// The address `n` positions after the network address, if still inside the prefix.
    pub fn nth(&self, n: u128) -> Option<Ipv6Addr> {
        if self.len > 0 && n >> (128 - u32::from(self.len)) != 0 {
            return None;
        }
        u128::from(self.network())
            .checked_add(n)
            .map(Ipv6Addr::from)
    }

    /// True when `ip` lies inside the prefix.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.network())
    }

    /// True when `other` lies entirely inside this prefix.
    pub fn contains_cidr(&self, other: &Cidr6) -> bool {
        other.len >= self.len && self.contains(other.network())
    }

    /// True when the two prefixes share any address.
    pub fn overlaps(&self, other: &Cidr6) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The IPv6 half of flannel's lease key: `fd42:244:0:1::-64`.
    pub fn key(&self) -> String {
        format!("{}-{}", self.network(), self.len)
    }
}

impl fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr6 {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Cidr6> {
        let (addr, len) = parse_prefix(s, "an IPv6 prefix addr/len")?;
        Cidr6::new(addr, len)
    }
}

/// flannel's lease key for the families a lease holds: `10.244.1.0-24`,
/// `10.244.1.0-24&fd42:244:0:1::-64`, or `0.0.0.0-0&fd42:244:0:1::-64` for an IPv6-only lease.
pub fn lease_key(v4: Option<&Cidr>, v6: Option<&Cidr6>) -> String {
    let head = v4.map_or_else(|| "0.0.0.0-0".to_string(), Cidr::key);
    match v6 {
        Some(v6) => format!("{head}&{}", v6.key()),
        None => head,
    }
}

/// Parses a lease key into its families (`0.0.0.0-0` is "no IPv4").
pub fn parse_lease_key(key: &str) -> Result<(Option<Cidr>, Option<Cidr6>)> {
    let v4 = Cidr::from_key(key)?;
    let v6 = match key.split_once('&') {
        None => None,
        Some((_, rest)) => {
            let (a, l) = rest
                .rsplit_once('-')
                .ok_or_else(|| anyhow!("lease key {key:?}: IPv6 part is not addr-len"))?;
            Some(Cidr6::new(
                a.parse().with_context(|| format!("lease key {key:?}"))?,
                l.parse().with_context(|| format!("lease key {key:?}"))?,
            )?)
        }
    };
    let v4 = (v4.len != 0 || v6.is_none()).then_some(v4);
    Ok((v4, v6))
}

/// The underlay range every node address comes from (RFC 2544 benchmarking space).
pub fn underlay_range() -> Cidr {
    Cidr {
        addr: Ipv4Addr::new(198, 18, 0, 0),
        len: 15,
    }
}

/// The only range pod networks may use (inside namespaces).
pub fn pod_range() -> Cidr {
    Cidr {
        addr: Ipv4Addr::new(10, 244, 0, 0),
        len: 16,
    }
}

/// The only range IPv6 pod networks may use (inside namespaces; ULA space).
pub fn pod_range6() -> Cidr6 {
    Cidr6 {
        addr: Ipv6Addr::new(0xfd42, 0x244, 0, 0, 0, 0, 0, 0),
        len: 32,
    }
}

/// A node's IPv6 underlay address (documentation space 2001:db8:18::/64, index `i`).
pub fn underlay_ip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, i as u16)
}

/// Random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut f = std::fs::File::open("/dev/urandom").context("open /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b).context("read /dev/urandom")?;
    Ok(b)
}

/// A random locally administered unicast MAC in flannel's lower-case colon form.
pub fn random_mac() -> Result<String> {
    let mut b: [u8; 6] = random_bytes()?;
    b[0] = (b[0] & 0xfe) | 0x02;
    Ok(b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Checks the lower-case colon form `aa:bb:cc:dd:ee:ff`.
pub fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_arith() {
        let c: Cidr = "10.244.3.1/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 244, 3, 0));
        assert_eq!(c.nth(1), Some(Ipv4Addr::new(10, 244, 3, 1)));
        assert_eq!(c.nth(256), None);
        assert_eq!(c.key(), "10.244.3.0-24");
        assert_eq!(Cidr::from_key("10.244.3.0-24").unwrap(), c.trunc());
        assert!(pod_range().contains_cidr(&c));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 4, 0)));
        let z: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(z.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(z.overlaps(&c));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!(Cidr::from_key("garbage").is_err());
    }

    #[test]
    fn mac_form() {
        let m = random_mac().unwrap();
        assert!(valid_mac(&m), "{m}");
        let first = u8::from_str_radix(&m[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "local unicast");
        assert!(!valid_mac("0E:00:00:00:00"));
    }

    #[test]
    fn cidr6_and_lease_keys() {
        let c: Cidr6 = "fd42:244:0:3::1/64".parse().unwrap();
        assert_eq!(c.network().to_string(), "fd42:244:0:3::");
        assert_eq!(c.nth(1).unwrap().to_string(), "fd42:244:0:3::1");
        assert_eq!(c.nth(1 << 64), None);
        assert!(pod_range6().contains_cidr(&c));
        assert!(!c.contains("fd42:244:0:4::1".parse().unwrap()));
        let v4: Cidr = "10.244.3.0/24".parse().unwrap();
        let dual = lease_key(Some(&v4), Some(&c));
        assert_eq!(dual, "10.244.3.0-24&fd42:244:0:3::-64");
        assert_eq!(parse_lease_key(&dual).unwrap(), (Some(v4), Some(c.trunc())));
        let v6only = lease_key(None, Some(&c));
        assert_eq!(v6only, "0.0.0.0-0&fd42:244:0:3::-64");
        assert_eq!(parse_lease_key(&v6only).unwrap(), (None, Some(c.trunc())));
        assert_eq!(parse_lease_key("10.244.3.0-24").unwrap(), (Some(v4), None));
        assert!(parse_lease_key("10.244.3.0-24&zz-64").is_err());
    }
}
