//! Decisions about the node's set-up around flanneld (pure, like [`super::checks`]): the CNI
//! plugins and config the kubelet uses, br_netfilter, who owns the VXLAN port.

use std::path::Path;

use super::report::{ids, Finding, Status};
use crate::io::procfs::BRIDGE_NF_CALL_IPTABLES;

/// The CNI plugins flannel's config chain needs: `flannel` delegates to `bridge` with
/// `host-local` IPAM, and kube-flannel.yml's conflist adds `portmap`.
pub const CNI_PLUGINS: [&str; 4] = ["flannel", "bridge", "portmap", "host-local"];

/// One plugin file as found in the CNI bin dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginFile {
    /// A regular file with an execute bit.
    Executable,
    /// Present but not executable (or not a regular file).
    NotExecutable,
    /// Not there.
    Missing,
}

/// `cni-plugin`: every plugin of [`CNI_PLUGINS`] is an executable file in `dir`.
pub fn cni_plugins(dir: &Path, found: &[(&str, PluginFile)]) -> Finding {
    let id = ids::CNI_PLUGIN;
    let d = dir.display();
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, f)| *f == PluginFile::Missing)
        .map(|(n, _)| *n)
        .collect();
    let not_exec: Vec<&str> = found
        .iter()
        .filter(|(_, f)| *f == PluginFile::NotExecutable)
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() && not_exec.is_empty() {
        let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
        return Finding::new(
            Status::Pass,
            id,
            format!("{} present and executable in {d}", names.join(", ")),
        );
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("{} missing", missing.join(", ")));
    }
    if !not_exec.is_empty() {
        problems.push(format!("{} not executable", not_exec.join(", ")));
    }
    let mut f = Finding::new(
        Status::Fail,
        id,
        format!(
            "CNI plugins in {d}: {}: pods on this node fail to start with `failed to find plugin \"{}\"`",
            problems.join("; "),
            missing.first().or(not_exec.first()).copied().unwrap_or("flannel")
        ),
    );
    if missing.contains(&"flannel") {
        f = f.fix(format!("install the flannel CNI plugin: kube-flannel.yml's install-cni-plugin init container copies it to {d}/flannel (kubectl -n kube-flannel logs <flannel pod> -c install-cni-plugin), or download it from github.com/flannel-io/cni-plugin releases"));
    }
    if missing.iter().any(|n| *n != "flannel") {
        f = f.fix(format!("install the reference plugins (bridge, portmap, host-local) into {d}: the kubernetes-cni / containernetworking-plugins package, or github.com/containernetworking/plugins releases"));
    }
    if !not_exec.is_empty() {
        let paths: Vec<String> = not_exec.iter().map(|n| format!("{d}/{n}")).collect();
        f = f.fix(format!("chmod 755 {}", paths.join(" ")));
    }
    f
}

/// The file extensions libcni loads network configs from.
pub fn is_cni_config_name(name: &str) -> bool {
    [".conf", ".conflist", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// What one config file says (decided from its text by [`classify_config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigKind {
    /// Parses, and a plugin of its chain is `flannel`.
    Flannel,
    /// Parses, and names these plugin types (another network's config).
    Other(Vec<String>),
    /// Does not parse (or has no plugin type): the reason.
    Invalid(String),
}

/// Reads a `.conflist` (`plugins[].type`) or a single-plugin `.conf` (`type`).
pub fn classify_config(text: &str) -> ConfigKind {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return ConfigKind::Invalid(format!("not valid JSON: {e}")),
    };
    let types: Vec<String> = match v.get("plugins") {
        Some(serde_json::Value::Array(plugins)) => plugins
            .iter()
            .filter_map(|p| p.get("type").and_then(|t| t.as_str()).map(str::to_owned))
            .collect(),
        Some(_) => return ConfigKind::Invalid("\"plugins\" is not a list".into()),
        None => v
            .get("type")
            .and_then(|t| t.as_str())
            .map(|t| vec![t.to_owned()])
            .unwrap_or_default(),
    };
    if types.is_empty() {
        ConfigKind::Invalid("no plugin \"type\" in it".into())
    } else if types.iter().any(|t| t == "flannel") {
        ConfigKind::Flannel
    } else {
        ConfigKind::Other(types)
    }
}

/// `cni-config`: `files` are the config files of `dir` (name, kind) in any order; the kubelet
/// (libcni) uses the lexically first one, which must be a valid flannel config. `Err`: the
/// directory could not be read.
pub fn cni_config(dir: &Path, files: Result<&[(String, ConfigKind)], &str>) -> Finding {
    let id = ids::CNI_CONFIG;
    let d = dir.display();
    let install = "kube-flannel.yml's install-cni init container writes 10-flannel.conflist from the kube-flannel-cfg ConfigMap (cni-conf.json): check that it ran (kubectl -n kube-flannel logs <flannel pod> -c install-cni), then restart the flannel pod";
    let files = match files {
        Ok(f) => f,
        Err(e) => {
            return Finding::new(Status::Fail, id, format!("cannot read {d}: {e}")).fix(install)
        }
    };
    let mut sorted: Vec<&(String, ConfigKind)> = files
        .iter()
        .filter(|(n, _)| is_cni_config_name(n))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let Some((first, kind)) = sorted.first() else {
        return Finding::new(
            Status::Fail,
            id,
            format!("no CNI config (.conf, .conflist, .json) in {d}: the kubelet reports the network plugin not ready and no pod starts"),
        )
        .fix(install);
    };
    let flannel = sorted
        .iter()
        .find(|(_, k)| *k == ConfigKind::Flannel)
        .map(|(n, _)| n.as_str());
    match kind {
        ConfigKind::Flannel => Finding::new(
            Status::Pass,
            id,
            format!("{d}/{first} is a flannel config and the first the kubelet reads"),
        ),
        ConfigKind::Invalid(why) if first.contains("flannel") || flannel.is_none() => {
            Finding::new(
                Status::Fail,
                id,
                format!("{d}/{first}, the first config the kubelet reads, does not parse: {why}"),
            )
            .fix(format!("rewrite it: delete {d}/{first} and let the install-cni init container write it again (restart the flannel pod)"))
        }
        other => {
            let what = match other {
                ConfigKind::Other(types) => format!("a config for {}", types.join(" + ")),
                ConfigKind::Invalid(why) => format!("invalid ({why})"),
                ConfigKind::Flannel => unreachable_flannel(),
            };
            match flannel {
                Some(f) => Finding::new(
                    Status::Fail,
                    id,
                    format!("the kubelet uses {d}/{first} ({what}), which sorts before flannel's {f}: pods get that network, not flannel's"),
                )
                .fix(format!("remove {d}/{first} if it is left over from another network plugin, or rename flannel's config to sort first (e.g. 00-flannel.conflist)")),
                None => Finding::new(
                    Status::Fail,
                    id,
                    format!("no flannel config in {d}; the kubelet uses {first} ({what})"),
                )
                .fix(install),
            }
        }
    }
}

/// Not reachable: the first arm of the match takes flannel configs. Kept as text rather than a
/// panic (no panics reachable from files on the node).
fn unreachable_flannel() -> String {
    "a flannel config".into()
}

/// `br-netfilter`: `/proc/sys/net/bridge/bridge-nf-call-iptables` (its contents, or why it
/// could not be read). flannel ≥ 0.26 refuses to start when the file does not exist (outside
/// nftables mode): without br_netfilter, traffic between pods on one bridge skips iptables,
/// so kube-proxy's Service rules miss it.
pub fn br_netfilter(raw: Result<&str, &str>) -> Finding {
    let id = ids::BR_NETFILTER;
    match raw.map(|r| r.trim().parse::<i64>().ok()) {
        Err(e) => Finding::new(
            Status::Fail,
            id,
            format!("{BRIDGE_NF_CALL_IPTABLES} is missing ({e}): br_netfilter is not loaded, so Services break for pods on the same node (upstream flannel refuses to start: \"Failed to check br_netfilter\")"),
        )
        .fix("modprobe br_netfilter, and load it at boot: echo br_netfilter > /etc/modules-load.d/br_netfilter.conf"),
        Ok(Some(1)) => Finding::new(Status::Pass, id, "net.bridge.bridge-nf-call-iptables = 1"),
        Ok(v) => Finding::new(
            Status::Fail,
            id,
            format!(
                "net.bridge.bridge-nf-call-iptables = {}: bridged pod traffic skips iptables, so Services break for pods on the same node",
                v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
            ),
        )
        .fix("sysctl -w net.bridge.bridge-nf-call-iptables=1, and persist it in /etc/sysctl.d/ (e.g. 99-kubernetes.conf), then sysctl --system"),
    }
}

/// A UDP socket bound to the VXLAN port, from `/proc/net/udp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSocket {
    /// Socket inode (0: a kernel socket, e.g. a vxlan device's).
    pub inode: u64,
    /// The process holding it (pid, comm), when found in `/proc/*/fd`.
    pub owner: Option<(u32, String)>,
}

/// `vxlan-port`: nothing but this node's flanneld (userspace) or its `flannel.<VNI>` (and,
/// with IPv6, `flannel-v6.<VNI>`) device (kernel), `own_devices`, owns UDP `port`. `devices` are the namespace's vxlan devices (name, dst port);
/// `sockets` the UDP sockets bound to `port` (a socket no process holds is a vxlan device's
/// kernel socket when such a device exists, else reported as unknown).
pub fn vxlan_port(
    port: u16,
    own_devices: &[String],
    userspace: bool,
    devices: &[(String, u16)],
    sockets: &[UdpSocket],
) -> Finding {
    let id = ids::VXLAN_PORT;
    let mut foreign = Vec::new();
    let mut fixes = Vec::new();
    for (name, _) in devices.iter().filter(|(_, p)| *p == port) {
        if !userspace && own_devices.contains(name) {
            continue;
        }
        foreign.push(format!("vxlan device {name} (dstport {port})"));
        fixes.push(format!(
            "ip link del {name} (or move it to another port), then restart flanneld"
        ));
    }
    for s in sockets.iter().filter(|s| s.inode != 0) {
        match &s.owner {
            Some((_, comm)) if userspace && comm == "flanneld" => {}
            Some((pid, comm)) => {
                foreign.push(format!("process {comm} (pid {pid}) has UDP {port} open"));
                fixes.push(format!("stop {comm} (pid {pid}) or move it off UDP {port}; or set Backend.Port in net-conf.json on every node"));
            }
            // A vxlan device's socket is the kernel's: no process holds it. The devices on
            // the port are judged above.
            None if devices.iter().any(|(_, p)| *p == port) => {}
            None => {
                foreign.push(format!(
                    "a UDP socket (inode {}) of an unknown process is bound to {port}",
                    s.inode
                ));
                fixes.push(format!("find it with ss -ulpn 'sport = :{port}' and stop it, or set Backend.Port on every node"));
            }
        }
    }
    if foreign.is_empty() {
        let owner = if userspace {
            "flanneld's userspace socket".to_owned()
        } else {
            own_devices.join(" and ")
        };
        return Finding::new(
            Status::Pass,
            id,
            format!("UDP {port} is used by {owner} only"),
        );
    }
    let mut f = Finding::new(
        Status::Fail,
        id,
        format!(
            "UDP {port} (VXLAN) is also owned by {}: it competes with flanneld for the VXLAN packets of peers",
            foreign.join(", ")
        ),
    );
    fixes.dedup();
    for fix in fixes {
        f = f.fix(fix);
    }
    f
}

/// `mtu`: `answered_at_mtu` pairs each peer label that answers small echoes with whether it
/// also answered a Don't-Fragment echo of the overlay MTU (`overlay_mtu`, subnet.env's
/// FLANNEL_MTU); `overhead` is what the backend adds on the underlay (VXLAN 50, host-gw 0).
pub fn mtu(overlay_mtu: Option<u32>, overhead: u32, answered_at_mtu: &[(String, bool)]) -> Finding {
    let id = ids::MTU;
    let Some(m) = overlay_mtu else {
        return Finding::new(
            Status::Skip,
            id,
            "subnet.env has no FLANNEL_MTU to probe with",
        );
    };
    if answered_at_mtu.is_empty() {
        return Finding::new(
            Status::Skip,
            id,
            "no peer answers ICMP echo: nothing to probe the MTU with",
        );
    }
    let under = m + overhead;
    let short: Vec<&str> = answered_at_mtu
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(label, _)| label.as_str())
        .collect();
    if short.is_empty() {
        return Finding::new(
            Status::Pass,
            id,
            format!(
                "{} peer(s) answer Don't-Fragment echoes of the overlay MTU {m} ({under} bytes on the underlay)",
                answered_at_mtu.len()
            ),
        );
    }
    Finding::new(
        Status::Fail,
        id,
        format!(
            "Don't-Fragment echoes of the overlay MTU {m} ({under} bytes on the underlay) are lost to {}, smaller ones arrive: the underlay path MTU is below {under}, so full-size pod packets (TCP bulk transfers, TLS handshakes) hang",
            short.join(", ")
        ),
    )
    .fix(format!("set \"MTU\" in net-conf.json's Backend to the smallest underlay MTU between the nodes (pods get it minus {overhead}), restart flanneld on every node and recreate the pods; or raise the underlay MTU on the path to {under}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(f: &Finding) -> Status {
        f.status
    }

    fn text(f: &Finding) -> String {
        crate::doctor::report::render(std::slice::from_ref(f))
    }

    #[test]
    fn cni_plugins_named_with_fixes() {
        let dir = Path::new("/opt/cni/bin");
        let all: Vec<(&str, PluginFile)> = CNI_PLUGINS
            .iter()
            .map(|n| (*n, PluginFile::Executable))
            .collect();
        assert_eq!(status(&cni_plugins(dir, &all)), Status::Pass);
        let mut broken = all.clone();
        broken[0].1 = PluginFile::Missing;
        broken[2].1 = PluginFile::NotExecutable;
        let f = cni_plugins(dir, &broken);
        assert_eq!(status(&f), Status::Fail);
        let t = text(&f);
        assert!(t.contains("flannel missing; portmap not executable"), "{t}");
        assert!(t.contains("failed to find plugin \"flannel\""), "{t}");
        assert!(t.contains("install-cni-plugin"), "{t}");
        assert!(t.contains("chmod 755 /opt/cni/bin/portmap"), "{t}");
        let mut no_bridge = all;
        no_bridge[1].1 = PluginFile::Missing;
        let t = text(&cni_plugins(dir, &no_bridge));
        assert!(t.contains("containernetworking"), "{t}");
        assert!(!t.contains("install-cni-plugin"), "{t}");
    }

    const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn classify() {
        assert_eq!(classify_config(FLANNEL), ConfigKind::Flannel);
        assert_eq!(
            classify_config(r#"{"type":"flannel","name":"x"}"#),
            ConfigKind::Flannel
        );
        assert_eq!(
            classify_config(r#"{"plugins":[{"type":"calico"},{"type":"bandwidth"}]}"#),
            ConfigKind::Other(vec!["calico".into(), "bandwidth".into()])
        );
        assert!(matches!(classify_config("{"), ConfigKind::Invalid(_)));
        assert!(matches!(classify_config("{}"), ConfigKind::Invalid(_)));
        assert!(matches!(
            classify_config(r#"{"plugins":{}}"#),
            ConfigKind::Invalid(_)
        ));
    }

    #[test]
    fn cni_config_first_file_wins() {
        let dir = Path::new("/etc/cni/net.d");
        let ok = vec![
            ("10-flannel.conflist".to_owned(), ConfigKind::Flannel),
            (
                "99-loopback.conf".to_owned(),
                ConfigKind::Other(vec!["loopback".into()]),
            ),
            ("00-notes.txt".to_owned(), ConfigKind::Invalid("x".into())),
        ];
        assert_eq!(status(&cni_config(dir, Ok(&ok))), Status::Pass);

        let shadowed = vec![
            ("10-flannel.conflist".to_owned(), ConfigKind::Flannel),
            (
                "05-calico.conflist".to_owned(),
                ConfigKind::Other(vec!["calico".into()]),
            ),
        ];
        let f = cni_config(dir, Ok(&shadowed));
        assert_eq!(status(&f), Status::Fail);
        let t = text(&f);
        assert!(t.contains("05-calico.conflist (a config for calico), which sorts before flannel's 10-flannel.conflist"), "{t}");
        assert!(
            t.contains("remove /etc/cni/net.d/05-calico.conflist"),
            "{t}"
        );

        let broken = vec![(
            "10-flannel.conflist".to_owned(),
            ConfigKind::Invalid("not valid JSON".into()),
        )];
        let t = text(&cni_config(dir, Ok(&broken)));
        assert!(t.contains("does not parse: not valid JSON"), "{t}");

        let none: Vec<(String, ConfigKind)> = vec![];
        let t = text(&cni_config(dir, Ok(&none)));
        assert!(t.starts_with("FAIL cni-config: no CNI config"), "{t}");
        assert!(t.contains("install-cni"), "{t}");

        let other = vec![(
            "10-bridge.conf".to_owned(),
            ConfigKind::Other(vec!["bridge".into()]),
        )];
        let t = text(&cni_config(dir, Ok(&other)));
        assert!(t.contains("no flannel config in /etc/cni/net.d"), "{t}");

        let t = text(&cni_config(dir, Err("No such file or directory")));
        assert!(t.contains("cannot read /etc/cni/net.d"), "{t}");
    }

    #[test]
    fn mtu_verdicts() {
        assert_eq!(status(&mtu(None, 50, &[])), Status::Skip);
        assert_eq!(status(&mtu(Some(1450), 50, &[])), Status::Skip);
        let ok = vec![("peer a".to_owned(), true), ("peer b".to_owned(), true)];
        let f = mtu(Some(1450), 50, &ok);
        assert_eq!(status(&f), Status::Pass);
        assert!(
            text(&f).contains("overlay MTU 1450 (1500 bytes on the underlay)"),
            "{}",
            text(&f)
        );
        let bad = vec![("peer a".to_owned(), true), ("peer b".to_owned(), false)];
        let f = mtu(Some(1450), 50, &bad);
        assert_eq!(status(&f), Status::Fail);
        let t = text(&f);
        assert!(t.contains("are lost to peer b, smaller ones arrive"), "{t}");
        assert!(!t.contains("peer a"), "{t}");
        assert!(t.contains("fix: set \"MTU\" in net-conf.json"), "{t}");
    }

    #[test]
    fn br_netfilter_verdicts() {
        assert_eq!(status(&br_netfilter(Ok("1\n"))), Status::Pass);
        let f = br_netfilter(Ok("0\n"));
        assert_eq!(status(&f), Status::Fail);
        assert!(text(&f).contains("sysctl -w net.bridge.bridge-nf-call-iptables=1"));
        let f = br_netfilter(Err("No such file or directory"));
        assert_eq!(status(&f), Status::Fail);
        assert!(text(&f).contains("modprobe br_netfilter"));
    }

    #[test]
    fn vxlan_port_owners() {
        let ours = UdpSocket {
            inode: 7,
            owner: Some((100, "flanneld".into())),
        };
        let kernel = UdpSocket {
            inode: 333,
            owner: None,
        };
        let other = UdpSocket {
            inode: 9,
            owner: Some((200, "socat".into())),
        };
        let dev = |name: &str, port| vec![(name.to_owned(), port)];
        let own = dev("flannel.1", 8472);
        // (case, userspace, vxlan devices, sockets on 8472, verdict, what it says)
        let cases = [
            (
                "userspace: only our socket",
                true,
                vec![],
                vec![ours.clone()],
                Status::Pass,
                &[][..],
            ),
            (
                "kernel mode: our device's socket",
                false,
                own.clone(),
                vec![kernel.clone()],
                Status::Pass,
                &[],
            ),
            (
                "userspace with a kernel vxlan device on the port",
                true,
                dev("vx0", 8472),
                vec![ours.clone(), kernel.clone()],
                Status::Fail,
                &["vxlan device vx0 (dstport 8472)", "ip link del vx0"],
            ),
            (
                "a foreign process",
                false,
                own.clone(),
                vec![other],
                Status::Fail,
                &["process socat (pid 200) has UDP 8472 open"],
            ),
            // Our kernel mode binds nothing: there even a flanneld socket is not ours.
            (
                "kernel mode: flanneld's socket",
                false,
                own,
                vec![ours.clone()],
                Status::Fail,
                &[],
            ),
            (
                "a socket nobody holds, no vxlan device to explain it",
                true,
                vec![],
                vec![ours, kernel],
                Status::Fail,
                &["a UDP socket (inode 333) of an unknown process"],
            ),
            (
                "other ports do not matter",
                true,
                dev("vx0", 4789),
                vec![],
                Status::Pass,
                &[],
            ),
        ];
        for (case, userspace, devices, sockets, verdict, says) in cases {
            let f = vxlan_port(8472, &["flannel.1".into()], userspace, &devices, &sockets);
            assert_eq!(status(&f), verdict, "{case}");
            for words in says {
                assert!(text(&f).contains(words), "{case}: {}", text(&f));
            }
        }
        // Dual-stack kernel mode: flannel.1 and flannel-v6.1 share the port.
        let both = [
            ("flannel.1".to_owned(), 8472),
            ("flannel-v6.1".to_owned(), 8472),
        ];
        let own = ["flannel.1".to_owned(), "flannel-v6.1".to_owned()];
        let f = vxlan_port(8472, &own, false, &both, &[]);
        assert_eq!(status(&f), Status::Pass, "{}", text(&f));
        assert!(
            text(&f).contains("used by flannel.1 and flannel-v6.1 only"),
            "{}",
            text(&f)
        );
        let f = vxlan_port(8472, &own[..1], false, &both, &[]);
        assert!(
            text(&f).contains("vxlan device flannel-v6.1"),
            "{}",
            text(&f)
        );
    }
}
