//! Probing the cluster: one probe, the connectivity matrix ([`crate::check`]) and timed TCP transfers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::check::{
    run_probe, Cell, Family, Matrix, ProbeKind, ProbeOutcome, SourceKind, Task, WORKERS,
};
use crate::cmd;

use super::{Cluster, PodState};

impl Cluster {
    /// One probe from namespace `from` (`n1`, `n1p2` or a full name of this run) to `ip`:
    /// ICMP ignores `port`; TCP, UDP and DNS use `port` (None: the responders' port).
    pub fn probe(
        &self,
        from: &str,
        kind: ProbeKind,
        ip: impl Into<IpAddr>,
        port: Option<u16>,
    ) -> ProbeOutcome {
        let ip = ip.into();
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

    /// Runs the connectivity matrix (over each family of the run).
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
                "{} {:<10} underlay {:<13} subnet {}{}{}",
                n.name,
                n.kind.as_str(),
                n.underlay_ip,
                n.subnet
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                match (n.underlay_ip6, n.subnet6) {
                    (Some(u), s) => format!(
                        "  underlay6 {u} subnet6 {}",
                        s.map_or_else(|| "-".into(), |s| s.to_string())
                    ),
                    _ => String::new(),
                },
                match (n.site, n.public_ip) {
                    (Some(s), Some(p)) => format!("  site {s} NAT {p}"),
                    _ => String::new(),
                }
            ));
        }
        let fam = self.ip_family();
        let families: Vec<Family> = [(fam.has_v4(), Family::V4), (fam.has_v6(), Family::V6)]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| *f)
            .collect();
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
                let src = (sp.name.as_str(), SourceKind::Pod, sp.ns.as_str());
                add_cells(&mut m, &mut tasks, src, dp, same, pod_kinds, &families);
            }
        }
        for n in self.nodes() {
            m.sources.push(n.name.clone());
            for (dn, dp) in &pods {
                if dn.name == n.name {
                    continue;
                }
                let src = (n.name.as_str(), SourceKind::Host, n.ns.as_str());
                add_cells(&mut m, &mut tasks, src, dp, false, host_kinds, &families);
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
    /// A TCP echo probe of `bytes` bytes (0: a short line) from namespace `from`.
    pub fn probe_tcp_bytes(
        &self,
        from: &str,
        ip: impl Into<IpAddr>,
        port: u16,
        bytes: usize,
    ) -> ProbeOutcome {
        let ip = ip.into();
        let fail = |detail: String| ProbeOutcome {
            kind: ProbeKind::Tcp,
            ok: false,
            detail,
        };
        let (Ok(ns), Some(bin)) = (self.resolve_ns(from), self.harness_bin()) else {
            return fail(format!("no namespace {from} or no netns-harness binary"));
        };
        let bin = bin.to_string_lossy().into_owned();
        let addr = std::net::SocketAddr::new(ip, port).to_string();
        let n = bytes.to_string();
        match cmd::run(
            &mut cmd::ns_command(&ns, &[&bin, "probe", "tcp", &addr, "--bytes", &n]),
            Duration::from_secs(6),
        ) {
            Ok(o) if o.status.success() => ProbeOutcome {
                kind: ProbeKind::Tcp,
                ok: true,
                detail: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            },
            Ok(o) => fail(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => fail(format!("{e:#}")),
        }
    }
}

/// One matrix cell per family from `src` (name, kind, namespace) to the pod `dst` (families
/// the pod has no address of are skipped), and a probe task of each kind for each.
fn add_cells(
    m: &mut Matrix,
    tasks: &mut Vec<Task>,
    (src, src_kind, ns): (&str, SourceKind, &str),
    dst: &PodState,
    same_node: bool,
    kinds: &[ProbeKind],
    families: &[Family],
) {
    for family in families {
        let ip: IpAddr = match family {
            Family::V4 => dst.ip.into(),
            Family::V6 => match dst.ip6 {
                Some(ip6) => ip6.into(),
                None => continue,
            },
        };
        let cell = m.cells.len();
        m.cells.push(Cell {
            src: src.to_string(),
            src_kind,
            dst: dst.name.clone(),
            dst_ip: ip,
            family: *family,
            same_node,
            results: Vec::new(),
        });
        tasks.extend(kinds.iter().map(|&kind| Task {
            cell,
            kind,
            ns: ns.to_string(),
            ip,
            port: None,
        }));
    }
}
