//! Running `flanneld doctor` on a node of a run and reading its output, in the format of the
//! doctor contract (`DOCTOR_CONTRACT.md`):
//!
//! ```text
//! PASS ip-forward: net.ipv4.ip_forward = 1
//! FAIL peer-reachable: peer 10.244.2.0/24 at 198.18.0.2 (UDP 8472) does not answer
//!   fix: ...
//! doctor: 1 passed, 0 warnings, 1 failed
//! ```
//!
//! i.e. `^(PASS|WARN|FAIL|SKIP) <check-id>: <message>$`, each followed by zero or more indented
//! `  fix: ...` lines, and a summary line last. Exit status 0 (no FAIL), 1 (a FAIL), 2 (usage or
//! configuration error). The scenarios assert on parsed checks, never on free text alone.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::cluster::{Cluster, NodeKind};
use crate::cmd;
use crate::store::StoreKind;

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// The check passed.
    Pass,
    /// Something suspicious that does not break the node by itself.
    Warn,
    /// The check failed: this breaks pod traffic.
    Fail,
    /// The check does not apply (or could not run).
    Skip,
}

impl Level {
    /// The word doctor prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Skip => "SKIP",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        match s {
            "PASS" => Some(Level::Pass),
            "WARN" => Some(Level::Warn),
            "FAIL" => Some(Level::Fail),
            "SKIP" => Some(Level::Skip),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check line with its indented `fix:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorCheck {
    /// Verdict.
    pub level: Level,
    /// Check id (`ip-forward`, `peer-reachable`, ...).
    pub id: String,
    /// The message after `<id>: `.
    pub message: String,
    /// Text of each `  fix: ...` line (without the `fix: ` prefix); other indented lines are
    /// continuation lines of the previous fix (or of the message when there is none yet).
    pub fixes: Vec<String>,
}

impl DoctorCheck {
    /// The message and the fixes, for substring searches.
    pub fn text(&self) -> String {
        let mut s = self.message.clone();
        for f in &self.fixes {
            s.push('\n');
            s.push_str(f);
        }
        s
    }
}

/// The last line: `doctor: N passed, N warnings, N failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DoctorSummary {
    /// Checks that passed.
    pub passed: u32,
    /// Warnings.
    pub warnings: u32,
    /// Failures.
    pub failed: u32,
}

/// Parsed `flanneld doctor` output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DoctorReport {
    /// Every check line, in order.
    pub checks: Vec<DoctorCheck>,
    /// The summary line, if present.
    pub summary: Option<DoctorSummary>,
    /// Non-empty lines that follow neither shape (the contract allows none).
    pub unparsed: Vec<String>,
}

fn check_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn parse_summary(line: &str) -> Option<DoctorSummary> {
    let rest = line.strip_prefix("doctor: ")?;
    let mut parts = rest.split(", ");
    // `N passed`, `N warnings` (also `1 warning`), `N failed`.
    let mut num = |words: &[&str]| -> Option<u32> {
        let (n, word) = parts.next()?.split_once(' ')?;
        words.contains(&word).then_some(())?;
        n.parse().ok()
    };
    let passed = num(&["passed"])?;
    let warnings = num(&["warnings", "warning"])?;
    let failed = num(&["failed"])?;
    parts.next().is_none().then_some(DoctorSummary {
        passed,
        warnings,
        failed,
    })
}

fn parse_check(line: &str) -> Option<DoctorCheck> {
    let (word, rest) = line.split_once(' ')?;
    let level = Level::parse(word)?;
    let (id, message) = rest.split_once(": ").or_else(|| {
        // A check with an empty message: `PASS id:`.
        rest.strip_suffix(':').map(|id| (id, ""))
    })?;
    check_id_ok(id).then(|| DoctorCheck {
        level,
        id: id.to_string(),
        message: message.to_string(),
        fixes: Vec::new(),
    })
}

impl DoctorReport {
    /// Parses doctor's stdout. Never fails: lines outside the contract land in `unparsed`.
    pub fn parse(text: &str) -> DoctorReport {
        let mut r = DoctorReport::default();
        for raw in text.lines() {
            let line = raw.trim_end();
            if line.trim().is_empty() {
                continue;
            }
            if line.starts_with(char::is_whitespace) {
                let body = line.trim_start();
                match r.checks.last_mut() {
                    Some(c) => match body.strip_prefix("fix:") {
                        Some(fix) => c.fixes.push(fix.trim_start().to_string()),
                        None => match c.fixes.last_mut() {
                            Some(f) => {
                                f.push(' ');
                                f.push_str(body);
                            }
                            None => {
                                c.message.push(' ');
                                c.message.push_str(body);
                            }
                        },
                    },
                    None => r.unparsed.push(line.to_string()),
                }
                continue;
            }
            if let Some(s) = parse_summary(line) {
                r.summary = Some(s);
            } else if let Some(c) = parse_check(line) {
                r.checks.push(c);
            } else {
                r.unparsed.push(line.to_string());
            }
        }
        r
    }

    /// Checks with this id.
    pub fn by_id<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a DoctorCheck> + 'a {
        self.checks.iter().filter(move |c| c.id == id)
    }

    /// Checks with this level and id.
    pub fn find<'a>(
        &'a self,
        level: Level,
        id: &'a str,
    ) -> impl Iterator<Item = &'a DoctorCheck> + 'a {
        self.by_id(id).filter(move |c| c.level == level)
    }

    /// True when a check with this level and id exists.
    pub fn has(&self, level: Level, id: &str) -> bool {
        self.find(level, id).next().is_some()
    }

    /// True when a check with this level and id mentions `needle` in its message or fixes.
    pub fn has_mentioning(&self, level: Level, id: &str, needle: &str) -> bool {
        self.find(level, id).any(|c| c.text().contains(needle))
    }

    /// Count of checks per level: (pass, warn, fail, skip).
    pub fn counts(&self) -> (u32, u32, u32, u32) {
        let n = |l: Level| self.checks.iter().filter(|c| c.level == l).count() as u32;
        (
            n(Level::Pass),
            n(Level::Warn),
            n(Level::Fail),
            n(Level::Skip),
        )
    }

    /// Problems with the output's shape: unparsed lines, a missing summary, or a summary that
    /// does not match the check lines. Empty when the output follows the contract.
    pub fn contract_problems(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .unparsed
            .iter()
            .map(|l| format!("line outside the contract: {l:?}"))
            .collect();
        let (p, w, f, _) = self.counts();
        match self.summary {
            None => v.push("no `doctor: N passed, N warnings, N failed` line".into()),
            Some(s) if (s.passed, s.warnings, s.failed) != (p, w, f) => v.push(format!(
                "summary says {} passed, {} warnings, {} failed; the lines say {p}, {w}, {f}",
                s.passed, s.warnings, s.failed
            )),
            Some(_) => {}
        }
        if self.checks.is_empty() {
            v.push("no check lines".into());
        }
        v
    }
}

/// One `flanneld doctor` run on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorRun {
    /// Node short name.
    pub node: String,
    /// Exit status (None: killed by a signal).
    pub status: Option<i32>,
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr.
    pub stderr: String,
    /// Parsed stdout.
    pub report: DoctorReport,
}

impl DoctorRun {
    /// True when this flanneld has no doctor yet (exit 2 saying "not implemented"): assertions
    /// on its output cannot be verified.
    pub fn not_implemented(&self) -> bool {
        self.status == Some(2)
            && (self.stderr.contains("not implemented") || self.stdout.contains("not implemented"))
    }

    /// Exit status consistent with the contract: 1 with a FAIL line, else 0.
    pub fn status_consistent(&self) -> bool {
        let failed = self.report.has_any(Level::Fail);
        self.status == Some(if failed { 1 } else { 0 })
    }
}

impl DoctorReport {
    /// True when any check has this level.
    pub fn has_any(&self, level: Level) -> bool {
        self.checks.iter().any(|c| c.level == level)
    }
}

impl fmt::Display for DoctorRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "flanneld doctor on {} (exit {}):",
            self.node,
            self.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "signal".into())
        )?;
        for l in self.stdout.lines() {
            writeln!(f, "  | {l}")?;
        }
        for l in self.stderr.lines().take(20) {
            writeln!(f, "  ! {l}")?;
        }
        Ok(())
    }
}

/// The plugins flannel's CNI config chain calls.
pub const CNI_PLUGINS: [&str; 4] = ["flannel", "bridge", "portmap", "host-local"];

/// How long one doctor run may take (peer probes included).
pub const DOCTOR_LIMIT: Duration = Duration::from_secs(60);

impl Cluster {
    /// The `flanneld doctor` command line for a node: the node's own flanneld arguments after
    /// a leading `doctor` (same store, subnet file, interface and data plane).
    pub fn doctor_command(&self, node: &str) -> Result<Vec<String>> {
        let mut v = self.flanneld_command(node)?;
        if v.is_empty() {
            return Err(anyhow!("empty flanneld command for {node}"));
        }
        v.insert(1, "doctor".into());
        let (bin, conf) = self.cni_dirs(node)?;
        v.push(format!("--cni-bin-dir={}", bin.display()));
        v.push(format!("--cni-conf-dir={}", conf.display()));
        Ok(v)
    }

    /// The node's CNI plugin and config directories as doctor sees them: the node's real CNI
    /// layout in the run directory ([`Cluster::cni_layout`]: the system plugins, `flannel` =
    /// this harness as flannel's meta-plugin, kube-flannel.yml's conflist), never the host's
    /// `/opt/cni/bin` or `/etc/cni/net.d`. Tests break them to exercise doctor.
    pub fn cni_dirs(&self, node: &str) -> Result<(PathBuf, PathBuf)> {
        let l = self.cni_layout(node)?;
        Ok((l.bin_dir, l.conf_dir))
    }

    /// Runs `flanneld doctor` inside a flanneld node's namespace and parses its output.
    pub fn doctor(&self, node: &str) -> Result<DoctorRun> {
        let n = self
            .node(node)
            .ok_or_else(|| anyhow!("no node {node:?} in run {}", self.prefix()))?;
        if n.kind == NodeKind::KernelRef {
            return Err(anyhow!("{} is a kernel-ref node: no flanneld", n.name));
        }
        let args = self.doctor_command(&n.name)?;
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = cmd::ns_command(&n.ns, &argv);
        if self.store_kind() == StoreKind::Kube {
            c.env("NODE_NAME", &n.name);
        }
        let out = cmd::run(&mut c, DOCTOR_LIMIT)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(DoctorRun {
            node: n.name.clone(),
            status: out.status.code(),
            report: DoctorReport::parse(&stdout),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of the contract, verbatim, plus a summary line.
    const CONTRACT: &str = "\
PASS ip-forward: net.ipv4.ip_forward = 1
FAIL ip-forward: net.ipv4.ip_forward = 0: this node does not forward pod traffic
  fix: sysctl -w net.ipv4.ip_forward=1, and find the sysctl file that resets it ...
WARN security-software: process kesl (pid 1234) is known to hook the network stack
  fix: ...
FAIL peer-reachable: peer 10.244.1.0/24 at 198.51.100.7 (UDP 8472) does not answer ...
  fix: if the peer is behind NAT, set flannel.alpha.coreos.com/public-ip-overwrite on it
  fix: open UDP 8472 between nodes, or move Backend.Port,
    or use host-gw when nodes share layer 2
doctor: 1 passed, 1 warnings, 2 failed
";

    #[test]
    fn parses_the_contract_examples() {
        let r = DoctorReport::parse(CONTRACT);
        assert_eq!(r.checks.len(), 4, "{r:?}");
        assert!(r.unparsed.is_empty(), "{:?}", r.unparsed);
        assert_eq!(
            r.summary,
            Some(DoctorSummary {
                passed: 1,
                warnings: 1,
                failed: 2
            })
        );
        assert!(
            r.contract_problems().is_empty(),
            "{:?}",
            r.contract_problems()
        );
        assert!(r.has(Level::Pass, "ip-forward"));
        assert!(r.has(Level::Fail, "ip-forward"));
        assert!(!r.has(Level::Fail, "tx-checksum"));
        let fwd = r.find(Level::Fail, "ip-forward").next().unwrap();
        assert_eq!(
            fwd.message,
            "net.ipv4.ip_forward = 0: this node does not forward pod traffic"
        );
        assert_eq!(fwd.fixes.len(), 1);
        assert!(fwd.fixes[0].starts_with("sysctl -w net.ipv4.ip_forward=1"));
        assert!(r.has_mentioning(Level::Warn, "security-software", "kesl"));
        assert!(!r.has_mentioning(Level::Warn, "security-software", "qaxsafed"));
        let peer = r.find(Level::Fail, "peer-reachable").next().unwrap();
        assert_eq!(peer.fixes.len(), 2);
        assert!(peer.fixes[1].ends_with("or use host-gw when nodes share layer 2"));
        assert!(r.has_mentioning(Level::Fail, "peer-reachable", "198.51.100.7"));
        assert!(r.has_mentioning(Level::Fail, "peer-reachable", "public-ip-overwrite"));
        assert_eq!(r.counts(), (1, 1, 2, 0));
    }

    /// Output of the doctor branch's implementation (P3 cause 2 on the kube store, trimmed).
    const REAL: &str = r#"PASS ip-forward: net.ipv4.ip_forward = 1
PASS vxlan-device: flannel.1 is up (kernel vxlan, VNI 1)
PASS tx-checksum: flannel.1: tx-checksum-ip-generic off
PASS forward-reject: pod traffic in 10.244.0.0/16 is accepted by "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"
PASS host-firewall: no firewalld or ufw chains
PASS security-software: no known network-hooking security software running
FAIL peer-reachable: peer 10.244.2.0/24 at 198.18.0.2 (UDP 8472) does not answer ICMP echo to 10.244.2.0 over the overlay
  fix: check that UDP 8472 is allowed between the nodes, or move Backend.Port
  fix: if that node is behind NAT: set flannel.alpha.coreos.com/public-ip-overwrite on that node to an address this node can reach, then restart flanneld there
PASS peer-reachable: peer 10.244.3.0/24 at 198.18.0.3 (UDP 8472) answers ICMP echo to 10.244.3.0
PASS subnet-lease: subnet.env and the store agree: 10.244.1.0/24 at 198.18.0.1
doctor: 8 passed, 0 warnings, 1 failed
"#;

    #[test]
    fn parses_the_implementation_output() {
        let r = DoctorReport::parse(REAL);
        assert!(
            r.contract_problems().is_empty(),
            "{:?}",
            r.contract_problems()
        );
        assert_eq!(r.counts(), (8, 0, 1, 0));
        assert_eq!(r.by_id("peer-reachable").count(), 2);
        let fwd = r.find(Level::Pass, "forward-reject").next().unwrap();
        assert!(
            fwd.message.ends_with("\"flanneld forward\" -j ACCEPT\""),
            "{fwd:?}"
        );
        let peer = r.find(Level::Fail, "peer-reachable").next().unwrap();
        assert!(peer.message.contains("198.18.0.2 (UDP 8472)"));
        assert!(peer.fixes[0].contains("Backend.Port"));
        assert!(peer.fixes[1].contains("public-ip-overwrite"));
        assert!(!r.has_mentioning(Level::Fail, "peer-reachable", "198.18.0.3"));
    }

    #[test]
    fn flags_output_outside_the_contract() {
        let r = DoctorReport::parse("Checking node...\nOK ip-forward: fine\nPASS Bad Id: x\n");
        assert!(r.checks.is_empty());
        assert_eq!(r.unparsed.len(), 3);
        let problems = r.contract_problems();
        assert!(
            problems.iter().any(|p| p.contains("no `doctor:")),
            "{problems:?}"
        );
        assert!(problems.iter().any(|p| p.contains("no check lines")));
        // A summary that disagrees with the lines.
        let r = DoctorReport::parse(
            "FAIL vxlan-device: flannel.1 missing\ndoctor: 0 passed, 0 warnings, 0 failed\n",
        );
        assert!(r.contract_problems()[0].contains("the lines say 0, 0, 1"));
        // An indented line before any check.
        let r = DoctorReport::parse("  fix: orphan\n");
        assert_eq!(r.unparsed, vec!["  fix: orphan".to_string()]);
        // Summary with a trailing extra part is not a summary.
        assert!(parse_summary("doctor: 1 passed, 0 warnings, 0 failed, 3 skipped").is_none());
        assert!(parse_summary("doctor: 1 passed, 0 warnings, 0 failed").is_some());
    }

    #[test]
    fn exit_status_rules() {
        let run = |status: Option<i32>, stdout: &str, stderr: &str| DoctorRun {
            node: "n1".into(),
            status,
            stdout: stdout.into(),
            stderr: stderr.into(),
            report: DoctorReport::parse(stdout),
        };
        let ni = run(Some(2), "", "flanneld doctor is not implemented yet\n");
        assert!(ni.not_implemented());
        assert!(!run(Some(2), "", "flanneld: bad flag\n").not_implemented());
        let failing = "FAIL forward-reject: -A FORWARD -j REJECT --reject-with icmp-host-prohibited\ndoctor: 0 passed, 0 warnings, 1 failed\n";
        assert!(run(Some(1), failing, "").status_consistent());
        assert!(!run(Some(0), failing, "").status_consistent());
        let clean = "PASS ip-forward: net.ipv4.ip_forward = 1\nWARN host-firewall: chain FORWARD_IN_ZONES\ndoctor: 1 passed, 1 warnings, 0 failed\n";
        assert!(run(Some(0), clean, "").status_consistent());
        assert!(!run(Some(1), clean, "").status_consistent());
        assert!(run(Some(1), failing, "")
            .to_string()
            .contains("  | FAIL forward-reject"));
    }
}
