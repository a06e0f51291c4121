//! Applying a planner's kernel operations (`plan::Op`) through netlink, shared by the kernel
//! VXLAN plane and host-gw: additions per peer in order, peers concurrently; removals class by
//! class; every failure recorded in a [`SyncReport`] for the next sync to retry.

use std::collections::BTreeSet;

use futures::StreamExt;
use ipnet::IpNet;

use super::plan::{Op, RouteEntry, Skipped};
use crate::netlink::{
    IpFamily, Netlink, NetlinkError, Route, RouteProtocol, RouteScope, RouteType, RT_TABLE_MAIN,
};

/// How many netlink requests are in flight at once during a sync.
pub(crate) const CONCURRENCY: usize = 64;

/// One operation that failed during a sync; it is retried by the next sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpFailure {
    /// The peer subnet the operation served (`None` for removals of stale entries).
    pub peer: Option<IpNet>,
    /// The equivalent iproute2 command.
    pub op: String,
    /// The error text.
    pub error: String,
    /// The errno, when the kernel refused.
    pub errno: Option<i32>,
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Peers (of this family and backend type) planned.
    pub planned: usize,
    /// Peers left out, with the reason.
    pub skipped: Vec<Skipped>,
    /// Entries added or replaced.
    pub added: usize,
    /// Stale entries removed.
    pub removed: usize,
    /// Failed operations (also those skipped because an earlier one of the same peer failed).
    pub failures: Vec<OpFailure>,
    /// The device is gone; the caller should run `recover`.
    pub device_missing: bool,
}

impl SyncReport {
    /// True when nothing failed.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty() && !self.device_missing
    }

    /// Peers with at least one failed operation.
    pub fn failed_peers(&self) -> BTreeSet<IpNet> {
        self.failures.iter().filter_map(|f| f.peer).collect()
    }

    pub(crate) fn fail(&mut self, peer: Option<IpNet>, op: String, e: &NetlinkError) {
        // Debug: the daemon logs a persisting sync failure once (daemon::backoff::Condition).
        tracing::debug!(op = %op, error = %e, "netlink operation failed; will retry on next sync");
        self.failures.push(OpFailure {
            peer,
            op,
            error: e.to_string(),
            errno: e.errno(),
        });
    }
}

/// User-installed unicast routes of the main table (`proto` unspec, boot or static), in the
/// planner's shape. Kernel-made routes (`proto kernel`, `ra`, `redirect`…) are never ours.
pub(crate) async fn read_routes(
    nl: &Netlink,
    family: IpFamily,
) -> Result<Vec<RouteEntry>, NetlinkError> {
    Ok(nl
        .route_list(family)
        .await?
        .into_iter()
        .filter(|r| r.table == RT_TABLE_MAIN && r.kind == RouteType::Unicast)
        .filter(|r| {
            matches!(
                r.protocol,
                RouteProtocol::Unspec | RouteProtocol::Boot | RouteProtocol::Static
            )
        })
        .map(|r| RouteEntry {
            dst: r.dst,
            via: r.gateway,
            dev: r.oif,
            onlink: r.onlink,
            metric: r.metric,
        })
        .collect())
}

fn to_route(r: &RouteEntry) -> Route {
    Route {
        dst: r.dst,
        gateway: r.via,
        oif: r.dev,
        onlink: r.onlink,
        metric: r.metric,
        table: RT_TABLE_MAIN,
        protocol: RouteProtocol::Boot,
        scope: if r.via.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        },
        kind: RouteType::Unicast,
        prefsrc: None,
    }
}

async fn run_op(nl: &Netlink, index: u32, op: &Op) -> Result<(), NetlinkError> {
    let tolerate_missing = |r: Result<(), NetlinkError>| match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    };
    match op {
        Op::NeighReplace { neigh, .. } => nl.neigh_replace(index, neigh.ip, neigh.mac).await,
        Op::FdbReplace { fdb, .. } => nl.fdb_replace(index, fdb.mac, fdb.dst).await,
        Op::RouteReplace { route, .. } => nl.route_replace(&to_route(route)).await,
        Op::RouteClear { route, .. } | Op::RouteDel { route } => {
            tolerate_missing(nl.route_del(&to_route(route)).await)
        }
        Op::FdbDel { fdb } => tolerate_missing(nl.fdb_del(index, fdb.mac, fdb.dst).await),
        Op::NeighDel { neigh } => tolerate_missing(nl.neigh_del(index, neigh.ip).await),
    }
}

/// One peer's additions in order; after a failure the rest are skipped.
async fn run_group(nl: &Netlink, index: u32, group: &[Op]) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(group.len());
    let mut failed = false;
    for op in group {
        if failed {
            out.push(Outcome::SkippedAfterFailure);
            continue;
        }
        match run_op(nl, index, op).await {
            Ok(()) => out.push(Outcome::Done),
            Err(e) => {
                failed = true;
                out.push(Outcome::Failed(e));
            }
        }
    }
    out
}

/// Result of one addition.
enum Outcome {
    Done,
    Failed(NetlinkError),
    SkippedAfterFailure,
}

/// Applies `ops` in the planner's order. Additions run per peer in order (neighbour, FDB,
/// route), peers concurrently; after a failed addition the rest of that peer's additions are
/// skipped. Removals run class by class (routes, FDB, neighbours), each class concurrently.
/// Failures name device `index` `name`, other devices by index.
pub(crate) async fn apply_ops(
    nl: &Netlink,
    ops: &[Op],
    index: u32,
    name: &str,
    report: &mut SyncReport,
) {
    let dev_name = |i: u32| {
        if i == index {
            name.to_owned()
        } else {
            format!("ifindex {i}")
        }
    };
    // Additions: contiguous runs of one peer.
    let split = ops.iter().position(Op::is_removal).unwrap_or(ops.len());
    let (adds, removals) = ops.split_at(split);
    let mut groups: Vec<&[Op]> = Vec::new();
    let mut start = 0;
    for i in 1..=adds.len() {
        if i == adds.len() || adds[i].peer() != adds[start].peer() {
            if start < i {
                groups.push(&adds[start..i]);
            }
            start = i;
        }
    }
    let runs: Vec<_> = groups
        .into_iter()
        .map(|g| run_group(nl, index, g))
        .collect();
    let results: Vec<Vec<Outcome>> = futures::stream::iter(runs)
        .buffered(CONCURRENCY)
        .collect()
        .await;
    for (op, outcome) in adds.iter().zip(results.into_iter().flatten()) {
        match outcome {
            Outcome::Done => report.added += 1,
            Outcome::Failed(e) => report.fail(op.peer(), op.describe(index, dev_name), &e),
            Outcome::SkippedAfterFailure => report.failures.push(OpFailure {
                peer: op.peer(),
                op: op.describe(index, dev_name),
                error: "skipped: an earlier operation for this peer failed".to_owned(),
                errno: None,
            }),
        }
    }

    // Removals, one class after the other.
    let mut rest = removals;
    while let Some(first) = rest.first() {
        let class = std::mem::discriminant(first);
        let n = rest
            .iter()
            .position(|o| std::mem::discriminant(o) != class)
            .unwrap_or(rest.len());
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        let runs: Vec<_> = batch.iter().map(|op| run_op(nl, index, op)).collect();
        let results: Vec<Result<(), NetlinkError>> = futures::stream::iter(runs)
            .buffered(CONCURRENCY)
            .collect()
            .await;
        for (op, r) in batch.iter().zip(results) {
            let text = op.describe(index, dev_name);
            match r {
                Ok(()) => {
                    tracing::info!(op = %text, "removed stale entry (no current lease for it)");
                    report.removed += 1;
                }
                Err(e) => report.fail(None, text, &e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_conversion() {
        let r = RouteEntry {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: Some("10.244.2.0".parse().unwrap()),
            dev: Some(4),
            onlink: true,
            metric: 0,
        };
        let nr = to_route(&r);
        assert_eq!(nr.protocol, RouteProtocol::Boot);
        assert_eq!(
            nr.to_string(),
            "10.244.2.0/24 via 10.244.2.0 dev ifindex 4 onlink"
        );
    }
}
