//! Real `kubectl` against the test API server: discovery, OpenAPI-driven server-side field
//! validation, get/describe/create/apply/replace/delete of nodes and pods, annotate, label,
//! the three patch types (and the status subresource), resourceVersion conflicts, `get -w`,
//! and, through `kubectl get --raw`, watch bookmarks, selectors and 410 expiry.
//!
//! Needs `kubectl` on PATH. Without it the tests print why and pass, unless `CI=true`, where
//! they fail. Each test runs its own server on 127.0.0.1 and its own kubeconfig and cache
//! directory; the whole file takes 10–20 s (kubectl starts in ~0.3 s). Passes with kubectl
//! 1.29 to 1.33 and 1.37 (put another `kubectl` first on PATH to check one).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_apiserver::TestApiServer;

/// Whether kubectl can be run; with `CI=true` its absence is a failure.
fn have_kubectl(test: &str) -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: kubectl is not installed, and CI=true requires these tests to run"
        );
        eprintln!("SKIP {test}: kubectl is not installed (install it to run this test)");
    }
    found
}

/// A server, a kubeconfig naming it, and a private HOME for kubectl's caches.
struct Kube {
    server: TestApiServer,
    dir: PathBuf,
    // Declared last: the server's tasks run on it until the end.
    _rt: tokio::runtime::Runtime,
}

impl Kube {
    /// A server for `test` (its state file named by `tag`), or None when kubectl is missing
    /// outside CI (the test skips).
    fn start(test: &str, tag: &str) -> Option<Kube> {
        have_kubectl(test).then(|| Kube::new(tag))
    }

    /// `kubectl patch node n1 <type> -p <body>`, which must succeed.
    fn patch_n1(&self, patch_type: &str, body: &str) -> String {
        self.ok(&["patch", "node", "n1", patch_type, "-p", body])
    }

    fn new(test: &str) -> Kube {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = rt.block_on(TestApiServer::start()).expect("start");
        let dir = std::env::temp_dir().join(format!("kubectl-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\n\
             contexts:\n- name: t\n  context:\n    cluster: t\n    user: u\n\
             current-context: t\nusers:\n- name: u\n  user: {{}}\n",
            server.url()
        );
        std::fs::write(dir.join("kubeconfig"), kubeconfig).expect("kubeconfig");
        Kube {
            server,
            dir,
            _rt: rt,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("HOME", &self.dir)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command(args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).expect("stdin");
        }
        child.wait_with_output().expect("kubectl")
    }

    /// Runs kubectl, which must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_in(args, None)
    }

    fn ok_in(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Runs kubectl, which must fail; returns its stderr.
    fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            !out.status.success(),
            "kubectl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("kubectl -o json")
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    /// The recorded requests as `METHOD path?query`.
    fn requests(&self) -> Vec<String> {
        self.server
            .requests()
            .iter()
            .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
            .collect()
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NODE: &str = "apiVersion: v1
kind: Node
metadata:
  name: n1
  labels: {kubernetes.io/hostname: n1}
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24]
status:
  addresses: [{type: InternalIP, address: 198.18.0.1}]
";

const POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: p1, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, image: busybox}]
";

#[test]
fn discovery_version_and_resources() {
    let Some(k) = Kube::start("discovery_version_and_resources", "discovery") else {
        return;
    };
    let v = k.json(&["version"]);
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.33.0-test-apiserver");
    let res = k.ok(&["api-resources", "--no-headers"]);
    let rows: Vec<Vec<&str>> = res
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.contains(&vec!["nodes", "no", "v1", "false", "Node"]),
        "{res}"
    );
    assert!(
        rows.contains(&vec!["pods", "po", "v1", "true", "Pod"]),
        "{res}"
    );
    // kubectl took the aggregated discovery documents: it never asked for /api/v1.
    let reqs = k.requests();
    assert!(reqs.iter().any(|r| r.starts_with("GET /api?")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with("GET /apis?")), "{reqs:?}");
    assert!(
        !reqs.iter().any(|r| r.starts_with("GET /api/v1?")),
        "{reqs:?}"
    );
    // The legacy documents for older clients.
    let api_v1: Value = serde_json::from_str(&k.ok(&["get", "--raw", "/api/v1"])).expect("json");
    let names: Vec<&str> = api_v1["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"nodes/status") && names.contains(&"pods"),
        "{names:?}"
    );
}

#[test]
fn create_get_describe_apply_replace_delete() {
    let Some(k) = Kube::start("create_get_describe_apply_replace_delete", "crud") else {
        return;
    };
    let node = k.file("node.yaml", NODE);
    assert_eq!(k.ok(&["create", "-f", &node]), "node/n1 created\n");
    let n = k.json(&["get", "node", "n1"]);
    assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24");
    assert_eq!(n["status"]["addresses"][0]["address"], "198.18.0.1");
    assert!(n["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let err = k.fails(&["create", "-f", &node], None);
    assert!(
        err.contains("AlreadyExists") && err.contains("already exists"),
        "{err}"
    );
    // Validation happens on the server, strictly: kubectl learnt from /openapi/v3 that it may.
    let bad = k.file(
        "bad.yaml",
        &NODE.replace("podCIDR:", "bogus: 1\n  podCIDR:"),
    );
    let err = k.fails(&["apply", "-f", &bad], None);
    assert!(
        err.contains(r#"strict decoding error: unknown field "spec.bogus""#),
        "{err}"
    );
    let reqs = k.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /openapi/v3/api/v1?")),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("POST /api/v1/nodes?") && r.contains("fieldValidation=Strict")),
        "{reqs:?}"
    );

    // Pods: apply creates, apply again patches (strategic merge by container name).
    assert_eq!(
        k.ok_in(&["apply", "-f", "-"], Some(POD)),
        "pod/p1 created\n"
    );
    let changed = POD.replace("busybox", "nginx");
    assert_eq!(
        k.ok_in(&["apply", "-f", "-"], Some(&changed)),
        "pod/p1 configured\n"
    );
    let p = k.json(&["get", "pod", "p1"]);
    assert_eq!(
        p["spec"]["containers"],
        json!([{"name": "c", "image": "nginx"}])
    );
    assert!(
        p["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .is_some_and(|a| a.contains("nginx"))
    );
    assert!(k.requests().iter().any(|r| r
        .starts_with("PATCH /api/v1/namespaces/default/pods/p1?")
        && r.contains("fieldValidation=Strict")));
    assert_eq!(k.ok(&["get", "pods", "-o", "name"]), "pod/p1\n");
    assert_eq!(
        k.ok(&["get", "pods", "-A", "-l", "app=web", "-o", "name"]),
        "pod/p1\n"
    );
    assert_eq!(k.ok(&["get", "pods", "-l", "app=db", "-o", "name"]), "");
    let d = k.ok(&["describe", "node", "n1"]);
    assert!(d.contains("PodCIDR:") && d.contains("10.244.1.0/24"), "{d}");
    assert!(
        d.contains("Non-terminated Pods:") && d.contains("p1"),
        "{d}"
    );
    let d = k.ok(&["describe", "pod", "p1"]);
    assert!(d.contains("Node:") && d.contains("nginx"), "{d}");

    // replace with the current version works, with a stale one is a conflict.
    let current = k.ok(&["get", "node", "n1", "-o", "json"]);
    let mut stale: Value = serde_json::from_str(&current).expect("json");
    k.ok(&["label", "node", "n1", "changed=yes"]);
    let err = k.fails(&["replace", "-f", "-"], Some(&stale.to_string()));
    assert!(
        err.contains("Conflict") && err.contains("the object has been modified"),
        "{err}"
    );
    stale["metadata"]["resourceVersion"] = json!(null);
    stale["metadata"]["labels"]["replaced"] = json!("yes");
    assert_eq!(
        k.ok_in(&["replace", "-f", "-"], Some(&stale.to_string())),
        "node/n1 replaced\n"
    );
    let labels = &k.json(&["get", "node", "n1"])["metadata"]["labels"];
    assert_eq!(labels["replaced"], "yes");
    assert!(labels.get("changed").is_none(), "{labels}");

    assert!(k
        .ok(&["delete", "pod", "p1"])
        .starts_with("pod \"p1\" deleted"));
    assert_eq!(k.ok(&["delete", "-f", &node]), "node \"n1\" deleted\n");
    let err = k.fails(&["get", "node", "n1"], None);
    assert!(
        err.contains("NotFound") && err.contains(r#""n1" not found"#),
        "{err}"
    );
    assert!(k.server.node("n1").is_none());
}

#[test]
fn annotate_label_and_patch_types() {
    let Some(k) = Kube::start("annotate_label_and_patch_types", "patch") else {
        return;
    };
    k.ok(&["create", "-f", &k.file("node.yaml", NODE)]);
    k.ok(&["annotate", "node", "n1", "example.com/a=1"]);
    let err = k.fails(&["annotate", "node", "n1", "example.com/a=2"], None);
    assert!(err.contains("--overwrite is false"), "{err}");
    k.ok(&[
        "annotate",
        "--overwrite",
        "node",
        "n1",
        "example.com/a=2",
        "example.com/b=x",
    ]);
    k.ok(&["annotate", "node", "n1", "example.com/b-"]);
    k.ok(&["label", "node", "n1", "zone=a"]);
    k.patch_n1("--type=strategic", r#"{"metadata":{"labels":{"s":"1"}}}"#);
    k.patch_n1(
        "--type=merge",
        r#"{"metadata":{"labels":{"zone":null,"m":"1"}}}"#,
    );
    k.patch_n1(
        "--type=json",
        r#"[{"op":"add","path":"/spec/taints","value":[{"key":"k","effect":"NoSchedule"}]}]"#,
    );
    let err = k.fails(
        &[
            "patch",
            "node",
            "n1",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/nothing"}]"#,
        ],
        None,
    );
    assert!(err.contains("nonexistent"), "{err}");
    let n = k.json(&["get", "node", "n1"]);
    assert_eq!(n["metadata"]["annotations"], json!({"example.com/a": "2"}));
    let labels = &n["metadata"]["labels"];
    assert_eq!(
        (labels["s"].as_str(), labels["m"].as_str()),
        (Some("1"), Some("1"))
    );
    assert!(labels.get("zone").is_none(), "{labels}");
    assert_eq!(n["spec"]["taints"][0]["key"], "k");

    // Status: a strategic patch of the status subresource merges conditions by type and
    // cannot touch spec; a patch of the main resource cannot touch status.
    k.ok(&[
        "patch",
        "node",
        "n1",
        "--subresource=status",
        "--type=strategic",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    k.ok(&["patch", "node", "n1", "--subresource=status", "--type=strategic", "-p",
        r#"{"spec":{"podCIDR":"10.244.9.0/24"},"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}]}}"#]);
    k.patch_n1("--type=merge", r#"{"status":{"conditions":[]}}"#);
    let n = k.json(&["get", "node", "n1"]);
    let types: Vec<&str> = n["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(types, ["Ready", "NetworkUnavailable"]);
    assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24");

    // A stale resourceVersion precondition is a 409, as on a real server.
    let err = k.fails(
        &[
            "annotate",
            "--overwrite",
            "--resource-version=1",
            "node",
            "n1",
            "example.com/a=3",
        ],
        None,
    );
    assert!(err.contains("Conflict"), "{err}");
    let rv = n["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    k.ok(&[
        "annotate",
        "--overwrite",
        &format!("--resource-version={rv}"),
        "node",
        "n1",
        "example.com/a=3",
    ]);
    assert_eq!(
        k.json(&["get", "node", "n1"])["metadata"]["annotations"]["example.com/a"],
        "3"
    );
}

/// A running `kubectl get <what> -w --output-watch-events`, its lines read on a thread.
struct Watching {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watching {
    fn start(k: &Kube, what: &str) -> Watching {
        let mut child = k
            .command(&[
                "get",
                what,
                "-w",
                "--output-watch-events",
                "-o",
                "custom-columns=EVENT:.type,NAME:.object.metadata.name,ZONE:.object.metadata.labels.zone",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl get -w");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watching {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (10 s at most) for a line `EVENT NAME ZONE`.
    fn wait_for(&mut self, want: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let words = |l: &String| l.split_whitespace().collect::<Vec<_>>().join(" ");
            if self.seen.iter().any(|l| words(l) == want) {
                return true;
            }
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(line);
            }
        }
        false
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn get_watch_follows_changes() {
    let Some(k) = Kube::start("get_watch_follows_changes", "watch") else {
        return;
    };
    k.ok(&["create", "-f", &k.file("node.yaml", NODE)]);
    let mut w = Watching::start(&k, "nodes");
    assert!(w.wait_for("ADDED n1 <none>"), "initial list: {:?}", w.seen);
    k.ok(&["label", "node", "n1", "zone=a"]);
    assert!(w.wait_for("MODIFIED n1 a"), "{:?}", w.seen);
    let n2 = k.file("n2.yaml", &NODE.replace("n1", "n2"));
    k.ok(&["create", "-f", &n2]);
    assert!(w.wait_for("ADDED n2 <none>"), "{:?}", w.seen);
    k.ok(&["delete", "node", "n2"]);
    assert!(w.wait_for("DELETED n2 <none>"), "{:?}", w.seen);

    // Pods of the default namespace: a pod elsewhere is not seen.
    let mut pods = Watching::start(&k, "pods");
    k.ok_in(&["apply", "-f", "-"], Some(POD));
    assert!(pods.wait_for("ADDED p1 <none>"), "{:?}", pods.seen);
    k.ok(&["label", "pod", "p1", "zone=b"]);
    assert!(pods.wait_for("MODIFIED p1 b"), "{:?}", pods.seen);
    k.ok_in(
        &["apply", "-n", "other", "-f", "-"],
        Some(&POD.replace("p1", "p2")),
    );
    k.ok(&["delete", "pod", "p1"]);
    assert!(pods.wait_for("DELETED p1 b"), "{:?}", pods.seen);
    assert!(
        !pods.seen.iter().any(|l| l.contains("p2")),
        "{:?}",
        pods.seen
    );
    assert_eq!(
        k.ok(&["get", "pods", "-n", "other", "-o", "name"]),
        "pod/p2\n"
    );
}

#[test]
fn watch_bookmarks_selectors_and_expiry() {
    let Some(k) = Kube::start("watch_bookmarks_selectors_and_expiry", "bookmarks") else {
        return;
    };
    k.server.set_bookmark_interval(Duration::from_millis(200));
    k.ok(&["create", "-f", &k.file("node.yaml", NODE)]);
    let start = k.server.resource_version();
    let events = |path: &str| -> Vec<Value> {
        k.ok(&["get", "--raw", path])
            .lines()
            .map(|l| serde_json::from_str(l).expect("event"))
            .collect()
    };
    // Changes during a 3 s watch, selected by name: n1's change, not n2's, then bookmarks
    // carrying the newest version, the last one as the watch times out.
    let mut label = k.command(&["label", "node", "n1", "zone=a"]);
    let changer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        label.output().expect("kubectl label")
    });
    k.server
        .add_node(serde_json::from_value(json!({"metadata": {"name": "n2"}})).expect("node"));
    let evs = events(&format!(
        "/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds=3&fieldSelector=metadata.name%3Dn1&resourceVersion={start}"
    ));
    let labelled = changer.join().expect("changer");
    assert!(labelled.status.success(), "{labelled:?}");
    let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|t| **t == "MODIFIED").count(),
        1,
        "{evs:?}"
    );
    assert!(
        evs.iter().all(|e| e["object"]["metadata"]["name"] != "n2"),
        "{evs:?}"
    );
    let bookmarks: Vec<u64> = evs
        .iter()
        .filter(|e| e["type"] == "BOOKMARK")
        .filter_map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()?
                .parse()
                .ok()
        })
        .collect();
    assert!(bookmarks.len() >= 2, "{evs:?}");
    assert!(bookmarks.windows(2).all(|w| w[0] <= w[1]), "{bookmarks:?}");
    assert_eq!(
        bookmarks.last().copied(),
        Some(k.server.resource_version()),
        "{evs:?}"
    );
    assert_eq!(kinds.last(), Some(&"BOOKMARK"));

    // Watch-list: initial events, then the initial-events-end bookmark.
    let evs = events("/api/v1/nodes?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1");
    assert_eq!(evs[0]["type"], "ADDED");
    assert_eq!(evs[1]["type"], "ADDED");
    assert_eq!(evs[2]["type"], "BOOKMARK");
    assert_eq!(
        evs[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // After a compaction, resuming from an old version is 410 Gone: informers relist.
    k.server.compact();
    let evs = events(&format!(
        "/api/v1/nodes?watch=1&resourceVersion={start}&timeoutSeconds=1"
    ));
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["code"], 410);
    assert_eq!(evs[0]["object"]["reason"], "Expired");
}
