//! Matrix products against weights stored as [`MatRef`] (row-major `[out, in]`).

use crate::dtype::MatRef;
use crate::ops::dot;
use crate::qdot::{self, Q8Row};
use rayon::prelude::*;

/// Weight rows ahead of the current one whose cache lines are requested early: one
/// core's hardware prefetcher alone left decode at ~60% of the read bandwidth.
const PREFETCH_ROWS: usize = 2;

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 15;
/// The same for integer kernels (about 10 µs of work: less is not worth a fork).
const PAR_MIN_WORK_Q8: usize = 1 << 18;

/// `y = x · Wᵀ`: `x` is `[n, in]`, `w` is `[out, in]`, `y` is `[n, out]`, all row-major.
///
/// Work is split over output rows; each weight row is decoded once and used for
/// all `n` input rows, so a prefill reads the weights once, not once per token.
///
/// # Panics
/// If the slice lengths disagree with the dimensions (a caller bug).
pub fn matmul(x: &[f32], n: usize, w: MatRef<'_>, y: &mut [f32]) {
    matmul_with(x, n, w, y, false)
}

/// [`matmul`] with a choice of arithmetic: `exact` decodes quantised weights to f32
/// and multiplies in f32 (what a reference implementation computes on the
/// dequantised weights); otherwise quantised weights meet activations rounded to
/// 8-bit blocks in integer kernels, as llama.cpp computes them (several times faster).
pub fn matmul_with(x: &[f32], n: usize, w: MatRef<'_>, y: &mut [f32], exact: bool) {
    let (out, inp) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * inp, "matmul: x has the wrong length");
    assert_eq!(y.len(), n * out, "matmul: y has the wrong length");
    if n == 0 || out == 0 {
        return;
    }
    if !exact && qdot::supports(w.dtype()) && inp.is_multiple_of(qdot::QK8) {
        // Prompt-sized products on AMX tiles where the CPU has them.
        if n >= crate::amx::MIN_ROWS && crate::amx::matmul(x, n, w, y) {
            return;
        }
        matmul_q8(x, n, w, y);
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

/// Quantised weights: activations to 8-bit blocks once, then integer dot products
/// (four activation rows per weight block load), split over blocks of weight rows.
fn matmul_q8(x: &[f32], n: usize, w: MatRef<'_>, y: &mut [f32]) {
    let acts = quantize_rows(x, w.cols());
    debug_assert_eq!(acts.len(), n);
    matmul_q8_rows(&acts, w, y)
}

/// The rows of `x` (`[_, cols]`, `cols` a multiple of 32) quantised to 8-bit blocks,
/// for several integer products over the same input ([`matmul_quantized`]): MLA's
/// expanded form multiplies one layer's latents by two weights per group of heads.
pub fn quantize_rows(x: &[f32], cols: usize) -> Vec<Q8Row> {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "quantize_rows: ragged rows"
    );
    if x.len() >= PAR_MIN_WORK {
        x.par_chunks(cols).map(Q8Row::from_f32).collect()
    } else {
        x.chunks(cols).map(Q8Row::from_f32).collect()
    }
}

/// `y = x · Wᵀ` through the integer kernels for rows `x` already quantised by
/// [`quantize_rows`] (`y` is `[acts.len(), out]`): the same products as
/// [`matmul_with`] computes when not `exact`. Returns `false`, leaving `y` as it
/// was, when the weight has no integer kernel.
///
/// # Panics
/// If the lengths disagree with the dimensions.
pub fn matmul_quantized(acts: &[Q8Row], w: MatRef<'_>, y: &mut [f32]) -> bool {
    let inp = w.cols();
    if !qdot::supports(w.dtype()) || !inp.is_multiple_of(qdot::QK8) {
        return false;
    }
    assert_eq!(
        y.len(),
        acts.len() * w.rows(),
        "matmul_quantized: y has the wrong length"
    );
    assert!(
        acts.iter().all(|a| a.qs.len() == inp),
        "matmul_quantized: rows of the wrong length"
    );
    if !acts.is_empty() && w.rows() > 0 {
        matmul_q8_rows(acts, w, y);
    }
    true
}

/// [`matmul_q8`] after the quantisation.
fn matmul_q8_rows(acts: &[Q8Row], w: MatRef<'_>, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    let n = acts.len();
    if w.dtype().interleave() > 1 {
        matmul_groups(acts, w, y);
        return;
    }
    let isa = qdot::isa();
    let dtype = w.dtype();
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let block = (out / (rayon::current_num_threads() * 8)).clamp(1, 64);
    // Each task owns rows r0..r0+block of yt = [out, n].
    let task = |(bi, chunk): (usize, &mut [f32])| {
        let r0 = bi * block;
        let rows = chunk.len() / n;
        let mut quad: [&Q8Row; 4] = [&acts[0]; 4];
        let mut res = [0.0f32; 4];
        // Several token quads reuse each row: convert its block scales once.
        let nb = inp / qdot::QK8;
        let scales = n > 4 && qdot::takes_row_scales(dtype);
        let mut dws = vec![0.0f32; if scales { rows * nb } else { 0 }];
        for (r, d) in dws.chunks_mut(nb.max(1)).enumerate() {
            qdot::row_scales(dtype, &bytes[(r0 + r) * rb..(r0 + r + 1) * rb], d);
        }
        for t0 in (0..n).step_by(4) {
            let k = (n - t0).min(4);
            for (j, q) in quad.iter_mut().take(k).enumerate() {
                *q = &acts[t0 + j];
            }
            for r in 0..rows {
                let wr = &bytes[(r0 + r) * rb..(r0 + r + 1) * rb];
                if r + PREFETCH_ROWS < rows {
                    let ahead = &bytes[(r0 + r + PREFETCH_ROWS) * rb..][..rb];
                    qdot::prefetch(ahead);
                }
                let dw = scales.then(|| &dws[r * nb..(r + 1) * nb]);
                qdot::dot_rows(isa, dtype, wr, dw, &quad[..k], &mut res[..k]);
                chunk[r * n + t0..r * n + t0 + k].copy_from_slice(&res[..k]);
            }
        }
    };
    let run = |yt: &mut [f32]| {
        if n * out * inp < PAR_MIN_WORK_Q8 {
            yt.chunks_mut(block * n).enumerate().for_each(task);
        } else {
            crate::for_each_dynamic(yt.chunks_mut(block * n).enumerate(), task);
        }
    };
    if n == 1 {
        run(y);
        return;
    }
    let mut yt = vec![0.0f32; n * out];
    run(&mut yt);
    for o in 0..out {
        for t in 0..n {
            y[t * out + o] = yt[o * n + t];
        }
    }
}

/// Groups of a repacked weight (eight rows each) per task, at most: 64 rows of a
/// 2048-wide Q4_0 weight are 74 KB, which stay in L2 while every quad of activation
/// rows passes over them.
const GROUPS_PER_TASK: usize = 8;

/// [`matmul_q8`] for a repacked weight: each task owns a run of groups and passes
/// every quad of activation rows over them ([`qdot::dot_group`]: eight rows × up to
/// four activations per call), writing each group's eight outputs per activation row
/// straight into `y` (a transposed buffer and a final transpose cost a fifth of a
/// 64-row product on a 32768-row weight: every element of the transpose is a cache
/// and TLB miss).
fn matmul_groups(acts: &[Q8Row], w: MatRef<'_>, y: &mut [f32]) {
    let (n, out, inp) = (acts.len(), w.rows(), w.cols());
    let g = w.dtype().interleave();
    let gb = g * w.row_bytes();
    let groups = out / g;
    let isa = qdot::isa();
    let pairs = qdot::pairs_groups(isa, w.dtype(), n);
    let per = (groups / (rayon::current_num_threads() * 8)).clamp(1, GROUPS_PER_TASK);
    // Whole pairs per task where the kernels take two groups at once.
    let per = if pairs { per.next_multiple_of(2) } else { per };
    let (dtype, bytes) = (w.dtype(), w.bytes());
    let refs: Vec<&Q8Row> = acts.iter().collect();
    assert_eq!(y.len(), n * out);
    let dst = OutPtr(y.as_mut_ptr());
    let task = |ti: usize| {
        let g0 = ti * per;
        let g1 = (g0 + per).min(groups);
        let mut res = [0.0f32; 64];
        for (q0, quad) in refs.chunks(4).enumerate() {
            let k = quad.len();
            let mut gi = g0;
            while gi < g1 {
                // Two groups at once (`h` of them, adjacent: their outputs are too).
                let h = if pairs && gi + 1 < g1 { 2 } else { 1 };
                let wg = &bytes[gi * gb..(gi + h) * gb];
                let hg = h * g;
                qdot::dot_groups(isa, dtype, wg, h, quad, &mut res[..hg * k]);
                for t in 0..k {
                    let at = (q0 * 4 + t) * out + gi * g;
                    // SAFETY: `at + h·g <= n · out = y.len()` (row `q0·4 + t < n`,
                    // groups `gi + h <= groups = out / g`), and only the task owning
                    // those groups writes columns `gi·g..(gi + h)·g`, so no two tasks
                    // touch the same element while `y` is borrowed mutably for this
                    // whole call.
                    unsafe { dst.put(at, &res[t * hg..(t + 1) * hg]) };
                }
                gi += h;
            }
        }
    };
    let tasks = groups.div_ceil(per);
    if n * out * inp < PAR_MIN_WORK_Q8 {
        (0..tasks).for_each(task);
    } else {
        crate::for_each_index(tasks, task);
    }
}

/// `y`'s base pointer, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);

// SAFETY: the pointer is only written through at indices one task owns (see
// `matmul_groups`, `amx::product`), and the borrow it came from outlives the parallel
// loop.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `v` at elements `i..i + v.len()`, eight or sixteen as one copy (a group's
    /// or a pair's outputs: `copy_nonoverlapping` of a run-time length was a `memmove`
    /// call each, 2% of a batched decode step).
    ///
    /// # Safety
    /// The elements are in bounds of the buffer and no other thread touches them.
    unsafe fn put(self, i: usize, v: &[f32]) {
        let dst = self.0.add(i);
        if let Ok(v8) = <&[f32; 8]>::try_from(v) {
            // SAFETY: as the caller promises, for eight elements.
            unsafe { (dst as *mut [f32; 8]).write_unaligned(*v8) }
        } else if let Ok(v16) = <&[f32; 16]>::try_from(v) {
            // SAFETY: as the caller promises, for sixteen elements.
            unsafe { (dst as *mut [f32; 16]).write_unaligned(*v16) }
        } else {
            // SAFETY: as the caller promises.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst, v.len()) }
        }
    }
}

/// One product `y = W · x` of a [`matvec_many`] batch.
pub struct MatVec<'a> {
    /// The input vector `[in]`.
    pub x: &'a [f32],
    /// The weight `[out, in]`.
    pub w: MatRef<'a>,
    /// The output `[out]` (overwritten).
    pub y: &'a mut [f32],
}

/// Rows per task of [`matmul_many`], at least.
const MANY_BLOCK: usize = 32;
/// Weight bytes per task of [`matmul_many`], about, where rows are short.
const MANY_TASK_BYTES: usize = 32 << 10;

/// Rows per task of [`matmul_many`] for a weight of `out` rows of `row_bytes`: at
/// least [`MANY_BLOCK`], and as many more as make a task about [`MANY_TASK_BYTES`].
/// An MLA head's `W_UKᵀ` (512 rows of 128 values, 37 KB in Q4_0) was 16 tasks of
/// 2.3 KB, each a few dozen nanoseconds of work between the queue and the kernel's
/// start-up; it streamed at 16 GB/s against 30 for an expert's rows.
fn many_block(out: usize, row_bytes: usize) -> usize {
    let tasks = (out * row_bytes).div_ceil(MANY_TASK_BYTES).max(1);
    out.div_ceil(tasks)
        .next_multiple_of(MANY_BLOCK)
        .max(MANY_BLOCK)
}

/// Runs independent matrix-vector products as one parallel pass over all their row
/// blocks: decode's many small products (a MoE layer's experts, the heads' latent
/// projections) keep both cores busy without a fork and join per product.
/// `exact` as in [`matmul_with`].
pub fn matvec_many(jobs: Vec<MatVec<'_>>, exact: bool) {
    matmul_many(
        jobs.into_iter()
            .map(|j| MatMul {
                x: j.x,
                rows: None,
                n: 1,
                w: j.w,
                y: j.y,
            })
            .collect(),
        exact,
    );
}

/// One product `y = x · Wᵀ` over a few rows, for [`matmul_many`].
pub struct MatMul<'a> {
    /// The input rows: `[n, in]`, or with `rows` any number of rows `[_, in]`.
    pub x: &'a [f32],
    /// Which rows of `x` are the product's inputs, in order (`n` of them); `None`:
    /// all of `x`. Products that pick their rows from the same `x` (a MoE layer's
    /// experts over the step's tokens) share each row's 8-bit quantisation.
    pub rows: Option<&'a [usize]>,
    /// Input rows of the product.
    pub n: usize,
    /// The weight `[out, in]`.
    pub w: MatRef<'a>,
    /// The output `[n, out]` (overwritten).
    pub y: &'a mut [f32],
}

/// Row `k` of a product's inputs: `rows[k]`, or `k` when it takes all of `x`.
fn pick(rows: Option<&[usize]>, k: usize) -> usize {
    rows.map_or(k, |r| r[k])
}

/// Independent small-batch products (a few rows each) as one parallel pass over all
/// their weight row blocks: a batched decode step's MoE layer, where each routed
/// expert sees the one to four tokens routed to it, reads each expert once and
/// forks once. Integer path: up to four activation rows per weight row read, as
/// [`matmul_with`]'s prefill kernel. `exact` as in [`matmul_with`].
pub fn matmul_many(mut jobs: Vec<MatMul<'_>>, exact: bool) {
    let isa = qdot::isa();
    let int =
        |j: &MatMul| !exact && qdot::supports(j.w.dtype()) && j.w.cols().is_multiple_of(qdot::QK8);
    for j in &jobs {
        let cols = j.w.cols();
        match j.rows {
            Some(r) => {
                assert_eq!(r.len(), j.n, "matmul_many: rows and n disagree");
                assert!(
                    j.x.len().is_multiple_of(cols)
                        && r.iter().all(|&i| (i + 1) * cols <= j.x.len()),
                    "matmul_many: a row index is outside x"
                );
            }
            None => assert_eq!(j.x.len(), j.n * cols, "matmul_many: x has the wrong length"),
        }
        assert_eq!(
            j.y.len(),
            j.n * j.w.rows(),
            "matmul_many: y has the wrong length"
        );
    }
    // Quantise each distinct input row once: gate and up share their `x`, and
    // products that pick rows from one `x` share those rows. The rows' buffers come
    // from this thread's last call (six allocations a row were 6% of a decode step's
    // latent products).
    let mut pool = Q8_POOL.take();
    let mut used = 0;
    // (x, cols, index in `pool` of each row of x once quantised)
    let mut sources: Vec<(&[f32], usize, Vec<usize>)> = Vec::new();
    // Per job, its rows' indices in `pool` (a run of `refs`), if it runs in integers.
    let mut runs: Vec<Option<(usize, usize)>> = Vec::with_capacity(jobs.len());
    let mut at_pool: Vec<usize> = Vec::new();
    for j in &jobs {
        if !int(j) {
            runs.push(None);
            continue;
        }
        let cols = j.w.cols();
        let si = match sources
            .iter()
            .position(|s| std::ptr::eq(s.0, j.x) && s.1 == cols)
        {
            Some(si) => si,
            None => {
                sources.push((j.x, cols, vec![usize::MAX; j.x.len() / cols]));
                sources.len() - 1
            }
        };
        let (x, _, rows) = &mut sources[si];
        let start = at_pool.len();
        for i in (0..j.n).map(|k| pick(j.rows, k)) {
            if rows[i] == usize::MAX {
                if used == pool.len() {
                    pool.push(Q8Row::default());
                }
                pool[used].set(&x[i * cols..(i + 1) * cols]);
                rows[i] = used;
                used += 1;
            }
            at_pool.push(rows[i]);
        }
        runs.push(Some((start, j.n)));
    }
    let refs: Vec<&Q8Row> = at_pool.iter().map(|&i| &pool[i]).collect();
    // A repacked weight's integer products write each group's outputs straight into
    // `y` (eight contiguous values per input row; tasks own disjoint rows of the
    // weight). The others write `[out, n]` transposed, so a task owns a contiguous
    // block, and are transposed back at the end.
    let direct: Vec<bool> = jobs
        .iter()
        .zip(&runs)
        .map(|(j, run)| run.is_some() && j.w.dtype().interleave() > 1)
        .collect();
    let mut yts: Vec<Vec<f32>> = jobs
        .iter()
        .zip(&direct)
        .map(|(j, &d)| {
            if d {
                Vec::new()
            } else {
                vec![0.0f32; j.n * j.w.rows()]
            }
        })
        .collect();
    struct Task<'a> {
        act: Option<&'a [&'a Q8Row]>,
        x: &'a [f32],
        rows: Option<&'a [usize]>,
        n: usize,
        w: MatRef<'a>,
        r0: usize,
        /// Weight rows of the task.
        len: usize,
        /// `y` (`[n, out]`) where `direct`, else the job's transposed `[out, n]`.
        y: OutPtr,
        direct: bool,
    }
    let mut tasks = Vec::new();
    for (((j, run), yt), &direct) in jobs.iter_mut().zip(&runs).zip(yts.iter_mut()).zip(&direct) {
        if j.n == 0 {
            continue;
        }
        let out = j.w.rows();
        let block = many_block(out, j.w.row_bytes());
        // A repacked weight's tasks hold whole groups.
        debug_assert!(block.is_multiple_of(j.w.dtype().interleave()));
        let y = if direct {
            OutPtr(j.y.as_mut_ptr())
        } else {
            OutPtr(yt.as_mut_ptr())
        };
        for r0 in (0..out).step_by(block) {
            tasks.push(Task {
                act: run.map(|(s, n)| &refs[s..s + n]),
                x: j.x,
                rows: j.rows,
                n: j.n,
                w: j.w,
                r0,
                len: block.min(out - r0),
                y,
                direct,
            });
        }
    }
    crate::for_each_index(tasks.len(), |ti| {
        let t = &tasks[ti];
        let pairs = qdot::pairs_groups(isa, t.w.dtype(), t.act.map_or(1, |a| a.len()));
        let rb = t.w.row_bytes();
        let bytes = t.w.bytes();
        let rows = t.len;
        // SAFETY (for the rows of `yt` below): task `ti` alone owns weight rows
        // `r0..r0 + len`, so rows `r0..r0 + len` of its job's transposed `[out, n]`
        // buffer, which is in bounds (`r0 + len <= out`) and borrowed by `yts` for this
        // whole call, read by no task.
        let yt_row =
            |k: usize| unsafe { std::slice::from_raw_parts_mut(t.y.0.add((t.r0 + k) * t.n), t.n) };
        match t.act {
            Some(refs) if t.direct => {
                let y = t.y;
                let g = t.w.dtype().interleave();
                let out = t.w.rows();
                let gb = g * rb;
                let mut res = [0.0f32; 64];
                let mut r = t.r0;
                while r < t.r0 + rows {
                    // Two groups at once where the task has them (see `matmul_groups`).
                    let h = if pairs && r + 2 * g <= t.r0 + rows {
                        2
                    } else {
                        1
                    };
                    let wg = &bytes[r * rb..r * rb + h * gb];
                    let hg = h * g;
                    for (q0, quad) in refs.chunks(4).enumerate() {
                        let k = quad.len();
                        let dt = t.w.dtype();
                        qdot::dot_groups(isa, dt, wg, h, quad, &mut res[..hg * k]);
                        for u in 0..k {
                            let at = (q0 * 4 + u) * out + r;
                            // SAFETY: `at + h·g <= n · out = y.len()` (input row
                            // `q0·4 + u < n`, `r + h·g <= out`: groups are whole), and
                            // only the task owning weight rows `r..r + h·g` writes those
                            // columns, so no two tasks touch one element; `y` is
                            // borrowed mutably by `jobs` for this whole call and read by
                            // no task.
                            unsafe { y.put(at, &res[u * hg..(u + 1) * hg]) };
                        }
                    }
                    r += hg;
                }
            }
            Some(refs) => {
                // More than one quad of rows: convert the row's block scales once.
                let scales = t.n > 4 && qdot::takes_row_scales(t.w.dtype());
                let mut dw = vec![0.0f32; if scales { t.w.cols() / qdot::QK8 } else { 0 }];
                for k in 0..rows {
                    let r = t.r0 + k;
                    if k + PREFETCH_ROWS < rows {
                        qdot::prefetch(&bytes[(r + PREFETCH_ROWS) * rb..][..rb]);
                    }
                    let wrow = &bytes[r * rb..(r + 1) * rb];
                    let pre = if dw.is_empty() {
                        None
                    } else {
                        qdot::row_scales(t.w.dtype(), wrow, &mut dw);
                        Some(&dw[..])
                    };
                    let out = yt_row(k);
                    for (q, o) in refs.chunks(4).zip(out.chunks_mut(4)) {
                        qdot::dot_rows(isa, t.w.dtype(), wrow, pre, q, o);
                    }
                }
            }
            None => {
                let inp = t.w.cols();
                let mut row = vec![0.0f32; inp];
                for k in 0..rows {
                    t.w.row_into(t.r0 + k, &mut row);
                    for (i, yv) in yt_row(k).iter_mut().enumerate() {
                        let xi = pick(t.rows, i);
                        *yv = dot(&t.x[xi * inp..(xi + 1) * inp], &row);
                    }
                }
            }
        }
    });
    drop(tasks);
    drop(refs);
    Q8_POOL.set(pool);
    for ((j, yt), d) in jobs.into_iter().zip(yts).zip(&direct) {
        if *d {
            continue;
        }
        let out = j.w.rows();
        for r in 0..out {
            for i in 0..j.n {
                j.y[i * out + r] = yt[r * j.n + i];
            }
        }
    }
}

thread_local! {
    /// [`matmul_many`]'s quantised rows, kept for the thread's next call.
    static Q8_POOL: std::cell::Cell<Vec<Q8Row>> = const { std::cell::Cell::new(Vec::new()) };
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
        crate::for_each_dynamic(yt.chunks_mut(block * n).enumerate(), task);
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
    crate::simd_f32::axpy(a, x, y)
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
    fn many_products_reuse_quantised_rows_across_calls_of_other_shapes() {
        // One thread's calls in turn: wide rows, then narrow ones (the kept rows
        // shrink), then more of them than before (the pool grows), then wide again;
        // each equals the same product on its own.
        let make = |out: usize, inp: usize, seed: f32| {
            let w = data(out * inp, seed);
            let mut q = vec![0u8; DType::Q4_0.bytes_for(out * inp).unwrap()];
            crate::quantize::quantize_row(DType::Q4_0, &w, &mut q);
            q
        };
        for (out, inp, rows) in [
            (64usize, 256usize, 3usize),
            (40, 32, 1),
            (72, 64, 9),
            (64, 256, 2),
        ] {
            let w = make(out, inp, inp as f32);
            let m = MatRef::new(DType::Q4_0, &w, out, inp).unwrap();
            let x = data(rows * inp, out as f32);
            // Each row its own product (`rows` quantised rows), picked from one `x`.
            let picks: Vec<[usize; 1]> = (0..rows).map(|i| [i]).collect();
            let mut ys = vec![vec![0.0f32; out]; rows];
            let jobs = ys
                .iter_mut()
                .zip(&picks)
                .map(|(y, p)| MatMul {
                    x: &x,
                    rows: Some(p),
                    n: 1,
                    w: m,
                    y,
                })
                .collect();
            matmul_many(jobs, false);
            for (i, y) in ys.iter().enumerate() {
                let mut want = vec![0.0f32; out];
                matmul_with(&x[i * inp..(i + 1) * inp], 1, m, &mut want, false);
                assert_eq!(y, &want, "{out}x{inp}, row {i}");
            }
        }
    }

    #[test]
    fn many_block_keeps_tasks_whole_and_near_their_size() {
        // An expert's rows: 32 a task; an MLA head's short rows: a few tasks a head.
        assert_eq!(super::many_block(1408, 1152), 32);
        assert_eq!(super::many_block(512, 72), 256);
        assert_eq!(super::many_block(128, 288), 64);
        assert_eq!(super::many_block(8, 18), 32);
        for (out, rb) in [(1usize, 1usize), (100, 7), (4096, 1), (33, 5000)] {
            let b = super::many_block(out, rb);
            assert!(b.is_multiple_of(32) && b >= 32, "{out} {rb}: {b}");
            assert!(
                b * rb <= 2 * super::MANY_TASK_BYTES || b == 32,
                "{out} {rb}: {b}"
            );
        }
    }

    #[test]
    fn small_batch_products_equal_matmul() {
        // Q4_0 (integer path), Q8_0 and f32 weights; 1 to 9 rows (quads and remainders).
        for (dt, out, inp) in [
            (DType::Q4_0, 70usize, 64usize),
            (DType::Q8_0, 33, 96),
            (DType::F32, 9, 32),
        ] {
            let w = data(out * inp, 3.0);
            let bytes: Vec<u8> = if dt == DType::F32 {
                w.iter().flat_map(|v| v.to_le_bytes()).collect()
            } else {
                let mut q = vec![0u8; dt.bytes_for(out * inp).unwrap()];
                crate::quantize::quantize_row(dt, &w, &mut q);
                q
            };
            let m = MatRef::new(dt, &bytes, out, inp).unwrap();
            for exact in [false, true] {
                let xs: Vec<Vec<f32>> = (1..=9).map(|n| data(n * inp, n as f32)).collect();
                let mut ys: Vec<Vec<f32>> = (1..=9).map(|n| vec![0.0; n * out]).collect();
                let jobs = xs
                    .iter()
                    .zip(ys.iter_mut())
                    .enumerate()
                    .map(|(i, (x, y))| MatMul {
                        x,
                        rows: None,
                        n: i + 1,
                        w: m,
                        y,
                    })
                    .collect();
                matmul_many(jobs, exact);
                for (i, (x, y)) in xs.iter().zip(&ys).enumerate() {
                    let mut want = vec![0.0; (i + 1) * out];
                    matmul_with(x, i + 1, m, &mut want, exact);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "{dt:?} n={} exact={exact}: {a} vs {b}",
                            i + 1
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn products_over_picked_rows_equal_products_over_gathered_copies() {
        // Experts picking (repeated, unordered) rows of one step's activations, as a
        // MoE layer does: each row is quantised once and shared; the answer must be
        // the one the gathered rows give, on the integer and the exact paths.
        let (out, inp, t) = (40usize, 64usize, 5usize);
        let x = data(t * inp, 3.0);
        let picks: [&[usize]; 4] = [&[0, 3], &[4], &[1, 2, 3, 4, 0], &[2, 2]];
        for dt in [DType::Q4_0, DType::Q8_0, DType::F32] {
            let w = data(out * inp, 7.0);
            let mut q = vec![0u8; dt.bytes_for(out * inp).unwrap()];
            crate::quantize::quantize_row(dt, &w, &mut q);
            let file = MatRef::new(dt, &q, out, inp).unwrap();
            let packed = crate::repack::repack(dt, &q, out, inp);
            let mats: Vec<MatRef> = match &packed {
                Some((to, p)) => vec![file, MatRef::new(*to, p, out, inp).unwrap()],
                None => vec![file],
            };
            for m in mats {
                for exact in [false, true] {
                    let mut got: Vec<Vec<f32>> =
                        picks.iter().map(|r| vec![0.0; r.len() * out]).collect();
                    let jobs = picks
                        .iter()
                        .zip(got.iter_mut())
                        .map(|(r, y)| MatMul {
                            x: &x,
                            rows: Some(r),
                            n: r.len(),
                            w: m,
                            y,
                        })
                        .collect();
                    matmul_many(jobs, exact);
                    for (r, g) in picks.iter().zip(&got) {
                        let xs: Vec<f32> = r
                            .iter()
                            .flat_map(|&i| x[i * inp..(i + 1) * inp].iter().copied())
                            .collect();
                        let mut want = vec![0.0; r.len() * out];
                        matmul_with(&xs, r.len(), m, &mut want, exact);
                        for (a, b) in g.iter().zip(&want) {
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "{:?} exact={exact} rows {r:?}: {a} vs {b}",
                                m.dtype()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn repacked_weights_give_the_file_format_products() {
        // 1..=9 activation rows (quads and remainders), decode and prefill paths, the
        // batched path, and exact mode (rows decoded from the interleaved groups).
        for (dt, inp) in [
            (DType::Q4_0, 96usize),
            (DType::Q5_0, 96),
            (DType::Q8_0, 96),
            (DType::Q4K, 512),
        ] {
            let out = 72usize;
            let w = data(out * inp, 5.0);
            let mut q = vec![0u8; dt.bytes_for(out * inp).unwrap()];
            crate::quantize::quantize_row(dt, &w, &mut q);
            let file = MatRef::new(dt, &q, out, inp).unwrap();
            let (to, packed) = crate::repack::repack(dt, &q, out, inp).unwrap();
            let m = MatRef::new(to, &packed, out, inp).unwrap();
            for exact in [false, true] {
                for n in 1..=9 {
                    let x = data(n * inp, n as f32);
                    let (mut a, mut b) = (vec![0.0; n * out], vec![0.0; n * out]);
                    matmul_with(&x, n, file, &mut a, exact);
                    matmul_with(&x, n, m, &mut b, exact);
                    let mut c = vec![0.0; n * out];
                    matmul_many(
                        vec![MatMul {
                            x: &x,
                            rows: None,
                            n,
                            w: m,
                            y: &mut c,
                        }],
                        exact,
                    );
                    // Q5_0's file kernels subtract the offset in floats (see the
                    // qdot tests): a digit less.
                    let rel = if dt == DType::Q5_0 { 5e-5 } else { 1e-5 };
                    for ((a, b), c) in a.iter().zip(&b).zip(&c) {
                        let tol = rel * a.abs().max(1.0);
                        assert!(
                            (a - b).abs() <= tol,
                            "{dt:?} n={n} exact={exact}: {a} vs {b}"
                        );
                        assert!((a - c).abs() <= tol, "{dt:?} many n={n}: {a} vs {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn batched_products_equal_single_ones() {
        let mut bufs = vec![];
        for (i, &(out, inp)) in [(70usize, 64usize), (33, 96), (5, 32)].iter().enumerate() {
            let w = data(out * inp, i as f32);
            let mut q = vec![0u8; DType::Q4_0.bytes_for(out * inp).unwrap()];
            crate::quantize::quantize_row(DType::Q4_0, &w, &mut q);
            let f: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            bufs.push((out, inp, q, f, data(inp, 9.0 + i as f32)));
        }
        for exact in [false, true] {
            let mut ys: Vec<Vec<f32>> = bufs.iter().map(|b| vec![0.0; 2 * b.0]).collect();
            let jobs = bufs
                .iter()
                .zip(ys.iter_mut())
                .flat_map(|((out, inp, q, f, x), y)| {
                    let (a, b) = y.split_at_mut(*out);
                    [
                        MatVec {
                            x,
                            w: MatRef::new(DType::Q4_0, q, *out, *inp).unwrap(),
                            y: a,
                        },
                        MatVec {
                            x,
                            w: MatRef::new(DType::F32, f, *out, *inp).unwrap(),
                            y: b,
                        },
                    ]
                })
                .collect();
            matvec_many(jobs, exact);
            for ((out, inp, q, f, x), y) in bufs.iter().zip(&ys) {
                let mut want = vec![0.0; 2 * out];
                matmul_with(
                    x,
                    1,
                    MatRef::new(DType::Q4_0, q, *out, *inp).unwrap(),
                    &mut want[..*out],
                    exact,
                );
                matmul(
                    x,
                    1,
                    MatRef::new(DType::F32, f, *out, *inp).unwrap(),
                    &mut want[*out..],
                );
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
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
