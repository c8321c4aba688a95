//! Decode-shaped products streaming their weights from memory, against the read
//! bandwidth in the same process: the share of the roofline the integer kernels and
//! `matmul_many`'s task split reach on their own, without the rest of a decode step.
//! Weights: 1 GiB of repacked Q4_0 expert-sized matrices (1408 × 2048, as a
//! DeepSeek-V2-Lite expert's gate), more than any L3 here, walked in order six at a
//! time (one `matmul_many` per six, as a MoE layer's routed gate and up products
//! are), so each product meets its weights cold. The calls run on the pool with its
//! spinners, as a model step runs them. The variants alternate in rounds; the last
//! line also gives one call's time against the plain read's time for its bytes (their
//! difference is the call's fixed cost: fork, set-up, tail).
//! Run: `cargo bench -p whale-kernels --bench stream` (`ROUNDS=n`, default 5).
//! `INPUTS=n` (default 1) gives every product `n` input rows, as a batched decode
//! step's experts see the several tokens routed to them.
//! `SHAPE=rows,cols,per` changes the matrices and how many go to one call: `512,128,16`
//! is an MLA layer's sixteen per-head `W_UKᵀ` products at decode, `128,512,16` its
//! `W_UV` ones, `3072,2048,1` the query projection. `TOTAL_MB=n` makes the set
//! smaller (walked as many times as make 1 GiB): at 1 it stays in cache, which leaves
//! a call's cost without memory. The plain read runs a second time in 32 KiB tasks
//! handed out as `matmul_many` hands out its own (`CHUNK_KB=n`): what a task split
//! alone costs the memory (nothing measurable on the Emerald Rapids VM: 24.7 GB/s
//! against 24.1 whole).
//! `PREFETCH="near,far;near,far,far1;…"` compares the integer kernels' prefetch
//! distances (bytes ahead into L1, into L2, and into L2 for one-row products when
//! given, [`whale_kernels::qdot::Prefetch`]): each round runs every setting on huge
//! pages, then the plain read, and each setting's line gives the median of its speed
//! over its round's plain read, so a neighbour that slows one round slows both sides
//! of its ratios.

mod common;
use common::{env, env_list};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use whale_kernels::quantize::quantize_row;
use whale_kernels::{matmul_many, qdot, repack, simd_f32, DType, MatMul, MatRef};

fn main() {
    let rounds = env("ROUNDS", 5);
    let [rows, cols, per] = env_list("SHAPE", "1408,2048,6")[..] else {
        panic!("SHAPE=rows,cols,per")
    };
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i % 977) as f32 * 0.013).sin())
        .collect();
    let rb = DType::Q4_0.bytes_for(cols).unwrap();
    let mut wq = vec![0u8; rb * rows];
    for (r, o) in wq.chunks_mut(rb).enumerate() {
        quantize_row(DType::Q4_0, &w[r * cols..(r + 1) * cols], o);
    }
    let (rt, packed) = repack::repack(DType::Q4_0, &wq, rows, cols).expect("repackable");
    // `TOTAL_MB` (default 1024): a set small enough for the caches shows a call's
    // cost apart from memory.
    let total = env("TOTAL_MB", 1024);
    let count = ((total << 20) / packed.len()).max(per);
    // The same weights on 4 KiB pages and on huge pages (as whale repacks them where
    // the kernel allows): `small` and `huge` alternate.
    let mut small = Vec::with_capacity(count * packed.len());
    for _ in 0..count {
        small.extend_from_slice(&packed);
    }
    let mut huge = whale_kernels::huge::zeroed::<u8>(small.len());
    huge.copy_from_slice(&small);
    // A set smaller than 1 GiB is walked as many times as make 1 GiB.
    let passes = ((1usize << 30) / small.len()).max(1);
    let mats = |all| matrices(all, rt, packed.len(), rows, cols);
    let (mats4k, matsh) = (mats(&small), mats(&huge));
    let all = &small;
    let inputs = env("INPUTS", 1);
    let x: Vec<f32> = (0..inputs * cols)
        .map(|i| (i as f32 * 0.01).cos())
        .collect();
    let mut ys = vec![vec![0.0f32; inputs * rows]; per];
    let floats: Vec<f32> = (0..(1usize << 28)).map(|i| (i % 7) as f32).collect();
    println!(
        "threads: {}, {} matrices of {rows}x{cols} {} ({:.0} MB), {per} per call, \
         {inputs} input rows each",
        rayon::current_num_threads(),
        mats4k.len(),
        rt.name(),
        all.len() as f64 / 1e6
    );
    let (mut prod, mut prod_h, mut bw, mut bw_tasks) = (vec![], vec![], vec![], vec![]);
    let chunk = env("CHUNK_KB", 32) << 8; // floats
    let pairs: Vec<qdot::Prefetch> = std::env::var("PREFETCH")
        .map(|v| {
            v.split(';')
                .map(|p| qdot::parse_prefetch(p).expect("PREFETCH=near,far[,far1];…"))
                .collect()
        })
        .unwrap_or_default();
    // The kernels' choice first: it reads `WHALE_PREFETCH`, which would otherwise
    // land in the middle of the first pair's run.
    qdot::isa();
    let default_prefetch = qdot::prefetch_distances();
    let mut per_pair = vec![vec![]; pairs.len()];
    // GB/s of one pass of products over `mats`, on the pool with its spinners, as a
    // model step runs them.
    let mut products = |mats: &[MatRef<'_>]| {
        let t = Instant::now();
        whale_kernels::on_pool(|| {
            for call in (0..passes).flat_map(|_| mats.chunks(per)) {
                let jobs = call
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|(&w, y)| MatMul {
                        x: &x,
                        rows: None,
                        n: inputs,
                        w,
                        y,
                    })
                    .collect();
                matmul_many(jobs, false);
            }
        });
        (passes * all.len()) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    for _ in 0..rounds {
        let mut speeds = Vec::with_capacity(pairs.len());
        for &p in &pairs {
            qdot::set_prefetch(p);
            speeds.push(products(&matsh));
        }
        qdot::set_prefetch(default_prefetch);
        prod.push(products(&mats4k));
        prod_h.push(products(&matsh));
        let t = Instant::now();
        let s: f32 = {
            use rayon::prelude::*;
            let per = floats.len().div_ceil(rayon::current_num_threads());
            floats.par_chunks(per).map(simd_f32::sum).sum()
        };
        std::hint::black_box(s);
        let plain = (floats.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9;
        bw.push(plain);
        for (v, s) in per_pair.iter_mut().zip(speeds) {
            v.push(s / plain);
        }
        // The same read in tasks handed out as `matmul_many` hands out its own.
        let t = Instant::now();
        let sums: Vec<AtomicU32> = (0..floats.len() / chunk)
            .map(|_| AtomicU32::new(0))
            .collect();
        whale_kernels::on_pool(|| {
            whale_kernels::for_each_index(sums.len(), |i| {
                let s = simd_f32::sum(&floats[i * chunk..(i + 1) * chunk]);
                sums[i].store(s.to_bits(), Ordering::Relaxed);
            })
        });
        std::hint::black_box(&sums);
        bw_tasks.push((floats.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (p, ph, b) = (med(&mut prod), med(&mut prod_h), med(&mut bw));
    for (p, v) in pairs.iter().zip(&mut per_pair) {
        println!(
            "prefetch {p}: products on huge pages {:.3} of the plain read",
            med(v)
        );
    }
    println!(
        "plain read in tasks of {} KiB: {:.2} GB/s",
        chunk >> 8,
        med(&mut bw_tasks)
    );
    let calls = mats4k.len().div_ceil(per) as f64;
    println!("{passes} passes over the set");
    println!(
        "products {p:.2} GB/s on 4 KiB pages, {ph:.2} on huge pages; plain read (4 KiB pages) \
         {b:.2} GB/s; medians of {rounds}; a call on huge pages {:.1} µs, {:.1} at the plain \
         read's speed",
        all.len() as f64 / calls / ph / 1e3,
        all.len() as f64 / calls / b / 1e3,
    );
}

/// `all` cut into matrices of `bytes` each.
fn matrices(all: &[u8], dt: DType, bytes: usize, rows: usize, cols: usize) -> Vec<MatRef<'_>> {
    all.chunks_exact(bytes)
        .map(|b| MatRef::new(dt, b, rows, cols).unwrap())
        .collect()
}
