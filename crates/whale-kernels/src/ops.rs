//! Element-wise and reduction kernels on f32 slices.

/// Dot product of two equal-length slices (sixteen partial sums; AVX2 when the CPU has it).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::simd_f32::dot(a, b)
}

/// RMSNorm of `x` into `out`: `out = x / sqrt(mean(x²) + eps) * weight`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * r) * w;
    }
}

/// RMSNorm in place.
pub fn rmsnorm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = (*v * r) * w;
    }
}

/// Numerically stable softmax in place. An empty slice is left alone.
pub fn softmax_inplace(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return;
    }
    let inv = 1.0 / crate::simd_f32::exp_sum(x, m);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_sequential_sum() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let seq: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - seq).abs() < 1e-5);
    }

    #[test]
    fn rmsnorm_unit_rms() {
        let x = [3.0, -4.0];
        let mut out = [0.0; 2];
        rmsnorm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] + 8.0 / r).abs() < 1e-6);
        let mut y = x;
        rmsnorm_inplace(&mut y, &[1.0, 2.0], 0.0);
        assert_eq!(y, out);
    }

    #[test]
    fn softmax_sums_to_one_and_handles_masks() {
        let mut x = [1.0, 2.0, f32::NEG_INFINITY, 3.0];
        softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
        assert!(x[3] > x[1] && x[1] > x[0]);
    }
}
