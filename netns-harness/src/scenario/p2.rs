//! Field problem P2: ClusterIP traffic (kube-proxy's DNAT, mark and MASQUERADE --random-fully) across the overlay, checksums verified on the wire.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::check::{Family, ProbeOutcome};
use crate::cluster::{Cluster, NodeKind};
use crate::doctor::{DoctorReport, Level};
use crate::proto;
use crate::sys;

use super::{
    capture_during, expect_matrix_pass, no_fail, NamedProbe, Phase, ScenarioOpts, BIG_PROBE,
    CLUSTER_IP, CLUSTER_IP6, CLUSTER_IP6_MIXED, CLUSTER_IP_MIXED, SERVICE_PORT,
};

/// The same-kind and the mixed-kind ClusterIP of `family`.
fn vips(family: Family) -> [IpAddr; 2] {
    match family {
        Family::V4 => [CLUSTER_IP.into(), CLUSTER_IP_MIXED.into()],
        Family::V6 => [CLUSTER_IP6.into(), CLUSTER_IP6_MIXED.into()],
    }
}

/// The run's families, IPv4 first.
fn families(c: &Cluster) -> Vec<Family> {
    let f = c.ip_family();
    [(f.has_v4(), Family::V4), (f.has_v6(), Family::V6)]
        .into_iter()
        .filter_map(|(on, fam)| on.then_some(fam))
        .collect()
}

/// The kernel vxlan device of `family`: `flannel.<VNI>` or `flannel-v6.<VNI>`.
fn device(family: Family, vni: u32) -> String {
    match family {
        Family::V4 => format!("flannel.{vni}"),
        Family::V6 => format!("flannel-v6.{vni}"),
    }
}

/// doctor's check of `family`'s device offload: `tx-checksum`, or `tx-checksum-v6` where
/// doctor inspects IPv6 devices.
fn tx_check_id(family: Family) -> &'static str {
    match family {
        Family::V4 => "tx-checksum",
        Family::V6 => "tx-checksum-v6",
    }
}

/// An expectation on doctor run `i` about `family`'s device: asserted when doctor reports
/// that family's `tx-checksum` check at all, else recorded as a note (a doctor without IPv6
/// device checks says nothing about `flannel-v6.<VNI>`).
fn expect_tx_doctor(
    p: &mut Phase,
    i: Option<usize>,
    family: Family,
    what: &str,
    pred: impl Fn(&DoctorReport) -> bool,
) {
    let Some(i) = i else { return };
    let id = tx_check_id(family);
    let run = &p.doctor[i];
    if family == Family::V4 || run.not_implemented() || run.report.checks.iter().any(|c| c.id == id)
    {
        p.expect_on_doctor(i, what, pred);
    } else {
        let node = run.node.clone();
        p.note(format!(
            "doctor on {node} has no {id} check (it does not inspect IPv6 devices): \"{what}\" not asserted"
        ));
    }
}

/// Expects `node`'s `dev` to show `tx-checksum-ip-generic` `on` (`state` says how, for the
/// assertion's text).
fn expect_offload(p: &mut Phase, c: &Cluster, node: &str, dev: &str, on: bool, state: &str) {
    let st = c.tx_checksum_ip_generic(node, dev);
    p.expect(
        format!("{node}: {dev} {state}"),
        matches!(st, Ok(Some(x)) if x == on),
        format!("{st:?}"),
    );
}

/// Expects doctor run `i` to have no FAIL of any family's `tx-checksum` check.
fn expect_no_tx_fail(p: &mut Phase, i: Option<usize>, fams: &[Family]) {
    for &f in fams {
        let id = tx_check_id(f);
        expect_tx_doctor(p, i, f, &format!("no FAIL {id}"), |r| {
            !r.has(Level::Fail, id)
        });
    }
}

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
            for vip in families(c).into_iter().flat_map(vips) {
                for round in 0..rounds {
                    let bytes = if round % 2 == 0 { 0 } else { BIG_PROBE };
                    let outcome = c.probe_tcp_bytes(from, vip, SERVICE_PORT, bytes);
                    total += 1;
                    ok += usize::from(outcome.ok);
                    phase.probes.push(NamedProbe {
                        from: from.to_string(),
                        target: std::net::SocketAddr::new(vip, SERVICE_PORT).to_string(),
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
    let vni = c.net_conf()?.vni;
    let fams = families(c);
    let has_v6 = fams.contains(&Family::V6);
    let devs: Vec<(Family, String)> = fams.iter().map(|&f| (f, device(f, vni))).collect();
    let dev_list = devs
        .iter()
        .map(|(_, d)| d.as_str())
        .collect::<Vec<_>>()
        .join(" and ");
    let mut phases = Vec::new();

    // Baseline: the overlay works and the daemon turned offload off on every kernel device.
    let mut p = Phase::new(
        "baseline",
        format!("cluster up; tx checksum offload state of the kernel nodes' {dev_list}"),
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    for k in [ka, kb] {
        for (_, dev) in &devs {
            let state = "has tx-checksum-ip-generic off (turned off by our daemon)";
            expect_offload(&mut p, c, k, dev, false, state);
        }
    }
    p.expect_doctor(c, ua, "no FAIL at all on a healthy node", no_fail);
    // A doctor without IPv6 checks counts the daemon's own flannel-v6.<VNI> as a competing
    // VXLAN device (FAIL vxlan-port naming it): that one FAIL is noted, not held against the
    // node; any other FAIL is.
    let own6 = device(Family::V6, vni);
    let own6_dev = format!("vxlan device {own6} ");
    let own6_only = |r: &DoctorReport| {
        r.checks
            .iter()
            .filter(|x| x.level == Level::Fail)
            .all(|x| x.id == "vxlan-port" && x.message.contains(&own6_dev))
    };
    let i = if has_v6 {
        p.expect_doctor(
            c,
            ka,
            &format!("no FAIL on a healthy node (but for vxlan-port counting our own {own6})"),
            own6_only,
        )
    } else {
        p.expect_doctor(c, ka, "no FAIL at all on a healthy node", no_fail)
    };
    if let Some(run) = i.map(|i| &p.doctor[i]) {
        if run
            .report
            .has_mentioning(Level::Fail, "vxlan-port", &own6_dev)
        {
            let node = run.node.clone();
            p.note(format!(
                "doctor on {node} fails vxlan-port for our own {own6} (a doctor without IPv6 \
                 device checks)"
            ));
        }
    }
    for &f in &fams {
        let id = tx_check_id(f);
        expect_tx_doctor(&mut p, i, f, &format!("PASS {id}"), |r| {
            r.has(Level::Pass, id)
        });
    }
    phases.push(p);

    // ClusterIP traffic from a pod and from the host, both modes, each family, under capture.
    let vip_list = |k: usize| {
        fams.iter()
            .map(|&f| format!("{}", std::net::SocketAddr::new(vips(f)[k], SERVICE_PORT)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut p = Phase::new(
        "cluster-ip",
        format!(
            "{} on {ua} -> {}:{} (userspace pair), on {ka} -> {} (kernel pair); \
             {} on {ua} -> {kb}'s pod, on {ka} -> {ub}'s pod; \
             DNAT + mark 0x4000 + MASQUERADE --random-fully{}; capture of UDP {vxlan_port} on the underlay",
            vip_list(0),
            pod_of(c, ub)?,
            proto::TCP_PORT,
            pod_of(c, kb)?,
            vip_list(1),
            if has_v6 { " (iptables and ip6tables)" } else { "" },
        ),
    );
    for &f in &fams {
        let [same, mixed] = vips(f);
        c.add_kube_proxy_service(ua, same, SERVICE_PORT, &pod_of(c, ub)?)?;
        c.add_kube_proxy_service(ka, same, SERVICE_PORT, &pod_of(c, kb)?)?;
        c.add_kube_proxy_service(ua, mixed, SERVICE_PORT, &pod_of(c, kb)?)?;
        c.add_kube_proxy_service(ka, mixed, SERVICE_PORT, &pod_of(c, ub)?)?;
        for n in [ua, ka] {
            c.count_marked_vxlan(n, vxlan_port, f)?;
        }
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
    for &f in &fams {
        let fam = f.name();
        for n in [ua, ka] {
            let masq = c.masquerade_packets(n, f).unwrap_or(0);
            p.expect(
                format!(
                    "{n}: the KUBE-POSTROUTING MASQUERADE --random-fully rule matched packets ({fam})"
                ),
                masq > 0,
                format!("{masq} packets"),
            );
        }
        // The double NAT of kubernetes#88986: a kernel vxlan device encapsulates in the same
        // namespace and keeps the skb mark, so the outer UDP packet is masqueraded (with a
        // random source port) too; flannel-v6.<VNI> does the same with the outer IPv6
        // packet. Our userspace data plane sends the outer packet from its own socket, which
        // never carries the service mark.
        let marked = c.marked_vxlan_packets(ka, f).unwrap_or(0);
        p.expect(
            format!(
                "{ka} (kernel): encapsulated VXLAN packets carry mark 0x4000 into \
                 KUBE-POSTROUTING ({fam} outer packets; the emulation reproduces the double NAT \
                 of kubernetes#88986)"
            ),
            marked > 0,
            format!("{marked} marked VXLAN packets"),
        );
        let marked = c.marked_vxlan_packets(ua, f).unwrap_or(u64::MAX);
        p.expect(
            format!(
                "{ua} (userspace): no VXLAN packet carries mark 0x4000 ({fam} outer packets; the \
                 outer packet is never NATed a second time)"
            ),
            marked == 0,
            format!("{marked} marked VXLAN packets"),
        );
    }
    let rep = c.verify_capture(&pcap)?;
    p.expect(
        "tshark: every VXLAN frame's outer IPv4 header and UDP checksums (over IPv6: present and \
         valid) and inner IPv4 header, TCP/UDP/ICMP checksums are valid",
        rep.all_checksums_ok(),
        rep.to_string().replace('\n', "; "),
    );
    p.expect(
        "tshark: the capture holds inner TCP segments (the ClusterIP traffic)",
        rep.inner_tcp > 0,
        format!("{} inner TCP", rep.inner_tcp),
    );
    if has_v6 {
        p.expect(
            "tshark: the capture holds VXLAN over IPv6 carrying inner TCP over IPv6 (the IPv6 \
             ClusterIP traffic), each with a checked outer UDP checksum",
            rep.outer_ip6 > 0 && rep.inner_tcp6 > 0,
            format!(
                "{} VXLAN frames over IPv6, {} inner TCP over IPv6",
                rep.outer_ip6, rep.inner_tcp6
            ),
        );
    }
    p.captures.push((format!("udp {vxlan_port}"), rep));
    for n in [ua, ka] {
        let i = p.run_doctor(c, n);
        expect_no_tx_fail(&mut p, i, &fams);
    }
    phases.push(p);

    // An admin turns offload back on: doctor must name it.
    let mut p = Phase::new(
        "offload-on",
        format!("ethtool -K <dev> tx-checksum-ip-generic on for {dev_list} on {ka}"),
    );
    for (_, dev) in &devs {
        c.exec_ok(ka, &["ethtool", "-K", dev, "tx-checksum-ip-generic", "on"])?;
        let state = "now shows tx-checksum-ip-generic on";
        expect_offload(&mut p, c, ka, dev, true, state);
    }
    let i = p.run_doctor(c, ka);
    for (f, dev) in &devs {
        let id = tx_check_id(*f);
        let d = dev.clone();
        expect_tx_doctor(
            &mut p,
            i,
            *f,
            &format!("FAIL {id} naming {dev}"),
            move |r| r.has_mentioning(Level::Fail, id, &d),
        );
    }
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
    for &f in &fams {
        let fam_probes: Vec<&NamedProbe> = p.probes[before..]
            .iter()
            .filter(|x| {
                x.target
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| Family::of(a.ip()) == f)
            })
            .collect();
        let fam_ok = fam_probes.iter().filter(|x| x.outcome.ok).count();
        let slow = fam_probes
            .iter()
            .filter(|x| probe_ms(&x.outcome).is_some_and(|ms| ms >= SYN_RETRANSMIT_MS))
            .count();
        p.note(format!(
            "with offload on (observed, not asserted): {} ClusterIP probes from {ka} {fam_ok}/{} ok, \
             {slow} of them took >= {SYN_RETRANSMIT_MS} ms (a lost first SYN is retransmitted \
             after 1 s)",
            f.name(),
            fam_probes.len()
        ));
    }
    p.note(format!(
        "with offload on (observed, not asserted): all ClusterIP probes from {ka} {ok}/{total} ok; \
         tshark: {} VXLAN frames ({} over IPv6), {} bad outer UDP checksums, {} bad inner checksums",
        rep.vxlan_frames,
        rep.outer_ip6,
        rep.bad_outer_udp,
        rep.bad_inner_ip + rep.bad_inner_tcp + rep.bad_inner_udp + rep.bad_inner_icmp
    ));
    p.captures
        .push((format!("udp {vxlan_port}, offload on"), rep));
    phases.push(p);

    // The daemon turns it off again when it (re)starts on an existing device.
    let mut p = Phase::new("daemon-restart", format!("restart flanneld on {ka}"));
    c.restart_flanneld(ka)?;
    for (_, dev) in &devs {
        let state = "has tx-checksum-ip-generic off again after the restart";
        expect_offload(&mut p, c, ka, dev, false, state);
    }
    let i = p.run_doctor(c, ka);
    expect_no_tx_fail(&mut p, i, &fams);
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
