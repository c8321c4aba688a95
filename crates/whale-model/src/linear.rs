//! A bias-free linear layer over a memory-mapped weight `[out, in]`.

use crate::weights::Tensor;
use whale_kernels::{matmul_with, MatRef};

/// `y = x · Wᵀ` with `W` borrowed from the weights file.
pub(crate) struct Linear {
    w: Tensor,
    /// f32 arithmetic on dequantised weights instead of 8-bit activations.
    pub exact: bool,
}

impl Linear {
    pub fn new(w: Tensor) -> Self {
        Linear { w, exact: false }
    }

    pub fn out_dim(&self) -> usize {
        self.w.shape()[0]
    }

    pub fn mat(&self) -> MatRef<'_> {
        self.w.mat()
    }

    pub fn tensor(&self) -> &Tensor {
        &self.w
    }

    /// Bytes of the weight as stored.
    pub fn bytes(&self) -> usize {
        self.w.bytes().len()
    }

    /// `x`: `[n, in]` → `y`: `[n, out]`.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        matmul_with(x, n, self.w.mat(), y, self.exact);
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
    pub fn from_stacks(
        gate: (&Tensor, usize),
        up: (&Tensor, usize),
        down: &Tensor,
        k: usize,
        i: usize,
        d: usize,
    ) -> Self {
        Mlp {
            gate: Linear::new(gate.0.rows(gate.1, i, d)),
            up: Linear::new(up.0.rows(up.1, i, d)),
            down: Linear::new(down.rows(k * d, d, i)),
        }
    }

    /// Chooses exact f32 arithmetic for all three weights.
    pub fn set_exact(&mut self, exact: bool) {
        self.gate.exact = exact;
        self.up.exact = exact;
        self.down.exact = exact;
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
        for (gv, uv) in g.iter_mut().zip(&u) {
            *gv = whale_kernels::silu(*gv) * uv;
        }
        self.down.forward(&g, n, y);
    }
}
