//! llama.cpp (ggml) block formats and their scalar dequantisation, bit-exact with
//! ggml's reference `dequantize_row_*` (checked against gguf-py's implementation
//! in `tests/fixtures/gguf/dequant.json`).
//!
//! Blocks of 32 values (`QK = 32`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. Super-blocks
//! of 256 (`QK_K = 256`): Q4_K, Q5_K, Q6_K. All little-endian, f16 scales.

use half::f16;

/// Values per block of the 32-wide formats.
pub const QK: usize = 32;
/// Values per super-block of the k-quants.
pub const QK_K: usize = 256;

#[inline]
fn h(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Q4_0 (18 bytes): `d`, then 16 bytes of nibbles; `x = (q - 8) · d`.
pub fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1 (20 bytes): `d`, `m`, nibbles; `x = q · d + m`.
pub fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0 (22 bytes): `d`, 32 high bits, nibbles; `x = (q - 16) · d`.
pub fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0F) | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1 (24 bytes): `d`, `m`, 32 high bits, nibbles; `x = q · d + m`.
pub fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0x0F) | xh0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | xh1) as f32 * d + m;
    }
}

/// Q8_0 (34 bytes): `d`, 32 signed bytes; `x = q · d`.
pub fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Scale and min of sub-blocks `is` and `is + 1`, multiplied out as ggml does.
#[inline]
fn sub_block_pair(is: usize, scales: &[u8], d: f32, dmin: f32) -> (f32, f32, f32, f32) {
    let (sc1, m1) = scale_min_k4(is, scales);
    let (sc2, m2) = scale_min_k4(is + 1, scales);
    (
        d * sc1 as f32,
        dmin * m1 as f32,
        d * sc2 as f32,
        dmin * m2 as f32,
    )
}

/// Q4_K (144 bytes): `d`, `dmin`, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
pub fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let scales = &b[4..16];
    let mut q = &b[16..144];
    let mut is = 0;
    for chunk in y.chunks_mut(64) {
        let (d1, m1, d2, m2) = sub_block_pair(is, scales, d, dmin);
        for l in 0..32 {
            chunk[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            chunk[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
        q = &q[32..];
        is += 2;
    }
}

/// Q5_K (176 bytes): `d`, `dmin`, 12 bytes of scales/mins, 32 bytes of high bits, 128 of nibbles.
pub fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let mut ql = &b[48..176];
    let (mut is, mut u1, mut u2) = (0, 1u8, 2u8);
    for chunk in y.chunks_mut(64) {
        let (d1, m1, d2, m2) = sub_block_pair(is, scales, d, dmin);
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            chunk[l] = d1 * ((ql[l] & 0x0F) + hi1) as f32 - m1;
            chunk[l + 32] = d2 * ((ql[l] >> 4) + hi2) as f32 - m2;
        }
        ql = &ql[32..];
        is += 2;
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// Q6_K (210 bytes): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 signed scales, `d`.
pub fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = h(b, 208);
    let (mut ql, mut qh, mut sc) = (&b[0..128], &b[128..192], &b[192..208]);
    for chunk in y.chunks_mut(128) {
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | (qh[l] & 3) << 4) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
            let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
            chunk[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            chunk[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            chunk[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            chunk[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
        ql = &ql[64..];
        qh = &qh[32..];
        sc = &sc[8..];
    }
}
