//! The pool of physical KV blocks: reference counts, the free list, and the
//! hash -> block map of the prefix cache.
//!
//! Free blocks live on one intrusive doubly-linked list ordered by eviction
//! priority: fresh blocks are taken from its head. A freed block that carries
//! a hash goes to the tail (most recently used, evicted last); a freed block
//! without one goes to the head, since it holds nothing worth keeping. Taking
//! a block from the head evicts its hash. A cache hit on a free block pulls
//! it out of the list wherever it is (O(1)).

use crate::prefix_cache::BlockHash;
use std::collections::HashMap;

pub type BlockId = u32;

/// A block-table entry whose block was freed because no layer can attend to
/// it any more (it lies behind every sliding window). It is no block of the
/// pool: the attention kernels never read it, and reading it is an error.
pub const NULL_BLOCK: BlockId = u32::MAX;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_cnt: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
    in_free_list: bool,
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// All `num_blocks` blocks start free, without hashes, in id order.
    pub fn new(num_blocks: usize) -> Self {
        let n = num_blocks.min(NIL as usize - 1);
        let mut pool = Self {
            blocks: Vec::with_capacity(n),
            head: NIL,
            tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
        };
        for _ in 0..n {
            pool.blocks.push(BlockMeta {
                ref_cnt: 0,
                hash: None,
                prev: NIL,
                next: NIL,
                in_free_list: false,
            });
        }
        for id in 0..n as u32 {
            pool.push_back(id);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with no owner (some may still hold cached content).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks.get(id as usize).map_or(0, |b| b.ref_cnt)
    }

    pub fn block_hash(&self, id: BlockId) -> Option<BlockHash> {
        self.blocks.get(id as usize).and_then(|b| b.hash)
    }

    /// The block holding content `hash`, if cached (owned or free).
    pub fn lookup(&self, hash: &BlockHash) -> Option<BlockId> {
        self.cached.get(hash).copied()
    }

    /// Whether `id` is free (on the free list).
    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks.get(id as usize).is_some_and(|b| b.in_free_list)
    }

    /// Take a fresh block for new content: the head of the free list, its old
    /// hash evicted. Returns it with a reference count of 1.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let meta = &mut self.blocks[id as usize];
        meta.ref_cnt = 1;
        if let Some(h) = meta.hash.take() {
            if self.cached.get(&h) == Some(&id) {
                self.cached.remove(&h);
            }
        }
        Some(id)
    }

    /// Add an owner to `id` (a cache hit or a fork), resurrecting it from the
    /// free list if it had none.
    pub fn touch(&mut self, id: BlockId) {
        let Some(meta) = self.blocks.get(id as usize) else {
            return;
        };
        if meta.in_free_list {
            self.unlink(id);
        }
        let meta = &mut self.blocks[id as usize];
        meta.ref_cnt = meta.ref_cnt.saturating_add(1);
    }

    /// Drop one owner of `id`; with none left the block becomes free (and
    /// stays in the cache if it carries a hash).
    pub fn release(&mut self, id: BlockId) {
        let Some(meta) = self.blocks.get_mut(id as usize) else {
            return;
        };
        if meta.ref_cnt == 0 {
            return;
        }
        meta.ref_cnt -= 1;
        if meta.ref_cnt == 0 {
            if meta.hash.is_some() {
                self.push_back(id);
            } else {
                self.push_front(id);
            }
        }
    }

    /// Record that `id` now holds the content `hash`. Returns false (and does
    /// nothing) if the block already has a hash or another block already holds
    /// that content (the duplicate then simply stays uncached).
    pub fn set_hash(&mut self, id: BlockId, hash: BlockHash) -> bool {
        let Some(meta) = self.blocks.get_mut(id as usize) else {
            return false;
        };
        if meta.hash.is_some() || self.cached.contains_key(&hash) {
            return false;
        }
        meta.hash = Some(hash);
        self.cached.insert(hash, id);
        true
    }

    /// Free-list order, head (next to be evicted) first. For tests and debugging.
    pub fn free_list(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.head;
        while cur != NIL {
            out.push(cur);
            cur = self.blocks[cur as usize].next;
        }
        out
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let m = &self.blocks[id as usize];
            if !m.in_free_list {
                return;
            }
            (m.prev, m.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let m = &mut self.blocks[id as usize];
        m.prev = NIL;
        m.next = NIL;
        m.in_free_list = false;
        self.num_free -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let old_tail = self.tail;
        {
            let m = &mut self.blocks[id as usize];
            m.prev = old_tail;
            m.next = NIL;
            m.in_free_list = true;
        }
        if old_tail == NIL {
            self.head = id;
        } else {
            self.blocks[old_tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn push_front(&mut self, id: BlockId) {
        let old_head = self.head;
        {
            let m = &mut self.blocks[id as usize];
            m.prev = NIL;
            m.next = old_head;
            m.in_free_list = true;
        }
        if old_head == NIL {
            self.tail = id;
        } else {
            self.blocks[old_head as usize].prev = id;
        }
        self.head = id;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix_cache::hash_block;

    fn h(i: u32) -> BlockHash {
        hash_block(None, &[i], &[])
    }

    #[test]
    fn allocate_and_release_counts() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.num_free(), 4);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert_eq!((a, b), (0, 1));
        assert_eq!(p.num_used(), 2);
        p.touch(a);
        assert_eq!(p.ref_count(a), 2);
        p.release(a);
        assert_eq!(p.num_used(), 2);
        p.release(a);
        p.release(b);
        assert_eq!(p.num_free(), 4);
        // Releasing a free block is a no-op, not an underflow.
        p.release(b);
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.free_list().len(), 4);
    }

    #[test]
    fn lru_evicts_oldest_cached_first_and_uncached_before_cached() {
        let mut p = BlockPool::new(4);
        let ids: Vec<_> = (0..4).map(|_| p.allocate().unwrap()).collect();
        assert!(p.allocate().is_none());
        // Cache blocks 0, 1, 2 and free them in the order 2, 0, 1; block 3 uncached.
        for (i, &id) in ids.iter().take(3).enumerate() {
            assert!(p.set_hash(id, h(i as u32)));
        }
        p.release(2);
        p.release(0);
        p.release(1);
        p.release(3);
        // Uncached block 3 goes first, then cached ones in release order.
        assert_eq!(p.free_list(), vec![3, 2, 0, 1]);
        assert_eq!(p.allocate(), Some(3));
        assert_eq!(p.allocate(), Some(2));
        // Block 2's hash got evicted with it; 0 and 1 are still cached.
        assert_eq!(p.lookup(&h(2)), None);
        assert_eq!(p.lookup(&h(0)), Some(0));
        assert_eq!(p.block_hash(2), None);
        // A hit resurrects block 1 out of the middle/tail of the list.
        let hit = p.lookup(&h(1)).unwrap();
        p.touch(hit);
        assert_eq!(p.ref_count(1), 1);
        assert_eq!(p.free_list(), vec![0]);
        assert_eq!(p.allocate(), Some(0));
        assert_eq!(p.lookup(&h(0)), None);
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn duplicate_hash_is_not_registered_twice() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert!(p.set_hash(a, h(7)));
        assert!(!p.set_hash(b, h(7)));
        assert!(!p.set_hash(a, h(8)));
        assert_eq!(p.lookup(&h(7)), Some(a));
        // The uncached duplicate is reused before the cached block.
        p.release(a);
        p.release(b);
        assert_eq!(p.free_list(), vec![b, a]);
    }
}
