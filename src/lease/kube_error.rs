//! Why the Kubernetes store cannot work ([`super::kube`]). Its own module so that
//! [`super::store::StoreError`] can carry it without the store interface importing the
//! Kubernetes store.

use std::path::PathBuf;

use super::annotations::AnnotationError;
use crate::config::netconf::NetConfigError;

/// Why the Kubernetes store cannot work. Messages are upstream's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The client configuration (kubeconfig, URL, in-cluster files) is unusable.
    #[error("fail to create kubernetes config: {0}")]
    Config(String),
    /// The HTTP client could not be built.
    #[error("unable to initialize client: {0}")]
    Client(String),
    /// Neither `NODE_NAME` nor both `POD_NAME` and `POD_NAMESPACE` are set.
    #[error("env variables POD_NAME and POD_NAMESPACE must be set")]
    PodEnvMissing,
    /// The pod named by `POD_NAMESPACE`/`POD_NAME` could not be read.
    #[error("error retrieving pod spec for '{namespace}/{name}': {message}")]
    PodLookup {
        /// `POD_NAMESPACE`.
        namespace: String,
        /// `POD_NAME`.
        name: String,
        /// The API error.
        message: String,
    },
    /// The pod has no `spec.nodeName`.
    #[error("node name not present in pod spec '{namespace}/{name}'")]
    PodWithoutNode {
        /// `POD_NAMESPACE`.
        namespace: String,
        /// `POD_NAME`.
        name: String,
    },
    /// `--net-config-path` cannot be read.
    #[error("failed to read net conf: {path}: {source}")]
    ReadNetConf {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `--net-config-path` does not parse.
    #[error("error parsing subnet config: {0}")]
    ParseNetConf(#[source] NetConfigError),
    /// `--kube-annotation-prefix` is invalid.
    #[error(transparent)]
    Prefix(AnnotationError),
    /// This node did not appear, or could not be patched, in time.
    #[error("timeout contacting kube-api, failed to patch node {node:?}. Error: {message}")]
    Timeout {
        /// This node's name.
        node: String,
        /// The last error seen.
        message: String,
    },
    /// This node has no `spec.podCIDR` yet.
    #[error("node {0:?} pod cidr not assigned")]
    PodCidrNotAssigned(String),
    /// This node has more than two pod CIDRs.
    #[error("node {0:?} pod cidrs should be IPv4/IPv6 only or dualstack")]
    TooManyPodCidrs(String),
    /// This node's pod CIDRs are unusable for the enabled families.
    #[error("node {node:?}: {source}")]
    PodCidr {
        /// This node's name.
        node: String,
        /// What is wrong.
        #[source]
        source: AnnotationError,
    },
    /// This node's pod CIDR is not inside `Network` / `IPv6Network`.
    #[error("subnet {network:?} specified in the flannel net config doesn't contain {cidr:?} {family}PodCIDR of the {node:?} node")]
    OutsideNetwork {
        /// `Network` (empty when unset).
        network: String,
        /// The pod CIDR.
        cidr: String,
        /// `""` or `"IPv6 "`.
        family: &'static str,
        /// This node's name.
        node: String,
    },
    /// An annotation on this node that flannel reads has an unusable value.
    #[error("node {node:?}: {source}")]
    Annotation {
        /// This node's name.
        node: String,
        /// Which annotation and why.
        #[source]
        source: AnnotationError,
    },
}
