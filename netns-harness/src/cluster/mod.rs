//! Building, inspecting and tearing down one run: the underlay namespace with its bridge, the
//! node namespaces (flanneld or kernel-ref), the pod namespaces (made by the real CNI plugins,
//! see [`crate::cni`], or wired by hand like them) and the state file later commands read.
//!
//! This module holds [`Cluster`] itself (build, load, save, lookups, teardown); its parts:
//! `spec` (what to build), `state` (what was built, `state.json`), `namespaces` (run prefixes
//! and their namespaces), `topology` (underlay bridge, two-site NAT routers), `nodes` (nodes
//! and their flanneld processes), `pods`, `control_plane` (etcd or the test API server),
//! `probes` (the connectivity matrix of [`crate::check`]) and `kubeproxy` (ClusterIP
//! emulation). The modules below it (`store`, `cni`, `check`, `lease`, ...) never import it.

mod control_plane;
mod kubeproxy;
mod namespaces;
mod nodes;
mod pods;
mod probes;
mod spec;
mod state;
mod topology;

pub(crate) use crate::binaries::check_executable;
pub use crate::binaries::{resolve_flanneld, resolve_harness_bin, sibling_binary};
pub(crate) use crate::sys::log;
pub use kubeproxy::KUBE_MARK;
pub use namespaces::{list_namespaces, list_runs, only_run, run_namespaces, teardown_by_prefix};
pub use nodes::parse_ethtool_feature;
pub use spec::{
    ClusterSpec, IpFamily, NodeKind, NodeSpec, DEFAULT_BASE_DIR, MAX_NODES, MAX_PODS,
    MAX_SITE_NODES, SITES,
};
pub use state::{CaptureState, NodeState, PodState, RunState};

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{self, ProcRecord};
use crate::cni::PodSetup;
use crate::lease::{self, LeaseDir, NetConf};
use crate::net::Cidr;
use crate::proto;
use crate::store::{self, StoreKind};
use crate::sys;
use namespaces::{new_prefix, valid_prefix};

/// A live run. Dropping an owning `Cluster` tears everything down (also on panic); a cluster
/// loaded from a state file or [`detach`](Cluster::detach)ed is left running.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) state: RunState,
    pub(crate) children: HashMap<u32, Child>,
    teardown_on_drop: bool,
    torn_down: bool,
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
            .unwrap_or_else(|| spec.ip_family.default_net_conf().to_string());
        let conf = NetConf::parse(&net_conf)?;
        if conf.enable_ipv4 != spec.ip_family.has_v4()
            || conf.ipv6.is_some() != spec.ip_family.has_v6()
        {
            bail!(
                "net-conf enables IPv4 {} / IPv6 {}, but --ip-family is {}",
                conf.enable_ipv4,
                conf.ipv6.is_some(),
                spec.ip_family
            );
        }
        if spec.ip_family.has_v6() && sites {
            bail!(
                "--ip-family {} is not supported with --sites (the NAT routers are IPv4 only)",
                spec.ip_family
            );
        }
        if spec.ip_family.has_v6() && spec.pod_setup == PodSetup::Hand {
            bail!(
                "--ip-family {} needs --pod-setup cni (hand-wired pods are IPv4 only)",
                spec.ip_family
            );
        }
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
                ip_family: spec.ip_family,
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
        cluster.wait_ipv6_settled()?;
        Ok(cluster)
    }

    /// Loads a run saved by another harness process. `run` is a prefix; None picks the only
    /// run (several: an error). The loaded cluster does not tear down on drop.
    pub fn load(base_dir: &Path, run: Option<&str>) -> Result<Cluster> {
        let prefix = match run {
            Some(p) => p.to_string(),
            None => only_run(base_dir)?
                .ok_or_else(|| anyhow!("no harness run found in {}", base_dir.display()))?,
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

    /// A pod's IPv6 address (dual-stack and IPv6-only runs).
    pub fn pod_ip6(&self, pod: &str) -> Option<std::net::Ipv6Addr> {
        self.pod(pod).and_then(|p| p.ip6)
    }

    /// The run's address families.
    pub fn ip_family(&self) -> IpFamily {
        self.state.ip_family
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
        let err = resolve_harness_bin(Some(Path::new("/nonexistent/nh"))).unwrap_err();
        let s = format!("{err:#}");
        assert!(
            s.contains("/nonexistent/nh") && s.contains("NETNS_HARNESS_BIN"),
            "{s}"
        );
    }
}
