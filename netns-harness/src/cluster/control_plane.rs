//! The run's control plane (see [`crate::store`]): starting and stopping etcd or the test API server, talking to it, and publishing kernel-ref leases in it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::{self, ProcRecord};
use crate::http::{self, base64_decode, base64_encode, HttpResponse};
use crate::lease::{self, Families, Lease, LeaseAttrs};
use crate::net::{self, Cidr, Cidr6};
use crate::sys;

use crate::store::{
    annotation, etcd_key, etcd_lease_key_text, json_i64, node_annotation, node_to_lease,
    prefix_end, ControlPlane, StoreKind, ETCD_LEASE_TTL_SECS, ETCD_MAINTENANCE_PORT,
    ETCD_PEER_PORT, ETCD_PORT, KUBECTL_LIMIT, KUBE_MAINTENANCE_PORT, KUBE_PORT, REQUEST_LIMIT,
    START_LIMIT,
};

use super::{Cluster, NodeKind, NodeState};

impl Cluster {
    /// The store of this run.
    pub fn store_kind(&self) -> StoreKind {
        self.state.store
    }

    /// The control plane (etcd and kube runs).
    pub fn control_plane(&self) -> Option<&ControlPlane> {
        self.state.control_plane.as_ref()
    }

    /// The URL daemons use to reach the store (etcd and kube runs).
    pub fn store_url(&self) -> Option<String> {
        self.control_plane().map(ControlPlane::url)
    }

    /// The control-plane namespace (`<prefix>-cp`).
    pub fn control_plane_ns(&self) -> String {
        format!("{}-cp", self.state.prefix)
    }

    /// `<rundir>/net-conf.json` (the `--net-config-path` of kube runs).
    pub fn net_conf_path(&self) -> PathBuf {
        self.state.run_dir.join("net-conf.json")
    }

    /// True while the store daemons use is up (always for the directory store).
    pub fn store_running(&self) -> bool {
        match self.control_plane() {
            None => true,
            Some(cp) => cp.server.as_ref().is_some_and(ProcRecord::alive),
        }
    }

    /// Creates the control-plane namespace on `br0` and starts the store server, then
    /// publishes the network config where the store's daemons read it.
    pub(crate) fn setup_control_plane(&mut self, binary: PathBuf, ip: Ipv4Addr) -> Result<()> {
        let kind = self.state.store;
        let ns = self.control_plane_ns();
        let ul = self.underlay_ns();
        let dir = self.state.run_dir.join("cp");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (port, maintenance_port) = match kind {
            StoreKind::Etcd => (ETCD_PORT, ETCD_MAINTENANCE_PORT),
            StoreKind::Kube => (KUBE_PORT, KUBE_MAINTENANCE_PORT),
            StoreKind::Dir => bail!("the directory store has no control plane"),
        };
        self.state.control_plane = Some(ControlPlane {
            kind,
            ns: ns.clone(),
            ip,
            port,
            maintenance_port,
            dir,
            binary,
            server: None,
            maintenance: None,
        });
        self.save()?;
        cmd::ip(&["netns", "add", &ns])?;
        cmd::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        cmd::ip(&[
            "-n", &ul, "link", "add", "cp", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        cmd::ip(&["-n", &ul, "link", "set", "cp", "master", "br0"])?;
        cmd::ip(&["-n", &ul, "link", "set", "cp", "up"])?;
        cmd::ip(&["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        cmd::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        self.spawn_store(false)?;
        match kind {
            StoreKind::Etcd => {
                let conf = self.state.net_conf.clone();
                self.etcd_put(&etcd_key("config"), conf.as_bytes(), None)?;
            }
            StoreKind::Kube => {
                lease::write_atomic(&self.net_conf_path(), self.state.net_conf.as_bytes())?;
            }
            StoreKind::Dir => {}
        }
        Ok(())
    }

    /// Starts the server (`maintenance == false`: on the namespace's address and loopback) or
    /// the maintenance instance (loopback only), waits until it answers, records it.
    fn spawn_store(&mut self, maintenance: bool) -> Result<()> {
        let cp = self
            .state
            .control_plane
            .clone()
            .ok_or_else(|| anyhow!("run {} has no control plane", self.state.prefix))?;
        let port = if maintenance {
            cp.maintenance_port
        } else {
            cp.port
        };
        let bin = cp.binary.to_string_lossy().into_owned();
        let what = format!(
            "{}{}",
            cp.kind,
            if maintenance { " maintenance" } else { "" }
        );
        let (args, log): (Vec<String>, PathBuf) = match cp.kind {
            StoreKind::Etcd => {
                let client = if maintenance {
                    format!("http://127.0.0.1:{port}")
                } else {
                    format!("http://{}:{port},http://127.0.0.1:{port}", cp.ip)
                };
                let advertise = if maintenance {
                    format!("http://127.0.0.1:{port}")
                } else {
                    format!("http://{}:{port}", cp.ip)
                };
                let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
                let name = self.state.prefix.clone();
                (
                    vec![
                        bin,
                        "--name".into(),
                        name.clone(),
                        "--data-dir".into(),
                        cp.dir.join("etcd-data").to_string_lossy().into_owned(),
                        "--listen-client-urls".into(),
                        client,
                        "--advertise-client-urls".into(),
                        advertise,
                        "--listen-peer-urls".into(),
                        peer.clone(),
                        "--initial-advertise-peer-urls".into(),
                        peer.clone(),
                        "--initial-cluster".into(),
                        format!("{name}={peer}"),
                        "--initial-cluster-state".into(),
                        "new".into(),
                        "--initial-cluster-token".into(),
                        name,
                    ],
                    cp.dir.join("etcd.log"),
                )
            }
            StoreKind::Kube => {
                let listen = if maintenance {
                    format!("127.0.0.1:{port}")
                } else {
                    // Inside the namespace only: its address on br0 and its loopback.
                    format!("0.0.0.0:{port}")
                };
                (
                    vec![
                        bin,
                        "--listen".into(),
                        listen,
                        "--state".into(),
                        cp.dir
                            .join("apiserver-state.json")
                            .to_string_lossy()
                            .into_owned(),
                    ],
                    cp.dir.join("apiserver.log"),
                )
            }
            StoreKind::Dir => bail!("the directory store has no server"),
        };
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut child, rec) = cmd::spawn_in_ns_with(&cp.ns, &argv, &log, &what, |c| {
            // The environment may carry ETCD_* settings meant for another etcd.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    c.env_remove(k);
                }
            }
        })?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "{what} in {} exited ({st}); last lines of {}:\n{}",
                    cp.ns,
                    log.display(),
                    cmd::tail(&log, 20)
                );
            }
            if store_healthy(&cp.ns, cp.kind, addr) {
                break;
            }
            if Instant::now() >= deadline || sys::interrupted() {
                cmd::stop_process(&rec, Some(child));
                sys::check_interrupted()?;
                bail!(
                    "{what} in {} did not answer within {START_LIMIT:?}; last lines of {}:\n{}",
                    cp.ns,
                    log.display(),
                    cmd::tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        crate::cluster::log(format!(
            "{what} pid {} ready{}",
            rec.pid,
            if maintenance {
                format!(" on 127.0.0.1:{port} (namespace loopback only)")
            } else {
                format!(" at {}", cp.url())
            }
        ));
        self.children.insert(rec.pid, child);
        if let Some(c) = self.state.control_plane.as_mut() {
            if maintenance {
                c.maintenance = Some(rec);
            } else {
                c.server = Some(rec);
            }
        }
        self.save()
    }

    fn stop_store_process(&mut self, maintenance: bool) -> Result<()> {
        let rec = match self.state.control_plane.as_mut() {
            Some(cp) if maintenance => cp.maintenance.take(),
            Some(cp) => cp.server.take(),
            None => None,
        };
        let res = match rec {
            Some(rec) => {
                let child = self.children.remove(&rec.pid);
                if cmd::stop_process(&rec, child) {
                    crate::cluster::log(format!("{} pid {} stopped", rec.what, rec.pid));
                    Ok(())
                } else {
                    Err(anyhow!("{} pid {} did not stop", rec.what, rec.pid))
                }
            }
            None => Ok(()),
        };
        self.save()?;
        res
    }

    /// Store outage: stops the server daemons use (by PID). A maintenance instance on the
    /// same data, reachable only from the control-plane namespace's loopback, serves the
    /// harness meanwhile. No-op for the directory store (an error) and when already stopped.
    pub fn stop_store(&mut self) -> Result<()> {
        if self.state.control_plane.is_none() {
            bail!("the {} store has no server to stop", self.state.store);
        }
        self.stop_store_process(false)?;
        if self
            .control_plane()
            .is_some_and(|cp| cp.maintenance.is_none())
        {
            self.spawn_store(true)?;
        }
        Ok(())
    }

    /// Ends an outage: stops the maintenance instance and starts the server again on the same
    /// address, port and data; returns once it answers.
    pub fn start_store(&mut self) -> Result<()> {
        if self.state.control_plane.is_none() {
            bail!("the {} store has no server to start", self.state.store);
        }
        if self
            .control_plane()
            .and_then(|cp| cp.server.as_ref())
            .is_some_and(ProcRecord::alive)
        {
            return Ok(());
        }
        self.stop_store_process(true)?;
        self.stop_store_process(false)?;
        self.spawn_store(false)
    }

    /// One HTTP request to the store (from inside the control-plane namespace).
    pub fn store_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<HttpResponse> {
        let cp = self
            .control_plane()
            .ok_or_else(|| anyhow!("the {} store has no server", self.state.store))?;
        http::request(
            &cp.ns,
            cp.access()?,
            method,
            path,
            content_type,
            body,
            REQUEST_LIMIT,
        )
    }

    fn etcd_call(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self.store_request(
            "POST",
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )?;
        if !resp.ok() {
            bail!("etcd {path}: HTTP {}: {}", resp.status, resp.text());
        }
        resp.json()
    }

    /// etcd put (optionally attached to an etcd lease).
    pub fn etcd_put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<()> {
        let mut body = json!({"key": base64_encode(key.as_bytes()), "value": base64_encode(value)});
        if let Some(id) = lease {
            body["lease"] = json!(id.to_string());
        }
        self.etcd_call("/v3/kv/put", &body).map(|_| ())
    }

    /// Every (key, value) whose key starts with `prefix`, in key order.
    pub fn etcd_get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let body = json!({
            "key": base64_encode(prefix.as_bytes()),
            "range_end": base64_encode(&prefix_end(prefix.as_bytes())),
        });
        let v = self.etcd_call("/v3/kv/range", &body)?;
        let mut out = Vec::new();
        for kv in v.get("kvs").and_then(Value::as_array).into_iter().flatten() {
            let key = base64_decode(kv.get("key").and_then(Value::as_str).unwrap_or(""))?;
            let value = base64_decode(kv.get("value").and_then(Value::as_str).unwrap_or(""))?;
            out.push((String::from_utf8_lossy(&key).into_owned(), value));
        }
        Ok(out)
    }

    /// The value at one etcd key.
    pub fn etcd_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let body = json!({"key": base64_encode(key.as_bytes())});
        let v = self.etcd_call("/v3/kv/range", &body)?;
        let Some(kv) = v
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        else {
            return Ok(None);
        };
        Ok(Some(base64_decode(
            kv.get("value").and_then(Value::as_str).unwrap_or(""),
        )?))
    }

    /// Deletes one etcd key; returns how many keys were deleted.
    pub fn etcd_delete(&self, key: &str) -> Result<u64> {
        let body = json!({"key": base64_encode(key.as_bytes())});
        let v = self.etcd_call("/v3/kv/deleterange", &body)?;
        Ok(json_i64(v.get("deleted")).unwrap_or(0).max(0) as u64)
    }

    /// Grants an etcd lease of `ttl_secs`; returns its ID.
    pub fn etcd_grant(&self, ttl_secs: u64) -> Result<i64> {
        let v = self.etcd_call("/v3/lease/grant", &json!({"TTL": ttl_secs.to_string()}))?;
        json_i64(v.get("ID")).ok_or_else(|| anyhow!("lease grant without ID: {v}"))
    }

    /// Creates `key` only if it does not exist (flannel's acquisition transaction); false when
    /// it existed.
    pub fn etcd_create(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<bool> {
        let k = base64_encode(key.as_bytes());
        let mut put = json!({"key": k, "value": base64_encode(value)});
        if let Some(id) = lease {
            put["lease"] = json!(id.to_string());
        }
        let body = json!({
            "compare": [{"key": k, "target": "VERSION", "result": "EQUAL", "version": "0"}],
            "success": [{"request_put": put}],
        });
        let v = self.etcd_call("/v3/kv/txn", &body)?;
        Ok(v.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    fn kube_call(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &[u8],
    ) -> Result<Value> {
        let resp = self.store_request(method, path, ctype, body)?;
        if !resp.ok() {
            bail!("{method} {path}: HTTP {}: {}", resp.status, resp.text());
        }
        resp.json()
    }

    /// A Node object (`None` when it does not exist).
    pub fn kube_node(&self, name: &str) -> Result<Option<Value>> {
        let resp = self.store_request("GET", &format!("/api/v1/nodes/{name}"), None, b"")?;
        match resp.status {
            404 => Ok(None),
            s if (200..300).contains(&s) => resp.json().map(Some),
            s => bail!("GET node {name}: HTTP {s}: {}", resp.text()),
        }
    }

    /// Every Node object.
    pub fn kube_nodes(&self) -> Result<Vec<Value>> {
        let v = self.kube_call("GET", "/api/v1/nodes", None, b"")?;
        Ok(v.get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Runs `kubectl ARGS` as an operator would, against the run's API server (the
    /// maintenance instance while the store is stopped): inside the control-plane namespace,
    /// with a kubeconfig in the run directory naming the server and `HOME` there too (kubectl's
    /// discovery cache; never the host's `~/.kube`). Returns stdout; fails with kubectl's
    /// stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let cp = self
            .control_plane()
            .filter(|cp| cp.kind == StoreKind::Kube)
            .ok_or_else(|| anyhow!("kubectl needs a kube run (this is {})", self.state.store))?;
        let addr = cp.access()?;
        let home = cp.dir.join("kubectl");
        std::fs::create_dir_all(&home).with_context(|| format!("mkdir {}", home.display()))?;
        // One file per address, written once: concurrent callers never see a partial file.
        let kubeconfig = home.join(format!("kubeconfig-{}", addr.port()));
        if !kubeconfig.exists() {
            let tmp = home.join(format!(
                "kubeconfig-{}.{}.tmp",
                addr.port(),
                std::process::id()
            ));
            std::fs::write(&tmp, kubeconfig_text(addr))
                .and_then(|()| std::fs::rename(&tmp, &kubeconfig))
                .with_context(|| format!("write {}", kubeconfig.display()))?;
        }
        let mut argv = vec!["kubectl"];
        argv.extend_from_slice(args);
        let mut c = cmd::ns_command(&cp.ns, &argv);
        c.env("KUBECONFIG", &kubeconfig).env("HOME", &home);
        let out = cmd::run_ok(&mut c, KUBECTL_LIMIT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs an operator's kubectl command line exactly as written, e.g. the fix that `flanneld
    /// doctor` prints: split on whitespace (no shell, no quoting); it must start with `kubectl`.
    pub fn kubectl_line(&self, line: &str) -> Result<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.split_first() {
            Some((&"kubectl", rest)) => self.kubectl(rest),
            _ => bail!("not a kubectl command: {line:?}"),
        }
    }

    /// Creates a Node with its pod CIDR (what kube-controller-manager's node IPAM does), with
    /// `kubectl create`.
    pub fn kube_create_node(&self, name: &str, pod_cidr: &Cidr, address: Ipv4Addr) -> Result<()> {
        self.kube_create_node_families(name, &(Some(*pod_cidr), None), address, None)
    }

    /// [`kube_create_node`](Self::kube_create_node) with one pod CIDR per family (`podCIDR`
    /// is the first, IPv4 in dual-stack, as kube-controller-manager sets it) and an
    /// InternalIP per underlay address.
    pub fn kube_create_node_families(
        &self,
        name: &str,
        cidrs: &Families,
        address: Ipv4Addr,
        address6: Option<std::net::Ipv6Addr>,
    ) -> Result<()> {
        let list: Vec<String> = cidrs
            .0
            .map(|c| c.trunc().to_string())
            .into_iter()
            .chain(cidrs.1.map(|c| c.trunc().to_string()))
            .collect();
        let mut addresses = vec![json!({"type": "InternalIP", "address": address.to_string()})];
        if let Some(a6) = address6 {
            addresses.push(json!({"type": "InternalIP", "address": a6.to_string()}));
        }
        addresses.push(json!({"type": "Hostname", "address": name}));
        let body = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": list.first(), "podCIDRs": list},
            "status": {"addresses": addresses},
        });
        let cp = self
            .control_plane()
            .ok_or_else(|| anyhow!("the {} store has no server", self.state.store))?;
        let file = cp.dir.join(format!("node-{name}.json"));
        std::fs::write(&file, body.to_string())
            .with_context(|| format!("write {}", file.display()))?;
        let path = file.display().to_string();
        self.kubectl(&["create", "-f", &path]).map(|_| ())
    }

    /// Sets (`Some`) or removes (`None`) an annotation on a Node with `kubectl annotate`.
    pub fn kube_annotate(&self, node: &str, key: &str, value: Option<&str>) -> Result<()> {
        let arg = match value {
            Some(v) => format!("{key}={v}"),
            None => format!("{key}-"),
        };
        self.kubectl(&["annotate", "--overwrite", "node", node, &arg])
            .map(|_| ())
    }

    /// Deletes a Node object with `kubectl delete` (missing is fine).
    pub fn kube_delete_node(&self, name: &str) -> Result<()> {
        self.kubectl(&["delete", "node", name, "--ignore-not-found"])
            .map(|_| ())
    }

    /// Every lease in the run's store, in flannel's shapes, sorted by subnet; unusable entries
    /// are reported in the second list instead of failing.
    pub fn leases(&self) -> Result<(Vec<Lease>, Vec<String>)> {
        match self.state.store {
            StoreKind::Dir => self.lease_dir().read_all(),
            StoreKind::Etcd => {
                let prefix = etcd_key("subnets/");
                let mut leases = Vec::new();
                let mut bad = Vec::new();
                for (key, value) in self.etcd_get_prefix(&prefix)? {
                    let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                    let parsed = net::parse_lease_key(&name).and_then(|(v4, v6)| {
                        let attrs: LeaseAttrs = serde_json::from_slice(&value)?;
                        Ok(Lease {
                            subnet: v4.map_or(lease::NO_V4, |s| s.trunc()),
                            subnet6: v6.map(|s| s.trunc()),
                            attrs,
                        })
                    });
                    match parsed {
                        Ok(l) => leases.push(l),
                        Err(e) => bad.push(format!("{key}: {e:#}")),
                    }
                }
                lease::sort_leases(&mut leases);
                Ok((leases, bad))
            }
            StoreKind::Kube => {
                let mut leases = Vec::new();
                let mut bad = Vec::new();
                for node in self.kube_nodes()? {
                    let name = node
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string();
                    match node_to_lease(&node) {
                        Ok(Some(l)) => leases.push(l),
                        Ok(None) => {}
                        Err(e) => bad.push(format!("node {name}: {e:#}")),
                    }
                }
                lease::sort_leases(&mut leases);
                Ok((leases, bad))
            }
        }
    }

    /// True when the store holds a lease for `subnet`.
    pub fn store_has_lease(&self, subnet: &Cidr) -> bool {
        self.leases()
            .is_ok_and(|(l, _)| l.iter().any(|l| l.subnet == subnet.trunc()))
    }

    /// True when the store holds a lease with exactly these subnets.
    pub fn store_has_families(&self, v4: Option<Cidr>, v6: Option<Cidr6>) -> bool {
        self.leases()
            .is_ok_and(|(l, _)| l.iter().any(|l| (l.subnet4(), l.subnet6) == (v4, v6)))
    }

    /// The pod CIDR the harness assigns to node index `index` in kube runs: the `index`-th
    /// candidate subnet of the net-conf (10.244.`index`.0/24 by default).
    pub fn pod_cidr_for(&self, index: u32) -> Result<Cidr> {
        let conf = self.net_conf()?;
        let cidr = conf.candidates().nth(index.saturating_sub(1) as usize);
        cidr.ok_or_else(|| anyhow!("net-conf {} has no subnet for node {index}", conf.network))
    }

    /// The pod CIDRs of node index `index` in kube runs, one per enabled family: the
    /// `index`-th candidate of each (fd42:244:0:`index`::/64 by default for IPv6).
    pub fn pod_cidrs_for(&self, index: u32) -> Result<Families> {
        let conf = self.net_conf()?;
        let v4 = if conf.enable_ipv4 {
            Some(self.pod_cidr_for(index)?)
        } else {
            None
        };
        let v6 = match &conf.ipv6 {
            Some(c6) => Some(
                c6.candidates()
                    .nth(index.saturating_sub(1) as usize)
                    .ok_or_else(|| {
                        anyhow!("net-conf {} has no subnet for node {index}", c6.network)
                    })?,
            ),
            None => None,
        };
        Ok((v4, v6))
    }

    /// Publishes a kernel-ref node's lease exactly as flannel would in this store and
    /// returns its subnet: dir and etcd allocate the first free subnet with an exclusive
    /// create (etcd: flannel's transaction, attached to a 24 h etcd lease); kube takes the
    /// Node's pod CIDR and writes flannel's annotations.
    pub(crate) fn publish_kernel_ref_lease(
        &mut self,
        node: &str,
        attrs: &LeaseAttrs,
    ) -> Result<Families> {
        let conf = self.net_conf()?;
        match self.state.store {
            StoreKind::Dir => self.lease_dir().acquire_families(&conf, attrs),
            StoreKind::Etcd => {
                let body = serde_json::to_vec(attrs)?;
                for _attempt in 0..10 {
                    let (existing, _) = self.leases()?;
                    let cand = lease::free_subnets(&conf, &existing)?;
                    let key = net::lease_key(cand.0.as_ref(), cand.1.as_ref());
                    let lease = self.etcd_grant(ETCD_LEASE_TTL_SECS)?;
                    if self.etcd_create(&etcd_lease_key_text(&key), &body, Some(lease))? {
                        return Ok(cand);
                    }
                }
                bail!("max retries reached trying to acquire a subnet")
            }
            StoreKind::Kube => {
                let n = self
                    .kube_node(node)?
                    .ok_or_else(|| anyhow!("Node {node} does not exist"))?;
                let cidrs: Vec<&str> = match n.pointer("/spec/podCIDRs").and_then(Value::as_array) {
                    Some(list) if !list.is_empty() => {
                        list.iter().filter_map(Value::as_str).collect()
                    }
                    _ => n
                        .pointer("/spec/podCIDR")
                        .and_then(Value::as_str)
                        .into_iter()
                        .collect(),
                };
                let v4 = cidrs.iter().find_map(|c| c.parse::<Cidr>().ok());
                let v6 = cidrs.iter().find_map(|c| c.parse::<Cidr6>().ok());
                if (v4.is_some(), v6.is_some()) != (conf.enable_ipv4, conf.ipv6.is_some()) {
                    bail!("node {node:?} pod cidrs {cidrs:?} do not match the net-conf's families");
                }
                self.kube_publish(node, &n, attrs)?;
                Ok((v4.map(|c| c.trunc()), v6.map(|c| c.trunc())))
            }
        }
    }

    /// flannel's AcquireLease annotations for `attrs` on Node `node` (compat §5.4): the
    /// `public-ip-overwrite` annotation, when set, replaces the published public IP.
    fn kube_publish(&self, node: &str, current: &Value, attrs: &LeaseAttrs) -> Result<()> {
        let mut public_ip = attrs.public_ip.clone();
        if let Some(ow) = node_annotation(current, "public-ip-overwrite").filter(|s| !s.is_empty())
        {
            crate::cluster::log(format!(
                "{node}: Overriding public ip with '{ow}' from node annotation '{}'",
                annotation("public-ip-overwrite")
            ));
            public_ip = ow.to_string();
        }
        let mut annotations = json!({
            annotation("backend-type"): attrs.backend_type,
            annotation("backend-data"): attrs.backend_data.to_string(),
            annotation("public-ip"): public_ip,
        });
        if let Some(ip6) = &attrs.public_ipv6 {
            let ow = node_annotation(current, "public-ipv6-overwrite").filter(|s| !s.is_empty());
            annotations[annotation("backend-v6-data")] = json!(attrs.backend_v6_data.to_string());
            annotations[annotation("public-ipv6")] = json!(ow.unwrap_or(ip6));
        }
        annotations[annotation("kube-subnet-manager")] = json!("true");
        let body = json!({"metadata": {"annotations": annotations}});
        self.kube_call(
            "PATCH",
            &format!("/api/v1/nodes/{node}/status"),
            Some("application/strategic-merge-patch+json"),
            body.to_string().as_bytes(),
        )
        .map(|_| ())
    }

    /// What a restarted flannel does on a kernel-ref node: publishes its lease again (same
    /// subnet and VTEP MAC; in kube runs this applies a changed `public-ip-overwrite`), then
    /// re-syncs the kernel-ref nodes.
    pub fn republish_kernel_ref(&mut self, node: &str) -> Result<()> {
        let n = self
            .node(node)
            .cloned()
            .ok_or_else(|| anyhow!("no node {node:?}"))?;
        if n.kind != NodeKind::KernelRef {
            bail!("{} is not a kernel-ref node", n.name);
        }
        if n.subnet.is_none() && n.subnet6.is_none() {
            bail!("{} has no lease yet", n.name);
        }
        let subnet = net::lease_key(n.subnet.as_ref(), n.subnet6.as_ref());
        let attrs = self.kernel_ref_attrs(&n)?;
        match self.state.store {
            StoreKind::Dir => {
                let body = serde_json::to_vec(&attrs)?;
                lease::write_atomic(&self.lease_dir().key_path(&subnet), &body)?;
            }
            StoreKind::Etcd => {
                let body = serde_json::to_vec(&attrs)?;
                let id = self.etcd_grant(ETCD_LEASE_TTL_SECS)?;
                self.etcd_put(&etcd_lease_key_text(&subnet), &body, Some(id))?;
            }
            StoreKind::Kube => {
                let current = self
                    .kube_node(&n.name)?
                    .ok_or_else(|| anyhow!("Node {} does not exist", n.name))?;
                self.kube_publish(&n.name, &current, &attrs)?;
            }
        }
        crate::cluster::log(format!("{}: kernel-ref lease {subnet} republished", n.name));
        self.sync_kernel_refs().map(|_| ())
    }

    /// Restarts a node's overlay provider: flanneld (by PID) or, on a kernel-ref node, what a
    /// restarted flannel does ([`republish_kernel_ref`](Self::republish_kernel_ref)).
    pub fn restart_node(&mut self, node: &str) -> Result<()> {
        match self.node(node).map(|n| n.kind) {
            Some(NodeKind::KernelRef) => self.republish_kernel_ref(node),
            Some(_) => self.restart_flanneld(node),
            None => bail!("no node {node:?} in run {}", self.state.prefix),
        }
    }

    /// Removes what the store holds for a removed node: its lease file or key if it still
    /// names the node's address, or its Node object.
    pub(crate) fn withdraw_node(&mut self, node: &NodeState) -> Result<()> {
        if node.subnet.is_none() && node.subnet6.is_none() {
            if self.state.store == StoreKind::Kube {
                self.kube_delete_node(&node.name)?;
            }
            return Ok(());
        }
        let mut published: Vec<String> = [Some(node.underlay_ip), node.public_ip]
            .into_iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect();
        published.extend(node.underlay_ip6.map(|ip| ip.to_string()));
        match self.state.store {
            StoreKind::Dir | StoreKind::Etcd => {
                let (leases, _) = self.leases()?;
                let ours = leases.iter().find(|l| {
                    (l.subnet4(), l.subnet6) == (node.subnet, node.subnet6)
                        && (published.contains(&l.attrs.public_ip)
                            || l.attrs
                                .public_ipv6
                                .as_ref()
                                .is_some_and(|p| published.contains(p)))
                });
                if let Some(l) = ours {
                    if self.state.store == StoreKind::Dir {
                        self.lease_dir().remove_key(&l.key())?;
                    } else {
                        self.etcd_delete(&etcd_lease_key_text(&l.key()))?;
                    }
                }
                Ok(())
            }
            StoreKind::Kube => self.kube_delete_node(&node.name),
        }
    }

    /// The flanneld arguments that select this run's store.
    pub(crate) fn store_args(&self) -> Vec<String> {
        match (self.state.store, self.control_plane()) {
            (StoreKind::Etcd, Some(cp)) => vec!["--etcd-endpoints".into(), cp.url()],
            (StoreKind::Kube, Some(cp)) => vec![
                "--kube-subnet-mgr".into(),
                "--kube-api-url".into(),
                cp.url(),
                "--net-config-path".into(),
                self.net_conf_path().to_string_lossy().into_owned(),
            ],
            _ => vec![
                "--lease-dir".into(),
                self.lease_dir().root().to_string_lossy().into_owned(),
            ],
        }
    }
}

/// True when the store at `addr` (inside `ns`) answers its health check.
fn store_healthy(ns: &str, kind: StoreKind, addr: SocketAddr) -> bool {
    let path = match kind {
        StoreKind::Etcd => "/health",
        _ => "/healthz",
    };
    match http::request(ns, addr, "GET", path, None, b"", Duration::from_secs(2)) {
        Ok(r) if kind == StoreKind::Etcd => {
            r.ok() && r.text().replace(' ', "").contains("\"health\":\"true\"")
        }
        Ok(r) => r.ok(),
        Err(_) => false,
    }
}

/// A kubeconfig naming the API server at `addr` (plain HTTP, no credentials).
fn kubeconfig_text(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: flannel-rs\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: flannel-rs\n  context:\n    cluster: flannel-rs\n    user: operator\n\
         current-context: flannel-rs\nusers:\n- name: operator\n  user: {{}}\n"
    )
}
