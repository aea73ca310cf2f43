//! The engine's work, one step at a time, without threads: schedule, build
//! the ragged batch, run the model, sample, detokenize, emit events, free
//! what finished. [`crate::engine::Engine`] drives it from its thread; tests
//! drive it directly.

use crate::block_manager::SeqId;
use crate::detokenizer::Detokenizer;
use crate::encoder_cache::EncoderCache;
use crate::engine::EngineStats;
use crate::grammar::{Grammar, TokenMask};
use crate::model::{DeviceSampleRow, ForwardBatch, MmEmbedSpan, Model, SeqSlice, TokenDecoder};
use crate::output::{FinishReason, RequestEvent, Usage};
use crate::params::SamplingParams;
use crate::request::{EngineRequest, MmInput, MmItem, MmPlaceholder};
use crate::sampler::{self, sample_rng, SamplingInput, SAMPLING_EPS};
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig};
use crate::sequence::Sequence;
use candle_core::{DType, Tensor};
use rand::RngExt;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

struct RequestState {
    params: SamplingParams,
    tx: UnboundedSender<RequestEvent>,
    prompt_len: usize,
    /// Token ids that end a sample: EOS (unless ignore_eos) and stop_token_ids.
    stop_ids: Vec<u32>,
    /// Per sample index: finished (event sent).
    done: Vec<bool>,
    /// Live sequences of this request.
    seqs: Vec<SeqId>,
    /// Prompt tokens served from the prefix cache at first admission.
    cached_tokens: usize,
    /// The request's media items (sorted by offset) and, once known, their
    /// embeddings; kept for the request's life so a preempted sequence
    /// recomputes without re-encoding.
    mm: Vec<MmSlot>,
    mrope: Option<crate::request::MropePositions>,
}

struct MmSlot {
    item: MmItem,
    embeds: Option<Tensor>,
}

pub(crate) struct CoreConfig {
    pub scheduler: SchedulerConfig,
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub encoder_cache: Arc<Mutex<EncoderCache>>,
}

pub(crate) struct EngineCore {
    model: Box<dyn Model>,
    decoder: Arc<dyn TokenDecoder>,
    sched: Scheduler,
    requests: HashMap<u64, RequestState>,
    eos_token_ids: Vec<u32>,
    max_model_len: usize,
    vocab_size: usize,
    hidden_size: usize,
    encoder_cache: Arc<Mutex<EncoderCache>>,
    /// Media items run through the model's encoder.
    encoder_runs: u64,
    next_seq_id: SeqId,
    prompt_tokens: u64,
    generation_tokens: u64,
    requests_finished: u64,
    steps: u64,
    /// The snapshot other threads read; refreshed before a request's final
    /// event goes out, so a client that saw its request end sees it counted.
    published: Arc<Mutex<EngineStats>>,
}

/// Where a sequence's next token comes from this step.
enum Pick {
    /// Index of its logits row among the rows copied to the host.
    Row(usize),
    /// The token sampled on the model's device.
    Token(u32),
}

/// What [`EngineCore::sample_into`] samples from.
#[derive(Clone, Copy)]
enum Choice<'a> {
    Row(&'a [f32]),
    Token(u32),
}

/// What a sample does after receiving a token.
enum SampleEnd {
    Continue,
    Finished(FinishReason, Option<String>),
}

impl EngineCore {
    pub fn new(model: Box<dyn Model>, decoder: Arc<dyn TokenDecoder>, cfg: CoreConfig) -> Self {
        Self {
            model,
            decoder,
            sched: Scheduler::new(cfg.scheduler),
            requests: HashMap::new(),
            eos_token_ids: cfg.eos_token_ids,
            max_model_len: cfg.max_model_len,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            encoder_cache: cfg.encoder_cache,
            encoder_runs: 0,
            next_seq_id: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            requests_finished: 0,
            steps: 0,
            published: Arc::default(),
        }
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    #[cfg(test)]
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    pub fn stats(&self) -> EngineStats {
        let kv = self.sched.kv();
        let enc = self
            .encoder_cache
            .lock()
            .map(|c| c.stats())
            .unwrap_or_default();
        EngineStats {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            kv_blocks_total: kv.num_blocks(),
            kv_blocks_used: kv.num_used_blocks(),
            kv_blocks_free: kv.num_free_blocks(),
            prefix_cache_queries: kv.prefix_cache_queries(),
            prefix_cache_hits: kv.prefix_cache_hits(),
            prompt_tokens: self.prompt_tokens,
            generation_tokens: self.generation_tokens,
            preemptions: self.sched.num_preemptions(),
            requests_finished: self.requests_finished,
            steps: self.steps,
            encoder_runs: self.encoder_runs,
            encoder_cache_queries: enc.queries,
            encoder_cache_hits: enc.hits,
            encoder_cache_tokens: enc.tokens,
            encoder_cache_items: enc.items,
        }
    }

    /// The stats snapshot [`Self::publish_stats`] keeps current.
    pub fn published_stats(&self) -> Arc<Mutex<EngineStats>> {
        self.published.clone()
    }

    pub fn publish_stats(&self) {
        let stats = self.stats();
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// Queue a request that the engine front end has already validated.
    pub fn add_request(&mut self, id: u64, req: EngineRequest, tx: UnboundedSender<RequestEvent>) {
        let EngineRequest {
            prompt_token_ids,
            mut params,
            mut mm_items,
            mrope,
        } = req;
        let grammar = params.grammar.take();
        mm_items.sort_by_key(|m| m.placeholder.offset);
        let placeholders: Vec<MmPlaceholder> =
            mm_items.iter().map(|m| m.placeholder.clone()).collect();
        let mm = mm_items
            .into_iter()
            .map(|item| MmSlot { item, embeds: None })
            .collect();
        let n = params.n.max(1);
        let mut stop_ids: Vec<u32> = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend(self.eos_token_ids.iter().copied());
        }
        let seq_id = self.alloc_seq_id();
        let seq = Sequence {
            id: seq_id,
            req_id: id,
            sample_index: 0,
            detok: Detokenizer::new(
                &prompt_token_ids,
                params.stop.clone(),
                params.skip_special_tokens,
            ),
            prompt_len: prompt_token_ids.len(),
            tokens: prompt_token_ids,
            num_computed: 0,
            block_hashes: Vec::new(),
            mm_items: placeholders.into(),
            pending_forks: n - 1,
            rng: sample_rng(params.seed, 0),
            num_cached_tokens: None,
            grammar,
        };
        let state = RequestState {
            prompt_len: seq.prompt_len,
            params,
            tx,
            stop_ids,
            done: vec![false; n],
            seqs: vec![seq_id],
            cached_tokens: 0,
            mm,
            mrope,
        };
        self.requests.insert(id, state);
        self.sched.add(seq);
    }

    /// Abort `id`: free its blocks now and tell the caller (if still listening).
    pub fn abort_request(&mut self, id: u64) {
        let Some(req) = self.requests.remove(&id) else {
            return;
        };
        let mut completion: HashMap<usize, usize> = HashMap::new();
        for &s in &req.seqs {
            if let Some(seq) = self.sched.remove(s) {
                completion.insert(seq.sample_index, seq.output().len());
            }
        }
        self.requests_finished += 1;
        self.publish_stats();
        for (index, done) in req.done.iter().enumerate() {
            if !done {
                let usage = Usage {
                    prompt_tokens: req.prompt_len,
                    completion_tokens: completion.get(&index).copied().unwrap_or(0),
                    cached_tokens: req.cached_tokens,
                };
                let _ = req.tx.send(RequestEvent::Finished {
                    index,
                    reason: FinishReason::Abort,
                    stop_reason: None,
                    usage,
                });
            }
        }
    }

    pub fn abort_all(&mut self) {
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            self.abort_request(id);
        }
    }

    /// Drop requests whose caller went away.
    fn reap_closed(&mut self) {
        let closed: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in closed {
            self.abort_request(id);
        }
    }

    fn fail_request(&mut self, id: u64, message: String) {
        let Some(req) = self.requests.remove(&id) else {
            return;
        };
        for &s in &req.seqs {
            self.sched.remove(s);
        }
        self.requests_finished += 1;
        self.publish_stats();
        let _ = req.tx.send(RequestEvent::Error { message });
    }

    fn alloc_seq_id(&mut self) -> SeqId {
        let id = self.next_seq_id;
        self.next_seq_id += 1;
        id
    }

    /// Run one engine step. Returns false when there was nothing to run.
    pub fn step(&mut self) -> bool {
        self.reap_closed();
        let (requests, encoder_cache) = (&self.requests, &self.encoder_cache);
        let needs_encoder = |req_id: u64, i: usize| {
            requests
                .get(&req_id)
                .and_then(|r| r.mm.get(i))
                .is_some_and(|m| {
                    m.embeds.is_none()
                        && matches!(m.item.input, MmInput::Features(_))
                        && !encoder_cache
                            .lock()
                            .is_ok_and(|c| c.contains(&m.item.placeholder.hash))
                })
        };
        let out = self.sched.schedule_with(&needs_encoder);
        for (_, req_id, message) in out.failed {
            self.fail_request(req_id, message);
        }
        // A failure above may have removed sequences scheduled earlier in this step.
        let scheduled: Vec<ScheduledSeq> = out
            .scheduled
            .into_iter()
            .filter(|s| self.sched.seq(s.seq_id).is_some())
            .collect();
        for sc in &scheduled {
            if let Some(seq) = self.sched.seq(sc.seq_id) {
                if let Some(req) = self.requests.get_mut(&seq.req_id) {
                    if seq.sample_index == 0 && seq.output().is_empty() {
                        req.cached_tokens = seq.num_cached_tokens.unwrap_or(0);
                    }
                }
            }
        }
        if scheduled.is_empty() {
            return false;
        }
        self.encode_media(&scheduled);
        // Encoding may have failed requests (and removed their sequences).
        let scheduled: Vec<ScheduledSeq> = scheduled
            .into_iter()
            .filter(|s| self.sched.seq(s.seq_id).is_some())
            .collect();
        if scheduled.is_empty() {
            return true;
        }
        let batch = self.build_batch(&scheduled);
        // The grammars' masks for this step's samples are computed on the
        // rayon pool while the model runs.
        let masks = MaskJob::start(&mut self.sched, &scheduled, &batch);
        let logits = self.run_model(&batch);
        let masks = masks.finish(&mut self.sched);
        let logits = match logits {
            Ok(logits) => logits,
            Err(message) => {
                let mut reqs: Vec<u64> = scheduled
                    .iter()
                    .filter_map(|s| self.sched.seq(s.seq_id).map(|q| q.req_id))
                    .collect();
                reqs.sort_unstable();
                reqs.dedup();
                for r in reqs {
                    self.fail_request(r, message.clone());
                }
                return true;
            }
        };
        self.steps += 1;

        let mut with_logits = Vec::new();
        for (sc, slice) in scheduled.iter().zip(&batch.seqs) {
            self.sched.mark_computed(sc.seq_id, sc.num_new_tokens);
            if slice.needs_logits {
                with_logits.push(sc.seq_id);
            }
        }
        let (rows, picks) = match self.pick(&logits, &with_logits) {
            Ok(r) => r,
            Err(message) => {
                let mut reqs: Vec<u64> = with_logits
                    .iter()
                    .filter_map(|&s| self.sched.seq(s).map(|q| q.req_id))
                    .collect();
                reqs.sort_unstable();
                reqs.dedup();
                for r in reqs {
                    self.fail_request(r, message.clone());
                }
                return true;
            }
        };
        let vocab = self.vocab_size.max(1);
        for (seq_id, pick) in with_logits.into_iter().zip(picks) {
            let mask = match masks.get(&seq_id) {
                None => None,
                Some(Ok(m)) => Some(m),
                Some(Err(message)) => {
                    if let Some(req_id) = self.sched.seq(seq_id).map(|s| s.req_id) {
                        self.fail_request(req_id, format!("structured output failed: {message}"));
                    }
                    continue;
                }
            };
            match pick {
                Pick::Row(i) => {
                    self.on_logits(seq_id, Choice::Row(&rows[i * vocab..(i + 1) * vocab]), mask)
                }
                Pick::Token(t) => self.on_logits(seq_id, Choice::Token(t), mask),
            }
        }
        true
    }

    /// Sample on the model's device the rows that allow it (no penalties,
    /// logprobs, suppressed tokens or forks) when the model can (an empty
    /// request answers whether it can), and copy the other rows to the host
    /// as one flat `[rows * vocab]` vector. Models on the CPU cannot: every
    /// row is copied, as before device sampling existed.
    fn pick(&mut self, logits: &Tensor, seqs: &[SeqId]) -> Result<(Vec<f32>, Vec<Pick>), String> {
        let on_device = self.model.sample_on_device(logits, &[]).is_some();
        let mut picks = Vec::with_capacity(seqs.len());
        let mut device_rows = Vec::new();
        let mut host_rows = Vec::new();
        for (i, &seq_id) in seqs.iter().enumerate() {
            match on_device
                .then(|| self.device_sample_row(seq_id, i as u32))
                .flatten()
            {
                Some(r) => {
                    picks.push(Pick::Token(device_rows.len() as u32));
                    device_rows.push(r);
                }
                None => {
                    picks.push(Pick::Row(host_rows.len()));
                    host_rows.push(i as u32);
                }
            }
        }
        if !device_rows.is_empty() {
            let tokens = match self.model.sample_on_device(logits, &device_rows) {
                Some(Ok(t)) if t.len() == device_rows.len() => t,
                Some(Ok(t)) => {
                    return Err(format!(
                        "sampling on the device returned {} tokens for {} rows",
                        t.len(),
                        device_rows.len()
                    ))
                }
                Some(Err(e)) => return Err(format!("sampling on the device failed: {e}")),
                None => return Err("the model stopped sampling on its device".into()),
            };
            for p in picks.iter_mut() {
                if let Pick::Token(k) = p {
                    *p = Pick::Token(tokens[*k as usize]);
                }
            }
        }
        let host = if host_rows.is_empty() {
            Ok(Vec::new())
        } else if host_rows.len() == seqs.len() {
            logits
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
        } else {
            let n = host_rows.len();
            Tensor::from_vec(host_rows, n, logits.device())
                .and_then(|idx| logits.index_select(&idx, 0))
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
        };
        let host = host.map_err(|e| format!("reading logits failed: {e}"))?;
        Ok((host, picks))
    }

    /// The device-sampling request for `seq_id`'s next token from logits row
    /// `row`, drawing its uniform from the sequence's generator exactly when
    /// the host sampler would; None when the host sampler is needed.
    fn device_sample_row(&mut self, seq_id: SeqId, row: u32) -> Option<DeviceSampleRow> {
        let seq = self.sched.seq_mut(seq_id)?;
        let req = self.requests.get(&seq.req_id)?;
        let p = &req.params;
        let suppressing = seq.output().len() < p.min_tokens && !req.stop_ids.is_empty();
        if seq.pending_forks > 0
            || seq.grammar.is_some()
            || p.logprobs.is_some()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || suppressing
        {
            return None;
        }
        let uniform = if p.temperature < SAMPLING_EPS {
            0.0
        } else {
            seq.rng.random::<f64>() as f32
        };
        Some(DeviceSampleRow {
            row,
            temperature: p.temperature,
            top_k: if p.top_k > 0 { p.top_k as u32 } else { 0 },
            top_p: p.top_p,
            min_p: p.min_p,
            uniform,
        })
    }

    /// Make sure every media item overlapping this step's tokens has its
    /// embeddings: from the request, the encoder cache, or the encoder.
    fn encode_media(&mut self, scheduled: &[ScheduledSeq]) {
        for sc in scheduled {
            let Some(seq) = self.sched.seq(sc.seq_id) else {
                continue;
            };
            let (req_id, start) = (seq.req_id, seq.num_computed);
            let end = (start + sc.num_new_tokens).min(seq.prompt_len);
            let Some(req) = self.requests.get(&req_id) else {
                continue;
            };
            let missing: Vec<usize> = (0..req.mm.len())
                .filter(|&i| {
                    let p = &req.mm[i].item.placeholder;
                    req.mm[i].embeds.is_none() && p.offset < end && p.offset + p.length > start
                })
                .collect();
            for i in missing {
                if let Err(message) = self.encode_item(req_id, i) {
                    self.fail_request(req_id, message);
                    break;
                }
            }
        }
    }

    fn encode_item(&mut self, req_id: u64, i: usize) -> Result<(), String> {
        let Some(req) = self.requests.get(&req_id) else {
            return Ok(());
        };
        let slot = &req.mm[i];
        let hash = slot.item.placeholder.hash.clone();
        let length = slot.item.placeholder.length;
        let embeds = match &slot.item.input {
            MmInput::Embeddings(t) => t.clone(),
            MmInput::Cached => {
                return Err(format!(
                    "media item '{hash}' has no data and is not in the encoder cache"
                ));
            }
            MmInput::Features(features) => {
                let features = features.clone();
                let cached = self
                    .encoder_cache
                    .lock()
                    .ok()
                    .and_then(|mut c| c.get(&hash));
                match cached {
                    Some(t) => t,
                    None => {
                        let model = &mut self.model;
                        let out = match catch_unwind(AssertUnwindSafe(|| model.encode(&features))) {
                            Ok(Ok(t)) => t,
                            Ok(Err(e)) => return Err(format!("media encoder failed: {e}")),
                            Err(_) => return Err("media encoder failed: the model panicked".into()),
                        };
                        self.encoder_runs += 1;
                        if let Ok(mut c) = self.encoder_cache.lock() {
                            c.insert(&hash, out.clone());
                        }
                        out
                    }
                }
            }
        };
        if embeds.dims() != [length, self.hidden_size] {
            return Err(format!(
                "media item '{hash}' has embeddings of shape {:?}, expected [{length}, {}] (one row per placeholder token)",
                embeds.dims(),
                self.hidden_size
            ));
        }
        if let Some(req) = self.requests.get_mut(&req_id) {
            req.mm[i].embeds = Some(embeds);
        }
        Ok(())
    }

    fn build_batch(&self, scheduled: &[ScheduledSeq]) -> ForwardBatch {
        let bs = self.sched.config().block_size;
        let total: usize = scheduled.iter().map(|s| s.num_new_tokens).sum();
        let mut batch = ForwardBatch {
            input_ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slot_mapping: Vec::with_capacity(total),
            seqs: Vec::with_capacity(scheduled.len()),
            block_size: bs,
            mm_embeds: Vec::new(),
            mrope_positions: None,
        };
        let any_mrope = scheduled.iter().any(|sc| {
            self.sched
                .seq(sc.seq_id)
                .and_then(|q| self.requests.get(&q.req_id))
                .is_some_and(|r| r.mrope.is_some())
        });
        let mut mrope: Vec<[u32; 3]> = Vec::new();
        for sc in scheduled {
            let Some(seq) = self.sched.seq(sc.seq_id) else {
                continue;
            };
            let table = self.sched.block_table(sc.seq_id);
            let start = seq.num_computed;
            let end = (start + sc.num_new_tokens).min(seq.num_tokens());
            let query_start = batch.input_ids.len();
            if let Some(req) = self.requests.get(&seq.req_id) {
                for slot in &req.mm {
                    let p = &slot.item.placeholder;
                    let (lo, hi) = (p.offset.max(start), (p.offset + p.length).min(end));
                    if lo >= hi {
                        continue;
                    }
                    // encode_media ran for every overlapping item; a missing
                    // one failed its request, which is then not scheduled.
                    if let Some(e) = &slot.embeds {
                        if let Ok(rows) = e.narrow(0, lo - p.offset, hi - lo) {
                            batch.mm_embeds.push(MmEmbedSpan {
                                start: query_start + lo - start,
                                embeds: rows,
                            });
                        }
                    }
                }
            }
            if any_mrope {
                let m = self
                    .requests
                    .get(&seq.req_id)
                    .and_then(|r| r.mrope.as_ref());
                mrope.extend((start..end).map(|pos| match m {
                    Some(m) => m.at(pos),
                    None => [pos as u32; 3],
                }));
            }
            for pos in start..end {
                batch.input_ids.push(seq.tokens[pos]);
                batch.positions.push(pos as u32);
                let block = table.get(pos / bs).copied().unwrap_or(0);
                batch
                    .slot_mapping
                    .push(block * bs as u32 + (pos % bs) as u32);
            }
            let used_blocks = end.div_ceil(bs).min(table.len());
            batch.seqs.push(SeqSlice {
                query_start,
                query_len: end - start,
                context_len: end,
                block_table: table[..used_blocks].to_vec(),
                needs_logits: end == seq.num_tokens(),
            });
        }
        if any_mrope {
            batch.mrope_positions = Some(mrope);
        }
        batch
    }

    /// Forward; the logits `[rows, vocab]` stay where the model made them.
    fn run_model(&mut self, batch: &ForwardBatch) -> Result<Tensor, String> {
        let model = &mut self.model;
        let result = catch_unwind(AssertUnwindSafe(|| model.forward(batch)));
        let logits = match result {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(format!("model forward failed: {e}")),
            Err(_) => return Err("model forward failed: the model panicked".into()),
        };
        let rows = batch.num_logits();
        let dims = logits.dims().to_vec();
        if dims != [rows, self.vocab_size] {
            return Err(format!(
                "model forward returned logits of shape {dims:?}, expected [{rows}, {}]",
                self.vocab_size
            ));
        }
        Ok(logits)
    }

    /// Logits for the last token of `seq_id` arrived: sample its next token;
    /// for a freshly prefilled `n > 1` request, first fork the other samples.
    fn on_logits(&mut self, seq_id: SeqId, row: Choice<'_>, mask: Option<&TokenMask>) {
        let Some(seq) = self.sched.seq(seq_id) else {
            return;
        };
        let req_id = seq.req_id;
        let Some(req) = self.requests.get(&req_id) else {
            return;
        };
        if seq.sample_index == 0 && seq.output().is_empty() {
            self.prompt_tokens += req.prompt_len as u64;
        }
        let mut targets = vec![seq_id];
        let pending = seq.pending_forks;
        if pending > 0 {
            // n > 1: the prompt was prefilled once, by sample 0. Samples
            // 1..n start here from the same logits (each with its own RNG)
            // and share the prompt's full KV blocks by reference count,
            // whether or not prefix caching is on. The prompt's partial last
            // block cannot be shared (every sample writes its own tokens
            // into it) and copying KV would need a model hook, so each fork
            // recomputes those < block_size prompt tokens into a block of its
            // own, together with its first sampled token, in the next step.
            let seed = req.params.seed;
            let bs = self.sched.config().block_size;
            let ids: Vec<SeqId> = (0..pending).map(|_| self.alloc_seq_id()).collect();
            let Some(parent) = self.sched.seq(seq_id) else {
                return;
            };
            let children: Vec<Sequence> = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| parent.fork(id, i + 1, sample_rng(seed, i + 1), bs))
                .collect();
            if let Some(req) = self.requests.get_mut(&req_id) {
                req.seqs.extend(&ids);
            }
            self.sched.fork(seq_id, children);
            targets.extend(ids);
        }
        for t in targets {
            if !self.requests.contains_key(&req_id) {
                break; // failed or aborted meanwhile
            }
            // Forks start where the parent stands in its grammar: same mask.
            self.sample_into(t, row, mask);
        }
    }

    /// Sample one token for `seq_id` from `row` (or take the one sampled on
    /// the device), emit it, and finish the sample if done.
    fn sample_into(&mut self, seq_id: SeqId, row: Choice<'_>, mask: Option<&TokenMask>) {
        let (bs, hashing) = (
            self.sched.config().block_size,
            self.sched.config().enable_prefix_caching,
        );
        let decoder = self.decoder.clone();
        let max_model_len = self.max_model_len;
        let Some(seq) = self.sched.seq_mut(seq_id) else {
            return;
        };
        let req_id = seq.req_id;
        let Some(req) = self.requests.get(&req_id) else {
            return;
        };
        let p = &req.params;
        let suppressed: &[u32] = if seq.output().len() < p.min_tokens {
            &req.stop_ids
        } else {
            &[]
        };
        let (prompt, output) = seq.tokens.split_at(seq.prompt_len);
        let allowed = mask.map(TokenMask::words);
        let input = SamplingInput {
            params: p,
            prompt_tokens: prompt,
            output_tokens: output,
            suppressed,
            allowed,
        };
        let sampled = match row {
            Choice::Row(row) => sampler::sample(row, &input, &mut seq.rng),
            Choice::Token(token_id) => sampler::Sampled {
                token_id,
                logprob: None,
            },
        };
        let token = sampled.token_id;
        if let Some(g) = seq.grammar.as_mut() {
            if let Err(e) = g.consume(token) {
                self.fail_request(req_id, format!("structured output failed: {e}"));
                return;
            }
        }
        seq.append_token(token, bs, hashing);
        self.generation_tokens += 1;
        let index = seq.sample_index;
        let completion_tokens = seq.output().len();
        let (text, end) = match check_finish(seq, req, token, decoder.as_ref(), max_model_len) {
            Ok(r) => r,
            Err(message) => {
                self.fail_request(req_id, message);
                return;
            }
        };
        let logprobs = sampled.logprob.map(|l| vec![l]);
        if req
            .tx
            .send(RequestEvent::Tokens {
                index,
                token_ids: vec![token],
                text,
                logprobs,
            })
            .is_err()
        {
            self.abort_request(req_id);
            return;
        }
        if let SampleEnd::Finished(reason, stop_reason) = end {
            let usage = Usage {
                prompt_tokens: req.prompt_len,
                completion_tokens,
                cached_tokens: req.cached_tokens,
            };
            let tx = req.tx.clone();
            self.finish_sample(req_id, seq_id, index);
            self.publish_stats();
            let _ = tx.send(RequestEvent::Finished {
                index,
                reason,
                stop_reason,
                usage,
            });
        }
    }

    fn finish_sample(&mut self, req_id: u64, seq_id: SeqId, index: usize) {
        self.sched.remove(seq_id);
        let all_done = match self.requests.get_mut(&req_id) {
            Some(req) => {
                req.seqs.retain(|&s| s != seq_id);
                if let Some(d) = req.done.get_mut(index) {
                    *d = true;
                }
                req.done.iter().all(|&d| d)
            }
            None => false,
        };
        if all_done {
            self.requests.remove(&req_id);
            self.requests_finished += 1;
        }
    }
}

/// Detokenize the token just appended to `seq` and decide whether the sample
/// ends: a stop token (EOS unless ignore_eos, or stop_token_ids), a stop
/// string (only from `min_tokens` outputs on), a complete grammar,
/// `max_tokens`, or the model's maximum length. Returns the text to emit now.
fn check_finish(
    seq: &mut Sequence,
    req: &RequestState,
    token: u32,
    decoder: &dyn TokenDecoder,
    max_model_len: usize,
) -> Result<(String, SampleEnd), String> {
    let p = &req.params;
    let out_len = seq.output().len();
    let check_stop = out_len >= p.min_tokens;
    if req.stop_ids.contains(&token) {
        // The stop token's own text is not part of the output; held text is flushed.
        let reason = p.stop_token_ids.contains(&token).then(|| token.to_string());
        let text = seq.detok.finish(decoder, false)?.text;
        return Ok((text, SampleEnd::Finished(FinishReason::Stop, reason)));
    }
    let d = seq.detok.push(decoder, token, check_stop)?;
    if let Some(s) = d.stop {
        return Ok((d.text, SampleEnd::Finished(FinishReason::Stop, Some(s))));
    }
    // A grammar that cannot be extended ends the output (no EOS needed).
    let grammar_done = seq.grammar.as_ref().is_some_and(Grammar::is_stopped);
    if grammar_done || out_len >= p.max_tokens || seq.num_tokens() >= max_model_len {
        let f = seq.detok.finish(decoder, check_stop)?;
        let end = match f.stop {
            Some(s) => SampleEnd::Finished(FinishReason::Stop, Some(s)),
            None if grammar_done => SampleEnd::Finished(FinishReason::Stop, None),
            None => SampleEnd::Finished(FinishReason::Length, None),
        };
        return Ok((d.text + &f.text, end));
    }
    Ok((d.text, SampleEnd::Continue))
}

/// This step's grammar masks, computed on the rayon pool while the forward
/// runs. The sequences' grammars travel with the job and come back in
/// [`MaskJob::finish`], before anything samples.
struct MaskJob {
    /// Sequences whose grammar went with the job.
    seqs: Vec<SeqId>,
    rx: Option<std::sync::mpsc::Receiver<Vec<MaskResult>>>,
}

type MaskResult = (SeqId, Grammar, Result<TokenMask, String>);

impl MaskJob {
    /// Start computing the masks of the batch's sequences that sample this
    /// step and follow a grammar.
    fn start(sched: &mut Scheduler, scheduled: &[ScheduledSeq], batch: &ForwardBatch) -> MaskJob {
        let mut work: Vec<(SeqId, Grammar)> = Vec::new();
        for (sc, slice) in scheduled.iter().zip(&batch.seqs) {
            if !slice.needs_logits {
                continue;
            }
            if let Some(g) = sched.seq_mut(sc.seq_id).and_then(|s| s.grammar.take()) {
                work.push((sc.seq_id, g));
            }
        }
        if work.is_empty() {
            return MaskJob {
                seqs: Vec::new(),
                rx: None,
            };
        }
        let seqs = work.iter().map(|(id, _)| *id).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        rayon::spawn(move || {
            use rayon::prelude::*;
            let out: Vec<MaskResult> = work
                .into_par_iter()
                .map(|(id, mut g)| {
                    let m = g.compute_mask();
                    (id, g, m)
                })
                .collect();
            let _ = tx.send(out);
        });
        MaskJob { seqs, rx: Some(rx) }
    }

    /// Wait for the masks and give the grammars back to their sequences.
    fn finish(self, sched: &mut Scheduler) -> HashMap<SeqId, Result<TokenMask, String>> {
        let Some(rx) = self.rx else {
            return HashMap::new();
        };
        match rx.recv() {
            Ok(results) => results
                .into_iter()
                .map(|(id, g, m)| {
                    if let Some(seq) = sched.seq_mut(id) {
                        seq.grammar = Some(g);
                    }
                    (id, m)
                })
                .collect(),
            // The job died (a panic in the grammar code): its grammars are lost.
            Err(_) => self
                .seqs
                .into_iter()
                .map(|id| (id, Err("the grammar failed to compute a mask".to_string())))
                .collect(),
        }
    }
}
