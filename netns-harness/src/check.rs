//! The connectivity matrix (field problem P3): from every pod to every pod on another node (and
//! one same-node pair) ICMP, TCP, UDP and DNS-style request/response; from every node's host
//! namespace to every remote pod ICMP and TCP.

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::cmd;
use crate::proto;

/// One kind of probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// `ping -c 1 -W 1`.
    Icmp,
    /// TCP echo request/response.
    Tcp,
    /// UDP echo request/response.
    Udp,
    /// DNS query for `kubernetes.default` A.
    Dns,
}

impl ProbeKind {
    /// The letter used in the table.
    pub fn letter(self) -> char {
        match self {
            ProbeKind::Icmp => 'I',
            ProbeKind::Tcp => 'T',
            ProbeKind::Udp => 'U',
            ProbeKind::Dns => 'D',
        }
    }

    /// Lower-case name (`icmp`, `tcp`, `udp`, `dns`).
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Icmp => "icmp",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Udp => "udp",
            ProbeKind::Dns => "dns",
        }
    }
}

/// Result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Which probe.
    pub kind: ProbeKind,
    /// Passed?
    pub ok: bool,
    /// rtt or the error text.
    pub detail: String,
}

/// Where a probe starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A pod namespace.
    Pod,
    /// A node's host namespace.
    Host,
}

/// All probes from one source to one destination pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// Source short name (`n1p1` or `n1`).
    pub src: String,
    /// Pod or host.
    pub src_kind: SourceKind,
    /// Destination pod short name.
    pub dst: String,
    /// Destination pod address.
    pub dst_ip: Ipv4Addr,
    /// Both ends on the same node.
    pub same_node: bool,
    /// One entry per probe kind, in I, T, U, D order.
    pub results: Vec<ProbeOutcome>,
}

impl Cell {
    /// Every probe of the cell passed.
    pub fn ok(&self) -> bool {
        self.results.iter().all(|r| r.ok)
    }

    /// The outcome of one probe kind.
    pub fn result(&self, kind: ProbeKind) -> Option<&ProbeOutcome> {
        self.results.iter().find(|r| r.kind == kind)
    }

    /// `ITUD` with `.` for each failed probe.
    pub fn letters(&self) -> String {
        self.results
            .iter()
            .map(|r| if r.ok { r.kind.letter() } else { '.' })
            .collect()
    }
}

/// The whole connectivity check.
#[derive(Debug, Clone, Default)]
pub struct Matrix {
    /// Run prefix.
    pub run: String,
    /// Row labels in order (pods, then hosts).
    pub sources: Vec<String>,
    /// Column labels (pods).
    pub destinations: Vec<String>,
    /// Tested cells.
    pub cells: Vec<Cell>,
    /// One line per node for the header (`n1 kernel-ref 10.244.1.0/24 198.18.0.1`).
    pub legend: Vec<String>,
}

impl Matrix {
    /// True when at least one probe ran and every probe passed.
    pub fn all_pass(&self) -> bool {
        !self.cells.is_empty() && self.cells.iter().all(Cell::ok)
    }

    /// The cell from `src` to `dst` (short names), if tested.
    pub fn cell(&self, src: &str, dst: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.src == src && c.dst == dst)
    }

    /// Every failed probe with its cell.
    pub fn failures(&self) -> Vec<(&Cell, &ProbeOutcome)> {
        self.cells
            .iter()
            .flat_map(|c| c.results.iter().filter(|r| !r.ok).map(move |r| (c, r)))
            .collect()
    }

    /// (passed, total) probe counts.
    pub fn counts(&self) -> (usize, usize) {
        let total = self.cells.iter().map(|c| c.results.len()).sum();
        let passed = self
            .cells
            .iter()
            .map(|c| c.results.iter().filter(|r| r.ok).count())
            .sum();
        (passed, total)
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "connectivity matrix, run {}", self.run)?;
        for l in &self.legend {
            writeln!(f, "  {l}")?;
        }
        writeln!(
            f,
            "  I=ICMP T=TCP U=UDP D=DNS; '.' = that probe failed; '-' = not tested; rows = source, columns = destination pod"
        )?;
        let w0 = self
            .sources
            .iter()
            .map(|s| s.len() + 7)
            .max()
            .unwrap_or(8)
            .max(8);
        let w = self
            .destinations
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(4)
            .max(4)
            + 2;
        write!(f, "{:<w0$}", "src\\dst")?;
        for d in &self.destinations {
            write!(f, "{d:>w$}")?;
        }
        writeln!(f)?;
        for s in &self.sources {
            let kind = self
                .cells
                .iter()
                .find(|c| &c.src == s)
                .map(|c| c.src_kind)
                .unwrap_or(SourceKind::Pod);
            let label = match kind {
                SourceKind::Pod => format!("{s} (pod)"),
                SourceKind::Host => format!("{s} (host)"),
            };
            write!(f, "{label:<w0$}")?;
            for d in &self.destinations {
                let text = match self.cell(s, d) {
                    Some(c) => c.letters(),
                    None if s == d => "\\".to_string(),
                    None => "-".to_string(),
                };
                write!(f, "{text:>w$}")?;
            }
            writeln!(f)?;
        }
        let (passed, total) = self.counts();
        let verdict = if self.all_pass() { "PASS" } else { "FAIL" };
        writeln!(f, "RESULT: {verdict} ({passed}/{total} probes passed)")?;
        for (c, r) in self.failures().iter().take(50) {
            writeln!(
                f,
                "  FAIL {} -> {} ({}) {}: {}",
                c.src,
                c.dst,
                c.dst_ip,
                r.kind.name(),
                r.detail
            )?;
        }
        Ok(())
    }
}

struct Task {
    cell: usize,
    kind: ProbeKind,
    ns: String,
    ip: Ipv4Addr,
    /// None: the responder's port for the kind.
    port: Option<u16>,
}

/// Concurrent probes (each is a short child process; bounded so a broken cluster still
/// finishes in seconds, not minutes).
const WORKERS: usize = 8;

fn first_line(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .chars()
        .take(200)
        .collect()
}

fn run_probe(bin: Option<&std::path::Path>, t: &Task) -> ProbeOutcome {
    let ip = t.ip.to_string();
    let result = match t.kind {
        ProbeKind::Icmp => cmd::run(
            &mut cmd::ns_command(&t.ns, &["ping", "-n", "-c", "1", "-W", "1", &ip]),
            Duration::from_secs(5),
        ),
        kind => {
            let Some(bin) = bin else {
                return ProbeOutcome {
                    kind,
                    ok: false,
                    detail: "no netns-harness binary to run the probe".into(),
                };
            };
            let port = t.port.unwrap_or(match kind {
                ProbeKind::Tcp => proto::TCP_PORT,
                ProbeKind::Udp => proto::UDP_PORT,
                _ => proto::DNS_PORT,
            });
            let bin = bin.to_string_lossy();
            cmd::run(
                &mut cmd::ns_command(
                    &t.ns,
                    &[&bin, "probe", kind.name(), &format!("{ip}:{port}")],
                ),
                Duration::from_secs(6),
            )
        }
    };
    match result {
        Ok(out) if out.status.success() => {
            let detail = if t.kind == ProbeKind::Icmp {
                String::from_utf8_lossy(&out.stdout)
                    .split("time=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_default()
            } else {
                first_line(&out.stdout)
            };
            ProbeOutcome {
                kind: t.kind,
                ok: true,
                detail,
            }
        }
        Ok(out) => {
            let mut detail = first_line(&out.stderr);
            if detail.is_empty() {
                detail = first_line(&out.stdout);
            }
            ProbeOutcome {
                kind: t.kind,
                ok: false,
                detail: format!("{} ({})", detail, out.status),
            }
        }
        Err(e) => ProbeOutcome {
            kind: t.kind,
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

impl Cluster {
    /// One probe from namespace `from` (`n1`, `n1p2` or a full name of this run) to `ip`:
    /// ICMP ignores `port`; TCP, UDP and DNS use `port` (None: the responders' port).
    pub fn probe(
        &self,
        from: &str,
        kind: ProbeKind,
        ip: Ipv4Addr,
        port: Option<u16>,
    ) -> ProbeOutcome {
        let ns = match self.resolve_ns(from) {
            Ok(ns) => ns,
            Err(e) => {
                return ProbeOutcome {
                    kind,
                    ok: false,
                    detail: format!("{e:#}"),
                }
            }
        };
        run_probe(
            self.harness_bin(),
            &Task {
                cell: 0,
                kind,
                ns,
                ip,
                port,
            },
        )
    }

    /// Emulates a ClusterIP the way kube-proxy (iptables mode) handles traffic from the node
    /// itself: in `node`'s nat table, OUTPUT marks packets to `vip:vip_port` that do not come
    /// from the cluster network for masquerading (KUBE-MARK-MASQ) and DNATs them to `pod`'s
    /// responder (`proto_name` `tcp` or `udp`); POSTROUTING masquerades marked packets
    /// (KUBE-POSTROUTING), so the pod answers the node's overlay address. Adds a host route
    /// for the VIP via `eth0` when the node has no route to it (flat runs have no default
    /// route) so the packet reaches OUTPUT; it never leaves untranslated.
    pub fn add_cluster_ip(
        &self,
        node: &str,
        vip: Ipv4Addr,
        vip_port: u16,
        pod: &str,
        proto_name: &str,
    ) -> anyhow::Result<()> {
        let n = self
            .node(node)
            .ok_or_else(|| anyhow::anyhow!("no node {node:?}"))?;
        let dst = self
            .pod_ip(pod)
            .ok_or_else(|| anyhow::anyhow!("no pod {pod:?}"))?;
        let port = match proto_name {
            "tcp" => proto::TCP_PORT,
            "udp" => proto::UDP_PORT,
            other => anyhow::bail!("ClusterIP protocol {other:?}: tcp or udp"),
        };
        let network = self.net_conf()?.network.to_string();
        let ns = n.ns.clone();
        let vip_s = format!("{vip}/32");
        let vport = vip_port.to_string();
        let routed = cmd::run(
            &mut cmd::ns_command(&ns, &["ip", "route", "get", &vip.to_string()]),
            cmd::SHORT,
        )?
        .status
        .success();
        if !routed {
            cmd::ip(&["-n", &ns, "route", "add", &vip_s, "dev", "eth0"])?;
        }
        let service: [&str; 8] = [
            "-d", &vip_s, "-p", proto_name, "--dport", &vport, "-m", "comment",
        ];
        let comment = "netns-harness ClusterIP";
        let mut mark = vec![
            "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "!", "-s", &network,
        ];
        mark.extend(service);
        mark.extend([
            "--comment",
            comment,
            "-j",
            "MARK",
            "--set-xmark",
            "0x4000/0x4000",
        ]);
        cmd::ns_ok(&ns, &mark)?;
        let target = format!("{dst}:{port}");
        let mut dnat = vec!["iptables", "-w", "-t", "nat", "-A", "OUTPUT"];
        dnat.extend(service);
        dnat.extend([
            "--comment",
            comment,
            "-j",
            "DNAT",
            "--to-destination",
            &target,
        ]);
        cmd::ns_ok(&ns, &dnat)?;
        let masq = [
            "POSTROUTING",
            "-m",
            "mark",
            "--mark",
            "0x4000/0x4000",
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "MASQUERADE",
        ];
        let rule =
            |op: &'static str| [&["iptables", "-w", "-t", "nat", op][..], &masq[..]].concat();
        let present = cmd::run(&mut cmd::ns_command(&ns, &rule("-C")), cmd::SHORT)?;
        if !present.status.success() {
            cmd::ns_ok(&ns, &rule("-A"))?;
        }
        Ok(())
    }

    /// Runs the connectivity matrix.
    pub fn check(&self) -> Matrix {
        let mut m = Matrix {
            run: self.prefix().to_string(),
            ..Matrix::default()
        };
        let pod_kinds: &[ProbeKind] = if self.state().responders {
            &[
                ProbeKind::Icmp,
                ProbeKind::Tcp,
                ProbeKind::Udp,
                ProbeKind::Dns,
            ]
        } else {
            &[ProbeKind::Icmp]
        };
        let host_kinds: &[ProbeKind] = if self.state().responders {
            &[ProbeKind::Icmp, ProbeKind::Tcp]
        } else {
            &[ProbeKind::Icmp]
        };
        for n in self.nodes() {
            m.legend.push(format!(
                "{} {:<10} underlay {:<13} subnet {}{}",
                n.name,
                n.kind.as_str(),
                n.underlay_ip,
                n.subnet
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                match (n.site, n.public_ip) {
                    (Some(s), Some(p)) => format!("  site {s} NAT {p}"),
                    _ => String::new(),
                }
            ));
        }
        let pods = self.pods();
        m.destinations = pods.iter().map(|(_, p)| p.name.clone()).collect();
        let mut tasks = Vec::new();
        let mut same_node_done = false;
        for (sn, sp) in &pods {
            m.sources.push(sp.name.clone());
            for (dn, dp) in &pods {
                if sp.name == dp.name {
                    continue;
                }
                let same = sn.name == dn.name;
                if same && same_node_done {
                    continue;
                }
                same_node_done |= same;
                let cell = m.cells.len();
                m.cells.push(Cell {
                    src: sp.name.clone(),
                    src_kind: SourceKind::Pod,
                    dst: dp.name.clone(),
                    dst_ip: dp.ip,
                    same_node: same,
                    results: Vec::new(),
                });
                for k in pod_kinds {
                    tasks.push(Task {
                        cell,
                        kind: *k,
                        ns: sp.ns.clone(),
                        ip: dp.ip,
                        port: None,
                    });
                }
            }
        }
        for n in self.nodes() {
            m.sources.push(n.name.clone());
            for (dn, dp) in &pods {
                if dn.name == n.name {
                    continue;
                }
                let cell = m.cells.len();
                m.cells.push(Cell {
                    src: n.name.clone(),
                    src_kind: SourceKind::Host,
                    dst: dp.name.clone(),
                    dst_ip: dp.ip,
                    same_node: false,
                    results: Vec::new(),
                });
                for k in host_kinds {
                    tasks.push(Task {
                        cell,
                        kind: *k,
                        ns: n.ns.clone(),
                        ip: dp.ip,
                        port: None,
                    });
                }
            }
        }
        let results: Mutex<Vec<Option<ProbeOutcome>>> = Mutex::new(vec![None; tasks.len()]);
        let next = AtomicUsize::new(0);
        let bin = self.harness_bin();
        std::thread::scope(|s| {
            for _ in 0..WORKERS.min(tasks.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(t) = tasks.get(i) else { break };
                    let out = if crate::sys::interrupted() {
                        ProbeOutcome {
                            kind: t.kind,
                            ok: false,
                            detail: "interrupted".into(),
                        }
                    } else {
                        run_probe(bin, t)
                    };
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(out);
                    }
                });
            }
        });
        let results = results.into_inner().unwrap_or_default();
        for (t, r) in tasks.iter().zip(results) {
            let r = r.unwrap_or(ProbeOutcome {
                kind: t.kind,
                ok: false,
                detail: "probe did not run".into(),
            });
            m.cells[t.cell].results.push(r);
        }
        for c in &mut m.cells {
            c.results.sort_by_key(|r| r.kind);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(kind: ProbeKind, ok: bool) -> ProbeOutcome {
        ProbeOutcome {
            kind,
            ok,
            detail: String::new(),
        }
    }

    #[test]
    fn matrix_verdicts_and_table() {
        let mut m = Matrix {
            run: "frtest".into(),
            sources: vec!["n1p1".into(), "n2p1".into()],
            destinations: vec!["n1p1".into(), "n2p1".into()],
            ..Matrix::default()
        };
        assert!(!m.all_pass(), "an empty matrix is not a pass");
        m.cells.push(Cell {
            src: "n1p1".into(),
            src_kind: SourceKind::Pod,
            dst: "n2p1".into(),
            dst_ip: Ipv4Addr::new(10, 244, 2, 2),
            same_node: false,
            results: vec![
                outcome(ProbeKind::Icmp, true),
                outcome(ProbeKind::Tcp, false),
                outcome(ProbeKind::Udp, true),
                outcome(ProbeKind::Dns, true),
            ],
        });
        assert!(!m.all_pass());
        assert_eq!(m.counts(), (3, 4));
        assert_eq!(m.failures().len(), 1);
        let text = m.to_string();
        assert!(text.contains("I.UD"), "{text}");
        assert!(text.contains("FAIL n1p1 -> n2p1"), "{text}");
        m.cells[0].results[1].ok = true;
        assert!(m.all_pass());
        assert!(m.to_string().contains("RESULT: PASS (4/4"));
    }
}
