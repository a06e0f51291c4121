//! kube-proxy emulation (iptables mode) in a node's nat table, IPv4 (iptables) and IPv6 (ip6tables): ClusterIPs, the 0x4000 mark, MASQUERADE --random-fully, and counters for the masqueraded and marked VXLAN packets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{anyhow, bail, Result};

use crate::check::Family;
use crate::cmd;
use crate::proto;

use super::Cluster;

/// kube-proxy's masquerade mark (KUBE-MARK-MASQ).
pub const KUBE_MARK: &str = "0x4000/0x4000";
/// Comment of the rule counting VXLAN packets that carry kube-proxy's mark.
const MARKED_VXLAN: &str = "netns-harness: VXLAN packets with mark 0x4000";

impl Cluster {
    /// Emulates a ClusterIP the way kube-proxy (iptables mode) handles traffic from the node
    /// itself: in `node`'s nat table, OUTPUT marks packets to `vip:vip_port` that do not come
    /// from the cluster network for masquerading (KUBE-MARK-MASQ) and DNATs them to `pod`'s
    /// responder (`proto_name` `tcp` or `udp`); POSTROUTING masquerades marked packets
    /// (KUBE-POSTROUTING), so the pod answers the node's overlay address. Adds a host route
    /// for the VIP via `eth0` when the node has no route to it (flat runs have no default
    /// route) so the packet reaches OUTPUT; it never leaves untranslated.
    pub fn add_cluster_ip(
        &self,
        node: &str,
        vip: Ipv4Addr,
        vip_port: u16,
        pod: &str,
        proto_name: &str,
    ) -> anyhow::Result<()> {
        let n = self
            .node(node)
            .ok_or_else(|| anyhow::anyhow!("no node {node:?}"))?;
        let dst = self
            .pod_ip(pod)
            .ok_or_else(|| anyhow::anyhow!("no pod {pod:?}"))?;
        let port = match proto_name {
            "tcp" => proto::TCP_PORT,
            "udp" => proto::UDP_PORT,
            other => anyhow::bail!("ClusterIP protocol {other:?}: tcp or udp"),
        };
        let network = self.net_conf()?.network.to_string();
        let ns = n.ns.clone();
        let vip_s = host_prefix(vip.into());
        let vport = vip_port.to_string();
        let routed = cmd::run(
            &mut cmd::ns_command(&ns, &["ip", "route", "get", &vip.to_string()]),
            cmd::SHORT,
        )?
        .status
        .success();
        if !routed {
            cmd::ip(&["-n", &ns, "route", "add", &vip_s, "dev", "eth0"])?;
        }
        let service: [&str; 8] = [
            "-d", &vip_s, "-p", proto_name, "--dport", &vport, "-m", "comment",
        ];
        let comment = "netns-harness ClusterIP";
        let mut mark = vec![
            "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "!", "-s", &network,
        ];
        mark.extend(service);
        mark.extend([
            "--comment",
            comment,
            "-j",
            "MARK",
            "--set-xmark",
            "0x4000/0x4000",
        ]);
        cmd::ns_ok(&ns, &mark)?;
        let target = format!("{dst}:{port}");
        let mut dnat = vec!["iptables", "-w", "-t", "nat", "-A", "OUTPUT"];
        dnat.extend(service);
        dnat.extend([
            "--comment",
            comment,
            "-j",
            "DNAT",
            "--to-destination",
            &target,
        ]);
        cmd::ns_ok(&ns, &dnat)?;
        let masq = [
            "POSTROUTING",
            "-m",
            "mark",
            "--mark",
            "0x4000/0x4000",
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "MASQUERADE",
        ];
        let rule =
            |op: &'static str| [&["iptables", "-w", "-t", "nat", op][..], &masq[..]].concat();
        let present = cmd::run(&mut cmd::ns_command(&ns, &rule("-C")), cmd::SHORT)?;
        if !present.status.success() {
            cmd::ns_ok(&ns, &rule("-A"))?;
        }
        Ok(())
    }

    /// Emulates one ClusterIP the way kube-proxy (iptables mode, before Kubernetes 1.19) does,
    /// in `node`'s nat table of the VIP's family (iptables for IPv4, ip6tables for IPv6, the
    /// same chains and rules): PREROUTING and OUTPUT jump to KUBE-SERVICES, which marks every
    /// packet to `vip:port` with 0x4000 (KUBE-MARK-MASQ; every source is marked, as with
    /// `--masquerade-all`, so pod traffic is masqueraded too) and DNATs it to `pod`'s TCP
    /// responder (its address of that family); KUBE-POSTROUTING masquerades marked packets
    /// with `--random-fully` and does not clear the mark, so the VXLAN packet a kernel vxlan
    /// device builds around such a packet carries the mark too and is masqueraded again (the
    /// double NAT of kubernetes issue 88986). A host route for the VIP via eth0 lets host
    /// traffic reach OUTPUT in runs without a default route; the DNAT re-routes it into the
    /// overlay.
    pub fn add_kube_proxy_service(
        &self,
        node: &str,
        vip: IpAddr,
        port: u16,
        pod: &str,
    ) -> Result<()> {
        let n = self
            .node(node)
            .ok_or_else(|| anyhow!("no node {node:?}"))?
            .clone();
        let family = Family::of(vip);
        let dst: IpAddr = match family {
            Family::V4 => self.pod_ip(pod).map(IpAddr::from),
            Family::V6 => self.pod_ip6(pod).map(IpAddr::from),
        }
        .ok_or_else(|| anyhow!("no pod {pod:?} with an {} address", family.name()))?;
        let ns = n.ns.as_str();
        let tool = nat_tool(family);
        let ipt = |args: &[&str]| -> Result<bool> {
            let mut v = vec![tool, "-w", "-t", "nat"];
            v.extend_from_slice(args);
            Ok(cmd::run(&mut cmd::ns_command(ns, &v), cmd::SHORT)?
                .status
                .success())
        };
        let must = |args: &[&str]| -> Result<()> {
            if ipt(args)? {
                Ok(())
            } else {
                bail!("{node}: {tool} -t nat {} failed", args.join(" "))
            }
        };
        for chain in ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"] {
            if !ipt(&["-S", chain])? {
                must(&["-N", chain])?;
            }
        }
        let mark = ["-j", "MARK", "--set-xmark", KUBE_MARK];
        if !ipt(&[&["-C", "KUBE-MARK-MASQ"][..], &mark[..]].concat())? {
            must(&[&["-A", "KUBE-MARK-MASQ"][..], &mark[..]].concat())?;
        }
        let masq = [
            "-m",
            "mark",
            "--mark",
            KUBE_MARK,
            "-j",
            "MASQUERADE",
            "--random-fully",
        ];
        if !ipt(&[&["-C", "KUBE-POSTROUTING"][..], &masq[..]].concat())? {
            must(&[&["-A", "KUBE-POSTROUTING"][..], &masq[..]].concat())?;
        }
        for (chain, target) in [
            ("PREROUTING", "KUBE-SERVICES"),
            ("OUTPUT", "KUBE-SERVICES"),
            ("POSTROUTING", "KUBE-POSTROUTING"),
        ] {
            if !ipt(&["-C", chain, "-j", target])? {
                must(&["-I", chain, "1", "-j", target])?;
            }
        }
        let vip_s = host_prefix(vip);
        let port_s = port.to_string();
        let svc = ["-d", &vip_s, "-p", "tcp", "--dport", &port_s];
        must(
            &[
                &["-A", "KUBE-SERVICES"][..],
                &svc[..],
                &["-j", "KUBE-MARK-MASQ"],
            ]
            .concat(),
        )?;
        // `addr:port`, or `[addr]:port` for IPv6, as both tools expect it.
        let to = SocketAddr::new(dst, proto::TCP_PORT).to_string();
        must(
            &[
                &["-A", "KUBE-SERVICES"][..],
                &svc[..],
                &["-j", "DNAT", "--to-destination", &to],
            ]
            .concat(),
        )?;
        let routed = cmd::run(
            &mut cmd::ns_command(ns, &["ip", "route", "get", &vip.to_string()]),
            cmd::SHORT,
        )?
        .status
        .success();
        if !routed {
            cmd::ip(&["-n", ns, "route", "add", &vip_s, "dev", "eth0"])?;
        }
        Ok(())
    }

    /// `node`'s KUBE-POSTROUTING rules of `family` with exact packet counters (`-L -v -x`).
    fn postrouting_rules(&self, node: &str, family: Family) -> Result<String> {
        let out = self.exec_ok(
            node,
            &[
                nat_tool(family),
                "-w",
                "-t",
                "nat",
                "-L",
                "KUBE-POSTROUTING",
                "-n",
                "-v",
                "-x",
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Packets counted by the KUBE-POSTROUTING MASQUERADE rule of `family` on `node`.
    pub fn masquerade_packets(&self, node: &str, family: Family) -> Result<u64> {
        Ok(self
            .postrouting_rules(node, family)?
            .lines()
            .filter(|l| l.contains("MASQUERADE"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    /// Adds a counting rule (no target) at the top of `node`'s KUBE-POSTROUTING chain of
    /// `family` for VXLAN packets to `port` that carry kube-proxy's mark (outer packets of
    /// that family); read it with [`marked_vxlan_packets`](Self::marked_vxlan_packets).
    pub fn count_marked_vxlan(&self, node: &str, port: u16, family: Family) -> Result<()> {
        let port = port.to_string();
        self.exec_ok(
            node,
            &[
                nat_tool(family),
                "-w",
                "-t",
                "nat",
                "-I",
                "KUBE-POSTROUTING",
                "1",
                "-p",
                "udp",
                "--dport",
                &port,
                "-m",
                "mark",
                "--mark",
                KUBE_MARK,
                "-m",
                "comment",
                "--comment",
                MARKED_VXLAN,
            ],
        )
        .map(|_| ())
    }

    /// Packets counted by the [`count_marked_vxlan`](Self::count_marked_vxlan) rule of `family`.
    pub fn marked_vxlan_packets(&self, node: &str, family: Family) -> Result<u64> {
        self.postrouting_rules(node, family)?
            .lines()
            .find(|l| l.contains(MARKED_VXLAN))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or_else(|| {
                anyhow!(
                    "{node}: no marked-VXLAN counting rule in {} KUBE-POSTROUTING",
                    nat_tool(family)
                )
            })
    }
}

/// The tool owning `family`'s nat table.
fn nat_tool(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// `ip/32` or `ip/128`.
fn host_prefix(ip: IpAddr) -> String {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    format!("{ip}/{len}")
}
