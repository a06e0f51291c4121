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

/// `flanneld --version` (the image's binary): `flanneld v<version> (<commit>)` on stderr, the
/// commit being this checkout's when git can tell.
#[test]
fn version_line_names_version_and_commit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flanneld"))
        .arg("--version")
        .output()
        .expect("flanneld --version");
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let want_prefix = format!("flanneld v{} (", env!("CARGO_PKG_VERSION"));
    let commit = line
        .strip_prefix(&want_prefix)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected version line {line:?}"));
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match head {
        Some(h) => assert_eq!(commit, h),
        None => assert_eq!(commit, "unknown"),
    }
}

/// `flanneld install-conf <src> <dest>` as the install-cni init container runs it.
#[test]
fn install_conf_subcommand_installs_the_cni_config() {
    let dir = std::env::temp_dir().join(format!("flannel-rs-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("cni-conf.json");
    let dest = dir.join("10-flannel.conflist");
    std::fs::write(&src, "{\"name\":\"cbr0\",\"cniVersion\":\"0.3.1\"}\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_flanneld");
    let ok = std::process::Command::new(bin)
        .arg("install-conf")
        .args([&src, &dest])
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
    let usage = std::process::Command::new(bin)
        .args(["install-conf", "only-one"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: flanneld install-conf"));
    std::fs::remove_dir_all(&dir).unwrap();
}
