//! HTTP: the accept loop, request recording and routing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::nodes::{
    list_nodes, list_pods, parse_json, patch_node, patch_pod, replace_node, replace_pod, Patch,
};
use crate::patch::validate;
use crate::response::{error_response, full, json_response, ApiError, ResBody};
use crate::state::{str_at, Shared};
use crate::watches::{watch, Scope};
use crate::RecordedRequest;
use crate::{discovery, openapi};

pub(crate) async fn accept_loop(
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
pub(crate) fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(crate) fn percent_decode(s: &str) -> String {
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

pub(crate) async fn handle(
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
    let accept = parts
        .headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let q = parse_query(&query);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let req = Req {
        method: &parts.method,
        segs: &segs,
        q: &q,
        content_type: &content_type,
        accept,
        body: &body,
    };
    match route(&shared, shutdown, &req) {
        Ok(res) => res,
        Err(e) => error_response(&e),
    }
}

/// A request as the router sees it.
pub(crate) struct Req<'a> {
    pub(crate) method: &'a Method,
    /// The path split at `/`.
    pub(crate) segs: &'a [&'a str],
    pub(crate) q: &'a BTreeMap<String, String>,
    pub(crate) content_type: &'a str,
    pub(crate) accept: &'a str,
    pub(crate) body: &'a [u8],
}

impl Req<'_> {
    fn is_watch(&self) -> bool {
        self.q.get("watch").is_some_and(|w| w == "1" || w == "true")
    }

    /// The `fieldValidation` directive (`Strict`, `Warn`, `Ignore`).
    fn field_validation(&self) -> Option<&str> {
        self.q.get("fieldValidation").map(String::as_str)
    }
}

fn aggregated_response(core: bool, version: &str) -> Response<ResBody> {
    let mut res = json_response(StatusCode::OK, &discovery::aggregated(core, version));
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(discovery::aggregated_content_type(version)),
    );
    res
}

pub(crate) fn route(
    shared: &Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    req: &Req<'_>,
) -> Result<Response<ResBody>, ApiError> {
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    let (method, segs, q, body) = (req.method, req.segs, req.q, req.body);
    let fv = req.field_validation();
    match (method, segs) {
        (&Method::GET, ["version"]) => ok(discovery::version()),
        (&Method::GET, ["healthz" | "readyz" | "livez"]) => {
            Ok(Response::new(full(Bytes::from_static(b"ok"))))
        }
        (&Method::GET, [root @ ("api" | "apis")]) => {
            match discovery::wants_aggregated(req.accept) {
                Some(version) => Ok(aggregated_response(*root == "api", version)),
                None if *root == "api" => ok(discovery::api_versions()),
                None => ok(discovery::api_groups()),
            }
        }
        (&Method::GET, ["api", "v1"]) => ok(discovery::core_v1_resources()),
        (&Method::GET, ["openapi", "v3"]) => ok(openapi::root()),
        (&Method::GET, ["openapi", "v3", "api", "v1"]) => ok(openapi::core_v1()),
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
            if req.is_watch() {
                watch(shared, shutdown, q, Scope::Nodes)
            } else {
                list_nodes(shared, q).and_then(ok)
            }
        }
        (&Method::POST, ["api", "v1", "nodes"]) => {
            let value = parse_object::<Node>(body, fv)?;
            let name = str_at(&value, "/metadata/name").to_owned();
            if name.is_empty() {
                return Err(ApiError::invalid("metadata.name: Required value"));
            }
            if shared.lock().nodes.contains_key(&name) {
                return Err(already_exists("nodes", &name));
            }
            let stored = shared.put_node(&name, value, true);
            Ok(json_response(StatusCode::CREATED, &stored))
        }
        (&Method::GET, ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"]) => {
            let node = shared.lock().nodes.get(*name).cloned();
            node.map_or_else(|| Err(ApiError::not_found("nodes", name)), ok)
        }
        (&Method::PUT, ["api", "v1", "nodes", name]) => {
            replace_node(shared, name, false, body, fv).and_then(ok)
        }
        (&Method::PUT, ["api", "v1", "nodes", name, "status"]) => {
            replace_node(shared, name, true, body, fv).and_then(ok)
        }
        (&Method::DELETE, ["api", "v1", "nodes", name]) => shared
            .delete_node(name)
            .map_or_else(|| Err(ApiError::not_found("nodes", name)), ok),
        (&Method::PATCH, ["api", "v1", "nodes", name]) => {
            patch_node(shared, name, Patch(false, req.content_type, body, fv)).and_then(ok)
        }
        (&Method::PATCH, ["api", "v1", "nodes", name, "status"]) => {
            patch_node(shared, name, Patch(true, req.content_type, body, fv)).and_then(ok)
        }
        (&Method::GET, ["api", "v1", "pods"]) if req.is_watch() => {
            watch(shared, shutdown, q, Scope::Pods(None))
        }
        (&Method::GET, ["api", "v1", "pods"]) => list_pods(shared, None, q).and_then(ok),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) if req.is_watch() => {
            watch(shared, shutdown, q, Scope::Pods(Some((*ns).to_owned())))
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            list_pods(shared, Some(ns), q).and_then(ok)
        }
        (&Method::GET, ["api", "v1", "events"] | ["api", "v1", "namespaces", _, "events"]) => {
            ok(json!({"kind": "EventList", "apiVersion": "v1",
                "metadata": {"resourceVersion": shared.lock().rv.to_string()}, "items": []}))
        }
        (
            &Method::GET,
            ["api", "v1", "namespaces", ns, "pods", name]
            | ["api", "v1", "namespaces", ns, "pods", name, "status"],
        ) => {
            let pod = shared
                .lock()
                .pods
                .get(&((*ns).to_owned(), (*name).to_owned()))
                .cloned();
            pod.map_or_else(|| Err(ApiError::not_found("pods", name)), ok)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => {
            let mut value = parse_object::<Pod>(body, fv)?;
            let name = str_at(&value, "/metadata/name").to_owned();
            if name.is_empty() {
                return Err(ApiError::invalid("metadata.name: Required value"));
            }
            match str_at(&value, "/metadata/namespace") {
                "" => {}
                other if other == *ns => {}
                other => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({other}) does not match the namespace sent on the request ({ns})"
                    )))
                }
            }
            if shared
                .lock()
                .pods
                .contains_key(&((*ns).to_owned(), name.clone()))
            {
                return Err(already_exists("pods", &name));
            }
            value["metadata"]["namespace"] = Value::String((*ns).to_owned());
            let stored = shared.put_pod(value);
            Ok(json_response(StatusCode::CREATED, &stored))
        }
        (&Method::PUT, ["api", "v1", "namespaces", ns, "pods", name]) => {
            replace_pod(shared, ns, name, body, fv).and_then(ok)
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
            patch_pod(shared, ns, name, Patch(false, req.content_type, body, fv)).and_then(ok)
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            patch_pod(shared, ns, name, Patch(true, req.content_type, body, fv)).and_then(ok)
        }
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "pods", name]) => shared
            .delete_pod(ns, name)
            .map_or_else(|| Err(ApiError::not_found("pods", name)), ok),
        (_, ["api", "v1", ..]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported here by the test API server"),
        )),
        _ => Err(ApiError::not_found("path", &segs.join("/"))),
    }
}

fn already_exists(kind: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "AlreadyExists",
        format!("{kind} \"{name}\" already exists"),
    )
}

/// Parses a request body as JSON and checks that it is a valid `T`.
pub(crate) fn parse_object<T: serde::de::DeserializeOwned + serde::Serialize>(
    body: &[u8],
    field_validation: Option<&str>,
) -> Result<Value, ApiError> {
    let value = parse_json(body)?;
    validate::<T>(&value, field_validation)?;
    Ok(value)
}
