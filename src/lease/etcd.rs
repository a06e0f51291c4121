//! The etcd v3 lease store: upstream flannel's etcd subnet manager (compat §6), with the same
//! keys and values, so flannel-rs and upstream flanneld nodes can share one etcd.
//!
//! Keys: `<prefix>/config` holds the network config JSON; `<prefix>/subnets/<key>` holds one
//! lease, whose value is [`LeaseAttrs`] JSON byte for byte as upstream writes it. Every create
//! or update attaches the key to a fresh etcd lease of 24 h ([`LEASE_TTL`]);
//! [`LeaseStore::complete_lease`] re-puts the own key that long before expiry
//! (`--subnet-lease-renew-margin`) and reports when the key is gone. A key without an etcd lease
//! is a reservation (upstream `Documentation/reservations.md`): never expires, and is reused by
//! the node with its public IP.
//!
//! Acquisition is upstream's algorithm, whose pure part is shared with the directory store
//! (`alloc::plan_acquisition`); creation is a transaction that succeeds only while the key is
//! absent, retried up to 10 times. Watching sends a [`WatchUpdate::Snapshot`] (a prefix get)
//! and then the watch events from the revision after it; a broken watch reconnects with
//! back-off (100 ms doubling to 5 s, measured from the start of the failed attempt) and resumes
//! where it stopped. A watch that fell behind etcd's compaction, or that finds etcd's revision
//! behind its own (data restored from a backup or wiped), re-lists and sends a new snapshot.
//! Nothing is given up: a store outage only delays updates.
//!
//! Deliberately different from upstream (each keeps data compatible):
//! * listing does not look up every key's TTL (upstream does, and drops keys whose lookup
//!   fails); peers' leases carry `expiration: None`.
//! * reusing a reservation keeps it a reservation (upstream re-attaches a 24 h lease).
//! * a create also fails while a key with the same IPv4 subnet and some IPv6 subnet exists, and
//!   of two dual-stack creates that raced for one IPv6 subnet the later one backs off.
//! * renewal rewrites the key only while it still holds our value, and the own key is watched
//!   exactly (upstream watches it as a prefix); a key taken over by another public IP counts
//!   as revoked.
//! * a resumed watch starts after the last event received, not after the response header's
//!   revision (which can run ahead of the events etcd has delivered so far).
//!
//! Unusable keys or values under `<prefix>/subnets/` are skipped with a warning naming the key
//! (once per key revision) and counted in [`EtcdStats::skipped`]; their subnets stay blocked
//! for allocation. Nothing read from etcd can panic.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub mod client;
pub mod proto;

use client::{prefix_end, Client, ClientError, ConnectOptions, WatchStream};
use futures::future::BoxFuture;
use proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcdserverpb::request_op::Request;
use proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest,
};
use proto::mvccpb::{Event, KeyValue};
use tokio::sync::{mpsc, OnceCell};
use tokio::time::Instant;

use super::alloc::{alloc_ranges, plan_acquisition, Plan, RACE_RETRIES};
use super::store::{LeaseStore, StoreError, WatchUpdate};
use super::{Lease, LeaseAttrs, LeaseEvent, SubnetKey};
use crate::config::flags::Flags;
use crate::config::netconf::{NetConfig, Subnet};
use crate::config::secret::Secret;
use crate::config::subnet_env::PreviousSubnets;

/// `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// TTL of the etcd lease attached to every lease key (upstream's `subnetTTL`).
pub const LEASE_TTL: Duration = Duration::from_secs(86_400);
/// `--subnet-lease-renew-margin` default.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
/// Delay before retrying a failed renewal (upstream's).
pub const RENEW_RETRY: Duration = Duration::from_secs(60);
/// First delay before re-establishing a broken watch.
pub const WATCH_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between watch reconnection attempts.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Limit for one request (and for connecting), so an unreachable etcd surfaces as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The name in [`StoreError::Unavailable`].
const STORE: &str = "etcd";

/// The etcd flags, as given (upstream's `EtcdConfig`). `Debug` masks the password.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `--etcd-endpoints`, already split on `,`.
    pub endpoints: Vec<String>,
    /// `--etcd-prefix`.
    pub prefix: String,
    /// `--etcd-keyfile`: client key (TLS only when both key and cert are set).
    pub keyfile: String,
    /// `--etcd-certfile`: client certificate.
    pub certfile: String,
    /// `--etcd-cafile`: CA bundle that signs the server certificate (system roots if empty).
    pub cafile: String,
    /// `--etcd-username`.
    pub username: String,
    /// `--etcd-password`.
    pub password: Secret,
}

impl EtcdConfig {
    /// The etcd part of the flags.
    pub fn from_flags(flags: &Flags) -> EtcdConfig {
        EtcdConfig {
            endpoints: flags.etcd_endpoints.clone(),
            prefix: flags.etcd_prefix.clone(),
            keyfile: flags.etcd_keyfile.clone(),
            certfile: flags.etcd_certfile.clone(),
            cafile: flags.etcd_cafile.clone(),
            username: flags.etcd_username.clone(),
            password: flags.etcd_password.clone(),
        }
    }
}

/// Why the etcd flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    /// `--etcd-endpoints` names no endpoint.
    #[error("--etcd-endpoints is empty: give at least one etcd URL, e.g. http://127.0.0.1:2379")]
    NoEndpoints,
    /// An endpoint is not `http://host:port`, `https://host:port` or `host:port`.
    #[error("--etcd-endpoints: invalid endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Client certificates are configured but an endpoint asks for plain HTTP.
    #[error("--etcd-endpoints: endpoint {endpoint:?} uses http:// but --etcd-certfile and --etcd-keyfile ask for TLS: use https://")]
    HttpWithTls {
        /// The endpoint as given.
        endpoint: String,
    },
    /// Some endpoints use http:// and others https://.
    #[error("--etcd-endpoints mixes http:// ({http:?}) and https:// ({https:?}) endpoints: use one scheme")]
    MixedSchemes {
        /// An http:// endpoint.
        http: String,
        /// An https:// endpoint.
        https: String,
    },
    /// A TLS file cannot be read or holds no PEM data.
    #[error("--{flag} {path:?}: {reason}")]
    TlsFile {
        /// The flag naming the file (`etcd-keyfile`, ...).
        flag: &'static str,
        /// The path as given.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Counters for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EtcdStats {
    /// Lease keys or values skipped as unusable (each key revision counted once).
    pub skipped: u64,
    /// Full listings taken by watches for a snapshot (the first one included).
    pub snapshots: u64,
    /// Watches that fell behind etcd's compaction and re-read.
    pub compactions: u64,
    /// Watches that found etcd's revision behind theirs (data restored) and re-read.
    pub rewinds: u64,
    /// Watch streams re-established after breaking.
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    skipped: AtomicU64,
    snapshots: AtomicU64,
    compactions: AtomicU64,
    rewinds: AtomicU64,
    reconnects: AtomicU64,
    /// (key, mod revision) of unusable entries already warned about.
    warned: Mutex<HashSet<(Vec<u8>, i64)>>,
}

/// The etcd lease store; see the module docs. Cloning shares the connection and counters.
#[derive(Clone)]
pub struct EtcdStore {
    endpoints: Vec<String>,
    username: String,
    tls: bool,
    options: ConnectOptions,
    client: Arc<OnceCell<Client>>,
    prefix: String,
    lease_ttl: Duration,
    renew_margin: Duration,
    renew_retry: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    counters: Arc<Counters>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("lease_ttl", &self.lease_ttl)
            .field("renew_margin", &self.renew_margin)
            .finish_non_exhaustive()
    }
}

/// One key under `<prefix>/subnets/`.
enum Entry {
    /// A usable lease.
    Valid(Lease),
    /// Unusable; `key` is set when only the value is bad.
    Invalid {
        key: Option<SubnetKey>,
        reason: String,
    },
}

/// What a watch yields.
enum WatchItem {
    /// Events, in order.
    Events(Vec<Event>),
    /// The watch cannot resume where it stopped: re-read, then [`KeyWatch::resume_at`].
    Resync(Gap),
}

/// Why a watch must re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gap {
    /// etcd compacted the revision to resume from.
    Compacted,
    /// etcd's revision went backwards (data restored or wiped): resuming would wait for a
    /// revision that may never come, or skip what is there now.
    Rewound,
}

/// The own key's state, as the lease monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnState {
    /// Ours, attached to this etcd lease ID (0: a reservation).
    Present(i64),
    /// Deleted or expired.
    Gone,
    /// Rewritten by another node (or unreadable).
    Foreign,
}

/// etcd's raw event types.
const EVENT_PUT: i32 = 0;
const EVENT_DELETE: i32 = 1;

impl EtcdStore {
    /// A store for the given flags. Validates endpoints and reads the TLS files; connects
    /// lazily, on first use, so it can be built while etcd is down.
    pub fn new(config: &EtcdConfig) -> Result<EtcdStore, EtcdConfigError> {
        if config.endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        let tls = !config.keyfile.is_empty() && !config.certfile.is_empty();
        for endpoint in &config.endpoints {
            check_endpoint(endpoint)?;
            if tls && endpoint.starts_with("http://") {
                return Err(EtcdConfigError::HttpWithTls {
                    endpoint: endpoint.clone(),
                });
            }
        }
        let http = config.endpoints.iter().find(|e| e.starts_with("http://"));
        let https = config.endpoints.iter().find(|e| e.starts_with("https://"));
        if let (Some(http), Some(https)) = (http, https) {
            return Err(EtcdConfigError::MixedSchemes {
                http: http.clone(),
                https: https.clone(),
            });
        }
        let mut options = ConnectOptions {
            connect_timeout: Some(REQUEST_TIMEOUT),
            keep_alive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            require_leader: true,
            ..ConnectOptions::default()
        };
        if tls {
            let cert = read_pem("etcd-certfile", &config.certfile)?;
            let key = read_pem("etcd-keyfile", &config.keyfile)?;
            let ca = if config.cafile.is_empty() {
                None
            } else {
                Some(read_pem("etcd-cafile", &config.cafile)?)
            };
            options.tls = Some(ConnectOptions::tls(Some((cert, key)), ca));
        } else if https.is_none() {
            tracing::warn!(
                "no certificate provided: connecting to etcd with http. This is insecure"
            );
        } else {
            // https:// without a client certificate: server authentication only.
            let ca = if config.cafile.is_empty() {
                None
            } else {
                Some(read_pem("etcd-cafile", &config.cafile)?)
            };
            options.tls = Some(ConnectOptions::tls(None, ca));
        }
        if !config.username.is_empty() {
            options.credentials =
                Some((config.username.clone(), config.password.expose().to_owned()));
        } else if !config.password.is_empty() {
            tracing::warn!("--etcd-password is set without --etcd-username; not authenticating");
        }
        Ok(EtcdStore {
            endpoints: config.endpoints.clone(),
            username: config.username.clone(),
            tls,
            options,
            client: Arc::new(OnceCell::new()),
            prefix: clean_path(&config.prefix),
            lease_ttl: LEASE_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            renew_retry: RENEW_RETRY,
            backoff_initial: WATCH_BACKOFF_INITIAL,
            backoff_max: WATCH_BACKOFF_MAX,
            counters: Arc::new(Counters::default()),
        })
    }

    /// A store for the flanneld flags (etcd flags and `--subnet-lease-renew-margin`).
    pub fn from_flags(flags: &Flags) -> Result<EtcdStore, EtcdConfigError> {
        let margin = Duration::from_secs(u64::from(flags.subnet_lease_renew_margin) * 60);
        Ok(EtcdStore::new(&EtcdConfig::from_flags(flags))?.with_renew_margin(margin))
    }

    /// Renew the own lease this long before it expires.
    pub fn with_renew_margin(mut self, margin: Duration) -> EtcdStore {
        self.renew_margin = margin;
        self
    }

    /// Requested TTL of new etcd leases (etcd may raise it to its minimum).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> EtcdStore {
        self.lease_ttl = ttl;
        self
    }

    /// Delay before retrying a failed renewal.
    pub fn with_renew_retry(mut self, retry: Duration) -> EtcdStore {
        self.renew_retry = retry;
        self
    }

    /// Watch reconnection back-off: first delay and cap.
    pub fn with_watch_backoff(mut self, initial: Duration, max: Duration) -> EtcdStore {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// The key prefix, cleaned like Go's `path.Join` does.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/config`.
    pub fn config_key(&self) -> String {
        join_path(&self.prefix, "config")
    }

    /// `<prefix>/subnets/`, the prefix of every lease key.
    pub fn subnets_prefix(&self) -> String {
        join_path(&self.prefix, "subnets") + "/"
    }

    /// `<prefix>/subnets/<key>`.
    pub fn lease_key(&self, key: &SubnetKey) -> String {
        self.subnets_prefix() + &key.to_string()
    }

    /// Current counters.
    pub fn stats(&self) -> EtcdStats {
        let c = &self.counters;
        EtcdStats {
            skipped: c.skipped.load(Ordering::Relaxed),
            snapshots: c.snapshots.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            rewinds: c.rewinds.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let client = self
            .client
            .get_or_try_init(|| {
                rpc(
                    "connect",
                    Client::connect(self.endpoints.as_slice(), self.options.clone()),
                )
            })
            .await?;
        Ok(client.clone())
    }

    /// The network config JSON from `<prefix>/config`.
    pub async fn get_network_config(&self) -> Result<String, StoreError> {
        let key = self.config_key();
        let client = self.client().await?;
        let resp = rpc("read network config", client.get(key.as_bytes())).await?;
        match resp.kvs.first() {
            None => Err(StoreError::EtcdConfigNotFound { key }),
            Some(kv) => Ok(String::from_utf8_lossy(&kv.value).into_owned()),
        }
    }

    /// Every key under `<prefix>/subnets/` and the revision of the read.
    async fn get_subnets(&self) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let client = self.client().await?;
        let resp = rpc("list leases", client.get_prefix(self.subnets_prefix())).await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        Ok((resp.kvs, revision))
    }

    /// The usable leases and the etcd revision they were read at. Unusable entries are
    /// skipped with a warning (see the module docs).
    pub async fn list(&self) -> Result<(Vec<Lease>, i64), StoreError> {
        let (kvs, revision) = self.get_subnets().await?;
        let mut leases = Vec::new();
        let mut bad = Vec::new();
        for kv in &kvs {
            match self.classify(&kv.key, &kv.value) {
                Some(Entry::Valid(lease)) => leases.push(lease),
                Some(Entry::Invalid { reason, .. }) => bad.push((kv, reason)),
                None => {}
            }
        }
        // Forget warnings about entries that are gone, so the set stays small.
        let keep: HashSet<(Vec<u8>, i64)> = bad
            .iter()
            .map(|(kv, _)| (kv.key.clone(), kv.mod_revision))
            .collect();
        let mut warned = self
            .counters
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        warned.retain(|e| keep.contains(e));
        drop(warned);
        for (kv, reason) in bad {
            self.warn_skipped(&kv.key, kv.mod_revision, &reason);
        }
        Ok((leases, revision))
    }

    /// What a key/value under the subnets prefix holds; `None` for keys outside it.
    fn classify(&self, key: &[u8], value: &[u8]) -> Option<Entry> {
        let subnet_key = match self.parse_key(key)? {
            Ok(k) => k,
            Err(reason) => return Some(Entry::Invalid { key: None, reason }),
        };
        let invalid = |reason: String| Entry::Invalid {
            key: Some(subnet_key),
            reason,
        };
        let Ok(text) = std::str::from_utf8(value) else {
            return Some(invalid("value is not UTF-8".to_owned()));
        };
        Some(match LeaseAttrs::from_json(text) {
            Ok(attrs) => Entry::Valid(Lease::at_key(subnet_key, attrs, None)),
            Err(e) => invalid(e.to_string()),
        })
    }

    /// The subnet key of an etcd key under the subnets prefix (`None` for other keys).
    fn parse_key(&self, key: &[u8]) -> Option<Result<SubnetKey, String>> {
        let prefix = self.subnets_prefix();
        let rest = key.strip_prefix(prefix.as_bytes())?;
        let Ok(rest) = std::str::from_utf8(rest) else {
            return Some(Err("key is not UTF-8".to_owned()));
        };
        Some(match rest.parse::<SubnetKey>() {
            Ok(k) if k.to_string() == rest => Ok(k),
            Ok(k) => Err(format!("not a canonical subnet key (want {k})")),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Warns about (and counts) an unusable entry, once per key revision.
    fn warn_skipped(&self, key: &[u8], revision: i64, reason: &str) {
        let fresh = self
            .counters
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((key.to_vec(), revision));
        if fresh {
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key = %display_key(key), %reason, "skipping unusable lease in etcd");
        }
    }

    /// [`LeaseStore::acquire`]; see the module docs.
    pub async fn acquire_lease(
        &self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: &PreviousSubnets,
    ) -> Result<Lease, StoreError> {
        let ranges = alloc_ranges(config, STORE)?;
        for _ in 0..RACE_RETRIES {
            let (kvs, _) = self.get_subnets().await?;
            let mut keys = Vec::new();
            let mut leases = Vec::new();
            let mut lease_ids = HashMap::new();
            for kv in &kvs {
                match self.classify(&kv.key, &kv.value) {
                    Some(Entry::Valid(lease)) => {
                        if let Some(k) = lease.key() {
                            keys.push(k);
                            lease_ids.insert(k, kv.lease);
                        }
                        leases.push(lease);
                    }
                    Some(Entry::Invalid { key, reason }) => {
                        keys.extend(key);
                        self.warn_skipped(&kv.key, kv.mod_revision, &reason);
                    }
                    None => {}
                }
            }
            let plan = plan_acquisition(&ranges, &keys, &leases, attrs, previous)?;
            let lease_for =
                |key: SubnetKey, expiration| Lease::at_key(key, attrs.clone(), expiration);
            match plan {
                Plan::Reuse(key) => {
                    // A reservation (no etcd lease) stays one.
                    let reservation = lease_ids.get(&key) == Some(&0);
                    let expiration = self.put_lease(&key, attrs, !reservation).await?;
                    return Ok(lease_for(key, expiration));
                }
                Plan::Create { key, stale } => {
                    if let Some(stale) = stale {
                        let client = self.client().await?;
                        rpc(
                            "delete incompatible lease",
                            client.delete(self.lease_key(&stale)),
                        )
                        .await?;
                    }
                    if let Some(expiration) = self.create_lease(&key, attrs).await? {
                        tracing::info!(lease = %key, public_ip = %attrs.public_ip, "allocated lease");
                        return Ok(lease_for(key, Some(expiration)));
                    }
                    tracing::debug!(lease = %key, "lost the race for a subnet, retrying");
                }
            }
        }
        Err(StoreError::MaxRetries)
    }

    /// A new etcd lease; returns its ID and when it expires.
    async fn grant(&self, client: &Client) -> Result<(i64, SystemTime), StoreError> {
        let start = SystemTime::now();
        let ttl = i64::try_from(self.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let grant = rpc("grant etcd lease", client.lease_grant(ttl)).await?;
        let granted = Duration::from_secs(u64::try_from(grant.ttl).unwrap_or(0));
        Ok((grant.id, start + granted))
    }

    /// Revokes an etcd lease that ended up unused (best effort: it expires anyway).
    /// Runs `txn`, whose puts hold the fresh etcd lease `id`: its response when it succeeded;
    /// `None` when a comparison failed. Unless it succeeded, `id` is revoked.
    async fn txn_or_revoke(
        &self,
        client: &Client,
        id: i64,
        what: &str,
        txn: TxnRequest,
    ) -> Result<Option<TxnResponse>, StoreError> {
        match rpc(what, client.txn(txn)).await {
            Ok(r) if r.succeeded => Ok(Some(r)),
            other => {
                self.revoke(client, id).await;
                other.map(|_| None)
            }
        }
    }

    async fn revoke(&self, client: &Client, id: i64) {
        if let Err(e) = rpc("revoke etcd lease", client.lease_revoke(id)).await {
            tracing::debug!(lease_id = id, error = %e, "cannot revoke unused etcd lease");
        }
    }

    /// Writes our attributes at `key` unconditionally (upstream's `updateSubnet`), with a
    /// fresh etcd lease unless `with_ttl` is false.
    async fn put_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        with_ttl: bool,
    ) -> Result<Option<SystemTime>, StoreError> {
        let client = self.client().await?;
        let etcd_key = self.lease_key(key);
        if !with_ttl {
            rpc("write lease", client.put(etcd_key, attrs.to_json(), 0)).await?;
            return Ok(None);
        }
        let (id, expiration) = self.grant(&client).await?;
        let put = client.put(etcd_key, attrs.to_json(), id);
        if let Err(e) = rpc("write lease", put).await {
            self.revoke(&client, id).await;
            return Err(e);
        }
        Ok(Some(expiration))
    }

    /// Creates `key` if no lease for its IPv4 subnet exists (for an IPv6-only key: if the key
    /// does not exist); `None` when another node won. IPv6 overlaps are settled afterwards by
    /// creation revision.
    async fn create_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Option<SystemTime>, StoreError> {
        let client = self.client().await?;
        let etcd_key = self.lease_key(key);
        let compare = match key.ipv4_subnet() {
            Some(ipv4) => {
                let v4_key = self.lease_key(&SubnetKey { ipv4, ipv6: None });
                vec![
                    compare_version(&v4_key, ""),
                    // Dual-stack keys with the same IPv4 subnet: [v4_key + "&", v4_key + "'").
                    compare_version(&format!("{v4_key}&"), &format!("{v4_key}'")),
                ]
            }
            None => vec![compare_version(&etcd_key, "")],
        };
        let (id, expiration) = self.grant(&client).await?;
        let txn = TxnRequest {
            compare,
            success: vec![put_op(&etcd_key, attrs.to_json(), id)],
            failure: Vec::new(),
        };
        let Some(resp) = self.txn_or_revoke(&client, id, "create lease", txn).await? else {
            return Ok(None);
        };
        let revision = resp.header.map_or(0, |h| h.revision);
        if key.ipv6.is_some() && self.lost_ipv6_race(key, revision).await? {
            tracing::debug!(lease = %key, "another node created a lease for the same IPv6 subnet first");
            let undo = TxnRequest {
                compare: vec![compare_eq(
                    &etcd_key,
                    "",
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(revision),
                )],
                success: vec![RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: etcd_key.clone().into_bytes(),
                        ..DeleteRangeRequest::default()
                    })),
                }],
                failure: Vec::new(),
            };
            rpc("withdraw lease", client.txn(undo)).await?;
            self.revoke(&client, id).await;
            return Ok(None);
        }
        Ok(Some(expiration))
    }

    /// True when another key overlapping `key`'s subnets was created before `revision`.
    async fn lost_ipv6_race(&self, key: &SubnetKey, revision: i64) -> Result<bool, StoreError> {
        let (kvs, _) = self.get_subnets().await?;
        Ok(kvs.iter().any(|kv| {
            let Some(Ok(other)) = self.parse_key(&kv.key) else {
                return false;
            };
            let overlap4 = match (key.ipv4_subnet(), other.ipv4_subnet()) {
                (Some(a), Some(b)) => a.overlaps(&b),
                _ => false,
            };
            let overlap6 = match (key.ipv6, other.ipv6) {
                (Some(a), Some(b)) => a.overlaps(&b),
                _ => false,
            };
            other != *key && (overlap4 || overlap6) && kv.create_revision < revision
        }))
    }

    /// [`LeaseStore::renew_lease`]: re-puts our value with a fresh etcd lease, only while the
    /// key still holds exactly that value (else [`StoreError::LeaseRevoked`]).
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, StoreError> {
        let key = lease.key().ok_or(StoreError::NoSubnet(STORE))?;
        let etcd_key = self.lease_key(&key);
        let value = lease.attrs.to_json();
        let client = self.client().await?;
        let (id, expiration) = self.grant(&client).await?;
        let txn = TxnRequest {
            compare: vec![compare_eq(
                &etcd_key,
                "",
                CompareTarget::Value,
                TargetUnion::Value(value.clone().into_bytes()),
            )],
            success: vec![put_op(&etcd_key, value, id)],
            failure: Vec::new(),
        };
        if self
            .txn_or_revoke(&client, id, "renew lease", txn)
            .await?
            .is_none()
        {
            return Err(StoreError::LeaseRevoked { key: etcd_key });
        }
        Ok(Lease {
            expiration: Some(expiration),
            ..lease.clone()
        })
    }

    /// When the etcd lease `id` expires (`None`: unknown, e.g. it is already gone).
    async fn lease_expiration(&self, id: i64) -> Result<Option<SystemTime>, StoreError> {
        let client = self.client().await?;
        let start = SystemTime::now();
        let resp = rpc("read lease TTL", client.lease_time_to_live(id)).await?;
        Ok(u64::try_from(resp.ttl)
            .ok()
            .filter(|&s| s > 0)
            .map(|s| start + Duration::from_secs(s)))
    }

    /// When to renew a lease expiring at `expiration`.
    fn renew_deadline(&self, expiration: SystemTime) -> Instant {
        let remaining = expiration
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Instant::now() + remaining.saturating_sub(self.renew_margin)
    }

    /// Lists, sends the snapshot and returns its revision, retrying until it succeeds;
    /// `None` once `tx` is closed.
    async fn send_snapshot(&self, tx: &mpsc::Sender<WatchUpdate>) -> Option<i64> {
        let mut delay = self.backoff_initial;
        let mut failing = false;
        loop {
            let listed = tokio::select! {
                () = tx.closed() => return None,
                r = self.list() => r,
            };
            match listed {
                Ok((leases, revision)) => {
                    self.counters.snapshots.fetch_add(1, Ordering::Relaxed);
                    tx.send(WatchUpdate::Snapshot(leases)).await.ok()?;
                    return Some(revision);
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(error = %e, retry_in = ?delay, "still cannot list leases in etcd");
                    } else {
                        tracing::warn!(error = %e, "cannot list leases in etcd; retrying");
                        failing = true;
                    }
                    tokio::select! {
                        () = tx.closed() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.backoff_max);
                }
            }
        }
    }

    /// [`LeaseStore::watch`]; returns only when `tx` is closed.
    pub async fn watch_leases(&self, tx: mpsc::Sender<WatchUpdate>) -> Result<(), StoreError> {
        let mut watch = KeyWatch::new(self, self.subnets_prefix(), true);
        let Some(revision) = self.send_snapshot(&tx).await else {
            return Ok(());
        };
        watch.resume_at(revision.saturating_add(1));
        loop {
            let item = tokio::select! {
                () = tx.closed() => return Ok(()),
                item = watch.next() => item,
            };
            match item {
                WatchItem::Events(events) => {
                    let events = self.lease_events(&events);
                    if !events.is_empty() && tx.send(WatchUpdate::Events(events)).await.is_err() {
                        return Ok(());
                    }
                }
                WatchItem::Resync(gap) => {
                    self.count_gap(gap);
                    tracing::warn!(prefix = %self.subnets_prefix(), ?gap, "etcd watch cannot resume; re-listing");
                    let Some(revision) = self.send_snapshot(&tx).await else {
                        return Ok(());
                    };
                    watch.resume_at(revision.saturating_add(1));
                }
            }
        }
    }

    fn count_gap(&self, gap: Gap) {
        let counter = match gap {
            Gap::Compacted => &self.counters.compactions,
            Gap::Rewound => &self.counters.rewinds,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Lease events for etcd events: puts are `Added` (or `Removed` when the new value is
    /// unusable), deletes and expiries `Removed`.
    fn lease_events(&self, events: &[Event]) -> Vec<LeaseEvent> {
        let mut out = Vec::new();
        for event in events {
            let Some(kv) = event.kv.as_ref() else {
                continue;
            };
            match event.r#type {
                EVENT_PUT => match self.classify(&kv.key, &kv.value) {
                    Some(Entry::Valid(lease)) => out.push(LeaseEvent::Added(lease)),
                    Some(Entry::Invalid { key, reason }) => {
                        self.warn_skipped(&kv.key, kv.mod_revision, &reason);
                        // Whatever the key held before is no longer usable.
                        out.extend(key.map(|k| LeaseEvent::Removed(bare_lease(k))));
                    }
                    None => {}
                },
                EVENT_DELETE => {
                    if let Some(Ok(k)) = self.parse_key(&kv.key) {
                        out.push(LeaseEvent::Removed(bare_lease(k)));
                    }
                }
                other => {
                    tracing::warn!(key = %display_key(&kv.key), event_type = other, "ignoring etcd event of unknown type");
                }
            }
        }
        out
    }

    /// [`LeaseStore::complete_lease`]; see there.
    pub async fn monitor_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let key = lease.key().ok_or(StoreError::NoSubnet(STORE))?;
        let etcd_key = self.lease_key(&key);
        let ours = lease.attrs.clone();
        let mut current = lease.clone();
        let mut renew_at = current.expiration.map(|e| self.renew_deadline(e));
        let mut own = OwnWatch::new(self, etcd_key.clone());
        loop {
            tokio::select! {
                state = own.next(&ours) => match state {
                    OwnState::Gone | OwnState::Foreign => {
                        tracing::warn!(key = %etcd_key, ?state, "own lease is gone from etcd");
                        return Err(StoreError::LeaseRevoked { key: etcd_key });
                    }
                    OwnState::Present(id) => {
                        let expiration = if id == 0 {
                            None
                        } else {
                            match self.lease_expiration(id).await {
                                Ok(Some(e)) => Some(e),
                                Ok(None) => current.expiration,
                                Err(e) => {
                                    tracing::debug!(error = %e, "cannot read own lease TTL");
                                    current.expiration
                                }
                            }
                        };
                        current.expiration = expiration;
                        renew_at = expiration.map(|e| self.renew_deadline(e));
                        match renew_at {
                            Some(at) => tracing::info!(wait = ?at.saturating_duration_since(Instant::now()), "waiting to renew lease"),
                            None => tracing::info!(key = %etcd_key, "own lease is a reservation; no renewal needed"),
                        }
                    }
                },
                () = sleep_until_opt(renew_at) => match self.renew(&current).await {
                    Ok(renewed) => {
                        current = renewed;
                        renew_at = current.expiration.map(|e| self.renew_deadline(e));
                        tracing::info!(expiration = ?current.expiration, "Lease renewed");
                    }
                    Err(e @ StoreError::LeaseRevoked { .. }) => {
                        tracing::warn!(key = %etcd_key, "own lease no longer holds our value");
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, retry_in = ?self.renew_retry, "Error renewing lease (trying again in 1 min)");
                        renew_at = Some(Instant::now() + self.renew_retry);
                    }
                },
            }
        }
    }

    /// The own key and the revision it was read at.
    async fn get_key(&self, key: &str) -> Result<(Option<KeyValue>, i64), StoreError> {
        let client = self.client().await?;
        let resp = rpc("read own lease", client.get(key)).await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        Ok((resp.kvs.into_iter().next(), revision))
    }
}

impl LeaseStore for EtcdStore {
    fn name(&self) -> String {
        format!(
            "etcd lease store at {} (prefix {})",
            self.endpoints.join(","),
            self.prefix
        )
    }

    fn network_config(&self) -> BoxFuture<'_, Result<String, StoreError>> {
        Box::pin(self.get_network_config())
    }

    fn acquire<'a>(
        &'a self,
        config: &'a NetConfig,
        attrs: &'a LeaseAttrs,
        previous: &'a PreviousSubnets,
    ) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(self.acquire_lease(config, attrs, previous))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>> {
        Box::pin(async move { EtcdStore::list(self).await.map(|(leases, _)| leases) })
    }

    fn watch(&self, tx: mpsc::Sender<WatchUpdate>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.watch_leases(tx))
    }

    fn renew_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(self.renew(lease))
    }

    fn complete_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.monitor_lease(lease))
    }
}

/// A watch on one key or prefix that survives breakage: it reconnects with back-off and
/// resumes after the last event received. `next` is cancel-safe.
struct KeyWatch<'s> {
    store: &'s EtcdStore,
    key: String,
    prefix: bool,
    next_revision: i64,
    stream: Option<WatchStream>,
    backoff: Duration,
    /// Start of the last connection attempt, when it failed.
    failed_at: Option<Instant>,
    /// The stream broke and has not been re-established yet.
    broken: bool,
}

impl<'s> KeyWatch<'s> {
    fn new(store: &'s EtcdStore, key: String, prefix: bool) -> KeyWatch<'s> {
        KeyWatch {
            store,
            key,
            prefix,
            next_revision: 0,
            stream: None,
            backoff: store.backoff_initial,
            failed_at: None,
            broken: false,
        }
    }

    /// Restarts the watch at `revision`.
    fn resume_at(&mut self, revision: i64) {
        self.next_revision = revision;
        self.stream = None;
    }

    fn fail(&mut self, attempt: Instant, error: &dyn fmt::Display) {
        if self.broken {
            tracing::debug!(key = %self.key, %error, retry_in = ?self.backoff, "etcd watch still failing");
        } else {
            tracing::warn!(key = %self.key, %error, from_revision = self.next_revision, "etcd watch broke; reconnecting");
        }
        self.stream = None;
        self.failed_at = Some(attempt);
        self.broken = true;
    }

    async fn open(&self) -> Result<WatchStream, StoreError> {
        let client = self.store.client().await?;
        let key = self.key.clone().into_bytes();
        let request = WatchCreateRequest {
            range_end: if self.prefix {
                prefix_end(&key)
            } else {
                Vec::new()
            },
            key,
            start_revision: self.next_revision,
            ..WatchCreateRequest::default()
        };
        rpc("watch", client.watch(request)).await
    }

    async fn next(&mut self) -> WatchItem {
        loop {
            if let Some(failed_at) = self.failed_at {
                tokio::time::sleep_until(failed_at + self.backoff).await;
                self.failed_at = None;
                self.backoff = (self.backoff * 2).min(self.store.backoff_max);
            }
            if self.stream.is_none() {
                let attempt = Instant::now();
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) => {
                        self.fail(attempt, &e);
                        continue;
                    }
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision != 0 || resp.cancel_reason.contains("compacted") {
                        self.stream = None;
                        return WatchItem::Resync(Gap::Compacted);
                    }
                    if resp.canceled {
                        let reason = format!("watch canceled: {}", resp.cancel_reason);
                        self.fail(Instant::now(), &reason);
                        continue;
                    }
                    if resp.created {
                        let current = resp.header.map_or(0, |h| h.revision);
                        if current.saturating_add(1) < self.next_revision {
                            self.stream = None;
                            return WatchItem::Resync(Gap::Rewound);
                        }
                        self.backoff = self.store.backoff_initial;
                        if self.broken {
                            self.broken = false;
                            self.store
                                .counters
                                .reconnects
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::info!(key = %self.key, from_revision = self.next_revision, "etcd watch re-established");
                        }
                        continue;
                    }
                    let events = resp.events;
                    if events.is_empty() {
                        // A progress notification: everything up to its revision was sent.
                        if let Some(h) = resp.header {
                            self.next_revision =
                                self.next_revision.max(h.revision.saturating_add(1));
                        }
                        continue;
                    }
                    for event in &events {
                        if let Some(kv) = &event.kv {
                            self.next_revision =
                                self.next_revision.max(kv.mod_revision.saturating_add(1));
                        }
                    }
                    return WatchItem::Events(events);
                }
                Ok(None) => self.fail(Instant::now(), &"watch stream closed by etcd"),
                Err(e) => {
                    if e.to_string()
                        .contains("required revision has been compacted")
                    {
                        self.stream = None;
                        return WatchItem::Resync(Gap::Compacted);
                    }
                    self.fail(Instant::now(), &e);
                }
            }
        }
    }
}

/// The own key's watch: reads the key, then follows it; re-reads after compaction.
struct OwnWatch<'s> {
    watch: KeyWatch<'s>,
    synced: bool,
    retry_at: Option<Instant>,
    delay: Duration,
    failing: bool,
}

impl<'s> OwnWatch<'s> {
    fn new(store: &'s EtcdStore, key: String) -> OwnWatch<'s> {
        OwnWatch {
            watch: KeyWatch::new(store, key, false),
            synced: false,
            retry_at: None,
            delay: store.backoff_initial,
            failing: false,
        }
    }

    /// The next change of state (cancel-safe).
    async fn next(&mut self, ours: &LeaseAttrs) -> OwnState {
        let store = self.watch.store;
        loop {
            if !self.synced {
                if let Some(at) = self.retry_at {
                    tokio::time::sleep_until(at).await;
                    self.retry_at = None;
                }
                match store.get_key(&self.watch.key).await {
                    Ok((kv, revision)) => {
                        self.synced = true;
                        self.failing = false;
                        self.delay = store.backoff_initial;
                        self.watch.resume_at(revision.saturating_add(1));
                        return own_state(kv.as_ref(), ours);
                    }
                    Err(e) => {
                        if self.failing {
                            tracing::debug!(key = %self.watch.key, error = %e, "still cannot read own lease");
                        } else {
                            tracing::warn!(key = %self.watch.key, error = %e, "cannot read own lease; retrying");
                            self.failing = true;
                        }
                        self.retry_at = Some(Instant::now() + self.delay);
                        self.delay = (self.delay * 2).min(store.backoff_max);
                        continue;
                    }
                }
            }
            match self.watch.next().await {
                WatchItem::Resync(gap) => {
                    store.count_gap(gap);
                    tracing::warn!(key = %self.watch.key, ?gap, "own lease watch cannot resume; re-reading");
                    self.synced = false;
                }
                WatchItem::Events(events) => {
                    let mut state = None;
                    for event in &events {
                        match event.r#type {
                            EVENT_DELETE => return OwnState::Gone,
                            EVENT_PUT => state = Some(own_state(event.kv.as_ref(), ours)),
                            _ => {}
                        }
                    }
                    if let Some(state) = state {
                        return state;
                    }
                }
            }
        }
    }
}

/// Whether the own key (as read) is still ours.
fn own_state(kv: Option<&KeyValue>, ours: &LeaseAttrs) -> OwnState {
    match kv {
        None => OwnState::Gone,
        Some(kv) => own_value_state(&kv.value, kv.lease, ours),
    }
}

/// Whether a value at the own key, attached to etcd lease `lease_id`, is ours: same public IP
/// ([`LeaseAttrs::same_node`], the rule that found it).
fn own_value_state(value: &[u8], lease_id: i64, ours: &LeaseAttrs) -> OwnState {
    let attrs = std::str::from_utf8(value)
        .ok()
        .and_then(|text| LeaseAttrs::from_json(text).ok());
    match attrs {
        Some(a) if a.same_node(ours) => OwnState::Present(lease_id),
        _ => OwnState::Foreign,
    }
}

/// Sleeps until `at`; forever when `None`.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

/// A lease known only by its key (what a delete event carries).
fn bare_lease(key: SubnetKey) -> Lease {
    Lease::at_key(key, LeaseAttrs::default(), None)
}

/// Runs one etcd request with [`REQUEST_TIMEOUT`], mapping failures to
/// [`StoreError::Unavailable`].
async fn rpc<T>(
    what: &str,
    request: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Unavailable {
            store: STORE,
            message: format!("{what}: {e}"),
        }),
        Err(_) => Err(StoreError::Unavailable {
            store: STORE,
            message: format!("{what}: no answer within {REQUEST_TIMEOUT:?}"),
        }),
    }
}

/// A comparison that holds while no key in [key, range_end) exists (just key when range_end
/// is empty).
fn compare_version(key: &str, range_end: &str) -> Compare {
    compare_eq(
        key,
        range_end,
        CompareTarget::Version,
        TargetUnion::Version(0),
    )
}

/// A comparison that holds while `target` of [key, range_end) (just key when range_end is
/// empty) equals `value`.
fn compare_eq(key: &str, range_end: &str, target: CompareTarget, value: TargetUnion) -> Compare {
    Compare {
        result: CompareResult::Equal.into(),
        target: target.into(),
        key: key.as_bytes().to_vec(),
        target_union: Some(value),
        range_end: range_end.as_bytes().to_vec(),
    }
}

/// A transaction step that writes `key`, attached to etcd lease `lease`.
fn put_op(key: &str, value: String, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.into_bytes(),
            lease,
            ..PutRequest::default()
        })),
    }
}

/// An etcd key for logs: lossy UTF-8, escaped, at most 256 characters.
fn display_key(key: &[u8]) -> String {
    const MAX: usize = 256;
    let text = String::from_utf8_lossy(key);
    let mut out: String = text
        .chars()
        .take(MAX)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// Checks an endpoint's shape: optional `http://`/`https://`, a host, an optional port.
fn check_endpoint(endpoint: &str) -> Result<(), EtcdConfigError> {
    let err = |reason: &str| EtcdConfigError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = if let Some(r) = endpoint.strip_prefix("http://") {
        r
    } else if let Some(r) = endpoint.strip_prefix("https://") {
        r
    } else if endpoint.contains("://") {
        return Err(err("only http:// and https:// endpoints are supported"));
    } else {
        endpoint
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(err("no host"));
    }
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@')
    {
        return Err(err("not a host[:port]"));
    }
    // The port follows the last ':' outside an IPv6 literal's brackets.
    let after_bracket = authority.rsplit(']').next().unwrap_or_default();
    let bracketed = authority.starts_with('[');
    if bracketed && !authority.contains(']') {
        return Err(err("unterminated IPv6 literal"));
    }
    let port = if bracketed {
        after_bracket.strip_prefix(':')
    } else {
        authority.split_once(':').map(|(_, p)| p)
    };
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err(err("port is not a number from 0 to 65535"));
        }
    }
    Ok(())
}

/// Reads a PEM file named by `flag`.
fn read_pem(flag: &'static str, path: &str) -> Result<Vec<u8>, EtcdConfigError> {
    let err = |reason: String| EtcdConfigError::TlsFile {
        flag,
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(err(
            "no PEM data (expected a -----BEGIN ...----- block)".to_owned()
        ));
    }
    Ok(bytes)
}

/// Go's `path.Clean`: drops empty and `.` segments, resolves `..`, keeps a leading `/`.
fn clean_path(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Go's `path.Join(prefix, name)`.
fn join_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() || prefix == "." {
        clean_path(name)
    } else {
        clean_path(&format!("{prefix}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(prefix: &str) -> EtcdStore {
        EtcdStore::new(&EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: prefix.into(),
            ..EtcdConfig::default()
        })
        .expect("valid")
    }

    #[test]
    fn keys_follow_go_path_join() {
        let s = store("/coreos.com/network");
        assert_eq!(s.config_key(), "/coreos.com/network/config");
        assert_eq!(s.subnets_prefix(), "/coreos.com/network/subnets/");
        let k: SubnetKey = "10.12.13.0-24&fd00:12:13::-56".parse().expect("key");
        assert_eq!(
            s.lease_key(&k),
            "/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56"
        );
        assert_eq!(store("/a//b/").config_key(), "/a/b/config");
        assert_eq!(store("a/./b/../c").config_key(), "a/c/config");
        assert_eq!(store("").config_key(), "config");
        assert_eq!(store("/").config_key(), "/config");
        assert_eq!(store("/..").config_key(), "/config");
    }

    #[test]
    fn endpoint_validation_names_the_endpoint() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd.example:2379/",
            "127.0.0.1:2379",
            "http://[::1]:2379",
            "http://etcd",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "unix:///run/etcd.sock",
            "http://",
            "http://a:b",
            "http://a:99999",
            "http://[::1:2379",
            "http://user@host:1",
            "http://a b",
        ] {
            let e = check_endpoint(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let mixed = EtcdConfig {
            endpoints: vec!["http://a:1".into(), "https://b:2".into()],
            ..EtcdConfig::default()
        };
        let e = EtcdStore::new(&mixed).expect_err("mixed");
        assert!(matches!(e, EtcdConfigError::MixedSchemes { .. }), "{e}");
        let e = EtcdStore::new(&EtcdConfig::default()).expect_err("empty");
        assert!(e.to_string().starts_with("--etcd-endpoints is empty"));
    }

    #[test]
    fn tls_needs_https_and_readable_files() {
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            keyfile: "/nonexistent/key.pem".into(),
            certfile: "/nonexistent/cert.pem".into(),
            ..EtcdConfig::default()
        };
        let e = EtcdStore::new(&config).expect_err("http with tls");
        assert!(matches!(e, EtcdConfigError::HttpWithTls { .. }), "{e}");
        let config = EtcdConfig {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            ..config
        };
        let e = EtcdStore::new(&config).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("--etcd-certfile \"/nonexistent/cert.pem\""),
            "{e}"
        );
        // Only one of key and cert: plain connection, like upstream.
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            keyfile: "/nonexistent/key.pem".into(),
            ..EtcdConfig::default()
        };
        assert!(EtcdStore::new(&config).is_ok());
    }

    #[test]
    fn debug_masks_password() {
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: "flannel".into(),
            password: "hunter2".into(),
            ..EtcdConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        let s = EtcdStore::new(&config).expect("valid");
        let text = format!("{s:?}");
        assert!(
            !text.contains("hunter2") && text.contains("flannel"),
            "{text}"
        );
    }

    #[test]
    fn classify_keys_and_values() {
        let s = store("/coreos.com/network");
        let value = br#"{"PublicIP":"198.51.100.4","PublicIPv6":null,"BackendType":"host-gw"}"#;
        let Some(Entry::Valid(l)) = s.classify(b"/coreos.com/network/subnets/10.1.2.0-24", value)
        else {
            panic!("valid lease expected");
        };
        assert_eq!(l.subnet, Some("10.1.2.0/24".parse().expect("net")));
        assert!(s.classify(b"/coreos.com/network/config", value).is_none());
        assert!(s
            .classify(b"/coreos.com/network/subnetsX/10.1.2.0-24", value)
            .is_none());
        for bad_key in [
            &b"/coreos.com/network/subnets/10.1.2.5-24"[..],
            b"/coreos.com/network/subnets/junk",
            b"/coreos.com/network/subnets/\xff",
            b"/coreos.com/network/subnets/a/10.1.2.0-24",
        ] {
            assert!(
                matches!(
                    s.classify(bad_key, value),
                    Some(Entry::Invalid { key: None, .. })
                ),
                "{bad_key:?}"
            );
        }
        for bad_value in [&b"{"[..], b"\xff", br#"{"PublicIP":7}"#, b"[]"] {
            let e = s.classify(b"/coreos.com/network/subnets/10.1.2.0-24", bad_value);
            assert!(
                matches!(e, Some(Entry::Invalid { key: Some(_), .. })),
                "{bad_value:?}"
            );
        }
    }

    #[test]
    fn skipped_entries_warn_once_per_revision() {
        let s = store("/p");
        s.warn_skipped(b"/p/subnets/x", 5, "bad");
        s.warn_skipped(b"/p/subnets/x", 5, "bad");
        assert_eq!(s.stats().skipped, 1);
        s.warn_skipped(b"/p/subnets/x", 6, "bad");
        assert_eq!(s.stats().skipped, 2);
    }

    #[test]
    fn own_state_checks_public_ip() {
        let ours = LeaseAttrs {
            public_ip: "198.51.100.1".parse().expect("ip"),
            ..LeaseAttrs::default()
        };
        assert_eq!(own_state(None, &ours), OwnState::Gone);
        let mine = br#"{"PublicIP":"198.51.100.1","PublicIPv6":null}"#;
        assert_eq!(own_value_state(mine, 7, &ours), OwnState::Present(7));
        let other = br#"{"PublicIP":"198.51.100.2","PublicIPv6":null}"#;
        assert_eq!(own_value_state(other, 7, &ours), OwnState::Foreign);
        assert_eq!(own_value_state(b"{", 0, &ours), OwnState::Foreign);
        // IPv6-only: every lease says PublicIP 0.0.0.0; another node's PublicIPv6 is foreign.
        let ours6 = LeaseAttrs {
            public_ipv6: Some("2001:db8:100::1".parse().expect("ip")),
            ..LeaseAttrs::default()
        };
        let mine = br#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:100::1"}"#;
        assert_eq!(own_value_state(mine, 7, &ours6), OwnState::Present(7));
        let other = br#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:100::2"}"#;
        assert_eq!(own_value_state(other, 7, &ours6), OwnState::Foreign);
    }

    #[test]
    fn renew_deadline_subtracts_margin() {
        let s = store("/p").with_renew_margin(Duration::from_secs(60));
        let now = Instant::now();
        let at = s.renew_deadline(SystemTime::now() + Duration::from_secs(100));
        let wait = at.saturating_duration_since(now);
        assert!(
            wait <= Duration::from_secs(41) && wait >= Duration::from_secs(39),
            "{wait:?}"
        );
        let past = s.renew_deadline(SystemTime::now() + Duration::from_secs(10));
        assert!(past <= Instant::now());
    }
}
