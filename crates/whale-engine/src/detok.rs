//! Incremental detokenization: text deltas as tokens arrive, never half a UTF-8 character.

use whale_model::{ModelError, Tokenizer};

/// Turns a growing token list into text deltas.
///
/// It decodes a short window of recent tokens (so byte-level BPE pieces and
/// leading-space rules come out as in a full decode) and holds text back while
/// the window ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
pub struct Detokenizer<'a> {
    tok: &'a Tokenizer,
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special: bool,
}

impl<'a> Detokenizer<'a> {
    /// A detokenizer; `skip_special` drops special tokens (BOS/EOS...) from the text.
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> Self {
        Detokenizer {
            tok,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special,
        }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, ModelError> {
        self.tokens.push(id);
        let (delta, complete) = self.pending()?;
        if complete && !delta.is_empty() {
            self.prefix = self.read;
            self.read = self.tokens.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// Text still held back (an incomplete character at the end of generation), decoded as is.
    pub fn flush(&mut self) -> Result<String, ModelError> {
        let (delta, _) = self.pending()?;
        self.prefix = self.tokens.len();
        self.read = self.tokens.len();
        Ok(delta)
    }

    /// Text the tokens after `read` add to the window, and whether it ends on a whole character.
    fn pending(&self) -> Result<(String, bool), ModelError> {
        let window = &self.tokens[self.prefix..];
        let before = self
            .tok
            .decode(&window[..self.read - self.prefix], self.skip_special)?;
        let now = self.tok.decode(window, self.skip_special)?;
        let delta = now
            .get(before.len()..)
            .filter(|_| now.starts_with(&before))
            .unwrap_or("");
        Ok((delta.to_string(), !now.ends_with('\u{FFFD}')))
    }
}
