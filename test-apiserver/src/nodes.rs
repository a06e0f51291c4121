//! Node lists (paging) and patches (strategic merge and JSON merge).

use std::collections::BTreeMap;

use hyper::StatusCode;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Map, Value};

use crate::http::ApiError;
use crate::state::{str_at, Shared};

pub(crate) fn list_nodes(shared: &Shared, q: &BTreeMap<String, String>) -> Value {
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

pub(crate) fn patch_node(
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
pub(crate) fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        "/status/conditions" | "/status/addresses" => Some("type"),
        "/spec/taints" => Some("key"),
        _ => None,
    }
}

/// Applies a merge patch (RFC 7386), or a strategic one (lists with a merge key merged by key).
pub(crate) fn merge(target: &mut Value, patch: &Value, strategic: bool, path: &str) {
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
