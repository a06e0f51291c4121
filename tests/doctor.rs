//! `flanneld doctor` and the daemon's peer prober on a live netns-harness cluster (directory
//! store): a userspace node, a kernel node and a kernel-ref node (upstream flannel's
//! programming). Every check PASSes; then one thing at a time is broken in a node's
//! namespace (ip_forward=0, a REJECT ahead of flannel's FORWARD accepts, tx checksum offload
//! on flannel.1, UDP 8472 dropped on a peer), doctor names it with the exact check id and
//! exits 1, and PASSes again once fixed. The daemon names the blocked peer in its log and
//! exports `flannel_peer_reachable 0` for it.
//!
//! Privileged: run as root (`CI=true` makes it mandatory). Needs the workspace binaries
//! (`cargo build --workspace --bins`, as `scripts/test` does).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};

use NodeKind::{Kernel, KernelRef, Userspace};

/// Runs `flanneld doctor` with `node`'s daemon flags (plus `extra`) in its namespace:
/// (exit code, stdout, stderr).
fn doctor_with(c: &Cluster, node: &str, extra: &[&str]) -> (i32, String, String) {
    let mut argv = c.doctor_command(node).expect("doctor command");
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = c
        .exec_timeout(node, &args, Duration::from_secs(60))
        .expect("run doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn doctor(c: &Cluster, node: &str) -> (i32, String) {
    let (code, out, err) = doctor_with(c, node, &[]);
    println!("--- doctor on {node}: exit {code}\n{out}{err}");
    (code, out)
}

/// The (status, id) of every check line.
fn verdicts(report: &str) -> Vec<(String, String)> {
    let re = regex::Regex::new(r"^(PASS|WARN|FAIL|SKIP) ([a-z-]+): .+$").expect("regex");
    report
        .lines()
        .filter_map(|l| re.captures(l))
        .map(|c| (c[1].to_owned(), c[2].to_owned()))
        .collect()
}

const IDS: [&str; 14] = [
    "ip-forward",
    "vxlan-device",
    "tx-checksum",
    "forward-reject",
    "host-firewall",
    "security-software",
    "br-netfilter",
    "vxlan-port",
    "cni-plugin",
    "cni-config",
    "mtu",
    "peer-reachable",
    "vxlan-guard",
    "subnet-lease",
];

/// Exit 0 and every line PASS, every check id present, `peers` peer-reachable lines.
fn assert_all_pass(c: &Cluster, node: &str, peers: usize) -> String {
    let (code, out) = doctor(c, node);
    let v = verdicts(&out);
    assert_eq!(code, 0, "{node}:\n{out}");
    assert!(v.iter().all(|(s, _)| s == "PASS"), "{node}:\n{out}");
    for id in IDS {
        assert!(
            v.iter().any(|(_, i)| i == id),
            "{node}: no {id} line:\n{out}"
        );
    }
    let n = v.iter().filter(|(_, i)| i == "peer-reachable").count();
    assert_eq!(n, peers, "{node}:\n{out}");
    assert!(
        out.ends_with(&format!(
            "doctor: {} passed, 0 warnings, 0 failed\n",
            v.len()
        )),
        "{out}"
    );
    out
}

/// Exit 1 and exactly the checks `ids` FAIL; returns the report.
fn assert_fails(c: &Cluster, node: &str, ids: &[&str]) -> String {
    let (code, out) = doctor(c, node);
    assert_eq!(code, 1, "{node}:\n{out}");
    let mut failed: Vec<String> = verdicts(&out)
        .into_iter()
        .filter(|(s, _)| s == "FAIL")
        .map(|(_, i)| i)
        .collect();
    failed.dedup();
    assert_eq!(failed, ids, "{node}:\n{out}");
    out
}

fn metrics(c: &Cluster, node: &str, port: u16) -> String {
    let fetch = format!(
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
    );
    run(c, node, &["python3", "-c", &fetch]).1
}

fn reachable_line(c: &Cluster, peer: &str) -> String {
    format!(
        "flannel_peer_reachable{{subnet=\"{}\",public_ip=\"{}\"}}",
        c.node_subnet(peer).expect("subnet"),
        c.node_ip(peer).expect("ip")
    )
}

#[test]
fn doctor_names_each_broken_thing_and_the_daemon_names_unreachable_peers() {
    if !privileged_test_guard(
        "doctor_names_each_broken_thing_and_the_daemon_names_unreachable_peers",
    ) {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace, Kernel, KernelRef], 1);
    s.flanneld_args.push("--peer-probe-interval=1".into());
    s.nodes[0].extra_args = vec!["--metrics-port=9101".into()];
    let c = Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(10));
    assert!(m.all_pass(), "{m}");

    // Healthy: a userspace node probes a kernel and a kernel-ref peer, the kernel node a
    // userspace and a kernel-ref peer; every VTEP answers.
    let out = assert_all_pass(&c, "n1", 2);
    for peer in ["n2", "n3"] {
        let subnet = c.node_subnet(peer).expect("subnet");
        let vtep = subnet.addr;
        let want = format!(
            "PASS peer-reachable: peer {subnet} at {} (UDP 8472) answers ICMP echo to {vtep}\n",
            c.node_ip(peer).expect("ip")
        );
        assert!(out.contains(&want), "{want}\n{out}");
    }
    assert_all_pass(&c, "n2", 2);
    let line_n2 = reachable_line(&c, "n2");
    let line_n3 = reachable_line(&c, "n3");
    let mut text = String::new();
    let up = wait_for(Duration::from_secs(10), || {
        text = metrics(&c, "n1", 9101);
        text.contains(&format!("{line_n2} 1\n")) && text.contains(&format!("{line_n3} 1\n"))
    });
    assert!(up.is_some(), "{text}");

    // P3.1: ip_forward reset to 0.
    sh(&c, "n1", &["sysctl", "-w", "net.ipv4.ip_forward=0"]);
    let out = assert_fails(&c, "n1", &["ip-forward"]);
    assert!(out.contains(
        "FAIL ip-forward: net.ipv4.ip_forward = 0: this node does not forward pod traffic\n  fix: sysctl -w net.ipv4.ip_forward=1"
    ), "{out}");
    sh(&c, "n1", &["sysctl", "-w", "net.ipv4.ip_forward=1"]);
    assert_all_pass(&c, "n1", 2);

    // P3.3: a REJECT above flannel's accept rules.
    sh(
        &c,
        "n1",
        &[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-host-prohibited",
        ],
    );
    let out = assert_fails(&c, "n1", &["forward-reject"]);
    assert!(
        out.contains("FAIL forward-reject: \"-A FORWARD -j REJECT --reject-with icmp-host-prohibited\" rejects pod traffic in 10.244.0.0/16 before flannel's ACCEPT rules\n"),
        "{out}"
    );
    sh(&c, "n1", &["iptables", "-D", "FORWARD", "1"]);
    assert_all_pass(&c, "n1", 2);

    // P2: checksum offload turned back on on the kernel node's vxlan device.
    sh(
        &c,
        "n2",
        &["ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "on"],
    );
    let out = assert_fails(&c, "n2", &["tx-checksum"]);
    assert!(
        out.contains("FAIL tx-checksum: flannel.1: tx-checksum-ip-generic on"),
        "{out}"
    );
    sh(
        &c,
        "n2",
        &[
            "ethtool",
            "-K",
            "flannel.1",
            "tx-checksum-ip-generic",
            "off",
        ],
    );
    assert_all_pass(&c, "n2", 2);

    // P3.2: VXLAN dropped on the way into n2: n1's doctor and daemon name n2.
    sh(
        &c,
        "n2",
        &[
            "iptables", "-I", "INPUT", "1", "-p", "udp", "--dport", "8472", "-j", "DROP",
        ],
    );
    let n2_subnet = c.node_subnet("n2").expect("subnet");
    let n2_ip = c.node_ip("n2").expect("ip");
    let out = assert_fails(&c, "n1", &["peer-reachable"]);
    let want = format!(
        "FAIL peer-reachable: peer {n2_subnet} at {n2_ip} (UDP 8472) does not answer ICMP echo to {} over the overlay\n  fix: check that UDP 8472 is allowed between the nodes, or move Backend.Port (nodes on one layer-2 network can use host-gw instead)\n",
        n2_subnet.addr
    );
    assert!(out.contains(&want), "{want}\n{out}");
    assert!(
        out.contains(&format!(
            "PASS peer-reachable: peer {}",
            c.node_subnet("n3").expect("subnet")
        )),
        "{out}"
    );
    let log_path = c.flanneld_log("n1");
    let named = format!("peer {n2_subnet} at {n2_ip} (UDP 8472) does not answer");
    let down = wait_for(Duration::from_secs(15), || {
        text = metrics(&c, "n1", 9101);
        text.contains(&format!("{line_n2} 0\n"))
            && std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains(&named))
    });
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(down.is_some(), "{text}\n--- log\n{log}");
    assert!(text.contains(&format!("{line_n3} 1\n")), "{text}");
    assert_eq!(
        log.matches(&named).count(),
        1,
        "one warning per outage:\n{log}"
    );
    assert!(log.contains("WARN"), "{log}");

    sh(&c, "n2", &["iptables", "-D", "INPUT", "1"]);
    assert_all_pass(&c, "n1", 2);
    let recovered = format!("peer {n2_subnet} at {n2_ip} (UDP 8472) answers again");
    let back = wait_for(Duration::from_secs(10), || {
        text = metrics(&c, "n1", 9101);
        text.contains(&format!("{line_n2} 1\n"))
            && std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains(&recovered))
    });
    assert!(back.is_some(), "{text}");

    // An unreadable store: local checks still run, store checks SKIP, exit 2.
    let (code, out, err) =
        doctor_with(&c, "n1", &["--lease-dir", "/nonexistent/flannel-rs-doctor"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("cannot read the lease store"), "{err}");
    assert!(out.contains("PASS ip-forward: "), "{out}");
    assert!(out.contains("SKIP peer-reachable: "), "{out}");
    teardown(c);
}

/// host-gw: no overlay device to check; peers are probed at their public IPs.
#[test]
fn doctor_on_host_gw_probes_public_ips() {
    if !privileged_test_guard("doctor_on_host_gw_probes_public_ips") {
        return;
    }
    let _g = serial();
    let c = host_gw_pair();
    let n2_subnet = c.node_subnet("n2").expect("subnet");
    let n2_ip = c.node_ip("n2").expect("ip");

    let (code, out) = doctor(&c, "n1");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("SKIP vxlan-device: host-gw backend: no overlay device\n"),
        "{out}"
    );
    let want = format!(
        "PASS peer-reachable: peer {n2_subnet} at {n2_ip} (host-gw) answers ICMP echo to {n2_ip}\n"
    );
    assert!(out.contains(&want), "{want}\n{out}");

    sh(
        &c,
        "n2",
        &["iptables", "-I", "INPUT", "1", "-p", "icmp", "-j", "DROP"],
    );
    let out = assert_fails(&c, "n1", &["peer-reachable"]);
    assert!(
        out.contains(&format!("FAIL peer-reachable: peer {n2_subnet} at {n2_ip} (host-gw) does not answer ICMP echo to {n2_ip}\n")),
        "{out}"
    );
    assert!(
        out.contains("  fix: host-gw needs every node on one layer-2 network"),
        "{out}"
    );
    sh(&c, "n2", &["iptables", "-D", "INPUT", "1"]);
    let (code, out) = doctor(&c, "n1");
    assert_eq!(code, 0, "{out}");
    teardown(c);
}

/// The node set-up around flanneld (issue #11): CNI plugins and config in the node's own CNI
/// directories (the harness's, in the run directory: never the host's), br_netfilter's sysctl
/// in the node's namespace, a foreign vxlan device on the VXLAN port. Each is broken, named
/// by its check id with the thing at fault, and PASSes again once repaired.
#[test]
fn doctor_names_cni_br_netfilter_and_vxlan_port_problems() {
    if !privileged_test_guard("doctor_names_cni_br_netfilter_and_vxlan_port_problems") {
        return;
    }
    let _g = serial();
    let c = Cluster::up(&spec(&[Userspace, Kernel], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(10)).all_pass());
    for node in ["n1", "n2"] {
        assert_all_pass(&c, node, 1);
    }
    let (bin, conf) = c.cni_dirs("n1").expect("cni dirs");
    assert!(bin.starts_with(c.run_dir()) && conf.starts_with(c.run_dir()));

    // cni-plugin: portmap missing, flannel not executable.
    let portmap = bin.join("portmap");
    let aside = bin.join("portmap.aside");
    std::fs::rename(&portmap, &aside).expect("move portmap");
    let out = assert_fails(&c, "n1", &["cni-plugin"]);
    assert!(out.contains("portmap missing"), "{out}");
    assert!(out.contains("failed to find plugin \"portmap\""), "{out}");
    std::fs::rename(&aside, &portmap).expect("restore portmap");
    let flannel = bin.join("flannel");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&flannel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = assert_fails(&c, "n1", &["cni-plugin"]);
    assert!(out.contains("flannel not executable"), "{out}");
    assert!(
        out.contains(&format!("fix: chmod 755 {}", flannel.display())),
        "{out}"
    );
    std::fs::set_permissions(&flannel, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // cni-config: another network's config sorts first; then flannel's does not parse.
    let calico = conf.join("05-calico.conflist");
    std::fs::write(
        &calico,
        r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"}]}"#,
    )
    .expect("write calico");
    let out = assert_fails(&c, "n1", &["cni-config"]);
    assert!(
        out.contains("05-calico.conflist (a config for calico), which sorts before flannel's 10-flannel.conflist"),
        "{out}"
    );
    std::fs::remove_file(&calico).expect("remove calico");
    let ours = conf.join("10-flannel.conflist");
    let good = std::fs::read_to_string(&ours).expect("read conflist");
    std::fs::write(&ours, &good[..good.len() / 2]).expect("truncate conflist");
    let out = assert_fails(&c, "n1", &["cni-config"]);
    assert!(
        out.contains("10-flannel.conflist, the first config the kubelet reads, does not parse"),
        "{out}"
    );
    std::fs::write(&ours, &good).expect("restore conflist");

    // br-netfilter: the node namespace's own sysctl (per network namespace since Linux 5.3).
    let key = "net.bridge.bridge-nf-call-iptables";
    sh(&c, "n1", &["sysctl", "-qw", &format!("{key}=0")]);
    let out = assert_fails(&c, "n1", &["br-netfilter"]);
    assert!(out.contains(&format!("{key} = 0")), "{out}");
    sh(&c, "n1", &["sysctl", "-qw", &format!("{key}=1")]);

    // vxlan-port: a second vxlan device on UDP 8472. On the userspace node it cannot even come
    // up (flanneld holds the port); on the kernel node it shares flannel.1's socket.
    for node in ["n1", "n2"] {
        let (ok, text) = run(
            &c,
            node,
            &[
                "ip", "link", "add", "vxdoc", "type", "vxlan", "id", "99", "dstport", "8472",
                "dev", "eth0",
            ],
        );
        assert!(ok, "{node}: {text}");
        let _ = run(&c, node, &["ip", "link", "set", "vxdoc", "up"]);
        let out = assert_fails(&c, node, &["vxlan-port"]);
        assert!(
            out.contains("vxlan device vxdoc (dstport 8472)"),
            "{node}: {out}"
        );
        assert!(out.contains("fix: ip link del vxdoc"), "{node}: {out}");
        sh(&c, node, &["ip", "link", "del", "vxdoc"]);
    }

    // mtu: n2's underlay link takes 1400-byte frames only; small echoes still cross, overlay-MTU
    // ones (1450 + 50 of VXLAN) do not.
    sh(&c, "n2", &["ip", "link", "set", "eth0", "mtu", "1400"]);
    let out = assert_fails(&c, "n1", &["mtu"]);
    let n2_subnet = c.node_subnet("n2").expect("subnet").to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL mtu: "))
        .expect("mtu line");
    assert!(
        line.contains("overlay MTU 1450 (1500 bytes on the underlay)"),
        "{out}"
    );
    assert!(line.contains(&n2_subnet), "{out}");
    assert!(out.contains("PASS peer-reachable: "), "{out}");
    sh(&c, "n2", &["ip", "link", "set", "eth0", "mtu", "1500"]);

    for node in ["n1", "n2"] {
        let out = assert_all_pass(&c, node, 1);
        assert!(out.contains("PASS mtu: 1 peer(s) answer"), "{out}");
    }
    teardown(c);
}
