//! The internet checksum (RFC 1071): fast one's-complement sums, pseudo-header sums for
//! IPv4/IPv6 and incremental updates (RFC 1624).
//!
//! Values returned by [`sum`] are *folded but not complemented* 16-bit one's-complement sums in
//! network order (the value you would read with `u16::from_be_bytes` if it were stored in a
//! packet). Combine sums of even-length pieces with [`add`], and complement the total with `!`
//! to get the value to store in a checksum field.

use std::net::IpAddr;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Adds two 64-bit words with end-around carry.
#[inline(always)]
fn add_carry(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u64::from(carry))
}

/// Folds a 64-bit one's-complement accumulator to 16 bits (still in the byte order it was read).
#[inline(always)]
fn fold64(acc: u64) -> u16 {
    let t = (acc & 0xffff_ffff) + (acc >> 32); // < 2^33
    let t = (t & 0xffff_ffff) + (t >> 32); // < 2^32
    let t = (t & 0xffff) + (t >> 16); // < 2^17
    let t = (t & 0xffff) + (t >> 16); // <= 0xffff
    t as u16
}

/// Reads 8 bytes in native order; the caller passes exactly 8 bytes.
#[inline(always)]
fn ne64(bytes: &[u8]) -> u64 {
    u64::from_ne_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// Bytes per main-loop step: a block for the vector half and a block for the scalar half.
///
/// The vector half is bound by the three SIMD ALU ports; the scalar add-with-carry chain
/// runs beside it on an integer port, so one step handles 320 bytes in roughly the time
/// the vector code alone needs for 256.
const STEP: usize = VECTOR_BLOCK + SCALAR_BLOCK;
/// Bytes summed by [`VectorSum::add_block`]: sixteen 16-byte vectors.
const VECTOR_BLOCK: usize = 256;
/// Buffers shorter than this (headers, small packets) are summed inline by [`tail_sum`]:
/// below it the vector code's dispatch and set-up cost more than they save.
const INLINE_MAX: usize = 128;
/// Bytes summed by [`adc_block`]: eight 64-bit words.
const SCALAR_BLOCK: usize = 64;
/// Vector blocks between two folds of [`VectorSum`]; keeps its estimate error below 2^16.
const BLOCKS_PER_FOLD: usize = 255;

/// Eight 16-bit lanes: the shape of an SSE2 register, which LLVM maps each lane-wise
/// operation below onto (`paddw`, `pavgw`).
type Lanes = [u16; 8];

/// The 16-bit words of vector `j` (0..16) of a vector block, in native order.
#[inline(always)]
fn lanes(block: &[u8; VECTOR_BLOCK], j: usize) -> Lanes {
    // j < 16 and i < 8, so every index is below 256: these cannot panic.
    core::array::from_fn(|i| u16::from_ne_bytes([block[16 * j + 2 * i], block[16 * j + 2 * i + 1]]))
}

/// Lane-wise wrapping addition (`paddw`).
#[inline(always)]
fn add_lanes(a: Lanes, b: Lanes) -> Lanes {
    core::array::from_fn(|i| a[i].wrapping_add(b[i]))
}

/// Lane-wise average rounded up, `(a + b + 1) / 2` without overflow (`pavgw`).
#[inline(always)]
fn avg_lanes(a: Lanes, b: Lanes) -> Lanes {
    core::array::from_fn(|i| ((u32::from(a[i]) + u32::from(b[i]) + 1) >> 1) as u16)
}

/// The exact sum of the 16-bit words of up to [`BLOCKS_PER_FOLD`] vector blocks, kept as two
/// SIMD-friendly halves that need no carries and no widening of every word.
///
/// Baseline x86-64 has SSE2 only: no unsigned compare to catch carries and no safe
/// intrinsics here, so widening each word to 32 bits costs four instructions per 16 bytes.
/// Instead, per lane:
/// - `low` is the plain wrapping sum: exact modulo 2^16 (one `paddw` per vector);
/// - `estimate` sums, per block, the average of the block's 16 words taken as a tree of
///   rounded-up pairwise averages (15 `pavgw` for 16 vectors, then one widening add).
///   Rounding up makes `16 * estimate` at least the true sum `W` and at most 32 above it
///   per block (each of the 4 tree levels adds at most 1/2 at its scale: 8 + 8 + 8 + 8).
///
/// Summed over the 8 lanes and at most 255 blocks, `0 <= E - W <= 8 * 32 * 255 < 2^16`
/// with `E = 16 * estimate`, and `W = low (mod 2^16)`; so `W = E - ((E - low) mod 2^16)`.
struct VectorSum {
    /// Wrapping lane sums; four of them so consecutive adds do not wait on each other.
    low: [Lanes; 4],
    /// Per-lane sums of each block's rounded-up 16-word average.
    estimate: [u32; 8],
}

impl VectorSum {
    fn new() -> Self {
        VectorSum {
            low: [[0; 8]; 4],
            estimate: [0; 8],
        }
    }

    /// Adds the 128 words of one block.
    #[inline(always)]
    fn add_block(&mut self, block: &[u8; VECTOR_BLOCK]) {
        let mut avg: [Lanes; 8] = [[0; 8]; 8];
        for (j, a) in avg.iter_mut().enumerate() {
            let x = lanes(block, 2 * j);
            let y = lanes(block, 2 * j + 1);
            // Accumulating each input directly (instead of pair sums) leaves x and y intact
            // for the average, so SSE2's two-operand form needs no register copies.
            self.low[j % 4] = add_lanes(self.low[j % 4], x);
            self.low[(j + 2) % 4] = add_lanes(self.low[(j + 2) % 4], y);
            *a = avg_lanes(x, y);
        }
        let q = [
            avg_lanes(avg[0], avg[1]),
            avg_lanes(avg[2], avg[3]),
            avg_lanes(avg[4], avg[5]),
            avg_lanes(avg[6], avg[7]),
        ];
        let top = avg_lanes(avg_lanes(q[0], q[1]), avg_lanes(q[2], q[3]));
        for (e, t) in self.estimate.iter_mut().zip(top) {
            *e += u32::from(t);
        }
    }

    /// The exact sum of all words added (see the type's documentation).
    #[inline(always)]
    fn total(&self) -> u64 {
        let low = add_lanes(
            add_lanes(self.low[0], self.low[1]),
            add_lanes(self.low[2], self.low[3]),
        );
        let low = low.iter().fold(0u16, |s, w| s.wrapping_add(*w));
        // At most 8 * 255 * 65535 < 2^32.
        let e = u64::from(self.estimate.iter().sum::<u32>()) * 16;
        e - (e.wrapping_sub(u64::from(low)) & 0xffff)
    }
}

/// Adds eight native-order 64-bit words to `acc` as one add-with-carry chain (`adc`); the
/// carry out of the chain is counted in `carries` (each is worth 1 in one's complement),
/// off the chain's critical path.
#[inline(always)]
fn adc_block(block: &[u8; SCALAR_BLOCK], acc: &mut u64, carries: &mut u64) {
    let mut words = block.chunks_exact(8).map(ne64);
    let (mut s, mut c) = acc.overflowing_add(words.next().unwrap_or(0));
    for w in words {
        let (t, c1) = s.overflowing_add(w);
        let (t, c2) = t.overflowing_add(u64::from(c));
        s = t;
        c = c1 | c2;
    }
    *acc = s;
    *carries += u64::from(c);
}

/// One's-complement sum of `data` read as native-endian words, not folded.
///
/// Summing in native order and swapping once at the end gives the same result as summing
/// big-endian 16-bit words (RFC 1071 §2(B), byte-order independence); 16-, 32- and 64-bit
/// words all fold to the same 16-bit sum because 2^16, 2^32 and 2^64 are 1 modulo 0xffff.
/// Headers stay inline; longer buffers go to the widest vector code this CPU runs
/// ([`x86::sum_long`] picks it once per process).
#[inline]
fn sum_native(data: &[u8]) -> u64 {
    if data.len() < INLINE_MAX {
        return tail_sum(data);
    }
    #[cfg(target_arch = "x86_64")]
    {
        x86::sum_long(data)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        sum_long(data)
    }
}

/// [`sum_native`] of any buffer with 16-byte vectors (SSE2 on x86-64).
#[inline(always)]
fn sum_long(data: &[u8]) -> u64 {
    let (main, rest) = data.split_at(data.len() - data.len() % STEP);
    add_carry(sum_steps(main), tail_sum(rest))
}

/// The sum of whole [`STEP`]s (`main.len()` is a multiple of it): each step is split
/// between [`VectorSum`] and an [`adc_block`] chain. All loads are unaligned-safe, so any
/// offset works.
#[inline(always)]
fn sum_steps(main: &[u8]) -> u64 {
    let mut total = 0u64;
    let mut acc = 0u64;
    let mut carries = 0u64;
    for group in main.chunks(STEP * BLOCKS_PER_FOLD) {
        let mut vector = VectorSum::new();
        for step in group.chunks_exact(STEP) {
            let (v, s) = step.split_at(VECTOR_BLOCK);
            if let (Ok(v), Ok(s)) = (v.try_into(), s.try_into()) {
                vector.add_block(v);
                adc_block(s, &mut acc, &mut carries);
            }
        }
        total = add_carry(total, vector.total());
    }
    add_carry(add_carry(total, acc), carries)
}

/// The sum of less than a [`STEP`] (the tail of a buffer, or a whole header):
/// add-with-carry blocks, then words.
#[inline(always)]
fn tail_sum(rest: &[u8]) -> u64 {
    let mut tail_acc = 0u64;
    let mut tail_carries = 0u64;
    let mut blocks = rest.chunks_exact(SCALAR_BLOCK);
    for b in &mut blocks {
        if let Ok(b) = b.try_into() {
            adc_block(b, &mut tail_acc, &mut tail_carries);
        }
    }
    // The last words get their own accumulator so they need not wait for the loop above.
    let rest = blocks.remainder();
    let mut small = 0u64;
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        small = add_carry(small, ne64(w));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        small = add_carry(small, u64::from(u16::from_ne_bytes([p[0], p[1]])));
    }
    if let [last] = pairs.remainder() {
        // An odd final byte is the high-order byte of a zero-padded big-endian word.
        small = add_carry(small, u64::from(u16::from_ne_bytes([*last, 0])));
    }
    add_carry(add_carry(tail_acc, tail_carries), small)
}

/// The folded one's-complement sum of `data` as big-endian 16-bit words (an odd final byte is
/// padded with a zero byte), not complemented.
#[inline]
pub fn sum(data: &[u8]) -> u16 {
    let native = fold64(sum_native(data));
    u16::from_be_bytes(native.to_ne_bytes())
}

/// One's-complement addition of two folded sums.
#[inline]
pub fn add(a: u16, b: u16) -> u16 {
    let t = u32::from(a) + u32::from(b);
    ((t & 0xffff) + (t >> 16)) as u16
}

/// The checksum field value for `data` (which includes a zeroed checksum field):
/// the complement of [`sum`].
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !sum(data)
}

/// The sum of the TCP/UDP/ICMPv6 pseudo-header: source and destination address, protocol and
/// upper-layer length.
///
/// One function for both families: IPv4 (RFC 793/768: 16-bit length) and IPv6 (RFC 8200 §8.1:
/// 32-bit length) give the same sum for lengths below 65536. Mixed families are summed as
/// given (no valid packet has them).
#[inline]
pub fn pseudo_header(src: &IpAddr, dst: &IpAddr, protocol: u8, length: u32) -> u16 {
    let mut acc = u64::from(protocol) + u64::from(length >> 16) + u64::from(length & 0xffff);
    for addr in [src, dst] {
        match addr {
            IpAddr::V4(a) => {
                acc += u64::from(u32::from(*a) >> 16) + u64::from(u32::from(*a) & 0xffff)
            }
            IpAddr::V6(a) => {
                for w in a.segments() {
                    acc += u64::from(w);
                }
            }
        }
    }
    fold64(acc)
}

/// Updates a stored checksum after a 16-bit field changed from `old` to `new`
/// (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline]
pub fn update16(checksum: u16, old: u16, new: u16) -> u16 {
    !add(add(!checksum, !old), new)
}

/// Updates a stored checksum after a 32-bit field (e.g. a TCP sequence number or an IPv4
/// address) changed from `old` to `new`.
#[inline]
pub fn update32(checksum: u16, old: u32, new: u32) -> u16 {
    let c = update16(checksum, (old >> 16) as u16, (new >> 16) as u16);
    update16(c, old as u16, new as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Reference: RFC 1071's straightforward 16-bit loop.
    pub(crate) fn naive_sum(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            acc += u64::from(u16::from_be_bytes([data[i], data[i + 1]]));
            i += 2;
        }
        if i < data.len() {
            acc += u64::from(data[i]) << 8;
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A classic example header; its stored checksum is b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(sum(&h), 0xffff);
    }

    #[test]
    fn edge_lengths() {
        assert_eq!(sum(&[]), 0);
        assert_eq!(sum(&[0xab]), 0xab00);
        assert_eq!(sum(&[0xff; 64]), 0xffff);
        let v: Vec<u8> = (0..=255u8).cycle().take(70_001).collect();
        assert_eq!(sum(&v), naive_sum(&v));
    }

    #[test]
    fn lengths_around_block_boundaries() {
        // Every tail shape next to the vector, scalar and step boundaries, at all alignments.
        let data: Vec<u8> = (0..3 * STEP + 64).map(|i| (i * 131 + 17) as u8).collect();
        let ones = vec![0xffu8; data.len()];
        let edges = [SCALAR_BLOCK, VECTOR_BLOCK, STEP, 2 * STEP, 3 * STEP];
        for n in edges.iter().flat_map(|&e| e.saturating_sub(17)..=e + 17) {
            for off in 0..4 {
                for d in [&data, &ones] {
                    let d = &d[off..off + n];
                    assert_eq!(sum(d), naive_sum(d), "len {n} offset {off}");
                }
            }
        }
    }

    #[test]
    fn long_buffers_fold_correctly() {
        // 1 MiB of 0xff: overflows any 32-bit lane accumulator that is never folded, and
        // spans many vector fold groups.
        let ones = vec![0xffu8; 1 << 20];
        assert_eq!(sum(&ones), 0xffff);
        assert_eq!(sum(&ones[1..]), naive_sum(&ones[1..]));
        // Worst case for the rounded-up averages: in every vector block only the first
        // vector is non-zero (words of 1), so each tree level rounds up by a half.
        let mut sparse = vec![0u8; (BLOCKS_PER_FOLD + 3) * STEP * 2 + 5];
        for step in sparse.chunks_mut(STEP) {
            for w in step.iter_mut().take(16).step_by(2) {
                *w = 1;
            }
        }
        assert_eq!(sum(&sparse), naive_sum(&sparse));
        // All words 0xffff except for one 0x0001 word per block lane: large values near the
        // 16-bit wrap with the same rounding pattern.
        let mut high = vec![0xffu8; sparse.len()];
        for (h, s) in high.iter_mut().zip(&sparse) {
            if *s == 1 {
                *h = 0;
            }
        }
        assert_eq!(sum(&high), naive_sum(&high));
    }

    #[test]
    fn pseudo_header_matches_bytes() {
        let s = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5));
        let d = IpAddr::V4(Ipv4Addr::new(10, 244, 2, 7));
        let bytes = [10, 244, 1, 5, 10, 244, 2, 7, 0, 6, 0x05, 0xdc];
        assert_eq!(pseudo_header(&s, &d, 6, 1500), naive_sum(&bytes));
    }

    fn v6(b: [u8; 16]) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(b))
    }

    proptest! {
        #[test]
        fn sum_equals_naive(data in proptest::collection::vec(any::<u8>(), 0..3000),
                            offset in 0usize..16) {
            let off = offset.min(data.len());
            prop_assert_eq!(sum(&data[off..]), naive_sum(&data[off..]));
        }

        #[test]
        fn portable_path_equals_naive(data in proptest::collection::vec(any::<u8>(), 0..5000),
                                      offset in 0usize..16) {
            // `sum` runs the widest vector code this CPU has; check the SSE2 path directly.
            let d = &data[offset.min(data.len())..];
            let got = u16::from_be_bytes(fold64(sum_long(d)).to_ne_bytes());
            prop_assert_eq!(got, naive_sum(d));
        }

        #[test]
        fn sum_equals_naive_long(data in proptest::collection::vec(any::<u8>(), 0..200_000),
                                 offset in 0usize..8) {
            let off = offset.min(data.len());
            prop_assert_eq!(sum(&data[off..]), naive_sum(&data[off..]));
        }

        #[test]
        fn pseudo_header_v6_matches_bytes(s in any::<[u8; 16]>(), d in any::<[u8; 16]>(),
                                          nh in any::<u8>(), len in any::<u32>()) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&s);
            bytes.extend_from_slice(&d);
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, nh]);
            prop_assert_eq!(pseudo_header(&v6(s), &v6(d), nh, len), naive_sum(&bytes));
        }

        #[test]
        fn pseudo_header_v4_matches_bytes(s in any::<[u8; 4]>(), d in any::<[u8; 4]>(),
                                          p in any::<u8>(), len in any::<u16>()) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&s);
            bytes.extend_from_slice(&d);
            bytes.extend_from_slice(&[0, p]);
            bytes.extend_from_slice(&len.to_be_bytes());
            let (s, d) = (IpAddr::from(s), IpAddr::from(d));
            prop_assert_eq!(pseudo_header(&s, &d, p, u32::from(len)), naive_sum(&bytes));
        }

        #[test]
        fn split_sums_combine(data in proptest::collection::vec(any::<u8>(), 0..600),
                              cut in 0usize..300) {
            let cut = (cut * 2).min(data.len() & !1);
            prop_assert_eq!(add(sum(&data[..cut]), sum(&data[cut..])), naive_sum(&data));
        }

        #[test]
        fn incremental_update16_equals_recompute(
            data in proptest::collection::vec(any::<u8>(), 2..200),
            at in 0usize..100, new in any::<u16>()) {
            let mut data = data;
            let at = (at * 2) % (data.len() & !1);
            let stored = checksum(&data);
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
            let updated = update16(stored, old, new);
            // Equal to recomputation, except that an all-zero sum may come out as -0.
            prop_assert!(updated == checksum(&data) || (sum(&data) == 0 && updated == 0));
        }

        #[test]
        fn incremental_update32_equals_recompute(
            data in proptest::collection::vec(any::<u8>(), 4..200),
            at in 0usize..50, new in any::<u32>()) {
            let mut data = data;
            let at = (at * 2) % ((data.len() - 2) & !1);
            let stored = checksum(&data);
            let old = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            data[at..at + 4].copy_from_slice(&new.to_be_bytes());
            let updated = update32(stored, old, new);
            prop_assert!(updated == checksum(&data) || (sum(&data) == 0 && updated == 0));
        }
    }
}
