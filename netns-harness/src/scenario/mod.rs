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
//! 10.96.0.11) exist only in one node's nat table and host route, the "security group" is an
//! iptables rule in the node namespaces, the "security software" is a copy of `sleep` in the
//! run directory stopped by PID.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::capture::{CaptureOpts, CaptureReport};
use crate::check::{Cell, Matrix, ProbeOutcome, SourceKind};
pub use crate::cluster::{parse_ethtool_feature, KUBE_MARK};
use crate::cluster::{Cluster, ClusterSpec, NodeKind, DEFAULT_BASE_DIR};
use crate::cmd;
use crate::doctor::{DoctorReport, DoctorRun, Level};
use crate::proto;
use crate::store::StoreKind;
use crate::sys;

/// The emulated ClusterIP of the same-kind service (field problem P2).
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The emulated ClusterIP of the mixed-kind service.
pub const CLUSTER_IP_MIXED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
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
    /// tx checksum offload on `flannel.1` (off by the daemon, named by doctor when on).
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
                 flannel.1 is off and doctor names it when turned on"
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

/// Parses CLI names: scenario names, `p3` (the four P3 causes) and `all`.
pub fn parse_names(names: &[String]) -> Result<Vec<Scenario>> {
    let mut v = Vec::new();
    for n in names {
        match n.as_str() {
            "all" => v.extend(Scenario::ALL),
            "p3" => v.extend(Scenario::P3),
            other => v.push(other.parse()?),
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
        if affected(cell) {
            hit += 1;
            if cell.results.iter().any(|r| r.ok) {
                wrong_pass.push(format!("{}->{} {}", cell.src, cell.dst, cell.letters()));
            }
        } else if !cell.ok() {
            wrong_fail.push(format!("{}->{} {}", cell.src, cell.dst, cell.letters()));
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
    r.has_mentioning(Level::Fail, id, needle)
        && r.checks
            .iter()
            .all(|c| c.level != Level::Fail || c.id == id)
}

// ---------------------------------------------------------------------------------------
// Node set-up (issue #11)

fn node_setup(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let u = first_of(c, NodeKind::Userspace)?;
    let k = first_of(c, NodeKind::Kernel)?;
    let (bin, conf) = c.cni_dirs(&u)?;
    let ids = [
        "cni-plugin",
        "cni-config",
        "br-netfilter",
        "vxlan-port",
        "mtu",
    ];
    let mut phases = Vec::new();

    let mut p = Phase::new(
        "baseline",
        "healthy cluster, CNI dirs as kube-flannel.yml installs them",
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    for node in [&u, &k] {
        p.expect_doctor(
            c,
            node,
            "PASS cni-plugin, cni-config, br-netfilter, vxlan-port, mtu; no FAIL",
            |r| ids.iter().all(|id| r.has(Level::Pass, id)) && no_fail(r),
        );
    }
    phases.push(p);

    let mut p = Phase::new(
        "cni-plugin",
        format!("{}/portmap removed on {u}", bin.display()),
    );
    let aside = bin.join("portmap.aside");
    std::fs::rename(bin.join("portmap"), &aside)?;
    p.expect_doctor(c, &u, "FAIL cni-plugin naming portmap", |r| {
        fails_only(r, "cni-plugin", "portmap missing")
    });
    std::fs::rename(&aside, bin.join("portmap"))?;
    p.expect_doctor(c, &u, "restored: PASS cni-plugin", |r| {
        r.has(Level::Pass, "cni-plugin")
    });
    phases.push(p);

    let mut p = Phase::new(
        "cni-config",
        format!("05-calico.conflist added to {} on {u}", conf.display()),
    );
    let calico = conf.join("05-calico.conflist");
    std::fs::write(
        &calico,
        r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"}]}"#,
    )?;
    p.expect_doctor(c, &u, "FAIL cni-config naming the calico file", |r| {
        fails_only(r, "cni-config", "05-calico.conflist")
    });
    std::fs::remove_file(&calico)?;
    p.expect_doctor(c, &u, "removed: PASS cni-config", |r| {
        r.has(Level::Pass, "cni-config")
    });
    phases.push(p);

    let key = "net.bridge.bridge-nf-call-iptables";
    let mut p = Phase::new("br-netfilter", format!("sysctl -w {key}=0 on {u}"));
    let ns = c.resolve_ns(&u)?;
    cmd::sysctl(&ns, key, "0")?;
    p.expect_doctor(c, &u, "FAIL br-netfilter", |r| {
        fails_only(r, "br-netfilter", "= 0")
    });
    cmd::sysctl(&ns, key, "1")?;
    p.expect_doctor(c, &u, "sysctl=1: PASS br-netfilter", |r| {
        r.has(Level::Pass, "br-netfilter")
    });
    phases.push(p);

    let mut p = Phase::new(
        "vxlan-port",
        format!("a second vxlan device vxdoc (VNI 99, dstport 8472) on {k}"),
    );
    c.exec_ok(
        &k,
        &[
            "ip", "link", "add", "vxdoc", "type", "vxlan", "id", "99", "dstport", "8472", "dev",
            "eth0",
        ],
    )?;
    c.exec_ok(&k, &["ip", "link", "set", "vxdoc", "up"])?;
    p.expect_doctor(c, &k, "FAIL vxlan-port naming vxdoc", |r| {
        fails_only(r, "vxlan-port", "vxdoc")
    });
    c.exec_ok(&k, &["ip", "link", "del", "vxdoc"])?;
    p.expect_doctor(c, &k, "deleted: PASS vxlan-port", |r| {
        r.has(Level::Pass, "vxlan-port")
    });
    phases.push(p);

    let mut p = Phase::new(
        "mtu",
        format!("ip link set eth0 mtu 1400 on {k} (overlay MTU 1450 + 50 no longer fits)"),
    );
    c.exec_ok(&k, &["ip", "link", "set", "eth0", "mtu", "1400"])?;
    p.expect_doctor(c, &u, &format!("FAIL mtu naming {k}'s subnet"), |r| {
        let subnet = c.node_subnet(&k).map(|s| s.to_string()).unwrap_or_default();
        fails_only(r, "mtu", &subnet)
    });
    c.exec_ok(&k, &["ip", "link", "set", "eth0", "mtu", "1500"])?;
    phases.push(p);

    let mut p = Phase::new("fixed", "everything repaired");
    expect_matrix_pass(&mut p, c, opts.converge);
    for node in [&u, &k] {
        p.expect_doctor(c, node, "no FAIL", no_fail);
    }
    phases.push(p);
    Ok(phases)
}

// ---------------------------------------------------------------------------------------
// P2

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
fn probe_ms(o: &ProbeOutcome) -> Option<f64> {
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

fn capture_during<T>(
    c: &mut Cluster,
    filter: &str,
    f: impl FnOnce(&mut Cluster) -> T,
) -> Result<(T, PathBuf)> {
    let cap = c.start_capture(&CaptureOpts {
        filter: Some(filter.to_string()),
        max_packets: 50_000,
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let t = f(c);
    // Frames still in flight reach tcpdump within milliseconds (immediate mode).
    std::thread::sleep(Duration::from_millis(200));
    let pcap = c.stop_capture(&cap.name)?;
    Ok((t, pcap))
}

fn p2_cluster_ip(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
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

// ---------------------------------------------------------------------------------------
// P3

fn p3_ip_forward(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let t = first_of(c, NodeKind::Kernel)?;
    let other = flanneld_nodes(c)
        .into_iter()
        .find(|n| *n != t)
        .ok_or_else(|| anyhow!("needs two flanneld nodes"))?;
    let owner = owners(c);
    let mut phases = Vec::new();

    let mut p = Phase::new("baseline", "healthy cluster");
    expect_matrix_pass(&mut p, c, opts.converge);
    p.expect_doctor(c, &t, "PASS ip-forward, no FAIL", |r| {
        r.has(Level::Pass, "ip-forward") && no_fail(r)
    });
    phases.push(p);

    let mut p = Phase::new("broken", format!("sysctl -w net.ipv4.ip_forward=0 on {t}"));
    cmd::sysctl(&c.resolve_ns(&t)?, "net.ipv4.ip_forward", "0")?;
    let m = broken_matrix(c);
    expect_split(
        &mut p,
        &m,
        &format!("forwarded by {t}"),
        |cell| forwarded_by(&owner, cell, &t),
        true,
    );
    p.matrix = Some(m);
    p.expect_doctor(c, &t, "FAIL ip-forward", |r| {
        r.has(Level::Fail, "ip-forward")
    });
    p.expect_doctor(
        c,
        &other,
        "no FAIL ip-forward (its own forwarding is on)",
        |r| !r.has(Level::Fail, "ip-forward"),
    );
    phases.push(p);

    let mut p = Phase::new("fixed", format!("sysctl -w net.ipv4.ip_forward=1 on {t}"));
    cmd::sysctl(&c.resolve_ns(&t)?, "net.ipv4.ip_forward", "1")?;
    expect_matrix_pass(&mut p, c, opts.converge);
    p.expect_doctor(c, &t, "PASS ip-forward, no FAIL", |r| {
        r.has(Level::Pass, "ip-forward") && no_fail(r)
    });
    phases.push(p);
    Ok(phases)
}

/// `iptables <op> FORWARD [1] -j REJECT --reject-with icmp-host-prohibited`.
fn reject_args(op: &'static str) -> Vec<&'static str> {
    let mut v = vec!["iptables", "-w", op, "FORWARD"];
    if op == "-I" {
        v.push("1");
    }
    v.extend(["-j", "REJECT", "--reject-with", "icmp-host-prohibited"]);
    v
}

fn p3_forward_reject(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let t = first_of(c, NodeKind::Userspace)?;
    let owner = owners(c);
    let mut phases = Vec::new();

    let mut p = Phase::new("baseline", "healthy cluster");
    expect_matrix_pass(&mut p, c, opts.converge);
    p.expect_doctor(c, &t, "no FAIL forward-reject", |r| {
        !r.has(Level::Fail, "forward-reject") && no_fail(r)
    });
    phases.push(p);

    let mut p = Phase::new(
        "broken",
        format!("iptables -I FORWARD 1 -j REJECT --reject-with icmp-host-prohibited on {t}"),
    );
    c.exec_ok(&t, &reject_args("-I"))?;
    let m = broken_matrix(c);
    expect_split(
        &mut p,
        &m,
        &format!("forwarded by {t}"),
        |cell| forwarded_by(&owner, cell, &t),
        true,
    );
    p.matrix = Some(m);
    p.expect_doctor(c, &t, "FAIL forward-reject quoting the REJECT rule", |r| {
        r.has_mentioning(Level::Fail, "forward-reject", "REJECT")
            && r.has_mentioning(Level::Fail, "forward-reject", "icmp-host-prohibited")
    });
    phases.push(p);

    let mut p = Phase::new(
        "fixed",
        format!("iptables -D FORWARD -j REJECT --reject-with icmp-host-prohibited on {t}"),
    );
    c.exec_ok(&t, &reject_args("-D"))?;
    expect_matrix_pass(&mut p, c, opts.converge);
    p.expect_doctor(c, &t, "no FAIL forward-reject, no FAIL", |r| {
        !r.has(Level::Fail, "forward-reject") && no_fail(r)
    });
    phases.push(p);
    Ok(phases)
}

/// Stops the fake security software when dropped (also on error paths).
struct StopOnDrop<'a> {
    c: &'a mut Cluster,
    pid: u32,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.c.release(self.pid);
    }
}

fn p3_security_software(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let t = c
        .nodes_of(NodeKind::Kernel)
        .last()
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("needs a kernel node"))?;
    let ns = c.resolve_ns(&t)?;
    let mut phases = Vec::new();

    let mut p = Phase::new(
        "baseline",
        "healthy cluster, no kesl process, no firewalld chains",
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    p.expect_doctor(
        c,
        &t,
        "no WARN host-firewall naming FORWARD_IN_ZONES",
        |r| !r.has_mentioning(Level::Warn, "host-firewall", "FORWARD_IN_ZONES"),
    );
    phases.push(p);

    let mut p = Phase::new(
        "present",
        format!(
            "a copy of /bin/sleep named kesl running in {t} (bounded, stopped by PID); \
             iptables -N FORWARD_IN_ZONES on {t}"
        ),
    );
    let kesl = c.run_dir().join("kesl");
    std::fs::copy("/bin/sleep", &kesl).context("copy /bin/sleep to kesl")?;
    let kesl_s = kesl.to_string_lossy().into_owned();
    let log = c.run_dir().join("kesl.log");
    // 120 s at most even if nothing stops it; normally it lives for one doctor run.
    let (child, rec) = cmd::spawn_in_ns(
        &ns,
        &[&kesl_s, "120"],
        &log,
        "kesl (fake security software)",
    )?;
    let pid = rec.pid;
    c.adopt(rec, child);
    c.exec_ok(&t, &["iptables", "-w", "-N", "FORWARD_IN_ZONES"])?;
    {
        let guard = StopOnDrop { c, pid };
        let pid_s = pid.to_string();
        let what = format!("WARN security-software naming kesl (pid {pid})");
        let doctor = p.expect_doctor(guard.c, &t, &what, |r| {
            r.find(Level::Warn, "security-software")
                .any(|w| w.text().contains("kesl") && w.text().contains(&pid_s))
        });
        if let Some(i) = doctor {
            p.expect_on_doctor(i, "WARN host-firewall naming FORWARD_IN_ZONES", |r| {
                r.has_mentioning(Level::Warn, "host-firewall", "FORWARD_IN_ZONES")
            });
        }
        // These emulations hook nothing: the matrix must still pass (they are warnings).
        expect_matrix_pass(&mut p, guard.c, opts.converge);
    }
    phases.push(p);

    let mut p = Phase::new(
        "removed",
        format!("kesl stopped by PID; iptables -X FORWARD_IN_ZONES on {t}"),
    );
    c.exec_ok(&t, &["iptables", "-w", "-X", "FORWARD_IN_ZONES"])?;
    let pid_s = pid.to_string();
    p.expect_doctor(c, &t, "neither WARN any more", |r| {
        !r.find(Level::Warn, "security-software")
            .any(|w| w.text().contains(&pid_s))
            && !r.has_mentioning(Level::Warn, "host-firewall", "FORWARD_IN_ZONES")
    });
    phases.push(p);
    Ok(phases)
}

/// `iptables -I INPUT 1 -p udp --dport <port> -j DROP` in every node namespace (a security
/// group between the nodes), unless already there.
fn block_udp_port(c: &Cluster, port: u16) -> Result<()> {
    let port = port.to_string();
    let rule = |op: &'static str| -> Vec<&str> {
        let mut v = vec!["iptables", "-w", op, "INPUT"];
        if op == "-I" {
            v.push("1");
        }
        v.extend(["-p", "udp", "--dport", &port, "-j", "DROP"]);
        v
    };
    for n in c.node_names() {
        if !c.exec(&n, &rule("-C"))?.status.success() {
            c.exec_ok(&n, &rule("-I"))?;
        }
    }
    Ok(())
}

/// The "broken" phase of both VXLAN-blocked scenarios: the port dropped between all nodes,
/// every cross-node pair fails, the capture shows VXLAN still leaving, and doctor on `t` names
/// every peer as unreachable on that port with a fix naming Backend.Port.
fn vxlan_blocked(c: &mut Cluster, t: &str, port: u16) -> Result<Phase> {
    let mut p = Phase::new(
        "broken",
        format!(
            "iptables -I INPUT 1 -p udp --dport {port} -j DROP in every node namespace (a security group)"
        ),
    );
    block_udp_port(c, port)?;
    let (m, pcap) = capture_during(c, &format!("udp port {port}"), |c| broken_matrix(c))?;
    expect_split(&mut p, &m, "between nodes", |cell| !cell.same_node, true);
    p.matrix = Some(m);
    let rep = c.verify_capture(&pcap)?;
    p.expect(
        format!(
            "capture: VXLAN packets still leave towards UDP {port} (the drop is in the receivers' INPUT)"
        ),
        rep.vxlan_frames > 0,
        format!("{} VXLAN frames", rep.vxlan_frames),
    );
    p.captures.push((format!("udp {port}"), rep));
    let peers: Vec<(String, String)> = c
        .nodes()
        .iter()
        .filter(|n| n.name != t)
        .map(|n| (n.name.clone(), n.underlay_ip.to_string()))
        .collect();
    if let Some(i) = p.run_doctor(c, t) {
        // The report's other fix: nodes sharing layer 2 need no UDP at all with host-gw.
        p.expect_on_doctor(i, "FAIL peer-reachable fix lines mention host-gw", |r| {
            r.has_mentioning(Level::Fail, "peer-reachable", "host-gw")
        });
        for (name, ip) in peers {
            let port = port.to_string();
            p.expect_on_doctor(
                i,
                &format!(
                    "FAIL peer-reachable naming {name} at {ip} and UDP {port}, fix naming Backend.Port"
                ),
                move |r| {
                    r.find(Level::Fail, "peer-reachable").any(|f| {
                        f.message.contains(&ip)
                            && f.text().contains(&port)
                            && f.text().contains("Backend.Port")
                    })
                },
            );
        }
    }
    Ok(p)
}

/// The current net-conf with `Backend` replaced by `{"Type":"host-gw"}`.
fn with_host_gw(net_conf: &str) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(net_conf)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("net-conf is not a JSON object"))?;
    obj.insert("Backend".into(), serde_json::json!({"Type": "host-gw"}));
    Ok(serde_json::to_string(&v)?)
}

fn p3_vxlan_hostgw(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    if !c.nodes_of(NodeKind::KernelRef).is_empty() {
        bail!("p3-vxlan-hostgw restarts flanneld with host-gw: kernel-ref nodes cannot follow");
    }
    if c.state().sites {
        bail!("p3-vxlan-hostgw needs every node on one layer-2 segment (no two-site run)");
    }
    let conf = c.net_conf()?;
    if conf.backend_type != "vxlan" {
        bail!("the run uses backend {:?}, not vxlan", conf.backend_type);
    }
    let port = conf.effective_port();
    let nodes = flanneld_nodes(c);
    let t = nodes
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no flanneld node"))?;
    let mut phases = Vec::new();

    let mut p = Phase::new("baseline", format!("healthy cluster, vxlan on UDP {port}"));
    expect_matrix_pass(&mut p, c, opts.converge);
    phases.push(p);

    phases.push(vxlan_blocked(c, &t, port)?);

    let mut p = Phase::new(
        "fixed",
        format!(
            "net-conf Backend = {{\"Type\":\"host-gw\"}} in the {} store, every flanneld restarted; the DROP of UDP {port} stays",
            c.store_kind()
        ),
    );
    let json = with_host_gw(&c.state().net_conf)?;
    c.set_net_conf(&json)?;
    c.restart_all_flanneld()?;
    let cap_vxlan = c.start_capture(&CaptureOpts {
        filter: Some(format!("udp port {port}")),
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let network = conf.network.to_string();
    let (_, pcap_pods) = capture_during(c, &format!("net {network}"), |c| {
        expect_matrix_pass(&mut p, c, opts.converge)
    })?;
    let pcap_vxlan = c.stop_capture(&cap_vxlan.name)?;
    let vx = crate::capture::verify_pcap(&pcap_vxlan, port)?;
    p.expect(
        format!("capture: nothing is sent to UDP {port} any more"),
        vx.frames == 0,
        format!("{} frames", vx.frames),
    );
    let plain = crate::capture::verify_pcap(&pcap_pods, port)?;
    p.expect(
        format!("capture: pod traffic crosses the underlay unencapsulated ({network})"),
        plain.frames > 0 && plain.vxlan_frames == 0,
        format!("{} frames, {} VXLAN", plain.frames, plain.vxlan_frames),
    );
    p.captures.push((format!("udp {port} (must be empty)"), vx));
    p.captures.push((format!("net {network}"), plain));
    // Once converged, every node routes every other node's subnet via its underlay address
    // (each node learns a peer's host-gw lease when that peer has restarted).
    for n in c.nodes().to_vec() {
        let routes = c
            .exec_ok(&n.name, &["ip", "-4", "route", "show"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let missing: Vec<String> = c
            .nodes()
            .iter()
            .filter(|o| o.name != n.name)
            .filter_map(|o| {
                let want = format!("{} via {} dev eth0", o.subnet?, o.underlay_ip);
                (!routes.lines().any(|l| l.starts_with(&want))).then_some(want)
            })
            .collect();
        p.expect(
            format!("{}: a host-gw route to every other node's subnet", n.name),
            missing.is_empty(),
            format!("missing: {}", missing.join(", ")),
        );
    }
    p.expect_doctor(c, &t, "no FAIL on host-gw", no_fail);
    phases.push(p);
    Ok(phases)
}

/// The current net-conf with `Backend.Port` set.
fn with_port(net_conf: &str, port: u16) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(net_conf)?;
    let backend = v
        .get_mut("Backend")
        .and_then(|b| b.as_object_mut())
        .ok_or_else(|| anyhow!("net-conf has no Backend object"))?;
    backend.insert("Port".into(), serde_json::json!(port));
    Ok(serde_json::to_string(&v)?)
}

fn p3_vxlan_port(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    if !c.nodes_of(NodeKind::KernelRef).is_empty() {
        bail!("p3-vxlan-port restarts flanneld to move the port: kernel-ref nodes cannot follow");
    }
    let old_port = c.net_conf()?.effective_port();
    if old_port == MOVED_PORT {
        bail!("the run already uses port {MOVED_PORT}");
    }
    let nodes = flanneld_nodes(c);
    let t = nodes
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no flanneld node"))?;
    let dev = format!("flannel.{}", c.net_conf()?.vni);
    let mut phases = Vec::new();

    let mut p = Phase::new("baseline", format!("healthy cluster on UDP {old_port}"));
    expect_matrix_pass(&mut p, c, opts.converge);
    p.expect_doctor(c, &t, "PASS peer-reachable for every peer, no FAIL", |r| {
        r.find(Level::Pass, "peer-reachable").count() >= nodes.len() - 1 && no_fail(r)
    });
    phases.push(p);

    phases.push(vxlan_blocked(c, &t, old_port)?);

    let mut p = Phase::new(
        "fixed",
        format!(
            "net-conf Backend.Port = {MOVED_PORT} in the {} store, every flanneld restarted; the DROP of {old_port} stays",
            c.store_kind()
        ),
    );
    let conf = with_port(&c.state().net_conf, MOVED_PORT)?;
    c.set_net_conf(&conf)?;
    c.restart_all_flanneld()?;
    let moved = MOVED_PORT.to_string();
    for n in c.nodes().to_vec() {
        match n.kind {
            NodeKind::Kernel => {
                let link = c
                    .exec_ok(&n.name, &["ip", "-d", "link", "show", &dev])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| format!("{e:#}"));
                p.expect(
                    format!("{}: {dev} was reconfigured to dstport {MOVED_PORT}", n.name),
                    link.contains(&format!("dstport {moved} "))
                        || link.contains(&format!("dstport {moved}\n")),
                    link.split_whitespace().collect::<Vec<_>>().join(" "),
                );
            }
            NodeKind::Userspace => {
                let ss = c
                    .exec_ok(
                        &n.name,
                        &["ss", "-Huln", "sport", "=", &format!(":{moved}")],
                    )
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                p.expect(
                    format!("{}: flanneld listens on UDP {MOVED_PORT}", n.name),
                    !ss.trim().is_empty(),
                    "no socket on the new port",
                );
            }
            NodeKind::KernelRef => {}
        }
    }
    let cap_old = c.start_capture(&CaptureOpts {
        filter: Some(format!("udp port {old_port}")),
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let (_, pcap_new) = capture_during(c, &format!("udp port {MOVED_PORT}"), |c| {
        expect_matrix_pass(&mut p, c, opts.converge)
    })?;
    let pcap_old = c.stop_capture(&cap_old.name)?;
    let new_rep = c.verify_capture(&pcap_new)?;
    p.expect(
        format!("capture: the traffic is VXLAN on UDP {MOVED_PORT} with valid checksums"),
        new_rep.all_checksums_ok(),
        new_rep.to_string().replace('\n', "; "),
    );
    let old_rep = crate::capture::verify_pcap(&pcap_old, old_port)?;
    p.expect(
        format!("capture: nothing is sent to UDP {old_port} any more"),
        old_rep.frames == 0,
        format!("{} frames", old_rep.frames),
    );
    p.captures.push((format!("udp {MOVED_PORT}"), new_rep));
    p.captures
        .push((format!("udp {old_port} (must be empty)"), old_rep));
    let what = format!("PASS peer-reachable on UDP {MOVED_PORT} for every peer, no FAIL");
    p.expect_doctor(c, &t, &what, |r| {
        r.find(Level::Pass, "peer-reachable")
            .filter(|x| x.message.contains(&moved))
            .count()
            >= nodes.len() - 1
            && no_fail(r)
    });
    phases.push(p);
    Ok(phases)
}

// ---------------------------------------------------------------------------------------
// Host-gw fallback (issue #17)

/// `/metrics` of a node's flanneld ([`FALLBACK_METRICS_PORT`], loopback of its namespace).
fn node_metrics(c: &Cluster, node: &str) -> String {
    let fetch = format!(
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{FALLBACK_METRICS_PORT}/metrics', timeout=3).read().decode())"
    );
    c.exec(node, &["python3", "-c", &fetch])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `flannel_peer_path{…,path="<path>"} 1` for `peer` on `node`.
fn path_line(c: &Cluster, peer: &str, path: &str) -> String {
    format!(
        "flannel_peer_path{{subnet=\"{}\",public_ip=\"{}\",path=\"{path}\"}} 1\n",
        c.node_subnet(peer)
            .map(|s| s.to_string())
            .unwrap_or_default(),
        c.node_ip(peer).map(|s| s.to_string()).unwrap_or_default(),
    )
}

/// Polls `f` every 500 ms until it holds or `limit` passed; returns whether it held.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline || sys::interrupted() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn ipv4_routes(c: &Cluster, node: &str) -> String {
    c.exec_ok(node, &["ip", "-4", "route", "show"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `udp port <port> and <hosts> and` the inner IPv4 protocol (byte 9 of the inner header,
/// after UDP 8 + VXLAN 8 + Ethernet 14 bytes) being ICMP or not: the prober's echo requests
/// are the only inner ICMP a fallback node sends to its peer's VTEP. Not ICMP: traffic to a
/// VTEP address (`vteps`, inner destination at UDP offset 46) is left out too: the VTEP /32
/// keeps it on VXLAN by design (replies to host traffic sourced from a VTEP address).
fn vxlan_filter(port: u16, hosts: &str, icmp: bool, vteps: &[Ipv4Addr]) -> String {
    if icmp {
        return format!("udp port {port} and {hosts} and udp[39] = 1");
    }
    let mut f = format!("udp port {port} and {hosts} and udp[39] != 1");
    for v in vteps {
        f.push_str(&format!(" and udp[46:4] != 0x{:08x}", u32::from(*v)));
    }
    f
}

/// Checks the matrix until every cell `judged` accepts passes, or `limit`.
fn check_until(c: &Cluster, limit: Duration, judged: impl Fn(&Cell) -> bool) -> Matrix {
    let deadline = Instant::now() + limit;
    loop {
        let m = c.check();
        let ok = m.cells.iter().filter(|x| judged(x)).all(Cell::ok);
        if ok || Instant::now() >= deadline || sys::interrupted() {
            return m;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn p3_fallback(c: &mut Cluster, opts: &ScenarioOpts, blocked: &str) -> Result<Vec<Phase>> {
    if c.state().sites {
        bail!("the host-gw fallback scenarios need every node on one layer-2 segment");
    }
    let conf = c.net_conf()?;
    if conf.backend_type != "vxlan" {
        bail!("the run uses backend {:?}, not vxlan", conf.backend_type);
    }
    let port = conf.effective_port();
    let network = conf.network.to_string();
    let b = c
        .node(blocked)
        .cloned()
        .ok_or_else(|| anyhow!("no node {blocked}"))?;
    let b_ip = b.underlay_ip.to_string();
    let b_falls_back = b.kind.runs_flanneld();
    let vteps: Vec<Ipv4Addr> = c
        .nodes()
        .iter()
        .filter_map(|n| n.subnet.map(|s| s.network()))
        .collect();
    // Upstream does not fall back: its host's own traffic to our pods leaves from its VTEP
    // address, and our replies to that address stay on the (blocked) VXLAN path by design.
    let known_gap =
        |cell: &Cell| !b_falls_back && cell.src_kind == SourceKind::Host && cell.src == blocked;
    // The flannel-rs nodes that must route to the blocked node directly.
    let others: Vec<String> = flanneld_nodes(c)
        .into_iter()
        .filter(|n| n != blocked)
        .collect();
    let watcher = others
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no flanneld node besides {blocked}"))?;
    let owner = owners(c);
    let affected = |cell: &Cell| {
        !cell.same_node
            && (owner.get(&cell.src).map(String::as_str) == Some(blocked)
                || owner.get(&cell.dst).map(String::as_str) == Some(blocked))
    };
    let rule = |op: &'static str| -> Vec<String> {
        let mut v: Vec<String> = ["iptables", "-w", op, "INPUT"].map(String::from).to_vec();
        if op == "-I" {
            v.push("1".into());
        }
        v.extend(["-p", "udp", "--dport", &port.to_string(), "-j", "DROP"].map(String::from));
        v
    };
    let run_rule = |c: &Cluster, op: &'static str| -> Result<()> {
        let v = rule(op);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        c.exec_ok(blocked, &refs).map(|_| ())
    };
    let mut phases = Vec::new();

    let mut p = Phase::new(
        "baseline",
        format!(
            "healthy cluster, vxlan on UDP {port}, every flanneld with {}",
            FALLBACK_ARGS.join(" ")
        ),
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    let want = path_line(c, blocked, "vxlan");
    let ok = wait_until(Duration::from_secs(10), || {
        node_metrics(c, &watcher).contains(&want)
    });
    p.expect(
        format!("{watcher}: /metrics shows the path to {blocked} as vxlan"),
        ok,
        want.trim().to_string(),
    );
    phases.push(p);

    let mut p = Phase::new(
        "broken",
        format!("iptables -I INPUT 1 -p udp --dport {port} -j DROP on {blocked} only"),
    );
    run_rule(c, "-I")?;
    let blocked_at = Instant::now();
    let m = broken_matrix(c);
    let measured = blocked_at.elapsed();
    expect_split(&mut p, &m, &format!("with {blocked}"), affected, true);
    p.note(format!("matrix measured within {measured:?} of the drop"));
    let direct = path_line(c, blocked, "direct");
    let early: Vec<&String> = others
        .iter()
        .filter(|n| node_metrics(c, n).contains(&direct))
        .collect();
    p.expect(
        "no node had fallen back yet when the broken matrix was taken",
        early.is_empty(),
        format!("already direct on {early:?} after {measured:?}"),
    );
    let broken = m.clone();
    p.matrix = Some(m);
    phases.push(p);

    let mut p = Phase::new(
        "fallback",
        format!("the drop stays; no config change, no restart: the fallback routes {blocked}'s pairs directly"),
    );
    let limit = opts.converge.max(Duration::from_secs(40));
    // Wait for the switch first, so the captures below only see the direct path.
    let want = path_line(c, blocked, "direct");
    let switched = wait_until(limit, || {
        others.iter().all(|n| node_metrics(c, n).contains(&want))
    });
    // …and for the data planes to have applied it (the main loop syncs after the prober
    // published the set): the direct routes on every fallback node.
    let direct_route = |o: &crate::cluster::NodeState| {
        o.subnet
            .map(|s| format!("{s} via {} dev eth0", o.underlay_ip))
    };
    let mut route_wanted: Vec<(String, String)> = others
        .iter()
        .filter_map(|n| Some((n.clone(), direct_route(&b)?)))
        .collect();
    if b_falls_back {
        for o in c.nodes().iter().filter(|o| o.name != blocked) {
            if let Some(r) = direct_route(o) {
                route_wanted.push((blocked.to_string(), r));
            }
        }
    }
    let routed = wait_until(limit, || {
        route_wanted
            .iter()
            .all(|(n, r)| ipv4_routes(c, n).lines().any(|l| l.starts_with(r.as_str())))
    });
    p.expect(
        "every fallback node has its direct routes in place",
        routed,
        format!("{route_wanted:?}"),
    );
    let healed_after = blocked_at.elapsed();
    p.expect(
        format!(
            "/metrics of {} shows the path to {blocked} as direct",
            others.join(", ")
        ),
        switched,
        format!("{} after the drop", fmt_secs(healed_after)),
    );
    let cap_to = c.start_capture(&CaptureOpts {
        filter: Some(vxlan_filter(
            port,
            &format!("dst host {b_ip}"),
            false,
            &vteps,
        )),
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let cap_from = c.start_capture(&CaptureOpts {
        filter: Some(vxlan_filter(
            port,
            &format!("src host {b_ip}"),
            false,
            &vteps,
        )),
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let cap_probes = c.start_capture(&CaptureOpts {
        filter: Some(vxlan_filter(
            port,
            &format!("dst host {b_ip}"),
            true,
            &vteps,
        )),
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let (_, pcap_plain) = capture_during(c, &format!("net {network}"), |c| {
        if b_falls_back {
            return expect_matrix_pass(&mut p, c, limit);
        }
        let m = check_until(c, limit, |x| !known_gap(x));
        let bad: Vec<String> = m
            .cells
            .iter()
            .filter(|x| !known_gap(x) && !x.ok())
            .map(|x| format!("{}->{} {}", x.src, x.dst, x.letters()))
            .collect();
        p.expect(
            format!(
                "matrix: every probe passes but those from {blocked}'s host (its VTEP address)"
            ),
            bad.is_empty(),
            format!("failing: {}", bad.join(", ")),
        );
        let worse: Vec<String> = m
            .cells
            .iter()
            .filter(|x| !x.ok())
            .filter(|x| {
                broken
                    .cells
                    .iter()
                    .any(|y| y.src == x.src && y.dst == x.dst && y.ok())
            })
            .map(|x| format!("{}->{}", x.src, x.dst))
            .collect();
        p.expect(
            "matrix: no worse than without the fallback (every pair that passed before still passes)",
            worse.is_empty(),
            format!("newly failing: {}", worse.join(", ")),
        );
        let gap: Vec<String> = m
            .cells
            .iter()
            .filter(|x| known_gap(x))
            .map(|x| format!("{}->{} {}", x.src, x.dst, x.letters()))
            .collect();
        p.note(format!(
            "{blocked} (upstream) host to pods, left on VXLAN by design: {}",
            gap.join(", ")
        ));
        p.matrix = Some(m);
    })?;
    let healed_after = blocked_at.elapsed();
    p.expect(
        "the matrix heals within 35 s of the drop (3 missed probes at 6 s, a sync, a matrix)",
        healed_after <= Duration::from_secs(35),
        format!("healed after {}", fmt_secs(healed_after)),
    );
    p.note(format!(
        "matrix passes {} after the drop",
        fmt_secs(healed_after)
    ));
    // Let at least one probe round go by inside the captures.
    std::thread::sleep(Duration::from_millis(6500));
    let to = crate::capture::verify_pcap(&c.stop_capture(&cap_to.name)?, port)?;
    let from = crate::capture::verify_pcap(&c.stop_capture(&cap_from.name)?, port)?;
    let probes = crate::capture::verify_pcap(&c.stop_capture(&cap_probes.name)?, port)?;
    let plain = crate::capture::verify_pcap(&pcap_plain, port)?;
    p.expect(
        format!("capture: no pod traffic over VXLAN to {blocked} ({b_ip}) on the direct path"),
        to.frames == 0,
        format!("{} frames", to.frames),
    );
    if b_falls_back {
        p.expect(
            format!("capture: no pod traffic over VXLAN from {blocked} either (it fell back too)"),
            from.frames == 0,
            format!("{} frames", from.frames),
        );
    } else {
        p.expect(
            format!(
                "capture: {blocked} (upstream, no fallback) still sends its replies over VXLAN"
            ),
            from.frames > 0,
            format!("{} frames", from.frames),
        );
    }
    p.expect(
        format!("capture: the VTEP of {blocked} is still probed over VXLAN (inner ICMP)"),
        probes.frames > 0,
        format!("{} frames", probes.frames),
    );
    p.expect(
        format!("capture: pod traffic crosses the underlay unencapsulated ({network})"),
        plain.frames > 0 && plain.vxlan_frames == 0,
        format!("{} frames, {} VXLAN", plain.frames, plain.vxlan_frames),
    );
    p.captures
        .push((format!("VXLAN to {b_ip}, not ICMP (must be empty)"), to));
    p.captures
        .push((format!("VXLAN from {b_ip}, not ICMP"), from));
    p.captures
        .push((format!("VXLAN to {b_ip}, ICMP probes"), probes));
    p.captures.push((format!("net {network}"), plain));
    let (b_subnet, b_vtep) = match b.subnet {
        Some(s) => (s.to_string(), s.network().to_string()),
        None => bail!("{blocked} has no subnet"),
    };
    for n in &others {
        let routes = ipv4_routes(c, n);
        let direct = format!("{b_subnet} via {b_ip} dev eth0");
        let vtep = format!("{b_vtep} ");
        p.expect(
            format!("{n}: {direct}, and {b_vtep}/32 stays on the overlay device"),
            routes.lines().any(|l| l.starts_with(&direct))
                && routes
                    .lines()
                    .any(|l| l.starts_with(&vtep) && l.contains("dev flannel")),
            routes.lines().collect::<Vec<_>>().join("; "),
        );
        let log = std::fs::read_to_string(c.flanneld_log(n)).unwrap_or_default();
        let line = format!("host-gw fallback, routing its subnet directly via {b_ip}");
        p.expect(
            format!("{n}: one log line names {blocked} and why"),
            log.lines().filter(|l| l.contains(&line)).count() == 1
                && log
                    .lines()
                    .any(|l| l.contains(&line) && l.contains("went unanswered")),
            line,
        );
    }
    if b_falls_back {
        let routes = ipv4_routes(c, blocked);
        let missing: Vec<String> = c
            .nodes()
            .iter()
            .filter(|o| o.name != blocked)
            .filter_map(|o| {
                let want = format!("{} via {} dev eth0", o.subnet?, o.underlay_ip);
                (!routes.lines().any(|l| l.starts_with(&want))).then_some(want)
            })
            .collect();
        p.expect(
            format!("{blocked}: routes every peer directly (its probes' replies are dropped)"),
            missing.is_empty(),
            format!("missing: {}", missing.join(", ")),
        );
    }
    phases.push(p);

    let mut p = Phase::new(
        "lifted",
        format!("the DROP of UDP {port} on {blocked} deleted: back to VXLAN after the 5 s damping window"),
    );
    run_rule(c, "-D")?;
    let lifted_at = Instant::now();
    let want = path_line(c, blocked, "vxlan");
    let back = wait_until(limit, || {
        others.iter().all(|n| node_metrics(c, n).contains(&want))
    });
    p.expect(
        format!(
            "/metrics of {} shows the path to {blocked} as vxlan again",
            others.join(", ")
        ),
        back,
        format!("{} after lifting", fmt_secs(lifted_at.elapsed())),
    );
    let switches = format!(
        "flannel_peer_path_switches_total{{subnet=\"{}\",public_ip=\"{b_ip}\"}} 2\n",
        b_subnet
    );
    let text = node_metrics(c, &watcher);
    p.expect(
        format!("{watcher}: exactly 2 switches for {blocked} (there and back)"),
        text.contains(&switches),
        switches.trim().to_string(),
    );
    if b_falls_back {
        let want: Vec<String> = others.iter().map(|o| path_line(c, o, "vxlan")).collect();
        let ok = wait_until(limit, || {
            let t = node_metrics(c, blocked);
            want.iter().all(|w| t.contains(w))
        });
        p.expect(
            format!("{blocked}: every peer back on vxlan"),
            ok,
            want.join(""),
        );
    }
    let (_, pcap_vx) = capture_during(
        c,
        &vxlan_filter(port, &format!("dst host {b_ip}"), false, &vteps),
        |c| expect_matrix_pass(&mut p, c, limit),
    )?;
    let vx = crate::capture::verify_pcap(&pcap_vx, port)?;
    p.expect(
        format!("capture: pod traffic to {blocked} is VXLAN again, checksums valid"),
        vx.vxlan_frames > 0 && vx.bad_total() == 0,
        vx.to_string().replace('\n', "; "),
    );
    p.captures.push((format!("VXLAN to {b_ip}, not ICMP"), vx));
    for n in &others {
        let routes = ipv4_routes(c, n);
        let direct = format!("{b_subnet} via {b_ip} dev eth0");
        let vtep = format!("{b_vtep} ");
        p.expect(
            format!("{n}: no direct route and no /32 to {blocked} left"),
            !routes
                .lines()
                .any(|l| l.starts_with(&direct) || l.starts_with(&vtep)),
            routes.lines().collect::<Vec<_>>().join("; "),
        );
    }
    phases.push(p);
    Ok(phases)
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
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
            dst_ip: Ipv4Addr::new(10, 244, 0, 2),
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
