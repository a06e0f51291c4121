//! The only module that talks to the OS with `unsafe`: TUN device, UDP batching, ethtool ioctls,
//! raw ICMP probes.
#![allow(unsafe_code)]

pub mod ethtool;
pub mod exec;
pub mod handoff;
pub mod icmp;
pub mod netns;
pub mod procfs;
pub mod tun;
pub mod udp;
