//! Finding the binaries a run starts: flanneld, the harness itself (pod responders, the flannel
//! CNI plugin), next to the running executable or where the user says.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Finds a binary named `name` next to the running executable, or in the parent of a `deps/`
/// directory (where test executables live).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut cands = vec![dir.join(name)];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(p) = dir.parent() {
            cands.push(p.join(name));
        }
    }
    cands.into_iter().find(|p| p.is_file())
}

pub(crate) fn check_executable(path: &Path, what: &str, hint: &str) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow!(
            "{what} binary {} is not usable: {e}. {hint}",
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!(
            "{what} binary {} is not a regular file. {hint}",
            path.display()
        );
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{what} binary {} is not executable. {hint}", path.display());
    }
    std::fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))
}

/// Resolves the flanneld binary: explicit path, `$NETNS_HARNESS_FLANNELD`, then a sibling.
pub fn resolve_flanneld(explicit: Option<&Path>) -> Result<PathBuf> {
    let hint = "Build it with `cargo build --bin flanneld` or pass --flanneld PATH \
                (ClusterSpec::flanneld).";
    if let Some(p) = explicit {
        return check_executable(p, "flanneld", hint);
    }
    if let Some(p) = std::env::var_os("NETNS_HARNESS_FLANNELD") {
        return check_executable(Path::new(&p), "flanneld ($NETNS_HARNESS_FLANNELD)", hint);
    }
    match sibling_binary("flanneld") {
        Some(p) => check_executable(&p, "flanneld", hint),
        None => bail!(
            "flanneld binary not found next to {}. {hint}",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
}

/// Resolves the netns-harness binary (responders, probes).
pub fn resolve_harness_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let hint = "Build it with `cargo build -p netns-harness` or set NETNS_HARNESS_BIN \
                (ClusterSpec::harness_bin).";
    if let Some(p) = explicit {
        return check_executable(p, "netns-harness", hint);
    }
    if let Some(p) = std::env::var_os("NETNS_HARNESS_BIN") {
        return check_executable(Path::new(&p), "netns-harness ($NETNS_HARNESS_BIN)", hint);
    }
    match sibling_binary("netns-harness") {
        Some(p) => check_executable(&p, "netns-harness", hint),
        None => bail!("netns-harness binary not found next to the running executable. {hint}"),
    }
}
