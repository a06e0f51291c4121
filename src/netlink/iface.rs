//! Interface discovery for choosing the external interface: every interface with its index,
//! MTU and addresses (`ip addr show`), the device of the default route (`ip route show
//! default`) and the source address towards a destination (`ip route get`). One way, over
//! netlink: no `/proc/net/route`, no `SIOCGIFMTU`, no `if_nametoindex`.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{IpFamily, Netlink, NetlinkError};

/// A network interface of the handle's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Kernel name.
    pub name: String,
    /// Kernel index.
    pub index: u32,
    /// MTU in bytes (0 when the kernel reports none).
    pub mtu: u32,
    /// Addresses with their prefix, IPv4 then IPv6, each in the order the kernel lists them.
    pub addrs: Vec<IpNet>,
}

impl Netlink {
    /// `ip addr show`: every interface, in index order, with its addresses.
    pub async fn interfaces(&self) -> Result<Vec<Interface>, NetlinkError> {
        let mut out: Vec<Interface> = self
            .links()
            .await?
            .into_iter()
            .map(|l| Interface {
                name: l.name,
                index: l.index,
                mtu: l.mtu.unwrap_or(0),
                addrs: Vec::new(),
            })
            .collect();
        for family in [IpFamily::V4, IpFamily::V6] {
            let op = || format!("ip {} addr show", family.ip_flag());
            for (index, net) in self.addr_dump(family, op).await? {
                if let Some(i) = out.iter_mut().find(|i| i.index == index) {
                    i.addrs.push(net);
                }
            }
        }
        Ok(out)
    }

    /// `ip -4|-6 route show default`: the device index of the first unicast default route of
    /// the main table (flannel's `GetDefaultGatewayInterface`; blackhole and unreachable
    /// defaults are no way out); `None` without one.
    pub async fn default_route_index(&self, family: IpFamily) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .route_list(family)
            .await?
            .into_iter()
            .find(|r| r.dst.prefix_len() == 0 && r.kind == super::RouteType::Unicast)
            .and_then(|r| r.oif))
    }

    /// The source address the kernel would use to reach `dst` (the `src` of
    /// `ip route get <dst>`).
    pub async fn source_for(&self, dst: IpAddr) -> Result<IpAddr, NetlinkError> {
        self.route_get(dst)
            .await?
            .prefsrc
            .ok_or_else(|| NetlinkError::Unexpected {
                op: format!("ip route get {dst}"),
                detail: "the answer names no source address".into(),
            })
    }
}
