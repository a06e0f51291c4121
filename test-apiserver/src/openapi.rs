//! OpenAPI v3 (`/openapi/v3`, `/openapi/v3/api/v1`): the operations served, each tagged with
//! its group/version/kind and listing the query parameters it honours. kubectl reads this to
//! learn that the server validates fields itself (`fieldValidation` on `PATCH`), so it sends
//! `fieldValidation=Strict` instead of validating client-side against `/openapi/v2`.
//!
//! The document carries no component schemas: kubectl then builds `apply` patches from its
//! compiled-in types (as for any server without schemas), and the server validates objects
//! against k8s-openapi's types ([`crate::patch::validate`]).

use serde_json::{json, Map, Value};

/// The `hash` of the (static) `api/v1` document, for client caches.
const HASH: &str = "flannel-rs-test-apiserver-1";

/// `GET /openapi/v3`.
pub(crate) fn root() -> Value {
    json!({"paths": {"api/v1": {"serverRelativeURL": format!("/openapi/v3/api/v1?hash={HASH}")}}})
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn op(id: &str, action: &str, kind: &str, params: &[&str]) -> Value {
    let mut parameters: Vec<Value> = params.iter().map(|p| param(p)).collect();
    if ["post", "put", "patch"].contains(&action) {
        parameters.extend(["dryRun", "fieldManager", "fieldValidation"].map(param));
    }
    if action == "patch" {
        parameters.push(param("force"));
    }
    json!({
        "operationId": id,
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": kind},
        "parameters": parameters,
        "responses": {"200": {"description": "OK"}},
    })
}

const LIST_PARAMS: &[&str] = &[
    "allowWatchBookmarks",
    "continue",
    "fieldSelector",
    "labelSelector",
    "limit",
    "resourceVersion",
    "timeoutSeconds",
    "watch",
];

/// `GET /openapi/v3/api/v1`.
pub(crate) fn core_v1() -> Value {
    let mut paths = Map::new();
    for (kind, base, namespaced) in [
        ("Node", "/api/v1/nodes", false),
        ("Pod", "/api/v1/namespaces/{namespace}/pods", true),
    ] {
        let ns = if namespaced { "Namespaced" } else { "" };
        let id = |verb: &str, suffix: &str| format!("{verb}CoreV1{ns}{kind}{suffix}");
        paths.insert(
            base.to_owned(),
            json!({
                "get": op(&id("list", ""), "list", kind, LIST_PARAMS),
                "post": op(&id("create", ""), "post", kind, &[]),
            }),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": op(&id("read", ""), "get", kind, &[]),
                "put": op(&id("replace", ""), "put", kind, &[]),
                "patch": op(&id("patch", ""), "patch", kind, &[]),
                "delete": op(&id("delete", ""), "delete", kind, &[]),
            }),
        );
        paths.insert(
            format!("{base}/{{name}}/status"),
            json!({
                "get": op(&id("read", "Status"), "get", kind, &[]),
                "put": op(&id("replace", "Status"), "put", kind, &[]),
                "patch": op(&id("patch", "Status"), "patch", kind, &[]),
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (flannel-rs test-apiserver)", "version": crate::discovery::GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_patch_declares_field_validation() {
        let doc = core_v1();
        let paths = doc["paths"].as_object().expect("paths");
        assert_eq!(paths.len(), 6);
        for (path, item) in paths {
            let patch = &item["patch"];
            if patch.is_null() {
                continue;
            }
            assert!(
                patch["x-kubernetes-group-version-kind"]["kind"].is_string(),
                "{path}"
            );
            let names: Vec<&str> = patch["parameters"]
                .as_array()
                .expect("params")
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            assert!(names.contains(&"fieldValidation"), "{path}");
        }
    }
}
