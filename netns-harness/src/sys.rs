//! The few OS calls std does not offer: signals to PIDs, effective uid, entering a network
//! namespace on one thread, and a SIGINT/SIGTERM handler that only raises a flag. Every other
//! module stays safe code.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Signals the harness sends to processes it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Polite stop request.
    Term,
    /// Forced stop.
    Kill,
}

/// Sends `sig` to `pid`. Returns false when the process does not exist (ESRCH) or the call failed.
pub fn send_signal(pid: u32, sig: Signal) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negative PIDs address process groups; the harness never means that.
        return false;
    }
    let signo = match sig {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; pid > 0 so it targets
    // exactly one process.
    unsafe { libc::kill(pid, signo) == 0 }
}

/// True when the effective user is root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments, cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling *thread* into the named network namespace (`/run/netns/<ns>`, as
/// `ip netns add` creates it). Only for short-lived helper threads that open a socket there
/// and end: sockets keep their namespace after the thread is gone, and no other thread of the
/// process is affected.
pub(crate) fn enter_netns(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if ns.is_empty() || ns.contains('/') || ns.starts_with('.') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid namespace name {ns:?}"),
        ));
    }
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns(2) takes a file descriptor we own (kept open by `f` for the duration of the
    // call) and a flag; it touches no memory of ours and changes only this thread's network
    // namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_signal(signo: libc::c_int) {
    // Only async-signal-safe work here: two atomic stores.
    LAST_SIGNAL.store(signo, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs a SIGINT/SIGTERM handler that sets the [`interrupted`] flag. Every waiting loop of
/// the harness polls that flag, fails with "interrupted", and the [`crate::Cluster`] drop guard
/// tears everything down. `SA_RESETHAND` restores the default action, so a second Ctrl-C kills
/// the process at once.
pub fn install_signal_handler() -> std::io::Result<()> {
    for signo in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND;
        // SAFETY: sa_mask is a valid sigset_t owned by `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised, the handler only performs atomic stores (async
        // signal safe), and a null old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(signo, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True once SIGINT or SIGTERM arrived after [`install_signal_handler`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The signal that set [`interrupted`], if any.
pub fn last_signal() -> Option<i32> {
    match LAST_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Fails with a recognisable error when a stop signal arrived.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!(
            "interrupted by signal {} (tearing down)",
            last_signal().unwrap_or(0)
        );
    }
    Ok(())
}

/// Clock ticks per second of `/proc/<pid>/stat`'s CPU times (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf(3) takes an integer name and touches no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Sleeps for `d` in short steps; fails early when a stop signal arrives.
pub fn sleep_interruptible(d: std::time::Duration) -> anyhow::Result<()> {
    let end = std::time::Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
}

/// One progress line on stderr (silent with `NETNS_HARNESS_QUIET`).
pub(crate) fn log(msg: impl AsRef<str>) {
    if std::env::var_os("NETNS_HARNESS_QUIET").is_none() {
        eprintln!("[netns-harness] {}", msg.as_ref());
    }
}
