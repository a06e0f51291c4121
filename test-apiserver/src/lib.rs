//! A small Kubernetes API server for tests: the part of the core/v1 API that flanneld uses
//! (nodes, node status, pods), on the real wire protocol, so a normal Kubernetes client —
//! kube-rs, or the real `kubectl` (see `tests/kubectl.rs`) — talks to it over plain HTTP without
//! knowing it is not a real server.
//!
//! Served:
//!
//! * Discovery: `GET /version`, `/api`, `/api/v1`, `/apis`, and aggregated discovery
//!   (`apidiscovery.k8s.io/v2`) for `/api` and `/apis` when `Accept` asks for it, as kubectl
//!   does. OpenAPI v3 (`/openapi/v3`, `/openapi/v3/api/v1`) lists the operations and their
//!   query parameters, so kubectl leaves field validation to the server. Works with kubectl
//!   1.29 and newer (checked: 1.29–1.33, 1.37); 1.28 and older validate against the protobuf
//!   OpenAPI v2 document, which is not served (they need `--validate=false`).
//! * `GET /api/v1/nodes` — a `NodeList` with `metadata.resourceVersion` (`limit`/`continue`
//!   paging, `labelSelector` and `fieldSelector` equality terms honoured).
//! * `GET /api/v1/nodes?watch=1&resourceVersion=N` — a chunked stream of newline-separated
//!   watch events `{"type":"ADDED|MODIFIED|DELETED","object":…}` for every change after `N`
//!   (selectors honoured); with `N` empty or `0`, synthetic `ADDED` events for the current
//!   nodes first. When `N` is older than the retained history (see
//!   [`TestApiServer::set_history_window`], [`TestApiServer::compact`]) the stream carries one
//!   `ERROR` event with a 410 `Status` ("too old resource version"), as a real API server
//!   does. `timeoutSeconds` ends the stream. `allowWatchBookmarks=true` adds `BOOKMARK` events
//!   (every [`TestApiServer::set_bookmark_interval`] and at the timeout); with
//!   `sendInitialEvents=true` the initial events end with the `k8s.io/initial-events-end`
//!   bookmark.
//! * `GET|PUT|DELETE|PATCH /api/v1/nodes/<name>`, `POST /api/v1/nodes`,
//!   `GET|PUT|PATCH /api/v1/nodes/<name>/status`.
//! * `GET /api/v1/pods`, `GET|POST /api/v1/namespaces/<ns>/pods` (lists, and watches as for
//!   nodes; nodes and pods share one resource version sequence and watch history),
//!   `GET|PUT|PATCH|DELETE /api/v1/namespaces/<ns>/pods/<name>`, `PATCH …/status`; empty
//!   `EventList`s (for `kubectl describe`).
//! * `PATCH` with `application/strategic-merge-patch+json` (maps merged, `null` deletes a key,
//!   `status.conditions`/`status.addresses` merged by `type`, `spec.taints` by `key`,
//!   containers by `name`, `$patch: delete` honoured, other lists replaced),
//!   `application/merge-patch+json` (RFC 7386) or `application/json-patch+json` (RFC 6902).
//!   A `/status` write keeps the old `spec`, a main-resource write keeps the old `status` (the
//!   API server's strategies); a write that changes nothing neither bumps the resource version
//!   nor emits an event.
//! * Writes carrying `metadata.resourceVersion` are preconditions: a stale one is a 409
//!   `Conflict`. Patches without one are re-applied if the object changed meanwhile.
//! * `fieldValidation=Strict` rejects unknown fields (400, "strict decoding error: unknown
//!   field …") by comparing the object with its round trip through k8s-openapi's type.
//! * `GET /healthz`, and for harnesses `POST /_test/close-watches`,
//!   `POST /_test/expire-watches`, `POST /_test/compact`, `PUT /_test/history-window?size=N`.
//!
//! Errors are `Status` objects with the usual `reason` (`NotFound`, `AlreadyExists`,
//! `Conflict`, ...). Every request is recorded ([`TestApiServer::requests`]) so tests can
//! assert what a client sent. No authentication, no TLS, no admission, no server-side apply,
//! no `Table` output (kubectl prints NAME and AGE columns): it trusts its clients.

mod discovery;
mod http;
mod nodes;
mod openapi;
mod patch;
mod response;
mod selectors;
mod state;
mod watches;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::http::accept_loop;
use crate::state::{load_state, Shared, State};

/// Default number of node events kept for watches that resume from an older version.
pub const DEFAULT_HISTORY_WINDOW: usize = 1000;

/// Default interval between watch bookmarks (the API server's is about a minute).
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

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
    /// written back (atomically) after changes: within 50 ms, a burst in one write, and at
    /// once when the server stops. The file holds
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
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
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
                saver: Default::default(),
            }),
            addr,
            running: None,
        };
        state::Saver::spawn(&server.shared);
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
        self.shared.flush();
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

    /// Sets how often watches with `allowWatchBookmarks=true` get a `BOOKMARK` event (for
    /// watches started afterwards).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.lock().bookmark_interval = interval.max(Duration::from_millis(10));
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
        self.shared.flush();
    }
}

fn from_value<T: serde::de::DeserializeOwned + Default>(v: Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_query, percent_decode};
    use crate::nodes::list_nodes;
    use crate::state::str_at;
    use serde_json::json;

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
        let page1 = list_nodes(&server.shared, &q("limit=2")).expect("list");
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
        let page2 =
            list_nodes(&server.shared, &q(&format!("limit=2&continue={token}"))).expect("list");
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
