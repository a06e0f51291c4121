//! The `netns-harness` binary end to end: up → check → capture → down across processes, and the
//! demo's teardown on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use common::*;
use netns_harness::privileged_test_guard;
use netns_harness::sys::{send_signal, Signal};

fn base_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("nh-cli-{tag}-{}", std::process::id()))
}

/// Runs built by child processes are not owned by this test: remove whatever is left under
/// the test's base directory when the test ends, passing or failing.
struct BaseGuard(PathBuf);

/// The start of every test here: None when it must skip (not root, not CI); else the serial
/// lock and the test's base directory with its guard.
fn begin(test: &str, tag: &str) -> Option<(MutexGuard<'static, ()>, BaseGuard)> {
    if !privileged_test_guard(test) {
        return None;
    }
    let serial = serial();
    Some((serial, BaseGuard(base_dir(tag))))
}

impl Drop for BaseGuard {
    fn drop(&mut self) {
        for (prefix, _) in netns_harness::list_runs(&self.0) {
            match netns_harness::Cluster::load(&self.0, Some(&prefix)) {
                Ok(mut c) => {
                    let _ = c.teardown();
                }
                Err(_) => {
                    let _ = netns_harness::teardown_by_prefix(&self.0, &prefix);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn harness(base: &Path, args: &[&str]) -> Output {
    let out = Command::new(harness_bin())
        .arg("--base-dir")
        .arg(base)
        .args(args)
        .output()
        .unwrap();
    println!(
        "$ netns-harness {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `netns-harness up` of two kernel-ref nodes with one pod each and `extra` flags; it must
/// succeed. Returns its output and the run id it printed.
fn up(base: &Path, extra: &[&str]) -> (Output, String) {
    let mut args = vec!["up", "--nodes", "2", "--pods", "1", "--kinds", "kernel-ref"];
    args.extend_from_slice(extra);
    let out = harness(base, &args);
    assert!(out.status.success());
    let run = text(&out)
        .lines()
        .find_map(|l| l.strip_prefix("run ").map(str::to_string))
        .expect("run id printed");
    (out, run)
}

#[test]
fn up_check_capture_down_across_processes() {
    let Some((_g, cleanup)) = begin("up_check_capture_down_across_processes", "up") else {
        return;
    };
    let base = cleanup.0.clone();
    // `capture verify` checks every checksum on the wire: a real wire, not kind's veths.
    let (out, run) = up(&base, &["--link-offloads", "off"]);
    assert!(text(&out).contains("state.json"));
    assert_eq!(leftover_namespaces(&run).len(), 5);

    let out = harness(
        &base,
        &[
            "capture",
            "start",
            "--packets",
            "2000",
            "--filter",
            "udp port 8472",
        ],
    );
    assert!(out.status.success());
    let out = harness(&base, &["check"]);
    assert!(out.status.success());
    assert!(text(&out).contains("RESULT: PASS"));
    assert!(text(&out).contains("n1p1 (pod)"));
    let out = harness(&base, &["capture", "stop"]);
    assert!(out.status.success());
    let out = harness(&base, &["capture", "verify"]);
    assert!(out.status.success());
    assert!(text(&out).contains("RESULT: PASS"));

    // A broken path must make `check` fail: drop n2's route to n1's pods.
    let sub1 = {
        let c = netns_harness::Cluster::load(&base, Some(&run)).unwrap();
        c.node_subnet("n1").unwrap().to_string()
    };
    let out = harness(&base, &["exec", "n2", "--", "ip", "route", "del", &sub1]);
    assert!(out.status.success());
    let out = harness(&base, &["check"]);
    assert!(
        !out.status.success(),
        "check must fail with a missing route"
    );
    assert!(text(&out).contains("FAIL n2p1 -> n1p1"));

    let out = harness(&base, &["down"]);
    assert!(out.status.success());
    assert!(leftover_namespaces(&run).is_empty());
    assert!(!base.join(&run).exists());
    let out = harness(&base, &["down"]);
    assert!(out.status.success(), "down is idempotent");
    let out = harness(&base, &["down", "--run", &run]);
    assert!(out.status.success(), "down of a vanished run is fine");
}

#[test]
fn demo_tears_down_on_sigterm() {
    let Some((_g, cleanup)) = begin("demo_tears_down_on_sigterm", "demo") else {
        return;
    };
    let base = cleanup.0.clone();
    let mut child = Command::new(harness_bin())
        .arg("--base-dir")
        .arg(&base)
        .args([
            "demo",
            "--kinds",
            "kernel-ref",
            "--nodes",
            "2",
            "--pods",
            "1",
            "--seconds",
            "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("demo: {line}");
            let _ = tx.send(line);
        }
    });
    let mut run = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait until the check finished: the bench (30 s per path) is running.
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo output");
        if let Some(r) = line.strip_prefix("run ") {
            run = r.split_whitespace().next().map(str::to_string);
        }
        if line.starts_with("RESULT: PASS") {
            break;
        }
        assert!(!line.starts_with("RESULT: FAIL"), "{line}");
    }
    let run = run.expect("run id");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!leftover_namespaces(&run).is_empty());
    assert!(send_signal(child.id(), Signal::Term));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "teardown took {:?}",
        t.elapsed()
    );
    assert!(leftover_namespaces(&run).is_empty());
    assert!(!base.join(&run).exists());
}

/// `--store` and `--sites` from the command line, across processes: an etcd run through an
/// outage with a node added meanwhile; a two-site kube run fixed with `annotate` + `restart`.
#[test]
fn stores_and_sites_across_processes() {
    let Some((_g, cleanup)) = begin("stores_and_sites_across_processes", "stores") else {
        return;
    };
    let base = cleanup.0.clone();
    let (out, run) = up(&base, &["--store", "etcd"]);
    assert!(text(&out).contains("store etcd at http://198.18.0.254:2379"));
    // Underlay, two nodes, two pods, control plane.
    assert_eq!(leftover_namespaces(&run).len(), 6);
    let out = harness(&base, &["store", "stop"]);
    assert!(out.status.success());
    assert!(text(&out).contains("server stopped"), "{}", text(&out));
    assert!(harness(&base, &["add-node", "kernel-ref"]).status.success());
    let out = harness(&base, &["store", "start"]);
    assert!(out.status.success());
    assert!(text(&out).contains("(alive), maintenance stopped"));
    let out = harness(&base, &["check"]);
    assert!(out.status.success());
    assert!(text(&out).contains("n3p1 (pod)"));
    assert!(harness(&base, &["down"]).status.success());
    assert!(leftover_namespaces(&run).is_empty());

    up(&base, &["--store", "kube", "--sites", "1,2"]);
    let out = harness(&base, &["check"]);
    assert!(
        !out.status.success(),
        "cross-site must fail without the overwrite"
    );
    for (n, ip) in [("n1", "203.0.113.1"), ("n2", "203.0.113.2")] {
        let ann = format!("flannel.alpha.coreos.com/public-ip-overwrite={ip}");
        assert!(harness(&base, &["annotate", n, &ann]).status.success());
        assert!(harness(&base, &["restart", n]).status.success());
    }
    let out = harness(&base, &["check"]);
    assert!(out.status.success());
    assert!(text(&out).contains("site 2 NAT 203.0.113.2"));
    assert!(harness(&base, &["down"]).status.success());
}
