//! Field problem P3, its causes one by one: ip_forward off, a FORWARD REJECT rule, security
//! software, the VXLAN port dropped (fixed by moving the port or by host-gw). Each is a
//! [`Cause`] that [`baseline_break_fix`] runs; so is the host-gw fallback (`fallback.rs`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

use crate::capture::CaptureOpts;
use crate::check::{Cell, Matrix};
use crate::cluster::{Cluster, NodeKind, NodeState};
use crate::cmd;
use crate::doctor::Level;
use crate::lease::NetConf;

use super::{
    broken_matrix, capture_during, expect_matrix_pass, expect_split, first_of, flanneld_nodes,
    forwarded_by, no_fail, owners, Phase, ScenarioOpts, MOVED_PORT,
};

/// The pairs a break cuts, with the label the matrix assertion names them by.
pub(super) type Affected<'a> = (String, Box<dyn Fn(&Cell) -> bool + 'a>);

/// One P3 cause as the field report tells it: a healthy cluster, the break, the fix. State a
/// later phase needs (captures, timings) is carried in the value.
pub(super) trait Cause {
    /// What the baseline phase shows.
    fn baseline(&self) -> String {
        "healthy cluster".into()
    }
    /// Expectations on the healthy cluster beyond the matrix (baseline and, by default, after
    /// the fix).
    fn healthy(&self, _p: &mut Phase, _c: &Cluster) {}
    /// Breaks the cluster; returns the (empty) phase that saw it, named and described.
    fn break_it(&mut self, c: &mut Cluster) -> Result<Phase>;
    /// The pairs the break cuts; None: it cuts nothing and the matrix still passes.
    fn affected(&self) -> Option<Affected<'_>>;
    /// The matrix of the broken cluster.
    fn broken_matrix(&mut self, c: &mut Cluster) -> Result<Matrix> {
        Ok(broken_matrix(c))
    }
    /// Expectations on the broken cluster beyond the matrix (doctor naming the cause).
    fn broken(&mut self, p: &mut Phase, c: &mut Cluster) -> Result<()>;
    /// An extra phase while the break stays (the host-gw fallback healing it without a fix);
    /// None: the fix follows the broken phase.
    fn while_broken(&mut self, _c: &mut Cluster, _opts: &ScenarioOpts) -> Result<Option<Phase>> {
        Ok(None)
    }
    /// Applies the report's fix; returns the (empty) phase that saw it.
    fn fix(&mut self, c: &mut Cluster) -> Result<Phase>;
    /// Expectations once fixed: by default the matrix passes again and
    /// [`healthy`](Cause::healthy) holds.
    fn fixed(&mut self, p: &mut Phase, c: &mut Cluster, opts: &ScenarioOpts) -> Result<()> {
        expect_matrix_pass(p, c, opts.converge);
        self.healthy(p, c);
        Ok(())
    }
}

/// The P3 shape: baseline (the matrix passes), broken (it fails for exactly the affected
/// pairs, same-node pairs not judged; or still passes when nothing is cut) with doctor naming
/// the cause, then [`Cause::while_broken`]'s phase if any, fixed (everything passes again).
pub(super) fn baseline_break_fix(
    c: &mut Cluster,
    opts: &ScenarioOpts,
    mut cause: impl Cause,
) -> Result<Vec<Phase>> {
    let mut baseline = Phase::new("baseline", cause.baseline());
    expect_matrix_pass(&mut baseline, c, opts.converge);
    cause.healthy(&mut baseline, c);

    let mut broken = cause.break_it(c)?;
    let cuts = cause.affected().is_some();
    if cuts {
        let m = cause.broken_matrix(c)?;
        if let Some((label, affected)) = cause.affected() {
            expect_split(&mut broken, &m, &label, affected, true);
        }
        broken.matrix = Some(m);
    }
    cause.broken(&mut broken, c)?;
    if !cuts {
        // The break hooks nothing: the matrix must still pass.
        expect_matrix_pass(&mut broken, c, opts.converge);
    }

    let mut phases = vec![baseline, broken];
    phases.extend(cause.while_broken(c, opts)?);

    let mut fixed = cause.fix(c)?;
    cause.fixed(&mut fixed, c, opts)?;
    phases.push(fixed);
    Ok(phases)
}

/// The pairs whose traffic `t` forwards (see [`forwarded_by`]).
fn forwarded_through<'a>(owner: &'a HashMap<String, String>, t: &'a str) -> Option<Affected<'a>> {
    Some((
        format!("forwarded by {t}"),
        Box::new(move |cell: &Cell| forwarded_by(owner, cell, t)),
    ))
}

/// Cause 1: `net.ipv4.ip_forward=0` on `t`.
struct IpForward {
    t: String,
    other: String,
    owner: HashMap<String, String>,
}

impl IpForward {
    fn set(&self, c: &Cluster, v: &str) -> Result<Phase> {
        let ns = c.resolve_ns(&self.t)?;
        cmd::sysctl(&ns, "net.ipv4.ip_forward", v)?;
        let mut what = format!("sysctl -w net.ipv4.ip_forward={v}");
        if c.ip_family().has_v6() {
            // The IPv6 twin, so that both families' forwarded pairs break.
            cmd::sysctl(&ns, "net.ipv6.conf.all.forwarding", v)?;
            what.push_str(&format!(" net.ipv6.conf.all.forwarding={v}"));
        }
        Ok(Phase::new(
            if v == "0" { "broken" } else { "fixed" },
            format!("{what} on {}", self.t),
        ))
    }
}

impl Cause for IpForward {
    fn healthy(&self, p: &mut Phase, c: &Cluster) {
        p.expect_doctor(c, &self.t, "PASS ip-forward, no FAIL", |r| {
            r.has(Level::Pass, "ip-forward") && no_fail(r)
        });
    }
    fn break_it(&mut self, c: &mut Cluster) -> Result<Phase> {
        self.set(c, "0")
    }
    fn affected(&self) -> Option<Affected<'_>> {
        forwarded_through(&self.owner, &self.t)
    }
    fn broken(&mut self, p: &mut Phase, c: &mut Cluster) -> Result<()> {
        p.expect_doctor(c, &self.t, "FAIL ip-forward", |r| {
            r.has(Level::Fail, "ip-forward")
        });
        p.expect_doctor(
            c,
            &self.other,
            "no FAIL ip-forward (its own forwarding is on)",
            |r| !r.has(Level::Fail, "ip-forward"),
        );
        Ok(())
    }
    fn fix(&mut self, c: &mut Cluster) -> Result<Phase> {
        self.set(c, "1")
    }
}

pub(super) fn p3_ip_forward(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let t = first_of(c, NodeKind::Kernel)?;
    let other = flanneld_nodes(c)
        .into_iter()
        .find(|n| *n != t)
        .ok_or_else(|| anyhow!("needs two flanneld nodes"))?;
    let owner = owners(c);
    baseline_break_fix(c, opts, IpForward { t, other, owner })
}

/// `iptables -w <op> <chain> [1] <rule>`: `-I` inserts at the head of the chain.
fn iptables_args<'a>(op: &'a str, chain: &'a str, rule: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["iptables", "-w", op, chain];
    if op == "-I" {
        v.push("1");
    }
    v.extend(rule);
    v
}

/// `iptables <op> FORWARD [1] -j REJECT --reject-with icmp-host-prohibited`.
fn reject_args(op: &'static str) -> Vec<&'static str> {
    iptables_args(
        op,
        "FORWARD",
        &["-j", "REJECT", "--reject-with", "icmp-host-prohibited"],
    )
}

/// The ip6tables twin of an iptables command line.
fn ip6(mut args: Vec<&str>) -> Vec<&str> {
    if let Some(first) = args.first_mut() {
        *first = "ip6tables";
    }
    args
}

/// `ip6tables <op> FORWARD [1] -j REJECT --reject-with icmp6-adm-prohibited` (arguments
/// after the tool name as [`reject_args`] builds them).
fn reject6_args(op: &'static str) -> Vec<&'static str> {
    iptables_args(
        op,
        "FORWARD",
        &["-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"],
    )
}

/// Cause 3: a REJECT rule ahead of the accept rules in `t`'s FORWARD chain.
struct ForwardReject {
    t: String,
    owner: HashMap<String, String>,
}

impl ForwardReject {
    fn rule(&self, c: &Cluster, op: &'static str, name: &str) -> Result<Phase> {
        c.exec_ok(&self.t, &reject_args(op))?;
        if c.ip_family().has_v6() {
            c.exec_ok(&self.t, &ip6(reject6_args(op)))?;
        }
        let pos = if op == "-I" { " 1" } else { "" };
        Ok(Phase::new(
            name,
            format!(
                "iptables {op} FORWARD{pos} -j REJECT --reject-with icmp-host-prohibited on {}",
                self.t
            ),
        ))
    }
}

impl Cause for ForwardReject {
    fn healthy(&self, p: &mut Phase, c: &Cluster) {
        p.expect_doctor(c, &self.t, "no FAIL forward-reject, no FAIL", |r| {
            !r.has(Level::Fail, "forward-reject") && no_fail(r)
        });
    }
    fn break_it(&mut self, c: &mut Cluster) -> Result<Phase> {
        self.rule(c, "-I", "broken")
    }
    fn affected(&self) -> Option<Affected<'_>> {
        forwarded_through(&self.owner, &self.t)
    }
    fn broken(&mut self, p: &mut Phase, c: &mut Cluster) -> Result<()> {
        p.expect_doctor(
            c,
            &self.t,
            "FAIL forward-reject quoting the REJECT rule",
            |r| {
                r.has_mentioning(Level::Fail, "forward-reject", "REJECT")
                    && r.has_mentioning(Level::Fail, "forward-reject", "icmp-host-prohibited")
            },
        );
        Ok(())
    }
    fn fix(&mut self, c: &mut Cluster) -> Result<Phase> {
        self.rule(c, "-D", "fixed")
    }
}

pub(super) fn p3_forward_reject(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let t = first_of(c, NodeKind::Userspace)?;
    let owner = owners(c);
    baseline_break_fix(c, opts, ForwardReject { t, owner })
}

/// Cause 4: security software (a copy of `sleep` named `kesl`, stopped by PID) and a
/// firewalld chain on `t`. Both only warn: the matrix passes throughout.
struct SecuritySoftware {
    t: String,
    /// The fake `kesl` while it runs.
    pid: Option<u32>,
}

impl Cause for SecuritySoftware {
    fn baseline(&self) -> String {
        "healthy cluster, no kesl process, no firewalld chains".into()
    }
    fn healthy(&self, p: &mut Phase, c: &Cluster) {
        p.expect_doctor(
            c,
            &self.t,
            "no WARN host-firewall naming FORWARD_IN_ZONES",
            |r| !r.has_mentioning(Level::Warn, "host-firewall", "FORWARD_IN_ZONES"),
        );
    }
    fn break_it(&mut self, c: &mut Cluster) -> Result<Phase> {
        let t = self.t.clone();
        let kesl = c.run_dir().join("kesl");
        std::fs::copy("/bin/sleep", &kesl).context("copy /bin/sleep to kesl")?;
        let kesl_s = kesl.to_string_lossy().into_owned();
        let log = c.run_dir().join("kesl.log");
        // 120 s at most even if nothing stops it; normally it lives for one doctor run (and
        // the cluster stops it by PID on teardown).
        let (child, rec) = cmd::spawn_in_ns(
            &c.resolve_ns(&t)?,
            &[&kesl_s, "120"],
            &log,
            "kesl (fake security software)",
        )?;
        self.pid = Some(rec.pid);
        c.adopt(rec, child);
        c.exec_ok(&t, &["iptables", "-w", "-N", "FORWARD_IN_ZONES"])?;
        Ok(Phase::new(
            "present",
            format!(
                "a copy of /bin/sleep named kesl running in {t} (bounded, stopped by PID); \
                 iptables -N FORWARD_IN_ZONES on {t}"
            ),
        ))
    }
    fn affected(&self) -> Option<Affected<'_>> {
        None
    }
    fn broken(&mut self, p: &mut Phase, c: &mut Cluster) -> Result<()> {
        let pid = self.pid.unwrap_or_default();
        let pid_s = pid.to_string();
        let what = format!("WARN security-software naming kesl (pid {pid})");
        let doctor = p.expect_doctor(c, &self.t, &what, |r| {
            r.find(Level::Warn, "security-software")
                .any(|w| w.text().contains("kesl") && w.text().contains(&pid_s))
        });
        if let Some(i) = doctor {
            p.expect_on_doctor(i, "WARN host-firewall naming FORWARD_IN_ZONES", |r| {
                r.has_mentioning(Level::Warn, "host-firewall", "FORWARD_IN_ZONES")
            });
        }
        Ok(())
    }
    fn fix(&mut self, c: &mut Cluster) -> Result<Phase> {
        if let Some(pid) = self.pid {
            c.release(pid);
        }
        c.exec_ok(&self.t, &["iptables", "-w", "-X", "FORWARD_IN_ZONES"])?;
        Ok(Phase::new(
            "removed",
            format!(
                "kesl stopped by PID; iptables -X FORWARD_IN_ZONES on {}",
                self.t
            ),
        ))
    }
    fn fixed(&mut self, p: &mut Phase, c: &mut Cluster, _opts: &ScenarioOpts) -> Result<()> {
        let pid_s = self.pid.unwrap_or_default().to_string();
        p.expect_doctor(c, &self.t, "neither WARN any more", |r| {
            !r.find(Level::Warn, "security-software")
                .any(|w| w.text().contains(&pid_s))
                && !r.has_mentioning(Level::Warn, "host-firewall", "FORWARD_IN_ZONES")
        });
        Ok(())
    }
}

pub(super) fn p3_security_software(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let t = c
        .nodes_of(NodeKind::Kernel)
        .last()
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("needs a kernel node"))?;
    baseline_break_fix(c, opts, SecuritySoftware { t, pid: None })
}

/// `iptables <op> INPUT [1] -p udp --dport <port> -j DROP` on `node`: `-C` tells whether the
/// rule is there, `-I`/`-D` must succeed.
pub(super) fn udp_drop(c: &Cluster, node: &str, port: u16, op: &'static str) -> Result<bool> {
    let port = port.to_string();
    let args = iptables_args(op, "INPUT", &["-p", "udp", "--dport", &port, "-j", "DROP"]);
    // With IPv6 in the run the same rule goes into ip6tables (VXLAN over the IPv6 underlay).
    let mut all = vec![args.clone()];
    if c.ip_family().has_v6() {
        all.push(ip6(args));
    }
    if op == "-C" {
        for a in &all {
            if !c.exec(node, a)?.status.success() {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    for a in &all {
        c.exec_ok(node, a)?;
    }
    Ok(true)
}

/// `iptables -I INPUT 1 -p udp --dport <port> -j DROP` in every node namespace (a security
/// group between the nodes), unless already there.
fn block_udp_port(c: &Cluster, port: u16) -> Result<()> {
    for n in c.node_names() {
        if !udp_drop(c, &n, port, "-C")? {
            udp_drop(c, &n, port, "-I")?;
        }
    }
    Ok(())
}

/// The report's two fixes for cause 2.
enum VxlanFix {
    /// Move `Backend.Port` to [`MOVED_PORT`] (every flanneld restarted).
    MovePort,
    /// Switch to host-gw: nodes sharing layer 2 need no UDP at all.
    HostGw,
}

/// Cause 2: the VXLAN port dropped between all nodes (a security group); doctor runs on `t`.
struct VxlanBlocked {
    t: String,
    port: u16,
    /// Nodes running flanneld.
    nodes: Vec<String>,
    fix: VxlanFix,
    /// The capture of the broken matrix.
    pcap: Option<PathBuf>,
    conf: NetConf,
}

impl Cause for VxlanBlocked {
    fn baseline(&self) -> String {
        match self.fix {
            VxlanFix::MovePort => format!("healthy cluster on UDP {}", self.port),
            VxlanFix::HostGw => format!("healthy cluster, vxlan on UDP {}", self.port),
        }
    }
    fn healthy(&self, p: &mut Phase, c: &Cluster) {
        if let VxlanFix::MovePort = self.fix {
            let peers = self.nodes.len() - 1;
            p.expect_doctor(
                c,
                &self.t,
                "PASS peer-reachable for every peer, no FAIL",
                |r| r.find(Level::Pass, "peer-reachable").count() >= peers && no_fail(r),
            );
        }
    }
    fn break_it(&mut self, c: &mut Cluster) -> Result<Phase> {
        let port = self.port;
        block_udp_port(c, port)?;
        Ok(Phase::new(
            "broken",
            format!(
                "iptables -I INPUT 1 -p udp --dport {port} -j DROP in every node namespace (a security group)"
            ),
        ))
    }
    fn affected(&self) -> Option<Affected<'_>> {
        Some((
            "between nodes".into(),
            Box::new(|cell: &Cell| !cell.same_node),
        ))
    }
    fn broken_matrix(&mut self, c: &mut Cluster) -> Result<Matrix> {
        let (m, pcap) =
            capture_during(c, &format!("udp port {}", self.port), |c| broken_matrix(c))?;
        self.pcap = Some(pcap);
        Ok(m)
    }
    /// The capture shows VXLAN still leaving, and doctor on `t` names every peer as unreachable
    /// on that port with a fix naming Backend.Port (and host-gw).
    fn broken(&mut self, p: &mut Phase, c: &mut Cluster) -> Result<()> {
        let (t, port) = (self.t.as_str(), self.port);
        let pcap = self.pcap.take().ok_or_else(|| anyhow!("no capture"))?;
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
        Ok(())
    }
    fn fix(&mut self, c: &mut Cluster) -> Result<Phase> {
        let (json, about) = match self.fix {
            VxlanFix::MovePort => (
                with_port(&c.state().net_conf, MOVED_PORT)?,
                format!("net-conf Backend.Port = {MOVED_PORT}"),
            ),
            VxlanFix::HostGw => (
                with_host_gw(&c.state().net_conf)?,
                "net-conf Backend = {\"Type\":\"host-gw\"}".to_string(),
            ),
        };
        c.set_net_conf(&json)?;
        c.restart_all_flanneld()?;
        let drop = match self.fix {
            VxlanFix::MovePort => format!("{}", self.port),
            VxlanFix::HostGw => format!("UDP {}", self.port),
        };
        Ok(Phase::new(
            "fixed",
            format!(
                "{about} in the {} store, every flanneld restarted; the DROP of {drop} stays",
                c.store_kind()
            ),
        ))
    }
    fn fixed(&mut self, p: &mut Phase, c: &mut Cluster, opts: &ScenarioOpts) -> Result<()> {
        match self.fix {
            VxlanFix::MovePort => moved_port_fixed(p, c, opts, self),
            VxlanFix::HostGw => host_gw_fixed(p, c, opts, self),
        }
    }
}

pub(super) fn p3_vxlan_hostgw(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
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
    let cause = vxlan_blocked(c, VxlanFix::HostGw, conf)?;
    baseline_break_fix(c, opts, cause)
}

pub(super) fn p3_vxlan_port(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    if !c.nodes_of(NodeKind::KernelRef).is_empty() {
        bail!("p3-vxlan-port restarts flanneld to move the port: kernel-ref nodes cannot follow");
    }
    let conf = c.net_conf()?;
    if conf.effective_port() == MOVED_PORT {
        bail!("the run already uses port {MOVED_PORT}");
    }
    let cause = vxlan_blocked(c, VxlanFix::MovePort, conf)?;
    baseline_break_fix(c, opts, cause)
}

/// The cause on the first flanneld node, the port the run uses.
fn vxlan_blocked(c: &Cluster, fix: VxlanFix, conf: NetConf) -> Result<VxlanBlocked> {
    let nodes = flanneld_nodes(c);
    let t = nodes
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no flanneld node"))?;
    Ok(VxlanBlocked {
        t,
        port: conf.effective_port(),
        nodes,
        fix,
        pcap: None,
        conf,
    })
}

/// The current net-conf with `Backend` replaced by `{"Type":"host-gw"}`.
pub(super) fn with_host_gw(net_conf: &str) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(net_conf)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("net-conf is not a JSON object"))?;
    obj.insert("Backend".into(), serde_json::json!({"Type": "host-gw"}));
    Ok(serde_json::to_string(&v)?)
}

/// After the switch to host-gw: nothing on the VXLAN port, pod traffic unencapsulated, a
/// host-gw route on every node to every other node's subnet, doctor without FAIL.
fn host_gw_fixed(
    p: &mut Phase,
    c: &mut Cluster,
    opts: &ScenarioOpts,
    v: &VxlanBlocked,
) -> Result<()> {
    let (t, port, conf) = (v.t.as_str(), v.port, &v.conf);
    let cap_vxlan = c.start_capture(&CaptureOpts {
        filter: Some(format!("udp port {port}")),
        max_seconds: 120,
        ..CaptureOpts::default()
    })?;
    let network = conf.network.to_string();
    let (_, pcap_pods) = capture_during(c, &format!("net {network}"), |c| {
        expect_matrix_pass(p, c, opts.converge)
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
        let missing = missing_direct_routes(c, &n.name);
        p.expect(
            format!(
                "{}: a host-gw route to every other node's subnet of each family",
                n.name
            ),
            missing.is_empty(),
            format!("missing: {}", missing.join(", ")),
        );
    }
    p.expect_doctor(c, t, "no FAIL on host-gw", no_fail);
    Ok(())
}

/// `ip -4 route show` (`v6`: `ip -6`) in `node`'s namespace (empty if that fails).
pub(super) fn routes(c: &Cluster, node: &str, v6: bool) -> String {
    let family = if v6 { "-6" } else { "-4" };
    c.exec_ok(node, &["ip", family, "route", "show"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One address family of a node: its lease's subnet, VTEP address (that subnet's network
/// address) and underlay address.
pub(super) struct Family {
    pub(super) v6: bool,
    pub(super) subnet: String,
    pub(super) vtep: String,
    pub(super) underlay: String,
}

impl Family {
    /// The families `o` has a lease of, IPv4 first.
    pub(super) fn of(o: &NodeState) -> Vec<Family> {
        let v4 = o.subnet.map(|s| Family {
            v6: false,
            subnet: s.to_string(),
            vtep: s.network().to_string(),
            underlay: o.underlay_ip.to_string(),
        });
        let v6 = o.subnet6.zip(o.underlay_ip6).map(|(s, ip)| Family {
            v6: true,
            subnet: s.to_string(),
            vtep: s.network().to_string(),
            underlay: ip.to_string(),
        });
        v4.into_iter().chain(v6).collect()
    }

    /// The direct (host-gw) route to this family's subnet: `<subnet> via <underlay> dev eth0`.
    pub(super) fn direct_route(&self) -> String {
        format!("{} via {} dev eth0", self.subnet, self.underlay)
    }

    /// `/32` or `/128`.
    pub(super) fn host_len(&self) -> &'static str {
        if self.v6 {
            "/128"
        } else {
            "/32"
        }
    }

    /// The probes' protocol: `ICMP` or `ICMPv6`.
    pub(super) fn icmp(&self) -> &'static str {
        if self.v6 {
            "ICMPv6"
        } else {
            "ICMP"
        }
    }
}

/// The direct (host-gw) routes `node` lacks: [`Family::direct_route`] of every family of
/// every other node.
pub(super) fn missing_direct_routes(c: &Cluster, node: &str) -> Vec<String> {
    let tables = [routes(c, node, false), routes(c, node, true)];
    c.nodes()
        .iter()
        .filter(|o| o.name != node)
        .flat_map(Family::of)
        .filter_map(|f| {
            let want = f.direct_route();
            let table = &tables[usize::from(f.v6)];
            (!table.lines().any(|l| l.starts_with(&want))).then_some(want)
        })
        .collect()
}

/// The current net-conf with `Backend.Port` set.
pub(super) fn with_port(net_conf: &str, port: u16) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(net_conf)?;
    let backend = v
        .get_mut("Backend")
        .and_then(|b| b.as_object_mut())
        .ok_or_else(|| anyhow!("net-conf has no Backend object"))?;
    backend.insert("Port".into(), serde_json::json!(port));
    Ok(serde_json::to_string(&v)?)
}

/// After the port move: the devices and sockets on the new port, its traffic VXLAN with valid
/// checksums, nothing on the old one, doctor PASS peer-reachable on the new port.
fn moved_port_fixed(
    p: &mut Phase,
    c: &mut Cluster,
    opts: &ScenarioOpts,
    v: &VxlanBlocked,
) -> Result<()> {
    let (t, old_port, nodes) = (v.t.as_str(), v.port, &v.nodes);
    let dev = format!("flannel.{}", v.conf.vni);
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
        expect_matrix_pass(p, c, opts.converge)
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
    p.expect_doctor(c, t, &what, |r| {
        r.find(Level::Pass, "peer-reachable")
            .filter(|x| x.message.contains(&moved))
            .count()
            >= nodes.len() - 1
            && no_fail(r)
    });
    Ok(())
}
