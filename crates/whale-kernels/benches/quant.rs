//! Quantised weights through the integer kernels: decode (1 row) and prefill-sized
//! products on a matrix larger than the caches. Run: `cargo bench -p whale-kernels --bench quant`
//! (`WHALE_SCALAR=1` forces the scalar twin). Each file type runs as stored and
//! repacked into interleaved groups (`q4_0_r8`, `q8_0_r8`), side by side.

mod common;
use common::median_secs;

use whale_kernels::quantize::quantize_row;
use whale_kernels::{matmul, qdot, DType, MatRef};

fn main() {
    let out = common::env("ROWS", 32768);
    let inp = 2048usize;
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i % 977) as f32 * 0.013).sin())
        .collect();
    println!(
        "threads: {}, isa: {:?}",
        rayon::current_num_threads(),
        qdot::isa()
    );
    println!(
        "{:<8} {:>5} {:>10} {:>10} {:>12}",
        "dtype", "rows", "ms", "GB/s(w)", "GMAC/s"
    );
    for dt in [DType::Q4_0, DType::Q8_0] {
        let rb = dt.bytes_for(inp).unwrap();
        let mut bytes = vec![0u8; out * rb];
        for (r, o) in bytes.chunks_mut(rb).enumerate() {
            quantize_row(dt, &w[r * inp..(r + 1) * inp], o);
        }
        let (rt, packed) = whale_kernels::repack::repack(dt, &bytes, out, inp).unwrap();
        for m in [
            MatRef::new(dt, &bytes, out, inp).unwrap(),
            MatRef::new(rt, &packed, out, inp).unwrap(),
        ] {
            for n in [1usize, 4, 64] {
                let x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.001).cos()).collect();
                let mut y = vec![0.0f32; n * out];
                let s = median_secs(|| matmul(&x, n, m, &mut y), if n == 1 { 21 } else { 5 });
                println!(
                    "{:<8} {n:>5} {:>10.3} {:>10.2} {:>12.2}",
                    m.dtype().name(),
                    s * 1e3,
                    bytes.len() as f64 / s / 1e9,
                    (n * out * inp) as f64 / s / 1e9
                );
            }
        }
    }
}
