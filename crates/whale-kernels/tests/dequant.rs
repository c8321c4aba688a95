//! Block dequantisation, bit-exact against llama.cpp's reference as gguf-py
//! implements it (tools/make_gguf_fixtures.py).

use serde_json::Value;
use whale_kernels::{decode_into, DType, MatRef};

#[test]
fn every_block_type_dequantises_bit_exactly() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gguf/dequant.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut seen = vec![];
    for c in v["cases"].as_array().unwrap() {
        let name = c["type"].as_str().unwrap();
        let dt = DType::from_ggml(c["ggml_type"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(dt.name(), name.to_lowercase());
        let hex = c["block_bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<u32> = c["values_f32_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let mut got = vec![0.0f32; want.len()];
        decode_into(dt, &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                *w,
                "{name} value {i}: {g} vs {}",
                f32::from_bits(*w)
            );
        }
        // The same bytes as a one-row matrix decode identically.
        let m = MatRef::new(dt, &bytes, 1, want.len()).unwrap();
        assert_eq!(m.to_f32(), got);
        seen.push(dt);
    }
    for dt in [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::F16,
        DType::BF16,
    ] {
        assert!(seen.contains(&dt), "{dt:?} has no reference case");
    }
    // Rows must be whole blocks.
    assert!(MatRef::new(DType::Q4K, &[0u8; 144], 1, 128).is_none());
    assert_eq!(DType::from_ggml(16), None);
}
