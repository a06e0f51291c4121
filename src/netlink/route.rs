//! Routes: `ip route show/replace/add/del/get` in the main table.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage,
};
pub use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

use super::link::unexpected;
use super::{IpFamily, Netlink, NetlinkError};

/// `RT_TABLE_MAIN`.
pub const RT_TABLE_MAIN: u32 = 254;

/// A unicast route as `ip route` prints it (the parts this crate uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// `via`.
    pub gateway: Option<IpAddr>,
    /// `dev` (output interface index; of a multipath route, its first next hop's).
    pub oif: Option<u32>,
    /// `onlink` (`RTNH_F_ONLINK`): the gateway is on the device even without a covering
    /// connected route.
    pub onlink: bool,
    /// `metric` (`RTA_PRIORITY`); IPv6 routes added with 0 are stored as 1024.
    pub metric: u32,
    /// Routing table.
    pub table: u32,
    /// `proto`: who installed it.
    pub protocol: RouteProtocol,
    /// `scope`.
    pub scope: RouteScope,
    /// Route type (`unicast`, `local`, `blackhole`, …).
    pub kind: RouteType,
    /// `src` (preferred source).
    pub prefsrc: Option<IpAddr>,
}

impl Route {
    /// `<dst> via <gateway>` in the main table, `proto boot` like `ip route add` and flannel
    /// (vishvananda/netlink's default), scope universe, unicast.
    pub fn via(dst: IpNet, gateway: IpAddr) -> Self {
        Route {
            dst,
            gateway: Some(gateway),
            oif: None,
            onlink: false,
            metric: 0,
            table: RT_TABLE_MAIN,
            protocol: RouteProtocol::Boot,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
            prefsrc: None,
        }
    }

    /// Adds `dev <oif>`.
    pub fn dev(mut self, oif: u32) -> Self {
        self.oif = Some(oif);
        self
    }

    /// Adds or clears `onlink`.
    pub fn with_onlink(mut self, onlink: bool) -> Self {
        self.onlink = onlink;
        self
    }

    /// Sets `metric`.
    pub fn with_metric(mut self, metric: u32) -> Self {
        self.metric = metric;
        self
    }

    fn to_message(&self, for_delete: bool) -> RouteMessage {
        let family = IpFamily::of_net(self.dst);
        let mut msg = RouteMessage::default();
        msg.header.address_family = family.address_family();
        msg.header.destination_prefix_length = self.dst.prefix_len();
        msg.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        if for_delete {
            // As `ip route del`: match any protocol, scope and type.
            msg.header.protocol = RouteProtocol::Unspec;
            msg.header.scope = RouteScope::NoWhere;
            msg.header.kind = RouteType::Unspec;
        } else {
            msg.header.protocol = self.protocol;
            msg.header.scope = self.scope;
            msg.header.kind = self.kind;
        }
        if self.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if self.table > 255 {
            msg.attributes.push(RouteAttribute::Table(self.table));
        }
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                self.dst.network(),
            )));
        if let Some(gw) = self.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(oif) = self.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        if self.metric != 0 {
            msg.attributes.push(RouteAttribute::Priority(self.metric));
        }
        if let Some(src) = self.prefsrc {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        msg
    }
}

impl fmt::Display for Route {
    /// `ip route` form, with `ifindex N` for the device.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev ifindex {oif}")?;
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

impl Netlink {
    /// `ip route replace <route>`: create or overwrite the route with the same destination and
    /// metric in its table.
    pub async fn route_replace(&self, route: &Route) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::NewRoute(route.to_message(false)),
            NLM_F_CREATE | NLM_F_REPLACE,
            || format!("ip route replace {route}"),
        )
        .await
    }

    /// `ip route add <route>`; fails with EEXIST if the destination/metric is taken.
    pub async fn route_add(&self, route: &Route) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::NewRoute(route.to_message(false)),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("ip route add {route}"),
        )
        .await
    }

    /// `ip route del <route>`: matches destination, metric, and gateway/device when given.
    /// Fails with ESRCH when there is no such route.
    pub async fn route_del(&self, route: &Route) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::DelRoute(route.to_message(true)),
            0,
            || format!("ip route del {route}"),
        )
        .await
    }

    /// `ip -4|-6 route show table main`: every route of the main table.
    pub async fn route_list(&self, family: IpFamily) -> Result<Vec<Route>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family.address_family();
        let msgs = self
            .dump(RouteNetlinkMessage::GetRoute(msg), || {
                format!("ip {} route show table main", family.ip_flag())
            })
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .filter(|r| r.table == RT_TABLE_MAIN && IpFamily::of_net(r.dst) == family)
            .collect())
    }

    /// `ip route get <ip>`: the route the kernel would use to reach `ip`.
    pub async fn route_get(&self, ip: IpAddr) -> Result<Route, NetlinkError> {
        let op = || format!("ip route get {ip}");
        let family = IpFamily::of(ip);
        let mut msg = RouteMessage::default();
        msg.header.address_family = family.address_family();
        msg.header.destination_prefix_length = family.max_prefix_len();
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        match self.get_one(RouteNetlinkMessage::GetRoute(msg), op).await? {
            RouteNetlinkMessage::NewRoute(r) => {
                parse_route(&r).ok_or_else(|| NetlinkError::Unexpected {
                    op: op(),
                    detail: "route without a usable destination".into(),
                })
            }
            other => Err(unexpected(op(), &other)),
        }
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Converts a kernel route message; `None` for families and shapes this crate does not use.
fn parse_route(m: &RouteMessage) -> Option<Route> {
    let family = match m.header.address_family {
        netlink_packet_route::AddressFamily::Inet => IpFamily::V4,
        netlink_packet_route::AddressFamily::Inet6 => IpFamily::V6,
        _ => return None,
    };
    let mut dst_ip = None;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = 0;
    let mut table = u32::from(m.header.table);
    let mut prefsrc = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst_ip = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            // A multipath route names its devices per next hop; `dev` is the first one's
            // (as `/proc/net/route` shows it).
            RouteAttribute::MultiPath(hops) => {
                oif = oif.or(hops.first().map(|h| h.interface_index))
            }
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::PrefSource(a) => prefsrc = route_ip(a),
            _ => {}
        }
    }
    let dst_ip = dst_ip.unwrap_or(match family {
        IpFamily::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    });
    let dst = IpNet::new(dst_ip, m.header.destination_prefix_length).ok()?;
    Some(Route {
        dst,
        gateway,
        oif,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        metric,
        table,
        protocol: m.header.protocol,
        scope: m.header.scope,
        kind: m.header.kind,
        prefsrc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let r = Route::via(
            "10.244.2.0/24".parse().unwrap(),
            "10.244.2.0".parse().unwrap(),
        )
        .dev(4)
        .with_onlink(true);
        assert_eq!(
            r.to_string(),
            "10.244.2.0/24 via 10.244.2.0 dev ifindex 4 onlink"
        );
        let back = parse_route(&r.to_message(false)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn delete_matches_any_protocol() {
        let r = Route::via(
            "fd42:1::/64".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        )
        .with_metric(1024);
        let m = r.to_message(true);
        assert_eq!(m.header.protocol, RouteProtocol::Unspec);
        assert_eq!(m.header.scope, RouteScope::NoWhere);
        assert!(m.attributes.contains(&RouteAttribute::Priority(1024)));
    }
}
