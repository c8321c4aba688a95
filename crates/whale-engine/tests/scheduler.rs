//! The continuous-batching engine on the bundled tiny chat model: batched answers equal
//! answers alone, admission waits for KV pages, the prefix cache shares pages and is
//! evicted under pressure.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use whale_engine::{
    Engine, EngineConfig, EngineStats, Event, FinishReason, Request, SamplingParams,
};
use whale_model::ModelFolder;

fn engine(cfg: EngineConfig) -> (Engine, Arc<whale_model::Tokenizer>, Vec<u32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/whale-tiny-chat");
    let folder = ModelFolder::open(&dir).unwrap();
    let eos = folder.eos_token_ids();
    let ModelFolder {
        model, tokenizer, ..
    } = folder;
    let tok = Arc::new(tokenizer.unwrap());
    (Engine::start(Arc::new(model), tok.clone(), cfg), tok, eos)
}

fn request(prompt: Vec<u32>, max_tokens: usize, eos: &[u32], scope: &str) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_token_ids: eos.to_vec(),
        stop: vec![],
        logprobs: None,
        cache_scope: scope.into(),
        arrival: Instant::now(),
        skip_special: true,
        constraint: None,
    }
}

/// Runs a receiver to the end: (started hit tokens, text, finish reason, completion tokens).
fn drain(mut rx: UnboundedReceiver<Event>) -> (usize, String, FinishReason, usize) {
    let mut hit = 0;
    let mut text = String::new();
    loop {
        match rx
            .blocking_recv()
            .expect("the engine finishes every request")
        {
            Event::Started {
                prompt_cache_hit_tokens,
            } => hit = prompt_cache_hit_tokens,
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Finished {
                reason,
                text: t,
                usage,
            } => {
                text.push_str(&t);
                return (hit, text, reason, usage.completion_tokens);
            }
        }
    }
}

/// Waits (at most 10 s) until the engine's published counter reads `want` (counters are
/// published after each step, just after the step's events are sent).
fn wait_for(c: &std::sync::atomic::AtomicU64, want: u64) {
    let t = Instant::now();
    while EngineStats::get(c) != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "counter stayed at {}, want {want}",
            EngineStats::get(c)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn chat(tok: &whale_model::Tokenizer, q: &str) -> Vec<u32> {
    whale_engine::chat_prompt(tok, &[whale_model::Message::new("user", q)]).unwrap()
}

/// A chat with a system prompt of `repeats` copies of one sentence (a shared prefix
/// long enough to fill pages), then the question.
fn chat_with_system(tok: &whale_model::Tokenizer, repeats: usize, q: &str) -> Vec<u32> {
    let system = "Count the letter r in the word strawberry. ".repeat(repeats);
    whale_engine::chat_prompt(
        tok,
        &[
            whale_model::Message::new("system", &system),
            whale_model::Message::new("user", q),
        ],
    )
    .unwrap()
}

#[test]
fn batched_answers_equal_answers_alone() {
    let (e, tok, eos) = engine(EngineConfig::default());
    let qs = [
        "What is 37 + 48?",
        "What is 12 + 30?",
        "What is 9 - 4?",
        "What is 6 * 7?",
    ];
    let alone: Vec<String> = qs
        .iter()
        .map(|q| drain(e.submit(request(chat(&tok, q), 32, &eos, q)).unwrap()).1)
        .collect();
    let rxs: Vec<_> = qs
        .iter()
        .map(|q| {
            e.submit(request(chat(&tok, q), 32, &eos, &format!("b{q}")))
                .unwrap()
        })
        .collect();
    let together: Vec<String> = rxs.into_iter().map(|rx| drain(rx).1).collect();
    assert_eq!(alone, together);
    assert_eq!(alone[0].trim(), "37 + 48 = 85");
    let s = e.stats();
    assert!(EngineStats::get(&s.step_sequences) > EngineStats::get(&s.steps));
}

#[test]
fn admission_waits_for_pages_and_the_prefix_cache_gives_way() {
    // Four pages of 64 tokens. Each request reserves pages for prompt + max_tokens:
    // 17 + 150 tokens = 3 pages, so a second one must wait for the first.
    let (e, tok, eos) = engine(EngineConfig {
        total_pages: 4,
        ..Default::default()
    });
    let p = chat(&tok, "What is 37 + 48?");
    let mut long = request(p.clone(), 150, &[], "k");
    long.stop_token_ids.clear();
    let a = e.submit(long.clone()).unwrap();
    let b = e.submit(long.clone()).unwrap();
    let t = Instant::now();
    while EngineStats::get(&e.stats().running) != 1 || EngineStats::get(&e.stats().waiting) != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "expected one running, one waiting"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(EngineStats::get(&e.stats().pages_used), 3);
    let (_, _, ra, na) = drain(a);
    let (_, _, rb, nb) = drain(b);
    assert_eq!(
        (ra, na, rb, nb),
        (FinishReason::Length, 150, FinishReason::Length, 150)
    );
    // Both finished: their caches stay as prefix entries (17 + 149 fed tokens → 2 whole pages).
    wait_for(&e.stats().pages_cached, 2);
    // Too large for the pool at all: refused at submit.
    assert!(e.submit(request(p.clone(), 300, &eos, "k")).is_err());
    // A request that needs all four pages evicts the cached prefix to get in; when it
    // finishes, only its own entry (192 tokens, 3 pages) is cached.
    let (hit, _, _, _) = drain(e.submit(request(p, 230, &[], "other")).unwrap());
    assert_eq!(hit, 0, "another scope never hits");
    wait_for(&e.stats().pages_cached, 3);
}

#[test]
fn prefix_hits_are_whole_pages_of_the_same_scope() {
    let (e, tok, eos) = engine(EngineConfig::default());
    let prompt = chat_with_system(&tok, 6, "What is 37 + 48?");
    assert!(prompt.len() > 64);
    let (h0, a0, _, _) = drain(
        e.submit(request(prompt.clone(), 16, &eos, "alice"))
            .unwrap(),
    );
    let (h1, a1, _, _) = drain(
        e.submit(request(prompt.clone(), 16, &eos, "alice"))
            .unwrap(),
    );
    let (h2, _, _, _) = drain(e.submit(request(prompt.clone(), 16, &eos, "bob")).unwrap());
    assert_eq!(h0, 0);
    assert!(h1 > 0 && h1 % 64 == 0 && h1 < prompt.len(), "{h1}");
    assert_eq!(h2, 0, "caches are isolated per scope");
    assert_eq!(a0, a1, "a cache hit never changes the answer");
}

#[test]
fn a_hit_survives_the_eviction_of_its_own_entry() {
    // Four pages. The first answer leaves one page of prefix; the second request needs
    // all four pages, so that entry is evicted to admit it, after its pages were shared.
    let (e, tok, _) = engine(EngineConfig {
        total_pages: 4,
        ..Default::default()
    });
    let prompt = chat_with_system(&tok, 3, "What is 37 + 48?");
    assert!(prompt.len() > 64 && prompt.len() < 128, "{}", prompt.len());
    let first = drain(e.submit(request(prompt.clone(), 4, &[], "k")).unwrap());
    wait_for(&e.stats().pages_cached, 1);
    let max = 4 * 64 - prompt.len();
    let (hit, _, reason, n) = drain(e.submit(request(prompt.clone(), max, &[], "k")).unwrap());
    assert_eq!((hit, reason, n), (64, FinishReason::Length, max));
    assert_eq!(first.0, 0);
}

#[test]
fn requests_arriving_together_start_in_one_step() {
    // Three requests 50 ms apart reach an idle engine. Gathering (here with a 500 ms
    // gap, so a slow machine cannot split them) starts all three in the first step:
    // one step answers every one-token request. Without it the first runs alone.
    let run = |gather: bool| {
        let (e, tok, eos) = engine(EngineConfig {
            gather_window: if gather {
                Duration::from_secs(2)
            } else {
                Duration::ZERO
            },
            gather_gap: Duration::from_millis(500),
            ..Default::default()
        });
        let rxs: Vec<_> = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
            .iter()
            .map(|q| {
                let rx = e.submit(request(chat(&tok, q), 1, &eos, q)).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                rx
            })
            .collect();
        for rx in rxs {
            assert_eq!(drain(rx).3, 1);
        }
        EngineStats::get(&e.stats().steps)
    };
    assert_eq!(run(true), 1);
    assert!(run(false) > 1);
}

#[test]
fn prefix_hits_take_pages_only_for_what_follows_them() {
    // Three pages. The first answer leaves a one-page prefix; two requests that hit it
    // and need two pages each (the shared one and one of their own) then run side by
    // side with the entry kept: 1 shared + 1 + 1 = 3 pages of memory. Counting each
    // reservation whole (2 + 2, plus the entry) would have made the second wait.
    let (e, tok, _) = engine(EngineConfig {
        total_pages: 3,
        ..Default::default()
    });
    let prompt = chat_with_system(&tok, 3, "What is 37 + 48?");
    assert!(prompt.len() > 64 && prompt.len() < 128, "{}", prompt.len());
    drain(e.submit(request(prompt.clone(), 4, &[], "k")).unwrap());
    wait_for(&e.stats().pages_cached, 1);
    let max = 2 * 64 - prompt.len();
    let rxs: Vec<_> = (0..2)
        .map(|_| e.submit(request(prompt.clone(), max, &[], "k")).unwrap())
        .collect();
    wait_for(&e.stats().running, 2);
    for rx in rxs {
        let (hit, _, reason, n) = drain(rx);
        assert_eq!((hit, reason, n), (64, FinishReason::Length, max));
    }
    // The entry stayed (both hits shared it) and nothing is left running.
    wait_for(&e.stats().running, 0);
    assert_eq!(EngineStats::get(&e.stats().pages_cached), 1);
}

/// Default settings with the prefix cache's disk tier in `dir`.
fn with_disk(dir: &std::path::Path, tag: &str, budget: u64, read_delay: Duration) -> EngineConfig {
    EngineConfig {
        disk_cache: Some(whale_engine::DiskCacheConfig {
            dir: dir.to_path_buf(),
            budget_bytes: budget,
            tag: tag.into(),
            read_delay,
        }),
        ..Default::default()
    }
}

#[test]
fn prefixes_on_disk_outlive_the_engine_and_never_change_answers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = |tag: &str| with_disk(dir.path(), tag, 1 << 30, Duration::ZERO);
    let files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wkv"))
            .collect()
    };
    // First engine: the answer's pages are written in the background.
    let (e, tok, eos) = engine(disk("model-a"));
    let p = chat_with_system(&tok, 6, "What is 37 + 48?");
    assert!(p.len() > 128, "{}", p.len());
    let (h0, a0, _, _) = drain(e.submit(request(p.clone(), 16, &eos, "alice")).unwrap());
    assert_eq!(h0, 0);
    let t = Instant::now();
    while files().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing written");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(e);
    // A new engine (empty memory) reads the prefix back: same answer, hits in pages.
    let (e, _, _) = engine(disk("model-a"));
    let (h1, a1, _, _) = drain(e.submit(request(p.clone(), 16, &eos, "alice")).unwrap());
    assert!(h1 >= 128 && h1 % 64 == 0 && h1 < p.len(), "{h1}");
    assert_eq!(a1, a0, "a disk hit never changes the answer");
    assert_eq!(
        EngineStats::get(&e.stats().prompt_cache_disk_hit_tokens),
        h1 as u64
    );
    // Another scope, or another model's tag, never reads it.
    let (h2, _, _, _) = drain(e.submit(request(p.clone(), 1, &eos, "bob")).unwrap());
    assert_eq!(h2, 0);
    drop(e);
    let (e, _, _) = engine(disk("model-b"));
    let (h3, _, _, _) = drain(e.submit(request(p.clone(), 1, &eos, "alice")).unwrap());
    assert_eq!(h3, 0, "files of another model are not read");
    drop(e);
    // A damaged file is a miss (and is removed), not a wrong answer.
    for f in files() {
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
    }
    let (e, _, _) = engine(disk("model-a"));
    let (h4, a4, _, _) = drain(e.submit(request(p, 16, &eos, "alice")).unwrap());
    assert_eq!((h4, a4), (0, a0));
}

#[test]
fn running_streams_keep_flowing_while_a_prefix_is_read_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = |delay: Duration| with_disk(dir.path(), "m", 1 << 30, delay);
    let (e, tok, eos) = engine(disk(Duration::ZERO));
    let p = chat_with_system(&tok, 6, "What is 37 + 48?");
    let (_, a0, _, _) = drain(e.submit(request(p.clone(), 16, &eos, "alice")).unwrap());
    let t = Instant::now();
    while std::fs::read_dir(dir.path())
        .unwrap()
        .all(|f| f.unwrap().path().extension().is_none_or(|x| x != "wkv"))
    {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing written");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(e);
    // A new engine whose disk takes 3 s per read. Stream A is running when request B
    // (a disk hit) arrives: A must finish while B's prefix is still being read (a read
    // on the engine thread would hold A's remaining tokens until B's read ends).
    let read = Duration::from_secs(3);
    let (e, _, _) = engine(disk(read));
    let mut a = e
        .submit(request(chat(&tok, "Hello"), 24, &[], "bob"))
        .unwrap();
    loop {
        if let Event::Token { .. } = a.blocking_recv().expect("A runs") {
            break;
        }
    }
    let b = e.submit(request(p, 16, &eos, "alice")).unwrap();
    let b_sent = Instant::now();
    let b = std::thread::spawn(move || {
        let mut b = b;
        let started = loop {
            if let Event::Started {
                prompt_cache_hit_tokens,
            } = b.blocking_recv().expect("B starts")
            {
                break (prompt_cache_hit_tokens, Instant::now());
            }
        };
        let (_, text, _, _) = drain(b);
        (started, text)
    });
    let (_, _, reason, n) = drain(a);
    let a_done = Instant::now();
    assert_eq!((reason, n), (FinishReason::Length, 24));
    let ((hit, b_started), b_text) = b.join().unwrap();
    assert!(hit >= 128, "B read its prefix from disk: {hit}");
    assert!(b_started >= b_sent + read, "B waited for its read");
    assert!(a_done < b_started, "A finished during B's read");
    assert_eq!(b_text, a0, "the answer after a disk read is unchanged");
    assert_eq!(
        EngineStats::get(&e.stats().prompt_cache_disk_hit_tokens),
        hit as u64
    );
}

#[test]
fn a_conversation_on_disk_writes_each_page_once() {
    let dir = tempfile::tempdir().unwrap();
    let disk = |budget: u64| with_disk(dir.path(), "m", budget, Duration::ZERO);
    // (path, header length, tokens, start, bytes) of each file.
    let files = || -> Vec<(PathBuf, u64, usize, u64, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wkv"))
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                let hl = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
                let h: serde_json::Value = serde_json::from_slice(&b[12..12 + hl]).unwrap();
                let n = h["tokens"].as_array().unwrap().len();
                let start = h["start"].as_u64().unwrap();
                (p, 12 + hl as u64, n, start, b.len() as u64)
            })
            .collect();
        v.sort_by_key(|f| f.2);
        v
    };
    let wait_files = |n: usize| {
        let t = Instant::now();
        while files().len() < n {
            assert!(t.elapsed() < Duration::from_secs(20), "not written");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (e, tok, eos) = engine(disk(1 << 30));
    // Turn one (one token: nothing generated is fed, the prompt's pages are stored),
    // then turn two, whose prompt starts with all of turn one's.
    let p1 = chat_with_system(&tok, 6, "What is 37 + 48?");
    drain(e.submit(request(p1.clone(), 1, &eos, "alice")).unwrap());
    wait_files(1);
    let p2: Vec<u32> = p1.iter().chain(&p1).copied().collect();
    drain(e.submit(request(p2.clone(), 1, &eos, "alice")).unwrap());
    wait_files(2);
    drop(e);
    let f = files();
    let (root, child) = (&f[0], &f[1]);
    let page = (root.4 - root.1) / (root.2 as u64 / 64);
    assert_eq!(root.3, 0);
    assert_eq!(
        child.3 as usize, root.2,
        "turn two starts where turn one ends"
    );
    assert_eq!(
        child.4 - child.1,
        (child.2 - root.2) as u64 / 64 * page,
        "turn two's file holds its new pages only"
    );
    // After a restart turn two's prefix is read through both files: same answer as
    // an engine that prefills it all.
    let (e, _, _) = engine(disk(1 << 30));
    let (hit, text, _, _) = drain(e.submit(request(p2.clone(), 12, &eos, "alice")).unwrap());
    assert!(hit > root.2 && hit % 64 == 0, "{hit}");
    drop(e);
    let (e, _, _) = engine(EngineConfig::default());
    let (h0, want, _, _) = drain(e.submit(request(p2.clone(), 12, &eos, "alice")).unwrap());
    assert_eq!((h0, text), (0, want));
    drop(e);
    // A budget that cannot hold both evicts the least recently used: turn two's file,
    // as the hit used the file it extends after it.
    let (e, _, _) = engine(disk(root.4 + child.4 - 1));
    // (The engine opens the tier on its thread: a request's answer means it has.)
    drain(e.submit(request(chat(&tok, "Hi"), 1, &eos, "bob")).unwrap());
    assert_eq!(files(), vec![root.clone()]);
    drop(e);
    // Written again (extending the root), then the root is lost: the file that
    // extended it cannot be read alone and goes at the next open.
    let (e, _, _) = engine(disk(1 << 30));
    let (hit, _, _, _) = drain(e.submit(request(p2.clone(), 1, &eos, "alice")).unwrap());
    assert_eq!(hit, root.2);
    wait_files(2);
    drop(e);
    std::fs::remove_file(&root.0).unwrap();
    let (e, _, _) = engine(disk(1 << 30));
    drain(e.submit(request(chat(&tok, "Hi"), 1, &eos, "bob")).unwrap());
    assert!(files().is_empty(), "{:?}", files());
    let (hit, _, _, _) = drain(e.submit(request(p2, 1, &eos, "alice")).unwrap());
    assert_eq!(hit, 0);
}
