//! How the harness launches flanneld, checked with stand-in scripts (our flanneld is built
//! elsewhere): missing/bad binaries, a daemon that dies, and the exact command line.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind, NodeSpec};

/// A directory of stand-in scripts, removed when the test ends.
struct Scripts(PathBuf);

impl Scripts {
    fn new(test: &str) -> Scripts {
        let dir = std::env::temp_dir().join(format!("nh-fake-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scripts(dir)
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stand-in flanneld: records its argv next to the subnet file, publishes a vxlan lease for
/// 10.244.77.0/24 with a per-process VTEP MAC, writes subnet.env atomically, then idles
/// (bounded) until stopped by PID.
const FAKE: &str = r#"#!/bin/sh
ALL="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --subnet-file) SF="$2"; shift ;;
    --lease-dir) LD="$2"; shift ;;
  esac
  shift
done
echo "$ALL" > "$SF.args"
MAC=$(printf '0e:00:00:00:%02x:%02x' $(( $$ / 256 % 256 )) $(( $$ % 256 )))
echo "$MAC" > "$SF.mac"
printf '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"%s"}}' "$MAC" > "$LD/subnets/.tmp"
mv "$LD/subnets/.tmp" "$LD/subnets/10.244.77.0-24"
printf 'FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.77.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n' > "$SF.tmp"
mv "$SF.tmp" "$SF"
echo "fake flanneld up"
exec sleep 120
"#;

#[test]
fn missing_or_bad_flanneld_is_a_clear_error() {
    if !privileged_test_guard("missing_or_bad_flanneld_is_a_clear_error") {
        return;
    }
    let _g = serial();
    let scripts = Scripts::new("bad");
    for (path, expect) in [
        (PathBuf::from("/nonexistent/flanneld"), "No such file"),
        (std::env::temp_dir(), "not a regular file"),
        (scripts.script("not-exec", "#!/bin/sh\n"), "not executable"),
    ] {
        if expect == "not executable" {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let prefix = test_prefix();
        let mut spec = spec(&[NodeKind::Userspace, NodeKind::KernelRef], 1);
        spec.flanneld = Some(path.clone());
        spec.prefix = Some(prefix.clone());
        let err = Cluster::up(&spec).expect_err("must fail");
        let msg = format!("{err:#}");
        println!("{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(expect), "{msg}");
        assert!(msg.contains("--flanneld"), "{msg}");
        assert!(leftover_namespaces(&prefix).is_empty());
        assert!(!spec.base_dir.join(&prefix).exists());
    }
}

#[test]
fn flanneld_that_dies_reports_its_log_and_cleans_up() {
    if !privileged_test_guard("flanneld_that_dies_reports_its_log_and_cleans_up") {
        return;
    }
    let _g = serial();
    let scripts = Scripts::new("dying");
    let bad = scripts.script(
        "dying-flanneld",
        "#!/bin/sh\necho 'error parsing subnet config: boom' >&2\nexit 3\n",
    );
    let prefix = test_prefix();
    let mut spec = spec(&[NodeKind::KernelRef, NodeKind::Userspace], 1);
    spec.flanneld = Some(bad);
    spec.prefix = Some(prefix.clone());
    let t = std::time::Instant::now();
    let err = Cluster::up(&spec).expect_err("must fail");
    let msg = format!("{err:#}");
    println!("{msg}");
    assert!(msg.contains("exited"), "{msg}");
    assert!(msg.contains("error parsing subnet config: boom"), "{msg}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "no need to wait for the timeout"
    );
    assert!(leftover_namespaces(&prefix).is_empty());
    assert!(!spec.base_dir.join(&prefix).exists());
}

#[test]
fn flanneld_that_never_gets_ready_times_out() {
    if !privileged_test_guard("flanneld_that_never_gets_ready_times_out") {
        return;
    }
    let _g = serial();
    let scripts = Scripts::new("idle");
    let idle = scripts.script("idle-flanneld", "#!/bin/sh\necho waiting\nexec sleep 60\n");
    let prefix = test_prefix();
    let mut spec = spec(&[NodeKind::Kernel], 1);
    spec.flanneld = Some(idle);
    spec.prefix = Some(prefix.clone());
    spec.ready_timeout = Duration::from_secs(1);
    let err = Cluster::up(&spec).expect_err("must time out");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("did not write") && msg.contains("waiting"),
        "{msg}"
    );
    assert!(leftover_namespaces(&prefix).is_empty());
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn flanneld_command_line_pods_restart_and_stop() {
    if !privileged_test_guard("flanneld_command_line_pods_restart_and_stop") {
        return;
    }
    let _g = serial();
    let scripts = Scripts::new("fake");
    let fake = scripts.script("fake-flanneld", FAKE);
    let mut spec = spec(&[], 2);
    spec.nodes = vec![
        NodeSpec {
            kind: NodeKind::Userspace,
            extra_args: vec!["--public-ip".into(), "198.18.0.1".into()],
        },
        NodeKind::KernelRef.into(),
    ];
    spec.flanneld = Some(fake.clone());
    spec.flanneld_args = vec!["-v".into(), "2".into()];
    spec.ip_masq = true;
    let mut c = Cluster::up(&spec).expect("cluster up");
    let env = c.subnet_env_path("n1");
    let args = read(&PathBuf::from(format!("{}.args", env.display())));
    let expected = format!(
        "--lease-dir {} --subnet-file {} --iface eth0 --dataplane userspace --ip-masq -v 2 --public-ip 198.18.0.1",
        c.lease_dir().root().display(),
        env.display()
    );
    assert_eq!(args.trim(), expected);
    assert!(read(&c.flanneld_log("n1")).contains("fake flanneld up"));

    // Pods addressed from subnet.env like the CNI plugins would.
    assert_eq!(c.node_subnet("n1").unwrap().to_string(), "10.244.77.0/24");
    assert_eq!(c.node("n1").unwrap().mtu, 1400);
    assert_eq!(c.pod_ip("n1p1").unwrap().to_string(), "10.244.77.2");
    assert_eq!(c.pod_ip("n1p2").unwrap().to_string(), "10.244.77.3");
    assert!(sh(&c, "n1p2", &["ip", "link", "show", "eth0"]).contains("mtu 1400"));
    assert!(sh(&c, "n1", &["ip", "link", "show", "cni0"]).contains("mtu 1400"));
    let m = c.check();
    // The stand-in has no data plane: only the same-node pair can pass.
    assert!(m.cell("n1p1", "n1p2").unwrap().ok(), "{m}");
    assert!(!m.cell("n1p1", "n2p1").unwrap().ok(), "{m}");

    // The kernel-ref node learned the stand-in's lease like upstream flannel would.
    let mac_path = PathBuf::from(format!("{}.mac", env.display()));
    let mac1 = read(&mac_path).trim().to_string();
    let fdb = sh(&c, "n2", &["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert!(
        fdb.contains(&format!("{mac1} dst 198.18.0.1 self permanent")),
        "{fdb}"
    );
    assert!(sh(&c, "n2", &["ip", "route"])
        .contains("10.244.77.0/24 via 10.244.77.0 dev flannel.1 onlink"));

    let first = c.node("n1").unwrap().flanneld.clone().unwrap();
    assert!(first.alive());
    c.restart_flanneld("n1").expect("restart");
    let second = c.node("n1").unwrap().flanneld.clone().unwrap();
    assert_ne!(first.pid, second.pid);
    // New VTEP MAC after the restart: the kernel-ref node replaced neighbour and FDB entries.
    let mac2 = read(&mac_path).trim().to_string();
    assert_ne!(mac1, mac2);
    let neigh = sh(&c, "n2", &["ip", "neigh", "show", "dev", "flannel.1"]);
    assert!(
        neigh.contains(&format!("10.244.77.0 lladdr {mac2} PERMANENT")),
        "{neigh}"
    );
    assert_eq!(c.node("n2").unwrap().programmed[0].vtep_mac, mac2);
    assert!(!first.alive(), "old flanneld stopped by PID");
    assert!(c.flanneld_running("n1"));
    c.stop_flanneld("n1").unwrap();
    assert!(!second.alive());
    assert!(!c.flanneld_running("n1"));
    c.start_flanneld("n1").unwrap();
    let third = c.node("n1").unwrap().flanneld.clone().unwrap();
    let prefix = c.prefix().to_string();
    drop(c);
    assert!(!third.alive(), "teardown stops flanneld");
    assert!(leftover_namespaces(&prefix).is_empty());
}
