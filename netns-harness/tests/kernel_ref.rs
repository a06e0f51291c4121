//! Privileged tests of the harness itself with kernel-ref nodes only (no flanneld needed).
//! Run as root: `cargo test -p netns-harness`; with CI=true they fail instead of skipping.

mod common;

use std::time::Duration;

use common::*;
use netns_harness::{
    privileged_test_guard, BenchPath, CaptureOpts, CaptureReport, Cluster, NodeKind,
};

#[test]
fn three_kernel_ref_nodes_full_matrix_bench_and_teardown() {
    if !privileged_test_guard("three_kernel_ref_nodes_full_matrix_bench_and_teardown") {
        return;
    }
    let _g = serial();
    let mut spec = kernel_refs(3, 2);
    spec.ip_masq = true;
    let mut c = Cluster::up(&spec).expect("cluster up");
    let prefix = c.prefix().to_string();
    let run_dir = c.run_dir().to_path_buf();
    assert_eq!(leftover_namespaces(&prefix).len(), 1 + 3 + 6);

    let m = c.check();
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    // 6 pods: 6*4 cross-node ordered pairs + 1 same-node pair; 3 hosts x 4 remote pods.
    let pod_cells = m.cells.iter().filter(|c| c.src.contains('p')).count();
    assert_eq!(pod_cells, 6 * 4 + 1);
    assert_eq!(m.cells.iter().filter(|c| c.same_node).count(), 1);
    assert_eq!(m.counts().1, (6 * 4 + 1) * 4 + 3 * 4 * 2);
    assert_eq!(m.cell("n1p1", "n3p2").unwrap().letters(), "ITUD");
    assert_eq!(m.cell("n2", "n1p1").unwrap().letters(), "IT");

    // Pod wiring like the CNI bridge plugin: address, gateway, MTU.
    let n1 = c.node("n1").unwrap().clone();
    let subnet = n1.subnet.unwrap();
    assert_eq!(c.pod_ip("n1p2"), subnet.nth(3));
    assert!(sh(&c, "n1p1", &["ip", "route"])
        .contains(&format!("default via {}", subnet.nth(1).unwrap())));
    assert!(sh(&c, "n1p1", &["ip", "link", "show", "eth0"]).contains("mtu 1450"));
    assert!(sh(&c, "n1", &["ip", "addr", "show", "cni0"])
        .contains(&format!("{}/24", subnet.nth(1).unwrap())));
    // The default underlay is kind-like (--link-offloads on): tx checksum offload stays on.
    assert!(sh(&c, "n1", &["ethtool", "-k", "eth0"]).contains("tx-checksumming: on"));

    // flannel's kernel programming on n1: device, /32 address, one neighbour/FDB/route per peer.
    let link = sh(&c, "n1", &["ip", "-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains("vxlan id 1 local 198.18.0.1 dev eth0"),
        "{link}"
    );
    assert!(
        link.contains("dstport 8472") && link.contains("nolearning") && link.contains("mtu 1450")
    );
    assert!(link.contains(n1.vtep_mac.as_deref().unwrap()));
    assert!(sh(&c, "n1", &["ip", "addr", "show", "flannel.1"])
        .contains(&format!("{}/32", subnet.network())));
    let routes = sh(&c, "n1", &["ip", "route", "show", "dev", "flannel.1"]);
    let fdb = sh(&c, "n1", &["bridge", "fdb", "show", "dev", "flannel.1"]);
    let neigh = sh(&c, "n1", &["ip", "neigh", "show", "dev", "flannel.1"]);
    for peer in ["n2", "n3"] {
        let p = c.node(peer).unwrap();
        let s = p.subnet.unwrap();
        let mac = p.vtep_mac.as_deref().unwrap();
        assert!(
            routes.contains(&format!("{s} via {} onlink", s.network())),
            "{routes}"
        );
        assert!(
            fdb.contains(&format!("{mac} dst {} self permanent", p.underlay_ip)),
            "{fdb}"
        );
        assert!(
            neigh.contains(&format!("{} lladdr {mac} PERMANENT", s.network())),
            "{neigh}"
        );
    }
    assert_eq!(c.node("n1").unwrap().programmed.len(), 2);
    // flannel's iptables rules (--ip-masq).
    let rules = sh(&c, "n1", &["iptables-save"]);
    assert!(rules.contains("-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE"), "{rules}");
    assert!(
        rules.contains(
            "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
        ),
        "{rules}"
    );

    // A second sync with unchanged leases does nothing.
    assert_eq!(c.sync_kernel_refs().unwrap(), 0);

    let r = c.bench(2).expect("bench");
    println!("{r}");
    let under = r.gbps(BenchPath::Underlay).expect("underlay measured");
    let kref = r.gbps(BenchPath::KernelRef).expect("kernel-ref measured");
    assert!(under > 0.05 && kref > 0.05, "{r}");
    assert!(r.row(BenchPath::KernelRef).unwrap().latency_ms.unwrap() > 0.0);
    assert!(r
        .row(BenchPath::Userspace)
        .unwrap()
        .note
        .as_deref()
        .unwrap()
        .contains("no such pair"));
    assert!(c.state().extra_procs.is_empty(), "iperf3 servers stopped");

    c.teardown().expect("teardown");
    assert!(leftover_namespaces(&prefix).is_empty());
    assert!(!run_dir.exists());
    c.teardown().expect("teardown is idempotent");
}

#[test]
fn add_and_remove_nodes() {
    if !privileged_test_guard("add_and_remove_nodes") {
        return;
    }
    let _g = serial();
    let mut c = Cluster::up(&kernel_refs(2, 1)).expect("cluster up");
    let n3 = c.add_node(NodeKind::KernelRef).expect("add node");
    assert_eq!(n3, "n3");
    let s3 = c.node_subnet("n3").unwrap();
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    assert!(m.cell("n1p1", "n3p1").unwrap().ok());
    assert!(m.cell("n3p1", "n2p1").unwrap().ok());
    assert!(sh(&c, "n1", &["ip", "route"]).contains(&s3.to_string()));

    let lease = c.lease_dir().lease_path(&s3);
    assert!(lease.exists());
    let n3_ns = c.node("n3").unwrap().ns.clone();
    c.remove_node("n3").expect("remove node");
    assert!(!lease.exists(), "lease file deleted");
    let left = leftover_namespaces(c.prefix());
    assert!(!left.iter().any(|n| n.starts_with(&n3_ns)), "{left:?}");
    assert!(!sh(&c, "n1", &["ip", "route"]).contains(&s3.to_string()));
    let mac3_gone = !sh(&c, "n2", &["ip", "neigh", "show", "dev", "flannel.1"])
        .contains(&s3.network().to_string());
    assert!(mac3_gone);
    assert!(c
        .node("n1")
        .unwrap()
        .programmed
        .iter()
        .all(|p| p.subnet != s3));
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    assert!(m.cell("n1p1", "n3p1").is_none());

    // Names are not reused; the freed subnet is (lowest free first).
    let n4 = c.add_node(NodeKind::KernelRef).expect("add again");
    assert_eq!(n4, "n4");
    assert_eq!(c.node_ip("n4").unwrap().to_string(), "198.18.0.4");
    assert_eq!(c.node_subnet("n4"), Some(s3));
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    assert!(c.remove_node("n9").is_err());
    // exec refuses namespaces outside the run.
    assert!(c.exec("some-other-ns", &["true"]).is_err());
}

fn bulk_tcp(c: &Cluster, src: &str, dst: &str) {
    let ip = c.pod_ip(dst).unwrap().to_string();
    let dst_ns = c.pod(dst).unwrap().ns.clone();
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &dst_ns, "iperf3", "-s", "-1", "-p", "5202"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = c
        .exec_timeout(
            src,
            &["iperf3", "-c", &ip, "-p", "5202", "-t", "1"],
            Duration::from_secs(20),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = server.wait();
}

/// Two kernel-ref nodes whose underlay veths keep tx checksum offload or not: the VXLAN
/// traffic of `during` and of a bulk TCP transfer n1p1 -> n2p1, verified with tshark.
fn capture_bulk(
    tx_offload: bool,
    max_packets: u64,
    during: impl FnOnce(&Cluster),
) -> CaptureReport {
    let mut spec = kernel_refs(2, 1);
    spec.underlay_tx_offload = tx_offload;
    let mut c = Cluster::up(&spec).expect("cluster up");
    let cap = c
        .start_capture(&CaptureOpts {
            max_packets,
            max_seconds: 60,
            filter: Some("udp port 8472".into()),
            ..CaptureOpts::default()
        })
        .expect("capture");
    during(&c);
    bulk_tcp(&c, "n1p1", "n2p1");
    let pcap = c.stop_capture(&cap.name).expect("stop");
    let r = c.verify_capture(&pcap).expect("tshark");
    println!("{r}");
    r
}

#[test]
fn capture_on_underlay_has_only_valid_checksums() {
    if !privileged_test_guard("capture_on_underlay_has_only_valid_checksums") {
        return;
    }
    let _g = serial();
    // Real-wire underlay (--link-offloads off): every checksum is finished before the wire.
    let r = capture_bulk(false, 4000, |c| {
        let m = c.check();
        assert!(m.all_pass(), "{m}");
    });
    assert!(r.vxlan_frames > 100, "{r}");
    assert_eq!(r.vnis.iter().copied().collect::<Vec<_>>(), vec![1]);
    assert!(
        r.inner_tcp > 0 && r.inner_udp > 0 && r.inner_icmp > 0,
        "{r}"
    );
    assert_eq!(r.bad_total(), 0, "{r}");
    assert!(r.all_checksums_ok());
}

/// Negative control: with tx checksum offload left on the veths, the underlay carries
/// CHECKSUM_PARTIAL packets; the verifier must notice.
#[test]
fn capture_verifier_flags_unfinished_checksums() {
    if !privileged_test_guard("capture_verifier_flags_unfinished_checksums") {
        return;
    }
    let _g = serial();
    let r = capture_bulk(true, 2000, |_| {});
    assert!(r.vxlan_frames > 0, "{r}");
    assert!(
        r.bad_total() > 0,
        "offload on must leave unfinished checksums: {r}"
    );
    assert!(!r.all_checksums_ok());
}

#[test]
fn drop_on_panic_tears_down() {
    if !privileged_test_guard("drop_on_panic_tears_down") {
        return;
    }
    let _g = serial();
    let prefix = test_prefix();
    let mut spec = kernel_refs(1, 1);
    spec.prefix = Some(prefix.clone());
    let run_dir = spec.base_dir.join(&prefix);
    let res = std::thread::spawn(move || {
        let c = Cluster::up(&spec).expect("cluster up");
        assert_eq!(leftover_namespaces(c.prefix()).len(), 3);
        panic!("deliberate panic with a live cluster");
    })
    .join();
    assert!(res.is_err());
    assert!(leftover_namespaces(&prefix).is_empty());
    assert!(!run_dir.exists());
}

#[test]
fn net_conf_vni_and_port_are_honoured() {
    if !privileged_test_guard("net_conf_vni_and_port_are_honoured") {
        return;
    }
    let _g = serial();
    let mut spec = kernel_refs(2, 1);
    spec.net_conf = Some(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4,"Port":8475}}"#.into(),
    );
    spec.underlay_tx_offload = false;
    let mut c = Cluster::up(&spec).expect("cluster up");
    let link = sh(&c, "n1", &["ip", "-d", "link", "show", "flannel.4"]);
    assert!(
        link.contains("vxlan id 4") && link.contains("dstport 8475"),
        "{link}"
    );
    assert!(read_lease_has_vni(&c, 4));
    let cap = c
        .start_capture(&CaptureOpts {
            max_packets: 1000,
            max_seconds: 30,
            filter: Some("udp port 8475".into()),
            ..CaptureOpts::default()
        })
        .unwrap();
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    let pcap = c.stop_capture(&cap.name).unwrap();
    let r = c.verify_capture(&pcap).unwrap();
    assert!(r.vxlan_frames > 0, "{r}");
    assert_eq!(r.vnis.iter().copied().collect::<Vec<_>>(), vec![4]);
    assert!(r.all_checksums_ok(), "{r}");
    // A Network outside 10.244.0.0/16 is refused before anything is built.
    let mut bad = kernel_refs(1, 0);
    bad.net_conf = Some(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#.into());
    assert!(Cluster::up(&bad).is_err());
}

fn read_lease_has_vni(c: &Cluster, vni: u32) -> bool {
    let (leases, bad) = c.lease_dir().read_all().unwrap();
    bad.is_empty()
        && leases.len() == 2
        && leases
            .iter()
            .all(|l| l.vxlan().is_some_and(|v| v.vni == vni))
}
