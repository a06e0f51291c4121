//! `kernel-ref` nodes: the harness itself plays upstream flannel's vxlan backend
//! (flannel-compat §7), with `ip`/`bridge` commands instead of netlink, so every other node can
//! be compared with, and must interoperate with, the real kernel programming.
//!
//! The planner [`plan`] is pure: desired peers from the lease directory, diffed against what was
//! programmed before. [`apply`] runs the commands in flannel's order.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::lease::{Lease, NetConf};
use crate::net::{self, Cidr, Cidr6};

/// One remote node as programmed on a kernel-ref node (neighbour + FDB + route).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The peer's subnet (network form).
    pub subnet: Cidr,
    /// The peer's VTEP MAC.
    pub vtep_mac: String,
    /// The peer's public (underlay) address.
    pub public_ip: Ipv4Addr,
}

/// One remote node as programmed on a kernel-ref node's `flannel-v6.<VNI>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry6 {
    /// The peer's IPv6 subnet (network form).
    pub subnet: Cidr6,
    /// The peer's IPv6 VTEP MAC (`backend-v6-data`).
    pub vtep_mac: String,
    /// The peer's public IPv6 (underlay) address.
    pub public_ip: Ipv6Addr,
}

/// What [`apply`] needs of a peer of either family.
pub trait Peer: Clone + PartialEq {
    /// The subnet in `addr/len` form (also the peer's identity).
    fn subnet_text(&self) -> String;
    /// The subnet's network address: the neighbour entry and the route's gateway.
    fn gateway(&self) -> String;
    /// The VTEP MAC.
    fn mac(&self) -> &str;
    /// The underlay address the FDB entry points at.
    fn underlay(&self) -> String;
}

/// Both families' peer entries have the same fields: one implementation serves them.
macro_rules! impl_peer {
    ($($t:ty),*) => {$(
        impl Peer for $t {
            fn subnet_text(&self) -> String {
                self.subnet.to_string()
            }
            fn gateway(&self) -> String {
                self.subnet.network().to_string()
            }
            fn mac(&self) -> &str {
                &self.vtep_mac
            }
            fn underlay(&self) -> String {
                self.public_ip.to_string()
            }
        }
    )*};
}
impl_peer!(PeerEntry, PeerEntry6);

/// One step of the reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelOp<P = PeerEntry> {
    /// Replace neighbour, FDB, route for a new or changed peer (flannel's "Added" event).
    Add(P),
    /// Delete neighbour, FDB, route of a vanished peer (flannel's "Removed" event).
    Remove(P),
}

/// Desired peers for a node owning `own`: every other vxlan lease with a valid MAC and IPv4
/// public address (flannel ignores non-vxlan leases and does not compare VNIs).
pub fn desired_peers(own: &Cidr, leases: &[Lease]) -> Vec<PeerEntry> {
    let mut out: Vec<PeerEntry> = leases
        .iter()
        .filter(|l| l.subnet.trunc() != own.trunc())
        .filter_map(|l| {
            let vx = l.vxlan()?;
            if !net::valid_mac(&vx.vtep_mac) {
                return None;
            }
            Some(PeerEntry {
                subnet: l.subnet.trunc(),
                vtep_mac: vx.vtep_mac,
                public_ip: l.public_ip()?,
            })
        })
        .collect();
    out.sort_by_key(|p| p.subnet);
    out
}

/// Desired IPv6 peers for a node owning `own`: every other vxlan lease with an IPv6 subnet,
/// a valid `backend-v6-data` MAC and a public IPv6 address.
pub fn desired_peers6(own: &Cidr6, leases: &[Lease]) -> Vec<PeerEntry6> {
    let mut out: Vec<PeerEntry6> = leases
        .iter()
        .filter_map(|l| {
            let subnet = l.subnet6?.trunc();
            let vx = l.vxlan6()?;
            (subnet != own.trunc() && net::valid_mac(&vx.vtep_mac)).then_some(PeerEntry6 {
                subnet,
                vtep_mac: vx.vtep_mac,
                public_ip: l.public_ipv6()?,
            })
        })
        .collect();
    out.sort_by_key(|p| p.subnet);
    out
}

/// The operations that take a node from `programmed` to the peers the `leases` describe:
/// removals first, then additions/updates, each in subnet order.
pub fn plan(own: &Cidr, leases: &[Lease], programmed: &[PeerEntry]) -> Vec<KernelOp> {
    diff(desired_peers(own, leases), programmed)
}

/// [`plan`] for the IPv6 device.
pub fn plan6(
    own: &Cidr6,
    leases: &[Lease],
    programmed: &[PeerEntry6],
) -> Vec<KernelOp<PeerEntry6>> {
    diff(desired_peers6(own, leases), programmed)
}

fn diff<P: Peer>(desired: Vec<P>, programmed: &[P]) -> Vec<KernelOp<P>> {
    let mut ops: Vec<KernelOp<P>> = programmed
        .iter()
        .filter(|p| !desired.iter().any(|d| d.subnet_text() == p.subnet_text()))
        .cloned()
        .map(KernelOp::Remove)
        .collect();
    ops.extend(
        desired
            .into_iter()
            .filter(|d| !programmed.contains(d))
            .map(KernelOp::Add),
    );
    ops
}

/// Applies one op in namespace `ns` on device `dev`, exactly as flannel orders it: neighbour,
/// FDB, route on add (undoing earlier steps when a later one fails); best-effort deletes on
/// remove. Like flannel, an update does not delete the FDB entry of a peer's *old* MAC.
pub fn apply<P: Peer>(ns: &str, dev: &str, op: &KernelOp<P>) -> Result<()> {
    match op {
        KernelOp::Add(p) => {
            let gw = p.gateway();
            let mac = p.mac();
            let dst = p.underlay();
            let subnet = p.subnet_text();
            cmd::ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &gw,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
            if let Err(e) = cmd::bridge(&[
                "-n",
                ns,
                "fdb",
                "replace",
                mac,
                "dev",
                dev,
                "dst",
                &dst,
                "self",
                "permanent",
            ]) {
                let _ = cmd::ip(&["-n", ns, "neigh", "del", &gw, "dev", dev]);
                return Err(e);
            }
            if let Err(e) = cmd::ip(&[
                "-n", ns, "route", "replace", &subnet, "via", &gw, "dev", dev, "onlink",
            ]) {
                let _ = cmd::ip(&["-n", ns, "neigh", "del", &gw, "dev", dev]);
                let _ = cmd::bridge(&["-n", ns, "fdb", "del", mac, "dev", dev, "self"]);
                return Err(e);
            }
            Ok(())
        }
        KernelOp::Remove(p) => {
            let gw = p.gateway();
            let subnet = p.subnet_text();
            let mut first_err = None;
            let steps: [Vec<&str>; 3] = [
                vec!["-n", ns, "neigh", "del", &gw, "dev", dev],
                vec!["-n", ns, "fdb", "del", p.mac(), "dev", dev, "self"],
                vec!["-n", ns, "route", "del", &subnet, "dev", dev],
            ];
            for (i, args) in steps.iter().enumerate() {
                let r = if i == 1 {
                    cmd::bridge(args)
                } else {
                    cmd::ip(args)
                };
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }
}

/// Applies `ops` on `dev` and keeps `programmed` in step (flannel forgets a removed peer even
/// when a delete failed, logging it). Returns how many ops were applied; stops at the first
/// failed add.
pub fn reconcile<P: Peer>(
    ns: &str,
    dev: &str,
    ops: Vec<KernelOp<P>>,
    programmed: &mut Vec<P>,
) -> Result<usize> {
    let mut applied = 0;
    for op in ops {
        let res = apply(ns, dev, &op);
        match (op, res) {
            (KernelOp::Add(p), Ok(())) => {
                programmed.retain(|q| q.subnet_text() != p.subnet_text());
                programmed.push(p);
            }
            (KernelOp::Remove(p), r) => {
                if let Err(e) = r {
                    crate::sys::log(format!("{ns}: removing {}: {e:#}", p.subnet_text()));
                }
                programmed.retain(|q| q.subnet_text() != p.subnet_text());
            }
            (KernelOp::Add(p), Err(e)) => {
                return Err(e.context(format!("{ns}: programming peer {}", p.subnet_text())));
            }
        }
        applied += 1;
    }
    Ok(applied)
}

/// The device name flannel uses for a VNI.
pub fn device_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// The IPv6 device name flannel uses for a VNI.
pub fn device_name6(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}

/// Creates and configures the node's `flannel.<VNI>` (flannel-compat §7.1, §7.3): vxlan with
/// the given MAC, local underlay address, `eth0` as lower device, destination port, no
/// learning, MTU, `accept_ra=0`, address `<subnet network>/32`, up.
pub fn create_vtep(
    ns: &str,
    conf: &NetConf,
    mac: &str,
    local: Ipv4Addr,
    subnet: &Cidr,
    mtu: u32,
) -> Result<()> {
    let addr = format!("{}/32", subnet.network());
    make_vtep(
        ns,
        conf,
        &device_name(conf.vni),
        mac,
        &local.to_string(),
        &addr,
        mtu,
    )
}

/// [`create_vtep`] for `flannel-v6.<VNI>` (compat §7.1, §7.3): local IPv6 underlay
/// address, address `<v6 subnet network>/128`.
pub fn create_vtep6(
    ns: &str,
    conf: &NetConf,
    mac: &str,
    local: Ipv6Addr,
    subnet: &Cidr6,
    mtu: u32,
) -> Result<()> {
    let addr = format!("{}/128", subnet.network());
    let dev = device_name6(conf.vni);
    make_vtep(ns, conf, &dev, mac, &local.to_string(), &addr, mtu)
}

/// The MTU the kernel gave a device (`ip -o link show`).
pub fn device_mtu(ns: &str, dev: &str) -> Result<u32> {
    let out = cmd::ns_ok(ns, &["ip", "-o", "link", "show", "dev", dev])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no mtu for {dev} in {text:?}"))
}

fn make_vtep(
    ns: &str,
    conf: &NetConf,
    dev: &str,
    mac: &str,
    local: &str,
    addr: &str,
    mtu: u32,
) -> Result<()> {
    // The MTU goes into the create request, as flannel's netlink LinkAttrs carry it: the
    // kernel clamps it to what the lower device allows (1430 for an IPv6 underlay of 1500).
    let vni = conf.vni.to_string();
    let port = conf.effective_port().to_string();
    cmd::ip(&[
        "-n",
        ns,
        "link",
        "add",
        dev,
        "mtu",
        &mtu.to_string(),
        "address",
        mac,
        "type",
        "vxlan",
        "id",
        &vni,
        "local",
        local,
        "dev",
        "eth0",
        "dstport",
        &port,
        "nolearning",
    ])?;
    // sysctl spells the '.' inside an interface name as '/'.
    cmd::sysctl(
        ns,
        &format!("net.ipv6.conf.{}.accept_ra", dev.replace('.', "/")),
        "0",
    )?;
    // IPv6 addresses are usable at once (no duplicate address detection on a VTEP).
    let nodad: &[&str] = if addr.contains(':') { &["nodad"] } else { &[] };
    let mut args = vec!["-n", ns, "addr", "add", addr, "dev", dev];
    args.extend_from_slice(nodad);
    cmd::ip(&args)?;
    cmd::ip(&["-n", ns, "link", "set", dev, "up"])?;
    Ok(())
}

/// flannel's iptables rules (flannel-compat §9.1) for a kernel-ref node: the forward rules
/// always, the masquerade rules with `--ip-masq`. Applied with one `iptables-restore --noflush`
/// inside the node's namespace.
pub fn install_rules(
    ns: &str,
    network: &Cidr,
    own: &Cidr,
    ip_masq: bool,
    scratch: &Path,
) -> Result<()> {
    let (n, p) = (network.trunc().to_string(), own.trunc().to_string());
    restore(ns, "iptables-restore", scratch, |rf| {
        family_rules_text(&n, &p, "224.0.0.0/4", ip_masq, rf)
    })
}

/// [`install_rules`] for IPv6: the same rules with `ip6tables-restore`, the IPv6 network,
/// the node's IPv6 subnet and multicast `ff00::/8` (compat §9.1).
pub fn install_rules6(
    ns: &str,
    network: &Cidr6,
    own: &Cidr6,
    ip_masq: bool,
    scratch: &Path,
) -> Result<()> {
    let (n, p) = (network.trunc().to_string(), own.trunc().to_string());
    restore(ns, "ip6tables-restore", scratch, |rf| {
        family_rules_text(&n, &p, "ff00::/8", ip_masq, rf)
    })
}

/// Writes the payload (with `--random-fully`, else without) and loads it with `tool --noflush`.
fn restore(ns: &str, tool: &str, scratch: &Path, text: impl Fn(bool) -> String) -> Result<()> {
    let try_with = |random_fully: bool| -> Result<()> {
        std::fs::write(scratch, text(random_fully))
            .with_context(|| format!("write {}", scratch.display()))?;
        let path = scratch.to_string_lossy().into_owned();
        cmd::ns_ok(ns, &[tool, "--noflush", &path]).map(|_| ())
    };
    try_with(true).or_else(|_| try_with(false))
}

/// The `iptables-restore` payload.
pub fn rules_text(network: &Cidr, own: &Cidr, ip_masq: bool, random_fully: bool) -> String {
    let n = network.trunc().to_string();
    let p = own.trunc().to_string();
    family_rules_text(&n, &p, "224.0.0.0/4", ip_masq, random_fully)
}

fn family_rules_text(n: &str, p: &str, mcast: &str, ip_masq: bool, random_fully: bool) -> String {
    let rf = if random_fully { " --random-fully" } else { "" };
    let mut t = String::new();
    if ip_masq {
        let c = "-m comment --comment \"flanneld masq\"";
        t.push_str("*nat\n:FLANNEL-POSTRTG - [0:0]\n");
        t.push_str(&format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG\n"));
        t.push_str(&format!(
            "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN\n"
        ));
        t.push_str(&format!("-A FLANNEL-POSTRTG -s {p} -d {n} {c} -j RETURN\n"));
        t.push_str(&format!("-A FLANNEL-POSTRTG -s {n} -d {p} {c} -j RETURN\n"));
        t.push_str(&format!(
            "-A FLANNEL-POSTRTG ! -s {n} -d {p} {c} -j RETURN\n"
        ));
        t.push_str(&format!(
            "-A FLANNEL-POSTRTG -s {n} ! -d {mcast} {c} -j MASQUERADE{rf}\n"
        ));
        t.push_str(&format!(
            "-A FLANNEL-POSTRTG ! -s {n} -d {n} {c} -j MASQUERADE{rf}\n"
        ));
        t.push_str("COMMIT\n");
    }
    let c = "-m comment --comment \"flanneld forward\"";
    t.push_str("*filter\n:FLANNEL-FWD - [0:0]\n");
    t.push_str(&format!("-A FORWARD {c} -j FLANNEL-FWD\n"));
    t.push_str(&format!("-A FLANNEL-FWD -s {n} {c} -j ACCEPT\n"));
    t.push_str(&format!("-A FLANNEL-FWD -d {n} {c} -j ACCEPT\n"));
    t.push_str("COMMIT\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip.into(),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: serde_json::json!({"VNI": 1, "VtepMAC": mac}),
                backend_v6_data: serde_json::Value::Null,
            },
            subnet6: None,
        }
    }

    fn peer(subnet: &str, ip: &str, mac: &str) -> PeerEntry {
        PeerEntry {
            subnet: subnet.parse().unwrap(),
            vtep_mac: mac.into(),
            public_ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn plan_adds_skips_self_and_foreign_backends() {
        let own: Cidr = "10.244.1.0/24".parse().unwrap();
        let mut hostgw = lease("10.244.4.0/24", "198.18.0.4", "0e:00:00:00:00:04");
        hostgw.attrs.backend_type = "host-gw".into();
        let leases = vec![
            lease("10.244.1.0/24", "198.18.0.1", "0e:00:00:00:00:01"),
            lease("10.244.3.0/24", "198.18.0.3", "0e:00:00:00:00:03"),
            lease("10.244.2.0/24", "198.18.0.2", "0e:00:00:00:00:02"),
            lease("10.244.5.0/24", "198.18.0.5", "not-a-mac"),
            hostgw,
        ];
        let ops = plan(&own, &leases, &[]);
        assert_eq!(
            ops,
            vec![
                KernelOp::Add(peer("10.244.2.0/24", "198.18.0.2", "0e:00:00:00:00:02")),
                KernelOp::Add(peer("10.244.3.0/24", "198.18.0.3", "0e:00:00:00:00:03")),
            ]
        );
    }

    #[test]
    fn plan_removes_and_updates() {
        let own: Cidr = "10.244.1.0/24".parse().unwrap();
        let programmed = vec![
            peer("10.244.2.0/24", "198.18.0.2", "0e:00:00:00:00:02"),
            peer("10.244.3.0/24", "198.18.0.3", "0e:00:00:00:00:03"),
        ];
        let leases = vec![
            lease("10.244.2.0/24", "198.18.0.2", "0e:00:00:00:00:22"),
            lease("10.244.1.0/24", "198.18.0.1", "0e:00:00:00:00:01"),
        ];
        let ops = plan(&own, &leases, &programmed);
        assert_eq!(
            ops,
            vec![
                KernelOp::Remove(peer("10.244.3.0/24", "198.18.0.3", "0e:00:00:00:00:03")),
                KernelOp::Add(peer("10.244.2.0/24", "198.18.0.2", "0e:00:00:00:00:22")),
            ]
        );
        let steady = vec![peer("10.244.2.0/24", "198.18.0.2", "0e:00:00:00:00:22")];
        assert!(plan(&own, &leases, &steady).is_empty());
    }

    #[test]
    fn plan6_uses_the_v6_subnet_mac_and_public_ipv6() {
        let own: Cidr6 = "fd42:244:0:1::/64".parse().unwrap();
        let dual = |v4: &str, v6: &str, n: u8| {
            let mut l = lease(
                v4,
                &format!("198.18.0.{n}"),
                &format!("0e:00:00:00:00:0{n}"),
            );
            l.subnet6 = Some(v6.parse().unwrap());
            l.attrs.public_ipv6 = Some(format!("2001:db8:18::{n}"));
            l.attrs.backend_v6_data =
                serde_json::json!({"VNI": 1, "VtepMAC": format!("0e:00:00:00:06:0{n}")});
            l
        };
        let mut no_v6_mac = dual("10.244.4.0/24", "fd42:244:0:4::/64", 4);
        no_v6_mac.attrs.backend_v6_data = serde_json::Value::Null;
        let leases = vec![
            dual("10.244.1.0/24", "fd42:244:0:1::/64", 1),
            dual("10.244.2.0/24", "fd42:244:0:2::/64", 2),
            lease("10.244.3.0/24", "198.18.0.3", "0e:00:00:00:00:03"),
            no_v6_mac,
        ];
        let ops = plan6(&own, &leases, &[]);
        let want = PeerEntry6 {
            subnet: "fd42:244:0:2::/64".parse().unwrap(),
            vtep_mac: "0e:00:00:00:06:02".into(),
            public_ip: "2001:db8:18::2".parse().unwrap(),
        };
        assert_eq!(ops, vec![KernelOp::Add(want.clone())]);
        assert_eq!(want.gateway(), "fd42:244:0:2::");
        assert!(plan6(&own, &leases, std::slice::from_ref(&want)).is_empty());
        assert_eq!(
            plan6(&own, &[], std::slice::from_ref(&want)),
            vec![KernelOp::Remove(want)]
        );
    }

    #[test]
    fn rules_match_flannel_golden_text() {
        let n: Cidr = "10.244.0.0/16".parse().unwrap();
        let p: Cidr = "10.244.1.0/24".parse().unwrap();
        let t = rules_text(&n, &p, true, true);
        assert!(t.contains(
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n"
        ));
        assert!(t.contains("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n"));
        let t6 = family_rules_text("fd42:244::/56", "fd42:244:0:1::/64", "ff00::/8", true, true);
        assert!(t6.contains(
            "-A FLANNEL-POSTRTG -s fd42:244::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n"
        ));
        let t = rules_text(&n, &p, false, true);
        assert!(!t.contains("*nat"));
        assert!(t.contains(
            "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n"
        ));
    }
}
