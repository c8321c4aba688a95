//! f32 vector loops compiled twice: the portable build (whatever the target's
//! baseline is, SSE2 on x86-64) and an AVX2 + FMA build chosen at run time. The
//! bodies are one generic function each, so the two copies cannot drift apart;
//! the tests compare them.

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = 0.0;
    for k in 0..8 {
        s += acc[k] + acc[k + 8];
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy_body(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[inline(always)]
fn add_body(x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += xv;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot_body(a, b)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        super::axpy_body(a, x, y)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add(x: &[f32], y: &mut [f32]) {
        super::add_body(x, y)
    }
}

#[inline]
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !matches!(crate::qdot::isa(), crate::qdot::Isa::Scalar)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `Σ a[i] · b[i]` (sixteen partial sums).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `qdot::isa()` reports AVX2 (with FMA and F16C) only after detecting it.
        return unsafe { avx2::dot(a, b) };
    }
    dot_body(a, b)
}

/// `y += a · x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(a, x, y) };
    }
    axpy_body(a, x, y)
}

/// `y += x`.
#[inline]
pub fn add(x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::add(x, y) };
    }
    add_body(x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx2_copies_equal_the_portable_ones() {
        for n in [0, 1, 15, 16, 17, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
            let want = dot_body(&a, &b);
            assert!((dot(&a, &b) - want).abs() <= 1e-5 * want.abs().max(1.0));
            let mut y1 = b.clone();
            let mut y2 = b.clone();
            axpy_body(0.5, &a, &mut y1);
            axpy(0.5, &a, &mut y2);
            assert_eq!(y1, y2);
            add_body(&a, &mut y1);
            add(&a, &mut y2);
            assert_eq!(y1, y2);
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::x86::has_avx2() {
                // SAFETY: AVX2 and FMA were detected just above.
                let d = unsafe { avx2::dot(&a, &b) };
                assert!((d - want).abs() <= 1e-5 * want.abs().max(1.0));
            }
        }
    }
}
