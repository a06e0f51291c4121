//! Gathering facts from the node (the only part of `doctor` that does IO, all of it through
//! `io`, `netlink`, `masq` and `lease`): sysctls, processes, iptables, the overlay device, the
//! lease store, ICMP probes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use super::checks::{DeviceFacts, PeerProbe, Process};
use super::host::{
    classify_config, is_cni_config_name, ConfigKind, PluginFile, UdpSocket, CNI_PLUGINS,
};
use crate::backend::Peer;
use crate::config::flags::Flags;
use crate::io::icmp::Pinger;
use crate::io::procfs;
use crate::lease::Lease;
use crate::masq::{Iptables, Table};
use crate::netlink::{IpFamily, Netlink};

/// `net.ipv4.ip_forward` of this namespace.
pub fn ip_forward() -> Result<String, String> {
    procfs::sysctl(procfs::IP_FORWARD).map_err(|e| e.to_string())
}

/// `net.ipv6.conf.all.forwarding` of this namespace.
pub fn ip6_forward() -> Result<String, String> {
    procfs::sysctl(procfs::IP6_FORWARD).map_err(|e| e.to_string())
}

/// Every process's pid, comm and `argv[0]` base name.
pub fn processes() -> Vec<Process> {
    procfs::processes()
}

/// `iptables -t filter -S` (`ip6tables` for IPv6) with the same runner and flags flanneld's
/// rules use.
pub fn filter_rules(family: IpFamily) -> Result<String, String> {
    rules(family, Table::Filter)
}

/// `iptables -t nat -S` (`ip6tables` for IPv6; the backend the daemon would pick).
pub fn nat_rules(family: IpFamily) -> Result<String, String> {
    rules(family, Table::Nat)
}

fn rules(family: IpFamily, table: Table) -> Result<String, String> {
    let ipt = Iptables::detect(family).map_err(|e| e.to_string())?;
    ipt.list(table)
        .map(|lines| lines.join("\n"))
        .map_err(|e| e.to_string())
}

/// `nft list ruleset`; an error when nft is not installed.
pub fn nft_ruleset() -> Result<String, String> {
    use crate::masq::{Runner, SystemRunner};
    SystemRunner
        .run("nft", &["list".to_owned(), "ruleset".to_owned()], None)
        .map_err(|e| e.to_string())
}

/// The overlay device `name` over netlink, plus its tx checksum offload if it is a kernel
/// vxlan device.
pub async fn device(name: &str, vni: u32) -> Result<DeviceFacts, String> {
    let nl = Netlink::connect().map_err(|e| e.to_string())?;
    let link = nl.link_by_name(name).await.map_err(|e| e.to_string())?;
    let tx_checksum = match &link {
        Some(l) if l.kind.as_deref() == Some("vxlan") => {
            Some(crate::io::ethtool::tx_checksum_ip_generic(name).map_err(|e| e.to_string()))
        }
        _ => None,
    };
    Ok(DeviceFacts {
        name: name.to_owned(),
        vni,
        carrier: link.as_ref().is_some_and(|l| l.lower_up),
        mtu: link.as_ref().and_then(|l| l.mtu),
        link: link.map(|l| {
            let vni = l.vxlan.as_ref().and_then(|v| v.vni);
            (l.kind, l.up, vni)
        }),
        tx_checksum,
    })
}

/// The addresses of this namespace's interfaces (empty when netlink fails).
pub async fn interface_addresses() -> Vec<IpAddr> {
    let Ok(nl) = Netlink::connect() else {
        return Vec::new();
    };
    nl.interfaces()
        .await
        .map(|ifs| {
            ifs.into_iter()
                .flat_map(|i| i.addrs.into_iter().map(|a| a.addr()))
                .collect()
        })
        .unwrap_or_default()
}

/// What the lease store says.
#[derive(Debug)]
pub struct StoreView {
    /// The network config JSON.
    pub config: String,
    /// Every lease.
    pub leases: Vec<Lease>,
    /// A public IP the store holds for this node (kube `node-public-ip`).
    pub stored_public_ip: Option<Ipv4Addr>,
}

/// Reads config and leases from the store the flags select (as the daemon opens it).
pub async fn store(flags: &Flags) -> Result<StoreView, String> {
    let store = crate::lease::open(flags).await.map_err(|e| e.to_string())?;
    let config = store.network_config().await.map_err(|e| e.to_string())?;
    let leases = store.list().await.map_err(|e| e.to_string())?;
    let stored_public_ip = store.stored_public_ips().await.ok().and_then(|(v4, _)| v4);
    Ok(StoreView {
        config,
        leases,
        stored_public_ip,
    })
}

/// Probes every peer (2 tries, `timeout` each) from this namespace; `Err` when no raw ICMP
/// socket of a family the targets need can be opened.
pub async fn probe(
    peers: Vec<(Peer, IpAddr)>,
    timeout: Duration,
) -> Result<Vec<PeerProbe>, String> {
    probe_sized(peers, timeout, None).await
}

/// [`probe`] with requests of `packet_len` bytes and Don't Fragment set when given.
pub async fn probe_sized(
    peers: Vec<(Peer, IpAddr)>,
    timeout: Duration,
    packet_len: Option<usize>,
) -> Result<Vec<PeerProbe>, String> {
    tokio::task::spawn_blocking(move || {
        let targets: Vec<IpAddr> = peers.iter().map(|(_, t)| *t).collect();
        let mut pinger = Pinger::open_for(&targets)
            .map_err(|e| format!("cannot open a raw ICMP socket (run as root): {e}"))?;
        if let Some(len) = packet_len {
            pinger
                .sized_dont_fragment(len)
                .map_err(|e| format!("cannot set Don't Fragment on the ICMP socket: {e}"))?;
        }
        let answered = pinger.probe(&targets, 2, timeout);
        Ok(peers
            .into_iter()
            .zip(answered)
            .map(|((peer, target), answered)| PeerProbe {
                peer,
                target,
                answered,
            })
            .collect())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Upper bound on files read from a CNI config directory, and on each file's size.
const MAX_CNI_FILES: usize = 1_000;
const MAX_CNI_FILE_BYTES: u64 = 1 << 20;

/// Each plugin of [`CNI_PLUGINS`] in `dir`: executable, present but not executable, missing.
pub fn cni_plugins(dir: &Path) -> Vec<(&'static str, PluginFile)> {
    use std::os::unix::fs::PermissionsExt;
    CNI_PLUGINS
        .iter()
        .map(|name| {
            let found = match std::fs::metadata(dir.join(name)) {
                Err(_) => PluginFile::Missing,
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                    PluginFile::Executable
                }
                Ok(_) => PluginFile::NotExecutable,
            };
            (*name, found)
        })
        .collect()
}

/// Every CNI config file (`.conf`, `.conflist`, `.json`) in `dir`, classified.
pub fn cni_configs(dir: &Path) -> Result<Vec<(String, ConfigKind)>, String> {
    use std::io::Read;
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for entry in entries.flatten().take(MAX_CNI_FILES) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_cni_config_name(&name) {
            continue;
        }
        let mut text = String::new();
        let kind = match std::fs::File::open(entry.path())
            .and_then(|f| f.take(MAX_CNI_FILE_BYTES).read_to_string(&mut text))
        {
            Ok(_) => classify_config(&text),
            Err(e) => ConfigKind::Invalid(format!("unreadable: {e}")),
        };
        out.push((name, kind));
    }
    Ok(out)
}

/// `net.bridge.bridge-nf-call-iptables` of this namespace.
pub fn br_netfilter() -> Result<String, String> {
    procfs::sysctl(procfs::BRIDGE_NF_CALL_IPTABLES).map_err(|e| e.to_string())
}

/// The namespace's vxlan devices (name, destination port; the kernel's default 8472 when
/// none is reported) and the UDP sockets (IPv4 and IPv6) bound to `port`, with the process
/// holding each.
pub async fn vxlan_port(port: u16) -> Result<(Vec<(String, u16)>, Vec<UdpSocket>), String> {
    let nl = Netlink::connect().map_err(|e| e.to_string())?;
    let devices = nl
        .links()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("vxlan"))
        .map(|l| {
            let p = l.vxlan.as_ref().and_then(|v| v.port).unwrap_or(8472);
            (l.name, p)
        })
        .collect();
    let inodes = procfs::udp_socket_inodes(port);
    let owners = procfs::socket_owners(&inodes);
    let sockets = inodes
        .into_iter()
        .map(|inode| UdpSocket {
            inode,
            owner: owners
                .iter()
                .find(|(i, _, _)| *i == inode)
                .map(|(_, pid, comm)| (*pid, comm.clone())),
        })
        .collect();
    Ok((devices, sockets))
}
