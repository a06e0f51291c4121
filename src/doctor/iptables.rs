//! Reading `iptables -t filter -S` (and `ip6tables -t filter -S`) text: which rule decides the fate of pod traffic in the
//! FORWARD chain (field problem P3: a `REJECT` above flannel's accepts), and whether a host
//! firewall (firewalld, ufw) manages the chains.
//!
//! Pod traffic here is a packet from an address in Network to an address in Network (pod to
//! pod across nodes). A rule's address matches are decided exactly; matches this module does
//! not understand (interfaces, protocols, conntrack states, marks, ...) make the rule count
//! as not matching, so the verdict never blames a rule that may not apply.

use std::collections::HashMap;

use ipnet::IpNet;

/// One `-A` rule of `iptables -S`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    /// The rule exactly as listed (`-A FORWARD -j REJECT --reject-with icmp-host-prohibited`).
    pub text: String,
    /// The chain it is in.
    pub chain: String,
    /// Its matches.
    conds: Vec<Cond>,
    /// `-j`/`-g` target.
    pub target: Option<String>,
    /// `-g` (goto) rather than `-j`.
    goto: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cond {
    Src {
        net: IpNet,
        negated: bool,
    },
    Dst {
        net: IpNet,
        negated: bool,
    },
    /// A match this module does not evaluate.
    Other,
}

/// The filter table as `iptables -S` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterTable {
    /// Built-in chain policies (`-P FORWARD DROP`).
    pub policies: HashMap<String, String>,
    /// Chains in listing order (built-in ones from `-P`, user ones from `-N`).
    pub chains: Vec<String>,
    rules: HashMap<String, Vec<FilterRule>>,
}

/// Splits a line the way iptables quotes it: words, double-quoted strings with `\` escapes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// Long options of iptables itself (not of a match module).
fn is_main_long(opt: &str) -> bool {
    matches!(
        opt,
        "--source"
            | "--destination"
            | "--jump"
            | "--goto"
            | "--protocol"
            | "--match"
            | "--in-interface"
            | "--out-interface"
            | "--fragment"
    )
}

fn parse_rule(text: &str, w: &[String]) -> Option<FilterRule> {
    let chain = w.get(1)?.clone();
    let mut conds = Vec::new();
    let mut target = None;
    let mut goto = false;
    let mut negated = false;
    let mut i = 2;
    while let Some(tok) = w.get(i) {
        i += 1;
        let next = w.get(i);
        match tok.as_str() {
            "!" => {
                negated = true;
                continue;
            }
            "-s" | "--source" | "-d" | "--destination" => {
                i += 1;
                let src = tok == "-s" || tok == "--source";
                match next.and_then(|v| parse_net(v)) {
                    Some(net) if src => conds.push(Cond::Src { net, negated }),
                    Some(net) => conds.push(Cond::Dst { net, negated }),
                    None => conds.push(Cond::Other),
                }
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                goto = tok == "-g" || tok == "--goto";
                target = next.cloned();
                // Everything after the target are the target's own options.
                break;
            }
            "-p" | "--protocol" => {
                i += 1;
                if negated || next.map(String::as_str) != Some("all") {
                    conds.push(Cond::Other);
                }
            }
            "-m" | "--match" => {
                i += 1;
                if next.map(String::as_str) != Some("comment") {
                    conds.push(Cond::Other);
                }
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                i += 1;
                conds.push(Cond::Other);
            }
            opt if opt.starts_with("--") && !is_main_long(opt) => {
                // A match module's option and its values (the module itself was counted).
                while w.get(i).is_some_and(|v| !v.starts_with('-') && v != "!") {
                    i += 1;
                }
            }
            _ => conds.push(Cond::Other),
        }
        negated = false;
    }
    Some(FilterRule {
        text: text.to_owned(),
        chain,
        conds,
        target,
        goto,
    })
}

/// Parses `iptables -t filter -S` output; unknown lines are ignored.
pub fn parse_filter(text: &str) -> FilterTable {
    let mut t = FilterTable::default();
    for line in text.lines() {
        let line = line.trim();
        let w = words(line);
        match w.first().map(String::as_str) {
            Some("-P") => {
                if let (Some(c), Some(p)) = (w.get(1), w.get(2)) {
                    t.policies.insert(c.clone(), p.clone());
                    t.chains.push(c.clone());
                }
            }
            Some("-N") => {
                if let Some(c) = w.get(1) {
                    t.chains.push(c.clone());
                }
            }
            Some("-A") => {
                if let Some(r) = parse_rule(line, &w) {
                    t.rules.entry(r.chain.clone()).or_default().push(r);
                }
            }
            _ => {}
        }
    }
    t
}

/// How much of the pod traffic a rule's matches select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    All,
    Part,
    None,
    Unknown,
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn reach(conds: &[Cond], network: IpNet) -> Reach {
    let mut r = Reach::All;
    for c in conds {
        let one = match c {
            Cond::Src { net, negated } | Cond::Dst { net, negated } => {
                let covers = net.contains(&network);
                let overlap = overlaps(*net, network);
                match (negated, covers, overlap) {
                    (false, true, _) | (true, _, false) => Reach::All,
                    (false, _, false) | (true, true, _) => Reach::None,
                    _ => Reach::Part,
                }
            }
            Cond::Other => Reach::Unknown,
        };
        r = match (r, one) {
            (Reach::None, _) | (_, Reach::None) => Reach::None,
            (Reach::Unknown, _) | (_, Reach::Unknown) => Reach::Unknown,
            (Reach::Part, _) | (_, Reach::Part) => Reach::Part,
            _ => Reach::All,
        };
    }
    r
}

/// What happens to pod traffic in FORWARD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardVerdict {
    /// This rule accepts all of it.
    Accepted(String),
    /// This rule rejects or drops it (`partial`: only part of it, e.g. one subnet).
    Rejected {
        /// The rule as listed.
        rule: String,
        /// Only some pod traffic matches.
        partial: bool,
    },
    /// No rule decides; the chain policy does.
    Policy(String),
}

#[derive(Debug)]
enum Walk {
    Accepted(String),
    Rejected(String, bool),
    Return,
}

fn walk(t: &FilterTable, chain: &str, network: IpNet, partial: bool, depth: u32) -> Walk {
    let Some(rules) = t.rules.get(chain) else {
        return Walk::Return;
    };
    for r in rules {
        let part = match reach(&r.conds, network) {
            Reach::None | Reach::Unknown => continue,
            Reach::Part => true,
            Reach::All => partial,
        };
        let Some(target) = r.target.as_deref() else {
            continue;
        };
        match target {
            "ACCEPT" if !part => return Walk::Accepted(r.text.clone()),
            "REJECT" | "DROP" => return Walk::Rejected(r.text.clone(), part),
            "RETURN" if !part => return Walk::Return,
            user if t.rules.contains_key(user) && depth < 16 => {
                match walk(t, user, network, part, depth + 1) {
                    Walk::Return if r.goto && !part => return Walk::Return,
                    Walk::Return => {}
                    decided => return decided,
                }
            }
            _ => {}
        }
    }
    Walk::Return
}

/// Follows FORWARD (and the chains it jumps to) for pod traffic inside `network`.
pub fn forward_verdict(t: &FilterTable, network: IpNet) -> ForwardVerdict {
    match walk(t, "FORWARD", network, false, 0) {
        Walk::Accepted(rule) => ForwardVerdict::Accepted(rule),
        Walk::Rejected(rule, partial) => ForwardVerdict::Rejected { rule, partial },
        Walk::Return => ForwardVerdict::Policy(
            t.policies
                .get("FORWARD")
                .cloned()
                .unwrap_or_else(|| "ACCEPT".to_owned()),
        ),
    }
}

/// Chains firewalld (iptables backend) creates in the filter table.
const FIREWALLD_CHAINS: &[&str] = &[
    "FORWARD_IN_ZONES",
    "FORWARD_OUT_ZONES",
    "FORWARD_direct",
    "INPUT_ZONES",
    "INPUT_direct",
    "OUTPUT_direct",
];

/// Which host firewall manages the filter table, from its chain names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFirewall {
    /// firewalld chains present.
    pub firewalld: Vec<String>,
    /// ufw chains present.
    pub ufw: Vec<String>,
}

/// Finds firewalld and ufw chains.
pub fn host_firewall(t: &FilterTable) -> HostFirewall {
    let mut hf = HostFirewall::default();
    for c in &t.chains {
        if FIREWALLD_CHAINS.contains(&c.as_str()) {
            hf.firewalld.push(c.clone());
        } else if c.starts_with("ufw-") || c.starts_with("ufw6-") {
            hf.ufw.push(c.clone());
        }
    }
    hf
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "10.244.0.0/16";

    fn net() -> IpNet {
        N.parse().expect("net")
    }

    /// ip6tables lists the same rules with v6 prefixes; a reject above flannel's accepts is
    /// found the same way, and v4 matches never select v6 pod traffic.
    #[test]
    fn ip6tables_forward() {
        let n6: IpNet = "2001:db8:42::/56".parse().expect("net");
        let flannel6 = FLANNEL.replace("10.244.0.0/16", "2001:db8:42::/56");
        let ok = table("-P FORWARD DROP", &flannel6);
        assert!(matches!(
            forward_verdict(&ok, n6),
            ForwardVerdict::Accepted(_)
        ));
        let bad = table(
            "-P FORWARD ACCEPT",
            &format!("-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited\n{flannel6}"),
        );
        assert_eq!(
            forward_verdict(&bad, n6),
            ForwardVerdict::Rejected {
                rule: "-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited".into(),
                partial: false
            }
        );
        let one_subnet = table(
            "-P FORWARD ACCEPT",
            &format!("-A FORWARD -d 2001:db8:42:7::/64 -j DROP\n{flannel6}"),
        );
        assert!(matches!(
            forward_verdict(&one_subnet, n6),
            ForwardVerdict::Rejected { partial: true, .. }
        ));
        // A v4 accept does not accept v6 traffic; the v6 policy decides.
        assert_eq!(
            forward_verdict(&table("-P FORWARD DROP", FLANNEL), n6),
            ForwardVerdict::Policy("DROP".into())
        );
    }

    /// flannel's forward rules (compat §9.1) as `iptables -S` lists them.
    const FLANNEL: &str = "-N FLANNEL-FWD\n\
        -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
        -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
        -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n";

    fn table(head: &str, body: &str) -> FilterTable {
        parse_filter(&format!(
            "-P INPUT ACCEPT\n{head}\n-P OUTPUT ACCEPT\n{body}"
        ))
    }

    #[test]
    fn words_follow_iptables_quoting() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a \"b\" c" -j ACCEPT"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "ACCEPT"
            ]
        );
        assert_eq!(words(r#"--comment """#), ["--comment", ""]);
    }

    #[test]
    fn flannel_rules_accept() {
        let t = table("-P FORWARD DROP", FLANNEL);
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Accepted(
                "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
                    .into()
            )
        );
    }

    #[test]
    fn p3_reject_ahead_of_flannel_fails() {
        // `iptables -I FORWARD 1 -j REJECT --reject-with icmp-host-prohibited`
        let reject = "-A FORWARD -j REJECT --reject-with icmp-host-prohibited";
        let t = table("-P FORWARD ACCEPT", &format!("{reject}\n{FLANNEL}"));
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Rejected {
                rule: reject.into(),
                partial: false
            }
        );
        // The same rule after flannel's accepts (as firewalld/RHEL place it) is harmless.
        let t = table("-P FORWARD ACCEPT", &format!("{FLANNEL}{reject}\n"));
        assert!(matches!(
            forward_verdict(&t, net()),
            ForwardVerdict::Accepted(_)
        ));
    }

    #[test]
    fn address_scoped_rules() {
        // A DROP for one pod subnet rejects part of the pod traffic.
        let t = table(
            "-P FORWARD ACCEPT",
            &format!("-A FORWARD -d 10.244.3.0/24 -j DROP\n{FLANNEL}"),
        );
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Rejected {
                rule: "-A FORWARD -d 10.244.3.0/24 -j DROP".into(),
                partial: true
            }
        );
        // Rules about other networks, negations excluding the pods, or with matches we
        // cannot evaluate do not count.
        let body = "-A FORWARD -s 192.168.0.0/16 -j REJECT --reject-with icmp-port-unreachable\n\
            -A FORWARD ! -d 10.0.0.0/8 -j DROP\n\
            -A FORWARD -m conntrack --ctstate INVALID -j DROP\n\
            -A FORWARD -i eth1 -o eth0 -j DROP\n\
            -A FORWARD -p tcp -m tcp --dport 22 -j DROP\n";
        let t = table("-P FORWARD ACCEPT", &format!("{body}{FLANNEL}"));
        assert!(
            matches!(forward_verdict(&t, net()), ForwardVerdict::Accepted(_)),
            "{:?}",
            forward_verdict(&t, net())
        );
        // ! -s outside Network matches all pod traffic.
        let t = table(
            "-P FORWARD ACCEPT",
            "-A FORWARD ! -s 172.16.0.0/12 -j DROP\n",
        );
        assert!(matches!(
            forward_verdict(&t, net()),
            ForwardVerdict::Rejected { partial: false, .. }
        ));
        // A partial accept does not protect the rest.
        let t = table(
            "-P FORWARD ACCEPT",
            "-A FORWARD -s 10.244.1.0/24 -j ACCEPT\n-A FORWARD -j DROP\n",
        );
        assert!(matches!(
            forward_verdict(&t, net()),
            ForwardVerdict::Rejected { partial: false, .. }
        ));
    }

    #[test]
    fn policy_and_docker_chains() {
        // Docker sets policy DROP; without flannel's accepts pod traffic dies there.
        let docker = "-N DOCKER\n-N DOCKER-USER\n\
            -A FORWARD -j DOCKER-USER\n\
            -A FORWARD -o docker0 -j DOCKER\n\
            -A DOCKER-USER -j RETURN\n";
        let t = table("-P FORWARD DROP", docker);
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Policy("DROP".into())
        );
        let t = table("-P FORWARD DROP", &format!("{docker}{FLANNEL}"));
        assert!(matches!(
            forward_verdict(&t, net()),
            ForwardVerdict::Accepted(_)
        ));
        let t = table("-P FORWARD ACCEPT", "");
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Policy("ACCEPT".into())
        );
        // A reject inside a jumped-to chain is found and quoted.
        let t = table(
            "-P FORWARD ACCEPT",
            &format!("-N FW\n-A FORWARD -j FW\n-A FW -j REJECT --reject-with icmp-host-prohibited\n{FLANNEL}"),
        );
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Rejected {
                rule: "-A FW -j REJECT --reject-with icmp-host-prohibited".into(),
                partial: false
            }
        );
        // Jump loops are bounded.
        let t = table("-P FORWARD ACCEPT", "-N A\n-A FORWARD -j A\n-A A -j A\n");
        assert_eq!(
            forward_verdict(&t, net()),
            ForwardVerdict::Policy("ACCEPT".into())
        );
    }

    #[test]
    fn firewalld_and_ufw_chains() {
        let t = table(
            "-P FORWARD ACCEPT",
            "-N FORWARD_IN_ZONES\n-N FORWARD_OUT_ZONES\n-N FORWARD_direct\n-N FWDI_public\n",
        );
        let hf = host_firewall(&t);
        assert_eq!(
            hf.firewalld,
            ["FORWARD_IN_ZONES", "FORWARD_OUT_ZONES", "FORWARD_direct"]
        );
        assert!(hf.ufw.is_empty());
        let t = table(
            "-P FORWARD DROP",
            "-N ufw-before-forward\n-N ufw-user-forward\n",
        );
        assert_eq!(
            host_firewall(&t).ufw,
            ["ufw-before-forward", "ufw-user-forward"]
        );
        assert_eq!(
            host_firewall(&table("-P FORWARD ACCEPT", FLANNEL)),
            HostFirewall::default()
        );
    }
}
