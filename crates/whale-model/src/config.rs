//! `config.json` of a DeepSeek-V2/V3 checkpoint, in both spellings:
//! checkpoint style (`rope_theta` + `rope_scaling: {type: "yarn", ...}`) and
//! transformers 5 style (`rope_parameters: {rope_type, rope_theta, ...}`).

use crate::error::ModelError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Which model class the checkpoint declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    /// `deepseek_v2`: V2, V2-Lite, V2.5, Coder-V2.
    DeepseekV2,
    /// `deepseek_v3`: V3 / R1 architecture.
    DeepseekV3,
}

/// How routed experts are chosen from router scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2-Lite).
    Greedy,
    /// Keep `topk_group` groups by their max score, then top-k (V2 236B).
    GroupLimitedGreedy,
    /// V3: sigmoid scores plus a selection-only bias, groups scored by the sum of their top 2.
    NoauxTc,
}

/// The router's score function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunc {
    /// V2 family.
    Softmax,
    /// V3.
    Sigmoid,
}

/// RoPE frequency scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// YaRN as DeepSeek uses it.
    Yarn {
        /// Context extension factor `s` (40 for shipped checkpoints).
        factor: f64,
        /// Pre-extension context `L₀` (4096).
        original_max_position_embeddings: f64,
        /// β_fast (32).
        beta_fast: f64,
        /// β_slow (1).
        beta_slow: f64,
        /// `mscale` (amplitude numerator); 0 means unset.
        mscale: f64,
        /// `mscale_all_dim` (softmax-scale factor and amplitude denominator); 0 means unset.
        mscale_all_dim: f64,
        /// Explicit cos/sin amplitude, when the config gives one.
        attention_factor: Option<f64>,
    },
}

/// A parsed, validated model configuration. Names follow the checkpoint.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Model class.
    pub model_type: ModelType,
    /// Embedding / lm_head rows.
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the dense MLP of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Decoder layers (excluding V3's MTP layer).
    pub num_hidden_layers: usize,
    /// MLA heads `H`.
    pub num_attention_heads: usize,
    /// Query LoRA rank; `None` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Latent width `d_c`.
    pub kv_lora_rank: usize,
    /// Non-rotary per-head q/k width `P`.
    pub qk_nope_head_dim: usize,
    /// Rotary per-head q width and shared k width `R`.
    pub qk_rope_head_dim: usize,
    /// Per-head value width `V`.
    pub v_head_dim: usize,
    /// Routed experts per MoE layer (0: every layer dense).
    pub n_routed_experts: usize,
    /// Shared experts (one MLP of `moe_intermediate_size * n_shared_experts`).
    pub n_shared_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Multiplier on routed weights.
    pub routed_scaling_factor: f32,
    /// Expert selection rule.
    pub topk_method: TopkMethod,
    /// Router score function.
    pub scoring_func: ScoringFunc,
    /// Expert groups.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Renormalise the top-k weights (honoured for V3 only, as transformers does).
    pub norm_topk_prob: bool,
    /// Layers below this index use the dense MLP.
    pub first_k_dense_replace: usize,
    /// Rotate adjacent pairs of the rope dims (true for every checkpoint; V3's
    /// `rope_interleave: false` selects transformers' half-split rotation instead).
    pub rope_interleave: bool,
    /// RMSNorm epsilon of the decoder norms.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Informational context length.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding.
    pub tie_word_embeddings: bool,
    /// BOS id from the config, if any.
    pub bos_token_id: Option<u32>,
    /// EOS ids from the config (one or several).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    routed_scaling_factor: Option<f32>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    norm_topk_prob: Option<bool>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    rope_interleave: Option<bool>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
}

fn ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates config JSON text.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| ModelError::config(format!("invalid config.json: {e}")))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::config(m));
        let arch = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        let model_type = match raw.model_type.as_deref() {
            Some("deepseek_v2") => ModelType::DeepseekV2,
            Some("deepseek_v3") => ModelType::DeepseekV3,
            None if arch == "DeepseekV2ForCausalLM" => ModelType::DeepseekV2,
            None if arch == "DeepseekV3ForCausalLM" => ModelType::DeepseekV3,
            Some(other) => {
                return bad(format!(
                    "unsupported model_type {other:?}: whale runs deepseek_v2 and deepseek_v3"
                ))
            }
            None => return bad("config.json has no model_type".into()),
        };
        let default_method = match model_type {
            ModelType::DeepseekV2 => "greedy",
            ModelType::DeepseekV3 => "noaux_tc",
        };
        let topk_method = match raw.topk_method.as_deref().unwrap_or(default_method) {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => return bad(format!("unsupported topk_method {other:?} (expected greedy, group_limited_greedy or noaux_tc)")),
        };
        // transformers fixes the score function by class (softmax for V2, sigmoid for V3);
        // a checkpoint that names another one would be silently mis-run, so refuse it.
        let class_scoring = match model_type {
            ModelType::DeepseekV2 => ScoringFunc::Softmax,
            ModelType::DeepseekV3 => ScoringFunc::Sigmoid,
        };
        let scoring_func = match raw.scoring_func.as_deref() {
            None => class_scoring,
            Some("softmax") => ScoringFunc::Softmax,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some(other) => {
                return bad(format!(
                    "unsupported scoring_func {other:?} (expected softmax or sigmoid)"
                ))
            }
        };
        if scoring_func != class_scoring {
            return bad(format!(
                "scoring_func {scoring_func:?} does not match model_type {model_type:?}"
            ));
        }
        match (model_type, topk_method) {
            (ModelType::DeepseekV2, TopkMethod::NoauxTc) => {
                return bad("topk_method noaux_tc needs model_type deepseek_v3".into())
            }
            (ModelType::DeepseekV3, m) if m != TopkMethod::NoauxTc => {
                return bad(format!(
                    "model_type deepseek_v3 routes with noaux_tc, config says {m:?}"
                ))
            }
            _ => {}
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return bad(format!(
                    "unsupported hidden_act {act:?} (DeepSeek uses silu)"
                ));
            }
        }
        if raw.attention_bias == Some(true) || raw.mlp_bias == Some(true) {
            return bad("attention_bias/mlp_bias = true is not a DeepSeek layout".into());
        }
        if raw.moe_layer_freq.is_some_and(|f| f != 1) {
            // transformers ignores the field; every released checkpoint has 1.
            return bad(format!(
                "moe_layer_freq {:?} is not supported (only 1)",
                raw.moe_layer_freq
            ));
        }
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let cfg = ModelConfig {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(0),
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank: raw.q_lora_rank.filter(|&r| r > 0),
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            n_routed_experts: raw.n_routed_experts.unwrap_or(0),
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(0),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            topk_method,
            scoring_func,
            n_group: raw.n_group.unwrap_or(1).max(1),
            topk_group: raw.topk_group.unwrap_or(1).max(1),
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
            rope_interleave: model_type == ModelType::DeepseekV2
                || raw.rope_interleave.unwrap_or(true),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return bad(format!(
                "qk_rope_head_dim must be even, got {}",
                self.qk_rope_head_dim
            ));
        }
        if self.has_moe_layers() {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return bad(format!(
                    "num_experts_per_tok {} must be in 1..={} (n_routed_experts)",
                    self.num_experts_per_tok, self.n_routed_experts
                ));
            }
            if self.moe_intermediate_size == 0 {
                return bad(
                    "moe_intermediate_size must be positive when there are routed experts".into(),
                );
            }
            if self.topk_method != TopkMethod::Greedy {
                if !self.n_routed_experts.is_multiple_of(self.n_group) {
                    return bad(format!(
                        "n_routed_experts {} is not divisible by n_group {}",
                        self.n_routed_experts, self.n_group
                    ));
                }
                if self.topk_group > self.n_group {
                    return bad(format!(
                        "topk_group {} exceeds n_group {}",
                        self.topk_group, self.n_group
                    ));
                }
                let kept = self.topk_group * (self.n_routed_experts / self.n_group);
                if kept < self.num_experts_per_tok {
                    return bad(format!(
                        "topk_group keeps {kept} experts, fewer than num_experts_per_tok {}",
                        self.num_experts_per_tok
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether any layer is an MoE layer.
    pub fn has_moe_layers(&self) -> bool {
        self.n_routed_experts > 0 && self.first_k_dense_replace < self.num_hidden_layers
    }

    /// Whether layer `i` uses the MoE block (as transformers decides it).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0 && i >= self.first_k_dense_replace
    }

    /// `qk_nope_head_dim + qk_rope_head_dim` (192 for real checkpoints).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: `kv_lora_rank + qk_rope_head_dim` (576).
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Attention softmax scale: `qk_head_dim^-0.5 · mscale(factor, mscale_all_dim)²`.
    pub fn softmax_scale(&self) -> f32 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        let m = match self.rope_scaling {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim,
                ..
            } if mscale_all_dim != 0.0 => yarn_get_mscale(factor, mscale_all_dim),
            _ => 1.0,
        };
        (base * m * m) as f32
    }
}

/// YaRN magnitude: `1` for `s ≤ 1`, else `0.1 · m · ln s + 1`.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn parse_rope(raw: &Raw) -> Result<(f64, RopeScaling), ModelError> {
    // transformers 5 writes `rope_parameters`; checkpoints write `rope_scaling`.
    let params = raw
        .rope_parameters
        .as_ref()
        .filter(|v| v.is_object())
        .or(raw.rope_scaling.as_ref().filter(|v| v.is_object()));
    let theta = params
        .and_then(|p| num(p, "rope_theta"))
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok((theta, RopeScaling::None)),
        "yarn" => {
            let factor = num(p, "factor")
                .ok_or_else(|| ModelError::config("yarn rope scaling has no factor"))?;
            let orig = num(p, "original_max_position_embeddings")
                .or(raw.max_position_embeddings.map(|m| m as f64 / factor))
                .ok_or_else(|| {
                    ModelError::config("yarn rope scaling has no original_max_position_embeddings")
                })?;
            Ok((
                theta,
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: num(p, "beta_fast").unwrap_or(32.0),
                    beta_slow: num(p, "beta_slow").unwrap_or(1.0),
                    mscale: num(p, "mscale").unwrap_or(0.0),
                    mscale_all_dim: num(p, "mscale_all_dim").unwrap_or(0.0),
                    attention_factor: num(p, "attention_factor"),
                },
            ))
        }
        other => Err(ModelError::config(format!(
            "unsupported rope scaling type {other:?} (whale supports default and yarn)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LITE: &str = r#"{
      "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
      "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
      "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
      "num_key_value_heads": 16, "q_lora_rank": null, "kv_lora_rank": 512,
      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
      "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
      "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
      "norm_topk_prob": false, "scoring_func": "softmax", "first_k_dense_replace": 1,
      "moe_layer_freq": 1, "rms_norm_eps": 1e-06, "rope_theta": 10000,
      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
      "max_position_embeddings": 163840, "bos_token_id": 100000, "eos_token_id": 100001,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#;

    #[test]
    fn parses_v2_lite_checkpoint_config() {
        let c = ModelConfig::from_json_str(LITE).unwrap();
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(c.latent_dim(), 576);
        assert_eq!(c.qk_head_dim(), 192);
        assert!((c.softmax_scale() - 0.114_721_39).abs() < 1e-7);
        assert_eq!(c.eos_token_ids, vec![100001]);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
    }

    #[test]
    fn both_rope_spellings_agree() {
        let v5 = LITE.replace(
            r#""rope_theta": 10000,
      "rope_scaling": {"type": "yarn","#,
            r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,"#,
        );
        assert_ne!(v5, LITE);
        let a = ModelConfig::from_json_str(LITE).unwrap();
        let b = ModelConfig::from_json_str(&v5).unwrap();
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
    }

    #[test]
    fn v3_scale_and_unknown_values_fail_clearly() {
        let v3 = LITE
            .replace("deepseek_v2", "deepseek_v3")
            .replace("\"greedy\"", "\"noaux_tc\"")
            .replace("\"softmax\"", "\"sigmoid\"")
            .replace("0.707", "1.0");
        let c = ModelConfig::from_json_str(&v3).unwrap();
        assert!((c.softmax_scale() - 0.135_233_78).abs() < 1e-7);
        let e = ModelConfig::from_json_str(&LITE.replace("deepseek_v2", "llama")).unwrap_err();
        assert!(
            e.to_string().contains("unsupported model_type \"llama\""),
            "{e}"
        );
        let e = ModelConfig::from_json_str(&LITE.replace("\"greedy\"", "\"best\"")).unwrap_err();
        assert!(e.to_string().contains("topk_method \"best\""), "{e}");
        let e = ModelConfig::from_json_str(&LITE.replace("\"softmax\"", "\"relu\"")).unwrap_err();
        assert!(e.to_string().contains("scoring_func \"relu\""), "{e}");
    }
}
