//! Links: `ip link show/add/del/set`.

use std::net::IpAddr;

use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use super::{check_ifname, Netlink, NetlinkError};
use crate::wire::MacAddr;

/// A network interface as `ip -d link show` describes it (the parts this crate uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`vxlan`, `veth`, …); `None` for plain devices.
    pub kind: Option<String>,
    /// Hardware address, when it is a 6-byte Ethernet address.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Carrier (`IFF_LOWER_UP`): a TUN device has it only while a process holds it open.
    pub lower_up: bool,
    /// VXLAN attributes, for `kind == "vxlan"`.
    pub vxlan: Option<VxlanAttrs>,
}

/// The VXLAN attributes of an existing device (`ip -d link show` "vxlan id …").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    /// `IFLA_VXLAN_ID`.
    pub vni: Option<u32>,
    /// `IFLA_VXLAN_LINK`: the underlay device index.
    pub parent: Option<u32>,
    /// `IFLA_VXLAN_LOCAL` / `LOCAL6`.
    pub local: Option<IpAddr>,
    /// `IFLA_VXLAN_GROUP` / `GROUP6` (remote or multicast group).
    pub group: Option<IpAddr>,
    /// `IFLA_VXLAN_PORT` (destination UDP port, host order).
    pub port: Option<u16>,
    /// `IFLA_VXLAN_LEARNING`.
    pub learning: Option<bool>,
    /// `IFLA_VXLAN_L2MISS`.
    pub l2miss: Option<bool>,
    /// `IFLA_VXLAN_GBP` present.
    pub gbp: bool,
}

/// What to create: flannel's VXLAN device (vishvananda/netlink `addVxlanAttrs` attribute set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name, `flannel.<VNI>` or `flannel-v6.<VNI>`.
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// Underlay device index (`dev`), if any.
    pub parent: Option<u32>,
    /// Local (source) address.
    pub local: Option<IpAddr>,
    /// Destination UDP port; 0 leaves the kernel default (8472) and sends no attribute.
    pub port: u16,
    /// Source-address learning.
    pub learning: bool,
    /// Group Based Policy extension.
    pub gbp: bool,
    /// Device MTU.
    pub mtu: Option<u32>,
    /// Hardware address set at creation (avoids systemd's MACAddressPolicy race).
    pub mac: Option<MacAddr>,
}

impl Netlink {
    /// `ip -d link show dev <name>`; `Ok(None)` when there is no such device.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let op = || format!("ip -d link show dev {name}");
        check_ifname(name).map_err(|detail| NetlinkError::Invalid { op: op(), detail })?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.get_one(RouteNetlinkMessage::GetLink(msg), op).await {
            Ok(RouteNetlinkMessage::NewLink(m)) => Ok(Some(parse_link(&m))),
            Ok(other) => Err(unexpected(op(), &other)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip -d link show` for one index; `Ok(None)` when there is no such device.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let op = || format!("ip -d link show ifindex {index}");
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.get_one(RouteNetlinkMessage::GetLink(msg), op).await {
            Ok(RouteNetlinkMessage::NewLink(m)) => Ok(Some(parse_link(&m))),
            Ok(other) => Err(unexpected(op(), &other)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip -d link show`: every link.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), || {
                "ip -d link show".to_owned()
            })
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    /// `ip link add <name> [address <mac>] [mtu <mtu>] type vxlan id <vni> [local <ip>]
    /// [dev <parent>] [dstport <port>] [no]learning [gbp] ttl 0 tos 0 noproxy norsc nol2miss
    /// nol3miss noudp6zerocsumtx noudp6zerocsumrx`. Fails with EEXIST if the name is taken.
    pub async fn link_add_vxlan(&self, spec: &VxlanSpec) -> Result<(), NetlinkError> {
        let op = || describe_vxlan_add(spec);
        check_ifname(&spec.name).map_err(|detail| NetlinkError::Invalid { op: op(), detail })?;
        let mut data = vec![InfoVxlan::Id(spec.vni)];
        if let Some(parent) = spec.parent {
            data.push(InfoVxlan::Link(parent));
        }
        match spec.local {
            Some(IpAddr::V4(a)) => data.push(InfoVxlan::Local(a)),
            Some(IpAddr::V6(a)) => data.push(InfoVxlan::Local6(a)),
            None => {}
        }
        data.extend([
            InfoVxlan::Ttl(0),
            InfoVxlan::Tos(0),
            InfoVxlan::Learning(spec.learning),
            InfoVxlan::Proxy(false),
            InfoVxlan::Rsc(false),
            InfoVxlan::L2Miss(false),
            InfoVxlan::L3Miss(false),
            InfoVxlan::UDPZeroCsumTX(false),
            InfoVxlan::UDPZeroCsumRX(false),
        ]);
        if spec.gbp {
            data.push(InfoVxlan::Gbp);
        }
        if spec.port > 0 {
            data.push(InfoVxlan::Port(spec.port));
        }
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::IfName(spec.name.clone()));
        if let Some(mac) = spec.mac {
            msg.attributes
                .push(LinkAttribute::Address(mac.octets().to_vec()));
        }
        if let Some(mtu) = spec.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        self.ack(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            op,
        )
        .await
    }

    /// `ip link del dev <index>`.
    pub async fn link_del(&self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.ack(RouteNetlinkMessage::DelLink(msg), 0, || {
            format!("ip link del ifindex {index}")
        })
        .await
    }

    /// `ip link set dev <index> up`.
    pub async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::SetLink(msg), 0, || {
            format!("ip link set ifindex {index} up")
        })
        .await
    }

    /// `ip link set dev <index> mtu <mtu>`.
    pub async fn link_set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.ack(RouteNetlinkMessage::SetLink(msg), 0, || {
            format!("ip link set ifindex {index} mtu {mtu}")
        })
        .await
    }

    /// `ip link set dev <index> address <mac>`.
    pub async fn link_set_mac(&self, index: u32, mac: MacAddr) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::Address(mac.octets().to_vec()));
        self.ack(RouteNetlinkMessage::SetLink(msg), 0, || {
            format!("ip link set ifindex {index} address {mac}")
        })
        .await
    }
}

fn describe_vxlan_add(spec: &VxlanSpec) -> String {
    let mut s = format!("ip link add {}", spec.name);
    if let Some(mac) = spec.mac {
        s.push_str(&format!(" address {mac}"));
    }
    if let Some(mtu) = spec.mtu {
        s.push_str(&format!(" mtu {mtu}"));
    }
    s.push_str(&format!(" type vxlan id {}", spec.vni));
    if let Some(local) = spec.local {
        s.push_str(&format!(" local {local}"));
    }
    if let Some(parent) = spec.parent {
        s.push_str(&format!(" dev ifindex {parent}"));
    }
    if spec.port > 0 {
        s.push_str(&format!(" dstport {}", spec.port));
    }
    s.push_str(if spec.learning {
        " learning"
    } else {
        " nolearning"
    });
    if spec.gbp {
        s.push_str(" gbp");
    }
    s
}

pub(super) fn unexpected(op: String, msg: &RouteNetlinkMessage) -> NetlinkError {
    NetlinkError::Unexpected {
        op,
        detail: format!("message type {}", msg.message_type()),
    }
}

/// Extracts the parts of a link message this crate uses.
pub(super) fn parse_link(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
        lower_up: m.header.flags.contains(LinkFlags::LowerUp),
        vxlan: None,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            LinkAttribute::Address(bytes) => {
                if let Ok(b) = <[u8; 6]>::try_from(bytes.as_slice()) {
                    link.mac = Some(MacAddr(b));
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            link.vxlan = Some(parse_vxlan(data));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn parse_vxlan(data: &[InfoVxlan]) -> VxlanAttrs {
    let mut v = VxlanAttrs::default();
    for d in data {
        match d {
            InfoVxlan::Id(id) => v.vni = Some(*id),
            InfoVxlan::Link(i) => v.parent = Some(*i),
            InfoVxlan::Local(a) => v.local = Some(IpAddr::V4(*a)),
            InfoVxlan::Local6(a) => v.local = Some(IpAddr::V6(*a)),
            InfoVxlan::Group(a) => v.group = Some(IpAddr::V4(*a)),
            InfoVxlan::Group6(a) => v.group = Some(IpAddr::V6(*a)),
            InfoVxlan::Port(p) => v.port = Some(*p),
            InfoVxlan::Learning(l) => v.learning = Some(*l),
            InfoVxlan::L2Miss(l) => v.l2miss = Some(*l),
            InfoVxlan::Gbp => v.gbp = true,
            _ => {}
        }
    }
    // The kernel reports unset addresses as all-zero; treat them as absent.
    if v.local.is_some_and(|a| a.is_unspecified()) {
        v.local = None;
    }
    if v.group.is_some_and(|a| a.is_unspecified()) {
        v.group = None;
    }
    v
}

#[cfg(test)]
impl VxlanSpec {
    /// flannel.1 on ifindex 2 from 198.18.0.1, MTU 1450: the device the unit tests describe.
    pub(crate) fn example() -> VxlanSpec {
        VxlanSpec {
            name: "flannel.1".into(),
            vni: 1,
            parent: Some(2),
            local: Some("198.18.0.1".parse().unwrap()),
            port: 0,
            learning: false,
            gbp: false,
            mtu: Some(1450),
            mac: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_matches_iproute2_shape() {
        let spec = VxlanSpec {
            mac: Some("02:11:22:33:44:55".parse().unwrap()),
            ..VxlanSpec::example()
        };
        assert_eq!(
            describe_vxlan_add(&spec),
            "ip link add flannel.1 address 02:11:22:33:44:55 mtu 1450 type vxlan id 1 \
             local 198.18.0.1 dev ifindex 2 nolearning"
        );
    }

    #[test]
    fn parse_vxlan_attrs() {
        let v = parse_vxlan(&[
            InfoVxlan::Id(7),
            InfoVxlan::Link(3),
            InfoVxlan::Local("198.18.0.1".parse().unwrap()),
            InfoVxlan::Group("0.0.0.0".parse().unwrap()),
            InfoVxlan::Port(8472),
            InfoVxlan::Learning(false),
            InfoVxlan::Gbp,
        ]);
        assert_eq!(v.vni, Some(7));
        assert_eq!(v.parent, Some(3));
        assert_eq!(v.local, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(v.group, None);
        assert_eq!(v.port, Some(8472));
        assert_eq!(v.learning, Some(false));
        assert!(v.gbp);
    }
}
