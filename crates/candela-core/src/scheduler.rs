//! Continuous batching, vLLM v1 style.
//!
//! There are no separate prefill and decode phases: every sequence has
//! `num_tokens` tokens of which `num_computed` have KV in the cache, and a step
//! gives each scheduled sequence some of its uncomputed tokens. A decode is a
//! sequence with one uncomputed token (its last sample); a prefill, possibly
//! chunked, is one with many. Each step builds one ragged batch under a token
//! budget:
//!
//! 1. Running sequences first, oldest first: each takes all its uncomputed
//!    tokens or what is left of the budget (chunked prefill). If the pool has
//!    no block for one, the most recently admitted running sequence is
//!    preempted (its blocks freed, pushed to the front of the waiting queue,
//!    recomputed later from prompt + output) until it fits, or until the
//!    sequence itself is the one preempted.
//! 2. Then, only if nothing was preempted, waiting sequences in FCFS order:
//!    first their prefix-cache hit (those tokens cost nothing), then as many
//!    tokens as the budget allows, while blocks and `max_num_seqs` seats last.
//!    Nothing is ever preempted to admit a waiting sequence.
//!
//! A sequence that needs more blocks than the whole pool holds can never run;
//! it is reported as failed instead of looping forever.
//!
//! Media encoders run for the items a step's chunks reach (vLLM's encoder
//! compute budget): at most `encoder_budget` embedding rows of items that
//! still need their encoder per step, the first such item always admitted so
//! a large one still makes progress. A chunk that would reach an item past
//! the budget stops just before it; the item is encoded in a later step.
//!
//! With `whole_media_items` (models whose media tokens attend to each other
//! both ways, like Gemma 3's images) a chunk that would end inside an item
//! stops before it instead, and one that starts at or inside an item takes
//! it to its end or waits for a step with the budget for it (the engine
//! refuses items longer than a whole step's budget).

use crate::block_manager::{BlockManager, SeqId};
use crate::sequence::Sequence;
use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Embedding rows of media items to encode per step (see the module doc).
    pub encoder_budget: usize,
    /// Never end a chunk inside a media item (models whose items attend to
    /// themselves both ways, see the module doc).
    pub whole_media_items: bool,
    /// Every layer attends over at most this many recent keys: blocks behind
    /// the window are freed ([`crate::model::kv_window`]).
    pub kv_window: Option<usize>,
}

/// Whether item `i` (in placeholder order) of request `req_id` still needs
/// its encoder run (no embeddings given, computed or cached).
pub type NeedsEncoder<'a> = &'a dyn Fn(u64, usize) -> bool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    pub num_new_tokens: usize,
}

#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// Sequences in this step's batch, in batch order.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences preempted during this schedule.
    pub preempted: Vec<SeqId>,
    /// Sequences that can never fit the pool: (seq, request, message). They are
    /// out of the queues and hold no blocks; the caller removes their requests.
    pub failed: Vec<(SeqId, u64, String)>,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order (forks sit right after their parent).
    running: Vec<SeqId>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let kv = BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
            .with_window(cfg.kv_window);
        Self {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn kv(&self) -> &BlockManager {
        &self.kv
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }
    pub fn seq_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.seqs.get_mut(&id)
    }
    pub fn block_table(&self, id: SeqId) -> &[u32] {
        self.kv.block_table(id)
    }
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    /// Queue a new sequence (no KV yet) at the back of the waiting queue.
    pub fn add(&mut self, mut seq: Sequence) {
        seq.num_computed = 0;
        if self.cfg.enable_prefix_caching {
            seq.update_hashes(self.cfg.block_size);
        }
        let id = seq.id;
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    /// Take `id` out of the scheduler and return its blocks to the pool.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        if let Some(p) = self.running.iter().position(|&x| x == id) {
            self.running.remove(p);
        } else if let Some(p) = self.waiting.iter().position(|&x| x == id) {
            self.waiting.remove(p);
        }
        self.kv.free(id);
        self.seqs.remove(&id)
    }

    /// Cut the chunk of `num_new` tokens from `start` so that the media
    /// items it reaches which still need their encoder fit what is left of
    /// the step's encoder budget (`encoded`: rows admitted so far).
    fn fit_encoder_budget(
        &self,
        seq: &Sequence,
        start: usize,
        num_new: usize,
        encoded: &mut usize,
        needs: NeedsEncoder,
    ) -> usize {
        let end = start + num_new;
        for (i, p) in seq.mm_items.iter().enumerate() {
            if p.offset >= end {
                break;
            }
            let item_end = p.offset + p.length;
            if self.cfg.whole_media_items && end < item_end {
                // Before the item, or (starting inside it) nothing this step.
                return p.offset.saturating_sub(start);
            }
            if p.offset + p.length <= start || !needs(seq.req_id, i) {
                continue;
            }
            if *encoded > 0 && *encoded + p.length > self.cfg.encoder_budget {
                // An item that started before `start` was encoded with its first chunk.
                return p.offset.saturating_sub(start);
            }
            *encoded += p.length;
        }
        num_new
    }

    /// Schedule one step with no encoder budget to keep (text-only work).
    pub fn schedule(&mut self) -> SchedulerOutput {
        self.schedule_with(&|_, _| false)
    }

    pub fn schedule_with(&mut self, needs_encoder: NeedsEncoder) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut encoded = 0;
        let total_blocks = self.kv.num_blocks();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let (num_computed, num_tokens, req_id) =
                (seq.num_computed, seq.num_tokens(), seq.req_id);
            if num_computed >= num_tokens {
                i += 1;
                continue;
            }
            if self.kv.max_blocks_held(num_tokens) > total_blocks {
                self.running.remove(i);
                self.kv.free(id);
                out.failed
                    .push((id, req_id, self.capacity_message(num_tokens)));
                continue;
            }
            let num_new = (num_tokens - num_computed)
                .min(budget)
                .min(self.kv.max_new_tokens(num_computed));
            let num_new =
                self.fit_encoder_budget(seq, num_computed, num_new, &mut encoded, needs_encoder);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let mut fits = false;
            loop {
                if self.kv.allocate_slots(id, num_computed, num_new, &[]) {
                    fits = true;
                    break;
                }
                // Victims come from the back: sequences not scheduled yet this step.
                let Some(victim) = self.running.pop() else {
                    break;
                };
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
            if !fits {
                break;
            }
            out.scheduled.push(ScheduledSeq {
                seq_id: id,
                num_new_tokens: num_new,
            });
            budget -= num_new;
            i += 1;
        }

        if out.preempted.is_empty() {
            let mut seats: usize = self
                .running
                .iter()
                .filter_map(|id| self.seqs.get(id))
                .map(Sequence::seats)
                .sum();
            while budget > 0 {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let Some(seq) = self.seqs.get(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                if seats + seq.seats() > self.cfg.max_num_seqs {
                    break;
                }
                let num_tokens = seq.num_tokens();
                if self.kv.max_blocks_held(num_tokens) > total_blocks {
                    let req_id = seq.req_id;
                    self.waiting.pop_front();
                    out.failed
                        .push((id, req_id, self.capacity_message(num_tokens)));
                    continue;
                }
                let cached = self.kv.find_cached_prefix(&seq.block_hashes, num_tokens);
                let num_cached = cached.len() * self.cfg.block_size;
                let num_new = (num_tokens - num_cached)
                    .min(budget)
                    .min(self.kv.max_new_tokens(num_cached));
                let num_new =
                    self.fit_encoder_budget(seq, num_cached, num_new, &mut encoded, needs_encoder);
                if num_new == 0 || !self.kv.allocate_slots(id, num_cached, num_new, &cached) {
                    break;
                }
                self.kv.record_prefix_query(num_tokens, num_cached);
                self.waiting.pop_front();
                self.running.push(id);
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.num_computed = num_cached;
                    seq.num_cached_tokens
                        .get_or_insert(num_cached.min(seq.prompt_len));
                    seats += seq.seats();
                }
                out.scheduled.push(ScheduledSeq {
                    seq_id: id,
                    num_new_tokens: num_new,
                });
                budget -= num_new;
            }
        }
        out
    }

    /// Record that a step computed `num_new` more tokens of `id`, and register
    /// its newly completed full blocks in the prefix cache.
    pub fn mark_computed(&mut self, id: SeqId, num_new: usize) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed = (seq.num_computed + num_new).min(seq.tokens.len());
            self.kv
                .cache_full_blocks(id, &seq.block_hashes, seq.num_computed);
        }
    }

    pub fn append_token(&mut self, id: SeqId, token: u32) {
        let (bs, hashing) = (self.cfg.block_size, self.cfg.enable_prefix_caching);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.append_token(token, bs, hashing);
        }
    }

    /// Add the samples `children` of running sequence `parent`, whose prompt
    /// is fully computed. Each child gets shared references to the prompt's
    /// full blocks; the prompt's partial last block is never shared (the
    /// parent keeps writing into it), so each child recomputes those few
    /// prompt tokens into a block of its own on its next step.
    pub fn fork(&mut self, parent: SeqId, children: Vec<Sequence>) {
        let Some(p) = self.seqs.get_mut(&parent) else {
            return;
        };
        p.pending_forks = 0;
        let prompt_len = p.prompt_len;
        let pos = self
            .running
            .iter()
            .position(|&x| x == parent)
            .map_or(self.running.len(), |p| p + 1);
        let mut ids = Vec::with_capacity(children.len());
        for mut child in children {
            child.num_computed = self.kv.fork(parent, child.id, prompt_len);
            ids.push(child.id);
            self.seqs.insert(child.id, child);
        }
        self.running.splice(pos..pos, ids);
    }

    fn preempt(&mut self, id: SeqId) {
        self.kv.free(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed = 0;
        }
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }

    fn capacity_message(&self, num_tokens: usize) -> String {
        format!(
            "the sequence needs {} KV cache blocks for {} tokens but the whole pool has {} blocks ({} tokens); \
             raise the KV cache size or shorten the request",
            self.kv.max_blocks_held(num_tokens),
            num_tokens,
            self.kv.num_blocks(),
            self.kv.capacity_tokens()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detokenizer::Detokenizer;
    use crate::sampler::sample_rng;

    fn seq(id: SeqId, len: usize) -> Sequence {
        let tokens: Vec<u32> = (0..len as u32).map(|t| t + id as u32 * 1000).collect();
        Sequence {
            id,
            req_id: id,
            sample_index: 0,
            detok: Detokenizer::new(&tokens, vec![], true),
            tokens,
            prompt_len: len,
            num_computed: 0,
            block_hashes: vec![],
            mm_items: Vec::new().into(),
            pending_forks: 0,
            rng: sample_rng(Some(0), 0),
            num_cached_tokens: None,
            grammar: None,
        }
    }

    fn cfg(num_blocks: usize, max_seqs: usize, budget: usize) -> SchedulerConfig {
        SchedulerConfig {
            num_blocks,
            block_size: 4,
            max_num_seqs: max_seqs,
            max_num_batched_tokens: budget,
            enable_prefix_caching: true,
            encoder_budget: budget,
            whole_media_items: false,
            kv_window: None,
        }
    }

    /// Pretend the step ran: every scheduled sequence computed its tokens and,
    /// if it reached the end, sampled `token`.
    fn run(s: &mut Scheduler, out: &SchedulerOutput, token: u32) {
        for sc in &out.scheduled {
            s.mark_computed(sc.seq_id, sc.num_new_tokens);
            let seq = s.seq(sc.seq_id).unwrap();
            if seq.num_computed == seq.num_tokens() {
                s.append_token(sc.seq_id, token);
            }
        }
    }

    #[test]
    fn encoder_budget_stops_chunks_before_items_it_cannot_encode() {
        use crate::request::MmPlaceholder;
        let mut c = cfg(64, 8, 64);
        c.encoder_budget = 12;
        let mut s = Scheduler::new(c);
        // Items of 10 rows at 2..12 and 20..30, and one of 30 rows at 34..64.
        let items = [(2, 10), (20, 10), (34, 30)];
        let mut q = seq(1, 70);
        q.mm_items = items
            .iter()
            .map(|&(offset, length)| MmPlaceholder {
                hash: format!("h{offset}"),
                offset,
                length,
            })
            .collect();
        s.add(q);
        let encoded = std::cell::RefCell::new(std::collections::HashSet::new());
        let needs = |_: u64, i: usize| !encoded.borrow().contains(&i);
        let mut chunks = Vec::new();
        for _ in 0..10 {
            let out = s.schedule_with(&needs);
            let Some(sc) = out.scheduled.first().copied() else {
                break;
            };
            let start = s.seq(sc.seq_id).unwrap().num_computed;
            let end = start + sc.num_new_tokens;
            // What the engine would encode this step, within the budget but for a lone first item.
            let step: Vec<usize> = (0..items.len())
                .filter(|&i| items[i].0 < end && items[i].0 + items[i].1 > start && needs(1, i))
                .collect();
            let rows: usize = step.iter().map(|&i| items[i].1).sum();
            assert!(
                rows <= 12 || step.len() == 1,
                "step {start}..{end} encodes {rows} rows"
            );
            encoded.borrow_mut().extend(step);
            chunks.push((start, end));
            s.mark_computed(sc.seq_id, sc.num_new_tokens);
            if end == 70 {
                break;
            }
        }
        // The first chunk stops before the second item, the second before the
        // third; the 30-row item, larger than the budget, still runs alone.
        assert_eq!(chunks, vec![(0, 20), (20, 34), (34, 70)]);
    }

    #[test]
    fn whole_media_items_are_never_split() {
        use crate::request::MmPlaceholder;
        let mut c = cfg(64, 8, 8);
        c.whole_media_items = true;
        let mut s = Scheduler::new(c);
        // Items at 3..9 and 9..15 (adjacent), then text to 20.
        let mut q = seq(1, 20);
        q.mm_items = [(3, 6), (9, 6)]
            .iter()
            .map(|&(offset, length)| MmPlaceholder {
                hash: format!("h{offset}"),
                offset,
                length,
            })
            .collect();
        s.add(q);
        let mut chunks = Vec::new();
        for _ in 0..10 {
            let out = s.schedule();
            let Some(sc) = out.scheduled.first().copied() else {
                break;
            };
            let start = s.seq(sc.seq_id).unwrap().num_computed;
            chunks.push((start, start + sc.num_new_tokens));
            s.mark_computed(sc.seq_id, sc.num_new_tokens);
            if start + sc.num_new_tokens == 20 {
                break;
            }
        }
        // Budget 8: 0..3 (stops before item 1), 3..9 (item 1; item 2 would
        // not fit), 9..17 (item 2 and text), 17..20.
        assert_eq!(chunks, vec![(0, 3), (3, 9), (9, 17), (17, 20)]);
    }

    #[test]
    fn chunked_prefill_respects_budget_and_running_goes_first() {
        let mut s = Scheduler::new(cfg(100, 8, 10));
        s.add(seq(1, 25));
        s.add(seq(2, 3));
        let o = s.schedule();
        assert_eq!(
            o.scheduled,
            vec![ScheduledSeq {
                seq_id: 1,
                num_new_tokens: 10
            }]
        );
        run(&mut s, &o, 7);
        let o = s.schedule();
        assert_eq!(
            o.scheduled,
            vec![ScheduledSeq {
                seq_id: 1,
                num_new_tokens: 10
            }]
        );
        run(&mut s, &o, 7);
        let o = s.schedule();
        // 5 left for seq 1, then seq 2's whole prompt (3) fits the remaining 5.
        assert_eq!(
            o.scheduled,
            vec![
                ScheduledSeq {
                    seq_id: 1,
                    num_new_tokens: 5
                },
                ScheduledSeq {
                    seq_id: 2,
                    num_new_tokens: 3
                }
            ]
        );
        run(&mut s, &o, 7);
        let o = s.schedule();
        assert_eq!(
            o.scheduled
                .iter()
                .map(|x| x.num_new_tokens)
                .collect::<Vec<_>>(),
            vec![1, 1]
        );
    }

    #[test]
    fn max_num_seqs_limits_admission_counting_pending_forks() {
        let mut s = Scheduler::new(cfg(100, 3, 100));
        let mut a = seq(1, 4);
        a.pending_forks = 1; // n = 2
        s.add(a);
        s.add(seq(2, 4));
        s.add(seq(3, 4));
        let o = s.schedule();
        assert_eq!(o.scheduled.len(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn preempts_newest_running_and_requeues_it_first() {
        // 4 blocks of 4: two seqs of 8 tokens fill the pool.
        let mut s = Scheduler::new(cfg(4, 8, 100));
        s.add(seq(1, 8));
        s.add(seq(2, 8));
        s.add(seq(3, 2));
        let o = s.schedule();
        assert_eq!(o.scheduled.len(), 2);
        assert_eq!(s.kv().num_free_blocks(), 0);
        run(&mut s, &o, 9);
        // Both need a 3rd block: seq 2 (newest) is preempted for seq 1.
        let o = s.schedule();
        assert_eq!(o.preempted, vec![2]);
        assert_eq!(
            o.scheduled,
            vec![ScheduledSeq {
                seq_id: 1,
                num_new_tokens: 1
            }]
        );
        assert_eq!(s.num_preemptions(), 1);
        // Seq 2 went to the FRONT (ahead of seq 3), keeps its sampled token, lost its KV.
        let two = s.seq(2).unwrap();
        assert_eq!((two.num_computed, two.num_tokens()), (0, 9));
        assert!(s.block_table(2).is_empty());
        run(&mut s, &o, 9);
        // Next step: seq 2 is not re-admitted while seq 1 holds 3 of the 4 blocks.
        let o = s.schedule();
        assert_eq!(o.scheduled[0].seq_id, 1);
        assert!(o.preempted.is_empty());
        // Seq 2 needs 3 blocks; 1 free after seq 1 took 3 -> not admitted; seq 3 not either (FCFS).
        assert_eq!(o.scheduled.len(), 1);
        s.remove(1);
        let o = s.schedule();
        assert_eq!(o.scheduled[0].seq_id, 2);
        // Its first block is still cached; its second was evicted to give seq 1 a block.
        assert_eq!(o.scheduled[0].num_new_tokens, 5);
        assert_eq!(s.kv().prefix_cache_hits(), 4);
        assert_eq!(s.seq(2).unwrap().num_computed, 4);
    }

    #[test]
    fn sequence_larger_than_pool_fails_instead_of_looping() {
        let mut s = Scheduler::new(cfg(2, 8, 100));
        s.add(seq(1, 9));
        s.add(seq(2, 3));
        let o = s.schedule();
        assert_eq!(o.failed.len(), 1);
        assert_eq!(o.failed[0].0, 1);
        assert_eq!(
            o.scheduled,
            vec![ScheduledSeq {
                seq_id: 2,
                num_new_tokens: 3
            }]
        );
        // A running sequence outgrowing the pool fails too (after 8 tokens: 2 blocks).
        let mut s = Scheduler::new(cfg(2, 8, 100));
        s.add(seq(1, 8));
        let o = s.schedule();
        run(&mut s, &o, 1);
        let o = s.schedule();
        assert_eq!(o.failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1]);
        assert!(!s.has_work());
        assert_eq!(s.kv().num_used_blocks(), 0);
    }

    #[test]
    fn fork_shares_prompt_blocks_and_recomputes_partial_block() {
        let mut s = Scheduler::new(cfg(10, 8, 100));
        let mut p = seq(1, 10);
        p.pending_forks = 1;
        s.add(p);
        let o = s.schedule();
        run(&mut s, &o, 5);
        let child = s.seq(1).unwrap().fork(2, 1, sample_rng(Some(0), 1), 4);
        s.fork(1, vec![child]);
        s.append_token(2, 6);
        assert_eq!(s.running(), &[1, 2]);
        let c = s.seq(2).unwrap();
        assert_eq!(c.num_computed, 8);
        assert_eq!(s.block_table(2), &s.block_table(1)[..2]);
        let o = s.schedule();
        // Parent decodes 1 token; the child computes prompt tokens 8, 9 and its sample.
        assert_eq!(
            o.scheduled,
            vec![
                ScheduledSeq {
                    seq_id: 1,
                    num_new_tokens: 1
                },
                ScheduledSeq {
                    seq_id: 2,
                    num_new_tokens: 3
                }
            ]
        );
        assert_eq!(s.kv().num_used_blocks(), 4);
    }
}
