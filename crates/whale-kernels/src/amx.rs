//! Prefill-sized products on Intel AMX tiles (`tdpbf16ps`), where the CPU has them
//! (Sapphire Rapids and later Xeons).
//!
//! One `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32
//! sums: 8192 multiply-adds, against 16 × 2 for a 512-bit FMA. Quantised weights
//! have no bf16 form, so a product decodes each panel of 32 weight rows to bf16 once
//! (the tile's pair layout, [`pack_panel`]) and passes every activation row over it;
//! the activations are rounded to bf16 once per product. Block scales are applied in
//! the decode, so the tiles sum whole rows in f32 and nothing per block remains for
//! vector code, unlike an int8 product (`tdpbssd`), whose sums would need each
//! block's two scales applied to every 16 × 16 result (four times the vector work of
//! the decode at 48 rows, and growing with the rows).
//!
//! Arithmetic: weights are `(q - 8) · d` (Q4_0), `(q - 16) · d` (Q5_0), `q · d` (Q8_0)
//! or `q · d · sc - dmin · m` (Q4_K) computed exactly in f32 and rounded to bf16 (a
//! relative error of at most 2⁻⁹); activations are rounded
//! to bf16 the same way; the products are exact in f32 and summed in f32. llama.cpp's
//! integer path rounds activations to 8-bit blocks instead, an error of up to half a
//! step of 1/127 of the block's largest value.
//!
//! `WHALE_AMX=0` (or `WHALE_SCALAR`, or `WHALE_ISA=avx2`) keeps the integer kernels.

use crate::dtype::MatRef;
use crate::DType;

/// Rows of a tile: activation rows of an A tile, weight rows of a B tile.
const TR: usize = 16;
/// Values of the shared dimension per tile step (32 bf16, 64 bytes a row).
const TK: usize = 32;
/// Weight rows of a panel: two B tiles, each met by two A tiles per step.
const PANEL: usize = 2 * TR;
/// Panels decoded at once (a task): each pair of A tiles then meets all of them while
/// it is in L2, so the activations stream from L3 once per four panels, not once per
/// panel (a 512-row prompt's activations of 2048 values are 2 MB).
const SET: usize = 4;

/// Fewest activation rows for which [`matmul`] runs on the tiles: with fewer, one
/// A tile is mostly padding and the integer kernels, which need no decode, are as fast.
pub const MIN_ROWS: usize = 32;

/// Process-wide switch under [`available`] ([`set_allowed`]).
static ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets [`matmul`] use the tiles (the default) or not, for the whole process: tests
/// and benches compare the two paths in one process.
pub fn set_allowed(on: bool) {
    ALLOWED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this CPU and kernel let the process use AMX tiles with bf16 (checked and
/// requested once; `WHALE_AMX=0` says no) and [`set_allowed`] has not said no.
pub fn available() -> bool {
    ALLOWED.load(std::sync::atomic::Ordering::Relaxed) && detected()
}

/// [`available`] without the switch.
fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var("WHALE_AMX").map_or(true, |v| v != "0")
                && crate::qdot::isa() == crate::qdot::Isa::Avx512Vnni
                && crate::qdot::x86::has_avx512bf16()
                && x86::request_tiles()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether [`pack_panel`] has a vector decode for `dtype`; the others decode row by
/// row in scalar code, which costs more than the tiles save.
pub fn fast_decode(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0R8 | DType::Q8_0R8 | DType::Q5_0R8 | DType::Q4KR8
    )
}

/// `y = x · Wᵀ` (`x` `[n, in]`, `w` `[out, in]`, `y` `[n, out]`) on AMX tiles, split
/// over panels of weight rows. Returns `false`, leaving `y` alone, where AMX is not
/// [`available`] or `w` has no vector decode ([`fast_decode`]).
///
/// # Panics
/// If the lengths disagree with the dimensions.
pub fn matmul(x: &[f32], n: usize, w: MatRef<'_>, y: &mut [f32]) -> bool {
    if !available() || !fast_decode(w.dtype()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        product(x, n, w, y);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AMX is x86-64 only")
}

/// `x` (`[n, k]`) rounded to bf16 in A tiles, into `a`: per 16 rows, per 32 values
/// (zeros past `k`), the 16 rows' 64 bytes one after another ([`act_index`]). Rows
/// `kp · 2` bytes apart would put a tile's 16 rows in one L1 set (a 4 KB stride for
/// 2048 values) and each step's loads would miss. The rows that round `n` up to 16
/// are left as they were: each row of sums depends on its own row of `a` only, and
/// those sums are never read.
fn activations(x: &[f32], n: usize, k: usize, kp: usize, a: &mut Vec<u16>) {
    grow(a, n.next_multiple_of(TR) * kp);
    let mut row = vec![0u16; kp];
    for (m, src) in x.chunks_exact(k).enumerate().take(n) {
        crate::attn::to_bf16(src, &mut row[..k]);
        for (c, piece) in row.chunks_exact(TK).enumerate() {
            let at = act_index(m, c * TK, kp);
            a[at..at + TK].copy_from_slice(piece);
        }
    }
}

/// `v` at least `len` long (zero-filling only what it grows by).
fn grow(v: &mut Vec<u16>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    }
}

thread_local! {
    /// Each thread's activation tiles, reused: a prompt's products would otherwise
    /// allocate and zero megabytes per weight (13% of a 512-token prefill's samples
    /// were `memset`).
    static ACTS: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's decoded panels, reused likewise.
    static PANELS: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Index in [`activations`] of value `c` of row `m`.
#[inline]
fn act_index(m: usize, c: usize, kp: usize) -> usize {
    (m / TR) * kp * TR + (c / TK) * TK * TR + (m % TR) * TK + c % TK
}

/// Index in a panel buffer ([`pack_panel`]) of value `c` of the panel's row `i`, for
/// a shared dimension padded to `kp`: two sub-panels of 16 rows, each `[kp/2][16][2]`
/// (a B tile per 32 values: pairs of neighbouring values of each row, row after row).
#[inline]
fn panel_index(i: usize, c: usize, kp: usize) -> usize {
    (i / TR) * kp * TR + (c / 2) * 2 * TR + (i % TR) * 2 + c % 2
}

/// Rows `r0..r0 + rows` of `w` (`rows <= 32`) decoded to bf16 into `buf` in the
/// tile layout of `panel_index`; rows past `rows` and values past `w.cols()` are
/// zero. The [`fast_decode`] types decode eight rows at a time in vector code where
/// AMX is [`available`]; [`pack_rows`] is their scalar twin.
pub fn pack_panel(w: MatRef<'_>, r0: usize, rows: usize, kp: usize, buf: &mut [u16]) {
    let k = w.cols();
    assert!(rows <= PANEL && r0 + rows <= w.rows() && kp >= k && kp.is_multiple_of(TK));
    assert_eq!(
        buf.len(),
        PANEL * kp,
        "pack_panel: buffer of the wrong length"
    );
    #[cfg(target_arch = "x86_64")]
    if available() && fast_decode(w.dtype()) && r0.is_multiple_of(8) && rows.is_multiple_of(8) {
        // SAFETY: AVX-512 F/BW/VL/BF16 were detected (`available`); the bounds were
        // asserted above and the kernel writes only inside `buf`.
        unsafe { x86::pack_r8(w, r0, rows, kp, buf) };
        zero_padding(rows, k, kp, buf);
        return;
    }
    pack_rows(w, r0, rows, kp, buf);
}

/// The scalar decode of [`pack_panel`].
pub fn pack_rows(w: MatRef<'_>, r0: usize, rows: usize, kp: usize, buf: &mut [u16]) {
    let k = w.cols();
    let mut row = vec![0.0f32; k];
    let mut bits = vec![0u16; k];
    for i in 0..rows {
        w.row_into(r0 + i, &mut row);
        for (d, &v) in bits.iter_mut().zip(&row) {
            *d = half::bf16::from_f32(v).to_bits();
        }
        for (c, &b) in bits.iter().enumerate() {
            buf[panel_index(i, c, kp)] = b;
        }
    }
    zero_padding(rows, k, kp, buf);
}

/// Zeroes what the decode leaves: values `k..kp` of every row (a reused buffer
/// holds old values there, which could be NaN, and NaN times a zero activation is
/// NaN), and the rows from `rows` to the end of their B tile (their sums are never
/// read; zeroed so the buffer says what it holds).
fn zero_padding(rows: usize, k: usize, kp: usize, buf: &mut [u16]) {
    for i in 0..rows.next_multiple_of(TR).min(PANEL) {
        let from = if i < rows { k } else { 0 };
        for c in from..kp {
            buf[panel_index(i, c, kp)] = 0;
        }
    }
}

/// Causal attention of one head (`crate::attn_prefill`'s bf16 form) on tiles: the
/// `t` query rows `q` (`[t, d]`, positions `past..past + t`) against keys `kt` packed
/// in bf16 pairs (panels of 16 keys, `d / 2` slots each: sixteen slots are a B tile)
/// and values `vt` paired by rows (`[keys / 2][dv]`: sixteen pair rows of sixteen
/// columns are a B tile), both zero-padded to a multiple of 32 keys. Per 32 query
/// rows and 32 keys: scores on four tiles, the online softmax in vector code, the
/// probabilities rounded to bf16 into two A tiles, their products with the values
/// on tiles 32 columns at a time, and the running output rescaled and added to in
/// vector code. Queries, keys, values and probabilities are rounded to bf16 and
/// every sum is f32, as the `vdpbf16ps` tiles compute.
///
/// # Panics
/// Without AMX, or if `d` or `dv` is not a multiple of 32, or the buffers are short.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal(
    q: &[f32],
    t: usize,
    kt: &[f32],
    vt: &[f32],
    d: usize,
    dv: usize,
    past: usize,
    scale: f32,
    out: &mut [f32],
) {
    let keys = (past + t).next_multiple_of(2 * TR);
    assert!(available() && d.is_multiple_of(TK) && dv.is_multiple_of(TK));
    assert!(q.len() == t * d && out.len() == t * dv);
    assert!(kt.len() >= keys * d / 2 && vt.len() >= keys / 2 * dv);
    let mut a = ACTS.take();
    activations(q, t, d, d, &mut a);
    // SAFETY: AMX and AVX-512 BF16 were granted (`available`); `a` holds `t` rounded
    // up to 16 query rows as A tiles, `kt` and `vt` every block of 32 keys up to
    // `keys` (asserted above), `out` `t` rows of `dv`.
    unsafe {
        x86::causal(
            &a,
            t,
            kt.as_ptr() as *const u32,
            vt.as_ptr() as *const u32,
            (d, dv),
            past,
            scale,
            out,
        )
    };
    ACTS.set(a);
}

/// Whether decode attention over bf16 cache rows ([`mqa_scores`], [`mqa_values`])
/// runs on the tiles for rows of `l` scored values and `c` weighted ones: AMX is
/// [`available`], `l` is a multiple of 32 and `c` of 64, `c <= l` (MLA's latent
/// rows: 576 and 512).
pub(crate) fn mqa_fits(l: usize, c: usize) -> bool {
    l.is_multiple_of(TK) && c.is_multiple_of(2 * PANEL) && c <= l && l > 0 && available()
}

/// The queries `q` (`[H, L]`) rounded to bf16 as [`mqa_scores`]' B tiles: per panel
/// of 16 heads, per 32 values, 16 rows of the panel's heads' value pairs
/// (`[H/16][L/32][16 pairs][16 heads][2]`, heads past `H` zero).
pub(crate) fn mqa_queries(q: &[f32], heads: usize, out: &mut Vec<u16>) {
    let l = q.len() / heads.max(1);
    assert!(l.is_multiple_of(TK) && q.len() == heads * l);
    let (panels, nk) = (heads.div_ceil(TR), l / TK);
    out.clear();
    out.resize(panels * nk * TR * TK, 0);
    let mut row = vec![0u16; l];
    for (h, src) in q.chunks_exact(l).enumerate() {
        crate::attn::to_bf16(src, &mut row);
        let (hp, hi) = (h / TR, h % TR);
        for kb in 0..nk {
            let tile = (hp * nk + kb) * TR * TK;
            for r in 0..TR {
                let at = tile + r * TK + 2 * hi;
                out[at..at + 2].copy_from_slice(&row[kb * TK + 2 * r..kb * TK + 2 * r + 2]);
            }
        }
    }
}

thread_local! {
    /// A block's rows copied where the key tiles would read past its end (zero-padded).
    static MQA_ROWS: std::cell::Cell<Vec<half::bf16>> = const { std::cell::Cell::new(Vec::new()) };
    /// A block's values paired by rows as B tiles, and its probabilities as A tiles.
    static MQA_TILES: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Scores of `H` queries against the first `n` bf16 rows (of `stride` values) of a
/// cache block, on tiles: `s[h · n + u] = scale · q[h] · rows[u][..L]`, the queries
/// packed by [`mqa_queries`]. The rows load straight into A tiles (16 rows of 32
/// values, `stride · 2` bytes apart) against the queries as B tiles, so one
/// `tdpbf16ps` scores 16 rows for 16 heads; MLA's heads share every latent row
/// (multi-query), which is what makes decode attention a tile shape. Products are
/// exact in f32 and summed in f32, as the `vdpbf16ps` kernels compute. The `next`
/// block's rows (possibly none) are requested into L2 meanwhile.
///
/// # Panics
/// Unless [`mqa_fits`] for `l` (and some `c`), or if the buffers are short.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mqa_scores(
    qa: &[u16],
    heads: usize,
    l: usize,
    (rows, next): (&[half::bf16], &[half::bf16]),
    stride: usize,
    n: usize,
    scale: f32,
    s: &mut [f32],
) {
    assert!(available() && l.is_multiple_of(TK) && l <= stride);
    assert!(qa.len() >= heads.div_ceil(TR) * l * TR && s.len() >= heads * n);
    assert!(rows.len() >= n * stride);
    if n == 0 {
        return;
    }
    // The last key tile reads 16 whole rows: copy where that would pass the block.
    let need = (n.next_multiple_of(TR) - 1) * stride + l;
    let mut pad = MQA_ROWS.take();
    let src = if rows.len() >= need {
        rows
    } else {
        pad.clear();
        pad.extend_from_slice(&rows[..n * stride]);
        pad.resize(need, half::bf16::ZERO);
        &pad[..]
    };
    let next = (next.as_ptr() as *const u16, next.len());
    // SAFETY: AMX was granted (`available`); `src` holds every row the key tiles
    // read (`need` values), `qa` the packed queries of every head panel, `s` `H · n`
    // scores (asserted above); `next` is only prefetched, which never faults.
    unsafe {
        x86::mqa_scores(
            qa,
            heads,
            l,
            (src.as_ptr() as *const u16, next),
            stride,
            n,
            scale,
            s,
        )
    };
    MQA_ROWS.set(pad);
}

/// `out[h] += Σ_{u<n} p[h · n + u] · rows[u][..c]` on tiles, `p` (`[H, n]`) rounded
/// to bf16: per 32 rows, the probabilities as an A tile (16 heads × 32 rows) against
/// the values paired by rows as B tiles (16 pairs × 16 columns, built from the rows
/// with one shuffle per 16 pairs); four column tiles share each A tile.
///
/// # Panics
/// Unless [`mqa_fits`] for `c` (and some `l`), or if the buffers are short.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mqa_values(
    p: &[f32],
    heads: usize,
    n: usize,
    rows: &[half::bf16],
    stride: usize,
    c: usize,
    out: &mut [f32],
) {
    assert!(available() && c.is_multiple_of(2 * PANEL) && c <= stride);
    assert!(p.len() >= heads * n && out.len() == heads * c && rows.len() >= n * stride);
    if n == 0 {
        return;
    }
    let chunks = n.div_ceil(TK);
    let mut t = MQA_TILES.take();
    // Values: chunks × (c / 16) B tiles; then one A tile of probabilities per chunk.
    let vlen = chunks * c * TK;
    grow(&mut t, vlen + chunks * TR * TK);
    let (vt, pt) = t.split_at_mut(vlen);
    // SAFETY: AMX and AVX-512 BF16 were granted (`available`); `rows` holds `n` rows
    // of `stride >= c` values, `vt` and `pt` the sizes above, `p` and `out` `H · n`
    // and `H · c` (asserted above).
    unsafe {
        x86::pair_values(rows.as_ptr() as *const u16, stride, n, c, vt);
        x86::mqa_values(p, heads, n, vt, &mut pt[..chunks * TR * TK], c, out);
    }
    MQA_TILES.set(t);
}

#[cfg(target_arch = "x86_64")]
fn product(x: &[f32], n: usize, w: MatRef<'_>, y: &mut [f32]) {
    let (out, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * k, "amx::matmul: x has the wrong length");
    assert_eq!(y.len(), n * out, "amx::matmul: y has the wrong length");
    if n == 0 || out == 0 {
        return;
    }
    let kp = k.next_multiple_of(TK);
    // Taken out of the thread's slot, not borrowed: while this thread waits for the
    // pool it may run another product (a MoE layer's experts run in parallel), which
    // then finds the slot empty and grows a buffer of its own.
    let mut a = ACTS.take();
    activations(x, n, k, kp, &mut a);
    let dst = crate::matmul::OutPtr(y.as_mut_ptr());
    crate::for_each_index(out.div_ceil(SET * PANEL), |t| {
        let buf_len = SET * PANEL * kp;
        let mut buf = PANELS.take();
        grow(&mut buf, buf_len);
        let r0 = t * SET * PANEL;
        let rows = (SET * PANEL).min(out - r0);
        for (p, b) in buf[..buf_len].chunks_exact_mut(PANEL * kp).enumerate() {
            if p * PANEL < rows {
                pack_panel(w, r0 + p * PANEL, PANEL.min(rows - p * PANEL), kp, b);
            }
        }
        // SAFETY: AMX was granted (`available`, checked by the caller); `a` holds
        // `n` rounded up to 16 rows of `kp` values and `buf` a set of panels, the
        // ones under `rows` packed; the task writes only columns `r0..r0 + rows`
        // of `y` (`[n, out]`), which no other task owns, while `y` stays borrowed
        // for this whole call.
        unsafe { x86::panel_product(&a, n, kp, &buf[..buf_len], rows, dst, out, r0) };
        PANELS.set(buf);
    });
    ACTS.set(a);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{panel_index, MatRef, PANEL, SET, TK, TR};
    use crate::DType;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`), after checking CPUID for AMX-TILE and AMX-BF16.
    pub(super) fn request_tiles() -> bool {
        // CPUID leaf 7 exists on every CPU that reaches here (AVX-512 was detected).
        let l7 = __cpuid_count(7, 0);
        let (bf16, tile) = (l7.edx >> 22 & 1 == 1, l7.edx >> 24 & 1 == 1);
        if !(bf16 && tile) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it changes only which
        // register state the kernel saves for this process.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }

    /// A tile configuration (palette 1): all eight tiles 16 rows of 64 bytes. tmm0–3
    /// hold sums, tmm4–5 activations, tmm6–7 weights.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Loads [`Config`] into this thread's tile state (undone by `tilerelease`).
    ///
    /// # Safety
    /// AMX tile data was granted ([`request_tiles`]).
    #[inline(always)]
    unsafe fn configure() {
        let mut c = Config([0u8; 64]);
        c.0[0] = 1;
        for t in 0..8 {
            c.0[16 + 2 * t] = 64;
            c.0[48 + t] = TR as u8;
        }
        asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly));
    }

    /// `y[m][r0 + j] = a[m] · row j of the panels` for the `n` activation rows `a`
    /// (bf16 A tiles, `kp` values, rows rounded up to 16) and the `rows` weight rows
    /// of a set of panels (`buf`, one panel after another): per pair of A tiles, every
    /// panel.
    ///
    /// # Safety
    /// AMX tile data was granted ([`request_tiles`]); `a` holds
    /// `n.next_multiple_of(16)` rows of `kp` values, `buf` `4 · 32 · kp` with the
    /// panels under `rows` packed; `y` points at an `[n, out]` buffer with
    /// `r0 + rows <= out`, columns `r0..r0 + rows` of which no other thread touches
    /// during the call.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel_product(
        a: &[u16],
        n: usize,
        kp: usize,
        buf: &[u16],
        rows: usize,
        y: crate::matmul::OutPtr,
        out: usize,
        r0: usize,
    ) {
        debug_assert!(a.len() >= n.next_multiple_of(TR) * kp && buf.len() == SET * PANEL * kp);
        debug_assert!(rows <= SET * PANEL);
        configure();
        let mut c = Sums([0.0; PANEL * PANEL]);
        for m0 in (0..n).step_by(PANEL) {
            let two_a = n - m0 > TR;
            let am = a.as_ptr().add(m0 * kp);
            for p in 0..rows.div_ceil(PANEL) {
                let b = buf.as_ptr().add(p * PANEL * kp);
                let cols = PANEL.min(rows - p * PANEL);
                match (two_a, cols > TR) {
                    (true, true) => steps::<true, true>(am, kp, b, &mut c),
                    (true, false) => steps::<true, false>(am, kp, b, &mut c),
                    (false, true) => steps::<false, true>(am, kp, b, &mut c),
                    (false, false) => steps::<false, false>(am, kp, b, &mut c),
                }
                for i in 0..(n - m0).min(PANEL) {
                    let dst = y.0.add((m0 + i) * out + r0 + p * PANEL);
                    std::ptr::copy_nonoverlapping(c.0.as_ptr().add(i * PANEL), dst, cols);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// A 32 × 32 block of sums, as the tiles store them.
    #[repr(C, align(64))]
    struct Sums([f32; PANEL * PANEL]);

    /// tmm0–3 (the sums) to zero.
    #[inline(always)]
    unsafe fn zero4() {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }

    /// One step of the 2 × 2 block: A tiles from `a.0` (and `a.1` if `TA`), 64 bytes a
    /// row; B tiles from `b.0` (and `b.1` if `TB`), `sb` bytes a row; tmm0 += A0·B0,
    /// tmm1 += A0·B1, tmm2 += A1·B0, tmm3 += A1·B1. With both flags each load serves two
    /// products, the most eight tiles allow (a tile load costs about three products'
    /// time here: see BENCHMARKS.md, eighteenth pass).
    #[inline(always)]
    unsafe fn step<const TA: bool, const TB: bool>(
        a: (*const u16, *const u16),
        b: (*const u16, *const u16),
        sb: usize,
    ) {
        asm!(
            "tileloadd tmm4, [{a} + {t}*1]",
            "tileloadd tmm6, [{b} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            a = in(reg) a.0, b = in(reg) b.0, t = in(reg) 64usize, s = in(reg) sb,
            options(nostack, readonly)
        );
        if TB {
            asm!(
                "tileloadd tmm7, [{b} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                b = in(reg) b.1, s = in(reg) sb,
                options(nostack, readonly)
            );
        }
        if TA {
            asm!(
                "tileloadd tmm5, [{a} + {t}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a = in(reg) a.1, t = in(reg) 64usize,
                options(nostack, readonly)
            );
            if TB {
                asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
            }
        }
    }

    /// The sums of one or two A tiles (`TA`) of rows from `a` against one or two B
    /// tiles (`TB`) of the panel, over all `kp` values, stored into `c`.
    #[inline(always)]
    unsafe fn steps<const TA: bool, const TB: bool>(
        a: *const u16,
        kp: usize,
        b: *const u16,
        c: &mut Sums,
    ) {
        zero4();
        for kb in 0..kp / TK {
            let (a0, b0) = (a.add(kb * TK * TR), b.add(kb * TK * TR));
            // The second A tile may lie past the buffer when `TA` is off: never read then,
            // and `wrapping_add` keeps the unused pointer well defined.
            step::<TA, TB>((a0, a0.wrapping_add(TR * kp)), (b0, b0.add(kp * TR)), 64);
        }
        store4(c);
    }

    /// [`super::causal`] after the packing: `a` the query rows as A tiles, `kt` and
    /// `vt` the key and value pairs.
    ///
    /// # Safety
    /// As [`super::causal`] checks: AMX tile data granted, AVX-512 F/BW/VL/BF16, and
    /// every buffer as long as the sizes say.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn causal(
        a: &[u16],
        t: usize,
        kt: *const u32,
        vt: *const u32,
        (d, dv): (usize, usize),
        past: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        const R: usize = 2 * TR;
        configure();
        let sl = d / 2;
        let mut s = Sums([0.0; PANEL * PANEL]);
        let mut ob = Sums([0.0; PANEL * PANEL]);
        let mut p = ProbTiles([0; 2 * TR * TK]);
        let mut o = vec![0.0f32; R * dv];
        let (mut m, mut l, mut alpha) = ([f32::NEG_INFINITY; R], [0.0f32; R], [1.0f32; R]);
        let vstride = dv * 4;
        for r0 in (0..t).step_by(R) {
            let rows = (t - r0).min(R);
            let two = rows > TR;
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            o.fill(0.0);
            let qa = a.as_ptr().add(r0 * d);
            for kb in (0..past + r0 + rows).step_by(R) {
                // Scores of the rows against keys kb..kb + 32: two panels of 16 keys
                // are laid out as a panel of 32 weight rows of `d` values.
                let k0 = kt.add(kb / TR * sl * TR) as *const u16;
                if two {
                    steps::<true, true>(qa, d, k0, &mut s);
                } else {
                    steps::<false, true>(qa, d, k0, &mut s);
                }
                // Online softmax per row: probabilities into the A tiles.
                for i in 0..if two { R } else { TR } {
                    let prow = p.0.as_mut_ptr().add(i * TK);
                    let vis = if i < rows {
                        (past + r0 + i + 1).saturating_sub(kb).min(R)
                    } else {
                        0
                    };
                    if vis == 0 {
                        alpha[i] = 1.0;
                        std::ptr::write_bytes(prow, 0, TK);
                        continue;
                    }
                    // Scaled scores, -inf where the row cannot see (exp gives 0 there).
                    let row = s.0.as_mut_ptr().add(i * PANEL);
                    let (sc, ninf) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
                    let k0 = crate::first_lanes(vis.min(TR));
                    let k1 = crate::first_lanes(vis.saturating_sub(TR));
                    let x0 = _mm512_mask_mul_ps(ninf, k0, _mm512_loadu_ps(row), sc);
                    let x1 = _mm512_mask_mul_ps(ninf, k1, _mm512_loadu_ps(row.add(TR)), sc);
                    _mm512_storeu_ps(row, x0);
                    _mm512_storeu_ps(row.add(TR), x1);
                    let mnew = m[i].max(_mm512_reduce_max_ps(_mm512_max_ps(x0, x1)));
                    alpha[i] = crate::simd_f32::exp(m[i] - mnew);
                    let sum =
                        crate::simd_f32::exp_sum(std::slice::from_raw_parts_mut(row, R), mnew);
                    l[i] = l[i] * alpha[i] + sum;
                    m[i] = mnew;
                    let pb =
                        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row.add(TR)), _mm512_loadu_ps(row));
                    _mm512_storeu_si512(
                        prow as *mut __m512i,
                        std::mem::transmute::<__m512bh, __m512i>(pb),
                    );
                }
                // o = o · alpha + p · v, 32 columns at a time.
                let vb = vt.add(kb / 2 * dv);
                for c0 in (0..dv).step_by(PANEL) {
                    zero4();
                    let pa = (p.0.as_ptr(), p.0.as_ptr().add(TR * TK));
                    let vb2 = (vb.add(c0) as *const u16, vb.add(c0 + TR) as *const u16);
                    if two {
                        step::<true, true>(pa, vb2, vstride);
                    } else {
                        step::<false, true>(pa, vb2, vstride);
                    }
                    store4(&mut ob);
                    for (i, &a) in alpha.iter().enumerate().take(rows) {
                        let al = _mm512_set1_ps(a);
                        for h in 0..2 {
                            let op = o.as_mut_ptr().add(i * dv + c0 + 16 * h);
                            let x = _mm512_loadu_ps(ob.0.as_ptr().add(i * PANEL + 16 * h));
                            _mm512_storeu_ps(op, _mm512_fmadd_ps(_mm512_loadu_ps(op), al, x));
                        }
                    }
                }
            }
            for i in 0..rows {
                let inv = 1.0 / l[i];
                for (dst, &x) in out[(r0 + i) * dv..(r0 + i + 1) * dv]
                    .iter_mut()
                    .zip(&o[i * dv..(i + 1) * dv])
                {
                    *dst = x * inv;
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// tmm0..tmm`G` = the scores of `G` tiles of 16 key rows (from `k`, `stride`
    /// values apart, the next tile 16 rows on) against the query tiles at `q` (one
    /// per 32 values), over `nk` steps. The key tiles alternate between tmm4 and
    /// tmm5 so one's load overlaps the other's product.
    /// Meanwhile `pf.1` cache lines from `pf.0` on are requested into L2, spread
    /// over the steps.
    #[inline(always)]
    unsafe fn key_steps<const G: usize>(
        q: *const u16,
        nk: usize,
        k: *const u16,
        stride: usize,
        pf: (*const u8, usize),
    ) {
        zero4();
        let (sb, t) = (stride * 2, 16 * stride);
        let per = pf.1.div_ceil(nk);
        for kb in 0..nk {
            for i in (kb * per)..((kb + 1) * per).min(pf.1) {
                _mm_prefetch::<_MM_HINT_T1>(pf.0.wrapping_add(64 * i) as *const i8);
            }
            let (qb, kb0) = (q.add(kb * TR * TK), k.add(kb * TK));
            asm!(
                "tileloadd tmm6, [{q} + {s}*1]",
                "tileloadd tmm4, [{k} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                q = in(reg) qb, s = in(reg) 64usize, k = in(reg) kb0, sb = in(reg) sb,
                options(nostack, readonly)
            );
            if G > 1 {
                asm!(
                    "tileloadd tmm5, [{k} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm5, tmm6",
                    k = in(reg) kb0.add(t), sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
            if G > 2 {
                asm!(
                    "tileloadd tmm4, [{k} + {sb}*1]",
                    "tdpbf16ps tmm2, tmm4, tmm6",
                    k = in(reg) kb0.add(2 * t), sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
            if G > 3 {
                asm!(
                    "tileloadd tmm5, [{k} + {sb}*1]",
                    "tdpbf16ps tmm3, tmm5, tmm6",
                    k = in(reg) kb0.add(3 * t), sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
        }
    }

    /// tmm0–3 side by side into `c` as 16 rows of 64 sums (tmm0 columns 0–15, …).
    #[inline(always)]
    unsafe fn store_wide(c: &mut Sums) {
        store_tiles(c, [0, TR, 2 * TR, 3 * TR], 4 * TR);
    }

    /// [`super::mqa_scores`] after its checks: `rows` holds every row the key tiles
    /// read; `next` (start, values) is only prefetched.
    ///
    /// # Safety
    /// AMX tile data granted; `qa` the packed queries of every head panel; `rows`
    /// `(n rounded up to 16) − 1` rows of `stride` values and `l` more; `s` `H · n`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn mqa_scores(
        qa: &[u16],
        heads: usize,
        l: usize,
        (rows, next): (*const u16, (*const u16, usize)),
        stride: usize,
        n: usize,
        scale: f32,
        s: &mut [f32],
    ) {
        configure();
        let (nk, groups) = (l / TK, n.div_ceil(TR));
        let mut c = Sums([0.0; PANEL * PANEL]);
        // The next block's lines, spread over the first head panel's steps.
        let calls = groups.div_ceil(4);
        let per_call = (next.1 * 2).div_ceil(64).div_ceil(calls);
        for hp in 0..heads.div_ceil(TR) {
            let hn = (heads - hp * TR).min(TR);
            let q = qa.as_ptr().add(hp * nk * TR * TK);
            for g0 in (0..groups).step_by(4) {
                let k = rows.add(g0 * TR * stride);
                let pf = if hp == 0 {
                    let from = g0 / 4 * per_call;
                    let lines = per_call.min((next.1 * 2).div_ceil(64).saturating_sub(from));
                    ((next.0 as *const u8).wrapping_add(64 * from), lines)
                } else {
                    (next.0 as *const u8, 0)
                };
                match (groups - g0).min(4) {
                    4 => key_steps::<4>(q, nk, k, stride, pf),
                    3 => key_steps::<3>(q, nk, k, stride, pf),
                    2 => key_steps::<2>(q, nk, k, stride, pf),
                    _ => key_steps::<1>(q, nk, k, stride, pf),
                }
                store_wide(&mut c);
                // c[i][16 j + h]: key g0·16 + 16 j + i, head h; into s[h][key].
                for j in 0..(groups - g0).min(4) {
                    for i in 0..TR {
                        let u = (g0 + j) * TR + i;
                        if u >= n {
                            break;
                        }
                        let row = &c.0[i * 4 * TR + j * TR..][..hn];
                        for (h, &v) in row.iter().enumerate() {
                            *s.get_unchecked_mut((hp * TR + h) * n + u) = v * scale;
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// The first `n` rows' first `c` values paired by rows as B tiles, into `vt`: per
    /// chunk of 32 rows, per 32 columns, two B tiles of 16 rows of (row 2r, row 2r + 1)
    /// pairs (`[n/32][c/16][16][16][2]`, rows past `n` zero). One `vpunpck{l,h}wd`
    /// each (one shuffle, where `vpermt2w` putting the columns in order took three
    /// and a copy: 20% of a decode's attention in `perf`), so the first tile holds
    /// columns 0–3, 8–11, 16–19, 24–27 of the 32 and the second the others;
    /// [`unshuffle`] puts the sums back in order.
    ///
    /// # Safety
    /// AVX-512 F/BW; `rows` holds `n` rows of `stride >= c` values, `c` is a multiple
    /// of 32, `vt` holds `n.div_ceil(32) · c · 32` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pair_values(
        rows: *const u16,
        stride: usize,
        n: usize,
        c: usize,
        vt: &mut [u16],
    ) {
        let ct = c / TR;
        debug_assert!(vt.len() >= n.div_ceil(TK) * c * TK);
        let row = |u: usize, col: usize| {
            if u < n {
                _mm512_loadu_si512(rows.add(u * stride + col) as *const __m512i)
            } else {
                _mm512_setzero_si512()
            }
        };
        for ch in 0..n.div_ceil(TK) {
            for r in 0..TR {
                let u = ch * TK + 2 * r;
                for q in 0..c / TK {
                    let (a, b) = (row(u, q * TK), row(u + 1, q * TK));
                    let t0 = vt.as_mut_ptr().add(((ch * ct + 2 * q) * TR + r) * TK);
                    _mm512_storeu_si512(t0 as *mut __m512i, _mm512_unpacklo_epi16(a, b));
                    _mm512_storeu_si512(
                        t0.add(TR * TK) as *mut __m512i,
                        _mm512_unpackhi_epi16(a, b),
                    );
                }
            }
        }
    }

    /// Columns `0..16` and `16..32` of a 32-column block in order, from the sums of
    /// its two [`pair_values`] tiles (`lo`: columns 0–3, 8–11, 16–19, 24–27; `hi`: 4–7,
    /// 12–15, 20–23, 28–31).
    #[inline(always)]
    unsafe fn unshuffle(lo: __m512, hi: __m512) -> (__m512, __m512) {
        let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
        (
            _mm512_permutex2var_ps(lo, first, hi),
            _mm512_permutex2var_ps(lo, second, hi),
        )
    }

    /// [`super::mqa_values`] after its checks and [`pair_values`].
    ///
    /// # Safety
    /// AMX tile data granted, AVX-512 F/BW/VL/BF16; `p` `H · n`, `vt` as
    /// [`pair_values`] fills it, `pt` `n.div_ceil(32)` A tiles, `out` `H · c`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn mqa_values(
        p: &[f32],
        heads: usize,
        n: usize,
        vt: &[u16],
        pt: &mut [u16],
        c: usize,
        out: &mut [f32],
    ) {
        configure();
        let (chunks, ct) = (n.div_ceil(TK), c / TR);
        let mut sums = Sums([0.0; PANEL * PANEL]);
        for hp in 0..heads.div_ceil(TR) {
            let hn = (heads - hp * TR).min(TR);
            // The panel's probabilities rounded to bf16: per chunk, 16 head rows of 32.
            for ch in 0..chunks {
                let left = n - ch * TK;
                let (k0, k1) = (
                    crate::first_lanes(left.min(TR)),
                    crate::first_lanes(left.saturating_sub(TR).min(TR)),
                );
                for h in 0..TR {
                    let dst = pt.as_mut_ptr().add((ch * TR + h) * TK) as *mut __m512i;
                    if h >= hn {
                        _mm512_storeu_si512(dst, _mm512_setzero_si512());
                        continue;
                    }
                    let src = p.as_ptr().add((hp * TR + h) * n + ch * TK);
                    let x0 = _mm512_maskz_loadu_ps(k0, src);
                    let x1 = _mm512_maskz_loadu_ps(k1, src.add(TR));
                    let b = _mm512_cvtne2ps_pbh(x1, x0);
                    _mm512_storeu_si512(dst, std::mem::transmute::<__m512bh, __m512i>(b));
                }
            }
            for c0 in (0..c).step_by(4 * TR) {
                zero4();
                for ch in 0..chunks {
                    let a = pt.as_ptr().add(ch * TR * TK);
                    let b = vt.as_ptr().add((ch * ct + c0 / TR) * TR * TK);
                    asm!(
                        "tileloadd tmm4, [{a} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm6, [{b2} + {s}*1]",
                        "tdpbf16ps tmm2, tmm4, tmm6",
                        "tileloadd tmm7, [{b3} + {s}*1]",
                        "tdpbf16ps tmm3, tmm4, tmm7",
                        a = in(reg) a,
                        b0 = in(reg) b,
                        b1 = in(reg) b.add(TR * TK),
                        b2 = in(reg) b.add(2 * TR * TK),
                        b3 = in(reg) b.add(3 * TR * TK),
                        s = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                store_wide(&mut sums);
                for h in 0..hn {
                    let o = out.as_mut_ptr().add((hp * TR + h) * c + c0);
                    let x = sums.0.as_ptr().add(h * 4 * TR);
                    for half in 0..2 {
                        let (lo, hi) = (
                            _mm512_loadu_ps(x.add(2 * half * TR)),
                            _mm512_loadu_ps(x.add((2 * half + 1) * TR)),
                        );
                        let (a, b) = unshuffle(lo, hi);
                        let oh = o.add(2 * half * TR);
                        _mm512_storeu_ps(oh, _mm512_add_ps(_mm512_loadu_ps(oh), a));
                        let oh = oh.add(TR);
                        _mm512_storeu_ps(oh, _mm512_add_ps(_mm512_loadu_ps(oh), b));
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// Two A tiles of probabilities: 32 rows of 32 bf16.
    #[repr(C, align(64))]
    struct ProbTiles([u16; 2 * TR * TK]);

    /// tmm0–3 into a 32 × 32 block (tmm0 top left, tmm1 top right, tmm2 bottom left).
    #[inline(always)]
    unsafe fn store4(c: &mut Sums) {
        store_tiles(c, [0, TR, TR * PANEL, TR * PANEL + TR], PANEL);
    }

    /// tmm0–3 into `c` from sums `at[0..4]` on, rows `row` sums apart.
    #[inline(always)]
    unsafe fn store_tiles(c: &mut Sums, at: [usize; 4], row: usize) {
        debug_assert!(at.iter().all(|&a| a + (TR - 1) * row + TR <= c.0.len()));
        let p = c.0.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) p.add(at[0]),
            c1 = in(reg) p.add(at[1]),
            c2 = in(reg) p.add(at[2]),
            c3 = in(reg) p.add(at[3]),
            s = in(reg) row * 4,
            options(nostack)
        );
    }

    /// 32 quant values of a repacked block (four of each of eight rows, row `r`'s at
    /// bytes `4r..4r + 4`, unsigned unless `SIGNED`) times their row's scale plus its
    /// offset, rounded to bf16: 16 pairs, row `r`'s first two values in pair `2r`, its
    /// last two in pair `2r + 1`. `s` holds rows 0–3's and rows 4–7's scales four
    /// lanes each ([`spread`]), `o` the offsets (`-8 d` for Q4_0, `-16 d` for Q5_0,
    /// zero for Q8_0, `-dmin · m` for Q4_K).
    #[inline(always)]
    unsafe fn to_pairs<const SIGNED: bool>(
        q: __m256i,
        s: (__m512, __m512),
        o: (__m512, __m512),
    ) -> __m512i {
        let (q0, q1) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
        let (x0, x1) = if SIGNED {
            (_mm512_cvtepi8_epi32(q0), _mm512_cvtepi8_epi32(q1))
        } else {
            (_mm512_cvtepu8_epi32(q0), _mm512_cvtepu8_epi32(q1))
        };
        // Every product here is exact in f32 (a 4–8 bit quant times a scale of at
        // most 17 significant bits), so the fused add rounds once, as the scalar
        // twin's `q · s - m` does; for Q4_0/Q5_0/Q8_0 nothing rounds before bf16. (A
        // zero value comes out +0 where the twin's (q - 8) · d gives -0 for d < 0.)
        let f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x0), s.0, o.0);
        let f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x1), s.1, o.1);
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(f1, f0))
    }

    /// Eight row values (one per lane) as (rows 0–3, rows 4–7), four lanes each.
    #[inline(always)]
    unsafe fn spread(v: __m256) -> (__m512, __m512) {
        let v = _mm512_castps256_ps512(v);
        let lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let hi = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
        (_mm512_permutexvar_ps(lo, v), _mm512_permutexvar_ps(hi, v))
    }

    /// The eight f16 values at `p` as f32.
    #[inline(always)]
    unsafe fn halves(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// `v · c`, lane by lane, for a spread pair.
    #[inline(always)]
    unsafe fn times(v: (__m512, __m512), c: f32) -> (__m512, __m512) {
        let c = _mm512_set1_ps(c);
        (_mm512_mul_ps(v.0, c), _mm512_mul_ps(v.1, c))
    }

    /// The 32 bytes at `p`.
    #[inline(always)]
    unsafe fn load32(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Stores pair rows `j` and `j + 1` of a B tile from two groups' [`to_pairs`]:
    /// the even pairs of both (first values of the rows) then the odd ones.
    #[inline(always)]
    unsafe fn put(out: *mut __m512i, j: usize, z0: __m512i, z1: __m512i) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        _mm512_storeu_si512(out.add(j), _mm512_permutex2var_epi32(z0, even, z1));
        _mm512_storeu_si512(out.add(j + 1), _mm512_permutex2var_epi32(z0, odd, z1));
    }

    /// [`super::pack_panel`] for the repacked types: rows `r0..r0 + rows` (whole
    /// groups) decoded block by block, two groups (a B tile's 16 rows) at a time. A
    /// B tile with one group decodes that group twice; `pack_panel` then zeroes the
    /// second copy.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/BF16 and F16C; `w` repacked ([`super::fast_decode`]); `r0` and
    /// `rows` multiples of 8 with `rows <= 32` and `r0 + rows <= w.rows()`; `buf` of
    /// `32 · kp` values with `kp >= w.cols()`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_r8(
        w: MatRef<'_>,
        r0: usize,
        rows: usize,
        kp: usize,
        buf: &mut [u16],
    ) {
        let dtype = w.dtype();
        let gb = 8 * w.row_bytes();
        let blocks = w.cols() / TK;
        let bytes = w.bytes();
        debug_assert!(buf.len() == PANEL * kp && r0 + rows <= w.rows());
        let nib = _mm256_set1_epi8(0x0F);
        for s in 0..rows.div_ceil(TR) {
            let g0 = bytes.as_ptr().add((r0 / 8 + 2 * s) * gb);
            let g1 = if 2 * s + 1 < rows / 8 { g0.add(gb) } else { g0 };
            let sub = buf.as_mut_ptr().add(panel_index(TR * s, 0, kp));
            let tile = |b: usize| sub.add(b * TK * TR) as *mut __m512i;
            match dtype {
                DType::Q4_0R8 | DType::Q5_0R8 => {
                    let q5 = dtype == DType::Q5_0R8;
                    let bs = if q5 { 176 } else { 144 };
                    let off = if q5 { -16.0 } else { -8.0 };
                    for b in 0..blocks {
                        let (p0, p1) = (g0.add(b * bs), g1.add(b * bs));
                        let (d0, d1) = (spread(halves(p0)), spread(halves(p1)));
                        let (o0, o1) = (times(d0, off), times(d1, off));
                        let (t0, t1) = (load32(p0.add(16)), load32(p1.add(16)));
                        for k in 0..4 {
                            let ((l0, h0), (l1, h1)) = if q5 {
                                (
                                    crate::qdot::x86::q5_r8_values(p0, t0, k),
                                    crate::qdot::x86::q5_r8_values(p1, t1, k),
                                )
                            } else {
                                let (v0, v1) =
                                    (load32(p0.add(16 + 32 * k)), load32(p1.add(16 + 32 * k)));
                                let hi = |v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                                (
                                    (_mm256_and_si256(v0, nib), hi(v0)),
                                    (_mm256_and_si256(v1, nib), hi(v1)),
                                )
                            };
                            let out = tile(b);
                            put(
                                out,
                                2 * k,
                                to_pairs::<false>(l0, d0, o0),
                                to_pairs::<false>(l1, d1, o1),
                            );
                            put(
                                out,
                                8 + 2 * k,
                                to_pairs::<false>(h0, d0, o0),
                                to_pairs::<false>(h1, d1, o1),
                            );
                        }
                    }
                }
                DType::Q8_0R8 => {
                    let z = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for b in 0..blocks {
                        let (p0, p1) = (g0.add(b * 272), g1.add(b * 272));
                        let (d0, d1) = (spread(halves(p0)), spread(halves(p1)));
                        for k in 0..8 {
                            let (v0, v1) =
                                (load32(p0.add(16 + 32 * k)), load32(p1.add(16 + 32 * k)));
                            put(
                                tile(b),
                                2 * k,
                                to_pairs::<true>(v0, d0, z),
                                to_pairs::<true>(v1, d1, z),
                            );
                        }
                    }
                }
                DType::Q4KR8 => {
                    let k4 = crate::qdot::x86::K4R8Words::new();
                    for sb in 0..blocks / 8 {
                        let (p0, p1) = (g0.add(sb * 1152), g1.add(sb * 1152));
                        let (sc0, mn0) = k4.scales_mins(p0);
                        let (sc1, mn1) = k4.scales_mins(p1);
                        let (dd0, dd1) = (halves(p0), halves(p1));
                        let (dm0, dm1) = (halves(p0.add(16)), halves(p1.add(16)));
                        for j in 0..8 {
                            // Sub-block j: d · scale and -dmin · min per row.
                            let sv = |sc: &[__m256i; 2], d: __m256| {
                                spread(_mm256_mul_ps(d, k4.byte_f32(sc[j / 4], j % 4)))
                            };
                            let ov = |mn: &[__m256i; 2], dm: __m256| {
                                let m = k4.mins_f32(mn[j / 4], j % 4, j % 4)[0];
                                spread(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(dm, m)))
                            };
                            let (s0, s1) = (sv(&sc0, dd0), sv(&sc1, dd1));
                            let (o0, o1) = (ov(&mn0, dm0), ov(&mn1, dm1));
                            let c = j / 2;
                            let out = tile(sb * 8 + j);
                            for k in 0..8 {
                                let at = 128 + 256 * c + 32 * k;
                                let (v0, v1) = (load32(p0.add(at)), load32(p1.add(at)));
                                let (v0, v1) = if j % 2 == 0 {
                                    (v0, v1)
                                } else {
                                    (_mm256_srli_epi16::<4>(v0), _mm256_srli_epi16::<4>(v1))
                                };
                                let (v0, v1) =
                                    (_mm256_and_si256(v0, nib), _mm256_and_si256(v1, nib));
                                put(
                                    out,
                                    2 * k,
                                    to_pairs::<false>(v0, s0, o0),
                                    to_pairs::<false>(v1, s1, o1),
                                );
                            }
                        }
                    }
                }
                other => unreachable!("pack_r8: {} is not a repacked type", other.name()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(dtype: DType, rows: usize, cols: usize, seed: u32) -> (DType, Vec<u8>) {
        let mut s = seed;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 9) as f32 / (1u32 << 23) as f32 - 0.5) * 0.2
            })
            .collect();
        let mut q = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
        crate::quantize::quantize_row(dtype, &vals, &mut q);
        crate::repack::repack(dtype, &q, rows, cols).unwrap()
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 2.0)
            .collect()
    }

    /// The vector decode equals the scalar twin bit for bit, for whole and partial
    /// panels and both types.
    #[test]
    fn vector_decode_equals_scalar_twin() {
        if !available() {
            eprintln!("AMX not available: vector decode not tested");
            return;
        }
        for (dtype, cols) in [
            (DType::Q4_0, 96),
            (DType::Q8_0, 96),
            (DType::Q5_0, 96),
            (DType::Q4K, 512),
        ] {
            let rows = 56;
            let (rt, bytes) = weight(dtype, rows, cols, 7);
            let w = MatRef::new(rt, &bytes, rows, cols).unwrap();
            for kp in [cols, cols + 32] {
                for (r0, n) in [(0, 32), (32, 24), (48, 8), (8, 16)] {
                    let mut v = vec![0xFFFFu16; PANEL * kp];
                    let mut s = vec![0xFFFFu16; PANEL * kp];
                    // Padding the kernels never write must start zero.
                    for i in 0..PANEL {
                        for c in cols..kp {
                            v[panel_index(i, c, kp)] = 0;
                            s[panel_index(i, c, kp)] = 0;
                        }
                    }
                    pack_panel(w, r0, n, kp, &mut v);
                    pack_rows(w, r0, n, kp, &mut s);
                    // Only the tiles the kernel reads need to agree, -0 and +0 alike.
                    let used = n.next_multiple_of(TR) * kp;
                    let z = |b: &u16| if *b == 0x8000 { 0 } else { *b };
                    let (v, s): (Vec<u16>, Vec<u16>) = (
                        v[..used].iter().map(z).collect(),
                        s[..used].iter().map(z).collect(),
                    );
                    assert_eq!(v, s, "{dtype:?} r0 {r0} rows {n} kp {kp}");
                }
            }
        }
    }

    /// Tiles against a direct f64 sum of the same bf16-rounded operands.
    #[test]
    fn tile_products_equal_rounded_direct_sums() {
        if !available() {
            eprintln!("AMX not available: tile products not tested");
            return;
        }
        for dtype in [DType::Q4_0, DType::Q8_0, DType::Q5_0, DType::Q4K] {
            for (n, out, k) in [(16, 32, 256), (37, 56, 512), (70, 200, 256), (5, 8, 256)] {
                let (rt, bytes) = weight(dtype, out, k, n as u32);
                let w = MatRef::new(rt, &bytes, out, k).unwrap();
                let x = data(n * k, out as f32);
                let mut y = vec![f32::NAN; n * out];
                assert!(matmul(&x, n, w, &mut y));
                let bf = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
                let wf = w.to_f32();
                for t in 0..n {
                    for o in 0..out {
                        let (mut sum, mut mag) = (0.0f64, 0.0f64);
                        for c in 0..k {
                            let p = bf(x[t * k + c]) * bf(wf[o * k + c]);
                            sum += p;
                            mag += p.abs();
                        }
                        let got = y[t * out + o] as f64;
                        assert!(
                            (got - sum).abs() <= 1e-6 * mag + 1e-12,
                            "{dtype:?} n {n} out {out} k {k} [{t}][{o}]: {got} vs {sum}"
                        );
                    }
                }
            }
        }
    }
}
