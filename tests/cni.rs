//! Pods made by the real CNI plugins (issue #16): kube-flannel.yml's conflist (read from the
//! manifest), flannel's delegation from subnet.env to `bridge` + `host-local`, `portmap` for
//! hostPorts, on userspace and kernel-ref nodes. Needs root and Debian's
//! containernetworking-plugins (scripts/install-deps.sh). Run:
//! `CI=true cargo test --test cni -- --nocapture`.

mod netns;

use std::path::Path;
use std::time::{Duration, Instant};

use netns::*;
use netns_harness::lease::SubnetEnv;
use netns_harness::{privileged_test_guard, Cluster, Level, NodeKind, PodSetup, PortMapping};

/// The hostPort the tests map to the responders' whoami port.
const HOST_PORT: u16 = 30080;

/// The address a pod's whoami port saw a connection from `from` (a namespace of the run) to
/// `to:port` come from; None when the connection fails.
fn whoami(c: &Cluster, from: &str, to: &str, port: u16) -> Option<String> {
    let bin = harness_bin();
    let addr = format!("{to}:{port}");
    let (ok, out) = run(c, from, &[bin.to_str().unwrap(), "whoami", &addr]);
    println!("whoami {from} -> {addr}: {}", out.trim());
    ok.then(|| out.trim().to_string())
}

/// Files in host-local's store (`<ipam dir>/cbr0`) that are IP reservations.
fn reserved_ips(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("cbr0"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A node's routes, without the `linkdown` flag (cni0 loses its carrier a moment after its
/// last port goes).
fn node_routes(c: &Cluster, node: &str) -> String {
    sh(c, node, &["ip", "route"]).replace(" linkdown", "")
}

/// Pod veths on a node: the ports of `cni0` (the node's own eth0 is a veth too).
fn veths(c: &Cluster, node: &str) -> usize {
    sh(c, node, &["ip", "-o", "link", "show", "master", "cni0"])
        .lines()
        .count()
}

#[test]
fn cni_pods_get_overlay_mtu_and_hostports_keep_flannels_source_addresses() {
    if !privileged_test_guard(
        "cni_pods_get_overlay_mtu_and_hostports_keep_flannels_source_addresses",
    ) {
        return;
    }
    let _g = serial();
    let t0 = Instant::now();
    let mut s = spec(&[NodeKind::Userspace, NodeKind::KernelRef], 1);
    s.ip_masq = true;
    let mut c = Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(15));
    assert!(m.all_pass(), "{m}");

    // Addresses from host-local, gateway and MTU from subnet.env, as flannel's plugin derives.
    for node in ["n1", "n2"] {
        let env = SubnetEnv::read(&c.subnet_env_path(node)).unwrap();
        let pod = format!("{node}p1");
        let ip = c.pod_ip(&pod).unwrap();
        let subnet = env.subnet.expect("FLANNEL_SUBNET");
        assert!(subnet.trunc().contains(ip), "{pod} {ip} not in {subnet}");
        let l = c.cni_layout(node).unwrap();
        let store = std::fs::read_to_string(l.ipam_dir.join("cbr0").join(ip.to_string()))
            .expect("host-local reservation of the pod's address");
        let cid = c.pods().into_iter().find(|(_, p)| p.name == pod).unwrap().1;
        assert!(
            store.starts_with(cid.container_id.as_deref().unwrap()),
            "{store}"
        );
        let link = sh(&c, &pod, &["ip", "-o", "link", "show", "eth0"]);
        assert!(
            link.contains(&format!(" mtu {} ", env.mtu)),
            "{pod}: MTU is not FLANNEL_MTU {}: {link}",
            env.mtu
        );
        let overlay = sh(&c, node, &["ip", "-o", "link", "show", "flannel.1"]);
        assert!(
            overlay.contains(&format!(" mtu {} ", env.mtu)),
            "{node}: overlay device MTU is not {}: {overlay}",
            env.mtu
        );
        let bridge = sh(&c, node, &["ip", "-o", "addr", "show", "cni0"]);
        assert!(bridge.contains(&subnet.to_string()), "{bridge}");
        let gw = subnet.addr.to_string();
        let routes = sh(&c, &pod, &["ip", "route"]);
        assert!(
            routes.contains(&format!("default via {gw} dev eth0")),
            "{routes}"
        );
        assert!(
            routes.contains(&format!(
                "{} via {gw} dev eth0",
                env.network.expect("FLANNEL_NETWORK")
            )),
            "{routes}"
        );
    }

    // A full-size DF packet crosses both data planes; one byte more is refused at the pod.
    let mtu = c.node("n1").unwrap().mtu;
    assert_eq!(mtu, c.node("n2").unwrap().mtu);
    for (from, to) in [("n1p1", "n2p1"), ("n2p1", "n1p1")] {
        let dst = c.pod_ip(to).unwrap().to_string();
        let size = (mtu - 28).to_string();
        let (ok, out) = run(
            &c,
            from,
            &["ping", "-M", "do", "-s", &size, "-c", "2", "-W", "2", &dst],
        );
        assert!(ok, "DF ping of {mtu} bytes {from} -> {to}: {out}");
        let size = (mtu - 27).to_string();
        let (ok, out) = run(
            &c,
            from,
            &["ping", "-M", "do", "-s", &size, "-c", "1", "-W", "1", &dst],
        );
        assert!(
            !ok,
            "DF ping of {} bytes {from} -> {to} passed: {out}",
            mtu + 1
        );
    }

    // hostPort through portmap, on both nodes; sources as flannel's masquerade rules leave them.
    let a_pod = c
        .add_pod("n1", &[PortMapping::tcp(HOST_PORT, 7002)])
        .expect("hostPort pod on n1");
    let b_pod = c
        .add_pod("n2", &[PortMapping::tcp(HOST_PORT, 7002)])
        .expect("hostPort pod on n2");
    for (a, b) in [("n1", "n2"), ("n2", "n1")] {
        let a_ip = c.node_ip(a).unwrap().to_string();
        let b_ip = c.node_ip(b).unwrap().to_string();
        let a_gw = c.node_subnet(a).unwrap().nth(1).unwrap().to_string();
        let b_vtep = c.node_subnet(b).unwrap().addr.to_string();
        let b_client = format!("{b}p1");
        let b_client_ip = c.pod_ip(&b_client).unwrap().to_string();
        // B's host over the underlay: `! -s Network -d <A's subnet>` RETURN on A, no NAT.
        assert_eq!(
            whoami(&c, b, &a_ip, HOST_PORT),
            Some(b_ip.clone()),
            "{b} host -> {a}"
        );
        // B's pod to A's node address: leaves B masqueraded (`-s Network ! -d 224.0.0.0/4`).
        assert_eq!(
            whoami(&c, &b_client, &a_ip, HOST_PORT),
            Some(b_ip.clone()),
            "{b_client} -> {a} node address"
        );
        // B's pod through the overlay to A's cni0 address (a local address of A: portmap's
        // DNAT): pod to pod inside Network, no NAT anywhere.
        assert_eq!(
            whoami(&c, &b_client, &a_gw, HOST_PORT),
            Some(b_client_ip.clone()),
            "{b_client} -> {a} over the overlay"
        );
        // B's host through the overlay: it sends from its VTEP address (inside Network).
        assert_eq!(
            whoami(&c, b, &a_gw, HOST_PORT),
            Some(b_vtep.clone()),
            "{b} host -> {a} over the overlay"
        );
    }

    // DEL takes the hostPort away again.
    c.delete_pod(&a_pod).expect("delete hostPort pod");
    c.delete_pod(&b_pod).expect("delete hostPort pod");
    for (node, peer) in [("n1", "n2"), ("n2", "n1")] {
        let nat = sh(&c, node, &["iptables", "-w", "-t", "nat", "-S"]);
        assert!(!nat.contains(&format!("--dport {HOST_PORT}")), "{nat}");
        let ip = c.node_ip(node).unwrap().to_string();
        assert_eq!(whoami(&c, peer, &ip, HOST_PORT), None);
    }
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    println!("took {:?}", t0.elapsed());
}

#[test]
fn cni_del_of_50_pods_twice_leaks_no_address_veth_rule_or_route() {
    if !privileged_test_guard("cni_del_of_50_pods_twice_leaks_no_address_veth_rule_or_route") {
        return;
    }
    let _g = serial();
    let t0 = Instant::now();
    let mut s = spec(&[NodeKind::KernelRef, NodeKind::KernelRef], 1);
    s.responders = false;
    let mut c = Cluster::up(&s).expect("cluster up");
    let l = c.cni_layout("n1").unwrap();
    // cni0 exists now (the bridge stays after its last pod, as in a cluster).
    c.delete_pod("n1p1").unwrap();
    let routes = node_routes(&c, "n1");
    let nat = sh(&c, "n1", &["iptables", "-w", "-t", "nat", "-S"]);
    assert!(reserved_ips(&l.ipam_dir).is_empty());
    assert_eq!(veths(&c, "n1"), 0);
    for round in 1..=2 {
        let mut pods = Vec::new();
        for _ in 0..50 {
            pods.push(c.add_pod("n1", &[]).expect("add pod"));
        }
        let ips: std::collections::BTreeSet<_> =
            pods.iter().map(|p| c.pod_ip(p).unwrap()).collect();
        assert_eq!(ips.len(), 50, "round {round}: addresses not unique");
        assert_eq!(reserved_ips(&l.ipam_dir).len(), 50, "round {round}");
        assert_eq!(veths(&c, "n1"), 50, "round {round}");
        // The last pod talks to a pod on n2 across the overlay.
        let last = pods.last().unwrap();
        let n2p1 = c.pod_ip("n2p1").unwrap().to_string();
        assert!(ping_ok(&c, last, &n2p1), "round {round}: {last} -> n2p1");
        for p in &pods {
            c.delete_pod(p).expect("delete pod");
        }
        assert_eq!(
            reserved_ips(&l.ipam_dir),
            Vec::<String>::new(),
            "round {round}"
        );
        assert_eq!(veths(&c, "n1"), 0, "round {round}: veths left");
        assert_eq!(file_names(&l.flannel_dir), Vec::<String>::new());
        assert_eq!(file_names(&l.results_dir), Vec::<String>::new());
        assert_eq!(node_routes(&c, "n1"), routes, "round {round}");
        assert_eq!(
            sh(&c, "n1", &["iptables", "-w", "-t", "nat", "-S"]),
            nat,
            "round {round}: NAT rules left"
        );
        let left: Vec<String> = netns_harness::cluster::run_namespaces(c.prefix())
            .unwrap()
            .into_iter()
            .filter(|n| n.contains("-n1p"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
    println!("took {:?}", t0.elapsed());
}

#[test]
fn doctor_names_what_is_missing_from_the_real_cni_layout() {
    if !privileged_test_guard("doctor_names_what_is_missing_from_the_real_cni_layout") {
        return;
    }
    let _g = serial();
    let t0 = Instant::now();
    let mut c = Cluster::up(&spec(&[NodeKind::Userspace, NodeKind::KernelRef], 1)).expect("up");
    let m = c.check_until_pass(Duration::from_secs(15));
    assert!(m.all_pass(), "{m}");
    let l = c.cni_layout("n1").unwrap();
    let doctor = |c: &Cluster| {
        let r = c.doctor("n1").expect("doctor");
        println!("{}", r.stdout);
        r
    };
    let r = doctor(&c);
    assert!(r.report.has(Level::Pass, "cni-plugin"), "{}", r.stdout);
    assert!(r.report.has(Level::Pass, "cni-config"), "{}", r.stdout);

    // The plugin the flannel entry delegates to is gone: doctor names it, and pods fail.
    let bridge = l.bin_dir.join("bridge");
    let aside = l.bin_dir.join("bridge.aside");
    std::fs::rename(&bridge, &aside).unwrap();
    let r = doctor(&c);
    assert!(
        r.report
            .has_mentioning(Level::Fail, "cni-plugin", "bridge missing"),
        "{}",
        r.stdout
    );
    let err = format!("{:#}", c.add_pod("n1", &[]).unwrap_err());
    assert!(err.contains("failed to find plugin \"bridge\""), "{err}");
    std::fs::rename(&aside, &bridge).unwrap();
    let r = doctor(&c);
    assert!(r.report.has(Level::Pass, "cni-plugin"), "{}", r.stdout);
    let p = c.add_pod("n1", &[]).expect("pod once bridge is back");
    c.delete_pod(&p).unwrap();

    // No conflist: doctor names the config directory, and pods fail.
    let conf = l.conf_dir.join("10-flannel.conflist");
    let saved = std::fs::read(&conf).unwrap();
    std::fs::remove_file(&conf).unwrap();
    let r = doctor(&c);
    assert!(
        r.report
            .has_mentioning(Level::Fail, "cni-config", "no CNI config"),
        "{}",
        r.stdout
    );
    let err = format!("{:#}", c.add_pod("n1", &[]).unwrap_err());
    assert!(err.contains("no CNI config"), "{err}");
    std::fs::write(&conf, saved).unwrap();
    let r = doctor(&c);
    assert!(r.report.has(Level::Pass, "cni-config"), "{}", r.stdout);
    println!("took {:?}", t0.elapsed());
}

#[test]
fn hand_wired_pods_remain_an_option() {
    if !privileged_test_guard("hand_wired_pods_remain_an_option") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[NodeKind::KernelRef, NodeKind::KernelRef], 1);
    s.pod_setup = PodSetup::Hand;
    let c = Cluster::up(&s).expect("up");
    let m = c.check_until_pass(Duration::from_secs(10));
    assert!(m.all_pass(), "{m}");
    assert!(c.pods().iter().all(|(_, p)| p.container_id.is_none()));
    assert!(!c.node_dir("n1").join("cni").exists());
}
