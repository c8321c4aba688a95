//! Answers: engine events → server-sent events or one JSON body, keep-alives while
//! a request waits, usage, and the usage row written when the answer ends (or when
//! the client goes away: what was computed is billed).

use crate::api::Common;
use crate::billing::UsageRow;
use crate::routes::{AppState, Caller};
use crate::tools::{self, Call, ToolMode};
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use whale_engine::{Event, FinishReason, TokenLogprob, Usage};
use whale_model::Tokenizer;

/// Which endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `chat.completion`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// A submitted request, as the answer needs it.
pub(crate) struct Job {
    pub kind: Kind,
    pub model: String,
    pub caller: Caller,
    pub common: Common,
    pub prompt: Vec<u32>,
    /// Completions with `echo`: the prompt text to put before the answer.
    pub echo: Option<String>,
    /// Drop whitespace before the answer's first visible character (chat templates end
    /// in "Assistant:" and the model answers " ..."; clients expect no leading space).
    pub trim_start: bool,
    /// How the answer may call tools.
    pub tools: ToolMode,
}

/// Unix seconds.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random 128-bit id in hex.
pub(crate) fn new_id() -> String {
    let mut r = whale_engine::Rng::from_entropy();
    format!("{:016x}{:016x}", r.next_u64(), r.next_u64())
}

#[derive(Default, Clone)]
struct Choice {
    text: String,
    tokens: usize,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    usage: Usage,
    hit: usize,
    /// Text held back from the stream (tool-call output).
    buffering: bool,
    calls: Option<Vec<Call>>,
}

/// Bills what a request consumed exactly once: at its end, or when it is dropped.
struct Meter {
    st: Arc<AppState>,
    row: UsageRow,
    billed: bool,
    /// The request's entry in its key's per-minute window, settled at billing.
    ticket: Option<u64>,
}

impl Meter {
    fn bill(&mut self, finish: &str) {
        if self.billed {
            return;
        }
        self.billed = true;
        self.row.finish_reason = finish.to_string();
        if let Err(e) = self.st.ledger.record(&self.row) {
            tracing::error!("billing {}: {e}", self.row.request_id);
        }
        if let Some(t) = self.ticket {
            let r = &self.row;
            let used = r.prompt_cache_hit_tokens + r.prompt_cache_miss_tokens + r.completion_tokens;
            self.st.settle_tokens(&r.key, t, used);
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.bill("cancelled");
    }
}

struct Answer {
    st: Arc<AppState>,
    job: Job,
    id: String,
    created: u64,
    choices: Vec<Choice>,
    rx: UnboundedReceiver<(usize, Event)>,
    meter: Meter,
    /// Stream: chunks queued to send.
    out: std::collections::VecDeque<Bytes>,
    done: bool,
    /// Per choice: still dropping leading whitespace.
    trimming: Vec<bool>,
}

/// Answers `rxs` (one receiver per choice) as SSE or JSON.
pub(crate) fn respond(st: Arc<AppState>, job: Job, rxs: Vec<UnboundedReceiver<Event>>) -> Response {
    let (tx, rx) = unbounded_channel::<(usize, Event)>();
    for (i, mut r) in rxs.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // The client went away: dropping `r` cancels the engine request.
                    _ = tx.closed() => break,
                    ev = r.recv() => match ev {
                        Some(e) => if tx.send((i, e)).is_err() { break },
                        None => break,
                    },
                }
            }
        });
    }
    drop(tx);
    let id = new_id();
    let n = job.common.n;
    let job_trim = job.trim_start;
    let stream = job.common.stream;
    let meter = Meter {
        st: st.clone(),
        row: UsageRow {
            key: job.caller.key.clone(),
            request_id: id.clone(),
            model: job.model.clone(),
            prompt_cache_hit_tokens: 0,
            prompt_cache_miss_tokens: job.prompt.len() as u64,
            completion_tokens: 0,
            finish_reason: String::new(),
        },
        billed: false,
        ticket: job.caller.ticket,
    };
    let mut a = Answer {
        st,
        job,
        id,
        created: now(),
        choices: vec![Choice::default(); n],
        rx,
        meter,
        out: Default::default(),
        done: false,
        trimming: vec![job_trim; n],
    };
    if stream && a.job.kind == Kind::Chat {
        for i in 0..n {
            let c = a.chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), Value::Null);
            a.out.push_back(c);
        }
    }
    let keepalive = a.st.cfg.keepalive;
    // DeepSeek closes a request that has not finished after 30 minutes; so does whale
    // (ending the body drops the receivers, which cancels the engine requests).
    let deadline = tokio::time::Instant::now() + a.st.cfg.max_request_time;
    let body = futures_util::stream::unfold(a, move |mut a| async move {
        loop {
            if let Some(b) = a.out.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), a));
            }
            if a.done {
                return None;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "request {} closed after {:?}",
                    a.id,
                    a.st.cfg.max_request_time
                );
                return None;
            }
            match tokio::time::timeout(keepalive.min(deadline - now), a.rx.recv()).await {
                Err(_) => {
                    let ka = if a.job.common.stream {
                        ": keep-alive\n\n"
                    } else {
                        "\n"
                    };
                    return Some((Ok(Bytes::from_static(ka.as_bytes())), a));
                }
                Ok(Some((i, ev))) => a.on_event(i, ev),
                Ok(None) => {
                    // The engine dropped the request without finishing it.
                    for i in 0..a.choices.len() {
                        if a.choices[i].finish.is_none() {
                            a.on_event(
                                i,
                                Event::Finished {
                                    reason: FinishReason::InsufficientResource,
                                    text: String::new(),
                                    usage: Usage {
                                        prompt_tokens: a.job.prompt.len(),
                                        prompt_cache_hit_tokens: a.choices[i].hit,
                                        completion_tokens: a.choices[i].tokens,
                                    },
                                },
                            );
                        }
                    }
                }
            }
        }
    });
    let ctype = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

impl Answer {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.job.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn chunk(&self, choices: Value, usage: Value) -> Bytes {
        let v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.job.model,
            "system_fingerprint": self.st.cfg.fingerprint,
            "choices": choices,
            "usage": usage,
        });
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn usage(&self) -> Value {
        // The prompt is counted once (choice 0's cache hits), completions over all choices.
        let c0 = &self.choices[0];
        let prompt = self.job.prompt.len();
        let hit = c0.hit.min(prompt);
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": hit,
            "prompt_cache_miss_tokens": prompt - hit,
            "prompt_tokens_details": {"cached_tokens": hit},
        })
    }

    fn update_meter(&mut self) {
        let hit = self.choices[0].hit.min(self.job.prompt.len());
        self.meter.row.prompt_cache_hit_tokens = hit as u64;
        self.meter.row.prompt_cache_miss_tokens = (self.job.prompt.len() - hit) as u64;
        self.meter.row.completion_tokens = self.choices.iter().map(|c| c.tokens as u64).sum();
    }

    fn trim(&mut self, i: usize, text: String) -> String {
        if !self.trimming[i] {
            return text;
        }
        let t = text.trim_start();
        if !t.is_empty() {
            self.trimming[i] = false;
        }
        t.to_string()
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        let stream = self.job.common.stream;
        let ev = match ev {
            Event::Token { id, text, logprob } => Event::Token {
                id,
                text: self.trim(i, text),
                logprob,
            },
            Event::Finished {
                reason,
                text,
                usage,
            } => Event::Finished {
                reason,
                text: self.trim(i, text),
                usage,
            },
            e => e,
        };
        match ev {
            Event::Started {
                prompt_cache_hit_tokens,
            } => {
                self.choices[i].hit = prompt_cache_hit_tokens;
                self.update_meter();
            }
            Event::Token { text, logprob, .. } => {
                let forced = matches!(self.job.tools, ToolMode::Forced(_));
                let auto = self.job.tools == ToolMode::Auto;
                let c = &mut self.choices[i];
                c.tokens += 1;
                let start = c.text.len();
                c.text.push_str(&text);
                if let Some(lp) = &logprob {
                    c.logprobs.push(lp.clone());
                }
                // Tool-call output is held back and sent as tool_calls at the end.
                let mut text = text;
                if forced || c.buffering {
                    c.buffering = true;
                    text.clear();
                } else if auto {
                    if let Some(at) = c.text[start..].find(tools::CALLS_BEGIN) {
                        c.buffering = true;
                        text.truncate(at);
                    }
                }
                self.update_meter();
                if stream && (!text.is_empty() || logprob.is_some()) {
                    let lps = logprob.map(|lp| self.logprobs_json(&[lp]));
                    let choice = self.choice_delta(i, &text, lps, None);
                    let b = self.chunk(json!([choice]), Value::Null);
                    self.out.push_back(b);
                }
            }
            Event::Finished {
                reason,
                text,
                usage,
            } => {
                let c = &mut self.choices[i];
                let mut text = text;
                c.text.push_str(&text);
                c.finish = Some(reason);
                c.usage = usage;
                c.hit = usage.prompt_cache_hit_tokens;
                c.tokens = usage.completion_tokens;
                match &self.job.tools {
                    ToolMode::Forced(_) if reason == FinishReason::Stop => {
                        c.calls = tools::parse_forced(&c.text).filter(|v| !v.is_empty());
                        if c.calls.is_some() {
                            c.text.clear();
                        }
                    }
                    ToolMode::Auto => {
                        let (content, calls) = tools::parse_native(&c.text);
                        if !calls.is_empty() {
                            c.text = content;
                            c.calls = Some(calls);
                        }
                    }
                    _ => {}
                }
                if c.buffering {
                    // Nothing held back was streamed: send what is content now.
                    text = if c.calls.is_some() {
                        String::new()
                    } else {
                        c.text.clone()
                    };
                }
                let calls = c.calls.clone();
                self.update_meter();
                let all = self.choices.iter().all(|c| c.finish.is_some());
                if stream {
                    if let Some(calls) = &calls {
                        let delta = json!([{"index": i, "delta": {"tool_calls": tools::to_json(calls, &format!("{}{i}", &self.id[..8]))}, "logprobs": null, "finish_reason": null}]);
                        let b = self.chunk(delta, Value::Null);
                        self.out.push_back(b);
                    }
                    let choice = self.choice_delta(i, &text, None, Some(reason));
                    // DeepSeek's finish chunk carries usage.
                    let usage = if all { self.usage() } else { Value::Null };
                    let b = self.chunk(json!([choice]), usage);
                    self.out.push_back(b);
                }
                if all {
                    let reasons: Vec<&str> = (0..self.choices.len())
                        .filter_map(|i| self.finish_str(i, self.choices[i].finish))
                        .collect();
                    self.meter.bill(&reasons.join(","));
                    if stream {
                        if self.job.common.include_usage {
                            let b = self.chunk(json!([]), self.usage());
                            self.out.push_back(b);
                        }
                        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    } else {
                        let body = self.whole();
                        self.out.push_back(Bytes::from(body.to_string()));
                    }
                    self.done = true;
                }
            }
        }
    }

    fn finish_str(&self, i: usize, finish: Option<FinishReason>) -> Option<&'static str> {
        if self.choices[i].calls.is_some() {
            return Some("tool_calls");
        }
        finish.map(FinishReason::as_str)
    }

    fn choice_delta(
        &self,
        i: usize,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<FinishReason>,
    ) -> Value {
        let finish = self.finish_str(i, finish);
        match self.job.kind {
            Kind::Chat => json!({
                "index": i,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": i,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// The whole answer (non-streaming).
    fn whole(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let finish = self.finish_str(i, c.finish);
                let lps = self
                    .job
                    .common
                    .logprobs
                    .map(|_| self.logprobs_json(&c.logprobs));
                match self.job.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": c.text});
                        if let Some(calls) = &c.calls {
                            if c.text.is_empty() {
                                message["content"] = Value::Null;
                            }
                            message["tool_calls"] =
                                Value::Array(tools::to_json(calls, &format!("{}{i}", &self.id[..8])));
                        }
                        json!({"index": i, "message": message, "logprobs": lps, "finish_reason": finish})
                    }
                    Kind::Completion => {
                        let text = match &self.job.echo {
                            Some(e) => format!("{e}{}", c.text),
                            None => c.text.clone(),
                        };
                        json!({"index": i, "text": text, "logprobs": lps, "finish_reason": finish})
                    }
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.job.model,
            "system_fingerprint": self.st.cfg.fingerprint,
            "choices": choices,
            "usage": self.usage(),
        })
    }

    fn logprobs_json(&self, lps: &[TokenLogprob]) -> Value {
        let tok = &self.st.tok;
        match self.job.kind {
            Kind::Chat => {
                let content: Vec<Value> = lps
                    .iter()
                    .map(|lp| {
                        let (t, b) = token_piece(tok, lp.id);
                        let top: Vec<Value> = lp
                            .top
                            .iter()
                            .map(|&(id, l)| {
                                let (t, b) = token_piece(tok, id);
                                json!({"token": t, "logprob": l, "bytes": b})
                            })
                            .collect();
                        json!({"token": t, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content})
            }
            Kind::Completion => {
                let mut offset = 0usize;
                let (mut tokens, mut token_lps, mut tops, mut offsets) =
                    (vec![], vec![], vec![], vec![]);
                for lp in lps {
                    let (t, _) = token_piece(tok, lp.id);
                    offsets.push(offset);
                    offset += t.len();
                    tokens.push(t);
                    token_lps.push(lp.logprob);
                    let top: serde_json::Map<String, Value> = lp
                        .top
                        .iter()
                        .map(|&(id, l)| (token_piece(tok, id).0, json!(l)))
                        .collect();
                    tops.push(Value::Object(top));
                }
                json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
            }
        }
    }
}

/// GPT-2 byte-level BPE: the character standing for each byte.
fn byte_of_char(ch: char) -> Option<u8> {
    let c = ch as u32;
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    // The other 68 bytes map to 256.. in byte order.
    let mut n = 0u32;
    for b in 0u32..256 {
        if !printable(b) {
            if c == 256 + n {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

/// A token's text and raw bytes (byte-level pieces mapped back to bytes; special
/// tokens as their text).
pub(crate) fn token_piece(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let Some(piece) = tok.id_to_token(id) else {
        return (String::new(), Vec::new());
    };
    let bytes: Option<Vec<u8>> = piece.chars().map(byte_of_char).collect();
    let bytes = bytes.unwrap_or_else(|| piece.as_bytes().to_vec());
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_characters_map_back_to_bytes() {
        assert_eq!(byte_of_char('A'), Some(b'A'));
        assert_eq!(byte_of_char('Ġ'), Some(b' ')); // U+0120
        assert_eq!(byte_of_char('Ċ'), Some(b'\n')); // U+010A
        assert_eq!(byte_of_char('\u{0100}'), Some(0));
        assert_eq!(byte_of_char('é'), Some(0xE9));
        assert_eq!(byte_of_char('中'), None);
    }
}
