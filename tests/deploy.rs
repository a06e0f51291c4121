//! deploy/: every file the image copies from the build context exists in the repository and
//! is not excluded by .dockerignore, and the manifest keeps upstream's least-privilege
//! securityContext with the /dev/net/tun mount. (Schema validation and hadolint run in
//! scripts/lint-deploy.)

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Dockerfile instructions with `\` continuations joined and comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

/// Sources of every `COPY`/`ADD` from the build context (not `--from=` another stage).
fn context_sources(dockerfile: &str) -> Vec<String> {
    let mut sources = Vec::new();
    for ins in instructions(dockerfile) {
        let mut words = ins.split_whitespace();
        let Some(op) = words.next() else { continue };
        if !op.eq_ignore_ascii_case("COPY") && !op.eq_ignore_ascii_case("ADD") {
            continue;
        }
        let args: Vec<&str> = words.collect();
        if args.iter().any(|a| a.starts_with("--from=")) {
            continue;
        }
        let paths: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| !a.starts_with("--"))
            .collect();
        assert!(
            paths.len() >= 2,
            "COPY without source and destination: {ins}"
        );
        sources.extend(paths[..paths.len() - 1].iter().map(|s| s.to_string()));
    }
    sources
}

/// `.dockerignore` exclusions of a top-level path (the patterns used there: `dir/`,
/// `**/x`, globs are not needed for the copied paths).
fn ignored(patterns: &[String], path: &str) -> bool {
    let first = path
        .trim_start_matches("./")
        .split('/')
        .next()
        .unwrap_or("");
    let mut excluded = false;
    for p in patterns {
        let (neg, pat) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        let pat = pat.trim_end_matches('/');
        if pat == first || pat == path.trim_end_matches('/') {
            excluded = !neg;
        }
    }
    excluded
}

#[test]
fn every_copied_file_exists_and_is_in_the_context() {
    let dockerfile = read("deploy/Dockerfile");
    let sources = context_sources(&dockerfile);
    for want in ["Cargo.lock", "src", "deploy/install-conf"] {
        assert!(
            sources.iter().any(|s| s == want),
            "{want} not copied: {sources:?}"
        );
    }
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    for s in &sources {
        assert!(
            !s.contains(['*', '?']),
            "glob in COPY source {s}: list files"
        );
        let p = repo().join(s);
        assert!(
            p.exists(),
            "deploy/Dockerfile copies {s}, missing in the repository"
        );
        assert!(
            !ignored(&patterns, s),
            "{s} is copied but excluded by .dockerignore"
        );
    }
    // The helper is a script the image runs directly.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(repo().join("deploy/install-conf"))
        .expect("install-conf")
        .permissions()
        .mode();
    assert_ne!(mode & 0o111, 0, "deploy/install-conf is not executable");
    assert!(read("deploy/install-conf").contains("flanneld install-conf \"$@\""));
}

#[test]
fn build_context_excludes_build_output_and_history() {
    let patterns: Vec<String> = read(".dockerignore").lines().map(String::from).collect();
    for p in ["target/", ".git/", "fuzz/"] {
        assert!(patterns.iter().any(|l| l == p), ".dockerignore lacks {p}");
    }
    assert!(ignored(&patterns, "target/debug/flanneld"));
    assert!(!ignored(&patterns, "src/main.rs"));
}

#[test]
fn base_images_are_pinned_and_both_platforms_build() {
    let dockerfile = read("deploy/Dockerfile");
    let froms: Vec<String> = instructions(&dockerfile)
        .into_iter()
        .filter(|i| i.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    for f in &froms {
        let image = f
            .split_whitespace()
            .find(|w| w.contains('@'))
            .unwrap_or_else(|| panic!("not pinned by digest: {f}"));
        let digest = image.split_once("@sha256:").map(|x| x.1).unwrap_or("");
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{image}"
        );
    }
    for arch in ["amd64)", "arm64)", "TARGETARCH", "--target"] {
        assert!(dockerfile.contains(arch), "Dockerfile lacks {arch}");
    }
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"));
    assert!(
        dockerfile.contains("/opt/bin/flanneld") && dockerfile.contains("/opt/bin/install-conf")
    );
}

#[test]
fn manifest_is_least_privilege_with_dev_net_tun() {
    let m = read("deploy/kube-flannel.yml");
    assert!(!m.contains("privileged: true"));
    assert!(m.contains("privileged: false"));
    assert!(m.contains(r#"add: ["NET_ADMIN", "NET_RAW"]"#));
    assert!(m.contains("mountPath: /dev/net/tun"));
    assert!(m.contains("path: /dev/net/tun\n            type: CharDevice"));
    // install-cni runs our image's /opt/bin/install-conf, like upstream's chart.
    let init = m
        .split("- name: install-cni\n")
        .nth(1)
        .expect("install-cni init container");
    let image = init.lines().next().unwrap_or("");
    assert!(image.contains("flannel-rs/flanneld"), "{image}");
    assert!(Path::new(&repo().join("deploy/install-conf")).exists());
}

#[test]
fn parser_sees_continuations_and_skips_stage_copies() {
    let df = "FROM x@sha256:00 AS b\n# COPY nothing here\nCOPY a \\\n  b ./\nCOPY --from=b /out /opt\nCOPY --chmod=0755 c /d\n";
    assert_eq!(context_sources(df), ["a", "b", "c"]);
}
