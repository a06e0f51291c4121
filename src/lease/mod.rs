//! Leases: which node owns which pod subnet, and how to reach it.
//!
//! The JSON and key formats are upstream flannel's (`pkg/lease/lease.go`, `pkg/subnet/subnet.go`,
//! compat §6.1) byte for byte, because etcd data and directory-store files are shared with
//! upstream nodes: [`LeaseAttrs`] is the etcd value, [`SubnetKey`] the last key segment.
//! [`watcher`] turns store snapshots and events into add/remove events for the backends;
//! [`store`] is the store interface; the stores are [`dir`] (a local directory), `etcd` and
//! `kube` (the Kubernetes API; both behind their cargo features), with the subnet choice the
//! directory and etcd stores share in `alloc`; [`annotations`] parses Kubernetes node
//! annotations into leases.

pub(crate) mod alloc;
pub mod annotations;
pub mod dir;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "kube")]
pub mod kube;
#[cfg(feature = "kube")]
pub mod kube_error;
mod open;
pub mod store;
pub mod watcher;

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;

use crate::config::gojson::{self, FieldError};
use crate::wire::MacAddr;

pub use dir::DirStore;
pub use open::{open, OpenError};
pub use store::{LeaseStore, StoreError, WatchUpdate};
pub use watcher::LeaseWatcher;

/// One node's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node's IPv4 pod subnet.
    pub subnet: Option<Ipv4Net>,
    /// The node's IPv6 pod subnet.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// What peers need to reach the node.
    pub attrs: LeaseAttrs,
    /// When the store drops the lease unless renewed; `None` for stores without TTLs.
    pub expiration: Option<SystemTime>,
    /// The Kubernetes node holding the lease (kube store), so messages can name it; not part
    /// of flannel's lease JSON.
    pub node: Option<String>,
}

impl Lease {
    /// The store key, if the lease has a subnet (an IPv6-only lease's key carries upstream's
    /// `0.0.0.0-0` placeholder).
    pub fn key(&self) -> Option<SubnetKey> {
        SubnetKey::new(self.subnet, self.ipv6_subnet)
    }

    /// The lease stored at `key` with `attrs` (no node name).
    pub fn at_key(key: SubnetKey, attrs: LeaseAttrs, expiration: Option<SystemTime>) -> Lease {
        Lease {
            subnet: key.ipv4_subnet(),
            ipv6_subnet: key.ipv6,
            attrs,
            expiration,
            node: None,
        }
    }

    /// A lease from an etcd-style key (the last segment, or a whole key path) and JSON value.
    pub fn from_kv(key: &str, value: &str) -> Result<Lease, LeaseError> {
        let k: SubnetKey = key.parse()?;
        let attrs = LeaseAttrs::from_json(value).map_err(|source| LeaseError::Attrs {
            key: k.to_string(),
            source,
        })?;
        Ok(Lease::at_key(k, attrs, None))
    }

    /// True when subnets and attributes match (expiration ignored): the lease would program the
    /// same peer state.
    pub fn same_content(&self, other: &Lease) -> bool {
        self.subnet == other.subnet
            && self.ipv6_subnet == other.ipv6_subnet
            && self.attrs == other.attrs
    }
}

/// A change to the set of leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease appeared or changed (it replaces any lease with the same subnets).
    Added(Lease),
    /// A lease disappeared (carries its last known contents).
    Removed(Lease),
}

impl LeaseEvent {
    /// The lease the event is about.
    pub fn lease(&self) -> &Lease {
        match self {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) => l,
        }
    }
}

/// A lease's attributes: the etcd value / directory-store file, flannel's `LeaseAttrs`.
///
/// Serialised as `{"PublicIP":…,"PublicIPv6":…,"BackendType":…,"BackendData":…,"BackendV6Data":…}`
/// in that order: `PublicIP` always (`"0.0.0.0"` when unset), `PublicIPv6` always (`null` when
/// unset), the rest only when set. Backend data is kept as raw JSON so it round-trips byte for
/// byte (`"BackendData":null`, as written by kube-mode leases, stays `null`).
#[derive(Debug, Clone)]
pub struct LeaseAttrs {
    /// `PublicIP`: the node's IPv4 underlay address.
    pub public_ip: Ipv4Addr,
    /// `PublicIPv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `BackendType` (`vxlan`, `host-gw`, ...); empty is omitted.
    pub backend_type: String,
    /// `BackendData`, raw.
    pub backend_data: Option<Box<RawValue>>,
    /// `BackendV6Data`, raw.
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl Default for LeaseAttrs {
    fn default() -> Self {
        LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }
}

fn raw_eq(a: &Option<Box<RawValue>>, b: &Option<Box<RawValue>>) -> bool {
    a.as_ref().map(|r| r.get()) == b.as_ref().map(|r| r.get())
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw_eq(&self.backend_data, &other.backend_data)
            && raw_eq(&self.backend_v6_data, &other.backend_v6_data)
    }
}

impl Eq for LeaseAttrs {}

/// Why lease attributes (or backend data) could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrsError {
    /// Not JSON, or not a JSON object.
    #[error("{0}")]
    Syntax(String),
    /// A field holds a value of the wrong type or an unparsable address.
    #[error("{field} {value} is not {expected}")]
    Field {
        /// Field name (`PublicIP`, `BackendData.VtepMAC`, ...).
        field: String,
        /// The offending JSON text (shortened).
        value: String,
        /// What the field accepts.
        expected: String,
    },
    /// A required field is absent.
    #[error("{0} is missing")]
    Missing(String),
}

impl From<FieldError> for AttrsError {
    fn from(e: FieldError) -> Self {
        AttrsError::Field {
            field: e.field,
            value: e.value,
            expected: e.expected,
        }
    }
}

/// Why a stored lease could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The key is not `a.b.c.d-len` or `a.b.c.d-len&ipv6-len`.
    #[error("invalid subnet key {0:?}: want a.b.c.d-len or a.b.c.d-len&ipv6-len")]
    Key(String),
    /// The value does not decode.
    #[error("lease {key}: {source}")]
    Attrs {
        /// The lease key.
        key: String,
        /// What is wrong with the value.
        #[source]
        source: AttrsError,
    },
}

impl LeaseAttrs {
    /// Whether a stored lease with these attributes is the one of the node with `ours`: the
    /// same `PublicIP`, or on an IPv6-only node (`PublicIP` 0.0.0.0, as on every IPv6-only
    /// lease) the same `PublicIPv6`. Upstream compares `PublicIP` alone (`findLeaseByIP`),
    /// which on an IPv6-only node matches the first IPv6-only lease of any node.
    pub fn same_node(&self, ours: &LeaseAttrs) -> bool {
        if ours.public_ip.is_unspecified() {
            ours.public_ipv6.is_some() && self.public_ipv6 == ours.public_ipv6
        } else {
            self.public_ip == ours.public_ip
        }
    }

    /// Decodes flannel's lease JSON (Go semantics: keys case-insensitive, unknown keys ignored).
    pub fn from_json(json: &str) -> Result<LeaseAttrs, AttrsError> {
        let mut attrs = LeaseAttrs::default();
        let members = match gojson::parse_object(json) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(attrs),
            Err(e) => return Err(AttrsError::Syntax(e.to_string())),
        };
        for (key, raw) in members {
            let k = |name: &str| gojson::key_matches(&key, name);
            if k("PublicIP") {
                attrs.public_ip = match gojson::string_value("PublicIP", &raw) {
                    Ok(Some(s)) => parse_ipv4(&s),
                    _ => None,
                }
                .ok_or_else(|| FieldError::new("PublicIP", raw.get(), "an IPv4 address"))?;
            } else if k("PublicIPv6") {
                attrs.public_ipv6 = match gojson::string_value("PublicIPv6", &raw) {
                    Ok(None) => None,
                    Ok(Some(s)) => Some(s.parse::<Ipv6Addr>().map_err(|_| {
                        FieldError::new("PublicIPv6", raw.get(), "an IPv6 address")
                    })?),
                    Err(_) => {
                        return Err(
                            FieldError::new("PublicIPv6", raw.get(), "an IPv6 address").into()
                        )
                    }
                };
            } else if k("BackendType") {
                if let Some(s) = gojson::string_value("BackendType", &raw)? {
                    attrs.backend_type = s;
                }
            } else if k("BackendData") {
                attrs.backend_data = Some(raw);
            } else if k("BackendV6Data") {
                attrs.backend_v6_data = Some(raw);
            }
        }
        Ok(attrs)
    }

    /// Encodes exactly as Go's `json.Marshal(LeaseAttrs)` does.
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"PublicIP\":\"{}\",\"PublicIPv6\":", self.public_ip);
        match self.public_ipv6 {
            Some(a) => out.push_str(&format!("\"{a}\"")),
            None => out.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            out.push_str(",\"BackendType\":");
            out.push_str(&go_json_string(&self.backend_type));
        }
        if let Some(d) = &self.backend_data {
            out.push_str(",\"BackendData\":");
            out.push_str(d.get());
        }
        if let Some(d) = &self.backend_v6_data {
            out.push_str(",\"BackendV6Data\":");
            out.push_str(d.get());
        }
        out.push('}');
        out
    }

    /// The IPv4 vxlan backend data, if any (`None` when absent or `null`).
    pub fn vxlan_data(&self) -> Result<Option<VxlanBackendData>, AttrsError> {
        decode_vxlan("BackendData", self.backend_data.as_deref())
    }

    /// The IPv6 vxlan backend data, if any.
    pub fn vxlan_v6_data(&self) -> Result<Option<VxlanBackendData>, AttrsError> {
        decode_vxlan("BackendV6Data", self.backend_v6_data.as_deref())
    }
}

fn decode_vxlan(
    field: &str,
    raw: Option<&RawValue>,
) -> Result<Option<VxlanBackendData>, AttrsError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => VxlanBackendData::parse(field, r.get()).map(Some),
    }
}

/// Go's `ip.ParseIP4`: dotted IPv4, or an IPv4-mapped IPv6 address.
fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// A JSON string literal as Go's encoder writes it (HTML-safe escapes included).
fn go_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)))
            }
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// vxlan `BackendData`: `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}` (flannel's `vxlanLeaseAttrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanBackendData {
    /// `VNI`.
    pub vni: u32,
    /// `VtepMAC`: the remote vxlan device's MAC.
    pub vtep_mac: MacAddr,
}

impl VxlanBackendData {
    /// Decodes backend data (keys case-insensitive; `VNI` defaults to 0, `VtepMAC` required).
    pub fn from_json(json: &str) -> Result<VxlanBackendData, AttrsError> {
        Self::parse("BackendData", json)
    }

    fn parse(field: &str, json: &str) -> Result<VxlanBackendData, AttrsError> {
        let members = match gojson::parse_object(json) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(AttrsError::Missing(format!("{field}.VtepMAC"))),
            Err(e) => return Err(AttrsError::Syntax(format!("{field}: {e}"))),
        };
        let mut vni = 0u32;
        let mut mac = None;
        for (key, raw) in members {
            if gojson::key_matches(&key, "VNI") {
                let name = format!("{field}.VNI");
                if let Some(v) = gojson::uint_value(&name, &raw)? {
                    vni = u32::try_from(v).map_err(|_| {
                        FieldError::new(&name, raw.get(), "a 32-bit unsigned integer")
                    })?;
                }
            } else if gojson::key_matches(&key, "VtepMAC") {
                let name = format!("{field}.VtepMAC");
                let parsed = match gojson::string_value(&name, &raw) {
                    Ok(Some(s)) => s.parse::<MacAddr>().ok(),
                    _ => None,
                };
                mac =
                    Some(parsed.ok_or_else(|| FieldError::new(&name, raw.get(), "a MAC address"))?);
            }
        }
        let vtep_mac = mac.ok_or_else(|| AttrsError::Missing(format!("{field}.VtepMAC")))?;
        Ok(VxlanBackendData { vni, vtep_mac })
    }

    /// Encodes exactly as flannel does.
    pub fn to_json(&self) -> String {
        format!("{{\"VNI\":{},\"VtepMAC\":\"{}\"}}", self.vni, self.vtep_mac)
    }

    /// The encoding as a raw JSON value, ready for [`LeaseAttrs::backend_data`].
    pub fn to_raw(&self) -> Box<RawValue> {
        RawValue::from_string(self.to_json()).unwrap_or_default()
    }
}

/// A lease key: `10.244.1.0-24`, dual-stack `10.244.1.0-24&fd00:12:13::-56`, or IPv6-only
/// `0.0.0.0-0&fd00:12:13::-56` (upstream's `MakeSubnetKey` writes the empty IPv4 net).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    /// The IPv4 subnet (always present in flannel's keys; `0.0.0.0/0` means none).
    pub ipv4: Ipv4Net,
    /// The IPv6 subnet of a dual-stack or IPv6-only lease.
    pub ipv6: Option<Ipv6Net>,
}

/// The IPv4 part of an IPv6-only key (Go's zero `ip.IP4Net`).
const NO_IPV4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0);

impl SubnetKey {
    /// The key for these subnets; `None` when there are none.
    pub fn new(ipv4: Option<Ipv4Net>, ipv6: Option<Ipv6Net>) -> Option<SubnetKey> {
        (ipv4.is_some() || ipv6.is_some()).then_some(SubnetKey {
            ipv4: ipv4.unwrap_or(NO_IPV4),
            ipv6,
        })
    }

    /// The IPv4 subnet, `None` for an IPv6-only key (IPv4 part `0.0.0.0-0`).
    pub fn ipv4_subnet(&self) -> Option<Ipv4Net> {
        (self.ipv4 != NO_IPV4).then_some(self.ipv4)
    }
}

/// flannel's key pattern (`subnetRegex`), ASCII digits as in Go. Unanchored at the start, so
/// a whole etcd key path parses too; the two unescaped dots are upstream's.
static KEY_RE: LazyLock<Option<regex::Regex>> = LazyLock::new(|| {
    regex::Regex::new(r"([0-9]+\.[0-9]+.[0-9]+.[0-9]+)-([0-9]+)(?:&([a-f0-9:]+)-([0-9]+))?$").ok()
});

impl FromStr for SubnetKey {
    type Err = LeaseError;

    /// Parses like flannel's `ParseSubnetKey`: IPv4 prefix 0..=31, IPv6 prefix 0..=127 (Go's
    /// `ParseUint` bit sizes). Host bits are cleared (upstream keeps them; nobody writes them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LeaseError::Key(gojson::shorten(s));
        let caps = KEY_RE
            .as_ref()
            .and_then(|re| re.captures(s))
            .ok_or_else(err)?;
        let group = |i: usize| caps.get(i).map(|m| m.as_str());
        let v4: Ipv4Addr = group(1).and_then(|t| t.parse().ok()).ok_or_else(err)?;
        let len4 = group(2)
            .and_then(|t| t.parse::<u8>().ok())
            .filter(|&l| l < 32)
            .ok_or_else(err)?;
        let ipv4 = Ipv4Net::new(v4, len4).map_err(|_| err())?.trunc();
        let ipv6 = match group(3) {
            None => None,
            Some(t) => {
                let v6: Ipv6Addr = t.parse().map_err(|_| err())?;
                let len6 = group(4)
                    .and_then(|t| t.parse::<u8>().ok())
                    .filter(|&l| l < 128)
                    .ok_or_else(err)?;
                Some(Ipv6Net::new(v6, len6).map_err(|_| err())?.trunc())
            }
        };
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.addr(), self.ipv4.prefix_len())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.addr(), v6.prefix_len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETCD_EXAMPLE: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    #[test]
    fn attrs_round_trip_bytes() {
        let a = LeaseAttrs::from_json(ETCD_EXAMPLE).expect("parses");
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(a.to_json(), ETCD_EXAMPLE);
        let d = a.vxlan_data().expect("ok").expect("present");
        assert_eq!(d.vni, 1);
        assert_eq!(d.vtep_mac.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!(d.to_json(), r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#);
        for s in [
            r#"{"PublicIP":"203.0.113.5","PublicIPv6":null,"BackendType":"host-gw"}"#,
            r#"{"PublicIP":"203.0.113.5","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#,
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd42::5","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#,
        ] {
            assert_eq!(LeaseAttrs::from_json(s).expect(s).to_json(), s);
        }
        assert_eq!(
            LeaseAttrs::default().to_json(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":null}"#
        );
    }

    #[test]
    fn attrs_go_semantics() {
        let a = LeaseAttrs::from_json(r#"{"publicip":"10.0.0.1","BACKENDTYPE":"vxlan","x":1}"#)
            .expect("parses");
        assert_eq!(a.public_ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(a.backend_type, "vxlan");
        assert_eq!(LeaseAttrs::from_json("null"), Ok(LeaseAttrs::default()));
        let mapped = LeaseAttrs::from_json(r#"{"PublicIP":"::ffff:10.0.0.2"}"#).expect("mapped");
        assert_eq!(mapped.public_ip, Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn attrs_errors_name_field_and_value() {
        let e = Lease::from_kv("10.244.3.0-24", r#"{"PublicIP":"abc"}"#).expect_err("bad ip");
        assert_eq!(
            e.to_string(),
            r#"lease 10.244.3.0-24: PublicIP "abc" is not an IPv4 address"#
        );
        let e = LeaseAttrs::from_json(r#"{"PublicIPv6":"10.0.0.1"}"#).expect_err("v4 in v6");
        assert_eq!(
            e.to_string(),
            r#"PublicIPv6 "10.0.0.1" is not an IPv6 address"#
        );
        let e = LeaseAttrs::from_json(r#"{"PublicIP":null}"#).expect_err("null ip");
        assert_eq!(e.to_string(), "PublicIP null is not an IPv4 address");
        let e = LeaseAttrs::from_json(r#"{"BackendType":7}"#).expect_err("type");
        assert_eq!(e.to_string(), "BackendType 7 is not a string");
        assert!(matches!(
            LeaseAttrs::from_json("{"),
            Err(AttrsError::Syntax(_))
        ));
        assert!(matches!(
            LeaseAttrs::from_json("[]"),
            Err(AttrsError::Syntax(_))
        ));
    }

    #[test]
    fn vxlan_data_errors() {
        let bad_mac = r#"{"PublicIP":"10.0.0.1","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#;
        let e = LeaseAttrs::from_json(bad_mac)
            .expect("attrs")
            .vxlan_data()
            .expect_err("mac");
        assert_eq!(
            e.to_string(),
            r#"BackendData.VtepMAC "zz" is not a MAC address"#
        );
        let e = VxlanBackendData::from_json(r#"{"VNI":-1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#)
            .expect_err("vni");
        assert_eq!(
            e.to_string(),
            "BackendData.VNI -1 is not a non-negative integer"
        );
        let e = VxlanBackendData::from_json(r#"{"VNI":1}"#).expect_err("missing");
        assert_eq!(e.to_string(), "BackendData.VtepMAC is missing");
        let ok = VxlanBackendData::from_json(r#"{"vni":7,"vtepmac":"AA-BB-CC-DD-EE-FF"}"#)
            .expect("case-insensitive");
        assert_eq!(ok.to_json(), r#"{"VNI":7,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#);
        assert_eq!(ok.to_raw().get(), ok.to_json());
    }

    #[test]
    fn go_string_escapes() {
        assert_eq!(
            go_json_string("a<b>&\"\\\n\u{1}"),
            r#""a\u003cb\u003e\u0026\"\\\n\u0001""#
        );
    }

    fn raw_data() -> impl proptest::strategy::Strategy<Value = Option<Box<RawValue>>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            Just(RawValue::from_string("null".into()).ok()),
            (any::<u32>(), any::<[u8; 6]>()).prop_map(|(vni, mac)| {
                Some(
                    VxlanBackendData {
                        vni,
                        vtep_mac: MacAddr(mac),
                    }
                    .to_raw(),
                )
            }),
        ]
    }

    proptest::proptest! {
        #[test]
        fn attrs_encode_decode(
            ip in proptest::prelude::any::<u32>(),
            v6 in proptest::option::of(proptest::prelude::any::<u128>()),
            backend_type in "[ -~\u{80}-\u{2030}]{0,12}",
            data in raw_data(),
            v6_data in raw_data(),
        ) {
            let attrs = LeaseAttrs {
                public_ip: Ipv4Addr::from(ip),
                public_ipv6: v6.map(Ipv6Addr::from),
                backend_type,
                backend_data: data,
                backend_v6_data: v6_data,
            };
            let json = attrs.to_json();
            let back = LeaseAttrs::from_json(&json);
            proptest::prop_assert_eq!(back.as_ref(), Ok(&attrs), "{}", json);
            if let Some(d) = attrs.vxlan_data().ok().flatten() {
                proptest::prop_assert_eq!(VxlanBackendData::from_json(&d.to_json()), Ok(d));
            }
        }
    }

    #[test]
    fn subnet_keys() {
        let k: SubnetKey = "10.5.52.0-24".parse().expect("v4");
        assert_eq!((k.ipv4.to_string(), k.ipv6), ("10.5.52.0/24".into(), None));
        assert_eq!(k.to_string(), "10.5.52.0-24");
        let k: SubnetKey = "10.12.13.0-24&fd00:12:13::-56".parse().expect("dual");
        assert_eq!(
            k.ipv6.map(|n| n.to_string()),
            Some("fd00:12:13::/56".into())
        );
        assert_eq!(k.to_string(), "10.12.13.0-24&fd00:12:13::-56");
        // IPv6-only: upstream's MakeSubnetKey writes the zero IPv4 net.
        let k: SubnetKey = "0.0.0.0-0&fd42:7::-64".parse().expect("v6 only");
        assert_eq!(k.ipv4_subnet(), None);
        assert_eq!(k.to_string(), "0.0.0.0-0&fd42:7::-64");
        let lease = Lease::from_kv(&k.to_string(), "{}").expect("lease");
        assert_eq!((lease.subnet, lease.ipv6_subnet), (None, k.ipv6));
        assert_eq!(lease.key(), Some(k));
        assert_eq!(SubnetKey::new(None, None), None);
        let k: SubnetKey = "/coreos.com/network/subnets/10.1.2.0-24"
            .parse()
            .expect("path");
        assert_eq!(k.to_string(), "10.1.2.0-24");
        for bad in [
            "",
            "10.1.2.0",
            "10.1.2.0-32",
            "10.1.2.0-24&fd00::-128",
            "10.1.2.0-24&FD00::-64",
            "300.1.2.0-24",
            "010.1.2.0-24",
            "10x1y2z0-24",
            "10.1.2.0-24 ",
        ] {
            assert!(bad.parse::<SubnetKey>().is_err(), "{bad:?}");
        }
    }
}
