//! Tokenizer ids and chat-template renderings against Python `tokenizers` and
//! transformers' `apply_chat_template` (tools/make_fixtures.py).

mod common;
use common::*;
use serde_json::Value;
use std::io::Read;
use whale_model::{ChatTemplate, Message, Tokenizer};

fn deepseek_v2_tokenizer() -> Tokenizer {
    let gz = std::fs::read(fixtures().join("deepseek_v2_tokenizer.json.gz")).unwrap();
    let mut json = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut json)
        .unwrap();
    let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
    let cfg = serde_json::json!({
        "add_bos_token": true,
        "bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>"},
        "eos_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>"},
    });
    Tokenizer::build(inner, &cfg, None).unwrap()
}

#[test]
fn real_deepseek_v2_tokenizer_matches_python() {
    let tok = deepseek_v2_tokenizer();
    assert_eq!(tok.bos_id(), Some(100000));
    assert_eq!(tok.eos_id(), Some(100001));
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_ids.json")).unwrap(),
    )
    .unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids_special"]),
            "ids (special) of {text:?}"
        );
        // Round trip for texts without special tokens.
        if !text.contains('｜') {
            assert_eq!(
                tok.decode(&ids(&c["ids"]), false).unwrap(),
                text,
                "decode of {text:?}"
            );
        }
    }
    let p = tok.encode_prompt("Hello").unwrap();
    assert_eq!(p[0], 100000);
    assert_eq!(p[1..], tok.encode("Hello", false).unwrap()[..]);
}

#[test]
fn chat_templates_render_like_transformers() {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap(),
    )
    .unwrap();
    let convs: Vec<Vec<Message>> = serde_json::from_value(v["conversations"].clone()).unwrap();
    let bos = v["bos_token"].as_str().unwrap().to_string();
    let eos = v["eos_token"].as_str().unwrap().to_string();
    let cases = v["cases"].as_array().unwrap();
    assert!(
        cases.iter().any(|c| c["template"] == "deepseek-v2")
            && cases.iter().any(|c| c["template"] == "deepseek-v3")
    );
    for c in cases {
        let name = c["template"].as_str().unwrap();
        let t = ChatTemplate::new(
            v["templates"][name].as_str().unwrap(),
            bos.clone(),
            eos.clone(),
        )
        .unwrap();
        let conv = &convs[c["conversation"].as_u64().unwrap() as usize];
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(conv, agp).unwrap();
        assert_eq!(
            got,
            c["text"].as_str().unwrap(),
            "{name}, conversation {}, agp {agp}",
            c["conversation"]
        );
    }
}

#[test]
fn folder_tokenizer_reads_config_and_template() {
    let tok = Tokenizer::from_dir(&model_dir("v2-lite")).unwrap();
    let t = tok.chat_template().expect("template");
    let text = t
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi\n\nAssistant:"
    );
    // The template holds BOS: tokenizing without special tokens gives exactly one.
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| Some(i) == tok.bos_id()).count(), 1);
    assert_eq!(ids[0], tok.bos_id().unwrap());
}
