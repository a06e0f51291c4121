//! etcd / directory-store lease values: decoding never panics, and whatever decodes
//! re-encodes to JSON that decodes to the same attributes.
#![no_main]

use flannel_rs::lease::{Lease, LeaseAttrs};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Lease::from_kv("10.244.1.0-24", text);
    let Ok(attrs) = LeaseAttrs::from_json(text) else {
        return;
    };
    let _ = attrs.vxlan_data();
    let _ = attrs.vxlan_v6_data();
    let encoded = attrs.to_json();
    let again = LeaseAttrs::from_json(&encoded).expect("own encoding decodes");
    assert_eq!(again, attrs);
    assert_eq!(again.to_json(), encoded);
});
