//! The server on a loopback port with the bundled tiny chat model, driven by a real
//! OpenAI client (`async-openai`) and by raw HTTP for DeepSeek's extra fields,
//! errors, metrics and disconnects.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs, FinishReason,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::Client;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use whale_engine::{Engine, EngineConfig};
use whale_model::ModelFolder;
use whale_server::billing::{KeyInfo, Ledger, Prices, NANO};
use whale_server::{AppState, ServerConfig};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/whale-tiny-chat")
}

struct Opts {
    engine: EngineConfig,
    keys: Vec<KeyInfo>,
    max_request_time: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            engine: EngineConfig {
                max_batch: 8,
                total_pages: 256,
                ..Default::default()
            },
            keys: Vec::new(),
            max_request_time: Duration::from_secs(1800),
        }
    }
}

struct Server {
    base: String,
    ledger: Arc<Ledger>,
    http: reqwest::Client,
    _db: tempfile::TempDir,
}

async fn start(opts: Opts) -> Server {
    let folder = ModelFolder::open(&model_dir()).unwrap();
    let eos = folder.eos_token_ids();
    let ModelFolder {
        model, tokenizer, ..
    } = folder;
    let tok = Arc::new(tokenizer.unwrap());
    let db = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(&db.path().join("w.db"), Prices::default()).unwrap());
    for k in &opts.keys {
        ledger.add_key(k).unwrap();
    }
    let engine = Engine::start(Arc::new(model), tok.clone(), opts.engine);
    let state = Arc::new(AppState::new(
        engine,
        tok,
        ledger.clone(),
        ServerConfig {
            served_names: vec!["deepseek-chat".into(), "deepseek-coder".into()],
            max_context: 2048,
            default_max_tokens: 256,
            require_keys: !opts.keys.is_empty(),
            keepalive: Duration::from_millis(200),
            max_request_time: opts.max_request_time,
            eos_token_ids: eos,
            fingerprint: "fp_test".into(),
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(whale_server::serve_on(listener, state));
    Server {
        base,
        ledger,
        http: reqwest::Client::new(),
        _db: db,
    }
}

impl Server {
    fn client(&self, prefix: &str, key: &str) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}{prefix}", self.base))
                .with_api_key(key),
        )
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    async fn json(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let (s, t) = self.post(path, key, &body.to_string()).await;
        let v = serde_json::from_str(t.trim()).unwrap_or_else(|e| panic!("{e}: {t:?}"));
        (s, v)
    }

    /// Sends a chat request and returns as soon as the response headers arrive.
    async fn open_stream(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/chat/completions", self.base))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        let m = self.get("/metrics").await;
        m.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{m}"))
    }
}

fn user(text: &str) -> async_openai::types::chat::ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_non_streaming_and_streaming_agree_through_async_openai() {
    let s = start(Opts::default()).await;
    let client = s.client("/v1", "sk-none");
    let req = CreateChatCompletionRequestArgs::default()
        .model("deepseek-chat")
        .messages(vec![user("What is 37 + 48?")])
        .temperature(0.0)
        .build()
        .unwrap();
    let r = client.chat().create(req.clone()).await.unwrap();
    let text = r.choices[0].message.content.clone().unwrap();
    assert_eq!(text, "37 + 48 = 85");
    assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(r.object, "chat.completion");
    assert_eq!(r.model, "deepseek-chat");
    #[allow(deprecated)]
    let fp = r.system_fingerprint.clone();
    assert_eq!(fp.as_deref(), Some("fp_test"));
    assert_eq!(r.id.len(), 32);
    let u = r.usage.unwrap();
    assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);

    // (With async-openai's `byot` feature the request must say `stream: true` itself.)
    let mut req = req;
    req.stream = Some(true);
    let mut stream = client.chat().create_stream(req).await.unwrap();
    let mut streamed = String::new();
    let mut finish = None;
    let mut ids = std::collections::HashSet::new();
    let mut chunks = 0;
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        ids.insert(c.id.clone());
        chunks += 1;
        for ch in &c.choices {
            if let Some(t) = &ch.delta.content {
                streamed.push_str(t);
            }
            if ch.finish_reason.is_some() {
                finish = ch.finish_reason;
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish, Some(FinishReason::Stop));
    assert_eq!(ids.len(), 1, "every chunk has the same id");
    assert!(chunks >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_wire_format_usage_and_prefix_cache_hits() {
    let s = start(Opts::default()).await;
    // A prompt over two 64-token pages, sent twice: the second is served from the cache.
    let long = "Count the letter r in the word strawberry. ".repeat(8);
    let body = json!({"model": "deepseek-chat", "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "system", "content": long}, {"role": "user", "content": "What is 2 + 3?"}]});
    let (st, first) = s.json("/chat/completions", None, body.clone()).await;
    assert_eq!(st, 200, "{first}");
    let u = &first["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 128, "{u}");
    assert_eq!(u["prompt_cache_hit_tokens"], 0);
    assert_eq!(u["prompt_cache_miss_tokens"].as_u64().unwrap(), prompt);
    let (_, second) = s.json("/v1/chat/completions", None, body.clone()).await;
    let u2 = &second["usage"];
    let hit = u2["prompt_cache_hit_tokens"].as_u64().unwrap();
    assert!(hit >= 128 && hit % 64 == 0 && hit < prompt, "{u2}");
    assert_eq!(
        hit + u2["prompt_cache_miss_tokens"].as_u64().unwrap(),
        prompt
    );
    assert_eq!(
        u2["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(hit)
    );
    // A cache hit never changes the answer.
    assert_eq!(
        first["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
    assert!(s.metric("vllm:prefix_cache_hits_total").await >= hit as f64);

    // Raw SSE: role first, no `id:` lines, usage chunk with empty choices, [DONE] last.
    let mut b = body.clone();
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let (st, text) = s.post("/beta/chat/completions", None, &b.to_string()).await;
    assert_eq!(st, 200);
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.starts_with(':'))
        .collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("id:")));
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e[6..]).unwrap())
        .collect();
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(parsed[0]["object"], "chat.completion.chunk");
    let last = parsed.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"].as_u64(), Some(prompt));
    let fin = &parsed[parsed.len() - 2];
    assert!(fin["choices"][0]["finish_reason"].is_string());
    assert!(
        fin["usage"].is_object(),
        "DeepSeek's finish chunk carries usage"
    );
    for p in &parsed[..parsed.len() - 2] {
        assert!(p["usage"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_logprobs_n_seed_and_prefix_completion() {
    let s = start(Opts::default()).await;
    let ask = |extra: Value| {
        let mut b = json!({"model": "deepseek-coder", "temperature": 0,
            "messages": [{"role": "user", "content": "What is 37 + 48?"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // Stop string: the text ends before it, finish_reason stop.
    let (_, r) = s
        .json("/chat/completions", None, ask(json!({"stop": ["="]})))
        .await;
    assert_eq!(r["choices"][0]["message"]["content"], "37 + 48 ");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    // max_tokens: finish_reason length.
    let (_, r) = s
        .json("/chat/completions", None, ask(json!({"max_tokens": 3})))
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    // Logprobs: one entry per token, top alternatives sorted, the greedy choice on top.
    let (_, r) = s
        .json(
            "/chat/completions",
            None,
            ask(json!({"logprobs": true, "top_logprobs": 3})),
        )
        .await;
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(lp <= 0.0);
        assert_eq!(top[0]["token"], t["token"], "greedy picks the most likely");
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert!(t["bytes"].is_array());
    }
    // n = 3 sampled choices with a seed: reproducible, and batched together.
    let body = ask(json!({"n": 3, "temperature": 1.5, "seed": 7, "max_tokens": 12}));
    let (_, a) = s.json("/chat/completions", None, body.clone()).await;
    let (_, b) = s.json("/chat/completions", None, body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_eq!(
            a["choices"][i]["message"]["content"],
            b["choices"][i]["message"]["content"]
        );
        assert_eq!(a["choices"][i]["index"], i);
    }
    // Chat prefix completion: the answer continues the assistant's prefix.
    let (st, r) = s
        .json(
            "/beta/chat/completions",
            None,
            json!({"model": "deepseek-chat", "temperature": 0, "messages": [
                {"role": "user", "content": "What is 37 + 48?"},
                {"role": "assistant", "content": "37 + 48 =", "prefix": true}]}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], " 85");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_echo_fim_models_tokenize() {
    let s = start(Opts::default()).await;
    let client = s.client("", "sk-none");
    let r = client
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model("deepseek-chat")
                .prompt("User: What is 37 + 48?\n\nAssistant:")
                .max_tokens(16u32)
                .temperature(0.0)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.object, "text_completion");
    assert_eq!(r.choices[0].text, " 37 + 48 = 85");
    let (_, e) = s
        .json(
            "/completions",
            None,
            json!({"model": "deepseek-chat", "prompt": "User: What is 2 + 2?\n\nAssistant:",
                "echo": true, "max_tokens": 3, "temperature": 0, "logprobs": 2}),
        )
        .await;
    assert_eq!(
        e["choices"][0]["text"],
        "User: What is 2 + 2?\n\nAssistant: 2 +"
    );
    assert_eq!(
        e["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // The tiny model has no FIM tokens: a 422 that names `suffix`.
    let (st, e) = s
        .json(
            "/beta/completions",
            None,
            json!({"model": "deepseek-coder", "prompt": "def f(", "suffix": "return 1"}),
        )
        .await;
    assert_eq!((st, e["error"]["param"].as_str()), (422, Some("suffix")));
    // Models: DeepSeek's list shape.
    let m: Value = serde_json::from_str(&s.get("/v1/models").await).unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "deepseek-chat");
    // Tokenize / detokenize round trip.
    let (_, t) = s
        .json("/tokenize", None, json!({"prompt": "What is 2 + 2?"}))
        .await;
    let ids = t["tokens"].clone();
    assert_eq!(
        t["count"].as_u64().unwrap() as usize,
        ids.as_array().unwrap().len()
    );
    let (_, d) = s.json("/detokenize", None, json!({"tokens": ids})).await;
    assert!(d["prompt"].as_str().unwrap().ends_with("What is 2 + 2?"));
    assert!(s.get("/health").await.contains("\"ok\""));
}

#[test]
fn fim_prompt_is_psm_order_with_the_coder_tokens() {
    // The tiny tokenizer plus DeepSeek-Coder's three FIM tokens.
    let dir = tempfile::tempdir().unwrap();
    let src = model_dir();
    let mut tj: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    for (i, t) in ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
        .iter()
        .enumerate()
    {
        tj["added_tokens"].as_array_mut().unwrap().push(json!({"id": 400 + i, "content": t,
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = whale_model::open_tokenizer(dir.path()).unwrap().unwrap();
    let ids = whale_server::fim_prompt(&tok, "def f(", "return 1").unwrap();
    let mut want = vec![0, 400];
    want.extend(tok.encode("def f(", false).unwrap());
    want.push(401);
    want.extend(tok.encode("return 1", false).unwrap());
    want.push(402);
    assert_eq!(ids, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_and_the_server_keeps_serving() {
    let key = |k: &str, topped: i64, rpm: u32| KeyInfo {
        key: k.into(),
        name: k.into(),
        granted: 0,
        topped_up: topped,
        unlimited: false,
        rpm,
        tpm: 0,
    };
    let s = start(Opts {
        keys: vec![
            key("sk-rich", 10 * NANO, 0),
            key("sk-broke", 0, 0),
            key("sk-slow", NANO, 1),
        ],
        ..Default::default()
    })
    .await;
    let ok = json!({"model": "deepseek-chat", "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "user", "content": "What is 1 + 1?"}]});
    let check = |st: u16, v: &Value, code: u16| {
        assert_eq!(st, code, "{v}");
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    };
    // 401: no key, bad format, unknown key.
    let (st, v) = s.json("/chat/completions", None, ok.clone()).await;
    check(st, &v, 401);
    let (st, v) = s
        .json("/chat/completions", Some("sk-who"), ok.clone())
        .await;
    check(st, &v, 401);
    assert!(v["error"]["message"].as_str().unwrap().contains("****-who"));
    // 400: malformed JSON, missing field, unknown model.
    let (st, t) = s
        .post("/chat/completions", Some("sk-rich"), "{\"model\":")
        .await;
    check(st, &serde_json::from_str(&t).unwrap(), 400);
    let (st, v) = s
        .json(
            "/chat/completions",
            Some("sk-rich"),
            json!({"model": "deepseek-chat"}),
        )
        .await;
    check(st, &v, 400);
    let mut bad = ok.clone();
    bad["model"] = json!("gpt-4");
    let (st, v) = s.json("/chat/completions", Some("sk-rich"), bad).await;
    check(st, &v, 400);
    assert_eq!(v["error"]["message"], "Model Not Exist");
    // 400: over the context.
    let mut long = ok.clone();
    long["max_tokens"] = json!(4000);
    let (st, v) = s.json("/chat/completions", Some("sk-rich"), long).await;
    check(st, &v, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 2048"));
    // 422: a parameter out of range, named.
    let mut hot = ok.clone();
    hot["temperature"] = json!(3);
    let (st, v) = s.json("/chat/completions", Some("sk-rich"), hot).await;
    check(st, &v, 422);
    assert_eq!(v["error"]["param"], "temperature");
    // 402: no balance.
    let (st, v) = s
        .json("/chat/completions", Some("sk-broke"), ok.clone())
        .await;
    check(st, &v, 402);
    assert_eq!(v["error"]["message"], "Insufficient Balance");
    // 429: one request per minute.
    let (st, _) = s
        .json("/chat/completions", Some("sk-slow"), ok.clone())
        .await;
    assert_eq!(st, 200);
    let (st, v) = s
        .json("/chat/completions", Some("sk-slow"), ok.clone())
        .await;
    check(st, &v, 429);
    // 404 for unknown routes, same envelope.
    let (st, v) = s.json("/v1/nope", Some("sk-rich"), json!({})).await;
    check(st, &v, 404);
    // Still serving, and billing exactly: usage row and balance in one transaction.
    let (st, v) = s
        .json("/chat/completions", Some("sk-rich"), ok.clone())
        .await;
    assert_eq!(st, 200, "{v}");
    let u = &v["usage"];
    let cost = Prices::default().cost_nano(
        u["prompt_cache_hit_tokens"].as_u64().unwrap(),
        u["prompt_cache_miss_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    let k = s.ledger.key("sk-rich").unwrap().unwrap();
    assert_eq!(k.topped_up, 10 * NANO - cost);
    let usage = s.ledger.usage(Some("sk-rich")).unwrap();
    assert_eq!(usage[0].requests, 1);
    // Balance endpoint, DeepSeek's shape (amounts are strings).
    let b: Value = serde_json::from_str(
        &s.http
            .get(format!("{}/user/balance", s.base))
            .header("authorization", "Bearer sk-rich")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(b["is_available"], true);
    assert_eq!(b["balance_infos"][0]["currency"], "CNY");
    assert!(b["balance_infos"][0]["total_balance"]
        .as_str()
        .unwrap()
        .starts_with("9.99"));
    assert!(s.metric("whale_http_responses_total").await >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_503_and_keeps_serving() {
    let s = start(Opts {
        engine: EngineConfig {
            max_batch: 1,
            max_waiting: 1,
            total_pages: 256,
            prefill_chunk: 16,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // One long stream occupies the batch (a prompt of about 600 tokens prefilled 16 per
    // step, then 1000 tokens), a second waits, a third finds the queue full.
    let prompt = "Count the letter r in the word strawberry. ".repeat(50);
    let long = json!({"model": "deepseek-chat", "max_tokens": 1000, "ignore_eos": true, "stream": true,
        "messages": [{"role": "user", "content": prompt}]});
    let a = s.open_stream(&long).await;
    // `a` is admitted before `b` is sent (until then it counts as waiting too).
    let t = Instant::now();
    while s.metric("vllm:num_requests_running").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "first request never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = s.open_stream(&long).await;
    let (sa, sb) = (a.status().as_u16(), b.status().as_u16());
    if (sa, sb) != (200, 200) {
        panic!(
            "{sa} {}\n{sb} {}",
            a.text().await.unwrap(),
            b.text().await.unwrap()
        );
    }
    let t = Instant::now();
    assert_eq!(s.metric("vllm:num_requests_waiting").await, 1.0);
    let (st, v) = s.json("/chat/completions", None, long.clone()).await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "server_overloaded");
    // The queued stream hears `: keep-alive` comments while it waits.
    let mut b = b;
    let mut seen = String::new();
    while !seen.contains(": keep-alive\n\n") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no keep-alive: {seen}"
        );
        let c = b.chunk().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    assert_eq!(s.metric("vllm:num_requests_waiting").await, 1.0);
    drop(a);
    drop(b);
    // Both streams are gone: their pages come back and new requests are served.
    let t = Instant::now();
    while s.metric("whale_kv_pages_used").await - s.metric("whale_kv_pages_cached").await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(20), "pages never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, _) = s
        .json(
            "/chat/completions",
            None,
            json!({"model": "deepseek-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_frees_pages_and_bills_what_ran() {
    let s = start(Opts::default()).await;
    let body = json!({"model": "deepseek-chat", "max_tokens": 1800, "ignore_eos": true, "stream": true,
        "messages": [{"role": "user", "content": "What is 1 + 1?"}]});
    let mut resp = s.open_stream(&body).await;
    // Read a few chunks: the stream is running and holds its pages.
    let mut got = 0;
    while got < 5 {
        let c = resp.chunk().await.unwrap().unwrap();
        got += c.iter().filter(|&&b| b == b'\n').count() / 2;
    }
    let used = s.metric("whale_kv_pages_used").await;
    assert!(
        used >= 28.0,
        "1800 + prompt tokens reserve 29 pages, saw {used}"
    );
    assert_eq!(s.metric("vllm:num_requests_running").await, 1.0);
    drop(resp);
    let t = Instant::now();
    while s.metric("whale_kv_pages_used").await > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pages not freed after disconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.metric("vllm:num_requests_running").await, 0.0);
    assert_eq!(s.metric("vllm:kv_cache_usage_perc").await, 0.0);
    // The abandoned request is billed for what ran.
    let t = Instant::now();
    loop {
        let u = s.ledger.usage(None).unwrap();
        if let Some(u) = u.first() {
            assert!(u.completion >= 4 && u.completion < 1800, "{u:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_share_steps() {
    let s = start(Opts::default()).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let http = s.http.clone();
        let url = format!("{}/chat/completions", s.base);
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "deepseek-chat", "temperature": 0, "max_tokens": 40, "ignore_eos": true,
                "messages": [{"role": "user", "content": format!("What is {i} + 3?")}]});
            let r = http.post(url).body(body.to_string()).send().await.unwrap();
            let v: Value = serde_json::from_str(r.text().await.unwrap().trim()).unwrap();
            v["usage"]["completion_tokens"].as_u64().unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 40);
    }
    let steps = s.metric("whale_steps_total").await;
    let seqs = s.metric("whale_step_sequences_total").await;
    assert!(
        seqs / steps > 2.0,
        "mean batch {:.2} over {steps} steps",
        seqs / steps
    );
    assert_eq!(s.metric("vllm:generation_tokens_total").await, 240.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_and_json_schema_are_enforced() {
    let s = start(Opts::default()).await;
    let ask = |rf: Value, stream: bool| {
        json!({"model": "deepseek-chat", "temperature": 0, "max_tokens": 80, "stream": stream,
            "messages": [{"role": "user", "content": "What is 37 + 48? Answer in JSON."}],
            "response_format": rf})
    };
    // json_object: the answer is a JSON object.
    let (st, r) = s
        .json(
            "/chat/completions",
            None,
            ask(json!({"type": "json_object"}), false),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let doc: Value =
        serde_json::from_str(r["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(doc.is_object());
    // json_schema: every constraint of the schema holds.
    let schema = json!({"type": "object", "additionalProperties": false,
        "required": ["answer", "words", "flags", "mood"],
        "properties": {
            "answer": {"type": "integer", "minimum": 0, "maximum": 999},
            "words": {"type": "string", "maxLength": 10},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "mood": {"enum": ["happy", "sad"]}}});
    let rf = json!({"type": "json_schema", "json_schema": {"name": "sum", "strict": true, "schema": schema}});
    let (st, r) = s
        .json("/chat/completions", None, ask(rf.clone(), false))
        .await;
    assert_eq!(st, 200, "{r}");
    let text = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let o = doc.as_object().unwrap();
    assert_eq!(o.len(), 4, "{doc}");
    assert!(o["answer"].as_u64().unwrap() <= 999);
    assert!(o["words"].as_str().unwrap().chars().count() <= 10);
    let flags = o["flags"].as_array().unwrap();
    assert!(flags.len() <= 3 && flags.iter().all(Value::is_boolean));
    assert!(["happy", "sad"].contains(&o["mood"].as_str().unwrap()));
    // Streamed, the same document.
    let (_, sse) = s
        .post("/chat/completions", None, &ask(rf, true).to_string())
        .await;
    let streamed: String = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, text);
    // A schema llguidance cannot compile is a 422 on response_format.
    let bad =
        json!({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wat"}}});
    let (st, r) = s.json("/chat/completions", None, ask(bad, false)).await;
    assert_eq!(
        (st, r["error"]["param"].as_str()),
        (422, Some("response_format"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_forced_named_required_and_auto() {
    let s = start(Opts::default()).await;
    let tools = json!([
        {"type": "function", "function": {"name": "add", "description": "Add two numbers",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["a", "b"],
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                               "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
        {"type": "function", "function": {"name": "now"}}
    ]);
    let ask = |choice: Value, stream: bool| {
        json!({"model": "deepseek-chat", "temperature": 0, "max_tokens": 60, "stream": stream,
            "messages": [{"role": "user", "content": "What is 37 + 48?"}],
            "tools": tools, "tool_choice": choice})
    };
    // A named function: one call to it, arguments following its schema.
    let named = json!({"type": "function", "function": {"name": "add"}});
    let (st, r) = s
        .json("/chat/completions", None, ask(named.clone(), false))
        .await;
    assert_eq!(st, 200, "{r}");
    let ch = &r["choices"][0];
    assert_eq!(ch["finish_reason"], "tool_calls", "{r}");
    assert!(ch["message"]["content"].is_null());
    let calls = ch["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "add");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["a"].as_u64().unwrap() <= 99 && args["b"].as_u64().unwrap() <= 99);
    // The same through async-openai's typed response.
    let client = s.client("/v1", "sk-none");
    let typed: async_openai::types::chat::CreateChatCompletionResponse = client
        .chat()
        .create_byot(ask(named.clone(), false))
        .await
        .unwrap();
    assert_eq!(
        typed.choices[0].finish_reason,
        Some(FinishReason::ToolCalls)
    );
    assert_eq!(
        typed.choices[0].message.tool_calls.as_ref().unwrap().len(),
        1
    );
    // Streamed: no content deltas, one tool_calls delta, finish_reason tool_calls.
    let (_, sse) = s
        .post("/chat/completions", None, &ask(named, true).to_string())
        .await;
    let chunks: Vec<Value> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]).collect();
    assert!(deltas
        .iter()
        .all(|d| d["delta"]["content"].as_str().unwrap_or("").is_empty()));
    assert_eq!(
        deltas
            .iter()
            .filter(|d| d["delta"]["tool_calls"].is_array())
            .count(),
        1
    );
    assert_eq!(deltas.last().unwrap()["finish_reason"], "tool_calls");
    // required: at least one call, to one of the tools.
    let mut req = ask(json!("required"), false);
    req["max_tokens"] = json!(400);
    let (_, r) = s.json("/chat/completions", None, req).await;
    let calls = r["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    for c in calls {
        assert!(["add", "now"].contains(&c["function"]["name"].as_str().unwrap()));
        let _: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
    }
    // auto: the tiny model was never taught tools and answers in text.
    let (_, r) = s
        .json("/chat/completions", None, ask(json!("auto"), false))
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(r["choices"][0]["message"]["tool_calls"].is_null());
    // A function that is not in tools: 422 naming tool_choice.
    let (st, r) = s
        .json(
            "/chat/completions",
            None,
            ask(
                json!({"type": "function", "function": {"name": "mul"}}),
                false,
            ),
        )
        .await;
    assert_eq!(
        (st, r["error"]["param"].as_str()),
        (422, Some("tool_choice"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_time_limit_is_closed_and_its_pages_freed() {
    let s = start(Opts {
        max_request_time: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let body = json!({"model": "deepseek-chat", "max_tokens": 1900, "ignore_eos": true, "stream": true,
        "messages": [{"role": "user", "content": "What is 1 + 1?"}]});
    let t = Instant::now();
    let (st, text) = s.post("/chat/completions", None, &body.to_string()).await;
    assert_eq!(st, 200);
    assert!(!text.contains("[DONE]"), "the stream was cut, not finished");
    assert!(t.elapsed() < Duration::from_secs(20));
    let t = Instant::now();
    while s.metric("whale_kv_pages_used").await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(20), "pages not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_count_tokens_used_and_answers_carry_request_ids() {
    let key = |k: &str, tpm: u32| KeyInfo {
        key: k.into(),
        name: k.into(),
        granted: 0,
        topped_up: 10 * NANO,
        unlimited: false,
        rpm: 0,
        tpm,
    };
    let s = start(Opts {
        keys: vec![key("sk-any", 0)],
        ..Default::default()
    })
    .await;
    let ask = |max_tokens: u64| {
        json!({"model": "deepseek-chat", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "What is 37 + 48?"}]})
    };
    let (st, v) = s.json("/chat/completions", Some("sk-any"), ask(100)).await;
    assert_eq!(st, 200, "{v}");
    let p = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let c = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(c < 100, "the answer ends before max_tokens");
    // Room for two requests counted at their most (prompt + max_tokens) but one token
    // short: the second passes only if the first was settled at what it used.
    let tpm = 2 * (p + 100) - 1;
    s.ledger.add_key(&key("sk-tpm", tpm as u32)).unwrap();
    for _ in 0..2 {
        let (st, v) = s.json("/chat/completions", Some("sk-tpm"), ask(100)).await;
        assert_eq!(st, 200, "{v}");
    }
    // A request that cannot fit is refused, and the message counts the tokens used.
    let (st, v) = s
        .json("/chat/completions", Some("sk-tpm"), ask(tpm - p))
        .await;
    assert_eq!(st, 429, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("({} used in the last minute", 2 * (p + c))),
        "{msg}"
    );
    // x-request-id: the client's own is echoed, else the server makes one.
    let r = s
        .http
        .get(format!("{}/v1/models", s.base))
        .header("authorization", "Bearer sk-any")
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    let r = s
        .http
        .get(format!("{}/v1/nope", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let id = r.headers()["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
}
