//! Hugging Face folder → llama.cpp GGUF (`whale convert`): the `deepseek2`
//! metadata, the tokenizer, and every tensor under llama.cpp's name in the
//! newer MLA layout (`attn_k_b` + `attn_v_b` instead of `attn_kv_b`), quantised
//! as `llama-quantize` would quantise it.

use crate::config::{ModelConfig, ModelType, RopeScaling};
use crate::error::{read_json, ModelError};
use crate::gguf_write::{write_gguf, MetaValue, RowSource, TensorPlan};
use crate::model::TensorSource;
use crate::weights::{Tensor, WeightStore};
use serde_json::Value;
use std::path::Path;
use whale_kernels::quantize::can_quantize;
use whale_kernels::DType;

/// What `convert_to_gguf` did.
#[derive(Clone, Debug, Default)]
pub struct ConvertReport {
    /// Every tensor written, with its type.
    pub tensors: Vec<(String, DType)>,
    /// Tensors stored in another type than asked because their rows are not whole
    /// blocks of it (llama.cpp's fallback: Q4_K → Q5_0, Q6_K → Q8_0, then F16).
    pub fallbacks: Vec<(String, DType)>,
    /// Warnings about what GGUF cannot express.
    pub warnings: Vec<String>,
}

/// Options of `convert_to_gguf`.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Type of the 2-D weights (norms, biases and the router stay F32).
    pub dtype: DType,
    /// `tokenizer.ggml.pre` to write; detected from `tokenizer.json` when `None`.
    pub tokenizer_pre: Option<String>,
}

/// The type a weight of `shape` is stored in when `target` is asked for.
pub(crate) fn storage_type(name: &str, shape: &[usize], target: DType) -> DType {
    // llama.cpp keeps 1-D tensors and the expert router in F32.
    if shape.len() < 2 || name.contains("ffn_gate_inp") {
        return DType::F32;
    }
    let cols = *shape.last().unwrap_or(&1);
    if target.bytes_for(cols).is_some() {
        return target;
    }
    let fallback = match target {
        DType::Q4K => DType::Q5_0,
        DType::Q5K => DType::Q5_1,
        DType::Q6K => DType::Q8_0,
        t => t,
    };
    if fallback.bytes_for(cols).is_some() {
        fallback
    } else {
        DType::F16
    }
}

/// llama.cpp's `general.file_type` (`llama_ftype`) of a mostly-`t` file.
fn file_type(t: DType) -> u32 {
    match t {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 | DType::Q4_0R8 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 | DType::Q8_0R8 => 7,
        DType::Q5_0 | DType::Q5_0R8 => 8,
        DType::Q5_1 => 9,
        DType::Q4K | DType::Q4KR8 => 14,
        DType::Q5K => 16,
        DType::Q6K => 18,
        DType::BF16 => 32,
    }
}

/// Rows of a stored tensor (all dims but the last flattened).
struct Rows(Tensor);

impl RowSource for Rows {
    fn rows(&self) -> usize {
        self.0.shape().iter().rev().skip(1).product()
    }
    fn cols(&self) -> usize {
        *self.0.shape().last().unwrap_or(&1)
    }
    fn row_into(&self, r: usize, out: &mut [f32]) {
        let rb = self.0.dtype().bytes_for(self.cols()).expect("whole blocks");
        whale_kernels::decode_into(self.0.dtype(), &self.0.bytes()[r * rb..(r + 1) * rb], out);
    }
}

/// Several same-shaped matrices stacked (`[E, rows, cols]` from E experts).
struct Stack(Vec<Tensor>);

impl RowSource for Stack {
    fn rows(&self) -> usize {
        self.0.iter().map(|t| t.shape()[0]).sum()
    }
    fn cols(&self) -> usize {
        self.0.first().map_or(0, |t| t.shape()[1])
    }
    fn row_into(&self, r: usize, out: &mut [f32]) {
        let per = self.0[0].shape()[0];
        self.0[r / per].mat().row_into(r % per, out);
    }
}

/// Values computed at conversion time (the split `kv_b_proj`).
struct Owned {
    data: Vec<f32>,
    cols: usize,
}

impl RowSource for Owned {
    fn rows(&self) -> usize {
        self.data.len() / self.cols
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn row_into(&self, r: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]);
    }
}

/// Splits `kv_b_proj` `[H·(P+V), C]` into llama.cpp's `attn_k_b` `[H, C, P]`
/// (W_UK per head, transposed) and `attn_v_b` `[H, V, C]` (W_UV per head).
fn split_kv_b(w: &[f32], h: usize, p: usize, v: usize, c: usize) -> (Owned, Owned) {
    // w: [H, P+V, C]
    let mut k_b = vec![0.0; h * c * p];
    let mut v_b = vec![0.0; h * v * c];
    for head in 0..h {
        let base = head * (p + v) * c;
        for i in 0..p {
            for j in 0..c {
                k_b[head * c * p + j * p + i] = w[base + i * c + j];
            }
        }
        v_b[head * v * c..(head + 1) * v * c].copy_from_slice(&w[base + p * c..base + (p + v) * c]);
    }
    (Owned { data: k_b, cols: p }, Owned { data: v_b, cols: c })
}

/// Known pre-tokenizers, recognised by the first regex of their split sequence.
fn detect_pre(tokenizer: &Value) -> Option<&'static str> {
    let pre = tokenizer.get("pre_tokenizer")?;
    let steps = match pre.get("pretokenizers") {
        Some(Value::Array(a)) => a.clone(),
        _ => vec![pre.clone()],
    };
    let regexes: Vec<&str> = steps
        .iter()
        .filter_map(|s| s.get("pattern")?.get("Regex")?.as_str())
        .collect();
    match regexes.as_slice() {
        ["[\r\n]", l, ..] if l.starts_with("\\s?[A-Za-z\u{b5}") => Some("deepseek-llm"),
        ["[\r\n]", "\\s?\\p{L}+", ..] => Some("deepseek-coder"),
        ["\\p{N}{1,3}", ..] => Some("deepseek-v3"),
        [] if steps.len() == 1
            && pre.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && pre.get("use_regex").and_then(Value::as_bool) != Some(false) =>
        {
            Some("gpt-2")
        }
        _ => None,
    }
}

/// A special-token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_content(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// `tokenizer.*` metadata from a folder's `tokenizer.json`, `tokenizer_config.json`
/// and chat template.
fn tokenizer_meta(
    dir: &Path,
    vocab_size: usize,
    pre: Option<&str>,
) -> Result<Vec<(String, MetaValue)>, ModelError> {
    let cfg = crate::tokenizer::read_tokenizer_config(dir)?;
    let template = crate::tokenizer::chat_template_of(dir, &cfg)?;
    tokenizer_meta_from(&dir.join("tokenizer.json"), &cfg, template, vocab_size, pre)
}

/// `tokenizer.*` metadata from `tokenizer.json` plus a `tokenizer_config.json` value,
/// laid out as llama.cpp's converter lays it out (vocabulary padded to `vocab_size`).
pub(crate) fn tokenizer_meta_from(
    tj: &Path,
    cfg: &Value,
    template: Option<String>,
    vocab_size: usize,
    pre: Option<&str>,
) -> Result<Vec<(String, MetaValue)>, ModelError> {
    let tok = read_json(tj)?;
    let model = &tok["model"];
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(ModelError::format(
            tj,
            "only byte-level BPE tokenizers can be written to GGUF",
        ));
    }
    let pre = match pre {
        Some(p) => p.to_string(),
        None => detect_pre(&tok).map(String::from).ok_or_else(|| {
            ModelError::format(
                tj,
                "the pre-tokenizer is none of DeepSeek's (deepseek-llm, deepseek-coder, deepseek-v3); \
                 name the closest with --tokenizer-pre",
            )
        })?,
    };
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<(), ModelError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            ModelError::format(
                tj,
                format!("token {text:?} has id {id}, beyond vocab_size {vocab_size}"),
            )
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    if let Some(vocab) = model.get("vocab").and_then(Value::as_object) {
        for (text, id) in vocab {
            place(id.as_u64().unwrap_or(u64::MAX), text, 1)?;
        }
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let special = a["special"].as_bool().unwrap_or(false);
        place(id, text, if special { 3 } else { 4 })?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), MetaValue::Str(pre)),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::StrArray(tokens.clone()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::I32Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            MetaValue::StrArray(merges),
        ),
    ];
    for (key, gguf) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = token_content(cfg.get(key)).and_then(id_of) {
            meta.push((gguf.to_string(), MetaValue::U32(id)));
        }
    }
    for key in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = cfg.get(key).and_then(Value::as_bool) {
            meta.push((format!("tokenizer.ggml.{key}"), MetaValue::Bool(b)));
        }
    }
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), MetaValue::Str(t)));
    }
    Ok(meta)
}

/// `deepseek2.*` and `general.*` metadata of a configuration.
pub(crate) fn model_meta(
    cfg: &ModelConfig,
    name: &str,
    dtype: DType,
    warnings: &mut Vec<String>,
) -> Vec<(String, MetaValue)> {
    let a = |k: &str| format!("deepseek2.{k}");
    let u = |v: usize| MetaValue::U32(v as u32);
    let (c, r) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
    let mut m = vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str("deepseek2".into()),
        ),
        ("general.type".to_string(), MetaValue::Str("model".into())),
        ("general.name".to_string(), MetaValue::Str(name.to_string())),
        (
            "general.file_type".to_string(),
            MetaValue::U32(file_type(dtype)),
        ),
        (
            "general.quantization_version".to_string(),
            MetaValue::U32(2),
        ),
        (a("block_count"), u(cfg.num_hidden_layers)),
        (a("context_length"), u(cfg.max_position_embeddings)),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_attention_heads)),
        // MLA runs as multi-query attention over the latent: one KV "head" of C + R.
        (a("attention.head_count_kv"), u(1)),
        (a("attention.key_length"), u(c + r)),
        (a("attention.value_length"), u(c)),
        (a("attention.key_length_mla"), u(cfg.qk_nope_head_dim + r)),
        (a("attention.value_length_mla"), u(cfg.v_head_dim)),
        (a("attention.kv_lora_rank"), u(c)),
        (a("rope.dimension_count"), u(r)),
        (a("rope.freq_base"), MetaValue::F32(cfg.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(cfg.rms_norm_eps),
        ),
        (a("leading_dense_block_count"), u(cfg.first_k_dense_replace)),
        (a("vocab_size"), u(cfg.vocab_size)),
    ];
    if let Some(q) = cfg.q_lora_rank {
        m.push((a("attention.q_lora_rank"), u(q)));
    }
    if cfg.n_routed_experts > 0 {
        m.extend([
            (a("expert_count"), u(cfg.n_routed_experts)),
            (a("expert_used_count"), u(cfg.num_experts_per_tok)),
            (a("expert_shared_count"), u(cfg.n_shared_experts)),
            (
                a("expert_feed_forward_length"),
                u(cfg.moe_intermediate_size),
            ),
            (
                a("expert_weights_scale"),
                MetaValue::F32(cfg.routed_scaling_factor),
            ),
            (
                a("expert_weights_norm"),
                MetaValue::Bool(cfg.norm_topk_prob),
            ),
            (a("expert_group_count"), u(cfg.n_group)),
            (a("expert_group_used_count"), u(cfg.topk_group)),
            (
                a("expert_gating_func"),
                u(if cfg.model_type == ModelType::DeepseekV3 {
                    2
                } else {
                    1
                }),
            ),
        ]);
    }
    if let RopeScaling::Yarn {
        factor,
        original_max_position_embeddings,
        beta_fast,
        beta_slow,
        mscale,
        mscale_all_dim,
        attention_factor,
    } = cfg.rope_scaling
    {
        if mscale != mscale_all_dim || attention_factor.is_some() {
            warnings.push(format!(
                "YaRN mscale {mscale} differs from mscale_all_dim {mscale_all_dim} (or an attention_factor is set): \
                 GGUF keeps only yarn_log_multiplier = 0.1 · mscale_all_dim, so the file's RoPE amplitude differs"
            ));
        }
        m.extend([
            (a("rope.scaling.type"), MetaValue::Str("yarn".into())),
            (a("rope.scaling.factor"), MetaValue::F32(factor as f32)),
            (
                a("rope.scaling.original_context_length"),
                u(original_max_position_embeddings as usize),
            ),
            (
                a("rope.scaling.yarn_beta_fast"),
                MetaValue::F32(beta_fast as f32),
            ),
            (
                a("rope.scaling.yarn_beta_slow"),
                MetaValue::F32(beta_slow as f32),
            ),
            (
                a("rope.scaling.yarn_log_multiplier"),
                MetaValue::F32((0.1 * mscale_all_dim) as f32),
            ),
        ]);
    }
    if !cfg.rope_interleave {
        warnings.push(
            "rope_interleave = false cannot be expressed in GGUF (llama.cpp always rotates adjacent pairs)".into(),
        );
    }
    m
}

/// The layer index of `blk.N.…`.
fn layer_of(name: &str) -> usize {
    name.split('.')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Every tensor of a `deepseek2` GGUF for `cfg`, in file order: (llama.cpp's name,
/// shape outermost first). MLA in the split layout (`attn_k_b` `[H, C, P]`,
/// `attn_v_b` `[H, V, C]`), routed experts stacked per layer.
pub(crate) fn gguf_layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, h, vocab) = (cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size);
    let (p, r, v, c) = (
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let mut t = vec![("token_embd.weight".to_string(), vec![vocab, d])];
    for li in 0..cfg.num_hidden_layers {
        let mut add = |name: &str, shape: Vec<usize>| t.push((format!("blk.{li}.{name}"), shape));
        add("attn_norm.weight", vec![d]);
        match cfg.q_lora_rank {
            Some(q) => {
                add("attn_q_a.weight", vec![q, d]);
                add("attn_q_a_norm.weight", vec![q]);
                add("attn_q_b.weight", vec![h * (p + r), q]);
            }
            None => add("attn_q.weight", vec![h * (p + r), d]),
        }
        add("attn_kv_a_mqa.weight", vec![c + r, d]);
        add("attn_kv_a_norm.weight", vec![c]);
        add("attn_output.weight", vec![d, h * v]);
        add("ffn_norm.weight", vec![d]);
        if cfg.is_moe_layer(li) {
            let (e, i) = (cfg.n_routed_experts, cfg.moe_intermediate_size);
            add("ffn_gate_inp.weight", vec![e, d]);
            if cfg.model_type == ModelType::DeepseekV3 {
                add("exp_probs_b.bias", vec![e]);
            }
            if cfg.n_shared_experts > 0 {
                let s = i * cfg.n_shared_experts;
                add("ffn_gate_shexp.weight", vec![s, d]);
                add("ffn_up_shexp.weight", vec![s, d]);
                add("ffn_down_shexp.weight", vec![d, s]);
            }
            add("ffn_gate_exps.weight", vec![e, i, d]);
            add("ffn_up_exps.weight", vec![e, i, d]);
            add("ffn_down_exps.weight", vec![e, d, i]);
        } else {
            let i = cfg.intermediate_size;
            add("ffn_gate.weight", vec![i, d]);
            add("ffn_up.weight", vec![i, d]);
            add("ffn_down.weight", vec![d, i]);
        }
        add("attn_k_b.weight", vec![h, c, p]);
        add("attn_v_b.weight", vec![h, v, c]);
    }
    t.push(("output_norm.weight".into(), vec![d]));
    if !cfg.tie_word_embeddings {
        t.push(("output.weight".into(), vec![vocab, d]));
    }
    t
}

/// Converts the Hugging Face model folder `dir` into a GGUF file at `out`.
pub fn convert_to_gguf(
    dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<ConvertReport, ModelError> {
    if !can_quantize(opts.dtype) {
        return Err(ModelError::config(format!(
            "whale cannot write {}; choose f32, f16, bf16, q8_0, q5_0, q4_0, q4_k or q6_k",
            opts.dtype.name()
        )));
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let st = WeightStore::open_dir(dir)?;
    let mut report = ConvertReport::default();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut meta = model_meta(&cfg, &name, opts.dtype, &mut report.warnings);
    if dir.join("tokenizer.json").is_file() {
        meta.extend(tokenizer_meta(
            dir,
            cfg.vocab_size,
            opts.tokenizer_pre.as_deref(),
        )?);
    }

    let (h, p, v, c) = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let (e, i, d) = (
        cfg.n_routed_experts,
        cfg.moe_intermediate_size,
        cfg.hidden_size,
    );
    let mut plans: Vec<TensorPlan> = Vec::new();
    let mut v_b_next: Option<Owned> = None;
    for (name, shape) in gguf_layout(&cfg) {
        // `blk.N.attn_k_b.weight` → `attn_k_b.weight`; whole-model names → "".
        let suffix = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .map_or("", |(_, x)| x);
        let source: Box<dyn RowSource> = match suffix {
            "attn_k_b.weight" => {
                let li = layer_of(&name);
                let kv_b = st.get(
                    &format!("model.layers.{li}.self_attn.kv_b_proj.weight"),
                    &[h * (p + v), c],
                )?;
                let (k_b, v_b) = split_kv_b(&kv_b.mat().to_f32(), h, p, v, c);
                v_b_next = Some(v_b);
                Box::new(k_b)
            }
            "attn_v_b.weight" => Box::new(v_b_next.take().expect("attn_k_b comes first")),
            which @ ("ffn_gate_exps.weight" | "ffn_up_exps.weight" | "ffn_down_exps.weight") => {
                // [E, I, d] / [E, d, I]: expert k's matrix is rows k·I.. of the stack.
                let li = layer_of(&name);
                let experts = st.experts(&format!("model.layers.{li}.mlp"), e, i, d)?;
                let pick = |m: &crate::linear::Mlp| match which {
                    "ffn_gate_exps.weight" => m.gate.tensor().clone(),
                    "ffn_up_exps.weight" => m.up.tensor().clone(),
                    _ => m.down.tensor().clone(),
                };
                Box::new(Stack(experts.iter().map(pick).collect()))
            }
            _ => {
                let hf = crate::gguf_model::hf_name(&name)
                    .expect("every other layout name maps one to one");
                Box::new(Rows(st.get(&hf, &shape)?))
            }
        };
        let dtype = storage_type(&name, &shape, opts.dtype);
        plans.push(TensorPlan {
            name,
            shape,
            dtype,
            source,
        });
    }
    for t in &plans {
        report.tensors.push((t.name.clone(), t.dtype));
        if t.dtype != opts.dtype && t.dtype != DType::F32 {
            report.fallbacks.push((t.name.clone(), t.dtype));
        }
    }
    write_gguf(out, &meta, &plans, progress)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_types_follow_llama_cpp() {
        // DeepSeek-V2-Lite: expert rows of 1408 and dense rows of 10944 are not whole 256-blocks.
        assert_eq!(
            storage_type("blk.1.ffn_down_exps.weight", &[64, 2048, 1408], DType::Q4K),
            DType::Q5_0
        );
        assert_eq!(
            storage_type("blk.0.ffn_down.weight", &[2048, 10944], DType::Q6K),
            DType::Q8_0
        );
        assert_eq!(
            storage_type("blk.1.ffn_up_exps.weight", &[64, 1408, 2048], DType::Q4K),
            DType::Q4K
        );
        assert_eq!(
            storage_type("blk.0.attn_k_b.weight", &[16, 512, 128], DType::Q4K),
            DType::Q5_0
        );
        assert_eq!(
            storage_type("blk.0.attn_norm.weight", &[2048], DType::Q4_0),
            DType::F32
        );
        assert_eq!(
            storage_type("blk.1.ffn_gate_inp.weight", &[64, 2048], DType::Q8_0),
            DType::F32
        );
        assert_eq!(
            storage_type("blk.0.attn_k_b.weight", &[4, 32, 16], DType::Q8_0),
            DType::F16
        );
        assert_eq!(
            storage_type("blk.0.attn_k_b.weight", &[4, 32, 16], DType::BF16),
            DType::BF16
        );
    }

    #[test]
    fn kv_b_split_matches_the_per_head_layout() {
        let (h, p, v, c) = (2, 3, 2, 4);
        let vals: Vec<f32> = (0..h * (p + v) * c).map(|x| x as f32).collect();
        let (k_b, v_b) = split_kv_b(&vals, h, p, v, c);
        // k_b[head, j, i] = kv_b[head·(p+v) + i, j]
        for head in 0..h {
            for j in 0..c {
                for i in 0..p {
                    assert_eq!(
                        k_b.data[head * c * p + j * p + i],
                        vals[(head * (p + v) + i) * c + j]
                    );
                }
            }
            for i in 0..v {
                for j in 0..c {
                    assert_eq!(
                        v_b.data[head * v * c + i * c + j],
                        vals[(head * (p + v) + p + i) * c + j]
                    );
                }
            }
        }
    }
}
