//! Backends: turn peers into host state. Pure planners decide; reconcilers apply.
//!
//! How a lease change flows: a store sends a snapshot or events; `lease::LeaseWatcher` turns
//! them into added/removed events against the peer leases it holds, the one diff of the lease
//! set (the Kubernetes store derives leases from Node objects and sends the accepted set whole,
//! once per burst of node events that changed it). On any event
//! the daemon runs [`intake::intake`] over the watcher's whole set, once, and hands the
//! checked peer set as one value (`&[Peer]`) to the data plane, and through a watch channel to
//! the prober and the VXLAN guard. A plane diffs nothing but that set against what it has:
//! the userspace plane builds its peer table whole and swaps it in; the kernel vxlan, host-gw
//! and direct-route reconcilers plan the entries and diff them against the kernel's
//! ([`plan::Plan::diff`]), the one diff that must stay. The daemon repeats the last sync
//! every 10 s.

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

/// What a peer's lease says about reaching it, checked by intake: a vxlan peer has a
/// unicast VTEP MAC and a VNI; a host-gw peer needs nothing but its public IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerKind {
    /// A `vxlan` lease with valid `BackendData` (`BackendV6Data` for an IPv6 peer).
    Vxlan {
        /// Remote VTEP MAC (unicast).
        vtep_mac: MacAddr,
        /// Remote VNI.
        vni: u32,
    },
    /// A `host-gw` lease.
    HostGw,
}

impl PeerKind {
    /// The lease `BackendType` this kind comes from.
    pub fn backend_type(&self) -> &'static str {
        match self {
            PeerKind::Vxlan { .. } => plan::BACKEND_VXLAN,
            PeerKind::HostGw => plan::BACKEND_HOST_GW,
        }
    }
}

/// One remote node's subnet of one address family, as every backend sees it. Built only by
/// [`intake::intake`], which checked it (subnet strictly inside Network and overlapping
/// nothing, usable public IP, the lease of this node's backend type with valid backend data):
/// a private field keeps struct literals out of code outside this module, so downstream code
/// cannot make a peer from an unchecked lease. The fields are public for reading. A
/// dual-stack lease becomes two peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// The remote node's pod subnet of this family.
    pub subnet: IpNet,
    /// The underlay address that reaches the remote node (its `PublicIP`/`PublicIPv6`).
    pub public_ip: IpAddr,
    /// How the lease says to reach it.
    pub kind: PeerKind,
    /// The remote Kubernetes node's name, where the store knows it (for messages).
    pub node: Option<String>,
    /// Only intake (in this module's tree) builds peers.
    checked: Checked,
}

/// The mark of a [`Peer`] built by intake: private, so no code outside this module's tree
/// can write a `Peer { .. }` literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Checked;

impl Peer {
    /// The VTEP MAC and VNI of a vxlan peer.
    pub fn vtep(&self) -> Option<(MacAddr, u32)> {
        match self.kind {
            PeerKind::Vxlan { vtep_mac, vni } => Some((vtep_mac, vni)),
            PeerKind::HostGw => None,
        }
    }

    /// A peer as intake would build it, for unit tests outside this module.
    #[cfg(test)]
    pub(crate) fn checked_for_test(subnet: &str, public_ip: &str, kind: PeerKind) -> Peer {
        Peer {
            subnet: subnet.parse().expect("subnet"),
            public_ip: public_ip.parse().expect("ip"),
            kind,
            node: None,
            checked: Checked,
        }
    }
}
