//! Issue #17: the VXLAN port dropped on one node of a layer-2 segment, healed by `--host-gw-fallback` without a config change and back on VXLAN once the drop is lifted.
//! A P3 [`Cause`] with an extra phase: baseline, broken, fallback, lifted.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::capture::CaptureOpts;
use crate::check::{Cell, Matrix, SourceKind};
use crate::cluster::Cluster;
use crate::sys;

use super::p3::{
    baseline_break_fix, missing_direct_routes, routes, udp_drop, Affected, Cause, Family,
};
use super::{
    broken_matrix, captures_during, expect_matrix_pass, flanneld_nodes, fmt_secs, owners, Phase,
    ScenarioOpts, FALLBACK_ARGS, FALLBACK_METRICS_PORT,
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

/// `flannel_peer_path{…,path="<path>"} 1` for each of `peer`'s leases (one per family).
fn path_lines(c: &Cluster, peer: &str, path: &str) -> Vec<String> {
    c.node(peer)
        .map(Family::of)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            format!(
                "flannel_peer_path{{subnet=\"{}\",public_ip=\"{}\",path=\"{path}\"}} 1\n",
                f.subnet, f.underlay
            )
        })
        .collect()
}

/// True when `text` holds every one of `lines`.
fn has_all(text: &str, lines: &[String]) -> bool {
    lines.iter().all(|l| text.contains(l.as_str()))
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

/// [`vxlan_filter`] for VXLAN over IPv6 (outer IPv6 header without extension headers, so the
/// inner IPv6 header starts at byte 70: next header at 76, destination at 94): libpcap's
/// `udp[…]` only indexes UDP over IPv4.
fn vxlan_filter6(port: u16, hosts: &str, icmp: bool, vteps: &[Ipv6Addr]) -> String {
    if icmp {
        return format!("ip6 and udp port {port} and {hosts} and ip6[76] = 58");
    }
    let mut f = format!("ip6 and udp port {port} and {hosts} and ip6[76] != 58");
    for v in vteps {
        let words: Vec<String> = v
            .octets()
            .chunks(4)
            .zip([94, 98, 102, 106])
            .map(|(w, at)| {
                let w = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
                format!("ip6[{at}:4] = 0x{w:08x}")
            })
            .collect();
        f.push_str(&format!(" and not ({})", words.join(" and ")));
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

/// The drop on `blocked`, the fallback healing it, the drop lifted. Carries what the phases
/// share: the nodes' roles and the timings across phases.
struct HostGwFallback {
    blocked: String,
    /// Whether `blocked` runs flannel-rs (and so falls back itself).
    b_falls_back: bool,
    /// The blocked node's families, IPv4 first.
    families: Vec<Family>,
    port: u16,
    /// The pod Network of each family.
    networks: Vec<String>,
    /// Every node's VTEP address (the network address of its subnet), per family.
    vteps: Vec<Ipv4Addr>,
    vteps6: Vec<Ipv6Addr>,
    /// The flannel-rs nodes that must route to `blocked` directly.
    others: Vec<String>,
    /// The first of `others`, whose /metrics the baseline and lifted phases read.
    watcher: String,
    owner: HashMap<String, String>,
    /// When the drop went in.
    blocked_at: Instant,
    /// How long after the drop the broken matrix was taken.
    measured: Duration,
    /// The broken matrix (the fallback must be no worse).
    broken: Option<Matrix>,
    /// When the drop was deleted.
    lifted_at: Instant,
}

/// Per node: its name, its routes of one family and those joined for a detail line.
type NodeRoutes<'a> = Vec<(&'a str, String, String)>;

/// How long the fallback and lifted phases wait for a switch and the matrix.
fn limit(opts: &ScenarioOpts) -> Duration {
    opts.converge.max(Duration::from_secs(40))
}

impl HostGwFallback {
    fn new(c: &Cluster, blocked: &str) -> Result<HostGwFallback> {
        if c.state().sites {
            bail!("the host-gw fallback scenarios need every node on one layer-2 segment");
        }
        let conf = c.net_conf()?;
        if conf.backend_type != "vxlan" {
            bail!("the run uses backend {:?}, not vxlan", conf.backend_type);
        }
        let b = c
            .node(blocked)
            .cloned()
            .ok_or_else(|| anyhow!("no node {blocked}"))?;
        let others: Vec<String> = flanneld_nodes(c)
            .into_iter()
            .filter(|n| n != blocked)
            .collect();
        let Some(watcher) = others.first().cloned() else {
            bail!("no flanneld node besides {blocked}");
        };
        let families = Family::of(&b);
        if families.is_empty() {
            bail!("{blocked} has no subnet");
        }
        let network6 = conf.ipv6.as_ref().map(|v6| v6.network.to_string());
        Ok(HostGwFallback {
            blocked: blocked.to_string(),
            b_falls_back: b.kind.runs_flanneld(),
            families,
            port: conf.effective_port(),
            networks: conf
                .enable_ipv4
                .then(|| conf.network.to_string())
                .into_iter()
                .chain(network6)
                .collect(),
            vteps: c
                .nodes()
                .iter()
                .filter_map(|n| n.subnet.map(|s| s.network()))
                .collect(),
            vteps6: c
                .nodes()
                .iter()
                .filter_map(|n| n.subnet6.map(|s| s.network()))
                .collect(),
            others,
            watcher,
            owner: owners(c),
            blocked_at: Instant::now(),
            measured: Duration::ZERO,
            broken: None,
            lifted_at: Instant::now(),
        })
    }

    /// Upstream does not fall back: its host's own traffic to our pods leaves from its VTEP
    /// address, and our replies to that address stay on the (blocked) VXLAN path by design.
    fn known_gap(&self, cell: &Cell) -> bool {
        !self.b_falls_back && cell.src_kind == SourceKind::Host && cell.src == self.blocked
    }

    /// Each of `others` with its routes of `fam`'s family (and those joined for a detail
    /// line), beside the start of the direct route to the blocked node and of the blocked
    /// node's VTEP host route.
    fn others_routes(&self, c: &Cluster, fam: &Family) -> (String, String, NodeRoutes<'_>) {
        let direct = fam.direct_route();
        let routes = self
            .others
            .iter()
            .map(|n| {
                let r = routes(c, n, fam.v6);
                let joined = r.lines().collect::<Vec<_>>().join("; ");
                (n.as_str(), r, joined)
            })
            .collect();
        (direct, format!("{} ", fam.vtep), routes)
    }

    /// The filter for `fam`'s VXLAN to or from (`dir`) the blocked node, its probes (`icmp`)
    /// or not.
    fn vxlan_filter(&self, fam: &Family, dir: &str, icmp: bool) -> String {
        let hosts = format!("{dir} host {}", fam.underlay);
        if fam.v6 {
            vxlan_filter6(self.port, &hosts, icmp, &self.vteps6)
        } else {
            vxlan_filter(self.port, &hosts, icmp, &self.vteps)
        }
    }

    /// A capture of `fam`'s VXLAN to or from (`dir`) the blocked node, its probes (`icmp`)
    /// or not.
    fn start_vxlan_capture(
        &self,
        c: &mut Cluster,
        fam: &Family,
        dir: &str,
        icmp: bool,
    ) -> Result<crate::capture::Capture> {
        c.start_capture(&CaptureOpts {
            filter: Some(self.vxlan_filter(fam, dir, icmp)),
            max_seconds: 120,
            ..CaptureOpts::default()
        })
    }

    /// The matrix of the fallback phase with an upstream blocked node: everything but the known
    /// gap passes, and nothing that passed while broken fails now.
    fn expect_upstream_fallback_matrix(&self, p: &mut Phase, c: &Cluster, limit: Duration) {
        let blocked = &self.blocked;
        let m = check_until(c, limit, |x| !self.known_gap(x));
        let bad: Vec<String> = m
            .cells
            .iter()
            .filter(|x| !self.known_gap(x) && !x.ok())
            .map(|x| format!("{}->{} {}", x.src, x.dst, x.letters()))
            .collect();
        p.expect(
            format!(
                "matrix: every probe passes but those from {blocked}'s host (its VTEP address)"
            ),
            bad.is_empty(),
            format!("failing: {}", bad.join(", ")),
        );
        let broken = self
            .broken
            .as_ref()
            .map(|m| m.cells.as_slice())
            .unwrap_or_default();
        let worse: Vec<String> = m
            .cells
            .iter()
            .filter(|x| !x.ok())
            .filter(|x| {
                broken
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
            .filter(|x| self.known_gap(x))
            .map(|x| format!("{}->{} {}", x.src, x.dst, x.letters()))
            .collect();
        p.note(format!(
            "{blocked} (upstream) host to pods, left on VXLAN by design: {}",
            gap.join(", ")
        ));
        p.matrix = Some(m);
    }
}

impl Cause for HostGwFallback {
    fn baseline(&self) -> String {
        format!(
            "healthy cluster, vxlan on UDP {}, every flanneld with {}",
            self.port,
            FALLBACK_ARGS.join(" ")
        )
    }
    fn healthy(&self, p: &mut Phase, c: &Cluster) {
        let (watcher, blocked) = (&self.watcher, &self.blocked);
        let want = path_lines(c, blocked, "vxlan");
        let ok = wait_until(Duration::from_secs(10), || {
            has_all(&node_metrics(c, watcher), &want)
        });
        p.expect(
            format!("{watcher}: /metrics shows the path to {blocked} as vxlan (each family)"),
            ok,
            want.concat().trim().to_string(),
        );
    }
    fn break_it(&mut self, c: &mut Cluster) -> Result<Phase> {
        udp_drop(c, &self.blocked, self.port, "-I")?;
        self.blocked_at = Instant::now();
        let tools = if c.ip_family().has_v6() {
            "iptables and ip6tables"
        } else {
            "iptables"
        };
        Ok(Phase::new(
            "broken",
            format!(
                "{tools} -I INPUT 1 -p udp --dport {} -j DROP on {} only",
                self.port, self.blocked
            ),
        ))
    }
    fn affected(&self) -> Option<Affected<'_>> {
        let blocked = self.blocked.as_str();
        let owner = &self.owner;
        Some((
            format!("with {blocked}"),
            Box::new(move |cell: &Cell| {
                !cell.same_node
                    && (owner.get(&cell.src).map(String::as_str) == Some(blocked)
                        || owner.get(&cell.dst).map(String::as_str) == Some(blocked))
            }),
        ))
    }
    fn broken_matrix(&mut self, c: &mut Cluster) -> Result<Matrix> {
        let m = broken_matrix(c);
        self.measured = self.blocked_at.elapsed();
        Ok(m)
    }
    /// The matrix was taken before any node fell back.
    fn broken(&mut self, p: &mut Phase, c: &mut Cluster) -> Result<()> {
        let measured = self.measured;
        p.note(format!("matrix measured within {measured:?} of the drop"));
        let direct = path_lines(c, &self.blocked, "direct");
        let early: Vec<&String> = self
            .others
            .iter()
            .filter(|n| {
                let text = node_metrics(c, n);
                direct.iter().any(|l| text.contains(l.as_str()))
            })
            .collect();
        p.expect(
            "no node had fallen back yet when the broken matrix was taken",
            early.is_empty(),
            format!("already direct on {early:?} after {measured:?}"),
        );
        self.broken = p.matrix.clone();
        Ok(())
    }
    /// The drop stays: the fallback switches the blocked node's pairs to direct routes (each
    /// family), the matrix heals, the captures show the pod traffic unencapsulated.
    fn while_broken(&mut self, c: &mut Cluster, opts: &ScenarioOpts) -> Result<Option<Phase>> {
        let (blocked, port, others) = (self.blocked.as_str(), self.port, &self.others);
        let mut p = Phase::new(
            "fallback",
            format!("the drop stays; no config change, no restart: the fallback routes {blocked}'s pairs directly"),
        );
        let limit = limit(opts);
        // Wait for the switch first, so the captures below only see the direct path.
        let want = path_lines(c, blocked, "direct");
        let switched = wait_until(limit, || {
            others.iter().all(|n| has_all(&node_metrics(c, n), &want))
        });
        // …and for the data planes to have applied it (the main loop syncs after the prober
        // published the set): the direct routes of every family on every fallback node.
        let mut route_wanted: Vec<(String, bool, String)> = others
            .iter()
            .flat_map(|n| {
                self.families
                    .iter()
                    .map(move |f| (n.clone(), f.v6, f.direct_route()))
            })
            .collect();
        if self.b_falls_back {
            for o in c.nodes().iter().filter(|o| o.name != blocked) {
                for f in Family::of(o) {
                    route_wanted.push((blocked.to_string(), f.v6, f.direct_route()));
                }
            }
        }
        let routed = wait_until(limit, || {
            route_wanted
                .iter()
                .all(|(n, v6, r)| routes(c, n, *v6).lines().any(|l| l.starts_with(r.as_str())))
        });
        p.expect(
            "every fallback node has its direct routes in place",
            routed,
            format!("{route_wanted:?}"),
        );
        let healed_after = self.blocked_at.elapsed();
        p.expect(
            format!(
                "/metrics of {} shows the path to {blocked} as direct (each family)",
                others.join(", ")
            ),
            switched,
            format!("{} after the drop", fmt_secs(healed_after)),
        );
        // Per family: VXLAN to and from the blocked node (pod traffic), its probes.
        let mut caps = Vec::new();
        for fam in &self.families {
            caps.push((
                fam,
                self.start_vxlan_capture(c, fam, "dst", false)?,
                self.start_vxlan_capture(c, fam, "src", false)?,
                self.start_vxlan_capture(c, fam, "dst", true)?,
            ));
        }
        let plain_filters: Vec<String> = self.networks.iter().map(|n| format!("net {n}")).collect();
        let (_, pcaps_plain) = captures_during(c, &plain_filters, |c| {
            if self.b_falls_back {
                expect_matrix_pass(&mut p, c, limit)
            } else {
                self.expect_upstream_fallback_matrix(&mut p, c, limit)
            }
        })?;
        let healed_after = self.blocked_at.elapsed();
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
        for (fam, cap_to, cap_from, cap_probes) in caps {
            let b_ip = &fam.underlay;
            let to = crate::capture::verify_pcap(&c.stop_capture(&cap_to.name)?, port)?;
            let from = crate::capture::verify_pcap(&c.stop_capture(&cap_from.name)?, port)?;
            let probes = crate::capture::verify_pcap(&c.stop_capture(&cap_probes.name)?, port)?;
            p.expect(
                format!(
                    "capture: no pod traffic over VXLAN to {blocked} ({b_ip}) on the direct path"
                ),
                to.frames == 0,
                format!("{} frames", to.frames),
            );
            if self.b_falls_back {
                p.expect(
                    format!(
                        "capture: no pod traffic over VXLAN from {blocked} ({b_ip}) either (it fell back too)"
                    ),
                    from.frames == 0,
                    format!("{} frames", from.frames),
                );
            } else {
                p.expect(
                    format!(
                        "capture: {blocked} (upstream, no fallback) still sends its replies over VXLAN from {b_ip}"
                    ),
                    from.frames > 0,
                    format!("{} frames", from.frames),
                );
            }
            let icmp = fam.icmp();
            p.expect(
                format!(
                    "capture: the VTEP {} of {blocked} is still probed over VXLAN (inner {icmp})",
                    fam.vtep
                ),
                probes.frames > 0,
                format!("{} frames", probes.frames),
            );
            p.captures
                .push((format!("VXLAN to {b_ip}, not {icmp} (must be empty)"), to));
            p.captures
                .push((format!("VXLAN from {b_ip}, not {icmp}"), from));
            p.captures
                .push((format!("VXLAN to {b_ip}, {icmp} probes"), probes));
        }
        for (network, pcap) in self.networks.iter().zip(pcaps_plain) {
            let plain = crate::capture::verify_pcap(&pcap, port)?;
            p.expect(
                format!("capture: pod traffic crosses the underlay unencapsulated ({network})"),
                plain.frames > 0 && plain.vxlan_frames == 0,
                format!("{} frames, {} VXLAN", plain.frames, plain.vxlan_frames),
            );
            p.captures.push((format!("net {network}"), plain));
        }
        for fam in &self.families {
            let (direct, vtep, routes) = self.others_routes(c, fam);
            let b_ip = &fam.underlay;
            for (n, routes, joined) in routes {
                let on_overlay = |l: &str| l.starts_with(&vtep) && l.contains("dev flannel");
                p.expect(
                    format!(
                        "{n}: {direct}, and {}{} stays on the overlay device",
                        fam.vtep,
                        fam.host_len()
                    ),
                    routes.lines().any(|l| l.starts_with(&direct))
                        && routes.lines().any(on_overlay),
                    joined,
                );
                let log = std::fs::read_to_string(c.flanneld_log(n)).unwrap_or_default();
                let line = format!("host-gw fallback, routing its subnet directly via {b_ip}");
                p.expect(
                    format!("{n}: one log line names {blocked} ({b_ip}) and why"),
                    log.lines().filter(|l| l.contains(&line)).count() == 1
                        && log
                            .lines()
                            .any(|l| l.contains(&line) && l.contains("went unanswered")),
                    line,
                );
            }
        }
        if self.b_falls_back {
            let missing = missing_direct_routes(c, blocked);
            p.expect(
                format!("{blocked}: routes every peer directly (its probes' replies are dropped)"),
                missing.is_empty(),
                format!("missing: {}", missing.join(", ")),
            );
        }
        Ok(Some(p))
    }
    fn fix(&mut self, c: &mut Cluster) -> Result<Phase> {
        let (blocked, port) = (&self.blocked, self.port);
        udp_drop(c, blocked, port, "-D")?;
        self.lifted_at = Instant::now();
        Ok(Phase::new(
            "lifted",
            format!("the DROP of UDP {port} on {blocked} deleted: back to VXLAN after the 5 s damping window"),
        ))
    }
    /// Back on VXLAN (each family): /metrics, the switch count, the capture, no direct route
    /// left.
    fn fixed(&mut self, p: &mut Phase, c: &mut Cluster, opts: &ScenarioOpts) -> Result<()> {
        let (blocked, port, others, watcher) =
            (&self.blocked, self.port, &self.others, &self.watcher);
        let limit = limit(opts);
        let want = path_lines(c, blocked, "vxlan");
        let back = wait_until(limit, || {
            others.iter().all(|n| has_all(&node_metrics(c, n), &want))
        });
        p.expect(
            format!(
                "/metrics of {} shows the path to {blocked} as vxlan again (each family)",
                others.join(", ")
            ),
            back,
            format!("{} after lifting", fmt_secs(self.lifted_at.elapsed())),
        );
        let switches: Vec<String> = self
            .families
            .iter()
            .map(|f| {
                format!(
                    "flannel_peer_path_switches_total{{subnet=\"{}\",public_ip=\"{}\"}} 2\n",
                    f.subnet, f.underlay
                )
            })
            .collect();
        let text = node_metrics(c, watcher);
        p.expect(
            format!("{watcher}: exactly 2 switches for {blocked} (there and back, each family)"),
            has_all(&text, &switches),
            switches.concat().trim().to_string(),
        );
        if self.b_falls_back {
            let want: Vec<String> = others
                .iter()
                .flat_map(|o| path_lines(c, o, "vxlan"))
                .collect();
            let ok = wait_until(limit, || has_all(&node_metrics(c, blocked), &want));
            p.expect(
                format!("{blocked}: every peer back on vxlan"),
                ok,
                want.concat(),
            );
        }
        let filters: Vec<String> = self
            .families
            .iter()
            .map(|f| self.vxlan_filter(f, "dst", false))
            .collect();
        let (_, pcaps) = captures_during(c, &filters, |c| expect_matrix_pass(p, c, limit))?;
        for (fam, pcap) in self.families.iter().zip(pcaps) {
            let b_ip = &fam.underlay;
            let vx = crate::capture::verify_pcap(&pcap, port)?;
            let over = if fam.v6 {
                vx.outer_ip6
            } else {
                vx.vxlan_frames - vx.outer_ip6
            };
            p.expect(
                format!(
                    "capture: pod traffic to {blocked} ({b_ip}) is VXLAN again, checksums valid"
                ),
                vx.vxlan_frames > 0 && over == vx.vxlan_frames && vx.bad_total() == 0,
                vx.to_string().replace('\n', "; "),
            );
            let icmp = fam.icmp();
            p.captures
                .push((format!("VXLAN to {b_ip}, not {icmp}"), vx));
        }
        for fam in &self.families {
            let (direct, vtep, routes) = self.others_routes(c, fam);
            for (n, routes, joined) in routes {
                let left = |l: &str| l.starts_with(&direct) || l.starts_with(&vtep);
                let what = format!(
                    "{n}: no direct route and no {} to {blocked} ({}) left",
                    fam.host_len(),
                    fam.underlay
                );
                p.expect(what, !routes.lines().any(left), joined);
            }
        }
        Ok(())
    }
}

pub(super) fn p3_fallback(
    c: &mut Cluster,
    opts: &ScenarioOpts,
    blocked: &str,
) -> Result<Vec<Phase>> {
    let cause = HostGwFallback::new(c, blocked)?;
    baseline_break_fix(c, opts, cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_filters_index_the_inner_header_of_each_outer_family() {
        let vtep: Ipv4Addr = "10.244.62.0".parse().unwrap();
        assert_eq!(
            vxlan_filter(8472, "dst host 198.18.0.2", false, &[vtep]),
            "udp port 8472 and dst host 198.18.0.2 and udp[39] != 1 and udp[46:4] != 0x0af43e00"
        );
        let vtep6: Ipv6Addr = "fd42:244:0:50::".parse().unwrap();
        assert_eq!(
            vxlan_filter6(8472, "src host 2001:db8:18::2", true, &[vtep6]),
            "ip6 and udp port 8472 and src host 2001:db8:18::2 and ip6[76] = 58"
        );
        assert_eq!(
            vxlan_filter6(8472, "dst host 2001:db8:18::2", false, &[vtep6]),
            "ip6 and udp port 8472 and dst host 2001:db8:18::2 and ip6[76] != 58 and not \
             (ip6[94:4] = 0xfd420244 and ip6[98:4] = 0x00000050 and ip6[102:4] = 0x00000000 \
             and ip6[106:4] = 0x00000000)"
        );
    }
}
