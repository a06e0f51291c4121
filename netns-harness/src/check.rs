//! The connectivity matrix (field problem P3): from every pod to every pod on another node (and
//! one same-node pair) ICMP, TCP, UDP and DNS-style request/response; from every node's host
//! namespace to every remote pod ICMP and TCP. Dual-stack runs probe every cell over both
//! families (one [`Cell`] per family), IPv6-only runs over IPv6.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

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

/// The address family a cell is probed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (ICMP, TCP, UDP, DNS to the pod's IPv4 address).
    V4,
    /// IPv6 (ICMPv6, TCP, UDP, DNS to the pod's IPv6 address).
    V6,
}

impl Family {
    /// `ipv4` / `ipv6`.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv6() {
            Family::V6
        } else {
            Family::V4
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
    /// Destination pod address (of the cell's family).
    pub dst_ip: IpAddr,
    /// The family probed.
    pub family: Family,
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

    /// The cell from `src` to `dst` (short names), if tested: the IPv4 one in dual-stack
    /// runs (see [`cell_of`](Self::cell_of)).
    pub fn cell(&self, src: &str, dst: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.src == src && c.dst == dst)
    }

    /// The cell from `src` to `dst` probed over `family`, if tested.
    pub fn cell_of(&self, src: &str, dst: &str, family: Family) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.src == src && c.dst == dst && c.family == family)
    }

    /// The families probed, in order.
    pub fn families(&self) -> Vec<Family> {
        let mut f: Vec<Family> = self.cells.iter().map(|c| c.family).collect();
        f.sort();
        f.dedup();
        f
    }

    /// True when at least one probe of `family` ran and every one passed.
    pub fn family_pass(&self, family: Family) -> bool {
        let mut cells = self.cells.iter().filter(|c| c.family == family).peekable();
        cells.peek().is_some() && cells.all(Cell::ok)
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
        let families = self.families();
        let dual = families.len() > 1;
        if dual {
            writeln!(f, "  each cell: IPv4 probes/IPv6 probes (ICMPv6 over IPv6)")?;
        } else if families == [Family::V6] {
            writeln!(f, "  IPv6 only (ICMP = ICMPv6)")?;
        }
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
            .max(if dual { 9 } else { 4 })
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
                let per_family: Vec<String> = families
                    .iter()
                    .filter_map(|fam| self.cell_of(s, d, *fam).map(Cell::letters))
                    .collect();
                let text = if !per_family.is_empty() {
                    per_family.join("/")
                } else if s == d {
                    "\\".to_string()
                } else {
                    "-".to_string()
                };
                write!(f, "{text:>w$}")?;
            }
            writeln!(f)?;
        }
        let (passed, total) = self.counts();
        let verdict = if self.all_pass() { "PASS" } else { "FAIL" };
        writeln!(f, "RESULT: {verdict} ({passed}/{total} probes passed)")?;
        for (c, r) in self.failures().iter().take(50) {
            let fam = if dual || c.family == Family::V6 {
                format!("{} ", c.family.name())
            } else {
                String::new()
            };
            writeln!(
                f,
                "  FAIL {} -> {} ({}) {fam}{}: {}",
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

pub(crate) struct Task {
    pub(crate) cell: usize,
    pub(crate) kind: ProbeKind,
    pub(crate) ns: String,
    pub(crate) ip: IpAddr,
    /// None: the responder's port for the kind.
    pub(crate) port: Option<u16>,
}

/// Concurrent probes (each is a short child process; bounded so a broken cluster still
/// finishes in seconds, not minutes).
pub(crate) const WORKERS: usize = 8;

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

pub(crate) fn run_probe(bin: Option<&std::path::Path>, t: &Task) -> ProbeOutcome {
    let ip = t.ip.to_string();
    let fam = if t.ip.is_ipv6() { "-6" } else { "-4" };
    let result = match t.kind {
        ProbeKind::Icmp => cmd::run(
            &mut cmd::ns_command(&t.ns, &["ping", fam, "-n", "-c", "1", "-W", "1", &ip]),
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
                    &[
                        &bin,
                        "probe",
                        kind.name(),
                        &SocketAddr::new(t.ip, port).to_string(),
                    ],
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
            dst_ip: IpAddr::from([10, 244, 2, 2]),
            family: Family::V4,
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
        // Dual-stack: the IPv6 cell of the same pair is shown after a '/', its failures named.
        let mut c6 = m.cells[0].clone();
        c6.family = Family::V6;
        c6.dst_ip = "fd42:244:0:2::2".parse().unwrap();
        c6.results[2].ok = false;
        m.cells.push(c6);
        assert!(m.family_pass(Family::V4) && !m.family_pass(Family::V6));
        let text = m.to_string();
        assert!(text.contains("ITUD/IT.D"), "{text}");
        assert!(
            text.contains("FAIL n1p1 -> n2p1 (fd42:244:0:2::2) ipv6 udp"),
            "{text}"
        );
        assert_eq!(
            m.cell_of("n1p1", "n2p1", Family::V6).unwrap().family,
            Family::V6
        );
        assert_eq!(m.cell("n1p1", "n2p1").unwrap().family, Family::V4);
    }
}
