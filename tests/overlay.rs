//! The userspace VXLAN data plane end to end: clusters of network namespaces built by the
//! netns-harness, with our flanneld on `userspace` nodes and upstream-flannel-programmed
//! kernel vxlan on `kernel-ref` nodes. Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, CaptureOpts, NodeKind};

use NodeKind::{KernelRef, Userspace};

#[test]
fn userspace_and_kernel_ref_interoperate() {
    if !privileged_test_guard("userspace_and_kernel_ref_interoperate") {
        return;
    }
    let _g = serial();
    // Real-wire underlay (--link-offloads off): the capture verifies every checksum;
    // tests/offloads.rs covers the kind-like default.
    let mut s = spec(&[Userspace, Userspace, KernelRef], 1);
    s.underlay_tx_offload = false;
    let mut c = netns_harness::Cluster::up(&s).expect("cluster up");
    assert!(run(&c, "n1", &["ethtool", "-k", "eth0"])
        .1
        .contains("tx-checksumming: off"));
    let cap = c
        .start_capture(&CaptureOpts::default())
        .expect("capture start");

    // Every cell: userspace<->userspace and userspace<->kernel-ref, both directions.
    let m = c.check_until_pass(Duration::from_secs(5));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    for (a, b) in [("n1p1", "n2p1"), ("n1p1", "n3p1"), ("n3p1", "n2p1")] {
        assert_eq!(m.cell(a, b).expect("cell").letters(), "ITUD", "{a}->{b}");
        assert_eq!(m.cell(b, a).expect("cell").letters(), "ITUD", "{b}->{a}");
    }

    // Bulk TCP in both kinds of pair while the capture runs (TSO super-packets are split by
    // our data plane, so every segment's checksums are ours).
    for (from, to, port) in [("n1p1", "n2p1", 9001), ("n3p1", "n1p1", 9002)] {
        let (sent, got, bytes) = transfer(&c, from, to, 8, port);
        assert_eq!(bytes, 8 << 20, "{from}->{to}");
        assert_eq!(sent, got, "{from}->{to}");
    }

    // Pings at exactly the overlay MTU with DF pass, across both kinds of peer.
    let mtu = c.node("n1").expect("n1").mtu;
    assert_eq!(mtu, 1450);
    let size = (mtu - 28).to_string();
    for (from, to) in [("n1p1", "n2p1"), ("n1p1", "n3p1"), ("n3p1", "n1p1")] {
        let dst = c.pod_ip(to).expect("ip").to_string();
        let (ok, out) = run(
            &c,
            from,
            &["ping", "-M", "do", "-s", &size, "-c", "2", "-W", "2", &dst],
        );
        assert!(ok, "{from}->{to} at MTU: {out}");
    }
    // One byte more from a pod whose own link would allow it: the node must answer with
    // ICMP "fragmentation needed" naming the overlay MTU, not drop it silently.
    run(&c, "n1p1", &["ip", "link", "set", "eth0", "mtu", "1500"]);
    let dst = c.pod_ip("n2p1").expect("ip").to_string();
    let bigger = (mtu - 27).to_string();
    let (ok, out) = run(
        &c,
        "n1p1",
        &[
            "ping", "-M", "do", "-s", &bigger, "-c", "2", "-W", "2", &dst,
        ],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("Frag needed") && out.contains(&format!("mtu = {mtu}")),
        "expected an ICMP fragmentation-needed error: {out}"
    );
    run(
        &c,
        "n1p1",
        &["ip", "link", "set", "eth0", "mtu", &mtu.to_string()],
    );

    let pcap = c.stop_capture(&cap.name).expect("capture stop");
    let report = c.verify_capture(&pcap).expect("tshark");
    println!("{report:?}");
    assert!(report.vxlan_frames > 1000, "{report:?}");
    assert!(report.all_checksums_ok(), "{report:?}");

    // 100 MB pod to pod across nodes, checked end to end.
    let (sent, got, bytes) = transfer(&c, "n2p1", "n1p1", 100, 9003);
    assert_eq!(bytes, 100 << 20);
    assert_eq!(sent, got);
    teardown(c);
}

#[test]
fn peers_follow_lease_changes_within_two_seconds() {
    if !privileged_test_guard("peers_follow_lease_changes_within_two_seconds") {
        return;
    }
    let _g = serial();
    let mut c = netns_harness::Cluster::up(&spec(&[Userspace, Userspace, KernelRef], 1))
        .expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());

    // Traffic keeps running while a node joins.
    let n2p1 = c.pod_ip("n2p1").expect("ip").to_string();
    let n1p1_ns = c.pod("n1p1").expect("pod").ns.clone();
    let background = std::process::Command::new("ip")
        .args([
            "netns", "exec", &n1p1_ns, "ping", "-i", "0.05", "-c", "80", "-W", "1", &n2p1,
        ])
        .output_async();

    let n4 = c.add_node(Userspace).expect("add node");
    let n4p1 = format!("{n4}p1");
    let targets: Vec<(String, String)> = ["n1p1", "n2p1", "n3p1"]
        .iter()
        .flat_map(|p| {
            let a = c.pod_ip(p).expect("ip").to_string();
            let b = c.pod_ip(&n4p1).expect("ip").to_string();
            [(p.to_string(), b), (n4p1.clone(), a)]
        })
        .collect();
    let took = wait_for(Duration::from_secs(10), || {
        targets.iter().all(|(from, to)| ping_ok(&c, from, to))
    });
    eprintln!("join took {took:?}");
    if took.is_none() {
        for (from, to) in &targets {
            eprintln!("{from}->{to}: {}", ping_ok(&c, from, to));
        }
        for n in ["n1", "n2", &n4] {
            eprintln!(
                "--- {n} log\n{}",
                std::fs::read_to_string(c.flanneld_log(n)).unwrap_or_default()
            );
        }
        eprintln!(
            "{:?}",
            std::fs::read_dir(c.lease_dir().subnets_dir())
                .map(|d| d.map(|e| e.map(|e| e.file_name())).collect::<Vec<_>>())
        );
    }
    assert!(
        took.is_some_and(|t| t <= Duration::from_secs(2)),
        "new node not reachable from every node within 2 s: {took:?}"
    );
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    let bg = background.join();
    let bg_text = String::from_utf8_lossy(&bg.stdout);
    assert!(
        bg_text.contains(" 0% packet loss"),
        "traffic disturbed by the join: {bg_text}"
    );

    // Removing n2's lease: peers drop it within 2 s, and our data plane then answers with
    // "net unreachable" instead of forwarding to a node that left.
    let n2_subnet = c.node("n2").expect("n2").subnet.expect("subnet");
    c.lease_dir().remove(&n2_subnet).expect("remove lease");
    let took = wait_for(Duration::from_secs(2), || {
        let (ok, out) = run(&c, "n1p1", &["ping", "-c", "1", "-W", "1", &n2p1]);
        !ok && out.contains("Unreachable")
    });
    assert!(
        took.is_some(),
        "n1 still forwards to the removed lease after 2 s"
    );
    teardown(c);
}

#[test]
fn bad_datagrams_and_corrupt_leases_are_dropped_and_counted() {
    if !privileged_test_guard("bad_datagrams_and_corrupt_leases_are_dropped_and_counted") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace, Userspace], 1);
    s.nodes[0].extra_args = vec!["--metrics-port=9101".into()];
    let c = netns_harness::Cluster::up(&s).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());

    let mac = published_mac(&c, "n1");
    let n1_ip = c.node_ip("n1").expect("ip").to_string();
    let n1p1 = c.pod_ip("n1p1").expect("ip").to_string();
    // From a known peer (n2): wrong VNI, wrong inner MAC, I flag clear, truncated; 5 each.
    let sender = r#"
import socket, struct, sys
dst, mac, inner_dst = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, socket.inet_aton("10.244.99.9"), inner_dst) + b"\0" * 8
def frame(flags, vni, dmac):
    return struct.pack("!B3xI", flags, vni << 8) + dmac + b"\x02\0\0\0\0\x01" + b"\x08\x00" + ip
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(frame(0x08, 99, mac), (dst, 8472))
    s.sendto(frame(0x08, 1, b"\x02\0\0\0\0\x99"), (dst, 8472))
    s.sendto(frame(0x00, 1, mac), (dst, 8472))
    s.sendto(b"\x08\0\0", (dst, 8472))
"#;
    let fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9101/metrics', timeout=5).read().decode())";
    let metric = |text: &str, reason: &str| -> u64 {
        let key = format!("flannel_vxlan_drops_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // Counters before: traffic of the cluster coming up (e.g. n2's matrix probes that reached
    // n1 before n1 had read n2's lease) may already count as unknown_source.
    let reasons = [
        "unknown_source",
        "wrong_vni",
        "wrong_dst_mac",
        "vxlan_flag_not_set",
        "truncated",
    ];
    let before_text = sh(&c, "n1", &["python3", "-c", fetch]);
    let before: Vec<u64> = reasons.iter().map(|r| metric(&before_text, r)).collect();
    let delta = |text: &str, reason: &str| -> u64 {
        let i = reasons.iter().position(|r| *r == reason).unwrap_or(0);
        metric(text, reason).saturating_sub(before[i])
    };
    let (ok, out) = run(&c, "n2", &["python3", "-c", sender, &n1_ip, &mac, &n1p1]);
    assert!(ok, "{out}");
    // From an address that is no node's public IP: an otherwise valid frame.
    run(
        &c,
        "ul",
        &["ip", "addr", "add", "198.18.0.250/24", "dev", "br0"],
    );
    let (ok, out) = run(&c, "ul", &["python3", "-c", sender, &n1_ip, &mac, &n1p1]);
    assert!(ok, "{out}");

    let mut text = String::new();
    let counted = wait_for(Duration::from_secs(3), || {
        text = sh(&c, "n1", &["python3", "-c", fetch]);
        delta(&text, "unknown_source") >= 20
    });
    assert!(counted.is_some(), "{text}");
    assert_eq!(delta(&text, "unknown_source"), 20, "{before_text}\n{text}");
    assert_eq!(delta(&text, "wrong_vni"), 5, "{text}");
    assert_eq!(delta(&text, "wrong_dst_mac"), 5, "{text}");
    assert_eq!(delta(&text, "vxlan_flag_not_set"), 5, "{text}");
    assert_eq!(delta(&text, "truncated"), 5, "{text}");

    // A corrupt lease file is skipped with a warning naming it; everyone else keeps working.
    let bad = c.lease_dir().subnets_dir().join("10.244.250.0-24");
    std::fs::write(&bad, b"{\"PublicIP\": 42, broken").expect("write corrupt lease");
    let log = c.flanneld_log("n1");
    let named = wait_for(Duration::from_secs(2), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("10.244.250.0-24"))
    });
    assert!(
        named.is_some(),
        "no warning naming the corrupt lease in {}",
        log.display()
    );
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    teardown(c);
}

#[test]
fn sigterm_keeps_the_device_and_restart_keeps_lease_and_mac() {
    if !privileged_test_guard("sigterm_keeps_the_device_and_restart_keeps_lease_and_mac") {
        return;
    }
    let _g = serial();
    let mut c = netns_harness::Cluster::up(&spec(&[Userspace, Userspace], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    let mac = published_mac(&c, "n1");
    let subnet = c.node("n1").expect("n1").subnet;
    let index = sh(&c, "n1", &["cat", "/sys/class/net/flannel.1/ifindex"]);

    // SIGTERM leaves the device, its address and its route in place (as upstream's kernel
    // device stays), so the next start attaches to it.
    c.stop_flanneld("n1").expect("stop");
    let (exists, _) = run(&c, "n1", &["ip", "link", "show", "flannel.1"]);
    assert!(exists, "flannel.1 removed by SIGTERM");
    let addrs = sh(&c, "n1", &["ip", "-4", "addr", "show", "dev", "flannel.1"]);
    let own = format!("{}/32", subnet.expect("subnet").addr);
    assert!(addrs.contains(&own), "{addrs}");
    let routes = sh(&c, "n1", &["ip", "route", "show", "dev", "flannel.1"]);
    assert!(routes.contains("10.244.0.0/16"), "{routes}");
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    assert!(log.contains("Exiting cleanly"), "{log}");
    // The kept device is up but nobody forwards: doctor must not call it healthy.
    let d = c.doctor("n1").expect("doctor");
    assert!(
        d.stdout.contains(
            "FAIL vxlan-device: flannel.1 (userspace TUN) is up but no flanneld holds it"
        ),
        "{}",
        d.stdout
    );

    c.start_flanneld("n1").expect("start");
    assert_eq!(
        c.node("n1").expect("n1").subnet,
        subnet,
        "lease changed across restart"
    );
    assert_eq!(
        published_mac(&c, "n1"),
        mac,
        "VTEP MAC changed across restart"
    );
    assert_eq!(
        sh(&c, "n1", &["cat", "/sys/class/net/flannel.1/ifindex"]),
        index,
        "the device was recreated instead of adopted"
    );
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");
    teardown(c);
}
