//! flannel's subnet allocation (compat §6.3), shared by the stores that allocate subnets
//! themselves: the directory store and etcd. Pure apart from the random pick.

use std::io;
use std::path::PathBuf;

use ipnet::{Ipv4Net, Ipv6Net};

use super::store::StoreError;
use super::{Lease, LeaseAttrs, SubnetKey};
use crate::config::netconf::{AllocRange, NetConfig, Subnet};
use crate::config::subnet_env::PreviousSubnets;

/// Attempts before giving up on a contended allocation (upstream's `raceRetries`).
pub(crate) const RACE_RETRIES: usize = 10;
/// Free candidates collected before picking one at random (upstream's limit).
const MAX_CANDIDATES: usize = 100;

/// The allocation range of each family, `None` when the family is disabled.
pub(crate) type AllocRanges = (Option<AllocRange<Ipv4Net>>, Option<AllocRange<Ipv6Net>>);

/// `config`'s allocation range of each enabled family (IPv6-only leases get upstream's
/// `0.0.0.0-0&<IPv6 subnet>` keys); `store` names the store when neither is enabled.
pub(crate) fn alloc_ranges(
    config: &NetConfig,
    store: &'static str,
) -> Result<AllocRanges, StoreError> {
    let ranges = (config.ipv4_range()?, config.ipv6_range()?);
    match ranges {
        (None, None) => Err(StoreError::NoSubnet(store)),
        _ => Ok(ranges),
    }
}

/// What [`plan_acquisition`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Our lease from a previous run (found by public IP) fits the config: rewrite it with
    /// our attributes.
    Reuse(SubnetKey),
    /// Create a lease at `key`, after deleting `stale` (our previous lease, which no longer
    /// fits the config).
    Create {
        /// The lease to create.
        key: SubnetKey,
        /// Our incompatible old lease, to delete first.
        stale: Option<SubnetKey>,
    },
}

/// flannel's subnet choice (compat §6.3), shared by the directory and etcd stores; no IO
/// besides the random pick. `keys` are all lease keys present, valid or not (every one
/// blocks its subnets); `leases` the valid ones, in key order. Steps: reuse the first lease
/// carrying our public IP (IPv6 one when IPv4's is unset) if it fits the config (else plan to delete it), else the previous
/// subnet from subnet.env if free and compatible, else a random free subnet among the first
/// [`MAX_CANDIDATES`] (each enabled family chosen independently).
pub(crate) fn plan_acquisition(
    (range4, range6): &AllocRanges,
    keys: &[SubnetKey],
    leases: &[Lease],
    attrs: &LeaseAttrs,
    previous: &PreviousSubnets,
) -> Result<Plan, StoreError> {
    let (range4, range6) = (range4.as_ref(), range6.as_ref());
    let mut taken4: Vec<Ipv4Net> = keys.iter().filter_map(SubnetKey::ipv4_subnet).collect();
    let mut taken6: Vec<Ipv6Net> = keys.iter().filter_map(|k| k.ipv6).collect();
    let mine = leases.iter().find(|l| l.attrs.same_node(attrs));

    // 1. Our own lease from a previous run, found by public IP.
    let mut stale = None;
    if let Some(lease) = mine {
        let fits4 = fits(range4, lease.subnet);
        let fits6 = fits(range6, lease.ipv6_subnet);
        if let (true, true, Some(key)) = (fits4, fits6, lease.key()) {
            tracing::info!(lease = %key, public_ip = %attrs.public_ip, "found lease for current IP, reusing");
            return Ok(Plan::Reuse(key));
        }
        if let Some(key) = lease.key() {
            tracing::info!(lease = %key, public_ip = %attrs.public_ip, "found lease for current IP but not compatible with current config, deleting");
            stale = Some(key);
        }
        taken4.retain(|t| Some(*t) != lease.subnet);
        taken6.retain(|t| Some(*t) != lease.ipv6_subnet);
    }

    // 2. The subnet(s) subnet.env says we had (the IPv6 one alone when IPv4 is disabled).
    let prev4 = range4.and(previous.ipv4);
    let prev6 = range6.and(previous.ipv6);
    if prev4.is_some() || (range4.is_none() && prev6.is_some()) {
        let free = !prev4.is_some_and(|p| taken4.iter().any(|t| t.overlaps(&p)))
            && !prev6.is_some_and(|p| taken6.iter().any(|t| t.overlaps(&p)));
        let fits = fits(range4, prev4) && fits(range6, prev6);
        if let (true, true, Some(key)) = (free, fits, SubnetKey::new(prev4, prev6)) {
            tracing::info!(lease = %key, "found previously leased subnet, reusing");
            return Ok(Plan::Create { key, stale });
        } else if !fits {
            tracing::warn!(subnet = ?prev4, ipv6_subnet = ?prev6, "previously leased subnet is not compatible with the network config, ignoring");
        } else {
            tracing::info!(subnet = ?prev4, ipv6_subnet = ?prev6, "previously leased subnet is taken by another node");
        }
    }

    // 3. A random free subnet.
    let ipv4 = choose(range4, &taken4)?;
    let ipv6 = choose(range6, &taken6)?;
    let key = SubnetKey::new(ipv4, ipv6).ok_or(StoreError::OutOfSubnets)?;
    Ok(Plan::Create { key, stale })
}

/// True when `subnet` is present exactly when the family is enabled and fits its range.
fn fits<N: Subnet>(range: Option<&AllocRange<N>>, subnet: Option<N>) -> bool {
    match (range, subnet) {
        (None, None) => true,
        (Some(r), Some(s)) => r.is_compatible(&s),
        _ => false,
    }
}

/// A random free subnet of an enabled family (`None` when disabled).
fn choose<N: Subnet>(range: Option<&AllocRange<N>>, taken: &[N]) -> Result<Option<N>, StoreError> {
    match range {
        None => Ok(None),
        Some(r) => {
            let free = r.free_subnets(taken, MAX_CANDIDATES);
            Ok(Some(*pick(&free)?.ok_or(StoreError::OutOfSubnets)?))
        }
    }
}

/// A uniformly random element (`Ok(None)` when empty).
fn pick<T>(items: &[T]) -> Result<Option<&T>, StoreError> {
    if items.is_empty() {
        return Ok(None);
    }
    let r = getrandom::u64().map_err(|e| StoreError::Io {
        path: PathBuf::from("getrandom"),
        source: io::Error::other(e.to_string()),
    })?;
    let len = u64::try_from(items.len()).unwrap_or(u64::MAX);
    let idx = usize::try_from(r % len).unwrap_or(0);
    Ok(items.get(idx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::netconf::NetConfig;

    #[test]
    fn plan_follows_upstream_order() {
        let cfg = NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.3.0"}"#,
        )
        .expect("parses");
        let range4 = cfg.ipv4_range().expect("ok").expect("v4");
        let key = |s: &str| s.parse::<SubnetKey>().expect("key");
        let lease = |k: &str, last: u8| Lease {
            subnet: Some(key(k).ipv4),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: std::net::Ipv4Addr::new(198, 51, 100, last),
                ..LeaseAttrs::default()
            },
            expiration: None,
            node: None,
        };
        let ours = lease("10.244.1.0-24", 1).attrs;
        let none = PreviousSubnets::default();
        let plan = |keys: &[SubnetKey], leases: &[Lease], prev: &PreviousSubnets| {
            plan_acquisition(&(Some(range4), None), keys, leases, &ours, prev)
        };
        // 1. Our lease, found by public IP, fits: reuse.
        let mine = [lease("10.244.2.0-24", 1)];
        let keys = [key("10.244.2.0-24")];
        assert_eq!(
            plan(&keys, &mine, &none).expect("plan"),
            Plan::Reuse(key("10.244.2.0-24"))
        );
        // Out of range: deleted, and its subnet is free again for the previous-subnet hint.
        let outside = [lease("10.244.9.0-24", 1)];
        let keys = [key("10.244.9.0-24")];
        let prev = PreviousSubnets {
            ipv4: Some("10.244.3.0/24".parse().expect("net")),
            ipv6: None,
        };
        assert_eq!(
            plan(&keys, &outside, &prev).expect("plan"),
            Plan::Create {
                key: key("10.244.3.0-24"),
                stale: Some(key("10.244.9.0-24")),
            }
        );
        // 2. The previous subnet is taken (a corrupt entry counts): 3. the only free one.
        let keys = [key("10.244.3.0-24"), key("10.244.1.0-24")];
        assert_eq!(
            plan(&keys, &[], &prev).expect("plan"),
            Plan::Create {
                key: key("10.244.2.0-24"),
                stale: None,
            }
        );
        let full = [
            key("10.244.1.0-24"),
            key("10.244.2.0-24"),
            key("10.244.3.0-24"),
        ];
        assert!(matches!(
            plan(&full, &[], &none),
            Err(StoreError::OutOfSubnets)
        ));
    }

    #[test]
    fn plan_ipv6_only() {
        let cfg = NetConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd42:5::/48","IPv6SubnetMin":"fd42:5:0:1::","IPv6SubnetMax":"fd42:5:0:2::"}"#,
        )
        .expect("parses");
        let range6 = cfg.ipv6_range().expect("ok").expect("v6");
        let key = |s: &str| s.parse::<SubnetKey>().expect("key");
        let attrs = LeaseAttrs::default();
        let none = PreviousSubnets::default();
        let plan = |keys: &[SubnetKey], prev: &PreviousSubnets| {
            plan_acquisition(&(None, Some(range6)), keys, &[], &attrs, prev)
        };
        // Dual-stack keys and other IPv6-only keys block their IPv6 subnet; the zero IPv4
        // placeholder blocks nothing.
        let keys = [key("0.0.0.0-0&fd42:5:0:1::-64")];
        assert_eq!(
            plan(&keys, &none).expect("plan"),
            Plan::Create {
                key: key("0.0.0.0-0&fd42:5:0:2::-64"),
                stale: None
            }
        );
        let prev = PreviousSubnets {
            ipv4: None,
            ipv6: Some("fd42:5:0:2::/64".parse().expect("net")),
        };
        assert_eq!(
            plan(&[], &prev).expect("plan"),
            Plan::Create {
                key: key("0.0.0.0-0&fd42:5:0:2::-64"),
                stale: None
            }
        );
        let full = [
            key("0.0.0.0-0&fd42:5:0:1::-64"),
            key("10.1.0.0-24&fd42:5:0:2::-64"),
        ];
        assert!(matches!(plan(&full, &prev), Err(StoreError::OutOfSubnets)));
    }

    #[test]
    fn pick_is_in_range() {
        let items = [1, 2, 3];
        for _ in 0..50 {
            let v = pick(&items).expect("random").expect("non-empty");
            assert!(items.contains(v));
        }
        assert_eq!(pick::<u8>(&[]).expect("random"), None);
    }
}
