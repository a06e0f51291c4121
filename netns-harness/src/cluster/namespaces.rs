//! Run prefixes and their namespaces: listing, deleting, tearing a run down by prefix, listing runs.

use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Result};

use crate::cmd::{self, ProcRecord};
use crate::net;
use crate::sys::log;

/// Lists every network namespace name (not interruptible: teardown depends on it).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = cmd::run_uninterruptible(
        std::process::Command::new("ip").args(["netns", "list"]),
        cmd::SHORT,
    )?;
    if !out.status.success() {
        bail!(
            "ip netns list: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Namespaces that belong to run `prefix`.
pub fn run_namespaces(prefix: &str) -> Result<Vec<String>> {
    let p = format!("{prefix}-");
    Ok(list_namespaces()?
        .into_iter()
        .filter(|n| n.starts_with(&p))
        .collect())
}

pub(super) fn valid_prefix(p: &str) -> bool {
    (3..=12).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

pub(super) fn new_prefix() -> Result<String> {
    let b: [u8; 3] = net::random_bytes()?;
    Ok(format!("fr{:02x}{:02x}{:02x}", b[0], b[1], b[2]))
}

/// Deletes one namespace of a run: stops whatever still runs inside it (those processes can
/// only have been started by this run), then `ip netns del`.
pub(super) fn delete_namespace(ns: &str) -> Result<()> {
    let pids = cmd::run_uninterruptible(
        std::process::Command::new("ip").args(["netns", "pids", ns]),
        cmd::SHORT,
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default();
    for pid in pids
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .take(1000)
    {
        let rec = ProcRecord::new(pid, format!("process in {ns}"));
        if !cmd::stop_process(&rec, None) {
            log(format!("process {pid} in {ns} did not stop"));
        }
    }
    let out = cmd::run_uninterruptible(
        std::process::Command::new("ip").args(["netns", "del", ns]),
        cmd::SHORT,
    )?;
    if !out.status.success() {
        bail!(
            "ip netns del {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes every trace of run `prefix` under `base_dir` without a usable state file:
/// namespaces `<prefix>-*` (and processes inside them) and the run directory.
pub fn teardown_by_prefix(base_dir: &Path, prefix: &str) -> Result<()> {
    if !valid_prefix(prefix) {
        bail!("refusing to tear down {prefix:?}: not a harness run prefix");
    }
    let mut errors = Vec::new();
    // Pods first, underlay last (order only matters for tidy logs).
    let mut nss = run_namespaces(prefix)?;
    nss.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in nss {
        if let Err(e) = delete_namespace(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    let dir = base_dir.join(prefix);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("teardown of {prefix} incomplete: {}", errors.join("; "))
    }
}

/// Runs with a state file under `base_dir`, newest first: (prefix, state modification time).
pub fn list_runs(base_dir: &Path) -> Vec<(String, SystemTime)> {
    let mut runs: Vec<(String, SystemTime)> = std::fs::read_dir(base_dir)
        .into_iter()
        .flatten()
        .flatten()
        .take(10_000)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = std::fs::metadata(e.path().join("state.json")).ok()?;
            valid_prefix(&name).then(|| (name, m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        })
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.1));
    runs
}

/// The run a command without `--run` acts on: the only run in `base_dir` (None if there is
/// none). With several it refuses rather than guess: another engineer's or test's run in a
/// shared base directory is not ours to bench or tear down.
pub fn only_run(base_dir: &Path) -> anyhow::Result<Option<String>> {
    let runs = list_runs(base_dir);
    match runs.as_slice() {
        [] => Ok(None),
        [(one, _)] => Ok(Some(one.clone())),
        many => anyhow::bail!(
            "{} runs in {} ({}): name one with --run (or give each user its own --base-dir)",
            many.len(),
            base_dir.display(),
            many.iter()
                .map(|r| r.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_without_run_takes_the_only_run_and_refuses_to_guess_among_several() {
        let base = std::env::temp_dir().join(format!("only-run-{}", std::process::id()));
        let add = |name: &str| {
            std::fs::create_dir_all(base.join(name)).unwrap();
            std::fs::write(base.join(name).join("state.json"), "{}").unwrap();
        };
        assert_eq!(only_run(&base).unwrap(), None);
        add("fraaaaaa");
        // Not a run: no state.json.
        std::fs::create_dir_all(base.join("frbbbbbb")).unwrap();
        assert_eq!(only_run(&base).unwrap().as_deref(), Some("fraaaaaa"));
        add("frcccccc");
        let err = only_run(&base).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&base);
        assert!(err.contains("2 runs in"), "{err}");
        assert!(
            err.contains("fraaaaaa") && err.contains("frcccccc"),
            "{err}"
        );
        assert!(err.contains("--run"), "{err}");
    }
}
