//! Portable twins of the x86 kernels: the definition the SIMD paths are tested against.

use super::{Q8Row, QK8};
use crate::DType;
use half::f16;

#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Σ over blocks of `d_w · (d_x Σ q_w q_x)` for Q4_0 (`q_w = nibble - 8`), Q5_0
/// (`q_w = 5 bits - 16`) or Q8_0; Q4_K per 32-value sub-block, its scale and min
/// applied as ggml defines them; Q6_K per 16-value sub-block.
pub fn dot_rows(dtype: DType, w: &[u8], a: &[&Q8Row], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(a) {
        *o = match dtype {
            DType::Q4_0 => q4_0(w, x),
            DType::Q5_0 => q5_0(w, x),
            DType::Q4K => q4_k(w, x),
            DType::Q6K => q6_k(w, x),
            DType::Q8_0 => q8_0(w, x),
            other => panic!("no integer kernel for {}", other.name()),
        };
    }
}

fn q4_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let q = &x.qs[b * QK8..(b + 1) * QK8];
        let mut sum = 0i32;
        for j in 0..16 {
            sum += (blk[2 + j] & 0x0F) as i32 * q[j] as i32;
            sum += (blk[2 + j] >> 4) as i32 * q[j + 16] as i32;
        }
        // Σ (n - 8) q = Σ n q - 8 Σ q.
        acc += f16_at(blk, 0) * (x.d[b] * sum as f32 - 8.0 * x.s[b]);
    }
    acc
}

fn q5_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(22).enumerate() {
        let q = &x.qs[b * QK8..(b + 1) * QK8];
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let mut sum = 0i32;
        for j in 0..16 {
            let lo = (blk[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
            let hi = (blk[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
            sum += lo * q[j] as i32 + hi * q[j + 16] as i32;
        }
        // Σ (u - 16) q = Σ u q - 16 Σ q.
        acc += f16_at(blk, 0) * (x.d[b] * sum as f32 - 16.0 * x.s[b]);
    }
    acc
}

/// Q4_K: per super-block `d`, `dmin` and eight 6-bit scales and mins; sub-block `j`'s
/// values are `d · sc_j · n - dmin · m_j` (`n` a nibble: the low ones of 32 bytes for
/// the even sub-block of each 64 values, the high ones for the odd one). Each
/// sub-block is one activation block: `d sc_j (d_x Σ n q) - dmin m_j (d_x Σ q)`.
fn q4_k(w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (sb, blk) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        for j in 0..8 {
            let (sc, m) = crate::quant::scale_min_k4(j, &blk[4..16]);
            let b = sb * 8 + j;
            let q = &x.qs[b * QK8..(b + 1) * QK8];
            let bytes = &blk[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            let sum: i32 = bytes
                .iter()
                .zip(q)
                .map(|(&v, &xq)| ((v >> shift) & 0x0F) as i32 * xq as i32)
                .sum();
            acc += d * sc as f32 * (x.d[b] * sum as f32) - dmin * m as f32 * x.s[b];
        }
    }
    acc
}

/// Q6_K: per super-block `d` and sixteen signed 8-bit scales, one per 16 values;
/// the 6-bit `u` is a nibble of `ql` with two bits of `qh` above it, and the value
/// is `d · sc · (u - 32)`. Each activation block meets two scales, summed exactly in
/// integers: `d d_x Σ_half sc_h Σ (u - 32) q`.
fn q6_k(w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (sb, blk) in w.chunks_exact(210).enumerate() {
        let d = f16_at(blk, 208);
        for k in 0..8 {
            // Block k of the super-block: half n of 128 values, quarter kk of it.
            let (n, kk) = (k / 4, k % 4);
            let b = sb * 8 + k;
            let q = &x.qs[b * QK8..(b + 1) * QK8];
            let mut isum = 0i32;
            for h in 0..2 {
                let sc = blk[192 + n * 8 + kk * 2 + h] as i8 as i32;
                let mut s = 0i32;
                for l in 16 * h..16 * h + 16 {
                    let lo = blk[n * 64 + (kk % 2) * 32 + l] >> (4 * (kk / 2)) & 0x0F;
                    let hi = (blk[128 + n * 32 + l] >> (2 * kk)) & 3;
                    s += ((lo | hi << 4) as i32 - 32) * q[l] as i32;
                }
                isum += sc * s;
            }
            acc += d * x.d[b] * isum as f32;
        }
    }
    acc
}

fn q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let q = &x.qs[b * QK8..(b + 1) * QK8];
        let sum: i32 = blk[2..]
            .iter()
            .zip(q)
            .map(|(&wq, &xq)| wq as i8 as i32 * xq as i32)
            .sum();
        acc += f16_at(blk, 0) * x.d[b] * sum as f32;
    }
    acc
}

/// The twin of the repacked-group kernels: `out[8 t + l] = w_l · a[t]` for the eight
/// rows of one Q4_0R8, Q5_0R8, Q8_0R8 or Q4_KR8 group ([`crate::repack`] layout). Per block and row the
/// integer dot; Q8_0: times `d_w · d_x`; Q4_0: of the unsigned nibbles, times the
/// block's multiple `m`, minus `8 m Σ q`, times `d_w`, and the sum times the unit.
pub fn dot_group(dtype: DType, w: &[u8], a: &[&Q8Row], out: &mut [f32]) {
    if dtype == DType::Q4KR8 {
        // Q4_KR8: each row's file blocks gathered back, then the file-layout twin.
        let gbs = 8 * 144;
        for l in 0..8 {
            let row: Vec<u8> = w
                .chunks_exact(gbs)
                .flat_map(|sb| crate::repack::k4_gather(sb, l))
                .collect();
            for (t, x) in a.iter().enumerate() {
                out[8 * t + l] = q4_k(&row, x);
            }
        }
        return;
    }
    if dtype == DType::Q5_0R8 {
        // Q5_0R8: per block each row's file block gathered back; the exact integer
        // `Σ (u - 16) q` times `d_w · d_x`, as the SIMD kernels compute it.
        for (x, o) in a.iter().zip(out.chunks_exact_mut(8)) {
            let mut acc = [0.0f32; 8];
            for (b, blk) in w.chunks_exact(8 * 22).enumerate() {
                let q = &x.qs[b * QK8..(b + 1) * QK8];
                for (l, accl) in acc.iter_mut().enumerate() {
                    let f = crate::repack::q5_gather(blk, l);
                    let qh = u32::from_le_bytes([f[2], f[3], f[4], f[5]]);
                    let mut sum = 0i32;
                    for (j, &v) in f[6..].iter().enumerate() {
                        let lo = (v & 0x0F) as i32 | ((qh >> j) as i32 & 1) << 4;
                        let hi = (v >> 4) as i32 | ((qh >> (j + 16)) as i32 & 1) << 4;
                        sum += (lo - 16) * q[j] as i32 + (hi - 16) * q[j + 16] as i32;
                    }
                    *accl += sum as f32 * (f16_at(&f, 0) * x.d[b]);
                }
            }
            o.copy_from_slice(&acc);
        }
        return;
    }
    let (bs, lanes) = match dtype {
        DType::Q4_0R8 => (8 * 18, 4),
        DType::Q8_0R8 => (8 * 34, 8),
        other => panic!("no repacked kernel for {}", other.name()),
    };
    for (x, o) in a.iter().zip(out.chunks_exact_mut(8)) {
        let mut acc = [0.0f32; 8];
        for (b, blk) in w.chunks_exact(bs).enumerate() {
            let q = &x.qs[b * QK8..(b + 1) * QK8];
            for (l, accl) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for k in 0..lanes {
                    for j in 0..4 {
                        let v = blk[16 + 32 * k + 4 * l + j];
                        if dtype == DType::Q4_0R8 {
                            sum += (v & 0x0F) as i32 * q[4 * k + j] as i32;
                            sum += (v >> 4) as i32 * q[16 + 4 * k + j] as i32;
                        } else {
                            sum += v as i8 as i32 * q[4 * k + j] as i32;
                        }
                    }
                }
                if dtype == DType::Q4_0R8 {
                    *accl += (x.multiple(b) * sum - x.sum8[b]) as f32 * f16_at(blk, 2 * l);
                } else {
                    *accl += sum as f32 * (f16_at(blk, 2 * l) * x.d[b]);
                }
            }
        }
        let unit = if dtype == DType::Q4_0R8 { x.unit } else { 1.0 };
        for (ov, v) in o.iter_mut().zip(acc) {
            *ov = v * unit;
        }
    }
}
