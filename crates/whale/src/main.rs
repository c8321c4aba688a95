//! `whale`: run DeepSeek-family models. JSON goes to stdout, logs to stderr.

mod bench;
mod chat;
mod serve;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use whale_engine::{generate, GenerateRequest, SamplingParams};
use whale_model::{Logits, MlaMode, ModelFolder};

#[derive(Parser)]
#[command(
    name = "whale",
    version,
    about = "Run DeepSeek-V2/V3-family models on CPUs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print logits for every input position as JSON: {"logits": [[...], ...]}.
    Logits {
        #[command(flatten)]
        model: ModelArg,
        /// Comma-separated token ids (no BOS is added).
        #[arg(long)]
        tokens: String,
        /// MLA formulation (auto: expanded for prefill, absorbed for decode).
        #[arg(long, value_enum, default_value_t = Mla::Auto)]
        mla: Mla,
    },
    /// Generate a continuation; streams text, or prints JSON with --json.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        /// Comma-separated prompt token ids.
        #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
        tokens: Option<String>,
        /// Prompt text, tokenized with BOS as the tokenizer config says.
        #[arg(long)]
        prompt: Option<String>,
        /// Send --prompt as a user message through the chat template.
        #[arg(long, requires = "prompt")]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print {"tokens": [...], "text": "..."} instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Tokenize text: {"ids": [...]}. Works on a folder with only tokenizer files.
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// The text.
        #[arg(long)]
        text: String,
        /// Add the tokenizer's special tokens (e.g. BOS).
        #[arg(long)]
        add_special: bool,
    },
    /// Write a Hugging Face model folder as a llama.cpp GGUF file.
    Convert {
        /// The model folder (config.json, *.safetensors, tokenizer files).
        #[arg(long)]
        from: PathBuf,
        /// The GGUF file to write.
        #[arg(long)]
        to: PathBuf,
        /// Type of the 2-D weights; norms and the expert router stay f32, and k-quant
        /// rows that are not multiples of 256 fall back as llama.cpp's do (q4_k → q5_0,
        /// q6_k → q8_0, then f16).
        #[arg(long = "type", value_enum, default_value_t = OutType::F16)]
        out_type: OutType,
        /// `tokenizer.ggml.pre` to write (default: detected from tokenizer.json).
        #[arg(long)]
        tokenizer_pre: Option<String>,
    },
    /// Write a GGUF with a preset's exact shapes and random weights (for speed measurements).
    Synth {
        /// Shapes to use.
        #[arg(long, default_value = "deepseek-v2-lite")]
        preset: String,
        /// Type of the 2-D weights (as for convert).
        #[arg(long = "type", value_enum, default_value_t = OutType::Q4_0)]
        out_type: OutType,
        /// tokenizer.json to embed (the real DeepSeek-V2 one).
        #[arg(long)]
        tokenizer: PathBuf,
        /// The GGUF file to write.
        #[arg(long)]
        out: PathBuf,
        /// Fewer layers than the preset (llama.cpp loads V2-Lite shapes only at 26 or 27).
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Measure prompt processing and generation speed (llama-bench's -p, -n, -d).
    Bench {
        #[command(flatten)]
        model: ModelArg,
        /// Prompt tokens per prompt-processing run.
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        prompt: usize,
        /// Tokens generated per generation run.
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        gen: usize,
        /// Tokens already in the cache when each measurement starts.
        #[arg(short = 'd', long, default_value_t = 0)]
        depth: usize,
        /// Repetitions of each measurement (mean reported).
        #[arg(short = 'r', long, default_value_t = 1)]
        reps: usize,
        /// Worker threads.
        #[arg(short = 't', long)]
        threads: Option<usize>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Sequences decoded together per generation step (tg_tok_s is their total).
        #[arg(short = 'b', long, default_value_t = 1)]
        batch: usize,
    },
    /// Serve the DeepSeek/OpenAI API (chat, completions with FIM, models, balance,
    /// tokenize, health, metrics) with continuous batching and per-key billing.
    Serve(serve::ServeArgs),
    /// Manage API keys, balances and usage in the billing database.
    Keys(serve::KeysArgs),
    /// Interactive chat through the model's chat template (/reset, /exit).
    Chat {
        #[command(flatten)]
        model: ModelArg,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
}

#[derive(Args)]
struct ModelArg {
    /// Model folder (config.json, *.safetensors, tokenizer.json). Default: $WHALE_MODEL,
    /// else the bundled models/whale-tiny-chat.
    #[arg(long)]
    model: Option<PathBuf>,
    /// How the latent cache stores values: f16 (half the memory and the bytes a decode
    /// step reads; llama.cpp's default too), bf16 (as small; attention then multiplies
    /// in bf16, in decode and prefill, about twice as fast on CPUs with AVX-512 BF16,
    /// with three fewer significant bits than f16) or f32 (the forward pass's values bit for bit).
    #[arg(long, default_value = "f16")]
    kv_type: whale_model::KvType,
}

/// Where the bundled default model lives: beside the working directory, or in the
/// source tree this binary was built from.
const BUNDLED: &str = "models/whale-tiny-chat";

impl ModelArg {
    fn path(&self) -> Result<PathBuf> {
        if let Some(p) = &self.model {
            return Ok(p.clone());
        }
        if let Some(p) = std::env::var_os("WHALE_MODEL") {
            return Ok(PathBuf::from(p));
        }
        let local = PathBuf::from(BUNDLED);
        if local.join("config.json").is_file() {
            return Ok(local);
        }
        let built = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(BUNDLED);
        if built.join("config.json").is_file() {
            return Ok(built);
        }
        bail!("no --model given and the bundled model {BUNDLED} was not found; pass --model DIR")
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OutType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q6_k")]
    Q6K,
}

impl OutType {
    fn dtype(self) -> whale_kernels::DType {
        use whale_kernels::DType;
        match self {
            OutType::F32 => DType::F32,
            OutType::F16 => DType::F16,
            OutType::Bf16 => DType::BF16,
            OutType::Q8_0 => DType::Q8_0,
            OutType::Q5_0 => DType::Q5_0,
            OutType::Q4_0 => DType::Q4_0,
            OutType::Q4K => DType::Q4K,
            OutType::Q6K => DType::Q6K,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Mla {
    Auto,
    Absorbed,
    Expanded,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy. Default: generation_config.json's, else greedy.
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold. Default: generation_config.json's, else 1.
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens below min_p × the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Extra stop token ids, comma-separated.
    #[arg(long)]
    stop_token_ids: Option<String>,
    /// Do not stop at the model's end-of-sequence ids.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn request(&self, folder: &ModelFolder, prompt: Vec<u32>) -> Result<GenerateRequest> {
        let g = &folder.generation;
        let sampling = SamplingParams {
            temperature: self.temperature.or(g.temperature).unwrap_or(0.0),
            top_k: self.top_k,
            top_p: self.top_p.or(g.top_p).unwrap_or(1.0),
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        };
        let mut stop_token_ids = if self.ignore_eos {
            vec![]
        } else {
            folder.eos_token_ids()
        };
        if let Some(s) = &self.stop_token_ids {
            stop_token_ids.extend(parse_ids(s)?);
        }
        Ok(GenerateRequest {
            prompt,
            max_tokens: self.max_tokens,
            sampling,
            stop_token_ids,
            stop: self.stop.clone(),
        })
    }
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("bad token id {t:?} in {s:?}"))
        })
        .collect()
}

fn open(dir: &Path, kv_type: whale_model::KvType) -> Result<ModelFolder> {
    let t = Instant::now();
    let mut folder =
        ModelFolder::open(dir).with_context(|| format!("cannot load model {}", dir.display()))?;
    folder.model.set_kv_type(kv_type);
    let c = folder.model.config();
    tracing::info!(
        "loaded {} in {:.2}s: {} layers, {} experts (top-{}), {:.1} MB of weights, latent cache {} B/token ({})",
        dir.display(),
        t.elapsed().as_secs_f64(),
        c.num_hidden_layers,
        c.n_routed_experts,
        c.num_experts_per_tok,
        folder.model.weight_bytes() as f64 / 1e6,
        folder.model.new_cache().bytes_per_token(),
        kv_type.name()
    );
    Ok(folder)
}

/// Opens a model for an interactive command: its weights are repacked (when
/// repacking is on) on a background thread while `f` runs, so the first token comes
/// as soon as the file is mapped (1.1 s for the 8.9 GB V2-Lite Q4_0 file, against
/// ~10 s when the whole file is repacked first on this VM) and later tokens use the
/// faster kernels as each weight's copy completes.
fn with_model<R>(m: &ModelArg, f: impl FnOnce(&ModelFolder) -> Result<R>) -> Result<R> {
    let background = whale_model::repack_enabled();
    whale_model::set_repack(false);
    let folder = open(&m.path()?, m.kv_type)?;
    if !background {
        return f(&folder);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| folder.model.repack(Some(&stop)));
        let r = f(&folder);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn convert(from: &Path, to: &Path, out_type: OutType, tokenizer_pre: Option<String>) -> Result<()> {
    let t = Instant::now();
    let bar = progress_bar();
    let opts = whale_model::ConvertOptions {
        dtype: out_type.dtype(),
        tokenizer_pre,
    };
    let report = whale_model::convert_to_gguf(from, to, &opts, &mut |done, total, name| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(name.to_string());
    })
    .with_context(|| format!("cannot convert {} to {}", from.display(), to.display()))?;
    bar.finish_and_clear();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let size = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB, {:.1}s); {} tensors fell back to another type",
        to.display(),
        report.tensors.len(),
        size as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        report.fallbacks.len()
    );
    for (name, dtype) in &report.fallbacks {
        eprintln!("  {name}: {}", dtype.name());
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Logits { model, tokens, mla } => {
            let mut folder = open(&model.path()?, model.kv_type)?;
            folder.model.set_mla_mode(match mla {
                Mla::Auto => MlaMode::Auto,
                Mla::Absorbed => MlaMode::Absorbed,
                Mla::Expanded => MlaMode::Expanded,
            });
            let ids = parse_ids(&tokens)?;
            if ids.is_empty() {
                bail!("--tokens is empty");
            }
            let m = &folder.model;
            let logits = m.forward(&ids, &mut m.new_cache(), Logits::All)?;
            let rows: Vec<&[f32]> = logits.chunks(m.config().vocab_size).collect();
            println!("{}", json!({ "logits": rows }));
        }
        Cmd::Generate {
            model,
            tokens,
            prompt,
            chat,
            sampling,
            json: as_json,
        } => {
            let dir = model.path()?;
            with_model(&model, |folder| {
                let tok = folder.tokenizer.as_ref();
                let ids = match (&tokens, &prompt) {
                    (Some(t), _) => parse_ids(t)?,
                    (None, Some(p)) => {
                        let tok = tok.with_context(|| {
                            format!("{} has no tokenizer.json; pass --tokens", dir.display())
                        })?;
                        if chat {
                            whale_engine::chat_prompt(tok, &[whale_model::Message::new("user", p)])?
                        } else {
                            tok.encode_prompt(p)?
                        }
                    }
                    (None, None) => bail!("give --tokens or --prompt"),
                };
                let req = sampling.request(folder, ids)?;
                // A reader that goes away (`whale generate … | head -c 100`) ends the
                // output quietly, as for other command-line tools; `println!` would
                // panic on the closed pipe.
                let mut out = std::io::stdout().lock();
                let mut written: std::io::Result<()> = Ok(());
                let g = generate(&folder.model, tok, &req, |piece| {
                    if !as_json && written.is_ok() {
                        written = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
                    }
                })?;
                let end = if as_json {
                    let mut v =
                        json!({ "tokens": g.tokens, "finish_reason": g.finish_reason.as_str() });
                    if let Some(text) = g.text {
                        v["text"] = json!(text);
                    }
                    format!("{v}\n")
                } else {
                    "\n".to_string()
                };
                match written.and_then(|_| out.write_all(end.as_bytes())) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                    r => r.context("cannot write to stdout"),
                }
            })?;
        }
        Cmd::Tokenize {
            model,
            text,
            add_special,
        } => {
            let dir = model.path()?;
            let tok = whale_model::open_tokenizer(&dir)?
                .with_context(|| format!("no tokenizer.json in {}", dir.display()))?;
            println!("{}", json!({ "ids": tok.encode(&text, add_special)? }));
        }
        Cmd::Convert {
            from,
            to,
            out_type,
            tokenizer_pre,
        } => convert(&from, &to, out_type, tokenizer_pre)?,
        Cmd::Synth {
            preset,
            out_type,
            tokenizer,
            out,
            layers,
        } => {
            let t = Instant::now();
            let bar = progress_bar();
            let opts = whale_model::SynthOptions {
                preset,
                dtype: out_type.dtype(),
                tokenizer,
                layers,
            };
            let cfg = whale_model::synth_gguf(&opts, &out, &mut |done, total, name| {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(name.to_string());
            })
            .with_context(|| format!("cannot write {}", out.display()))?;
            bar.finish_and_clear();
            eprintln!(
                "wrote {} ({} layers, {:.2} GB, {:.0}s)",
                out.display(),
                cfg.num_hidden_layers,
                std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) as f64 / 1e9,
                t.elapsed().as_secs_f64()
            );
        }
        Cmd::Bench {
            model,
            prompt,
            gen,
            depth,
            reps,
            threads,
            json,
            batch,
        } => {
            // Not `rayon::current_num_threads()`: asking the global pool its size builds
            // it, and `build_global` below would then fail.
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .context("thread pool")?;
            // Page tables filled at open, so no measured step pays a first-touch fault;
            // not needed when the weights are repacked into memory of their own (the
            // repack reads every page once, then drops it from this process).
            whale_model::set_populate(!whale_model::repack_enabled());
            let t = Instant::now();
            let folder = open(&model.path()?, model.kv_type)?;
            let load_s = t.elapsed().as_secs_f64();
            let args = bench::BenchArgs {
                prompt,
                gen,
                depth,
                reps: reps.max(1),
                threads,
                json,
                batch: batch.max(1),
            };
            bench::run(&folder, load_s, &args)?;
        }
        Cmd::Serve(args) => serve::serve(args)?,
        Cmd::Keys(args) => serve::keys(args)?,
        Cmd::Chat {
            model,
            system,
            sampling,
        } => {
            with_model(&model, |folder| chat::run(folder, system, &sampling))?;
        }
    }
    Ok(())
}
