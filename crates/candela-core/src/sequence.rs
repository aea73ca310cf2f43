//! One sample of one request as the scheduler sees it: its tokens (prompt and
//! output), how many of them have KV in the cache, and its sampling state.

use crate::block_manager::SeqId;
use crate::detokenizer::Detokenizer;
use crate::grammar::Grammar;
use crate::prefix_cache::{extend_block_hashes, BlockHash};
use crate::request::MmPlaceholder;
use crate::sampler::SampleRng;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    pub req_id: u64,
    /// Which of the request's `n` samples this is.
    pub sample_index: usize,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose KV is in the cache (0 after a preemption).
    pub num_computed: usize,
    /// Hash chain of the full blocks of `tokens` (empty without prefix caching).
    pub block_hashes: Vec<BlockHash>,
    pub mm_items: Arc<[MmPlaceholder]>,
    /// Samples to fork off this one once its prompt is prefilled (n - 1 for
    /// sample 0 of a fresh request, otherwise 0). They hold `max_num_seqs`
    /// slots from admission on.
    pub pending_forks: usize,
    pub rng: SampleRng,
    pub detok: Detokenizer,
    /// Prompt tokens served from the prefix cache when first admitted.
    pub num_cached_tokens: Option<usize>,
    /// Where the output stands in the request's grammar (structured outputs).
    pub grammar: Option<Grammar>,
}

impl Sequence {
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
    /// Seats this sequence takes against `max_num_seqs`.
    pub fn seats(&self) -> usize {
        1 + self.pending_forks
    }
    pub fn append_token(&mut self, token: u32, block_size: usize, hashing: bool) {
        self.tokens.push(token);
        if hashing {
            self.update_hashes(block_size);
        }
    }
    pub fn update_hashes(&mut self, block_size: usize) {
        extend_block_hashes(
            &mut self.block_hashes,
            &self.tokens,
            &self.mm_items,
            block_size,
        );
    }
    /// A new sample of the same request, starting from the prompt with no
    /// output and no KV (the scheduler then shares the prompt's blocks).
    pub fn fork(
        &self,
        id: SeqId,
        sample_index: usize,
        rng: SampleRng,
        block_size: usize,
    ) -> Sequence {
        let full_prompt_blocks = self.prompt_len / block_size.max(1);
        Sequence {
            id,
            req_id: self.req_id,
            sample_index,
            tokens: self.tokens[..self.prompt_len].to_vec(),
            prompt_len: self.prompt_len,
            num_computed: 0,
            block_hashes: self
                .block_hashes
                .iter()
                .take(full_prompt_blocks)
                .copied()
                .collect(),
            mm_items: self.mm_items.clone(),
            pending_forks: 0,
            rng,
            detok: self.detok.clone(),
            num_cached_tokens: self.num_cached_tokens,
            grammar: self.grammar.clone(),
        }
    }
}
