//! Attention over a cache shared by all heads (MLA's absorbed form is multi-query
//! attention over the latent rows): every cache row is read once per step and
//! used by all heads while it is in L1, instead of once per head.
//!
//! The inner loops are plain Rust written to vectorise; [`simd_f32`] compiles them
//! a second time with AVX2 enabled and picks that copy at run time.

use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 128;

/// `scores[h][u] = scale · q[h] · rows[u][..L]` for `H` query vectors `q` (`[H, L]`)
/// and `n` cache rows of `stride` values; `scores` is `[H, n]`.
pub fn mqa_scores(
    q: &[f32],
    heads: usize,
    rows: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let l = q.len() / heads;
    assert!(l <= stride && rows.len() >= n * stride && scores.len() == heads * n);
    // Score chunks per task are [chunk, H] (row-major by cache row), transposed after.
    let mut st = vec![0.0f32; n * heads];
    st.par_chunks_mut(ROWS_PER_TASK * heads)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let u0 = ci * ROWS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::isa() != crate::qdot::Isa::Scalar && l.is_multiple_of(8) {
                // SAFETY: AVX2 and FMA were detected; the asserts above bound every row.
                unsafe { x86::scores_rows(q, heads, l, rows, stride, u0, chunk, scale) };
                return;
            }
            for (k, out) in chunk.chunks_mut(heads).enumerate() {
                let row = &rows[(u0 + k) * stride..(u0 + k) * stride + l];
                for (h, o) in out.iter_mut().enumerate() {
                    *o = crate::simd_f32::dot(&q[h * l..(h + 1) * l], row) * scale;
                }
            }
        });
    for u in 0..n {
        for h in 0..heads {
            scores[h * n + u] = st[u * heads + h];
        }
    }
}

/// `out[h] = Σ_u probs[h][u] · rows[u][..C]` with `probs` `[H, n]`; `out` is `[H, C]`.
pub fn mqa_values(
    probs: &[f32],
    heads: usize,
    rows: &[f32],
    stride: usize,
    n: usize,
    out: &mut [f32],
) {
    let c = out.len() / heads;
    assert!(c <= stride && rows.len() >= n * stride && probs.len() == heads * n);
    let partial = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|ci| {
            let mut acc = vec![0.0f32; heads * c];
            let (u0, u1) = (ci * ROWS_PER_TASK, ((ci + 1) * ROWS_PER_TASK).min(n));
            #[cfg(target_arch = "x86_64")]
            if crate::qdot::isa() != crate::qdot::Isa::Scalar && c.is_multiple_of(8) {
                // SAFETY: AVX2 and FMA were detected; the asserts above bound every row.
                unsafe { x86::values_rows(probs, heads, n, rows, stride, u0, u1, &mut acc) };
                return acc;
            }
            for u in u0..u1 {
                let row = &rows[u * stride..u * stride + c];
                for h in 0..heads {
                    crate::simd_f32::axpy(probs[h * n + u], row, &mut acc[h * c..(h + 1) * c]);
                }
            }
            acc
        })
        .reduce(
            || vec![0.0f32; heads * c],
            |mut a, b| {
                crate::simd_f32::add(&b, &mut a);
                a
            },
        );
    out.copy_from_slice(&partial);
}

/// One block of cache rows' contribution to multi-query attention, softmax taken
/// over the block alone (see [`mqa_blocks`]).
struct Partial {
    /// Per head: the block's largest score.
    max: Vec<f32>,
    /// Per head: `Σ exp(score − max)`.
    sum: Vec<f32>,
    /// `[H, C]`: `Σ exp(score − max) · row[..C]`.
    out: Vec<f32>,
}

/// Softmax attention of `H` query vectors over cache rows held in blocks (a paged
/// cache): `out[h] = Σ_u softmax_u(scale · q[h] · rows[u][..L]) · rows[u][..C]` over
/// the first `visible` rows, where block `i` holds rows `i·B..` (`B = blocks[0].len() /
/// stride`) of `stride` values each. Each block's scores, exponentials and weighted sum
/// are computed while the block is in cache (blocks in parallel), then the blocks are
/// merged by rescaling with their maxima (as flash-decoding does), so the cache is read
/// once per step instead of once for the scores and again for the values.
#[allow(clippy::too_many_arguments)]
pub fn mqa_blocks(
    q: &[f32],
    heads: usize,
    blocks: &[&[f32]],
    stride: usize,
    visible: usize,
    c: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert_eq!(out.len(), heads * c);
    let per = blocks.first().map_or(1, |b| (b.len() / stride).max(1));
    let block = |(bi, rows): (usize, &&[f32])| -> Option<Partial> {
        let u0 = bi * per;
        let n = (rows.len() / stride).min(visible.checked_sub(u0)?);
        if n == 0 {
            return None;
        }
        let mut s = vec![0.0f32; heads * n];
        mqa_scores(q, heads, rows, stride, n, scale, &mut s);
        let mut max = vec![0.0f32; heads];
        let mut sum = vec![0.0f32; heads];
        for ((row, m), l) in s.chunks_mut(n).zip(&mut max).zip(&mut sum) {
            *m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *l = crate::simd_f32::exp_sum(row, *m);
        }
        let mut o = vec![0.0f32; heads * c];
        mqa_values(&s, heads, rows, stride, n, &mut o);
        Some(Partial { max, sum, out: o })
    };
    let parts: Vec<Partial> = if blocks.len() > 1 {
        blocks.par_iter().enumerate().filter_map(block).collect()
    } else {
        blocks.iter().enumerate().filter_map(block).collect()
    };
    out.fill(0.0);
    for h in 0..heads {
        let m = parts
            .iter()
            .map(|p| p.max[h])
            .fold(f32::NEG_INFINITY, f32::max);
        if !m.is_finite() {
            continue;
        }
        let mut l = 0.0f32;
        let o = &mut out[h * c..(h + 1) * c];
        for p in &parts {
            let w = crate::simd_f32::exp(p.max[h] - m);
            l += w * p.sum[h];
            crate::simd_f32::axpy(w, &p.out[h * c..(h + 1) * c], o);
        }
        let inv = 1.0 / l;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Scores of cache rows `u0..u0 + out.len() / heads` (`out` is `[rows, H]`): four
    /// rows (in L1 while every head passes over them) by two heads at a time, so six
    /// loads feed eight FMAs; row and head remainders go through the same tile with
    /// repeated pointers, their extra results dropped.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_rows(
        q: &[f32],
        heads: usize,
        l: usize,
        rows: &[f32],
        stride: usize,
        u0: usize,
        out: &mut [f32],
        scale: f32,
    ) {
        const R: usize = 4;
        let n = out.len() / heads;
        let qp = q.as_ptr();
        for k in (0..n).step_by(R) {
            let kr = (n - k).min(R);
            let rp: [*const f32; R] =
                std::array::from_fn(|i| rows.as_ptr().add((u0 + k + i.min(kr - 1)) * stride));
            for h in (0..heads).step_by(2) {
                let h2 = h + 1 < heads;
                let q0 = qp.add(h * l);
                let q1 = if h2 { q0.add(l) } else { q0 };
                let mut a0 = [_mm256_setzero_ps(); R];
                let mut a1 = [_mm256_setzero_ps(); R];
                for j in (0..l).step_by(8) {
                    let y0 = _mm256_loadu_ps(q0.add(j));
                    let y1 = _mm256_loadu_ps(q1.add(j));
                    for i in 0..R {
                        let x = _mm256_loadu_ps(rp[i].add(j));
                        a0[i] = _mm256_fmadd_ps(x, y0, a0[i]);
                        a1[i] = _mm256_fmadd_ps(x, y1, a1[i]);
                    }
                }
                for i in 0..kr {
                    out[(k + i) * heads + h] = hsum(a0[i]) * scale;
                    if h2 {
                        out[(k + i) * heads + h + 1] = hsum(a1[i]) * scale;
                    }
                }
            }
        }
    }

    /// `acc[h] += Σ_{u0 ≤ u < u1} probs[h][u] · rows[u][..C]`: sixteen columns (one cache
    /// line of each row) of four heads held in eight registers across the rows, so six
    /// loads feed eight FMAs; an eight-column tail as four heads by one.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn values_rows(
        probs: &[f32],
        heads: usize,
        n: usize,
        rows: &[f32],
        stride: usize,
        u0: usize,
        u1: usize,
        acc: &mut [f32],
    ) {
        let c = acc.len() / heads;
        let ap = acc.as_mut_ptr();
        let rp = rows.as_ptr();
        for h0 in (0..heads).step_by(4) {
            let hn = (heads - h0).min(4);
            let mut j = 0;
            while j + 16 <= c {
                let mut v0 = [_mm256_setzero_ps(); 4];
                let mut v1 = [_mm256_setzero_ps(); 4];
                for t in 0..hn {
                    v0[t] = _mm256_loadu_ps(ap.add((h0 + t) * c + j));
                    v1[t] = _mm256_loadu_ps(ap.add((h0 + t) * c + j + 8));
                }
                for u in u0..u1 {
                    let x0 = _mm256_loadu_ps(rp.add(u * stride + j));
                    let x1 = _mm256_loadu_ps(rp.add(u * stride + j + 8));
                    for t in 0..hn {
                        let p = _mm256_set1_ps(*probs.get_unchecked((h0 + t) * n + u));
                        v0[t] = _mm256_fmadd_ps(p, x0, v0[t]);
                        v1[t] = _mm256_fmadd_ps(p, x1, v1[t]);
                    }
                }
                for t in 0..hn {
                    _mm256_storeu_ps(ap.add((h0 + t) * c + j), v0[t]);
                    _mm256_storeu_ps(ap.add((h0 + t) * c + j + 8), v1[t]);
                }
                j += 16;
            }
            while j < c {
                let mut v = [_mm256_setzero_ps(); 4];
                for (t, vt) in v.iter_mut().enumerate().take(hn) {
                    *vt = _mm256_loadu_ps(ap.add((h0 + t) * c + j));
                }
                for u in u0..u1 {
                    let x = _mm256_loadu_ps(rp.add(u * stride + j));
                    for (t, vt) in v.iter_mut().enumerate().take(hn) {
                        let p = _mm256_set1_ps(*probs.get_unchecked((h0 + t) * n + u));
                        *vt = _mm256_fmadd_ps(p, x, *vt);
                    }
                }
                for (t, vt) in v.iter().enumerate().take(hn) {
                    _mm256_storeu_ps(ap.add((h0 + t) * c + j), *vt);
                }
                j += 8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockwise_softmax_attention_equals_the_whole_softmax() {
        let (heads, l, stride, c) = (3, 24, 24, 16);
        let q: Vec<f32> = (0..heads * l).map(|i| (i as f32 * 0.31).sin()).collect();
        for (n, per, visible) in [(150, 64, 150), (150, 64, 130), (40, 64, 40), (128, 64, 64)] {
            let rows: Vec<f32> = (0..n * stride)
                .map(|i| (i as f32 * 0.13).cos() * 3.0)
                .collect();
            let mut s = vec![0.0; heads * visible];
            mqa_scores(&q, heads, &rows, stride, visible, 0.7, &mut s);
            for row in s.chunks_mut(visible) {
                crate::softmax_inplace(row);
            }
            let mut want = vec![0.0; heads * c];
            mqa_values(&s, heads, &rows, stride, visible, &mut want);
            let blocks: Vec<&[f32]> = rows.chunks(per * stride).collect();
            let mut got = vec![0.0; heads * c];
            mqa_blocks(&q, heads, &blocks, stride, visible, c, 0.7, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{n} {visible}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn shared_cache_attention_matches_per_head_loops() {
        // Odd head and row counts exercise the pair kernels' edges.
        let (heads, l, stride, n) = (5, 40, 44, 301);
        let q: Vec<f32> = (0..heads * l).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows: Vec<f32> = (0..n * stride).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = vec![0.0; heads * n];
        mqa_scores(&q, heads, &rows, stride, n, 0.5, &mut s);
        for h in 0..heads {
            for u in 0..n {
                let want: f32 = (0..l)
                    .map(|j| q[h * l + j] * rows[u * stride + j])
                    .sum::<f32>()
                    * 0.5;
                assert!((s[h * n + u] - want).abs() < 1e-4);
            }
        }
        // 32 columns: whole 16-column tiles; 40: one 8-column tail.
        for c in [32, 40] {
            let mut o = vec![0.0; heads * c];
            mqa_values(&s, heads, &rows, stride, n, &mut o);
            for h in 0..heads {
                for j in 0..c {
                    let want: f32 = (0..n).map(|u| s[h * n + u] * rows[u * stride + j]).sum();
                    assert!((o[h * c + j] - want).abs() < 1e-3 * want.abs().max(1.0));
                }
            }
        }
    }
}
