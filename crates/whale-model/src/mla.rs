//! Multi-head Latent Attention.
//!
//! Dim names (one order for the whole file): `T` new tokens, `N` cached tokens
//! including the new ones, `H` heads, `P` qk_nope_head_dim, `R` qk_rope_head_dim,
//! `V` v_head_dim, `C` kv_lora_rank, `d` hidden size.
//!
//! Two equivalent forms:
//! - **expanded** (prefill / oracle): decompress every cached latent through
//!   `kv_b_proj` into per-head `k_nope` and `v`, then ordinary attention with
//!   `k = [k_nope ‖ k_pe]`.
//! - **absorbed** (decode): since `q_nope·(W_UK c) = (W_UKᵀ q_nope)·c`, fold
//!   `W_UK` into the query (`q_lat`, `[C]` per head) and attend over the latents
//!   directly as one shared KV head `[c ‖ k_pe]`; the attention output `õ` is a
//!   latent, lifted to the head output by `W_UV õ`. Same scale `(P+R)^-½·M²`.

use crate::cache::LatentCache;
use crate::linear::Linear;
use crate::rope::Rope;
use crate::weights::{Packable, Tensor};
use rayon::prelude::*;
use std::cell::{OnceCell, RefCell};
use whale_kernels::qdot::Q8Row;
use whale_kernels::{
    causal_attention, causal_attention_bf16, matmul_quantized, matmul_t_vec, matmul_with,
    quantize_rows, rmsnorm_inplace, Block, Rows,
};

/// Which MLA formulation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MlaMode {
    /// Absorbed for decode and short chunks, expanded for long prefill chunks, by
    /// their cost (see `Mla::absorb_below`).
    #[default]
    Auto,
    /// Always the absorbed latent form.
    Absorbed,
    /// Always the expanded per-head form.
    Expanded,
}

/// Query projection: plain, or through the q-LoRA bottleneck.
pub(crate) enum QProj {
    /// `q_proj` `[H·(P+R), d]`.
    Plain(Linear),
    /// `q_a_proj` `[q_lora, d]` → RMSNorm → `q_b_proj` `[H·(P+R), q_lora]`.
    Lora {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
}

/// The latent up-projections `W_UK` (latent → k_nope) and `W_UV` (latent → v).
// One per layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum KvUp {
    /// `kv_b_proj` `[H·(P+V), C]` (transformers; legacy GGUF `attn_kv_b`):
    /// per head, rows `0..P` are W_UK and `P..P+V` are W_UV.
    Fused(Linear),
    /// GGUF `attn_k_b` `[H, C, P]` (W_UKᵀ per head) and `attn_v_b` `[H, V, C]` (W_UV per
    /// head); `w_uk` is `W_UK` `[H·P, C]` rounded to Q8_0 for the expanded form's integer
    /// product (when the file's type is quantised and `C` whole blocks).
    Split {
        k_b_t: Packable,
        v_b: Packable,
        w_uk: Option<Packable>,
    },
}

impl KvUp {
    /// `W_UV[h]` as `[V, C]`.
    fn w_uv(&self, h: usize, p: usize, v: usize, c: usize) -> Tensor {
        match self {
            KvUp::Fused(w) => w.tensor().rows(h * (p + v) + p, v, c),
            KvUp::Split { v_b, .. } => v_b.get().rows(h * v, v, c),
        }
    }

    /// Decompressed latents `[N, C]` for the heads `h0..h0 + hn`: their `k_nope` and
    /// values, left where the products write them (the fused weight interleaves them
    /// per head, the split weights give `[N, hn·P]` then `[N, hn·V]`).
    #[allow(clippy::too_many_arguments)]
    fn expand(
        &self,
        exact: bool,
        (lat, lat_q8): (&[f32], &OnceCell<Vec<Q8Row>>),
        n: usize,
        (h0, hn): (usize, usize),
        p: usize,
        v: usize,
        c: usize,
    ) -> Expanded {
        // Every path below writes all of it.
        let mut buf = scratch(n * hn * (p + v));
        let split = ((0, hn * p, p), (n * hn * p, hn * v, v));
        let (k_at, v_at) = match self {
            KvUp::Fused(w) => {
                let rows = w.mat().row_range(h0 * (p + v), hn * (p + v));
                matmul_with(lat, n, rows, &mut buf, exact);
                ((0, hn * (p + v), p + v), (p, hn * (p + v), p + v))
            }
            KvUp::Split {
                v_b,
                w_uk: Some(w_uk),
                ..
            } if !exact => {
                // The group's heads at once, in the integer kernels, over latents
                // quantised once for both weights and every group (per product and
                // group before: eight passes over 4.6k rows per layer at depth 4096).
                // On AMX tiles where the CPU has them (a prompt's rows, or all the
                // cached rows at depth), else the same quantised latents for both.
                let (k, vv) = buf.split_at_mut(n * hn * p);
                let tiles = n >= whale_kernels::amx::MIN_ROWS;
                let wk = w_uk.get().mat().row_range(h0 * p, hn * p);
                let wv = v_b.get().rows(h0 * v, hn * v, c);
                for (w, out) in [(wk, k), (wv.mat(), vv)] {
                    if tiles && whale_kernels::amx::matmul(lat, n, w, out) {
                        continue;
                    }
                    let acts = lat_q8.get_or_init(|| quantize_rows(lat, c));
                    if !matmul_quantized(acts, w, out) {
                        matmul_with(lat, n, w, out, false);
                    }
                }
                split
            }
            KvUp::Split { k_b_t, v_b, .. } => {
                let (k, vv) = buf.split_at_mut(n * hn * p);
                let mut kh = vec![0.0f32; n * p];
                let mut vh = vec![0.0f32; n * v];
                let mut w_uk = vec![0u8; p * c * 4];
                for j in 0..hn {
                    let h = h0 + j;
                    // k_nope = lat · W_UKᵀᵀ: W_UK[h] ([P, C], f32) rebuilt from the stored
                    // transpose [C, P] once per head, then one product over all N rows
                    // (an axpy per latent element and row cost 100× more at depth).
                    let kt = k_b_t.get().rows(h * c, c, p).mat().to_f32(); // [C, P]
                    for (ci, krow) in kt.chunks_exact(p).enumerate() {
                        for (pi, &x) in krow.iter().enumerate() {
                            w_uk[(pi * c + ci) * 4..(pi * c + ci + 1) * 4]
                                .copy_from_slice(&x.to_le_bytes());
                        }
                    }
                    let w = whale_kernels::MatRef::new(whale_kernels::DType::F32, &w_uk, p, c)
                        .expect("[P, C] f32");
                    matmul_with(lat, n, w, &mut kh, true);
                    matmul_with(lat, n, v_b.get().rows(h * v, v, c).mat(), &mut vh, exact);
                    for u in 0..n {
                        k[(u * hn + j) * p..(u * hn + j + 1) * p]
                            .copy_from_slice(&kh[u * p..(u + 1) * p]);
                        vv[(u * hn + j) * v..(u * hn + j + 1) * v]
                            .copy_from_slice(&vh[u * v..(u + 1) * v]);
                    }
                }
                split
            }
        };
        Expanded {
            buf,
            k: k_at,
            v: v_at,
        }
    }
}

thread_local! {
    /// Large scratch buffers of the expanded form, reused between head groups and
    /// layers: at depth 4096 each group's keys and values are ~19 MB and the latents
    /// ~9 MB, and fresh ones cost a page fault and a page zeroing per 4 KB (12% of a
    /// pp512 at depth 4096 in `perf`, `clear_page_erms`).
    static SCRATCH: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats from this thread's [`SCRATCH`] (or a new one): its
/// values are whatever the last user left, so every caller overwrites all of it.
fn scratch(len: usize) -> Vec<f32> {
    let mut v = SCRATCH
        .with_borrow_mut(|pool| {
            let i = (0..pool.len()).max_by_key(|&i| pool[i].capacity())?;
            Some(pool.swap_remove(i))
        })
        .unwrap_or_default();
    v.resize(len, 0.0);
    v
}

/// Returns a [`scratch`] buffer to this thread's pool (at most four kept).
fn give_back(v: Vec<f32>) {
    SCRATCH.with_borrow_mut(|pool| {
        if pool.len() < 4 {
            pool.push(v);
        }
    });
}

/// Decompressed latents of [`KvUp::expand`]: `k` and `v` are (start, row stride, step
/// from one head to the next) of each head's `k_nope` and values in `buf`.
struct Expanded {
    buf: Vec<f32>,
    k: (usize, usize, usize),
    v: (usize, usize, usize),
}

impl Drop for Expanded {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }
}

impl Expanded {
    /// Head `h`'s rows of `len` values, at (start, row stride, head step) in `buf`.
    fn rows(&self, (start, stride, step): (usize, usize, usize), h: usize, len: usize) -> Rows<'_> {
        Rows {
            data: &self.buf[start..],
            stride,
            offset: h * step,
            len,
        }
    }
}

/// Weights and dims of one MLA layer.
pub(crate) struct Mla {
    pub q: QProj,
    /// `kv_a_proj_with_mqa` `[C+R, d]`.
    pub kv_a: Linear,
    /// `kv_a_layernorm` `[C]`.
    pub kv_a_norm: Vec<f32>,
    /// The latent up-projections.
    pub kv_up: KvUp,
    /// `o_proj` `[d, H·V]`.
    pub o: Linear,
    pub n_head: usize,
    pub nope: usize,
    pub rope_dim: usize,
    pub v_dim: usize,
    pub kv_rank: usize,
    pub scale: f32,
    /// f32 arithmetic on dequantised latent up-projections.
    pub exact: bool,
    /// Bytes of decompressed keys and values the expanded form holds at once.
    pub expanded_bytes: usize,
}

impl Mla {
    /// Chooses exact f32 arithmetic for every projection of the layer.
    pub fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
        match &mut self.q {
            QProj::Plain(w) => w.exact = exact,
            QProj::Lora { a, b, .. } => {
                a.exact = exact;
                b.exact = exact;
            }
        }
        self.kv_a.exact = exact;
        if let KvUp::Fused(w) = &mut self.kv_up {
            w.exact = exact;
        }
        self.o.exact = exact;
    }

    /// The layer's projection weights, for the model's repack pass.
    pub fn packables(&self) -> Vec<&Packable> {
        let mut v = match &self.q {
            QProj::Plain(w) => vec![w.packable()],
            QProj::Lora { a, b, .. } => vec![a.packable(), b.packable()],
        };
        v.push(self.kv_a.packable());
        match &self.kv_up {
            KvUp::Fused(w) => v.push(w.packable()),
            KvUp::Split { k_b_t, v_b, w_uk } => v.extend(
                [Some(k_b_t), Some(v_b), w_uk.as_ref()]
                    .into_iter()
                    .flatten(),
            ),
        }
        v.push(self.o.packable());
        v
    }

    /// Bytes of the layer's weights as stored (norms as f32).
    pub fn weight_bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Plain(w) => w.bytes(),
            QProj::Lora { a, norm, b } => a.bytes() + 4 * norm.len() + b.bytes(),
        };
        let up = match &self.kv_up {
            KvUp::Fused(w) => w.bytes(),
            KvUp::Split { k_b_t, v_b, .. } => k_b_t.get().bytes().len() + v_b.get().bytes().len(),
        };
        q + self.kv_a.bytes() + 4 * self.kv_a_norm.len() + up + self.o.bytes()
    }
}

/// Epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers builds them with
/// the RMSNorm default, not `config.rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// Default bytes of decompressed keys and values the expanded form holds at once
/// (see [`Mla::expanded`]).
pub(crate) const EXPANDED_BYTES: usize = 24 << 20;

/// Steps of up to this many rows (decode, batched decode) run the query's first
/// product and `kv_a_proj` as one pass ([`whale_kernels::matmul_many`]): one fork, and
/// `kv_a_proj` (0.66 MB in Q4_0) no longer streams on its own at two thirds of the
/// read bandwidth. Longer steps take each product's prompt-sized kernels.
const FUSED_ROWS: usize = 16;

/// A row of a step that runs in the absorbed form.
struct AbsorbedRow {
    /// Its row of the step (`[T, _]`).
    row: usize,
    /// Its segment (sequence) of the step.
    seg: usize,
    /// How many of its segment's latents it sees: its position plus one.
    visible: usize,
}

impl Mla {
    /// Attention for a batch of sequences: `h` (`[T, d]`, already normalised) holds the
    /// new rows of each `(cache, rows)` segment in turn, at positions `cache.len()..` of
    /// that segment's cache. The projections run over all `T` rows at once (one pass over
    /// the weights); attention runs per sequence over its own latents. Appends each
    /// segment's latents to its cache layer `layer` and writes `[T, d]` to `out`.
    pub fn forward_batch(
        &self,
        h: &[f32],
        rope: &Rope,
        segs: &mut [(&mut LatentCache, usize)],
        layer: usize,
        mode: MlaMode,
        out: &mut [f32],
    ) {
        let (nh, p, r, v, c) = (
            self.n_head,
            self.nope,
            self.rope_dim,
            self.v_dim,
            self.kv_rank,
        );
        let qk = p + r;
        let t = h.len() / self.kv_a.mat().cols();
        debug_assert_eq!(segs.iter().map(|s| s.1).sum::<usize>(), t);
        // Position of every row.
        let pos: Vec<usize> = segs
            .iter()
            .flat_map(|(cache, n)| {
                let past = cache.len();
                (0..*n).map(move |i| past + i)
            })
            .collect();

        // q: [T, H, P+R]
        // The products of `h`: the query's first (q_proj, or q_a_proj) and kv_a_proj's
        // latent rows `[T, C+R]`, as one pass where the step is a few rows.
        let mut q = vec![0.0f32; t * nh * qk];
        let mut lat = vec![0.0f32; t * (c + r)];
        let mut cq = match &self.q {
            QProj::Plain(_) => Vec::new(),
            QProj::Lora { a, .. } => vec![0.0f32; t * a.out_dim()],
        };
        let first = match &self.q {
            QProj::Plain(w) => (w, &mut q),
            QProj::Lora { a, .. } => (a, &mut cq),
        };
        if t <= FUSED_ROWS && first.0.exact == self.kv_a.exact {
            let jobs = vec![
                whale_kernels::MatMul {
                    x: h,
                    rows: None,
                    n: t,
                    w: first.0.mat(),
                    y: first.1,
                },
                whale_kernels::MatMul {
                    x: h,
                    rows: None,
                    n: t,
                    w: self.kv_a.mat(),
                    y: &mut lat,
                },
            ];
            whale_kernels::matmul_many(jobs, self.kv_a.exact);
        } else {
            first.0.forward(h, t, first.1);
            self.kv_a.forward(h, t, &mut lat);
        }
        if let QProj::Lora { a, norm, b } = &self.q {
            for row in cq.chunks_mut(a.out_dim()) {
                rmsnorm_inplace(row, norm, LATENT_NORM_EPS);
            }
            b.forward(&cq, t, &mut q);
        }
        for (qt, &at) in q.chunks_mut(nh * qk).zip(&pos) {
            for qh in qt.chunks_mut(qk) {
                rope.apply(&mut qh[p..], at);
            }
        }

        // latent rows: [T, C+R] = [RMSNorm(c_kv) ‖ RoPE(k_pe)]
        for (row, &at) in lat.chunks_mut(c + r).zip(&pos) {
            rmsnorm_inplace(&mut row[..c], &self.kv_a_norm, LATENT_NORM_EPS);
            rope.apply(&mut row[c..], at);
        }

        // attn: [T, H·V]. Every segment's latents join its cache first; then the rows
        // that run absorbed (decode tokens and short chunks) go through the latent
        // products together, and each expanded segment (a long prefill chunk) runs on
        // its own.
        let mut attn = vec![0.0f32; t * nh * v];
        let mut absorbed_rows = Vec::new();
        // Per segment, the latents its absorbed rows see (0 for an expanded segment).
        let mut seen = vec![0; segs.len()];
        let mut expanded_segs = Vec::new();
        let mut first = 0;
        for (si, (cache, n)) in segs.iter_mut().enumerate() {
            let past = cache.len();
            cache.append(layer, &lat[first * (c + r)..(first + *n) * (c + r)]);
            let absorbed = match mode {
                MlaMode::Auto => (*n as f64) < self.absorb_below(),
                MlaMode::Absorbed => true,
                MlaMode::Expanded => false,
            };
            if absorbed {
                absorbed_rows.extend((0..*n).map(|ti| AbsorbedRow {
                    row: first + ti,
                    seg: si,
                    visible: past + ti + 1,
                }));
                seen[si] = past + *n;
            } else {
                expanded_segs.push((si, first, past));
            }
            first += *n;
        }
        if !absorbed_rows.is_empty() {
            // Each segment's pages, as far as its last row sees.
            let pages: Vec<Vec<Block<'_>>> = segs
                .iter()
                .zip(&seen)
                .map(|((cache, _), &n)| cache.layer_pages(layer, n))
                .collect();
            self.absorbed(&q, &absorbed_rows, &pages, &mut attn);
        }
        for (si, first, past) in expanded_segs {
            let (cache, ts) = &segs[si];
            let n = past + *ts;
            let qs = &q[first * nh * qk..(first + *ts) * nh * qk];
            // A bf16 cache makes attention multiply in bf16 here too, as decode does.
            let bf16 = cache.kv_type() == crate::KvType::Bf16;
            let heads = self.expanded(qs, *ts, past, &cache.gather(layer, n), n, bf16);
            for (hi, ho) in heads.iter().enumerate() {
                for ti in 0..*ts {
                    let at = (first + ti) * nh * v + hi * v;
                    attn[at..at + v].copy_from_slice(&ho[ti * v..(ti + 1) * v]);
                }
            }
        }
        self.o.forward(&attn, t, out);
    }

    /// Chunks of fewer new rows than this run in the absorbed form under
    /// [`MlaMode::Auto`]. Over `N` cached rows the absorbed form costs `T·N·H·(2C+R)`
    /// multiply-adds in the multi-query attention kernels (speed `A`); the expanded form
    /// decompresses all `N` latents (`N·H·C·(P+V)`, integer kernels, speed `I`) and then
    /// costs `T·N·H·(P+R+V)` in the tiled causal kernel (speed `E`). `N` cancels: the
    /// absorbed form wins while `T < C·(P+V)/I / ((2C+R)/A − (P+R+V)/E)`. Measured here
    /// (`cargo bench --bench attn`, `--bench quant`): `A` ≈ 33, `E` ≈ 50, `I` ≈ 117
    /// GMAC/s, so V2-Lite switches at 42 rows.
    fn absorb_below(&self) -> f64 {
        const A: f64 = 33.0;
        const E: f64 = 50.0;
        const I: f64 = 117.0;
        let (p, r, v, c) = (
            self.nope as f64,
            self.rope_dim as f64,
            self.v_dim as f64,
            self.kv_rank as f64,
        );
        let per_row = ((2.0 * c + r) / A - (p + r + v) / E).max(1e-9);
        (c * (p + v) / I / per_row).max(2.0)
    }

    /// Attention outputs of `rows` by the absorbed form, written to their rows of
    /// `attn` (`[T, H·V]`): multi-query attention over the latent rows `[c ‖ k_pe]`
    /// of each row's segment (`pages[seg]`), all heads at once, so each cache row is
    /// read once per query row. The latent products `W_UKᵀ q_nope` and `W_UV õ` run
    /// for all rows of the step together, each head's weight read once per step (a
    /// step of eight decode streams read them eight times, and forked 16 times per
    /// layer, when each stream ran them alone).
    fn absorbed(
        &self,
        q: &[f32],
        rows: &[AbsorbedRow],
        pages: &[Vec<Block<'_>>],
        attn: &mut [f32],
    ) {
        let (nh, p, r, v, c) = (
            self.n_head,
            self.nope,
            self.rope_dim,
            self.v_dim,
            self.kv_rank,
        );
        let qk = p + r;
        let ta = rows.len();
        // Which rows of a `[ta·H, _]` matrix (row `j·H + h`) are head `h`'s.
        let head_rows: Vec<Vec<usize>> = (0..nh)
            .map(|hi| (0..ta).map(|j| j * nh + hi).collect())
            .collect();
        // q_cat: [ta, H, C+R] = [W_UKᵀ q_nope ‖ q_pe] per row and head.
        let mut q_cat = vec![0.0f32; ta * nh * (c + r)];
        match &self.kv_up {
            KvUp::Split { k_b_t, .. } => {
                // q_nope: [ta·H, P]; per head W_UKᵀ [C, P] over its ta rows.
                let mut q_nope = vec![0.0f32; ta * nh * p];
                for (qn, a) in q_nope.chunks_mut(nh * p).zip(rows) {
                    let qt = &q[a.row * nh * qk..(a.row + 1) * nh * qk];
                    for (qh, src) in qn.chunks_mut(p).zip(qt.chunks(qk)) {
                        qh.copy_from_slice(&src[..p]);
                    }
                }
                let w: Vec<Tensor> = (0..nh).map(|hi| k_b_t.get().rows(hi * c, c, p)).collect();
                let mut q_lat = vec![vec![0.0f32; ta * c]; nh];
                let jobs = q_lat
                    .iter_mut()
                    .zip(&w)
                    .zip(&head_rows)
                    .map(|((y, wh), hr)| whale_kernels::MatMul {
                        x: &q_nope,
                        rows: Some(hr),
                        n: ta,
                        w: wh.mat(),
                        y,
                    })
                    .collect();
                whale_kernels::matmul_many(jobs, self.exact);
                for (j, qc) in q_cat.chunks_mut(nh * (c + r)).enumerate() {
                    for (hi, qh) in qc.chunks_mut(c + r).enumerate() {
                        qh[..c].copy_from_slice(&q_lat[hi][j * c..(j + 1) * c]);
                    }
                }
            }
            KvUp::Fused(w) => {
                // W_UK is stored [P, C] per head: a transposed product per row and head.
                q_cat.par_chunks_mut(c + r).enumerate().for_each(|(i, qc)| {
                    let (a, hi) = (&rows[i / nh], i % nh);
                    let qn = &q[a.row * nh * qk + hi * qk..][..p];
                    matmul_t_vec(qn, w.mat().row_range(hi * (p + v), p), &mut qc[..c]);
                });
            }
        }
        for (qc, a) in q_cat.chunks_mut(nh * (c + r)).zip(rows) {
            let qt = &q[a.row * nh * qk..(a.row + 1) * nh * qk];
            for (qh, src) in qc.chunks_mut(c + r).zip(qt.chunks(qk)) {
                qh[c..].copy_from_slice(&src[p..]);
            }
        }
        // õ: [ta, H, C], softmax over each row's visible latents, page by page. Rows
        // come from a shared queue; a row's pages are handed out inside it, so one
        // long row keeps both cores busy too.
        let mut o_lat = vec![0.0f32; ta * nh * c];
        whale_kernels::for_each_dynamic(
            o_lat
                .chunks_mut(nh * c)
                .zip(q_cat.chunks(nh * (c + r)))
                .zip(rows),
            |((ol, qc), a)| {
                whale_kernels::mqa_blocks(
                    qc,
                    nh,
                    &pages[a.seg],
                    c + r,
                    a.visible,
                    c,
                    self.scale,
                    ol,
                )
            },
        );
        // o = W_UV õ per head ([V, C] over its ta rows of õ), all heads as one pass.
        let w_uv: Vec<Tensor> = (0..nh).map(|hi| self.kv_up.w_uv(hi, p, v, c)).collect();
        let mut o_v = vec![vec![0.0f32; ta * v]; nh];
        let jobs = o_v
            .iter_mut()
            .zip(&w_uv)
            .zip(&head_rows)
            .map(|((y, wh), hr)| whale_kernels::MatMul {
                x: &o_lat,
                rows: Some(hr),
                n: ta,
                w: wh.mat(),
                y,
            })
            .collect();
        whale_kernels::matmul_many(jobs, self.exact);
        for (j, a) in rows.iter().enumerate() {
            for (hi, oh) in o_v.iter().enumerate() {
                let at = a.row * nh * v + hi * v;
                attn[at..at + v].copy_from_slice(&oh[j * v..(j + 1) * v]);
            }
        }
    }

    /// Per head `[T, V]` outputs by the expanded form: every latent decompressed to its
    /// heads' keys and values (a group of heads at a time past `expanded_bytes`), then
    /// causal attention per head (heads in parallel) in the tiled kernel, which reads
    /// each head's rows where they lie (in bf16 where `bf16`: [`causal_attention_bf16`]).
    fn expanded(
        &self,
        q: &[f32],
        t: usize,
        past: usize,
        kv: &[f32],
        n: usize,
        bf16: bool,
    ) -> Vec<Vec<f32>> {
        let (nh, p, r, v, c) = (
            self.n_head,
            self.nope,
            self.rope_dim,
            self.v_dim,
            self.kv_rank,
        );
        let qk = p + r;
        // latents of all N tokens: [N, C] (every row written)
        let mut lat = scratch(n * c);
        for u in 0..n {
            lat[u * c..(u + 1) * c].copy_from_slice(&kv[u * (c + r)..u * (c + r) + c]);
        }
        // Heads in groups whose decompressed keys and values stay under
        // `expanded_bytes` (by default all 16 heads of V2-Lite up to ~1.2k rows; 4 at a time at
        // 4.6k): the buffer is N·H·(P+V) floats for all heads, 94 MB at depth 4096 and
        // 2.7 GB at 128k, where a group bounds it; the latents are quantised once for
        // all groups (8-bit rows with five fields per block of 32: ~1.6 bytes per latent
        // value, 110 MB at 128k).
        let per_head = n * (p + v) * std::mem::size_of::<f32>();
        let fit =
            (self.expanded_bytes / per_head.max(1)).clamp(rayon::current_num_threads().min(nh), nh);
        let groups = nh.div_ceil(fit.max(1));
        let size = nh.div_ceil(groups);
        let mut outs = Vec::with_capacity(nh);
        let lat_q8 = OnceCell::new();
        for h0 in (0..nh).step_by(size) {
            let hn = size.min(nh - h0);
            let x = self
                .kv_up
                .expand(self.exact, (&lat, &lat_q8), n, (h0, hn), p, v, c);
            outs.par_extend((0..hn).into_par_iter().map(|j| {
                let hi = h0 + j;
                let mut qs = vec![0.0f32; t * qk]; // [T, P+R] of this head
                for ti in 0..t {
                    qs[ti * qk..(ti + 1) * qk]
                        .copy_from_slice(&q[ti * nh * qk + hi * qk..ti * nh * qk + (hi + 1) * qk]);
                }
                let keys = [
                    x.rows(x.k, j, p),
                    Rows {
                        data: kv,
                        stride: c + r,
                        offset: c,
                        len: r,
                    },
                ];
                let values = x.rows(x.v, j, v);
                let mut out = vec![0.0f32; t * v];
                if bf16 {
                    causal_attention_bf16(&qs, &keys, values, past, self.scale, &mut out);
                } else {
                    causal_attention(&qs, &keys, values, past, self.scale, &mut out);
                }
                out
            }));
        }
        give_back(lat);
        outs
    }
}
