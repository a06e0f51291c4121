//! Anti-spoofing in the userspace data plane (issue #9, point 7 (a) and (d); (b), (c) and (e)
//! are in tests/security.rs), through the real sockets: crafted VXLAN datagrams are sent from
//! a node namespace of a netns-harness cluster at a userspace flanneld node, and what reaches
//! the target namespace is captured with tcpdump/tshark, besides the drop counters on
//! `/metrics`. Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use netns::*;
use netns_harness::cmd::{self, ProcRecord};
use netns_harness::{privileged_test_guard, Cluster, NodeKind};

use NodeKind::{KernelRef, Userspace};

/// Port `/metrics` is fetched from inside node n1 (on 127.0.0.1).
const METRICS_PORT: u16 = 9102;

/// A tcpdump in one namespace, bounded in packets and time, stopped by its PID.
struct NsCapture {
    child: Option<Child>,
    rec: ProcRecord,
    pcap: PathBuf,
}

impl NsCapture {
    /// Starts tcpdump on `iface` of namespace `ns` with `filter`; waits until it listens.
    fn start(c: &Cluster, ns: &str, iface: &str, filter: &str, name: &str) -> NsCapture {
        let pcap = c.run_dir().join(format!("{name}.pcap"));
        let log = c.run_dir().join(format!("{name}.log"));
        let pcap_s = pcap.to_string_lossy().into_owned();
        let args = [
            "timeout",
            "60",
            "tcpdump",
            "-n",
            "-i",
            iface,
            "-s",
            "0",
            "-U",
            "--immediate-mode",
            "-c",
            "1000",
            "-w",
            &pcap_s,
            filter,
        ];
        let (child, rec) = cmd::spawn_in_ns(ns, &args, &log, name).expect("spawn tcpdump");
        let cap = NsCapture {
            child: Some(child),
            rec,
            pcap,
        };
        let listening = wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on"))
        });
        assert!(
            listening.is_some(),
            "tcpdump in {ns}: {}",
            cmd::tail(&log, 5)
        );
        // Nothing is lost in the first instants after "listening on".
        std::thread::sleep(Duration::from_millis(200));
        cap
    }

    /// Stops tcpdump (SIGTERM flushes the file) and returns the pcap path.
    fn stop(mut self) -> PathBuf {
        assert!(
            cmd::stop_process(&self.rec, self.child.take()),
            "tcpdump did not stop"
        );
        self.pcap.clone()
    }
}

impl Drop for NsCapture {
    fn drop(&mut self) {
        if self.child.is_some() {
            cmd::stop_process(&self.rec, self.child.take());
        }
    }
}

/// `tshark` fields of every frame of `pcap` matching `display_filter`, one line per frame,
/// with the VXLAN port decoded as VXLAN.
fn tshark(pcap: &Path, display_filter: &str, fields: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-n".into(),
        "-r".into(),
        pcap.to_string_lossy().into_owned(),
        "-d".into(),
        "udp.port==8472,vxlan".into(),
        "-Y".into(),
        display_filter.into(),
        "-T".into(),
        "fields".into(),
    ];
    for f in fields {
        args.push("-e".into());
        args.push((*f).into());
    }
    let out = std::process::Command::new("tshark")
        .args(&args)
        .output()
        .expect("tshark");
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// n1's `/metrics` text, fetched inside n1.
fn metrics(c: &Cluster) -> String {
    let fetch = format!(
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"
    );
    sh(c, "n1", &["python3", "-c", &fetch])
}

/// The value of `flannel_vxlan_drops_total{reason="<reason>"}` (0 when absent).
fn drops(text: &str, reason: &str) -> u64 {
    let key = format!("flannel_vxlan_drops_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A cluster of two userspace nodes (n1 with `/metrics` on [`METRICS_PORT`]) and a
/// kernel-ref node n3, whose pods are the honest third party, with the matrix passing.
fn cluster() -> Cluster {
    let mut s = spec(&[Userspace, Userspace, KernelRef], 1);
    s.nodes[0].extra_args = vec![format!("--metrics-port={METRICS_PORT}")];
    let c = Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");
    c
}

/// Python run in a node namespace: sends VXLAN frames (VNI 1) to `argv[1]`:8472, the inner
/// Ethernet destination `argv[2]`. Each later argument is `src>dst:count`: that many inner
/// IPv4/UDP datagrams (to port 31337, valid header checksum) from `src` to `dst`.
const SEND_IP: &str = r#"
import socket, struct, sys, time
dst, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s & 0xffff) + (s >> 16); s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def frame(src, to, n):
    payload = b"spoof-test-%04d" % n
    udp = struct.pack("!HHHH", 40000, 31337, 8 + len(payload), 0) + payload
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n, 0, 64, 17, 0,
                    socket.inet_aton(src), socket.inet_aton(to))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return struct.pack("!B3xI", 0x08, 1 << 8) + mac + b"\x02\0\0\0\0\x01" + b"\x08\x00" + h + udp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for spec in sys.argv[3:]:
    pair, count = spec.split(":")
    src, to = pair.split(">")
    for i in range(int(count)):
        s.sendto(frame(src, to, i), (dst, 8472))
        time.sleep(0.01)
"#;

#[test]
fn inner_source_of_another_node_is_dropped_and_counted() {
    if !privileged_test_guard("inner_source_of_another_node_is_dropped_and_counted") {
        return;
    }
    let _g = serial();
    let c = cluster();
    let mac = published_mac(&c, "n1");
    let n1_ip = c.node_ip("n1").expect("ip").to_string();
    let (n1p1, n2p1, n3p1) = (
        c.pod_ip("n1p1").expect("ip").to_string(),
        c.pod_ip("n2p1").expect("ip").to_string(),
        c.pod_ip("n3p1").expect("ip").to_string(),
    );
    let target_ns = c.pod("n1p1").expect("pod").ns.clone();
    let cap = NsCapture::start(&c, &target_ns, "eth0", "udp port 31337", "sec-a-n1p1");
    let before = metrics(&c);

    // From n2, a known peer, with n2's public IP as outer source: 10 datagrams whose inner
    // source is n3's pod (forged), 5 from n2's own pod to another node's pod (not ours to
    // relay), and 3 honest ones from n2's pod (the control: the capture must see them).
    let (ok, out) = run(
        &c,
        "n2",
        &[
            "python3",
            "-c",
            SEND_IP,
            &n1_ip,
            &mac,
            &format!("{n3p1}>{n1p1}:10"),
            &format!("{n2p1}>{n3p1}:5"),
            &format!("{n2p1}>{n1p1}:3"),
        ],
    );
    assert!(ok, "{out}");

    let mut text = String::new();
    let counted = wait_for(Duration::from_secs(5), || {
        text = metrics(&c);
        drops(&text, "inner_source_mismatch") >= drops(&before, "inner_source_mismatch") + 10
            && drops(&text, "inner_destination_foreign")
                >= drops(&before, "inner_destination_foreign") + 5
    });
    assert!(counted.is_some(), "{text}");
    let delta = |r: &str| drops(&text, r) - drops(&before, r);
    assert_eq!(delta("inner_source_mismatch"), 10, "{before}\n{text}");
    assert_eq!(delta("inner_destination_foreign"), 5, "{before}\n{text}");

    // Let the honest control datagrams arrive, then look at what reached n1p1.
    std::thread::sleep(Duration::from_millis(500));
    let pcap = cap.stop();
    let seen = tshark(&pcap, "udp.dstport == 31337", &["ip.src", "ip.dst"]);
    let from = |src: &str| {
        seen.iter()
            .filter(|l| l.starts_with(&format!("{src}\t")))
            .count()
    };
    assert_eq!(from(&n3p1), 0, "forged datagrams reached n1p1: {seen:?}");
    assert_eq!(from(&n2p1), 3, "honest control datagrams: {seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");

    // The honest nodes are untouched.
    let m = c.check();
    assert!(m.all_pass(), "{m}");
    teardown(c);
}

/// Python run in a node namespace: sends to `argv[1]`:8472 (inner Ethernet destination
/// broadcast) ARP requests for `argv[2]` from sender IP `argv[3]` with sender MAC `argv[4]`:
/// first `argv[5]` rounds of [a 100-byte IPv4-EtherType datagram whose bytes from offset 22
/// are a complete ARP request (it fills the receive slot with the missing tail), then the
/// same request cut after 20 of its 28 bytes], then `argv[6]` complete requests.
const SEND_ARP: &str = r#"
import socket, struct, sys, time
dst, target, sender, smac = sys.argv[1], socket.inet_aton(sys.argv[2]), socket.inet_aton(sys.argv[3]), bytes.fromhex(sys.argv[4].replace(":", ""))
rounds, complete = int(sys.argv[5]), int(sys.argv[6])
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, smac, sender, b"\0" * 6, target)
def vxlan(ethertype, body):
    return struct.pack("!B3xI", 0x08, 1 << 8) + b"\xff" * 6 + smac + struct.pack("!H", ethertype) + body
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(rounds):
    s.sendto(vxlan(0x0800, arp + b"\xee" * 50), (dst, 8472))
    time.sleep(0.02)
    s.sendto(vxlan(0x0806, arp[:20]), (dst, 8472))
    time.sleep(0.02)
for _ in range(complete):
    s.sendto(vxlan(0x0806, arp), (dst, 8472))
    time.sleep(0.02)
"#;

#[test]
fn truncated_arp_request_is_dropped_counted_and_unanswered() {
    if !privileged_test_guard("truncated_arp_request_is_dropped_counted_and_unanswered") {
        return;
    }
    let _g = serial();
    let c = cluster();
    let n1_ip = c.node_ip("n1").expect("ip").to_string();
    let n1_vtep = c.node("n1").expect("n1").subnet.expect("subnet").network();
    let n2_vtep = c.node("n2").expect("n2").subnet.expect("subnet").network();
    let n2_ns = c.node("n2").expect("n2").ns.clone();
    // Replies from n1's VXLAN port arrive at n2's underlay interface.
    let filter = format!("udp and src host {n1_ip} and src port 8472");
    let cap = NsCapture::start(&c, &n2_ns, "eth0", &filter, "sec-d-n2");
    let before = metrics(&c);
    let smac = "02:5e:c0:00:00:d1";
    let args = |rounds: &str, complete: &str| {
        vec![
            "python3".to_string(),
            "-c".into(),
            SEND_ARP.into(),
            n1_ip.clone(),
            n1_vtep.to_string(),
            n2_vtep.to_string(),
            smac.into(),
            rounds.into(),
            complete.into(),
        ]
    };
    let a = args("8", "0");
    let (ok, out) = run(&c, "n2", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    let mut text = String::new();
    let counted = wait_for(Duration::from_secs(5), || {
        text = metrics(&c);
        drops(&text, "truncated") >= drops(&before, "truncated") + 8
    });
    assert!(counted.is_some(), "{before}\n{text}");
    // Give a (wrong) reply time to arrive before the control requests are sent.
    std::thread::sleep(Duration::from_millis(500));
    let mid = metrics(&c);
    assert_eq!(drops(&mid, "truncated") - drops(&before, "truncated"), 8);

    // Control: two complete requests are answered (the capture would see replies).
    let a = args("0", "2");
    let (ok, out) = run(&c, "n2", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let pcap = cap.stop();
    let replies = tshark(
        &pcap,
        "arp.opcode == 2",
        &["arp.src.proto_ipv4", "arp.dst.hw_mac", "arp.dst.proto_ipv4"],
    );
    assert_eq!(
        replies.len(),
        2,
        "expected only the two control replies: {replies:?}"
    );
    for r in &replies {
        let f: Vec<&str> = r.split('\t').collect();
        assert_eq!(f[0], n1_vtep.to_string(), "{r}");
        assert_eq!(f[1], smac, "{r}");
        assert_eq!(f[2], n2_vtep.to_string(), "{r}");
    }

    let m = c.check();
    assert!(m.all_pass(), "{m}");
    teardown(c);
}
