//! `--ip-blackhole-route`: flannel's `blackhole <own subnet>` route (Canal set-ups without a
//! bridge: addresses of the subnet no pod holds are dropped here instead of following the
//! default route out). Like flannel (`AddBlackholeV4Route`, re-run every `--iptables-resync`
//! seconds): added when no blackhole route to the subnet exists, never removed (flannel leaves
//! it on exit too).

use ipnet::{IpNet, Ipv4Net};
use tracing::{info, warn};

use crate::netlink::{IpFamily, Netlink, Route, RouteType};

/// The blackhole route flannel installs for `subnet`: main table, metric 0, no device.
pub fn route(subnet: Ipv4Net) -> Route {
    let dst = IpNet::V4(subnet.trunc());
    let mut r = Route::via(dst, subnet.network().into());
    r.gateway = None;
    r.kind = RouteType::BlackHole;
    r
}

/// Whether `routes` already hold a blackhole route to `subnet` (flannel filters on
/// destination and type only).
pub fn present(routes: &[Route], subnet: Ipv4Net) -> bool {
    let dst = IpNet::V4(subnet.trunc());
    routes
        .iter()
        .any(|r| r.kind == RouteType::BlackHole && r.dst == dst)
}

/// Keeps the blackhole route in place; one warning per kind of failure, not one per period.
#[derive(Debug)]
pub struct Blackhole {
    subnet: Ipv4Net,
    warned: bool,
}

impl Blackhole {
    /// For our lease subnet.
    pub fn new(subnet: Ipv4Net) -> Blackhole {
        info!(%subnet, "keeping a blackhole route for our subnet (--ip-blackhole-route)");
        Blackhole {
            subnet,
            warned: false,
        }
    }

    /// Adds the route unless one exists.
    pub async fn ensure(&mut self) {
        match self.try_ensure().await {
            Ok(true) => {
                info!(subnet = %self.subnet, "added blackhole route");
                self.warned = false;
            }
            Ok(false) => self.warned = false,
            Err(e) if !self.warned => {
                self.warned = true;
                warn!(
                    subnet = %self.subnet, error = %e,
                    "could not add the blackhole route (a route to the subnet with metric 0, such as a bridge's, takes the same key); retrying every --iptables-resync seconds"
                );
            }
            Err(_) => {}
        }
    }

    async fn try_ensure(&self) -> Result<bool, crate::netlink::NetlinkError> {
        let nl = Netlink::connect()?;
        if present(&nl.route_list(IpFamily::V4).await?, self.subnet) {
            return Ok(false);
        }
        nl.route_add(&route(self.subnet)).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannels_route_and_presence() {
        let subnet: Ipv4Net = "10.244.3.0/24".parse().expect("net");
        let r = route(subnet);
        assert_eq!(r.kind, RouteType::BlackHole);
        assert_eq!(r.gateway, None);
        assert_eq!(r.oif, None);
        assert_eq!(r.metric, 0);
        assert_eq!(r.dst.to_string(), "10.244.3.0/24");
        assert!(present(std::slice::from_ref(&r), subnet));
        let mut unicast = r.clone();
        unicast.kind = RouteType::Unicast;
        assert!(!present(&[unicast], subnet));
        assert!(!present(&[r], "10.244.4.0/24".parse().expect("net")));
    }
}
