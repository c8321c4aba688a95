//! Absorbed-MLA decode attention at depth: 16 query heads over `n` latent rows of 576
//! values (DeepSeek-V2-Lite: kv_lora 512 + rope 64), one 64-row page at a time as the
//! paged cache hands them over (f32 and f16 pages; `cold`: f16 pages that come from
//! memory, as in a decode step; then the same as bf16 pages, warm and cold, on AMX
//! tiles where the CPU has them, and `vec`: the same bf16 pages with the tiles
//! turned off, `vdpbf16ps`, alternated in the same run); then expanded-MLA prefill of 512 rows at depth, 16
//! heads of 192-value keys and 128-value values, as the tiled causal kernel computes
//! it beside the scores → softmax → weighted-sum composition it replaced.
//! Run: `cargo bench -p whale-kernels --bench attn` (`TILED_ONLY=1`: the tiled prefill
//! kernel alone, best of seven runs; `WHALE_ISA=avx2` for its AVX2 tiles).

mod common;
use common::{best_secs, median_secs};

use rayon::prelude::*;
use whale_kernels::{
    causal_attention, causal_attention_bf16, mqa_blocks, mqa_scores, mqa_values, softmax_inplace,
    Block, Rows,
};

fn main() {
    let (heads, l, c) = (16usize, 576usize, 512usize);
    println!("threads: {}", rayon::current_num_threads());
    // `TILED_ONLY=1`: only the tiled prefill kernel (quick alternated runs).
    let tiled_only = std::env::var_os("TILED_ONLY").is_some();
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "rows",
        "scores ms",
        "values ms",
        "GMAC/s",
        "paged ms",
        "GMAC/s",
        "f16 ms",
        "GMAC/s",
        "cold ms",
        "GMAC/s",
        "bf16 ms",
        "GMAC/s",
        "cold bf16",
        "GMAC/s",
        "bf16 vec",
        "cold vec"
    );
    // `DECODE_DEPTHS=48,1024` picks the depths.
    for n in common::env_list("DECODE_DEPTHS", "1024,4096")
        .into_iter()
        .filter(|_| !tiled_only)
    {
        let q: Vec<f32> = (0..heads * l).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows: Vec<f32> = (0..n * l).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = vec![0.0f32; heads * n];
        let ts = median_secs(|| mqa_scores(&q, heads, &rows, l, n, 0.1, &mut s), 21);
        let mut o = vec![0.0f32; heads * c];
        let tv = median_secs(|| mqa_values(&s, heads, &rows, l, n, &mut o), 21);
        let macs = (heads * n * (l + c)) as f64;
        // The decode step as the model runs it: 64-row pages, merged softmax.
        let pages: Vec<Block> = rows.chunks(64 * l).map(Block::F32).collect();
        let mut o2 = vec![0.0f32; heads * c];
        let tb = median_secs(|| mqa_blocks(&q, heads, &pages, l, n, c, 0.1, &mut o2), 21);
        // The same pages stored as f16 (the default cache type).
        let halves: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f32(x)).collect();
        let pages16: Vec<Block> = halves.chunks(64 * l).map(Block::F16).collect();
        let th = median_secs(
            || mqa_blocks(&q, heads, &pages16, l, n, c, 0.1, &mut o2),
            21,
        );
        // As a decode step meets them: one layer's pages among 27 layers' worth of
        // others and a token's weights in between, so every page comes from memory.
        // Copies past the last-level cache, taken in turn.
        let copies = (320 << 20) / (n * l * 2) + 1;
        let cold: Vec<Vec<half::f16>> = (0..copies).map(|_| halves.clone()).collect();
        let cold_pages: Vec<Vec<Block>> = cold
            .iter()
            .map(|h| h.chunks(64 * l).map(Block::F16).collect())
            .collect();
        let mut turn = 0;
        let tc = median_secs(
            || {
                turn = (turn + 1) % copies;
                mqa_blocks(&q, heads, &cold_pages[turn], l, n, c, 0.1, &mut o2)
            },
            21,
        );
        // The same pages as bf16 (`vdpbf16ps` where the CPU has AVX-512 BF16), warm
        // and cold as above.
        let b16: Vec<half::bf16> = rows.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let pages_b16: Vec<Block> = b16.chunks(64 * l).map(Block::Bf16).collect();
        // Tiles (where the CPU has AMX) and vectors alternated: (tiles, vectors).
        let (tbf, tbv) =
            tiles_and_vectors(|| mqa_blocks(&q, heads, &pages_b16, l, n, c, 0.1, &mut o2));
        drop(cold_pages);
        drop(cold);
        let cold_b: Vec<Vec<half::bf16>> = (0..copies).map(|_| b16.clone()).collect();
        let cold_bp: Vec<Vec<Block>> = cold_b
            .iter()
            .map(|h| h.chunks(64 * l).map(Block::Bf16).collect())
            .collect();
        let (tcb, tcv) = tiles_and_vectors(|| {
            turn = (turn + 1) % copies;
            mqa_blocks(&q, heads, &cold_bp[turn], l, n, c, 0.1, &mut o2)
        });
        println!(
            "{n:>6} {:>10.3} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>10.3} {:>10.3}",
            ts * 1e3,
            tv * 1e3,
            macs / (ts + tv) / 1e9,
            tb * 1e3,
            macs / tb / 1e9,
            th * 1e3,
            macs / th / 1e9,
            tc * 1e3,
            macs / tc / 1e9,
            tbf * 1e3,
            macs / tbf / 1e9,
            tcb * 1e3,
            macs / tcb / 1e9,
            tbv * 1e3,
            tcv * 1e3
        );
    }

    println!();
    println!(
        "{:>6} {:>6} {:>14} {:>10} {:>14} {:>10} {:>14} {:>10}",
        "rows",
        "depth",
        "composed ms",
        "GMAC/s",
        "tiled best ms",
        "GMAC/s",
        "bf16 best ms",
        "GMAC/s"
    );
    let (heads, d, dv) = (16usize, 192usize, 128usize);
    for (t, past) in [(512usize, 0usize), (512, 4096)] {
        let n = past + t;
        let q: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.11).cos()).collect();
        let v: Vec<f32> = (0..n * dv).map(|i| (i as f32 * 0.23).sin()).collect();
        let scale = 1.0 / (d as f32).sqrt();
        // Causal: row i sees past + i + 1 keys.
        let macs = heads as f64 * (t * past + t * (t + 1) / 2) as f64 * (d + dv) as f64;
        let composed = if tiled_only {
            f64::NAN
        } else {
            median_secs(
                || {
                    (0..heads).for_each(|_| {
                        let mut s = vec![0.0f32; t * n];
                        mqa_scores(&q, t, &k, d, n, scale, &mut s);
                        for (i, row) in s.chunks_mut(n).enumerate() {
                            softmax_inplace(&mut row[..past + i + 1]);
                            row[past + i + 1..].fill(0.0);
                        }
                        let mut o = vec![0.0f32; t * dv];
                        mqa_values(&s, t, &v, dv, n, &mut o);
                    })
                },
                3,
            )
        };
        // The tiled kernel in f32, and in bf16 (`vdpbf16ps` tiles where the CPU has
        // AVX-512 BF16), each best of seven.
        type Causal = fn(&[f32], &[Rows<'_>], Rows<'_>, usize, f32, &mut [f32]);
        let time = |kernel: Causal| {
            best_secs(
                || {
                    (0..heads).into_par_iter().for_each(|_| {
                        let mut o = vec![0.0f32; t * dv];
                        kernel(
                            &q,
                            &[Rows::dense(&k, d)],
                            Rows::dense(&v, dv),
                            past,
                            scale,
                            &mut o,
                        );
                    })
                },
                7,
            )
        };
        let (tiled, bf16) = (time(causal_attention), time(causal_attention_bf16));
        println!(
            "{t:>6} {past:>6} {:>14.1} {:>10.2} {:>14.1} {:>10.2} {:>14.1} {:>10.2}",
            composed * 1e3,
            macs / composed / 1e9,
            tiled * 1e3,
            macs / tiled / 1e9,
            bf16 * 1e3,
            macs / bf16 / 1e9
        );
    }
}

/// Median seconds of `f` with AMX tiles allowed and with them turned off, in five
/// alternated rounds of five runs.
fn tiles_and_vectors(mut f: impl FnMut() + Send) -> (f64, f64) {
    let (mut tiles, mut vectors) = (vec![], vec![]);
    for _ in 0..5 {
        whale_kernels::amx::set_allowed(true);
        tiles.push(median_secs(&mut f, 5));
        whale_kernels::amx::set_allowed(false);
        vectors.push(median_secs(&mut f, 5));
    }
    whale_kernels::amx::set_allowed(true);
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    (median(tiles), median(vectors))
}
