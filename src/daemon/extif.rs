//! Choosing the external (underlay) interface exactly as flanneld does (compat §2.1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex::Regex;

use crate::netlink::Interface;

/// The interface flannel talks to peers through, and the addresses it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Interface MTU.
    pub mtu: u32,
    /// The interface's own IPv4 address (VXLAN sockets bind here).
    pub iface_addr: Ipv4Addr,
    /// The address peers use to reach us: `--public-ip` if set, else `iface_addr`.
    /// Both are `0.0.0.0` on an IPv6-only node (flannel's lease then says `"PublicIP":"0.0.0.0"`).
    pub ext_addr: Ipv4Addr,
    /// The interface's own IPv6 address (IPv6 enabled only).
    pub iface_v6_addr: Option<Ipv6Addr>,
    /// `--public-ipv6` if set, else `iface_v6_addr` (IPv6 enabled only).
    pub ext_v6_addr: Option<Ipv6Addr>,
}

impl ExternalInterface {
    /// The (interface, public) addresses of one family; `None` when it is not enabled.
    pub fn addrs(&self, v6: bool) -> Option<(IpAddr, IpAddr)> {
        if v6 {
            Some((self.iface_v6_addr?.into(), self.ext_v6_addr?.into()))
        } else {
            (!self.iface_addr.is_unspecified())
                .then_some((self.iface_addr.into(), self.ext_addr.into()))
        }
    }
}

/// Which address families the overlay runs (`EnableIPv4` / `EnableIPv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpStack {
    /// IPv4 only (flannel's default).
    #[default]
    V4,
    /// IPv6 only.
    V6,
    /// Both.
    Dual,
}

impl IpStack {
    /// The stack of `EnableIPv4`/`EnableIPv6`; `None` when both are false.
    pub fn of(enable_ipv4: bool, enable_ipv6: bool) -> Option<IpStack> {
        match (enable_ipv4, enable_ipv6) {
            (true, false) => Some(IpStack::V4),
            (false, true) => Some(IpStack::V6),
            (true, true) => Some(IpStack::Dual),
            (false, false) => None,
        }
    }

    /// Whether IPv4 is enabled.
    pub fn v4(self) -> bool {
        self != IpStack::V6
    }

    /// Whether IPv6 is enabled.
    pub fn v6(self) -> bool {
        self != IpStack::V4
    }
}

/// How the interface is asked for: the relevant flags.
#[derive(Debug, Clone, Default)]
pub struct Selection<'a> {
    /// `--iface` values (names or addresses), tried in order.
    pub iface: &'a [String],
    /// `--iface-regex` values, tried after every `--iface`.
    pub iface_regex: &'a [String],
    /// `--iface-can-reach`: the source address the kernel would use to reach it.
    pub can_reach_source: Option<IpAddr>,
    /// `--public-ip` (or the node-public-ip annotation).
    pub public_ip: Option<Ipv4Addr>,
    /// The interface of the IPv4 default route.
    pub default_route_iface: Option<&'a str>,
    /// The families to find addresses for.
    pub stack: IpStack,
    /// `--public-ipv6` (or the node-public-ipv6 annotation).
    pub public_ipv6: Option<Ipv6Addr>,
    /// The interface of the IPv6 default route.
    pub default_route_iface_v6: Option<&'a str>,
}

/// Why no interface could be chosen; messages are flannel's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// `--public-ip` alone must be an address of a local interface (flannel ≥ v0.12).
    #[error("Failed to find any valid interface to use: no interface has the public IP {0}")]
    PublicIpNotLocal(Ipv4Addr),
    /// No default route and no selection flags.
    #[error("Failed to find any valid interface to use: failed to get default interface: no default route")]
    NoDefaultRoute,
    /// The flags matched nothing.
    #[error("Failed to find interface to use that matches the interfaces and/or regexes provided")]
    NoMatch,
    /// A regex does not compile.
    #[error("invalid --iface-regex {pattern:?}: {reason}")]
    BadRegex {
        /// The pattern.
        pattern: String,
        /// The regex error.
        reason: String,
    },
    /// The interface has no IPv4 address.
    #[error("interface {0} has no IPv4 address")]
    NoIpv4(String),
    /// The interface has no IPv6 address (IPv6 enabled).
    #[error("failed to find IPv6 address for interface {0}")]
    NoIpv6(String),
    /// Dual-stack: the two default routes leave through different interfaces.
    #[error(
        "v6 default route interface {v6} must be the same with v4 default route interface {v4}"
    )]
    DefaultRouteMismatch {
        /// The IPv4 default route's interface.
        v4: String,
        /// The IPv6 default route's interface.
        v6: String,
    },
    /// `--public-ipv6` alone must be an address of a local interface.
    #[error("Failed to find any valid interface to use: no interface has the public IPv6 {0}")]
    PublicIpv6NotLocal(Ipv6Addr),
    /// The interface MTU is zero.
    #[error("failed to determine MTU for {0} interface")]
    ZeroMtu(String),
}

/// Picks the external interface from `ifaces` as flanneld would.
pub fn select(ifaces: &[Interface], sel: &Selection<'_>) -> Result<ExternalInterface, SelectError> {
    let explicit =
        !sel.iface.is_empty() || !sel.iface_regex.is_empty() || sel.can_reach_source.is_some();
    let chosen = if !explicit {
        match (sel.public_ip, sel.public_ipv6) {
            (Some(ip), _) => {
                by_addr(ifaces, IpAddr::V4(ip)).ok_or(SelectError::PublicIpNotLocal(ip))?
            }
            (None, Some(ip)) if sel.stack.v6() => {
                by_addr(ifaces, IpAddr::V6(ip)).ok_or(SelectError::PublicIpv6NotLocal(ip))?
            }
            _ => {
                let name = default_route_iface(sel)?;
                ifaces
                    .iter()
                    .find(|i| i.name == name)
                    .ok_or(SelectError::NoDefaultRoute)?
            }
        }
    } else {
        find_explicit(ifaces, sel)?.ok_or(SelectError::NoMatch)?
    };
    let (iface_addr, ext_addr) = if sel.stack.v4() {
        let a = first_ipv4(chosen).ok_or_else(|| SelectError::NoIpv4(chosen.name.clone()))?;
        (a, sel.public_ip.unwrap_or(a))
    } else {
        (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
    };
    let (iface_v6_addr, ext_v6_addr) = if sel.stack.v6() {
        let a = first_ipv6(chosen).ok_or_else(|| SelectError::NoIpv6(chosen.name.clone()))?;
        (Some(a), Some(sel.public_ipv6.unwrap_or(a)))
    } else {
        (None, None)
    };
    if chosen.mtu == 0 {
        return Err(SelectError::ZeroMtu(chosen.name.clone()));
    }
    Ok(ExternalInterface {
        name: chosen.name.clone(),
        index: chosen.index,
        mtu: chosen.mtu,
        iface_addr,
        ext_addr,
        iface_v6_addr,
        ext_v6_addr,
    })
}

/// The default route's interface of the enabled families; dual-stack needs both to agree.
fn default_route_iface<'a>(sel: &Selection<'a>) -> Result<&'a str, SelectError> {
    match sel.stack {
        IpStack::V4 => sel.default_route_iface.ok_or(SelectError::NoDefaultRoute),
        IpStack::V6 => sel
            .default_route_iface_v6
            .ok_or(SelectError::NoDefaultRoute),
        IpStack::Dual => {
            let v4 = sel.default_route_iface.ok_or(SelectError::NoDefaultRoute)?;
            let v6 = sel
                .default_route_iface_v6
                .ok_or(SelectError::NoDefaultRoute)?;
            if v4 != v6 {
                return Err(SelectError::DefaultRouteMismatch {
                    v4: v4.to_owned(),
                    v6: v6.to_owned(),
                });
            }
            Ok(v4)
        }
    }
}

fn find_explicit<'i>(
    ifaces: &'i [Interface],
    sel: &Selection<'_>,
) -> Result<Option<&'i Interface>, SelectError> {
    for want in sel.iface {
        let hit = match want.parse::<IpAddr>() {
            Ok(ip) => by_addr(ifaces, ip),
            Err(_) => ifaces.iter().find(|i| &i.name == want),
        };
        if hit.is_some() {
            return Ok(hit);
        }
    }
    for pattern in sel.iface_regex {
        let re = Regex::new(pattern).map_err(|e| SelectError::BadRegex {
            pattern: pattern.clone(),
            reason: e.to_string(),
        })?;
        let by_ip = ifaces.iter().find(|i| {
            i.addrs
                .iter()
                .any(|a| family_enabled(sel.stack, a.addr()) && re.is_match(&a.addr().to_string()))
        });
        if let Some(hit) = by_ip.or_else(|| ifaces.iter().find(|i| re.is_match(&i.name))) {
            return Ok(Some(hit));
        }
    }
    if let Some(src) = sel.can_reach_source {
        return Ok(by_addr(ifaces, src));
    }
    Ok(None)
}

fn by_addr(ifaces: &[Interface], ip: IpAddr) -> Option<&Interface> {
    ifaces
        .iter()
        .find(|i| i.addrs.iter().any(|a| a.addr() == ip))
}

/// Whether `--iface-regex` matches addresses of this family (IPv6 ones only with IPv6 on).
fn family_enabled(stack: IpStack, addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(_) => stack.v4(),
        IpAddr::V6(_) => stack.v6(),
    }
}

/// The interface's preferred IPv6 address: global before link-local (`fe80::/10`), in
/// kernel order; loopback never.
fn first_ipv6(iface: &Interface) -> Option<Ipv6Addr> {
    let v6 = || {
        iface.addrs.iter().filter_map(|a| match a.addr() {
            IpAddr::V6(v) if !v.is_loopback() && !v.is_unspecified() => Some(v),
            _ => None,
        })
    };
    let link_local = |a: &Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
    v6().find(|a| !link_local(a)).or_else(|| v6().next())
}

/// The interface's preferred IPv4 address: global before link-local, in kernel order.
fn first_ipv4(iface: &Interface) -> Option<Ipv4Addr> {
    let v4 = || {
        iface.addrs.iter().filter_map(|a| match a.addr() {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        })
    };
    v4().find(|a| !a.is_link_local() && !a.is_loopback())
        .or_else(|| v4().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, index: u32, addrs: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            index,
            mtu: 1500,
            addrs: addrs
                .iter()
                .map(|a| format!("{a}/24").parse().unwrap())
                .collect(),
        }
    }

    fn world() -> Vec<Interface> {
        vec![
            iface("lo", 1, &["127.0.0.1"]),
            iface("eth0", 2, &["169.254.9.9", "198.18.0.5"]),
            iface("eth1", 3, &["203.0.113.7"]),
        ]
    }

    #[test]
    fn default_route_interface_and_global_address() {
        let sel = Selection {
            default_route_iface: Some("eth0"),
            ..Default::default()
        };
        let e = select(&world(), &sel).unwrap();
        assert_eq!((e.name.as_str(), e.index), ("eth0", 2));
        assert_eq!(e.iface_addr, "198.18.0.5".parse::<Ipv4Addr>().unwrap());
        assert_eq!(e.ext_addr, e.iface_addr);
    }

    #[test]
    fn public_ip_alone_must_be_local() {
        let mut sel = Selection {
            public_ip: Some("203.0.113.7".parse().unwrap()),
            default_route_iface: Some("eth0"),
            ..Default::default()
        };
        assert_eq!(select(&world(), &sel).unwrap().name, "eth1");
        sel.public_ip = Some("198.51.100.1".parse().unwrap());
        assert!(matches!(
            select(&world(), &sel),
            Err(SelectError::PublicIpNotLocal(_))
        ));
    }

    #[test]
    fn iface_by_name_or_ip_then_regex_then_can_reach() {
        let names = vec!["nope".to_string(), "203.0.113.7".to_string()];
        let sel = Selection {
            iface: &names,
            public_ip: Some("198.51.100.9".parse().unwrap()),
            ..Default::default()
        };
        let e = select(&world(), &sel).unwrap();
        assert_eq!(e.name, "eth1");
        assert_eq!(e.ext_addr, "198.51.100.9".parse::<Ipv4Addr>().unwrap());

        let re = vec![r"^198\.18\.".to_string()];
        let sel = Selection {
            iface_regex: &re,
            ..Default::default()
        };
        assert_eq!(select(&world(), &sel).unwrap().name, "eth0");

        let re = vec!["^eth1$".to_string()];
        let sel = Selection {
            iface_regex: &re,
            ..Default::default()
        };
        assert_eq!(select(&world(), &sel).unwrap().name, "eth1");

        let sel = Selection {
            can_reach_source: Some("198.18.0.5".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(select(&world(), &sel).unwrap().name, "eth0");
    }

    #[test]
    fn errors_are_flannels() {
        let names = vec!["wlan9".to_string()];
        let sel = Selection {
            iface: &names,
            ..Default::default()
        };
        assert_eq!(select(&world(), &sel), Err(SelectError::NoMatch));
        assert_eq!(
            select(&world(), &Selection::default()),
            Err(SelectError::NoDefaultRoute)
        );
        let bad = vec!["(".to_string()];
        let sel = Selection {
            iface_regex: &bad,
            ..Default::default()
        };
        assert!(matches!(
            select(&world(), &sel),
            Err(SelectError::BadRegex { .. })
        ));
    }

    fn dual_world() -> Vec<Interface> {
        vec![
            iface("eth0", 2, &["198.18.0.5", "fe80::1", "2001:db8:18::5"]),
            iface("eth1", 3, &["203.0.113.7", "2001:db8:19::7"]),
        ]
    }

    #[test]
    fn dual_stack_needs_one_default_route_interface() {
        let mut sel = Selection {
            stack: IpStack::Dual,
            default_route_iface: Some("eth0"),
            default_route_iface_v6: Some("eth0"),
            ..Default::default()
        };
        let e = select(&dual_world(), &sel).unwrap();
        assert_eq!(e.iface_v6_addr, Some("2001:db8:18::5".parse().unwrap()));
        assert_eq!(e.ext_v6_addr, e.iface_v6_addr);
        assert_eq!(e.ext_addr, "198.18.0.5".parse::<Ipv4Addr>().unwrap());
        sel.default_route_iface_v6 = Some("eth1");
        assert_eq!(
            select(&dual_world(), &sel).unwrap_err().to_string(),
            "v6 default route interface eth1 must be the same with v4 default route interface eth0"
        );
    }

    #[test]
    fn ipv6_only_uses_the_v6_default_route_and_public_ipv6() {
        let sel = Selection {
            stack: IpStack::V6,
            default_route_iface_v6: Some("eth1"),
            ..Default::default()
        };
        let e = select(&dual_world(), &sel).unwrap();
        assert_eq!(e.name, "eth1");
        assert_eq!(e.ext_addr, Ipv4Addr::UNSPECIFIED);
        let sel = Selection {
            stack: IpStack::V6,
            public_ipv6: Some("2001:db8:18::5".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(select(&dual_world(), &sel).unwrap().name, "eth0");
        // IPv6 on an interface with only a link-local or no IPv6 address.
        let sel = Selection {
            stack: IpStack::Dual,
            default_route_iface: Some("lo"),
            default_route_iface_v6: Some("lo"),
            ..Default::default()
        };
        assert_eq!(
            select(&world(), &sel),
            Err(SelectError::NoIpv6("lo".into()))
        );
    }
}
