//! flannel's firewall rules (compat §9.1): masquerading in `nat`/`FLANNEL-POSTRTG` and
//! forward accepts in `filter`/`FLANNEL-FWD`, rendered exactly as `iptables -S` prints them.
//!
//! The rule lists and the `iptables-restore --noflush` payloads are pure functions
//! ([`masq_rules`], [`forward_rules`], [`render_restore`]); [`Iptables`] applies them with
//! the `iptables`/`ip6tables` binaries, checks them for the periodic resync and removes the
//! rules of a previous lease. [`Nft`] is the nftables mode (`EnableNFTables`, module `nft`).
//!
//! Daemon use, per enabled family (the iptables binaries are run synchronously, so call
//! these from `tokio::task::spawn_blocking`, or use [`ensure_async`]):
//!
//! ```ignore
//! let ipt = Arc::new(Iptables::detect(IpFamily::V4)?);
//! let mut rules = Vec::new();
//! if ip_masq {
//!     rules.extend(ipt.setup_masq(&MasqConfig { network, subnet, random_fully }, prev)?);
//! }
//! if iptables_forward_rules {
//!     rules.extend(ipt.setup_forward(network)?);
//! }
//! let rules = Arc::new(rules);
//! let mut tick = tokio::time::interval(Duration::from_secs(iptables_resync));
//! loop {
//!     tick.tick().await;
//!     if let Err(e) = masq::ensure_async(ipt.clone(), rules.clone()).await { warn!("{e}") }
//! }
//! ```

pub mod backend_choice;
mod exec;
mod guard;
mod iptables;
mod nft;

use std::fmt;

use ipnet::IpNet;

pub use guard::{
    guard_in_place, guard_jumps, guard_restore, guard_rules, VxlanGuard, GUARD_COMMENT,
    VXLAN_FWD_CHAIN, VXLAN_IN_CHAIN,
};
pub use iptables::{ensure_async, Iptables, MasqError, Runner, SystemRunner};
pub use nft::{
    flannel_table_script, guard_table_script, iptables_cleanup_payload, nft_family, nft_table,
    random_fully_probe_script, GuardApplier, Nft, NftRules, NFT_FORWARD_CHAIN, NFT_GUARD_TABLE,
    NFT_POSTRTG_CHAIN, NFT_V4_TABLE, NFT_V6_TABLE,
};

use crate::netlink::IpFamily;

/// The chain of the masquerade rules, in table `nat`.
pub const POSTRTG_CHAIN: &str = "FLANNEL-POSTRTG";
/// The chain of the forward rules, in table `filter`.
pub const FWD_CHAIN: &str = "FLANNEL-FWD";
/// Comment of every masquerade rule.
pub const MASQ_COMMENT: &str = "flanneld masq";
/// Comment of every forward rule.
pub const FWD_COMMENT: &str = "flanneld forward";
/// kube-proxy's masquerade mark; flannel leaves such packets to kube-proxy (v0.20.2).
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// An iptables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `nat`.
    Nat,
    /// `filter`.
    Filter,
}

impl Table {
    /// The table name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rule: table, chain and rule specification (the words after `-A <chain>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Table.
    pub table: Table,
    /// Chain the rule is appended to.
    pub chain: String,
    /// Rule specification words, unquoted.
    pub spec: Vec<String>,
}

impl Rule {
    fn new(table: Table, chain: &str, spec: &[&str]) -> Self {
        Rule {
            table,
            chain: chain.to_owned(),
            spec: spec.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// `-A <chain> <spec>` exactly as `iptables -S` prints it.
    pub fn render(&self) -> String {
        self.render_with("-A")
    }

    /// `<action> <chain> <spec>` with iptables' quoting.
    pub fn render_with(&self, action: &str) -> String {
        let mut out = format!("{action} {}", self.chain);
        for word in &self.spec {
            out.push(' ');
            out.push_str(&quote(word));
        }
        out
    }

    /// The `-j` target, if any.
    pub fn target(&self) -> Option<&str> {
        self.spec
            .iter()
            .position(|w| w == "-j")
            .and_then(|i| self.spec.get(i + 1))
            .map(String::as_str)
    }

    /// The flannel chain this rule needs: the one it is in or jumps to.
    pub fn flannel_chain(&self) -> Option<&'static str> {
        [POSTRTG_CHAIN, FWD_CHAIN]
            .into_iter()
            .find(|c| self.chain == *c || self.target() == Some(*c))
    }

    /// The words to pass to `iptables -t <table> -C/-A/-D <chain>`.
    pub fn args(&self) -> Vec<String> {
        let mut v = vec![self.chain.clone()];
        v.extend(self.spec.iter().cloned());
        v
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-t {} {}", self.table, self.render())
    }
}

/// iptables' `xtables_save_string` quoting: bare when only `[A-Za-z0-9_-]`, otherwise in
/// double quotes with `"`, `\` and `'` escaped. Applied to every word so that the payload
/// and `iptables -S` agree.
fn quote(word: &str) -> String {
    let bare = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || is_spec_char(b));
    if bare {
        return word.to_owned();
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Characters of addresses, marks and options that iptables prints unquoted.
fn is_spec_char(b: u8) -> bool {
    matches!(b, b'.' | b'/' | b':' | b'!')
}

/// Whether to add `--random-fully` to MASQUERADE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasqConfig {
    /// Network (`FLANNEL_NETWORK` of this family).
    pub network: IpNet,
    /// Our lease subnet (`FLANNEL_SUBNET` network form).
    pub subnet: IpNet,
    /// `--random-fully`: `None` = when iptables supports it (flannel's default),
    /// `Some(false)` = never (`--ip-masq-fully-random-disable`), `Some(true)` = when supported.
    pub random_fully: Option<bool>,
}

fn multicast(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "224.0.0.0/4",
        IpFamily::V6 => "ff00::/8",
    }
}

/// A rule as flannel writes them: `matches`, `-m comment --comment <comment>`, `-j <jump…>`.
fn commented(table: Table, chain: &str, matches: &[&str], comment: &str, jump: &[&str]) -> Rule {
    let mut spec = matches.to_vec();
    spec.extend(["-m", "comment", "--comment", comment, "-j"]);
    spec.extend_from_slice(jump);
    Rule::new(table, chain, &spec)
}

/// flannel's masquerade rules (`masqRules` / `masqIP6Rules`), in order.
pub fn masq_rules(network: IpNet, subnet: IpNet, random_fully: bool) -> Vec<Rule> {
    let n = network.trunc().to_string();
    let p = subnet.trunc().to_string();
    let mc = multicast(IpFamily::of_net(network));
    let masq: &[&str] = if random_fully {
        &["MASQUERADE", "--random-fully"]
    } else {
        &["MASQUERADE"]
    };
    let rule = |matches: &[&str], jump: &[&str]| {
        commented(Table::Nat, POSTRTG_CHAIN, matches, MASQ_COMMENT, jump)
    };
    vec![
        commented(
            Table::Nat,
            "POSTROUTING",
            &[],
            MASQ_COMMENT,
            &[POSTRTG_CHAIN],
        ),
        rule(&["-m", "mark", "--mark", KUBE_PROXY_MARK], &["RETURN"]),
        rule(&["-s", &p, "-d", &n], &["RETURN"]),
        rule(&["-s", &n, "-d", &p], &["RETURN"]),
        rule(&["!", "-s", &n, "-d", &p], &["RETURN"]),
        rule(&["-s", &n, "!", "-d", mc], masq),
        rule(&["!", "-s", &n, "-d", &n], masq),
    ]
}

/// flannel's forward rules (`forwardRules`), in order.
pub fn forward_rules(network: IpNet) -> Vec<Rule> {
    let n = network.trunc().to_string();
    let rule = |matches: &[&str], jump: &[&str]| {
        commented(Table::Filter, FWD_CHAIN, matches, FWD_COMMENT, jump)
    };
    vec![
        commented(Table::Filter, "FORWARD", &[], FWD_COMMENT, &[FWD_CHAIN]),
        rule(&["-s", &n], &["ACCEPT"]),
        rule(&["-d", &n], &["ACCEPT"]),
    ]
}

/// A line of an `iptables-restore` transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOp<'a> {
    /// `-A <rule>`.
    Append(&'a Rule),
    /// `-D <rule>`.
    Delete(&'a Rule),
}

/// The `iptables-restore --noflush` payload for one table: `*<table>`, the lines, `COMMIT`.
pub fn render_restore(table: Table, ops: &[RestoreOp<'_>]) -> String {
    let mut out = format!("*{table}\n");
    for op in ops {
        let line = match op {
            RestoreOp::Append(r) => r.render_with("-A"),
            RestoreOp::Delete(r) => r.render_with("-D"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// compat §9.1 / flannel e2e/rules.go, N = 10.42.0.0/16, P = 10.42.1.0/24.
    const GOLDEN_NAT: &str = r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.1.0/24 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#;

    const GOLDEN_FILTER: &str = r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#;

    fn render_all(rules: &[Rule]) -> String {
        rules
            .iter()
            .map(Rule::render)
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn masq_golden_v4() {
        let rules = masq_rules(
            "10.42.0.0/16".parse().unwrap(),
            "10.42.1.0/24".parse().unwrap(),
            true,
        );
        assert_eq!(render_all(&rules), GOLDEN_NAT);
        assert!(rules.iter().all(|r| r.table == Table::Nat));
    }

    #[test]
    fn masq_without_random_fully() {
        let rules = masq_rules(
            "10.42.0.0/16".parse().unwrap(),
            "10.42.1.0/24".parse().unwrap(),
            false,
        );
        assert_eq!(
            render_all(&rules),
            GOLDEN_NAT.replace(" --random-fully", "")
        );
    }

    #[test]
    fn masq_golden_v6() {
        let rules = masq_rules(
            "fd42:10:244::/56".parse().unwrap(),
            "fd42:10:244:1::/64".parse().unwrap(),
            true,
        );
        let want = GOLDEN_NAT
            .replace("10.42.0.0/16", "fd42:10:244::/56")
            .replace("10.42.1.0/24", "fd42:10:244:1::/64")
            .replace("224.0.0.0/4", "ff00::/8");
        assert_eq!(render_all(&rules), want);
    }

    #[test]
    fn forward_golden() {
        assert_eq!(
            render_all(&forward_rules("10.42.0.0/16".parse().unwrap())),
            GOLDEN_FILTER
        );
    }

    #[test]
    fn networks_rendered_in_network_form() {
        let rules = forward_rules("10.42.7.9/16".parse().unwrap());
        assert!(rules[1].render().contains("-s 10.42.0.0/16 "));
    }

    #[test]
    fn restore_payload() {
        let rules = forward_rules("10.42.0.0/16".parse().unwrap());
        let payload = render_restore(
            Table::Filter,
            &[
                RestoreOp::Delete(&rules[0]),
                RestoreOp::Append(&rules[0]),
                RestoreOp::Append(&rules[1]),
            ],
        );
        assert_eq!(
            payload,
            "*filter\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn quoting_like_iptables() {
        assert_eq!(quote("flanneld masq"), "\"flanneld masq\"");
        assert_eq!(quote("RETURN"), "RETURN");
        assert_eq!(quote("0x4000/0x4000"), "0x4000/0x4000");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
        assert_eq!(quote("fd42::/8"), "fd42::/8");
    }

    #[test]
    fn chains_and_targets() {
        let rules = masq_rules(
            "10.42.0.0/16".parse().unwrap(),
            "10.42.1.0/24".parse().unwrap(),
            true,
        );
        assert_eq!(rules[0].target(), Some(POSTRTG_CHAIN));
        assert!(rules
            .iter()
            .all(|r| r.flannel_chain() == Some(POSTRTG_CHAIN)));
        assert_eq!(rules[0].args()[0], "POSTROUTING");
    }
}
