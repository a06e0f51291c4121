//! The node both fuzz targets pretend to be: 10.244.1.0/24 with VNI 1, peers in
//! 10.244.0.0/16 (several prefix lengths) and fd10:244::/48 (some reached over IPv4, some over
//! IPv6 only).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use flannel_core::dataplane::{LocalVtep, PeerTable, RemoteVtep};
use flannel_core::wire::MacAddr;
use ipnet::IpNet;

pub const LOCAL_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);

pub fn local() -> LocalVtep {
    LocalVtep {
        vni: 1,
        mac: LOCAL_MAC,
        addr_v4: Some(Ipv4Addr::new(10, 244, 1, 0)),
        addr_v6: Some("fd10:244:1::".parse().unwrap()),
        error_source_v4: Some(Ipv4Addr::new(10, 244, 0, 0)),
        error_source_v6: None,
        subnet_v4: Some("10.244.1.0/24".parse().unwrap()),
        subnet_v6: Some("fd10:244:1::/64".parse().unwrap()),
    }
}

/// Peers 7 and up have only an IPv6 public address (IPv6 outer transport).
pub fn peer_ip(i: u8) -> IpAddr {
    if i >= 7 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, u16::from(i)))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, i))
    }
}

/// Built once per process: rebuilding it per input would dominate the run time.
pub fn table() -> &'static PeerTable {
    static TABLE: OnceLock<PeerTable> = OnceLock::new();
    TABLE.get_or_init(build_table)
}

fn build_table() -> PeerTable {
    let entry = |net: &str, i: u8| {
        (
            net.parse::<IpNet>().unwrap(),
            RemoteVtep { public_ip: peer_ip(i), mac: MacAddr([2, 0, 0, 0, 1, i]), vni: 1 },
        )
    };
    PeerTable::new([
        entry("10.244.2.0/24", 2),
        entry("10.244.3.0/24", 3),
        entry("10.244.3.128/25", 4),
        entry("10.245.0.0/16", 5),
        entry("fd10:244:2::/64", 6),
        entry("fd10:244:3::/64", 7),
        entry("fd10:244:4::/64", 8),
    ])
}
