//! Node and pod lists (selectors, paging), patches and replacements with the API server's
//! rules: resourceVersion preconditions (409), status/main-resource separation, validation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::patch::{apply_patch, validate};
use crate::response::ApiError;
use crate::selectors::Selector;
use crate::state::{str_at, Shared};

/// The `Selector` a list or watch request asks for.
pub(crate) fn selector(q: &BTreeMap<String, String>) -> Result<Selector, ApiError> {
    let get = |k: &str| q.get(k).map_or("", String::as_str);
    Selector::parse(get("labelSelector"), get("fieldSelector"))
}

/// A `<kind>List` page of `items` (sorted by key) that match the request's selectors;
/// `limit`/`continue` paging, the continue token being `<resourceVersion>/<last key>`.
fn list_page<'a>(
    kind: &str,
    rv: u64,
    items: impl Iterator<Item = (String, &'a Value)>,
    q: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    let sel = selector(q)?;
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let (rv, after) = match q.get("continue").and_then(|c| c.split_once('/')) {
        Some((rv, key)) => (rv.to_owned(), Some(key.to_owned())),
        None => (rv.to_string(), None),
    };
    let items: Vec<(String, &Value)> = items
        .filter(|(key, _)| after.as_ref().is_none_or(|a| key.as_str() > a.as_str()))
        .filter(|(_, v)| sel.matches(v))
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
    Ok(json!({
        "kind": format!("{kind}List"),
        "apiVersion": "v1",
        "metadata": metadata,
        "items": page.iter().map(|(_, v)| (*v).clone()).collect::<Vec<_>>(),
    }))
}

pub(crate) fn list_nodes(shared: &Shared, q: &BTreeMap<String, String>) -> Result<Value, ApiError> {
    let st = shared.lock();
    list_page(
        "Node",
        st.rv,
        st.nodes.iter().map(|(k, v)| (k.clone(), v)),
        q,
    )
}

/// Pods of one namespace, or of all when `ns` is `None`.
pub(crate) fn list_pods(
    shared: &Shared,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    let st = shared.lock();
    let items = st
        .pods
        .iter()
        .filter(|((pns, _), _)| ns.is_none_or(|n| n == pns))
        .map(|((pns, name), v)| (format!("{pns}/{name}"), v));
    list_page("Pod", st.rv, items, q)
}

/// What the client sent as `metadata.resourceVersion` (a precondition when not empty).
fn sent_version(v: &Value) -> String {
    str_at(v, "/metadata/resourceVersion").to_owned()
}

/// Keeps `old`'s `keep` section (`spec` or `status`) in `new`: the node and pod strategies
/// let a status write change only status, and a main write change everything else.
fn keep_section(old: &Value, new: &mut Value, keep: &str) {
    match old.get(keep) {
        Some(v) => new[keep] = v.clone(),
        None => {
            if let Some(obj) = new.as_object_mut() {
                obj.remove(keep);
            }
        }
    }
}

/// How many times a patch is re-applied when the object changed under it (the API server
/// retries patches without a resourceVersion precondition the same way).
const PATCH_ATTEMPTS: usize = 5;

/// `PATCH /api/v1/nodes/<name>[/status]`.
pub(crate) fn patch_node(shared: &Shared, name: &str, patch: Patch) -> Result<Value, ApiError> {
    patch.apply::<Node>(
        ("nodes", name),
        || shared.lock().nodes.get(name).cloned(),
        |new, rv| shared.update_node_checked(name, new, rv),
    )
}

/// `PUT /api/v1/nodes/<name>[/status]`.
pub(crate) fn replace_node(
    shared: &Shared,
    name: &str,
    status: bool,
    body: &[u8],
    field_validation: Option<&str>,
) -> Result<Value, ApiError> {
    let mut value = parse_json(body)?;
    validate::<Node>(&value, field_validation)?;
    if str_at(&value, "/metadata/name") != name {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    if status {
        let old = shared
            .lock()
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found("nodes", name))?;
        keep_section(&old, &mut value, "spec");
    }
    let sent = sent_version(&value);
    shared.update_node_checked(name, value, &sent)
}

/// `PATCH /api/v1/namespaces/<ns>/pods/<name>[/status]`.
pub(crate) fn patch_pod(
    shared: &Shared,
    ns: &str,
    name: &str,
    patch: Patch,
) -> Result<Value, ApiError> {
    let key = (ns.to_owned(), name.to_owned());
    patch.apply::<Pod>(
        ("pods", name),
        || shared.lock().pods.get(&key).cloned(),
        |new, rv| shared.update_pod_checked(ns, name, new, rv),
    )
}

/// `PUT /api/v1/namespaces/<ns>/pods/<name>`.
pub(crate) fn replace_pod(
    shared: &Shared,
    ns: &str,
    name: &str,
    body: &[u8],
    field_validation: Option<&str>,
) -> Result<Value, ApiError> {
    let value = parse_json(body)?;
    validate::<Pod>(&value, field_validation)?;
    if str_at(&value, "/metadata/name") != name {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let sent = sent_version(&value);
    shared.update_pod_checked(ns, name, value, &sent)
}

pub(crate) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// One PATCH request: the `/status` subresource (the patch may change `status` only, else
/// anything but `status`), its content type, body and `fieldValidation`.
pub(crate) struct Patch<'a>(
    pub(crate) bool,
    pub(crate) &'a str,
    pub(crate) &'a [u8],
    pub(crate) Option<&'a str>,
);

impl Patch<'_> {
    /// Reads the object (`kind` as in the URL, `name`) with `get`, applies the patch, keeps
    /// the section it may not change, checks the name and the schema of `T`, and stores it
    /// with `update` against the resourceVersion the patch carried, else against the one
    /// read, retrying on a conflict (the API server's optimistic concurrency).
    fn apply<T: DeserializeOwned + Serialize>(
        &self,
        (kind, name): (&str, &str),
        get: impl Fn() -> Option<Value>,
        update: impl Fn(Value, &str) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let Patch(status, content_type, body, field_validation) = *self;
        let mut last = None;
        for _ in 0..PATCH_ATTEMPTS {
            let old = get().ok_or_else(|| ApiError::not_found(kind, name))?;
            let mut new = apply_patch(&old, content_type, body)?;
            keep_section(&old, &mut new, if status { "spec" } else { "status" });
            if str_at(&new, "/metadata/name") != name {
                return Err(ApiError::invalid("metadata.name: field is immutable"));
            }
            validate::<T>(&new, field_validation)?;
            let old_rv = sent_version(&old);
            if sent_version(&new) != old_rv {
                // The patch carried a resourceVersion: compare it, do not retry.
                let sent = sent_version(&new);
                return update(new, &sent);
            }
            match update(new, &old_rv) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ApiError::invalid("patch failed")))
    }
}
