//! Routes, authentication, limits, and turning checked requests into engine work.

use crate::api::{self, ChatRequest, Common, CompletionRequest, Prompt, Role};
use crate::billing::{money, KeyInfo, Ledger};
use crate::error::ApiError;
use crate::metrics::HttpStats;
use crate::sse::{self, Job, Kind};
use crate::tools::{self, ToolMode};
use axum::body::Bytes;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use whale_engine::{Engine, Request as EngineRequest, SubmitError};
use whale_model::{Message, Tokenizer};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Names the model answers to (the first is listed first); `deepseek-chat` and
    /// `deepseek-coder` by default.
    pub served_names: Vec<String>,
    /// Most prompt + completion tokens per request.
    pub max_context: usize,
    /// `max_tokens` when the request gives none (capped by what the context leaves).
    pub default_max_tokens: usize,
    /// Require a key from the ledger (false: open server, loopback only).
    pub require_keys: bool,
    /// Interval of `: keep-alive` comments (stream) and blank lines (non-stream) while a
    /// request waits.
    pub keepalive: Duration,
    /// Longest a request may run before its connection is closed (DeepSeek: 30 minutes).
    pub max_request_time: Duration,
    /// Token ids that end a turn (EOS).
    pub eos_token_ids: Vec<u32>,
    /// `system_fingerprint` of every answer.
    pub fingerprint: String,
}

/// One request counted against its key's per-minute limits.
struct Counted {
    at: Instant,
    /// The ticket [`AppState::admit_caller`] gave it.
    id: u64,
    /// Tokens: prompt + every choice's `max_tokens` until the request ends, then
    /// what it used ([`AppState::settle_tokens`]).
    tokens: u64,
}

/// Requests and tokens of one key in the last minute.
#[derive(Default)]
struct Window {
    events: VecDeque<Counted>,
}

impl Window {
    fn prune(&mut self, now: Instant) {
        while let Some(&Counted { at: t, .. }) = self.events.front() {
            if now.duration_since(t) >= Duration::from_secs(60) {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Shared server state.
pub struct AppState {
    pub(crate) engine: Engine,
    pub(crate) tok: Arc<Tokenizer>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) cfg: ServerConfig,
    pub(crate) http: HttpStats,
    windows: Mutex<HashMap<String, Window>>,
    next_ticket: std::sync::atomic::AtomicU64,
    grammars: Result<whale_engine::Grammars, String>,
}

/// Who a request is billed to.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub key: String,
    pub info: Option<KeyInfo>,
    /// The request's entry in the key's per-minute window, when it was counted.
    pub ticket: Option<u64>,
}

/// The key requests are billed to on an open server.
pub const ANONYMOUS: &str = "anonymous";

impl AppState {
    /// State over a started engine.
    pub fn new(
        engine: Engine,
        tok: Arc<Tokenizer>,
        ledger: Arc<Ledger>,
        cfg: ServerConfig,
    ) -> Self {
        let grammars = whale_engine::Grammars::new(&tok, &cfg.eos_token_ids, engine.vocab_size());
        if let Err(e) = &grammars {
            tracing::warn!("JSON mode is unavailable: {e}");
        }
        AppState {
            grammars,
            engine,
            tok,
            ledger,
            cfg,
            http: HttpStats::default(),
            windows: Mutex::new(HashMap::new()),
            next_ticket: Default::default(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !self.cfg.require_keys {
            return Ok(Caller {
                key: ANONYMOUS.into(),
                info: None,
                ticket: None,
            });
        }
        let Some(auth) = auth else {
            return Err(ApiError::auth(
                "Authentication Fails (no Authorization header; send Bearer sk-...)",
            ));
        };
        let Some(key) = auth.strip_prefix("Bearer ").map(str::trim) else {
            return Err(ApiError::auth(
                "Authentication Fails (auth header format should be Bearer sk-...)",
            ));
        };
        let info = self
            .ledger
            .key(key)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        match info {
            Some(info) => Ok(Caller {
                key: key.to_string(),
                info: Some(info),
                ticket: None,
            }),
            None => {
                let tail: String = key
                    .chars()
                    .rev()
                    .take(4)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Err(ApiError::auth(format!(
                    "Authentication Fails, Your api key: ****{tail} is invalid"
                )))
            }
        }
    }

    /// Balance and per-minute limits; counts the request when it passes (with
    /// `tokens`, its most: prompt + every choice's `max_tokens`, until it ends and
    /// [`Self::settle_tokens`] puts in what it used).
    fn admit_caller(&self, caller: &mut Caller, tokens: u64) -> Result<(), ApiError> {
        let Some(info) = &caller.info else {
            return Ok(());
        };
        if !info.has_balance() {
            return Err(ApiError::balance());
        }
        if info.rpm == 0 && info.tpm == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let win = w.entry(caller.key.clone()).or_default();
        win.prune(now);
        if info.rpm > 0 && win.events.len() as u64 >= info.rpm as u64 {
            return Err(ApiError::rate_limit(format!(
                "Rate limit reached: this key allows {} requests per minute",
                info.rpm
            )));
        }
        let used: u64 = win.events.iter().map(|e| e.tokens).sum();
        if info.tpm > 0 && used + tokens > info.tpm as u64 {
            return Err(ApiError::rate_limit(format!(
                "Rate limit reached: this key allows {} tokens per minute ({used} used in the last minute, this request needs up to {tokens})",
                info.tpm
            )));
        }
        let id = self
            .next_ticket
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        win.events.push_back(Counted {
            at: now,
            id,
            tokens,
        });
        caller.ticket = Some(id);
        Ok(())
    }

    /// Takes back the request [`Self::admit_caller`] counted when the engine refused it
    /// (a 503 does not count against the key's limits).
    fn forget(&self, caller: &Caller) {
        let Some(id) = caller.ticket else { return };
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(win) = w.get_mut(&caller.key) {
            win.events.retain(|e| e.id != id);
        }
    }

    /// A finished request's real token count (prompt + completion) in place of the
    /// most it could have used, so a key's tokens-per-minute limit counts tokens used.
    pub(crate) fn settle_tokens(&self, key: &str, ticket: u64, tokens: u64) {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = w
            .get_mut(key)
            .and_then(|win| win.events.iter_mut().find(|e| e.id == ticket))
        {
            e.tokens = tokens;
        }
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.cfg.served_names.iter().any(|n| n == model) {
            Ok(())
        } else {
            Err(ApiError::model_not_exist())
        }
    }

    /// `max_tokens` checked against the context, as DeepSeek rejects (not clamps).
    fn max_tokens(&self, asked: Option<usize>, prompt: usize) -> Result<usize, ApiError> {
        let ctx = self.cfg.max_context;
        if prompt >= ctx {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {prompt} tokens in the messages. Please reduce the length of the messages."
            )));
        }
        // Without max_tokens, the default is also capped by what the KV pool can hold.
        let pool = self.engine.config().total_pages * self.engine.config().page_tokens;
        match asked {
            None => Ok(self
                .cfg
                .default_max_tokens
                .min(ctx - prompt)
                .min(pool.saturating_sub(prompt).max(1))),
            Some(m) if prompt + m <= ctx => Ok(m),
            Some(m) => Err(ApiError::bad_request(format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                prompt + m
            ))),
        }
    }

    /// Submits `n` engine requests (seeds `seed + i`).
    fn submit(
        &self,
        caller: &Caller,
        prompt: Vec<u32>,
        c: &Common,
        max_tokens: usize,
        tool_mode: &ToolMode,
    ) -> Result<Vec<tokio::sync::mpsc::UnboundedReceiver<whale_engine::Event>>, ApiError> {
        let arrival = Instant::now();
        let format = match tool_mode {
            ToolMode::Forced(schema) => api::Format::JsonSchema(schema.clone()),
            _ => c.format.clone(),
        };
        let constraint = match &format {
            api::Format::Text => None,
            f => {
                let g = self
                    .grammars
                    .as_ref()
                    .map_err(|e| ApiError::param("response_format", e.clone()))?;
                let made = match f {
                    api::Format::JsonSchema(schema) => g.json_schema(schema),
                    _ => g.json_object(),
                };
                Some(made.map_err(|e| ApiError::param("response_format", e))?)
            }
        };
        let mut out = Vec::with_capacity(c.n);
        for i in 0..c.n {
            let mut sampling = c.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let req = EngineRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                stop_token_ids: if c.ignore_eos {
                    Vec::new()
                } else {
                    self.cfg.eos_token_ids.clone()
                },
                stop: c.stop.clone(),
                logprobs: c.logprobs,
                cache_scope: caller.key.clone(),
                arrival,
                constraint: constraint.clone(),
                skip_special: *tool_mode != ToolMode::Auto,
            };
            match self.engine.submit(req) {
                Ok(rx) => out.push(rx),
                Err(SubmitError::QueueFull(n)) => {
                    return Err(ApiError::overloaded(format!(
                        "Server Overloaded: {n} requests are waiting; retry shortly"
                    )))
                }
                Err(SubmitError::TooLarge { need, total }) => {
                    return Err(ApiError::bad_request(format!(
                        "the request needs {need} KV pages of {} tokens but the server has {total}; reduce the prompt or max_tokens",
                        self.engine.config().page_tokens
                    )))
                }
                Err(SubmitError::Invalid(m)) => return Err(ApiError::param("sampling", m)),
                Err(SubmitError::Stopped) => {
                    return Err(ApiError::internal("the engine has stopped"))
                }
            }
        }
        Ok(out)
    }
}

/// The router: every API route under `/`, `/v1` and `/beta`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/chat/completions", post(chat))
        .route("/completions", post(completions))
        .route("/models", get(models))
        .route("/user/balance", get(balance))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    Router::new()
        .merge(api.clone())
        .nest("/v1", api.clone())
        .nest("/beta", api)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), around))
        .with_state(state)
}

/// Around every request: counts the answer's status for /metrics and sets
/// `x-request-id` on it, the client's own (as proxies pass it along: visible ASCII,
/// at most 128 bytes) or a new `req_…` id, so a client's logs and the server's meet.
async fn around(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", sse::new_id()));
    let mut r = next.run(req).await;
    st.http.count(r.status().as_u16());
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

async fn not_found(OriginalUri(uri): OriginalUri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

fn result(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({
        "status": "ok",
        "model": st.cfg.served_names.first(),
        "running": whale_engine::EngineStats::get(&st.engine.stats().running),
        "waiting": whale_engine::EngineStats::get(&st.engine.stats().waiting),
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let body = crate::metrics::render(
        st.cfg
            .served_names
            .first()
            .map(String::as_str)
            .unwrap_or("whale"),
        st.engine.stats(),
        &st.http,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    result((|| {
        st.authorize(&headers)?;
        let data: Vec<Value> = st
            .cfg
            .served_names
            .iter()
            .map(
                |n| json!({"id": n, "object": "model", "owned_by": "whale", "created": sse::now()}),
            )
            .collect();
        Ok(Json(json!({"object": "list", "data": data})).into_response())
    })())
}

async fn balance(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    result((|| {
        let caller = st.authorize(&headers)?;
        let Some(info) = caller.info else {
            return Ok(Json(json!({"is_available": true, "balance_infos": []})).into_response());
        };
        if info.unlimited {
            return Ok(Json(json!({"is_available": true, "balance_infos": []})).into_response());
        }
        Ok(Json(json!({
            "is_available": info.has_balance(),
            "balance_infos": [{
                "currency": "CNY",
                "total_balance": money(info.granted + info.topped_up),
                "granted_balance": money(info.granted),
                "topped_up_balance": money(info.topped_up),
            }]
        }))
        .into_response())
    })())
}

async fn tokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    result((|| {
        st.authorize(&headers)?;
        let v: Value = api::parse(&body)?;
        let ids = if let Some(msgs) = v.get("messages") {
            let msgs: Vec<api::InMessage> = serde_json::from_value(msgs.clone())
                .map_err(|e| ApiError::bad_request(format!("messages: {e}")))?;
            chat_prompt(
                &st,
                &msgs,
                v.get("add_generation_prompt")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                v.get("tools").filter(|t| t.is_array()),
            )?
            .0
        } else if let Some(p) = v.get("prompt").and_then(Value::as_str) {
            let add = v
                .get("add_special_tokens")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if add {
                st.tok.encode_prompt(p)
            } else {
                st.tok.encode(p, false)
            }
            .map_err(|e| ApiError::internal(e.to_string()))?
        } else {
            return Err(ApiError::bad_request(
                "send \"prompt\" (text) or \"messages\"",
            ));
        };
        Ok(
            Json(json!({"count": ids.len(), "max_model_len": st.cfg.max_context, "tokens": ids}))
                .into_response(),
        )
    })())
}

async fn detokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    result((|| {
        st.authorize(&headers)?;
        let v: Value = api::parse(&body)?;
        let ids: Vec<u32> = v
            .get("tokens")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("tokens: {e}")))?
            .ok_or_else(|| ApiError::bad_request("send \"tokens\": [ids]"))?;
        let vocab = st.tok.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ApiError::param(
                "tokens",
                format!("token id {bad} is out of range (vocabulary {vocab})"),
            ));
        }
        let text = st
            .tok
            .decode(&ids, false)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Json(json!({"prompt": text})).into_response())
    })())
}

/// Renders the conversation; returns the ids and whether the last assistant message
/// is continued (DeepSeek's `prefix: true`).
fn chat_prompt(
    st: &AppState,
    msgs: &[api::InMessage],
    add_generation_prompt: bool,
    tools: Option<&Value>,
) -> Result<(Vec<u32>, bool), ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let template = st.tok.chat_template().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /completions")
    })?;
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = match m.role {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let content = api::content_text(&m.content, i)?;
        if content.is_none() && m.role != Role::Assistant {
            return Err(ApiError::param(
                &format!("messages[{i}].content"),
                format!("messages[{i}]: a {role} message needs content"),
            ));
        }
        let mut msg = Message {
            role: role.into(),
            content: Some(content.unwrap_or_default()),
            extra: Default::default(),
        };
        if let Some(n) = &m.name {
            msg.extra.insert("name".into(), Value::String(n.clone()));
        }
        if let Some(t) = &m.tool_calls {
            msg.extra.insert("tool_calls".into(), t.clone());
        }
        if let Some(t) = &m.tool_call_id {
            msg.extra
                .insert("tool_call_id".into(), Value::String(t.clone()));
        }
        if let Some(r) = &m.reasoning_content {
            msg.extra
                .insert("reasoning_content".into(), Value::String(r.clone()));
        }
        messages.push(msg);
    }
    let last = msgs.last().expect("messages checked non-empty");
    let prefix = last.role == Role::Assistant && last.prefix == Some(true);
    for (i, m) in msgs.iter().enumerate() {
        if m.prefix == Some(true) && (i + 1 != msgs.len() || m.role != Role::Assistant) {
            return Err(ApiError::param(
                &format!("messages[{i}].prefix"),
                "prefix: true is allowed only on the last message, which must be from the assistant",
            ));
        }
    }
    let text = if prefix {
        // Render the whole conversation and cut right after the prefix text, so the
        // assistant turn stays open (no end-of-turn token).
        let full = template
            .render_with(&messages, false, tools)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let content = messages
            .last()
            .and_then(|m| m.content.clone())
            .unwrap_or_default();
        let end = if content.is_empty() {
            // Empty prefix: the text before the last turn's end-of-turn marker.
            let before = template
                .render_with(&messages[..messages.len() - 1], true, tools)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            before.len()
        } else {
            full.rfind(&content)
                .map(|i| i + content.len())
                .ok_or_else(|| {
                    ApiError::bad_request("the chat template drops the prefix message")
                })?
        };
        full[..end].to_string()
    } else {
        template
            .render_with(&messages, add_generation_prompt, tools)
            .map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let ids = st
        .tok
        .encode(&text, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((ids, prefix))
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    result((|| {
        let mut caller = st.authorize(&headers)?;
        let req: ChatRequest = api::parse(&body)?;
        st.check_model(&req.model)?;
        let c = req.common()?;
        let continue_final = req.continue_final_message == Some(true);
        let mut msgs = req.messages.clone();
        if continue_final {
            if let Some(m) = msgs.last_mut() {
                m.prefix = Some(true);
            }
        }
        let (tool_mode, tools_json) = tools::mode(
            &req.tools,
            &req.tool_choice,
            req.parallel_tool_calls.unwrap_or(true),
        )?;
        if matches!(tool_mode, ToolMode::Forced(_)) && c.format != api::Format::Text {
            return Err(ApiError::param(
                "response_format",
                "response_format cannot be combined with a required tool call",
            ));
        }
        let (prompt, prefix) = chat_prompt(&st, &msgs, true, tools_json.as_ref())?;
        let max_tokens = st.max_tokens(c.max_tokens, prompt.len())?;
        st.admit_caller(&mut caller, (prompt.len() + c.n * max_tokens) as u64)?;
        let rx = st
            .submit(&caller, prompt.clone(), &c, max_tokens, &tool_mode)
            .inspect_err(|_| st.forget(&caller))?;
        Ok(sse::respond(
            st.clone(),
            Job {
                kind: Kind::Chat,
                model: req.model.clone(),
                caller,
                common: c,
                prompt,
                echo: None,
                trim_start: !prefix,
                tools: tool_mode,
            },
            rx,
        ))
    })())
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    result((|| {
        let mut caller = st.authorize(&headers)?;
        let req: CompletionRequest = api::parse(&body)?;
        st.check_model(&req.model)?;
        let c = req.common()?;
        let text = match &req.prompt {
            Prompt::Text(s) => Some(s.clone()),
            Prompt::Texts(v) if v.len() == 1 => Some(v[0].clone()),
            Prompt::Ids(_) => None,
            Prompt::IdLists(v) if v.len() == 1 => None,
            _ => {
                return Err(ApiError::param(
                    "prompt",
                    "one prompt per request (send several requests, or n for several choices)",
                ))
            }
        };
        let prompt = match (&text, &req.suffix) {
            (Some(p), Some(suffix)) => fim_prompt(&st.tok, p, suffix)?,
            (Some(p), None) => st
                .tok
                .encode_prompt(p)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            (None, Some(_)) => return Err(ApiError::param("suffix", "suffix needs a text prompt")),
            (None, None) => {
                let ids = match &req.prompt {
                    Prompt::Ids(v) => v.clone(),
                    Prompt::IdLists(v) => v[0].clone(),
                    _ => unreachable!("text prompts handled above"),
                };
                let vocab = st.tok.vocab_size();
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ApiError::param(
                        "prompt",
                        format!("token id {bad} is out of range (vocabulary {vocab})"),
                    ));
                }
                ids
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        let max_tokens = st.max_tokens(c.max_tokens, prompt.len())?;
        st.admit_caller(&mut caller, (prompt.len() + c.n * max_tokens) as u64)?;
        let rx = st
            .submit(&caller, prompt.clone(), &c, max_tokens, &ToolMode::None)
            .inspect_err(|_| st.forget(&caller))?;
        let echo = if req.echo == Some(true) {
            Some(match text {
                Some(t) => t,
                None => st
                    .tok
                    .decode(&prompt, true)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            })
        } else {
            None
        };
        Ok(sse::respond(
            st.clone(),
            Job {
                kind: Kind::Completion,
                model: req.model.clone(),
                caller,
                common: c,
                prompt,
                echo,
                trim_start: false,
                tools: ToolMode::None,
            },
            rx,
        ))
    })())
}

/// DeepSeek-Coder's fill-in-the-middle prompt, PSM order:
/// `<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>` after BOS.
pub fn fim_prompt(tok: &Tokenizer, prefix: &str, suffix: &str) -> Result<Vec<u32>, ApiError> {
    const BEGIN: &str = "<｜fim▁begin｜>";
    const HOLE: &str = "<｜fim▁hole｜>";
    const END: &str = "<｜fim▁end｜>";
    let (Some(b), Some(h), Some(e)) = (tok.token_id(BEGIN), tok.token_id(HOLE), tok.token_id(END))
    else {
        return Err(ApiError::param(
            "suffix",
            "this model's tokenizer has no fill-in-the-middle tokens (<｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>)",
        ));
    };
    let enc = |s: &str| {
        tok.encode(s, false)
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    let mut ids = Vec::new();
    if let Some(bos) = tok.bos_id() {
        ids.push(bos);
    }
    ids.push(b);
    ids.extend(enc(prefix)?);
    ids.push(h);
    ids.extend(enc(suffix)?);
    ids.push(e);
    Ok(ids)
}
