//! Backends: turn peers into host state. Pure planners decide; reconcilers apply.

pub mod apply;
pub mod handoff;
pub mod hostgw;
pub mod intake;
pub mod kernel;
pub mod plan;
pub mod reach;
pub mod userspace;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::wire::MacAddr;

/// One remote node's subnet of one address family, as every backend sees it. Built from leases
/// only by [`intake::intake`], which checked it (subnet strictly inside Network and overlapping
/// nothing, usable public IP, unicast VTEP MAC). A dual-stack lease becomes two peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// The remote node's pod subnet of this family.
    pub subnet: IpNet,
    /// The underlay address that reaches the remote node (its `PublicIP`/`PublicIPv6`).
    pub public_ip: IpAddr,
    /// Lease backend type (`vxlan`, `host-gw`, ...).
    pub backend_type: String,
    /// Remote VTEP MAC for vxlan leases.
    pub vtep_mac: Option<MacAddr>,
    /// Remote VNI for vxlan leases.
    pub vni: Option<u32>,
    /// The remote Kubernetes node's name, where the store knows it (for messages).
    pub node: Option<String>,
}
