//! Reading `/proc` of the calling thread's namespace: sysctls, processes, UDP sockets. Every
//! read is bounded (entries, bytes); callers get raw text or parsed facts and decide.

use std::io;
use std::path::{Path, PathBuf};

/// `net.ipv4.ip_forward`.
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// `net.ipv6.conf.all.forwarding`.
pub const IP6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
/// `net.bridge.bridge-nf-call-iptables`: present only while `br_netfilter` is loaded.
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Upper bound on entries of `/proc` read when walking processes.
const MAX_PROCESSES: usize = 100_000;

/// The raw contents of a sysctl file such as [`IP_FORWARD`].
pub fn sysctl(path: &str) -> io::Result<String> {
    std::fs::read_to_string(path)
}

/// One process of `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// `/proc/<pid>/comm` (at most 15 bytes; empty when unreadable).
    pub comm: String,
    /// Base name of `argv[0]` from `/proc/<pid>/cmdline` (empty for kernel threads).
    pub exe: String,
}

/// `/proc/<pid>` of every process (at most [`MAX_PROCESSES`] entries of `/proc` read).
fn process_dirs() -> impl Iterator<Item = (u32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .take(MAX_PROCESSES)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// A process's `comm` (empty when it cannot be read).
fn comm(process_dir: &Path) -> String {
    std::fs::read_to_string(process_dir.join("comm"))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

/// Every process's pid, comm and `argv[0]` base name.
pub fn processes() -> Vec<Process> {
    process_dirs()
        .map(|(pid, base)| {
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
            Process {
                pid,
                comm: comm(&base),
                exe,
            }
        })
        .collect()
}

/// Inodes of the UDP sockets (IPv4 and IPv6) bound to local `port`, from `/proc/net/udp` and
/// `/proc/net/udp6` (a missing file contributes nothing).
pub fn udp_socket_inodes(port: u16) -> Vec<u64> {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .flat_map(|text| parse_net_udp(&text))
        .filter(|(p, _)| *p == port)
        .map(|(_, inode)| inode)
        .collect()
}

/// Local ports and inodes of `/proc/net/udp` lines (the header skipped, bad lines ignored).
pub fn parse_net_udp(text: &str) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            let inode = cols.get(9)?.parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

/// (inode, pid, comm) for the processes holding the sockets `inodes` (from `/proc/*/fd`);
/// inode 0 (a kernel socket) has no holder.
pub fn socket_owners(inodes: &[u64]) -> Vec<(u64, u32, String)> {
    let wanted: Vec<(u64, String)> = inodes
        .iter()
        .filter(|i| **i != 0)
        .map(|i| (*i, format!("socket:[{i}]")))
        .collect();
    let mut out = Vec::new();
    if wanted.is_empty() {
        return out;
    }
    for (pid, base) in process_dirs() {
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some((inode, _)) = wanted.iter().find(|(_, w)| *w == target) {
                out.push((*inode, pid, comm(&base)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_udp_parsing() {
        let t = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 00000000:2118 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0\n\
  2: 0100A8C6:2118 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41234 2 0000000000000000 0\n\
  garbage\n";
        assert_eq!(parse_net_udp(t), vec![(8472, 0), (8472, 41234)]);
    }

    #[test]
    fn this_process_is_listed() {
        let me = std::process::id();
        let procs = processes();
        let mine = procs.iter().find(|p| p.pid == me).expect("own pid");
        assert!(!mine.exe.is_empty() && !mine.comm.is_empty(), "{mine:?}");
    }

    #[test]
    fn own_udp_socket_is_found_with_its_owner() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = sock.local_addr().expect("addr").port();
        let inodes = udp_socket_inodes(port);
        assert_eq!(inodes.len(), 1, "{inodes:?}");
        let owners = socket_owners(&inodes);
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert_eq!(owners[0].1, std::process::id());
        assert!(socket_owners(&[0]).is_empty());
    }
}
