//! The prompt path on AMX tiles (`whale_kernels::amx`) through a whole model: a
//! 48-token prompt (products of 32 rows and more run on the tiles) through the v3
//! fixture converted to Q4_0 and Q8_0, against whale's exact mode (f32 on the
//! dequantised weights, which matches transformers) and against the integer path.
//! Its own test binary: the switch it flips is process-wide. Skipped (with a line
//! saying so) on CPUs without AMX.

mod common;
use common::*;
use whale_kernels::{amx, DType};
use whale_model::{convert_to_gguf, ConvertOptions, Logits, ModelFolder};

/// Per position, max |got - want| over the vocabulary relative to the largest
/// |want|: (median over positions, max). A random tiny model's router has
/// near-ties that any rounding flips at a few positions, so the median is what the
/// arithmetic decides.
fn rel(got: &[f32], want: &[f32], vocab: usize) -> (f32, f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut per: Vec<f32> = got
        .chunks(vocab)
        .zip(want.chunks(vocab))
        .map(|(g, w)| {
            g.iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
                / scale
        })
        .collect();
    per.sort_by(f32::total_cmp);
    (per[per.len() / 2], per[per.len() - 1])
}

#[test]
fn tile_prefill_is_as_close_to_exact_as_the_integer_path() {
    if !amx::available() {
        eprintln!("AMX tiles not available on this CPU: skipped");
        return;
    }
    let tokens: Vec<u32> = expected("v3").tokens.repeat(4);
    assert!(tokens.len() >= amx::MIN_ROWS);
    let dir = tempfile::tempdir().unwrap();
    for (ty, dtype) in [("q4_0", DType::Q4_0), ("q8_0", DType::Q8_0)] {
        let out = dir.path().join(format!("v3-{ty}.gguf"));
        let opts = ConvertOptions {
            dtype,
            tokenizer_pre: Some("deepseek-llm".into()),
        };
        convert_to_gguf(&model_dir("v3"), &out, &opts, &mut |_, _, _| {}).unwrap();
        let mut m = ModelFolder::open(&out).unwrap().model;
        let run = |m: &whale_model::DeepseekModel| {
            m.forward(&tokens, &mut m.new_cache(), Logits::All).unwrap()
        };
        let tiles = run(&m);
        amx::set_allowed(false);
        let int = run(&m);
        amx::set_allowed(true);
        m.set_exact(true);
        let exact = run(&m);
        let vocab = exact.len() / tokens.len();
        let (t, i) = (rel(&tiles, &exact, vocab), rel(&int, &exact, vocab));
        eprintln!(
            "{ty}: |diff| / max |logit| against exact, median and max over {} positions: \
             tiles {:.2e} {:.2e}, integer {:.2e} {:.2e}",
            tokens.len(),
            t.0,
            t.1,
            i.0,
            i.1
        );
        assert!(tiles != int, "{ty}: the tiles were not used");
        assert!(t.0 <= 2.0 * i.0, "{ty}: tiles {t:?} against integer {i:?}");
    }
}
