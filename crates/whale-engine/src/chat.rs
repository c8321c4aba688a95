//! Chat prompts: messages through the model's chat template into token ids.

use crate::generate::EngineError;
use whale_model::{Message, Tokenizer};

/// Renders `messages` with the tokenizer's chat template (generation prompt added)
/// and tokenizes the result without adding special tokens: the template already
/// holds BOS, as transformers' `apply_chat_template(tokenize=True)` assumes.
pub fn chat_prompt(tokenizer: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
    let template = tokenizer.chat_template().ok_or_else(|| {
        EngineError::Invalid("the model's tokenizer config has no chat_template".into())
    })?;
    let text = template.render(messages, true)?;
    Ok(tokenizer.encode(&text, false)?)
}
