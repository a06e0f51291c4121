//! Building, inspecting and tearing down one run: the underlay namespace with its bridge, the
//! node namespaces (flanneld or kernel-ref), the pod namespaces (made by the real CNI plugins,
//! see [`crate::cni`], or wired by hand like them) and the state file later commands read.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cmd::{self, ProcRecord};
use crate::cni::{PodSetup, PortMapping};
use crate::kernel_ref::{self, KernelOp, PeerEntry};
use crate::lease::{self, LeaseAttrs, LeaseDir, NetConf, SubnetEnv, VxlanData};
use crate::net::{self, Cidr};
use crate::proto;
use crate::store::{self, ControlPlane, StoreKind};
use crate::sys;

/// Where run directories live unless the spec says otherwise.
pub const DEFAULT_BASE_DIR: &str = "/tmp/netns-harness";
/// Most nodes a run can hold (underlay addresses 198.18.0.1 ..= 198.18.0.250).
pub const MAX_NODES: usize = 250;
/// Most nodes of a two-site run (public addresses 203.0.113.1 ..= 203.0.113.200).
pub const MAX_SITE_NODES: usize = 200;
/// The sites of a two-site run.
pub const SITES: [u8; 2] = [1, 2];
/// Most pods per node.
pub const MAX_PODS: usize = 50;

/// How a node's overlay is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeKind {
    /// Our flanneld with `--dataplane userspace`.
    Userspace,
    /// Our flanneld with `--dataplane kernel`.
    Kernel,
    /// No daemon: the harness programs the kernel exactly like upstream flannel.
    KernelRef,
}

impl NodeKind {
    /// True for kinds that run our flanneld.
    pub fn runs_flanneld(self) -> bool {
        !matches!(self, NodeKind::KernelRef)
    }

    /// The `--dataplane` value for flanneld kinds.
    pub fn dataplane(self) -> Option<&'static str> {
        match self {
            NodeKind::Userspace => Some("userspace"),
            NodeKind::Kernel => Some("kernel"),
            NodeKind::KernelRef => None,
        }
    }

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Userspace => "userspace",
            NodeKind::Kernel => "kernel",
            NodeKind::KernelRef => "kernel-ref",
        }
    }

    /// Parses a comma separated list (`userspace,kernel-ref,...`).
    pub fn parse_list(s: &str) -> Result<Vec<NodeKind>> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse())
            .collect()
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<NodeKind> {
        match s {
            "userspace" | "u" => Ok(NodeKind::Userspace),
            "kernel" | "k" => Ok(NodeKind::Kernel),
            "kernel-ref" | "ref" | "r" => Ok(NodeKind::KernelRef),
            other => bail!("unknown node kind {other:?} (userspace, kernel, kernel-ref)"),
        }
    }
}

/// One node to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Overlay provider.
    pub kind: NodeKind,
    /// Extra flanneld arguments for this node only (appended after the common ones).
    pub extra_args: Vec<String>,
}

impl From<NodeKind> for NodeSpec {
    fn from(kind: NodeKind) -> NodeSpec {
        NodeSpec {
            kind,
            extra_args: Vec::new(),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Nodes in order (`n1`, `n2`, ...).
    pub nodes: Vec<NodeSpec>,
    /// Pods per node (`n<i>p1` ...).
    pub pods_per_node: usize,
    /// net-conf JSON written to `<lease-dir>/config` (None: [`lease::DEFAULT_NET_CONF`]).
    pub net_conf: Option<String>,
    /// Pass `--ip-masq` to flanneld; kernel-ref nodes install flannel's masquerade rules.
    pub ip_masq: bool,
    /// flanneld binary (None: `$NETNS_HARNESS_FLANNELD`, else `flanneld` next to this
    /// executable or its `deps/` parent).
    pub flanneld: Option<PathBuf>,
    /// Arguments given to every flanneld (e.g. `-v 2`), before per-node ones.
    pub flanneld_args: Vec<String>,
    /// A command that wraps every flanneld launch inside the node's namespace (e.g. `setpriv`
    /// with a container's capability set); empty: flanneld runs directly.
    pub flanneld_prefix: Vec<String>,
    /// The `netns-harness` binary used for responders and probes (None:
    /// `$NETNS_HARNESS_BIN`, else next to this executable or its `deps/` parent).
    pub harness_bin: Option<PathBuf>,
    /// Start the TCP/UDP/DNS responders in every pod.
    pub responders: bool,
    /// `--link-offloads`: true (default, `on`) leaves the underlay veths with their default
    /// offloads, tx checksum offload and GSO on, as in kind: packets cross with checksums
    /// the sender's kernel left unfinished (`CHECKSUM_PARTIAL`) and as 64 KB GSO frames, which
    /// receivers must cope with. False (`off`) turns tx offload off on every node's and
    /// router's eth0, so the underlay carries finished checksums and MTU-sized frames, as a
    /// real wire does: what a capture that verifies every checksum needs.
    pub underlay_tx_offload: bool,
    /// Parent of the run directory (default [`DEFAULT_BASE_DIR`]).
    pub base_dir: PathBuf,
    /// Run prefix (None: `fr` + 6 random hex digits).
    pub prefix: Option<String>,
    /// How long a flanneld gets to write subnet.env.
    pub ready_timeout: Duration,
    /// The lease store every node uses (default: the lease directory).
    pub store: StoreKind,
    /// Empty: every node on one underlay bridge (198.18.0.0/24). Otherwise one site (1 or 2)
    /// per node: the two-site NAT topology (field problem P1), each site on its own private
    /// bridge (198.18.`s`.0/24) behind a 1:1 NAT router to the public bridge 203.0.113.0/24,
    /// where the control plane lives.
    pub sites: Vec<u8>,
    /// etcd binary for `StoreKind::Etcd` (None: `$NETNS_HARNESS_ETCD`, `/usr/bin/etcd`,
    /// `PATH`).
    pub etcd_bin: Option<PathBuf>,
    /// test-apiserver binary for `StoreKind::Kube` (None: `$NETNS_HARNESS_APISERVER`, else
    /// next to this executable or its `deps/` parent).
    pub apiserver_bin: Option<PathBuf>,
    /// How pods are made (default: the real CNI plugins).
    pub pod_setup: PodSetup,
}

impl ClusterSpec {
    /// `kinds.len()` nodes with `pods_per_node` pods each, everything else default.
    pub fn new(kinds: &[NodeKind], pods_per_node: usize) -> ClusterSpec {
        ClusterSpec {
            nodes: kinds.iter().map(|k| NodeSpec::from(*k)).collect(),
            pods_per_node,
            net_conf: None,
            ip_masq: false,
            flanneld: None,
            flanneld_args: Vec::new(),
            flanneld_prefix: Vec::new(),
            harness_bin: None,
            responders: true,
            underlay_tx_offload: true,
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
            prefix: None,
            ready_timeout: Duration::from_secs(20),
            store: StoreKind::Dir,
            sites: Vec::new(),
            etcd_bin: None,
            apiserver_bin: None,
            pod_setup: PodSetup::default(),
        }
    }
}

/// A pod as built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// Short name, e.g. `n1p2`.
    pub name: String,
    /// Namespace, e.g. `fr1a2b3c-n1p2`.
    pub ns: String,
    /// Pod address (`eth0`).
    pub ip: Ipv4Addr,
    /// The responder process, if started.
    pub serve: Option<ProcRecord>,
    /// The sandbox id the CNI plugins got (None: a hand-wired pod).
    #[serde(default)]
    pub container_id: Option<String>,
    /// hostPorts given to portmap.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

/// A node as built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Short name, e.g. `n1`.
    pub name: String,
    /// Namespace, e.g. `fr1a2b3c-n1`.
    pub ns: String,
    /// The `i` in `n<i>` and in 198.18.0.`i`.
    pub index: u32,
    /// Overlay provider.
    pub kind: NodeKind,
    /// eth0 address (the private site address in a two-site run).
    pub underlay_ip: Ipv4Addr,
    /// Site (1 or 2) in a two-site run.
    #[serde(default)]
    pub site: Option<u8>,
    /// The 1:1 NAT public address (two-site runs): peers reach the node there.
    #[serde(default)]
    pub public_ip: Option<Ipv4Addr>,
    /// Lease subnet (network form), known once the node is ready.
    pub subnet: Option<Cidr>,
    /// FLANNEL_MTU.
    pub mtu: u32,
    /// VTEP MAC (kernel-ref nodes; flanneld nodes publish theirs in the lease).
    pub vtep_mac: Option<String>,
    /// Extra flanneld args of this node.
    pub extra_args: Vec<String>,
    /// The flanneld process, while running.
    pub flanneld: Option<ProcRecord>,
    /// Peers programmed on a kernel-ref node.
    pub programmed: Vec<PeerEntry>,
    /// Pods of this node.
    pub pods: Vec<PodState>,
}

/// A running packet capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureState {
    /// Capture name (`cap1`, ...).
    pub name: String,
    /// Namespace it runs in.
    pub ns: String,
    /// Interface.
    pub iface: String,
    /// Output file.
    pub pcap: PathBuf,
    /// The capture process.
    pub proc: ProcRecord,
}

/// Everything later commands need, saved as `<rundir>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Run prefix (namespace names start with `<prefix>-`).
    pub prefix: String,
    /// Run directory.
    pub run_dir: PathBuf,
    /// net-conf JSON in effect.
    pub net_conf: String,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// flanneld binary (when resolved).
    pub flanneld: Option<PathBuf>,
    /// Common flanneld args.
    pub flanneld_args: Vec<String>,
    /// Launch wrapper of every flanneld ([`ClusterSpec::flanneld_prefix`]).
    #[serde(default)]
    pub flanneld_prefix: Vec<String>,
    /// netns-harness binary (when resolved).
    pub harness_bin: Option<PathBuf>,
    /// Responders in pods.
    pub responders: bool,
    /// Underlay veth offloads left on (`--link-offloads on`).
    pub underlay_tx_offload: bool,
    /// Pods per node for nodes added later.
    pub pods_per_node: usize,
    /// flanneld readiness limit in seconds.
    pub ready_timeout_secs: u64,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Running captures.
    pub captures: Vec<CaptureState>,
    /// Other processes to stop at teardown (iperf3 servers, ...).
    pub extra_procs: Vec<ProcRecord>,
    /// The process that owns the run and tears it down when it ends (None when detached, e.g.
    /// after the CLI `up`). `down --stale` removes runs whose owner died.
    pub owner: Option<ProcRecord>,
    /// The lease store.
    #[serde(default)]
    pub store: StoreKind,
    /// etcd or the API server (network stores only).
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Two-site NAT topology.
    #[serde(default)]
    pub sites: bool,
    /// How pods are made.
    #[serde(default)]
    pub pod_setup: PodSetup,
}

/// A live run. Dropping an owning `Cluster` tears everything down (also on panic); a cluster
/// loaded from a state file or [`detach`](Cluster::detach)ed is left running.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) state: RunState,
    pub(crate) children: HashMap<u32, Child>,
    teardown_on_drop: bool,
    torn_down: bool,
}

pub(crate) fn log(msg: impl AsRef<str>) {
    if std::env::var_os("NETNS_HARNESS_QUIET").is_none() {
        eprintln!("[netns-harness] {}", msg.as_ref());
    }
}

/// Finds a binary named `name` next to the running executable, or in the parent of a `deps/`
/// directory (where test executables live).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut cands = vec![dir.join(name)];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(p) = dir.parent() {
            cands.push(p.join(name));
        }
    }
    cands.into_iter().find(|p| p.is_file())
}

pub(crate) fn check_executable(path: &Path, what: &str, hint: &str) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow!(
            "{what} binary {} is not usable: {e}. {hint}",
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!(
            "{what} binary {} is not a regular file. {hint}",
            path.display()
        );
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{what} binary {} is not executable. {hint}", path.display());
    }
    std::fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))
}

/// Resolves the flanneld binary: explicit path, `$NETNS_HARNESS_FLANNELD`, then a sibling.
pub fn resolve_flanneld(explicit: Option<&Path>) -> Result<PathBuf> {
    let hint = "Build it with `cargo build --bin flanneld` or pass --flanneld PATH \
                (ClusterSpec::flanneld).";
    if let Some(p) = explicit {
        return check_executable(p, "flanneld", hint);
    }
    if let Some(p) = std::env::var_os("NETNS_HARNESS_FLANNELD") {
        return check_executable(Path::new(&p), "flanneld ($NETNS_HARNESS_FLANNELD)", hint);
    }
    match sibling_binary("flanneld") {
        Some(p) => check_executable(&p, "flanneld", hint),
        None => bail!(
            "flanneld binary not found next to {}. {hint}",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
}

/// Resolves the netns-harness binary (responders, probes).
pub fn resolve_harness_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let hint = "Build it with `cargo build -p netns-harness` or set NETNS_HARNESS_BIN \
                (ClusterSpec::harness_bin).";
    if let Some(p) = explicit {
        return check_executable(p, "netns-harness", hint);
    }
    if let Some(p) = std::env::var_os("NETNS_HARNESS_BIN") {
        return check_executable(Path::new(&p), "netns-harness ($NETNS_HARNESS_BIN)", hint);
    }
    match sibling_binary("netns-harness") {
        Some(p) => check_executable(&p, "netns-harness", hint),
        None => bail!("netns-harness binary not found next to the running executable. {hint}"),
    }
}

/// Lists every network namespace name (not interruptible: teardown depends on it).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = cmd::run_uninterruptible(
        std::process::Command::new("ip").args(["netns", "list"]),
        cmd::SHORT,
    )?;
    if !out.status.success() {
        bail!(
            "ip netns list: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Namespaces that belong to run `prefix`.
pub fn run_namespaces(prefix: &str) -> Result<Vec<String>> {
    let p = format!("{prefix}-");
    Ok(list_namespaces()?
        .into_iter()
        .filter(|n| n.starts_with(&p))
        .collect())
}

fn valid_prefix(p: &str) -> bool {
    (3..=12).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn new_prefix() -> Result<String> {
    let b: [u8; 3] = net::random_bytes()?;
    Ok(format!("fr{:02x}{:02x}{:02x}", b[0], b[1], b[2]))
}

/// Deletes one namespace of a run: stops whatever still runs inside it (those processes can
/// only have been started by this run), then `ip netns del`.
fn delete_namespace(ns: &str) -> Result<()> {
    let pids = cmd::run_uninterruptible(
        std::process::Command::new("ip").args(["netns", "pids", ns]),
        cmd::SHORT,
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default();
    for pid in pids
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .take(1000)
    {
        let rec = ProcRecord::new(pid, format!("process in {ns}"));
        if !cmd::stop_process(&rec, None) {
            log(format!("process {pid} in {ns} did not stop"));
        }
    }
    let out = cmd::run_uninterruptible(
        std::process::Command::new("ip").args(["netns", "del", ns]),
        cmd::SHORT,
    )?;
    if !out.status.success() {
        bail!(
            "ip netns del {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes every trace of run `prefix` under `base_dir` without a usable state file:
/// namespaces `<prefix>-*` (and processes inside them) and the run directory.
pub fn teardown_by_prefix(base_dir: &Path, prefix: &str) -> Result<()> {
    if !valid_prefix(prefix) {
        bail!("refusing to tear down {prefix:?}: not a harness run prefix");
    }
    let mut errors = Vec::new();
    // Pods first, underlay last (order only matters for tidy logs).
    let mut nss = run_namespaces(prefix)?;
    nss.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in nss {
        if let Err(e) = delete_namespace(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    let dir = base_dir.join(prefix);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("teardown of {prefix} incomplete: {}", errors.join("; "))
    }
}

/// The private address of a site's router (the nodes' default gateway).
fn site_gateway(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, site, 254)
}

/// Runs with a state file under `base_dir`, newest first: (prefix, state modification time).
pub fn list_runs(base_dir: &Path) -> Vec<(String, SystemTime)> {
    let mut runs: Vec<(String, SystemTime)> = std::fs::read_dir(base_dir)
        .into_iter()
        .flatten()
        .flatten()
        .take(10_000)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = std::fs::metadata(e.path().join("state.json")).ok()?;
            valid_prefix(&name).then(|| (name, m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        })
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.1));
    runs
}

fn file_identity(path: &Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

impl Cluster {
    /// Builds the whole run. On any error everything built so far is torn down.
    pub fn up(spec: &ClusterSpec) -> Result<Cluster> {
        if !sys::is_root() {
            bail!("netns-harness needs root (network namespaces); run it with sudo");
        }
        if spec.nodes.len() > MAX_NODES {
            bail!("at most {MAX_NODES} nodes");
        }
        if spec.pods_per_node > MAX_PODS {
            bail!("at most {MAX_PODS} pods per node");
        }
        let sites = !spec.sites.is_empty();
        if sites {
            if spec.sites.len() != spec.nodes.len() {
                bail!(
                    "sites lists {} entries for {} nodes: give one site (1 or 2) per node",
                    spec.sites.len(),
                    spec.nodes.len()
                );
            }
            if let Some(s) = spec.sites.iter().find(|s| !SITES.contains(s)) {
                bail!("site {s} does not exist: a two-site run has sites 1 and 2");
            }
            if spec.nodes.len() > MAX_SITE_NODES {
                bail!("at most {MAX_SITE_NODES} nodes in a two-site run");
            }
        }
        let store_bin = match spec.store {
            StoreKind::Dir => None,
            StoreKind::Etcd => Some(store::resolve_etcd(spec.etcd_bin.as_deref())?),
            StoreKind::Kube => Some(store::resolve_apiserver(spec.apiserver_bin.as_deref())?),
        };
        let net_conf = spec
            .net_conf
            .clone()
            .unwrap_or_else(|| lease::DEFAULT_NET_CONF.to_string());
        let conf = NetConf::parse(&net_conf)?;
        let needs_flanneld = spec.nodes.iter().any(|n| n.kind.runs_flanneld());
        let flanneld = if needs_flanneld {
            Some(resolve_flanneld(spec.flanneld.as_deref())?)
        } else {
            spec.flanneld
                .as_deref()
                .and_then(|p| resolve_flanneld(Some(p)).ok())
        };
        let harness_bin = if spec.responders {
            Some(resolve_harness_bin(spec.harness_bin.as_deref())?)
        } else {
            resolve_harness_bin(spec.harness_bin.as_deref()).ok()
        };
        if spec.nodes.iter().any(|n| n.kind == NodeKind::KernelRef) && conf.backend_type != "vxlan"
        {
            bail!(
                "kernel-ref nodes implement the vxlan backend only, net-conf says {:?}",
                conf.backend_type
            );
        }
        let prefix = match &spec.prefix {
            Some(p) if valid_prefix(p) => p.clone(),
            Some(p) => bail!("prefix {p:?} must be 3-12 lower-case letters/digits"),
            None => new_prefix()?,
        };
        if !run_namespaces(&prefix)?.is_empty() {
            bail!("namespaces with prefix {prefix}- already exist");
        }
        let run_dir = spec.base_dir.join(&prefix);
        if run_dir.exists() {
            bail!("run directory {} already exists", run_dir.display());
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("create {}", run_dir.display()))?;

        let mut cluster = Cluster {
            state: RunState {
                prefix,
                run_dir,
                net_conf,
                ip_masq: spec.ip_masq,
                flanneld,
                flanneld_args: spec.flanneld_args.clone(),
                flanneld_prefix: spec.flanneld_prefix.clone(),
                harness_bin,
                responders: spec.responders,
                underlay_tx_offload: spec.underlay_tx_offload,
                pods_per_node: spec.pods_per_node,
                ready_timeout_secs: spec.ready_timeout.as_secs().max(1),
                nodes: Vec::new(),
                captures: Vec::new(),
                extra_procs: Vec::new(),
                owner: Some(ProcRecord::new(std::process::id(), "owner")),
                store: spec.store,
                control_plane: None,
                sites,
                pod_setup: spec.pod_setup,
            },
            children: HashMap::new(),
            teardown_on_drop: true,
            torn_down: false,
        };
        // From here on, any error drops `cluster`, which tears down what exists.
        cluster.save()?;
        log(format!(
            "run {} in {}",
            cluster.state.prefix,
            cluster.state.run_dir.display()
        ));
        if spec.store == StoreKind::Dir {
            cluster.lease_dir().init(&cluster.state.net_conf)?;
        }
        cluster.create_underlay()?;
        if let Some(bin) = store_bin {
            let ip = cluster.control_plane_ip();
            cluster.setup_control_plane(bin, ip)?;
        }
        for (i, node) in spec.nodes.iter().enumerate() {
            cluster.create_node(node, spec.sites.get(i).copied())?;
            cluster.save()?;
        }
        cluster.sync_kernel_refs()?;
        for i in 0..cluster.state.nodes.len() {
            cluster.create_pods(i)?;
            cluster.save()?;
        }
        Ok(cluster)
    }

    /// Loads a run saved by another harness process. `run` is a prefix; None picks the only
    /// or newest run. The loaded cluster does not tear down on drop.
    pub fn load(base_dir: &Path, run: Option<&str>) -> Result<Cluster> {
        let prefix = match run {
            Some(p) => p.to_string(),
            None => {
                let runs = list_runs(base_dir);
                runs.first()
                    .map(|r| r.0.clone())
                    .ok_or_else(|| anyhow!("no harness run found in {}", base_dir.display()))?
            }
        };
        let path = base_dir.join(&prefix).join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read state {}", path.display()))?;
        let state: RunState =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        Ok(Cluster {
            state,
            children: HashMap::new(),
            teardown_on_drop: false,
            torn_down: false,
        })
    }

    /// Leaves the run in place when this value is dropped (the CLI `up` command).
    pub fn detach(&mut self) -> Result<()> {
        self.teardown_on_drop = false;
        self.state.owner = None;
        // Forget child handles: the processes keep running and init reaps them later.
        self.children.clear();
        self.save()
    }

    /// Writes `<rundir>/state.json`.
    pub fn save(&self) -> Result<()> {
        let body = serde_json::to_vec_pretty(&self.state)?;
        lease::write_atomic(&self.state_path(), &body)
    }

    /// The run prefix.
    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.state.run_dir
    }

    /// `<rundir>/state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.state.run_dir.join("state.json")
    }

    /// The full saved state.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// The lease directory (`--lease-dir`).
    pub fn lease_dir(&self) -> LeaseDir {
        LeaseDir::new(self.state.run_dir.join("leases"))
    }

    /// The parsed net-conf.
    pub fn net_conf(&self) -> Result<NetConf> {
        NetConf::parse(&self.state.net_conf)
    }

    /// The underlay namespace (`<prefix>-ul`, bridge `br0`).
    pub fn underlay_ns(&self) -> String {
        format!("{}-ul", self.state.prefix)
    }

    /// All nodes.
    pub fn nodes(&self) -> &[NodeState] {
        &self.state.nodes
    }

    /// A node by short name (`n1`) or namespace name.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name || n.ns == name)
    }

    fn node_index(&self, name: &str) -> Result<usize> {
        self.state
            .nodes
            .iter()
            .position(|n| n.name == name || n.ns == name)
            .ok_or_else(|| anyhow!("no node {name:?} in run {}", self.state.prefix))
    }

    /// Short names of all nodes.
    pub fn node_names(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Nodes of one kind.
    pub fn nodes_of(&self, kind: NodeKind) -> Vec<&NodeState> {
        self.state.nodes.iter().filter(|n| n.kind == kind).collect()
    }

    /// Every pod with its node.
    pub fn pods(&self) -> Vec<(&NodeState, &PodState)> {
        self.state
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
            .collect()
    }

    /// A pod by short name (`n1p2`) or namespace name.
    pub fn pod(&self, name: &str) -> Option<&PodState> {
        self.pods()
            .into_iter()
            .map(|(_, p)| p)
            .find(|p| p.name == name || p.ns == name)
    }

    /// Short names of all pods.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods()
            .into_iter()
            .map(|(_, p)| p.name.clone())
            .collect()
    }

    /// A pod's address.
    pub fn pod_ip(&self, pod: &str) -> Option<Ipv4Addr> {
        self.pod(pod).map(|p| p.ip)
    }

    /// A node's underlay address.
    pub fn node_ip(&self, node: &str) -> Option<Ipv4Addr> {
        self.node(node).map(|n| n.underlay_ip)
    }

    /// A node's lease subnet.
    pub fn node_subnet(&self, node: &str) -> Option<Cidr> {
        self.node(node).and_then(|n| n.subnet)
    }

    /// `<rundir>/<node>/`.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        let short = self
            .node(node)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| node.into());
        self.state.run_dir.join(short)
    }

    /// `<rundir>/<node>/subnet.env`.
    pub fn subnet_env_path(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("subnet.env")
    }

    /// `<rundir>/<node>/flanneld.log`.
    pub fn flanneld_log(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("flanneld.log")
    }

    /// The netns-harness binary in use (responders, probes), if resolved.
    pub fn harness_bin(&self) -> Option<&Path> {
        self.state.harness_bin.as_deref()
    }

    /// True when `ns` is one of this run's namespaces (by prefix).
    pub fn owns_namespace(&self, ns: &str) -> bool {
        ns.starts_with(&format!("{}-", self.state.prefix))
    }

    /// Runs `args` inside one of this run's namespaces (30 s limit); refuses foreign
    /// namespaces. The exit status is returned, not checked.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        self.exec_timeout(ns, args, Duration::from_secs(30))
    }

    /// [`exec`](Self::exec) with an explicit time limit.
    pub fn exec_timeout(&self, ns: &str, args: &[&str], limit: Duration) -> Result<Output> {
        let ns = self.resolve_ns(ns)?;
        cmd::run(&mut cmd::ns_command(&ns, args), limit)
    }

    /// [`exec`](Self::exec) that fails on a non-zero exit status.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let ns = self.resolve_ns(ns)?;
        cmd::run_ok(&mut cmd::ns_command(&ns, args), Duration::from_secs(30))
    }

    /// Accepts a full namespace name of this run or a short name (`n1`, `n1p2`, `ul`).
    pub fn resolve_ns(&self, ns: &str) -> Result<String> {
        let full = if self.owns_namespace(ns) {
            ns.to_string()
        } else {
            format!("{}-{ns}", self.state.prefix)
        };
        if !list_namespaces()?.contains(&full) {
            bail!(
                "namespace {full} does not exist (run {})",
                self.state.prefix
            );
        }
        Ok(full)
    }

    fn create_underlay(&mut self) -> Result<()> {
        let ul = self.underlay_ns();
        cmd::ip(&["netns", "add", &ul])?;
        cmd::ip(&["-n", &ul, "link", "set", "lo", "up"])?;
        cmd::ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        cmd::ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        if self.state.sites {
            for site in SITES {
                let br = format!("br{site}");
                cmd::ip(&["-n", &ul, "link", "add", &br, "type", "bridge"])?;
                cmd::ip(&["-n", &ul, "link", "set", &br, "up"])?;
                self.create_router(site)?;
            }
        }
        Ok(())
    }

    /// The router namespace of a site (`<prefix>-r<site>`).
    pub fn router_ns(&self, site: u8) -> String {
        format!("{}-r{site}", self.state.prefix)
    }

    /// The control plane's address: 198.18.0.254 on the underlay bridge, or 203.0.113.254 on
    /// the public bridge of a two-site run.
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        if self.state.sites {
            Ipv4Addr::new(203, 0, 113, 254)
        } else {
            Ipv4Addr::new(198, 18, 0, 254)
        }
    }

    /// A site router: `eth0` 198.18.`site`.254/24 on the site bridge, `eth1`
    /// 203.0.113.(240+`site`)/24 on the public bridge `br0`, forwarding on, redirects and
    /// reverse-path filtering off. Nodes get 1:1 NAT rules as they are added.
    fn create_router(&mut self, site: u8) -> Result<()> {
        let ul = self.underlay_ns();
        let ns = self.router_ns(site);
        let (priv_if, pub_if) = (format!("r{site}p"), format!("r{site}u"));
        cmd::ip(&["netns", "add", &ns])?;
        cmd::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for (ul_if, ns_if, br) in [
            (&priv_if, "eth0", format!("br{site}")),
            (&pub_if, "eth1", "br0".to_string()),
        ] {
            cmd::ip(&[
                "-n", &ul, "link", "add", ul_if, "type", "veth", "peer", "name", ns_if, "netns",
                &ns,
            ])?;
            cmd::ip(&["-n", &ul, "link", "set", ul_if, "master", &br])?;
            cmd::ip(&["-n", &ul, "link", "set", ul_if, "up"])?;
            if !self.state.underlay_tx_offload {
                cmd::ns_ok(&ns, &["ethtool", "-K", ns_if, "tx", "off"])?;
            }
        }
        let private = format!("{}/24", site_gateway(site));
        let public = format!("{}/24", Ipv4Addr::new(203, 0, 113, 240 + site));
        cmd::ip(&["-n", &ns, "addr", "add", &private, "dev", "eth0"])?;
        cmd::ip(&["-n", &ns, "addr", "add", &public, "dev", "eth1"])?;
        cmd::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        cmd::ip(&["-n", &ns, "link", "set", "eth1", "up"])?;
        cmd::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
            "net.ipv4.conf.eth1.rp_filter",
            "net.ipv4.conf.all.send_redirects",
            "net.ipv4.conf.eth0.send_redirects",
        ] {
            cmd::sysctl(&ns, key, "0")?;
        }
        log(format!(
            "site {site}: router {ns} {private} <-> {public} (1:1 NAT)"
        ));
        Ok(())
    }

    /// The site router's 1:1 NAT for one node: the router owns the node's public address and
    /// translates it to and from the node's private address (also for traffic between nodes
    /// of the same site, so every peer sees one address per node).
    fn add_nat(&self, site: u8, private: Ipv4Addr, public: Ipv4Addr) -> Result<()> {
        let ns = self.router_ns(site);
        let (pv, pb) = (private.to_string(), public.to_string());
        cmd::ip(&["-n", &ns, "addr", "add", &format!("{pb}/32"), "dev", "eth1"])?;
        cmd::ns_ok(
            &ns,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                &pb,
                "-j",
                "DNAT",
                "--to-destination",
                &pv,
            ],
        )?;
        cmd::ns_ok(
            &ns,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &pv,
                "-j",
                "SNAT",
                "--to-source",
                &pb,
            ],
        )?;
        Ok(())
    }

    /// Undoes [`add_nat`](Self::add_nat) (best effort).
    fn remove_nat(&self, site: u8, private: Ipv4Addr, public: Ipv4Addr) {
        let ns = self.router_ns(site);
        let (pv, pb) = (private.to_string(), public.to_string());
        let _ = cmd::ns_ok(
            &ns,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-d",
                &pb,
                "-j",
                "DNAT",
                "--to-destination",
                &pv,
            ],
        );
        let _ = cmd::ns_ok(
            &ns,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-s",
                &pv,
                "-j",
                "SNAT",
                "--to-source",
                &pb,
            ],
        );
        let _ = cmd::ip(&["-n", &ns, "addr", "del", &format!("{pb}/32"), "dev", "eth1"]);
    }

    /// Adds a node (namespaces, lease or flanneld, pods, responders) and re-syncs kernel-ref
    /// nodes. Returns its short name.
    pub fn add_node(&mut self, kind: NodeKind) -> Result<String> {
        self.add_node_spec(&NodeSpec::from(kind))
    }

    /// [`add_node`](Self::add_node) with per-node flanneld arguments (site 1 in a two-site
    /// run).
    pub fn add_node_spec(&mut self, spec: &NodeSpec) -> Result<String> {
        self.add_node_at(spec, None)
    }

    /// Adds a node to a site (two-site runs; `None`: site 1; ignored otherwise).
    pub fn add_node_at(&mut self, spec: &NodeSpec, site: Option<u8>) -> Result<String> {
        if spec.kind.runs_flanneld() && self.state.flanneld.is_none() {
            self.state.flanneld = Some(resolve_flanneld(None)?);
        }
        let i = self.create_node(spec, site)?;
        self.save()?;
        self.sync_kernel_refs()?;
        self.create_pods(i)?;
        self.save()?;
        Ok(self.state.nodes[i].name.clone())
    }

    fn create_node(&mut self, spec: &NodeSpec, site: Option<u8>) -> Result<usize> {
        sys::check_interrupted()?;
        let max = if self.state.sites {
            MAX_SITE_NODES
        } else {
            MAX_NODES
        };
        if self.state.nodes.len() >= max {
            bail!("at most {max} nodes");
        }
        let site = if self.state.sites {
            let s = site.unwrap_or(SITES[0]);
            if !SITES.contains(&s) {
                bail!("site {s} does not exist: a two-site run has sites 1 and 2");
            }
            Some(s)
        } else {
            None
        };
        // Indices are never reused within a run (a removed node keeps its directory), so stale
        // neighbour entries for a removed node's underlay address cannot alias a new node.
        let start = self.state.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        let index = (start..=max as u32)
            .find(|i| !self.state.run_dir.join(format!("n{i}")).exists())
            .ok_or_else(|| anyhow!("no free node index (at most {max} per run)"))?;
        let name = format!("n{index}");
        let ns = format!("{}-{name}", self.state.prefix);
        let underlay_ip = Ipv4Addr::new(198, 18, site.unwrap_or(0), index as u8);
        let public_ip = site.map(|_| Ipv4Addr::new(203, 0, 113, index as u8));
        debug_assert!(net::underlay_range().contains(underlay_ip));
        std::fs::create_dir_all(self.state.run_dir.join(&name))?;
        self.state.nodes.push(NodeState {
            name: name.clone(),
            ns: ns.clone(),
            index,
            kind: spec.kind,
            underlay_ip,
            site,
            public_ip,
            subnet: None,
            mtu: 0,
            vtep_mac: None,
            extra_args: spec.extra_args.clone(),
            flanneld: None,
            programmed: Vec::new(),
            pods: Vec::new(),
        });
        let pos = self.state.nodes.len() - 1;

        let ul = self.underlay_ns();
        cmd::ip(&["netns", "add", &ns])?;
        cmd::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // Both ends are created directly inside their namespaces: nothing ever appears in the
        // root namespace.
        cmd::ip(&[
            "-n", &ul, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        let bridge = site.map_or_else(|| "br0".to_string(), |s| format!("br{s}"));
        cmd::ip(&["-n", &ul, "link", "set", &name, "master", &bridge])?;
        cmd::ip(&["-n", &ul, "link", "set", &name, "up"])?;
        cmd::ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{underlay_ip}/24"),
            "dev",
            "eth0",
        ])?;
        cmd::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        if !self.state.underlay_tx_offload {
            // A veth with tx checksum offload hands CHECKSUM_PARTIAL skbs to its peer: the
            // checksum is never finished, and a capture on the underlay shows bogus outer and
            // inner checksums (and 64 KB GSO "frames"). Turning tx offload off makes the kernel
            // finish every checksum (and segment) before eth0, so frames on the underlay look
            // exactly as on a real wire and a capture can verify them.
            cmd::ns_ok(&ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        cmd::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        if let (Some(site), Some(public)) = (site, public_ip) {
            let gw = site_gateway(site).to_string();
            cmd::ip(&[
                "-n", &ns, "route", "add", "default", "via", &gw, "dev", "eth0",
            ])?;
            self.add_nat(site, underlay_ip, public)?;
        }
        if self.state.store == StoreKind::Kube {
            // kube-controller-manager's part: the Node with its pod CIDR exists before the
            // node's flanneld starts.
            let cidr = self.pod_cidr_for(index)?;
            self.kube_create_node(&name, &cidr, underlay_ip)?;
        }

        match spec.kind {
            NodeKind::KernelRef => self.setup_kernel_ref(pos)?,
            _ => {
                self.start_flanneld(&name)?;
            }
        }
        Ok(pos)
    }

    /// The lease attributes a kernel-ref node publishes: its detected (eth0) address, vxlan
    /// with its VTEP MAC.
    pub(crate) fn kernel_ref_attrs(&self, node: &NodeState) -> Result<LeaseAttrs> {
        let conf = self.net_conf()?;
        let mac = node
            .vtep_mac
            .clone()
            .ok_or_else(|| anyhow!("{} has no VTEP MAC", node.name))?;
        Ok(LeaseAttrs {
            public_ip: node.underlay_ip.to_string(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::to_value(VxlanData {
                vni: conf.vni,
                vtep_mac: mac,
            })?,
        })
    }

    fn setup_kernel_ref(&mut self, pos: usize) -> Result<()> {
        let conf = self.net_conf()?;
        let mac = net::random_mac()?;
        self.state.nodes[pos].vtep_mac = Some(mac.clone());
        let node = &self.state.nodes[pos];
        let (ns, name, ip) = (node.ns.clone(), node.name.clone(), node.underlay_ip);
        let attrs = self.kernel_ref_attrs(node)?;
        let subnet = self.publish_kernel_ref_lease(&name, &attrs)?;
        let mtu = conf.mtu.unwrap_or(1500).saturating_sub(50);
        {
            let node = &mut self.state.nodes[pos];
            node.subnet = Some(subnet);
            node.mtu = mtu;
            node.vtep_mac = Some(mac.clone());
        }
        let first = subnet
            .nth(1)
            .ok_or_else(|| anyhow!("subnet {subnet} too small"))?;
        SubnetEnv {
            network: conf.network,
            subnet: Cidr::new(first, subnet.len)?,
            mtu,
            ipmasq: self.state.ip_masq,
        }
        .write(&self.subnet_env_path(&name))?;
        kernel_ref::create_vtep(&ns, &conf, &mac, ip, &subnet, mtu)?;
        kernel_ref::install_rules(
            &ns,
            &conf.network,
            &subnet,
            self.state.ip_masq,
            &self.node_dir(&name).join("iptables.rules"),
        )?;
        log(format!("{name}: kernel-ref {subnet} vtep {mac}"));
        Ok(())
    }

    /// The flanneld command line for a node (without the `ip netns exec` part).
    pub fn flanneld_command(&self, node: &str) -> Result<Vec<String>> {
        let n = self.node(node).ok_or_else(|| anyhow!("no node {node:?}"))?;
        let dataplane = n
            .kind
            .dataplane()
            .ok_or_else(|| anyhow!("{} is a kernel-ref node: no flanneld", n.name))?;
        let bin = self
            .state
            .flanneld
            .as_ref()
            .ok_or_else(|| anyhow!("no flanneld binary configured"))?;
        let mut v = vec![bin.to_string_lossy().into_owned()];
        v.extend(self.store_args());
        v.extend([
            "--subnet-file".into(),
            self.subnet_env_path(&n.name).to_string_lossy().into_owned(),
            "--iface".into(),
            "eth0".into(),
            "--dataplane".into(),
            dataplane.into(),
        ]);
        if self.state.ip_masq {
            v.push("--ip-masq".into());
        }
        v.extend(self.state.flanneld_args.iter().cloned());
        v.extend(n.extra_args.iter().cloned());
        Ok(v)
    }

    /// Starts flanneld on a node and waits until it wrote a (new) subnet.env; fails with the
    /// log tail if it exits or the readiness limit passes.
    pub fn start_flanneld(&mut self, node: &str) -> Result<()> {
        let pos = self.node_index(node)?;
        if let Some(rec) = &self.state.nodes[pos].flanneld {
            if rec.alive() {
                bail!("flanneld already runs on {node} (pid {})", rec.pid);
            }
        }
        let name = self.state.nodes[pos].name.clone();
        let ns = self.state.nodes[pos].ns.clone();
        let mut args = self.state.flanneld_prefix.clone();
        args.extend(self.flanneld_command(&name)?);
        let env_path = self.subnet_env_path(&name);
        let before = file_identity(&env_path);
        let log_path = self.flanneld_log(&name);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let kube = self.state.store == StoreKind::Kube;
        let (mut child, rec) =
            cmd::spawn_in_ns_with(&ns, &argv, &log_path, &format!("flanneld {name}"), |c| {
                if kube {
                    // How kube-flannel.yml names the node (downward API).
                    c.env("NODE_NAME", &name);
                }
            })?;
        log(format!(
            "{name}: started flanneld pid {}: {}{}",
            rec.pid,
            if kube {
                format!("NODE_NAME={name} ")
            } else {
                String::new()
            },
            args.join(" ")
        ));
        let limit = Duration::from_secs(self.state.ready_timeout_secs);
        let deadline = Instant::now() + limit;
        let ready = loop {
            if let Some(st) = child.try_wait()? {
                self.save()?;
                bail!(
                    "flanneld on {name} exited ({st}) before writing {}; last log lines of {}:\n{}",
                    env_path.display(),
                    log_path.display(),
                    cmd::tail(&log_path, 20)
                );
            }
            let now = file_identity(&env_path);
            if now.is_some() && now != before {
                if let Ok(env) = SubnetEnv::read(&env_path) {
                    break env;
                }
            }
            if Instant::now() >= deadline || sys::interrupted() {
                cmd::stop_process(&rec, Some(child));
                sys::check_interrupted()?;
                bail!(
                    "flanneld on {name} did not write {} within {limit:?}; last log lines of {}:\n{}",
                    env_path.display(),
                    log_path.display(),
                    cmd::tail(&log_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        let subnet = ready.subnet.trunc();
        let n = &mut self.state.nodes[pos];
        if let Some(old) = n.subnet {
            if old != subnet {
                log(format!(
                    "{name}: flanneld changed the lease from {old} to {subnet}; pods keep old addresses"
                ));
            }
        }
        n.subnet = Some(subnet);
        n.mtu = ready.mtu;
        n.flanneld = Some(rec.clone());
        self.children.insert(rec.pid, child);
        log(format!(
            "{name}: flanneld ready, lease {subnet}, mtu {}",
            ready.mtu
        ));
        // flannel publishes its lease before writing subnet.env; give a daemon a moment, then
        // say loudly if kernel-ref nodes will never learn about this node.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut published = self.store_has_lease(&subnet);
        while !published && Instant::now() < deadline && !sys::interrupted() {
            std::thread::sleep(Duration::from_millis(25));
            published = self.store_has_lease(&subnet);
        }
        if !published {
            log(format!(
                "{name}: WARNING: no lease for {subnet} in the {} store after subnet.env; other nodes cannot learn this node",
                self.state.store
            ));
        }
        self.save()?;
        // A (re)started daemon may have published a new lease (e.g. a new VTEP MAC).
        self.sync_kernel_refs().map(|_| ())
    }

    /// Stops a node's flanneld by PID (SIGTERM, then SIGKILL).
    pub fn stop_flanneld(&mut self, node: &str) -> Result<()> {
        let pos = self.node_index(node)?;
        if let Some(rec) = self.state.nodes[pos].flanneld.take() {
            let child = self.children.remove(&rec.pid);
            if !cmd::stop_process(&rec, child) {
                bail!("flanneld pid {} on {node} did not stop", rec.pid);
            }
        }
        self.save()
    }

    /// Upgrades a node's flanneld the way a surge rollout does: starts a second one while the
    /// first runs, waits until it is ready and the first one logged that it handed the data
    /// plane over (up to 10 s), then stops the first one (SIGTERM, by PID). The first one is
    /// stopped in every case; an error says what did not happen.
    pub fn handoff_flanneld(&mut self, node: &str) -> Result<()> {
        let pos = self.node_index(node)?;
        let old = self.state.nodes[pos]
            .flanneld
            .take()
            .filter(ProcRecord::alive)
            .ok_or_else(|| anyhow!("no running flanneld on {node} to hand over from"))?;
        let old_child = self.children.remove(&old.pid);
        let log_path = self.flanneld_log(node);
        let marker = "handed the data plane over";
        let count = || std::fs::read_to_string(&log_path).map_or(0, |l| l.matches(marker).count());
        let before = count();
        let started = self.start_flanneld(node);
        let handed = started.is_ok()
            && (0..400).any(|_| {
                std::thread::sleep(Duration::from_millis(25));
                count() > before
            });
        let stopped = cmd::stop_process(&old, old_child);
        log(format!(
            "{node}: handover to a new flanneld: {}; old pid {} stopped: {stopped}",
            if handed { "released" } else { "NOT released" },
            old.pid
        ));
        started?;
        if !handed {
            bail!("the old flanneld on {node} did not log the handover within 10 s");
        }
        if !stopped {
            bail!("the old flanneld pid {} on {node} did not stop", old.pid);
        }
        Ok(())
    }

    /// Kills a node's flanneld with SIGKILL (a crash: nothing is cleaned up) and waits until
    /// it is gone.
    pub fn kill_flanneld(&mut self, node: &str) -> Result<()> {
        let pos = self.node_index(node)?;
        if let Some(rec) = self.state.nodes[pos].flanneld.take() {
            let mut child = self.children.remove(&rec.pid);
            let running = match child.as_mut() {
                Some(c) => matches!(c.try_wait(), Ok(None)),
                None => rec.alive(),
            };
            if running {
                sys::send_signal(rec.pid, sys::Signal::Kill);
            }
            if !cmd::stop_process(&rec, child) {
                bail!("flanneld pid {} on {node} did not die", rec.pid);
            }
        }
        self.save()
    }

    /// Stops and starts a node's flanneld; ready when it rewrote subnet.env.
    pub fn restart_flanneld(&mut self, node: &str) -> Result<()> {
        self.stop_flanneld(node)?;
        self.start_flanneld(node)
    }

    /// Is the node's flanneld (as started by this run) still running?
    pub fn flanneld_running(&mut self, node: &str) -> bool {
        let Some(rec) = self.node(node).and_then(|n| n.flanneld.clone()) else {
            return false;
        };
        match self.children.get_mut(&rec.pid) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => rec.alive(),
        }
    }

    fn create_pods(&mut self, pos: usize) -> Result<()> {
        if self.state.pod_setup == PodSetup::Cni {
            return self.create_pods_cni(pos);
        }
        let count = self.state.pods_per_node;
        let node = self.state.nodes[pos].clone();
        if count == 0 || !node.pods.is_empty() {
            return Ok(());
        }
        let conf = self.net_conf()?;
        let env = SubnetEnv::read(&self.subnet_env_path(&node.name))?;
        let gw = env.subnet.addr;
        let len = env.subnet.len;
        let mtu = env.mtu.to_string();
        let ns = node.ns.as_str();
        if !net::pod_range().contains_cidr(&env.subnet.trunc()) {
            bail!(
                "{}: FLANNEL_SUBNET {} is outside {}; refusing to address pods from it",
                node.name,
                env.subnet,
                net::pod_range()
            );
        }
        // What the bridge plugin does on the first ADD: cni0 with the gateway address and MTU.
        cmd::ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
        cmd::ip(&["-n", ns, "link", "set", "cni0", "mtu", &mtu])?;
        cmd::ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &env.subnet.to_string(),
            "dev",
            "cni0",
        ])?;
        cmd::ip(&["-n", ns, "link", "set", "cni0", "up"])?;
        for j in 1..=count {
            sys::check_interrupted()?;
            // Pod j gets host address j+1 (the gateway is .1); never the broadcast address.
            let ip = Some(j as u64 + 1)
                .filter(|h| *h + 1 < env.subnet.size())
                .and_then(|h| env.subnet.nth(h))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: subnet {} has no room for pod {j}",
                        node.name,
                        env.subnet
                    )
                })?;
            let pname = format!("{}p{j}", node.name);
            let pns = format!("{}-{pname}", self.state.prefix);
            let veth = format!("veth{j}");
            cmd::ip(&["netns", "add", &pns])?;
            self.state.nodes[pos].pods.push(PodState {
                name: pname.clone(),
                ns: pns.clone(),
                ip,
                serve: None,
                container_id: None,
                ports: Vec::new(),
            });
            cmd::ip(&["-n", &pns, "link", "set", "lo", "up"])?;
            cmd::ip(&[
                "-n", ns, "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name",
                "eth0", "mtu", &mtu, "netns", &pns,
            ])?;
            cmd::ip(&["-n", ns, "link", "set", &veth, "master", "cni0"])?;
            // kube-flannel's CNI config sets hairpinMode.
            cmd::bridge(&["-n", ns, "link", "set", "dev", &veth, "hairpin", "on"])?;
            cmd::ip(&["-n", ns, "link", "set", &veth, "up"])?;
            cmd::ip(&[
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{ip}/{len}"),
                "dev",
                "eth0",
            ])?;
            cmd::ip(&["-n", &pns, "link", "set", "eth0", "up"])?;
            // isDefaultGateway (kube-flannel's CNI config) plus the flannel plugin's route to
            // the cluster network.
            cmd::ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ])?;
            cmd::ip(&[
                "-n",
                &pns,
                "route",
                "add",
                &conf.network.to_string(),
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ])?;
            if self.state.responders {
                self.start_responder(pos, j - 1)?;
            }
        }
        Ok(())
    }

    pub(crate) fn start_responder(&mut self, pos: usize, k: usize) -> Result<()> {
        let bin = self
            .state
            .harness_bin
            .clone()
            .ok_or_else(|| anyhow!("no netns-harness binary for responders"))?;
        let pod = self.state.nodes[pos].pods[k].clone();
        let log_path = self.state.run_dir.join(format!("{}.serve.log", pod.name));
        let bin_s = bin.to_string_lossy().into_owned();
        let (mut child, rec) = cmd::spawn_in_ns(
            &pod.ns,
            &[&bin_s, "serve"],
            &log_path,
            &format!("serve {}", pod.name),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::read_to_string(&log_path).is_ok_and(|t| t.contains("ready")) {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "responder in {} exited ({st}): {}",
                    pod.ns,
                    cmd::tail(&log_path, 10)
                );
            }
            if Instant::now() >= deadline || sys::interrupted() {
                cmd::stop_process(&rec, Some(child));
                sys::check_interrupted()?;
                bail!("responder in {} not ready within 10 s", pod.ns);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.children.insert(rec.pid, child);
        self.state.nodes[pos].pods[k].serve = Some(rec);
        Ok(())
    }

    /// Recomputes every kernel-ref node's neighbour/FDB/route entries from the run's store
    /// (lease directory, etcd or Node objects) and applies the differences. Returns how many peer operations were applied.
    pub fn sync_kernel_refs(&mut self) -> Result<usize> {
        if !self
            .state
            .nodes
            .iter()
            .any(|n| n.kind == NodeKind::KernelRef && n.subnet.is_some())
        {
            return Ok(0);
        }
        let (leases, bad) = self.leases()?;
        for b in &bad {
            log(format!("ignoring lease file {b}"));
        }
        let vni = self.net_conf()?.vni;
        let dev = kernel_ref::device_name(vni);
        let mut applied = 0;
        for pos in 0..self.state.nodes.len() {
            let node = &self.state.nodes[pos];
            let (NodeKind::KernelRef, Some(own)) = (node.kind, node.subnet) else {
                continue;
            };
            let ns = node.ns.clone();
            let ops = kernel_ref::plan(&own, &leases, &node.programmed);
            for op in ops {
                let res = kernel_ref::apply(&ns, &dev, &op);
                let programmed = &mut self.state.nodes[pos].programmed;
                match (&op, res) {
                    (KernelOp::Add(p), Ok(())) => {
                        programmed.retain(|q| q.subnet != p.subnet);
                        programmed.push(p.clone());
                        applied += 1;
                    }
                    (KernelOp::Remove(p), r) => {
                        // flannel logs failed deletes and forgets the peer anyway.
                        if let Err(e) = r {
                            log(format!("{ns}: removing {}: {e:#}", p.subnet));
                        }
                        programmed.retain(|q| q.subnet != p.subnet);
                        applied += 1;
                    }
                    (KernelOp::Add(p), Err(e)) => {
                        self.save()?;
                        return Err(e.context(format!("{ns}: programming peer {}", p.subnet)));
                    }
                }
            }
            self.state.nodes[pos].programmed.sort_by_key(|p| p.subnet);
        }
        self.save()?;
        Ok(applied)
    }

    /// Removes a node: stops its flanneld and responders by PID, deletes its lease file and
    /// namespaces, then re-syncs kernel-ref nodes.
    pub fn remove_node(&mut self, name: &str) -> Result<()> {
        let pos = self.node_index(name)?;
        let node = self.state.nodes.remove(pos);
        let mut errors = Vec::new();
        if let Some(rec) = &node.flanneld {
            if !cmd::stop_process(rec, self.children.remove(&rec.pid)) {
                errors.push(format!("flanneld pid {} did not stop", rec.pid));
            }
        }
        for pod in &node.pods {
            if let Some(rec) = &pod.serve {
                cmd::stop_process(rec, self.children.remove(&rec.pid));
            }
            if let Err(e) = delete_namespace(&pod.ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = delete_namespace(&node.ns) {
            errors.push(format!("{e:#}"));
        }
        if let (Some(site), Some(public)) = (node.site, node.public_ip) {
            self.remove_nat(site, node.underlay_ip, public);
        }
        // Its lease (file or key, if it still names this node's address) or its Node object.
        self.withdraw_node(&node)?;
        self.save()?;
        self.sync_kernel_refs()?;
        log(format!("{}: removed", node.name));
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("removing {}: {}", node.name, errors.join("; "))
        }
    }

    /// Records a process started inside the run so teardown stops it.
    pub(crate) fn adopt(&mut self, rec: ProcRecord, child: Child) {
        self.children.insert(rec.pid, child);
        self.state.extra_procs.push(rec);
    }

    /// Stops a process recorded with `adopt`.
    pub(crate) fn release(&mut self, pid: u32) -> bool {
        let child = self.children.remove(&pid);
        let Some(i) = self.state.extra_procs.iter().position(|r| r.pid == pid) else {
            return child.is_none();
        };
        let rec = self.state.extra_procs.remove(i);
        cmd::stop_process(&rec, child)
    }

    /// Stops every process and deletes every namespace of the run and the run directory.
    /// Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        let mut procs: Vec<ProcRecord> = Vec::new();
        procs.extend(self.state.captures.drain(..).map(|c| c.proc));
        if let Some(cp) = self.state.control_plane.as_mut() {
            procs.extend(cp.server.take());
            procs.extend(cp.maintenance.take());
        }
        procs.append(&mut self.state.extra_procs);
        for n in &mut self.state.nodes {
            for p in &mut n.pods {
                procs.extend(p.serve.take());
            }
            procs.extend(n.flanneld.take());
        }
        for rec in &procs {
            let child = self.children.remove(&rec.pid);
            if !cmd::stop_process(rec, child) {
                log(format!("{} (pid {}) did not stop", rec.what, rec.pid));
            }
        }
        for (_, mut c) in self.children.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let base = self
            .state
            .run_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE_DIR));
        let res = teardown_by_prefix(&base, &self.state.prefix);
        self.torn_down = true;
        self.teardown_on_drop = false;
        log(format!("run {} torn down", self.state.prefix));
        res
    }

    /// Checks every probe until all pass or `limit` passes (for daemons that need a moment to
    /// program peers). Returns the last matrix.
    pub fn check_until_pass(&self, limit: Duration) -> crate::check::Matrix {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.check();
            if m.all_pass() || Instant::now() >= deadline || sys::interrupted() {
                return m;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The ports the responders listen on: (tcp, udp, dns).
    pub fn responder_ports(&self) -> (u16, u16, u16) {
        (proto::TCP_PORT, proto::UDP_PORT, proto::DNS_PORT)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.teardown_on_drop && !self.torn_down {
            if let Err(e) = self.teardown() {
                log(format!("teardown: {e:#}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse() {
        assert_eq!(
            NodeKind::parse_list("userspace,kernel-ref, kernel").unwrap(),
            vec![NodeKind::Userspace, NodeKind::KernelRef, NodeKind::Kernel]
        );
        assert!(NodeKind::parse_list("vxlan").is_err());
        assert_eq!(
            serde_json::to_string(&NodeKind::KernelRef).unwrap(),
            "\"kernel-ref\""
        );
    }

    #[test]
    fn prefixes() {
        let p = new_prefix().unwrap();
        assert!(valid_prefix(&p), "{p}");
        assert_eq!(p.len(), 8);
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("a/b"));
        assert!(!valid_prefix("FR00"));
    }

    #[test]
    fn missing_flanneld_is_explained() {
        let err = resolve_flanneld(Some(Path::new("/nonexistent/flanneld"))).unwrap_err();
        let s = format!("{err:#}");
        assert!(
            s.contains("/nonexistent/flanneld") && s.contains("--flanneld"),
            "{s}"
        );
        let err = resolve_flanneld(Some(Path::new("/tmp"))).unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"));
    }
}
