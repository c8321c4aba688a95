//! The MLA latent KV cache of one sequence, in fixed-size pages.
//!
//! Per layer and token it holds only `[c_kv ‖ k_pe]`: the normalised latent
//! (`kv_lora_rank`) and the rotated shared rope key (`qk_rope_head_dim`), 576
//! values for real checkpoints, instead of per-head keys and values.
//!
//! Tokens live in pages of [`PAGE_TOKENS`] (64, DeepSeek's cache unit), each page
//! holding its tokens' rows for every layer (`[layer][token][latent]`). Pages are
//! reference-counted: a cache made from another's prefix ([`LatentCache::share_prefix`])
//! shares its full pages instead of copying them, and a shared page is copied only
//! if a sequence writes into it (copy on write), so prompt-prefix reuse costs no copy.
//!
//! Values are stored as [`KvType`] says: f16 (llama.cpp's default cache type too)
//! halves the memory and the bytes a decode step reads; bf16 takes as little and lets
//! attention (decode and prefill) multiply in bf16 (`vdpbf16ps`, twice the f32 rate where the CPU
//! has AVX-512 BF16), at bf16's precision; f32 keeps the forward pass's values bit
//! for bit.

use crate::config::ModelConfig;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::sync::Arc;
use whale_kernels::Block;

/// How a [`LatentCache`] stores its values. The library's default is f32 (exactly
/// what the forward pass computed, so results match the reference implementation to
/// rounding); the `whale` commands default to f16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// IEEE half precision: 2 bytes per value (V2-Lite: 31 KB per token).
    F16,
    /// bfloat16: 2 bytes per value, an 8-bit significand (f16 has 11) with f32's
    /// range; attention over it multiplies in bf16 (decode: queries and
    /// probabilities rounded to bf16; prefill: the expanded keys and values too; sums
    /// in f32), as DeepSeek's own bf16 inference and llama.cpp's `-ctk bf16` do.
    Bf16,
    /// f32: 4 bytes per value, exactly what the forward pass computed.
    #[default]
    F32,
}

impl KvType {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F16 | KvType::Bf16 => 2,
            KvType::F32 => 4,
        }
    }

    /// `f16`, `bf16` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Bf16 => "bf16",
            KvType::F32 => "f32",
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvType::F16),
            "bf16" => Ok(KvType::Bf16),
            "f32" => Ok(KvType::F32),
            other => Err(format!("unknown cache type {other:?} (f16, bf16 or f32)")),
        }
    }
}

/// One page's values, `[layer][PAGE_TOKENS][latent_dim]`.
#[derive(Clone, Debug)]
enum Page {
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

/// Tokens per cache page.
pub const PAGE_TOKENS: usize = 64;

/// Latent cache for one sequence: pages of `[layer][PAGE_TOKENS][kv_lora_rank + qk_rope_head_dim]`.
#[derive(Clone, Debug)]
pub struct LatentCache {
    pages: Vec<Arc<Page>>,
    kv_type: KvType,
    n_layers: usize,
    latent_dim: usize,
    n_tokens: usize,
    /// Rows appended to each layer beyond `n_tokens` by a forward pass in progress.
    pending: Vec<usize>,
}

impl LatentCache {
    /// An empty cache shaped for `cfg`, storing values as `kv_type` says.
    pub fn new(cfg: &ModelConfig, kv_type: KvType) -> Self {
        LatentCache {
            pages: Vec::new(),
            kv_type,
            n_layers: cfg.num_hidden_layers,
            latent_dim: cfg.latent_dim(),
            n_tokens: 0,
            pending: vec![0; cfg.num_hidden_layers],
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

    /// How values are stored.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Bytes one token occupies: `layers × (kv_lora_rank + qk_rope_head_dim) × 2` (f16,
    /// bf16) or `× 4` (f32).
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * self.latent_dim * self.kv_type.bytes()
    }

    /// Bytes of one page.
    pub fn bytes_per_page(&self) -> usize {
        PAGE_TOKENS * self.bytes_per_token()
    }

    /// Pages held (shared ones included).
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// An identity for each page held (the address of its storage): caches that share
    /// a page give the same id for it, so counting distinct ids over several caches
    /// counts the memory they hold together.
    pub fn page_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.pages.iter().map(|p| Arc::as_ptr(p) as usize)
    }

    /// Pages held that another cache also holds (a shared prompt prefix).
    pub fn shared_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| Arc::strong_count(p) > 1)
            .count()
    }

    /// Bytes of the pages held (whole pages: the last one may be partly used).
    pub fn bytes_used(&self) -> usize {
        self.pages.len() * self.bytes_per_page()
    }

    /// Drops every token at position `n` and later (for rollback or reuse of a prefix).
    pub fn truncate(&mut self, n: usize) {
        self.n_tokens = self.n_tokens.min(n);
        self.pages.truncate(self.n_tokens.div_ceil(PAGE_TOKENS));
        self.pending.fill(0);
    }

    /// Clears the cache.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// A cache holding this one's first `n` tokens: full pages are shared, not copied
    /// (a partly kept last page is copied when either cache writes into it).
    pub fn share_prefix(&self, n: usize) -> LatentCache {
        let n = n.min(self.n_tokens);
        LatentCache {
            pages: self.pages[..n.div_ceil(PAGE_TOKENS)].to_vec(),
            kv_type: self.kv_type,
            n_layers: self.n_layers,
            latent_dim: self.latent_dim,
            n_tokens: n,
            pending: vec![0; self.n_layers],
        }
    }

    /// Writes the values of the pages in `pages` (indices, clamped to the pages held),
    /// little-endian, page after page (each `[layer][PAGE_TOKENS][latent_dim]` of the
    /// cache's type): the prefix cache's disk tier. [`Self::read_pages`] reads them back.
    pub fn write_pages(
        &self,
        pages: std::ops::Range<usize>,
        w: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let end = pages.end.min(self.pages.len());
        for p in &self.pages[pages.start.min(end)..end] {
            buf.clear();
            match &**p {
                Page::F16(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_bits().to_le_bytes())),
                Page::Bf16(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_bits().to_le_bytes())),
                Page::F32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            }
            w.write_all(&buf)?;
        }
        Ok(())
    }

    /// Reads `n_tokens` tokens' worth of whole pages written by [`Self::write_pages`]
    /// and appends them to this cache, which must hold whole pages only (empty, or read
    /// so far) and be shaped as the writer was (same layers, latent size and type: the
    /// caller checks); `n_tokens` is a multiple of [`PAGE_TOKENS`]. On an error the
    /// cache is as it was.
    pub fn read_pages(
        &mut self,
        n_tokens: usize,
        r: &mut impl std::io::Read,
    ) -> std::io::Result<()> {
        assert!(
            self.n_tokens == self.pages.len() * PAGE_TOKENS
                && self.pending.iter().all(|&p| p == 0)
                && n_tokens.is_multiple_of(PAGE_TOKENS)
        );
        let vals = self.n_layers * PAGE_TOKENS * self.latent_dim;
        let mut buf = vec![0u8; vals * self.kv_type.bytes()];
        let mut pages = Vec::with_capacity(n_tokens / PAGE_TOKENS);
        for _ in 0..n_tokens / PAGE_TOKENS {
            r.read_exact(&mut buf)?;
            pages.push(Arc::new(match self.kv_type {
                KvType::F16 => Page::F16(
                    buf.chunks_exact(2)
                        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                        .collect(),
                ),
                KvType::Bf16 => Page::Bf16(
                    buf.chunks_exact(2)
                        .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                        .collect(),
                ),
                KvType::F32 => Page::F32(
                    buf.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
            }));
        }
        self.pages.extend(pages);
        self.n_tokens += n_tokens;
        Ok(())
    }

    /// Layers the cache holds.
    pub fn layers(&self) -> usize {
        self.n_layers
    }

    fn layer_offset(&self, layer: usize) -> usize {
        layer * PAGE_TOKENS * self.latent_dim
    }

    /// The first `n` rows of `layer` as page slices `[≤ PAGE_TOKENS, latent_dim]`, in order
    /// (rows appended by a forward pass in progress included).
    pub fn layer_pages(&self, layer: usize, n: usize) -> Vec<Block<'_>> {
        let dim = self.latent_dim;
        let off = self.layer_offset(layer);
        (0..n.div_ceil(PAGE_TOKENS))
            .map(|p| {
                let r = off..off + (n - p * PAGE_TOKENS).min(PAGE_TOKENS) * dim;
                match &*self.pages[p] {
                    Page::F16(v) => Block::F16(&v[r]),
                    Page::Bf16(v) => Block::Bf16(&v[r]),
                    Page::F32(v) => Block::F32(&v[r]),
                }
            })
            .collect()
    }

    /// The first `n` rows of `layer` as f32 in one `[n, latent_dim]` buffer.
    pub fn gather(&self, layer: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n * self.latent_dim];
        let mut at = 0;
        for p in self.layer_pages(layer, n) {
            p.write_f32(&mut out[at..at + p.len()]);
            at += p.len();
        }
        out
    }

    /// Appends rows `[m, latent_dim]` to `layer` (the forward pass does this once per
    /// layer), rounded to the cache's type.
    pub(crate) fn append(&mut self, layer: usize, rows: &[f32]) {
        let dim = self.latent_dim;
        debug_assert_eq!(rows.len() % dim, 0);
        let start = self.n_tokens + self.pending[layer];
        let m = rows.len() / dim;
        let page_len = self.n_layers * PAGE_TOKENS * dim;
        while self.pages.len() * PAGE_TOKENS < start + m {
            self.pages.push(Arc::new(match self.kv_type {
                KvType::F16 => Page::F16(vec![f16::ZERO; page_len]),
                KvType::Bf16 => Page::Bf16(vec![bf16::ZERO; page_len]),
                KvType::F32 => Page::F32(vec![0.0; page_len]),
            }));
        }
        let off = self.layer_offset(layer);
        let mut i = 0;
        while i < m {
            let pos = start + i;
            let (p, slot) = (pos / PAGE_TOKENS, pos % PAGE_TOKENS);
            let k = (PAGE_TOKENS - slot).min(m - i);
            let (dst, src) = (
                off + slot * dim..off + (slot + k) * dim,
                &rows[i * dim..(i + k) * dim],
            );
            // Copy on write: a page shared with another cache is duplicated first.
            match Arc::make_mut(&mut self.pages[p]) {
                Page::F16(v) => v[dst].convert_from_f32_slice(src),
                Page::Bf16(v) => v[dst].convert_from_f32_slice(src),
                Page::F32(v) => v[dst].copy_from_slice(src),
            }
            i += k;
        }
        self.pending[layer] += m;
    }

    /// Marks `n` appended tokens as complete in all layers.
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.pending.iter().all(|&p| p == n));
        self.n_tokens += n;
        self.pending.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_written_read_back_bit_for_bit() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/whale-tiny-chat");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        for kv in [KvType::F16, KvType::Bf16, KvType::F32] {
            let mut c = LatentCache::new(&cfg, kv);
            let (n, dim) = (130, c.latent_dim());
            for l in 0..cfg.num_hidden_layers {
                let rows: Vec<f32> = (0..n * dim)
                    .map(|i| ((i * 7 + l * 13) % 101) as f32 * 0.37 - 18.0)
                    .collect();
                c.append(l, &rows);
            }
            c.commit(n);
            let mut bytes = Vec::new();
            c.write_pages(0..2, &mut bytes).unwrap();
            assert_eq!(bytes.len(), 2 * c.bytes_per_page());
            let mut back = LatentCache::new(&cfg, kv);
            back.read_pages(128, &mut &bytes[..]).unwrap();
            assert_eq!(back.len(), 128);
            // Written and read a page at a time (the disk tier's chained files): the
            // same cache.
            let (mut first, mut second) = (Vec::new(), Vec::new());
            c.write_pages(0..1, &mut first).unwrap();
            c.write_pages(1..2, &mut second).unwrap();
            assert_eq!(second.len(), c.bytes_per_page());
            let mut past = Vec::new();
            c.write_pages(3..9, &mut past).unwrap();
            assert!(past.is_empty(), "clamped to the pages held");
            let mut chained = LatentCache::new(&cfg, kv);
            chained.read_pages(64, &mut &first[..]).unwrap();
            chained.read_pages(64, &mut &second[..]).unwrap();
            assert_eq!(chained.len(), 128);
            assert!(chained.read_pages(64, &mut &second[1..]).is_err());
            assert_eq!(
                chained.len(),
                128,
                "a failed read leaves the cache as it was"
            );
            for l in 0..cfg.num_hidden_layers {
                let (a, b) = (back.gather(l, 128), chained.gather(l, 128));
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
            for l in 0..cfg.num_hidden_layers {
                let (a, b) = (c.gather(l, 128), back.gather(l, 128));
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kv:?} layer {l}"
                );
            }
            // A short file is an error, not a cache of zeros.
            let mut short = LatentCache::new(&cfg, kv);
            assert!(short
                .read_pages(128, &mut &bytes[..bytes.len() - 1])
                .is_err());
        }
    }
}
