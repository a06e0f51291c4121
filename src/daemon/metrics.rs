//! Prometheus text exposition of the daemon's gauges and the data plane's counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::userspace::IoErrors;
use crate::dataplane::{Counters, DropReason};

/// Where data-plane counters come from.
#[derive(Debug, Clone, Default)]
pub enum PlaneMetrics {
    /// The kernel forwards; nothing is counted here.
    #[default]
    Kernel,
    /// The userspace data plane's counters.
    Userspace {
        /// Verdict counters of the sans-IO core.
        counters: Arc<Counters>,
        /// IO failures of the packet threads.
        io_errors: Arc<IoErrors>,
    },
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

/// Gauges and counters the daemon exports on `/metrics`.
#[derive(Debug, Default)]
pub struct DaemonMetrics {
    peers: AtomicU64,
    skipped_leases: AtomicU64,
    /// Entries of the userspace plane's peer table (`None`: kernel forwarding).
    peer_table: Mutex<Option<u64>>,
    refusals: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    plane: Mutex<PlaneMetrics>,
    peer_health: Mutex<Vec<PeerGauge>>,
}

impl DaemonMetrics {
    /// Records the number of programmed peers.
    pub fn set_peers(&self, n: usize) {
        self.peers.store(n as u64, Ordering::Relaxed);
    }

    /// Records the size of the userspace data plane's peer table.
    pub fn set_peer_table(&self, n: usize) {
        if let Ok(mut t) = self.peer_table.lock() {
            *t = Some(n as u64);
        }
    }

    /// Records the number of leases skipped as invalid.
    pub fn set_skipped_leases(&self, n: usize) {
        self.skipped_leases.store(n as u64, Ordering::Relaxed);
    }

    /// Counts one newly refused lease (each refusal once while it lasts), by reason label.
    pub fn count_refusal(&self, reason: &'static str) {
        if let Ok(mut r) = self.refusals.lock() {
            *r.entry(reason).or_default() += 1;
        }
    }

    /// Attaches the data plane's counters.
    pub fn set_plane(&self, plane: PlaneMetrics) {
        if let Ok(mut p) = self.plane.lock() {
            *p = plane;
        }
    }

    /// Replaces the peers' probe states.
    pub fn set_peer_health(&self, gauges: Vec<PeerGauge>) {
        if let Ok(mut g) = self.peer_health.lock() {
            *g = gauges;
        }
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "flannel_peers",
            "Remote subnets currently programmed.",
            self.peers.load(Ordering::Relaxed),
        );
        gauge(
            "flannel_skipped_leases",
            "Leases skipped because they are invalid (see the daemon log).",
            self.skipped_leases.load(Ordering::Relaxed),
        );
        if let Some(n) = self.peer_table.lock().ok().and_then(|t| *t) {
            gauge(
                "flannel_userspace_peer_table_entries",
                "Remote subnets in the userspace data plane's forwarding table.",
                n,
            );
        }
        let refusals = self.refusals.lock().map(|r| r.clone()).unwrap_or_default();
        if !refusals.is_empty() {
            let _ = writeln!(
                out,
                "# HELP flannel_refused_leases_total Peer leases refused at intake (counted once per appearance, named in the log).\n# TYPE flannel_refused_leases_total counter"
            );
            for (reason, n) in &refusals {
                let _ = writeln!(
                    out,
                    "flannel_refused_leases_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let health = self
            .peer_health
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        if !health.is_empty() {
            let labels = |g: &PeerGauge| {
                format!("{{subnet=\"{}\",public_ip=\"{}\"}}", g.subnet, g.public_ip)
            };
            let _ = writeln!(
                out,
                "# HELP flannel_peer_reachable Whether the peer answers ICMP echo over the overlay (0 after 3 unanswered probes in a row).\n# TYPE flannel_peer_reachable gauge"
            );
            for g in &health {
                if let Some(r) = g.reachable {
                    let _ = writeln!(out, "flannel_peer_reachable{} {}", labels(g), u8::from(r));
                }
            }
            let _ = writeln!(
                out,
                "# HELP flannel_peer_probe_failures_total Peer probes that went unanswered.\n# TYPE flannel_peer_probe_failures_total counter"
            );
            for g in &health {
                let _ = writeln!(
                    out,
                    "flannel_peer_probe_failures_total{} {}",
                    labels(g),
                    g.failures_total
                );
            }
        }
        let plane = self.plane.lock().map(|p| p.clone()).unwrap_or_default();
        if let PlaneMetrics::Userspace {
            counters,
            io_errors,
        } = plane
        {
            let s = counters.snapshot();
            let mut counter = |name: &str, help: &str, v: u64| {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
                );
            };
            counter(
                "flannel_vxlan_rx_packets_total",
                "Inner packets delivered to TUN.",
                s.rx_packets,
            );
            counter(
                "flannel_vxlan_rx_bytes_total",
                "Inner bytes delivered to TUN.",
                s.rx_bytes,
            );
            counter(
                "flannel_vxlan_tx_packets_total",
                "VXLAN datagrams sent.",
                s.tx_packets,
            );
            counter(
                "flannel_vxlan_tx_bytes_total",
                "VXLAN bytes sent.",
                s.tx_bytes,
            );
            counter(
                "flannel_vxlan_rx_checksums_completed_total",
                "Received inner packets whose TCP/UDP checksum a sender's offload left unfinished, completed before delivery.",
                s.rx_csum_completed,
            );
            counter(
                "flannel_vxlan_rx_bad_checksums_total",
                "Received inner TCP segments found with a bad checksum and delivered as they came, for the kernel to drop.",
                s.rx_csum_bad,
            );
            counter(
                "flannel_vxlan_send_failures_total",
                "UDP sends the kernel refused.",
                io_errors.send_failed(),
            );
            counter(
                "flannel_vxlan_tun_write_failures_total",
                "TUN writes the kernel refused.",
                io_errors.tun_write_failed(),
            );
            counter(
                "flannel_vxlan_packet_loop_panics_total",
                "Packet loops restarted after a panic (a bug; should stay 0).",
                io_errors.panics(),
            );
            let _ = writeln!(
                out,
                "# HELP flannel_vxlan_drops_total Packets dropped by the data plane, by reason.\n# TYPE flannel_vxlan_drops_total counter"
            );
            for r in DropReason::ALL {
                let _ = writeln!(
                    out,
                    "flannel_vxlan_drops_total{{reason=\"{}\"}} {}",
                    r.as_str(),
                    s.drops_for(*r)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_gauges_and_drop_reasons() {
        let m = DaemonMetrics::default();
        m.set_peers(3);
        m.set_peer_table(2);
        let counters = Arc::new(Counters::new());
        counters.count_drop(DropReason::UnknownSource);
        counters.count_drop(DropReason::InnerSourceMismatch);
        counters.count_drop(DropReason::IcmpRateLimited);
        counters.count_drop(DropReason::IcmpRateLimited);
        m.set_plane(PlaneMetrics::Userspace {
            counters,
            io_errors: Arc::new(IoErrors::default()),
        });
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
