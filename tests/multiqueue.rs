//! The multi-queue userspace data plane between real daemons: a TUN queue, a `SO_REUSEPORT`
//! socket and a TX + RX thread pair per queue. Parallel TCP flows spread over every queue of
//! both nodes, and handovers to a successor with more or fewer queues, or to one that finds
//! a single-queue device, lose no ping. Privileged: run as root (CI=true makes it mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::{privileged_test_guard, Cluster, NodeKind};

/// Port of n1's and n2's `/metrics` (on 127.0.0.1 inside each node).
const METRICS_PORT: u16 = 9107;
/// The queue count every flanneld of this test reads (the harness passes its environment on).
const QUEUES_ENV: &str = "FLANNELD_USERSPACE_QUEUES";

/// `flannel_vxlan_queue_reads_total` of `node`: (tx, rx) per queue index.
fn queue_reads(c: &Cluster, node: &str) -> Vec<(u64, u64)> {
    let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
    let text = sh(c, node, &["curl", "-sf", "--max-time", "5", &url]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("flannel_vxlan_queue_reads_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").expect("sample");
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .and_then(|v| v.strip_suffix('"'))
                .expect("label")
                .to_string()
        };
        let q: usize = label("queue").parse().expect("queue");
        let v: u64 = value.trim().parse().expect("value");
        if out.len() <= q {
            out.resize(q + 1, (0, 0));
        }
        match label("direction").as_str() {
            "tx" => out[q].0 = v,
            _ => out[q].1 = v,
        }
    }
    out
}

/// 16 parallel TCP streams from n2's pod to n1's pod for 2 s (iperf3); the bytes received.
fn parallel_streams(c: &Cluster) -> u64 {
    let server = c.pod("n1p1").expect("pod").ns.clone();
    let client = c.pod("n2p1").expect("pod").ns.clone();
    let dst = c.pod_ip("n1p1").expect("ip").to_string();
    let srv = std::process::Command::new("timeout")
        .args([
            "20", "ip", "netns", "exec", &server, "iperf3", "-s", "-1", "-p", "5301",
        ])
        .output_async();
    std::thread::sleep(Duration::from_millis(400));
    let out = std::process::Command::new("timeout")
        .args([
            "20", "ip", "netns", "exec", &client, "iperf3", "-c", &dst, "-p", "5301",
        ])
        .args(["-P", "16", "-t", "2", "-J"])
        .output()
        .expect("iperf3");
    let _ = srv.join();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
}

/// Pings n2p1 → n1p1 every 10 ms for 3 s while `op` runs (0.5 s in); the pings lost.
fn lost_pings(c: &mut Cluster, op: impl FnOnce(&mut Cluster)) -> usize {
    let dst = c.pod_ip("n1p1").expect("ip").to_string();
    let ns = c.pod("n2p1").expect("pod").ns.clone();
    let pings = std::process::Command::new("timeout")
        .args([
            "20", "ip", "netns", "exec", &ns, "ping", "-i", "0.01", "-c", "300", "-W", "1",
        ])
        .arg(&dst)
        .output_async();
    std::thread::sleep(Duration::from_millis(500));
    op(c);
    let out = pings.join();
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .lines()
        .find_map(|l| l.split(", ").nth(1)?.strip_suffix(" received"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    300 - received
}

/// The last "data plane ready" line of n1's log.
fn ready_line(c: &Cluster) -> String {
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    log.lines()
        .rfind(|l| l.contains("userspace VXLAN data plane ready"))
        .unwrap_or_default()
        .to_string()
}

/// Asserts that n1's last "ready" line says `want` (e.g. `tun_queues=2 sockets=2`).
fn assert_ready(c: &Cluster, want: &str) {
    let line = ready_line(c);
    assert!(line.contains(want), "want {want}: {line}");
}

/// Asserts that 8 MiB cross from pod `from` to pod `to` intact.
fn assert_transfer(c: &Cluster, from: &str, to: &str, port: u16) {
    let (sent, got, bytes) = transfer(c, from, to, 8, port);
    assert_eq!((bytes, &sent), (8 << 20, &got), "{from} -> {to}");
}

/// The flags of n1's `flannel.1` (`IFF_MULTI_QUEUE` is 0x100).
fn tun_flags(c: &Cluster) -> u32 {
    let flags = sh(c, "n1", &["cat", "/sys/class/net/flannel.1/tun_flags"]);
    u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("flags")
}

/// Hands n1's data plane to a new flanneld started with `queues` queues, under pings.
fn handover_to(c: &mut Cluster, queues: &str) -> usize {
    std::env::set_var(QUEUES_ENV, queues);
    lost_pings(c, |c| c.handoff_flanneld("n1").expect("handover"))
}

/// Two userspace nodes with two queues each and `/metrics` on, their matrix passing.
fn two_queue_cluster() -> Cluster {
    std::env::set_var(QUEUES_ENV, "2");
    let mut s = spec(&[NodeKind::Userspace, NodeKind::Userspace], 1);
    for n in &mut s.nodes {
        n.extra_args = vec![format!("--metrics-port={METRICS_PORT}")];
    }
    let c = Cluster::up(&s).expect("cluster up");
    assert!(c.check_until_pass(Duration::from_secs(5)).all_pass());
    assert_ready(&c, "tun_queues=2 sockets=2");
    c
}

#[test]
fn multi_queue_spreads_flows_and_hands_over_to_any_queue_count() {
    if !privileged_test_guard("multi_queue_spreads_flows_and_hands_over_to_any_queue_count") {
        return;
    }
    let _g = serial();
    let mut c = two_queue_cluster();
    let flags = tun_flags(&c);
    assert_ne!(flags & 0x100, 0, "flannel.1 is not multi-queue: {flags:#x}");

    // Parallel flows: every queue of both nodes reads (flows are spread by hash, so a run
    // may miss a queue by chance; up to three runs).
    let mut spread = false;
    for _ in 0..3 {
        assert!(parallel_streams(&c) > 1 << 20, "iperf3 moved under 1 MiB");
        let (q1, q2) = (queue_reads(&c, "n1"), queue_reads(&c, "n2"));
        println!("n1 queues (tx, rx): {q1:?}; n2: {q2:?}");
        assert_eq!((q1.len(), q2.len()), (2, 2));
        // n2 sends the data (TX queues), n1 receives it (RX sockets); the ACKs go back.
        spread = [&q1, &q2]
            .iter()
            .all(|q| q.iter().all(|(tx, rx)| *tx > 0 && *rx > 0));
        if spread {
            break;
        }
    }
    assert!(spread, "a queue carried nothing in three runs");

    // Handovers: 2 → 3 queues (grows the device and the socket group), 3 → 1, each losing
    // no ping; then data in both directions still crosses.
    let lost = handover_to(&mut c, "3");
    assert_eq!(lost, 0, "2 -> 3 queues lost pings");
    assert_ready(&c, "tun_queues=3 sockets=3");
    let lost = handover_to(&mut c, "1");
    assert_eq!(lost, 0, "3 -> 1 queues lost pings");
    // The three sockets are kept (one closed by the successor would stay in the group until
    // the predecessor closes its copy); the extra TUN queues are detached.
    assert_ready(&c, "tun_queues=1 sockets=3");
    assert_transfer(&c, "n2p1", "n1p1", 9111);

    // A cold start with one queue finds the multi-queue device: it is recreated single-queue.
    std::env::set_var(QUEUES_ENV, "1");
    c.restart_flanneld("n1").expect("restart");
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    assert!(log.contains("recreating it"), "{log}");
    let flags = tun_flags(&c);
    assert_eq!(
        flags & 0x100,
        0,
        "flannel.1 is still multi-queue: {flags:#x}"
    );
    assert!(c.check_until_pass(Duration::from_secs(10)).all_pass());

    // A handover to 2 queues of that single-queue device: the successor cannot attach a
    // second queue, says so and serves one, losing nothing.
    let lost = handover_to(&mut c, "2");
    assert_eq!(lost, 0, "1 -> 2 queues on a single-queue device lost pings");
    let log = std::fs::read_to_string(c.flanneld_log("n1")).expect("log");
    assert!(log.contains("cannot attach more queues"), "{log}");
    assert_ready(&c, "tun_queues=1");
    assert_transfer(&c, "n1p1", "n2p1", 9112);
    std::env::remove_var(QUEUES_ENV);
    teardown(c);
}

/// CPU steering's switch, read by every flanneld of the steering test.
const STEERING_ENV: &str = "FLANNELD_USERSPACE_CPU_STEERING";

/// `Cpus_allowed_list` of each `vxlan-*` thread of `node`'s flanneld, by thread name.
fn packet_thread_cpus(c: &Cluster, node: &str) -> Vec<(String, String)> {
    let pid = c
        .node(node)
        .and_then(|n| n.flanneld.as_ref())
        .expect("flanneld")
        .pid;
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        if !comm.starts_with("vxlan-") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        out.push((comm, cpus));
    }
    out.sort();
    out
}

/// 200 pings n2p1 → n1p1 from a process pinned to `cpu`; per node, how many packets each
/// queue's TX thread and RX thread read meanwhile.
fn pings_on_cpu(c: &Cluster, cpu: usize) -> [Vec<(u64, u64)>; 2] {
    let before = [queue_reads(c, "n1"), queue_reads(c, "n2")];
    let dst = c.pod_ip("n1p1").expect("ip").to_string();
    let ns = c.pod("n2p1").expect("pod").ns.clone();
    let mask = format!("{:#x}", 1u64 << cpu);
    let out = std::process::Command::new("timeout")
        .args([
            "20", "ip", "netns", "exec", &ns, "taskset", &mask, "ping", "-q",
        ])
        .args(["-i", "0.005", "-c", "200", "-W", "1", &dst])
        .output()
        .expect("ping");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = [queue_reads(c, "n1"), queue_reads(c, "n2")];
    [0, 1].map(|i| {
        after[i]
            .iter()
            .zip(&before[i])
            .map(|(a, b)| (a.0 - b.0, a.1 - b.1))
            .collect()
    })
}

/// The queue that carried (nearly) all of a node's pings, if one did.
fn busy_queue(reads: &[(u64, u64)]) -> Option<usize> {
    let busy: Vec<usize> = (0..reads.len())
        .filter(|&q| reads[q].0 >= 190 && reads[q].1 >= 190)
        .collect();
    let quiet = (0..reads.len())
        .filter(|q| !busy.contains(q))
        .all(|q| reads[q].0 < 20 && reads[q].1 < 20);
    match busy[..] {
        [q] if quiet => Some(q),
        _ => None,
    }
}

#[test]
fn cpu_steering_keeps_packets_on_their_cpu_and_a_successor_without_it_undoes_it() {
    if !privileged_test_guard(
        "cpu_steering_keeps_packets_on_their_cpu_and_a_successor_without_it_undoes_it",
    ) {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "CPU steering needs 2 CPUs to be tested; this machine has {cpus}"
    );
    let _g = serial();
    std::env::set_var(STEERING_ENV, "true");
    let mut c = two_queue_cluster();

    // Each queue's threads run on their queue's CPU only.
    for node in ["n1", "n2"] {
        let threads = packet_thread_cpus(&c, node);
        let want: Vec<(String, String)> = [("rx0", "0"), ("rx1", "1"), ("tx0", "0"), ("tx1", "1")]
            .iter()
            .map(|(t, cpu)| (format!("vxlan-{t}"), cpu.to_string()))
            .collect();
        assert_eq!(threads, want, "{node}");
    }
    // A ping sent from CPU c crosses on queue c of both nodes, both ways (the request's
    // and the reply's TX and RX), whatever its flow hash.
    for cpu in [0, 1] {
        let [n1, n2] = pings_on_cpu(&c, cpu);
        println!("pings on CPU {cpu}: n1 (tx, rx) {n1:?}, n2 {n2:?}");
        assert_eq!(busy_queue(&n1), Some(cpu), "n1: {n1:?}");
        assert_eq!(busy_queue(&n2), Some(cpu), "n2: {n2:?}");
    }

    // A successor without steering removes it under pings (none lost): both CPUs' pings
    // then take the queue their flow hashes to, the same one, and threads run anywhere.
    std::env::remove_var(STEERING_ENV);
    let lost = lost_pings(&mut c, |c| c.handoff_flanneld("n1").expect("handover"));
    assert_eq!(lost, 0, "the handover lost pings");
    let threads = packet_thread_cpus(&c, "n1");
    assert!(
        threads
            .iter()
            .all(|(_, cpus)| cpus.contains('-') || cpus.contains(',')),
        "{threads:?}"
    );
    let [a, _] = pings_on_cpu(&c, 0);
    let [b, _] = pings_on_cpu(&c, 1);
    println!("without steering, n1 (tx, rx): CPU 0 {a:?}, CPU 1 {b:?}");
    let (qa, qb) = (busy_queue(&a), busy_queue(&b));
    assert!(
        qa.is_some() && qa == qb,
        "one flow, one queue by hash: {a:?} vs {b:?}"
    );
    std::env::remove_var(QUEUES_ENV);
    teardown(c);
}
