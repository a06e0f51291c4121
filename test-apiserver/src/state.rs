//! The server's state (nodes, pods, resource versions, watch history), its mutations, and the
//! optional state file.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch};

use crate::response::ApiError;
use crate::{RecordedRequest, ServerError};

/// A node change as watchers see it.
#[derive(Debug)]
pub(crate) struct NodeEvent {
    pub(crate) rv: u64,
    /// The serialized watch event line, newline included.
    pub(crate) line: Bytes,
    /// The object, for watches with selectors.
    pub(crate) object: Value,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) rv: u64,
    pub(crate) nodes: BTreeMap<String, Value>,
    pub(crate) pods: BTreeMap<(String, String), Value>,
    pub(crate) history: VecDeque<Arc<NodeEvent>>,
    pub(crate) history_window: usize,
    /// Watches from a resource version below this get 410 Gone.
    pub(crate) min_rv: u64,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) uid: u64,
    /// How often watches that allow bookmarks get one.
    pub(crate) bookmark_interval: Duration,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) events: broadcast::Sender<Arc<NodeEvent>>,
    /// Bumped to end every open watch; the flag says whether with a 410 `ERROR` event.
    pub(crate) close_watches: watch::Sender<(u64, bool)>,
    pub(crate) state_file: Option<PathBuf>,
    /// Writes to the state file are coalesced (see [`Shared::save`]).
    pub(crate) saver: Saver,
}

/// Coalesces state-file writes: a burst of changes costs one write of the whole state, not
/// one per change (5,000 Nodes loaded one by one would otherwise write the file 5,000 times).
#[derive(Debug, Default)]
pub(crate) struct Saver {
    /// A write is pending.
    pending: Mutex<bool>,
    wake: Condvar,
}

/// Longest a change waits before the state file holds it.
const SAVE_DELAY: Duration = Duration::from_millis(50);

impl Saver {
    fn pending(&self) -> MutexGuard<'_, bool> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the thread that writes `shared`'s state file after changes.
    pub(crate) fn spawn(shared: &Arc<Shared>) {
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let _ = std::thread::Builder::new()
            .name("state-file".into())
            .spawn(move || loop {
                {
                    let Some(shared) = weak.upgrade() else { return };
                    let mut f = shared.saver.pending();
                    while !*f {
                        let (g, _) = shared
                            .saver
                            .wake
                            .wait_timeout(f, Duration::from_secs(1))
                            .unwrap_or_else(|p| p.into_inner());
                        f = g;
                        // Only this thread holds the state: the server is gone.
                        if Arc::strong_count(&shared) == 1 {
                            return;
                        }
                    }
                }
                std::thread::sleep(SAVE_DELAY);
                let Some(shared) = weak.upgrade() else { return };
                shared.flush();
            });
    }
}

pub(crate) fn now_rfc3339() -> String {
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
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a node event (state locked by the caller) and publishes it.
    pub(crate) fn publish(&self, st: &mut State, kind: &'static str, object: &Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let ev = Arc::new(NodeEvent {
            rv: st.rv,
            line: Bytes::from(line),
            object: object.clone(),
        });
        st.history.push_back(ev.clone());
        trim_history(st);
        let _ = self.events.send(ev);
    }

    pub(crate) fn set_history_window(&self, size: usize) {
        let mut st = self.lock();
        st.history_window = size;
        trim_history(&mut st);
    }

    pub(crate) fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.min_rv = st.rv;
    }

    /// Stores a node; `fill` sets uid and creation time when missing. Emits ADDED or
    /// MODIFIED; an unchanged object is stored without a new version or event.
    pub(crate) fn put_node(&self, name: &str, value: Value, fill: bool) -> Value {
        let mut st = self.lock();
        let stored = self.put_node_locked(&mut st, name, value, fill);
        drop(st);
        self.save();
        stored
    }

    /// Replaces an existing node as `PUT` and `PATCH` do: 404 when it does not exist, 409
    /// Conflict when `expected` (a resourceVersion the client sent, or the one a patch was
    /// computed from) is not the stored one.
    pub(crate) fn update_node_checked(
        &self,
        name: &str,
        value: Value,
        expected: &str,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        let current = st
            .nodes
            .get(name)
            .ok_or_else(|| ApiError::not_found("nodes", name))?;
        check_version("nodes", name, current, expected)?;
        let stored = self.put_node_locked(&mut st, name, value, false);
        drop(st);
        self.save();
        Ok(stored)
    }

    fn put_node_locked(&self, st: &mut State, name: &str, mut value: Value, fill: bool) -> Value {
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
            fill_metadata(st, &mut value, name);
        }
        st.rv += 1;
        set_rv(&mut value, st.rv);
        st.nodes.insert(name.to_owned(), value.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.publish(st, kind, &value);
        value
    }

    /// Replaces an existing pod (see [`Shared::update_node_checked`]).
    pub(crate) fn update_pod_checked(
        &self,
        ns: &str,
        name: &str,
        mut value: Value,
        expected: &str,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        let key = (ns.to_owned(), name.to_owned());
        let current = st
            .pods
            .get(&key)
            .ok_or_else(|| ApiError::not_found("pods", name))?;
        check_version("pods", name, current, expected)?;
        let old = current.clone();
        set_type_meta(&mut value, "Pod");
        if let Some(meta) = value.get_mut("metadata") {
            for key in ["uid", "creationTimestamp", "namespace", "name"] {
                if let Some(v) = old.pointer(&format!("/metadata/{key}")) {
                    meta[key] = v.clone();
                }
            }
        }
        if same_object(&old, &value) {
            return Ok(old);
        }
        st.rv += 1;
        set_rv(&mut value, st.rv);
        st.pods.insert(key, value.clone());
        self.publish(&mut st, "MODIFIED", &value);
        drop(st);
        self.save();
        Ok(value)
    }

    pub(crate) fn delete_node(&self, name: &str) -> Option<Value> {
        let mut st = self.lock();
        let old = st.nodes.remove(name)?;
        Some(self.deleted(st, old))
    }

    pub(crate) fn put_pod(&self, mut value: Value) -> Value {
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
        let kind = if st.pods.contains_key(&(ns.clone(), name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.pods.insert((ns, name), value.clone());
        self.publish(&mut st, kind, &value);
        drop(st);
        self.save();
        value
    }

    /// Deletes a pod (emits DELETED).
    pub(crate) fn delete_pod(&self, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        let old = st.pods.remove(&(ns.to_owned(), name.to_owned()))?;
        Some(self.deleted(st, old))
    }

    /// An object just removed from `st`: a new resourceVersion on it, DELETED to the
    /// watchers, the state saved. Returns it as deleted.
    fn deleted(&self, mut st: MutexGuard<'_, State>, mut old: Value) -> Value {
        st.rv += 1;
        set_rv(&mut old, st.rv);
        self.publish(&mut st, "DELETED", &old);
        drop(st);
        self.save();
        old
    }

    /// Records that the state changed: the saver thread writes the file within
    /// [`SAVE_DELAY`]; [`Shared::flush`] (on stop) writes it at once.
    pub(crate) fn save(&self) {
        if self.state_file.is_none() {
            return;
        }
        *self.saver.pending() = true;
        self.saver.wake.notify_one();
    }

    /// Writes the state file now if a change is pending (atomically: temporary file +
    /// rename).
    pub(crate) fn flush(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        {
            let mut f = self.saver.pending();
            if !*f {
                return;
            }
            *f = false;
        }
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

pub(crate) fn trim_history(st: &mut State) {
    while st.history.len() > st.history_window {
        if let Some(ev) = st.history.pop_front() {
            st.min_rv = st.min_rv.max(ev.rv);
        }
    }
    if st.history_window == 0 {
        st.min_rv = st.rv;
    }
}

pub(crate) fn load_state(st: &mut State, path: &Path) -> Result<(), ServerError> {
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

pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn set_type_meta(v: &mut Value, kind: &str) {
    if let Some(obj) = v.as_object_mut() {
        obj.insert("apiVersion".into(), Value::String("v1".into()));
        obj.insert("kind".into(), Value::String(kind.into()));
        obj.entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

pub(crate) fn set_rv(v: &mut Value, rv: u64) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

pub(crate) fn fill_metadata(st: &mut State, v: &mut Value, name: &str) {
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
pub(crate) fn same_object(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

/// 409 Conflict unless `expected` is empty or the stored object's resourceVersion.
fn check_version(kind: &str, name: &str, current: &Value, expected: &str) -> Result<(), ApiError> {
    if expected.is_empty() || expected == str_at(current, "/metadata/resourceVersion") {
        return Ok(());
    }
    Err(ApiError::new(
        hyper::StatusCode::CONFLICT,
        "Conflict",
        format!("Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
    ))
}
