//! ICMP echo replies as a raw socket delivers them (the peer prober's only parser of network
//! bytes): parsing never panics, and what it accepts is an IPv4 ICMP echo reply whose source,
//! identifier and sequence number are the ones in the bytes.
#![no_main]

use flannel_rs::io::icmp::parse_echo_reply;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(r) = parse_echo_reply(data) {
        let ihl = usize::from(data[0] & 0x0f) * 4;
        assert_eq!(data[0] >> 4, 4);
        assert_eq!(data[9], 1, "not ICMP");
        assert_eq!(r.from.octets(), [data[12], data[13], data[14], data[15]]);
        assert_eq!(data[ihl], 0, "not an echo reply");
        assert_eq!(r.ident, u16::from_be_bytes([data[ihl + 4], data[ihl + 5]]));
        assert_eq!(r.seq, u16::from_be_bytes([data[ihl + 6], data[ihl + 7]]));
    }
});
