//! The lease store a run's nodes share (flannel-compat §5, §6):
//!
//! * [`StoreKind::Dir`]: the local lease directory `<rundir>/leases` (`flanneld --lease-dir`);
//! * [`StoreKind::Etcd`]: the real `etcd` in the control-plane namespace `<p>-cp`, net-conf at
//!   `/coreos.com/network/config`, leases at `/coreos.com/network/subnets/<a.b.c.d-len>` with
//!   flannel's JSON values, each attached to a 24 h etcd lease (`flanneld --etcd-endpoints`);
//! * [`StoreKind::Kube`]: the in-repo `test-apiserver` in `<p>-cp`; the harness plays
//!   kube-controller-manager (a Node per node with `spec.podCIDR` before its flanneld starts) and
//!   the operator, whose actions (creating, annotating, deleting Nodes) run the real `kubectl`
//!   in the namespace ([`Cluster::kubectl`](crate::Cluster::kubectl)); leases are the nodes' flannel annotations (`flanneld
//!   --kube-subnet-mgr --kube-api-url ... --net-config-path <rundir>/net-conf.json`, env
//!   `NODE_NAME`).
//!
//! The control-plane namespace hangs off the underlay bridge `br0` (198.18.0.254/24, or
//! 203.0.113.254/24 on the public side of a two-site run). The server listens there and on the
//! namespace's loopback, where the harness talks to it (from a helper thread inside the
//! namespace, see [`crate::http`]). Servers are started and stopped by PID.
//!
//! Outages: [`Cluster::stop_store`](crate::Cluster::stop_store) stops the server by PID (nodes get "connection refused")
//! and starts a *maintenance* instance on the same data that listens only on the control-plane
//! namespace's loopback, so harness changes made during the outage (adding a kernel-ref node,
//! removing a node, annotating) land in the data the daemons see again when
//! [`Cluster::start_store`](crate::Cluster::start_store) brings the server back on the same address, port and data.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::binaries::{check_executable, sibling_binary};
use crate::cmd::ProcRecord;
use crate::lease::{Lease, LeaseAttrs};
use crate::net::{Cidr, Cidr6};

/// flannel's default etcd prefix (`--etcd-prefix`).
pub const ETCD_PREFIX: &str = "/coreos.com/network";
/// etcd client port inside the control-plane namespace.
pub const ETCD_PORT: u16 = 2379;
pub(crate) const ETCD_PEER_PORT: u16 = 2380;
pub(crate) const ETCD_MAINTENANCE_PORT: u16 = 12379;
/// TTL of the etcd lease attached to each lease key, as flannel grants it.
pub const ETCD_LEASE_TTL_SECS: u64 = 86_400;
/// API server port inside the control-plane namespace.
pub const KUBE_PORT: u16 = 6443;
pub(crate) const KUBE_MAINTENANCE_PORT: u16 = 16443;
/// flannel's default annotation prefix (`--kube-annotation-prefix`), normalised.
pub const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";
/// How long a store server may take to answer after starting.
pub(crate) const START_LIMIT: Duration = Duration::from_secs(30);
/// Limit for one request to the store.
pub(crate) const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// Limit for one kubectl command.
pub(crate) const KUBECTL_LIMIT: Duration = Duration::from_secs(30);

/// Which lease store the nodes of a run share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// The local lease directory (`--lease-dir`).
    #[default]
    Dir,
    /// etcd v3 (`--etcd-endpoints`).
    Etcd,
    /// The Kubernetes API (`--kube-subnet-mgr`).
    Kube,
}

impl StoreKind {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Dir => "dir",
            StoreKind::Etcd => "etcd",
            StoreKind::Kube => "kube",
        }
    }

    /// True for stores served by a process in the control-plane namespace.
    pub fn has_server(self) -> bool {
        !matches!(self, StoreKind::Dir)
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<StoreKind> {
        match s {
            "dir" | "directory" => Ok(StoreKind::Dir),
            "etcd" => Ok(StoreKind::Etcd),
            "kube" | "kubernetes" | "k8s" => Ok(StoreKind::Kube),
            other => bail!("unknown store {other:?} (dir, etcd, kube)"),
        }
    }
}

/// The control plane of a run with a network store, as saved in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlane {
    /// etcd or kube.
    pub kind: StoreKind,
    /// Namespace (`<prefix>-cp`).
    pub ns: String,
    /// Address on the underlay (or public) bridge.
    pub ip: Ipv4Addr,
    /// Port daemons connect to.
    pub port: u16,
    /// Loopback-only port of the maintenance instance.
    pub maintenance_port: u16,
    /// `<rundir>/cp`: data, state file, logs.
    pub dir: PathBuf,
    /// The etcd or test-apiserver binary.
    pub binary: PathBuf,
    /// The server daemons use, while running.
    pub server: Option<ProcRecord>,
    /// The maintenance instance, while the server is stopped.
    pub maintenance: Option<ProcRecord>,
}

impl ControlPlane {
    /// The URL daemons use (`http://<ip>:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// Where the harness reaches the store now (inside the namespace).
    pub(crate) fn access(&self) -> Result<SocketAddr> {
        if self.server.is_some() {
            Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
        } else if self.maintenance.is_some() {
            Ok(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                self.maintenance_port,
            )))
        } else {
            bail!("the {} store is stopped", self.kind)
        }
    }
}

/// Resolves the etcd binary: explicit path, `$NETNS_HARNESS_ETCD`, `/usr/bin/etcd`, `PATH`.
pub fn resolve_etcd(explicit: Option<&Path>) -> Result<PathBuf> {
    let hint = "Install etcd (Debian package etcd-server) or pass ClusterSpec::etcd_bin.";
    if let Some(p) = explicit {
        return check_executable(p, "etcd", hint);
    }
    if let Some(p) = std::env::var_os("NETNS_HARNESS_ETCD") {
        return check_executable(Path::new(&p), "etcd ($NETNS_HARNESS_ETCD)", hint);
    }
    let default = Path::new("/usr/bin/etcd");
    if default.is_file() {
        return check_executable(default, "etcd", hint);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => check_executable(&p, "etcd", hint),
        None => bail!("etcd not found. {hint}"),
    }
}

/// Resolves the test API server: explicit path, `$NETNS_HARNESS_APISERVER`, then a sibling
/// `test-apiserver` of the running executable.
pub fn resolve_apiserver(explicit: Option<&Path>) -> Result<PathBuf> {
    let hint = "Build it with `cargo build -p test-apiserver` or set NETNS_HARNESS_APISERVER \
                (ClusterSpec::apiserver_bin).";
    if let Some(p) = explicit {
        return check_executable(p, "test-apiserver", hint);
    }
    if let Some(p) = std::env::var_os("NETNS_HARNESS_APISERVER") {
        return check_executable(
            Path::new(&p),
            "test-apiserver ($NETNS_HARNESS_APISERVER)",
            hint,
        );
    }
    match sibling_binary("test-apiserver") {
        Some(p) => check_executable(&p, "test-apiserver", hint),
        None => bail!("test-apiserver binary not found next to the running executable. {hint}"),
    }
}

/// An etcd key of the flannel prefix.
pub fn etcd_key(rest: &str) -> String {
    format!("{ETCD_PREFIX}/{rest}")
}

/// The etcd key of one lease (`/coreos.com/network/subnets/10.244.1.0-24`).
pub fn etcd_lease_key(subnet: &Cidr) -> String {
    etcd_lease_key_text(&subnet.key())
}

/// The etcd key of the lease with flannel key `key` (see [`crate::net::lease_key`]).
pub fn etcd_lease_key_text(key: &str) -> String {
    etcd_key(&format!("subnets/{key}"))
}

/// The key just past every key starting with `prefix` (etcd's `range_end` for a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's gateway writes 64-bit integers as strings.
pub(crate) fn json_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// A flannel annotation name with the default prefix.
pub fn annotation(name: &str) -> String {
    format!("{ANNOTATION_PREFIX}{name}")
}

/// A Node's annotation value.
pub(crate) fn node_annotation<'a>(node: &'a Value, name: &str) -> Option<&'a str> {
    node.pointer("/metadata/annotations")
        .and_then(|a| a.get(annotation(name)))
        .and_then(Value::as_str)
}

/// A Node object as flannel reads it: a lease when it carries `kube-subnet-manager: "true"`
/// (compat §5.5). `Ok(None)`: not managed by flannel.
pub fn node_to_lease(node: &Value) -> Result<Option<Lease>> {
    if node_annotation(node, "kube-subnet-manager") != Some("true") {
        return Ok(None);
    }
    // podCIDRs (one per family) when set, else podCIDR, as flannel reads them.
    let cidrs: Vec<&str> = match node.pointer("/spec/podCIDRs").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.iter().filter_map(Value::as_str).collect(),
        _ => node
            .pointer("/spec/podCIDR")
            .and_then(Value::as_str)
            .into_iter()
            .collect(),
    };
    if cidrs.is_empty() {
        bail!("no spec.podCIDR");
    }
    let mut subnet = None;
    let mut subnet6 = None;
    for c in &cidrs {
        if c.contains(':') {
            subnet6 = Some(c.parse::<Cidr6>()?.trunc());
        } else {
            subnet = Some(c.parse::<Cidr>()?.trunc());
        }
    }
    let public_ip = match node_annotation(node, "public-ip") {
        Some(ip) => ip.to_string(),
        None if subnet.is_none() => "0.0.0.0".to_string(),
        None => bail!("no public-ip annotation"),
    };
    let json_annotation = |name: &str| -> Result<Value> {
        match node_annotation(node, name) {
            None | Some("") => Ok(Value::Null),
            Some(text) => serde_json::from_str(text).with_context(|| format!("{name} is not JSON")),
        }
    };
    Ok(Some(Lease {
        subnet: subnet.unwrap_or(crate::lease::NO_V4),
        subnet6,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: node_annotation(node, "public-ipv6").map(String::from),
            backend_type: node_annotation(node, "backend-type")
                .unwrap_or("")
                .to_string(),
            backend_data: json_annotation("backend-data")?,
            backend_v6_data: json_annotation("backend-v6-data")?,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_parse() {
        assert_eq!("etcd".parse::<StoreKind>().unwrap(), StoreKind::Etcd);
        assert_eq!("kube".parse::<StoreKind>().unwrap(), StoreKind::Kube);
        assert_eq!("dir".parse::<StoreKind>().unwrap(), StoreKind::Dir);
        assert!("consul".parse::<StoreKind>().is_err());
        assert_eq!(StoreKind::default(), StoreKind::Dir);
        assert_eq!(serde_json::to_string(&StoreKind::Kube).unwrap(), "\"kube\"");
    }

    #[test]
    fn etcd_keys() {
        let c: Cidr = "10.244.3.0/24".parse().unwrap();
        assert_eq!(
            etcd_lease_key(&c),
            "/coreos.com/network/subnets/10.244.3.0-24"
        );
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[0x61, 0xff]), vec![0x62]);
        assert_eq!(json_i64(Some(&json!("42"))), Some(42));
        assert_eq!(json_i64(Some(&json!(7))), Some(7));
    }

    #[test]
    fn nodes_become_leases_like_flannel_reads_them() {
        let node = json!({
            "metadata": {"name": "n2", "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:02\"}",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": "198.18.0.2",
            }},
            "spec": {"podCIDR": "10.244.2.0/24"},
        });
        let l = node_to_lease(&node).unwrap().unwrap();
        assert_eq!(l.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(l.public_ip(), Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(l.vxlan().unwrap().vtep_mac, "0e:00:00:00:00:02");
        let mut dual = node.clone();
        dual["spec"]["podCIDRs"] = json!(["10.244.2.0/24", "fd42:244:0:2::/64"]);
        let ann = &mut dual["metadata"]["annotations"];
        ann["flannel.alpha.coreos.com/public-ipv6"] = json!("2001:db8:18::2");
        ann["flannel.alpha.coreos.com/backend-v6-data"] =
            json!("{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:06:02\"}");
        let l = node_to_lease(&dual).unwrap().unwrap();
        assert_eq!(l.key(), "10.244.2.0-24&fd42:244:0:2::-64");
        assert_eq!(l.public_ipv6().unwrap().to_string(), "2001:db8:18::2");
        assert_eq!(l.vxlan6().unwrap().vtep_mac, "0e:00:00:00:06:02");
        let mut v6 = dual.clone();
        v6["spec"] = json!({"podCIDR": "fd42:244:0:2::/64", "podCIDRs": ["fd42:244:0:2::/64"]});
        v6["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("flannel.alpha.coreos.com/public-ip");
        let l = node_to_lease(&v6).unwrap().unwrap();
        assert_eq!(l.key(), "0.0.0.0-0&fd42:244:0:2::-64");
        assert_eq!(l.subnet4(), None);
        let unmanaged = json!({"metadata": {"name": "x"}, "spec": {"podCIDR": "10.244.9.0/24"}});
        assert!(node_to_lease(&unmanaged).unwrap().is_none());
        let mut broken = node.clone();
        broken["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] = json!("{");
        assert!(node_to_lease(&broken).is_err());
    }
}
