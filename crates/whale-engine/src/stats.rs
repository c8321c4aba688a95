//! Engine counters and latency histograms, read by the server's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds (Prometheus style), in seconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets.
    pub bounds: Vec<f64>,
    /// Observations at or below each bound (not cumulative; see [`Histogram::cumulative`]).
    pub counts: Vec<u64>,
    /// Observations above the last bound are only in `count`.
    pub count: u64,
    /// Sum of all observations.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    /// Counts at or below each bound.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.counts
            .iter()
            .map(|c| {
                acc += c;
                acc
            })
            .collect()
    }
}

/// Live numbers of one engine.
#[derive(Debug)]
pub struct EngineStats {
    /// Requests waiting for admission.
    pub waiting: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    /// KV pages held (running sequences and the prefix cache).
    pub pages_used: AtomicU64,
    /// KV pages in the pool.
    pub pages_total: AtomicU64,
    /// KV pages held by the prefix cache.
    pub pages_cached: AtomicU64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens served from the prefix cache.
    pub prompt_cache_hit_tokens: AtomicU64,
    /// Of those, tokens read back from the prefix cache's disk tier.
    pub prompt_cache_disk_hit_tokens: AtomicU64,
    /// Generated tokens.
    pub generation_tokens: AtomicU64,
    /// Requests finished, by reason: stop, length, resource/cancelled.
    pub finished_stop: AtomicU64,
    /// Requests that ended at max_tokens.
    pub finished_length: AtomicU64,
    /// Requests ended early (engine resources) or abandoned by their client.
    pub finished_aborted: AtomicU64,
    /// Model steps run.
    pub steps: AtomicU64,
    /// Sum over steps of the sequences each step carried.
    pub step_sequences: AtomicU64,
    /// Time to first token.
    pub ttft: Mutex<Histogram>,
    /// Time between tokens of one stream.
    pub itl: Mutex<Histogram>,
    /// Whole-request latency.
    pub e2e: Mutex<Histogram>,
}

const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BOUNDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0,
];

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            pages_used: AtomicU64::new(0),
            pages_total: AtomicU64::new(0),
            pages_cached: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            prompt_cache_hit_tokens: AtomicU64::new(0),
            prompt_cache_disk_hit_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished_stop: AtomicU64::new(0),
            finished_length: AtomicU64::new(0),
            finished_aborted: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            step_sequences: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(TTFT_BOUNDS)),
            itl: Mutex::new(Histogram::new(ITL_BOUNDS)),
            e2e: Mutex::new(Histogram::new(E2E_BOUNDS)),
        }
    }
}

impl EngineStats {
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    pub(crate) fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }

    pub(crate) fn observe(h: &Mutex<Histogram>, v: f64) {
        if let Ok(mut h) = h.lock() {
            h.observe(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.cumulative(), vec![2, 3]);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 6.0);
    }
}
