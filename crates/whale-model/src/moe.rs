//! DeepSeekMoE: router, routed experts computed per expert over the tokens sent
//! to it, and always-on shared experts.

use crate::config::{ModelConfig, ScoringFunc, TopkMethod};
use crate::linear::Mlp;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// The router of one MoE layer (all math in f32, as transformers does it).
pub(crate) struct Router {
    /// `mlp.gate.weight` `[E, d]`, decoded to f32 (small).
    pub weight: Vec<f32>,
    /// V3 `e_score_correction_bias` `[E]`: affects selection only.
    pub bias: Option<Vec<f32>>,
    pub n_experts: usize,
    pub top_k: usize,
    pub method: TopkMethod,
    pub scoring: ScoringFunc,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scale: f32,
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        v[b].partial_cmp(&v[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

impl Router {
    pub fn from_config(cfg: &ModelConfig, weight: Vec<f32>, bias: Option<Vec<f32>>) -> Self {
        Router {
            weight,
            bias,
            n_experts: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            method: cfg.topk_method,
            scoring: cfg.scoring_func,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            scale: cfg.routed_scaling_factor,
        }
    }

    /// Chosen experts and their weights for one token `h` (`[d]`).
    pub fn route(&self, h: &[f32]) -> Vec<(usize, f32)> {
        let d = h.len();
        let e = self.n_experts;
        let logits: Vec<f32> = (0..e)
            .map(|i| whale_kernels::dot(h, &self.weight[i * d..(i + 1) * d]))
            .collect();
        let scores: Vec<f32> = match self.scoring {
            ScoringFunc::Softmax => {
                let mut s = logits;
                whale_kernels::softmax_inplace(&mut s);
                s
            }
            ScoringFunc::Sigmoid => logits.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect(),
        };
        let per_group = e / self.n_group;
        let mut chosen: Vec<usize> = match self.method {
            TopkMethod::Greedy => top_k(&scores, self.top_k),
            TopkMethod::GroupLimitedGreedy => {
                // V2: a group scores its best expert; experts outside the kept groups get 0.0.
                let g: Vec<f32> = scores
                    .chunks(per_group)
                    .map(|c| c.iter().copied().fold(f32::MIN, f32::max))
                    .collect();
                let keep = top_k(&g, self.topk_group);
                let masked: Vec<f32> = scores
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        if keep.contains(&(i / per_group)) {
                            s
                        } else {
                            0.0
                        }
                    })
                    .collect();
                top_k(&masked, self.top_k)
            }
            TopkMethod::NoauxTc => {
                // V3: select on score + bias; a group scores the sum of its best two; others -inf.
                let choice: Vec<f32> = match &self.bias {
                    Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                    None => scores.clone(),
                };
                let g: Vec<f32> = choice
                    .chunks(per_group)
                    .map(|c| top_k(c, 2.min(c.len())).iter().map(|&i| c[i]).sum())
                    .collect();
                let keep = top_k(&g, self.topk_group);
                let masked: Vec<f32> = choice
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        if keep.contains(&(i / per_group)) {
                            s
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                top_k(&masked, self.top_k)
            }
        };
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        // transformers' V2 class ignores norm_topk_prob; V3 honours it.
        if self.method == TopkMethod::NoauxTc && self.norm_topk_prob {
            let s: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= s);
        }
        w.iter_mut().for_each(|x| *x *= self.scale);
        chosen.drain(..).zip(w).collect()
    }
}

/// One MoE layer.
pub(crate) struct Moe {
    pub router: Router,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
}

/// Process-wide MoE counters: how many distinct routed experts each MoE layer call
/// touched (the weight bytes a batched step reads grow with this union, not with
/// the batch size).
static LAYER_CALLS: AtomicU64 = AtomicU64::new(0);
static EXPERTS_TOUCHED: AtomicU64 = AtomicU64::new(0);
static TOKEN_ROWS: AtomicU64 = AtomicU64::new(0);

/// `(MoE layer calls, distinct routed experts summed over calls, token rows summed)`
/// since the process started.
pub fn moe_counters() -> (u64, u64, u64) {
    (
        LAYER_CALLS.load(Ordering::Relaxed),
        EXPERTS_TOUCHED.load(Ordering::Relaxed),
        TOKEN_ROWS.load(Ordering::Relaxed),
    )
}

fn count(experts: usize, rows: usize) {
    LAYER_CALLS.fetch_add(1, Ordering::Relaxed);
    EXPERTS_TOUCHED.fetch_add(experts as u64, Ordering::Relaxed);
    TOKEN_ROWS.fetch_add(rows as u64, Ordering::Relaxed);
}

impl Moe {
    /// `x`: `[n, d]` (normalised) → `y`: `[n, d]` (overwritten).
    ///
    /// Tokens are grouped by expert: each expert runs once over all tokens routed
    /// to it (gather → gate/up → SiLU → down → weighted scatter-add).
    pub fn forward(&self, x: &[f32], n: usize, d: usize, y: &mut [f32]) {
        if n == 1 {
            return self.forward_one(x, y);
        }
        if n <= SMALL_BATCH {
            return self.forward_small(x, n, d, y);
        }
        let per_expert = self.route_rows(x, n, d);
        let active: Vec<(usize, &Vec<(usize, f32)>)> = per_expert
            .iter()
            .enumerate()
            .filter(|(_, toks)| !toks.is_empty())
            .collect();
        count(active.len(), n);
        // The shared expert and the routed ones run side by side, each routed expert
        // over all its tokens at once: [m, d] → [m, d].
        let (_, outs) = rayon::join(
            || match &self.shared {
                Some(s) => s.forward(x, n, y),
                None => y.fill(0.0),
            },
            || {
                active
                    .par_iter()
                    .map(|&(e, toks)| {
                        let m = toks.len();
                        let mut xe = vec![0.0f32; m * d];
                        for (j, &(t, _)) in toks.iter().enumerate() {
                            xe[j * d..(j + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
                        }
                        let mut ye = vec![0.0f32; m * d];
                        self.experts[e].forward(&xe, m, &mut ye);
                        ye
                    })
                    .collect::<Vec<_>>()
            },
        );
        let mut routed = vec![0.0f32; n * d];
        for (&(_, toks), ye) in active.iter().zip(&outs) {
            for (j, &(t, w)) in toks.iter().enumerate() {
                whale_kernels::axpy_row(
                    w,
                    &ye[j * d..(j + 1) * d],
                    &mut routed[t * d..(t + 1) * d],
                );
            }
        }
        for (yv, r) in y.iter_mut().zip(&routed) {
            *yv += r;
        }
    }
}

impl Moe {
    /// Bytes of one routed expert's weights (their mean, should types differ).
    pub(crate) fn expert_bytes(&self) -> usize {
        let all: usize = self.experts.iter().map(Mlp::bytes).sum();
        all / self.experts.len().max(1)
    }

    /// For every routed expert, the rows of `x` (`[n, d]`) routed to it and their weights.
    fn route_rows(&self, x: &[f32], n: usize, d: usize) -> Vec<Vec<(usize, f32)>> {
        // Tokens route independently: in parallel past one (the router's f32 products
        // on one core were ~1.3% of a batched decode step and of a prefill).
        let routes: Vec<Vec<(usize, f32)>> = if n > 1 {
            x[..n * d]
                .par_chunks(d)
                .map(|h| self.router.route(h))
                .collect()
        } else {
            x[..n * d].chunks(d).map(|h| self.router.route(h)).collect()
        };
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (t, r) in routes.into_iter().enumerate() {
            for (e, w) in r {
                per_expert[e].push((t, w));
            }
        }
        per_expert
    }
}

/// Up to this many token rows (a batched decode step), a MoE layer runs as two
/// batched passes ([`whale_kernels::matmul_many`]) over the experts it touches
/// instead of one parallel matmul per expert.
const SMALL_BATCH: usize = 64;

impl Moe {
    /// A few tokens (a batched decode step): every touched expert's gate/up products
    /// over the tokens routed to it, and the shared expert's over all, as one parallel
    /// batch; then all down products as another. Each expert is read once per step.
    fn forward_small(&self, x: &[f32], n: usize, d: usize, y: &mut [f32]) {
        let per_expert = self.route_rows(x, n, d);
        // (mlp, its token rows, their weights), the shared expert last over all rows.
        let all: Vec<usize> = (0..n).collect();
        let ones = vec![1.0f32; n];
        let split: Vec<(Vec<usize>, Vec<f32>)> = per_expert
            .iter()
            .map(|toks| toks.iter().copied().unzip())
            .collect();
        let mut groups: Vec<(&Mlp, &[usize], &[f32])> = split
            .iter()
            .enumerate()
            .filter(|(_, (rows, _))| !rows.is_empty())
            .map(|(e, (rows, ws))| (&self.experts[e], &rows[..], &ws[..]))
            .collect();
        count(groups.len(), n);
        if let Some(s) = &self.shared {
            groups.push((s, &all[..], &ones[..]));
        }
        let exact = groups.first().is_some_and(|(m, _, _)| m.gate.exact);
        let mut gu: Vec<(Vec<f32>, Vec<f32>)> = groups
            .iter()
            .map(|(m, rows, _)| {
                (
                    vec![0.0; rows.len() * m.gate.out_dim()],
                    vec![0.0; rows.len() * m.up.out_dim()],
                )
            })
            .collect();
        // Every expert reads its tokens' rows straight from `x`: each row is
        // quantised once for the whole layer, not once per expert it is routed to.
        let jobs = groups
            .iter()
            .zip(gu.iter_mut())
            .flat_map(|((m, rows, _), (g, u))| {
                [
                    whale_kernels::MatMul {
                        x,
                        rows: Some(rows),
                        n: rows.len(),
                        w: m.gate.mat(),
                        y: g,
                    },
                    whale_kernels::MatMul {
                        x,
                        rows: Some(rows),
                        n: rows.len(),
                        w: m.up.mat(),
                        y: u,
                    },
                ]
            })
            .collect();
        whale_kernels::matmul_many(jobs, exact);
        for (g, u) in gu.iter_mut() {
            whale_kernels::swiglu(g, u);
        }
        let mut outs: Vec<Vec<f32>> = groups
            .iter()
            .map(|(_, rows, _)| vec![0.0f32; rows.len() * d])
            .collect();
        let jobs = groups
            .iter()
            .zip(&gu)
            .zip(outs.iter_mut())
            .map(|(((m, rows, _), (g, _)), o)| whale_kernels::MatMul {
                x: g,
                rows: None,
                n: rows.len(),
                w: m.down.mat(),
                y: o,
            })
            .collect();
        whale_kernels::matmul_many(jobs, exact);
        y.fill(0.0);
        for ((_, rows, ws), o) in groups.iter().zip(&outs) {
            for (j, (&t, &w)) in rows.iter().zip(ws.iter()).enumerate() {
                whale_kernels::axpy_row(w, &o[j * d..(j + 1) * d], &mut y[t * d..(t + 1) * d]);
            }
        }
    }

    /// One token (decode): the shared expert's gate/up products run while this thread
    /// routes (they need no routing: ~80 µs of f32 router products per layer left the
    /// other core idle), then the chosen experts' gate/up products as one parallel
    /// batch, then every down product as another.
    fn forward_one(&self, x: &[f32], y: &mut [f32]) {
        let d = x.len();
        let gate_up = |m: &Mlp| (vec![0.0f32; m.gate.out_dim()], vec![0.0f32; m.up.out_dim()]);
        let mut shared: Vec<GateUp> = self.shared.iter().map(|s| (s, gate_up(s))).collect();
        let picks = match shared.first() {
            Some((s, _)) => {
                let exact = s.gate.exact;
                let (picks, ()) = rayon::join(
                    || self.router.route(x),
                    || whale_kernels::matvec_many(gate_up_jobs(x, &mut shared), exact),
                );
                picks
            }
            None => self.router.route(x),
        };
        count(picks.len(), 1);
        let mut routed: Vec<GateUp> = picks
            .iter()
            .map(|&(e, _)| (&self.experts[e], gate_up(&self.experts[e])))
            .collect();
        let exact = routed.first().is_some_and(|(m, _)| m.gate.exact);
        whale_kernels::matvec_many(gate_up_jobs(x, &mut routed), exact);
        // Routed experts first, then the shared one (weight 1).
        let weights: Vec<f32> = picks
            .iter()
            .map(|&(_, w)| w)
            .chain(shared.iter().map(|_| 1.0))
            .collect();
        let mut all = routed;
        all.append(&mut shared);
        for (_, (g, u)) in all.iter_mut() {
            whale_kernels::swiglu(g, u);
        }
        let exact = all.first().is_some_and(|(m, _)| m.gate.exact);
        let mut outs = vec![vec![0.0f32; d]; all.len()];
        let jobs = all
            .iter()
            .zip(outs.iter_mut())
            .map(|((m, (g, _)), o)| whale_kernels::MatVec {
                x: g,
                w: m.down.mat(),
                y: o,
            })
            .collect();
        whale_kernels::matvec_many(jobs, exact);
        y.fill(0.0);
        for (w, o) in weights.iter().zip(&outs) {
            whale_kernels::axpy_row(*w, o, y);
        }
    }
}

/// An MLP and the outputs of its gate and up products.
type GateUp<'m> = (&'m Mlp, (Vec<f32>, Vec<f32>));

/// The gate and up products of each MLP over `x`, into its pair of outputs.
fn gate_up_jobs<'a>(x: &'a [f32], mlps: &'a mut [GateUp]) -> Vec<whale_kernels::MatVec<'a>> {
    mlps.iter_mut()
        .flat_map(|(m, (g, u))| {
            [
                whale_kernels::MatVec {
                    x,
                    w: m.gate.mat(),
                    y: g,
                },
                whale_kernels::MatVec {
                    x,
                    w: m.up.mat(),
                    y: u,
                },
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(
        method: TopkMethod,
        scoring: ScoringFunc,
        scores_as_logits: &[f32],
    ) -> (Router, Vec<f32>) {
        // With h = [1] and weight = logits, router logits equal `scores_as_logits`.
        let e = scores_as_logits.len();
        (
            Router {
                weight: scores_as_logits.to_vec(),
                bias: None,
                n_experts: e,
                top_k: 2,
                method,
                scoring,
                n_group: 4,
                topk_group: 2,
                norm_topk_prob: false,
                scale: 1.0,
            },
            vec![1.0],
        )
    }

    #[test]
    fn greedy_picks_largest_softmax_scores() {
        let (r, h) = router(
            TopkMethod::Greedy,
            ScoringFunc::Softmax,
            &[0.0, 3.0, 1.0, 2.0, 0.5, 0.0, 0.0, 0.0],
        );
        let got = r.route(&h);
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let z: f32 = [0.0f32, 3.0, 1.0, 2.0, 0.5, 0.0, 0.0, 0.0]
            .iter()
            .map(|v| v.exp())
            .sum();
        assert!((got[0].1 - 3f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn group_limited_keeps_groups_by_max() {
        // groups of 2: g0 = {5, -9}, g1 = {4.9, 4.8}, g2 = {0, 0}, g3 = {4.95, -9}.
        // Keep g0 and g3 (max 5 and 4.95): the second pick is expert 6, not 2 or 3.
        let (r, h) = router(
            TopkMethod::GroupLimitedGreedy,
            ScoringFunc::Softmax,
            &[5.0, -9.0, 4.9, 4.8, 0.0, 0.0, 4.95, -9.0],
        );
        let got: Vec<usize> = r.route(&h).iter().map(|x| x.0).collect();
        assert_eq!(got, vec![0, 6]);
    }

    #[test]
    fn noaux_tc_selects_with_bias_weights_without() {
        // groups by sum of top-2 of (sigmoid + bias).
        let logits = [0.0, 0.0, 2.0, -2.0, 1.0, 1.0, -1.0, -1.0];
        let (mut r, h) = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, &logits);
        r.bias = Some(vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]);
        r.norm_topk_prob = true;
        r.scale = 2.5;
        let got = r.route(&h);
        let idx: Vec<usize> = got.iter().map(|x| x.0).collect();
        // group 3 = {-1, -1+bias 2} sums highest; group 2 next; expert 7 then 4 (ties: lower index).
        assert_eq!(idx, vec![7, 4]);
        let sig = |z: f32| 1.0 / (1.0 + (-z).exp());
        let (a, b) = (sig(-1.0), sig(1.0));
        assert!((got[0].1 - 2.5 * a / (a + b)).abs() < 1e-6);
    }
}
