//! Addresses: `ip addr show/add/del`.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use super::{IpFamily, Netlink, NetlinkError};

impl Netlink {
    /// `ip -4|-6 addr show dev <index>`: the addresses (with prefix) of one device.
    pub async fn addr_list(
        &self,
        index: u32,
        family: IpFamily,
    ) -> Result<Vec<IpNet>, NetlinkError> {
        Ok(self
            .addr_dump(family, || {
                format!("ip {} addr show ifindex {index}", family.ip_flag())
            })
            .await?
            .into_iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, net)| net)
            .collect())
    }

    /// `ip -4|-6 addr show`: (device index, address with prefix) of every device, in the
    /// kernel's order.
    pub(super) async fn addr_dump(
        &self,
        family: IpFamily,
        op: impl Fn() -> String,
    ) -> Result<Vec<(u32, IpNet)>, NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family.address_family();
        let msgs = self.dump(RouteNetlinkMessage::GetAddress(msg), op).await?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IPv4 reports the interface address in IFA_LOCAL (IFA_ADDRESS is the peer on
            // point-to-point links); IPv6 only sends IFA_ADDRESS.
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                if IpFamily::of(ip) == family {
                    if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                        out.push((a.header.index, net));
                    }
                }
            }
        }
        Ok(out)
    }

    /// `ip addr add <addr>/<len> dev <index>`. Fails with EEXIST if present.
    pub async fn addr_add(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::NewAddress(addr_msg(index, addr)),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("ip addr add {addr} dev ifindex {index}"),
        )
        .await
    }

    /// `ip addr del <addr>/<len> dev <index>`.
    pub async fn addr_del(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::DelAddress(addr_msg(index, addr)),
            0,
            || format!("ip addr del {addr} dev ifindex {index}"),
        )
        .await
    }
}

fn addr_msg(index: u32, addr: IpNet) -> AddressMessage {
    let ip: IpAddr = addr.addr();
    let mut msg = AddressMessage::default();
    msg.header.family = IpFamily::of(ip).address_family();
    msg.header.prefix_len = addr.prefix_len();
    msg.header.index = index;
    // Same pair iproute2 sends: IFA_LOCAL and IFA_ADDRESS both the address.
    msg.attributes.push(AddressAttribute::Local(ip));
    msg.attributes.push(AddressAttribute::Address(ip));
    msg
}
