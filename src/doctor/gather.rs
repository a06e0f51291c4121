//! Gathering facts from the node (the only part of `doctor` that does IO): sysctls,
//! processes, iptables, the overlay device, the lease store, ICMP probes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use super::checks::{DeviceFacts, PeerProbe, Process};
use crate::backend::Peer;
use crate::config::flags::Flags;
use crate::io::icmp::Pinger;
use crate::lease::Lease;
use crate::masq::{Iptables, Table};
use crate::netlink::{IpFamily, Netlink};

/// Upper bound on processes read from `/proc`.
const MAX_PROCESSES: usize = 100_000;

/// `/proc/sys/net/ipv4/ip_forward` of this namespace.
pub fn ip_forward() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map_err(|e| e.to_string())
}

/// Every process's pid, comm and `argv[0]` base name.
pub fn processes() -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten().take(MAX_PROCESSES) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let base = entry.path();
        let comm = std::fs::read_to_string(base.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .unwrap_or_default();
        let exe = std::fs::read(base.join("cmdline"))
            .ok()
            .and_then(|b| {
                let first = b.split(|&c| c == 0).next()?.to_vec();
                let s = String::from_utf8_lossy(&first).into_owned();
                Path::new(&s)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        out.push(Process { pid, comm, exe });
    }
    out
}

/// `iptables -t filter -S` with the same runner and flags flanneld's rules use.
pub fn filter_rules() -> Result<String, String> {
    let ipt = Iptables::detect(IpFamily::V4).map_err(|e| e.to_string())?;
    ipt.list(Table::Filter)
        .map(|lines| lines.join("\n"))
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
        link: link.map(|l| {
            let vni = l.vxlan.as_ref().and_then(|v| v.vni);
            (l.kind, l.up, vni)
        }),
        tx_checksum,
    })
}

/// IPv4 addresses of this namespace's interfaces.
pub fn interface_addresses() -> Vec<IpAddr> {
    crate::io::iface::interfaces()
        .map(|ifs| {
            ifs.into_iter()
                .flat_map(|i| i.addrs.into_iter().map(|a| a.addr))
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

/// Reads config and leases from the store the flags select (the daemon's [`open_store`]).
///
/// [`open_store`]: crate::daemon::open_store
pub async fn store(flags: &Flags) -> Result<StoreView, String> {
    let store = crate::daemon::open_store(flags)
        .await
        .map_err(|e| e.to_string())?;
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
/// socket can be opened.
pub async fn probe(
    peers: Vec<(Peer, Ipv4Addr)>,
    timeout: Duration,
) -> Result<Vec<PeerProbe>, String> {
    tokio::task::spawn_blocking(move || {
        let mut pinger = Pinger::open()
            .map_err(|e| format!("cannot open a raw ICMP socket (run as root): {e}"))?;
        let targets: Vec<Ipv4Addr> = peers.iter().map(|(_, t)| *t).collect();
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
