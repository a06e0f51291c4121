//! The OS beyond rtnetlink (which is `crate::netlink`): TUN device, UDP batching, ethtool ioctls,
//! raw ICMP probes, namespaces, fd passing, CPU steering (the only `unsafe` code), running programs
//! ([`exec`]) and reading `/proc` ([`procfs`]).
#![allow(unsafe_code)]

pub mod ethtool;
pub mod exec;
pub mod handoff;
pub mod icmp;
pub mod netns;
pub mod procfs;
pub mod steer;
pub mod tun;
pub mod udp;
