//! Why a packet was dropped: a cheap `Copy` value, counted per reason and never logged per
//! packet.

use crate::wire::WireError;

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )+) => {
        /// Why the data plane dropped a packet. Each variant maps to a metric label.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $( $(#[$doc])* $variant, )+
        }

        impl DropReason {
            /// Every reason, in declaration order (`ALL[r.index()] == r`).
            pub const ALL: &'static [DropReason] = &[$( DropReason::$variant, )+];

            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();

            /// The snake_case name used as a metric label.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( DropReason::$variant => $name, )+
                }
            }

            /// Position in [`DropReason::ALL`], for per-reason counter arrays.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

drop_reasons! {
    /// A VXLAN datagram came from an address that is no peer's public IP.
    UnknownSource => "unknown_source",
    /// Fewer bytes than a header needs or than a length field claims.
    Truncated => "truncated",
    /// The caller's range does not fit its buffer or leaves less than `VXLAN_HEADROOM` in
    /// front (a bug in the IO layer, not in the packet).
    InvalidBuffer => "invalid_buffer",
    /// The VXLAN I (valid VNI) flag is clear.
    VxlanFlagNotSet => "vxlan_flag_not_set",
    /// The VXLAN VNI is not ours.
    WrongVni => "wrong_vni",
    /// The inner destination MAC is neither our VTEP MAC nor broadcast for ARP.
    WrongDstMac => "wrong_dst_mac",
    /// The inner frame carries an 802.1Q/802.1ad VLAN tag.
    VlanTagged => "vlan_tagged",
    /// The inner EtherType is not IPv4, IPv6 or ARP.
    UnsupportedEtherType => "unsupported_ethertype",
    /// The IP header is invalid (version, header length, total length below the header).
    MalformedIp => "malformed_ip",
    /// The ARP packet is not Ethernet/IPv4.
    MalformedArp => "malformed_arp",
    /// A valid ARP packet that needs no answer (a reply, or a request for another address).
    ArpNotForUs => "arp_not_for_us",
    /// An ICMPv6 neighbour solicitation that gets no answer: not for our VTEP address, or
    /// failing RFC 4861's checks (hop limit 255, code 0, length, checksum).
    NdpNotForUs => "ndp_not_for_us",
    /// No peer subnet contains the inner destination.
    NoRoute => "no_route",
    /// A `virtio_net_hdr` that contradicts its packet (checksum offsets out of range, zero
    /// GSO size, GSO type that does not match the IP version or protocol).
    BadOffload => "bad_offload",
    /// A GSO type this data plane does not split (UFO, unknown types, IPv6 extension headers).
    UnsupportedGso => "unsupported_gso",
    /// A GSO super-packet that would split into more than `offload::MAX_SEGMENTS` segments.
    TooManySegments => "too_many_segments",
    /// A decapsulated packet (or ARP request) whose inner source address is not in the subnet
    /// of the peer that sent it (the lease whose public IP is the outer source): a peer, or a
    /// pod speaking VXLAN as its node, forging another node's pod address.
    InnerSourceMismatch => "inner_source_mismatch",
    /// A decapsulated packet whose inner destination is outside our own subnet: we are no
    /// relay for other nodes' traffic.
    InnerDestinationForeign => "inner_destination_foreign",
    /// No peer owns the destination and the ICMP error about it was suppressed by the
    /// rate limit (see `IcmpLimiter`).
    IcmpRateLimited => "icmp_rate_limited",
}

impl DropReason {
    /// Maps a wire parse error on a packet path to a drop reason: short buffers are
    /// `Truncated`, anything else is a malformed IP header.
    pub(crate) fn from_wire(e: WireError) -> DropReason {
        match e {
            WireError::Truncated { .. } => DropReason::Truncated,
            WireError::Malformed(_) | WireError::Unsupported(_) | WireError::Checksum(_) => {
                DropReason::MalformedIp
            }
        }
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_snake_case_and_indexed() {
        let mut seen = HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            let n = r.as_str();
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
            assert!(seen.insert(n), "duplicate {n}");
            assert_eq!(r.to_string(), n);
        }
        assert_eq!(DropReason::COUNT, DropReason::ALL.len());
    }
}
