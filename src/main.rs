//! `flanneld`: parse flags and environment, then run the daemon until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::time::Duration;

use flannel_rs::config::flags::{self, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = |name: &str| std::env::var(name).ok();
    let flags = match flags::parse(&args, &env) {
        Ok(Command::Run(f)) => f,
        Ok(Command::Doctor(f)) => return doctor(&f),
        Ok(Command::Help(text)) => {
            eprint!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            // Upstream prints its version alone to stderr; we add the name and commit.
            eprintln!("{}", flannel_rs::version_line());
            return ExitCode::SUCCESS;
        }
        Ok(Command::InstallConf { src, dest }) => return install_conf(&src, &dest),
        Err(e) => {
            eprintln!("flanneld: {e}");
            // install-conf's usage error exits 1 like upstream's helper; flag errors exit 2.
            return match e {
                flags::FlagError::InstallConfUsage => ExitCode::FAILURE,
                _ => ExitCode::from(2),
            };
        }
    };
    init_logging(flags.verbosity);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run_until_signal(flags));
    // Dropping a runtime waits for every blocking task (an iptables command stuck on the
    // xtables lock, say) without limit: give them a moment, then leave them behind.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause is the last log line.
            tracing::error!("{e}");
            eprintln!("flanneld: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long a clean shutdown may take after SIGTERM/SIGINT before the process exits anyway
/// (Kubernetes and systemd expect a prompt exit; nothing the daemon leaves is unsafe to
/// leave: routes and devices stay for the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Runs the daemon until a signal; honours the signal within [`SHUTDOWN_GRACE`] even if the
/// daemon is stuck in some operation.
async fn run_until_signal(flags: flags::Flags) -> Result<(), flannel_rs::daemon::DaemonError> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let mut for_daemon = rx.clone();
    let daemon = flannel_rs::daemon::run(flags, async move {
        let _ = for_daemon.wait_for(|s| *s).await;
    });
    let mut signalled = rx;
    let deadline = async move {
        if signalled.wait_for(|s| *s).await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = daemon => r,
        () = deadline => {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "shutdown did not finish in time (an operation is stuck); exiting anyway"
            );
            Ok(())
        }
    }
}

/// `flanneld doctor`: the report on stdout, exit 0/1/2 (see `flannel_rs::doctor`).
fn doctor(flags: &flags::Flags) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld doctor: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let diagnosis = runtime.block_on(flannel_rs::doctor::diagnose(flags));
    print!("{}", diagnosis.render());
    if let Some(e) = &diagnosis.config_error {
        eprintln!("flanneld doctor: {e}");
    }
    ExitCode::from(diagnosis.exit_code())
}

/// `flanneld install-conf <src> <dest>`: upstream's `/opt/bin/install-conf` (the Helm chart's
/// `install-cni` init container): copy the CNI config atomically, usage error exit 1.
fn install_conf(src: &std::path::Path, dest: &std::path::Path) -> ExitCode {
    match flannel_rs::config::install_conf::install(src, dest) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error installing {:?}: {e}", src.display().to_string());
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default disposition still ends the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

/// klog-style verbosity: 0 info, 1-4 debug, 5+ trace; `RUST_LOG` overrides.
fn init_logging(verbosity: i32) {
    let level = match verbosity {
        i32::MIN..=0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
