//! Reaching peers, decided without IO and shared by the daemon's prober and `flanneld
//! doctor`: which address to probe for a peer, how messages name it, and the fixes to
//! suggest when it does not answer (field problems P1 and P3).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::{Peer, PeerKind};
use crate::config::flags::Flags;
use crate::config::netconf::BackendConfig;
use crate::lease::annotations::{AnnotationNames, DEFAULT_PREFIX};

/// Consecutive unanswered probes after which a peer counts as unreachable.
pub const UNREACHABLE_AFTER: u32 = 3;
/// How long one probe waits for its reply.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How peers are reached, for choosing probe targets and fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeContext {
    /// Backend type of this node (`vxlan`, `host-gw`).
    pub backend: String,
    /// VXLAN UDP port (`Backend.Port`, 8472 by default).
    pub port: u16,
    /// kube store: the `public-ip-overwrite` and `public-ipv6-overwrite` annotation names;
    /// `None` for etcd/directory stores (there `--public-ip`/`--public-ipv6` on the peer is
    /// the fix).
    pub overwrite_annotation: Option<(String, String)>,
}

impl ProbeContext {
    /// The context of a node running with `flags` and `backend`.
    pub fn new(flags: &Flags, backend: &BackendConfig) -> ProbeContext {
        // An invalid prefix stops the kube store at start; the default names stand in here.
        let overwrite_annotation = if flags.kube_subnet_mgr {
            AnnotationNames::new(&flags.kube_annotation_prefix)
                .or_else(|_| AnnotationNames::new(DEFAULT_PREFIX))
                .ok()
                .map(|n| (n.public_ip_overwrite, n.public_ipv6_overwrite))
        } else {
            None
        };
        ProbeContext {
            backend: backend.kind().to_owned(),
            port: match backend {
                BackendConfig::Vxlan(vx) => vx.vxlan_port(),
                _ => 0,
            },
            overwrite_annotation,
        }
    }
}

/// The address to probe for `peer`: the VTEP address flannel gives the peer's overlay device
/// (its subnet's network address: `/32` on `flannel.<VNI>`, `/128` on `flannel-v6.<VNI>`)
/// for vxlan, the public IP for host-gw (of the subnet's family). `None` for a host-gw peer
/// whose public IP is of the other family.
pub fn probe_target(peer: &Peer) -> Option<IpAddr> {
    match (peer.kind, peer.subnet, peer.public_ip) {
        (PeerKind::Vxlan { .. }, net, _) => Some(net.network()),
        (PeerKind::HostGw, IpNet::V4(_), ip @ IpAddr::V4(_))
        | (PeerKind::HostGw, IpNet::V6(_), ip @ IpAddr::V6(_)) => Some(ip),
        _ => None,
    }
}

/// RFC 1918 private or RFC 6598 shared (CGNAT) address: typical of a node behind NAT whose
/// published address other sites cannot reach.
pub fn is_private_or_cgnat(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private() || (o[0] == 100 && (64..128).contains(&o[1]))
}

/// The fixes to suggest for an unreachable peer, most likely first.
pub fn unreachable_fixes(peer: &Peer, ctx: &ProbeContext) -> Vec<String> {
    let v6 = peer.subnet.addr().is_ipv6();
    let annotation = ctx
        .overwrite_annotation
        .as_ref()
        .map(|(a4, a6)| if v6 { a6 } else { a4 });
    let flag = if v6 { "--public-ipv6" } else { "--public-ip" };
    let nat = match (annotation, &peer.node) {
        (Some(a), Some(node)) => format!(
            "kubectl annotate node {node} {a}=<an address this node can reach>, then restart flanneld there"
        ),
        (Some(a), None) => format!(
            "set {a} on that node to an address this node can reach, then restart flanneld there"
        ),
        (None, _) => {
            format!("start flanneld on that node with {flag} set to an address this node can reach")
        }
    };
    let port = format!(
        "check that UDP {} is allowed between the nodes, or move Backend.Port (nodes on one layer-2 network can use host-gw instead)",
        ctx.port
    );
    let private = matches!(peer.public_ip, IpAddr::V4(ip) if is_private_or_cgnat(ip));
    if ctx.backend == "host-gw" {
        return vec![
            format!(
                "host-gw needs every node on one layer-2 network: check that {} is on-link from this node, or use the vxlan backend",
                peer.public_ip
            ),
            "check that no firewall or security group between the nodes drops their traffic".to_owned(),
        ];
    }
    if private {
        vec![
            format!(
                "its public IP {} is a private address, probably behind NAT: {nat}",
                peer.public_ip
            ),
            port,
        ]
    } else {
        vec![port, format!("if that node is behind NAT: {nat}")]
    }
}

/// How messages name a peer: `peer 10.244.1.0/24 at 198.51.100.7 (UDP 8472)`, led by the
/// node's name where the store knows it (`peer node-b (10.244.1.0/24 at 198.51.100.7, UDP 8472)`).
pub fn peer_label(peer: &Peer, ctx: &ProbeContext) -> String {
    match &peer.node {
        Some(node) => format!(
            "peer {node} ({} at {}, {})",
            peer.subnet,
            peer.public_ip,
            transport(ctx)
        ),
        None => format!(
            "peer {} at {} ({})",
            peer.subnet,
            peer.public_ip,
            transport(ctx)
        ),
    }
}

/// One line naming an unreachable peer and the likely fixes, most likely first (the
/// daemon's warning).
pub fn unreachable_message(peer: &Peer, target: IpAddr, ctx: &ProbeContext) -> String {
    let fix = unreachable_fixes(peer, ctx).join("; ");
    format!(
        "{} does not answer: {UNREACHABLE_AFTER} ICMP echo requests to {target} in a row went unanswered; {fix}",
        peer_label(peer, ctx),
    )
}

/// `UDP 8472` for vxlan, `host-gw` otherwise.
pub fn transport(ctx: &ProbeContext) -> String {
    if ctx.backend == "vxlan" {
        format!("UDP {}", ctx.port)
    } else {
        ctx.backend.clone()
    }
}
