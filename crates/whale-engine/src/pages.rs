//! The paged latent-KV pool and the prompt-prefix cache that lives in it.
//!
//! Sequences keep their latents in fixed-size pages of tokens (64, DeepSeek's cache
//! unit; [`whale_model::LatentCache`]). A request is admitted only when pages for its
//! prompt and its `max_tokens` can be had, so an admitted stream never stalls for
//! memory. Finished sequences leave their cache, cut to whole pages, in a per-scope
//! (per API key) prefix cache; a later prompt with the same prefix shares those pages
//! (reference-counted, no copy) and the cached entries give their pages back to
//! admissions, least recently used first.
//!
//! The pool counts memory, not reservations: the pages in use are the distinct pages
//! that running sequences and cached prefixes hold (a page shared by several counts
//! once, [`occupancy`]) plus what running sequences have reserved and not yet
//! filled. So a prefix hit needs only pages for the tokens after it, and evicting an
//! entry whose pages a running sequence still shares frees nothing, as in memory.

use std::collections::HashSet;
use whale_model::LatentCache;

/// The pool's size: how many pages exist and how many tokens each holds.
#[derive(Debug)]
pub struct PagePool {
    page_tokens: usize,
    total: usize,
}

impl PagePool {
    /// A pool of `total` pages of `page_tokens` tokens.
    pub fn new(total: usize, page_tokens: usize) -> Self {
        PagePool {
            page_tokens: page_tokens.max(1),
            total,
        }
    }

    /// Pages needed for `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_tokens)
    }

    /// Tokens per page.
    pub fn page_tokens(&self) -> usize {
        self.page_tokens
    }

    /// Pages in the pool.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Pages in use, as [`occupancy`] counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// All pages taken: held by running sequences or cached prefixes, or reserved by
    /// running sequences for tokens still to come.
    pub used: usize,
    /// Of those, the pages only cached prefixes hold.
    pub cached: usize,
}

/// The pages in use by `running` sequences (each cache with the pages reserved for
/// it: its prompt and `max_tokens`, shared pages included), by reservations that
/// hold no pages yet (`unheld`: a request whose prefix is still being read), and by
/// `cached` prefixes: every distinct page held once, plus each reservation beyond the
/// pages it holds.
pub fn occupancy<'a>(
    running: impl IntoIterator<Item = (&'a LatentCache, usize)>,
    unheld: usize,
    cached: impl IntoIterator<Item = &'a LatentCache>,
) -> Occupancy {
    let mut held = HashSet::new();
    let mut reserved = unheld;
    for (c, r) in running {
        held.extend(c.page_ids());
        reserved += r.saturating_sub(c.pages());
    }
    let by_running = held.len();
    for c in cached {
        held.extend(c.page_ids());
    }
    Occupancy {
        used: held.len() + reserved,
        cached: held.len() - by_running,
    }
}

struct Entry {
    scope: String,
    tokens: Vec<u32>,
    cache: LatentCache,
    last_used: u64,
}

/// Of `candidates` (an index and the tokens it holds), the one sharing the longest
/// prefix with `prompt` in whole pages of `page_tokens`, leaving at least one prompt
/// token to run (its logits start the answer): its index and the tokens usable.
pub(crate) fn longest_prefix<'a>(
    prompt: &[u32],
    page_tokens: usize,
    candidates: impl IntoIterator<Item = (usize, &'a [u32])>,
) -> Option<(usize, usize)> {
    let limit = prompt.len().saturating_sub(1);
    let mut best: Option<(usize, usize)> = None;
    for (i, tokens) in candidates {
        let common = tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(limit);
        let usable = common / page_tokens * page_tokens;
        if usable > 0 && best.is_none_or(|(_, b)| usable > b) {
            best = Some((i, usable));
        }
    }
    best
}

/// Latent caches of earlier requests, cut to whole pages, keyed by token prefix and
/// isolated per scope (the API key): a new prompt that starts with the same tokens
/// reuses their latents and is billed for them as cache hits.
#[derive(Default)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    clock: u64,
}

/// A prefix found for a prompt.
pub struct PrefixHit {
    /// A cache holding the reused tokens' latents.
    pub cache: LatentCache,
    /// Tokens reused (a multiple of the page size, less than the prompt's length).
    pub tokens: usize,
}

impl PrefixCache {
    /// The cached prefixes' caches (for `occupancy`, the engine's page count).
    pub fn caches(&self) -> impl Iterator<Item = &LatentCache> {
        self.entries.iter().map(|e| &e.cache)
    }

    /// Cached prefixes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest cached prefix of `prompt` within `scope`, in whole pages, leaving at
    /// least one prompt token to run (its logits start the answer).
    pub fn lookup(&mut self, scope: &str, prompt: &[u32], page_tokens: usize) -> Option<PrefixHit> {
        let held = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope);
        let (i, usable) = longest_prefix(
            prompt,
            page_tokens,
            held.map(|(i, e)| (i, &e.tokens[..e.tokens.len().min(e.cache.len())])),
        )?;
        self.clock += 1;
        self.entries[i].last_used = self.clock;
        Some(PrefixHit {
            cache: self.entries[i].cache.share_prefix(usable),
            tokens: usable,
        })
    }

    /// Keeps a finished sequence's `cache` (whose tokens are `tokens`) cut to whole
    /// pages of `page_tokens`: memory it already held, so nothing is taken from the
    /// pool. Entries it extends are dropped.
    pub fn insert(
        &mut self,
        scope: &str,
        mut tokens: Vec<u32>,
        mut cache: LatentCache,
        page_tokens: usize,
    ) {
        let keep = cache.len().min(tokens.len()) / page_tokens * page_tokens;
        if keep == 0 {
            return;
        }
        tokens.truncate(keep);
        cache.truncate(keep);
        // An entry that is a prefix of this one (the previous turn of a conversation) is redundant.
        self.entries.retain(|e| {
            !(e.scope == scope
                && e.tokens.len() <= tokens.len()
                && tokens[..e.tokens.len()] == e.tokens[..])
        });
        // Nothing to add if an existing entry already covers these tokens.
        if self.entries.iter().any(|e| {
            e.scope == scope
                && e.tokens.len() >= tokens.len()
                && e.tokens[..tokens.len()] == tokens[..]
        }) {
            return;
        }
        self.clock += 1;
        self.entries.push(Entry {
            scope: scope.to_string(),
            tokens,
            cache,
            last_used: self.clock,
        });
    }

    /// Drops the least recently used entry (its pages are freed unless a running
    /// sequence shares them); false when empty.
    pub fn evict_one(&mut self) -> bool {
        let Some(i) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        self.entries.swap_remove(i);
        true
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_counts_pages() {
        let p = PagePool::new(4, 64);
        assert_eq!(p.pages_for(0), 0);
        assert_eq!(p.pages_for(1), 1);
        assert_eq!(p.pages_for(64), 1);
        assert_eq!(p.pages_for(65), 2);
        assert_eq!(p.total(), 4);
    }

    #[test]
    fn reservations_without_pages_count_as_used() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg_path = dir.join("../../tests/fixtures/models/v2-lite/config.json");
        let cfg = whale_model::ModelConfig::from_file(&cfg_path).unwrap();
        let c = LatentCache::new(&cfg, whale_model::KvType::F32);
        // A running sequence holding nothing yet with 3 pages reserved, and 5 pages
        // reserved for a request whose prefix is still being read.
        let occ = occupancy([(&c, 3)], 5, [&c]);
        assert_eq!((occ.used, occ.cached), (8, 0));
        assert_eq!(occupancy([(&c, 3)], 0, []).used, 3);
    }
}
