//! Compatibility with upstream flannel's on-disk and on-wire formats: net-conf.json vectors from
//! `pkg/subnet/config_test.go`, subnet.env, etcd lease values and subnet keys, byte for byte.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use flannel_rs::config::flags::{self, Command, FlagError};
use flannel_rs::config::netconf::{BackendConfig, NetConfig, NetConfigError};
use flannel_rs::config::subnet_env::SubnetEnv;
use flannel_rs::lease::{Lease, LeaseAttrs, LeaseError, SubnetKey, VxlanBackendData};
use ipnet::{Ipv4Net, Ipv6Net};
use proptest::prelude::*;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/compat")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse_valid(json: &str) -> NetConfig {
    let cfg = NetConfig::parse(json).expect("parses");
    cfg.validate().expect("valid");
    cfg
}

// --- net-conf.json: pkg/subnet/config_test.go -------------------------------------------------

#[test]
fn config_defaults() {
    let cfg = parse_valid(r#"{ "network": "10.3.0.0/16" }"#);
    let r = cfg.ipv4_range().expect("ok").expect("v4 enabled");
    assert_eq!(r.network.to_string(), "10.3.0.0/16");
    assert_eq!(r.subnet_min.network().to_string(), "10.3.1.0");
    assert_eq!(r.subnet_max.network().to_string(), "10.3.255.0");
    assert_eq!(r.subnet_len, 24);
}

#[test]
fn ipv6_config_defaults() {
    let cfg =
        parse_valid(r#"{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }"#);
    assert!(cfg.ipv4_range().expect("ok").is_none());
    let r = cfg.ipv6_range().expect("ok").expect("v6 enabled");
    assert_eq!(r.network.to_string(), "fc00::/48");
    assert_eq!(r.subnet_min.network().to_string(), "fc00:0:0:1::");
    assert_eq!(r.subnet_max.network().to_string(), "fc00:0:0:ffff::");
    assert_eq!(r.subnet_len, 64);
}

#[test]
fn config_overrides() {
    let cfg = parse_valid(
        r#"{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0", "SubnetLen": 28 }"#,
    );
    assert_eq!(cfg.subnet_min, Some(Ipv4Addr::new(10, 3, 5, 0)));
    let r = cfg.ipv4_range().expect("ok").expect("v4");
    assert_eq!(r.network.to_string(), "10.3.0.0/16");
    assert_eq!(r.subnet_min.network().to_string(), "10.3.5.0");
    assert_eq!(r.subnet_max.network().to_string(), "10.3.8.0");
    assert_eq!(r.subnet_len, 28);
}

#[test]
fn ipv6_config_overrides() {
    let cfg = parse_valid(
        r#"{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::", "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }"#,
    );
    let r = cfg.ipv6_range().expect("ok").expect("v6");
    assert_eq!(r.network.to_string(), "fc00::/48");
    assert_eq!(r.subnet_min.network().to_string(), "fc00:0:0:1::");
    assert_eq!(r.subnet_max.network().to_string(), "fc00:0:0:f::");
    assert_eq!(r.subnet_len, 124);
}

#[test]
fn kube_flannel_manifest_net_conf() {
    let cfg = NetConfig::parse(&fixture("kube-flannel-net-conf.json")).expect("parses");
    assert_eq!(cfg.network, Some("10.244.0.0/16".parse().expect("net")));
    assert!(cfg.enable_ipv4 && !cfg.enable_ipv6 && !cfg.enable_nftables);
    let BackendConfig::Vxlan(vx) = cfg.backend().expect("supported") else {
        panic!("vxlan expected: {:?}", cfg.backend);
    };
    assert_eq!((vx.vni, vx.vxlan_port(), vx.mtu), (1, 8472, None));
    assert_eq!(vx.device_name(), "flannel.1");
    assert_eq!(cfg.backend_type(), "vxlan");
}

#[test]
fn missing_backend_is_a_clear_error() {
    // Upstream would silently run the udp backend; we refuse and say how to fix it.
    let cfg = NetConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).expect("parses like upstream");
    cfg.validate().expect("network part is fine");
    let e = cfg.backend().expect_err("no backend");
    assert_eq!(e, NetConfigError::MissingBackend);
    let msg = e.to_string();
    assert!(
        msg.contains("\"udp\"") && msg.contains(r#""Backend": {"Type": "vxlan"}"#),
        "{msg}"
    );
    let e = NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{}}"#)
        .expect("parses")
        .backend()
        .expect_err("empty backend");
    assert_eq!(e.to_string(), "unknown backend type: ");
}

#[test]
fn malformed_net_conf_names_field_and_value() {
    let e =
        NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":"one"}}"#)
            .expect_err("bad VNI");
    assert_eq!(
        e.to_string(),
        r#"error decoding VXLAN backend config: Backend.VNI "one" is not an integer"#
    );
    let e = NetConfig::parse(r#"{"Network":"10.244.0.0/33"}"#).expect_err("bad CIDR");
    assert!(e.to_string().contains(r#"Network "10.244.0.0/33""#), "{e}");
    let e = NetConfig::parse(r#"{"Network": "10.244.0.0/16",}"#).expect_err("trailing comma");
    assert!(
        e.to_string()
            .starts_with("error parsing subnet config: invalid JSON"),
        "{e}"
    );
}

// --- subnet.env ------------------------------------------------------------------------------

#[test]
fn subnet_env_matches_upstream_example() {
    let env = SubnetEnv {
        network: Some("10.42.0.0/16".parse().expect("net")),
        subnet: Some("10.42.0.0/24".parse().expect("net")),
        ipv6_network: Some("2001:cafe:42::/56".parse().expect("net")),
        ipv6_subnet: Some("2001:cafe:42::/64".parse().expect("net")),
        mtu: 1450,
        ipmasq: true,
    };
    let expected = fixture("subnet.env");
    assert_eq!(env.render(), expected);

    let dir = scratch_dir("compat-subnet-env");
    let path = dir.join("run/flannel/subnet.env");
    env.write_atomic(&path).expect("write");
    assert_eq!(std::fs::read(&path).expect("read"), expected.as_bytes());
    let back = SubnetEnv::read(&path).expect("parse back");
    assert_eq!(back, env);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

// --- lease JSON and keys ---------------------------------------------------------------------

#[test]
fn etcd_lease_round_trips_byte_for_byte() {
    for name in [
        "lease-vxlan.json",
        "lease-host-gw-etcd.json",
        "lease-host-gw-kube.json",
        "lease-vxlan-dual.json",
    ] {
        let text = fixture(name);
        let attrs = LeaseAttrs::from_json(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(attrs.to_json(), text, "{name}");
    }
    let lease = Lease::from_kv("10.5.52.0-24", &fixture("lease-vxlan.json")).expect("lease");
    assert_eq!(lease.subnet, Some("10.5.52.0/24".parse().expect("net")));
    assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
    assert_eq!(lease.attrs.backend_type, "vxlan");
    let data = lease.attrs.vxlan_data().expect("decodes").expect("present");
    assert_eq!(data.vni, 1);
    assert_eq!(data.vtep_mac.to_string(), "c6:d2:32:6f:8f:44");
    assert_eq!(lease.expiration, None);
}

#[test]
fn host_gw_backend_data_forms() {
    // etcd (upstream hostgw.go leaves BackendData nil → omitted); kube (annotation "null").
    let etcd = LeaseAttrs::from_json(&fixture("lease-host-gw-etcd.json")).expect("etcd form");
    assert!(etcd.backend_data.is_none());
    let kube = LeaseAttrs::from_json(&fixture("lease-host-gw-kube.json")).expect("kube form");
    assert_eq!(kube.backend_data.as_ref().map(|r| r.get()), Some("null"));
    assert_eq!(kube.vxlan_data(), Ok(None));
    assert_ne!(etcd, kube);
}

#[test]
fn built_vxlan_lease_serialises_like_flannel() {
    let data = VxlanBackendData {
        vni: 1,
        vtep_mac: "c6:d2:32:6f:8f:44".parse().expect("mac"),
    };
    let attrs = LeaseAttrs {
        public_ip: Ipv4Addr::new(192, 168, 64, 3),
        backend_type: "vxlan".into(),
        backend_data: Some(data.to_raw()),
        ..LeaseAttrs::default()
    };
    assert_eq!(attrs.to_json(), fixture("lease-vxlan.json"));
}

#[test]
fn malformed_lease_names_field_and_value() {
    let e = Lease::from_kv("10.244.3.0-24", r#"{"PublicIP":"abc","PublicIPv6":null}"#)
        .expect_err("bad public ip");
    assert_eq!(
        e.to_string(),
        r#"lease 10.244.3.0-24: PublicIP "abc" is not an IPv4 address"#
    );
    let e = Lease::from_kv("10.244.3.0-24", r#"{"PublicIP":"10.0.0.1""#).expect_err("truncated");
    assert!(
        e.to_string()
            .starts_with("lease 10.244.3.0-24: invalid JSON"),
        "{e}"
    );
    let e = Lease::from_kv("10.244.3.0", "{}").expect_err("bad key");
    assert!(matches!(e, LeaseError::Key(_)));
    assert!(e.to_string().contains("\"10.244.3.0\""), "{e}");
}

#[test]
fn subnet_keys_from_subnet_test_go() {
    let k: SubnetKey = "10.12.13.0-24&fd00:12:13::-56".parse().expect("dual");
    assert_eq!(k.ipv4, "10.12.13.0/24".parse::<Ipv4Net>().expect("net"));
    assert_eq!(
        k.ipv6,
        Some("fd00:12:13::/56".parse::<Ipv6Net>().expect("net"))
    );
    assert_eq!(k.to_string(), "10.12.13.0-24&fd00:12:13::-56");
    let k: SubnetKey = "10.5.52.0-24".parse().expect("v4");
    assert_eq!((k.to_string(), k.ipv6), ("10.5.52.0-24".to_owned(), None));
    let k: SubnetKey = "/coreos.com/network/subnets/10.5.52.0-24"
        .parse()
        .expect("full key");
    assert_eq!(k.to_string(), "10.5.52.0-24");
}

// --- flags -----------------------------------------------------------------------------------

fn no_env(_: &str) -> Option<String> {
    None
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn out_of_range_flags_name_flag_and_value() {
    let e = flags::parse(&args(&["--subnet-lease-renew-margin=1440"]), &no_env).expect_err("range");
    let msg = e.to_string();
    assert!(
        msg.starts_with("Invalid subnet-lease-renew-margin option, out of acceptable range")
            && msg.contains("1440")
            && msg.contains("--subnet-lease-renew-margin"),
        "{msg}"
    );
    let e = flags::parse(&args(&["--healthz-port", "65536"]), &no_env).expect_err("port");
    assert_eq!(
        e,
        FlagError::InvalidValue {
            origin: "flag --healthz-port".into(),
            value: "65536".into(),
            reason: "out of range 0..=65535".into(),
        }
    );
    let env = |k: &str| (k == "FLANNELD_METRICS_PORT").then(|| "-1".to_owned());
    let e = flags::parse(&[], &env).expect_err("env port");
    assert!(e.to_string().contains("FLANNELD_METRICS_PORT") && e.to_string().contains("\"-1\""));
}

#[test]
fn every_upstream_flag_is_accepted() {
    let all = [
        "--etcd-endpoints=http://203.0.113.1:2379",
        "--etcd-prefix=/x",
        "--etcd-keyfile=/k",
        "--etcd-certfile=/c",
        "--etcd-cafile=/ca",
        "--etcd-username=u",
        "--etcd-password=p",
        "--kube-subnet-mgr",
        "--kube-api-url=https://203.0.113.2:6443",
        "--kubeconfig-file=/kc",
        "--kube-annotation-prefix=example.com/pfx",
        "--iface=eth0",
        "--iface-regex=^eth",
        "--iface-can-reach=203.0.113.3",
        "--public-ip=203.0.113.4",
        "--public-ipv6=2001:db8::4",
        "--subnet-file=/tmp/subnet.env",
        "--subnet-lease-renew-margin=30",
        "--ip-masq",
        "--ip-masq-fully-random-disable",
        "--iptables-resync=7",
        "--iptables-forward-rules=false",
        "--ip-blackhole-route",
        "--net-config-path=/n",
        "--set-node-network-unavailable=false",
        "--healthz-ip=127.0.0.1",
        "--healthz-port=8471",
        "-v=4",
        "-vmodule=vxlan*=5",
        "-log_backtrace_at=main.go:1",
        "--dataplane=kernel",
        "--lease-dir=/var/lib/flannel-leases",
        "--vxlan-tx-checksum-offload",
        "--metrics-port=9100",
    ];
    let Ok(Command::Run(f)) = flags::parse(&args(&all), &no_env) else {
        panic!("all flags should parse");
    };
    assert_eq!(f.etcd_endpoints, ["http://203.0.113.1:2379"]);
    assert!(f.kube_subnet_mgr && f.ip_masq && f.ip_blackhole_route && f.vxlan_tx_checksum_offload);
    assert!(!f.iptables_forward_rules && !f.set_node_network_unavailable);
    assert_eq!(
        (
            f.iptables_resync,
            f.healthz_port,
            f.metrics_port,
            f.verbosity
        ),
        (7, 8471, 9100, 4)
    );
    assert_eq!(f.subnet_lease_renew_margin, 30);
    assert_eq!(
        f.lease_dir.as_deref(),
        Some(Path::new("/var/lib/flannel-leases"))
    );
    assert!(format!("{f:?}").contains("etcd_password: \"***\""));
}

// --- property tests --------------------------------------------------------------------------

fn v4_net() -> impl Strategy<Value = Ipv4Net> {
    (any::<u32>(), 0u8..32).prop_map(|(a, p)| {
        Ipv4Net::new(Ipv4Addr::from(a), p)
            .expect("prefix < 32")
            .trunc()
    })
}

fn v6_net() -> impl Strategy<Value = Ipv6Net> {
    (any::<u128>(), 0u8..128).prop_map(|(a, p)| {
        Ipv6Net::new(std::net::Ipv6Addr::from(a), p)
            .expect("prefix < 128")
            .trunc()
    })
}

/// A value flag and a value for it that the flag accepts.
fn flag_and_value() -> impl Strategy<Value = (&'static str, String)> {
    let text = "[ -~]{0,20}";
    prop_oneof![
        text.prop_map(|v| ("etcd-prefix", v)),
        text.prop_map(|v| ("kube-api-url", v)),
        text.prop_map(|v| ("iface", v)),
        text.prop_map(|v| ("subnet-file", v)),
        text.prop_map(|v| ("etcd-password", v)),
        (0u32..70000).prop_map(|v| ("healthz-port", v.to_string())),
        (0u32..70000).prop_map(|v| ("metrics-port", v.to_string())),
        (0u32..1500).prop_map(|v| ("subnet-lease-renew-margin", v.to_string())),
        (-3i64..100).prop_map(|v| ("iptables-resync", v.to_string())),
        prop_oneof![Just("userspace"), Just("kernel"), Just("x")]
            .prop_map(|v| ("dataplane", v.to_owned())),
    ]
}

proptest! {
    #[test]
    fn subnet_key_format_parse_round_trip(v4 in v4_net(), v6 in prop::option::of(v6_net())) {
        let key = SubnetKey { ipv4: v4, ipv6: v6 };
        let text = key.to_string();
        prop_assert_eq!(text.parse::<SubnetKey>(), Ok(key));
    }

    #[test]
    fn flag_value_forms_are_equivalent(
        pairs in prop::collection::vec((flag_and_value(), any::<bool>()), 0..6),
    ) {
        let mut joined = Vec::new();
        let mut split = Vec::new();
        for ((name, value), single_dash) in &pairs {
            let dash = if *single_dash { "-" } else { "--" };
            joined.push(format!("{dash}{name}={value}"));
            split.push(format!("{dash}{name}"));
            split.push(value.clone());
        }
        prop_assert_eq!(flags::parse(&joined, &no_env), flags::parse(&split, &no_env));
    }
}

/// A unique scratch directory under the system temp dir.
fn scratch_dir(tag: &str) -> PathBuf {
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).expect("random");
    let dir = std::env::temp_dir().join(format!("flannel-rs-{tag}-{:016x}", u64::from_le_bytes(n)));
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}
