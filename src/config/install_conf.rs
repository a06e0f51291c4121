//! `flanneld install-conf <src> <dest>`: what upstream's `/opt/bin/install-conf` does for the
//! `install-cni` init container of flannel's manifest and Helm chart. The file is written to
//! `.<name>.tmp` next to `dest`, synced, then renamed over `dest`, so the kubelet never reads
//! a half-written CNI config.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Copies `src` to `dest` atomically (mode 0644, like the upstream helper's copy).
pub fn install(src: &Path, dest: &Path) -> io::Result<()> {
    let data = fs::read(src)?;
    let name = dest.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name")
    })?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "flannel-rs-install-conf-{tag}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replaces_destination_and_leaves_no_temp_file() {
        let d = dir("ok");
        let src = d.join("cni-conf.json");
        let dest = d.join("10-flannel.conflist");
        fs::write(&src, b"{\"name\":\"cbr0\"}").unwrap();
        fs::write(&dest, b"stale").unwrap();
        install(&src, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"{\"name\":\"cbr0\"}");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_source_or_directory_fails_without_touching_dest() {
        let d = dir("err");
        let dest = d.join("10-flannel.conflist");
        fs::write(&dest, b"keep").unwrap();
        assert!(install(&d.join("absent.json"), &dest).is_err());
        assert_eq!(fs::read(&dest).unwrap(), b"keep");
        let src = d.join("cni-conf.json");
        fs::write(&src, b"{}").unwrap();
        assert!(install(&src, &d.join("no-such-dir/10-flannel.conflist")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
