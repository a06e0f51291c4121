//! flannel's nftables mode (`EnableNFTables: true`, compat §9.3): the tables upstream's
//! `pkg/trafficmngr/nftables` creates through knftables, applied with the `nft` binary.
//!
//! * `table ip flannel-ipv4` (and `table ip6 flannel-ipv6`, created empty as upstream's
//!   `Init` does for both families) with chain `postrtg` (nat/postrouting/srcnat, flannel's
//!   masquerade rules) and chain `forward` (filter/forward/filter, the two accepts).
//! * `table ip flannel-rs-guard` (ours, not upstream's): the VXLAN guard of [`super::guard`]
//!   in nft form, the kernel-mode allow-list as the set `peers`.
//!
//! Every table is written whole in one `nft -f -` transaction (`table X` + `delete table X` +
//! its definition), so a reader never sees it half-written and rules of a previous subnet or
//! a previous peer set cannot survive. Upstream flushes only the chains it writes; the result
//! is the same listing. Rendering is pure ([`flannel_table_script`], [`guard_table_script`]);
//! [`Nft`] runs `nft` through a [`Runner`] and keeps, per table, the listing its last write
//! produced so the periodic check ([`Nft::ensure_table`]) repairs any change made by hand
//! without depending on how a given `nft` version prints rules.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use super::exec::{MasqError, Runner, SystemRunner};
use super::guard::VxlanGuard;
use super::iptables::Iptables;
use super::{Table, FWD_CHAIN, POSTRTG_CHAIN};
use crate::netlink::IpFamily;

/// flannel's IPv4 table (family `ip`).
pub const NFT_V4_TABLE: &str = "flannel-ipv4";
/// flannel's IPv6 table (family `ip6`).
pub const NFT_V6_TABLE: &str = "flannel-ipv6";
/// flannel's masquerade chain.
pub const NFT_POSTRTG_CHAIN: &str = "postrtg";
/// flannel's forward chain.
pub const NFT_FORWARD_CHAIN: &str = "forward";
/// Our VXLAN guard table (family `ip`).
pub const NFT_GUARD_TABLE: &str = "flannel-rs-guard";
/// Priority of the guard's base chains: before iptables' and flannel's filter chains (a drop
/// anywhere is final in nftables, so this only orders the work).
const GUARD_PRIORITY: &str = "filter - 10";

/// The nft family keyword of flannel's table for `family`.
pub fn nft_family(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// flannel's table name for `family`.
pub fn nft_table(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => NFT_V4_TABLE,
        IpFamily::V6 => NFT_V6_TABLE,
    }
}

/// What flannel's table of one family holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftRules {
    /// The family of the table.
    pub family: IpFamily,
    /// `--ip-masq`: `(Network, own subnet, fully-random)`.
    pub masq: Option<(IpNet, IpNet, bool)>,
    /// `--iptables-forward-rules`: Network.
    pub forward: Option<IpNet>,
}

/// The `nft -f` script that replaces flannel's table of `r.family` by exactly the table
/// upstream's `Init`, `SetupAndEnsureMasqRules` and `SetupAndEnsureForwardRules` build
/// (same table comment, chains, chain comments, hooks, priorities and rules, in that order).
pub fn flannel_table_script(r: &NftRules) -> String {
    let fam = nft_family(r.family);
    let name = nft_table(r.family);
    let mut body = format!("\tcomment \"rules for {name}\"\n");
    if let Some((network, subnet, random_fully)) = r.masq {
        let n = network.trunc();
        let p = subnet.trunc();
        let mc = match r.family {
            IpFamily::V4 => "224.0.0.0/4",
            IpFamily::V6 => "ff00::/8",
        };
        let masq = if random_fully {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        let _ = write!(
            body,
            "\tchain {NFT_POSTRTG_CHAIN} {{\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark 0x4000 return\n\
             \t\t{fam} saddr {p} {fam} daddr {n} return\n\
             \t\t{fam} saddr {n} {fam} daddr {p} return\n\
             \t\t{fam} saddr != {p} {fam} daddr {n} return\n\
             \t\t{fam} saddr {n} {fam} daddr != {mc} {masq}\n\
             \t\t{fam} saddr != {n} {fam} daddr {n} {masq}\n\
             \t}}\n"
        );
    }
    if let Some(network) = r.forward {
        let n = network.trunc();
        let _ = write!(
            body,
            "\tchain {NFT_FORWARD_CHAIN} {{\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\t{fam} saddr {n} accept\n\
             \t\t{fam} daddr {n} accept\n\
             \t}}\n"
        );
    }
    replace_table(fam, name, &body)
}

/// `table F T` (so the delete cannot fail), `delete table F T`, then the new definition: one
/// transaction.
fn replace_table(fam: &str, name: &str, body: &str) -> String {
    format!("table {fam} {name}\ndelete table {fam} {name}\ntable {fam} {name} {{\n{body}}}\n")
}

/// upstream's `checkRandomfully` as a script for `nft --check`: a masquerade rule with
/// `fully-random` in a throw-away chain (nothing is created).
pub fn random_fully_probe_script() -> String {
    format!(
        "table ip {NFT_V4_TABLE} {{\n\
         \tchain masqueradeTest {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr != 127.0.0.1 masquerade fully-random\n\
         \t}}\n}}\n"
    )
}

/// The `nft -f` script replacing our guard table by `g` (IPv4 Network only; an IPv6
/// Network gets the same table in family `ip6`):
///
/// * chain `input` (hook input): UDP to the VXLAN port from Network is dropped; with the
///   allow-list (kernel mode) so is UDP to that port from any address not in set `peers`.
/// * chain `forward` (hook forward): UDP to the VXLAN port from Network is dropped.
///
/// Anything not dropped goes on to the host's other chains, as `RETURN` does in the
/// iptables form.
pub fn guard_table_script(g: &VxlanGuard) -> String {
    let (fam, addr_type) = match g.network {
        IpNet::V4(_) => ("ip", "ipv4_addr"),
        IpNet::V6(_) => ("ip6", "ipv6_addr"),
    };
    let n = g.network.trunc();
    let port = g.port;
    let mut peers: Vec<IpAddr> = g
        .peers
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == matches!(g.network, IpNet::V4(_)))
        .collect();
    peers.sort();
    peers.dedup();
    let mut body = String::from("\tcomment \"flannel-rs VXLAN guard\"\n");
    if g.allow_list {
        let _ = writeln!(body, "\tset peers {{\n\t\ttype {addr_type}");
        if !peers.is_empty() {
            let list: Vec<String> = peers.iter().map(IpAddr::to_string).collect();
            let _ = writeln!(body, "\t\telements = {{ {} }}", list.join(", "));
        }
        body.push_str("\t}\n");
    }
    let _ = writeln!(
        body,
        "\tchain input {{\n\
         \t\ttype filter hook input priority {GUARD_PRIORITY}; policy accept;\n\
         \t\tudp dport {port} {fam} saddr {n} drop"
    );
    if g.allow_list {
        let _ = writeln!(body, "\t\tudp dport {port} {fam} saddr != @peers drop");
    }
    let _ = writeln!(
        body,
        "\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority {GUARD_PRIORITY}; policy accept;\n\
         \t\tudp dport {port} {fam} saddr {n} drop\n\
         \t}}"
    );
    replace_table(fam, NFT_GUARD_TABLE, &body)
}

/// The `nft` binary.
#[derive(Debug)]
pub struct Nft {
    runner: Arc<dyn Runner>,
    /// Per `"<family> <table>"`: the script last written and the listing it produced.
    written: Mutex<HashMap<String, (String, String)>>,
}

impl Nft {
    /// `nft` from `PATH`; fails when it is not installed (or cannot talk to the kernel).
    pub fn detect() -> Result<Self, MasqError> {
        Self::with_runner(Arc::new(SystemRunner))
    }

    /// `nft` run through `runner`.
    pub fn with_runner(runner: Arc<dyn Runner>) -> Result<Self, MasqError> {
        runner.run("nft", &["--version".to_owned()], None)?;
        Ok(Nft {
            runner,
            written: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `script` as one transaction (`nft -f -`).
    pub fn apply(&self, script: &str) -> Result<(), MasqError> {
        tracing::debug!(script, "nft -f -");
        self.runner
            .run("nft", &["-f".to_owned(), "-".to_owned()], Some(script))
            .map(drop)
    }

    /// Whether the kernel would accept `script` (`nft --check -f -`; nothing is changed).
    pub fn check(&self, script: &str) -> bool {
        self.runner
            .run(
                "nft",
                &["--check".to_owned(), "-f".to_owned(), "-".to_owned()],
                Some(script),
            )
            .is_ok()
    }

    /// upstream's `checkRandomfully`: whether `masquerade fully-random` is supported.
    pub fn supports_random_fully(&self) -> bool {
        let ok = self.check(&random_fully_probe_script());
        if !ok {
            tracing::warn!("nftables: random fully unsupported");
        }
        ok
    }

    /// `nft list table <family> <name>`; `None` when the table does not exist.
    pub fn list_table(&self, family: &str, name: &str) -> Result<Option<String>, MasqError> {
        if !self.table_exists(family, name)? {
            return Ok(None);
        }
        let args = ["list", "table", family, name].map(str::to_owned);
        self.runner.run("nft", &args, None).map(Some)
    }

    fn table_exists(&self, family: &str, name: &str) -> Result<bool, MasqError> {
        let out = self
            .runner
            .run("nft", &["list".into(), "tables".into()], None)?;
        let want = format!("table {family} {name}");
        Ok(out.lines().any(|l| l.trim() == want))
    }

    /// Deletes table `<family> <name>` if it exists; returns whether it did.
    pub fn delete_table(&self, family: &str, name: &str) -> Result<bool, MasqError> {
        if !self.table_exists(family, name)? {
            return Ok(false);
        }
        self.apply(&format!("delete table {family} {name}\n"))?;
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("{family} {name}"));
        Ok(true)
    }

    /// Makes table `<family> <name>` what `script` (a whole-table replacement) writes: a no-op
    /// when the table still lists exactly as right after this script was last applied,
    /// otherwise the script is applied. Returns whether it was applied.
    pub fn ensure_table(&self, family: &str, name: &str, script: &str) -> Result<bool, MasqError> {
        let key = format!("{family} {name}");
        let current = self.list_table(family, name)?;
        {
            let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some((s, listing)), Some(cur)) = (written.get(&key), current.as_ref()) {
                if s == script && listing == cur {
                    return Ok(false);
                }
            }
        }
        self.apply(script)?;
        let listing = self.list_table(family, name)?.unwrap_or_default();
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (script.to_owned(), listing));
        Ok(true)
    }

    /// Brings our guard table to `g` (see [`guard_table_script`]); returns whether anything
    /// had to be written.
    pub fn sync_vxlan_guard(&self, g: &VxlanGuard) -> Result<bool, MasqError> {
        let fam = match g.network {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        self.ensure_table(fam, NFT_GUARD_TABLE, &guard_table_script(g))
    }

    /// Clean-up when starting in iptables mode (upstream's `NFTablesManager.CleanUp`): deletes
    /// flannel's two tables, and our guard tables. Returns the tables deleted.
    pub fn cleanup(&self) -> Result<Vec<String>, MasqError> {
        let mut gone = Vec::new();
        for (fam, name) in [
            ("ip", NFT_V4_TABLE),
            ("ip6", NFT_V6_TABLE),
            ("ip", NFT_GUARD_TABLE),
            ("ip6", NFT_GUARD_TABLE),
        ] {
            if self.delete_table(fam, name)? {
                gone.push(format!("{fam} {name}"));
            }
        }
        Ok(gone)
    }
}

/// What writes the VXLAN guard: chains in iptables mode, our table in nftables mode.
#[derive(Debug, Clone)]
pub enum GuardApplier {
    /// `FLANNEL-VXLAN-IN` / `FLANNEL-VXLAN-FWD` in table filter.
    Iptables(Arc<Iptables>),
    /// Table `flannel-rs-guard`.
    Nft(Arc<Nft>),
}

impl GuardApplier {
    /// Brings the guard to `g`; returns whether anything had to change.
    pub fn sync_vxlan_guard(&self, g: &VxlanGuard) -> Result<bool, MasqError> {
        match self {
            GuardApplier::Iptables(i) => i.sync_vxlan_guard(g),
            GuardApplier::Nft(n) => n.sync_vxlan_guard(g),
        }
    }
}

/// The flannel-rs chains of iptables mode: flannel's and our guard's.
const IPTABLES_CHAINS: [(Table, &str); 4] = [
    (Table::Nat, POSTRTG_CHAIN),
    (Table::Filter, FWD_CHAIN),
    (Table::Filter, super::VXLAN_IN_CHAIN),
    (Table::Filter, super::VXLAN_FWD_CHAIN),
];

/// The `iptables-restore --noflush` payload removing, from `table` (listed as `lines`, the
/// output of `iptables -S`), every jump to one of `chains` and then the chains themselves;
/// `None` when none of them exists and nothing jumps to them.
pub fn iptables_cleanup_payload(table: Table, chains: &[&str], lines: &[String]) -> Option<String> {
    let mut out = format!("*{table}\n");
    let mut any = false;
    for line in lines {
        let mut words = line.split(' ');
        if words.next() != Some("-A") {
            continue;
        }
        let from = words.next().unwrap_or_default();
        let jumps = chains.iter().any(|c| line.ends_with(&format!("-j {c}")));
        if jumps && !chains.contains(&from) {
            out.push_str(&line.replacen("-A ", "-D ", 1));
            out.push('\n');
            any = true;
        }
    }
    for chain in chains {
        if lines.iter().any(|l| *l == format!("-N {chain}")) {
            let _ = write!(out, "-F {chain}\n-X {chain}\n");
            any = true;
        }
    }
    out.push_str("COMMIT\n");
    any.then_some(out)
}

impl Iptables {
    /// Clean-up when starting in nftables mode (upstream's `IPTablesManager.CleanUp`): removes
    /// flannel's `FLANNEL-POSTRTG` (nat) and `FLANNEL-FWD` (filter) and our guard chains, with
    /// the jumps to them, one transaction per table. Returns whether anything was removed.
    pub fn cleanup_flannel_chains(&self) -> Result<bool, MasqError> {
        let mut removed = false;
        for table in [Table::Nat, Table::Filter] {
            let chains: Vec<&str> = IPTABLES_CHAINS
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, c)| *c)
                .collect();
            let lines = self.list(table)?;
            if let Some(payload) = iptables_cleanup_payload(table, &chains, &lines) {
                self.restore(&payload)?;
                removed = true;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> NftRules {
        NftRules {
            family: IpFamily::V4,
            masq: Some((
                "10.42.0.0/16".parse().unwrap(),
                "10.42.1.0/24".parse().unwrap(),
                true,
            )),
            forward: Some("10.42.0.0/16".parse().unwrap()),
        }
    }

    #[test]
    fn flannel_table_script_follows_upstream() {
        let s = flannel_table_script(&rules());
        assert!(s.starts_with(
            "table ip flannel-ipv4\ndelete table ip flannel-ipv4\ntable ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n"
        ));
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        let post = lines.iter().position(|l| *l == "chain postrtg {").unwrap();
        assert_eq!(
            &lines[post + 1..post + 10],
            [
                "comment \"chain to manage traffic masquerading by flannel\"",
                "type nat hook postrouting priority srcnat; policy accept;",
                "meta mark 0x4000 return",
                "ip saddr 10.42.1.0/24 ip daddr 10.42.0.0/16 return",
                "ip saddr 10.42.0.0/16 ip daddr 10.42.1.0/24 return",
                "ip saddr != 10.42.1.0/24 ip daddr 10.42.0.0/16 return",
                "ip saddr 10.42.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
                "ip saddr != 10.42.0.0/16 ip daddr 10.42.0.0/16 masquerade fully-random",
                "}",
            ]
        );
        let fwd = lines.iter().position(|l| *l == "chain forward {").unwrap();
        assert!(fwd > post);
        assert_eq!(
            &lines[fwd + 1..fwd + 5],
            [
                "comment \"chain to accept flannel traffic\"",
                "type filter hook forward priority filter; policy accept;",
                "ip saddr 10.42.0.0/16 accept",
                "ip daddr 10.42.0.0/16 accept",
            ]
        );
    }

    #[test]
    fn v6_masq_without_random_fully_and_empty_table() {
        let v6 = NftRules {
            family: IpFamily::V6,
            masq: Some((
                "fd42:10:244::/56".parse().unwrap(),
                "fd42:10:244:1::/64".parse().unwrap(),
                false,
            )),
            forward: None,
        };
        let s = flannel_table_script(&v6);
        assert!(s.contains("\t\tip6 saddr fd42:10:244::/56 ip6 daddr != ff00::/8 masquerade\n"));
        assert!(!s.contains("fully-random"));
        assert!(!s.contains("chain forward"));
        let empty = NftRules {
            family: IpFamily::V6,
            masq: None,
            forward: None,
        };
        assert_eq!(
            flannel_table_script(&empty),
            "table ip6 flannel-ipv6\ndelete table ip6 flannel-ipv6\ntable ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n}\n"
        );
    }

    #[test]
    fn guard_script_allow_list_and_pods_only() {
        let g = VxlanGuard {
            port: 8472,
            network: "10.244.0.0/16".parse().unwrap(),
            peers: ["198.18.0.3", "198.18.0.2", "198.18.0.3", "2001:db8::1"]
                .iter()
                .map(|p| p.parse().unwrap())
                .collect(),
            allow_list: true,
        };
        let s = guard_table_script(&g);
        assert!(
            s.contains("\t\telements = { 198.18.0.2, 198.18.0.3 }\n"),
            "{s}"
        );
        assert!(s.contains("\t\tudp dport 8472 ip saddr 10.244.0.0/16 drop\n"));
        assert!(s.contains("\t\tudp dport 8472 ip saddr != @peers drop\n"));
        let none = guard_table_script(&VxlanGuard {
            peers: vec![],
            ..g.clone()
        });
        assert!(none.contains("\tset peers {\n\t\ttype ipv4_addr\n\t}\n"));
        let pods = guard_table_script(&VxlanGuard {
            allow_list: false,
            ..g
        });
        assert!(!pods.contains("@peers") && !pods.contains("set peers"));
        assert_eq!(pods.matches("ip saddr 10.244.0.0/16 drop").count(), 2);
    }

    #[test]
    fn iptables_cleanup_removes_jumps_then_chains() {
        let lines: Vec<String> = [
            "-P FORWARD ACCEPT",
            "-N FLANNEL-FWD",
            "-N FLANNEL-VXLAN-FWD",
            r#"-A FORWARD -p udp -m udp --dport 8472 -m comment --comment "flanneld vxlan guard" -j FLANNEL-VXLAN-FWD"#,
            r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#,
            "-A FORWARD -j ACCEPT",
            r#"-A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
        ]
        .map(str::to_owned)
        .to_vec();
        let chains = ["FLANNEL-FWD", "FLANNEL-VXLAN-IN", "FLANNEL-VXLAN-FWD"];
        let p = iptables_cleanup_payload(Table::Filter, &chains, &lines).unwrap();
        assert_eq!(
            p,
            "*filter\n\
             -D FORWARD -p udp -m udp --dport 8472 -m comment --comment \"flanneld vxlan guard\" -j FLANNEL-VXLAN-FWD\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -F FLANNEL-FWD\n-X FLANNEL-FWD\n-F FLANNEL-VXLAN-FWD\n-X FLANNEL-VXLAN-FWD\n\
             COMMIT\n"
        );
        let clean = ["-P FORWARD ACCEPT".to_owned()];
        assert_eq!(
            iptables_cleanup_payload(Table::Filter, &chains, &clean),
            None
        );
    }
}
