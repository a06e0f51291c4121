//! The decisions: pure functions from gathered facts to findings, one per check id.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::iptables::{forward_verdict, host_firewall, parse_filter, ForwardVerdict};
use super::report::{ids, Finding, Status};
use crate::backend::reach::{peer_label, unreachable_fixes, ProbeContext};
use crate::backend::Peer;
pub use crate::io::procfs::Process;
use crate::lease::Lease;

/// Parses a boolean-ish sysctl file (`/proc/sys/net/ipv4/ip_forward`): its integer value.
pub fn parse_sysctl(raw: &str) -> Option<i64> {
    raw.trim().parse().ok()
}

/// `ip-forward`: the raw contents of `/proc/sys/net/ipv4/ip_forward`, or why it was unreadable.
pub fn ip_forward(raw: Result<&str, &str>) -> Finding {
    forwarding(ids::IP_FORWARD, "net.ipv4.ip_forward", "ip_forward", raw)
}

/// `ip6-forward` (IPv6 enabled): the raw contents of
/// `/proc/sys/net/ipv6/conf/all/forwarding`, or why it was unreadable.
pub fn ip6_forward(raw: Result<&str, &str>) -> Finding {
    forwarding(
        ids::IP6_FORWARD,
        "net.ipv6.conf.all.forwarding",
        "forwarding",
        raw,
    )
}

/// A forwarding sysctl `key` must be 1; `grep` finds the file that resets it at boot.
fn forwarding(id: &'static str, key: &str, grep: &str, raw: Result<&str, &str>) -> Finding {
    match raw.map(parse_sysctl) {
        Err(e) => Finding::new(Status::Skip, id, format!("cannot read {key}: {e}")),
        Ok(Some(1)) => Finding::new(Status::Pass, id, format!("{key} = 1")),
        Ok(Some(v)) => Finding::new(
            Status::Fail,
            id,
            format!("{key} = {v}: this node does not forward pod traffic"),
        )
        .fix(format!("sysctl -w {key}=1, and find the sysctl file that resets it at boot (grep -r {grep} /etc/sysctl.conf /etc/sysctl.d /usr/lib/sysctl.d /run/sysctl.d), fix it, then sysctl --system")),
        Ok(None) => Finding::new(
            Status::Fail,
            id,
            format!("{key} has an unexpected value {:?}", raw.unwrap_or_default().trim()),
        )
        .fix(format!("sysctl -w {key}=1")),
    }
}

/// What the overlay device looks like (from netlink and ethtool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// `flannel.<VNI>`.
    pub name: String,
    /// VNI the network config asks for.
    pub vni: u32,
    /// The device, if it exists: kind (`vxlan`, `tun`, ...), up, VNI of a vxlan device.
    pub link: Option<(Option<String>, bool, Option<u32>)>,
    /// The device has a carrier: for the persistent userspace TUN, a flanneld holds it.
    pub carrier: bool,
    /// `tx-checksum-ip-generic` of a kernel vxlan device (`Err`: could not read).
    pub tx_checksum: Option<Result<bool, String>>,
    /// The device's MTU, if it exists.
    pub mtu: Option<u32>,
}

fn recreate_fix(name: &str) -> String {
    format!("check the flanneld log (it creates {name} at start and recreates it when it disappears), then restart flanneld; peers are replayed on start")
}

/// `vxlan-device`: the overlay device exists, is a vxlan or TUN device and is up.
pub fn vxlan_device(d: &DeviceFacts) -> Finding {
    let id = ids::VXLAN_DEVICE;
    let name = &d.name;
    match &d.link {
        None => Finding::new(
            Status::Fail,
            id,
            format!("{name} does not exist: this node has no overlay device, pod traffic to other nodes is dropped"),
        )
        .fix(recreate_fix(name)),
        Some((kind, up, vni)) => match kind.as_deref() {
            Some("vxlan") if *vni != Some(d.vni) => Finding::new(
                Status::Fail,
                id,
                format!(
                    "{name} is a vxlan device with VNI {} but the network config says VNI {}",
                    vni.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
                    d.vni
                ),
            )
            .fix(format!("ip link del {name}, then restart flanneld (it recreates the device)")),
            Some(k @ ("vxlan" | "tun")) if !*up => Finding::new(
                Status::Fail,
                id,
                format!("{name} ({}) is down", kind_text(k)),
            )
            .fix(format!("ip link set {name} up; if something takes it down (a network restart), restart flanneld")),
            Some("tun") if !d.carrier => Finding::new(
                Status::Fail,
                id,
                format!("{name} (userspace TUN) is up but no flanneld holds it (no carrier): pod traffic to other nodes is dropped until one starts"),
            )
            .fix("check that flanneld runs on this node and why it stopped (kubectl -n kube-flannel get pods -o wide, then its log); a new flanneld adopts the device as it is".to_owned()),
            Some(k @ ("vxlan" | "tun")) => Finding::new(
                Status::Pass,
                id,
                format!("{name} is up ({}, VNI {})", kind_text(k), d.vni),
            ),
            other => Finding::new(
                Status::Fail,
                id,
                format!("{name} is a {} device, not vxlan or TUN", other.unwrap_or("plain")),
            )
            .fix(format!("ip link del {name}, then restart flanneld")),
        },
    }
}

fn kind_text(kind: &str) -> &'static str {
    if kind == "tun" {
        "userspace TUN"
    } else {
        "kernel vxlan"
    }
}

/// `tx-checksum`: a kernel vxlan device must have `tx-checksum-ip-generic` off (P2).
pub fn tx_checksum(d: &DeviceFacts) -> Finding {
    let id = ids::TX_CHECKSUM;
    let name = &d.name;
    match (&d.link, &d.tx_checksum) {
        (None, _) => Finding::new(Status::Skip, id, format!("{name} does not exist")),
        (Some((Some(k), _, _)), _) if k == "tun" => Finding::new(
            Status::Pass,
            id,
            format!("{name} is a userspace TUN device: flanneld completes every checksum itself"),
        ),
        (_, Some(Ok(false))) => Finding::new(
            Status::Pass,
            id,
            format!("{name}: tx-checksum-ip-generic off"),
        ),
        (_, Some(Ok(true))) => Finding::new(
            Status::Fail,
            id,
            format!("{name}: tx-checksum-ip-generic on: NATed service traffic into the tunnel can leave with a wrong checksum and be dropped by the receiver (ClusterIP timeouts)"),
        )
        .fix(format!("ethtool -K {name} tx-checksum-ip-generic off (flanneld --dataplane=kernel turns it off when it creates the device, unless --vxlan-tx-checksum-offload)")),
        (_, Some(Err(e))) => Finding::new(
            Status::Skip,
            id,
            format!("{name}: cannot read tx-checksum-ip-generic: {e}"),
        ),
        (_, None) => Finding::new(Status::Skip, id, format!("{name}: not a vxlan device")),
    }
}

/// `forward-reject`: `iptables -t filter -S` text (or why it could not be listed) and the
/// pod Network; for the IPv6 Network, `ip6tables -t filter -S` text (then the fixes name
/// ip6tables, and [`Finding::v6`] names the check).
pub fn forward_reject(rules: Result<&str, &str>, network: Option<IpNet>) -> Finding {
    let id = ids::FORWARD_REJECT;
    let ipt = match network {
        Some(IpNet::V6(_)) => "ip6tables",
        _ => "iptables",
    };
    let text = match rules {
        Ok(t) => t,
        Err(e) => return Finding::new(Status::Skip, id, format!("cannot list {ipt} rules: {e}")),
    };
    let Some(network) = network else {
        return Finding::new(
            Status::Skip,
            id,
            "the pod Network is unknown (no network config, no subnet.env)",
        );
    };
    match forward_verdict(&parse_filter(text), network) {
        ForwardVerdict::Accepted(rule) => Finding::new(
            Status::Pass,
            id,
            format!("pod traffic in {network} is accepted by \"{rule}\""),
        ),
        ForwardVerdict::Policy(p) if p == "ACCEPT" => Finding::new(
            Status::Pass,
            id,
            format!("no FORWARD rule rejects pod traffic in {network} (policy ACCEPT)"),
        ),
        ForwardVerdict::Policy(p) => Finding::new(
            Status::Fail,
            id,
            format!("FORWARD policy is {p} and no rule accepts pod traffic in {network}"),
        )
        .fix(format!("run flanneld with --iptables-forward-rules=true (the default), or: {ipt} -A FORWARD -s {network} -j ACCEPT; {ipt} -A FORWARD -d {network} -j ACCEPT")),
        ForwardVerdict::Rejected { rule, partial } => {
            let which = if partial { "part of the pod traffic" } else { "pod traffic" };
            let delete = rule.strip_prefix("-A ").map(|r| format!("{ipt} -D {r}")).unwrap_or_default();
            Finding::new(
                Status::Fail,
                id,
                format!("\"{rule}\" rejects {which} in {network} before flannel's ACCEPT rules"),
            )
            .fix(format!("{delete}, and remove it from the saved firewall rules (/etc/sysconfig/{ipt}, iptables-persistent, firewalld) so it does not come back"))
            .fix(format!("or accept the pod network above it: {ipt} -I FORWARD 1 -s {network} -j ACCEPT; {ipt} -I FORWARD 1 -d {network} -j ACCEPT"))
        }
    }
}

/// `host-firewall`: firewalld/ufw chains in the filter table, or a firewalld process
/// (its nftables backend creates no iptables chains).
pub fn host_firewall_check(
    rules: Result<&str, &str>,
    procs: &[Process],
    network: Option<IpNet>,
) -> Finding {
    let id = ids::HOST_FIREWALL;
    let hf = rules
        .map(|t| host_firewall(&parse_filter(t)))
        .unwrap_or_default();
    let firewalld_pid = procs
        .iter()
        .find(|p| names_of(p).any(|n| n == "firewalld"))
        .map(|p| p.pid);
    let net = network
        .map(|n| n.to_string())
        .unwrap_or_else(|| "<Network>".into());
    let mut found = Vec::new();
    if !hf.firewalld.is_empty() {
        found.push(format!("firewalld chains {}", hf.firewalld.join(", ")));
    }
    if let Some(pid) = firewalld_pid {
        found.push(format!("firewalld (pid {pid}) running"));
    }
    if !hf.ufw.is_empty() {
        found.push(format!("ufw chains {}", hf.ufw.join(", ")));
    }
    if found.is_empty() {
        return match rules {
            Ok(_) => Finding::new(Status::Pass, id, "no firewalld or ufw chains"),
            Err(e) => Finding::new(Status::Skip, id, format!("cannot list iptables rules: {e}")),
        };
    }
    let mut f = Finding::new(
        Status::Warn,
        id,
        format!(
            "{}: a host firewall may reject forwarded pod traffic or VXLAN packets",
            found.join("; ")
        ),
    );
    if !hf.firewalld.is_empty() || firewalld_pid.is_some() {
        f = f.fix(format!("firewalld: firewall-cmd --permanent --zone=trusted --add-source={net}; firewall-cmd --permanent --add-port=8472/udp; firewall-cmd --reload"));
    }
    if !hf.ufw.is_empty() {
        f = f.fix(format!(
            "ufw: ufw allow 8472/udp; ufw route allow from {net}; ufw route allow to {net}"
        ));
    }
    f
}

/// Process names of security software seen hooking the network stack in the field (P3).
pub const SECURITY_SOFTWARE: &[&str] = &[
    "qaxsafed",
    "sangfor_watchdog",
    "YDservice",
    "start360su_safed",
    "gov_defence_service",
    "gov_defence_guard",
    "wsssr_defence_daemon",
    "wsssr_defence_service",
    "wsssr_defence_agent",
    "kesl",
    // Symantec Endpoint Protection for Linux.
    "rtvscand",
    "smcd",
    "symcfgd",
    "sisidsdaemon",
    "sisamddaemon",
    "sisipsdaemon",
];

fn names_of(p: &Process) -> impl Iterator<Item = &str> {
    [p.exe.as_str(), p.comm.as_str()]
        .into_iter()
        .filter(|n| !n.is_empty())
}

/// The known security product a process is, matching its executable name or its comm
/// (the kernel cuts comm to 15 bytes, so a 15-byte comm matches by prefix).
pub fn classify_process(p: &Process) -> Option<&'static str> {
    SECURITY_SOFTWARE.iter().copied().find(|known| {
        names_of(p).any(|n| {
            n.eq_ignore_ascii_case(known)
                || (n.len() == 15
                    && known.len() > 15
                    && known
                        .to_ascii_lowercase()
                        .starts_with(&n.to_ascii_lowercase()))
        })
    })
}

/// `security-software`: one WARN per matching process (at most 20), else PASS.
pub fn security_software(procs: &[Process]) -> Vec<Finding> {
    let id = ids::SECURITY_SOFTWARE;
    let hits: Vec<Finding> = procs
        .iter()
        .filter_map(|p| classify_process(p).map(|name| (p, name)))
        .take(20)
        .map(|(p, name)| {
            Finding::new(
                Status::Warn,
                id,
                format!("process {name} (pid {}) is known to hook the network stack", p.pid),
            )
            .fix(format!("if pod traffic between nodes fails, exempt the pod Network and UDP 8472 in {name}'s policy or stop it (systemctl stop/disable its service) and test again"))
        })
        .collect();
    if hits.is_empty() {
        vec![Finding::new(
            Status::Pass,
            id,
            "no known network-hooking security software running",
        )]
    } else {
        hits
    }
}

/// A probed peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProbe {
    /// The peer.
    pub peer: Peer,
    /// The address probed.
    pub target: IpAddr,
    /// Whether it answered.
    pub answered: bool,
}

/// `peer-reachable`: one line per peer.
pub fn peer_reachable(probes: &[PeerProbe], ctx: &ProbeContext) -> Vec<Finding> {
    let id = ids::PEER_REACHABLE;
    if probes.is_empty() {
        return vec![Finding::new(
            Status::Skip,
            id,
            "no other node's lease in the store",
        )];
    }
    probes
        .iter()
        .map(|p| {
            let head = peer_label(&p.peer, ctx);
            if p.answered {
                Finding::new(
                    Status::Pass,
                    id,
                    format!("{head} answers ICMP echo to {}", p.target),
                )
            } else {
                let mut f = Finding::new(
                    Status::Fail,
                    id,
                    format!(
                        "{head} does not answer ICMP echo to {}{}",
                        p.target,
                        if ctx.backend == "vxlan" {
                            " over the overlay"
                        } else {
                            ""
                        }
                    ),
                );
                for fix in unreachable_fixes(&p.peer, ctx) {
                    f = f.fix(fix);
                }
                f
            }
        })
        .collect()
}

/// `subnet-lease`: subnet.env (its subnet, or why unreadable) against the store's leases.
/// `ours` are this node's addresses (interface addresses, `--public-ip`, a stored public IP).
pub fn subnet_lease(
    env_subnet: Result<Option<Ipv4Net>, &str>,
    leases: Result<&[Lease], &str>,
    ours: &[Ipv4Addr],
) -> Finding {
    let ours: Vec<IpAddr> = ours.iter().copied().map(IpAddr::V4).collect();
    lease_agrees(env_subnet.map(|s| s.map(IpNet::V4)), false, leases, &ours)
}

/// `subnet-lease-v6` (IPv6 enabled): subnet.env's `FLANNEL_IPV6_SUBNET` against the leases'
/// IPv6 subnets; a lease is this node's by its `PublicIPv6` or `PublicIP` (in `ours`).
pub fn subnet_lease_v6(
    env_subnet: Result<Option<Ipv6Net>, &str>,
    leases: Result<&[Lease], &str>,
    ours: &[IpAddr],
) -> Finding {
    lease_agrees(env_subnet.map(|s| s.map(IpNet::V6)), true, leases, ours).v6()
}

/// [`subnet_lease`] for the family of `v6`.
fn lease_agrees(
    env_subnet: Result<Option<IpNet>, &str>,
    v6: bool,
    leases: Result<&[Lease], &str>,
    ours: &[IpAddr],
) -> Finding {
    let id = ids::SUBNET_LEASE;
    let key = if v6 {
        "FLANNEL_IPV6_SUBNET"
    } else {
        "FLANNEL_SUBNET"
    };
    let subnet = match env_subnet {
        Err(e) => {
            return Finding::new(Status::Fail, id, format!("subnet.env unreadable: {e}"))
                .fix("start flanneld (it writes subnet.env once it holds a lease); pods cannot get addresses without it")
        }
        Ok(None) => {
            return Finding::new(Status::Fail, id, format!("subnet.env has no {key}"))
                .fix("restart flanneld so it rewrites subnet.env")
        }
        Ok(Some(s)) => s,
    };
    let leases = match leases {
        Ok(l) => l,
        Err(e) => {
            return Finding::new(
                Status::Skip,
                id,
                format!("subnet.env says {subnet}; the store cannot be read: {e}"),
            )
        }
    };
    let subnet_of = |l: &Lease| match v6 {
        false => l.subnet.map(IpNet::V4),
        true => l.ipv6_subnet.map(IpNet::V6),
    };
    let v4_ip = |l: &Lease| IpAddr::V4(l.attrs.public_ip);
    // How messages name the lease's node: its address of this family where it has one.
    let ip_of = |l: &Lease| match (v6, l.attrs.public_ipv6) {
        (true, Some(ip)) => IpAddr::V6(ip),
        _ => v4_ip(l),
    };
    let shown = |l: &Lease| subnet_of(l).map(|s| s.to_string()).unwrap_or_default();
    let is_ours = |l: &Lease| ours.contains(&ip_of(l)) || ours.contains(&v4_ip(l));
    let mine = leases.iter().find(|l| subnet_of(l) == Some(subnet));
    let other_of_ours = leases
        .iter()
        .find(|l| is_ours(l) && subnet_of(l).is_some() && subnet_of(l) != Some(subnet));
    match (mine, other_of_ours) {
        (None, Some(o)) => Finding::new(
            Status::Fail,
            id,
            format!(
                "subnet.env says {subnet} but the store's lease for this node ({}) is {}",
                ip_of(o),
                shown(o)
            ),
        )
        .fix("restart flanneld so subnet.env and the pod routes follow the store's lease; pods started with the old subnet need restarting"),
        (None, None) => Finding::new(
            Status::Fail,
            id,
            format!("subnet.env says {subnet} but the store has no lease for it"),
        )
        .fix("restart flanneld to acquire a lease (etcd: the lease may have expired while flanneld was down)"),
        (Some(l), _) if is_ours(l) => Finding::new(
            Status::Pass,
            id,
            format!("subnet.env and the store agree: {subnet} at {}", ip_of(l)),
        ),
        (Some(l), Some(o)) => Finding::new(
            Status::Fail,
            id,
            format!(
                "subnet.env says {subnet}, leased to {}, but this node's lease ({}) is {}",
                ip_of(l),
                ip_of(o),
                shown(o)
            ),
        )
        .fix("restart flanneld so subnet.env follows the store's lease"),
        (Some(l), None) => Finding::new(
            Status::Pass,
            id,
            format!(
                "subnet.env and the store agree: {subnet} at {} (not an address of this host: NAT with a public-IP override)",
                ip_of(l)
            ),
        ),
    }
}

/// What the `vxlan-guard` checks (iptables, nftables) compare the firewall with.
#[derive(Debug, Clone, Copy)]
pub struct GuardWant<'a> {
    /// The pod Network of the family checked (`None`: unknown).
    pub network: Option<IpNet>,
    /// The VXLAN port (`None`: host-gw, nothing to guard).
    pub port: Option<u16>,
    /// Kernel mode: the guard also holds an allow-list of the peers' public IPs.
    pub allow_list: bool,
    /// The peers' public IPs (`None`: the lease store could not be read).
    pub peers: Option<&'a [IpAddr]>,
}

#[cfg(test)]
impl<'a> GuardWant<'a> {
    /// All fields in order.
    pub(crate) fn new(
        network: Option<IpNet>,
        port: Option<u16>,
        allow_list: bool,
        peers: Option<&'a [IpAddr]>,
    ) -> Self {
        GuardWant {
            network,
            port,
            allow_list,
            peers,
        }
    }
}

/// How both `vxlan-guard` checks start: skipped without a port to guard, without a
/// `listing` of the firewall (`what` names it in the message) or without a Network; else
/// `judge(listing, port, network)`.
pub(crate) fn guard_check<T>(
    listing: Result<T, &str>,
    what: &str,
    want: &GuardWant<'_>,
    judge: impl FnOnce(T, u16, IpNet) -> Finding,
) -> Finding {
    let id = ids::VXLAN_GUARD;
    let Some(port) = want.port else {
        return Finding::new(Status::Skip, id, "host-gw backend: no VXLAN port to guard");
    };
    let listing = match listing {
        Ok(l) => l,
        Err(e) => return Finding::new(Status::Skip, id, format!("cannot list {what}: {e}")),
    };
    let Some(network) = want.network else {
        return Finding::new(Status::Skip, id, "the pod Network is unknown");
    };
    judge(listing, port, network)
}

/// `vxlan-guard`: whether the VXLAN guard chains are in place in `iptables -t filter -S`
/// text: the jumps for UDP port from INPUT and FORWARD, the drops of pod sources and (kernel
/// mode) the allow-list of the peers' public IPs (compared when the store could be read).
pub fn vxlan_guard(rules: Result<&str, &str>, want: &GuardWant<'_>) -> Finding {
    guard_check(rules, "iptables rules", want, |text, port, network| {
        iptables_guard(text, port, network, want)
    })
}

fn iptables_guard(text: &str, port: u16, network: IpNet, want: &GuardWant<'_>) -> Finding {
    use crate::masq::{guard_jumps, guard_rules, VxlanGuard, VXLAN_IN_CHAIN};
    let lines: Vec<&str> = text.lines().collect();
    let has = |r: &crate::masq::Rule| lines.contains(&r.render().as_str());
    let restart = "restart flanneld: it installs FLANNEL-VXLAN-IN/FLANNEL-VXLAN-FWD and re-checks them every --iptables-resync seconds; if they keep disappearing, find what flushes INPUT/FORWARD (a firewall reload)";
    let fixed = guard_rules(&VxlanGuard {
        port,
        network,
        peers: Vec::new(),
        allow_list: want.allow_list,
    });
    let missing: Vec<String> = guard_jumps(port)
        .iter()
        .chain(fixed.iter())
        .filter(|r| !has(r))
        .map(crate::masq::Rule::render)
        .collect();
    let allow_head = format!("-A {VXLAN_IN_CHAIN} -s ");
    let allowed: Vec<IpAddr> = lines
        .iter()
        .filter(|l| l.starts_with(&allow_head) && l.ends_with("-j RETURN"))
        .filter_map(|l| l[allow_head.len()..].split(['/', ' ']).next()?.parse().ok())
        .collect();
    judge_guard(
        &AllowList {
            port,
            network,
            allowed: &allowed,
            name: VXLAN_IN_CHAIN,
            restart,
            missing_label: "VXLAN guard rules missing",
            drop_note: "",
        },
        &missing,
        want.allow_list,
        want.peers,
    )
}

/// The VXLAN guard as read from one firewall (iptables chain or nftables table) and how
/// messages name its parts.
pub(crate) struct AllowList<'a> {
    pub(crate) port: u16,
    pub(crate) network: IpNet,
    /// The addresses it accepts VXLAN from.
    pub(crate) allowed: &'a [IpAddr],
    /// How messages name it (`FLANNEL-VXLAN-IN`, `set ip flannel-rs-guard peers`).
    pub(crate) name: &'a str,
    /// The fix for a stale list or missing rules.
    pub(crate) restart: &'a str,
    /// How a message about missing rules starts ("VXLAN guard rules missing").
    pub(crate) missing_label: &'a str,
    /// Said after "UDP <port> from pods … is dropped" (which firewall, or nothing).
    pub(crate) drop_note: &'a str,
}

/// The verdict both guard checks (iptables, nftables) end in: rules `missing` fail; without
/// an allow-list (userspace mode) the pod drops are the whole guard; else the allow-list is
/// compared with the peers' public IPs (`None`: the lease store is unreadable): a peer
/// missing fails (its VXLAN is dropped), an address without a lease warns.
pub(crate) fn judge_guard(
    list: &AllowList<'_>,
    missing: &[String],
    allow_list: bool,
    peers: Option<&[IpAddr]>,
) -> Finding {
    let AllowList {
        port,
        network,
        allowed,
        name,
        restart,
        missing_label,
        drop_note,
    } = *list;
    let id = ids::VXLAN_GUARD;
    let to_fix = |status, text: String| Finding::new(status, id, text).fix(restart);
    if !missing.is_empty() {
        let m = missing.join("; ");
        return to_fix(Status::Fail, format!("{missing_label} ({m}): VXLAN to UDP {port} may come from any address, or pods may send it as their node"));
    }
    if !allow_list {
        return Finding::new(
            Status::Pass,
            id,
            format!("UDP {port} from pods in {network} is dropped{drop_note}; the userspace data plane accepts VXLAN only from the peers' public IPs"),
        );
    }
    let Some(peers) = peers else {
        return Finding::new(
            Status::Pass,
            id,
            format!("VXLAN to UDP {port} is accepted only from the {} addresses of {name}; UDP {port} from pods in {network} is dropped (lease store unreadable: allow-list not compared)", allowed.len()),
        );
    };
    let not_in = |these: &[IpAddr], those: &[IpAddr]| -> String {
        let v: Vec<String> = these
            .iter()
            .filter(|a| !those.contains(a))
            .map(ToString::to_string)
            .collect();
        v.join(", ")
    };
    let absent = not_in(peers, allowed);
    if !absent.is_empty() {
        return to_fix(
            Status::Fail,
            format!("VXLAN from peer(s) {absent} is dropped: {name} does not list them"),
        );
    }
    let extra = not_in(allowed, peers);
    if !extra.is_empty() {
        return to_fix(
            Status::Warn,
            format!("{name} still accepts VXLAN from {extra}, which hold(s) no valid lease"),
        );
    }
    Finding::new(
        Status::Pass,
        id,
        format!(
            "VXLAN to UDP {port} is accepted only from the {} peers' public IPs ({name}); UDP {port} from pods in {network} is dropped",
            peers.len()
        ),
    )
}

/// This node's own addresses for [`subnet_lease`]: its interface addresses plus configured
/// public IPs.
pub fn own_addresses(iface_addrs: &[IpAddr], extra: &[Option<Ipv4Addr>]) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = iface_addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .chain(extra.iter().flatten().copied())
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn render1(f: &Finding) -> String {
        super::super::report::render(std::slice::from_ref(f))
    }

    #[test]
    fn sysctl_values() {
        assert_eq!(parse_sysctl("1\n"), Some(1));
        assert_eq!(parse_sysctl(" 0 "), Some(0));
        assert_eq!(parse_sysctl("x"), None);
        assert_eq!(parse_sysctl(""), None);
        assert_eq!(
            render1(&ip_forward(Ok("1\n"))),
            "PASS ip-forward: net.ipv4.ip_forward = 1\ndoctor: 1 passed, 0 warnings, 0 failed\n"
        );
        let f = ip_forward(Ok("0\n"));
        assert_eq!(f.status, Status::Fail);
        assert!(render1(&f).starts_with("FAIL ip-forward: net.ipv4.ip_forward = 0: this node does not forward pod traffic\n  fix: sysctl -w net.ipv4.ip_forward=1, and find the sysctl file"));
        assert_eq!(ip_forward(Ok("yes")).status, Status::Fail);
        assert_eq!(ip_forward(Err("permission denied")).status, Status::Skip);
    }

    fn dev(
        link: Option<(&str, bool, Option<u32>)>,
        tx: Option<Result<bool, String>>,
    ) -> DeviceFacts {
        DeviceFacts {
            name: "flannel.1".into(),
            vni: 1,
            link: link.map(|(k, up, vni)| (Some(k.to_owned()), up, vni)),
            carrier: true,
            tx_checksum: tx,
            mtu: Some(1450),
        }
    }

    #[test]
    fn device_checks() {
        let d = dev(Some(("vxlan", true, Some(1))), Some(Ok(false)));
        assert_eq!(
            vxlan_device(&d).message,
            "flannel.1 is up (kernel vxlan, VNI 1)"
        );
        assert_eq!(tx_checksum(&d).status, Status::Pass);
        let d = dev(Some(("vxlan", true, Some(1))), Some(Ok(true)));
        let f = tx_checksum(&d);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.message
                .starts_with("flannel.1: tx-checksum-ip-generic on"),
            "{}",
            f.message
        );
        assert!(f.fixes[0].starts_with("ethtool -K flannel.1 tx-checksum-ip-generic off"));
        let d = dev(Some(("tun", true, None)), None);
        assert_eq!(
            vxlan_device(&d).message,
            "flannel.1 is up (userspace TUN, VNI 1)"
        );
        // The persistent TUN outlives a crashed flanneld: up, but nobody forwards.
        let orphan = DeviceFacts {
            carrier: false,
            ..d.clone()
        };
        let f = vxlan_device(&orphan);
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("no flanneld holds it"), "{}", f.message);
        assert_eq!(tx_checksum(&d).status, Status::Pass);
        assert_eq!(
            vxlan_device(&dev(Some(("tun", false, None)), None)).status,
            Status::Fail
        );
        assert_eq!(
            vxlan_device(&dev(Some(("vxlan", true, Some(2))), None)).status,
            Status::Fail
        );
        assert_eq!(
            vxlan_device(&dev(Some(("bridge", true, None)), None)).status,
            Status::Fail
        );
        let gone = dev(None, None);
        assert_eq!(vxlan_device(&gone).status, Status::Fail);
        assert!(vxlan_device(&gone)
            .message
            .starts_with("flannel.1 does not exist"));
        assert_eq!(tx_checksum(&gone).status, Status::Skip);
    }

    const FLANNEL_FWD: &str =
        "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n-N FLANNEL-FWD\n\
        -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
        -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
        -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n";

    #[test]
    fn forward_reject_names_the_rule() {
        let n: IpNet = "10.244.0.0/16".parse().expect("net");
        assert_eq!(
            forward_reject(Ok(FLANNEL_FWD), Some(n)).status,
            Status::Pass
        );
        let bad = FLANNEL_FWD.replace(
            "-A FORWARD -m comment",
            "-A FORWARD -j REJECT --reject-with icmp-host-prohibited\n-A FORWARD -m comment",
        );
        let f = forward_reject(Ok(&bad), Some(n));
        assert_eq!(
            render1(&f).lines().next(),
            Some("FAIL forward-reject: \"-A FORWARD -j REJECT --reject-with icmp-host-prohibited\" rejects pod traffic in 10.244.0.0/16 before flannel's ACCEPT rules")
        );
        assert!(f.fixes[0]
            .starts_with("iptables -D FORWARD -j REJECT --reject-with icmp-host-prohibited,"));
        let after =
            format!("{FLANNEL_FWD}-A FORWARD -j REJECT --reject-with icmp-host-prohibited\n");
        assert_eq!(forward_reject(Ok(&after), Some(n)).status, Status::Pass);
        let drop = "-P FORWARD DROP\n";
        assert_eq!(forward_reject(Ok(drop), Some(n)).status, Status::Fail);
        assert_eq!(
            forward_reject(Err("no iptables"), Some(n)).status,
            Status::Skip
        );
        assert_eq!(forward_reject(Ok(FLANNEL_FWD), None).status, Status::Skip);
    }

    #[test]
    fn v6_forwarding_and_ip6tables_reject() {
        let f = ip6_forward(Ok("0\n"));
        assert_eq!(
            render1(&f),
            "FAIL ip6-forward: net.ipv6.conf.all.forwarding = 0: this node does not forward pod traffic\n\
             \x20 fix: sysctl -w net.ipv6.conf.all.forwarding=1, and find the sysctl file that resets it at boot (grep -r forwarding /etc/sysctl.conf /etc/sysctl.d /usr/lib/sysctl.d /run/sysctl.d), fix it, then sysctl --system\n\
             doctor: 0 passed, 0 warnings, 1 failed\n"
        );
        assert_eq!(ip6_forward(Ok("1")).status, Status::Pass);
        assert_eq!(ip6_forward(Err("no ipv6")).status, Status::Skip);
        let n6: IpNet = "2001:db8:42::/56".parse().expect("net");
        let fwd6 = FLANNEL_FWD.replace("10.244.0.0/16", "2001:db8:42::/56");
        assert_eq!(
            forward_reject(Ok(&fwd6), Some(n6)).v6().status,
            Status::Pass
        );
        let bad = fwd6.replace(
            "-A FORWARD -m comment",
            "-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited\n-A FORWARD -m comment",
        );
        let f = forward_reject(Ok(&bad), Some(n6)).v6();
        assert_eq!(
            render1(&f).lines().next(),
            Some("FAIL forward-reject-v6: \"-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited\" rejects pod traffic in 2001:db8:42::/56 before flannel's ACCEPT rules")
        );
        assert!(
            f.fixes[0].starts_with("ip6tables -D FORWARD -j REJECT"),
            "{:?}",
            f.fixes
        );
        assert!(f.fixes[1].contains("ip6tables -I FORWARD 1 -s 2001:db8:42::/56 -j ACCEPT"));
        // The v4 rules say nothing about the v6 Network: its policy decides.
        let f = forward_reject(Ok("-P FORWARD DROP\n"), Some(n6));
        assert!(
            f.fixes[0].contains("ip6tables -A FORWARD -s 2001:db8:42::/56"),
            "{:?}",
            f.fixes
        );
        // Checks without a v6 twin keep their id.
        assert_eq!(
            Finding::new(Status::Pass, ids::CNI_PLUGIN, "x").v6().id,
            ids::CNI_PLUGIN
        );
    }

    #[test]
    fn v6_guard_compares_v6_peers() {
        let g = crate::masq::VxlanGuard {
            port: 8472,
            network: "2001:db8:42::/56".parse().expect("net"),
            peers: vec!["2001:db8:18::2".parse().expect("ip")],
            allow_list: true,
        };
        let text: Vec<String> = crate::masq::guard_jumps(8472)
            .iter()
            .chain(crate::masq::guard_rules(&g).iter())
            .map(crate::masq::Rule::render)
            .collect();
        let text = text.join("\n");
        let peers: Vec<IpAddr> = vec!["2001:db8:18::2".parse().expect("ip")];
        let want = GuardWant::new(Some(g.network), Some(8472), true, Some(&peers));
        let f = vxlan_guard(Ok(&text), &want).v6();
        assert_eq!((f.status, f.id), (Status::Pass, "vxlan-guard-v6"), "{f:?}");
        let more: Vec<IpAddr> = vec![peers[0], "2001:db8:18::3".parse().expect("ip")];
        let want = GuardWant::new(Some(g.network), Some(8472), true, Some(&more));
        let f = vxlan_guard(Ok(&text), &want);
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.message.contains("2001:db8:18::3 is dropped"), "{f:?}");
    }

    fn proc(pid: u32, comm: &str, exe: &str) -> Process {
        Process {
            pid,
            comm: comm.into(),
            exe: exe.into(),
        }
    }

    #[test]
    fn process_names() {
        assert_eq!(classify_process(&proc(1, "kesl", "kesl")), Some("kesl"));
        // comm is cut at 15 bytes; no cmdline (e.g. hidden) still matches.
        assert_eq!(
            classify_process(&proc(2, "sangfor_watchdo", "")),
            Some("sangfor_watchdog")
        );
        assert_eq!(
            classify_process(&proc(3, "wsssr_defence_d", "")),
            Some("wsssr_defence_daemon")
        );
        assert_eq!(
            classify_process(&proc(4, "ydservice", "YDService")),
            Some("YDservice")
        );
        assert_eq!(
            classify_process(&proc(5, "x", "gov_defence_guard")),
            Some("gov_defence_guard")
        );
        assert_eq!(classify_process(&proc(6, "keslx", "keslx")), None);
        assert_eq!(classify_process(&proc(7, "sshd", "sshd")), None);
        // A short prefix is not enough.
        assert_eq!(classify_process(&proc(8, "sangfor", "")), None);
        let f = security_software(&[proc(1234, "kesl", "kesl"), proc(9, "bash", "bash")]);
        assert_eq!(f.len(), 1);
        assert_eq!(
            render1(&f[0]).lines().next(),
            Some("WARN security-software: process kesl (pid 1234) is known to hook the network stack")
        );
        assert_eq!(
            security_software(&[proc(9, "bash", "bash")])[0].status,
            Status::Pass
        );
    }

    #[test]
    fn host_firewall_chains_and_process() {
        let n = Some("10.244.0.0/16".parse().expect("net"));
        let fw = format!("{FLANNEL_FWD}-N FORWARD_IN_ZONES\n-N FORWARD_direct\n");
        let f = host_firewall_check(Ok(&fw), &[], n);
        assert_eq!(f.status, Status::Warn);
        assert!(
            f.message
                .starts_with("firewalld chains FORWARD_IN_ZONES, FORWARD_direct"),
            "{}",
            f.message
        );
        assert!(f.fixes[0].contains("--add-source=10.244.0.0/16"));
        let ufw = "-P FORWARD DROP\n-N ufw-before-forward\n";
        let f = host_firewall_check(Ok(ufw), &[], n);
        assert_eq!(f.status, Status::Warn);
        assert!(f.fixes[0].starts_with("ufw:"));
        let f = host_firewall_check(Ok(FLANNEL_FWD), &[proc(77, "firewalld", "firewalld")], n);
        assert_eq!(f.status, Status::Warn);
        assert!(f.message.contains("firewalld (pid 77) running"));
        assert_eq!(
            host_firewall_check(Ok(FLANNEL_FWD), &[], n).status,
            Status::Pass
        );
        assert_eq!(host_firewall_check(Err("x"), &[], n).status, Status::Skip);
    }

    fn ctx() -> ProbeContext {
        ProbeContext {
            backend: "vxlan".into(),
            port: 8472,
            overwrite_annotation: Some((
                "flannel.alpha.coreos.com/public-ip-overwrite".into(),
                "flannel.alpha.coreos.com/public-ipv6-overwrite".into(),
            )),
        }
    }

    #[test]
    fn peers_one_line_each() {
        let vxlan = crate::backend::PeerKind::Vxlan {
            vtep_mac: crate::wire::MacAddr([2, 0, 0, 0, 0, 1]),
            vni: 1,
        };
        let peer = |s: &str, ip: &str| Peer::checked_for_test(s, ip, vxlan);
        let probes = [
            PeerProbe {
                peer: peer("10.244.1.0/24", "198.51.100.7"),
                target: "10.244.1.0".parse().expect("ip"),
                answered: false,
            },
            PeerProbe {
                peer: peer("10.244.2.0/24", "172.19.0.13"),
                target: "10.244.2.0".parse().expect("ip"),
                answered: false,
            },
            PeerProbe {
                peer: peer("10.244.3.0/24", "198.51.100.9"),
                target: "10.244.3.0".parse().expect("ip"),
                answered: true,
            },
        ];
        let text = super::super::report::render(&peer_reachable(&probes, &ctx()));
        assert_eq!(
            text,
            "FAIL peer-reachable: peer 10.244.1.0/24 at 198.51.100.7 (UDP 8472) does not answer ICMP echo to 10.244.1.0 over the overlay\n\
             \x20 fix: check that UDP 8472 is allowed between the nodes, or move Backend.Port (nodes on one layer-2 network can use host-gw instead)\n\
             \x20 fix: if that node is behind NAT: set flannel.alpha.coreos.com/public-ip-overwrite on that node to an address this node can reach, then restart flanneld there\n\
             FAIL peer-reachable: peer 10.244.2.0/24 at 172.19.0.13 (UDP 8472) does not answer ICMP echo to 10.244.2.0 over the overlay\n\
             \x20 fix: its public IP 172.19.0.13 is a private address, probably behind NAT: set flannel.alpha.coreos.com/public-ip-overwrite on that node to an address this node can reach, then restart flanneld there\n\
             \x20 fix: check that UDP 8472 is allowed between the nodes, or move Backend.Port (nodes on one layer-2 network can use host-gw instead)\n\
             PASS peer-reachable: peer 10.244.3.0/24 at 198.51.100.9 (UDP 8472) answers ICMP echo to 10.244.3.0\n\
             doctor: 1 passed, 0 warnings, 2 failed\n"
        );
        assert_eq!(peer_reachable(&[], &ctx())[0].status, Status::Skip);
        let hg = ProbeContext {
            backend: "host-gw".into(),
            ..ctx()
        };
        let mut p = probes[0].clone();
        p.peer.kind = crate::backend::PeerKind::HostGw;
        p.target = "198.51.100.7".parse().expect("ip");
        let f = &peer_reachable(&[p], &hg)[0];
        assert_eq!(
            f.message,
            "peer 10.244.1.0/24 at 198.51.100.7 (host-gw) does not answer ICMP echo to 198.51.100.7"
        );
        assert!(f.fixes[0].starts_with("host-gw needs every node on one layer-2 network"));
    }

    fn lease(subnet: &str, ip: &str) -> Lease {
        Lease {
            subnet: Some(subnet.parse().expect("subnet")),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: ip.parse().expect("ip"),
                ..LeaseAttrs::default()
            },
            expiration: None,
            node: None,
        }
    }

    #[test]
    fn subnet_env_against_store() {
        let leases = [
            lease("10.244.1.0/24", "198.18.0.1"),
            lease("10.244.2.0/24", "198.18.0.2"),
        ];
        let me: Vec<Ipv4Addr> = vec!["198.18.0.1".parse().expect("ip")];
        let s1 = Some("10.244.1.0/24".parse().expect("net"));
        let s2 = Some("10.244.2.0/24".parse().expect("net"));
        let s9 = Some("10.244.9.0/24".parse().expect("net"));
        let f = subnet_lease(Ok(s1), Ok(&leases), &me);
        assert_eq!(f.status, Status::Pass);
        assert_eq!(
            f.message,
            "subnet.env and the store agree: 10.244.1.0/24 at 198.18.0.1"
        );
        let f = subnet_lease(Ok(s2), Ok(&leases), &me);
        assert_eq!(f.status, Status::Fail);
        assert_eq!(f.message, "subnet.env says 10.244.2.0/24, leased to 198.18.0.2, but this node's lease (198.18.0.1) is 10.244.1.0/24");
        let f = subnet_lease(Ok(s9), Ok(&leases), &me);
        assert_eq!(f.message, "subnet.env says 10.244.9.0/24 but the store's lease for this node (198.18.0.1) is 10.244.1.0/24");
        let f = subnet_lease(Ok(s9), Ok(&leases[1..]), &me);
        assert_eq!(
            f.message,
            "subnet.env says 10.244.9.0/24 but the store has no lease for it"
        );
        assert_eq!(
            subnet_lease(Err("No such file"), Ok(&leases), &me).status,
            Status::Fail
        );
        assert_eq!(
            subnet_lease(Ok(None), Ok(&leases), &me).status,
            Status::Fail
        );
        assert_eq!(subnet_lease(Ok(s1), Err("down"), &me).status, Status::Skip);
        // Behind NAT with an override: the lease carries an address not on this host.
        let f = subnet_lease(Ok(s2), Ok(&leases[1..]), &me);
        assert_eq!(f.status, Status::Pass);
        assert!(f.message.contains("NAT"), "{}", f.message);
    }

    #[test]
    fn v6_subnet_env_against_store() {
        let mut a = lease("10.244.1.0/24", "198.18.0.1");
        a.ipv6_subnet = Some("2001:db8:42:1::/64".parse().expect("net"));
        a.attrs.public_ipv6 = Some("2001:db8:18::1".parse().expect("ip"));
        let mut b = lease("10.244.2.0/24", "198.18.0.2");
        b.ipv6_subnet = Some("2001:db8:42:2::/64".parse().expect("net"));
        let leases = [a, b];
        let me: Vec<IpAddr> = vec!["2001:db8:18::1".parse().expect("ip")];
        let s1 = Some("2001:db8:42:1::/64".parse().expect("net"));
        let s2 = Some("2001:db8:42:2::/64".parse().expect("net"));
        let f = subnet_lease_v6(Ok(s1), Ok(&leases), &me);
        assert_eq!((f.status, f.id), (Status::Pass, "subnet-lease-v6"), "{f:?}");
        assert_eq!(
            f.message,
            "subnet.env and the store agree: 2001:db8:42:1::/64 at 2001:db8:18::1"
        );
        let f = subnet_lease_v6(Ok(s2), Ok(&leases), &me);
        assert_eq!(f.status, Status::Fail);
        assert_eq!(f.message, "subnet.env says 2001:db8:42:2::/64, leased to 198.18.0.2, but this node's lease (2001:db8:18::1) is 2001:db8:42:1::/64");
        let f = subnet_lease_v6(Ok(None), Ok(&leases), &me);
        assert_eq!(f.message, "subnet.env has no FLANNEL_IPV6_SUBNET");
        // A node known by its IPv4 public IP only (IPv6 over an IPv4 underlay).
        let v4_me: Vec<IpAddr> = vec!["198.18.0.2".parse().expect("ip")];
        let f = subnet_lease_v6(Ok(s2), Ok(&leases), &v4_me);
        assert_eq!(f.status, Status::Pass, "{f:?}");
    }

    #[test]
    fn own_addresses_merge() {
        let a = own_addresses(
            &[
                "198.18.0.1".parse().expect("ip"),
                "fd10::1".parse().expect("ip"),
            ],
            &[
                Some("203.0.113.5".parse().expect("ip")),
                None,
                Some("198.18.0.1".parse().expect("ip")),
            ],
        );
        assert_eq!(
            a,
            [
                "198.18.0.1".parse::<Ipv4Addr>().expect("ip"),
                "203.0.113.5".parse().expect("ip")
            ]
        );
    }

    fn guard_text(peers: &[&str]) -> String {
        let g = crate::masq::VxlanGuard {
            port: 8472,
            network: "10.244.0.0/16".parse().expect("net"),
            peers: peers.iter().map(|p| p.parse().expect("ip")).collect(),
            allow_list: true,
        };
        let mut v = vec!["-P INPUT ACCEPT".to_owned()];
        v.extend(
            crate::masq::guard_jumps(8472)
                .iter()
                .map(crate::masq::Rule::render),
        );
        v.extend(
            crate::masq::guard_rules(&g)
                .iter()
                .map(crate::masq::Rule::render),
        );
        v.join("\n")
    }

    #[test]
    fn vxlan_guard_decisions() {
        let net: Option<IpNet> = "10.244.0.0/16".parse().ok();
        let peers: Vec<IpAddr> = vec!["198.18.0.2".parse().expect("ip")];
        let text = guard_text(&["198.18.0.2"]);
        let f = vxlan_guard(
            Ok(&text),
            &GuardWant::new(net, Some(8472), true, Some(&peers)),
        );
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert!(f.message.contains("only from the 1 peers"), "{f:?}");
        // A peer that joined but is not listed: its VXLAN is dropped.
        let two: Vec<IpAddr> = vec![peers[0], "198.18.0.3".parse().expect("ip")];
        let f = vxlan_guard(
            Ok(&text),
            &GuardWant::new(net, Some(8472), true, Some(&two)),
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.message.contains("198.18.0.3 is dropped"), "{f:?}");
        assert!(!f.fixes.is_empty());
        // A peer that left is still accepted.
        let f = vxlan_guard(Ok(&text), &GuardWant::new(net, Some(8472), true, Some(&[])));
        assert_eq!(f.status, Status::Warn, "{f:?}");
        // No jump from INPUT: everything is accepted.
        let no_jump: String = text
            .lines()
            .filter(|l| !l.starts_with("-A INPUT"))
            .collect::<Vec<_>>()
            .join("\n");
        let f = vxlan_guard(
            Ok(&no_jump),
            &GuardWant::new(net, Some(8472), true, Some(&peers)),
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(
            f.message.contains("-A INPUT -p udp -m udp --dport 8472"),
            "{f:?}"
        );
        // Another port (Backend.Port changed, daemon not restarted).
        let f = vxlan_guard(
            Ok(&text),
            &GuardWant::new(net, Some(8475), true, Some(&peers)),
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert_eq!(
            vxlan_guard(Ok(&text), &GuardWant::new(net, None, true, None)).status,
            Status::Skip
        );
        // Userspace mode: the pod drops suffice, the allow-list is not required.
        let f = vxlan_guard(
            Ok(&no_jump),
            &GuardWant::new(net, Some(8472), false, Some(&peers)),
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        let f = vxlan_guard(
            Ok(&text),
            &GuardWant::new(net, Some(8472), false, Some(&two)),
        );
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert_eq!(
            vxlan_guard(
                Err("no iptables"),
                &GuardWant::new(net, Some(8472), true, None)
            )
            .status,
            Status::Skip
        );
    }
}
