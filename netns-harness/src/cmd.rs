//! Running external commands (`ip`, `bridge`, `ethtool`, `ping`, `iperf3`, tshark) with hard
//! time limits, and the bookkeeping of long-lived processes the harness starts (flanneld,
//! responders, iperf3 servers, captures): PID plus kernel start time, so a PID that was reused by
//! an unrelated process is never signalled.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::sys::{self, Signal};

/// Default limit for short configuration commands (`ip`, `bridge`, `ethtool`, `sysctl`).
pub const SHORT: Duration = Duration::from_secs(15);

/// Renders a command line for error messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr. Fails if it cannot
/// start, runs longer than `timeout` (the child is killed), or a stop signal arrives.
/// A non-zero exit status is *not* an error here; see [`run_ok`].
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_inner(cmd, timeout, true, None)
}

/// [`run`] with `input` written to the command's stdin (from a helper thread, so a command
/// that writes before it reads cannot block on a full pipe), e.g. a CNI plugin's config.
pub fn run_input(cmd: &mut Command, input: Vec<u8>, timeout: Duration) -> Result<Output> {
    run_inner(cmd, timeout, true, Some(input))
}

fn run_inner(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
    input: Option<Vec<u8>>,
) -> Result<Output> {
    let line = display(cmd);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        std::thread::spawn(move || {
            use std::io::Write;
            // Dropping stdin afterwards closes the pipe: the command sees EOF.
            let _ = stdin.write_all(&input);
        });
    }
    let out_rx = child.stdout.take().map(reader);
    let err_rx = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(500);
    let status: ExitStatus = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` timed out after {timeout:?}");
        }
        if interruptible && sys::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            sys::check_interrupted()?;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // A grandchild could keep the pipes open; never wait for it longer than a moment.
    let grab = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok())
            .unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: grab(out_rx),
        stderr: grab(err_rx),
    })
}

/// Like [`run`] but ignores stop signals: used by teardown, which must finish.
pub fn run_uninterruptible(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_inner(cmd, timeout, false, None)
}

/// Like [`run`], and a non-zero exit status is an error carrying the command line and stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = display(cmd);
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip <args>` (use `-n <ns>` inside the args to target a namespace), must succeed.
pub fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), SHORT).map(|_| ())
}

/// `bridge <args>`, must succeed.
pub fn bridge(args: &[&str]) -> Result<()> {
    run_ok(Command::new("bridge").args(args), SHORT).map(|_| ())
}

/// A command that runs `args` inside namespace `ns` via `ip netns exec` (which execs, so the
/// spawned PID is the program's PID).
pub fn ns_command(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Runs `args` in `ns`, must succeed.
pub fn ns_ok(ns: &str, args: &[&str]) -> Result<Output> {
    run_ok(&mut ns_command(ns, args), SHORT)
}

/// Writes a sysctl inside a namespace.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    ns_ok(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")]).map(|_| ())
}

/// A long-lived process the harness started: enough to find it again from another harness
/// process (state file) without ever signalling a recycled PID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
    /// What it is, for messages ("flanneld n1", "serve n1p2", ...).
    pub what: String,
}

/// Reads `/proc/<pid>/stat`: (state letter, start time in ticks).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is index 0, field 22 (starttime) is index 19.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// utime + stime of `pid` in clock ticks ([`crate::sys::clock_ticks_per_sec`] per second).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

impl ProcRecord {
    /// Records a process just spawned.
    pub fn new(pid: u32, what: impl Into<String>) -> ProcRecord {
        ProcRecord {
            pid,
            start_ticks: proc_stat(pid).map(|(_, t)| t).unwrap_or(0),
            what: what.into(),
        }
    }

    /// True while this very process (same PID and start time) exists and is not a zombie.
    pub fn alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) => {
                start == self.start_ticks && self.start_ticks != 0 && !matches!(state, 'Z' | 'X')
            }
            None => false,
        }
    }
}

/// Spawns `args` inside `ns` as a long-lived process in its own process group (so a Ctrl-C at
/// the terminal reaches only the harness, which then stops it by PID), stdout and stderr
/// appended to `log`.
pub fn spawn_in_ns(ns: &str, args: &[&str], log: &Path, what: &str) -> Result<(Child, ProcRecord)> {
    spawn_in_ns_with(ns, args, log, what, |_| {})
}

/// [`spawn_in_ns`] with a hook to adjust the command first (environment variables).
pub fn spawn_in_ns_with(
    ns: &str,
    args: &[&str],
    log: &Path,
    what: &str,
    configure: impl FnOnce(&mut Command),
) -> Result<(Child, ProcRecord)> {
    let f = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log {}", log.display()))?;
    let f2 = f.try_clone()?;
    let mut cmd = ns_command(ns, args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(f2))
        .process_group(0);
    configure(&mut cmd);
    let line = display(&cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let rec = ProcRecord::new(child.id(), what);
    Ok((child, rec))
}

fn wait_gone(rec: &ProcRecord, child: &mut Option<Child>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let gone = match child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !rec.alive(),
        };
        if gone {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops a process the harness started: SIGTERM, up to 3 s grace, then SIGKILL and up to 2 s.
/// `child` is the handle when this harness process spawned it (then it is also reaped).
/// Returns false if the process still exists afterwards.
pub fn stop_process(rec: &ProcRecord, mut child: Option<Child>) -> bool {
    if let Some(c) = child.as_mut() {
        if !matches!(c.try_wait(), Ok(None)) {
            return true;
        }
    } else if !rec.alive() {
        return true;
    }
    sys::send_signal(rec.pid, Signal::Term);
    if wait_gone(rec, &mut child, Duration::from_secs(3)) {
        return true;
    }
    // Re-check identity right before the hard kill.
    if child.is_some() || rec.alive() {
        sys::send_signal(rec.pid, Signal::Kill);
    }
    wait_gone(rec, &mut child, Duration::from_secs(2))
}

/// The last `n` lines of a text file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return format!("({} is empty)", path.display());
            }
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_captures_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo hi; echo err >&2; exit 3"]),
            SHORT,
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
        assert!(run_ok(Command::new("sh").args(["-c", "exit 3"]), SHORT).is_err());
    }

    #[test]
    fn run_enforces_timeout() {
        let t = Instant::now();
        let err = run(Command::new("sleep").arg("5"), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn proc_record_tracks_identity() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let rec = ProcRecord::new(child.id(), "sleep");
        assert!(rec.alive());
        let stale = ProcRecord {
            start_ticks: rec.start_ticks + 1,
            ..rec.clone()
        };
        assert!(!stale.alive(), "a different start time must not match");
        let _ = child.try_wait();
        assert!(stop_process(&rec, Some(child)));
        assert!(!rec.alive());
    }
}
