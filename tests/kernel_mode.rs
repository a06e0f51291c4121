//! `--dataplane=kernel`, host-gw and DirectRouting end to end through the netns-harness:
//! flannel's kernel programming, restarts without loss, start-up reconcile, device recovery.
//! Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};
use test_support::sorted_lines;

use NodeKind::{Kernel, KernelRef, Userspace};

/// The lines flannel's vxlan backend programs on `node` for every other flannel node.
fn expected_triplets(c: &Cluster, node: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (leases, _) = c.lease_dir().read_all().expect("leases");
    let own = c.node(node).expect("node").subnet.expect("subnet");
    let (mut routes, mut neigh, mut fdb) = (Vec::new(), Vec::new(), Vec::new());
    for l in leases.iter().filter(|l| l.subnet != own) {
        let vx = l.vxlan().expect("vxlan lease");
        let net = l.subnet.network();
        routes.push(format!("{} via {net} onlink", l.subnet));
        neigh.push(format!("{net} lladdr {} PERMANENT", vx.vtep_mac));
        fdb.push(format!(
            "{} dst {} self permanent",
            vx.vtep_mac, l.attrs.public_ip
        ));
    }
    (routes, neigh, fdb)
}

fn assert_programmed_like_flannel(c: &Cluster, node: &str) {
    let (mut routes, mut neigh, mut fdb) = expected_triplets(c, node);
    routes.sort();
    neigh.sort();
    fdb.sort();
    assert_eq!(
        sorted_lines(&sh(c, node, &["ip", "route", "show", "dev", "flannel.1"])),
        routes
    );
    assert_eq!(
        sorted_lines(&sh(c, node, &["ip", "neigh", "show", "dev", "flannel.1"])),
        neigh
    );
    // `bridge fdb show dev` also lists the device's own permanent entries; keep peers only.
    let fdb_now: Vec<String> =
        sorted_lines(&sh(c, node, &["bridge", "fdb", "show", "dev", "flannel.1"]))
            .into_iter()
            .filter(|l| l.contains(" dst "))
            .collect();
    assert_eq!(fdb_now, fdb);
}

#[test]
fn kernel_userspace_and_reference_nodes_interoperate() {
    if !privileged_test_guard("kernel_userspace_and_reference_nodes_interoperate") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Kernel, Kernel, Userspace, KernelRef], 1);
    s.ip_masq = true;
    let c = Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(5));
    println!("{m}");
    assert!(m.all_pass(), "{m}");

    // The device as flannel creates it, with checksum offload off (field problem P2).
    let link = sh(&c, "n1", &["ip", "-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains("vxlan id 1 local 198.18.0.1 dev eth0"),
        "{link}"
    );
    assert!(
        link.contains("nolearning") && link.contains("mtu 1450"),
        "{link}"
    );
    let k = sh(&c, "n1", &["ethtool", "-k", "flannel.1"]);
    assert!(k.contains("tx-checksum-ip-generic: off"), "{k}");
    assert_programmed_like_flannel(&c, "n1");

    // flannel's masquerade and forward rules, golden text of its e2e suite.
    let net = "10.244.0.0/16";
    let own = c
        .node("n1")
        .expect("n1")
        .subnet
        .expect("subnet")
        .to_string();
    let nat = sh(
        &c,
        "n1",
        &["iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"],
    );
    let want = [
        "-N FLANNEL-POSTRTG".to_string(),
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN".into(),
        format!("-A FLANNEL-POSTRTG -s {own} -d {net} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {net} -d {own} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {net} -d {own} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
        format!("-A FLANNEL-POSTRTG ! -s {net} -d {net} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
    ];
    assert_eq!(nat.lines().collect::<Vec<_>>(), want);
    let fwd = sh(&c, "n1", &["iptables", "-t", "filter", "-S", "FLANNEL-FWD"]);
    assert_eq!(
        fwd.lines().collect::<Vec<_>>(),
        [
            "-N FLANNEL-FWD".to_string(),
            format!("-A FLANNEL-FWD -s {net} -m comment --comment \"flanneld forward\" -j ACCEPT"),
            format!("-A FLANNEL-FWD -d {net} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        ]
    );
    teardown(c);
}

#[test]
fn restart_in_kernel_mode_loses_no_packets() {
    if !privileged_test_guard("restart_in_kernel_mode_loses_no_packets") {
        return;
    }
    let _g = serial();
    let mut c = Cluster::up(&spec(&[Kernel, Kernel], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    let mac_before = sh(&c, "n1", &["cat", "/sys/class/net/flannel.1/address"]);
    let dst = c.pod_ip("n2p1").expect("ip").to_string();
    let ns = c.pod("n1p1").expect("pod").ns.clone();
    // 600 pings every 10 ms: 6 s around the restart.
    let pings = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns, "ping", "-i", "0.01", "-c", "600", "-W", "1", &dst,
        ])
        .output_async();
    std::thread::sleep(Duration::from_millis(1000));
    c.restart_flanneld("n1").expect("restart");
    let out = pings.join();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("600 received, 0% packet loss"), "{text}");
    let mac_after = sh(&c, "n1", &["cat", "/sys/class/net/flannel.1/address"]);
    assert_eq!(mac_before, mac_after, "VTEP MAC changed across restart");
    teardown(c);
}

#[test]
fn start_up_removes_stale_and_foreign_entries() {
    if !privileged_test_guard("start_up_removes_stale_and_foreign_entries") {
        return;
    }
    let _g = serial();
    let mut c = Cluster::up(&spec(&[Kernel, Kernel, Kernel], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    c.stop_flanneld("n1").expect("stop");
    // n3 leaves while n1's daemon is down: its lease is deleted (flannel never cleans up).
    let gone = c.node("n3").expect("n3").subnet.expect("subnet");
    c.remove_node("n3").expect("remove n3");
    // Someone adds entries by hand for a subnet no lease has.
    for cmd in [
        "ip neigh replace 10.244.250.0 lladdr 02:00:00:00:00:fa dev flannel.1 nud permanent",
        "bridge fdb append 02:00:00:00:00:fa dev flannel.1 dst 198.18.0.250 self permanent",
        "ip route replace 10.244.250.0/24 via 10.244.250.0 dev flannel.1 onlink",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        sh(&c, "n1", &args);
    }
    c.start_flanneld("n1").expect("start");
    let clean = wait_for(Duration::from_secs(2), || {
        let routes = sh(&c, "n1", &["ip", "route", "show", "dev", "flannel.1"]);
        let neigh = sh(&c, "n1", &["ip", "neigh", "show", "dev", "flannel.1"]);
        let fdb = sh(&c, "n1", &["bridge", "fdb", "show", "dev", "flannel.1"]);
        let stale = gone.network().to_string();
        ![&routes, &neigh, &fdb].iter().any(|t| {
            t.contains(&stale) || t.contains("10.244.250.") || t.contains("02:00:00:00:00:fa")
        })
    });
    assert!(
        clean.is_some(),
        "stale or hand-added entries still present 2 s after start"
    );
    assert_programmed_like_flannel(&c, "n1");
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    assert!(
        log.contains("10.244.250.0"),
        "removal of the hand-added entries not logged"
    );
    assert!(c.check().all_pass());
    teardown(c);
}

#[test]
fn deleted_device_is_recreated_and_peers_replayed() {
    if !privileged_test_guard("deleted_device_is_recreated_and_peers_replayed") {
        return;
    }
    let _g = serial();
    let c = Cluster::up(&spec(&[Kernel, Kernel, KernelRef], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    sh(&c, "n1", &["ip", "link", "del", "flannel.1"]);
    let targets: Vec<String> = ["n2p1", "n3p1"]
        .iter()
        .map(|p| c.pod_ip(p).expect("ip").to_string())
        .collect();
    let took = wait_for(Duration::from_secs(5), || {
        targets.iter().all(|t| ping_ok(&c, "n1p1", t))
    });
    assert!(
        took.is_some(),
        "connectivity not restored within 5 s of deleting flannel.1"
    );
    assert_programmed_like_flannel(&c, "n1");
    assert!(c.check().all_pass());
    teardown(c);
}

#[test]
fn host_gw_and_direct_routing() {
    if !privileged_test_guard("host_gw_and_direct_routing") {
        return;
    }
    let _g = serial();
    let c = host_gw_pair();
    let peer = c.node("n2").expect("n2");
    let routes = sh(&c, "n1", &["ip", "route"]);
    let want = format!(
        "{} via {} dev eth0",
        peer.subnet.expect("subnet"),
        peer.underlay_ip
    );
    assert!(routes.contains(&want), "{routes}");
    let (has_vxlan, _) = run(&c, "n1", &["ip", "link", "show", "flannel.1"]);
    assert!(!has_vxlan, "host-gw must not create a vxlan device");
    teardown(c);

    let mut s = spec(&[Kernel, Kernel, Userspace], 1);
    s.net_conf = Some(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#.into(),
    );
    let c = Cluster::up(&s).expect("DirectRouting cluster up");
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");
    let routes = sh(&c, "n1", &["ip", "route"]);
    for peer in ["n2", "n3"] {
        let p = c.node(peer).expect("peer");
        let want = format!(
            "{} via {} dev eth0",
            p.subnet.expect("subnet"),
            p.underlay_ip
        );
        assert!(routes.contains(&want), "{routes}");
    }
    teardown(c);
}

#[test]
fn bad_leases_are_skipped_with_a_warning_naming_the_node() {
    if !privileged_test_guard("bad_leases_are_skipped_with_a_warning_naming_the_node") {
        return;
    }
    let _g = serial();
    let c = Cluster::up(&spec(&[Kernel, Kernel], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    let dir = c.lease_dir().subnets_dir();
    let bad = [
        // Public IP that is not an address.
        (
            "10.244.201.0-24",
            r#"{"PublicIP":"not-an-ip","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:02:01"}}"#,
            "10.244.201.0-24",
        ),
        // VTEP MAC that is not a MAC.
        (
            "10.244.202.0-24",
            r#"{"PublicIP":"198.18.0.202","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:zz"}}"#,
            "10.244.202.0",
        ),
        // Subnet outside Network.
        (
            "10.99.3.0-24",
            r#"{"PublicIP":"198.18.0.203","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:02:03"}}"#,
            "10.99.3.0",
        ),
    ];
    for (key, value, _) in &bad {
        std::fs::write(dir.join(key), value).expect("write lease");
    }
    let log = c.flanneld_log("n1");
    let named = wait_for(Duration::from_secs(3), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        bad.iter().all(|(_, _, name)| text.contains(name))
    });
    assert!(
        named.is_some(),
        "not every bad lease was named in {}",
        log.display()
    );
    let routes = sh(&c, "n1", &["ip", "route"]);
    for (_, _, name) in &bad {
        assert!(!routes.contains(name), "{name} was programmed: {routes}");
    }
    assert_programmed_like_flannel_except(&c, "n1", &["10.244.201.", "10.244.202.", "10.99.3."]);
    assert!(c.check().all_pass());
    teardown(c);
}

/// Like `assert_programmed_like_flannel`, for a lease dir that also holds invalid leases.
fn assert_programmed_like_flannel_except(c: &Cluster, node: &str, skip: &[&str]) {
    let routes = sorted_lines(&sh(c, node, &["ip", "route", "show", "dev", "flannel.1"]));
    let peers: Vec<String> = c.node_names().into_iter().filter(|n| n != node).collect();
    assert_eq!(routes.len(), peers.len(), "{routes:?}");
    for r in &routes {
        assert!(!skip.iter().any(|s| r.contains(s)), "{r}");
    }
}
