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

/// Whether bf16 cache blocks run the `vdpbf16ps` kernels (AVX-512 BF16 beside the
/// [`wide`] set). Elsewhere a bf16 block is widened to f32 and computed with the same
/// roundings (queries and probabilities to bf16 first; bf16 products are exact in
/// f32), so every CPU computes the same sums up to their order.
#[inline]
pub(crate) fn bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| wide() && crate::qdot::x86::has_avx512bf16())
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dst[i]` = `src[i]` rounded to bfloat16 (to nearest, ties to even), as bits.
pub(crate) fn to_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if bf16_dot() {
        // SAFETY: `bf16_dot` means AVX-512 F/BW/VL and BF16 were detected; the
        // lengths agree (asserted above).
        unsafe { x86::to_bf16(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = half::bf16::from_f32(v).to_bits();
    }
}

/// Each value rounded to bfloat16 in place (kept as f32: what the bf16 kernels
/// multiply).
fn round_bf16(v: &mut [f32]) {
    let mut bits = vec![0u16; v.len()];
    to_bf16(v, &mut bits);
    for (x, b) in v.iter_mut().zip(bits) {
        *x = f32::from_bits((b as u32) << 16);
    }
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
    scores_with(
        q,
        qt.as_ref().map(Packed::get),
        heads,
        rows,
        stride,
        n,
        scale,
        scores,
    );
}

/// The queries `[H, L]` packed for the x86 score kernels: panels of 16 heads for the
/// AVX2 tiles, panels of eight heads interleaved per 16 values for the AVX-512 ones,
/// in a buffer and from where in it (its first 64-byte boundary, [`crate::align64`]);
/// `None` where neither kernel runs. [`Packed::get`] is what the kernels read.
fn packed_queries(q: &[f32], heads: usize) -> Option<Packed<f32>> {
    #[cfg(target_arch = "x86_64")]
    if crate::qdot::isa() != crate::qdot::Isa::Scalar && heads > 0 {
        let l = q.len() / heads;
        let mut buf = Vec::new();
        let at = if wide() {
            x86::pack_queries512(q, heads, l, &mut buf)
        } else {
            crate::attn_prefill::pack_keys(&[crate::Rows::dense(q, l)], heads, l, &mut buf)
        };
        return Some(Packed { buf, at });
    }
    let _ = (q, heads);
    None
}

/// Packed queries: `buf[at..]`, `at` its first 64-byte boundary.
struct Packed<T> {
    buf: Vec<T>,
    at: usize,
}

impl<T> Packed<T> {
    fn get(&self) -> &[T] {
        &self.buf[self.at..]
    }
}

/// The queries `[H, L]` rounded to bf16 and packed for the `vdpbf16ps` score kernel
/// (see `pack_queries_bf16`), where [`bf16_dot`].
fn packed_queries_bf16(q: &[f32], heads: usize) -> Option<Packed<u16>> {
    #[cfg(target_arch = "x86_64")]
    if bf16_dot() && heads > 0 {
        let mut buf = Vec::new();
        let at = x86::pack_queries_bf16(q, heads, q.len() / heads, &mut buf);
        return Some(Packed { buf, at });
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
            // SAFETY: `qt` exists only where AVX2 and FMA were detected (AVX-512
            // F/BW/VL and F16C too where `wide`); it holds `H` queries of `L` values
            // packed for that ISA's kernel by `packed_queries`; the assert above (and
            // the AVX-512 kernel's own) bounds every cache row.
            unsafe {
                if wide() {
                    x86::scores_dot512(
                        qt,
                        heads,
                        l,
                        (rows, &[]),
                        stride,
                        u0,
                        out,
                        scale,
                        head_major,
                    )
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
    if wide() {
        // SAFETY: `wide` means AVX-512 F/BW/VL (with AVX2, FMA and F16C) were
        // detected; the kernel asserts its bounds.
        unsafe { x86::values_dot512(probs, heads, n, rows, stride, u0, u1, acc) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::qdot::isa() != crate::qdot::Isa::Scalar && c.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA were detected; the assert above bounds every row and
        // probability read.
        unsafe { x86::values_rows(probs, heads, n, rows, stride, u0, u1, acc) };
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
    /// One bf16 block's probabilities as bf16 bits, `[H, n rounded up to even]`
    /// (scratch, as `s`).
    pb: Vec<u16>,
}

impl Running {
    fn new(heads: usize, c: usize) -> Self {
        Running {
            max: vec![f32::NEG_INFINITY; heads],
            sum: vec![0.0; heads],
            out: vec![0.0; heads * c],
            s: Vec::new(),
            pb: Vec::new(),
        }
    }

    /// Folds the first `n` rows (of `stride` values) of `block` into the state: their
    /// scores, then per head the old sums rescaled to the new maximum, then their
    /// weighted values added in place (no per-block buffers). The AVX-512 kernels read
    /// an f16 or bf16 block where it lies, and ask for the `next` block's rows to be
    /// fetched meanwhile; elsewhere the block is widened into [`WIDE`] first. For a
    /// bf16 block `q` holds the queries rounded to bf16 (`qb`: packed for
    /// `vdpbf16ps`, where it runs), and the probabilities are rounded to bf16 before
    /// they weigh the rows.
    #[allow(clippy::too_many_arguments)]
    fn add_block(
        &mut self,
        q: &[f32],
        (qt, qb, qa): PackedQueries<'_>,
        heads: usize,
        (block, next): (&Block<'_>, Option<&Block<'_>>),
        stride: usize,
        n: usize,
        scale: f32,
    ) {
        self.s.resize(heads * n, 0.0);
        #[cfg(target_arch = "x86_64")]
        if let (Some(qa), Block::Bf16(r)) = (qa, block) {
            // `qa` exists only where `amx::mqa_fits` said yes for these sizes.
            let (l, c) = (q.len() / heads, self.out.len() / heads);
            let x = match next {
                Some(Block::Bf16(x)) => x,
                _ => &[][..],
            };
            crate::amx::mqa_scores(qa, heads, l, (r, x), stride, n, scale, &mut self.s);
            self.softmax_step(heads, n);
            crate::amx::mqa_values(&self.s, heads, n, r, stride, c, &mut self.out);
            return;
        }
        let _ = qa;
        #[cfg(target_arch = "x86_64")]
        if wide() {
            let l = q.len() / heads;
            // SAFETY: `wide` means AVX-512 F/BW/VL (with AVX2, FMA and F16C) were
            // detected; `qt` holds the queries packed by `pack_queries512`, and `qb`
            // exists only where AVX-512 BF16 was detected too, holding them packed by
            // `pack_queries_bf16`; the kernels assert their bounds.
            unsafe {
                match (block, next, qt, qb) {
                    (Block::Bf16(r), next, _, Some(qb)) => {
                        let x = match next {
                            Some(Block::Bf16(x)) => x,
                            _ => &[][..],
                        };
                        return self.add_rows_bf16(qb, heads, l, (r, x), stride, n, scale);
                    }
                    (Block::F32(r), Some(Block::F32(x)), Some(qt), _) => {
                        return self.add_rows512(qt, heads, l, (r, x), stride, n, scale)
                    }
                    (Block::F32(r), _, Some(qt), _) => {
                        return self.add_rows512(qt, heads, l, (r, &[]), stride, n, scale)
                    }
                    (Block::F16(r), Some(Block::F16(x)), Some(qt), _) => {
                        return self.add_rows512(qt, heads, l, (r, x), stride, n, scale)
                    }
                    (Block::F16(r), _, Some(qt), _) => {
                        return self.add_rows512(qt, heads, l, (r, &[]), stride, n, scale)
                    }
                    _ => {}
                }
            }
        }
        let _ = (next, qb);
        let round = matches!(block, Block::Bf16(_));
        let mut add = |rows: &[f32]| {
            scores_with(q, qt, heads, rows, stride, n, scale, &mut self.s);
            self.softmax_step(heads, n);
            if round {
                round_bf16(&mut self.s);
            }
            values_add(&self.s, heads, n, rows, stride, 0, n, &mut self.out);
        };
        match block {
            Block::F32(r) => add(r),
            Block::F16(_) | Block::Bf16(_) => WIDE.with_borrow_mut(|wide| {
                wide.resize(n * stride, 0.0);
                block.write_f32(wide);
                add(wide)
            }),
        }
    }

    /// [`Self::add_block`] on the `vdpbf16ps` kernels: `rows` read in place, `next`
    /// prefetched meanwhile; the probabilities rounded to bf16 pairs for the
    /// weighted sum.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 were detected; `qb` holds the queries packed by
    /// `pack_queries_bf16` (the kernels assert every other bound).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn add_rows_bf16(
        &mut self,
        qb: &[u16],
        heads: usize,
        l: usize,
        (rows, next): (&[half::bf16], &[half::bf16]),
        stride: usize,
        n: usize,
        scale: f32,
    ) {
        x86::scores_bf16(qb, heads, l, (rows, next), stride, &mut self.s, scale);
        self.softmax_step(heads, n);
        let np = n.next_multiple_of(2);
        self.pb.clear();
        self.pb.resize(heads * np, 0);
        for h in 0..heads {
            x86::to_bf16(
                &self.s[h * n..(h + 1) * n],
                &mut self.pb[h * np..h * np + n],
            );
        }
        x86::values_bf16(&self.pb, heads, np, n, rows, stride, &mut self.out)
    }

    /// [`Self::add_block`] on the AVX-512 kernels: `rows` (f16 or f32) read in place,
    /// `next` (the following block's rows, possibly none) prefetched meanwhile.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, AVX2, FMA and F16C were detected; `qt` holds the queries
    /// packed by `pack_queries512` (the kernels assert every other bound).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn add_rows512<T: x86::Lane16>(
        &mut self,
        qt: &[f32],
        heads: usize,
        l: usize,
        (rows, next): (&[T], &[T]),
        stride: usize,
        n: usize,
        scale: f32,
    ) {
        x86::scores_dot512(
            qt,
            heads,
            l,
            (rows, next),
            stride,
            0,
            &mut self.s,
            scale,
            true,
        );
        self.softmax_step(heads, n);
        x86::values_dot512(&self.s, heads, n, rows, stride, 0, n, &mut self.out)
    }

    /// Turns one block's scores (`s`, `[H, n]`) into `exp(score − max)` under the
    /// running maxima, rescaling the sums so far where a maximum grew.
    fn softmax_step(&mut self, heads: usize, n: usize) {
        let c = self.out.len() / heads;
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

/// A step's queries packed for the kernels that run it: for the f32 kernels, for
/// `vdpbf16ps`, and as AMX B tiles (`crate::amx::mqa_queries`); each where used.
type PackedQueries<'a> = (Option<&'a [f32]>, Option<&'a [u16]>, Option<&'a [u16]>);

/// One block of a paged cache's rows, as the cache stores them.
#[derive(Clone, Copy, Debug)]
pub enum Block<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE half-precision values (half the memory and the bytes read per step).
    F16(&'a [half::f16]),
    /// bfloat16 values (as much memory as f16, with f32's range and an 8-bit
    /// significand): attention over them multiplies in bf16 (`vdpbf16ps` where the
    /// CPU has AVX-512 BF16), with the queries and probabilities rounded to bf16 and
    /// every sum in f32.
    Bf16(&'a [half::bf16]),
}

impl Block<'_> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            Block::F32(r) => r.len(),
            Block::F16(r) => r.len(),
            Block::Bf16(r) => r.len(),
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
            // Exact: a bf16 is an f32's upper half (a loop the compiler vectorises).
            Block::Bf16(r) => {
                for (o, v) in out.iter_mut().zip(&r[..len]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
        }
    }
}

thread_local! {
    /// One f16 block widened to f32 for the AVX2 and portable kernels (147 KB for a
    /// 64-row V2 page): it stays in L2
    /// while the block's scores and weighted sum read it.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Softmax attention of `H` query vectors over cache rows held in blocks (a paged
/// cache): `out[h] = Σ_u softmax_u(scale · q[h] · rows[u][..L]) · rows[u][..C]` over
/// the first `visible` rows, where block `i` holds rows `i·B..` (`B = blocks[0].len() /
/// stride`) of `stride` values each. Each block's scores, exponentials and weighted sum
/// are computed while the block is in cache (blocks in parallel; the AVX-512 kernels
/// read an f16 block in place, the others widen it to f32 first), then the blocks
/// are merged by rescaling with their maxima
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
    mqa_blocks_on(
        q,
        heads,
        blocks,
        stride,
        visible,
        c,
        scale,
        out,
        (bf16_dot(), true),
    )
}

/// [`mqa_blocks`], with bf16 blocks on the `vdpbf16ps` kernels only where `vdpbf16`
/// (which the caller has detected; the tests compare both ways), and on AMX tiles
/// where `tiles` and [`crate::amx::mqa_fits`] (tiles first).
#[allow(clippy::too_many_arguments)]
fn mqa_blocks_on(
    q: &[f32],
    heads: usize,
    blocks: &[Block<'_>],
    stride: usize,
    visible: usize,
    c: usize,
    scale: f32,
    out: &mut [f32],
    (vdpbf16, tiles): (bool, bool),
) {
    assert_eq!(out.len(), heads * c);
    let per = blocks.first().map_or(1, |b| (b.len() / stride).max(1));
    // bf16 blocks (a cache's blocks share one type): queries rounded to bf16, packed
    // as B tiles where the tiles run, else for `vdpbf16ps` where it runs; elsewhere
    // rounded in f32 for the f32 kernels.
    let bf16 = matches!(blocks.first(), Some(Block::Bf16(_)));
    let l = q.len() / heads.max(1);
    #[cfg(target_arch = "x86_64")]
    let qa = (bf16 && tiles && heads > 0 && crate::amx::mqa_fits(l, c)).then(|| {
        let mut a = Vec::new();
        crate::amx::mqa_queries(q, heads, &mut a);
        a
    });
    #[cfg(not(target_arch = "x86_64"))]
    let qa: Option<Vec<u16>> = {
        let _ = (l, tiles);
        None
    };
    let qb = if bf16 && vdpbf16 && qa.is_none() {
        packed_queries_bf16(q, heads)
    } else {
        None
    };
    let rounded;
    let q = if bf16 && qb.is_none() && qa.is_none() {
        let mut r = q.to_vec();
        round_bf16(&mut r);
        rounded = r;
        &rounded[..]
    } else {
        q
    };
    let qt = if qb.is_some() || qa.is_some() {
        None
    } else {
        packed_queries(q, heads)
    };
    let fold = |mut acc: Running, (bi, rows): (usize, &Block<'_>)| -> Running {
        let u0 = bi * per;
        let n = (rows.len() / stride).min(visible.saturating_sub(u0));
        if n == 0 {
            return acc;
        }
        let next = blocks.get(bi + 1);
        acc.add_block(
            q,
            (
                qt.as_ref().map(Packed::get),
                qb.as_ref().map(Packed::get),
                qa.as_deref(),
            ),
            heads,
            (rows, next),
            stride,
            n,
            scale,
        );
        acc
    };
    let state = if blocks.len() > 1 {
        // Runs of consecutive blocks handed out as the threads finish, one state
        // (a 32 KB sum for V2-Lite) per run, merged in run order (`fold_dynamic`):
        // rayon's split ended a step's attention with one thread folding an
        // eight-block leaf alone.
        crate::fold_dynamic(blocks.iter().enumerate(), || Running::new(heads, c), fold)
            .into_iter()
            .reduce(Running::merge)
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
    use crate::attn_prefill::x86::{bh, tile_6x16};
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

    /// Cache values the 512-bit kernels read straight from the rows: f32, or f16
    /// widened in the register (`vcvtph2ps`), so an f16 page is never copied.
    pub trait Lane16: Copy {
        /// Sixteen values from `p` as f32.
        unsafe fn load16(p: *const Self) -> __m512;
        /// The values from `p` whose bits are set in `k` (zero elsewhere) as f32.
        unsafe fn load_masked(p: *const Self, k: __mmask16) -> __m512;
    }

    impl Lane16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, k: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(k, p)
        }
    }

    impl Lane16 for half::f16 {
        #[inline(always)]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const half::f16, k: __mmask16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p as *const i16))
        }
    }

    /// Lane `i` of the result is the sum of `a[i]`'s sixteen lanes: 45 shuffles and
    /// adds for sixteen sums, where sixteen separate reductions take ~130.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn hsum16(a: &[__m512; 16]) -> __m512 {
        // Halve by 256-bit halves, then 128-bit lanes, then within lanes; the order
        // of the inputs makes lane `i` come out holding `a[i]`.
        let half = |x: __m512, y: __m512| {
            // 128-bit lanes [x0 x1 y0 y1] + [x2 x3 y2 y3]: x's sum in lanes 0–1.
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            )
        };
        let (b0, b1, b2, b3) = (
            half(a[0], a[4]),
            half(a[1], a[5]),
            half(a[2], a[6]),
            half(a[3], a[7]),
        );
        let (b4, b5, b6, b7) = (
            half(a[8], a[12]),
            half(a[9], a[13]),
            half(a[10], a[14]),
            half(a[11], a[15]),
        );
        // Each 128-bit lane one input's four partials: `quarter(half(a, b), half(c, d))`
        // holds a, b, c, d.
        let quarter = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        let (c0, c1, c2, c3) = (
            quarter(b0, b4),
            quarter(b1, b5),
            quarter(b2, b6),
            quarter(b3, b7),
        );
        // Within 128-bit lanes: [x0+x2, y0+y2, x1+x3, y1+y3].
        let pair = |x: __m512, y: __m512| {
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        };
        let (d0, d1) = (pair(c0, c1), pair(c2, c3));
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(d0, d1),
            _mm512_shuffle_ps::<0b11_10_11_10>(d0, d1),
        )
    }

    /// Heads per panel of [`scores_dot512`]'s packed queries.
    const QH: usize = 8;

    /// Packs `q` (`[H, L]`) for [`scores_dot512`]: per panel of [`QH`] heads, per 16
    /// values, the panel's heads one after another (`[H/8][L/16][8][16]`, rounded up
    /// with zeros), so a tile reads its queries at fixed offsets from one pointer;
    /// from the buffer's first 64-byte boundary, which it returns ([`crate::align64`]:
    /// unaligned query loads halved the kernel's speed).
    pub fn pack_queries512(q: &[f32], heads: usize, l: usize, out: &mut Vec<f32>) -> usize {
        let chunks = l.div_ceil(16);
        out.clear();
        let a = crate::resize_aligned(out, heads.div_ceil(QH) * chunks * QH * 16);
        for h in 0..heads {
            let (g, t) = (h / QH, h % QH);
            for (ci, src) in q[h * l..(h + 1) * l].chunks(16).enumerate() {
                let at = a + ((g * chunks + ci) * QH + t) * 16;
                out[at..at + src.len()].copy_from_slice(src);
            }
        }
        a
    }

    /// Scores of `n` cache rows from row `u0` (`out` is `[H, n]` when `head_major`, else
    /// `[n, H]`) as dot products along the row: a tile of two rows by eight queries
    /// keeps sixteen sums of sixteen lanes (ten loads feed sixteen FMAs), reduced
    /// together by [`hsum16`]. `qp` holds the queries packed by [`pack_queries512`], from
    /// the offset it returned.
    /// The rows are read where they lie, f16 or f32; a row remainder repeats the last
    /// row, its results dropped.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_dot512<T: Lane16>(
        qp: &[f32],
        heads: usize,
        l: usize,
        (rows, next): (&[T], &[T]),
        stride: usize,
        u0: usize,
        out: &mut [f32],
        scale: f32,
        head_major: bool,
    ) {
        const R: usize = 2;
        let n = out.len() / heads;
        let chunks = l.div_ceil(16);
        assert!(
            qp.len() >= heads.div_ceil(QH) * chunks * QH * 16
                && l <= stride
                && rows.len() >= (u0 + n) * stride
        );
        let vs = _mm512_set1_ps(scale);
        let tail = crate::first_lanes(l % 16);
        let mut tmp = [0.0f32; 16];
        for g in 0..heads.div_ceil(QH) {
            let (h0, hn) = (g * QH, (heads - g * QH).min(QH));
            let panel = qp.as_ptr().add(g * chunks * QH * 16);
            for k in (0..n).step_by(R) {
                let kr = (n - k).min(R);
                let r0 = rows.as_ptr().add((u0 + k) * stride);
                let r1 = r0.add((kr - 1) * stride);
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut step = |x0: __m512, x1: __m512, qc: *const f32| {
                    for t in 0..QH {
                        let qv = _mm512_loadu_ps(qc.add(t * 16));
                        acc[t] = _mm512_fmadd_ps(x0, qv, acc[t]);
                        acc[QH + t] = _mm512_fmadd_ps(x1, qv, acc[QH + t]);
                    }
                };
                // The next tile's rows, towards L1 a line per step while this one
                // computes (they come from L2: a page is larger than L1); and the
                // same rows of the block that follows, from memory towards L2, a
                // whole block ahead of their use.
                // (Wrapping arithmetic: past the last tile or block these addresses
                // lie outside the slices and are neither formed by `add` nor read.)
                let (n0, n1) = (r1.wrapping_add(stride), r1.wrapping_add(2 * stride));
                let ahead = k + R < n;
                let far = (k + R) * stride <= next.len();
                let (f0, f1) = (
                    next.as_ptr().wrapping_add(k * stride),
                    next.as_ptr().wrapping_add((k + kr - 1) * stride),
                );
                // One prefetch per 64-byte line: a step reads 32 bytes of f16 rows.
                let every = (64 / (16 * std::mem::size_of::<T>())).max(1);
                let mut j = 0;
                while j + 16 <= l {
                    let line = (j / 16).is_multiple_of(every);
                    if ahead && line {
                        _mm_prefetch::<_MM_HINT_T0>(n0.wrapping_add(j) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(n1.wrapping_add(j) as *const i8);
                    }
                    if far && line {
                        _mm_prefetch::<_MM_HINT_T1>(f0.wrapping_add(j) as *const i8);
                        _mm_prefetch::<_MM_HINT_T1>(f1.wrapping_add(j) as *const i8);
                    }
                    step(
                        T::load16(r0.add(j)),
                        T::load16(r1.add(j)),
                        panel.add(j * QH),
                    );
                    j += 16;
                }
                if j < l {
                    let (x0, x1) = (
                        T::load_masked(r0.add(j), tail),
                        T::load_masked(r1.add(j), tail),
                    );
                    step(x0, x1, panel.add(j * QH));
                }
                _mm512_storeu_ps(tmp.as_mut_ptr(), _mm512_mul_ps(hsum16(&acc), vs));
                for i in 0..kr {
                    for t in 0..hn {
                        let at = if head_major {
                            (h0 + t) * n + k + i
                        } else {
                            (k + i) * heads + h0 + t
                        };
                        out[at] = tmp[i * QH + t];
                    }
                }
            }
        }
    }

    /// `acc[h] += Σ_{u0 ≤ u < u1} probs[h][u] · rows[u][..C]` on 512-bit vectors: 32
    /// columns of eight heads in sixteen registers across the rows (two row loads and
    /// eight broadcast probabilities feed sixteen FMAs), a remainder of up to 16
    /// columns masked; rows read where they lie, f16 or f32. (Sixteen heads by 16
    /// columns, seventeen loads per sixteen FMAs, measured half as fast.)
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn values_dot512<T: Lane16>(
        probs: &[f32],
        heads: usize,
        n: usize,
        rows: &[T],
        stride: usize,
        u0: usize,
        u1: usize,
        acc: &mut [f32],
    ) {
        let c = acc.len() / heads;
        assert!(c <= stride && u1 <= n && probs.len() >= heads * n && rows.len() >= u1 * stride);
        for h0 in (0..heads).step_by(8) {
            let args = (probs, n, rows, stride, u0, u1, h0, c, acc.as_mut_ptr());
            match heads - h0 {
                1 => values_heads512::<T, 1>(args),
                2 => values_heads512::<T, 2>(args),
                3 => values_heads512::<T, 3>(args),
                4 => values_heads512::<T, 4>(args),
                5 => values_heads512::<T, 5>(args),
                6 => values_heads512::<T, 6>(args),
                7 => values_heads512::<T, 7>(args),
                _ => values_heads512::<T, 8>(args),
            }
        }
    }

    /// `HN` heads from `h0` of [`values_dot512`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::type_complexity)]
    unsafe fn values_heads512<T: Lane16, const HN: usize>(
        (probs, n, rows, stride, u0, u1, h0, c, ap): (
            &[f32],
            usize,
            &[T],
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
                let x0 = T::load16(rp.add(u * stride + j));
                let x1 = T::load16(rp.add(u * stride + j + 16));
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
        while j < c {
            let k = crate::first_lanes((c - j).min(16));
            let mut v: [__m512; HN] =
                std::array::from_fn(|t| _mm512_maskz_loadu_ps(k, ap.add((h0 + t) * c + j)));
            for u in u0..u1 {
                let x = T::load_masked(rp.add(u * stride + j), k);
                for t in 0..HN {
                    v[t] = _mm512_fmadd_ps(_mm512_set1_ps(*pp[t].add(u)), x, v[t]);
                }
            }
            for (t, vt) in v.iter().enumerate() {
                _mm512_mask_storeu_ps(ap.add((h0 + t) * c + j), k, *vt);
            }
            j += 16;
        }
    }

    /// `dst[i]` = `src[i]` rounded to bfloat16 (`vcvtneps2bf16`: to nearest, ties to
    /// even), as bits; sixteen values per instruction, the tail masked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        let n = src.len();
        let mut i = 0;
        while i < n {
            let k = crate::first_lanes((n - i).min(16));
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(
                k,
                src.as_ptr().add(i),
            )));
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, k, b);
            i += 16;
        }
    }

    /// Packs `q` (`[H, L]`) rounded to bf16 for [`scores_bf16`]: per panel of [`QH`]
    /// heads, per 32 values, the panel's heads one after another (`[H/8][L/32][8][32]`,
    /// rounded up with zeros), from the buffer's first 64-byte boundary, which it
    /// returns.
    pub fn pack_queries_bf16(q: &[f32], heads: usize, l: usize, out: &mut Vec<u16>) -> usize {
        let chunks = l.div_ceil(32);
        out.clear();
        out.resize(heads.div_ceil(QH) * chunks * QH * 32 + 31, 0);
        let a = out.as_ptr().align_offset(64).min(31);
        let mut row = vec![0u16; l];
        for h in 0..heads {
            super::to_bf16(&q[h * l..(h + 1) * l], &mut row);
            let (g, t) = (h / QH, h % QH);
            for (ci, src) in row.chunks(32).enumerate() {
                let at = a + ((g * chunks + ci) * QH + t) * 32;
                out[at..at + src.len()].copy_from_slice(src);
            }
        }
        a
    }

    /// [`scores_dot512`] on bf16 rows and queries (`[H, n]` out): `vdpbf16ps` does 32
    /// multiply-adds per instruction where an f32 FMA does 16. A tile of two rows by
    /// eight queries keeps sixteen sums; each step loads 32 values (one cache line) of
    /// both rows and the eight queries' matching 32. `qp` holds the queries packed by
    /// [`pack_queries_bf16`], from the offset it returned; `next` (the following
    /// block's rows, possibly none) is fetched towards L2 meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn scores_bf16(
        qp: &[u16],
        heads: usize,
        l: usize,
        (rows, next): (&[half::bf16], &[half::bf16]),
        stride: usize,
        out: &mut [f32],
        scale: f32,
    ) {
        const R: usize = 2;
        let n = out.len() / heads;
        let chunks = l.div_ceil(32);
        assert!(
            qp.len() >= heads.div_ceil(QH) * chunks * QH * 32
                && l <= stride
                && rows.len() >= n * stride
        );
        let vs = _mm512_set1_ps(scale);
        let tail = ((1u64 << (l % 32)) - 1) as __mmask32;
        let mut tmp = [0.0f32; 16];
        let rows = rows.as_ptr() as *const u16;
        let next_len = next.len();
        let next = next.as_ptr() as *const u16;
        for g in 0..heads.div_ceil(QH) {
            let (h0, hn) = (g * QH, (heads - g * QH).min(QH));
            let panel = qp.as_ptr().add(g * chunks * QH * 32);
            for k in (0..n).step_by(R) {
                let kr = (n - k).min(R);
                let r0 = rows.add(k * stride);
                let r1 = r0.add((kr - 1) * stride);
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut step = |x0: __m512i, x1: __m512i, qc: *const u16| {
                    let (x0, x1) = (bh(x0), bh(x1));
                    for t in 0..QH {
                        let qv = bh(_mm512_loadu_si512(qc.add(t * 32) as *const _));
                        acc[t] = _mm512_dpbf16_ps(acc[t], x0, qv);
                        acc[QH + t] = _mm512_dpbf16_ps(acc[QH + t], x1, qv);
                    }
                };
                // As in `scores_dot512`: the next tile's rows towards L1, the next
                // block's towards L2 (a step reads one line of each row). Wrapping
                // arithmetic: past the last tile or block these addresses are
                // neither formed by `add` nor read.
                let (n0, n1) = (r1.wrapping_add(stride), r1.wrapping_add(2 * stride));
                let ahead = k + R < n;
                let far = (k + R) * stride <= next_len;
                let (f0, f1) = (
                    next.wrapping_add(k * stride),
                    next.wrapping_add((k + kr - 1) * stride),
                );
                let mut j = 0;
                while j + 32 <= l {
                    if ahead {
                        _mm_prefetch::<_MM_HINT_T0>(n0.wrapping_add(j) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(n1.wrapping_add(j) as *const i8);
                    }
                    if far {
                        _mm_prefetch::<_MM_HINT_T1>(f0.wrapping_add(j) as *const i8);
                        _mm_prefetch::<_MM_HINT_T1>(f1.wrapping_add(j) as *const i8);
                    }
                    step(
                        _mm512_loadu_si512(r0.add(j) as *const _),
                        _mm512_loadu_si512(r1.add(j) as *const _),
                        panel.add(j * QH),
                    );
                    j += 32;
                }
                if j < l {
                    step(
                        _mm512_maskz_loadu_epi16(tail, r0.add(j) as *const i16),
                        _mm512_maskz_loadu_epi16(tail, r1.add(j) as *const i16),
                        panel.add(j * QH),
                    );
                }
                _mm512_storeu_ps(tmp.as_mut_ptr(), _mm512_mul_ps(hsum16(&acc), vs));
                for i in 0..kr {
                    for t in 0..hn {
                        out[(h0 + t) * n + k + i] = tmp[i * QH + t];
                    }
                }
            }
        }
    }

    /// `acc[h] += Σ_{u < n} p[h][u] · rows[u][..C]` on bf16 rows and probabilities
    /// (`pb`: `[H, np]` bf16 bits, `np` even, zero past `n`): `vdpbf16ps` sums two rows
    /// per instruction, so two rows' 32 columns are interleaved (`vpunpck{l,h}wd`)
    /// into pairs and each head's two probabilities broadcast as one pair. Eight
    /// heads by 32 columns in sixteen registers across the rows; the interleave puts
    /// columns in a lane order that is undone once per 32 columns, when the sums are
    /// stored. A column remainder is masked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn values_bf16(
        pb: &[u16],
        heads: usize,
        np: usize,
        n: usize,
        rows: &[half::bf16],
        stride: usize,
        acc: &mut [f32],
    ) {
        let c = acc.len() / heads;
        assert!(
            c <= stride
                && n <= np
                && np.is_multiple_of(2)
                && pb.len() >= heads * np
                && rows.len() >= n * stride
        );
        for h0 in (0..heads).step_by(8) {
            let args = (pb, np, n, rows, stride, h0, c, acc.as_mut_ptr());
            match heads - h0 {
                1 => values_heads_bf16::<1>(args),
                2 => values_heads_bf16::<2>(args),
                3 => values_heads_bf16::<3>(args),
                4 => values_heads_bf16::<4>(args),
                5 => values_heads_bf16::<5>(args),
                6 => values_heads_bf16::<6>(args),
                7 => values_heads_bf16::<7>(args),
                _ => values_heads_bf16::<8>(args),
            }
        }
    }

    /// `HN` heads from `h0` of [`values_bf16`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::type_complexity)]
    unsafe fn values_heads_bf16<const HN: usize>(
        (pb, np, n, rows, stride, h0, c, ap): (
            &[u16],
            usize,
            usize,
            &[half::bf16],
            usize,
            usize,
            usize,
            *mut f32,
        ),
    ) {
        // `vpunpcklwd` of two rows' 32 columns gives, in 32-bit lane `4L + i`, column
        // `8L + i` of both (L the 128-bit lane); `vpunpckhwd` column `8L + 4 + i`.
        // `LO`/`HI` gather the stored sums into that order, `BACK0`/`BACK1` return
        // columns 0–15 and 16–31 from it.
        let lo_cols: [i32; 16] = std::array::from_fn(|k| (8 * (k / 4) + k % 4) as i32);
        let hi_cols: [i32; 16] = std::array::from_fn(|k| lo_cols[k] + 4);
        let back = |from: usize| -> [i32; 16] {
            std::array::from_fn(|i| {
                let (l, r) = ((from + i) / 8, (from + i) % 8);
                (if r < 4 { 4 * l + r } else { 16 + 4 * l + r - 4 }) as i32
            })
        };
        let (lo_idx, hi_idx) = (
            _mm512_loadu_si512(lo_cols.as_ptr() as *const _),
            _mm512_loadu_si512(hi_cols.as_ptr() as *const _),
        );
        let (b0, b1) = (back(0), back(16));
        let (back0, back1) = (
            _mm512_loadu_si512(b0.as_ptr() as *const _),
            _mm512_loadu_si512(b1.as_ptr() as *const _),
        );
        let rp = rows.as_ptr() as *const u16;
        let pp: [*const u16; HN] = std::array::from_fn(|t| pb.as_ptr().add((h0 + t) * np));
        let mut j = 0;
        while j < c {
            let w = (c - j).min(32);
            let m32 = (u64::MAX >> (64 - w)) as __mmask32;
            let (ma, mb) = (
                crate::first_lanes(w.min(16)),
                crate::first_lanes(w.saturating_sub(16)),
            );
            let at = |t: usize| ap.add((h0 + t) * c + j);
            let mut v0: [__m512; HN] = std::array::from_fn(|t| {
                let (a, b) = (
                    _mm512_maskz_loadu_ps(ma, at(t)),
                    _mm512_maskz_loadu_ps(mb, at(t).add(16)),
                );
                _mm512_permutex2var_ps(a, lo_idx, b)
            });
            let mut v1: [__m512; HN] = std::array::from_fn(|t| {
                let (a, b) = (
                    _mm512_maskz_loadu_ps(ma, at(t)),
                    _mm512_maskz_loadu_ps(mb, at(t).add(16)),
                );
                _mm512_permutex2var_ps(a, hi_idx, b)
            });
            let mut u = 0;
            while u < n {
                let a = _mm512_maskz_loadu_epi16(m32, rp.add(u * stride + j) as *const i16);
                let b = if u + 1 < n {
                    _mm512_maskz_loadu_epi16(m32, rp.add((u + 1) * stride + j) as *const i16)
                } else {
                    _mm512_setzero_si512()
                };
                let (lo, hi) = (
                    bh(_mm512_unpacklo_epi16(a, b)),
                    bh(_mm512_unpackhi_epi16(a, b)),
                );
                for t in 0..HN {
                    let pair = (pp[t].add(u) as *const i32).read_unaligned();
                    let p = bh(_mm512_set1_epi32(pair));
                    v0[t] = _mm512_dpbf16_ps(v0[t], lo, p);
                    v1[t] = _mm512_dpbf16_ps(v1[t], hi, p);
                }
                u += 2;
            }
            for t in 0..HN {
                _mm512_mask_storeu_ps(at(t), ma, _mm512_permutex2var_ps(v0[t], back0, v1[t]));
                _mm512_mask_storeu_ps(
                    at(t).add(16),
                    mb,
                    _mm512_permutex2var_ps(v0[t], back1, v1[t]),
                );
            }
            j += 32;
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn hsum16_sums_each_input_into_its_lane() {
        if !crate::qdot::x86::has_avx512vnni() {
            return;
        }
        let vals: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32) - 50.0).collect();
        // SAFETY: AVX-512 F was detected; the loads read 16 of the 256 values each.
        let got: Vec<f32> = unsafe {
            use std::arch::x86_64::*;
            let a: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(vals[i * 16..].as_ptr()));
            let mut out = [0.0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), x86::hsum16(&a));
            out.to_vec()
        };
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                *g,
                vals[i * 16..(i + 1) * 16].iter().sum::<f32>(),
                "lane {i}"
            );
        }
    }

    /// Values rounded to bf16, as bits and as the f32 they stand for.
    fn bf16_of(v: &[f32]) -> (Vec<half::bf16>, Vec<f32>) {
        let b: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let f = b.iter().map(|x| x.to_f32()).collect();
        (b, f)
    }

    #[test]
    fn bf16_rounding_matches_half() {
        // Normal values of every magnitude and both signs, ties, zeros, infinities
        // and NaNs. (Subnormals are left out: `vcvtneps2bf16` treats them as zero.)
        let mut vals: Vec<f32> = (0..4000)
            .map(|i| {
                f32::from_bits(0x0080_0000 + (i as u32).wrapping_mul(0x0009_e3b7) % 0x7f00_0000)
            })
            .flat_map(|x| [x, -x])
            .collect();
        vals.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::INFINITY,
            -f32::INFINITY,
        ]);
        vals.extend([f32::NAN, f32::MAX, f32::MIN_POSITIVE]);
        for len in [vals.len(), 17, 16, 5, 0] {
            let src = &vals[..len];
            let mut got = vec![0u16; len];
            to_bf16(src, &mut got);
            for (g, &x) in got.iter().zip(src) {
                let w = half::bf16::from_f32(x);
                assert!(
                    *g == w.to_bits() || (x.is_nan() && half::bf16::from_bits(*g).is_nan()),
                    "{x:e}: {g:#06x} vs {:#06x}",
                    w.to_bits()
                );
            }
        }
        let mut b = vec![0.0f32; 3];
        Block::Bf16(&[
            half::bf16::from_f32(1.5),
            half::bf16::from_f32(-2.0),
            half::bf16::MAX,
        ])
        .write_f32(&mut b);
        assert_eq!(b, [1.5, -2.0, half::bf16::MAX.to_f32()]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_kernels_match_their_scalar_twins() {
        if !crate::qdot::x86::has_avx512bf16() {
            return;
        }
        // Head counts with partial panels, row lengths with a 32-value tail, odd row
        // counts, column counts with a masked remainder; V2's 576/512 too.
        for (heads, l, stride, c, n) in [
            (5, 40, 52, 40, 7),
            (16, 576, 576, 512, 64),
            (21, 72, 72, 24, 33),
            (8, 32, 32, 32, 1),
            (3, 576, 576, 512, 2),
            (17, 41, 41, 40, 9),
        ] {
            let q: Vec<f32> = (0..heads * l).map(|i| (i as f32 * 0.37).sin()).collect();
            let (_, qr) = bf16_of(&q);
            let raw: Vec<f32> = (0..n * stride)
                .map(|i| (i as f32 * 0.11).cos() * 2.5)
                .collect();
            let (rows, rf) = bf16_of(&raw);
            // Scores: Σ bf16(q) · row, each product exact, summed in f64 here.
            let mut buf = Vec::new();
            let a = x86::pack_queries_bf16(&q, heads, l, &mut buf);
            let mut s = vec![0.0f32; heads * n];
            // SAFETY: AVX-512 F/BW/VL and BF16 were detected; the kernel asserts its
            // bounds.
            unsafe { x86::scores_bf16(&buf[a..], heads, l, (&rows, &[]), stride, &mut s, 0.5) };
            for h in 0..heads {
                for u in 0..n {
                    let terms = (0..l).map(|j| qr[h * l + j] as f64 * rf[u * stride + j] as f64);
                    let (want, mag) = terms.fold((0.0, 0.0), |(w, m), t| (w + t, m + t.abs()));
                    let got = s[h * n + u] as f64;
                    assert!(
                        (got - 0.5 * want).abs() <= 1e-6 * mag,
                        "scores {heads}x{l} n={n} h={h} u={u}: {got} vs {}",
                        0.5 * want
                    );
                }
            }
            // Values: Σ bf16(p) · row onto what `acc` held.
            let np = n.next_multiple_of(2);
            let p: Vec<f32> = (0..heads * n)
                .map(|i| ((i as f32 * 0.29).sin() + 1.1) * 0.4)
                .collect();
            let mut pb = vec![0u16; heads * np];
            for h in 0..heads {
                for u in 0..n {
                    pb[h * np + u] = half::bf16::from_f32(p[h * n + u]).to_bits();
                }
            }
            let start: Vec<f32> = (0..heads * c).map(|i| i as f32 * 0.01).collect();
            let mut acc = start.clone();
            // SAFETY: as above.
            unsafe { x86::values_bf16(&pb, heads, np, n, &rows, stride, &mut acc) };
            for h in 0..heads {
                for j in 0..c {
                    let terms = (0..n).map(|u| {
                        half::bf16::from_bits(pb[h * np + u]).to_f32() as f64
                            * rf[u * stride + j] as f64
                    });
                    let (want, mag) = terms.fold((start[h * c + j] as f64, 0.0), |(w, m), t| {
                        (w + t, m + t.abs())
                    });
                    let got = acc[h * c + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * (mag + start[h * c + j].abs() as f64),
                        "values {heads}x{c} n={n} h={h} j={j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_blocks_attend_as_their_rounded_f32_twin() {
        // The `vdpbf16ps` path (where this CPU has it) against the portable one, which
        // rounds the queries and probabilities to bf16 and runs the f32 kernels; and
        // both against f32 attention over the same bf16 rows, within bf16's precision.
        for (heads, l, stride, c, n, visible) in [
            (16, 576, 576, 512, 300, 300),
            (5, 40, 52, 40, 150, 131),
            (21, 72, 72, 64, 64, 1),
            // Tile shapes: a partial second head panel, rows 100 values apart, a
            // last block of 8 rows (copied for the key tiles), a partial chunk.
            (21, 96, 100, 64, 200, 200),
            (21, 96, 100, 64, 200, 177),
            (128, 576, 576, 512, 70, 70),
            (16, 576, 576, 512, 64, 1),
        ] {
            let q: Vec<f32> = (0..heads * l).map(|i| (i as f32 * 0.37).sin()).collect();
            let raw: Vec<f32> = (0..n * stride)
                .map(|i| (i as f32 * 0.13).cos() * 1.5)
                .collect();
            let (rows, rf) = bf16_of(&raw);
            let blocks: Vec<Block> = rows.chunks(64 * stride).map(Block::Bf16).collect();
            let f32_blocks: Vec<Block> = rf.chunks(64 * stride).map(Block::F32).collect();
            let scale = 1.0 / (l as f32).sqrt();
            // `vdpbf16ps`, the portable twin, and AMX tiles (where this CPU has them
            // and the sizes fit: the first and third cases).
            let mut outs = Vec::new();
            for paths in [(true, false), (false, false), (true, true)] {
                let mut o = vec![0.0; heads * c];
                mqa_blocks_on(&q, heads, &blocks, stride, visible, c, scale, &mut o, paths);
                outs.push(o);
            }
            let mut exact = vec![0.0; heads * c];
            mqa_blocks(
                &q,
                heads,
                &f32_blocks,
                stride,
                visible,
                c,
                scale,
                &mut exact,
            );
            for (((a, b), t), e) in outs[0].iter().zip(&outs[1]).zip(&outs[2]).zip(&exact) {
                assert!(
                    (a - b).abs() <= 2e-6 * e.abs().max(1.0),
                    "{heads}x{l} n={visible}: {a} vs {b}"
                );
                assert!(
                    (t - b).abs() <= 2e-6 * e.abs().max(1.0),
                    "{heads}x{l} n={visible}: tiles {t} vs {b}"
                );
                assert!(
                    (a - e).abs() <= 2e-2 * e.abs().max(0.1),
                    "{heads}x{l}: {a} vs f32 {e}"
                );
            }
            let twin_off = outs[1].iter().zip(&exact).any(|(b, e)| b != e);
            assert!(
                twin_off || visible == 1,
                "the twin rounds (it differs from f32)"
            );
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
            let mut buf = Vec::new();
            let a =
                crate::attn_prefill::pack_keys(&[crate::Rows::dense(&q, l)], heads, l, &mut buf);
            let qt = &buf[a..];
            let mut shapes = Vec::new();
            if crate::qdot::x86::has_avx2() {
                let mut o = vec![0.0; heads * n];
                // SAFETY: AVX2 and FMA were detected; `qt` packs the queries.
                unsafe { x86::scores_tiles(qt, heads, l, &rows, stride, 0, &mut o, 0.5, true) };
                shapes.push(("avx2", o));
            }
            if crate::qdot::x86::has_avx512vnni() {
                let mut buf = Vec::new();
                let a = x86::pack_queries512(&q, heads, l, &mut buf);
                let qp = &buf[a..];
                let mut o = vec![0.0; heads * n];
                // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C were detected; the
                // kernel asserts its bounds.
                unsafe {
                    x86::scores_dot512(qp, heads, l, (&rows, &[]), stride, 0, &mut o, 0.5, true)
                };
                shapes.push(("avx512", o));
                // Row-major output too, and f16 rows read in place against the
                // same rows widened first.
                let mut t = vec![0.0; heads * n];
                // SAFETY: as above.
                unsafe {
                    x86::scores_dot512(qp, heads, l, (&rows, &[]), stride, 0, &mut t, 0.5, false)
                };
                let tr: Vec<f32> = (0..heads * n).map(|i| t[(i % n) * heads + i / n]).collect();
                shapes.push(("avx512 row-major", tr));
                let halves: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f32(x)).collect();
                let wide: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
                let (mut a, mut b) = (vec![0.0; heads * n], vec![0.0; heads * n]);
                // SAFETY: as above.
                unsafe {
                    x86::scores_dot512(qp, heads, l, (&halves, &[]), stride, 0, &mut a, 0.5, true);
                    x86::scores_dot512(qp, heads, l, (&wide, &[]), stride, 0, &mut b, 0.5, true);
                }
                assert_eq!(a, b, "f16 rows in place");
            }
            for (name, o) in shapes {
                for (a, b) in o.iter().zip(&s) {
                    assert!((a - b).abs() < 1e-4, "{name} scores: {a} vs {b}");
                }
            }
        }
        // 32 columns: whole 16-column tiles; 48: a 16-column tail (AVX2: 16-column
        // tiles and an 8-column tail); 40: an 8-column tail (AVX-512: masked).
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
                if crate::qdot::x86::has_avx512vnni() {
                    let mut o = vec![0.0; heads * c];
                    // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C were detected; the
                    // kernel asserts its bounds.
                    unsafe { x86::values_dot512(&s, heads, n, &rows, stride, 0, n, &mut o) };
                    outs.push(("avx512", o));
                    // f16 rows read in place against the same rows widened first.
                    let halves: Vec<half::f16> =
                        rows.iter().map(|&x| half::f16::from_f32(x)).collect();
                    let wide: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
                    let (mut a, mut b) = (vec![0.0; heads * c], vec![0.0; heads * c]);
                    // SAFETY: as above.
                    unsafe {
                        x86::values_dot512(&s, heads, n, &halves, stride, 0, n, &mut a);
                        x86::values_dot512(&s, heads, n, &wide, stride, 0, n, &mut b);
                    }
                    assert_eq!(a, b, "f16 rows in place, c={c}");
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
