//! Field problem P2: ClusterIP traffic (kube-proxy's DNAT, mark and MASQUERADE --random-fully) across the overlay, checksums verified on the wire.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::check::ProbeOutcome;
use crate::cluster::{Cluster, NodeKind};
use crate::doctor::Level;
use crate::proto;
use crate::sys;

use super::{
    capture_during, expect_matrix_pass, no_fail, NamedProbe, Phase, ScenarioOpts, BIG_PROBE,
    CLUSTER_IP, CLUSTER_IP_MIXED, SERVICE_PORT,
};

fn clusterip_probes(
    c: &Cluster,
    phase: &mut Phase,
    clients: &[(String, String)],
    rounds: usize,
) -> (usize, usize) {
    let mut ok = 0;
    let mut total = 0;
    for (node, pod) in clients {
        for from in [pod.as_str(), node.as_str()] {
            for vip in [CLUSTER_IP, CLUSTER_IP_MIXED] {
                for round in 0..rounds {
                    let bytes = if round % 2 == 0 { 0 } else { BIG_PROBE };
                    let outcome = c.probe_tcp_bytes(from, vip, SERVICE_PORT, bytes);
                    total += 1;
                    ok += usize::from(outcome.ok);
                    phase.probes.push(NamedProbe {
                        from: from.to_string(),
                        target: format!("{vip}:{SERVICE_PORT}"),
                        bytes,
                        outcome,
                    });
                }
            }
        }
    }
    (ok, total)
}

/// A probe round trip at least this long means the first SYN was lost and retransmitted.
const SYN_RETRANSMIT_MS: f64 = 900.0;

/// The round trip a successful probe printed (`ok 1.234 ms`).
pub(super) fn probe_ms(o: &ProbeOutcome) -> Option<f64> {
    if !o.ok {
        return None;
    }
    let mut words = o.detail.split_whitespace();
    while let Some(w) = words.next() {
        if let Ok(v) = w.parse::<f64>() {
            return (words.next() == Some("ms")).then_some(v);
        }
    }
    None
}
pub(super) fn p2_cluster_ip(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let us: Vec<String> = c
        .nodes_of(NodeKind::Userspace)
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let ks: Vec<String> = c
        .nodes_of(NodeKind::Kernel)
        .iter()
        .map(|n| n.name.clone())
        .collect();
    if us.len() < 2 || ks.len() < 2 {
        bail!("p2-cluster-ip needs two userspace and two kernel nodes (Scenario::spec)");
    }
    let pod_of = |c: &Cluster, n: &str| -> Result<String> {
        c.node(n)
            .and_then(|n| n.pods.first())
            .map(|p| p.name.clone())
            .ok_or_else(|| anyhow!("{n} has no pod"))
    };
    let (ua, ub, ka, kb) = (&us[0], &us[1], &ks[0], &ks[1]);
    let clients = vec![(ua.clone(), pod_of(c, ua)?), (ka.clone(), pod_of(c, ka)?)];
    let vxlan_port = c.net_conf()?.effective_port();
    let dev = format!("flannel.{}", c.net_conf()?.vni);
    let mut phases = Vec::new();

    // Baseline: the overlay works and the daemon turned offload off on every flannel.1.
    let mut p = Phase::new(
        "baseline",
        "cluster up; tx checksum offload state of the kernel nodes' vxlan device",
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    for k in [ka, kb] {
        let st = c.tx_checksum_ip_generic(k, &dev);
        p.expect(
            format!("{k}: {dev} has tx-checksum-ip-generic off (turned off by our daemon)"),
            matches!(st, Ok(Some(false))),
            format!("{st:?}"),
        );
    }
    p.expect_doctor(c, ua, "no FAIL at all on a healthy node", no_fail);
    if let Some(i) = p.expect_doctor(c, ka, "no FAIL at all on a healthy node", no_fail) {
        p.expect_on_doctor(i, "PASS tx-checksum", |r| r.has(Level::Pass, "tx-checksum"));
    }
    phases.push(p);

    // ClusterIP traffic from a pod and from the host, both modes, under capture.
    let mut p = Phase::new(
        "cluster-ip",
        format!(
            "{CLUSTER_IP}:{SERVICE_PORT} on {ua} -> {}:{} (userspace pair), on {ka} -> {} (kernel pair); \
             {CLUSTER_IP_MIXED}:{SERVICE_PORT} on {ua} -> {kb}'s pod, on {ka} -> {ub}'s pod; \
             DNAT + mark 0x4000 + MASQUERADE --random-fully; capture of UDP {vxlan_port} on the underlay",
            pod_of(c, ub)?,
            proto::TCP_PORT,
            pod_of(c, kb)?
        ),
    );
    c.add_kube_proxy_service(ua, CLUSTER_IP, SERVICE_PORT, &pod_of(c, ub)?)?;
    c.add_kube_proxy_service(ka, CLUSTER_IP, SERVICE_PORT, &pod_of(c, kb)?)?;
    c.add_kube_proxy_service(ua, CLUSTER_IP_MIXED, SERVICE_PORT, &pod_of(c, kb)?)?;
    c.add_kube_proxy_service(ka, CLUSTER_IP_MIXED, SERVICE_PORT, &pod_of(c, ub)?)?;
    for n in [ua, ka] {
        c.count_marked_vxlan(n, vxlan_port)?;
    }
    let ((ok, total), pcap) = capture_during(c, &format!("udp port {vxlan_port}"), |c| {
        clusterip_probes(c, &mut p, &clients, 4)
    })?;
    p.expect(
        "every ClusterIP probe (pod and host source, small and 4000-byte requests) succeeds",
        ok == total && total > 0,
        format!("{ok}/{total} ok"),
    );
    let slow: Vec<String> = p
        .probes
        .iter()
        .filter(|x| probe_ms(&x.outcome).is_some_and(|ms| ms >= SYN_RETRANSMIT_MS))
        .map(|x| format!("{} -> {}: {}", x.from, x.target, x.outcome.detail))
        .collect();
    p.expect(
        format!(
            "no ClusterIP connection needed a SYN retransmission (every probe < {SYN_RETRANSMIT_MS} ms)"
        ),
        slow.is_empty(),
        slow.join(", "),
    );
    for n in [ua, ka] {
        let masq = c.masquerade_packets(n).unwrap_or(0);
        p.expect(
            format!("{n}: the KUBE-POSTROUTING MASQUERADE --random-fully rule matched packets"),
            masq > 0,
            format!("{masq} packets"),
        );
    }
    // The double NAT of kubernetes#88986: a kernel vxlan device encapsulates in the same
    // namespace and keeps the skb mark, so the outer UDP packet is masqueraded (with a random
    // source port) too. Our userspace data plane sends the outer packet from its own socket,
    // which never carries the service mark.
    let marked = c.marked_vxlan_packets(ka).unwrap_or(0);
    p.expect(
        format!(
            "{ka} (kernel): encapsulated VXLAN packets carry mark 0x4000 into KUBE-POSTROUTING \
             (the emulation reproduces the double NAT of kubernetes#88986)"
        ),
        marked > 0,
        format!("{marked} marked VXLAN packets"),
    );
    let marked = c.marked_vxlan_packets(ua).unwrap_or(u64::MAX);
    p.expect(
        format!(
            "{ua} (userspace): no VXLAN packet carries mark 0x4000 (the outer packet is never \
             NATed a second time)"
        ),
        marked == 0,
        format!("{marked} marked VXLAN packets"),
    );
    let rep = c.verify_capture(&pcap)?;
    p.expect(
        "tshark: every VXLAN frame's outer IPv4/UDP and inner IPv4/TCP checksums are valid",
        rep.all_checksums_ok(),
        rep.to_string().replace('\n', "; "),
    );
    p.expect(
        "tshark: the capture holds inner TCP segments (the ClusterIP traffic)",
        rep.inner_tcp > 0,
        format!("{} inner TCP", rep.inner_tcp),
    );
    p.captures.push((format!("udp {vxlan_port}"), rep));
    for n in [ua, ka] {
        p.expect_doctor(c, n, "no FAIL tx-checksum", |r| {
            !r.has(Level::Fail, "tx-checksum")
        });
    }
    phases.push(p);

    // An admin turns offload back on: doctor must name it.
    let mut p = Phase::new(
        "offload-on",
        format!("ethtool -K {dev} tx-checksum-ip-generic on on {ka}"),
    );
    c.exec_ok(ka, &["ethtool", "-K", &dev, "tx-checksum-ip-generic", "on"])?;
    let st = c.tx_checksum_ip_generic(ka, &dev);
    p.expect(
        format!("{ka}: {dev} now shows tx-checksum-ip-generic on"),
        matches!(st, Ok(Some(true))),
        format!("{st:?}"),
    );
    let dev2 = dev.clone();
    p.expect_doctor(c, ka, &format!("FAIL tx-checksum naming {dev}"), move |r| {
        r.has_mentioning(Level::Fail, "tx-checksum", &dev2)
    });
    // The brief for this scenario assumed Linux 6.18 no longer has the UDP-tunnel checksum
    // bug of kubernetes#88986. What this phase observes is reported, not asserted either way:
    // a kernel fix (or a kernel that still has the bug) must not flip the test. On the 6.18
    // kernel this was written on, with offload on, the first VXLAN packet of every new
    // ClusterIP connection left with a bad outer UDP checksum and the SYN was retransmitted
    // after 1 s; with offload off (the phase before) every checksum was valid.
    let before = p.probes.len();
    let ((ok, total), pcap) = capture_during(c, &format!("udp port {vxlan_port}"), |c| {
        clusterip_probes(c, &mut p, &clients[1..], 2)
    })?;
    let rep = c.verify_capture(&pcap)?;
    let slow = p.probes[before..]
        .iter()
        .filter(|x| probe_ms(&x.outcome).is_some_and(|ms| ms >= SYN_RETRANSMIT_MS))
        .count();
    p.note(format!(
        "with offload on (observed, not asserted): ClusterIP probes from {ka} {ok}/{total} ok, \
         {slow} of them took >= {SYN_RETRANSMIT_MS} ms (a lost first SYN is retransmitted after \
         1 s); tshark: {} VXLAN frames, {} bad outer UDP checksums, {} bad inner checksums",
        rep.vxlan_frames,
        rep.bad_outer_udp,
        rep.bad_inner_ip + rep.bad_inner_tcp + rep.bad_inner_udp + rep.bad_inner_icmp
    ));
    p.captures
        .push((format!("udp {vxlan_port}, offload on"), rep));
    phases.push(p);

    // The daemon turns it off again when it (re)starts on an existing device.
    let mut p = Phase::new("daemon-restart", format!("restart flanneld on {ka}"));
    c.restart_flanneld(ka)?;
    let st = c.tx_checksum_ip_generic(ka, &dev);
    p.expect(
        format!("{ka}: {dev} has tx-checksum-ip-generic off again after the restart"),
        matches!(st, Ok(Some(false))),
        format!("{st:?}"),
    );
    p.expect_doctor(c, ka, "no FAIL tx-checksum", |r| {
        !r.has(Level::Fail, "tx-checksum")
    });
    let deadline = Instant::now() + opts.converge;
    let (ok, total) = loop {
        let mut scratch = Phase::default();
        let r = clusterip_probes(c, &mut scratch, &clients[1..], 2);
        if r.0 == r.1 || Instant::now() >= deadline || sys::interrupted() {
            p.probes = scratch.probes;
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    p.expect(
        format!("ClusterIP probes from {ka} succeed after the restart"),
        ok == total && total > 0,
        format!("{ok}/{total} ok"),
    );
    phases.push(p);
    Ok(phases)
}
