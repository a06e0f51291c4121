//! Keeps the core crate sans-IO: its normal dependencies, followed transitively through the
//! workspace's Cargo.lock, must not reach tokio, libc, netlink, serde or another crate that
//! talks to the OS. Fails when someone adds one to core/Cargo.toml.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Crate name prefixes the core must never depend on.
const FORBIDDEN: &[&str] = &[
    "tokio", "libc", "serde", "mio", "socket2", "nix", "rustix", "hyper", "netlink",
];

fn forbidden(name: &str) -> bool {
    FORBIDDEN.iter().any(|f| name.starts_with(f)) || name.contains("netlink")
}

/// The names in the normal (and build) dependency sections of a Cargo.toml, target-specific
/// ones included; dev-dependencies are left out.
fn normal_deps(manifest: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']');
            let dev = header.contains("dev-dependencies");
            // A [dependencies.NAME] (or [target.….dependencies.NAME]) table names one.
            let table = ["dependencies.", "build-dependencies."]
                .iter()
                .find_map(|p| header.strip_prefix(p))
                .or_else(|| header.split_once(".dependencies.").map(|(_, n)| n));
            if let (Some(name), false) = (table, dev) {
                deps.insert(name.to_string());
            }
            in_deps = table.is_none() && !dev && header.ends_with("dependencies");
            continue;
        }
        if in_deps {
            if let Some((name, _)) = line.split_once('=') {
                let name = name.trim();
                if !name.is_empty() && !name.starts_with('#') {
                    deps.insert(name.trim_matches('"').to_string());
                }
            }
        }
    }
    deps
}

/// Package name → names of its dependencies (all versions merged), from Cargo.lock.
fn lock_graph(lock: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_list = false;
    for line in lock.lines().map(str::trim) {
        if line == "[[package]]" {
            current = None;
            in_list = false;
        } else if let Some(name) = line.strip_prefix("name = ") {
            let name = name.trim_matches('"').to_string();
            graph.entry(name.clone()).or_default();
            current = Some(name);
        } else if line == "dependencies = [" {
            in_list = true;
        } else if in_list && line == "]" {
            in_list = false;
        } else if in_list {
            // "name", "name version" or "name version (source)".
            let dep = line.trim_matches(|c| c == '"' || c == ',');
            let dep = dep.split_whitespace().next().unwrap_or_default();
            if let Some(pkg) = &current {
                graph
                    .entry(pkg.clone())
                    .or_default()
                    .insert(dep.to_string());
            }
        }
    }
    graph
}

/// Everything reachable from `roots` in `graph` (roots included).
fn closure(
    graph: &BTreeMap<String, BTreeSet<String>>,
    roots: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().cloned().collect();
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            todo.extend(graph.get(&n).into_iter().flatten().cloned());
        }
    }
    seen
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn core_depends_on_no_io_crate() {
    let core_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = core_dir.parent().expect("core/ sits in the workspace root");
    let graph = lock_graph(&read(&root.join("Cargo.lock")));

    let direct = normal_deps(&read(&core_dir.join("Cargo.toml")));
    assert!(
        direct.contains("thiserror") && !direct.contains("proptest"),
        "manifest parsing is off: {direct:?}"
    );
    let all = closure(&graph, &direct);
    let bad: Vec<_> = all.iter().filter(|n| forbidden(n)).collect();
    assert!(
        bad.is_empty(),
        "flannel-core must stay sans-IO, but its dependencies reach {bad:?} (all: {all:?})"
    );

    // The same walk over the main crate finds what it uses for IO: the check can fail.
    let main = closure(&graph, &normal_deps(&read(&root.join("Cargo.toml"))));
    for needed in ["tokio", "libc", "serde", "rtnetlink"] {
        assert!(main.contains(needed), "walk missed {needed} in flannel-rs");
    }
}
