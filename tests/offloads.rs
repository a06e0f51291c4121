//! Links that pass unfinished checksums (`--link-offloads on`, the harness default): the
//! underlay veths keep tx checksum offload and GSO on, as in kind, so a kernel vxlan peer's
//! inner TCP/UDP checksums cross as the pseudo-header sum `CHECKSUM_PARTIAL` leaves. Our
//! userspace nodes must complete them on receive, interoperate with kernel-ref nodes in
//! every direction, and still send only finished inner checksums. Privileged: run as root
//! (CI=true makes it mandatory).
//!
//! `OFFLOADS_TEST_FLANNELD=/path/to/flanneld` runs it against another build (e.g. one from
//! before receive-side completion, to see it fail).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::scenario::parse_ethtool_feature;
use netns_harness::{privileged_test_guard, CaptureOpts, NodeKind};

use NodeKind::{KernelRef, Userspace};

const METRICS_PORT: u16 = 9131;

fn metric(c: &netns_harness::Cluster, node: &str, name: &str) -> Option<u64> {
    let fetch = format!(
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"
    );
    let text = run(c, node, &["python3", "-c", &fetch]).1;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn mixed_cluster_interoperates_on_links_with_unfinished_checksums() {
    if !privileged_test_guard("mixed_cluster_interoperates_on_links_with_unfinished_checksums") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace, KernelRef, Userspace], 1);
    assert!(
        s.underlay_tx_offload,
        "the harness default is --link-offloads on"
    );
    if let Some(bin) = std::env::var_os("OFFLOADS_TEST_FLANNELD") {
        s.flanneld = Some(bin.into());
    }
    for n in [0, 2] {
        s.nodes[n].extra_args = vec![format!("--metrics-port={METRICS_PORT}")];
    }
    let mut c = netns_harness::Cluster::up(&s).expect("cluster up");
    for node in ["n1", "n2", "n3"] {
        let k = sh(&c, node, &["ethtool", "-k", "eth0"]);
        assert_eq!(
            parse_ethtool_feature(&k, "tx-checksum-ip-generic"),
            Some(true),
            "{node}: eth0 keeps tx checksum offload:\n{k}"
        );
    }
    let cap = c
        .start_capture(&CaptureOpts {
            max_packets: 20_000,
            max_seconds: 120,
            filter: Some("udp port 8472".into()),
            ..CaptureOpts::default()
        })
        .expect("capture start");

    // Every cell, ICMP, TCP, UDP and DNS, between kernel-ref and userspace nodes both ways.
    let m = c.check_until_pass(Duration::from_secs(10));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    for (a, b) in [("n1p1", "n2p1"), ("n3p1", "n2p1"), ("n1p1", "n3p1")] {
        assert_eq!(m.cell(a, b).expect("cell").letters(), "ITUD", "{a}->{b}");
        assert_eq!(m.cell(b, a).expect("cell").letters(), "ITUD", "{b}->{a}");
    }
    // Bulk TCP from the kernel peer to a userspace node and back, checked end to end.
    for (from, to, port) in [("n2p1", "n1p1", 9021), ("n1p1", "n2p1", 9022)] {
        let (sent, got, bytes) = transfer(&c, from, to, 4, port);
        assert_eq!(bytes, 4 << 20, "{from}->{to}");
        assert_eq!(sent, got, "{from}->{to}");
    }

    let pcap = c.stop_capture(&cap.name).expect("capture stop");
    let r = c.verify_capture(&pcap).expect("tshark");
    println!(
        "{r}\nper sender: {:?}, bad inner: {:?}",
        r.vxlan_by_src, r.bad_inner_by_src
    );
    let ip = |n: &str| c.node_ip(n).expect("node ip").to_string();
    // The link really is kind-like: the kernel peer's inner checksums cross unfinished.
    assert!(
        r.bad_inner_from(&ip("n2")) > 0,
        "kernel-ref inner checksums should cross unfinished on this link: {r}"
    );
    // What we send is finished, whatever the link does to the outer checksums.
    for n in ["n1", "n3"] {
        assert!(r.vxlan_from(&ip(n)) > 10, "{n} sent VXLAN: {r}");
        assert_eq!(r.bad_inner_from(&ip(n)), 0, "{n}: bad inner checksums: {r}");
    }
    // The receive path completed them (and counted it); nothing else was bad.
    let completed = metric(&c, "n1", "flannel_vxlan_rx_checksums_completed_total");
    assert!(completed.is_some_and(|n| n > 0), "{completed:?}");
    assert_eq!(
        metric(&c, "n1", "flannel_vxlan_rx_bad_checksums_total"),
        Some(0)
    );
    teardown(c);
}
