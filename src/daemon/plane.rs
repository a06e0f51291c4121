//! The data plane the daemon drives, whichever backend and mode the flags choose, and the
//! firewall rules that go with it.

use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use tracing::{info, warn};

use crate::backend::hostgw::{HostGw, HostGwConfig};
use crate::backend::kernel::{KernelVxlan, KernelVxlanConfig};
use crate::backend::userspace::{UserspaceConfig, UserspaceVxlan};
use crate::backend::Peer;
use crate::config::flags::{Dataplane, Flags};
use crate::config::netconf::BackendConfig;
use crate::dataplane::LocalVtep;
use crate::masq::{ensure_async, Iptables, MasqConfig, Rule};
use crate::netlink::{IpFamily, Netlink};
use crate::netlink::{Route, RouteScope};
use crate::wire::MacAddr;

use super::extif::ExternalInterface;
use super::metrics::PlaneMetrics;

/// VXLAN overhead flannel subtracts from the underlay MTU (also for IPv6 underlays).
const VXLAN_OVERHEAD: u32 = 50;

/// Why a data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// Opening or configuring the userspace device failed.
    #[error("userspace VXLAN device {device}: {reason}")]
    Userspace {
        /// The device name.
        device: String,
        /// What failed.
        reason: String,
    },
    /// The kernel VXLAN device could not be set up.
    #[error(transparent)]
    Kernel(#[from] crate::backend::kernel::KernelError),
    /// host-gw could not start.
    #[error(transparent)]
    HostGw(#[from] crate::backend::hostgw::HostGwError),
    /// The backend type has no data plane here.
    #[error("unknown backend type: {0}")]
    Unknown(String),
}

/// The running data plane.
#[derive(Debug)]
pub(super) enum Plane {
    /// Our TUN + UDP data plane.
    Userspace {
        dp: UserspaceVxlan,
        nl: Netlink,
        mtu: u32,
    },
    /// The kernel's vxlan device, programmed like flannel.
    Kernel(Box<KernelVxlan>),
    /// Plain routes via peers.
    HostGw(HostGw),
}

impl Plane {
    pub(super) async fn start(
        flags: &Flags,
        backend: &BackendConfig,
        ext: &ExternalInterface,
        network: Ipv4Net,
        subnet: Ipv4Net,
        vtep_mac: Option<MacAddr>,
    ) -> Result<Plane, PlaneError> {
        match (backend, vtep_mac) {
            (BackendConfig::Vxlan(vx), Some(mac)) if flags.dataplane == Dataplane::Userspace => {
                let device = vx.device_name();
                let underlay_mtu = vx.mtu.unwrap_or(ext.mtu);
                let mtu = underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
                let fail = |reason: String| PlaneError::Userspace {
                    device: device.clone(),
                    reason,
                };
                let nl = Netlink::connect().map_err(|e| fail(e.to_string()))?;
                remove_foreign_device(&nl, &device).await;
                let cfg = UserspaceConfig {
                    device: device.clone(),
                    vni: vx.vni,
                    port: vx.vxlan_port(),
                    // The interface's own address: behind 1:1 NAT the public IP is not local.
                    bind: ext.iface_addr.into(),
                    mac,
                    local: LocalVtep {
                        vni: vx.vni,
                        mac,
                        addr_v4: Some(subnet.network()),
                        addr_v6: None,
                        // Network's first address: never a node's (SubnetMin skips the
                        // first subnet), so errors from it pass the kernel's martian check.
                        error_source_v4: (network.network() != subnet.network())
                            .then_some(network.network()),
                        error_source_v6: None,
                        subnet_v4: Some(subnet),
                        subnet_v6: None,
                    },
                    tso: true,
                };
                let dp = UserspaceVxlan::start(&cfg).map_err(|e| fail(e.to_string()))?;
                configure_tun(&nl, &device, mtu, network, subnet)
                    .await
                    .map_err(fail)?;
                info!(%device, mtu, %mac, port = cfg.port, "userspace VXLAN data plane running");
                Ok(Plane::Userspace { dp, nl, mtu })
            }
            (BackendConfig::Vxlan(vx), Some(mac)) => {
                let kv = KernelVxlan::setup(KernelVxlanConfig {
                    vni: vx.vni,
                    underlay_ifname: ext.name.clone(),
                    local_ip: ext.ext_addr.into(),
                    port: vx.port,
                    learning: vx.learning,
                    gbp: vx.gbp,
                    mtu: Some(vx.mtu.unwrap_or(ext.mtu)),
                    vtep_mac: mac,
                    network: network.into(),
                    subnet: subnet.into(),
                    direct_routing: vx.direct_routing,
                    keep_tx_checksum: flags.vxlan_tx_checksum_offload,
                })
                .await?;
                info!(
                    device = kv.name(),
                    mtu = kv.mtu(),
                    "kernel VXLAN device ready"
                );
                Ok(Plane::Kernel(Box::new(kv)))
            }
            (BackendConfig::HostGw, _) => Ok(Plane::HostGw(
                HostGw::setup(HostGwConfig {
                    iface: ext.name.clone(),
                    iface_addr: ext.iface_addr.into(),
                    public_ip: ext.ext_addr.into(),
                    network: network.into(),
                    subnet: subnet.into(),
                })
                .await?,
            )),
            (other, _) => Err(PlaneError::Unknown(other.kind().to_owned())),
        }
    }

    /// The MTU pods should use (FLANNEL_MTU).
    pub(super) fn mtu(&self) -> u32 {
        match self {
            Plane::Userspace { mtu, .. } => *mtu,
            Plane::Kernel(k) => k.mtu(),
            Plane::HostGw(h) => h.mtu(),
        }
    }

    pub(super) fn metrics_source(&self) -> PlaneMetrics {
        match self {
            Plane::Userspace { dp, .. } => PlaneMetrics::Userspace {
                counters: dp.counters().clone(),
                io_errors: dp.io_errors().clone(),
            },
            _ => PlaneMetrics::Kernel,
        }
    }

    /// Brings the data plane to the state `peers` ask for.
    pub(super) async fn sync(&mut self, peers: &[Peer]) {
        match self {
            Plane::Userspace { dp, .. } => {
                for s in dp.sync(peers) {
                    warn!(subnet = %s.subnet, reason = s.reason, "peer not programmed");
                }
            }
            Plane::Kernel(k) => log_report(k.sync(peers).await),
            Plane::HostGw(h) => log_report(h.sync(peers).await),
        }
    }

    /// Completes when the overlay device disappeared under us (kernel mode only).
    pub(super) async fn device_event(&self) {
        match self {
            Plane::Kernel(k) => k.device_gone().await,
            _ => std::future::pending().await,
        }
    }

    /// Recreates the overlay device after [`Plane::device_event`].
    pub(super) async fn recover(&mut self, peers: &[Peer]) {
        if let Plane::Kernel(k) = self {
            if let Err(e) = k.recover(peers).await {
                warn!(error = %e, "recreating the VXLAN device failed; retrying on the next event");
            }
        }
    }

    /// Stops the data plane. Userspace mode removes its device (and with it its routes);
    /// kernel and host-gw state stays so forwarding continues while the daemon is away.
    pub(super) async fn shutdown(self) {
        if let Plane::Userspace { dp, nl, .. } = self {
            dp.shutdown();
            drop(nl);
        }
    }
}

fn log_report(report: crate::backend::kernel::SyncReport) {
    if !report.is_clean() {
        for peer in report.failed_peers() {
            warn!(%peer, "programming this peer failed; retrying on the next sync");
        }
    }
}

/// A kernel vxlan device left by upstream flannel or our kernel mode under the name the
/// userspace device needs: removed, as flannel itself recreates incompatible devices.
async fn remove_foreign_device(nl: &Netlink, device: &str) {
    if let Ok(Some(link)) = nl.link_by_name(device).await {
        if link.kind.as_deref() != Some("tun") {
            warn!(
                %device, kind = ?link.kind,
                "removing the existing non-TUN device of the same name (left by kernel mode or upstream flannel)"
            );
            if let Err(e) = nl.link_del(link.index).await {
                warn!(%device, error = %e, "could not remove it");
            }
        }
    }
}

/// `ip link set <dev> mtu <mtu> up; ip addr add <subnet network>/32 dev <dev>;
/// ip route replace <Network> dev <dev>`: the whole Network goes through the TUN device, the
/// /32 gives host-originated packets a source inside our subnet.
async fn configure_tun(
    nl: &Netlink,
    device: &str,
    mtu: u32,
    network: Ipv4Net,
    subnet: Ipv4Net,
) -> Result<(), String> {
    let index = crate::io::iface::index_of(device).map_err(|e| e.to_string())?;
    nl.link_set_mtu(index, mtu)
        .await
        .map_err(|e| e.to_string())?;
    let addr = IpNet::V4(Ipv4Net::new(subnet.network(), 32).map_err(|e| e.to_string())?);
    match nl.addr_add(index, addr).await {
        Err(e) if !e.is_exists() => return Err(e.to_string()),
        _ => {}
    }
    nl.link_set_up(index).await.map_err(|e| e.to_string())?;
    let mut route = Route::via(IpNet::V4(network), subnet.network().into()).dev(index);
    route.gateway = None;
    route.scope = RouteScope::Link;
    nl.route_replace(&route).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// The MAC of an existing `flannel.<VNI>` vxlan device, for kernel mode restarts.
pub(super) async fn existing_device_mac(flags: &Flags, vni: u32) -> Option<MacAddr> {
    if flags.dataplane != Dataplane::Kernel {
        return None;
    }
    let nl = Netlink::connect().ok()?;
    let link = nl.link_by_name(&format!("flannel.{vni}")).await.ok()??;
    (link.kind.as_deref() == Some("vxlan")).then_some(link.mac?)
}

/// flannel's masquerade and forward rules, installed once and re-checked periodically.
#[derive(Debug)]
pub(super) struct Firewall {
    ipt: Option<Arc<Iptables>>,
    rules: Arc<Vec<Rule>>,
    pending: Option<Setup>,
}

#[derive(Debug)]
struct Setup {
    masq: Option<(MasqConfig, Option<(IpNet, IpNet)>)>,
    forward: Option<IpNet>,
}

impl Firewall {
    pub(super) fn new(
        flags: &Flags,
        network: Ipv4Net,
        subnet: Ipv4Net,
        previous: Option<(Ipv4Net, Ipv4Net)>,
    ) -> Firewall {
        let wanted = flags.ip_masq || flags.iptables_forward_rules;
        let ipt = if wanted {
            match Iptables::detect(IpFamily::V4) {
                Ok(i) => Some(Arc::new(i)),
                Err(e) => {
                    warn!(error = %e, "iptables unavailable; masquerade/forward rules not installed");
                    None
                }
            }
        } else {
            None
        };
        let masq = flags.ip_masq.then(|| {
            (
                MasqConfig {
                    network: network.into(),
                    subnet: subnet.into(),
                    random_fully: flags.ip_masq_fully_random_disable.then_some(false),
                },
                previous.map(|(n, s)| (IpNet::V4(n), IpNet::V4(s))),
            )
        });
        Firewall {
            ipt,
            rules: Arc::new(Vec::new()),
            pending: Some(Setup {
                masq,
                forward: flags.iptables_forward_rules.then_some(IpNet::V4(network)),
            }),
        }
    }

    /// Installs the rules the first time, then re-checks them (recreating the set if any
    /// rule went missing).
    pub(super) async fn ensure(&mut self) {
        let Some(ipt) = self.ipt.clone() else { return };
        if let Some(setup) = self.pending.take() {
            let setup = Arc::new(setup);
            let job = setup.clone();
            let done = tokio::task::spawn_blocking(move || -> Result<Vec<Rule>, String> {
                let setup = job;
                let mut rules = Vec::new();
                if let Some((cfg, prev)) = &setup.masq {
                    rules.extend(ipt.setup_masq(cfg, *prev).map_err(|e| e.to_string())?);
                }
                if let Some(net) = setup.forward {
                    rules.extend(ipt.setup_forward(net).map_err(|e| e.to_string())?);
                }
                Ok(rules)
            })
            .await;
            match done {
                Ok(Ok(rules)) => {
                    info!(rules = rules.len(), "firewall rules installed");
                    self.rules = Arc::new(rules);
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "installing firewall rules failed; retrying");
                    self.pending = Arc::into_inner(setup);
                }
                Err(e) => warn!(error = %e, "firewall task failed"),
            }
            return;
        }
        if self.rules.is_empty() {
            return;
        }
        match ensure_async(ipt, self.rules.clone()).await {
            Ok(true) => warn!("Some iptables rules are missing; deleting and recreating rules"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "checking firewall rules failed"),
        }
    }
}
