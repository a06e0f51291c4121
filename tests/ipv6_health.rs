//! IPv6 peer health and `flanneld doctor`'s IPv6 checks (issue #12) on a dual-stack pair of
//! vxlan nodes, once per data plane (kernel, userspace): two node namespaces joined by one veth pair (underlay
//! 198.18.0.0/24 and 2001:db8:18::/64), a `--lease-dir` store, `--ip-masq`. Checked: the
//! daemon's prober reports the peer's IPv6 VTEP as reachable on `/metrics` next to its
//! IPv4 one; doctor PASSes every IPv6 check, FAILs `forward-reject-v6` for an ip6tables
//! REJECT ahead of flannel's accepts and `ip6-forward` for IPv6 forwarding off (naming each
//! and its fix, the IPv4 twins still PASS), and PASSes again once repaired; a peer that
//! stops answering ICMPv6 is exported unreachable (its IPv4 VTEP still reachable) and named
//! by doctor's `peer-reachable`, until it answers again. With `--host-gw-fallback`, a peer
//! whose IPv6 VXLAN is dropped is routed directly via its PublicIPv6 (IPv4 stays on VXLAN)
//! and returns to VXLAN once the drop is lifted. In nftables mode (`EnableNFTables`) doctor
//! reads the `ip6` tables: an `ip6` forward chain of another table dropping the IPv6 pod
//! network FAILs `forward-reject-v6` until it is deleted.
//! Privileged: run as root (CI=true makes it mandatory).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use test_support::cluster::{flanneld, serial};
use test_support::netns::Netns;
use test_support::{privileged, wait_for, TempDir};

const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_NFT: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:42::/56","Backend":{"Type":"vxlan"}}"#;
const METRICS_PORT: &str = "9464";

/// A node namespace running flanneld (stopped by its PID on drop, before the namespace goes).
struct Node {
    child: Option<Child>,
    ns: Netns,
    args: Vec<String>,
    env_file: PathBuf,
    log_file: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// `KEY=value` of subnet.env, once flanneld wrote it (at most 20 s).
    fn env(&mut self, key: &str) -> String {
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("flanneld exited with {st}: {}", self.log());
            }
            self.env_file.exists()
        });
        assert!(ok.is_some(), "no subnet.env: {}", self.log());
        let text = std::fs::read_to_string(&self.env_file).expect("subnet.env");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing in {text}"))
            .to_owned()
    }

    /// `flanneld doctor` with the daemon's flags: (exit code, report).
    fn doctor(&self) -> (i32, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(flanneld())
            .arg("doctor")
            .args(&self.args)
            .output()
            .expect("run doctor");
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        println!(
            "--- doctor in {}: {}\n{report}{}",
            self.ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), report)
    }

    /// The node's IPv6 VTEP address (its subnet's network address) and prefix length:
    /// `2001:db8:42:7::1/64` in subnet.env → (`2001:db8:42:7::`, `64`).
    fn v6_vtep(&mut self) -> (String, String) {
        let subnet = self.env("FLANNEL_IPV6_SUBNET");
        let (host, len) = subnet.split_once('/').expect("prefix");
        let vtep = host.strip_suffix('1').expect("first host");
        (vtep.to_owned(), len.to_owned())
    }

    fn metrics(&self) -> String {
        let fetch = format!(
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=2).read().decode())"
        );
        self.ns.exec(&["python3", "-c", &fetch])
    }
}

/// Two nodes on one veth pair with network `config` (dual-stack, or IPv6-only when it
/// disables IPv4), flanneld (`--dataplane=<dataplane>`, and `extra` arguments) started on both.
fn two_nodes(tmp: &Path, dataplane: &str, config: &str, extra: &[&str]) -> Vec<Node> {
    let leases = tmp.join("leases");
    std::fs::create_dir_all(&leases).expect("lease dir");
    let v4 = !config.contains(r#""EnableIPv4":false"#);
    std::fs::write(leases.join("config"), config).expect("config");
    let ns: Vec<Netns> = (1..=2).map(|i| Netns::new(&format!("h6n{i}"))).collect();
    ns[0].ip_line(&format!(
        "link add eth0 type veth peer name eth0 netns {}",
        ns[1].name
    ));
    ns.into_iter()
        .zip(1u8..)
        .map(|(ns, i)| {
            ns.exec(&[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]);
            ns.ip_line(&format!("addr add 2001:db8:18::{i}/64 dev eth0 nodad"));
            ns.ip_line("link set eth0 up");
            // flanneld picks its interface from the default routes.
            ns.ip_line("-6 route add default via 2001:db8:18::fe dev eth0");
            if v4 {
                ns.ip_line(&format!("addr add 198.18.0.{i}/24 dev eth0"));
                ns.ip_line("route add default via 198.18.0.254 dev eth0");
            }
            let env_file = tmp.join(format!("subnet-{i}.env"));
            let args = vec![
                format!("--lease-dir={}", leases.display()),
                format!("--subnet-file={}", env_file.display()),
                format!("--dataplane={dataplane}"),
                "--ip-masq".to_owned(),
            ];
            let log_file = tmp.join(format!("flanneld-{i}.log"));
            let child = Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .arg(flanneld())
                .args(&args)
                .args([
                    "--iptables-resync=1",
                    "--peer-probe-interval=1",
                    &format!("--metrics-port={METRICS_PORT}"),
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_file).expect("log"))
                .spawn()
                .expect("start flanneld");
            Node {
                child: Some(child),
                ns,
                args,
                env_file,
                log_file,
            }
        })
        .collect()
}

/// The line of check `id` whose message contains `about`, if any.
fn line<'a>(report: &'a str, id: &str, about: &str) -> Option<&'a str> {
    report.lines().find(|l| {
        l.split_once(' ')
            .is_some_and(|(_, rest)| rest.starts_with(&format!("{id}: ")))
            && l.contains(about)
    })
}

/// The ids of the FAIL lines.
fn failed(report: &str) -> BTreeSet<String> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL ")?.split_once(':'))
        .map(|(id, _)| id.to_owned())
        .collect()
}

fn assert_status(report: &str, status: &str, id: &str, about: &str) {
    let l = line(report, id, about).unwrap_or_else(|| panic!("no {id} line on {about}:\n{report}"));
    assert!(l.starts_with(&format!("{status} ")), "{l}\n{report}");
}

/// The IPv6 checks that must PASS on a healthy node (`v6_vtep`: the peer's v6 VTEP;
/// `device`: how doctor describes flannel-v6.1).
fn assert_v6_pass(report: &str, v6_vtep: &str, device: &str) {
    assert_status(
        report,
        "PASS",
        "ip6-forward",
        "net.ipv6.conf.all.forwarding = 1",
    );
    assert_status(report, "PASS", "forward-reject-v6", "2001:db8:42::/56");
    assert_status(
        report,
        "PASS",
        "vxlan-device-v6",
        &format!("flannel-v6.1 is up ({device}, VNI 1)"),
    );
    assert_status(report, "PASS", "masquerade-v6", "2001:db8:42::/56");
    assert_status(report, "PASS", "vxlan-guard-v6", "2001:db8:42::/56");
    assert_status(
        report,
        "PASS",
        "peer-reachable",
        &format!("answers ICMP echo to {v6_vtep}"),
    );
    assert_status(
        report,
        "PASS",
        "subnet-lease-v6",
        "subnet.env and the store agree",
    );
}

#[test]
fn kernel_v6_peer_health_and_doctor_v6_checks() {
    if privileged("kernel_v6_peer_health_and_doctor_v6_checks") {
        v6_health("kernel", "kernel vxlan", true);
    }
}

#[test]
fn ipv6_only_v6_peer_health_and_doctor_v6_checks() {
    if privileged("ipv6_only_v6_peer_health_and_doctor_v6_checks") {
        v6_health("kernel", "kernel vxlan", false);
    }
}

#[test]
fn userspace_v6_peer_health_and_doctor_v6_checks() {
    if privileged("userspace_v6_peer_health_and_doctor_v6_checks") {
        v6_health("userspace", "userspace TUN", true);
    }
}

/// The whole scenario on `dataplane` (`device`: how doctor describes flannel-v6.1),
/// dual-stack (`v4`) or IPv6-only.
fn v6_health(dataplane: &str, device: &str, v4: bool) {
    let _serial = serial();
    let tmp = TempDir::new("ipv6-health");
    let mut nodes = two_nodes(&tmp.0, dataplane, if v4 { DUAL } else { V6_ONLY }, &[]);
    let (v6_vtep, len) = nodes[1].v6_vtep();
    nodes[0].env("FLANNEL_IPV6_SUBNET");
    let v6_series = format!(
        "flannel_peer_reachable{{subnet=\"{v6_vtep}/{len}\",public_ip=\"2001:db8:18::2\"}} 1"
    );
    // IPv6-only: no IPv4 peer, so no IPv4 series (the line below never occurs).
    let v4_series = match v4 {
        true => {
            let v4_net = nodes[1].env("FLANNEL_SUBNET").replacen(".1/", ".0/", 1);
            format!("flannel_peer_reachable{{subnet=\"{v4_net}\",public_ip=\"198.18.0.2\"}} 1")
        }
        false => "flannel_peer_reachable{".to_owned(),
    };
    let v4_ok = |text: &str| {
        let seen = text.contains(&v4_series);
        if v4 {
            seen
        } else {
            text.lines().filter(|l| l.starts_with(&v4_series)).count() == 1
        }
    };

    // The prober answers for both families of the peer: one series each.
    let mut text = String::new();
    let seen = wait_for(Duration::from_secs(15), || {
        text = nodes[0].metrics();
        text.contains(&v6_series) && v4_ok(&text)
    });
    assert!(
        seen.is_some(),
        "want {v6_series} and {v4_series} in:\n{text}\nlog:\n{}",
        nodes[0].log()
    );

    let (_, healthy) = nodes[0].doctor();
    assert_v6_pass(&healthy, &v6_vtep, device);
    if v4 {
        assert_status(&healthy, "PASS", "forward-reject", "10.244.0.0/16");
    } else {
        assert_status(&healthy, "SKIP", "ip-forward", "EnableIPv4 is false");
        assert!(line(&healthy, "subnet-lease", "").is_none(), "{healthy}");
    }
    // These namespaces have no CNI plugins or config; nothing else may fail.
    let baseline = failed(&healthy);
    assert!(
        baseline.iter().all(|id| id.starts_with("cni-")),
        "{healthy}"
    );
    let with = |id: &str| {
        let mut f = baseline.clone();
        f.insert(id.to_owned());
        f
    };

    // An ip6tables REJECT ahead of flannel's accepts: named with its fix, IPv4 unaffected.
    let n1 = &nodes[0].ns;
    n1.exec_line("ip6tables -I FORWARD 1 -j REJECT --reject-with icmp6-adm-prohibited");
    let (code, broken) = nodes[0].doctor();
    assert_eq!(code, 1, "{broken}");
    let want = "FAIL forward-reject-v6: \"-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited\" rejects pod traffic in 2001:db8:42::/56 before flannel's ACCEPT rules\n  fix: ip6tables -D FORWARD -j REJECT --reject-with icmp6-adm-prohibited,";
    assert!(broken.contains(want), "{broken}");
    assert_eq!(failed(&broken), with("forward-reject-v6"), "{broken}");
    n1.exec(&["ip6tables", "-D", "FORWARD", "1"]);

    // IPv6 forwarding off.
    n1.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"]);
    let (code, broken) = nodes[0].doctor();
    assert_eq!(code, 1, "{broken}");
    assert!(
        broken.contains("FAIL ip6-forward: net.ipv6.conf.all.forwarding = 0: this node does not forward pod traffic\n  fix: sysctl -w net.ipv6.conf.all.forwarding=1,"),
        "{broken}"
    );
    assert_eq!(failed(&broken), with("ip6-forward"), "{broken}");
    n1.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

    let (_, repaired) = nodes[0].doctor();
    assert_v6_pass(&repaired, &v6_vtep, device);
    assert_eq!(failed(&repaired), baseline, "{repaired}");

    // The peer stops answering ICMPv6 echo: the prober marks its v6 VTEP unreachable (its
    // v4 one stays reachable), doctor names it, and both recover once it answers again.
    let block = [
        "INPUT",
        "-p",
        "ipv6-icmp",
        "--icmpv6-type",
        "echo-request",
        "-j",
        "DROP",
    ];
    let n2 = &nodes[1].ns;
    n2.exec(&[&["ip6tables", "-I"][..], &block[..]].concat());
    let v6_down = v6_series.replace("} 1", "} 0");
    let down = wait_for(Duration::from_secs(10), || {
        text = nodes[0].metrics();
        text.contains(&v6_down) && v4_ok(&text)
    });
    assert!(down.is_some(), "want {v6_down} and {v4_series} in:\n{text}");
    let (code, broken) = nodes[0].doctor();
    assert_eq!(code, 1, "{broken}");
    assert_eq!(failed(&broken), with("peer-reachable"), "{broken}");
    let want = format!("FAIL peer-reachable: peer {v6_vtep}/{len} at 2001:db8:18::2 (UDP 8472) does not answer ICMP echo to {v6_vtep} over the overlay\n");
    assert!(broken.contains(&want), "{broken}");
    assert!(
        broken.contains("fix: if that node is behind NAT: start flanneld on that node with --public-ipv6 set to an address this node can reach"),
        "{broken}"
    );
    n2.exec(&[&["ip6tables", "-D"][..], &block[..]].concat());
    let up = wait_for(Duration::from_secs(10), || {
        text = nodes[0].metrics();
        text.contains(&v6_series)
    });
    assert!(up.is_some(), "want {v6_series} again in:\n{text}");
}

#[test]
fn kernel_v6_host_gw_fallback() {
    if privileged("kernel_v6_host_gw_fallback") {
        v6_fallback("kernel");
    }
}

#[test]
fn userspace_v6_host_gw_fallback() {
    if privileged("userspace_v6_host_gw_fallback") {
        v6_fallback("userspace");
    }
}

/// `--host-gw-fallback` on IPv6: node 2 drops VXLAN over IPv6 (its IPv4 VXLAN still
/// arrives); node 1's prober sees the IPv6 VTEP stop answering while 2001:db8:18::2 is
/// on-link and routes the IPv6 subnet directly, then back over VXLAN once lifted.
fn v6_fallback(dataplane: &str) {
    let _serial = serial();
    let tmp = TempDir::new("ipv6-fallback");
    let extra = ["--host-gw-fallback", "--host-gw-fallback-damping=0"];
    let mut nodes = two_nodes(&tmp.0, dataplane, DUAL, &extra);
    let (vtep, len) = nodes[1].v6_vtep();
    let v4_net = nodes[1].env("FLANNEL_SUBNET").replacen(".1/", ".0/", 1);
    nodes[0].env("FLANNEL_IPV6_SUBNET");
    let v6_net = format!("{vtep}/{len}");
    let path = |net: &str, ip: &str, path: &str| {
        format!("flannel_peer_path{{subnet=\"{net}\",public_ip=\"{ip}\",path=\"{path}\"}} 1")
    };
    let v4_vxlan = path(&v4_net, "198.18.0.2", "vxlan");
    let v6_vxlan = path(&v6_net, "2001:db8:18::2", "vxlan");
    let v6_direct = path(&v6_net, "2001:db8:18::2", "direct");
    let direct_route = format!("{v6_net} via 2001:db8:18::2 dev eth0");
    let n1 = &nodes[0];
    let mut text = String::new();
    let on_vxlan = |text: &mut String| {
        *text = n1.metrics();
        text.contains(&v6_vxlan) && text.contains(&v4_vxlan)
    };
    let ok = wait_for(Duration::from_secs(15), || on_vxlan(&mut text));
    assert!(
        ok.is_some(),
        "want {v6_vxlan} and {v4_vxlan} in:\n{text}\nlog:\n{}",
        n1.log()
    );

    let drop = ["INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"];
    let n2 = &nodes[1].ns;
    n2.exec(&[&["ip6tables", "-I"][..], &drop[..]].concat());
    let mut routes = String::new();
    let fell_back = wait_for(Duration::from_secs(15), || {
        text = n1.metrics();
        routes = n1.ns.ip(&["-6", "route", "show"]);
        text.contains(&v6_direct) && text.contains(&v4_vxlan) && routes.contains(&direct_route)
    });
    assert!(
        fell_back.is_some(),
        "want {v6_direct}, {v4_vxlan} and route {direct_route}:\n{text}\n{routes}\nlog:\n{}",
        n1.log()
    );

    n2.exec(&[&["ip6tables", "-D"][..], &drop[..]].concat());
    let back = wait_for(Duration::from_secs(15), || {
        routes = n1.ns.ip(&["-6", "route", "show"]);
        on_vxlan(&mut text) && !routes.contains(&direct_route)
    });
    assert!(
        back.is_some(),
        "want {v6_vxlan} and no {direct_route}:\n{text}\n{routes}\nlog:\n{}",
        n1.log()
    );
    // Every switch was programmed at the first attempt (the VTEP's /128 included).
    let log = n1.log();
    assert!(!log.contains("programming peers failed"), "{log}");
}

/// nftables mode, dual-stack kernel pair: doctor's IPv6 checks read flannel's `ip6` tables
/// and PASS; a host firewall's `ip6` forward chain dropping the IPv6 pod network FAILs
/// `forward-reject-v6` (IPv4 unaffected) with an `ip6` accept as fix, and PASSes once gone.
#[test]
fn nftables_v6_doctor_checks() {
    if !privileged("nftables_v6_doctor_checks") {
        return;
    }
    let _serial = serial();
    let tmp = TempDir::new("ipv6-health-nft");
    let mut nodes = two_nodes(&tmp.0, "kernel", DUAL_NFT, &[]);
    let (v6_vtep, len) = nodes[1].v6_vtep();
    nodes[0].env("FLANNEL_IPV6_SUBNET");
    let series = format!(
        "flannel_peer_reachable{{subnet=\"{v6_vtep}/{len}\",public_ip=\"2001:db8:18::2\"}} 1"
    );
    let mut text = String::new();
    let seen = wait_for(Duration::from_secs(15), || {
        text = nodes[0].metrics();
        text.contains(&series)
    });
    assert!(seen.is_some(), "want {series} in:\n{text}");

    let (_, healthy) = nodes[0].doctor();
    assert_v6_pass(&healthy, &v6_vtep, "kernel vxlan");
    assert_status(
        &healthy,
        "PASS",
        "masquerade-v6",
        "nftables chain ip6 flannel-ipv6 postrtg",
    );
    let baseline = failed(&healthy);
    assert!(
        baseline.iter().all(|id| id.starts_with("cni-")),
        "{healthy}"
    );

    let n1 = &nodes[0].ns;
    n1.exec(&["nft", "add", "table", "ip6", "hostfw"]);
    n1.exec(&[
        "nft",
        "add",
        "chain",
        "ip6",
        "hostfw",
        "blocklist",
        "{ type filter hook forward priority 0; policy accept; }",
    ]);
    n1.exec(&[
        "nft",
        "add",
        "rule",
        "ip6",
        "hostfw",
        "blocklist",
        "ip6",
        "daddr",
        "2001:db8:42::/56",
        "drop",
    ]);
    let (code, broken) = nodes[0].doctor();
    assert_eq!(code, 1, "{broken}");
    let mut want = baseline.clone();
    want.insert("forward-reject-v6".to_owned());
    assert_eq!(failed(&broken), want, "{broken}");
    assert_status(
        &broken,
        "FAIL",
        "forward-reject-v6",
        "nftables chain ip6 hostfw blocklist: \"ip6 daddr 2001:db8:42::/56 drop\" drops pod traffic in 2001:db8:42::/56",
    );
    assert!(
        broken.contains("nft insert rule ip6 hostfw blocklist ip6 daddr 2001:db8:42::/56 accept"),
        "{broken}"
    );
    n1.exec(&["nft", "delete", "table", "ip6", "hostfw"]);
    let (_, repaired) = nodes[0].doctor();
    assert_eq!(failed(&repaired), baseline, "{repaired}");
    assert_status(&repaired, "PASS", "forward-reject-v6", "2001:db8:42::/56");
}
