//! `whale serve` and `whale keys`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use whale_engine::{DiskCacheConfig, Engine, EngineConfig};
use whale_server::billing::{money, new_key, parse_money, KeyInfo, Ledger, Prices};
use whale_server::{AppState, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::ModelArg,
    /// Address to listen on. Without API keys only loopback addresses are allowed.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model names clients may send (repeatable). Default: deepseek-chat, deepseek-coder
    /// and the model folder's name.
    #[arg(long = "served-model-name")]
    pub served_model_name: Vec<String>,
    /// Most sequences in one batched step.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most prompt + completion tokens per request (default: the model's, at most 16384).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// KV pages of 64 tokens in the pool (default: enough for max-batch full contexts,
    /// within --kv-cache-gb).
    #[arg(long)]
    pub kv_pages: Option<usize>,
    /// Memory the latent cache may take when --kv-pages is not given, GB.
    #[arg(long, default_value_t = 4.0)]
    pub kv_cache_gb: f64,
    /// Most requests waiting for admission before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Most prompt tokens prefilled per step when no stream is decoding (long prompts
    /// are prefilled in chunks).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Most prompt tokens prefilled per step while streams are decoding (bounds how
    /// long a new prompt stalls the running streams; smaller chunks stall them more
    /// often but less long, and delay the new stream's first token).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk_decoding: usize,
    /// How long a request reaching an idle server may wait for others arriving with
    /// it, so that they start in one step, ms (it stops after 10 ms without a new
    /// request; 0 starts at once).
    #[arg(long, default_value_t = 100)]
    pub gather_ms: u64,
    /// max_tokens when a request gives none.
    #[arg(long, default_value_t = 4096)]
    pub default_max_tokens: usize,
    /// Seconds between keep-alives while a request waits.
    #[arg(long, default_value_t = 10.0)]
    pub keepalive_secs: f64,
    /// Seconds after which an unfinished request's connection is closed (DeepSeek: 30 minutes).
    #[arg(long, default_value_t = 1800.0)]
    pub max_request_secs: f64,
    /// Do not reuse cached prompt prefixes.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Also keep prompt prefixes on disk in this directory (DeepSeek's context caching
    /// on disk): finished requests' latent pages are written there in the background
    /// and read back for later prompts that start the same way, across restarts too.
    /// One server per directory (it holds `DIR/lock`).
    #[arg(long)]
    pub prefix_cache_dir: Option<PathBuf>,
    /// Most disk the prefix cache's files may take, GB (least recently used go first).
    #[arg(long, default_value_t = 20.0)]
    pub prefix_cache_disk_gb: f64,
    /// A file of API keys, one per line (`KEY [name]`, `#` comments); they are added to
    /// the database as unmetered keys (usage recorded, no balance).
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// The billing database (SQLite).
    #[arg(long, default_value = "whale.db")]
    pub db: PathBuf,
    /// Price per million prompt tokens computed (cache miss).
    #[arg(long, default_value_t = 1.0)]
    pub price_input: f64,
    /// Price per million prompt tokens served from the prefix cache.
    #[arg(long, default_value_t = 0.1)]
    pub price_input_cache_hit: f64,
    /// Price per million generated tokens.
    #[arg(long, default_value_t = 2.0)]
    pub price_output: f64,
    /// Worker threads for the model.
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

impl ServeArgs {
    fn prices(&self) -> Prices {
        Prices {
            input_miss: self.price_input,
            input_hit: self.price_input_cache_hit,
            output: self.price_output,
        }
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    let dir = args.model.path()?;
    let folder = crate::open(&dir, args.model.kv_type)?;
    let eos = folder.eos_token_ids();
    let whale_model::ModelFolder {
        model, tokenizer, ..
    } = folder;
    let tok = Arc::new(
        tokenizer
            .context("the model has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")?,
    );
    let ledger = Arc::new(
        Ledger::open(&args.db, args.prices())
            .with_context(|| format!("cannot open the billing database {}", args.db.display()))?,
    );
    if let Some(f) = &args.api_keys {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the key file {}", f.display()))?;
        let mut n = 0;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(2, char::is_whitespace);
            let key = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or("").trim();
            ledger.ensure_key(key, name)?;
            n += 1;
        }
        tracing::info!("{n} keys from {}", f.display());
    }
    let keys = ledger.key_count()?;
    let require_keys = keys > 0;
    if !require_keys {
        if !args.host.is_loopback() {
            bail!(
                "no API keys (none in {} and no --api-keys file): whale serves without keys only on loopback; add keys with `whale keys add` or listen on 127.0.0.1",
                args.db.display()
            );
        }
        eprintln!(
            "whale: no API keys configured, serving OPEN on loopback only (usage is recorded as \"{}\")",
            whale_server::ANONYMOUS
        );
    }
    let cfg = model.config();
    let max_context = args
        .max_context
        .unwrap_or(cfg.max_position_embeddings.min(16384));
    let page_tokens = whale_model::PAGE_TOKENS;
    let page_bytes = model.new_cache().bytes_per_page();
    let kv_pages = args.kv_pages.unwrap_or_else(|| {
        let budget = (args.kv_cache_gb * 1e9 / page_bytes as f64) as usize;
        (args.max_batch * max_context.div_ceil(page_tokens)).min(budget.max(1))
    });
    if kv_pages * page_tokens < max_context {
        tracing::warn!(
            "{kv_pages} KV pages hold {} tokens, less than one full context ({max_context}); longer requests are refused",
            kv_pages * page_tokens
        );
    }
    let kv_bytes = kv_pages * page_bytes;
    let mut names = args.served_model_name.clone();
    if names.is_empty() {
        names = vec!["deepseek-chat".into(), "deepseek-coder".into()];
        if let Some(n) = dir.file_stem().and_then(|s| s.to_str()) {
            names.push(n.to_string());
        }
    }
    let fingerprint = format!("fp_whale_{}", fingerprint(&dir, cfg.num_hidden_layers));
    let model = Arc::new(model);
    let engine = Engine::start(
        model,
        tok.clone(),
        EngineConfig {
            max_batch: args.max_batch,
            max_waiting: args.max_waiting,
            page_tokens,
            total_pages: kv_pages,
            prefill_chunk: args.prefill_chunk,
            prefill_chunk_decoding: args.prefill_chunk_decoding,
            prefix_cache: !args.no_prefix_cache,
            gather_window: std::time::Duration::from_millis(args.gather_ms),
            disk_cache: match &args.prefix_cache_dir {
                Some(d) if !args.no_prefix_cache => {
                    std::fs::create_dir_all(d).with_context(|| {
                        format!("cannot create the prefix cache directory {}", d.display())
                    })?;
                    Some(DiskCacheConfig {
                        dir: d.clone(),
                        budget_bytes: (args.prefix_cache_disk_gb * 1e9) as u64,
                        tag: model_tag(&dir, args.model.kv_type.name())?,
                        read_delay: std::time::Duration::ZERO,
                    })
                }
                _ => None,
            },
            ..EngineConfig::default()
        },
    );
    let state = Arc::new(AppState::new(
        engine,
        tok,
        ledger,
        ServerConfig {
            served_names: names.clone(),
            max_context,
            default_max_tokens: args.default_max_tokens,
            require_keys,
            keepalive: Duration::from_secs_f64(args.keepalive_secs.max(0.05)),
            max_request_time: Duration::from_secs_f64(args.max_request_secs.max(1.0)),
            eos_token_ids: eos,
            fingerprint,
        },
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "whale: serving {} as {} on http://{addr} (routes under /, /v1, /beta); {} KV pages of {page_tokens} tokens ({:.1} MB), context {max_context}, batch {}",
            dir.display(),
            names.join(", "),
            kv_pages,
            kv_bytes as f64 / 1e6,
            args.max_batch
        );
        if let (Some(d), false) = (&args.prefix_cache_dir, args.no_prefix_cache) {
            eprintln!(
                "whale: prompt prefixes also kept on disk in {} (at most {} GB)",
                d.display(),
                args.prefix_cache_disk_gb
            );
        }
        whale_server::serve_on(listener, state).await?;
        Ok::<_, anyhow::Error>(())
    })
}

/// The model's identity for the prefix cache's files: its path, and the size and
/// modification time of every weight and config file, with the cache type; any
/// change to the weights gives another tag, so a cache is never read into another
/// model.
fn model_tag(model: &std::path::Path, kv_type: &str) -> Result<String> {
    let path = model
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", model.display()))?;
    let mut files = if path.is_dir() {
        std::fs::read_dir(&path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "safetensors" | "json" | "gguf"))
            })
            .collect::<Vec<_>>()
    } else {
        vec![path.clone()]
    };
    files.sort();
    let mut text = format!("{}|{kv_type}", path.display());
    for f in files {
        let m = std::fs::metadata(&f)?;
        let t = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        text.push_str(&format!("|{}:{}:{t}", f.display(), m.len()));
    }
    Ok(text)
}

fn fingerprint(dir: &std::path::Path, layers: usize) -> String {
    // FNV-1a of the model path and shape: stable for one deployment, differs between models.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in dir.to_string_lossy().bytes().chain(layers.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a key and print it.
    Add {
        /// A label.
        #[arg(long, default_value = "")]
        name: String,
        /// Topped-up balance (currency units).
        #[arg(long, default_value = "0")]
        balance: String,
        /// Granted (free) balance, spent first.
        #[arg(long, default_value = "0")]
        granted: String,
        /// Requests per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rpm: u32,
        /// Tokens per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        tpm: u32,
        /// Use this key instead of a random one.
        #[arg(long)]
        key: Option<String>,
    },
    /// List keys and balances.
    List,
    /// Add to a key's topped-up balance.
    Topup {
        /// The key.
        key: String,
        /// Amount (currency units).
        amount: String,
    },
    /// Print usage per key.
    Usage {
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Args)]
pub struct KeysArgs {
    /// The billing database (SQLite).
    #[arg(long, default_value = "whale.db", global = true)]
    pub db: PathBuf,
    #[command(subcommand)]
    pub cmd: KeysCmd,
}

pub fn keys(args: KeysArgs) -> Result<()> {
    let ledger = Ledger::open(&args.db, Prices::default())
        .with_context(|| format!("cannot open {}", args.db.display()))?;
    let amount = |s: &str| parse_money(s).with_context(|| format!("bad amount {s:?}"));
    match args.cmd {
        KeysCmd::Add {
            name,
            balance,
            granted,
            rpm,
            tpm,
            key,
        } => {
            let k = KeyInfo {
                key: key.unwrap_or_else(new_key),
                name,
                granted: amount(&granted)?,
                topped_up: amount(&balance)?,
                unlimited: false,
                rpm,
                tpm,
            };
            ledger.add_key(&k)?;
            println!("{}", k.key);
        }
        KeysCmd::List => {
            println!(
                "{:<40} {:<16} {:>12} {:>12} {:>6} {:>8}",
                "key", "name", "granted", "topped_up", "rpm", "tpm"
            );
            for k in ledger.keys()? {
                let (g, t) = if k.unlimited {
                    ("unmetered".to_string(), "-".to_string())
                } else {
                    (money(k.granted), money(k.topped_up))
                };
                println!(
                    "{:<40} {:<16} {:>12} {:>12} {:>6} {:>8}",
                    k.key, k.name, g, t, k.rpm, k.tpm
                );
            }
        }
        KeysCmd::Topup { key, amount: a } => {
            let k = ledger.top_up(&key, amount(&a)?)?;
            println!(
                "{}: topped up {}, balance {}",
                k.key,
                a,
                money(k.granted + k.topped_up)
            );
        }
        KeysCmd::Usage { key } => {
            println!(
                "{:<40} {:>9} {:>12} {:>12} {:>12} {:>12}",
                "key", "requests", "cache_hit", "cache_miss", "completion", "cost"
            );
            for u in ledger.usage(key.as_deref())? {
                // Costs below a cent show with more digits.
                let cost = u.cost as f64 / whale_server::billing::NANO as f64;
                println!(
                    "{:<40} {:>9} {:>12} {:>12} {:>12} {:>12.6}",
                    u.key, u.requests, u.hit, u.miss, u.completion, cost
                );
            }
        }
    }
    Ok(())
}
