//! Daemon wiring: flags → store → network config → external interface → backend → lease →
//! firewall rules → subnet.env → watch loop (plan, then reconcile).
//!
//! Start-up follows flanneld's order (compat §2); anything that fails before the node is
//! ready ends the process with a message naming the cause.

pub mod extif;
pub mod http;
pub mod metrics;
mod plane;
pub mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::backend::intake::{intake, IntakeConfig, RefusalLog};
use crate::backend::Peer;
use crate::config::flags::Flags;
use crate::config::netconf::{BackendConfig, NetConfig, NetConfigError};
use crate::config::subnet_env::{read_previous_subnets, SubnetEnv};
use crate::io::iface;
use crate::lease::dir::DirStore;
use crate::lease::store::{LeaseStore, StoreError, WatchUpdate};
use crate::lease::{LeaseAttrs, LeaseWatcher};
use crate::wire::MacAddr;

use self::extif::{ExternalInterface, SelectError, Selection};
use self::metrics::DaemonMetrics;
use self::plane::Plane;

/// How often every peer is re-applied even without lease changes (flannel's host-gw route
/// check period); repairs routes, neighbours and FDB entries removed by hand.
const RESYNC: Duration = Duration::from_secs(10);

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
    /// No usable external interface.
    #[error(transparent)]
    Interface(#[from] SelectError),
    /// Backend or lease set-up failed (flannel's wording).
    #[error("Error registering network: {0}")]
    Register(String),
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
    let store = open_store(&flags).await?;
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
    let network = match (net.enable_ipv4, net.network, net.enable_ipv6) {
        (true, Some(n), false) => n,
        (_, _, true) => {
            return Err(DaemonError::Unsupported(
                "EnableIPv6 is not supported by flannel-rs yet: run an IPv4 overlay".into(),
            ))
        }
        _ => {
            return Err(DaemonError::Unsupported(
                "none defined stack: EnableIPv4 is false and EnableIPv6 is false".into(),
            ))
        }
    };
    let backend = net.backend()?.clone();
    let mut flags = flags;
    match store.stored_public_ips().await {
        // kube: the node-public-ip annotation acts like --public-ip (flannel ≥ v0.25.3).
        Ok((Some(ip), _)) => {
            info!(%ip, "using the public IP stored for this node");
            flags.public_ip = Some(ip);
        }
        Ok(_) => {}
        Err(e @ StoreError::Unavailable { .. }) => {
            warn!(error = %e, "could not read stored public IP")
        }
        Err(e) => return Err(e.into()),
    }
    let ext = external_interface(&flags)?;
    info!(
        iface = %ext.name, iface_addr = %ext.iface_addr, ext_addr = %ext.ext_addr,
        "using interface"
    );

    let previous = read_previous_subnets(&flags.subnet_file);
    let mut attrs = LeaseAttrs {
        public_ip: ext.ext_addr,
        backend_type: backend.kind().to_owned(),
        ..LeaseAttrs::default()
    };
    let vtep_mac = match &backend {
        BackendConfig::Vxlan(vx) => {
            let mac = choose_vtep_mac(store.as_ref(), &ext, vx.vni, &flags).await;
            attrs.backend_data = Some(
                crate::lease::VxlanBackendData {
                    vni: vx.vni,
                    vtep_mac: mac,
                }
                .to_raw(),
            );
            Some(mac)
        }
        BackendConfig::HostGw => {
            if ext.ext_addr != ext.iface_addr {
                return Err(DaemonError::Register(
                    "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend".into(),
                ));
            }
            None
        }
        BackendConfig::Other { kind } => {
            return Err(DaemonError::Unsupported(format!(
                "unknown backend type: {kind} (flannel-rs implements vxlan and host-gw)"
            )))
        }
    };

    let lease = store.acquire(&net, &attrs, &previous).await?;
    let subnet = lease
        .subnet
        .ok_or_else(|| DaemonError::Register("IPv4 is enabled but the lease has no IPv4".into()))?;
    info!(%subnet, store = %store.name(), "acquired lease");

    let mut plane = Plane::start(&flags, &backend, &ext, network, subnet, vtep_mac)
        .await
        .map_err(|e| DaemonError::Register(e.to_string()))?;
    let mtu = plane.mtu();
    metrics.set_plane(plane.metrics_source());

    let previous_env = SubnetEnv::read(&flags.subnet_file)
        .ok()
        .and_then(|e| e.network.zip(e.subnet));
    let (peers_tx, peers_rx) = watch::channel(Vec::<Peer>::new());
    let prober = (flags.peer_probe_interval > 0).then(|| {
        let interval = Duration::from_secs(u64::from(flags.peer_probe_interval));
        let ctx = probe::ProbeContext::new(&flags, &backend);
        info!(?interval, "probing peers");
        tokio::spawn(probe::run(interval, ctx, peers_rx, metrics.clone()))
    });
    let mut firewall = plane::Firewall::new(&flags, network, subnet, previous_env);
    firewall.ensure().await;
    let mut guard = plane::VxlanGuardRules::new(&flags, &backend, network);

    let env = SubnetEnv {
        network: Some(network),
        subnet: Some(subnet),
        ipv6_network: None,
        ipv6_subnet: None,
        mtu,
        ipmasq: flags.ip_masq,
    };
    match env.write_atomic(&flags.subnet_file) {
        Ok(()) => {
            ready.store(true, Ordering::Relaxed);
            info!(file = %flags.subnet_file.display(), "wrote subnet file; flannel is ready");
        }
        Err(e) => {
            warn!(file = %flags.subnet_file.display(), error = %e, "failed to write subnet file")
        }
    }

    if let Err(e) = store.mark_network_available().await {
        warn!(error = %e, "could not mark the node's network available");
    }
    let store: Arc<dyn LeaseStore> = Arc::from(store);
    let (tx, mut rx) = mpsc::channel(64);
    let watch_task = tokio::spawn(supervise_watch(store.clone(), tx));
    let mut watcher = LeaseWatcher::new(lease.subnet, lease.ipv6_subnet);
    let intake_cfg = intake_config(&flags, &net, subnet, &ext);
    let mut refusal_log = RefusalLog::default();
    let mut peers: Vec<Peer> = Vec::new();
    // Nothing is programmed (or removed as stale) before the store's first snapshot: an
    // empty peer set at start-up would tear down every peer's entries of a restarted daemon.
    let mut synced = false;
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    let fw_period = Duration::from_secs(u64::from(flags.iptables_resync.max(1)));
    let mut fw_resync =
        tokio::time::interval_at(tokio::time::Instant::now() + fw_period, fw_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    fw_resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let complete = store.complete_lease(&lease);
    tokio::pin!(complete);
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = &mut complete => {
                // Only returns when our own lease is gone (etcd): flannel shuts down then.
                if let Err(e) = r {
                    tracing::error!("{e}");
                    outcome = Err(DaemonError::Store(e));
                }
                break;
            }
            update = rx.recv() => {
                let Some(update) = update else { break };
                let events = watcher.apply(update);
                for ev in &events {
                    debug!(event = ?ev, "lease event");
                }
                if events.is_empty() && synced {
                    continue;
                }
                peers = current_peers(&watcher, &intake_cfg, &mut refusal_log, &metrics);
                plane.sync(&peers).await;
                if let Some(g) = guard.as_mut() {
                    g.sync(&peers).await;
                }
                metrics.set_peers(peers.len());
                peers_tx.send_replace(peers.clone());
                synced = true;
            }
            _ = resync.tick(), if synced => plane.sync(&peers).await,
            _ = fw_resync.tick() => {
                firewall.ensure().await;
                if let Some(g) = guard.as_mut() {
                    g.ensure().await;
                }
            }
            () = plane.device_event() => {
                warn!("overlay device changed under us; replaying every peer");
                plane.recover(&peers).await;
            }
        }
    }
    watch_task.abort();
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

/// Opens the lease store the flags select: `--lease-dir`, else `--kube-subnet-mgr`, else etcd.
pub async fn open_store(flags: &Flags) -> Result<Box<dyn LeaseStore>, DaemonError> {
    if let Some(dir) = &flags.lease_dir {
        return Ok(Box::new(DirStore::new(dir.clone())));
    }
    if flags.kube_subnet_mgr {
        #[cfg(feature = "kube")]
        {
            let env = |name: &str| std::env::var(name).ok();
            let kube = crate::lease::kube::KubeStore::connect(flags, &env).await?;
            return Ok(Box::new(kube));
        }
        #[cfg(not(feature = "kube"))]
        return Err(DaemonError::Unsupported(
            "--kube-subnet-mgr: this flanneld was built without the kube feature".into(),
        ));
    }
    #[cfg(feature = "etcd")]
    {
        let etcd = crate::lease::etcd::EtcdStore::from_flags(flags)
            .map_err(|e| DaemonError::Unsupported(e.to_string()))?;
        Ok(Box::new(etcd))
    }
    #[cfg(not(feature = "etcd"))]
    Err(DaemonError::Unsupported(
        "the etcd store: this flanneld was built without the etcd feature; use --lease-dir".into(),
    ))
}

/// Fetches the network config, retrying every second forever like flannel.
async fn fetch_config(store: &dyn LeaseStore) -> String {
    loop {
        match store.network_config().await {
            Ok(json) => return json,
            Err(e) => {
                warn!(error = %e, "Couldn't fetch network config");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn start_http(
    flags: &Flags,
    ready: &Arc<AtomicBool>,
    metrics: &Arc<DaemonMetrics>,
) -> Result<(), DaemonError> {
    let m = metrics.clone();
    let state = http::HealthState {
        ready: ready.clone(),
        metrics: Arc::new(move || m.render()),
    };
    for port in [flags.healthz_port, flags.metrics_port] {
        if port > 0 {
            let addr = SocketAddr::new(flags.healthz_ip, port);
            http::spawn(addr, state.clone())
                .await
                .map_err(io_err(format!("listen on {addr}")))?;
            info!(%addr, "serving /healthz, /readyz and /metrics");
        }
    }
    Ok(())
}

/// The external interface flannel's rules select for these flags (compat §2.1).
pub fn external_interface(flags: &Flags) -> Result<ExternalInterface, DaemonError> {
    let ifaces = iface::interfaces().map_err(io_err("list interfaces"))?;
    let default_route = iface::default_route_interface_v4().unwrap_or(None);
    let can_reach_source = match flags.iface_can_reach {
        Some(ip) => Some(iface::source_for(ip).map_err(io_err(format!("find the route to {ip}")))?),
        None => None,
    };
    Ok(extif::select(
        &ifaces,
        &Selection {
            iface: &flags.iface,
            iface_regex: &flags.iface_regex,
            can_reach_source,
            public_ip: flags.public_ip,
            default_route_iface: default_route.as_deref(),
        },
    )?)
}

/// The VTEP MAC to publish: the one our previous lease (same public IP) carried, so peers'
/// entries stay valid across restarts; else the existing kernel device's; else a new random
/// locally administered address.
async fn choose_vtep_mac(
    store: &dyn LeaseStore,
    ext: &ExternalInterface,
    vni: u32,
    flags: &Flags,
) -> MacAddr {
    if let Ok((Some(mac), _)) = store.stored_vtep_macs().await {
        if mac.is_unicast() {
            info!(%mac, "reusing the VTEP MAC stored for this node");
            return mac;
        }
    }
    if let Ok(leases) = store.list().await {
        let previous = leases
            .iter()
            .filter(|l| l.attrs.public_ip == ext.ext_addr)
            .find_map(|l| l.attrs.vxlan_data().ok().flatten())
            .filter(|d| d.vni == vni && d.vtep_mac.is_unicast());
        if let Some(d) = previous {
            info!(mac = %d.vtep_mac, "reusing the VTEP MAC of our previous lease");
            return d.vtep_mac;
        }
    }
    if let Some(mac) = plane::existing_device_mac(flags, vni).await {
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
async fn supervise_watch(store: Arc<dyn LeaseStore>, tx: mpsc::Sender<WatchUpdate>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.watch(tx.clone()).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, store = %store.name(), "lease watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// What lease intake checks peers against: Network, SubnetLen where this store allocates
/// (etcd, directory; the Kubernetes store takes podCIDRs as they are), our subnet and addresses.
fn intake_config(
    flags: &Flags,
    net: &NetConfig,
    subnet: ipnet::Ipv4Net,
    ext: &ExternalInterface,
) -> IntakeConfig {
    let allocating = flags.lease_dir.is_some() || !flags.kube_subnet_mgr;
    let subnet_len = net
        .ipv4_range()
        .ok()
        .flatten()
        .map(|r| r.subnet_len)
        .filter(|_| allocating);
    IntakeConfig {
        network_v4: net.network,
        network_v6: None,
        subnet_len_v4: subnet_len,
        subnet_len_v6: None,
        own_subnets: vec![subnet.into()],
        own_ips: vec![ext.ext_addr.into(), ext.iface_addr.into()],
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
