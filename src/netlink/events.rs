//! Link notifications: `ip monitor link`.

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;

use super::link::{parse_link, Link};
use super::{AbortOnDrop, NetlinkError};

/// One link notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// `RTM_NEWLINK`: a link appeared or changed.
    New(Link),
    /// `RTM_DELLINK`: a link was deleted.
    Del(Link),
}

/// A subscription to the `RTNLGRP_LINK` multicast group (`ip monitor link`) in the network
/// namespace of the thread that subscribed.
#[derive(Debug)]
pub struct LinkEvents {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    _driver: AbortOnDrop,
}

impl LinkEvents {
    /// Subscribes; needs a running tokio runtime.
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (conn, _handle, rx) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(NetlinkError::Socket)?;
        let driver = rt.spawn(conn);
        Ok(LinkEvents {
            rx,
            _driver: AbortOnDrop(driver),
        })
    }

    /// The next link event; `None` when the subscription ended. Cancel-safe.
    pub async fn next(&mut self) -> Option<LinkEvent> {
        loop {
            let (msg, _) = self.rx.next().await?;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    return Some(LinkEvent::New(parse_link(&l)))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    return Some(LinkEvent::Del(parse_link(&l)))
                }
                _ => continue,
            }
        }
    }
}
