//! Row-interleaved copies of Q4_0, Q5_0, Q8_0 and Q4_K weights, made once at load.
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
//! one, as in the file). Q5_0 keeps Q4_0's nibbles and puts each row's 32 high bits
//! (the file's `qh` word) before them, rearranged ([`q5_spread`]) so that one 32-bit
//! shift and one mask put the high bits of a 32-byte load's nibbles at bit 4 of
//! their bytes:
//!
//! ```text
//! Q5_0R8 block (176 B): d[0..8] | spread qh of r0 … r7 (4 B each) | k=0..3 as Q4_0R8
//! ```
//!
//! Q4_K is interleaved per 256-value super-block, its header
//! fields each gathered over the eight rows and its quants as above, per 64 values:
//!
//! ```text
//! Q4_KR8 super-block (1152 B): d[0..8] | dmin[0..8] | scales bytes 0..4 of r0 … r7 |
//!   bytes 4..8 of r0 … r7 | bytes 8..12 of r0 … r7 |
//!   c=0, k=0: r0 q[0..4] … r7 q[0..4] | c=0, k=1: r0 q[4..8] … | … | c=3, k=7
//! ```
//!
//! (quant byte `32 c + j` of a row holds value `64 c + j` low and `64 c + 32 + j` high,
//! as in the file). The scales stay packed: the kernel unpacks them with the same word
//! operations for all eight rows at once, one 32-bit lane per row. A 32-byte load then holds four values of each of eight rows;
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
        DType::Q4K => Some(DType::Q4KR8),
        DType::Q5_0 => Some(DType::Q5_0R8),
        _ => None,
    }
}

/// Whether a `[rows, cols]` matrix of `dtype` can be repacked.
pub fn can_repack(dtype: DType, rows: usize, cols: usize) -> bool {
    repacked_type(dtype).is_some() && rows.is_multiple_of(ROWS) && dtype.bytes_for(cols).is_some()
}

/// Repacks a `[rows, cols]` matrix of Q4_0, Q5_0, Q8_0 or Q4_K (file layout) into its interleaved
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
    if dtype == DType::Q4K {
        for (b, out) in dst.chunks_exact_mut(ROWS * bs).enumerate() {
            for l in 0..ROWS {
                let blk = &src[l * rb + b * bs..l * rb + (b + 1) * bs];
                k4_scatter(blk, l, out);
            }
        }
        return;
    }
    let qb = bs - 2;
    let nb = rb / bs;
    for b in 0..nb {
        let out = &mut dst[b * ROWS * bs..(b + 1) * ROWS * bs];
        for l in 0..ROWS {
            let blk = &src[l * rb + b * bs..l * rb + (b + 1) * bs];
            out[2 * l..2 * l + 2].copy_from_slice(&blk[..2]);
            // Runs of four bytes: Q5_0's first is its `qh` word.
            for k in 0..qb / 4 {
                let at = 2 * ROWS + 32 * k + 4 * l;
                out[at..at + 4].copy_from_slice(&blk[2 + 4 * k..2 + 4 * k + 4]);
            }
            if dtype == DType::Q5_0 {
                let at = 2 * ROWS + 4 * l;
                let qh = u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
                out[at..at + 4].copy_from_slice(&q5_spread(qh).to_le_bytes());
            }
        }
    }
}

/// The value whose high bit sits at bit `8 b + p` of a Q5_0R8 spread word: the
/// value in byte `b` of the 32-byte load `k = p % 4`, low nibble for `p < 4` (value
/// `4 k + b`), high nibble for `p >= 4` (value `16 + 4 k + b`). Bit `p` of every byte
/// is then one load's four high bits, one per row byte.
#[inline]
const fn q5_bit_source(bit: usize) -> usize {
    let (b, p) = (bit / 8, bit % 8);
    16 * (p / 4) + 4 * (p % 4) + b
}

/// Where each bit of each `qh` byte goes in a spread word: `Q5_SPREAD[j][v]` is byte
/// `j` of `qh` holding `v`, spread (the other bytes zero).
const Q5_SPREAD: [[u32; 256]; 4] = {
    let mut t = [[0u32; 256]; 4];
    let mut bit = 0;
    while bit < 32 {
        let src = q5_bit_source(bit);
        let mut v = 0;
        while v < 256 {
            if (v >> (src % 8)) & 1 == 1 {
                t[src / 8][v] |= 1 << bit;
            }
            v += 1;
        }
        bit += 1;
    }
    t
};

/// A Q5_0 block's `qh` word (bit `i`: value `i`'s high bit) rearranged for Q5_0R8:
/// four table lookups, one per byte (a bit-by-bit loop made the repack of a
/// V2-Lite Q5_0 file's 2 GB of down projections take seconds).
pub fn q5_spread(qh: u32) -> u32 {
    let b = qh.to_le_bytes();
    (0..4).fold(0, |t, j| t | Q5_SPREAD[j][b[j] as usize])
}

/// The inverse of [`q5_spread`].
pub fn q5_unspread(t: u32) -> u32 {
    (0..32).fold(0, |qh, bit| qh | ((t >> bit) & 1) << q5_bit_source(bit))
}

/// Where byte `i` of a Q4_K file block (144 bytes) of row `lane` sits in its
/// Q4_KR8 super-block: `d`, `dmin`, the three scale words, then the quants.
#[inline]
fn k4_offset(i: usize, lane: usize) -> usize {
    match i {
        0..2 => 2 * lane + i,
        2..4 => 2 * ROWS + 2 * lane + (i - 2),
        4..16 => 4 * ROWS + 4 * ROWS * ((i - 4) / 4) + 4 * lane + (i - 4) % 4,
        _ => {
            let j = i - 16;
            16 * ROWS + 32 * ROWS * (j / 32) + 4 * ROWS * (j % 32 / 4) + 4 * lane + j % 4
        }
    }
}

/// Writes row `lane`'s Q4_K file block `blk` into its place in a Q4_KR8 super-block.
fn k4_scatter(blk: &[u8], lane: usize, out: &mut [u8]) {
    // Runs of four bytes stay together (the offsets are 4-aligned from byte 4 on).
    out[2 * lane..2 * lane + 2].copy_from_slice(&blk[..2]);
    out[2 * ROWS + 2 * lane..2 * ROWS + 2 * lane + 2].copy_from_slice(&blk[2..4]);
    for i in (4..144).step_by(4) {
        let o = k4_offset(i, lane);
        out[o..o + 4].copy_from_slice(&blk[i..i + 4]);
    }
}

/// Row `lane`'s Q4_K file block (144 bytes) back out of a Q4_KR8 super-block.
pub fn k4_gather(group_block: &[u8], lane: usize) -> [u8; 144] {
    let mut blk = [0u8; 144];
    for (i, v) in blk.iter_mut().enumerate() {
        *v = group_block[k4_offset(i, lane)];
    }
    blk
}

/// Row `lane`'s Q5_0 file block (22 bytes) back out of a Q5_0R8 block.
pub fn q5_gather(group_block: &[u8], lane: usize) -> [u8; 22] {
    let mut blk = [0u8; 22];
    blk[..2].copy_from_slice(&group_block[2 * lane..2 * lane + 2]);
    let at = 2 * ROWS + 4 * lane;
    let t = u32::from_le_bytes(group_block[at..at + 4].try_into().unwrap());
    blk[2..6].copy_from_slice(&q5_unspread(t).to_le_bytes());
    for k in 0..4 {
        let at = 2 * ROWS + 32 * (k + 1) + 4 * lane;
        blk[6 + 4 * k..10 + 4 * k].copy_from_slice(&group_block[at..at + 4]);
    }
    blk
}

/// Decodes row `lane` of one group (`group` = all eight rows' bytes) into `out`.
pub fn decode_row(dtype: DType, group: &[u8], lane: usize, out: &mut [f32]) {
    let bs = dtype.block().1;
    if dtype == DType::Q4KR8 {
        assert!(lane < ROWS && group.len() == out.len() / 256 * ROWS * bs);
        for (sb, y) in group.chunks_exact(ROWS * bs).zip(out.chunks_exact_mut(256)) {
            crate::quant::dequant_q4_k(&k4_gather(sb, lane), y);
        }
        return;
    }
    let gbs = ROWS * bs;
    assert!(lane < ROWS && group.len() == out.len() / 32 * gbs);
    if dtype == DType::Q5_0R8 {
        for (blk, y) in group.chunks_exact(gbs).zip(out.chunks_exact_mut(32)) {
            crate::quant::dequant_q5_0(&q5_gather(blk, lane), y);
        }
        return;
    }
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
        for (dtype, cols) in [
            (DType::Q4_0, 96),
            (DType::Q5_0, 96),
            (DType::Q8_0, 96),
            (DType::Q4K, 512),
        ] {
            let rows = 24;
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
        assert!(repack(DType::Q6K, &[], 0, 256).is_none());
        // Q4_K rows that are not whole super-blocks are never repacked.
        assert!(!can_repack(DType::Q4K, 8, 1408));
    }

    #[test]
    fn q5_spread_words_put_each_loads_high_bits_in_one_bit_plane() {
        for qh in [0u32, 1, 0x8000_0001, 0xDEAD_BEEF, 0x0123_4567, u32::MAX] {
            let t = q5_spread(qh);
            let by_bits = (0..32).fold(0, |t, bit| t | ((qh >> q5_bit_source(bit)) & 1) << bit);
            assert_eq!(t, by_bits);
            assert_eq!(q5_unspread(t), qh);
            assert_eq!(t.count_ones(), qh.count_ones());
            // Bit p of byte b: load p % 4, byte b; low nibble (value 4k + b) for
            // p < 4, high nibble (value 16 + 4k + b) above.
            for b in 0..4 {
                for k in 0..4 {
                    assert_eq!((t >> (8 * b + k)) & 1, (qh >> (4 * k + b)) & 1);
                    assert_eq!((t >> (8 * b + 4 + k)) & 1, (qh >> (16 + 4 * k + b)) & 1);
                }
            }
        }
    }

    #[test]
    fn repack_in_pieces_matches_whole_and_reports_every_source_byte() {
        for (dtype, cols) in [
            (DType::Q4_0, 64),
            (DType::Q5_0, 64),
            (DType::Q8_0, 64),
            (DType::Q4K, 256),
        ] {
            let rows = 40;
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
