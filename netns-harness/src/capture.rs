//! Packet capture on the underlay bridge and its verification with tshark as an independent
//! dissector (field problem P2): every VXLAN frame's outer IPv4 header and UDP checksums (over
//! IPv6 the UDP checksum must be present and valid) and inner IPv4/TCP/UDP/ICMP/ICMPv6
//! checksums are validated.
//!
//! tshark 4.0 names used (checked with `tshark -G fields` / `-G values` / `-G defaultprefs`):
//! `vxlan.vni`, `ip.checksum.status`, `udp.checksum`, `udp.checksum.status`,
//! `tcp.checksum.status`, `icmp.checksum.status`, `icmpv6.checksum.status`, `frame.protocols`,
//! `ipv6.src`; status values 0 Bad, 1 Good, 2 Unverified,
//! 3 Not present, 4 Illegal; preferences `ip.check_checksum`, `udp.check_checksum`,
//! `tcp.check_checksum` (all FALSE by default).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cluster::{CaptureState, Cluster};
use crate::cmd;
use crate::sys;

/// How to capture.
#[derive(Debug, Clone)]
pub struct CaptureOpts {
    /// Interface inside the underlay namespace (default `br0`; in promiscuous mode the bridge
    /// device sees every frame forwarded between nodes).
    pub iface: String,
    /// Stop after this many packets.
    pub max_packets: u64,
    /// Stop after this many seconds.
    pub max_seconds: u32,
    /// Optional pcap filter expression (e.g. `udp port 8472`).
    pub filter: Option<String>,
}

impl Default for CaptureOpts {
    fn default() -> Self {
        CaptureOpts {
            iface: "br0".into(),
            max_packets: 100_000,
            max_seconds: 300,
            filter: None,
        }
    }
}

/// A capture started by [`Cluster::start_capture`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// Name within the run (`cap1`, ...).
    pub name: String,
    /// The pcap file being written.
    pub pcap: PathBuf,
}

/// What tshark found in a capture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureReport {
    /// Frames in the file.
    pub frames: u64,
    /// Frames decoded as VXLAN.
    pub vxlan_frames: u64,
    /// VNIs seen.
    pub vnis: BTreeSet<u32>,
    /// VXLAN frames whose outer UDP checksum is zero (allowed for IPv4, RFC 7348; over IPv6
    /// a zero checksum counts as bad).
    pub outer_udp_zero: u64,
    /// VXLAN frames over IPv6 (no header checksum; their UDP checksum is mandatory).
    pub outer_ip6: u64,
    /// Bad outer IPv4 header checksums.
    pub bad_outer_ip: u64,
    /// Bad outer UDP checksums: wrong, or zero over IPv6.
    pub bad_outer_udp: u64,
    /// Inner IPv4 packets / bad inner IPv4 header checksums.
    pub inner_ip: u64,
    /// Bad inner IPv4 header checksums.
    pub bad_inner_ip: u64,
    /// Inner IPv6 packets.
    pub inner_ip6: u64,
    /// Inner TCP segments (both families).
    pub inner_tcp: u64,
    /// Inner TCP segments over IPv6.
    pub inner_tcp6: u64,
    /// Bad inner TCP checksums.
    pub bad_inner_tcp: u64,
    /// Inner UDP datagrams.
    pub inner_udp: u64,
    /// Bad inner UDP checksums.
    pub bad_inner_udp: u64,
    /// Inner ICMP and ICMPv6 messages.
    pub inner_icmp: u64,
    /// Bad inner ICMP and ICMPv6 checksums.
    pub bad_inner_icmp: u64,
    /// The first few frames with a bad checksum: number and outer and inner addresses
    /// (`frame 7: outer a -> b, inner c -> d`), so a failure says which node sent them.
    pub bad_details: Vec<String>,
    /// VXLAN frames per outer source address (the sending node).
    pub vxlan_by_src: BTreeMap<String, u64>,
    /// Frames with a bad inner checksum (IPv4 header, TCP, UDP or ICMP) per outer source:
    /// what one node's data plane sent, whatever the link did to outer checksums.
    pub bad_inner_by_src: BTreeMap<String, u64>,
}

impl CaptureReport {
    /// Sum of all bad-checksum counters.
    pub fn bad_total(&self) -> u64 {
        self.bad_outer_ip
            + self.bad_outer_udp
            + self.bad_inner_ip
            + self.bad_inner_tcp
            + self.bad_inner_udp
            + self.bad_inner_icmp
    }

    /// Frames from `src` (outer source address) with a bad inner checksum.
    pub fn bad_inner_from(&self, src: &str) -> u64 {
        self.bad_inner_by_src.get(src).copied().unwrap_or(0)
    }

    /// VXLAN frames from `src` (outer source address).
    pub fn vxlan_from(&self, src: &str) -> u64 {
        self.vxlan_by_src.get(src).copied().unwrap_or(0)
    }

    /// At least one VXLAN frame and no bad checksum anywhere.
    pub fn all_checksums_ok(&self) -> bool {
        self.vxlan_frames > 0 && self.bad_total() == 0
    }
}

impl std::fmt::Display for CaptureReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "frames {}  vxlan {} ({} over ipv6)  vnis {:?}",
            self.frames, self.vxlan_frames, self.outer_ip6, self.vnis
        )?;
        writeln!(
            f,
            "outer: bad ipv4 {}  bad udp {}  zero udp checksum over ipv4 {} (allowed)",
            self.bad_outer_ip, self.bad_outer_udp, self.outer_udp_zero
        )?;
        writeln!(
            f,
            "inner: ipv4 {} (bad {})  ipv6 {}  tcp {} ({} over ipv6; bad {})  udp {} (bad {})  icmp/icmpv6 {} (bad {})",
            self.inner_ip,
            self.bad_inner_ip,
            self.inner_ip6,
            self.inner_tcp,
            self.inner_tcp6,
            self.bad_inner_tcp,
            self.inner_udp,
            self.bad_inner_udp,
            self.inner_icmp,
            self.bad_inner_icmp
        )?;
        let verdict = if self.all_checksums_ok() {
            "PASS"
        } else if self.vxlan_frames == 0 {
            "FAIL (no VXLAN frames)"
        } else {
            "FAIL (bad checksums)"
        };
        write!(f, "RESULT: {verdict}")?;
        if !self.bad_details.is_empty() {
            write!(f, "; first bad frames: {}", self.bad_details.join("; "))?;
        }
        Ok(())
    }
}

const BAD: &str = "0";
/// `udp.checksum.status` of a zero UDP checksum over IPv6 (RFC 8200 makes it mandatory).
const ILLEGAL: &str = "4";

fn statuses(field: &str) -> Vec<&str> {
    field.split(',').filter(|s| !s.is_empty()).collect()
}

/// The network layers of a frame, outermost first, from `frame.protocols`
/// (`eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:tcp`): true for IPv6. Without the field
/// (older callers) every layer is taken to be IPv4.
fn net_layers(protocols: &str, ipv4_layers: usize) -> Vec<bool> {
    if protocols.is_empty() {
        return vec![false; ipv4_layers];
    }
    protocols
        .split(':')
        .filter_map(|p| match p {
            "ip" => Some(false),
            "ipv6" => Some(true),
            _ => None,
        })
        .collect()
}

/// Folds one tshark output line into the report. Fields, each with all occurrences (comma
/// separated, outermost first): frame.number, vxlan.vni, ip.checksum.status, udp.checksum,
/// udp.checksum.status, tcp.checksum.status, icmp.checksum.status, ip.src, ip.dst,
/// frame.protocols, ipv6.src, ipv6.dst, icmpv6.checksum.status. `frame.protocols` tells
/// which network layer is IPv4 and which IPv6, so the IPv4 fields (header checksum, addresses)
/// and the IPv6 ones are matched to the outer or the inner packet.
pub fn account_line(r: &mut CaptureReport, line: &str) {
    let f: Vec<&str> = line.split('|').collect();
    let get = |i: usize| f.get(i).copied().unwrap_or("");
    r.frames += 1;
    let vni = get(1);
    if vni.is_empty() {
        return;
    }
    r.vxlan_frames += 1;
    for v in statuses(vni) {
        if let Ok(n) = v.parse() {
            r.vnis.insert(n);
        }
    }
    let ip = statuses(get(2));
    let layers = net_layers(get(9), ip.len());
    let (src4, dst4) = (statuses(get(7)), statuses(get(8)));
    let (src6, dst6) = (statuses(get(10)), statuses(get(11)));
    // The address of network layer `k` (0 outer, 1 inner): its occurrence among the layers
    // of its family.
    let addr = |k: usize, v4: &Vec<&str>, v6: &Vec<&str>| -> String {
        let Some(&is6) = layers.get(k) else {
            return "?".into();
        };
        let nth = layers[..k].iter().filter(|&&x| x == is6).count();
        let list = if is6 { v6 } else { v4 };
        list.get(nth).copied().unwrap_or("?").to_owned()
    };
    let outer6 = layers.first() == Some(&true);
    let inner6 = layers.get(1) == Some(&true);
    let outer_src = addr(0, &src4, &src6);
    *r.vxlan_by_src.entry(outer_src.clone()).or_default() += 1;
    if outer6 {
        r.outer_ip6 += 1;
    }
    let mut bad = false;
    let mut bad_inner = false;
    // IPv4 header checksums: the outer one if the outer layer is IPv4, then the inner ones.
    let (outer_ip, inner_ips) = if outer6 || ip.is_empty() {
        (None, &ip[..])
    } else {
        (ip.first(), &ip[1..])
    };
    if outer_ip == Some(&BAD) {
        r.bad_outer_ip += 1;
        bad = true;
    }
    if !inner_ips.is_empty() {
        r.inner_ip += 1;
        if inner_ips.contains(&BAD) {
            r.bad_inner_ip += 1;
            bad_inner = true;
        }
    }
    if inner6 {
        r.inner_ip6 += 1;
    }
    let udp_vals = statuses(get(3));
    let udp = statuses(get(4));
    let zero = udp_vals.first().is_some_and(|v| {
        v.trim_start_matches("0x")
            .trim_start_matches('0')
            .is_empty()
    });
    if zero && !outer6 {
        r.outer_udp_zero += 1;
    } else if zero || udp.first().is_some_and(|s| *s == BAD || *s == ILLEGAL) {
        // Over IPv6 a zero outer UDP checksum is as bad as a wrong one.
        r.bad_outer_udp += 1;
        bad = true;
    }
    if udp.len() > 1 {
        r.inner_udp += 1;
        if udp[1..].iter().any(|s| *s == BAD || *s == ILLEGAL) {
            r.bad_inner_udp += 1;
            bad_inner = true;
        }
    }
    let tcp = statuses(get(5));
    if !tcp.is_empty() {
        r.inner_tcp += 1;
        if inner6 {
            r.inner_tcp6 += 1;
        }
        if tcp.contains(&BAD) {
            r.bad_inner_tcp += 1;
            bad_inner = true;
        }
    }
    let icmp: Vec<&str> = statuses(get(6))
        .into_iter()
        .chain(statuses(get(12)))
        .collect();
    if !icmp.is_empty() {
        r.inner_icmp += 1;
        if icmp.contains(&BAD) {
            r.bad_inner_icmp += 1;
            bad_inner = true;
        }
    }
    if bad_inner {
        *r.bad_inner_by_src.entry(outer_src.clone()).or_default() += 1;
    }
    if (bad || bad_inner) && r.bad_details.len() < 10 {
        if let Ok(n) = get(0).parse::<u64>() {
            r.bad_details.push(format!(
                "frame {n}: outer {outer_src} -> {}, inner {} -> {}",
                addr(0, &dst4, &dst6),
                addr(1, &src4, &src6),
                addr(1, &dst4, &dst6)
            ));
        }
    }
}

/// Verifies a pcap with tshark: decode `udp.port == vxlan_port` as VXLAN, validate checksums.
pub fn verify_pcap(pcap: &Path, vxlan_port: u16) -> Result<CaptureReport> {
    if !pcap.is_file() {
        bail!("capture file {} does not exist", pcap.display());
    }
    let out = cmd::run(
        Command::new("tshark")
            .arg("-n")
            .arg("-r")
            .arg(pcap)
            .args(["-d", &format!("udp.port=={vxlan_port},vxlan")])
            .args(["-o", "ip.check_checksum:TRUE"])
            .args(["-o", "udp.check_checksum:TRUE"])
            .args(["-o", "tcp.check_checksum:TRUE"])
            .args(["-T", "fields", "-E", "occurrence=a", "-E", "separator=|"])
            .args([
                "-e",
                "frame.number",
                "-e",
                "vxlan.vni",
                "-e",
                "ip.checksum.status",
            ])
            .args(["-e", "udp.checksum", "-e", "udp.checksum.status"])
            .args(["-e", "tcp.checksum.status", "-e", "icmp.checksum.status"])
            .args(["-e", "ip.src", "-e", "ip.dst", "-e", "frame.protocols"])
            .args([
                "-e",
                "ipv6.src",
                "-e",
                "ipv6.dst",
                "-e",
                "icmpv6.checksum.status",
            ]),
        Duration::from_secs(600),
    )?;
    if !out.status.success() {
        bail!(
            "tshark failed on {} ({}): {}",
            pcap.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut r = CaptureReport::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.trim().is_empty() {
            account_line(&mut r, line);
        }
    }
    Ok(r)
}

impl Cluster {
    /// Starts `tcpdump` on the underlay (bounded by packet count and duration), waiting until it
    /// listens.
    pub fn start_capture(&mut self, opts: &CaptureOpts) -> Result<Capture> {
        let n = self.state.captures.len() + 1;
        let name = (n..n + 1000)
            .map(|i| format!("cap{i}"))
            .find(|c| !self.run_dir().join(format!("{c}.pcap")).exists())
            .unwrap_or_else(|| format!("cap{n}"));
        let pcap = self.run_dir().join(format!("{name}.pcap"));
        let log = self.run_dir().join(format!("{name}.log"));
        let ns = self.underlay_ns();
        let count = opts.max_packets.max(1).to_string();
        let secs = opts.max_seconds.max(1).to_string();
        let pcap_s = pcap.to_string_lossy().into_owned();
        let mut args: Vec<&str> = vec![
            "tcpdump",
            "-n",
            "-i",
            &opts.iface,
            "-s",
            "0",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
            &pcap_s,
            "-c",
            &count,
            "-G",
            &secs,
            "-W",
            "1",
        ];
        if let Some(f) = &opts.filter {
            args.push(f);
        }
        let (mut child, rec) = cmd::spawn_in_ns(&ns, &args, &log, &format!("tcpdump {name}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on")) {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!("tcpdump exited ({st}): {}", cmd::tail(&log, 5));
            }
            if Instant::now() >= deadline || sys::interrupted() {
                cmd::stop_process(&rec, Some(child));
                sys::check_interrupted()?;
                bail!("tcpdump did not start listening: {}", cmd::tail(&log, 5));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.insert(rec.pid, child);
        self.state.captures.push(CaptureState {
            name: name.clone(),
            ns,
            iface: opts.iface.clone(),
            pcap: pcap.clone(),
            proc: rec,
        });
        self.save()?;
        Ok(Capture { name, pcap })
    }

    /// Stops a capture (SIGTERM lets tcpdump flush) and returns the pcap path.
    pub fn stop_capture(&mut self, capture: &str) -> Result<PathBuf> {
        let Some(i) = self.state.captures.iter().position(|c| c.name == capture) else {
            bail!("no running capture {capture:?}");
        };
        let c = self.state.captures.remove(i);
        let child = self.children.remove(&c.proc.pid);
        if !cmd::stop_process(&c.proc, child) {
            bail!("tcpdump pid {} did not stop", c.proc.pid);
        }
        self.save()?;
        Ok(c.pcap)
    }

    /// Names of running captures, oldest first.
    pub fn captures(&self) -> Vec<Capture> {
        self.state
            .captures
            .iter()
            .map(|c| Capture {
                name: c.name.clone(),
                pcap: c.pcap.clone(),
            })
            .collect()
    }

    /// Verifies a pcap with this run's VXLAN port.
    pub fn verify_capture(&self, pcap: &Path) -> Result<CaptureReport> {
        verify_pcap(pcap, self.net_conf()?.effective_port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting() {
        let mut r = CaptureReport::default();
        // Good TCP frame, good ICMP frame with outer zero checksum, non-VXLAN frame.
        account_line(&mut r, "1|1|1,1|0xaa8a|1|1|");
        account_line(&mut r, "2|1|1,1|0x0000|3||1");
        account_line(&mut r, "3||1|0x1234|1||");
        assert_eq!((r.frames, r.vxlan_frames), (3, 2));
        assert_eq!(r.outer_udp_zero, 1);
        assert_eq!((r.inner_tcp, r.inner_icmp, r.inner_ip), (1, 1, 2));
        assert!(r.all_checksums_ok(), "{r}");
        // Bad outer UDP and bad inner TCP (the GSO/partial-checksum signature).
        account_line(&mut r, "4|1|1,1|0x5555|0|0|");
        // Inner UDP with bad checksum, inner IP bad.
        account_line(
            &mut r,
            "5|1|1,0|0x5555,0x1111|1,0|||198.18.0.2,10.244.1.2|198.18.0.3,10.244.2.3",
        );
        assert_eq!(r.bad_outer_udp, 1);
        assert_eq!(r.bad_inner_tcp, 1);
        assert_eq!(r.bad_inner_udp, 1);
        assert_eq!(r.bad_inner_ip, 1);
        assert_eq!(
            r.bad_details,
            [
                "frame 4: outer ? -> ?, inner ? -> ?",
                "frame 5: outer 198.18.0.2 -> 198.18.0.3, inner 10.244.1.2 -> 10.244.2.3"
            ]
        );
        assert!(!r.all_checksums_ok());
        // Per sender: frame 4's bad outer UDP alone is not an inner fault.
        assert_eq!(r.vxlan_from("198.18.0.2"), 1);
        assert_eq!(r.bad_inner_from("198.18.0.2"), 1);
        assert_eq!(r.bad_inner_from("?"), 1, "frame 4's inner TCP");
        assert_eq!(r.vxlan_from("?"), 3);
        account_line(
            &mut r,
            "6|1|1,1|0x5555|0|1||198.18.0.7,10.244.7.2|198.18.0.3,10.244.2.3",
        );
        assert_eq!(
            (r.vxlan_from("198.18.0.7"), r.bad_inner_from("198.18.0.7")),
            (1, 0)
        );
        assert!(r.to_string().contains("frame 5: outer 198.18.0.2"));
        assert!(r.to_string().contains("bad checksums"));
        assert!(!CaptureReport::default().all_checksums_ok());
    }

    #[test]
    fn ipv6_accounting() {
        // Lines as tshark 4.0 prints them for a dual-stack capture (frames 45, 46, 47 and 101
        // of one: ICMPv6, TCP and UDP over IPv6 VXLAN over IPv6, and an ICMPv6 error quoting
        // an IPv6/UDP packet).
        let good = [
            "45|1||0xba63|1|||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:icmpv6:data|2001:db8:18::1,fd42:244:0:27::|2001:db8:18::2,fd42:244:0:28::2|1",
            "46|1||0xbc7e|1|1||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:tcp|2001:db8:18::1,fd42:244:0:27::|2001:db8:18::2,fd42:244:0:28::2|",
            "47|1||0xa2da,0xab9c|1,1|||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:udp:data|2001:db8:18::1,fd42:244:0:27::|2001:db8:18::2,fd42:244:0:28::2|",
            "101|1||0x21d8,0xab9c|1,1|||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:icmpv6:ipv6:udp:data|2001:db8:18::1,fd42:244:0:27::,fd42:244:0:28::2|2001:db8:18::2,fd42:244:0:28::2,fd42:244:0:27::|1",
        ];
        let mut r = CaptureReport::default();
        for l in good {
            account_line(&mut r, l);
        }
        assert!(r.all_checksums_ok(), "{r}");
        assert_eq!((r.vxlan_frames, r.outer_ip6, r.inner_ip6), (4, 4, 4));
        assert_eq!((r.inner_ip, r.bad_outer_ip), (0, 0), "no IPv4 layer at all");
        assert_eq!(
            (r.inner_tcp, r.inner_tcp6, r.inner_udp, r.inner_icmp),
            (1, 1, 2, 2)
        );
        assert_eq!(r.vxlan_from("2001:db8:18::1"), 4);

        // A zero outer UDP checksum is allowed over IPv4 but not over IPv6 (status 4, Illegal).
        let mut r = CaptureReport::default();
        account_line(
            &mut r,
            "1|1||0x0000|4|1||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:tcp|2001:db8:18::3,fd42:244:0:3::|2001:db8:18::4,fd42:244:0:4::2|",
        );
        assert_eq!((r.bad_outer_udp, r.outer_udp_zero), (1, 0));
        assert_eq!(
            r.bad_inner_from("2001:db8:18::3"),
            0,
            "the inner TCP is fine"
        );
        assert_eq!(
            r.bad_details,
            ["frame 1: outer 2001:db8:18::3 -> 2001:db8:18::4, inner fd42:244:0:3:: -> fd42:244:0:4::2"]
        );
        // A wrong (non-zero) outer UDP checksum over IPv6, a bad inner TCP over IPv6, a bad
        // ICMPv6 checksum.
        account_line(
            &mut r,
            "2|1||0x1234|0|0||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:tcp|2001:db8:18::3,fd42:244:0:3::|2001:db8:18::4,fd42:244:0:4::2|",
        );
        account_line(
            &mut r,
            "3|1||0x4321|1|||||eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:icmpv6:data|2001:db8:18::4,fd42:244:0:4::2|2001:db8:18::3,fd42:244:0:3::|0",
        );
        assert_eq!(r.bad_outer_udp, 2);
        assert_eq!((r.bad_inner_tcp, r.bad_inner_icmp), (1, 1));
        assert_eq!(r.bad_inner_from("2001:db8:18::3"), 1);
        assert_eq!(r.bad_inner_from("2001:db8:18::4"), 1);
        assert!(!r.all_checksums_ok());

        // Mixed layers: IPv6 inside IPv4 and IPv4 inside IPv6. The single IPv4 header
        // checksum belongs to whichever layer is IPv4, and so do the addresses.
        let mut r = CaptureReport::default();
        account_line(
            &mut r,
            "4|1|1|0x0000|3|1||198.18.0.1|198.18.0.2|eth:ethertype:ip:udp:vxlan:eth:ethertype:ipv6:tcp|fd42:244:0:1::2|fd42:244:0:2::2|",
        );
        assert!(r.all_checksums_ok(), "{r}");
        assert_eq!(
            (r.outer_udp_zero, r.inner_ip, r.inner_ip6, r.outer_ip6),
            (1, 0, 1, 0)
        );
        account_line(
            &mut r,
            "5|1|0|0xabcd|1|||10.244.1.2|10.244.2.2|eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ip:icmp|2001:db8:18::1|2001:db8:18::2|",
        );
        assert_eq!((r.bad_outer_ip, r.bad_inner_ip, r.inner_ip), (0, 1, 1));
        assert_eq!(
            r.bad_details,
            ["frame 5: outer 2001:db8:18::1 -> 2001:db8:18::2, inner 10.244.1.2 -> 10.244.2.2"]
        );
    }
}
