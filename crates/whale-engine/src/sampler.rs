//! Token sampling: penalties, temperature, top-k, top-p, min-p, seeded draws.

use crate::rng::Rng;
use std::collections::HashMap;

/// Sampling settings; the defaults are greedy-free plain sampling at temperature 1.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: off).
    pub top_p: f32,
    /// Drop tokens below `min_p ×` the top probability (0: off).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of tokens seen in prompt or output (1: off).
    pub repetition_penalty: f32,
    /// Subtract `count × frequency_penalty` for tokens in the output (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` once for every token present in the output.
    pub presence_penalty: f32,
    /// Seed for reproducible sampling; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks ranges; returns the name and problem of the first bad field.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f32, n: &str| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{n} must be a finite number"))
            }
        };
        finite(self.temperature, "temperature")?;
        finite(self.top_p, "top_p")?;
        finite(self.min_p, "min_p")?;
        finite(self.repetition_penalty, "repetition_penalty")?;
        finite(self.frequency_penalty, "frequency_penalty")?;
        finite(self.presence_penalty, "presence_penalty")?;
        if self.temperature < 0.0 {
            return Err("temperature must be >= 0".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("top_p must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be in [0, 1]".into());
        }
        if self.repetition_penalty <= 0.0 {
            return Err("repetition_penalty must be > 0".into());
        }
        Ok(())
    }
}

/// Samples tokens from logits with fixed settings and its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// Index of the largest value; ties go to the lower index.
pub(crate) fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    /// A sampler; seeded from `params.seed` when given.
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed.map(Rng::new).unwrap_or_else(Rng::from_entropy);
        Sampler { params, rng }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` (one row) is modified in place; `prompt` and
    /// `output` are the tokens so far, for the penalties.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> u32 {
        self.apply_penalties(logits, prompt, output);
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        // Candidates sorted by logit, highest first.
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .collect();
        if idx.is_empty() {
            return argmax(logits) as u32;
        }
        idx.sort_by(|&a, &b| {
            logits[b]
                .partial_cmp(&logits[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let inv_t = 1.0 / p.temperature as f64;
        let m = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - m) * inv_t).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= z);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (k, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = k + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (k, &q) in probs.iter().enumerate() {
            if r < q {
                return idx[k] as u32;
            }
            r -= q;
        }
        idx[idx.len() - 1] as u32
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, s) in logits.iter_mut().zip(seen) {
                if s {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(&mut logits.to_vec(), &[], &[]) as usize] += 1;
        }
        counts
    }

    fn seeded(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.0, 5.0, 5.0, 1.0], &[], &[]), 1);
    }

    #[test]
    fn seed_reproduces_and_frequencies_follow_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let a = draw(seeded(42), &logits, 4000);
        assert_eq!(a, draw(seeded(42), &logits, 4000));
        assert_ne!(a, draw(seeded(43), &logits, 4000));
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (i, &c) in a.iter().enumerate() {
            let want = logits[i].exp() / z;
            assert!(
                (c as f32 / 4000.0 - want).abs() < 0.03,
                "token {i}: {c} vs {want}"
            );
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [0.0f32, 1.0];
        let hot = draw(
            SamplingParams {
                temperature: 2.0,
                ..seeded(1)
            },
            &logits,
            2000,
        )[1];
        let cold = draw(
            SamplingParams {
                temperature: 0.25,
                ..seeded(1)
            },
            &logits,
            2000,
        )[1];
        assert!(cold > hot && cold > 1900, "{cold} {hot}");
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let logits = [3.0f32, 2.9, 0.0, -1.0, 2.8];
        let k = draw(
            SamplingParams {
                top_k: 2,
                ..seeded(3)
            },
            &logits,
            500,
        );
        assert_eq!(k[2] + k[3] + k[4], 0);
        assert!(k[0] > 0 && k[1] > 0);
        // p(0), p(1), p(4) ≈ 0.36, 0.33, 0.30: top_p 0.5 keeps two.
        let p = draw(
            SamplingParams {
                top_p: 0.5,
                ..seeded(3)
            },
            &logits,
            500,
        );
        assert_eq!(p[2] + p[3] + p[4], 0);
        let m = draw(
            SamplingParams {
                min_p: 0.5,
                ..seeded(3)
            },
            &logits,
            500,
        );
        assert_eq!(m[2] + m[3], 0);
        assert!(m[4] > 0);
        let one = draw(
            SamplingParams {
                top_p: 0.01,
                ..seeded(3)
            },
            &logits,
            50,
        );
        assert_eq!(one[0], 50);
    }

    #[test]
    fn penalties() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            temperature: 0.0,
            ..Default::default()
        });
        let mut l = [4.0f32, 3.0, -1.0];
        assert_eq!(s.sample(&mut l, &[0, 2], &[]), 1);
        assert_eq!(l, [2.0, 3.0, -2.0]);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            temperature: 0.0,
            ..Default::default()
        });
        let mut l = [4.0f32, 3.0, 1.0];
        // prompt tokens do not count for OpenAI-style penalties
        assert_eq!(s.sample(&mut l, &[1], &[0, 0]), 1);
        assert_eq!(l, [1.5, 3.0, 1.0]);
    }

    #[test]
    fn validation_names_the_field() {
        assert!(SamplingParams::default().validate().is_ok());
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("top_p"));
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("temperature"));
    }
}
