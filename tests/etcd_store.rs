//! The etcd lease store against a real etcd (a private server per test, on 127.0.0.1 with free
//! ports): config, allocation, byte-exact values, reuse, races, watch (updates, compaction,
//! outage), unusable entries, revocation and renewal. Skipped when etcd is not installed,
//! unless CI=true.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use flannel_rs::config::netconf::NetConfig;
use flannel_rs::config::subnet_env::PreviousSubnets;
use flannel_rs::lease::etcd::client::{Client, ConnectOptions};
use flannel_rs::lease::etcd::proto::etcdserverpb::{request_op, PutRequest, RequestOp, TxnRequest};
use flannel_rs::lease::etcd::{EtcdConfig, EtcdStore, LEASE_TTL};
use flannel_rs::lease::store::{LeaseStore, StoreError, WatchUpdate};
use flannel_rs::lease::{Lease, LeaseAttrs, LeaseEvent, VxlanBackendData};
use ipnet::{Ipv4Net, Ipv6Net};
use test_support::etcd::EtcdServer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const VXLAN_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const FIXTURE_VXLAN: &str = include_str!("fixtures/compat/lease-vxlan.json");
const FIXTURE_DUAL: &str = include_str!("fixtures/compat/lease-vxlan-dual.json");
const FLANNEL_MISSING_CONFIG: &str =
    "flannel config not found in etcd store. Did you create your config using etcdv3 API?";
/// Longest wait for anything expected to happen promptly.
const PROMPT: Duration = Duration::from_secs(10);

/// Captured log output of this test binary (tests look for their own unique keys).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// A private etcd with a client and a unique prefix, or `None` (skipped).
struct Env {
    server: EtcdServer,
    raw: Client,
    prefix: String,
}

impl Env {
    async fn start(tag: &str) -> Option<Env> {
        logs();
        let server = EtcdServer::start(tag)?;
        let raw = Client::connect(&[server.endpoint()], ConnectOptions::default())
            .await
            .expect("connect raw client");
        let prefix = format!("/flannel-rs-test/{tag}");
        Some(Env {
            server,
            raw,
            prefix,
        })
    }

    fn store(&self) -> EtcdStore {
        EtcdStore::new(&EtcdConfig {
            endpoints: vec![self.server.endpoint()],
            prefix: self.prefix.clone(),
            ..EtcdConfig::default()
        })
        .expect("valid etcd config")
    }

    async fn put_config(&self, config: &str) -> NetConfig {
        self.raw
            .clone()
            .put(format!("{}/config", self.prefix), config, 0)
            .await
            .expect("put config");
        let text = self
            .store()
            .network_config()
            .await
            .expect("config readable");
        assert_eq!(text, config);
        let cfg = NetConfig::parse(&text).expect("parses");
        cfg.validate().expect("valid");
        cfg
    }

    fn key(&self, subnet: &str) -> String {
        format!("{}/subnets/{subnet}", self.prefix)
    }

    /// The value and etcd lease ID at a lease key.
    async fn get(&self, subnet_key: &str) -> Option<(Vec<u8>, i64)> {
        let resp = self
            .raw
            .clone()
            .get(self.key(subnet_key))
            .await
            .expect("get");
        resp.kvs.first().map(|kv| (kv.value.clone(), kv.lease))
    }

    /// Restarts etcd (with `wipe`, on an empty data directory) and reconnects the raw client.
    async fn restart(mut self, wipe: bool) -> Env {
        self.server = restart_server(self.server, wipe).await;
        self.raw = Client::connect(&[self.server.endpoint()], ConnectOptions::default())
            .await
            .expect("reconnect raw client");
        self
    }

    /// Polls `subnet_key` until etcd holds it under another lease ID than `before` (a
    /// renewal): the value and the new ID. Fails with `what` after [`PROMPT`].
    async fn wait_renewed(&self, subnet_key: &str, before: i64, what: &str) -> (Vec<u8>, i64) {
        let deadline = Instant::now() + PROMPT;
        loop {
            let (v, id) = self.get(subnet_key).await.expect("lease still there");
            if id != before {
                return (v, id);
            }
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes a lease value as upstream flannel does: attached to a fresh 24 h etcd lease.
    async fn put_as_flannel(&self, subnet_key: &str, value: &str) {
        let grant = self.raw.lease_grant(86_400).await.expect("grant");
        self.raw
            .put(self.key(subnet_key), value, grant.id)
            .await
            .expect("put lease");
    }

    async fn put_plain(&self, subnet_key: &str, value: &[u8]) {
        self.raw
            .clone()
            .put(self.key(subnet_key), value, 0)
            .await
            .expect("put");
    }

    async fn delete(&self, subnet_key: &str) {
        self.raw
            .clone()
            .delete(self.key(subnet_key))
            .await
            .expect("delete");
    }

    async fn ttl(&self, lease_id: i64) -> i64 {
        self.raw
            .clone()
            .lease_time_to_live(lease_id)
            .await
            .expect("ttl")
            .ttl
    }
}

fn attrs(last: u8, mac_last: u8) -> LeaseAttrs {
    let data = VxlanBackendData {
        vni: 1,
        vtep_mac: flannel_rs::wire::MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
    };
    LeaseAttrs {
        public_ip: Ipv4Addr::new(198, 51, 100, last),
        backend_type: "vxlan".into(),
        backend_data: Some(data.to_raw()),
        ..LeaseAttrs::default()
    }
}

fn value(last: u8, mac_last: u8) -> String {
    attrs(last, mac_last).to_json()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("net")
}

/// Restarts `server` (with `wipe`, on an empty data directory) off the runtime's threads:
/// restarting blocks until etcd answers.
async fn restart_server(mut server: EtcdServer, wipe: bool) -> EtcdServer {
    tokio::task::spawn_blocking(move || {
        if wipe {
            server.wipe_and_restart();
        } else {
            server.restart();
        }
        server
    })
    .await
    .expect("restart etcd")
}

/// Acquires node 1's lease from `store` and starts watching it with `complete_lease`: the
/// lease, its key and the monitoring task.
async fn acquire_monitored(
    store: &EtcdStore,
    cfg: &NetConfig,
) -> (Lease, String, JoinHandle<Result<(), StoreError>>) {
    let lease = store
        .acquire(cfg, &attrs(1, 1), &no_previous())
        .await
        .expect("acquired");
    let key = lease.key().expect("key").to_string();
    let (monitor, watched) = (store.clone(), lease.clone());
    let task = tokio::spawn(async move { monitor.complete_lease(&watched).await });
    (lease, key, task)
}

fn no_previous() -> PreviousSubnets {
    PreviousSubnets::default()
}

/// Starts a watch; returns its receiver (the task ends when the receiver is dropped).
fn start_watch(store: &EtcdStore, capacity: usize) -> mpsc::Receiver<WatchUpdate> {
    let (tx, rx) = mpsc::channel(capacity);
    let store = store.clone();
    tokio::spawn(async move { store.watch(tx).await });
    rx
}

async fn next_update(rx: &mut mpsc::Receiver<WatchUpdate>, within: Duration) -> WatchUpdate {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a watch update in time")
        .expect("watch still running")
}

/// Waits for the next event and checks that it is an `Added` (`added`) or `Removed` for the
/// lease of `subnet`; the event.
async fn expect_event(
    rx: &mut mpsc::Receiver<WatchUpdate>,
    added: bool,
    subnet: &str,
) -> LeaseEvent {
    let e = wait_event(rx, PROMPT, |_| true).await;
    let kind_ok = matches!(e, LeaseEvent::Added(_)) == added;
    assert!(
        kind_ok && e.lease().subnet == Some(net(subnet)),
        "want added={added} {subnet}: {e:?}"
    );
    e
}

/// Receives updates until one contains an event matching `want`; returns it.
async fn wait_event(
    rx: &mut mpsc::Receiver<WatchUpdate>,
    within: Duration,
    want: impl Fn(&LeaseEvent) -> bool,
) -> LeaseEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let WatchUpdate::Events(events) = next_update(rx, left).await {
            if let Some(e) = events.into_iter().find(|e| want(e)) {
                return e;
            }
        }
    }
}

fn snapshot(update: WatchUpdate) -> Vec<Lease> {
    match update {
        WatchUpdate::Snapshot(leases) => leases,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_read_and_missing_message() {
    let Some(env) = Env::start("config").await else {
        return;
    };
    let e = env
        .store()
        .network_config()
        .await
        .expect_err("no config yet");
    assert!(matches!(e, StoreError::EtcdConfigNotFound { .. }), "{e}");
    assert!(e.to_string().starts_with(FLANNEL_MISSING_CONFIG), "{e}");
    assert!(
        e.to_string().contains(&format!("{}/config", env.prefix)),
        "{e}"
    );
    env.put_config(VXLAN_CONFIG).await;
    // A trailing slash in --etcd-prefix names the same key, as with Go's path.Join.
    let slash = EtcdStore::new(&EtcdConfig {
        endpoints: vec![env.server.endpoint()],
        prefix: format!("{}/", env.prefix),
        ..EtcdConfig::default()
    })
    .expect("valid");
    assert_eq!(slash.network_config().await.expect("config"), VXLAN_CONFIG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_in_empty_prefix() {
    let Some(env) = Env::start("empty").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    let a = attrs(1, 1);
    let before = SystemTime::now();
    let lease = env
        .store()
        .acquire(&cfg, &a, &no_previous())
        .await
        .expect("acquired");
    let subnet = lease.subnet.expect("ipv4");
    assert_eq!(subnet.prefix_len(), 24);
    assert!(net("10.244.0.0/16").contains(&subnet.network()));
    assert_ne!(
        subnet,
        net("10.244.0.0/24"),
        "SubnetMin skips the first subnet"
    );
    assert_eq!(lease.ipv6_subnet, None);
    assert_eq!(lease.attrs, a);
    let after = SystemTime::now();
    let expiration = lease.expiration.expect("etcd leases expire");
    assert!(
        expiration >= before + LEASE_TTL && expiration <= after + LEASE_TTL,
        "expiration not 24 h after the grant"
    );
    let key = lease.key().expect("key").to_string();
    let (stored, lease_id) = env.get(&key).await.expect("key written");
    assert_eq!(stored, a.to_json().into_bytes());
    assert_ne!(lease_id, 0, "attached to an etcd lease");
    let ttl = env.ttl(lease_id).await;
    assert!((86_300..=86_400).contains(&ttl), "ttl {ttl}");
    let (listed, revision) = env.store().list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].same_content(&lease));
    assert!(revision > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_flannels_json_byte_for_byte() {
    let Some(env) = Env::start("bytes").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    let a = LeaseAttrs::from_json(FIXTURE_VXLAN).expect("fixture parses");
    let lease = env
        .store()
        .acquire(&cfg, &a, &no_previous())
        .await
        .expect("acquired");
    let key = lease.key().expect("key").to_string();
    let (stored, _) = env.get(&key).await.expect("written");
    assert_eq!(stored, FIXTURE_VXLAN.as_bytes());

    // Dual stack: the key carries both subnets, the value is the fixture, byte for byte.
    let dual_prefix = format!("{}-dual", env.prefix);
    let dual_cfg = r#"{"Network":"10.245.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/48","Backend":{"Type":"vxlan"}}"#;
    env.raw
        .clone()
        .put(format!("{dual_prefix}/config"), dual_cfg, 0)
        .await
        .expect("put");
    let dual = EtcdStore::new(&EtcdConfig {
        endpoints: vec![env.server.endpoint()],
        prefix: dual_prefix.clone(),
        ..EtcdConfig::default()
    })
    .expect("valid");
    let cfg = NetConfig::parse(&dual.network_config().await.expect("config")).expect("parses");
    let a = LeaseAttrs::from_json(FIXTURE_DUAL).expect("fixture parses");
    let lease = dual
        .acquire(&cfg, &a, &no_previous())
        .await
        .expect("acquired");
    let v6 = lease.ipv6_subnet.expect("dual-stack lease");
    assert_eq!(v6.prefix_len(), 64);
    let key = lease.key().expect("key").to_string();
    assert!(key.contains('&'), "{key}");
    let resp = env
        .raw
        .clone()
        .get(format!("{dual_prefix}/subnets/{key}"))
        .await
        .expect("get");
    assert_eq!(
        resp.kvs.first().map(|kv| kv.value.as_slice()),
        Some(FIXTURE_DUAL.as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_values_written_by_flannel() {
    let Some(env) = Env::start("upstream").await else {
        return;
    };
    env.put_as_flannel("10.244.7.0-24", FIXTURE_VXLAN).await;
    env.put_as_flannel("10.244.8.0-24&2001:db8:42:8::-64", FIXTURE_DUAL)
        .await;
    // A reservation: no etcd lease.
    env.put_plain("10.244.9.0-24", value(9, 9).as_bytes()).await;
    let store = env.store();
    let (leases, _) = store.list().await.expect("list");
    assert_eq!(leases.len(), 3, "{leases:?}");
    let l = &leases[0];
    assert_eq!(l.subnet, Some(net("10.244.7.0/24")));
    assert_eq!(l.attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
    assert_eq!(l.attrs.backend_type, "vxlan");
    let d = l.attrs.vxlan_data().expect("ok").expect("present");
    assert_eq!(
        (d.vni, d.vtep_mac.to_string()),
        (1, "c6:d2:32:6f:8f:44".into())
    );
    assert_eq!(l.attrs.to_json(), FIXTURE_VXLAN);
    let dual = &leases[1];
    assert_eq!(
        dual.ipv6_subnet,
        Some("2001:db8:42:8::/64".parse::<Ipv6Net>().expect("net"))
    );
    assert_eq!(dual.attrs.to_json(), FIXTURE_DUAL);
    assert_eq!(leases[2].subnet, Some(net("10.244.9.0/24")));
    // The watch's snapshot shows the same leases.
    let mut rx = start_watch(&store, 8);
    let snap = snapshot(next_update(&mut rx, PROMPT).await);
    assert_eq!(snap, leases);
    assert_eq!(store.stats().skipped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_on_restart_and_reservations() {
    let Some(env) = Env::start("reuse").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    let first = env
        .store()
        .acquire(&cfg, &attrs(1, 1), &no_previous())
        .await
        .expect("first run");
    let key = first.key().expect("key").to_string();
    let (_, first_id) = env.get(&key).await.expect("written");
    // "Restart": a new store, same public IP, new VTEP MAC.
    let again = env
        .store()
        .acquire(&cfg, &attrs(1, 2), &no_previous())
        .await
        .expect("second run");
    assert_eq!(again.subnet, first.subnet);
    let (stored, second_id) = env.get(&key).await.expect("still there");
    assert_eq!(stored, value(1, 2).into_bytes(), "re-put with our attrs");
    assert_ne!(second_id, first_id, "a fresh etcd lease");
    assert!(env.ttl(second_id).await > 86_000);
    let (all, _) = env.store().list().await.expect("list");
    assert_eq!(all.len(), 1);

    // A reservation for our IP is reused and stays a reservation.
    env.put_plain("10.244.200.0-24", value(9, 9).as_bytes())
        .await;
    let reserved = env
        .store()
        .acquire(&cfg, &attrs(9, 10), &no_previous())
        .await
        .expect("reservation");
    assert_eq!(reserved.subnet, Some(net("10.244.200.0/24")));
    assert_eq!(reserved.expiration, None);
    let (stored, id) = env.get("10.244.200.0-24").await.expect("there");
    assert_eq!((stored, id), (value(9, 10).into_bytes(), 0));

    // An own lease that no longer fits the config is deleted and replaced.
    env.put_as_flannel("10.244.201.0-24", &value(7, 7)).await;
    let narrow = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.50.0","Backend":{"Type":"vxlan"}}"#;
    let narrow = NetConfig::parse(narrow).expect("parses");
    let moved = env
        .store()
        .acquire(&narrow, &attrs(7, 7), &no_previous())
        .await
        .expect("reallocated");
    assert_ne!(moved.subnet, Some(net("10.244.201.0/24")));
    assert!(
        env.get("10.244.201.0-24").await.is_none(),
        "stale lease deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_subnet_hint() {
    let Some(env) = Env::start("previous").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    let previous = PreviousSubnets {
        ipv4: Some(net("10.244.42.0/24")),
        ipv6: None,
    };
    let lease = env
        .store()
        .acquire(&cfg, &attrs(1, 1), &previous)
        .await
        .expect("acquired");
    assert_eq!(lease.subnet, Some(net("10.244.42.0/24")));
    // Taken by another node: this one gets something else.
    let other = env
        .store()
        .acquire(&cfg, &attrs(2, 2), &previous)
        .await
        .expect("acquired");
    assert_ne!(other.subnet, Some(net("10.244.42.0/24")));
    // Incompatible with the config (wrong length): ignored.
    let odd = PreviousSubnets {
        ipv4: Some(net("10.244.64.0/20")),
        ipv6: None,
    };
    let third = env
        .store()
        .acquire(&cfg, &attrs(3, 3), &odd)
        .await
        .expect("acquired");
    assert_eq!(third.subnet.map(|s| s.prefix_len()), Some(24));
}

async fn race(env: &Env, cfg: &NetConfig, racers: u8) -> Vec<Lease> {
    let barrier = Arc::new(tokio::sync::Barrier::new(usize::from(racers)));
    let mut tasks = Vec::new();
    for i in 0..racers {
        let store = env.store();
        let cfg = cfg.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Connect first, so the acquisitions really start together.
            store.list().await.expect("connect");
            barrier.wait().await;
            store
                .acquire(&cfg, &attrs(i + 1, i + 1), &no_previous())
                .await
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.expect("task").expect("acquired"));
    }
    // Informative (counts the whole test binary's logs): shows the retry paths ran.
    let logs = log_text();
    let lost = |what: &str| logs.lines().filter(|l| l.contains(what)).count();
    eprintln!(
        "lost races: {}, of which to an older IPv6 lease: {}",
        lost("lost the race"),
        lost("same IPv6 subnet first")
    );
    leases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_racing_stores_get_distinct_subnets() {
    let Some(env) = Env::start("race").await else {
        return;
    };
    // Ten subnets for eight nodes: the random picks collide often.
    let cfg = env
        .put_config(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.10.0","Backend":{"Type":"vxlan"}}"#)
        .await;
    let leases = race(&env, &cfg, 8).await;
    let subnets: BTreeSet<_> = leases.iter().filter_map(|l| l.subnet).collect();
    assert_eq!(subnets.len(), 8, "{leases:?}");
    let (listed, _) = env.store().list().await.expect("list");
    assert_eq!(listed.len(), 8);
    for l in &leases {
        let stored = listed
            .iter()
            .find(|x| x.subnet == l.subnet)
            .expect("stored");
        assert_eq!(stored.attrs, l.attrs, "each key holds its winner's value");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_race_keeps_ipv6_subnets_distinct() {
    let Some(env) = Env::start("race6").await else {
        return;
    };
    // Plenty of IPv4 subnets but only ten IPv6 ones.
    let cfg = env
        .put_config(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:42::/48","IPv6SubnetMin":"2001:db8:42:1::","IPv6SubnetMax":"2001:db8:42:a::","Backend":{"Type":"vxlan"}}"#)
        .await;
    let leases = race(&env, &cfg, 8).await;
    let v4: BTreeSet<_> = leases.iter().filter_map(|l| l.subnet).collect();
    let v6: BTreeSet<_> = leases.iter().filter_map(|l| l.ipv6_subnet).collect();
    assert_eq!((v4.len(), v6.len()), (8, 8), "{leases:?}");
    let (listed, _) = env.store().list().await.expect("list");
    assert_eq!(
        listed.len(),
        8,
        "withdrawn losers leave no keys: {listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_add_update_remove_and_expiry() {
    let Some(env) = Env::start("watch").await else {
        return;
    };
    env.put_as_flannel("10.244.1.0-24", &value(1, 1)).await;
    let store = env.store();
    let mut rx = start_watch(&store, 8);
    let snap = snapshot(next_update(&mut rx, PROMPT).await);
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].attrs, attrs(1, 1));

    env.put_as_flannel("10.244.2.0-24", &value(2, 2)).await;
    let e = wait_event(&mut rx, PROMPT, |_| true).await;
    match e {
        LeaseEvent::Added(l) => {
            assert_eq!(l.subnet, Some(net("10.244.2.0/24")));
            assert_eq!(l.attrs, attrs(2, 2));
        }
        other => panic!("expected Added, got {other:?}"),
    }
    env.put_as_flannel("10.244.2.0-24", &value(2, 3)).await;
    let e = wait_event(&mut rx, PROMPT, |_| true).await;
    assert!(
        matches!(&e, LeaseEvent::Added(l) if l.attrs == attrs(2, 3)),
        "update: {e:?}"
    );
    env.delete("10.244.1.0-24").await;
    expect_event(&mut rx, false, "10.244.1.0/24").await;
    // Expiry of the etcd lease is a removal too.
    let grant = env.raw.lease_grant(2).await.expect("grant");
    env.raw
        .put(env.key("10.244.3.0-24"), value(3, 3), grant.id)
        .await
        .expect("put");
    let e = wait_event(&mut rx, PROMPT, |_| true).await;
    assert!(matches!(&e, LeaseEvent::Added(_)), "{e:?}");
    expect_event(&mut rx, false, "10.244.3.0/24").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_mid_watch_relists_and_continues() {
    let Some(env) = Env::start("compact").await else {
        return;
    };
    env.put_as_flannel("10.244.1.0-24", &value(1, 1)).await;
    let store = env.store();
    // Hold the watch between its listing and its watch request: the channel is full, so it
    // blocks sending the snapshot while the test changes and compacts the history.
    let (tx, mut rx) = mpsc::channel(1);
    tx.send(WatchUpdate::Events(Vec::new()))
        .await
        .expect("prefill");
    let watcher = store.clone();
    tokio::spawn(async move { watcher.watch(tx).await });
    let deadline = Instant::now() + PROMPT;
    while store.stats().snapshots == 0 {
        assert!(Instant::now() < deadline, "no listing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.put_as_flannel("10.244.2.0-24", &value(2, 2)).await;
    env.delete("10.244.1.0-24").await;
    let raw = env.raw.clone();
    let rev = raw
        .get("compaction-marker")
        .await
        .expect("get")
        .header
        .map(|h| h.revision)
        .expect("header");
    raw.compact(rev, true).await.expect("compact");

    assert_eq!(
        next_update(&mut rx, PROMPT).await,
        WatchUpdate::Events(Vec::new())
    );
    let stale = snapshot(next_update(&mut rx, PROMPT).await);
    assert_eq!(
        stale.iter().map(|l| l.subnet).collect::<Vec<_>>(),
        vec![Some(net("10.244.1.0/24"))],
        "the snapshot from before the changes"
    );
    let fresh = snapshot(next_update(&mut rx, PROMPT).await);
    assert_eq!(
        fresh.iter().map(|l| l.subnet).collect::<Vec<_>>(),
        vec![Some(net("10.244.2.0/24"))],
        "re-listed after compaction"
    );
    assert_eq!(store.stats().compactions, 1);
    // And the watch continues from there.
    env.put_as_flannel("10.244.3.0-24", &value(3, 3)).await;
    expect_event(&mut rx, true, "10.244.3.0/24").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_etcd_restart() {
    let Some(mut env) = Env::start("outage").await else {
        return;
    };
    let store = env.store();
    let mut rx = start_watch(&store, 8);
    assert!(snapshot(next_update(&mut rx, PROMPT).await).is_empty());
    env.put_as_flannel("10.244.1.0-24", &value(1, 1)).await;
    wait_event(&mut rx, PROMPT, |_| true).await;

    env.server.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let env = env.restart(false).await;
    let changed = Instant::now();
    env.put_as_flannel("10.244.2.0-24", &value(2, 2)).await;
    let e = wait_event(&mut rx, PROMPT, |_| true).await;
    let latency = changed.elapsed();
    assert!(
        matches!(&e, LeaseEvent::Added(l) if l.subnet == Some(net("10.244.2.0/24"))),
        "{e:?}"
    );
    assert!(
        latency <= Duration::from_millis(5_500),
        "change seen {latency:?} after the restart"
    );
    assert!(store.stats().reconnects >= 1, "{:?}", store.stats());
    eprintln!("change after restart seen in {latency:?}");
    if std::env::var_os("DUMP_LOGS").is_some() {
        eprintln!("{}", log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_relists_when_etcd_history_goes_backwards() {
    let Some(env) = Env::start("rewind").await else {
        return;
    };
    let store = env.store();
    let mut rx = start_watch(&store, 8);
    assert!(snapshot(next_update(&mut rx, PROMPT).await).is_empty());
    // Push the revision well ahead of what a fresh etcd will have.
    for i in 1..=20u8 {
        env.put_as_flannel(&format!("10.244.{i}.0-24"), &value(i, i))
            .await;
    }
    for _ in 0..20 {
        wait_event(&mut rx, PROMPT, |_| true).await;
    }
    let env = env.restart(true).await;
    env.put_as_flannel("10.244.100.0-24", &value(100, 100))
        .await;
    // The watch notices the lower revision and re-lists (before or after the put): then only
    // the new lease remains.
    let deadline = tokio::time::Instant::now() + PROMPT;
    let mut relisted = false;
    let mut known: BTreeSet<Ipv4Net> = (1..=20u8)
        .map(|i| net(&format!("10.244.{i}.0/24")))
        .collect();
    let want = BTreeSet::from([net("10.244.100.0/24")]);
    while !(relisted && known == want) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_update(&mut rx, left).await {
            WatchUpdate::Snapshot(leases) => {
                relisted = true;
                known = leases.iter().filter_map(|l| l.subnet).collect();
            }
            WatchUpdate::Events(events) => {
                for e in events {
                    let Some(subnet) = e.lease().subnet else {
                        continue;
                    };
                    match e {
                        LeaseEvent::Added(_) => known.insert(subnet),
                        LeaseEvent::Removed(_) => known.remove(&subnet),
                    };
                }
            }
        }
    }
    assert_eq!(store.stats().rewinds, 1, "{:?}", store.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_entries_are_skipped_with_a_warning() {
    let Some(env) = Env::start("corrupt").await else {
        return;
    };
    env.put_as_flannel("10.244.2.0-24", &value(2, 2)).await;
    env.put_plain("10.244.1.0-24", br#"{"PublicIP":"bogus"}"#)
        .await;
    env.put_plain("not-a-subnet-key", b"{}").await;
    let store = env.store();
    let mut rx = start_watch(&store, 8);
    let snap = snapshot(next_update(&mut rx, PROMPT).await);
    assert_eq!(
        snap.iter().map(|l| l.subnet).collect::<Vec<_>>(),
        vec![Some(net("10.244.2.0/24"))]
    );
    assert_eq!(store.stats().skipped, 2);
    let logs = log_text();
    for key in ["10.244.1.0-24", "not-a-subnet-key"] {
        let full = env.key(key);
        assert!(
            logs.lines()
                .any(|l| l.contains("WARN") && l.contains(&full)),
            "no warning naming {full}"
        );
    }
    // Later: a bad value and a good lease; the good one still arrives.
    env.put_plain("10.244.4.0-24", b"\xff\xfe").await;
    env.put_as_flannel("10.244.3.0-24", &value(3, 3)).await;
    let e = wait_event(&mut rx, PROMPT, |e| matches!(e, LeaseEvent::Added(_))).await;
    assert_eq!(e.lease().subnet, Some(net("10.244.3.0/24")));
    assert_eq!(store.stats().skipped, 3);
    assert!(log_text().contains(&env.key("10.244.4.0-24")));

    // A corrupt entry still blocks its subnet from allocation.
    let cfg = NetConfig::parse(
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.5.0","Backend":{"Type":"vxlan"}}"#,
    )
    .expect("parses");
    let lease = store
        .acquire(&cfg, &attrs(5, 5), &no_previous())
        .await
        .expect("acquired");
    assert_eq!(lease.subnet, Some(net("10.244.5.0/24")));
    let e = store
        .acquire(&cfg, &attrs(6, 6), &no_previous())
        .await
        .expect_err("full");
    assert!(matches!(e, StoreError::OutOfSubnets), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_lease_deleted_or_taken_fires_revocation() {
    let Some(env) = Env::start("revoke").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    for takeover in [false, true] {
        let (_, key, task) = acquire_monitored(&env.store(), &cfg).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!task.is_finished(), "nothing happened yet");
        if takeover {
            env.put_plain(&key, value(99, 99).as_bytes()).await;
        } else {
            env.delete(&key).await;
        }
        let result = tokio::time::timeout(PROMPT, task)
            .await
            .expect("revocation noticed in time")
            .expect("task");
        let e = result.expect_err("revoked");
        assert!(
            matches!(&e, StoreError::LeaseRevoked { key: k } if k.ends_with(&key)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "Lease has been revoked. Shutting down daemon."
        );
        env.delete(&key).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_reputs_with_a_new_ttl() {
    let Some(env) = Env::start("renew").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    // Renew two seconds after acquisition: the margin is the TTL minus 2 s.
    let store = env
        .store()
        .with_renew_margin(LEASE_TTL - Duration::from_secs(2));
    let (lease, key, task) = acquire_monitored(&store, &cfg).await;
    let (value_before, id_before) = env.get(&key).await.expect("written");
    let (value_after, id_after) = env.wait_renewed(&key, id_before, "not renewed").await;
    assert_eq!(value_after, value_before, "same value, byte for byte");
    assert_ne!(id_after, 0);
    assert!(env.ttl(id_after).await > 86_000);
    assert!(
        !task.is_finished(),
        "the monitor keeps running after renewing"
    );
    task.abort();

    // Renewing a lease whose key now holds another node's value is a revocation.
    env.put_plain(&key, value(50, 50).as_bytes()).await;
    let e = store.renew_lease(&lease).await.expect_err("not ours");
    assert!(matches!(e, StoreError::LeaseRevoked { .. }), "{e}");
    assert_eq!(
        env.get(&key).await.expect("kept").0,
        value(50, 50).into_bytes(),
        "the other node's value is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_retries_while_etcd_is_down() {
    let Some(mut env) = Env::start("renewretry").await else {
        return;
    };
    let cfg = env.put_config(VXLAN_CONFIG).await;
    let store = env
        .store()
        .with_renew_margin(LEASE_TTL - Duration::from_secs(2))
        .with_renew_retry(Duration::from_millis(500));
    let (_, key, task) = acquire_monitored(&store, &cfg).await;
    let (_, id_before) = env.get(&key).await.expect("written");
    // Down before the first renewal is due, back after several retries have failed.
    env.server.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let env = env.restart(false).await;
    env.wait_renewed(&key, id_before, "not renewed after etcd returned")
        .await;
    assert!(
        log_text().contains("Error renewing lease (trying again in 1 min)"),
        "failed renewals are logged with upstream's message"
    );
    assert!(!task.is_finished(), "an outage is not a revocation");
    task.abort();
}

/// A subnets prefix whose listing is larger than tonic's default 4 MiB response limit (the
/// issue: listing then failed forever) lists, and the watch's snapshot holds every lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_prefix_larger_than_4_mib_lists() {
    const LEASES: usize = 30_000;
    /// etcd's default --max-txn-ops.
    const BATCH: usize = 128;
    let Some(env) = Env::start("large").await else {
        return;
    };
    env.put_config(r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#)
        .await;
    // Real-shaped leases, as flannel writes them: 10.<hi>.<lo>.0/24 for node i.
    let lease_for = |i: usize| {
        let [_, _, hi, lo] = u32::try_from(i).expect("small").to_be_bytes();
        let data = VxlanBackendData {
            vni: 1,
            vtep_mac: flannel_rs::wire::MacAddr([0x0e, 0, 0, 0, hi, lo]),
        };
        let attrs = LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, hi, lo),
            backend_type: "vxlan".into(),
            backend_data: Some(data.to_raw()),
            ..LeaseAttrs::default()
        };
        (env.key(&format!("10.{hi}.{lo}.0-24")), attrs.to_json())
    };
    let mut bytes = 0;
    for start in (0..LEASES).step_by(BATCH) {
        let success = (start..(start + BATCH).min(LEASES))
            .map(|i| {
                let (key, value) = lease_for(i);
                bytes += key.len() + value.len();
                RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.into_bytes(),
                        value: value.into_bytes(),
                        ..PutRequest::default()
                    })),
                }
            })
            .collect();
        let txn = TxnRequest {
            success,
            ..TxnRequest::default()
        };
        assert!(env.raw.txn(txn).await.expect("txn").succeeded);
    }
    assert!(
        bytes > 4 << 20,
        "keys and values take {bytes} bytes: not over 4 MiB"
    );

    let store = env.store();
    let (leases, _) = store.list().await.expect("a large prefix lists");
    assert_eq!(leases.len(), LEASES);
    let subnets: BTreeSet<Ipv4Net> = leases.iter().filter_map(|l| l.subnet).collect();
    assert_eq!(subnets.len(), LEASES, "every lease listed once");
    assert_eq!(store.stats().skipped, 0);

    // The watch's snapshot is the same listing.
    let mut rx = start_watch(&store, 4);
    let listed = snapshot(next_update(&mut rx, PROMPT * 3).await);
    assert_eq!(listed.len(), LEASES);
}

/// Runs etcdctl against `server` (ETCDCTL_* from the environment removed).
fn etcdctl(server: &EtcdServer, args: &[&str]) {
    server.etcdctl(args);
}

/// --etcd-username/--etcd-password: the store authenticates, renews an expired token and
/// retries, its watch comes back after an etcd restart (which forgets every token), and a
/// missing or wrong password is an error naming the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_authenticate_and_renew_the_token() {
    logs();
    // Tokens live 2 s, so the test outlives several.
    let Some(server) = EtcdServer::start_with("auth", &["--auth-token-ttl", "2"]) else {
        return;
    };
    etcdctl(
        &server,
        &["user", "add", "root:secret", "--interactive=false"],
    );
    etcdctl(&server, &["auth", "enable"]);
    let prefix = "/flannel-rs-test/auth";
    let config = |password: &str| EtcdConfig {
        endpoints: vec![server.endpoint()],
        prefix: prefix.to_owned(),
        username: "root".to_owned(),
        password: password.into(),
        ..EtcdConfig::default()
    };
    let admin = Client::connect(
        &[server.endpoint()],
        ConnectOptions {
            credentials: Some(("root".to_owned(), "secret".to_owned())),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("admin authenticates");
    admin
        .put(format!("{prefix}/config"), VXLAN_CONFIG, 0)
        .await
        .expect("put config");

    // Without credentials etcd refuses; with a wrong password too, saying why.
    let anonymous = EtcdStore::new(&EtcdConfig {
        username: String::new(),
        password: Default::default(),
        ..config("")
    })
    .expect("valid");
    anonymous
        .network_config()
        .await
        .expect_err("auth is enabled");
    let wrong = EtcdStore::new(&config("wrong")).expect("valid");
    let e = wrong.network_config().await.expect_err("wrong password");
    assert!(e.to_string().contains("authentication failed"), "{e}");

    let store = EtcdStore::new(&config("secret")).expect("valid");
    let cfg = NetConfig::parse(&store.network_config().await.expect("config")).expect("parses");
    let lease = store
        .acquire(&cfg, &attrs(1, 1), &no_previous())
        .await
        .expect("acquired");
    let mut rx = start_watch(&store, 8);
    assert_eq!(snapshot(next_update(&mut rx, PROMPT).await).len(), 1);

    // The token expires: requests renew it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (leases, _) = store.list().await.expect("list with a renewed token");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].subnet, lease.subnet);

    // etcd restarts (every simple token is gone): the broken watch reconnects and sees the
    // next change, written by a client that must renew its token too.
    let server = restart_server(server, false).await;
    let grant = admin
        .lease_grant(86_400)
        .await
        .expect("grant after restart");
    admin
        .put(
            format!("{prefix}/subnets/10.244.9.0-24"),
            value(9, 9),
            grant.id,
        )
        .await
        .expect("put after restart");
    expect_event(&mut rx, true, "10.244.9.0/24").await;
    assert!(store.stats().reconnects >= 1, "{:?}", store.stats());
    drop(server);
}

/// A CA and certificates signed by it, made with the openssl CLI in a scratch directory
/// (removed on drop).
struct TestPki {
    dir: std::path::PathBuf,
}

impl TestPki {
    /// `ca.pem`; `server.pem`/`server.key` for 127.0.0.1; `client.pem`/`client.key`; and an
    /// unrelated CA, `other-ca.pem`.
    fn create(tag: &str) -> TestPki {
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).expect("random");
        let dir = std::env::temp_dir().join(format!(
            "flannel-rs-pki-{tag}-{:016x}",
            u64::from_le_bytes(n)
        ));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let pki = TestPki { dir };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=flannel-rs test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        for (name, usage) in [
            ("server", "serverAuth,clientAuth"),
            ("client", "clientAuth"),
        ] {
            pki.openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            std::fs::write(
                pki.path(&format!("{name}.ext")),
                format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
            )
            .expect("write ext");
            pki.openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// --etcd-certfile/--etcd-keyfile/--etcd-cafile against an etcd that requires client
/// certificates: the store works over TLS; without a client certificate, or trusting another
/// CA, it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    logs();
    let pki = TestPki::create("tls");
    let Some(server) = EtcdServer::start_tls(
        "tls",
        &pki.path("server.pem"),
        &pki.path("server.key"),
        &pki.path("ca.pem"),
    ) else {
        return;
    };
    let prefix = "/flannel-rs-test/tls";
    let config = EtcdConfig {
        endpoints: vec![server.endpoint()],
        prefix: prefix.to_owned(),
        certfile: pki.file("client.pem"),
        keyfile: pki.file("client.key"),
        cafile: pki.file("ca.pem"),
        ..EtcdConfig::default()
    };
    assert!(server.endpoint().starts_with("https://"));
    let admin = Client::connect(
        &[server.endpoint()],
        ConnectOptions {
            tls: Some(ConnectOptions::tls(
                Some((
                    std::fs::read(pki.path("client.pem")).expect("cert"),
                    std::fs::read(pki.path("client.key")).expect("key"),
                )),
                Some(std::fs::read(pki.path("ca.pem")).expect("ca")),
            )),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("admin client");
    admin
        .put(format!("{prefix}/config"), VXLAN_CONFIG, 0)
        .await
        .expect("put config over TLS");

    let store = EtcdStore::new(&config).expect("valid");
    let cfg = NetConfig::parse(&store.network_config().await.expect("config")).expect("parses");
    store
        .acquire(&cfg, &attrs(1, 1), &no_previous())
        .await
        .expect("acquired over TLS");
    let mut rx = start_watch(&store, 8);
    assert_eq!(snapshot(next_update(&mut rx, PROMPT).await).len(), 1);

    // https:// without a client certificate: etcd refuses the handshake.
    let anonymous = EtcdStore::new(&EtcdConfig {
        certfile: String::new(),
        keyfile: String::new(),
        ..config.clone()
    })
    .expect("valid");
    let e = anonymous
        .network_config()
        .await
        .expect_err("etcd requires a client certificate");
    eprintln!("without a client certificate: {e}");
    // Trusting another CA: our side refuses etcd's certificate.
    let distrust = EtcdStore::new(&EtcdConfig {
        cafile: pki.file("other-ca.pem"),
        ..config
    })
    .expect("valid");
    let e = distrust
        .network_config()
        .await
        .expect_err("server certificate from an untrusted CA");
    eprintln!("trusting another CA: {e}");
    assert!(e.to_string().contains("certificate"), "{e}");
}
