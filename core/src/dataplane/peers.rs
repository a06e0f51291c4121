//! The peer table: which remote VTEP owns an inner destination address.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;

use super::RemoteVtep;

/// A fast hasher for address keys (integers). Keys come from leases, not from packets, and a
/// lookup with an attacker-chosen destination costs one probe per prefix length whatever the
/// key, so a keyed DoS-resistant hash buys nothing here.
#[derive(Debug, Default, Clone, Copy)]
struct AddrHasher(u64);

impl AddrHasher {
    /// Folded 64×64→128 multiply: every input bit reaches the low output bits, which
    /// hashbrown uses as the bucket index (subnet keys have many zero low bits).
    #[inline(always)]
    fn mix(&mut self, x: u64) {
        let m = u128::from(self.0 ^ x ^ 0x243f_6a88_85a3_08d3).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w.iter_mut().zip(c).for_each(|(d, s)| *d = *s);
            self.mix(u64::from_le_bytes(w));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }
    fn write_u128(&mut self, n: u128) {
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<AddrHasher>>;

/// An address family's integer form, so one LPM implementation serves IPv4 and IPv6.
trait Key: Copy + Eq + Hash + core::ops::BitAnd<Output = Self> {
    /// The netmask of a prefix length.
    fn mask(len: u8) -> Self;
}

impl Key for u32 {
    fn mask(len: u8) -> u32 {
        u32::MAX
            .checked_shl(u32::from(32 - len.min(32)))
            .unwrap_or(0)
    }
}

impl Key for u128 {
    fn mask(len: u8) -> u128 {
        u128::MAX
            .checked_shl(u32::from(128 - len.min(128)))
            .unwrap_or(0)
    }
}

/// Longest-prefix match: one hash map per prefix length present, probed longest first.
/// With flannel's uniform subnet sizes that is a single probe.
#[derive(Debug, Clone)]
struct Lpm<K: Key> {
    /// `(mask, network → peer index)`, longest prefix first.
    levels: Vec<(K, FastMap<K, u32>)>,
}

impl<K: Key> Default for Lpm<K> {
    fn default() -> Self {
        Lpm { levels: Vec::new() }
    }
}

impl<K: Key> Lpm<K> {
    fn build(entries: impl Iterator<Item = (K, u8, u32)>) -> Lpm<K> {
        let mut by_len: Vec<(u8, FastMap<K, u32>)> = Vec::new();
        for (net, len, idx) in entries {
            let m = match by_len.iter_mut().find(|(l, _)| *l == len) {
                Some((_, m)) => m,
                None => {
                    by_len.push((len, FastMap::default()));
                    match by_len.last_mut() {
                        Some((_, m)) => m,
                        None => continue,
                    }
                }
            };
            m.insert(net & K::mask(len), idx);
        }
        by_len.sort_by_key(|(len, _)| core::cmp::Reverse(*len));
        Lpm {
            levels: by_len.into_iter().map(|(l, m)| (K::mask(l), m)).collect(),
        }
    }

    #[inline]
    fn get(&self, addr: K) -> Option<u32> {
        self.levels
            .iter()
            .find_map(|(mask, m)| m.get(&(addr & *mask)).copied())
    }

    /// The entries with a shorter prefix than `mask` that contain `net`.
    fn supernets(&self, net: K, mask: K) -> impl Iterator<Item = u32> + '_ {
        self.levels
            .iter()
            .filter(move |(m, _)| *m != mask && (*m & mask) == *m)
            .filter_map(move |(m, map)| map.get(&(net & *m)).copied())
    }
}

/// An immutable map from pod subnets to remote VTEPs, with longest-prefix-match lookup and a
/// set of known peer public IPs for source filtering.
///
/// Built in O(n) from the current leases; the control plane builds a new one on every
/// change and swaps it in atomically (e.g. with `arc-swap`), so lookups take no lock.
/// If the same subnet appears twice, the later entry wins.
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    peers: Vec<(IpNet, RemoteVtep)>,
    v4: Lpm<u32>,
    v6: Lpm<u128>,
    /// Per public IP (IPv4-mapped IPv6 as IPv4): the indexes of its subnets in `peers`.
    owners_v4: FastMap<u32, Vec<u32>>,
    owners_v6: FastMap<u128, Vec<u32>>,
    /// Per entry of `peers`: a longer prefix of the table lies inside it, so the LPM, not
    /// mere containment, says who owns an address in it.
    shadowed: Vec<bool>,
}

impl PeerTable {
    /// Builds a table from `(subnet, vtep)` pairs. Host bits of subnets are ignored.
    pub fn new(entries: impl IntoIterator<Item = (IpNet, RemoteVtep)>) -> PeerTable {
        let mut peers: Vec<(IpNet, RemoteVtep)> = Vec::new();
        let mut index: HashMap<IpNet, usize> = HashMap::new();
        for (net, vtep) in entries {
            let net = net.trunc();
            match index.get(&net) {
                Some(&i) => {
                    if let Some(slot) = peers.get_mut(i) {
                        slot.1 = vtep;
                    }
                }
                None => {
                    index.insert(net, peers.len());
                    peers.push((net, vtep));
                }
            }
        }
        let v4 = Lpm::build(peers.iter().enumerate().filter_map(|(i, (n, _))| match n {
            IpNet::V4(n) => Some((u32::from(n.network()), n.prefix_len(), i as u32)),
            IpNet::V6(_) => None,
        }));
        let v6 = Lpm::build(peers.iter().enumerate().filter_map(|(i, (n, _))| match n {
            IpNet::V6(n) => Some((u128::from(n.network()), n.prefix_len(), i as u32)),
            IpNet::V4(_) => None,
        }));
        let mut owners_v4: FastMap<u32, Vec<u32>> = FastMap::default();
        let mut owners_v6: FastMap<u128, Vec<u32>> = FastMap::default();
        let mut shadowed = vec![false; peers.len()];
        for (i, (n, v)) in peers.iter().enumerate() {
            match v.public_ip.to_canonical() {
                IpAddr::V4(a) => owners_v4.entry(u32::from(a)).or_default().push(i as u32),
                IpAddr::V6(a) => owners_v6.entry(u128::from(a)).or_default().push(i as u32),
            };
            // O(entries × prefix lengths present): each entry marks the shorter ones around it.
            let outer: Vec<u32> = match n {
                IpNet::V4(n) => v4
                    .supernets(u32::from(n.network()), u32::mask(n.prefix_len()))
                    .collect(),
                IpNet::V6(n) => v6
                    .supernets(u128::from(n.network()), u128::mask(n.prefix_len()))
                    .collect(),
            };
            for j in outer {
                if let Some(s) = shadowed.get_mut(j as usize) {
                    *s = true;
                }
            }
        }
        PeerTable {
            peers,
            v4,
            v6,
            owners_v4,
            owners_v6,
            shadowed,
        }
    }

    /// The VTEP whose subnet is the longest prefix containing `dst`.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<&RemoteVtep> {
        let i = match dst {
            IpAddr::V4(a) => self.v4.get(u32::from(a)),
            IpAddr::V6(a) => self.v6.get(u128::from(a)),
        }?;
        self.peers.get(i as usize).map(|(_, v)| v)
    }

    /// True if `ip` is some peer's public IP (IPv4-mapped IPv6 addresses count as IPv4).
    #[inline]
    pub fn is_known_source(&self, ip: IpAddr) -> bool {
        self.owned_by(ip).is_some()
    }

    /// True if the peer owning `inner` (the longest prefix containing it, as [`lookup`]) has
    /// the public IP `outer`: `inner` may be the source of what `outer` sends us.
    ///
    /// One probe by `outer` and a containment test of its (usually one or two) subnets; the
    /// full longest-prefix lookup only when a longer prefix lies inside the containing one.
    ///
    /// [`lookup`]: PeerTable::lookup
    #[inline]
    pub fn owns_source(&self, outer: IpAddr, inner: IpAddr) -> bool {
        let Some(idxs) = self.owned_by(outer) else {
            return false;
        };
        for &i in idxs {
            let Some((net, _)) = self.peers.get(i as usize) else {
                continue;
            };
            if net.contains(&inner) {
                if !self.shadowed.get(i as usize).copied().unwrap_or(true) {
                    return true;
                }
                return self.lookup(inner).is_some_and(|p| {
                    p.public_ip == outer || p.public_ip.to_canonical() == outer.to_canonical()
                });
            }
        }
        false
    }

    /// True if a subnet leased with public IP `outer` has the VTEP MAC `mac`: a frame from
    /// `outer` with that Ethernet source comes from that peer's VTEP (for solicitations from
    /// its link-local address, which no subnet owns).
    pub fn is_vtep_of(&self, outer: IpAddr, mac: crate::wire::MacAddr) -> bool {
        self.owned_by(outer).is_some_and(|idxs| {
            idxs.iter().any(|&i| {
                self.peers
                    .get(i as usize)
                    .is_some_and(|(_, v)| v.mac == mac)
            })
        })
    }

    /// The indexes of the subnets leased with public IP `ip`.
    #[inline]
    fn owned_by(&self, ip: IpAddr) -> Option<&Vec<u32>> {
        match ip {
            IpAddr::V4(a) => self.owners_v4.get(&u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a) => self.owners_v4.get(&u32::from(a)),
                None => self.owners_v6.get(&u128::from(a)),
            },
        }
    }

    /// Number of subnets.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True if there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The `(subnet, vtep)` pairs, first-insertion order, duplicates merged.
    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &RemoteVtep)> + '_ {
        self.peers.iter().map(|(n, v)| (n, v))
    }
}

impl FromIterator<(IpNet, RemoteVtep)> for PeerTable {
    fn from_iter<I: IntoIterator<Item = (IpNet, RemoteVtep)>>(iter: I) -> Self {
        PeerTable::new(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MacAddr;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn vtep(n: u8) -> RemoteVtep {
        RemoteVtep {
            public_ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, n)),
            mac: MacAddr([2, 0, 0, 0, 0, n]),
            vni: 1,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let t = PeerTable::new([
            (net("10.244.0.0/16"), vtep(1)),
            (net("10.244.2.0/24"), vtep(2)),
            (net("10.244.2.128/25"), vtep(3)),
            (net("fd10:244:2::/64"), vtep(4)),
            (net("0.0.0.0/0"), vtep(5)),
        ]);
        let l = |s: &str| t.lookup(s.parse().unwrap()).map(|v| v.mac.0[5]);
        assert_eq!(l("10.244.2.5"), Some(2));
        assert_eq!(l("10.244.2.200"), Some(3));
        assert_eq!(l("10.244.9.1"), Some(1));
        assert_eq!(l("192.168.1.1"), Some(5));
        assert_eq!(l("fd10:244:2::7"), Some(4));
        assert_eq!(l("fd10:244:3::7"), None);
        // The owner of a source address is the longest prefix's peer, also when a shorter
        // prefix of another peer contains it.
        let owns = |peer: u8, a: &str| t.owns_source(vtep(peer).public_ip, a.parse().unwrap());
        assert!(owns(1, "10.244.9.1") && !owns(2, "10.244.9.1"));
        assert!(owns(2, "10.244.2.5") && !owns(1, "10.244.2.5") && !owns(5, "10.244.2.5"));
        assert!(owns(3, "10.244.2.200") && !owns(2, "10.244.2.200"));
        assert!(owns(4, "fd10:244:2::7") && !owns(4, "10.244.2.5"));
        assert!(owns(5, "192.168.1.1") && !owns(9, "192.168.1.1"));
        assert!(t.owns_source(
            "::ffff:198.18.0.2".parse().unwrap(),
            "10.244.2.5".parse().unwrap()
        ));
        assert_eq!(t.len(), 5);
        assert!(!t.is_empty());
    }

    #[test]
    fn host_bits_and_duplicates() {
        let t = PeerTable::new([
            (net("10.244.2.7/24"), vtep(1)),
            (net("10.244.2.0/24"), vtep(2)),
        ]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().next().map(|(n, _)| *n), Some(net("10.244.2.0/24")));
        assert_eq!(t.lookup("10.244.2.9".parse().unwrap()), Some(&vtep(2)));
    }

    #[test]
    fn known_sources() {
        let mut v6 = vtep(9);
        v6.public_ip = IpAddr::V6("2001:db8::9".parse().unwrap());
        let t: PeerTable = [
            (net("10.244.2.0/24"), vtep(2)),
            (net("fd10:244:9::/64"), v6),
        ]
        .into_iter()
        .collect();
        assert!(t.is_known_source("198.18.0.2".parse().unwrap()));
        assert!(t.is_known_source("::ffff:198.18.0.2".parse().unwrap()));
        assert!(t.is_known_source("2001:db8::9".parse().unwrap()));
        assert!(!t.is_known_source("198.18.0.3".parse().unwrap()));
        assert!(!t.is_known_source("10.244.2.1".parse().unwrap()));
        let empty = PeerTable::default();
        assert!(empty.is_empty());
        assert_eq!(empty.lookup("10.0.0.1".parse().unwrap()), None);
        assert!(!empty.is_known_source("198.18.0.2".parse().unwrap()));
    }

    /// Reference: scan every entry, keep the longest containing prefix, later entries win ties.
    fn linear(entries: &[(IpNet, RemoteVtep)], dst: IpAddr) -> Option<RemoteVtep> {
        let mut best: Option<(u8, RemoteVtep)> = None;
        for (n, v) in entries {
            if n.contains(&dst) && best.is_none_or(|(l, _)| n.prefix_len() >= l) {
                best = Some((n.prefix_len(), *v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn arb_entry() -> impl Strategy<Value = (IpNet, RemoteVtep)> {
        let v4 = (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
            // Cluster addresses so that prefixes overlap often.
            let a = 0x0af4_0000 | (a & 0x0000_ffff);
            IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(a), l).unwrap())
        });
        let v6 = (any::<u64>(), 0u8..=128).prop_map(|(a, l)| {
            let a = (0xfd10_0244u128 << 96) | u128::from(a & 0xffff_0000_ffff);
            IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(a), l).unwrap())
        });
        (prop_oneof![3 => v4, 1 => v6], any::<u8>()).prop_map(|(n, i)| (n, vtep(i)))
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(0x0af4_0000 | (a & 0xffff)))),
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u64>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(
                (0xfd10_0244u128 << 96) | u128::from(a & 0xffff_0000_ffff)
            ))),
        ]
    }

    proptest! {
        #[test]
        fn owns_source_equals_lookup(entries in proptest::collection::vec(arb_entry(), 0..60),
                                     addrs in proptest::collection::vec(arb_addr(), 1..40),
                                     outers in proptest::collection::vec(any::<u8>(), 1..8)) {
            let t = PeerTable::new(entries.clone());
            for a in addrs {
                for o in outers.iter().chain(entries.iter().map(|(_, v)| &v.mac.0[5]).take(4)) {
                    let outer = vtep(*o).public_ip;
                    let want = linear(&entries, a).is_some_and(|v| v.public_ip == outer);
                    prop_assert_eq!(t.owns_source(outer, a), want, "{} from {}", a, outer);
                }
            }
        }

        #[test]
        fn lookup_equals_linear_scan(entries in proptest::collection::vec(arb_entry(), 0..60),
                                     addrs in proptest::collection::vec(arb_addr(), 1..40)) {
            let t = PeerTable::new(entries.clone());
            for a in addrs {
                prop_assert_eq!(t.lookup(a).copied(), linear(&entries, a), "{}", a);
            }
            for (n, _) in &entries {
                prop_assert_eq!(t.lookup(n.network()).copied(), linear(&entries, n.network()));
            }
        }
    }
}
