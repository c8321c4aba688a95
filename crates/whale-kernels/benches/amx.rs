//! Prompt-sized products of a repacked weight on AMX tiles against the integer
//! (VNNI) kernels, both over the whole thread pool, alternated in short rounds (best
//! and median round reported; see `qdot.rs` for why). Shapes are DeepSeek-V2-Lite's:
//! an attention projection and the dense layer over a 512-token prompt, and a routed
//! expert's gate and down products over the ~48 tokens a 512-token prompt routes to
//! each expert. Run: `cargo bench -p whale-kernels --bench amx` (`ROUNDS=n`,
//! default 10; `TYPE=q4_0|q8_0|q5_0|q4_k`, default q4_0). Prints nothing useful without AMX.

mod common;
use std::time::Instant;
use whale_kernels::quantize::quantize_row;
use whale_kernels::{amx, matmul_quantized, quantize_rows, repack, DType, MatRef};

fn main() {
    let rounds = common::env("ROUNDS", 10);
    let dtype = match std::env::var("TYPE").as_deref() {
        Ok("q8_0") => DType::Q8_0,
        Ok("q5_0") => DType::Q5_0,
        Ok("q4_k") => DType::Q4K,
        _ => DType::Q4_0,
    };
    if !amx::available() {
        println!("AMX tiles are not available on this CPU (or WHALE_AMX=0)");
        return;
    }
    println!(
        "threads: {}, type {}",
        rayon::current_num_threads(),
        dtype.name()
    );
    println!(
        "{:>6} {:>6} {:>5}  {:>9} {:>9} {:>9}  {:>9} {:>9} {:>9}  {:>6}",
        "out", "in", "rows", "vnni ms", "GMAC/s", "median", "amx ms", "GMAC/s", "median", "ratio"
    );
    for (out, inp, n) in [
        (2048, 2048, 512),
        (3072, 2048, 512),
        (10944, 2048, 512),
        (1408, 2048, 48),
        (2048, 1408, 48),
        (1408, 2048, 16),
        (1408, 2048, 128),
    ] {
        if inp % dtype.block().0 != 0 {
            continue;
        }
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i % 977) as f32 * 0.013).sin() * 0.1)
            .collect();
        let mut q = vec![0u8; dtype.bytes_for(out * inp).unwrap()];
        quantize_row(dtype, &w, &mut q);
        let (rt, packed) = repack::repack(dtype, &q, out, inp).unwrap();
        let m = MatRef::new(rt, &packed, out, inp).unwrap();
        let x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.01).cos()).collect();
        let mut y = vec![0.0f32; n * out];
        let macs = (out * inp * n) as f64;
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            let t = Instant::now();
            let acts = quantize_rows(&x, inp);
            assert!(matmul_quantized(&acts, m, &mut y));
            times[0].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            assert!(amx::matmul(&x, n, m, &mut y));
            times[1].push(t.elapsed().as_secs_f64());
        }
        if n == 48 {
            // The decode alone, one thread: every panel of the weight once.
            let kp = inp;
            let mut buf = vec![0u16; 32 * kp];
            let mut best = f64::MAX;
            for _ in 0..rounds {
                let t = Instant::now();
                for r0 in (0..out).step_by(32) {
                    amx::pack_panel(m, r0, 32.min(out - r0), kp, &mut buf);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "  decode of {out} x {inp}: {:.3} ms, {:.3} ns per value (one thread)",
                best * 1e3,
                best * 1e9 / (out * inp) as f64
            );
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        };
        let (vb, vm) = stats(&mut times[0]);
        let (ab, am) = stats(&mut times[1]);
        println!(
            "{out:>6} {inp:>6} {n:>5}  {:>9.3} {:>9.1} {:>9.1}  {:>9.3} {:>9.1} {:>9.1}  {:>5.2}x",
            vb * 1e3,
            macs / vb / 1e9,
            macs / vm / 1e9,
            ab * 1e3,
            macs / ab / 1e9,
            macs / am / 1e9,
            vb / ab
        );
    }
}
