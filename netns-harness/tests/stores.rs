//! The etcd and Kubernetes stores and the two-site NAT topology, with kernel-ref nodes only
//! (the harness playing upstream flannel): lease formats in each store, add/remove, store
//! outages with the maintenance instance, and field problem P1 (public-ip-overwrite).
//! Needs root, `/usr/bin/etcd` and the `test-apiserver` binary (`cargo build --workspace
//! --bins`).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use netns_harness::check::ProbeKind;
use netns_harness::store::{annotation, etcd_key, etcd_lease_key};
use netns_harness::{privileged_test_guard, Cluster, NodeKind, StoreKind};

fn store_spec(store: StoreKind, nodes: usize) -> netns_harness::ClusterSpec {
    let mut s = kernel_refs(nodes, 1);
    s.store = store;
    s
}

fn vtep_mac(c: &Cluster, node: &str) -> String {
    c.node(node).unwrap().vtep_mac.clone().unwrap()
}

#[test]
fn kernel_refs_share_leases_through_etcd() {
    if !privileged_test_guard("kernel_refs_share_leases_through_etcd") {
        return;
    }
    let _g = serial();
    let mut c = Cluster::up(&store_spec(StoreKind::Etcd, 3)).expect("cluster up");
    assert_eq!(c.store_url().unwrap(), "http://198.18.0.254:2379");
    let m = c.check();
    assert!(m.all_pass(), "{m}");

    // flannel's keys and values, byte for byte, and the config where flanneld reads it.
    let config = c.etcd_get(&etcd_key("config")).unwrap().unwrap();
    assert_eq!(
        String::from_utf8(config).unwrap(),
        netns_harness::lease::DEFAULT_NET_CONF
    );
    let n2 = c.node("n2").unwrap().clone();
    let value = c
        .etcd_get(&etcd_lease_key(&n2.subnet.unwrap()))
        .unwrap()
        .expect("n2's lease key");
    assert_eq!(
        String::from_utf8(value).unwrap(),
        format!(
            r#"{{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            vtep_mac(&c, "n2")
        )
    );
    // Attached to a 24 h etcd lease, as flannel grants it.
    let key = etcd_lease_key(&n2.subnet.unwrap());
    let ttl = c
        .exec_ok(
            "cp",
            &[
                "etcdctl",
                "--endpoints",
                "http://127.0.0.1:2379",
                "get",
                &key,
                "-w",
                "fields",
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(ttl.contains("\"Lease\" : "), "{ttl}");
    assert!(
        !ttl.contains("\"Lease\" : 0\n"),
        "no etcd lease attached: {ttl}"
    );

    // Outage: the server stops by PID; a node added meanwhile is written through the
    // maintenance instance and is there when the server returns on the same port and data.
    let reachable = |c: &Cluster| {
        c.exec("n1", &["bash", "-c", "exec 3<>/dev/tcp/198.18.0.254/2379"])
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(reachable(&c), "etcd must be reachable from the nodes");
    let server = c.control_plane().unwrap().server.clone().unwrap();
    c.stop_store().expect("stop etcd");
    assert!(!server.alive(), "etcd stopped by PID");
    assert!(!c.store_running());
    assert!(
        !reachable(&c),
        "etcd still reachable from the nodes during the outage"
    );
    let n4 = c.add_node(NodeKind::KernelRef).expect("add during outage");
    c.start_store().expect("start etcd");
    assert!(c.store_running());
    let (leases, bad) = c.leases().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(leases.len(), 4, "{leases:?}");
    let m = c.check();
    assert!(m.all_pass(), "{m}");

    // Removing a node deletes its key; the others forget it.
    let sub4 = c.node_subnet(&n4).unwrap();
    c.remove_node(&n4).unwrap();
    assert!(c.etcd_get(&etcd_lease_key(&sub4)).unwrap().is_none());
    let route = sh(&c, "n1", &["ip", "route"]);
    assert!(!route.contains(&sub4.to_string()), "{route}");
    let prefix = c.prefix().to_string();
    drop(c);
    assert!(leftover_namespaces(&prefix).is_empty());
}

#[test]
fn kernel_refs_publish_node_annotations_through_kube() {
    if !privileged_test_guard("kernel_refs_publish_node_annotations_through_kube") {
        return;
    }
    let _g = serial();
    let mut c = Cluster::up(&store_spec(StoreKind::Kube, 3)).expect("cluster up");
    assert_eq!(c.store_url().unwrap(), "http://198.18.0.254:6443");
    assert!(c.net_conf_path().is_file());
    let m = c.check();
    assert!(m.all_pass(), "{m}");

    // The Node as kube-controller-manager and flannel leave it.
    let node = c.kube_node("n2").unwrap().expect("Node n2");
    assert_eq!(node["spec"]["podCIDR"], "10.244.2.0/24");
    let ann = &node["metadata"]["annotations"];
    assert_eq!(ann[annotation("kube-subnet-manager")], "true");
    assert_eq!(ann[annotation("backend-type")], "vxlan");
    assert_eq!(ann[annotation("public-ip")], "198.18.0.2");
    assert_eq!(
        ann[annotation("backend-data")],
        format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, vtep_mac(&c, "n2"))
    );
    assert_eq!(c.node_subnet("n2").unwrap().to_string(), "10.244.2.0/24");

    // Outage with a change in the middle, as for etcd.
    c.stop_store().expect("stop API server");
    c.kube_annotate("n1", "example.com/during-outage", Some("yes"))
        .unwrap();
    c.start_store().expect("start API server");
    let node = c.kube_node("n1").unwrap().unwrap();
    assert_eq!(
        node["metadata"]["annotations"]["example.com/during-outage"],
        "yes"
    );
    c.kube_annotate("n1", "example.com/during-outage", None)
        .unwrap();
    let node = c.kube_node("n1").unwrap().unwrap();
    assert!(node["metadata"]["annotations"]
        .get("example.com/during-outage")
        .is_none());

    // A removed node's Node object goes; peers forget it.
    c.remove_node("n3").unwrap();
    assert!(c.kube_node("n3").unwrap().is_none());
    assert!(!sh(&c, "n1", &["ip", "route"]).contains("10.244.3.0/24"));
    let prefix = c.prefix().to_string();
    drop(c);
    assert!(leftover_namespaces(&prefix).is_empty());
}

/// Field problem P1 with kernel-ref nodes only: each site behind a 1:1 NAT; cross-site traffic
/// fails while nodes publish their private addresses and works once every node carries
/// `public-ip-overwrite` and was "restarted".
#[test]
fn two_sites_behind_nat_need_public_ip_overwrite() {
    if !privileged_test_guard("two_sites_behind_nat_need_public_ip_overwrite") {
        return;
    }
    let _g = serial();
    let mut spec = store_spec(StoreKind::Kube, 3);
    spec.sites = vec![1, 1, 2];
    let mut c = Cluster::up(&spec).expect("cluster up");
    assert_eq!(c.store_url().unwrap(), "http://203.0.113.254:6443");
    assert_eq!(c.node_ip("n3").unwrap(), Ipv4Addr::new(198, 18, 2, 3));
    assert_eq!(
        c.node("n3").unwrap().public_ip,
        Some(Ipv4Addr::new(203, 0, 113, 3))
    );
    let m = c.check();
    println!("{m}");
    let same_site = m.cell("n1p1", "n2p1").unwrap();
    assert!(same_site.ok(), "{m}");
    for (a, b) in [("n1p1", "n3p1"), ("n3p1", "n2p1")] {
        assert_eq!(m.cell(a, b).unwrap().letters(), "....", "{a}->{b}\n{m}");
    }
    // The VXLAN packets go to the peer's private address, which the other site cannot reach.
    let fdb = sh(&c, "n1", &["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert!(fdb.contains("dst 198.18.2.3"), "{fdb}");
    c.add_cluster_ip("n1", Ipv4Addr::new(10, 96, 0, 10), 80, "n3p1", "tcp")
        .unwrap();
    let vip = c.probe("n1", ProbeKind::Tcp, Ipv4Addr::new(10, 96, 0, 10), Some(80));
    assert!(!vip.ok, "{vip:?}");

    for n in ["n1", "n2", "n3"] {
        let public = c.node(n).unwrap().public_ip.unwrap().to_string();
        c.kube_annotate(n, &annotation("public-ip-overwrite"), Some(&public))
            .unwrap();
        c.restart_node(n).unwrap();
        let node = c.kube_node(n).unwrap().unwrap();
        assert_eq!(
            node["metadata"]["annotations"][annotation("public-ip")],
            public.as_str()
        );
    }
    let m = c.check_until_pass(Duration::from_secs(5));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    let fdb = sh(&c, "n1", &["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert!(fdb.contains("dst 203.0.113.3"), "{fdb}");
    let vip = c.probe("n1", ProbeKind::Tcp, Ipv4Addr::new(10, 96, 0, 10), Some(80));
    assert!(vip.ok, "{vip:?}");
    let prefix = c.prefix().to_string();
    drop(c);
    assert!(leftover_namespaces(&prefix).is_empty());
}
