//! `GET /metrics`: Prometheus text with vLLM's metric names (so routers and
//! dashboards built for vLLM read whale) and `whale_*` names beside them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use whale_engine::{EngineStats, Histogram};

/// HTTP-level counters kept by the server.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Requests answered with 2xx.
    pub ok: AtomicU64,
    /// Answers by error status: 400, 401, 402, 404, 422, 429, 500, 503.
    pub errors: [AtomicU64; 8],
}

/// The statuses counted in [`HttpStats::errors`], in order.
pub const ERROR_CODES: [u16; 8] = [400, 401, 402, 404, 422, 429, 500, 503];

impl HttpStats {
    /// Counts one answer.
    pub fn count(&self, status: u16) {
        if (200..300).contains(&status) {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else if let Some(i) = ERROR_CODES.iter().position(|&c| c == status) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, labels: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {v}"
    );
}

fn family(out: &mut String, name: &str, help: &str, series: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, v) in series {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (b, c) in h.bounds.iter().zip(h.cumulative()) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Renders every metric.
pub fn render(model: &str, s: &EngineStats, http: &HttpStats) -> String {
    let labels = format!("model_name=\"{}\"", model.replace('"', "'"));
    let l = labels.as_str();
    let g = EngineStats::get;
    let mut o = String::new();
    let total = g(&s.pages_total).max(1) as f64;
    let usage = g(&s.pages_used) as f64 / total;
    gauge(
        &mut o,
        "vllm:num_requests_running",
        "Requests in the running batch.",
        l,
        g(&s.running) as f64,
    );
    gauge(
        &mut o,
        "vllm:num_requests_waiting",
        "Requests waiting for admission.",
        l,
        g(&s.waiting) as f64,
    );
    gauge(
        &mut o,
        "vllm:kv_cache_usage_perc",
        "Fraction of KV pages in use (1 = full).",
        l,
        usage,
    );
    gauge(
        &mut o,
        "vllm:gpu_cache_usage_perc",
        "Older name of vllm:kv_cache_usage_perc.",
        l,
        usage,
    );
    counter(
        &mut o,
        "vllm:prompt_tokens_total",
        "Prompt tokens of admitted requests.",
        l,
        g(&s.prompt_tokens),
    );
    counter(
        &mut o,
        "vllm:generation_tokens_total",
        "Generated tokens.",
        l,
        g(&s.generation_tokens),
    );
    counter(
        &mut o,
        "vllm:prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache.",
        l,
        g(&s.prompt_tokens),
    );
    counter(
        &mut o,
        "vllm:prefix_cache_hits_total",
        "Prompt tokens found in the prefix cache.",
        l,
        g(&s.prompt_cache_hit_tokens),
    );
    let finished: Vec<(String, u64)> = [
        ("stop", &s.finished_stop),
        ("length", &s.finished_length),
        ("abort", &s.finished_aborted),
    ]
    .iter()
    .map(|(r, c)| (format!("{l},finished_reason=\"{r}\""), g(c)))
    .collect();
    family(
        &mut o,
        "vllm:request_success_total",
        "Finished requests by finish reason.",
        &finished,
    );
    let lock = |h: &std::sync::Mutex<Histogram>| {
        h.lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    };
    let ttft = lock(&s.ttft);
    let itl = lock(&s.itl);
    let e2e = lock(&s.e2e);
    histogram(
        &mut o,
        "vllm:time_to_first_token_seconds",
        "Time from arrival to the first generated token.",
        l,
        &ttft,
    );
    histogram(
        &mut o,
        "vllm:inter_token_latency_seconds",
        "Time between tokens of a stream.",
        l,
        &itl,
    );
    histogram(
        &mut o,
        "vllm:time_per_output_token_seconds",
        "Older name of vllm:inter_token_latency_seconds.",
        l,
        &itl,
    );
    histogram(
        &mut o,
        "vllm:e2e_request_latency_seconds",
        "Time from arrival to the last token.",
        l,
        &e2e,
    );
    gauge(
        &mut o,
        "whale_requests_running",
        "Sequences in the running batch.",
        l,
        g(&s.running) as f64,
    );
    gauge(
        &mut o,
        "whale_requests_waiting",
        "Requests waiting for KV pages or a batch slot.",
        l,
        g(&s.waiting) as f64,
    );
    gauge(
        &mut o,
        "whale_kv_pages_used",
        "KV pages held by running sequences and the prefix cache.",
        l,
        g(&s.pages_used) as f64,
    );
    gauge(
        &mut o,
        "whale_kv_pages_cached",
        "KV pages held by the prefix cache (evictable).",
        l,
        g(&s.pages_cached) as f64,
    );
    gauge(
        &mut o,
        "whale_kv_pages_total",
        "KV pages in the pool.",
        l,
        g(&s.pages_total) as f64,
    );
    counter(
        &mut o,
        "whale_prompt_tokens_total",
        "Prompt tokens of admitted requests.",
        l,
        g(&s.prompt_tokens),
    );
    counter(
        &mut o,
        "whale_prompt_cache_hit_tokens_total",
        "Prompt tokens served from the prefix cache.",
        l,
        g(&s.prompt_cache_hit_tokens),
    );
    counter(
        &mut o,
        "whale_prompt_cache_disk_hit_tokens_total",
        "Prompt tokens read back from the prefix cache's disk tier (part of the hits).",
        l,
        g(&s.prompt_cache_disk_hit_tokens),
    );
    counter(
        &mut o,
        "whale_generation_tokens_total",
        "Generated tokens.",
        l,
        g(&s.generation_tokens),
    );
    counter(
        &mut o,
        "whale_steps_total",
        "Model steps run.",
        l,
        g(&s.steps),
    );
    let (calls, experts, rows) = whale_model::moe_counters();
    counter(
        &mut o,
        "whale_moe_layer_calls_total",
        "MoE layer evaluations (one per MoE layer per step).",
        l,
        calls,
    );
    counter(
        &mut o,
        "whale_moe_experts_touched_total",
        "Distinct routed experts read, summed over MoE layer evaluations.",
        l,
        experts,
    );
    counter(
        &mut o,
        "whale_moe_token_rows_total",
        "Token rows through MoE layers.",
        l,
        rows,
    );
    counter(
        &mut o,
        "whale_step_sequences_total",
        "Sum over steps of the sequences in each step.",
        l,
        g(&s.step_sequences),
    );
    let mut statuses = vec![(
        format!("{l},status=\"2xx\""),
        http.ok.load(Ordering::Relaxed),
    )];
    for (code, c) in ERROR_CODES.iter().zip(&http.errors) {
        statuses.push((format!("{l},status=\"{code}\""), c.load(Ordering::Relaxed)));
    }
    family(
        &mut o,
        "whale_http_responses_total",
        "HTTP answers by status.",
        &statuses,
    );
    o
}
