//! The Kubernetes lease store against the in-repo test API server (`test-apiserver`), over
//! plain HTTP on 127.0.0.1 with the normal kube client: lease acquisition from podCIDR, the
//! annotations flannel writes, reading nodes written by upstream flannel, the node-public-ip /
//! public-ip-overwrite / VTEP MAC / NetworkUnavailable handling, watching (including expiry
//! and API server restarts) and bad input.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flannel_rs::config::flags::Flags;
use flannel_rs::config::netconf::NetConfig;
use flannel_rs::config::subnet_env::PreviousSubnets;
use flannel_rs::lease::kube::{KubeStore, KubeTiming};
use flannel_rs::lease::store::{LeaseStore, StoreError, WatchUpdate};
use flannel_rs::lease::{Lease, LeaseAttrs, LeaseWatcher, VxlanBackendData};
use flannel_rs::wire::MacAddr;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use test_apiserver::TestApiServer;
use test_support::fixtures::{self, vxlan_data_json, VXLAN_CONFIG};
use test_support::TempDir;
use tokio::sync::mpsc;

const P: &str = "flannel.alpha.coreos.com/";
const DUAL_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd42::/48","Backend":{"Type":"vxlan"}}"#;

/// A node exactly as `kubectl get node -o json` shows one managed by upstream flannel v0.28
/// (vxlan, default prefix).
const UPSTREAM_NODE: &str = r#"{
  "apiVersion": "v1",
  "kind": "Node",
  "metadata": {
    "annotations": {
      "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"c6:d2:32:6f:8f:44\"}",
      "flannel.alpha.coreos.com/backend-type": "vxlan",
      "flannel.alpha.coreos.com/kube-subnet-manager": "true",
      "flannel.alpha.coreos.com/public-ip": "198.51.100.12",
      "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///var/run/containerd/containerd.sock",
      "node.alpha.kubernetes.io/ttl": "0",
      "volumes.kubernetes.io/controller-managed-attach-detach": "true"
    },
    "creationTimestamp": "2025-03-01T10:00:00Z",
    "labels": {
      "beta.kubernetes.io/arch": "amd64",
      "beta.kubernetes.io/os": "linux",
      "kubernetes.io/arch": "amd64",
      "kubernetes.io/hostname": "upstream-1",
      "kubernetes.io/os": "linux"
    },
    "name": "upstream-1",
    "resourceVersion": "4711",
    "uid": "8c1f2b0e-1a2b-4c3d-9e8f-0123456789ab"
  },
  "spec": {
    "podCIDR": "10.244.12.0/24",
    "podCIDRs": ["10.244.12.0/24"]
  },
  "status": {
    "addresses": [
      {"address": "198.51.100.12", "type": "InternalIP"},
      {"address": "upstream-1", "type": "Hostname"}
    ],
    "conditions": [
      {"lastHeartbeatTime": "2025-03-01T10:01:00Z", "lastTransitionTime": "2025-03-01T10:01:00Z",
       "message": "Flannel is running on this node", "reason": "FlannelIsUp",
       "status": "False", "type": "NetworkUnavailable"},
      {"lastHeartbeatTime": "2025-03-01T10:05:00Z", "lastTransitionTime": "2025-03-01T10:01:10Z",
       "message": "kubelet is posting ready status", "reason": "KubeletReady",
       "status": "True", "type": "Ready"}
    ],
    "nodeInfo": {
      "architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://1.7.0",
      "kernelVersion": "6.1.0", "kubeProxyVersion": "v1.33.0", "kubeletVersion": "v1.33.0",
      "machineID": "m", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12",
      "systemUUID": "s"
    }
  }
}"#;

/// A test API server plus a net-conf.json file.
struct Cluster {
    server: TestApiServer,
    dir: TempDir,
    config: String,
}

fn fast() -> KubeTiming {
    KubeTiming {
        node_poll: Duration::from_millis(50),
        node_timeout: Duration::from_millis(1500),
        watch_timeout: Duration::from_secs(290),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    }
}

impl Cluster {
    async fn new(tag: &str, config: &str) -> Cluster {
        let server = TestApiServer::start().await.expect("test API server");
        let dir = TempDir::new(&format!("kube-{tag}"));
        std::fs::write(dir.0.join("net-conf.json"), config).expect("write net-conf");
        Cluster {
            server,
            dir,
            config: config.to_owned(),
        }
    }

    fn flags(&self) -> Flags {
        Flags {
            kube_subnet_mgr: true,
            kube_api_url: self.server.url(),
            net_config_path: self.dir.0.join("net-conf.json"),
            ..Flags::default()
        }
    }

    async fn store_with(
        &self,
        flags: &Flags,
        env: &[(&str, &str)],
    ) -> Result<KubeStore, StoreError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        KubeStore::connect(flags, &|k| env.get(k).cloned())
            .await
            .map(|s| s.with_timing(fast()))
    }

    async fn store(&self, node: &str) -> KubeStore {
        self.store_with(&self.flags(), &[("NODE_NAME", node)])
            .await
            .expect("connect")
    }

    fn net(&self) -> NetConfig {
        NetConfig::parse(&self.config).expect("config")
    }

    /// `store`'s lease for `attrs` (no previous subnets); the test fails if there is none.
    async fn acquire(&self, store: &KubeStore, attrs: &LeaseAttrs) -> Lease {
        store
            .acquire(&self.net(), attrs, &PreviousSubnets::default())
            .await
            .expect("acquire")
    }
}

fn node(name: &str, cidrs: &[&str], annotations: &[(&str, &str)]) -> Node {
    let ann: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| {
            let key = if k.contains('/') {
                (*k).to_owned()
            } else {
                format!("{P}{k}")
            };
            (key, (*v).to_owned())
        })
        .collect();
    let mut spec = json!({});
    if let Some(first) = cidrs.first() {
        spec = json!({"podCIDR": first, "podCIDRs": cidrs});
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": ann},
        "spec": spec,
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
        ]}
    }))
    .expect("node")
}

fn mac(last: u8) -> MacAddr {
    fixtures::mac(last, 0)
}

fn data(last: u8) -> String {
    vxlan_data_json(mac(last))
}

/// A managed vxlan peer as flannel leaves it.
fn peer(name: &str, cidr: &str, ip: &str, mac_last: u8) -> Node {
    let d = data(mac_last);
    node(
        name,
        &[cidr],
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("backend-data", &d),
            ("public-ip", ip),
        ],
    )
}

fn vxlan_attrs(ip: Ipv4Addr, mac_last: u8) -> LeaseAttrs {
    fixtures::vxlan_attrs(ip, mac(mac_last))
}

fn annotations(server: &TestApiServer, name: &str) -> BTreeMap<String, String> {
    server
        .node(name)
        .and_then(|n| n.metadata.annotations)
        .unwrap_or_default()
}

fn flannel_annotations(server: &TestApiServer, name: &str) -> BTreeMap<String, String> {
    annotations(server, name)
        .into_iter()
        .filter(|(k, _)| k.starts_with(P))
        .collect()
}

fn patches(server: &TestApiServer) -> Vec<test_apiserver::RecordedRequest> {
    server.requests_with_method("PATCH")
}

async fn recv(rx: &mut mpsc::Receiver<WatchUpdate>, within: Duration) -> WatchUpdate {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a watch update in time")
        .expect("watch channel open")
}

/// The next update, which must be a snapshot (the Kubernetes store sends nothing else);
/// returns its leases' public IPs in order, and the leases.
async fn next_snapshot(rx: &mut mpsc::Receiver<WatchUpdate>) -> (Vec<String>, Vec<Lease>) {
    match recv(rx, Duration::from_secs(5)).await {
        WatchUpdate::Snapshot(s) => (s.iter().map(|l| l.attrs.public_ip.to_string()).collect(), s),
        other => panic!("want a snapshot, got {other:?}"),
    }
}

/// Waits until the server has received `n` watch requests (so a watch is established before
/// a test disturbs it).
async fn wait_for_watches(server: &TestApiServer, n: usize) {
    for _ in 0..500 {
        let watches = server
            .requests()
            .iter()
            .filter(|r| r.path == "/api/v1/nodes" && r.query.contains("watch="))
            .count();
        if watches >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no watch request reached the server");
}

/// Starts `store.watch` in the background; returns the update channel and the task.
fn start_watch(store: &KubeStore) -> (mpsc::Receiver<WatchUpdate>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let s = store.clone();
    let task = tokio::spawn(async move {
        let _ = s.watch(tx).await;
    });
    (rx, task)
}

/// Peer public IPs known to `watcher`, sorted.
fn peer_ips(watcher: &LeaseWatcher) -> Vec<String> {
    let mut v: Vec<String> = watcher
        .leases()
        .map(|l| l.attrs.public_ip.to_string())
        .collect();
    v.sort();
    v
}

/// Applies updates until `done(watcher)` or the deadline; returns the updates seen.
async fn until(
    rx: &mut mpsc::Receiver<WatchUpdate>,
    watcher: &mut LeaseWatcher,
    within: Duration,
    done: impl Fn(&LeaseWatcher) -> bool,
) -> Vec<WatchUpdate> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    while !done(watcher) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let update = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "condition not reached in {within:?}; peers {:?}",
                    peer_ips(watcher)
                )
            })
            .expect("watch channel open");
        watcher.apply(update.clone());
        seen.push(update);
    }
    seen
}

#[tokio::test]
async fn acquire_publishes_flannels_annotations_once() {
    let c = Cluster::new("acquire", VXLAN_CONFIG).await;
    c.server.add_node(node("node-a", &["10.244.1.0/24"], &[]));
    let store = c.store("node-a").await;
    assert_eq!(store.name(), "Kubernetes Subnet Manager - node-a");
    assert_eq!(store.network_config().await.expect("config"), VXLAN_CONFIG);
    let attrs = vxlan_attrs(Ipv4Addr::new(198, 51, 100, 1), 0x01);
    let lease = c.acquire(&store, &attrs).await;
    assert_eq!(
        lease.subnet.map(|s| s.to_string()).as_deref(),
        Some("10.244.1.0/24")
    );
    assert_eq!(lease.ipv6_subnet, None);
    assert_eq!(lease.attrs, attrs);

    // Exactly one PATCH, on the status subresource, strategic merge, the annotations only.
    let p = patches(&c.server);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "/api/v1/nodes/node-a/status");
    assert_eq!(p[0].content_type, "application/strategic-merge-patch+json");
    let body: Value = serde_json::from_str(&p[0].body).expect("json body");
    let expected = json!({"metadata": {"annotations": {
        "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:01\"}",
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/public-ip": "198.51.100.1",
    }}});
    assert_eq!(body, expected);
    // Stored field for field as upstream flannel stores them.
    let stored = flannel_annotations(&c.server, "node-a");
    let want: BTreeMap<String, String> =
        serde_json::from_value(expected["metadata"]["annotations"].clone()).expect("map");
    assert_eq!(stored, want);

    // A restart with the same inputs patches nothing.
    let again = c.store("node-a").await;
    c.acquire(&again, &attrs).await;
    assert_eq!(patches(&c.server).len(), 1);

    // A new MAC changes only backend-data.
    let moved = vxlan_attrs(Ipv4Addr::new(198, 51, 100, 1), 0x02);
    c.acquire(&again, &moved).await;
    let p = patches(&c.server);
    assert_eq!(p.len(), 2);
    let body: Value = serde_json::from_str(&p[1].body).expect("json");
    assert_eq!(
        body,
        json!({"metadata": {"annotations": {
            "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:02\"}"
        }}})
    );
}

#[tokio::test]
async fn host_gw_and_dual_stack_annotations() {
    // host-gw: backend-data is the literal null, as upstream writes it.
    let c = Cluster::new(
        "hostgw",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
    )
    .await;
    c.server.add_node(node("gw", &["10.244.3.0/24"], &[]));
    let store = c.store("gw").await;
    let attrs = LeaseAttrs {
        public_ip: Ipv4Addr::new(198, 51, 100, 3),
        backend_type: "host-gw".into(),
        ..LeaseAttrs::default()
    };
    c.acquire(&store, &attrs).await;
    let got = flannel_annotations(&c.server, "gw");
    assert_eq!(
        got.get(&format!("{P}backend-data")).map(String::as_str),
        Some("null")
    );
    assert_eq!(
        got.get(&format!("{P}backend-type")).map(String::as_str),
        Some("host-gw")
    );

    // Dual stack vxlan: both families.
    let c = Cluster::new("dual", DUAL_CONFIG).await;
    c.server
        .add_node(node("d1", &["10.244.4.0/24", "fd42:0:0:4::/64"], &[]));
    let store = c.store("d1").await;
    let mut attrs = vxlan_attrs(Ipv4Addr::new(198, 51, 100, 4), 0x04);
    attrs.public_ipv6 = Some("2001:db8:4::4".parse().expect("v6"));
    attrs.backend_v6_data = Some(
        VxlanBackendData {
            vni: 1,
            vtep_mac: mac(0x14),
        }
        .to_raw(),
    );
    let lease = c.acquire(&store, &attrs).await;
    assert_eq!(
        lease.ipv6_subnet.map(|s| s.to_string()).as_deref(),
        Some("fd42:0:0:4::/64")
    );
    let got = flannel_annotations(&c.server, "d1");
    assert_eq!(
        got.get(&format!("{P}backend-v6-data")).map(String::as_str),
        Some(r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:14"}"#)
    );
    assert_eq!(
        got.get(&format!("{P}public-ipv6")).map(String::as_str),
        Some("2001:db8:4::4")
    );
    assert_eq!(got.len(), 6, "{got:?}");
}

/// The error acquiring node `name`'s lease fails with (no previous subnets).
async fn acquire_error(c: &Cluster, name: &str, attrs: &LeaseAttrs) -> String {
    c.store(name)
        .await
        .acquire(&c.net(), attrs, &PreviousSubnets::default())
        .await
        .expect_err(name)
        .to_string()
}

#[tokio::test]
async fn acquire_errors_name_the_problem() {
    let c = Cluster::new("acqerr", VXLAN_CONFIG).await;
    let attrs = vxlan_attrs(Ipv4Addr::new(198, 51, 100, 1), 1);
    let prev = PreviousSubnets::default();

    c.server.add_node(node("no-cidr", &[], &[]));
    let e = acquire_error(&c, "no-cidr", &attrs).await;
    assert_eq!(e, r#"node "no-cidr" pod cidr not assigned"#);

    c.server.add_node(node(
        "three",
        &["10.244.1.0/24", "fd42::/64", "10.244.2.0/24"],
        &[],
    ));
    let e = acquire_error(&c, "three", &attrs).await;
    assert_eq!(
        e,
        r#"node "three" pod cidrs should be IPv4/IPv6 only or dualstack"#
    );

    c.server.add_node(node("far", &["10.9.0.0/24"], &[]));
    let e = acquire_error(&c, "far", &attrs).await;
    assert_eq!(
        e,
        r#"subnet "10.244.0.0/16" specified in the flannel net config doesn't contain "10.9.0.0/24" PodCIDR of the "far" node"#
    );
    assert!(
        patches(&c.server).is_empty(),
        "nothing published for a bad lease"
    );

    let e = acquire_error(&c, "ghost", &attrs).await;
    assert!(
        e.starts_with(r#"timeout contacting kube-api, failed to patch node "ghost". Error: "#),
        "{e}"
    );

    c.server.add_node(node(
        "bad-ow",
        &["10.244.9.0/24"],
        &[("public-ip-overwrite", "203.0.113.999")],
    ));
    let e = acquire_error(&c, "bad-ow", &attrs).await;
    assert!(
        e.contains(r#"flannel.alpha.coreos.com/public-ip-overwrite="203.0.113.999""#),
        "{e}"
    );

    // The node may appear after start: acquire waits for it.
    let store = c.store("late").await;
    let server_node = node("late", &["10.244.5.0/24"], &[]);
    let net = c.net();
    let (lease, ()) = tokio::join!(store.acquire(&net, &attrs, &prev), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.server.add_node(server_node);
    });
    assert_eq!(
        lease
            .expect("late node")
            .subnet
            .map(|s| s.to_string())
            .as_deref(),
        Some("10.244.5.0/24")
    );
}

#[tokio::test]
async fn upstream_written_nodes_are_peers() {
    let c = Cluster::new("mixed", VXLAN_CONFIG).await;
    let upstream: Node = serde_json::from_str(UPSTREAM_NODE).expect("fixture");
    c.server.add_node(upstream);
    c.server.add_node(node("ours", &["10.244.1.0/24"], &[]));
    let store = c.store("ours").await;
    let lease = c
        .acquire(&store, &vxlan_attrs(Ipv4Addr::new(198, 51, 100, 1), 1))
        .await;

    let leases = store.list().await.expect("list");
    assert_eq!(leases.len(), 2);
    let theirs: &Lease = leases
        .iter()
        .find(|l| l.attrs.public_ip == Ipv4Addr::new(198, 51, 100, 12))
        .expect("upstream node listed");
    assert_eq!(
        theirs.subnet.map(|s| s.to_string()).as_deref(),
        Some("10.244.12.0/24")
    );
    assert_eq!(
        theirs.attrs.to_json(),
        r#"{"PublicIP":"198.51.100.12","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
    );
    // Our own node, as we wrote it, reads back as the lease we hold.
    let own = leases
        .iter()
        .find(|l| l.subnet == lease.subnet)
        .expect("own listed");
    assert_eq!(own.attrs, lease.attrs);

    let (mut rx, task) = start_watch(&store);
    let mut watcher = LeaseWatcher::new(lease.subnet, None);
    match recv(&mut rx, Duration::from_secs(5)).await {
        WatchUpdate::Snapshot(s) => assert_eq!(s.len(), 2),
        other => panic!("first update must be a snapshot: {other:?}"),
    }
    watcher.apply(WatchUpdate::Snapshot(leases));
    assert_eq!(peer_ips(&watcher), ["198.51.100.12"]);
    task.abort();
}

#[tokio::test]
async fn public_ip_overwrite_is_published_for_peers() {
    let c = Cluster::new("overwrite", VXLAN_CONFIG).await;
    c.server.add_node(node(
        "natted",
        &["10.244.2.0/24"],
        &[("public-ip-overwrite", "203.0.113.7")],
    ));
    c.server
        .add_node(peer("other", "10.244.3.0/24", "198.51.100.3", 3));
    let store = c.store("natted").await;
    let attrs = vxlan_attrs(Ipv4Addr::new(198, 51, 100, 2), 2);
    let lease = c.acquire(&store, &attrs).await;
    // Locally the detected address stays in use; peers get the overwrite.
    assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(198, 51, 100, 2));
    let got = flannel_annotations(&c.server, "natted");
    assert_eq!(
        got.get(&format!("{P}public-ip")).map(String::as_str),
        Some("203.0.113.7")
    );

    let other = c.store("other").await;
    let leases = other.list().await.expect("list");
    let natted = leases
        .iter()
        .find(|l| l.subnet.map(|s| s.to_string()).as_deref() == Some("10.244.2.0/24"))
        .expect("natted node visible");
    assert_eq!(natted.attrs.public_ip, Ipv4Addr::new(203, 0, 113, 7));

    // Restarting with the same inputs does not patch again.
    let before = patches(&c.server).len();
    c.acquire(&store, &attrs).await;
    assert_eq!(patches(&c.server).len(), before);
}

#[tokio::test]
async fn node_public_ip_and_stored_mac() {
    let c = Cluster::new("stored", DUAL_CONFIG).await;
    let d4 = data(0x44);
    let d6 = data(0x66);
    c.server.add_node(node(
        "n1",
        &["10.244.1.0/24", "fd42:0:0:1::/64"],
        &[
            ("node-public-ip", "198.51.100.50"),
            ("node-public-ipv6", "2001:db8::50"),
            ("backend-data", &d4),
            ("backend-v6-data", &d6),
        ],
    ));
    c.server
        .add_node(node("n2", &["10.244.2.0/24"], &[("backend-data", "null")]));
    c.server.add_node(node(
        "n3",
        &["10.244.3.0/24"],
        &[("node-public-ip", "not-an-ip")],
    ));

    let s1 = c.store("n1").await;
    assert_eq!(
        s1.stored_public_ips().await.expect("ips"),
        (
            Some(Ipv4Addr::new(198, 51, 100, 50)),
            Some("2001:db8::50".parse().expect("v6"))
        )
    );
    assert_eq!(
        s1.stored_vtep_macs().await.expect("macs"),
        (Some(mac(0x44)), Some(mac(0x66)))
    );
    let s2 = c.store("n2").await;
    assert_eq!(s2.stored_public_ips().await.expect("none"), (None, None));
    assert_eq!(s2.stored_vtep_macs().await.expect("none"), (None, None));
    let e = c
        .store("n3")
        .await
        .stored_public_ips()
        .await
        .expect_err("invalid");
    assert!(e.to_string().contains("node-public-ip"), "{e}");

    // Reusing the stored MAC with otherwise identical inputs publishes nothing new.
    let c = Cluster::new("reuse", VXLAN_CONFIG).await;
    c.server
        .add_node(peer("r", "10.244.8.0/24", "198.51.100.8", 0x08));
    let store = c.store("r").await;
    let (v4, _) = store.stored_vtep_macs().await.expect("macs");
    assert_eq!(v4, Some(mac(0x08)));
    c.acquire(&store, &vxlan_attrs(Ipv4Addr::new(198, 51, 100, 8), 0x08))
        .await;
    assert!(patches(&c.server).is_empty());
}

fn condition(server: &TestApiServer, node: &str, kind: &str) -> Option<Value> {
    let n = server.node_json(node)?;
    n["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

#[tokio::test]
async fn network_unavailable_condition() {
    let c = Cluster::new("cond", VXLAN_CONFIG).await;
    c.server.add_node(node("n", &["10.244.1.0/24"], &[]));
    let store = c.store("n").await;
    store.mark_network_available().await.expect("condition");
    let cond = condition(&c.server, "n", "NetworkUnavailable").expect("condition");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "FlannelIsUp");
    assert_eq!(cond["message"], "Flannel is running on this node");
    assert!(cond["lastTransitionTime"].is_string() && cond["lastHeartbeatTime"].is_string());
    let ready = condition(&c.server, "n", "Ready").expect("Ready kept");
    assert_eq!(ready["status"], "True");
    let p = patches(&c.server);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].path, "/api/v1/nodes/n/status");
    assert_eq!(p[0].content_type, "application/strategic-merge-patch+json");

    // --set-node-network-unavailable=false: nothing is sent.
    let flags = Flags {
        set_node_network_unavailable: false,
        ..c.flags()
    };
    let quiet = c
        .store_with(&flags, &[("NODE_NAME", "n")])
        .await
        .expect("connect");
    quiet.mark_network_available().await.expect("no-op");
    assert_eq!(patches(&c.server).len(), 1);
}

#[tokio::test]
async fn watch_add_update_delete() {
    let c = Cluster::new("watch", DUAL_CONFIG).await;
    let dual = |name: &str, n: u8, mac4: u8, mac6: u8| {
        let d4 = data(mac4);
        let d6 = data(mac6);
        let ip = format!("198.51.100.{n}");
        let ip6 = format!("2001:db8::{n}");
        let v4 = format!("10.244.{n}.0/24");
        let v6 = format!("fd42:0:0:{n}::/64");
        node(
            name,
            &[&v4, &v6],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", &d4),
                ("backend-v6-data", &d6),
                ("public-ip", &ip),
                ("public-ipv6", &ip6),
            ],
        )
    };
    c.server.add_node(dual("me", 1, 1, 0x11));
    c.server.add_node(dual("a", 2, 2, 0x12));
    let store = c.store("me").await;
    let (mut rx, task) = start_watch(&store);
    match recv(&mut rx, Duration::from_secs(5)).await {
        WatchUpdate::Snapshot(s) => assert_eq!(s.len(), 2),
        other => panic!("want snapshot, got {other:?}"),
    }

    // Add: the whole accepted set, the new dual-stack lease in it.
    c.server.add_node(dual("b", 3, 3, 0x13));
    let (ips, leases) = next_snapshot(&mut rx).await;
    assert_eq!(ips, ["198.51.100.2", "198.51.100.3", "198.51.100.1"]);
    assert_eq!(
        leases[1].ipv6_subnet.map(|s| s.to_string()).as_deref(),
        Some("fd42:0:0:3::/64")
    );
    // Changes flanneld does not care about (labels, conditions) send nothing (else the next
    // snapshot would still hold the old IPv6 MAC); a change in only the IPv6 family does
    // (upstream drops it).
    c.server.update_node("b", |n| {
        n.metadata.labels = Some(BTreeMap::from([("role".into(), "x".into())]));
    });
    let d6 = data(0x33);
    c.server
        .set_annotation("b", &format!("{P}backend-v6-data"), Some(&d6));
    let (_, leases) = next_snapshot(&mut rx).await;
    assert_eq!(
        leases[1]
            .attrs
            .vxlan_v6_data()
            .expect("v6 data")
            .map(|d| d.vtep_mac),
        Some(mac(0x33))
    );
    // Delete.
    assert!(c.server.delete_node("a"));
    assert_eq!(
        next_snapshot(&mut rx).await.0,
        ["198.51.100.3", "198.51.100.1"]
    );
    // Losing the managed annotation removes the lease too.
    c.server
        .set_annotation("b", &format!("{P}kube-subnet-manager"), None);
    assert_eq!(next_snapshot(&mut rx).await.0, ["198.51.100.1"]);
    // Closing the receiver ends the watch.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("watch ends")
        .expect("join");
}

#[tokio::test]
async fn watch_expiry_relists() {
    let c = Cluster::new("expiry", VXLAN_CONFIG).await;
    c.server
        .add_node(peer("me", "10.244.1.0/24", "198.51.100.1", 1));
    c.server
        .add_node(peer("a", "10.244.2.0/24", "198.51.100.2", 2));
    let store = c.store("me").await;
    let (mut rx, task) = start_watch(&store);
    assert!(matches!(
        recv(&mut rx, Duration::from_secs(5)).await,
        WatchUpdate::Snapshot(_)
    ));
    wait_for_watches(&c.server, 1).await;
    let lists_before = c
        .server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/nodes" && !r.query.contains("watch"))
        .count();
    c.server.expire_watches();
    match recv(&mut rx, Duration::from_secs(5)).await {
        WatchUpdate::Snapshot(s) => assert_eq!(s.len(), 2),
        other => panic!("410 must lead to a fresh snapshot, got {other:?}"),
    }
    let lists_after = c
        .server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/nodes" && !r.query.contains("watch"))
        .count();
    assert_eq!(lists_after, lists_before + 1);
    // The watch continues after the re-list.
    c.server
        .add_node(peer("b", "10.244.3.0/24", "198.51.100.3", 3));
    assert_eq!(
        next_snapshot(&mut rx).await.0,
        ["198.51.100.2", "198.51.100.3", "198.51.100.1"]
    );
    // A clean end of the stream (server-side timeout) resumes without a re-list.
    wait_for_watches(&c.server, 2).await;
    c.server.close_watches();
    c.server
        .add_node(peer("c", "10.244.4.0/24", "198.51.100.4", 4));
    assert_eq!(
        next_snapshot(&mut rx).await.0,
        [
            "198.51.100.2",
            "198.51.100.3",
            "198.51.100.4",
            "198.51.100.1"
        ],
        "a resumed watch sends the new set"
    );
    task.abort();
}

#[tokio::test]
async fn watch_survives_api_server_restarts() {
    let mut c = Cluster::new("restart", VXLAN_CONFIG).await;
    c.server
        .add_node(peer("me", "10.244.1.0/24", "198.51.100.1", 1));
    c.server
        .add_node(peer("a", "10.244.2.0/24", "198.51.100.2", 2));
    c.server
        .add_node(peer("b", "10.244.3.0/24", "198.51.100.3", 3));
    let store = c.store("me").await;
    let (mut rx, task) = start_watch(&store);
    let own = "10.244.1.0/24".parse().ok();
    let mut watcher = LeaseWatcher::new(own, None);
    until(&mut rx, &mut watcher, Duration::from_secs(5), |w| {
        w.len() == 2
    })
    .await;

    // Outage 1, history kept: the watch resumes and the changes arrive within 5 s.
    c.server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.server
        .add_node(peer("c", "10.244.4.0/24", "198.51.100.4", 4));
    c.server.delete_node("a");
    c.server.restart().await.expect("restart");
    until(&mut rx, &mut watcher, Duration::from_secs(5), |w| {
        peer_ips(w) == ["198.51.100.3", "198.51.100.4"]
    })
    .await;

    // Outage 2, history lost meanwhile: resuming gets 410, the store re-lists.
    c.server.stop().await;
    c.server.set_history_window(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.server
        .add_node(peer("d", "10.244.5.0/24", "198.51.100.5", 5));
    c.server
        .add_node(peer("e", "10.244.6.0/24", "198.51.100.6", 6));
    c.server.update_node("b", |n| {
        if let Some(m) = n.metadata.annotations.as_mut() {
            m.insert(format!("{P}backend-data"), data(0x33));
        }
    });
    c.server.restart().await.expect("restart");
    let seen = until(&mut rx, &mut watcher, Duration::from_secs(5), |w| {
        peer_ips(w)
            == [
                "198.51.100.3",
                "198.51.100.4",
                "198.51.100.5",
                "198.51.100.6",
            ]
            && w.leases()
                .any(|l| l.attrs.vxlan_data().ok().flatten().map(|d| d.vtep_mac) == Some(mac(0x33)))
    })
    .await;
    assert!(
        seen.iter().any(|u| matches!(u, WatchUpdate::Snapshot(_))),
        "an expired resume must re-list: {seen:?}"
    );
    task.abort();
}

/// Collects formatted log lines in memory.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn bad_nodes_are_skipped_named_and_counted() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let c = Cluster::new("bad", VXLAN_CONFIG).await;
    c.server
        .add_node(peer("me", "10.244.1.0/24", "198.51.100.1", 1));
    c.server
        .add_node(peer("good", "10.244.2.0/24", "198.51.100.2", 2));
    let mut bad_overwrite = peer("bad-overwrite", "10.244.3.0/24", "198.51.100.3", 3);
    let outside = peer("outside", "10.99.4.0/24", "198.51.100.4", 4);
    let mut malformed = peer("malformed", "10.244.5.0/24", "198.51.100.5", 5);
    let overlapping = peer("overlapping", "10.244.2.0/25", "198.51.100.6", 6);
    let mut bad_ip = peer("bad-ip", "10.244.7.0/24", "198.51.100.7", 7);
    for (n, key, value) in [
        (&mut bad_overwrite, "public-ip-overwrite", "203.0.113.300"),
        (&mut malformed, "backend-data", "{\"VNI\":1,\"VtepMAC\":"),
        (&mut bad_ip, "public-ip", "nonsense"),
    ] {
        if let Some(m) = n.metadata.annotations.as_mut() {
            m.insert(format!("{P}{key}"), value.to_owned());
        }
    }
    // "overlapping" is created after "good", so "good" keeps the range.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in [bad_overwrite, outside, malformed, overlapping, bad_ip] {
        c.server.add_node(n);
    }
    let store = c.store("me").await;
    let (mut rx, task) = start_watch(&store);
    let mut watcher = LeaseWatcher::new("10.244.1.0/24".parse().ok(), None);
    match recv(&mut rx, Duration::from_secs(5)).await {
        WatchUpdate::Snapshot(s) => {
            watcher.apply(WatchUpdate::Snapshot(s));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(peer_ips(&watcher), ["198.51.100.2"]);
    let skipped = store.skipped_nodes();
    let names: Vec<&str> = skipped.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "bad-ip",
            "bad-overwrite",
            "malformed",
            "outside",
            "overlapping"
        ]
    );
    assert!(
        skipped["bad-overwrite"].contains("public-ip-overwrite"),
        "{skipped:?}"
    );
    assert!(
        skipped["outside"].contains("outside the network 10.244.0.0/16"),
        "{skipped:?}"
    );
    assert!(skipped["malformed"].contains("backend-data"), "{skipped:?}");
    assert!(
        skipped["overlapping"].contains("overlaps node good"),
        "{skipped:?}"
    );
    assert!(skipped["bad-ip"].contains("public-ip"), "{skipped:?}");
    assert_eq!(store.invalid_nodes(), 5);
    let text = logs.text();
    for name in names {
        assert!(
            text.contains(&format!("skipping node {name}:")),
            "no warning for {name}:\n{text}"
        );
    }

    // Others keep working: a new good node arrives, a fixed node comes back.
    c.server
        .add_node(peer("late", "10.244.8.0/24", "198.51.100.8", 8));
    c.server
        .set_annotation("malformed", &format!("{P}backend-data"), Some(&data(5)));
    until(&mut rx, &mut watcher, Duration::from_secs(5), |w| {
        peer_ips(w) == ["198.51.100.2", "198.51.100.5", "198.51.100.8"]
    })
    .await;
    assert!(!store.skipped_nodes().contains_key("malformed"));
    // Repeated updates of a still-broken node do not warn again.
    c.server.update_node("outside", |n| {
        n.metadata.labels = Some(BTreeMap::from([("x".into(), "1".into())]));
    });
    c.server
        .set_annotation("bad-ip", &format!("{P}public-ip"), Some("still-bad"));
    c.server
        .add_node(peer("sentinel", "10.244.9.0/24", "198.51.100.9", 9));
    until(&mut rx, &mut watcher, Duration::from_secs(5), |w| {
        w.len() == 4
    })
    .await;
    // The bad-ip node's problem text changed (new value), so it is reported once more.
    assert_eq!(store.invalid_nodes(), 6);
    task.abort();
}

#[tokio::test]
async fn node_name_resolution() {
    let c = Cluster::new("names", VXLAN_CONFIG).await;
    c.server.add_node(node("worker-7", &["10.244.7.0/24"], &[]));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "kube-flannel-ds-abcde", "namespace": "kube-flannel"},
        "spec": {"nodeName": "worker-7", "containers": [{"name": "kube-flannel"}]}
    }))
    .expect("pod");
    c.server.add_pod(pod);
    let unscheduled: Pod = serde_json::from_value(json!({
        "metadata": {"name": "pending", "namespace": "kube-flannel"},
        "spec": {"containers": [{"name": "kube-flannel"}]}
    }))
    .expect("pod");
    c.server.add_pod(unscheduled);
    let flags = c.flags();

    // The environment of flannel's pod, with this NODE_NAME.
    let in_pod = |node_name| {
        [
            ("NODE_NAME", node_name),
            ("POD_NAME", "kube-flannel-ds-abcde"),
            ("POD_NAMESPACE", "kube-flannel"),
        ]
    };
    // NODE_NAME wins over the pod.
    let s = c
        .store_with(&flags, &in_pod("explicit"))
        .await
        .expect("connect");
    assert_eq!(s.node_name(), "explicit");
    assert!(c
        .server
        .requests()
        .iter()
        .all(|r| !r.path.contains("/pods/")));

    // Empty NODE_NAME: the pod's spec.nodeName.
    let s = c.store_with(&flags, &in_pod("")).await.expect("connect");
    assert_eq!(s.node_name(), "worker-7");
    assert!(c.server.requests().iter().any(|r| r.method == "GET"
        && r.path == "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-abcde"));

    let err = |r: Result<KubeStore, StoreError>| r.expect_err("must fail").to_string();
    assert_eq!(
        err(c.store_with(&flags, &[("POD_NAME", "x")]).await),
        "env variables POD_NAME and POD_NAMESPACE must be set"
    );
    let e = err(c
        .store_with(
            &flags,
            &[("POD_NAME", "gone"), ("POD_NAMESPACE", "kube-flannel")],
        )
        .await);
    assert!(
        e.starts_with("error retrieving pod spec for 'kube-flannel/gone': "),
        "{e}"
    );
    assert_eq!(
        err(c
            .store_with(
                &flags,
                &[("POD_NAME", "pending"), ("POD_NAMESPACE", "kube-flannel")]
            )
            .await),
        "node name not present in pod spec 'kube-flannel/pending'"
    );

    // Configuration errors.
    let missing = Flags {
        net_config_path: c.dir.0.join("absent.json"),
        ..flags.clone()
    };
    let e = err(c.store_with(&missing, &[("NODE_NAME", "n")]).await);
    assert!(e.starts_with("failed to read net conf: "), "{e}");
    let bad_prefix = Flags {
        kube_annotation_prefix: "a/b/c".into(),
        ..flags.clone()
    };
    assert_eq!(
        err(c.store_with(&bad_prefix, &[("NODE_NAME", "n")]).await),
        "subnet/kube: prefix can contain at most single slash"
    );
}

#[tokio::test]
async fn custom_prefix_and_kubeconfig() {
    let c = Cluster::new("prefix", VXLAN_CONFIG).await;
    c.server.add_node(node("n", &["10.244.1.0/24"], &[]));
    let kubeconfig = c.dir.0.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\nusers:\n- name: test\n  user: {{}}\n",
            c.server.url()
        ),
    )
    .expect("kubeconfig");
    let flags = Flags {
        kube_api_url: String::new(),
        kubeconfig_file: kubeconfig.display().to_string(),
        kube_annotation_prefix: "example.com/pfx".into(),
        ..c.flags()
    };
    let store = c
        .store_with(&flags, &[("NODE_NAME", "n")])
        .await
        .expect("connect via kubeconfig");
    c.acquire(&store, &vxlan_attrs(Ipv4Addr::new(198, 51, 100, 1), 1))
        .await;
    let got = annotations(&c.server, "n");
    assert_eq!(
        got.get("example.com/pfx-backend-type").map(String::as_str),
        Some("vxlan")
    );
    assert_eq!(
        got.get("example.com/pfx-kube-subnet-manager")
            .map(String::as_str),
        Some("true")
    );
    assert!(!got.keys().any(|k| k.starts_with(P)));
    // The stored MAC is found under the normalised name (upstream looks for
    // "example.com/pfx/backend-data" and never finds it).
    assert_eq!(
        store.stored_vtep_macs().await.expect("macs").0,
        Some(mac(1))
    );
}

#[tokio::test]
async fn api_server_down_at_start_is_an_error_not_a_hang() {
    let mut c = Cluster::new("down", VXLAN_CONFIG).await;
    c.server.add_node(node("n", &["10.244.1.0/24"], &[]));
    let store = c.store("n").await;
    c.server.stop().await;
    let e = store.list().await.expect_err("unreachable");
    assert!(
        matches!(e, StoreError::Unavailable { store: "kube", .. }),
        "{e}"
    );
    assert!(store.stored_public_ips().await.is_err());
    c.server.restart().await.expect("restart");
    assert_eq!(store.stored_public_ips().await.expect("back"), (None, None));
}
