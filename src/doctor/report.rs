//! Findings and their text form (the output contract scenario tests grep for):
//! `^(PASS|WARN|FAIL|SKIP) <check-id>: <message>$`, indented `  fix: ...` lines, and a last
//! line `doctor: N passed, N warnings, N failed`.

use core::fmt;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Nothing wrong found.
    Pass,
    /// Something that often breaks pod traffic; not proven here.
    Warn,
    /// Breaks pod traffic.
    Fail,
    /// Not checked (not applicable, or the facts could not be gathered).
    Skip,
}

impl Status {
    /// `PASS`, `WARN`, `FAIL` or `SKIP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Check ids (fixed: scenario tests and operators rely on them).
pub mod ids {
    /// `net.ipv4.ip_forward`.
    pub const IP_FORWARD: &str = "ip-forward";
    /// The overlay device exists and is up.
    pub const VXLAN_DEVICE: &str = "vxlan-device";
    /// `tx-checksum-ip-generic` off on a kernel vxlan device (field problem P2).
    pub const TX_CHECKSUM: &str = "tx-checksum";
    /// No FORWARD rule rejects pod traffic ahead of flannel's accepts.
    pub const FORWARD_REJECT: &str = "forward-reject";
    /// firewalld/ufw present.
    pub const HOST_FIREWALL: &str = "host-firewall";
    /// Security software known to hook the network stack.
    pub const SECURITY_SOFTWARE: &str = "security-software";
    /// One line per peer: does its VTEP answer over the overlay.
    pub const PEER_REACHABLE: &str = "peer-reachable";
    /// VXLAN guard chains: allow-list of peers' public IPs, pod-sourced VXLAN dropped.
    pub const VXLAN_GUARD: &str = "vxlan-guard";
    /// subnet.env agrees with the store's lease for this node.
    pub const SUBNET_LEASE: &str = "subnet-lease";
    /// The CNI plugins flannel's config chain calls are installed and executable.
    pub const CNI_PLUGIN: &str = "cni-plugin";
    /// The kubelet's first CNI config is a valid flannel one.
    pub const CNI_CONFIG: &str = "cni-config";
    /// br_netfilter loaded and `bridge-nf-call-iptables` on.
    pub const BR_NETFILTER: &str = "br-netfilter";
    /// Nothing else owns the VXLAN UDP port.
    pub const VXLAN_PORT: &str = "vxlan-port";
    /// Overlay-MTU packets (plus the backend's overhead) cross the underlay to each peer.
    pub const MTU: &str = "mtu";
    /// With `--ip-masq`: flannel's masquerade rules in place (iptables or nftables mode).
    pub const MASQUERADE: &str = "masquerade";
    /// IPv6 enabled: `net.ipv6.conf.all.forwarding`.
    pub const IP6_FORWARD: &str = "ip6-forward";
    /// [`FORWARD_REJECT`] for the IPv6 Network (ip6tables, nftables `ip6`/`inet`).
    pub const FORWARD_REJECT_V6: &str = "forward-reject-v6";
    /// [`VXLAN_DEVICE`] for `flannel-v6.<VNI>`, with its VTEP address and peer routes.
    pub const VXLAN_DEVICE_V6: &str = "vxlan-device-v6";
    /// [`VXLAN_GUARD`] for the IPv6 Network.
    pub const VXLAN_GUARD_V6: &str = "vxlan-guard-v6";
    /// [`MASQUERADE`] for the IPv6 Network.
    pub const MASQUERADE_V6: &str = "masquerade-v6";
    /// [`TX_CHECKSUM`] for `flannel-v6.<VNI>`.
    pub const TX_CHECKSUM_V6: &str = "tx-checksum-v6";
    /// [`SUBNET_LEASE`] for `FLANNEL_IPV6_SUBNET`.
    pub const SUBNET_LEASE_V6: &str = "subnet-lease-v6";
    /// [`MTU`] for the IPv6 peers (the MTU of `flannel-v6.<VNI>`, 70 bytes of overhead).
    pub const MTU_V6: &str = "mtu-v6";

    /// The id of check `id` run for the IPv6 family (checks without an IPv6 twin keep theirs).
    pub fn v6(id: &'static str) -> &'static str {
        match id {
            IP_FORWARD => IP6_FORWARD,
            FORWARD_REJECT => FORWARD_REJECT_V6,
            VXLAN_DEVICE => VXLAN_DEVICE_V6,
            TX_CHECKSUM => TX_CHECKSUM_V6,
            VXLAN_GUARD => VXLAN_GUARD_V6,
            MASQUERADE => MASQUERADE_V6,
            SUBNET_LEASE => SUBNET_LEASE_V6,
            MTU => MTU_V6,
            other => other,
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Verdict.
    pub status: Status,
    /// Check id (see [`ids`]).
    pub id: &'static str,
    /// One-line message.
    pub message: String,
    /// Suggested fixes, one line each.
    pub fixes: Vec<String>,
}

impl Finding {
    /// A finding without fixes.
    pub fn new(status: Status, id: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            status,
            id,
            message: message.into(),
            fixes: Vec::new(),
        }
    }

    /// Adds a fix line.
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fixes.push(fix.into());
        self
    }

    /// The same finding under the IPv6 twin of its check id ([`ids::v6`]): the checks
    /// shared by both families decide once, the report names the family.
    pub fn v6(mut self) -> Finding {
        self.id = ids::v6(self.id);
        self
    }
}

/// Newlines and other control characters from gathered text would break the line format.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The report text, ending with the summary line and a newline.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    let (mut pass, mut warn, mut fail) = (0, 0, 0);
    for f in findings {
        match f.status {
            Status::Pass => pass += 1,
            Status::Warn => warn += 1,
            Status::Fail => fail += 1,
            Status::Skip => {}
        }
        out.push_str(&format!(
            "{} {}: {}\n",
            f.status,
            f.id,
            one_line(&f.message)
        ));
        for fix in &f.fixes {
            out.push_str(&format!("  fix: {}\n", one_line(fix)));
        }
    }
    out.push_str(&format!(
        "doctor: {pass} passed, {warn} warnings, {fail} failed\n"
    ));
    out
}

/// 1 when any check failed, else 0 (2, for configuration errors, is decided by the caller).
pub fn exit_code(findings: &[Finding]) -> u8 {
    u8::from(findings.iter().any(|f| f.status == Status::Fail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_format() {
        let findings = vec![
            Finding::new(Status::Pass, ids::IP_FORWARD, "net.ipv4.ip_forward = 1"),
            Finding::new(
                Status::Fail,
                ids::PEER_REACHABLE,
                "peer 10.244.1.0/24 at 198.51.100.7 (UDP 8472) does not answer",
            )
            .fix("first\nfix")
            .fix("second fix"),
            Finding::new(
                Status::Warn,
                ids::SECURITY_SOFTWARE,
                "process kesl (pid 1234)",
            ),
            Finding::new(Status::Skip, ids::TX_CHECKSUM, "host-gw backend"),
        ];
        assert_eq!(
            render(&findings),
            "PASS ip-forward: net.ipv4.ip_forward = 1\n\
             FAIL peer-reachable: peer 10.244.1.0/24 at 198.51.100.7 (UDP 8472) does not answer\n\
             \x20 fix: first fix\n\
             \x20 fix: second fix\n\
             WARN security-software: process kesl (pid 1234)\n\
             SKIP tx-checksum: host-gw backend\n\
             doctor: 1 passed, 1 warnings, 1 failed\n"
        );
        assert_eq!(exit_code(&findings), 1);
        assert_eq!(exit_code(&findings[2..]), 0);
        assert_eq!(render(&[]), "doctor: 0 passed, 0 warnings, 0 failed\n");
    }

    #[test]
    fn every_line_matches_the_contract_pattern() {
        let re = regex::Regex::new(r"^((PASS|WARN|FAIL|SKIP) [a-z0-9-]+: .+|  fix: .+|doctor: \d+ passed, \d+ warnings, \d+ failed)$")
            .expect("regex");
        let text =
            render(&[Finding::new(Status::Fail, ids::SUBNET_LEASE, "a\r\nb\tc").fix("x\ny")]);
        for line in text.lines() {
            assert!(re.is_match(line), "{line:?}");
        }
    }
}
