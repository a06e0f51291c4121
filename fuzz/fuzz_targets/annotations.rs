//! Kubernetes node annotations and pod CIDRs (untrusted API-server data): prefix
//! normalisation and node-to-lease conversion never panic, and a converted lease's attributes
//! survive a JSON round trip.
//!
//! Input: lines; the first is the annotation prefix, the next two `podCIDR` and a
//! comma-separated `podCIDRs`, the rest `suffix=value` annotations under that prefix.
#![no_main]

use std::collections::BTreeMap;

use flannel_rs::lease::annotations::{node_to_lease, AnnotationNames};
use flannel_rs::lease::LeaseAttrs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let prefix = lines.next().unwrap_or_default();
    let names = match AnnotationNames::new(prefix) {
        Ok(n) => n,
        Err(_) => AnnotationNames::new("flannel.alpha.coreos.com").expect("default prefix"),
    };
    let pod_cidr = lines.next().filter(|s| !s.is_empty());
    let pod_cidrs: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let base = names.backend_type.trim_end_matches("backend-type").to_owned();
    let annotations: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("{base}{k}"), v.to_owned()))
        .collect();
    let _ = names.is_managed(&annotations);
    for (v4, v6) in [(true, false), (false, true), (true, true)] {
        if let Ok(lease) = node_to_lease(&names, &annotations, pod_cidr, &pod_cidrs, v4, v6) {
            let _ = lease.attrs.vxlan_data();
            let json = lease.attrs.to_json();
            let back = LeaseAttrs::from_json(&json).expect("own encoding decodes");
            assert_eq!(back, lease.attrs);
        }
    }
});
