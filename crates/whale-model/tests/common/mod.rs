//! Shared helpers for fixture tests.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub struct Expected {
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
    pub raw: Value,
}

pub fn floats(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(model_dir(name).join("expected.json")).unwrap();
    let raw: Value = serde_json::from_str(&text).unwrap();
    Expected {
        tokens: ids(&raw["tokens"]),
        logits: floats(&raw["logits"]),
        greedy: ids(&raw["greedy"]),
        raw,
    }
}

/// Max absolute difference between two row sets.
pub fn max_abs_diff(a: &[f32], b: &[Vec<f32>]) -> f32 {
    let flat: Vec<f32> = b.iter().flatten().copied().collect();
    assert_eq!(a.len(), flat.len(), "logit count");
    a.iter()
        .zip(&flat)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
