//! Our flanneld on the etcd and Kubernetes stores, end to end in netns-harness clusters: the
//! full connectivity matrix with userspace, kernel and kernel-ref (upstream-flannel
//! programming) nodes; field problem P1 (nodes behind 1:1 NAT need `public-ip-overwrite`) on
//! the Kubernetes store; and store outages of 60 s during which not a single pod-to-pod ping
//! is lost, with a change made during the outage applied within 5 s of the store's return.
//!
//! Privileged: run as root (`CI=true` makes them mandatory). Needs `/usr/bin/etcd` and the
//! workspace binaries (`cargo build --workspace --bins`, as `scripts/test` does).

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use netns_harness::check::ProbeKind;
use netns_harness::store::annotation;
use netns_harness::{privileged_test_guard, Cluster, ClusterSpec, NodeKind, StoreKind};

use NodeKind::{Kernel, KernelRef, Userspace};

mod netns;

use netns::{serial, sibling, teardown};

/// A cluster spec with our binaries on `store`.
fn spec(store: StoreKind, kinds: &[NodeKind], pods: usize) -> ClusterSpec {
    let mut s = netns::spec(kinds, pods);
    s.store = store;
    if store == StoreKind::Kube {
        s.apiserver_bin = Some(sibling("test-apiserver"));
    }
    s
}

fn ping_once(c: &Cluster, from: &str, to: Ipv4Addr) -> bool {
    c.probe(from, ProbeKind::Icmp, to, None).ok
}

/// The connectivity matrix with every node kind on `store`, then a flanneld restart that
/// must get the same lease back from the store.
fn full_matrix(store: StoreKind) -> Cluster {
    let mut c = Cluster::up(&spec(store, &[Userspace, Userspace, KernelRef, Kernel], 2))
        .expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(15));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    // Every node's lease is in the store, naming its address.
    let (leases, bad) = c.leases().expect("read store");
    assert!(bad.is_empty(), "{bad:?}");
    for n in c.nodes() {
        let l = leases
            .iter()
            .find(|l| Some(l.subnet) == n.subnet)
            .unwrap_or_else(|| panic!("no lease for {} in {leases:?}", n.name));
        assert_eq!(l.public_ip(), Some(n.underlay_ip), "{}", n.name);
        assert!(l.vxlan().is_some(), "{}: {l:?}", n.name);
    }
    let before = c.node_subnet("n1").expect("subnet");
    c.restart_flanneld("n1").expect("restart");
    assert_eq!(c.node_subnet("n1"), Some(before), "lease reused on restart");
    let m = c.check_until_pass(Duration::from_secs(15));
    assert!(m.all_pass(), "after restart: {m}");
    c
}

#[test]
fn full_matrix_on_etcd_store() {
    if !privileged_test_guard("full_matrix_on_etcd_store") {
        return;
    }
    let _g = serial();
    let c = full_matrix(StoreKind::Etcd);
    let cmd = c.flanneld_command("n2").expect("command").join(" ");
    assert!(
        cmd.contains("--etcd-endpoints http://198.18.0.254:2379"),
        "{cmd}"
    );
    assert!(!cmd.contains("--lease-dir"), "{cmd}");
    teardown(c);
}

#[test]
fn full_matrix_on_kube_store() {
    if !privileged_test_guard("full_matrix_on_kube_store") {
        return;
    }
    let _g = serial();
    let c = full_matrix(StoreKind::Kube);
    // What flanneld wrote on its Node (compat §5.3, §5.6); its lease is the podCIDR.
    for n in ["n1", "n2", "n4"] {
        let node = c.kube_node(n).expect("get").expect("node");
        let ann = &node["metadata"]["annotations"];
        assert_eq!(ann[annotation("kube-subnet-manager")], "true", "{n}");
        assert_eq!(ann[annotation("backend-type")], "vxlan", "{n}");
        assert_eq!(
            ann[annotation("public-ip")],
            c.node_ip(n).expect("ip").to_string().as_str(),
            "{n}"
        );
        assert_eq!(
            node["spec"]["podCIDR"],
            c.node_subnet(n).expect("subnet").to_string().as_str(),
            "{n}"
        );
        let conditions = node["status"]["conditions"].as_array().cloned();
        assert!(
            conditions.unwrap_or_default().iter().any(|cond| {
                cond["type"] == "NetworkUnavailable"
                    && cond["status"] == "False"
                    && cond["reason"] == "FlannelIsUp"
            }),
            "{n}: {node}"
        );
    }
    let cmd = c.flanneld_command("n2").expect("command").join(" ");
    assert!(
        cmd.contains("--kube-subnet-mgr --kube-api-url http://198.18.0.254:6443 --net-config-path"),
        "{cmd}"
    );
    teardown(c);
}

/// Field problem P1 on the Kubernetes store: two sites behind 1:1 NAT. Nodes publish their
/// private addresses, so every cross-site path fails (and a ClusterIP from node A to a pod on
/// the other site too), and node A's daemon (log, `flannel_peer_reachable`) and `flanneld
/// doctor` name each unreachable peer by subnet and published address, with the
/// `public-ip-overwrite` fix; the overwrite plus a restart of that node only, for each node,
/// restores the whole matrix, the ClusterIP and the peers' reachability.
#[test]
fn p1_public_ip_overwrite_on_kube_store() {
    if !privileged_test_guard("p1_public_ip_overwrite_on_kube_store") {
        return;
    }
    let _g = serial();
    let mut s = spec(
        StoreKind::Kube,
        &[Userspace, KernelRef, Kernel, Userspace],
        1,
    );
    s.sites = vec![1, 1, 2, 2];
    s.flanneld_args.push("--peer-probe-interval=1".into());
    s.nodes[0].extra_args = vec!["--metrics-port=9101".into()];
    let mut c = Cluster::up(&s).expect("cluster up");
    // Same-site paths work (give the daemons a moment); every cross-site path fails.
    let same_site =
        |c: &Cluster, cell: &netns_harness::Cell| site_of(c, &cell.src) == site_of(c, &cell.dst);
    let deadline = Instant::now() + Duration::from_secs(15);
    let m = loop {
        let m = c.check();
        let same_ok = m
            .cells
            .iter()
            .filter(|cell| same_site(&c, cell))
            .all(|cell| cell.ok());
        if same_ok || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("before the overwrite:\n{m}");
    let mut cross = 0;
    for cell in &m.cells {
        if same_site(&c, cell) {
            assert!(cell.ok(), "same-site {} -> {}:\n{m}", cell.src, cell.dst);
        } else {
            cross += 1;
            assert!(
                cell.results.iter().all(|r| !r.ok),
                "cross-site {} -> {} must fail while nodes publish private addresses:\n{m}",
                cell.src,
                cell.dst
            );
        }
    }
    assert!(cross >= 8, "{m}");
    // The published address is the private one, which the other site cannot reach.
    let n3 = c.kube_node("n3").expect("get").expect("node");
    assert_eq!(
        n3["metadata"]["annotations"][annotation("public-ip")],
        "198.18.2.3"
    );
    // n1 names the other site's nodes by their unreachable published addresses.
    let reachable = |c: &Cluster, peer: &str, ip: Ipv4Addr| {
        format!(
            "flannel_peer_reachable{{subnet=\"{}\",public_ip=\"{ip}\"}}",
            c.node_subnet(peer).expect("subnet")
        )
    };
    let private = |c: &Cluster, n: &str| c.node_ip(n).expect("ip");
    let log_path = c.flanneld_log("n1");
    let mut text = String::new();
    let named = wait_until(Duration::from_secs(15), || {
        text = metrics(&c, "n1", 9101);
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        ["n3", "n4"].iter().all(|n| {
            let ip = private(&c, n);
            text.contains(&format!("{} 0\n", reachable(&c, n, ip)))
                && log.contains(&format!(
                    "peer {n} ({} at {ip}, UDP 8472) does not answer",
                    c.node_subnet(n).expect("subnet")
                ))
        }) && text.contains(&format!("{} 1\n", reachable(&c, "n2", private(&c, "n2"))))
    });
    assert!(
        named,
        "n1 did not name the unreachable peers:\n{text}\n--- log\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    for n in ["n3", "n4"] {
        let fix = format!("if that node is behind NAT: kubectl annotate node {n} flannel.alpha.coreos.com/public-ip-overwrite=<an address this node can reach>, then restart flanneld there");
        assert!(log.contains(&fix), "{fix}\n{log}");
    }
    let (code, out) = doctor(&c, "n1");
    assert_eq!(code, 1, "{out}");
    for n in ["n3", "n4"] {
        let want = format!(
            "FAIL peer-reachable: peer {n} ({} at {}, UDP 8472) does not answer",
            c.node_subnet(n).expect("subnet"),
            private(&c, n)
        );
        assert!(out.contains(&want), "{want}\n{out}");
        let fix = format!("  fix: if that node is behind NAT: kubectl annotate node {n} flannel.alpha.coreos.com/public-ip-overwrite=<an address this node can reach>, then restart flanneld there\n");
        assert!(out.contains(&fix), "{fix}\n{out}");
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL ")).count(),
        2,
        "only the two cross-site peers fail:\n{out}"
    );
    // The operator's fix for each node is the command doctor printed: n1's report names
    // n3 and n4, n4's (on the other site) names n1 and n2.
    let mut fixes: Vec<(String, String)> = ["n3", "n4"]
        .iter()
        .map(|n| (n.to_string(), doctor_fix_command(&out, n).expect("fix")))
        .collect();
    let (code, out4) = doctor(&c, "n4");
    assert_eq!(code, 1, "{out4}");
    for n in ["n1", "n2"] {
        let cmd = doctor_fix_command(&out4, n)
            .unwrap_or_else(|| panic!("doctor on n4 printed no fix for {n}:\n{out4}"));
        fixes.push((n.to_owned(), cmd));
    }

    let vip = Ipv4Addr::new(10, 96, 0, 10);
    c.add_cluster_ip("n1", vip, 80, "n3p1", "tcp")
        .expect("ClusterIP");
    let before = c.probe("n1", ProbeKind::Tcp, vip, Some(80));
    assert!(
        !before.ok,
        "ClusterIP must fail before the overwrite: {before:?}"
    );

    // The report's fix, node by node: doctor's kubectl command with the address filled in,
    // then a restart of that node only.
    let pid = |c: &Cluster, n: &str| c.node(n).and_then(|n| n.flanneld.clone()).map(|r| r.pid);
    let mut pids: Vec<(String, Option<u32>)> = c
        .node_names()
        .into_iter()
        .map(|n| {
            let p = pid(&c, &n);
            (n, p)
        })
        .collect();
    for name in c.node_names() {
        let public = c.node(&name).expect("node").public_ip.expect("public");
        let printed = &fixes.iter().find(|(n, _)| *n == name).expect("a fix").1;
        let command = printed.replace(ADDRESS_PLACEHOLDER, &public.to_string());
        println!("operator runs: {command}");
        let said = c.kubectl_line(&command).expect("doctor's kubectl command");
        assert_eq!(said, format!("node/{name} annotated\n"));
        c.restart_node(&name).expect("restart");
        for (other, before) in &mut pids {
            if *other == name {
                *before = pid(&c, other);
            } else {
                assert_eq!(pid(&c, other), *before, "{other} was restarted too");
            }
        }
        let node = c.kube_node(&name).expect("get").expect("node");
        assert_eq!(
            node["metadata"]["annotations"][annotation("public-ip")],
            public.to_string().as_str(),
            "{name}"
        );
        if c.node(&name).expect("node").kind != KernelRef {
            let log = std::fs::read_to_string(c.flanneld_log(&name)).unwrap_or_default();
            assert!(
                log.contains(&format!("Overriding public ip with '{public}'")),
                "{name}: flanneld did not log the override"
            );
        }
    }
    let m = c.check_until_pass(Duration::from_secs(20));
    println!("after the overwrite:\n{m}");
    assert!(m.all_pass(), "{m}");
    let after = c.probe("n1", ProbeKind::Tcp, vip, Some(80));
    assert!(
        after.ok,
        "ClusterIP from n1 to a pod on the other site: {after:?}"
    );
    // The daemon and doctor on n1 now see every peer answer at its public address.
    let public = |c: &Cluster, n: &str| c.node(n).and_then(|n| n.public_ip).expect("public");
    let up = wait_until(Duration::from_secs(15), || {
        text = metrics(&c, "n1", 9101);
        ["n3", "n4"]
            .iter()
            .all(|n| text.contains(&format!("{} 1\n", reachable(&c, n, public(&c, n)))))
    });
    assert!(up, "{text}");
    let (code, out) = doctor(&c, "n1");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("PASS peer-reachable: "))
            .count(),
        3,
        "{out}"
    );
    for n in ["n1", "n3", "n4"] {
        assert!(c.flanneld_running(n), "{n} flanneld died");
    }
    teardown(c);
}

/// The placeholder in doctor's P1 fix that the operator replaces with an address.
const ADDRESS_PLACEHOLDER: &str = "<an address this node can reach>";

/// The kubectl command in a `fix:` line of doctor's report that names `node`: from
/// `kubectl annotate node <node> ` up to `, then restart ...`.
fn doctor_fix_command(report: &str, node: &str) -> Option<String> {
    let head = format!("kubectl annotate node {node} ");
    report
        .lines()
        .filter(|l| l.trim_start().starts_with("fix:"))
        .find_map(|l| {
            let cmd = &l[l.find(&head)?..];
            let end = cmd.find(", then ").unwrap_or(cmd.len());
            Some(cmd[..end].to_owned())
        })
}

/// Polls `f` every 200 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node's `/metrics` (served on `port` inside its namespace).
fn metrics(c: &Cluster, node: &str, port: u16) -> String {
    let fetch = format!(
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
    );
    netns::run(c, node, &["python3", "-c", &fetch]).1
}

/// `flanneld doctor` with a node's daemon flags and environment (kube: `NODE_NAME`), in its
/// namespace: (exit code, stdout).
fn doctor(c: &Cluster, node: &str) -> (i32, String) {
    let run = c.doctor(node).expect("run doctor");
    println!(
        "--- doctor on {node}: exit {:?}\n{}{}",
        run.status, run.stdout, run.stderr
    );
    (run.status.unwrap_or(-1), run.stdout)
}

/// The site of a node (`n1`) or of a pod's node (`n1p1`).
fn site_of(c: &Cluster, name: &str) -> Option<u8> {
    if let Some(n) = c.node(name) {
        return n.site;
    }
    c.pods()
        .into_iter()
        .find(|(_, p)| p.name == name)
        .and_then(|(n, _)| n.site)
}

/// `ping -i 0.1 -c <count>` from a pod, collected on a thread.
struct BackgroundPing {
    what: String,
    count: u32,
    handle: std::thread::JoinHandle<Output>,
}

impl BackgroundPing {
    fn start(c: &Cluster, from: &str, to: &str, count: u32) -> BackgroundPing {
        let ns = c.pod(from).expect("pod").ns.clone();
        let dst = c.pod_ip(to).expect("pod ip").to_string();
        let limit = (count / 10 + 30).to_string();
        let child = Command::new("timeout")
            .args([
                &limit, "ip", "netns", "exec", &ns, "ping", "-n", "-i", "0.1",
            ])
            .args(["-W", "1", "-c", &count.to_string(), &dst])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ping");
        BackgroundPing {
            what: format!("{from} -> {to}"),
            count,
            handle: std::thread::spawn(move || child.wait_with_output().expect("wait ping")),
        }
    }

    /// (transmitted, received) and the output.
    fn finish(self) -> (String, u32, u32, u32, String) {
        let out = self.handle.join().expect("ping thread");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stats = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("");
        let num = |word: &str| -> u32 {
            stats
                .split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let tail: Vec<&str> = text.lines().rev().take(4).collect();
        (
            self.what,
            self.count,
            num("transmitted"),
            num("received"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        )
    }
}

/// A 60 s outage of the store: pod-to-pod pings every 100 ms across it lose nothing; a
/// kernel-ref node added during the outage (written to the store's data through the
/// maintenance instance, invisible to the daemons) is reachable from every flanneld node's
/// pods within 5 s of the store's return.
fn outage(store: StoreKind) {
    let mut c = Cluster::up(&spec(store, &[Userspace, Kernel, KernelRef], 1)).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(15));
    assert!(m.all_pass(), "{m}");

    let pings = [
        BackgroundPing::start(&c, "n1p1", "n2p1", 800),
        BackgroundPing::start(&c, "n2p1", "n3p1", 800),
        BackgroundPing::start(&c, "n3p1", "n1p1", 800),
    ];
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));

    c.stop_store().expect("stop store");
    let stopped = Instant::now();
    assert!(!c.store_running());
    let n4 = c.add_node(KernelRef).expect("add a node during the outage");
    let n4p1 = format!("{n4}p1");
    let n4_ip = c.pod_ip(&n4p1).expect("pod ip");
    // The kernel-ref nodes learned it from the store's data; the daemons cannot yet.
    assert!(ping_once(&c, "n3p1", n4_ip), "kernel-ref to kernel-ref");
    std::thread::sleep(Duration::from_secs(20));
    for from in ["n1p1", "n2p1"] {
        assert!(
            !ping_once(&c, from, n4_ip),
            "{from} reached {n4p1} while the store was down"
        );
    }
    for n in ["n1", "n2"] {
        assert!(c.flanneld_running(n), "{n} flanneld died during the outage");
    }
    let outage = Duration::from_secs(60).saturating_sub(stopped.elapsed());
    std::thread::sleep(outage);

    c.start_store().expect("start store");
    let returned = Instant::now();
    println!(
        "{store} store down for {:?}",
        returned.duration_since(stopped)
    );
    let mut pending = vec!["n1p1", "n2p1"];
    while !pending.is_empty() && returned.elapsed() < Duration::from_secs(10) {
        pending.retain(|from| !ping_once(&c, from, n4_ip));
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let applied = returned.elapsed();
    println!("change made during the outage applied {applied:?} after the store returned");
    assert!(pending.is_empty(), "{pending:?} never reached {n4p1}");
    assert!(
        applied <= Duration::from_secs(5),
        "change applied {applied:?} after the store's return (limit 5 s)"
    );
    for p in pings {
        let (what, count, tx, rx, tail) = p.finish();
        println!("{what}: {tx} sent, {rx} received");
        assert_eq!(tx, count, "{what}: ping did not run to the end:\n{tail}");
        assert_eq!(rx, tx, "{what}: pings lost across the outage:\n{tail}");
    }
    // 800 pings 100 ms apart all answered: they spanned the whole outage and the return.
    assert!(
        returned.duration_since(started) + Duration::from_secs(3) < Duration::from_secs(79),
        "the pings ended too soon after the return"
    );
    let m = c.check_until_pass(Duration::from_secs(10));
    assert!(m.all_pass(), "after the outage: {m}");
    teardown(c);
}

#[test]
fn etcd_outage_loses_no_ping_and_applies_changes_on_return() {
    if !privileged_test_guard("etcd_outage_loses_no_ping_and_applies_changes_on_return") {
        return;
    }
    let _g = serial();
    outage(StoreKind::Etcd);
}

#[test]
fn api_server_outage_loses_no_ping_and_applies_changes_on_return() {
    if !privileged_test_guard("api_server_outage_loses_no_ping_and_applies_changes_on_return") {
        return;
    }
    let _g = serial();
    outage(StoreKind::Kube);
}
