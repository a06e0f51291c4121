//! VXLAN guard rules (our addition to flannel's, in chains of their own; table `filter`):
//!
//! * `FLANNEL-VXLAN-IN` (jumped to from the top of `INPUT` for UDP to the VXLAN port): drops
//!   datagrams from an address in Network (a pod of this node, or one tunnelled to us), lets
//!   the public IPs of current leases on (`RETURN`: the rest of `INPUT` still decides) and
//!   drops everything else. The kernel's vxlan device accepts VXLAN from anyone; this is the
//!   allow-list Calico keeps in an ipset (`ipset` is not assumed installed; one rule per peer
//!   is cheap at flannel's cluster sizes). Kernel mode only: the userspace data plane checks
//!   the outer source of every datagram itself and counts drops per reason on `/metrics`,
//!   which an earlier iptables drop would hide from operators.
//! * `FLANNEL-VXLAN-FWD` (jumped to from the top of `FORWARD` likewise): drops UDP from Network
//!   to the VXLAN port, so a pod cannot send VXLAN that flannel's MASQUERADE would make look
//!   like its node's (a pod on this node can no longer use that UDP port towards anything).
//!
//! Rendering is pure ([`guard_rules`], [`guard_restore`]); [`Iptables::sync_vxlan_guard`]
//! rewrites both chains and fixes the jumps in one `iptables-restore --noflush` transaction
//! (declaring a chain there flushes it), so peers that left lose their rule atomically.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Iptables, MasqError, Rule, Table};

/// Chain of the input allow-list.
pub const VXLAN_IN_CHAIN: &str = "FLANNEL-VXLAN-IN";
/// Chain of the forward drop of pod-originated VXLAN.
pub const VXLAN_FWD_CHAIN: &str = "FLANNEL-VXLAN-FWD";
/// Comment of every guard rule.
pub const GUARD_COMMENT: &str = "flanneld vxlan guard";

/// What the guard rules are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanGuard {
    /// The VXLAN UDP port.
    pub port: u16,
    /// Network (pod addresses).
    pub network: IpNet,
    /// Public IPs of current peers (any order, duplicates allowed).
    pub peers: Vec<IpAddr>,
    /// Whether `FLANNEL-VXLAN-IN` holds the allow-list (kernel mode); without it only pod
    /// sources are dropped.
    pub allow_list: bool,
}

fn rule(chain: &str, words: &[&str]) -> Rule {
    Rule {
        table: Table::Filter,
        chain: chain.to_owned(),
        spec: words.iter().map(|w| (*w).to_owned()).collect(),
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// The jumps from `INPUT` and `FORWARD`, as `iptables -S` prints them.
pub fn guard_jumps(port: u16) -> [Rule; 2] {
    let p = port.to_string();
    let jump = |from: &str, to: &str| {
        rule(
            from,
            &[
                "-p",
                "udp",
                "-m",
                "udp",
                "--dport",
                &p,
                "-m",
                "comment",
                "--comment",
                GUARD_COMMENT,
                "-j",
                to,
            ],
        )
    };
    [
        jump("INPUT", VXLAN_IN_CHAIN),
        jump("FORWARD", VXLAN_FWD_CHAIN),
    ]
}

/// The rules inside both guard chains, in order, as `iptables -S` prints them.
pub fn guard_rules(g: &VxlanGuard) -> Vec<Rule> {
    let n = g.network.trunc().to_string();
    let c = GUARD_COMMENT;
    let mut peers: Vec<String> = g
        .peers
        .iter()
        .filter(|ip| {
            matches!(
                (ip, g.network),
                (IpAddr::V4(_), IpNet::V4(_)) | (IpAddr::V6(_), IpNet::V6(_))
            )
        })
        .map(|ip| host(*ip))
        .collect();
    peers.sort();
    peers.dedup();
    let mut v = vec![rule(
        VXLAN_IN_CHAIN,
        &["-s", &n, "-m", "comment", "--comment", c, "-j", "DROP"],
    )];
    if g.allow_list {
        for p in &peers {
            v.push(rule(
                VXLAN_IN_CHAIN,
                &["-s", p, "-m", "comment", "--comment", c, "-j", "RETURN"],
            ));
        }
        v.push(rule(
            VXLAN_IN_CHAIN,
            &["-m", "comment", "--comment", c, "-j", "DROP"],
        ));
    }
    v.push(rule(
        VXLAN_FWD_CHAIN,
        &["-s", &n, "-m", "comment", "--comment", c, "-j", "DROP"],
    ));
    v
}

/// Whether `line` (of `iptables -S`) jumps to a guard chain.
fn is_guard_jump(line: &str) -> bool {
    (line.starts_with("-A INPUT ") || line.starts_with("-A FORWARD "))
        && (line.ends_with(&format!("-j {VXLAN_IN_CHAIN}"))
            || line.ends_with(&format!("-j {VXLAN_FWD_CHAIN}")))
}

/// The one `iptables-restore --noflush` payload that brings the filter table (listed as
/// `current`, `iptables -S` lines) to the guard `g`: both chains declared (created or
/// flushed) and refilled; stale jumps (another port, duplicates) deleted; missing jumps
/// inserted first in their chain. `None` when everything is already in place.
pub fn guard_restore(g: &VxlanGuard, current: &[String]) -> Option<String> {
    let rules = guard_rules(g);
    let jumps = guard_jumps(g.port);
    if guard_in_place(g, current) {
        return None;
    }
    let mut out = String::from("*filter\n");
    for chain in [VXLAN_IN_CHAIN, VXLAN_FWD_CHAIN] {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for r in &rules {
        out.push_str(&r.render_with("-A"));
        out.push('\n');
    }
    for jump in &jumps {
        let want = jump.render();
        let copies: Vec<&String> = current
            .iter()
            .filter(|l| is_guard_jump(l) && l.split(' ').nth(1) == Some(&jump.chain))
            .collect();
        let keep = copies.len() == 1 && *copies[0] == want;
        if keep {
            continue;
        }
        for line in copies {
            // `-A CHAIN words…` → `-D CHAIN words…`, quoting kept as iptables printed it.
            out.push_str(&line.replacen("-A ", "-D ", 1));
            out.push('\n');
        }
        let insert = jump.render_with("-I");
        let head = format!("-I {}", jump.chain);
        out.push_str(&insert.replacen(&head, &format!("{head} 1"), 1));
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Whether the guard `g` is exactly in place in `current` (`iptables -S` of table filter):
/// each jump once, each chain holding exactly its rules in order.
pub fn guard_in_place(g: &VxlanGuard, current: &[String]) -> bool {
    let rules = guard_rules(g);
    for jump in guard_jumps(g.port) {
        let copies: Vec<&String> = current
            .iter()
            .filter(|l| is_guard_jump(l) && l.split(' ').nth(1) == Some(&jump.chain))
            .collect();
        if copies.len() != 1 || *copies[0] != jump.render() {
            return false;
        }
    }
    for chain in [VXLAN_IN_CHAIN, VXLAN_FWD_CHAIN] {
        let head = format!("-A {chain} ");
        let have: Vec<&str> = current
            .iter()
            .filter(|l| l.starts_with(&head))
            .map(String::as_str)
            .collect();
        let want: Vec<String> = rules
            .iter()
            .filter(|r| r.chain == chain)
            .map(Rule::render)
            .collect();
        if have != want {
            return false;
        }
    }
    true
}

impl Iptables {
    /// Brings the guard chains to `g` (see the module docs). Returns whether anything had to
    /// change.
    pub fn sync_vxlan_guard(&self, g: &VxlanGuard) -> Result<bool, MasqError> {
        let current = self.list(Table::Filter)?;
        match guard_restore(g, &current) {
            Some(payload) => {
                self.restore(&payload)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::exec::Invocation;

    fn guard(peers: &[&str]) -> VxlanGuard {
        VxlanGuard {
            port: 8472,
            network: "10.244.0.0/16".parse().expect("net"),
            peers: peers.iter().map(|p| p.parse().expect("ip")).collect(),
            allow_list: true,
        }
    }

    const JUMP_IN: &str = r#"-A INPUT -p udp -m udp --dport 8472 -m comment --comment "flanneld vxlan guard" -j FLANNEL-VXLAN-IN"#;
    const JUMP_FWD: &str = r#"-A FORWARD -p udp -m udp --dport 8472 -m comment --comment "flanneld vxlan guard" -j FLANNEL-VXLAN-FWD"#;

    #[test]
    fn rules_render_as_iptables_prints_them() {
        let g = guard(&["198.18.0.3", "198.18.0.2", "198.18.0.3", "2001:db8::1"]);
        let text: Vec<String> = guard_rules(&g).iter().map(Rule::render).collect();
        assert_eq!(
            text,
            [
                r#"-A FLANNEL-VXLAN-IN -s 10.244.0.0/16 -m comment --comment "flanneld vxlan guard" -j DROP"#,
                r#"-A FLANNEL-VXLAN-IN -s 198.18.0.2/32 -m comment --comment "flanneld vxlan guard" -j RETURN"#,
                r#"-A FLANNEL-VXLAN-IN -s 198.18.0.3/32 -m comment --comment "flanneld vxlan guard" -j RETURN"#,
                r#"-A FLANNEL-VXLAN-IN -m comment --comment "flanneld vxlan guard" -j DROP"#,
                r#"-A FLANNEL-VXLAN-FWD -s 10.244.0.0/16 -m comment --comment "flanneld vxlan guard" -j DROP"#,
            ]
        );
        let jumps: Vec<String> = guard_jumps(8472).iter().map(Rule::render).collect();
        assert_eq!(jumps, [JUMP_IN, JUMP_FWD]);
        // Userspace mode: pod sources only.
        let pods_only = VxlanGuard {
            allow_list: false,
            ..g
        };
        let text: Vec<String> = guard_rules(&pods_only).iter().map(Rule::render).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(text
            .iter()
            .all(|t| t.contains("-s 10.244.0.0/16") && t.ends_with("-j DROP")));
    }

    #[test]
    fn restore_creates_everything_then_nothing_more() {
        let g = guard(&["198.18.0.2"]);
        let empty = vec!["-P INPUT ACCEPT".to_owned()];
        let payload = guard_restore(&g, &empty).expect("payload");
        assert!(
            payload.starts_with("*filter\n:FLANNEL-VXLAN-IN - [0:0]\n:FLANNEL-VXLAN-FWD - [0:0]\n")
        );
        assert!(payload.contains(
            "\n-I INPUT 1 -p udp -m udp --dport 8472 -m comment --comment \"flanneld vxlan guard\" -j FLANNEL-VXLAN-IN\n"
        ));
        assert!(payload.contains("\n-I FORWARD 1 -p udp"));
        assert!(payload.ends_with("COMMIT\n"));
        // What iptables -S shows afterwards: nothing left to do.
        let mut after = empty.clone();
        after.push(JUMP_IN.to_owned());
        after.push(JUMP_FWD.to_owned());
        after.extend(guard_rules(&g).iter().map(Rule::render));
        assert!(guard_in_place(&g, &after));
        assert_eq!(guard_restore(&g, &after), None);
    }

    #[test]
    fn peers_that_left_stale_ports_and_duplicate_jumps_are_fixed_in_one_transaction() {
        let old = guard(&["198.18.0.2", "198.18.0.9"]);
        let mut current = vec![
            JUMP_IN.replace("8472", "8475"),
            JUMP_IN.to_owned(),
            JUMP_FWD.to_owned(),
            JUMP_FWD.to_owned(),
        ];
        current.extend(guard_rules(&old).iter().map(Rule::render));
        let new = guard(&["198.18.0.2"]);
        let payload = guard_restore(&new, &current).expect("payload");
        assert!(!payload.contains("198.18.0.9"), "{payload}");
        assert!(
            payload.contains("-D INPUT -p udp -m udp --dport 8475"),
            "{payload}"
        );
        // INPUT: a stale jump besides the right one: both deleted, one inserted.
        assert_eq!(payload.matches("-D INPUT ").count(), 2, "{payload}");
        assert_eq!(payload.matches("-I INPUT 1 ").count(), 1, "{payload}");
        assert_eq!(payload.matches("-D FORWARD ").count(), 2, "{payload}");
        assert_eq!(payload.matches("-I FORWARD 1 ").count(), 1, "{payload}");
        // Only the peer set changed: chains rewritten, jumps left alone.
        let mut ok = vec![JUMP_IN.to_owned(), JUMP_FWD.to_owned()];
        ok.extend(guard_rules(&old).iter().map(Rule::render));
        let payload = guard_restore(&new, &ok).expect("payload");
        assert!(
            !payload.contains("-D ") && !payload.contains("-I "),
            "{payload}"
        );
        assert_eq!(payload.matches("-j RETURN").count(), 1, "{payload}");
    }

    /// A fake iptables for the filter table with `iptables-restore --noflush` semantics:
    /// a chain declaration flushes (or creates) it, `-A` appends, `-D` deletes, `-I c 1`
    /// inserts first in its chain; `-S` lists the rules.
    #[derive(Debug, Default)]
    struct FakeFilter {
        rules: std::sync::Mutex<Vec<String>>,
        restores: std::sync::Mutex<Vec<String>>,
    }

    impl super::super::Runner for FakeFilter {
        fn invoke(&self, cmd: &Invocation<'_>) -> Result<String, MasqError> {
            if cmd.args.iter().any(|a| a == "--version") {
                return Ok("iptables v1.8.9 (nf_tables)".into());
            }
            let mut rules = self.rules.lock().expect("lock");
            if cmd.program.ends_with("-restore") {
                let payload = cmd.stdin.unwrap_or_default();
                for line in payload.lines() {
                    if let Some(decl) = line.strip_prefix(':') {
                        let chain = decl.split(' ').next().unwrap_or_default();
                        rules.retain(|r| !r.starts_with(&format!("-A {chain} ")));
                    } else if let Some(rest) = line.strip_prefix("-D ") {
                        let want = format!("-A {rest}");
                        let i = rules.iter().position(|r| *r == want).ok_or_else(|| {
                            MasqError::Failed {
                                cmd: "restore".into(),
                                status: "1".into(),
                                stderr: format!("no such rule {rest}"),
                            }
                        })?;
                        rules.remove(i);
                    } else if let Some(rest) = line.strip_prefix("-I ") {
                        let (chain, spec) = rest.split_once(" 1 ").expect("-I chain 1");
                        let head = format!("-A {chain} ");
                        let at = rules.iter().position(|r| r.starts_with(&head));
                        let at = at.unwrap_or(rules.len());
                        rules.insert(at, format!("-A {chain} {spec}"));
                    } else if line.starts_with("-A ") {
                        rules.push(line.to_owned());
                    }
                }
                self.restores.lock().expect("lock").push(payload.to_owned());
                return Ok(String::new());
            }
            Ok(rules.join("\n"))
        }
    }

    #[test]
    fn applier_installs_once_follows_peers_and_repairs() {
        let fake = std::sync::Arc::new(FakeFilter::default());
        fake.rules
            .lock()
            .expect("lock")
            .push("-A INPUT -i lo -j ACCEPT".into());
        let ipt =
            Iptables::detect_with(crate::netlink::IpFamily::V4, fake.clone()).expect("detect");
        let restores = || fake.restores.lock().expect("lock").len();
        let g = guard(&["198.18.0.2", "198.18.0.3"]);
        assert!(ipt.sync_vxlan_guard(&g).expect("sync"));
        assert_eq!(restores(), 1);
        let listed: Vec<String> = fake.rules.lock().expect("lock").clone();
        assert!(guard_in_place(&g, &listed), "{listed:#?}");
        // Our jump comes before the rule that was there.
        assert_eq!(listed[0], JUMP_IN);
        assert!(!ipt.sync_vxlan_guard(&g).expect("sync"));
        assert_eq!(restores(), 1);
        // A peer leaves: one transaction, its rule gone.
        let g2 = guard(&["198.18.0.2"]);
        assert!(ipt.sync_vxlan_guard(&g2).expect("sync"));
        assert_eq!(restores(), 2);
        let listed: Vec<String> = fake.rules.lock().expect("lock").clone();
        assert!(guard_in_place(&g2, &listed), "{listed:#?}");
        assert!(!listed.iter().any(|l| l.contains("198.18.0.3")));
        // Someone deletes the INPUT jump: put back, first.
        fake.rules.lock().expect("lock").retain(|l| l != JUMP_IN);
        assert!(ipt.sync_vxlan_guard(&g2).expect("sync"));
        let listed: Vec<String> = fake.rules.lock().expect("lock").clone();
        assert_eq!(listed[0], JUMP_IN);
        assert!(guard_in_place(&g2, &listed));
    }
}
