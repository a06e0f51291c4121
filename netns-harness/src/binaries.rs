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

/// A binary a run starts: its file name, the environment variable that overrides where it
/// is, and how to get one.
struct Binary {
    name: &'static str,
    env: &'static str,
    hint: &'static str,
}

const FLANNELD: Binary = Binary {
    name: "flanneld",
    env: "NETNS_HARNESS_FLANNELD",
    hint: "Build it with `cargo build --bin flanneld` or pass --flanneld PATH \
           (ClusterSpec::flanneld).",
};

const HARNESS: Binary = Binary {
    name: "netns-harness",
    env: "NETNS_HARNESS_BIN",
    hint: "Build it with `cargo build -p netns-harness` or set NETNS_HARNESS_BIN \
           (ClusterSpec::harness_bin).",
};

impl Binary {
    /// The explicit path, else the environment variable, else a sibling of this executable.
    fn resolve(&self, explicit: Option<&Path>) -> Result<PathBuf> {
        let (name, hint) = (self.name, self.hint);
        if let Some(p) = explicit {
            return check_executable(p, name, hint);
        }
        if let Some(p) = std::env::var_os(self.env) {
            return check_executable(Path::new(&p), &format!("{name} (${})", self.env), hint);
        }
        match sibling_binary(name) {
            Some(p) => check_executable(&p, name, hint),
            None => bail!(
                "{name} binary not found next to {}. {hint}",
                std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
}

/// Resolves the flanneld binary: explicit path, `$NETNS_HARNESS_FLANNELD`, then a sibling.
pub fn resolve_flanneld(explicit: Option<&Path>) -> Result<PathBuf> {
    FLANNELD.resolve(explicit)
}

/// Resolves the netns-harness binary (responders, probes): explicit path,
/// `$NETNS_HARNESS_BIN`, then a sibling.
pub fn resolve_harness_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    HARNESS.resolve(explicit)
}
