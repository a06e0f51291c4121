//! flanneld's configuration surfaces: command-line flags with their `FLANNELD_*` environment
//! fallbacks, net-conf.json (also the etcd `config` value), and `/run/flannel/subnet.env`.
//!
//! Every format here is read by or written for other programs (the flannel CNI plugin, existing
//! DaemonSet manifests, etcd data written by upstream flannel), so each module follows
//! upstream's observable behaviour and documents where it is deliberately stricter.

pub mod flags;
pub(crate) mod gojson;
pub mod install_conf;
pub mod netconf;
pub mod secret;
pub mod subnet_env;

pub use flags::{Command, Dataplane, FlagError, Flags};
pub use netconf::{AllocRange, BackendConfig, NetConfig, NetConfigError, Subnet, VxlanConfig};
pub use subnet_env::{PreviousSubnets, SubnetEnv, SubnetEnvError};
