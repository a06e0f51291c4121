//! `flanneld doctor`: checks a live node for the causes of the field problems (P1 NATed
//! peers, P2 checksum offload, P3 forwarding, firewalls, security software), names each
//! finding with its fix, and exits 0 (no FAIL), 1 (a FAIL) or 2 (configuration error, e.g.
//! an unreadable lease store).
//!
//! Run it in the node's network namespace with the daemon's flags and environment: it opens
//! the same store the daemon does, reads the same subnet.env, and probes every peer's VTEP
//! with the daemon's prober ([`crate::io::icmp`]). Facts are gathered in [`gather`],
//! decided by the pure functions of [`checks`], [`iptables`] and [`nft`], printed by [`report`].
//!
//! When the store cannot be read, every local check still runs and is printed; the store
//! checks are SKIPped, and the exit code is 2 with the store error on stderr.

pub mod checks;
pub mod gather;
pub mod host;
pub mod iptables;
pub mod nft;
pub mod report;

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::backend::intake::{intake, IntakeConfig, NodeBackend};
use crate::backend::reach::{probe_target, ProbeContext};
use crate::backend::Peer;
use crate::config::flags::{Dataplane, Flags};
use crate::config::netconf::{BackendConfig, NetConfig, VxlanConfig};
use crate::config::subnet_env::SubnetEnv;
use crate::netlink::IpFamily;

use self::checks::own_addresses;
use self::report::{ids, Finding, Status};

/// Limit on every lease-store operation (an unreachable etcd or API server).
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe waits for its reply (2 tries per peer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The outcome of a run.
#[derive(Debug)]
pub struct Diagnosis {
    /// Every finding, in report order.
    pub findings: Vec<Finding>,
    /// The lease store or its network config could not be read (exit code 2).
    pub config_error: Option<String>,
}

impl Diagnosis {
    /// 0 when nothing failed, 1 when a check failed, 2 on a configuration error.
    pub fn exit_code(&self) -> u8 {
        if self.config_error.is_some() {
            2
        } else {
            report::exit_code(&self.findings)
        }
    }

    /// The report text (stdout).
    pub fn render(&self) -> String {
        report::render(&self.findings)
    }
}

/// What one family's peers are probed with: the overlay MTU (or why it is unknown) and what
/// the backend adds to it on the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MtuPlan {
    family: IpFamily,
    mtu: Result<u32, String>,
    overhead: u32,
}

/// The MTU probe of each enabled family. IPv4 uses subnet.env's `FLANNEL_MTU`. IPv6 over
/// VXLAN uses the MTU of `flannel-v6.<VNI>` (`dev6_mtu`): flannel sizes that device for the
/// 70 bytes VXLAN adds over an IPv6 underlay, and `FLANNEL_MTU` is the IPv4 device's
/// unless IPv6 is the only family (then it is the IPv6 device's and stands in for a device
/// that cannot be read). host-gw adds nothing: `FLANNEL_MTU` for both.
fn mtu_plans(
    backend: &BackendConfig,
    (v4, v6): (bool, bool),
    flannel_mtu: Option<u32>,
    dev6_mtu: Option<u32>,
) -> Vec<MtuPlan> {
    let no_env = || "subnet.env has no FLANNEL_MTU to probe with".to_owned();
    families(v4, v6)
        .map(|family| {
            let (mtu, overhead) = match (backend, family) {
                (BackendConfig::Vxlan(_), IpFamily::V4) => (
                    flannel_mtu.ok_or_else(no_env),
                    crate::backend::kernel::VXLAN_OVERHEAD,
                ),
                (BackendConfig::Vxlan(vx), IpFamily::V6) => {
                    let dev = crate::backend::kernel::device_name(vx.vni, IpFamily::V6);
                    let mtu = dev6_mtu.or(flannel_mtu.filter(|_| !v4)).ok_or_else(|| {
                        format!("{dev} not found: no IPv6 overlay MTU to probe with")
                    });
                    (mtu, crate::backend::kernel::VXLAN6_OVERHEAD)
                }
                _ => (flannel_mtu.ok_or_else(no_env), 0),
            };
            MtuPlan {
                family,
                mtu,
                overhead,
            }
        })
        .collect()
}

/// `mtu` and `mtu-v6`: per family, the peers that answered small echoes, probed again with
/// Don't-Fragment echoes of that family's overlay MTU.
async fn mtu_check(
    probes: &[checks::PeerProbe],
    ctx: &ProbeContext,
    plans: Vec<MtuPlan>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for plan in plans {
        let family = plan.family;
        out.push(of_family(mtu_probe(probes, ctx, plan).await, family));
    }
    out
}

/// The `mtu` finding of one family's [`MtuPlan`] (its IPv4 id).
async fn mtu_probe(probes: &[checks::PeerProbe], ctx: &ProbeContext, plan: MtuPlan) -> Finding {
    let m = match plan.mtu {
        Ok(m) => m,
        Err(why) => return Finding::new(Status::Skip, ids::MTU, why),
    };
    let v6 = plan.family == IpFamily::V6;
    let answering: Vec<(Peer, IpAddr)> = probes
        .iter()
        .filter(|p| p.answered && p.target.is_ipv6() == v6)
        .map(|p| (p.peer.clone(), p.target))
        .collect();
    if answering.is_empty() {
        return host::mtu(Some(m), plan.overhead, &[]);
    }
    let len = usize::try_from(m).unwrap_or(usize::MAX);
    match gather::probe_sized(answering, PROBE_TIMEOUT, Some(len)).await {
        Ok(big) => {
            let results: Vec<(String, bool)> = big
                .iter()
                .map(|p| (crate::backend::reach::peer_label(&p.peer, ctx), p.answered))
                .collect();
            host::mtu(Some(m), plan.overhead, &results)
        }
        Err(e) => Finding::new(Status::Skip, ids::MTU, e),
    }
}

/// `f` as the finding of `family`: its `-v6` id for IPv6 ([`Finding::v6`]).
fn of_family(f: Finding, family: IpFamily) -> Finding {
    match family {
        IpFamily::V4 => f,
        IpFamily::V6 => f.v6(),
    }
}

/// The enabled families, IPv4 first.
fn families(v4: bool, v6: bool) -> impl Iterator<Item = IpFamily> {
    [(v4, IpFamily::V4), (v6, IpFamily::V6)]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, family)| family)
}

/// The overlay devices of `vx` for the enabled families: `flannel.<VNI>` (IPv4),
/// `flannel-v6.<VNI>` (IPv6).
fn own_devices(vx: &VxlanConfig, v4: bool, v6: bool) -> Vec<String> {
    families(v4, v6)
        .map(|family| crate::backend::kernel::device_name(vx.vni, family))
        .collect()
}

/// The node's set-up around flanneld: br_netfilter, the VXLAN port, the CNI plugins and
/// config the kubelet uses.
async fn host_checks(
    flags: &Flags,
    net: Option<&NetConfig>,
    backend: &BackendConfig,
    (v4, v6): (bool, bool),
) -> Vec<Finding> {
    let mut out = Vec::new();
    if net.is_some_and(|n| n.enable_nftables) {
        out.push(Finding::new(
            Status::Skip,
            ids::BR_NETFILTER,
            "EnableNFTables: flannel does not require br_netfilter in nftables mode",
        ));
    } else {
        let raw = gather::br_netfilter();
        out.push(host::br_netfilter(raw.as_deref().map_err(String::as_str)));
    }
    match backend {
        BackendConfig::Vxlan(vx) => {
            let port = vx.vxlan_port();
            match gather::vxlan_port(port).await {
                Ok((devices, sockets)) => out.push(host::vxlan_port(
                    port,
                    &own_devices(vx, v4, v6),
                    flags.dataplane == Dataplane::Userspace,
                    &devices,
                    &sockets,
                )),
                Err(e) => out.push(Finding::new(
                    Status::Skip,
                    ids::VXLAN_PORT,
                    format!("cannot list devices: {e}"),
                )),
            }
        }
        other => out.push(Finding::new(
            Status::Skip,
            ids::VXLAN_PORT,
            format!("{} backend: no VXLAN port", other.kind()),
        )),
    }
    out.push(host::cni_plugins(
        &flags.cni_bin_dir,
        &gather::cni_plugins(&flags.cni_bin_dir),
    ));
    let configs = gather::cni_configs(&flags.cni_conf_dir);
    out.push(host::cni_config(
        &flags.cni_conf_dir,
        configs.as_deref().map_err(String::as_str),
    ));
    out
}

/// Runs every check for a node configured by `flags` (in the calling thread's namespace).
pub async fn diagnose(flags: &Flags) -> Diagnosis {
    let mut config_error = None;
    let ip_forward = gather::ip_forward();
    let procs = gather::processes();
    let rules = gather::filter_rules(IpFamily::V4);
    let nat = gather::nat_rules(IpFamily::V4);
    let ruleset = gather::nft_ruleset().map(|t| nft::parse_ruleset(&t));
    let env = SubnetEnv::read(&flags.subnet_file);
    let env_subnet = env.as_ref().map(|e| e.subnet).map_err(|e| e.to_string());
    let env_network = env.as_ref().ok().and_then(|e| e.network);

    let store = match tokio::time::timeout(STORE_TIMEOUT, gather::store(flags)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the lease store did not answer within {}s",
            STORE_TIMEOUT.as_secs()
        )),
    };
    let net = match &store {
        Ok(view) => match NetConfig::parse(&view.config) {
            Ok(n) => Some(n),
            Err(e) => {
                config_error = Some(format!("invalid network config in the store: {e}"));
                None
            }
        },
        Err(e) => {
            config_error = Some(format!("cannot read the lease store: {e}"));
            None
        }
    };
    let network = net.as_ref().and_then(|n| n.network).or(env_network);
    let env_v6 = env.as_ref().ok().map(|e| (e.ipv6_network, e.ipv6_subnet));
    // IPv6 checks only when the node's config enables IPv6 (the store's, else subnet.env's).
    let network6 = match &net {
        Some(n) if n.enable_ipv6 => n.ipv6_network,
        Some(_) => None,
        None => env_v6.and_then(|(n, _)| n),
    };
    let subnet6 = network6.and(env_v6.and_then(|(_, s)| s));
    // An IPv6-only node (EnableIPv4 false) has no IPv4 Network, lease or forwarding to check.
    let v4 = net.as_ref().is_none_or(|n| n.enable_ipv4);
    // Without a readable config, assume flannel's defaults (vxlan, VNI 1, port 8472).
    let backend = net
        .as_ref()
        .and_then(|n| n.backend().ok().cloned())
        .unwrap_or(BackendConfig::Vxlan(VxlanConfig::default()));
    let ctx = ProbeContext::new(flags, &backend);

    let mut findings = vec![if v4 {
        checks::ip_forward(ip_forward.as_deref().map_err(String::as_str))
    } else {
        Finding::new(Status::Skip, ids::IP_FORWARD, "EnableIPv4 is false")
    }];
    let rules6 = network6.map(|_| gather::filter_rules(IpFamily::V6));
    if network6.is_some() {
        let raw = gather::ip6_forward();
        findings.push(checks::ip6_forward(raw.as_deref().map_err(String::as_str)));
    }
    // The MTU of flannel-v6.<VNI>, which the IPv6 peers are probed with.
    let mut dev6_mtu = None;
    match &backend {
        BackendConfig::Vxlan(vx) => {
            // One device per enabled family, checked alike (`-v6` ids for flannel-v6.<VNI>).
            for family in families(v4, network6.is_some()) {
                let name = crate::backend::kernel::device_name(vx.vni, family);
                let found = match gather::device(&name, vx.vni).await {
                    Ok(d) => {
                        if family == IpFamily::V6 {
                            dev6_mtu = d.mtu;
                        }
                        [checks::vxlan_device(&d), checks::tx_checksum(&d)]
                    }
                    Err(e) => {
                        let msg = format!("cannot inspect {name}: {e}");
                        [
                            Finding::new(Status::Skip, ids::VXLAN_DEVICE, msg.clone()),
                            Finding::new(Status::Skip, ids::TX_CHECKSUM, msg),
                        ]
                    }
                };
                findings.extend(found.map(|f| of_family(f, family)));
            }
        }
        other => {
            let msg = format!("{} backend: no overlay device", other.kind());
            findings.push(Finding::new(Status::Skip, ids::VXLAN_DEVICE, msg.clone()));
            findings.push(Finding::new(Status::Skip, ids::TX_CHECKSUM, msg));
        }
    }
    let rules_ref = rules.as_deref().map_err(String::as_str);
    let nft_rules = ruleset.as_ref().ok();
    let network = network.map(IpNet::V4);
    findings.push(nft::forward_reject_with_nft(
        checks::forward_reject(rules_ref, network),
        nft_rules,
        network,
    ));
    if let (Some(n6), Some(r6)) = (network6.map(IpNet::V6), &rules6) {
        let r6 = r6.as_deref().map_err(String::as_str);
        let f = checks::forward_reject(r6, Some(n6));
        findings.push(nft::forward_reject_with_nft(f, nft_rules, Some(n6)).v6());
    }
    findings.push(nft::host_firewall_with_nft(
        checks::host_firewall_check(rules_ref, &procs, network),
        nft_rules,
        network,
    ));
    findings.extend(checks::security_software(&procs));
    let stack = (v4, network6.is_some());
    findings.extend(host_checks(flags, net.as_ref(), &backend, stack).await);

    let stored_ip = store.as_ref().ok().and_then(|v| v.stored_public_ip);
    let addrs = gather::interface_addresses().await;
    let ours = own_addresses(&addrs, &[flags.public_ip, stored_ip]);
    let ours6: Vec<std::net::Ipv6Addr> = addrs
        .into_iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
        .chain(flags.public_ipv6)
        .collect();
    let mut peer_ips: Option<Vec<IpAddr>> = None;
    match (&store, &net) {
        (Ok(view), Some(net)) => {
            let own_subnet = env_subnet.as_ref().ok().copied().flatten();
            // Our own lease is in the listing: leave it out by subnet and public IP, and let
            // intake check the others exactly as the daemon does.
            let is_own = |l: &&crate::lease::Lease| {
                (own_subnet.is_some() && l.subnet == own_subnet)
                    || (subnet6.is_some() && l.ipv6_subnet == subnet6)
                    || ours.contains(&l.attrs.public_ip)
                    || l.attrs.public_ipv6.is_some_and(|ip| ours6.contains(&ip))
            };
            let others = view.leases.iter().filter(|l| !is_own(l));
            let cfg = IntakeConfig {
                backend: NodeBackend::of(&backend).unwrap_or_default(),
                network_v4: net.network.filter(|_| net.enable_ipv4),
                network_v6: network6,
                own_subnets: own_subnet
                    .map(IpNet::V4)
                    .into_iter()
                    .chain(subnet6.map(IpNet::V6))
                    .collect(),
                own_ips: ours
                    .iter()
                    .copied()
                    .map(IpAddr::V4)
                    .chain(ours6.iter().copied().map(IpAddr::V6))
                    .collect(),
                ..IntakeConfig::default()
            };
            let peers = intake(others, &cfg).peers;
            peer_ips = Some(peers.iter().map(|p| p.public_ip).collect());
            let targets: Vec<(Peer, IpAddr)> = peers
                .into_iter()
                .filter_map(|p| probe_target(&p).map(|t| (p, t)))
                .collect();
            match gather::probe(targets, PROBE_TIMEOUT).await {
                Ok(probes) => {
                    findings.extend(checks::peer_reachable(&probes, &ctx));
                    let overlay_mtu = env.as_ref().ok().map(|e| e.mtu).filter(|m| *m > 0);
                    let plans = mtu_plans(&backend, stack, overlay_mtu, dev6_mtu);
                    findings.extend(mtu_check(&probes, &ctx, plans).await);
                }
                Err(e) => {
                    findings.push(Finding::new(Status::Skip, ids::PEER_REACHABLE, e.clone()));
                    findings.extend(families(stack.0, stack.1).map(|family| {
                        of_family(Finding::new(Status::Skip, ids::MTU, e.clone()), family)
                    }));
                }
            }
        }
        _ => findings.push(Finding::new(
            Status::Skip,
            ids::PEER_REACHABLE,
            "the lease store cannot be read: no peers to probe",
        )),
    }
    let port = match &backend {
        BackendConfig::Vxlan(vx) => Some(vx.vxlan_port()),
        _ => None,
    };
    let nftables = net.as_ref().is_some_and(|n| n.enable_nftables);
    let kernel = flags.dataplane == crate::config::flags::Dataplane::Kernel;
    let ruleset_ref = ruleset.as_ref().map_err(String::as_str);
    // Each family's guard allows the peers' public IPs of its own family.
    let of_family = |v6: bool| -> Option<Vec<IpAddr>> {
        peer_ips.as_ref().map(|ips| {
            ips.iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == v6)
                .collect()
        })
    };
    let peers4 = of_family(false);
    let guard = checks::GuardWant {
        network,
        port,
        allow_list: kernel,
        peers: peers4.as_deref(),
    };
    findings.push(if nftables {
        nft::vxlan_guard_nft(ruleset_ref, &guard)
    } else {
        checks::vxlan_guard(rules_ref, &guard)
    });
    findings.extend(nft::masquerade(
        flags.ip_masq,
        nftables,
        network,
        env_subnet.as_ref().ok().copied().flatten().map(IpNet::V4),
        ruleset_ref,
        nat.as_deref().map_err(String::as_str),
    ));
    if let (Some(n6), Some(r6)) = (network6.map(IpNet::V6), &rules6) {
        let r6 = r6.as_deref().map_err(String::as_str);
        let peers6 = of_family(true);
        let guard6 = checks::GuardWant {
            network: Some(n6),
            peers: peers6.as_deref(),
            ..guard
        };
        findings.push(
            if nftables {
                nft::vxlan_guard_nft(ruleset_ref, &guard6)
            } else {
                checks::vxlan_guard(r6, &guard6)
            }
            .v6(),
        );
        let nat6 = gather::nat_rules(IpFamily::V6);
        findings.extend(
            nft::masquerade(
                flags.ip_masq,
                nftables,
                Some(n6),
                subnet6.map(IpNet::V6),
                ruleset_ref,
                nat6.as_deref().map_err(String::as_str),
            )
            .map(Finding::v6),
        );
    }
    let leases = match &store {
        Ok(v) => Ok(v.leases.as_slice()),
        Err(e) => Err(e.as_str()),
    };
    if v4 {
        findings.push(checks::subnet_lease(
            env_subnet.as_ref().map(|s| *s).map_err(String::as_str),
            leases,
            &ours,
        ));
    }
    if network6.is_some() {
        let env6 = env
            .as_ref()
            .map(|e| e.ipv6_subnet)
            .map_err(|e| e.to_string());
        let all_ours: Vec<IpAddr> = ours
            .iter()
            .copied()
            .map(IpAddr::V4)
            .chain(ours6.iter().copied().map(IpAddr::V6))
            .collect();
        findings.push(checks::subnet_lease_v6(
            env6.as_ref().map(|s| *s).map_err(String::as_str),
            leases,
            &all_ours,
        ));
    }
    Diagnosis {
        findings,
        config_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(p: &MtuPlan) -> (IpFamily, Result<u32, String>, u32) {
        (p.family, p.mtu.clone(), p.overhead)
    }

    #[test]
    fn each_family_is_probed_with_its_own_overlay_mtu() {
        let vx = BackendConfig::Vxlan(VxlanConfig::default());
        // Dual stack: FLANNEL_MTU is flannel.1's; IPv6 peers get flannel-v6.1's.
        let p: Vec<_> = mtu_plans(&vx, (true, true), Some(1450), Some(1430))
            .iter()
            .map(plan)
            .collect();
        assert_eq!(
            p,
            [(IpFamily::V4, Ok(1450), 50), (IpFamily::V6, Ok(1430), 70)]
        );
        // IPv6 only: FLANNEL_MTU is flannel-v6.1's and stands in when it cannot be read.
        let p = mtu_plans(&vx, (false, true), Some(1430), None);
        assert_eq!(
            p.iter().map(plan).collect::<Vec<_>>(),
            [(IpFamily::V6, Ok(1430), 70)]
        );
        // Dual stack without flannel-v6.1: nothing to probe IPv6 with, and it says why.
        let p = mtu_plans(&vx, (true, true), Some(1450), None);
        let why = p[1].mtu.clone().expect_err("no device");
        assert!(why.contains("flannel-v6.1 not found"), "{why}");
        // host-gw: no encapsulation, FLANNEL_MTU for both.
        let p: Vec<_> = mtu_plans(&BackendConfig::HostGw, (true, true), Some(1500), None)
            .iter()
            .map(plan)
            .collect();
        assert_eq!(
            p,
            [(IpFamily::V4, Ok(1500), 0), (IpFamily::V6, Ok(1500), 0)]
        );
        assert!(mtu_plans(&vx, (true, false), None, None)[0].mtu.is_err());
    }
}
