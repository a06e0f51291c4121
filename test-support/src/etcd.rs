//! A private etcd server for tests: the real `etcd` binary on 127.0.0.1 with free client and
//! peer ports and its own data directory, stopped by PID and removed on drop. It can be
//! stopped and restarted on the same ports and data, to test outages.
//!
//! When etcd is not installed, [`EtcdServer::start`] returns `None` after printing how to get it, unless
//! `CI=true` (then it panics). The binary is `$ETCD_BIN`, else `/usr/bin/etcd`, else `etcd`
//! on `PATH`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer `/health` after starting.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long etcd may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running (or stopped) private etcd; see the module docs.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    dir: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Extra etcd flags.
    args: Vec<String>,
    /// With TLS: (certificate, key, CA) PEM files and the plain-HTTP port of `/health`.
    tls: Option<(PathBuf, PathBuf, PathBuf, u16)>,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts a fresh etcd; `tag` names its directory. `None`: etcd is not installed (and CI
    /// is not "true").
    pub fn start(tag: &str) -> Option<EtcdServer> {
        EtcdServer::start_with(tag, &[])
    }

    /// [`EtcdServer::start`] with extra etcd flags.
    pub fn start_with(tag: &str, args: &[&str]) -> Option<EtcdServer> {
        EtcdServer::start_inner(tag, args, None)
    }

    /// An etcd serving clients over TLS only (`https://`) with the server certificate `cert`
    /// and `key`, requiring client certificates signed by `ca`.
    pub fn start_tls(tag: &str, cert: &Path, key: &Path, ca: &Path) -> Option<EtcdServer> {
        let files = (cert.to_owned(), key.to_owned(), ca.to_owned());
        EtcdServer::start_inner(tag, &[], Some(files))
    }

    fn start_inner(
        tag: &str,
        args: &[&str],
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Option<EtcdServer> {
        let Some(binary) = find_etcd() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("etcd is not installed but CI=true: install etcd-server (/usr/bin/etcd)");
            }
            eprintln!(
                "skipping: etcd not found (install the Debian package etcd-server, or set ETCD_BIN)"
            );
            return None;
        };
        let mut last_error = String::new();
        // A free port can be taken by someone else before etcd binds it: retry with new ones.
        for _ in 0..3 {
            let mut server = EtcdServer {
                binary: binary.clone(),
                dir: unique_dir(tag),
                name: format!("flannel-rs-{tag}"),
                client_port: free_port(),
                peer_port: free_port(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                tls: tls
                    .clone()
                    .map(|(cert, key, ca)| (cert, key, ca, free_port())),
                child: None,
            };
            if let Err(e) = std::fs::create_dir_all(server.data_dir()) {
                panic!("cannot create {}: {e}", server.dir.display());
            }
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => last_error = e,
            }
            // Drop stops it and removes the directory.
        }
        panic!("etcd did not start: {last_error}");
    }

    /// `http://127.0.0.1:<client port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Runs `etcdctl --endpoints <this server> ARGS` (API v3, ETCDCTL_* from the environment
    /// removed) and returns its stdout; panics when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let endpoint = self.endpoint();
        let inherited: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("ETCDCTL_"))
            .collect();
        let mut argv: Vec<&str> = inherited.iter().flat_map(|k| ["-u", k.as_str()]).collect();
        argv.extend(["ETCDCTL_API=3", "etcdctl", "--endpoints", &endpoint]);
        argv.extend(args);
        crate::run("env", &argv)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The PID of the running etcd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops etcd (SIGTERM by PID, SIGKILL after [`STOP_TIMEOUT`]); data is kept.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // By PID, never by name.
            let _ = Command::new("kill")
                .args(["-s", "TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("etcd did not restart: {e}");
        }
    }

    /// Stops etcd, deletes its data and starts an empty one on the same ports (a restore
    /// from an old backup, as clients see it: the revision goes backwards).
    pub fn wipe_and_restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.data_dir());
        if let Err(e) = std::fs::create_dir_all(self.data_dir()) {
            panic!("cannot recreate {}: {e}", self.data_dir().display());
        }
        if let Err(e) = self.spawn() {
            panic!("etcd did not start after wiping: {e}");
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("log file: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.binary);
        // The environment may carry ETCD_* settings meant for another etcd.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.name))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.name)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut health_port = self.client_port;
        if let Some((cert, key, ca, metrics_port)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth")
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{metrics_port}"));
            health_port = *metrics_port;
        }
        let child = cmd.spawn().map_err(|e| format!("spawn etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                self.child = None;
                return Err(format!("etcd exited; log:\n{}", self.log_tail()));
            }
            if healthy(health_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_etcd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let default = Path::new("/usr/bin/etcd");
    if default.exists() {
        return Some(default.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

fn unique_dir(tag: &str) -> PathBuf {
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).expect("random");
    std::env::temp_dir().join(format!(
        "flannel-rs-etcd-{tag}-{:016x}",
        u64::from_le_bytes(n)
    ))
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// True when etcd's `/health` answers `"health":"true"`.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
