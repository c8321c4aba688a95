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
    let mut detok = tokenizer.map(|t| Detokenizer::new(t, true));
    let mut stops = StopStrings::new(&req.stop);
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
        if let Some(d) = detok.as_mut() {
            let piece = d.push(next)?;
            let safe = stops.push(&piece);
            emit(&safe, &mut text);
            if stops.stopped() {
                break FinishReason::Stop;
            }
        }
        if tokens.len() >= req.max_tokens {
            break FinishReason::Length;
        }
        logits = model.forward(&[next], cache, Logits::Last)?;
    };
    if let Some(d) = detok.as_mut() {
        if !stops.stopped() {
            let rest = d.flush()?;
            let safe = stops.push(&rest);
            emit(&safe, &mut text);
            if !stops.stopped() {
                let held = stops.flush();
                emit(&held, &mut text);
            }
        }
    }
    let finish_reason = if stops.stopped() {
        FinishReason::Stop
    } else {
        finish
    };
    Ok(Generation {
        tokens,
        text: tokenizer.map(|_| text),
        finish_reason,
    })
}
