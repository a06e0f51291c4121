//! `/run/flannel/subnet.env`: the file the flannel CNI plugin reads (compat §4).
//!
//! The writer reproduces flannel's `WriteSubnetFile` byte for byte (`KEY=value` lines, no
//! quotes, fixed order) and replaces the file atomically with mode 0644 whatever the umask, so
//! the CNI plugin never reads a half-written file. The reader is as tolerant as flanneld's
//! own (a dotenv parser; comma-separated lists, where more than one entry means "unknown").

use std::collections::HashMap;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};

/// The contents of subnet.env.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster IPv4 network (written when IPv4 is enabled).
    pub network: Option<Ipv4Net>,
    /// The node's IPv4 lease in network form (`10.244.1.0/24`); written as `FLANNEL_SUBNET`
    /// with the first host address (`10.244.1.1/24`).
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// The node's IPv6 lease in network form; written as `FLANNEL_IPV6_SUBNET` (first host).
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`: the overlay MTU pods should use.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades (the CNI plugin then does not).
    pub ipmasq: bool,
}

/// Why subnet.env could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A required key (`FLANNEL_MTU`, `FLANNEL_IPMASQ`) is absent.
    #[error("{path}: {key} is missing")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// A key has a value that does not parse.
    #[error("{path}: {key}={value:?} is not {expected}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What the key accepts.
        expected: &'static str,
    },
}

/// The node's previous subnets, read from an existing subnet.env: the etcd/dir stores try to
/// take them again so pods keep their addresses across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreviousSubnets {
    /// From `FLANNEL_SUBNET`, in network form.
    pub ipv4: Option<Ipv4Net>,
    /// From `FLANNEL_IPV6_SUBNET`, in network form.
    pub ipv6: Option<Ipv6Net>,
}

impl SubnetEnv {
    /// The file contents, exactly as flannel writes them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.network {
            out.push_str(&format!("FLANNEL_NETWORK={n}\n"));
        }
        if let Some(s) = self.subnet {
            let host = Ipv4Addr::from(u32::from(s.network()).wrapping_add(1));
            out.push_str(&format!("FLANNEL_SUBNET={host}/{}\n", s.prefix_len()));
        }
        if let Some(n) = self.ipv6_network {
            out.push_str(&format!("FLANNEL_IPV6_NETWORK={n}\n"));
        }
        if let Some(s) = self.ipv6_subnet {
            let host = Ipv6Addr::from(u128::from(s.network()).wrapping_add(1));
            out.push_str(&format!("FLANNEL_IPV6_SUBNET={host}/{}\n", s.prefix_len()));
        }
        out.push_str(&format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ipmasq
        ));
        out
    }

    /// Writes the file atomically (see [`write_file_atomic`]) with mode 0644.
    pub fn write_atomic(&self, path: &Path) -> io::Result<()> {
        write_file_atomic(path, self.render().as_bytes(), 0o644)
    }

    /// Reads a subnet.env. `FLANNEL_MTU` and `FLANNEL_IPMASQ` are required; network and subnet
    /// keys are optional, invalid entries in them are skipped and a list of more than one entry
    /// reads as absent (as flanneld does). Subnets come back in network form.
    pub fn read(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text = fs::read_to_string(path).map_err(|source| SubnetEnvError::Io {
            path: path.to_owned(),
            source,
        })?;
        SubnetEnv::parse(&text, path)
    }

    /// Parses the text of a subnet.env file; `path` only names it in errors and warnings.
    pub fn parse(text: &str, path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let vars = parse_dotenv(text);
        let required = |key: &'static str| {
            vars.get(key).ok_or_else(|| SubnetEnvError::Missing {
                path: path.to_owned(),
                key,
            })
        };
        let invalid =
            |key: &'static str, value: &str, expected: &'static str| SubnetEnvError::Invalid {
                path: path.to_owned(),
                key,
                value: value.to_owned(),
                expected,
            };
        let mtu_text = required("FLANNEL_MTU")?;
        let mtu = mtu_text
            .parse::<u32>()
            .map_err(|_| invalid("FLANNEL_MTU", mtu_text, "a non-negative integer"))?;
        let masq_text = required("FLANNEL_IPMASQ")?;
        let ipmasq = parse_go_bool(masq_text)
            .ok_or_else(|| invalid("FLANNEL_IPMASQ", masq_text, "true or false"))?;
        Ok(SubnetEnv {
            network: single_cidr(path, &vars, "FLANNEL_NETWORK"),
            subnet: single_cidr(path, &vars, "FLANNEL_SUBNET"),
            ipv6_network: single_cidr(path, &vars, "FLANNEL_IPV6_NETWORK"),
            ipv6_subnet: single_cidr(path, &vars, "FLANNEL_IPV6_SUBNET"),
            mtu,
            ipmasq,
        })
    }
}

/// Reads the previous-subnet hints (`FLANNEL_SUBNET`, `FLANNEL_IPV6_SUBNET`) like flanneld's
/// `ReadCIDRFromSubnetFile`: a missing or unreadable file, an invalid entry or more than one
/// entry gives no hint (with a log line), never an error.
pub fn read_previous_subnets(path: &Path) -> PreviousSubnets {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no previous subnet file");
            return PreviousSubnets::default();
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read previous subnet file");
            return PreviousSubnets::default();
        }
    };
    let vars = parse_dotenv(&text);
    PreviousSubnets {
        ipv4: single_cidr(path, &vars, "FLANNEL_SUBNET"),
        ipv6: single_cidr(path, &vars, "FLANNEL_IPV6_SUBNET"),
    }
}

/// The one CIDR of a (possibly comma-separated) value, in network form.
fn single_cidr<N>(path: &Path, vars: &HashMap<String, String>, key: &str) -> Option<N>
where
    N: core::str::FromStr + TruncNet,
{
    let value = vars.get(key)?;
    let mut found = Vec::new();
    for item in value.split(',') {
        match item.trim().parse::<N>() {
            Ok(n) => found.push(n.trunc_net()),
            Err(_) => {
                tracing::warn!(path = %path.display(), key, value = item, "skipping invalid CIDR");
            }
        }
    }
    if found.len() > 1 {
        tracing::warn!(path = %path.display(), key, value = %value, "more than one entry; ignoring");
        return None;
    }
    found.pop()
}

/// `Ipv4Net::trunc`/`Ipv6Net::trunc` behind one name.
trait TruncNet: Sized {
    fn trunc_net(self) -> Self;
}
impl TruncNet for Ipv4Net {
    fn trunc_net(self) -> Self {
        self.trunc()
    }
}
impl TruncNet for Ipv6Net {
    fn trunc_net(self) -> Self {
        self.trunc()
    }
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A small dotenv reader: `KEY=value` lines, optional `export `, `#` comments, blank lines,
/// single- or double-quoted values, inline ` #` comments after unquoted values. Later keys win.
fn parse_dotenv(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let quoted = |q: char| {
            value
                .strip_prefix(q)
                .and_then(|rest| rest.find(q).map(|end| rest[..end].to_owned()))
        };
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => quoted(q).unwrap_or_else(|| value.to_owned()),
            _ => value
                .split_once(" #")
                .map_or(value, |(v, _)| v)
                .trim_end()
                .to_owned(),
        };
        out.insert(key.trim().to_owned(), value);
    }
    out
}

/// Replaces `path` atomically: creates the parent directory (0755), writes a temporary file in
/// the same directory with exactly `mode` (umask ignored), fsyncs it, renames it over `path`
/// and fsyncs the directory. Readers see the old or the new contents, never a mix.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename durable; failing to sync a directory is not worth an error.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A fresh hidden name next to `path`: `.<name>.tmp-<pid>-<random>`.
pub(crate) fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = format!(
        ".{}.tmp-{}-{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        u64::from_le_bytes(nonce)
    );
    Ok(path.with_file_name(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Upstream's example file (tests/compat.rs checks it against the values it holds).
    const UPSTREAM: &str = include_str!("../../tests/fixtures/compat/subnet.env");

    fn example() -> SubnetEnv {
        SubnetEnv::parse(UPSTREAM, Path::new("subnet.env")).expect("upstream example parses")
    }

    fn scratch(name: &str) -> PathBuf {
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).expect("random");
        std::env::temp_dir().join(format!("flannel-rs-{name}-{:016x}", u64::from_le_bytes(n)))
    }

    #[test]
    fn renders_flannel_example() {
        assert_eq!(example().render(), UPSTREAM);
        let v4only = SubnetEnv {
            ipv6_network: None,
            ipv6_subnet: None,
            ipmasq: false,
            ..example()
        };
        assert_eq!(
            v4only.render(),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn write_read_round_trip_with_mode() {
        let dir = scratch("subnetenv");
        let path = dir.join("nested/subnet.env");
        example().write_atomic(&path).expect("write");
        assert_eq!(SubnetEnv::read(&path).expect("read"), example());
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o644);
        // Overwrite; no temporary files are left behind.
        SubnetEnv {
            mtu: 1400,
            ..example()
        }
        .write_atomic(&path)
        .expect("rewrite");
        assert_eq!(SubnetEnv::read(&path).expect("read").mtu, 1400);
        let names: Vec<_> = fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    proptest::proptest! {
        #[test]
        fn render_read_round_trip(
            net in proptest::option::of((proptest::prelude::any::<u32>(), 0u8..=30)),
            sub in proptest::option::of((proptest::prelude::any::<u32>(), 0u8..=30)),
            net6 in proptest::option::of((proptest::prelude::any::<u128>(), 0u8..=126)),
            sub6 in proptest::option::of((proptest::prelude::any::<u128>(), 0u8..=126)),
            mtu in proptest::prelude::any::<u32>(),
            ipmasq in proptest::prelude::any::<bool>(),
        ) {
            let v4 = |(a, p): (u32, u8)| Ipv4Net::new(Ipv4Addr::from(a), p).map(|n| n.trunc()).ok();
            let v6 = |(a, p): (u128, u8)| Ipv6Net::new(Ipv6Addr::from(a), p).map(|n| n.trunc()).ok();
            let env = SubnetEnv {
                network: net.and_then(v4),
                subnet: sub.and_then(v4),
                ipv6_network: net6.and_then(v6),
                ipv6_subnet: sub6.and_then(v6),
                mtu,
                ipmasq,
            };
            let dir = scratch("subnetenv-prop");
            let path = dir.join("subnet.env");
            env.write_atomic(&path).expect("write");
            let back = SubnetEnv::read(&path);
            fs::remove_dir_all(&dir).expect("cleanup");
            proptest::prop_assert_eq!(back.expect("read"), env);
        }
    }

    #[test]
    fn tolerant_reader() {
        let dir = scratch("subnetenv-read");
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("subnet.env");
        fs::write(
            &path,
            "# comment\n\nexport FLANNEL_NETWORK=\"10.1.0.0/16\"\nFLANNEL_SUBNET=10.1.5.1/24,10.1.6.1/24\n\
             FLANNEL_IPV6_SUBNET=bogus,fd42::1/64\nFLANNEL_MTU=1450 # inline\nFLANNEL_IPMASQ=True\n",
        )
        .expect("write");
        let env = SubnetEnv::read(&path).expect("read");
        assert_eq!(env.network, Some("10.1.0.0/16".parse().expect("net")));
        assert_eq!(env.subnet, None, "two entries read as unknown");
        assert_eq!(env.ipv6_subnet, Some("fd42::/64".parse().expect("net")));
        assert_eq!((env.mtu, env.ipmasq), (1450, true));
        let hints = read_previous_subnets(&path);
        assert_eq!(hints.ipv4, None);
        assert_eq!(hints.ipv6, Some("fd42::/64".parse().expect("net")));

        fs::write(&path, "FLANNEL_SUBNET=10.1.5.1/24\nFLANNEL_IPMASQ=false\n").expect("write");
        let e = SubnetEnv::read(&path).expect_err("no mtu");
        assert_eq!(
            e.to_string(),
            format!("{}: FLANNEL_MTU is missing", path.display())
        );
        assert_eq!(
            read_previous_subnets(&path).ipv4,
            Some("10.1.5.0/24".parse().expect("net"))
        );
        fs::write(&path, "FLANNEL_MTU=big\nFLANNEL_IPMASQ=false\n").expect("write");
        let e = SubnetEnv::read(&path).expect_err("bad mtu");
        assert!(
            e.to_string()
                .contains("FLANNEL_MTU=\"big\" is not a non-negative integer"),
            "{e}"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(read_previous_subnets(&path), PreviousSubnets::default());
    }
}
