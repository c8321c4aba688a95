//! The prefix cache's disk tier: DeepSeek's "context caching on disk", which MLA
//! makes affordable. A finished request's latent pages are written to a file in the
//! background; a later prompt whose prefix is on disk but no longer in memory reads
//! the pages back instead of prefilling them again (the engine reads on a thread of
//! its own, so running streams go on). On a CPU that is the difference between
//! seconds and minutes: a 64-token V2-Lite page is 2 MB in f16, read at disk speed,
//! where prefilling it costs ~2 s of both cores. Files outlive the server, so a
//! restart keeps its cache.
//!
//! A file (`<hash>.wkv`) holds the magic `WHALEKV1`, a little-endian u32 header
//! length, a JSON header (`tag`: the model's identity, `kv_type`, `layers`,
//! `latent_dim`, `page_tokens`, `scope`, `tokens`: every token up to the file's end,
//! `start`, `parent`) and the pages of tokens `start..` as
//! [`LatentCache::write_pages`] writes them. A prefix that extends one already on
//! disk (the next turn of a conversation) is written as a file of its new pages
//! only, naming the file it extends as `parent` (`start` = the parent's tokens); a
//! hit reads the chain from its root, so a conversation of `n` turns writes each
//! page once instead of every earlier page again each turn. A file whose tag or
//! shape differs from the running model's is never read (nor deleted). At most
//! `budget_bytes` of files are kept, the least recently used deleted first (a hit
//! uses the files it extends too, so they are never older than it), with the files
//! that extend it, which cannot be read without it.
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
    /// Every token up to the file's end (its parents' included).
    tokens: Vec<u32>,
    /// Tokens whose pages the parents hold (0 for a file of its own).
    start: usize,
    /// The file this one extends.
    parent: Option<PathBuf>,
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
            let path = self.entries[i].path.clone();
            self.remove(&path);
        }
    }

    /// Forgets and deletes the file at `path` and every file extending it.
    fn remove(&mut self, path: &Path) {
        let mut gone = vec![path.to_path_buf()];
        loop {
            let before = self.entries.len();
            self.entries.retain(|e| {
                let dead =
                    gone.contains(&e.path) || e.parent.as_ref().is_some_and(|p| gone.contains(p));
                if dead {
                    let _ = std::fs::remove_file(&e.path);
                    if !gone.contains(&e.path) {
                        gone.push(e.path.clone());
                    }
                }
                !dead
            });
            if self.entries.len() == before {
                return;
            }
        }
    }

    /// The chain of files to read for entry `i`, root first: (path, start, end tokens).
    fn chain(&self, i: usize) -> Option<Vec<(PathBuf, usize, usize)>> {
        let mut out = Vec::new();
        let mut e = &self.entries[i];
        loop {
            out.push((e.path.clone(), e.start, e.tokens.len()));
            let Some(p) = &e.parent else {
                break;
            };
            e = self.entries.iter().find(|x| &x.path == p)?;
            if out.len() > self.entries.len() {
                return None; // a cycle: never written so, but never loop
            }
        }
        out.reverse();
        Some(out)
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
    /// The files to read, root first: (path, first token, end token).
    chain: Vec<(PathBuf, usize, usize)>,
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
                    let Some((start, parent)) = chain_link(&h, &cfg.dir, tokens.len()) else {
                        continue;
                    };
                    // Gone since the listing (another process): skip it.
                    let Ok(meta) = std::fs::metadata(&path) else {
                        continue;
                    };
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((
                        used,
                        scope.to_string(),
                        tokens,
                        start,
                        parent,
                        path,
                        meta.len(),
                    ));
                }
                _ => {}
            }
        }
        // Least recently used first, as the files' modification times say.
        found.sort_by_key(|f| f.0);
        let mut index = Index::default();
        for (_, scope, tokens, start, parent, path, bytes) in found {
            index.clock += 1;
            index.entries.push(Entry {
                scope,
                tokens,
                start,
                parent,
                path,
                bytes,
                last_used: index.clock,
            });
        }
        // A file whose parent is gone (evicted, damaged) can never be read; removing it
        // removes the files extending it too.
        let held: std::collections::HashSet<&PathBuf> =
            index.entries.iter().map(|e| &e.path).collect();
        let orphans: Vec<PathBuf> = index
            .entries
            .iter()
            .filter(|e| e.parent.as_ref().is_some_and(|p| !held.contains(p)))
            .map(|e| e.path.clone())
            .collect();
        for p in orphans {
            index.remove(&p);
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
        let chain = ix.chain(i)?;
        let chain: Vec<_> = chain.into_iter().filter(|c| c.1 < tokens).collect();
        // The hit and the files it extends are used now; those it extends count as
        // used later (eviction takes the files extending one before it). The order
        // survives a restart through the files' times.
        for (path, _, _) in chain.iter().rev() {
            ix.clock += 1;
            let clock = ix.clock;
            if let Some(e) = ix.entries.iter_mut().find(|e| &e.path == path) {
                e.last_used = clock;
            }
            if let Ok(f) = File::options().write(true).open(path) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        Some(DiskHit {
            chain,
            scope: scope.to_string(),
            prefix: prompt[..tokens].to_vec(),
            tokens,
        })
    }

    /// Reads a hit's pages into `empty` (a new cache of the running model). A file
    /// that cannot be read is dropped from the index and deleted.
    pub fn load(&self, hit: &DiskHit, mut cache: LatentCache) -> std::io::Result<LatentCache> {
        std::thread::sleep(self.cfg.read_delay);
        for (path, start, end) in &hit.chain {
            let end = (*end).min(hit.tokens);
            let mut read = || -> std::io::Result<()> {
                let (h, mut r) = read_header(path)?;
                if header_shape(&h).as_ref() != Some(&self.shape) {
                    return Err(std::io::Error::other("written for another model"));
                }
                // The file must still hold what the index says (another writer, or two
                // prefixes whose names collide, could have replaced it).
                let same = h["scope"].as_str() == Some(hit.scope.as_str())
                    && tokens_of(&h)
                        .is_some_and(|t| t.len() >= end && t[..end] == hit.prefix[..end])
                    && chain_link(&h, &self.cfg.dir, end).is_some_and(|(s, _)| s == *start);
                if !same {
                    return Err(std::io::Error::other("holds another prefix"));
                }
                cache.read_pages(end - start, &mut r)
            };
            if let Err(e) = read() {
                self.lock().remove(path);
                return Err(e);
            }
        }
        Ok(cache)
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
        let parent = {
            let ix = index.lock().unwrap_or_else(|p| p.into_inner());
            // Already on disk: a file of this scope that starts with these tokens.
            if ix.entries.iter().any(|e| {
                e.scope == job.scope && e.tokens.len() >= keep && e.tokens[..keep] == tokens[..]
            }) {
                continue;
            }
            // The longest file of this scope that these tokens extend: write the rest.
            ix.entries
                .iter()
                .filter(|e| e.scope == job.scope && tokens.starts_with(&e.tokens))
                .max_by_key(|e| e.tokens.len())
                .map(|e| (e.path.clone(), e.tokens.len()))
        };
        let start = parent.as_ref().map_or(0, |p| p.1);
        let name = format!("{:016x}", fnv(job.scope.as_bytes(), tokens));
        let path = cfg.dir.join(format!("{name}.wkv"));
        let tmp = cfg.dir.join(format!("{name}.tmp"));
        let parent_name = parent
            .as_ref()
            .and_then(|p| p.0.file_name()?.to_str().map(str::to_string));
        let header = json!({
            "tag": shape.tag, "kv_type": shape.kv_type, "layers": shape.layers,
            "latent_dim": shape.latent_dim, "page_tokens": PAGE_TOKENS,
            "scope": job.scope, "tokens": tokens, "start": start, "parent": parent_name,
        });
        let written = (|| -> std::io::Result<u64> {
            let mut w = BufWriter::new(File::create(&tmp)?);
            let h = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
            w.write_all(MAGIC)?;
            w.write_all(&(h.len() as u32).to_le_bytes())?;
            w.write_all(&h)?;
            job.cache
                .write_pages(start / PAGE_TOKENS..keep / PAGE_TOKENS, &mut w)?;
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
        // The parent went (evicted or damaged) while this was written: unreadable.
        if let Some((p, _)) = &parent {
            if !ix.entries.iter().any(|e| &e.path == p) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
        }
        ix.entries.retain(|e| e.path != path);
        ix.clock += 1;
        let clock = ix.clock;
        ix.entries.push(Entry {
            scope: job.scope,
            tokens: tokens.to_vec(),
            start,
            parent: parent.map(|p| p.0),
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

/// A header's `start` and `parent` (a file in `dir`): where its pages begin and the
/// file holding those before. Files without them (the first format) hold all their
/// pages. `None` if they disagree (a parent with nothing before it, or a start past
/// the file's `len` tokens or between pages).
fn chain_link(h: &Value, dir: &Path, len: usize) -> Option<(usize, Option<PathBuf>)> {
    let start = match &h["start"] {
        Value::Null => 0,
        v => v.as_u64()? as usize,
    };
    let parent = match &h["parent"] {
        Value::Null => None,
        v => {
            let name = v.as_str()?;
            // A bare file name in the same directory, nothing else.
            if Path::new(name).file_name()?.to_str()? != name {
                return None;
            }
            Some(dir.join(name))
        }
    };
    let ok = start.is_multiple_of(PAGE_TOKENS) && start <= len && (start > 0) == parent.is_some();
    ok.then_some((start, parent))
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
