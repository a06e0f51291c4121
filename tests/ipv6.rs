//! `EnableIPv6` end to end (issue #12): dual-stack overlays with `--dataplane=kernel` (vxlan)
//! and host-gw. Two flanneld nodes in namespaces behind one bridge share a `--lease-dir`
//! store; each has a pod namespace on its subnets. Checked: subnet.env, the lease JSON,
//! `flannel-v6.1` and its per-peer route/neighbour/FDB entries, host-gw v6 routes, the
//! ip6tables masquerade chain, and pod-to-pod ping, ping6 and TCP over IPv6.
//! Privileged: run as root (CI=true makes them mandatory).
//!
//! Addresses (all inside the test's namespaces): underlay 198.18.0.0/24 and
//! 2001:db8:18::/64, pods 10.244.0.0/16 and 2001:db8:42::/56.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::MutexGuard;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node as KubeNode;
use serde_json::json;
use test_apiserver::TestApiServer;
use test_support::cluster::{flanneld, serial};
use test_support::netns::Netns;
use test_support::ping::PingRun;
use test_support::{privileged, wait_for};

const DUAL_VXLAN: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan"}}"#;
/// host-gw in flannel's nftables mode.
/// IPv6-only vxlan.
const V6_ONLY_VXLAN: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","EnableNFTables":true,"Backend":{"Type":"host-gw"}}"#;

/// The underlay switch: a bridge in its own namespace.
struct Switch {
    ns: Netns,
}

impl Switch {
    fn new() -> Switch {
        let ns = Netns::new("v6sw");
        ns.ip_line("link add br0 type bridge");
        ns.ip_line("link set br0 up");
        Switch { ns }
    }
}

/// A node namespace with flanneld and one pod namespace; flanneld is stopped by its PID on
/// drop, before the namespaces go. Each node has its own run directory (subnet.env and the
/// handover sockets beside it), as each host has its own `/run/flannel`.
struct Node {
    flanneld: Option<Child>,
    /// The flags of the last start.
    args: Vec<String>,
    env_file: PathBuf,
    log_file: PathBuf,
    ns: Netns,
    pod: Netns,
    index: u8,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.flanneld.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// IPv6 addresses usable at once (no duplicate address detection), forwarding on.
fn sysctls(ns: &Netns, forwarding: bool) {
    let mut args = vec![
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ];
    if forwarding {
        args.extend(["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
    }
    ns.exec(&args);
}

impl Node {
    /// Node `i` (1-based): eth0 on the switch with 2001:db8:18::i (and 198.18.0.i if `v4`),
    /// default routes through eth0 (flanneld picks its interface from them).
    fn new(sw: &Switch, i: u8, dir: &Path, v4: bool) -> Node {
        let ns = Netns::new(&format!("v6n{i}"));
        sysctls(&ns, true);
        let port = format!("sw{i}");
        sw.ns.ip_line(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name
        ));
        sw.ns.ip_line(&format!("link set {port} master br0 up"));
        ns.ip_line(&format!("addr add 2001:db8:18::{i}/64 dev eth0 nodad"));
        ns.ip_line("link set eth0 up");
        if v4 {
            ns.ip_line(&format!("addr add 198.18.0.{i}/24 dev eth0"));
            ns.ip_line("route add default via 198.18.0.254 dev eth0");
        }
        ns.ip_line("-6 route add default via 2001:db8:18::fe dev eth0");
        let pod = Netns::new(&format!("v6p{i}"));
        sysctls(&pod, false);
        let run_dir = dir.join(format!("run-{i}"));
        std::fs::create_dir_all(&run_dir).expect("run dir");
        Node {
            flanneld: None,
            args: Vec::new(),
            env_file: run_dir.join("subnet.env"),
            log_file: dir.join(format!("flanneld-{i}.log")),
            ns,
            pod,
            index: i,
        }
    }

    /// Starts flanneld with `args` (and `NODE_NAME=node-<i>` for the Kubernetes store).
    fn start(&mut self, args: &[String]) {
        self.args = args.to_vec();
        self.flanneld = Some(self.spawn());
    }

    /// A flanneld with the last start's flags, logging to `log_file`.
    fn spawn(&self) -> Child {
        let log = std::fs::File::create(&self.log_file).expect("log file");
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(flanneld())
            .arg(format!("--subnet-file={}", self.env_file.display()))
            .args(["--iptables-resync=1", "-v=1"])
            .args(&self.args)
            .env("NODE_NAME", format!("node-{}", self.index))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start flanneld")
    }

    /// The upgrade path: a new flanneld with the same flags starts while the old one runs,
    /// takes over the data plane of every device in `devices`; then the old one gets SIGTERM
    /// (and must exit 0). Returns the old one's log.
    fn handover(&mut self, devices: &[&str]) -> String {
        let successor_log = self.log_file.with_extension("successor.log");
        let old_log = std::mem::replace(&mut self.log_file, successor_log);
        let mut old = self.flanneld.take().expect("a running flanneld");
        self.flanneld = Some(self.spawn());
        let read_old = || std::fs::read_to_string(&old_log).unwrap_or_default();
        let handed = wait_for(Duration::from_secs(20), || {
            let log = read_old();
            devices.iter().all(|d| {
                log.lines().any(|l| {
                    l.contains("handed the data plane over") && l.contains(&format!("device={d}"))
                })
            })
        });
        let pid = old.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let exited = wait_for(Duration::from_secs(10), || {
            matches!(old.try_wait(), Ok(Some(_)))
        });
        if exited.is_none() {
            let _ = old.kill();
        }
        let status = old.wait().expect("wait for the old flanneld");
        assert!(handed.is_some(), "old: {}\nnew: {}", read_old(), self.log());
        assert!(status.success(), "old flanneld: {status}: {}", read_old());
        read_old()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Waits for subnet.env and returns its text.
    fn subnet_env(&mut self) -> String {
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(Ok(Some(st))) = self.flanneld.as_mut().map(Child::try_wait) {
                panic!("flanneld exited with {st}: {}", self.log());
            }
            self.env_file.exists()
        });
        assert!(ok.is_some(), "no subnet.env: {}", self.log());
        std::fs::read_to_string(&self.env_file).expect("subnet.env")
    }

    /// Gives the pod the second address of each of the node's subnets, the node side the
    /// first (like the CNI bridge's gateway), default routes via the node.
    fn plumb_pod(&self, v4: Option<&str>, v6: &str) {
        let (ns, pod) = (&self.ns, &self.pod);
        ns.ip_line(&format!(
            "link add vp type veth peer name eth0 netns {}",
            pod.name
        ));
        ns.ip_line(&format!("addr add {v6}1/64 dev vp nodad"));
        ns.ip_line("link set vp up");
        pod.ip_line(&format!("addr add {v6}2/64 dev eth0 nodad"));
        pod.ip_line("link set eth0 up");
        pod.ip_line(&format!("-6 route add default via {v6}1"));
        if let Some(v4) = v4 {
            ns.ip_line(&format!("addr add {v4}1/24 dev vp"));
            pod.ip_line(&format!("addr add {v4}2/24 dev eth0"));
            pod.ip_line(&format!("route add default via {v4}1"));
        }
    }
}

/// `KEY=value` of subnet.env.
fn env_value(env: &str, key: &str) -> String {
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing in {env}"))
        .to_string()
}

/// `10.244.3.1/24` → `10.244.3.`; `2001:db8:42:7::1/64` → `2001:db8:42:7::`.
fn prefix_of(first_host: &str) -> String {
    let addr = first_host.split('/').next().expect("addr");
    addr.strip_suffix('1')
        .expect("first host ends in 1")
        .to_string()
}

/// Two nodes up on `config` with `extra` flags, each with a plumbed pod; the pods' address
/// prefixes (v4, v6) per node.
fn two_nodes(
    tmp: &Path,
    config: &str,
    extra: &[&str],
) -> (Switch, Vec<Node>, Vec<(String, String)>) {
    two_nodes_each(tmp, config, [extra, extra])
}

/// [`two_nodes`] with flags of its own for each node.
fn two_nodes_each(
    tmp: &Path,
    config: &str,
    extra: [&[&str]; 2],
) -> (Switch, Vec<Node>, Vec<(String, String)>) {
    let lease_dir = lease_store(tmp, config);
    let sw = Switch::new();
    let mut nodes: Vec<Node> = (1..=2).map(|i| Node::new(&sw, i, tmp, true)).collect();
    for (n, extra) in nodes.iter_mut().zip(extra) {
        let mut args = vec![format!("--lease-dir={}", lease_dir.display())];
        args.extend(extra.iter().map(|a| a.to_string()));
        n.start(&args);
    }
    let mut prefixes = Vec::new();
    for n in &mut nodes {
        let env = n.subnet_env();
        let v4 = prefix_of(&env_value(&env, "FLANNEL_SUBNET"));
        let v6 = prefix_of(&env_value(&env, "FLANNEL_IPV6_SUBNET"));
        n.plumb_pod(Some(&v4), &v6);
        prefixes.push((v4, v6));
    }
    (sw, nodes, prefixes)
}

/// A scratch directory removed on drop (also on panic).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The start of every test here: root (mandatory in CI), one at a time, a scratch directory.
fn begin(test: &str, tag: &str) -> Option<(MutexGuard<'static, ()>, TempDir)> {
    privileged(test).then(|| (serial(), tempdir(tag)))
}

/// `<tmp>/leases` holding the network config `config`: a `--lease-dir` store.
fn lease_store(tmp: &Path, config: &str) -> PathBuf {
    let dir = tmp.join("leases");
    std::fs::create_dir_all(&dir).expect("lease dir");
    std::fs::write(dir.join("config"), config).expect("config");
    dir
}

fn tempdir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("frs-ipv6-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tempdir");
    TempDir(d)
}

/// Pings `dst` from the pod of `from` until one answer (at most 10 s).
fn ping_until(from: &Node, dst: &str) -> bool {
    let v6 = dst.contains(':');
    wait_for(Duration::from_secs(10), || {
        let mut args = vec!["netns", "exec", from.pod.name.as_str(), "ping"];
        if v6 {
            args.push("-6");
        }
        args.extend(["-c", "1", "-W", "1", dst]);
        Command::new("ip")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .is_some()
}

const TCP_SERVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 7777))
s.listen(1)
s.settimeout(20)
c, a = s.accept()
c.sendall(("hello " + a[0]).encode())
c.close()
"#;

const TCP_CLIENT: &str = r#"
import socket, sys, time
for _ in range(40):
    try:
        c = socket.create_connection((sys.argv[1], 7777), 5)
        break
    except OSError:
        time.sleep(0.25)
print(c.recv(200).decode())
"#;

/// A TCP connection over IPv6 from pod `from` to pod `to` (address `dst`); what the server
/// saw as the client's address.
fn tcp_v6(from: &Node, to: &Node, dst: &str) -> String {
    let server = Command::new("timeout")
        .args([
            "25",
            "ip",
            "netns",
            "exec",
            &to.pod.name,
            "python3",
            "-c",
            TCP_SERVER,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("server");
    let out = Command::new("timeout")
        .args([
            "20",
            "ip",
            "netns",
            "exec",
            &from.pod.name,
            "python3",
            "-c",
            TCP_CLIENT,
            dst,
        ])
        .output()
        .expect("client");
    let mut server = server;
    let _ = server.wait();
    assert!(
        out.status.success(),
        "TCP over IPv6 to {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The MAC of device `dev` on node `n`.
fn mac_of(n: &Node, dev: &str) -> String {
    let link = n.ns.ip(&["-o", "link", "show", dev]);
    link.split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("mac")
        .to_string()
}

/// flannel's entries on `flannel-v6.1` of node `n` for the peer with subnet address `net`
/// (a /64), VTEP MAC `mac` and public IPv6 `public`, and no others.
fn assert_v6_peer_entries(n: &Node, net: &str, mac: &str, public: &str) {
    // What `ip route replace <subnet> via <subnet address> dev flannel-v6.1 onlink` makes
    // (IPv6 routes get the kernel's metric 1024); the /128 of our own address aside. The
    // peer's lease may reach `n` a moment after `n` wrote subnet.env.
    let programmed = wait_for(Duration::from_secs(10), || {
        n.ns.ip(&["-6", "route", "show", "dev", "flannel-v6.1"])
            .contains(&format!("{net}/64 via"))
    });
    assert!(programmed.is_some(), "{}", n.log());
    let routes = n.ns.ip(&["-6", "route", "show", "dev", "flannel-v6.1"]);
    assert_eq!(
        entries(&routes, " via "),
        [format!("{net}/64 via {net} metric 1024 onlink pref medium")],
        "{routes}"
    );
    let neigh = n.ns.ip(&["-6", "neigh", "show", "dev", "flannel-v6.1"]);
    assert_eq!(
        entries(&neigh, "lladdr"),
        [format!("{net} lladdr {mac} PERMANENT")]
    );
    let fdb = n.ns.bridge(&["fdb", "show", "dev", "flannel-v6.1"]);
    assert_eq!(
        entries(&fdb, " dst "),
        [format!("{mac} dst {public} self permanent")]
    );
}

/// `flannel-v6.1` of node `n` has the /128 of its subnet address `net`.
fn assert_v6_vtep_address(n: &Node, net: &str) {
    let addrs = n.ns.ip(&[
        "-6",
        "addr",
        "show",
        "dev",
        "flannel-v6.1",
        "scope",
        "global",
    ]);
    assert!(addrs.contains(&format!("inet6 {net}/128")), "{addrs}");
}

/// The lines of `text` that contain `keep`, trimmed, sorted and deduplicated.
fn entries(text: &str, keep: &str) -> Vec<String> {
    let set: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(keep))
        .collect();
    set.into_iter().map(String::from).collect()
}

/// The lease file of the node whose IPv6 public address is `public6`.
fn lease_file(lease_dir: &Path, public6: &str) -> (String, String) {
    for e in std::fs::read_dir(lease_dir.join("subnets")).expect("subnets") {
        let e = e.expect("entry");
        let text = std::fs::read_to_string(e.path()).expect("lease");
        if text.contains(&format!("\"PublicIPv6\":\"{public6}\"")) {
            return (e.file_name().to_string_lossy().into_owned(), text);
        }
    }
    panic!("no lease with PublicIPv6 {public6}");
}

#[test]
fn dual_stack_kernel_vxlan() {
    let Some((_g, tmp)) = begin("dual_stack_kernel_vxlan", "vxlan") else {
        return;
    };
    let (_sw, nodes, px) = two_nodes(&tmp, DUAL_VXLAN, &["--dataplane=kernel", "--ip-masq"]);
    let (n1, n2) = (&nodes[0], &nodes[1]);

    // subnet.env: flannel's keys and order, both families.
    let env = std::fs::read_to_string(&n1.env_file).expect("env");
    let keys: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    assert_eq!(
        keys,
        [
            "FLANNEL_NETWORK",
            "FLANNEL_SUBNET",
            "FLANNEL_IPV6_NETWORK",
            "FLANNEL_IPV6_SUBNET",
            "FLANNEL_MTU",
            "FLANNEL_IPMASQ"
        ],
        "{env}"
    );
    assert_eq!(env_value(&env, "FLANNEL_IPV6_NETWORK"), "2001:db8:42::/56");
    assert!(
        env_value(&env, "FLANNEL_IPV6_SUBNET").ends_with("::1/64"),
        "{env}"
    );
    assert_eq!(env_value(&env, "FLANNEL_MTU"), "1450");
    assert_eq!(env_value(&env, "FLANNEL_IPMASQ"), "true");

    // Each node's lease: key `v4-len&v6-len`, PublicIPv6 and BackendV6Data with the MAC of
    // its flannel-v6.1.
    let lease_dir = tmp.join("leases");
    let (key2, lease2) = lease_file(&lease_dir, "2001:db8:18::2");
    let mac2 = mac_of(n2, "flannel-v6.1");
    let net2_v6 = px[1].1.clone();
    assert_eq!(key2, format!("{}0-24&{net2_v6}-64", px[1].0), "{lease2}");
    assert!(
        lease2.starts_with(r#"{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8:18::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"#),
        "{lease2}"
    );
    assert!(
        lease2.ends_with(&format!(
            r#","BackendV6Data":{{"VNI":1,"VtepMAC":"{mac2}"}}}}"#
        )),
        "{lease2}"
    );
    assert_ne!(mac2, mac_of(n2, "flannel.1"), "one MAC per device");

    // flannel-v6.1 as flannel creates it, and n2's entries on n1.
    let link = n1.ns.ip(&["-d", "link", "show", "flannel-v6.1"]);
    assert!(
        link.contains("vxlan id 1 local 2001:db8:18::1 dev eth0"),
        "{link}"
    );
    assert_v6_vtep_address(n1, &px[0].1);
    assert_v6_peer_entries(n1, &net2_v6, &mac2, "2001:db8:18::2");
    // The IPv4 device carries only IPv4 peers, the IPv6 one only IPv6 peers.
    let fdb4 = n1.ns.bridge(&["fdb", "show", "dev", "flannel.1"]);
    assert!(fdb4.contains("dst 198.18.0.2 self permanent"), "{fdb4}");
    assert!(!fdb4.contains("2001:db8"), "{fdb4}");

    // Pod to pod, both families, and TCP over IPv6 without NAT between pods.
    let (p2v4, p2v6) = (format!("{}2", px[1].0), format!("{}2", px[1].1));
    assert!(ping_until(n1, &p2v4), "ping {p2v4}: {}", n1.log());
    assert!(ping_until(n1, &p2v6), "ping6 {p2v6}: {}", n1.log());
    assert!(ping_until(n2, &format!("{}2", px[0].1)), "ping6 back");
    let seen = tcp_v6(n1, n2, &p2v6);
    assert_eq!(seen, format!("hello {}2", px[0].1));

    // ip6tables: flannel's masquerade chain, upstream's text with the IPv6 values.
    let save = n1
        .ns
        .exec(&["ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    let random_fully = save.contains("--random-fully");
    let (n, p) = ("2001:db8:42::/56", format!("{}/64", px[0].1));
    let c = r#"-m comment --comment "flanneld masq""#;
    let rf = if random_fully { " --random-fully" } else { "" };
    let want = [
        "-N FLANNEL-POSTRTG".to_string(),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {p} -d {n} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} -d {p} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {p} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} ! -d ff00::/8 {c} -j MASQUERADE{rf}"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {n} {c} -j MASQUERADE{rf}"),
    ];
    let got: Vec<String> = save.lines().map(str::to_string).collect();
    assert_eq!(got, want);
    let post = n1.ns.exec(&["ip6tables", "-t", "nat", "-S", "POSTROUTING"]);
    assert!(
        post.contains(&format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG")),
        "{post}"
    );
    let fwd = n1.ns.exec(&["ip6tables", "-S", "FLANNEL-FWD"]);
    assert!(
        fwd.contains(r#"-A FLANNEL-FWD -s 2001:db8:42::/56 -m comment --comment "flanneld forward" -j ACCEPT"#),
        "{fwd}"
    );
}

#[test]
fn dual_stack_host_gw() {
    let Some((_g, tmp)) = begin("dual_stack_host_gw", "hostgw") else {
        return;
    };
    // The default data plane: host-gw needs no --dataplane flag for IPv6.
    let (_sw, nodes, px) = two_nodes(&tmp, DUAL_HOST_GW, &["--ip-masq"]);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let env = std::fs::read_to_string(&n1.env_file).expect("env");
    assert_eq!(env_value(&env, "FLANNEL_MTU"), "1500");
    let (_, lease2) = lease_file(&tmp.join("leases"), "2001:db8:18::2");
    assert_eq!(
        lease2,
        r#"{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8:18::2","BackendType":"host-gw"}"#
    );
    let routes6 = n1.ns.ip(&["-6", "route", "show", "dev", "eth0"]);
    let want = format!("{}/64 via 2001:db8:18::2", px[1].1);
    assert!(
        routes6.lines().any(|l| l.starts_with(&want)),
        "want {want}: {routes6}"
    );
    let routes4 = n1.ns.ip(&["route", "show", "dev", "eth0"]);
    let want4 = format!("{}0/24 via 198.18.0.2", px[1].0);
    assert!(
        routes4.lines().any(|l| l.starts_with(&want4)),
        "want {want4}: {routes4}"
    );
    assert!(
        ping_until(n1, &format!("{}2", px[1].0)),
        "ping: {}",
        n1.log()
    );
    assert!(
        ping_until(n1, &format!("{}2", px[1].1)),
        "ping6: {}",
        n1.log()
    );
    let seen = tcp_v6(n2, n1, &format!("{}2", px[0].1));
    assert_eq!(seen, format!("hello {}2", px[1].1));

    // nftables mode: flannel's rules in `ip6 flannel-ipv6` (and `ip flannel-ipv4`).
    let p6 = format!("{}/64", px[0].1);
    let chain6 = n1
        .ns
        .exec(&["nft", "list", "chain", "ip6", "flannel-ipv6", "postrtg"]);
    for rule in [
        format!("ip6 saddr {p6} ip6 daddr 2001:db8:42::/56 return"),
        format!("ip6 saddr 2001:db8:42::/56 ip6 daddr {p6} return"),
        format!("ip6 saddr != {p6} ip6 daddr 2001:db8:42::/56 return"),
        "ip6 saddr 2001:db8:42::/56 ip6 daddr != ff00::/8 masquerade".to_string(),
        "ip6 saddr != 2001:db8:42::/56 ip6 daddr 2001:db8:42::/56 masquerade".to_string(),
    ] {
        assert!(chain6.contains(&rule), "{rule}: {chain6}");
    }
    let fwd6 = n1
        .ns
        .exec(&["nft", "list", "chain", "ip6", "flannel-ipv6", "forward"]);
    assert!(fwd6.contains("ip6 daddr 2001:db8:42::/56 accept"), "{fwd6}");
    let chain4 = n1
        .ns
        .exec(&["nft", "list", "chain", "ip", "flannel-ipv4", "postrtg"]);
    assert!(
        chain4.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade"),
        "{chain4}"
    );
}

/// The test API server, run in the switch namespace on 2001:db8:18::fe (the nodes' IPv6
/// default gateway) by a thread of its own; stopped on drop.
struct ApiServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const API_URL: &str = "http://[2001:db8:18::fe]:6443";

impl ApiServer {
    fn start(sw: &Switch, nodes: Vec<KubeNode>) -> ApiServer {
        sw.ns.ip_line("addr add 2001:db8:18::fe/64 dev br0 nodad");
        let path = sw.ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            flannel_rs::io::netns::enter(&path).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let addr = "[2001:db8:18::fe]:6443".parse().expect("addr");
                let server = TestApiServer::start_on(addr).await.expect("api server");
                for n in nodes {
                    server.add_node(n);
                }
                let _ = ready_tx.send(());
                let _ = stopped.await;
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("api server ready");
        ApiServer {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A node's annotations, read over HTTP from the switch namespace.
    fn annotations(sw: &Switch, node: &str) -> serde_json::Map<String, serde_json::Value> {
        let body = sw.ns.exec(&[
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!("{API_URL}/api/v1/nodes/{node}"),
        ]);
        let v: serde_json::Value = serde_json::from_str(&body).expect("node json");
        v["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kube_node(name: &str, cidr: &str) -> KubeNode {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
        ]}
    }))
    .expect("node")
}

/// Two IPv6-only nodes (no IPv4 address at all) with the Kubernetes store (the test API
/// server in the switch namespace) on `dataplane`, subnet.env checked, pods plumbed.
fn v6_only_nodes(tmp: &Path, sw: &Switch, dataplane: &str) -> (ApiServer, Vec<Node>) {
    let conf = tmp.join("net-conf.json");
    std::fs::write(&conf, V6_ONLY_VXLAN).expect("net-conf");
    let api = ApiServer::start(
        sw,
        vec![
            kube_node("node-1", "2001:db8:42:1::/64"),
            kube_node("node-2", "2001:db8:42:2::/64"),
        ],
    );
    let mut nodes: Vec<Node> = (1..=2).map(|i| Node::new(sw, i, tmp, false)).collect();
    let args = [
        "--kube-subnet-mgr".to_string(),
        format!("--kube-api-url={API_URL}"),
        format!("--net-config-path={}", conf.display()),
        format!("--dataplane={dataplane}"),
        "--ip-masq".into(),
    ];
    for n in &mut nodes {
        n.start(&args);
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        let env = n.subnet_env();
        let want = format!(
            "FLANNEL_IPV6_NETWORK=2001:db8:42::/56\nFLANNEL_IPV6_SUBNET=2001:db8:42:{}::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
            i + 1
        );
        assert_eq!(env, want);
        n.plumb_pod(None, &format!("2001:db8:42:{}::", i + 1));
    }
    (api, nodes)
}

#[test]
fn ipv6_only_kernel_vxlan_with_the_kube_store() {
    let Some((_g, tmp)) = begin("ipv6_only_kernel_vxlan_with_the_kube_store", "v6only") else {
        return;
    };
    let sw = Switch::new();
    let (_api, nodes) = v6_only_nodes(&tmp, &sw, "kernel");
    let (n1, n2) = (&nodes[0], &nodes[1]);

    // flannel's IPv6 annotations; no IPv4 ones for an IPv6-only vxlan node.
    let mac2 = mac_of(n2, "flannel-v6.1");
    let ok = wait_for(Duration::from_secs(10), || {
        let a = ApiServer::annotations(&sw, "node-2");
        a.get("flannel.alpha.coreos.com/public-ipv6")
            .and_then(|v| v.as_str())
            == Some("2001:db8:18::2")
    });
    assert!(ok.is_some(), "{}", n2.log());
    let a = ApiServer::annotations(&sw, "node-2");
    assert_eq!(
        a["flannel.alpha.coreos.com/backend-v6-data"],
        json!(format!(r#"{{"VNI":1,"VtepMAC":"{mac2}"}}"#))
    );
    assert_eq!(a["flannel.alpha.coreos.com/backend-type"], json!("vxlan"));
    assert!(
        !a.contains_key("flannel.alpha.coreos.com/public-ip"),
        "{a:?}"
    );
    assert!(
        !a.contains_key("flannel.alpha.coreos.com/backend-data"),
        "{a:?}"
    );

    // Only the IPv6 device, with n2's entries.
    let link = n1.ns.ip(&["-d", "link", "show", "flannel-v6.1"]);
    assert!(
        link.contains("vxlan id 1 local 2001:db8:18::1 dev eth0"),
        "{link}"
    );
    assert!(!n1.ns.ip(&["link", "show"]).contains("flannel.1:"));
    let ok = wait_for(Duration::from_secs(10), || {
        n1.ns
            .ip(&["-6", "route", "show", "dev", "flannel-v6.1"])
            .contains("2001:db8:42:2::/64 via")
    });
    assert!(ok.is_some(), "{}", n1.log());
    assert_v6_peer_entries(n1, "2001:db8:42:2::", &mac2, "2001:db8:18::2");

    assert!(ping_until(n1, "2001:db8:42:2::2"), "ping6: {}", n1.log());
    assert_eq!(tcp_v6(n2, n1, "2001:db8:42:1::2"), "hello 2001:db8:42:2::2");

    // ip6tables rules only: IPv4 is not enabled.
    let nat6 = n1
        .ns
        .exec(&["ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    assert!(
        nat6.contains("-A FLANNEL-POSTRTG -s 2001:db8:42:1::/64 -d 2001:db8:42::/56"),
        "{nat6}"
    );
    let nat4 = n1.ns.exec(&["iptables", "-t", "nat", "-S"]);
    assert!(!nat4.contains("FLANNEL-POSTRTG"), "{nat4}");
    // The VXLAN guard's allow-list, in ip6tables: the peer's public IPv6 only.
    let ok = wait_for(Duration::from_secs(10), || {
        let g = n1.ns.exec(&["ip6tables", "-S", "FLANNEL-VXLAN-IN"]);
        g.contains("-s 2001:db8:18::2/128") && g.contains("-j DROP")
    });
    assert!(
        ok.is_some(),
        "{}",
        n1.ns.exec(&["ip6tables", "-S", "FLANNEL-VXLAN-IN"])
    );
}

/// IPv6-only nodes sharing a directory store (upstream's `0.0.0.0-0&<v6>-<len>` lease files):
/// allocated subnets, the lease file's key and JSON, pod to pod over kernel vxlan.
#[test]
fn ipv6_only_kernel_vxlan_with_the_dir_store() {
    let Some((_g, tmp)) = begin("ipv6_only_kernel_vxlan_with_the_dir_store", "v6dir") else {
        return;
    };
    let lease_dir = lease_store(&tmp, V6_ONLY_VXLAN);
    let sw = Switch::new();
    let mut nodes: Vec<Node> = (1..=2).map(|i| Node::new(&sw, i, &tmp, false)).collect();
    let args = [
        format!("--lease-dir={}", lease_dir.display()),
        "--dataplane=kernel".into(),
    ];
    let mut px = Vec::new();
    for n in &mut nodes {
        n.start(&args);
        let env = n.subnet_env();
        assert!(!env.contains("FLANNEL_SUBNET="), "{env}");
        assert_eq!(env_value(&env, "FLANNEL_IPV6_NETWORK"), "2001:db8:42::/56");
        let v6 = prefix_of(&env_value(&env, "FLANNEL_IPV6_SUBNET"));
        n.plumb_pod(None, &v6);
        px.push(v6);
    }
    assert_ne!(px[0], px[1], "distinct subnets");
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let (key2, lease2) = lease_file(&lease_dir, "2001:db8:18::2");
    assert_eq!(key2, format!("0.0.0.0-0&{}-64", px[1]), "{lease2}");
    let mac2 = mac_of(n2, "flannel-v6.1");
    assert_eq!(
        lease2,
        format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:18::2","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{mac2}"}}}}"#
        )
    );
    assert_v6_peer_entries(n1, &px[1], &mac2, "2001:db8:18::2");
    let p2 = format!("{}2", px[1]);
    assert!(ping_until(n1, &p2), "ping6 {p2}: {}", n1.log());
    assert_eq!(
        tcp_v6(n2, n1, &format!("{}2", px[0])),
        format!("hello {p2}")
    );
}

/// A tcpdump of the VXLAN port on `eth0` of node `n`, bounded in packets and time, stopped
/// by its PID (SIGTERM flushes the file). Immediate mode: a packet is written when it is
/// seen, not when the kernel's buffer times out (up to a second later, after a short test's
/// SIGTERM).
struct Capture {
    child: Option<Child>,
    pcap: PathBuf,
}

impl Capture {
    fn start(n: &Node, dir: &Path) -> Capture {
        Capture::start_filtered(n, dir, "udp port 8472")
    }

    /// A capture of what the BPF expression `filter` accepts.
    fn start_filtered(n: &Node, dir: &Path, filter: &str) -> Capture {
        let pcap = dir.join(format!("n{}.pcap", n.index));
        let log = dir.join(format!("tcpdump-{}.log", n.index));
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns.name, "timeout", "120", "tcpdump"])
            .args([
                "-i",
                "eth0",
                "-n",
                "-U",
                "--immediate-mode",
                "-c",
                "20000",
                "-w",
            ])
            .arg(&pcap)
            .args(filter.split_whitespace())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("tcpdump");
        let listening = wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
        });
        assert!(
            listening.is_some(),
            "tcpdump: {:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
        Capture {
            child: Some(child),
            pcap,
        }
    }

    /// Stops the capture; per frame: outer IPv6 source, outer UDP checksum and its status,
    /// inner TCP and ICMPv6 checksum statuses (tshark: 0 Bad, 1 Good).
    fn stop(self) -> Vec<Vec<String>> {
        self.stop_and_read(
            "-o udp.check_checksum:TRUE -o tcp.check_checksum:TRUE -Y vxlan -T fields \
             -E occurrence=a -e ipv6.src -e udp.checksum -e udp.checksum.status \
             -e tcp.checksum.status -e icmpv6.checksum.status",
        )
    }

    /// Stops the capture and reads it with tshark's `read` options (whitespace-separated,
    /// after `-d udp.port==8472,vxlan`); the tab-separated fields of each output line.
    fn stop_and_read(mut self, read: &str) -> Vec<Vec<String>> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        let pcap = self.pcap.to_string_lossy();
        let mut args = vec!["-n", "-r", &pcap, "-d", "udp.port==8472,vxlan"];
        args.extend(read.split_whitespace());
        let out = test_support::run("tshark", &args);
        out.lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The VXLAN frames of `frames` whose outer IPv6 source is `src`, asserting that each has
/// a non-zero outer UDP checksum tshark verifies and no bad inner TCP/ICMPv6 checksum.
fn checked_frames_from(frames: &[Vec<String>], src: &str) -> usize {
    let field = |f: &[String], i: usize| f.get(i).cloned().unwrap_or_default();
    let mine: Vec<&Vec<String>> = frames
        .iter()
        .filter(|f| field(f, 0).split(',').next() == Some(src))
        .collect();
    for f in &mine {
        let sum = field(f, 1);
        let outer = sum.split(',').next().unwrap_or("");
        assert!(
            !outer
                .trim_start_matches("0x")
                .trim_start_matches('0')
                .is_empty(),
            "zero outer UDP checksum over IPv6: {f:?}"
        );
        assert_eq!(
            field(f, 2).split(',').next(),
            Some("1"),
            "outer UDP checksum: {f:?}"
        );
        for inner in [field(f, 3), field(f, 4)] {
            assert!(!inner.split(',').any(|s| s == "0"), "inner checksum: {f:?}");
        }
    }
    mine.len()
}

/// The `VtepMAC` of `BackendV6Data` in a lease file's JSON.
fn v6_vtep_mac(lease: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(lease).expect("lease JSON");
    v["BackendV6Data"]["VtepMAC"]
        .as_str()
        .expect("BackendV6Data.VtepMAC")
        .to_string()
}

/// DF pings from the pod of `from` to `dst` over IPv6: one at the overlay MTU passes, one
/// byte more (the pod's own link allows it) gets an ICMPv6 Packet Too Big naming the MTU.
fn assert_v6_mtu(from: &Node, dst: &str, mtu: u32) {
    let ping = |payload: u32| {
        from.pod.exec(&[
            "sh",
            "-c",
            &format!("ping -6 -M do -s {payload} -c 2 -W 2 {dst} 2>&1; true"),
        ])
    };
    let at = ping(mtu - 48);
    assert!(at.contains(" 0% packet loss"), "DF ping6 at the MTU: {at}");
    let over = ping(mtu - 47);
    assert!(
        over.contains("Packet too big") && over.contains(&format!("mtu={mtu}")),
        "expected an ICMPv6 Packet Too Big: {over}"
    );
}

#[test]
fn dual_stack_userspace_vxlan_with_a_kernel_peer() {
    let Some((_g, tmp)) = begin("dual_stack_userspace_vxlan_with_a_kernel_peer", "usdual") else {
        return;
    };
    // n1: the userspace data plane (this build's default); n2: the kernel's vxlan devices.
    let (_sw, nodes, px) = two_nodes_each(&tmp, DUAL_VXLAN, [&[], &["--dataplane=kernel"]]);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let env = std::fs::read_to_string(&n1.env_file).expect("env");
    assert_eq!(env_value(&env, "FLANNEL_MTU"), "1450", "{env}");

    // n1's IPv6 device is a TUN device named like flannel's, with the /128 of its subnet
    // address and MTU underlay − 70; its lease carries its own IPv6 VTEP MAC.
    let link = n1.ns.ip(&["-d", "link", "show", "flannel-v6.1"]);
    assert!(link.contains("mtu 1430") && link.contains("tun"), "{link}");
    assert_v6_vtep_address(n1, &px[0].1);
    let lease_dir = tmp.join("leases");
    let (_, lease1) = lease_file(&lease_dir, "2001:db8:18::1");
    let mac1 = v6_vtep_mac(&lease1);
    assert_ne!(
        mac1,
        v6_vtep_mac(&lease_file(&lease_dir, "2001:db8:18::2").1)
    );
    // The kernel peer programs the userspace node like any flannel node.
    let ok = wait_for(Duration::from_secs(10), || {
        n2.ns
            .ip(&["-6", "neigh", "show", "dev", "flannel-v6.1"])
            .contains(&mac1)
    });
    assert!(ok.is_some(), "{}", n2.log());
    assert_v6_peer_entries(n2, &px[0].1, &mac1, "2001:db8:18::1");

    // Full checksums on n1's wire (no tx offload), so the capture shows what was computed.
    n1.ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
    let cap = Capture::start(n1, &tmp);
    let (p1v6, p2v6) = (format!("{}2", px[0].1), format!("{}2", px[1].1));
    assert!(ping_until(n1, &p2v6), "ping6 {p2v6}: {}", n1.log());
    assert!(ping_until(n2, &p1v6), "ping6 {p1v6}: {}", n1.log());
    assert!(ping_until(n1, &format!("{}2", px[1].0)), "ping (IPv4)");
    assert_eq!(tcp_v6(n1, n2, &p2v6), format!("hello {p1v6}"));
    assert_eq!(tcp_v6(n2, n1, &p1v6), format!("hello {p2v6}"));
    assert_v6_mtu(n1, &p2v6, 1430);
    let frames = cap.stop();
    let sent = checked_frames_from(&frames, "2001:db8:18::1");
    let received = frames
        .iter()
        .filter(|f| f.first().is_some_and(|s| s.starts_with("2001:db8:18::2")))
        .count();
    assert!(
        sent >= 10 && received >= 10,
        "{sent} sent, {received} received: {frames:?}"
    );
}

#[test]
fn ipv6_only_userspace_vxlan_with_the_kube_store() {
    let Some((_g, tmp)) = begin("ipv6_only_userspace_vxlan_with_the_kube_store", "usv6") else {
        return;
    };
    let sw = Switch::new();
    let (_api, nodes) = v6_only_nodes(&tmp, &sw, "userspace");
    let (n1, n2) = (&nodes[0], &nodes[1]);
    assert!(!n1.ns.ip(&["link", "show"]).contains("flannel.1:"));
    let link = n1.ns.ip(&["-d", "link", "show", "flannel-v6.1"]);
    assert!(link.contains("tun"), "{link}");
    // Full checksums on both wires (no tx offload), so the capture shows what was computed.
    for n in &nodes {
        n.ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
    }
    let cap = Capture::start(n2, &tmp);
    assert!(ping_until(n1, "2001:db8:42:2::2"), "ping6: {}", n1.log());
    assert_eq!(tcp_v6(n2, n1, "2001:db8:42:1::2"), "hello 2001:db8:42:2::2");
    assert_eq!(tcp_v6(n1, n2, "2001:db8:42:2::2"), "hello 2001:db8:42:1::2");
    assert_v6_mtu(n2, "2001:db8:42:1::2", 1430);
    let frames = cap.stop();
    assert!(
        checked_frames_from(&frames, "2001:db8:18::2") >= 5,
        "{frames:?}"
    );
    assert!(
        checked_frames_from(&frames, "2001:db8:18::1") >= 5,
        "{frames:?}"
    );
}

/// Dual-stack vxlan with DirectRouting.
const DUAL_VXLAN_DIRECT: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#;

/// The lines of `ip [-6] route show` on node `n` that start with `want` (at most 10 s).
fn wait_route(n: &Node, family: &str, want: &str) -> String {
    let show = || n.ns.ip(&[family, "route", "show"]);
    let ok = wait_for(Duration::from_secs(10), || {
        show().lines().any(|l| l.starts_with(want))
    });
    assert!(ok.is_some(), "want `{want}`: {}\n{}", show(), n.log());
    show()
}

/// DirectRouting on one layer-2 segment, IPv6 as IPv4 (upstream's v6DirectRoute): the
/// userspace node (n1) and the kernel node (n2) route each other's subnets of both
/// families via the peer's public address of that family, with no VXLAN entries for them;
/// pods talk over both families and not one VXLAN frame crosses n1's wire.
#[test]
fn dual_stack_direct_routing_userspace_and_kernel() {
    let Some((_g, tmp)) = begin("dual_stack_direct_routing_userspace_and_kernel", "direct") else {
        return;
    };
    let (_sw, nodes, px) = two_nodes_each(&tmp, DUAL_VXLAN_DIRECT, [&[], &["--dataplane=kernel"]]);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    for (n, peer, i) in [(n1, &px[1], 2), (n2, &px[0], 1)] {
        let routes6 = wait_route(
            n,
            "-6",
            &format!("{}/64 via 2001:db8:18::{i} dev eth0", peer.1),
        );
        assert!(
            !routes6.contains(&format!("{}/64 via {} dev flannel-v6.1", peer.1, peer.1)),
            "{routes6}"
        );
        wait_route(
            n,
            "-4",
            &format!("{}0/24 via 198.18.0.{i} dev eth0", peer.0),
        );
    }
    // The kernel node has no neighbour or FDB entry for the direct peer.
    let neigh = n2.ns.ip(&["-6", "neigh", "show", "dev", "flannel-v6.1"]);
    assert!(!neigh.contains("PERMANENT"), "{neigh}");
    let fdb = n2.ns.bridge(&["fdb", "show", "dev", "flannel-v6.1"]);
    assert!(!fdb.contains(" dst "), "{fdb}");

    let cap = Capture::start_filtered(n1, &tmp, "udp port 8472 or icmp6");
    let (p1v6, p2v6) = (format!("{}2", px[0].1), format!("{}2", px[1].1));
    assert!(ping_until(n1, &p2v6), "ping6 {p2v6}: {}", n1.log());
    assert!(ping_until(n2, &p1v6), "ping6 {p1v6}: {}", n1.log());
    assert!(ping_until(n1, &format!("{}2", px[1].0)), "ping (IPv4)");
    assert_eq!(tcp_v6(n1, n2, &p2v6), format!("hello {p1v6}"));
    // On n1's wire: the pods' echo requests themselves, no VXLAN.
    let frames =
        cap.stop_and_read("-T fields -E occurrence=f -e vxlan.vni -e ipv6.src -e icmpv6.type");
    let field = |f: &[String], i: usize| f.get(i).cloned().unwrap_or_default();
    assert!(
        frames.iter().all(|f| field(f, 0).is_empty()),
        "VXLAN between on-link peers: {frames:?}"
    );
    for pod in [&p1v6, &p2v6] {
        assert!(
            frames
                .iter()
                .any(|f| field(f, 1) == *pod && field(f, 2) == "128"),
            "no direct echo request from {pod}: {frames:?}"
        );
    }
    // The kernel's own answer for n2's pod: straight out of eth0 to n2.
    let get = n1.ns.ip(&["-6", "route", "get", &p2v6]);
    assert!(get.contains("via 2001:db8:18::2 dev eth0"), "{get}");
}

/// `ping -i 0.01` from the pod of `from` to `dst` (1,000 requests), running in the
/// background until joined.
fn pings_to(from: &Node, dst: &str) -> test_support::cluster::Pending {
    use test_support::cluster::OutputAsync;
    let family = if dst.contains(':') { "-6" } else { "-4" };
    Command::new("timeout")
        .args(["40", "ip", "netns", "exec", &from.pod.name, "ping", family])
        .args(["-i", "0.01", "-c", "1000", "-W", "1", dst])
        .output_async()
}

/// The upgrade of a dual-stack userspace node under traffic: both planes (`flannel.1` and
/// `flannel-v6.1`) are handed to the new flanneld over their own handover sockets, so
/// ping and ping6 every 10 ms from the other node's pod lose nothing while the old
/// flanneld stops; the devices are the same ones afterwards.
#[test]
fn dual_stack_userspace_handover_under_pings() {
    let Some((_g, tmp)) = begin("dual_stack_userspace_handover_under_pings", "handover") else {
        return;
    };
    let (_sw, mut nodes, px) = two_nodes(&tmp, DUAL_VXLAN, &[]);
    let (p1v4, p1v6) = (format!("{}2", px[0].0), format!("{}2", px[0].1));
    assert!(ping_until(&nodes[1], &p1v6), "ping6: {}", nodes[0].log());
    assert!(ping_until(&nodes[1], &p1v4), "ping: {}", nodes[0].log());
    let ifindex = |n: &Node, dev: &str| {
        n.ns.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")])
    };
    let before = (
        ifindex(&nodes[0], "flannel.1"),
        ifindex(&nodes[0], "flannel-v6.1"),
    );

    let (v6, v4) = (pings_to(&nodes[1], &p1v6), pings_to(&nodes[1], &p1v4));
    std::thread::sleep(Duration::from_secs(1));
    let old_log = nodes[0].handover(&["flannel.1", "flannel-v6.1"]);
    let (v6, v4) = (v6.join(), v4.join());
    let new_log = nodes[0].log();
    for dev in ["flannel.1", "flannel-v6.1"] {
        assert!(
            new_log
                .lines()
                .any(|l| l.contains("taking over the data plane")
                    && l.contains(&format!("device={dev}"))),
            "{dev}: {new_log}"
        );
    }
    assert!(!new_log.contains("offers no handover"), "{new_log}");
    let runs = [("ping6", v6), ("ping", v4)].map(|(what, out)| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let run = PingRun::parse(&text, 10);
        println!(
            "{what} during the handover: {} of {} lost, longest gap {} ms",
            run.lost(),
            run.sent,
            run.longest_gap_ms
        );
        assert_eq!(run.sent, 1000, "{what} did not finish: {text}");
        (what, run)
    });
    assert_eq!(
        (
            ifindex(&nodes[0], "flannel.1"),
            ifindex(&nodes[0], "flannel-v6.1")
        ),
        before,
        "devices recreated instead of handed over"
    );
    // The successor forwards on its own, both ways.
    assert!(
        ping_until(&nodes[0], &format!("{}2", px[1].1)),
        "ping6 after: {new_log}"
    );
    assert!(ping_until(&nodes[1], &p1v6), "ping6 back after: {new_log}");
    for (what, run) in runs {
        assert_eq!(
            run.lost(),
            0,
            "{what} lost during the handover: {run:?}\nold: {old_log}"
        );
    }
}

/// NDP end to end: the kernel peer (n2, its flanneld stopped so nothing reprograms it) loses
/// the permanent neighbour entry for the userspace node's VTEP address and must resolve it:
/// its Neighbour Solicitation goes to the solicited-node multicast MAC, which an all-zeros
/// FDB entry floods to n1's underlay address; n1's core answers with a Neighbour
/// Advertisement carrying its VTEP MAC. The kernel's entry becomes a learned (not
/// permanent) one with that MAC and ping6 flows; a broken responder leaves it unresolved.
#[test]
fn kernel_peer_resolves_the_userspace_vtep_by_ndp() {
    let Some((_g, tmp)) = begin("kernel_peer_resolves_the_userspace_vtep_by_ndp", "ndp") else {
        return;
    };
    let (_sw, mut nodes, px) = two_nodes_each(&tmp, DUAL_VXLAN, [&[], &["--dataplane=kernel"]]);
    let lease_dir = tmp.join("leases");
    let mac1 = v6_vtep_mac(&lease_file(&lease_dir, "2001:db8:18::1").1);
    let vtep1 = px[0].1.clone();
    assert_v6_peer_entries(&nodes[1], &vtep1, &mac1, "2001:db8:18::1");
    // n2's flanneld stops (SIGTERM leaves the kernel state as it is).
    if let Some(mut c) = nodes[1].flanneld.take() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    let (n1, n2) = (&nodes[0], &nodes[1]);
    n2.ns
        .ip_line(&format!("-6 neigh del {vtep1} dev flannel-v6.1"));
    n2.ns.bridge_line(
        "fdb append 00:00:00:00:00:00 dev flannel-v6.1 dst 2001:db8:18::1 self permanent",
    );
    let neigh = n2
        .ns
        .ip(&["-6", "neigh", "show", &vtep1, "dev", "flannel-v6.1"]);
    assert!(!neigh.contains(&mac1), "still there: {neigh}");

    let cap = Capture::start(n1, &tmp);
    let p1v6 = format!("{}2", px[0].1);
    let pinged = ping_until(n2, &p1v6);
    let neigh = n2
        .ns
        .ip(&["-6", "neigh", "show", &vtep1, "dev", "flannel-v6.1"]);
    // On n1's wire: the kernel's solicitation for our VTEP address, our advertisement of it.
    let nd = cap.stop_and_read(
        "-Y vxlan -T fields -E occurrence=a -e ipv6.src \
         -e icmpv6.type -e icmpv6.nd.ns.target_address -e icmpv6.nd.na.target_address \
         -e icmpv6.opt.linkaddr -e icmpv6.checksum.status",
    );
    let field = |f: &[String], i: usize| f.get(i).cloned().unwrap_or_default();
    let solicited = nd.iter().any(|f| {
        field(f, 1) == "135" && field(f, 2) == vtep1 && field(f, 0).starts_with("2001:db8:18::2,")
    });
    let advertised = nd.iter().any(|f| {
        field(f, 1) == "136"
            && field(f, 3) == vtep1
            && field(f, 4) == mac1
            && field(f, 5) == "1"
            && field(f, 0) == format!("2001:db8:18::1,{vtep1}")
    });
    let context = format!(
        "neighbour: {neigh} (VTEP MAC {mac1})\nVXLAN on n1's wire: {nd:?}\n{}",
        n1.log()
    );
    assert!(solicited && advertised, "{context}");
    assert!(
        neigh.contains(&format!("lladdr {mac1} "))
            && ["REACHABLE", "STALE", "DELAY", "PROBE"]
                .iter()
                .any(|s| neigh.contains(s))
            && !neigh.contains("PERMANENT"),
        "the kernel peer's entry for {vtep1}: {context}"
    );
    assert!(pinged, "ping6 {p1v6} from the kernel peer: {context}");
}
