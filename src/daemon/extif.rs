//! Choosing the external (underlay) interface exactly as flanneld does (compat §2.1).

use std::net::{IpAddr, Ipv4Addr};

use regex::Regex;

use crate::io::iface::Interface;

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
    pub ext_addr: Ipv4Addr,
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
    /// The interface MTU is zero.
    #[error("failed to determine MTU for {0} interface")]
    ZeroMtu(String),
}

/// Picks the external interface from `ifaces` as flanneld would.
pub fn select(ifaces: &[Interface], sel: &Selection<'_>) -> Result<ExternalInterface, SelectError> {
    let explicit =
        !sel.iface.is_empty() || !sel.iface_regex.is_empty() || sel.can_reach_source.is_some();
    let chosen = if !explicit {
        match sel.public_ip {
            Some(ip) => by_addr(ifaces, IpAddr::V4(ip)).ok_or(SelectError::PublicIpNotLocal(ip))?,
            None => {
                let name = sel.default_route_iface.ok_or(SelectError::NoDefaultRoute)?;
                ifaces
                    .iter()
                    .find(|i| i.name == name)
                    .ok_or(SelectError::NoDefaultRoute)?
            }
        }
    } else {
        find_explicit(ifaces, sel)?.ok_or(SelectError::NoMatch)?
    };
    let iface_addr = first_ipv4(chosen).ok_or_else(|| SelectError::NoIpv4(chosen.name.clone()))?;
    if chosen.mtu == 0 {
        return Err(SelectError::ZeroMtu(chosen.name.clone()));
    }
    Ok(ExternalInterface {
        name: chosen.name.clone(),
        index: chosen.index,
        mtu: chosen.mtu,
        iface_addr,
        ext_addr: sel.public_ip.unwrap_or(iface_addr),
    })
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
                .any(|a| a.addr.is_ipv4() && re.is_match(&a.addr.to_string()))
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
    ifaces.iter().find(|i| i.addrs.iter().any(|a| a.addr == ip))
}

/// The interface's preferred IPv4 address: global before link-local, in kernel order.
fn first_ipv4(iface: &Interface) -> Option<Ipv4Addr> {
    let v4 = || {
        iface.addrs.iter().filter_map(|a| match a.addr {
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
    use crate::io::iface::IfAddr;

    fn iface(name: &str, index: u32, addrs: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            index,
            mtu: 1500,
            addrs: addrs
                .iter()
                .map(|a| IfAddr {
                    addr: a.parse().unwrap(),
                    prefix_len: 24,
                })
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
}
