//! f32 vs bf16/f16 weights decoded on the fly, decode-sized (1 row) and
//! prefill-sized (64 rows) products. Run: `cargo bench -p whale-kernels --bench weights`.

mod common;
use common::median_secs;

use half::{bf16, f16};
use whale_kernels::{matmul, DType, MatRef};

fn main() {
    let (out, inp) = (4096usize, 2048usize);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i % 977) as f32 * 0.013).sin())
        .collect();
    let f32b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bfb: Vec<u8> = w
        .iter()
        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f16b: Vec<u8> = w
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<6} {:>5} {:>10} {:>10} {:>12}",
        "dtype", "rows", "ms", "GB/s(w)", "GFLOP/s"
    );
    for n in [1usize, 64] {
        let x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.001).cos()).collect();
        let mut y = vec![0.0f32; n * out];
        for (name, dt, bytes) in [
            ("f32", DType::F32, &f32b),
            ("bf16", DType::BF16, &bfb),
            ("f16", DType::F16, &f16b),
        ] {
            let m = MatRef::new(dt, bytes, out, inp).unwrap();
            let s = median_secs(|| matmul(&x, n, m, &mut y), if n == 1 { 51 } else { 11 });
            println!(
                "{name:<6} {n:>5} {:>10.3} {:>10.2} {:>12.2}",
                s * 1e3,
                bytes.len() as f64 / s / 1e9,
                2.0 * (n * out * inp) as f64 / s / 1e9
            );
        }
    }
}
