//! Harness clusters for the privileged cluster tests: they drive the netns-harness (which
//! launches our `flanneld` as a black box) and run one cluster at a time per test binary.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use netns_harness::{Cluster, ClusterSpec, NodeKind};

static SERIAL: Mutex<()> = Mutex::new(());

/// Cluster tests of one binary run one at a time: 2 cores, and timing assertions.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Our daemon, next to the test binary.
pub fn flanneld() -> PathBuf {
    sibling("flanneld")
}

/// The harness binary.
pub fn harness_bin() -> PathBuf {
    sibling("netns-harness")
}

/// A workspace binary next to the test binary (`target/<profile>/`), built by
/// `cargo build --workspace --bins` (scripts/test does that first).
pub fn sibling(name: &str) -> PathBuf {
    netns_harness::cluster::sibling_binary(name).unwrap_or_else(|| {
        panic!("{name} missing: run `cargo build --workspace --bins` first (scripts/test does)")
    })
}

/// A spec of kernel-ref nodes only (no flanneld).
pub fn kernel_refs(n: usize, pods: usize) -> ClusterSpec {
    spec(&vec![NodeKind::KernelRef; n], pods)
}

/// A prefix for tests that must know it before `Cluster::up` returns.
pub fn test_prefix() -> String {
    let b: [u8; 3] = netns_harness::net::random_bytes().expect("random bytes");
    format!("frt{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// Two kernel-mode nodes on the host-gw backend, up and passing the harness checks.
pub fn host_gw_pair() -> Cluster {
    let mut s = spec(&[NodeKind::Kernel, NodeKind::Kernel], 1);
    s.net_conf = Some(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#.into());
    let c = Cluster::up(&s).expect("host-gw cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    c
}

/// A spec for these node kinds with our binaries.
pub fn spec(kinds: &[NodeKind], pods: usize) -> ClusterSpec {
    let mut s = ClusterSpec::new(kinds, pods);
    s.flanneld = Some(flanneld());
    s.harness_bin = Some(harness_bin());
    s.flanneld_args = vec!["-v=1".into()];
    s
}

/// Output of a command in a namespace of the cluster (stdout + stderr), whatever its status.
pub fn run(c: &Cluster, ns: &str, args: &[&str]) -> (bool, String) {
    let out = c.exec(ns, args).expect("exec");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Stdout of a command that must succeed.
pub fn sh(c: &Cluster, ns: &str, args: &[&str]) -> String {
    let out = c.exec_ok(ns, args).expect("exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One ping with a 1 s timeout.
pub fn ping_ok(c: &Cluster, from: &str, to: &str) -> bool {
    run(c, from, &["ping", "-c", "1", "-W", "1", to]).0
}

pub use crate::wait_for;

/// The run's namespaces still present.
pub fn leftover(prefix: &str) -> Vec<String> {
    netns_harness::cluster::run_namespaces(prefix).expect("ip netns list")
}

/// Tears the cluster down and asserts nothing of it is left.
pub fn teardown(mut c: Cluster) {
    let prefix = c.prefix().to_string();
    c.teardown().expect("teardown");
    drop(c);
    assert!(
        leftover(&prefix).is_empty(),
        "namespaces left: {:?}",
        leftover(&prefix)
    );
}

/// Python run inside a namespace: sends `mb` MiB of deterministic bytes over TCP to
/// `dst:port` and prints the SHA-256 of what it sent.
pub const TCP_SEND: &str = r#"
import hashlib, socket, sys
dst, port, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = hashlib.sha256(b"flannel-rs").digest() * 2048
h = hashlib.sha256()
s = socket.create_connection((dst, port), timeout=30)
for i in range(mb * 16):
    chunk = bytes([i % 251]) + block[1:]
    h.update(chunk)
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(h.hexdigest())
"#;

/// Python run inside a namespace: accepts one TCP connection on `port`, prints the SHA-256
/// and size of everything received. Bounded by a 120 s timeout.
pub const TCP_RECV: &str = r#"
import hashlib, socket, sys
port = int(sys.argv[1])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", port)); l.listen(1); l.settimeout(120)
c, _ = l.accept(); c.settimeout(120)
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
c.close()
print(h.hexdigest(), n)
"#;

/// Sends `mb` MiB from pod `from` to pod `to` over TCP; returns (sent digest, received digest,
/// received bytes).
pub fn transfer(
    c: &Cluster,
    from: &str,
    to: &str,
    mb: usize,
    port: u16,
) -> (String, String, usize) {
    let to_ns = c.pod(to).expect("pod").ns.clone();
    let from_ns = c.pod(from).expect("pod").ns.clone();
    let dst = c.pod_ip(to).expect("pod ip").to_string();
    let recv = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &to_ns,
            "python3",
            "-c",
            TCP_RECV,
            &port.to_string(),
        ])
        .output_async();
    std::thread::sleep(Duration::from_millis(300));
    let sent = std::process::Command::new("timeout")
        .args([
            "120", "ip", "netns", "exec", &from_ns, "python3", "-c", TCP_SEND, &dst,
        ])
        .args([port.to_string(), mb.to_string()])
        .output()
        .expect("sender");
    assert!(
        sent.status.success(),
        "sender: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let got = recv.join();
    let got_text = String::from_utf8_lossy(&got.stdout).into_owned();
    let mut parts = got_text.split_whitespace();
    let digest = parts.next().unwrap_or_default().to_string();
    let bytes = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (
        String::from_utf8_lossy(&sent.stdout).trim().to_string(),
        digest,
        bytes,
    )
}

/// A child process whose output is collected on a thread.
#[derive(Debug)]
pub struct Pending(std::thread::JoinHandle<std::process::Output>);

impl Pending {
    pub fn join(self) -> std::process::Output {
        self.0.join().expect("collector thread")
    }
}

pub trait OutputAsync {
    fn output_async(&mut self) -> Pending;
}

impl OutputAsync for std::process::Command {
    fn output_async(&mut self) -> Pending {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        Pending(std::thread::spawn(move || {
            child.wait_with_output().expect("wait")
        }))
    }
}

/// The VTEP MAC `node` published in its lease file (directory store).
pub fn published_mac(c: &Cluster, node: &str) -> String {
    let subnet = c.node(node).expect("node").subnet.expect("subnet");
    let (leases, _) = c.lease_dir().read_all().expect("leases");
    leases
        .iter()
        .find(|l| l.subnet == subnet)
        .and_then(|l| l.vxlan())
        .expect("vxlan lease")
        .vtep_mac
}
