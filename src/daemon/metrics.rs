//! `/metrics`: the daemon's gauges and the data plane's counters, kept in a prometheus-client
//! registry and encoded in the Prometheus text format (0.0.4) on each scrape.
//!
//! Adding a metric is one line in one place (plus its setter):
//! - a value the daemon sets or counts: a prometheus-client field (`Gauge`, `Counter`,
//!   `Family<Labels, _>`) on [`DaemonMetrics`] and its `register(..)` line in
//!   [`DaemonMetrics::new`];
//! - a value read at scrape time from state kept elsewhere (the data plane's atomics, the
//!   prober's snapshot): one `out.gauge(..)`, `out.counter(..)` or `out.family(..)` line in
//!   `Scraped::encode` (atomics are read, never counted twice).
//!
//! Help text is written as printed, ending with a period. Counters are named without
//! `_total`: the encoder appends it. The unit test `exported_families` lists every family.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};
use tracing::debug;

use crate::backend::userspace::{IoErrors, QueueStats};
use crate::dataplane::Counters;

/// Where data-plane counters come from.
#[derive(Debug, Clone, Default)]
pub enum PlaneMetrics {
    /// The kernel forwards; nothing is counted here.
    #[default]
    Kernel,
    /// The userspace data planes' counters, one per address family (dual-stack runs a plane
    /// per family); /metrics shows their sums.
    Userspace(Vec<UserspaceCounters>),
}

/// One userspace data plane's counters.
#[derive(Debug, Clone)]
pub struct UserspaceCounters {
    /// Verdict counters of the sans-IO core.
    pub counters: Arc<Counters>,
    /// IO failures of the packet threads.
    pub io_errors: Arc<IoErrors>,
    /// Reads per queue.
    pub queues: Arc<QueueStats>,
}

impl PlaneMetrics {
    /// The counters of both planes (kernel planes count nothing here).
    pub fn join(self, other: PlaneMetrics) -> PlaneMetrics {
        match (self, other) {
            (PlaneMetrics::Userspace(mut a), PlaneMetrics::Userspace(b)) => {
                a.extend(b);
                PlaneMetrics::Userspace(a)
            }
            (PlaneMetrics::Kernel, p) | (p, PlaneMetrics::Kernel) => p,
        }
    }
}

/// One peer's probe state, as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerGauge {
    /// The peer's subnet (label `subnet`).
    pub subnet: String,
    /// The peer's public IP (label `public_ip`).
    pub public_ip: String,
    /// Reachable, unreachable, or not known yet (not exported).
    pub reachable: Option<bool>,
    /// Unanswered probes so far.
    pub failures_total: u64,
}

/// One vxlan peer's `--host-gw-fallback` path, as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPathGauge {
    /// The peer's subnet (label `subnet`).
    pub subnet: String,
    /// The peer's public IP (label `public_ip`).
    pub public_ip: String,
    /// `vxlan` or `direct`.
    pub path: &'static str,
    /// Path changes so far.
    pub switches: u64,
}

/// A gauge that never goes negative.
type UGauge = Gauge<u64, AtomicU64>;
/// The label set `{reason="..."}`.
type Reason = [(&'static str, &'static str); 1];

/// Gauges and counters the daemon exports on `/metrics`.
#[derive(Debug)]
pub struct DaemonMetrics {
    registry: Registry,
    peers: UGauge,
    skipped_leases: UGauge,
    refusals: Family<Reason, Counter>,
    scraped: Arc<Scraped>,
}

/// State owned elsewhere, read on each scrape.
#[derive(Debug, Default)]
struct Scraped {
    /// Entries of the userspace plane's peer table (`None`: kernel forwarding, not exported).
    peer_table: Mutex<Option<u64>>,
    plane: Mutex<PlaneMetrics>,
    peer_health: Mutex<Vec<PeerGauge>>,
    peer_paths: Mutex<Vec<PeerPathGauge>>,
}

/// Registers `metric`; `help` ends with a period, which prometheus-client adds itself.
fn register(reg: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    reg.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonMetrics {
    /// Every metric registered, all at zero.
    pub fn new() -> DaemonMetrics {
        let mut reg = Registry::default();
        let peers = UGauge::default();
        let skipped_leases = UGauge::default();
        let refusals = Family::<Reason, Counter>::default();
        let scraped = Arc::new(Scraped::default());
        register(
            &mut reg,
            "flannel_peers",
            "Remote subnets currently programmed.",
            peers.clone(),
        );
        register(
            &mut reg,
            "flannel_skipped_leases",
            "Peer leases refused at intake now: invalid, or of another backend type (see the daemon log).",
            skipped_leases.clone(),
        );
        register(
            &mut reg,
            "flannel_refused_leases",
            "Peer leases refused at intake (counted once per appearance, named in the log).",
            refusals.clone(),
        );
        reg.register_collector(Box::new(scraped.clone()));
        DaemonMetrics {
            registry: reg,
            peers,
            skipped_leases,
            refusals,
            scraped,
        }
    }

    /// Records the number of programmed peers.
    pub fn set_peers(&self, n: usize) {
        self.peers.set(n as u64);
    }

    /// Records the size of the userspace data plane's peer table.
    pub fn set_peer_table(&self, n: usize) {
        if let Ok(mut t) = self.scraped.peer_table.lock() {
            *t = Some(n as u64);
        }
    }

    /// Records the number of leases skipped as invalid.
    pub fn set_skipped_leases(&self, n: usize) {
        self.skipped_leases.set(n as u64);
    }

    /// Counts one newly refused lease (each refusal once while it lasts), by reason label.
    pub fn count_refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&[("reason", reason)]).inc();
    }

    /// Attaches the data plane's counters.
    pub fn set_plane(&self, plane: PlaneMetrics) {
        if let Ok(mut p) = self.scraped.plane.lock() {
            *p = plane;
        }
    }

    /// Replaces the peers' probe states.
    pub fn set_peer_health(&self, gauges: Vec<PeerGauge>) {
        if let Ok(mut g) = self.scraped.peer_health.lock() {
            *g = gauges;
        }
    }

    /// Replaces the peers' `--host-gw-fallback` paths.
    pub fn set_peer_paths(&self, gauges: Vec<PeerPathGauge>) {
        if let Ok(mut g) = self.scraped.peer_paths.lock() {
            *g = gauges;
        }
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // Only a collector can fail (writing to a String cannot): serve what was encoded.
            debug!(error = %e, "encoding /metrics failed");
        }
        out
    }
}

/// Writes scrape-time values as metric families.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    /// A gauge without labels.
    fn gauge(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        let g = ConstGauge::new(v);
        g.encode(
            self.0
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    /// A counter without labels (`name` without `_total`).
    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        let c = ConstCounter::new(v);
        c.encode(
            self.0
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    /// A labelled family of `kind` (gauge or counter); nothing when there are no samples.
    fn family<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: &[(L, u64)],
    ) -> fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut enc = self.0.encode_descriptor(name, help, None, kind)?;
        for (labels, v) in samples {
            let sample = enc.encode_family(labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(*v).encode(sample)?,
                _ => ConstGauge::new(*v).encode(sample)?,
            }
        }
        Ok(())
    }
}

/// The `subnet` and `public_ip` labels of a per-peer sample.
trait PeerLabels {
    fn subnet(&self) -> &str;
    fn public_ip(&self) -> &str;
}

impl PeerLabels for PeerGauge {
    fn subnet(&self) -> &str {
        &self.subnet
    }
    fn public_ip(&self) -> &str {
        &self.public_ip
    }
}

impl PeerLabels for PeerPathGauge {
    fn subnet(&self) -> &str {
        &self.subnet
    }
    fn public_ip(&self) -> &str {
        &self.public_ip
    }
}

impl Collector for Scraped {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let mut out = Out(encoder);
        if let Some(n) = self.peer_table.lock().ok().and_then(|t| *t) {
            out.gauge(
                "flannel_userspace_peer_table_entries",
                "Remote subnets in the userspace data plane's forwarding table.",
                n,
            )?;
        }
        let health = self
            .peer_health
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        fn peer(g: &impl PeerLabels) -> [(&'static str, String); 2] {
            [
                ("subnet", g.subnet().to_owned()),
                ("public_ip", g.public_ip().to_owned()),
            ]
        }
        let reachable: Vec<_> = health
            .iter()
            .filter_map(|g| g.reachable.map(|r| (peer(g), u64::from(r))))
            .collect();
        out.family(
            "flannel_peer_reachable",
            "Whether the peer answers ICMP echo over the overlay (0 after 3 unanswered probes in a row).",
            MetricType::Gauge,
            &reachable,
        )?;
        let failures: Vec<_> = health.iter().map(|g| (peer(g), g.failures_total)).collect();
        out.family(
            "flannel_peer_probe_failures",
            "Peer probes that went unanswered.",
            MetricType::Counter,
            &failures,
        )?;
        let paths = self
            .peer_paths
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let path_of = |g: &PeerPathGauge, path: &'static str| {
            [
                ("subnet", g.subnet.clone()),
                ("public_ip", g.public_ip.clone()),
                ("path", path.to_owned()),
            ]
        };
        let current: Vec<_> = paths
            .iter()
            .flat_map(|g| ["vxlan", "direct"].map(|p| (path_of(g, p), u64::from(g.path == p))))
            .collect();
        out.family(
            "flannel_peer_path",
            "How pod traffic to the peer is carried (--host-gw-fallback): 1 for the current path, vxlan or direct.",
            MetricType::Gauge,
            &current,
        )?;
        let switches: Vec<_> = paths.iter().map(|g| (peer(g), g.switches)).collect();
        out.family(
            "flannel_peer_path_switches",
            "Path changes of the peer between vxlan and direct (--host-gw-fallback).",
            MetricType::Counter,
            &switches,
        )?;
        let plane = self.plane.lock().map(|p| p.clone()).unwrap_or_default();
        let PlaneMetrics::Userspace(planes) = plane else {
            return Ok(());
        };
        let Some(s) = planes
            .iter()
            .map(|p| p.counters.snapshot())
            .reduce(|a, b| a.sum(&b))
        else {
            return Ok(());
        };
        let io = |f: fn(&IoErrors) -> u64| planes.iter().map(|p| f(&p.io_errors)).sum::<u64>();
        out.counter(
            "flannel_vxlan_rx_packets",
            "Inner packets delivered to TUN.",
            s.rx_packets,
        )?;
        out.counter(
            "flannel_vxlan_rx_bytes",
            "Inner bytes delivered to TUN.",
            s.rx_bytes,
        )?;
        out.counter(
            "flannel_vxlan_tx_packets",
            "VXLAN datagrams sent.",
            s.tx_packets,
        )?;
        out.counter("flannel_vxlan_tx_bytes", "VXLAN bytes sent.", s.tx_bytes)?;
        out.counter(
            "flannel_vxlan_rx_checksums_completed",
            "Received inner packets whose TCP/UDP checksum a sender's offload left unfinished, completed before delivery.",
            s.rx_csum_completed,
        )?;
        out.counter(
            "flannel_vxlan_rx_bad_checksums",
            "Received inner TCP segments found with a bad checksum and delivered as they came, for the kernel to drop.",
            s.rx_csum_bad,
        )?;
        out.counter(
            "flannel_vxlan_send_failures",
            "UDP sends the kernel refused.",
            io(IoErrors::send_failed),
        )?;
        out.counter(
            "flannel_vxlan_tun_write_failures",
            "TUN writes the kernel refused.",
            io(IoErrors::tun_write_failed),
        )?;
        out.counter(
            "flannel_vxlan_packet_loop_panics",
            "Packet loops restarted after a panic (a bug; should stay 0).",
            io(IoErrors::panics),
        )?;
        let mut per_queue: Vec<(u64, u64)> = Vec::new();
        for p in &planes {
            for (i, (tx, rx)) in p.queues.snapshot().into_iter().enumerate() {
                if per_queue.len() <= i {
                    per_queue.push((0, 0));
                }
                per_queue[i].0 += tx;
                per_queue[i].1 += rx;
            }
        }
        let queue_reads: Vec<_> = per_queue
            .iter()
            .enumerate()
            .flat_map(|(i, (tx, rx))| {
                [("tx", *tx), ("rx", *rx)]
                    .map(|(dir, n)| ([("queue", i.to_string()), ("direction", dir.to_owned())], n))
            })
            .collect();
        out.family(
            "flannel_vxlan_queue_reads",
            "Reads per packet thread: tx = packets read from TUN queue N, rx = messages (a datagram or a UDP GRO batch) received on socket N.",
            MetricType::Counter,
            &queue_reads,
        )?;
        let drops: Vec<_> = s
            .drops_by_reason()
            .map(|(r, n)| ([("reason", r.as_str())], n))
            .collect();
        out.family(
            "flannel_vxlan_drops",
            "Packets dropped by the data plane, by reason.",
            MetricType::Counter,
            &drops,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::DropReason;

    #[test]
    fn renders_gauges_and_drop_reasons() {
        let m = DaemonMetrics::default();
        m.set_peers(3);
        m.set_peer_table(2);
        // Dual-stack: one plane per family, exported as their sums.
        let (v4, v6) = (Arc::new(Counters::new()), Arc::new(Counters::new()));
        v4.count_drop(DropReason::UnknownSource);
        v6.count_drop(DropReason::InnerSourceMismatch);
        v4.count_drop(DropReason::IcmpRateLimited);
        v6.count_drop(DropReason::IcmpRateLimited);
        let plane = |counters| {
            PlaneMetrics::Userspace(vec![UserspaceCounters {
                counters,
                io_errors: Arc::new(IoErrors::default()),
                queues: Arc::new(QueueStats::new(1, 1)),
            }])
        };
        m.set_plane(
            PlaneMetrics::Kernel
                .join(plane(v4))
                .join(PlaneMetrics::Kernel)
                .join(plane(v6)),
        );
        let text = m.render();
        assert!(text.contains("flannel_peers 3\n"), "{text}");
        assert!(
            text.contains("flannel_userspace_peer_table_entries 2\n"),
            "{text}"
        );
        assert!(
            text.contains("flannel_vxlan_drops_total{reason=\"unknown_source\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("flannel_peer_reachable"), "{text}");
        // Every reason has its line, the new anti-spoofing and rate-limit ones included.
        for r in DropReason::ALL {
            let n = match r {
                DropReason::UnknownSource | DropReason::InnerSourceMismatch => 1,
                DropReason::IcmpRateLimited => 2,
                _ => 0,
            };
            let line = format!("flannel_vxlan_drops_total{{reason=\"{r}\"}} {n}\n");
            assert!(text.contains(&line), "{line}{text}");
        }
        assert!(
            text.contains("reason=\"inner_destination_foreign\"} 0\n"),
            "{text}"
        );
    }

    /// Every family `/metrics` can export, its type and its sample names: dashboards, tests and
    /// the README name them, so a change here is a breaking change.
    #[test]
    fn exported_families() {
        let m = DaemonMetrics::new();
        m.set_peer_table(1);
        m.count_refusal("outside_network");
        m.set_peer_health(vec![PeerGauge {
            subnet: "10.244.1.0/24".into(),
            public_ip: "198.51.100.7".into(),
            reachable: Some(true),
            failures_total: 0,
        }]);
        m.set_plane(PlaneMetrics::Userspace(vec![UserspaceCounters {
            counters: Arc::new(Counters::new()),
            io_errors: Arc::new(IoErrors::default()),
            queues: Arc::new(QueueStats::new(2, 2)),
        }]));
        let text = m.render();
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        let mut want = vec![
            ("flannel_peers", "gauge"),
            ("flannel_skipped_leases", "gauge"),
            ("flannel_refused_leases_total", "counter"),
            ("flannel_userspace_peer_table_entries", "gauge"),
            ("flannel_peer_reachable", "gauge"),
            ("flannel_peer_probe_failures_total", "counter"),
            ("flannel_vxlan_rx_packets_total", "counter"),
            ("flannel_vxlan_rx_bytes_total", "counter"),
            ("flannel_vxlan_tx_packets_total", "counter"),
            ("flannel_vxlan_tx_bytes_total", "counter"),
            ("flannel_vxlan_rx_checksums_completed_total", "counter"),
            ("flannel_vxlan_rx_bad_checksums_total", "counter"),
            ("flannel_vxlan_send_failures_total", "counter"),
            ("flannel_vxlan_tun_write_failures_total", "counter"),
            ("flannel_vxlan_packet_loop_panics_total", "counter"),
            ("flannel_vxlan_drops_total", "counter"),
            ("flannel_vxlan_queue_reads_total", "counter"),
        ];
        let mut have = types.clone();
        have.sort_unstable();
        want.sort_unstable();
        assert_eq!(have, want, "{text}");
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                assert!(help.ends_with('.') && !help.ends_with(".."), "{line}");
            } else if !line.starts_with('#') {
                // Every sample belongs to the family declared by the last TYPE line.
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert!(types.iter().any(|(n, _)| *n == name), "{line}");
            }
        }
        // Kernel forwarding: no data-plane families, no peer table.
        let kernel = DaemonMetrics::new().render();
        assert!(!kernel.contains("flannel_vxlan_"), "{kernel}");
        assert!(!kernel.contains("peer_table"), "{kernel}");
        assert!(kernel.contains("flannel_peers 0\n"), "{kernel}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = DaemonMetrics::new();
        m.set_peer_health(vec![PeerGauge {
            subnet: "a\"b".into(),
            public_ip: "c\nd".into(),
            reachable: Some(false),
            failures_total: 4,
        }]);
        let text = m.render();
        assert!(
            text.contains(r#"flannel_peer_reachable{subnet="a\"b",public_ip="c\nd"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn renders_peer_paths_and_switches() {
        let m = DaemonMetrics::default();
        assert!(!m.render().contains("flannel_peer_path"));
        m.set_peer_paths(vec![PeerPathGauge {
            subnet: "10.244.1.0/24".into(),
            public_ip: "198.18.0.2".into(),
            path: "direct",
            switches: 1,
        }]);
        let text = m.render();
        for line in [
            "# TYPE flannel_peer_path gauge\n",
            "flannel_peer_path{subnet=\"10.244.1.0/24\",public_ip=\"198.18.0.2\",path=\"vxlan\"} 0\n",
            "flannel_peer_path{subnet=\"10.244.1.0/24\",public_ip=\"198.18.0.2\",path=\"direct\"} 1\n",
            "# TYPE flannel_peer_path_switches_total counter\n",
            "flannel_peer_path_switches_total{subnet=\"10.244.1.0/24\",public_ip=\"198.18.0.2\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn renders_peer_reachability() {
        let m = DaemonMetrics::default();
        let g = |subnet: &str, reachable, failures_total| PeerGauge {
            subnet: subnet.into(),
            public_ip: "198.51.100.7".into(),
            reachable,
            failures_total,
        };
        m.set_peer_health(vec![
            g("10.244.1.0/24", Some(false), 3),
            g("10.244.2.0/24", Some(true), 0),
            g("10.244.3.0/24", None, 1),
        ]);
        let text = m.render();
        assert!(
            text.contains(
                "flannel_peer_reachable{subnet=\"10.244.1.0/24\",public_ip=\"198.51.100.7\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "flannel_peer_reachable{subnet=\"10.244.2.0/24\",public_ip=\"198.51.100.7\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("flannel_peer_reachable{subnet=\"10.244.3.0/24\""),
            "{text}"
        );
        assert!(text.contains("flannel_peer_probe_failures_total{subnet=\"10.244.3.0/24\",public_ip=\"198.51.100.7\"} 1\n"), "{text}");
    }
}
