//! Numeric kernels for whale.
//!
//! Kernels take slices and dimensions, never model types. Each has a plain-Rust
//! scalar twin; the hot ones also have AVX2 and AVX-512 (VNNI) paths picked at run
//! time (`WHALE_ISA` narrows the pick), tested against their twins.
//!
//! ```
//! use whale_kernels::{matmul, DType, MatRef};
//! // y = x · Wᵀ with W stored [out=2, in=3] as f32 bytes.
//! let w: Vec<u8> = [1.0f32, 0.0, 0.0, 0.0, 1.0, 1.0]
//!     .iter().flat_map(|v| v.to_le_bytes()).collect();
//! let w = MatRef::new(DType::F32, &w, 2, 3).unwrap();
//! let mut y = vec![0.0; 2];
//! matmul(&[1.0, 2.0, 3.0], 1, w, &mut y);
//! assert_eq!(y, vec![1.0, 5.0]);
//! ```
#![deny(missing_docs)]

pub mod amx;
mod attn;
mod attn_prefill;
mod dtype;
pub mod huge;
mod matmul;
mod ops;
pub mod qdot;
pub mod quant;
pub mod quantize;
pub mod repack;
pub mod simd_f32;

pub use attn::{mqa_blocks, mqa_scores, mqa_values, Block};
pub use attn_prefill::{causal_attention, causal_attention_bf16, Rows};
pub use dtype::{decode_into, DType, MatRef};
pub use matmul::{
    axpy_row, matmul, matmul_many, matmul_quantized, matmul_t_vec, matmul_with, matvec_many,
    quantize_rows, MatMul, MatVec,
};
pub use ops::{dot, rmsnorm, rmsnorm_inplace, softmax_inplace};
pub use simd_f32::swiglu;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Where a scratch buffer's first 64-byte boundary lies (in values; at most 15 for
/// f32): kernels that load whole 512-bit vectors at multiples of 16 values from it
/// start there, since a load straddling two cache lines costs about two.
pub(crate) fn align64(buf: &[f32]) -> usize {
    buf.as_ptr().align_offset(64).min(15)
}

/// Resizes `buf` (new values zero, old ones kept) to hold `len` values from its first
/// 64-byte boundary, and returns where that is ([`align64`]).
pub(crate) fn resize_aligned(buf: &mut Vec<f32>, len: usize) -> usize {
    buf.resize(len + 15, 0.0);
    align64(buf)
}

/// The mask of the first `n` (≤ 16) lanes of a 16-lane vector.
#[cfg(target_arch = "x86_64")]
pub(crate) fn first_lanes(n: usize) -> u16 {
    ((1u32 << n) - 1) as u16
}

/// Runs `f` on a worker thread of rayon's global pool (directly when already on
/// one). A parallel kernel called from outside the pool injects its job and parks
/// the caller on a futex until a worker finishes it: for a decode step's ~240
/// parallel kernels that was ~11% of the token's time in `perf` (futex wake-ups,
/// context switches). From a worker, the kernels fork and join among the pool's
/// threads. While `f` runs, every other worker spins looking for those jobs
/// instead of going through rayon's idle rounds (`sched_yield`, then a futex
/// sleep that the next fork must wake): a decode step forks ~9 times per layer
/// with serial work between, and the sleeps and wake-ups were ~5% of a depth-4096
/// token in `perf`. Side by side (`whale bench -p 0 -n 32/64`, alternated) the
/// spinning pool gave 12.6 → 14.1 tok/s at depth 0 and 9.5 → 10.3 at depth 4096.
///
/// A spinner blocks its worker until `f` returns, so it must never sit on top of
/// a job that `f` waits for: rayon runs a worker's queued broadcast inside any
/// join the worker is waiting in, above whatever that worker was doing. Two rules
/// keep the spinners at the bottom of their workers' stacks:
/// - one caller at a time (a lock, `SERIAL`): a second caller's spinner could otherwise
///   start inside a join of the first caller's step on the same worker, and both
///   steps would wait on each other;
/// - `f` starts only after every other worker has started its spinner: a worker
///   still looking for work when the broadcast was queued could otherwise steal
///   one of `f`'s first jobs and start its spinner inside that job's join.
///
/// Both deadlocks happened (`cargo test`'s two threads, and back-to-back steps from
/// one thread); `on_pool_never_deadlocks_with_many_or_back_to_back_callers` is
/// their test.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // A panic in another caller's `f` poisons nothing that this lock guards.
    let _one_at_a_time = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Set when `f` returns or unwinds, so the spinners stop and the scope can end.
    struct SetOnDrop<'a>(&'a AtomicBool);
    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = AtomicBool::new(false);
    let started = AtomicUsize::new(0);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        let (done, started) = (&done, &started);
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) != owner {
                started.fetch_add(1, Ordering::AcqRel);
                spin_for_work(done);
            }
        });
        let _stop = SetOnDrop(done);
        // Every other worker runs its broadcast before anything else it finds
        // (rayon looks in a worker's own queues before stealing), so each comes
        // here from its idle loop or from a job that is not `f`'s.
        // Past a few microseconds the worker is likely not on a core (the machine
        // is busy with other work): give it ours rather than spin out the time slice.
        let others = rayon::current_num_threads() - 1;
        let mut looks = 0u32;
        while started.load(Ordering::Acquire) < others {
            looks += 1;
            if looks < 1024 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        f()
    })
}

/// Runs `task` on every item of `items` on the pool's threads, each thread taking
/// its next run of items from a shared queue as it finishes one, in order.
///
/// rayon's own split of an indexed range stops at about four leaves on two threads
/// (and splits further only where a leaf was stolen), so a 48-task product ended
/// with one thread running the rest of a 12-task leaf while the other spun: in a
/// depth-0 decode, 75% of the samples where one worker spun had the other in the
/// Q4_0 kernel. Here a thread takes a run of `remaining / (2 · threads)` items (at
/// least one): long runs first, so each thread streams long stretches of a weight,
/// and single items at the end, so the threads finish within about one item of each
/// other. The queue's lock is held only to take a run. Items run on the calling
/// thread alone if the pool has one thread.
pub fn for_each_dynamic<I>(items: I, task: impl Fn(I::Item) + Sync)
where
    I: ExactSizeIterator + Send,
    I::Item: Send,
{
    fold_dynamic(items, || (), |(), item| task(item));
}

/// [`for_each_dynamic`] over the indices `0..n`, with the same runs, taken from an
/// atomic counter: no lock, no allocation and no items to move, for the products'
/// tasks. A decode step forks about 200 times; a 16-task product of 74 KB from cache
/// took 6.4 µs, of which the kernels ~1.5, and takes 3.9 with this and `matmul_many`'s
/// reuse of its quantised rows (`cargo bench --bench stream`, `TOTAL_MB=1
/// SHAPE=64,128,16`).
pub fn for_each_index(n: usize, task: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || n <= 1 {
        (0..n).for_each(task);
        return;
    }
    let next = AtomicUsize::new(0);
    let work = || loop {
        let mut at = next.load(Ordering::Relaxed);
        let end = loop {
            if at >= n {
                return;
            }
            // Run `k` takes `remaining / (2 · threads)` indices, at least one.
            let end = at + ((n - at) / (2 * threads)).max(1);
            match next.compare_exchange_weak(at, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break end,
                Err(now) => at = now,
            }
        };
        (at..end).for_each(&task);
    };
    fan_out(threads, &work);
}

/// Runs `work` on `k` pool threads (or fewer, where one finishes before another
/// comes), by nested joins: nothing to allocate, unlike a scope's spawns.
fn fan_out(k: usize, work: &(impl Fn() + Sync)) {
    if k <= 1 {
        work();
    } else {
        let half = k / 2;
        rayon::join(|| fan_out(k - half, work), || fan_out(half, work));
    }
}

/// [`for_each_dynamic`] with a state per run: the items of each run the threads take
/// fold into a state of their own (made by `init`), and the states come back in the
/// order of their runs. The runs' bounds depend only on the number of items and
/// threads, never on timing, so merging the states in order gives the same result
/// on every call (decode attention's online softmax stays bit-for-bit repeatable).
pub fn fold_dynamic<I, S>(
    items: I,
    init: impl Fn() -> S + Sync,
    fold: impl Fn(S, I::Item) -> S + Sync,
) -> Vec<S>
where
    I: ExactSizeIterator + Send,
    I::Item: Send,
    S: Send,
{
    let threads = rayon::current_num_threads();
    // Run `k` takes `remaining / (2 · threads)` items, at least one.
    let take = |left: usize| (left / (2 * threads)).max(1);
    if threads <= 1 || items.len() <= 1 {
        // The same runs on this thread alone.
        let mut items = items;
        let mut states = Vec::new();
        while items.len() > 0 {
            let k = take(items.len());
            states.push(items.by_ref().take(k).fold(init(), &fold));
        }
        return states;
    }
    // The items left, and how many runs have been taken.
    let queue = Mutex::new((items, 0usize));
    let work = || {
        let mut mine = Vec::new();
        let mut run = Vec::new();
        loop {
            let index = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                let k = take(q.0.len());
                run.extend(q.0.by_ref().take(k));
                q.1 += 1;
                q.1 - 1
            };
            if run.is_empty() {
                return mine;
            }
            mine.push((index, run.drain(..).fold(init(), &fold)));
        }
    };
    use rayon::iter::{IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
    let mut states: Vec<(usize, S)> = (0..threads)
        .into_par_iter()
        .with_max_len(1)
        .flat_map_iter(|_| work())
        .collect();
    states.sort_unstable_by_key(|s| s.0);
    states.into_iter().map(|s| s.1).collect()
}

/// Held by the thread whose step owns the pool's spinners ([`on_pool`]).
static SERIAL: Mutex<()> = Mutex::new(());

/// Keeps a pool worker looking for jobs until `done`: runs each one it finds
/// (rayon's `yield_now` steals from the other workers), and between looks spins
/// on `pause` instead of rayon's idle rounds of `sched_yield` and futex sleep.
///
/// Every 64th fruitless look (~100 µs idle) it also yields its core to the OS: on a
/// machine busy with other work the step's owner may be waiting for one, and a spinner
/// holding it made `cargo test` beside a build ~100× slower (28,000 steps in over
/// 120 s against 1.6 s alone). With nothing else to run the yield returns at once.
fn spin_for_work(done: &AtomicBool) {
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_pool_runs_on_a_pool_worker_and_returns_the_result() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, sum) = super::on_pool(|| {
            let sum: u64 = rayon::iter::ParallelIterator::sum(
                rayon::iter::IntoParallelIterator::into_par_iter(0..1000u64),
            );
            (rayon::current_thread_index(), sum)
        });
        assert!(inside.is_some());
        assert_eq!(sum, 499_500);
        // Already on a worker: runs where it is.
        let nested = super::on_pool(|| super::on_pool(rayon::current_thread_index));
        assert!(nested.is_some());
    }

    #[test]
    fn on_pool_lets_a_panic_through_and_stops_its_spinners() {
        // Unwinding out of `f` must still stop the other workers' spinning, or
        // the scope would wait for them forever.
        let r = std::panic::catch_unwind(|| {
            super::on_pool(|| {
                rayon::join(|| (), || ());
                panic!("on purpose")
            })
        });
        assert!(r.is_err());
        // The pool still works afterwards.
        assert_eq!(super::on_pool(|| 7), 7);
    }

    /// A step's worth of nested fork-join work: every pool worker joins inside
    /// jobs it stole, which is where a misplaced spinner would sit.
    fn nested_work(seed: u64) -> u64 {
        use rayon::prelude::*;
        (0..64u64)
            .into_par_iter()
            .map(|j| {
                (0..256u64)
                    .into_par_iter()
                    .map(|k| k ^ j ^ seed)
                    .sum::<u64>()
            })
            .sum()
    }

    #[test]
    fn on_pool_never_deadlocks_with_many_or_back_to_back_callers() {
        use std::sync::mpsc;
        use std::time::Duration;
        let want = |seed: u64| -> u64 {
            (0..64u64)
                .map(|j| (0..256u64).map(|k| k ^ j ^ seed).sum::<u64>())
                .sum()
        };
        // Each caller runs on its own thread and reports its sum; a deadlock shows
        // as a report that never comes. Before the fix, this test with four times
        // these step counts deadlocked in 3 of 3 runs; the counts are lower so that
        // it stays quick on a machine busy with other work.
        let run = |callers: Vec<(u64, bool)>, steps: u64| {
            let (tx, rx) = mpsc::channel();
            for (id, through_on_pool) in callers.iter().copied() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut sum = 0u64;
                    for i in 0..steps {
                        let seed = id * 1_000_003 + i;
                        sum = sum.wrapping_add(if through_on_pool {
                            super::on_pool(|| nested_work(seed))
                        } else {
                            // Plain rayon from outside the pool, beside the steps.
                            nested_work(seed)
                        });
                    }
                    tx.send((id, sum)).unwrap();
                });
            }
            for _ in 0..callers.len() {
                let (id, sum) = rx
                    .recv_timeout(Duration::from_secs(120))
                    .expect("an on_pool caller deadlocked");
                let expected = (0..steps)
                    .map(|i| want(id * 1_000_003 + i))
                    .fold(0u64, u64::wrapping_add);
                assert_eq!(sum, expected, "caller {id}");
            }
        };
        // One thread, steps back to back: the next step's broadcast lands while a
        // worker is still looking for work after the last one.
        run(vec![(0, true)], 5_000);
        // Several threads at once, and one using rayon without on_pool.
        run(vec![(1, true), (2, true), (3, true), (4, false)], 500);
    }

    /// Checks a way of handing out `0..n` to the pool (`each(n, task)`): every index
    /// runs once, from outside the pool, from a worker, and in pools of one and three
    /// threads; both threads take indices when both are free; a panicking task
    /// reaches the caller and the pool works afterwards.
    fn hands_out_every_index_once(each: impl Fn(usize, &(dyn Fn(usize) + Sync)) + Sync) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let check = |n: usize| {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            each(n, &|i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                seen.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        };
        for n in [0, 1, 2, 3, 7, 64, 1000] {
            check(n);
            super::on_pool(|| check(n));
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| check(n));
            }
        }
        // Each task waits until the other thread has taken one too (bounded, so a
        // one-thread run still ends).
        if rayon::current_num_threads() >= 2 {
            let threads = std::sync::Mutex::new(std::collections::HashSet::new());
            super::on_pool(|| {
                each(64, &|_| {
                    threads
                        .lock()
                        .unwrap()
                        .insert(rayon::current_thread_index());
                    let t0 = std::time::Instant::now();
                    while threads.lock().unwrap().len() < 2
                        && t0.elapsed() < std::time::Duration::from_secs(5)
                    {
                        std::hint::spin_loop();
                    }
                })
            });
            assert_eq!(threads.into_inner().unwrap().len(), 2);
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::on_pool(|| each(10, &|i| assert!(i != 5, "on purpose")))
        }));
        assert!(r.is_err());
        check(10);
    }

    #[test]
    fn for_each_dynamic_runs_every_item_once_on_any_pool() {
        hands_out_every_index_once(|n, task| super::for_each_dynamic(0..n, task));
        // Disjoint mutable chunks, as the products hand out their outputs: from
        // outside the pool, from a worker, and in a one-thread pool.
        let chunks = |n: usize| {
            let mut out = vec![0usize; n * 3];
            super::for_each_dynamic(out.chunks_mut(3).enumerate(), |(i, c)| c.fill(i + 1));
            assert!(
                out.iter().enumerate().all(|(k, &v)| v == k / 3 + 1),
                "n = {n}"
            );
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for n in [0, 1, 2, 7, 64, 1000] {
            chunks(n);
            super::on_pool(|| chunks(n));
            one.install(|| chunks(n));
        }
    }

    #[test]
    fn for_each_index_runs_every_index_once_on_any_pool() {
        hands_out_every_index_once(|n, task| super::for_each_index(n, task));
    }

    #[test]
    fn fold_dynamic_folds_runs_in_order_whatever_the_timing() {
        for n in [0usize, 1, 2, 9, 1000] {
            let mut seen = Vec::new();
            for pool in [1, 2, 2, 2] {
                let p = rayon::ThreadPoolBuilder::new()
                    .num_threads(pool)
                    .build()
                    .unwrap();
                let runs = p.install(|| {
                    super::fold_dynamic(0..n, Vec::new, |mut v: Vec<usize>, i| {
                        v.push(i);
                        v
                    })
                });
                // The runs, in order, are the items in order, each exactly once.
                let all: Vec<usize> = runs.iter().flatten().copied().collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n = {n}, pool {pool}");
                assert!(runs.iter().all(|r| !r.is_empty()));
                // Two threads cut the same runs on every call.
                if pool == 2 {
                    seen.push(runs);
                }
            }
            assert!(seen.windows(2).all(|w| w[0] == w[1]), "n = {n}");
        }
    }
}
