//! Matrix products against weights stored as [`MatRef`] (row-major `[out, in]`).

use crate::dtype::MatRef;
use crate::ops::dot;
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 15;

/// `y = x · Wᵀ`: `x` is `[n, in]`, `w` is `[out, in]`, `y` is `[n, out]`, all row-major.
///
/// Work is split over output rows; each weight row is decoded once and used for
/// all `n` input rows, so a prefill reads the weights once, not once per token.
///
/// # Panics
/// If the slice lengths disagree with the dimensions (a caller bug).
pub fn matmul(x: &[f32], n: usize, w: MatRef<'_>, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * inp, "matmul: x has the wrong length");
    assert_eq!(y.len(), n * out, "matmul: y has the wrong length");
    if n == 0 || out == 0 {
        return;
    }
    if n == 1 {
        product_transposed(x, 1, w, y);
        return;
    }
    // yt is `[out, n]` (transposed) so each task owns a contiguous piece.
    let mut yt = vec![0.0f32; n * out];
    product_transposed(x, n, w, &mut yt);
    for o in 0..out {
        for t in 0..n {
            y[t * out + o] = yt[o * n + t];
        }
    }
}

/// `yt = W · xᵀ` as `[out, n]`, split over blocks of weight rows.
fn product_transposed(x: &[f32], n: usize, w: MatRef<'_>, yt: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    // Rows of W per task; several tasks per thread on decode-sized work.
    let block = (out / (rayon::current_num_threads() * 8)).clamp(1, 256);
    let task = |(bi, chunk): (usize, &mut [f32])| {
        let mut row = vec![0.0f32; inp];
        for (k, yo) in chunk.chunks_mut(n).enumerate() {
            // f32 rows are decoded too: mmap'd bytes carry no alignment promise.
            w.row_into(bi * block + k, &mut row);
            for (t, yv) in yo.iter_mut().enumerate() {
                *yv = dot(&x[t * inp..(t + 1) * inp], &row);
            }
        }
    };
    if n * out * inp < PAR_MIN_WORK {
        yt.chunks_mut(block * n).enumerate().for_each(task);
    } else {
        yt.par_chunks_mut(block * n).enumerate().for_each(task);
    }
}

/// `y = xᵀ · W` for one vector: `x` is `[rows]`, `w` is `[rows, cols]`, `y` is `[cols]`.
///
/// Used where a weight is applied transposed, such as folding `W_UK` into the
/// query in absorbed MLA. `y` is overwritten.
pub fn matmul_t_vec(x: &[f32], w: MatRef<'_>, y: &mut [f32]) {
    assert_eq!(x.len(), w.rows(), "matmul_t_vec: x has the wrong length");
    assert_eq!(y.len(), w.cols(), "matmul_t_vec: y has the wrong length");
    y.fill(0.0);
    let mut row = vec![0.0f32; w.cols()];
    for (r, &xv) in x.iter().enumerate() {
        w.row_into(r, &mut row);
        axpy_row(xv, &row, y);
    }
}

/// `y += a · x`.
#[inline]
pub fn axpy_row(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use half::bf16;

    fn naive(x: &[f32], n: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * out];
        for t in 0..n {
            for o in 0..out {
                let mut s = 0.0f64;
                for i in 0..inp {
                    s += x[t * inp + i] as f64 * w[o * inp + i] as f64;
                }
                y[t * out + o] = s as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.7123).sin())
            .collect()
    }

    #[test]
    fn matmul_matches_naive_for_all_shapes_and_types() {
        for &(n, out, inp) in &[
            (1, 5, 3),
            (3, 7, 9),
            (1, 700, 130),
            (17, 300, 64),
            (2, 1, 1),
        ] {
            let x = data(n * inp, 1.0);
            let w = data(out * inp, 2.0);
            let want = naive(&x, n, &w, out, inp);
            let f32b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut y = vec![0.0; n * out];
            matmul(
                &x,
                n,
                MatRef::new(DType::F32, &f32b, out, inp).unwrap(),
                &mut y,
            );
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{n}x{out}x{inp}: {a} vs {b}");
            }
            // bf16 weights: compare against the naive product of the rounded weights.
            let wb: Vec<f32> = w.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
            let bfb: Vec<u8> = w
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect();
            let want = naive(&x, n, &wb, out, inp);
            matmul(
                &x,
                n,
                MatRef::new(DType::BF16, &bfb, out, inp).unwrap(),
                &mut y,
            );
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "bf16 {n}x{out}x{inp}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn transposed_vector_product() {
        let (rows, cols) = (4, 6);
        let w = data(rows * cols, 3.0);
        let x = data(rows, 4.0);
        let b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut y = vec![1.0; cols];
        matmul_t_vec(&x, MatRef::new(DType::F32, &b, rows, cols).unwrap(), &mut y);
        for c in 0..cols {
            let s: f32 = (0..rows).map(|r| x[r] * w[r * cols + c]).sum();
            assert!((y[c] - s).abs() < 1e-5);
        }
    }
}
