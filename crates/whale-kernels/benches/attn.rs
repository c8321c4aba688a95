//! Absorbed-MLA decode attention at depth: 16 query heads over `n` latent rows of 576
//! values (DeepSeek-V2-Lite: kv_lora 512 + rope 64), one 64-row page at a time as the
//! paged cache hands them over. Run: `cargo bench -p whale-kernels --bench attn`.

mod common;
use common::median_secs;

use whale_kernels::{mqa_scores, mqa_values};

fn main() {
    let (heads, l, c) = (16usize, 576usize, 512usize);
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:>6} {:>10} {:>10} {:>10}",
        "rows", "scores ms", "values ms", "GMAC/s"
    );
    for n in [1024usize, 4096] {
        let q: Vec<f32> = (0..heads * l).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows: Vec<f32> = (0..n * l).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = vec![0.0f32; heads * n];
        let ts = median_secs(|| mqa_scores(&q, heads, &rows, l, n, 0.1, &mut s), 21);
        let mut o = vec![0.0f32; heads * c];
        let tv = median_secs(|| mqa_values(&s, heads, &rows, l, n, &mut o), 21);
        let macs = (heads * n * (l + c)) as f64;
        println!(
            "{n:>6} {:>10.3} {:>10.3} {:>10.2}",
            ts * 1e3,
            tv * 1e3,
            macs / (ts + tv) / 1e9
        );
    }
}
