//! Kubernetes node annotations as lease data (compat §5.2, §5.3; upstream
//! `pkg/subnet/kube/annotations.go` and `nodeToLease`), pure so the Kubernetes store and the
//! fuzzers share one parser. Annotation values come from the API server and are untrusted.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::LazyLock;

use ipnet::IpNet;
use serde_json::value::RawValue;

use super::{Lease, LeaseAttrs};
use crate::config::gojson::shorten;

/// The annotation names for one `--kube-annotation-prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationNames {
    /// `<prefix>kube-subnet-manager` (`"true"` marks a managed node).
    pub subnet_kube_managed: String,
    /// `<prefix>backend-data`.
    pub backend_data: String,
    /// `<prefix>backend-v6-data`.
    pub backend_v6_data: String,
    /// `<prefix>backend-type`.
    pub backend_type: String,
    /// `<prefix>public-ip`.
    pub public_ip: String,
    /// `<prefix>public-ipv6`.
    pub public_ipv6: String,
    /// `<prefix>node-public-ip` (set by users; overrides `--public-ip` at start).
    pub node_public_ip: String,
    /// `<prefix>node-public-ipv6`.
    pub node_public_ipv6: String,
    /// `<prefix>public-ip-overwrite` (set by users; published instead of the detected IP).
    pub public_ip_overwrite: String,
    /// `<prefix>public-ipv6-overwrite`.
    pub public_ipv6_overwrite: String,
}

/// Why a prefix or a node's annotations cannot be used. Messages match upstream's where it
/// has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// The prefix has two or more `/`.
    #[error("subnet/kube: prefix can contain at most single slash")]
    TooManySlashes,
    /// The prefix is not `fqdn[/name]`.
    #[error("subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*")]
    BadPrefix,
    /// An annotation value does not parse.
    #[error("annotation {annotation}={value:?} is not {expected}")]
    Value {
        /// The annotation name.
        annotation: String,
        /// The value (shortened).
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A pod CIDR does not parse.
    #[error("pod CIDR {0:?} is not a CIDR")]
    PodCidr(String),
    /// More than two pod CIDRs.
    #[error("node pod cidrs should be IPv4/IPv6 only or dualstack")]
    TooManyPodCidrs,
    /// No pod CIDR of an enabled family (`"IPv4"`/`"IPv6"`).
    #[error("missing {0} address on n.Spec.PodCIDRs")]
    MissingPodCidr(&'static str),
}

/// `--kube-annotation-prefix` when not given (upstream's default).
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Upstream's prefix check, unanchored at the start as upstream's `MatchString` is.
static PREFIX_RE: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$").ok());

impl AnnotationNames {
    /// Normalises a prefix like upstream: no slash → append `/`; not ending in `/` or `-` →
    /// append `-`; then it must look like `fqdn/` or `fqdn/name-`.
    pub fn new(prefix: &str) -> Result<AnnotationNames, AnnotationError> {
        let slashes = prefix.matches('/').count();
        if slashes > 1 {
            return Err(AnnotationError::TooManySlashes);
        }
        let mut p = prefix.to_owned();
        if slashes == 0 {
            p.push('/');
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        if !PREFIX_RE.as_ref().is_some_and(|re| re.is_match(&p)) {
            return Err(AnnotationError::BadPrefix);
        }
        let n = |s: &str| format!("{p}{s}");
        Ok(AnnotationNames {
            subnet_kube_managed: n("kube-subnet-manager"),
            backend_data: n("backend-data"),
            backend_v6_data: n("backend-v6-data"),
            backend_type: n("backend-type"),
            public_ip: n("public-ip"),
            public_ipv6: n("public-ipv6"),
            node_public_ip: n("node-public-ip"),
            node_public_ipv6: n("node-public-ipv6"),
            public_ip_overwrite: n("public-ip-overwrite"),
            public_ipv6_overwrite: n("public-ipv6-overwrite"),
        })
    }

    /// True when the node is managed by flannel (`kube-subnet-manager: "true"`); watchers
    /// ignore all other nodes.
    pub fn is_managed(&self, annotations: &BTreeMap<String, String>) -> bool {
        annotations
            .get(&self.subnet_kube_managed)
            .map(String::as_str)
            == Some("true")
    }
}

/// A node's lease from its annotations and `spec.podCIDR(s)` (upstream `nodeToLease`), for the
/// enabled families. Stricter than upstream: backend data must be valid JSON and
/// `public-ipv6` must be IPv6.
pub fn node_to_lease(
    names: &AnnotationNames,
    annotations: &BTreeMap<String, String>,
    pod_cidr: Option<&str>,
    pod_cidrs: &[String],
    enable_ipv4: bool,
    enable_ipv6: bool,
) -> Result<Lease, AnnotationError> {
    let get = |name: &String| annotations.get(name).map(String::as_str).unwrap_or("");
    let value_err = |annotation: &String, value: &str, expected| AnnotationError::Value {
        annotation: annotation.clone(),
        value: shorten(value),
        expected,
    };
    let raw = |name: &String| -> Result<Option<Box<RawValue>>, AnnotationError> {
        match get(name) {
            "" => Ok(None),
            v => RawValue::from_string(v.to_owned())
                .map(Some)
                .map_err(|_| value_err(name, v, "valid JSON")),
        }
    };
    let mut lease = Lease {
        subnet: None,
        ipv6_subnet: None,
        attrs: LeaseAttrs {
            backend_type: get(&names.backend_type).to_owned(),
            ..LeaseAttrs::default()
        },
        expiration: None,
        node: None,
    };
    if enable_ipv4 {
        let text = get(&names.public_ip);
        lease.attrs.public_ip = match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Some(a),
            Ok(IpAddr::V6(a)) => a.to_ipv4_mapped(),
            Err(_) => None,
        }
        .ok_or_else(|| value_err(&names.public_ip, text, "an IPv4 address"))?;
        lease.attrs.backend_data = raw(&names.backend_data)?;
        lease.subnet = match pick_cidr(pod_cidr, pod_cidrs, true)? {
            Some(IpNet::V4(n)) => Some(n),
            _ => return Err(AnnotationError::MissingPodCidr("IPv4")),
        };
    }
    if enable_ipv6 {
        let text = get(&names.public_ipv6);
        lease.attrs.public_ipv6 = Some(
            text.parse::<Ipv6Addr>()
                .map_err(|_| value_err(&names.public_ipv6, text, "an IPv6 address"))?,
        );
        lease.attrs.backend_v6_data = raw(&names.backend_v6_data)?;
        lease.ipv6_subnet = match pick_cidr(pod_cidr, pod_cidrs, false)? {
            Some(IpNet::V6(n)) => Some(n),
            _ => return Err(AnnotationError::MissingPodCidr("IPv6")),
        };
    }
    Ok(lease)
}

/// The first pod CIDR of the wanted family, in network form.
fn pick_cidr(
    pod_cidr: Option<&str>,
    pod_cidrs: &[String],
    want_v4: bool,
) -> Result<Option<IpNet>, AnnotationError> {
    let parse = |s: &str| {
        s.parse::<IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| AnnotationError::PodCidr(shorten(s)))
    };
    let family_ok = |n: &IpNet| matches!(n, IpNet::V4(_)) == want_v4;
    match pod_cidrs.len() {
        0 => Ok(Some(parse(pod_cidr.unwrap_or(""))?).filter(family_ok)),
        1 | 2 => {
            for c in pod_cidrs {
                let n = parse(c)?;
                if family_ok(&n) {
                    return Ok(Some(n));
                }
            }
            Ok(None)
        }
        _ => Err(AnnotationError::TooManyPodCidrs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_normalisation() {
        let n = AnnotationNames::new("flannel.alpha.coreos.com").expect("default");
        assert_eq!(n.backend_type, "flannel.alpha.coreos.com/backend-type");
        let n = AnnotationNames::new("example.com/pfx").expect("named");
        assert_eq!(n.backend_type, "example.com/pfx-backend-type");
        assert_eq!(
            AnnotationNames::new("a/b/c"),
            Err(AnnotationError::TooManySlashes)
        );
        assert_eq!(
            AnnotationNames::new("nodots"),
            Err(AnnotationError::BadPrefix)
        );
        assert_eq!(
            AnnotationNames::new("example.com/Bad"),
            Err(AnnotationError::BadPrefix)
        );
    }

    fn node(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn node_lease_dual_stack() {
        let names = AnnotationNames::new("flannel.alpha.coreos.com").expect("names");
        let a = node(&[
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#,
            ),
            ("flannel.alpha.coreos.com/public-ip", "198.51.100.2"),
            ("flannel.alpha.coreos.com/backend-v6-data", "null"),
            ("flannel.alpha.coreos.com/public-ipv6", "fd42::2"),
        ]);
        assert!(names.is_managed(&a));
        let cidrs = vec!["10.244.2.0/24".to_owned(), "fd42:2::/64".to_owned()];
        let l = node_to_lease(&names, &a, None, &cidrs, true, true).expect("lease");
        assert_eq!(
            l.subnet.map(|s| s.to_string()).as_deref(),
            Some("10.244.2.0/24")
        );
        assert_eq!(
            l.ipv6_subnet.map(|s| s.to_string()).as_deref(),
            Some("fd42:2::/64")
        );
        assert_eq!(
            l.attrs.to_json(),
            r#"{"PublicIP":"198.51.100.2","PublicIPv6":"fd42::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"},"BackendV6Data":null}"#
        );
        let e =
            node_to_lease(&names, &a, Some("10.244.2.0/24"), &[], true, true).expect_err("no v6");
        assert_eq!(e, AnnotationError::MissingPodCidr("IPv6"));
        let bad = node(&[("flannel.alpha.coreos.com/public-ip", "10.0.0.300")]);
        let e =
            node_to_lease(&names, &bad, Some("10.244.2.0/24"), &[], true, false).expect_err("ip");
        assert_eq!(
            e.to_string(),
            r#"annotation flannel.alpha.coreos.com/public-ip="10.0.0.300" is not an IPv4 address"#
        );
        let three = vec!["10.0.0.0/24".to_owned(); 3];
        let ok = node(&[("flannel.alpha.coreos.com/public-ip", "198.51.100.3")]);
        assert_eq!(
            node_to_lease(&names, &ok, None, &three, true, false),
            Err(AnnotationError::TooManyPodCidrs)
        );
    }
}
