//! Subnet keys (`10.244.1.0-24&fd00::-64`): parsing never panics and a parsed key formats to
//! text that parses back to the same key.
#![no_main]

use flannel_rs::lease::SubnetKey;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = text.parse::<SubnetKey>() {
        let formatted = key.to_string();
        assert_eq!(formatted.parse::<SubnetKey>().ok(), Some(key), "{formatted}");
    }
});
