//! The engine on the fixture models and the real DeepSeek-V2 tokenizer.

use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use whale_engine::{generate, Detokenizer, FinishReason, GenerateRequest, SamplingParams};
use whale_model::{ModelFolder, Tokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn deepseek_tokenizer() -> Tokenizer {
    let gz = std::fs::read(fixtures().join("deepseek_v2_tokenizer.json.gz")).unwrap();
    let mut json = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut json)
        .unwrap();
    Tokenizer::build(
        tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap(),
        &Value::Null,
        None,
    )
    .unwrap()
}

#[test]
fn detokenizer_never_emits_half_a_character() {
    let tok = deepseek_tokenizer();
    for text in [
        "深度求索发布了模型 🐋🐳 café naïve",
        "emoji 🐋 then text",
        "混合 mixed 12345 文本\n\tend",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let mut d = Detokenizer::new(&tok, true);
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "{text:?}: emitted a replacement char"
            );
            out += &piece;
        }
        out += &d.flush().unwrap();
        assert_eq!(out, text);
    }
}

fn folder() -> ModelFolder {
    ModelFolder::open(&fixtures().join("models/v2-lite")).unwrap()
}

fn expected_greedy() -> (Vec<u32>, Vec<u32>) {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/v2-lite/expected.json")).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    (ids("tokens"), ids("greedy"))
}

#[test]
fn greedy_generation_matches_transformers() {
    let f = folder();
    let (prompt, want) = expected_greedy();
    let req = GenerateRequest {
        prompt,
        max_tokens: 32,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        stop: vec![],
    };
    let mut streamed = String::new();
    let g = generate(&f.model, f.tokenizer.as_ref(), &req, |t| {
        streamed.push_str(t)
    })
    .unwrap();
    assert_eq!(g.tokens, want);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.text.as_deref(), Some(streamed.as_str()));
    let full = f.tokenizer.as_ref().unwrap().decode(&want, true).unwrap();
    assert_eq!(streamed, full);
}

#[test]
fn stop_tokens_stop_strings_and_seeds() {
    let f = folder();
    let (prompt, want) = expected_greedy();
    // Stop at a token id.
    let req = GenerateRequest {
        prompt: prompt.clone(),
        max_tokens: 32,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![want[3]],
        stop: vec![],
    };
    let g = generate(&f.model, None, &req, |_| {}).unwrap();
    let first = want.iter().position(|&t| t == want[3]).unwrap();
    assert_eq!(g.tokens, want[..=first]);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert!(g.text.is_none());
    // Stop at a string taken from the middle of the greedy text.
    let tok = f.tokenizer.as_ref().unwrap();
    let full = tok.decode(&want, true).unwrap();
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut..].chars().take(2).collect();
    let req = GenerateRequest {
        stop: vec![stop.clone()],
        stop_token_ids: vec![],
        ..req
    };
    let g = generate(&f.model, Some(tok), &req, |_| {}).unwrap();
    assert_eq!(g.text.as_deref(), Some(&full[..full.find(&stop).unwrap()]));
    assert_eq!(g.finish_reason, FinishReason::Stop);
    // Seeded sampling repeats; another seed differs.
    let sample = |seed| {
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: 24,
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            },
            stop_token_ids: vec![],
            stop: vec![],
        };
        generate(&f.model, None, &req, |_| {}).unwrap().tokens
    };
    assert_eq!(sample(5), sample(5));
    assert_ne!(sample(5), sample(6));
}

#[test]
fn bad_requests_are_errors() {
    let f = folder();
    let req = GenerateRequest {
        prompt: vec![],
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        stop: vec![],
    };
    assert!(generate(&f.model, None, &req, |_| {})
        .unwrap_err()
        .to_string()
        .contains("prompt is empty"));
    let req = GenerateRequest {
        prompt: vec![1],
        sampling: SamplingParams {
            top_p: 2.0,
            ..Default::default()
        },
        ..req
    };
    assert!(generate(&f.model, None, &req, |_| {})
        .unwrap_err()
        .to_string()
        .contains("top_p"));
}
