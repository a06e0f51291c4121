//! Field-problem scenarios (field problems P2 and P3 of `field-problems.md`): each builds a
//! small cluster (or runs on one built for it), breaks it the way the field reports describe,
//! checks that the connectivity matrix fails for exactly the affected pairs and that
//! `flanneld doctor` names the cause on the affected node, applies the report's fix and checks
//! that everything passes again.
//!
//! The same code serves the CLI (`netns-harness scenario <name>`) and the tests: every run
//! returns a [`ScenarioReport`] of phases, each with its matrix, probes, capture report, doctor
//! outputs and [`Assertion`]s. An assertion about doctor output is [`Outcome::Unverified`] (not
//! passed) while the flanneld under test has no doctor yet (exit 2, "not implemented").
//!
//! Everything stays inside the run's namespaces: the emulated ClusterIPs (10.96.0.10 and
//! 10.96.0.11, on dual-stack also fd42:96::10 and fd42:96::11) exist only in one node's nat
//! table and host route, the "security group" is an
//! iptables rule in the node namespaces, the "security software" is a copy of `sleep` in the
//! run directory stopped by PID.
//!
//! This module is the framework (scenarios, phases, assertions, reports, the shared matrix and
//! doctor expectations); the scenarios live in `p2`, `p3` (the P3 causes and the
//! baseline/break/fix runner), `fallback` (issue #17, on that runner with an extra phase) and
//! `node_setup` (issue #11: five break/repair pairs, one phase each, no matrix in between). The kube-proxy emulation they use is cluster code
//! (`cluster::kubeproxy`).

mod fallback;
mod node_setup;
mod p2;
mod p3;

use fallback::p3_fallback;
use node_setup::node_setup;
use p2::p2_cluster_ip;
use p3::{p3_forward_reject, p3_ip_forward, p3_security_software, p3_vxlan_hostgw, p3_vxlan_port};

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::capture::{CaptureOpts, CaptureReport};
use crate::check::{Cell, Family, Matrix, ProbeOutcome, SourceKind};
pub use crate::cluster::{parse_ethtool_feature, KUBE_MARK};
use crate::cluster::{Cluster, ClusterSpec, IpFamily, NodeKind, DEFAULT_BASE_DIR};
use crate::doctor::{DoctorReport, DoctorRun, Level};
use crate::store::StoreKind;
use crate::sys;

/// The emulated ClusterIP of the same-kind service (field problem P2).
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The emulated ClusterIP of the mixed-kind service.
pub const CLUSTER_IP_MIXED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The IPv6 twin of [`CLUSTER_IP`] (dual-stack runs; a ULA range, only inside the nodes).
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x96, 0, 0, 0, 0, 0, 0x10);
/// The IPv6 twin of [`CLUSTER_IP_MIXED`].
pub const CLUSTER_IP6_MIXED: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x96, 0, 0, 0, 0, 0, 0x11);
/// The service port of the emulated ClusterIPs (the backends listen on the responders' TCP port).
pub const SERVICE_PORT: u16 = 8080;
/// flanneld flags of the fallback scenarios: probes every 6 s (fallback after 3 misses,
/// 12-18 s after the drop: the broken matrix, ~7 s, is measured before), a 5 s damping
/// window instead of 60 s, /metrics on the nodes' loopback.
pub const FALLBACK_ARGS: [&str; 4] = [
    "--host-gw-fallback",
    "--host-gw-fallback-damping=5",
    "--peer-probe-interval=6",
    "--metrics-port=9102",
];
/// The metrics port of [`FALLBACK_ARGS`].
const FALLBACK_METRICS_PORT: u16 = 9102;
/// The port the P3 "VXLAN blocked" scenario moves the backend to.
pub const MOVED_PORT: u16 = 8475;
/// Request size of the multi-segment TCP probes.
const BIG_PROBE: usize = 4000;

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// P2: ClusterIP (DNAT + MASQUERADE --random-fully, mark 0x4000) across the overlay in
    /// userspace and kernel mode, every VXLAN frame's checksums verified with tshark, and
    /// tx checksum offload on `flannel.1` (off by the daemon, named by doctor when on); with
    /// IPv6 in the run the same for IPv6 ClusterIPs (ip6tables) and `flannel-v6.1`.
    P2ClusterIp,
    /// P3 cause 1: `net.ipv4.ip_forward=0` on one node.
    P3IpForward,
    /// P3 cause 2: UDP 8472 dropped between nodes; fixed by moving `Backend.Port`.
    P3VxlanPort,
    /// P3 cause 3: a REJECT rule ahead of the accept rules in FORWARD.
    P3ForwardReject,
    /// P3 cause 4: security software (a process named `kesl`) and host firewall chains.
    P3SecuritySoftware,
    /// P3 cause 2, the report's other fix: VXLAN blocked between nodes that share layer 2;
    /// fixed by switching the backend to host-gw.
    P3VxlanHostGw,
    /// Issue #11: the node set-up around flanneld that doctor checks: the CNI plugins and
    /// config (the node's own directories in the run directory), br_netfilter's sysctl, a
    /// foreign vxlan device on the VXLAN port, an underlay MTU below overlay MTU + 50.
    NodeSetup,
    /// Issue #17: the VXLAN port dropped on one node of one layer-2 segment, every flanneld
    /// with `--host-gw-fallback`: the affected pairs fail, heal on direct routes within the
    /// probe window without any config change, and return to VXLAN when the drop is lifted.
    P3Fallback,
    /// Issue #17, mixed: the node whose VXLAN port is dropped is a kernel-ref node (upstream
    /// flannel, no fallback); the flannel-rs nodes fall back, its replies still come over
    /// VXLAN.
    P3FallbackMixed,
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 9] = [
        Scenario::P2ClusterIp,
        Scenario::P3IpForward,
        Scenario::P3ForwardReject,
        Scenario::P3SecuritySoftware,
        Scenario::P3VxlanPort,
        Scenario::P3VxlanHostGw,
        Scenario::NodeSetup,
        Scenario::P3Fallback,
        Scenario::P3FallbackMixed,
    ];
    /// The P3 causes in the order they share one cluster: the port move and the switch to
    /// host-gw last (they restart every daemon and leave the cluster on the new port, then on
    /// host-gw).
    pub const P3: [Scenario; 5] = [
        Scenario::P3IpForward,
        Scenario::P3ForwardReject,
        Scenario::P3SecuritySoftware,
        Scenario::P3VxlanPort,
        Scenario::P3VxlanHostGw,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::P2ClusterIp => "p2-cluster-ip",
            Scenario::P3IpForward => "p3-ip-forward",
            Scenario::P3VxlanPort => "p3-vxlan-port",
            Scenario::P3ForwardReject => "p3-forward-reject",
            Scenario::P3SecuritySoftware => "p3-security-software",
            Scenario::P3VxlanHostGw => "p3-vxlan-hostgw",
            Scenario::NodeSetup => "node-setup",
            Scenario::P3Fallback => "p3-fallback",
            Scenario::P3FallbackMixed => "p3-fallback-mixed",
        }
    }

    /// One line saying what the scenario shows.
    pub fn about(self) -> &'static str {
        match self {
            Scenario::P2ClusterIp => {
                "ClusterIP via DNAT + MASQUERADE --random-fully (mark 0x4000) across the overlay, \
                 userspace and kernel; tshark verifies every VXLAN frame; tx-checksum offload on \
                 flannel.1 (and flannel-v6.1) is off and doctor names it when turned on"
            }
            Scenario::P3IpForward => {
                "net.ipv4.ip_forward=0 on one node breaks its forwarded pairs; doctor FAIL \
                 ip-forward; sysctl=1 fixes it"
            }
            Scenario::P3VxlanPort => {
                "UDP 8472 dropped between nodes breaks every cross-node pair; doctor FAIL \
                 peer-reachable; Backend.Port 8475 + restarting every flanneld fixes it"
            }
            Scenario::P3ForwardReject => {
                "FORWARD REJECT --reject-with icmp-host-prohibited ahead of the accept rules on \
                 one node; doctor FAIL forward-reject; deleting the rule fixes it"
            }
            Scenario::P3SecuritySoftware => {
                "a process named kesl and a firewalld chain FORWARD_IN_ZONES; doctor WARN \
                 security-software and WARN host-firewall; both gone after stopping/deleting"
            }
            Scenario::P3VxlanHostGw => {
                "the VXLAN port dropped between nodes on one layer-2 segment; doctor FAIL \
                 peer-reachable; Backend.Type host-gw + restarting every flanneld fixes it \
                 without any UDP"
            }
            Scenario::P3Fallback => {
                "the VXLAN port dropped on one node (one layer-2 segment), --host-gw-fallback on \
                 every flanneld: its pairs fail, heal on direct routes without a config change, \
                 and go back to VXLAN when the drop is lifted"
            }
            Scenario::P3FallbackMixed => {
                "as p3-fallback, the blocked node being a kernel-ref (upstream) node: the \
                 flannel-rs nodes route to it directly, its replies still come over VXLAN"
            }
            Scenario::NodeSetup => {
                "portmap missing, a calico conflist sorting first, bridge-nf-call-iptables=0, a \
                 second vxlan device on UDP 8472, a peer's underlay MTU 1400: doctor FAIL \
                 cni-plugin, cni-config, br-netfilter, vxlan-port, mtu in turn; each repaired"
            }
        }
    }

    /// Scenarios with the same shape can share one cluster.
    fn shape(self) -> u8 {
        match self {
            Scenario::P2ClusterIp => 2,
            Scenario::NodeSetup => 4,
            Scenario::P3Fallback => 5,
            Scenario::P3FallbackMixed => 6,
            _ => 3,
        }
    }

    /// The cluster this scenario is written for: P2 has two userspace and two kernel nodes
    /// with `--ip-masq` (n1 → n2 userspace, n3 → n4 kernel); the P3 causes run on a kernel,
    /// a userspace and a kernel node. One pod per node.
    pub fn spec(self, opts: &ScenarioOpts) -> ClusterSpec {
        use NodeKind::{Kernel, KernelRef, Userspace};
        let (kinds, masq): (&[NodeKind], bool) = match self.shape() {
            2 => (&[Userspace, Userspace, Kernel, Kernel], true),
            4 => (&[Userspace, Kernel], false),
            6 => (&[KernelRef, Userspace, Kernel], false),
            _ => (&[Kernel, Userspace, Kernel], false),
        };
        let mut s = ClusterSpec::new(kinds, 1);
        s.ip_masq = masq;
        s.flanneld = opts.flanneld.clone();
        s.harness_bin = opts.harness_bin.clone();
        s.flanneld_args = opts.flanneld_args.clone();
        if matches!(self, Scenario::P3Fallback | Scenario::P3FallbackMixed) {
            s.flanneld_args
                .extend(FALLBACK_ARGS.iter().map(|a| a.to_string()));
            // As kube-flannel.yml runs it: flanneld masquerades, so the CNI bridge does not
            // (FLANNEL_IPMASQ=true), and pod-to-pod traffic keeps the pod's address. Without
            // it the bridge plugin masquerades pod traffic to the node's VTEP address, which
            // is host traffic as far as the fallback is concerned.
            s.ip_masq = true;
        }
        s.base_dir = opts.base_dir.clone();
        s.store = opts.store;
        s.etcd_bin = opts.etcd_bin.clone();
        s.apiserver_bin = opts.apiserver_bin.clone();
        s.underlay_tx_offload = opts.link_offloads && !self.needs_real_wire();
        s.ip_family = opts.ip_family;
        s
    }

    /// The scenario verifies every checksum on the underlay with tshark, which needs
    /// `--link-offloads off` (finished checksums, MTU-sized frames): it runs with off
    /// whatever [`ScenarioOpts::link_offloads`] says, and so does a cluster it shares.
    pub fn needs_real_wire(self) -> bool {
        matches!(
            self,
            Scenario::P2ClusterIp
                | Scenario::P3VxlanPort
                | Scenario::P3Fallback
                | Scenario::P3FallbackMixed
        )
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                anyhow!(
                    "unknown scenario {s:?}: {}, p3 (all P3 causes on one cluster) or all",
                    Scenario::ALL.map(Scenario::name).join(", ")
                )
            })
    }
}

/// Parses CLI names: scenario names, `p3` (the five P3 causes) and `all`; a scenario named
/// twice (`p3 p3-vxlan-port`) runs once, at its first place.
pub fn parse_names(names: &[String]) -> Result<Vec<Scenario>> {
    let mut v: Vec<Scenario> = Vec::new();
    for n in names {
        let named = match n.as_str() {
            "all" => Scenario::ALL.to_vec(),
            "p3" => Scenario::P3.to_vec(),
            other => vec![other.parse()?],
        };
        for s in named {
            if !v.contains(&s) {
                v.push(s);
            }
        }
    }
    if v.is_empty() {
        bail!("no scenario named");
    }
    Ok(v)
}

/// How scenarios build their clusters.
#[derive(Debug, Clone)]
pub struct ScenarioOpts {
    /// flanneld binary (None: the usual resolution, see [`ClusterSpec::flanneld`]).
    pub flanneld: Option<PathBuf>,
    /// netns-harness binary for responders and probes.
    pub harness_bin: Option<PathBuf>,
    /// Extra arguments for every flanneld.
    pub flanneld_args: Vec<String>,
    /// Parent of run directories.
    pub base_dir: PathBuf,
    /// Lease store.
    pub store: StoreKind,
    /// etcd binary (etcd store).
    pub etcd_bin: Option<PathBuf>,
    /// test-apiserver binary (kube store).
    pub apiserver_bin: Option<PathBuf>,
    /// How long a fixed cluster may take to pass the matrix again.
    pub converge: Duration,
    /// Underlay veth offloads ([`ClusterSpec::underlay_tx_offload`]; default on).
    pub link_offloads: bool,
    /// The cluster's address families ([`ClusterSpec::ip_family`]; default IPv4). With IPv6
    /// in it every scenario breaks IPv6 the same way and judges both families.
    pub ip_family: IpFamily,
}

impl Default for ScenarioOpts {
    fn default() -> Self {
        ScenarioOpts {
            flanneld: None,
            harness_bin: None,
            flanneld_args: Vec::new(),
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
            store: StoreKind::Dir,
            etcd_bin: None,
            apiserver_bin: None,
            converge: Duration::from_secs(15),
            link_offloads: true,
            ip_family: IpFamily::V4,
        }
    }
}

/// The verdict of one assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Holds.
    Pass,
    /// Does not hold.
    Fail,
    /// Could not be checked: the flanneld under test has no `doctor` yet.
    Unverified,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Unverified => "UNVERIFIED",
        })
    }
}

/// One expectation of a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    /// What is expected.
    pub what: String,
    /// Verdict.
    pub outcome: Outcome,
    /// Evidence (or why it failed).
    pub detail: String,
}

/// A probe outside the matrix (ClusterIP traffic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedProbe {
    /// Source namespace short name (`n1p1`, `n1`).
    pub from: String,
    /// `ip:port` probed.
    pub target: String,
    /// Request size (0: the short line).
    pub bytes: usize,
    /// Result.
    pub outcome: ProbeOutcome,
}

/// One step of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Short name (`baseline`, `broken`, `fixed`, ...).
    pub name: String,
    /// What was done in this phase.
    pub about: String,
    /// The connectivity matrix, if checked.
    pub matrix: Option<Matrix>,
    /// Other probes.
    pub probes: Vec<NamedProbe>,
    /// Underlay captures verified with tshark: (label, report).
    pub captures: Vec<(String, CaptureReport)>,
    /// Doctor runs.
    pub doctor: Vec<DoctorRun>,
    /// Observations that are reported, not asserted.
    pub notes: Vec<String>,
    /// Expectations.
    pub assertions: Vec<Assertion>,
}

impl Phase {
    fn new(name: &str, about: impl Into<String>) -> Phase {
        Phase {
            name: name.into(),
            about: about.into(),
            ..Phase::default()
        }
    }

    /// Records an expectation.
    pub fn expect(&mut self, what: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.assertions.push(Assertion {
            what: what.into(),
            outcome: if ok { Outcome::Pass } else { Outcome::Fail },
            detail: detail.into(),
        });
    }

    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// The doctor run on `node` in this phase (the last one).
    pub fn doctor_on(&self, node: &str) -> Option<&DoctorRun> {
        self.doctor.iter().rev().find(|d| d.node == node)
    }

    /// Runs doctor on `node`, records it and the contract checks (output shape, exit status).
    fn run_doctor(&mut self, c: &Cluster, node: &str) -> Option<usize> {
        match c.doctor(node) {
            Ok(run) => {
                if !run.not_implemented() {
                    let problems = run.report.contract_problems();
                    self.expect(
                        format!("doctor on {node}: output follows the contract"),
                        problems.is_empty(),
                        problems.join("; "),
                    );
                    self.expect(
                        format!("doctor on {node}: exit status 1 with a FAIL line, else 0"),
                        run.status_consistent(),
                        format!("exit {:?}", run.status),
                    );
                }
                self.doctor.push(run);
                Some(self.doctor.len() - 1)
            }
            Err(e) => {
                self.expect(format!("doctor on {node} runs"), false, format!("{e:#}"));
                None
            }
        }
    }

    /// Runs doctor on `node` and records one expectation on its parsed output (Unverified
    /// while doctor is not implemented).
    fn expect_doctor(
        &mut self,
        c: &Cluster,
        node: &str,
        what: &str,
        pred: impl Fn(&DoctorReport) -> bool,
    ) -> Option<usize> {
        let i = self.run_doctor(c, node)?;
        self.expect_on_doctor(i, what, pred);
        Some(i)
    }

    fn expect_on_doctor(&mut self, i: usize, what: &str, pred: impl Fn(&DoctorReport) -> bool) {
        let run = &self.doctor[i];
        let what = format!("doctor on {}: {what}", run.node);
        let a = if run.not_implemented() {
            Assertion {
                what,
                outcome: Outcome::Unverified,
                detail: "flanneld doctor is not implemented in this build".into(),
            }
        } else {
            let ok = pred(&run.report);
            Assertion {
                what,
                outcome: if ok { Outcome::Pass } else { Outcome::Fail },
                detail: if ok {
                    String::new()
                } else {
                    run.stdout.lines().take(40).collect::<Vec<_>>().join(" / ")
                },
            }
        };
        self.assertions.push(a);
    }

    /// Assertions that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Assertion> {
        self.assertions
            .iter()
            .filter(|a| a.outcome == Outcome::Fail)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- phase {}: {}", self.name, self.about)?;
        if let Some(m) = &self.matrix {
            write!(f, "{m}")?;
        }
        for p in &self.probes {
            writeln!(
                f,
                "probe {} -> {}{}: {} {}",
                p.from,
                p.target,
                if p.bytes > 0 {
                    format!(" ({} bytes)", p.bytes)
                } else {
                    String::new()
                },
                if p.outcome.ok { "ok" } else { "FAILED" },
                p.outcome.detail
            )?;
        }
        for (label, r) in &self.captures {
            writeln!(f, "capture {label}:")?;
            for l in r.to_string().lines() {
                writeln!(f, "  {l}")?;
            }
        }
        for d in &self.doctor {
            write!(f, "{d}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        for a in &self.assertions {
            write!(f, "[{}] {}", a.outcome, a.what)?;
            if a.outcome != Outcome::Pass && !a.detail.is_empty() {
                write!(f, ": {}", a.detail)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Everything one scenario did and found.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Which scenario.
    pub scenario: Scenario,
    /// Run prefix of the cluster it ran on.
    pub run: String,
    /// Phases in order.
    pub phases: Vec<Phase>,
    /// Wall time.
    pub elapsed: Duration,
}

impl ScenarioReport {
    /// A phase by name.
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Every assertion with its phase name.
    pub fn assertions(&self) -> impl Iterator<Item = (&str, &Assertion)> {
        self.phases
            .iter()
            .flat_map(|p| p.assertions.iter().map(move |a| (p.name.as_str(), a)))
    }

    /// Failed assertions.
    pub fn failures(&self) -> Vec<(&str, &Assertion)> {
        self.assertions()
            .filter(|(_, a)| a.outcome == Outcome::Fail)
            .collect()
    }

    /// Assertions that could not be verified (doctor not implemented).
    pub fn unverified(&self) -> Vec<(&str, &Assertion)> {
        self.assertions()
            .filter(|(_, a)| a.outcome == Outcome::Unverified)
            .collect()
    }

    /// No assertion failed (unverified ones are allowed; see [`Self::unverified`]).
    pub fn passed(&self) -> bool {
        self.failures().is_empty() && self.assertions().next().is_some()
    }
}

impl fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "=== scenario {} (run {}): {}",
            self.scenario,
            self.run,
            self.scenario.about()
        )?;
        for p in &self.phases {
            write!(f, "{p}")?;
        }
        let total = self.assertions().count();
        let failed = self.failures().len();
        let unverified = self.unverified().len();
        writeln!(
            f,
            "=== scenario {}: {} ({} assertions: {} passed, {failed} failed, {unverified} unverified; {:.1} s)",
            self.scenario,
            if self.passed() { "PASS" } else { "FAIL" },
            total,
            total - failed - unverified,
            self.elapsed.as_secs_f64()
        )?;
        for (phase, a) in self.failures() {
            writeln!(f, "  FAILED [{phase}] {}: {}", a.what, a.detail)?;
        }
        for (phase, a) in self.unverified() {
            writeln!(f, "  UNVERIFIED [{phase}] {}", a.what)?;
        }
        Ok(())
    }
}

/// Builds the scenario's cluster, runs it and tears the cluster down (also on error).
pub fn run(s: Scenario, opts: &ScenarioOpts) -> Result<ScenarioReport> {
    let mut v = run_many(&[s], opts, |_| {})?;
    v.pop()
        .ok_or_else(|| anyhow!("scenario {s} produced no report"))
}

/// Runs scenarios in order; consecutive ones of the same shape share one cluster (the P3
/// causes each restore the cluster before the next). `each` sees every report as soon as it
/// is done. Stops at the first scenario that cannot run (an error, not a failed assertion).
pub fn run_many(
    list: &[Scenario],
    opts: &ScenarioOpts,
    mut each: impl FnMut(&ScenarioReport),
) -> Result<Vec<ScenarioReport>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let shape = list[i].shape();
        let group: Vec<Scenario> = list[i..]
            .iter()
            .take_while(|s| s.shape() == shape)
            .copied()
            .collect();
        i += group.len();
        let mut spec = list[i - group.len()].spec(opts);
        if group.iter().any(|s| s.needs_real_wire()) {
            spec.underlay_tx_offload = false;
        }
        let mut c = Cluster::up(&spec).context("cluster up")?;
        for s in group {
            sys::check_interrupted()?;
            let r = run_on(&mut c, s, opts).with_context(|| format!("scenario {s}"))?;
            each(&r);
            out.push(r);
        }
        c.teardown()?;
    }
    Ok(out)
}

/// Runs one scenario on an existing cluster of the scenario's shape ([`Scenario::spec`]).
pub fn run_on(c: &mut Cluster, s: Scenario, opts: &ScenarioOpts) -> Result<ScenarioReport> {
    let start = Instant::now();
    let phases = match s {
        Scenario::P2ClusterIp => p2_cluster_ip(c, opts)?,
        Scenario::P3IpForward => p3_ip_forward(c, opts)?,
        Scenario::P3VxlanPort => p3_vxlan_port(c, opts)?,
        Scenario::P3ForwardReject => p3_forward_reject(c, opts)?,
        Scenario::P3SecuritySoftware => p3_security_software(c, opts)?,
        Scenario::P3VxlanHostGw => p3_vxlan_hostgw(c, opts)?,
        Scenario::NodeSetup => node_setup(c, opts)?,
        Scenario::P3Fallback => p3_fallback(c, opts, "n2")?,
        Scenario::P3FallbackMixed => p3_fallback(c, opts, "n1")?,
    };
    Ok(ScenarioReport {
        scenario: s,
        run: c.prefix().to_string(),
        phases,
        elapsed: start.elapsed(),
    })
}

/// The node a matrix source or destination belongs to.
fn owners(c: &Cluster) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = c
        .pods()
        .into_iter()
        .map(|(n, p)| (p.name.clone(), n.name.clone()))
        .collect();
    for n in c.nodes() {
        m.insert(n.name.clone(), n.name.clone());
    }
    m
}

/// True when the cell's traffic is forwarded by `node` (a pod of `node` talking to another
/// node, or another node reaching a pod of `node`); a node's own host traffic is not
/// forwarded by it.
fn forwarded_by(owner: &HashMap<String, String>, cell: &Cell, node: &str) -> bool {
    let src = owner.get(&cell.src).map(String::as_str);
    let dst = owner.get(&cell.dst).map(String::as_str);
    if src == dst {
        return false;
    }
    (cell.src_kind == SourceKind::Pod && src == Some(node)) || dst == Some(node)
}

/// Every affected cell fails every probe; every other cell passes (same-node cells are not
/// judged when `skip_same_node`: whether bridged traffic crosses iptables depends on
/// br_netfilter, which is not this scenario's point).
fn expect_split(
    phase: &mut Phase,
    m: &Matrix,
    label: &str,
    affected: impl Fn(&Cell) -> bool,
    skip_same_node: bool,
) {
    let (mut hit, mut wrong_pass, mut wrong_fail) = (0, Vec::new(), Vec::new());
    for cell in &m.cells {
        if skip_same_node && cell.same_node {
            continue;
        }
        // IPv6 cells of a dual-stack matrix are named as such.
        let fam = match cell.family {
            Family::V4 => "",
            Family::V6 => " ipv6",
        };
        if affected(cell) {
            hit += 1;
            if cell.results.iter().any(|r| r.ok) {
                wrong_pass.push(format!(
                    "{}->{}{fam} {}",
                    cell.src,
                    cell.dst,
                    cell.letters()
                ));
            }
        } else if !cell.ok() {
            wrong_fail.push(format!(
                "{}->{}{fam} {}",
                cell.src,
                cell.dst,
                cell.letters()
            ));
        }
    }
    phase.expect(
        format!("matrix: every probe of the {hit} pairs {label} fails"),
        hit > 0 && wrong_pass.is_empty(),
        format!("still passing: {}", wrong_pass.join(", ")),
    );
    phase.expect(
        "matrix: every other pair passes",
        wrong_fail.is_empty(),
        format!("failing: {}", wrong_fail.join(", ")),
    );
}

fn expect_matrix_pass(phase: &mut Phase, c: &Cluster, limit: Duration) {
    let m = c.check_until_pass(limit);
    let (ok, total) = m.counts();
    phase.expect(
        "matrix: every probe passes",
        m.all_pass(),
        format!("{ok}/{total} probes passed"),
    );
    phase.matrix = Some(m);
}

/// A check once the failure has had a moment to apply (nothing needs to converge: the
/// breakage is immediate).
fn broken_matrix(c: &Cluster) -> Matrix {
    std::thread::sleep(Duration::from_millis(300));
    c.check()
}

fn flanneld_nodes(c: &Cluster) -> Vec<String> {
    c.nodes()
        .iter()
        .filter(|n| n.kind.runs_flanneld())
        .map(|n| n.name.clone())
        .collect()
}

fn first_of(c: &Cluster, kind: NodeKind) -> Result<String> {
    c.nodes_of(kind)
        .first()
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("the scenario needs a {kind} node"))
}

fn no_fail(r: &DoctorReport) -> bool {
    !r.has_any(Level::Fail)
}

/// The only FAIL is `id`, and it mentions `needle`.
fn fails_only(r: &DoctorReport, id: &str, needle: &str) -> bool {
    fails_only_these(r, &[(id, needle)])
}

/// Every `(id, needle)` FAILs mentioning its needle, and nothing else FAILs.
fn fails_only_these(r: &DoctorReport, expected: &[(&str, &str)]) -> bool {
    expected
        .iter()
        .all(|(id, needle)| r.has_mentioning(Level::Fail, id, needle))
        && r.checks
            .iter()
            .all(|c| c.level != Level::Fail || expected.iter().any(|(id, _)| c.id == *id))
}

fn capture_during<T>(
    c: &mut Cluster,
    filter: &str,
    f: impl FnOnce(&mut Cluster) -> T,
) -> Result<(T, PathBuf)> {
    let (t, mut pcaps) = captures_during(c, &[filter.to_string()], f)?;
    let pcap = pcaps.pop().ok_or_else(|| anyhow!("no capture"))?;
    Ok((t, pcap))
}

/// One capture per filter while `f` runs; the pcaps in the filters' order.
fn captures_during<T>(
    c: &mut Cluster,
    filters: &[String],
    f: impl FnOnce(&mut Cluster) -> T,
) -> Result<(T, Vec<PathBuf>)> {
    let mut caps = Vec::new();
    for filter in filters {
        caps.push(c.start_capture(&CaptureOpts {
            filter: Some(filter.clone()),
            max_packets: 50_000,
            max_seconds: 120,
            ..CaptureOpts::default()
        })?);
    }
    let t = f(c);
    // Frames still in flight reach tcpdump within milliseconds (immediate mode).
    std::thread::sleep(Duration::from_millis(200));
    let pcaps = caps
        .iter()
        .map(|cap| c.stop_capture(&cap.name))
        .collect::<Result<Vec<_>>>()?;
    Ok((t, pcaps))
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::p2::probe_ms;
    use super::p3::{with_host_gw, with_port};
    use super::*;
    use crate::check::ProbeKind;
    use crate::lease::{self, NetConf};

    #[test]
    fn names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>().unwrap(), s);
        }
        assert!("p4".parse::<Scenario>().is_err());
        let all = parse_names(&["all".into()]).unwrap();
        assert_eq!(all.len(), 9);
        assert_eq!(
            "p3-fallback".parse::<Scenario>().unwrap(),
            Scenario::P3Fallback
        );
        let p3 = parse_names(&["p3".into()]).unwrap();
        assert_eq!(p3, Scenario::P3.to_vec());
        assert_eq!(p3[3], Scenario::P3VxlanPort);
        assert_eq!(*p3.last().unwrap(), Scenario::P3VxlanHostGw);
        assert!(parse_names(&[]).is_err());
        let twice = parse_names(&["p3-vxlan-hostgw".into(), "p3".into()]).unwrap();
        assert_eq!(twice.len(), Scenario::P3.len());
        assert_eq!(twice[0], Scenario::P3VxlanHostGw);
    }

    #[test]
    fn cluster_ips_of_ipv6_runs() {
        assert_eq!(CLUSTER_IP6.to_string(), "fd42:96::10");
        assert_eq!(CLUSTER_IP6_MIXED.to_string(), "fd42:96::11");
    }

    #[test]
    fn specs_have_the_documented_shape() {
        let o = ScenarioOpts::default();
        let p2 = Scenario::P2ClusterIp.spec(&o);
        let kinds: Vec<NodeKind> = p2.nodes.iter().map(|n| n.kind).collect();
        assert_eq!(
            kinds,
            [
                NodeKind::Userspace,
                NodeKind::Userspace,
                NodeKind::Kernel,
                NodeKind::Kernel
            ]
        );
        assert!(p2.ip_masq);
        let p3 = Scenario::P3VxlanPort.spec(&o);
        assert_eq!(p3.nodes.len(), 3);
        assert_eq!(p3.pods_per_node, 1);
        assert!(!p3.ip_masq);
        let setup = Scenario::NodeSetup.spec(&o);
        let kinds: Vec<NodeKind> = setup.nodes.iter().map(|n| n.kind).collect();
        assert_eq!(kinds, [NodeKind::Userspace, NodeKind::Kernel]);
        for (s, first) in [
            (Scenario::P3Fallback, NodeKind::Kernel),
            (Scenario::P3FallbackMixed, NodeKind::KernelRef),
        ] {
            let spec = s.spec(&o);
            assert_eq!(spec.nodes[0].kind, first);
            assert_eq!(spec.nodes[1].kind, NodeKind::Userspace);
            assert!(spec.flanneld_args.iter().any(|a| a == "--host-gw-fallback"));
        }
        // The fallback flags never leak into the other scenarios' clusters.
        assert!(p3.flanneld_args.is_empty());
    }

    #[test]
    fn ethtool_features() {
        let text = "Features for flannel.1:\nrx-checksumming: on\ntx-checksumming: off\n\
                    \ttx-checksum-ipv4: off [fixed]\n\ttx-checksum-ip-generic: off\n\
                    \ttx-checksum-ipv6: off [fixed]\n";
        assert_eq!(
            parse_ethtool_feature(text, "tx-checksum-ip-generic"),
            Some(false)
        );
        assert_eq!(parse_ethtool_feature(text, "rx-checksumming"), Some(true));
        assert_eq!(parse_ethtool_feature(text, "tx-checksum-sctp"), None);
        let on = "\ttx-checksum-ip-generic: on [requested off]\n";
        assert_eq!(
            parse_ethtool_feature(on, "tx-checksum-ip-generic"),
            Some(true)
        );
    }

    #[test]
    fn probe_round_trips() {
        let ok = |d: &str| ProbeOutcome {
            kind: ProbeKind::Tcp,
            ok: true,
            detail: d.into(),
        };
        assert_eq!(probe_ms(&ok("ok 1007.429 ms")), Some(1007.429));
        assert_eq!(probe_ms(&ok("ok 0.5 s")), None);
        assert_eq!(probe_ms(&ok("")), None);
        let mut failed = ok("ok 3 ms");
        failed.ok = false;
        assert_eq!(probe_ms(&failed), None);
    }

    #[test]
    fn port_is_set_in_the_backend() {
        let out = with_port(lease::DEFAULT_NET_CONF, 8475).unwrap();
        let conf = NetConf::parse(&out).unwrap();
        assert_eq!(conf.effective_port(), 8475);
        assert_eq!(conf.network.to_string(), "10.244.0.0/16");
        assert!(with_port(r#"{"Network":"10.244.0.0/16"}"#, 1).is_err());
        let hg = with_host_gw(&with_port(lease::DEFAULT_NET_CONF, 8475).unwrap()).unwrap();
        let conf = NetConf::parse(&hg).unwrap();
        assert_eq!(conf.backend_type, "host-gw");
        assert_eq!(conf.network.to_string(), "10.244.0.0/16");
        assert!(!hg.contains("8475"), "{hg}");
    }

    fn cell(src: &str, kind: SourceKind, dst: &str, ok: bool) -> Cell {
        Cell {
            src: src.into(),
            src_kind: kind,
            dst: dst.into(),
            dst_ip: Ipv4Addr::new(10, 244, 0, 2).into(),
            family: crate::check::Family::V4,
            same_node: false,
            results: vec![ProbeOutcome {
                kind: ProbeKind::Icmp,
                ok,
                detail: String::new(),
            }],
        }
    }

    #[test]
    fn forwarding_node_and_split_expectations() {
        let owner: HashMap<String, String> = [
            ("n1p1", "n1"),
            ("n2p1", "n2"),
            ("n3p1", "n3"),
            ("n1", "n1"),
            ("n2", "n2"),
            ("n3", "n3"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let f = |c: &Cell| forwarded_by(&owner, c, "n1");
        assert!(f(&cell("n1p1", SourceKind::Pod, "n2p1", true)));
        assert!(f(&cell("n2p1", SourceKind::Pod, "n1p1", true)));
        assert!(f(&cell("n2", SourceKind::Host, "n1p1", true)));
        assert!(
            !f(&cell("n1", SourceKind::Host, "n2p1", true)),
            "own host traffic"
        );
        assert!(!f(&cell("n2p1", SourceKind::Pod, "n3p1", true)));

        let mut m = Matrix {
            cells: vec![
                cell("n1p1", SourceKind::Pod, "n2p1", false),
                cell("n2p1", SourceKind::Pod, "n3p1", true),
                cell("n1", SourceKind::Host, "n2p1", true),
            ],
            ..Matrix::default()
        };
        let mut p = Phase::default();
        expect_split(&mut p, &m, "x", f, true);
        assert!(p.failures().next().is_none(), "{p}");
        // An affected pair that still passes, and an unaffected one that fails.
        m.cells[0].results[0].ok = true;
        m.cells[1].results[0].ok = false;
        let mut p = Phase::default();
        expect_split(&mut p, &m, "x", f, true);
        assert_eq!(p.failures().count(), 2, "{p}");
        // No affected pair at all is a failure too (the breakage hit nothing).
        let mut p = Phase::default();
        expect_split(&mut p, &m, "x", |_| false, true);
        assert!(p.failures().any(|a| a.what.contains("the 0 pairs")));
    }

    #[test]
    fn unverified_doctor_assertions() {
        let mut p = Phase::default();
        p.doctor.push(DoctorRun {
            node: "n1".into(),
            status: Some(2),
            stdout: String::new(),
            stderr: "flanneld doctor is not implemented yet".into(),
            report: DoctorReport::default(),
        });
        p.expect_on_doctor(0, "FAIL ip-forward", |r| r.has(Level::Fail, "ip-forward"));
        assert_eq!(p.assertions[0].outcome, Outcome::Unverified);
        let out =
            "FAIL ip-forward: net.ipv4.ip_forward = 0: x\ndoctor: 0 passed, 0 warnings, 1 failed\n";
        p.doctor.push(DoctorRun {
            node: "n1".into(),
            status: Some(1),
            stdout: out.into(),
            stderr: String::new(),
            report: DoctorReport::parse(out),
        });
        p.expect_on_doctor(1, "FAIL ip-forward", |r| r.has(Level::Fail, "ip-forward"));
        p.expect_on_doctor(1, "PASS ip-forward", |r| r.has(Level::Pass, "ip-forward"));
        assert_eq!(p.assertions[1].outcome, Outcome::Pass);
        assert_eq!(p.assertions[2].outcome, Outcome::Fail);
        let r = ScenarioReport {
            scenario: Scenario::P3IpForward,
            run: "frtest".into(),
            phases: vec![p],
            elapsed: Duration::ZERO,
        };
        assert!(!r.passed());
        assert_eq!(r.unverified().len(), 1);
        let text = r.to_string();
        assert!(
            text.contains("FAILED [] doctor on n1: PASS ip-forward"),
            "{text}"
        );
        assert!(
            text.contains("UNVERIFIED [] doctor on n1: FAIL ip-forward"),
            "{text}"
        );
    }
}
