//! Receive batches: where the datagrams of one received message lie.

use std::ops::Range;

/// The byte ranges of the datagrams in one received message of `len` bytes at `offset` of the
/// batch buffer, coalesced by UDP GRO into runs of `segment` bytes (the last may be shorter;
/// `segment` 0 means not coalesced: one datagram of `len` bytes).
///
/// The ranges are contiguous, in order, non-empty (except the one empty range an empty
/// datagram yields), and together cover exactly `offset..offset + len`; an `offset + len` that
/// overflows is cut at `usize::MAX`.
pub fn gro_datagrams(
    offset: usize,
    len: usize,
    segment: usize,
) -> impl Iterator<Item = Range<usize>> {
    let end = offset.saturating_add(len);
    let seg = match segment {
        0 => (end - offset).max(1),
        s => s,
    };
    // An empty datagram is still one (empty) datagram.
    let empty = (end == offset).then_some(offset..offset);
    (offset..end)
        .step_by(seg)
        .map(move |s| s..s.saturating_add(seg).min(end))
        .chain(empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(offset: usize, len: usize, segment: usize) -> Vec<Range<usize>> {
        gro_datagrams(offset, len, segment).collect()
    }

    #[test]
    fn splits_gro_runs() {
        assert_eq!(all(10, 100, 0), vec![10..110]);
        assert_eq!(all(10, 100, 100), vec![10..110]);
        assert_eq!(all(10, 100, 40), vec![10..50, 50..90, 90..110]);
        assert_eq!(all(0, 120, 40), vec![0..40, 40..80, 80..120]);
        assert_eq!(all(5, 0, 0), vec![5..5]);
        assert_eq!(all(5, 0, 40), vec![5..5]);
        assert_eq!(
            all(usize::MAX - 3, 10, 2),
            vec![usize::MAX - 3..usize::MAX - 1, usize::MAX - 1..usize::MAX]
        );
    }
}
