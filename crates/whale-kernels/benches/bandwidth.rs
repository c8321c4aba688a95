//! Memory read bandwidth, the roofline for decode: each thread sums its share of a
//! 1 GiB buffer with `simd_f32::sum`, eight independent accumulators of the widest
//! vectors the CPU has (one accumulator underestimates it: the add latency, not
//! memory, would bound the loop; the baseline build's 128-bit loads read ~17 GB/s
//! where 512-bit ones read ~25 GB/s on the 2-vCPU Xeon of BENCHMARKS.md). Best of 5,
//! on 4 KiB pages and on transparent huge pages (`read_gb_s` is the better).
//! Run: `cargo bench -p whale-kernels --bench bandwidth` (`THREADS=n` to change;
//! `MB=n` reads an n MiB buffer instead, to see which sizes the last-level cache
//! holds between passes: the roofline is the 1 GiB figure, larger than any L3).

use std::time::Instant;

mod common;

fn main() {
    let threads = common::env(
        "THREADS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let n = (common::env("MB", 1024) << 20) / 4;
    // On 4 KiB pages, then on huge pages (as whale's repacked weights are, where the
    // kernel allows): the roofline is the better of the two.
    let mut small: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut huge = whale_kernels::huge::zeroed::<f32>(n);
    huge.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 7) as f32);
    let (a, check) = read(&small, threads);
    let (b, _) = read(&huge, threads);
    small.clear();
    println!(
        "{{\"threads\": {threads}, \"mib\": {}, \"read_gb_s\": {:.2}, \"read_gb_s_4k\": {a:.2}, \"read_gb_s_huge\": {b:.2}, \"checksum\": {check}}}",
        n >> 18,
        a.max(b)
    );
}

/// Best of five passes summing `buf` in `threads` pieces: (GB/s, the sum).
fn read(buf: &[f32], threads: usize) -> (f64, f32) {
    let n = buf.len();
    let mut best = f64::MAX;
    let mut check = 0.0;
    for _ in 0..5 {
        let t = Instant::now();
        check = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .map(|c| s.spawn(move || whale_kernels::simd_f32::sum(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    ((n * 4) as f64 / best / 1e9, check)
}
