//! flannel's iptables rules applied with the real iptables binaries inside a network namespace
//! this test creates (unique per-run name, deleted by a Drop guard). Privileged: run as root
//! (`sudo -E cargo test --test masq`); skipped otherwise unless CI=true.

use flannel_rs::masq::{Iptables, MasqConfig};
use flannel_rs::netlink::IpFamily;
use test_support::netns::Netns;

fn privileged() -> bool {
    test_support::privileged("masq")
}

/// flannel e2e `iptablesNatFlannel`: FLANNEL lines of POSTROUTING, then the chain.
fn nat_flannel(ns: &Netns, bin: &str) -> String {
    let post = ns.exec(&[bin, "-t", "nat", "-S", "POSTROUTING"]);
    let chain = ns.exec(&[bin, "-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    let mut lines: Vec<&str> = post
        .trim_end()
        .lines()
        .filter(|l| l.contains("FLANNEL"))
        .collect();
    lines.extend(chain.trim_end().lines());
    lines.join("\n")
}

/// flannel e2e `iptablesFilterForward`.
fn filter_forward(ns: &Netns, bin: &str) -> String {
    let fwd = ns.exec(&[bin, "-t", "filter", "-S", "FORWARD"]);
    let chain = ns.exec(&[bin, "-t", "filter", "-S", "FLANNEL-FWD"]);
    format!("{}\n{}", fwd.trim_end(), chain.trim_end())
}

/// flannel e2e/rules.go `iptablesPostroutingRules`.
fn golden_postrouting(pod_cidr: &str, network: &str, multicast: &str) -> String {
    [
        r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#.to_owned(),
        "-N FLANNEL-POSTRTG".to_owned(),
        r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
        format!(r#"-A FLANNEL-POSTRTG -s {pod_cidr} -d {network} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG -s {network} -d {pod_cidr} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG ! -s {network} -d {pod_cidr} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG -s {network} ! -d {multicast} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#),
        format!(r#"-A FLANNEL-POSTRTG ! -s {network} -d {network} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#),
    ]
    .join("\n")
}

/// flannel e2e/rules.go `iptablesForwardRules`, without kube-proxy's lines (no kube-proxy
/// runs in the namespace).
fn golden_forward(network: &str) -> String {
    [
        "-P FORWARD ACCEPT".to_owned(),
        r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#.to_owned(),
        "-N FLANNEL-FWD".to_owned(),
        format!(r#"-A FLANNEL-FWD -s {network} -m comment --comment "flanneld forward" -j ACCEPT"#),
        format!(r#"-A FLANNEL-FWD -d {network} -m comment --comment "flanneld forward" -j ACCEPT"#),
    ]
    .join("\n")
}

fn masq_config(network: &str, subnet: &str, random_fully: Option<bool>) -> MasqConfig {
    MasqConfig {
        network: network.parse().unwrap(),
        subnet: subnet.parse().unwrap(),
        random_fully,
    }
}

/// Sets up `cfg`'s masquerade rules in `ns` (and with `forward`, the forward rules), as a
/// daemon starting without a previous subnet does.
fn setup_in(ns: &Netns, family: IpFamily, cfg: MasqConfig, forward: bool) {
    ns.run(move || {
        let ipt = Iptables::detect(family).expect("iptables");
        ipt.setup_masq(&cfg, None).expect("masq");
        if forward {
            ipt.setup_forward(cfg.network).expect("forward");
        }
    });
}

#[test]
fn ipv4_rules_match_flannel_e2e_golden_and_resync_restores() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("v4");
    let cfg = masq_config("10.42.0.0/16", "10.42.1.0/24", None);
    let (masq, fwd) = ns.run(move || {
        let ipt = Iptables::detect(IpFamily::V4).expect("iptables");
        assert!(ipt.supports_random_fully());
        let masq = ipt.setup_masq(&cfg, None).expect("masq");
        let fwd = ipt.setup_forward(cfg.network).expect("forward");
        // Setting up twice (a restart) gives the same text: nothing duplicated.
        ipt.setup_masq(&cfg, Some((cfg.network, cfg.subnet)))
            .expect("masq again");
        ipt.setup_forward(cfg.network).expect("forward again");
        assert!(ipt.rules_present(&masq).unwrap());
        assert!(!ipt.ensure(&fwd).unwrap());
        (masq, fwd)
    });
    let want_nat = golden_postrouting("10.42.1.0/24", "10.42.0.0/16", "224.0.0.0/4");
    let want_fwd = golden_forward("10.42.0.0/16");
    assert_eq!(nat_flannel(&ns, "iptables"), want_nat);
    assert_eq!(filter_forward(&ns, "iptables"), want_fwd);

    // Someone deletes a rule in the middle and the jump: the resync puts the whole set back
    // in order.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-D",
        "FLANNEL-POSTRTG",
        "-s",
        "10.42.0.0/16",
        "-d",
        "10.42.1.0/24",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "RETURN",
    ]);
    ns.exec(&[
        "iptables",
        "-t",
        "filter",
        "-D",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "flanneld forward",
        "-j",
        "FLANNEL-FWD",
    ]);
    assert_ne!(nat_flannel(&ns, "iptables"), want_nat);
    let (a, b) = ns.run(move || {
        let ipt = Iptables::detect(IpFamily::V4).expect("iptables");
        (ipt.ensure(&masq).unwrap(), ipt.ensure(&fwd).unwrap())
    });
    assert!(a && b);
    assert_eq!(nat_flannel(&ns, "iptables"), want_nat);
    assert_eq!(filter_forward(&ns, "iptables"), want_fwd);

    // The whole chain flushed: also restored.
    ns.exec_line("iptables -t nat -F FLANNEL-POSTRTG");
    let cfg2 = cfg;
    ns.run(move || {
        let ipt = Iptables::detect(IpFamily::V4).expect("iptables");
        let rules = flannel_rs::masq::masq_rules(cfg2.network, cfg2.subnet, true);
        assert!(ipt.ensure(&rules).unwrap());
    });
    assert_eq!(nat_flannel(&ns, "iptables"), want_nat);
}

#[test]
fn ipv6_rules_match_flannel_e2e_golden() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("v6");
    let cfg = masq_config("fd42:10:244::/56", "fd42:10:244:1::/64", None);
    setup_in(&ns, IpFamily::V6, cfg, true);
    assert_eq!(
        nat_flannel(&ns, "ip6tables"),
        golden_postrouting("fd42:10:244:1::/64", "fd42:10:244::/56", "ff00::/8")
    );
    assert_eq!(
        filter_forward(&ns, "ip6tables"),
        golden_forward("fd42:10:244::/56")
    );
}

#[test]
fn rules_of_previous_subnet_removed() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("prev");
    let old = masq_config("10.42.0.0/16", "10.42.9.0/24", Some(false));
    let new = masq_config("10.42.0.0/16", "10.42.1.0/24", None);
    setup_in(&ns, IpFamily::V4, old, false);
    ns.run(move || {
        let ipt = Iptables::detect(IpFamily::V4).expect("iptables");
        ipt.setup_masq(&new, Some((old.network, old.subnet)))
            .expect("new");
    });
    let nat = nat_flannel(&ns, "iptables");
    assert!(!nat.contains("10.42.9.0/24"), "{nat}");
    assert_eq!(
        nat,
        golden_postrouting("10.42.1.0/24", "10.42.0.0/16", "224.0.0.0/4")
    );
    let post = ns.exec_line("iptables -t nat -S POSTROUTING");
    assert_eq!(post.matches("FLANNEL-POSTRTG").count(), 1, "{post}");
}

#[test]
fn random_fully_can_be_disabled() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("norand");
    setup_in(
        &ns,
        IpFamily::V4,
        masq_config("10.42.0.0/16", "10.42.1.0/24", Some(false)),
        false,
    );
    assert_eq!(
        nat_flannel(&ns, "iptables"),
        golden_postrouting("10.42.1.0/24", "10.42.0.0/16", "224.0.0.0/4")
            .replace(" --random-fully", "")
    );
}

/// iptables-wrappers' choice made by the daemon: a namespace whose kubelet uses legacy
/// iptables (its hint chain in legacy) gets flannel's rules in legacy, one whose kubelet uses
/// nft gets them in nft, the other backend staying empty; a namespace with no rules at all
/// gets the system's default `iptables`.
#[test]
fn rules_land_in_the_backend_that_holds_the_hosts_rules() {
    if !privileged() {
        return;
    }
    for (tag, hint, used, other) in [
        (
            "legacy",
            Some("iptables-legacy"),
            "iptables-legacy",
            Some("iptables-nft"),
        ),
        (
            "nft",
            Some("iptables-nft"),
            "iptables-nft",
            Some("iptables-legacy"),
        ),
        ("none", None, "iptables", None),
    ] {
        let ns = Netns::new(tag);
        if let Some(h) = hint {
            ns.exec(&[h, "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
        }
        let program = ns.run(|| {
            let ipt = Iptables::detect(IpFamily::V4).expect("iptables");
            ipt.setup_forward("10.42.0.0/16".parse().unwrap())
                .expect("forward");
            ipt.program()
        });
        assert_eq!(program, used, "{tag}");
        let rules = ns.exec(&[used, "-S", "FLANNEL-FWD"]);
        assert!(rules.contains("-s 10.42.0.0/16"), "{used}: {rules}");
        if let Some(other) = other {
            let save = ns.exec(&[&format!("{other}-save")]);
            assert!(!save.contains("FLANNEL"), "{other} got rules too: {save}");
        }
    }
}

/// nftables mode (`masq::Nft`, real `nft`): a table is replaced whole (rules of a previous
/// subnet gone), an unchanged table is left alone, one changed by hand is rewritten, the
/// `fully-random` probe creates nothing; then each mode's clean-up removes the other's rules
/// (iptables chains with their jumps, nftables tables).
#[test]
fn nft_tables_replaced_whole_repaired_and_cleaned_up() {
    use flannel_rs::masq::{flannel_table_script, Nft, NftRules};
    if !privileged() {
        return;
    }
    let ns = Netns::new("nft");
    let rules = |subnet: &str| NftRules {
        family: IpFamily::V4,
        masq: Some((
            "10.42.0.0/16".parse().unwrap(),
            subnet.parse().unwrap(),
            false,
        )),
        forward: Some("10.42.0.0/16".parse().unwrap()),
    };
    let (old, new) = (
        flannel_table_script(&rules("10.42.9.0/24")),
        flannel_table_script(&rules("10.42.1.0/24")),
    );
    let applied = ns.run(move || {
        let nft = Nft::detect().expect("nft");
        assert!(nft.supports_random_fully());
        let mut v = vec![nft.ensure_table("ip", "flannel-ipv4", &old).expect("old")];
        v.push(nft.ensure_table("ip", "flannel-ipv4", &new).expect("new"));
        v.push(nft.ensure_table("ip", "flannel-ipv4", &new).expect("again"));
        v
    });
    assert_eq!(applied, [true, true, false]);
    let table = ns.exec_line("nft list table ip flannel-ipv4");
    assert!(!table.contains("10.42.9.0/24"), "{table}");
    assert!(
        table.contains("\t\tip saddr != 10.42.1.0/24 ip daddr 10.42.0.0/16 return\n"),
        "{table}"
    );
    // The probe was a dry run.
    assert!(!table.contains("masqueradeTest"), "{table}");
    assert_eq!(table.matches("\tchain ").count(), 2, "{table}");

    // A rule deleted by hand: the next check rewrites the table.
    ns.exec_line("nft flush chain ip flannel-ipv4 forward");
    let new2 = flannel_table_script(&rules("10.42.1.0/24"));
    let repaired = ns.run(move || {
        let nft = Nft::detect().expect("nft");
        // A fresh applier has no record of what it wrote: it writes once.
        let first = nft
            .ensure_table("ip", "flannel-ipv4", &new2)
            .expect("ensure");
        let second = nft
            .ensure_table("ip", "flannel-ipv4", &new2)
            .expect("ensure");
        (first, second)
    });
    assert_eq!(repaired, (true, false));
    assert_eq!(ns.exec_line("nft list table ip flannel-ipv4"), table);

    // Clean-up of iptables mode removes flannel's chains and jumps; of nftables mode, tables.
    let cfg = masq_config("10.42.0.0/16", "10.42.1.0/24", None);
    setup_in(&ns, IpFamily::V4, cfg, true);
    let (removed, gone) = ns.run(move || {
        let ipt = Iptables::detect(IpFamily::V4).expect("iptables");
        let removed = ipt.cleanup_flannel_chains().expect("cleanup");
        let gone = Nft::detect().expect("nft").cleanup().expect("nft cleanup");
        (removed, gone)
    });
    assert!(removed);
    assert_eq!(gone, ["ip flannel-ipv4"]);
    for table in ["nat", "filter"] {
        let text = ns.exec(&["iptables", "-t", table, "-S"]);
        assert!(!text.contains("FLANNEL"), "{table}: {text}");
    }
    assert!(!ns.exec_line("nft list tables").contains("flannel"));
}
