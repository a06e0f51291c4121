//! Control-plane scale with real daemons (`netns-harness scale`).
//!
//! * [`peer_scale`]: one flanneld (either data plane) on the Kubernetes store whose API server
//!   holds thousands of other Nodes with flannel leases (fake peers: nothing answers at their
//!   public IPs, which lie in 198.19.0.0/16, leases /29s of 10.244.0.0/16, all inside the run's namespaces). Measures the time
//!   from start to every peer programmed in the data plane (userspace: the peer table,
//!   `flannel_userspace_peer_table_entries`; kernel: routes on `flannel.<VNI>`), the daemon's
//!   CPU and memory, then churns a share of the Nodes every interval (deletes, then adds,
//!   alternately) and measures how long each change takes to be programmed, and whether the
//!   daemon had to re-list (it must ride the watch).
//! * [`cluster_scale`]: `up` with many nodes of mixed kinds, then a sampled connectivity
//!   matrix until it passes: time to converge and memory per daemon.

use std::collections::VecDeque;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::check::ProbeKind;
use crate::cluster::{Cluster, ClusterSpec, NodeKind};
use crate::store::{annotation, StoreKind};
use crate::{cmd, http, sys};

/// Where flanneld serves `/metrics` in scale runs (loopback of the node's namespace).
const METRICS_PORT: u16 = 9109;
/// The net-conf of peer-scale runs: the harness's 10.244.0.0/16 cut into /29 leases, room for
/// 8,191 of them.
const WIDE_NET_CONF: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":29,"Backend":{"Type":"vxlan","VNI":1}}"#;
/// Leases below this index are left to the run's own nodes.
const FIRST_PEER_LEASE: usize = 16;
/// Most fake peers a run can hold (adds during churn included).
pub const MAX_PEERS: usize = 8191 - FIRST_PEER_LEASE;
/// Polling period while waiting for the data plane.
const POLL: Duration = Duration::from_millis(50);
/// Parallel connections used to load Nodes into the API server.
const LOADERS: usize = 4;

/// CPU time and memory of one process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcUsage {
    /// User + system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Resident set size now (KiB).
    pub rss_kib: u64,
    /// Peak resident set size (KiB).
    pub hwm_kib: u64,
}

impl ProcUsage {
    /// Reads the usage of `pid` (None when it is gone).
    pub fn of(pid: u32) -> Option<ProcUsage> {
        let ticks = cmd::cpu_ticks(pid)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Some(ProcUsage {
            cpu_secs: ticks as f64 / sys::clock_ticks_per_sec() as f64,
            rss_kib: kib("VmRSS:"),
            hwm_kib: kib("VmHWM:"),
        })
    }
}

/// Options of [`peer_scale`].
#[derive(Debug, Clone)]
pub struct PeerScaleOpts {
    /// The data plane under test (`Userspace` or `Kernel`).
    pub kind: NodeKind,
    /// Other Nodes (peers) in the API server.
    pub peers: usize,
    /// Share of the peers changed per churn step, in percent.
    pub churn_percent: f64,
    /// Time between churn steps.
    pub churn_every: Duration,
    /// How long churn goes on (0: no churn).
    pub churn_for: Duration,
    /// How long the daemon may take to program every peer.
    pub converge_limit: Duration,
    /// flanneld binary (None: next to this executable).
    pub flanneld: Option<PathBuf>,
    /// test-apiserver binary (None: next to this executable).
    pub apiserver: Option<PathBuf>,
    /// Run directory base.
    pub base_dir: PathBuf,
}

/// One churn step: how many Nodes were added (+) or deleted (-) and how long the data plane
/// took to show it (None: not within the step's interval).
#[derive(Debug, Clone, Serialize)]
pub struct ChurnStep {
    /// Nodes added (positive) or deleted (negative).
    pub change: i64,
    /// Peers the data plane held when the step was judged.
    pub programmed: usize,
    /// Time the API server took to answer the step's requests (one per Node, in sequence).
    pub api_ms: f64,
    /// Time from the first API request of the step to the data plane matching it.
    pub latency_ms: Option<f64>,
}

/// What [`peer_scale`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct PeerScaleReport {
    /// `userspace` or `kernel`.
    pub dataplane: String,
    /// Peers in the API server at start.
    pub peers: usize,
    /// Seconds spent loading the Nodes into the API server (not part of the daemon's time).
    pub load_secs: f64,
    /// Seconds from flanneld's start to every peer programmed.
    pub programmed_secs: f64,
    /// The daemon's usage when every peer was programmed.
    pub at_programmed: ProcUsage,
    /// The churn steps.
    pub churn: Vec<ChurnStep>,
    /// CPU seconds the daemon used during churn.
    pub churn_cpu_secs: f64,
    /// The daemon's usage after churn.
    pub after_churn: ProcUsage,
    /// "re-listing" lines the daemon logged during churn (0: the watch carried every change).
    pub relists_during_churn: usize,
}

impl PeerScaleReport {
    /// Latencies of the churn steps that converged, sorted (ms).
    fn churn_latencies(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.churn.iter().filter_map(|s| s.latency_ms).collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

impl fmt::Display for PeerScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} data plane, {} peers (loaded into the API server in {:.1} s)",
            self.dataplane, self.peers, self.load_secs
        )?;
        writeln!(
            f,
            "  start -> all peers programmed: {:.2} s, CPU {:.2} s, RSS {} MiB (peak {} MiB)",
            self.programmed_secs,
            self.at_programmed.cpu_secs,
            self.at_programmed.rss_kib / 1024,
            self.at_programmed.hwm_kib / 1024
        )?;
        if self.churn.is_empty() {
            return Ok(());
        }
        let lat = self.churn_latencies();
        let missed = self.churn.len() - lat.len();
        let (min, med, max) = match (lat.first(), lat.get(lat.len() / 2), lat.last()) {
            (Some(a), Some(b), Some(c)) => (*a, *b, *c),
            _ => (f64::NAN, f64::NAN, f64::NAN),
        };
        writeln!(
            f,
            "  churn: {} steps of {} Nodes, programmed after min {:.0} / median {:.0} / max {:.0} ms{}",
            self.churn.len(),
            self.churn.first().map(|s| s.change.abs()).unwrap_or(0),
            min,
            med,
            max,
            if missed > 0 {
                format!(", {missed} step(s) NOT programmed within the interval")
            } else {
                String::new()
            }
        )?;
        let mut api: Vec<f64> = self.churn.iter().map(|s| s.api_ms).collect();
        api.sort_by(f64::total_cmp);
        writeln!(
            f,
            "  (of which the API server answering the step's requests: median {:.0} ms)",
            api.get(api.len() / 2).copied().unwrap_or(f64::NAN)
        )?;
        writeln!(
            f,
            "  churn CPU {:.2} s, RSS after {} MiB, re-lists during churn: {}",
            self.churn_cpu_secs,
            self.after_churn.rss_kib / 1024,
            self.relists_during_churn
        )
    }
}

/// The name, pod CIDR, public IP and VTEP MAC of fake peer `i`.
fn fake_peer(i: usize) -> (String, String, Ipv4Addr, String) {
    let base = (FIRST_PEER_LEASE + i) * 8;
    let cidr = format!("10.244.{}.{}/29", base >> 8, base & 0xff);
    let ip = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8);
    let mac = format!(
        "0e:5c:{:02x}:{:02x}:{:02x}:01",
        i >> 16,
        (i >> 8) & 0xff,
        i & 0xff
    );
    (format!("peer-{i:05}"), cidr, ip, mac)
}

/// A Node holding flannel's lease annotations, as a flanneld on that node would leave it.
fn fake_peer_node(i: usize) -> serde_json::Value {
    let (name, cidr, ip, mac) = fake_peer(i);
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                annotation("backend-type"): "vxlan",
                annotation("backend-data"): json!({"VNI": 1, "VtepMAC": mac}).to_string(),
                annotation("public-ip"): ip.to_string(),
                annotation("kube-subnet-manager"): "true",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]},
    })
}

fn create_peers(c: &Cluster, ids: &[usize]) -> Result<()> {
    let chunks: Vec<&[usize]> = ids.chunks(ids.len().div_ceil(LOADERS).max(1)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || -> Result<()> {
                    for &i in *chunk {
                        sys::check_interrupted()?;
                        let body = fake_peer_node(i).to_string();
                        let r = c.store_request(
                            "POST",
                            "/api/v1/nodes",
                            Some("application/json"),
                            body.as_bytes(),
                        )?;
                        if !r.ok() {
                            bail!("create {}: HTTP {}: {}", fake_peer(i).0, r.status, r.text());
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow!("loader panicked"))?)
    })
}

fn delete_peers(c: &Cluster, ids: &[usize]) -> Result<()> {
    for &i in ids {
        let name = fake_peer(i).0;
        let r = c.store_request("DELETE", &format!("/api/v1/nodes/{name}"), None, b"")?;
        if !r.ok() {
            bail!("delete {name}: HTTP {}: {}", r.status, r.text());
        }
    }
    Ok(())
}

/// Peers the node's data plane holds now.
fn programmed(c: &Cluster, node: &str, kind: NodeKind) -> Result<usize> {
    let ns = c.resolve_ns(node)?;
    match kind {
        NodeKind::Userspace => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
            let r = http::request(&ns, addr, "GET", "/metrics", None, b"", cmd::SHORT)?;
            let text = r.text();
            text.lines()
                .find_map(|l| l.strip_prefix("flannel_userspace_peer_table_entries "))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow!("no flannel_userspace_peer_table_entries in /metrics"))
        }
        NodeKind::Kernel => {
            let out = cmd::run(
                &mut cmd::ns_command(&ns, &["ip", "-4", "route", "show", "dev", "flannel.1"]),
                cmd::SHORT,
            )?;
            if !out.status.success() {
                // The device appears a moment after start.
                return Ok(0);
            }
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("10.244."))
                .count())
        }
        NodeKind::KernelRef => bail!("kernel-ref nodes run no flanneld"),
    }
}

/// Polls until the data plane holds `want` peers or `limit` passes; the time it took.
fn wait_programmed(
    c: &Cluster,
    node: &str,
    kind: NodeKind,
    want: usize,
    since: Instant,
    limit: Duration,
) -> Result<(Option<Duration>, usize)> {
    let mut last = 0;
    while since.elapsed() < limit {
        sys::check_interrupted()?;
        // The daemon may still be starting its metrics listener.
        if let Ok(n) = programmed(c, node, kind) {
            last = n;
            if n == want {
                return Ok((Some(since.elapsed()), n));
            }
        }
        std::thread::sleep(POLL);
    }
    Ok((None, last))
}

fn count_relists(c: &Cluster, node: &str) -> usize {
    std::fs::read_to_string(c.flanneld_log(node))
        .map(|t| t.matches("re-listing").count())
        .unwrap_or(0)
}

/// One flanneld against an API server holding `opts.peers` other Nodes; see the module doc.
pub fn peer_scale(opts: &PeerScaleOpts) -> Result<PeerScaleReport> {
    if !matches!(opts.kind, NodeKind::Userspace | NodeKind::Kernel) {
        bail!("peer scale measures a flanneld data plane: userspace or kernel");
    }
    let per_step = ((opts.peers as f64 * opts.churn_percent / 100.0).round() as usize).max(1);
    let steps = if opts.churn_every.is_zero() {
        0
    } else {
        (opts.churn_for.as_secs_f64() / opts.churn_every.as_secs_f64()).floor() as usize
    };
    if opts.peers == 0 || opts.peers + steps.div_ceil(2) * per_step > MAX_PEERS {
        bail!("--peers plus the Nodes churn adds must be 1..={MAX_PEERS} (/29 leases in 10.244.0.0/16)");
    }
    let mut spec = ClusterSpec::new(&[opts.kind], 0);
    spec.store = StoreKind::Kube;
    spec.net_conf = Some(WIDE_NET_CONF.to_string());
    spec.flanneld = opts.flanneld.clone();
    spec.apiserver_bin = opts.apiserver.clone();
    spec.base_dir = opts.base_dir.clone();
    spec.responders = false;
    spec.flanneld_args = vec![format!("--metrics-port={METRICS_PORT}")];
    let mut c = Cluster::up(&spec)?;
    let node = "n1";
    c.stop_flanneld(node)?;

    let loaded = Instant::now();
    let ids: Vec<usize> = (0..opts.peers).collect();
    create_peers(&c, &ids)?;
    let load_secs = loaded.elapsed().as_secs_f64();
    crate::cluster::log(format!("{} peers loaded in {load_secs:.1} s", opts.peers));

    let started = Instant::now();
    c.start_flanneld(node)?;
    let pid = c
        .node(node)
        .and_then(|n| n.flanneld.as_ref())
        .map(|r| r.pid)
        .ok_or_else(|| anyhow!("flanneld on {node} did not start"))?;
    let (took, held) = wait_programmed(
        &c,
        node,
        opts.kind,
        opts.peers,
        started,
        opts.converge_limit,
    )?;
    let Some(took) = took else {
        bail!(
            "{} of {} peers programmed after {:?}; last log lines:\n{}",
            held,
            opts.peers,
            opts.converge_limit,
            cmd::tail(&c.flanneld_log(node), 20)
        );
    };
    let at_programmed = ProcUsage::of(pid).context("flanneld exited")?;

    let relists_before = count_relists(&c, node);
    let mut live: VecDeque<usize> = ids.into_iter().collect();
    let mut next_id = opts.peers;
    let mut churn = Vec::with_capacity(steps);
    for step in 0..steps {
        let t = Instant::now();
        let (change, want) = if step % 2 == 0 {
            let gone: Vec<usize> = live.drain(..per_step.min(live.len())).collect();
            delete_peers(&c, &gone)?;
            (-(gone.len() as i64), live.len())
        } else {
            let added: Vec<usize> = (next_id..next_id + per_step).collect();
            next_id += per_step;
            create_peers(&c, &added)?;
            live.extend(added.iter().copied());
            (added.len() as i64, live.len())
        };
        let api_ms = t.elapsed().as_secs_f64() * 1e3;
        let (latency, held) = wait_programmed(&c, node, opts.kind, want, t, opts.churn_every)?;
        churn.push(ChurnStep {
            change,
            programmed: held,
            api_ms,
            latency_ms: latency.map(|d| d.as_secs_f64() * 1e3),
        });
        if let Some(rest) = opts.churn_every.checked_sub(t.elapsed()) {
            sys::sleep_interruptible(rest)?;
        }
    }
    let after_churn = ProcUsage::of(pid).context("flanneld exited during churn")?;
    let report = PeerScaleReport {
        dataplane: opts.kind.as_str().to_string(),
        peers: opts.peers,
        load_secs,
        programmed_secs: took.as_secs_f64(),
        at_programmed,
        churn_cpu_secs: after_churn.cpu_secs - at_programmed.cpu_secs,
        after_churn,
        churn,
        relists_during_churn: count_relists(&c, node).saturating_sub(relists_before),
    };
    c.teardown()?;
    Ok(report)
}

/// Options of [`cluster_scale`].
#[derive(Debug, Clone)]
pub struct ClusterScaleOpts {
    /// Node kinds, cycled over `nodes`.
    pub kinds: Vec<NodeKind>,
    /// Number of nodes.
    pub nodes: usize,
    /// Lease store.
    pub store: StoreKind,
    /// How long the sampled matrix may take to pass after `up`.
    pub converge_limit: Duration,
    /// flanneld binary (None: next to this executable).
    pub flanneld: Option<PathBuf>,
    /// Run directory base.
    pub base_dir: PathBuf,
}

/// Memory of one daemon.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonUsage {
    /// Node name.
    pub node: String,
    /// Node kind.
    pub kind: String,
    /// Its usage after convergence.
    pub usage: ProcUsage,
}

/// What [`cluster_scale`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterScaleReport {
    /// Nodes per kind, e.g. "10 userspace, 10 kernel, 10 kernel-ref".
    pub nodes: String,
    /// Lease store.
    pub store: String,
    /// Seconds `up` took (namespaces, daemons ready, kernel-ref nodes programmed).
    pub up_secs: f64,
    /// Seconds from the end of `up` to the sampled matrix passing.
    pub converge_secs: f64,
    /// Pod pairs probed (ICMP and TCP each).
    pub pairs: usize,
    /// Matrix rounds until it passed.
    pub rounds: usize,
    /// flanneld usage per node.
    pub daemons: Vec<DaemonUsage>,
}

impl fmt::Display for ClusterScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} nodes ({} store)", self.nodes, self.store)?;
        writeln!(
            f,
            "  up {:.1} s, then the sampled matrix ({} pod pairs, ICMP+TCP) passed after {:.1} s ({} round(s))",
            self.up_secs, self.pairs, self.converge_secs, self.rounds
        )?;
        let mut rss: Vec<u64> = self.daemons.iter().map(|d| d.usage.rss_kib).collect();
        rss.sort_unstable();
        if let (Some(min), Some(med), Some(max)) = (rss.first(), rss.get(rss.len() / 2), rss.last())
        {
            writeln!(
                f,
                "  flanneld RSS over {} daemons: min {:.1} / median {:.1} / max {:.1} MiB",
                rss.len(),
                *min as f64 / 1024.0,
                *med as f64 / 1024.0,
                *max as f64 / 1024.0
            )?;
        }
        Ok(())
    }
}

/// Strides of the sampled matrix: every pod reaches the pods of the nodes 1, 2, 3 and 15
/// positions on (modulo the node count, duplicates dropped). Every node is a source and a
/// destination, and with up to three kinds cycled over the nodes every ordered pair of kinds,
/// same kind included, is sampled.
const STRIDES: [usize; 4] = [1, 2, 3, 15];

/// `up` with `opts.nodes` nodes, then the sampled matrix until it passes; see the module doc.
pub fn cluster_scale(opts: &ClusterScaleOpts) -> Result<ClusterScaleReport> {
    if opts.kinds.is_empty() || opts.nodes < 2 {
        bail!("cluster scale needs at least two nodes and one kind");
    }
    let kinds: Vec<NodeKind> = (0..opts.nodes)
        .map(|i| opts.kinds[i % opts.kinds.len()])
        .collect();
    let mut spec = ClusterSpec::new(&kinds, 1);
    spec.store = opts.store;
    spec.flanneld = opts.flanneld.clone();
    spec.base_dir = opts.base_dir.clone();
    spec.ready_timeout = Duration::from_secs(60);
    let t = Instant::now();
    let mut c = Cluster::up(&spec)?;
    let up_secs = t.elapsed().as_secs_f64();
    let pods: Vec<(String, Ipv4Addr)> = c
        .pods()
        .iter()
        .map(|(_, p)| (p.name.clone(), p.ip))
        .collect();
    let mut strides: Vec<usize> = STRIDES
        .iter()
        .map(|s| s % pods.len())
        .filter(|s| *s != 0)
        .collect();
    strides.sort_unstable();
    strides.dedup();
    let mut pairs = Vec::new();
    for (i, (src, _)) in pods.iter().enumerate() {
        for s in &strides {
            let (_, dst) = &pods[(i + s) % pods.len()];
            pairs.push((src.clone(), *dst));
        }
    }
    let t = Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let failed = sampled_failures(&c, &pairs);
        if failed.is_empty() {
            break;
        }
        if t.elapsed() >= opts.converge_limit {
            bail!(
                "sampled matrix still failing after {:?}: {} of {} probes, e.g. {}",
                opts.converge_limit,
                failed.len(),
                pairs.len() * 2,
                failed
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        sys::sleep_interruptible(Duration::from_secs(1))?;
    }
    let converge_secs = t.elapsed().as_secs_f64();
    let daemons = c
        .nodes()
        .iter()
        .filter_map(|n| {
            let pid = n.flanneld.as_ref()?.pid;
            Some(DaemonUsage {
                node: n.name.clone(),
                kind: n.kind.as_str().to_string(),
                usage: ProcUsage::of(pid)?,
            })
        })
        .collect();
    let mut per_kind: Vec<(NodeKind, usize)> = Vec::new();
    for k in &kinds {
        match per_kind.iter_mut().find(|(pk, _)| pk == k) {
            Some((_, n)) => *n += 1,
            None => per_kind.push((*k, 1)),
        }
    }
    let report = ClusterScaleReport {
        nodes: per_kind
            .iter()
            .map(|(k, n)| format!("{n} {}", k.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
        store: opts.store.to_string(),
        up_secs,
        converge_secs,
        pairs: pairs.len(),
        rounds,
        daemons,
    };
    c.teardown()?;
    Ok(report)
}

/// Probes every pair (ICMP and TCP) in parallel; the failures, described.
fn sampled_failures(c: &Cluster, pairs: &[(String, Ipv4Addr)]) -> Vec<String> {
    let tasks: Vec<(&str, Ipv4Addr, ProbeKind)> = pairs
        .iter()
        .flat_map(|(s, d)| {
            [
                (s.as_str(), *d, ProbeKind::Icmp),
                (s.as_str(), *d, ProbeKind::Tcp),
            ]
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((src, dst, kind)) = tasks.get(i) else {
                    break;
                };
                let out = c.probe(src, *kind, *dst, None);
                if !out.ok {
                    if let Ok(mut f) = failed.lock() {
                        f.push(format!("{src} -> {dst} {}: {}", kind.name(), out.detail));
                    }
                }
            });
        }
    });
    failed.into_inner().unwrap_or_default()
}
