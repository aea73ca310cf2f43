//! Paged KV cache bookkeeping: which physical blocks each sequence owns.
//!
//! The model holds the KV tensors (`num_blocks * block_size` slots per layer);
//! this module only hands out block ids. A sequence's block table maps its
//! logical block `i` (token positions `i*block_size..(i+1)*block_size`) to a
//! physical block. Blocks are reference counted so that several sequences can
//! share a block: prefix-cache hits and the samples of an `n > 1` request.
//! Only full blocks whose KV has been computed are ever shared, so a shared
//! block is never written again.

use crate::block_pool::{BlockId, BlockPool};
use crate::prefix_cache::BlockHash;
use std::collections::HashMap;

/// Engine-internal id of one sequence (one sample of one request).
pub type SeqId = u64;

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Leading blocks already registered in the prefix cache (or found there).
    num_hashed: usize,
}

#[derive(Debug)]
pub struct BlockManager {
    pool: BlockPool,
    block_size: usize,
    enable_caching: bool,
    tables: HashMap<SeqId, SeqBlocks>,
    prefix_queries: u64,
    prefix_hits: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size: block_size.max(1),
            enable_caching,
            tables: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }
    pub fn num_used_blocks(&self) -> usize {
        self.pool.num_used()
    }
    /// Prompt tokens looked up in the prefix cache.
    pub fn prefix_cache_queries(&self) -> u64 {
        self.prefix_queries
    }
    /// Of those, tokens found cached.
    pub fn prefix_cache_hits(&self) -> u64 {
        self.prefix_hits
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }

    /// The physical blocks of `seq`, in logical order.
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], |t| t.blocks.as_slice())
    }

    /// Longest run of leading full blocks of a sequence (given by its block
    /// hash chain) found in the cache. Capped so that at least one of the
    /// `num_tokens` tokens is left to compute: the step must produce logits.
    /// Takes no references; pass the result to [`Self::allocate_slots`].
    pub fn find_cached_prefix(&self, hashes: &[BlockHash], num_tokens: usize) -> Vec<BlockId> {
        if !self.enable_caching || num_tokens == 0 {
            return Vec::new();
        }
        let max_blocks = (num_tokens - 1) / self.block_size;
        hashes
            .iter()
            .take(max_blocks)
            .map_while(|h| self.pool.lookup(h))
            .collect()
    }

    /// Count one prefix-cache lookup of `queried` tokens of which `hit` were cached.
    pub fn record_prefix_query(&mut self, queried: usize, hit: usize) {
        if self.enable_caching {
            self.prefix_queries += queried as u64;
            self.prefix_hits += hit as u64;
        }
    }

    /// Make `seq`'s block table cover `num_computed + num_new` tokens,
    /// first taking the `cached` prefix blocks (only for a sequence that holds
    /// no blocks yet; `num_computed` then already counts their tokens), then
    /// fresh blocks. All or nothing: returns false, changing nothing, if the
    /// pool cannot supply enough blocks.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        num_computed: usize,
        num_new: usize,
        cached: &[BlockId],
    ) -> bool {
        let table_len = self.tables.get(&seq).map_or(0, |t| t.blocks.len());
        let cached = if table_len == 0 { cached } else { &[] };
        let needed = self.blocks_for(num_computed + num_new);
        let have = table_len + cached.len();
        let fresh = needed.saturating_sub(have);
        // Cached blocks nobody owns sit on the free list; taking them shrinks it.
        let resurrected = cached.iter().filter(|&&b| self.pool.is_free(b)).count();
        if fresh + resurrected > self.pool.num_free() {
            return false;
        }
        let entry = self.tables.entry(seq).or_default();
        for &b in cached {
            self.pool.touch(b);
            entry.blocks.push(b);
        }
        if !cached.is_empty() {
            entry.num_hashed = cached.len();
        }
        for _ in 0..fresh {
            match self.pool.allocate() {
                Some(b) => entry.blocks.push(b),
                None => break, // unreachable: counted above
            }
        }
        true
    }

    /// Register in the prefix cache the full blocks of `seq` whose KV is now
    /// computed (`num_computed` tokens), keyed by the sequence's hash chain.
    pub fn cache_full_blocks(&mut self, seq: SeqId, hashes: &[BlockHash], num_computed: usize) {
        if !self.enable_caching {
            return;
        }
        let Some(t) = self.tables.get_mut(&seq) else {
            return;
        };
        let full = (num_computed / self.block_size)
            .min(hashes.len())
            .min(t.blocks.len());
        if t.num_hashed < full {
            for (&b, &h) in t.blocks[t.num_hashed..full]
                .iter()
                .zip(&hashes[t.num_hashed..full])
            {
                self.pool.set_hash(b, h);
            }
        }
        t.num_hashed = t.num_hashed.max(full);
    }

    /// Give `child` shared references to `parent`'s leading full blocks
    /// covering at most `num_tokens` tokens. Returns the number of tokens
    /// shared (a multiple of the block size).
    pub fn fork(&mut self, parent: SeqId, child: SeqId, num_tokens: usize) -> usize {
        let Some(p) = self.tables.get(&parent) else {
            return 0;
        };
        let k = (num_tokens / self.block_size).min(p.blocks.len());
        let shared: Vec<BlockId> = p.blocks[..k].to_vec();
        let num_hashed = p.num_hashed.min(k);
        self.free(child);
        for &b in &shared {
            self.pool.touch(b);
        }
        self.tables.insert(
            child,
            SeqBlocks {
                blocks: shared,
                num_hashed,
            },
        );
        k * self.block_size
    }

    /// Release every block of `seq`. Tail blocks are released first so that,
    /// among blocks cached at the same time, a prefix's later blocks are evicted
    /// before its earlier ones (which more requests share).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            for &b in t.blocks.iter().rev() {
                self.pool.release(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix_cache::extend_block_hashes;

    fn chain(tokens: &[u32], bs: usize) -> Vec<BlockHash> {
        let mut h = Vec::new();
        extend_block_hashes(&mut h, tokens, &[], bs);
        h
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut m = BlockManager::new(3, 4, true);
        assert!(m.allocate_slots(1, 0, 9, &[]));
        assert_eq!(m.block_table(1).len(), 3);
        assert!(!m.allocate_slots(2, 0, 1, &[]));
        assert!(m.block_table(2).is_empty());
        // Growing within the last block needs nothing new.
        assert!(m.allocate_slots(1, 9, 3, &[]));
        assert!(!m.allocate_slots(1, 12, 1, &[]));
        m.free(1);
        assert_eq!(m.num_used_blocks(), 0);
    }

    #[test]
    fn cached_prefix_is_shared_and_leaves_last_token() {
        let mut m = BlockManager::new(8, 4, true);
        let toks: Vec<u32> = (0..10).collect();
        let h = chain(&toks, 4);
        assert!(m.allocate_slots(1, 0, 10, &[]));
        m.cache_full_blocks(1, &h, 10);
        // Same 10 tokens: 2 full blocks cached.
        let hit = m.find_cached_prefix(&h, 10);
        assert_eq!(hit, m.block_table(1)[..2].to_vec());
        // Exactly 8 tokens (two full blocks): must leave the last token -> 1 block.
        assert_eq!(m.find_cached_prefix(&h[..2], 8).len(), 1);
        assert!(m.allocate_slots(2, 8, 2, &hit));
        assert_eq!(m.block_table(2)[..2], m.block_table(1)[..2]);
        assert_ne!(m.block_table(2)[2], m.block_table(1)[2]);
        assert_eq!(m.pool().ref_count(m.block_table(1)[0]), 2);
        // Free both: cached blocks stay findable.
        m.free(1);
        m.free(2);
        assert_eq!(m.num_used_blocks(), 0);
        assert_eq!(m.find_cached_prefix(&h, 10).len(), 2);
        // A different first block breaks the chain.
        let other: Vec<u32> = std::iter::once(99).chain(1..10).collect();
        assert!(m.find_cached_prefix(&chain(&other, 4), 10).is_empty());
    }

    #[test]
    fn resurrecting_free_cached_blocks_counts_against_free_space() {
        let mut m = BlockManager::new(3, 4, true);
        let toks: Vec<u32> = (0..8).collect();
        let h = chain(&toks, 4);
        assert!(m.allocate_slots(1, 0, 8, &[]));
        m.cache_full_blocks(1, &h, 8);
        m.free(1);
        let hit = m.find_cached_prefix(&h, 9);
        assert_eq!(hit.len(), 2);
        // 2 resurrected + 2 fresh > 3 free.
        assert!(!m.allocate_slots(2, 8, 5, &hit));
        assert!(m.allocate_slots(2, 8, 4, &hit));
        assert_eq!(m.num_free_blocks(), 0);
    }

    #[test]
    fn fork_shares_full_blocks_only() {
        let mut m = BlockManager::new(8, 4, false);
        assert!(m.allocate_slots(1, 0, 10, &[]));
        assert_eq!(m.fork(1, 2, 10), 8);
        assert_eq!(m.block_table(2), &m.block_table(1)[..2]);
        assert_eq!(m.num_used_blocks(), 3);
        assert!(m.allocate_slots(2, 8, 3, &[]));
        assert_eq!(m.num_used_blocks(), 4);
        m.free(1);
        assert_eq!(m.num_used_blocks(), 3);
        m.free(2);
        assert_eq!(m.num_used_blocks(), 0);
        // Caching disabled: nothing is ever found.
        let h = chain(&(0..8).collect::<Vec<_>>(), 4);
        m.cache_full_blocks(1, &h, 8);
        assert!(m.find_cached_prefix(&h, 9).is_empty());
    }
}
