//! Model folders as users have them, and clear errors for broken ones.

mod common;
use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;
use whale_model::{Logits, ModelFolder};

/// Copies the v2-lite fixture into a temp folder, rewriting its tensors with `edit`.
fn edited_copy(
    edit: impl Fn(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let src = model_dir("v2-lite");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn open_err(dir: &Path) -> String {
    match ModelFolder::open(dir) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = edited_copy(|m| {
        m.remove("model.layers.1.self_attn.kv_b_proj.weight");
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("missing tensor \"model.layers.1.self_attn.kv_b_proj.weight\""),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn misshaped_tensor_names_file_tensor_and_shapes() {
    let dir = edited_copy(|m| {
        let t = m.get_mut("model.layers.0.self_attn.o_proj.weight").unwrap();
        t.1 = vec![t.1[1], t.1[0]];
    });
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(
        e.contains(
            "\"model.layers.0.self_attn.o_proj.weight\" has shape [48, 64], expected [64, 48]"
        ),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = edited_copy(|m| {
        let t = m.get_mut("model.norm.weight").unwrap();
        t.0 = Dtype::I32;
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("\"model.norm.weight\" has unsupported dtype I32"),
        "{e}"
    );
}

#[test]
fn unknown_model_type_fails_clearly() {
    let dir = edited_copy(|_| {});
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("deepseek_v2", "mixtral");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("unsupported model_type \"mixtral\""),
        "{e}"
    );
}

#[test]
fn fused_expert_layout_gives_the_same_logits() {
    // transformers 5 keeps experts fused in memory: gate_up_proj [E, 2I, d], down_proj [E, d, I].
    let dir = edited_copy(|m| {
        for layer in 1..3 {
            let pre = format!("model.layers.{layer}.mlp.experts");
            let (mut gu, mut dn) = (vec![], vec![]);
            let mut e = 0;
            while let Some(g) = m.remove(&format!("{pre}.{e}.gate_proj.weight")) {
                let u = m.remove(&format!("{pre}.{e}.up_proj.weight")).unwrap();
                let d = m.remove(&format!("{pre}.{e}.down_proj.weight")).unwrap();
                gu.extend(g.2);
                gu.extend(u.2);
                dn.extend(d.2);
                e += 1;
            }
            m.insert(
                format!("{pre}.gate_up_proj"),
                (Dtype::F32, vec![e, 48, 64], gu),
            );
            m.insert(
                format!("{pre}.down_proj"),
                (Dtype::F32, vec![e, 64, 24], dn),
            );
        }
    });
    let folder = ModelFolder::open(dir.path()).unwrap();
    let exp = expected("v2-lite");
    let all = folder
        .model
        .forward(&exp.tokens, &mut folder.model.new_cache(), Logits::All)
        .unwrap();
    assert!(max_abs_diff(&all, &exp.logits) < 1e-4);
}

#[test]
fn missing_folder_and_generation_config() {
    let e = open_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model"), "{e}");
    let f = ModelFolder::open(&model_dir("v3")).unwrap();
    assert_eq!(
        f.eos_token_ids(),
        vec![f.tokenizer.as_ref().unwrap().eos_id().unwrap()]
    );
}
