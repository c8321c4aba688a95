//! whale's forward pass against transformers' (tools/make_fixtures.py).

mod common;
use common::*;
use whale_model::{BatchItem, Logits, MlaMode, ModelConfig, ModelFolder};

fn greedy(folder: &ModelFolder, prompt: &[u32], n: usize) -> Vec<u32> {
    let m = &folder.model;
    let mut cache = m.new_cache();
    let mut logits = m.forward(prompt, &mut cache, Logits::Last).unwrap();
    let mut out = vec![];
    for _ in 0..n {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.partial_cmp(b.1).unwrap().then(b.0.cmp(&a.0)))
            .unwrap()
            .0 as u32;
        out.push(next);
        logits = m.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    out
}

fn check_f32_fixture(name: &str) {
    let folder = ModelFolder::open(&model_dir(name)).unwrap();
    let exp = expected(name);
    let mut cache = folder.model.new_cache();
    let all = folder
        .model
        .forward(&exp.tokens, &mut cache, Logits::All)
        .unwrap();
    let err = max_abs_diff(&all, &exp.logits);
    eprintln!("{name}: max |logit error| over all positions = {err:.3e}");
    assert!(err < 1e-4, "{name}: all-position logits differ by {err}");
    let last = folder
        .model
        .forward(&exp.tokens, &mut folder.model.new_cache(), Logits::Last)
        .unwrap();
    let err_last = max_abs_diff(&last, &exp.logits[exp.logits.len() - 1..]);
    assert!(
        err_last < 1e-4,
        "{name}: last-position logits differ by {err_last}"
    );
    assert_eq!(
        greedy(&folder, &exp.tokens, 32),
        exp.greedy,
        "{name}: greedy continuation"
    );

    // The f16 cache the commands use: latents rounded to 11 significant bits.
    let mut folder = folder;
    folder.model.set_kv_type(whale_model::KvType::F16);
    let mut cache = folder.model.new_cache();
    let all16 = folder
        .model
        .forward(&exp.tokens, &mut cache, Logits::All)
        .unwrap();
    let scale = exp
        .logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    let rel = max_abs_diff(&all16, &exp.logits) / scale;
    eprintln!("{name}: f16 cache: max |logit error| / max |logit| = {rel:.3e}");
    assert!(
        rel < F16_CACHE_BOUND,
        "{name}: f16 cache logits differ by {rel}"
    );
    assert_eq!(
        greedy(&folder, &exp.tokens, 32),
        exp.greedy,
        "{name}: greedy continuation with an f16 cache"
    );

    // The bf16 cache: latents rounded to 8 significant bits, and decode attention
    // multiplying in bf16 (queries and probabilities rounded too). Fed a token at a
    // time, so every position runs the absorbed decode over the cache, against
    // transformers' logits at that position.
    folder.model.set_kv_type(whale_model::KvType::Bf16);
    let mut cache = folder.model.new_cache();
    let mut rel = 0.0f32;
    for (i, &t) in exp.tokens.iter().enumerate() {
        let row = folder
            .model
            .forward(&[t], &mut cache, Logits::Last)
            .unwrap();
        rel = rel.max(max_abs_diff(&row, &exp.logits[i..i + 1]) / scale);
    }
    eprintln!("{name}: bf16 cache, token by token: max |logit error| / max |logit| = {rel:.3e}");
    assert!(
        rel < BF16_CACHE_BOUND,
        "{name}: bf16 cache logits differ by {rel}"
    );
    // The whole prompt at once in the expanded form: its tiled attention multiplies
    // in bf16 over a bf16 cache too.
    folder.model.set_mla_mode(whale_model::MlaMode::Expanded);
    let all_bf16 = folder
        .model
        .forward(&exp.tokens, &mut folder.model.new_cache(), Logits::All)
        .unwrap();
    folder.model.set_mla_mode(whale_model::MlaMode::Auto);
    let rel = max_abs_diff(&all_bf16, &exp.logits) / scale;
    eprintln!("{name}: bf16 cache, expanded prefill: max |logit error| / max |logit| = {rel:.3e}");
    assert!(
        rel < BF16_CACHE_BOUND,
        "{name}: bf16 cache, expanded prefill logits differ by {rel}"
    );
}

/// Largest logit error, relative to the largest logit, that the f16 cache may add.
const F16_CACHE_BOUND: f32 = 2e-3;

/// The same for the bf16 cache and its bf16 attention (three fewer significant bits
/// than f16: about eight times the rounding).
const BF16_CACHE_BOUND: f32 = 1.6e-2;

#[test]
fn v2_lite_checkpoint_style_matches_transformers() {
    check_f32_fixture("v2-lite");
}

#[test]
fn v2_qlora_group_limited_sharded_matches_transformers() {
    check_f32_fixture("v2");
}

#[test]
fn v3_noaux_tc_matches_transformers() {
    check_f32_fixture("v3");
}

#[test]
fn bf16_weights_match_transformers() {
    let name = "v2-lite-bf16";
    let folder = ModelFolder::open(&model_dir(name)).unwrap();
    let exp = expected(name);
    let all = folder
        .model
        .forward(&exp.tokens, &mut folder.model.new_cache(), Logits::All)
        .unwrap();
    // Same bf16 weights, f32 arithmetic (what whale computes): tight.
    let f32_ref = floats(&exp.raw["logits_f32_compute"]);
    let err = max_abs_diff(&all, &f32_ref);
    eprintln!("{name}: vs transformers f32 compute on bf16 weights = {err:.3e}");
    assert!(err < 1e-4, "bf16 weights, f32 compute: {err}");
    // Against transformers' bf16 run, which rounds every activation to bf16:
    // 2e-2 of the row's largest logit magnitude.
    let vocab = folder.model.config().vocab_size;
    let mut worst = 0.0f32;
    for (row, want) in all.chunks(vocab).zip(&exp.logits) {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let e = row
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
            / scale;
        worst = worst.max(e);
    }
    eprintln!("{name}: vs transformers bf16 run, max error / max |logit| = {worst:.3e}");
    assert!(worst < 2e-2, "bf16 relative error {worst}");
    let g = greedy(&folder, &exp.tokens, 32);
    assert_eq!(
        g,
        common::ids(&exp.raw["greedy_f32_compute"]),
        "greedy on bf16 weights"
    );
}

#[test]
fn absorbed_and_expanded_mla_agree() {
    for name in ["v2-lite", "v2", "v3"] {
        let mut folder = ModelFolder::open(&model_dir(name)).unwrap();
        let exp = expected(name);
        let mut run = |mode, budget| {
            folder.model.set_mla_mode(mode);
            folder.model.set_expanded_budget(budget);
            let mut cache = folder.model.new_cache();
            // prefill half, then the rest token by token: both paths see a non-empty cache.
            let (a, b) = exp.tokens.split_at(exp.tokens.len() / 2);
            let mut out = folder.model.forward(a, &mut cache, Logits::All).unwrap();
            for t in b {
                out.extend(
                    folder
                        .model
                        .forward(&[*t], &mut cache, Logits::All)
                        .unwrap(),
                );
            }
            out
        };
        let x = run(MlaMode::Absorbed, 64 << 20);
        let y = run(MlaMode::Expanded, 64 << 20);
        // Decompressing a group of heads at a time (a 1-byte budget: one head per
        // worker thread) computes the same bits.
        let grouped = run(MlaMode::Expanded, 1);
        assert!(
            grouped
                .iter()
                .zip(&y)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: grouped expansion changed the logits"
        );
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
            / scale;
        eprintln!("{name}: absorbed vs expanded, max relative difference = {err:.3e}");
        assert!(
            err < 1e-5,
            "{name}: absorbed vs expanded differ by {err} relative"
        );
    }
}

#[test]
fn latent_cache_holds_only_latents() {
    let folder = ModelFolder::open(&model_dir("v2")).unwrap();
    let cfg = folder.model.config();
    let mut cache = folder.model.new_cache();
    folder
        .model
        .forward(&[1, 2, 3, 4, 5], &mut cache, Logits::Last)
        .unwrap();
    // f32 values unless the model is told otherwise.
    assert_eq!(cache.kv_type(), whale_model::KvType::F32);
    let per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4;
    assert_eq!(cache.bytes_per_token(), per_token);
    // Pages of 64 tokens: five tokens take one page.
    assert_eq!(cache.bytes_per_page(), whale_model::PAGE_TOKENS * per_token);
    assert_eq!(cache.pages(), 1);
    assert_eq!(cache.bytes_used(), cache.bytes_per_page());
    assert_eq!(cache.len(), 5);

    // DeepSeek-V2-Lite's shapes: 27 layers × 576 values.
    let lite = ModelConfig::from_json_str(
        r#"{"model_type":"deepseek_v2","vocab_size":102400,"hidden_size":2048,"intermediate_size":10944,
        "moe_intermediate_size":1408,"num_hidden_layers":27,"num_attention_heads":16,"q_lora_rank":null,
        "kv_lora_rank":512,"qk_nope_head_dim":128,"qk_rope_head_dim":64,"v_head_dim":128,
        "n_routed_experts":64,"n_shared_experts":2,"num_experts_per_tok":6,"first_k_dense_replace":1}"#,
    )
    .unwrap();
    let c32 = whale_model::LatentCache::new(&lite, whale_model::KvType::F32);
    assert_eq!(c32.bytes_per_token(), 27 * 576 * 4);
    let c = whale_model::LatentCache::new(&lite, whale_model::KvType::F16);
    assert_eq!(c.bytes_per_token(), 27 * 576 * 2);
    let expanded = 27 * 16 * (192 + 128) * 2;
    eprintln!(
        "V2-Lite: f16 latent cache {} B/token vs f16 expanded per-head K/V {} B/token",
        c.bytes_per_token(),
        expanded
    );
}

#[test]
fn cache_continuation_equals_one_shot() {
    let folder = ModelFolder::open(&model_dir("v3")).unwrap();
    let exp = expected("v3");
    let m = &folder.model;
    let mut cache = m.new_cache();
    m.forward(&exp.tokens[..5], &mut cache, Logits::Last)
        .unwrap();
    let tail = m
        .forward(&exp.tokens[5..], &mut cache, Logits::All)
        .unwrap();
    let err = max_abs_diff(&tail, &exp.logits[5..]);
    assert!(err < 1e-4, "chunked prefill differs by {err}");
    // truncate and redo gives the same rows
    cache.truncate(5);
    let again = m
        .forward(&exp.tokens[5..], &mut cache, Logits::All)
        .unwrap();
    assert_eq!(tail, again);
}

#[test]
fn out_of_range_token_is_an_error() {
    let folder = ModelFolder::open(&model_dir("v2-lite")).unwrap();
    let e = folder
        .model
        .forward(&[1, 99999], &mut folder.model.new_cache(), Logits::Last)
        .unwrap_err();
    assert!(
        e.to_string().contains("token id 99999 is out of range"),
        "{e}"
    );
}

#[test]
fn batched_step_equals_each_sequence_alone() {
    // Three sequences at different depths in one step: a prefill chunk, and two decode
    // tokens over caches of different lengths. Each item's logits must be the ones the
    // sequence gets alone (transformers' logits for the fixture's tokens).
    let folder = ModelFolder::open(&model_dir("v3")).unwrap();
    let exp = expected("v3");
    let m = &folder.model;
    let toks = &exp.tokens;
    let (mut a, mut b, mut c) = (m.new_cache(), m.new_cache(), m.new_cache());
    m.forward(&toks[..3], &mut b, Logits::Last).unwrap();
    m.forward(&toks[..6], &mut c, Logits::Last).unwrap();
    let out = m
        .forward_batch(&mut [
            BatchItem {
                tokens: &toks[..4],
                cache: &mut a,
                logits: Logits::All,
            },
            BatchItem {
                tokens: &toks[3..4],
                cache: &mut b,
                logits: Logits::Last,
            },
            BatchItem {
                tokens: &toks[6..7],
                cache: &mut c,
                logits: Logits::Last,
            },
        ])
        .unwrap();
    assert_eq!(out.len(), 3);
    let e0 = max_abs_diff(&out[0], &exp.logits[..4]);
    let e1 = max_abs_diff(&out[1], &exp.logits[3..4]);
    let e2 = max_abs_diff(&out[2], &exp.logits[6..7]);
    assert!(e0 < 1e-4 && e1 < 1e-4 && e2 < 1e-4, "{e0} {e1} {e2}");
    assert_eq!((a.len(), b.len(), c.len()), (4, 4, 7));
    // A prefix shares its pages; writing past it copies the shared page first, so the
    // copy continues exactly as the original and the original is untouched.
    let mut d = c.share_prefix(5);
    assert_eq!((d.len(), d.shared_pages(), c.shared_pages()), (5, 1, 1));
    let tail = m.forward(&toks[5..], &mut d, Logits::All).unwrap();
    assert!(max_abs_diff(&tail, &exp.logits[5..]) < 1e-4);
    assert_eq!(c.shared_pages(), 0);
    let next = m.forward(&toks[7..8], &mut c, Logits::Last).unwrap();
    assert!(max_abs_diff(&next, &exp.logits[7..8]) < 1e-4);
}

#[test]
fn decode_over_several_pages_matches_one_prefill() {
    // 150 tokens: a 140-token prefill (expanded form, gathered rows), then ten decode
    // steps whose absorbed attention reads three 64-token pages in parallel parts.
    let folder = ModelFolder::open(&model_dir("v3")).unwrap();
    let m = &folder.model;
    let vocab = m.config().vocab_size as u32;
    let toks: Vec<u32> = (0..150u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut whole = m.new_cache();
    let want = m.forward(&toks, &mut whole, Logits::All).unwrap();
    let v = vocab as usize;
    let mut cache = m.new_cache();
    m.forward(&toks[..140], &mut cache, Logits::Last).unwrap();
    assert_eq!(cache.pages(), 3);
    for i in 140..150 {
        let got = m.forward(&toks[i..=i], &mut cache, Logits::Last).unwrap();
        let row = &want[i * v..(i + 1) * v];
        let err = got
            .iter()
            .zip(row)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-4, "position {i}: {err}");
    }
    // A prefix of two pages is shared, not copied.
    let p = cache.share_prefix(128);
    assert_eq!((p.pages(), p.shared_pages()), (2, 2));
}
