//! Encoder cache: `mm_hash -> encoder output` (the embeddings that replace a
//! media item's placeholder tokens), bounded by the number of embedding rows
//! (tokens) it holds, least recently used out first.
//!
//! A request whose prefix misses the KV cache but whose image is known skips
//! the vision / audio tower. Entries are `Tensor`s (reference counted), so a
//! running request keeps its embeddings alive even after eviction here.

use candle_core::Tensor;

use crate::lru::WeightedLru;

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

/// Encoder outputs by `mm_hash`, weighted by their rows.
#[derive(Debug)]
pub struct EncoderCache(WeightedLru<Tensor>);

impl EncoderCache {
    /// A cache of at most `capacity_tokens` rows; 0 disables it.
    pub fn new(capacity_tokens: usize) -> Self {
        Self(WeightedLru::new(capacity_tokens))
    }

    pub fn enabled(&self) -> bool {
        self.0.enabled()
    }

    /// Look up an item's output, counting the query.
    pub fn get(&mut self, hash: &str) -> Option<Tensor> {
        self.0.get(hash).cloned()
    }

    /// Whether the item is held (no counting, no recency change).
    pub fn contains(&self, hash: &str) -> bool {
        self.0.contains(hash)
    }

    /// Rows (placeholder tokens) of a held item.
    pub fn tokens_of(&self, hash: &str) -> Option<usize> {
        self.0.weight_of(hash)
    }

    /// Keep `embeds` (`[tokens, hidden]`) under `hash`, evicting the least
    /// recently used entries to make room. Items larger than the whole
    /// cache are not kept.
    pub fn insert(&mut self, hash: &str, embeds: Tensor) {
        let tokens = embeds.dims().first().copied().unwrap_or(0);
        self.0.insert(hash, embeds, tokens);
    }

    pub fn stats(&self) -> EncoderCacheStats {
        let (queries, hits) = self.0.counters();
        EncoderCacheStats {
            queries,
            hits,
            tokens: self.0.used(),
            items: self.0.len(),
            capacity_tokens: self.0.capacity(),
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
