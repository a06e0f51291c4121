//! Nodes: adding and removing them, kernel-ref programming, and the flanneld processes (command line, start, stop, hand-off, kill, restart), net-conf changes and a device's ethtool features.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::binaries::resolve_flanneld;
use crate::cmd::{self, ProcRecord};
use crate::kernel_ref;
use crate::lease::{self, LeaseAttrs, NetConf, SubnetEnv, VxlanData};
use crate::net::{self, Cidr, Cidr6};
use crate::store::{etcd_key, StoreKind};
use crate::sys::{self, log};

use super::namespaces::delete_namespace;
use super::topology::site_gateway;
use super::{Cluster, NodeKind, NodeSpec, NodeState, MAX_NODES, MAX_SITE_NODES, SITES};

fn file_identity(path: &Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

impl Cluster {
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
        self.wait_ipv6_settled()?;
        Ok(self.state.nodes[i].name.clone())
    }

    pub(super) fn create_node(&mut self, spec: &NodeSpec, site: Option<u8>) -> Result<usize> {
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
            underlay_ip6: self
                .state
                .ip_family
                .has_v6()
                .then(|| net::underlay_ip6(index)),
            subnet6: None,
            vtep_mac6: None,
            programmed6: Vec::new(),
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
        if let Some(ip6) = self.state.nodes[pos].underlay_ip6 {
            // flannel's rule: the IPv6 address on the same interface as the IPv4 one (no DAD,
            // so it is usable at once); IPv6 forwarding on, as on a Kubernetes node.
            let a = format!("{ip6}/64");
            cmd::ip(&["-n", &ns, "addr", "add", &a, "dev", "eth0", "nodad"])?;
            cmd::sysctl(&ns, "net.ipv6.conf.all.forwarding", "1")?;
        }
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
            let cidrs = self.pod_cidrs_for(index)?;
            let ip6 = self.state.nodes[pos].underlay_ip6;
            self.kube_create_node_families(&name, &cidrs, underlay_ip, ip6)?;
        }

        match spec.kind {
            NodeKind::KernelRef => self.setup_kernel_ref(pos)?,
            _ => {
                self.start_flanneld(&name)?;
            }
        }
        Ok(pos)
    }

    /// The lease attributes a kernel-ref node publishes (compat §7.2): per enabled family
    /// its detected (eth0) address and vxlan data with that family's VTEP MAC (PublicIP
    /// 0.0.0.0 and no BackendData in IPv6-only runs).
    pub(crate) fn kernel_ref_attrs(&self, node: &NodeState) -> Result<LeaseAttrs> {
        let conf = self.net_conf()?;
        let data = |mac: &Option<String>, what: &str| -> Result<serde_json::Value> {
            let mac = mac
                .clone()
                .ok_or_else(|| anyhow!("{} has no {what} VTEP MAC", node.name))?;
            Ok(serde_json::to_value(VxlanData {
                vni: conf.vni,
                vtep_mac: mac,
            })?)
        };
        let v6 = conf.ipv6.is_some();
        Ok(LeaseAttrs {
            public_ip: if conf.enable_ipv4 {
                node.underlay_ip.to_string()
            } else {
                "0.0.0.0".into()
            },
            public_ipv6: if v6 {
                let ip6 = node
                    .underlay_ip6
                    .ok_or_else(|| anyhow!("{} has no IPv6 underlay address", node.name))?;
                Some(ip6.to_string())
            } else {
                None
            },
            backend_type: "vxlan".into(),
            backend_data: if conf.enable_ipv4 {
                data(&node.vtep_mac, "IPv4")?
            } else {
                serde_json::Value::Null
            },
            backend_v6_data: if v6 {
                data(&node.vtep_mac6, "IPv6")?
            } else {
                serde_json::Value::Null
            },
        })
    }

    fn setup_kernel_ref(&mut self, pos: usize) -> Result<()> {
        let conf = self.net_conf()?;
        if conf.enable_ipv4 {
            self.state.nodes[pos].vtep_mac = Some(net::random_mac()?);
        }
        if conf.ipv6.is_some() {
            self.state.nodes[pos].vtep_mac6 = Some(net::random_mac()?);
        }
        let node = &self.state.nodes[pos];
        let (ns, name, ip, ip6) = (
            node.ns.clone(),
            node.name.clone(),
            node.underlay_ip,
            node.underlay_ip6,
        );
        let attrs = self.kernel_ref_attrs(node)?;
        let (subnet, subnet6) = self.publish_kernel_ref_lease(&name, &attrs)?;
        let mtu = conf.mtu.unwrap_or(1500).saturating_sub(50);
        {
            let node = &mut self.state.nodes[pos];
            node.subnet = subnet;
            node.subnet6 = subnet6;
            node.mtu = mtu;
        }
        let first = |c: &Cidr| -> Result<Cidr> {
            let a = c.nth(1).ok_or_else(|| anyhow!("subnet {c} too small"))?;
            Cidr::new(a, c.len)
        };
        let first6 = |c: &Cidr6| -> Result<Cidr6> {
            let a = c.nth(1).ok_or_else(|| anyhow!("subnet {c} too small"))?;
            Cidr6::new(a, c.len)
        };
        let dir = self.node_dir(&name);
        let node = &self.state.nodes[pos];
        if let (Some(subnet), Some(mac)) = (subnet, &node.vtep_mac) {
            kernel_ref::create_vtep(&ns, &conf, mac, ip, &subnet, mtu)?;
            kernel_ref::install_rules(
                &ns,
                &conf.network,
                &subnet,
                self.state.ip_masq,
                &dir.join("iptables.rules"),
            )?;
        }
        if let (Some(subnet6), Some(mac6), Some(ip6), Some(c6)) =
            (subnet6, &node.vtep_mac6, ip6, &conf.ipv6)
        {
            kernel_ref::create_vtep6(&ns, &conf, mac6, ip6, &subnet6, mtu)?;
            kernel_ref::install_rules6(
                &ns,
                &c6.network,
                &subnet6,
                self.state.ip_masq,
                &dir.join("ip6tables.rules"),
            )?;
        }
        // flannel reads its device back: FLANNEL_MTU is the IPv4 device's MTU, or in IPv6-only
        // runs the IPv6 device's, which the kernel clamped for the larger IPv6 headroom.
        let env_mtu = match subnet {
            Some(_) => mtu,
            None => kernel_ref::device_mtu(&ns, &kernel_ref::device_name6(conf.vni))?,
        };
        self.state.nodes[pos].mtu = env_mtu;
        let node = &self.state.nodes[pos];
        SubnetEnv {
            network: subnet.map(|_| conf.network),
            subnet: subnet.as_ref().map(first).transpose()?,
            ipv6_network: conf.ipv6.as_ref().map(|c| c.network),
            ipv6_subnet: subnet6.as_ref().map(first6).transpose()?,
            mtu: env_mtu,
            ipmasq: self.state.ip_masq,
        }
        .write(&self.subnet_env_path(&name))?;
        log(format!(
            "{name}: kernel-ref {} vtep {}{}",
            subnet.map_or_else(|| "-".into(), |s| s.to_string()),
            node.vtep_mac.as_deref().unwrap_or("-"),
            match (subnet6, &node.vtep_mac6) {
                (Some(s), Some(m)) => format!(", {s} vtep {m}"),
                _ => String::new(),
            }
        ));
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
        let subnet = ready.subnet.map(|s| s.trunc());
        let subnet6 = ready.ipv6_subnet.map(|s| s.trunc());
        let fam = self.state.ip_family;
        if subnet.is_some() != fam.has_v4() || subnet6.is_some() != fam.has_v6() {
            cmd::stop_process(&rec, Some(child));
            self.save()?;
            bail!(
                "flanneld on {name} wrote {} without the subnets of --ip-family {fam}",
                env_path.display()
            );
        }
        let lease_text = net::lease_key(subnet.as_ref(), subnet6.as_ref());
        let n = &mut self.state.nodes[pos];
        if (n.subnet.is_some() || n.subnet6.is_some()) && (n.subnet, n.subnet6) != (subnet, subnet6)
        {
            log(format!(
                "{name}: flanneld changed the lease to {lease_text}; pods keep old addresses"
            ));
        }
        n.subnet = subnet;
        n.subnet6 = subnet6;
        n.mtu = ready.mtu;
        n.flanneld = Some(rec.clone());
        self.children.insert(rec.pid, child);
        log(format!(
            "{name}: flanneld ready, lease {lease_text}, mtu {}",
            ready.mtu
        ));
        // flannel publishes its lease before writing subnet.env; give a daemon a moment, then
        // say loudly if kernel-ref nodes will never learn about this node.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut published = self.store_has_families(subnet, subnet6);
        while !published && Instant::now() < deadline && !sys::interrupted() {
            std::thread::sleep(Duration::from_millis(25));
            published = self.store_has_families(subnet, subnet6);
        }
        if !published {
            log(format!(
                "{name}: WARNING: no lease for {lease_text} in the {} store after subnet.env; other nodes cannot learn this node",
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

    /// Recomputes every kernel-ref node's neighbour/FDB/route entries from the run's store
    /// (lease directory, etcd or Node objects) and applies the differences. Returns how many peer operations were applied.
    pub fn sync_kernel_refs(&mut self) -> Result<usize> {
        if !self
            .state
            .nodes
            .iter()
            .any(|n| n.kind == NodeKind::KernelRef && (n.subnet.is_some() || n.subnet6.is_some()))
        {
            return Ok(0);
        }
        let (leases, bad) = self.leases()?;
        for b in &bad {
            log(format!("ignoring lease file {b}"));
        }
        let vni = self.net_conf()?.vni;
        let (dev, dev6) = (kernel_ref::device_name(vni), kernel_ref::device_name6(vni));
        let mut applied = 0;
        for pos in 0..self.state.nodes.len() {
            let node = &mut self.state.nodes[pos];
            if node.kind != NodeKind::KernelRef {
                continue;
            }
            let ns = node.ns.clone();
            let mut res = Ok(0);
            if let Some(own) = node.subnet {
                let ops = kernel_ref::plan(&own, &leases, &node.programmed);
                res = kernel_ref::reconcile(&ns, &dev, ops, &mut node.programmed);
                node.programmed.sort_by_key(|p| p.subnet);
            }
            if let (Ok(n4), Some(own6)) = (&res, node.subnet6) {
                let n4 = *n4;
                let ops = kernel_ref::plan6(&own6, &leases, &node.programmed6);
                res = kernel_ref::reconcile(&ns, &dev6, ops, &mut node.programmed6).map(|n| n + n4);
                node.programmed6.sort_by_key(|p| p.subnet);
            }
            match res {
                Ok(n) => applied += n,
                Err(e) => {
                    self.save()?;
                    return Err(e);
                }
            }
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

    /// Replaces the network config in the run's store (lease directory `config`, etcd
    /// `/coreos.com/network/config`, or the kube `net-conf.json`) and in the run state.
    /// Daemons read it when they start: restart them to apply it. kernel-ref nodes are not
    /// reprogrammed.
    pub fn set_net_conf(&mut self, json: &str) -> Result<()> {
        NetConf::parse(json)?;
        match self.state.store {
            StoreKind::Dir => self.lease_dir().init(json)?,
            StoreKind::Etcd => self.etcd_put(&etcd_key("config"), json.as_bytes(), None)?,
            StoreKind::Kube => lease::write_atomic(&self.net_conf_path(), json.as_bytes())?,
        }
        self.state.net_conf = json.to_string();
        self.save()
    }

    /// Restarts every node's flanneld, one after the other (like restarting the DaemonSet).
    pub fn restart_all_flanneld(&mut self) -> Result<()> {
        let names: Vec<String> = self
            .nodes()
            .iter()
            .filter(|n| n.kind.runs_flanneld())
            .map(|n| n.name.clone())
            .collect();
        for n in names {
            self.restart_flanneld(&n)?;
        }
        Ok(())
    }

    /// `tx-checksum-ip-generic` of `dev` in `node` (`ethtool -k`): Some(true) when on.
    pub fn tx_checksum_ip_generic(&self, node: &str, dev: &str) -> Result<Option<bool>> {
        let out = self.exec_ok(node, &["ethtool", "-k", dev])?;
        Ok(parse_ethtool_feature(
            &String::from_utf8_lossy(&out.stdout),
            "tx-checksum-ip-generic",
        ))
    }
}

/// The value of one feature in `ethtool -k` output (`name: on [fixed]`).
pub fn parse_ethtool_feature(text: &str, name: &str) -> Option<bool> {
    text.lines().find_map(|l| {
        let (k, v) = l.trim().split_once(':')?;
        (k.trim() == name).then(|| v.split_whitespace().next() == Some("on"))
    })
}
