//! The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as
//! the Hugging Face `tokenizers` pipeline it was converted from, so a GGUF runs with
//! nothing beside it.
//!
//! llama.cpp's `convert_hf_to_gguf.py` writes a byte-level BPE tokenizer as:
//! `tokens` (id → the byte-level token string; ids without a token are `[PAD{id}]`,
//! type UNUSED), `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte), `merges` (`"a b"`), the special ids, `add_bos_token`, and
//! `pre`, the name of the pre-tokenizer (a regex split sequence llama.cpp hard-codes
//! per name). Control tokens become special added tokens, user-defined ones plain
//! added tokens, exactly as they were in `tokenizer.json`.

use crate::error::ModelError;
use crate::gguf::{GgufFile, GgufValue};
use crate::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A `Split` pre-tokenizer step that keeps the matches as their own pieces.
fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The byte-level step that ends every DeepSeek pre-tokenizer.
fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The letter class of DeepSeek-LLM's (V2's) tokenizer: ASCII letters plus the
/// cased letters of many scripts, as in its `tokenizer.json`.
const DEEPSEEK_LLM_LETTERS: &str = "A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}";

/// CJK ideographs, and the ranges DeepSeek-LLM and Coder keep together.
const CJK: &str = "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+";

/// The pre-tokenizer named by `tokenizer.ggml.pre`, as the model's `tokenizer.json` has it.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let steps = match pre {
        // DeepSeek-LLM, DeepSeek-V2, V2-Lite, V2.5.
        "deepseek-llm" => vec![
            split("[\r\n]"),
            split(&format!("\\s?[{DEEPSEEK_LLM_LETTERS}]+")),
            split("\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+"),
            split("\\s+$"),
            split(CJK),
            json!({"type": "Digits", "individual_digits": true}),
            byte_level(false),
        ],
        // DeepSeek-Coder and Coder-V2.
        "deepseek-coder" => vec![
            split("[\r\n]"),
            split("\\s?\\p{L}+"),
            split("\\s?\\p{P}+"),
            split(CJK),
            json!({"type": "Digits", "individual_digits": true}),
            byte_level(false),
        ],
        // DeepSeek-V3 and R1.
        "deepseek-v3" => vec![
            split("\\p{N}{1,3}"),
            split("[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+"),
            split(
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
            ),
            byte_level(false),
        ],
        // GPT-2's own split.
        "gpt-2" => vec![byte_level(true)],
        _ => return None,
    };
    Some(json!({"type": "Sequence", "pretokenizers": steps}))
}

fn meta<'a>(f: &'a GgufFile, key: &str) -> Result<&'a GgufValue, ModelError> {
    f.get(key)
        .ok_or_else(|| ModelError::format(f.path(), format!("missing metadata key {key}")))
}

fn strings<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, ModelError> {
    meta(f, key)?
        .as_array()
        .and_then(|a| a.iter().map(GgufValue::as_str).collect::<Option<Vec<_>>>())
        .ok_or_else(|| ModelError::format(f.path(), format!("{key} is not an array of strings")))
}

/// Whether the file carries a tokenizer.
pub(crate) fn has_tokenizer(f: &GgufFile) -> bool {
    f.get("tokenizer.ggml.tokens").is_some()
}

impl Tokenizer {
    /// Rebuilds the tokenizer (and chat template) stored in a GGUF file's metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::format(f.path(), msg);
        let model = meta(f, "tokenizer.ggml.model")?.as_str().unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model is {model:?}; whale reads byte-level BPE (\"gpt2\") tokenizers, \
                 which all DeepSeek models use"
            )));
        }
        let pre_name = f
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let pre = pre_tokenizer(pre_name).ok_or_else(|| {
            err(format!(
                "tokenizer.ggml.pre is {pre_name:?}; whale knows deepseek-llm, deepseek-coder, deepseek-v3 and gpt-2"
            ))
        })?;
        let tokens = strings(f, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match f.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| match *x {
                            GgufValue::I64(i) => Some(i),
                            GgufValue::U64(u) => i64::try_from(u).ok(),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()
                })
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| {
                    err(format!(
                        "tokenizer.ggml.token_type must be {} integers",
                        tokens.len()
                    ))
                })?,
            None => vec![1; tokens.len()],
        };
        let merges = match f.get("tokenizer.ggml.merges") {
            Some(_) => strings(f, "tokenizer.ggml.merges")?,
            None => vec![],
        };

        let mut vocab = Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            if !vocab.contains_key(tok) {
                vocab.insert(tok.to_string(), json!(id));
            }
            if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                let special = ty == TOKEN_CONTROL;
                added.push(
                    json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": !special, "special": special}),
                );
            }
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').ok_or_else(|| {
                    err(format!("tokenizer.ggml.merges entry {m:?} is not \"a b\""))
                })?;
                Ok(json!([a, b]))
            })
            .collect::<Result<_, ModelError>>()?;
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec).map_err(|e| {
            err(format!(
                "tokenizer metadata does not form a BPE tokenizer: {e}"
            ))
        })?;

        let token_of = |key: &str| -> Result<Option<String>, ModelError> {
            match f.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = v
                        .as_u64()
                        .ok_or_else(|| err(format!("{key} is not an id")))?;
                    tokens
                        .get(id as usize)
                        .map(|t| Some(t.to_string()))
                        .ok_or_else(|| {
                            err(format!(
                                "{key} = {id} is outside the {} tokens",
                                tokens.len()
                            ))
                        })
                }
            }
        };
        let mut cfg = Map::new();
        if let Some(b) = token_of("tokenizer.ggml.bos_token_id")? {
            cfg.insert("bos_token".into(), json!(b));
        }
        if let Some(e) = token_of("tokenizer.ggml.eos_token_id")? {
            cfg.insert("eos_token".into(), json!(e));
        }
        if let Some(a) = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
        {
            cfg.insert("add_bos_token".into(), json!(a));
        }
        let template = f
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(String::from);
        Tokenizer::build(inner, &Value::Object(cfg), template)
    }
}
