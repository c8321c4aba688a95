//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, and on 512-bit ones
//! for two repacked groups at once, which a Xeon runs at nearly the 256-bit rate;
//! Zen 4 splits 512-bit work in two, so there pairing gains nothing) and AVX2
//! (`vpmaddubsw` + `vpmaddwd`). One weight block is unpacked once and multiplied
//! with up to four activation rows, so prefill reuses it.

use super::{Isa, Prefetch, Q8Row, QK8};
use crate::DType;
use std::arch::x86_64::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// AVX2, FMA and F16C.
pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512 BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`) beside the VNNI set.
pub fn has_avx512bf16() -> bool {
    has_avx512vnni() && is_x86_feature_detected!("avx512bf16")
}

/// AVX-512 F/BW/VL/VNNI on top of AVX2.
pub fn has_avx512vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// The portable `quantize_body` in AVX2, bit for bit: the compiler kept the portable
/// body's maximum (`f32::max`, a serial chain of shuffles) and its `as i8` casts (a
/// byte insert each) scalar, ~3% of a batched decode step and ~4.5% of a prefill.
/// Rounding is `f32::round`'s (half away from zero): truncate, then add ±1 where the
/// dropped fraction is at least a half. Returns the row's unit.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`has_avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_avx2(x: &[f32], (qs, ds, ss, sums, ms, ns): super::Q8Out<'_>) -> f32 {
    let nb = x.len() / QK8;
    assert!(qs.len() >= nb * QK8 && ds.len() >= nb && ss.len() >= nb);
    assert!(sums.len() >= nb && ms.len() >= nb && ns.len() >= nb);
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    // `packs` interleaves the 128-bit lanes; this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // Pass one: every block's largest magnitude (into `ds`), and the row's.
    let mut rmax = 0.0f32;
    for (b, d) in ds.iter_mut().enumerate().take(nb) {
        let p = x.as_ptr().add(b * QK8);
        let a: [__m256; 4] =
            std::array::from_fn(|k| _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * k))));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        *d = amax;
        rmax = rmax.max(amax);
    }
    let unit = super::row_unit(rmax);
    let inv = if unit > 0.0 { 1.0 / unit } else { 0.0 };
    for b in 0..nb {
        let p = x.as_ptr().add(b * QK8);
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)));
        let (mb, dv) = super::block_step(ds[b], unit, inv);
        let id = _mm256_set1_ps(if dv > 0.0 { 1.0 / dv } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|k| {
            let y = _mm256_mul_ps(v[k], id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
            let step = _mm256_or_ps(_mm256_and_ps(y, sign), one);
            let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step);
            let r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, up), lo), hi);
            _mm256_cvtps_epi32(r)
        });
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, order);
        _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK8) as *mut __m256i, w);
        let s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s2 = _mm_add_epi32(
            _mm256_castsi256_si128(s4),
            _mm256_extracti128_si256::<1>(s4),
        );
        let s2 = _mm_add_epi32(s2, _mm_unpackhi_epi64(s2, s2));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
        ds[b] = dv;
        (ss[b], sums[b], ms[b], ns[b]) = super::block_fields(dv, mb, sum);
    }
    unit
}

/// Dispatches to the kernel for `isa`, `dtype` and the number of rows.
pub fn dot_rows(
    isa: Isa,
    dtype: DType,
    w: &[u8],
    dw: Option<&[f32]>,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    let (vals, bytes) = dtype.block();
    let nb = w.len() / bytes;
    // Activation blocks per weight block: 8 for Q4_K's 256-value super-blocks.
    let sub = vals / QK8;
    for x in a {
        assert!(x.qs.len() >= nb * vals && x.d.len() >= nb * sub && x.s.len() >= nb * sub);
    }
    assert!(out.len() == a.len() && a.len() <= 4 && w.len() == nb * bytes);
    assert!(dw.is_none_or(|d| d.len() >= nb));
    macro_rules! go {
        ($f:ident) => {
            match a.len() {
                // SAFETY: the features each kernel enables were detected at run time
                // (`isa` comes from `super::isa`, or from a test that checked them), and
                // the asserts above keep every load inside `w` and the activation rows.
                1 => unsafe { $f::<1>(w, dw, nb, a, out) },
                2 => unsafe { $f::<2>(w, dw, nb, a, out) },
                3 => unsafe { $f::<3>(w, dw, nb, a, out) },
                4 => unsafe { $f::<4>(w, dw, nb, a, out) },
                _ => {}
            }
        };
    }
    match (isa, dtype) {
        (Isa::Avx512Vnni, DType::Q4_0) => go!(q4_0_vnni),
        (Isa::Avx512Vnni, DType::Q8_0) => go!(q8_0_vnni),
        (Isa::Avx2, DType::Q4_0) => go!(q4_0_avx2),
        (Isa::Avx2, DType::Q8_0) => go!(q8_0_avx2),
        (Isa::Avx512Vnni, DType::Q5_0) => go!(q5_0_vnni),
        (Isa::Avx2, DType::Q5_0) => go!(q5_0_avx2),
        // No VNNI twins yet: the AVX2 kernels run on AVX-512 machines too.
        (Isa::Avx2 | Isa::Avx512Vnni, DType::Q4K) => go!(q4_k_avx2),
        (Isa::Avx2 | Isa::Avx512Vnni, DType::Q6K) => go!(q6_k_avx2),
        _ => super::scalar::dot_rows(dtype, w, a, out),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The 32 weights of a Q4_0 block as unsigned nibbles in element order.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_nibbles(qs: *const u8) -> __m256i {
    // The 16 bytes in both halves, the upper half shifted right by 4, then the low
    // nibble of every byte: low nibbles (elements 0..16) below, high ones above.
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs as *const __m128i));
    let v = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// The 32 high bits of a Q5_0 block (at `qh`) as `0x10` in each byte whose bit is set,
/// in element order (byte `k` takes bit `k`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q5_high_bits(qh: *const u8) -> __m256i {
    let v = _mm256_set1_epi32((qh as *const i32).read_unaligned());
    // Byte k of the result first gets byte k / 8 of the 32 bits, then keeps bit k % 8.
    let spread = _mm256_shuffle_epi8(
        v,
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The eight 6-bit scales and eight mins of a Q4_K super-block (its 12 bytes at `q`)
/// as two u64 of eight bytes, from three little-endian words: scales 0–3 and mins
/// 0–3 are the low six bits of words 0 and 1; scales and mins 4–7 take a nibble of
/// word 2 and, above it, the top two bits of word 0 or 1 (see `scale_min_k4`).
#[inline]
fn k4_scales_mins(q: &[u8]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let sc_hi = (w2 & 0x0F0F_0F0F) | (((w0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((w2 >> 4) & 0x0F0F_0F0F) | (((w1 >> 6) & 0x0303_0303) << 4);
    let sc = (w0 & 0x3F3F_3F3F) as u64 | (sc_hi as u64) << 32;
    let mn = (w1 & 0x3F3F_3F3F) as u64 | (mn_hi as u64) << 32;
    (sc, mn)
}

/// Eight bytes (a u64, byte `j` in lane `j`) times `f` as eight f32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bytes_times(v: u64, f: f32) -> __m256 {
    let b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64));
    _mm256_mul_ps(_mm256_cvtepi32_ps(b), _mm256_set1_ps(f))
}

/// Q4_K rows (the common `Q4_K_M` files' main type; ggml layout, read in place): per
/// super-block its eight 6-bit scales and mins are unpacked with word operations and
/// turned into eight f32 lanes, `d · sc_j` and `dmin · m_j`; per activation row one
/// multiply by the row's eight block scales `d_x` gives every sub-block's factor,
/// broadcast to it with one lane permute, and one FMA adds `dmin · m_j · (d_x Σ q)`
/// for all eight. Per 64 values one 32-byte load: its low nibbles are one sub-block
/// and its high nibbles the next; each sub-block's `vpmaddubsw` + `vpmaddwd` sum meets
/// its factor in one FMA (even and odd sub-blocks in two chains). `dw` is unused: a
/// super-block carries two scales and sixteen 6-bit factors, not one f16.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2<const N: usize>(
    w: &[u8],
    _dw: Option<&[f32]>,
    nb: usize,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let lane: [__m256i; 8] = std::array::from_fn(|j| _mm256_set1_epi32(j as i32));
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    let mut corr = [_mm256_setzero_ps(); N];
    let wp = w.as_ptr();
    // Raw pointers: the caller checked every row's lengths against `nb` super-blocks.
    let qs: [*const i8; N] = std::array::from_fn(|t| a[t].qs.as_ptr());
    let xd: [*const f32; N] = std::array::from_fn(|t| a[t].d.as_ptr());
    let xs: [*const f32; N] = std::array::from_fn(|t| a[t].s.as_ptr());
    for sb in 0..nb {
        let blk = wp.add(sb * 144);
        let half_at = |o: usize| half::f16::from_bits((blk.add(o) as *const u16).read_unaligned());
        let (sc, mn) = k4_scales_mins(std::slice::from_raw_parts(blk.add(4), 12));
        let dsc = bytes_times(sc, half_at(0).to_f32());
        let dmn = bytes_times(mn, half_at(2).to_f32());
        let b0 = sb * 8;
        let mut f = [_mm256_setzero_ps(); N];
        for t in 0..N {
            f[t] = _mm256_mul_ps(dsc, _mm256_loadu_ps(xd[t].add(b0)));
            corr[t] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(xs[t].add(b0)), corr[t]);
        }
        for c in 0..4 {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(v, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
            let b = b0 + 2 * c;
            for t in 0..N {
                let x0 = _mm256_loadu_si256(qs[t].add(b * QK8) as *const __m256i);
                let x1 = _mm256_loadu_si256(qs[t].add((b + 1) * QK8) as *const __m256i);
                // Nibble times value, pairs summed in 16 bits (at most 2 · 15 · 127).
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones);
                let s0 = _mm256_permutevar8x32_ps(f[t], lane[2 * c]);
                let s1 = _mm256_permutevar8x32_ps(f[t], lane[2 * c + 1]);
                acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s0, acc0[t]);
                acc1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s1, acc1[t]);
            }
        }
    }
    for t in 0..N {
        out[t] = hsum(_mm256_sub_ps(_mm256_add_ps(acc0[t], acc1[t]), corr[t]));
    }
}

/// Q6_K rows (Q4_K_M files keep the output projection and some down projections
/// in it; ggml layout, read in place). Per 128 values three 32-byte loads (two of
/// nibbles, one of high bit pairs) give four blocks of 6-bit `u`; `u - 32` is
/// signed, so `vpmaddubsw` takes `|u - 32|` against the activations with its sign,
/// `vpmaddwd` applies the two 16-value scales of the block (lanes 0–7 and 8–15),
/// and the block's sum meets `d · d_x` in one FMA (two chains by block parity). The
/// block's two scales come from one byte shuffle of the sixteen, sign-extended; the
/// eight `d · d_x` of a super-block are one multiply per row, one lane each.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_avx2<const N: usize>(
    w: &[u8],
    _dw: Option<&[f32]>,
    nb: usize,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x30);
    let m32 = _mm256_set1_epi8(32);
    let lane: [__m256i; 8] = std::array::from_fn(|j| _mm256_set1_epi32(j as i32));
    // Block k's two scales, bytes 2k and 2k + 1, each eight times (then to 16 bits).
    let pick: [__m128i; 8] = std::array::from_fn(|k| {
        let (a, b) = (2 * k as i64, 2 * k as i64 + 1);
        _mm_set_epi64x(b * 0x0101_0101_0101_0101, a * 0x0101_0101_0101_0101)
    });
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    let wp = w.as_ptr();
    // Raw pointers: the caller checked every row's lengths against `nb` super-blocks.
    let qs: [*const i8; N] = std::array::from_fn(|t| a[t].qs.as_ptr());
    let xd: [*const f32; N] = std::array::from_fn(|t| a[t].d.as_ptr());
    for sb in 0..nb {
        let blk = wp.add(sb * 210);
        let d = half::f16::from_bits((blk.add(208) as *const u16).read_unaligned()).to_f32();
        let sc = _mm_loadu_si128(blk.add(192) as *const __m128i);
        let b0 = sb * 8;
        let dv = _mm256_set1_ps(d);
        let f: [__m256; N] =
            std::array::from_fn(|t| _mm256_mul_ps(dv, _mm256_loadu_ps(xd[t].add(b0))));
        for n in 0..2 {
            let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
            // 16-bit shifts: the bits kept (0–3, 4–5) never come from the other byte.
            let u = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    _mm256_and_si256(qh, m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                ),
            ];
            for (kk, &uk) in u.iter().enumerate() {
                let ws = _mm256_sub_epi8(uk, m32);
                let wa = _mm256_abs_epi8(ws);
                let k = 4 * n + kk;
                let scv = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, pick[k]));
                let b = b0 + k;
                for t in 0..N {
                    let x = _mm256_loadu_si256(qs[t].add(b * QK8) as *const __m256i);
                    // |w| · (x with w's sign) = w · x; pairs at most 2 · 32 · 127.
                    let p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, ws));
                    let p = _mm256_madd_epi16(p, scv);
                    let fk = _mm256_permutevar8x32_ps(f[t], lane[k]);
                    acc[kk % 2][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), fk, acc[kk % 2][t]);
                }
            }
        }
    }
    for t in 0..N {
        out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t]));
    }
}

/// Block scales of a run of `nb` blocks: `d_w` (f16 at `stride`-byte steps from `p`)
/// times each activation row's `d` into `sc`, and `Σ d_w · s` added to `corr`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_scales<const N: usize>(
    p: *const u8,
    stride: usize,
    pre: Option<&[f32]>,
    b0: usize,
    nb: usize,
    a: &[&Q8Row],
    sc: &mut [[f32; CHUNK]; N],
    corr: &mut [__m256; N],
) {
    // The row's scales as f32: given by the caller (converted once per row in
    // prefill), or gathered from the blocks' f16 fields here.
    let mut conv = [0.0f32; CHUNK];
    let dws: &[f32] = match pre {
        Some(d) => &d[b0..b0 + nb],
        None => {
            let mut bits = [0u16; CHUNK];
            for (j, v) in bits.iter_mut().enumerate().take(nb) {
                *v = (p.add(j * stride) as *const u16).read_unaligned();
            }
            for j in (0..nb).step_by(8) {
                let h = _mm_loadu_si128(bits.as_ptr().add(j) as *const __m128i);
                _mm256_storeu_ps(conv.as_mut_ptr().add(j), _mm256_cvtph_ps(h));
            }
            &conv[..nb]
        }
    };
    let full = nb / 8 * 8;
    for j in (0..full).step_by(8) {
        let dw = _mm256_loadu_ps(dws.as_ptr().add(j));
        for t in 0..N {
            let d = _mm256_loadu_ps(a[t].d.as_ptr().add(b0 + j));
            let s = _mm256_loadu_ps(a[t].s.as_ptr().add(b0 + j));
            _mm256_storeu_ps(sc[t].as_mut_ptr().add(j), _mm256_mul_ps(dw, d));
            corr[t] = _mm256_fmadd_ps(dw, s, corr[t]);
        }
    }
    if full < nb {
        let dw = &dws[full..];
        for t in 0..N {
            let mut c = [0.0f32; 8];
            #[allow(clippy::needless_range_loop)]
            for j in full..nb {
                let k = j - full;
                sc[t][j] = dw[k] * a[t].d[b0 + j];
                c[k] = dw[k] * a[t].s[b0 + j];
            }
            corr[t] = _mm256_add_ps(corr[t], _mm256_loadu_ps(c.as_ptr()));
        }
    }
}

/// Blocks handled per scale conversion.
const CHUNK: usize = 64;

macro_rules! int_kernel {
    ($name:ident, $features:literal, $bytes:literal, $offset:literal, |$blk:ident| $load:expr, |$wv:ident, $av:ident| $dot:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize>(
            w: &[u8],
            dw: Option<&[f32]>,
            nb: usize,
            a: &[&Q8Row],
            out: &mut [f32],
        ) {
            let mut acc0 = [_mm256_setzero_ps(); N];
            let mut acc1 = [_mm256_setzero_ps(); N];
            let mut corr = [_mm256_setzero_ps(); N];
            let mut sc = [[0.0f32; CHUNK]; N];
            let wp = w.as_ptr();
            let qs: [*const i8; N] = std::array::from_fn(|t| a[t].qs.as_ptr());
            for b0 in (0..nb).step_by(CHUNK) {
                let m = CHUNK.min(nb - b0);
                block_scales::<N>(
                    wp.add(b0 * $bytes),
                    $bytes,
                    dw,
                    b0,
                    m,
                    a,
                    &mut sc,
                    &mut corr,
                );
                let mut j = 0;
                // One row alternates two accumulators to hide the FMA latency; several
                // rows already give independent chains (and need the registers).
                while N == 1 && j + 1 < m {
                    for (k, acc) in [(0usize, &mut acc0), (1, &mut acc1)] {
                        let b = b0 + j + k;
                        let $blk = wp.add(b * $bytes + 2);
                        let $wv = $load;
                        for t in 0..N {
                            let $av = _mm256_loadu_si256(qs[t].add(b * QK8) as *const __m256i);
                            let dp = $dot;
                            let s = _mm256_broadcast_ss(&sc[t][j + k]);
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), s, acc[t]);
                        }
                    }
                    j += 2;
                }
                while j < m {
                    let b = b0 + j;
                    let $blk = wp.add(b * $bytes + 2);
                    let $wv = $load;
                    for t in 0..N {
                        let $av = _mm256_loadu_si256(qs[t].add(b * QK8) as *const __m256i);
                        let dp = $dot;
                        let s = _mm256_broadcast_ss(&sc[t][j]);
                        acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), s, acc0[t]);
                    }
                    j += 1;
                }
            }
            for t in 0..N {
                out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t])) - $offset * hsum(corr[t]);
            }
        }
    };
}

int_kernel!(
    q4_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    18,
    8.0,
    |blk| q4_nibbles(blk),
    |wv, av| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, av)
);

int_kernel!(
    q4_0_avx2,
    "avx2,fma,f16c",
    18,
    8.0,
    |blk| q4_nibbles(blk),
    |wv, av| _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), _mm256_set1_epi16(1))
);

// Q5_0 with AVX2: the five bits unsigned (nibble | high bit · 16, at most 31), so
// Σ (u - 16) q = Σ u q - 16 Σ q; `vpmaddubsw` pairs stay inside 16 bits (2 · 31 · 127).
int_kernel!(
    q5_0_avx2,
    "avx2,fma,f16c",
    22,
    16.0,
    |blk| _mm256_or_si256(q4_nibbles(blk.add(4)), q5_high_bits(blk)),
    |wv, av| _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), _mm256_set1_epi16(1))
);

// Q5_0 with VNNI: the same unsigned five bits (at most 31) in one `vpdpbusd`.
int_kernel!(
    q5_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    22,
    16.0,
    |blk| _mm256_or_si256(q4_nibbles(blk.add(4)), q5_high_bits(blk)),
    |wv, av| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, av)
);

// Q8_0 with VNNI: w + 128 as unsigned bytes, Σ (w + 128) q = Σ w q + 128 Σ q.
int_kernel!(
    q8_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    34,
    128.0,
    |blk| _mm256_xor_si256(
        _mm256_loadu_si256(blk as *const __m256i),
        _mm256_set1_epi8(-128)
    ),
    |wv, av| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, av)
);

// Q8_0 with AVX2: |w| · (q with w's sign), at most 128 · 127 · 2 per pair, inside i16.
int_kernel!(
    q8_0_avx2,
    "avx2,fma,f16c",
    34,
    0.0,
    |blk| _mm256_loadu_si256(blk as *const __m256i),
    |wv, av| _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv)),
        _mm256_set1_epi16(1)
    )
);

/// Dispatches a repacked group ([`crate::repack`] layout) to its kernel for `isa`:
/// VNNI (`vpdpbusd`: four byte products summed into 32 bits in one instruction) or
/// AVX2 (`vpmaddubsw`, 16-bit sums, `vpmaddwd` to widen).
pub fn dot_group(isa: Isa, dtype: DType, w: &[u8], a: &[&Q8Row], out: &mut [f32]) {
    if !matches!(
        dtype,
        DType::Q4_0R8 | DType::Q8_0R8 | DType::Q4KR8 | DType::Q5_0R8
    ) {
        return super::scalar::dot_group(dtype, w, a, out);
    }
    let gbs = group_block_bytes(dtype);
    let nb = w.len() / gbs;
    assert!(w.len() == nb * gbs && out.len() == 8 * a.len() && a.len() <= 4);
    if dtype == DType::Q4KR8 {
        // Eight activation blocks per super-block.
        for x in a {
            assert!(x.qs.len() >= nb * 256 && x.d.len() >= nb * 8 && x.s.len() >= nb * 8);
        }
    } else {
        for x in a {
            assert!(x.qs.len() >= nb * QK8 && x.d.len() >= nb);
            assert!(x.sum8.len() >= nb && x.m.len() >= nb && x.neg8.len() >= nb);
        }
    }
    macro_rules! go {
        ($f:ident) => {
            match a.len() {
                // SAFETY: `dot_group` is reached only with an `isa` detected at run time
                // (AVX2, FMA, F16C; with `Isa::Avx512Vnni` also AVX-512 F/BW/VL/VNNI),
                // and the asserts above keep every load inside `w` and the activation
                // rows.
                1 => unsafe { $f::<1>(w, nb, a, out) },
                2 => unsafe { $f::<2>(w, nb, a, out) },
                3 => unsafe { $f::<3>(w, nb, a, out) },
                4 => unsafe { $f::<4>(w, nb, a, out) },
                _ => {}
            }
        };
    }
    match (isa, dtype) {
        (Isa::Avx512Vnni, DType::Q4KR8) => go!(q4_k_r8_vnni),
        (_, DType::Q4KR8) => go!(q4_k_r8_avx2),
        (Isa::Avx512Vnni, DType::Q5_0R8) => go!(q5_0_r8_vnni),
        (_, DType::Q5_0R8) => go!(q5_0_r8_avx2),
        (Isa::Avx512Vnni, DType::Q4_0R8) => go!(q4_0_r8_vnni),
        (Isa::Avx512Vnni, _) => go!(q8_0_r8_vnni),
        (_, DType::Q4_0R8) => go!(q4_0_r8_avx2),
        _ => go!(q8_0_r8_avx2),
    }
}

/// Bytes of one block of a repacked group: eight rows' blocks.
fn group_block_bytes(dtype: DType) -> usize {
    crate::repack::ROWS * dtype.block().1
}

/// Two repacked groups of the same weight at once (`out[16 t + l]`: group `w0`'s
/// rows `l < 8`, then `w1`'s), on 512-bit vectors: lanes 0–7 hold `w0`'s rows and
/// lanes 8–15 `w1`'s, and both meet the same four activation values broadcast to all
/// sixteen lanes. `vpdpbusd` on 512 bits does twice the work of the 256-bit one at
/// nearly the same rate on this Xeon (a loop of independent ones: 4.5 G/s against
/// 5.1 G/s per core), which the one-group kernels leave unused.
pub fn dot_group_pair(dtype: DType, w0: &[u8], w1: &[u8], a: &[&Q8Row], out: &mut [f32]) {
    assert!(
        matches!(dtype, DType::Q4_0R8 | DType::Q8_0R8 | DType::Q4KR8),
        "dot_group_pair: {} is not a repacked type",
        dtype.name()
    );
    let gbs = group_block_bytes(dtype);
    let nb = w0.len() / gbs;
    assert!(w0.len() == nb * gbs && w1.len() == w0.len());
    assert!(out.len() == 16 * a.len() && a.len() <= 4);
    // Activation blocks per weight block: eight per Q4_K super-block.
    let sub = dtype.block().0 / QK8;
    for x in a {
        assert!(x.qs.len() >= nb * sub * QK8 && x.d.len() >= nb * sub && x.s.len() >= nb * sub);
        assert!(x.neg8.len() >= nb);
    }
    macro_rules! go {
        ($f:ident) => {
            match a.len() {
                // SAFETY: reached only with `Isa::Avx512Vnni`, detected at run time
                // (AVX2, FMA, F16C, AVX-512 F/BW/VL/VNNI), and the asserts above keep
                // every load inside `w0`, `w1` and the activation rows.
                1 => unsafe { $f::<1>(w0, w1, nb, a, out) },
                2 => unsafe { $f::<2>(w0, w1, nb, a, out) },
                3 => unsafe { $f::<3>(w0, w1, nb, a, out) },
                4 => unsafe { $f::<4>(w0, w1, nb, a, out) },
                _ => {}
            }
        };
    }
    match dtype {
        DType::Q4_0R8 => go!(q4_0_r8x2_vnni),
        DType::Q4KR8 => go!(q4_k_r8x2_vnni),
        _ => go!(q8_0_r8x2_vnni),
    }
}

/// One chunk of 32 bytes from each of two groups' blocks, as one 512-bit vector.
#[inline(always)]
unsafe fn load_pair(b0: *const u8, b1: *const u8) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_loadu_si256(b0 as *const __m256i)),
        _mm256_loadu_si256(b1 as *const __m256i),
    )
}

/// The two blocks' sixteen row scales as f32.
#[inline(always)]
unsafe fn scales_pair(b0: *const u8, b1: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(b0 as *const __m128i)),
        _mm_loadu_si128(b1 as *const __m128i),
    ))
}

/// Four activation values (bytes `at..at + 4` of row `q`) in all sixteen lanes.
#[inline(always)]
unsafe fn bcast4x16(q: *const i8, at: usize) -> __m512i {
    _mm512_set1_epi32((q.add(at) as *const i32).read_unaligned())
}

/// The activation rows' values, block steps and `-8 Σ q` fields, as the VNNI
/// kernels read them.
#[inline(always)]
fn vnni_rows<const N: usize>(a: &[&Q8Row]) -> ([*const i8; N], [*const f32; N], [*const i32; N]) {
    (
        std::array::from_fn(|t| a[t].qs.as_ptr()),
        std::array::from_fn(|t| a[t].d.as_ptr()),
        std::array::from_fn(|t| a[t].neg8.as_ptr()),
    )
}

/// Block `b`'s exact sums of a pair of groups (two chains per row) into the rows'
/// accumulators: `acc += f32(s + s2) · d_w · d_x`.
#[inline(always)]
unsafe fn fold_pair_block<const N: usize>(
    acc: &mut [__m512; N],
    (s, s2): (&[__m512i; N], &[__m512i; N]),
    dw: __m512,
    ds: &[*const f32; N],
    b: usize,
) {
    for t in 0..N {
        let sc = _mm512_mul_ps(dw, _mm512_set1_ps(*ds[t].add(b)));
        let i = _mm512_add_epi32(s[t], s2[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sc, acc[t]);
    }
}

/// [`q4_0_r8_vnni`] over two groups in 512-bit lanes (see [`dot_group_pair`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0_r8x2_vnni<const N: usize>(
    w0: &[u8],
    w1: &[u8],
    nb: usize,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    let (qs, ds, ng) = vnni_rows::<N>(a);
    let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
    for b in 0..nb {
        let (b0, b1) = (p0.add(b * 144), p1.add(b * 144));
        prefetch_ahead::<3, N>(b0);
        prefetch_ahead::<3, N>(b1);
        let mut s: [__m512i; N] = std::array::from_fn(|t| _mm512_set1_epi32(*ng[t].add(b)));
        let mut s2 = [_mm512_setzero_si512(); N];
        for k in 0..4 {
            let v = load_pair(b0.add(16 + 32 * k), b1.add(16 + 32 * k));
            let lo = _mm512_and_si512(v, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
            for t in 0..N {
                let q = qs[t].add(b * QK8);
                s[t] = _mm512_dpbusd_epi32(s[t], lo, bcast4x16(q, 4 * k));
                s2[t] = _mm512_dpbusd_epi32(s2[t], hi, bcast4x16(q, 16 + 4 * k));
            }
        }
        fold_pair_block(&mut acc, (&s, &s2), scales_pair(b0, b1), &ds, b);
    }
    for (o, v) in out.chunks_exact_mut(16).zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// [`q4_k_r8_vnni`] over two groups in 512-bit lanes (see [`dot_group_pair`]): the
/// same operations in the same order, lanes 0–7 for `w0`'s rows and 8–15 for `w1`'s,
/// so each equals the one-group kernel bit for bit.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_r8x2_vnni<const N: usize>(
    w0: &[u8],
    w1: &[u8],
    nb: usize,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let (k6, k4, k2) = (
        _mm512_set1_epi32(0x3F3F_3F3F),
        _mm512_set1_epi32(0x0F0F_0F0F),
        _mm512_set1_epi32(0x0303_0303),
    );
    // Byte j of every 32-bit lane into the whole lane (`vpshufb` works per 128 bits).
    let one: [__m512i; 4] = std::array::from_fn(|j| {
        _mm512_broadcast_i64x4(lane_byte_shuffle(j, |k| if k == 0 { 0 } else { -1 }))
    });
    let byte_f32 = |v: __m512i, j: usize| _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, one[j]));
    let high = |w: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(w), k2));
    let mut acc = [_mm512_setzero_ps(); N];
    let (qs, xd, xs) = k4_rows::<N>(a);
    let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
    for sb in 0..nb {
        let (g0, g1) = (p0.add(sb * 1152), p1.add(sb * 1152));
        prefetch_ahead::<18, N>(g0);
        prefetch_ahead::<18, N>(g1);
        let (v0, v1, v2) = (
            load_pair(g0.add(32), g1.add(32)),
            load_pair(g0.add(64), g1.add(64)),
            load_pair(g0.add(96), g1.add(96)),
        );
        let sc = [
            _mm512_and_si512(v0, k6),
            _mm512_or_si512(_mm512_and_si512(v2, k4), high(v0)),
        ];
        let mn = [
            _mm512_and_si512(v1, k6),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(v2), k4), high(v1)),
        ];
        let b0 = sb * 8;
        let mut sum = [_mm512_setzero_ps(); N];
        let mut corr = [_mm512_setzero_ps(); N];
        for c in 0..4 {
            let (q0, q1) = (g0.add(128 + 256 * c), g1.add(128 + 256 * c));
            let mut s = [[_mm512_setzero_si512(); N]; 2];
            for k in 0..8 {
                let v = load_pair(q0.add(32 * k), q1.add(32 * k));
                let lo = _mm512_and_si512(v, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                for t in 0..N {
                    let x = qs[t].add((b0 + 2 * c) * QK8);
                    s[0][t] = _mm512_dpbusd_epi32(s[0][t], lo, bcast4x16(x, 4 * k));
                    s[1][t] = _mm512_dpbusd_epi32(s[1][t], hi, bcast4x16(x, 32 + 4 * k));
                }
            }
            let (j0, j1) = ((2 * c) % 4, (2 * c + 1) % 4);
            let scs = [byte_f32(sc[c / 2], j0), byte_f32(sc[c / 2], j1)];
            let mns = [byte_f32(mn[c / 2], j0), byte_f32(mn[c / 2], j1)];
            let b = b0 + 2 * c;
            for t in 0..N {
                for h in 0..2 {
                    let i = _mm512_mul_ps(_mm512_cvtepi32_ps(s[h][t]), scs[h]);
                    sum[t] = _mm512_fmadd_ps(i, _mm512_set1_ps(*xd[t].add(b + h)), sum[t]);
                    corr[t] = _mm512_fmadd_ps(mns[h], _mm512_set1_ps(*xs[t].add(b + h)), corr[t]);
                }
            }
        }
        let d = scales_pair(g0, g1);
        let dmin = scales_pair(g0.add(16), g1.add(16));
        for t in 0..N {
            acc[t] = _mm512_fmadd_ps(sum[t], d, acc[t]);
            acc[t] = _mm512_fnmadd_ps(corr[t], dmin, acc[t]);
        }
    }
    for (o, v) in out.chunks_exact_mut(16).zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// [`q8_0_r8_vnni`] over two groups in 512-bit lanes (see [`dot_group_pair`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_r8x2_vnni<const N: usize>(
    w0: &[u8],
    w1: &[u8],
    nb: usize,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); N];
    let (qs, ds, ng) = vnni_rows::<N>(a);
    let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
    for b in 0..nb {
        let (b0, b1) = (p0.add(b * 272), p1.add(b * 272));
        prefetch_ahead::<5, N>(b0);
        prefetch_ahead::<5, N>(b1);
        let mut s: [__m512i; N] = std::array::from_fn(|t| _mm512_set1_epi32(*ng[t].add(b) << 4));
        let mut s2 = [_mm512_setzero_si512(); N];
        for k in 0..8 {
            let u = _mm512_xor_si512(load_pair(b0.add(16 + 32 * k), b1.add(16 + 32 * k)), flip);
            for t in 0..N {
                let x = bcast4x16(qs[t].add(b * QK8), 4 * k);
                if k % 2 == 0 {
                    s[t] = _mm512_dpbusd_epi32(s[t], u, x);
                } else {
                    s2[t] = _mm512_dpbusd_epi32(s2[t], u, x);
                }
            }
        }
        fold_pair_block(&mut acc, (&s, &s2), scales_pair(b0, b1), &ds, b);
    }
    for (o, v) in out.chunks_exact_mut(16).zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// Bytes ahead of the current block whose cache lines a product requests into L1, and
/// bytes ahead whose lines it requests into L2 only ([`prefetch_ahead`]), unless
/// `WHALE_PREFETCH=near,far` or [`super::set_prefetch`] says otherwise (0 turns a
/// level off). A core's misses to L1 are capped by its fill buffers (~16 lines in
/// flight, below what the memory gives one core); L2-only requests queue in L2's
/// larger miss queue, so more lines are on their way at once and the near requests
/// then find them in L2. Decode-sized products stream their weights from memory: one
/// row (decode), and the two to four rows each routed expert sees in a batched step.
///
/// Measured with `PREFETCH="768,3072;2048,12288;…" cargo bench -p whale-kernels
/// --bench stream` (1 GiB of repacked Q4_0 expert matrices, six a call on the pool,
/// huge pages; the distances alternated within each round, each product's speed
/// over the same round's plain read), on the Emerald Rapids VM (24 GB/s read), 8
/// rounds, medians: one input row 0.877 of the plain read at 768/3072, 0.909 at
/// 2048/12288 (0.89–0.97 across three runs of distances from 1536/6144 to
/// 2560/10240); two rows 0.815 → 0.895; four 0.773 → 0.840. No software prefetch:
/// 0.605; L1 only at 768: 0.712; L2 only at 3072: 0.871. The earlier AMX Xeon VM
/// (28–30 GB/s) had chosen 768/3072 over L1-only at 1024 (22.5 against 20.6 GB/s)
/// before farther distances were tried. Back on that AMX Xeon kind (29.5 GB/s read,
/// 12 rounds, two runs with the distances in different orders), one row wants the
/// L2 requests nearer: 0.934–0.949 at 2048/4096 and 0.932–0.941 at 768/3072 against
/// 0.861–0.862 at 2048/12288 and 0.863–0.868 at 2048/8192, where two rows keep
/// wanting them far (0.869–0.878 at 12288, 0.776–0.783 at 4096) and so do four
/// (0.817–0.830 against 0.689–0.696). Hence a third distance, the far one for one row.
const GROUP_PREFETCH: [usize; 3] = [2048, 12288, 4096];

/// The distances in use (near, far, far for one row): [`GROUP_PREFETCH`] until
/// [`set_prefetch`] changes them.
static PREFETCH: [AtomicUsize; 3] = [
    AtomicUsize::new(GROUP_PREFETCH[0]),
    AtomicUsize::new(GROUP_PREFETCH[1]),
    AtomicUsize::new(GROUP_PREFETCH[2]),
];

/// Sets the prefetch distances.
pub(crate) fn set_prefetch(p: Prefetch) {
    PREFETCH[0].store(p.near, Ordering::Relaxed);
    PREFETCH[1].store(p.far, Ordering::Relaxed);
    PREFETCH[2].store(p.far_one_row, Ordering::Relaxed);
}

/// The prefetch distances in use.
pub(crate) fn prefetch() -> Prefetch {
    Prefetch {
        near: PREFETCH[0].load(Ordering::Relaxed),
        far: PREFETCH[1].load(Ordering::Relaxed),
        far_one_row: PREFETCH[2].load(Ordering::Relaxed),
    }
}

/// Requests `LINES` cache lines from the near distance past `p` into L1 and as many
/// from the far distance into L2 ([`GROUP_PREFETCH`]; a product of `N` input rows
/// takes the far distance for its row count). The two relaxed loads of the
/// distances are L1 hits beside a block's few dozen instructions (measured with
/// them in place).
#[inline(always)]
unsafe fn prefetch_ahead<const LINES: usize, const N: usize>(p: *const u8) {
    let near = PREFETCH[0].load(Ordering::Relaxed);
    let far = PREFETCH[if N == 1 { 2 } else { 1 }].load(Ordering::Relaxed);
    if near != 0 {
        let near = p.wrapping_add(near) as *const i8;
        for l in 0..LINES {
            _mm_prefetch::<_MM_HINT_T0>(near.wrapping_add(64 * l));
        }
    }
    if far != 0 {
        let far = p.wrapping_add(far) as *const i8;
        for l in 0..LINES {
            _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(64 * l));
        }
    }
}

/// Four activation values (bytes `at..at + 4` of row `q`) in every 32-bit lane.
#[inline(always)]
unsafe fn bcast4(q: *const i8, at: usize) -> __m256i {
    _mm256_set1_epi32((q.add(at) as *const i32).read_unaligned())
}

/// Q4_0R8: per block, four 32-byte loads hold the eight rows' 32 nibbles; the low
/// nibbles meet activations `4k..4k + 4`, the high ones `16 + 4k..`. Per activation
/// row the eight `vpmaddubsw` results add up in 16 bits (at most 16 · 15 · 127 per
/// lane), one `vpmaddwd` by the block's multiple `m` widens them per row (at most
/// 2 · 16 · 15 · 127 · 32767, inside 32 bits), `8 m Σ q` is subtracted, and one FMA
/// with the eight rows' scales accumulates the block; the row's unit multiplies the
/// sums once at the end. Against a multiply of `d_w` by the activation's `d` per
/// block (and `vpmaddwd` by one): `RAYON_NUM_THREADS=1 ROWS=1024 cargo bench -p
/// whale-kernels --bench quant`, × 64 rows, 3 alternated runs, 50.7–55.4 → 58.3–69.8
/// GMAC/s; `whale bench -p 512` on the synthetic V2-Lite Q4_0, 4 alternated pairs,
/// 49.7 → 59.5 tok/s.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_r8_avx2<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    // Raw pointers (the caller checked every row's lengths against `nb`): indexing
    // the rows' vectors put two bounds checks per row in every block.
    let qs: [*const i8; N] = std::array::from_fn(|t| a[t].qs.as_ptr());
    let ms: [*const i32; N] = std::array::from_fn(|t| a[t].m.as_ptr());
    let s8: [*const i32; N] = std::array::from_fn(|t| a[t].sum8.as_ptr());
    let wp = w.as_ptr();
    for b in 0..nb {
        let blk = wp.add(b * 144);
        prefetch_ahead::<3, N>(blk);
        let mut s16 = [_mm256_setzero_si256(); N];
        for k in 0..4 {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * k) as *const __m256i);
            let lo = _mm256_and_si256(v, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
            for t in 0..N {
                let q = qs[t].add(b * QK8);
                let p = _mm256_maddubs_epi16(lo, bcast4(q, 4 * k));
                let p2 = _mm256_maddubs_epi16(hi, bcast4(q, 16 + 4 * k));
                s16[t] = _mm256_add_epi16(s16[t], _mm256_add_epi16(p, p2));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        for t in 0..N {
            let i = _mm256_madd_epi16(s16[t], _mm256_set1_epi32(*ms[t].add(b)));
            let i = _mm256_sub_epi32(i, _mm256_set1_epi32(*s8[t].add(b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dw, acc[t]);
        }
    }
    for ((o, v), x) in out.chunks_exact_mut(8).zip(acc).zip(a) {
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(v, _mm256_set1_ps(x.unit)));
    }
}

/// A `vpshufb` control that sends byte `j` of each 32-bit lane to the lane's bytes
/// `k` where `place(k)` is 0, and zeroes the bytes where it is -1.
#[target_feature(enable = "avx2")]
unsafe fn lane_byte_shuffle(j: usize, place: impl Fn(usize) -> i8) -> __m256i {
    let bytes: [i8; 32] = std::array::from_fn(|i| {
        let lane = (i % 16) / 4 * 4;
        match place(i % 4) {
            0 => (lane + j) as i8,
            _ => -1,
        }
    });
    // SAFETY: `bytes` is 32 readable bytes; the load is unaligned.
    _mm256_loadu_si256(bytes.as_ptr() as *const __m256i)
}

/// Q4_KR8 ([`crate::repack`] layout): per super-block the eight rows' packed scales
/// are three 32-byte loads, one 32-bit lane per row, unpacked for all rows at once with
/// the word operations of [`k4_scales_mins`]; sub-block `j`'s scale then reaches each
/// row's lane in both 16-bit halves with one byte shuffle. Per 64 values eight 32-byte
/// loads hold four values of each row: low nibbles meet the even sub-block's four
/// broadcast activations, high nibbles the odd one's. Per activation row and
/// sub-block the eight `vpmaddubsw` add up in 16 bits (at most 8 · 2 · 15 · 127 =
/// 30480), one `vpmaddwd` by the scales gives each row's exact sum, and one FMA by the
/// block's `d_x` adds it; `d` multiplies the super-block once. The mins: per
/// sub-block its eight `m` (as f32) times the block's `d_x Σ q`, times `dmin` at the
/// end of the super-block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_r8_avx2<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0F);
    // Byte j of every 32-bit lane into both 16-bit halves (a 16-bit scale pair for
    // `vpmaddwd`).
    let pair: [__m256i; 4] =
        std::array::from_fn(|j| lane_byte_shuffle(j, |k| if k % 2 == 0 { 0 } else { -1 }));
    let k4 = K4R8Words::new();
    let mut acc = [_mm256_setzero_ps(); N];
    let (qs, xd, xs) = k4_rows::<N>(a);
    let wp = w.as_ptr();
    for sb in 0..nb {
        let blk = wp.add(sb * 1152);
        prefetch_ahead::<18, N>(blk);
        let (sc, mn) = k4.scales_mins(blk);
        let b0 = sb * 8;
        let mut sum = [_mm256_setzero_ps(); N];
        let mut corr = [_mm256_setzero_ps(); N];
        for c in 0..4 {
            let q = blk.add(128 + 256 * c);
            let mut s_lo = [_mm256_setzero_si256(); N];
            let mut s_hi = [_mm256_setzero_si256(); N];
            for k in 0..8 {
                let v = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                let lo = _mm256_and_si256(v, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                for t in 0..N {
                    let x = qs[t].add((b0 + 2 * c) * QK8);
                    s_lo[t] = _mm256_add_epi16(s_lo[t], _mm256_maddubs_epi16(lo, bcast4(x, 4 * k)));
                    s_hi[t] =
                        _mm256_add_epi16(s_hi[t], _mm256_maddubs_epi16(hi, bcast4(x, 32 + 4 * k)));
                }
            }
            // Sub-blocks 2c and 2c + 1: byte (2c) % 4 and (2c + 1) % 4 of word c / 2.
            let (j0, j1) = ((2 * c) % 4, (2 * c + 1) % 4);
            let sc0 = _mm256_shuffle_epi8(sc[c / 2], pair[j0]);
            let sc1 = _mm256_shuffle_epi8(sc[c / 2], pair[j1]);
            let i: [[__m256; N]; 2] = [
                std::array::from_fn(|t| _mm256_cvtepi32_ps(_mm256_madd_epi16(s_lo[t], sc0))),
                std::array::from_fn(|t| _mm256_cvtepi32_ps(_mm256_madd_epi16(s_hi[t], sc1))),
            ];
            k4.fold_pair(
                &mut sum,
                &mut corr,
                &i,
                k4.mins_f32(mn[c / 2], j0, j1),
                (xd, xs),
                b0 + 2 * c,
            );
        }
        k4.fold_super_block(&mut acc, &sum, &corr, blk);
    }
    for (o, v) in out.chunks_exact_mut(8).zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// [`q4_k_r8_avx2`] with VNNI: each `vpdpbusd` adds four nibble-times-value products
/// of a row straight into 32 bits, so a sub-block's sum needs neither the 16-bit
/// adds nor the widening `vpmaddwd`; its 6-bit scale (as f32: the product is at most
/// 32 · 15 · 127 · 63, exact) multiplies the sum once. The sums equal the AVX2
/// kernel's bit for bit. (Two chains per sub-block, even and odd loads, measured
/// the same as one: qdot bench, 1 / 2 / 4 rows, 70 / 105 / 124 against 68 / 103 /
/// 123 GMAC/s best of 30 rounds, so one it is.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_r8_vnni<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let k4 = K4R8Words::new();
    let mut acc = [_mm256_setzero_ps(); N];
    let (qs, xd, xs) = k4_rows::<N>(a);
    let wp = w.as_ptr();
    for sb in 0..nb {
        let blk = wp.add(sb * 1152);
        prefetch_ahead::<18, N>(blk);
        let (sc, mn) = k4.scales_mins(blk);
        let b0 = sb * 8;
        let mut sum = [_mm256_setzero_ps(); N];
        let mut corr = [_mm256_setzero_ps(); N];
        for c in 0..4 {
            let q = blk.add(128 + 256 * c);
            // Low nibbles (sub-block 2c), high nibbles (2c + 1).
            let mut s = [[_mm256_setzero_si256(); N]; 2];
            for k in 0..8 {
                let v = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                let lo = _mm256_and_si256(v, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                for t in 0..N {
                    let x = qs[t].add((b0 + 2 * c) * QK8);
                    s[0][t] = _mm256_dpbusd_epi32(s[0][t], lo, bcast4(x, 4 * k));
                    s[1][t] = _mm256_dpbusd_epi32(s[1][t], hi, bcast4(x, 32 + 4 * k));
                }
            }
            let (j0, j1) = ((2 * c) % 4, (2 * c + 1) % 4);
            let sc0 = k4.byte_f32(sc[c / 2], j0);
            let sc1 = k4.byte_f32(sc[c / 2], j1);
            let i: [[__m256; N]; 2] = [
                std::array::from_fn(|t| _mm256_mul_ps(_mm256_cvtepi32_ps(s[0][t]), sc0)),
                std::array::from_fn(|t| _mm256_mul_ps(_mm256_cvtepi32_ps(s[1][t]), sc1)),
            ];
            k4.fold_pair(
                &mut sum,
                &mut corr,
                &i,
                k4.mins_f32(mn[c / 2], j0, j1),
                (xd, xs),
                b0 + 2 * c,
            );
        }
        k4.fold_super_block(&mut acc, &sum, &corr, blk);
    }
    for (o, v) in out.chunks_exact_mut(8).zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// The activation rows' values, block steps `d_x` and `d_x Σ q`, as the Q4_KR8
/// kernels read them (raw pointers: the caller checked every row's lengths).
#[inline(always)]
fn k4_rows<const N: usize>(a: &[&Q8Row]) -> ([*const i8; N], [*const f32; N], [*const f32; N]) {
    (
        std::array::from_fn(|t| a[t].qs.as_ptr()),
        std::array::from_fn(|t| a[t].d.as_ptr()),
        std::array::from_fn(|t| a[t].s.as_ptr()),
    )
}

/// The constants of the Q4_KR8 kernels' scale handling: the masks that unpack the
/// eight rows' packed 6-bit scales and mins (one 32-bit lane per row, the word
/// operations of [`k4_scales_mins`]) and the byte shuffles that move byte `j` of
/// each lane into the whole lane.
pub(crate) struct K4R8Words {
    k6: __m256i,
    k4: __m256i,
    k2: __m256i,
    one: [__m256i; 4],
}

impl K4R8Words {
    #[inline(always)]
    pub(crate) unsafe fn new() -> Self {
        Self {
            k6: _mm256_set1_epi32(0x3F3F_3F3F),
            k4: _mm256_set1_epi32(0x0F0F_0F0F),
            k2: _mm256_set1_epi32(0x0303_0303),
            one: std::array::from_fn(|j| lane_byte_shuffle(j, |k| if k == 0 { 0 } else { -1 })),
        }
    }

    /// A super-block's scales 0–3 and 4–7 and mins 0–3 and 4–7, four bytes per row
    /// lane, from its three 32-byte words at `blk + 32`.
    #[inline(always)]
    pub(crate) unsafe fn scales_mins(&self, blk: *const u8) -> ([__m256i; 2], [__m256i; 2]) {
        let w0 = _mm256_loadu_si256(blk.add(32) as *const __m256i);
        let w1 = _mm256_loadu_si256(blk.add(64) as *const __m256i);
        let w2 = _mm256_loadu_si256(blk.add(96) as *const __m256i);
        let high = |w: __m256i| {
            _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(w), self.k2))
        };
        (
            [
                _mm256_and_si256(w0, self.k6),
                _mm256_or_si256(_mm256_and_si256(w2, self.k4), high(w0)),
            ],
            [
                _mm256_and_si256(w1, self.k6),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi32::<4>(w2), self.k4),
                    high(w1),
                ),
            ],
        )
    }

    /// Byte `j` of each row lane of `v` as f32.
    #[inline(always)]
    pub(crate) unsafe fn byte_f32(&self, v: __m256i, j: usize) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, self.one[j]))
    }

    /// The mins of sub-blocks `j0` and `j1` of a word of mins.
    #[inline(always)]
    pub(crate) unsafe fn mins_f32(&self, mn: __m256i, j0: usize, j1: usize) -> [__m256; 2] {
        [self.byte_f32(mn, j0), self.byte_f32(mn, j1)]
    }

    /// Adds two sub-blocks (activation blocks `b` and `b + 1`): their scaled sums
    /// `i` times `d_x` into `sum`, their mins times `d_x Σ q` into `corr`.
    #[inline(always)]
    unsafe fn fold_pair<const N: usize>(
        &self,
        sum: &mut [__m256; N],
        corr: &mut [__m256; N],
        i: &[[__m256; N]; 2],
        mn: [__m256; 2],
        (xd, xs): ([*const f32; N], [*const f32; N]),
        b: usize,
    ) {
        for t in 0..N {
            for h in 0..2 {
                sum[t] = _mm256_fmadd_ps(i[h][t], _mm256_broadcast_ss(&*xd[t].add(b + h)), sum[t]);
                corr[t] = _mm256_fmadd_ps(mn[h], _mm256_broadcast_ss(&*xs[t].add(b + h)), corr[t]);
            }
        }
    }

    /// `acc += d · sum - dmin · corr` with the super-block's eight rows' `d` and
    /// `dmin` (f16 at `blk` and `blk + 16`).
    #[inline(always)]
    unsafe fn fold_super_block<const N: usize>(
        &self,
        acc: &mut [__m256; N],
        sum: &[__m256; N],
        corr: &[__m256; N],
        blk: *const u8,
    ) {
        let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
        for t in 0..N {
            acc[t] = _mm256_fmadd_ps(sum[t], d, acc[t]);
            acc[t] = _mm256_fnmadd_ps(corr[t], dmin, acc[t]);
        }
    }
}

/// Q4_0R8 with VNNI: the same loads and unpacking as [`q4_0_r8_avx2`], but each
/// `vpdpbusd` adds four nibble-times-value products straight into a row's 32-bit
/// sums, which start the block at `-8 Σ q` (the nibbles' offset, [`Q8Row::neg8`]):
/// eight instructions per block and activation row where AVX2 needs sixteen before
/// its widening. The exact integer sum then meets `d_w · d_x` in one multiply and one
/// FMA, as the file-layout kernels do.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0_r8_vnni<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let (m4, mf0) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0xF0u8 as i8));
    if N <= 2 {
        // High nibbles left in place (16 times their value): one AND where a shift
        // and an AND were, per load; each row's block sum of them is shifted down
        // once. Four loads a block against one shift a row: faster for one and two
        // rows, slower for four (`cargo bench --bench qdot`, best of 60 rounds on
        // the Xeon: 73 → 78, 99 → 104 and 122 → 115 GMAC/s for 1, 2 and 4 rows).
        nibbles_r8_vnni::<N, true>(w, 144, 1, nb, a, out, |blk, k| {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * k) as *const __m256i);
            (_mm256_and_si256(v, m4), _mm256_and_si256(v, mf0))
        })
    } else {
        nibbles_r8_vnni::<N, false>(w, 144, 1, nb, a, out, |blk, k| {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * k) as *const __m256i);
            (
                _mm256_and_si256(v, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
            )
        })
    }
}

/// The loop of the VNNI kernels over 32-value blocks of nibbles (Q4_0R8, Q5_0R8):
/// per block of `bs` bytes (the eight rows' f16 scales first) `values(blk, k)` gives
/// load `k`'s unsigned values, low nibbles (values `4k..4k + 4` of each row) and high
/// ones (`16 + 4k..`); each `vpdpbusd` adds four of their products with the
/// activations into a row's 32-bit sums, which start the block at `-8 Σ q` times
/// `offset8` (the values' offset over 8: 1 for Q4_0, 2 for Q5_0). Two chains per row
/// (low and high nibbles): one chain of eight dependent `vpdpbusd` per block left
/// the loop waiting on their latency. The exact sum meets `d_w · d_x` in one
/// multiply and one FMA. With `HI16` the high values come 16 times over (Q4_0's
/// high nibbles left in place) and each row's block sum of them is shifted down by
/// four, which is exact: every such product is a multiple of 16.
#[inline(always)]
unsafe fn nibbles_r8_vnni<const N: usize, const HI16: bool>(
    w: &[u8],
    bs: usize,
    offset8: i32,
    nb: usize,
    a: &[&Q8Row],
    out: &mut [f32],
    values: impl Fn(*const u8, usize) -> (__m256i, __m256i),
) {
    let mut acc = [_mm256_setzero_ps(); N];
    let (qs, ds, ng) = vnni_rows::<N>(a);
    let wp = w.as_ptr();
    for b in 0..nb {
        let blk = wp.add(b * bs);
        prefetch_ahead::<3, N>(blk);
        let mut s: [__m256i; N] =
            std::array::from_fn(|t| _mm256_set1_epi32(*ng[t].add(b) * offset8));
        let mut s2 = [_mm256_setzero_si256(); N];
        for k in 0..4 {
            let (lo, hi) = values(blk, k);
            for t in 0..N {
                let q = qs[t].add(b * QK8);
                s[t] = _mm256_dpbusd_epi32(s[t], lo, bcast4(q, 4 * k));
                s2[t] = _mm256_dpbusd_epi32(s2[t], hi, bcast4(q, 16 + 4 * k));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        for t in 0..N {
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*ds[t].add(b)));
            let hi = if HI16 {
                _mm256_srai_epi32::<4>(s2[t])
            } else {
                s2[t]
            };
            let i = _mm256_add_epi32(s[t], hi);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sc, acc[t]);
        }
    }
    for (o, v) in out.chunks_exact_mut(8).zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// Bit `p` of every byte of a Q5_0R8 spread word (see [`crate::repack::q5_spread`])
/// moved to bit 4, the others cleared: the high bits of one load's nibbles (`p < 4`:
/// load `p`'s low nibbles; `p >= 4`: load `p - 4`'s high ones), ready to be ORed in.
/// One 32-bit shift: the bits a shift carries across bytes are masked off.
#[inline(always)]
unsafe fn q5_high(t: __m256i, p: usize, m10: __m256i) -> __m256i {
    let v = match p {
        0 => _mm256_slli_epi32::<4>(t),
        1 => _mm256_slli_epi32::<3>(t),
        2 => _mm256_slli_epi32::<2>(t),
        3 => _mm256_slli_epi32::<1>(t),
        4 => t,
        5 => _mm256_srli_epi32::<1>(t),
        6 => _mm256_srli_epi32::<2>(t),
        _ => _mm256_srli_epi32::<3>(t),
    };
    _mm256_and_si256(v, m10)
}

/// A Q5_0R8 load's low and high nibbles with their high bits: the unsigned 5-bit
/// values `u` of four values of each of the eight rows (`u - 16` is the weight).
#[inline(always)]
pub(crate) unsafe fn q5_r8_values(blk: *const u8, t: __m256i, k: usize) -> (__m256i, __m256i) {
    let (m4, m10) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
    let v = _mm256_loadu_si256(blk.add(48 + 32 * k) as *const __m256i);
    (
        _mm256_or_si256(_mm256_and_si256(v, m4), q5_high(t, k, m10)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
            q5_high(t, 4 + k, m10),
        ),
    )
}

/// Q5_0R8 (Q5_0 files' expert down projections, whose 1408 columns are not whole
/// Q4_K super-blocks): [`nibbles_r8_vnni`] with each nibble's high bit ORed in
/// (one shift and one mask of the block's spread high-bit word per load half), the
/// sums started at `-16 Σ q` (twice [`Q8Row::neg8`]); the exact `Σ (u - 16) q` meets
/// `d_w · d_x`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q5_0_r8_vnni<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    nibbles_r8_vnni::<N, false>(w, 176, 2, nb, a, out, |blk, k| {
        q5_r8_values(blk, _mm256_loadu_si256(blk.add(16) as *const __m256i), k)
    })
}

/// [`q5_0_r8_vnni`] on AVX2: `vpmaddubsw` pairs (at most 2 · 31 · 127) summed in 16
/// bits per half (low nibbles, high nibbles: four loads each, at most 31496; both
/// halves together would wrap), each half widened by `vpmaddwd`; then as VNNI, so the
/// sums equal its bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_r8_avx2<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let (qs, ds, ng) = vnni_rows::<N>(a);
    let wp = w.as_ptr();
    for b in 0..nb {
        let blk = wp.add(b * 176);
        prefetch_ahead::<3, N>(blk);
        let th = _mm256_loadu_si256(blk.add(16) as *const __m256i);
        let mut s_lo = [_mm256_setzero_si256(); N];
        let mut s_hi = [_mm256_setzero_si256(); N];
        for k in 0..4 {
            let (lo, hi) = q5_r8_values(blk, th, k);
            for t in 0..N {
                let q = qs[t].add(b * QK8);
                s_lo[t] = _mm256_add_epi16(s_lo[t], _mm256_maddubs_epi16(lo, bcast4(q, 4 * k)));
                s_hi[t] =
                    _mm256_add_epi16(s_hi[t], _mm256_maddubs_epi16(hi, bcast4(q, 16 + 4 * k)));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        for t in 0..N {
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*ds[t].add(b)));
            let i = _mm256_add_epi32(
                _mm256_madd_epi16(s_lo[t], ones),
                _mm256_madd_epi16(s_hi[t], ones),
            );
            let i = _mm256_add_epi32(i, _mm256_set1_epi32(*ng[t].add(b) << 1));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sc, acc[t]);
        }
    }
    for (o, v) in out.chunks_exact_mut(8).zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// Q8_0R8 with VNNI: the weights as unsigned `w + 128` (`w ^ 0x80`), each row's sums
/// started at `-128 Σ q` (sixteen times [`Q8Row::neg8`]), so `Σ (w + 128) q - 128 Σ q`
/// is the exact `Σ w q` with one `vpdpbusd` per four values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_r8_vnni<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); N];
    let (qs, ds, ng) = vnni_rows::<N>(a);
    let wp = w.as_ptr();
    for b in 0..nb {
        let blk = wp.add(b * 272);
        prefetch_ahead::<5, N>(blk);
        let mut s: [__m256i; N] = std::array::from_fn(|t| _mm256_set1_epi32(*ng[t].add(b) << 4));
        for k in 0..8 {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * k) as *const __m256i);
            let u = _mm256_xor_si256(v, flip);
            for t in 0..N {
                s[t] = _mm256_dpbusd_epi32(s[t], u, bcast4(qs[t].add(b * QK8), 4 * k));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        for t in 0..N {
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*ds[t].add(b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), sc, acc[t]);
        }
    }
    for (o, v) in out.chunks_exact_mut(8).zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
}

/// Q8_0R8: eight 32-byte loads per block, four values of each of eight rows each;
/// `|w| · (q with w's sign)` per `vpmaddubsw` (at most 2 · 128 · 127, inside 16 bits),
/// widened at once and summed in 32 bits.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_r8_avx2<const N: usize>(w: &[u8], nb: usize, a: &[&Q8Row], out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let qs: [*const i8; N] = std::array::from_fn(|t| a[t].qs.as_ptr());
    let ds: [*const f32; N] = std::array::from_fn(|t| a[t].d.as_ptr());
    let wp = w.as_ptr();
    for b in 0..nb {
        let blk = wp.add(b * 272);
        prefetch_ahead::<5, N>(blk);
        let mut s32 = [_mm256_setzero_si256(); N];
        for k in 0..8 {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * k) as *const __m256i);
            let av = _mm256_sign_epi8(v, v);
            for t in 0..N {
                let q = bcast4(qs[t].add(b * QK8), 4 * k);
                let p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(q, v));
                s32[t] = _mm256_add_epi32(s32[t], _mm256_madd_epi16(p, ones));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        for t in 0..N {
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*ds[t].add(b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[t]), sc, acc[t]);
        }
    }
    for (o, v) in out.chunks_exact_mut(8).zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn word_unpacked_k4_scales_and_mins_equal_the_bytewise_definition() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let q: Vec<u8> = (0..12)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 56) as u8
                })
                .collect();
            let (sc, mn) = super::k4_scales_mins(&q);
            for j in 0..8 {
                let (s, m) = crate::quant::scale_min_k4(j, &q);
                assert_eq!(
                    ((sc >> (8 * j)) as u8, (mn >> (8 * j)) as u8),
                    (s, m),
                    "{q:?} {j}"
                );
            }
        }
    }
}
