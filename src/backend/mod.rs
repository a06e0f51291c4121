//! Backends: turn peers into host state. Pure planners decide; reconcilers apply.

pub mod handoff;
pub mod hostgw;
pub mod kernel;
pub mod plan;
pub mod userspace;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::wire::MacAddr;

/// One remote node's subnet of one address family, as every backend sees it: already validated
/// from its lease (public IP parsed, VTEP MAC parsed, subnet inside Network). A dual-stack lease
/// becomes two peers.
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

/// Why a lease was not turned into peers. The message names the node (its subnet and public
/// IP) so an operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The lease has no IPv4 subnet.
    #[error("lease of {public_ip} has no IPv4 subnet")]
    NoSubnet {
        /// The node's public IP.
        public_ip: std::net::Ipv4Addr,
    },
    /// The subnet is not inside Network.
    #[error("lease {subnet} of node {public_ip}: subnet is outside Network {network}")]
    OutsideNetwork {
        /// The lease subnet.
        subnet: IpNet,
        /// The node's public IP.
        public_ip: std::net::Ipv4Addr,
        /// The configured Network.
        network: IpNet,
    },
    /// The public IP is unusable (unset, multicast, loopback, ...).
    #[error("lease {subnet}: PublicIP {public_ip} is not a usable unicast address")]
    BadPublicIp {
        /// The lease subnet.
        subnet: IpNet,
        /// The public IP as read.
        public_ip: std::net::Ipv4Addr,
    },
    /// vxlan backend data is missing or malformed.
    #[error("lease {subnet} of node {public_ip}: {reason}")]
    BadBackendData {
        /// The lease subnet.
        subnet: IpNet,
        /// The node's public IP.
        public_ip: std::net::Ipv4Addr,
        /// What is wrong.
        reason: String,
    },
    /// Two leases claim overlapping subnets; the later one is skipped.
    #[error("lease {subnet} of node {public_ip} overlaps {other}; skipped")]
    Overlap {
        /// The skipped lease's subnet.
        subnet: IpNet,
        /// The skipped lease's public IP.
        public_ip: std::net::Ipv4Addr,
        /// The subnet it overlaps.
        other: IpNet,
    },
}

/// Turns leases into validated IPv4 peers (pure). Invalid leases are reported, not fatal: the
/// other peers keep working. Leases are taken in subnet order so overlap decisions do not
/// depend on arrival order.
pub fn peers_from_leases<'a>(
    leases: impl IntoIterator<Item = &'a crate::lease::Lease>,
    net: &crate::config::netconf::NetConfig,
) -> (Vec<Peer>, Vec<PeerError>) {
    let mut leases: Vec<&crate::lease::Lease> = leases.into_iter().collect();
    leases.sort_by_key(|l| l.subnet);
    let mut peers: Vec<Peer> = Vec::with_capacity(leases.len());
    let mut problems = Vec::new();
    for lease in leases {
        let public_ip = lease.attrs.public_ip;
        let Some(subnet4) = lease.subnet else {
            problems.push(PeerError::NoSubnet { public_ip });
            continue;
        };
        let subnet = IpNet::V4(subnet4);
        if let Some(network) = net.network {
            if !network.contains(&subnet4) {
                problems.push(PeerError::OutsideNetwork {
                    subnet,
                    public_ip,
                    network: IpNet::V4(network),
                });
                continue;
            }
        }
        if public_ip.is_unspecified()
            || public_ip.is_multicast()
            || public_ip.is_broadcast()
            || public_ip.is_loopback()
        {
            problems.push(PeerError::BadPublicIp { subnet, public_ip });
            continue;
        }
        let (vtep_mac, vni) = if lease.attrs.backend_type == "vxlan" {
            match lease.attrs.vxlan_data() {
                Ok(Some(d)) if d.vtep_mac.is_unicast() => (Some(d.vtep_mac), Some(d.vni)),
                Ok(Some(d)) => {
                    problems.push(PeerError::BadBackendData {
                        subnet,
                        public_ip,
                        reason: format!("VtepMAC {} is not a unicast MAC", d.vtep_mac),
                    });
                    continue;
                }
                Ok(None) => {
                    problems.push(PeerError::BadBackendData {
                        subnet,
                        public_ip,
                        reason: "vxlan lease without BackendData".into(),
                    });
                    continue;
                }
                Err(e) => {
                    problems.push(PeerError::BadBackendData {
                        subnet,
                        public_ip,
                        reason: e.to_string(),
                    });
                    continue;
                }
            }
        } else {
            (None, None)
        };
        if let Some(other) = peers.iter().find(|p| overlaps(p.subnet, subnet)) {
            problems.push(PeerError::Overlap {
                subnet,
                public_ip,
                other: other.subnet,
            });
            continue;
        }
        peers.push(Peer {
            subnet,
            public_ip: IpAddr::V4(public_ip),
            backend_type: lease.attrs.backend_type.clone(),
            vtep_mac,
            vni,
            node: lease.node.clone(),
        });
    }
    (peers, problems)
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::netconf::NetConfig;
    use crate::lease::Lease;

    fn lease(key: &str, json: &str) -> Lease {
        Lease::from_kv(key, json).expect("lease")
    }

    fn vxlan(ip: &str, mac: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    }

    #[test]
    fn valid_leases_become_peers_and_bad_ones_are_named() {
        let net = NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .expect("net-conf");
        let leases = [
            lease("10.244.2.0-24", &vxlan("198.18.0.2", "02:00:00:00:00:02")),
            lease("10.245.1.0-24", &vxlan("198.18.0.3", "02:00:00:00:00:03")),
            lease("10.244.4.0-24", &vxlan("198.18.0.4", "01:00:5e:00:00:04")),
            lease("10.244.5.0-24", &vxlan("0.0.0.0", "02:00:00:00:00:05")),
            lease("10.244.2.128-25", &vxlan("198.18.0.6", "02:00:00:00:00:06")),
            lease(
                "10.244.7.0-24",
                r#"{"PublicIP":"198.18.0.7","PublicIPv6":null,"BackendType":"vxlan"}"#,
            ),
            lease(
                "10.244.8.0-24",
                r#"{"PublicIP":"198.18.0.8","PublicIPv6":null,"BackendType":"host-gw"}"#,
            ),
        ];
        let (peers, problems) = peers_from_leases(leases.iter().rev(), &net);
        let subnets: Vec<String> = peers.iter().map(|p| p.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.244.2.0/24", "10.244.8.0/24"]);
        assert_eq!(peers[0].vtep_mac, "02:00:00:00:00:02".parse().ok());
        assert_eq!(peers[0].vni, Some(1));
        assert_eq!(peers[1].vtep_mac, None);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 5, "{text:#?}");
        for needle in [
            "10.245.1.0/24 of node 198.18.0.3: subnet is outside Network",
            "10.244.4.0/24 of node 198.18.0.4: VtepMAC 01:00:5e:00:00:04 is not a unicast MAC",
            "10.244.5.0/24: PublicIP 0.0.0.0 is not a usable unicast address",
            "10.244.2.128/25 of node 198.18.0.6 overlaps 10.244.2.0/24",
            "10.244.7.0/24 of node 198.18.0.7: vxlan lease without BackendData",
        ] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle}: {text:#?}"
            );
        }
    }

    #[test]
    fn peer_order_does_not_depend_on_arrival_order() {
        let net = NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .expect("net-conf");
        let a = lease("10.244.3.0-24", &vxlan("198.18.0.3", "02:00:00:00:00:03"));
        let b = lease("10.244.3.0-25", &vxlan("198.18.0.9", "02:00:00:00:00:09"));
        let (p1, _) = peers_from_leases([&a, &b], &net);
        let (p2, _) = peers_from_leases([&b, &a], &net);
        assert_eq!(p1, p2);
        assert_eq!(p1.len(), 1);
    }
}
