//! One weight row against 1..4 activation rows, single thread, cache-resident: the
//! kernels' own speed. Run: `cargo bench -p whale-kernels --bench qdot`.

use std::time::Instant;
use whale_kernels::qdot::{self, dot_rows, Isa, Q8Row};
use whale_kernels::quantize::quantize_row;
use whale_kernels::DType;

fn main() {
    let cols: usize = std::env::var("COLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let rows = 64;
    let w: Vec<f32> = (0..cols * rows)
        .map(|i| ((i % 977) as f32 * 0.013).sin())
        .collect();
    let x: Vec<Q8Row> = (0..4)
        .map(|t| {
            Q8Row::from_f32(
                &(0..cols)
                    .map(|i| ((i + t) as f32 * 0.01).cos())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut isas = vec![Isa::Scalar];
    if qdot::isa() != Isa::Scalar {
        isas.push(qdot::isa());
    }
    println!(
        "{:<6} {:<11} {:>3} {:>12} {:>14}",
        "dtype", "isa", "n", "ns/row", "cycles/block@3.5GHz"
    );
    for dt in [DType::Q4_0, DType::Q8_0] {
        let rb = dt.bytes_for(cols).unwrap();
        let mut wq = vec![0u8; rb * rows];
        for (r, o) in wq.chunks_mut(rb).enumerate() {
            quantize_row(dt, &w[r * cols..(r + 1) * cols], o);
        }
        for &isa in &isas {
            for n in [1usize, 4] {
                let a: Vec<&Q8Row> = x[..n].iter().collect();
                let mut out = [0.0f32; 4];
                let iters = 20000;
                let t = Instant::now();
                for i in 0..iters {
                    let r = i % rows;
                    dot_rows(isa, dt, &wq[r * rb..(r + 1) * rb], None, &a, &mut out[..n]);
                    std::hint::black_box(&out);
                }
                let ns = t.elapsed().as_secs_f64() * 1e9 / iters as f64;
                println!(
                    "{:<6} {:<11} {n:>3} {ns:>12.1} {:>14.1}",
                    dt.name(),
                    format!("{isa:?}"),
                    ns * 3.5 / (cols / 32) as f64
                );
            }
        }
    }
}
