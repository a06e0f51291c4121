//! Restarts and upgrades of the userspace data plane under traffic: pings every 10 ms between
//! pods on two nodes while node n1's flanneld is (a) replaced by a new one started while it
//! runs (the handover), (b) killed with SIGKILL and started again, (c) stopped with SIGTERM
//! and started again. Privileged: run as root (CI=true makes them mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};
use test_support::ping::PingRun;

/// Pings sent per phase: 10 s at 10 ms, the operation starting 1 s in.
const PINGS: usize = 1000;
const INTERVAL_MS: usize = 10;

/// Pings from n2's pod to n1's pod every 10 ms while `op` runs on the cluster (1 s in).
fn pings_across(c: &mut Cluster, op: impl FnOnce(&mut Cluster)) -> PingRun {
    let dst = c.pod_ip("n1p1").expect("ip").to_string();
    let ns = c.pod("n2p1").expect("pod").ns.clone();
    let count = PINGS.to_string();
    let pings = std::process::Command::new("timeout")
        .args([
            "40", "ip", "netns", "exec", &ns, "ping", "-i", "0.01", "-c", &count, "-W", "1", &dst,
        ])
        .output_async();
    std::thread::sleep(Duration::from_millis(1000));
    op(c);
    let out = pings.join();
    let text = String::from_utf8_lossy(&out.stdout);
    let run = PingRun::parse(&text, INTERVAL_MS);
    assert_eq!(
        run.sent,
        PINGS,
        "ping did not finish: {}",
        &text[text.len().saturating_sub(400)..]
    );
    run
}

/// A flanneld this test started itself: killed by PID (and reaped) when dropped, also on a
/// failed assertion.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts flanneld (`argv`) in namespace `ns` outside the harness, logging to `log`.
fn spawn_logged(ns: &str, argv: &[String], log: &std::path::Path) -> Reap {
    let log = std::fs::File::create(log).expect("log");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn flanneld");
    Reap(child)
}

/// The index of n1's flannel.1 (it must exist).
fn ifindex(c: &Cluster) -> String {
    sh(c, "n1", &["cat", "/sys/class/net/flannel.1/ifindex"])
        .trim()
        .to_string()
}

#[test]
fn userspace_handover_restart_and_crash_under_pings() {
    if !privileged_test_guard("userspace_handover_restart_and_crash_under_pings") {
        return;
    }
    let _g = serial();
    let mut c =
        Cluster::up(&spec(&[NodeKind::Userspace, NodeKind::Userspace], 1)).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    let index = ifindex(&c);

    // (a) A new flanneld started while the old one runs takes over; then the old one stops.
    let a = pings_across(&mut c, |c| c.handoff_flanneld("n1").expect("handover"));
    println!(
        "handover upgrade: {} of {} lost, longest gap {} ms",
        a.lost(),
        a.sent,
        a.longest_gap_ms
    );
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    assert!(log.contains("taking over the data plane"), "{log}");
    assert!(log.contains("Exiting cleanly"), "{log}");
    // The adopted descriptors carry TSO super-packets both ways (vnet header, UDP GSO/GRO).
    let (sent, got, bytes) = transfer(&c, "n2p1", "n1p1", 8, 9101);
    assert_eq!(
        (bytes, &sent),
        (8 << 20, &got),
        "n2p1->n1p1 after the handover"
    );
    let (sent, got, bytes) = transfer(&c, "n1p1", "n2p1", 8, 9102);
    assert_eq!(
        (bytes, &sent),
        (8 << 20, &got),
        "n1p1->n2p1 after the handover"
    );

    // (b) kill -9 and an immediate restart: the device outlives the process.
    let b = pings_across(&mut c, |c| {
        c.kill_flanneld("n1").expect("kill");
        let (exists, _) = run(c, "n1", &["ip", "link", "show", "flannel.1"]);
        assert!(exists, "flannel.1 vanished with the killed process");
        c.start_flanneld("n1").expect("start");
    });
    println!(
        "kill -9 and restart: {} of {} lost, longest gap {} ms",
        b.lost(),
        b.sent,
        b.longest_gap_ms
    );

    // (c) SIGTERM, then start.
    let cc = pings_across(&mut c, |c| c.restart_flanneld("n1").expect("restart"));
    println!(
        "SIGTERM and restart: {} of {} lost, longest gap {} ms",
        cc.lost(),
        cc.sent,
        cc.longest_gap_ms
    );

    assert_eq!(
        ifindex(&c),
        index,
        "the device was recreated instead of adopted"
    );
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");

    // (e) After a handover the old flanneld (still running until it is stopped) closes its
    // copies of the descriptors, so when the successor crashes, the next start attaches to
    // the device at once instead of finding it held.
    let argv = c.flanneld_command("n1").expect("command");
    let ns = c.node("n1").expect("n1").ns.clone();
    let succ_log = c.node_dir("n1").join("flanneld-successor-e.log");
    let successor = spawn_logged(&ns, &argv, &succ_log);
    let old_log = c.flanneld_log("n1");
    let closed = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&old_log)
            .is_ok_and(|l| l.contains("closed the handed-over device and socket"))
    });
    assert!(
        closed.is_some(),
        "old: {}\nsuccessor: {}",
        std::fs::read_to_string(&old_log).unwrap_or_default(),
        std::fs::read_to_string(&succ_log).unwrap_or_default()
    );
    drop(successor); // SIGKILL: the successor crashes
    let err = c
        .handoff_flanneld("n1")
        .expect_err("the passive old flanneld has nothing to hand over");
    assert!(
        err.to_string().contains("did not log the handover"),
        "{err:#}"
    );
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    assert!(!log.contains("offers no handover"), "{log}");
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");

    // (d) A running flanneld that offers no handover (here: its socket file is gone, as with
    // a version before the handover): the new one waits for the device and port to be free
    // instead of failing or taking them; it serves once the old one is stopped.
    let sock = c.node_dir("n1").join("flannel.1.handoff.sock");
    std::fs::remove_file(&sock).expect("remove the handover socket file");
    let log_path = c.node_dir("n1").join("flanneld-successor.log");
    let successor = spawn_logged(&ns, &argv, &log_path);
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let waits = wait_for(Duration::from_secs(15), || {
        read_log().contains("offers no handover")
    });
    assert!(waits.is_some(), "{}", read_log());
    let d = pings_across(&mut c, |c| {
        c.stop_flanneld("n1").expect("stop the old flanneld");
        let serving = wait_for(Duration::from_secs(5), || {
            read_log().contains("the device and port are free now")
        });
        assert!(serving.is_some(), "{}", read_log());
    });
    println!(
        "no handover offered, old stopped: {} of {} lost, longest gap {} ms",
        d.lost(),
        d.sent,
        d.longest_gap_ms
    );
    let m = c.check_until_pass(Duration::from_secs(5));
    assert!(m.all_pass(), "{m}");
    drop(successor);
    teardown(c);

    assert_eq!(a.lost(), 0, "handover lost pings: {a:?}");
    assert!(b.longest_gap_ms < 200, "kill -9 outage too long: {b:?}");
    assert!(
        cc.longest_gap_ms < 200,
        "SIGTERM restart outage too long: {cc:?}"
    );
}
