//! Pods: made by the CNI plugins (the runtime's part of [`crate::cni`]) or by hand like them, and their responders.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cmd;
use crate::lease::SubnetEnv;
use crate::net;
use crate::sys::{self, log};

use crate::cni::{
    exec_plugin, manifest_conflist, parse_conflist, plugin_config, result_ipv4, result_ipv6,
    system_plugin_dir, Cached, CniLayout, Invocation, PodSetup, PortMapping, CONFLIST_NAME,
    POD_IFNAME, SYSTEM_PLUGINS,
};

use super::{Cluster, PodState, MAX_PODS};

/// The sandbox id a pod of this run gets (64 hex digits, like a CRI sandbox id).
fn container_id(prefix: &str, pod: &str) -> Result<String> {
    let salt: [u8; 8] = net::random_bytes()?;
    let mut h = Sha256::new();
    h.update(prefix.as_bytes());
    h.update(pod.as_bytes());
    h.update(salt);
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// How long `up` and `add-node` wait for IPv6 duplicate address detection to finish.
const DAD_LIMIT: Duration = Duration::from_secs(10);

impl Cluster {
    /// Waits (at most [`DAD_LIMIT`]) until no IPv6 address in a node's or pod's namespace is
    /// still tentative. The CNI bridge plugin waits for the pod's own address only: the
    /// gateway address it puts on a new `cni0` stays tentative for a second or more, and
    /// until then that node's pods cannot resolve their IPv6 gateway, so a `check` right
    /// after `up` failed their first IPv6 probes. Names what is still tentative at the limit.
    pub(super) fn wait_ipv6_settled(&self) -> Result<()> {
        if !self.state.ip_family.has_v6() {
            return Ok(());
        }
        let deadline = Instant::now() + DAD_LIMIT;
        loop {
            let mut tentative = Vec::new();
            let spaces = self
                .state
                .nodes
                .iter()
                .flat_map(|n| std::iter::once(&n.ns).chain(n.pods.iter().map(|p| &p.ns)));
            for ns in spaces {
                let out = cmd::run_ok(
                    std::process::Command::new("ip").args([
                        "-n",
                        ns,
                        "-6",
                        "addr",
                        "show",
                        "tentative",
                    ]),
                    cmd::SHORT,
                )?;
                if !out.stdout.is_empty() {
                    tentative.push(ns.as_str());
                }
            }
            if tentative.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                log(format!(
                    "IPv6 addresses still tentative after {DAD_LIMIT:?} in {}",
                    tentative.join(", ")
                ));
                return Ok(());
            }
            sys::check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn create_pods(&mut self, pos: usize) -> Result<()> {
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
        let subnet = env
            .subnet
            .ok_or_else(|| anyhow!("{}: hand-wired pods need FLANNEL_SUBNET", node.name))?;
        let gw = subnet.addr;
        let len = subnet.len;
        let mtu = env.mtu.to_string();
        let ns = node.ns.as_str();
        if !net::pod_range().contains_cidr(&subnet.trunc()) {
            bail!(
                "{}: FLANNEL_SUBNET {} is outside {}; refusing to address pods from it",
                node.name,
                subnet,
                net::pod_range()
            );
        }
        // What the bridge plugin does on the first ADD: cni0 with the gateway address and MTU.
        cmd::ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
        cmd::ip(&["-n", ns, "link", "set", "cni0", "mtu", &mtu])?;
        cmd::ip(&["-n", ns, "addr", "add", &subnet.to_string(), "dev", "cni0"])?;
        cmd::ip(&["-n", ns, "link", "set", "cni0", "up"])?;
        for j in 1..=count {
            sys::check_interrupted()?;
            // Pod j gets host address j+1 (the gateway is .1); never the broadcast address.
            let ip = Some(j as u64 + 1)
                .filter(|h| *h + 1 < subnet.size())
                .and_then(|h| subnet.nth(h))
                .ok_or_else(|| {
                    anyhow!("{}: subnet {} has no room for pod {j}", node.name, subnet)
                })?;
            let pname = format!("{}p{j}", node.name);
            let pns = format!("{}-{pname}", self.state.prefix);
            let veth = format!("veth{j}");
            cmd::ip(&["netns", "add", &pns])?;
            self.state.nodes[pos].pods.push(PodState {
                name: pname.clone(),
                ns: pns.clone(),
                ip,
                ip6: None,
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
        let mut argv = vec![bin_s.as_str(), "serve"];
        if self.state.ip_family.has_v6() {
            argv.push("--ipv6");
        }
        let (mut child, rec) =
            cmd::spawn_in_ns(&pod.ns, &argv, &log_path, &format!("serve {}", pod.name))?;
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

    /// A node's CNI layout, created the first time: `bin/` links the system plugins
    /// ([`system_plugin_dir`]) and `flannel` to the harness binary; `net.d/` gets the
    /// manifest's conflist as `10-flannel.conflist`. Tests break it to exercise doctor.
    pub fn cni_layout(&self, node: &str) -> Result<CniLayout> {
        let base = self.node_dir(node).join("cni");
        let l = CniLayout {
            bin_dir: base.join("bin"),
            conf_dir: base.join("net.d"),
            flannel_dir: base.join("flannel"),
            ipam_dir: base.join("ipam"),
            results_dir: base.join("results"),
            subnet_file: self.subnet_env_path(node),
        };
        if base.exists() {
            return Ok(l);
        }
        let sys_dir = system_plugin_dir();
        for p in SYSTEM_PLUGINS {
            crate::cluster::check_executable(
                &sys_dir.join(p),
                &format!("CNI plugin {p}"),
                "Install Debian's containernetworking-plugins (scripts/install-deps.sh) or set \
                 NETNS_HARNESS_CNI_PLUGINS to a directory holding bridge, host-local, portmap \
                 and loopback.",
            )?;
        }
        let harness = match self.harness_bin() {
            Some(p) => p.to_path_buf(),
            None => crate::cluster::resolve_harness_bin(None)?,
        };
        let conflist = manifest_conflist()?;
        let tmp = base.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let tl = ["bin", "net.d", "flannel", "ipam", "results"];
        for d in tl {
            std::fs::create_dir_all(tmp.join(d))?;
        }
        for p in SYSTEM_PLUGINS {
            std::os::unix::fs::symlink(sys_dir.join(p), tmp.join("bin").join(p))?;
        }
        std::os::unix::fs::symlink(&harness, tmp.join("bin").join("flannel"))?;
        std::fs::write(tmp.join("net.d").join(CONFLIST_NAME), conflist)?;
        std::fs::rename(&tmp, &base)
            .with_context(|| format!("rename {} to {}", tmp.display(), base.display()))?;
        Ok(l)
    }

    /// The config list the runtime uses on `node` (libcni: the lexically first `.conf`,
    /// `.conflist` or `.json` file of the config directory), with the flannel entry pointed
    /// at the node's subnet.env and the run's data directories.
    fn node_conflist(&self, l: &CniLayout) -> Result<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&l.conf_dir)
            .with_context(|| format!("read {}", l.conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
            })
            .collect();
        files.sort();
        let first = files
            .first()
            .ok_or_else(|| anyhow!("no CNI config in {}", l.conf_dir.display()))?;
        let text = std::fs::read_to_string(first)?;
        let mut list = parse_conflist(&text).with_context(|| format!("{}", first.display()))?;
        if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
            for p in plugins.iter_mut() {
                if p.get("type").and_then(Value::as_str) != Some("flannel") {
                    continue;
                }
                let Some(o) = p.as_object_mut() else { continue };
                o.insert("subnetFile".into(), json!(l.subnet_file));
                o.insert("dataDir".into(), json!(l.flannel_dir));
                let ipam = o.entry("ipam").or_insert_with(|| json!({}));
                if let Some(i) = ipam.as_object_mut() {
                    i.insert("dataDir".into(), json!(l.ipam_dir));
                }
            }
        }
        Ok(list)
    }

    /// Runs a whole list (ADD: in order, each with the previous result; DEL: in reverse).
    fn run_chain(
        &self,
        node_ns: &str,
        list: &Value,
        inv: &Invocation,
        ports: &[PortMapping],
    ) -> Result<Value> {
        let plugins = list
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("CNI config without plugins"))?;
        let mut prev: Option<Value> = None;
        let mut errors = Vec::new();
        if inv.command == "DEL" {
            for entry in plugins.iter().rev() {
                let conf = plugin_config(list, entry, None, ports)?;
                // libcni goes on with the next plugin and reports the first error.
                if let Err(e) = exec_plugin(node_ns, inv, &conf) {
                    errors.push(format!("{e:#}"));
                }
            }
            if !errors.is_empty() {
                bail!("{}", errors.join("; "));
            }
            return Ok(Value::Null);
        }
        for entry in plugins {
            let conf = plugin_config(list, entry, prev.as_ref(), ports)?;
            let r = exec_plugin(node_ns, inv, &conf)?;
            prev = Some(r);
        }
        prev.ok_or_else(|| anyhow!("CNI config has no plugins"))
    }

    /// The runtime's loopback set-up (containerd runs the `loopback` plugin for `lo`).
    fn loopback(&self, node_ns: &str, l: &CniLayout, cmd_: &'static str, inv: &Invocation) {
        let conf = json!({"cniVersion": "0.3.1", "name": "cni-loopback", "type": "loopback"});
        let lo = Invocation {
            command: cmd_,
            ifname: "lo".into(),
            path: l.bin_dir.to_string_lossy().into_owned(),
            ..inv.clone()
        };
        if let Err(e) = exec_plugin(node_ns, &lo, &conf) {
            log(format!("{}: loopback {cmd_}: {e:#}", inv.container_id));
        }
    }

    pub(crate) fn create_pods_cni(&mut self, pos: usize) -> Result<()> {
        let count = self.state.pods_per_node;
        if count == 0 || !self.state.nodes[pos].pods.is_empty() {
            return Ok(());
        }
        let node = self.state.nodes[pos].name.clone();
        for _ in 0..count {
            sys::check_interrupted()?;
            self.add_pod(&node, &[])?;
        }
        Ok(())
    }

    /// Creates one pod on `node` the way a kubelet does with kube-flannel.yml's CNI config:
    /// a fresh network namespace, `loopback`, then the conflist's chain (flannel → bridge +
    /// host-local, portmap with `ports` as hostPorts). The pod's address is host-local's
    /// choice. Starts its responders when the run has them. Returns the pod's short name.
    pub fn add_pod(&mut self, node: &str, ports: &[PortMapping]) -> Result<String> {
        let pos = self
            .state
            .nodes
            .iter()
            .position(|n| n.name == node || n.ns == node)
            .ok_or_else(|| anyhow!("no node {node:?} in run {}", self.state.prefix))?;
        let n = self.state.nodes[pos].clone();
        if n.pods.len() >= MAX_PODS {
            bail!("at most {MAX_PODS} pods per node");
        }
        let env = crate::lease::SubnetEnv::read(&self.subnet_env_path(&n.name))?;
        if let Some(s) = env
            .subnet
            .filter(|s| !net::pod_range().contains_cidr(&s.trunc()))
        {
            bail!(
                "{}: FLANNEL_SUBNET {s} is outside {}; refusing to address pods from it",
                n.name,
                net::pod_range()
            );
        }
        if let Some(s) = env
            .ipv6_subnet
            .filter(|s| !net::pod_range6().contains_cidr(&s.trunc()))
        {
            bail!(
                "{}: FLANNEL_IPV6_SUBNET {s} is outside {}; refusing to address pods from it",
                n.name,
                net::pod_range6()
            );
        }
        let l = self.cni_layout(&n.name)?;
        let list = self.node_conflist(&l)?;
        let j = (1..)
            .find(|j| !n.pods.iter().any(|p| p.name == format!("{}p{j}", n.name)))
            .unwrap_or(1);
        let pname = format!("{}p{j}", n.name);
        let pns = format!("{}-{pname}", self.state.prefix);
        let cid = container_id(&self.state.prefix, &pname)?;
        let inv = Invocation {
            command: "ADD",
            container_id: cid.clone(),
            netns: Path::new("/run/netns").join(&pns),
            ifname: POD_IFNAME.into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pname};K8S_POD_INFRA_CONTAINER_ID={cid}"
            ),
            path: l.bin_dir.to_string_lossy().into_owned(),
        };
        cmd::ip(&["netns", "add", &pns])?;
        self.loopback(&n.ns, &l, "ADD", &inv);
        let result = match self.run_chain(&n.ns, &list, &inv, ports) {
            Ok(r) => r,
            Err(e) => {
                // What a kubelet does after a failed ADD: DEL, then drop the sandbox.
                let del = Invocation {
                    command: "DEL",
                    ..inv.clone()
                };
                let _ = self.run_chain(&n.ns, &list, &del, ports);
                let _ = cmd::ip(&["netns", "del", &pns]);
                return Err(e.context(format!("{}: CNI ADD of pod {pname}", n.name)));
            }
        };
        let cached = Cached {
            conflist: list,
            ports: ports.to_vec(),
            result: result.clone(),
            netns: inv.netns.clone(),
            args: inv.args.clone(),
        };
        crate::lease::write_atomic(
            &l.results_dir.join(format!("cbr0-{cid}-{POD_IFNAME}")),
            &serde_json::to_vec_pretty(&cached)?,
        )?;
        let mut ip = std::net::Ipv4Addr::UNSPECIFIED;
        let mut addrs = Vec::new();
        if let Some(subnet) = env.subnet.map(|s| s.trunc()) {
            let (a, len) = result_ipv4(&result)
                .ok_or_else(|| anyhow!("{pname}: CNI result has no IPv4 address: {result}"))?;
            if !subnet.contains(a) || len != subnet.len {
                bail!("{pname}: CNI gave {a}/{len}, outside the node's subnet {subnet}");
            }
            ip = a;
            addrs.push(format!("{a}/{len}"));
        }
        let mut ip6 = None;
        if let Some(subnet) = env.ipv6_subnet.map(|s| s.trunc()) {
            let (a, len) = result_ipv6(&result)
                .ok_or_else(|| anyhow!("{pname}: CNI result has no IPv6 address: {result}"))?;
            if !subnet.contains(a) || len != subnet.len {
                bail!("{pname}: CNI gave {a}/{len}, outside the node's IPv6 subnet {subnet}");
            }
            ip6 = Some(a);
            addrs.push(format!("{a}/{len}"));
        }
        self.state.nodes[pos].pods.push(PodState {
            name: pname.clone(),
            ns: pns,
            ip,
            ip6,
            serve: None,
            container_id: Some(cid),
            ports: ports.to_vec(),
        });
        self.save()?;
        if self.state.responders {
            let k = self.state.nodes[pos].pods.len() - 1;
            self.start_responder(pos, k)?;
            self.save()?;
        }
        log(format!(
            "{}: pod {pname} {} by CNI{}",
            n.name,
            addrs.join(" "),
            if ports.is_empty() {
                String::new()
            } else {
                format!(" with hostPorts {ports:?}")
            }
        ));
        Ok(pname)
    }

    /// Deletes a pod as a kubelet does: stops its responders, runs the chain's DEL (reverse
    /// order: portmap, then flannel → bridge + host-local) and `loopback` DEL, then removes
    /// its namespace. Hand-wired pods just lose their namespace (the veth goes with it).
    pub fn delete_pod(&mut self, pod: &str) -> Result<()> {
        let (pos, k) = self
            .state
            .nodes
            .iter()
            .enumerate()
            .find_map(|(i, n)| {
                n.pods
                    .iter()
                    .position(|p| p.name == pod || p.ns == pod)
                    .map(|k| (i, k))
            })
            .ok_or_else(|| anyhow!("no pod {pod:?} in run {}", self.state.prefix))?;
        let node = self.state.nodes[pos].clone();
        let p = node.pods[k].clone();
        if let Some(rec) = &p.serve {
            cmd::stop_process(rec, self.children.remove(&rec.pid));
        }
        let mut errors = Vec::new();
        if let Some(cid) = &p.container_id {
            let l = self.cni_layout(&node.name)?;
            let cache_path = l.results_dir.join(format!("cbr0-{cid}-{POD_IFNAME}"));
            let cached: Cached = serde_json::from_slice(
                &std::fs::read(&cache_path)
                    .with_context(|| format!("read {}", cache_path.display()))?,
            )?;
            let inv = Invocation {
                command: "DEL",
                container_id: cid.clone(),
                netns: cached.netns.clone(),
                ifname: POD_IFNAME.into(),
                args: cached.args.clone(),
                path: l.bin_dir.to_string_lossy().into_owned(),
            };
            match self.run_chain(&node.ns, &cached.conflist, &inv, &cached.ports) {
                Ok(_) => {
                    let _ = std::fs::remove_file(&cache_path);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
            self.loopback(&node.ns, &l, "DEL", &inv);
        }
        if let Err(e) = cmd::ip(&["netns", "del", &p.ns]) {
            errors.push(format!("{e:#}"));
        }
        self.state.nodes[pos].pods.remove(k);
        self.save()?;
        if errors.is_empty() {
            log(format!("{}: pod {} deleted", node.name, p.name));
            Ok(())
        } else {
            bail!("deleting pod {}: {}", p.name, errors.join("; "))
        }
    }
}
