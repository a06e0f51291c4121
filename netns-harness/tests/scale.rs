//! `netns-harness scale` on a small scale: a flanneld of each data plane programs every peer
//! the API server holds and follows churn through the watch (no re-list); a mixed cluster's
//! sampled matrix converges. The README's 5,000-peer and 30-node numbers come from the same
//! code (`netns-harness scale peers`, `netns-harness scale cluster`).

mod common;

use std::time::Duration;

use netns_harness::scale::{cluster_scale, peer_scale, ClusterScaleOpts, PeerScaleOpts};
use netns_harness::{privileged_test_guard, NodeKind, StoreKind, DEFAULT_BASE_DIR};

fn peers(kind: NodeKind) {
    let r = peer_scale(&PeerScaleOpts {
        kind,
        peers: 200,
        churn_percent: 2.0,
        churn_every: Duration::from_secs(3),
        churn_for: Duration::from_secs(12),
        converge_limit: Duration::from_secs(60),
        flanneld: None,
        apiserver: None,
        base_dir: DEFAULT_BASE_DIR.into(),
    })
    .expect("peer scale run");
    println!("{r}");
    assert_eq!(r.peers, 200);
    assert!(r.at_programmed.rss_kib > 0 && r.at_programmed.cpu_secs >= 0.0);
    assert_eq!(r.churn.len(), 4, "{r:?}");
    let changes: Vec<i64> = r.churn.iter().map(|s| s.change).collect();
    assert_eq!(changes, [-4, 4, -4, 4]);
    for s in &r.churn {
        assert!(
            s.latency_ms.is_some(),
            "a churn step was not programmed in time: {r:?}"
        );
    }
    assert_eq!(
        r.relists_during_churn, 0,
        "the watch must carry churn: {r:?}"
    );
}

#[test]
fn userspace_daemon_programs_every_peer_and_follows_churn() {
    if !privileged_test_guard("userspace_daemon_programs_every_peer_and_follows_churn") {
        return;
    }
    let _g = common::serial();
    peers(NodeKind::Userspace);
}

#[test]
fn kernel_daemon_programs_every_peer_and_follows_churn() {
    if !privileged_test_guard("kernel_daemon_programs_every_peer_and_follows_churn") {
        return;
    }
    let _g = common::serial();
    peers(NodeKind::Kernel);
}

#[test]
fn mixed_cluster_sampled_matrix_converges() {
    if !privileged_test_guard("mixed_cluster_sampled_matrix_converges") {
        return;
    }
    let _g = common::serial();
    let r = cluster_scale(&ClusterScaleOpts {
        kinds: vec![NodeKind::Userspace, NodeKind::Kernel, NodeKind::KernelRef],
        nodes: 6,
        store: StoreKind::Dir,
        converge_limit: Duration::from_secs(60),
        flanneld: None,
        base_dir: DEFAULT_BASE_DIR.into(),
    })
    .expect("cluster scale run");
    println!("{r}");
    assert_eq!(r.nodes, "2 userspace, 2 kernel, 2 kernel-ref");
    assert_eq!(
        r.pairs,
        6 * 3,
        "strides 1, 2 and 3 (15 is 3 again on six nodes)"
    );
    assert_eq!(r.daemons.len(), 4);
    assert!(r.daemons.iter().all(|d| d.usage.rss_kib > 0));
}
