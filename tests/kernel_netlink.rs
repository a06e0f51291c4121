//! Kernel VXLAN and host-gw against a real kernel, each test in a network namespace it creates
//! (unique per-run name, deleted by a Drop guard). Privileged: run as root
//! (`sudo -E cargo test --test kernel_netlink`); skipped otherwise unless CI=true.
//!
//! The scale helper is an ignored test:
//! `cargo test --release --test kernel_netlink -- --ignored --exact scale_5000_peers --nocapture`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use std::time::{Duration, Instant};

use flannel_rs::backend::hostgw::{HostGw, HostGwConfig, HostGwError};
use flannel_rs::backend::intake::{intake, IntakeConfig, NodeBackend};
use flannel_rs::backend::kernel::{KernelVxlan, KernelVxlanConfig};
use flannel_rs::backend::Peer;
use flannel_rs::config::flags::{self, Command};
use flannel_rs::daemon::external_interface;
use flannel_rs::daemon::extif::IpStack;
use flannel_rs::io::ethtool;
use flannel_rs::lease::{Lease, LeaseAttrs, VxlanBackendData};
use flannel_rs::netlink::{self, IpFamily, Netlink};
use flannel_rs::wire::MacAddr;
use test_support::netns::{Netns, Ns};
use test_support::sorted_lines;

fn privileged() -> bool {
    test_support::privileged("kernel_netlink")
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, last])
}

const OWN_MAC: MacAddr = MacAddr([0x02, 0x42, 0x42, 0, 0, 1]);

fn cfg() -> KernelVxlanConfig {
    KernelVxlanConfig {
        vni: 1,
        underlay_ifname: "ul0".into(),
        local_ip: "198.18.0.1".parse().unwrap(),
        port: 0,
        learning: false,
        gbp: false,
        mtu: None,
        vtep_mac: OWN_MAC,
        network: "10.244.0.0/16".parse().unwrap(),
        subnet: "10.244.1.0/24".parse().unwrap(),
        direct_routing: false,
        keep_tx_checksum: false,
    }
}

/// The peer intake makes of one lease: vxlan with VTEP MAC `m` and VNI 1, or host-gw
/// (`m` = `None`); peers exist only through intake.
fn checked_peer(subnet: &str, public_ip: &str, m: Option<MacAddr>) -> Peer {
    let net: IpNet = subnet.parse().unwrap();
    let data = m.map(|vtep_mac| VxlanBackendData { vni: 1, vtep_mac }.to_raw());
    let mut lease = Lease {
        subnet: None,
        ipv6_subnet: None,
        attrs: LeaseAttrs {
            backend_type: if m.is_some() { "vxlan" } else { "host-gw" }.into(),
            ..LeaseAttrs::default()
        },
        expiration: None,
        node: None,
    };
    let mut cfg = IntakeConfig {
        backend: if m.is_some() {
            NodeBackend::Vxlan
        } else {
            NodeBackend::HostGw
        },
        ..IntakeConfig::default()
    };
    match (net, public_ip.parse().unwrap()) {
        (IpNet::V4(n), IpAddr::V4(ip)) => {
            lease.subnet = Some(n);
            lease.attrs.public_ip = ip;
            lease.attrs.backend_data = data;
            cfg.network_v4 = Some("10.0.0.0/8".parse().unwrap());
        }
        (IpNet::V6(n), IpAddr::V6(ip)) => {
            lease.ipv6_subnet = Some(n);
            lease.attrs.public_ipv6 = Some(ip);
            lease.attrs.backend_v6_data = data;
            cfg.network_v6 = Some("fd42::/16".parse().unwrap());
        }
        _ => panic!("{subnet} and {public_ip} are of different families"),
    }
    let got = intake([&lease], &cfg);
    assert!(got.refused.is_empty(), "{:?}", got.refused);
    got.peers.into_iter().next().expect("one peer")
}

fn vx_peer(subnet: &str, public_ip: &str, m: u8) -> Peer {
    checked_peer(subnet, public_ip, Some(mac(m)))
}

fn routes_on(ns: &Ns, dev: &str) -> Vec<String> {
    sorted_lines(&ns.ip(&["route", "show", "dev", dev]))
}

/// Asserts flannel.1's neighbours, own FDB entries and routes, as the sorted lines of
/// `ip neigh show`, `bridge fdb show` and `ip route show` for the device.
fn assert_flannel_1(ns: &Ns, neigh: &[&str], fdb: &[&str], routes: &[&str]) {
    let dev = "flannel.1";
    let got_neigh = sorted_lines(&ns.ip(&["neigh", "show", "dev", dev]));
    assert_eq!(got_neigh, neigh, "neighbours");
    let got_fdb = sorted_lines(&ns.bridge(&["fdb", "show", "dev", dev]));
    assert_eq!(got_fdb, fdb, "fdb");
    assert_eq!(routes_on(ns, dev), routes, "routes");
}

// ---------------------------------------------------------------------------------------

#[test]
fn device_create_adopt_recreate() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("dev").with_underlay();
    ns.ip_line("addr add 198.18.0.3/24 dev ul0");

    let first = ns.run_async(|| async {
        let vx = KernelVxlan::setup(cfg()).await.expect("setup");
        assert_eq!(vx.name(), "flannel.1");
        assert_eq!(vx.mtu(), 1450);
        assert!(vx.tx_checksum_off());
        assert!(!ethtool::tx_checksum_ip_generic("flannel.1").unwrap());
        assert_eq!(netlink::accept_ra("flannel.1").unwrap(), 0);
        vx.ifindex()
    });
    let detail = ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(detail.contains("mtu 1450"), "{detail}");
    assert!(detail.contains("link/ether 02:42:42:00:00:01"), "{detail}");
    assert!(
        detail.contains("vxlan id 1 local 198.18.0.1 dev ul0"),
        "{detail}"
    );
    assert!(detail.contains("dstport 8472"), "{detail}");
    assert!(detail.contains("nolearning"), "{detail}");
    assert!(detail.contains(",UP"), "{detail}");
    let addrs = ns.ip_line("-4 addr show dev flannel.1");
    assert!(addrs.contains("inet 10.244.1.0/32"), "{addrs}");
    let features = ns.exec(&["ethtool", "-k", "flannel.1"]);
    assert!(
        features.contains("tx-checksum-ip-generic: off"),
        "{features}"
    );
    let sysctl = ns.exec(&["cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"]);
    assert_eq!(sysctl.trim(), "0");

    // Drift an adopted device can carry: other MTU, MAC, a stale address inside Network.
    ns.ip_line("link set flannel.1 mtu 1300");
    ns.ip_line("link set flannel.1 address 02:99:99:99:99:99");
    ns.ip_line("addr add 10.244.7.0/32 dev flannel.1");
    ns.ip_line("addr add 203.0.113.50/32 dev flannel.1");
    let adopted =
        ns.run_async(|| async { KernelVxlan::setup(cfg()).await.expect("adopt").ifindex() });
    assert_eq!(
        adopted, first,
        "compatible device must be adopted, not recreated"
    );
    let detail = ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(detail.contains("mtu 1450"), "{detail}");
    assert!(detail.contains("link/ether 02:42:42:00:00:01"), "{detail}");
    let addrs = ns.ip_line("-4 addr show dev flannel.1");
    assert!(!addrs.contains("10.244.7.0"), "{addrs}");
    assert!(
        addrs.contains("203.0.113.50/32"),
        "addresses outside Network stay: {addrs}"
    );

    // Incompatible: another local address.
    let recreated = ns.run_async(|| async {
        let mut c = cfg();
        c.local_ip = "198.18.0.3".parse().unwrap();
        KernelVxlan::setup(c).await.expect("recreate").ifindex()
    });
    assert_ne!(recreated, first);
    let detail = ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(
        detail.contains("vxlan id 1 local 198.18.0.3 dev ul0"),
        "{detail}"
    );

    // Incompatible: not a vxlan device at all; and another port.
    ns.ip(&["link", "del", "flannel.1"]);
    ns.ip_line("link add flannel.1 type bridge");
    ns.run_async(|| async {
        let mut c = cfg();
        c.port = 8475;
        KernelVxlan::setup(c).await.expect("replace dummy");
    });
    let detail = ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(detail.contains("vxlan id 1"), "{detail}");
    assert!(detail.contains("dstport 8475"), "{detail}");

    // Keeping checksum offload on when asked.
    ns.ip(&["link", "del", "flannel.1"]);
    ns.run_async(|| async {
        let mut c = cfg();
        c.keep_tx_checksum = true;
        let vx = KernelVxlan::setup(c).await.expect("setup");
        assert!(!vx.tx_checksum_off());
    });
    let features = ns.exec(&["ethtool", "-k", "flannel.1"]);
    assert!(
        features.contains("tx-checksum-ip-generic: on"),
        "{features}"
    );
}

#[test]
fn ethtool_flips_tx_checksum_both_ways() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("eth").with_underlay();
    ns.ip_line("link add vx0 type vxlan id 9 local 198.18.0.1 dev ul0 dstport 0");
    ns.run_async(|| async {
        assert!(ethtool::tx_checksum_ip_generic("vx0").unwrap());
        ethtool::set_tx_checksum_ip_generic("vx0", false).unwrap();
        assert!(!ethtool::tx_checksum_ip_generic("vx0").unwrap());
    });
    assert!(ns
        .exec(&["ethtool", "-k", "vx0"])
        .contains("tx-checksum-ip-generic: off"));
    ns.run_async(|| async {
        ethtool::set_tx_checksum_ip_generic("vx0", true).unwrap();
        assert!(ethtool::tx_checksum_ip_generic("vx0").unwrap());
        assert_eq!(
            ethtool::tx_checksum_ip_generic("nonexistent0")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENODEV)
        );
    });
    assert!(ns
        .exec(&["ethtool", "-k", "vx0"])
        .contains("tx-checksum-ip-generic: on"));
}

#[test]
fn sync_programs_exact_triplets_and_removes() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("sync").with_underlay();
    let peers = vec![
        vx_peer("10.244.2.0/24", "198.18.0.2", 2),
        vx_peer("10.244.3.0/24", "203.0.113.3", 3),
    ];
    ns.run_async_with(move |ns| async move {
        let mut vx = KernelVxlan::setup(cfg()).await.expect("setup");
        let report = vx.sync(&peers).await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.planned, 2);
        assert_eq!(report.added, 6);
        assert!(report.skipped.is_empty());

        assert_flannel_1(
            &ns,
            &[
                "10.244.2.0 lladdr 02:00:00:00:00:02 PERMANENT",
                "10.244.3.0 lladdr 02:00:00:00:00:03 PERMANENT",
            ],
            &[
                "02:00:00:00:00:02 dst 198.18.0.2 self permanent",
                "02:00:00:00:00:03 dst 203.0.113.3 self permanent",
            ],
            &[
                "10.244.2.0/24 via 10.244.2.0 onlink",
                "10.244.3.0/24 via 10.244.3.0 onlink",
            ],
        );

        // Idempotent.
        let again = vx.sync(&peers).await;
        assert!(again.is_clean());
        assert_eq!((again.added, again.removed), (0, 0));

        // A peer leaves; another changes its VTEP MAC and public IP.
        let peers2 = vec![vx_peer("10.244.3.0/24", "203.0.113.33", 33)];
        let report = vx.sync(&peers2).await;
        assert!(report.is_clean(), "{report:?}");
        assert_flannel_1(
            &ns,
            &["10.244.3.0 lladdr 02:00:00:00:00:21 PERMANENT"],
            &["02:00:00:00:00:21 dst 203.0.113.33 self permanent"],
            &["10.244.3.0/24 via 10.244.3.0 onlink"],
        );

        // Everything gone.
        let report = vx.sync(&[]).await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.removed, 3);
        assert_flannel_1(&ns, &[], &[], &[]);
    });
}

#[test]
fn startup_removes_stale_and_hand_added_entries() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("stale").with_underlay();
    // A previous run left entries for 10.244.9.0/24; someone added 10.244.8.0/24 by hand;
    // unrelated routes must survive.
    ns.run_async(|| async {
        KernelVxlan::setup(cfg()).await.expect("setup");
    });
    ns.ip_line("neigh replace 10.244.9.0 lladdr 02:00:00:00:00:09 dev flannel.1 nud permanent");
    ns.bridge_line("fdb replace 02:00:00:00:00:09 dev flannel.1 dst 198.18.0.9 self permanent");
    ns.ip_line("route replace 10.244.9.0/24 via 10.244.9.0 dev flannel.1 onlink");
    ns.ip_line("route add 10.244.8.0/24 dev flannel.1");
    ns.ip_line("route add 203.0.113.0/24 via 198.18.0.254 dev ul0");
    ns.ip_line("route add 10.244.1.0/24 dev ul0");
    // A previous peer that is still leased: adopted as is.
    ns.ip_line("neigh replace 10.244.2.0 lladdr 02:00:00:00:00:02 dev flannel.1 nud permanent");
    ns.bridge_line("fdb replace 02:00:00:00:00:02 dev flannel.1 dst 198.18.0.2 self permanent");
    ns.ip_line("route replace 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink");
    // Hand-added flood entries: the all-zero MAC with two remotes (only group and zero MACs
    // can hold several).
    ns.bridge_line("fdb append 00:00:00:00:00:00 dev flannel.1 dst 198.18.0.77 self permanent");
    ns.bridge_line("fdb append 00:00:00:00:00:00 dev flannel.1 dst 198.18.0.78 self permanent");
    assert_eq!(
        sorted_lines(&ns.bridge(&["fdb", "show", "dev", "flannel.1"])).len(),
        4
    );

    let report = ns.run_async(|| async {
        let mut vx = KernelVxlan::setup(cfg()).await.expect("restart");
        vx.sync(&[vx_peer("10.244.2.0/24", "198.18.0.2", 2)]).await
    });
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.added, 0, "the leased peer's entries were adopted");
    assert_eq!(report.removed, 6, "{report:?}");
    assert_flannel_1(
        &ns,
        &["10.244.2.0 lladdr 02:00:00:00:00:02 PERMANENT"],
        &["02:00:00:00:00:02 dst 198.18.0.2 self permanent"],
        &["10.244.2.0/24 via 10.244.2.0 onlink"],
    );
    let all = ns.ip(&["route"]);
    assert!(
        all.contains("203.0.113.0/24 via 198.18.0.254 dev ul0"),
        "{all}"
    );
    assert!(all.contains("10.244.1.0/24 dev ul0"), "{all}");
}

#[test]
fn device_deletion_recreates_and_replays_within_5s() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("del").with_underlay();
    ns.run_async_with(|ns| async move {
        let peers = vec![
            vx_peer("10.244.2.0/24", "198.18.0.2", 2),
            vx_peer("10.244.3.0/24", "198.18.0.3", 3),
        ];
        let mut vx = KernelVxlan::setup(cfg()).await.expect("setup");
        assert!(vx.sync(&peers).await.is_clean());
        let old_index = vx.ifindex();

        let start = Instant::now();
        // Deleted by "a network restart" (another process).
        ns.ip(&["link", "del", "flannel.1"]);
        tokio::time::timeout(Duration::from_secs(5), vx.device_gone())
            .await
            .expect("deletion noticed");
        let report = vx.recover(&peers).await.expect("recover");
        let elapsed = start.elapsed();
        assert!(report.is_clean(), "{report:?}");
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        assert_ne!(vx.ifindex(), old_index);

        // device_gone no longer resolves.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), vx.device_gone())
                .await
                .is_err()
        );
        assert_flannel_1(
            &ns,
            &[
                "10.244.2.0 lladdr 02:00:00:00:00:02 PERMANENT",
                "10.244.3.0 lladdr 02:00:00:00:00:03 PERMANENT",
            ],
            &[
                "02:00:00:00:00:02 dst 198.18.0.2 self permanent",
                "02:00:00:00:00:03 dst 198.18.0.3 self permanent",
            ],
            &[
                "10.244.2.0/24 via 10.244.2.0 onlink",
                "10.244.3.0/24 via 10.244.3.0 onlink",
            ],
        );
        let addrs = ns.ip_line("-4 addr show dev flannel.1");
        assert!(addrs.contains("inet 10.244.1.0/32"), "{addrs}");
        assert!(!ethtool::tx_checksum_ip_generic("flannel.1").unwrap());

        // Missed notification: sync still notices the device is gone.
        ns.ip(&["link", "del", "flannel.1"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let report = vx.sync(&peers).await;
        assert!(report.device_missing);
        let report = vx.recover(&peers).await.expect("recover");
        assert!(report.is_clean());
    });
}

#[test]
fn one_failing_peer_does_not_abort_others() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("fail").with_underlay();
    let report = ns.run_async(|| async {
        let mut vx = KernelVxlan::setup(cfg()).await.expect("setup");
        // An IPv6 public address on an IPv4 VXLAN device: the FDB entry is refused. (Intake
        // never makes such a peer: edited after intake to make the kernel refuse one.)
        let mut v6_dst = vx_peer("10.244.3.0/24", "198.18.0.3", 3);
        v6_dst.public_ip = "2001:db8::3".parse().unwrap();
        let peers = vec![
            vx_peer("10.244.2.0/24", "198.18.0.2", 2),
            v6_dst,
            vx_peer("10.244.4.0/24", "198.18.0.4", 4),
        ];
        let first = vx.sync(&peers).await;
        // Retried on the next sync (and fails the same way).
        let second = vx.sync(&peers).await;
        assert_eq!(second.failed_peers(), first.failed_peers());
        assert_eq!(second.added, 0);
        first
    });
    let bad: IpAddr = "10.244.3.0".parse().unwrap();
    assert_eq!(
        report.failed_peers().into_iter().collect::<Vec<_>>(),
        vec!["10.244.3.0/24".parse().unwrap()]
    );
    let fdb_fail = report
        .failures
        .iter()
        .find(|f| f.op.starts_with("bridge fdb replace"))
        .expect("fdb failure");
    assert_eq!(fdb_fail.errno, Some(libc::EAFNOSUPPORT));
    assert!(report
        .failures
        .iter()
        .any(|f| f.op.starts_with("ip route replace 10.244.3.0/24")
            && f.error.starts_with("skipped")));
    let routes = routes_on(&ns, "flannel.1");
    assert_eq!(
        routes,
        vec![
            "10.244.2.0/24 via 10.244.2.0 onlink",
            "10.244.4.0/24 via 10.244.4.0 onlink",
        ]
    );
    assert!(!routes.iter().any(|r| r.contains(&bad.to_string())));
}

#[test]
fn direct_routing_uses_public_ip_for_onlink_peers() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("dr").with_underlay();
    let report = ns.run_async(|| async {
        let mut c = cfg();
        c.direct_routing = true;
        let mut vx = KernelVxlan::setup(c).await.expect("setup");
        let nl = Netlink::connect().unwrap();
        assert_eq!(
            nl.route_get("198.18.0.5".parse().unwrap())
                .await
                .unwrap()
                .gateway,
            None
        );
        assert_eq!(
            nl.route_get("203.0.113.7".parse().unwrap())
                .await
                .unwrap()
                .gateway,
            Some("198.18.0.254".parse().unwrap())
        );
        vx.sync(&[
            vx_peer("10.244.2.0/24", "198.18.0.5", 5),
            vx_peer("10.244.3.0/24", "203.0.113.7", 7),
        ])
        .await
    });
    assert!(report.is_clean(), "{report:?}");
    let all = sorted_lines(&ns.ip(&["route"]));
    assert!(
        all.contains(&"10.244.2.0/24 via 198.18.0.5 dev ul0".to_owned()),
        "{all:?}"
    );
    assert!(
        all.contains(&"10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink".to_owned()),
        "{all:?}"
    );
    assert_eq!(
        sorted_lines(&ns.ip(&["neigh", "show", "dev", "flannel.1"])),
        vec!["10.244.3.0 lladdr 02:00:00:00:00:07 PERMANENT"]
    );
}

#[test]
fn ipv6_device_and_triplets() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("v6").with_underlay();
    ns.run_async_with(|ns| async move {
        let c = KernelVxlanConfig {
            local_ip: "2001:db8:18::1".parse().unwrap(),
            network: "fd42:10:244::/56".parse().unwrap(),
            subnet: "fd42:10:244:1::/64".parse().unwrap(),
            vtep_mac: MacAddr([0x02, 0x42, 0x42, 0, 0, 6]),
            ..cfg()
        };
        let mut vx = KernelVxlan::setup(c).await.expect("setup v6");
        assert_eq!(vx.name(), "flannel-v6.1");
        assert_eq!(vx.mtu(), 1430, "1500 - 70 over an IPv6 underlay");
        let peers = vec![vx_peer("fd42:10:244:2::/64", "2001:db8:18::2", 2)];
        let report = vx.sync(&peers).await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(
            sorted_lines(&ns.ip_line("-6 neigh show dev flannel-v6.1")),
            vec!["fd42:10:244:2:: lladdr 02:00:00:00:00:02 PERMANENT"]
        );
        assert_eq!(
            sorted_lines(&ns.bridge(&["fdb", "show", "dev", "flannel-v6.1"])),
            vec!["02:00:00:00:00:02 dst 2001:db8:18::2 self permanent"]
        );
        let routes = sorted_lines(&ns.ip_line("-6 route show dev flannel-v6.1"));
        assert!(
            routes.iter().any(|r| r.starts_with("fd42:10:244:2::/64 via fd42:10:244:2:: metric 1024 onlink")),
            "{routes:?}"
        );
        let addrs = ns.ip_line("-6 addr show dev flannel-v6.1");
        assert!(addrs.contains("fd42:10:244:1::/128"), "{addrs}");
        let again = vx.sync(&peers).await;
        assert_eq!((again.added, again.removed), (0, 0), "{again:?}");
    });
}

#[test]
fn host_gw_routes_kept_and_cleaned() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("hgw").with_underlay();
    ns.run_async_with(|ns| async move {
        let hcfg = HostGwConfig {
            iface: "ul0".into(),
            iface_addr: "198.18.0.1".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
        };
        let nat = HostGw::setup(HostGwConfig {
            public_ip: "203.0.113.1".parse().unwrap(),
            ..hcfg.clone()
        })
        .await;
        assert!(matches!(nat, Err(HostGwError::BehindNat)));

        let mut hg = HostGw::setup(hcfg).await.expect("setup");
        assert_eq!(hg.mtu(), 1500);
        let hg_peer = |subnet: &str, ip: &str| checked_peer(subnet, ip, None);
        let peers = vec![
            hg_peer("10.244.2.0/24", "198.18.0.5"),
            hg_peer("10.244.3.0/24", "198.18.0.6"),
            // Not on-link: the kernel refuses, the others are unaffected.
            hg_peer("10.244.4.0/24", "203.0.113.7"),
        ];
        let report = hg.sync(&peers).await;
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert_eq!(
            report.failures[0].peer,
            Some("10.244.4.0/24".parse().unwrap())
        );
        let want = vec![
            "10.244.2.0/24 via 198.18.0.5 dev ul0".to_owned(),
            "10.244.3.0/24 via 198.18.0.6 dev ul0".to_owned(),
        ];
        let ours = |ns: &Ns| -> Vec<String> {
            sorted_lines(&ns.ip(&["route"]))
                .into_iter()
                .filter(|l| l.starts_with("10.244."))
                .collect()
        };
        assert_eq!(ours(&ns), want);

        // Deleted behind our back: the periodic sync puts it back ("Route recovered").
        ns.ip(&["route", "del", "10.244.2.0/24"]);
        let report = hg.sync(&peers[..2]).await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.added, 1);
        assert_eq!(ours(&ns), want);

        // Gateway changed: replaced in place.
        let moved = vec![hg_peer("10.244.2.0/24", "198.18.0.8"), peers[1].clone()];
        assert!(hg.sync(&moved).await.is_clean());
        assert_eq!(
            ours(&ns),
            vec![
                "10.244.2.0/24 via 198.18.0.8 dev ul0".to_owned(),
                "10.244.3.0/24 via 198.18.0.6 dev ul0".to_owned(),
            ]
        );

        // A peer leaves.
        let report = hg.sync(&moved[1..]).await;
        assert_eq!(report.removed, 1);
        assert_eq!(
            ours(&ns),
            vec!["10.244.3.0/24 via 198.18.0.6 dev ul0".to_owned()]
        );
    });
}

#[test]
fn netlink_handle_basics() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("nl").with_underlay();
    ns.run_async(|| async {
        let nl = Netlink::connect().unwrap();
        let ul = nl.link_by_name("ul0").await.unwrap().expect("ul0");
        assert_eq!(ul.kind.as_deref(), Some("veth"));
        assert_eq!(
            nl.link_by_index(ul.index).await.unwrap().unwrap().name,
            "ul0"
        );
        assert!(nl.link_by_name("nope0").await.unwrap().is_none());
        let addrs = nl.addr_list(ul.index, IpFamily::V4).await.unwrap();
        assert_eq!(addrs, vec!["198.18.0.1/24".parse().unwrap()]);
        // EEXIST and ENOENT are distinguishable.
        let e = nl
            .addr_add(ul.index, "198.18.0.1/24".parse().unwrap())
            .await
            .unwrap_err();
        assert!(e.is_exists(), "{e}");
        let e = nl
            .neigh_del(ul.index, "198.18.0.77".parse().unwrap())
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().starts_with("ip neigh del 198.18.0.77"), "{e}");
        let routes = nl.route_list(IpFamily::V4).await.unwrap();
        assert!(
            routes
                .iter()
                .any(|r| r.dst.prefix_len() == 0
                    && r.gateway == Some("198.18.0.254".parse().unwrap()))
        );
        let all: BTreeSet<String> = nl
            .links()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert!(all.contains("lo") && all.contains("ul0") && all.contains("ul1"));
    });
}

/// Interface lookups for the external interface: every interface with index, MTU and
/// addresses, the default route's device (first default of the main table; a multipath one
/// names its first next hop), the source towards a destination; and flannel's selection on top.
#[test]
fn interface_lookups_and_external_interface() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("if").with_underlay();
    ns.ip_line("link add ex0 type veth peer name ex1");
    ns.ip_line("link set ex1 up");
    ns.ip_line("link set ex0 mtu 1400 up");
    ns.ip_line("addr add 203.0.113.9/24 dev ex0");
    ns.ip_line("addr add 169.254.3.3/16 dev ex0");
    ns.run_async(|| async {
        let nl = Netlink::connect().unwrap();
        let ifs = nl.interfaces().await.unwrap();
        let ul = ifs.iter().find(|i| i.name == "ul0").expect("ul0");
        let ex = ifs.iter().find(|i| i.name == "ex0").expect("ex0");
        assert_eq!(ul.mtu, 1500);
        assert_eq!(ex.mtu, 1400);
        // IPv4 first, in the order added; then IPv6 (the link-local one comes with the link).
        assert_eq!(
            ex.addrs[..2],
            [
                "203.0.113.9/24".parse().unwrap(),
                "169.254.3.3/16".parse().unwrap()
            ]
        );
        assert_eq!(ul.addrs[0], "198.18.0.1/24".parse().unwrap());
        assert!(
            ul.addrs.contains(&"2001:db8:18::1/64".parse().unwrap()),
            "{ul:?}"
        );
        assert_eq!(
            nl.default_route_index(IpFamily::V4).await.unwrap(),
            Some(ul.index)
        );
        assert_eq!(nl.default_route_index(IpFamily::V6).await.unwrap(), None);
        assert_eq!(
            nl.source_for("203.0.113.77".parse().unwrap())
                .await
                .unwrap(),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert!(nl
            .source_for("2001:db8:99::1".parse().unwrap())
            .await
            .is_err());

        let ext = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            let Ok(Command::Run(f)) = flags::parse(&args, &|_: &str| None) else {
                panic!("flags {args:?}");
            };
            async move { external_interface(&f, IpStack::V4).await }
        };
        let e = ext(&[]).await.unwrap();
        assert_eq!((e.name.as_str(), e.index, e.mtu), ("ul0", ul.index, 1500));
        assert_eq!(e.iface_addr.to_string(), "198.18.0.1");
        let e = ext(&["--public-ip=203.0.113.9"]).await.unwrap();
        assert_eq!((e.name.as_str(), e.mtu), ("ex0", 1400));
        let e = ext(&["--iface-can-reach=203.0.113.200"]).await.unwrap();
        assert_eq!(e.name, "ex0");
        // A regex matches addresses before names; the global address before the link-local.
        let e = ext(&[r"--iface-regex=^(169|203)\."]).await.unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr.to_string().as_str()),
            ("ex0", "203.0.113.9")
        );
        let err = ext(&["--iface=nope0"]).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "Failed to find interface to use that matches the interfaces and/or regexes provided"
        );
    });

    // A multipath default route first in the table: its first next hop's device. IPv6: an
    // unreachable default before the real one is no way out.
    ns.ip_line("route del default");
    ns.ip_line(
        "route add default nexthop via 203.0.113.1 dev ex0 nexthop via 198.18.0.254 dev ul0",
    );
    ns.ip_line("-6 route add unreachable default metric 1");
    ns.ip_line("-6 route add default via 2001:db8:18::fe dev ul0 metric 2");
    ns.run_async(|| async {
        let nl = Netlink::connect().unwrap();
        let index = |name: &'static str| {
            let nl = nl.clone();
            async move { nl.link_by_name(name).await.unwrap().expect(name).index }
        };
        let (ex, ul) = (index("ex0").await, index("ul0").await);
        let v4 = nl.default_route_index(IpFamily::V4).await.unwrap();
        let v6 = nl.default_route_index(IpFamily::V6).await.unwrap();
        assert_eq!((v4, v6), (Some(ex), Some(ul)));
        // Dual stack: both default routes must leave through one interface.
        let err = external_interface(&flags::Flags::default(), IpStack::Dual)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "v6 default route interface ul0 must be the same with v4 default route interface ex0"
        );
        let e = external_interface(&flags::Flags::default(), IpStack::V6)
            .await
            .unwrap();
        assert_eq!(e.name, "ul0");
    });
    // No default route: flannel's error.
    ns.ip_line("route del default");
    let err = ns.run_async(|| async {
        let f = flags::Flags::default();
        external_interface(&f, IpStack::V4)
            .await
            .unwrap_err()
            .to_string()
    });
    assert_eq!(
        err,
        "Failed to find any valid interface to use: failed to get default interface: no default route"
    );
}

// ---------------------------------------------------------------------------------------

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Control-plane scale: 5,000 peers synced at once. Prints time to programmed and RSS.
#[test]
#[ignore = "benchmark helper; run explicitly with --ignored --nocapture"]
fn scale_5000_peers() {
    if !privileged() {
        return;
    }
    const N: u32 = 5000;
    let ns = Netns::new("scale").with_underlay();
    let peers: Vec<Peer> = (0..N)
        .map(|i| {
            let n = i + 2; // skip our own 10.128.1.0/24 … use /24s from 10.128.0.2.0 upwards
            let subnet = format!("10.{}.{}.0/24", 128 + (n >> 8), n & 0xff);
            let ip = std::net::Ipv4Addr::new(198, 18 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
            let m = MacAddr([0x02, 0, 0, 0, (n >> 8) as u8, n as u8]);
            checked_peer(&subnet, &ip.to_string(), Some(m))
        })
        .collect();
    let rss_before = rss_kib();
    let (setup, first, second, report) = ns.run_async(move || async move {
        let c = KernelVxlanConfig {
            network: "10.128.0.0/9".parse().unwrap(),
            subnet: "10.128.1.0/24".parse().unwrap(),
            ..cfg()
        };
        let t = Instant::now();
        let mut vx = KernelVxlan::setup(c).await.expect("setup");
        let setup = t.elapsed();
        let t = Instant::now();
        let report = vx.sync(&peers).await;
        let first = t.elapsed();
        let t = Instant::now();
        let again = vx.sync(&peers).await;
        let second = t.elapsed();
        assert_eq!(again.added, 0);
        (setup, first, second, report)
    });
    let rss_after = rss_kib();
    assert!(report.is_clean(), "{:?}", report.failures.first());
    assert_eq!(report.added as u32, 3 * N);
    let neigh = ns
        .ip(&["neigh", "show", "dev", "flannel.1"])
        .lines()
        .count();
    let fdb = ns
        .bridge(&["fdb", "show", "dev", "flannel.1"])
        .lines()
        .count();
    let routes = ns
        .ip(&["route", "show", "dev", "flannel.1"])
        .lines()
        .count();
    assert_eq!((neigh, fdb, routes), (N as usize, N as usize, N as usize));
    println!(
        "scale: {N} peers: setup {setup:?}, first sync (programmed) {first:?}, \
         no-op resync {second:?}, RSS {} MiB (before {} MiB)",
        rss_after / 1024,
        rss_before / 1024
    );
}
