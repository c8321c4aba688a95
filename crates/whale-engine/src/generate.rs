//! Single-sequence generation over the latent cache: prefill once, then decode
//! one token per step (absorbed MLA), sampling, stopping and detokenizing.

use crate::detok::Detokenizer;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopStrings;
use whale_model::{DeepseekModel, LatentCache, Logits, ModelError, Tokenizer};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A request field is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids (BOS included if wanted).
    pub prompt: Vec<u32>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Token ids that end generation (the model's EOS ids unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the text stops before them.
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The engine ran out of cache or was shut down before the request could finish.
    InsufficientResource,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::InsufficientResource => "insufficient_system_resource",
        }
    }
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids (a final stop token included).
    pub tokens: Vec<u32>,
    /// Generated text (special tokens and stop strings excluded), when a tokenizer was given.
    pub text: Option<String>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// A generation's visible text: tokens through the incremental detokenizer, then
/// the stop-string filter that holds back text which could still become a stop string.
pub(crate) struct TextOut<'t> {
    detok: Detokenizer<'t>,
    stops: StopStrings,
}

impl<'t> TextOut<'t> {
    pub(crate) fn new(tok: &'t Tokenizer, skip_special: bool, stop: &[String]) -> Self {
        TextOut {
            detok: Detokenizer::new(tok, skip_special),
            stops: StopStrings::new(stop),
        }
    }

    /// The text `id` makes safe to show (possibly empty).
    pub(crate) fn push(&mut self, id: u32) -> Result<String, ModelError> {
        let piece = self.detok.push(id)?;
        Ok(self.stops.push(&piece))
    }

    /// Whether a stop string has been seen (nothing after it is shown).
    pub(crate) fn stopped(&self) -> bool {
        self.stops.stopped()
    }

    /// At the end: the text still held back by the detokenizer and the stop filter.
    pub(crate) fn finish(&mut self) -> Result<String, ModelError> {
        let mut text = String::new();
        if !self.stops.stopped() {
            let rest = self.detok.flush()?;
            text.push_str(&self.stops.push(&rest));
            if !self.stops.stopped() {
                text.push_str(&self.stops.flush());
            }
        }
        Ok(text)
    }
}

/// Generates for `req`, calling `on_text` with each new piece of text as soon as it is final.
pub fn generate(
    model: &DeepseekModel,
    tokenizer: Option<&Tokenizer>,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, EngineError> {
    let mut cache = model.new_cache();
    generate_with_cache(model, tokenizer, req, &mut cache, &mut on_text)
}

/// As [`generate`], continuing from (and extending) an existing cache whose tokens
/// precede `req.prompt`.
pub fn generate_with_cache(
    model: &DeepseekModel,
    tokenizer: Option<&Tokenizer>,
    req: &GenerateRequest,
    cache: &mut LatentCache,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, EngineError> {
    req.sampling.validate().map_err(EngineError::Invalid)?;
    if req.prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.stop_token_ids.is_empty() && req.stop.is_empty() && req.max_tokens == usize::MAX {
        return Err(EngineError::Invalid(
            "nothing would end generation: give max_tokens".into(),
        ));
    }
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut out = tokenizer.map(|t| TextOut::new(t, true, &req.stop));
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut emit = |piece: &str, text: &mut String| {
        if !piece.is_empty() {
            text.push_str(piece);
            on_text(piece);
        }
    };
    if req.max_tokens == 0 {
        return Ok(Generation {
            tokens,
            text: tokenizer.map(|_| text),
            finish_reason: FinishReason::Length,
        });
    }
    let mut logits = model.forward(&req.prompt, cache, Logits::Last)?;
    let finish = loop {
        let next = sampler.sample(&mut logits, &req.prompt, &tokens);
        tokens.push(next);
        if req.stop_token_ids.contains(&next) {
            break FinishReason::Stop;
        }
        if let Some(o) = out.as_mut() {
            let safe = o.push(next)?;
            emit(&safe, &mut text);
            if o.stopped() {
                break FinishReason::Stop;
            }
        }
        if tokens.len() >= req.max_tokens {
            break FinishReason::Length;
        }
        logits = model.forward(&[next], cache, Logits::Last)?;
    };
    let mut finish_reason = finish;
    if let Some(o) = out.as_mut() {
        let rest = o.finish()?;
        emit(&rest, &mut text);
        if o.stopped() {
            finish_reason = FinishReason::Stop;
        }
    }
    Ok(Generation {
        tokens,
        text: tokenizer.map(|_| text),
        finish_reason,
    })
}
