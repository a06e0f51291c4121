//! host-gw: one route per peer, `<subnet> via <peer public IP> dev <iface>`.
//!
//! One [`HostGw`] per address family. The daemon calls [`HostGw::sync`] on every lease change
//! and every 10 s (flannel's `routeCheck`), which also re-adds routes deleted behind our back
//! and removes routes of peers that are gone (including those left while we were down).

use ipnet::IpNet;
use std::net::IpAddr;

use super::apply::{apply_ops, read_routes, SyncReport};
use super::plan::{self, HostGwPlanConfig};
use super::Peer;
use crate::netlink::{IpFamily, Netlink, NetlinkError};

/// Interval of the route check, as flannel (`routeCheckRetries` seconds).
pub const ROUTE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Configuration of one family's host-gw routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGwConfig {
    /// External interface name.
    pub iface: String,
    /// The address of this family found on the external interface.
    pub iface_addr: IpAddr,
    /// Our public address of this family (`--public-ip`, annotations).
    pub public_ip: IpAddr,
    /// Network of this family.
    pub network: IpNet,
    /// Our lease subnet of this family.
    pub subnet: IpNet,
}

/// Why host-gw cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HostGwError {
    /// The public IP is not the interface address: peers could not route to us directly.
    #[error("your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend")]
    BehindNat,
    /// The configuration is inconsistent.
    #[error("invalid host-gw configuration: {0}")]
    Config(String),
    /// The external interface does not exist.
    #[error("external interface {0} not found")]
    IfaceMissing(String),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// flannel's NAT check: host-gw needs the public IP to be the interface's own address.
pub fn check_not_nat(iface_addr: IpAddr, public_ip: IpAddr) -> Result<(), HostGwError> {
    if iface_addr == public_ip {
        Ok(())
    } else {
        Err(HostGwError::BehindNat)
    }
}

/// host-gw routes of one address family.
#[derive(Debug)]
pub struct HostGw {
    nl: Netlink,
    routes: Routes,
    cfg: HostGwConfig,
    family: IpFamily,
    mtu: u32,
}

/// Which peers get routes from a [`HostGw`] reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routes {
    /// host-gw leases.
    HostGw,
    /// vxlan leases on-link to us (DirectRouting in userspace mode).
    Direct,
}

impl HostGw {
    /// Checks the configuration (refusing to run behind NAT) and the interface. Runs in the
    /// network namespace of the calling thread; needs a tokio runtime.
    pub async fn setup(cfg: HostGwConfig) -> Result<Self, HostGwError> {
        check_not_nat(cfg.iface_addr, cfg.public_ip)?;
        Self::open(cfg, Routes::HostGw).await
    }

    /// The same route reconciler for DirectRouting in userspace mode: `<subnet> via <public
    /// IP> dev <iface>` for the vxlan peers [`HostGw::sync_direct`] is told are on-link (no NAT
    /// check: a peer behind NAT is not on-link and keeps going through the tunnel).
    pub async fn setup_direct(cfg: HostGwConfig) -> Result<Self, HostGwError> {
        Self::open(cfg, Routes::Direct).await
    }

    async fn open(cfg: HostGwConfig, routes: Routes) -> Result<Self, HostGwError> {
        let family = IpFamily::of_net(cfg.subnet);
        if IpFamily::of_net(cfg.network) != family || !cfg.network.contains(&cfg.subnet) {
            return Err(HostGwError::Config(format!(
                "subnet {} is not inside network {}",
                cfg.subnet, cfg.network
            )));
        }
        let nl = Netlink::connect()?;
        let link = nl
            .link_by_name(&cfg.iface)
            .await?
            .ok_or_else(|| HostGwError::IfaceMissing(cfg.iface.clone()))?;
        Ok(HostGw {
            nl,
            routes,
            family,
            mtu: link.mtu.unwrap_or(1500),
            cfg,
        })
    }

    /// MTU of the external interface (host-gw adds no overhead): FLANNEL_MTU.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Programs `<subnet> via <public IP> dev <iface>` for every host-gw peer of this family,
    /// re-adds missing ones and removes stale ones. Failures are reported, not fatal.
    pub async fn sync(&mut self, peers: &[Peer]) -> SyncReport {
        self.reconcile(peers, &std::collections::HashSet::new())
            .await
    }

    /// DirectRouting (reconciler made by [`HostGw::setup_direct`]): routes for the vxlan peers
    /// whose public IP is in `onlink`, stale direct routes removed.
    pub async fn sync_direct(
        &mut self,
        peers: &[Peer],
        onlink: &std::collections::HashSet<IpAddr>,
    ) -> SyncReport {
        self.reconcile(peers, onlink).await
    }

    /// The netlink reader and connection (for the on-link lookups of DirectRouting).
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    async fn reconcile(
        &mut self,
        peers: &[Peer],
        onlink: &std::collections::HashSet<IpAddr>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        // The interface may have been recreated with a new index: look it up every time.
        let link = match self.nl.link_by_name(&self.cfg.iface).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                let e = NetlinkError::Invalid {
                    op: format!("ip link show dev {}", self.cfg.iface),
                    detail: "external interface not found".into(),
                };
                report.fail(None, "host-gw sync".to_owned(), &e);
                return report;
            }
            Err(e) => {
                report.fail(None, "host-gw sync".to_owned(), &e);
                return report;
            }
        };
        let pcfg = HostGwPlanConfig {
            ifindex: link.index,
            network: self.cfg.network,
            own_subnet: self.cfg.subnet,
        };
        let plan = match self.routes {
            Routes::HostGw => plan::plan_host_gw(&pcfg, peers),
            Routes::Direct => plan::plan_direct_routes(&pcfg, peers, |ip| onlink.contains(&ip)),
        };
        for s in &plan.skipped {
            tracing::debug!(subnet = %s.peer.subnet, reason = %s.reason, "peer not programmed");
        }
        report.planned = plan.peers.len();
        report.skipped = plan.skipped.clone();
        let current = match read_routes(&self.nl, self.family).await {
            Ok(routes) => plan::KernelState {
                routes,
                ..Default::default()
            },
            Err(e) => {
                report.fail(None, "host-gw sync".to_owned(), &e);
                return report;
            }
        };
        let ops = plan.diff(&current);
        apply_ops(&self.nl, &ops, link.index, &self.cfg.iface, &mut report).await;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_refused_with_flannels_message() {
        let e = check_not_nat(
            "198.18.0.1".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "your PublicIP differs from interface IP, meaning that probably you're on a NAT, \
             which is not supported by host-gw backend"
        );
        assert!(
            check_not_nat("198.18.0.1".parse().unwrap(), "198.18.0.1".parse().unwrap()).is_ok()
        );
    }
}
