//! Reading `nft list ruleset` text: the nftables half of `forward-reject`, `host-firewall`
//! and `vxlan-guard`, and flannel's masquerade rules for `masquerade` (nftables mode).
//!
//! Unlike iptables, every nftables base chain on the forward hook sees the packet: an
//! `accept` ends only its own chain, a `drop`/`reject` anywhere is final. So pod traffic is
//! lost if *any* forward base chain drops it, whatever flannel's `forward` chain accepts.
//! Tables `filter`/`nat`/`mangle`/`raw`/`security` of families `ip`/`ip6` are iptables-nft's
//! and are read through `iptables -S` already; they are left out here. As in
//! [`super::iptables`], matches this module does not understand make a rule count as not
//! matching, so a verdict never blames a rule that may not apply.

use std::net::IpAddr;

use ipnet::IpNet;

use super::checks::{guard_check, judge_guard, AllowList, GuardWant};
use super::report::{ids, Finding, Status};
use crate::masq::{nft_family, nft_table, NFT_GUARD_TABLE, NFT_POSTRTG_CHAIN};
use crate::netlink::IpFamily;

/// A chain of the ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftChain {
    /// Table family (`ip`, `ip6`, `inet`, ...).
    pub family: String,
    /// Table name.
    pub table: String,
    /// Chain name.
    pub name: String,
    /// `type` of a base chain (`filter`, `nat`, ...).
    pub kind: Option<String>,
    /// `hook` of a base chain.
    pub hook: Option<String>,
    /// `policy` of a base chain.
    pub policy: Option<String>,
    /// Rules as listed (one line each, trimmed).
    pub rules: Vec<String>,
}

/// A named set with its elements as listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftSet {
    /// Table family.
    pub family: String,
    /// Table name.
    pub table: String,
    /// Set name.
    pub name: String,
    /// Elements.
    pub elements: Vec<String>,
}

/// `nft list ruleset`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftRuleset {
    /// `(family, name)` of every table.
    pub tables: Vec<(String, String)>,
    /// Every chain.
    pub chains: Vec<NftChain>,
    /// Every named set.
    pub sets: Vec<NftSet>,
}

impl NftRuleset {
    /// Chain `name` of table `family table`.
    pub fn chain(&self, family: &str, table: &str, name: &str) -> Option<&NftChain> {
        self.chains
            .iter()
            .find(|c| c.family == family && c.table == table && c.name == name)
    }

    /// Whether table `family name` exists.
    pub fn has_table(&self, family: &str, name: &str) -> bool {
        self.tables.iter().any(|(f, n)| f == family && n == name)
    }
}

enum Block {
    None,
    Chain(usize),
    Set(usize, bool),
    Other,
}

/// Parses `nft list ruleset` output (tables at column 0, their objects one tab in, the
/// contents of chains and sets two tabs in).
pub fn parse_ruleset(text: &str) -> NftRuleset {
    let mut rs = NftRuleset::default();
    let mut table: Option<(String, String)> = None;
    let mut block = Block::None;
    for raw in text.lines() {
        let indent = raw.len() - raw.trim_start_matches('\t').len();
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if indent == 0 {
            if let Some(rest) = line.strip_prefix("table ") {
                let w: Vec<&str> = rest.split_whitespace().collect();
                if let [fam, name, ..] = w[..] {
                    table = Some((fam.to_owned(), name.to_owned()));
                    rs.tables.push((fam.to_owned(), name.to_owned()));
                }
            } else if line == "}" {
                table = None;
            }
            block = Block::None;
            continue;
        }
        let Some((fam, tname)) = &table else { continue };
        if indent == 1 {
            let w: Vec<&str> = line.split_whitespace().collect();
            block = match w[..] {
                ["chain", name, "{"] => {
                    rs.chains.push(NftChain {
                        family: fam.clone(),
                        table: tname.clone(),
                        name: name.to_owned(),
                        ..NftChain::default()
                    });
                    Block::Chain(rs.chains.len() - 1)
                }
                ["set", name, "{"] => {
                    rs.sets.push(NftSet {
                        family: fam.clone(),
                        table: tname.clone(),
                        name: name.to_owned(),
                        elements: Vec::new(),
                    });
                    Block::Set(rs.sets.len() - 1, false)
                }
                ["}"] => Block::None,
                _ if line.ends_with('{') => Block::Other,
                _ => std::mem::replace(&mut block, Block::None),
            };
            continue;
        }
        match &mut block {
            Block::Chain(i) => {
                let c = &mut rs.chains[*i];
                if let Some(spec) = line.strip_prefix("type ") {
                    let w: Vec<&str> = spec.split([' ', ';']).filter(|s| !s.is_empty()).collect();
                    c.kind = w.first().map(|s| (*s).to_owned());
                    let after = |key: &str| {
                        w.iter()
                            .position(|x| *x == key)
                            .and_then(|i| w.get(i + 1))
                            .map(|s| (*s).to_owned())
                    };
                    c.hook = after("hook");
                    c.policy = after("policy");
                } else if !line.starts_with("comment ") && line != "}" {
                    c.rules.push(line.to_owned());
                }
            }
            Block::Set(i, collecting) => {
                if line.starts_with("elements") {
                    *collecting = true;
                }
                if *collecting {
                    let body = line.trim_start_matches("elements").trim_start();
                    let body = body.trim_start_matches('=');
                    rs.sets[*i].elements.extend(
                        body.split([',', '{', '}', ' '])
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned),
                    );
                    if line.contains('}') {
                        *collecting = false;
                    }
                }
            }
            Block::None | Block::Other => {}
        }
    }
    rs
}

/// Splits a rule into words, keeping double-quoted strings as one word.
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    All,
    Part,
    None,
}

/// How much pod traffic (source and destination in `network`) a rule's matches select, and
/// its verdict; `None` when a match is not understood or there is no verdict.
fn classify(rule: &str, network: IpNet) -> Option<(Reach, Verdict)> {
    let w = words(rule);
    let mut matches: Vec<&str> = Vec::new();
    let mut verdict = None;
    let mut i = 0;
    while i < w.len() {
        match w[i].as_str() {
            // Statements that do not decide anything.
            "counter" => {
                i += 1;
                if w.get(i).map(String::as_str) == Some("packets") {
                    i += 4;
                }
                continue;
            }
            "comment" => {
                i += 2;
                continue;
            }
            "accept" => verdict = Some(Verdict::Accept),
            "drop" | "reject" => verdict = Some(Verdict::Drop),
            "return" => verdict = Some(Verdict::Return),
            "jump" => verdict = w.get(i + 1).map(|c| Verdict::Jump(c.clone())),
            "goto" => verdict = w.get(i + 1).map(|c| Verdict::Goto(c.clone())),
            other => matches.push(other),
        }
        if verdict.is_some() {
            break;
        }
        i += 1;
    }
    let verdict = verdict?;
    let mut reach = Reach::All;
    let mut j = 0;
    while j < matches.len() {
        let (Some(fam @ ("ip" | "ip6")), Some("saddr" | "daddr")) =
            (matches.get(j).copied(), matches.get(j + 1).copied())
        else {
            return None;
        };
        let negated = matches.get(j + 2) == Some(&"!=");
        let k = j + 2 + usize::from(negated);
        let net: IpNet = match matches.get(k) {
            Some(s) => match s.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => IpNet::from(s.parse::<std::net::IpAddr>().ok()?),
            },
            None => return None,
        };
        let covers = net.contains(&network);
        let overlap = net.contains(&network.network()) || network.contains(&net.network());
        let one = match (negated, covers, overlap) {
            // `ip`/`ip6` matches select only packets of their family, negated or not.
            _ if fam != nft_family(IpFamily::of_net(network)) => Reach::None,
            (false, true, _) | (true, _, false) => Reach::All,
            (false, _, false) | (true, true, _) => Reach::None,
            _ => Reach::Part,
        };
        reach = match (reach, one) {
            (Reach::None, _) | (_, Reach::None) => Reach::None,
            (Reach::Part, _) | (_, Reach::Part) => Reach::Part,
            _ => Reach::All,
        };
        j = k + 1;
    }
    Some((reach, verdict))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Walk {
    Accepted,
    Rejected(String, bool),
    Return,
}

fn walk(rs: &NftRuleset, c: &NftChain, network: IpNet, partial: bool, depth: u32) -> Walk {
    for rule in &c.rules {
        let Some((reach, verdict)) = classify(rule, network) else {
            continue;
        };
        if reach == Reach::None {
            continue;
        }
        let part = partial || reach == Reach::Part;
        match verdict {
            Verdict::Accept if !part => return Walk::Accepted,
            Verdict::Drop => return Walk::Rejected(rule.clone(), part),
            Verdict::Return if !part => return Walk::Return,
            Verdict::Jump(to) | Verdict::Goto(to) if depth < 16 => {
                let goto = rule.contains(" goto ") || rule.starts_with("goto ");
                if let Some(next) = rs.chain(&c.family, &c.table, &to) {
                    match walk(rs, next, network, part, depth + 1) {
                        Walk::Return if goto && !part => return Walk::Return,
                        Walk::Return => {}
                        decided => return decided,
                    }
                }
            }
            _ => {}
        }
    }
    Walk::Return
}

fn iptables_nft_table(family: &str, table: &str) -> bool {
    matches!(family, "ip" | "ip6")
        && matches!(table, "filter" | "nat" | "mangle" | "raw" | "security")
}

/// The first nftables forward base chain (outside iptables-nft's tables) that drops or
/// rejects pod traffic in `network`: `(chain as "family table name", the rule or
/// "policy drop", partial)`.
pub fn forward_drop(rs: &NftRuleset, network: IpNet) -> Option<(String, String, bool)> {
    for c in &rs.chains {
        if c.hook.as_deref() != Some("forward")
            || !(c.family == "inet" || c.family == nft_family(IpFamily::of_net(network)))
            || iptables_nft_table(&c.family, &c.table)
        {
            continue;
        }
        let name = format!("{} {} {}", c.family, c.table, c.name);
        match walk(rs, c, network, false, 0) {
            Walk::Accepted => {}
            Walk::Rejected(rule, partial) => return Some((name, rule, partial)),
            Walk::Return if c.policy.as_deref() == Some("drop") => {
                return Some((name, "policy drop".into(), false))
            }
            Walk::Return => {}
        }
    }
    None
}

/// `forward-reject` with the nftables ruleset: the iptables finding `ipt` stands unless a
/// forward base chain of nftables drops pod traffic (then FAIL naming it) or iptables could
/// not be listed (then the nftables verdict). `ruleset` is `None` when nft is not installed.
pub fn forward_reject_with_nft(
    ipt: Finding,
    ruleset: Option<&NftRuleset>,
    network: Option<IpNet>,
) -> Finding {
    let (Some(rs), Some(network)) = (ruleset, network) else {
        return ipt;
    };
    match forward_drop(rs, network) {
        Some((chain, rule, partial)) if ipt.status != Status::Fail => {
            let which = if partial { "part of the pod traffic" } else { "pod traffic" };
            let ipf = nft_family(IpFamily::of_net(network));
            let mut parts = chain.splitn(3, ' ');
            let (fam, table, name) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            Finding::new(
                Status::Fail,
                ids::FORWARD_REJECT,
                format!("nftables chain {chain}: \"{rule}\" drops {which} in {network} (a drop in any nftables forward chain is final, whatever flannel accepts)"),
            )
            .fix(format!("nft -a list chain {chain}, delete that rule (nft delete rule {chain} handle <N>) and remove it from /etc/nftables.conf so it does not come back"))
            .fix(format!("or accept the pod network first in that chain: nft insert rule {fam} {table} {name} {ipf} daddr {network} accept; nft insert rule {fam} {table} {name} {ipf} saddr {network} accept"))
        }
        None if ipt.status == Status::Skip => Finding::new(
            Status::Pass,
            ids::FORWARD_REJECT,
            format!("no nftables forward chain drops pod traffic in {network} (iptables not listed: {})", ipt.message),
        ),
        None if ipt.status == Status::Pass => {
            let mut f = ipt;
            f.message.push_str("; no nftables forward chain drops it");
            f
        }
        _ => ipt,
    }
}

/// `host-firewall` with the nftables ruleset: firewalld's nftables backend keeps its rules in
/// table `inet firewalld` (no iptables chains).
pub fn host_firewall_with_nft(
    ipt: Finding,
    ruleset: Option<&NftRuleset>,
    network: Option<IpNet>,
) -> Finding {
    let Some(rs) = ruleset else { return ipt };
    let tables: Vec<String> = rs
        .tables
        .iter()
        .filter(|(_, n)| n == "firewalld")
        .map(|(f, n)| format!("{f} {n}"))
        .collect();
    if tables.is_empty() {
        return match ipt.status {
            Status::Skip => Finding::new(
                Status::Pass,
                ids::HOST_FIREWALL,
                "no firewalld nftables table (iptables not listed)",
            ),
            _ => ipt,
        };
    }
    let found = format!("nftables table {}", tables.join(", "));
    if ipt.status == Status::Warn {
        let mut f = ipt;
        f.message = format!("{found}; {}", f.message);
        return f;
    }
    let net = network
        .map(|n| n.to_string())
        .unwrap_or_else(|| "<Network>".into());
    Finding::new(
        Status::Warn,
        ids::HOST_FIREWALL,
        format!("{found}: a host firewall may reject forwarded pod traffic or VXLAN packets"),
    )
    .fix(format!("firewalld: firewall-cmd --permanent --zone=trusted --add-source={net}; firewall-cmd --permanent --add-port=8472/udp; firewall-cmd --reload"))
}

/// flannel's masquerade rules of nftables mode, as `nft` lists them (`fully-random` aside).
fn expected_nft_masq(network: IpNet, subnet: IpNet) -> Vec<String> {
    let (n, p) = (network.trunc(), subnet.trunc());
    let (f, mc) = match network {
        IpNet::V4(_) => ("ip", "224.0.0.0/4"),
        IpNet::V6(_) => ("ip6", "ff00::/8"),
    };
    vec![
        "meta mark 0x00004000 return".into(),
        format!("{f} saddr {p} {f} daddr {n} return"),
        format!("{f} saddr {n} {f} daddr {p} return"),
        format!("{f} saddr != {p} {f} daddr {n} return"),
        format!("{f} saddr {n} {f} daddr != {mc} masquerade"),
        format!("{f} saddr != {n} {f} daddr {n} masquerade"),
    ]
}

/// `masquerade`: with `--ip-masq`, flannel's masquerade rules for `network` and this node's
/// `subnet` are in place: chain `postrtg` of table `ip flannel-ipv4` (nftables mode, from
/// `ruleset`) or `FLANNEL-POSTRTG` and its jump in table nat (`nat`: `iptables -t nat -S`).
/// `None` without `--ip-masq` (flanneld then installs none: nothing to check).
pub fn masquerade(
    ip_masq: bool,
    nftables: bool,
    network: Option<IpNet>,
    subnet: Option<IpNet>,
    ruleset: Result<&NftRuleset, &str>,
    nat: Result<&str, &str>,
) -> Option<Finding> {
    ip_masq.then(|| masquerade_rules(nftables, network, subnet, ruleset, nat))
}

fn masquerade_rules(
    nftables: bool,
    network: Option<IpNet>,
    subnet: Option<IpNet>,
    ruleset: Result<&NftRuleset, &str>,
    nat: Result<&str, &str>,
) -> Finding {
    let id = ids::MASQUERADE;
    let (Some(network), Some(subnet)) = (network, subnet) else {
        return Finding::new(
            Status::Skip,
            id,
            "the pod Network or this node's subnet is unknown",
        );
    };
    let restart = "restart flanneld: it writes the masquerade rules at start and re-checks them every --iptables-resync seconds";
    let family = IpFamily::of_net(network);
    let (fam, table) = (nft_family(family), nft_table(family));
    let missing: Vec<String> = if nftables {
        let rs = match ruleset {
            Ok(rs) => rs,
            Err(e) => return Finding::new(Status::Skip, id, format!("cannot list nftables: {e}")),
        };
        let have: Vec<String> = rs
            .chain(fam, table, NFT_POSTRTG_CHAIN)
            .map(|c| {
                c.rules
                    .iter()
                    .map(|r| r.replace(" fully-random", ""))
                    .collect()
            })
            .unwrap_or_default();
        expected_nft_masq(network, subnet)
            .into_iter()
            .filter(|r| !have.contains(r))
            .collect()
    } else {
        let text = match nat {
            Ok(t) => t,
            Err(e) => {
                return Finding::new(Status::Skip, id, format!("cannot list iptables rules: {e}"))
            }
        };
        let have: Vec<String> = text
            .lines()
            .map(|l| l.replace(" --random-fully", ""))
            .collect();
        crate::masq::masq_rules(network, subnet, false)
            .iter()
            .map(crate::masq::Rule::render)
            .filter(|r| !have.contains(r))
            .collect()
    };
    let place = if nftables {
        format!("nftables chain {fam} {table} {NFT_POSTRTG_CHAIN}")
    } else {
        "iptables nat FLANNEL-POSTRTG".to_owned()
    };
    if missing.is_empty() {
        Finding::new(
            Status::Pass,
            id,
            format!("flannel's masquerade rules for {network} (subnet {subnet}) are in {place}"),
        )
    } else {
        Finding::new(
            Status::Fail,
            id,
            format!(
                "masquerade rules missing from {place} ({}): pods cannot reach addresses outside {network}",
                missing.join("; ")
            ),
        )
        .fix(restart)
    }
}

/// `vxlan-guard` in nftables mode: table `ip flannel-rs-guard` drops UDP port from the
/// Network on input and forward, and (kernel mode) from any address not in set `peers`,
/// which should hold exactly the peers' public IPs when the store was read.
pub fn vxlan_guard_nft(ruleset: Result<&NftRuleset, &str>, want: &GuardWant<'_>) -> Finding {
    guard_check(ruleset, "nftables", want, |rs, port, network| {
        nft_guard(rs, port, network, want)
    })
}

fn nft_guard(rs: &NftRuleset, port: u16, network: IpNet, want: &GuardWant<'_>) -> Finding {
    let allow_list = want.allow_list;
    let t = NFT_GUARD_TABLE;
    let fam = nft_family(IpFamily::of_net(network));
    let restart = format!("restart flanneld: in nftables mode it writes table {fam} {t} and re-checks it every --iptables-resync seconds");
    let pod_drop = format!("udp dport {port} {fam} saddr {} drop", network.trunc());
    let mut missing = Vec::new();
    for chain in ["input", "forward"] {
        let ok = rs
            .chain(fam, t, chain)
            .is_some_and(|c| c.rules.contains(&pod_drop));
        if !ok {
            missing.push(format!("{chain}: {pod_drop}"));
        }
    }
    let allow = format!("udp dport {port} {fam} saddr != @peers drop");
    if allow_list
        && !rs
            .chain(fam, t, "input")
            .is_some_and(|c| c.rules.contains(&allow))
    {
        missing.push(format!("input: {allow}"));
    }
    let allowed: Vec<IpAddr> = rs
        .sets
        .iter()
        .find(|s| s.family == fam && s.table == t && s.name == "peers")
        .map(|s| s.elements.iter().filter_map(|e| e.parse().ok()).collect())
        .unwrap_or_default();
    let name = format!("set {fam} {t} peers");
    let missing_label = format!("VXLAN guard missing from nftables table {fam} {t}");
    judge_guard(
        &AllowList {
            port,
            network,
            allowed: &allowed,
            name: &name,
            restart: &restart,
            missing_label: &missing_label,
            drop_note: " (nftables)",
        },
        &missing,
        allow_list,
        want.peers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULESET: &str = "table ip flannel-ipv4 {
\tcomment \"rules for flannel-ipv4\"
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
\t}

\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}
}
table ip flannel-rs-guard {
\tset peers {
\t\ttype ipv4_addr
\t\telements = { 198.18.0.2, 198.18.0.3,
\t\t\t     198.18.0.4 }
\t}

\tchain input {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tudp dport 8472 ip saddr 10.244.0.0/16 drop
\t\tudp dport 8472 ip saddr != @peers drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tudp dport 8472 ip saddr 10.244.0.0/16 drop
\t}
}
";

    fn net() -> IpNet {
        "10.244.0.0/16".parse().unwrap()
    }

    fn with_host_fw(extra: &str) -> NftRuleset {
        parse_ruleset(&format!("{RULESET}{extra}"))
    }

    #[test]
    fn parses_chains_hooks_and_sets() {
        let rs = parse_ruleset(RULESET);
        assert_eq!(rs.tables.len(), 2);
        let post = rs.chain("ip", "flannel-ipv4", "postrtg").unwrap();
        assert_eq!(post.hook.as_deref(), Some("postrouting"));
        assert_eq!(post.kind.as_deref(), Some("nat"));
        assert_eq!(post.policy.as_deref(), Some("accept"));
        assert_eq!(post.rules.len(), 6);
        assert_eq!(
            rs.sets[0].elements,
            ["198.18.0.2", "198.18.0.3", "198.18.0.4"]
        );
    }

    #[test]
    fn forward_drop_in_another_table_fails_even_with_flannels_accepts() {
        assert_eq!(forward_drop(&parse_ruleset(RULESET), net()), None);
        let rs = with_host_fw(
            "table inet filter {
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
\t\tiifname \"lo\" accept
\t\tjump checks
\t}

\tchain checks {
\t\tip saddr 10.0.0.0/8 counter packets 3 bytes 180 reject with icmp host-prohibited
\t}
}
",
        );
        let (chain, rule, partial) = forward_drop(&rs, net()).unwrap();
        assert_eq!(chain, "inet filter forward");
        assert_eq!(
            rule,
            "ip saddr 10.0.0.0/8 counter packets 3 bytes 180 reject with icmp host-prohibited"
        );
        assert!(!partial);
        // Accepting the pod network first in that chain passes.
        let ok = with_host_fw(
            "table inet filter {
\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
\t\tip daddr 10.244.0.0/16 accept
\t\tip saddr 10.244.0.0/16 accept
\t}
}
",
        );
        assert_eq!(forward_drop(&ok, net()), None);
        // Policy drop with nothing for the pods.
        let pol = with_host_fw(
            "table inet filter {
\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
\t\ttcp dport 22 accept
\t}
}
",
        );
        assert_eq!(
            forward_drop(&pol, net()).unwrap().1,
            "policy drop".to_owned()
        );
        // iptables-nft's own table is read through iptables -S, not here.
        let xt = with_host_fw(
            "table ip filter {
\tchain FORWARD {
\t\ttype filter hook forward priority filter; policy drop;
\t}
}
",
        );
        assert_eq!(forward_drop(&xt, net()), None);
    }

    #[test]
    fn forward_reject_and_host_firewall_merge() {
        let ipt = Finding::new(Status::Pass, ids::FORWARD_REJECT, "ok");
        let rs = with_host_fw(
            "table inet firewalld {
\tchain filter_FORWARD {
\t\ttype filter hook forward priority filter + 10; policy accept;
\t\treject with icmpx admin-prohibited
\t}
}
",
        );
        let f = forward_reject_with_nft(ipt.clone(), Some(&rs), Some(net()));
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.message.contains("inet firewalld filter_FORWARD"),
            "{}",
            f.message
        );
        assert!(f.fixes[1].contains(
            "nft insert rule inet firewalld filter_FORWARD ip daddr 10.244.0.0/16 accept"
        ));
        let clean = parse_ruleset(RULESET);
        let f = forward_reject_with_nft(ipt.clone(), Some(&clean), Some(net()));
        assert_eq!(f.status, Status::Pass);
        assert_eq!(f.message, "ok; no nftables forward chain drops it");
        let hf = host_firewall_with_nft(
            Finding::new(Status::Pass, ids::HOST_FIREWALL, "none"),
            Some(&rs),
            Some(net()),
        );
        assert_eq!(hf.status, Status::Warn);
        assert!(hf.message.starts_with("nftables table inet firewalld"));
    }

    #[test]
    fn masquerade_in_both_modes() {
        let rs = parse_ruleset(RULESET);
        let sub: IpNet = "10.244.1.0/24".parse().unwrap();
        let f = masquerade(true, true, Some(net()), Some(sub), Ok(&rs), Err("x")).unwrap();
        assert_eq!(f.status, Status::Pass, "{}", f.message);
        let other: IpNet = "10.244.2.0/24".parse().unwrap();
        let f = masquerade(true, true, Some(net()), Some(other), Ok(&rs), Err("x")).unwrap();
        assert_eq!(f.status, Status::Fail);
        assert!(f
            .message
            .contains("ip saddr 10.244.2.0/24 ip daddr 10.244.0.0/16 return"));
        assert_eq!(
            masquerade(false, true, Some(net()), Some(sub), Ok(&rs), Err("x")),
            None
        );
        let nat: String = crate::masq::masq_rules(net(), sub, true)
            .iter()
            .map(crate::masq::Rule::render)
            .collect::<Vec<_>>()
            .join("\n");
        let f = masquerade(true, false, Some(net()), Some(sub), Err("x"), Ok(&nat)).unwrap();
        assert_eq!(f.status, Status::Pass, "{}", f.message);
        let f = masquerade(true, false, Some(net()), Some(sub), Err("x"), Ok("")).unwrap();
        assert_eq!(f.status, Status::Fail);
    }

    /// flannel's and our IPv6 tables as `nft list ruleset` shows them, and a host table with
    /// one drop per family.
    const RULESET6: &str = "table ip6 flannel-ipv6 {
\tchain postrtg {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip6 saddr 2001:db8:42:1::/64 ip6 daddr 2001:db8:42::/56 return
\t\tip6 saddr 2001:db8:42::/56 ip6 daddr 2001:db8:42:1::/64 return
\t\tip6 saddr != 2001:db8:42:1::/64 ip6 daddr 2001:db8:42::/56 return
\t\tip6 saddr 2001:db8:42::/56 ip6 daddr != ff00::/8 masquerade fully-random
\t\tip6 saddr != 2001:db8:42::/56 ip6 daddr 2001:db8:42::/56 masquerade fully-random
\t}
}
table ip6 flannel-rs-guard {
\tset peers {
\t\ttype ipv6_addr
\t\telements = { 2001:db8:18::2 }
\t}

\tchain input {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tudp dport 8472 ip6 saddr 2001:db8:42::/56 drop
\t\tudp dport 8472 ip6 saddr != @peers drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tudp dport 8472 ip6 saddr 2001:db8:42::/56 drop
\t}
}
table inet filter {
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.0.0.0/8 drop
\t\tip6 daddr 2001:db8:42:7::/64 drop
\t}
}
";

    #[test]
    fn v6_tables_and_rules_of_each_family() {
        let rs = parse_ruleset(&format!("{RULESET}{RULESET6}"));
        let n6: IpNet = "2001:db8:42::/56".parse().unwrap();
        let sub6: IpNet = "2001:db8:42:1::/64".parse().unwrap();
        let f = masquerade(true, true, Some(n6), Some(sub6), Ok(&rs), Err("x")).unwrap();
        assert_eq!(f.status, Status::Pass, "{}", f.message);
        assert!(f
            .message
            .contains("nftables chain ip6 flannel-ipv6 postrtg"));
        let other6: IpNet = "2001:db8:42:2::/64".parse().unwrap();
        let f = masquerade(true, true, Some(n6), Some(other6), Ok(&rs), Err("x")).unwrap();
        assert_eq!(f.status, Status::Fail);
        // The v4 table is not the v6 one.
        let only_v4 = parse_ruleset(RULESET);
        let f = masquerade(true, true, Some(n6), Some(sub6), Ok(&only_v4), Err("x")).unwrap();
        assert_eq!(f.status, Status::Fail);

        let peers: Vec<IpAddr> = vec!["2001:db8:18::2".parse().unwrap()];
        let want = GuardWant::new(Some(n6), Some(8472), true, Some(&peers));
        let f = vxlan_guard_nft(Ok(&rs), &want);
        assert_eq!(f.status, Status::Pass, "{}", f.message);
        let f = vxlan_guard_nft(Ok(&only_v4), &want);
        assert_eq!(f.status, Status::Fail, "{}", f.message);
        assert!(
            f.message.contains("table ip6 flannel-rs-guard"),
            "{}",
            f.message
        );

        // `ip6 daddr` drops part of the v6 pod traffic and none of the v4; `ip saddr` the
        // reverse.
        let (chain, rule, partial) = forward_drop(&rs, n6).unwrap();
        assert_eq!(
            (chain.as_str(), rule.as_str(), partial),
            (
                "inet filter forward",
                "ip6 daddr 2001:db8:42:7::/64 drop",
                true
            )
        );
        let (_, rule4, _) = forward_drop(&rs, net()).unwrap();
        assert_eq!(rule4, "ip saddr 10.0.0.0/8 drop");
        let f = forward_reject_with_nft(
            Finding::new(Status::Pass, ids::FORWARD_REJECT, "ok"),
            Some(&rs),
            Some(n6),
        )
        .v6();
        assert_eq!((f.status, f.id), (Status::Fail, "forward-reject-v6"));
        assert!(
            f.fixes[1]
                .contains("nft insert rule inet filter forward ip6 daddr 2001:db8:42::/56 accept"),
            "{:?}",
            f.fixes
        );
    }

    #[test]
    fn guard_table_and_allow_list() {
        let rs = parse_ruleset(RULESET);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let peers = [ip("198.18.0.2"), ip("198.18.0.3"), ip("198.18.0.4")];
        let f = vxlan_guard_nft(
            Ok(&rs),
            &GuardWant::new(Some(net()), Some(8472), true, Some(&peers)),
        );
        assert_eq!(f.status, Status::Pass, "{}", f.message);
        let more = [ip("198.18.0.2"), ip("198.18.0.9")];
        let f = vxlan_guard_nft(
            Ok(&rs),
            &GuardWant::new(Some(net()), Some(8472), true, Some(&more)),
        );
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("198.18.0.9"));
        let f = vxlan_guard_nft(
            Ok(&rs),
            &GuardWant::new(Some(net()), Some(4789), false, None),
        );
        assert_eq!(f.status, Status::Fail);
        let empty = NftRuleset::default();
        let f = vxlan_guard_nft(
            Ok(&empty),
            &GuardWant::new(Some(net()), Some(8472), false, None),
        );
        assert_eq!(f.status, Status::Fail);
    }
}
