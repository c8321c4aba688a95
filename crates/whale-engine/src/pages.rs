//! The paged latent-KV pool and the prompt-prefix cache that lives in it.
//!
//! Sequences keep their latents in fixed-size pages of tokens (64, DeepSeek's cache
//! unit; [`whale_model::LatentCache`]). The pool counts pages: a request is
//! admitted only when pages for its prompt and its `max_tokens` can be had, so an
//! admitted stream never stalls for memory. Finished sequences leave their cache,
//! cut to whole pages, in a per-scope (per API key) prefix cache; a later prompt
//! with the same prefix shares those pages (reference-counted, no copy) and the
//! cached entries give their pages back to admissions, least recently used first.

use whale_model::LatentCache;

/// Page accounting: how many pages exist and how many are taken.
#[derive(Debug)]
pub struct PagePool {
    page_tokens: usize,
    total: usize,
    used: usize,
}

impl PagePool {
    /// A pool of `total` pages of `page_tokens` tokens.
    pub fn new(total: usize, page_tokens: usize) -> Self {
        PagePool {
            page_tokens: page_tokens.max(1),
            total,
            used: 0,
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

    /// Pages taken.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Pages free.
    pub fn free(&self) -> usize {
        self.total - self.used
    }

    /// Takes `n` pages if that many are free.
    pub fn take(&mut self, n: usize) -> bool {
        if n <= self.free() {
            self.used += n;
            true
        } else {
            false
        }
    }

    /// Returns `n` pages.
    pub fn give(&mut self, n: usize) {
        debug_assert!(n <= self.used);
        self.used -= n.min(self.used);
    }
}

struct Entry {
    scope: String,
    tokens: Vec<u32>,
    cache: LatentCache,
    pages: usize,
    last_used: u64,
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
    /// Pages the cached prefixes hold.
    pub fn pages(&self) -> usize {
        self.entries.iter().map(|e| e.pages).sum()
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
        let limit = prompt.len().saturating_sub(1);
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.scope != scope {
                continue;
            }
            let common = e
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(limit)
                .min(e.cache.len());
            let usable = common / page_tokens * page_tokens;
            if usable > 0 && best.is_none_or(|(_, b)| usable > b) {
                best = Some((i, usable));
            }
        }
        let (i, usable) = best?;
        self.clock += 1;
        self.entries[i].last_used = self.clock;
        Some(PrefixHit {
            cache: self.entries[i].cache.share_prefix(usable),
            tokens: usable,
        })
    }

    /// Keeps `cache` (whose tokens are `tokens`) cut to whole pages, taking its pages
    /// from `pool` (evicting older entries if needed). Entries it extends are dropped.
    pub fn insert(
        &mut self,
        scope: &str,
        mut tokens: Vec<u32>,
        mut cache: LatentCache,
        pool: &mut PagePool,
    ) {
        let keep = cache.len().min(tokens.len()) / pool.page_tokens() * pool.page_tokens();
        if keep == 0 {
            return;
        }
        tokens.truncate(keep);
        cache.truncate(keep);
        // An entry that is a prefix of this one (the previous turn of a conversation) is redundant.
        let mut freed = 0;
        self.entries.retain(|e| {
            let redundant = e.scope == scope
                && e.tokens.len() <= tokens.len()
                && tokens[..e.tokens.len()] == e.tokens[..];
            if redundant {
                freed += e.pages;
            }
            !redundant
        });
        pool.give(freed);
        // Nothing to add if an existing entry already covers these tokens.
        if self.entries.iter().any(|e| {
            e.scope == scope
                && e.tokens.len() >= tokens.len()
                && e.tokens[..tokens.len()] == tokens[..]
        }) {
            return;
        }
        let pages = pool.pages_for(keep);
        while !pool.take(pages) {
            if !self.evict_one(pool) {
                return;
            }
        }
        self.clock += 1;
        self.entries.push(Entry {
            scope: scope.to_string(),
            tokens,
            cache,
            pages,
            last_used: self.clock,
        });
    }

    /// Drops the least recently used entry, returning its pages; false when empty.
    pub fn evict_one(&mut self, pool: &mut PagePool) -> bool {
        let Some(i) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let e = self.entries.swap_remove(i);
        pool.give(e.pages);
        true
    }

    /// Drops every entry.
    pub fn clear(&mut self, pool: &mut PagePool) {
        while self.evict_one(pool) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_counts_pages() {
        let mut p = PagePool::new(4, 64);
        assert_eq!(p.pages_for(0), 0);
        assert_eq!(p.pages_for(1), 1);
        assert_eq!(p.pages_for(64), 1);
        assert_eq!(p.pages_for(65), 2);
        assert!(p.take(3));
        assert!(!p.take(2));
        assert_eq!(p.free(), 1);
        p.give(3);
        assert_eq!(p.used(), 0);
    }
}
