//! Scaffolding shared by every test crate of the workspace (the root crate's `tests/`, the
//! harness's and the test API server's), so no test file grows its own copy:
//!
//! * [`netns`]: a network namespace deleted on drop, with `ip`/`bridge`/exec helpers and a way
//!   to run code inside it (for tests that drive netlink or iptables directly);
//! * [`cluster`]: harness clusters of our `flanneld` (sibling binaries, specs, commands in
//!   namespaces, bulk TCP transfers, teardown checks);
//! * [`fixtures`]: lease attributes, MACs and configs the store tests share;
//! * [`etcd`]: a private etcd server on 127.0.0.1, stopped by PID;
//! * [`ping`]: losses and the longest outage of a `ping -i` run (restart and handover tests);
//! * [`TempDir`]: a scratch directory removed on drop.
//!
//! Privileged tests start with [`privileged`]: it skips (with a message) when not root and
//! fails when `CI=true`, because CI must run them.

pub mod cluster;
pub mod etcd;
pub mod fixtures;
pub mod netns;
pub mod ping;
mod tempdir;

pub use tempdir::TempDir;

pub use netns_harness::privileged_test_guard as privileged;

use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `cmd args`; panics with its stderr unless it succeeds. Its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The non-empty lines of `text`, trimmed and sorted (command output compared as a set).
pub fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

/// Polls `f` every 50 ms until it is true or `limit` passes; returns the time it took.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
