//! The run as built, saved as `state.json` for later commands: nodes, pods, processes, captures.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cmd::ProcRecord;
use crate::cni::{PodSetup, PortMapping};
use crate::kernel_ref::{PeerEntry, PeerEntry6};
use crate::net::{Cidr, Cidr6};
use crate::store::{ControlPlane, StoreKind};

use super::{IpFamily, NodeKind};

/// A pod as built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// Short name, e.g. `n1p2`.
    pub name: String,
    /// Namespace, e.g. `fr1a2b3c-n1p2`.
    pub ns: String,
    /// Pod IPv4 address (`eth0`; 0.0.0.0 in IPv6-only runs).
    pub ip: Ipv4Addr,
    /// Pod IPv6 address (dual-stack and IPv6-only runs).
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    /// The responder process, if started.
    pub serve: Option<ProcRecord>,
    /// The sandbox id the CNI plugins got (None: a hand-wired pod).
    #[serde(default)]
    pub container_id: Option<String>,
    /// hostPorts given to portmap.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

/// A node as built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Short name, e.g. `n1`.
    pub name: String,
    /// Namespace, e.g. `fr1a2b3c-n1`.
    pub ns: String,
    /// The `i` in `n<i>` and in 198.18.0.`i`.
    pub index: u32,
    /// Overlay provider.
    pub kind: NodeKind,
    /// eth0 address (the private site address in a two-site run).
    pub underlay_ip: Ipv4Addr,
    /// Site (1 or 2) in a two-site run.
    #[serde(default)]
    pub site: Option<u8>,
    /// The 1:1 NAT public address (two-site runs): peers reach the node there.
    #[serde(default)]
    pub public_ip: Option<Ipv4Addr>,
    /// Lease subnet (network form), known once the node is ready (None in IPv6-only runs).
    pub subnet: Option<Cidr>,
    /// eth0's IPv6 address (dual-stack and IPv6-only runs).
    #[serde(default)]
    pub underlay_ip6: Option<Ipv6Addr>,
    /// IPv6 lease subnet (network form), known once the node is ready.
    #[serde(default)]
    pub subnet6: Option<Cidr6>,
    /// IPv6 VTEP MAC (`flannel-v6.<VNI>` of kernel-ref nodes).
    #[serde(default)]
    pub vtep_mac6: Option<String>,
    /// IPv6 peers programmed on a kernel-ref node.
    #[serde(default)]
    pub programmed6: Vec<PeerEntry6>,
    /// FLANNEL_MTU.
    pub mtu: u32,
    /// VTEP MAC (kernel-ref nodes; flanneld nodes publish theirs in the lease).
    pub vtep_mac: Option<String>,
    /// Extra flanneld args of this node.
    pub extra_args: Vec<String>,
    /// The flanneld process, while running.
    pub flanneld: Option<ProcRecord>,
    /// Peers programmed on a kernel-ref node.
    pub programmed: Vec<PeerEntry>,
    /// Pods of this node.
    pub pods: Vec<PodState>,
}

/// A running packet capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureState {
    /// Capture name (`cap1`, ...).
    pub name: String,
    /// Namespace it runs in.
    pub ns: String,
    /// Interface.
    pub iface: String,
    /// Output file.
    pub pcap: PathBuf,
    /// The capture process.
    pub proc: ProcRecord,
}

/// Everything later commands need, saved as `<rundir>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Run prefix (namespace names start with `<prefix>-`).
    pub prefix: String,
    /// Run directory.
    pub run_dir: PathBuf,
    /// net-conf JSON in effect.
    pub net_conf: String,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// flanneld binary (when resolved).
    pub flanneld: Option<PathBuf>,
    /// Common flanneld args.
    pub flanneld_args: Vec<String>,
    /// Launch wrapper of every flanneld ([`ClusterSpec::flanneld_prefix`](super::ClusterSpec::flanneld_prefix)).
    #[serde(default)]
    pub flanneld_prefix: Vec<String>,
    /// netns-harness binary (when resolved).
    pub harness_bin: Option<PathBuf>,
    /// Responders in pods.
    pub responders: bool,
    /// Underlay veth offloads left on (`--link-offloads on`).
    pub underlay_tx_offload: bool,
    /// Pods per node for nodes added later.
    pub pods_per_node: usize,
    /// flanneld readiness limit in seconds.
    pub ready_timeout_secs: u64,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Running captures.
    pub captures: Vec<CaptureState>,
    /// Other processes to stop at teardown (iperf3 servers, ...).
    pub extra_procs: Vec<ProcRecord>,
    /// The process that owns the run and tears it down when it ends (None when detached, e.g.
    /// after the CLI `up`). `down --stale` removes runs whose owner died.
    pub owner: Option<ProcRecord>,
    /// The lease store.
    #[serde(default)]
    pub store: StoreKind,
    /// etcd or the API server (network stores only).
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Two-site NAT topology.
    #[serde(default)]
    pub sites: bool,
    /// How pods are made.
    #[serde(default)]
    pub pod_setup: PodSetup,
    /// The overlay's address families.
    #[serde(default)]
    pub ip_family: IpFamily,
}
