//! Quantisation of f32 rows into llama.cpp's block formats, following ggml's
//! reference quantisers (`quantize_row_*_ref` in ggml-quants.c, which llama.cpp
//! uses when no importance matrix is given), so a file whale writes holds the
//! same blocks `llama-quantize` would write. Checked bit for bit against
//! llama.cpp's own `ggml_quantize_chunk` (`tests/fixtures/gguf/quantize.json`).

use crate::quant::{QK, QK_K};
use crate::DType;
use half::{bf16, f16};

/// ggml's all-zero threshold for a group's largest magnitude.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even (ggml's `nearest_int`: the float-add trick).
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline]
fn put_f16(out: &mut [u8], off: usize, v: f32) {
    out[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

#[inline]
fn get_f16(out: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([out[off], out[off + 1]]).to_f32()
}

/// The value of largest magnitude (first one on ties) and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// Q8_0: `d = absmax / 127`, `q = round(x / d)`.
fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for (o, &v) in out[2..34].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Q4_0: `d = max / -8` (signed largest value), `q = min(15, trunc(x / d + 8.5))`.
fn q4_0(x: &[f32], out: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for j in 0..16 {
        let a = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let b = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out[2 + j] = a | (b << 4);
    }
}

/// Q5_0: `d = max / -16`, 5-bit `q = min(31, trunc(x / d + 16.5))`, high bits apart.
fn q5_0(x: &[f32], out: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let a = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let b = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        out[6 + j] = (a & 0x0F) | ((b & 0x0F) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    out[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's `make_qkx2_quants`: a scale and (non-positive) minimum for `x` on the
/// levels `0..=nmax`, searched over `nstep + 1` candidate scales to minimise the
/// weighted squared error. Returns `(scale, -min)` and fills `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (w[0], w[0] * x[0]);
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * diff * diff;
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * diff * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights x²): a signed scale for
/// `x` on the levels `-nmax..nmax-1`, tried at 19 candidate scales. Fills `l`
/// with `q + nmax` and returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = level(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = level(iscale, v);
            let w = v * v;
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 6-bit scale and min of sub-block `j` from Q4_K/Q5_K's packed 12 bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K (144 bytes per 256): eight 32-value sub-blocks with 6-bit scales and mins
/// relative to the super-block's f16 `d` and `dmin`.
fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            15,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            -1.0,
            0.1,
            20,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut out[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(out, 0, max_scale / 63.0);
    put_f16(out, 2, max_min / 63.0);
    let (d_all, dmin_all) = (get_f16(out, 0), get_f16(out, 2));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &out[4..16]);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    let qs = &mut out[16..144];
    for (c, chunk) in qs.chunks_exact_mut(32).enumerate() {
        let base = 64 * c;
        for i in 0..32 {
            chunk[i] = l[base + i] | (l[base + i + 32] << 4);
        }
    }
}

/// Q6_K (210 bytes per 256): sixteen 16-value sub-blocks with signed 8-bit scales.
fn q6_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    out.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(out, 208, 1.0 / iscale);
    for ib in 0..16 {
        out[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = get_f16(out, 208);
    for j in 0..16 {
        let d = d_all * out[192 + j] as i8 as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            let q = nearest_int(x[16 * j + i] / d).clamp(-32, 31);
            l[16 * j + i] = (q + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    for half in 0..2 {
        let (j, ql, qh) = (128 * half, 64 * half, 128 + 32 * half);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            out[ql + i] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            out[ql + i + 32] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
            out[qh + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// Whether whale can write `dtype` (every file type it reads except Q4_1, Q5_1, Q5_K).
pub fn can_quantize(dtype: DType) -> bool {
    !matches!(
        dtype,
        DType::Q4_1
            | DType::Q5_1
            | DType::Q5K
            | DType::Q4_0R8
            | DType::Q8_0R8
            | DType::Q4KR8
            | DType::Q5_0R8
    )
}

/// Encodes the row `x` as `dtype` into `out` (`dtype.bytes_for(x.len())` bytes).
///
/// Panics when `x.len()` is not a whole number of blocks, `out` has the wrong
/// length, or `dtype` is not writable (`can_quantize`); callers check first.
pub fn quantize_row(dtype: DType, x: &[f32], out: &mut [u8]) {
    assert!(can_quantize(dtype), "whale does not write {}", dtype.name());
    let (vals, bytes) = dtype.block();
    assert!(x.len().is_multiple_of(vals), "row of {} values", x.len());
    assert_eq!(out.len(), x.len() / vals * bytes);
    let block: fn(&[f32], &mut [u8]) = match dtype {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            return;
        }
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
            return;
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
            return;
        }
        DType::Q8_0 => q8_0,
        DType::Q4_0 => q4_0,
        DType::Q5_0 => q5_0,
        DType::Q4K => q4_k,
        DType::Q6K => q6_k,
        other => unreachable!("can_quantize({}) said yes", other.name()),
    };
    debug_assert!(vals == QK || vals == QK_K);
    for (xb, ob) in x.chunks_exact(vals).zip(out.chunks_exact_mut(bytes)) {
        block(xb, ob);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, seed: u64) -> Vec<f32> {
        // A small LCG: deterministic values in (-1, 1) with a few outliers.
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                if i % 97 == 5 {
                    u * 8.0
                } else {
                    u
                }
            })
            .collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(7.49), 7);
    }

    #[test]
    fn round_trip_error_is_within_each_format_step() {
        let x = rows(1024, 3);
        for (dtype, rel) in [
            (DType::Q8_0, 0.01),
            (DType::Q6K, 0.04),
            (DType::Q5_0, 0.07),
            (DType::Q4_0, 0.14),
            (DType::Q4K, 0.14),
            (DType::F16, 1e-3),
            (DType::BF16, 8e-3),
        ] {
            let mut q = vec![0u8; dtype.bytes_for(x.len()).unwrap()];
            quantize_row(dtype, &x, &mut q);
            let mut y = vec![0.0; x.len()];
            crate::decode_into(dtype, &q, &mut y);
            // Error per block relative to the block's largest magnitude.
            let vals = dtype.block().0.max(32);
            for (xb, yb) in x.chunks(vals).zip(y.chunks(vals)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= rel * amax, "{dtype:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0.0f32; 256];
        for dtype in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q5_0,
            DType::Q4K,
            DType::Q6K,
        ] {
            let mut q = vec![0u8; dtype.bytes_for(256).unwrap()];
            quantize_row(dtype, &x, &mut q);
            let mut y = vec![1.0; 256];
            crate::decode_into(dtype, &q, &mut y);
            assert!(y.iter().all(|v| *v == 0.0), "{dtype:?}");
        }
    }
}
