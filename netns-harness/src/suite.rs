//! `netns-harness bench`: underlay, kernel vxlan (kernel-ref, programmed like upstream) and
//! the userspace data plane, side by side in one invocation, on two wire settings, over
//! several rounds. Reports min/median/max per value as a table, a JSON file and an SVG chart
//! of the userspace ÷ kernel ratios.
//!
//! CPU cost is reported two ways, both honest about what they cover: `cpu s/GB (machine)` is
//! the busy time of every CPU in `/proc/stat` (user, system, irq, softirq: this includes
//! iperf3 and softirq work done on behalf of the kernel data plane, and also anything else
//! running on the machine) during the single-stream TCP run, per GB received; `flanneld s/GB`
//! is the CPU time (`/proc/<pid>/stat` utime + stime) of the flanneld processes of both nodes
//! of the pair over the same run (0 for kernel-ref, whose data plane runs in softirq).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bench::Pair;
use crate::cluster::{Cluster, NodeKind};
use crate::cmd;
use crate::sys;

/// Underlay link settings a round is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// veth default offloads (tx checksum, TSO, GSO, GRO on): 64 KB "frames" cross the link.
    Gso,
    /// TSO, GSO and GRO off on both ends of every node's veth: MTU-sized frames, as on a
    /// physical wire without offloads.
    Mtu,
}

impl Wire {
    /// Short name.
    pub fn label(self) -> &'static str {
        match self {
            Wire::Gso => "GSO wire",
            Wire::Mtu => "MTU wire",
        }
    }

    fn ethtool(self) -> &'static [&'static str] {
        match self {
            Wire::Gso => &["tx", "on", "tso", "on", "gso", "on", "gro", "on"],
            Wire::Mtu => &["tx", "on", "tso", "off", "gso", "off", "gro", "off"],
        }
    }
}

/// A measured path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Path3 {
    /// node eth0 → node eth0.
    Underlay,
    /// pod → pod over two kernel-ref nodes.
    KernelVxlan,
    /// pod → pod over two userspace flanneld nodes.
    Userspace,
}

impl Path3 {
    /// All paths, in table order.
    pub const ALL: [Path3; 3] = [Path3::Underlay, Path3::KernelVxlan, Path3::Userspace];

    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Path3::Underlay => "underlay",
            Path3::KernelVxlan => "kernel vxlan",
            Path3::Userspace => "userspace",
        }
    }
}

/// A measured value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// One TCP stream, Gbit/s received.
    Tcp1,
    /// Four TCP streams, Gbit/s received.
    Tcp4,
    /// 64-byte UDP datagrams received per second (thousands).
    UdpKpps,
    /// ping RTT mean, µs.
    RttMean,
    /// ping RTT 99th percentile, µs.
    RttP99,
    /// Busy CPU seconds of the whole machine per GB received (one TCP stream).
    CpuMachine,
    /// CPU seconds of both nodes' flanneld per GB received (one TCP stream).
    CpuFlanneld,
}

impl Metric {
    /// All metrics, in column order.
    pub const ALL: [Metric; 7] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::UdpKpps,
        Metric::RttMean,
        Metric::RttP99,
        Metric::CpuMachine,
        Metric::CpuFlanneld,
    ];

    /// Column label.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP x1 Gb/s",
            Metric::Tcp4 => "TCP x4 Gb/s",
            Metric::UdpKpps => "UDP64 kpps",
            Metric::RttMean => "RTT mean us",
            Metric::RttP99 => "RTT p99 us",
            Metric::CpuMachine => "cpu s/GB",
            Metric::CpuFlanneld => "flanneld s/GB",
        }
    }

    /// True when more is better (throughput), false for costs and latencies.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Tcp1 | Metric::Tcp4 | Metric::UdpKpps)
    }
}

/// What to measure and for how long.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteOptions {
    /// Rounds (each measures every wire, path and metric once).
    pub rounds: u32,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Pings per RTT measurement (1 ms apart).
    pub pings: u32,
    /// Wire settings.
    pub wires: Vec<Wire>,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            rounds: 3,
            seconds: 3,
            pings: 1000,
            wires: vec![Wire::Gso, Wire::Mtu],
        }
    }
}

/// One measured value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Round (0-based).
    pub round: u32,
    /// Wire setting.
    pub wire: Wire,
    /// Path.
    pub path: Path3,
    /// What.
    pub metric: Metric,
    /// The value (unit in [`Metric::label`]).
    pub value: f64,
}

/// min / median / max of a value over the rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; None when empty.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

/// Everything one `bench` invocation measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteReport {
    /// The options used.
    pub options: SuiteOptions,
    /// Every value measured.
    pub samples: Vec<Sample>,
    /// Measurements that failed, with the reason.
    pub errors: Vec<String>,
}

impl SuiteReport {
    /// The spread of one value over the rounds.
    pub fn spread(&self, wire: Wire, path: Path3, metric: Metric) -> Option<Spread> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.wire == wire && s.path == path && s.metric == metric)
            .map(|s| s.value)
            .collect();
        Spread::of(&v)
    }

    /// Median userspace ÷ median kernel vxlan for one value.
    pub fn ratio(&self, wire: Wire, metric: Metric) -> Option<f64> {
        let u = self.spread(wire, Path3::Userspace, metric)?.median;
        let k = self.spread(wire, Path3::KernelVxlan, metric)?.median;
        (k > 0.0).then(|| u / k)
    }

    /// A report read back from the JSON [`SuiteReport::to_json`] wrote (its summary is
    /// recomputed from the samples).
    pub fn from_json(text: &str) -> Result<SuiteReport> {
        serde_json::from_str(text).context("not a bench.json written by `netns-harness bench`")
    }

    /// The report as JSON: options, samples, errors, and per wire/path/metric spreads.
    pub fn to_json(&self) -> serde_json::Value {
        let mut summary = Vec::new();
        for &wire in &self.options.wires {
            for path in Path3::ALL {
                for metric in Metric::ALL {
                    if let Some(s) = self.spread(wire, path, metric) {
                        summary.push(serde_json::json!({
                            "wire": wire, "path": path, "metric": metric,
                            "min": s.min, "median": s.median, "max": s.max,
                        }));
                    }
                }
            }
            for metric in Metric::ALL {
                if let Some(r) = self.ratio(wire, metric) {
                    summary.push(serde_json::json!({
                        "wire": wire, "metric": metric, "userspace_over_kernel": r,
                    }));
                }
            }
        }
        serde_json::json!({
            "options": self.options,
            "samples": self.samples,
            "errors": self.errors,
            "summary": summary,
        })
    }
}

fn cell(s: Option<Spread>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.median >= 100.0 => format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max),
        Some(s) => format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max),
    }
}

impl fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "{} rounds; iperf3 {} s per run; {} pings at 1 ms; median (min-max)",
            o.rounds, o.seconds, o.pings
        )?;
        for &wire in &o.wires {
            writeln!(f, "\n{}", wire.label())?;
            write!(f, "{:<18}", "path")?;
            for m in Metric::ALL {
                write!(f, " | {:<22}", m.label())?;
            }
            writeln!(f)?;
            for path in Path3::ALL {
                write!(f, "{:<18}", path.label())?;
                for m in Metric::ALL {
                    write!(f, " | {:<22}", cell(self.spread(wire, path, m)))?;
                }
                writeln!(f)?;
            }
            write!(f, "{:<18}", "userspace/kernel")?;
            for m in Metric::ALL {
                let r = self
                    .ratio(wire, m)
                    .map_or_else(|| "-".into(), |r| format!("{r:.2}"));
                write!(f, " | {r:<22}")?;
            }
            writeln!(f)?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

/// Parses iperf3 `-J` output of a TCP run: Gbit/s received.
pub fn tcp_gbps(json: &str) -> Result<f64> {
    crate::bench::parse_iperf_json(json)
}

/// Parses iperf3 `-J` output of a UDP run: datagrams received per second.
pub fn udp_pps(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(anyhow!("iperf3: {e}"));
    }
    let sum = v
        .pointer("/end/sum_received")
        .filter(|s| s.get("packets").is_some())
        .or_else(|| v.pointer("/end/sum"))
        .ok_or_else(|| anyhow!("iperf3 UDP JSON has no end.sum"))?;
    let num = |k: &str| sum.get(k).and_then(serde_json::Value::as_f64);
    let packets = num("packets").ok_or_else(|| anyhow!("no packets"))?;
    let lost = num("lost_packets").unwrap_or(0.0);
    let secs = num("seconds")
        .filter(|s| *s > 0.0)
        .ok_or_else(|| anyhow!("no seconds"))?;
    Ok((packets - lost).max(0.0) / secs)
}

/// Parses the per-reply `time=` values (ms) of ping output into µs.
pub fn ping_rtts_us(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

/// Mean and 99th percentile (nearest rank) of `v`.
pub fn mean_p99(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((0.99 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some((mean, s[rank - 1]))
}

/// Busy jiffies of all CPUs (user, nice, system, irq, softirq, steal) from `/proc/stat`.
fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum())
}

impl Cluster {
    /// Sets the underlay offloads of every node's veth (both ends) for `wire`.
    fn set_wire(&self, wire: Wire) -> Result<()> {
        let ul = self.underlay_ns();
        for n in self.nodes() {
            let mut a = vec!["ethtool", "-K", "eth0"];
            a.extend_from_slice(wire.ethtool());
            cmd::ns_ok(&n.ns, &a)?;
            let mut b = vec!["ethtool", "-K", n.name.as_str()];
            b.extend_from_slice(wire.ethtool());
            cmd::ns_ok(&ul, &b)?;
        }
        Ok(())
    }

    /// Puts the underlay back as the cluster was built (tx checksum offload off on eth0
    /// unless it was built with it on; everything else at veth defaults).
    fn restore_wire(&self) -> Result<()> {
        self.set_wire(Wire::Gso)?;
        if !self.state().underlay_tx_offload {
            for n in self.nodes() {
                cmd::ns_ok(&n.ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
            }
        }
        Ok(())
    }

    /// The flanneld pids of the nodes whose namespaces (or pods' namespaces) are `ns`.
    fn flanneld_pids(&self, namespaces: &[&str]) -> Vec<u32> {
        self.nodes()
            .iter()
            .filter(|n| {
                namespaces
                    .iter()
                    .any(|ns| n.ns == *ns || n.pods.iter().any(|p| p.ns == *ns))
            })
            .filter_map(|n| n.flanneld.as_ref().map(|f| f.pid))
            .collect()
    }

    fn pair_for(&self, path: Path3) -> Option<Pair> {
        match path {
            Path3::Underlay => self.underlay_pair(),
            Path3::KernelVxlan => self.pod_pair(NodeKind::KernelRef, NodeKind::KernelRef),
            Path3::Userspace => self.pod_pair(NodeKind::Userspace, NodeKind::Userspace),
        }
    }

    /// One TCP stream, with the CPU it cost: (Gbit/s, machine s/GB, flanneld s/GB).
    fn measure_tcp1(&mut self, p: &Pair, seconds: u32) -> Result<(f64, f64, f64)> {
        let pids = self.flanneld_pids(&[&p.src_ns, &p.dst_ns]);
        let proc_ticks = |pids: &[u32]| pids.iter().filter_map(|&p| cmd::cpu_ticks(p)).sum::<u64>();
        let (m0, f0) = (machine_busy_ticks().unwrap_or(0), proc_ticks(&pids));
        let json = self.iperf_raw(p, seconds, &[])?;
        let (m1, f1) = (machine_busy_ticks().unwrap_or(0), proc_ticks(&pids));
        let gbps = tcp_gbps(&json)?;
        let gb = gbps * f64::from(seconds) / 8.0;
        let hz = sys::clock_ticks_per_sec() as f64;
        let per_gb = |t: u64| {
            if gb > 0.0 {
                t as f64 / hz / gb
            } else {
                f64::NAN
            }
        };
        Ok((
            gbps,
            per_gb(m1.saturating_sub(m0)),
            per_gb(f1.saturating_sub(f0)),
        ))
    }

    fn measure_rtt(&self, p: &Pair, pings: u32) -> Result<(f64, f64)> {
        let count = pings.to_string();
        let out = cmd::run(
            &mut cmd::ns_command(
                &p.src_ns,
                &[
                    "ping", "-n", "-c", &count, "-i", "0.001", "-W", "1", &p.dst_ip,
                ],
            ),
            Duration::from_secs(u64::from(pings) / 500 + 15),
        )?;
        let rtts = ping_rtts_us(&String::from_utf8_lossy(&out.stdout));
        if (rtts.len() as u32) < pings / 2 {
            return Err(anyhow!("only {} of {pings} pings answered", rtts.len()));
        }
        mean_p99(&rtts).ok_or_else(|| anyhow!("no ping replies"))
    }

    /// Measures one path once; every failure becomes an error line, not an abort.
    fn measure_path(
        &mut self,
        round: u32,
        wire: Wire,
        path: Path3,
        o: &SuiteOptions,
        out: &mut SuiteReport,
    ) -> Result<()> {
        let Some(p) = self.pair_for(path) else {
            out.errors.push(format!(
                "{}: no such pair of nodes in this cluster",
                path.label()
            ));
            return Ok(());
        };
        let mut push = |metric, value| {
            out.samples.push(Sample {
                round,
                wire,
                path,
                metric,
                value,
            })
        };
        let mut errors = Vec::new();
        match self.measure_rtt(&p, o.pings) {
            Ok((mean, p99)) => {
                push(Metric::RttMean, mean);
                push(Metric::RttP99, p99);
            }
            Err(e) => errors.push(format!("ping: {e:#}")),
        }
        sys::check_interrupted()?;
        match self.measure_tcp1(&p, o.seconds) {
            Ok((gbps, machine, flanneld)) => {
                push(Metric::Tcp1, gbps);
                push(Metric::CpuMachine, machine);
                push(Metric::CpuFlanneld, flanneld);
            }
            Err(e) => errors.push(format!("tcp x1: {e:#}")),
        }
        sys::check_interrupted()?;
        match self
            .iperf_raw(&p, o.seconds, &["-P", "4"])
            .and_then(|j| tcp_gbps(&j))
        {
            Ok(g) => push(Metric::Tcp4, g),
            Err(e) => errors.push(format!("tcp x4: {e:#}")),
        }
        sys::check_interrupted()?;
        match self
            .iperf_raw(&p, o.seconds, &["-u", "-b", "0", "-l", "64"])
            .and_then(|j| udp_pps(&j))
        {
            Ok(pps) => push(Metric::UdpKpps, pps / 1000.0),
            Err(e) => errors.push(format!("udp: {e:#}")),
        }
        for e in errors {
            out.errors.push(format!(
                "round {round} {} {}: {e}",
                wire.label(),
                path.label()
            ));
        }
        Ok(())
    }

    /// Runs the whole suite. The underlay offloads are restored afterwards, also on error.
    pub fn bench_suite(&mut self, options: SuiteOptions) -> Result<SuiteReport> {
        let mut report = SuiteReport {
            options: options.clone(),
            samples: Vec::new(),
            errors: Vec::new(),
        };
        let res = (|| {
            for round in 0..options.rounds {
                for &wire in &options.wires {
                    self.set_wire(wire)?;
                    for path in Path3::ALL {
                        sys::check_interrupted()?;
                        eprintln!(
                            "bench: round {} {} {}",
                            round + 1,
                            wire.label(),
                            path.label()
                        );
                        self.measure_path(round, wire, path, &options, &mut report)?;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        })();
        let restored = self.restore_wire();
        self.save()?;
        res?;
        restored?;
        Ok(report)
    }
}

/// Writes the userspace ÷ kernel vxlan chart (medians; for RTT and CPU the inverse, kernel ÷
/// userspace, so that above 1 always means "userspace is better") as SVG.
pub fn write_chart(report: &SuiteReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    // Every metric but flanneld's own CPU (kernel vxlan has no flanneld on the data path).
    let metrics = Metric::ALL
        .into_iter()
        .filter(|m| *m != Metric::CpuFlanneld)
        .collect::<Vec<_>>();
    let wires = &report.options.wires;
    let mut bars: Vec<(String, Wire, f64)> = Vec::new();
    for &m in &metrics {
        for &w in wires {
            if let Some(r) = report.ratio(w, m) {
                let v = if m.higher_is_better() { r } else { 1.0 / r };
                bars.push((m.label().to_string(), w, v));
            }
        }
    }
    let ymax = bars.iter().map(|b| b.2).fold(1.5_f64, f64::max) * 1.1;
    let n = (metrics.len() * wires.len().max(1)) as f64;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "flannel-rs userspace vs kernel vxlan (median; >1 = userspace better)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..n, 0.0..ymax)?;
    let per = wires.len().max(1);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(metrics.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x / per as f64).floor() as usize;
            let centre = (i * per) as f64 + per as f64 / 2.0;
            if (x - centre).abs() < 0.3 {
                metrics
                    .get(i)
                    .map_or(String::new(), |m| m.label().to_string())
            } else {
                String::new()
            }
        })
        .y_desc("ratio")
        .draw()?;
    let colour = |w: Wire| match w {
        Wire::Gso => RGBColor(52, 101, 164),
        Wire::Mtu => RGBColor(245, 121, 0),
    };
    let mut labelled = Vec::new();
    for (mi, m) in metrics.iter().enumerate() {
        for (wi, &w) in wires.iter().enumerate() {
            let Some(b) = bars.iter().find(|b| b.0 == m.label() && b.1 == w) else {
                continue;
            };
            let x0 = (mi * per + wi) as f64 + 0.1;
            let series = chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x0 + 0.8, b.2)],
                colour(w).filled(),
            )))?;
            // One legend entry per wire, on its first bar.
            if !labelled.contains(&w) {
                labelled.push(w);
                series.label(w.label()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour(w).filled())
                });
            }
        }
    }
    chart.draw_series(LineSeries::new(
        [(0.0, 1.0), (n, 1.0)],
        BLACK.stroke_width(1),
    ))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_and_stats() {
        let udp = r#"{"end":{"sum":{"packets":1000,"lost_packets":100,"seconds":2.0}}}"#;
        assert!((udp_pps(udp).unwrap() - 450.0).abs() < 1e-9);
        let ping = "64 bytes from 10.244.2.3: icmp_seq=1 ttl=62 time=0.050 ms\n\
                    64 bytes from 10.244.2.3: icmp_seq=2 ttl=62 time=0.150 ms\n";
        let v = ping_rtts_us(ping);
        assert_eq!(v, vec![50.0, 150.0]);
        let (mean, p99) = mean_p99(&v).unwrap();
        assert!((mean - 100.0).abs() < 1e-9);
        assert!((p99 - 150.0).abs() < 1e-9);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(mean_p99(&hundred).unwrap().1, 99.0);
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 10.0));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn report_ratio_table_and_chart() {
        let mut r = SuiteReport {
            options: SuiteOptions {
                rounds: 2,
                ..SuiteOptions::default()
            },
            samples: Vec::new(),
            errors: Vec::new(),
        };
        for (round, k, u) in [(0, 10.0, 5.0), (1, 12.0, 7.0)] {
            for (path, v) in [(Path3::KernelVxlan, k), (Path3::Userspace, u)] {
                for (wire, metric) in [
                    (Wire::Gso, Metric::Tcp1),
                    (Wire::Gso, Metric::UdpKpps),
                    (Wire::Mtu, Metric::UdpKpps),
                ] {
                    r.samples.push(Sample {
                        round,
                        wire,
                        path,
                        metric,
                        value: v,
                    });
                }
            }
        }
        assert_eq!(r.ratio(Wire::Gso, Metric::Tcp1), Some(6.0 / 11.0));
        assert_eq!(r.ratio(Wire::Mtu, Metric::Tcp1), None);
        assert!(r.to_string().contains("0.55"));
        assert!(r.to_json()["summary"].as_array().unwrap().len() >= 3);
        let dir = std::env::temp_dir().join(format!("suite-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("c.svg");
        write_chart(&r, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(80)]);
        // Three bars, and one legend entry (a 10 x 10 square) per wire, not per bar.
        assert_eq!(
            text.matches("width=\"10\" height=\"10\"").count(),
            2,
            "{text}"
        );
        assert_eq!(text.matches(">\nGSO wire\n<").count(), 1, "{text}");
        assert_eq!(text.matches(">\nMTU wire\n<").count(), 1, "{text}");
        // The JSON reads back into the same report.
        let back = SuiteReport::from_json(&r.to_json().to_string()).unwrap();
        assert_eq!(back.samples.len(), r.samples.len());
        assert_eq!(
            back.ratio(Wire::Gso, Metric::Tcp1),
            r.ratio(Wire::Gso, Metric::Tcp1)
        );
        assert_eq!(back.to_string(), r.to_string());
        // Anything else is refused with a reason, not half-read.
        for bad in ["", "{}", "[]", r#"{"options":{},"samples":[],"errors":[]}"#] {
            let e = SuiteReport::from_json(bad).unwrap_err();
            assert!(
                format!("{e:#}").contains("not a bench.json"),
                "{bad}: {e:#}"
            );
        }
    }
}
