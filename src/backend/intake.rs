//! Lease intake: the one place where other nodes' leases are checked and turned into
//! [`Peer`]s. Every store (etcd, directory, Kubernetes) and every plane (userspace, kernel,
//! host-gw) takes its peers from here, so downstream code never sees an unchecked lease.
//!
//! A lease is refused (with a [`Refusal`] naming it) when its subnet is not strictly inside
//! Network, has another prefix length than SubnetLen (allocating stores only), overlaps our own
//! subnet, overlaps another peer's subnet (then *both* are refused: no first-come winner, no
//! broad lease hijacking a cluster), has an unusable public IP (ours, unspecified, loopback,
//! link-local, multicast, broadcast, reserved), broken vxlan backend data, or another backend
//! type than this node's (flannel's backends ignore those: "ignoring non-vxlan …"; such a
//! lease still takes part in the overlap check, so it cannot let an overlapping peer through).
//! What passes becomes a [`Peer`] with a typed [`PeerKind`]; nothing downstream checks a lease
//! again. Pure and family-generic; overlaps are found by a sort and one sweep (O(n log n)).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::plan::{BACKEND_HOST_GW, BACKEND_VXLAN};
use super::{Checked, Peer, PeerKind};
use crate::lease::Lease;

/// The backend this node runs: only leases of its type become peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NodeBackend {
    /// `vxlan` (the default backend of flannel's documentation and manifest).
    #[default]
    Vxlan,
    /// `host-gw`.
    HostGw,
}

impl NodeBackend {
    /// The backend a network config selects; `None` for a type flannel-rs does not implement.
    pub fn of(backend: &crate::config::netconf::BackendConfig) -> Option<NodeBackend> {
        use crate::config::netconf::BackendConfig;
        match backend {
            BackendConfig::Vxlan(_) => Some(NodeBackend::Vxlan),
            BackendConfig::HostGw => Some(NodeBackend::HostGw),
            BackendConfig::Other { .. } => None,
        }
    }

    /// The lease `BackendType` of this backend.
    pub fn backend_type(self) -> &'static str {
        match self {
            NodeBackend::Vxlan => BACKEND_VXLAN,
            NodeBackend::HostGw => BACKEND_HOST_GW,
        }
    }
}

/// What intake compares leases with: the cluster network and our own lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeConfig {
    /// This node's backend.
    pub backend: NodeBackend,
    /// `Network` (IPv4 peers are refused without it).
    pub network_v4: Option<Ipv4Net>,
    /// `IPv6Network` (IPv6 peers are refused without it).
    pub network_v6: Option<Ipv6Net>,
    /// Required IPv4 prefix length (`SubnetLen`); `None` where the store does not allocate
    /// (Kubernetes podCIDRs are taken as they are).
    pub subnet_len_v4: Option<u8>,
    /// Required IPv6 prefix length (`IPv6SubnetLen`), likewise.
    pub subnet_len_v6: Option<u8>,
    /// Our own lease's subnets.
    pub own_subnets: Vec<IpNet>,
    /// Our own addresses (public IP, interface address): a peer claiming one would loop.
    pub own_ips: Vec<IpAddr>,
}

/// Why a lease (one address family of it) was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefuseReason {
    /// The lease has no subnet of any enabled family.
    NoSubnet,
    /// The subnet is not strictly inside Network (or Network of its family is not configured).
    OutsideNetwork {
        /// Network of the subnet's family, if configured.
        network: Option<IpNet>,
    },
    /// The prefix length differs from SubnetLen.
    WrongPrefix {
        /// SubnetLen.
        want: u8,
    },
    /// The subnet overlaps our own subnet (equal, sub- or supernet).
    OverlapsOwn {
        /// Our subnet.
        own: IpNet,
    },
    /// The subnet overlaps another peer's; both are refused.
    OverlapsPeer {
        /// The other lease's subnet.
        other: IpNet,
        /// The other lease's public IP.
        other_ip: IpAddr,
    },
    /// The public IP is one of ours.
    OwnPublicIp,
    /// The public IP is not a usable unicast address.
    BadPublicIp {
        /// What kind of address it is.
        kind: &'static str,
    },
    /// vxlan backend data is missing or malformed.
    BadBackendData {
        /// What is wrong.
        reason: String,
    },
    /// The lease is of another backend type than this node's.
    OtherBackend {
        /// The lease's `BackendType`.
        backend_type: String,
        /// This node's.
        ours: &'static str,
    },
}

impl RefuseReason {
    /// A short label for `/metrics`.
    pub fn label(&self) -> &'static str {
        match self {
            RefuseReason::NoSubnet => "no_subnet",
            RefuseReason::OutsideNetwork { .. } => "outside_network",
            RefuseReason::WrongPrefix { .. } => "wrong_prefix",
            RefuseReason::OverlapsOwn { .. } => "overlaps_own_subnet",
            RefuseReason::OverlapsPeer { .. } => "overlaps_peer",
            RefuseReason::OwnPublicIp => "own_public_ip",
            RefuseReason::BadPublicIp { .. } => "bad_public_ip",
            RefuseReason::BadBackendData { .. } => "bad_backend_data",
            RefuseReason::OtherBackend { .. } => "other_backend",
        }
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::NoSubnet => f.write_str("no subnet of an enabled address family"),
            RefuseReason::OutsideNetwork { network: Some(n) } => {
                write!(f, "subnet is not strictly inside Network {n}")
            }
            RefuseReason::OutsideNetwork { network: None } => {
                f.write_str("no Network is configured for this address family")
            }
            RefuseReason::WrongPrefix { want } => {
                write!(f, "prefix length is not SubnetLen {want}")
            }
            RefuseReason::OverlapsOwn { own } => write!(f, "overlaps our own subnet {own}"),
            RefuseReason::OverlapsPeer { other, other_ip } => write!(
                f,
                "overlaps {other} of node {other_ip}; neither is installed"
            ),
            RefuseReason::OwnPublicIp => f.write_str("PublicIP is one of this node's addresses"),
            RefuseReason::BadPublicIp { kind } => {
                write!(f, "PublicIP is {kind}, not a usable unicast address")
            }
            RefuseReason::BadBackendData { reason } => f.write_str(reason),
            RefuseReason::OtherBackend { backend_type, ours } => write!(
                f,
                "backend type {:?} is not this node's {ours}; not programmed, as flannel",
                backend_type
            ),
        }
    }
}

/// One refused lease (one address family of it), named so an operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Refusal {
    /// The lease subnet (`None` when the lease has none).
    pub subnet: Option<IpNet>,
    /// The lease's public IP of that family.
    pub public_ip: IpAddr,
    /// The Kubernetes node, where the store knows it.
    pub node: Option<String>,
    /// Why.
    pub reason: RefuseReason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("lease ")?;
        if let Some(s) = self.subnet {
            write!(f, "{s} ")?;
        }
        write!(f, "of node {}", self.public_ip)?;
        if let Some(n) = &self.node {
            write!(f, " ({n})")?;
        }
        write!(f, " refused: {}", self.reason)
    }
}

/// The result of [`intake`]: peers to program (sorted by subnet) and refused leases (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intake {
    /// Valid peers, at most one per subnet, no two overlapping.
    pub peers: Vec<Peer>,
    /// What was refused and why.
    pub refused: Vec<Refusal>,
}

/// Checks `leases` against `cfg`; see the module docs.
pub fn intake<'a>(leases: impl IntoIterator<Item = &'a Lease>, cfg: &IntakeConfig) -> Intake {
    let mut refused = Vec::new();
    let mut candidates: Vec<Candidate> = Vec::new();
    for lease in leases {
        let v4 = lease.subnet.map(|s| {
            (
                IpNet::V4(s),
                IpAddr::V4(lease.attrs.public_ip),
                lease.attrs.vxlan_data(),
            )
        });
        let v6 = lease.ipv6_subnet.map(|s| {
            (
                IpNet::V6(s),
                lease
                    .attrs
                    .public_ipv6
                    .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V6),
                lease.attrs.vxlan_v6_data(),
            )
        });
        // A family without a Network is not in use: its half of a dual-stack lease is ignored.
        let v4 = v4.filter(|_| cfg.network_v4.is_some());
        let v6 = v6.filter(|_| cfg.network_v6.is_some());
        if v4.is_none() && v6.is_none() {
            refused.push(Refusal {
                subnet: lease.subnet.map(IpNet::V4),
                public_ip: IpAddr::V4(lease.attrs.public_ip),
                node: lease.node.clone(),
                reason: RefuseReason::NoSubnet,
            });
            continue;
        }
        for (subnet, public_ip, data) in v4.into_iter().chain(v6) {
            let refuse = |reason| Refusal {
                subnet: Some(subnet),
                public_ip,
                node: lease.node.clone(),
                reason,
            };
            let kind = check_subnet(subnet, cfg)
                .and_then(|()| check_ip(public_ip, cfg))
                .and_then(|()| kind(&lease.attrs.backend_type, data));
            match kind {
                Ok(kind) => candidates.push(Candidate {
                    subnet,
                    public_ip,
                    node: lease.node.clone(),
                    backend_type: lease.attrs.backend_type.clone(),
                    kind,
                }),
                Err(reason) => refused.push(refuse(reason)),
            }
        }
    }
    let mut peers = Vec::with_capacity(candidates.len());
    for c in sweep_overlaps(candidates, &mut refused) {
        match c.kind {
            Some(kind) if kind.backend_type() == cfg.backend.backend_type() => peers.push(Peer {
                subnet: c.subnet,
                public_ip: c.public_ip,
                kind,
                node: c.node,
                checked: Checked,
            }),
            _ => refused.push(Refusal {
                subnet: Some(c.subnet),
                public_ip: c.public_ip,
                node: c.node,
                reason: RefuseReason::OtherBackend {
                    backend_type: c.backend_type,
                    ours: cfg.backend.backend_type(),
                },
            }),
        }
    }
    peers.sort();
    refused.sort();
    refused.dedup();
    Intake { peers, refused }
}

/// A lease family that passed the checks of its own, before the overlap sweep.
struct Candidate {
    subnet: IpNet,
    public_ip: IpAddr,
    node: Option<String>,
    backend_type: String,
    /// `None` for a backend type flannel-rs does not program.
    kind: Option<PeerKind>,
}

/// The typed kind of a lease of `backend_type` with vxlan backend data `data` (of the
/// family in question); `Ok(None)` for another backend type.
fn kind(
    backend_type: &str,
    data: Result<Option<crate::lease::VxlanBackendData>, crate::lease::AttrsError>,
) -> Result<Option<PeerKind>, RefuseReason> {
    let bad = |reason: String| Err(RefuseReason::BadBackendData { reason });
    match backend_type {
        BACKEND_VXLAN => match data {
            Ok(Some(d)) if d.vtep_mac.is_unicast() => Ok(Some(PeerKind::Vxlan {
                vtep_mac: d.vtep_mac,
                vni: d.vni,
            })),
            Ok(Some(d)) => bad(format!("VtepMAC {} is not a unicast MAC", d.vtep_mac)),
            Ok(None) => bad("vxlan lease without BackendData".into()),
            Err(e) => bad(e.to_string()),
        },
        BACKEND_HOST_GW => Ok(Some(PeerKind::HostGw)),
        _ => Ok(None),
    }
}

fn check_subnet(subnet: IpNet, cfg: &IntakeConfig) -> Result<(), RefuseReason> {
    let (network, want) = match subnet {
        IpNet::V4(_) => (cfg.network_v4.map(IpNet::V4), cfg.subnet_len_v4),
        IpNet::V6(_) => (cfg.network_v6.map(IpNet::V6), cfg.subnet_len_v6),
    };
    let inside =
        network.is_some_and(|n| n.contains(&subnet) && subnet.prefix_len() > n.prefix_len());
    if !inside {
        return Err(RefuseReason::OutsideNetwork { network });
    }
    // Before the prefix check: a /25 inside our /24 is named for what matters most.
    if let Some(own) = cfg.own_subnets.iter().find(|o| overlaps(**o, subnet)) {
        return Err(RefuseReason::OverlapsOwn { own: *own });
    }
    if let Some(want) = want.filter(|w| *w != subnet.prefix_len()) {
        return Err(RefuseReason::WrongPrefix { want });
    }
    Ok(())
}

fn check_ip(ip: IpAddr, cfg: &IntakeConfig) -> Result<(), RefuseReason> {
    if cfg.own_ips.contains(&ip) {
        return Err(RefuseReason::OwnPublicIp);
    }
    match unusable_kind(ip) {
        Some(kind) => Err(RefuseReason::BadPublicIp { kind }),
        None => Ok(()),
    }
}

/// What kind of address `ip` is if it cannot be a node's underlay address.
pub fn unusable_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => unusable_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return unusable_v4(v4).or(Some("an IPv4-mapped address"));
            }
            let first = v6.segments()[0];
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn unusable_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if o[0] >= 240 {
        Some("reserved (240.0.0.0/4)")
    } else {
        None
    }
}

/// Whether two prefixes share an address (for prefixes: one contains the other).
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The address range of a prefix as integers (IPv4 and IPv6 kept apart by the family flag).
fn range(n: IpNet) -> (bool, u128, u128) {
    match n {
        IpNet::V4(v) => (
            false,
            u128::from(u32::from(v.network())),
            u128::from(u32::from(v.broadcast())),
        ),
        IpNet::V6(v) => (true, u128::from(v.network()), u128::from(v.broadcast())),
    }
}

/// Refuses every candidate that overlaps another (both sides), keeps the rest. Sorted by
/// range start, an overlap is a start at or below the highest end seen so far in the same
/// family; such a run of mutually chained ranges is a cluster, and every member of a cluster
/// of two or more is refused.
fn sweep_overlaps(mut candidates: Vec<Candidate>, refused: &mut Vec<Refusal>) -> Vec<Candidate> {
    candidates.sort_by_key(|p| {
        let (fam, start, end) = range(p.subnet);
        // Wider first at equal start, so a cluster's first member covers the others.
        (fam, start, std::cmp::Reverse(end), p.public_ip)
    });
    let mut kept = Vec::with_capacity(candidates.len());
    let mut i = 0;
    while i < candidates.len() {
        let (fam, _, mut end) = range(candidates[i].subnet);
        let mut j = i + 1;
        while j < candidates.len() {
            let (f, s, e) = range(candidates[j].subnet);
            if f != fam || s > end {
                break;
            }
            end = end.max(e);
            j += 1;
        }
        if j == i + 1 {
            kept.push(i);
        } else {
            let cluster = &candidates[i..j];
            // Prefixes are nested or disjoint, so the first (widest) member contains every
            // other: each names the first, the first names the second.
            for (k, p) in cluster.iter().enumerate() {
                let other = if k == 0 { &cluster[1] } else { &cluster[0] };
                refused.push(Refusal {
                    subnet: Some(p.subnet),
                    public_ip: p.public_ip,
                    node: p.node.clone(),
                    reason: RefuseReason::OverlapsPeer {
                        other: other.subnet,
                        other_ip: other.public_ip,
                    },
                });
            }
        }
        i = j;
    }
    let mut kept = kept.into_iter().peekable();
    candidates
        .into_iter()
        .enumerate()
        .filter_map(|(k, c)| kept.next_if_eq(&k).map(|_| c))
        .collect()
}

/// Remembers which refusals were already reported, so each is logged once while it lasts
/// (not on every resync) and again only if it goes away and comes back.
#[derive(Debug, Default)]
pub struct RefusalLog {
    reported: BTreeSet<Refusal>,
}

impl RefusalLog {
    /// Replaces the current set with `refused` and returns the ones not reported before.
    pub fn update<'a>(&mut self, refused: &'a [Refusal]) -> Vec<&'a Refusal> {
        let fresh: Vec<&Refusal> = refused
            .iter()
            .filter(|r| !self.reported.contains(*r))
            .collect();
        self.reported = refused.iter().cloned().collect();
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Lease;

    fn lease(key: &str, json: &str) -> Lease {
        Lease::from_kv(key, json).expect("lease")
    }

    fn vxlan(ip: &str, mac: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    }

    fn cfg() -> IntakeConfig {
        IntakeConfig {
            network_v4: "10.244.0.0/16".parse().ok(),
            subnet_len_v4: Some(24),
            own_subnets: vec!["10.244.1.0/24".parse().expect("net")],
            own_ips: vec!["198.18.0.1".parse().expect("ip")],
            ..IntakeConfig::default()
        }
    }

    /// `got` refused exactly `count` leases, among them one naming each of `needles`.
    fn assert_refused(got: &Intake, count: usize, needles: &[&str]) {
        let text: Vec<String> = got.refused.iter().map(ToString::to_string).collect();
        for needle in needles {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle}: {text:#?}"
            );
        }
        assert_eq!(text.len(), count, "{text:#?}");
    }

    fn subnets(i: &Intake) -> Vec<String> {
        i.peers.iter().map(|p| p.subnet.to_string()).collect()
    }

    #[test]
    fn valid_leases_become_peers_and_bad_ones_are_named() {
        let leases = [
            lease("10.244.2.0-24", &vxlan("198.18.0.2", "02:00:00:00:00:02")),
            lease("10.245.1.0-24", &vxlan("198.18.0.3", "02:00:00:00:00:03")),
            lease("10.244.4.0-24", &vxlan("198.18.0.4", "01:00:5e:00:00:04")),
            lease("10.244.5.0-24", &vxlan("0.0.0.0", "02:00:00:00:00:05")),
            lease(
                "10.244.7.0-24",
                r#"{"PublicIP":"198.18.0.7","PublicIPv6":null,"BackendType":"vxlan"}"#,
            ),
            lease(
                "10.244.8.0-24",
                r#"{"PublicIP":"198.18.0.8","PublicIPv6":null,"BackendType":"host-gw"}"#,
            ),
            lease("10.244.9.0-25", &vxlan("198.18.0.9", "02:00:00:00:00:09")),
        ];
        let got = intake(leases.iter().rev(), &cfg());
        assert_eq!(subnets(&got), ["10.244.2.0/24"]);
        assert_eq!(
            got.peers[0].kind,
            PeerKind::Vxlan {
                vtep_mac: "02:00:00:00:00:02".parse().expect("mac"),
                vni: 1
            }
        );
        assert_refused(&got, 6, &[
            "10.245.1.0/24 of node 198.18.0.3 refused: subnet is not strictly inside Network",
            "10.244.4.0/24 of node 198.18.0.4 refused: VtepMAC 01:00:5e:00:00:04 is not a unicast",
            "10.244.5.0/24 of node 0.0.0.0 refused: PublicIP is unspecified",
            "10.244.7.0/24 of node 198.18.0.7 refused: vxlan lease without BackendData",
            "10.244.9.0/25 of node 198.18.0.9 refused: prefix length is not SubnetLen 24",
            "10.244.8.0/24 of node 198.18.0.8 refused: backend type \"host-gw\" is not this node's vxlan",
        ]);
        // A host-gw node takes the host-gw lease and refuses the valid vxlan one.
        let hg = IntakeConfig {
            backend: NodeBackend::HostGw,
            ..cfg()
        };
        let got = intake(&leases, &hg);
        assert_eq!(subnets(&got), ["10.244.8.0/24"]);
        assert_eq!(got.peers[0].kind, PeerKind::HostGw);
        assert_refused(&got, 6, &["10.244.2.0/24 of node 198.18.0.2 refused: backend type \"vxlan\" is not this node's host-gw"]);
    }

    #[test]
    fn a_broad_lease_hijacks_nothing_and_both_sides_of_an_overlap_are_refused() {
        let mut c = cfg();
        c.subnet_len_v4 = None; // as the Kubernetes store: prefixes taken as they are
        let leases = [
            lease("10.244.0.0-16", &vxlan("198.18.0.66", "02:00:00:00:00:66")),
            lease("10.244.2.0-24", &vxlan("198.18.0.2", "02:00:00:00:00:02")),
            lease("10.244.3.0-24", &vxlan("198.18.0.3", "02:00:00:00:00:03")),
            lease("10.244.3.128-25", &vxlan("198.18.0.4", "02:00:00:00:00:04")),
            lease("10.244.3.192-26", &vxlan("198.18.0.5", "02:00:00:00:00:05")),
        ];
        let got = intake(&leases, &c);
        // The /16 equals Network; the /24 and its two nested leases refuse each other.
        assert_eq!(subnets(&got), ["10.244.2.0/24"]);
        assert_refused(&got, 4, &[
            "10.244.0.0/16 of node 198.18.0.66 refused: subnet is not strictly inside Network",
            "10.244.3.0/24 of node 198.18.0.3 refused: overlaps 10.244.3.128/25 of node 198.18.0.4",
            "10.244.3.128/25 of node 198.18.0.4 refused: overlaps 10.244.3.0/24 of node 198.18.0.3",
            "10.244.3.192/26 of node 198.18.0.5 refused: overlaps 10.244.3.0/24",
        ]);
        // Arrival order does not matter.
        let rev = intake(leases.iter().rev(), &c);
        assert_eq!(rev, got);
    }

    #[test]
    fn a_lease_of_another_backend_still_refuses_what_it_overlaps() {
        let leases = [
            lease("10.244.2.0-24", &vxlan("198.18.0.2", "02:00:00:00:00:02")),
            lease(
                "10.244.2.0-24",
                r#"{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"udp"}"#,
            ),
        ];
        let got = intake(&leases, &cfg());
        assert!(got.peers.is_empty());
        assert_refused(&got, 2, &["overlaps 10.244.2.0/24 of node 198.18.0.3"]);
    }

    #[test]
    fn own_subnet_overlaps_and_own_or_odd_public_ips_are_refused() {
        let c = cfg();
        let leases = [
            lease("10.244.0.0-23", &vxlan("198.18.0.2", "02:00:00:00:00:02")),
            lease("10.244.1.0-24", &vxlan("198.18.0.12", "02:00:00:00:00:0c")),
            lease("10.244.1.128-25", &vxlan("198.18.0.3", "02:00:00:00:00:03")),
            lease("10.244.4.0-24", &vxlan("198.18.0.1", "02:00:00:00:00:04")),
            lease("10.244.5.0-24", &vxlan("127.0.0.5", "02:00:00:00:00:05")),
            lease("10.244.6.0-24", &vxlan("169.254.0.6", "02:00:00:00:00:06")),
            lease("10.244.7.0-24", &vxlan("224.0.0.7", "02:00:00:00:00:07")),
            lease(
                "10.244.8.0-24",
                &vxlan("255.255.255.255", "02:00:00:00:00:08"),
            ),
            lease("10.244.9.0-24", &vxlan("240.0.0.9", "02:00:00:00:00:09")),
            lease("10.244.10.0-24", &vxlan("0.1.2.3", "02:00:00:00:00:0a")),
            lease("10.244.11.0-24", &vxlan("198.18.0.11", "02:00:00:00:00:0b")),
        ];
        let got = intake(&leases, &c);
        assert_eq!(subnets(&got), ["10.244.11.0/24"]);
        assert_refused(
            &got,
            10,
            &[
                "10.244.0.0/23 of node 198.18.0.2 refused: overlaps our own subnet 10.244.1.0/24",
                "10.244.1.128/25 of node 198.18.0.3 refused: overlaps our own subnet",
                "10.244.1.0/24 of node 198.18.0.12 refused: overlaps our own subnet",
                "10.244.4.0/24 of node 198.18.0.1 refused: PublicIP is one of this node's",
                "PublicIP is loopback",
                "PublicIP is link-local",
                "PublicIP is multicast",
                "PublicIP is broadcast",
                "PublicIP is reserved",
                "10.244.10.0/24 of node 0.1.2.3 refused: PublicIP is unspecified",
            ],
        );
    }

    #[test]
    fn ipv6_leases_take_the_same_path() {
        let c = IntakeConfig {
            network_v6: "2001:db8:100::/48".parse().ok(),
            subnet_len_v6: Some(64),
            own_subnets: vec!["2001:db8:100:1::/64".parse().expect("net")],
            ..IntakeConfig::default()
        };
        let v6 = |ip: &str| {
            format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{ip}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}}}"#
            )
        };
        let leases = [
            lease("10.0.2.0-24&2001:db8:100:2::-64", &v6("2001:db8:ff::2")),
            lease("10.0.3.0-24&2001:db8:100:8000::-56", &v6("2001:db8:ff::3")),
            lease("10.0.4.0-24&2001:db8:100:4::-64", &v6("fe80::4")),
            lease("10.0.5.0-24&2001:db8:100:5::-64", &v6("ff02::5")),
            lease("10.0.6.0-24&2001:db8:200:6::-64", &v6("2001:db8:ff::6")),
            lease("10.0.7.0-24&2001:db8:100::-56", &v6("2001:db8:ff::7")),
        ];
        let got = intake(&leases, &c);
        assert_eq!(subnets(&got), ["2001:db8:100:2::/64"]);
        assert_eq!(
            got.peers[0].public_ip,
            "2001:db8:ff::2".parse::<IpAddr>().expect("ip")
        );
        assert_refused(&got, 5, &[
            "2001:db8:100:8000::/56 of node 2001:db8:ff::3 refused: prefix length is not SubnetLen 64",
            "PublicIP is link-local",
            "PublicIP is multicast",
            "2001:db8:200:6::/64 of node 2001:db8:ff::6 refused: subnet is not strictly inside",
            "2001:db8:100::/56 of node 2001:db8:ff::7 refused: overlaps our own subnet 2001:db8:100:1::/64",
        ]);
    }

    #[test]
    fn ten_thousand_leases_are_checked_well_under_a_second() {
        let c = IntakeConfig {
            network_v4: "10.0.0.0/8".parse().ok(),
            subnet_len_v4: Some(24),
            own_subnets: vec!["10.0.1.0/24".parse().expect("net")],
            own_ips: vec!["198.18.0.1".parse().expect("ip")],
            ..IntakeConfig::default()
        };
        let leases: Vec<Lease> = (0u32..10_000)
            .map(|i| {
                let n = i + 2;
                let key = format!("10.{}.{}.0-24", n >> 8, n & 0xff);
                let ip = format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff);
                lease(&key, &vxlan(&ip, "02:00:00:00:00:02"))
            })
            .collect();
        let start = std::time::Instant::now();
        let got = intake(&leases, &c);
        let took = start.elapsed();
        assert_eq!(got.peers.len(), 10_000);
        assert!(got.refused.is_empty());
        // Debug builds on a loaded 2-core machine: O(n²) would take tens of seconds here.
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn refusals_are_reported_once_while_they_last() {
        let mut log = RefusalLog::default();
        let r = |ip: &str| Refusal {
            subnet: "10.244.9.0/24".parse().ok(),
            public_ip: ip.parse().expect("ip"),
            node: None,
            reason: RefuseReason::OwnPublicIp,
        };
        let first = [r("198.18.0.1")];
        assert_eq!(log.update(&first).len(), 1);
        assert!(log.update(&first).is_empty());
        let both = [r("198.18.0.1"), r("198.18.0.2")];
        assert_eq!(log.update(&both), [&both[1]]);
        assert!(log.update(&[]).is_empty());
        assert_eq!(log.update(&first).len(), 1);
    }
}
