//! The local lease directory shared by every node of a run, in flannel's etcd shapes:
//! `<lease-dir>/config` holds net-conf JSON (flannel-compat §3) and
//! `<lease-dir>/subnets/<a.b.c.d-len>` holds one lease's JSON (flannel-compat §6.1), plus the
//! `subnet.env` file each node writes (flannel-compat §4).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::net::{self, Cidr};

/// The net-conf used when the spec does not override it.
pub const DEFAULT_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// The parts of net-conf.json the harness needs (keys matched case-insensitively, like Go's
/// encoding/json; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// Cluster pod network (`Network`), host bits cleared.
    pub network: Cidr,
    /// Per-node subnet length (`SubnetLen`, default 24 when Network is /22 or shorter, else +2).
    pub subnet_len: u8,
    /// First allocatable subnet (`SubnetMin`, default the second subnet of Network).
    pub subnet_min: Ipv4Addr,
    /// Last allocatable subnet (`SubnetMax`, default the last subnet of Network).
    pub subnet_max: Ipv4Addr,
    /// `Backend.Type`.
    pub backend_type: String,
    /// `Backend.VNI` (default 1).
    pub vni: u32,
    /// `Backend.Port` (0 = kernel default 8472).
    pub port: u16,
    /// `Backend.MTU`: underlay MTU override (None = interface MTU).
    pub mtu: Option<u32>,
}

fn get_ci<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

fn get_u64(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match get_ci(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| anyhow!("net-conf {key} must be a non-negative integer, got {v}")),
    }
}

impl NetConf {
    /// Parses net-conf JSON. Refuses a Network outside 10.244.0.0/16: the harness keeps every
    /// pod address in that range (network safety rule).
    pub fn parse(json: &str) -> Result<NetConf> {
        let v: Value = serde_json::from_str(json).context("net-conf is not valid JSON")?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("net-conf must be a JSON object"))?;
        let network: Cidr = get_ci(obj, "Network")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("net-conf has no Network string"))?
            .parse()?;
        let network = network.trunc();
        if !net::pod_range().contains_cidr(&network) {
            bail!(
                "net-conf Network {network} is outside {}: the harness only uses that range",
                net::pod_range()
            );
        }
        let default_len = if network.len <= 22 {
            24
        } else {
            network.len + 2
        };
        let subnet_len = match get_u64(obj, "SubnetLen")? {
            Some(l) => u8::try_from(l)
                .ok()
                .filter(|l| *l <= 30 && *l >= network.len)
                .ok_or_else(|| anyhow!("net-conf SubnetLen {l} unusable for {network}"))?,
            None => default_len,
        };
        if subnet_len > 30 {
            bail!("net-conf Network {network} is too small");
        }
        let step = 1u64 << (32 - u32::from(subnet_len));
        let min_default = network
            .nth(step)
            .ok_or_else(|| anyhow!("net-conf Network {network} holds a single subnet"))?;
        let max_default = network
            .nth(network.size() - step)
            .ok_or_else(|| anyhow!("net-conf Network {network} is too small"))?;
        let parse_ip = |key: &str, default: Ipv4Addr| -> Result<Ipv4Addr> {
            match get_ci(obj, key).and_then(Value::as_str) {
                Some(s) => {
                    let ip: Ipv4Addr = s.parse().with_context(|| format!("net-conf {key}"))?;
                    if !network.contains(ip) {
                        bail!("net-conf {key} {ip} is not in {network}");
                    }
                    Ok(ip)
                }
                None => Ok(default),
            }
        };
        let subnet_min = parse_ip("SubnetMin", min_default)?;
        let subnet_max = parse_ip("SubnetMax", max_default)?;
        let empty = serde_json::Map::new();
        let backend = get_ci(obj, "Backend")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let backend_type = get_ci(backend, "Type")
            .and_then(Value::as_str)
            .unwrap_or("udp")
            .to_string();
        let vni = get_u64(backend, "VNI")?.unwrap_or(1);
        let vni = u32::try_from(vni)
            .ok()
            .filter(|v| *v < (1 << 24))
            .ok_or_else(|| anyhow!("net-conf Backend.VNI {vni} out of range"))?;
        let port = get_u64(backend, "Port")?.unwrap_or(0);
        let port =
            u16::try_from(port).map_err(|_| anyhow!("net-conf Backend.Port {port} too big"))?;
        let mtu = get_u64(backend, "MTU")?
            .map(|m| u32::try_from(m).map_err(|_| anyhow!("net-conf Backend.MTU {m} too big")))
            .transpose()?;
        Ok(NetConf {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend_type,
            vni,
            port,
            mtu,
        })
    }

    /// The UDP port VXLAN uses on the wire.
    pub fn effective_port(&self) -> u16 {
        if self.port == 0 {
            8472
        } else {
            self.port
        }
    }

    /// Candidate subnets from SubnetMin to SubnetMax in order.
    pub fn candidates(&self) -> impl Iterator<Item = Cidr> + '_ {
        let step = 1u64 << (32 - u32::from(self.subnet_len));
        let start = u64::from(u32::from(self.subnet_min));
        let end = u64::from(u32::from(self.subnet_max));
        let len = self.subnet_len;
        (0..)
            .map(move |i| start + i * step)
            .take_while(move |a| *a <= end)
            .filter_map(move |a| u32::try_from(a).ok())
            .map(move |a| Cidr {
                addr: Ipv4Addr::from(a),
                len,
            })
    }
}

/// flannel's vxlan backend data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    /// VXLAN network identifier.
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// The node's VTEP MAC (lower-case colon form).
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// One lease file's JSON, field order exactly as flannel's LeaseAttrs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// Underlay address peers send VXLAN to.
    #[serde(rename = "PublicIP")]
    pub public_ip: String,
    /// Always present, `null` for IPv4-only leases.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<String>,
    /// `vxlan`, `host-gw`, ...
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    /// Backend specific (for vxlan: [`VxlanData`]).
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Value::is_null"
    )]
    pub backend_data: Value,
}

/// A lease as read back from the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The node's subnet (from the file name).
    pub subnet: Cidr,
    /// Parsed attributes.
    pub attrs: LeaseAttrs,
}

impl Lease {
    /// The public IP as an address, when it parses.
    pub fn public_ip(&self) -> Option<Ipv4Addr> {
        self.attrs.public_ip.parse().ok()
    }

    /// VXLAN data when BackendType is vxlan and the data parses.
    pub fn vxlan(&self) -> Option<VxlanData> {
        if self.attrs.backend_type != "vxlan" {
            return None;
        }
        // Go decodes case-insensitively; accept any key case.
        let obj = self.attrs.backend_data.as_object()?;
        let vni = get_ci(obj, "VNI").and_then(Value::as_u64).unwrap_or(0);
        let mac = get_ci(obj, "VtepMAC").and_then(Value::as_str)?;
        Some(VxlanData {
            vni: u32::try_from(vni).ok()?,
            vtep_mac: mac.to_ascii_lowercase(),
        })
    }
}

/// The lease directory of a run.
#[derive(Debug, Clone)]
pub struct LeaseDir {
    root: PathBuf,
}

impl LeaseDir {
    /// Wraps `<rundir>/leases`.
    pub fn new(root: impl Into<PathBuf>) -> LeaseDir {
        LeaseDir { root: root.into() }
    }

    /// The directory passed as `--lease-dir`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/subnets`.
    pub fn subnets_dir(&self) -> PathBuf {
        self.root.join("subnets")
    }

    /// `<root>/config`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config")
    }

    /// The file of one lease.
    pub fn lease_path(&self, subnet: &Cidr) -> PathBuf {
        self.subnets_dir().join(subnet.key())
    }

    /// Creates the directories and writes the net-conf.
    pub fn init(&self, net_conf_json: &str) -> Result<()> {
        std::fs::create_dir_all(self.subnets_dir())
            .with_context(|| format!("create {}", self.subnets_dir().display()))?;
        write_atomic(&self.config_path(), net_conf_json.as_bytes())
    }

    /// Reads every lease; unreadable or malformed files are reported in the second list
    /// (file name: reason) instead of aborting.
    pub fn read_all(&self) -> Result<(Vec<Lease>, Vec<String>)> {
        let mut leases = Vec::new();
        let mut bad = Vec::new();
        let dir = self.subnets_dir();
        let entries = std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))?;
        for entry in entries.take(100_000) {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // temp files of atomic writes
            }
            let subnet = match Cidr::from_key(&name) {
                Ok(s) => s,
                Err(e) => {
                    bad.push(format!("{name}: {e:#}"));
                    continue;
                }
            };
            let parsed = std::fs::read(entry.path())
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<LeaseAttrs>(&b).map_err(Into::into));
            match parsed {
                Ok(attrs) => leases.push(Lease { subnet, attrs }),
                Err(e) => bad.push(format!("{name}: {e:#}")),
            }
        }
        leases.sort_by_key(|l| l.subnet);
        Ok((leases, bad))
    }

    /// Allocates the first free subnet of `conf` and publishes `attrs` for it with an exclusive
    /// create (hard link of a fully written temp file: either the whole lease appears or the
    /// name was taken and the next candidate is tried).
    pub fn acquire(&self, conf: &NetConf, attrs: &LeaseAttrs) -> Result<Cidr> {
        let body = serde_json::to_vec(attrs)?;
        let dir = self.subnets_dir();
        for _attempt in 0..10 {
            let (existing, _) = self.read_all()?;
            let taken: Vec<Cidr> = existing.iter().map(|l| l.subnet).collect();
            let Some(cand) = conf
                .candidates()
                .find(|c| !taken.iter().any(|t| t.overlaps(c)))
            else {
                bail!("out of subnets in {}", conf.network);
            };
            let tmp = dir.join(format!(".tmp-{}-{}", cand.key(), std::process::id()));
            write_file(&tmp, &body)?;
            let res = std::fs::hard_link(&tmp, self.lease_path(&cand));
            let _ = std::fs::remove_file(&tmp);
            match res {
                Ok(()) => return Ok(cand),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).context("publish lease"),
            }
        }
        bail!("max retries reached trying to acquire a subnet")
    }

    /// Deletes one lease file (missing is fine).
    pub fn remove(&self, subnet: &Cidr) -> Result<()> {
        match std::fs::remove_file(self.lease_path(subnet)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn write_file(path: &Path, body: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(body)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.sync_all()?;
    Ok(())
}

/// Writes `path` atomically (temp file in the same directory, then rename), mode 0644.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    write_file(&tmp, body)?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// The contents of a subnet.env the harness needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK.
    pub network: Cidr,
    /// FLANNEL_SUBNET: first host address of the lease with the lease's length.
    pub subnet: Cidr,
    /// FLANNEL_MTU.
    pub mtu: u32,
    /// FLANNEL_IPMASQ.
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// flannel's exact text (IPv4 part).
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet, self.mtu, self.ipmasq
        )
    }

    /// Parses `KEY=value` lines (split on the first `=`, like the CNI plugin). The first entry of
    /// a comma list is used.
    pub fn parse(text: &str) -> Result<SubnetEnv> {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                map.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        let get = |k: &str| {
            map.get(k)
                .map(|v| v.split(',').next().unwrap_or("").to_string())
                .ok_or_else(|| anyhow!("subnet.env: {k} is missing"))
        };
        Ok(SubnetEnv {
            network: get("FLANNEL_NETWORK")?.parse()?,
            subnet: get("FLANNEL_SUBNET")?.parse()?,
            mtu: get("FLANNEL_MTU")?
                .parse()
                .context("subnet.env: FLANNEL_MTU")?,
            ipmasq: get("FLANNEL_IPMASQ")? == "true",
        })
    }

    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<SubnetEnv> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        SubnetEnv::parse(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// Writes atomically with mode 0644.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.render().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netconf_defaults_and_case() {
        let c = NetConf::parse(DEFAULT_NET_CONF).unwrap();
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!((c.vni, c.port, c.effective_port()), (1, 0, 8472));
        let c = NetConf::parse(
            r#"{"network":"10.244.0.0/16","backend":{"type":"vxlan","vni":4,"Port":8475}}"#,
        )
        .unwrap();
        assert_eq!((c.vni, c.effective_port()), (4, 8475));
        assert_eq!(c.candidates().count(), 255);
        assert!(NetConf::parse(r#"{"Network":"192.0.2.0/24"}"#).is_err());
        assert!(NetConf::parse(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#).is_err());
        let c = NetConf::parse(r#"{"Network":"10.244.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
    }

    #[test]
    fn lease_json_matches_flannel() {
        let attrs = LeaseAttrs {
            public_ip: "198.18.0.3".into(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::to_value(VxlanData {
                vni: 1,
                vtep_mac: "0e:2a:00:00:00:01".into(),
            })
            .unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&attrs).unwrap(),
            r#"{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}"#
        );
    }

    #[test]
    fn acquire_is_exclusive_and_ordered() {
        let dir = std::env::temp_dir().join(format!("nh-lease-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ld = LeaseDir::new(&dir);
        ld.init(DEFAULT_NET_CONF).unwrap();
        let conf = NetConf::parse(DEFAULT_NET_CONF).unwrap();
        let attrs = LeaseAttrs {
            public_ip: "198.18.0.1".into(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}),
        };
        let a = ld.acquire(&conf, &attrs).unwrap();
        let b = ld.acquire(&conf, &attrs).unwrap();
        assert_eq!(a.to_string(), "10.244.1.0/24");
        assert_eq!(b.to_string(), "10.244.2.0/24");
        std::fs::write(ld.subnets_dir().join("junk"), b"{").unwrap();
        let (leases, bad) = ld.read_all().unwrap();
        assert_eq!(leases.len(), 2);
        assert_eq!(bad.len(), 1);
        assert_eq!(leases[0].vxlan().unwrap().vtep_mac, "0e:00:00:00:00:01");
        ld.remove(&a).unwrap();
        ld.remove(&a).unwrap();
        let c = ld.acquire(&conf, &attrs).unwrap();
        assert_eq!(c, a, "freed subnet is reused first");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn subnet_env_roundtrip() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.1/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
        };
        let text = env.render();
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env);
        assert!(SubnetEnv::parse("FLANNEL_SUBNET=10.244.3.1/24\n").is_err());
    }
}
