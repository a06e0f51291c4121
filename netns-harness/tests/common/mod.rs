//! Shared helpers for the privileged harness tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use netns_harness::{Cluster, ClusterSpec, NodeKind};

/// Namespace-heavy tests of one binary run one at a time (the machine has 2 cores, and the
/// bench numbers would suffer from a parallel test).
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn harness_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netns-harness"))
}

pub fn spec(kinds: &[NodeKind], pods: usize) -> ClusterSpec {
    let mut s = ClusterSpec::new(kinds, pods);
    s.harness_bin = Some(harness_bin());
    s
}

pub fn kernel_refs(n: usize, pods: usize) -> ClusterSpec {
    spec(&vec![NodeKind::KernelRef; n], pods)
}

/// Namespaces currently present whose name starts with `<prefix>-`.
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    netns_harness::cluster::run_namespaces(prefix).expect("ip netns list")
}

/// `ip ... ` output inside a namespace of the cluster, as text; panics on failure.
pub fn sh(c: &Cluster, ns: &str, args: &[&str]) -> String {
    let out = c.exec_ok(ns, args).expect("exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A prefix for tests that must know it before `Cluster::up` returns.
pub fn test_prefix() -> String {
    let b: [u8; 3] = netns_harness::net::random_bytes().unwrap();
    format!("frt{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}
