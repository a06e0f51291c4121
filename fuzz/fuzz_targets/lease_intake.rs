//! Lease intake → planner on an arbitrary list of leases (untrusted store data): nothing
//! panics, every peer is strictly inside Network, clear of our own subnet and of every other
//! peer, with a usable public IP, and the kernel planners install nothing else.
//!
//! Input: 12 bytes per lease: subnet (2 bytes under 10.244/16, or a foreign /8 when the
//! flag says so), prefix length, public IP (4 bytes), VTEP MAC tail (2 bytes), flags
//! (host-gw, IPv6 half, foreign /16, no BackendData, no IPv4 subnet), VNI, node name.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_rs::backend::intake::{intake, overlaps, unusable_kind, IntakeConfig, NodeBackend};
use flannel_rs::backend::PeerKind;
use flannel_rs::backend::plan::{plan_host_gw, plan_vxlan, HostGwPlanConfig, VxlanPlanConfig};
use flannel_rs::lease::{Lease, LeaseAttrs, VxlanBackendData};
use flannel_rs::wire::MacAddr;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

fn lease(b: &[u8]) -> Option<Lease> {
    let flags = b[9];
    let first = if flags & 4 != 0 { b[0] } else { 10 };
    let addr = Ipv4Addr::new(first, if flags & 4 != 0 { b[1] } else { 244 }, b[1], b[0]);
    let subnet = Ipv4Net::new(addr, b[2] % 33).ok()?.trunc();
    let public_ip = Ipv4Addr::new(b[3], b[4], b[5], b[6]);
    let mac = MacAddr([2, 0, 0, 0, b[7], b[8]]);
    let vni = u32::from(b[10]);
    let data = VxlanBackendData { vni, vtep_mac: mac };
    let ipv6_subnet = (flags & 2 != 0)
        .then(|| {
            let a = Ipv6Addr::new(
                0x2001,
                0xdb8,
                0x244,
                u16::from_be_bytes([b[1], b[0]]),
                0,
                0,
                0,
                0,
            );
            Ipv6Net::new(a, 40 + b[2] % 41).ok().map(|n| n.trunc())
        })
        .flatten();
    Some(Lease {
        subnet: (flags & 16 == 0).then_some(subnet),
        ipv6_subnet,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: ipv6_subnet.map(|_| {
                Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0xff,
                    0,
                    0,
                    0,
                    u16::from(b[5]),
                    u16::from(b[6]),
                )
            }),
            backend_type: if flags & 1 == 0 { "vxlan" } else { "host-gw" }.into(),
            backend_data: (flags & 8 == 0).then(|| data.to_raw()),
            backend_v6_data: ipv6_subnet.map(|_| data.to_raw()),
        },
        expiration: None,
        node: (b[11] & 1 == 1).then(|| format!("node-{}", b[11])),
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let leases: Vec<Lease> = data.chunks_exact(12).filter_map(lease).collect();
    let network: Ipv4Net = "10.244.0.0/16".parse().expect("net");
    let network6: Ipv6Net = "2001:db8:244::/48".parse().expect("net");
    let own: IpNet = "10.244.1.0/24".parse().expect("net");
    let own6: IpNet = "2001:db8:244:1::/64".parse().expect("net");
    let own_ip: IpAddr = Ipv4Addr::new(198, 18, 0, 1).into();
    let kube_like = data.first().is_some_and(|b| b & 0x80 != 0);
    let cfg = IntakeConfig {
        backend: NodeBackend::Vxlan,
        network_v4: Some(network),
        network_v6: Some(network6),
        subnet_len_v4: (!kube_like).then_some(24),
        subnet_len_v6: (!kube_like).then_some(64),
        own_subnets: vec![own, own6],
        own_ips: vec![own_ip],
    };
    let got = intake(&leases, &cfg);
    let hg_cfg = IntakeConfig {
        backend: NodeBackend::HostGw,
        ..cfg.clone()
    };
    let got_hg = intake(&leases, &hg_cfg);
    // A host-gw node gets host-gw peers only (and a vxlan node, below, vxlan ones).
    assert!(got_hg.peers.iter().all(|p| p.kind == PeerKind::HostGw));
    // Every address family of a lease ends as one peer or one refusal (a lease with no
    // family as one refusal); identical refusals are merged.
    let outcomes: usize = leases
        .iter()
        .map(|l| (usize::from(l.subnet.is_some()) + usize::from(l.ipv6_subnet.is_some())).max(1))
        .sum();
    assert!(got.peers.len() + got.refused.len() <= outcomes);
    for (i, p) in got.peers.iter().enumerate() {
        let net = match p.subnet {
            IpNet::V4(_) => IpNet::V4(network),
            IpNet::V6(_) => IpNet::V6(network6),
        };
        assert!(
            net.contains(&p.subnet) && p.subnet.prefix_len() > net.prefix_len(),
            "{p:?}"
        );
        assert!(
            !overlaps(p.subnet, own) && !overlaps(p.subnet, own6),
            "{p:?}"
        );
        assert!(
            p.public_ip != own_ip && unusable_kind(p.public_ip).is_none(),
            "{p:?}"
        );
        assert!(
            matches!(p.kind, PeerKind::Vxlan { vtep_mac, .. } if vtep_mac.is_unicast()),
            "{p:?}"
        );
        for q in &got.peers[i + 1..] {
            assert!(!overlaps(p.subnet, q.subnet), "{p:?} overlaps {q:?}");
        }
    }
    let vx = plan_vxlan(
        &VxlanPlanConfig {
            ifindex: 10,
            network: network.into(),
            own_subnet: own,
        },
        &got.peers,
        |ip| matches!(ip, IpAddr::V4(v) if v.octets()[3] & 1 == 1),
    );
    let hg = plan_host_gw(
        &HostGwPlanConfig {
            ifindex: 3,
            network: network.into(),
            own_subnet: own,
        },
        &got_hg.peers,
    );
    for (plan, peers) in [(&vx, &got.peers), (&hg, &got_hg.peers)] {
        for (i, pp) in plan.peers.iter().enumerate() {
            assert!(peers.iter().any(|p| p.subnet == pp.subnet), "{pp:?}");
            let inside =
                IpNet::V4(network).contains(&pp.route.dst) && pp.route.dst.prefix_len() > 16;
            assert!(inside, "{pp:?}");
            assert!(!overlaps(pp.route.dst, own), "{pp:?}");
            for q in &plan.peers[i + 1..] {
                assert!(!overlaps(pp.subnet, q.subnet), "{pp:?} overlaps {q:?}");
            }
        }
    }
});
