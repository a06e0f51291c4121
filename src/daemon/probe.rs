//! Peer reachability: every peer, IPv4 and IPv6, is probed with ICMP/ICMPv6 echo over the
//! overlay (vxlan: to the peer's VTEP address, host-gw: to its public IP), so a node whose
//! VXLAN packets never arrive (a NATed public IP, a blocked UDP port: field problems P1 and
//! P3) is named in the log and on `/metrics` instead of silently black-holing pod traffic.
//! A dual-stack peer is two peers here (one per subnet), each with its own series.
//!
//! The decisions shared with `flanneld doctor` (probe target, how a peer is named, the fix to
//! suggest) are in [`crate::backend::reach`]; the state transitions are here; the probing
//! itself is [`crate::io::icmp::Pinger`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::backend::Peer;
use crate::io::icmp::Pinger;
use crate::netlink::IpFamily;

use super::fallback::{Path, PeerPath, Policy, Round, Switch};
use super::metrics::{DaemonMetrics, PeerGauge, PeerPathGauge};

pub use crate::backend::reach::{
    is_private_or_cgnat, peer_label, probe_target, transport, unreachable_fixes,
    unreachable_message, ProbeContext, PROBE_TIMEOUT, UNREACHABLE_AFTER,
};

/// What changed for a peer after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It has just missed [`UNREACHABLE_AFTER`] probes in a row.
    Unreachable,
    /// It answered again after being unreachable.
    Recovered,
}

/// One peer's probe history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealth {
    /// Known state: `None` until it answered once or missed enough probes.
    pub reachable: Option<bool>,
    /// Unanswered probes since the last answer.
    pub consecutive_failures: u32,
    /// Unanswered probes in total.
    pub failures_total: u64,
}

impl PeerHealth {
    /// Records one probe result.
    pub fn record(&mut self, answered: bool) -> Option<Transition> {
        if answered {
            self.consecutive_failures = 0;
            let was = self.reachable.replace(true);
            return (was == Some(false)).then_some(Transition::Recovered);
        }
        self.failures_total += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= UNREACHABLE_AFTER && self.reachable != Some(false) {
            self.reachable = Some(false);
            return Some(Transition::Unreachable);
        }
        None
    }
}

/// `--host-gw-fallback` in the prober: each round, the on-link test of the peers, a probe
/// of the public IP of every peer on the direct path, the per-peer decision
/// ([`super::fallback`]) and the set of subnets the data plane routes directly.
#[derive(Debug)]
pub struct Fallback {
    policy: Policy,
    nl: Option<crate::netlink::Netlink>,
    states: HashMap<(IpNet, IpAddr), PeerPath>,
    direct: watch::Sender<HashSet<IpNet>>,
}

impl Fallback {
    /// Publishes the subnets to route directly on `direct` (the main loop re-syncs the plane
    /// on every change).
    pub fn new(policy: Policy, direct: watch::Sender<HashSet<IpNet>>) -> Fallback {
        Fallback {
            policy,
            nl: None,
            states: HashMap::new(),
            direct,
        }
    }

    /// DirectRouting's on-link test for the vxlan peers of both families (none when netlink
    /// is unavailable).
    async fn onlink(&mut self, peers: &[Peer]) -> HashSet<IpAddr> {
        if self.nl.is_none() {
            match crate::netlink::Netlink::connect() {
                Ok(nl) => self.nl = Some(nl),
                Err(e) => {
                    warn!(error = %e, "host-gw fallback: no netlink socket for the on-link test");
                    return HashSet::new();
                }
            }
        }
        let Some(nl) = &self.nl else {
            return HashSet::new();
        };
        let mut onlink = HashSet::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            onlink.extend(crate::backend::kernel::onlink_public_ips(nl, family, peers).await);
        }
        onlink
    }

    fn is_direct(&self, peer: &Peer) -> bool {
        self.states
            .get(&(peer.subnet, peer.public_ip))
            .is_some_and(|s| s.path == Path::Direct)
    }

    /// Records a round of `peer`, logging a switch in one line.
    fn observe(
        &mut self,
        peer: &Peer,
        target: IpAddr,
        round: Round,
        ctx: &ProbeContext,
    ) -> Option<Switch> {
        let state = self
            .states
            .entry((peer.subnet, peer.public_ip))
            .or_default();
        let switch = state.observe(&self.policy, round, std::time::Instant::now());
        let label = peer_label(peer, ctx);
        let ip = peer.public_ip;
        match switch {
            Some(Switch::FellBack { rounds }) => warn!(
                subnet = %peer.subnet, public_ip = %ip,
                "{label}: {rounds} ICMP echo requests to its VTEP {target} over VXLAN went unanswered and {ip} is on-link: host-gw fallback, routing its subnet directly via {ip} (VXLAN is still probed)"
            ),
            Some(Switch::Restored) => info!(
                subnet = %peer.subnet, public_ip = %ip,
                "{label}: its VTEP {target} answers over VXLAN again: host-gw fallback ends, back to VXLAN"
            ),
            Some(Switch::OffLink) => warn!(
                subnet = %peer.subnet, public_ip = %ip,
                "{label}: {ip} is no longer on-link: host-gw fallback ends, back to VXLAN"
            ),
            Some(Switch::DirectUnreachable { rounds }) => warn!(
                subnet = %peer.subnet, public_ip = %ip,
                "{}; on the host-gw fallback path {rounds} ICMP echo requests to {ip} went unanswered too: the peer is unreachable",
                unreachable_message(peer, target, ctx)
            ),
            Some(Switch::DirectAnswers) => info!(
                subnet = %peer.subnet, public_ip = %ip,
                "{label}: {ip} answers again on the host-gw fallback path"
            ),
            None => {}
        }
        switch
    }

    /// Drops the state of peers that are gone; publishes the direct set if it changed;
    /// exports the paths.
    fn finish(&mut self, live: &HashSet<(IpNet, IpAddr)>, metrics: &DaemonMetrics) {
        self.states.retain(|k, _| live.contains(k));
        let direct: HashSet<IpNet> = self
            .states
            .iter()
            .filter(|(_, s)| s.path == Path::Direct)
            .map(|((subnet, _), _)| *subnet)
            .collect();
        self.direct.send_if_modified(|cur| {
            let changed = *cur != direct;
            if changed {
                *cur = direct;
            }
            changed
        });
        let mut gauges: Vec<PeerPathGauge> = self
            .states
            .iter()
            .map(|((subnet, ip), s)| PeerPathGauge {
                subnet: subnet.to_string(),
                public_ip: ip.to_string(),
                path: s.path.label(),
                switches: s.switches,
            })
            .collect();
        gauges.sort_by(|a, b| (&a.subnet, &a.public_ip).cmp(&(&b.subnet, &b.public_ip)));
        metrics.set_peer_paths(gauges);
    }
}

/// Probes every peer in `peers` every `interval` until the task is dropped, logging and
/// exporting reachability; with `fallback`, also drives `--host-gw-fallback`.
pub async fn run(
    interval: Duration,
    ctx: ProbeContext,
    mut peers: watch::Receiver<Vec<Peer>>,
    metrics: Arc<DaemonMetrics>,
    mut fallback: Option<Fallback>,
) {
    let mut health: HashMap<(IpNet, IpAddr), PeerHealth> = HashMap::new();
    let mut pinger: Option<Pinger> = None;
    let mut open_warned = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current: Vec<Peer> = peers.borrow_and_update().clone();
        let targets: Vec<(Peer, IpAddr)> = current
            .into_iter()
            .filter_map(|p| probe_target(&p).map(|t| (p, t)))
            .collect();
        let live: HashSet<(IpNet, IpAddr)> = targets
            .iter()
            .map(|(p, _)| (p.subnet, p.public_ip))
            .collect();
        health.retain(|k, _| live.contains(k));
        if targets.is_empty() {
            metrics.set_peer_health(Vec::new());
            if let Some(f) = fallback.as_mut() {
                f.finish(&live, &metrics);
            }
            continue;
        }
        let onlink = match fallback.as_mut() {
            Some(f) => {
                let vxlan: Vec<Peer> = targets.iter().map(|(p, _)| p.clone()).collect();
                f.onlink(&vxlan).await
            }
            None => HashSet::new(),
        };
        let mut addrs: Vec<IpAddr> = targets.iter().map(|(_, t)| *t).collect();
        // Peers on the fallback path: their public IP is probed too (does the direct path
        // work?), after the VTEPs.
        let direct_probe: Vec<Option<usize>> = targets
            .iter()
            .map(|(peer, _)| match &fallback {
                Some(f) if f.is_direct(peer) => {
                    addrs.push(peer.public_ip);
                    Some(addrs.len() - 1)
                }
                _ => None,
            })
            .collect();
        let mut p = match pinger.take().filter(|p| p.covers(&addrs)) {
            Some(p) => p,
            None => match Pinger::open_for(&addrs) {
                Ok(p) => p,
                Err(e) => {
                    if !open_warned {
                        warn!(error = %e, "cannot open a raw ICMP socket; peer probing disabled until it can");
                        open_warned = true;
                    }
                    continue;
                }
            },
        };
        let done = tokio::task::spawn_blocking(move || {
            let r = p.probe(&addrs, 1, PROBE_TIMEOUT);
            (p, r)
        })
        .await;
        let Ok((p, answered)) = done else {
            warn!("peer probe task failed");
            continue;
        };
        pinger = Some(p);
        let mut gauges = Vec::with_capacity(targets.len());
        for (i, (peer, target)) in targets.iter().enumerate() {
            let ok = answered.get(i).copied().unwrap_or(false);
            // Each family's plane routes its own fallback subnets (IPv6 via PublicIPv6).
            let switch = match fallback.as_mut() {
                Some(f) if peer.vtep().is_some() => {
                    let round = Round {
                        on_link: onlink.contains(&peer.public_ip),
                        vxlan_answered: ok,
                        direct_answered: direct_probe[i]
                            .map(|j| answered.get(j).copied().unwrap_or(false)),
                    };
                    f.observe(peer, *target, round, &ctx)
                }
                _ => None,
            };
            let h = health.entry((peer.subnet, peer.public_ip)).or_default();
            match h.record(ok) {
                // The fallback's line says it all.
                Some(Transition::Unreachable)
                    if matches!(switch, Some(Switch::FellBack { .. })) => {}
                Some(Transition::Unreachable) => warn!(
                    subnet = %peer.subnet, public_ip = %peer.public_ip, port = ctx.port,
                    "{}", unreachable_message(peer, *target, &ctx)
                ),
                Some(Transition::Recovered) => info!(
                    subnet = %peer.subnet, public_ip = %peer.public_ip,
                    "{} answers again", peer_label(peer, &ctx)
                ),
                None if !ok => debug!(subnet = %peer.subnet, %target, "peer probe unanswered"),
                None => {}
            }
            gauges.push(PeerGauge {
                subnet: peer.subnet.to_string(),
                public_ip: peer.public_ip.to_string(),
                reachable: h.reachable,
                failures_total: h.failures_total,
            });
        }
        metrics.set_peer_health(gauges);
        if let Some(f) = fallback.as_mut() {
            f.finish(&live, &metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: &str, backend: &str) -> Peer {
        let kind = match backend {
            "vxlan" => crate::backend::PeerKind::Vxlan {
                vtep_mac: crate::wire::MacAddr([2, 0, 0, 0, 0, 1]),
                vni: 1,
            },
            _ => crate::backend::PeerKind::HostGw,
        };
        Peer::checked_for_test(subnet, ip, kind)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn ctx(kube: bool) -> ProbeContext {
        ProbeContext {
            backend: "vxlan".into(),
            port: 8472,
            overwrite_annotation: kube.then(|| {
                (
                    "flannel.alpha.coreos.com/public-ip-overwrite".to_owned(),
                    "flannel.alpha.coreos.com/public-ipv6-overwrite".to_owned(),
                )
            }),
        }
    }

    #[test]
    fn targets_are_vtep_or_public_ip() {
        let v = peer("10.244.2.0/24", "198.51.100.7", "vxlan");
        assert_eq!(probe_target(&v), Some(ip("10.244.2.0")));
        let h = peer("10.244.3.0/24", "198.51.100.8", "host-gw");
        assert_eq!(probe_target(&h), Some(ip("198.51.100.8")));
        // IPv6 peers: the VTEP is the v6 subnet's network address (flannel-v6.<VNI>'s /128),
        // whichever family carries the VXLAN; host-gw probes the v6 public IP.
        let v6 = peer("2001:db8:42:7::/64", "2001:db8:18::7", "vxlan");
        assert_eq!(probe_target(&v6), Some(ip("2001:db8:42:7::")));
        let v6_over_v4 = peer("2001:db8:42:8::/64", "198.51.100.8", "vxlan");
        assert_eq!(probe_target(&v6_over_v4), Some(ip("2001:db8:42:8::")));
        let v6_host_gw = peer("2001:db8:42:9::/64", "2001:db8:18::9", "host-gw");
        assert_eq!(probe_target(&v6_host_gw), Some(ip("2001:db8:18::9")));
        // host-gw cannot route a v6 subnet via a v4 address (nor the reverse).
        assert_eq!(
            probe_target(&peer("2001:db8:42:9::/64", "198.51.100.9", "host-gw")),
            None
        );
        assert_eq!(
            probe_target(&peer("10.244.3.0/24", "2001:db8:18::9", "host-gw")),
            None
        );
    }

    #[test]
    fn private_and_cgnat() {
        for ip in [
            "10.200.200.7",
            "172.19.0.13",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.1",
        ] {
            assert!(is_private_or_cgnat(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["43.129.71.69", "198.51.100.7", "100.128.0.1", "172.32.0.1"] {
            assert!(!is_private_or_cgnat(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn three_failures_then_one_warning_then_recovery() {
        let mut h = PeerHealth::default();
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.reachable, None);
        assert_eq!(h.record(false), Some(Transition::Unreachable));
        assert_eq!(h.reachable, Some(false));
        // Only once while it stays down.
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), Some(Transition::Recovered));
        assert_eq!(h.failures_total, 4);
        assert_eq!(h.consecutive_failures, 0);
        // An answer first is not a recovery; two misses are not an outage.
        let mut h = PeerHealth::default();
        assert_eq!(h.record(true), None);
        assert_eq!(h.reachable, Some(true));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.reachable, Some(true));
    }

    #[test]
    fn messages_name_peer_and_fix() {
        let nat = peer("10.244.1.0/24", "172.19.0.13", "vxlan");
        let m = unreachable_message(&nat, ip("10.244.1.0"), &ctx(true));
        assert_eq!(
            m,
            "peer 10.244.1.0/24 at 172.19.0.13 (UDP 8472) does not answer: 3 ICMP echo requests to 10.244.1.0 in a row went unanswered; its public IP 172.19.0.13 is a private address, probably behind NAT: set flannel.alpha.coreos.com/public-ip-overwrite on that node to an address this node can reach, then restart flanneld there; check that UDP 8472 is allowed between the nodes, or move Backend.Port (nodes on one layer-2 network can use host-gw instead)"
        );
        let public = peer("10.244.2.0/24", "198.51.100.7", "vxlan");
        let m = unreachable_message(&public, ip("10.244.2.0"), &ctx(false));
        assert!(
            m.ends_with("went unanswered; check that UDP 8472 is allowed between the nodes, or move Backend.Port (nodes on one layer-2 network can use host-gw instead); if that node is behind NAT: start flanneld on that node with --public-ip set to an address this node can reach"),
            "{m}"
        );
        let fixes = unreachable_fixes(&public, &ctx(false));
        assert_eq!(
            fixes[1],
            "if that node is behind NAT: start flanneld on that node with --public-ip set to an address this node can reach"
        );
        let hg = ProbeContext {
            backend: "host-gw".into(),
            ..ctx(true)
        };
        let m = unreachable_message(
            &peer("10.244.3.0/24", "198.51.100.9", "host-gw"),
            ip("198.51.100.9"),
            &hg,
        );
        assert!(m.contains("(host-gw)") && m.contains("layer-2"), "{m}");
    }

    #[test]
    fn v6_peers_get_the_v6_fixes() {
        let mut v6 = peer("2001:db8:42:7::/64", "2001:db8:18::7", "vxlan");
        let m = unreachable_message(&v6, ip("2001:db8:42:7::"), &ctx(false));
        assert!(
            m.starts_with("peer 2001:db8:42:7::/64 at 2001:db8:18::7 (UDP 8472) does not answer: 3 ICMP echo requests to 2001:db8:42:7:: in a row"),
            "{m}"
        );
        assert!(m.ends_with("start flanneld on that node with --public-ipv6 set to an address this node can reach"), "{m}");
        v6.node = Some("worker-c".into());
        let fixes = unreachable_fixes(&v6, &ctx(true));
        assert!(
            fixes[1].contains(
                "kubectl annotate node worker-c flannel.alpha.coreos.com/public-ipv6-overwrite="
            ),
            "{fixes:?}"
        );
    }

    #[test]
    fn kube_peers_are_named_with_the_command_that_fixes_them() {
        let mut named = peer("10.244.1.0/24", "172.19.0.13", "vxlan");
        named.node = Some("worker-b".into());
        let m = unreachable_message(&named, ip("10.244.1.0"), &ctx(true));
        assert!(
            m.starts_with("peer worker-b (10.244.1.0/24 at 172.19.0.13, UDP 8472) does not answer"),
            "{m}"
        );
        assert!(
            m.contains("kubectl annotate node worker-b flannel.alpha.coreos.com/public-ip-overwrite=<an address this node can reach>, then restart flanneld there"),
            "{m}"
        );
    }
}
