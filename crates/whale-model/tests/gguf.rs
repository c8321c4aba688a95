//! The GGUF reader on a file written by llama.cpp's gguf-py (tools/make_gguf_fixtures.py).

mod common;
use common::*;
use serde_json::Value;
use whale_model::{GgufFile, GgufValue};

#[test]
fn reads_metadata_and_tensors_written_by_gguf_py() {
    let dir = fixtures().join("gguf");
    let f = GgufFile::open(&dir.join("small.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(
        f.get("general.architecture").and_then(GgufValue::as_str),
        Some("deepseek2")
    );
    assert_eq!(f.get("test.u32").and_then(GgufValue::as_u64), Some(7));
    assert_eq!(f.get("test.i32"), Some(&GgufValue::I64(-3)));
    assert_eq!(
        f.get("test.f32").and_then(GgufValue::as_f64),
        Some(0.0707f32 as f64)
    );
    assert_eq!(f.get("test.u64").and_then(GgufValue::as_u64), Some(1 << 40));
    assert_eq!(f.get("test.bool").and_then(GgufValue::as_bool), Some(true));
    assert_eq!(
        f.get("test.str").and_then(GgufValue::as_str),
        Some("whale 🐋")
    );
    assert_eq!(f.get("test.u8").and_then(GgufValue::as_u64), Some(200));
    assert_eq!(f.get("test.f64").and_then(GgufValue::as_f64), Some(2.5));
    let arr: Vec<&str> = f
        .get("test.arr_str")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(arr, ["a", "bc", ""]);
    let ints: Vec<f64> = f
        .get("test.arr_i32")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(ints, [1.0, -2.0, 3.0]);

    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("small.json")).unwrap()).unwrap();
    let want = want["tensors"].as_object().unwrap();
    assert_eq!(f.tensor_names().len(), want.len());
    for (name, w) in want {
        let t = f.tensor(name).unwrap();
        let ne: Vec<usize> = w["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let mut shape = ne.clone();
        shape.reverse();
        assert_eq!(t.shape(), &shape[..], "{name}");
        assert_eq!(
            t.dtype().name(),
            w["type"].as_str().unwrap().to_lowercase(),
            "{name}"
        );
        let vals: Vec<f32> = w["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(t.mat().to_f32(), vals, "{name}");
    }
    let e = f.tensor("nope").unwrap_err().to_string();
    assert!(e.contains("\"nope\"") && e.contains("small.gguf"), "{e}");
}

#[test]
fn broken_files_fail_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("gguf/small.gguf")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic.gguf", b"GGML....".to_vec(), "bad magic"),
        ("short.gguf", bytes[..40].to_vec(), "ends inside the header"),
        (
            "cut.gguf",
            bytes[..bytes.len() - 16].to_vec(),
            "runs past the end",
        ),
        (
            "v1.gguf",
            [&b"GGUF"[..], &1u32.to_le_bytes(), &bytes[8..]].concat(),
            "version 1",
        ),
    ];
    for (name, data, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
}

#[test]
fn converted_gguf_runs_like_the_safetensors_model() {
    use whale_model::{DeepseekModel, Logits, ModelFolder};
    let exp = expected("v3");
    let st = ModelFolder::open(&model_dir("v3")).unwrap();
    let want = st
        .model
        .forward(&exp.tokens, &mut st.model.new_cache(), Logits::All)
        .unwrap();
    // F32 GGUF from llama.cpp's converter (split attn_k_b/attn_v_b, stacked experts): same math.
    let g = DeepseekModel::load_gguf(&fixtures().join("gguf/v3-f32.gguf")).unwrap();
    let c = g.config();
    assert_eq!(
        (
            c.num_hidden_layers,
            c.first_k_dense_replace,
            c.n_group,
            c.topk_group
        ),
        (4, 2, 4, 2)
    );
    assert_eq!(c.softmax_scale(), st.model.config().softmax_scale());
    let got = g
        .forward(&exp.tokens, &mut g.new_cache(), Logits::All)
        .unwrap();
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("v3 F32 GGUF vs safetensors: max |diff| = {err:.2e}");
    assert!(err < 1e-4, "F32 GGUF differs from safetensors by {err}");
}

#[test]
fn quantized_gguf_matches_transformers_on_its_dequantised_weights() {
    use whale_model::{DeepseekModel, Logits};
    for name in ["v3-f32", "v3-q8_0"] {
        // Q8_0 with llama.cpp's F16 fallback for rows that are not whole blocks, in
        // exact mode (f32 arithmetic on the dequantised weights, as transformers ran).
        let mut g =
            DeepseekModel::load_gguf(&fixtures().join(format!("gguf/{name}.gguf"))).unwrap();
        g.set_exact(true);
        let r: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("gguf/{name}.expected.json")))
                .unwrap(),
        )
        .unwrap();
        let got = g
            .forward(&ids(&r["tokens"]), &mut g.new_cache(), Logits::All)
            .unwrap();
        let err = max_abs_diff(&got, &floats(&r["logits"]));
        eprintln!("{name}: whale vs transformers on the GGUF's weights: max |diff| = {err:.2e}");
        assert!(err < 1e-4, "{name}: {err}");
    }
}

/// Rows of a tensor read from a GGUF, for rewriting files in tests.
struct FromTensor(whale_model::Tensor);

impl whale_model::RowSource for FromTensor {
    fn rows(&self) -> usize {
        self.0.shape().iter().rev().skip(1).product()
    }
    fn cols(&self) -> usize {
        *self.0.shape().last().unwrap()
    }
    fn row_into(&self, r: usize, out: &mut [f32]) {
        whale_kernels::MatRef::new(self.0.dtype(), self.0.bytes(), self.rows(), self.cols())
            .unwrap()
            .row_into(r, out);
    }
}

struct Values(Vec<f32>, usize);

impl whale_model::RowSource for Values {
    fn rows(&self) -> usize {
        self.0.len() / self.1
    }
    fn cols(&self) -> usize {
        self.1
    }
    fn row_into(&self, r: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.0[r * self.1..(r + 1) * self.1]);
    }
}

fn meta_of(f: &GgufFile) -> Vec<(String, whale_model::MetaValue)> {
    use whale_model::MetaValue as M;
    f.keys()
        .filter_map(|k| {
            let v = match f.get(k).unwrap() {
                GgufValue::U64(x) => M::U32(*x as u32),
                GgufValue::F64(x) => M::F32(*x as f32),
                GgufValue::Bool(b) => M::Bool(*b),
                GgufValue::Str(s) => M::Str(s.clone()),
                GgufValue::Array(a) if a.iter().all(|x| x.as_str().is_some()) => {
                    M::StrArray(a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                }
                GgufValue::Array(a) => M::I32Array(
                    a.iter()
                        .map(|x| match x {
                            GgufValue::I64(i) => *i as i32,
                            GgufValue::U64(u) => *u as i32,
                            _ => panic!("{k}"),
                        })
                        .collect(),
                ),
                GgufValue::I64(_) => return None,
            };
            Some((k.to_string(), v))
        })
        .collect()
}

#[test]
fn older_files_with_attn_kv_b_run_the_same() {
    use whale_model::{write_gguf, DeepseekModel, Logits, TensorPlan};
    // Rewrite llama.cpp's v3 F32 file in the pre-MLA-split layout: one attn_kv_b
    // [H·(P+V), C] per layer instead of attn_k_b [H, C, P] + attn_v_b [H, V, C].
    let src = GgufFile::open(&fixtures().join("gguf/v3-f32.gguf")).unwrap();
    let mut plans = vec![];
    for name in src.tensor_names() {
        let t = src.tensor(name).unwrap();
        if name.ends_with("attn_v_b.weight") {
            continue;
        }
        if let Some(pre) = name.strip_suffix("attn_k_b.weight") {
            let kb = t.mat().to_f32();
            let (h, c, p) = (t.shape()[0], t.shape()[1], t.shape()[2]);
            let vt = src.tensor(&format!("{pre}attn_v_b.weight")).unwrap();
            let vb = vt.mat().to_f32();
            let v = vt.shape()[1];
            let mut kv = vec![0.0; h * (p + v) * c];
            for head in 0..h {
                for j in 0..c {
                    for i in 0..p {
                        kv[(head * (p + v) + i) * c + j] = kb[(head * c + j) * p + i];
                    }
                }
                for i in 0..v {
                    let row = (head * (p + v) + p + i) * c;
                    kv[row..row + c]
                        .copy_from_slice(&vb[(head * v + i) * c..(head * v + i + 1) * c]);
                }
            }
            plans.push(TensorPlan {
                name: format!("{pre}attn_kv_b.weight"),
                shape: vec![h * (p + v), c],
                dtype: whale_kernels::DType::F32,
                source: Box::new(Values(kv, c)),
            });
            continue;
        }
        plans.push(TensorPlan {
            name: name.clone(),
            shape: t.shape().to_vec(),
            dtype: t.dtype(),
            source: Box::new(FromTensor(t)),
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("v3-kv_b.gguf");
    write_gguf(&old, &meta_of(&src), &plans, &mut |_, _, _| {}).unwrap();
    let f = GgufFile::open(&old).unwrap();
    assert!(f.tensor_info("blk.0.attn_kv_b.weight").is_some());
    assert!(f.tensor_info("blk.0.attn_k_b.weight").is_none());
    let exp = expected("v3");
    let a = DeepseekModel::load_gguf(&old).unwrap();
    let b = DeepseekModel::load_gguf(&fixtures().join("gguf/v3-f32.gguf")).unwrap();
    let la = a
        .forward(&exp.tokens, &mut a.new_cache(), Logits::All)
        .unwrap();
    let lb = b
        .forward(&exp.tokens, &mut b.new_cache(), Logits::All)
        .unwrap();
    let err = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(err < 1e-5, "attn_kv_b layout differs by {err}");
}

#[test]
fn unsupported_tensor_types_are_named() {
    // Patch one tensor's type in the index to IQ2_XXS (16), which whale does not read.
    let mut bytes = std::fs::read(fixtures().join("gguf/v3-q8_0.gguf")).unwrap();
    let name = b"blk.0.attn_q_a.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // n_dims (u32 = 2), ne[2] (u64), then the type.
    assert_eq!(&bytes[at..at + 4], &2u32.to_le_bytes());
    let ty = at + 4 + 16;
    assert_eq!(
        &bytes[ty..ty + 4],
        &8u32.to_le_bytes(),
        "Q8_0 before patching"
    );
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq2.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let e = whale_model::DeepseekModel::load_gguf(&p)
        .err()
        .expect("IQ2_XXS must be refused")
        .to_string();
    assert!(
        e.contains("iq2.gguf") && e.contains("blk.0.attn_q_a.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );
}

#[test]
fn repacked_weights_compute_what_the_file_layout_computes() {
    // The same Q8_0 file with its weights as stored and after the repack pass (row
    // groups interleaved for the integer kernels): the integer arithmetic is the
    // same, only the float summation order differs.
    use whale_model::{DeepseekModel, Logits};
    let path = fixtures().join("gguf/v3-q8_0.gguf");
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf/v3-q8_0.expected.json")).unwrap(),
    )
    .unwrap();
    let tokens = ids(&r["tokens"]);
    whale_model::set_repack(false);
    let g = DeepseekModel::load_gguf(&path).unwrap();
    whale_model::set_repack(true);
    let before = g.forward(&tokens, &mut g.new_cache(), Logits::All).unwrap();
    let bytes = g.repack(None);
    assert!(bytes > 0, "nothing was repacked");
    assert_eq!(g.repack(None), 0, "a second pass repacks nothing");
    let after = g.forward(&tokens, &mut g.new_cache(), Logits::All).unwrap();
    let scale = before.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = before
        .iter()
        .zip(&after)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("repacked {bytes} B: max |diff| = {err:.2e} of max |logit| {scale:.2}");
    assert!(err <= 1e-4 * scale, "{err} vs {scale}");
    // A stop flag that is already set repacks nothing.
    whale_model::set_repack(false);
    let h = DeepseekModel::load_gguf(&path).unwrap();
    whale_model::set_repack(true);
    let stop = std::sync::atomic::AtomicBool::new(true);
    assert_eq!(h.repack(Some(&stop)), 0);
}

#[test]
fn batched_step_of_a_quantized_file_equals_each_sequence_alone() {
    // llama.cpp's split `attn_k_b`/`attn_v_b` with integer products: one step carries
    // three decode tokens over caches of different lengths and a short prompt chunk
    // (both absorbed), whose latent products run together. Each item's logits must
    // be the ones its sequence gets alone.
    use whale_model::{BatchItem, DeepseekModel, Logits};
    let g = DeepseekModel::load_gguf(&fixtures().join("gguf/v3-q8_0.gguf")).unwrap();
    let vocab = g.config().vocab_size as u32;
    let seq =
        |s: u32, n: u32| -> Vec<u32> { (0..n).map(|i| (i * 7919 + 31 * s + 1) % vocab).collect() };
    let seqs = [seq(0, 4), seq(1, 9), seq(2, 70), seq(3, 6)];
    let mut alone = Vec::new();
    let mut caches = Vec::new();
    for (k, s) in seqs.iter().enumerate() {
        // The decode sequences have all but their last token cached; the chunk
        // sequence starts empty. Alone, the same tokens run in a step of their own.
        let keep = if k == 3 { 0 } else { s.len() - 1 };
        let (mut c, mut own) = (g.new_cache(), g.new_cache());
        if keep > 0 {
            g.forward(&s[..keep], &mut c, Logits::Last).unwrap();
            g.forward(&s[..keep], &mut own, Logits::Last).unwrap();
        }
        alone.push(g.forward(&s[keep..], &mut own, Logits::All).unwrap());
        caches.push((keep, c));
    }
    let mut items: Vec<BatchItem> = caches
        .iter_mut()
        .zip(&seqs)
        .map(|((keep, c), s)| BatchItem {
            tokens: &s[*keep..],
            cache: c,
            logits: Logits::All,
        })
        .collect();
    let out = g.forward_batch(&mut items).unwrap();
    let v = vocab as usize;
    for (k, (got, want)) in out.iter().zip(&alone).enumerate() {
        assert_eq!(got.len(), if k == 3 { 6 * v } else { v });
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-5 * scale, "sequence {k}: {err} of {scale}");
    }
}
