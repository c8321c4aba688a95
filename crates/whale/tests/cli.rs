//! The `whale` command line, as tooling relies on it.

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn whale(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_whale"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `whale chat ARGS` fed `input` on stdin: (stdout, stderr); asserts success.
fn chat(args: &[&str], input: &[u8]) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_whale"))
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap())
        .unwrap()
}

fn csv(v: &Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn logits_prints_one_row_per_position() {
    let exp = expected("v2");
    let dir = fixture("v2");
    // An f32 cache computes what transformers computes to rounding; the default f16
    // cache rounds the latents, the bf16 one more so (bounded in tests/forward.rs).
    for (kv, bound) in [("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1)] {
        let (ok, out, err) = whale(&[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--kv-type",
            kv,
            "--tokens",
            &csv(&exp["tokens"]),
        ]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let got = v["logits"].as_array().unwrap();
        let want = exp["logits"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.as_array().unwrap().iter().zip(w.as_array().unwrap()) {
                let d = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
                assert!(d < bound, "--kv-type {kv}: logit differs by {d}");
            }
        }
    }
    let (ok, _, err) = whale(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--kv-type",
        "f8",
        "--tokens",
        "1",
    ]);
    assert!(!ok && err.contains("unknown cache type"), "{err}");
}

#[test]
fn generate_json_gives_greedy_tokens_and_text() {
    let exp = expected("v3");
    let dir = fixture("v3");
    let tokens = csv(&exp["tokens"]);
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens,
        "--max-tokens",
        "32",
    ];
    let (ok, out, err) =
        whale(&[&args[..], &["--temperature", "0", "--json", "--ignore-eos"]].concat());
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens"], exp["greedy"]);
    assert!(v["text"].is_string());
    assert_eq!(v["finish_reason"], "length");
    // Without --ignore-eos generation ends at the first EOS, if greedy produces one.
    let eos = 1u64;
    let (ok, out, _) = whale(&[&args[..], &["--temperature", "0", "--json"]].concat());
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    let greedy: Vec<u64> = exp["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let n = greedy
        .iter()
        .position(|&t| t == eos)
        .map(|p| p + 1)
        .unwrap_or(32);
    assert_eq!(v["tokens"].as_array().unwrap().len(), n);
}

#[test]
fn generate_prompt_streams_text() {
    let dir = fixture("v2-lite");
    let d = dir.to_str().unwrap();
    let (ok, json_out, err) = whale(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--json",
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 8);
    let (ok, streamed, _) = whale(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--ignore-eos",
    ]);
    assert!(ok);
    assert_eq!(streamed.trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn generate_stops_quietly_when_its_reader_goes_away() {
    // `whale generate … | head -c 1`: stdout closed before the text ends.
    let dir = fixture("v2-lite");
    let mut child = Command::new(env!("CARGO_BIN_EXE_whale"))
        .args(["generate", "--model", dir.to_str().unwrap()])
        .args(["--prompt", "Hello", "--max-tokens", "8", "--ignore-eos"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn tokenize_works_with_only_tokenizer_files() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("v2-lite").join(f), tmp.path().join(f)).unwrap();
    }
    let d = tmp.path().to_str().unwrap();
    let (ok, out, err) = whale(&["tokenize", "--model", d, "--text", "Hello whale"]);
    assert!(ok, "{err}");
    let plain: Value = serde_json::from_str(&out).unwrap();
    let (_, out, _) = whale(&[
        "tokenize",
        "--model",
        d,
        "--text",
        "Hello whale",
        "--add-special",
    ]);
    let special: Value = serde_json::from_str(&out).unwrap();
    assert!(!plain["ids"].as_array().unwrap().is_empty());
    // The fixture tokenizer has no post-processor, so both agree; the real one is tested in whale-model.
    assert_eq!(plain, special);
}

#[test]
fn chat_answers_resets_and_exits() {
    let dir = fixture("v2-lite");
    let d = dir.to_str().unwrap();
    let args = ["--model", d, "--max-tokens", "6", "--temperature", "0"];
    let (stdout, stderr) = chat(&args, b"Hi\nAnd again\n/reset\nHi\n/exit\n");
    let turns: Vec<&str> = stdout.lines().collect();
    assert!(turns.len() >= 3, "{stdout:?}");
    // After /reset the same question gets the same greedy answer as the first time.
    assert_eq!(turns[0], turns[turns.len() - 1], "{stdout:?}");
    assert!(stderr.contains("conversation cleared"));
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = fixture("v2-lite");
    let d = dir.to_str().unwrap();
    let (ok, _, err) = whale(&["logits", "--model", d, "--tokens", "1,x"]);
    assert!(!ok && err.contains("bad token id \"x\""), "{err}");
    let (ok, _, err) = whale(&["logits", "--model", d, "--tokens", "1,100000"]);
    assert!(!ok && err.contains("out of range"), "{err}");
    let (ok, _, err) = whale(&["logits", "--model", "/no/such/model", "--tokens", "1"]);
    assert!(!ok && err.contains("/no/such/model"), "{err}");
}

#[test]
fn gguf_files_run_from_the_command_line() {
    let gguf =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/v3-f32.gguf");
    let exp = expected("v3");
    let tokens = csv(&exp["tokens"]);
    let g = gguf.to_str().unwrap();
    let (ok, out, err) = whale(&[
        "generate",
        "--model",
        g,
        "--tokens",
        &tokens,
        "--max-tokens",
        "32",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens"], exp["greedy"]);
    // The tokenizer comes from the file's metadata.
    assert!(v["text"].is_string(), "{v}");
    let (ok, out, err) = whale(&["logits", "--model", g, "--tokens", "1,2,3"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 3);
}

#[test]
fn bench_reports_json_with_and_without_a_thread_count() {
    let gguf =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/v3-f32.gguf");
    let g = gguf.to_str().unwrap();
    for extra in [&[][..], &["--threads", "1", "-b", "2"][..]] {
        let mut args = vec![
            "bench", "--model", g, "-p", "8", "-n", "4", "-d", "4", "--json",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = whale(&args);
        assert!(ok, "{args:?}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        for key in [
            "pp_tok_s",
            "tg_tok_s",
            "kv_bytes_per_token",
            "peak_rss_bytes",
        ] {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
        }
        assert!(v["threads"].as_u64().is_some_and(|t| t >= 1), "{v}");
    }
}

#[test]
fn convert_writes_a_gguf_that_chats_on_its_own() {
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/whale-tiny-chat");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("whale-tiny-chat-q8_0.gguf");
    let g = gguf.to_str().unwrap();
    let (ok, _, err) = whale(&[
        "convert",
        "--from",
        bundled.to_str().unwrap(),
        "--to",
        g,
        "--type",
        "q8_0",
        "--tokenizer-pre",
        "gpt-2",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("wrote") && err.contains("67 tensors"), "{err}");
    // Same ids from the GGUF's own tokenizer as from tokenizer.json.
    let text = "What is 37 + 48?";
    let (_, from_gguf, _) = whale(&["tokenize", "--model", g, "--text", text]);
    let (_, from_dir, _) = whale(&[
        "tokenize",
        "--model",
        bundled.to_str().unwrap(),
        "--text",
        text,
    ]);
    assert_eq!(from_gguf, from_dir);
    // Chat through the template stored in the file, with nothing beside it.
    let (stdout, _) = chat(&["--model", g, "--temperature", "0"], b"What is 37 + 48?\n");
    assert_eq!(stdout.trim(), "37 + 48 = 85");
    // A tokenizer whale cannot name is refused with the way out.
    let (ok, _, err) = whale(&[
        "convert",
        "--from",
        bundled.to_str().unwrap(),
        "--to",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--tokenizer-pre"), "{err}");
    assert!(!dir.path().join("x.gguf").exists());
}

#[test]
fn keys_add_list_topup_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("b.db");
    let db = db.to_str().unwrap();
    let (ok, key, err) = whale(&[
        "keys",
        "add",
        "--db",
        db,
        "--name",
        "alice",
        "--balance",
        "10",
        "--granted",
        "1.5",
        "--rpm",
        "60",
    ]);
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("sk-") && key.len() == 35, "{key}");
    let (ok, list, _) = whale(&["keys", "list", "--db", db]);
    assert!(ok);
    let row = list.lines().find(|l| l.starts_with(&key)).unwrap();
    assert!(
        row.contains("alice") && row.contains("1.50") && row.contains("10.00"),
        "{row}"
    );
    let (ok, out, _) = whale(&["keys", "topup", &key, "2.25", "--db", db]);
    assert!(ok && out.contains("balance 13.75"), "{out}");
    let (ok, _, err) = whale(&["keys", "topup", "sk-nobody", "1", "--db", db]);
    assert!(!ok && err.contains("no such API key"), "{err}");
    let (ok, out, _) = whale(&["keys", "usage", "--db", db]);
    assert!(ok && out.contains("requests"), "{out}");
    // A non-loopback address without keys is refused; with keys in the database it is not
    // refused for that reason (it would serve), so only the refusal is checked here.
    let empty = dir.path().join("empty.db");
    let (ok, _, err) = whale(&[
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--db",
        empty.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("only on loopback"), "{err}");
}
