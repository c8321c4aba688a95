//! Synthetic GGUF models with real DeepSeek shapes and random weights (`whale synth`):
//! how speed is measured when the real checkpoints cannot be downloaded. The files
//! are ordinary `deepseek2` GGUFs that llama.cpp loads too, so both engines can be
//! timed on identical bytes.

use crate::config::{ModelConfig, ModelType, RopeScaling, ScoringFunc, TopkMethod};
use crate::convert::{gguf_layout, model_meta, storage_type, tokenizer_meta_from};
use crate::error::ModelError;
use crate::gguf_write::{write_gguf, RowSource, TensorPlan};
use serde_json::json;
use std::path::Path;
use whale_kernels::DType;

/// DeepSeek-V2's chat template (from the released `tokenizer_config.json`).
const DEEPSEEK_V2_TEMPLATE: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// The configuration of a named preset.
pub fn preset(name: &str) -> Result<ModelConfig, ModelError> {
    match name {
        // DeepSeek-V2-Lite(-Chat) config.json.
        "deepseek-v2-lite" => Ok(ModelConfig {
            model_type: ModelType::DeepseekV2,
            vocab_size: 102400,
            hidden_size: 2048,
            intermediate_size: 10944,
            moe_intermediate_size: 1408,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            q_lora_rank: None,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            n_routed_experts: 64,
            n_shared_experts: 2,
            num_experts_per_tok: 6,
            routed_scaling_factor: 1.0,
            topk_method: TopkMethod::Greedy,
            scoring_func: ScoringFunc::Softmax,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            first_k_dense_replace: 1,
            rope_interleave: true,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 0.707,
                mscale_all_dim: 0.707,
                attention_factor: None,
            },
            max_position_embeddings: 163840,
            tie_word_embeddings: false,
            bos_token_id: Some(100000),
            eos_token_ids: vec![100001],
        }),
        other => Err(ModelError::config(format!(
            "unknown preset {other:?} (known: deepseek-v2-lite)"
        ))),
    }
}

/// Random values for one tensor: splitmix64 of (tensor seed, element index), uniform
/// in `offset ± amplitude`. Computed per row, so rows quantise in parallel.
struct Random {
    seed: u64,
    rows: usize,
    cols: usize,
    offset: f32,
    amplitude: f32,
}

impl RowSource for Random {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn row_into(&self, r: usize, out: &mut [f32]) {
        let base = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((r * self.cols) as u64);
        for (i, o) in out.iter_mut().enumerate() {
            let mut z = base.wrapping_add(i as u64);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / (1u32 << 23) as f32) - 1.0;
            *o = self.offset + u * self.amplitude;
        }
    }
}

/// Options of [`synth_gguf`].
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Preset name (`deepseek-v2-lite`).
    pub preset: String,
    /// Type of the 2-D weights.
    pub dtype: DType,
    /// `tokenizer.json` to embed (the real DeepSeek-V2 one for V2 presets).
    pub tokenizer: std::path::PathBuf,
    /// Override the layer count (a shorter variant; llama.cpp loads the V2-Lite layout
    /// without q-LoRA only at 26 or 27 layers).
    pub layers: Option<usize>,
}

/// Writes a synthetic model of `opts.preset`'s shapes to `out`.
pub fn synth_gguf(
    opts: &SynthOptions,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<ModelConfig, ModelError> {
    let mut cfg = preset(&opts.preset)?;
    if let Some(n) = opts.layers {
        if n == 0 {
            return Err(ModelError::config("--layers must be at least 1"));
        }
        cfg.num_hidden_layers = n;
        cfg.first_k_dense_replace = cfg.first_k_dense_replace.min(n);
    }
    let mut warnings = vec![];
    let name = format!("synthetic {}", opts.preset);
    let mut meta = model_meta(&cfg, &name, opts.dtype, &mut warnings);
    let tok_cfg = json!({
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>",
        "add_bos_token": true,
        "add_eos_token": false,
    });
    meta.extend(tokenizer_meta_from(
        &opts.tokenizer,
        &tok_cfg,
        Some(DEEPSEEK_V2_TEMPLATE.to_string()),
        cfg.vocab_size,
        None,
    )?);

    let plans: Vec<TensorPlan> = gguf_layout(&cfg)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let cols = *shape.last().unwrap_or(&1);
            let rows = shape.iter().rev().skip(1).product();
            let is_norm = shape.len() == 1;
            let source = Random {
                seed: k as u64 + 1,
                rows,
                cols,
                offset: if is_norm { 1.0 } else { 0.0 },
                // Uniform with variance 1/cols keeps activations O(1) through the layers.
                amplitude: if is_norm {
                    0.1
                } else {
                    (3.0 / cols as f32).sqrt()
                },
            };
            TensorPlan {
                dtype: storage_type(&name, &shape, opts.dtype),
                name,
                shape,
                source: Box::new(source) as Box<dyn RowSource>,
            }
        })
        .collect();
    write_gguf(out, &meta, &plans, progress)?;
    Ok(cfg)
}
