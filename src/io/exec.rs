//! Running programs (`iptables`, `iptables-restore`, `nft`) in the calling thread's network
//! namespace, bounded in time: a program that never finishes (e.g. `iptables -w` waiting on an
//! xtables lock held forever) is killed and reported, so it cannot hold its caller forever.

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One program run: what to start and what to feed it.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    /// Program, found through `PATH`.
    pub program: &'a str,
    /// Its arguments.
    pub args: &'a [String],
    /// Written to its standard input (closed when `None`).
    pub stdin: Option<&'a str>,
}

impl Invocation<'_> {
    /// The command line, for messages.
    pub fn line(&self) -> String {
        format!("{} {}", self.program, self.args.join(" "))
    }
}

/// Why a program could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// It could not be started, or its input not written.
    #[error("running {cmd}: {source}")]
    Spawn {
        /// Command line.
        cmd: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It did not finish within `limit`; it was killed.
    #[error("{cmd} did not finish within {limit:?}; killed it")]
    Timeout {
        /// Command line.
        cmd: String,
        /// The limit.
        limit: Duration,
    },
}

/// Runs `cmd` to its end, at most `limit`, and returns its exit status and output (a failing
/// exit status is not an error here).
pub fn run(cmd: &Invocation<'_>, limit: Duration) -> Result<Output, ExecError> {
    let spawn = |source| ExecError::Spawn {
        cmd: cmd.line(),
        source,
    };
    let mut command = Command::new(cmd.program);
    command.args(cmd.args);
    command.stdin(cmd.stdin.map_or_else(Stdio::null, |_| Stdio::piped()));
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (cmd.stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    wait_bounded(child, limit).map_err(|source| {
        if source.kind() == std::io::ErrorKind::TimedOut {
            ExecError::Timeout {
                cmd: cmd.line(),
                limit,
            }
        } else {
            spawn(source)
        }
    })
}

/// Waits for `child` at most `limit` (then kills and reaps it: `TimedOut`), reading its
/// output meanwhile so a large `-S` listing cannot fill the pipe and stall it.
fn wait_bounded(mut child: Child, limit: Duration) -> std::io::Result<Output> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_stdin_and_exit_status() {
        let a = ["-c".to_owned(), "cat; echo err >&2; exit 3".to_owned()];
        let cmd = Invocation {
            program: "sh",
            args: &a,
            stdin: Some("in\n"),
        };
        let out = run(&cmd, Duration::from_secs(10)).expect("run");
        assert_eq!(out.stdout, b"in\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn missing_program_and_timeout() {
        let none = Invocation {
            program: "/nonexistent/flannel-rs-test",
            args: &[],
            stdin: None,
        };
        assert!(matches!(
            run(&none, Duration::from_secs(1)),
            Err(ExecError::Spawn { .. })
        ));
        let a = ["5".to_owned()];
        let slow = Invocation {
            program: "sleep",
            args: &a,
            stdin: None,
        };
        let started = Instant::now();
        let e = run(&slow, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(
            e.to_string(),
            "sleep 5 did not finish within 100ms; killed it"
        );
    }
}
