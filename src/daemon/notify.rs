//! systemd readiness notification: `sd_notify(0, "READY=1")` for `Type=notify` units
//! (flannel's packages ship such units), written to `$NOTIFY_SOCKET` without libsystemd.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `READY=1` when `NOTIFY_SOCKET` is set; `Ok(false)` when it is not (not run by
/// systemd, or a unit without `Type=notify`).
pub fn notify_ready() -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(s) if !s.is_empty() => {
            let s = s.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is not UTF-8")
            })?;
            notify(s, "READY=1").map(|()| true)
        }
        _ => Ok(false),
    }
}

/// Writes one datagram with `state` to the notification socket `socket`: a filesystem path,
/// or an abstract socket name when it starts with `@` (as systemd passes it).
pub fn notify(socket: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let sent = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?
    } else if socket.starts_with('/') {
        sock.send_to(state.as_bytes(), socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported NOTIFY_SOCKET {socket:?} (want a path or @abstract name)"),
        ));
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to NOTIFY_SOCKET",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn path_socket_gets_ready() {
        let dir = std::env::temp_dir().join(format!("flannel-rs-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(recv(&listener), "READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_socket_gets_ready() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("flannel-rs-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify(&format!("@{name}"), "READY=1").unwrap();
        assert_eq!(recv(&listener), "READY=1");
    }

    #[test]
    fn bad_addresses_are_errors() {
        assert!(notify("relative/path", "READY=1").is_err());
        let missing = std::env::temp_dir().join("flannel-rs-no-such-notify-socket");
        assert!(notify(missing.to_str().unwrap(), "READY=1").is_err());
    }
}
