//! The userspace plane's TUN device as the kernel's routing sees it, in `ip` terms: clearing a
//! foreign device out of its name, and its MTU, address and the Network route.

use ipnet::IpNet;

use super::{IpFamily, Netlink, NetlinkError, Route, RouteScope};

/// "No such device".
const ENODEV: i32 = 19;

/// What [`Netlink::configure_tun`] changed besides the settings it always asserts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunReport {
    /// Addresses removed: an old lease's, or anything else not ours.
    pub removed: Vec<IpNet>,
    /// Addresses that could not be removed, with the error.
    pub not_removed: Vec<(IpNet, String)>,
}

impl Netlink {
    /// `ip link del <device>` when a device of that name exists and is not a TUN device (a
    /// kernel vxlan device left by kernel mode or upstream flannel). Its kind when it was
    /// removed; `Ok(None)` when there was nothing to remove.
    pub async fn remove_non_tun(&self, device: &str) -> Result<Option<String>, NetlinkError> {
        let Some(link) = self.link_by_name(device).await? else {
            return Ok(None);
        };
        if link.kind.as_deref() == Some("tun") {
            return Ok(None);
        }
        self.link_del(link.index).await?;
        Ok(Some(link.kind.unwrap_or_else(|| "unknown".to_owned())))
    }

    /// `ip link del <device>` if it exists; true when it did.
    pub async fn link_del_by_name(&self, device: &str) -> Result<bool, NetlinkError> {
        match self.link_by_name(device).await? {
            Some(link) => self.link_del(link.index).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// `ip link set <dev> mtu <mtu> up; ip addr add <subnet network>/32 (/128) dev <dev>;
    /// ip route replace <Network> dev <dev> scope link`: the whole Network goes through the
    /// TUN device, the /32 gives host-originated packets a source inside our subnet. On a
    /// device kept from a previous run this reconciles: other IPv4 addresses (an old lease's)
    /// are removed, what is already right is left alone, so forwarding is never interrupted.
    pub async fn configure_tun(
        &self,
        device: &str,
        mtu: u32,
        network: IpNet,
        subnet: IpNet,
    ) -> Result<TunReport, NetlinkError> {
        let index = self
            .link_by_name(device)
            .await?
            .ok_or_else(|| NetlinkError::Kernel {
                op: format!("ip link show {device}"),
                errno: ENODEV,
                source: std::io::Error::from_raw_os_error(ENODEV),
            })?
            .index;
        self.link_set_mtu(index, mtu).await?;
        let addr = IpNet::new(subnet.network(), subnet.max_prefix_len()).unwrap_or(subnet);
        let family = match subnet {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        };
        let present = self.addr_list(index, family).await?;
        let mut report = TunReport::default();
        // The kernel's own IPv6 link-local address stays.
        let link_local =
            |a: &IpNet| matches!(a, IpNet::V6(a) if a.addr().segments()[0] & 0xffc0 == 0xfe80);
        for stale in present.iter().filter(|a| **a != addr && !link_local(a)) {
            match self.addr_del(index, *stale).await {
                Ok(()) => report.removed.push(*stale),
                Err(e) => report.not_removed.push((*stale, e.to_string())),
            }
        }
        if !present.contains(&addr) {
            match self.addr_add(index, addr).await {
                Err(e) if !e.is_exists() => return Err(e),
                _ => {}
            }
        }
        self.link_set_up(index).await?;
        let mut route = Route::via(network, subnet.network()).dev(index);
        route.gateway = None;
        if family == IpFamily::V4 {
            route.scope = RouteScope::Link;
        }
        self.route_replace(&route).await?;
        Ok(report)
    }
}
