//! Continuous batching: many requests share every model step.
//!
//! One engine thread owns the model's step loop. Each step it takes in new
//! requests, admits waiting ones whose KV pages can be reserved, and runs one
//! [`DeepseekModel::forward_batch`] over every running sequence: one token for each
//! decoding stream plus a chunk of at most `prefill_chunk` prompt tokens for
//! sequences still prefilling, so long prompts never stall running streams.
//! Sequences join and leave between steps. A request whose receiver is dropped
//! (the client went away) is removed at the next step and its pages freed.

use crate::disk::{DiskCache, DiskCacheConfig, DiskHit};
use crate::generate::{FinishReason, TextOut};
use crate::pages::{occupancy, Occupancy, PagePool, PrefixCache};
use crate::sampler::{Sampler, SamplingParams};
use crate::stats::EngineStats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use whale_model::{BatchItem, DeepseekModel, LatentCache, Logits, Tokenizer};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most requests waiting for admission; more are refused ([`SubmitError::QueueFull`]).
    pub max_waiting: usize,
    /// Tokens per KV page; the engine uses the cache's page size
    /// ([`whale_model::PAGE_TOKENS`], 64) whatever this says.
    pub page_tokens: usize,
    /// Pages in the KV pool.
    pub total_pages: usize,
    /// Most prompt tokens prefilled in one step (over all prefilling sequences) when
    /// no stream is decoding: 512 lets sixteen short prompts that arrive together
    /// start in one step (at 256 a second step carried the rest of them, stalling the
    /// first twelve streams' first decode).
    pub prefill_chunk: usize,
    /// Most prompt tokens per step while streams are decoding. A CPU prefills a few
    /// tens of tokens per second, so each prefill step stalls the running streams;
    /// measured on 2 cores (BENCHMARKS.md), 16-token chunks stalled them more often and
    /// doubled time to first token, so the default is 256.
    pub prefill_chunk_decoding: usize,
    /// Keep finished requests' caches for reuse by prompts with the same prefix.
    pub prefix_cache: bool,
    /// When a request reaches an idle engine, how long it may wait for others that
    /// arrive with it (a client opening several streams at once) so that they all
    /// start in the first step: on a CPU a step with a prompt in it takes seconds, and
    /// a stream admitted one step late has its prompt chunk stall the others' decoding.
    /// `Duration::ZERO` starts at once.
    pub gather_window: Duration,
    /// Within the window, the gathering stops once no request has come for this long
    /// (so a lone request waits only this).
    pub gather_gap: Duration,
    /// The prefix cache's disk tier ([`DiskCache`]): finished requests' pages are
    /// also written there, and read back for prompts whose prefix memory no longer
    /// holds. `None` keeps prefixes in memory only.
    pub disk_cache: Option<DiskCacheConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 16,
            max_waiting: 256,
            page_tokens: 64,
            total_pages: 1024,
            prefill_chunk: 512,
            prefill_chunk_decoding: 256,
            prefix_cache: true,
            gather_window: Duration::from_millis(100),
            gather_gap: Duration::from_millis(10),
            disk_cache: None,
        }
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt ids (BOS and template included).
    pub prompt: Vec<u32>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation (not included in the text).
    pub stop: Vec<String>,
    /// Log-probabilities to return per token: `None` none, `Some(k)` the chosen token's
    /// and the `k` most likely.
    pub logprobs: Option<usize>,
    /// Prefix-cache isolation scope (the API key).
    pub cache_scope: String,
    /// Drop special tokens from the text (false keeps e.g. tool-call markers).
    pub skip_special: bool,
    /// A grammar the output must follow (JSON mode, JSON schema).
    pub constraint: Option<crate::grammar::Constraint>,
    /// When the request arrived (for time to first token).
    pub arrival: Instant,
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub id: u32,
    /// Its natural-log probability under the model (before sampling filters).
    pub logprob: f32,
    /// The most likely tokens and theirs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Token usage of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (hit + miss).
    pub prompt_tokens: usize,
    /// Prompt tokens whose latents came from the prefix cache.
    pub prompt_cache_hit_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

impl Usage {
    /// Prompt tokens that were computed.
    pub fn prompt_cache_miss_tokens(&self) -> usize {
        self.prompt_tokens - self.prompt_cache_hit_tokens
    }
}

/// What the engine tells a request's owner.
#[derive(Clone, Debug)]
pub enum Event {
    /// Admitted: pages reserved, prefill starts.
    Started {
        /// Prompt tokens reused from the prefix cache.
        prompt_cache_hit_tokens: usize,
    },
    /// A generated token and the text it completes (possibly empty: text is held back
    /// while it could still become a stop string or an incomplete character).
    Token {
        /// Token id.
        id: u32,
        /// New text.
        text: String,
        /// Log-probabilities when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// Done; nothing follows.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Text still held back, released at the end.
        text: String,
        /// Token counts.
        usage: Usage,
    },
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Too many requests wait already.
    #[error("the server is overloaded: {0} requests are waiting")]
    QueueFull(usize),
    /// The request can never fit the KV pool.
    #[error("the request needs {need} KV pages but the pool has {total}")]
    TooLarge {
        /// Pages it needs.
        need: usize,
        /// Pages in the pool.
        total: usize,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

struct Job {
    req: Request,
    tx: UnboundedSender<Event>,
    /// The disk tier failed to read this request's prefix once: admit it without.
    disk_tried: bool,
}

/// A handle to a running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
    alive: Arc<AtomicBool>,
    vocab_size: usize,
}

impl Engine {
    /// Starts the engine thread over `model` and `tokenizer`.
    pub fn start(
        model: Arc<DeepseekModel>,
        tokenizer: Arc<Tokenizer>,
        mut cfg: EngineConfig,
    ) -> Self {
        cfg.page_tokens = whale_model::PAGE_TOKENS;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        EngineStats::set(&stats.pages_total, cfg.total_pages as u64);
        let alive = Arc::new(AtomicBool::new(true));
        let vocab_size = model.config().vocab_size;
        let (s2, c2, a2) = (stats.clone(), cfg.clone(), alive.clone());
        std::thread::Builder::new()
            .name("whale-engine".into())
            .spawn(move || {
                let mut core = Core::new(&model, &tokenizer, c2, s2);
                core.run(rx);
                a2.store(false, Ordering::Relaxed);
            })
            .expect("spawn the engine thread");
        Engine {
            tx,
            stats,
            cfg,
            alive,
            vocab_size,
        }
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request and frees its pages.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        if !self.alive.load(Ordering::Relaxed) {
            return Err(SubmitError::Stopped);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        req.sampling.validate().map_err(SubmitError::Invalid)?;
        let need = (req.prompt.len() + req.max_tokens).div_ceil(self.cfg.page_tokens);
        if need > self.cfg.total_pages {
            return Err(SubmitError::TooLarge {
                need,
                total: self.cfg.total_pages,
            });
        }
        let waiting = EngineStats::get(&self.stats.waiting) as usize;
        if waiting >= self.cfg.max_waiting {
            return Err(SubmitError::QueueFull(waiting));
        }
        EngineStats::add(&self.stats.waiting, 1);
        let (tx, rx) = unbounded_channel();
        let job = Job {
            req,
            tx,
            disk_tried: false,
        };
        self.tx.send(job).map_err(|_| {
            self.stats
                .waiting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            SubmitError::Stopped
        })?;
        Ok(rx)
    }

    /// Rows of the model's logits.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
}

struct Seq<'t> {
    job: Job,
    cache: LatentCache,
    /// Tokens not yet run through the model (prompt remainder, then the last sample).
    feed: Vec<u32>,
    /// Tokens whose latents are in `cache`, in order.
    fed: Vec<u32>,
    output: Vec<u32>,
    sampler: Sampler,
    text: TextOut<'t>,
    /// Pages reserved: for the prompt and `max_tokens`, shared prefix pages included.
    pages: usize,
    hit: usize,
    last_token_at: Option<Instant>,
}

/// An admitted request whose prefix is being read back from the disk tier on a
/// thread of its own, while the running streams go on stepping.
struct Loading {
    job: Job,
    /// Prompt tokens the read brings (whole pages).
    tokens: usize,
    /// Pages reserved for the request (the read's included), none held until the
    /// read ends.
    pages: usize,
    done: mpsc::Receiver<std::io::Result<LatentCache>>,
    started: Instant,
}

struct Core<'m> {
    model: &'m DeepseekModel,
    tok: &'m Tokenizer,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    pool: PagePool,
    prefix: PrefixCache,
    disk: Option<Arc<DiskCache>>,
    waiting: VecDeque<Job>,
    loading: Vec<Loading>,
    running: Vec<Seq<'m>>,
}

impl<'m> Core<'m> {
    fn new(
        model: &'m DeepseekModel,
        tok: &'m Tokenizer,
        cfg: EngineConfig,
        stats: Arc<EngineStats>,
    ) -> Self {
        let disk = cfg.disk_cache.clone().and_then(|d| {
            let dir = d.dir.clone();
            DiskCache::open(d, &model.new_cache())
                .inspect_err(|e| {
                    tracing::error!("prefix disk cache at {}: {e}; memory only", dir.display())
                })
                .ok()
                .map(Arc::new)
        });
        if let Some(d) = &disk {
            let (files, bytes) = d.usage();
            tracing::info!(
                "prefix disk cache at {}: {files} prefixes, {:.2} GB",
                d.dir().display(),
                bytes as f64 / 1e9
            );
        }
        Core {
            model,
            tok,
            pool: PagePool::new(cfg.total_pages, cfg.page_tokens),
            cfg,
            stats,
            prefix: PrefixCache::default(),
            disk,
            waiting: VecDeque::new(),
            loading: Vec::new(),
            running: Vec::new(),
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && self.loading.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
                self.gather(&rx);
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.drop_cancelled();
            self.finish_loads();
            self.admit();
            self.publish();
            if self.running.is_empty() {
                // Reads from disk under way, or nothing admissible (cannot happen with
                // the size check at submit, but never spin): look again shortly.
                if !self.loading.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                } else if !self.waiting.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                continue;
            }
            // A bug in a step must not take the server down: the step's sequences end
            // with `insufficient_system_resource` and the engine goes on.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if stepped.is_err() {
                tracing::error!(
                    "a model step panicked; ending its {} requests",
                    self.running.len()
                );
                for s in std::mem::take(&mut self.running) {
                    self.finish(s, FinishReason::InsufficientResource);
                }
            }
            self.publish();
        }
    }

    /// Takes in the requests that follow the first one to an idle engine closely (each
    /// within `gather_gap` of the last, all within `gather_window`), up to a full batch.
    fn gather(&mut self, rx: &mpsc::Receiver<Job>) {
        let end = Instant::now() + self.cfg.gather_window;
        while self.waiting.len() < self.cfg.max_batch {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match rx.recv_timeout(self.cfg.gather_gap.min(left)) {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return, // quiet for a gap, or the engine is shutting down
            }
        }
    }

    fn publish(&self) {
        // `waiting` is counted up by `submit` and down here as jobs leave the queue, so
        // it never misses a job still in the channel.
        let s = &self.stats;
        // A request whose prefix is being read from disk is admitted: it holds pages.
        EngineStats::set(&s.running, (self.running.len() + self.loading.len()) as u64);
        let occ = self.occupancy(None);
        EngineStats::set(&s.pages_used, occ.used as u64);
        EngineStats::set(&s.pages_cached, occ.cached as u64);
    }

    /// Pages in use by the running sequences and the prefix cache, with `pending` (a
    /// prefix hit about to be admitted) counted as running.
    fn occupancy(&self, pending: Option<&LatentCache>) -> Occupancy {
        let running = self.running.iter().map(|s| (&s.cache, s.pages));
        occupancy(
            running.chain(pending.map(|c| (c, 0))),
            self.loading.iter().map(|l| l.pages).sum(),
            self.prefix.caches(),
        )
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.tx.is_closed());
        let mut gone = before - self.waiting.len();
        self.stats.waiting.fetch_sub(gone as u64, Ordering::Relaxed);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.tx.is_closed() {
                self.running.swap_remove(i);
                gone += 1;
            } else {
                i += 1;
            }
        }
        EngineStats::add(&self.stats.finished_aborted, gone as u64);
    }

    fn admit(&mut self) {
        while self.running.len() + self.loading.len() < self.cfg.max_batch {
            let Some(job) = self.waiting.front() else {
                return;
            };
            let need = self
                .pool
                .pages_for(job.req.prompt.len() + job.req.max_tokens);
            // Look the prefix up before evicting for room: a hit shares the entry's pages,
            // so evicting that entry next loses nothing.
            let hit = if self.cfg.prefix_cache {
                self.prefix.lookup(
                    &job.req.cache_scope,
                    &job.req.prompt,
                    self.pool.page_tokens(),
                )
            } else {
                None
            };
            if self.cfg.prefix_cache && !job.disk_tried {
                if let Some(found) = self.disk_hit(need, hit.as_ref().map_or(0, |h| h.tokens)) {
                    let job = self.waiting.pop_front().expect("front exists");
                    self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                    self.start_load(job, found, need);
                    continue;
                }
            }
            // The hit's pages are in memory already: the request needs pages for the
            // tokens after them only. Cached entries give way, oldest first; evicting
            // one whose pages are shared (the hit's own included) frees nothing.
            let fresh = need - hit.as_ref().map_or(0, |h| h.cache.pages()).min(need);
            let fits = |st: &Self| {
                let occ = st.occupancy(hit.as_ref().map(|h| &h.cache));
                occ.used + fresh <= st.pool.total()
            };
            while !fits(self) && self.prefix.evict_one() {}
            if !fits(self) {
                return; // first come, first served: later requests wait too
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let (cache, hit) = match hit {
                Some(h) => (h.cache, h.tokens),
                None => (self.model.new_cache(), 0),
            };
            self.start_seq(job, cache, hit, need);
        }
    }

    /// Puts an admitted request into the running batch, its first `hit` prompt tokens'
    /// latents already in `cache`, `need` pages reserved.
    fn start_seq(&mut self, job: Job, cache: LatentCache, hit: usize, need: usize) {
        let s = &self.stats;
        EngineStats::add(&s.prompt_tokens, job.req.prompt.len() as u64);
        EngineStats::add(&s.prompt_cache_hit_tokens, hit as u64);
        let _ = job.tx.send(Event::Started {
            prompt_cache_hit_tokens: hit,
        });
        let seq = Seq {
            feed: job.req.prompt[hit..].to_vec(),
            fed: job.req.prompt[..hit].to_vec(),
            output: Vec::new(),
            sampler: Sampler::new(job.req.sampling.clone()),
            text: TextOut::new(self.tok, job.req.skip_special, &job.req.stop),
            pages: need,
            hit,
            last_token_at: None,
            cache,
            job,
        };
        self.running.push(seq);
    }

    /// Starts reading `found` for `job` (admitted, `need` pages reserved) on a thread
    /// of its own; [`Self::finish_loads`] takes the result.
    fn start_load(&mut self, job: Job, found: DiskHit, need: usize) {
        let Some(disk) = self.disk.clone() else {
            return self.retry_without_disk(job);
        };
        let (tx, done) = mpsc::channel();
        let empty = self.model.new_cache();
        let tokens = found.tokens;
        let spawned = std::thread::Builder::new()
            .name("whale-kv-read".into())
            .spawn(move || {
                let _ = tx.send(disk.load(&found, empty));
            });
        if let Err(e) = spawned {
            tracing::warn!("prefix disk cache: cannot start a read: {e}");
            return self.retry_without_disk(job);
        }
        self.loading.push(Loading {
            tokens,
            pages: need,
            done,
            started: Instant::now(),
            job,
        });
    }

    /// Moves each finished read's request into the running batch (its prefix read) or
    /// back to the front of the queue (the read failed: it is admitted again without
    /// the disk tier). A request whose client left meanwhile is dropped.
    fn finish_loads(&mut self) {
        let mut i = 0;
        while i < self.loading.len() {
            let got = match self.loading[i].done.try_recv() {
                Ok(r) => r,
                Err(mpsc::TryRecvError::Empty) => {
                    i += 1;
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    Err(std::io::Error::other("the reading thread ended early"))
                }
            };
            let l = self.loading.swap_remove(i);
            if l.job.tx.is_closed() {
                EngineStats::add(&self.stats.finished_aborted, 1);
                continue;
            }
            match got {
                Ok(cache) => {
                    tracing::debug!(
                        "prefix disk cache: {} tokens read in {:.3} s",
                        l.tokens,
                        l.started.elapsed().as_secs_f64()
                    );
                    EngineStats::add(&self.stats.prompt_cache_disk_hit_tokens, l.tokens as u64);
                    self.start_seq(l.job, cache, l.tokens, l.pages);
                }
                Err(e) => {
                    tracing::warn!("prefix disk cache: reading a prefix: {e}");
                    self.retry_without_disk(l.job);
                }
            }
        }
    }

    /// Queues `job` again, first in line, to be admitted without the disk tier.
    fn retry_without_disk(&mut self, mut job: Job) {
        job.disk_tried = true;
        self.waiting.push_front(job);
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// A longer prefix than memory's `mem_tokens` for the waiting front request on the
    /// disk tier, when the pool can hold the request's `need` pages with the rest
    /// (cached entries giving way): its pages are new memory. The caller reads it on
    /// another thread ([`Self::start_load`]): ~2 MB per 64-token page of V2-Lite (a
    /// 1216-token prefix is a 38 MB file), which running streams need not wait for.
    fn disk_hit(&mut self, need: usize, mem_tokens: usize) -> Option<DiskHit> {
        let job = self.waiting.front()?;
        let found = self
            .disk
            .as_ref()?
            .lookup(&job.req.cache_scope, &job.req.prompt)
            .filter(|d| d.tokens > mem_tokens)?;
        let fits = |st: &Self| st.occupancy(None).used + need <= st.pool.total();
        while !fits(self) && self.prefix.evict_one() {}
        fits(self).then_some(found)
    }

    fn step(&mut self) {
        // Decode rows first (one token each), then prompt chunks in arrival order.
        let decoding = self.running.iter().any(|s| !s.output.is_empty());
        let mut budget = if decoding {
            self.cfg.prefill_chunk_decoding
        } else {
            self.cfg.prefill_chunk
        }
        .max(1);
        let mut take: Vec<usize> = Vec::with_capacity(self.running.len());
        for s in &self.running {
            let prefilling = s.output.is_empty();
            let n = if !prefilling {
                s.feed.len()
            } else {
                let n = s.feed.len().min(budget);
                budget -= n;
                n
            };
            take.push(n);
        }
        let mut items = Vec::with_capacity(self.running.len());
        let mut which = Vec::with_capacity(self.running.len());
        for (i, (s, &n)) in self.running.iter_mut().zip(&take).enumerate() {
            if n == 0 {
                continue;
            }
            let last = n == s.feed.len();
            items.push(BatchItem {
                tokens: &s.feed[..n],
                cache: &mut s.cache,
                logits: if last { Logits::Last } else { Logits::None },
            });
            which.push(i);
        }
        let rows = items.len();
        let tokens_fed: usize = take.iter().sum();
        let started = std::time::Instant::now();
        let result = self.model.forward_batch(&mut items);
        drop(items);
        tracing::debug!(
            rows,
            tokens = tokens_fed,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        EngineStats::add(&self.stats.steps, 1);
        EngineStats::add(&self.stats.step_sequences, rows as u64);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("model step failed: {e}");
                // Every sequence in the step is ended; the engine keeps serving.
                for &i in which.iter().rev() {
                    let s = self.running.swap_remove(i);
                    self.finish(s, FinishReason::InsufficientResource);
                }
                return;
            }
        };
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        for (&i, row) in which.iter().zip(logits) {
            let n = take[i];
            let s = &mut self.running[i];
            let fed: Vec<u32> = s.feed.drain(..n).collect();
            s.fed.extend_from_slice(&fed);
            if !s.feed.is_empty() {
                continue; // prefill continues next step
            }
            if let Some(r) = Self::sample(s, row, &self.stats) {
                done.push((i, r));
            }
        }
        done.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, r) in done {
            let s = self.running.swap_remove(i);
            self.finish(s, r);
        }
    }

    /// Samples the next token of `s` from `logits`, sends it; returns a finish reason if it ends.
    fn sample(s: &mut Seq<'_>, mut logits: Vec<f32>, stats: &EngineStats) -> Option<FinishReason> {
        let logprob = s.job.req.logprobs.map(|k| (log_softmax(&logits), k));
        if let Some(c) = s.job.req.constraint.as_mut() {
            if !c.mask(&mut logits) {
                return Some(FinishReason::Stop);
            }
        }
        let next = s.sampler.sample(&mut logits, &s.job.req.prompt, &s.output);
        s.output.push(next);
        EngineStats::add(&stats.generation_tokens, 1);
        let now = Instant::now();
        match s.last_token_at {
            None => EngineStats::observe(
                &stats.ttft,
                now.duration_since(s.job.req.arrival).as_secs_f64(),
            ),
            Some(t) => EngineStats::observe(&stats.itl, now.duration_since(t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        let lp = logprob.map(|(lp, k)| TokenLogprob {
            id: next,
            logprob: lp[next as usize],
            top: top_k(&lp, k),
        });
        if s.job.req.stop_token_ids.contains(&next) {
            let _ = s.job.tx.send(Event::Token {
                id: next,
                text: String::new(),
                logprob: lp,
            });
            return Some(FinishReason::Stop);
        }
        let text = s.text.push(next).unwrap_or_else(|e| {
            tracing::error!("detokenizing {next}: {e}");
            String::new()
        });
        let _ = s.job.tx.send(Event::Token {
            id: next,
            text,
            logprob: lp,
        });
        if s.text.stopped() {
            return Some(FinishReason::Stop);
        }
        if let Some(c) = s.job.req.constraint.as_mut() {
            // A token the grammar refuses cannot be sampled (it was masked); a
            // complete document ends the answer.
            if c.consume(next).is_err() || c.is_done() {
                return Some(FinishReason::Stop);
            }
        }
        if s.output.len() >= s.job.req.max_tokens {
            return Some(FinishReason::Length);
        }
        s.feed.push(next);
        None
    }

    fn finish(&mut self, mut s: Seq<'m>, reason: FinishReason) {
        let text = s.text.finish().unwrap_or_else(|e| {
            tracing::error!("detokenizing the end of an answer: {e}");
            String::new()
        });
        let usage = Usage {
            prompt_tokens: s.job.req.prompt.len(),
            prompt_cache_hit_tokens: s.hit,
            completion_tokens: s.output.len(),
        };
        let st = &self.stats;
        match reason {
            FinishReason::Stop => EngineStats::add(&st.finished_stop, 1),
            FinishReason::Length => EngineStats::add(&st.finished_length, 1),
            FinishReason::InsufficientResource => EngineStats::add(&st.finished_aborted, 1),
        }
        EngineStats::observe(&st.e2e, s.job.req.arrival.elapsed().as_secs_f64());
        let _ = s.job.tx.send(Event::Finished {
            reason,
            text,
            usage,
        });
        if self.cfg.prefix_cache && reason != FinishReason::InsufficientResource {
            let scope = std::mem::take(&mut s.job.req.cache_scope);
            if let Some(d) = &self.disk {
                d.store(&scope, s.fed.clone(), s.cache.clone());
            }
            self.prefix
                .insert(&scope, s.fed, s.cache, self.pool.page_tokens());
        }
    }
}

/// Natural-log softmax of a row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `k` largest entries of `v` as `(index, value)`, largest first (ties: lower index).
pub fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in v.iter().enumerate() {
        if best.len() == k && x <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= x);
        best.insert(at, (i as u32, x));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_low() {
        assert_eq!(
            top_k(&[0.1, 0.5, 0.5, -1.0, 0.9], 3),
            vec![(4, 0.9), (1, 0.5), (2, 0.5)]
        );
        assert!(top_k(&[1.0], 0).is_empty());
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![(1, 2.0), (0, 1.0)]);
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }
}
