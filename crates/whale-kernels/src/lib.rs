//! Numeric kernels for whale.
//!
//! Kernels take slices and dimensions, never model types. Every kernel here is
//! plain Rust written so the compiler can vectorise it; explicit per-ISA SIMD
//! paths (with these functions as their scalar twins) arrive with the CPU speed
//! work.
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
/// threads, which spin briefly before they sleep.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
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
}
