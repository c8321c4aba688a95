//! The integer kernels' own speed, single thread, cache-resident: one file-layout
//! weight row, and one repacked group of eight rows, against 1 and 4 activation rows,
//! on every ISA the CPU runs. The variants alternate in short rounds and the best
//! and median rounds are reported: on a shared VM a neighbour on the same physical
//! core can halve a round's speed at random, so runs of one variant after another
//! compare the neighbour, not the kernels. Run: `cargo bench -p whale-kernels --bench qdot`
//! (`ROUNDS=n`, default 40; `COLS=n`, default 2048).

mod common;
use common::env;
use std::time::Instant;
use whale_kernels::qdot::{self, dot_group, dot_group_pair, dot_rows, Isa, Q8Row};
use whale_kernels::quantize::quantize_row;
use whale_kernels::{repack, DType};

/// One benchmarked product: a label and a closure running `macs` multiply-adds.
struct Case<'a> {
    label: String,
    macs: f64,
    run: Box<dyn FnMut() + 'a>,
    secs: Vec<f64>,
}

fn main() {
    let cols = env("COLS", 2048);
    let rounds = env("ROUNDS", 40);
    // 64 rows of 2048 Q4_0 values: 74 KB, resident in L2 as a prefill task's rows are.
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
    #[cfg(target_arch = "x86_64")]
    {
        if qdot::x86::has_avx2() {
            isas.push(Isa::Avx2);
        }
        if qdot::x86::has_avx512vnni() {
            isas.push(Isa::Avx512Vnni);
        }
    }
    let mut files = Vec::new();
    // Q5_0, Q4_K and Q6_K are read in place (no repacked layout); `COLS` must be a
    // multiple of 256 for the K types.
    for dt in [
        DType::Q4_0,
        DType::Q8_0,
        DType::Q5_0,
        DType::Q4K,
        DType::Q6K,
    ] {
        let Some(rb) = dt.bytes_for(cols) else {
            continue;
        };
        let mut wq = vec![0u8; rb * rows];
        for (r, o) in wq.chunks_mut(rb).enumerate() {
            quantize_row(dt, &w[r * cols..(r + 1) * cols], o);
        }
        let packed = repack::repack(dt, &wq, rows, cols);
        files.push((dt, rb, wq, packed));
    }
    let mut cases: Vec<Case> = Vec::new();
    for (dt, rb, wq, packed) in &files {
        for &isa in &isas {
            for n in [1usize, 2, 4] {
                let a: Vec<&Q8Row> = x[..n].iter().collect();
                let macs = (rows * cols * n) as f64;
                let (a1, a2) = (a.clone(), a);
                let mut out = [0.0f32; 32];
                cases.push(Case {
                    label: format!("{:<8} {:<11} {n}", dt.name(), format!("{isa:?}")),
                    macs,
                    run: Box::new(move || {
                        for r in 0..rows {
                            dot_rows(
                                isa,
                                *dt,
                                &wq[r * rb..(r + 1) * rb],
                                None,
                                &a1,
                                &mut out[..n],
                            );
                            std::hint::black_box(&out);
                        }
                    }),
                    secs: Vec::new(),
                });
                let Some((rt, packed)) = packed else {
                    continue;
                };
                let gb = packed.len() / (rows / 8);
                let a3 = a2.clone();
                let mut out = [0.0f32; 32];
                cases.push(Case {
                    label: format!("{:<8} {:<11} {n}", rt.name(), format!("{isa:?}")),
                    macs,
                    run: Box::new(move || {
                        for g in packed.chunks_exact(gb) {
                            dot_group(isa, *rt, g, &a2, &mut out[..8 * n]);
                            std::hint::black_box(&out);
                        }
                    }),
                    secs: Vec::new(),
                });
                // Two groups per call (`dot_group_pair`), where the ISA has a kernel for it.
                if qdot::has_pair_kernel(isa, *rt) {
                    let mut out = [0.0f32; 64];
                    cases.push(Case {
                        label: format!(
                            "{:<8} {:<11} {n}",
                            format!("{}x2", rt.name()),
                            format!("{isa:?}")
                        ),
                        macs,
                        run: Box::new(move || {
                            for g in packed.chunks_exact(2 * gb) {
                                let (w0, w1) = g.split_at(gb);
                                dot_group_pair(isa, *rt, w0, w1, &a3, &mut out[..16 * n]);
                                std::hint::black_box(&out);
                            }
                        }),
                        secs: Vec::new(),
                    });
                }
            }
        }
    }
    // Each round: every case for ~2 ms (repetitions sized from a first timing).
    let reps: Vec<usize> = cases
        .iter_mut()
        .map(|c| {
            let t = Instant::now();
            (c.run)();
            (2e-3 / t.elapsed().as_secs_f64().max(1e-7)).ceil() as usize
        })
        .collect();
    for _ in 0..rounds {
        for (c, &k) in cases.iter_mut().zip(&reps) {
            let t = Instant::now();
            for _ in 0..k {
                (c.run)();
            }
            c.secs.push(t.elapsed().as_secs_f64() / k as f64);
        }
    }
    println!("{rounds} alternated rounds, one thread, {rows} rows × {cols}");
    println!(
        "{:<24} {:>12} {:>12}",
        "dtype isa rows", "best GMAC/s", "median"
    );
    for c in &mut cases {
        c.secs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let best = c.macs / c.secs[0] / 1e9;
        let median = c.macs / c.secs[c.secs.len() / 2] / 1e9;
        println!("{:<24} {best:>12.2} {median:>12.2}", c.label);
    }
}
