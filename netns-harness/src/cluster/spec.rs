//! What to build: node kinds, one node's spec, the cluster spec and the run's limits.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::cni::PodSetup;
use crate::store::StoreKind;

/// Where run directories live unless the spec says otherwise.
pub const DEFAULT_BASE_DIR: &str = "/tmp/netns-harness";
/// Most nodes a run can hold (underlay addresses 198.18.0.1 ..= 198.18.0.250).
pub const MAX_NODES: usize = 250;
/// Most nodes of a two-site run (public addresses 203.0.113.1 ..= 203.0.113.200).
pub const MAX_SITE_NODES: usize = 200;
/// The sites of a two-site run.
pub const SITES: [u8; 2] = [1, 2];
/// Most pods per node.
pub const MAX_PODS: usize = 50;

/// How a node's overlay is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeKind {
    /// Our flanneld with `--dataplane userspace`.
    Userspace,
    /// Our flanneld with `--dataplane kernel`.
    Kernel,
    /// No daemon: the harness programs the kernel exactly like upstream flannel.
    KernelRef,
}

impl NodeKind {
    /// True for kinds that run our flanneld.
    pub fn runs_flanneld(self) -> bool {
        !matches!(self, NodeKind::KernelRef)
    }

    /// The `--dataplane` value for flanneld kinds.
    pub fn dataplane(self) -> Option<&'static str> {
        match self {
            NodeKind::Userspace => Some("userspace"),
            NodeKind::Kernel => Some("kernel"),
            NodeKind::KernelRef => None,
        }
    }

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Userspace => "userspace",
            NodeKind::Kernel => "kernel",
            NodeKind::KernelRef => "kernel-ref",
        }
    }

    /// Parses a comma separated list (`userspace,kernel-ref,...`).
    pub fn parse_list(s: &str) -> Result<Vec<NodeKind>> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse())
            .collect()
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<NodeKind> {
        match s {
            "userspace" | "u" => Ok(NodeKind::Userspace),
            "kernel" | "k" => Ok(NodeKind::Kernel),
            "kernel-ref" | "ref" | "r" => Ok(NodeKind::KernelRef),
            other => bail!("unknown node kind {other:?} (userspace, kernel, kernel-ref)"),
        }
    }
}

/// Which address families the overlay carries (`--ip-family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpFamily {
    /// IPv4 only (the default).
    #[default]
    V4,
    /// IPv6 only (`EnableIPv4: false`).
    V6,
    /// Dual-stack.
    Dual,
}

impl IpFamily {
    /// True when pods get IPv4 addresses.
    pub fn has_v4(self) -> bool {
        self != IpFamily::V6
    }

    /// True when pods get IPv6 addresses and nodes an IPv6 underlay address.
    pub fn has_v6(self) -> bool {
        self != IpFamily::V4
    }

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "v4",
            IpFamily::V6 => "v6",
            IpFamily::Dual => "dual",
        }
    }

    /// The net-conf used when the spec gives none.
    pub fn default_net_conf(self) -> &'static str {
        match self {
            IpFamily::V4 => crate::lease::DEFAULT_NET_CONF,
            IpFamily::V6 => crate::lease::V6_NET_CONF,
            IpFamily::Dual => crate::lease::DUAL_NET_CONF,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IpFamily {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<IpFamily> {
        match s {
            "v4" | "ipv4" | "4" => Ok(IpFamily::V4),
            "v6" | "ipv6" | "6" => Ok(IpFamily::V6),
            "dual" | "dual-stack" => Ok(IpFamily::Dual),
            other => bail!("unknown IP family {other:?} (v4, v6, dual)"),
        }
    }
}

/// One node to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Overlay provider.
    pub kind: NodeKind,
    /// Extra flanneld arguments for this node only (appended after the common ones).
    pub extra_args: Vec<String>,
}

impl From<NodeKind> for NodeSpec {
    fn from(kind: NodeKind) -> NodeSpec {
        NodeSpec {
            kind,
            extra_args: Vec::new(),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Nodes in order (`n1`, `n2`, ...).
    pub nodes: Vec<NodeSpec>,
    /// Pods per node (`n<i>p1` ...).
    pub pods_per_node: usize,
    /// net-conf JSON written to `<lease-dir>/config` (None: the family's default,
    /// [`IpFamily::default_net_conf`]); it must enable exactly the families of `ip_family`.
    pub net_conf: Option<String>,
    /// `--ip-family`: v4 (default), v6 (IPv6 only) or dual. With v6 in it every node's eth0
    /// also gets 2001:db8:18::`i`/64 and pods get IPv6 addresses from the node's IPv6 lease.
    pub ip_family: IpFamily,
    /// Pass `--ip-masq` to flanneld; kernel-ref nodes install flannel's masquerade rules.
    pub ip_masq: bool,
    /// flanneld binary (None: `$NETNS_HARNESS_FLANNELD`, else `flanneld` next to this
    /// executable or its `deps/` parent).
    pub flanneld: Option<PathBuf>,
    /// Arguments given to every flanneld (e.g. `-v 2`), before per-node ones.
    pub flanneld_args: Vec<String>,
    /// A command that wraps every flanneld launch inside the node's namespace (e.g. `setpriv`
    /// with a container's capability set); empty: flanneld runs directly.
    pub flanneld_prefix: Vec<String>,
    /// The `netns-harness` binary used for responders and probes (None:
    /// `$NETNS_HARNESS_BIN`, else next to this executable or its `deps/` parent).
    pub harness_bin: Option<PathBuf>,
    /// Start the TCP/UDP/DNS responders in every pod.
    pub responders: bool,
    /// `--link-offloads`: true (default, `on`) leaves the underlay veths with their default
    /// offloads, tx checksum offload and GSO on, as in kind: packets cross with checksums
    /// the sender's kernel left unfinished (`CHECKSUM_PARTIAL`) and as 64 KB GSO frames, which
    /// receivers must cope with. False (`off`) turns tx offload off on every node's and
    /// router's eth0, so the underlay carries finished checksums and MTU-sized frames, as a
    /// real wire does: what a capture that verifies every checksum needs.
    pub underlay_tx_offload: bool,
    /// Parent of the run directory (default [`DEFAULT_BASE_DIR`]).
    pub base_dir: PathBuf,
    /// Run prefix (None: `fr` + 6 random hex digits).
    pub prefix: Option<String>,
    /// How long a flanneld gets to write subnet.env.
    pub ready_timeout: Duration,
    /// The lease store every node uses (default: the lease directory).
    pub store: StoreKind,
    /// Empty: every node on one underlay bridge (198.18.0.0/24). Otherwise one site (1 or 2)
    /// per node: the two-site NAT topology (field problem P1), each site on its own private
    /// bridge (198.18.`s`.0/24) behind a 1:1 NAT router to the public bridge 203.0.113.0/24,
    /// where the control plane lives.
    pub sites: Vec<u8>,
    /// etcd binary for `StoreKind::Etcd` (None: `$NETNS_HARNESS_ETCD`, `/usr/bin/etcd`,
    /// `PATH`).
    pub etcd_bin: Option<PathBuf>,
    /// test-apiserver binary for `StoreKind::Kube` (None: `$NETNS_HARNESS_APISERVER`, else
    /// next to this executable or its `deps/` parent).
    pub apiserver_bin: Option<PathBuf>,
    /// How pods are made (default: the real CNI plugins).
    pub pod_setup: PodSetup,
}

impl ClusterSpec {
    /// `kinds.len()` nodes with `pods_per_node` pods each, everything else default.
    pub fn new(kinds: &[NodeKind], pods_per_node: usize) -> ClusterSpec {
        ClusterSpec {
            nodes: kinds.iter().map(|k| NodeSpec::from(*k)).collect(),
            pods_per_node,
            net_conf: None,
            ip_family: IpFamily::V4,
            ip_masq: false,
            flanneld: None,
            flanneld_args: Vec::new(),
            flanneld_prefix: Vec::new(),
            harness_bin: None,
            responders: true,
            underlay_tx_offload: true,
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
            prefix: None,
            ready_timeout: Duration::from_secs(20),
            store: StoreKind::Dir,
            sites: Vec::new(),
            etcd_bin: None,
            apiserver_bin: None,
            pod_setup: PodSetup::default(),
        }
    }
}
