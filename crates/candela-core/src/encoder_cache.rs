//! Encoder cache: `mm_hash -> encoder output` (the embeddings that replace a
//! media item's placeholder tokens), bounded by the number of embedding rows
//! (tokens) it holds, least recently used out first.
//!
//! A request whose prefix misses the KV cache but whose image is known skips
//! the vision / audio tower. Entries are `Tensor`s (reference counted), so a
//! running request keeps its embeddings alive even after eviction here.

use candle_core::Tensor;
use std::collections::HashMap;

#[derive(Debug)]
struct Entry {
    embeds: Tensor,
    tokens: usize,
    last_use: u64,
}

/// Counters of the encoder cache, as reported in engine stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncoderCacheStats {
    pub queries: u64,
    pub hits: u64,
    /// Embedding rows held.
    pub tokens: usize,
    pub items: usize,
    pub capacity_tokens: usize,
}

#[derive(Debug)]
pub struct EncoderCache {
    capacity_tokens: usize,
    used_tokens: usize,
    entries: HashMap<String, Entry>,
    clock: u64,
    queries: u64,
    hits: u64,
}

impl EncoderCache {
    /// A cache of at most `capacity_tokens` rows; 0 disables it.
    pub fn new(capacity_tokens: usize) -> Self {
        Self { capacity_tokens, used_tokens: 0, entries: HashMap::new(), clock: 0, queries: 0, hits: 0 }
    }

    pub fn enabled(&self) -> bool {
        self.capacity_tokens > 0
    }

    /// Look up an item's output, counting the query.
    pub fn get(&mut self, hash: &str) -> Option<Tensor> {
        if !self.enabled() {
            return None;
        }
        self.queries += 1;
        self.clock += 1;
        let e = self.entries.get_mut(hash)?;
        e.last_use = self.clock;
        self.hits += 1;
        Some(e.embeds.clone())
    }

    /// Whether the item is held (no counting, no recency change).
    pub fn contains(&self, hash: &str) -> bool {
        self.entries.contains_key(hash)
    }

    /// Rows (placeholder tokens) of a held item.
    pub fn tokens_of(&self, hash: &str) -> Option<usize> {
        self.entries.get(hash).map(|e| e.tokens)
    }

    /// Keep `embeds` (`[tokens, hidden]`) under `hash`, evicting the least
    /// recently used entries to make room. Items larger than the whole
    /// cache are not kept.
    pub fn insert(&mut self, hash: &str, embeds: Tensor) {
        let tokens = embeds.dims().first().copied().unwrap_or(0);
        if !self.enabled() || tokens > self.capacity_tokens {
            return;
        }
        if let Some(old) = self.entries.remove(hash) {
            self.used_tokens -= old.tokens;
        }
        while self.used_tokens + tokens > self.capacity_tokens {
            let Some(victim) = self.entries.iter().min_by_key(|(_, e)| e.last_use).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.used_tokens -= e.tokens;
            }
        }
        self.clock += 1;
        self.used_tokens += tokens;
        self.entries.insert(hash.to_string(), Entry { embeds, tokens, last_use: self.clock });
    }

    pub fn stats(&self) -> EncoderCacheStats {
        EncoderCacheStats {
            queries: self.queries,
            hits: self.hits,
            tokens: self.used_tokens,
            items: self.entries.len(),
            capacity_tokens: self.capacity_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rows(n: usize) -> Tensor {
        Tensor::zeros((n, 4), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn evicts_least_recently_used_by_tokens() {
        let mut c = EncoderCache::new(10);
        c.insert("a", rows(4));
        c.insert("b", rows(4));
        assert!(c.get("a").is_some()); // a is now more recent than b
        c.insert("c", rows(4)); // needs 4 more rows: b goes
        assert!(c.contains("a") && c.contains("c") && !c.contains("b"));
        assert_eq!(c.stats().tokens, 8);
        assert_eq!((c.stats().queries, c.stats().hits), (1, 1));
        assert!(c.get("b").is_none());
        assert_eq!((c.stats().queries, c.stats().hits), (2, 1));
    }

    #[test]
    fn oversized_items_and_disabled_cache_keep_nothing() {
        let mut c = EncoderCache::new(3);
        c.insert("big", rows(4));
        assert_eq!(c.stats().items, 0);
        let mut off = EncoderCache::new(0);
        off.insert("a", rows(1));
        assert!(off.get("a").is_none());
        assert_eq!(off.stats().queries, 0);
    }

    #[test]
    fn reinserting_replaces_without_leaking_budget() {
        let mut c = EncoderCache::new(8);
        c.insert("a", rows(4));
        c.insert("a", rows(6));
        assert_eq!(c.stats().tokens, 6);
        assert_eq!(c.stats().items, 1);
    }
}
