//! Content hashes of KV blocks, the keys of the prefix cache.
//!
//! A full block's hash covers everything that determines its keys and values:
//! the hash of the block before it (so a block is only reused behind the very
//! same prefix), its token ids, and "extra keys" for media items overlapping
//! it (placeholder tokens are identical for every image; the item's content
//! hash is what tells two images apart).

use crate::request::MmPlaceholder;
use std::fmt;

/// blake3 hash of one full block and, through the parent chain, of every
/// token before it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// A media item's share of one block: its content hash and where the item
/// starts relative to the block's first token (negative when it started in
/// an earlier block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraKey {
    pub mm_hash: String,
    pub offset_in_block: i64,
}

/// `blake3(parent_hash, token_ids, extra_keys)`, each part length-prefixed so
/// that no two different inputs serialise to the same bytes.
pub fn hash_block(
    parent: Option<&BlockHash>,
    token_ids: &[u32],
    extra_keys: &[ExtraKey],
) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(b"candela-kv-block-v1");
    match parent {
        Some(p) => {
            h.update(&[1]);
            h.update(&p.0);
        }
        None => {
            h.update(&[0]);
        }
    }
    h.update(&(token_ids.len() as u64).to_le_bytes());
    for t in token_ids {
        h.update(&t.to_le_bytes());
    }
    h.update(&(extra_keys.len() as u64).to_le_bytes());
    for k in extra_keys {
        h.update(&(k.mm_hash.len() as u64).to_le_bytes());
        h.update(k.mm_hash.as_bytes());
        h.update(&k.offset_in_block.to_le_bytes());
    }
    BlockHash(*h.finalize().as_bytes())
}

/// Extra keys of the block covering token positions `start..end`: every media
/// item overlapping that range, in the order given.
pub fn block_extra_keys(mm_items: &[MmPlaceholder], start: usize, end: usize) -> Vec<ExtraKey> {
    mm_items
        .iter()
        .filter(|m| m.length > 0 && m.offset < end && m.offset.saturating_add(m.length) > start)
        .map(|m| ExtraKey {
            mm_hash: m.hash.clone(),
            offset_in_block: m.offset as i64 - start as i64,
        })
        .collect()
}

/// Extend `hashes` (the chain of a sequence's full blocks so far) to cover
/// every full block of `tokens`.
pub fn extend_block_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    mm_items: &[MmPlaceholder],
    block_size: usize,
) {
    if block_size == 0 {
        return;
    }
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let (start, end) = (i * block_size, (i + 1) * block_size);
        let extra = block_extra_keys(mm_items, start, end);
        let h = hash_block(hashes.last(), &tokens[start..end], &extra);
        hashes.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tokens_different_parent_differ() {
        let toks = [1u32, 2, 3, 4];
        let a = hash_block(None, &toks, &[]);
        let b = hash_block(None, &[9, 9, 9, 9], &[]);
        let child_a = hash_block(Some(&a), &toks, &[]);
        let child_b = hash_block(Some(&b), &toks, &[]);
        assert_ne!(child_a, child_b);
        // Root vs. child with the same tokens also differ.
        assert_ne!(a, child_a);
        // Deterministic.
        assert_eq!(child_a, hash_block(Some(&a), &toks, &[]));
    }

    #[test]
    fn extra_keys_change_the_hash() {
        let toks = [7u32; 4];
        let plain = hash_block(None, &toks, &[]);
        let img1 = hash_block(
            None,
            &toks,
            &[ExtraKey {
                mm_hash: "img-1".into(),
                offset_in_block: 0,
            }],
        );
        let img2 = hash_block(
            None,
            &toks,
            &[ExtraKey {
                mm_hash: "img-2".into(),
                offset_in_block: 0,
            }],
        );
        let img1_shift = hash_block(
            None,
            &toks,
            &[ExtraKey {
                mm_hash: "img-1".into(),
                offset_in_block: 1,
            }],
        );
        assert_ne!(plain, img1);
        assert_ne!(img1, img2);
        assert_ne!(img1, img1_shift);
    }

    #[test]
    fn extra_keys_cover_overlapping_blocks_only() {
        let items = vec![MmPlaceholder {
            hash: "x".into(),
            offset: 6,
            length: 12,
        }];
        // Blocks of 4: [0,4) no, [4,8) yes (offset 2), [8,12) yes (-2), [16,20) yes (-10), [20,24) no.
        assert!(block_extra_keys(&items, 0, 4).is_empty());
        assert_eq!(block_extra_keys(&items, 4, 8)[0].offset_in_block, 2);
        assert_eq!(block_extra_keys(&items, 8, 12)[0].offset_in_block, -2);
        assert_eq!(block_extra_keys(&items, 16, 20)[0].offset_in_block, -10);
        assert!(block_extra_keys(&items, 20, 24).is_empty());
    }

    #[test]
    fn chain_covers_full_blocks_and_mm_changes_it() {
        let tokens: Vec<u32> = (0..11).collect();
        let mut h = Vec::new();
        extend_block_hashes(&mut h, &tokens, &[], 4);
        assert_eq!(h.len(), 2);
        let mut with_mm = Vec::new();
        let items = vec![MmPlaceholder {
            hash: "img".into(),
            offset: 5,
            length: 2,
        }];
        extend_block_hashes(&mut with_mm, &tokens, &items, 4);
        assert_eq!(h[0], with_mm[0]);
        assert_ne!(h[1], with_mm[1]);
        // Incremental extension equals computing at once.
        let mut inc = Vec::new();
        extend_block_hashes(&mut inc, &tokens[..5], &[], 4);
        extend_block_hashes(&mut inc, &tokens, &[], 4);
        assert_eq!(inc, h);
    }
}
