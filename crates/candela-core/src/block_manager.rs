//! Paged KV cache bookkeeping: which physical blocks each sequence owns.
//!
//! The model holds the KV tensors (`num_blocks * block_size` slots per layer);
//! this module only hands out block ids. A sequence's block table maps its
//! logical block `i` (token positions `i*block_size..(i+1)*block_size`) to a
//! physical block. Blocks are reference counted so that several sequences can
//! share a block: prefix-cache hits and the samples of an `n > 1` request.
//! Only full blocks whose KV has been computed are ever shared, so a shared
//! block is never written again.
//!
//! When every layer of the model attends over a sliding window (the widest
//! is `window`), a token at position `p` reads no key before `p + 1 - window`.
//! Once a sequence has computed `n` tokens, every later token (of a decode,
//! a prefill chunk, or a bidirectional media span, which extends a token's
//! keys forward but never backward) sits at `n` or after, so the blocks
//! wholly before `n + 1 - window` are dead: they go back to the pool and
//! their table entries become [`NULL_BLOCK`] (vLLM's sliding-window manager
//! does the same with its null block). A sequence then holds at most
//! [`BlockManager::max_blocks_held`] blocks, however long it grows.

use crate::block_pool::{BlockId, BlockPool, NULL_BLOCK};
use crate::prefix_cache::BlockHash;
use std::collections::HashMap;

/// Engine-internal id of one sequence (one sample of one request).
pub type SeqId = u64;

/// See [`BlockManager::max_blocks_held`].
pub fn max_blocks_held(num_tokens: usize, block_size: usize, window: Option<usize>) -> usize {
    let bs = block_size.max(1);
    let all = num_tokens.div_ceil(bs);
    match window.filter(|&w| w > 0) {
        Some(w) => all.min((w - 1).div_ceil(bs) + 1),
        None => all,
    }
}

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
    /// The widest attention window when every layer slides (see the module doc).
    window: Option<usize>,
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
            window: None,
            tables: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// Free the blocks behind `window` (see the module doc); None keeps
    /// every block of a sequence.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window.filter(|&w| w > 0);
        self
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

    /// Leading blocks of a sequence with `num_computed` tokens computed that
    /// no later token reads (always 0 without a window).
    fn num_dead_blocks(&self, num_computed: usize) -> usize {
        self.window.map_or(0, |w| {
            (num_computed + 1).saturating_sub(w) / self.block_size
        })
    }

    /// Most blocks a sequence of `num_tokens` tokens must hold at once (when
    /// computed one token per step): all of them without a window, else the
    /// blocks that a token's window can span.
    pub fn max_blocks_held(&self, num_tokens: usize) -> usize {
        max_blocks_held(num_tokens, self.block_size, self.window)
    }

    /// Most new tokens a sequence with `num_computed` tokens computed can take
    /// in one step so that the blocks it then holds fit in the whole pool.
    pub fn max_new_tokens(&self, num_computed: usize) -> usize {
        let end = (self.num_dead_blocks(num_computed) + self.num_blocks()) * self.block_size;
        end.saturating_sub(num_computed)
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }

    /// The physical blocks of `seq`, in logical order.
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], |t| t.blocks.as_slice())
    }

    /// Longest cached prefix of a sequence (given by its block hash chain),
    /// as leading blocks. Capped so that at least one of the `num_tokens`
    /// tokens is left to compute: the step must produce logits. Without a
    /// window every block of the prefix must be cached. With one, only the
    /// blocks that the first token after the prefix can see (vLLM's rule):
    /// the prefix's dead blocks come back as [`NULL_BLOCK`], cached or not.
    /// The hash chain still proves that the whole prefix matches.
    /// Takes no references; pass the result to [`Self::allocate_slots`].
    pub fn find_cached_prefix(&self, hashes: &[BlockHash], num_tokens: usize) -> Vec<BlockId> {
        if !self.enable_caching || num_tokens == 0 {
            return Vec::new();
        }
        let max_blocks = ((num_tokens - 1) / self.block_size).min(hashes.len());
        if self.window.is_none() {
            return hashes[..max_blocks]
                .iter()
                .map_while(|h| self.pool.lookup(h))
                .collect();
        }
        // Scan right to left: a run of cached blocks ending at block `end`
        // is a hit of `end` blocks once it reaches back to the first live one.
        let mut end = 0;
        for i in (0..max_blocks).rev() {
            if self.pool.lookup(&hashes[i]).is_none() {
                end = 0;
                continue;
            }
            if end == 0 {
                end = i + 1;
            }
            let dead = self.num_dead_blocks(end * self.block_size);
            if i <= dead {
                let block = |j: usize| (j >= dead).then(|| self.pool.lookup(&hashes[j])).flatten();
                return (0..end).map(|j| block(j).unwrap_or(NULL_BLOCK)).collect();
            }
        }
        Vec::new()
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
    /// fresh blocks. All or nothing: returns false, allocating nothing, if
    /// the pool cannot supply enough blocks. Either way the blocks that no
    /// token from `num_computed` on reads (with a window) are freed first.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        num_computed: usize,
        num_new: usize,
        cached: &[BlockId],
    ) -> bool {
        let dead = self.num_dead_blocks(num_computed);
        self.free_dead_blocks(seq, dead);
        let table_len = self.tables.get(&seq).map_or(0, |t| t.blocks.len());
        let cached = if table_len == 0 { cached } else { &[] };
        let needed = self.blocks_for(num_computed + num_new);
        let have = table_len + cached.len();
        let fresh = (have.max(dead)..needed).len();
        // Cached blocks nobody owns sit on the free list; taking them shrinks it.
        let resurrected = cached
            .iter()
            .enumerate()
            .filter(|&(i, &b)| i >= dead && self.pool.is_free(b))
            .count();
        if fresh + resurrected > self.pool.num_free() {
            return false;
        }
        let entry = self.tables.entry(seq).or_default();
        for (i, &b) in cached.iter().enumerate() {
            if i < dead || b == NULL_BLOCK {
                entry.blocks.push(NULL_BLOCK);
            } else {
                self.pool.touch(b);
                entry.blocks.push(b);
            }
        }
        if !cached.is_empty() {
            entry.num_hashed = cached.len();
        }
        for i in have..needed {
            let b = if i < dead {
                Some(NULL_BLOCK)
            } else {
                self.pool.allocate() // Some: counted above
            };
            match b {
                Some(b) => entry.blocks.push(b),
                None => break,
            }
        }
        true
    }

    /// Release `seq`'s blocks before logical block `dead` (front first, so
    /// that the prefix cache evicts a sequence's older blocks first).
    fn free_dead_blocks(&mut self, seq: SeqId, dead: usize) {
        let Some(t) = self.tables.get_mut(&seq) else {
            return;
        };
        let n = dead.min(t.blocks.len());
        for b in &mut t.blocks[..n] {
            if *b != NULL_BLOCK {
                self.pool.release(*b);
                *b = NULL_BLOCK;
            }
        }
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
                .filter(|(&b, _)| b != NULL_BLOCK)
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
        for &b in shared.iter().filter(|&&b| b != NULL_BLOCK) {
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
            for &b in t.blocks.iter().rev().filter(|&&b| b != NULL_BLOCK) {
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

    /// Live entries of a block table (not freed behind the window).
    fn live(m: &BlockManager, seq: SeqId) -> usize {
        m.block_table(seq)
            .iter()
            .filter(|&&b| b != NULL_BLOCK)
            .count()
    }

    #[test]
    fn blocks_behind_the_window_are_freed_as_it_slides() {
        // Window 6, blocks of 4: the token at p reads p-5..=p.
        let mut m = BlockManager::new(8, 4, false).with_window(Some(6));
        assert_eq!(m.max_blocks_held(1000), 3);
        assert!(m.allocate_slots(1, 0, 10, &[]));
        assert_eq!(m.num_used_blocks(), 3);
        for n in 10..40 {
            assert!(m.allocate_slots(1, n, 1, &[]));
            // Positions n-5.. are live: blocks before (n-5)/4 are gone.
            let dead = (n - 5) / 4;
            let t = m.block_table(1);
            assert_eq!(t.len(), (n + 1).div_ceil(4));
            assert!(t[..dead].iter().all(|&b| b == NULL_BLOCK), "n={n} {t:?}");
            assert!(t[dead..].iter().all(|&b| b != NULL_BLOCK), "n={n} {t:?}");
            assert_eq!(m.num_used_blocks(), t.len() - dead);
            assert!(m.num_used_blocks() <= m.max_blocks_held(n + 1));
        }
        m.free(1);
        assert_eq!(m.num_used_blocks(), 0);
        assert_eq!(m.num_free_blocks(), 8);
    }

    #[test]
    fn a_window_admits_sequences_longer_than_the_pool() {
        // 3 blocks of 4 = 12 tokens; a 4-token window holds at most 2 blocks.
        let mut m = BlockManager::new(3, 4, false).with_window(Some(4));
        assert_eq!(m.max_blocks_held(100), 2);
        assert_eq!(m.max_new_tokens(0), 12);
        assert!(m.allocate_slots(1, 0, 12, &[]));
        // The next chunk may reach past the pool's 12 tokens: blocks 0 and 1 die.
        assert_eq!(m.max_new_tokens(12), 8);
        assert!(!m.allocate_slots(2, 0, 1, &[]));
        assert!(m.allocate_slots(1, 12, 8, &[]));
        assert_eq!(m.block_table(1).len(), 5);
        assert_eq!(live(&m, 1), 3);
        let mut n = 20;
        while n < 100 {
            assert!(m.allocate_slots(1, n, 1, &[]), "n={n}");
            n += 1;
        }
        assert_eq!(m.block_table(1).len(), 25);
        assert!(live(&m, 1) <= 2);
        // Without a window the same pool takes 12 tokens and no more.
        let mut full = BlockManager::new(3, 4, false);
        assert_eq!(full.max_blocks_held(100), 25);
        assert_eq!(full.max_new_tokens(12), 0);
        assert!(full.allocate_slots(1, 0, 12, &[]));
        assert!(!full.allocate_slots(1, 12, 1, &[]));
    }

    #[test]
    fn window_prefix_hit_needs_only_the_window_blocks() {
        let mut m = BlockManager::new(5, 4, true).with_window(Some(4));
        let toks: Vec<u32> = (0..9).collect();
        let h = chain(&toks, 4);
        assert!(m.allocate_slots(1, 0, 8, &[]));
        let (b0, b1) = (m.block_table(1)[0], m.block_table(1)[1]);
        m.cache_full_blocks(1, &h, 8);
        // Decoding position 8 frees block 0 (cached: it stays findable).
        assert!(m.allocate_slots(1, 8, 1, &[]));
        assert_eq!(m.block_table(1)[0], NULL_BLOCK);
        assert!(m.pool().is_free(b0));
        m.free(1);
        // Another sequence takes 4 fresh blocks: block 0 (freed first) is evicted.
        assert!(m.allocate_slots(2, 0, 16, &[]));
        assert!(m.block_table(2).contains(&b0));
        m.free(2);
        assert_eq!(m.pool().lookup(&h[0]), None);
        // The token at 8 sees 5..=8: block 1 suffices, block 0 is a null entry.
        let hit = m.find_cached_prefix(&h, 9);
        assert_eq!(hit, vec![NULL_BLOCK, b1]);
        assert!(m.allocate_slots(3, 8, 1, &hit));
        assert_eq!(m.block_table(3)[..2], [NULL_BLOCK, b1]);
        assert_eq!(m.num_used_blocks(), 2);
        assert_eq!(m.pool().ref_count(b1), 1);
        // Without the block the window needs there is no hit.
        m.free(3);
        assert!(m.allocate_slots(4, 0, 20, &[]));
        m.free(4);
        assert_eq!(m.pool().lookup(&h[1]), None);
        assert!(m.find_cached_prefix(&h, 9).is_empty());
        // A window wider than the prefix needs every block (the full rule).
        let mut w = BlockManager::new(5, 4, true).with_window(Some(64));
        assert!(w.allocate_slots(1, 0, 8, &[]));
        w.cache_full_blocks(1, &h, 8);
        w.free(1);
        assert_eq!(w.find_cached_prefix(&h, 9).len(), 2);
        assert!(w.find_cached_prefix(&h, 9).iter().all(|&b| b != NULL_BLOCK));
    }

    #[test]
    fn fork_under_a_window_shares_live_blocks_only() {
        let mut m = BlockManager::new(8, 4, false).with_window(Some(4));
        assert!(m.allocate_slots(1, 0, 8, &[]));
        assert!(m.allocate_slots(1, 8, 2, &[]));
        assert_eq!(m.block_table(1)[0], NULL_BLOCK);
        assert_eq!(m.fork(1, 2, 10), 8);
        assert_eq!(m.block_table(2), &m.block_table(1)[..2]);
        assert_eq!(m.pool().ref_count(m.block_table(1)[1]), 2);
        assert_eq!(m.num_used_blocks(), 2);
        m.free(1);
        m.free(2);
        assert_eq!(m.num_used_blocks(), 0);
    }
}
