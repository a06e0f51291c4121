//! Daemon wiring: flags → store → network config → external interface → backend → lease →
//! firewall rules → subnet.env → watch loop (plan, then reconcile).
//!
//! Start-up follows flanneld's order (compat §2); anything that fails before the node is
//! ready ends the process with a message naming the cause.

pub mod backoff;
mod blackhole;
pub mod compat;
mod dual;
pub mod extif;
pub mod fallback;
mod fallback_plane;
pub mod http;
pub mod metrics;
mod nftfw;
pub mod notify;
mod plane;
pub mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::backend::intake::{intake, IntakeConfig, NodeBackend, RefusalLog};
use crate::backend::Peer;
use crate::config::flags::Flags;
use crate::config::netconf::{BackendConfig, NetConfig, NetConfigError};
use crate::config::subnet_env::{read_previous_subnets, SubnetEnv};
use crate::lease::store::{LeaseStore, StoreError, WatchUpdate};
use crate::lease::{LeaseAttrs, LeaseWatcher};
use crate::wire::MacAddr;

use self::backoff::{Backoff, Condition};
use self::dual::{Families, Planes};
use self::extif::{ExternalInterface, IpStack, SelectError, Selection};
use self::metrics::DaemonMetrics;
use crate::netlink::{IpFamily, Netlink, NetlinkError};

/// How often every peer is re-applied even without lease changes (flannel's host-gw route
/// check period); repairs routes, neighbours and FDB entries removed by hand.
const RESYNC: Duration = Duration::from_secs(10);

/// Longest one netlink pass (a sync or a device recreation) may take; an abandoned pass is
/// retried by the next one (each sync re-reads the kernel's state).
const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the overlay device may stay impossible to recreate before the daemon gives up
/// and exits non-zero, so that its supervisor restarts it (and interface selection runs
/// again).
const RECOVERY_GIVE_UP: Duration = Duration::from_secs(300);

/// Packet-loop panics tolerated within [`PANIC_WINDOW`] before the daemon exits: a loop
/// that keeps panicking is a node without a working data path.
const PANIC_LIMIT: u64 = 5;
const PANIC_WINDOW: Duration = Duration::from_secs(60);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A flag combination this build does not support yet.
    #[error("{0}")]
    Unsupported(String),
    /// The network config is invalid.
    #[error("invalid network config: {0}")]
    NetConfig(#[from] NetConfigError),
    /// The lease store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The lease store could not be opened.
    #[error(transparent)]
    OpenStore(#[from] crate::lease::OpenError),
    /// A netlink request failed (the error names the equivalent `ip` command).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// No usable external interface.
    #[error(transparent)]
    Interface(#[from] SelectError),
    /// Backend or lease set-up failed (flannel's wording).
    #[error("Error registering network: {0}")]
    Register(String),
    /// The lease watch task ended (it panicked or its channel closed): without it the node
    /// never learns about peers again.
    #[error("the lease watch ended unexpectedly; exiting so that flanneld is restarted")]
    WatchEnded,
    /// The overlay device cannot be recreated because the external interface is gone.
    #[error("external interface {iface} lost: {reason} (recreating the overlay device failed for {lasted:?}); exiting so that flanneld is restarted")]
    InterfaceLost {
        /// The external interface chosen at start-up.
        iface: String,
        /// How long recovery was tried.
        lasted: Duration,
        /// The last error, or which interface would be chosen now.
        reason: String,
    },
    /// Userspace packet loops keep panicking.
    #[error("userspace packet loops panicked {count} times within {window:?}; exiting so that flanneld is restarted")]
    PacketLoopsPanicking {
        /// Panics within the window.
        count: u64,
        /// The window.
        window: Duration,
    },
    /// An OS call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

/// Runs flanneld until `shutdown` completes.
pub async fn run(flags: Flags, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    info!("CLI flags config: {flags:?}");
    let store = crate::lease::open(&flags).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(DaemonMetrics::default());
    start_http(&flags, &ready, &metrics).await?;
    tokio::pin!(shutdown);

    let json = tokio::select! {
        j = fetch_config(store.as_ref()) => j,
        _ = &mut shutdown => return Ok(()),
    };
    let net = NetConfig::parse(&json)?;
    // flannel validates allocation settings only where it allocates (etcd); the Kubernetes
    // manager takes podCIDRs as they are.
    if !flags.kube_subnet_mgr {
        net.validate()?;
    }
    let stack = dual::stack_of(&net)?;
    let backend = net.backend()?.clone();
    let env = |name: &str| std::env::var(name).ok();
    let decision = compat::check(&flags, &net, &env);
    for w in &decision.ignored {
        warn!("{w}");
    }
    if !decision.refused.is_empty() {
        return Err(DaemonError::Unsupported(decision.refused.join("; ")));
    }
    let mut flags = flags;
    match store.stored_public_ips().await {
        // kube: the node-public-ip(v6) annotations act like --public-ip(v6) (flannel ≥ v0.25.3).
        Ok((v4, v6)) => {
            if let Some(ip) = v4 {
                info!(%ip, "using the public IP stored for this node");
                flags.public_ip = Some(ip);
            }
            if let Some(ip) = v6.filter(|_| stack.v6()) {
                info!(%ip, "using the public IPv6 stored for this node");
                flags.public_ipv6 = Some(ip);
            }
        }
        Err(e @ StoreError::Unavailable { .. }) => {
            warn!(error = %e, "could not read stored public IP")
        }
        Err(e) => return Err(e.into()),
    }
    let ext = external_interface(&flags, stack).await?;
    info!(
        iface = %ext.name, iface_addr = %ext.iface_addr, ext_addr = %ext.ext_addr,
        iface_v6_addr = ?ext.iface_v6_addr, ext_v6_addr = ?ext.ext_v6_addr,
        "using interface"
    );

    let previous = read_previous_subnets(&flags.subnet_file);
    let mut attrs = LeaseAttrs {
        public_ip: ext.ext_addr,
        public_ipv6: ext.ext_v6_addr,
        backend_type: backend.kind().to_owned(),
        ..LeaseAttrs::default()
    };
    let vtep_macs = match &backend {
        BackendConfig::Vxlan(vx) => {
            let mut macs = (None, None);
            for family in [IpFamily::V4, IpFamily::V6] {
                let v6 = family == IpFamily::V6;
                if (v6 && !stack.v6()) || (!v6 && !stack.v4()) {
                    continue;
                }
                let mac = choose_vtep_mac(store.as_ref(), &ext, vx.vni, &flags, family).await;
                let data = Some(
                    crate::lease::VxlanBackendData {
                        vni: vx.vni,
                        vtep_mac: mac,
                    }
                    .to_raw(),
                );
                if v6 {
                    (attrs.backend_v6_data, macs.1) = (data, Some(mac));
                } else {
                    (attrs.backend_data, macs.0) = (data, Some(mac));
                }
            }
            macs
        }
        BackendConfig::HostGw => {
            dual::check_host_gw_not_nat(&ext)?;
            (None, None)
        }
        BackendConfig::Other { kind } => {
            return Err(DaemonError::Unsupported(format!(
                "unknown backend type: {kind} (flannel-rs implements vxlan and host-gw)"
            )))
        }
    };

    let lease = store.acquire(&net, &attrs, &previous).await?;
    let families = Families::of_lease(&net, &lease)?;
    info!(subnet = ?lease.subnet, ipv6_subnet = ?lease.ipv6_subnet, store = %store.name(), "acquired lease");

    let mut plane = Planes::start(&flags, &backend, &ext, &families, vtep_macs)
        .await
        .map_err(|e| DaemonError::Register(e.to_string()))?;
    let mtu = plane.mtu();
    metrics.set_plane(plane.metrics_source());

    let previous_env = SubnetEnv::read(&flags.subnet_file).ok();
    let (peers_tx, peers_rx) = watch::channel(Vec::<Peer>::new());
    // --host-gw-fallback: the prober publishes the subnets to route directly.
    let (fallback_tx, mut fallback_rx) = watch::channel(std::collections::HashSet::new());
    let fallback = host_gw_fallback(&flags, &backend).map(|policy| {
        info!(damping = ?policy.damping, "host-gw fallback on: on-link peers whose VTEP stops answering are routed directly");
        probe::Fallback::new(policy, fallback_tx)
    });
    let prober = (flags.peer_probe_interval > 0).then(|| {
        let interval = Duration::from_secs(u64::from(flags.peer_probe_interval));
        let ctx = probe::ProbeContext::new(&flags, &backend);
        info!(?interval, "probing peers");
        tokio::spawn(probe::run(
            interval,
            ctx,
            peers_rx,
            metrics.clone(),
            fallback,
        ))
    });
    let nftables = net.enable_nftables;
    let nets = families.nets();
    let firewalls = if nftables {
        let [v4, v6] = [0, 1].map(|i| {
            nets.iter()
                .copied()
                .find(|(n, _)| i == usize::from(matches!(n, ipnet::IpNet::V6(_))))
        });
        vec![plane::Firewall::nftables(nftfw::NftFirewall::new(
            &flags, v4, v6,
        ))]
    } else {
        nets.iter()
            .map(|&(network, subnet)| {
                let previous = previous_env.and_then(|e| match network {
                    ipnet::IpNet::V4(_) => {
                        e.network.zip(e.subnet).map(|(n, s)| (n.into(), s.into()))
                    }
                    ipnet::IpNet::V6(_) => e
                        .ipv6_network
                        .zip(e.ipv6_subnet)
                        .map(|(n, s)| (n.into(), s.into())),
                });
                plane::Firewall::new(&flags, network, subnet, previous)
            })
            .collect()
    };
    let fw_period = Duration::from_secs(u64::from(flags.iptables_resync.max(1)));
    let (first_round, installed) = tokio::sync::oneshot::channel();
    // As flannel (v0.27+): the other mode's rules are removed before ours are installed.
    let firewall_task = tokio::spawn(async move {
        nftfw::cleanup_other_mode(nftables).await;
        dual::run_firewalls(firewalls, fw_period, first_round).await
    });
    // As flannel, rules are in place before subnet.env says the node is ready; but a stuck
    // iptables delays neither SIGTERM nor, after its timeout, start-up.
    tokio::select! {
        _ = installed => {}
        _ = &mut shutdown => {
            firewall_task.abort();
            return Ok(());
        }
    }
    // The VXLAN guard chains follow the peers in their own task (a stuck iptables cannot
    // hold lease handling or SIGTERM).
    let guard_tasks: Vec<_> = nets
        .iter()
        .filter_map(|&(network, _)| {
            plane::VxlanGuardRules::new(&flags, &backend, network, nftables)
        })
        .map(|guard| tokio::spawn(guard.run(peers_tx.subscribe(), fw_period)))
        .collect();

    // --ip-blackhole-route: kept in place every --iptables-resync seconds, like flannel, in
    // its own task so a stuck netlink call cannot hold the main loop.
    if flags.ip_blackhole_route && families.v4.is_none() {
        warn!("--ip-blackhole-route adds an IPv4 route (flannel's AddBlackholeV4Route) and IPv4 is not enabled: no effect");
    }
    let blackhole_task = flags
        .ip_blackhole_route
        .then_some(families.v4)
        .flatten()
        .map(|(_, subnet)| {
            let mut blackhole = blackhole::Blackhole::new(subnet);
            tokio::spawn(async move {
                loop {
                    let _ = tokio::time::timeout(NETLINK_TIMEOUT, blackhole.ensure()).await;
                    tokio::time::sleep(fw_period).await;
                }
            })
        });
    let env = families.subnet_env(mtu, flags.ip_masq);
    match env.write_atomic(&flags.subnet_file) {
        Ok(()) => {
            ready.store(true, Ordering::Relaxed);
            info!(file = %flags.subnet_file.display(), "wrote subnet file; flannel is ready");
        }
        Err(e) => {
            warn!(file = %flags.subnet_file.display(), error = %e, "failed to write subnet file")
        }
    }
    // Like flanneld, tell systemd (Type=notify units) once the subnet file step is done.
    match notify::notify_ready() {
        Ok(true) => debug!("sent READY=1 to NOTIFY_SOCKET"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET)"),
    }

    if let Err(e) = store.mark_network_available().await {
        warn!(error = %e, "could not mark the node's network available");
    }
    let store: Arc<dyn LeaseStore> = Arc::from(store);
    let (tx, mut rx) = mpsc::channel(64);
    let watch_task = tokio::spawn(supervise_watch(store.clone(), tx));
    let mut watcher = LeaseWatcher::new(lease.subnet, lease.ipv6_subnet);
    let intake_cfg = intake_config(&flags, &net, &backend, &families, &ext);
    let mut refusal_log = RefusalLog::default();
    let mut peers: Vec<Peer> = Vec::new();
    // Nothing is programmed (or removed as stale) before the store's first snapshot: an
    // empty peer set at start-up would tear down every peer's entries of a restarted daemon.
    let mut synced = false;
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sync_failing = Condition::new("programming peers");
    // Device recreation: the next attempt's time while the device is gone.
    let mut recovery: Option<tokio::time::Instant> = None;
    let mut recover_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut recover_failing = Condition::new("recreating the overlay device");
    let mut panics = PanicBudget::new(PANIC_LIMIT, PANIC_WINDOW);
    let mut health = tokio::time::interval(Duration::from_secs(1));

    let complete = store.complete_lease(&lease);
    tokio::pin!(complete);
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = &mut complete => {
                // Only returns when our own lease is gone (etcd): flannel shuts down then.
                if let Err(e) = r {
                    outcome = Err(DaemonError::Store(e));
                }
                break;
            }
            update = rx.recv() => {
                let Some(update) = update else {
                    // The sender lives in the watch task: it ended or panicked.
                    outcome = Err(DaemonError::WatchEnded);
                    break;
                };
                // A burst (many Nodes changed at once, a relist) is planned and applied once:
                // take what is already queued before syncing the plane.
                let mut queued = vec![update];
                while queued.len() <= MAX_DRAIN {
                    let Ok(more) = rx.try_recv() else { break };
                    queued.push(more);
                }
                let events = watcher.apply_all(queued);
                for ev in &events {
                    debug!(event = ?ev, "lease event");
                }
                if events.is_empty() && synced {
                    continue;
                }
                peers = current_peers(&watcher, &intake_cfg, &mut refusal_log, &metrics);
                // While the device is gone, recovery replays the latest peers.
                if recovery.is_none() {
                    sync_plane(&mut plane, &peers, &mut sync_failing).await;
                }
                metrics.set_peers(peers.len());
                if let Some(n) = plane.peer_table_len() {
                    metrics.set_peer_table(n);
                }
                peers_tx.send_replace(peers.clone());
                synced = true;
            }
            _ = resync.tick(), if synced && recovery.is_none() => {
                sync_plane(&mut plane, &peers, &mut sync_failing).await;
            }
            Ok(()) = fallback_rx.changed() => {
                plane.set_fallback(fallback_rx.borrow_and_update().clone());
                if synced && recovery.is_none() {
                    sync_plane(&mut plane, &peers, &mut sync_failing).await;
                }
            }
            () = plane.device_event(), if recovery.is_none() => {
                warn!("overlay device changed under us; recreating it and replaying every peer");
                recovery = Some(tokio::time::Instant::now());
            }
            () = sleep_until_some(recovery) => {
                let result = match tokio::time::timeout(NETLINK_TIMEOUT, plane.recover(&peers)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer from netlink within {NETLINK_TIMEOUT:?}")),
                };
                match result {
                    Ok(()) => {
                        recover_failing.clear();
                        recover_backoff.reset();
                        recovery = None;
                    }
                    Err(e) => {
                        recover_failing.fail(&e);
                        if let Some(reason) = give_up_recovery(&flags, stack, &ext, &recover_failing, &e).await {
                            outcome = Err(DaemonError::InterfaceLost {
                                iface: ext.name.clone(),
                                lasted: recover_failing
                                    .duration(std::time::Instant::now())
                                    .unwrap_or_default(),
                                reason,
                            });
                            break;
                        }
                        recovery = Some(tokio::time::Instant::now() + recover_backoff.next_random());
                    }
                }
            }
            _ = health.tick() => {
                if let Some(total) = plane.packet_loop_panics() {
                    if let Some(count) = panics.observe(total, std::time::Instant::now()) {
                        outcome = Err(DaemonError::PacketLoopsPanicking {
                            count,
                            window: PANIC_WINDOW,
                        });
                        break;
                    }
                }
            }
        }
    }
    watch_task.abort();
    firewall_task.abort();
    for g in guard_tasks {
        g.abort();
    }
    if let Some(b) = blackhole_task {
        b.abort();
    }
    if let Some(p) = prober {
        p.abort();
    }
    info!("shutting down");
    plane.shutdown().await;
    if outcome.is_ok() {
        info!("Exiting cleanly...");
    }
    outcome
}

/// The `--host-gw-fallback` policy, if it applies: a vxlan backend and a running prober.
fn host_gw_fallback(flags: &Flags, backend: &BackendConfig) -> Option<fallback::Policy> {
    if !flags.host_gw_fallback {
        return None;
    }
    if !matches!(backend, BackendConfig::Vxlan(_)) {
        warn!(
            backend = backend.kind(),
            "--host-gw-fallback applies to the vxlan backend only; ignored"
        );
        return None;
    }
    if flags.peer_probe_interval == 0 {
        warn!("--host-gw-fallback needs the peer probes (--peer-probe-interval > 0); ignored");
        return None;
    }
    Some(fallback::Policy {
        // The same count that makes the prober name a peer unreachable.
        after: probe::UNREACHABLE_AFTER,
        damping: Duration::from_secs(u64::from(flags.host_gw_fallback_damping)),
    })
}

/// Fetches the network config, retrying forever like flannel (which retries every second;
/// here with backoff up to 10 s, logged once per minute while it fails).
async fn fetch_config(store: &dyn LeaseStore) -> String {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut failing = Condition::new("fetching the network config");
    loop {
        match store.network_config().await {
            Ok(json) => {
                failing.clear();
                return json;
            }
            Err(e) => {
                failing.fail(&e);
                tokio::time::sleep(backoff.next_random()).await;
            }
        }
    }
}

/// One sync of the data plane, bounded by [`NETLINK_TIMEOUT`]; failures are one condition.
async fn sync_plane(plane: &mut Planes, peers: &[Peer], failing: &mut Condition) {
    match tokio::time::timeout(NETLINK_TIMEOUT, plane.sync(peers)).await {
        Ok(Ok(())) => failing.clear(),
        Ok(Err(e)) => failing.fail(&format!("{e}; retrying on the next sync")),
        Err(_) => failing.fail(&format!(
            "no answer from netlink within {NETLINK_TIMEOUT:?}; retrying on the next sync"
        )),
    }
}

/// Most queued lease updates folded into one plane sync (a bound, so a store that never stops
/// sending cannot starve the other branches of the loop).
const MAX_DRAIN: usize = 4096;

/// Completes at `at`, never when `None` (a disabled `select!` branch).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Whether to stop retrying the device's recreation, and why: the flags would now choose
/// another external interface (a restart picks it up), or recreation has failed for
/// [`RECOVERY_GIVE_UP`].
async fn give_up_recovery(
    flags: &Flags,
    stack: IpStack,
    ext: &ExternalInterface,
    failing: &Condition,
    error: &str,
) -> Option<String> {
    if let Ok(now) = external_interface(flags, stack).await {
        if now.name != ext.name {
            return Some(format!(
                "{error}; the flags now select interface {} instead",
                now.name
            ));
        }
    }
    let lasted = failing.duration(std::time::Instant::now())?;
    (lasted >= RECOVERY_GIVE_UP).then(|| error.to_owned())
}

/// Counts packet-loop panics over a sliding window (fed the cumulative counter).
#[derive(Debug)]
struct PanicBudget {
    limit: u64,
    window: Duration,
    /// (time, cumulative count) samples; the first is the newest one at or before the
    /// window's start.
    samples: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl PanicBudget {
    fn new(limit: u64, window: Duration) -> PanicBudget {
        PanicBudget {
            limit,
            window,
            samples: std::collections::VecDeque::new(),
        }
    }

    /// Records the cumulative count at `now`; `Some(panics within the window)` once they
    /// reach the limit.
    fn observe(&mut self, total: u64, now: std::time::Instant) -> Option<u64> {
        self.samples.push_back((now, total));
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
        let base = self.samples.front().map_or(0, |(_, c)| *c);
        let recent = total.saturating_sub(base);
        (recent >= self.limit).then_some(recent)
    }
}

async fn start_http(
    flags: &Flags,
    ready: &Arc<AtomicBool>,
    metrics: &Arc<DaemonMetrics>,
) -> Result<(), DaemonError> {
    if flags.metrics_port > 0 && flags.metrics_port == flags.healthz_port {
        return Err(DaemonError::Unsupported(format!(
            "--metrics-port {} equals --healthz-port: /metrics is served on its own port (bound to --metrics-ip, {} by default) so the health port does not publish peer addresses; pick another port",
            flags.metrics_port, flags.metrics_ip
        )));
    }
    if flags.healthz_port > 0 {
        let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let health = http::Endpoints::Health {
            ready: ready.clone(),
        };
        http::spawn(addr, health)
            .await
            .map_err(io_err(format!("listen on {addr}")))?;
        info!(%addr, "serving /healthz and /readyz");
    }
    if flags.metrics_port > 0 {
        let addr = SocketAddr::new(flags.metrics_ip, flags.metrics_port);
        let m = metrics.clone();
        http::spawn(addr, http::Endpoints::Metrics(Arc::new(move || m.render())))
            .await
            .map_err(io_err(format!("listen on {addr}")))?;
        info!(%addr, "serving /metrics");
    }
    Ok(())
}

/// The external interface flannel's rules select for these flags and families (compat §2.1),
/// from what netlink reports of the current namespace.
pub async fn external_interface(
    flags: &Flags,
    stack: IpStack,
) -> Result<ExternalInterface, DaemonError> {
    let nl = Netlink::connect()?;
    let ifaces = nl.interfaces().await?;
    let (nl, ifaces) = (&nl, &ifaces);
    let default_route = |family| async move {
        let index = nl.default_route_index(family).await.unwrap_or(None)?;
        ifaces
            .iter()
            .find(|i| i.index == index)
            .map(|i| i.name.clone())
    };
    let default_route_v4 = default_route(IpFamily::V4).await;
    let default_route_v6 = if stack.v6() {
        default_route(IpFamily::V6).await
    } else {
        None
    };
    let can_reach_source = match flags.iface_can_reach {
        Some(ip) => Some(nl.source_for(ip).await?),
        None => None,
    };
    Ok(extif::select(
        ifaces,
        &Selection {
            iface: &flags.iface,
            iface_regex: &flags.iface_regex,
            can_reach_source,
            public_ip: flags.public_ip,
            default_route_iface: default_route_v4.as_deref(),
            stack,
            public_ipv6: flags.public_ipv6,
            default_route_iface_v6: default_route_v6.as_deref(),
        },
    )?)
}

/// The VTEP MAC of `family`'s device to publish: the one our previous lease (same public IP)
/// carried, so peers' entries stay valid across restarts; else the existing kernel device's;
/// else a new random locally administered address.
async fn choose_vtep_mac(
    store: &dyn LeaseStore,
    ext: &ExternalInterface,
    vni: u32,
    flags: &Flags,
    family: IpFamily,
) -> MacAddr {
    let v6 = family == IpFamily::V6;
    if let Ok(stored) = store.stored_vtep_macs().await {
        if let Some(mac) = if v6 { stored.1 } else { stored.0 }.filter(MacAddr::is_unicast) {
            info!(%mac, %family, "reusing the VTEP MAC stored for this node");
            return mac;
        }
    }
    if let Ok(leases) = store.list().await {
        let previous = leases
            .iter()
            .filter(|l| match v6 {
                false => l.attrs.public_ip == ext.ext_addr,
                true => l.attrs.public_ipv6.is_some() && l.attrs.public_ipv6 == ext.ext_v6_addr,
            })
            .find_map(|l| match v6 {
                false => l.attrs.vxlan_data().ok().flatten(),
                true => l.attrs.vxlan_v6_data().ok().flatten(),
            })
            .filter(|d| d.vni == vni && d.vtep_mac.is_unicast());
        if let Some(d) = previous {
            info!(mac = %d.vtep_mac, "reusing the VTEP MAC of our previous lease");
            return d.vtep_mac;
        }
    }
    if let Some(mac) = plane::existing_device_mac(flags, vni, family).await {
        info!(%mac, "reusing the VTEP MAC of the existing device");
        return mac;
    }
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        // Fall back to something unique per node rather than failing start-up.
        bytes[2..].copy_from_slice(&ext.ext_addr.octets());
    }
    MacAddr::local_unicast(bytes)
}

/// Restarts the store watch after failures (store outage): the data plane keeps forwarding
/// with the peers it has meanwhile.
/// Returning drops `tx`, which the main loop reads as a dead watch (an error exit) unless it
/// is shutting down anyway.
async fn supervise_watch(store: Arc<dyn LeaseStore>, tx: mpsc::Sender<WatchUpdate>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failing = Condition::new("watching the lease store");
    loop {
        let started = std::time::Instant::now();
        match store.watch(tx.clone()).await {
            Ok(()) => return,
            Err(e) => {
                // A watch that ran a while worked: a new failure starts a new episode.
                if started.elapsed() >= Duration::from_secs(30) {
                    failing.clear();
                    backoff.reset();
                }
                failing.fail(&format_args!("{e} ({})", store.name()));
                tokio::time::sleep(backoff.next_random()).await;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// What lease intake checks peers against: our backend, Network, SubnetLen where this store
/// allocates (etcd, directory; the Kubernetes store takes podCIDRs as they are), our subnet and
/// addresses.
fn intake_config(
    flags: &Flags,
    net: &NetConfig,
    backend: &BackendConfig,
    families: &Families,
    ext: &ExternalInterface,
) -> IntakeConfig {
    let allocating = flags.lease_dir.is_some() || !flags.kube_subnet_mgr;
    let v4_len = net.ipv4_range().ok().flatten().map(|r| r.subnet_len);
    let v6_len = net.ipv6_range().ok().flatten().map(|r| r.subnet_len);
    let mut own_ips: Vec<std::net::IpAddr> = vec![ext.ext_addr.into(), ext.iface_addr.into()];
    own_ips.extend(
        ext.ext_v6_addr
            .into_iter()
            .chain(ext.iface_v6_addr)
            .map(std::net::IpAddr::from),
    );
    own_ips.retain(|ip| !ip.is_unspecified());
    IntakeConfig {
        backend: NodeBackend::of(backend).unwrap_or_default(),
        network_v4: families.v4.map(|(n, _)| n),
        network_v6: families.v6.map(|(n, _)| n),
        subnet_len_v4: v4_len.filter(|_| allocating),
        subnet_len_v6: v6_len.filter(|_| allocating),
        own_subnets: families.nets().into_iter().map(|(_, s)| s).collect(),
        own_ips,
    }
}

/// The peers of the current leases; refusals are logged once each and counted.
fn current_peers(
    watcher: &LeaseWatcher,
    cfg: &IntakeConfig,
    log: &mut RefusalLog,
    metrics: &DaemonMetrics,
) -> Vec<Peer> {
    let checked = intake(watcher.leases(), cfg);
    for r in log.update(&checked.refused) {
        warn!("{r}");
        metrics.count_refusal(r.reason.label());
    }
    metrics.set_skipped_leases(checked.refused.len());
    checked.peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_budget_counts_within_the_window_only() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = PanicBudget::new(5, Duration::from_secs(60));
        assert_eq!(b.observe(0, at(0)), None);
        // 4 panics within the window: tolerated.
        assert_eq!(b.observe(4, at(10)), None);
        // One panic every 20 s stays under the limit: old ones leave the window.
        let mut total = 4;
        for i in 1..20 {
            total += 1;
            assert_eq!(b.observe(total, at(70 + i * 20)), None, "sample {i}");
        }
        // A burst reaches it.
        assert_eq!(b.observe(total + 5, at(560)), Some(5));
    }
}
