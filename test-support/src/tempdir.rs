//! A scratch directory under the system temp dir, removed on drop (also when a test fails).

use std::path::PathBuf;

/// A scratch directory `flannel-rs-<tag>-<random>`, created empty and removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory; `tag` names the test that owns it.
    pub fn new(tag: &str) -> TempDir {
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).expect("random");
        let dir =
            std::env::temp_dir().join(format!("flannel-rs-{tag}-{:016x}", u64::from_le_bytes(n)));
        std::fs::create_dir_all(&dir).expect("mkdir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
