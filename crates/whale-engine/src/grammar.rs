//! Constrained decoding with `llguidance`: JSON mode and JSON-schema output.
//!
//! A [`Grammars`] holds the token trie of the tokenizer (built once, it maps every
//! token to its bytes); each constrained request gets a [`Constraint`], a matcher
//! whose mask of allowed next tokens is applied to the logits before sampling and
//! which consumes every sampled token. When the grammar is complete only the end
//! of sequence is allowed, so the output is always a complete document unless
//! `max_tokens` cuts it.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;
use whale_model::Tokenizer;

/// The grammar factory of one tokenizer.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl Grammars {
    /// Builds the token trie of `tok`; `eos` are the ids that end a sequence, `n_vocab`
    /// the model's vocabulary (rows of its logits, at least the tokenizer's).
    pub fn new(tok: &Tokenizer, eos: &[u32], n_vocab: usize) -> Result<Self, String> {
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_tokenizer(tok.hf().clone())
            .map_err(|e| format!("grammar engine: {e}"))?;
        if !eos.is_empty() {
            bt.set_eos_tokens(eos);
        }
        let n = n_vocab.max(tok.vocab_size());
        let env = bt
            .into_tok_env(Some(n))
            .map_err(|e| format!("grammar engine: {e}"))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars {
            factory: Arc::new(factory),
        })
    }

    /// A matcher for documents that follow `schema` (JSON Schema). Whitespace is
    /// not free (`, ` and `: ` separators), so a model cannot loop on blanks.
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint, String> {
        let mut schema = schema.clone();
        let Some(obj) = schema.as_object_mut() else {
            return Err("the JSON schema must be an object".into());
        };
        obj.entry("x-guidance").or_insert(json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
            "coerce_one_of": true,
        }));
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema));
        let m = Matcher::new(parser);
        if let Some(e) = m.get_error() {
            return Err(format!("invalid JSON schema: {e}"));
        }
        Ok(Constraint(m))
    }

    /// A matcher for any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object(&self) -> Result<Constraint, String> {
        self.json_schema(&json!({"type": "object"}))
    }
}

/// One request's grammar state.
pub struct Constraint(Matcher);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint(self.0.deep_clone())
    }
}

impl Constraint {
    /// Sets disallowed tokens' logits to −∞. Returns false if the grammar is in an
    /// error state (nothing can be allowed).
    pub fn mask(&mut self, logits: &mut [f32]) -> bool {
        match self.0.compute_mask_or_eos() {
            Ok(mask) => {
                let mut any = false;
                for (i, l) in logits.iter_mut().enumerate() {
                    if mask.is_allowed(i as u32) {
                        any = true;
                    } else {
                        *l = f32::NEG_INFINITY;
                    }
                }
                any
            }
            Err(_) => false,
        }
    }

    /// Advances over a sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.0.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the document is complete (only the end of sequence may follow).
    pub fn is_done(&self) -> bool {
        self.0.is_stopped()
    }
}
