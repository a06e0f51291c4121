//! flannel's nftables mode in the daemon (`EnableNFTables: true`): the tables of
//! [`crate::masq::nft`] written at start and re-checked every `--iptables-resync` seconds,
//! and the clean-up of the other mode's rules at start, as upstream's `main.go` does.

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::config::flags::Flags;
use crate::masq::{flannel_table_script, nft_family, nft_table, Iptables, Nft, NftRules};
use crate::netlink::IpFamily;

/// Longest the clean-up of the other mode may take (each command is also bounded).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// flannel's nftables tables: what they must hold, and the `nft` that writes them.
#[derive(Debug)]
pub(super) struct NftFirewall {
    nft: Option<Arc<Nft>>,
    /// (Network, our subnet) of each enabled family.
    v4: Option<(IpNet, IpNet)>,
    v6: Option<(IpNet, IpNet)>,
    ip_masq: bool,
    random_fully_disabled: bool,
    forward: bool,
    /// The scripts of both tables, decided at the first successful round (the
    /// `fully-random` probe needs `nft`).
    scripts: Option<Arc<Vec<(IpFamily, String)>>>,
}

impl NftFirewall {
    pub(super) fn new(
        flags: &Flags,
        v4: Option<(IpNet, IpNet)>,
        v6: Option<(IpNet, IpNet)>,
    ) -> NftFirewall {
        NftFirewall {
            nft: None,
            v4,
            v6,
            ip_masq: flags.ip_masq,
            random_fully_disabled: flags.ip_masq_fully_random_disable,
            forward: flags.iptables_forward_rules,
            scripts: None,
        }
    }

    /// Writes both tables the first time (upstream creates `flannel-ipv6` even without
    /// IPv6), then rewrites any table that no longer lists as written.
    pub(super) async fn ensure(&mut self) -> Result<(), String> {
        let nft = match &self.nft {
            Some(n) => n.clone(),
            None => {
                let n = tokio::task::spawn_blocking(Nft::detect)
                    .await
                    .map_err(|e| format!("nft task failed: {e}"))?
                    .map_err(|e| format!("nftables mode needs the nft binary: {e}"))?;
                let n = Arc::new(n);
                self.nft = Some(n.clone());
                n
            }
        };
        let first = self.scripts.is_none();
        let scripts = match &self.scripts {
            Some(s) => s.clone(),
            None => {
                let (v4_nets, v6_nets) = (self.v4, self.v6);
                let (ip_masq, no_random, forward) =
                    (self.ip_masq, self.random_fully_disabled, self.forward);
                let probe = nft.clone();
                let random_fully = tokio::task::spawn_blocking(move || {
                    ip_masq && !no_random && probe.supports_random_fully()
                })
                .await
                .map_err(|e| format!("nft task failed: {e}"))?;
                // A family that is not enabled gets its table empty, as upstream's.
                let rules = |family, nets: Option<(IpNet, IpNet)>| NftRules {
                    family,
                    masq: nets
                        .filter(|_| ip_masq)
                        .map(|(network, subnet)| (network, subnet, random_fully)),
                    forward: nets.filter(|_| forward).map(|(network, _)| network),
                };
                let s = Arc::new(vec![
                    (
                        IpFamily::V4,
                        flannel_table_script(&rules(IpFamily::V4, v4_nets)),
                    ),
                    (
                        IpFamily::V6,
                        flannel_table_script(&rules(IpFamily::V6, v6_nets)),
                    ),
                ]);
                self.scripts = Some(s.clone());
                s
            }
        };
        let done = tokio::task::spawn_blocking(move || -> Result<Vec<&'static str>, String> {
            let mut rewritten = Vec::new();
            for (family, script) in scripts.iter() {
                let (fam, name) = (nft_family(*family), nft_table(*family));
                if nft
                    .ensure_table(fam, name, script)
                    .map_err(|e| format!("nftables: couldn't set up table {fam} {name}: {e}"))?
                {
                    // Said at once: the next table's check takes a while.
                    if !first {
                        warn!(
                            table = name,
                            "Some nftables rules are missing or changed; recreated the table"
                        );
                    }
                    rewritten.push(name);
                }
            }
            Ok(rewritten)
        })
        .await
        .map_err(|e| format!("nft task failed: {e}"))??;
        if first {
            info!(
                masq = self.ip_masq,
                forward = self.forward,
                tables = ?done,
                "nftables: flannel tables installed"
            );
        }
        Ok(())
    }
}

/// Removes the rules of the mode not in use, as upstream does at start since v0.27.0:
/// in nftables mode flannel's iptables chains (and our guard chains), in iptables mode
/// flannel's nftables tables (and our guard table). Missing binaries mean nothing to clean.
pub(super) async fn cleanup_other_mode(nftables_mode: bool) {
    let work = tokio::task::spawn_blocking(move || {
        if nftables_mode {
            info!("Cleaning-up iptables rules...");
            for family in [IpFamily::V4, IpFamily::V6] {
                match Iptables::detect(family) {
                    Ok(ipt) => match ipt.cleanup_flannel_chains() {
                        Ok(true) => info!(%family, "removed flannel's iptables chains"),
                        Ok(false) => {}
                        Err(e) => warn!(%family, error = %e, "could not clean up iptables chains"),
                    },
                    Err(e) => debug!(%family, error = %e, "no iptables; nothing to clean up"),
                }
            }
        } else {
            info!("Cleaning-up nftables rules...");
            match Nft::detect() {
                Ok(nft) => match nft.cleanup() {
                    Ok(gone) if !gone.is_empty() => {
                        info!(tables = ?gone, "removed nftables tables")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "could not clean up nftables tables"),
                },
                Err(e) => debug!(error = %e, "no nft; nothing to clean up"),
            }
        }
    });
    if tokio::time::timeout(CLEANUP_TIMEOUT, work).await.is_err() {
        warn!("cleaning up the other firewall mode took longer than {CLEANUP_TIMEOUT:?}; gave up");
    }
}
