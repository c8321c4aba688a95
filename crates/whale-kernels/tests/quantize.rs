//! Quantisation against llama.cpp's own `ggml_quantize_chunk` (the reference
//! quantisers `llama-quantize` uses without an importance matrix), recorded by
//! tools/make_gguf_fixtures.py on rows of several distributions.

use serde_json::Value;
use whale_kernels::quantize::quantize_row;
use whale_kernels::{decode_into, DType};

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn blocks_equal_llama_cpp_quantize() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gguf/quantize.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let n = v["n_per_row"].as_u64().unwrap() as usize;
    let rows: Vec<Vec<f32>> = v["rows_f32_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
                .collect()
        })
        .collect();
    let mut types = vec![];
    for c in v["cases"].as_array().unwrap() {
        let name = c["type"].as_str().unwrap().to_lowercase();
        let dt = [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q5_0,
            DType::Q4K,
            DType::Q6K,
        ]
        .into_iter()
        .find(|d| d.name() == name)
        .unwrap();
        let want = unhex(c["blocks"].as_str().unwrap());
        let rb = dt.bytes_for(n).unwrap();
        assert_eq!(want.len(), rb * rows.len());
        for (i, row) in rows.iter().enumerate() {
            let mut got = vec![0u8; rb];
            quantize_row(dt, row, &mut got);
            let exp = &want[i * rb..(i + 1) * rb];
            if got != exp {
                // Locate the first differing block for the message.
                let (vals, bytes) = dt.block();
                let b = (0..n / vals)
                    .find(|&b| got[b * bytes..(b + 1) * bytes] != exp[b * bytes..(b + 1) * bytes])
                    .unwrap();
                let mut a = vec![0.0; vals];
                let mut e = vec![0.0; vals];
                decode_into(dt, &got[b * bytes..(b + 1) * bytes], &mut a);
                decode_into(dt, &exp[b * bytes..(b + 1) * bytes], &mut e);
                panic!(
                    "{name}: row {i} block {b} differs from llama.cpp:\nwhale {a:?}\nllama {e:?}"
                );
            }
        }
        types.push(name);
    }
    assert_eq!(types, ["q8_0", "q4_0", "q5_0", "q4_k", "q6_k"]);
}
