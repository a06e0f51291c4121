//! Field problem P3, its causes one by one: ip_forward off, a FORWARD REJECT rule, security software, the VXLAN port dropped (fixed by moving the port or by host-gw).

use anyhow::{anyhow, bail, Context, Result};

use crate::capture::CaptureOpts;
use crate::cluster::{Cluster, NodeKind};
use crate::cmd;
use crate::doctor::Level;

use super::{
    broken_matrix, capture_during, expect_matrix_pass, expect_split, first_of, flanneld_nodes,
    forwarded_by, no_fail, owners, Phase, ScenarioOpts, MOVED_PORT,
};

pub(super) fn p3_ip_forward(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
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

pub(super) fn p3_forward_reject(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
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

pub(super) fn p3_security_software(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
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
pub(super) fn with_host_gw(net_conf: &str) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(net_conf)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("net-conf is not a JSON object"))?;
    obj.insert("Backend".into(), serde_json::json!({"Type": "host-gw"}));
    Ok(serde_json::to_string(&v)?)
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
pub(super) fn with_port(net_conf: &str, port: u16) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(net_conf)?;
    let backend = v
        .get_mut("Backend")
        .and_then(|b| b.as_object_mut())
        .ok_or_else(|| anyhow!("net-conf has no Backend object"))?;
    backend.insert("Port".into(), serde_json::json!(port));
    Ok(serde_json::to_string(&v)?)
}

pub(super) fn p3_vxlan_port(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
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
