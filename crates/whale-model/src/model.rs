//! The DeepSeek-V2/V3 decoder: embedding → layers (pre-norm MLA + dense MLP or
//! MoE) → final norm → lm_head.

use crate::cache::{KvType, LatentCache};
use crate::config::{ModelConfig, ModelType, TopkMethod};
use crate::error::ModelError;
use crate::linear::{Linear, Mlp};
use crate::mla::{KvUp, Mla, MlaMode, QProj};
use crate::moe::{Moe, Router};
use crate::rope::Rope;
use crate::weights::{Tensor, WeightStore};
use std::path::Path;
use whale_kernels::rmsnorm_inplace;

enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

struct Layer {
    input_norm: Vec<f32>,
    attn: Mla,
    post_norm: Vec<f32>,
    ffn: Ffn,
}

/// Which rows of logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token.
    All,
    /// Only the last input token's row.
    Last,
    /// No rows (a prefill chunk that is not the prompt's last).
    None,
}

/// A loaded DeepSeek-V2/V3 model. Weights stay in the memory-mapped files.
pub struct DeepseekModel {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    rope: Rope,
    mla_mode: MlaMode,
    kv_type: KvType,
    weight_bytes: usize,
}

impl DeepseekModel {
    /// Loads the weights of `cfg` from a safetensors model folder.
    pub fn load_dir(dir: &Path, cfg: ModelConfig) -> Result<Self, ModelError> {
        let store = WeightStore::open_dir(dir)?;
        Self::from_store(&store, cfg)
    }

    /// Loads a llama.cpp GGUF file (`general.architecture = deepseek2`).
    pub fn load_gguf(path: &Path) -> Result<Self, ModelError> {
        Self::from_gguf(&crate::gguf::GgufFile::open(path)?)
    }

    /// Builds the model from an opened GGUF file (its metadata and tensors).
    pub fn from_gguf(f: &crate::gguf::GgufFile) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(f)?;
        Self::from_source(f, cfg)
    }

    /// Builds the model from opened weights, checking every tensor's shape.
    pub fn from_store(st: &WeightStore, cfg: ModelConfig) -> Result<Self, ModelError> {
        Self::from_source(st, cfg)
    }

    /// Builds the model from any tensor source that answers transformers' names, and
    /// repacks its Q4_0, Q5_0, Q8_0 and Q4_K weights when [`crate::repack_enabled`].
    pub(crate) fn from_source(st: &dyn TensorSource, cfg: ModelConfig) -> Result<Self, ModelError> {
        let m = Self::build(st, cfg)?;
        if crate::linear::repack_enabled() {
            let t = std::time::Instant::now();
            let bytes = m.repack(None);
            if bytes > 0 {
                tracing::info!(
                    "repacked {:.2} GB of weights in {:.2} s",
                    bytes as f64 / 1e9,
                    t.elapsed().as_secs_f64()
                );
            }
        }
        Ok(m)
    }

    /// Repacks every Q4_0/Q8_0 projection weight into row-interleaved groups (the
    /// faster integer kernels), layer by layer, stopping early when `stop` is set;
    /// returns the bytes repacked. Safe to run on another thread while the model
    /// computes: each weight switches to its repacked copy when that is complete.
    ///
    /// After each layer and at the end, the file pages of repacked weights that
    /// reading their neighbours mapped back in are dropped again, so resident memory
    /// holds the weights once.
    pub fn repack(&self, stop: Option<&std::sync::atomic::AtomicBool>) -> usize {
        let mut done = 0;
        let stopped = || stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed));
        let lists = self.packables();
        for (i, ws) in lists.iter().enumerate() {
            for w in ws {
                if stopped() {
                    return done;
                }
                done += w.repack();
            }
            // Reading this group mapped back pages of the one before (and of itself).
            for w in lists[i.saturating_sub(1)..=i].iter().flatten() {
                w.release_file_pages();
            }
        }
        for w in lists.iter().flatten() {
            w.release_file_pages();
        }
        done
    }

    /// Every weight the repack pass may turn over, layer by layer, the output head last.
    fn packables(&self) -> Vec<Vec<&crate::weights::Packable>> {
        let mut all: Vec<Vec<_>> = self
            .layers
            .iter()
            .map(|l| {
                let mut ws = l.attn.packables();
                match &l.ffn {
                    Ffn::Dense(m) => ws.extend(m.packables()),
                    Ffn::Moe(m) => {
                        ws.extend(m.shared.iter().flat_map(Mlp::packables));
                        ws.extend(m.experts.iter().flat_map(Mlp::packables));
                    }
                }
                ws
            })
            .collect();
        all.push(vec![self.lm_head.packable()]);
        all
    }

    fn build(st: &dyn TensorSource, cfg: ModelConfig) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let (nh, p, r, v, c) = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let lin = |name: &str, out: usize, inp: usize| st.get(name, &[out, inp]).map(Linear::new);
        let vec1 = |name: &str, n: usize| st.get(name, &[n]).map(|t| t.to_f32());
        let mlp = |pre: &str, i: usize| -> Result<Mlp, ModelError> {
            Ok(Mlp {
                gate: lin(&format!("{pre}.gate_proj.weight"), i, d)?,
                up: lin(&format!("{pre}.up_proj.weight"), i, d)?,
                down: lin(&format!("{pre}.down_proj.weight"), d, i)?,
            })
        };
        let embed = st.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for li in 0..cfg.num_hidden_layers {
            let pre = format!("model.layers.{li}");
            let a = format!("{pre}.self_attn");
            let q = match cfg.q_lora_rank {
                None => QProj::Plain(lin(&format!("{a}.q_proj.weight"), nh * (p + r), d)?),
                Some(ql) => QProj::Lora {
                    a: lin(&format!("{a}.q_a_proj.weight"), ql, d)?,
                    norm: vec1(&format!("{a}.q_a_layernorm.weight"), ql)?,
                    b: lin(&format!("{a}.q_b_proj.weight"), nh * (p + r), ql)?,
                },
            };
            let attn = Mla {
                q,
                kv_a: lin(&format!("{a}.kv_a_proj_with_mqa.weight"), c + r, d)?,
                kv_a_norm: vec1(&format!("{a}.kv_a_layernorm.weight"), c)?,
                kv_up: st.kv_up(li, nh, p, v, c)?,
                o: lin(&format!("{a}.o_proj.weight"), d, nh * v)?,
                n_head: nh,
                nope: p,
                rope_dim: r,
                v_dim: v,
                kv_rank: c,
                scale: cfg.softmax_scale(),
                exact: false,
                expanded_bytes: crate::mla::EXPANDED_BYTES,
            };
            let ffn = if cfg.is_moe_layer(li) {
                Ffn::Moe(load_moe(st, &cfg, &format!("{pre}.mlp"))?)
            } else {
                Ffn::Dense(mlp(&format!("{pre}.mlp"), cfg.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm: vec1(&format!("{pre}.input_layernorm.weight"), d)?,
                attn,
                post_norm: vec1(&format!("{pre}.post_attention_layernorm.weight"), d)?,
                ffn,
            });
        }
        let lm_head = if st.contains("lm_head.weight") || !cfg.tie_word_embeddings {
            lin("lm_head.weight", cfg.vocab_size, d)?
        } else {
            Linear::unpacked(embed.clone())
        };
        Ok(DeepseekModel {
            rope: Rope::new(&cfg),
            norm: vec1("model.norm.weight", d)?,
            embed,
            layers,
            lm_head,
            mla_mode: MlaMode::Auto,
            kv_type: KvType::default(),
            weight_bytes: st.total_bytes(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of weights in the files.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Weight bytes one decode step reads: all attention, dense and shared-expert
    /// weights, the router, `top_k` average routed experts per MoE layer, one
    /// embedding row and the output head.
    pub fn decode_weight_bytes(&self) -> usize {
        let emb = self.embed.mat();
        let mut total = emb.row_bytes() + self.lm_head.bytes() + 4 * self.norm.len();
        for l in &self.layers {
            total += l.attn.weight_bytes() + 4 * (l.input_norm.len() + l.post_norm.len());
            total += match &l.ffn {
                Ffn::Dense(m) => m.bytes(),
                Ffn::Moe(m) => {
                    4 * m.router.weight.len()
                        + m.shared.as_ref().map_or(0, Mlp::bytes)
                        + m.expert_bytes() * m.router.top_k
                }
            };
        }
        total
    }

    /// Bytes of one routed expert summed over the MoE layers, and experts chosen per
    /// token: a decode step whose MoE layers touch `u` distinct experts each reads
    /// `decode_weight_bytes() + (u - top_k) · routed_expert_bytes()` of weights.
    pub fn routed_expert_bytes(&self) -> (usize, usize) {
        let mut bytes = 0;
        let mut top_k = 0;
        for l in &self.layers {
            if let Ffn::Moe(m) = &l.ffn {
                bytes += m.expert_bytes();
                top_k = m.router.top_k;
            }
        }
        (bytes, top_k)
    }

    /// Chooses the arithmetic for quantised weights: `true` multiplies the dequantised
    /// weights in f32 (the reference answer for the file's weights); `false` (the
    /// default) rounds activations to 8-bit blocks and uses integer kernels, as
    /// llama.cpp does.
    pub fn set_exact(&mut self, exact: bool) {
        self.lm_head.exact = exact;
        for l in &mut self.layers {
            l.attn.set_exact(exact);
            match &mut l.ffn {
                Ffn::Dense(m) => m.set_exact(exact),
                Ffn::Moe(m) => {
                    m.experts.iter_mut().for_each(|e| e.set_exact(exact));
                    if let Some(s) = &mut m.shared {
                        s.set_exact(exact);
                    }
                }
            }
        }
    }

    /// Chooses the MLA form (default: expanded for prefill, absorbed for decode).
    pub fn set_mla_mode(&mut self, mode: MlaMode) {
        self.mla_mode = mode;
    }

    /// Bytes of decompressed keys and values that a prefill chunk in the expanded MLA
    /// form may hold at once (default 24 MiB). Past that, heads are decompressed and
    /// attended a group at a time (at least one head per worker thread), so the
    /// buffer no longer grows with the context times the heads; the results are the
    /// same bits either way.
    pub fn set_expanded_budget(&mut self, bytes: usize) {
        for l in &mut self.layers {
            l.attn.expanded_bytes = bytes;
        }
    }

    /// How caches made by [`Self::new_cache`] store latents (default f32).
    pub fn set_kv_type(&mut self, kv_type: KvType) {
        self.kv_type = kv_type;
    }

    /// The type [`Self::new_cache`] uses.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// A new empty latent cache for this model.
    pub fn new_cache(&self) -> LatentCache {
        LatentCache::new(&self.cfg, self.kv_type)
    }

    /// Runs `tokens` at positions `cache.len()..` and appends their latents to `cache`.
    ///
    /// Returns logits `[rows, vocab]` for the rows `which` asks for.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        let mut items = [BatchItem {
            tokens,
            cache,
            logits: which,
        }];
        Ok(self.forward_batch(&mut items)?.pop().unwrap_or_default())
    }

    /// One step over several sequences at once: every item's tokens (a decode token or a
    /// prefill chunk) run at positions `item.cache.len()..` of its own cache, and all rows
    /// go through each weight matrix together, so a step reads the weights once however
    /// many sequences it carries (the MoE reads each expert the batch routes to once).
    ///
    /// Returns, per item, logits `[rows, vocab]` for the rows its `logits` asks for.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        // The whole step on a pool worker: its kernels then fork and join inside the
        // pool instead of waking it from outside once per kernel.
        whale_kernels::on_pool(|| self.forward_batch_on_pool(items))
    }

    fn forward_batch_on_pool(
        &self,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let d = self.cfg.hidden_size;
        let mut tokens = Vec::new();
        for it in items.iter() {
            if it.tokens.is_empty() {
                return Err(ModelError::Input("forward needs at least one token".into()));
            }
            if let Some(&bad) = it
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Input(format!(
                    "token id {bad} is out of range (vocab_size {})",
                    self.cfg.vocab_size
                )));
            }
            tokens.extend_from_slice(it.tokens);
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let t = tokens.len();
        // x: [T, d], the items' rows one after another.
        let mut x = vec![0.0f32; t * d];
        let emb = self.embed.mat();
        for (i, &id) in tokens.iter().enumerate() {
            emb.row_into(id as usize, &mut x[i * d..(i + 1) * d]);
        }
        let eps = self.cfg.rms_norm_eps;
        let mut h = vec![0.0f32; t * d];
        let mut o = vec![0.0f32; t * d];
        let mut segs: Vec<(&mut LatentCache, usize)> = items
            .iter_mut()
            .map(|it| (&mut *it.cache, it.tokens.len()))
            .collect();
        for (li, layer) in self.layers.iter().enumerate() {
            h.copy_from_slice(&x);
            for row in h.chunks_mut(d) {
                rmsnorm_inplace(row, &layer.input_norm, eps);
            }
            layer
                .attn
                .forward_batch(&h, &self.rope, &mut segs, li, self.mla_mode, &mut o);
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            h.copy_from_slice(&x);
            for row in h.chunks_mut(d) {
                rmsnorm_inplace(row, &layer.post_norm, eps);
            }
            match &layer.ffn {
                Ffn::Dense(m) => m.forward(&h, t, &mut o),
                Ffn::Moe(m) => m.forward(&h, t, d, &mut o),
            }
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
        }
        for (cache, n) in segs {
            cache.commit(n);
        }
        // Final norm and lm_head over the rows asked for, all items together.
        let mut picked: Vec<f32> = Vec::new();
        let mut rows_of = Vec::with_capacity(items.len());
        let mut start = 0;
        for it in items.iter() {
            let n = it.tokens.len();
            let (from, rows) = match it.logits {
                Logits::All => (start, n),
                Logits::Last => (start + n - 1, 1),
                Logits::None => (start, 0),
            };
            picked.extend_from_slice(&x[from * d..(from + rows) * d]);
            rows_of.push(rows);
            start += n;
        }
        for row in picked.chunks_mut(d) {
            rmsnorm_inplace(row, &self.norm, eps);
        }
        let rows: usize = rows_of.iter().sum();
        if rows == 0 {
            return Ok(vec![Vec::new(); items.len()]);
        }
        let vocab = self.cfg.vocab_size;
        let mut logits = vec![0.0f32; rows * vocab];
        self.lm_head.forward(&picked, rows, &mut logits);
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for r in rows_of {
            out.push(logits[at * vocab..(at + r) * vocab].to_vec());
            at += r;
        }
        Ok(out)
    }
}

/// One sequence's share of a [`DeepseekModel::forward_batch`] step.
pub struct BatchItem<'a> {
    /// New tokens of this sequence (one when decoding, a chunk when prefilling).
    pub tokens: &'a [u32],
    /// The sequence's latent cache; the tokens run at positions `cache.len()..`.
    pub cache: &'a mut LatentCache,
    /// Which of its rows get logits.
    pub logits: Logits,
}

/// Where the model's tensors come from, addressed by transformers' names.
pub(crate) trait TensorSource {
    /// The tensor `name`, which must have `shape` (PyTorch order).
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError>;
    /// Whether `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// Bytes of all weights.
    fn total_bytes(&self) -> usize;

    /// Layer `li`'s latent up-projections (`kv_b_proj` by default).
    fn kv_up(
        &self,
        li: usize,
        nh: usize,
        p: usize,
        v: usize,
        c: usize,
    ) -> Result<KvUp, ModelError> {
        let name = format!("model.layers.{li}.self_attn.kv_b_proj.weight");
        Ok(KvUp::Fused(Linear::unpacked(
            self.get(&name, &[nh * (p + v), c])?,
        )))
    }

    /// The routed experts of the MoE block at `pre` (`model.layers.N.mlp`): per-expert
    /// tensors as checkpoints store them, or transformers 5's fused layout.
    fn experts(&self, pre: &str, e: usize, i: usize, d: usize) -> Result<Vec<Mlp>, ModelError> {
        let fused = format!("{pre}.experts.gate_up_proj");
        if self.contains(&fused) {
            // gate_up_proj [E, 2I, d] (gate first), down_proj [E, d, I].
            let gu = crate::weights::Stack::new(self.get(&fused, &[e, 2 * i, d])?);
            let dn = crate::weights::Stack::new(
                self.get(&format!("{pre}.experts.down_proj"), &[e, d, i])?,
            );
            return Ok((0..e)
                .map(|k| Mlp::from_stacks((&gu, k * 2 * i), (&gu, k * 2 * i + i), &dn, k, i, d))
                .collect());
        }
        (0..e)
            .map(|k| {
                let ex = format!("{pre}.experts.{k}");
                Ok(Mlp {
                    gate: Linear::new(self.get(&format!("{ex}.gate_proj.weight"), &[i, d])?),
                    up: Linear::new(self.get(&format!("{ex}.up_proj.weight"), &[i, d])?),
                    down: Linear::new(self.get(&format!("{ex}.down_proj.weight"), &[d, i])?),
                })
            })
            .collect()
    }
}

impl TensorSource for WeightStore {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        WeightStore::get(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        WeightStore::contains(self, name)
    }
    fn total_bytes(&self) -> usize {
        WeightStore::total_bytes(self)
    }
}

fn load_moe(st: &dyn TensorSource, cfg: &ModelConfig, pre: &str) -> Result<Moe, ModelError> {
    let d = cfg.hidden_size;
    let (e, i) = (cfg.n_routed_experts, cfg.moe_intermediate_size);
    let weight = st.get(&format!("{pre}.gate.weight"), &[e, d])?.to_f32();
    let bias_name = format!("{pre}.gate.e_score_correction_bias");
    let bias = if cfg.model_type == ModelType::DeepseekV3 || cfg.topk_method == TopkMethod::NoauxTc
    {
        Some(st.get(&bias_name, &[e])?.to_f32())
    } else {
        None
    };
    let experts = st.experts(pre, e, i, d)?;
    let shared = if cfg.n_shared_experts > 0 {
        let w = i * cfg.n_shared_experts;
        let sp = format!("{pre}.shared_experts");
        Some(Mlp {
            gate: Linear::new(st.get(&format!("{sp}.gate_proj.weight"), &[w, d])?),
            up: Linear::new(st.get(&format!("{sp}.up_proj.weight"), &[w, d])?),
            down: Linear::new(st.get(&format!("{sp}.down_proj.weight"), &[d, w])?),
        })
    } else {
        None
    };
    Ok(Moe {
        router: Router::from_config(cfg, weight, bias),
        experts,
        shared,
    })
}
