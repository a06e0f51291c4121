//! The firewall programs (`iptables`, `iptables-restore`, `nft`) as the appliers see them: the
//! [`Runner`] seam (real programs through [`crate::io::exec`], or a fake in tests) and the
//! errors they end in.

use std::fmt;
use std::time::Duration;

use crate::io::exec;
pub use crate::io::exec::{ExecError, Invocation};

/// Why an iptables operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    /// The program could not be started, or did not finish in time (e.g. `-w` waiting on a
    /// held xtables lock) and was killed.
    #[error(transparent)]
    Exec(#[from] ExecError),
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
    /// The blocking task running iptables was cancelled or panicked.
    #[error("iptables task did not complete")]
    Task,
}

/// Runs a program; abstracted so the rule logic can be tested without root.
pub trait Runner: Send + Sync + fmt::Debug {
    /// Runs `cmd`, returning its standard output on success.
    fn invoke(&self, cmd: &Invocation<'_>) -> Result<String, MasqError>;

    /// Runs `program args…` with `stdin`, returning standard output on success.
    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, MasqError> {
        self.invoke(&Invocation {
            program,
            args,
            stdin,
        })
    }
}

/// Runs real programs (found through `PATH`) in the calling thread's network namespace, each
/// killed after `COMMAND_TIMEOUT` (30 s).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn invoke(&self, cmd: &Invocation<'_>) -> Result<String, MasqError> {
        let out = exec::run(cmd, COMMAND_TIMEOUT)?;
        if !out.status.success() {
            return Err(MasqError::Failed {
                cmd: cmd.line(),
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
