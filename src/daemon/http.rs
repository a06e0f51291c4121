//! The health endpoint (flannel's `/healthz` and `/readyz`) and Prometheus `/metrics`.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, GET only, bounded
//! request size and time, so a slow or hostile client cannot hold the daemon.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::warn;

/// Renders the current metrics in the Prometheus text format.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// Shared state the endpoints report.
#[derive(Clone)]
pub struct HealthState {
    /// Set once rules are installed and subnet.env is written.
    pub ready: Arc<AtomicBool>,
    /// Metrics renderer.
    pub metrics: MetricsFn,
}

impl std::fmt::Debug for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthState")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on an already bound listener until the task
/// is dropped.
pub async fn serve(listener: TcpListener, state: HealthState) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let read = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let (status, body, ctype) = respond(&buf[..n], &state);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Binds `addr` and serves in a background task.
pub async fn spawn(addr: SocketAddr, state: HealthState) -> std::io::Result<()> {
    // SO_REUSEPORT: during a handover (a surge rollout) the new flanneld starts while the
    // old one still holds the port.
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(128)?;
    tokio::spawn(serve(listener, state));
    Ok(())
}

fn respond(req: &[u8], state: &HealthState) -> (&'static str, String, &'static str) {
    let line = req.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let text = "text/plain; charset=utf-8";
    match path {
        // flannel answers /healthz for any method.
        "/healthz" => ("200 OK", "flanneld is running".into(), text),
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
            ("200 OK", "flanneld is ready".into(), text)
        }
        "/readyz" => (
            "503 Service Unavailable",
            "flanneld is not ready yet".into(),
            text,
        ),
        "/metrics" => (
            "200 OK",
            (state.metrics)(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        other => {
            warn!(path = %other.chars().take(64).collect::<String>(), "unknown HTTP path");
            ("404 Not Found", "not found".into(), text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ready: bool) -> HealthState {
        HealthState {
            ready: Arc::new(AtomicBool::new(ready)),
            metrics: Arc::new(|| "flannel_up 1\n".to_string()),
        }
    }

    #[test]
    fn paths_answer_like_flannel() {
        let s = state(false);
        assert_eq!(respond(b"GET /healthz HTTP/1.1\r\n", &s).0, "200 OK");
        assert_eq!(
            respond(b"GET /readyz HTTP/1.1\r\n", &s).1,
            "flanneld is not ready yet"
        );
        s.ready.store(true, Ordering::Relaxed);
        let r = respond(b"GET /readyz HTTP/1.1\r\n", &s);
        assert_eq!((r.0, r.1.as_str()), ("200 OK", "flanneld is ready"));
        assert_eq!(
            respond(b"GET /metrics HTTP/1.1\r\n", &s).1,
            "flannel_up 1\n"
        );
        assert_eq!(respond(b"\xff\xfe", &s).0, "404 Not Found");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, state(true)));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("flanneld is ready"), "{out}");
    }
}
