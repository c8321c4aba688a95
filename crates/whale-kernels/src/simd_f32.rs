//! f32 vector loops compiled three times: the portable build (whatever the target's
//! baseline is, SSE2 on x86-64), an AVX2 + FMA build and an AVX-512 build, chosen at
//! run time. The bodies are one generic function each, so the copies cannot drift
//! apart; the tests compare them. The reductions take their lane count as a
//! parameter: eight for the portable and AVX2 copies, sixteen (one 512-bit vector)
//! for the AVX-512 one, which therefore sums in another order.

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (s, (x, y)) in acc.iter_mut().zip(x.iter().zip(y)) {
            *s += x * y;
        }
    }
    let mut s = sum_lanes(acc);
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

/// The largest value (`-inf` for none; NaNs are passed over), `W` running maxima:
/// `fold(f32::max)` compiled to a serial chain of scalar `maxss`.
#[inline(always)]
fn max_body<const W: usize>(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; W];
    let ch = x.chunks_exact(W);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..W {
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
fn exp_sum_body<const W: usize>(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; W];
    let mut ch = x.chunks_exact_mut(W);
    for c in &mut ch {
        for k in 0..W {
            c[k] = exp_one(c[k] - m);
            acc[k] += c[k];
        }
    }
    let mut s = 0.0;
    for v in ch.into_remainder() {
        *v = exp_one(*v - m);
        s += *v;
    }
    s + sum_lanes(acc)
}

/// The lanes' sum, halves added pairwise down to one lane (`W` a power of two).
#[inline(always)]
fn sum_lanes<const W: usize>(mut acc: [f32; W]) -> f32 {
    let mut w = W;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            acc[k] += acc[k + w];
        }
    }
    acc[0]
}

/// `Σ x[i]` in `W` running sums: eight vectors of the copy's width, so eight adds
/// are in flight (one accumulator would make the add latency, not memory, bound a
/// long sum: the bandwidth bench's roofline reads through this).
#[inline(always)]
fn sum_body<const W: usize>(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; W];
    let ch = x.chunks_exact(W);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..W {
            acc[k] += c[k];
        }
    }
    sum_lanes(acc) + rem.iter().sum::<f32>()
}

#[inline(always)]
fn swiglu_body(g: &mut [f32], u: &[f32]) {
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = *gv / (1.0 + exp_one(-*gv)) * uv;
    }
}

/// Lanes of the portable and AVX2 reductions.
const W8: usize = 8;

/// The bodies compiled with `$features` enabled, reductions in `$w` lanes (a module's
/// copies; `dot` is written out per module).
#[cfg(target_arch = "x86_64")]
macro_rules! body_copies {
    ($features:literal, $w:expr) => {
        #[target_feature(enable = $features)]
        pub unsafe fn swiglu(g: &mut [f32], u: &[f32]) {
            super::swiglu_body(g, u)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
            super::exp_sum_body::<{ $w }>(x, m)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
            super::axpy_body(a, x, y)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn add(x: &[f32], y: &mut [f32]) {
            super::add_body(x, y)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn max(x: &[f32]) -> f32 {
            super::max_body::<{ $w }>(x)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn sum(x: &[f32]) -> f32 {
            super::sum_body::<{ $w * 8 }>(x)
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    body_copies!("avx512f,avx512bw,avx512vl,avx2,fma", 16);

    /// Written out (two 512-bit FMA chains, the tail masked): the vectoriser
    /// compiled `dot_body` to sums of two-lane pieces.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            s1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                s1,
            );
            i += 32;
        }
        while i < n {
            let k = crate::first_lanes((n - i).min(16));
            let (x, y) = (
                _mm512_maskz_loadu_ps(k, pa.add(i)),
                _mm512_maskz_loadu_ps(k, pb.add(i)),
            );
            s0 = _mm512_fmadd_ps(x, y, s0);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    body_copies!("avx2,fma", super::W8);

    /// Written out (two 256-bit FMA chains, a scalar tail): the vectoriser compiled
    /// `dot_body` to sums of two-lane pieces.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        let s = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut t = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)));
        for k in i..n {
            t += a[k] * b[k];
        }
        t
    }
}

/// Which copy runs: 0 portable, 1 AVX2, 2 AVX-512 (as `qdot::isa()` says, so
/// `WHALE_ISA=avx2` keeps an AVX-512 CPU on the AVX2 copies too).
#[inline]
fn level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        match crate::qdot::isa() {
            crate::qdot::Isa::Scalar => 0,
            crate::qdot::Isa::Avx2 => 1,
            crate::qdot::Isa::Avx512Vnni => 2,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Runs the copy [`level`] picks.
macro_rules! dispatch {
    ($f:ident($($a:expr),*), $portable:expr) => {{
        #[cfg(target_arch = "x86_64")]
        match level() {
            // SAFETY: `qdot::isa()` reports AVX-512 F/BW/VL (with AVX2 and FMA) and
            // AVX2 (with FMA) only after detecting them.
            2 => return unsafe { avx512::$f($($a),*) },
            // SAFETY: as above.
            1 => return unsafe { avx2::$f($($a),*) },
            _ => {}
        }
        $portable
    }};
}

/// `Σ a[i] · b[i]` (sixteen partial sums).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dispatch!(dot(a, b), dot_body(a, b))
}

/// `y += a · x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    dispatch!(axpy(a, x, y), axpy_body(a, x, y))
}

/// `y += x`.
#[inline]
pub fn add(x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    dispatch!(add(x, y), add_body(x, y))
}

/// The largest of `x` (`-inf` when empty; NaNs are passed over).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    dispatch!(max(x), max_body::<W8>(x))
}

/// `Σ x[i]` in eight vector accumulators (64 lanes; 128 in the AVX-512 copy, which
/// therefore sums in another order).
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    dispatch!(sum(x), sum_body::<{ W8 * 8 }>(x))
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
    dispatch!(swiglu(g, u), swiglu_body(g, u))
}

/// `x[i] = e^(x[i] − m)` in place; returns `Σ x[i]` (softmax's numerators and
/// denominator in one pass).
#[inline]
pub fn exp_sum(x: &mut [f32], m: f32) -> f32 {
    dispatch!(exp_sum(x, m), exp_sum_body::<W8>(x, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx2_copies_equal_the_portable_ones() {
        for n in [0, 1, 15, 16, 17, 576, 1000, 4133] {
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
            let plain: f32 = a.iter().sum();
            let s64 = sum_body::<64>(&a);
            assert!((s64 - plain).abs() <= 1e-4 * plain.abs().max(1.0));
            assert!((sum(&a) - s64).abs() <= 1e-5 * s64.abs().max(1.0));
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::x86::has_avx2() {
                // SAFETY: AVX2 and FMA were detected just above.
                assert_eq!(unsafe { avx2::sum(&a) }.to_bits(), s64.to_bits());
            }
            let fold = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_body::<W8>(&a), fold);
            assert_eq!(max(&a), fold);
            // A NaN is passed over, as `f32::max` does.
            let mut nan = a.clone();
            if let Some(x) = nan.get_mut(n / 2) {
                *x = f32::NAN;
                let want = nan.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(&nan), want);
                assert_eq!(max_body::<W8>(&nan), want);
            }
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::x86::has_avx2() {
                // SAFETY: AVX2 was detected just above.
                assert_eq!(unsafe { avx2::max(&a) }, fold);
            }
            let mut e1: Vec<f32> = a.iter().map(|v| v * 30.0).collect();
            let mut e2 = e1.clone();
            let s1 = exp_sum_body::<W8>(&mut e1, 0.5);
            let s2 = exp_sum(&mut e2, 0.5);
            assert_eq!(e1, e2);
            // The dispatched copy may sum in sixteen lanes (AVX-512).
            assert!((s1 - s2).abs() <= 1e-5 * s1.abs().max(1.0));
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_copies_equal_the_portable_bodies() {
        if !crate::qdot::x86::has_avx512vnni() {
            return;
        }
        for n in [0, 1, 15, 16, 17, 33, 576, 1000, 4133] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
            // SAFETY (all calls below): AVX-512 F/BW/VL, AVX2 and FMA were detected.
            let d = unsafe { avx512::dot(&a, &b) };
            let want = dot_body(&a, &b);
            assert!((d - want).abs() <= 1e-5 * want.abs().max(1.0));
            let (mut y1, mut y2) = (b.clone(), b.clone());
            axpy_body(0.5, &a, &mut y1);
            unsafe { avx512::axpy(0.5, &a, &mut y2) };
            assert_eq!(y1, y2);
            add_body(&a, &mut y1);
            unsafe { avx512::add(&a, &mut y2) };
            assert_eq!(y1, y2);
            assert_eq!(
                unsafe { avx512::sum(&a) }.to_bits(),
                sum_body::<128>(&a).to_bits()
            );
            let fold = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(unsafe { avx512::max(&a) }, fold);
            assert_eq!(max_body::<16>(&a), fold);
            // The same exponentials; the sum in sixteen lanes, as the body with
            // sixteen computes it, and within rounding of eight lanes' sum.
            let mut e1: Vec<f32> = a.iter().map(|v| v * 30.0).collect();
            let (mut e2, mut e3) = (e1.clone(), e1.clone());
            let s8 = exp_sum_body::<W8>(&mut e1, 0.5);
            let s16 = exp_sum_body::<16>(&mut e2, 0.5);
            let got = unsafe { avx512::exp_sum(&mut e3, 0.5) };
            assert_eq!(e3, e1);
            assert_eq!(got.to_bits(), s16.to_bits());
            assert!((got - s8).abs() <= 1e-5 * s8.abs().max(1.0));
            let g: Vec<f32> = a.iter().map(|v| v * 40.0 - 3.0).collect();
            let (mut g1, mut g2) = (g.clone(), g);
            swiglu_body(&mut g1, &b);
            unsafe { avx512::swiglu(&mut g2, &b) };
            assert_eq!(g1, g2, "the AVX-512 copy computes the same bits");
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
