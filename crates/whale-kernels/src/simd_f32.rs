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

/// The largest value (`-inf` for none; NaNs are passed over), eight running maxima:
/// `fold(f32::max)` compiled to a serial chain of scalar `maxss`.
#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let ch = x.chunks_exact(8);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rem) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn add_body(x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += xv;
    }
}

/// `e^x` by range reduction (`x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`) and Cephes' degree-6
/// polynomial: within 2 ulp of `f32::exp` on `[-87, 88]`, exactly 0 below (so a
/// `-inf` mask gives 0) and `e^88` above. Integer and float steps only (no calls),
/// so loops over it vectorise; without fast-math the AVX2 copy computes the same bits.
#[inline(always)]
fn exp_one(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let nf = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = nf.to_bits() as i32 - MAGIC.to_bits() as i32;
    let nf = nf - MAGIC;
    // ln 2 in two parts, the first exact in a few bits, so n·C1 is exact.
    let r = xc - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = (p * r * r + r + 1.0) * f32::from_bits(((n + 127) << 23) as u32);
    if x < LO {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn exp_sum_body(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ch = x.chunks_exact_mut(8);
    for c in &mut ch {
        for k in 0..8 {
            c[k] = exp_one(c[k] - m);
            acc[k] += c[k];
        }
    }
    let mut s = 0.0;
    for v in ch.into_remainder() {
        *v = exp_one(*v - m);
        s += *v;
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn swiglu_body(g: &mut [f32], u: &[f32]) {
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = *gv / (1.0 + exp_one(-*gv)) * uv;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(g: &mut [f32], u: &[f32]) {
        super::swiglu_body(g, u)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
        super::exp_sum_body(x, m)
    }
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
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        super::max_body(x)
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

/// The largest of `x` (`-inf` when empty; NaNs are passed over).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::max(x) };
    }
    max_body(x)
}

/// `e^x` (the scalar form of [`exp_sum`]'s arithmetic).
#[inline]
pub fn exp(x: f32) -> f32 {
    exp_one(x)
}

/// SwiGLU's gating, `g[i] = silu(g[i]) · u[i]` with `silu(z) = z / (1 + e^−z)`, in
/// place, `e^x` as [`exp`] computes it (libm's `expf` per element was ~1% of a
/// batched decode step, run on one core).
#[inline]
pub fn swiglu(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "swiglu: gate and up lengths differ");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::swiglu(g, u) };
    }
    swiglu_body(g, u)
}

/// `x[i] = e^(x[i] − m)` in place; returns `Σ x[i]` (softmax's numerators and
/// denominator in one pass).
#[inline]
pub fn exp_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::exp_sum(x, m) };
    }
    exp_sum_body(x, m)
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
            let fold = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_body(&a), fold);
            assert_eq!(max(&a), fold);
            // A NaN is passed over, as `f32::max` does.
            let mut nan = a.clone();
            if let Some(x) = nan.get_mut(n / 2) {
                *x = f32::NAN;
                let want = nan.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(&nan), want);
                assert_eq!(max_body(&nan), want);
            }
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::x86::has_avx2() {
                // SAFETY: AVX2 was detected just above.
                assert_eq!(unsafe { avx2::max(&a) }, fold);
            }
            let mut e1: Vec<f32> = a.iter().map(|v| v * 30.0).collect();
            let mut e2 = e1.clone();
            let s1 = exp_sum_body(&mut e1, 0.5);
            let s2 = exp_sum(&mut e2, 0.5);
            assert_eq!(e1, e2);
            assert_eq!(s1.to_bits(), s2.to_bits());
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::x86::has_avx2() {
                // SAFETY: AVX2 and FMA were detected just above.
                let mut e3 = a.iter().map(|v| v * 30.0).collect::<Vec<_>>();
                assert_eq!(
                    unsafe { avx2::exp_sum(&mut e3, 0.5) }.to_bits(),
                    s1.to_bits()
                );
                assert_eq!(e3, e1);
                // SAFETY: AVX2 and FMA were detected just above.
                let d = unsafe { avx2::dot(&a, &b) };
                assert!((d - want).abs() <= 1e-5 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn swiglu_copies_agree_and_match_libm_silu() {
        for n in [0, 1, 7, 8, 9, 1408] {
            let g: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 40.0 - 3.0)
                .collect();
            let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut portable = g.clone();
            swiglu_body(&mut portable, &u);
            let mut dispatched = g.clone();
            swiglu(&mut dispatched, &u);
            assert_eq!(portable, dispatched);
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::x86::has_avx2() {
                let mut v = g.clone();
                // SAFETY: AVX2 and FMA were detected just above.
                unsafe { avx2::swiglu(&mut v, &u) };
                assert_eq!(v, portable, "the AVX2 copy computes the same bits");
            }
            for ((got, gv), uv) in portable.iter().zip(&g).zip(&u) {
                let want = gv / (1.0 + (-gv).exp()) * uv;
                assert!(
                    (got - want).abs() <= 4.0 * f32::EPSILON * want.abs() + 1e-30,
                    "silu({gv}) · {uv} = {got}, libm {want}"
                );
            }
        }
        // Far out in both tails: silu(z) → z above, → 0 (never NaN) below.
        let mut g = [100.0f32, -100.0, -1e30, 1e30];
        swiglu(&mut g, &[1.0; 4]);
        assert_eq!(g[0], 100.0);
        assert!(g[1].abs() < 1e-30 && g[2].abs() < 1e-3 && !g[2].is_nan());
        assert_eq!(g[3], 1e30);
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_zero_below_the_range() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {got}, libm {want} ({ulps} ulp)");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(1000.0), 88f32.exp());
        let mut v = [0.0, f32::NEG_INFINITY, 1.0];
        let s = exp_sum(&mut v, 1.0);
        assert_eq!(v[1], 0.0);
        assert!((s - (1.0 + (-1f32).exp())).abs() < 1e-6);
    }
}
