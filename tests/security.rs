//! Control-plane security end to end (issue 9, tests b, c, e): pods cannot speak VXLAN as
//! their node, kernel mode accepts VXLAN only from lease public IPs, and bad leases (equal to
//! Network, overlapping ours, carrying our public IP) are refused, named once and counted
//! while the honest nodes keep working. Frames are sent through real sockets from namespaces;
//! what reached the target is asserted with a capture inside the target pod's namespace.
//! Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};

use NodeKind::{Kernel, Userspace};

/// UDP port of the inner datagram the crafted frames carry to a pod.
const MARK_PORT: &str = "9999";

/// Sends `count` VXLAN frames (VNI 1, inner Ethernet to `mac`) carrying an IPv4/UDP datagram
/// from `inner_src` to `inner_dst`:9999 to `dst`:8472, from whichever namespace runs it.
const SENDER: &str = r#"
import socket, struct, sys
dst, mac, inner_src, inner_dst, count = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3]), socket.inet_aton(sys.argv[4]), int(sys.argv[5])
payload = b"flannel-rs-guard-test"
udp = struct.pack("!HHHH", 40000, 9999, 8 + len(payload), 0) + payload
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, 0, 64, 17, 0, inner_src, inner_dst)
s = sum(struct.unpack("!10H", hdr))
while s > 0xffff:
    s = (s & 0xffff) + (s >> 16)
hdr = hdr[:10] + struct.pack("!H", ~s & 0xffff) + hdr[12:]
frame = struct.pack("!B3xI", 0x08, 1 << 8) + mac + b"\x02\0\0\0\0\x77" + b"\x08\x00" + hdr + udp
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    sock.sendto(frame, (dst, 8472))
"#;

/// Runs `send` while tcpdump listens in namespace `ns` for UDP to port 9999 (bounded: 4 s,
/// 1000 packets); returns how many such packets it saw.
fn captured_in(c: &Cluster, ns: &str, send: impl FnOnce()) -> usize {
    std::thread::scope(|s| {
        let cap = s.spawn(|| {
            run(
                c,
                ns,
                &[
                    "timeout", "4", "tcpdump", "-l", "-n", "-i", "eth0", "-c", "1000", "udp",
                    "dst", "port", MARK_PORT,
                ],
            )
            .1
        });
        std::thread::sleep(Duration::from_millis(1200));
        send();
        let out = cap.join().expect("capture thread");
        out.lines().filter(|l| l.contains(".9999:")).count()
    })
}

/// Packet count of the DROP rules of `chain` for `source` (`iptables -L -v -x -n` columns:
/// pkts bytes target prot opt in out source destination).
fn drops(c: &Cluster, node: &str, chain: &str, source: &str) -> u64 {
    let out = sh(c, node, &["iptables", "-w", "-L", chain, "-v", "-x", "-n"]);
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 7 && f[2] == "DROP" && f[7] == source)
        .filter_map(|f| f[0].parse::<u64>().ok())
        .sum()
}

#[test]
fn pods_cannot_speak_vxlan_and_kernel_mode_accepts_it_only_from_leases() {
    if !privileged_test_guard("pods_cannot_speak_vxlan_and_kernel_mode_accepts_it_only_from_leases")
    {
        return;
    }
    let _g = serial();
    let c = Cluster::up(&spec(&[Kernel, Kernel, Userspace], 1)).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(10));
    assert!(m.all_pass(), "{m}");

    let mac = published_mac(&c, "n1");
    let n1_ip = c.node_ip("n1").expect("ip").to_string();
    let target = c.pod_ip("n1p1").expect("ip").to_string();
    // An inner source in n2's subnet: what a peer's pod would send.
    let n2_subnet = c.node_subnet("n2").expect("subnet").to_string();
    let inner_src = n2_subnet.replace(".0/24", ".99");
    let send_from = |ns: &str| {
        let (ok, out) = run(
            &c,
            ns,
            &[
                "python3", "-c", SENDER, &n1_ip, &mac, &inner_src, &target, "20",
            ],
        );
        assert!(ok, "{ns}: {out}");
    };
    // The allow-list is in place on the kernel node, with both peers' public IPs.
    let guard = sh(&c, "n1", &["iptables", "-w", "-S", "FLANNEL-VXLAN-IN"]);
    for peer in ["n2", "n3"] {
        let ip = c.node_ip(peer).expect("ip");
        assert!(guard.contains(&format!("-s {ip}/32 ")), "{peer}: {guard}");
    }

    // Control: from n2's host (a lease's public IP) the frame is valid and the kernel
    // delivers its inner datagram to the pod, so the capture below can see it.
    let seen = captured_in(&c, "n1p1", || send_from("n2"));
    assert!(
        seen >= 15,
        "control frames from n2's public IP: {seen} delivered"
    );

    // (c) From an address that holds no lease: dropped before the kernel's vxlan socket.
    run(
        &c,
        "ul",
        &["ip", "addr", "add", "198.18.0.250/24", "dev", "br0"],
    );
    let before = drops(&c, "n1", "FLANNEL-VXLAN-IN", "0.0.0.0/0");
    let seen = captured_in(&c, "n1p1", || send_from("ul"));
    assert_eq!(seen, 0, "VXLAN from a non-lease address reached the pod");
    let after = drops(&c, "n1", "FLANNEL-VXLAN-IN", "0.0.0.0/0");
    assert!(
        after >= before + 20,
        "final DROP counted {before} -> {after}"
    );

    // (b) From a pod on a peer node (kernel n2, userspace n3): flannel's MASQUERADE would make
    // it n2's/n3's public IP; it is dropped in FORWARD on the sending node instead.
    for (node, pod) in [("n2", "n2p1"), ("n3", "n3p1")] {
        let before = drops(&c, node, "FLANNEL-VXLAN-FWD", "10.244.0.0/16");
        let seen = captured_in(&c, "n1p1", || send_from(pod));
        assert_eq!(seen, 0, "VXLAN from pod {pod} reached n1p1");
        let after = drops(&c, node, "FLANNEL-VXLAN-FWD", "10.244.0.0/16");
        assert!(
            after >= before + 20,
            "{node}: FORWARD drop counted {before} -> {after}"
        );
    }
    // A pod towards its own node's VXLAN port: dropped in INPUT.
    let n3_ip = c.node_ip("n3").expect("ip").to_string();
    let before = drops(&c, "n3", "FLANNEL-VXLAN-IN", "10.244.0.0/16");
    let (ok, out) = run(
        &c,
        "n3p1",
        &[
            "python3", "-c", SENDER, &n3_ip, &mac, &inner_src, &target, "5",
        ],
    );
    assert!(ok, "{out}");
    let after = drops(&c, "n3", "FLANNEL-VXLAN-IN", "10.244.0.0/16");
    assert!(
        after >= before + 5,
        "n3 INPUT drop counted {before} -> {after}"
    );

    // doctor sees the rules in place on both kinds of node, and the allow-list go missing.
    let doctor = |node: &str| {
        let argv = c.doctor_command(node).expect("doctor command");
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = c
            .exec_timeout(node, &args, Duration::from_secs(60))
            .expect("run doctor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for node in ["n1", "n3"] {
        let out = doctor(node);
        assert!(out.contains("PASS vxlan-guard: "), "{node}:\n{out}");
    }
    sh(&c, "n1", &["iptables", "-w", "-F", "FLANNEL-VXLAN-IN"]);
    let out = doctor("n1");
    assert!(out.contains("FAIL vxlan-guard: "), "{out}");
    // The daemon's periodic check (--iptables-resync, 5 s) puts it back.
    let back = wait_for(Duration::from_secs(12), || {
        sh(&c, "n1", &["iptables", "-w", "-S", "FLANNEL-VXLAN-IN"]).contains("-j RETURN")
    });
    assert!(back.is_some(), "allow-list not restored");
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    teardown(c);
}

#[test]
fn bad_leases_are_refused_named_once_and_counted() {
    if !privileged_test_guard("bad_leases_are_refused_named_once_and_counted") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace, Kernel], 1);
    for n in &mut s.nodes {
        n.extra_args = vec!["--metrics-port=9101".into()];
    }
    let c = Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(10));
    assert!(m.all_pass(), "{m}");

    let dir = c.lease_dir().subnets_dir();
    let vx = |ip: &str, mac: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    };
    for node in ["n1", "n2"] {
        let own = c.node_subnet(node).expect("subnet").to_string();
        let own_ip = c.node_ip(node).expect("ip").to_string();
        // A /25 inside the node's own /24 (a subnet key of its own /24 would be its lease).
        let inside = own.replace(".0/24", ".128-25");
        std::fs::write(dir.join(&inside), vx("198.18.0.71", "02:00:00:00:07:01")).expect("write");
        // A lease carrying the node's own public IP.
        let third = if node == "n1" { 201 } else { 202 };
        std::fs::write(
            dir.join(format!("10.244.{third}.0-24")),
            vx(&own_ip, "02:00:00:00:07:02"),
        )
        .expect("write");
    }
    // A lease equal to Network: with upstream ordering it would swallow every /24.
    std::fs::write(
        dir.join("10.244.0.0-16"),
        vx("198.18.0.77", "02:00:00:00:07:07"),
    )
    .expect("write");

    for node in ["n1", "n2"] {
        let own = c.node_subnet(node).expect("subnet").to_string();
        let own_ip = c.node_ip(node).expect("ip").to_string();
        let third = if node == "n1" { 201 } else { 202 };
        let needles = [
            "lease 10.244.0.0/16 of node 198.18.0.77 refused: subnet is not strictly inside Network 10.244.0.0/16".to_owned(),
            format!(
                "lease {} of node 198.18.0.71 refused: overlaps our own subnet {own}",
                own.replace(".0/24", ".128/25")
            ),
            format!("lease 10.244.{third}.0/24 of node {own_ip} refused: PublicIP is one of this node's addresses"),
        ];
        let log = c.flanneld_log(node);
        let named = wait_for(Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            needles.iter().all(|n| text.contains(n.as_str()))
        });
        assert!(
            named.is_some(),
            "{node}: not all named in {}",
            log.display()
        );
    }
    // Longer than a resync (10 s): still named exactly once each.
    std::thread::sleep(Duration::from_secs(12));
    let fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9101/metrics', timeout=5).read().decode())";
    for node in ["n1", "n2"] {
        let text = std::fs::read_to_string(c.flanneld_log(node)).expect("log");
        let own_ip = c.node_ip(node).expect("ip").to_string();
        for needle in [
            "lease 10.244.0.0/16 of node 198.18.0.77 refused".to_owned(),
            "of node 198.18.0.71 refused: overlaps our own subnet".to_owned(),
            format!("of node {own_ip} refused: PublicIP is one of this node's"),
        ] {
            assert_eq!(text.matches(needle.as_str()).count(), 1, "{node}: {needle}");
        }
        let metrics = sh(&c, node, &["python3", "-c", fetch]);
        for reason in ["outside_network", "overlaps_own_subnet", "own_public_ip"] {
            let line = format!("flannel_refused_leases_total{{reason=\"{reason}\"}} 1");
            assert!(metrics.contains(&line), "{node}: {line}\n{metrics}");
        }
        let routes = sh(&c, node, &["ip", "route"]);
        assert!(!routes.contains("10.244.0.0/16 via"), "{node}: {routes}");
        assert!(!routes.contains(".128/25"), "{node}: {routes}");
    }
    // The honest nodes still reach each other's pods.
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    teardown(c);
}
