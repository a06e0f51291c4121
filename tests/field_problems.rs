//! Field problems P2 and P3 (`field-problems.md`) as netns-harness scenarios, end to end with
//! our flanneld: the same code as `netns-harness scenario <name>`.
//!
//! * P2: a ClusterIP emulated like kube-proxy before 1.19 (DNAT, mark 0x4000, MASQUERADE
//!   `--random-fully`) across the overlay from a pod and from the host, userspace and kernel
//!   nodes; tshark verifies every VXLAN frame's outer and inner checksums; `flannel.1` has
//!   tx-checksum-ip-generic off, doctor names it when an admin turns it on, a restart turns
//!   it off again.
//! * P3: ip_forward=0, a FORWARD REJECT rule, security software and firewalld chains, UDP
//!   8472 dropped between nodes (fixed by moving `Backend.Port` to 8475 and restarting every
//!   flanneld; then 8475 dropped too, fixed by switching to host-gw): each cause first fails
//!   the matrix for exactly the affected pairs and is named by `flanneld doctor` on the
//!   affected node, then passes after the fix.
//! * Issue #17: the same drop on one node with `--host-gw-fallback` on every flanneld heals
//!   on direct routes without a config change and returns to VXLAN when lifted, also when
//!   the blocked node is a kernel-ref (upstream) node.
//!
//! Doctor assertions are reported UNVERIFIED (and tolerated) only while `flanneld doctor`
//! says it is not implemented; with a doctor they are enforced.
//!
//! Privileged: run as root (`CI=true` makes them mandatory). Needs the workspace binaries
//! (`cargo build --workspace --bins`, as `scripts/test` does).

mod netns;

use netns_harness::check::ProbeKind;
use netns_harness::scenario::{self, Outcome, Scenario, ScenarioOpts, ScenarioReport};
use netns_harness::{privileged_test_guard, Level};

use netns::serial;

fn opts() -> ScenarioOpts {
    let s = netns::spec(&[], 0);
    ScenarioOpts {
        flanneld: s.flanneld,
        harness_bin: s.harness_bin,
        flanneld_args: s.flanneld_args,
        ..ScenarioOpts::default()
    }
}

/// Every assertion of the report holds; unverified ones only because doctor is missing.
fn assert_report(r: &ScenarioReport) {
    println!("{r}");
    assert!(r.passed(), "scenario {} failed:\n{r}", r.scenario);
    let doctor_missing = r
        .phases
        .iter()
        .flat_map(|p| &p.doctor)
        .any(|d| d.not_implemented());
    for (phase, a) in r.unverified() {
        assert!(
            doctor_missing && a.what.starts_with("doctor on "),
            "[{phase}] {} is unverified although doctor runs",
            a.what
        );
        eprintln!(
            "UNVERIFIED (flanneld doctor not implemented) [{phase}] {}",
            a.what
        );
    }
}

/// The phase must exist and hold an assertion about `what` with this outcome (or Unverified
/// when doctor is missing).
fn assertion(r: &ScenarioReport, phase: &str, what: &str) -> Outcome {
    let p = r
        .phase(phase)
        .unwrap_or_else(|| panic!("{}: no phase {phase}:\n{r}", r.scenario));
    p.assertions
        .iter()
        .find(|a| a.what.contains(what))
        .unwrap_or_else(|| panic!("{}: no assertion {what:?} in {phase}:\n{r}", r.scenario))
        .outcome
}

/// The broken phase's matrix fails, the others pass (checked on the data, not only through
/// the scenario's own assertions).
fn assert_fails_then_passes(r: &ScenarioReport) {
    for (phase, pass) in [("baseline", true), ("broken", false), ("fixed", true)] {
        let m = r
            .phase(phase)
            .and_then(|p| p.matrix.as_ref())
            .unwrap_or_else(|| panic!("{}: no matrix in {phase}", r.scenario));
        assert_eq!(m.all_pass(), pass, "{} {phase}:\n{m}", r.scenario);
    }
}

#[test]
fn p2_cluster_ip_through_masquerade_keeps_checksums_valid() {
    if !privileged_test_guard("p2_cluster_ip_through_masquerade_keeps_checksums_valid") {
        return;
    }
    let _g = serial();
    let r = scenario::run(Scenario::P2ClusterIp, &opts()).expect("scenario p2-cluster-ip");
    assert_report(&r);
    let p = r.phase("cluster-ip").expect("cluster-ip phase");
    // Pod and host sources on a userspace and a kernel node, both services.
    for from in ["n1p1", "n1", "n3p1", "n3"] {
        for vip in ["10.96.0.10:8080", "10.96.0.11:8080"] {
            let n = p
                .probes
                .iter()
                .filter(|x| x.from == from && x.target == vip && x.outcome.ok)
                .count();
            assert!(n >= 2, "{from} -> {vip}: {n} successful probes\n{r}");
        }
    }
    assert!(p.probes.iter().all(|x| x.outcome.kind == ProbeKind::Tcp));
    let (_, cap) = p.captures.first().expect("capture");
    assert!(cap.all_checksums_ok() && cap.inner_tcp > 0, "{cap}");
    assert_eq!(
        assertion(
            &r,
            "baseline",
            "n3: flannel.1 has tx-checksum-ip-generic off"
        ),
        Outcome::Pass
    );
    assert_eq!(
        assertion(&r, "daemon-restart", "off again after the restart"),
        Outcome::Pass
    );
    // The field condition is really there (the kernel node's VXLAN packets are NATed again),
    // and our userspace plane is immune to it by construction.
    assert_eq!(
        assertion(
            &r,
            "cluster-ip",
            "(kernel): encapsulated VXLAN packets carry mark 0x4000"
        ),
        Outcome::Pass
    );
    assert_eq!(
        assertion(
            &r,
            "cluster-ip",
            "(userspace): no VXLAN packet carries mark 0x4000"
        ),
        Outcome::Pass
    );
    assert_ne!(
        assertion(&r, "offload-on", "FAIL tx-checksum naming flannel.1"),
        Outcome::Fail
    );
    if let Some(d) = r
        .phase("offload-on")
        .and_then(|p| p.doctor_on("n3"))
        .filter(|d| !d.not_implemented())
    {
        assert!(d.report.has(Level::Fail, "tx-checksum"), "{d}");
        assert_eq!(d.status, Some(1), "{d}");
    }
}

#[test]
fn p3_checklist_causes_fail_are_named_and_fixed() {
    if !privileged_test_guard("p3_checklist_causes_fail_are_named_and_fixed") {
        return;
    }
    let _g = serial();
    let reports =
        scenario::run_many(&Scenario::P3, &opts(), |_| {}).expect("P3 scenarios on one cluster");
    assert_eq!(reports.len(), 5);
    for r in &reports {
        assert_report(r);
    }
    let by = |s: Scenario| {
        reports
            .iter()
            .find(|r| r.scenario == s)
            .unwrap_or_else(|| panic!("no report for {s}"))
    };

    // 1. ip_forward=0 on n1 (kernel).
    let r = by(Scenario::P3IpForward);
    assert_fails_then_passes(r);
    let m = r
        .phase("broken")
        .and_then(|p| p.matrix.as_ref())
        .expect("matrix");
    assert!(!m.cell("n1p1", "n2p1").expect("cell").ok(), "{m}");
    assert!(m.cell("n2p1", "n3p1").expect("cell").ok(), "{m}");
    assert!(
        m.cell("n1", "n2p1").expect("cell").ok(),
        "own host traffic: {m}"
    );
    assert_ne!(assertion(r, "broken", "FAIL ip-forward"), Outcome::Fail);

    // 3. FORWARD REJECT on n2 (userspace).
    let r = by(Scenario::P3ForwardReject);
    assert_fails_then_passes(r);
    let m = r
        .phase("broken")
        .and_then(|p| p.matrix.as_ref())
        .expect("matrix");
    assert!(!m.cell("n3p1", "n2p1").expect("cell").ok(), "{m}");
    assert!(m.cell("n3p1", "n1p1").expect("cell").ok(), "{m}");
    assert_ne!(assertion(r, "broken", "FAIL forward-reject"), Outcome::Fail);

    // 4. Security software and firewalld chains: warnings, traffic unaffected.
    let r = by(Scenario::P3SecuritySoftware);
    assert!(
        r.phase("present")
            .and_then(|p| p.matrix.as_ref())
            .is_some_and(|m| m.all_pass()),
        "{r}"
    );
    assert_ne!(
        assertion(r, "present", "WARN security-software naming kesl"),
        Outcome::Fail
    );
    assert_ne!(
        assertion(r, "present", "WARN host-firewall naming FORWARD_IN_ZONES"),
        Outcome::Fail
    );

    // 2. UDP 8472 dropped between nodes, then Backend.Port 8475.
    let r = by(Scenario::P3VxlanPort);
    assert_fails_then_passes(r);
    let m = r
        .phase("broken")
        .and_then(|p| p.matrix.as_ref())
        .expect("matrix");
    assert_eq!(m.counts().0, 0, "nothing crosses nodes: {m}");
    for node in ["n1", "n3"] {
        assert_eq!(
            assertion(
                r,
                "fixed",
                &format!("{node}: flannel.1 was reconfigured to dstport 8475")
            ),
            Outcome::Pass
        );
    }
    assert_eq!(
        assertion(r, "fixed", "n2: flanneld listens on UDP 8475"),
        Outcome::Pass
    );
    let fixed = r.phase("fixed").expect("fixed");
    let on_new = &fixed.captures[0].1;
    let on_old = &fixed.captures[1].1;
    assert!(on_new.all_checksums_ok(), "{on_new}");
    assert_eq!(on_old.frames, 0, "{on_old}");
    assert_ne!(
        assertion(r, "broken", "FAIL peer-reachable naming n2 at 198.18.0.2"),
        Outcome::Fail
    );

    // 2 again, the report's other fix: the (moved) port dropped too, then host-gw.
    let r = by(Scenario::P3VxlanHostGw);
    assert_fails_then_passes(r);
    let fixed = r.phase("fixed").expect("fixed");
    let (vxlan, plain) = (&fixed.captures[0].1, &fixed.captures[1].1);
    assert_eq!(vxlan.frames, 0, "{vxlan}");
    assert!(plain.frames > 0 && plain.vxlan_frames == 0, "{plain}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(
            assertion(
                r,
                "fixed",
                &format!("{node}: a host-gw route to every other node")
            ),
            Outcome::Pass
        );
    }
}

/// Issue #11's node set-up checks, each broken on a live cluster and repaired: doctor names
/// exactly that check (and nothing else) while it is broken.
#[test]
fn node_setup_scenario() {
    if !privileged_test_guard("node_setup_scenario") {
        return;
    }
    let _g = serial();
    let reports = scenario::run_many(&[Scenario::NodeSetup], &opts(), |_| {}).expect("node-setup");
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_report(r);
    for phase in [
        "cni-plugin",
        "cni-config",
        "br-netfilter",
        "vxlan-port",
        "mtu",
    ] {
        let p = r.phase(phase).unwrap_or_else(|| panic!("no phase {phase}"));
        assert!(
            p.assertions.iter().any(|a| a.what.contains("FAIL ")),
            "{phase}: no FAIL expectation"
        );
    }
}

/// The matrices of a fallback scenario: baseline passes, broken fails, fallback and lifted
/// pass (on the data, not only through the scenario's own assertions). `upstream_host`: the
/// host cells of that (upstream, blocked) node are not judged in the fallback phase.
fn assert_fallback_matrices(r: &ScenarioReport, upstream_host: Option<&str>) {
    for (phase, pass) in [
        ("baseline", true),
        ("broken", false),
        ("fallback", true),
        ("lifted", true),
    ] {
        let m = r
            .phase(phase)
            .and_then(|p| p.matrix.as_ref())
            .unwrap_or_else(|| panic!("{}: no matrix in {phase}", r.scenario));
        let judged = m
            .cells
            .iter()
            .filter(|c| phase != "fallback" || upstream_host != Some(c.src.as_str()));
        let all = judged.clone().all(|c| c.ok());
        assert_eq!(all, pass, "{} {phase}:\n{m}", r.scenario);
        assert!(judged.count() > 0);
    }
}

/// Issue #17: UDP 8472 dropped on one node of one layer-2 segment, every flanneld with
/// `--host-gw-fallback` (kernel n1, n3; userspace n2, the blocked one): its pairs fail,
/// heal on direct routes with no config change, and return to VXLAN when the drop is lifted.
#[test]
fn p3_host_gw_fallback_heals_and_returns() {
    if !privileged_test_guard("p3_host_gw_fallback_heals_and_returns") {
        return;
    }
    let _g = serial();
    let r = scenario::run(Scenario::P3Fallback, &opts()).expect("scenario p3-fallback");
    assert_report(&r);
    assert_fallback_matrices(&r, None);
    let p = r.phase("fallback").expect("fallback");
    let to = &p.captures[0].1;
    assert_eq!(
        to.frames, 0,
        "pod traffic over VXLAN to n2 while direct: {to}"
    );
    let probes = &p.captures[2].1;
    assert!(probes.frames > 0, "no VXLAN probes while direct: {probes}");
    for node in ["n1", "n3"] {
        assert_eq!(
            assertion(&r, "fallback", &format!("{node}: one log line names n2")),
            Outcome::Pass
        );
    }
}

/// Issue #17, mixed: the blocked node is a kernel-ref (upstream, no fallback) node; the
/// flannel-rs nodes fall back, its replies still come over VXLAN (a one-way block), and the
/// cluster ends no worse than before: every pair passes, then VXLAN again once lifted.
#[test]
fn p3_host_gw_fallback_with_an_upstream_peer() {
    if !privileged_test_guard("p3_host_gw_fallback_with_an_upstream_peer") {
        return;
    }
    let _g = serial();
    let r = scenario::run(Scenario::P3FallbackMixed, &opts()).expect("scenario p3-fallback-mixed");
    assert_report(&r);
    assert_fallback_matrices(&r, Some("n1"));
    let from = &r.phase("fallback").expect("fallback").captures[1].1;
    assert!(from.frames > 0, "the upstream node's replies: {from}");
}
