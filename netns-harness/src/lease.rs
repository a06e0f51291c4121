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

use crate::net::{self, Cidr, Cidr6};

/// The net-conf used when the spec does not override it.
pub const DEFAULT_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The dual-stack net-conf of `--ip-family dual` (IPv6 subnets /64 of a /56, upstream's
/// default length).
pub const DUAL_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd42:244::/56","Backend":{"Type":"vxlan"}}"#;
/// The IPv6-only net-conf of `--ip-family v6`.
pub const V6_NET_CONF: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd42:244::/56","Backend":{"Type":"vxlan"}}"#;

/// The IPv6 part of a net-conf (`EnableIPv6: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf6 {
    /// `IPv6Network`, host bits cleared.
    pub network: Cidr6,
    /// `IPv6SubnetLen` (default 64 when the network is /62 or shorter, else +2).
    pub subnet_len: u8,
    /// `IPv6SubnetMin` (default the second subnet).
    pub subnet_min: std::net::Ipv6Addr,
    /// `IPv6SubnetMax` (default the last subnet).
    pub subnet_max: std::net::Ipv6Addr,
}

impl NetConf6 {
    fn parse(obj: &serde_json::Map<String, Value>) -> Result<NetConf6> {
        let network: Cidr6 = get_ci(obj, "IPv6Network")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("net-conf has EnableIPv6 but no IPv6Network string"))?
            .parse()?;
        let network = network.trunc();
        if !net::pod_range6().contains_cidr(&network) {
            bail!(
                "net-conf IPv6Network {network} is outside {}: the harness only uses that range",
                net::pod_range6()
            );
        }
        let default_len = if network.len <= 62 {
            64
        } else {
            network.len + 2
        };
        let subnet_len = match get_u64(obj, "IPv6SubnetLen")? {
            Some(l) => u8::try_from(l)
                .ok()
                .filter(|l| *l <= 126 && *l > network.len)
                .ok_or_else(|| anyhow!("net-conf IPv6SubnetLen {l} unusable for {network}"))?,
            None => default_len,
        };
        if subnet_len > 126 || subnet_len <= network.len {
            bail!("net-conf IPv6Network {network} is too small");
        }
        let step = 1u128 << (128 - u32::from(subnet_len));
        let count = 1u128 << u32::from(subnet_len - network.len);
        let min_default = network
            .nth(step)
            .ok_or_else(|| anyhow!("net-conf IPv6Network {network} is too small"))?;
        let max_default = network
            .nth(step * (count - 1))
            .ok_or_else(|| anyhow!("net-conf IPv6Network {network} is too small"))?;
        let parse_ip = |key: &str, default| -> Result<std::net::Ipv6Addr> {
            match get_ci(obj, key).and_then(Value::as_str) {
                Some(s) => {
                    let ip: std::net::Ipv6Addr =
                        s.parse().with_context(|| format!("net-conf {key}"))?;
                    if !network.contains(ip) {
                        bail!("net-conf {key} {ip} is not in {network}");
                    }
                    Ok(ip)
                }
                None => Ok(default),
            }
        };
        Ok(NetConf6 {
            network,
            subnet_len,
            subnet_min: parse_ip("IPv6SubnetMin", min_default)?,
            subnet_max: parse_ip("IPv6SubnetMax", max_default)?,
        })
    }

    /// Candidate subnets from IPv6SubnetMin to IPv6SubnetMax in order (at most 65536).
    pub fn candidates(&self) -> impl Iterator<Item = Cidr6> + '_ {
        let step = 1u128 << (128 - u32::from(self.subnet_len));
        let start = u128::from(self.subnet_min);
        let end = u128::from(self.subnet_max);
        let len = self.subnet_len;
        (0..65_536u128)
            .map_while(move |i| start.checked_add(i * step))
            .take_while(move |a| *a <= end)
            .map(move |a| Cidr6 {
                addr: std::net::Ipv6Addr::from(a),
                len,
            })
    }
}

/// The parts of net-conf.json the harness needs (keys matched case-insensitively, like Go's
/// encoding/json; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// `EnableIPv4` (default true). When false, `network` and the subnet fields are
    /// placeholders (the harness's pod range) that nothing uses.
    pub enable_ipv4: bool,
    /// The IPv6 settings when `EnableIPv6` is true.
    pub ipv6: Option<NetConf6>,
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
        let flag = |key: &str, default: bool| -> Result<bool> {
            match get_ci(obj, key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| anyhow!("net-conf {key} must be true or false, got {v}")),
            }
        };
        let enable_ipv4 = flag("EnableIPv4", true)?;
        let ipv6 = if flag("EnableIPv6", false)? {
            Some(NetConf6::parse(obj)?)
        } else {
            None
        };
        if !enable_ipv4 && ipv6.is_none() {
            bail!("net-conf enables neither IPv4 nor IPv6");
        }
        let network: Cidr = match get_ci(obj, "Network").and_then(Value::as_str) {
            Some(n) => n.parse()?,
            None if !enable_ipv4 => net::pod_range(),
            None => bail!("net-conf has no Network string"),
        };
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
            enable_ipv4,
            ipv6,
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
    /// IPv6 backend data (for vxlan: [`VxlanData`] of `flannel-v6.<VNI>`), absent unless the
    /// lease has an IPv6 subnet.
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Value::is_null"
    )]
    pub backend_v6_data: Value,
}

/// A lease as read back from the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The node's IPv4 subnet (from the file name; `0.0.0.0/0` for an IPv6-only lease, as
    /// flannel's key says).
    pub subnet: Cidr,
    /// The node's IPv6 subnet (dual-stack and IPv6-only leases).
    pub subnet6: Option<Cidr6>,
    /// Parsed attributes.
    pub attrs: LeaseAttrs,
}

/// The IPv4 subnet a lease stands for when it has none (flannel's `0.0.0.0-0` key).
pub const NO_V4: Cidr = Cidr {
    addr: std::net::Ipv4Addr::UNSPECIFIED,
    len: 0,
};

impl Lease {
    /// The IPv4 subnet, None for an IPv6-only lease.
    pub fn subnet4(&self) -> Option<Cidr> {
        (self.subnet != NO_V4).then_some(self.subnet)
    }

    /// flannel's key of this lease (file name / etcd key suffix).
    pub fn key(&self) -> String {
        net::lease_key(self.subnet4().as_ref(), self.subnet6.as_ref())
    }

    /// The public IPv6 address, when present and it parses.
    pub fn public_ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.attrs.public_ipv6.as_deref()?.parse().ok()
    }

    /// IPv6 VXLAN data (`BackendV6Data`) when BackendType is vxlan and it parses.
    pub fn vxlan6(&self) -> Option<VxlanData> {
        if self.attrs.backend_type != "vxlan" {
            return None;
        }
        parse_vxlan(&self.attrs.backend_v6_data)
    }

    /// The public IP as an address, when it parses.
    pub fn public_ip(&self) -> Option<Ipv4Addr> {
        self.attrs.public_ip.parse().ok()
    }

    /// VXLAN data when BackendType is vxlan and the data parses.
    pub fn vxlan(&self) -> Option<VxlanData> {
        if self.attrs.backend_type != "vxlan" {
            return None;
        }
        parse_vxlan(&self.attrs.backend_data)
    }
}

/// vxlan backend data as Go decodes it (keys case-insensitive).
fn parse_vxlan(data: &Value) -> Option<VxlanData> {
    let obj = data.as_object()?;
    let vni = get_ci(obj, "VNI").and_then(Value::as_u64).unwrap_or(0);
    let mac = get_ci(obj, "VtepMAC").and_then(Value::as_str)?;
    Some(VxlanData {
        vni: u32::try_from(vni).ok()?,
        vtep_mac: mac.to_ascii_lowercase(),
    })
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

    /// The file of the lease with flannel key `key` (see [`net::lease_key`]).
    pub fn key_path(&self, key: &str) -> PathBuf {
        self.subnets_dir().join(key)
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
            let (subnet, subnet6) = match net::parse_lease_key(&name) {
                Ok((v4, v6)) => (v4.unwrap_or(NO_V4), v6),
                Err(e) => {
                    bad.push(format!("{name}: {e:#}"));
                    continue;
                }
            };
            let parsed = std::fs::read(entry.path())
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<LeaseAttrs>(&b).map_err(Into::into));
            match parsed {
                Ok(attrs) => leases.push(Lease {
                    subnet,
                    subnet6,
                    attrs,
                }),
                Err(e) => bad.push(format!("{name}: {e:#}")),
            }
        }
        sort_leases(&mut leases);
        Ok((leases, bad))
    }

    /// Allocates the first free IPv4 subnet of `conf` and publishes `attrs` for it (see
    /// [`acquire_families`](Self::acquire_families)); IPv4 net-confs only.
    pub fn acquire(&self, conf: &NetConf, attrs: &LeaseAttrs) -> Result<Cidr> {
        match self.acquire_families(conf, attrs)? {
            (Some(v4), None) => Ok(v4),
            other => bail!("acquire: net-conf is not IPv4-only (got {other:?})"),
        }
    }

    /// Allocates the first free subnet of each family `conf` enables and publishes `attrs`
    /// under their key with an exclusive create (hard link of a fully written temp file:
    /// either the whole lease appears or the name was taken and the next candidates are
    /// tried).
    pub fn acquire_families(&self, conf: &NetConf, attrs: &LeaseAttrs) -> Result<Families> {
        let body = serde_json::to_vec(attrs)?;
        let dir = self.subnets_dir();
        for _attempt in 0..10 {
            let (existing, _) = self.read_all()?;
            let cand = free_subnets(conf, &existing)?;
            let key = net::lease_key(cand.0.as_ref(), cand.1.as_ref());
            let tmp = dir.join(format!(".tmp-{key}-{}", std::process::id()));
            write_file(&tmp, &body)?;
            let res = std::fs::hard_link(&tmp, self.key_path(&key));
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
        self.remove_key(&subnet.key())
    }

    /// Deletes the lease file with flannel key `key` (missing is fine).
    pub fn remove_key(&self, key: &str) -> Result<()> {
        match std::fs::remove_file(self.key_path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A lease's subnets by family (IPv4, IPv6); at least one is present.
pub type Families = (Option<Cidr>, Option<Cidr6>);

/// Sorts leases by IPv4 subnet, then IPv6 subnet.
pub fn sort_leases(leases: &mut [Lease]) {
    leases.sort_by_key(|l| (l.subnet, l.subnet6));
}

/// The first candidate of each enabled family that no lease in `existing` overlaps.
pub fn free_subnets(conf: &NetConf, existing: &[Lease]) -> Result<Families> {
    let v4 = if conf.enable_ipv4 {
        let taken: Vec<Cidr> = existing.iter().filter_map(Lease::subnet4).collect();
        Some(
            conf.candidates()
                .find(|c| !taken.iter().any(|t| t.overlaps(c)))
                .ok_or_else(|| anyhow!("out of subnets in {}", conf.network))?,
        )
    } else {
        None
    };
    let v6 = match &conf.ipv6 {
        Some(c6) => {
            let taken: Vec<Cidr6> = existing.iter().filter_map(|l| l.subnet6).collect();
            Some(
                c6.candidates()
                    .find(|c| !taken.iter().any(|t| t.overlaps(c)))
                    .ok_or_else(|| anyhow!("out of IPv6 subnets in {}", c6.network))?,
            )
        }
        None => None,
    };
    Ok((v4, v6))
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
    /// FLANNEL_NETWORK (None in IPv6-only runs).
    pub network: Option<Cidr>,
    /// FLANNEL_SUBNET: first host address of the lease with the lease's length.
    pub subnet: Option<Cidr>,
    /// FLANNEL_IPV6_NETWORK.
    pub ipv6_network: Option<Cidr6>,
    /// FLANNEL_IPV6_SUBNET: first host address of the IPv6 lease with its length.
    pub ipv6_subnet: Option<Cidr6>,
    /// FLANNEL_MTU.
    pub mtu: u32,
    /// FLANNEL_IPMASQ.
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// flannel's exact text (keys of the families present, in flannel's order).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.network {
            out.push_str(&format!("FLANNEL_NETWORK={n}\n"));
        }
        if let Some(s) = self.subnet {
            out.push_str(&format!("FLANNEL_SUBNET={s}\n"));
        }
        if let Some(n) = self.ipv6_network {
            out.push_str(&format!("FLANNEL_IPV6_NETWORK={n}\n"));
        }
        if let Some(s) = self.ipv6_subnet {
            out.push_str(&format!("FLANNEL_IPV6_SUBNET={s}\n"));
        }
        out.push_str(&format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ipmasq
        ));
        out
    }

    /// Parses `KEY=value` lines (split on the first `=`, like the CNI plugin). The first entry of
    /// a comma list is used. A subnet of at least one family is required.
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
        let opt = |k: &str| {
            map.get(k)
                .map(|v| v.split(',').next().unwrap_or("").to_string())
        };
        let get = |k: &str| opt(k).ok_or_else(|| anyhow!("subnet.env: {k} is missing"));
        let v4 = |k: &str| opt(k).map(|v| v.parse::<Cidr>()).transpose();
        let v6 = |k: &str| opt(k).map(|v| v.parse::<Cidr6>()).transpose();
        let env = SubnetEnv {
            network: v4("FLANNEL_NETWORK")?,
            subnet: v4("FLANNEL_SUBNET")?,
            ipv6_network: v6("FLANNEL_IPV6_NETWORK")?,
            ipv6_subnet: v6("FLANNEL_IPV6_SUBNET")?,
            mtu: get("FLANNEL_MTU")?
                .parse()
                .context("subnet.env: FLANNEL_MTU")?,
            ipmasq: get("FLANNEL_IPMASQ")? == "true",
        };
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            bail!("subnet.env: FLANNEL_SUBNET is missing (and no FLANNEL_IPV6_SUBNET)");
        }
        if env.subnet.is_some() && env.network.is_none() {
            bail!("subnet.env: FLANNEL_NETWORK is missing");
        }
        Ok(env)
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
            backend_v6_data: Value::Null,
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
            backend_v6_data: Value::Null,
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
    fn dual_leases_acquire_both_families() {
        let dir = std::env::temp_dir().join(format!("nh-lease6-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ld = LeaseDir::new(&dir);
        ld.init(DUAL_NET_CONF).unwrap();
        let conf = NetConf::parse(DUAL_NET_CONF).unwrap();
        let attrs = LeaseAttrs {
            public_ip: "198.18.0.1".into(),
            public_ipv6: Some("2001:db8:18::1".into()),
            backend_type: "vxlan".into(),
            backend_data: serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}),
            backend_v6_data: serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:06:01"}),
        };
        let (a4, a6) = ld.acquire_families(&conf, &attrs).unwrap();
        let (b4, b6) = ld.acquire_families(&conf, &attrs).unwrap();
        assert_eq!(a4.unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(a6.unwrap().to_string(), "fd42:244:0:1::/64");
        assert_eq!(b6.unwrap().to_string(), "fd42:244:0:2::/64");
        assert_eq!(b4.unwrap().to_string(), "10.244.2.0/24");
        assert!(ld.key_path("10.244.1.0-24&fd42:244:0:1::-64").exists());
        let (leases, bad) = ld.read_all().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(leases[0].vxlan6().unwrap().vtep_mac, "0e:00:00:00:06:01");
        let body = std::fs::read_to_string(ld.key_path(&leases[0].key())).unwrap();
        assert!(
            body.ends_with(r#""BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:01"}}"#),
            "{body}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn subnet_env_roundtrip() {
        let env = SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.3.1/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
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
        let v6 = "FLANNEL_IPV6_NETWORK=fd42:244::/56\nFLANNEL_IPV6_SUBNET=fd42:244:0:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        let env = SubnetEnv::parse(v6).unwrap();
        assert_eq!(env.subnet, None);
        assert_eq!(env.ipv6_subnet.unwrap().to_string(), "fd42:244:0:1::1/64");
        assert_eq!(env.render(), v6);
    }

    #[test]
    fn netconf_ipv6() {
        let c = NetConf::parse(DUAL_NET_CONF).unwrap();
        assert!(c.enable_ipv4);
        let c6 = c.ipv6.clone().unwrap();
        assert_eq!(c6.subnet_len, 64);
        assert_eq!(c6.subnet_min.to_string(), "fd42:244:0:1::");
        assert_eq!(c6.subnet_max.to_string(), "fd42:244:0:ff::");
        assert_eq!(c6.candidates().count(), 255);
        let c = NetConf::parse(V6_NET_CONF).unwrap();
        assert!(!c.enable_ipv4 && c.ipv6.is_some());
        assert!(NetConf::parse(r#"{"EnableIPv4":false}"#).is_err());
        assert!(NetConf::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#
        )
        .is_err());
    }
}
