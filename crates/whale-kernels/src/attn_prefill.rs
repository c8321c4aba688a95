//! Causal softmax attention of one head over a chunk of new rows: MLA prefill in the
//! expanded form, where every head has its own keys and values.
//!
//! The x86 kernel is tiled as flash attention is: a chunk of [`QC`] query rows passes
//! over the keys in blocks of [`KB`] (the block's keys and values stay in L2 while the
//! chunk's micro-tiles use them), scores come from a register tile of [`MR`] query rows
//! (packed transposed once per chunk) over keys packed transposed, the softmax is kept
//! online (running maximum and sum per row, earlier output rescaled), and the weighted
//! values come from a register tile of the same rows. AVX2 tiles are 6 rows × 16 keys
//! or columns (two vector loads and six broadcasts feed twelve FMAs); AVX-512 tiles
//! 6 rows × up to 64 (four loads and six broadcasts feed 24 FMAs). Blocks wholly in a
//! micro-tile's future are skipped. The bf16 tiles ([`causal_attention_bf16`]) have the
//! AVX-512 shapes with `vdpbf16ps` on pairs: keys and queries paired along their
//! values, values and probabilities along the keys. The portable twin is the direct
//! loop (scores, softmax, weighted sum per row); the tests compare every path with it
//! (the bf16 tiles with it on bf16-rounded inputs).

use crate::simd_f32;
use std::cell::RefCell;

/// Query rows per register tile.
pub(crate) const MR: usize = 6;
/// Query rows per chunk (a multiple of [`MR`]).
const QC: usize = 48;
/// Keys per block (a multiple of 16, at most 64: the AVX-512 score tile holds four
/// panels of 16). 32 measured slower with those tiles (`TILED_ONLY=1 cargo bench
/// --bench attn`, 3 alternated pairs: 57–58 against 66–80 GMAC/s).
const KB: usize = 64;
const _: () = assert!(KB.is_multiple_of(16) && KB <= 64);

thread_local! {
    /// Transposed keys, kept between calls: a fresh 3.5 MB buffer per head and layer
    /// costs a page fault per 4 KB on every prefill chunk.
    static KT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Values packed in bf16 pairs for [`causal_attention_bf16`], kept as [`KT`] is.
    static VT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows of `len` values inside a larger buffer: row `u` is
/// `data[u·stride + offset..][..len]` (one head's slice of a `[N, H, ·]` array, say).
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Values from one row to the next.
    pub stride: usize,
    /// Where row 0 starts.
    pub offset: usize,
    /// Values per row.
    pub len: usize,
}

impl<'a> Rows<'a> {
    /// Contiguous rows of `len` values.
    pub fn dense(data: &'a [f32], len: usize) -> Self {
        Rows {
            data,
            stride: len,
            offset: 0,
            len,
        }
    }

    /// Row `u`.
    #[inline]
    pub fn row(&self, u: usize) -> &'a [f32] {
        &self.data[u * self.stride + self.offset..][..self.len]
    }

    fn holds(&self, n: usize) -> bool {
        self.offset + self.len <= self.stride
            && (n == 0 || self.data.len() >= (n - 1) * self.stride + self.offset + self.len)
    }
}

/// `out[i] = Σ_{u ≤ past + i} softmax_u(scale · q[i] · k[u]) · v[u]` for the `T` rows of
/// `q` (`[T, D]`), whose positions are `past..past + T`, over `N ≥ past + T` keys and
/// values; `out` is `[T, Dv]`. Each key is the concatenation of its rows in `k_parts`
/// (MLA: the decompressed no-position part and the shared RoPE part, read where they
/// lie), `D` values in all.
///
/// # Panics
/// If the lengths disagree with the dimensions.
pub fn causal_attention(
    q: &[f32],
    k_parts: &[Rows<'_>],
    v: Rows<'_>,
    past: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d: usize = k_parts.iter().map(|p| p.len).sum();
    let dv = v.len;
    assert!(d > 0 && dv > 0 && q.len().is_multiple_of(d));
    let t = q.len() / d;
    let n = past + t;
    assert!(k_parts.iter().all(|p| p.holds(n)) && v.holds(n) && out.len() == t * dv);
    if t == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::qdot::isa() != crate::qdot::Isa::Scalar && dv.is_multiple_of(16) {
        let wide = crate::qdot::isa() == crate::qdot::Isa::Avx512Vnni;
        KT.with_borrow_mut(|kt| {
            let a = pack_keys(k_parts, n, d, kt);
            let kt = &kt[a..];
            // SAFETY: AVX2 and FMA were detected (and AVX-512 F where `isa` is the
            // VNNI one); `kt` holds `n` keys packed by `pack_keys` and the asserts
            // above bound `q`, `v` and `out`.
            unsafe {
                if wide {
                    x86::causal512(q, t, kt, v, d, past, scale, out)
                } else {
                    x86::causal(q, t, kt, v, d, past, scale, out)
                }
            }
        });
        return;
    }
    causal_portable(q, t, k_parts, v, past, scale, out)
}

/// [`causal_attention`] multiplying in bf16, as decode attention over a bf16 cache does:
/// queries, keys, values and probabilities rounded to bf16, every sum in f32.
/// `vdpbf16ps` does 32 multiply-adds per instruction where an f32 FMA does 16, and the
/// packed keys and values are half the bytes the tiles read from L2. Where the CPU has
/// no AVX-512 BF16 (or `Dv` is not a multiple of 16) this is [`causal_attention`],
/// in f32.
///
/// # Panics
/// As [`causal_attention`].
pub fn causal_attention_bf16(
    q: &[f32],
    k_parts: &[Rows<'_>],
    v: Rows<'_>,
    past: usize,
    scale: f32,
    out: &mut [f32],
) {
    bf16_on(q, k_parts, v, past, scale, out, true)
}

/// [`causal_attention_bf16`], on AMX tiles (`crate::amx`) where `tiles` and the CPU
/// has them and `D` and `Dv` are multiples of 32, else with `vdpbf16ps`: both round
/// the same values to bf16 and sum in f32.
pub(crate) fn bf16_on(
    q: &[f32],
    k_parts: &[Rows<'_>],
    v: Rows<'_>,
    past: usize,
    scale: f32,
    out: &mut [f32],
    tiles: bool,
) {
    let d: usize = k_parts.iter().map(|p| p.len).sum();
    let dv = v.len;
    assert!(d > 0 && dv > 0 && q.len().is_multiple_of(d));
    let t = q.len() / d;
    let n = past + t;
    assert!(k_parts.iter().all(|p| p.holds(n)) && v.holds(n) && out.len() == t * dv);
    #[cfg(target_arch = "x86_64")]
    if t > 0 && tiles && crate::amx::available() && d.is_multiple_of(32) && dv.is_multiple_of(32) {
        KT.with_borrow_mut(|kt| {
            VT.with_borrow_mut(|vt| {
                // Keys and values padded with zeros to whole blocks of 32 keys.
                let a = pack_keys_bf16(k_parts, n, d, 32, kt);
                let b = pack_values_bf16(v, n, 32, vt);
                crate::amx::causal(q, t, &kt[a..], &vt[b..], d, dv, past, scale, out);
            })
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if t > 0 && crate::attn::bf16_dot() && dv.is_multiple_of(16) {
        KT.with_borrow_mut(|kt| {
            VT.with_borrow_mut(|vt| {
                let a = pack_keys_bf16(k_parts, n, d, 1, kt);
                let b = pack_values_bf16(v, n, 1, vt);
                let pairs = Rows {
                    data: &vt[b..],
                    stride: dv,
                    offset: 0,
                    len: dv,
                };
                // SAFETY: `bf16_dot` means AVX-512 F/BW/VL and BF16 were detected;
                // `kt` holds `n` keys and `vt` `n` values packed in pairs by the two
                // functions above, and the asserts above bound `q` and `out`.
                unsafe { x86::causal_bf16(q, t, &kt[a..], pairs, d, past, scale, out) }
            })
        });
        return;
    }
    let _ = tiles;
    causal_attention(q, k_parts, v, past, scale, out)
}

/// Two bf16 values in one 32-bit slot (the first in the low half), as `vdpbf16ps`
/// takes a pair; kept in an f32 slot (its bits only).
#[inline]
fn pair_slot(lo: u16, hi: u16) -> f32 {
    f32::from_bits(lo as u32 | (hi as u32) << 16)
}

/// [`pack_keys`] for the bf16 tiles: panels of 16 keys, each key's values rounded to
/// bf16 and paired (`2j`, `2j + 1`) into slots, `kt[a + (p·S + j)·16 + c]` slot `j` of
/// key `p·16 + c` (`S = ⌈D/2⌉`; zeros past `N`, up to a multiple of `pad` keys, and
/// past `D`). Sixteen slots of a panel are an AMX B tile. Returns `a`, the buffer's
/// first 64-byte boundary.
fn pack_keys_bf16(
    k_parts: &[Rows<'_>],
    n: usize,
    d: usize,
    pad: usize,
    kt: &mut Vec<f32>,
) -> usize {
    let (panels, sl) = (n.next_multiple_of(pad).div_ceil(16), d.div_ceil(2));
    let a = crate::resize_aligned(kt, panels * sl * 16);
    let kt = &mut kt[a..a + panels * sl * 16];
    let (mut row, mut bits) = (vec![0.0f32; 2 * sl], vec![0u16; 2 * sl]);
    for (p, panel) in kt.chunks_exact_mut(sl * 16).enumerate() {
        for c in 0..16 {
            let u = p * 16 + c;
            if u < n {
                let mut j0 = 0;
                for part in k_parts {
                    row[j0..j0 + part.len].copy_from_slice(part.row(u));
                    j0 += part.len;
                }
                crate::attn::to_bf16(&row, &mut bits);
            } else {
                bits.fill(0);
            }
            for j in 0..sl {
                panel[j * 16 + c] = pair_slot(bits[2 * j], bits[2 * j + 1]);
            }
        }
    }
    a
}

/// The `N` value rows rounded to bf16 and paired by rows: `vt[a + i·Dv + c]` holds
/// rows `2i` and `2i + 1` of column `c` (zero rows past `N`, up to a multiple of
/// `pad`). Returns `a`, the buffer's first 64-byte boundary.
fn pack_values_bf16(v: Rows<'_>, n: usize, pad: usize, vt: &mut Vec<f32>) -> usize {
    let dv = v.len;
    let pairs = n.next_multiple_of(pad).div_ceil(2);
    let a = crate::resize_aligned(vt, pairs * dv);
    let vt = &mut vt[a..a + pairs * dv];
    let (mut b0, mut b1) = (vec![0u16; dv], vec![0u16; dv]);
    for (i, slots) in vt.chunks_exact_mut(dv).enumerate() {
        if 2 * i < n {
            crate::attn::to_bf16(v.row(2 * i), &mut b0);
        } else {
            b0.fill(0);
        }
        if 2 * i + 1 < n {
            crate::attn::to_bf16(v.row(2 * i + 1), &mut b1);
        } else {
            b1.fill(0);
        }
        for (c, slot) in slots.iter_mut().enumerate() {
            *slot = pair_slot(b0[c], b1[c]);
        }
    }
    a
}

/// The direct loop: each row's scores over the keys it sees, softmax, weighted sum.
fn causal_portable(
    q: &[f32],
    t: usize,
    k_parts: &[Rows<'_>],
    v: Rows<'_>,
    past: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d: usize = k_parts.iter().map(|p| p.len).sum();
    let dv = v.len;
    let mut s = vec![0.0f32; past + t];
    for i in 0..t {
        let vis = past + i + 1;
        let qi = &q[i * d..(i + 1) * d];
        for (u, su) in s[..vis].iter_mut().enumerate() {
            let mut j = 0;
            let mut acc = 0.0;
            for p in k_parts {
                acc += simd_f32::dot(&qi[j..j + p.len], p.row(u));
                j += p.len;
            }
            *su = acc * scale;
        }
        let m = s[..vis].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = simd_f32::exp_sum(&mut s[..vis], m);
        let o = &mut out[i * dv..(i + 1) * dv];
        o.fill(0.0);
        for (u, &p) in s[..vis].iter().enumerate() {
            simd_f32::axpy(p, v.row(u), o);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `N` keys of `D` values as panels of 16: `kt[a + (p·D + j)·16 + c]` is value `j` of
/// key `p·16 + c`, zeros past `N`, where `a` (returned) is the buffer's first 64-byte
/// boundary, so no key load straddles two cache lines. The buffer is reused as it
/// is (only its growth and the last panel's padding are zeroed: clearing all of it
/// was a 3.5 MB memset per head and layer at depth 4096), and whole 16 × 16 blocks
/// are transposed in registers where AVX-512 runs.
pub(crate) fn pack_keys(k_parts: &[Rows<'_>], n: usize, d: usize, kt: &mut Vec<f32>) -> usize {
    let panels = n.div_ceil(16);
    let a = crate::resize_aligned(kt, panels * d * 16);
    let kt = &mut kt[a..a + panels * d * 16];
    #[cfg(target_arch = "x86_64")]
    let blocks = crate::qdot::isa() == crate::qdot::Isa::Avx512Vnni;
    #[cfg(not(target_arch = "x86_64"))]
    let blocks = false;
    for (p, panel) in kt.chunks_exact_mut(d * 16).enumerate() {
        let keys = 16.min(n - p * 16);
        let mut j0 = 0;
        for part in k_parts {
            let mut j = 0;
            #[cfg(target_arch = "x86_64")]
            if blocks && keys == 16 {
                while j + 16 <= part.len {
                    let src: [&[f32]; 16] =
                        std::array::from_fn(|c| &part.row(p * 16 + c)[j..j + 16]);
                    // SAFETY: the VNNI ISA implies AVX-512 F; each source holds 16 values
                    // and the panel 16 × 16 from value `j0 + j`.
                    unsafe { x86::transpose16(src, &mut panel[(j0 + j) * 16..(j0 + j + 16) * 16]) };
                    j += 16;
                }
            }
            for c in 0..keys {
                for (jj, &x) in part.row(p * 16 + c)[j..].iter().enumerate() {
                    panel[(j0 + j + jj) * 16 + c] = x;
                }
            }
            j0 += part.len;
        }
        if keys < 16 {
            // Padding keys weigh nothing only if they are zeros (the buffer is reused).
            for j in 0..d {
                panel[j * 16 + keys..(j + 1) * 16].fill(0.0);
            }
        }
    }
    a
}

/// [`pack_keys`]'s element-by-element layout (the twin the block transpose is
/// tested against).
#[cfg(test)]
fn pack_keys_scalar(k_parts: &[Rows<'_>], n: usize, d: usize) -> Vec<f32> {
    let mut kt = vec![0.0; n.div_ceil(16) * d * 16];
    for u in 0..n {
        let (p, c) = (u / 16, u % 16);
        let mut j0 = 0;
        for part in k_parts {
            for (j, &x) in part.row(u).iter().enumerate() {
                kt[(p * d + j0 + j) * 16 + c] = x;
            }
            j0 += part.len;
        }
    }
    kt
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Rows, KB, MR, QC};
    use crate::simd_f32;
    use std::arch::x86_64::*;

    /// `dst[j·16 + c] = src[c][j]` for a 16 × 16 block: interleaves of 32 and 64 bits
    /// within 128-bit lanes, then two rounds of lane shuffles (64 shuffles, 16 loads
    /// and 16 stores for 256 values).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose16(src: [&[f32]; 16], dst: &mut [f32]) {
        assert!(dst.len() >= 256 && src.iter().all(|r| r.len() >= 16));
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src[i].as_ptr()));
        // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (values 0,1 and 2,3 of each lane).
        let t: [__m512d; 16] = std::array::from_fn(|k| {
            let (a, b) = (r[k & !1], r[k | 1]);
            _mm512_castps_pd(if k % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            })
        });
        // u[4i + k]: in lane L, rows 4i..4i+4 at value 4L + k.
        let u: [__m512; 16] = std::array::from_fn(|m| {
            let (i, k) = (m / 4, m % 4);
            let (a, b) = (t[4 * i + k / 2], t[4 * i + 2 + k / 2]);
            _mm512_castpd_ps(if k % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        let out = dst.as_mut_ptr();
        for k in 0..4 {
            let (v0, w0) = (
                _mm512_shuffle_f32x4::<0b10_00_10_00>(u[k], u[4 + k]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(u[k], u[4 + k]),
            );
            let (v1, w1) = (
                _mm512_shuffle_f32x4::<0b10_00_10_00>(u[8 + k], u[12 + k]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(u[8 + k], u[12 + k]),
            );
            // Value 4L + k of all sixteen rows.
            let cols = [
                _mm512_shuffle_f32x4::<0b10_00_10_00>(v0, v1),
                _mm512_shuffle_f32x4::<0b10_00_10_00>(w0, w1),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(v0, v1),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(w0, w1),
            ];
            for (l, c) in cols.iter().enumerate() {
                _mm512_storeu_ps(out.add((4 * l + k) * 16), *c);
            }
        }
    }

    /// `out[i·ostride + c] = scale · Σ_j a[i][j] · panel[j·16 + c]` for six rows `a` of
    /// `d` values and a panel of 16 columns packed as [`super::pack_keys`] lays them out:
    /// two vector loads and six broadcasts feed twelve FMAs, no horizontal sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn tile_6x16(
        a: [*const f32; MR],
        panel: *const f32,
        d: usize,
        scale: __m256,
        out: *mut f32,
        ostride: usize,
    ) {
        let mut a0 = [_mm256_setzero_ps(); MR];
        let mut a1 = [_mm256_setzero_ps(); MR];
        for j in 0..d {
            let k0 = _mm256_loadu_ps(panel.add(j * 16));
            let k1 = _mm256_loadu_ps(panel.add(j * 16 + 8));
            for i in 0..MR {
                let x = _mm256_broadcast_ss(&*a[i].add(j));
                a0[i] = _mm256_fmadd_ps(x, k0, a0[i]);
                a1[i] = _mm256_fmadd_ps(x, k1, a1[i]);
            }
        }
        for i in 0..MR {
            let op = out.add(i * ostride);
            _mm256_storeu_ps(op, _mm256_mul_ps(a0[i], scale));
            _mm256_storeu_ps(op.add(8), _mm256_mul_ps(a1[i], scale));
        }
    }

    /// A micro-tile of the tiled kernel: the scores of [`MR`] query rows against a
    /// block's keys, and those rows' weighted values.
    pub(crate) trait Tile {
        /// Packed slots per key (and per query row) of `d` values: one value each
        /// (f32), or a bf16 pair each.
        fn slots(d: usize) -> usize {
            d
        }
        /// Query row `i` of a tile into `tile`, transposed: `tile[j·MR + i]` is its
        /// slot `j`.
        fn pack_query(row: &[f32], i: usize, tile: &mut [f32]) {
            for (j, &x) in row.iter().enumerate() {
                tile[j * MR + i] = x;
            }
        }
        /// Where the values of the block of keys from `kb` start, and the slots from
        /// one of [`Self::values`]' rows to the next.
        ///
        /// # Safety
        /// `v` holds the block.
        unsafe fn v_block(v: Rows<'_>, kb: usize) -> (*const f32, usize) {
            (v.data.as_ptr().add(kb * v.stride + v.offset), v.stride)
        }
        /// `out[i·KB + c] = scale · a_i · key c` for the `MR` query rows packed
        /// transposed in `a` (`a[j·MR + i]` is slot `j` of row `i`: one pointer and
        /// fixed offsets feed the broadcasts) against `panels` panels of 16 keys
        /// from `kt` (as [`super::pack_keys`] lays them out, `d × 16` slots each; `d`
        /// counts slots, [`Self::slots`]).
        ///
        /// # Safety
        /// The CPU has the tile's features; `a` holds `d · MR` values, `kt` the
        /// panels, `out` `MR` rows of [`KB`], and `panels · 16 <= KB`.
        unsafe fn scores(
            a: *const f32,
            kt: *const f32,
            panels: usize,
            d: usize,
            scale: f32,
            out: *mut f32,
        );
        /// For the first `mr` rows of `o` (`dv` values each):
        /// `o[i] = alpha[i] · o[i] + Σ_u s[i][u] · v[u]` over `kn` value rows at
        /// `v + u · vstride` (`s` rows [`KB`] apart).
        ///
        /// # Safety
        /// The CPU has the tile's features; the pointers hold what the sizes say,
        /// `s` and `alpha` `MR` rows, `dv` is a multiple of 16.
        #[allow(clippy::too_many_arguments)]
        unsafe fn values(
            o: *mut f32,
            dv: usize,
            mr: usize,
            alpha: &[f32],
            s: *const f32,
            v: *const f32,
            vstride: usize,
            kn: usize,
        );
    }

    /// AVX2: six rows, two 8-float vectors per 16 keys or columns (twelve
    /// accumulators), one panel of keys at a time.
    pub(crate) struct Avx2;

    impl Tile for Avx2 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn scores(
            a: *const f32,
            kt: *const f32,
            panels: usize,
            d: usize,
            scale: f32,
            out: *mut f32,
        ) {
            let sc = _mm256_set1_ps(scale);
            for p in 0..panels {
                let panel = kt.add(p * d * 16);
                let mut a0 = [_mm256_setzero_ps(); MR];
                let mut a1 = [_mm256_setzero_ps(); MR];
                for j in 0..d {
                    let k0 = _mm256_loadu_ps(panel.add(j * 16));
                    let k1 = _mm256_loadu_ps(panel.add(j * 16 + 8));
                    for i in 0..MR {
                        let x = _mm256_broadcast_ss(&*a.add(j * MR + i));
                        a0[i] = _mm256_fmadd_ps(x, k0, a0[i]);
                        a1[i] = _mm256_fmadd_ps(x, k1, a1[i]);
                    }
                }
                for i in 0..MR {
                    let op = out.add(i * KB + p * 16);
                    _mm256_storeu_ps(op, _mm256_mul_ps(a0[i], sc));
                    _mm256_storeu_ps(op.add(8), _mm256_mul_ps(a1[i], sc));
                }
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn values(
            o: *mut f32,
            dv: usize,
            mr: usize,
            alpha: &[f32],
            s: *const f32,
            v: *const f32,
            vstride: usize,
            kn: usize,
        ) {
            for j in (0..dv).step_by(16) {
                let mut a0 = [_mm256_setzero_ps(); MR];
                let mut a1 = [_mm256_setzero_ps(); MR];
                for i in 0..mr {
                    let al = _mm256_set1_ps(alpha[i]);
                    a0[i] = _mm256_mul_ps(_mm256_loadu_ps(o.add(i * dv + j)), al);
                    a1[i] = _mm256_mul_ps(_mm256_loadu_ps(o.add(i * dv + j + 8)), al);
                }
                for u in 0..kn {
                    let vp = v.add(u * vstride + j);
                    let v0 = _mm256_loadu_ps(vp);
                    let v1 = _mm256_loadu_ps(vp.add(8));
                    for i in 0..MR {
                        let p = _mm256_broadcast_ss(&*s.add(i * KB + u));
                        a0[i] = _mm256_fmadd_ps(p, v0, a0[i]);
                        a1[i] = _mm256_fmadd_ps(p, v1, a1[i]);
                    }
                }
                for i in 0..mr {
                    _mm256_storeu_ps(o.add(i * dv + j), a0[i]);
                    _mm256_storeu_ps(o.add(i * dv + j + 8), a1[i]);
                }
            }
        }
    }

    /// AVX-512: six rows × up to 64 keys or columns, four 16-float vectors per row
    /// (24 accumulators of the 32 registers): per step four loads and six broadcasts
    /// feed 24 FMAs. Twelve rows × 16 (one load and twelve broadcasts per twelve
    /// FMAs) measured the same within this VM's noise (`TILED_ONLY=1 cargo bench
    /// --bench attn`, one thread, 512 rows at depth 4096: 29–42 GMAC/s either way,
    /// against ~81 that a loop of independent 512-bit FMAs reaches on one core); in
    /// `perf` both wait on the key and value loads, which come from L2.
    pub(crate) struct Avx512;

    /// What a 512-bit tile multiplies, each kept in 32-bit slots: f32 values (one
    /// per lane, FMA) or bf16 pairs (two per lane, `vdpbf16ps`).
    trait Slots {
        /// A vector of slots.
        type V: Copy;
        /// Values per slot.
        const PER: usize;
        /// Sixteen slots from `p`.
        unsafe fn load(p: *const f32) -> Self::V;
        /// The slot at `p` in every lane.
        unsafe fn splat(p: *const f32) -> Self::V;
        /// `acc` plus the lane-wise products of `x` and `y` (a pair's two summed).
        unsafe fn madd(acc: __m512, x: Self::V, y: Self::V) -> __m512;
    }

    /// f32 slots ([`Avx512`]).
    struct F32s;

    impl Slots for F32s {
        type V = __m512;
        const PER: usize = 1;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m512 {
            _mm512_set1_ps(*p)
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, x: __m512, y: __m512) -> __m512 {
            _mm512_fmadd_ps(x, y, acc)
        }
    }

    /// bf16 pair slots ([`Bf16`], `super::pair_slot`).
    struct Pairs;

    impl Slots for Pairs {
        type V = __m512bh;
        const PER: usize = 2;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512bh {
            bh(_mm512_castps_si512(_mm512_loadu_ps(p)))
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m512bh {
            bh(_mm512_castps_si512(_mm512_set1_ps(*p)))
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, x: __m512bh, y: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(acc, x, y)
        }
    }

    /// [`Tile::scores`] on 512-bit slots: `NP` panels of 16 keys at once, `d` slots
    /// per key (inlined into each feature-enabled tile).
    #[inline(always)]
    unsafe fn scores512<S: Slots, const NP: usize>(
        a: *const f32,
        kt: *const f32,
        d: usize,
        scale: f32,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for j in 0..d {
            let k: [S::V; NP] = std::array::from_fn(|p| S::load(kt.add((p * d + j) * 16)));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = S::splat(a.add(j * MR + i));
                for (y, kp) in row.iter_mut().zip(&k) {
                    *y = S::madd(*y, x, *kp);
                }
            }
        }
        let sc = _mm512_set1_ps(scale);
        for (i, row) in acc.iter().enumerate() {
            for (p, y) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * KB + p * 16), _mm512_mul_ps(*y, sc));
            }
        }
    }

    /// [`scores512`] for `panels` panels.
    #[inline(always)]
    unsafe fn scores512_panels<S: Slots>(
        a: *const f32,
        kt: *const f32,
        panels: usize,
        d: usize,
        scale: f32,
        out: *mut f32,
    ) {
        match panels {
            4 => scores512::<S, 4>(a, kt, d, scale, out),
            3 => scores512::<S, 3>(a, kt, d, scale, out),
            2 => scores512::<S, 2>(a, kt, d, scale, out),
            _ => scores512::<S, 1>(a, kt, d, scale, out),
        }
    }

    /// [`Tile::values`] on 512-bit slots, `NC` vectors of 16 columns: `steps` slots of
    /// the probabilities (`p`, rows `KB / S::PER` slots apart) against as many value rows
    /// (`vstride` slots apart).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn values512<S: Slots, const NC: usize>(
        o: *mut f32,
        dv: usize,
        mr: usize,
        alpha: &[f32],
        p: *const f32,
        v: *const f32,
        vstride: usize,
        steps: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NC]; MR];
        for (i, row) in acc.iter_mut().enumerate().take(mr) {
            let al = _mm512_set1_ps(alpha[i]);
            for (c, y) in row.iter_mut().enumerate() {
                *y = _mm512_mul_ps(_mm512_loadu_ps(o.add(i * dv + c * 16)), al);
            }
        }
        for u in 0..steps {
            let vp = v.add(u * vstride);
            let vv: [S::V; NC] = std::array::from_fn(|c| S::load(vp.add(c * 16)));
            for (i, row) in acc.iter_mut().enumerate() {
                let pu = S::splat(p.add(i * (KB / S::PER) + u));
                for (y, x) in row.iter_mut().zip(&vv) {
                    *y = S::madd(*y, pu, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(mr) {
            for (c, y) in row.iter().enumerate() {
                _mm512_storeu_ps(o.add(i * dv + c * 16), *y);
            }
        }
    }

    /// [`values512`] over all `dv` columns, 64 at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn values512_cols<S: Slots>(
        o: *mut f32,
        dv: usize,
        mr: usize,
        alpha: &[f32],
        p: *const f32,
        v: *const f32,
        vstride: usize,
        steps: usize,
    ) {
        let mut j = 0;
        while j < dv {
            let (o, v) = (o.add(j), v.add(j));
            match (dv - j) / 16 {
                1 => values512::<S, 1>(o, dv, mr, alpha, p, v, vstride, steps),
                2 => values512::<S, 2>(o, dv, mr, alpha, p, v, vstride, steps),
                3 => values512::<S, 3>(o, dv, mr, alpha, p, v, vstride, steps),
                _ => values512::<S, 4>(o, dv, mr, alpha, p, v, vstride, steps),
            }
            j += 64;
        }
    }

    impl Tile for Avx512 {
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn scores(
            a: *const f32,
            kt: *const f32,
            panels: usize,
            d: usize,
            scale: f32,
            out: *mut f32,
        ) {
            scores512_panels::<F32s>(a, kt, panels, d, scale, out)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn values(
            o: *mut f32,
            dv: usize,
            mr: usize,
            alpha: &[f32],
            s: *const f32,
            v: *const f32,
            vstride: usize,
            kn: usize,
        ) {
            values512_cols::<F32s>(o, dv, mr, alpha, s, v, vstride, kn)
        }
    }

    /// See [`super::causal_attention`]; `kt` is the keys as [`super::pack_keys`] lays
    /// them out, `v.len` a multiple of 16. The AVX2 tiles.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the buffers hold what the sizes say.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn causal(
        q: &[f32],
        t: usize,
        kt: &[f32],
        v: Rows<'_>,
        d: usize,
        past: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        causal_body::<Avx2>(q, t, kt, v, d, past, scale, out)
    }

    /// [`causal`] with the AVX-512 tiles.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, AVX2 and FMA; the buffers hold what the sizes say.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn causal512(
        q: &[f32],
        t: usize,
        kt: &[f32],
        v: Rows<'_>,
        d: usize,
        past: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        causal_body::<Avx512>(q, t, kt, v, d, past, scale, out)
    }

    /// [`causal512`] with the bf16 tiles: `kt` as `pack_keys_bf16` lays the keys out,
    /// `v` the value pairs of `pack_values_bf16` (`stride` = `len` = `Dv` slots).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and BF16; the buffers hold what the sizes say.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn causal_bf16(
        q: &[f32],
        t: usize,
        kt: &[f32],
        v: Rows<'_>,
        d: usize,
        past: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        causal_body::<Bf16>(q, t, kt, v, d, past, scale, out)
    }

    /// The same 512 bits as 32 bf16 lanes (a change of type only).
    #[inline(always)]
    pub(crate) fn bh(x: __m512i) -> __m512bh {
        // SAFETY: both are plain 64-byte vectors; every bit pattern is valid in both.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    }

    /// The [`Avx512`] shapes on bf16 pairs (`vdpbf16ps`): six rows × up to 64 keys or
    /// columns, each step a pair of values of the queries and keys, or a pair of
    /// rows of the probabilities and values.
    pub(crate) struct Bf16;

    impl Tile for Bf16 {
        fn slots(d: usize) -> usize {
            d.div_ceil(2)
        }

        fn pack_query(row: &[f32], i: usize, tile: &mut [f32]) {
            let mut bits = vec![0u16; row.len().next_multiple_of(2)];
            crate::attn::to_bf16(row, &mut bits[..row.len()]);
            for (j, b) in bits.chunks_exact(2).enumerate() {
                tile[j * MR + i] = super::pair_slot(b[0], b[1]);
            }
        }

        unsafe fn v_block(v: Rows<'_>, kb: usize) -> (*const f32, usize) {
            // Blocks start at multiples of KB, so at a pair.
            (v.data.as_ptr().add(kb / 2 * v.stride), v.stride)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn scores(
            a: *const f32,
            kt: *const f32,
            panels: usize,
            dk: usize,
            scale: f32,
            out: *mut f32,
        ) {
            scores512_panels::<Pairs>(a, kt, panels, dk, scale, out)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn values(
            o: *mut f32,
            dv: usize,
            mr: usize,
            alpha: &[f32],
            s: *const f32,
            v: *const f32,
            vstride: usize,
            kn: usize,
        ) {
            // The probabilities as bf16 pairs (zeros past `kn`).
            let mut pp = [0.0f32; MR * KB / 2];
            let mut bits = [0u16; KB];
            for i in 0..MR {
                let row = std::slice::from_raw_parts(s.add(i * KB), kn);
                crate::attn::to_bf16(row, &mut bits[..kn]);
                bits[kn..].fill(0);
                for (u, b) in bits.chunks_exact(2).enumerate() {
                    pp[i * KB / 2 + u] = super::pair_slot(b[0], b[1]);
                }
            }
            let p = pp.as_ptr();
            values512_cols::<Pairs>(o, dv, mr, alpha, p, v, vstride, kn.div_ceil(2))
        }
    }

    /// The chunked, blocked loop both tile shapes share (inlined into each
    /// feature-enabled entry point, so the tiles inline into it).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn causal_body<T: Tile>(
        q: &[f32],
        t: usize,
        kt: &[f32],
        v: Rows<'_>,
        d: usize,
        past: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let r = MR;
        let dv = v.len;
        // Packed slots per key and query row.
        let dk = T::slots(d);
        let mut m = [f32::NEG_INFINITY; QC];
        let mut l = [0.0f32; QC];
        // The chunk's sums and packed queries from 64-byte boundaries (`align64`).
        let mut obuf = Vec::new();
        let oa = crate::resize_aligned(&mut obuf, QC * dv);
        let o = &mut obuf[oa..oa + QC * dv];
        let mut s = [[0.0f32; KB]; MR];
        let mut alpha = [0.0f32; MR];
        // The chunk's query rows, a tile of `r` at a time, packed transposed (rows
        // past the chunk's end repeat its last row; their scores are dropped).
        let mut qbuf = Vec::new();
        let qa = crate::resize_aligned(&mut qbuf, QC * dk);
        let qpk = &mut qbuf[qa..qa + QC * dk];
        for q0 in (0..t).step_by(QC) {
            let q1 = (q0 + QC).min(t);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            o.fill(0.0);
            for (ti, r0) in (q0..q1).step_by(r).enumerate() {
                let mr = (r0 + r).min(q1) - r0;
                let tile = &mut qpk[ti * r * dk..(ti + 1) * r * dk];
                for i in 0..r {
                    T::pack_query(&q[(r0 + i.min(mr - 1)) * d..][..d], i, tile);
                }
            }
            // Keys the chunk's last row sees.
            let kend = past + q1;
            for kb in (0..kend).step_by(KB) {
                for r0 in (q0..q1).step_by(r) {
                    let r1 = (r0 + r).min(q1);
                    let mr = r1 - r0;
                    // Row i sees keys < past + i + 1; the tile's last row sees most.
                    if kb >= past + r1 {
                        continue;
                    }
                    let kn = (kb + KB).min(past + r1) - kb;
                    // Scores s[i][..kn]: rows past mr repeat the last row (dropped below).
                    let qp = qpk.as_ptr().add((r0 - q0) * dk);
                    T::scores(
                        qp,
                        kt.as_ptr().add(kb * dk),
                        kn.div_ceil(16),
                        dk,
                        scale,
                        s.as_mut_ptr() as *mut f32,
                    );
                    // Online softmax: probabilities into s, zero where a row cannot see.
                    for i in 0..r {
                        let vis = if i < mr {
                            (past + r0 + i + 1).saturating_sub(kb).min(kn)
                        } else {
                            0
                        };
                        if vis == 0 {
                            // Padding row, or a row this whole block is future to.
                            alpha[i] = 1.0;
                            s[i][..kn].fill(0.0);
                            continue;
                        }
                        let row = &mut s[i][..kn];
                        let mi = r0 - q0 + i;
                        let bm = simd_f32::max(&row[..vis]);
                        let mnew = m[mi].max(bm);
                        alpha[i] = simd_f32::exp(m[mi] - mnew);
                        let sum = simd_f32::exp_sum(&mut row[..vis], mnew);
                        row[vis..].fill(0.0);
                        l[mi] = l[mi] * alpha[i] + sum;
                        m[mi] = mnew;
                    }
                    // o[rows] = o[rows] · alpha + s · v[kb..kb + kn]
                    let op = o.as_mut_ptr().add((r0 - q0) * dv);
                    let (vp, vstride) = T::v_block(v, kb);
                    T::values(
                        op,
                        dv,
                        mr,
                        &alpha,
                        s.as_ptr() as *const f32,
                        vp,
                        vstride,
                        kn,
                    );
                }
            }
            for i in q0..q1 {
                let inv = 1.0 / l[i - q0];
                let src = &o[(i - q0) * dv..(i - q0 + 1) * dv];
                for (dst, &x) in out[i * dv..(i + 1) * dv].iter_mut().zip(src) {
                    *dst = x * inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * 2.0)
            .collect()
    }

    /// The tiled kernel against the direct loop, over shapes that leave partial
    /// micro-tiles, chunks and key blocks, with and without cached rows.
    #[test]
    fn tiled_kernel_equals_the_direct_loop() {
        for &(t, past, d, dv) in &[
            (1, 0, 8, 16),
            (5, 0, 24, 16),
            (7, 3, 24, 32),
            (48, 0, 40, 16),
            (53, 70, 192, 128),
            (100, 17, 16, 48),
            (130, 200, 24, 16),
        ] {
            let n = past + t;
            let q = data(t * d, 1.0);
            let k = data(n * d, 2.0);
            let v = data(n * dv, 3.0);
            let scale = 1.0 / (d as f32).sqrt();
            // Keys as two parts, the second read from a wider buffer at an offset.
            let (d1, w) = (d / 2, d - d / 2 + 5);
            let k2: Vec<f32> = (0..n * w)
                .map(|i| {
                    let (u, j) = (i / w, i % w);
                    if (3..3 + d - d1).contains(&j) {
                        k[u * d + d1 + j - 3]
                    } else {
                        f32::NAN
                    }
                })
                .collect();
            let parts = [
                Rows {
                    data: &k,
                    stride: d,
                    offset: 0,
                    len: d1,
                },
                Rows {
                    data: &k2,
                    stride: w,
                    offset: 3,
                    len: d - d1,
                },
            ];
            let mut want = vec![0.0f32; t * dv];
            causal_portable(
                &q,
                t,
                &[Rows::dense(&k, d)],
                Rows::dense(&v, dv),
                past,
                scale,
                &mut want,
            );
            let mut runs = vec![("dispatched", vec![0.0f32; t * dv])];
            causal_attention(&q, &parts, Rows::dense(&v, dv), past, scale, &mut runs[0].1);
            // Each tile shape the CPU runs, whichever the dispatch picks.
            #[cfg(target_arch = "x86_64")]
            {
                let mut buf = Vec::new();
                let a = pack_keys(&parts, n, d, &mut buf);
                let kt = &buf[a..];
                let vr = Rows::dense(&v, dv);
                if crate::qdot::x86::has_avx2() {
                    let mut o = vec![0.0f32; t * dv];
                    // SAFETY: AVX2 and FMA were detected; `kt` packs `n` keys.
                    unsafe { x86::causal(&q, t, kt, vr, d, past, scale, &mut o) };
                    runs.push(("avx2", o));
                }
                if crate::qdot::x86::has_avx512vnni() {
                    let mut o = vec![0.0f32; t * dv];
                    // SAFETY: AVX-512 F, AVX2 and FMA were detected; as above.
                    unsafe { x86::causal512(&q, t, kt, vr, d, past, scale, &mut o) };
                    runs.push(("avx512", o));
                }
            }
            for (name, got) in &runs {
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{name} t={t} past={past} d={d} dv={dv} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// One case of the bf16 tests: queries, keys split in two parts that meet inside
    /// a bf16 pair (value `d / 2 + shift` starts the second), values, and the direct
    /// loop's output on the same inputs rounded to bf16 (what the bf16 kernels
    /// compute, but for the probabilities' rounding).
    struct Rounded {
        q: Vec<f32>,
        k: Vec<f32>,
        k2: Vec<f32>,
        v: Vec<f32>,
        d1: usize,
        want: Vec<f32>,
    }

    impl Rounded {
        fn new((t, past, d, dv): (usize, usize, usize, usize), seed: f32, shift: usize) -> Self {
            let round = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect()
            };
            let n = past + t;
            let (q, k, v) = (
                data(t * d, seed),
                data(n * d, seed + 1.0),
                data(n * dv, seed + 2.0),
            );
            let d1 = d / 2 + shift;
            let k2: Vec<f32> = (0..n)
                .flat_map(|u| k[u * d + d1..(u + 1) * d].to_vec())
                .collect();
            let mut want = vec![0.0f32; t * dv];
            let (qr, kr, vr) = (round(&q), round(&k), round(&v));
            let scale = 1.0 / (d as f32).sqrt();
            causal_portable(
                &qr,
                t,
                &[Rows::dense(&kr, d)],
                Rows::dense(&vr, dv),
                past,
                scale,
                &mut want,
            );
            Rounded {
                q,
                k,
                k2,
                v,
                d1,
                want,
            }
        }

        /// The keys as two parts of `d` values in all.
        fn parts(&self, d: usize) -> [Rows<'_>; 2] {
            [
                Rows {
                    data: &self.k,
                    stride: d,
                    offset: 0,
                    len: self.d1,
                },
                Rows::dense(&self.k2, d - self.d1),
            ]
        }
    }

    #[test]
    fn bf16_tiles_equal_the_direct_loop_on_rounded_inputs() {
        // Odd key lengths and odd key counts pad a pair with zeros; two key parts meet
        // inside a pair.
        for &(t, past, d, dv) in &[
            (1, 0, 8, 16),
            (5, 0, 25, 16),
            (7, 3, 24, 32),
            (53, 70, 192, 128),
            (100, 17, 17, 48),
            (130, 200, 24, 80),
        ] {
            let c = Rounded::new((t, past, d, dv), 1.0, 1);
            let scale = 1.0 / (d as f32).sqrt();
            let (parts, v) = (c.parts(d), Rows::dense(&c.v, dv));
            let mut got = vec![0.0f32; t * dv];
            bf16_on(&c.q, &parts, v, past, scale, &mut got, false);
            let mut exact = vec![0.0f32; t * dv];
            causal_attention(&c.q, &parts, v, past, scale, &mut exact);
            let mut differs = false;
            for (i, ((a, b), e)) in got.iter().zip(&c.want).zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= 4e-3 * b.abs().max(1.0),
                    "t={t} past={past} d={d} dv={dv} [{i}]: {a} vs {b}"
                );
                differs |= a != e;
            }
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                differs,
                crate::attn::bf16_dot() && dv % 16 == 0,
                "bf16 where the CPU has it, else f32"
            );
            let _ = differs;
        }
    }

    /// The AMX tiles (`crate::amx::causal`) against the direct loop on bf16-rounded
    /// inputs, and against the `vdpbf16ps` tiles: partial blocks of 32 rows and of 32
    /// keys, cached rows, two key parts meeting inside a tile.
    #[test]
    fn amx_tiles_equal_the_direct_loop_on_rounded_inputs() {
        if !crate::amx::available() {
            eprintln!("AMX not available: attention tiles not tested");
            return;
        }
        for &(t, past, d, dv) in &[
            (1, 0, 32, 32),
            (7, 3, 64, 32),
            (16, 0, 32, 64),
            (40, 0, 64, 96),
            (53, 70, 192, 128),
            (130, 200, 192, 128),
        ] {
            let c = Rounded::new((t, past, d, dv), 1.5, 3);
            let scale = 1.0 / (d as f32).sqrt();
            let (parts, v) = (c.parts(d), Rows::dense(&c.v, dv));
            let (mut tiles, mut vdp) = (vec![f32::NAN; t * dv], vec![f32::NAN; t * dv]);
            bf16_on(&c.q, &parts, v, past, scale, &mut tiles, true);
            bf16_on(&c.q, &parts, v, past, scale, &mut vdp, false);
            for (i, ((a, b), e)) in tiles.iter().zip(&c.want).zip(&vdp).enumerate() {
                assert!(
                    (a - b).abs() <= 4e-3 * b.abs().max(1.0),
                    "t={t} past={past} d={d} dv={dv} [{i}]: {a} vs {b}"
                );
                // Blocks of 32 keys against 64: probabilities rounded against other
                // running maxima, so not the same bits.
                assert!(
                    (a - e).abs() <= 8e-3 * e.abs().max(1.0),
                    "t={t} past={past} d={d} dv={dv} [{i}]: tiles {a} vs vdpbf16ps {e}"
                );
            }
        }
    }

    /// The direct loop against softmax attention written out in f64.
    #[test]
    fn packed_keys_equal_the_element_by_element_layout() {
        // Parts of 128 and 64 values (whole 16 × 16 blocks) and of 20 (a block and a
        // tail), strided and offset rows, full and partial panels; the buffer reused
        // from a larger packing, so stale values must not survive as padding.
        let (stride, n0) = (230, 70);
        let data: Vec<f32> = (0..n0 * stride).map(|i| (i as f32 * 0.37).sin()).collect();
        let parts = [
            Rows {
                data: &data,
                stride,
                offset: 1,
                len: 128,
            },
            Rows {
                data: &data,
                stride,
                offset: 140,
                len: 64,
            },
            Rows {
                data: &data,
                stride,
                offset: 205,
                len: 20,
            },
        ];
        let d = 212;
        let mut buf = vec![7.0f32; 100_000];
        for n in [70, 64, 33, 16, 5] {
            let a = pack_keys(&parts, n, d, &mut buf);
            assert_eq!(a, crate::align64(&buf));
            let want = pack_keys_scalar(&parts, n, d);
            assert_eq!(&buf[a..a + want.len()], &want[..], "n = {n}");
        }
    }

    #[test]
    fn direct_loop_is_causal_softmax_attention() {
        let (t, past, d, dv) = (4, 3, 8, 4);
        let n = past + t;
        let (q, k, v) = (data(t * d, 0.5), data(n * d, 1.5), data(n * dv, 2.5));
        let mut got = vec![0.0f32; t * dv];
        causal_portable(
            &q,
            t,
            &[Rows::dense(&k, d)],
            Rows::dense(&v, dv),
            past,
            0.3,
            &mut got,
        );
        for i in 0..t {
            let vis = past + i + 1;
            let s: Vec<f64> = (0..vis)
                .map(|u| {
                    0.3 * (0..d)
                        .map(|j| q[i * d + j] as f64 * k[u * d + j] as f64)
                        .sum::<f64>()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for c in 0..dv {
                let want: f64 = (0..vis)
                    .map(|u| (s[u] - m).exp() / z * v[u * dv + c] as f64)
                    .sum();
                assert!((got[i * dv + c] as f64 - want).abs() < 1e-5, "{i} {c}");
            }
        }
    }
}
