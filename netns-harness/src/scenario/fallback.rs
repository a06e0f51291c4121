//! Issue #17: the VXLAN port dropped on one node of a layer-2 segment, healed by `--host-gw-fallback` without a config change and back on VXLAN once the drop is lifted.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::capture::CaptureOpts;
use crate::check::{Cell, Matrix, SourceKind};
use crate::cluster::Cluster;
use crate::sys;

use super::{
    broken_matrix, capture_during, expect_matrix_pass, expect_split, flanneld_nodes, fmt_secs,
    owners, Phase, ScenarioOpts, FALLBACK_ARGS, FALLBACK_METRICS_PORT,
};

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

pub(super) fn p3_fallback(
    c: &mut Cluster,
    opts: &ScenarioOpts,
    blocked: &str,
) -> Result<Vec<Phase>> {
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
