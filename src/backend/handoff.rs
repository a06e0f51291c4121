//! Handing the userspace data plane from a running flanneld to its successor without
//! dropping a packet.
//!
//! The serving process listens on `<run dir>/<device>.handoff.sock` (mode 0600, same user
//! only). A new flanneld for the same device connects before opening anything and receives
//! the TUN descriptor and the UDP socket (`SCM_RIGHTS`): the same open files, so packets
//! queued in either stay queued whoever reads them. Both processes forward for a while; the
//! successor starts reading only once it has its peer table, then says `serving`, and the
//! predecessor stops reading (finishing the packets it holds) and answers `released`. The
//! predecessor then has no data plane and waits to be stopped (Kubernetes sends SIGTERM once
//! the new pod is ready); the successor listens for the next upgrade.
//!
//! Protocol, one line each way: `flannel-rs-handoff 2 <device>` → `fds <pid> <tuns> <socks>`
//! (with that many TUN queue descriptors, then socket descriptors) or `refused <reason>`;
//! `serving` → `released`. Version 1 (before multi-queue) is spoken with either side of an
//! older version: its greeting gets `fds <pid>` with the first queue and socket only (the
//! others close with the predecessor), and a successor whose version-2 greeting is refused
//! asks again with version 1.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::backend::userspace::{Handover, Inherited};
use crate::io::handoff::{effective_uid, peer_uid, recv_with_fds, send_with_fds};

/// Protocol greeting (with its version).
const HELLO: &str = "flannel-rs-handoff 2";
/// The greeting of version 1: one TUN descriptor and one socket.
const HELLO_V1: &str = "flannel-rs-handoff 1";
/// How long a successor may take from receiving the descriptors to serving (it needs the
/// store's first snapshot); after that the predecessor keeps the data plane.
const SERVING_WITHIN: Duration = Duration::from_secs(120);
/// Limit for the short exchanges (greeting, reply, release).
const STEP: Duration = Duration::from_secs(5);
/// Longest line either side sends.
const MAX_LINE: usize = 256;

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The running flanneld declined.
    #[error("the running flanneld refused the handover: {0}")]
    Refused(String),
    /// The other side said something unexpected.
    #[error("handover protocol: {0}")]
    Protocol(String),
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> HandoffError {
    move |source| HandoffError::Io { context, source }
}

/// Where the serving flanneld for `device` listens.
pub fn socket_path(run_dir: &Path, device: &str) -> PathBuf {
    run_dir.join(format!("{device}.handoff.sock"))
}

/// Reads one line (without the newline), keeping any descriptors that come with it. Waits
/// until `deadline`, checking `stop` every 200 ms.
fn read_line(
    stream: &UnixStream,
    fds: &mut Vec<OwnedFd>,
    deadline: Instant,
    stop: Option<&AtomicBool>,
) -> io::Result<String> {
    let mut line = Vec::new();
    let mut buf = [0u8; MAX_LINE];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
        }
        stream.set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
        let (n, got) = match recv_with_fds(stream, &mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        fds.extend(got);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other side closed the connection",
            ));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
    }
}

/// A predecessor that handed us its descriptors and still forwards until told we serve.
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    pid: u32,
}

/// Asks the flanneld serving `device` (if one listens at `path`) for its descriptors.
/// `Ok(None)`: nobody listens (first start, or the previous process is gone).
pub fn connect(
    path: &Path,
    device: &str,
) -> Result<Option<(Predecessor, Inherited)>, HandoffError> {
    match connect_with(path, device, HELLO) {
        // A predecessor before version 2 refuses the greeting: ask as version 1.
        Err(HandoffError::Refused(why)) if why.contains("unknown greeting") => {
            connect_with(path, device, HELLO_V1)
        }
        r => r,
    }
}

fn connect_with(
    path: &Path,
    device: &str,
    hello: &str,
) -> Result<Option<(Predecessor, Inherited)>, HandoffError> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_err("connect to the running flanneld")(e)),
    };
    let uid = peer_uid(&stream).map_err(io_err("read the peer's credentials"))?;
    if uid != effective_uid() {
        return Err(HandoffError::Refused(format!(
            "{} is served by uid {uid}, not us",
            path.display()
        )));
    }
    stream
        .set_write_timeout(Some(STEP))
        .map_err(io_err("set a timeout"))?;
    stream
        .write_all(format!("{hello} {device}\n").as_bytes())
        .map_err(io_err("send the greeting"))?;
    let mut fds = Vec::new();
    let line = read_line(&stream, &mut fds, Instant::now() + STEP, None)
        .map_err(io_err("read the reply"))?;
    if let Some(reason) = line.strip_prefix("refused ") {
        return Err(HandoffError::Refused(reason.to_owned()));
    }
    let bad = || HandoffError::Protocol(format!("unexpected reply {line:?}"));
    let words: Vec<u32> = line
        .strip_prefix("fds ")
        .ok_or_else(bad)?
        .split_whitespace()
        .map(|w| w.parse::<u32>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (pid, tuns, socks) = match words[..] {
        [pid] => (pid, 1, 1),
        [pid, t, s] if t >= 1 && s >= 1 => (pid, t as usize, s as usize),
        _ => return Err(bad()),
    };
    if fds.len() != tuns + socks {
        return Err(HandoffError::Protocol(format!(
            "expected {tuns} + {socks} descriptors, got {}",
            fds.len()
        )));
    }
    let socks = fds.split_off(tuns);
    Ok(Some((
        Predecessor { stream, pid },
        Inherited { tuns: fds, socks },
    )))
}

impl Predecessor {
    /// The predecessor's process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the predecessor we serve and waits until it stopped reading. Blocks up to a few
    /// seconds: run it off the async runtime.
    pub fn finish(mut self) -> Result<u32, HandoffError> {
        self.stream
            .write_all(b"serving\n")
            .map_err(io_err("tell the predecessor we serve"))?;
        let line = read_line(&self.stream, &mut Vec::new(), Instant::now() + STEP, None)
            .map_err(io_err("wait for the predecessor to release"))?;
        if line != "released" {
            return Err(HandoffError::Protocol(format!("unexpected reply {line:?}")));
        }
        Ok(self.pid)
    }
}

/// Serves handover requests for our data plane until closed or until it handed over.
#[derive(Debug)]
pub struct Listener {
    path: PathBuf,
    /// (device, inode) of the socket file we created, so we only remove our own.
    ident: (u64, u64),
    stop: Arc<AtomicBool>,
    released: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `path` (atomically replacing a predecessor's socket file) and answers
    /// successors on a thread.
    pub fn spawn(path: &Path, device: &str, handover: Handover) -> io::Result<Listener> {
        let tmp = path.with_extension(format!("sock.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let released = Arc::new(AtomicBool::new(false));
        let (s, r, dev) = (stop.clone(), released.clone(), device.to_owned());
        let thread = std::thread::Builder::new()
            .name("handoff".into())
            .spawn(move || accept_loop(&listener, &dev, &handover, &s, &r))?;
        Ok(Listener {
            path: path.to_owned(),
            ident: (meta.dev(), meta.ino()),
            stop,
            released,
            thread: Some(thread),
        })
    }

    /// Whether the data plane was handed to a successor.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Stops answering and removes the socket file if it is still ours.
    pub fn close(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn accept_loop(
    listener: &UnixListener,
    device: &str,
    handover: &Handover,
    stop: &AtomicBool,
    released: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                warn!(error = %e, "handover socket: accept failed");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        match serve_one(stream, device, handover, stop) {
            Ok(Some(pid)) => {
                released.store(true, Ordering::SeqCst);
                info!(
                    successor = pid,
                    %device,
                    "handed the data plane over; no longer forwarding, exiting on SIGTERM"
                );
                return;
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "handover to a successor failed; still forwarding"),
        }
    }
}

/// One successor's conversation; `Some(pid)` once it serves and we released.
fn serve_one(
    mut stream: UnixStream,
    device: &str,
    handover: &Handover,
    stop: &AtomicBool,
) -> Result<Option<u32>, HandoffError> {
    stream
        .set_nonblocking(false)
        .map_err(io_err("configure the connection"))?;
    stream
        .set_write_timeout(Some(STEP))
        .map_err(io_err("configure the connection"))?;
    let uid = peer_uid(&stream).map_err(io_err("read the peer's credentials"))?;
    if uid != effective_uid() {
        return Err(HandoffError::Refused(format!("connection from uid {uid}")));
    }
    let hello = read_line(&stream, &mut Vec::new(), Instant::now() + STEP, Some(stop))
        .map_err(io_err("read the greeting"))?;
    let v1 = hello == format!("{HELLO_V1} {device}");
    if !v1 && hello != format!("{HELLO} {device}") {
        let _ = stream.write_all(b"refused unknown greeting or another device\n");
        return Err(HandoffError::Protocol(format!("greeting {hello:?}")));
    }
    let Some((mut tuns, mut socks)) = handover.fds() else {
        let _ = stream.write_all(b"refused no socket to hand over\n");
        return Ok(None);
    };
    let msg = if v1 {
        // An older successor takes one queue and one socket; the other sockets close with
        // us (what they hold then is lost), the other queues are detached now.
        handover.keep_one_queue();
        tuns.truncate(1);
        socks.truncate(1);
        format!("fds {}\n", std::process::id())
    } else {
        format!(
            "fds {} {} {}\n",
            std::process::id(),
            tuns.len(),
            socks.len()
        )
    };
    tuns.extend(socks);
    send_with_fds(&stream, msg.as_bytes(), &tuns).map_err(io_err("send the descriptors"))?;
    let line = read_line(
        &stream,
        &mut Vec::new(),
        Instant::now() + SERVING_WITHIN,
        Some(stop),
    )
    .map_err(io_err("wait for the successor to serve"))?;
    if line != "serving" {
        return Err(HandoffError::Protocol(format!("unexpected {line:?}")));
    }
    if !handover.release(STEP) {
        warn!("a packet thread did not stop in time");
    }
    stream
        .write_all(b"released\n")
        .map_err(io_err("confirm the release"))?;
    Ok(Some(peer_pid(&stream)))
}

/// The process at the other end of `stream`, for messages (0 if unknown).
fn peer_pid(stream: &UnixStream) -> u32 {
    crate::io::handoff::peer_pid(stream).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("frs-handoff-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn nobody_listening_means_no_predecessor() {
        let dir = temp_dir("none");
        let path = socket_path(&dir, "flannel.1");
        assert!(matches!(connect(&path, "flannel.1"), Ok(None)));
        // A stale socket file whose process is gone: connection refused, same answer.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        assert!(matches!(connect(&path, "flannel.1"), Ok(None)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake predecessor: checks the greeting, then answers `reply` (without descriptors).
    fn fake_predecessor(path: &Path, reply: &'static [u8]) -> JoinHandle<String> {
        let l = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).expect("read");
            s.write_all(reply).expect("reply");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    }

    #[test]
    fn a_refusal_and_a_reply_without_descriptors_are_errors() {
        let dir = temp_dir("refuse");
        let path = socket_path(&dir, "flannel.1");
        let t = fake_predecessor(&path, b"refused busy\n");
        let r = connect(&path, "flannel.1");
        assert!(
            matches!(&r, Err(HandoffError::Refused(why)) if why == "busy"),
            "{r:?}"
        );
        assert_eq!(
            t.join().expect("thread"),
            "flannel-rs-handoff 2 flannel.1\n"
        );

        std::fs::remove_file(&path).expect("rm");
        let t = fake_predecessor(&path, b"fds 42\n");
        let r = connect(&path, "flannel.1");
        assert!(matches!(&r, Err(HandoffError::Protocol(_))), "{r:?}");
        t.join().expect("thread");

        std::fs::remove_file(&path).expect("rm");
        let t = fake_predecessor(&path, b"hello there\n");
        let r = connect(&path, "flannel.1");
        assert!(matches!(&r, Err(HandoffError::Protocol(_))), "{r:?}");
        t.join().expect("thread");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake predecessor answering each of `replies` on its own connection, with `fds`
    /// descriptors (of /dev/null) attached; returns the greetings it read.
    fn fake_with_fds(path: &Path, replies: Vec<(&'static str, usize)>) -> JoinHandle<Vec<String>> {
        let l = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let mut greetings = Vec::new();
            for (reply, n) in replies {
                let (mut s, _) = l.accept().expect("accept");
                let mut buf = [0u8; 64];
                let got = s.read(&mut buf).expect("read");
                greetings.push(String::from_utf8_lossy(&buf[..got]).into_owned());
                let files: Vec<std::fs::File> = (0..n)
                    .map(|_| std::fs::File::open("/dev/null").expect("/dev/null"))
                    .collect();
                let fds: Vec<_> = files.iter().map(std::os::fd::AsFd::as_fd).collect();
                send_with_fds(&s, reply.as_bytes(), &fds).expect("reply");
            }
            greetings
        })
    }

    #[test]
    fn queues_and_sockets_are_split_as_counted() {
        let dir = temp_dir("queues");
        let path = socket_path(&dir, "flannel.1");
        let t = fake_with_fds(&path, vec![("fds 42 2 3\n", 5)]);
        let (pred, inh) = connect(&path, "flannel.1").expect("connect").expect("some");
        assert_eq!((pred.pid(), inh.tuns.len(), inh.socks.len()), (42, 2, 3));
        t.join().expect("thread");

        std::fs::remove_file(&path).expect("rm");
        let t = fake_with_fds(&path, vec![("fds 42 2 3\n", 4)]);
        let r = connect(&path, "flannel.1");
        assert!(matches!(&r, Err(HandoffError::Protocol(_))), "{r:?}");
        t.join().expect("thread");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A predecessor from before multi-queue refuses the version-2 greeting; the successor
    /// asks again as version 1 and gets one queue and one socket.
    #[test]
    fn an_older_predecessor_is_asked_again_as_version_1() {
        let dir = temp_dir("v1");
        let path = socket_path(&dir, "flannel.1");
        let t = fake_with_fds(
            &path,
            vec![
                ("refused unknown greeting or another device\n", 0),
                ("fds 42\n", 2),
            ],
        );
        let (pred, inh) = connect(&path, "flannel.1").expect("connect").expect("some");
        assert_eq!((pred.pid(), inh.tuns.len(), inh.socks.len()), (42, 1, 1));
        assert_eq!(
            t.join().expect("thread"),
            [
                "flannel-rs-handoff 2 flannel.1\n",
                "flannel-rs-handoff 1 flannel.1\n"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
