//! Rotary position embedding on the rope part of q and k: adjacent-pair
//! rotation (pairs `(2i, 2i+1)`), with DeepSeek's YaRN frequencies.

use crate::config::{yarn_get_mscale, ModelConfig, RopeScaling};

/// Inverse frequencies and amplitude for one model.
#[derive(Clone, Debug)]
pub struct Rope {
    /// `[qk_rope_head_dim / 2]`, computed in f32 like transformers.
    inv_freq: Vec<f32>,
    /// cos/sin amplitude (1.0 for every shipped checkpoint).
    amplitude: f32,
    /// Adjacent pairs `(2i, 2i+1)` when true; halves `(i, i + R/2)` otherwise.
    interleaved: bool,
}

impl Rope {
    /// Frequencies for `cfg` (`qk_rope_head_dim`, `rope_theta`, `rope_scaling`).
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        // pos_freq[i] = base^(2i/dim), in f32 as transformers computes it.
        let pos_freq: Vec<f32> = (0..half)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        match cfg.rope_scaling {
            RopeScaling::None => Rope {
                inv_freq: pos_freq.iter().map(|p| 1.0 / p).collect(),
                amplitude: 1.0,
                interleaved: cfg.rope_interleave,
            },
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: l0,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            } => {
                let corr_dim = |r: f64| {
                    (dim as f64 * (l0 / (r * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let low = corr_dim(beta_fast).floor().max(0.0);
                let mut high = corr_dim(beta_slow).ceil().min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv_freq = (0..half)
                    .map(|i| {
                        let extra = 1.0 / pos_freq[i];
                        let inter = 1.0 / (factor as f32 * pos_freq[i]);
                        let ramp = (((i as f64 - low) / (high - low)).clamp(0.0, 1.0)) as f32;
                        // transformers: inter * (1 - m) + extra * m with m = 1 - ramp.
                        let m = 1.0 - ramp;
                        inter * (1.0 - m) + extra * m
                    })
                    .collect();
                let amplitude = match attention_factor {
                    Some(a) => a,
                    None if mscale != 0.0 && mscale_all_dim != 0.0 => {
                        yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
                    }
                    None => yarn_get_mscale(factor, 1.0),
                } as f32;
                Rope {
                    inv_freq,
                    amplitude,
                    interleaved: cfg.rope_interleave,
                }
            }
        }
    }

    /// The inverse frequencies.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The cos/sin amplitude.
    pub fn amplitude(&self) -> f32 {
        self.amplitude
    }

    /// Rotates `x` (`[qk_rope_head_dim]`) in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        debug_assert_eq!(x.len(), half * 2);
        let p = pos as f32;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let theta = p * f;
            let (s, c) = theta.sin_cos();
            let (c, s) = (c * self.amplitude, s * self.amplitude);
            let (ia, ib) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (a, b) = (x[ia], x[ib]);
            x[ia] = a * c - b * s;
            x[ib] = a * s + b * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5.24's fp32 values for every V2/V3 config (reference §2.6).
    const HF_INV_FREQ: [f32; 32] = [
        1.0,
        0.749_894_2,
        0.562_341_33,
        0.421_696_5,
        0.316_227_76,
        0.237_137_36,
        0.177_827_94,
        0.133_352_15,
        0.1,
        0.074_989_416,
        0.056_234_13,
        0.039_006_926,
        0.026_879_36,
        0.018_378_144,
        0.012_447_956,
        0.008_334_509,
        0.005_500_000_4,
        0.003_561_997_3,
        0.002_249_365_2,
        0.001_370_513_5,
        0.000_790_569_4,
        0.000_414_990_4,
        0.000_177_827_94,
        3.333_803_4e-5,
        2.5e-5,
        1.874_735_4e-5,
        1.405_853_3e-5,
        1.054_241_2e-5,
        7.905_694_5e-6,
        5.928_434_3e-6,
        4.445_698_3e-6,
        3.333_803_5e-6,
    ];

    fn lite() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type":"deepseek_v2","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"kv_lora_rank":4,"qk_nope_head_dim":2,
            "qk_rope_head_dim":64,"v_head_dim":2,"rope_theta":10000,
            "rope_scaling":{"type":"yarn","factor":40,"original_max_position_embeddings":4096,
            "beta_fast":32,"beta_slow":1,"mscale":0.707,"mscale_all_dim":0.707}}"#,
        )
        .unwrap()
    }

    #[test]
    fn yarn_inv_freq_matches_transformers() {
        let r = Rope::new(&lite());
        assert_eq!(r.amplitude(), 1.0);
        for (i, (a, b)) in r.inv_freq().iter().zip(HF_INV_FREQ).enumerate() {
            assert!(((a - b) / b).abs() < 2e-6, "pair {i}: {a} vs {b}");
        }
    }

    #[test]
    fn rotates_adjacent_pairs_and_preserves_norm() {
        let r = Rope::new(&lite());
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        let x0 = x.clone();
        r.apply(&mut x, 7);
        // Pair 0 has inv_freq 1: rotation by 7 radians.
        let (s, c) = 7f32.sin_cos();
        assert!((x[0] - (x0[0] * c - x0[1] * s)).abs() < 1e-6);
        assert!((x[1] - (x0[0] * s + x0[1] * c)).abs() < 1e-6);
        let n0: f32 = x0.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        let mut y = x0.clone();
        r.apply(&mut y, 0);
        assert_eq!(y, x0);
    }
}
