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
pub use attn_prefill::{causal_attention, Rows};
pub use dtype::{decode_into, DType, MatRef};
pub use matmul::{
    axpy_row, matmul, matmul_many, matmul_quantized, matmul_t_vec, matmul_with, matvec_many,
    quantize_rows, MatMul, MatVec,
};
pub use ops::{dot, rmsnorm, rmsnorm_inplace, softmax_inplace};
pub use simd_f32::swiglu;

use std::sync::atomic::{AtomicBool, Ordering};

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
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // Set when `f` returns or unwinds, so the spinners stop and the scope can end.
    struct SetOnDrop<'a>(&'a AtomicBool);
    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        let flag = &done;
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) != owner {
                spin_for_work(flag);
            }
        });
        let _stop = SetOnDrop(&done);
        f()
    })
}

/// Keeps a pool worker looking for jobs until `done`: runs each one it finds
/// (rayon's `yield_now` steals from the other workers), and between looks spins
/// on `pause` instead of rayon's idle rounds of `sched_yield` and futex sleep.
fn spin_for_work(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
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
}
