//! The underlay: the bridge namespace, and for two-site runs the 1:1 NAT routers and the control-plane address.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::cmd;
use crate::sys::log;

use super::{Cluster, SITES};

/// The private address of a site's router (the nodes' default gateway).
pub(super) fn site_gateway(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, site, 254)
}

impl Cluster {
    pub(super) fn create_underlay(&mut self) -> Result<()> {
        let ul = self.underlay_ns();
        cmd::ip(&["netns", "add", &ul])?;
        cmd::ip(&["-n", &ul, "link", "set", "lo", "up"])?;
        cmd::ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        cmd::ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        if self.state.sites {
            for site in SITES {
                let br = format!("br{site}");
                cmd::ip(&["-n", &ul, "link", "add", &br, "type", "bridge"])?;
                cmd::ip(&["-n", &ul, "link", "set", &br, "up"])?;
                self.create_router(site)?;
            }
        }
        Ok(())
    }

    /// The router namespace of a site (`<prefix>-r<site>`).
    pub fn router_ns(&self, site: u8) -> String {
        format!("{}-r{site}", self.state.prefix)
    }

    /// The control plane's address: 198.18.0.254 on the underlay bridge, or 203.0.113.254 on
    /// the public bridge of a two-site run.
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        if self.state.sites {
            Ipv4Addr::new(203, 0, 113, 254)
        } else {
            Ipv4Addr::new(198, 18, 0, 254)
        }
    }

    /// A site router: `eth0` 198.18.`site`.254/24 on the site bridge, `eth1`
    /// 203.0.113.(240+`site`)/24 on the public bridge `br0`, forwarding on, redirects and
    /// reverse-path filtering off. Nodes get 1:1 NAT rules as they are added.
    fn create_router(&mut self, site: u8) -> Result<()> {
        let ul = self.underlay_ns();
        let ns = self.router_ns(site);
        let (priv_if, pub_if) = (format!("r{site}p"), format!("r{site}u"));
        cmd::ip(&["netns", "add", &ns])?;
        cmd::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for (ul_if, ns_if, br) in [
            (&priv_if, "eth0", format!("br{site}")),
            (&pub_if, "eth1", "br0".to_string()),
        ] {
            cmd::ip(&[
                "-n", &ul, "link", "add", ul_if, "type", "veth", "peer", "name", ns_if, "netns",
                &ns,
            ])?;
            cmd::ip(&["-n", &ul, "link", "set", ul_if, "master", &br])?;
            cmd::ip(&["-n", &ul, "link", "set", ul_if, "up"])?;
            if !self.state.underlay_tx_offload {
                cmd::ns_ok(&ns, &["ethtool", "-K", ns_if, "tx", "off"])?;
            }
        }
        let private = format!("{}/24", site_gateway(site));
        let public = format!("{}/24", Ipv4Addr::new(203, 0, 113, 240 + site));
        cmd::ip(&["-n", &ns, "addr", "add", &private, "dev", "eth0"])?;
        cmd::ip(&["-n", &ns, "addr", "add", &public, "dev", "eth1"])?;
        cmd::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        cmd::ip(&["-n", &ns, "link", "set", "eth1", "up"])?;
        cmd::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
            "net.ipv4.conf.eth1.rp_filter",
            "net.ipv4.conf.all.send_redirects",
            "net.ipv4.conf.eth0.send_redirects",
        ] {
            cmd::sysctl(&ns, key, "0")?;
        }
        log(format!(
            "site {site}: router {ns} {private} <-> {public} (1:1 NAT)"
        ));
        Ok(())
    }

    /// The site router's 1:1 NAT for one node: the router owns the node's public address and
    /// translates it to and from the node's private address (also for traffic between nodes
    /// of the same site, so every peer sees one address per node).
    pub(super) fn add_nat(&self, site: u8, private: Ipv4Addr, public: Ipv4Addr) -> Result<()> {
        let ns = self.router_ns(site);
        let pb = public.to_string();
        cmd::ip(&["-n", &ns, "addr", "add", &format!("{pb}/32"), "dev", "eth1"])?;
        for rule in nat_rules("-A", private, public) {
            cmd::ns_ok(&ns, &rule.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// Undoes [`add_nat`](Self::add_nat) (best effort).
    pub(super) fn remove_nat(&self, site: u8, private: Ipv4Addr, public: Ipv4Addr) {
        let ns = self.router_ns(site);
        for rule in nat_rules("-D", private, public) {
            let _ = cmd::ns_ok(&ns, &rule.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let pb = format!("{public}/32");
        let _ = cmd::ip(&["-n", &ns, "addr", "del", &pb, "dev", "eth1"]);
    }
}

/// The two iptables commands of a 1:1 NAT (`op` `-A` or `-D`): DNAT of `public` to `private`
/// in PREROUTING, SNAT of `private` to `public` in POSTROUTING.
fn nat_rules(op: &str, private: Ipv4Addr, public: Ipv4Addr) -> [Vec<String>; 2] {
    let (pv, pb) = (private.to_string(), public.to_string());
    let rule = |chain: &str, args: [&str; 6]| -> Vec<String> {
        ["iptables", "-w", "-t", "nat", op, chain]
            .iter()
            .chain(&args)
            .map(|a| a.to_string())
            .collect()
    };
    [
        rule(
            "PREROUTING",
            ["-d", &pb, "-j", "DNAT", "--to-destination", &pv],
        ),
        rule("POSTROUTING", ["-s", &pv, "-j", "SNAT", "--to-source", &pb]),
    ]
}
