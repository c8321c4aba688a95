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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_cache_attention_matches_per_head_loops() {
        let (heads, l, stride, n) = (3, 40, 44, 300);
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
        let c = 32;
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
