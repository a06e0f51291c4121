//! API discovery as kubectl and client-go read it: `/version`, the legacy `/api`, `/api/v1`
//! and `/apis` documents, and aggregated discovery (`apidiscovery.k8s.io/v2` or `v2beta1`) for `/api` and
//! `/apis` when the `Accept` header asks for it.

use serde_json::{json, Value};

/// The Kubernetes version the server claims (k8s-openapi's newest enabled API).
pub(crate) const GIT_VERSION: &str = "v1.33.0-test-apiserver";

/// The content types of aggregated discovery responses: v2 (Kubernetes 1.30+) and v2beta1
/// (what kubectl 1.26–1.29 ask for).
pub(crate) const AGGREGATED_V2: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
pub(crate) const AGGREGATED_V2BETA1: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList";

/// One served resource.
struct Resource {
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    verbs: &'static [&'static str],
    status: bool,
}

const RW: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

const RESOURCES: &[Resource] = &[
    Resource {
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short: &["no"],
        verbs: RW,
        status: true,
    },
    Resource {
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
        verbs: RW,
        status: true,
    },
    // Served empty, for `kubectl describe`.
    Resource {
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        verbs: &["list"],
        status: false,
    },
];

/// The aggregated discovery version (`"v2"` or `"v2beta1"`) the `Accept` header asks for
/// first, if any.
pub(crate) fn wants_aggregated(accept: &str) -> Option<&'static str> {
    accept.split(',').find_map(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        let aggregated = params.first() == Some(&"application/json")
            && params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"as=APIGroupDiscoveryList");
        if !aggregated {
            return None;
        }
        if params.contains(&"v=v2") {
            Some("v2")
        } else if params.contains(&"v=v2beta1") {
            Some("v2beta1")
        } else {
            None
        }
    })
}

/// The content type of an aggregated discovery response of `version`.
pub(crate) fn aggregated_content_type(version: &str) -> &'static str {
    if version == "v2beta1" {
        AGGREGATED_V2BETA1
    } else {
        AGGREGATED_V2
    }
}

pub(crate) fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Legacy `GET /api`.
pub(crate) fn api_versions() -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

/// Legacy `GET /apis`: no groups besides the core group.
pub(crate) fn api_groups() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
}

/// Legacy `GET /api/v1`.
pub(crate) fn core_v1_resources() -> Value {
    let mut list = Vec::new();
    for r in RESOURCES {
        list.push(json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": r.verbs, "shortNames": r.short,
        }));
        if r.status {
            list.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": list})
}

/// Aggregated `GET /api` (`core = true`: the core group) or `GET /apis` (no groups), in
/// `version` (`v2` or `v2beta1`, which have the same shape).
pub(crate) fn aggregated(core: bool, version: &str) -> Value {
    let items = if core {
        let resources: Vec<Value> = RESOURCES
            .iter()
            .map(|r| {
                let kind = json!({"group": "", "version": "v1", "kind": r.kind});
                let mut v = json!({
                    "resource": r.plural, "responseKind": kind, "singularResource": r.singular,
                    "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                    "verbs": r.verbs, "shortNames": r.short,
                });
                if r.status {
                    v["subresources"] = json!([{
                        "subresource": "status", "responseKind": kind,
                        "verbs": ["get", "patch", "update"],
                    }]);
                }
                v
            })
            .collect();
        vec![json!({
            "metadata": {"creationTimestamp": null},
            "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}],
        })]
    } else {
        Vec::new()
    };
    json!({
        "kind": "APIGroupDiscoveryList", "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {}, "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let v2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
        let beta = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList";
        assert_eq!(
            wants_aggregated(&format!("{v2},{beta},application/json")),
            Some("v2")
        );
        assert_eq!(
            wants_aggregated(&format!("{beta},application/json")),
            Some("v2beta1")
        );
        assert_eq!(wants_aggregated("application/json"), None);
        assert_eq!(
            aggregated(false, "v2beta1")["apiVersion"],
            "apidiscovery.k8s.io/v2beta1"
        );
        let doc = aggregated(true, "v2");
        let res = &doc["items"][0]["versions"][0]["resources"];
        assert_eq!(res[0]["resource"], "nodes");
        assert_eq!(res[0]["scope"], "Cluster");
        assert_eq!(res[1]["scope"], "Namespaced");
    }
}
