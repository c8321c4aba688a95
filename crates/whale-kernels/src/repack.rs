//! Row-interleaved copies of Q4_0 and Q8_0 weights, made once at load.
//!
//! In a file each row is a run of blocks (an f16 scale, then the quants). Here eight
//! consecutive rows form a group, stored block by block: for block `b` the eight rows'
//! scales (8 × f16, 16 bytes), then their quants four bytes at a time, row after row:
//!
//! ```text
//! Q4_0R8 block (144 B): d[0..8] | k=0: r0 q[0..4] r1 q[0..4] … r7 q[0..4] | k=1: r0 q[4..8] … | … k=3
//! Q8_0R8 block (272 B): d[0..8] | k=0: r0 q[0..4] … r7 q[0..4] | … | k=7: r0 q[28..32] … r7 q[28..32]
//! ```
//!
//! (for Q4_0 a quant byte `j` holds value `j` in its low nibble and `j + 16` in its high
//! one, as in the file). A 32-byte load then holds four values of each of eight rows;
//! multiplied with four activation values broadcast to every lane it yields partial dot
//! products of eight rows at once, and one scale multiply and one FMA per block serve
//! all eight rows (see `qdot`). A group is exactly eight file rows long, so row ranges
//! that start and end on group boundaries (one expert of a stacked tensor) stay views.

use crate::DType;
use half::f16;
use rayon::prelude::*;

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// The repacked type of a file type, if it has one.
pub fn repacked_type(dtype: DType) -> Option<DType> {
    match dtype {
        DType::Q4_0 => Some(DType::Q4_0R8),
        DType::Q8_0 => Some(DType::Q8_0R8),
        _ => None,
    }
}

/// Whether a `[rows, cols]` matrix of `dtype` can be repacked.
pub fn can_repack(dtype: DType, rows: usize, cols: usize) -> bool {
    repacked_type(dtype).is_some() && rows.is_multiple_of(ROWS) && cols.is_multiple_of(32)
}

/// Repacks a `[rows, cols]` matrix of Q4_0 or Q8_0 (file layout) into its interleaved
/// type; `None` when [`can_repack`] says no. Groups are repacked in parallel.
pub fn repack(dtype: DType, bytes: &[u8], rows: usize, cols: usize) -> Option<(DType, Vec<u8>)> {
    repack_pieces(dtype, bytes, rows, cols, usize::MAX, |_| {})
}

/// [`repack`] a piece of about `piece_bytes` of the source at a time (whole groups),
/// calling `done` with each piece's source byte range once it is copied: a caller
/// reading from a file map can drop those pages as it goes, so a large tensor is
/// never resident twice.
pub fn repack_pieces(
    dtype: DType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    piece_bytes: usize,
    mut done: impl FnMut(std::ops::Range<usize>),
) -> Option<(DType, Vec<u8>)> {
    if !can_repack(dtype, rows, cols) {
        return None;
    }
    let to = repacked_type(dtype)?;
    let rb = dtype.bytes_for(cols)?;
    assert_eq!(bytes.len(), rows * rb, "repack: wrong byte count");
    let gb = ROWS * rb;
    let piece = (piece_bytes / gb).max(1) * gb;
    // On huge pages: decode streams these bytes every step (see `crate::huge`).
    let mut out = crate::huge::zeroed::<u8>(bytes.len());
    let work = |(src, dst): (&[u8], &mut [u8])| repack_group(dtype, src, rb, dst);
    for (i, (src, dst)) in bytes.chunks(piece).zip(out.chunks_mut(piece)).enumerate() {
        if src.len() >= 1 << 20 {
            src.par_chunks(gb)
                .zip(dst.par_chunks_mut(gb))
                .for_each(work);
        } else {
            src.chunks(gb).zip(dst.chunks_mut(gb)).for_each(work);
        }
        done(i * piece..i * piece + src.len());
    }
    Some((to, out))
}

/// One group: `src` is eight file rows of `rb` bytes, `dst` the same bytes interleaved.
fn repack_group(dtype: DType, src: &[u8], rb: usize, dst: &mut [u8]) {
    let bs = dtype.block().1;
    let qb = bs - 2;
    let nb = rb / bs;
    for b in 0..nb {
        let out = &mut dst[b * ROWS * bs..(b + 1) * ROWS * bs];
        for l in 0..ROWS {
            let blk = &src[l * rb + b * bs..l * rb + (b + 1) * bs];
            out[2 * l..2 * l + 2].copy_from_slice(&blk[..2]);
            for k in 0..qb / 4 {
                let at = 2 * ROWS + 32 * k + 4 * l;
                out[at..at + 4].copy_from_slice(&blk[2 + 4 * k..2 + 4 * k + 4]);
            }
        }
    }
}

/// Decodes row `lane` of one group (`group` = all eight rows' bytes) into `out`.
pub fn decode_row(dtype: DType, group: &[u8], lane: usize, out: &mut [f32]) {
    let bs = dtype.block().1;
    let gbs = ROWS * bs;
    assert!(lane < ROWS && group.len() == out.len() / 32 * gbs);
    for (blk, y) in group.chunks_exact(gbs).zip(out.chunks_exact_mut(32)) {
        let d = f16::from_le_bytes([blk[2 * lane], blk[2 * lane + 1]]).to_f32();
        for k in 0..(bs - 2) / 4 {
            let q = &blk[2 * ROWS + 32 * k + 4 * lane..][..4];
            for (j, &v) in q.iter().enumerate() {
                match dtype {
                    DType::Q4_0R8 => {
                        y[4 * k + j] = ((v & 0x0F) as i32 - 8) as f32 * d;
                        y[16 + 4 * k + j] = ((v >> 4) as i32 - 8) as f32 * d;
                    }
                    DType::Q8_0R8 => y[4 * k + j] = v as i8 as f32 * d,
                    other => panic!("decode_row: {} is not a repacked type", other.name()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MatRef;

    #[test]
    fn repacked_rows_decode_to_the_file_rows() {
        for dtype in [DType::Q4_0, DType::Q8_0] {
            let (rows, cols) = (24, 96);
            let vals: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
                .collect();
            let mut q = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
            crate::quantize::quantize_row(dtype, &vals, &mut q);
            let file = MatRef::new(dtype, &q, rows, cols).unwrap();
            let (to, packed) = repack(dtype, &q, rows, cols).unwrap();
            assert_eq!(to.file_type(), dtype);
            let m = MatRef::new(to, &packed, rows, cols).unwrap();
            assert_eq!(m.to_f32(), file.to_f32(), "{dtype:?}");
            // A group-aligned row range is a view of the same rows.
            let mut a = vec![0.0; cols];
            let mut b = vec![0.0; cols];
            m.row_range(8, 16).row_into(5, &mut a);
            file.row_into(13, &mut b);
            assert_eq!(a, b);
            // Shapes that cannot be repacked are refused, not mangled.
            assert!(repack(dtype, &q[..q.len() / rows * 4], 4, cols).is_none());
            assert!(MatRef::new(to, &packed[..packed.len() / rows * 4], 4, cols).is_none());
        }
        assert!(repack(DType::Q4K, &[], 0, 256).is_none());
    }

    #[test]
    fn repack_in_pieces_matches_whole_and_reports_every_source_byte() {
        for dtype in [DType::Q4_0, DType::Q8_0] {
            let (rows, cols) = (40, 64);
            let vals: Vec<f32> = (0..rows * cols).map(|i| (i % 17) as f32 - 8.0).collect();
            let mut q = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
            crate::quantize::quantize_row(dtype, &vals, &mut q);
            let whole = repack(dtype, &q, rows, cols).unwrap();
            let gb = ROWS * dtype.bytes_for(cols).unwrap();
            // Pieces of two groups (one left over), and a piece size below one group.
            for piece in [2 * gb + 5, 1] {
                let mut seen = vec![];
                let got = repack_pieces(dtype, &q, rows, cols, piece, |r| seen.push(r)).unwrap();
                assert_eq!(got, whole, "{dtype:?} piece {piece}");
                let step = (piece / gb).max(1) * gb;
                let want: Vec<_> = (0..q.len())
                    .step_by(step)
                    .map(|s| s..(s + step).min(q.len()))
                    .collect();
                assert_eq!(seen, want);
            }
        }
    }

    #[test]
    #[should_panic(expected = "cuts a group")]
    fn a_row_range_inside_a_group_is_a_bug() {
        let q = vec![0u8; DType::Q8_0.bytes_for(16 * 32).unwrap()];
        let (to, p) = repack(DType::Q8_0, &q, 16, 32).unwrap();
        MatRef::new(to, &p, 16, 32).unwrap().row_range(4, 8);
    }
}
