//! Applying rules with the `iptables`/`ip6tables` binaries and `iptables-restore --noflush`.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::backend_choice::{self, Binaries};
use super::{forward_rules, masq_rules, render_restore, MasqConfig, RestoreOp, Rule, Table};
use super::{FWD_CHAIN, POSTRTG_CHAIN};
use crate::netlink::IpFamily;

pub use super::exec::{MasqError, Runner, SystemRunner};

/// `iptables` or `ip6tables` with the capabilities of the installed version.
#[derive(Debug, Clone)]
pub struct Iptables {
    family: IpFamily,
    iptables: &'static str,
    restore: &'static str,
    /// `-w` for iptables (≥ 1.4.20).
    wait: bool,
    /// `--wait` for iptables-restore and `--random-fully` (≥ 1.6.2).
    modern: bool,
    runner: Arc<dyn Runner>,
}

fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let re = regex::Regex::new(r"v(\d+)\.(\d+)\.(\d+)").ok()?;
    let c = re.captures(s)?;
    Some((c[1].parse().ok()?, c[2].parse().ok()?, c[3].parse().ok()?))
}

impl Iptables {
    /// Picks the legacy or nft binaries the way iptables-wrappers does
    /// ([`backend_choice::select`]: plain `iptables` unless both variants are installed), then
    /// finds their version to choose `-w`, `--wait` and `--random-fully` support as
    /// go-iptables does.
    pub fn detect(family: IpFamily) -> Result<Self, MasqError> {
        let runner: Arc<dyn Runner> = Arc::new(SystemRunner);
        let binaries = backend_choice::select(runner.as_ref());
        Self::detect_binaries(family, runner, binaries)
    }

    /// [`detect`](Iptables::detect) with another runner and plain `iptables`.
    pub fn detect_with(family: IpFamily, runner: Arc<dyn Runner>) -> Result<Self, MasqError> {
        Self::detect_binaries(family, runner, Binaries::Plain)
    }

    /// [`detect`](Iptables::detect) with another runner and given binaries.
    pub fn detect_binaries(
        family: IpFamily,
        runner: Arc<dyn Runner>,
        binaries: Binaries,
    ) -> Result<Self, MasqError> {
        let (iptables, restore) = (binaries.iptables(family), binaries.restore(family));
        let out = runner.run(iptables, &["--version".to_owned()], None)?;
        let v = parse_version(&out).ok_or_else(|| MasqError::Version(out.clone()))?;
        Ok(Iptables {
            family,
            iptables,
            restore,
            wait: v >= (1, 4, 20),
            modern: v >= (1, 6, 2),
            runner,
        })
    }

    /// Whether MASQUERADE `--random-fully` is available (go-iptables `HasRandomFully`).
    pub fn supports_random_fully(&self) -> bool {
        self.modern
    }

    /// The family this applier manages.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The `iptables` binary this applier runs (e.g. `iptables-nft`).
    pub fn program(&self) -> &'static str {
        self.iptables
    }

    fn iptables(&self, args: &[&str]) -> Result<String, MasqError> {
        let mut v: Vec<String> = Vec::with_capacity(args.len() + 1);
        if self.wait {
            v.push("-w".to_owned());
        }
        v.extend(args.iter().map(|s| (*s).to_owned()));
        self.runner.run(self.iptables, &v, None)
    }

    /// `iptables -t <table> -S`: every chain and rule of a table, one per line.
    pub fn list(&self, table: Table) -> Result<Vec<String>, MasqError> {
        Ok(self
            .iptables(&["-t", table.name(), "-S"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// `iptables -t <table> -N <chain>`, or `-F <chain>` when it exists (go-iptables
    /// `ClearChain`).
    pub fn clear_chain(&self, table: Table, chain: &str) -> Result<(), MasqError> {
        if chain_exists(&self.list(table)?, chain) {
            self.iptables(&["-t", table.name(), "-F", chain]).map(drop)
        } else {
            self.iptables(&["-t", table.name(), "-N", chain]).map(drop)
        }
    }

    /// `iptables-restore --noflush [--wait]` with `payload`.
    pub(super) fn restore(&self, payload: &str) -> Result<(), MasqError> {
        let mut args = vec!["--noflush".to_owned()];
        if self.modern {
            args.push("--wait".to_owned());
        }
        tracing::debug!(payload, "iptables-restore");
        self.runner
            .run(self.restore, &args, Some(payload))
            .map(drop)
    }

    /// Whether every rule exists and the flannel chains they need exist.
    pub fn rules_present(&self, rules: &[Rule]) -> Result<bool, MasqError> {
        let mut listings: BTreeMap<Table, Vec<String>> = BTreeMap::new();
        for rule in rules {
            let lines = match listings.entry(rule.table) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(self.list(rule.table)?),
            };
            if let Some(chain) = rule.flannel_chain() {
                if !chain_exists(lines, chain) {
                    return Ok(false);
                }
            }
            if !lines.iter().any(|l| *l == rule.render()) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Installs `rules` in order, one restore transaction per table that first deletes every
    /// existing copy of each rule, then appends them all (flannel's `ipTablesBootstrap`).
    /// Missing flannel chains are created first.
    pub fn bootstrap(&self, rules: &[Rule]) -> Result<(), MasqError> {
        for (table, table_rules) in by_table(rules) {
            let lines = self.list(table)?;
            for chain in [POSTRTG_CHAIN, FWD_CHAIN] {
                let needed = table_rules.iter().any(|r| r.flannel_chain() == Some(chain));
                if needed && !chain_exists(&lines, chain) {
                    self.iptables(&["-t", table.name(), "-N", chain])?;
                }
            }
            let mut ops = Vec::new();
            for rule in &table_rules {
                let copies = lines.iter().filter(|l| **l == rule.render()).count();
                ops.extend(std::iter::repeat_n(RestoreOp::Delete(rule), copies));
                ops.push(RestoreOp::Append(rule));
            }
            self.restore(&render_restore(table, &ops))?;
        }
        Ok(())
    }

    /// Deletes every existing copy of `rules` in one restore transaction per table
    /// (flannel's `teardownIPTables`). Chains are left in place.
    pub fn teardown(&self, rules: &[Rule]) -> Result<(), MasqError> {
        for (table, table_rules) in by_table(rules) {
            let lines = self.list(table)?;
            let mut ops = Vec::new();
            for rule in &table_rules {
                let copies = lines.iter().filter(|l| **l == rule.render()).count();
                ops.extend(std::iter::repeat_n(RestoreOp::Delete(rule), copies));
            }
            if !ops.is_empty() {
                self.restore(&render_restore(table, &ops))?;
            }
        }
        Ok(())
    }

    /// The periodic check: when any rule or chain is missing, recreate the whole set in order.
    /// Returns whether it had to.
    pub fn ensure(&self, rules: &[Rule]) -> Result<bool, MasqError> {
        if self.rules_present(rules)? {
            return Ok(false);
        }
        tracing::info!("Some iptables rules are missing; deleting and recreating rules");
        self.bootstrap(rules)?;
        Ok(true)
    }

    fn check_family(&self, nets: &[IpNet]) -> Result<(), MasqError> {
        for n in nets {
            if IpFamily::of_net(*n) != self.family {
                return Err(MasqError::Config(format!(
                    "{n} is not an {} network",
                    self.family
                )));
            }
        }
        Ok(())
    }

    /// flannel's `SetupAndEnsureMasqRules` for one family: when the previous lease's
    /// (Network, subnet) from subnet.env differ, its rules are deleted first; then
    /// `FLANNEL-POSTRTG` is created or flushed and the rules installed. Returns the rules to
    /// pass to [`ensure`](Iptables::ensure) periodically.
    pub fn setup_masq(
        &self,
        cfg: &MasqConfig,
        previous: Option<(IpNet, IpNet)>,
    ) -> Result<Vec<Rule>, MasqError> {
        self.check_family(&[cfg.network, cfg.subnet])?;
        let random_fully = match cfg.random_fully {
            Some(false) => false,
            Some(true) | None => {
                if cfg.random_fully == Some(true) && !self.supports_random_fully() {
                    tracing::warn!("{} does not support --random-fully", self.iptables);
                }
                self.supports_random_fully()
            }
        };
        if let Some((prev_net, prev_subnet)) = previous {
            let changed = prev_net.trunc() != cfg.network.trunc()
                || prev_subnet.trunc() != cfg.subnet.trunc();
            if changed && self.check_family(&[prev_net, prev_subnet]).is_ok() {
                tracing::info!(
                    "Current network or subnet ({}, {}) is not equal to previous one ({prev_net}, {prev_subnet}), trying to recycle old iptables rules",
                    cfg.network,
                    cfg.subnet
                );
                // Both variants: the previous run may have had another --random-fully setting.
                let mut old = masq_rules(prev_net, prev_subnet, true);
                old.extend(masq_rules(prev_net, prev_subnet, false));
                self.teardown(&old)?;
            }
        }
        let rules = masq_rules(cfg.network, cfg.subnet, random_fully);
        self.clear_chain(Table::Nat, POSTRTG_CHAIN)?;
        self.bootstrap(&rules)?;
        Ok(rules)
    }

    /// flannel's `SetupAndEnsureForwardRules` for one family: `FLANNEL-FWD` created or
    /// flushed, then the forward rules installed. Returns the rules for [`ensure`](Iptables::ensure).
    pub fn setup_forward(&self, network: IpNet) -> Result<Vec<Rule>, MasqError> {
        self.check_family(&[network])?;
        let rules = forward_rules(network);
        self.clear_chain(Table::Filter, FWD_CHAIN)?;
        self.bootstrap(&rules)?;
        Ok(rules)
    }
}

/// [`Iptables::ensure`] on the blocking pool, for the daemon's resync timer.
pub async fn ensure_async(ipt: Arc<Iptables>, rules: Arc<Vec<Rule>>) -> Result<bool, MasqError> {
    tokio::task::spawn_blocking(move || ipt.ensure(&rules))
        .await
        .map_err(|_| MasqError::Task)?
}

fn chain_exists(lines: &[String], chain: &str) -> bool {
    let n = format!("-N {chain}");
    let p = format!("-P {chain} ");
    lines.iter().any(|l| *l == n || l.starts_with(&p))
}

/// Rules grouped by table, tables in first-appearance order, rule order kept, duplicates
/// dropped (each restore line must act once per rule).
fn by_table(rules: &[Rule]) -> Vec<(Table, Vec<&Rule>)> {
    let mut out: Vec<(Table, Vec<&Rule>)> = Vec::new();
    for r in rules {
        match out.iter_mut().find(|(t, _)| *t == r.table) {
            Some((_, v)) => {
                if !v.contains(&r) {
                    v.push(r)
                }
            }
            None => out.push((r.table, vec![r])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::exec::Invocation;
    use std::sync::Mutex;

    /// A fake iptables: keeps `-S` output per table and records restore payloads.
    #[derive(Debug, Default)]
    struct Fake {
        version: String,
        tables: Mutex<BTreeMap<String, Vec<String>>>,
        restores: Mutex<Vec<String>>,
        commands: Mutex<Vec<String>>,
    }

    impl Runner for Fake {
        fn invoke(&self, cmd: &Invocation<'_>) -> Result<String, MasqError> {
            let Invocation {
                program,
                args,
                stdin,
            } = *cmd;
            self.commands
                .lock()
                .unwrap()
                .push(format!("{program} {}", args.join(" ")));
            if args.first().map(String::as_str) == Some("--version") {
                return Ok(self.version.clone());
            }
            let mut tables = self.tables.lock().unwrap();
            if program.ends_with("-restore") {
                let payload = stdin.unwrap_or_default().to_owned();
                let mut table = String::new();
                for line in payload.lines() {
                    if let Some(t) = line.strip_prefix('*') {
                        table = t.to_owned();
                    } else if let Some(rest) = line.strip_prefix("-A ") {
                        tables
                            .entry(table.clone())
                            .or_default()
                            .push(format!("-A {rest}"));
                    } else if let Some(rest) = line.strip_prefix("-D ") {
                        let v = tables.entry(table.clone()).or_default();
                        let want = format!("-A {rest}");
                        let i =
                            v.iter()
                                .position(|l| *l == want)
                                .ok_or_else(|| MasqError::Failed {
                                    cmd: "restore".into(),
                                    status: "1".into(),
                                    stderr: format!("no such rule {rest}"),
                                })?;
                        v.remove(i);
                    }
                }
                self.restores.lock().unwrap().push(payload);
                return Ok(String::new());
            }
            let args: Vec<&str> = args
                .iter()
                .map(String::as_str)
                .filter(|a| *a != "-w")
                .collect();
            let table = args.get(1).copied().unwrap_or("filter").to_owned();
            let lines = tables.entry(table).or_default();
            match args.get(2).copied() {
                Some("-S") => Ok(lines.join("\n")),
                Some("-N") => {
                    lines.push(format!("-N {}", args[3]));
                    Ok(String::new())
                }
                Some("-F") => {
                    let prefix = format!("-A {} ", args[3]);
                    lines.retain(|l| !l.starts_with(&prefix));
                    Ok(String::new())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn fake(version: &str) -> (Arc<Fake>, Iptables) {
        let f = Arc::new(Fake {
            version: version.into(),
            ..Default::default()
        });
        f.tables.lock().unwrap().insert(
            "nat".into(),
            vec![
                "-P POSTROUTING ACCEPT".into(),
                "-A POSTROUTING -j KUBE-POSTROUTING".into(),
            ],
        );
        let ipt = Iptables::detect_with(IpFamily::V4, f.clone()).unwrap();
        (f, ipt)
    }

    fn cfg() -> MasqConfig {
        MasqConfig {
            network: "10.42.0.0/16".parse().unwrap(),
            subnet: "10.42.1.0/24".parse().unwrap(),
            random_fully: None,
        }
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)"),
            Some((1, 8, 9))
        );
        assert_eq!(parse_version("nothing"), None);
        let (_, old) = fake("iptables v1.6.1");
        assert!(!old.supports_random_fully());
        let (_, new) = fake("iptables v1.8.9 (legacy)");
        assert!(new.supports_random_fully());
    }

    #[test]
    fn setup_installs_in_order_and_is_idempotent() {
        let (f, ipt) = fake("iptables v1.8.9 (nf_tables)");
        let rules = ipt.setup_masq(&cfg(), None).unwrap();
        assert!(ipt.rules_present(&rules).unwrap());
        assert!(!ipt.ensure(&rules).unwrap());
        // Second setup: chain flushed, jump deleted and appended again: no duplicates.
        ipt.setup_masq(&cfg(), None).unwrap();
        let nat = f.tables.lock().unwrap().get("nat").cloned().unwrap();
        let jumps = nat
            .iter()
            .filter(|l| l.contains("-j FLANNEL-POSTRTG"))
            .count();
        assert_eq!(jumps, 1, "{nat:?}");
        let chain: Vec<&String> = nat
            .iter()
            .filter(|l| l.starts_with("-A FLANNEL-POSTRTG"))
            .collect();
        assert_eq!(chain.len(), 6);
        assert!(chain[4].ends_with("--random-fully"));
        let last = f.restores.lock().unwrap().last().cloned().unwrap();
        assert!(last.starts_with("*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n-A POSTROUTING"));
        assert!(f
            .commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| c == "iptables-restore --noflush --wait"));
    }

    #[test]
    fn resync_recreates_missing_rule() {
        let (f, ipt) = fake("iptables v1.8.9 (nf_tables)");
        let rules = ipt.setup_forward("10.42.0.0/16".parse().unwrap()).unwrap();
        f.tables
            .lock()
            .unwrap()
            .get_mut("filter")
            .unwrap()
            .retain(|l| !l.starts_with("-A FLANNEL-FWD -s"));
        assert!(!ipt.rules_present(&rules).unwrap());
        assert!(ipt.ensure(&rules).unwrap());
        let filter = f.tables.lock().unwrap().get("filter").cloned().unwrap();
        let ours: Vec<&String> = filter
            .iter()
            .filter(|l| l.contains("flanneld forward"))
            .collect();
        assert_eq!(ours.len(), 3);
        assert!(
            ours[1].starts_with("-A FLANNEL-FWD -s"),
            "order kept: {ours:?}"
        );
    }

    #[test]
    fn previous_lease_rules_removed() {
        let (f, ipt) = fake("iptables v1.8.9 (nf_tables)");
        let old = MasqConfig {
            subnet: "10.42.9.0/24".parse().unwrap(),
            ..cfg()
        };
        ipt.setup_masq(&old, None).unwrap();
        ipt.setup_masq(&cfg(), Some((old.network, old.subnet)))
            .unwrap();
        let nat = f.tables.lock().unwrap().get("nat").cloned().unwrap();
        assert!(!nat.iter().any(|l| l.contains("10.42.9.0/24")), "{nat:?}");
        assert!(nat.iter().any(|l| l.contains("10.42.1.0/24")));
    }

    #[test]
    fn chosen_backend_binaries_are_run() {
        use crate::masq::backend_choice::IptablesBackend;
        let f = Arc::new(Fake {
            version: "iptables v1.8.9 (legacy)".into(),
            ..Default::default()
        });
        let legacy = Binaries::Variant(IptablesBackend::Legacy);
        let ipt = Iptables::detect_binaries(IpFamily::V4, f.clone(), legacy).unwrap();
        assert_eq!(ipt.program(), "iptables-legacy");
        ipt.setup_forward("10.42.0.0/16".parse().unwrap()).unwrap();
        let cmds = f.commands.lock().unwrap().clone();
        assert!(
            cmds.iter().all(|c| c.starts_with("iptables-legacy")),
            "{cmds:?}"
        );
        assert!(cmds
            .iter()
            .any(|c| c.starts_with("iptables-legacy-restore ")));
    }

    #[test]
    fn random_fully_disabled() {
        let (f, ipt) = fake("iptables v1.8.9 (nf_tables)");
        let rules = ipt
            .setup_masq(
                &MasqConfig {
                    random_fully: Some(false),
                    ..cfg()
                },
                None,
            )
            .unwrap();
        assert!(rules.iter().all(|r| !r.render().contains("random-fully")));
        let nat = f.tables.lock().unwrap().get("nat").cloned().unwrap();
        assert!(nat.iter().any(|l| l.ends_with("-j MASQUERADE")));
    }

    #[test]
    fn wrong_family_rejected() {
        let (_, ipt) = fake("iptables v1.8.9");
        let bad = MasqConfig {
            network: "fd42::/48".parse().unwrap(),
            subnet: "fd42:0:0:1::/64".parse().unwrap(),
            random_fully: None,
        };
        assert!(matches!(
            ipt.setup_masq(&bad, None),
            Err(MasqError::Config(_))
        ));
    }
}
