//! Integer dot products of quantised weight rows with activations quantised to
//! 8-bit blocks, as llama.cpp's `vec_dot_q4_0_q8_0` computes them.
//!
//! An activation row `x` becomes [`Q8Row`]: per block of 32 values a scale `d`, the
//! rounded `q = x / d` as `i8`, and `s = d · Σ q` (for the weight formats with an
//! offset). A weight block then contributes `d_w · d_x · Σ w_j q_j` in exact integer
//! arithmetic.
//!
//! Every block's `d` is a whole multiple `m` of one unit per row,
//! `u = max|x| / (127 · 32767)`: `m = ⌈max_block|x| / (127 u)⌉`, the smallest step
//! that keeps the block's values within ±127 (llama.cpp's Q8_0 step is
//! `max_block|x| / 127`; this one is at most `1/m` coarser, under 1% for any block
//! within a factor of 330 of the row's largest). The repacked Q4_0 kernel then
//! folds the activation's scale into the integer widening (`vpmaddwd` by `m` instead
//! of by one) and multiplies by `u` once per output, not `d_w · d_x` per block.
//! With VNNI (`vpdpbusd` sums four byte products into 32 bits at once) there is no
//! 16-bit stage to fold into: those kernels start each block's sums at `-8 Σ q`
//! ([`Q8Row::neg8`]) and multiply the exact sum by `d_w · d_x`.
//!
//! Each kernel has a portable scalar twin ([`scalar`]) and x86 paths ([`x86`]:
//! AVX-512 VNNI on 256- and 512-bit lanes, and AVX2), chosen once at run time from the
//! CPU's features; the property tests compare every path with the scalar one.

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use crate::DType;
use std::sync::OnceLock;

/// Values per activation block.
pub const QK8: usize = 32;

/// One activation row quantised to 8-bit blocks.
#[derive(Clone, Debug, Default)]
pub struct Q8Row {
    /// Rounded values, `cols` of them.
    pub qs: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// `d · Σ q` per block.
    pub s: Vec<f32>,
    /// `8 · m · Σ q` per block: the repacked Q4_0 kernel subtracts it in integers
    /// (its nibbles carry an offset of 8), one broadcast load per row and block.
    pub sum8: Vec<i32>,
    /// Per block the multiple `m` of [`Q8Row::unit`] that is `d`, in both 16-bit
    /// halves (one broadcast load gives `vpmaddwd` its factor).
    pub m: Vec<i32>,
    /// `-8 · Σ q` per block: the VNNI repacked kernels start each block's 32-bit sums
    /// from it (Q4_0's offset of 8; times 16, Q8_0's offset of 128 after `w ^ 0x80`),
    /// so the offset costs no instruction.
    pub neg8: Vec<i32>,
    /// The row's unit `u`: `d = m · u` for every block.
    pub unit: f32,
}

/// The largest multiple of a row's unit: the row's largest block has it. With
/// nibbles (≤ 15) times values (≤ 127 in magnitude), a block's sum per row is at
/// most `32 · 15 · 127`, and times `m` it stays inside `i32` (2.0e9).
pub const M_MAX: i32 = 32767;

impl Q8Row {
    /// Quantises `x` (length a multiple of 32).
    pub fn from_f32(x: &[f32]) -> Self {
        let mut r = Q8Row::default();
        r.set(x);
        r
    }

    /// Block `b`'s multiple `m` of [`Q8Row::unit`] (unpacked from [`Q8Row::m`]).
    #[inline]
    pub fn multiple(&self, b: usize) -> i32 {
        self.m[b] & 0xFFFF
    }

    /// Re-quantises into this row's buffers.
    pub fn set(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(QK8), "Q8Row: {} values", x.len());
        let nb = x.len() / QK8;
        self.qs.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.sum8.resize(nb, 0);
        self.m.resize(nb, 0);
        self.neg8.resize(nb, 0);
        let out = (
            &mut self.qs[..],
            &mut self.d[..],
            &mut self.s[..],
            &mut self.sum8[..],
            &mut self.m[..],
            &mut self.neg8[..],
        );
        #[cfg(target_arch = "x86_64")]
        if isa() != Isa::Scalar {
            // SAFETY: `isa()` reports AVX2 only after detecting AVX2, FMA and F16C.
            self.unit = unsafe { x86::quantize_row_avx2(x, out) };
            return;
        }
        self.unit = quantize_body(x, out);
    }
}

/// The outputs of [`quantize_body`]: values, scales, `d · Σ q`, `8 · m · Σ q`, `m`,
/// `-8 · Σ q`.
pub(crate) type Q8Out<'a> = (
    &'a mut [i8],
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [i32],
    &'a mut [i32],
    &'a mut [i32],
);

/// The row's unit from its largest magnitude.
#[inline(always)]
pub(crate) fn row_unit(amax: f32) -> f32 {
    amax / (127.0 * M_MAX as f32)
}

/// A block's step from its largest magnitude: `(m, d = m · u)` with the least `m`
/// that keeps `max|x| / d` within 127 (up to rounding, which `round` then absorbs).
#[inline(always)]
pub(crate) fn block_step(amax: f32, unit: f32, inv_unit: f32) -> (i32, f32) {
    let m = ((amax / 127.0) * inv_unit).ceil().min(M_MAX as f32) as i32;
    (m, unit * m as f32)
}

/// A block's fields beside its values, from its step `d`, multiple `m` and `Σ q`:
/// `d · Σ q`, `8 · m · Σ q`, `m` in both 16-bit halves (the layout of
/// [`Q8Row::m`]), and `-8 · Σ q`. Both quantisers end each block here.
#[inline(always)]
pub(crate) fn block_fields(d: f32, m: i32, sum: i32) -> (f32, i32, i32, i32) {
    (d * sum as f32, 8 * m * sum, m | (m << 16), -8 * sum)
}

/// The per-block work of a row whose unit is known: `q = round(x / d)`, and the
/// block's `d`, `d · Σ q`, `8 · m · Σ q` and `m` (both halves). `ds` holds each
/// block's largest magnitude on entry. Written once and compiled twice (here, and
/// with AVX2 in `x86`), so both paths round identically.
#[inline(always)]
pub(crate) fn quantize_blocks(x: &[f32], unit: f32, (qs, ds, ss, sums, ms, ns): Q8Out<'_>) {
    let inv = if unit > 0.0 { 1.0 / unit } else { 0.0 };
    for ((((xs, q), (d, s)), (total, neg)), mm) in x
        .chunks_exact(QK8)
        .zip(qs.chunks_exact_mut(QK8))
        .zip(ds.iter_mut().zip(ss.iter_mut()))
        .zip(sums.iter_mut().zip(ns.iter_mut()))
        .zip(ms.iter_mut())
    {
        let (m, dv) = block_step(*d, unit, inv);
        let id = if dv > 0.0 { 1.0 / dv } else { 0.0 };
        let mut sum = 0i32;
        for (qv, &v) in q.iter_mut().zip(xs) {
            *qv = (v * id).round() as i8;
            sum += *qv as i32;
        }
        *d = dv;
        (*s, *total, *mm, *neg) = block_fields(dv, m, sum);
    }
}

/// Quantises a row: each block's largest magnitude, the row's unit, then
/// [`quantize_blocks`]. Returns the unit.
#[inline(always)]
pub(crate) fn quantize_body(x: &[f32], out: Q8Out<'_>) -> f32 {
    let mut rmax = 0.0f32;
    for (xs, d) in x.chunks_exact(QK8).zip(out.1.iter_mut()) {
        let mut amax = 0.0f32;
        for v in xs {
            amax = amax.max(v.abs());
        }
        *d = amax;
        rmax = rmax.max(amax);
    }
    let unit = row_unit(rmax);
    quantize_blocks(x, unit, out);
    unit
}

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 VNNI (with F, VL and BW): 256-bit kernels, and 512-bit ones for pairs of
    /// repacked groups and for the attention tiles.
    Avx512Vnni,
}

/// The best implementation this CPU runs, detected once.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("WHALE_SCALAR").is_some() {
            return Isa::Scalar;
        }
        // `WHALE_PREFETCH=near,far[,far1]`: the integer kernels' prefetch distances.
        if let Some(p) = std::env::var("WHALE_PREFETCH")
            .ok()
            .and_then(|v| parse_prefetch(&v))
        {
            set_prefetch(p);
        }
        // `WHALE_ISA=avx2` keeps a VNNI CPU on the AVX2 kernels (side-by-side runs).
        let avx2_only = std::env::var("WHALE_ISA").is_ok_and(|v| v == "avx2");
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512vnni() && !avx2_only {
                return Isa::Avx512Vnni;
            }
            if x86::has_avx2() {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// How far ahead of the block in hand the integer kernels ask for their weights'
/// cache lines, in bytes (0 turns a level off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetch {
    /// Into L1.
    pub near: usize,
    /// Into L2 only, for products of two input rows or more.
    pub far: usize,
    /// Into L2 only, for products of one input row (decode). Machines differ here:
    /// the AMX Xeon VM streams one row best at 4 KiB and two rows at 12 KiB.
    pub far_one_row: usize,
}

impl std::fmt::Display for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{}", self.near, self.far, self.far_one_row)
    }
}

/// `"near,far"` or `"near,far,far_one_row"` (bytes) as prefetch distances; without
/// the third, one-row products use `far` too.
pub fn parse_prefetch(v: &str) -> Option<Prefetch> {
    let d: Vec<usize> = v
        .split(',')
        .map(|d| d.trim().parse().ok())
        .collect::<Option<_>>()?;
    match d[..] {
        [near, far] => Some(Prefetch {
            near,
            far,
            far_one_row: far,
        }),
        [near, far, far_one_row] => Some(Prefetch {
            near,
            far,
            far_one_row,
        }),
        _ => None,
    }
}

/// Sets how far ahead the integer kernels ask for their weights' cache lines. The
/// defaults were measured on the machines this was built on; `cargo bench --bench
/// stream` with `PREFETCH=near,far,far1;…` compares distances on another.
/// `WHALE_PREFETCH=near,far[,far1]` sets them at start. No effect off x86-64.
pub fn set_prefetch(p: Prefetch) {
    #[cfg(target_arch = "x86_64")]
    x86::set_prefetch(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The integer kernels' prefetch distances in use.
pub fn prefetch_distances() -> Prefetch {
    #[cfg(target_arch = "x86_64")]
    return x86::prefetch();
    #[cfg(not(target_arch = "x86_64"))]
    Prefetch {
        near: 0,
        far: 0,
        far_one_row: 0,
    }
}

/// Whether `dtype` has an integer kernel here.
pub fn supports(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0
            | DType::Q5_0
            | DType::Q8_0
            | DType::Q4K
            | DType::Q6K
            | DType::Q4_0R8
            | DType::Q8_0R8
            | DType::Q4KR8
            | DType::Q5_0R8
    )
}

/// Whether [`dot_rows`] for `dtype` can take the row's block scales from
/// [`row_scales`] (one f16 per 32-value block; not Q4_K's super-blocks).
pub fn takes_row_scales(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q5_0 | DType::Q8_0)
}

/// Asks for the cache lines of `bytes` ahead of use (a hint; no effect elsewhere).
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len()).step_by(64) {
        // SAFETY: prefetching is a hint that never faults; the address is inside `bytes`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().add(off) as *const i8,
            )
        };
    }
}

/// The f32 scale of every block of the weight row `w` (for [`dot_rows`]'s `dw`).
pub fn row_scales(dtype: DType, w: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let bytes = dtype.block().1;
    // Gather the blocks' f16 fields, then convert them all at once (F16C, eight per
    // instruction, where the CPU has it): one f16 → f32 call per block cost 7% of a
    // batched decode step.
    let mut h = [half::f16::ZERO; 256];
    for (os, ws) in out.chunks_mut(256).zip(w.chunks(256 * bytes)) {
        let hs = &mut h[..os.len()];
        for (hv, b) in hs.iter_mut().zip(ws.chunks_exact(bytes)) {
            *hv = half::f16::from_le_bytes([b[0], b[1]]);
        }
        hs.convert_to_f32_slice(os);
    }
}

/// `out[t] = w · a[t]` for one weight row `w` (bytes of `dtype`) and up to four
/// activation rows (all `a` of the same length). `dw`, when given, holds the row's
/// block scales from [`row_scales`] (prefill converts them once per row). `isa` must
/// be one the CPU runs (as [`isa`] returns).
pub fn dot_rows(
    isa: Isa,
    dtype: DType,
    w: &[u8],
    dw: Option<&[f32]>,
    a: &[&Q8Row],
    out: &mut [f32],
) {
    debug_assert!(a.len() <= 4 && out.len() == a.len());
    match isa {
        Isa::Scalar => scalar::dot_rows(dtype, w, a, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::dot_rows(isa, dtype, w, dw, a, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::dot_rows(dtype, w, a, out),
    }
}

/// Whether [`dot_group_pair`] has a kernel of its own for `isa` and `dtype`
/// (otherwise it runs [`dot_group`] twice).
pub fn has_pair_kernel(isa: Isa, dtype: DType) -> bool {
    isa == Isa::Avx512Vnni && matches!(dtype, DType::Q4_0R8 | DType::Q8_0R8 | DType::Q4KR8)
}

/// Whether products of `rows` activation rows should take their groups two at a
/// time ([`dot_group_pair`]): from two rows up. On one row (decode), streaming from
/// memory, the pair kernels are slower though faster in cache: Q4_KR8 on the Zen 4
/// VM (`whale bench -p 512 -n 32` on the synthetic V2-Lite Q4_K, alternated, pairs
/// at every row count against none: tg 13.6–15.3 against 17.4–19.6 tok/s, pp512
/// 73–78 against 59–71), and Q4_0R8 on the AMX Xeon (`cargo bench --bench stream`,
/// two alternated pairs: 25.0 and 25.6 against 26.9 and 27.5 GB/s on huge pages, a
/// plain read 28–30; `whale bench -p 16 -n 128 -r 2` on the Q4_0 file: tg 17.07 and
/// 17.31 against 17.75 and 17.98 tok/s).
pub fn pairs_groups(isa: Isa, dtype: DType, rows: usize) -> bool {
    has_pair_kernel(isa, dtype) && rows >= 2
}

/// [`dot_group`] for two groups `w0` and `w1` of the same weight (same length) at once:
/// `out[16 t + l]` is row `l` of `w0` for `l < 8`, row `l - 8` of `w1` above.
pub fn dot_group_pair(isa: Isa, dtype: DType, w0: &[u8], w1: &[u8], a: &[&Q8Row], out: &mut [f32]) {
    debug_assert!(a.len() <= 4 && out.len() == 16 * a.len());
    #[cfg(target_arch = "x86_64")]
    if has_pair_kernel(isa, dtype) {
        return x86::dot_group_pair(dtype, w0, w1, a, out);
    }
    let n = a.len();
    let (mut r0, mut r1) = ([0.0f32; 32], [0.0f32; 32]);
    dot_group(isa, dtype, w0, a, &mut r0[..8 * n]);
    dot_group(isa, dtype, w1, a, &mut r1[..8 * n]);
    for (t, o) in out.chunks_exact_mut(16).enumerate() {
        o[..8].copy_from_slice(&r0[8 * t..8 * t + 8]);
        o[8..].copy_from_slice(&r1[8 * t..8 * t + 8]);
    }
}

/// [`dot_group`] for `w` holding one group, or [`dot_group_pair`] for two adjacent
/// ones (`groups`, 1 or 2): `out[8·groups·t + l]` is row `l` of the run of groups.
pub fn dot_groups(isa: Isa, dtype: DType, w: &[u8], groups: usize, a: &[&Q8Row], out: &mut [f32]) {
    if groups == 2 {
        let (w0, w1) = w.split_at(w.len() / 2);
        dot_group_pair(isa, dtype, w0, w1, a, out)
    } else {
        debug_assert_eq!(groups, 1);
        dot_group(isa, dtype, w, a, out)
    }
}

/// `out[8 t + l] = w_l · a[t]` for the eight rows `l` of one repacked group `w`
/// (all its blocks, [`crate::repack`] layout) and up to four activation rows.
/// `isa` must be one the CPU runs (as [`isa`] returns).
pub fn dot_group(isa: Isa, dtype: DType, w: &[u8], a: &[&Q8Row], out: &mut [f32]) {
    debug_assert!(a.len() <= 4 && out.len() == 8 * a.len());
    match isa {
        Isa::Scalar => scalar::dot_group(dtype, w, a, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::dot_group(isa, dtype, w, a, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::dot_group(dtype, w, a, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::quantize_row;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 3.0
            })
            .collect()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                v.push(Isa::Avx2);
            }
            if x86::has_avx512vnni() {
                v.push(Isa::Avx512Vnni);
            }
        }
        v
    }

    #[test]
    fn every_path_equals_the_scalar_twin_and_approximates_f32() {
        for cols in [32, 64, 96, 2048, 1408] {
            for dtype in [DType::Q4_0, DType::Q8_0] {
                let w = lcg(cols, cols as u64);
                let mut wq = vec![0u8; dtype.bytes_for(cols).unwrap()];
                quantize_row(dtype, &w, &mut wq);
                let mut wf = vec![0.0; cols];
                crate::decode_into(dtype, &wq, &mut wf);
                let xs: Vec<Vec<f32>> = (0..4).map(|t| lcg(cols, 99 + t)).collect();
                let rows: Vec<Q8Row> = xs.iter().map(|x| Q8Row::from_f32(x)).collect();
                for n in 1..=4 {
                    let a: Vec<&Q8Row> = rows[..n].iter().collect();
                    let mut want = vec![0.0; n];
                    scalar::dot_rows(dtype, &wq, &a, &mut want);
                    for t in 0..n {
                        // The integer dot approximates the f32 dot with the dequantised weights.
                        let exact: f32 = wf.iter().zip(&xs[t]).map(|(p, q)| p * q).sum();
                        let norm: f32 = wf.iter().map(|v| v.abs()).sum::<f32>() * 3.0;
                        assert!((want[t] - exact).abs() <= norm / 127.0, "{dtype:?} {cols}");
                    }
                    let mut dw = vec![0.0; cols / 32];
                    row_scales(dtype, &wq, &mut dw);
                    // Paths add in other orders, and Q4_0's `Σ n q - 8 Σ q` cancels: the
                    // rounding scales with `Σ |d_w| · 23 |x|`, not with the result.
                    let mag = |t: usize| -> f32 {
                        let m: f32 = xs[t]
                            .iter()
                            .enumerate()
                            .map(|(j, v)| dw[j / 32].abs() * v.abs())
                            .sum();
                        32.0 * f32::EPSILON * m
                    };
                    for (isa, pre) in isas()
                        .into_iter()
                        .flat_map(|i| [(i, None), (i, Some(&dw[..]))])
                    {
                        let mut got = vec![0.0; n];
                        dot_rows(isa, dtype, &wq, pre, &a, &mut got);
                        for t in 0..n {
                            let tol = 1e-5 * want[t].abs() + mag(t);
                            assert!(
                                (got[t] - want[t]).abs() <= tol,
                                "{isa:?} {dtype:?} cols {cols} n {n}: {} vs {}",
                                got[t],
                                want[t]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q5_0_q4_k_and_q6_k_paths_equal_the_scalar_twin_and_approximate_f32() {
        for (dtype, cols) in [
            (DType::Q5_0, 32),
            (DType::Q5_0, 96),
            (DType::Q5_0, 1408),
            (DType::Q4K, 256),
            (DType::Q4K, 2048),
            (DType::Q6K, 256),
            (DType::Q6K, 2048),
        ] {
            let w = lcg(cols, cols as u64 + 3);
            let mut wq = vec![0u8; dtype.bytes_for(cols).unwrap()];
            quantize_row(dtype, &w, &mut wq);
            let mut wf = vec![0.0; cols];
            crate::decode_into(dtype, &wq, &mut wf);
            // Rows 2 and 3 have blocks ten to a thousand times smaller than others.
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|t| {
                    let mut x = lcg(cols, 70 + t);
                    if t >= 2 {
                        for (b, blk) in x.chunks_mut(QK8).enumerate() {
                            let f = [1.0, 0.1, 0.01, 0.001][(b + t as usize) % 4];
                            blk.iter_mut().for_each(|v| *v *= f);
                        }
                    }
                    x
                })
                .collect();
            let rows: Vec<Q8Row> = xs.iter().map(|x| Q8Row::from_f32(x)).collect();
            let wmax = wf.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut dw = vec![0.0; cols / 32];
            if takes_row_scales(dtype) {
                row_scales(dtype, &wq, &mut dw);
            }
            for n in 1..=4 {
                let a: Vec<&Q8Row> = rows[..n].iter().collect();
                let mut want = vec![0.0; n];
                scalar::dot_rows(dtype, &wq, &a, &mut want);
                for t in 0..n {
                    // The integer dot approximates the f32 dot with the dequantised
                    // weights: each activation is off by at most half its block's step.
                    let exact: f32 = wf.iter().zip(&xs[t]).map(|(p, q)| p * q).sum();
                    let err: f32 = wf
                        .iter()
                        .zip(xs[t].chunks(QK8).flat_map(|b| {
                            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                            std::iter::repeat_n(amax / 254.0, b.len())
                        }))
                        .map(|(p, e)| p.abs() * e)
                        .sum();
                    assert!(
                        (want[t] - exact).abs() <= 1.01 * err + 1e-4,
                        "{dtype:?} {cols} row {t}: {} vs {exact}",
                        want[t]
                    );
                }
                // Other summation orders: rounding bounded by the terms' magnitudes
                // (a sub-block's offset, `dmin · m` or `16 d`, is at most ~max |w|).
                let mag = |t: usize| -> f32 {
                    let m: f32 = wf
                        .iter()
                        .zip(&xs[t])
                        .map(|(p, q)| (p.abs() + wmax) * q.abs())
                        .sum();
                    64.0 * f32::EPSILON * m
                };
                let pres: Vec<Option<&[f32]>> = if takes_row_scales(dtype) {
                    vec![None, Some(&dw[..])]
                } else {
                    vec![None]
                };
                for isa in isas() {
                    for &pre in &pres {
                        let mut got = vec![0.0; n];
                        dot_rows(isa, dtype, &wq, pre, &a, &mut got);
                        for t in 0..n {
                            assert!(
                                (got[t] - want[t]).abs() <= mag(t),
                                "{isa:?} {dtype:?} cols {cols} n {n} row {t}: {} vs {}",
                                got[t],
                                want[t]
                            );
                        }
                    }
                }
            }
        }
    }

    /// One block `blk` of `dtype` against activations of ±1 (`plus(i)` picks +1, in
    /// both signs): every path's dot product equals the decoded block's within `tol`.
    fn assert_sign_patterns_exact(dtype: DType, blk: &[u8], plus: fn(usize) -> bool, tol: f32) {
        let cols = dtype.block().0;
        let mut wf = vec![0.0; cols];
        crate::decode_into(dtype, blk, &mut wf);
        for sign in [1.0f32, -1.0] {
            let x: Vec<f32> = (0..cols)
                .map(|i| if plus(i) { sign } else { -sign })
                .collect();
            let row = Q8Row::from_f32(&x);
            let exact: f32 = wf.iter().zip(&x).map(|(p, q)| p * q).sum();
            for isa in isas() {
                let mut got = [0.0f32];
                dot_rows(isa, dtype, blk, None, &[&row], &mut got);
                assert!(
                    (got[0] - exact).abs() <= tol,
                    "{isa:?} {dtype:?} {:x?}: {} vs {exact}",
                    &blk[..8],
                    got[0]
                );
            }
        }
    }

    #[test]
    fn q5_0_high_bits_and_extremes_are_exact() {
        // Every nibble 15 with every high bit set (31), or 0 with none (0), against
        // activations at ±127: the integer sums are exact on every path.
        for (qs, qh) in [(0xFFu8, u32::MAX), (0x00, 0), (0xF0, 0xAAAA_5555)] {
            let mut blk = vec![0u8; 22];
            blk[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
            blk[2..6].copy_from_slice(&qh.to_le_bytes());
            blk[6..].fill(qs);
            assert_sign_patterns_exact(DType::Q5_0, &blk, |i| i % 3 == 0, 1e-4);
        }
    }

    #[test]
    fn q6_k_bit_planes_signs_and_extreme_scales_are_exact() {
        // Every 6-bit value at 63 or 0 (±32 off the offset), mixed bit planes, and
        // scales at -128 and 127, against activations at ±1: the sums stay small
        // enough to be exact in f32 on every path.
        for (ql, qh, sc) in [
            (0xFFu8, 0xFFu8, 127i8),
            (0x00, 0x00, -128),
            (0x5A, 0xC6, -77),
        ] {
            let mut blk = vec![0u8; 210];
            blk[..128].fill(ql);
            blk[128..192].fill(qh);
            for (i, s) in blk[192..208].iter_mut().enumerate() {
                *s = if i % 3 == 0 {
                    sc as u8
                } else {
                    (-(sc as i16 / 2)) as i8 as u8
                };
            }
            blk[208..].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
            assert_sign_patterns_exact(DType::Q6K, &blk, |i| i % 5 < 2, 1e-3);
        }
    }

    #[test]
    fn repacked_groups_equal_the_scalar_twin_and_the_file_rows() {
        for cols in [32, 64, 2048, 1408, 256] {
            for dtype in [DType::Q4_0, DType::Q5_0, DType::Q8_0, DType::Q4K] {
                if dtype.bytes_for(cols).is_none() {
                    continue;
                }
                let rows = 8;
                let w = lcg(rows * cols, cols as u64 + 7);
                let mut wq = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
                quantize_row(dtype, &w, &mut wq);
                let (to, packed) = crate::repack::repack(dtype, &wq, rows, cols).unwrap();
                // Rows 2 and 3 have blocks ten to a thousand times smaller than their
                // largest: multiples `m` from ~33 to 32767 within one row.
                let xs: Vec<Q8Row> = (0..4)
                    .map(|t| {
                        let mut x = lcg(cols, 40 + t);
                        if t >= 2 {
                            for (b, blk) in x.chunks_mut(QK8).enumerate() {
                                let f = [1.0, 0.1, 0.01, 0.001][(b + t as usize) % 4];
                                blk.iter_mut().for_each(|v| *v *= f);
                            }
                        }
                        Q8Row::from_f32(&x)
                    })
                    .collect();
                if cols >= 4 * QK8 {
                    let m: Vec<i32> = (0..xs[3].m.len()).map(|b| xs[3].multiple(b)).collect();
                    assert!(m.iter().any(|&v| v < 100) && m.contains(&M_MAX), "{m:?}");
                }
                let rb = wq.len() / rows;
                for n in 1..=4 {
                    let a: Vec<&Q8Row> = xs[..n].iter().collect();
                    let mut want = vec![0.0; 8 * n];
                    scalar::dot_group(to, &packed, &a, &mut want);
                    // The file-layout twin, row by row: the same integers, other rounding.
                    for l in 0..rows {
                        let mut per_row = vec![0.0; n];
                        scalar::dot_rows(dtype, &wq[l * rb..(l + 1) * rb], &a, &mut per_row);
                        // Q5_0's file twin subtracts its offset `16 d_w d_x Σ q` in
                        // floats after the sum (the repacked one in integers first):
                        // the cancellation costs it about one more digit.
                        let rel = if dtype == DType::Q5_0 { 5e-5 } else { 1e-5 };
                        for t in 0..n {
                            let (g, f) = (want[8 * t + l], per_row[t]);
                            let tol = rel * f.abs().max(1.0);
                            assert!((g - f).abs() <= tol, "{dtype:?} {cols} {n} {l}: {g} vs {f}");
                        }
                    }
                    // A second group: the same rows in reverse order, so its outputs
                    // differ from the first's.
                    let gb = packed.len();
                    let mut rev = Vec::with_capacity(gb);
                    for l in (0..rows).rev() {
                        rev.extend_from_slice(&wq[l * rb..(l + 1) * rb]);
                    }
                    let (_, packed2) = crate::repack::repack(dtype, &rev, rows, cols).unwrap();
                    let mut want2 = vec![0.0; 8 * n];
                    scalar::dot_group(to, &packed2, &a, &mut want2);
                    let mut first: Option<Vec<f32>> = None;
                    for isa in isas() {
                        let mut got = vec![0.0; 8 * n];
                        dot_group(isa, to, &packed, &a, &mut got);
                        // Q4_KR8's and Q5_0R8's SIMD kernels reach the same f32
                        // operations in the same order: equal bit for bit across ISAs.
                        if matches!(to, DType::Q4KR8 | DType::Q5_0R8) && isa != Isa::Scalar {
                            match &first {
                                Some(f) => assert_eq!(f, &got, "{isa:?} {cols} {n}"),
                                None => first = Some(got.clone()),
                            }
                        }
                        let mut pair = vec![0.0; 16 * n];
                        dot_group_pair(isa, to, &packed, &packed2, &a, &mut pair);
                        // Q4_KR8's pair kernel repeats the one-group kernel's operations.
                        if to == DType::Q4KR8 {
                            for t in 0..n {
                                assert_eq!(pair[16 * t..16 * t + 8], got[8 * t..8 * t + 8]);
                            }
                        }
                        for t in 0..n {
                            for l in 0..8 {
                                for (g, w) in [
                                    (got[8 * t + l], want[8 * t + l]),
                                    (pair[16 * t + l], want[8 * t + l]),
                                    (pair[16 * t + 8 + l], want2[8 * t + l]),
                                ] {
                                    let tol = 1e-5 * w.abs().max(1.0);
                                    assert!(
                                        (g - w).abs() <= tol,
                                        "{isa:?} {to:?} {cols} {n} row {t} lane {l}: {g} vs {w}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn repacked_q4_k_extremes_do_not_overflow() {
        // Every nibble 15, every 6-bit scale and min 63 (scale bytes all ones), against
        // activations at +127 and mixed signs: each row's eight 16-bit partial sums per
        // sub-block reach 8 · 2 · 15 · 127 = 30480 and must not wrap.
        let cols = 512;
        let mut wq = vec![0xFFu8; 8 * DType::Q4K.bytes_for(cols).unwrap()];
        for (i, b) in wq.chunks_mut(144).enumerate() {
            b[..2].copy_from_slice(&half::f16::from_f32(1.0 + i as f32 / 8.0).to_le_bytes());
            b[2..4].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        }
        let (to, packed) = crate::repack::repack(DType::Q4K, &wq, 8, cols).unwrap();
        for x in [
            vec![1.0f32; cols],
            (0..cols)
                .map(|j| if j % 7 < 3 { 1.0 } else { -1.0 })
                .collect(),
        ] {
            let a = Q8Row::from_f32(&x);
            for l in 0..8 {
                let mut wf = vec![0.0; cols];
                crate::decode_into(DType::Q4K, &wq[l * 288..(l + 1) * 288], &mut wf);
                let exact: f32 = wf.iter().zip(&x).map(|(p, q)| p * q).sum();
                for isa in isas() {
                    let mut got = [0.0; 8];
                    dot_group(isa, to, &packed, &[&a], &mut got);
                    assert!(
                        (got[l] - exact).abs() <= 1e-5 * exact.abs().max(1.0),
                        "{isa:?} lane {l}: {} vs {exact}",
                        got[l]
                    );
                }
            }
        }
    }

    #[test]
    fn repacked_extremes_do_not_overflow() {
        // Q8_0 weights at -128 and 127, Q4_0 nibbles at 0 and 15, Q5_0 values at 0 and
        // 31, activations at ±127: the 16-bit partial sums must neither saturate nor
        // wrap.
        let cols = 64;
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q5_0] {
            let bs = dtype.block().1;
            let mut wq = vec![0u8; 8 * dtype.bytes_for(cols).unwrap()];
            for (i, b) in wq.chunks_mut(bs).enumerate() {
                b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
                for (j, q) in b[2..].iter_mut().enumerate() {
                    *q = match (dtype, (i + j) % 3) {
                        (DType::Q8_0, 0) => 0x80,
                        (DType::Q8_0, _) => 0x7f,
                        (_, 0) => 0x00,
                        _ => 0xff,
                    };
                }
            }
            // Mixed signs, and every value at +127 (with every Q4_0 nibble at 15 in
            // the second run: the largest 16-bit sums, times the largest multiple).
            for (run, x) in [
                (0..cols)
                    .map(|j| if j % 5 == 0 { 1.0 } else { -1.0 })
                    .collect::<Vec<f32>>(),
                vec![1.0; cols],
            ]
            .into_iter()
            .enumerate()
            {
                if run == 1 && dtype != DType::Q8_0 {
                    for b in wq.chunks_mut(bs) {
                        b[2..].fill(0xff);
                    }
                }
                let a = Q8Row::from_f32(&x);
                assert!((0..a.m.len()).all(|b| a.multiple(b) == M_MAX));
                let rb = wq.len() / 8;
                let (to, packed) = crate::repack::repack(dtype, &wq, 8, cols).unwrap();
                for isa in isas() {
                    let mut got = [0.0; 8];
                    dot_group(isa, to, &packed, &[&a], &mut got);
                    let mut pair = [0.0; 16];
                    dot_group_pair(isa, to, &packed, &packed, &[&a], &mut pair);
                    assert_eq!(pair[..8], pair[8..], "{isa:?} {dtype:?}");
                    for (p, g) in pair[..8].iter().zip(&got) {
                        assert!((p - g).abs() <= 1e-6 * g.abs(), "{isa:?} {dtype:?}");
                    }
                    for l in 0..8 {
                        let mut want = [0.0];
                        scalar::dot_rows(dtype, &wq[l * rb..(l + 1) * rb], &[&a], &mut want);
                        let tol = 1e-6 * want[0].abs();
                        assert!((got[l] - want[0]).abs() <= tol, "{isa:?} {dtype:?} row {l}");
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantisation_is_the_same_on_every_path() {
        let mut x = lcg(4096, 5);
        // Blocks whose scaled values land on halves (max 127: scale 1), both signs,
        // and an all-zero block: rounding ties and the zero scale.
        for (i, v) in x[..96].iter_mut().enumerate() {
            *v = match i % 32 {
                0 => 127.0,
                j => (j as f32 - 16.0) + 0.5,
            };
        }
        x[96..128].fill(0.0);
        // A block far below the row's largest (small multiples) and a tiny one.
        x[128..160].iter_mut().for_each(|v| *v *= 1e-3);
        x[160..192].iter_mut().for_each(|v| *v *= 1e-9);
        let nb = x.len() / QK8;
        let fresh = || {
            (
                vec![0i8; x.len()],
                vec![0.0; nb],
                vec![0.0; nb],
                vec![0i32; nb],
                vec![0i32; nb],
                vec![0i32; nb],
            )
        };
        let (mut q1, mut d1, mut s1, mut n1, mut m1, mut g1) = fresh();
        let u1 = quantize_body(&x, (&mut q1, &mut d1, &mut s1, &mut n1, &mut m1, &mut g1));
        let r = Q8Row::from_f32(&x);
        assert_eq!((r.qs, r.d, r.s), (q1.clone(), d1.clone(), s1.clone()));
        assert_eq!((r.sum8, r.m, r.unit), (n1.clone(), m1.clone(), u1));
        assert_eq!(r.neg8, g1);
        let rmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(u1, rmax / (127.0 * M_MAX as f32));
        for b in 0..nb {
            let (xs, q) = (&x[b * QK8..(b + 1) * QK8], &q1[b * QK8..(b + 1) * QK8]);
            let m = m1[b] & 0xFFFF;
            assert_eq!(m1[b] >> 16, m);
            assert!((0..=M_MAX).contains(&m));
            assert_eq!(d1[b], u1 * m as f32);
            let sum = q.iter().map(|&v| v as i32).sum::<i32>();
            assert_eq!(n1[b], 8 * m * sum);
            assert_eq!(g1[b], -8 * sum);
            // The step is the least multiple of the unit that keeps every value
            // within ±127: never finer than max/127, at most one unit coarser.
            let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert!(d1[b] >= amax / 127.0 * (1.0 - 1e-6), "block {b}");
            assert!(d1[b] <= amax / 127.0 + u1 * 1.0001, "block {b}");
            assert!(q.iter().all(|&v| v > -128), "block {b}");
            for (&v, &c) in xs.iter().zip(q) {
                assert!((v - c as f32 * d1[b]).abs() <= d1[b] * 0.5001, "block {b}");
            }
        }
        assert_eq!(m1[..3], [M_MAX | (M_MAX << 16); 3]);
        assert_eq!(m1[3], 0);
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            let (mut q2, mut d2, mut s2, mut n2, mut m2, mut g2) = fresh();
            // SAFETY: AVX2, FMA and F16C were detected just above.
            let u2 = unsafe {
                x86::quantize_row_avx2(&x, (&mut q2, &mut d2, &mut s2, &mut n2, &mut m2, &mut g2))
            };
            assert_eq!((q2, d2, s2, n2, m2, u2), (q1, d1, s1, n1, m1, u1));
            assert_eq!(g2, g1);
        }
    }

    #[test]
    fn prefetch_distances_parse_and_leave_the_sums_alone() {
        let p = |near, far, far_one_row| Prefetch {
            near,
            far,
            far_one_row,
        };
        assert_eq!(parse_prefetch("2048,12288"), Some(p(2048, 12288, 12288)));
        assert_eq!(parse_prefetch(" 0 , 64 "), Some(p(0, 64, 64)));
        assert_eq!(
            parse_prefetch("2048,12288,4096"),
            Some(p(2048, 12288, 4096))
        );
        assert_eq!(p(1, 2, 3).to_string(), "1,2,3");
        for bad in ["2048", "a,1", "1,", ",1", "-1,2", "1,2,3,4", "1,2,"] {
            assert_eq!(parse_prefetch(bad), None, "{bad}");
        }
        // Hints only: any distances (none at all, far past the weight's end) give
        // the same bits. (Another test running meanwhile sees other distances,
        // which is harmless for the same reason.)
        let (rows, cols) = (8, 2048);
        let w = lcg(rows * cols, 3);
        let mut wq = vec![0u8; DType::Q4_0.bytes_for(rows * cols).unwrap()];
        quantize_row(DType::Q4_0, &w, &mut wq);
        let (to, packed) = crate::repack::repack(DType::Q4_0, &wq, rows, cols).unwrap();
        let (x, x2) = (
            Q8Row::from_f32(&lcg(cols, 4)),
            Q8Row::from_f32(&lcg(cols, 5)),
        );
        // One input row and two: they read different distances.
        let run = |p: Prefetch| {
            set_prefetch(p);
            let (mut one, mut two) = (vec![0.0f32; 8], vec![0.0f32; 16]);
            dot_group(isa(), to, &packed, &[&x], &mut one);
            dot_group(isa(), to, &packed, &[&x, &x2], &mut two);
            (one, two)
        };
        let before = prefetch_distances();
        let want = run(before);
        for d in [
            p(0, 0, 0),
            p(0, 12288, 0),
            p(64, 0, 4096),
            p(1 << 20, 1 << 24, 1 << 22),
        ] {
            assert_eq!(run(d), want, "{d}");
        }
        set_prefetch(before);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(prefetch_distances(), before);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        // Q8_0 weights at -128 (a file may hold them) times activations at ±127.
        let cols = 256;
        let mut wq = vec![0u8; DType::Q8_0.bytes_for(cols).unwrap()];
        for b in wq.chunks_mut(34) {
            b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            for (j, q) in b[2..].iter_mut().enumerate() {
                *q = if j % 2 == 0 { 0x80 } else { 0x7f };
            }
        }
        let x: Vec<f32> = (0..cols)
            .map(|j| if j % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let a = Q8Row::from_f32(&x);
        let mut want = [0.0];
        scalar::dot_rows(DType::Q8_0, &wq, &[&a], &mut want);
        for isa in isas() {
            let mut got = [0.0];
            dot_rows(isa, DType::Q8_0, &wq, None, &[&a], &mut got);
            assert_eq!(got, want, "{isa:?}");
        }
    }
}
