//! Attention over a cache shared by all heads (MLA's absorbed form is multi-query
//! attention over the latent rows): every cache row is read once per step and
//! used by all heads while it is in L1, instead of once per head.
//!
//! The inner loops are plain Rust written to vectorise; [`simd_f32`] compiles them
//! a second time with AVX2 enabled and picks that copy at run time.

use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 128;

/// Whether the x86 kernels run their AVX-512 shapes (where the VNNI ISA, which
/// implies AVX-512 F/BW/VL, was detected).
#[inline]
fn wide() -> bool {
    crate::qdot::isa() == crate::qdot::Isa::Avx512Vnni
}

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
    let qt = packed_queries(q, heads);
    scores_with(q, qt.as_deref(), heads, rows, stride, n, scale, scores);
}

/// The queries `[H, L]` in panels of 16 heads for the AVX2 score tiles (`None` where
/// they are not used).
fn packed_queries(q: &[f32], heads: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if crate::qdot::isa() != crate::qdot::Isa::Scalar && heads > 0 {
        let l = q.len() / heads;
        let mut qt = Vec::new();
        crate::attn_prefill::pack_keys(&[crate::Rows::dense(q, l)], heads, l, &mut qt);
        return Some(qt);
    }
    let _ = (q, heads);
    None
}

/// [`mqa_scores`] with the queries already packed by [`packed_queries`].
#[allow(clippy::too_many_arguments)]
fn scores_with(
    q: &[f32],
    qt: Option<&[f32]>,
    heads: usize,
    rows: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let l = q.len() / heads;
    assert!(l <= stride && rows.len() >= n * stride && scores.len() == heads * n);
    // A task's scores go to `out` as `[rows, H]` (`head_major` false: a chunk of a
    // larger step, transposed after) or `[H, rows]` (one task: straight into `scores`).
    let task = |ci: usize, out: &mut [f32], head_major: bool| {
        let u0 = ci * ROWS_PER_TASK;
        #[cfg(target_arch = "x86_64")]
        if let Some(qt) = qt {
            // SAFETY: `qt` exists only where AVX2 and FMA were detected (and AVX-512 F
            // where `wide`); it holds `H` queries of `L` values packed by `pack_keys`;
            // the assert above bounds every cache row.
            unsafe {
                if wide() {
                    x86::scores_tiles512(qt, heads, l, rows, stride, u0, out, scale, head_major)
                } else {
                    x86::scores_tiles(qt, heads, l, rows, stride, u0, out, scale, head_major)
                }
            };
            return;
        }
        let _ = qt;
        let m = out.len() / heads;
        for k in 0..m {
            let row = &rows[(u0 + k) * stride..(u0 + k) * stride + l];
            for h in 0..heads {
                let at = if head_major { h * m + k } else { k * heads + h };
                out[at] = crate::simd_f32::dot(&q[h * l..(h + 1) * l], row) * scale;
            }
        }
    };
    if n <= ROWS_PER_TASK {
        if n > 0 {
            task(0, scores, true);
        }
        return;
    }
    let mut st = vec![0.0f32; n * heads];
    st.par_chunks_mut(ROWS_PER_TASK * heads)
        .enumerate()
        .for_each(|(ci, chunk)| task(ci, chunk, false));
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
    if n <= ROWS_PER_TASK {
        // One task's worth: on this thread, straight into `out`.
        out.fill(0.0);
        values_add(probs, heads, n, rows, stride, 0, n, out);
        return;
    }
    let partial = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|ci| {
            let mut acc = vec![0.0f32; heads * c];
            let (u0, u1) = (ci * ROWS_PER_TASK, ((ci + 1) * ROWS_PER_TASK).min(n));
            values_add(probs, heads, n, rows, stride, u0, u1, &mut acc);
            acc
        })
        .reduce_with(|mut a, b| {
            crate::simd_f32::add(&b, &mut a);
            a
        });
    if let Some(p) = partial {
        out.copy_from_slice(&p);
    }
}

/// `acc[h] += Σ_{u0 ≤ u < u1} probs[h][u] · rows[u][..C]` (`probs` is `[H, n]`).
#[allow(clippy::too_many_arguments)]
fn values_add(
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
    assert!(c <= stride && rows.len() >= u1 * stride && probs.len() == heads * n && u1 <= n);
    #[cfg(target_arch = "x86_64")]
    if crate::qdot::isa() != crate::qdot::Isa::Scalar && c.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA were detected (and AVX-512 F where `wide`); the assert
        // above bounds every row and probability read.
        unsafe {
            if wide() && c.is_multiple_of(16) {
                x86::values_rows512(probs, heads, n, rows, stride, u0, u1, acc)
            } else {
                x86::values_rows(probs, heads, n, rows, stride, u0, u1, acc)
            }
        };
        return;
    }
    for u in u0..u1 {
        let row = &rows[u * stride..u * stride + c];
        for h in 0..heads {
            crate::simd_f32::axpy(probs[h * n + u], row, &mut acc[h * c..(h + 1) * c]);
        }
    }
}

/// Flash-decoding's running state over some blocks of cache rows: per head the
/// largest score seen, `Σ exp(score − max)` and `Σ exp(score − max) · row[..C]`.
struct Running {
    /// Per head: the largest score so far (−∞ before any row).
    max: Vec<f32>,
    /// Per head: `Σ exp(score − max)`.
    sum: Vec<f32>,
    /// `[H, C]`: `Σ exp(score − max) · row[..C]`.
    out: Vec<f32>,
    /// One block's scores, `[H, n]` (scratch kept across the blocks a task runs).
    s: Vec<f32>,
}

impl Running {
    fn new(heads: usize, c: usize) -> Self {
        Running {
            max: vec![f32::NEG_INFINITY; heads],
            sum: vec![0.0; heads],
            out: vec![0.0; heads * c],
            s: Vec::new(),
        }
    }

    /// Folds `n` rows of `stride` values into the state: their scores, then per head
    /// the old sums rescaled to the new maximum, then their weighted values added
    /// in place (no per-block buffers).
    #[allow(clippy::too_many_arguments)]
    fn add_rows(
        &mut self,
        q: &[f32],
        qt: Option<&[f32]>,
        heads: usize,
        rows: &[f32],
        stride: usize,
        n: usize,
        scale: f32,
    ) {
        let c = self.out.len() / heads;
        self.s.resize(heads * n, 0.0);
        scores_with(q, qt, heads, rows, stride, n, scale, &mut self.s);
        for h in 0..heads {
            let row = &mut self.s[h * n..(h + 1) * n];
            let m = crate::simd_f32::max(row).max(self.max[h]);
            if m == f32::NEG_INFINITY {
                // Nothing finite yet: these rows weigh nothing.
                row.fill(0.0);
                continue;
            }
            let r = crate::simd_f32::exp(self.max[h] - m);
            if r != 1.0 {
                self.sum[h] *= r;
                self.out[h * c..(h + 1) * c]
                    .iter_mut()
                    .for_each(|v| *v *= r);
            }
            self.max[h] = m;
            self.sum[h] += crate::simd_f32::exp_sum(row, m);
        }
        values_add(&self.s, heads, n, rows, stride, 0, n, &mut self.out);
    }

    /// The state over both states' rows.
    fn merge(mut self, other: Running) -> Running {
        let c = self.out.len() / self.max.len().max(1);
        for h in 0..self.max.len() {
            let m = self.max[h].max(other.max[h]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (ra, rb) = (
                crate::simd_f32::exp(self.max[h] - m),
                crate::simd_f32::exp(other.max[h] - m),
            );
            let o = &mut self.out[h * c..(h + 1) * c];
            o.iter_mut().for_each(|v| *v *= ra);
            crate::simd_f32::axpy(rb, &other.out[h * c..(h + 1) * c], o);
            self.sum[h] = self.sum[h] * ra + other.sum[h] * rb;
            self.max[h] = m;
        }
        self
    }
}

/// One block of a paged cache's rows, as the cache stores them.
#[derive(Clone, Copy, Debug)]
pub enum Block<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE half-precision values (half the memory and the bytes read per step).
    F16(&'a [half::f16]),
}

impl Block<'_> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            Block::F32(r) => r.len(),
            Block::F16(r) => r.len(),
        }
    }

    /// Whether the block holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `out.len()` values as f32 into `out`.
    pub fn write_f32(&self, out: &mut [f32]) {
        let len = out.len();
        match self {
            Block::F32(r) => out.copy_from_slice(&r[..len]),
            Block::F16(r) => {
                #[cfg(target_arch = "x86_64")]
                if crate::qdot::isa() != crate::qdot::Isa::Scalar {
                    // SAFETY: a non-scalar ISA means AVX2, FMA and F16C were detected;
                    // `widen_f16` reads `out.len()` values, which `r[..len]` holds.
                    unsafe { x86::widen_f16(&r[..len], out) };
                    return;
                }
                // Elsewhere `half`'s slice conversion, which on F16C machines makes a
                // call per eight values: 10% of a depth-4096 decode token in `perf`
                // before the inline loop above.
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&r[..len], out)
            }
        }
    }
}

thread_local! {
    /// One f16 block widened to f32 (147 KB for a 64-row V2 page): it stays in L2
    /// while the block's scores and weighted sum read it.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Softmax attention of `H` query vectors over cache rows held in blocks (a paged
/// cache): `out[h] = Σ_u softmax_u(scale · q[h] · rows[u][..L]) · rows[u][..C]` over
/// the first `visible` rows, where block `i` holds rows `i·B..` (`B = blocks[0].len() /
/// stride`) of `stride` values each. Each block's scores, exponentials and weighted sum
/// are computed while the block is in cache (blocks in parallel; an f16 block is
/// widened to f32 first), then the blocks are merged by rescaling with their maxima
/// (as flash-decoding does), so the cache is read once per step instead of once for
/// the scores and again for the values.
#[allow(clippy::too_many_arguments)]
pub fn mqa_blocks(
    q: &[f32],
    heads: usize,
    blocks: &[Block<'_>],
    stride: usize,
    visible: usize,
    c: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert_eq!(out.len(), heads * c);
    let per = blocks.first().map_or(1, |b| (b.len() / stride).max(1));
    let qt = packed_queries(q, heads);
    let fold = |mut acc: Running, (bi, rows): (usize, &Block<'_>)| -> Running {
        let u0 = bi * per;
        let n = (rows.len() / stride).min(visible.saturating_sub(u0));
        if n == 0 {
            return acc;
        }
        match rows {
            Block::F32(r) => acc.add_rows(q, qt.as_deref(), heads, r, stride, n, scale),
            Block::F16(_) => WIDE.with_borrow_mut(|wide| {
                wide.resize(n * stride, 0.0);
                rows.write_f32(wide);
                acc.add_rows(q, qt.as_deref(), heads, wide, stride, n, scale)
            }),
        }
        acc
    };
    let state = if blocks.len() > 1 {
        // A few runs of consecutive blocks per thread: each run keeps one state
        // (a 32 KB sum for V2-Lite) instead of one per block.
        let min_len = (blocks.len() / (4 * rayon::current_num_threads())).max(1);
        blocks
            .par_iter()
            .enumerate()
            .with_min_len(min_len)
            .fold(|| Running::new(heads, c), fold)
            .reduce_with(Running::merge)
    } else {
        Some(blocks.iter().enumerate().fold(Running::new(heads, c), fold))
    };
    out.fill(0.0);
    let Some(state) = state else { return };
    for h in 0..heads {
        if state.max[h] == f32::NEG_INFINITY {
            continue;
        }
        let inv = 1.0 / state.sum[h];
        for (o, v) in out[h * c..(h + 1) * c]
            .iter_mut()
            .zip(&state.out[h * c..(h + 1) * c])
        {
            *o = v * inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::attn_prefill::x86::tile_6x16;
    use crate::attn_prefill::MR;
    use std::arch::x86_64::*;

    /// `out[i] = src[i]` widened from IEEE half precision, eight values per
    /// `vcvtph2ps`, the tail one value at a time.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16(src: &[half::f16], out: &mut [f32]) {
        assert_eq!(src.len(), out.len());
        let n = out.len();
        let (sp, op) = (src.as_ptr() as *const __m128i, out.as_mut_ptr());
        let mut i = 0;
        while i + 32 <= n {
            for j in 0..4 {
                let h = _mm_loadu_si128(sp.add(i / 8 + j));
                _mm256_storeu_ps(op.add(i + 8 * j), _mm256_cvtph_ps(h));
            }
            i += 32;
        }
        while i + 8 <= n {
            _mm256_storeu_ps(op.add(i), _mm256_cvtph_ps(_mm_loadu_si128(sp.add(i / 8))));
            i += 8;
        }
        for k in i..n {
            out[k] = src[k].to_f32();
        }
    }

    /// Requests towards L2 the first `l` values of `count` rows from row `first`.
    #[inline(always)]
    unsafe fn prefetch_rows(rows: &[f32], stride: usize, first: usize, count: usize, l: usize) {
        for i in 0..count {
            let np = rows.as_ptr().add((first + i) * stride);
            for off in (0..l).step_by(16) {
                _mm_prefetch::<_MM_HINT_T1>(np.add(off) as *const i8);
            }
        }
    }

    /// A tile's scores (`tmp`: `kr` rows from row `k`, 16 heads of panel `hp` each)
    /// into `out`, `[H, n]` when `head_major`, else `[n, H]`.
    #[inline(always)]
    fn scatter_scores(
        tmp: &[f32],
        (k, kr): (usize, usize),
        hp: usize,
        (heads, n): (usize, usize),
        head_major: bool,
        out: &mut [f32],
    ) {
        let hn = (heads - hp * 16).min(16);
        for i in 0..kr {
            if head_major {
                for t in 0..hn {
                    out[(hp * 16 + t) * n + k + i] = tmp[i * 16 + t];
                }
            } else {
                out[(k + i) * heads + hp * 16..(k + i) * heads + hp * 16 + hn]
                    .copy_from_slice(&tmp[i * 16..i * 16 + hn]);
            }
        }
    }

    /// Scores of cache rows `u0..u0 + out.len() / heads` (`out` is `[rows, H]`, or
    /// `[H, rows]` when `head_major`): six rows broadcast against a panel of 16 packed
    /// queries per register tile (see [`tile_6x16`]); a row remainder repeats the
    /// last row, its results dropped.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_tiles(
        qt: &[f32],
        heads: usize,
        l: usize,
        rows: &[f32],
        stride: usize,
        u0: usize,
        out: &mut [f32],
        scale: f32,
        head_major: bool,
    ) {
        let n = out.len() / heads;
        let vs = _mm256_set1_ps(scale);
        let mut tmp = [0.0f32; MR * 16];
        debug_assert!(qt.len() >= heads.div_ceil(16) * l * 16);
        for k in (0..n).step_by(MR) {
            let kr = (n - k).min(MR);
            let rp: [*const f32; MR] =
                std::array::from_fn(|i| rows.as_ptr().add((u0 + k + i.min(kr - 1)) * stride));
            // The next tile's rows, towards L2 while this one computes: the row
            // broadcasts otherwise wait on memory (six 2.3 KB streams per tile).
            prefetch_rows(
                rows,
                stride,
                u0 + k + MR,
                (n - k).saturating_sub(MR).min(MR),
                l,
            );
            for hp in 0..heads.div_ceil(16) {
                tile_6x16(
                    rp,
                    qt.as_ptr().add(hp * l * 16),
                    l,
                    vs,
                    tmp.as_mut_ptr(),
                    16,
                );
                scatter_scores(&tmp, (k, kr), hp, (heads, n), head_major, out);
            }
        }
    }

    /// [`scores_tiles`] on 512-bit vectors: eight rows broadcast against a panel of 16
    /// packed queries (one vector) per register tile, eight accumulators.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_tiles512(
        qt: &[f32],
        heads: usize,
        l: usize,
        rows: &[f32],
        stride: usize,
        u0: usize,
        out: &mut [f32],
        scale: f32,
        head_major: bool,
    ) {
        const R: usize = 8;
        let n = out.len() / heads;
        let vs = _mm512_set1_ps(scale);
        let mut tmp = [0.0f32; R * 16];
        debug_assert!(qt.len() >= heads.div_ceil(16) * l * 16);
        for k in (0..n).step_by(R) {
            let kr = (n - k).min(R);
            let rp: [*const f32; R] =
                std::array::from_fn(|i| rows.as_ptr().add((u0 + k + i.min(kr - 1)) * stride));
            // The next tile's rows, towards L2 while this one computes.
            prefetch_rows(
                rows,
                stride,
                u0 + k + R,
                (n - k).saturating_sub(R).min(R),
                l,
            );
            for hp in 0..heads.div_ceil(16) {
                let qp = qt.as_ptr().add(hp * l * 16);
                // Even and odd values in separate accumulators: eight chains of
                // FMAs left the loop waiting on their latency.
                let mut acc = [_mm512_setzero_ps(); R];
                let mut acc2 = [_mm512_setzero_ps(); R];
                let mut j = 0;
                while j + 2 <= l {
                    let q0 = _mm512_loadu_ps(qp.add(j * 16));
                    let q1 = _mm512_loadu_ps(qp.add(j * 16 + 16));
                    for i in 0..R {
                        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(*rp[i].add(j)), q0, acc[i]);
                        acc2[i] = _mm512_fmadd_ps(_mm512_set1_ps(*rp[i].add(j + 1)), q1, acc2[i]);
                    }
                    j += 2;
                }
                if j < l {
                    let q0 = _mm512_loadu_ps(qp.add(j * 16));
                    for i in 0..R {
                        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(*rp[i].add(j)), q0, acc[i]);
                    }
                }
                for (i, (a, b)) in acc.iter().zip(&acc2).enumerate() {
                    let v = _mm512_mul_ps(_mm512_add_ps(*a, *b), vs);
                    _mm512_storeu_ps(tmp.as_mut_ptr().add(i * 16), v);
                }
                scatter_scores(&tmp, (k, kr), hp, (heads, n), head_major, out);
            }
        }
    }

    /// [`values_rows`] on 512-bit vectors (`C` a multiple of 16): 32 columns of eight
    /// heads in sixteen registers across the rows (two loads and eight broadcasts
    /// feed sixteen FMAs), a 16-column tail as eight heads by one.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn values_rows512(
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
        debug_assert!(c.is_multiple_of(16));
        for h0 in (0..heads).step_by(8) {
            let args = (probs, n, rows, stride, u0, u1, h0, c, acc.as_mut_ptr());
            match heads - h0 {
                1 => values_heads512::<1>(args),
                2 => values_heads512::<2>(args),
                3 => values_heads512::<3>(args),
                4 => values_heads512::<4>(args),
                5 => values_heads512::<5>(args),
                6 => values_heads512::<6>(args),
                7 => values_heads512::<7>(args),
                _ => values_heads512::<8>(args),
            }
        }
    }

    /// `HN` heads from `h0` of [`values_rows512`].
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::type_complexity)]
    unsafe fn values_heads512<const HN: usize>(
        (probs, n, rows, stride, u0, u1, h0, c, ap): (
            &[f32],
            usize,
            &[f32],
            usize,
            usize,
            usize,
            usize,
            usize,
            *mut f32,
        ),
    ) {
        let rp = rows.as_ptr();
        let pp: [*const f32; HN] = std::array::from_fn(|t| probs.as_ptr().add((h0 + t) * n));
        let mut j = 0;
        while j + 32 <= c {
            let mut v0: [__m512; HN] =
                std::array::from_fn(|t| _mm512_loadu_ps(ap.add((h0 + t) * c + j)));
            let mut v1: [__m512; HN] =
                std::array::from_fn(|t| _mm512_loadu_ps(ap.add((h0 + t) * c + j + 16)));
            for u in u0..u1 {
                let x0 = _mm512_loadu_ps(rp.add(u * stride + j));
                let x1 = _mm512_loadu_ps(rp.add(u * stride + j + 16));
                for t in 0..HN {
                    let p = _mm512_set1_ps(*pp[t].add(u));
                    v0[t] = _mm512_fmadd_ps(p, x0, v0[t]);
                    v1[t] = _mm512_fmadd_ps(p, x1, v1[t]);
                }
            }
            for t in 0..HN {
                _mm512_storeu_ps(ap.add((h0 + t) * c + j), v0[t]);
                _mm512_storeu_ps(ap.add((h0 + t) * c + j + 16), v1[t]);
            }
            j += 32;
        }
        if j < c {
            let mut v: [__m512; HN] =
                std::array::from_fn(|t| _mm512_loadu_ps(ap.add((h0 + t) * c + j)));
            for u in u0..u1 {
                let x = _mm512_loadu_ps(rp.add(u * stride + j));
                for t in 0..HN {
                    v[t] = _mm512_fmadd_ps(_mm512_set1_ps(*pp[t].add(u)), x, v[t]);
                }
            }
            for (t, vt) in v.iter().enumerate() {
                _mm512_storeu_ps(ap.add((h0 + t) * c + j), *vt);
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
            let blocks: Vec<Block> = rows.chunks(per * stride).map(Block::F32).collect();
            let mut got = vec![0.0; heads * c];
            mqa_blocks(&q, heads, &blocks, stride, visible, c, 0.7, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{n} {visible}: {g} vs {w}"
                );
            }
            // f16 blocks compute what f32 blocks of the same (rounded) values compute.
            let halves: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f32(x)).collect();
            let rounded: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
            let b16: Vec<Block> = halves.chunks(per * stride).map(Block::F16).collect();
            let b32: Vec<Block> = rounded.chunks(per * stride).map(Block::F32).collect();
            let mut g16 = vec![0.0; heads * c];
            let mut g32 = vec![0.0; heads * c];
            mqa_blocks(&q, heads, &b16, stride, visible, c, 0.7, &mut g16);
            mqa_blocks(&q, heads, &b32, stride, visible, c, 0.7, &mut g32);
            assert_eq!(g16, g32);
        }
    }

    #[test]
    fn f16_blocks_widen_exactly() {
        // Every finite, infinite, subnormal and NaN half: the vector widening and
        // `half`'s scalar conversion give the same bits (NaNs stay NaN).
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        for len in [all.len(), 577, 31, 8, 3, 0] {
            let src = &all[all.len() - len..];
            let mut got = vec![0.0f32; len];
            Block::F16(src).write_f32(&mut got);
            for (g, h) in got.iter().zip(src) {
                let w = h.to_f32();
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{h:?}"
                );
            }
        }
    }

    #[test]
    fn shared_cache_attention_matches_per_head_loops() {
        // Odd head and row counts exercise the tiles' edges (rows in sixes, heads in
        // panels of sixteen: 21 heads are a full panel and a partial one).
        for heads in [5, 21] {
            shared_cache_attention_case(heads);
        }
    }

    fn shared_cache_attention_case(heads: usize) {
        let (l, stride, n) = (40, 52, 301);
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
        // Each x86 shape the CPU runs, whichever the dispatch picks.
        #[cfg(target_arch = "x86_64")]
        {
            let mut qt = Vec::new();
            crate::attn_prefill::pack_keys(&[crate::Rows::dense(&q, l)], heads, l, &mut qt);
            let mut shapes = Vec::new();
            if crate::qdot::x86::has_avx2() {
                let mut o = vec![0.0; heads * n];
                // SAFETY: AVX2 and FMA were detected; `qt` packs the queries.
                unsafe { x86::scores_tiles(&qt, heads, l, &rows, stride, 0, &mut o, 0.5, true) };
                shapes.push(("avx2", o));
            }
            if crate::qdot::x86::has_avx512vnni() {
                let mut o = vec![0.0; heads * n];
                // SAFETY: AVX-512 F, AVX2 and FMA were detected; as above.
                unsafe { x86::scores_tiles512(&qt, heads, l, &rows, stride, 0, &mut o, 0.5, true) };
                shapes.push(("avx512", o));
            }
            for (name, o) in shapes {
                for (a, b) in o.iter().zip(&s) {
                    assert!((a - b).abs() < 1e-4, "{name} scores: {a} vs {b}");
                }
            }
        }
        // 32 columns: whole 16-column tiles (AVX-512: one 32-column tile); 48: a
        // 16-column tail; 40: an 8-column tail (AVX2 only).
        for c in [32, 40, 48] {
            let mut outs = vec![("dispatched", vec![0.0; heads * c])];
            mqa_values(&s, heads, &rows, stride, n, &mut outs[0].1);
            #[cfg(target_arch = "x86_64")]
            {
                if crate::qdot::x86::has_avx2() {
                    let mut o = vec![0.0; heads * c];
                    // SAFETY: AVX2 and FMA were detected; the sizes agree.
                    unsafe { x86::values_rows(&s, heads, n, &rows, stride, 0, n, &mut o) };
                    outs.push(("avx2", o));
                }
                if crate::qdot::x86::has_avx512vnni() && c % 16 == 0 {
                    let mut o = vec![0.0; heads * c];
                    // SAFETY: AVX-512 F, AVX2 and FMA were detected; the sizes agree.
                    unsafe { x86::values_rows512(&s, heads, n, &rows, stride, 0, n, &mut o) };
                    outs.push(("avx512", o));
                }
            }
            for (name, o) in &outs {
                for h in 0..heads {
                    for j in 0..c {
                        let want: f32 = (0..n).map(|u| s[h * n + u] * rows[u * stride + j]).sum();
                        assert!(
                            (o[h * c + j] - want).abs() < 1e-3 * want.abs().max(1.0),
                            "{name} values c={c}"
                        );
                    }
                }
            }
        }
    }
}
