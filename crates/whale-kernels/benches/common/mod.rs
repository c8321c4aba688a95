//! Shared by the benches.

use std::time::Instant;

/// Median wall time of `reps` runs of `f`, after one warm-up run.
pub fn median_secs(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[reps / 2]
}

/// Least wall time of `reps` runs of `f`, after one warm-up run: on a shared VM a
/// neighbour on the same physical core slows runs at random, never speeds them up.
#[allow(dead_code)]
pub fn best_secs(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
