//! The committed etcd v3 API code (src/lease/etcd/proto/*.rs) is exactly what
//! `scripts/gen-etcd-proto` generates from tools/etcd-proto-gen/proto/*.proto, so nobody edits
//! it by hand and a .proto change cannot be forgotten.
//!
//! Needs `protoc` (the generator's, not the build's). Without it the test is skipped with a
//! message, except with `CI=true`, where it fails (`scripts/install-deps.sh` installs
//! protobuf-compiler for it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `.rs` files of a directory, sorted by name.
fn rust_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").file_name())
        .filter_map(|n| n.into_string().ok())
        .filter(|n| n.ends_with(".rs"))
        .collect();
    names.sort();
    names
}

#[test]
fn committed_etcd_api_code_matches_the_generator() {
    let protoc = std::env::var("PROTOC").unwrap_or_else(|_| "protoc".to_owned());
    if Command::new(&protoc).arg("--version").output().is_err() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{protoc} not found but CI=true: install protobuf-compiler (scripts/install-deps.sh does)");
        }
        eprintln!(
            "skipping: {protoc} not found; install protobuf-compiler to check the committed etcd API code"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let out = TempDir(std::env::temp_dir().join(format!(
        "flannel-rs-etcd-proto-{}-{nanos}",
        std::process::id()
    )));
    let status = Command::new(root.join("scripts/gen-etcd-proto"))
        .arg("--out")
        .arg(&out.0)
        .status()
        .expect("run scripts/gen-etcd-proto");
    assert!(status.success(), "scripts/gen-etcd-proto failed: {status}");

    let committed_dir = root.join("src/lease/etcd/proto");
    let generated = rust_files(&out.0);
    assert_eq!(
        generated,
        vec!["etcdserverpb.rs".to_owned(), "mvccpb.rs".to_owned()],
        "the generator's files"
    );
    assert_eq!(
        rust_files(&committed_dir),
        generated,
        "src/lease/etcd/proto/ holds exactly the generated files"
    );
    for name in &generated {
        let want = std::fs::read_to_string(out.0.join(name)).expect("read generated");
        let have = std::fs::read_to_string(committed_dir.join(name)).expect("read committed");
        if want != have {
            let line = want
                .lines()
                .zip(have.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| want.lines().count().min(have.lines().count()));
            panic!(
                "src/lease/etcd/proto/{name} differs from the generator's output from line {}: \
                 run scripts/gen-etcd-proto and commit the result",
                line + 1
            );
        }
    }
}
