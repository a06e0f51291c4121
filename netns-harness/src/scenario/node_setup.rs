//! Issue #11: the node set-up around flanneld that doctor checks, broken and repaired one piece at a time.

use anyhow::Result;

use crate::cluster::{Cluster, NodeKind};
use crate::cmd;
use crate::doctor::Level;

use super::{
    expect_matrix_pass, fails_only, fails_only_these, first_of, no_fail, Phase, ScenarioOpts,
};

pub(super) fn node_setup(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let u = first_of(c, NodeKind::Userspace)?;
    let k = first_of(c, NodeKind::Kernel)?;
    let (bin, conf) = c.cni_dirs(&u)?;
    // The MTU is checked per family: `mtu` for IPv4 peers, `mtu-v6` for IPv6 ones, each
    // naming the kernel node's subnet of its family when it fails.
    let (family, node) = (opts.ip_family, c.node(&k));
    let mtu_named: Vec<(&str, String)> = [
        (
            family.has_v4(),
            "mtu",
            node.and_then(|n| n.subnet).map(|s| s.to_string()),
        ),
        (
            family.has_v6(),
            "mtu-v6",
            node.and_then(|n| n.subnet6).map(|s| s.to_string()),
        ),
    ]
    .into_iter()
    .filter_map(|(on, id, s)| on.then(|| (id, s.unwrap_or_default())))
    .collect();
    let mut ids = vec!["cni-plugin", "cni-config", "br-netfilter", "vxlan-port"];
    ids.extend(mtu_named.iter().map(|(id, _)| *id));
    let mut phases = Vec::new();

    let mut p = Phase::new(
        "baseline",
        "healthy cluster, CNI dirs as kube-flannel.yml installs them",
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    for node in [&u, &k] {
        p.expect_doctor(c, node, &format!("PASS {}; no FAIL", ids.join(", ")), |r| {
            ids.iter().all(|id| r.has(Level::Pass, id)) && no_fail(r)
        });
    }
    phases.push(p);

    let mut p = Phase::new(
        "cni-plugin",
        format!("{}/portmap removed on {u}", bin.display()),
    );
    let aside = bin.join("portmap.aside");
    std::fs::rename(bin.join("portmap"), &aside)?;
    p.expect_doctor(c, &u, "FAIL cni-plugin naming portmap", |r| {
        fails_only(r, "cni-plugin", "portmap missing")
    });
    std::fs::rename(&aside, bin.join("portmap"))?;
    p.expect_doctor(c, &u, "restored: PASS cni-plugin", |r| {
        r.has(Level::Pass, "cni-plugin")
    });
    phases.push(p);

    let mut p = Phase::new(
        "cni-config",
        format!("05-calico.conflist added to {} on {u}", conf.display()),
    );
    let calico = conf.join("05-calico.conflist");
    std::fs::write(
        &calico,
        r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"}]}"#,
    )?;
    p.expect_doctor(c, &u, "FAIL cni-config naming the calico file", |r| {
        fails_only(r, "cni-config", "05-calico.conflist")
    });
    std::fs::remove_file(&calico)?;
    p.expect_doctor(c, &u, "removed: PASS cni-config", |r| {
        r.has(Level::Pass, "cni-config")
    });
    phases.push(p);

    let key = "net.bridge.bridge-nf-call-iptables";
    let mut p = Phase::new("br-netfilter", format!("sysctl -w {key}=0 on {u}"));
    let ns = c.resolve_ns(&u)?;
    cmd::sysctl(&ns, key, "0")?;
    p.expect_doctor(c, &u, "FAIL br-netfilter", |r| {
        fails_only(r, "br-netfilter", "= 0")
    });
    cmd::sysctl(&ns, key, "1")?;
    p.expect_doctor(c, &u, "sysctl=1: PASS br-netfilter", |r| {
        r.has(Level::Pass, "br-netfilter")
    });
    phases.push(p);

    let mut p = Phase::new(
        "vxlan-port",
        format!("a second vxlan device vxdoc (VNI 99, dstport 8472) on {k}"),
    );
    c.exec_ok(
        &k,
        &[
            "ip", "link", "add", "vxdoc", "type", "vxlan", "id", "99", "dstport", "8472", "dev",
            "eth0",
        ],
    )?;
    c.exec_ok(&k, &["ip", "link", "set", "vxdoc", "up"])?;
    p.expect_doctor(c, &k, "FAIL vxlan-port naming vxdoc", |r| {
        fails_only(r, "vxlan-port", "vxdoc")
    });
    c.exec_ok(&k, &["ip", "link", "del", "vxdoc"])?;
    p.expect_doctor(c, &k, "deleted: PASS vxlan-port", |r| {
        r.has(Level::Pass, "vxlan-port")
    });
    phases.push(p);

    let mut p = Phase::new(
        "mtu",
        format!(
            "ip link set eth0 mtu 1400 on {k} (IPv4 overlay MTU 1450 + 50, IPv6 1430 + 70 no longer fit)"
        ),
    );
    c.exec_ok(&k, &["ip", "link", "set", "eth0", "mtu", "1400"])?;
    let expected: Vec<(&str, &str)> = mtu_named.iter().map(|(id, s)| (*id, s.as_str())).collect();
    let what = expected
        .iter()
        .map(|(id, s)| format!("FAIL {id} naming {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    p.expect_doctor(c, &u, &format!("{what}; nothing else fails"), |r| {
        fails_only_these(r, &expected)
    });
    c.exec_ok(&k, &["ip", "link", "set", "eth0", "mtu", "1500"])?;
    phases.push(p);

    let mut p = Phase::new("fixed", "everything repaired");
    expect_matrix_pass(&mut p, c, opts.converge);
    for node in [&u, &k] {
        p.expect_doctor(c, node, "no FAIL", no_fail);
    }
    phases.push(p);
    Ok(phases)
}
