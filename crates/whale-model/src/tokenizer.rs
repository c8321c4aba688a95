//! `tokenizer.json` through the `tokenizers` crate, plus the parts of
//! `tokenizer_config.json` that matter at run time (BOS/EOS, `add_bos_token`,
//! `chat_template`).

use crate::chat::ChatTemplate;
use crate::error::ModelError;
use serde_json::Value;
use std::path::Path;

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    add_bos_token: bool,
    chat_template: Option<ChatTemplate>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// `dir/tokenizer_config.json` as JSON (`Null` when the folder has none).
pub(crate) fn read_tokenizer_config(dir: &Path) -> Result<Value, ModelError> {
    let tc = dir.join("tokenizer_config.json");
    if !tc.is_file() {
        return Ok(Value::Null);
    }
    crate::error::read_json(&tc)
}

/// The chat template of a folder: `chat_template` in `tokenizer_config.json` (a string,
/// or the entry named "default" of a list), else `chat_template.jinja`.
pub(crate) fn chat_template_of(dir: &Path, cfg: &Value) -> Result<Option<String>, ModelError> {
    let template = match cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(String::from),
        _ => None,
    };
    if template.is_some() {
        return Ok(template);
    }
    let jinja = dir.join("chat_template.jinja");
    jinja
        .is_file()
        .then(|| std::fs::read_to_string(&jinja))
        .transpose()
        .map_err(|e| ModelError::io(&jinja, e))
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let tj = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let cfg = read_tokenizer_config(dir)?;
        let template = chat_template_of(dir, &cfg)?;
        Self::build(inner, &cfg, template)
    }

    /// Builds from an in-memory tokenizer and a `tokenizer_config.json` value.
    pub fn build(
        inner: tokenizers::Tokenizer,
        cfg: &Value,
        template: Option<String>,
    ) -> Result<Self, ModelError> {
        let special = |key: &str| -> Option<(String, u32)> {
            let text = token_text(cfg.get(key))?;
            let id = inner.token_to_id(&text)?;
            Some((text, id))
        };
        let bos = special("bos_token");
        let eos = special("eos_token");
        let add_bos_token = cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(bos.is_some());
        let chat_template = template
            .map(|t| {
                ChatTemplate::new(
                    &t,
                    bos.as_ref().map(|b| b.0.clone()).unwrap_or_default(),
                    eos.as_ref().map(|e| e.0.clone()).unwrap_or_default(),
                )
            })
            .transpose()?;
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos_token,
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special` applies the tokenizer's post-processor
    /// (as Python `tokenizers` does with `add_special_tokens=True`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of a prompt: the text without special tokens, then BOS prepended when
    /// `add_bos_token` says so (once, even if the text already starts with it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.encode(text, false)?;
        if let (true, Some((_, bos))) = (self.add_bos_token, &self.bos) {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Raw bytes of one token id as the byte-level BPE decodes it, where possible.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying Hugging Face tokenizer (for libraries that take one, e.g. the
    /// grammar engine's token trie).
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The id of a token given by its text (an added/special token or a vocabulary entry).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// BOS id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }

    /// EOS id from `tokenizer_config.json`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.1)
    }

    /// The chat template, when the folder has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
