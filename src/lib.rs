//! flannel-rs: a drop-in Rust reimplementation of flannel's data plane.
//!
//! Layers, top to bottom (dependencies only point down):
//!
//! * [`daemon`] wires everything: flags → config → lease store → backend → reconcile loop.
//! * [`doctor`] is `flanneld doctor`: node checks for the field problems, each with its fix.
//! * [`backend`] turns leases into desired host state with pure planners, then applies them:
//!   userspace VXLAN (TUN + UDP), kernel VXLAN (netlink) or host-gw routes.
//! * [`lease`] is the lease model (flannel's JSON), the watcher that diffs snapshots into
//!   events, and the stores (local directory, etcd, Kubernetes).
//! * [`masq`] is flannel's firewall rules (iptables or nftables masquerade and forward
//!   accepts) and our VXLAN guard, rendered purely and applied with the firewall programs.
//! * [`config`] is flanneld's flags and `FLANNELD_*` environment, net-conf.json and subnet.env.
//! * [`dataplane`] is the sans-IO packet core: peer table, encap/decap, verdicts, counters.
//! * [`wire`] is zero-copy views over packet bytes and the internet checksum.
//! * [`io`] is the only module that talks to the OS with `unsafe`: TUN, UDP batching, ethtool.
//! * [`netlink`] programs links, addresses, routes, neighbours and FDB entries, each call
//!   documented as the `ip`/`bridge` command it equals.
//!
//! `dataplane` and `wire` are the `flannel-core` crate (core/), re-exported: a crate with no
//! tokio, libc, netlink or serde dependency, so "the core does no IO" is checked by the
//! compiler.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod io;
pub mod lease;
pub mod masq;
pub mod netlink;

/// The sans-IO core lives in its own crate, `flannel-core` (core/), which cannot depend on
/// tokio, libc, netlink or serde; these re-exports keep `crate::wire` and `crate::dataplane`
/// paths working here.
pub use flannel_core::{dataplane, wire};

/// The `flanneld --version` line: `flanneld v<version> (<git commit>)` (upstream prints
/// `v<version>` alone; the commit comes from build.rs, "unknown" outside a git checkout).
pub fn version_line() -> String {
    format!(
        "flanneld v{} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("FLANNELD_GIT_COMMIT")
    )
}
