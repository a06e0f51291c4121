//! The interface every lease store implements: the local directory store ([`super::dir`]),
//! etcd ([`super::etcd`], flannel's key layout) and the Kubernetes API ([`super::kube`], Node
//! podCIDR and flannel's annotations).
//!
//! Methods return boxed futures (`futures::future::BoxFuture`) rather than native `async fn`,
//! so the trait stays dyn-compatible: the daemon picks a store from the flags at run time and
//! holds it as `Box<dyn LeaseStore>`. The boxing costs one allocation per call, on calls that
//! happen a handful of times per process lifetime.

use core::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Lease, LeaseAttrs, LeaseEvent};
use crate::config::netconf::{NetConfig, NetConfigError};
use crate::config::subnet_env::PreviousSubnets;
use crate::wire::MacAddr;

/// Public addresses a store holds for this node: (IPv4, IPv6).
pub type StoredPublicIps = (Option<Ipv4Addr>, Option<Ipv6Addr>);

/// VTEP MACs a store holds for this node: (IPv4 vxlan device, IPv6 vxlan device).
pub type StoredVtepMacs = (Option<MacAddr>, Option<MacAddr>);

/// What a store's watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchUpdate {
    /// The complete current set of leases (own lease included; the watcher filters it).
    Snapshot(Vec<Lease>),
    /// Changes since the previous update.
    Events(Vec<LeaseEvent>),
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The network config does not exist in the store.
    #[error("flannel config not found at {0}: write the network config JSON there, e.g. {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}")]
    ConfigNotFound(String),
    /// The network config is unusable for allocation.
    #[error(transparent)]
    Config(#[from] NetConfigError),
    /// The lease has neither an IPv4 nor an IPv6 subnet, so it has no key in the store.
    #[error("the {0} store cannot store a lease without an IPv4 or IPv6 subnet")]
    NoSubnet(&'static str),
    /// No free subnet between SubnetMin and SubnetMax (upstream's message).
    #[error("out of subnets")]
    OutOfSubnets,
    /// Every attempt lost a race for the chosen subnet (upstream's message).
    #[error("max retries reached trying to acquire a subnet")]
    MaxRetries,
    /// The etcd store has no `<prefix>/config` key (upstream's message, then the key).
    #[error("flannel config not found in etcd store. Did you create your config using etcdv3 API? (key {key})")]
    EtcdConfigNotFound {
        /// The key that was read.
        key: String,
    },
    /// This node's lease disappeared from the store or now belongs to another node; the
    /// daemon shuts down, as upstream does (upstream's message).
    #[error("Lease has been revoked. Shutting down daemon.")]
    LeaseRevoked {
        /// The lease's store key.
        key: String,
    },
    /// The store cannot be reached or answered with an error.
    #[error("{store} store unavailable: {message}")]
    Unavailable {
        /// Which store.
        store: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A Kubernetes store failure other than an unreachable API server (node name, pod CIDR,
    /// annotations, net-conf.json).
    #[error(transparent)]
    #[cfg(feature = "kube")]
    Kube(#[from] super::kube_error::KubeError),
}

/// A source of the network config and of leases.
pub trait LeaseStore: Send + Sync + fmt::Debug {
    /// A description for logs (flannel's `Name()`).
    fn name(&self) -> String;

    /// The network config JSON (net-conf.json / the etcd `config` value), unparsed.
    fn network_config(&self) -> BoxFuture<'_, Result<String, StoreError>>;

    /// Obtains this node's lease for `attrs`, trying `previous` (from subnet.env) when the
    /// store allocates subnets itself. `config` is the parsed network config.
    fn acquire<'a>(
        &'a self,
        config: &'a NetConfig,
        attrs: &'a LeaseAttrs,
        previous: &'a PreviousSubnets,
    ) -> BoxFuture<'a, Result<Lease, StoreError>>;

    /// Every lease currently in the store (own included), e.g. to find the VTEP MAC our
    /// previous lease published.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>>;

    /// Sends updates into `tx` until it is closed (then returns `Ok`), starting with a
    /// [`WatchUpdate::Snapshot`] of the current leases.
    fn watch(&self, tx: mpsc::Sender<WatchUpdate>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Extends `lease` in stores whose leases expire, returning it with the new expiration.
    /// Stores without expiry return it unchanged.
    fn renew_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(async move { Ok(lease.clone()) })
    }

    /// Looks after this node's lease for the daemon's lifetime (upstream's `CompleteLease`):
    /// renews it before it expires and returns [`StoreError::LeaseRevoked`] once it is gone.
    /// Transient store errors are retried, never returned. Stores without expiring leases
    /// never complete. The daemon selects on this next to its shutdown signal.
    fn complete_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = lease;
        Box::pin(futures::future::pending())
    }

    /// Public addresses configured for this node in the store, which override `--public-ip` /
    /// `--public-ipv6` at start (kube: the `node-public-ip(v6)` annotations). Stores without
    /// such a setting return `(None, None)`. Call before choosing the external interface.
    fn stored_public_ips(&self) -> BoxFuture<'_, Result<StoredPublicIps, StoreError>> {
        Box::pin(async { Ok((None, None)) })
    }

    /// The VTEP MACs (IPv4, IPv6) this node published before, to create the vxlan device with
    /// so peers' entries stay valid across restarts (kube: the node's own `backend-data` /
    /// `backend-v6-data` annotations). `(None, None)` when unknown or not applicable.
    fn stored_vtep_macs(&self) -> BoxFuture<'_, Result<StoredVtepMacs, StoreError>> {
        Box::pin(async { Ok((None, None)) })
    }

    /// Tells the store that the network is up on this node, once the backend runs (kube: the
    /// node condition NetworkUnavailable=False, part of flannel's `CompleteLease`). A no-op for
    /// stores without such a notion.
    fn mark_network_available(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}
