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
        // Q8_0 with llama.cpp's F16 fallback for rows that are not whole blocks.
        let g = DeepseekModel::load_gguf(&fixtures().join(format!("gguf/{name}.gguf"))).unwrap();
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
