//! The bundled default model (models/whale-tiny-chat, trained by
//! tools/train_default_model.py) answering held-out problems through whale's own
//! chat path, and agreeing with transformers on per-token log-likelihoods.

use serde_json::Value;
use std::path::PathBuf;
use whale_engine::{chat_prompt, generate, GenerateRequest, SamplingParams};
use whale_model::{Logits, Message, ModelFolder};

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/whale-tiny-chat")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(bundled().join(name)).unwrap()).unwrap()
}

/// The right answer, computed here from the problem's operands (not read from the file).
fn answer(p: &Value) -> String {
    let i = |k: &str| p[k].as_i64().unwrap();
    let s = |k: &str| p[k].as_str().unwrap().to_string();
    match p["task"].as_str().unwrap() {
        "add" => format!("{} + {} = {}", i("a"), i("b"), i("a") + i("b")),
        "sub" => format!("{} - {} = {}", i("a"), i("b"), i("a") - i("b")),
        "mul" => format!("{} * {} = {}", i("a"), i("b"), i("a") * i("b")),
        "count" => {
            let l = s("letter").chars().next().unwrap();
            s("word").chars().filter(|&c| c == l).count().to_string()
        }
        "reverse" => s("word").chars().rev().collect(),
        "sort" => {
            let mut xs: Vec<i64> = p["numbers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            xs.sort();
            xs.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
        "compare" => i("a").max(i("b")).to_string(),
        t => panic!("unknown task {t}"),
    }
}

#[test]
fn answers_held_out_problems() {
    let folder = ModelFolder::open(&bundled()).unwrap();
    let tok = folder.tokenizer.as_ref().unwrap();
    let problems = json("eval_problems.json");
    let mut by_task: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for p in problems["problems"].as_array().unwrap() {
        let prompt = chat_prompt(
            tok,
            &[Message::new("user", p["question"].as_str().unwrap())],
        )
        .unwrap();
        let req = GenerateRequest {
            prompt,
            max_tokens: 32,
            sampling: SamplingParams::greedy(),
            stop_token_ids: folder.eos_token_ids(),
            stop: vec![],
        };
        let g = generate(&folder.model, Some(tok), &req, |_| {}).unwrap();
        let want = answer(p);
        assert_eq!(
            want,
            p["answer"].as_str().unwrap(),
            "the problem file's answer"
        );
        let e = by_task
            .entry(p["task"].as_str().unwrap().to_string())
            .or_default();
        e.0 += (g.text.unwrap().trim() == want) as usize;
        e.1 += 1;
    }
    eprintln!("| task | correct | accuracy |\n|---|---|---|");
    for (t, (ok, n)) in &by_task {
        eprintln!(
            "| {t} | {ok}/{n} | {:.1}% |",
            100.0 * *ok as f64 / *n as f64
        );
    }
    for t in ["add", "sub"] {
        let (ok, n) = by_task[t];
        assert!(ok as f64 >= 0.95 * n as f64, "{t}: {ok}/{n} below 95%");
    }
}

#[test]
fn log_likelihood_matches_transformers() {
    let folder = ModelFolder::open(&bundled()).unwrap();
    let r = json("reference_logprobs.json");
    let ids: Vec<u32> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    // The chat template through whale gives the same tokens transformers scored.
    let messages: Vec<Message> = serde_json::from_value(r["messages"].clone()).unwrap();
    let tok = folder.tokenizer.as_ref().unwrap();
    let text = tok
        .chat_template()
        .unwrap()
        .render(&messages, false)
        .unwrap();
    assert_eq!(text, r["text"].as_str().unwrap());
    assert_eq!(tok.encode(&text, false).unwrap(), ids);
    let m = &folder.model;
    let logits = m.forward(&ids, &mut m.new_cache(), Logits::All).unwrap();
    let v = m.config().vocab_size;
    let want: Vec<f64> = r["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mut worst = 0.0f64;
    for (i, w) in want.iter().enumerate() {
        let row = &logits[i * v..(i + 1) * v];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        let lp = row[ids[i + 1] as usize] as f64 - lse;
        worst = worst.max((lp - w).abs());
    }
    eprintln!(
        "max |log p(whale) - log p(transformers)| over {} tokens = {worst:.2e}",
        want.len()
    );
    assert!(worst < 1e-3, "log-likelihood differs by {worst}");
}
