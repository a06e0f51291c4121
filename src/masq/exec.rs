//! Running the firewall programs (`iptables`, `iptables-restore`, `nft`) for the appliers:
//! the [`Runner`] seam (real programs, or a fake in tests), bounded in time so a lock held
//! forever cannot hold the firewall task forever, and the errors they end in.

use std::fmt;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Why an iptables operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    /// The program could not be started.
    #[error("running {cmd}: {source}")]
    Spawn {
        /// Command line.
        cmd: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The program exited with an error.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// Command line.
        cmd: String,
        /// Exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// `iptables --version` printed no version.
    #[error("cannot find an iptables version in {0:?}")]
    Version(String),
    /// Network and subnet are of different families, or not of this applier's family.
    #[error("invalid masquerade configuration: {0}")]
    Config(String),
    /// The program did not finish in time (e.g. `-w` waiting on a held xtables lock); it
    /// was killed.
    #[error("{cmd} did not finish within {limit:?}; killed it")]
    Timeout {
        /// Command line.
        cmd: String,
        /// The limit.
        limit: Duration,
    },
    /// The blocking task running iptables was cancelled or panicked.
    #[error("iptables task did not complete")]
    Task,
}

/// Runs a program; abstracted so the rule logic can be tested without root.
pub trait Runner: Send + Sync + fmt::Debug {
    /// Runs `program args…` with `stdin`, returning standard output on success.
    fn run(&self, program: &str, args: &[String], stdin: Option<&str>)
        -> Result<String, MasqError>;
}

/// Runs real programs (found through `PATH`) in the calling thread's network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, MasqError> {
        let cmd = format!("{program} {}", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| MasqError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|source| MasqError::Spawn {
                    cmd: cmd.clone(),
                    source,
                })?;
        }
        let out = wait_bounded(child, COMMAND_TIMEOUT).map_err(|source| {
            if source.kind() == std::io::ErrorKind::TimedOut {
                MasqError::Timeout {
                    cmd: cmd.clone(),
                    limit: COMMAND_TIMEOUT,
                }
            } else {
                MasqError::Spawn {
                    cmd: cmd.clone(),
                    source,
                }
            }
        })?;
        if !out.status.success() {
            return Err(MasqError::Failed {
                cmd,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Longest an iptables command may run: `-w` waits for the xtables lock without limit, and a
/// lock held forever must not hold the daemon's firewall task forever.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for `child` at most `limit` (then kills and reaps it: `TimedOut`), reading its
/// output meanwhile so a large `-S` listing cannot fill the pipe and stall it.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> std::io::Result<Output> {
    use std::io::Read;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}
