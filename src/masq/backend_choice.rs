//! Which iptables backend holds the host's rules: legacy (x_tables) or nft (nf_tables).
//!
//! A container image ships both; rules written to the other backend than kubelet's and
//! kube-proxy's are in force but invisible to them (and to `iptables` on the host). This is
//! the decision of kubernetes-sigs/iptables-wrappers (which flannel's image ships): kubelet's
//! hint chains `KUBE-IPTABLES-HINT` / `KUBE-KUBELET-CANARY` first (nft, then legacy), else the
//! backend with more rules. On a tie iptables-wrappers takes nft; we take the system's default
//! `iptables` (in the image that is Debian's, nft; on a test host it keeps the host's default).
//! [`choose`] is that decision on the `*-save` outputs; [`select`] gathers them through a
//! [`Runner`].

use super::exec::{ExecError, MasqError, Runner};
use crate::netlink::IpFamily;

/// An iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-legacy`.
    Legacy,
    /// `iptables-nft`.
    Nft,
}

/// The iptables binaries to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binaries {
    /// Plain `iptables`/`iptables-restore` (whatever the system's alternative points at):
    /// used unless both `-legacy` and `-nft` variants are installed.
    Plain,
    /// The `-legacy` or `-nft` variants.
    Variant(IptablesBackend),
}

impl Binaries {
    /// `iptables`/`ip6tables` for this choice.
    pub fn iptables(self, family: IpFamily) -> &'static str {
        use IptablesBackend::{Legacy, Nft};
        match (self, family) {
            (Binaries::Plain, IpFamily::V4) => "iptables",
            (Binaries::Plain, IpFamily::V6) => "ip6tables",
            (Binaries::Variant(Legacy), IpFamily::V4) => "iptables-legacy",
            (Binaries::Variant(Legacy), IpFamily::V6) => "ip6tables-legacy",
            (Binaries::Variant(Nft), IpFamily::V4) => "iptables-nft",
            (Binaries::Variant(Nft), IpFamily::V6) => "ip6tables-nft",
        }
    }

    /// `iptables-restore`/`ip6tables-restore` for this choice.
    pub fn restore(self, family: IpFamily) -> &'static str {
        use IptablesBackend::{Legacy, Nft};
        match (self, family) {
            (Binaries::Plain, IpFamily::V4) => "iptables-restore",
            (Binaries::Plain, IpFamily::V6) => "ip6tables-restore",
            (Binaries::Variant(Legacy), IpFamily::V4) => "iptables-legacy-restore",
            (Binaries::Variant(Legacy), IpFamily::V6) => "ip6tables-legacy-restore",
            (Binaries::Variant(Nft), IpFamily::V4) => "iptables-nft-restore",
            (Binaries::Variant(Nft), IpFamily::V6) => "ip6tables-nft-restore",
        }
    }
}

/// Chains kubelet (≥ 1.17) creates in `mangle` in the backend it uses.
const HINT_CHAINS: [&str; 2] = [":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY "];

fn has_hint(save: &str) -> bool {
    save.lines().any(|l| {
        HINT_CHAINS
            .iter()
            .any(|h| l.starts_with(h) || *l == h[..h.len() - 1])
    })
}

fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with('-')).count()
}

/// The backend that holds the host's rules, from the `iptables-legacy-save` +
/// `ip6tables-legacy-save` output and the `iptables-nft-save` + `ip6tables-nft-save` output;
/// `None` when nothing tells them apart (no hint, as many rules in each).
pub fn choose(legacy_save: &str, nft_save: &str) -> Option<IptablesBackend> {
    // Hints first (nft's, then legacy's), then the larger rule count.
    if has_hint(nft_save) {
        return Some(IptablesBackend::Nft);
    }
    if has_hint(legacy_save) {
        return Some(IptablesBackend::Legacy);
    }
    match rule_count(legacy_save).cmp(&rule_count(nft_save)) {
        std::cmp::Ordering::Greater => Some(IptablesBackend::Legacy),
        std::cmp::Ordering::Less => Some(IptablesBackend::Nft),
        std::cmp::Ordering::Equal => None,
    }
}

/// Runs both `-save` programs of a backend; `None` when neither could be started (not
/// installed). A program that starts but fails counts as no rules, as in iptables-wrappers.
fn save_all(runner: &dyn Runner, v4: &str, v6: &str) -> Option<String> {
    let mut found = false;
    let mut out = String::new();
    for program in [v4, v6] {
        match runner.run(program, &[], None) {
            Ok(text) => {
                found = true;
                out.push_str(&text);
                out.push('\n');
            }
            Err(MasqError::Exec(ExecError::Spawn { .. })) => {}
            Err(_) => found = true,
        }
    }
    found.then_some(out)
}

/// Picks the binaries: when both the legacy and the nft variants are installed, the backend
/// [`choose`] names; otherwise, or when nothing tells them apart, plain `iptables` (the
/// system's default; in the image Debian's, nft, which is iptables-wrappers' choice then).
pub fn select(runner: &dyn Runner) -> Binaries {
    let legacy = save_all(runner, "iptables-legacy-save", "ip6tables-legacy-save");
    let nft = save_all(runner, "iptables-nft-save", "ip6tables-nft-save");
    let (Some(l), Some(n)) = (legacy, nft) else {
        return Binaries::Plain;
    };
    let choice = choose(&l, &n);
    tracing::info!(
        backend = ?choice,
        legacy_rules = rule_count(&l),
        nft_rules = rule_count(&n),
        "iptables backend chosen to match the host's rules (None: the system default)"
    );
    choice.map_or(Binaries::Plain, Binaries::Variant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::exec::Invocation;
    use std::collections::BTreeMap;

    const KUBE_NFT_MANGLE: &str = "# Generated by iptables-nft-save v1.8.9\n*mangle\n\
        :PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";

    fn rules(n: usize) -> String {
        let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
        for i in 0..n {
            s.push_str(&format!("-A INPUT -s 198.18.0.{i}/32 -j ACCEPT\n"));
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn kubelet_hint_wins_over_rule_counts() {
        // nft hint, even with many more legacy rules (e.g. leftovers of an old Docker).
        assert_eq!(
            choose(&rules(50), KUBE_NFT_MANGLE),
            Some(IptablesBackend::Nft)
        );
        let legacy = format!("{}{}", rules(0), KUBE_NFT_MANGLE.replace("nft", "legacy"));
        assert_eq!(choose(&legacy, &rules(30)), Some(IptablesBackend::Legacy));
        // Both hinted: nft is checked first, as in iptables-wrappers.
        assert_eq!(choose(&legacy, KUBE_NFT_MANGLE), Some(IptablesBackend::Nft));
    }

    #[test]
    fn more_rules_wins_and_a_tie_is_undecided() {
        assert_eq!(choose(&rules(12), &rules(3)), Some(IptablesBackend::Legacy));
        assert_eq!(choose(&rules(3), &rules(12)), Some(IptablesBackend::Nft));
        assert_eq!(choose(&rules(4), &rules(4)), None);
        assert_eq!(choose("", ""), None);
        // Chain declarations and comments are not rules.
        assert_eq!(
            choose("# -A x\n:FOO - [0:0]\n:BAR - [0:0]\n", &rules(0)),
            None
        );
    }

    #[test]
    fn hint_must_be_a_chain_declaration() {
        // A rule that merely mentions the chain name is no hint.
        let mention = "-A INPUT -m comment --comment KUBE-IPTABLES-HINT -j ACCEPT\n";
        assert_eq!(choose(mention, ""), Some(IptablesBackend::Legacy));
    }

    #[test]
    fn binary_names() {
        let l = Binaries::Variant(IptablesBackend::Legacy);
        assert_eq!(l.iptables(IpFamily::V6), "ip6tables-legacy");
        assert_eq!(l.restore(IpFamily::V4), "iptables-legacy-restore");
        let n = Binaries::Variant(IptablesBackend::Nft);
        assert_eq!(n.iptables(IpFamily::V4), "iptables-nft");
        assert_eq!(n.restore(IpFamily::V6), "ip6tables-nft-restore");
        assert_eq!(Binaries::Plain.iptables(IpFamily::V4), "iptables");
        assert_eq!(Binaries::Plain.restore(IpFamily::V6), "ip6tables-restore");
    }

    /// Programs that exist map to their output (`Err` text = exit failure); others fail to
    /// spawn.
    #[derive(Debug)]
    struct Programs(BTreeMap<&'static str, Result<String, String>>);

    impl Runner for Programs {
        fn invoke(&self, cmd: &Invocation<'_>) -> Result<String, MasqError> {
            let program = cmd.program;
            match self.0.get(program) {
                Some(Ok(out)) => Ok(out.clone()),
                Some(Err(e)) => Err(MasqError::Failed {
                    cmd: program.into(),
                    status: "exit status: 1".into(),
                    stderr: e.clone(),
                }),
                None => Err(MasqError::Exec(ExecError::Spawn {
                    cmd: program.into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })),
            }
        }
    }

    #[test]
    fn select_needs_both_variants() {
        let only_plain = Programs(BTreeMap::new());
        assert_eq!(select(&only_plain), Binaries::Plain);
        let only_nft = Programs(BTreeMap::from([("iptables-nft-save", Ok(rules(5)))]));
        assert_eq!(select(&only_nft), Binaries::Plain);
    }

    #[test]
    fn select_counts_both_families_and_tolerates_failures() {
        // Legacy: 3 v4 + 4 v6 rules = 7 > nft's 6 (v6 nft save fails: no rules).
        let p = Programs(BTreeMap::from([
            ("iptables-legacy-save", Ok(rules(3))),
            ("ip6tables-legacy-save", Ok(rules(4))),
            ("iptables-nft-save", Ok(rules(6))),
            ("ip6tables-nft-save", Err("table does not exist".into())),
        ]));
        assert_eq!(select(&p), Binaries::Variant(IptablesBackend::Legacy));
        let p = Programs(BTreeMap::from([
            ("iptables-legacy-save", Ok(rules(40))),
            ("ip6tables-legacy-save", Ok(String::new())),
            ("iptables-nft-save", Ok(String::new())),
            ("ip6tables-nft-save", Ok(KUBE_NFT_MANGLE.into())),
        ]));
        assert_eq!(select(&p), Binaries::Variant(IptablesBackend::Nft));
        // Both installed, nothing tells them apart: the system default.
        let p = Programs(BTreeMap::from([
            ("iptables-legacy-save", Ok(rules(0))),
            ("ip6tables-legacy-save", Ok(rules(0))),
            ("iptables-nft-save", Ok(rules(0))),
            ("ip6tables-nft-save", Ok(rules(0))),
        ]));
        assert_eq!(select(&p), Binaries::Plain);
    }
}
