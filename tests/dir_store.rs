//! The local directory lease store (`--lease-dir`): allocation, reuse, races between daemons
//! sharing one directory, watching and corrupt files. Only touches a private temp directory.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use flannel_rs::config::netconf::NetConfig;
use flannel_rs::config::subnet_env::PreviousSubnets;
use flannel_rs::lease::dir::DirStore;
use flannel_rs::lease::store::{LeaseStore, StoreError, WatchUpdate};
use flannel_rs::lease::{Lease, LeaseAttrs};
use ipnet::Ipv4Net;
use test_support::fixtures::{mac, net, vxlan_attrs, VXLAN_CONFIG};
use test_support::TempDir;
use tokio::sync::mpsc;

fn store_with(dir: &Path, config: &str) -> (DirStore, NetConfig) {
    std::fs::write(dir.join("config"), config).expect("write config");
    let store = DirStore::new(dir).with_poll_interval(Duration::from_millis(50));
    let text = store.network_config_blocking().expect("config readable");
    let cfg = NetConfig::parse(&text).expect("parses");
    cfg.validate().expect("valid");
    (store, cfg)
}

/// vxlan attributes: public IP 198.51.100.`last`, VTEP MAC ending in `mac_last`.
fn attrs(last: u8, mac_last: u8) -> LeaseAttrs {
    vxlan_attrs(Ipv4Addr::new(198, 51, 100, last), mac(mac_last, 0))
}

fn lease_file(dir: &Path, lease: &Lease) -> PathBuf {
    dir.join("subnets")
        .join(lease.key().expect("has v4").to_string())
}

#[test]
fn acquire_in_empty_dir() {
    let tmp = TempDir::new("dir-empty");
    let (store, cfg) = store_with(&tmp.0, VXLAN_CONFIG);
    let a = attrs(1, 1);
    let lease = store
        .acquire_blocking(&cfg, &a, &PreviousSubnets::default())
        .expect("acquired");
    let range = cfg.ipv4_range().expect("ok").expect("v4");
    assert!(range.is_compatible(&lease.subnet.expect("v4")), "{lease:?}");
    assert_eq!(lease.ipv6_subnet, None);
    assert_eq!((&lease.attrs, lease.expiration), (&a, None));
    // The file is exactly flannel's etcd value, readable by others.
    let text = std::fs::read_to_string(lease_file(&tmp.0, &lease)).expect("lease file");
    assert_eq!(text, a.to_json());
    assert_eq!(store.list().expect("list"), vec![lease]);
}

#[test]
fn reuse_on_restart_by_public_ip() {
    let tmp = TempDir::new("dir-reuse");
    let (store, cfg) = store_with(&tmp.0, VXLAN_CONFIG);
    let first = store
        .acquire_blocking(&cfg, &attrs(2, 7), &PreviousSubnets::default())
        .expect("first");
    // Other nodes join meanwhile.
    for n in 10..14 {
        store
            .acquire_blocking(&cfg, &attrs(n, n), &PreviousSubnets::default())
            .expect("other");
    }
    // A fresh store instance (daemon restart) with the same public IP and the VtepMAC the
    // caller preserved gets the same subnet, the file unchanged; a new MAC (device recreated)
    // keeps the subnet and rewrites the data.
    let restarted = DirStore::new(&tmp.0);
    for (vtep_mac, case) in [(7, "same MAC"), (8, "new MAC")] {
        let again = restarted
            .acquire_blocking(&cfg, &attrs(2, vtep_mac), &PreviousSubnets::default())
            .expect(case);
        assert_eq!(again.subnet, first.subnet, "{case}");
        let file = std::fs::read_to_string(lease_file(&tmp.0, &again)).expect("file");
        assert_eq!(file, attrs(2, vtep_mac).to_json(), "{case}");
    }
    assert_eq!(restarted.list().expect("list").len(), 5);
}

#[test]
fn previous_subnet_hint_and_incompatible_lease() {
    let tmp = TempDir::new("dir-hint");
    let (store, cfg) = store_with(&tmp.0, VXLAN_CONFIG);
    let hint = PreviousSubnets {
        ipv4: Some(net("10.244.77.0/24")),
        ipv6: None,
    };
    let l = store
        .acquire_blocking(&cfg, &attrs(3, 3), &hint)
        .expect("hint");
    assert_eq!(l.subnet, Some(net("10.244.77.0/24")));
    // Taken by someone else now: another node with the same hint gets a different subnet.
    let other = store
        .acquire_blocking(&cfg, &attrs(4, 4), &hint)
        .expect("other");
    assert_ne!(other.subnet, l.subnet);
    // Out of range hint: ignored.
    let far = PreviousSubnets {
        ipv4: Some(net("10.99.1.0/24")),
        ipv6: None,
    };
    let l5 = store
        .acquire_blocking(&cfg, &attrs(5, 5), &far)
        .expect("far");
    assert_ne!(l5.subnet, far.ipv4);

    // The network moves: our old lease no longer fits, so it is deleted and replaced.
    let (store2, cfg2) = store_with(
        &tmp.0,
        r#"{"Network":"10.245.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    let moved = store2
        .acquire_blocking(&cfg2, &attrs(3, 3), &hint)
        .expect("moved");
    assert!(net("10.245.0.0/16").contains(&moved.subnet.expect("v4")));
    assert!(
        !lease_file(&tmp.0, &l).exists(),
        "incompatible lease deleted"
    );
    assert!(
        lease_file(&tmp.0, &other).exists(),
        "other nodes' leases untouched"
    );
}

#[test]
fn out_of_subnets_and_corrupt_files_block_their_subnet() {
    let tmp = TempDir::new("dir-full");
    // /22 with /24 subnets: SubnetMin 10.9.1.0 .. SubnetMax 10.9.3.0, three subnets.
    let (store, cfg) = store_with(
        &tmp.0,
        r#"{"Network":"10.9.0.0/22","Backend":{"Type":"host-gw"}}"#,
    );
    std::fs::create_dir_all(tmp.0.join("subnets")).expect("mkdir");
    std::fs::write(tmp.0.join("subnets/10.9.1.0-24"), "{garbage").expect("corrupt");
    std::fs::write(tmp.0.join("subnets/10.9.3.0-24"), r#"{"PublicIP":"x"}"#).expect("corrupt");
    let l = store
        .acquire_blocking(&cfg, &attrs(1, 1), &PreviousSubnets::default())
        .expect("last free");
    assert_eq!(l.subnet, Some(net("10.9.2.0/24")));
    let e = store
        .acquire_blocking(&cfg, &attrs(2, 2), &PreviousSubnets::default())
        .expect_err("full");
    assert!(matches!(e, StoreError::OutOfSubnets), "{e}");
    assert_eq!(e.to_string(), "out of subnets");
}

#[test]
fn dual_stack_keys() {
    let tmp = TempDir::new("dir-dual");
    let (store, cfg) = store_with(
        &tmp.0,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd42:1::/48","Backend":{"Type":"vxlan"}}"#,
    );
    let mut a = attrs(1, 1);
    a.public_ipv6 = Some("2001:db8::1".parse().expect("v6"));
    let l = store
        .acquire_blocking(&cfg, &a, &PreviousSubnets::default())
        .expect("dual");
    let v6 = l.ipv6_subnet.expect("v6 subnet");
    assert_eq!(v6.prefix_len(), 64);
    let name = lease_file(&tmp.0, &l);
    assert!(name.to_string_lossy().contains('&'), "{}", name.display());
    let listed = store.list().expect("list");
    assert_eq!(listed, vec![l]);
}

#[test]
fn config_errors() {
    let tmp = TempDir::new("dir-cfg");
    let store = DirStore::new(&tmp.0);
    let e = store.network_config_blocking().expect_err("missing config");
    assert!(e.to_string().contains("flannel config not found"), "{e}");
    let (store, cfg) = store_with(
        &tmp.0,
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd42:2::/48","Backend":{"Type":"vxlan"}}"#,
    );
    // IPv6-only allocates (upstream's `0.0.0.0-0&<v6>` key; tests/conformance.rs has more).
    let l = store
        .acquire_blocking(&cfg, &attrs(1, 1), &PreviousSubnets::default())
        .expect("v6 only");
    assert_eq!(l.subnet, None);
    let v6 = l.ipv6_subnet.expect("v6 subnet");
    let file = tmp.0.join(format!("subnets/0.0.0.0-0&{}-64", v6.addr()));
    assert!(file.is_file(), "{}", file.display());
}

#[test]
fn eight_daemons_racing_get_distinct_subnets() {
    let tmp = TempDir::new("dir-race");
    // /20 → 15 candidate /24s, so random picks collide often and the retry path runs.
    let (_, cfg) = store_with(
        &tmp.0,
        r#"{"Network":"10.30.0.0/20","Backend":{"Type":"vxlan"}}"#,
    );
    for round in 0..5u8 {
        let sub = tmp.0.join(format!("round{round}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let (dir, cfg, barrier) = (sub.clone(), cfg.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let store = DirStore::new(dir);
                    barrier.wait();
                    store.acquire_blocking(&cfg, &attrs(i + 1, i), &PreviousSubnets::default())
                })
            })
            .collect();
        let leases: Vec<Lease> = handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("acquired"))
            .collect();
        let subnets: BTreeSet<_> = leases.iter().map(|l| l.subnet).collect();
        assert_eq!(subnets.len(), 8, "round {round}: {leases:?}");
        // Every file holds the attributes of the daemon that got it.
        for l in &leases {
            let text = std::fs::read_to_string(lease_file(&sub, l)).expect("file");
            assert_eq!(text, l.attrs.to_json());
        }
        let listed = DirStore::new(&sub).list().expect("list");
        assert_eq!(listed.len(), 8);
        let leftovers = std::fs::read_dir(sub.join("subnets")).expect("dir").count();
        assert_eq!(leftovers, 8, "no temporary files left");
    }
}

async fn next_snapshot(rx: &mut mpsc::Receiver<WatchUpdate>) -> Vec<Lease> {
    match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        Ok(Some(WatchUpdate::Snapshot(leases))) => leases,
        other => panic!("expected a snapshot within 1 s, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_add_update_remove_and_skips_corrupt() {
    let tmp = TempDir::new("dir-watch");
    let (store, cfg) = store_with(&tmp.0, VXLAN_CONFIG);
    assert_eq!(store.network_config().await.expect("config"), VXLAN_CONFIG);
    let (tx, mut rx) = mpsc::channel(8);
    // Through the trait object, as the daemon holds stores.
    let watcher: Box<dyn LeaseStore> = Box::new(store.clone());
    assert!(watcher.name().contains("directory lease store"));
    let task = tokio::spawn(async move { watcher.watch(tx).await });

    assert!(
        next_snapshot(&mut rx).await.is_empty(),
        "initial snapshot of an empty dir"
    );

    // Add (through the async trait API).
    let lease = store
        .acquire(&cfg, &attrs(1, 1), &PreviousSubnets::default())
        .await
        .expect("acquire");
    assert_eq!(next_snapshot(&mut rx).await, vec![lease.clone()]);

    // Update: another file content for the same key.
    let path = lease_file(&tmp.0, &lease);
    std::fs::write(&path, attrs(9, 9).to_json()).expect("update");
    let updated = next_snapshot(&mut rx).await;
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].attrs, attrs(9, 9));

    // A corrupt file is skipped, warned about once, and does not disturb the others.
    let bad = tmp.0.join("subnets/10.244.200.0-24");
    std::fs::write(&bad, "{not json").expect("corrupt");
    assert_eq!(next_snapshot(&mut rx).await, updated);
    assert_eq!(store.corrupt_files(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.corrupt_files(), 1, "warned once, not every poll");
    assert!(rx.try_recv().is_err(), "no snapshot without a change");
    std::fs::write(&bad, "{\"PublicIP\":5}").expect("corrupt differently");
    assert_eq!(next_snapshot(&mut rx).await, updated);
    assert_eq!(store.corrupt_files(), 2, "a new content is a new warning");

    // Remove.
    std::fs::remove_file(&path).expect("remove");
    assert!(next_snapshot(&mut rx).await.is_empty());

    // Closing the receiver ends the watch cleanly.
    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(1), task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

/// A FIFO, links to `/dev/zero` and to a valid lease, a device-sized file and a file whose
/// name is not a key: none blocks a scan or is read whole; each is named once and skipped,
/// while the valid lease next to them is listed and watched as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_are_skipped_without_blocking_or_reading_them() {
    let tmp = TempDir::new("dir-hostile");
    let (store, cfg) = store_with(&tmp.0, VXLAN_CONFIG);
    let lease = store
        .acquire_blocking(&cfg, &attrs(1, 1), &PreviousSubnets::default())
        .expect("acquired");
    let subnets = tmp.0.join("subnets");
    let fifo = subnets.join("10.244.201.0-24");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(st.success(), "mkfifo");
    std::os::unix::fs::symlink("/dev/zero", subnets.join("10.244.202.0-24")).expect("symlink");
    // A link to a valid lease is still a link: not followed.
    std::os::unix::fs::symlink(lease_file(&tmp.0, &lease), subnets.join("10.244.203.0-24"))
        .expect("symlink");
    // 1 MiB (sparse: costs no disk) of an otherwise plausible name.
    let huge = std::fs::File::create(subnets.join("10.244.204.0-24")).expect("create");
    huge.set_len(1 << 20).expect("set_len");
    drop(huge);
    // Not a key: never opened (a FIFO, which would block a read).
    let st = std::process::Command::new("mkfifo")
        .arg(subnets.join("notes"))
        .status()
        .expect("mkfifo runs");
    assert!(st.success(), "mkfifo");

    // list() finishes promptly with only the real lease.
    let listed = tokio::time::timeout(Duration::from_secs(2), LeaseStore::list(&store))
        .await
        .expect("listing does not block")
        .expect("list");
    assert_eq!(listed, vec![lease.clone()]);

    // The watch names each bad file once (5), and keeps doing so only on change.
    let (tx, mut rx) = mpsc::channel(8);
    let watcher = store.clone();
    let task = tokio::spawn(async move { LeaseStore::watch(&watcher, tx).await });
    assert_eq!(next_snapshot(&mut rx).await, vec![lease.clone()]);
    assert_eq!(store.corrupt_files(), 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.corrupt_files(), 5, "named once, not every poll");
    assert!(rx.try_recv().is_err(), "no snapshot without a change");

    // Allocation still works, and never hands out a subnet a bad file's name holds.
    let second = store
        .acquire_blocking(&cfg, &attrs(2, 2), &PreviousSubnets::default())
        .expect("acquired");
    let taken: BTreeSet<Ipv4Net> = [
        "10.244.201.0/24",
        "10.244.202.0/24",
        "10.244.203.0/24",
        "10.244.204.0/24",
    ]
    .iter()
    .map(|s| net(s))
    .collect();
    assert!(!taken.contains(&second.subnet.expect("v4")));
    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(1), task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}
