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
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::http::{status_json, ApiError, ResBody};
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

pub(crate) fn watch_nodes(
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
