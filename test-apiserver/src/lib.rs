//! A small Kubernetes API server for tests: the part of the core/v1 API that flanneld uses
//! (nodes, node status, pods), on the real wire protocol, so a normal Kubernetes client talks to
//! it over plain HTTP without knowing it is not a real server.
//!
//! Served:
//!
//! * `GET /api/v1/nodes` — a `NodeList` with `metadata.resourceVersion` (`limit`/`continue`
//!   paging honoured).
//! * `GET /api/v1/nodes?watch=1&resourceVersion=N` — a chunked stream of newline-separated
//!   watch events `{"type":"ADDED|MODIFIED|DELETED","object":…}` for every change after `N`;
//!   with `N` empty or `0`, synthetic `ADDED` events for the current nodes first. When `N` is
//!   older than the retained history (see [`TestApiServer::set_history_window`],
//!   [`TestApiServer::compact`]) the stream carries one `ERROR` event with a 410 `Status`
//!   ("too old resource version"), as a real API server does. `timeoutSeconds` ends the stream.
//! * `GET|PUT|DELETE|PATCH /api/v1/nodes/<name>`, `POST /api/v1/nodes`,
//!   `GET|PATCH /api/v1/nodes/<name>/status`.
//! * `GET|DELETE /api/v1/namespaces/<ns>/pods/<name>`, `POST /api/v1/namespaces/<ns>/pods`.
//! * `PATCH` with `application/strategic-merge-patch+json` (maps merged, `null` deletes a key,
//!   `status.conditions`/`status.addresses` merged by `type`, `spec.taints` by `key`, other
//!   lists replaced) or `application/merge-patch+json` (RFC 7386). A `/status` patch keeps the
//!   old `spec`, a main-resource patch keeps the old `status` (the API server's node
//!   strategies); a patch that changes nothing neither bumps the resource version nor emits an
//!   event.
//! * `GET /version`, `GET /healthz`, and for harnesses `POST /_test/close-watches`,
//!   `POST /_test/expire-watches`, `POST /_test/compact`, `PUT /_test/history-window?size=N`.
//!
//! Errors are `Status` objects with the usual `reason` (`NotFound`, `AlreadyExists`, ...).
//! Every request is recorded ([`TestApiServer::requests`]) so tests can assert what a client
//! sent. No authentication, no TLS, no admission: it trusts its clients.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Default number of node events kept for watches that resume from an older version.
pub const DEFAULT_HISTORY_WINDOW: usize = 1000;

/// One request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The `Content-Type` header (empty when none).
    pub content_type: String,
    /// The request body as text.
    pub body: String,
}

/// Why the server could not start or load its state.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or accepting failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The state file is not valid.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A node change as watchers see it.
#[derive(Debug)]
struct NodeEvent {
    rv: u64,
    /// The serialized watch event line, newline included.
    line: Bytes,
}

#[derive(Debug)]
struct State {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    history: VecDeque<Arc<NodeEvent>>,
    history_window: usize,
    /// Watches from a resource version below this get 410 Gone.
    min_rv: u64,
    requests: Vec<RecordedRequest>,
    uid: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<NodeEvent>>,
    /// Bumped to end every open watch; the flag says whether with a 410 `ERROR` event.
    close_watches: watch::Sender<(u64, bool)>,
    state_file: Option<PathBuf>,
}

#[derive(Debug)]
struct Running {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A running (or stopped) test API server; see the crate docs. State survives
/// [`TestApiServer::stop`] and [`TestApiServer::restart`].
#[derive(Debug)]
pub struct TestApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Option<Running>,
}

/// An API error: HTTP status, `reason`, message.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(kind: &str, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{kind} \"{name}\" not found"),
        )
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }
}

/// A Kubernetes `Status` object for a failure.
fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

type ResBody = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> ResBody {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, value: &Value) -> Response<ResBody> {
    let mut res = Response::new(full(value.to_string()));
    *res.status_mut() = code;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

fn error_response(e: &ApiError) -> Response<ResBody> {
    json_response(e.code, &status_json(e.code.as_u16(), e.reason, &e.message))
}

/// A response body fed by a channel: the watch stream.
#[derive(Debug)]
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

impl TestApiServer {
    /// Starts an empty server on `127.0.0.1` with a free port.
    pub async fn start() -> Result<TestApiServer, ServerError> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts an empty server on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Result<TestApiServer, ServerError> {
        Self::start_with(addr, None).await
    }

    /// Starts a server on `addr` whose state is loaded from `state_file` when it exists and
    /// written back (atomically) after every change. The file holds
    /// `{"resourceVersion":"N","nodes":[…],"pods":[…]}`.
    pub async fn start_with_state_file(
        addr: SocketAddr,
        state_file: &Path,
    ) -> Result<TestApiServer, ServerError> {
        Self::start_with(addr, Some(state_file.to_path_buf())).await
    }

    async fn start_with(
        addr: SocketAddr,
        state_file: Option<PathBuf>,
    ) -> Result<TestApiServer, ServerError> {
        let mut state = State {
            rv: 1,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            history: VecDeque::new(),
            history_window: DEFAULT_HISTORY_WINDOW,
            min_rv: 1,
            requests: Vec::new(),
            uid: 0,
        };
        if let Some(path) = &state_file {
            load_state(&mut state, path)?;
        }
        let (events, _) = broadcast::channel(4096);
        let (close_watches, _) = watch::channel((0, false));
        let mut server = TestApiServer {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                events,
                close_watches,
                state_file,
            }),
            addr,
            running: None,
        };
        server.listen().await?;
        Ok(server)
    }

    async fn listen(&mut self) -> Result<(), ServerError> {
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| ServerError::Io {
                context: format!("bind {}", self.addr),
                source,
            })?;
        self.addr = listener.local_addr().map_err(|source| ServerError::Io {
            context: "local address".into(),
            source,
        })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, self.shared.clone(), shutdown_rx));
        self.running = Some(Running { shutdown, task });
        Ok(())
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `--kube-api-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// True while the server accepts connections.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops listening and drops every open connection (watches end abruptly, as when an
    /// API server process dies). The state is kept.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(true);
            let _ = running.task.await;
        }
    }

    /// Starts listening again on the same address with the same state (and watch history).
    pub async fn restart(&mut self) -> Result<(), ServerError> {
        self.stop().await;
        let mut last = None;
        // The port can take a moment to become bindable again.
        for _ in 0..50 {
            match self.listen().await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(last.unwrap_or_else(|| ServerError::Io {
            context: "restart".into(),
            source: io::Error::other("could not bind"),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Creates or replaces a node (resource version, uid and creation time filled in).
    /// Returns the stored object.
    pub fn add_node(&self, node: Node) -> Node {
        let value = serde_json::to_value(&node).unwrap_or(Value::Null);
        let name = node.metadata.name.clone().unwrap_or_default();
        let stored = self.shared.put_node(&name, value, true);
        from_value(stored)
    }

    /// Applies `f` to a stored node (no-op when absent). Returns the updated node.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Node)) -> Option<Node> {
        let mut node: Node = from_value(self.lock().nodes.get(name)?.clone());
        f(&mut node);
        let value = serde_json::to_value(&node).unwrap_or(Value::Null);
        Some(from_value(self.shared.put_node(name, value, false)))
    }

    /// Sets (`Some`) or removes (`None`) one annotation of a node.
    pub fn set_annotation(&self, node: &str, key: &str, value: Option<&str>) -> Option<Node> {
        self.update_node(node, |n| {
            let map = n.metadata.annotations.get_or_insert_with(BTreeMap::new);
            match value {
                Some(v) => {
                    map.insert(key.to_owned(), v.to_owned());
                }
                None => {
                    map.remove(key);
                }
            }
        })
    }

    /// Deletes a node; returns whether it existed.
    pub fn delete_node(&self, name: &str) -> bool {
        self.shared.delete_node(name).is_some()
    }

    /// A stored node.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.lock().nodes.get(name).cloned().map(from_value)
    }

    /// A stored node as raw JSON, exactly as served.
    pub fn node_json(&self, name: &str) -> Option<Value> {
        self.lock().nodes.get(name).cloned()
    }

    /// Every stored node, by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.lock()
            .nodes
            .values()
            .cloned()
            .map(from_value)
            .collect()
    }

    /// Creates or replaces a pod (namespace `default` when unset).
    pub fn add_pod(&self, pod: Pod) -> Pod {
        let value = serde_json::to_value(&pod).unwrap_or(Value::Null);
        from_value(self.shared.put_pod(value))
    }

    /// A stored pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.lock()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .map(from_value)
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Keeps only the last `size` node events for resuming watches; older resource versions
    /// get 410 Gone.
    pub fn set_history_window(&self, size: usize) {
        self.shared.set_history_window(size);
    }

    /// Forgets all watch history: every watch resuming from an existing version gets 410 Gone
    /// (as after an etcd compaction).
    pub fn compact(&self) {
        self.shared.compact();
    }

    /// Ends every open watch stream cleanly (clients normally re-watch from their last
    /// version).
    pub fn close_watches(&self) {
        self.shared
            .close_watches
            .send_modify(|g| *g = (g.0 + 1, false));
    }

    /// Expires every open watch: forgets the history (see [`TestApiServer::compact`]) and
    /// ends each stream with a 410 `ERROR` event, as an API server whose watch cache fell
    /// behind does. Clients must re-list.
    pub fn expire_watches(&self) {
        self.shared.compact();
        self.shared
            .close_watches
            .send_modify(|g| *g = (g.0 + 1, true));
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The requests received so far with this method.
    pub fn requests_with_method(&self, method: &str) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == method)
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(true);
            running.task.abort();
        }
    }
}

fn from_value<T: serde::de::DeserializeOwned + Default>(v: Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}

fn now_rfc3339() -> String {
    use k8s_openapi::jiff::Timestamp;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // k8s-openapi's jiff has no `std` feature (no `Timestamp::now`) unless another crate adds it.
    Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a node event (state locked by the caller) and publishes it.
    fn publish(&self, st: &mut State, kind: &'static str, object: &Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let ev = Arc::new(NodeEvent {
            rv: st.rv,
            line: Bytes::from(line),
        });
        st.history.push_back(ev.clone());
        trim_history(st);
        let _ = self.events.send(ev);
    }

    fn set_history_window(&self, size: usize) {
        let mut st = self.lock();
        st.history_window = size;
        trim_history(&mut st);
    }

    fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.min_rv = st.rv;
    }

    /// Stores a node; `fill` sets uid and creation time when missing. Emits ADDED or
    /// MODIFIED; an unchanged object is stored without a new version or event.
    fn put_node(&self, name: &str, mut value: Value, fill: bool) -> Value {
        let mut st = self.lock();
        set_type_meta(&mut value, "Node");
        let old = st.nodes.get(name).cloned();
        if let (Some(old), Some(meta)) = (&old, value.get_mut("metadata")) {
            // Keep server-owned metadata of the existing object.
            for key in ["uid", "creationTimestamp"] {
                if let Some(v) = old.pointer(&format!("/metadata/{key}")) {
                    meta[key] = v.clone();
                }
            }
        }
        if let Some(old) = &old {
            if same_object(old, &value) {
                return old.clone();
            }
        }
        if fill || old.is_none() {
            fill_metadata(&mut st, &mut value, name);
        }
        st.rv += 1;
        set_rv(&mut value, st.rv);
        st.nodes.insert(name.to_owned(), value.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.publish(&mut st, kind, &value);
        drop(st);
        self.save();
        value
    }

    fn delete_node(&self, name: &str) -> Option<Value> {
        let mut st = self.lock();
        let mut old = st.nodes.remove(name)?;
        st.rv += 1;
        set_rv(&mut old, st.rv);
        self.publish(&mut st, "DELETED", &old);
        drop(st);
        self.save();
        Some(old)
    }

    fn put_pod(&self, mut value: Value) -> Value {
        let mut st = self.lock();
        set_type_meta(&mut value, "Pod");
        let name = str_at(&value, "/metadata/name").to_owned();
        let ns = match str_at(&value, "/metadata/namespace") {
            "" => "default".to_owned(),
            ns => ns.to_owned(),
        };
        value["metadata"]["namespace"] = Value::String(ns.clone());
        fill_metadata(&mut st, &mut value, &name);
        st.rv += 1;
        set_rv(&mut value, st.rv);
        st.pods.insert((ns, name), value.clone());
        drop(st);
        self.save();
        value
    }

    /// Writes the state file, if any (atomically: temporary file + rename).
    fn save(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let st = self.lock();
        let doc = json!({
            "resourceVersion": st.rv.to_string(),
            "nodes": st.nodes.values().collect::<Vec<_>>(),
            "pods": st.pods.values().collect::<Vec<_>>(),
        });
        drop(st);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

fn trim_history(st: &mut State) {
    while st.history.len() > st.history_window {
        if let Some(ev) = st.history.pop_front() {
            st.min_rv = st.min_rv.max(ev.rv);
        }
    }
    if st.history_window == 0 {
        st.min_rv = st.rv;
    }
}

fn load_state(st: &mut State, path: &Path) -> Result<(), ServerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Io {
                context: format!("read {}", path.display()),
                source,
            })
        }
    };
    let bad = |message: String| ServerError::State {
        path: path.to_path_buf(),
        message,
    };
    let doc: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let rv = doc
        .get("resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1);
    for (key, kind) in [("nodes", "Node"), ("pods", "Pod")] {
        for item in doc
            .get(key)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let name = str_at(item, "/metadata/name").to_owned();
            if name.is_empty() {
                return Err(bad(format!("a {kind} without metadata.name")));
            }
            let mut item = item.clone();
            set_type_meta(&mut item, kind);
            if kind == "Node" {
                serde_json::from_value::<Node>(item.clone())
                    .map_err(|e| bad(format!("node {name}: {e}")))?;
                st.nodes.insert(name, item);
            } else {
                serde_json::from_value::<Pod>(item.clone())
                    .map_err(|e| bad(format!("pod {name}: {e}")))?;
                let ns = match str_at(&item, "/metadata/namespace") {
                    "" => "default".to_owned(),
                    ns => ns.to_owned(),
                };
                st.pods.insert((ns, name), item);
            }
        }
    }
    let max_item_rv = st
        .nodes
        .values()
        .chain(st.pods.values())
        .filter_map(|v| str_at(v, "/metadata/resourceVersion").parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    st.rv = rv.max(max_item_rv).max(1);
    st.min_rv = st.rv;
    Ok(())
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn set_type_meta(v: &mut Value, kind: &str) {
    if let Some(obj) = v.as_object_mut() {
        obj.insert("apiVersion".into(), Value::String("v1".into()));
        obj.insert("kind".into(), Value::String(kind.into()));
        obj.entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn set_rv(v: &mut Value, rv: u64) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

fn fill_metadata(st: &mut State, v: &mut Value, name: &str) {
    let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    meta.insert("name".into(), Value::String(name.to_owned()));
    if meta
        .get("uid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        st.uid += 1;
        meta.insert(
            "uid".into(),
            Value::String(format!("00000000-0000-4000-8000-{:012x}", st.uid)),
        );
    }
    if !meta.contains_key("creationTimestamp") {
        meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    }
}

/// Equal apart from the resource version.
fn same_object(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        let shutdown = shutdown.clone();
                        async move { Ok::<_, Infallible>(handle(shared, shutdown, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Dropping the set aborts every connection (and so every watch body).
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Splits `a=b&c=d` (percent-decoded, `+` as space).
fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i) {
            Some(b'+') => out.push(b' '),
            Some(b'%') => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            Some(&b) => out.push(b),
            None => {}
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Response<ResBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(e.to_string())),
    };
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let content_type = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    shared.lock().requests.push(RecordedRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let q = parse_query(&query);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = route(
        &shared,
        shutdown,
        &parts.method,
        &segs,
        &q,
        &content_type,
        &body,
    );
    match result {
        Ok(res) => res,
        Err(e) => error_response(&e),
    }
}

fn route(
    shared: &Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    method: &Method,
    segs: &[&str],
    q: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Result<Response<ResBody>, ApiError> {
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match (method, segs) {
        (&Method::GET, ["version"]) => ok(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-test-apiserver",
            "platform": "linux/amd64",
        })),
        (&Method::GET, ["healthz" | "readyz" | "livez"]) => {
            Ok(Response::new(full(Bytes::from_static(b"ok"))))
        }
        (&Method::GET, ["api"]) => ok(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        })),
        (&Method::POST, ["_test", "close-watches"]) => {
            shared.close_watches.send_modify(|g| *g = (g.0 + 1, false));
            ok(json!({}))
        }
        (&Method::POST, ["_test", "expire-watches"]) => {
            shared.compact();
            shared.close_watches.send_modify(|g| *g = (g.0 + 1, true));
            ok(json!({}))
        }
        (&Method::POST, ["_test", "compact"]) => {
            shared.compact();
            ok(json!({}))
        }
        (&Method::PUT, ["_test", "history-window"]) => {
            let size = q
                .get("size")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ApiError::bad_request("size=N required"))?;
            shared.set_history_window(size);
            ok(json!({}))
        }
        (&Method::GET, ["api", "v1", "nodes"]) => {
            if q.get("watch").is_some_and(|w| w == "1" || w == "true") {
                watch_nodes(shared, shutdown, q)
            } else {
                ok(list_nodes(shared, q))
            }
        }
        (&Method::POST, ["api", "v1", "nodes"]) => {
            let value = parse_object::<Node>(body)?;
            let name = str_at(&value, "/metadata/name").to_owned();
            if name.is_empty() {
                return Err(ApiError::invalid("metadata.name: Required value"));
            }
            if shared.lock().nodes.contains_key(&name) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("nodes \"{name}\" already exists"),
                ));
            }
            let stored = shared.put_node(&name, value, true);
            Ok(json_response(StatusCode::CREATED, &stored))
        }
        (&Method::GET, ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"]) => {
            let node = shared.lock().nodes.get(*name).cloned();
            node.map_or_else(|| Err(ApiError::not_found("nodes", name)), ok)
        }
        (&Method::PUT, ["api", "v1", "nodes", name]) => {
            let value = parse_object::<Node>(body)?;
            if str_at(&value, "/metadata/name") != *name {
                return Err(ApiError::bad_request(
                    "the name of the object does not match",
                ));
            }
            if !shared.lock().nodes.contains_key(*name) {
                return Err(ApiError::not_found("nodes", name));
            }
            ok(shared.put_node(name, value, false))
        }
        (&Method::DELETE, ["api", "v1", "nodes", name]) => shared
            .delete_node(name)
            .map_or_else(|| Err(ApiError::not_found("nodes", name)), ok),
        (&Method::PATCH, ["api", "v1", "nodes", name]) => {
            patch_node(shared, name, false, content_type, body).and_then(ok)
        }
        (&Method::PATCH, ["api", "v1", "nodes", name, "status"]) => {
            patch_node(shared, name, true, content_type, body).and_then(ok)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let pod = shared
                .lock()
                .pods
                .get(&((*ns).to_owned(), (*name).to_owned()))
                .cloned();
            pod.map_or_else(|| Err(ApiError::not_found("pods", name)), ok)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => {
            let mut value = parse_object::<Pod>(body)?;
            value["metadata"]["namespace"] = Value::String((*ns).to_owned());
            let stored = shared.put_pod(value);
            Ok(json_response(StatusCode::CREATED, &stored))
        }
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let old = shared
                .lock()
                .pods
                .remove(&((*ns).to_owned(), (*name).to_owned()));
            shared.save();
            old.map_or_else(|| Err(ApiError::not_found("pods", name)), ok)
        }
        (_, ["api", "v1", ..]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported here by the test API server"),
        )),
        _ => Err(ApiError::not_found("path", &segs.join("/"))),
    }
}

/// Parses a request body as JSON and checks that it is a valid `T`.
fn parse_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    serde_json::from_value::<T>(value.clone()).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(value)
}

fn list_nodes(shared: &Shared, q: &BTreeMap<String, String>) -> Value {
    let st = shared.lock();
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    // The continue token is "<resourceVersion>/<last name>".
    let (rv, after) = match q.get("continue").and_then(|c| c.split_once('/')) {
        Some((rv, name)) => (rv.to_owned(), Some(name.to_owned())),
        None => (st.rv.to_string(), None),
    };
    let items: Vec<(&String, &Value)> = st
        .nodes
        .iter()
        .filter(|(name, _)| after.as_ref().is_none_or(|a| name.as_str() > a.as_str()))
        .collect();
    let (page, more) = match limit {
        Some(l) if items.len() > l => (&items[..l], true),
        _ => (&items[..], false),
    };
    let mut metadata = json!({ "resourceVersion": rv });
    if more {
        if let Some((last, _)) = page.last() {
            metadata["continue"] = Value::String(format!("{rv}/{last}"));
        }
    }
    json!({
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": metadata,
        "items": page.iter().map(|(_, v)| (*v).clone()).collect::<Vec<_>>(),
    })
}

fn watch_nodes(
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    q: &BTreeMap<String, String>,
) -> Result<Response<ResBody>, ApiError> {
    let requested = q.get("resourceVersion").cloned().unwrap_or_default();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut initial: Vec<Bytes> = Vec::new();
    let mut live = {
        let st = shared.lock();
        if requested.is_empty() || requested == "0" {
            for node in st.nodes.values() {
                initial.push(Bytes::from(format!(
                    "{}\n",
                    json!({"type": "ADDED", "object": node})
                )));
            }
        } else {
            let from: u64 = requested.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {requested:?}"))
            })?;
            if from < st.min_rv {
                let (tx, rx) = mpsc::channel::<Bytes>(1);
                let _ = tx.try_send(expired_line_at(from, st.min_rv));
                return Ok(stream_response(rx));
            }
            for ev in st.history.iter().filter(|e| e.rv > from) {
                initial.push(ev.line.clone());
            }
        }
        shared.events.subscribe()
    };
    let from_rv: u64 = requested.parse().unwrap_or(0);
    let mut close = shared.close_watches.subscribe();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = close.changed() => {
                    let expire = close.borrow().1;
                    if expire {
                        let _ = tx.send(expired_line(from_rv)).await;
                    }
                    return;
                }
                _ = shutdown.changed() => return,
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= from_rv {
                            continue;
                        }
                        if tx.send(ev.line.clone()).await.is_err() {
                            return;
                        }
                    }
                    // Lagged or closed: end the stream, the client resumes from its version.
                    Err(_) => return,
                },
            }
        }
    });
    Ok(stream_response(rx))
}

/// A watch `ERROR` event with a 410 `Status`.
fn expired_line_at(from: u64, oldest: u64) -> Bytes {
    let status = status_json(
        410,
        "Expired",
        &format!("too old resource version: {from} ({oldest})"),
    );
    Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": status})))
}

fn expired_line(from: u64) -> Bytes {
    expired_line_at(from, from + 1)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<ResBody> {
    let mut res = Response::new(ChannelBody(rx).boxed());
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

fn patch_node(
    shared: &Shared,
    name: &str,
    status: bool,
    content_type: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let strategic = match media {
        "application/strategic-merge-patch+json" => true,
        "application/merge-patch+json" => false,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/strategic-merge-patch+json, application/merge-patch+json (got {other:?})"),
            ))
        }
    };
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("a patch must be a JSON object"));
    }
    let old = shared
        .lock()
        .nodes
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found("nodes", name))?;
    let mut new = old.clone();
    merge(&mut new, &patch, strategic, "");
    // The node strategies: a status patch cannot change spec, a main patch cannot change status.
    let keep = if status { "spec" } else { "status" };
    match old.get(keep) {
        Some(v) => new[keep] = v.clone(),
        None => {
            if let Some(obj) = new.as_object_mut() {
                obj.remove(keep);
            }
        }
    }
    if str_at(&new, "/metadata/name") != name {
        return Err(ApiError::invalid("metadata.name: field is immutable"));
    }
    serde_json::from_value::<Node>(new.clone()).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(shared.put_node(name, new, false))
}

/// The merge key of a list under a strategic merge patch, by path.
fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        "/status/conditions" | "/status/addresses" => Some("type"),
        "/spec/taints" => Some("key"),
        _ => None,
    }
}

/// Applies a merge patch (RFC 7386), or a strategic one (lists with a merge key merged by key).
fn merge(target: &mut Value, patch: &Value, strategic: bool, path: &str) {
    let Some(patch_obj) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_obj) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch_obj {
        if strategic && key.starts_with('$') {
            // Directives ($setElementOrder, $retainKeys, ...) only affect ordering here.
            continue;
        }
        let child = format!("{path}/{key}");
        if value.is_null() {
            target_obj.remove(key);
            continue;
        }
        match (strategic.then(|| merge_key(&child)).flatten(), value) {
            (Some(mk), Value::Array(items)) => {
                let existing = target_obj
                    .entry(key.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if !existing.is_array() {
                    *existing = Value::Array(Vec::new());
                }
                if let Some(list) = existing.as_array_mut() {
                    for item in items {
                        let k = item.get(mk);
                        match list.iter_mut().find(|e| e.get(mk) == k && k.is_some()) {
                            Some(slot) => merge(slot, item, strategic, &child),
                            None => list.push(item.clone()),
                        }
                    }
                }
            }
            (_, Value::Object(_)) => {
                let slot = target_obj.entry(key.clone()).or_insert(Value::Null);
                merge(slot, value, strategic, &child);
            }
            _ => {
                target_obj.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_conditions_and_annotations() {
        let mut node = json!({
            "metadata": {"name": "n", "annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
            ]}
        });
        let patch = json!({
            "metadata": {"annotations": {"a": "x", "b": null, "c": "3"}},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                {"type": "Other", "status": "True"}
            ]}
        });
        merge(&mut node, &patch, true, "");
        assert_eq!(node["metadata"]["annotations"], json!({"a": "x", "c": "3"}));
        let conds = node["status"]["conditions"].as_array().expect("list");
        assert_eq!(conds.len(), 3);
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(conds[1]["status"], "False");
        assert_eq!(conds[1]["reason"], "FlannelIsUp");
        assert_eq!(conds[2]["type"], "Other");

        let mut plain = json!({"status": {"conditions": [{"type": "Ready"}]}});
        merge(
            &mut plain,
            &json!({"status": {"conditions": [{"type": "X"}]}}),
            false,
            "",
        );
        assert_eq!(plain["status"]["conditions"], json!([{"type": "X"}]));
    }

    fn named(name: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap_or_default()
    }

    #[tokio::test]
    async fn paging_versions_and_state_file() {
        let dir = std::env::temp_dir().join(format!("test-apiserver-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("state.json");
        let _ = std::fs::remove_file(&file);
        let mut server =
            TestApiServer::start_with_state_file(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &file)
                .await
                .expect("start");
        for n in ["c", "a", "b"] {
            server.add_node(named(n));
        }
        // An unchanged update neither bumps the version nor emits an event.
        let rv = server.resource_version();
        server.update_node("a", |_| {});
        assert_eq!(server.resource_version(), rv);

        let q = |s: &str| parse_query(s);
        let page1 = list_nodes(&server.shared, &q("limit=2"));
        let names = |v: &Value| -> Vec<String> {
            v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| str_at(i, "/metadata/name").to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(names(&page1), ["a", "b"]);
        let token = page1["metadata"]["continue"]
            .as_str()
            .expect("continue")
            .to_owned();
        let page2 = list_nodes(&server.shared, &q(&format!("limit=2&continue={token}")));
        assert_eq!(names(&page2), ["c"]);
        assert!(page2["metadata"].get("continue").is_none());
        assert_eq!(page2["metadata"]["resourceVersion"], rv.to_string());

        // History window: resuming from before the window is refused.
        server.set_history_window(1);
        {
            let st = server.shared.lock();
            assert_eq!(st.history.len(), 1);
            assert_eq!(st.min_rv, rv - 1);
        }

        // The state file survives a new process.
        server.stop().await;
        drop(server);
        let again =
            TestApiServer::start_with_state_file(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &file)
                .await
                .expect("restart from file");
        assert_eq!(again.nodes().len(), 3);
        assert_eq!(again.resource_version(), rv);
        assert!(again.node("b").and_then(|n| n.metadata.uid).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn query_parsing() {
        let q = parse_query("watch=1&resourceVersion=12&labelSelector=a%3Db+c&x");
        assert_eq!(q.get("watch").map(String::as_str), Some("1"));
        assert_eq!(q.get("resourceVersion").map(String::as_str), Some("12"));
        assert_eq!(q.get("labelSelector").map(String::as_str), Some("a=b c"));
        assert_eq!(q.get("x").map(String::as_str), Some(""));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
