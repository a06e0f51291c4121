//! The connectivity matrix (field problem P3): from every pod to every pod on another node (and
//! one same-node pair) ICMP, TCP, UDP and DNS-style request/response; from every node's host
//! namespace to every remote pod ICMP and TCP.

use std::fmt;
use std::net::Ipv4Addr;
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

pub(crate) struct Task {
    pub(crate) cell: usize,
    pub(crate) kind: ProbeKind,
    pub(crate) ns: String,
    pub(crate) ip: Ipv4Addr,
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
