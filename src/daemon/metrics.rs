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

/// Gauges and counters the daemon exports on `/metrics`.
#[derive(Debug, Default)]
pub struct DaemonMetrics {
    peers: AtomicU64,
    skipped_leases: AtomicU64,
    plane: Mutex<PlaneMetrics>,
}

impl DaemonMetrics {
    /// Records the number of programmed peers.
    pub fn set_peers(&self, n: usize) {
        self.peers.store(n as u64, Ordering::Relaxed);
    }

    /// Records the number of leases skipped as invalid.
    pub fn set_skipped_leases(&self, n: usize) {
        self.skipped_leases.store(n as u64, Ordering::Relaxed);
    }

    /// Attaches the data plane's counters.
    pub fn set_plane(&self, plane: PlaneMetrics) {
        if let Ok(mut p) = self.plane.lock() {
            *p = plane;
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
        let counters = Arc::new(Counters::new());
        counters.count_drop(DropReason::UnknownSource);
        m.set_plane(PlaneMetrics::Userspace {
            counters,
            io_errors: Arc::new(IoErrors::default()),
        });
        let text = m.render();
        assert!(text.contains("flannel_peers 3\n"), "{text}");
        assert!(
            text.contains("flannel_vxlan_drops_total{reason=\"unknown_source\"} 1\n"),
            "{text}"
        );
    }
}
