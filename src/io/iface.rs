//! Interface discovery: names, indexes, MTUs and addresses of the current namespace.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// One address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// A network interface of the current namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Kernel name.
    pub name: String,
    /// Kernel index.
    pub index: u32,
    /// MTU in bytes.
    pub mtu: u32,
    /// Addresses in the order the kernel lists them.
    pub addrs: Vec<IfAddr>,
}

/// Lists interfaces with their addresses.
pub fn interfaces() -> io::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let idx = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                out.push(Interface {
                    index: index_of(&name).unwrap_or(0),
                    mtu: mtu_of(&name).unwrap_or(0),
                    name,
                    addrs: Vec::new(),
                });
                out.len() - 1
            }
        };
        // SAFETY: address pointers, when non-null, point at sockaddrs of the family they name.
        let (addr, mask) = unsafe { (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask)) };
        if let Some(addr) = addr {
            let prefix_len = mask.map(prefix_of).unwrap_or(0);
            out[idx].addrs.push(IfAddr { addr, prefix_len });
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The interface whose addresses include `ip`.
pub fn interface_with_addr(ip: IpAddr) -> io::Result<Option<Interface>> {
    Ok(interfaces()?
        .into_iter()
        .find(|i| i.addrs.iter().any(|a| a.addr == ip)))
}

/// The interface of the IPv4 default route (first default route in the main table), read
/// from `/proc/net/route` of the current namespace.
pub fn default_route_interface_v4() -> io::Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/net/route")?;
    Ok(parse_default_route(&text))
}

fn parse_default_route(text: &str) -> Option<String> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
    })
}

/// The source address the kernel would use to reach `dst` (like the `src` of
/// `ip route get <dst>`); connecting a UDP socket sends nothing.
pub fn source_for(dst: IpAddr) -> io::Result<IpAddr> {
    let bind: SocketAddr = match dst {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind)?;
    s.connect((dst, 9))?;
    Ok(s.local_addr()?.ip())
}

/// The kernel index of interface `name`.
pub fn index_of(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

/// The MTU of interface `name`.
pub fn mtu_of(name: &str) -> io::Result<u32> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    // SAFETY: creating a datagram socket has no preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours; OwnedFd closes it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU fills the ifreq union's mtu member; `req` is valid for the call.
    if unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFMTU,
            &mut req,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFMTU the union holds the MTU.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// # Safety
/// `sa` is null or points at a sockaddr whose family field tells its real type.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match (*sa).sa_family as libc::c_int {
        libc::AF_INET => {
            let sin = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

fn prefix_of(mask: IpAddr) -> u8 {
    match mask {
        IpAddr::V4(m) => u32::from(m).count_ones() as u8,
        IpAddr::V6(m) => u128::from(m).count_ones() as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_with_its_address() {
        let ifs = interfaces().unwrap();
        let lo = ifs.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.index > 0 && lo.mtu > 0);
        assert!(lo
            .addrs
            .iter()
            .any(|a| a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST) && a.prefix_len == 8));
    }

    #[test]
    fn default_route_parsing() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                    eth1\t00000A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                    eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(parse_default_route(text).as_deref(), Some("eth0"));
        assert_eq!(parse_default_route("Iface\n"), None);
    }
}
