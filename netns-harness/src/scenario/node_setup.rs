//! Issue #11: the node set-up around flanneld that doctor checks, broken and repaired one piece at a time.

use anyhow::Result;

use crate::cluster::{Cluster, NodeKind};
use crate::cmd;
use crate::doctor::Level;

use super::{expect_matrix_pass, fails_only, first_of, no_fail, Phase, ScenarioOpts};

pub(super) fn node_setup(c: &mut Cluster, opts: &ScenarioOpts) -> Result<Vec<Phase>> {
    let u = first_of(c, NodeKind::Userspace)?;
    let k = first_of(c, NodeKind::Kernel)?;
    let (bin, conf) = c.cni_dirs(&u)?;
    let ids = [
        "cni-plugin",
        "cni-config",
        "br-netfilter",
        "vxlan-port",
        "mtu",
    ];
    let mut phases = Vec::new();

    let mut p = Phase::new(
        "baseline",
        "healthy cluster, CNI dirs as kube-flannel.yml installs them",
    );
    expect_matrix_pass(&mut p, c, opts.converge);
    for node in [&u, &k] {
        p.expect_doctor(
            c,
            node,
            "PASS cni-plugin, cni-config, br-netfilter, vxlan-port, mtu; no FAIL",
            |r| ids.iter().all(|id| r.has(Level::Pass, id)) && no_fail(r),
        );
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
        format!("ip link set eth0 mtu 1400 on {k} (overlay MTU 1450 + 50 no longer fits)"),
    );
    c.exec_ok(&k, &["ip", "link", "set", "eth0", "mtu", "1400"])?;
    p.expect_doctor(c, &u, &format!("FAIL mtu naming {k}'s subnet"), |r| {
        let subnet = c.node_subnet(&k).map(|s| s.to_string()).unwrap_or_default();
        fails_only(r, "mtu", &subnet)
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
