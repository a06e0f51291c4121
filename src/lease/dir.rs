//! A lease store in a local directory (`--lease-dir DIR`), for labs, tests and small clusters on
//! shared storage: no etcd, same data model.
//!
//! Layout: `DIR/config` holds the network config JSON; `DIR/subnets/<key>` holds one lease whose
//! name is the etcd key segment (`10.244.1.0-24`, `10.244.1.0-24&fd00:1::-64`) and whose
//! contents are exactly upstream's etcd value. Several daemons may share one DIR.
//!
//! Acquisition is flannel's etcd algorithm (compat §6.3): reuse the lease carrying our public
//! IP if it fits the config (else delete it), else the previous subnet from subnet.env if free
//! and compatible, else a random free subnet among the first 100 between SubnetMin and
//! SubnetMax. Creation is exclusive — the lease is written to a temporary file and hard-linked
//! to its final name, which fails if the name exists — so two daemons starting at once never
//! own the same IPv4 subnet; the loser retries (10 attempts, then upstream's "max retries"
//! error). Reuse rewrites the file atomically (temporary file + rename).
//!
//! No TTL: there is no server to expire keys, and wall-clock expiry checked by each reader
//! would let a paused node lose its subnet to a newcomer while its pods still use it. A dead
//! node's lease stays until an operator deletes its file; a restarting node gets the same
//! subnet back through its public IP. Leases therefore carry `expiration: None`.
//!
//! Watching polls the directory (every 200 ms by default) and sends a full snapshot whenever a
//! file appeared, vanished or changed. A file that is not a valid lease is skipped with one
//! warning naming it per distinct content, counted in [`DirStore::corrupt_files`]; it still
//! blocks its subnet from allocation. Only regular files named like subnet keys are read, never
//! through a symbolic link and at most [`MAX_LEASE_FILE`] bytes (a FIFO or a link to
//! `/dev/zero` must not block or exhaust the daemon).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::alloc::{alloc_ranges, plan_acquisition, Plan, RACE_RETRIES};
use super::store::{LeaseStore, StoreError, WatchUpdate};
use super::{Lease, LeaseAttrs, SubnetKey};
use crate::config::netconf::NetConfig;
use crate::config::subnet_env::{temp_path, write_file_atomic, PreviousSubnets};

/// Default watch poll interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The directory lease store; see the module docs.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
    poll: Duration,
    corrupt: Arc<AtomicU64>,
}

/// One file in `DIR/subnets`.
#[derive(Debug)]
struct Entry {
    name: String,
    /// The file's bytes, or why it was not read (see [`read_entries`]).
    content: Result<Vec<u8>, String>,
}

impl DirStore {
    /// A store rooted at `dir` (created on first acquisition).
    pub fn new(dir: impl Into<PathBuf>) -> DirStore {
        DirStore {
            dir: dir.into(),
            poll: DEFAULT_POLL_INTERVAL,
            corrupt: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Changes the watch poll interval.
    pub fn with_poll_interval(mut self, poll: Duration) -> DirStore {
        self.poll = poll;
        self
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/subnets`.
    pub fn subnets_dir(&self) -> PathBuf {
        self.dir.join("subnets")
    }

    /// `DIR/config`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// How many corrupt lease files (counting each distinct content once) watches have seen.
    pub fn corrupt_files(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// Reads the network config JSON.
    pub fn network_config_blocking(&self) -> Result<String, StoreError> {
        let path = self.config_path();
        fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                StoreError::ConfigNotFound(path.display().to_string())
            } else {
                StoreError::Io { path, source }
            }
        })
    }

    /// The valid leases currently in the directory (corrupt files skipped, not counted).
    pub fn list(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(read_entries(&self.subnets_dir())?
            .iter()
            .filter_map(|e| decode(e).ok())
            .collect())
    }

    /// [`LeaseStore::acquire`], synchronously (it only touches local files).
    pub fn acquire_blocking(
        &self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: &PreviousSubnets,
    ) -> Result<Lease, StoreError> {
        let ranges = alloc_ranges(config, "directory")?;
        let subnets = self.subnets_dir();
        fs::create_dir_all(&subnets).map_err(|source| StoreError::Io {
            path: subnets.clone(),
            source,
        })?;
        let lease_for = |key: SubnetKey| Lease::at_key(key, attrs.clone(), None);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };

        for _ in 0..RACE_RETRIES {
            let entries = read_entries(&subnets)?;
            let keys: Vec<SubnetKey> = entries
                .iter()
                .filter_map(|e| canonical_key(&e.name).ok())
                .collect();
            let leases: Vec<Lease> = entries.iter().filter_map(|e| decode(e).ok()).collect();
            let key = match plan_acquisition(&ranges, &keys, &leases, attrs, previous)? {
                Plan::Reuse(key) => {
                    let path = subnets.join(key.to_string());
                    write_file_atomic(&path, attrs.to_json().as_bytes(), 0o644)
                        .map_err(io_err(&path))?;
                    return Ok(lease_for(key));
                }
                Plan::Create { key, stale } => {
                    if let Some(stale) = stale {
                        let path = subnets.join(stale.to_string());
                        match fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(StoreError::Io { path, source: e }),
                        }
                    }
                    key
                }
            };

            let path = subnets.join(key.to_string());
            match create_exclusive(&path, attrs.to_json().as_bytes()) {
                Ok(()) => {
                    tracing::info!(lease = %key, public_ip = %attrs.public_ip, "allocated lease");
                    return Ok(lease_for(key));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    tracing::debug!(lease = %key, "lost the race for a subnet, retrying");
                }
                Err(source) => return Err(StoreError::Io { path, source }),
            }
        }
        Err(StoreError::MaxRetries)
    }
}

/// Writes `bytes` to a new file at `path`, failing with `AlreadyExists` if it exists. Readers
/// never see a partial file: the contents are complete before the name appears.
fn create_exclusive(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Largest lease file read: a lease is a few hundred bytes; anything bigger is not one.
pub const MAX_LEASE_FILE: u64 = 64 * 1024;

/// The entries in `dir` that may be leases (hidden temporaries and subdirectories skipped).
/// Only regular files whose names are subnet keys are read, without following symbolic
/// links and at most [`MAX_LEASE_FILE`] bytes: anything else becomes an entry with the reason
/// it was not read, so a FIFO, a link to `/dev/zero` or a huge file never blocks the scan or
/// exhausts memory. A missing directory is empty.
fn read_entries(dir: &Path) -> Result<Vec<Entry>, StoreError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for item in rd {
        let item = item.map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let name = item.file_name().to_string_lossy().into_owned();
        // `file_type` comes from the directory entry (lstat): links are not followed.
        let file_type = item.file_type().ok();
        if name.starts_with('.') || file_type.is_some_and(|t| t.is_dir()) {
            continue;
        }
        let content = if let Err(reason) = canonical_key(&name) {
            Err(reason)
        } else if let Some(kind) = file_type.and_then(non_regular_kind) {
            Err(format!("{kind}, not a regular file"))
        } else {
            match read_lease_file(&item.path()) {
                Ok(c) => c,
                // Deleted between listing and reading.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => Err(format!("cannot read it: {e}")),
            }
        };
        out.push(Entry { name, content });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What a non-regular directory entry is, for the log.
fn non_regular_kind(t: fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        None
    } else if t.is_symlink() {
        Some("a symbolic link")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// Reads one lease file: `O_NOFOLLOW` (a link swapped in after the listing is refused),
/// `O_NONBLOCK` (a FIFO swapped in does not block the open), then checked to be a regular file
/// of at most [`MAX_LEASE_FILE`] bytes and read through a bounded reader. `Ok(Err(reason))`
/// for a file that is not a lease file; `Err` for OS errors.
fn read_lease_file(path: &Path) -> io::Result<Result<Vec<u8>, String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Err("a symbolic link, not a regular file".into()))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if let Some(kind) = non_regular_kind(meta.file_type()) {
        return Ok(Err(format!("{kind}, not a regular file")));
    }
    if meta.len() > MAX_LEASE_FILE {
        return Ok(Err(format!(
            "{} bytes, larger than the {MAX_LEASE_FILE}-byte limit",
            meta.len()
        )));
    }
    let mut content = Vec::new();
    file.take(MAX_LEASE_FILE + 1).read_to_end(&mut content)?;
    if content.len() as u64 > MAX_LEASE_FILE {
        return Ok(Err(format!("larger than the {MAX_LEASE_FILE}-byte limit")));
    }
    Ok(Ok(content))
}

/// A lease file's bytes or why it was not read.
type Content = Result<Vec<u8>, String>;

/// A file name that is exactly a subnet key.
fn canonical_key(name: &str) -> Result<SubnetKey, String> {
    let key: SubnetKey = name.parse().map_err(|e: super::LeaseError| e.to_string())?;
    if key.to_string() == name {
        Ok(key)
    } else {
        Err(format!(
            "file name {name:?} is not a canonical subnet key (want {key})"
        ))
    }
}

/// The lease in one file, or why it is not one.
fn decode(e: &Entry) -> Result<Lease, String> {
    canonical_key(&e.name)?;
    let content = e.content.as_ref().map_err(Clone::clone)?;
    let text = std::str::from_utf8(content).map_err(|_| "not UTF-8".to_owned())?;
    Lease::from_kv(&e.name, text).map_err(|err| err.to_string())
}

impl DirStore {
    /// Decodes a scan, warning once per (file, content) about corrupt files.
    fn decode_all(&self, entries: &[Entry], warned: &mut HashMap<String, Content>) -> Vec<Lease> {
        let mut leases = Vec::new();
        let mut still_bad = HashMap::new();
        for e in entries {
            match decode(e) {
                Ok(lease) => leases.push(lease),
                Err(reason) => {
                    if warned.get(&e.name) != Some(&e.content) {
                        let path = self.subnets_dir().join(&e.name);
                        tracing::warn!(file = %path.display(), %reason, "skipping corrupt lease file");
                        self.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                    still_bad.insert(e.name.clone(), e.content.clone());
                }
            }
        }
        *warned = still_bad;
        leases
    }

    async fn watch_loop(&self, tx: mpsc::Sender<WatchUpdate>) -> Result<(), StoreError> {
        let mut last: Option<BTreeMap<String, Content>> = None;
        let mut warned = HashMap::new();
        let mut last_error: Option<String> = None;
        loop {
            let dir = self.subnets_dir();
            let scan = tokio::task::spawn_blocking(move || read_entries(&dir))
                .await
                .map_err(|e| StoreError::Unavailable {
                    store: "directory",
                    message: e.to_string(),
                })?;
            match scan {
                Ok(entries) => {
                    last_error = None;
                    let state: BTreeMap<String, Content> = entries
                        .iter()
                        .map(|e| (e.name.clone(), e.content.clone()))
                        .collect();
                    if last.as_ref() != Some(&state) {
                        let leases = self.decode_all(&entries, &mut warned);
                        if tx.send(WatchUpdate::Snapshot(leases)).await.is_err() {
                            return Ok(());
                        }
                        last = Some(state);
                    }
                }
                Err(e) => {
                    // Keep the last snapshot; say so once per distinct error.
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "cannot scan lease directory; retrying");
                        last_error = Some(text);
                    }
                }
            }
            tokio::select! {
                () = tx.closed() => return Ok(()),
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

impl LeaseStore for DirStore {
    fn name(&self) -> String {
        format!("directory lease store at {}", self.dir.display())
    }

    fn network_config(&self) -> BoxFuture<'_, Result<String, StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.network_config_blocking())
                .await
                .map_err(|e| StoreError::Unavailable {
                    store: "directory",
                    message: e.to_string(),
                })?
        })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a NetConfig,
        attrs: &'a LeaseAttrs,
        previous: &'a PreviousSubnets,
    ) -> BoxFuture<'a, Result<Lease, StoreError>> {
        let this = self.clone();
        let (config, attrs, previous) = (config.clone(), attrs.clone(), *previous);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.acquire_blocking(&config, &attrs, &previous))
                .await
                .map_err(|e| StoreError::Unavailable {
                    store: "directory",
                    message: e.to_string(),
                })?
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || DirStore::list(&this))
                .await
                .map_err(|e| StoreError::Unavailable {
                    store: "directory",
                    message: e.to_string(),
                })?
        })
    }

    fn watch(&self, tx: mpsc::Sender<WatchUpdate>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.watch_loop(tx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_only() {
        assert!(canonical_key("10.1.2.0-24").is_ok());
        assert!(canonical_key("10.1.2.0-24&fd00:1::-64").is_ok());
        assert!(canonical_key("x10.1.2.0-24").is_err());
        assert!(canonical_key("10.1.2.5-24").is_err());
        assert!(canonical_key("README").is_err());
    }
}
