//! Upstream settings that used to be accepted and ignored (issue #11), end to end through the
//! netns-harness: `--ip-blackhole-route` and DirectRouting in userspace mode.
//! Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, CaptureOpts, NodeKind};

use NodeKind::Userspace;

#[test]
fn ip_blackhole_route_is_installed_and_kept() {
    if !privileged_test_guard("ip_blackhole_route_is_installed_and_kept") {
        return;
    }
    let _g = serial();
    // No pods: no cni0 bridge whose connected route would take the subnet's key (Canal's
    // layout, which is what the flag is for).
    let mut s = spec(&[Userspace, Userspace], 0);
    s.flanneld_args
        .extend(["--ip-blackhole-route".into(), "--iptables-resync=1".into()]);
    let c = netns_harness::Cluster::up(&s).expect("cluster up");
    let subnet = c
        .node("n1")
        .expect("n1")
        .subnet
        .expect("subnet")
        .to_string();
    let want = format!("blackhole {subnet}");
    let shown = || {
        sh(
            &c,
            "n1",
            &["ip", "-4", "route", "show", "type", "blackhole"],
        )
    };
    assert!(
        wait_for(Duration::from_secs(5), || shown()
            .lines()
            .any(|l| l.trim() == want))
        .is_some(),
        "no `{want}` on n1: {}",
        shown()
    );
    // Exactly one, of our subnet only (n2's subnet is not blackholed here).
    assert_eq!(shown().lines().count(), 1, "{}", shown());
    // Deleted by hand: back within the resync period (1 s here), like flannel's loop.
    sh(&c, "n1", &["ip", "route", "del", "blackhole", &subnet]);
    assert!(
        wait_for(Duration::from_secs(5), || shown()
            .lines()
            .any(|l| l.trim() == want))
        .is_some(),
        "blackhole route not restored: {}",
        shown()
    );
    // n2 blackholes its own subnet, not n1's.
    let n2 = sh(
        &c,
        "n2",
        &["ip", "-4", "route", "show", "type", "blackhole"],
    );
    let n2_subnet = c
        .node("n2")
        .expect("n2")
        .subnet
        .expect("subnet")
        .to_string();
    assert_eq!(n2.trim(), format!("blackhole {n2_subnet}"), "{n2}");
    teardown(c);
}

#[test]
fn userspace_direct_routing_skips_the_tunnel_on_one_l2_segment() {
    if !privileged_test_guard("userspace_direct_routing_skips_the_tunnel_on_one_l2_segment") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace, Userspace], 1);
    s.net_conf = Some(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#.into(),
    );
    // Real-wire underlay: the capture counts MTU-sized frames.
    s.underlay_tx_offload = false;
    let mut c = netns_harness::Cluster::up(&s).expect("DirectRouting cluster up");
    // Both nodes route each other's subnet via the peer's underlay address on eth0.
    for (node, peer) in [("n1", "n2"), ("n2", "n1")] {
        let p = c.node(peer).expect("peer");
        let want = format!(
            "{} via {} dev eth0",
            p.subnet.expect("subnet"),
            p.underlay_ip
        );
        assert!(
            wait_for(Duration::from_secs(5), || sh(&c, node, &["ip", "route"])
                .contains(&want))
            .is_some(),
            "{node}: no `{want}`: {}",
            sh(&c, node, &["ip", "route"])
        );
    }
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");

    // With the routes in place, every pod and host path crosses the underlay unencapsulated.
    let cap = c
        .start_capture(&CaptureOpts::default())
        .expect("capture start");
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    let (sent, got, bytes) = transfer(&c, "n1p1", "n2p1", 2, 9011);
    assert_eq!(bytes, 2 << 20);
    assert_eq!(sent, got);
    let pcap = c.stop_capture(&cap.name).expect("capture stop");
    let report = c.verify_capture(&pcap).expect("verify capture");
    println!("{report}");
    assert!(report.frames > 100, "the capture saw the traffic: {report}");
    assert_eq!(
        report.vxlan_frames, 0,
        "on-link peers must not be encapsulated to: {report}"
    );
    teardown(c);
}
