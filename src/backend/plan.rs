//! Pure planner for the kernel backends: desired kernel state from (own config, peers), and
//! the ordered operations that turn the current state into it.
//!
//! * VXLAN (flannel's "1 route, 1 ARP entry and 1 FDB entry per host"), per peer:
//!   neighbour `<subnet network address>` → VTEP MAC on `flannel.<VNI>`, FDB VTEP MAC →
//!   `dst <public IP>`, route `<subnet> via <subnet network address> dev flannel.<VNI> onlink`.
//!   With DirectRouting and an on-link peer: only `<subnet> via <public IP>`. A peer on the
//!   `--host-gw-fallback` direct path keeps its neighbour and FDB entries, gets
//!   `<subnet> via <public IP>` and `<VTEP address>/32 via <VTEP address> dev flannel.<VNI>
//!   onlink` (IPv6: `<VTEP address>/128 dev flannel-v6.<VNI>`), so the probes of its VTEP
//!   still go over VXLAN.
//! * host-gw: route `<subnet> via <public IP> dev <iface>`.
//!
//! [`Plan::diff`] orders operations as flannel does: per peer neighbour, FDB, then route (the
//! kernel never has to ARP for the onlink gateway); then removals, routes first, then FDB
//! entries, then neighbours. It only touches entries an [`Ownership`] claims.
//!
//! A peer's VNI is not compared with ours, as upstream: every node of a cluster shares the
//! Backend configuration. Peers come checked from [`super::intake`], typed by
//! [`PeerKind`]: a planner takes the peers of its kind and has nothing left to check but the
//! conflicts between kernel entries that only it sees (one VTEP MAC, one FDB entry).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Peer, PeerKind};
use crate::wire::MacAddr;

/// `BackendType` of VXLAN leases.
pub const BACKEND_VXLAN: &str = "vxlan";
/// `BackendType` of host-gw leases.
pub const BACKEND_HOST_GW: &str = "host-gw";

/// A permanent neighbour (ARP/NDP) entry on the VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    /// Remote subnet's network address (the onlink gateway of its route).
    pub ip: IpAddr,
    /// Remote VTEP MAC.
    pub mac: MacAddr,
}

/// A permanent FDB entry on the VXLAN device: frames for `mac` go to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    /// Remote VTEP MAC.
    pub mac: MacAddr,
    /// Remote public (underlay) address.
    pub dst: IpAddr,
}

/// A main-table unicast route, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteEntry {
    /// Destination prefix.
    pub dst: IpNet,
    /// Gateway (`via`).
    pub via: Option<IpAddr>,
    /// Output device index; `None` in a desired route means "whatever the kernel resolves".
    pub dev: Option<u32>,
    /// `onlink` flag.
    pub onlink: bool,
    /// Metric as the kernel stores it (see [`default_metric`]).
    pub metric: u32,
}

impl RouteEntry {
    /// Whether this (current) route is exactly the desired route `want`.
    pub fn satisfies(&self, want: &RouteEntry) -> bool {
        self.dst == want.dst
            && self.via == want.via
            && self.onlink == want.onlink
            && self.metric == want.metric
            && (want.dev.is_none() || self.dev == want.dev)
    }

    /// The kernel's identity of a route in a table: destination and metric.
    pub fn key(&self) -> (IpNet, u32) {
        (self.dst, self.metric)
    }
}

impl fmt::Display for RouteEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if let Some(dev) = self.dev {
            write!(f, " dev ifindex {dev}")?;
        }
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// The metric a route gets when added without one: 0 for IPv4, 1024 for IPv6.
pub fn default_metric(dst: IpNet) -> u32 {
    match dst {
        IpNet::V4(_) => 0,
        IpNet::V6(_) => 1024,
    }
}

/// The kernel entries a backend manages, current (as read) or desired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Permanent neighbours on the VXLAN device: address → MAC.
    pub neighbours: BTreeMap<IpAddr, MacAddr>,
    /// Permanent `self` FDB entries on the VXLAN device: MAC → remotes, in kernel order
    /// (the first remote is the one `replace` rewrites).
    pub fdb: BTreeMap<MacAddr, Vec<IpAddr>>,
    /// Main-table unicast routes.
    pub routes: Vec<RouteEntry>,
}

/// Which current kernel entries a backend may change or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// Every route through this device is ours (the VXLAN device); `None` for host-gw.
    pub device: Option<u32>,
    /// Routes with a gateway to a prefix inside Network are ours (host-gw, DirectRouting,
    /// left-overs of another backend)…
    pub network: IpNet,
    /// …except routes to our own subnet, which belong to the local bridge.
    pub own_subnet: IpNet,
}

impl Ownership {
    /// Whether `route` (already known to be a user-installed main-table unicast route) is ours.
    pub fn owns_route(&self, route: &RouteEntry) -> bool {
        if self.device.is_some() && route.dev == self.device {
            return true;
        }
        route.via.is_some() && route.dst != self.own_subnet && contains_net(self.network, route.dst)
    }
}

fn contains_net(outer: IpNet, inner: IpNet) -> bool {
    outer.contains(&inner)
}

/// Why a peer is not programmed: a conflict between the kernel entries of two peers that
/// intake cannot see (their subnets, and so their neighbour addresses, never overlap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The VTEP MAC is already mapped to another public IP by another peer.
    MacConflict {
        /// The subnet of the peer that holds the MAC.
        holder: IpNet,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::MacConflict { holder } => {
                write!(
                    f,
                    "VtepMAC already used by subnet {holder} with another public IP"
                )
            }
        }
    }
}

/// A peer left out of the plan, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The peer as given.
    pub peer: Peer,
    /// Why.
    pub reason: SkipReason,
}

/// The entries one peer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPlan {
    /// The peer's subnet (network form).
    pub subnet: IpNet,
    /// Neighbour entry (VXLAN without DirectRouting).
    pub neigh: Option<Neigh>,
    /// FDB entry (VXLAN without DirectRouting).
    pub fdb: Option<Fdb>,
    /// The route.
    pub route: RouteEntry,
    /// `--host-gw-fallback` direct path: the host route (`/32`, `/128`) keeping the peer's
    /// VTEP address on the overlay device while `route` goes direct.
    pub vtep_route: Option<RouteEntry>,
}

impl PeerPlan {
    /// The peer's routes: `route`, then `vtep_route` if any.
    pub fn routes(&self) -> impl Iterator<Item = RouteEntry> {
        std::iter::once(self.route).chain(self.vtep_route)
    }
}

/// Desired state of one backend device, per peer, plus what was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per-peer entries, sorted by subnet.
    pub peers: Vec<PeerPlan>,
    /// Peers not programmed, sorted.
    pub skipped: Vec<Skipped>,
    /// Peers of the other address family (handled by the other device), not counted as skipped.
    pub other_family: usize,
    /// What the plan may change.
    pub ownership: Ownership,
}

/// Inputs of [`plan_vxlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanPlanConfig {
    /// Index of `flannel.<VNI>` / `flannel-v6.<VNI>`.
    pub ifindex: u32,
    /// Network (this family).
    pub network: IpNet,
    /// Our own lease subnet (this family).
    pub own_subnet: IpNet,
}

/// Inputs of [`plan_host_gw`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostGwPlanConfig {
    /// Index of the external interface.
    pub ifindex: u32,
    /// Network (this family).
    pub network: IpNet,
    /// Our own lease subnet (this family).
    pub own_subnet: IpNet,
}

/// VXLAN plan. `is_onlink(public_ip)` is the DirectRouting decision made outside (a route
/// lookup); pass `|_| false` when DirectRouting is off.
pub fn plan_vxlan(
    cfg: &VxlanPlanConfig,
    peers: &[Peer],
    is_onlink: impl Fn(IpAddr) -> bool,
) -> Plan {
    plan_vxlan_fallback(cfg, peers, is_onlink, |_| false)
}

/// [`plan_vxlan`] with `--host-gw-fallback`: a peer whose subnet `is_fallback` accepts (and
/// that DirectRouting does not already route directly) is routed via its public IP, its
/// neighbour, FDB entry and a host route (`/32`, `/128`) to its VTEP address staying on the
/// device.
pub fn plan_vxlan_fallback(
    cfg: &VxlanPlanConfig,
    peers: &[Peer],
    is_onlink: impl Fn(IpAddr) -> bool,
    is_fallback: impl Fn(IpNet) -> bool,
) -> Plan {
    let ownership = Ownership {
        device: Some(cfg.ifindex),
        network: cfg.network.trunc(),
        own_subnet: cfg.own_subnet.trunc(),
    };
    build(ownership, peers, |subnet, peer| {
        let (mac, _) = peer.vtep()?;
        let metric = default_metric(subnet);
        if is_onlink(peer.public_ip) {
            return Some(PeerPlan {
                subnet,
                neigh: None,
                fdb: None,
                route: RouteEntry {
                    dst: subnet,
                    via: Some(peer.public_ip),
                    dev: None,
                    onlink: false,
                    metric,
                },
                vtep_route: None,
            });
        }
        let gw = subnet.network();
        let overlay = |dst| RouteEntry {
            dst,
            via: Some(gw),
            dev: Some(cfg.ifindex),
            onlink: true,
            metric,
        };
        let (route, vtep_route) = match is_fallback(subnet) {
            true => (
                RouteEntry {
                    dst: subnet,
                    via: Some(peer.public_ip),
                    dev: None,
                    onlink: false,
                    metric,
                },
                Some(match gw {
                    IpAddr::V4(_) => overlay(host_net(gw)),
                    // The kernel refuses an IPv6 route via its own destination (EINVAL); the
                    // VTEP's permanent neighbour entry resolves it on the device instead.
                    IpAddr::V6(_) => RouteEntry {
                        via: None,
                        onlink: false,
                        ..overlay(host_net(gw))
                    },
                }),
            ),
            false => (overlay(subnet), None),
        };
        Some(PeerPlan {
            subnet,
            neigh: Some(Neigh { ip: gw, mac }),
            fdb: Some(Fdb {
                mac,
                dst: peer.public_ip,
            }),
            route,
            vtep_route,
        })
    })
}

/// host-gw plan: `<subnet> via <public IP> dev <iface>` per peer.
pub fn plan_host_gw(cfg: &HostGwPlanConfig, peers: &[Peer]) -> Plan {
    let ownership = Ownership {
        device: None,
        network: cfg.network.trunc(),
        own_subnet: cfg.own_subnet.trunc(),
    };
    build(ownership, peers, |subnet, peer| {
        (peer.kind == PeerKind::HostGw).then(|| route_via_public_ip(cfg, subnet, peer))
    })
}

/// DirectRouting without a kernel VXLAN device (userspace mode): host-gw's route for every
/// vxlan peer `is_onlink` accepts (same decision as kernel mode); other peers get no entry
/// here (they go through the TUN device) and their direct routes, if any, are removed.
pub fn plan_direct_routes(
    cfg: &HostGwPlanConfig,
    peers: &[Peer],
    is_onlink: impl Fn(IpAddr) -> bool,
) -> Plan {
    let ownership = Ownership {
        device: None,
        network: cfg.network.trunc(),
        own_subnet: cfg.own_subnet.trunc(),
    };
    build(ownership, peers, |subnet, peer| {
        (peer.vtep().is_some() && is_onlink(peer.public_ip))
            .then(|| route_via_public_ip(cfg, subnet, peer))
    })
}

/// `ip/32` (`ip/128`).
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn route_via_public_ip(cfg: &HostGwPlanConfig, subnet: IpNet, peer: &Peer) -> PeerPlan {
    PeerPlan {
        subnet,
        neigh: None,
        fdb: None,
        route: RouteEntry {
            dst: subnet,
            via: Some(peer.public_ip),
            dev: Some(cfg.ifindex),
            onlink: false,
            metric: default_metric(subnet),
        },
        vtep_route: None,
    }
}

fn same_family(a: IpNet, b: IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// Shared skeleton: sort, take the entries of each peer `entries` plans (`None`: not this
/// plan's kind, left out as flannel's backends ignore other lease types), resolve the one
/// conflict the planner alone can see, a VTEP MAC claimed with two public IPs (first in
/// subnet order wins). Intake already refused overlapping subnets (so subnets and neighbour
/// addresses are unique) and other backend types.
fn build(
    ownership: Ownership,
    peers: &[Peer],
    entries: impl Fn(IpNet, &Peer) -> Option<PeerPlan>,
) -> Plan {
    let mut other_family = 0;
    let mut skipped = Vec::new();
    // Sorted and deduplicated first, so any order of the same peers gives the same plan.
    let mut all: Vec<(IpNet, &Peer)> = peers.iter().map(|p| (p.subnet.trunc(), p)).collect();
    all.sort();
    all.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    let mut out: Vec<PeerPlan> = Vec::new();
    let mut mac_holder: BTreeMap<MacAddr, (IpAddr, IpNet)> = BTreeMap::new();
    for (subnet, peer) in all {
        if !same_family(subnet, ownership.network) {
            other_family += 1;
            continue;
        }
        let skip = |reason| Skipped {
            peer: peer.clone(),
            reason,
        };
        let Some(plan) = entries(subnet, peer) else {
            continue;
        };
        if let Some(f) = plan.fdb {
            if let Some((dst, holder)) = mac_holder.get(&f.mac) {
                if *dst != f.dst {
                    skipped.push(skip(SkipReason::MacConflict { holder: *holder }));
                    continue;
                }
            }
        }
        if let Some(f) = plan.fdb {
            mac_holder.entry(f.mac).or_insert((f.dst, subnet));
        }
        out.push(plan);
    }
    skipped.sort_by(|a, b| {
        a.peer
            .cmp(&b.peer)
            .then_with(|| a.reason.to_string().cmp(&b.reason.to_string()))
    });
    Plan {
        peers: out,
        skipped,
        other_family,
        ownership,
    }
}

/// One kernel change. Additions name the peer subnet they serve so that a failure can skip
/// the rest of that peer's additions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `ip neigh replace <ip> lladdr <mac> dev <vxlan> nud permanent`.
    NeighReplace {
        /// Peer subnet served.
        peer: IpNet,
        /// Entry.
        neigh: Neigh,
    },
    /// `bridge fdb replace <mac> dev <vxlan> dst <dst> self permanent`.
    FdbReplace {
        /// Peer subnet served.
        peer: IpNet,
        /// Entry.
        fdb: Fdb,
    },
    /// `ip route replace <route>`.
    RouteReplace {
        /// Peer subnet served.
        peer: IpNet,
        /// Route.
        route: RouteEntry,
    },
    /// `ip route del <route>` of one of several routes sharing the key of a route the peer
    /// needs (a `replace` would overwrite only one of them); precedes its `RouteReplace`.
    RouteClear {
        /// Peer subnet served.
        peer: IpNet,
        /// Route.
        route: RouteEntry,
    },
    /// `ip route del <route>`.
    RouteDel {
        /// Route.
        route: RouteEntry,
    },
    /// `bridge fdb del <mac> dev <vxlan> dst <dst> self`.
    FdbDel {
        /// Entry.
        fdb: Fdb,
    },
    /// `ip neigh del <ip> dev <vxlan>`.
    NeighDel {
        /// Entry.
        neigh: Neigh,
    },
}

impl Op {
    /// The peer subnet an addition serves; `None` for removals.
    pub fn peer(&self) -> Option<IpNet> {
        match self {
            Op::NeighReplace { peer, .. }
            | Op::FdbReplace { peer, .. }
            | Op::RouteReplace { peer, .. }
            | Op::RouteClear { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// True for removals.
    pub fn is_removal(&self) -> bool {
        self.peer().is_none()
    }

    /// The iproute2 command. Neighbour and FDB operations act on `device` (the VXLAN device);
    /// `dev_name` names device indexes.
    pub fn describe(&self, device: u32, dev_name: impl Fn(u32) -> String) -> String {
        let route = |r: &RouteEntry| {
            let mut s = r.dst.to_string();
            if let Some(via) = r.via {
                s.push_str(&format!(" via {via}"));
            }
            if let Some(dev) = r.dev {
                s.push_str(&format!(" dev {}", dev_name(dev)));
            }
            if r.metric != 0 && r.metric != default_metric(r.dst) {
                s.push_str(&format!(" metric {}", r.metric));
            }
            if r.onlink {
                s.push_str(" onlink");
            }
            s
        };
        let dev = dev_name(device);
        match self {
            Op::NeighReplace { neigh, .. } => format!(
                "ip neigh replace {} lladdr {} dev {dev} nud permanent",
                neigh.ip, neigh.mac
            ),
            Op::FdbReplace { fdb, .. } => format!(
                "bridge fdb replace {} dev {dev} dst {} self permanent",
                fdb.mac, fdb.dst
            ),
            Op::RouteReplace { route: r, .. } => format!("ip route replace {}", route(r)),
            Op::RouteDel { route: r } | Op::RouteClear { route: r, .. } => {
                format!("ip route del {}", route(r))
            }
            Op::FdbDel { fdb } => {
                format!("bridge fdb del {} dev {dev} dst {} self", fdb.mac, fdb.dst)
            }
            Op::NeighDel { neigh } => format!("ip neigh del {} dev {dev}", neigh.ip),
        }
    }
}

impl Plan {
    /// The state the plan wants (for comparisons and tests).
    pub fn desired_state(&self) -> KernelState {
        let mut s = KernelState::default();
        for p in &self.peers {
            if let Some(n) = p.neigh {
                s.neighbours.insert(n.ip, n.mac);
            }
            if let Some(f) = p.fdb {
                s.fdb.entry(f.mac).or_insert_with(|| vec![f.dst]);
            }
            s.routes.extend(p.routes());
        }
        s
    }

    /// Ordered operations turning `current` into the plan. `current` holds what the caller
    /// read from the kernel: permanent neighbours and `self` FDB entries of the VXLAN device,
    /// and user-installed main-table unicast routes; routes the [`Ownership`] does not claim
    /// are left alone.
    pub fn diff(&self, current: &KernelState) -> Vec<Op> {
        let owned: Vec<&RouteEntry> = current
            .routes
            .iter()
            .filter(|r| self.ownership.owns_route(r))
            .collect();
        let mut ops = Vec::new();

        // Additions, per peer: neighbour, FDB, route.
        let mut fdb_seen: BTreeSet<MacAddr> = BTreeSet::new();
        let mut replaced_keys: BTreeSet<(IpNet, u32)> = BTreeSet::new();
        let mut cleared_first: Vec<&RouteEntry> = Vec::new();
        for p in &self.peers {
            if let Some(n) = p.neigh {
                if current.neighbours.get(&n.ip) != Some(&n.mac) {
                    ops.push(Op::NeighReplace {
                        peer: p.subnet,
                        neigh: n,
                    });
                }
            }
            if let Some(f) = p.fdb {
                if fdb_seen.insert(f.mac) {
                    let has = current.fdb.get(&f.mac).is_some_and(|v| v.contains(&f.dst));
                    if !has {
                        ops.push(Op::FdbReplace {
                            peer: p.subnet,
                            fdb: f,
                        });
                    }
                }
            }
            for want in p.routes() {
                if owned.iter().any(|r| r.satisfies(&want)) {
                    continue;
                }
                // Several routes with the same kernel key: `replace` would overwrite only one
                // of them, unpredictably, so remove them all first.
                let same_key: Vec<&RouteEntry> = current
                    .routes
                    .iter()
                    .filter(|r| r.key() == want.key())
                    .collect();
                if same_key.len() > 1 {
                    for r in same_key {
                        ops.push(Op::RouteClear {
                            peer: p.subnet,
                            route: *r,
                        });
                        cleared_first.push(r);
                    }
                }
                replaced_keys.insert(want.key());
                ops.push(Op::RouteReplace {
                    peer: p.subnet,
                    route: want,
                });
            }
        }

        // Removals: routes, then FDB entries, then neighbours.
        let desired = self.desired_state();
        for r in &owned {
            if cleared_first.contains(r) {
                continue;
            }
            if desired.routes.iter().any(|d| r.satisfies(d)) {
                continue;
            }
            if replaced_keys.contains(&r.key()) {
                // Overwritten in place by the replace above.
                continue;
            }
            ops.push(Op::RouteDel { route: **r });
        }
        for (mac, dsts) in &current.fdb {
            let keep: Option<IpAddr> = match desired.fdb.get(mac).and_then(|v| v.first()) {
                None => None,
                Some(d) if dsts.contains(d) => Some(*d),
                // `replace` rewrites the first remote to the desired one.
                Some(_) => dsts.first().copied(),
            };
            for dst in dsts {
                if Some(*dst) != keep {
                    ops.push(Op::FdbDel {
                        fdb: Fdb {
                            mac: *mac,
                            dst: *dst,
                        },
                    });
                }
            }
        }
        for (ip, mac) in &current.neighbours {
            if !desired.neighbours.contains_key(ip) {
                ops.push(Op::NeighDel {
                    neigh: Neigh { ip: *ip, mac: *mac },
                });
            }
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, last])
    }

    fn peer(subnet: &str, ip: &str, kind: PeerKind) -> Peer {
        Peer {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            kind,
            node: None,
            checked: crate::backend::Checked,
        }
    }

    fn vx_peer(subnet: &str, ip: &str, m: u8) -> Peer {
        let kind = PeerKind::Vxlan {
            vtep_mac: mac(m),
            vni: 1,
        };
        peer(subnet, ip, kind)
    }

    fn hg_cfg(ifindex: u32) -> HostGwPlanConfig {
        HostGwPlanConfig {
            ifindex,
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
        }
    }

    /// The iproute2 commands of `ops` (VXLAN device index 10; device `n` named `if<n>`).
    fn describe(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|o| o.describe(10, |i| format!("if{i}")))
            .collect()
    }

    /// `dst via <via> dev <dev>`, metric 0.
    fn route(dst: &str, via: &str, dev: u32, onlink: bool) -> RouteEntry {
        RouteEntry {
            dst: dst.parse().unwrap(),
            via: Some(via.parse().unwrap()),
            dev: Some(dev),
            onlink,
            metric: 0,
        }
    }

    fn vx_cfg() -> VxlanPlanConfig {
        VxlanPlanConfig {
            ifindex: 10,
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
        }
    }

    /// The kernel's semantics of each operation, as far as the planner relies on them.
    fn apply(state: &mut KernelState, op: &Op) {
        match op {
            Op::NeighReplace { neigh, .. } => {
                state.neighbours.insert(neigh.ip, neigh.mac);
            }
            Op::NeighDel { neigh } => {
                state.neighbours.remove(&neigh.ip);
            }
            Op::FdbReplace { fdb, .. } => {
                let v = state.fdb.entry(fdb.mac).or_default();
                if !v.contains(&fdb.dst) {
                    match v.first_mut() {
                        Some(first) => *first = fdb.dst,
                        None => v.push(fdb.dst),
                    }
                }
            }
            Op::FdbDel { fdb } => {
                if let Some(v) = state.fdb.get_mut(&fdb.mac) {
                    v.retain(|d| *d != fdb.dst);
                    if v.is_empty() {
                        state.fdb.remove(&fdb.mac);
                    }
                }
            }
            Op::RouteReplace { route, .. } => {
                // The kernel resolves an unspecified device; model it as device 99.
                let mut stored = *route;
                if stored.dev.is_none() {
                    stored.dev = Some(99);
                }
                match state.routes.iter_mut().find(|r| r.key() == route.key()) {
                    Some(r) => *r = stored,
                    None => state.routes.push(stored),
                }
            }
            Op::RouteDel { route } | Op::RouteClear { route, .. } => {
                if let Some(i) = state.routes.iter().position(|r| {
                    r.key() == route.key()
                        && (route.via.is_none() || r.via == route.via)
                        && (route.dev.is_none() || r.dev == route.dev)
                }) {
                    state.routes.remove(i);
                }
            }
        }
    }

    fn apply_all(state: &KernelState, ops: &[Op]) -> KernelState {
        let mut s = state.clone();
        for op in ops {
            apply(&mut s, op);
        }
        s
    }

    /// The current state matches the plan on everything the plan owns.
    fn matches_plan(state: &KernelState, plan: &Plan) -> bool {
        let desired = plan.desired_state();
        if state.neighbours != desired.neighbours || state.fdb != desired.fdb {
            return false;
        }
        let owned: Vec<&RouteEntry> = state
            .routes
            .iter()
            .filter(|r| plan.ownership.owns_route(r))
            .collect();
        owned.len() == desired.routes.len()
            && desired
                .routes
                .iter()
                .all(|d| owned.iter().filter(|r| r.satisfies(d)).count() == 1)
    }

    #[test]
    fn vxlan_triplet_per_peer() {
        let peers = vec![vx_peer("10.244.2.0/24", "198.18.0.2", 2)];
        let plan = plan_vxlan(&vx_cfg(), &peers, |_| false);
        assert!(plan.skipped.is_empty());
        assert_eq!(
            describe(&plan.diff(&KernelState::default())),
            vec![
                "ip neigh replace 10.244.2.0 lladdr 02:00:00:00:00:02 dev if10 nud permanent",
                "bridge fdb replace 02:00:00:00:00:02 dev if10 dst 198.18.0.2 self permanent",
                "ip route replace 10.244.2.0/24 via 10.244.2.0 dev if10 onlink",
            ]
        );
    }

    #[test]
    fn userspace_direct_routes_only_for_onlink_vxlan_peers() {
        let cfg = hg_cfg(3);
        let hg = peer("10.244.4.0/24", "198.18.0.4", PeerKind::HostGw);
        let peers = vec![
            vx_peer("10.244.2.0/24", "198.18.0.2", 2),
            vx_peer("10.244.3.0/24", "203.0.113.3", 3),
            hg,
        ];
        let onlink = |ip: IpAddr| ip.to_string().starts_with("198.18.");
        let plan = plan_direct_routes(&cfg, &peers, onlink);
        let routes: Vec<String> = plan.peers.iter().map(|p| p.route.to_string()).collect();
        assert_eq!(routes, ["10.244.2.0/24 via 198.18.0.2 dev ifindex 3"]);
        assert!(plan
            .peers
            .iter()
            .all(|p| p.neigh.is_none() && p.fdb.is_none()));
        // A direct route of a peer that is no longer on-link is ours to remove.
        let stale = route("10.244.3.0/24", "203.0.113.3", 3, false);
        let ops = plan_direct_routes(&cfg, &peers, |_| false).diff(&KernelState {
            routes: vec![stale],
            ..Default::default()
        });
        assert_eq!(ops, vec![Op::RouteDel { route: stale }]);
    }

    #[test]
    fn direct_routing_only_route() {
        let peers = vec![
            vx_peer("10.244.2.0/24", "198.18.0.2", 2),
            vx_peer("10.244.3.0/24", "203.0.113.3", 3),
        ];
        let onlink: IpAddr = "198.18.0.2".parse().unwrap();
        let plan = plan_vxlan(&vx_cfg(), &peers, |ip| ip == onlink);
        assert_eq!(
            describe(&plan.diff(&KernelState::default())),
            vec![
                "ip route replace 10.244.2.0/24 via 198.18.0.2",
                "ip neigh replace 10.244.3.0 lladdr 02:00:00:00:00:03 dev if10 nud permanent",
                "bridge fdb replace 02:00:00:00:00:03 dev if10 dst 203.0.113.3 self permanent",
                "ip route replace 10.244.3.0/24 via 10.244.3.0 dev if10 onlink",
            ]
        );
    }

    #[test]
    fn fallback_routes_direct_and_keeps_the_vtep_on_the_device() {
        let peers = vec![
            vx_peer("10.244.2.0/24", "198.18.0.2", 2),
            vx_peer("10.244.3.0/24", "198.18.0.3", 3),
        ];
        let fallback: IpNet = "10.244.2.0/24".parse().unwrap();
        let plan = plan_vxlan_fallback(&vx_cfg(), &peers, |_| false, |s| s == fallback);
        assert_eq!(
            describe(&plan.diff(&KernelState::default())),
            vec![
                "ip neigh replace 10.244.2.0 lladdr 02:00:00:00:00:02 dev if10 nud permanent",
                "bridge fdb replace 02:00:00:00:00:02 dev if10 dst 198.18.0.2 self permanent",
                "ip route replace 10.244.2.0/24 via 198.18.0.2",
                "ip route replace 10.244.2.0/32 via 10.244.2.0 dev if10 onlink",
                "ip neigh replace 10.244.3.0 lladdr 02:00:00:00:00:03 dev if10 nud permanent",
                "bridge fdb replace 02:00:00:00:00:03 dev if10 dst 198.18.0.3 self permanent",
                "ip route replace 10.244.3.0/24 via 10.244.3.0 dev if10 onlink",
            ]
        );
        // Applied, then back on VXLAN: the overlay route replaces the direct one in place and
        // the /32 goes; neighbour and FDB entries stay untouched.
        let applied = plan.desired_state();
        assert!(plan.diff(&applied).is_empty());
        let back = plan_vxlan(&vx_cfg(), &peers, |_| false);
        assert_eq!(
            describe(&back.diff(&applied)),
            vec![
                "ip route replace 10.244.2.0/24 via 10.244.2.0 dev if10 onlink",
                "ip route del 10.244.2.0/32 via 10.244.2.0 dev if10 onlink",
            ]
        );
        // DirectRouting wins for an on-link peer: no /32, no neighbour.
        let dr = plan_vxlan_fallback(&vx_cfg(), &peers, |_| true, |s| s == fallback);
        assert!(dr
            .peers
            .iter()
            .all(|p| p.vtep_route.is_none() && p.neigh.is_none()));
    }

    #[test]
    fn ipv6_fallback_keeps_the_vtep_on_the_device_without_a_gateway() {
        let cfg = VxlanPlanConfig {
            ifindex: 11,
            network: "2001:db8:42::/56".parse().unwrap(),
            own_subnet: "2001:db8:42:1::/64".parse().unwrap(),
        };
        let peers = vec![vx_peer("2001:db8:42:2::/64", "2001:db8:18::2", 2)];
        let fallback: IpNet = "2001:db8:42:2::/64".parse().unwrap();
        let plan = plan_vxlan_fallback(&cfg, &peers, |_| false, |s| s == fallback);
        let routes: Vec<String> = plan.peers[0].routes().map(|r| r.to_string()).collect();
        // The kernel refuses `2001:db8:42:2::/128 via 2001:db8:42:2:: ... onlink` (EINVAL).
        assert_eq!(
            routes,
            [
                "2001:db8:42:2::/64 via 2001:db8:18::2 metric 1024",
                "2001:db8:42:2::/128 dev ifindex 11 metric 1024"
            ]
        );
        assert!(plan.peers[0].neigh.is_some() && plan.peers[0].fdb.is_some());
    }

    #[test]
    fn host_gw_routes_and_skips() {
        let cfg = hg_cfg(3);
        let hg = peer("10.244.2.0/24", "198.18.0.2", PeerKind::HostGw);
        // Intake hands a host-gw node no vxlan peer; one would be left out, not skipped.
        let vx = vx_peer("10.244.3.0/24", "198.18.0.3", 3);
        let v6 = peer("fd42::/64", "2001:db8::3", PeerKind::HostGw);
        let plan = plan_host_gw(&cfg, &[hg, vx, v6]);
        assert_eq!(plan.other_family, 1);
        assert!(plan.skipped.is_empty());
        assert_eq!(
            describe(&plan.diff(&KernelState::default())),
            vec!["ip route replace 10.244.2.0/24 via 198.18.0.2 dev if3"]
        );
    }

    #[test]
    fn conflicts_are_skipped_deterministically() {
        let peers = vec![
            vx_peer("10.244.2.0/24", "198.18.0.2", 2),
            vx_peer("10.244.4.0/24", "198.18.0.4", 2), // MAC 2 with another IP
            vx_peer("10.244.5.0/24", "198.18.0.2", 2), // MAC 2, same IP: one FDB entry
        ];
        let plan = plan_vxlan(&vx_cfg(), &peers, |_| false);
        assert_eq!(plan.peers.len(), 2);
        let reasons: Vec<String> = plan.skipped.iter().map(|s| s.reason.to_string()).collect();
        assert_eq!(
            reasons,
            ["VtepMAC already used by subnet 10.244.2.0/24 with another public IP"]
        );
        assert_eq!(plan.skipped[0].peer, peers[1]);
        let mut rev = peers.clone();
        rev.reverse();
        assert_eq!(plan_vxlan(&vx_cfg(), &rev, |_| false), plan);
    }

    #[test]
    fn removal_order_and_ownership() {
        let plan = plan_vxlan(&vx_cfg(), &[], |_| false);
        let mut current = KernelState::default();
        current
            .neighbours
            .insert("10.244.9.0".parse().unwrap(), mac(9));
        current
            .fdb
            .insert(mac(9), vec!["198.18.0.9".parse().unwrap()]);
        let stale = route("10.244.9.0/24", "10.244.9.0", 10, true);
        // Not ours: connected route of the bridge, a route outside Network on another device.
        let bridge = route("10.244.1.0/24", "10.244.1.1", 4, false);
        let other = route("192.168.77.0/24", "198.18.0.254", 2, false);
        current.routes = vec![stale, bridge, other];
        assert_eq!(
            describe(&plan.diff(&current)),
            vec![
                "ip route del 10.244.9.0/24 via 10.244.9.0 dev if10 onlink",
                "bridge fdb del 02:00:00:00:00:09 dev if10 dst 198.18.0.9 self",
                "ip neigh del 10.244.9.0 dev if10",
            ]
        );
    }

    #[test]
    fn mac_change_replaces_without_gap() {
        let peers = vec![vx_peer("10.244.2.0/24", "198.18.0.2", 7)];
        let plan = plan_vxlan(&vx_cfg(), &peers, |_| false);
        let old = plan_vxlan(
            &vx_cfg(),
            &[vx_peer("10.244.2.0/24", "198.18.0.2", 2)],
            |_| false,
        );
        let current = apply_all(&KernelState::default(), &old.diff(&KernelState::default()));
        let ops = plan.diff(&current);
        assert!(matches!(ops[0], Op::NeighReplace { .. }));
        assert!(matches!(ops[1], Op::FdbReplace { .. }));
        assert!(matches!(ops[2], Op::FdbDel { .. }));
        assert_eq!(ops.len(), 3);
        assert!(matches_plan(&apply_all(&current, &ops), &plan));
    }

    #[test]
    fn multi_remote_fdb_and_duplicate_routes_converge() {
        let plan = plan_vxlan(
            &vx_cfg(),
            &[vx_peer("10.244.2.0/24", "198.18.0.2", 2)],
            |_| false,
        );
        let mut current = KernelState::default();
        current.fdb.insert(
            mac(2),
            vec!["198.18.0.7".parse().unwrap(), "198.18.0.8".parse().unwrap()],
        );
        let r = |via: &str| route("10.244.2.0/24", via, 10, true);
        current.routes = vec![r("10.244.2.7"), r("10.244.2.8")];
        let ops = plan.diff(&current);
        let after = apply_all(&current, &ops);
        assert!(matches_plan(&after, &plan), "{ops:?} -> {after:?}");
        assert!(plan.diff(&after).is_empty());
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        (
            0u8..24,
            prop_oneof![Just(24u8), Just(25u8)],
            0u8..16,
            0u8..12,
            proptest::bool::weighted(0.8),
            proptest::bool::weighted(0.1),
        )
            .prop_map(|(third, len, host, m, vxlan, v6)| {
                // Intake never hands over our own subnet (10.244.1.0/24).
                let third = if third == 1 { 24 } else { third };
                let kind = match vxlan {
                    true => PeerKind::Vxlan {
                        vtep_mac: MacAddr([2, 0, 0, 0, 0, m]),
                        vni: 1,
                    },
                    false => PeerKind::HostGw,
                };
                let (subnet, ip) = match v6 {
                    true => (
                        format!("fd42:0:0:{third}::/64"),
                        format!("2001:db8::{host}"),
                    ),
                    false => (
                        format!("10.244.{third}.0/{len}"),
                        format!("198.18.0.{host}"),
                    ),
                };
                peer(&subnet, &ip, kind)
            })
    }

    /// Peers as intake hands them over: no two overlap (a repeated peer stays, as the
    /// planners deduplicate).
    fn arb_peers() -> impl Strategy<Value = Vec<Peer>> {
        proptest::collection::vec(arb_peer(), 0..12).prop_map(|all| {
            let mut kept: Vec<Peer> = Vec::new();
            for p in all {
                let clash =
                    |q: &Peer| q != &p && super::super::intake::overlaps(q.subnet, p.subnet);
                if !kept.iter().any(clash) {
                    kept.push(p);
                }
            }
            kept
        })
    }

    fn arb_route() -> impl Strategy<Value = RouteEntry> {
        (
            0u8..30,
            0u8..16,
            prop_oneof![Just(2u32), Just(10u32)],
            any::<bool>(),
            prop_oneof![Just(0u32), Just(100u32)],
        )
            .prop_map(|(third, gw, dev, onlink, metric)| RouteEntry {
                dst: format!("10.244.{third}.0/24").parse().unwrap(),
                via: Some(format!("198.18.0.{gw}").parse().unwrap()),
                dev: Some(dev),
                onlink,
                metric,
            })
    }

    fn arb_current() -> impl Strategy<Value = KernelState> {
        (
            proptest::collection::btree_map(0u8..30, 0u8..12, 0..8),
            proptest::collection::btree_map(
                0u8..12,
                proptest::collection::vec(0u8..16, 1..3),
                0..6,
            ),
            proptest::collection::vec(arb_route(), 0..8),
        )
            .prop_map(|(neigh, fdb, routes)| {
                let mut s = KernelState::default();
                for (third, m) in neigh {
                    s.neighbours.insert(
                        format!("10.244.{third}.0").parse().unwrap(),
                        MacAddr([2, 0, 0, 0, 0, m]),
                    );
                }
                for (m, dsts) in fdb {
                    let mut v: Vec<IpAddr> = Vec::new();
                    for d in dsts {
                        let ip: IpAddr = format!("198.18.0.{d}").parse().unwrap();
                        if !v.contains(&ip) {
                            v.push(ip);
                        }
                    }
                    s.fdb.insert(MacAddr([2, 0, 0, 0, 0, m]), v);
                }
                // One route per kernel key, as a table holds without `append`.
                let mut seen = BTreeSet::new();
                s.routes = routes
                    .into_iter()
                    .filter(|r| seen.insert(r.key()))
                    .collect();
                s
            })
    }

    proptest! {
        #[test]
        fn any_order_same_plan(mut peers in arb_peers(), seed in any::<u64>(), onlink_mask in any::<u16>()) {
            let onlink = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => onlink_mask & (1 << (v4.octets()[3] % 16)) != 0,
                IpAddr::V6(_) => false,
            };
            let a = plan_vxlan(&vx_cfg(), &peers, onlink);
            // A deterministic shuffle driven by the seed.
            let n = peers.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                peers.swap(i, (s >> 33) as usize % (i + 1));
            }
            let b = plan_vxlan(&vx_cfg(), &peers, onlink);
            prop_assert_eq!(&a, &b);
            let host_gw = distinct(&peers).into_iter().filter(|p| p.kind == PeerKind::HostGw && p.subnet.addr().is_ipv4()).count();
            prop_assert_eq!(a.peers.len() + a.skipped.len() + a.other_family + host_gw, n - dup_count(&peers));
        }

        #[test]
        fn diff_converges(peers in arb_peers(), current in arb_current(), onlink_mask in any::<u16>(), host_gw in proptest::bool::weighted(0.2)) {
            let onlink = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => onlink_mask & (1 << (v4.octets()[3] % 16)) != 0,
                IpAddr::V6(_) => false,
            };
            let plan = if host_gw {
                plan_host_gw(&hg_cfg(2), &peers)
            } else {
                plan_vxlan(&vx_cfg(), &peers, onlink)
            };
            let mut current = current;
            if host_gw {
                current.neighbours.clear();
                current.fdb.clear();
            }
            let ops = plan.diff(&current);
            let after = apply_all(&current, &ops);
            prop_assert!(matches_plan(&after, &plan), "ops {:?}\nafter {:?}", ops, after);
            let again = plan.diff(&after);
            prop_assert!(again.is_empty(), "second diff {:?}", again);
            // Routes the plan does not own are untouched.
            let foreign_before: Vec<_> = current.routes.iter().filter(|r| !plan.ownership.owns_route(r)).collect();
            let foreign_after: Vec<_> = after.routes.iter().filter(|r| !plan.ownership.owns_route(r)).collect();
            prop_assert_eq!(foreign_before, foreign_after);
            // Additions come before removals, and each peer's additions are in triplet order.
            let first_removal = ops.iter().position(Op::is_removal).unwrap_or(ops.len());
            let last_add = ops.iter().rposition(|o| !o.is_removal()).map_or(0, |i| i + 1);
            prop_assert!(first_removal >= last_add, "removal before addition: {:?}", ops);
        }
    }

    /// The peers as a plan sees them: once each.
    fn distinct(peers: &[Peer]) -> Vec<&Peer> {
        let mut v: Vec<(IpNet, &Peer)> = peers.iter().map(|p| (p.subnet.trunc(), p)).collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        v.into_iter().map(|(_, p)| p).collect()
    }

    fn dup_count(peers: &[Peer]) -> usize {
        peers.len() - distinct(peers).len()
    }
}
