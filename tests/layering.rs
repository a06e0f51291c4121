//! Layering rules the compiler does not check, checked by reading the sources:
//! - module-level import cycles: every `crate::…` and `super::…` path is resolved to the module
//!   (file) it names; a cycle between modules that are not each other's ancestor fails (a
//!   `mod.rs` re-exporting its children is structure, not a cycle);
//! - only `src/io` and `src/netlink` talk to the kernel: no other module runs a program, names
//!   a `/proc` or `/sys` path or calls libc (its constants, such as errno values, are data).
//!
//! Test modules (`#[cfg(test)]` and after) and comments are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every `.rs` file under `root`, keyed by its module path (`lease/kube.rs` → `lease::kube`).
fn modules(root: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .with_extension("");
            let mut m: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                m.pop();
            }
            out.insert(m, path);
        }
    }
    out
}

/// The source without comments and without its test module.
fn code(src: &str) -> String {
    let src = src.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Paths (`a::b::c` segments) following each `prefix` in `code`, braces expanded one level.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    for (i, _) in code.match_indices(prefix) {
        if code[..i].chars().next_back().is_some_and(ident) {
            continue;
        }
        let tail = &code[i + prefix.len()..];
        let end = tail
            .find(|c: char| !(ident(c) || c == ':'))
            .unwrap_or(tail.len());
        let head: Vec<String> = tail[..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if tail[end..].starts_with('{') && (end == 0 || tail[..end].ends_with("::")) {
            let inner = &tail[end + 1..tail[end..].find('}').map_or(tail.len(), |j| end + j)];
            for item in inner.split(',') {
                let mut p = head.clone();
                p.extend(
                    item.split("::")
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty()),
                );
                out.push(p);
            }
        } else {
            out.push(head);
        }
    }
    out
}

/// The modules `me` refers to (the longest module prefix of each path).
fn references(src: &str, me: &Module, mods: &BTreeMap<Module, PathBuf>) -> BTreeSet<Module> {
    let code = code(src);
    let mut paths = paths_after(&code, "crate::");
    for p in paths_after(&code, "super::") {
        // `super::super::x` arrives as ["super", "x"] after the first prefix.
        let ups = 1 + p.iter().take_while(|s| *s == "super").count();
        let mut base: Module = me[..me.len().saturating_sub(ups)].to_vec();
        base.extend(p.into_iter().skip(ups - 1));
        paths.push(base);
    }
    paths
        .into_iter()
        .filter_map(|p| {
            (1..=p.len())
                .rev()
                .map(|k| p[..k].to_vec())
                .find(|m| mods.contains_key(m))
        })
        .collect()
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.stack.contains(&w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn import_graph(root: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mods = modules(root);
    mods.iter()
        .map(|(m, path)| {
            let src = std::fs::read_to_string(path).expect("read source");
            let edges = references(&src, m, &mods)
                .into_iter()
                .filter(|t| !t.starts_with(m) && !m.starts_with(t))
                .collect();
            (m.clone(), edges)
        })
        .collect()
}

fn describe(graph: &BTreeMap<Module, BTreeSet<Module>>, comp: &[Module]) -> String {
    let mut lines = Vec::new();
    for a in comp {
        for b in &graph[a] {
            if comp.contains(b) {
                lines.push(format!("  {} -> {}", a.join("::"), b.join("::")));
            }
        }
    }
    lines.join("\n")
}

/// The crates whose module graph must stay acyclic: the daemon, its core, the shared test
/// scaffolding, the namespace harness and the test API server.
const ROOTS: &[&str] = &[
    "src",
    "core/src",
    "test-support/src",
    "netns-harness/src",
    "test-apiserver/src",
];

#[test]
fn no_import_cycles_between_modules() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut report = Vec::new();
    for root in ROOTS {
        let graph = import_graph(&ws.join(root));
        for comp in cycles(&graph) {
            report.push(format!("{root}: cycle\n{}", describe(&graph, &comp)));
        }
    }
    assert!(report.is_empty(), "import cycles:\n{}", report.join("\n"));
}

#[test]
fn the_checker_finds_a_planted_cycle_and_ignores_parents() {
    let dir = std::env::temp_dir().join(format!("layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).expect("mkdir");
    let files = [
        ("lib.rs", "mod a; mod b; mod c;"),
        ("a/mod.rs", "pub mod x; pub use x::Thing; use crate::c::C;"),
        (
            "a/x.rs",
            "use super::super::b::B; // crate::c::C in a comment\n",
        ),
        ("b.rs", "use crate::{a::x::Thing, c};"),
        (
            "c.rs",
            "pub struct C;\n#[cfg(test)]\nmod tests { use crate::b::B; }",
        ),
    ];
    for (name, body) in files {
        std::fs::write(dir.join(name), body).expect("write");
    }
    let graph = import_graph(&dir);
    let found = cycles(&graph);
    let _ = std::fs::remove_dir_all(&dir);
    let names: Vec<Vec<String>> = found
        .iter()
        .map(|c| {
            let mut v: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            v.sort();
            v
        })
        .collect();
    // a::x -> b -> a::x is a cycle; a -> a::x (parent) and c's test module are not edges.
    assert_eq!(
        names,
        vec![vec!["a::x".to_string(), "b".to_string()]],
        "{graph:?}"
    );
}

/// The only directories whose code may talk to the kernel directly.
const KERNEL_HOMES: &[&str] = &["src/io", "src/netlink"];

/// What talking to the kernel looks like in source: running a program, a `/proc` or `/sys`
/// path, a libc function or type (lower-case after `libc::`; constants are upper-case).
fn kernel_talk(code: &str) -> Vec<String> {
    let mut found: Vec<String> = ["process::Command", "Command::new", "\"/proc/", "\"/sys/"]
        .iter()
        .filter(|p| code.contains(*p))
        .map(|p| (*p).to_owned())
        .collect();
    for (i, _) in code.match_indices("libc::") {
        let rest = &code[i + "libc::".len()..];
        if rest.starts_with(|c: char| c.is_ascii_lowercase()) {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            found.push(format!("libc::{}", &rest[..end]));
        }
    }
    found
}

#[test]
fn only_io_and_netlink_talk_to_the_kernel() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut report = Vec::new();
    for root in ["src", "core/src"] {
        for path in modules(&ws.join(root)).into_values() {
            let rel = path.strip_prefix(ws).expect("in workspace");
            if KERNEL_HOMES.iter().any(|home| rel.starts_with(home)) {
                continue;
            }
            let found = kernel_talk(&code(&std::fs::read_to_string(&path).expect("read")));
            if !found.is_empty() {
                report.push(format!("{}: {}", rel.display(), found.join(", ")));
            }
        }
    }
    assert!(
        report.is_empty(),
        "kernel-talking code outside {KERNEL_HOMES:?} (move it there and call it):\n{}",
        report.join("\n")
    );
}

#[test]
fn the_kernel_check_sees_code_not_comments_or_constants() {
    let src = "use std::process::Command;\n// std::fs::read(\"/proc/x\")\nfn f() { let _ = libc::EINVAL; unsafe { libc::ioctl(0, 0) }; std::fs::read(\"/sys/class/net\"); }\n#[cfg(test)]\nmod t { fn g() { std::fs::read(\"/proc/self/stat\"); } }";
    assert_eq!(
        kernel_talk(&code(src)),
        vec!["process::Command", "\"/sys/", "libc::ioctl"]
    );
}
