//! Echo replies as raw sockets deliver them (the peer prober's only parser of network bytes):
//! parsing never panics, and what it accepts is an echo reply whose source, identifier and
//! sequence number are the ones in the bytes. IPv4 sockets deliver the IP header too; ICMPv6
//! sockets deliver the message alone, its source coming from the socket address.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_rs::io::icmp::{parse_echo_reply, parse_echo_reply_v6};

const FROM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(r) = parse_echo_reply(data) {
        let ihl = usize::from(data[0] & 0x0f) * 4;
        assert_eq!(data[0] >> 4, 4);
        assert_eq!(data[9], 1, "not ICMP");
        let src = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
        assert_eq!(r.from, IpAddr::V4(src));
        assert_eq!(data[ihl], 0, "not an echo reply");
        assert_eq!(r.ident, u16::from_be_bytes([data[ihl + 4], data[ihl + 5]]));
        assert_eq!(r.seq, u16::from_be_bytes([data[ihl + 6], data[ihl + 7]]));
    }
    if let Some(r) = parse_echo_reply_v6(data, FROM6) {
        assert_eq!(r.from, IpAddr::V6(FROM6));
        assert_eq!((data[0], data[1]), (129, 0), "not an ICMPv6 echo reply");
        assert_eq!(r.ident, u16::from_be_bytes([data[4], data[5]]));
        assert_eq!(r.seq, u16::from_be_bytes([data[6], data[7]]));
    }
});
