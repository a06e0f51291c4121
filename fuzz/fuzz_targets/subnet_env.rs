//! subnet.env text (written by flanneld, read back by its own restart and by the CNI plugin):
//! parsing never panics, and what parses renders to text that parses back to the same value.
#![no_main]

use std::path::Path;

use flannel_rs::config::subnet_env::SubnetEnv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/run/flannel/subnet.env");
    let Ok(env) = SubnetEnv::parse(text, path) else {
        return;
    };
    for n in [env.network, env.subnet].into_iter().flatten() {
        assert_eq!(n, n.trunc(), "{n} not in network form");
    }
    // The subnet is rendered as its first host address (flannel's format), which for a /32
    // (/128) is outside it: only shorter prefixes round-trip.
    if env.subnet.is_some_and(|s| s.prefix_len() == 32)
        || env.ipv6_subnet.is_some_and(|s| s.prefix_len() == 128)
    {
        return;
    }
    let text2 = env.render();
    let back = SubnetEnv::parse(&text2, path).expect("rendered subnet.env parses");
    assert_eq!(back, env, "{text2}");
});
