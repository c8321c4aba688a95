//! Memory read bandwidth, the roofline for decode: each thread sums its share of a
//! 1 GiB buffer with eight independent accumulators (one accumulator underestimates
//! it: the add latency, not memory, would bound the loop). Best of 5 passes.
//! Run: `cargo bench -p whale-kernels --bench bandwidth` (`THREADS=n` to change).

use std::time::Instant;

fn sum8(chunk: &[f32]) -> f32 {
    let mut acc = [[0.0f32; 8]; 8];
    let mut it = chunk.chunks_exact(64);
    for c in &mut it {
        for (k, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v += c[k * 8 + j];
            }
        }
    }
    let tail: f32 = it.remainder().iter().sum();
    acc.iter().flatten().sum::<f32>() + tail
}

fn main() {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = f64::MAX;
    let mut check = 0.0;
    for _ in 0..5 {
        let t = Instant::now();
        check = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .map(|c| s.spawn(move || sum8(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gbs = (n * 4) as f64 / best / 1e9;
    println!("{{\"threads\": {threads}, \"read_gb_s\": {gbs:.2}, \"checksum\": {check}}}");
}
