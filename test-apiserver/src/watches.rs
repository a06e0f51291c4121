//! Node watch streams: replay from history, live events, 410 "too old resource version".

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::nodes::selector;
use crate::response::{status_json, ApiError, ResBody};
use crate::state::Shared;

/// A response body fed by a channel: the watch stream.
#[derive(Debug)]
pub(crate) struct ChannelBody(mpsc::Receiver<Bytes>);

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

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// `/api/v1/nodes`.
    Nodes,
    /// `/api/v1/pods` (`None`) or `/api/v1/namespaces/<ns>/pods`.
    Pods(Option<String>),
}

impl Scope {
    fn covers(&self, object: &Value) -> bool {
        match self {
            Scope::Nodes => object["kind"] == "Node",
            Scope::Pods(ns) => {
                object["kind"] == "Pod"
                    && ns
                        .as_deref()
                        .is_none_or(|ns| object.pointer("/metadata/namespace") == Some(&json!(ns)))
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Scope::Nodes => "Node",
            Scope::Pods(_) => "Pod",
        }
    }
}

/// `GET /api/v1/nodes?watch=1` (or pods): events after `resourceVersion` (or synthetic
/// `ADDED` events for the current objects when it is empty or `0`) that match the request's
/// selectors, then live ones. Nodes and pods share one history (one resource version
/// sequence, as in etcd), so the history window counts both. With `allowWatchBookmarks=true`, `BOOKMARK` events carry the newest version the
/// stream has passed, every bookmark interval and when `timeoutSeconds` ends the stream; with
/// `sendInitialEvents=true`, a bookmark annotated `k8s.io/initial-events-end` follows the
/// initial events (the watch-list protocol).
pub(crate) fn watch(
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    q: &BTreeMap<String, String>,
    scope: Scope,
) -> Result<Response<ResBody>, ApiError> {
    let requested = q.get("resourceVersion").cloned().unwrap_or_default();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let bookmarks = flag("allowWatchBookmarks");
    let initial_end = flag("sendInitialEvents");
    let sel = selector(q)?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut initial: Vec<Bytes> = Vec::new();
    let (mut live, mut last_rv, interval) = {
        let st = shared.lock();
        if requested.is_empty() || requested == "0" {
            let current: Vec<&Value> = match &scope {
                Scope::Nodes => st.nodes.values().collect(),
                Scope::Pods(_) => st.pods.values().filter(|p| scope.covers(p)).collect(),
            };
            for object in current.into_iter().filter(|o| sel.matches(o)) {
                initial.push(Bytes::from(format!(
                    "{}\n",
                    json!({"type": "ADDED", "object": object})
                )));
            }
            if initial_end && bookmarks {
                initial.push(bookmark_line(scope.kind(), st.rv, true));
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
                if scope.covers(&ev.object) && sel.matches(&ev.object) {
                    initial.push(ev.line.clone());
                }
            }
        }
        (shared.events.subscribe(), st.rv, st.bookmark_interval)
    };
    let from_rv: u64 = requested.parse().unwrap_or(0);
    let kind = scope.kind();
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
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    if bookmarks {
                        let _ = tx.send(bookmark_line(kind, last_rv, false)).await;
                    }
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    if tx.send(bookmark_line(kind, last_rv, false)).await.is_err() {
                        return;
                    }
                }
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
                        last_rv = last_rv.max(ev.rv);
                        if !scope.covers(&ev.object) || !sel.matches(&ev.object) {
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

/// A `BOOKMARK` event: an object of `kind` carrying only a resource version (and, for the end
/// of the initial events of a watch-list, the `k8s.io/initial-events-end` annotation).
pub(crate) fn bookmark_line(kind: &str, rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({"kind": kind, "apiVersion": "v1", "metadata": meta});
    Bytes::from(format!(
        "{}\n",
        json!({"type": "BOOKMARK", "object": object})
    ))
}

/// A watch `ERROR` event with a 410 `Status`.
pub(crate) fn expired_line_at(from: u64, oldest: u64) -> Bytes {
    let status = status_json(
        410,
        "Expired",
        &format!("too old resource version: {from} ({oldest})"),
    );
    Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": status})))
}

pub(crate) fn expired_line(from: u64) -> Bytes {
    expired_line_at(from, from + 1)
}

pub(crate) fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<ResBody> {
    let mut res = Response::new(ChannelBody(rx).boxed());
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}
