//! The data plane the daemon drives, whichever backend and mode the flags choose, and the
//! firewall rules that go with it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backend::handoff;
use crate::backend::hostgw::{HostGw, HostGwConfig};
use crate::backend::kernel::{onlink_public_ips, KernelVxlan, KernelVxlanConfig};
use crate::backend::userspace::{UserspaceConfig, UserspaceVxlan};
use crate::backend::Peer;
use crate::config::flags::{Dataplane, Flags};
use crate::config::netconf::BackendConfig;
use crate::dataplane::LocalVtep;
use crate::io::tun::TunOpenError;
use crate::masq::{ensure_async, GuardApplier, Iptables, MasqConfig, Nft, Rule, VxlanGuard};
use crate::netlink::{IpFamily, Netlink};
use crate::wire::MacAddr;

use super::backoff::{Backoff, Condition};
use super::extif::ExternalInterface;
use super::metrics::{PlaneMetrics, UserspaceCounters};

/// Longest one round of firewall work may take (each iptables command is also killed after
/// [`crate::masq::iptables::COMMAND_TIMEOUT`]).
const IPTABLES_TASK_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// `/dev/net/tun` is missing or cannot be opened (typically a container without it).
    #[error("{0}: the userspace data plane needs it; mount the host's /dev/net/tun into the container (hostPath /dev/net/tun, type: CharDevice) or run with --dataplane=kernel")]
    TunDevice(String),
    /// The kernel VXLAN device could not be set up.
    #[error(transparent)]
    Kernel(#[from] crate::backend::kernel::KernelError),
    /// host-gw could not start.
    #[error(transparent)]
    HostGw(#[from] crate::backend::hostgw::HostGwError),
    /// The external interface has no address of the lease's family.
    #[error("no address of the family of lease {0} on the external interface {1}")]
    NoAddress(IpNet, String),
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
        handoff: Handoff,
        /// DirectRouting: routes via the external interface to on-link peers.
        direct: Option<Box<HostGw>>,
        /// `--host-gw-fallback` (without DirectRouting, which already routes on-link peers
        /// directly): routes of the peers on the direct path.
        fallback: Option<Box<super::fallback_plane::FallbackRoutes>>,
        /// The IPv6 plane (`flannel-v6.<VNI>`): programs the IPv6 peers only.
        v6: bool,
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
        network: IpNet,
        subnet: IpNet,
        vtep_mac: Option<MacAddr>,
    ) -> Result<Plane, PlaneError> {
        // This family's (interface, public) addresses.
        let (iface_addr, public_ip) = ext
            .addrs(matches!(subnet, IpNet::V6(_)))
            .ok_or_else(|| PlaneError::NoAddress(subnet, ext.name.clone()))?;
        match (backend, vtep_mac) {
            (BackendConfig::Vxlan(vx), Some(mac)) if flags.dataplane == Dataplane::Userspace => {
                let v6 = subnet.addr().is_ipv6();
                // IPv6 runs beside IPv4 as upstream's flannel-v6.<VNI>: its own device,
                // socket on the v6 underlay address and VTEP MAC (backend-v6-data).
                let device = match v6 {
                    false => vx.device_name(),
                    true => crate::backend::kernel::device_name(vx.vni, IpFamily::V6),
                };
                let underlay_mtu = vx.mtu.unwrap_or(ext.mtu);
                let mtu = underlay_mtu.saturating_sub(crate::backend::kernel::overhead(iface_addr));
                let fail = |reason: String| PlaneError::Userspace {
                    device: device.clone(),
                    reason,
                };
                let nl = Netlink::connect().map_err(|e| fail(e.to_string()))?;
                let path = handoff_path(flags, &device);
                let (predecessor, inherited) = match path.as_deref() {
                    Some(p) => match handoff::connect(p, &device) {
                        Ok(Some((pred, inh))) => {
                            info!(
                                predecessor = pred.pid(),
                                %device,
                                "taking over the data plane of the running flanneld"
                            );
                            (Some(pred), Some(inh))
                        }
                        Ok(None) => (None, None),
                        Err(e) => {
                            warn!(error = %e, "no handover from a running flanneld; opening the device");
                            (None, None)
                        }
                    },
                    None => (None, None),
                };
                if inherited.is_none() {
                    remove_foreign_device(&nl, &device).await;
                }
                let cfg = UserspaceConfig {
                    device: device.clone(),
                    vni: vx.vni,
                    port: vx.vxlan_port(),
                    // The interface's own address: behind 1:1 NAT the public IP is not local.
                    bind: iface_addr,
                    mac,
                    local: local_vtep(vx.vni, mac, network, subnet),
                    tso: true,
                    mtu: mtu as usize,
                    queues: match flags.userspace_queues {
                        0 => crate::backend::userspace::default_queues(),
                        n => n as usize,
                    },
                    cpu_steering: flags.userspace_cpu_steering,
                };
                let handed_over = inherited.is_some();
                let dp = if handed_over {
                    UserspaceVxlan::start(&cfg, inherited)
                } else {
                    open_userspace(&nl, &cfg).await
                }
                .map_err(|e| {
                    match e.get_ref().and_then(|i| i.downcast_ref::<TunOpenError>()) {
                        Some(open) => PlaneError::TunDevice(open.to_string()),
                        None => fail(e.to_string()),
                    }
                })?;
                configure_tun(&nl, &device, mtu, network, subnet)
                    .await
                    .map_err(fail)?;
                let (tun_queues, sockets) = dp.queues();
                info!(%device, mtu, %mac, port = cfg.port, handed_over, tun_queues, sockets, "userspace VXLAN data plane ready");
                // DirectRouting and the host-gw fallback route on-link peers of this family the
                // same way, via their public IP of this family (upstream's v6DirectRoute).
                let direct_config = || HostGwConfig {
                    iface: ext.name.clone(),
                    iface_addr,
                    public_ip,
                    network,
                    subnet,
                };
                let direct = if vx.direct_routing {
                    let d = HostGw::setup_direct(direct_config())
                        .await
                        .map_err(|e| fail(format!("DirectRouting: {e}")))?;
                    info!(iface = %ext.name, "DirectRouting: on-link peers are routed via the external interface");
                    Some(Box::new(d))
                } else {
                    None
                };
                let fallback = if flags.host_gw_fallback && direct.is_none() {
                    let routes = HostGw::setup_direct(direct_config())
                        .await
                        .map_err(|e| fail(format!("host-gw fallback: {e}")))?;
                    Some(Box::new(super::fallback_plane::FallbackRoutes::new(
                        routes,
                        device.clone(),
                        network,
                    )))
                } else {
                    None
                };
                Ok(Plane::Userspace {
                    dp,
                    nl,
                    mtu,
                    handoff: Handoff::new(path, predecessor),
                    direct,
                    fallback,
                    v6,
                })
            }
            (BackendConfig::Vxlan(vx), Some(mac)) => {
                let kv = KernelVxlan::setup(KernelVxlanConfig {
                    vni: vx.vni,
                    underlay_ifname: ext.name.clone(),
                    local_ip: public_ip,
                    port: vx.port,
                    learning: vx.learning,
                    gbp: vx.gbp,
                    mtu: Some(vx.mtu.unwrap_or(ext.mtu)),
                    vtep_mac: mac,
                    network,
                    subnet,
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
                    iface_addr,
                    public_ip,
                    network,
                    subnet,
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
            Plane::Userspace { dp, .. } => PlaneMetrics::Userspace(vec![UserspaceCounters {
                counters: dp.counters().clone(),
                io_errors: dp.io_errors().clone(),
                queues: dp.queue_stats().clone(),
            }]),
            _ => PlaneMetrics::Kernel,
        }
    }

    /// Brings the data plane to the state `peers` ask for. `Err` summarises failed kernel
    /// operations (retried by the next sync); the caller logs it as a condition.
    pub(super) async fn sync(&mut self, peers: &[Peer]) -> Result<(), String> {
        match self {
            Plane::Userspace {
                dp,
                handoff,
                direct,
                fallback,
                v6,
                ..
            } => {
                let family = if *v6 { IpFamily::V6 } else { IpFamily::V4 };
                let (direct_peers, direct_result) = match direct.as_mut() {
                    Some(d) => sync_direct(d, family, peers).await,
                    None => (HashSet::new(), Ok(())),
                };
                // On-link peers are reached by their direct route: not encapsulated to.
                let tunneled: Vec<Peer> = peers
                    .iter()
                    .filter(|p| p.subnet.addr().is_ipv6() == *v6)
                    .filter(|p| !direct_peers.contains(&p.subnet))
                    .cloned()
                    .collect();
                dp.sync(&tunneled);
                if !dp.serving() {
                    start_serving(dp, handoff).await;
                } else if handoff.listener.as_ref().is_some_and(|l| l.released()) {
                    // Handed over: only the successor may hold the device now.
                    handoff.listener = None;
                    dp.close_handed_over();
                    info!("closed the handed-over device and socket");
                }
                match fallback.as_mut() {
                    Some(f) => {
                        let r = f.sync(peers).await;
                        direct_result.and(r)
                    }
                    None => direct_result,
                }
            }
            Plane::Kernel(k) => summarize(&k.sync(peers).await),
            Plane::HostGw(h) => summarize(&h.sync(peers).await),
        }
    }

    /// `--host-gw-fallback`: the vxlan peer subnets to route directly via their public IP
    /// from the next [`Plane::sync`] on (ignored with DirectRouting in userspace mode, which
    /// routes every on-link peer directly anyway, and for host-gw).
    pub(super) fn set_fallback(&mut self, subnets: HashSet<IpNet>) {
        match self {
            Plane::Userspace {
                fallback: Some(f), ..
            } => f.set(subnets),
            Plane::Kernel(k) => k.set_fallback(subnets),
            _ => {}
        }
    }

    /// Completes when the overlay device disappeared under us (kernel mode only).
    pub(super) async fn device_event(&self) {
        match self {
            Plane::Kernel(k) => k.device_gone().await,
            _ => std::future::pending().await,
        }
    }

    /// Recreates the overlay device after [`Plane::device_event`] and replays `peers`. `Err`
    /// when the device could not be recreated (the caller retries with backoff); failures
    /// of single peers are left to the next sync.
    pub(super) async fn recover(
        &mut self,
        peers: &[Peer],
    ) -> Result<(), crate::backend::kernel::KernelError> {
        if let Plane::Kernel(k) = self {
            let report = k.recover(peers).await?;
            if let Err(e) = summarize(&report) {
                warn!(error = %e, "after recreating the device");
            }
        }
        Ok(())
    }

    /// Entries of the userspace peer table (`None` for kernel forwarding).
    pub(super) fn peer_table_len(&self) -> Option<usize> {
        match self {
            Plane::Userspace { dp, .. } => Some(dp.peer_table_len()),
            _ => None,
        }
    }

    /// Packet loops restarted after a panic (userspace mode), for the daemon's panic budget.
    pub(super) fn packet_loop_panics(&self) -> Option<u64> {
        match self {
            Plane::Userspace { dp, .. } => Some(dp.io_errors().panics()),
            _ => None,
        }
    }

    /// Stops the data plane. Nothing is torn down: the userspace TUN device is persistent
    /// (the next start, or a successor that already took over, keeps its address and
    /// routes), and kernel and host-gw state stays so forwarding continues while the daemon
    /// is away.
    pub(super) async fn shutdown(self) {
        if let Plane::Userspace {
            dp, nl, handoff, ..
        } = self
        {
            if let Some(l) = handoff.listener {
                l.close();
            }
            let _ = tokio::task::spawn_blocking(move || dp.shutdown()).await;
            drop(nl);
        }
    }
}

/// How long a start waits for a device or port held by a process that offers no handover.
const BUSY_WAIT: Duration = Duration::from_secs(30);

/// Opens the userspace data plane without a handover. A persistent TUN/TAP device of our
/// name with other flags (EINVAL: another program's, or an incompatible version's) is not
/// ours: it is recreated. A device or port held by a process that offers no handover
/// (EBUSY/EADDRINUSE: a flanneld from before the handover, or one whose run directory we do
/// not share) is waited for, up to [`BUSY_WAIT`], then the start fails naming the cause.
async fn open_userspace(nl: &Netlink, cfg: &UserspaceConfig) -> std::io::Result<UserspaceVxlan> {
    let device = &cfg.device;
    let deadline = tokio::time::Instant::now() + BUSY_WAIT;
    let mut recreated = false;
    let mut waiting = false;
    loop {
        let e = match UserspaceVxlan::start(cfg, None) {
            Ok(dp) => {
                if waiting {
                    info!(%device, "the device and port are free now");
                }
                return Ok(dp);
            }
            Err(e) => e,
        };
        match e.raw_os_error() {
            Some(libc::EINVAL) if !recreated => {
                warn!(%device, error = %e, "the existing device is not a compatible TUN device; recreating it");
                if let Err(e) = nl.link_del_by_name(device).await {
                    warn!(%device, error = %e, "could not remove it");
                }
                recreated = true;
            }
            Some(libc::EBUSY | libc::EADDRINUSE) if tokio::time::Instant::now() < deadline => {
                if !waiting {
                    warn!(%device, port = cfg.port, error = %e, "the device or the VXLAN port is held by a process that offers no handover (a flanneld from before it?); waiting up to 30 s for it to exit");
                    waiting = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(libc::EBUSY | libc::EADDRINUSE) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{e}: still held after 30 s by a process that offers no handover (another flanneld without a shared run directory?)"),
                ))
            }
            _ => return Err(e),
        }
    }
}

/// Programs the direct routes of on-link vxlan peers; returns the subnets now routed directly
/// (a peer whose route failed stays on the tunnel) and the sync's failures in one line.
async fn sync_direct(
    d: &mut HostGw,
    family: IpFamily,
    peers: &[Peer],
) -> (HashSet<IpNet>, Result<(), String>) {
    let onlink = onlink_public_ips(d.netlink(), family, peers).await;
    let report = d.sync_direct(peers, &onlink).await;
    let mut failed = report.failed_peers();
    // A failure tied to no peer (reading the routes, the interface gone): nothing applied.
    let whole_sync_failed = !report.is_clean() && failed.is_empty();
    failed.extend(report.skipped.iter().map(|s| s.peer.subnet));
    let result = summarize(&report);
    if whole_sync_failed {
        return (HashSet::new(), result);
    }
    let direct = peers
        .iter()
        .filter(|p| onlink.contains(&p.public_ip))
        .map(|p| p.subnet)
        .filter(|s| !failed.contains(s))
        .collect();
    (direct, result)
}

/// Handover state of the userspace data plane.
#[derive(Debug)]
pub(super) struct Handoff {
    /// Where we listen for a successor (None: the run directory is unusable).
    path: Option<std::path::PathBuf>,
    /// The flanneld we took the descriptors from, until we serve.
    predecessor: Option<handoff::Predecessor>,
    /// Our own listener, once we serve.
    listener: Option<handoff::Listener>,
}

impl Handoff {
    fn new(path: Option<std::path::PathBuf>, predecessor: Option<handoff::Predecessor>) -> Self {
        Handoff {
            path,
            predecessor,
            listener: None,
        }
    }
}

/// Our VTEP for one family's userspace plane: the subnet's network address answers ARP/NDP;
/// ICMP errors come from Network's first address, never a node's (SubnetMin skips the first
/// subnet), so they pass the kernel's martian check on TUN.
fn local_vtep(vni: u32, mac: MacAddr, network: IpNet, subnet: IpNet) -> LocalVtep {
    use std::net::IpAddr;
    let first = network.network();
    let error_source = (first != subnet.network()).then_some(first);
    let v4 = |a: IpAddr| match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    };
    let v6 = |a: IpAddr| match a {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    };
    LocalVtep {
        vni,
        mac,
        addr_v4: v4(subnet.network()),
        addr_v6: v6(subnet.network()),
        error_source_v4: error_source.and_then(v4),
        error_source_v6: error_source.and_then(v6),
        subnet_v4: match subnet {
            IpNet::V4(s) => Some(s),
            IpNet::V6(_) => None,
        },
        subnet_v6: match subnet {
            IpNet::V6(s) => Some(s),
            IpNet::V4(_) => None,
        },
    }
}

/// The handover socket: next to subnet.env (`/run/flannel` by default, a hostPath both the old
/// and the new pod mount).
fn handoff_path(flags: &Flags, device: &str) -> Option<std::path::PathBuf> {
    let dir = flags.subnet_file.parent()?;
    let dir = if dir.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        dir
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        warn!(dir = %dir.display(), error = %e, "no run directory; zero-loss handover disabled");
        return None;
    }
    Some(handoff::socket_path(dir, device))
}

/// First sync done: start the packet threads, tell the predecessor (if any) to stop reading,
/// then listen for a successor.
async fn start_serving(dp: &mut UserspaceVxlan, state: &mut Handoff) {
    if let Err(e) = dp.serve() {
        warn!(error = %e, "starting the packet threads failed; retrying on the next sync");
        return;
    }
    if let Some(pred) = state.predecessor.take() {
        match tokio::task::spawn_blocking(move || pred.finish()).await {
            Ok(Ok(pid)) => info!(
                predecessor = pid,
                "the previous flanneld released the data plane"
            ),
            Ok(Err(e)) => {
                warn!(error = %e, "the previous flanneld did not confirm the handover; serving anyway")
            }
            Err(e) => warn!(error = %e, "handover task failed"),
        }
    }
    if let Some(path) = &state.path {
        let Some(handover) = dp.handover() else {
            return;
        };
        match handoff::Listener::spawn(path, dp.device(), handover) {
            Ok(l) => state.listener = Some(l),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot listen for a successor; zero-loss handover disabled")
            }
        }
    }
}

/// A failed sync in one line: how many peers and operations failed, and the first error.
fn summarize(report: &crate::backend::kernel::SyncReport) -> Result<(), String> {
    if report.device_missing {
        return Err("the overlay device is missing".into());
    }
    let Some(first) = report.failures.first() else {
        return Ok(());
    };
    let peers = report.failed_peers();
    let shown: Vec<String> = peers.iter().take(3).map(ToString::to_string).collect();
    Err(format!(
        "{} operation(s) failed for {} peer(s) ({}{}); first: {}: {}",
        report.failures.len(),
        peers.len(),
        shown.join(", "),
        if peers.len() > shown.len() {
            ", …"
        } else {
            ""
        },
        first.op,
        first.error
    ))
}

/// A kernel vxlan device left by upstream flannel or our kernel mode under the name the
/// userspace device needs: removed, as flannel itself recreates incompatible devices.
async fn remove_foreign_device(nl: &Netlink, device: &str) {
    match nl.remove_non_tun(device).await {
        Ok(Some(kind)) => warn!(
            %device, %kind,
            "removed the existing non-TUN device of the same name (left by kernel mode or upstream flannel)"
        ),
        Ok(None) => {}
        Err(e) => {
            warn!(%device, error = %e, "could not remove the existing non-TUN device of the same name")
        }
    }
}

/// The TUN device's MTU, address and Network route ([`Netlink::configure_tun`]), with what it
/// had to change logged.
async fn configure_tun(
    nl: &Netlink,
    device: &str,
    mtu: u32,
    network: IpNet,
    subnet: IpNet,
) -> Result<(), String> {
    let report = nl
        .configure_tun(device, mtu, network, subnet)
        .await
        .map_err(|e| e.to_string())?;
    for stale in &report.removed {
        warn!(%device, address = %stale, "removed an address our lease no longer has");
    }
    for (stale, e) in &report.not_removed {
        warn!(%device, address = %stale, error = %e, "could not remove an address our lease no longer has");
    }
    Ok(())
}

/// The MAC of an existing `flannel.<VNI>` (`flannel-v6.<VNI>`) vxlan device, for kernel
/// mode restarts.
pub(super) async fn existing_device_mac(
    flags: &Flags,
    vni: u32,
    family: IpFamily,
) -> Option<MacAddr> {
    if flags.dataplane != Dataplane::Kernel {
        return None;
    }
    let nl = Netlink::connect().ok()?;
    let name = crate::backend::kernel::device_name(vni, family);
    let link = nl.link_by_name(&name).await.ok()??;
    (link.kind.as_deref() == Some("vxlan")).then_some(link.mac?)
}

/// flannel's masquerade and forward rules, installed once and re-checked periodically.
#[derive(Debug)]
pub(super) struct Firewall {
    ipt: Option<Arc<Iptables>>,
    rules: Arc<Vec<Rule>>,
    pending: Option<Arc<Setup>>,
    /// nftables mode: flannel's tables instead of the iptables rules.
    nft: Option<super::nftfw::NftFirewall>,
}

#[derive(Debug)]
struct Setup {
    masq: Option<(MasqConfig, Option<(IpNet, IpNet)>)>,
    forward: Option<IpNet>,
}

impl Firewall {
    pub(super) fn new(
        flags: &Flags,
        network: IpNet,
        subnet: IpNet,
        previous: Option<(IpNet, IpNet)>,
    ) -> Firewall {
        let wanted = flags.ip_masq || flags.iptables_forward_rules;
        let ipt = if wanted {
            match Iptables::detect(IpFamily::of_net(network)) {
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
                    network,
                    subnet,
                    random_fully: flags.ip_masq_fully_random_disable.then_some(false),
                },
                previous,
            )
        });
        Firewall {
            ipt,
            rules: Arc::new(Vec::new()),
            pending: Some(Arc::new(Setup {
                masq,
                forward: flags.iptables_forward_rules.then_some(network),
            })),
            nft: None,
        }
    }

    /// flannel's nftables tables (`EnableNFTables`) instead of the iptables rules.
    pub(super) fn nftables(nft: super::nftfw::NftFirewall) -> Firewall {
        Firewall {
            ipt: None,
            rules: Arc::new(Vec::new()),
            pending: None,
            nft: Some(nft),
        }
    }

    /// Installs the rules, then re-checks them every `period` (recreating the set if any rule
    /// went missing), in its own task: a stuck `iptables -w` (held xtables lock) never delays
    /// lease handling or shutdown. Failures are retried with backoff and logged as one
    /// condition.
    /// `first_round` is told when the first installation attempt ended (whatever its result).
    pub(super) async fn run(
        mut self,
        period: Duration,
        mut first_round: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut backoff = Backoff::new(Duration::from_secs(1), period.max(Duration::from_secs(1)));
        let mut failing = Condition::new("installing or checking firewall rules");
        loop {
            let wait = match tokio::time::timeout(IPTABLES_TASK_TIMEOUT, self.ensure()).await {
                Ok(Ok(())) => {
                    failing.clear();
                    backoff.reset();
                    period
                }
                Ok(Err(e)) => {
                    failing.fail(&e);
                    backoff.next_random()
                }
                Err(_) => {
                    failing.fail(&format!(
                        "no answer from iptables within {IPTABLES_TASK_TIMEOUT:?}"
                    ));
                    backoff.next_random()
                }
            };
            if let Some(tx) = first_round.take() {
                let _ = tx.send(());
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Installs the rules the first time, then re-checks them.
    async fn ensure(&mut self) -> Result<(), String> {
        if let Some(nft) = &mut self.nft {
            return nft.ensure().await;
        }
        let Some(ipt) = self.ipt.clone() else {
            return Ok(());
        };
        // Cloned, not taken: if this round is abandoned (timeout), the next one retries.
        if let Some(setup) = self.pending.clone() {
            let done = tokio::task::spawn_blocking(move || -> Result<Vec<Rule>, String> {
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
            return match done {
                Ok(Ok(rules)) => {
                    info!(rules = rules.len(), "firewall rules installed");
                    self.rules = Arc::new(rules);
                    self.pending = None;
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(format!("firewall task failed: {e}")),
            };
        }
        if self.rules.is_empty() {
            return Ok(());
        }
        match ensure_async(ipt, self.rules.clone()).await {
            Ok(true) => {
                warn!("Some iptables rules are missing; deleting and recreating rules");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The VXLAN guard chains (`masq::guard`): kept equal to the current peers' public IPs right
/// after every peer-set change (as the data plane), and re-checked with flannel's rules.
#[derive(Debug)]
pub(super) struct VxlanGuardRules {
    ipt: Option<GuardApplier>,
    port: u16,
    network: IpNet,
    allow_list: bool,
    /// The peers' public IPs of the last sync; `None` before the first lease snapshot.
    wanted: Option<Vec<std::net::IpAddr>>,
    /// Whether the last apply of `wanted` succeeded.
    in_place: bool,
}

impl VxlanGuardRules {
    /// Guard rules for a vxlan backend (both data planes; the allow-list in kernel mode
    /// only); `None` for host-gw.
    pub(super) fn new(
        flags: &Flags,
        backend: &BackendConfig,
        network: IpNet,
        nftables: bool,
    ) -> Option<VxlanGuardRules> {
        let BackendConfig::Vxlan(vx) = backend else {
            return None;
        };
        // In nftables mode the guard is a table of ours (`masq::nft`), not iptables chains.
        let ipt = if nftables {
            match Nft::detect() {
                Ok(n) => Some(GuardApplier::Nft(Arc::new(n))),
                Err(e) => {
                    warn!(error = %e, "nft unavailable; VXLAN guard rules not installed");
                    None
                }
            }
        } else {
            match Iptables::detect(IpFamily::of_net(network)) {
                Ok(i) => Some(GuardApplier::Iptables(Arc::new(i))),
                Err(e) => {
                    warn!(error = %e, "iptables unavailable; VXLAN guard rules not installed");
                    None
                }
            }
        };
        Some(VxlanGuardRules {
            ipt,
            port: vx.vxlan_port(),
            network,
            allow_list: flags.dataplane == Dataplane::Kernel,
            wanted: None,
            in_place: false,
        })
    }

    /// Keeps the rules in step with the peers (at once on every change, before the first
    /// lease snapshot nothing is installed) and repairs them every `period`.
    pub(super) async fn run(mut self, mut peers: watch::Receiver<Vec<Peer>>, period: Duration) {
        let mut repair = tokio::time::interval(period);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = peers.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let current = peers.borrow_and_update().clone();
                    let _ = tokio::time::timeout(IPTABLES_TASK_TIMEOUT, self.sync(&current)).await;
                }
                _ = repair.tick() => {
                    let _ = tokio::time::timeout(IPTABLES_TASK_TIMEOUT, self.ensure()).await;
                }
            }
        }
    }

    /// Applies the allow-list of `peers` if it changed since the last successful apply.
    pub(super) async fn sync(&mut self, peers: &[Peer]) {
        let mut ips: Vec<std::net::IpAddr> = peers.iter().map(|p| p.public_ip).collect();
        ips.sort();
        ips.dedup();
        if self.in_place && self.wanted.as_ref() == Some(&ips) {
            return;
        }
        self.wanted = Some(ips);
        self.in_place = false;
        self.apply().await;
    }

    /// The periodic check: retries a failed apply, repairs chains and jumps changed by hand.
    pub(super) async fn ensure(&mut self) {
        if self.wanted.is_some() {
            self.apply().await;
        }
    }

    async fn apply(&mut self) {
        let (Some(ipt), Some(ips)) = (self.ipt.clone(), self.wanted.clone()) else {
            return;
        };
        let peers = ips.len();
        let guard = VxlanGuard {
            port: self.port,
            network: self.network,
            peers: ips,
            allow_list: self.allow_list,
        };
        let done = tokio::task::spawn_blocking(move || ipt.sync_vxlan_guard(&guard)).await;
        match done {
            Ok(Ok(changed)) => {
                if changed && self.in_place {
                    warn!("VXLAN guard rules were changed under us; rewritten");
                } else if changed {
                    info!(peers, port = self.port, "VXLAN guard rules updated");
                }
                self.in_place = true;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "updating the VXLAN guard rules failed; retrying");
                self.in_place = false;
            }
            Err(e) => warn!(error = %e, "VXLAN guard task failed"),
        }
    }
}
