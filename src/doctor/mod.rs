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

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::backend::intake::{intake, IntakeConfig, NodeBackend};
use crate::backend::reach::{probe_target, ProbeContext};
use crate::backend::Peer;
use crate::config::flags::{Dataplane, Flags};
use crate::config::netconf::{BackendConfig, NetConfig, VxlanConfig};
use crate::config::subnet_env::SubnetEnv;

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

/// `mtu`: the peers that answered small echoes, probed again with Don't-Fragment echoes of
/// the overlay MTU.
async fn mtu_check(
    probes: &[checks::PeerProbe],
    ctx: &ProbeContext,
    backend: &BackendConfig,
    overlay_mtu: Option<u32>,
) -> Finding {
    let overhead = match backend {
        BackendConfig::Vxlan(_) => crate::backend::kernel::VXLAN_OVERHEAD,
        _ => 0,
    };
    let Some(m) = overlay_mtu else {
        return host::mtu(None, overhead, &[]);
    };
    let answering: Vec<(Peer, Ipv4Addr)> = probes
        .iter()
        .filter(|p| p.answered)
        .map(|p| (p.peer.clone(), p.target))
        .collect();
    if answering.is_empty() {
        return host::mtu(Some(m), overhead, &[]);
    }
    let len = usize::try_from(m).unwrap_or(usize::MAX);
    match gather::probe_sized(answering, PROBE_TIMEOUT, Some(len)).await {
        Ok(big) => {
            let results: Vec<(String, bool)> = big
                .iter()
                .map(|p| (crate::backend::reach::peer_label(&p.peer, ctx), p.answered))
                .collect();
            host::mtu(Some(m), overhead, &results)
        }
        Err(e) => Finding::new(Status::Skip, ids::MTU, e),
    }
}

/// The node's set-up around flanneld: br_netfilter, the VXLAN port, the CNI plugins and
/// config the kubelet uses.
async fn host_checks(
    flags: &Flags,
    net: Option<&NetConfig>,
    backend: &BackendConfig,
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
                    &vx.device_name(),
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
    let rules = gather::filter_rules();
    let nat = gather::nat_rules();
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
    // Without a readable config, assume flannel's defaults (vxlan, VNI 1, port 8472).
    let backend = net
        .as_ref()
        .and_then(|n| n.backend().ok().cloned())
        .unwrap_or(BackendConfig::Vxlan(VxlanConfig::default()));
    let ctx = ProbeContext::new(flags, &backend);

    let mut findings = vec![checks::ip_forward(
        ip_forward.as_deref().map_err(String::as_str),
    )];
    match &backend {
        BackendConfig::Vxlan(vx) => match gather::device(&vx.device_name(), vx.vni).await {
            Ok(d) => {
                findings.push(checks::vxlan_device(&d));
                findings.push(checks::tx_checksum(&d));
            }
            Err(e) => {
                let msg = format!("cannot inspect {}: {e}", vx.device_name());
                findings.push(Finding::new(Status::Skip, ids::VXLAN_DEVICE, msg.clone()));
                findings.push(Finding::new(Status::Skip, ids::TX_CHECKSUM, msg));
            }
        },
        other => {
            let msg = format!("{} backend: no overlay device", other.kind());
            findings.push(Finding::new(Status::Skip, ids::VXLAN_DEVICE, msg.clone()));
            findings.push(Finding::new(Status::Skip, ids::TX_CHECKSUM, msg));
        }
    }
    let rules_ref = rules.as_deref().map_err(String::as_str);
    let nft_rules = ruleset.as_ref().ok();
    findings.push(nft::forward_reject_with_nft(
        checks::forward_reject(rules_ref, network),
        nft_rules,
        network,
    ));
    findings.push(nft::host_firewall_with_nft(
        checks::host_firewall_check(rules_ref, &procs, network),
        nft_rules,
        network,
    ));
    findings.extend(checks::security_software(&procs));
    findings.extend(host_checks(flags, net.as_ref(), &backend).await);

    let stored_ip = store.as_ref().ok().and_then(|v| v.stored_public_ip);
    let ours = own_addresses(
        &gather::interface_addresses().await,
        &[flags.public_ip, stored_ip],
    );
    let mut peer_ips: Option<Vec<std::net::IpAddr>> = None;
    match (&store, &net) {
        (Ok(view), Some(net)) => {
            let own_subnet = env_subnet.as_ref().ok().copied().flatten();
            // Our own lease is in the listing: leave it out by subnet and public IP, and let
            // intake check the others exactly as the daemon does.
            let others = view
                .leases
                .iter()
                .filter(|l| l.subnet != own_subnet && !ours.contains(&l.attrs.public_ip));
            let cfg = IntakeConfig {
                backend: NodeBackend::of(&backend).unwrap_or_default(),
                network_v4: net.network,
                own_subnets: own_subnet.map(ipnet::IpNet::V4).into_iter().collect(),
                own_ips: ours.iter().copied().map(std::net::IpAddr::V4).collect(),
                ..IntakeConfig::default()
            };
            let peers = intake(others, &cfg).peers;
            peer_ips = Some(peers.iter().map(|p| p.public_ip).collect());
            let targets: Vec<(Peer, Ipv4Addr)> = peers
                .into_iter()
                .filter_map(|p| probe_target(&p).map(|t| (p, t)))
                .collect();
            match gather::probe(targets, PROBE_TIMEOUT).await {
                Ok(probes) => {
                    findings.extend(checks::peer_reachable(&probes, &ctx));
                    let overlay_mtu = env.as_ref().ok().map(|e| e.mtu).filter(|m| *m > 0);
                    findings.push(mtu_check(&probes, &ctx, &backend, overlay_mtu).await);
                }
                Err(e) => {
                    findings.push(Finding::new(Status::Skip, ids::PEER_REACHABLE, e.clone()));
                    findings.push(Finding::new(Status::Skip, ids::MTU, e));
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
    let guard = checks::GuardWant {
        network,
        port,
        allow_list: kernel,
        peers: peer_ips.as_deref(),
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
        env_subnet.as_ref().ok().copied().flatten(),
        ruleset_ref,
        nat.as_deref().map_err(String::as_str),
    ));
    let leases = match &store {
        Ok(v) => Ok(v.leases.as_slice()),
        Err(e) => Err(e.as_str()),
    };
    findings.push(checks::subnet_lease(
        env_subnet.as_ref().map(|s| *s).map_err(String::as_str),
        leases,
        &ours,
    ));
    Diagnosis {
        findings,
        config_error,
    }
}
