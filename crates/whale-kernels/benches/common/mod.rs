//! Shared by the benches (each uses some of it).
#![allow(dead_code)]

use std::time::Instant;

/// Wall times of `reps` runs of `f`, after one warm-up run.
fn times(f: &mut impl FnMut(), reps: usize) -> Vec<f64> {
    f();
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect()
}

/// Median wall time of `reps` runs of `f`, after one warm-up run.
pub fn median_secs(mut f: impl FnMut() + Send, reps: usize) -> f64 {
    // On the pool with its spinners, as a model step runs its kernels: outside it,
    // each fork wakes sleeping workers (tens of microseconds on a short call).
    let mut t = whale_kernels::on_pool(|| times(&mut f, reps));
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[reps / 2]
}

/// Least wall time of `reps` runs of `f`, after one warm-up run: on a shared VM a
/// neighbour on the same physical core slows runs at random, never speeds them up.
pub fn best_secs(mut f: impl FnMut(), reps: usize) -> f64 {
    times(&mut f, reps)
        .into_iter()
        .fold(f64::INFINITY, f64::min)
}

/// The environment's number `name`, or `default` where it is unset or not a number.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The environment's comma-separated numbers `name` (`default` where unset).
///
/// # Panics
/// If a value is not a number: the message names the variable.
pub fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
        })
        .collect()
}
