//! The checksum with 32-byte AVX2 vectors, chosen at run time.
//!
//! The crate is built for baseline x86-64 (SSE2) so one binary runs on every node. The
//! `multiversion` crate compiles [`sum_long`] again with AVX2 enabled and picks a version at
//! the first call (CPU feature detection, then a cached function pointer); its generated
//! dispatch is the one `unsafe` this relies on outside flannel-rs's `io` module. The code here
//! is safe Rust: since Rust 1.87 the `core::arch` intrinsics without pointer arguments are
//! safe inside functions that enable their target feature, and loads go through `bytemuck` (an
//! unaligned read of plain bytes).

use core::arch::x86_64::{
    __m256i, _mm256_add_epi32, _mm256_madd_epi16, _mm256_set1_epi16, _mm256_setzero_si256,
    _mm256_xor_si256,
};

use super::add_carry;

/// [`super::sum_native`] of a buffer of any length.
#[multiversion::multiversion(targets("x86_64+avx2+avx"))]
pub(super) fn sum_long(data: &[u8]) -> u64 {
    multiversion::target::match_target! {
        "x86_64+avx2" => sum_avx2(data),
        _ => super::sum_long(data),
    }
}

/// Bytes per [`sum_avx2`] group: each of its four accumulators takes 4,096 vectors, so no
/// 32-bit lane exceeds 65,536 * 4,096 = 2^28 in magnitude.
const GROUP: usize = 4 * 4096 * 32;

/// [`super::sum_long`] with 32-byte vectors and `vpmaddwd`.
///
/// Each word `w` is biased to the signed value `w - 32768` (flip the top bit) so that
/// `vpmaddwd` against ones adds word pairs into signed 32-bit lanes exactly; the bias is
/// added back per word at the end. Three instructions per 32 bytes and no carries to
/// track, so short buffers (a 1400-byte segment) pay almost nothing to set up or finish.
#[target_feature(enable = "avx2")]
fn sum_avx2(data: &[u8]) -> u64 {
    let bias = _mm256_set1_epi16(i16::MIN);
    let ones = _mm256_set1_epi16(1);
    let pairs = |v: &[u8]| {
        let v: __m256i = bytemuck::pod_read_unaligned(v);
        _mm256_madd_epi16(_mm256_xor_si256(v, bias), ones)
    };
    let (body, rest) = data.split_at(data.len() - data.len() % 32);
    let mut total = 0i64;
    for group in body.chunks(GROUP) {
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut quads = group.chunks_exact(128);
        for q in &mut quads {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi32(*a, pairs(&q[32 * k..32 * (k + 1)]));
            }
        }
        for (v, a) in quads.remainder().chunks_exact(32).zip(&mut acc) {
            *a = _mm256_add_epi32(*a, pairs(v));
        }
        let lanes = _mm256_add_epi32(
            _mm256_add_epi32(acc[0], acc[1]),
            _mm256_add_epi32(acc[2], acc[3]),
        );
        // |lane| <= 2^30 here; the eight lanes are summed in 64 bits.
        total += bytemuck::cast::<__m256i, [i32; 8]>(lanes)
            .iter()
            .map(|&l| i64::from(l))
            .sum::<i64>();
        total += 32768 * (group.len() as i64 / 2);
    }
    // The words sum to `total` exactly, and a sum of unsigned words is never negative.
    add_carry(total as u64, super::tail_sum(rest))
}
