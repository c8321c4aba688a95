//! The prefix cache's disk tier: DeepSeek's "context caching on disk", which MLA
//! makes affordable. A finished request's latent pages are written to a file in the
//! background (one file per prefix and scope); a later prompt whose prefix is on
//! disk but no longer in memory reads the pages back instead of prefilling them
//! again (the engine reads on a thread of its own, so running streams go on). On a CPU that is the difference between seconds and minutes: a 64-token
//! V2-Lite page is 2 MB in f16, read at disk speed, where prefilling it costs ~2 s
//! of both cores. Files outlive the server, so a restart keeps its cache.
//!
//! A file (`<hash>.wkv`) holds the magic `WHALEKV1`, a little-endian u32 header
//! length, a JSON header (`tag`: the model's identity, `kv_type`, `layers`,
//! `latent_dim`, `page_tokens`, `scope`, `tokens`) and the pages as
//! [`LatentCache::write_pages`] writes them. A file whose tag or shape differs from
//! the running model's is never read (nor deleted). At most `budget_bytes` of files
//! are kept, the least recently used deleted first; a file that a longer one of the
//! same scope extends is deleted as redundant (the previous turn of a conversation).
//! Best effort, as DeepSeek's: a write that cannot keep up is dropped, a file that
//! cannot be read is a miss. One server per directory: the tier holds `DIR/lock`
//! while open, and a second server finding it held runs without a disk tier.

use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use whale_model::{LatentCache, PAGE_TOKENS};

const MAGIC: &[u8; 8] = b"WHALEKV1";

/// Writes waiting for the writer thread; more are dropped (each holds its pages).
const QUEUE: usize = 8;

/// How long [`DiskCache::open`] waits for a previous holder of the directory's lock
/// (a server, or an engine in this process, still shutting down).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Where and how much the disk tier keeps.
#[derive(Clone, Debug)]
pub struct DiskCacheConfig {
    /// Directory of the cache files (created if missing).
    pub dir: PathBuf,
    /// Most bytes of files kept.
    pub budget_bytes: u64,
    /// The model's identity: files written under another tag are never read. Make
    /// it change whenever the weights do (path, size and modification time of the
    /// files, for instance).
    pub tag: String,
    /// Tests only: every read waits this long first (a slow disk).
    #[doc(hidden)]
    pub read_delay: Duration,
}

struct Entry {
    scope: String,
    tokens: Vec<u32>,
    path: PathBuf,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct Index {
    entries: Vec<Entry>,
    clock: u64,
}

impl Index {
    fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Deletes the least recently used files until the rest fit `budget`.
    fn fit(&mut self, budget: u64) {
        while self.bytes() > budget {
            let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used) else {
                return;
            };
            let e = self.entries.swap_remove(i);
            let _ = std::fs::remove_file(&e.path);
        }
    }
}

/// The shape a file must have to be read into this model's caches.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    tag: String,
    kv_type: String,
    layers: usize,
    latent_dim: usize,
}

impl Shape {
    fn of(tag: &str, c: &LatentCache) -> Self {
        Shape {
            tag: tag.to_string(),
            kv_type: c.kv_type().name().to_string(),
            layers: c.layers(),
            latent_dim: c.latent_dim(),
        }
    }
}

struct Job {
    scope: String,
    tokens: Vec<u32>,
    cache: LatentCache,
}

/// A found prefix on disk: read it with [`DiskCache::load`].
pub struct DiskHit {
    path: PathBuf,
    scope: String,
    /// The prompt's first `tokens` tokens, which the file must start with.
    prefix: Vec<u32>,
    /// Tokens usable (whole pages, fewer than the prompt's).
    pub tokens: usize,
}

/// The disk tier (see the module documentation).
pub struct DiskCache {
    /// `DIR/lock`, locked exclusively (released when the file closes).
    _lock: File,
    cfg: DiskCacheConfig,
    shape: Shape,
    index: Arc<Mutex<Index>>,
    tx: Option<SyncSender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl DiskCache {
    /// Opens (creating) `cfg.dir` and indexes the files there written for caches
    /// shaped like `template` under `cfg.tag`; starts the writer thread.
    pub fn open(cfg: DiskCacheConfig, template: &LatentCache) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cfg.dir)?;
        // Before anything is deleted: another server's in-flight `.tmp` files look
        // like a crash's leftovers, and two budgets over one directory would race.
        let lock = lock_dir(&cfg.dir)?;
        let shape = Shape::of(&cfg.tag, template);
        let mut found = Vec::new();
        for e in std::fs::read_dir(&cfg.dir)? {
            let path = e?.path();
            match path.extension().and_then(|x| x.to_str()) {
                // A write cut short by a crash.
                Some("tmp") => {
                    let _ = std::fs::remove_file(&path);
                }
                Some("wkv") => {
                    let Ok((h, _)) = read_header(&path) else {
                        continue;
                    };
                    if header_shape(&h).as_ref() != Some(&shape) {
                        continue;
                    }
                    let (Some(scope), Some(tokens)) = (h["scope"].as_str(), tokens_of(&h)) else {
                        continue;
                    };
                    // Gone since the listing (another process): skip it.
                    let Ok(meta) = std::fs::metadata(&path) else {
                        continue;
                    };
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((used, scope.to_string(), tokens, path, meta.len()));
                }
                _ => {}
            }
        }
        // Least recently used first, as the files' modification times say.
        found.sort_by_key(|f| f.0);
        let mut index = Index::default();
        for (_, scope, tokens, path, bytes) in found {
            index.clock += 1;
            index.entries.push(Entry {
                scope,
                tokens,
                path,
                bytes,
                last_used: index.clock,
            });
        }
        index.fit(cfg.budget_bytes);
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = sync_channel(QUEUE);
        let worker = {
            let (cfg, shape, index) = (cfg.clone(), shape.clone(), index.clone());
            std::thread::Builder::new()
                .name("whale-kv-disk".into())
                .spawn(move || writer(rx, &cfg, &shape, &index))?
        };
        Ok(DiskCache {
            _lock: lock,
            cfg,
            shape,
            index,
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    /// Files indexed and their bytes.
    pub fn usage(&self) -> (usize, u64) {
        let ix = self.lock();
        (ix.entries.len(), ix.bytes())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest prefix of `prompt` on disk within `scope`, in whole pages, leaving
    /// at least one prompt token to run.
    pub fn lookup(&self, scope: &str, prompt: &[u32]) -> Option<DiskHit> {
        let mut ix = self.lock();
        let held = ix
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope);
        let (i, tokens) = crate::pages::longest_prefix(
            prompt,
            PAGE_TOKENS,
            held.map(|(i, e)| (i, &e.tokens[..])),
        )?;
        ix.clock += 1;
        let clock = ix.clock;
        let e = &mut ix.entries[i];
        e.last_used = clock;
        // The order survives a restart through the files' times.
        if let Ok(f) = File::options().write(true).open(&e.path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(DiskHit {
            path: e.path.clone(),
            scope: scope.to_string(),
            prefix: prompt[..tokens].to_vec(),
            tokens,
        })
    }

    /// Reads a hit's pages into `empty` (a new cache of the running model). A file
    /// that cannot be read is dropped from the index and deleted.
    pub fn load(&self, hit: &DiskHit, mut empty: LatentCache) -> std::io::Result<LatentCache> {
        std::thread::sleep(self.cfg.read_delay);
        let read = || -> std::io::Result<LatentCache> {
            let (h, mut r) = read_header(&hit.path)?;
            if header_shape(&h).as_ref() != Some(&self.shape) {
                return Err(std::io::Error::other("written for another model"));
            }
            // The file must still hold what the index says (another writer, or two
            // prefixes whose names collide, could have replaced it).
            let same = h["scope"].as_str() == Some(hit.scope.as_str())
                && tokens_of(&h).is_some_and(|t| t.starts_with(&hit.prefix));
            if !same {
                return Err(std::io::Error::other("holds another prefix"));
            }
            empty.read_pages(hit.tokens, &mut r)?;
            Ok(empty)
        };
        let got = read();
        if got.is_err() {
            let mut ix = self.lock();
            ix.entries.retain(|e| e.path != hit.path);
            let _ = std::fs::remove_file(&hit.path);
        }
        got
    }

    /// Queues a finished sequence's whole pages (`cache`, whose tokens are `tokens`)
    /// for writing; dropped when the writer is behind.
    pub fn store(&self, scope: &str, tokens: Vec<u32>, cache: LatentCache) {
        if cache.len().min(tokens.len()) < PAGE_TOKENS {
            return;
        }
        let job = Job {
            scope: scope.to_string(),
            tokens,
            cache,
        };
        if let Some(tx) = &self.tx {
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    tracing::debug!("prefix disk cache: writer behind, a write dropped")
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }
}

/// Opens `dir/lock` and locks it exclusively, waiting up to [`LOCK_WAIT`].
fn lock_dir(dir: &Path) -> std::io::Result<File> {
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::other(format!(
                    "{} is held by another whale server (one server per prefix cache directory)",
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

impl Drop for DiskCache {
    /// Finishes the queued writes.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn writer(rx: Receiver<Job>, cfg: &DiskCacheConfig, shape: &Shape, index: &Mutex<Index>) {
    for job in rx {
        let keep = job.cache.len().min(job.tokens.len()) / PAGE_TOKENS * PAGE_TOKENS;
        let tokens = &job.tokens[..keep];
        {
            let ix = index.lock().unwrap_or_else(|p| p.into_inner());
            // Already on disk: a file of this scope that starts with these tokens.
            if ix.entries.iter().any(|e| {
                e.scope == job.scope && e.tokens.len() >= keep && e.tokens[..keep] == tokens[..]
            }) {
                continue;
            }
        }
        let name = format!("{:016x}", fnv(job.scope.as_bytes(), tokens));
        let path = cfg.dir.join(format!("{name}.wkv"));
        let tmp = cfg.dir.join(format!("{name}.tmp"));
        let header = json!({
            "tag": shape.tag, "kv_type": shape.kv_type, "layers": shape.layers,
            "latent_dim": shape.latent_dim, "page_tokens": PAGE_TOKENS,
            "scope": job.scope, "tokens": tokens,
        });
        let written = (|| -> std::io::Result<u64> {
            let mut w = BufWriter::new(File::create(&tmp)?);
            let h = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
            w.write_all(MAGIC)?;
            w.write_all(&(h.len() as u32).to_le_bytes())?;
            w.write_all(&h)?;
            job.cache.write_pages(keep / PAGE_TOKENS, &mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(std::fs::metadata(&path)?.len())
        })();
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("prefix disk cache: writing {}: {e}", path.display());
                let _ = std::fs::remove_file(&tmp);
                continue;
            }
        };
        let mut ix = index.lock().unwrap_or_else(|p| p.into_inner());
        // Files this one extends are redundant.
        ix.entries.retain(|e| {
            let redundant = e.scope == job.scope
                && e.tokens.len() <= keep
                && tokens[..e.tokens.len()] == e.tokens[..]
                && e.path != path;
            if redundant {
                let _ = std::fs::remove_file(&e.path);
            }
            !redundant
        });
        ix.entries.retain(|e| e.path != path);
        ix.clock += 1;
        let clock = ix.clock;
        ix.entries.push(Entry {
            scope: job.scope,
            tokens: tokens.to_vec(),
            path,
            bytes,
            last_used: clock,
        });
        ix.fit(cfg.budget_bytes);
    }
}

/// FNV-1a over the scope and the tokens: the file's name.
fn fnv(scope: &[u8], tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = scope
        .iter()
        .copied()
        .chain([0xff])
        .chain(tokens.iter().flat_map(|t| t.to_le_bytes()));
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A file's header, and the reader positioned at its pages.
fn read_header(path: &Path) -> std::io::Result<(Value, BufReader<File>)> {
    let mut r = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(std::io::Error::other("not a whale prefix-cache file"));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(std::io::Error::other("header too long"));
    }
    let mut h = vec![0u8; len];
    r.read_exact(&mut h)?;
    let h = serde_json::from_slice(&h).map_err(std::io::Error::other)?;
    Ok((h, r))
}

fn header_shape(h: &Value) -> Option<Shape> {
    if h["page_tokens"].as_u64()? as usize != PAGE_TOKENS {
        return None;
    }
    Some(Shape {
        tag: h["tag"].as_str()?.to_string(),
        kv_type: h["kv_type"].as_str()?.to_string(),
        layers: h["layers"].as_u64()? as usize,
        latent_dim: h["latent_dim"].as_u64()? as usize,
    })
}

fn tokens_of(h: &Value) -> Option<Vec<u32>> {
    h["tokens"]
        .as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use whale_model::{KvType, ModelConfig};

    #[test]
    fn one_open_tier_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/whale-tiny-chat/config.json"),
        )
        .unwrap();
        let template = LatentCache::new(&ModelConfig::from_json_str(&text).unwrap(), KvType::F16);
        let cfg = DiskCacheConfig {
            dir: dir.path().to_path_buf(),
            budget_bytes: 1 << 20,
            tag: "t".into(),
            read_delay: Duration::ZERO,
        };
        // Another writer's file in flight survives a second open, which is refused.
        let first = DiskCache::open(cfg.clone(), &template).unwrap();
        let inflight = dir.path().join("0123.tmp");
        std::fs::write(&inflight, b"partial").unwrap();
        let t = Instant::now();
        let err = DiskCache::open(cfg.clone(), &template)
            .err()
            .expect("second open");
        assert!(
            t.elapsed() >= LOCK_WAIT,
            "it waits for a holder shutting down"
        );
        assert!(err.to_string().contains("another whale server"), "{err}");
        assert!(inflight.exists());
        // Once the first closes, the directory opens again (and the leftover goes).
        drop(first);
        let _again = DiskCache::open(cfg, &template).unwrap();
        assert!(!inflight.exists());
    }
}
