//! Opening the lease store the flags select: `--lease-dir`, `--kube-subnet-mgr`, else etcd.
//! Shared by the daemon and `flanneld doctor`, so both read the same store the same way.

use super::dir::DirStore;
use super::store::{LeaseStore, StoreError};
use crate::config::flags::Flags;

/// Why no store could be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store refused or failed while connecting.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The flags ask for a store this build lacks, or its settings are unusable.
    #[error("{0}")]
    Unsupported(String),
}

/// The store the flags select (flannel's order: a local directory, the Kubernetes API, etcd).
pub async fn open(flags: &Flags) -> Result<Box<dyn LeaseStore>, OpenError> {
    if let Some(dir) = &flags.lease_dir {
        return Ok(Box::new(DirStore::new(dir.clone())));
    }
    if flags.kube_subnet_mgr {
        #[cfg(feature = "kube")]
        {
            let env = |name: &str| std::env::var(name).ok();
            let kube = super::kube::KubeStore::connect(flags, &env).await?;
            return Ok(Box::new(kube));
        }
        #[cfg(not(feature = "kube"))]
        return Err(OpenError::Unsupported(
            "--kube-subnet-mgr: this flanneld was built without the kube feature".into(),
        ));
    }
    #[cfg(feature = "etcd")]
    {
        let etcd = super::etcd::EtcdStore::from_flags(flags)
            .map_err(|e| OpenError::Unsupported(e.to_string()))?;
        Ok(Box::new(etcd))
    }
    #[cfg(not(feature = "etcd"))]
    Err(OpenError::Unsupported(
        "the etcd store: this flanneld was built without the etcd feature; use --lease-dir".into(),
    ))
}
