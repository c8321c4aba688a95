//! `whale bench`: prompt processing and generation speed with llama-bench's meaning of
//! depth (both measurements start with `depth` tokens already in the cache).

use anyhow::{bail, Result};
use serde_json::json;
use std::time::Instant;
use whale_model::{BatchItem, LatentCache, Logits, ModelFolder};

/// What `whale bench` measures.
pub struct BenchArgs {
    pub prompt: usize,
    pub gen: usize,
    pub depth: usize,
    pub reps: usize,
    pub threads: usize,
    pub json: bool,
    /// Sequences decoded together per step (a continuous-batching server's decode step).
    pub batch: usize,
}

/// Peak resident set of this process (`VmHWM`), bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Deterministic token ids below `vocab` (xorshift, its state from the seed through
/// splitmix64's finaliser). The state was `seed | 1`, which gave seeds `2k` and
/// `2k + 1` the same ids: `-b 8` decoded four distinct sequences twice each.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    s = (s ^ (s >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    s = (s ^ (s >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut s = (s ^ (s >> 31)) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn fill(folder: &ModelFolder, cache: &mut LatentCache, depth: usize, chunk: usize) -> Result<()> {
    let m = &folder.model;
    let vocab = m.config().vocab_size.min(100_000);
    let ids = tokens(depth, vocab, 7);
    for c in ids.chunks(chunk.max(1)) {
        m.forward(c, cache, Logits::Last)?;
    }
    Ok(())
}

pub fn run(folder: &ModelFolder, load_s: f64, a: &BenchArgs) -> Result<()> {
    if a.prompt == 0 && a.gen == 0 {
        bail!("nothing to measure: -p and -n are both 0");
    }
    let m = &folder.model;
    let cfg = m.config();
    let vocab = cfg.vocab_size.min(100_000);
    let mut cache = m.new_cache();
    let t0 = Instant::now();
    fill(folder, &mut cache, a.depth, 512)?;
    let fill_s = t0.elapsed().as_secs_f64();

    let mut pp = vec![];
    if a.prompt > 0 {
        for r in 0..a.reps {
            let ids = tokens(a.prompt, vocab, 100 + r as u64);
            let t = Instant::now();
            m.forward(&ids, &mut cache, Logits::Last)?;
            pp.push(a.prompt as f64 / t.elapsed().as_secs_f64());
            cache.truncate(a.depth);
        }
    }
    let mut tg = vec![];
    let moe_before = whale_model::moe_counters();
    if a.gen > 0 && a.batch > 1 {
        // B sequences at the same depth, one token each per step, all in one forward.
        for r in 0..a.reps {
            let mut caches: Vec<LatentCache> =
                (0..a.batch).map(|_| cache.share_prefix(a.depth)).collect();
            let ids: Vec<Vec<u32>> = (0..a.batch)
                .map(|b| tokens(a.gen, vocab, 300 + (r * a.batch + b) as u64))
                .collect();
            let t = Instant::now();
            for step in 0..a.gen {
                let toks: Vec<[u32; 1]> = ids.iter().map(|v| [v[step]]).collect();
                let mut items: Vec<BatchItem> = caches
                    .iter_mut()
                    .zip(&toks)
                    .map(|(c, tk)| BatchItem {
                        tokens: tk,
                        cache: c,
                        logits: Logits::Last,
                    })
                    .collect();
                m.forward_batch(&mut items)?;
            }
            tg.push((a.batch * a.gen) as f64 / t.elapsed().as_secs_f64());
        }
    } else if a.gen > 0 {
        for r in 0..a.reps {
            let ids = tokens(a.gen, vocab, 200 + r as u64);
            let t = Instant::now();
            for &id in &ids {
                m.forward(&[id], &mut cache, Logits::Last)?;
            }
            tg.push(a.gen as f64 / t.elapsed().as_secs_f64());
            cache.truncate(a.depth);
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let (pp_s, tg_s) = (mean(&pp), mean(&tg));
    // Distinct routed experts per MoE layer and step while generating: a batched step
    // reads each once, so its weight bytes grow with this union, not with the batch.
    let moe_after = whale_model::moe_counters();
    let calls = (moe_after.0 - moe_before.0).max(1) as f64;
    let experts_per_layer = (moe_after.1 - moe_before.1) as f64 / calls;
    let kv = cache.bytes_per_token();
    let weights = m.decode_weight_bytes();
    let (expert_bytes, top_k) = m.routed_expert_bytes();
    // A decode step at depth D reads the active weights (the union of the batch's
    // experts) and every sequence's cache of D (+ the new) tokens.
    let cache_read = (a.depth + a.gen / 2) * kv;
    let per_token = weights + cache_read;
    let step_weights = if top_k > 0 && experts_per_layer > 0.0 {
        weights as f64 + (experts_per_layer - top_k as f64) * expert_bytes as f64
    } else {
        weights as f64
    };
    let per_step = step_weights + (a.batch * cache_read) as f64;
    let gb_s = per_step * tg_s / a.batch as f64 / 1e9;
    let v = json!({
        "model": folder.dir.display().to_string(),
        "threads": a.threads,
        "n_prompt": a.prompt,
        "n_gen": a.gen,
        "depth": a.depth,
        "batch": a.batch,
        "reps": a.reps,
        "pp_tok_s": pp_s,
        "tg_tok_s": tg_s,
        "pp_samples": pp,
        "tg_samples": tg,
        "load_s": load_s,
        "repacked": whale_model::repack_enabled(),
        "depth_fill_s": fill_s,
        "kv_bytes_per_token": kv,
        "kv_type": cache.kv_type().name(),
        "weight_bytes": m.weight_bytes(),
        "decode_weight_bytes_per_token": weights,
        "decode_cache_bytes_per_token": cache_read,
        "bytes_read_per_token": per_token,
        "moe_experts_per_layer": experts_per_layer,
        "bytes_read_per_step": per_step,
        "achieved_gb_s": gb_s,
        "peak_rss_bytes": peak_rss(),
    });
    if a.json {
        println!("{v}");
    } else {
        println!(
            "| model | threads | depth | batch | pp{} tok/s | tg{} tok/s | GB/s (tg) | experts/layer | weights read/step | cache B/token | peak RSS |",
            a.prompt, a.gen
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} MB | {} ({}) | {:.2} GB |",
            folder.dir.display(),
            a.threads,
            a.depth,
            a.batch,
            pp_s,
            tg_s,
            gb_s,
            experts_per_layer,
            step_weights / 1e6,
            kv,
            cache.kv_type().name(),
            peak_rss() as f64 / 1e9
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::tokens;

    #[test]
    fn every_seed_gives_its_own_tokens() {
        // A batched run's sequences use neighbouring seeds; equal token streams would
        // route alike and flatter the expert union.
        let runs: Vec<Vec<u32>> = (300..316).map(|s| tokens(16, 100_000, s)).collect();
        for (i, a) in runs.iter().enumerate() {
            assert!(a.iter().all(|&t| t < 100_000));
            for b in &runs[i + 1..] {
                assert_ne!(a, b);
                assert_ne!(a[0], b[0]);
            }
        }
        assert_eq!(tokens(16, 100_000, 301), tokens(16, 100_000, 301));
    }
}
