//! Patches (strategic merge, JSON merge RFC 7386, JSON patch RFC 6902) and strict field
//! validation (`fieldValidation=Strict`), as the API server applies them.

use hyper::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::response::ApiError;

/// The patch media types served (also listed in the `415` error).
const PATCH_TYPES: &str = "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json";

/// Applies a `PATCH` body of `content_type` to `old`.
pub(crate) fn apply_patch(old: &Value, content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    let mut new = old.clone();
    match media {
        "application/strategic-merge-patch+json" | "application/merge-patch+json" => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a patch must be a JSON object"));
            }
            merge(
                &mut new,
                &patch,
                media == "application/strategic-merge-patch+json",
                "",
            );
        }
        "application/json-patch+json" => json_patch(&mut new, &patch)?,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: {PATCH_TYPES} (got {other:?})"),
            ))
        }
    }
    Ok(new)
}

/// The merge key of a list under a strategic merge patch, by path.
fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        "/status/conditions" | "/status/addresses" => Some("type"),
        "/spec/taints" => Some("key"),
        "/spec/containers"
        | "/spec/initContainers"
        | "/spec/containers/env"
        | "/spec/initContainers/env"
        | "/spec/volumes"
        | "/spec/containers/volumeMounts" => Some("name"),
        "/spec/containers/ports" => Some("containerPort"),
        "/metadata/ownerReferences" => Some("uid"),
        _ => None,
    }
}

/// Applies a merge patch (RFC 7386), or a strategic one (lists with a merge key merged by key,
/// `$patch: delete` items removed, other `$` directives ignored).
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
                        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                            list.retain(|e| k.is_none() || e.get(mk) != k);
                            continue;
                        }
                        match list.iter_mut().find(|e| e.get(mk) == k && k.is_some()) {
                            Some(slot) => merge(slot, item, strategic, &child),
                            None => {
                                let mut fresh = Value::Object(Map::new());
                                merge(&mut fresh, item, strategic, &child);
                                list.push(fresh);
                            }
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

/// The parent of a JSON pointer's target and the last token (unescaped).
fn split_pointer(pointer: &str) -> Result<(String, String), ApiError> {
    if !pointer.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "invalid JSON pointer {pointer:?}"
        )));
    }
    let (parent, last) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    Ok((
        parent.to_owned(),
        last.replace("~1", "/").replace("~0", "~"),
    ))
}

fn op_path<'a>(op: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    op.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(format!("JSON patch operation without {key:?}: {op}")))
}

fn remove_at(doc: &mut Value, pointer: &str) -> Result<Value, ApiError> {
    let (parent, last) = split_pointer(pointer)?;
    let missing = || ApiError::invalid(format!("unable to remove nonexistent key: {pointer}"));
    match doc.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

fn add_at(doc: &mut Value, pointer: &str, value: Value, replace: bool) -> Result<(), ApiError> {
    if pointer.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(pointer)?;
    let missing = || ApiError::invalid(format!("doc is missing path: {pointer:?}"));
    match doc.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(m) => {
            if replace && !m.contains_key(&last) {
                return Err(missing());
            }
            m.insert(last, value);
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| missing())?;
                match (replace, i < a.len(), i == a.len()) {
                    (true, true, _) => a[i] = value,
                    (false, true, _) | (false, _, true) => a.insert(i, value),
                    _ => return Err(missing()),
                }
            }
        }
        _ => return Err(missing()),
    }
    Ok(())
}

/// Applies an RFC 6902 JSON patch (all or nothing: `doc` is unchanged on error).
fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be a list of operations"))?;
    let mut work = doc.clone();
    for op in ops {
        let path = op_path(op, "path")?;
        let value = || {
            op.get("value").cloned().ok_or_else(|| {
                ApiError::invalid(format!("JSON patch operation without value: {op}"))
            })
        };
        match op.get("op").and_then(Value::as_str).unwrap_or("") {
            "add" => add_at(&mut work, path, value()?, false)?,
            "replace" => add_at(&mut work, path, value()?, true)?,
            "remove" => {
                remove_at(&mut work, path)?;
            }
            "move" => {
                let moved = remove_at(&mut work, op_path(op, "from")?)?;
                add_at(&mut work, path, moved, false)?;
            }
            "copy" => {
                let from = op_path(op, "from")?;
                let copied = work.pointer(from).cloned().ok_or_else(|| {
                    ApiError::invalid(format!("doc is missing from path: {from:?}"))
                })?;
                add_at(&mut work, path, copied, false)?;
            }
            "test" => {
                if work.pointer(path) != Some(&value()?) {
                    return Err(ApiError::invalid(format!("testing value {path} failed")));
                }
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unexpected JSON patch operation {other:?}"
                )))
            }
        }
    }
    *doc = work;
    Ok(())
}

/// Checks that `value` is a valid `T`; with `fieldValidation=Strict`, also that it has no
/// field `T` does not know (found by a round trip through `T`), as the API server's strict
/// decoding does.
pub(crate) fn validate<T: DeserializeOwned + Serialize>(
    value: &Value,
    field_validation: Option<&str>,
) -> Result<(), ApiError> {
    let typed: T =
        serde_json::from_value(value.clone()).map_err(|e| ApiError::invalid(e.to_string()))?;
    if field_validation != Some("Strict") {
        return Ok(());
    }
    let known = serde_json::to_value(&typed).unwrap_or(Value::Null);
    let mut unknown = Vec::new();
    unknown_fields(value, &known, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(());
    }
    let msg = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::bad_request(format!(
        "strict decoding error: {msg}"
    )))
}

fn unknown_fields(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, v) in i {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &child, out),
                    None if v.is_null() => {}
                    None => out.push(child),
                }
            }
        }
        (Value::Object(i), _) => {
            // Everything under an object that decoded to nothing, e.g. `{}` for an optional
            // struct whose fields are all unknown.
            for (key, v) in i {
                if !v.is_null() {
                    out.push(if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    });
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (iv, kv)) in i.iter().zip(k).enumerate() {
                unknown_fields(iv, kv, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

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
                {"type": "Other", "status": "True"},
                {"type": "Ready", "$patch": "delete"}
            ]}
        });
        merge(&mut node, &patch, true, "");
        assert_eq!(node["metadata"]["annotations"], json!({"a": "x", "c": "3"}));
        let conds = node["status"]["conditions"].as_array().expect("list");
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[0]["status"], "False");
        assert_eq!(conds[0]["reason"], "FlannelIsUp");
        assert_eq!(conds[1]["type"], "Other");

        let mut plain = json!({"status": {"conditions": [{"type": "Ready"}]}});
        merge(
            &mut plain,
            &json!({"status": {"conditions": [{"type": "X"}]}}),
            false,
            "",
        );
        assert_eq!(plain["status"]["conditions"], json!([{"type": "X"}]));
    }

    #[test]
    fn json_patch_operations() {
        let old = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"taints": [{"key": "k"}]}});
        let p = json!([
            {"op": "add", "path": "/metadata/labels/b", "value": "2"},
            {"op": "replace", "path": "/metadata/labels/a", "value": "x"},
            {"op": "add", "path": "/spec/taints/-", "value": {"key": "k2"}},
            {"op": "copy", "from": "/metadata/labels/b", "path": "/metadata/labels/c"},
            {"op": "move", "from": "/metadata/labels/c", "path": "/metadata/labels/d~1e"},
            {"op": "remove", "path": "/spec/taints/0"},
            {"op": "test", "path": "/metadata/labels/b", "value": "2"}
        ]);
        let new = apply_patch(
            &old,
            "application/json-patch+json",
            p.to_string().as_bytes(),
        )
        .expect("patch");
        assert_eq!(
            new,
            json!({"metadata": {"labels": {"a": "x", "b": "2", "d/e": "2"}},
                   "spec": {"taints": [{"key": "k2"}]}})
        );
        let bad = json!([{"op": "test", "path": "/metadata/labels/a", "value": "no"}]);
        let e = apply_patch(
            &old,
            "application/json-patch+json",
            bad.to_string().as_bytes(),
        )
        .expect_err("test op fails");
        assert_eq!(e.code, StatusCode::UNPROCESSABLE_ENTITY);
        let missing = json!([{"op": "remove", "path": "/nope"}]);
        assert!(apply_patch(
            &old,
            "application/json-patch+json",
            missing.to_string().as_bytes()
        )
        .is_err());
        assert_eq!(
            apply_patch(&old, "text/plain", b"{}")
                .expect_err("415")
                .code,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn strict_validation_names_unknown_fields() {
        let good = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n",
            "labels": {}, "creationTimestamp": null}, "spec": {"podCIDR": "10.244.1.0/24"}});
        validate::<Node>(&good, Some("Strict")).expect("valid");
        let bad = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "x", "bogus": 1},
            "status": {"addresses": [{"type": "InternalIP", "address": "a", "extra": true}]}});
        let e = validate::<Node>(&bad, Some("Strict")).expect_err("strict");
        assert_eq!(e.code, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("unknown field \"spec.bogus\""),
            "{}",
            e.message
        );
        assert!(
            e.message
                .contains("unknown field \"status.addresses[0].extra\""),
            "{}",
            e.message
        );
        validate::<Node>(&bad, Some("Ignore")).expect("not strict");
        assert!(validate::<Node>(&json!({"spec": {"podCIDR": 5}}), None).is_err());
    }
}
