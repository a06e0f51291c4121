//! The IPv6 default route's interface (`/proc/net/ipv6_route`), for external interface
//! selection on dual-stack and IPv6-only nodes.

use std::io;

/// `RTF_REJECT`: an unreachable/prohibit route (the kernel's `lo` default), not a way out.
const RTF_REJECT: u32 = 0x0200;

/// The interface of the first usable IPv6 default route (`::/0`) of this namespace.
pub fn default_route_interface_v6() -> io::Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/net/ipv6_route")?;
    Ok(parse_default_route_v6(&text))
}

/// Lines are `dst dst_len src src_len nexthop metric refcnt use flags iface` (hex fields).
fn parse_default_route_v6(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (flags, name) = (f.get(8)?, *f.get(9)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
        (default && flags & RTF_REJECT == 0 && name != "lo").then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_v6_parsing() {
        let text = "20010db8001800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth1\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8001800000000000000000001 00000400 00000001 00000000 00000003 eth0\n";
        assert_eq!(parse_default_route_v6(text).as_deref(), Some("eth0"));
        assert_eq!(parse_default_route_v6(""), None);
        assert_eq!(parse_default_route_v6("garbage\n"), None);
    }
}
