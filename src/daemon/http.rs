//! flannel's `/healthz` and `/readyz`, and the Prometheus `/metrics` endpoint, served by hyper.
//!
//! Two listeners with different audiences: the health port (flannel's `--healthz-ip`,
//! `--healthz-port`, probed by the kubelet) answers only the health paths; `/metrics`, which
//! names every peer's subnet and public IP, is served only on `--metrics-port`, bound to
//! `--metrics-ip` (loopback by default). Connections are bounded in number and in time
//! (reading the request, writing the answer), so a slow or hostile client cannot pin tasks
//! and descriptors; unknown paths are logged at debug level so nobody can flood the log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

/// Renders the current metrics in the Prometheus text format.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// How much one listener gives its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; further clients wait in the kernel's backlog.
    pub connections: usize,
    /// Time a client has to send its request head.
    pub header_timeout: Duration,
    /// Time a connection may live in all (requests and answers, keep-alive included).
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 64,
            header_timeout: Duration::from_secs(3),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which paths a listener answers.
#[derive(Clone)]
pub enum Endpoints {
    /// flannel's health port: `/healthz` (always 200) and `/readyz` (200 once ready).
    Health {
        /// Set once rules are installed and subnet.env is written.
        ready: Arc<AtomicBool>,
    },
    /// The metrics port: `/metrics`.
    Metrics(MetricsFn),
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoints::Health { ready } => f
                .debug_struct("Health")
                .field("ready", &ready.load(Ordering::Relaxed))
                .finish(),
            Endpoints::Metrics(_) => f.write_str("Metrics"),
        }
    }
}

/// The answer for `path` (any method, like flannel's mux): status, body, content type.
fn respond(path: &str, endpoints: &Endpoints) -> (StatusCode, String, &'static str) {
    match (endpoints, path) {
        (Endpoints::Health { .. }, "/healthz") => {
            (StatusCode::OK, "flanneld is running".into(), TEXT)
        }
        (Endpoints::Health { ready }, "/readyz") if ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "flanneld is ready".into(), TEXT)
        }
        (Endpoints::Health { .. }, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "flanneld is not ready yet".into(),
            TEXT,
        ),
        (Endpoints::Metrics(render), "/metrics") => (StatusCode::OK, render(), PROMETHEUS_TEXT),
        (_, other) => {
            debug!(path = %other.chars().take(64).collect::<String>(), "unknown HTTP path");
            (StatusCode::NOT_FOUND, "not found".into(), TEXT)
        }
    }
}

fn answer(req: &Request<Incoming>, endpoints: &Endpoints) -> Response<Full<Bytes>> {
    let (status, body, ctype) = respond(req.uri().path(), endpoints);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// Serves `endpoints` on an already bound listener until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on accept.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req, &endpoints);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(conn), service);
            // Bounds writing as well as reading: a client that never reads is dropped.
            let _ = tokio::time::timeout(limits.connection_timeout, conn).await;
            drop(permit);
        });
    }
}

/// Binds `addr` and serves `endpoints` in a background task.
pub async fn spawn(addr: SocketAddr, endpoints: Endpoints) -> std::io::Result<()> {
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
    tokio::spawn(serve(listener, endpoints, Limits::default()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn health(ready: bool) -> Endpoints {
        Endpoints::Health {
            ready: Arc::new(AtomicBool::new(ready)),
        }
    }

    fn metrics() -> Endpoints {
        Endpoints::Metrics(Arc::new(|| "flannel_up 1\n".to_string()))
    }

    #[test]
    fn paths_answer_like_flannel() {
        let h = health(false);
        assert_eq!(respond("/healthz", &h).0, StatusCode::OK);
        assert_eq!(respond("/readyz", &h).1, "flanneld is not ready yet");
        assert_eq!(respond("/readyz", &h).0, StatusCode::SERVICE_UNAVAILABLE);
        if let Endpoints::Health { ready } = &h {
            ready.store(true, Ordering::Relaxed);
        }
        let r = respond("/readyz", &h);
        assert_eq!((r.0, r.1.as_str()), (StatusCode::OK, "flanneld is ready"));
        // The health port does not leak peers' addresses.
        assert_eq!(respond("/metrics", &h).0, StatusCode::NOT_FOUND);
        let m = metrics();
        assert_eq!(respond("/metrics", &m).1, "flannel_up 1\n");
        assert_eq!(respond("/healthz", &m).0, StatusCode::NOT_FOUND);
    }

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, health(true), Limits::default()));
        let out = get(
            addr,
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("flanneld is ready"), "{out}");
        let garbage = get(addr, b"\xff\xfe\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    }

    #[tokio::test]
    async fn silent_clients_are_dropped_and_do_not_starve_others() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            connections: 4,
            header_timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_millis(500),
        };
        tokio::spawn(serve(listener, health(true), limits));
        // More idle clients than slots: each is cut off after the header timeout, so a
        // well-behaved client is served after them rather than never.
        let mut idle = Vec::new();
        for _ in 0..limits.connections + 4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let started = tokio::time::Instant::now();
        let out = get(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        // Two rounds of idle clients (8 over 4 slots) at most, each cut after 200-500 ms.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let mut buf = [0u8; 64];
        let n = idle[0].read(&mut buf).await.unwrap_or(0);
        // Closed by the server (maybe after a 408), never answered with a 200.
        assert!(!String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    }
}
