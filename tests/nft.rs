//! flannel's nftables mode (`EnableNFTables: true`) end to end through the netns-harness, with
//! the real `nft` inside the cluster's namespaces: the tables against golden text written
//! from upstream's source (tests/golden/), masquerading of pod traffic leaving the overlay,
//! the periodic repair, the VXLAN guard table, and the clean-up of the other mode's rules
//! when a node switches between iptables and nftables mode. Privileged: run as root
//! (CI=true makes them mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};

use NodeKind::{Kernel, Userspace};

const NETWORK: &str = "10.244.0.0/16";

fn net_conf(nftables: bool) -> String {
    format!(r#"{{"Network":"{NETWORK}","EnableNFTables":{nftables},"Backend":{{"Type":"vxlan"}}}}"#)
}

/// A golden listing of tests/golden/ with the node's values filled in.
fn golden(file: &str, subnet: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("golden file");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.replace("SUBNET", subnet).replace("NETWORK", NETWORK))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `nft list table …` on a node, without the trailing newline; empty when the table is absent.
fn listing(c: &Cluster, node: &str, family: &str, table: &str) -> String {
    let (ok, text) = run(c, node, &["nft", "list", "table", family, table]);
    if ok {
        text.trim_end().to_owned()
    } else {
        String::new()
    }
}

fn subnet(c: &Cluster, node: &str) -> String {
    c.node(node)
        .expect("node")
        .subnet
        .expect("subnet")
        .to_string()
}

/// Every flannel(-rs) chain and jump in both iptables tables of `node`.
fn iptables_flannel_lines(c: &Cluster, node: &str) -> Vec<String> {
    let mut v = Vec::new();
    for table in ["nat", "filter"] {
        let text = sh(c, node, &["iptables", "-t", table, "-S"]);
        v.extend(
            text.lines()
                .filter(|l| l.contains("FLANNEL"))
                .map(str::to_owned),
        );
    }
    v
}

/// Counter of the probe rule `which` (0 = from the node's address, 1 = from Network).
fn probe_counts(c: &Cluster, node: &str) -> (u64, u64) {
    let text = sh(
        c,
        node,
        &["nft", "list", "chain", "ip", "nftprobe", "input"],
    );
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "packets")?;
            w.get(i + 1)?.parse().ok()
        })
        .collect();
    assert_eq!(counts.len(), 2, "{text}");
    (counts[0], counts[1])
}

/// `flanneld doctor` with `node`'s daemon flags in its namespace: (exit code, report).
fn doctor(c: &Cluster, node: &str) -> (i32, String) {
    let argv = c.doctor_command(node).expect("doctor command");
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = c
        .exec_timeout(node, &args, Duration::from_secs(60))
        .expect("run doctor");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("--- doctor on {node}:\n{report}");
    (out.status.code().unwrap_or(-1), report)
}

/// The report line of check `id`.
fn line<'a>(report: &'a str, id: &str) -> &'a str {
    report
        .lines()
        .find(|l| {
            l.get(5..)
                .is_some_and(|r| r.starts_with(&format!("{id}: ")))
        })
        .unwrap_or_else(|| panic!("no {id} line:\n{report}"))
}

#[test]
fn nftables_mode_tables_masquerade_repair_and_mode_switch() {
    if !privileged_test_guard("nftables_mode_tables_masquerade_repair_and_mode_switch") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Kernel, Userspace], 1);
    s.ip_masq = true;
    s.net_conf = Some(net_conf(true));
    s.flanneld_args.push("--iptables-resync=1".into());
    let mut c = Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(5));
    println!("{m}");
    assert!(m.all_pass(), "{m}");

    // 1. The tables, exactly as upstream's code makes them.
    let p1 = subnet(&c, "n1");
    let want_v4 = golden("nft-flannel-ipv4.txt", &p1);
    let want_v6 = golden("nft-flannel-ipv6.txt", &p1);
    assert_eq!(listing(&c, "n1", "ip", "flannel-ipv4"), want_v4);
    assert_eq!(listing(&c, "n1", "ip6", "flannel-ipv6"), want_v6);
    assert_eq!(
        listing(&c, "n2", "ip", "flannel-ipv4"),
        golden("nft-flannel-ipv4.txt", &subnet(&c, "n2"))
    );
    // upstream e2e/rules.go lists the chains one by one.
    let post = sh(
        &c,
        "n1",
        &["nft", "list", "chain", "ip", "flannel-ipv4", "postrtg"],
    );
    assert!(post.starts_with("table ip flannel-ipv4 {\n\tchain postrtg {\n"));
    assert!(post.contains(&format!("\t\tip saddr != {p1} ip daddr {NETWORK} return\n")));
    // No iptables rules of flannel in nftables mode.
    assert_eq!(iptables_flannel_lines(&c, "n1"), Vec::<String>::new());

    // 2. The VXLAN guard: kernel mode with the peers' allow-list, userspace pods only.
    let n2_ip = c.node_ip("n2").expect("n2 ip").to_string();
    let n1_ip = c.node_ip("n1").expect("n1 ip").to_string();
    let guard1 = listing(&c, "n1", "ip", "flannel-rs-guard");
    assert!(
        guard1.contains(&format!("elements = {{ {n2_ip} }}")),
        "{guard1}"
    );
    assert!(
        guard1.contains("udp dport 8472 ip saddr != @peers drop"),
        "{guard1}"
    );
    assert!(guard1.contains(&format!("udp dport 8472 ip saddr {NETWORK} drop")));
    let guard2 = listing(&c, "n2", "ip", "flannel-rs-guard");
    assert!(!guard2.contains("@peers"), "{guard2}");
    assert_eq!(
        guard2
            .matches(&format!("udp dport 8472 ip saddr {NETWORK} drop"))
            .count(),
        2,
        "{guard2}"
    );

    // 3. Pod traffic leaving the overlay is masqueraded to the node's address; pod to pod
    //    across nodes keeps the pod address (the matrix above passed over the overlay).
    sh(
        &c,
        "n2",
        &[
            "nft",
            &format!(
                "add table ip nftprobe {{ chain input {{ type filter hook input priority -50; \
                 icmp type echo-request ip saddr {n1_ip} counter; \
                 icmp type echo-request ip saddr {NETWORK} counter; }}; }}"
            ),
        ],
    );
    let (ok, out) = run(
        &c,
        "n1p1",
        &["ping", "-c", "3", "-i", "0.2", "-W", "1", &n2_ip],
    );
    assert!(
        ok,
        "pod n1p1 cannot reach node n2 outside the overlay: {out}"
    );
    let (from_node, from_pods) = probe_counts(&c, "n2");
    assert!(
        from_node >= 3 && from_pods == 0,
        "n2 saw {from_node} echo requests from n1's address and {from_pods} from pod addresses"
    );

    // 4. doctor reads nftables: flannel's masquerade and guard tables pass; a host firewall
    //    table rejecting forwarded traffic fails forward-reject (flannel's accept in its own
    //    table does not help), firewalld's table is a host-firewall warning.
    let (code, report) = doctor(&c, "n1");
    assert_eq!(code, 0, "{report}");
    assert!(
        line(&report, "masquerade").starts_with(&format!(
            "PASS masquerade: flannel's masquerade rules for {NETWORK} (subnet {p1}) are in nftables chain ip flannel-ipv4 postrtg"
        )),
        "{report}"
    );
    assert!(line(&report, "vxlan-guard").starts_with("PASS vxlan-guard: VXLAN to UDP 8472 is accepted only from the 1 peers' public IPs (set ip flannel-rs-guard peers)"));
    assert!(
        line(&report, "forward-reject").starts_with("PASS "),
        "{report}"
    );
    assert!(
        line(&report, "host-firewall").starts_with("PASS "),
        "{report}"
    );
    sh(
        &c,
        "n1",
        &[
            "nft",
            "add table inet hostfw { chain forward { type filter hook forward priority filter; policy accept; \
             ct state established,related accept; counter reject with icmpx admin-prohibited; }; }",
        ],
    );
    sh(&c, "n1", &["nft", "add table inet firewalld"]);
    let (code, report) = doctor(&c, "n1");
    assert_eq!(code, 1, "{report}");
    let fr = line(&report, "forward-reject");
    assert!(
        fr.starts_with("FAIL forward-reject: nftables chain inet hostfw forward: \"counter packets ")
            && fr.ends_with(&format!("reject with icmpx admin-prohibited\" drops pod traffic in {NETWORK} (a drop in any nftables forward chain is final, whatever flannel accepts)")),
        "{report}"
    );
    assert!(line(&report, "host-firewall")
        .starts_with("WARN host-firewall: nftables table inet firewalld"));
    // And the pods on n1 lose their cross-node traffic indeed.
    assert!(!ping_ok(
        &c,
        "n1p1",
        &c.pod_ip("n2p1").expect("ip").to_string()
    ));
    sh(&c, "n1", &["nft", "delete table inet hostfw"]);
    sh(&c, "n1", &["nft", "delete table inet firewalld"]);
    let (code, report) = doctor(&c, "n1");
    assert_eq!(code, 0, "{report}");

    // 5. The periodic check (--iptables-resync=1) repairs a deleted rule and a deleted peer.
    let handles = sh(
        &c,
        "n1",
        &[
            "nft",
            "-a",
            "list",
            "chain",
            "ip",
            "flannel-ipv4",
            "postrtg",
        ],
    );
    let handle = handles
        .lines()
        .find(|l| l.contains("masquerade fully-random"))
        .and_then(|l| l.rsplit(' ').next())
        .expect("rule handle")
        .to_owned();
    sh(
        &c,
        "n1",
        &[
            "nft",
            "delete",
            "rule",
            "ip",
            "flannel-ipv4",
            "postrtg",
            "handle",
            &handle,
        ],
    );
    assert_ne!(listing(&c, "n1", "ip", "flannel-ipv4"), want_v4);
    sh(
        &c,
        "n1",
        &[
            "nft",
            "delete",
            "element",
            "ip",
            "flannel-rs-guard",
            "peers",
            &format!("{{ {n2_ip} }}"),
        ],
    );
    let repaired = wait_for(Duration::from_secs(5), || {
        listing(&c, "n1", "ip", "flannel-ipv4") == want_v4
            && listing(&c, "n1", "ip", "flannel-rs-guard") == guard1
    });
    assert!(
        repaired.is_some(),
        "not repaired within 5 s:\n{}",
        listing(&c, "n1", "ip", "flannel-ipv4")
    );
    println!("deleted rule and peer repaired after {repaired:?}");
    // The repair is logged after nft has rewritten and re-listed the table: give it a moment.
    let read_log = || std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    let logged = wait_for(Duration::from_secs(2), || {
        read_log().contains("Some nftables rules are missing")
    });
    assert!(logged.is_some(), "{}", read_log());

    // 6. Switching n1 to iptables mode removes the tables; switching back removes the chains.
    let config = c.lease_dir().config_path();
    c.stop_flanneld("n1").expect("stop");
    std::fs::write(&config, net_conf(false)).expect("config");
    c.start_flanneld("n1").expect("start in iptables mode");
    let switched = wait_for(Duration::from_secs(5), || {
        let tables = sh(&c, "n1", &["nft", "list", "tables"]);
        let ipt = iptables_flannel_lines(&c, "n1");
        !tables.contains("flannel")
            && ipt.iter().any(|l| l == "-N FLANNEL-POSTRTG")
            && ipt.iter().any(|l| l == "-N FLANNEL-VXLAN-IN")
    });
    assert!(
        switched.is_some(),
        "iptables mode: {:?}\n{}",
        iptables_flannel_lines(&c, "n1"),
        sh(&c, "n1", &["nft", "list", "tables"])
    );
    let (code, report) = doctor(&c, "n1");
    assert_eq!(code, 0, "{report}");
    assert!(line(&report, "masquerade").ends_with("are in iptables nat FLANNEL-POSTRTG"));
    assert!(line(&report, "vxlan-guard").starts_with("PASS "));
    c.stop_flanneld("n1").expect("stop");
    std::fs::write(&config, net_conf(true)).expect("config");
    c.start_flanneld("n1").expect("start in nftables mode");
    let back = wait_for(Duration::from_secs(5), || {
        iptables_flannel_lines(&c, "n1").is_empty()
            && listing(&c, "n1", "ip", "flannel-ipv4") == want_v4
            && listing(&c, "n1", "ip", "flannel-rs-guard") == guard1
    });
    assert!(
        back.is_some(),
        "nftables mode again: {:?}\n{}",
        iptables_flannel_lines(&c, "n1"),
        listing(&c, "n1", "ip", "flannel-ipv4")
    );
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    teardown(c);
}
