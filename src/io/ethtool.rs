//! Offload features through the ethtool ioctl (`SIOCETHTOOL`), as `ethtool -k` / `ethtool -K`
//! do: features are addressed by name, looked up in the kernel's `ETH_SS_FEATURES` string set,
//! then read with `ETHTOOL_GFEATURES` and changed with `ETHTOOL_SFEATURES`.
//!
//! Everything here acts in the network namespace of the calling thread (the ioctl socket is
//! created per call).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GSTRINGS`: get a string set.
const ETHTOOL_GSTRINGS: u32 = 0x1b;
/// `ETHTOOL_GSSET_INFO`: get string set sizes.
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// `ETHTOOL_GFEATURES`: get device features.
const ETHTOOL_GFEATURES: u32 = 0x3a;
/// `ETHTOOL_SFEATURES`: change device features.
const ETHTOOL_SFEATURES: u32 = 0x3b;
/// `ETH_SS_FEATURES`: the feature-name string set.
const ETH_SS_FEATURES: u32 = 4;
/// `ETH_GSTRING_LEN`.
const ETH_GSTRING_LEN: usize = 32;
/// Upper bound on the feature count accepted from the kernel (Linux has ~70).
const MAX_FEATURES: usize = 1024;

/// The feature `ethtool -k` shows as `tx-checksum-ip-generic` (`NETIF_F_HW_CSUM`).
pub const TX_CHECKSUM_IP_GENERIC: &str = "tx-checksum-ip-generic";

/// Whether `tx-checksum-ip-generic` is active on `ifname` (`ethtool -k <ifname>`).
pub fn tx_checksum_ip_generic(ifname: &str) -> io::Result<bool> {
    feature(ifname, TX_CHECKSUM_IP_GENERIC)
}

/// `ethtool -K <ifname> tx-checksum-ip-generic on|off`. Fails if the device refuses the change.
pub fn set_tx_checksum_ip_generic(ifname: &str, on: bool) -> io::Result<()> {
    set_feature(ifname, TX_CHECKSUM_IP_GENERIC, on)
}

/// Whether the named offload feature is active on `ifname` (`ethtool -k`).
pub fn feature(ifname: &str, name: &str) -> io::Result<bool> {
    let dev = Device::open(ifname)?;
    let index = dev.feature_index(name)?;
    let blocks = dev.get_features()?;
    Ok(bit(&blocks.active, index))
}

/// `ethtool -K <ifname> <name> on|off`, then reads back the active state and fails with
/// `Unsupported` if the kernel did not apply it (feature fixed or not changeable).
pub fn set_feature(ifname: &str, name: &str, on: bool) -> io::Result<()> {
    let dev = Device::open(ifname)?;
    let index = dev.feature_index(name)?;
    let words = dev.get_features()?.words;
    let word = index / 32;
    let mask = 1u32 << (index % 32);
    let mut req = Vec::with_capacity(8 + words * 8);
    push_u32(&mut req, ETHTOOL_SFEATURES);
    push_u32(&mut req, u32::try_from(words).map_err(invalid_data)?);
    for w in 0..words {
        let (valid, requested) = if w == word {
            (mask, if on { mask } else { 0 })
        } else {
            (0, 0)
        };
        push_u32(&mut req, valid);
        push_u32(&mut req, requested);
    }
    dev.ioctl(&mut req)?;
    let now = bit(&dev.get_features()?.active, index);
    if now != on {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{ifname}: {name} is still {} after requesting {}",
                on_off(now),
                on_off(on)
            ),
        ));
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn invalid_data<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn push_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn read_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let b = buf.get(offset..offset + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn bit(words: &[u32], index: usize) -> bool {
    words
        .get(index / 32)
        .is_some_and(|w| w & (1 << (index % 32)) != 0)
}

/// The result of `ETHTOOL_GFEATURES`.
#[derive(Debug)]
struct Features {
    /// Number of 32-bit feature words the kernel uses (`ETHTOOL_DEV_FEATURE_WORDS`).
    words: usize,
    /// Active features, one bit per feature index.
    active: Vec<u32>,
}

/// An interface name plus an `AF_INET` datagram socket to issue ethtool ioctls on.
#[derive(Debug)]
struct Device {
    name: [libc::c_char; libc::IFNAMSIZ],
    sock: OwnedFd,
}

impl Device {
    fn open(ifname: &str) -> io::Result<Self> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {ifname:?}"),
            ));
        }
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (dst, src) in name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Device { name, sock })
    }

    /// Issues `SIOCETHTOOL` with `data` as the ethtool command buffer (it starts with the
    /// command number). Returns the ioctl's non-negative result.
    fn ioctl(&self, data: &mut [u8]) -> io::Result<libc::c_int> {
        if data.len() < 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "short ethtool buffer",
            ));
        }
        let mut ifr = libc::ifreq {
            ifr_name: self.name,
            ifr_ifru: libc::__c_anonymous_ifr_ifru {
                ifru_data: data.as_mut_ptr().cast::<libc::c_char>(),
            },
        };
        // SAFETY: `ifr` is a valid ifreq whose name is NUL-terminated (checked in `open`) and
        // whose data pointer points to `data`, which lives and stays borrowed mutably for the
        // whole call. Every caller sizes `data` for the largest answer the kernel writes for
        // that command (see the callers), so the kernel never writes past it.
        let rc = unsafe {
            libc::ioctl(
                self.sock.as_raw_fd(),
                libc::SIOCETHTOOL as _,
                (&mut ifr as *mut libc::ifreq).cast::<c_void>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc)
    }

    /// Number of strings in `ETH_SS_FEATURES`.
    fn feature_count(&self) -> io::Result<usize> {
        // struct ethtool_sset_info { u32 cmd; u32 reserved; u64 sset_mask; u32 data[]; }:
        // one bit requested, so the kernel writes at most one data word (24 bytes in total).
        let mut buf = vec![0u8; 24];
        buf[0..4].copy_from_slice(&ETHTOOL_GSSET_INFO.to_ne_bytes());
        buf[8..16].copy_from_slice(&(1u64 << ETH_SS_FEATURES).to_ne_bytes());
        self.ioctl(&mut buf)?;
        let mask = buf
            .get(8..16)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_ne_bytes)
            .unwrap_or(0);
        if mask & (1 << ETH_SS_FEATURES) == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel has no ethtool feature strings",
            ));
        }
        let count = read_u32(&buf, 16).unwrap_or(0) as usize;
        if count == 0 || count > MAX_FEATURES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("implausible ethtool feature count {count}"),
            ));
        }
        Ok(count)
    }

    /// The bit index of a feature name.
    fn feature_index(&self, name: &str) -> io::Result<usize> {
        let count = self.feature_count()?;
        // struct ethtool_gstrings { u32 cmd; u32 string_set; u32 len; u8 data[]; }: the kernel
        // writes `count` strings of ETH_GSTRING_LEN bytes (the feature set size is a kernel
        // compile-time constant, the same number GSSET_INFO returned). A spare block of
        // MAX_FEATURES strings guards against a kernel that disagrees with itself.
        let mut buf = vec![0u8; 12 + (count + MAX_FEATURES) * ETH_GSTRING_LEN];
        buf[0..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
        buf[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
        buf[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
        self.ioctl(&mut buf)?;
        let len = (read_u32(&buf, 8).unwrap_or(0) as usize).min(count + MAX_FEATURES);
        for i in 0..len {
            let start = 12 + i * ETH_GSTRING_LEN;
            let Some(raw) = buf.get(start..start + ETH_GSTRING_LEN) else {
                break;
            };
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            if &raw[..end] == name.as_bytes() {
                return Ok(i);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no ethtool feature named {name:?}"),
        ))
    }

    fn get_features(&self) -> io::Result<Features> {
        // struct ethtool_gfeatures { u32 cmd; u32 size; struct { u32 available, requested,
        // active, never_changed; } features[size]; }: the kernel writes at most `size` blocks,
        // and reports its own word count back in `size`.
        let capacity_words = MAX_FEATURES / 32;
        let mut buf = vec![0u8; 8 + capacity_words * 16];
        buf[0..4].copy_from_slice(&ETHTOOL_GFEATURES.to_ne_bytes());
        buf[4..8].copy_from_slice(&(capacity_words as u32).to_ne_bytes());
        self.ioctl(&mut buf)?;
        let words = (read_u32(&buf, 4).unwrap_or(0) as usize).min(capacity_words);
        if words == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "kernel reported no feature words",
            ));
        }
        let active = (0..words)
            .map(|w| read_u32(&buf, 8 + w * 16 + 8).unwrap_or(0))
            .collect();
        Ok(Features { words, active })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        assert!(bit(&[0, 1 << 3], 35));
        assert!(!bit(&[0, 1 << 3], 36));
        assert!(!bit(&[0], 40));
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(
            Device::open("").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            Device::open("0123456789abcdef").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn loopback_features_readable() {
        // Every namespace has `lo`; reading its features needs no privilege.
        match feature("lo", TX_CHECKSUM_IP_GENERIC) {
            Ok(_) => {}
            Err(e) => panic!("reading lo features: {e}"),
        }
        assert_eq!(
            feature("lo", "no-such-feature").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
