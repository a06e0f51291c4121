//! The netns-harness on IPv6 (issue #12 item 4): `--ip-family dual` and `v6` clusters mixing
//! our userspace and kernel data planes with upstream-programmed kernel-ref nodes; the whole
//! connectivity matrix must pass over each family. Privileged: run as root (CI=true makes them
//! mandatory).

mod netns;

use std::time::Duration;

use netns::*;
use netns_harness::scenario::{self, Scenario, ScenarioOpts, ScenarioReport};
use netns_harness::{
    privileged_test_guard, CaptureReport, Family, IpFamily, Level, NodeKind, StoreKind,
};

use NodeKind::{Kernel, KernelRef, Userspace};

/// Every pod-to-pod cell of `family` between the two pods shows all four probes.
fn assert_pair(m: &netns_harness::Matrix, a: &str, b: &str, family: Family) {
    for (s, d) in [(a, b), (b, a)] {
        let cell = m.cell_of(s, d, family).expect("cell");
        assert_eq!(cell.letters(), "ITUD", "{s}->{d} over {}", family.name());
    }
}

#[test]
fn dual_stack_mixed_data_planes_pass_the_matrix_on_both_families() {
    if !privileged_test_guard("dual_stack_mixed_data_planes_pass_the_matrix_on_both_families") {
        return;
    }
    let _g = serial();
    // kube store: Nodes carry podCIDRs of both families, kernel-ref nodes publish the v6
    // annotations.
    let mut s = spec(&[Userspace, Kernel, KernelRef, KernelRef], 1);
    s.ip_family = IpFamily::Dual;
    s.store = StoreKind::Kube;
    let c = netns_harness::Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(10));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    assert_eq!(m.families(), vec![Family::V4, Family::V6]);
    assert!(
        m.family_pass(Family::V4) && m.family_pass(Family::V6),
        "{m}"
    );
    // userspace <-> kernel-ref, kernel <-> kernel-ref, userspace <-> kernel, ref <-> ref.
    for (a, b) in [
        ("n1p1", "n3p1"),
        ("n2p1", "n4p1"),
        ("n1p1", "n2p1"),
        ("n3p1", "n4p1"),
    ] {
        assert_pair(&m, a, b, Family::V4);
        assert_pair(&m, a, b, Family::V6);
    }
    // Both families' cells exist for every pair: 4 pods x 3 peers, plus hosts x 3 pods.
    let v6_cells = m.cells.iter().filter(|c| c.family == Family::V6).count();
    assert_eq!(v6_cells, 4 * 3 + 4 * 3);

    // Pods: an address of each family from the node's leases, default routes of both.
    let n3 = c.node("n3").expect("n3").clone();
    let sub6 = n3.subnet6.expect("n3 IPv6 lease");
    let ip6 = c.pod_ip6("n3p1").expect("pod IPv6");
    assert!(sub6.contains(ip6), "{ip6} not in {sub6}");
    let gw6 = sub6.nth(1).expect("gateway").to_string();
    assert!(sh(&c, "n3p1", &["ip", "-6", "route"]).contains(&format!("default via {gw6}")));

    // kernel-ref n3 programs flannel-v6.1 like upstream: vxlan over the IPv6 underlay
    // address, /128 of its subnet, one neighbour and onlink route per peer.
    let link = sh(&c, "n3", &["ip", "-d", "link", "show", "flannel-v6.1"]);
    assert!(
        link.contains("vxlan id 1 local 2001:db8:18::3 dev eth0"),
        "{link}"
    );
    assert!(
        link.contains("dstport 8472") && link.contains("nolearning"),
        "{link}"
    );
    assert!(
        link.contains(n3.vtep_mac6.as_deref().expect("v6 MAC")),
        "{link}"
    );
    let addr = sh(
        &c,
        "n3",
        &["ip", "-6", "addr", "show", "dev", "flannel-v6.1"],
    );
    assert!(addr.contains(&format!("{}/128", sub6.network())), "{addr}");
    let routes = sh(
        &c,
        "n3",
        &["ip", "-6", "route", "show", "dev", "flannel-v6.1"],
    );
    let neigh = sh(
        &c,
        "n3",
        &["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"],
    );
    let fdb = sh(&c, "n3", &["bridge", "fdb", "show", "dev", "flannel-v6.1"]);
    for peer in ["n1", "n2", "n4"] {
        let p = c.node(peer).expect("peer");
        let s6 = p.subnet6.expect("peer IPv6 lease");
        let gw = s6.network();
        assert!(
            routes.contains(&format!("{s6} via {gw} ")) && routes.contains("onlink"),
            "{peer}: {routes}"
        );
        assert!(neigh.contains(&format!("{gw} lladdr")), "{peer}: {neigh}");
        let under = p.underlay_ip6.expect("peer underlay6").to_string();
        assert!(fdb.contains(&format!("dst {under}")), "{peer}: {fdb}");
    }
    assert!(sh(&c, "n3", &["ip6tables-save"]).contains(
        "-A FLANNEL-FWD -s fd42:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT"
    ));

    // The Nodes carry both pod CIDRs and flannel's IPv6 annotations, for our daemon and for
    // the kernel-ref node alike.
    for node in ["n1", "n3"] {
        let obj = c.kube_node(node).expect("get").expect("Node");
        let cidrs = obj.pointer("/spec/podCIDRs").expect("podCIDRs").to_string();
        assert!(
            cidrs.contains("10.244.") && cidrs.contains("fd42:244:"),
            "{cidrs}"
        );
        let ann = obj.pointer("/metadata/annotations").expect("annotations");
        let i = &node[1..];
        assert_eq!(
            ann["flannel.alpha.coreos.com/public-ipv6"],
            format!("2001:db8:18::{i}"),
            "{ann}"
        );
        assert!(ann["flannel.alpha.coreos.com/backend-v6-data"]
            .as_str()
            .is_some_and(|d| d.contains("VtepMAC")));
    }
}

#[test]
fn ipv6_only_mixed_data_planes_pass_the_matrix() {
    if !privileged_test_guard("ipv6_only_mixed_data_planes_pass_the_matrix") {
        return;
    }
    let _g = serial();
    let mut s = spec(&[Userspace, Kernel, KernelRef], 1);
    s.ip_family = IpFamily::V6;
    let c = netns_harness::Cluster::up(&s).expect("cluster up");
    let m = c.check_until_pass(Duration::from_secs(10));
    println!("{m}");
    assert!(m.all_pass(), "{m}");
    assert_eq!(m.families(), vec![Family::V6]);
    for (a, b) in [("n1p1", "n3p1"), ("n2p1", "n3p1"), ("n1p1", "n2p1")] {
        assert_pair(&m, a, b, Family::V6);
    }
    // IPv6-only leases are keyed 0.0.0.0-0&<v6>-<len>, as flannel names them; no IPv4 lease,
    // no flannel.1 on the kernel-ref node, no IPv4 address in pods.
    let (leases, bad) = c.leases().expect("leases");
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(leases.len(), 3);
    for l in &leases {
        assert!(l.key().starts_with("0.0.0.0-0&fd42:244:"), "{}", l.key());
        assert!(l.vxlan6().is_some(), "{:?}", l.attrs);
    }
    assert!(c.node("n3").expect("n3").subnet.is_none());
    assert!(!run(&c, "n3", &["ip", "link", "show", "flannel.1"]).0);
    let v4 = sh(&c, "n1p1", &["ip", "-4", "addr", "show", "dev", "eth0"]);
    assert!(!v4.contains("inet "), "{v4}");
    // The kernel clamps flannel-v6.1 to the IPv6 headroom; subnet.env says what it got.
    let env = std::fs::read_to_string(c.subnet_env_path("n3")).expect("subnet.env");
    let link = sh(&c, "n3", &["ip", "link", "show", "flannel-v6.1"]);
    let mtu = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_MTU="))
        .expect("FLANNEL_MTU");
    assert!(link.contains(&format!("mtu {mtu} ")), "{env} vs {link}");
}

/// Runs scenario `s` on a dual-stack cluster of this build's binaries; every assertion must
/// pass. Returns the options (for further runs) and the report.
fn passes_on_dual(s: Scenario) -> (ScenarioOpts, ScenarioReport) {
    passes_on(s, IpFamily::Dual)
}

/// [`passes_on_dual`] on clusters of `family`.
fn passes_on(s: Scenario, family: IpFamily) -> (ScenarioOpts, ScenarioReport) {
    let spec = spec(&[], 0);
    let opts = ScenarioOpts {
        flanneld: spec.flanneld,
        harness_bin: spec.harness_bin,
        flanneld_args: spec.flanneld_args,
        ip_family: family,
        ..ScenarioOpts::default()
    };
    let r = scenario::run(s, &opts).unwrap_or_else(|e| panic!("{s} on {family}: {e:#}"));
    println!("{r}");
    assert!(r.passed(), "{r}");
    (opts, r)
}

#[test]
fn p3_forward_reject_breaks_and_heals_both_families_on_dual_stack() {
    if !privileged_test_guard("p3_forward_reject_breaks_and_heals_both_families_on_dual_stack") {
        return;
    }
    let _g = serial();
    let (opts, r) = passes_on_dual(Scenario::P3ForwardReject);
    // The broken phase judged both families: its matrix has IPv6 cells, and the pairs
    // forwarded by the REJECTing node fail over IPv6 as well as IPv4.
    let broken = r
        .phases
        .iter()
        .find(|p| p.name == "broken")
        .expect("broken phase");
    let m = broken.matrix.as_ref().expect("broken matrix");
    assert_eq!(m.families(), vec![Family::V4, Family::V6]);
    for fam in [Family::V4, Family::V6] {
        let failed = m
            .cells
            .iter()
            .filter(|c| c.family == fam && !c.ok())
            .count();
        assert!(
            failed > 0,
            "no {} cell failed while broken:\n{m}",
            fam.name()
        );
    }
    let fixed = r.phases.last().expect("fixed phase");
    let m = fixed.matrix.as_ref().expect("fixed matrix");
    assert!(
        m.family_pass(Family::V4) && m.family_pass(Family::V6),
        "{m}"
    );
    // The two-site NAT topology (IPv4 routers) refuses dual-stack clusters, before it
    // builds anything.
    let mut s = spec(&[Userspace, Kernel], 1);
    s.ip_family = opts.ip_family;
    s.sites = vec![1, 2];
    let err = netns_harness::Cluster::up(&s).expect_err("--sites on dual");
    assert!(
        format!("{err:#}").contains("is not supported with --sites"),
        "{err:#}"
    );
}

/// The node set-up checks on dual stack and IPv6 only: doctor's MTU check probes each family
/// with its own overlay MTU, so a peer's underlay MTU that fits neither names its subnet of
/// each family (dual: `mtu` and `mtu-v6`; IPv6 only: `mtu-v6` with FLANNEL_MTU, which is
/// then flannel-v6.1's).
#[test]
fn node_setup_names_each_familys_mtu_on_dual_stack_and_ipv6_only() {
    if !privileged_test_guard("node_setup_names_each_familys_mtu_on_dual_stack_and_ipv6_only") {
        return;
    }
    let _g = serial();
    for (family, ids) in [
        (IpFamily::Dual, &["mtu", "mtu-v6"][..]),
        (IpFamily::V6, &["mtu-v6"][..]),
    ] {
        let (_, r) = passes_on(Scenario::NodeSetup, family);
        let mtu = r.phase("mtu").expect("mtu phase");
        let doctor = mtu.doctor.last().expect("doctor run in the mtu phase");
        let fails: Vec<&str> = doctor
            .report
            .checks
            .iter()
            .filter(|c| c.level == Level::Fail)
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(fails, ids, "{family}: {doctor}");
        let v6 = doctor
            .report
            .checks
            .iter()
            .find(|c| c.id == "mtu-v6")
            .expect("mtu-v6");
        assert!(
            v6.text()
                .contains("overlay MTU 1430 (1500 bytes on the underlay)"),
            "{doctor}"
        );
        let baseline = r.phase("baseline").expect("baseline phase");
        assert!(
            baseline
                .doctor
                .iter()
                .all(|d| ids.iter().all(|id| d.report.has(Level::Pass, id))),
            "{family}: baseline doctor runs pass every family's MTU check"
        );
    }
}

/// The capture of `phase` labelled `label`.
fn capture<'a>(r: &'a ScenarioReport, phase: &str, label: &str) -> &'a CaptureReport {
    r.phase(phase)
        .and_then(|p| p.captures.iter().find(|(l, _)| l == label))
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("{phase}: no capture {label:?}"))
}

/// `--host-gw-fallback` on dual stack: the drop (iptables and ip6tables) breaks both
/// families' VXLAN to n2; the fallback routes both directly (IPv6 subnet via the IPv6
/// underlay address), the VTEP of each is still probed over VXLAN, and both return.
#[test]
fn p3_fallback_heals_both_families_on_dual_stack() {
    if !privileged_test_guard("p3_fallback_heals_both_families_on_dual_stack") {
        return;
    }
    let _g = serial();
    let (_, r) = passes_on_dual(Scenario::P3Fallback);
    let capture = |phase: &str, label: &str| capture(&r, phase, label);
    let to = capture(
        "fallback",
        "VXLAN to 2001:db8:18::2, not ICMPv6 (must be empty)",
    );
    assert_eq!(to.frames, 0, "{to}");
    let probes = capture("fallback", "VXLAN to 2001:db8:18::2, ICMPv6 probes");
    assert!(
        probes.frames > 0 && probes.outer_ip6 == probes.frames,
        "{probes}"
    );
    let plain = capture("fallback", "net fd42:244::/56");
    assert!(plain.frames > 0 && plain.vxlan_frames == 0, "{plain}");
    let back = capture("lifted", "VXLAN to 2001:db8:18::2, not ICMPv6");
    assert!(back.outer_ip6 > 0 && back.bad_total() == 0, "{back}");
}

/// The mixed fallback on dual stack: the blocked node is upstream flannel (kernel-ref), whose
/// replies keep coming over VXLAN on both families while ours route to it directly.
#[test]
fn p3_fallback_with_an_upstream_peer_on_dual_stack() {
    if !privileged_test_guard("p3_fallback_with_an_upstream_peer_on_dual_stack") {
        return;
    }
    let _g = serial();
    let (_, r) = passes_on_dual(Scenario::P3FallbackMixed);
    let from = capture(&r, "fallback", "VXLAN from 2001:db8:18::1, not ICMPv6");
    assert!(from.frames > 0 && from.outer_ip6 == from.frames, "{from}");
}

#[test]
fn p2_cluster_ip_passes_every_phase_on_dual_stack() {
    if !privileged_test_guard("p2_cluster_ip_passes_every_phase_on_dual_stack") {
        return;
    }
    let _g = serial();
    let (_, r) = passes_on_dual(Scenario::P2ClusterIp);
    let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["baseline", "cluster-ip", "offload-on", "daemon-restart"]
    );
    // Both families' ClusterIPs were probed, from a pod and from the host, and all answered.
    let ip = r.phase("cluster-ip").expect("cluster-ip phase");
    for vip in [
        "10.96.0.10:8080",
        "10.96.0.11:8080",
        "[fd42:96::10]:8080",
        "[fd42:96::11]:8080",
    ] {
        let hits: Vec<_> = ip.probes.iter().filter(|p| p.target == vip).collect();
        assert!(
            hits.iter().any(|p| p.from.contains('p')) && hits.iter().any(|p| !p.from.contains('p')),
            "{vip}: pod and host probes"
        );
        assert!(hits.iter().all(|p| p.outcome.ok), "{vip}");
    }
    // tshark saw VXLAN over IPv6 carrying the IPv6 ClusterIP traffic, every checksum valid
    // (over IPv6 the outer UDP checksum must be present).
    let (_, cap) = &ip.captures[0];
    assert!(
        cap.all_checksums_ok() && cap.outer_ip6 > 0 && cap.inner_tcp6 > 0,
        "{cap}"
    );
    // The kernel node's IPv6 device was judged in every phase that looks at offload.
    for phase in ["baseline", "offload-on", "daemon-restart"] {
        let p = r.phase(phase).expect(phase);
        assert!(
            p.assertions
                .iter()
                .any(|a| a.what.contains("flannel-v6.1 ")),
            "{phase}: no assertion about flannel-v6.1"
        );
    }
}
