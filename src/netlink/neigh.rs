//! Neighbours (`ip neigh`) and bridge forwarding entries (`bridge fdb`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType as NlRouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};

use super::{IpFamily, Netlink, NetlinkError};
use crate::wire::MacAddr;

/// `NUD_PERMANENT`.
const NUD_PERMANENT: u16 = 0x80;
/// `NUD_NOARP`.
const NUD_NOARP: u16 = 0x40;

/// One entry of `ip neigh show dev <dev>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// Device index.
    pub ifindex: u32,
    /// Protocol address.
    pub ip: IpAddr,
    /// Link-layer address, absent for incomplete entries.
    pub mac: Option<MacAddr>,
    /// `NUD_*` state bits.
    pub state: u16,
}

impl Neighbour {
    /// `nud permanent`: configured, never expires.
    pub fn is_permanent(&self) -> bool {
        self.state & NUD_PERMANENT != 0
    }
}

/// One entry of `bridge fdb show dev <dev>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// Device index.
    pub ifindex: u32,
    /// Ethernet address.
    pub mac: MacAddr,
    /// Remote (`dst`), for VXLAN devices.
    pub dst: Option<IpAddr>,
    /// `NUD_*` state bits.
    pub state: u16,
    /// `NTF_SELF`: the entry belongs to the device itself, not to a bridge master.
    pub is_self: bool,
}

impl FdbEntry {
    /// `permanent` (or `static`, which the kernel reports as NOARP).
    pub fn is_permanent(&self) -> bool {
        self.state & (NUD_PERMANENT | NUD_NOARP) != 0
    }
}

impl Netlink {
    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent` (RTN_UNICAST, as flannel).
    pub async fn neigh_replace(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = IpFamily::of(ip).address_family();
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = NlRouteType::Unicast;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            || format!("ip neigh replace {ip} lladdr {mac} dev ifindex {index} nud permanent"),
        )
        .await
    }

    /// `ip neigh del <ip> dev <index>`.
    pub async fn neigh_del(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = IpFamily::of(ip).address_family();
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        self.ack(RouteNetlinkMessage::DelNeighbour(msg), 0, || {
            format!("ip neigh del {ip} dev ifindex {index}")
        })
        .await
    }

    /// `ip -4|-6 neigh show dev <index>`: every entry, any state.
    pub async fn neigh_list(
        &self,
        index: u32,
        family: IpFamily,
    ) -> Result<Vec<Neighbour>, NetlinkError> {
        let entries = self
            .neigh_dump(index, family.address_family(), || {
                format!("ip {} neigh show dev ifindex {index}", family.ip_flag())
            })
            .await?;
        let mut out = Vec::new();
        for n in entries {
            let (ip, mac) = dst_and_mac(&n);
            if let Some(ip) = ip.filter(|ip| IpFamily::of(*ip) == family) {
                out.push(Neighbour {
                    ifindex: index,
                    ip,
                    mac,
                    state: n.header.state.into(),
                });
            }
        }
        Ok(out)
    }

    /// `bridge fdb replace <mac> dev <index> dst <dst> self permanent`.
    pub async fn fdb_replace(
        &self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> Result<(), NetlinkError> {
        self.fdb_add(index, mac, dst, NLM_F_REPLACE, "replace")
            .await
    }

    /// `bridge fdb append <mac> dev <index> dst <dst> self permanent`: adds one more remote
    /// to an existing entry (flannel never does this; used to build test fixtures).
    pub async fn fdb_append(
        &self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> Result<(), NetlinkError> {
        self.fdb_add(
            index,
            mac,
            dst,
            rtnetlink::packet_core::NLM_F_APPEND,
            "append",
        )
        .await
    }

    /// `bridge fdb <verb> <mac> dev <index> dst <dst> self permanent`, `verb` being what the
    /// extra netlink `flags` (beside `NLM_F_CREATE`) mean.
    async fn fdb_add(
        &self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
        flags: u16,
        verb: &str,
    ) -> Result<(), NetlinkError> {
        let mut msg = fdb_msg(index, mac, dst);
        msg.header.state = NeighbourState::Permanent;
        self.ack(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | flags,
            || format!("bridge fdb {verb} {mac} dev ifindex {index} dst {dst} self permanent"),
        )
        .await
    }

    /// `bridge fdb del <mac> dev <index> dst <dst> self`: removes that remote (the whole entry
    /// when it is the last one).
    pub async fn fdb_del(&self, index: u32, mac: MacAddr, dst: IpAddr) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::DelNeighbour(fdb_msg(index, mac, dst)),
            0,
            || format!("bridge fdb del {mac} dev ifindex {index} dst {dst} self"),
        )
        .await
    }

    /// `bridge fdb show dev <index>`: the device's own (`self`) entries, any state.
    pub async fn fdb_list(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let entries = self
            .neigh_dump(index, AddressFamily::Bridge, || {
                format!("bridge fdb show dev ifindex {index}")
            })
            .await?;
        let mut out = Vec::new();
        for n in entries {
            if let (dst, Some(mac)) = dst_and_mac(&n) {
                out.push(FdbEntry {
                    ifindex: index,
                    mac,
                    dst,
                    state: n.header.state.into(),
                    is_self: n.header.flags.contains(NeighbourFlags::Own),
                });
            }
        }
        Ok(out)
    }

    /// Dumps the `family` neighbour table (`AF_BRIDGE`: the FDB) and keeps device `index`'s
    /// entries.
    async fn neigh_dump(
        &self,
        index: u32,
        family: AddressFamily,
        op: impl Fn() -> String,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(msg), op)
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n)
                    if n.header.ifindex == index && n.header.family == family =>
                {
                    Some(n)
                }
                _ => None,
            })
            .collect())
    }
}

/// A neighbour message's protocol address (`NDA_DST`) and link-layer address (`NDA_LLADDR`).
fn dst_and_mac(n: &NeighbourMessage) -> (Option<IpAddr>, Option<MacAddr>) {
    let (mut dst, mut mac) = (None, None);
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::Destination(a) => dst = neighbour_ip(a),
            NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
            _ => {}
        }
    }
    (dst, mac)
}

fn fdb_msg(index: u32, mac: MacAddr, dst: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    msg
}

fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

/// Neighbour addresses: typed for AF_INET/AF_INET6, raw bytes for AF_BRIDGE (the FDB `dst`).
fn neighbour_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(bytes) => {
            if let Ok(b) = <[u8; 4]>::try_from(bytes.as_slice()) {
                Some(IpAddr::V4(Ipv4Addr::from(b)))
            } else if let Ok(b) = <[u8; 16]>::try_from(bytes.as_slice()) {
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_dst_bytes() {
        assert_eq!(
            neighbour_ip(&NeighbourAddress::Other(vec![198, 18, 0, 2])),
            Some("198.18.0.2".parse().unwrap())
        );
        let v6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        assert_eq!(
            neighbour_ip(&NeighbourAddress::Other(v6.octets().to_vec())),
            Some(IpAddr::V6(v6))
        );
        assert_eq!(neighbour_ip(&NeighbourAddress::Other(vec![1, 2, 3])), None);
    }

    #[test]
    fn permanent_states() {
        let n = Neighbour {
            ifindex: 1,
            ip: "10.0.0.1".parse().unwrap(),
            mac: None,
            state: NUD_PERMANENT,
        };
        assert!(n.is_permanent());
        let f = FdbEntry {
            ifindex: 1,
            mac: MacAddr::ZERO,
            dst: None,
            state: 0x02,
            is_self: true,
        };
        assert!(!f.is_permanent());
    }
}
