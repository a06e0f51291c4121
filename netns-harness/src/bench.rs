//! Single-stream TCP throughput (iperf3) and ping latency per path: bare underlay, kernel-ref
//! (upstream flannel's kernel vxlan), our userspace and kernel data planes, and the mixed
//! userspace→kernel-ref path.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cluster::{Cluster, NodeKind};
use crate::cmd;
use crate::sys;

/// iperf3 server port inside the destination namespace.
pub const IPERF_PORT: u16 = 5201;

/// A measured path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchPath {
    /// node eth0 → node eth0, no overlay.
    Underlay,
    /// pod → pod across two kernel-ref nodes.
    KernelRef,
    /// pod → pod across two userspace nodes.
    Userspace,
    /// pod → pod across two nodes of our kernel data plane.
    Kernel,
    /// pod on a userspace node → pod on a kernel-ref node (interop).
    UserspaceToKernelRef,
}

impl BenchPath {
    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            BenchPath::Underlay => "underlay (eth0<->eth0)",
            BenchPath::KernelRef => "kernel-ref <-> kernel-ref",
            BenchPath::Userspace => "userspace <-> userspace",
            BenchPath::Kernel => "kernel <-> kernel",
            BenchPath::UserspaceToKernelRef => "userspace -> kernel-ref",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// Path measured.
    pub path: BenchPath,
    /// (source, destination) namespaces' short names, when the cluster has such a pair.
    pub endpoints: Option<(String, String)>,
    /// iperf3 receiver throughput in Gbit/s.
    pub gbps: Option<f64>,
    /// Average ping rtt in ms.
    pub latency_ms: Option<f64>,
    /// Why a value is missing.
    pub note: Option<String>,
}

/// The benchmark table.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// iperf3 duration per path.
    pub seconds: u32,
    /// Rows in display order.
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// The row of one path.
    pub fn row(&self, path: BenchPath) -> Option<&BenchRow> {
        self.rows.iter().find(|r| r.path == path)
    }

    /// Throughput of one path.
    pub fn gbps(&self, path: BenchPath) -> Option<f64> {
        self.row(path).and_then(|r| r.gbps)
    }

    /// `path` throughput divided by `base` throughput.
    pub fn ratio(&self, path: BenchPath, base: BenchPath) -> Option<f64> {
        match (self.gbps(path), self.gbps(base)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "single-stream TCP (iperf3 -t {}) and ping latency (20 x 50 ms)",
            self.seconds
        )?;
        writeln!(
            f,
            "{:<27} {:>14} {:>8} {:>8} {:>8} {:>11}  note",
            "path", "endpoints", "Gbit/s", "/underl", "/kref", "latency ms"
        )?;
        for r in &self.rows {
            let ends = r
                .endpoints
                .as_ref()
                .map(|(a, b)| format!("{a}->{b}"))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<27} {:>14} {:>8} {:>8} {:>8} {:>11}  {}",
                r.path.label(),
                ends,
                opt(r.gbps, 2),
                opt(self.ratio(r.path, BenchPath::Underlay), 2),
                opt(self.ratio(r.path, BenchPath::KernelRef), 2),
                opt(r.latency_ms, 3),
                r.note.as_deref().unwrap_or("")
            )?;
        }
        Ok(())
    }
}

/// Parses iperf3 `-J` output: receiver bits per second → Gbit/s.
pub fn parse_iperf_json(text: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(text).context("iperf3 output is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = v
        .get("end")
        .ok_or_else(|| anyhow!("iperf3 JSON has no end"))?;
    let bps = end
        .pointer("/sum_received/bits_per_second")
        .or_else(|| end.pointer("/sum_sent/bits_per_second"))
        .and_then(|b| b.as_f64())
        .ok_or_else(|| anyhow!("iperf3 JSON has no bits_per_second"))?;
    Ok(bps / 1e9)
}

/// Parses ping's summary line `rtt min/avg/max/mdev = a/b/c/d ms` → avg.
pub fn parse_ping_avg(text: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .ok_or_else(|| anyhow!("no rtt summary in ping output (all lost?)"))?;
    let nums = line
        .split('=')
        .nth(1)
        .ok_or_else(|| anyhow!("bad ping summary {line:?}"))?;
    nums.trim()
        .split('/')
        .nth(1)
        .ok_or_else(|| anyhow!("bad ping summary {line:?}"))?
        .trim()
        .parse()
        .context("ping avg")
}

/// Two endpoints of a measured path.
pub(crate) struct Pair {
    pub(crate) src_ns: String,
    pub(crate) dst_ns: String,
    pub(crate) dst_ip: String,
    pub(crate) names: (String, String),
}

impl Cluster {
    pub(crate) fn pod_pair(&self, a: NodeKind, b: NodeKind) -> Option<Pair> {
        let src = self
            .nodes()
            .iter()
            .find(|n| n.kind == a && !n.pods.is_empty())?;
        let dst = self
            .nodes()
            .iter()
            .find(|n| n.kind == b && n.name != src.name && !n.pods.is_empty())?;
        let (sp, dp) = (src.pods.first()?, dst.pods.first()?);
        Some(Pair {
            src_ns: sp.ns.clone(),
            dst_ns: dp.ns.clone(),
            // IPv6-only runs measure over IPv6 (dual-stack runs over IPv4).
            dst_ip: match dp.ip6 {
                Some(ip6) if !self.ip_family().has_v4() => ip6.to_string(),
                _ => dp.ip.to_string(),
            },
            names: (sp.name.clone(), dp.name.clone()),
        })
    }

    pub(crate) fn underlay_pair(&self) -> Option<Pair> {
        let n = self.nodes();
        let (a, b) = (n.first()?, n.get(1)?);
        Some(Pair {
            src_ns: a.ns.clone(),
            dst_ns: b.ns.clone(),
            dst_ip: match b.underlay_ip6 {
                Some(ip6) if !self.ip_family().has_v4() => ip6.to_string(),
                _ => b.underlay_ip.to_string(),
            },
            names: (a.name.clone(), b.name.clone()),
        })
    }

    fn iperf(&mut self, p: &Pair, seconds: u32) -> Result<f64> {
        let out = self.iperf_raw(p, seconds, &[])?;
        parse_iperf_json(&out)
    }

    /// Runs iperf3 from `p.src_ns` to a one-off server in `p.dst_ns` for `seconds` with
    /// `extra` client arguments; returns the client's JSON output.
    pub(crate) fn iperf_raw(&mut self, p: &Pair, seconds: u32, extra: &[&str]) -> Result<String> {
        sys::check_interrupted()?;
        let log = self.run_dir().join(format!("iperf3-{}.log", p.names.1));
        let port = IPERF_PORT.to_string();
        let (child, rec) = cmd::spawn_in_ns(
            &p.dst_ns,
            &["iperf3", "-s", "-1", "-p", &port],
            &log,
            &format!("iperf3 server {}", p.names.1),
        )?;
        let pid = rec.pid;
        self.adopt(rec, child);
        let res = (|| {
            // Ready when the socket listens (connecting would consume the one-off server).
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let out = cmd::run_ok(
                    &mut cmd::ns_command(&p.dst_ns, &["ss", "-Hltn", &format!("sport = :{port}")]),
                    cmd::SHORT,
                )?;
                if !out.stdout.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "iperf3 server in {} not listening: {}",
                        p.dst_ns,
                        cmd::tail(&log, 5)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let secs = seconds.to_string();
            let mut args = vec!["iperf3", "-c", &p.dst_ip, "-p", &port, "-t", &secs, "-J"];
            args.extend_from_slice(extra);
            let out = cmd::run(
                &mut cmd::ns_command(&p.src_ns, &args),
                Duration::from_secs(u64::from(seconds) + 20),
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })();
        self.release(pid);
        res
    }

    fn ping_avg(&self, p: &Pair) -> Result<f64> {
        let out = cmd::run(
            &mut cmd::ns_command(
                &p.src_ns,
                &[
                    "ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "1", &p.dst_ip,
                ],
            ),
            Duration::from_secs(15),
        )?;
        parse_ping_avg(&String::from_utf8_lossy(&out.stdout))
    }

    /// Measures every path the cluster has a pair for. Paths without a pair (or that fail) get
    /// a note instead of numbers. Stops early only when interrupted.
    pub fn bench(&mut self, seconds: u32) -> Result<BenchReport> {
        let seconds = seconds.clamp(1, 300);
        let mut paths = vec![
            (BenchPath::Underlay, self.underlay_pair()),
            (
                BenchPath::KernelRef,
                self.pod_pair(NodeKind::KernelRef, NodeKind::KernelRef),
            ),
            (
                BenchPath::Userspace,
                self.pod_pair(NodeKind::Userspace, NodeKind::Userspace),
            ),
        ];
        if !self.nodes_of(NodeKind::Kernel).is_empty() {
            paths.push((
                BenchPath::Kernel,
                self.pod_pair(NodeKind::Kernel, NodeKind::Kernel),
            ));
        }
        if !self.nodes_of(NodeKind::Userspace).is_empty()
            && !self.nodes_of(NodeKind::KernelRef).is_empty()
        {
            paths.push((
                BenchPath::UserspaceToKernelRef,
                self.pod_pair(NodeKind::Userspace, NodeKind::KernelRef),
            ));
        }
        let mut rows = Vec::new();
        for (path, pair) in paths {
            sys::check_interrupted()?;
            let Some(pair) = pair else {
                rows.push(BenchRow {
                    path,
                    endpoints: None,
                    gbps: None,
                    latency_ms: None,
                    note: Some("no such pair of nodes (with pods) in this cluster".into()),
                });
                continue;
            };
            let mut notes = Vec::new();
            let latency_ms = self
                .ping_avg(&pair)
                .map_err(|e| notes.push(format!("ping: {e:#}")))
                .ok();
            let gbps = self
                .iperf(&pair, seconds)
                .map_err(|e| notes.push(format!("iperf3: {e:#}")))
                .ok();
            sys::check_interrupted()?;
            rows.push(BenchRow {
                path,
                endpoints: Some(pair.names.clone()),
                gbps,
                latency_ms,
                note: (!notes.is_empty()).then(|| notes.join("; ")),
            });
        }
        self.save()?;
        Ok(BenchReport { seconds, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":3.1e9},"sum_received":{"bits_per_second":3.0e9}}}"#;
        assert!((parse_iperf_json(j).unwrap() - 3.0).abs() < 1e-9);
        assert!(parse_iperf_json(r#"{"error":"unable to connect"}"#)
            .unwrap_err()
            .to_string()
            .contains("unable to connect"));
        let p = "--- x ---\n20 packets transmitted, 20 received\nrtt min/avg/max/mdev = 0.051/0.093/0.2/0.01 ms\n";
        assert!((parse_ping_avg(p).unwrap() - 0.093).abs() < 1e-9);
        assert!(parse_ping_avg("20 packets transmitted, 0 received").is_err());
    }

    #[test]
    fn report_ratios() {
        let row = |path, gbps| BenchRow {
            path,
            endpoints: None,
            gbps,
            latency_ms: None,
            note: None,
        };
        let r = BenchReport {
            seconds: 1,
            rows: vec![
                row(BenchPath::Underlay, Some(10.0)),
                row(BenchPath::KernelRef, Some(5.0)),
                row(BenchPath::Userspace, None),
            ],
        };
        assert_eq!(
            r.ratio(BenchPath::KernelRef, BenchPath::Underlay),
            Some(0.5)
        );
        assert_eq!(r.ratio(BenchPath::Userspace, BenchPath::KernelRef), None);
        assert!(r.to_string().contains("0.50"));
    }
}
