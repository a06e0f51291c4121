//! rtnetlink in iproute2 vocabulary: links, addresses, neighbours, FDB entries and routes, and
//! the interface lookups built on them (every interface with its addresses, the default route's
//! device).
//!
//! Every method of [`Netlink`] says which `ip …` / `bridge …` command it equals. Requests are
//! built directly as `netlink-packet-route` messages and sent over one `rtnetlink` connection,
//! so the exact attribute set is visible here (flannel's kernel programming is the contract).
//!
//! A [`Netlink`] handle talks to the network namespace of the thread that called
//! [`Netlink::connect`]: the socket stays bound to that namespace wherever its driver task runs.
//! [`set_accept_ra`] (a `/proc/sys` write) uses the namespace of the calling thread.

mod addr;
mod events;
mod iface;
mod link;
mod neigh;
mod route;
mod tun;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use ipnet::IpNet;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};

pub use events::{LinkEvent, LinkEvents};
pub use iface::Interface;
pub use link::{Link, VxlanAttrs, VxlanSpec};
pub use neigh::{FdbEntry, Neighbour};
pub use route::{Route, RouteProtocol, RouteScope, RouteType, RT_TABLE_MAIN};
pub use tun::TunReport;

/// How many times a dump interrupted by a concurrent change (`NLM_F_DUMP_INTR`) is retried.
const DUMP_RETRIES: usize = 3;

/// An address family as data, so IPv4 and IPv6 share one code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4 (`AF_INET`).
    V4,
    /// IPv6 (`AF_INET6`).
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: IpNet) -> Self {
        IpFamily::of(net.addr())
    }

    /// Host prefix length: 32 or 128.
    pub fn max_prefix_len(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    /// `-4` / `-6`, as iproute2 spells the family option.
    pub fn ip_flag(self) -> &'static str {
        match self {
            IpFamily::V4 => "-4",
            IpFamily::V6 => "-6",
        }
    }

    fn address_family(self) -> netlink_packet_route::AddressFamily {
        match self {
            IpFamily::V4 => netlink_packet_route::AddressFamily::Inet,
            IpFamily::V6 => netlink_packet_route::AddressFamily::Inet6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// Why a netlink operation failed. `op` is the equivalent iproute2 command.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// There is no tokio runtime to drive the netlink socket.
    #[error("netlink needs a running tokio runtime")]
    NoRuntime,
    /// The rtnetlink socket could not be opened or bound.
    #[error("opening rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused the request; `errno` is the positive error number (EEXIST, ENOENT…).
    #[error("{op}: {source}")]
    Kernel {
        /// The equivalent command.
        op: String,
        /// Positive errno.
        errno: i32,
        /// The errno as an I/O error (for its message).
        #[source]
        source: io::Error,
    },
    /// The connection driver stopped before the kernel answered.
    #[error("{op}: netlink connection closed")]
    Closed {
        /// The equivalent command.
        op: String,
    },
    /// The kernel answered with a message this module cannot use.
    #[error("{op}: unexpected answer from the kernel: {detail}")]
    Unexpected {
        /// The equivalent command.
        op: String,
        /// What was wrong.
        detail: String,
    },
    /// The request itself is invalid (for example an interface name too long).
    #[error("{op}: {detail}")]
    Invalid {
        /// The equivalent command.
        op: String,
        /// What was wrong.
        detail: String,
    },
}

impl NetlinkError {
    /// The positive errno for kernel refusals.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Socket(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// True when the object already exists (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// True when the object does not exist (`ENOENT`, `ESRCH` for routes, `ENODEV` for links).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENODEV)
        )
    }

    fn kernel(op: String, errno: i32) -> Self {
        NetlinkError::Kernel {
            op,
            errno,
            source: io::Error::from_raw_os_error(errno),
        }
    }
}

/// Aborts the connection driver when the last [`Netlink`] clone goes away.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An rtnetlink connection. Cheap to clone; all clones share one socket.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    _driver: Arc<AbortOnDrop>,
}

impl Netlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace and spawns its
    /// driver on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (mut conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        // Deliver ACKs, so that a request's stream ending without one means a lost connection.
        conn.set_forward_ack(true);
        let driver = rt.spawn(conn);
        Ok(Netlink {
            handle,
            _driver: Arc::new(AbortOnDrop(driver)),
        })
    }

    /// Sends a request that the kernel acknowledges (`NLM_F_ACK`) and waits for the answer.
    async fn ack(
        &self,
        msg: RouteNetlinkMessage,
        extra_flags: u16,
        op: impl FnOnce() -> String,
    ) -> Result<(), NetlinkError> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
        let mut handle = self.handle.clone();
        let Ok(mut answers) = handle.request(req) else {
            return Err(NetlinkError::Closed { op: op() });
        };
        while let Some(answer) = answers.next().await {
            if let NetlinkPayload::Error(e) = answer.payload {
                return match e.code {
                    None => Ok(()),
                    Some(code) => Err(NetlinkError::kernel(op(), code.get().saturating_abs())),
                };
            }
        }
        Err(NetlinkError::Closed { op: op() })
    }

    /// Sends a request answered by exactly one message (for example `RTM_GETLINK` by name).
    async fn get_one(
        &self,
        msg: RouteNetlinkMessage,
        op: impl FnOnce() -> String,
    ) -> Result<RouteNetlinkMessage, NetlinkError> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let Ok(mut answers) = handle.request(req) else {
            return Err(NetlinkError::Closed { op: op() });
        };
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(m) => return Ok(m),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(NetlinkError::kernel(op(), code.get().saturating_abs()));
                    }
                }
                _ => {}
            }
        }
        Err(NetlinkError::Closed { op: op() })
    }

    /// Sends a dump request and collects every answer; retries when the kernel says the dump
    /// was interrupted by a concurrent change.
    async fn dump(
        &self,
        msg: RouteNetlinkMessage,
        op: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = NetlinkMessage::from(msg.clone());
            req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut handle = self.handle.clone();
            let Ok(mut answers) = handle.request(req) else {
                return Err(NetlinkError::Closed { op: op() });
            };
            let mut out = Vec::new();
            let mut interrupted = false;
            while let Some(answer) = answers.next().await {
                if answer.header.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match answer.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(NetlinkError::kernel(op(), code.get().saturating_abs()));
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(NetlinkError::Unexpected {
                            op: op(),
                            detail: "receive buffer overrun".into(),
                        })
                    }
                    _ => {}
                }
            }
            if !interrupted || attempt > DUMP_RETRIES {
                return Ok(out);
            }
            tracing::debug!(op = %op(), "netlink dump interrupted, retrying");
        }
    }
}

/// `sysctl -w net.ipv6.conf.<ifname>.accept_ra=<value>`, through `/proc/sys` in the calling
/// thread's network namespace. Fails with `NotFound` when IPv6 is disabled.
pub fn set_accept_ra(ifname: &str, value: u8) -> io::Result<()> {
    check_ifname(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra"),
        format!("{value}\n"),
    )
}

/// `sysctl net.ipv6.conf.<ifname>.accept_ra`.
pub fn accept_ra(ifname: &str) -> io::Result<u8> {
    check_ifname(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let s = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra"))?;
    s.trim()
        .parse::<i32>()
        .map(|v| v.clamp(0, 255) as u8)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Linux interface names: 1..=15 bytes, no `/`, no NUL, no whitespace, not `.` or `..`.
pub(crate) fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(format!("invalid interface name {name:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        assert!(check_ifname("flannel.1").is_ok());
        assert!(check_ifname("flannel-v6.4096").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("..").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("0123456789abcdef").is_err());
    }

    #[test]
    fn error_classes() {
        let e = NetlinkError::kernel("ip link add".into(), libc::EEXIST);
        assert!(e.is_exists());
        assert!(!e.is_not_found());
        assert_eq!(e.errno(), Some(libc::EEXIST));
        let e = NetlinkError::kernel("ip route del".into(), libc::ESRCH);
        assert!(e.is_not_found());
        assert!(e.to_string().starts_with("ip route del: "));
    }

    #[test]
    fn families() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(IpFamily::of(v6), IpFamily::V6);
        assert_eq!(IpFamily::V6.max_prefix_len(), 128);
        assert_eq!(
            IpFamily::of_net("10.0.0.0/8".parse().unwrap()),
            IpFamily::V4
        );
    }
}
