//! A bias-free linear layer over a memory-mapped weight `[out, in]`.

use crate::weights::{Packable, Stack, Tensor};
use std::sync::Arc;
use whale_kernels::{matmul_with, MatRef};

/// `y = x · Wᵀ` with `W` borrowed from the weights file.
pub(crate) struct Linear {
    w: Packable,
    /// f32 arithmetic on dequantised weights instead of 8-bit activations.
    pub exact: bool,
}

impl Linear {
    /// A layer over `w`, which the model's repack pass may turn into row-interleaved
    /// groups when its type has a repacked kernel (Q4_0, Q5_0, Q8_0, Q4_K; see
    /// `Tensor::repacked`).
    pub fn new(w: Tensor) -> Self {
        Linear {
            w: Packable::new(w, true),
            exact: false,
        }
    }

    /// A layer over rows `start..start + n` (`cols` wide) of a stacked tensor, repacked
    /// with the whole stack ([`Stack`]).
    pub fn in_stack(stack: &Arc<Stack>, start: usize, n: usize, cols: usize) -> Self {
        Linear {
            w: Packable::in_stack(stack, start, n, cols),
            exact: false,
        }
    }

    /// A layer over `w` exactly as stored, never repacked: for weights that are also
    /// sliced at row offsets that need not fall on group boundaries (the fused
    /// `kv_b_proj`), or that share their bytes with a tensor read row by row (tied
    /// embeddings).
    pub fn unpacked(w: Tensor) -> Self {
        Linear {
            w: Packable::new(w, false),
            exact: false,
        }
    }

    /// The weight, for the model's repack pass.
    pub fn packable(&self) -> &Packable {
        &self.w
    }

    pub fn out_dim(&self) -> usize {
        self.w.get().shape()[0]
    }

    pub fn mat(&self) -> MatRef<'_> {
        self.w.get().mat()
    }

    pub fn tensor(&self) -> &Tensor {
        self.w.get()
    }

    /// Bytes of the weight as stored.
    pub fn bytes(&self) -> usize {
        self.w.get().bytes().len()
    }

    /// `x`: `[n, in]` → `y`: `[n, out]`.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        matmul_with(x, n, self.mat(), y, self.exact);
    }
}

static REPACK: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Whether models loaded from now on repack their Q4_0, Q5_0, Q8_0 and Q4_K weights into
/// row-interleaved groups as they load (the default; `WHALE_NO_REPACK=1` in the
/// environment turns it off unless this is called). Repacking costs a pass over the
/// weights and fresh memory for them, and makes the integer products about twice as
/// fast on AVX2 (`cargo bench -p whale-kernels --bench quant`). With it off a model
/// can still be repacked later, e.g. on a background thread
/// ([`crate::DeepseekModel::repack`]).
pub fn set_repack(on: bool) {
    REPACK.store(on as u8, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_repack`].
pub fn repack_enabled() -> bool {
    match REPACK.load(std::sync::atomic::Ordering::Relaxed) {
        2 => std::env::var_os("WHALE_NO_REPACK").is_none(),
        v => v == 1,
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`; used for dense layers, shared and routed experts.
pub(crate) struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    /// Expert `k` out of stacked tensors: `gate`/`up` hold `[.., I, d]` blocks starting at
    /// rows `gate_row`/`up_row`, `down` holds `[d, I]` blocks starting at row `k·d`.
    /// Each stack is repacked once, as a whole ([`Stack`]).
    pub fn from_stacks(
        gate: (&Arc<Stack>, usize),
        up: (&Arc<Stack>, usize),
        down: &Arc<Stack>,
        k: usize,
        i: usize,
        d: usize,
    ) -> Self {
        Mlp {
            gate: Linear::in_stack(gate.0, gate.1, i, d),
            up: Linear::in_stack(up.0, up.1, i, d),
            down: Linear::in_stack(down, k * d, d, i),
        }
    }

    /// Chooses exact f32 arithmetic for all three weights.
    pub fn set_exact(&mut self, exact: bool) {
        self.gate.exact = exact;
        self.up.exact = exact;
        self.down.exact = exact;
    }

    /// The three weights, for the model's repack pass.
    pub fn packables(&self) -> [&Packable; 3] {
        [
            self.gate.packable(),
            self.up.packable(),
            self.down.packable(),
        ]
    }

    /// Bytes of the three weights as stored.
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `x`: `[n, d]` → `y`: `[n, d]` (overwritten).
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let i = self.gate.out_dim();
        let mut g = vec![0.0f32; n * i];
        let mut u = vec![0.0f32; n * i];
        self.gate.forward(x, n, &mut g);
        self.up.forward(x, n, &mut u);
        whale_kernels::swiglu(&mut g, &u);
        self.down.forward(&g, n, y);
    }
}
