//! net-conf.json / etcd `config`: parsing, validation and allocation never panic, and
//! allocation stays inside the validated range.
#![no_main]

use flannel_rs::config::netconf::NetConfig;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = NetConfig::parse(text) else {
        return;
    };
    let _ = cfg.backend();
    let _ = cfg.backend_type();
    if cfg.validate().is_err() {
        return;
    }
    if let Ok(Some(r)) = cfg.ipv4_range() {
        for s in r.free_subnets(&[], 100) {
            assert!(r.is_compatible(&s), "{s} outside {r:?}");
        }
    }
    if let Ok(Some(r)) = cfg.ipv6_range() {
        for s in r.free_subnets(&[], 100) {
            assert!(r.is_compatible(&s), "{s} outside {r:?}");
        }
    }
});
