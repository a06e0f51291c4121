//! Golden frames from the Linux kernel's VXLAN driver.
//!
//! Node A is a kernel `flannel.1` device configured as flannel does (compat §7.4: neighbour,
//! FDB, onlink route). Node B plays our userspace VTEP: it only captures with tcpdump and
//! injects datagrams. The capture is stored in `tests/fixtures/kernel_vxlan.pcap`:
//!
//! * `fixture_frames_decap_and_reencap_exactly` (unprivileged) decapsulates every kernel
//!   frame of the fixture with our [`decap`] and re-encapsulates the inner packet with our
//!   [`encap`], which must give back the kernel's bytes exactly;
//! * `live_kernel_frames_match_fixture_and_interoperate` (root) re-captures live, runs the
//!   same checks, compares the frames' structure with the fixture, and checks that the kernel
//!   accepts what we send: our ARP reply fills its neighbour entry, and our encapsulated echo
//!   request gets an echo reply. `FLANNEL_REGEN_FIXTURES=1` rewrites the fixture.
//!
//! All traffic stays inside two namespaces created here (underlay 198.18.0.0/24), deleted on
//! success, failure and panic.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flannel_rs::dataplane::{
    decap, encap, DecapVerdict, DropReason, EncapVerdict, IcmpLimiter, LocalVtep, PeerTable,
    RemoteVtep, VXLAN_HEADROOM,
};
use flannel_rs::wire::{arp, ethernet, ipv4, ipv6, udp, EtherType, IpProtocol, MacAddr};
use ipnet::{Ipv4Net, Ipv6Net};

const VNI: u32 = 1;
const PORT: u16 = 8472;
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MAC_A: MacAddr = MacAddr([0x02, 0xf1, 0xa0, 0x00, 0x00, 0x01]);
const MAC_B: MacAddr = MacAddr([0x02, 0xf1, 0xb0, 0x00, 0x00, 0x02]);
const VTEP_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 0);
const VTEP_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 0);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const VTEP_A6: &str = "fd10:244:1::";
const VTEP_B6: &str = "fd10:244:2::";
const POD_B6: &str = "fd10:244:2::5";
const UDP_TEXT: &str = "flannel-rs golden frame";
const INTEROP_ID: u16 = 0x4652;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kernel_vxlan.pcap")
}

/// One node of the fixture: underlay address, VTEP MAC, VTEP addresses (IPv4, IPv6); its pod
/// subnets are the VTEP addresses' /24 and /64.
struct Node(Ipv4Addr, MacAddr, Ipv4Addr, &'static str);

const NODE_A: Node = Node(UNDERLAY_A, MAC_A, VTEP_A, VTEP_A6);
const NODE_B: Node = Node(UNDERLAY_B, MAC_B, VTEP_B, VTEP_B6);

/// Node `me`'s data-plane view with `peer` as its only peer.
fn view(me: &Node, peer: &Node) -> (PeerTable, LocalVtep) {
    let subnets = |n: &Node| -> (Ipv4Net, Ipv6Net) {
        let v4 = format!("{}/24", n.2).parse().unwrap();
        (v4, format!("{}/64", n.3).parse().unwrap())
    };
    let remote = RemoteVtep {
        public_ip: peer.0.into(),
        mac: peer.1,
        vni: VNI,
    };
    let (peer4, peer6) = subnets(peer);
    let (own4, own6) = subnets(me);
    let local = LocalVtep {
        vni: VNI,
        mac: me.1,
        addr_v4: Some(me.2),
        addr_v6: Some(me.3.parse().unwrap()),
        error_source_v4: None,
        error_source_v6: None,
        subnet_v4: Some(own4),
        subnet_v6: Some(own6),
    };
    let table = PeerTable::new([(peer4.into(), remote), (peer6.into(), remote)]);
    (table, local)
}

/// Node B's view (our userspace VTEP receiving from the kernel on A).
fn view_b() -> (PeerTable, LocalVtep) {
    view(&NODE_B, &NODE_A)
}

/// Node A's view (what the kernel on A does when it sends to B).
fn view_a() -> (PeerTable, LocalVtep) {
    view(&NODE_A, &NODE_B)
}

// ---------------------------------------------------------------------------------------
// pcap reading (classic libpcap format, Ethernet link type), parsed with our own wire views.

/// One captured VXLAN datagram: outer addresses and the UDP payload.
#[derive(Debug, Clone)]
struct Datagram {
    src: IpAddr,
    dst: IpAddr,
    payload: Vec<u8>,
}

fn read_pcap(bytes: &[u8]) -> Vec<Datagram> {
    assert!(bytes.len() >= 24, "pcap shorter than its global header");
    let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let a: [u8; 4] = b[at..at + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(u32_at(bytes, 20) & 0xffff, 1, "link type must be Ethernet");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let incl = u32_at(bytes, at + 8) as usize;
        let Some(frame) = bytes.get(at + 16..at + 16 + incl) else {
            break; // a record still being written
        };
        at += 16 + incl;
        if let Some(d) = parse_outer(frame) {
            out.push(d);
        }
    }
    out
}

fn parse_outer(frame: &[u8]) -> Option<Datagram> {
    let eth = ethernet::Frame::new_checked(frame).ok()?;
    if eth.ethertype() != EtherType::Ipv4 {
        return None;
    }
    let ip = ipv4::Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp || ip.frag_offset() != 0 || ip.more_frags() {
        return None;
    }
    let u = udp::Packet::new_checked(ip.payload()).ok()?;
    if u.dst_port() != PORT {
        return None;
    }
    let (src, dst) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
    assert!(
        u.verify_checksum(&src, &dst),
        "outer UDP checksum {src} -> {dst}"
    );
    Some(Datagram {
        src,
        dst,
        payload: u.payload().to_vec(),
    })
}

/// What a frame is, independent of per-run values (IP IDs, ICMP ids, timestamps).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ArpRequest {
        sender: Ipv4Addr,
        target: Ipv4Addr,
    },
    ArpReply {
        sender: Ipv4Addr,
        target: Ipv4Addr,
    },
    Ip {
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        icmp_type: Option<u8>,
        len: usize,
    },
}

/// The structure of a captured datagram: VXLAN header, inner MACs, and the inner kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Signature {
    outer_src: IpAddr,
    vxlan_header: [u8; 8],
    inner_dst: [u8; 6],
    inner_src: [u8; 6],
    kind: Kind,
}

fn signature(d: &Datagram) -> Signature {
    let p = &d.payload;
    assert!(p.len() >= VXLAN_HEADROOM, "datagram too short: {p:02x?}");
    let eth = ethernet::Frame::new_checked(&p[8..]).unwrap();
    let kind = match eth.ethertype() {
        EtherType::Arp => {
            let a = arp::Repr::parse(&arp::Packet::new_checked(eth.payload()).unwrap()).unwrap();
            let (sender, target) = (a.source_protocol_addr, a.target_protocol_addr);
            match a.operation {
                arp::Operation::Request => Kind::ArpRequest { sender, target },
                arp::Operation::Reply => Kind::ArpReply { sender, target },
                op => panic!("ARP operation {op:?}"),
            }
        }
        EtherType::Ipv4 => {
            let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
            let proto = u8::from(ip.next_header());
            Kind::Ip {
                src: ip.src_addr().into(),
                dst: ip.dst_addr().into(),
                proto,
                icmp_type: (proto == 1).then(|| ip.payload()[0]),
                len: ip.total_len().into(),
            }
        }
        EtherType::Ipv6 => {
            let ip = ipv6::Packet::new_checked(eth.payload()).unwrap();
            let proto = u8::from(ip.next_header());
            Kind::Ip {
                src: ip.src_addr().into(),
                dst: ip.dst_addr().into(),
                proto,
                icmp_type: (proto == 58).then(|| ip.payload()[0]),
                len: ip.total_len(),
            }
        }
        other => panic!("unexpected inner EtherType {other:?}"),
    };
    Signature {
        outer_src: d.src,
        vxlan_header: p[..8].try_into().unwrap(),
        inner_dst: eth.dst_addr().0,
        inner_src: eth.src_addr().0,
        kind,
    }
}

// ---------------------------------------------------------------------------------------
// The checks shared by the fixture test and the live test.

/// Decapsulates every kernel frame as node B and re-encapsulates IP packets as node A; the
/// result must equal the kernel's bytes. Returns the decap verdicts for further checks.
fn check_kernel_frames(frames: &[Datagram]) -> Vec<(Signature, DecapVerdict, Vec<u8>)> {
    let (table_b, local_b) = view_b();
    let (table_a, local_a) = view_a();
    let mut out = Vec::new();
    for d in frames.iter().filter(|d| d.src == IpAddr::V4(UNDERLAY_A)) {
        assert_eq!(
            d.dst,
            IpAddr::V4(UNDERLAY_B),
            "the kernel sends to the FDB destination"
        );
        let mut rx = d.payload.clone();
        let n = rx.len();
        let verdict = decap(&mut rx, 0..n, d.src, &table_b, &local_b);
        // IPv6 multicast (MLD, DAD) that the kernel floods while the all-zero FDB entry
        // exists: not for our VTEP, and timing-dependent, so not part of the signature set.
        let inner_dst = d.payload.get(8..14).unwrap_or(&[]);
        if inner_dst.first().is_some_and(|b| b & 1 == 1) && inner_dst != MacAddr::BROADCAST.0 {
            assert_eq!(verdict, DecapVerdict::Drop(DropReason::WrongDstMac));
            continue;
        }
        let sig = signature(d);
        match (&sig.kind, &verdict) {
            (Kind::Ip { .. }, DecapVerdict::Deliver { packet }) => {
                assert_eq!(packet.start, VXLAN_HEADROOM);
                // Re-encapsulate the inner packet as the kernel on A would.
                let mut tx = vec![0u8; VXLAN_HEADROOM];
                tx.extend_from_slice(&rx[packet.clone()]);
                let m = tx.len();
                let v = encap(
                    &mut tx,
                    VXLAN_HEADROOM..m,
                    &table_a,
                    &local_a,
                    &mut IcmpLimiter::default(),
                    Duration::ZERO,
                );
                let EncapVerdict::Transmit { dst, frame } = v else {
                    panic!("re-encap of {sig:?} gave {v:?}")
                };
                assert_eq!(dst, IpAddr::V4(UNDERLAY_B));
                assert_eq!(
                    &tx[frame],
                    &d.payload[..],
                    "our encap differs from the kernel's bytes for {sig:?}"
                );
            }
            (Kind::ArpRequest { target, .. }, DecapVerdict::Reply { dst, frame })
                if *target == VTEP_B =>
            {
                assert_eq!(*dst, d.src);
                let reply = Datagram {
                    src: UNDERLAY_B.into(),
                    dst: *dst,
                    payload: rx[frame.clone()].to_vec(),
                };
                let rs = signature(&reply);
                assert_eq!(
                    rs.kind,
                    Kind::ArpReply {
                        sender: VTEP_B,
                        target: VTEP_A
                    }
                );
                assert_eq!((rs.inner_dst, rs.inner_src), (MAC_A.0, MAC_B.0));
                assert_eq!(
                    rs.vxlan_header, sig.vxlan_header,
                    "same VXLAN header as the kernel"
                );
            }
            _ => panic!("unexpected verdict {verdict:?} for kernel frame {sig:?}"),
        }
        let bytes = match &verdict {
            DecapVerdict::Reply { frame, .. } => rx[frame.clone()].to_vec(),
            _ => Vec::new(),
        };
        out.push((sig, verdict, bytes));
    }
    out
}

/// The frames every capture must contain (kernel side).
fn assert_expected_kinds(sigs: &BTreeSet<Signature>) {
    let has = |f: &dyn Fn(&Signature) -> bool| sigs.iter().any(f);
    for s in sigs {
        assert_eq!(
            s.vxlan_header,
            [0x08, 0, 0, 0, 0, 0, VNI as u8, 0],
            "kernel VXLAN header"
        );
        assert_eq!(s.inner_src, MAC_A.0);
    }
    assert!(
        has(&|s| s.kind
            == Kind::ArpRequest {
                sender: VTEP_A,
                target: VTEP_B
            }
            && s.inner_dst == MacAddr::BROADCAST.0),
        "kernel ARP request for {VTEP_B}: {sigs:#?}"
    );
    let ip = |src: IpAddr, dst: IpAddr, proto: u8, icmp: Option<u8>| {
        has(&|s| {
            s.inner_dst == MAC_B.0
                && matches!(&s.kind, Kind::Ip { src: a, dst: b, proto: p, icmp_type: t, .. }
                    if *a == src && *b == dst && *p == proto && *t == icmp)
        })
    };
    let (a6, b6): (Ipv6Addr, Ipv6Addr) = (VTEP_A6.parse().unwrap(), POD_B6.parse().unwrap());
    assert!(
        ip(VTEP_A.into(), POD_B.into(), 1, Some(8)),
        "ICMP echo request: {sigs:#?}"
    );
    assert!(
        ip(VTEP_A.into(), POD_B.into(), 17, None),
        "UDP datagram: {sigs:#?}"
    );
    assert!(
        ip(a6.into(), b6.into(), 58, Some(128)),
        "ICMPv6 echo request: {sigs:#?}"
    );
    assert!(
        ip(VTEP_A.into(), POD_B.into(), 1, Some(0)),
        "echo reply to our request: {sigs:#?}"
    );
}

#[test]
fn fixture_frames_decap_and_reencap_exactly() {
    let bytes = std::fs::read(fixture_path())
        .expect("fixture present (regenerate as root with FLANNEL_REGEN_FIXTURES=1)");
    let frames = read_pcap(&bytes);
    let checked = check_kernel_frames(&frames);
    let sigs: BTreeSet<Signature> = checked.iter().map(|(s, _, _)| s.clone()).collect();
    assert_expected_kinds(&sigs);
    // The UDP payload survived the kernel → decap path byte for byte.
    let (table_b, local_b) = view_b();
    let mut found = false;
    for d in frames.iter().filter(|d| d.src == IpAddr::V4(UNDERLAY_A)) {
        let mut rx = d.payload.clone();
        let n = rx.len();
        if let DecapVerdict::Deliver { packet } = decap(&mut rx, 0..n, d.src, &table_b, &local_b) {
            found |= rx[packet].ends_with(UDP_TEXT.as_bytes());
        }
    }
    assert!(found, "UDP text not found in the fixture");
}

// ---------------------------------------------------------------------------------------
// Live capture (root).

/// Runs a command (`args[0]`), panicking with its stderr on failure; returns stdout.
fn run(args: &[&str]) -> String {
    test_support::run(args[0], &args[1..])
}

/// [`run`] with the command as one whitespace-separated line.
fn sh(line: &str) -> String {
    run(&line.split_whitespace().collect::<Vec<_>>())
}

/// [`run_quiet`] with the command as one line.
fn sh_quiet(line: &str) {
    run_quiet(&line.split_whitespace().collect::<Vec<_>>());
}

/// Runs a command whose failure is expected or harmless (e.g. a ping nobody answers).
fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// Deletes the namespaces on drop (success, failure or panic).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            run_quiet(&["ip", "netns", "del", ns]);
        }
    }
}

/// Stops the capture process (by its PID) on drop.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGINT lets tcpdump flush and close the file.
            run_quiet(&["kill", "-INT", &self.child.id().to_string()]);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn frames(&self) -> Vec<Datagram> {
        match std::fs::read(&self.file) {
            Ok(b) if b.len() >= 24 => read_pcap(&b),
            _ => Vec::new(),
        }
    }

    /// Waits up to `timeout` for a captured frame matching `f`.
    fn wait_for(&self, timeout: Duration, f: impl Fn(&Datagram) -> bool) -> Option<Datagram> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(d) = self.frames().into_iter().find(|d| f(d)) {
                return Some(d);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Sends `payload` as one UDP datagram from namespace `ns` to `dst`:`PORT` (bash's /dev/udp).
fn send_from(ns: &str, dst: Ipv4Addr, payload: &[u8], scratch: &Path) {
    std::fs::write(scratch, payload).unwrap();
    let cmd = format!("cat {} > /dev/udp/{dst}/{PORT}", scratch.display());
    run(&["ip", "netns", "exec", ns, "bash", "-c", &cmd]);
}

/// An ICMP echo request from pod `src` to `dst` with our marker id.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&INTEROP_ID.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"flannel-rs interop");
    let c = flannel_rs::wire::checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 20 + icmp.len()];
    let repr = ipv4::Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.len(),
        hop_limit: 64,
    };
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
        .unwrap();
    p[20..].copy_from_slice(&icmp);
    p
}

#[test]
fn live_kernel_frames_match_fixture_and_interoperate() {
    if !test_support::privileged("live_kernel_frames_match_fixture_and_interoperate") {
        return;
    }
    let tag = format!(
        "fg{}-{:04x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() & 0xffff)
            .unwrap_or(0)
    );
    let (na, nb) = (format!("{tag}-a"), format!("{tag}-b"));
    run(&["ip", "netns", "add", &na]);
    let mut guard = Namespaces(vec![na.clone()]);
    run(&["ip", "netns", "add", &nb]);
    guard.0.push(nb.clone());
    let scratch = std::env::temp_dir().join(format!("{tag}-datagram.bin"));
    let _scratch_cleanup = ScratchFile(scratch.clone());

    // Underlay: a veth pair created directly inside the namespaces.
    sh(&format!(
        "ip -n {na} link add veth0 type veth peer name veth1 netns {nb}"
    ));
    sh(&format!("ip -n {na} addr add {UNDERLAY_A}/24 dev veth0"));
    sh(&format!("ip -n {nb} addr add {UNDERLAY_B}/24 dev veth1"));
    // Real outer checksums in the capture (veth would otherwise pass partial ones along).
    sh(&format!("ip netns exec {na} ethtool -K veth0 tx off"));
    sh(&format!("ip netns exec {nb} ethtool -K veth1 tx off"));
    for (ns, dev) in [(&na, "veth0"), (&nb, "veth1"), (&na, "lo"), (&nb, "lo")] {
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }

    // Node A: flannel.1 as flannel creates it (compat §7.1, §7.3).
    let (mac_a, mac_b) = (MAC_A.to_string(), MAC_B.to_string());
    sh(&format!(
        "ip -n {na} link add flannel.1 address {mac_a} type vxlan id 1 local {UNDERLAY_A} \
         dev veth0 dstport 8472 nolearning"
    ));
    run(&["ip", "-n", &na, "link", "set", "flannel.1", "mtu", "1450"]);
    sh(&format!(
        "ip netns exec {na} sysctl -qw net.ipv6.conf.flannel/1.accept_ra=0"
    ));
    sh(&format!("ip -n {na} addr add {VTEP_A}/32 dev flannel.1"));
    sh(&format!(
        "ip -n {na} -6 addr add {VTEP_A6}/128 dev flannel.1 nodad"
    ));
    run(&["ip", "-n", &na, "link", "set", "flannel.1", "up"]);

    // Node B: capture everything on the VXLAN port.
    let file = std::env::temp_dir().join(format!("{tag}.pcap"));
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", &nb, "tcpdump", "-i", "veth1", "-U", "-n", "-s", "0", "-w",
        ])
        .arg(&file)
        .args(["udp", "port", "8472"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpdump");
    let stderr = child.stderr.take().expect("tcpdump stderr");
    let mut capture = Capture { child, file };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("listening on") => break,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("tcpdump exited early"),
        }
        assert!(Instant::now() < deadline, "tcpdump did not start");
    }

    // Phase 1: route only, flooding to B: the kernel ARPs for the gateway 10.244.2.0.
    let via = VTEP_B.to_string();
    sh(&format!(
        "ip -n {na} route add 10.244.2.0/24 via {via} dev flannel.1 onlink"
    ));
    sh(&format!(
        "bridge -n {na} fdb append 00:00:00:00:00:00 dev flannel.1 dst {UNDERLAY_B} self permanent"
    ));
    sh_quiet(&format!("ip netns exec {na} ping -c1 -W1 {POD_B}"));
    let arp_req = capture
        .wait_for(Duration::from_secs(5), |d| {
            d.src == IpAddr::V4(UNDERLAY_A) && d.payload.get(20..22) == Some(&[0x08, 0x06][..])
        })
        .expect("kernel ARP request captured");

    // Interop 1: our decap answers the ARP request; the kernel must learn MAC_B from it.
    let (table_b, local_b) = view_b();
    let mut buf = arp_req.payload.clone();
    let n = buf.len();
    let DecapVerdict::Reply { dst, frame } = decap(&mut buf, 0..n, arp_req.src, &table_b, &local_b)
    else {
        panic!("no ARP reply from decap")
    };
    assert_eq!(dst, IpAddr::V4(UNDERLAY_A));
    send_from(&nb, UNDERLAY_A, &buf[frame], &scratch);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let neigh = run(&["ip", "-n", &na, "neigh", "show", &via, "dev", "flannel.1"]);
        if neigh.contains(&mac_b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kernel did not accept our ARP reply: {neigh:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Phase 2: flannel's per-peer programming (compat §7.4): neighbour, FDB, onlink route.
    sh(&format!(
        "ip -n {na} neigh replace {via} lladdr {mac_b} dev flannel.1 nud permanent"
    ));
    sh(&format!(
        "bridge -n {na} fdb replace {mac_b} dev flannel.1 dst {UNDERLAY_B} self permanent"
    ));
    sh(&format!(
        "bridge -n {na} fdb del 00:00:00:00:00:00 dev flannel.1 dst {UNDERLAY_B} self"
    ));
    sh(&format!(
        "ip -n {na} route replace 10.244.2.0/24 via {via} dev flannel.1 onlink"
    ));
    sh(&format!(
        "ip -n {na} -6 neigh replace {VTEP_B6} lladdr {mac_b} dev flannel.1 nud permanent"
    ));
    sh(&format!(
        "ip -n {na} -6 route replace fd10:244:2::/64 via {VTEP_B6} dev flannel.1 onlink"
    ));

    sh_quiet(&format!("ip netns exec {na} ping -c1 -W1 {POD_B}"));
    sh_quiet(&format!("ip netns exec {na} ping -6 -c1 -W1 {POD_B6}"));
    let udp_cmd = format!("printf '%s' '{UDP_TEXT}' > /dev/udp/{POD_B}/9999");
    run(&["ip", "netns", "exec", &na, "bash", "-c", &udp_cmd]);

    // Interop 2: our encap of an echo request from pod 10.244.2.5 gets a kernel echo reply.
    let inner = echo_request(POD_B, VTEP_A);
    let mut buf = vec![0u8; VXLAN_HEADROOM];
    buf.extend_from_slice(&inner);
    let m = buf.len();
    let EncapVerdict::Transmit { dst, frame } = encap(
        &mut buf,
        VXLAN_HEADROOM..m,
        &table_b,
        &local_b,
        &mut IcmpLimiter::default(),
        Duration::ZERO,
    ) else {
        panic!("encap of the interop request failed")
    };
    assert_eq!(dst, IpAddr::V4(UNDERLAY_A));
    send_from(&nb, UNDERLAY_A, &buf[frame], &scratch);
    let reply = capture.wait_for(Duration::from_secs(5), |d| {
        d.src == IpAddr::V4(UNDERLAY_A)
            && d.payload.len() >= VXLAN_HEADROOM + 28
            && d.payload[20..22] == [0x08, 0x00]
            && d.payload[VXLAN_HEADROOM + 20] == 0
            && d.payload[VXLAN_HEADROOM + 24..VXLAN_HEADROOM + 26] == INTEROP_ID.to_be_bytes()
    });
    let reply = reply.expect("kernel echo reply to our encapsulated request");
    let mut rbuf = reply.payload.clone();
    let rn = rbuf.len();
    let DecapVerdict::Deliver { packet } = decap(&mut rbuf, 0..rn, reply.src, &table_b, &local_b)
    else {
        panic!("decap of the kernel's echo reply failed")
    };
    assert!(rbuf[packet].ends_with(b"flannel-rs interop"));

    // Wait for the plain UDP datagram and the ICMPv6 echo request, then stop the capture.
    let udp_seen = capture.wait_for(Duration::from_secs(5), |d| {
        d.payload.ends_with(UDP_TEXT.as_bytes())
    });
    assert!(udp_seen.is_some(), "UDP datagram captured");
    capture.stop();
    let live = capture.frames();

    let checked = check_kernel_frames(&live);
    let live_sigs: BTreeSet<Signature> = checked.iter().map(|(s, _, _)| s.clone()).collect();
    assert_expected_kinds(&live_sigs);

    if std::env::var("FLANNEL_REGEN_FIXTURES").as_deref() == Ok("1") {
        let path = fixture_path();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(&capture.file, &path).unwrap();
        eprintln!("wrote {}", path.display());
    } else {
        let fixture = read_pcap(&std::fs::read(fixture_path()).expect("fixture present"));
        let fixture_sigs: BTreeSet<Signature> = check_kernel_frames(&fixture)
            .into_iter()
            .map(|(s, _, _)| s)
            .collect();
        assert_eq!(
            live_sigs, fixture_sigs,
            "the kernel's frames changed structure; inspect and regenerate with FLANNEL_REGEN_FIXTURES=1"
        );
    }
    drop(capture);
    drop(guard);
}

/// Removes a scratch file on drop.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
