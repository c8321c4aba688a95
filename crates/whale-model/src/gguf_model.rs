//! A DeepSeek model from a llama.cpp GGUF file (`general.architecture = deepseek2`):
//! the `deepseek2.*` metadata as a [`ModelConfig`], and GGUF tensor names mapped
//! to transformers' names so one loader builds the model from either source.

use crate::config::{ModelConfig, ModelType, RopeScaling, ScoringFunc, TopkMethod};
use crate::error::ModelError;
use crate::gguf::{GgufFile, GgufValue};
use crate::linear::{Linear, Mlp};
use crate::mla::KvUp;
use crate::model::TensorSource;
use crate::weights::{Packable, Tensor};

const ARCH: &str = "deepseek2";

fn key<'a>(f: &'a GgufFile, k: &str) -> Option<&'a GgufValue> {
    f.get(&format!("{ARCH}.{k}"))
}

fn need_u(f: &GgufFile, k: &str) -> Result<usize, ModelError> {
    key(f, k)
        .and_then(GgufValue::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| {
            ModelError::format(
                f.path(),
                format!("metadata {ARCH}.{k} is missing or not an integer"),
            )
        })
}

fn opt_u(f: &GgufFile, k: &str) -> Option<usize> {
    key(f, k).and_then(GgufValue::as_u64).map(|v| v as usize)
}

fn opt_f(f: &GgufFile, k: &str) -> Option<f64> {
    key(f, k).and_then(GgufValue::as_f64)
}

impl ModelConfig {
    /// The configuration stored in a GGUF's `deepseek2.*` metadata.
    ///
    /// llama.cpp writes `yarn_log_multiplier = 0.1 · mscale_all_dim` and, for
    /// DeepSeek-V2, assumes `mscale = mscale_all_dim` (as every checkpoint has);
    /// whale reads it the same way.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .unwrap_or("");
        if arch != ARCH {
            return Err(ModelError::format(
                f.path(),
                format!(
                    "general.architecture is {arch:?}; whale runs {ARCH:?} (DeepSeek-V2/V3) files"
                ),
            ));
        }
        let rope = need_u(f, "rope.dimension_count")?;
        let n_head = need_u(f, "attention.head_count")?;
        let kv_lora_rank = need_u(f, "attention.kv_lora_rank")?;
        // MLA files give the per-head dims in *_mla; older ones in key_length/value_length.
        let (k_len, v_len) = match (
            opt_u(f, "attention.key_length_mla"),
            opt_u(f, "attention.value_length_mla"),
        ) {
            (Some(k), Some(v)) => (k, v),
            _ => (
                need_u(f, "attention.key_length")?,
                need_u(f, "attention.value_length")?,
            ),
        };
        let gating = opt_u(f, "expert_gating_func").unwrap_or(1);
        let (model_type, scoring_func) = match gating {
            1 => (ModelType::DeepseekV2, ScoringFunc::Softmax),
            2 => (ModelType::DeepseekV3, ScoringFunc::Sigmoid),
            g => {
                return Err(ModelError::format(
                    f.path(),
                    format!("{ARCH}.expert_gating_func {g} is not 1 or 2"),
                ))
            }
        };
        let n_group = opt_u(f, "expert_group_count").unwrap_or(1).max(1);
        let topk_method = match (model_type, n_group) {
            (ModelType::DeepseekV3, _) => TopkMethod::NoauxTc,
            (_, 1) => TopkMethod::Greedy,
            _ => TopkMethod::GroupLimitedGreedy,
        };
        let rope_scaling = match key(f, "rope.scaling.type").and_then(GgufValue::as_str) {
            Some("yarn") => {
                let m = opt_f(f, "rope.scaling.yarn_log_multiplier")
                    .map(|x| x / 0.1)
                    .unwrap_or(0.0);
                RopeScaling::Yarn {
                    factor: opt_f(f, "rope.scaling.factor").unwrap_or(1.0),
                    original_max_position_embeddings: opt_f(
                        f,
                        "rope.scaling.original_context_length",
                    )
                    .unwrap_or(4096.0),
                    beta_fast: opt_f(f, "rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                    beta_slow: opt_f(f, "rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                    mscale: m,
                    mscale_all_dim: m,
                    attention_factor: None,
                }
            }
            None | Some("none") => RopeScaling::None,
            Some(other) => {
                return Err(ModelError::format(
                    f.path(),
                    format!("rope scaling type {other:?} is not supported"),
                ))
            }
        };
        let vocab = opt_u(f, "vocab_size")
            .or_else(|| {
                f.get("tokenizer.ggml.tokens")
                    .and_then(GgufValue::as_array)
                    .map(|a| a.len())
            })
            .or_else(|| {
                f.tensor_info("token_embd.weight")
                    .and_then(|t| t.ne.get(1))
                    .map(|&n| n as usize)
            })
            .ok_or_else(|| ModelError::format(f.path(), "no vocabulary size"))?;
        let eps = opt_f(f, "attention.layer_norm_rms_epsilon").unwrap_or(1e-6) as f32;
        let cfg = ModelConfig {
            model_type,
            vocab_size: vocab,
            hidden_size: need_u(f, "embedding_length")?,
            intermediate_size: need_u(f, "feed_forward_length")?,
            moe_intermediate_size: opt_u(f, "expert_feed_forward_length").unwrap_or(0),
            num_hidden_layers: need_u(f, "block_count")?,
            num_attention_heads: n_head,
            q_lora_rank: opt_u(f, "attention.q_lora_rank").filter(|&r| r > 0),
            kv_lora_rank,
            qk_nope_head_dim: k_len.checked_sub(rope).ok_or_else(|| {
                ModelError::format(
                    f.path(),
                    format!("key length {k_len} is smaller than the rope dims {rope}"),
                )
            })?,
            qk_rope_head_dim: rope,
            v_head_dim: v_len,
            n_routed_experts: opt_u(f, "expert_count").unwrap_or(0),
            n_shared_experts: opt_u(f, "expert_shared_count").unwrap_or(0),
            num_experts_per_tok: opt_u(f, "expert_used_count").unwrap_or(0),
            routed_scaling_factor: opt_f(f, "expert_weights_scale").unwrap_or(1.0) as f32,
            topk_method,
            scoring_func,
            n_group,
            topk_group: opt_u(f, "expert_group_used_count").unwrap_or(1).max(1),
            norm_topk_prob: key(f, "expert_weights_norm")
                .and_then(GgufValue::as_bool)
                .unwrap_or(false),
            first_k_dense_replace: opt_u(f, "leading_dense_block_count").unwrap_or(0),
            rope_interleave: true,
            rms_norm_eps: eps,
            rope_theta: opt_f(f, "rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: opt_u(f, "context_length").unwrap_or(4096),
            tie_word_embeddings: f.tensor_info("output.weight").is_none(),
            bos_token_id: f
                .get("tokenizer.ggml.bos_token_id")
                .and_then(GgufValue::as_u64)
                .map(|v| v as u32),
            eos_token_ids: f
                .get("tokenizer.ggml.eos_token_id")
                .and_then(GgufValue::as_u64)
                .map(|v| vec![v as u32])
                .unwrap_or_default(),
        };
        cfg.validate().map_err(|e| e.in_file(f.path()))?;
        Ok(cfg)
    }
}

/// Whole-model tensors: (transformers' name, llama.cpp's name).
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer tensors: (name after `model.layers.N.`, name after `blk.N.`). Experts
/// and the split `kv_b_proj` have no one-to-one name and are handled apart.
const LAYER_TENSORS: [(&str, &str); 18] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_a_proj.weight", "attn_q_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn_q_b.weight"),
    (
        "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_mqa.weight",
    ),
    ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn_kv_b.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    (
        "mlp.shared_experts.gate_proj.weight",
        "ffn_gate_shexp.weight",
    ),
    ("mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mlp.shared_experts.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
];

/// transformers' tensor name → llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = MODEL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (_, g) = LAYER_TENSORS.iter().find(|(h, _)| *h == rest)?;
    Some(format!("blk.{layer}.{g}"))
}

/// llama.cpp's tensor name → transformers' (for the one-to-one names).
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = MODEL_TENSORS.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (h, _) = LAYER_TENSORS.iter().find(|(_, g)| *g == rest)?;
    Some(format!("model.layers.{layer}.{h}"))
}

impl GgufFile {
    fn checked(&self, gguf: &str, hf: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.tensor(gguf)?;
        // 1-D weights may be stored with trailing unit dims; compare element counts too.
        if t.shape() != shape {
            return Err(ModelError::Shape {
                file: self.path().to_path_buf(),
                tensor: format!("{gguf} (transformers: {hf})"),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }
}

impl TensorSource for GgufFile {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let g = gguf_name(name).ok_or_else(|| ModelError::MissingTensor {
            tensor: name.to_string(),
            files: self.path().display().to_string(),
        })?;
        self.checked(&g, name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.tensor_info(&g).is_some())
    }

    fn total_bytes(&self) -> usize {
        self.tensor_names()
            .iter()
            .filter_map(|n| self.tensor(n).ok())
            .map(|t| t.bytes().len())
            .sum()
    }

    fn kv_up(
        &self,
        li: usize,
        nh: usize,
        p: usize,
        v: usize,
        c: usize,
    ) -> Result<KvUp, ModelError> {
        let kb = format!("blk.{li}.attn_k_b.weight");
        if self.tensor_info(&kb).is_some() {
            let k_b_t = self.checked(&kb, "kv_b_proj (W_UK, transposed)", &[nh, c, p])?;
            let v_b = self.checked(
                &format!("blk.{li}.attn_v_b.weight"),
                "kv_b_proj (W_UV)",
                &[nh, v, c],
            )?;
            // Per-head slices ([C, P] of W_UKᵀ, [V, C] of W_UV) must be whole groups.
            let ok = c.is_multiple_of(8) && v.is_multiple_of(8);
            let w_uk = w_uk_q8(&k_b_t, nh, c, p).map(|t| Packable::new(t, ok));
            let (k_b_t, v_b) = (Packable::new(k_b_t, ok), Packable::new(v_b, ok));
            return Ok(KvUp::Split { k_b_t, v_b, w_uk });
        }
        let hf = format!("model.layers.{li}.self_attn.kv_b_proj.weight");
        Ok(KvUp::Fused(Linear::unpacked(TensorSource::get(
            self,
            &hf,
            &[nh * (p + v), c],
        )?)))
    }

    fn experts(&self, pre: &str, e: usize, i: usize, d: usize) -> Result<Vec<Mlp>, ModelError> {
        let li = pre
            .trim_start_matches("model.layers.")
            .trim_end_matches(".mlp");
        let stacked = |what: &str, shape: &[usize]| {
            self.checked(
                &format!("blk.{li}.ffn_{what}_exps.weight"),
                &format!("{pre}.experts.*.{what}_proj"),
                shape,
            )
            .map(crate::weights::Stack::new)
        };
        let gate = stacked("gate", &[e, i, d])?;
        let up = stacked("up", &[e, i, d])?;
        let down = stacked("down", &[e, d, i])?;
        Ok((0..e)
            .map(|k| Mlp::from_stacks((&gate, k * i), (&up, k * i), &down, k, i, d))
            .collect())
    }
}

/// `W_UK` as `[H·P, C]` Q8_0, from the file's `attn_k_b` (`W_UKᵀ` per head, `[H, C, P]`):
/// the expanded (prefill) form multiplies every latent row by it, and in the file's
/// orientation that product ran in f32 (each head's `[C, P]` block transposed per
/// call, ~4.8 GMAC per layer at depth 4096); as Q8_0 rows of `C` it runs in the
/// integer kernels. Re-rounding Q4_0/Q8_0 values to Q8_0 adds at most half a step of
/// 1/127 of each block's largest value. `None` when `C` is not whole blocks or the
/// file tensor is F32/F16 of a shape the f32 path handles anyway.
fn w_uk_q8(k_b_t: &Tensor, nh: usize, c: usize, p: usize) -> Option<Tensor> {
    use whale_kernels::DType;
    if !c.is_multiple_of(32) || !matches!(k_b_t.dtype(), DType::Q4_0 | DType::Q8_0) {
        return None;
    }
    let kt = k_b_t.to_f32(); // [H, C, P]
    let rb = DType::Q8_0.bytes_for(c)?;
    let mut bytes = vec![0u8; nh * p * rb];
    let mut row = vec![0.0f32; c];
    for h in 0..nh {
        for pi in 0..p {
            for (ci, v) in row.iter_mut().enumerate() {
                *v = kt[(h * c + ci) * p + pi];
            }
            let r = h * p + pi;
            whale_kernels::quantize::quantize_row(
                DType::Q8_0,
                &row,
                &mut bytes[r * rb..(r + 1) * rb],
            );
        }
    }
    Some(k_b_t.derived(bytes, DType::Q8_0, vec![nh * p, c]))
}
