//! Network-namespace clusters for flannel-rs.
//!
//! One run = a unique prefix `p` (`fr` + 6 hex digits) and:
//! * `p-ul`: the underlay, a bridge `br0`;
//! * `p-n<i>`: node `i` with `eth0` = 198.18.0.`i`/24 on that bridge, `ip_forward=1`, and either
//!   our `flanneld` (kinds `userspace`, `kernel`) or the harness programming the kernel exactly
//!   like upstream flannel (`kernel-ref`);
//! * `p-n<i>p<j>`: pod `j` of node `i`, made by the real CNI plugins from kube-flannel.yml's
//!   conflist and the node's `subnet.env` ([`cni`]: flannel → `bridge` + `host-local`, then
//!   `portmap`; `cni0` bridge, address from host-local, default route via `10.244.X.1`), or
//!   wired by hand like them ([`PodSetup::Hand`]), with TCP/UDP/DNS responders;
//! * `p-cp` (etcd and kube runs, see [`store`]): the control plane, etcd or the test
//!   Kubernetes API server, on the underlay bridge at 198.18.0.254;
//! * two-site runs (`ClusterSpec::sites`, field problem P1): each site's nodes on a private
//!   bridge 198.18.`s`.0/24 behind a 1:1 NAT router `p-r<s>` to the public bridge
//!   203.0.113.0/24, where the control plane lives;
//! * `/tmp/netns-harness/p/`: the lease directory, per-node `subnet.env` and logs, captures,
//!   store data and logs, and `state.json` for later commands.
//!
//! The field-problem scenarios (P2, P3: break a cluster like a field report, check the matrix
//! and `flanneld doctor`, fix it, check again) are in [`scenario`]; `flanneld doctor` output is
//! parsed by [`doctor`].
//!
//! Nothing is ever created in the root namespace; every address is in 198.18.0.0/15,
//! 203.0.113.0/24 or 10.244.0.0/16 inside the run's namespaces (plus emulated ClusterIPs,
//! which exist only in one node's nat table). [`Cluster`] tears everything down on drop
//! (also on panic), stopping only the processes it started, by PID.
//!
//! ```no_run
//! use netns_harness::{Cluster, ClusterSpec, NodeKind};
//! let spec = ClusterSpec::new(&[NodeKind::KernelRef, NodeKind::KernelRef], 2);
//! let cluster = Cluster::up(&spec)?;
//! let matrix = cluster.check();
//! assert!(matrix.all_pass(), "{matrix}");
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod bench;
pub mod binaries;
pub mod capture;
pub mod check;
pub mod cluster;
pub mod cmd;
pub mod cni;
pub mod doctor;
pub mod http;
pub mod kernel_ref;
pub mod lease;
pub mod net;
pub mod proto;
pub mod scale;
pub mod scenario;
pub mod store;
pub mod suite;
pub mod sys;

pub use bench::{BenchPath, BenchReport, BenchRow};
pub use capture::{verify_pcap, Capture, CaptureOpts, CaptureReport};
pub use check::{Cell, Family, Matrix, ProbeKind, ProbeOutcome, SourceKind};
pub use cluster::{
    list_runs, teardown_by_prefix, Cluster, ClusterSpec, IpFamily, NodeKind, NodeSpec, NodeState,
    PodState, RunState, DEFAULT_BASE_DIR,
};
pub use cni::{PodSetup, PortMapping};
pub use doctor::{DoctorCheck, DoctorReport, DoctorRun, Level};
pub use lease::{LeaseDir, NetConf, SubnetEnv};
pub use net::{Cidr, Cidr6};
pub use scenario::{Scenario, ScenarioOpts, ScenarioReport};
pub use store::{ControlPlane, StoreKind};
pub use sys::{install_signal_handler, interrupted, is_root};

/// For privileged tests: true when the caller may go on. Not root and `CI` is not `"true"`:
/// prints how to run the test and returns false (skip). Not root with `CI=true`: panics, because
/// CI must run them.
pub fn privileged_test_guard(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root (network namespaces) and CI=true: run the tests as root");
    }
    eprintln!(
        "skipping {test}: needs root for network namespaces; run `sudo -E cargo test -p netns-harness`"
    );
    false
}
