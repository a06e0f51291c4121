//! Dual-stack and IPv6-only (`EnableIPv6`): one data plane and one set of firewall rules per
//! enabled address family, driven as one. Each family's plane sees every peer and programs
//! those of its own family (the planners count the others apart), as flannel runs
//! `flannel.<VNI>` and `flannel-v6.<VNI>` side by side.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::{join_all, select_all, FutureExt};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::backend::Peer;
use crate::config::flags::Flags;
use crate::config::netconf::{BackendConfig, NetConfig};
use crate::config::subnet_env::SubnetEnv;
use crate::lease::Lease;
use crate::wire::MacAddr;

use super::extif::{ExternalInterface, IpStack};
use super::metrics::PlaneMetrics;
use super::plane::{Firewall, Plane, PlaneError};
use super::DaemonError;

/// The Network and our lease subnet of each enabled family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Families {
    /// IPv4 (Network, subnet), when `EnableIPv4`.
    pub v4: Option<(Ipv4Net, Ipv4Net)>,
    /// IPv6 (IPv6Network, subnet), when `EnableIPv6`.
    pub v6: Option<(Ipv6Net, Ipv6Net)>,
}

impl Families {
    /// The families of `lease`; flannel's error when an enabled family has no subnet.
    pub(super) fn of_lease(net: &NetConfig, lease: &Lease) -> Result<Families, DaemonError> {
        let missing = |family: &str| {
            DaemonError::Register(format!("{family} is enabled but the lease has no {family}"))
        };
        let v4 = match (net.enable_ipv4, net.network) {
            (true, Some(n)) => Some((n, lease.subnet.ok_or_else(|| missing("IPv4"))?)),
            _ => None,
        };
        let v6 = match (net.enable_ipv6, net.ipv6_network) {
            (true, Some(n)) => Some((n, lease.ipv6_subnet.ok_or_else(|| missing("IPv6"))?)),
            _ => None,
        };
        Ok(Families { v4, v6 })
    }

    /// (Network, subnet) of each enabled family, IPv4 first.
    pub(super) fn nets(&self) -> Vec<(IpNet, IpNet)> {
        let v4 = self.v4.map(|(n, s)| (IpNet::V4(n), IpNet::V4(s)));
        let v6 = self.v6.map(|(n, s)| (IpNet::V6(n), IpNet::V6(s)));
        v4.into_iter().chain(v6).collect()
    }

    /// subnet.env's network keys for these families (MTU and IPMASQ from the caller).
    pub(super) fn subnet_env(&self, mtu: u32, ipmasq: bool) -> SubnetEnv {
        SubnetEnv {
            network: self.v4.map(|(n, _)| n),
            subnet: self.v4.map(|(_, s)| s),
            ipv6_network: self.v6.map(|(n, _)| n),
            ipv6_subnet: self.v6.map(|(_, s)| s),
            mtu,
            ipmasq,
        }
    }
}

/// The stack `EnableIPv4`/`EnableIPv6` ask for, with flannel's error when neither is set.
pub(super) fn stack_of(net: &NetConfig) -> Result<IpStack, DaemonError> {
    IpStack::of(net.enable_ipv4, net.enable_ipv6).ok_or_else(|| {
        DaemonError::Unsupported(
            "none defined stack: EnableIPv4 is false and EnableIPv6 is false".into(),
        )
    })
}

/// host-gw routes straight to the address the peer publishes: flannel refuses a public
/// address of either family that is not the interface's own.
pub(super) fn check_host_gw_not_nat(ext: &ExternalInterface) -> Result<(), DaemonError> {
    if ext.ext_addr != ext.iface_addr || ext.ext_v6_addr != ext.iface_v6_addr {
        return Err(DaemonError::Register(
            "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend".into(),
        ));
    }
    Ok(())
}

/// The data planes of the enabled families (IPv4 first); the first one's MTU is FLANNEL_MTU,
/// as flannel writes the IPv4 device's MTU in dual-stack.
#[derive(Debug)]
pub(super) struct Planes(Vec<Plane>);

impl Planes {
    /// Starts one plane per family of `families`; `macs` are the (IPv4, IPv6) VTEP MACs.
    pub(super) async fn start(
        flags: &Flags,
        backend: &BackendConfig,
        ext: &ExternalInterface,
        families: &Families,
        macs: (Option<MacAddr>, Option<MacAddr>),
    ) -> Result<Planes, PlaneError> {
        let mut planes = Vec::new();
        for (network, subnet) in families.nets() {
            let mac = match subnet {
                IpNet::V4(_) => macs.0,
                IpNet::V6(_) => macs.1,
            };
            planes.push(Plane::start(flags, backend, ext, network, subnet, mac).await?);
        }
        Ok(Planes(planes))
    }

    fn first(&self) -> Option<&Plane> {
        self.0.first()
    }

    /// FLANNEL_MTU.
    pub(super) fn mtu(&self) -> u32 {
        self.first().map_or(0, Plane::mtu)
    }

    /// The counters of every family's plane, summed on /metrics.
    pub(super) fn metrics_source(&self) -> PlaneMetrics {
        self.0
            .iter()
            .map(Plane::metrics_source)
            .fold(PlaneMetrics::Kernel, PlaneMetrics::join)
    }

    /// [`Plane::sync`] of every family; failures joined into one line.
    pub(super) async fn sync(&mut self, peers: &[Peer]) -> Result<(), String> {
        let mut errors = Vec::new();
        for p in &mut self.0 {
            if let Err(e) = p.sync(peers).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    pub(super) fn set_fallback(&mut self, subnets: HashSet<IpNet>) {
        for p in &mut self.0 {
            p.set_fallback(subnets.clone());
        }
    }

    /// Completes when any family's overlay device disappeared.
    pub(super) async fn device_event(&self) {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        select_all(self.0.iter().map(|p| p.device_event().boxed())).await;
    }

    /// [`Plane::recover`] of every family (a device that is still there is adopted as is).
    pub(super) async fn recover(
        &mut self,
        peers: &[Peer],
    ) -> Result<(), crate::backend::kernel::KernelError> {
        for p in &mut self.0 {
            p.recover(peers).await?;
        }
        Ok(())
    }

    /// Entries of every family's userspace peer table together.
    pub(super) fn peer_table_len(&self) -> Option<usize> {
        self.0
            .iter()
            .filter_map(Plane::peer_table_len)
            .reduce(|a, b| a + b)
    }

    /// Packet loop panics of every family's userspace plane together (one panic budget).
    pub(super) fn packet_loop_panics(&self) -> Option<u64> {
        self.0
            .iter()
            .filter_map(Plane::packet_loop_panics)
            .reduce(|a, b| a + b)
    }

    pub(super) async fn shutdown(self) {
        for p in self.0 {
            p.shutdown().await;
        }
    }
}

/// Runs every family's firewall in one task; `first_round` is told once each has ended its
/// first installation attempt.
pub(super) async fn run_firewalls(
    firewalls: Vec<Firewall>,
    period: Duration,
    first_round: tokio::sync::oneshot::Sender<()>,
) {
    let (txs, rxs): (Vec<_>, Vec<_>) = firewalls
        .iter()
        .map(|_| tokio::sync::oneshot::channel())
        .unzip();
    let runs = join_all(
        firewalls
            .into_iter()
            .zip(txs)
            .map(|(fw, tx)| fw.run(period, Some(tx))),
    );
    let told = async move {
        join_all(rxs).await;
        let _ = first_round.send(());
        std::future::pending::<()>().await
    };
    futures::future::join(runs, told).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(v4: Option<&str>, v6: Option<&str>) -> Lease {
        Lease {
            subnet: v4.map(|s| s.parse().expect("v4")),
            ipv6_subnet: v6.map(|s| s.parse().expect("v6")),
            attrs: Default::default(),
            expiration: None,
            node: None,
        }
    }

    #[test]
    fn families_follow_the_config_and_need_the_lease_to_match() {
        let dual = NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .expect("config");
        assert_eq!(stack_of(&dual).expect("stack"), IpStack::Dual);
        let f = Families::of_lease(
            &dual,
            &lease(Some("10.244.1.0/24"), Some("2001:db8:42:1::/64")),
        )
        .expect("families");
        assert_eq!(f.nets().len(), 2);
        let env = f.subnet_env(1450, true).render();
        assert!(
            env.contains("FLANNEL_IPV6_NETWORK=2001:db8:42::/56\n"),
            "{env}"
        );
        assert!(
            env.contains("FLANNEL_IPV6_SUBNET=2001:db8:42:1::1/64\n"),
            "{env}"
        );
        let e = Families::of_lease(&dual, &lease(Some("10.244.1.0/24"), None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error registering network: IPv6 is enabled but the lease has no IPv6"
        );
        let v6only = NetConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:42::/56"}"#,
        )
        .expect("config");
        let f = Families::of_lease(&v6only, &lease(None, Some("2001:db8:42:1::/64")))
            .expect("families");
        assert_eq!(f.v4, None);
        assert!(!f
            .subnet_env(1430, false)
            .render()
            .contains("FLANNEL_NETWORK"));
        let none = NetConfig::parse(r#"{"EnableIPv4":false}"#).expect("config");
        assert!(stack_of(&none).is_err());
    }
}
