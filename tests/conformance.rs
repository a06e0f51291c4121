//! One suite of lease-store behaviours, written once and run against every store through the
//! `LeaseStore` trait, the way the daemon uses it: the directory store (a temp directory), etcd
//! (a private real etcd, `test_support::etcd`) and the Kubernetes store (the in-repo
//! test API server with Node objects).
//!
//! Behaviours: acquisition (config, subnet, published attributes), reuse on restart, watch
//! add/update/remove, daemons racing for subnets, and a store outage with changes made during
//! it. Where stores legitimately differ, the [`Fixture`] says so: in the Kubernetes store a
//! node's lease *is* its `spec.podCIDR` (the fixture registers each node with its pod CIDR
//! first, as kube-controller-manager does, and names the subnet the node must get), and "an
//! outage" is whatever makes that store unreachable while an operator keeps changing it:
//!
//! * directory: the `subnets` directory becomes unreadable (replaced by a file, as an
//!   unmounted share would fail) while changes go to the real directory, moved aside;
//! * etcd: the clients' connections are cut and refused (a proxy between them and etcd stops)
//!   while an operator's client writes to etcd directly — a partition (the process stop of
//!   etcd itself is covered by tests/stores_e2e.rs and tests/etcd_store.rs);
//! * Kubernetes: the API server stops (connections dropped, port closed), changes are made to
//!   its state, and it restarts on the same port.

#[cfg(feature = "etcd")]
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flannel_rs::config::netconf::NetConfig;
use flannel_rs::config::subnet_env::PreviousSubnets;
use flannel_rs::lease::store::{LeaseStore, WatchUpdate};
use flannel_rs::lease::{Lease, LeaseAttrs, LeaseWatcher, VxlanBackendData};
use flannel_rs::wire::MacAddr;
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::Ipv6Addr;
use test_support::fixtures::{attrs, net};
use test_support::TempDir;
use tokio::sync::mpsc;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// Longest wait for anything that must happen promptly (watch events, the return after an
/// outage).
const PROMPT: Duration = Duration::from_secs(10);
/// How long the suite watches for spurious changes during an outage.
const QUIET: Duration = Duration::from_secs(3);

/// A store under test plus an operator's side door into the same data.
trait Fixture: Sized {
    /// For messages.
    const NAME: &'static str;

    /// Starts an empty store holding [`CONFIG`]; `None` when the store's server is not
    /// installed (the test is then skipped; with CI=true the fixture panics instead).
    async fn start(tag: &str) -> Option<Self>;

    /// A new client acting as node `n` (what a flanneld starting on node `n` builds).
    async fn store_for(&self, n: u8) -> Arc<dyn LeaseStore>;

    /// Prepares node `n` before its daemon starts (Kubernetes: creates the Node with its pod
    /// CIDR). Nothing for stores that allocate.
    async fn register_node(&self, n: u8);

    /// The subnet node `n` must get when the store dictates it (Kubernetes: the pod CIDR);
    /// `None` when the store allocates one.
    fn assigned(&self, n: u8) -> Option<Ipv4Net>;

    /// Writes node `n`'s lease the way another (upstream flannel) node would.
    async fn publish_foreign(&self, n: u8, subnet: Ipv4Net, attrs: &LeaseAttrs);

    /// Removes node `n`'s lease the way an operator would (file, key, Node).
    async fn remove_foreign(&self, n: u8, subnet: Ipv4Net);

    /// Makes the store unreachable for every client from [`Fixture::store_for`]; the
    /// operator's side door keeps working.
    async fn begin_outage(&mut self);

    /// Makes the store reachable again (same address, same data).
    async fn end_outage(&mut self);
}

/// The subnet a foreign node `n` holds: its assigned one, else 10.244.(100+n).0/24.
fn foreign_subnet<F: Fixture>(f: &F, n: u8) -> Ipv4Net {
    f.assigned(n)
        .unwrap_or_else(|| net(&format!("10.244.{}.0/24", 100 + u32::from(n))))
}

/// True when `lease` publishes `want` (public IP, backend type, VNI and MAC).
fn publishes(lease: &Lease, want: &LeaseAttrs) -> bool {
    lease.attrs.public_ip == want.public_ip
        && lease.attrs.backend_type == want.backend_type
        && lease.attrs.vxlan_data().ok().flatten() == want.vxlan_data().ok().flatten()
}

async fn config<F: Fixture>(store: &dyn LeaseStore) -> NetConfig {
    let json = store.network_config().await.expect("network config");
    let cfg = NetConfig::parse(&json).expect("config parses");
    assert_eq!(cfg.network, Some(net("10.244.0.0/16")), "{}", F::NAME);
    cfg
}

/// Node `n` starts: registers, connects, acquires with `attrs(n, generation)`.
async fn join<F: Fixture>(f: &F, n: u8, generation: u8) -> (Arc<dyn LeaseStore>, Lease) {
    f.register_node(n).await;
    let store = f.store_for(n).await;
    let cfg = config::<F>(store.as_ref()).await;
    let lease = store
        .acquire(&cfg, &attrs(n, generation), &PreviousSubnets::default())
        .await
        .unwrap_or_else(|e| panic!("{}: node {n} acquire: {e}", F::NAME));
    (store, lease)
}

/// A running watch, folded like the daemon folds it: a supervisor restarts `watch` after
/// errors, and a [`LeaseWatcher`] (own subnet filtered) keeps the current peer set.
struct Peers {
    state: Arc<Mutex<LeaseWatcher>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Peers {
    fn watch(store: Arc<dyn LeaseStore>, own: Option<Ipv4Net>) -> Peers {
        Peers::watch_own(store, own, None)
    }

    /// [`Peers::watch`] for a node whose own lease may have an IPv6 subnet.
    fn watch_own(store: Arc<dyn LeaseStore>, own: Option<Ipv4Net>, own6: Option<Ipv6Net>) -> Peers {
        let state = Arc::new(Mutex::new(LeaseWatcher::new(own, own6)));
        let (tx, mut rx) = mpsc::channel::<WatchUpdate>(64);
        let supervisor = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match store.watch(tx.clone()).await {
                    Ok(()) => return,
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        let fold_state = state.clone();
        let fold = tokio::spawn(async move {
            while let Some(update) = rx.recv().await {
                let mut w = fold_state.lock().unwrap_or_else(|p| p.into_inner());
                w.apply(update);
            }
        });
        Peers {
            state,
            tasks: vec![supervisor, fold],
        }
    }

    fn now(&self) -> Vec<Lease> {
        let w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Lease> = w.leases().cloned().collect();
        v.sort_by_key(|l| l.subnet);
        v
    }

    fn find(&self, subnet: Ipv4Net) -> Option<Lease> {
        self.now().into_iter().find(|l| l.subnet == Some(subnet))
    }

    /// Waits until `cond` holds for the peer set; panics with the set after `limit`.
    async fn wait(&self, what: &str, limit: Duration, cond: impl Fn(&[Lease]) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = self.now();
            if cond(&now) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{what}: not within {limit:?}; peers now: {now:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The behaviours, once.

/// Acquisition: a subnet of the configured length inside Network (the pod CIDR in
/// Kubernetes), published with our attributes, visible to `list`.
async fn acquires_and_publishes<F: Fixture>(f: &mut F) {
    let (store, lease) = join(f, 1, 1).await;
    let subnet = lease.subnet.expect("IPv4 lease");
    assert!(net("10.244.0.0/16").contains(&subnet), "{subnet}");
    assert_eq!(subnet.prefix_len(), 24, "{subnet}");
    if let Some(want) = f.assigned(1) {
        assert_eq!(subnet, want, "{}: the lease is the pod CIDR", F::NAME);
    }
    assert!(publishes(&lease, &attrs(1, 1)), "{lease:?}");
    let listed = store.list().await.expect("list");
    let ours: Vec<&Lease> = listed.iter().filter(|l| l.subnet == Some(subnet)).collect();
    assert_eq!(ours.len(), 1, "{listed:?}");
    assert!(publishes(ours[0], &attrs(1, 1)), "{listed:?}");
}

/// A restarted daemon (new client, same node and public IP, new VTEP MAC) gets its subnet
/// back and republishes its new attributes; there is still one lease for the node.
async fn reuses_lease_on_restart<F: Fixture>(f: &mut F) {
    let (first_store, first) = join(f, 1, 1).await;
    drop(first_store);
    let (store, second) = join(f, 1, 2).await;
    assert_eq!(second.subnet, first.subnet, "{}: same subnet", F::NAME);
    let listed = store.list().await.expect("list");
    let mine: Vec<&Lease> = listed
        .iter()
        .filter(|l| l.attrs.public_ip == attrs(1, 1).public_ip)
        .collect();
    assert_eq!(mine.len(), 1, "{listed:?}");
    assert!(
        publishes(mine[0], &attrs(1, 2)),
        "new MAC published: {listed:?}"
    );
}

/// A watch starts with the existing peers and follows another node's lease appearing,
/// changing and disappearing; the own lease is never a peer.
async fn watch_follows_add_update_remove<F: Fixture>(f: &mut F) {
    let (store, own) = join(f, 1, 1).await;
    let s2 = foreign_subnet(f, 2);
    f.register_node(2).await;
    f.publish_foreign(2, s2, &attrs(2, 1)).await;
    let peers = Peers::watch(store.clone(), own.subnet);
    peers
        .wait("existing peer in the first snapshot", PROMPT, |p| {
            p.len() == 1 && publishes(&p[0], &attrs(2, 1))
        })
        .await;

    let s3 = foreign_subnet(f, 3);
    f.register_node(3).await;
    f.publish_foreign(3, s3, &attrs(3, 1)).await;
    peers
        .wait("added", PROMPT, |p| {
            p.iter()
                .any(|l| l.subnet == Some(s3) && publishes(l, &attrs(3, 1)))
        })
        .await;

    f.publish_foreign(3, s3, &attrs(3, 2)).await;
    peers
        .wait("updated (new MAC)", PROMPT, |p| {
            p.iter()
                .any(|l| l.subnet == Some(s3) && publishes(l, &attrs(3, 2)))
        })
        .await;

    f.remove_foreign(3, s3).await;
    peers
        .wait("removed", PROMPT, |p| {
            p.len() == 1 && p[0].subnet == Some(s2)
        })
        .await;
    assert!(
        peers.find(own.subnet.expect("own")).is_none(),
        "own lease is not a peer"
    );
}

/// Daemons starting at once get distinct, non-overlapping subnets (Kubernetes: each its own
/// pod CIDR, no conflict), all visible in the store.
async fn racing_daemons_get_distinct_subnets<F: Fixture>(f: &mut F) {
    const RACERS: u8 = 4;
    for n in 1..=RACERS {
        f.register_node(n).await;
    }
    let mut stores = Vec::new();
    for n in 1..=RACERS {
        stores.push((n, f.store_for(n).await));
    }
    let cfg = config::<F>(stores[0].1.as_ref()).await;
    let results = futures::future::join_all(stores.iter().map(|(n, s)| {
        let cfg = cfg.clone();
        let s = s.clone();
        let n = *n;
        async move {
            let a = attrs(n, 1);
            s.acquire(&cfg, &a, &PreviousSubnets::default()).await
        }
    }))
    .await;
    let mut subnets = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let lease = r.unwrap_or_else(|e| panic!("{}: racer {}: {e}", F::NAME, i + 1));
        let subnet = lease.subnet.expect("IPv4");
        let n = u8::try_from(i + 1).expect("small");
        if let Some(want) = f.assigned(n) {
            assert_eq!(subnet, want, "racer {n}");
        }
        subnets.push(subnet);
    }
    for (i, a) in subnets.iter().enumerate() {
        for b in &subnets[i + 1..] {
            assert!(
                !a.contains(b) && !b.contains(a),
                "{}: {a} and {b} overlap ({subnets:?})",
                F::NAME
            );
        }
    }
    let listed = stores[0].1.list().await.expect("list");
    for s in &subnets {
        assert!(
            listed.iter().any(|l| l.subnet == Some(*s)),
            "{s} not listed: {listed:?}"
        );
    }
}

/// During an outage the watch keeps the last known peers (nothing is removed because the
/// store is unreachable); changes made meanwhile arrive once the store is back.
async fn outage_keeps_peers_and_delivers_changes<F: Fixture>(f: &mut F) {
    let (store, own) = join(f, 1, 1).await;
    let (s2, s3) = (foreign_subnet(f, 2), foreign_subnet(f, 3));
    f.register_node(2).await;
    f.publish_foreign(2, s2, &attrs(2, 1)).await;
    let peers = Peers::watch(store.clone(), own.subnet);
    peers
        .wait("peer before the outage", PROMPT, |p| p.len() == 1)
        .await;

    f.begin_outage().await;
    assert!(
        store.list().await.is_err(),
        "{}: the store still answers during the outage",
        F::NAME
    );
    f.register_node(3).await;
    f.publish_foreign(3, s3, &attrs(3, 1)).await;
    f.remove_foreign(2, s2).await;
    tokio::time::sleep(QUIET).await;
    let during = peers.now();
    assert!(
        during.len() == 1 && during[0].subnet == Some(s2),
        "{}: peers changed while the store was unreachable: {during:#?}",
        F::NAME
    );

    f.end_outage().await;
    let back = tokio::time::Instant::now();
    peers
        .wait("changes made during the outage", PROMPT, |p| {
            p.len() == 1 && p[0].subnet == Some(s3) && publishes(&p[0], &attrs(3, 1))
        })
        .await;
    eprintln!(
        "{}: changes from the outage arrived {:?} after the store returned",
        F::NAME,
        back.elapsed()
    );
    assert!(store.list().await.is_ok(), "store answers again");
}

/// The allocating stores' raw side door, for the IPv6 behaviours: the config and leases as
/// upstream flannel reads and writes them (key = last key segment / file name).
trait AllocFixture: Fixture {
    /// Replaces the network config.
    async fn put_config(&self, json: &str);
    /// Writes a lease value under `key`, as an upstream node would.
    async fn put_raw(&self, key: &str, value: &str);
    /// The stored text under `key`.
    async fn get_raw(&self, key: &str) -> Option<String>;
    /// Deletes `key`.
    async fn delete_raw(&self, key: &str);
}

const V6_ONLY_CONFIG: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd42:10::/48","Backend":{"Type":"vxlan"}}"#;
const DUAL_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd42:10::/48","Backend":{"Type":"vxlan"}}"#;

/// Node `n`'s attributes in an IPv6-only (`PublicIP` 0.0.0.0) or dual-stack cluster.
fn family_attrs(n: u8, dual: bool) -> LeaseAttrs {
    let mut a = if dual {
        attrs(n, 1)
    } else {
        LeaseAttrs {
            backend_type: "vxlan".into(),
            ..LeaseAttrs::default()
        }
    };
    a.public_ipv6 = Some(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x100,
        0,
        0,
        0,
        0,
        u16::from(n),
    ));
    let v6_data = VxlanBackendData {
        vni: 1,
        vtep_mac: MacAddr([0x0e, 0, 0, 0, 6, n]),
    };
    a.backend_v6_data = Some(v6_data.to_raw());
    a
}

fn net6(s: &str) -> Ipv6Net {
    s.parse().expect("net6")
}

/// IPv6-only or dual-stack leases: acquisition inside IPv6Network under upstream's key
/// (`0.0.0.0-0&<v6>-64` / `<v4>-24&<v6>-64`) and JSON text, renewal, reuse on restart (by
/// public IP), reuse of subnet.env's previous subnets, and a watch following an upstream
/// node's lease appearing and disappearing.
async fn family_leases<F: AllocFixture>(f: &mut F, dual: bool) {
    f.put_config(if dual { DUAL_CONFIG } else { V6_ONLY_CONFIG })
        .await;
    let store = f.store_for(1).await;
    let json = store.network_config().await.expect("network config");
    let cfg = NetConfig::parse(&json).expect("config parses");
    let mine = family_attrs(1, dual);
    let none = PreviousSubnets::default();
    let lease = store.acquire(&cfg, &mine, &none).await.expect("acquire");
    let v6 = lease.ipv6_subnet.expect("IPv6 subnet");
    assert!(
        net6("fd42:10::/48").contains(&v6) && v6.prefix_len() == 64,
        "{v6}"
    );
    assert_eq!(lease.subnet.is_some(), dual, "{lease:?}");
    let key = lease.key().expect("key").to_string();
    let want_key = match lease.subnet {
        Some(s) => format!("{}-24&{}-64", s.addr(), v6.addr()),
        None => format!("0.0.0.0-0&{}-64", v6.addr()),
    };
    assert_eq!(key, want_key, "{}: upstream's key", F::NAME);
    if !dual {
        assert_eq!(
            mine.to_json(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:100::1","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:01"}}"#
        );
    }
    assert_eq!(f.get_raw(&key).await, Some(mine.to_json()), "{}", F::NAME);

    let renewed = store.renew_lease(&lease).await.expect("renew");
    assert_eq!(renewed.key(), lease.key());
    assert_eq!(f.get_raw(&key).await, Some(mine.to_json()), "after renewal");

    restart_gets_back(f, &cfg, &mine, &lease, "same lease after restart").await;

    // Subnets for node 3 and the upstream node that our (randomly placed) lease cannot hold.
    let free = |candidates: [u8; 3]| {
        let c = candidates
            .into_iter()
            .find(|c| {
                lease.subnet != Some(net(&format!("10.244.{c}.0/24")))
                    && v6 != net6(&format!("fd42:10:0:{c}::/64"))
            })
            .expect("three candidates, one lease");
        (
            net(&format!("10.244.{c}.0/24")),
            net6(&format!("fd42:10:0:{c}::/64")),
        )
    };
    let (third4, third6) = free([77, 76, 75]);
    let prev = PreviousSubnets {
        ipv4: dual.then_some(third4),
        ipv6: Some(third6),
    };
    let third = f.store_for(3).await;
    let l3 = third
        .acquire(&cfg, &family_attrs(3, dual), &prev)
        .await
        .expect("node 3");
    assert_eq!(
        (l3.subnet, l3.ipv6_subnet),
        (prev.ipv4, prev.ipv6),
        "subnet.env reused"
    );

    let (foreign4, foreign6) = free([99, 98, 97]);
    let foreign = if dual {
        format!("{}-24&{}-64", foreign4.addr(), foreign6.addr())
    } else {
        format!("0.0.0.0-0&{}-64", foreign6.addr())
    };
    let foreign = foreign.as_str();
    let theirs = family_attrs(2, dual);
    f.put_raw(foreign, &theirs.to_json()).await;
    let peers = Peers::watch_own(store.clone(), lease.subnet, lease.ipv6_subnet);
    let want4 = dual.then_some(foreign4);
    let foreign6 = Some(foreign6);
    peers
        .wait(
            "upstream node's lease and node 3, not our own",
            PROMPT,
            |p| {
                p.len() == 2
                    && p.iter().any(|l| {
                        l.ipv6_subnet == foreign6 && l.subnet == want4 && l.attrs == theirs
                    })
                    && p.iter().any(|l| l.ipv6_subnet == prev.ipv6)
            },
        )
        .await;
    f.delete_raw(foreign).await;
    peers
        .wait("upstream node's lease removed", PROMPT, |p| {
            p.len() == 1 && p[0].ipv6_subnet == prev.ipv6
        })
        .await;
}

/// Node 1 restarted (a new store, no subnet.env hint) with `mine` acquires `lease` again.
async fn restart_gets_back<F: AllocFixture>(
    f: &F,
    cfg: &NetConfig,
    mine: &LeaseAttrs,
    lease: &Lease,
    what: &str,
) {
    let restarted = f.store_for(1).await;
    let again = restarted
        .acquire(cfg, mine, &PreviousSubnets::default())
        .await
        .expect("re-acquire");
    assert_eq!(again.key(), lease.key(), "{}: {what}", F::NAME);
}

/// IPv6-only nodes find their lease on restart by `PublicIPv6`: every IPv6-only lease says
/// `"PublicIP":"0.0.0.0"`, so upstream's `findLeaseByIP` (PublicIP alone) would hand a
/// restarting node the first IPv6-only lease in key order, another node's. Here an upstream
/// node's lease holds the lowest subnet; our node restarts without a subnet.env hint and must
/// get its own lease back, the other one untouched.
async fn ipv6_only_restart_finds_own_lease_by_public_ipv6<F: AllocFixture>(f: &mut F) {
    f.put_config(V6_ONLY_CONFIG).await;
    let theirs = family_attrs(2, false);
    let first_key = "0.0.0.0-0&fd42:10:0:1::-64";
    f.put_raw(first_key, &theirs.to_json()).await;
    let store = f.store_for(1).await;
    let json = store.network_config().await.expect("network config");
    let cfg = NetConfig::parse(&json).expect("config parses");
    let mine = family_attrs(1, false);
    let none = PreviousSubnets::default();
    let lease = store.acquire(&cfg, &mine, &none).await.expect("acquire");
    assert_ne!(
        lease.key().map(|k| k.to_string()).as_deref(),
        Some(first_key)
    );
    restart_gets_back(
        f,
        &cfg,
        &mine,
        &lease,
        "an IPv6-only node gets its own lease back",
    )
    .await;
    assert_eq!(
        f.get_raw(first_key).await,
        Some(theirs.to_json()),
        "{}: the other IPv6-only node's lease is untouched",
        F::NAME
    );
}

async fn ipv6_only_leases<F: AllocFixture>(f: &mut F) {
    family_leases(f, false).await;
}

async fn dual_stack_leases<F: AllocFixture>(f: &mut F) {
    family_leases(f, true).await;
}

/// One test: starts the fixture (or skips), runs the behaviour, drops the fixture (which
/// stops servers and removes files).
macro_rules! case {
    ($fixture:ty, $behaviour:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $behaviour() {
            let Some(mut f) = <$fixture as Fixture>::start(stringify!($behaviour)).await else {
                return;
            };
            super::$behaviour(&mut f).await;
        }
    };
}

/// Instantiates every behaviour for one fixture.
macro_rules! suite {
    ($store:ident, $fixture:ty) => {
        mod $store {
            use super::*;
            case!($fixture, acquires_and_publishes);
            case!($fixture, reuses_lease_on_restart);
            case!($fixture, watch_follows_add_update_remove);
            case!($fixture, racing_daemons_get_distinct_subnets);
            case!($fixture, outage_keeps_peers_and_delivers_changes);
        }
    };
}

suite!(dir, DirFixture);
#[cfg(feature = "etcd")]
suite!(etcd, EtcdFixture);

/// The IPv6 behaviours, for the stores that allocate (the Kubernetes store's dual-stack and
/// IPv6-only pod CIDRs are covered by tests/kube_store.rs and tests/ipv6.rs).
macro_rules! family_suite {
    ($store:ident, $fixture:ty) => {
        mod $store {
            use super::*;
            case!($fixture, ipv6_only_leases);
            case!($fixture, ipv6_only_restart_finds_own_lease_by_public_ipv6);
            case!($fixture, dual_stack_leases);
        }
    };
}

family_suite!(dir_v6, DirFixture);
#[cfg(feature = "etcd")]
family_suite!(etcd_v6, EtcdFixture);
#[cfg(feature = "kube")]
suite!(kube, KubeFixture);

// ---------------------------------------------------------------------------------------
// Fixtures.

fn write_atomic(path: &Path, body: &[u8]) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    std::fs::write(&tmp, body).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The directory store in a temp directory.
struct DirFixture {
    dir: TempDir,
    offline: bool,
}

impl DirFixture {
    fn subnets(&self) -> PathBuf {
        self.dir.0.join("subnets")
    }

    /// Where an operator's changes go: the real directory, moved aside during an outage.
    fn side_door(&self) -> PathBuf {
        if self.offline {
            self.dir.0.join("subnets.offline")
        } else {
            self.subnets()
        }
    }
}

fn lease_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

impl Fixture for DirFixture {
    const NAME: &'static str = "directory";

    async fn start(tag: &str) -> Option<Self> {
        let dir = TempDir::new(&format!("conformance-dir-{tag}"));
        std::fs::create_dir_all(dir.0.join("subnets")).expect("mkdir subnets");
        std::fs::write(dir.0.join("config"), CONFIG).expect("write config");
        Some(DirFixture {
            dir,
            offline: false,
        })
    }

    async fn store_for(&self, _n: u8) -> Arc<dyn LeaseStore> {
        Arc::new(flannel_rs::lease::DirStore::new(&self.dir.0))
    }

    async fn register_node(&self, _n: u8) {}

    fn assigned(&self, _n: u8) -> Option<Ipv4Net> {
        None
    }

    async fn publish_foreign(&self, _n: u8, subnet: Ipv4Net, attrs: &LeaseAttrs) {
        write_atomic(
            &self.side_door().join(lease_key(subnet)),
            attrs.to_json().as_bytes(),
        );
    }

    async fn remove_foreign(&self, _n: u8, subnet: Ipv4Net) {
        std::fs::remove_file(self.side_door().join(lease_key(subnet))).expect("remove lease");
    }

    async fn begin_outage(&mut self) {
        std::fs::rename(self.subnets(), self.dir.0.join("subnets.offline")).expect("move");
        // Reads of DIR/subnets now fail (ENOTDIR), like an unreachable share.
        std::fs::write(self.subnets(), b"offline").expect("placeholder");
        self.offline = true;
    }

    async fn end_outage(&mut self) {
        std::fs::remove_file(self.subnets()).expect("remove placeholder");
        std::fs::rename(self.dir.0.join("subnets.offline"), self.subnets()).expect("move back");
        self.offline = false;
    }
}

impl AllocFixture for DirFixture {
    async fn put_config(&self, json: &str) {
        write_atomic(&self.dir.0.join("config"), json.as_bytes());
    }

    async fn put_raw(&self, key: &str, value: &str) {
        write_atomic(&self.side_door().join(key), value.as_bytes());
    }

    async fn get_raw(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.side_door().join(key)).ok()
    }

    async fn delete_raw(&self, key: &str) {
        std::fs::remove_file(self.side_door().join(key)).expect("remove lease");
    }
}

#[cfg(feature = "etcd")]
mod etcd_fixture {
    use super::*;
    use flannel_rs::lease::etcd::client::{Client, ConnectOptions};
    use flannel_rs::lease::etcd::{EtcdConfig, EtcdStore};
    use tokio::net::{TcpListener, TcpStream};

    const PREFIX: &str = "/coreos.com/network";

    /// A TCP proxy on 127.0.0.1 in front of etcd that can cut every connection and refuse
    /// new ones (its port is closed) and come back on the same port.
    struct Proxy {
        port: u16,
        target: u16,
        tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
        accept: Option<tokio::task::JoinHandle<()>>,
    }

    impl Proxy {
        async fn start(target: u16) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let port = listener.local_addr().expect("addr").port();
            let mut p = Proxy {
                port,
                target,
                tasks: Arc::new(Mutex::new(Vec::new())),
                accept: None,
            };
            p.serve(listener);
            p
        }

        fn serve(&mut self, listener: TcpListener) {
            let (target, tasks) = (self.target, self.tasks.clone());
            self.accept = Some(tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let conn = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    tasks.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                }
            }));
        }

        fn cut(&mut self) {
            if let Some(a) = self.accept.take() {
                a.abort();
            }
            for t in self
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                t.abort();
            }
        }

        async fn resume(&mut self) {
            // The port was just released; bind it again.
            for _ in 0..100 {
                if let Ok(l) = TcpListener::bind(("127.0.0.1", self.port)).await {
                    self.serve(l);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("could not re-bind the proxy port {}", self.port);
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.cut();
        }
    }

    /// A private etcd; daemons' clients go through the proxy, the operator's client does not.
    pub struct EtcdFixture {
        proxy: Proxy,
        raw: Client,
        // Dropped last: stops etcd by PID and removes its data.
        _server: test_support::etcd::EtcdServer,
    }

    impl EtcdFixture {
        fn key(subnet: Ipv4Net) -> String {
            format!("{PREFIX}/subnets/{}", lease_key(subnet))
        }
    }

    impl Fixture for EtcdFixture {
        const NAME: &'static str = "etcd";

        async fn start(tag: &str) -> Option<Self> {
            let server = test_support::etcd::EtcdServer::start(&format!("conformance-{tag}"))?;
            let raw = Client::connect(&[server.endpoint()], ConnectOptions::default())
                .await
                .expect("connect to etcd");
            raw.put(format!("{PREFIX}/config"), CONFIG, 0)
                .await
                .expect("put config");
            let proxy = Proxy::start(server.client_port()).await;
            Some(EtcdFixture {
                proxy,
                raw,
                _server: server,
            })
        }

        async fn store_for(&self, _n: u8) -> Arc<dyn LeaseStore> {
            let store = EtcdStore::new(&EtcdConfig {
                endpoints: vec![format!("http://127.0.0.1:{}", self.proxy.port)],
                prefix: PREFIX.into(),
                ..EtcdConfig::default()
            })
            .expect("etcd config");
            Arc::new(store)
        }

        async fn register_node(&self, _n: u8) {}

        fn assigned(&self, _n: u8) -> Option<Ipv4Net> {
            None
        }

        async fn publish_foreign(&self, _n: u8, subnet: Ipv4Net, attrs: &LeaseAttrs) {
            // As upstream flannel writes it: attached to a fresh 24 h etcd lease.
            let grant = self.raw.lease_grant(86_400).await.expect("grant");
            self.raw
                .put(Self::key(subnet), attrs.to_json(), grant.id)
                .await
                .expect("put lease");
        }

        async fn remove_foreign(&self, _n: u8, subnet: Ipv4Net) {
            self.raw
                .delete(Self::key(subnet))
                .await
                .expect("delete lease");
        }

        async fn begin_outage(&mut self) {
            self.proxy.cut();
        }

        async fn end_outage(&mut self) {
            self.proxy.resume().await;
        }
    }

    impl AllocFixture for EtcdFixture {
        async fn put_config(&self, json: &str) {
            self.raw
                .put(format!("{PREFIX}/config"), json, 0)
                .await
                .expect("put config");
        }

        async fn put_raw(&self, key: &str, value: &str) {
            let grant = self.raw.lease_grant(86_400).await.expect("grant");
            self.raw
                .put(format!("{PREFIX}/subnets/{key}"), value, grant.id)
                .await
                .expect("put lease");
        }

        async fn get_raw(&self, key: &str) -> Option<String> {
            let etcd_key = format!("{PREFIX}/subnets/{key}");
            let text = self
                ._server
                .etcdctl(&["get", "--print-value-only", &etcd_key]);
            let value = text.strip_suffix('\n').unwrap_or(&text);
            (!value.is_empty()).then(|| value.to_owned())
        }

        async fn delete_raw(&self, key: &str) {
            self.raw
                .delete(format!("{PREFIX}/subnets/{key}"))
                .await
                .expect("delete lease");
        }
    }
}
#[cfg(feature = "etcd")]
use etcd_fixture::EtcdFixture;

#[cfg(feature = "kube")]
mod kube_fixture {
    use super::*;
    use flannel_rs::config::flags::Flags;
    use flannel_rs::lease::kube::KubeStore;
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;
    use test_apiserver::TestApiServer;

    const P: &str = "flannel.alpha.coreos.com/";

    /// The test API server; each node `n` has pod CIDR 10.244.`n`.0/24.
    pub struct KubeFixture {
        server: TestApiServer,
        dir: TempDir,
    }

    fn name(n: u8) -> String {
        format!("node-{n}")
    }

    impl Fixture for KubeFixture {
        const NAME: &'static str = "kube";

        async fn start(tag: &str) -> Option<Self> {
            let server = TestApiServer::start().await.expect("test API server");
            let dir = TempDir::new(&format!("conformance-kube-{tag}"));
            std::fs::write(dir.0.join("net-conf.json"), CONFIG).expect("net-conf");
            Some(KubeFixture { server, dir })
        }

        async fn store_for(&self, n: u8) -> Arc<dyn LeaseStore> {
            let flags = Flags {
                kube_subnet_mgr: true,
                kube_api_url: self.server.url(),
                net_config_path: self.dir.0.join("net-conf.json"),
                ..Flags::default()
            };
            let node = name(n);
            let env = move |k: &str| (k == "NODE_NAME").then(|| node.clone());
            let store = KubeStore::connect(&flags, &env).await.expect("connect");
            Arc::new(store)
        }

        async fn register_node(&self, n: u8) {
            if self.server.node(&name(n)).is_some() {
                return;
            }
            let cidr = self.assigned(n).expect("assigned").to_string();
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name(n)},
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            }))
            .expect("node");
            self.server.add_node(node);
        }

        fn assigned(&self, n: u8) -> Option<Ipv4Net> {
            Some(net(&format!("10.244.{n}.0/24")))
        }

        async fn publish_foreign(&self, n: u8, subnet: Ipv4Net, attrs: &LeaseAttrs) {
            assert_eq!(
                Some(subnet),
                self.assigned(n),
                "a Node's lease is its pod CIDR"
            );
            self.register_node(n).await;
            let data = attrs
                .backend_data
                .as_ref()
                .map(|r| r.get().to_owned())
                .unwrap_or_else(|| "null".into());
            let values = [
                ("backend-data", data),
                ("backend-type", attrs.backend_type.clone()),
                ("public-ip", attrs.public_ip.to_string()),
                ("kube-subnet-manager", "true".to_owned()),
            ];
            // One change, as flannel's single status patch makes it.
            self.server
                .update_node(&name(n), |node| {
                    let map = node
                        .metadata
                        .annotations
                        .get_or_insert_with(Default::default);
                    for (k, v) in values {
                        map.insert(format!("{P}{k}"), v);
                    }
                })
                .expect("node exists");
        }

        async fn remove_foreign(&self, n: u8, _subnet: Ipv4Net) {
            assert!(self.server.delete_node(&name(n)), "node {n} existed");
        }

        async fn begin_outage(&mut self) {
            self.server.stop().await;
        }

        async fn end_outage(&mut self) {
            self.server.restart().await.expect("restart API server");
        }
    }
}
#[cfg(feature = "kube")]
use kube_fixture::KubeFixture;
