//! The Kubernetes lease store (`--kube-subnet-mgr`, compat §5): a node's lease is its
//! `spec.podCIDR(s)`, its attributes live in node annotations, and peers are found by
//! listing and watching every Node.
//!
//! Compatible with upstream flannel nodes in the same cluster: the same annotation names and
//! values (compat §5.2–§5.4), written with a strategic-merge PATCH on `nodes/<name>/status`
//! (so the RBAC of `kube-flannel.yml` suffices), and only when something changed.
//!
//! Daemon use, in this order (flannel's `main.go` order): [`KubeStore::connect`];
//! [`LeaseStore::network_config`]; [`LeaseStore::stored_public_ips`] (overrides
//! `--public-ip(v6)` before the external interface is chosen); [`LeaseStore::stored_vtep_macs`]
//! (the MAC to create the vxlan device with); [`LeaseStore::acquire`]; after the backend runs,
//! [`LeaseStore::mark_network_available`] once (errors are only logged, like upstream);
//! [`LeaseStore::watch`] for the peers.
//!
//! Deliberate differences from upstream, all on the safe side:
//!
//! * A peer whose annotations cannot be used (bad `public-ip` or `public-ip-overwrite`,
//!   backend data that is not JSON or, for vxlan, not `{"VNI":…,"VtepMAC":…}`, a pod CIDR
//!   outside `Network`, or one overlapping another node's) is skipped with one warning naming
//!   it and counted ([`KubeStore::invalid_nodes`], [`KubeStore::skipped_nodes`]); the other
//!   nodes keep working. Of two overlapping nodes the one accepted first keeps its lease (on a
//!   fresh list: the older node, then the smaller name).
//! * Updates compare the whole derived lease, so a change in one family of a dual-stack node
//!   is propagated (upstream drops it, compat §15.3).
//! * The stored VTEP MAC is read from the normalised annotation name and parsed as JSON
//!   (upstream trims strings and uses `prefix + "/backend-data"`, compat §15.9).
//! * This node's `public-ip-overwrite` / `node-public-ip` must be valid addresses (upstream
//!   publishes whatever is there); the own pod CIDR is checked against `Network` before
//!   anything is published.
//! * Watch: list, then watch from the list's resource version; a closed stream resumes from
//!   the last version seen, an expired version (410 Gone) re-lists and sends a fresh
//!   [`WatchUpdate::Snapshot`], an unreachable API server is retried with back-off.
//!
//! The watch sends only [`WatchUpdate::Snapshot`]s: node events update the pure `NodeSet`
//! (which drops status heartbeats and unrelated label changes), and once a burst of them has
//! been read, the leases are derived again (overlaps resolved) and, if they differ, sent whole.
//! The store computes no added/removed leases: the daemon's `LeaseWatcher` is the one lease
//! diff.

use core::fmt;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use ::kube::{Api, Client, Config};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::annotations::{node_to_lease, AnnotationError, AnnotationNames};
use super::store::{LeaseStore, StoreError, StoredPublicIps, StoredVtepMacs, WatchUpdate};
use super::{Lease, LeaseAttrs, VxlanBackendData};
use crate::config::flags::Flags;
use crate::config::gojson::shorten;
use crate::config::netconf::NetConfig;
use crate::config::subnet_env::PreviousSubnets;

pub use super::kube_error::KubeError;

const STORE: &str = "kube";
/// Nodes fetched per LIST page.
const LIST_PAGE: u32 = 500;
/// Most node changes folded into one snapshot while the watch keeps delivering.
const MAX_BURST: usize = 1000;

/// Poll intervals and time limits (upstream's by default; tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeTiming {
    /// How often [`LeaseStore::acquire`] looks for this node (3 s).
    pub node_poll: Duration,
    /// How long it waits for this node and retries the annotation patch (30 s).
    pub node_timeout: Duration,
    /// `timeoutSeconds` of each watch request (290 s).
    pub watch_timeout: Duration,
    /// First delay after a failed list/watch (100 ms); doubles per failure.
    pub backoff_initial: Duration,
    /// Longest delay between reconnection attempts (2 s).
    pub backoff_max: Duration,
}

impl Default for KubeTiming {
    fn default() -> Self {
        KubeTiming {
            node_poll: Duration::from_secs(3),
            node_timeout: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(290),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Skipped-node bookkeeping shared with running watches.
#[derive(Debug, Default)]
struct Stats {
    /// Warnings issued for unusable nodes (one per node and distinct problem).
    invalid: AtomicU64,
    /// Nodes currently skipped, with the reason.
    skipped: Mutex<BTreeMap<String, String>>,
}

/// The Kubernetes lease store; see the module docs.
#[derive(Clone)]
pub struct KubeStore {
    nodes: Api<Node>,
    node_name: String,
    names: AnnotationNames,
    config_json: String,
    config: NetConfig,
    set_node_network_unavailable: bool,
    timing: KubeTiming,
    stats: Arc<Stats>,
}

impl fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeStore")
            .field("node_name", &self.node_name)
            .field("names", &self.names)
            .field("config", &self.config)
            .field(
                "set_node_network_unavailable",
                &self.set_node_network_unavailable,
            )
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

fn api_error(context: &str, e: &::kube::Error) -> StoreError {
    StoreError::Unavailable {
        store: STORE,
        message: format!("{context}: {e}"),
    }
}

fn is_not_found(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(r) if r.code == 404)
}

fn is_gone(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(r) if r.code == 410)
}

/// The client configuration like client-go's `BuildConfigFromFlags`: a kubeconfig file (its
/// current context; `--kube-api-url` overrides its server), else the URL alone, else the
/// in-cluster service account.
async fn client_config(api_url: &str, kubeconfig: &str) -> Result<Config, KubeError> {
    let url = |u: &str| {
        u.parse()
            .map_err(|e| KubeError::Config(format!("invalid --kube-api-url {u:?}: {e}")))
    };
    if !kubeconfig.is_empty() {
        let kc = ::kube::config::Kubeconfig::read_from(kubeconfig)
            .map_err(|e| KubeError::Config(format!("{kubeconfig}: {e}")))?;
        let mut config = Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| KubeError::Config(format!("{kubeconfig}: {e}")))?;
        if !api_url.is_empty() {
            config.cluster_url = url(api_url)?;
        }
        return Ok(config);
    }
    if !api_url.is_empty() {
        return Ok(Config::new(url(api_url)?));
    }
    Config::incluster().map_err(|e| KubeError::Config(format!("in-cluster config: {e}")))
}

impl KubeStore {
    /// Connects like flanneld: client from `--kubeconfig-file`/`--kube-api-url` (else
    /// in-cluster), node name from `NODE_NAME` or the pod `POD_NAMESPACE`/`POD_NAME` (looked
    /// up through `env`; pass `|k| std::env::var(k).ok()`), then reads and parses
    /// `--net-config-path` and normalises `--kube-annotation-prefix`.
    pub async fn connect(
        flags: &Flags,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<KubeStore, StoreError> {
        // Read the environment before any await so the future stays Send.
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        let node_env = var("NODE_NAME");
        let pod_env = (var("POD_NAME"), var("POD_NAMESPACE"));
        let config = client_config(&flags.kube_api_url, &flags.kubeconfig_file).await?;
        let client = Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))?;
        let node_name = match (node_env, pod_env) {
            (Some(n), _) => n,
            (None, (Some(name), Some(namespace))) => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
                let pod = pods.get(&name).await.map_err(|e| KubeError::PodLookup {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    message: e.to_string(),
                })?;
                pod.spec
                    .map(|s| s.node_name.unwrap_or_default())
                    .filter(|n| !n.is_empty())
                    .ok_or(KubeError::PodWithoutNode { namespace, name })?
            }
            _ => return Err(KubeError::PodEnvMissing.into()),
        };
        let config_json = std::fs::read_to_string(&flags.net_config_path).map_err(|source| {
            KubeError::ReadNetConf {
                path: flags.net_config_path.clone(),
                source,
            }
        })?;
        let config = NetConfig::parse(&config_json).map_err(KubeError::ParseNetConf)?;
        let names =
            AnnotationNames::new(&flags.kube_annotation_prefix).map_err(KubeError::Prefix)?;
        info!(node = %node_name, "Kubernetes subnet manager for node {node_name}");
        Ok(KubeStore {
            nodes: Api::all(client),
            node_name,
            names,
            config_json,
            config,
            set_node_network_unavailable: flags.set_node_network_unavailable,
            timing: KubeTiming::default(),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Replaces the poll intervals and time limits.
    pub fn with_timing(mut self, timing: KubeTiming) -> KubeStore {
        self.timing = timing;
        self
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The annotation names in use.
    pub fn annotation_names(&self) -> &AnnotationNames {
        &self.names
    }

    /// Warnings issued so far for unusable nodes (each node and distinct problem once).
    pub fn invalid_nodes(&self) -> u64 {
        self.stats.invalid.load(Ordering::Relaxed)
    }

    /// The nodes currently skipped by the watch, with the reason.
    pub fn skipped_nodes(&self) -> BTreeMap<String, String> {
        self.stats
            .skipped
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    async fn own_node(&self) -> Result<Node, StoreError> {
        self.nodes
            .get(&self.node_name)
            .await
            .map_err(|e| api_error(&format!("get node {:?}", self.node_name), &e))
    }

    /// Waits for this node like upstream (poll every 3 s, at most 30 s).
    async fn wait_for_own_node(&self) -> Result<Node, StoreError> {
        self.poll_node("waiting for own node", || async move {
            match self.nodes.get(&self.node_name).await {
                Ok(node) => Ok(node),
                Err(e) if is_not_found(&e) => {
                    Err(format!("node {:?} does not exist", self.node_name))
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// Strategic-merge PATCH of `nodes/<name>/status`, retried like upstream.
    async fn patch_status(&self, body: serde_json::Value) -> Result<(), StoreError> {
        let body = &body;
        self.poll_node("failed to patch node", || async move {
            let patch = Patch::Strategic(body);
            self.nodes
                .patch_status(&self.node_name, &PatchParams::default(), &patch)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Tries `attempt` every `node_poll` until it succeeds or `node_timeout` would pass
    /// (upstream's node retries); the timeout names the last failure.
    async fn poll_node<T, F>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = tokio::time::Instant::now() + self.timing.node_timeout;
        loop {
            let message = match attempt().await {
                Ok(v) => return Ok(v),
                Err(message) => message,
            };
            debug!(node = %self.node_name, "{what}: {message}");
            if tokio::time::Instant::now() + self.timing.node_poll > deadline {
                return Err(KubeError::Timeout {
                    node: self.node_name.clone(),
                    message,
                }
                .into());
            }
            tokio::time::sleep(self.timing.node_poll).await;
        }
    }

    async fn acquire_impl(
        &self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, StoreError> {
        let node = self.wait_for_own_node().await?;
        let name = &self.node_name;
        let spec = node.spec.clone().unwrap_or_default();
        if spec.pod_cidr.as_deref().unwrap_or("").is_empty() {
            return Err(KubeError::PodCidrNotAssigned(name.clone()).into());
        }
        let (v4, v6) = own_pod_cidrs(spec.pod_cidr.as_deref(), spec.pod_cidrs.as_deref()).map_err(
            |source| match source {
                AnnotationError::TooManyPodCidrs => KubeError::TooManyPodCidrs(name.clone()),
                source => KubeError::PodCidr {
                    node: name.clone(),
                    source,
                },
            },
        )?;
        let mut lease = Lease {
            subnet: None,
            ipv6_subnet: None,
            attrs: attrs.clone(),
            expiration: None,
            node: Some(name.clone()),
        };
        if config.enable_ipv4 {
            let cidr = v4.ok_or_else(|| KubeError::PodCidr {
                node: name.clone(),
                source: AnnotationError::MissingPodCidr("IPv4"),
            })?;
            if !config.network.is_some_and(|n| n.contains(&cidr)) {
                return Err(KubeError::OutsideNetwork {
                    network: config.network.map(|n| n.to_string()).unwrap_or_default(),
                    cidr: cidr.to_string(),
                    family: "",
                    node: name.clone(),
                }
                .into());
            }
            lease.subnet = Some(cidr);
        }
        if config.enable_ipv6 {
            let cidr = v6.ok_or_else(|| KubeError::PodCidr {
                node: name.clone(),
                source: AnnotationError::MissingPodCidr("IPv6"),
            })?;
            if !config.ipv6_network.is_some_and(|n| n.contains(&cidr)) {
                return Err(KubeError::OutsideNetwork {
                    network: config
                        .ipv6_network
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    cidr: cidr.to_string(),
                    family: "IPv6 ",
                    node: name.clone(),
                }
                .into());
            }
            lease.ipv6_subnet = Some(cidr);
        }
        let current = node.metadata.annotations.clone().unwrap_or_default();
        let plan = plan_annotations(&self.names, &current, attrs).map_err(|source| {
            KubeError::Annotation {
                node: name.clone(),
                source,
            }
        })?;
        for (value, annotation) in &plan.overrides {
            info!("Overriding public ip with '{value}' from node annotation '{annotation}'");
        }
        if plan.changes.is_empty() {
            debug!(node = %name, "node annotations up to date; not patching");
        } else {
            let body = serde_json::json!({ "metadata": { "annotations": plan.changes } });
            self.patch_status(body).await?;
            info!(node = %name, changed = plan.changes.len(), "published lease annotations");
        }
        Ok(lease)
    }

    /// Lists every node (paged), returning them and the list's resource version.
    async fn list_nodes(&self) -> Result<(Vec<Node>, String), ::kube::Error> {
        let mut params = ListParams::default().limit(LIST_PAGE);
        let mut items = Vec::new();
        loop {
            let page = self.nodes.list(&params).await?;
            items.extend(page.items);
            let rv = page.metadata.resource_version.unwrap_or_default();
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => return Ok((items, rv)),
            }
        }
    }

    fn node_set(&self) -> NodeSet {
        NodeSet::new(self.names.clone(), &self.config)
    }

    /// Publishes new problems as warnings (counted) and the current skipped set.
    fn report(&self, set: &mut NodeSet) {
        for (node, reason) in set.take_new_problems() {
            warn!(node = %node, "skipping node {node}: {reason}");
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut skipped) = self.stats.skipped.lock() {
            skipped.clone_from(&set.problems);
        }
    }

    /// Every usable lease right now (one LIST), own lease included. Unusable nodes are left
    /// out silently here; the watch warns about them and counts them.
    pub async fn list_leases(&self) -> Result<Vec<Lease>, StoreError> {
        let (nodes, _) = self
            .list_nodes()
            .await
            .map_err(|e| api_error("list nodes", &e))?;
        let mut set = self.node_set();
        let leases = set.replace_all(&nodes);
        for (node, reason) in set.take_new_problems() {
            debug!(node = %node, "list: skipping node {node}: {reason}");
        }
        Ok(leases)
    }

    /// Settles the node changes seen since the last update: recomputes the accepted leases
    /// once and, when they differ, sends them whole (the watcher diffs them). False when the
    /// receiver went away.
    async fn settle(&self, set: &mut NodeSet, tx: &mpsc::Sender<WatchUpdate>) -> bool {
        let changed = set.recompute();
        self.report(set);
        !changed || tx.send(WatchUpdate::Snapshot(set.leases())).await.is_ok()
    }

    async fn watch_loop(&self, tx: mpsc::Sender<WatchUpdate>) -> Result<(), StoreError> {
        let mut set = self.node_set();
        let mut backoff = Backoff::new(&self.timing);
        let params = WatchParams::default()
            .timeout(u32::try_from(self.timing.watch_timeout.as_secs()).unwrap_or(290));
        'list: loop {
            let (nodes, mut rv) = match self.list_nodes().await {
                Ok(v) => v,
                Err(e) => {
                    backoff.failed("list nodes", &e);
                    if !backoff.wait(&tx).await {
                        return Ok(());
                    }
                    continue 'list;
                }
            };
            backoff.succeeded();
            let snapshot = set.replace_all(&nodes);
            // Node changes not yet settled into a snapshot (see `settle`).
            let mut pending = 0usize;
            self.report(&mut set);
            debug!(nodes = nodes.len(), leases = snapshot.len(), %rv, "listed nodes");
            if tx.send(WatchUpdate::Snapshot(snapshot)).await.is_err() {
                return Ok(());
            }
            loop {
                // A watch that ended (or failed) right after a change: send it before resuming.
                if pending > 0 {
                    pending = 0;
                    if !self.settle(&mut set, &tx).await {
                        return Ok(());
                    }
                }
                let stream = match self.nodes.watch(&params, &rv).await {
                    Ok(s) => s,
                    Err(e) if is_gone(&e) => {
                        info!("node watch expired (resource version {rv}); re-listing");
                        continue 'list;
                    }
                    Err(e) => {
                        backoff.failed("watch nodes", &e);
                        if !backoff.wait(&tx).await {
                            return Ok(());
                        }
                        continue;
                    }
                };
                debug!(%rv, "watching nodes");
                let stream = stream.peekable();
                futures::pin_mut!(stream);
                let opened = tokio::time::Instant::now();
                let mut delivered = false;
                loop {
                    // One snapshot per burst: settle once nothing more is ready (or the burst
                    // is long), so a relist-sized wave of node events is diffed once.
                    if pending > 0
                        && (pending >= MAX_BURST || stream.as_mut().peek().now_or_never().is_none())
                    {
                        pending = 0;
                        if !self.settle(&mut set, &tx).await {
                            return Ok(());
                        }
                    }
                    let item = tokio::select! {
                        () = tx.closed() => return Ok(()),
                        item = stream.next() => item,
                    };
                    let changed = match item {
                        // The server ended the watch (timeout): resume from `rv`, pausing
                        // first if it ended at once without news (no tight loop).
                        None => {
                            if !delivered && opened.elapsed() < Duration::from_secs(1) {
                                debug!("node watch ended at once; pausing before resuming");
                                if !backoff.wait(&tx).await {
                                    return Ok(());
                                }
                            }
                            break;
                        }
                        Some(Ok(event)) => {
                            delivered = true;
                            backoff.succeeded();
                            match event {
                                WatchEvent::Added(node) | WatchEvent::Modified(node) => {
                                    update_rv(&mut rv, &node);
                                    set.upsert(&node)
                                }
                                WatchEvent::Deleted(node) => {
                                    update_rv(&mut rv, &node);
                                    set.remove(node.metadata.name.as_deref().unwrap_or(""))
                                }
                                WatchEvent::Bookmark(b) => {
                                    rv = b.metadata.resource_version;
                                    continue;
                                }
                                WatchEvent::Error(e) if e.code == 410 => {
                                    info!("node watch expired (resource version {rv}): {}; re-listing", e.message);
                                    continue 'list;
                                }
                                WatchEvent::Error(e) => {
                                    warn!(
                                        "node watch error: {} ({}); re-listing",
                                        e.message, e.code
                                    );
                                    if !backoff.wait(&tx).await {
                                        return Ok(());
                                    }
                                    continue 'list;
                                }
                            }
                        }
                        Some(Err(e)) if is_gone(&e) => {
                            info!("node watch expired (resource version {rv}); re-listing");
                            continue 'list;
                        }
                        Some(Err(e)) => {
                            backoff.failed("node watch", &e);
                            if !backoff.wait(&tx).await {
                                return Ok(());
                            }
                            // A decoding problem may have lost an event: start over.
                            if matches!(e, ::kube::Error::SerdeError(_)) {
                                continue 'list;
                            }
                            break;
                        }
                    };
                    if changed {
                        pending += 1;
                    }
                }
            }
        }
    }
}

fn update_rv(rv: &mut String, node: &Node) {
    if let Some(v) = node
        .metadata
        .resource_version
        .as_deref()
        .filter(|v| !v.is_empty())
    {
        v.clone_into(rv);
    }
}

/// Reconnection delays: doubling from `backoff_initial` to `backoff_max`, one warning per
/// outage.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    failing: bool,
}

impl Backoff {
    fn new(t: &KubeTiming) -> Backoff {
        Backoff {
            initial: t.backoff_initial,
            max: t.backoff_max,
            next: t.backoff_initial,
            failing: false,
        }
    }

    fn failed(&mut self, what: &str, e: &::kube::Error) {
        if self.failing {
            debug!("{what} failed again: {e}");
        } else {
            warn!("{what} failed: {e}; retrying");
            self.failing = true;
        }
    }

    fn succeeded(&mut self) {
        if self.failing {
            info!("Kubernetes API reachable again");
        }
        self.failing = false;
        self.next = self.initial;
    }

    /// Sleeps; false when the receiver went away meanwhile.
    async fn wait(&mut self, tx: &mpsc::Sender<WatchUpdate>) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = tx.closed() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

impl LeaseStore for KubeStore {
    fn name(&self) -> String {
        format!("Kubernetes Subnet Manager - {}", self.node_name)
    }

    fn network_config(&self) -> BoxFuture<'_, Result<String, StoreError>> {
        Box::pin(async move { Ok(self.config_json.clone()) })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a NetConfig,
        attrs: &'a LeaseAttrs,
        _previous: &'a PreviousSubnets,
    ) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(self.acquire_impl(config, attrs))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>> {
        Box::pin(self.list_leases())
    }

    fn watch(&self, tx: mpsc::Sender<WatchUpdate>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.watch_loop(tx))
    }

    fn stored_public_ips(&self) -> BoxFuture<'_, Result<StoredPublicIps, StoreError>> {
        Box::pin(async move {
            let node = self.own_node().await?;
            let annotations = node.metadata.annotations.unwrap_or_default();
            let bad = |source| KubeError::Annotation {
                node: self.node_name.clone(),
                source,
            };
            let v4 = optional_ipv4(&annotations, &self.names.node_public_ip).map_err(bad)?;
            let v6 = optional_ipv6(&annotations, &self.names.node_public_ipv6).map_err(bad)?;
            if let Some(ip) = v4 {
                info!(
                    "using public IP {ip} from node annotation '{}'",
                    self.names.node_public_ip
                );
            }
            if let Some(ip) = v6 {
                info!(
                    "using public IPv6 {ip} from node annotation '{}'",
                    self.names.node_public_ipv6
                );
            }
            Ok((v4, v6))
        })
    }

    fn stored_vtep_macs(&self) -> BoxFuture<'_, Result<StoredVtepMacs, StoreError>> {
        Box::pin(async move {
            let node = self.own_node().await?;
            let annotations = node.metadata.annotations.unwrap_or_default();
            let mac = |name: &String| {
                let text = annotations.get(name).map(String::as_str).unwrap_or("");
                if text.is_empty() || text == "null" {
                    return None;
                }
                match VxlanBackendData::from_json(text) {
                    Ok(d) => Some(d.vtep_mac),
                    Err(e) => {
                        warn!(node = %self.node_name, "ignoring the stored VTEP MAC: annotation {name}: {e}");
                        None
                    }
                }
            };
            Ok((
                mac(&self.names.backend_data),
                mac(&self.names.backend_v6_data),
            ))
        })
    }

    fn mark_network_available(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if !self.set_node_network_unavailable {
                return Ok(());
            }
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            let condition = NodeCondition {
                type_: "NetworkUnavailable".into(),
                status: "False".into(),
                reason: Some("FlannelIsUp".into()),
                message: Some("Flannel is running on this node".into()),
                last_transition_time: Some(now.clone()),
                last_heartbeat_time: Some(now),
            };
            let body = serde_json::json!({ "status": { "conditions": [condition] } });
            self.nodes
                .patch_status(
                    &self.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&body),
                )
                .await
                .map_err(|e| api_error("set NetworkUnavailable=False", &e))?;
            info!(node = %self.node_name, "set node condition NetworkUnavailable=False (FlannelIsUp)");
            Ok(())
        })
    }
}

/// This node's pod CIDRs by family, like upstream's AcquireLease (`podCIDRs` when set, else
/// `podCIDR`; at most two).
fn own_pod_cidrs(
    pod_cidr: Option<&str>,
    pod_cidrs: Option<&[String]>,
) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), AnnotationError> {
    let single;
    let list: &[String] = match pod_cidrs {
        Some(l) if !l.is_empty() => l,
        _ => {
            single = [pod_cidr.unwrap_or("").to_owned()];
            &single
        }
    };
    if list.len() > 2 {
        return Err(AnnotationError::TooManyPodCidrs);
    }
    let (mut v4, mut v6) = (None, None);
    for text in list {
        match text.parse::<IpNet>().map(|n| n.trunc()) {
            Ok(IpNet::V4(n)) => v4 = v4.or(Some(n)),
            Ok(IpNet::V6(n)) => v6 = v6.or(Some(n)),
            Err(_) => return Err(AnnotationError::PodCidr(shorten(text))),
        }
    }
    Ok((v4, v6))
}

fn value_error(annotation: &str, value: &str, expected: &'static str) -> AnnotationError {
    AnnotationError::Value {
        annotation: annotation.to_owned(),
        value: shorten(value),
        expected,
    }
}

/// An optional IPv4 annotation (dotted or IPv4-mapped, like Go's `ParseIP4`).
fn optional_ipv4(
    annotations: &BTreeMap<String, String>,
    name: &str,
) -> Result<Option<Ipv4Addr>, AnnotationError> {
    match annotations.get(name).map(String::as_str).unwrap_or("") {
        "" => Ok(None),
        text => match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Ok(Some(a)),
            Ok(IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .map(Some)
                .ok_or_else(|| value_error(name, text, "an IPv4 address")),
            Err(_) => Err(value_error(name, text, "an IPv4 address")),
        },
    }
}

/// An optional IPv6 annotation.
fn optional_ipv6(
    annotations: &BTreeMap<String, String>,
    name: &str,
) -> Result<Option<Ipv6Addr>, AnnotationError> {
    match annotations.get(name).map(String::as_str).unwrap_or("") {
        "" => Ok(None),
        text => text
            .parse::<Ipv6Addr>()
            .map(Some)
            .map_err(|_| value_error(name, text, "an IPv6 address")),
    }
}

/// What [`plan_annotations`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct AnnotationPlan {
    /// Annotations to write (only those whose value differs).
    changes: BTreeMap<String, String>,
    /// `(value, overwrite annotation)` for each public IP taken from an overwrite annotation
    /// that differs from what is published.
    overrides: Vec<(String, String)>,
}

/// The annotations upstream's AcquireLease writes for `attrs` (compat §5.4), minus those
/// already present with the same value.
fn plan_annotations(
    names: &AnnotationNames,
    current: &BTreeMap<String, String>,
    attrs: &LeaseAttrs,
) -> Result<AnnotationPlan, AnnotationError> {
    let raw = |r: &Option<Box<serde_json::value::RawValue>>| {
        r.as_ref().map_or("null", |v| v.get()).to_owned()
    };
    let data = raw(&attrs.backend_data);
    let v6_data = raw(&attrs.backend_v6_data);
    let kind = attrs.backend_type.as_str();
    let has_v6 = attrs.public_ipv6.is_some();
    let mut plan = AnnotationPlan::default();
    let mut want = BTreeMap::new();
    want.insert(names.backend_type.clone(), kind.to_owned());
    if kind != "vxlan" || data != "null" {
        want.insert(names.backend_data.clone(), data);
        let overwritten = optional_ipv4(current, &names.public_ip_overwrite)?.is_some();
        let own = Some(attrs.public_ip.to_string());
        let pair = (&names.public_ip, &names.public_ip_overwrite);
        if let Some(ip) = published_ip(current, pair, overwritten, own, &mut plan) {
            want.insert(names.public_ip.clone(), ip);
        }
    }
    let write_v6 = match kind {
        "vxlan" => v6_data != "null",
        "wireguard" => v6_data != "null" && has_v6,
        "host-gw" | "extension" => has_v6,
        _ => false,
    };
    if write_v6 {
        want.insert(names.backend_v6_data.clone(), v6_data);
        let overwritten = optional_ipv6(current, &names.public_ipv6_overwrite)?.is_some();
        let own = attrs.public_ipv6.map(|a| a.to_string());
        let pair = (&names.public_ipv6, &names.public_ipv6_overwrite);
        if let Some(ip) = published_ip(current, pair, overwritten, own, &mut plan) {
            want.insert(names.public_ipv6.clone(), ip);
        }
    }
    want.insert(names.subnet_kube_managed.clone(), "true".to_owned());
    plan.changes = want
        .into_iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .collect();
    Ok(plan)
}

/// The public IP annotation `pair.0` to write: the value of the overwrite annotation `pair.1`
/// when it holds a valid address (`overwritten`; recorded in the plan's overrides when it
/// differs from what is published), else our own address `own`.
fn published_ip(
    current: &BTreeMap<String, String>,
    pair: (&String, &String),
    overwritten: bool,
    own: Option<String>,
    plan: &mut AnnotationPlan,
) -> Option<String> {
    let (published, overwrite) = pair;
    if !overwritten {
        return own;
    }
    let text = current.get(overwrite).cloned().unwrap_or_default();
    if current.get(published) != Some(&text) {
        plan.overrides.push((text.clone(), overwrite.clone()));
    }
    Some(text)
}

/// One managed node as the watch knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `metadata.creationTimestamp` as fixed-width RFC 3339 text (orders overlap winners).
    created: String,
    /// The lease, or why the node is unusable.
    lease: Result<Lease, String>,
}

/// The managed nodes and the leases derived from them; pure (no IO), so the rules are unit
/// tested directly.
#[derive(Debug)]
struct NodeSet {
    names: AnnotationNames,
    enable_ipv4: bool,
    enable_ipv6: bool,
    network: Option<Ipv4Net>,
    ipv6_network: Option<Ipv6Net>,
    entries: BTreeMap<String, Entry>,
    /// The leases currently reported, by node name.
    accepted: BTreeMap<String, Lease>,
    /// Nodes currently skipped, with the reason.
    problems: BTreeMap<String, String>,
    /// Problems not yet reported.
    new_problems: Vec<(String, String)>,
}

impl NodeSet {
    fn new(names: AnnotationNames, config: &NetConfig) -> NodeSet {
        NodeSet {
            names,
            enable_ipv4: config.enable_ipv4,
            enable_ipv6: config.enable_ipv6,
            network: config.network,
            ipv6_network: config.ipv6_network,
            entries: BTreeMap::new(),
            accepted: BTreeMap::new(),
            problems: BTreeMap::new(),
            new_problems: Vec::new(),
        }
    }

    /// The node's entry; `None` for nodes flannel does not manage.
    fn entry(&self, node: &Node) -> Option<Entry> {
        let empty = BTreeMap::new();
        let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
        if !self.names.is_managed(annotations) {
            return None;
        }
        let created = node
            .metadata
            .creation_timestamp
            .as_ref()
            // Fixed width (nanoseconds, UTC), so text order is time order.
            .map(|t| format!("{:.9}", t.0))
            .unwrap_or_default();
        Some(Entry {
            created,
            lease: self.lease(node, annotations),
        })
    }

    fn lease(&self, node: &Node, annotations: &BTreeMap<String, String>) -> Result<Lease, String> {
        let spec = node.spec.as_ref();
        let pod_cidrs = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]);
        let pod_cidr = spec.and_then(|s| s.pod_cidr.as_deref());
        let names = &self.names;
        let mut lease = node_to_lease(
            names,
            annotations,
            pod_cidr,
            pod_cidrs,
            self.enable_ipv4,
            self.enable_ipv6,
        )
        .map_err(|e| e.to_string())?;
        lease.node = node.metadata.name.clone();
        if self.enable_ipv4 {
            optional_ipv4(annotations, &names.public_ip_overwrite).map_err(|e| e.to_string())?;
        }
        if self.enable_ipv6 {
            optional_ipv6(annotations, &names.public_ipv6_overwrite).map_err(|e| e.to_string())?;
        }
        if lease.attrs.backend_type == "vxlan" {
            if self.enable_ipv4 {
                check_vxlan(&names.backend_data, lease.attrs.vxlan_data())?;
            }
            if self.enable_ipv6 {
                check_vxlan(&names.backend_v6_data, lease.attrs.vxlan_v6_data())?;
            }
        }
        if let Some(s) = lease.subnet {
            if !self.network.is_some_and(|n| n.contains(&s)) {
                return Err(outside(&s.to_string(), self.network.map(|n| n.to_string())));
            }
        }
        if let Some(s) = lease.ipv6_subnet {
            if !self.ipv6_network.is_some_and(|n| n.contains(&s)) {
                return Err(outside(
                    &s.to_string(),
                    self.ipv6_network.map(|n| n.to_string()),
                ));
            }
        }
        Ok(lease)
    }

    /// Replaces every node (a fresh list) and returns the complete lease set.
    fn replace_all(&mut self, nodes: &[Node]) -> Vec<Lease> {
        self.entries = nodes
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.clone().filter(|s| !s.is_empty())?;
                Some((name, self.entry(n)?))
            })
            .collect();
        self.recompute();
        self.leases()
    }

    /// A node was added or changed; true when its entry changed (not on status heartbeats or
    /// unrelated labels). The accepted leases change only at the next [`NodeSet::recompute`].
    fn upsert(&mut self, node: &Node) -> bool {
        let Some(name) = node.metadata.name.clone().filter(|s| !s.is_empty()) else {
            return false;
        };
        match self.entry(node) {
            Some(entry) if self.entries.get(&name) == Some(&entry) => false,
            Some(entry) => {
                self.entries.insert(name, entry);
                true
            }
            None => self.entries.remove(&name).is_some(),
        }
    }

    /// A node was deleted; true when it was a managed node.
    fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }

    /// The accepted leases, in node-name order (own lease included).
    fn leases(&self) -> Vec<Lease> {
        self.accepted.values().cloned().collect()
    }

    /// Derives the accepted leases from the entries; true when they differ from before. It
    /// reports no added/removed leases: the consumer's `LeaseWatcher` is the one lease diff.
    /// Overlaps go to nodes already accepted, then to older nodes.
    fn recompute(&mut self) -> bool {
        let mut order: Vec<(&String, &Entry)> = self.entries.iter().collect();
        order.sort_by(|(an, ae), (bn, be)| {
            let a_in = self.accepted.contains_key(*an);
            let b_in = self.accepted.contains_key(*bn);
            b_in.cmp(&a_in)
                .then_with(|| ae.created.cmp(&be.created))
                .then_with(|| an.cmp(bn))
        });
        let mut taken: BTreeMap<IpAddr, (IpNet, &String)> = BTreeMap::new();
        let mut accepted = BTreeMap::new();
        let mut problems = BTreeMap::new();
        for (name, entry) in order {
            let lease = match &entry.lease {
                Ok(l) => l,
                Err(reason) => {
                    problems.insert(name.clone(), reason.clone());
                    continue;
                }
            };
            let nets: Vec<IpNet> = lease
                .subnet
                .map(IpNet::V4)
                .into_iter()
                .chain(lease.ipv6_subnet.map(IpNet::V6))
                .collect();
            if let Some((net, other)) = nets.iter().find_map(|n| overlap(&taken, n)) {
                problems.insert(
                    name.clone(),
                    format!("pod CIDR {net} overlaps node {other}'s pod CIDR"),
                );
                continue;
            }
            for n in nets {
                taken.insert(n.network(), (n, name));
            }
            accepted.insert(name.clone(), lease.clone());
        }
        for (name, reason) in &problems {
            if self.problems.get(name) != Some(reason) {
                self.new_problems.push((name.clone(), reason.clone()));
            }
        }
        self.problems = problems;
        let changed = self.accepted != accepted;
        self.accepted = accepted;
        changed
    }

    fn take_new_problems(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.new_problems)
    }
}

/// The accepted subnet (and its node) that overlaps `net`, if any. `taken` holds disjoint
/// subnets keyed by network address.
fn overlap(taken: &BTreeMap<IpAddr, (IpNet, &String)>, net: &IpNet) -> Option<(IpNet, String)> {
    let below = taken
        .range(..=net.network())
        .next_back()
        .filter(|(_, (t, _))| t.contains(&net.network()));
    let inside = taken
        .range(net.network()..=net.broadcast())
        .next()
        .filter(|(_, (t, _))| net.contains(&t.network()));
    below.or(inside).map(|(_, (t, name))| (*t, (*name).clone()))
}

fn check_vxlan(
    annotation: &str,
    data: Result<Option<VxlanBackendData>, super::AttrsError>,
) -> Result<(), String> {
    match data {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!("annotation {annotation} has no vxlan backend data")),
        Err(e) => Err(format!("annotation {annotation}: {e}")),
    }
}

fn outside(cidr: &str, network: Option<String>) -> String {
    match network {
        Some(n) => format!("pod CIDR {cidr} is outside the network {n}"),
        None => format!("pod CIDR {cidr} but the network config has no network of its family"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const P: &str = "flannel.alpha.coreos.com/";

    fn names() -> AnnotationNames {
        AnnotationNames::new("flannel.alpha.coreos.com").expect("names")
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{P}{k}"), (*v).to_owned()))
            .collect()
    }

    fn vxlan_attrs(ip: [u8; 4], mac: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::from(ip),
            backend_type: "vxlan".into(),
            backend_data: Some(
                VxlanBackendData {
                    vni: 1,
                    vtep_mac: mac.parse().expect("mac"),
                }
                .to_raw(),
            ),
            ..LeaseAttrs::default()
        }
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn connect_future_is_send() {
        let flags = Flags::default();
        let env = |_: &str| None;
        // Built, never polled: only the type is checked.
        let fut = KubeStore::connect(&flags, &env);
        assert_send(&fut);
    }

    #[test]
    fn plan_matches_upstream_fields() {
        let attrs = vxlan_attrs([198, 51, 100, 1], "0e:00:00:00:00:01");
        let plan = plan_annotations(&names(), &BTreeMap::new(), &attrs).expect("plan");
        assert_eq!(
            plan.changes,
            map(&[
                ("backend-type", "vxlan"),
                ("backend-data", r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}"#),
                ("public-ip", "198.51.100.1"),
                ("kube-subnet-manager", "true"),
            ])
        );
        // Applying the plan leaves nothing to change.
        let done = plan_annotations(&names(), &plan.changes, &attrs).expect("plan");
        assert!(done.changes.is_empty());
        // host-gw publishes backend-data "null".
        let hostgw = LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 51, 100, 2),
            backend_type: "host-gw".into(),
            ..LeaseAttrs::default()
        };
        let plan = plan_annotations(&names(), &BTreeMap::new(), &hostgw).expect("plan");
        assert_eq!(
            plan.changes
                .get(&format!("{P}backend-data"))
                .map(String::as_str),
            Some("null")
        );
    }

    #[test]
    fn plan_overwrite_and_ipv6() {
        let attrs = vxlan_attrs([10, 0, 0, 7], "0e:00:00:00:00:07");
        let current = map(&[
            ("public-ip-overwrite", "203.0.113.7"),
            ("public-ip", "10.0.0.7"),
        ]);
        let plan = plan_annotations(&names(), &current, &attrs).expect("plan");
        assert_eq!(
            plan.changes
                .get(&format!("{P}public-ip"))
                .map(String::as_str),
            Some("203.0.113.7")
        );
        assert_eq!(
            plan.overrides,
            vec![("203.0.113.7".to_owned(), format!("{P}public-ip-overwrite"))]
        );
        let bad = map(&[("public-ip-overwrite", "203.0.113.x")]);
        let e = plan_annotations(&names(), &bad, &attrs).expect_err("invalid overwrite");
        assert!(e.to_string().contains("public-ip-overwrite"), "{e}");

        // IPv6-only vxlan: no IPv4 fields.
        let v6 = LeaseAttrs {
            public_ipv6: Some("fd42::7".parse().expect("v6")),
            backend_type: "vxlan".into(),
            backend_v6_data: Some(
                VxlanBackendData {
                    vni: 1,
                    vtep_mac: "0e:00:00:00:00:17".parse().expect("mac"),
                }
                .to_raw(),
            ),
            ..LeaseAttrs::default()
        };
        let plan = plan_annotations(&names(), &BTreeMap::new(), &v6).expect("plan");
        assert_eq!(
            plan.changes,
            map(&[
                ("backend-type", "vxlan"),
                (
                    "backend-v6-data",
                    r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:17"}"#
                ),
                ("public-ipv6", "fd42::7"),
                ("kube-subnet-manager", "true"),
            ])
        );
    }

    #[test]
    fn own_cidr_classification() {
        let two = ["fd42:1::/64".to_owned(), "10.244.1.0/24".to_owned()];
        let (v4, v6) = own_pod_cidrs(Some("fd42:1::/64"), Some(&two)).expect("ok");
        assert_eq!(v4.map(|n| n.to_string()).as_deref(), Some("10.244.1.0/24"));
        assert_eq!(v6.map(|n| n.to_string()).as_deref(), Some("fd42:1::/64"));
        let (v4, v6) = own_pod_cidrs(Some("10.244.1.5/24"), None).expect("ok");
        assert_eq!(v4.map(|n| n.to_string()).as_deref(), Some("10.244.1.0/24"));
        assert_eq!(v6, None);
        let three = vec!["10.0.0.0/24".to_owned(); 3];
        assert_eq!(
            own_pod_cidrs(None, Some(&three)),
            Err(AnnotationError::TooManyPodCidrs)
        );
        assert!(own_pod_cidrs(Some("nope"), None).is_err());
    }

    fn node(name: &str, created: &str, cidr: &str, ip: &str, mac: &str) -> Node {
        let mut annotations = map(&[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("public-ip", ip),
        ]);
        annotations.insert(
            format!("{P}backend-data"),
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
        );
        let ts: k8s_openapi::jiff::Timestamp = created.parse().expect("time");
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations),
                creation_timestamp: Some(Time(ts)),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                pod_cidr: Some(cidr.into()),
                pod_cidrs: Some(vec![cidr.into()]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn config() -> NetConfig {
        NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .expect("config")
    }

    /// Public IPs and VTEP MACs of the accepted leases, in node-name order.
    fn accepted(set: &NodeSet) -> Vec<String> {
        set.leases()
            .iter()
            .map(|l| {
                let mac = l.attrs.vxlan_data().ok().flatten().map(|d| d.vtep_mac);
                format!(
                    "{} {}",
                    l.attrs.public_ip,
                    mac.map(|m| m.to_string()).unwrap_or_default()
                )
            })
            .collect()
    }

    #[test]
    fn node_set_overlaps_and_handover() {
        let mut set = NodeSet::new(names(), &config());
        let a = node(
            "a",
            "2024-01-01T00:00:00Z",
            "10.244.1.0/24",
            "198.51.100.1",
            "0e:00:00:00:00:01",
        );
        let b = node(
            "b",
            "2024-01-02T00:00:00Z",
            "10.244.1.0/25",
            "198.51.100.2",
            "0e:00:00:00:00:02",
        );
        let c = node(
            "c",
            "2024-01-03T00:00:00Z",
            "10.244.0.0/16",
            "198.51.100.3",
            "0e:00:00:00:00:03",
        );
        let d = node(
            "d",
            "2024-01-04T00:00:00Z",
            "10.244.2.0/24",
            "198.51.100.4",
            "0e:00:00:00:00:04",
        );
        let leases = set.replace_all(&[d.clone(), c.clone(), b.clone(), a.clone()]);
        let ips: Vec<String> = leases
            .iter()
            .map(|l| l.attrs.public_ip.to_string())
            .collect();
        assert_eq!(ips, ["198.51.100.1", "198.51.100.4"]);
        let problems: Vec<String> = set
            .take_new_problems()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(problems, ["b", "c"]);
        assert!(
            set.problems["b"].contains("overlaps node a"),
            "{:?}",
            set.problems
        );
        // Known problems are not reported again.
        assert!(!set.upsert(&b));
        assert!(!set.recompute());
        assert!(set.take_new_problems().is_empty());
        // Deleting a hands its range over to b.
        assert!(set.remove("a"));
        assert!(!set.remove("a"));
        assert!(set.recompute());
        assert_eq!(
            accepted(&set),
            [
                "198.51.100.2 0e:00:00:00:00:02",
                "198.51.100.4 0e:00:00:00:00:04"
            ]
        );
        // The incumbent keeps its lease even though a newer relist would order it later.
        let a_again = node(
            "a",
            "2024-01-01T00:00:00Z",
            "10.244.1.0/24",
            "198.51.100.1",
            "0e:00:00:00:00:01",
        );
        assert!(set.upsert(&a_again));
        assert!(!set.recompute());
        assert!(set.problems["a"].contains("overlaps node b"));
    }

    #[test]
    fn node_set_changes_and_invalid() {
        let mut set = NodeSet::new(names(), &config());
        let a = node(
            "a",
            "2024-01-01T00:00:00Z",
            "10.244.1.0/24",
            "198.51.100.1",
            "0e:00:00:00:00:01",
        );
        assert_eq!(set.replace_all(std::slice::from_ref(&a)).len(), 1);
        // Unrelated changes (labels, status) change nothing.
        let mut relabeled = a.clone();
        relabeled.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
        assert!(!set.upsert(&relabeled));
        // A new MAC is an update.
        let moved = node(
            "a",
            "2024-01-01T00:00:00Z",
            "10.244.1.0/24",
            "198.51.100.1",
            "0e:00:00:00:00:09",
        );
        assert!(set.upsert(&moved));
        assert!(set.recompute());
        assert_eq!(accepted(&set), ["198.51.100.1 0e:00:00:00:00:09"]);
        // Broken backend data: the node is dropped and reported once.
        let mut broken = moved.clone();
        if let Some(m) = broken.metadata.annotations.as_mut() {
            m.insert(format!("{P}backend-data"), "{\"VNI\":1".into());
        }
        assert!(set.upsert(&broken));
        assert!(set.recompute());
        assert!(accepted(&set).is_empty());
        let problems = set.take_new_problems();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].1.contains("backend-data"), "{problems:?}");
        // Outside Network.
        let far = node(
            "f",
            "2024-01-01T00:00:00Z",
            "10.9.1.0/24",
            "198.51.100.5",
            "0e:00:00:00:00:05",
        );
        assert!(set.upsert(&far));
        assert!(!set.recompute());
        assert!(set.problems["f"].contains("outside the network 10.244.0.0/16"));
        // Unmanaged nodes are ignored silently.
        let mut unmanaged = node(
            "u",
            "2024-01-01T00:00:00Z",
            "10.244.7.0/24",
            "198.51.100.7",
            "0e:00:00:00:00:07",
        );
        if let Some(m) = unmanaged.metadata.annotations.as_mut() {
            m.remove(&format!("{P}kube-subnet-manager"));
        }
        assert!(!set.upsert(&unmanaged));
        assert!(!set.problems.contains_key("u"));
    }

    /// 5,000 Nodes through this store's `NodeSet` and the daemon's `LeaseWatcher`: the list,
    /// then churn steps of 50 deletions or 50 additions, each settled once (one recompute, one
    /// snapshot, one watcher diff), and for comparison one step settled per event. Prints the
    /// times (`cargo test --release -p flannel-rs --lib node_set_scale -- --nocapture`); asserts
    /// only the results, so it runs in every test run.
    #[test]
    fn node_set_scale_5000() {
        use std::time::Instant;
        const N: usize = 5000;
        const STEP: usize = 50;
        let make = |i: usize| {
            let cidr = format!("10.244.{}.{}/29", i / 32, (i % 32) * 8);
            let ip = format!("198.18.{}.{}", i / 256, i % 256);
            let mac = format!("0e:00:00:00:{:02x}:{:02x}", i / 256, i % 256);
            node(
                &format!("n{i:05}"),
                "2024-01-01T00:00:00Z",
                &cidr,
                &ip,
                &mac,
            )
        };
        let nodes: Vec<Node> = (0..N).map(make).collect();
        let mut set = NodeSet::new(names(), &config());
        let mut watcher = super::super::LeaseWatcher::new(None, None);
        let t = Instant::now();
        let added = watcher.apply_snapshot(set.replace_all(&nodes)).len();
        println!("list of {N}: {:?}", t.elapsed());
        assert_eq!(added, N);
        let mut next_new = N;
        for step in 0..6 {
            let t = Instant::now();
            if step % 2 == 0 {
                for i in (step / 2 * STEP)..((step / 2 + 1) * STEP) {
                    assert!(set.remove(&format!("n{i:05}")));
                }
            } else {
                for i in next_new..next_new + STEP {
                    assert!(set.upsert(&make(i)));
                }
                next_new += STEP;
            }
            assert!(set.recompute());
            let events = watcher.apply_snapshot(set.leases());
            println!("churn step of {STEP}, settled once: {:?}", t.elapsed());
            assert_eq!(events.len(), STEP);
            assert_eq!(watcher.len(), if step % 2 == 0 { N - STEP } else { N });
        }
        let (t, mut derive) = (Instant::now(), std::time::Duration::ZERO);
        for i in next_new..next_new + STEP {
            let d = Instant::now();
            assert!(set.upsert(&make(i)));
            assert!(set.recompute());
            derive += d.elapsed();
            assert_eq!(watcher.apply_snapshot(set.leases()).len(), 1);
        }
        println!(
            "churn step of {STEP}, settled per event: {:?} (deriving the leases: {derive:?})",
            t.elapsed()
        );
        // Status-only updates of every node: no entry changes, nothing to settle.
        let t = Instant::now();
        assert!(!(0..N).any(|i| set.upsert(&make(i + STEP * 3))));
        println!("{N} unchanged node updates: {:?}", t.elapsed());
    }
}
