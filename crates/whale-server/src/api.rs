//! Request bodies as DeepSeek and OpenAI clients send them, and their checks.
//!
//! Every field is optional at the serde level and explicit `null`s mean "default";
//! unknown fields are ignored (the OpenAI SDK sends many). Type errors are 400s
//! (the body does not fit), range errors are 422s naming the parameter.

use crate::error::ApiError;
use serde::Deserialize;
use serde_json::Value;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    fn list(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Message content: a string, or OpenAI's list of text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}, ...]`.
    Parts(Vec<Value>),
}

/// A message role.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool's answer.
    Tool,
    /// OpenAI's newer name for system.
    Developer,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    /// Who speaks.
    pub role: Role,
    /// What they say (absent for assistant tool calls).
    #[serde(default)]
    pub content: Option<Content>,
    /// Optional speaker name.
    #[serde(default)]
    pub name: Option<String>,
    /// Assistant tool calls (OpenAI shape).
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// The call a tool message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// DeepSeek's chat prefix completion (last assistant message).
    #[serde(default)]
    pub prefix: Option<bool>,
    /// Reasoning text of thinking models (kept for the template).
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final usage chunk.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The schema of `json_schema`.
    #[serde(default)]
    pub json_schema: Option<Value>,
}

/// `POST /chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<InMessage>,
    /// Served model name.
    pub model: String,
    /// Sampling, stopping and streaming fields shared with completions.
    #[serde(flatten)]
    pub common: CommonFields,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// vLLM's name for DeepSeek's `prefix: true`.
    #[serde(default)]
    pub continue_final_message: Option<bool>,
}

/// `prompt` of the legacy completions endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// Several texts (only one is taken).
    Texts(Vec<String>),
    /// Several id lists (only one is taken).
    IdLists(Vec<Vec<u32>>),
}

/// The request fields both endpoints take, as sent (checked by [`ChatRequest::common`]
/// and [`CompletionRequest::common`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<i64>,
    /// vLLM's extras.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// `POST /completions` (FIM with `suffix`).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Served model name.
    pub model: String,
    /// The text before the hole (or the whole prompt).
    pub prompt: Prompt,
    /// Sampling, stopping and streaming fields shared with chat.
    #[serde(flatten)]
    pub common: CommonFields,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
}

/// Parses a JSON body: syntax and shape errors are 400s with serde's message.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "Failed to parse the request body as JSON"
        } else {
            "Failed to deserialize the JSON body into the target type"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// Sampling and length settings shared by both endpoints, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// Requested completion length (None: until the context is full, at most the default).
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: whale_engine::SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices to generate.
    pub n: usize,
    /// Stream the answer.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Top log-probabilities per token (None: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Do not stop at EOS.
    pub ignore_eos: bool,
    /// What the output must be.
    pub format: Format,
}

/// `response_format`, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Free text.
    Text,
    /// Any JSON object.
    JsonObject,
    /// A document following this JSON Schema.
    JsonSchema(Value),
}

/// Most stop strings, as DeepSeek.
pub const MAX_STOP: usize = 16;
/// Most top log-probabilities, as DeepSeek and OpenAI.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per request.
pub const MAX_N: usize = 16;
/// Largest `max_tokens` (DeepSeek's beta limit).
pub const MAX_MAX_TOKENS: i64 = 8192;

fn common(
    f: &CommonFields,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
) -> Result<Common, ApiError> {
    let range = |name: &str, v: Option<f32>, lo: f32, hi: f32, def: f32| match v {
        None => Ok(def),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x),
        Some(x) => Err(ApiError::param(
            name,
            format!("{name} must be between {lo} and {hi}, got {x}"),
        )),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if (1..=MAX_MAX_TOKENS).contains(&m) => Some(m as usize),
        Some(m) => {
            return Err(ApiError::param(
                "max_tokens",
                format!("max_tokens must be between 1 and {MAX_MAX_TOKENS}, got {m}"),
            ))
        }
    };
    let stop = f.stop.clone().map(Stop::list).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    let n = match f.n {
        None => 1,
        Some(k) if (1..=MAX_N as i64).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::param(
                "n",
                format!("n must be between 1 and {MAX_N}, got {k}"),
            ))
        }
    };
    let top_k = match f.top_k {
        None => 0,
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
    };
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::param(
            "stream_options",
            "stream_options can only be set when stream is true",
        ));
    }
    let temperature = range("temperature", f.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", f.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::param("top_p", "top_p must be greater than 0"));
    }
    let sampling = whale_engine::SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p: range("min_p", f.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty: range("repetition_penalty", f.repetition_penalty, 0.01, 10.0, 1.0)?,
        frequency_penalty: range("frequency_penalty", f.frequency_penalty, -2.0, 2.0, 0.0)?,
        presence_penalty: range("presence_penalty", f.presence_penalty, -2.0, 2.0, 0.0)?,
        seed: f.seed.map(|s| s as u64),
    };
    Ok(Common {
        max_tokens,
        sampling,
        stop,
        n,
        stream,
        include_usage: f
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        format: Format::Text,
    })
}

impl ChatRequest {
    /// The checked common settings.
    pub fn common(&self) -> Result<Common, ApiError> {
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                return Err(ApiError::param(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::param(
                    "top_logprobs",
                    "when using top_logprobs, logprobs must be set to true",
                ))
            }
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, _) => None,
        };
        if self.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        let format = match &self.response_format {
            None => Format::Text,
            Some(f) => match f.kind.as_str() {
                "text" => Format::Text,
                "json_object" => Format::JsonObject,
                "json_schema" => {
                    let js = f.json_schema.as_ref().ok_or_else(|| {
                        ApiError::param("response_format", "json_schema needs a json_schema object")
                    })?;
                    if let Some(name) = js.get("name").and_then(Value::as_str) {
                        let ok = !name.is_empty()
                            && name.len() <= 64
                            && name
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                        if !ok {
                            return Err(ApiError::param(
                                "response_format",
                                "json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                            ));
                        }
                    }
                    match js.get("schema") {
                        Some(schema @ Value::Object(_)) => Format::JsonSchema(schema.clone()),
                        None => Format::JsonSchema(serde_json::json!({})),
                        Some(_) => {
                            return Err(ApiError::param(
                                "response_format",
                                "json_schema.schema must be a JSON Schema object",
                            ))
                        }
                    }
                }
                other => {
                    return Err(ApiError::param(
                        "response_format",
                        format!("response_format type must be text, json_object or json_schema, got {other}"),
                    ))
                }
            },
        };
        let mut c = common(
            &self.common,
            self.max_tokens.or(self.max_completion_tokens),
            logprobs,
        )?;
        c.format = format;
        Ok(c)
    }
}

impl CompletionRequest {
    /// The checked common settings.
    pub fn common(&self) -> Result<Common, ApiError> {
        let logprobs = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::param(
                    "logprobs",
                    format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
        };
        common(&self.common, Some(self.max_tokens.unwrap_or(16)), logprobs)
    }
}

/// Text of message content.
pub fn content_text(c: &Option<Content>, index: usize) -> Result<Option<String>, ApiError> {
    match c {
        None => Ok(None),
        Some(Content::Text(s)) => Ok(Some(s.clone())),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::param(
                            &format!("messages[{index}].content"),
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            Ok(Some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_nulls_and_unknown_fields_are_accepted() {
        let r: ChatRequest = parse(br#"{"model":"deepseek-chat","messages":[{"role":"user","content":"hi"}],
            "frequency_penalty":0,"max_tokens":2048,"presence_penalty":0,"response_format":{"type":"text"},
            "stop":null,"stream":false,"stream_options":null,"temperature":1,"top_p":1,"tools":null,
            "tool_choice":"none","logprobs":false,"top_logprobs":null,"user":"x","store":false}"#)
        .unwrap();
        let c = r.common().unwrap();
        assert_eq!(c.max_tokens, Some(2048));
        assert_eq!(c.n, 1);
        assert!(!c.stream && c.logprobs.is_none());
    }

    #[test]
    fn shape_errors_are_400_and_range_errors_422_with_param() {
        let e = parse::<ChatRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(
            e.message.contains("missing field `messages`"),
            "{}",
            e.message
        );
        let e = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e =
            parse::<ChatRequest>(br#"{"model":"m","messages":[{"role":"Tool","content":"x"}]}"#)
                .unwrap_err();
        assert!(
            e.message.contains("unknown variant `Tool`"),
            "{}",
            e.message
        );
        let r: ChatRequest =
            parse(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":2.5}"#)
                .unwrap();
        let e = r.common().unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (422, Some("temperature"))
        );
        let r: ChatRequest = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":21,"logprobs":true}"#,
        )
        .unwrap();
        assert_eq!(
            r.common().unwrap_err().param.as_deref(),
            Some("top_logprobs")
        );
        let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let body = serde_json::json!({"model":"m","messages":[{"role":"user","content":"x"}],"stop":stops});
        let r: ChatRequest = parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(r.common().unwrap_err().param.as_deref(), Some("stop"));
        let r: ChatRequest =
            parse(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#)
                .unwrap();
        assert_eq!(r.common().unwrap_err().param.as_deref(), Some("max_tokens"));
    }
}
