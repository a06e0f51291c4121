//! Turns what stores report (full snapshots, or incremental events) into add/remove events
//! against the set of *other* nodes' leases: the one diff of the lease set (the Kubernetes
//! store sends only snapshots, etcd and the directory store events after the first
//! snapshot). Pure: no IO, no clock.
//!
//! Like flannel's `pkg/lease/lease.go` `LeaseWatcher`, but correct where upstream is not: a
//! snapshot emits `Added` for leases whose contents changed (upstream only reports new ones, so
//! a node that changed its VTEP MAC while the watch was broken stays stale), duplicates and
//! no-op updates emit nothing, and `Removed` for an unknown lease emits nothing.
//!
//! Identity is the pair of subnets (flannel's etcd key). A lease that shares a subnet with our
//! own lease is never reported: programming a route to our own subnet via another node would
//! break local pods. Leases without any subnet are ignored.

use std::collections::BTreeMap;

use ipnet::{Ipv4Net, Ipv6Net};

use super::store::WatchUpdate;
use super::{Lease, LeaseEvent};

type Id = (Option<Ipv4Net>, Option<Ipv6Net>);

/// The set of known peer leases; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct LeaseWatcher {
    own_ipv4: Option<Ipv4Net>,
    own_ipv6: Option<Ipv6Net>,
    leases: BTreeMap<Id, Lease>,
}

impl LeaseWatcher {
    /// A watcher that ignores leases overlapping our own subnets.
    pub fn new(own_ipv4: Option<Ipv4Net>, own_ipv6: Option<Ipv6Net>) -> Self {
        LeaseWatcher {
            own_ipv4,
            own_ipv6,
            leases: BTreeMap::new(),
        }
    }

    fn id(&self, lease: &Lease) -> Option<Id> {
        if lease.subnet.is_none() && lease.ipv6_subnet.is_none() {
            return None;
        }
        let own4 = lease.subnet.is_some() && lease.subnet == self.own_ipv4;
        let own6 = lease.ipv6_subnet.is_some() && lease.ipv6_subnet == self.own_ipv6;
        (!own4 && !own6).then_some((lease.subnet, lease.ipv6_subnet))
    }

    /// Replaces the known set with `leases`: `Removed` for vanished leases (first), then
    /// `Added` for new or changed ones, each group in key order.
    pub fn apply_snapshot(&mut self, leases: Vec<Lease>) -> Vec<LeaseEvent> {
        let mut next = BTreeMap::new();
        for lease in leases {
            if let Some(id) = self.id(&lease) {
                next.insert(id, lease);
            }
        }
        let mut events: Vec<LeaseEvent> = self
            .leases
            .iter()
            .filter(|(id, _)| !next.contains_key(*id))
            .map(|(_, old)| LeaseEvent::Removed(old.clone()))
            .collect();
        for (id, lease) in &next {
            match self.leases.get(id) {
                Some(old) if old.same_content(lease) => {}
                _ => events.push(LeaseEvent::Added(lease.clone())),
            }
        }
        self.leases = next;
        events
    }

    /// Applies incremental events in order and returns the effective ones: `Added` of new or
    /// changed contents (replacing the lease with the same subnets), `Removed` of known leases
    /// (carrying the last known contents). An `Added` with unchanged contents still refreshes
    /// the stored expiration.
    pub fn apply_events(&mut self, events: Vec<LeaseEvent>) -> Vec<LeaseEvent> {
        let mut out = Vec::new();
        for event in events {
            let Some(id) = self.id(event.lease()) else {
                continue;
            };
            match event {
                LeaseEvent::Added(lease) => {
                    let changed = self
                        .leases
                        .get(&id)
                        .is_none_or(|old| !old.same_content(&lease));
                    if changed {
                        out.push(LeaseEvent::Added(lease.clone()));
                    }
                    self.leases.insert(id, lease);
                }
                LeaseEvent::Removed(_) => {
                    if let Some(old) = self.leases.remove(&id) {
                        out.push(LeaseEvent::Removed(old));
                    }
                }
            }
        }
        out
    }

    /// Applies one store update of either kind.
    pub fn apply(&mut self, update: WatchUpdate) -> Vec<LeaseEvent> {
        match update {
            WatchUpdate::Snapshot(leases) => self.apply_snapshot(leases),
            WatchUpdate::Events(events) => self.apply_events(events),
        }
    }

    /// Applies queued updates as one. A snapshot replaces everything before it, so only the
    /// last snapshot and what follows it are applied (a burst of Kubernetes snapshots is
    /// diffed once, not once per snapshot).
    pub fn apply_all(&mut self, updates: Vec<WatchUpdate>) -> Vec<LeaseEvent> {
        let from = updates
            .iter()
            .rposition(|u| matches!(u, WatchUpdate::Snapshot(_)))
            .unwrap_or(0);
        let mut events = Vec::new();
        for update in updates.into_iter().skip(from) {
            events.extend(self.apply(update));
        }
        events
    }

    /// The current set of peer leases, in key order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Number of known peer leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no peer lease is known.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::LeaseAttrs;
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn lease(third: u8, v6: Option<u16>, ip_last: u8) -> Lease {
        Lease {
            subnet: Some(Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).expect("net")),
            ipv6_subnet: v6.map(|x| {
                Ipv6Net::new(std::net::Ipv6Addr::new(0xfd42, x, 0, 0, 0, 0, 0, 0), 64).expect("net")
            }),
            attrs: LeaseAttrs {
                public_ip: Ipv4Addr::new(198, 51, 100, ip_last),
                backend_type: "vxlan".into(),
                ..LeaseAttrs::default()
            },
            expiration: None,
            node: None,
        }
    }

    fn own() -> LeaseWatcher {
        LeaseWatcher::new(lease(0, None, 0).subnet, None)
    }

    #[test]
    fn snapshot_diff_reports_changes() {
        let mut w = own();
        let ev = w.apply_snapshot(vec![
            lease(0, None, 9),
            lease(1, None, 1),
            lease(2, None, 2),
        ]);
        assert_eq!(
            ev,
            vec![
                LeaseEvent::Added(lease(1, None, 1)),
                LeaseEvent::Added(lease(2, None, 2))
            ]
        );
        // Same snapshot: nothing. Changed public IP and a vanished lease: Removed then Added.
        assert!(w
            .apply_snapshot(vec![lease(1, None, 1), lease(2, None, 2)])
            .is_empty());
        let ev = w.apply_snapshot(vec![lease(2, None, 7)]);
        assert_eq!(
            ev,
            vec![
                LeaseEvent::Removed(lease(1, None, 1)),
                LeaseEvent::Added(lease(2, None, 7))
            ]
        );
        assert_eq!(
            w.leases().cloned().collect::<Vec<_>>(),
            vec![lease(2, None, 7)]
        );
    }

    #[test]
    fn queued_updates_apply_from_the_last_snapshot() {
        let mut one_by_one = own();
        let mut all = own();
        let first = vec![lease(1, None, 1), lease(2, None, 2)];
        one_by_one.apply_snapshot(first.clone());
        all.apply_snapshot(first);
        let queued = || {
            vec![
                WatchUpdate::Events(vec![LeaseEvent::Removed(lease(1, None, 1))]),
                WatchUpdate::Snapshot(vec![lease(3, None, 3)]),
                WatchUpdate::Snapshot(vec![lease(2, None, 2), lease(4, None, 4)]),
                WatchUpdate::Events(vec![LeaseEvent::Added(lease(5, None, 5))]),
            ]
        };
        for u in queued() {
            one_by_one.apply(u);
        }
        // Diffed against the state before the burst: 1 went, 4 and 5 came, 2 stayed, 3 was
        // never seen.
        assert_eq!(
            all.apply_all(queued()),
            vec![
                LeaseEvent::Removed(lease(1, None, 1)),
                LeaseEvent::Added(lease(4, None, 4)),
                LeaseEvent::Added(lease(5, None, 5)),
            ]
        );
        assert!(all.leases().eq(one_by_one.leases()));
        // Without a snapshot every update is applied.
        let ev = all.apply_all(vec![
            WatchUpdate::Events(vec![LeaseEvent::Removed(lease(2, None, 2))]),
            WatchUpdate::Events(vec![LeaseEvent::Removed(lease(4, None, 4))]),
        ]);
        assert_eq!(ev.len(), 2);
        assert_eq!(all.len(), 1);
    }

    #[test]
    fn events_replace_and_remove() {
        let mut w = own();
        assert_eq!(
            w.apply_events(vec![LeaseEvent::Removed(lease(5, None, 5))]),
            vec![]
        );
        let ev = w.apply_events(vec![
            LeaseEvent::Added(lease(5, None, 5)),
            LeaseEvent::Added(lease(5, None, 5)),
            LeaseEvent::Added(lease(5, None, 6)),
            LeaseEvent::Added(lease(0, None, 1)),
        ]);
        assert_eq!(
            ev,
            vec![
                LeaseEvent::Added(lease(5, None, 5)),
                LeaseEvent::Added(lease(5, None, 6))
            ]
        );
        // Removal by subnet only carries the stored contents.
        let bare = Lease {
            attrs: LeaseAttrs::default(),
            ..lease(5, None, 0)
        };
        assert_eq!(
            w.apply_events(vec![LeaseEvent::Removed(bare)]),
            vec![LeaseEvent::Removed(lease(5, None, 6))]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn own_ipv6_and_subnetless_filtered() {
        let own6 = lease(0, Some(1), 0).ipv6_subnet;
        let mut w = LeaseWatcher::new(None, own6);
        let none = Lease {
            subnet: None,
            ipv6_subnet: None,
            ..lease(3, None, 3)
        };
        let ev = w.apply_snapshot(vec![lease(3, Some(1), 3), lease(4, Some(2), 4), none]);
        assert_eq!(ev, vec![LeaseEvent::Added(lease(4, Some(2), 4))]);
        assert_eq!(w.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, Option<u16>, u8),
        Remove(u8, Option<u16>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let v6 = prop::option::of(0u16..2);
        prop_oneof![
            (0u8..6, v6.clone(), 0u8..3).prop_map(|(a, b, c)| Op::Add(a, b, c)),
            (0u8..6, v6).prop_map(|(a, b)| Op::Remove(a, b)),
        ]
    }

    fn event(op: &Op) -> LeaseEvent {
        match *op {
            Op::Add(t, v6, ip) => LeaseEvent::Added(lease(t, v6, ip)),
            Op::Remove(t, v6) => LeaseEvent::Removed(lease(t, v6, 0)),
        }
    }

    proptest! {
        /// Any partition of an event sequence, on top of any starting snapshot, ends in the
        /// set the store would list afterwards; a consumer replaying the emitted events ends in
        /// the same set; and that final snapshot then emits nothing.
        #[test]
        fn events_converge_to_final_snapshot(
            start in prop::collection::vec((0u8..6, prop::option::of(0u16..2), 0u8..3), 0..6),
            ops in prop::collection::vec(op(), 0..40),
            cuts in prop::collection::vec(0usize..40, 0..8),
        ) {
            // The store's view: last writer wins per key, own lease included.
            let mut store: BTreeMap<Id, Lease> = BTreeMap::new();
            let initial: Vec<Lease> = start.iter().map(|&(t, v6, ip)| lease(t, v6, ip)).collect();
            for l in &initial {
                store.insert((l.subnet, l.ipv6_subnet), l.clone());
            }
            let mut w = own();
            let mut consumer: BTreeMap<Id, Lease> = BTreeMap::new();
            let replay = |evs: Vec<LeaseEvent>, consumer: &mut BTreeMap<Id, Lease>| {
                for e in evs {
                    match e {
                        LeaseEvent::Added(l) => { consumer.insert((l.subnet, l.ipv6_subnet), l); }
                        LeaseEvent::Removed(l) => {
                            prop_assert!(consumer.remove(&(l.subnet, l.ipv6_subnet)).is_some());
                        }
                    }
                }
                Ok(())
            };
            replay(w.apply_snapshot(store.values().cloned().collect()), &mut consumer)?;
            let events: Vec<LeaseEvent> = ops.iter().map(event).collect();
            for e in &events {
                let l = e.lease();
                match e {
                    LeaseEvent::Added(_) => { store.insert((l.subnet, l.ipv6_subnet), l.clone()); }
                    LeaseEvent::Removed(_) => { store.remove(&(l.subnet, l.ipv6_subnet)); }
                }
            }
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
            bounds.push(0);
            bounds.push(events.len());
            bounds.sort_unstable();
            for pair in bounds.windows(2) {
                let chunk = events[pair[0]..pair[1]].to_vec();
                replay(w.apply_events(chunk), &mut consumer)?;
            }
            let own_subnet = own().own_ipv4;
            let expected: Vec<Lease> = store.values().filter(|l| l.subnet != own_subnet).cloned().collect();
            let got: Vec<Lease> = w.leases().cloned().collect();
            prop_assert_eq!(&got, &expected);
            prop_assert_eq!(consumer.values().cloned().collect::<Vec<_>>(), expected);
            prop_assert!(w.apply_snapshot(store.values().cloned().collect()).is_empty());
        }
    }
}
