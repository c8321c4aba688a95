//! The MLA latent KV cache of one sequence.
//!
//! Per layer and token it holds only `[c_kv ‖ k_pe]`: the normalised latent
//! (`kv_lora_rank`) and the rotated shared rope key (`qk_rope_head_dim`), 576
//! values for real checkpoints, instead of per-head keys and values.

use crate::config::ModelConfig;

/// Latent cache for one sequence, `[layer][token, kv_lora_rank + qk_rope_head_dim]`, f32.
#[derive(Clone, Debug)]
pub struct LatentCache {
    layers: Vec<Vec<f32>>,
    latent_dim: usize,
    n_tokens: usize,
}

impl LatentCache {
    /// An empty cache shaped for `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        LatentCache {
            layers: vec![Vec::new(); cfg.num_hidden_layers],
            latent_dim: cfg.latent_dim(),
            n_tokens: 0,
        }
    }

    /// Tokens whose latents are stored in every layer.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// Values per token per layer (`kv_lora_rank + qk_rope_head_dim`).
    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }

    /// Bytes one token occupies: `layers × (kv_lora_rank + qk_rope_head_dim) × 4`.
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len() * self.latent_dim * std::mem::size_of::<f32>()
    }

    /// Bytes held for the cached tokens.
    pub fn bytes_used(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.len() * std::mem::size_of::<f32>())
            .sum()
    }

    /// Drops every token at position `n` and later (for rollback or reuse of a prefix).
    pub fn truncate(&mut self, n: usize) {
        for l in &mut self.layers {
            l.truncate(n * self.latent_dim);
        }
        self.n_tokens = self.n_tokens.min(n);
    }

    /// A new cache holding a copy of this one's first `n` tokens (a reused prompt prefix).
    pub fn copy_prefix(&self, n: usize) -> LatentCache {
        let n = n.min(self.n_tokens);
        LatentCache {
            layers: self
                .layers
                .iter()
                .map(|l| l[..n * self.latent_dim].to_vec())
                .collect(),
            latent_dim: self.latent_dim,
            n_tokens: n,
        }
    }

    /// Makes room for `n` tokens in every layer without further reallocation; a paged
    /// pool grows sequences a page at a time with this so memory follows its accounting.
    pub fn reserve_tokens(&mut self, n: usize) {
        for l in &mut self.layers {
            let want = n * self.latent_dim;
            if want > l.capacity() {
                l.reserve_exact(want - l.len());
            }
        }
    }

    /// Tokens every layer can hold without reallocating.
    pub fn capacity_tokens(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.capacity() / self.latent_dim.max(1))
            .min()
            .unwrap_or(0)
    }

    /// Clears the cache.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Rows of layer `layer`, `[tokens, latent_dim]`.
    pub fn layer(&self, layer: usize) -> &[f32] {
        &self.layers[layer]
    }

    /// Appends rows `[n, latent_dim]` to `layer` (the forward pass does this once per layer).
    pub(crate) fn append(&mut self, layer: usize, rows: &[f32]) {
        debug_assert_eq!(rows.len() % self.latent_dim, 0);
        self.layers[layer].extend_from_slice(rows);
    }

    /// Marks `n` appended tokens as complete in all layers.
    pub(crate) fn commit(&mut self, n: usize) {
        self.n_tokens += n;
        debug_assert!(self
            .layers
            .iter()
            .all(|l| l.len() == self.n_tokens * self.latent_dim));
    }
}
