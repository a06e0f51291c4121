//! Entering a network namespace from a dedicated thread.
//!
//! Namespaces are per thread: never call this on a tokio worker. Spawn a thread, enter, work.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Moves the calling thread into the network namespace at `path` (for example
/// `/var/run/netns/<name>` as made by `ip netns add`).
pub fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns takes a valid namespace fd (kept open for the call) and a flag constant.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the namespace named `name` by `ip netns add`.
pub fn enter_named(name: &str) -> io::Result<()> {
    enter(&Path::new("/var/run/netns").join(name))
}
