//! Lease fixtures the store tests share: node `n`'s VTEP MAC and vxlan lease attributes.

use std::net::Ipv4Addr;

use flannel_rs::lease::{LeaseAttrs, VxlanBackendData};
use flannel_rs::wire::MacAddr;
use ipnet::Ipv4Net;

/// The net-conf most store tests use.
pub const VXLAN_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Node `n`'s VTEP MAC in its `generation`-th incarnation (locally administered).
pub fn mac(n: u8, generation: u8) -> MacAddr {
    MacAddr([0x0e, 0x00, 0x00, 0x00, generation, n])
}

/// flannel's vxlan `backend-data` JSON for VNI 1 and `mac`.
pub fn vxlan_data_json(mac: MacAddr) -> String {
    VxlanBackendData {
        vni: 1,
        vtep_mac: mac,
    }
    .to_json()
}

/// vxlan lease attributes (VNI 1) with this public IP and VTEP MAC.
pub fn vxlan_attrs(public_ip: Ipv4Addr, vtep_mac: MacAddr) -> LeaseAttrs {
    LeaseAttrs {
        public_ip,
        backend_type: "vxlan".into(),
        backend_data: Some(VxlanBackendData { vni: 1, vtep_mac }.to_raw()),
        ..LeaseAttrs::default()
    }
}

/// Node `n`'s lease attributes: public IP 198.51.100.`n`, vxlan with [`mac`]`(n, generation)`.
pub fn attrs(n: u8, generation: u8) -> LeaseAttrs {
    vxlan_attrs(Ipv4Addr::new(198, 51, 100, n), mac(n, generation))
}

/// Parses an IPv4 prefix; panics on a typo in the test.
pub fn net(s: &str) -> Ipv4Net {
    s.parse().expect("net")
}
