//! `--host-gw-fallback` in the userspace data plane: `<subnet> via <public IP> dev <iface>`
//! for the peers on the direct path (the DirectRouting reconciler, told only about them) and
//! `<VTEP address>/32 dev <tun>` (`/128` for IPv6) so that the probes of their VTEP still go over VXLAN. The
//! peers stay in the TUN device's peer table. Kernel mode does the same in its plan
//! ([`crate::backend::plan::plan_vxlan_fallback`]).

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::warn;

use crate::backend::hostgw::HostGw;
use crate::backend::plan::host_net;
use crate::backend::Peer;
use crate::netlink::{IpFamily, Route, RouteScope};

/// The direct routes of the peers on the fallback path.
#[derive(Debug)]
pub(super) struct FallbackRoutes {
    routes: HostGw,
    device: String,
    network: IpNet,
    subnets: HashSet<IpNet>,
}

impl FallbackRoutes {
    /// `routes`: a reconciler made by [`HostGw::setup_direct`] on the external interface;
    /// `device`: the TUN device.
    pub(super) fn new(routes: HostGw, device: String, network: IpNet) -> FallbackRoutes {
        FallbackRoutes {
            routes,
            device,
            network,
            subnets: HashSet::new(),
        }
    }

    /// The subnets the next sync routes directly.
    pub(super) fn set(&mut self, subnets: HashSet<IpNet>) {
        self.subnets = subnets;
    }

    /// Brings the routes in line with the fallback set (stale ones removed). `Err` names what
    /// failed; the next sync retries.
    pub(super) async fn sync(&mut self, peers: &[Peer]) -> Result<(), String> {
        let direct: Vec<Peer> = peers
            .iter()
            .filter(|p| self.subnets.contains(&p.subnet))
            .cloned()
            .collect();
        let onlink: HashSet<IpAddr> = direct.iter().map(|p| p.public_ip).collect();
        let report = self.routes.sync_direct(&direct, &onlink).await;
        let mut errors = Vec::new();
        if let Some(f) = report.failures.first() {
            errors.push(format!("{}: {}", f.op, f.error));
        }
        let vteps: BTreeSet<IpNet> = direct
            .iter()
            .filter(|p| IpFamily::of_net(p.subnet) == IpFamily::of_net(self.network))
            .map(|p| host_net(p.subnet.network()))
            .collect();
        if let Err(e) = self.sync_vtep_routes(&vteps).await {
            errors.push(e);
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(format!("host-gw fallback: {}", errors.join("; "))),
        }
    }

    /// Host routes (`/32`, `/128`) on the TUN device: exactly `vteps` (inside Network).
    async fn sync_vtep_routes(&self, vteps: &BTreeSet<IpNet>) -> Result<(), String> {
        let nl = self.routes.netlink();
        let index = nl
            .link_by_name(&self.device)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("device {} does not exist", self.device))?
            .index;
        let current = crate::backend::apply::read_routes(nl, IpFamily::of_net(self.network))
            .await
            .map_err(|e| e.to_string())?;
        let present: BTreeSet<IpNet> = current
            .iter()
            .filter(|r| r.dev == Some(index) && r.via.is_none())
            .filter(|r| r.dst.prefix_len() == r.dst.max_prefix_len())
            .filter(|r| self.network.contains(&r.dst))
            .map(|r| r.dst)
            .collect();
        let route = |dst: IpNet| {
            let mut r = Route::via(dst, dst.addr()).dev(index);
            r.gateway = None;
            r.scope = RouteScope::Link;
            r
        };
        let mut first_error = None;
        for dst in vteps.difference(&present) {
            if let Err(e) = nl.route_replace(&route(*dst)).await {
                first_error
                    .get_or_insert(format!("ip route replace {dst} dev {}: {e}", self.device));
            }
        }
        for dst in present.difference(vteps) {
            if let Err(e) = nl.route_del(&route(*dst)).await {
                warn!(route = %dst, error = %e, "could not remove a host-gw fallback VTEP route");
                first_error.get_or_insert(format!("ip route del {dst} dev {}: {e}", self.device));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::hostgw::HostGwConfig;
    use crate::backend::PeerKind;
    use crate::wire::MacAddr;

    /// The IPv6 plane's fallback routes in a namespace: an IPv6 peer on the direct path gets
    /// `<subnet> via <its PublicIPv6> dev <underlay>` and `<VTEP address>/128` on the overlay
    /// device; leaving the path removes both.
    #[test]
    fn ipv6_peer_on_the_direct_path_and_back() {
        if !netns_harness::privileged_test_guard("ipv6_peer_on_the_direct_path_and_back") {
            return;
        }
        let ns = test_support::netns::Netns::new("fbv6").with_underlay();
        // Stands in for the TUN device: only its index and routes matter here.
        ns.ip_line("link add flannel-v6.1 type veth peer name fv6peer");
        ns.ip_line("link set fv6peer up");
        ns.ip_line("link set flannel-v6.1 up");
        let vxlan = |subnet: &str, ip: &str, last: u8| {
            let vtep_mac = MacAddr([0x02, 0, 0, 0, 0, last]);
            Peer::checked_for_test(subnet, ip, PeerKind::Vxlan { vtep_mac, vni: 1 })
        };
        let peer = vxlan("2001:db8:42:2::/64", "2001:db8:18::2", 2);
        let v4_peer = vxlan("10.244.2.0/24", "198.18.0.2", 3);
        let routes = ns.run_async_with(|ns| async move {
            let network: IpNet = "2001:db8:42::/56".parse().expect("net");
            let direct = HostGw::setup_direct(HostGwConfig {
                iface: "ul0".into(),
                iface_addr: "2001:db8:18::1".parse().expect("ip"),
                public_ip: "2001:db8:18::1".parse().expect("ip"),
                network,
                subnet: "2001:db8:42:1::/64".parse().expect("net"),
            })
            .await
            .expect("setup");
            let mut f = FallbackRoutes::new(direct, "flannel-v6.1".into(), network);
            let peers = [peer.clone(), v4_peer.clone()];
            f.set([peer.subnet, v4_peer.subnet].into_iter().collect());
            f.sync(&peers).await.expect("on the direct path");
            let on = ns.ip(&["-6", "route", "show"]);
            f.set(HashSet::new());
            f.sync(&peers).await.expect("back on VXLAN");
            (
                on,
                ns.ip(&["-6", "route", "show"]),
                ns.ip(&["-4", "route", "show"]),
            )
        });
        let (on, off, v4) = routes;
        assert!(
            on.contains("2001:db8:42:2::/64 via 2001:db8:18::2 dev ul0"),
            "{on}"
        );
        assert!(on.contains("2001:db8:42:2:: dev flannel-v6.1"), "{on}");
        assert!(!off.contains("2001:db8:42:2::"), "{off}");
        // The IPv6 plane leaves the IPv4 peer alone.
        assert!(!v4.contains("10.244.2.0"), "{v4}");
    }
}
