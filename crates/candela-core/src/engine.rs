//! The public engine: a handle to one engine thread that owns the model.
//!
//! Callers submit requests from any thread; each request gets its own tokio
//! unbounded channel of [`RequestEvent`]s. The engine thread loops: drain the
//! command channel (new requests, aborts, shutdown; block on it when idle) ->
//! schedule -> one forward over the ragged batch -> sample -> detokenize ->
//! send events -> free finished sequences.

use crate::block_manager::max_blocks_held;
use crate::encoder_cache::EncoderCache;
use crate::engine_core::{CoreConfig, EngineCore};
use crate::model::{DeviceMemory, Model, ModelSpec, TokenDecoder};
use crate::output::RequestEvent;
use crate::scheduler::SchedulerConfig;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use crate::request::{EngineRequest, MmInput, MmItem, MmPlaceholder};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes for the KV pool. None: on the CPU, what the model needs for
    /// [`default_kv_cache_tokens`] tokens, within [`machine_kv_cache_bytes`];
    /// on CUDA, `gpu_memory_utilization` of the GPU. Either way capped at what
    /// `max_num_seqs` sequences of `max_model_len` tokens need.
    pub kv_cache_bytes: Option<usize>,
    /// Fraction of the GPU's memory the engine may use in all (weights,
    /// activations, KV cache) when `kv_cache_bytes` is None; in (0, 1].
    pub gpu_memory_utilization: f32,
    pub max_num_seqs: usize,
    /// Token budget of one step (all sequences together).
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// None: the model's. May not exceed the model's.
    pub max_model_len: Option<usize>,
    /// Token ids that end generation (unless a request sets `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Media embedding rows the encoder cache may hold (0: no encoder cache).
    pub encoder_cache_tokens: usize,
    /// Compute threads of the engine's own pool. None: the machine's
    /// physical cores ([`crate::threads::physical_cores`]).
    pub threads: Option<usize>,
}

/// Most compute threads one engine may ask for.
pub const MAX_THREADS: usize = 1024;
const MAX_THREADS_PLUS_ONE: usize = MAX_THREADS + 1;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_bytes: None,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            enable_prefix_caching: true,
            max_model_len: None,
            eos_token_ids: Vec::new(),
            encoder_cache_tokens: 16384,
            threads: None,
        }
    }
}

/// A submitted request: its id (for [`Engine::abort`]) and its event stream.
/// The stream ends (yields `None`) after the last sample's `Finished` event or
/// after an `Error` event. Dropping the receiver aborts the request.
#[derive(Debug)]
pub struct RequestHandle {
    pub id: u64,
    pub events: UnboundedReceiver<RequestEvent>,
}

/// A snapshot of the engine's counters, refreshed on every loop turn.
/// `running` and `waiting` count sequences (one per sample).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_free: usize,
    /// Prompt tokens looked up in the prefix cache (at each admission).
    pub prefix_cache_queries: u64,
    /// Of those, tokens served from the cache.
    pub prefix_cache_hits: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    /// Requests that ended in any way (finished, aborted, failed).
    pub requests_finished: u64,
    /// Forward passes run.
    pub steps: u64,
    /// Media items run through the model's encoder (cache misses).
    pub encoder_runs: u64,
    /// Encoder cache lookups and hits (one per media item needing embeddings).
    pub encoder_cache_queries: u64,
    pub encoder_cache_hits: u64,
    /// Embedding rows and items the encoder cache holds.
    pub encoder_cache_tokens: usize,
    pub encoder_cache_items: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as given (HTTP 400).
    #[error("{0}")]
    InvalidRequest(String),
    /// Prompt plus completion exceed the context window (HTTP 400).
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens \
         ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or completion.",
        prompt_tokens + max_tokens
    )]
    ContextLength {
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error("invalid engine config: {0}")]
    InvalidConfig(String),
    #[error("model error: {0}")]
    Model(String),
    #[error("the engine has shut down")]
    Shutdown,
}

impl EngineError {
    /// Whether the caller's request was at fault (as opposed to the engine).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            EngineError::InvalidRequest(_) | EngineError::ContextLength { .. }
        )
    }
}

enum Command {
    Add {
        id: u64,
        // Boxed: a request is large, and every command moves through the channel.
        req: Box<EngineRequest>,
        tx: UnboundedSender<RequestEvent>,
    },
    Abort(u64),
    Shutdown,
}

/// Handle to a running engine. `Send + Sync`; share it through an `Arc`.
pub struct Engine {
    cmd_tx: crossbeam_channel::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<EngineStats>>,
    encoder_cache: Arc<Mutex<EncoderCache>>,
    config: EngineConfig,
    spec: ModelSpec,
    /// The model attends within a media item both ways: chunks keep items whole.
    whole_media_items: bool,
    /// Every layer slides: blocks behind this window are freed.
    kv_window: Option<usize>,
    num_blocks: usize,
    max_model_len: usize,
    next_id: AtomicU64,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("num_blocks", &self.num_blocks)
            .field("max_model_len", &self.max_model_len)
            .finish_non_exhaustive()
    }
}

const GIB: usize = 1 << 30;

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Full-context sequences the default CPU pool holds: one request may use
/// the whole context while another runs beside it (llama.cpp sizes its cache
/// the same way, `n_ctx` tokens times parallel slots).
pub const DEFAULT_KV_FULL_SEQUENCES: usize = 2;
/// The default CPU pool holds at least this many tokens, so a short-context
/// model still batches many ordinary requests.
pub const MIN_DEFAULT_KV_TOKENS: usize = 16384;

/// Tokens of the default CPU KV pool for a context of `max_model_len`:
/// [`DEFAULT_KV_FULL_SEQUENCES`] full contexts, at least
/// [`MIN_DEFAULT_KV_TOKENS`].
pub fn default_kv_cache_tokens(max_model_len: usize) -> usize {
    max_model_len
        .saturating_mul(DEFAULT_KV_FULL_SEQUENCES)
        .max(MIN_DEFAULT_KV_TOKENS)
}

/// The machine's bound on the default CPU KV pool: a quarter of available
/// memory, at most 4 GiB (1 GiB if the available memory cannot be read).
pub fn machine_kv_cache_bytes() -> usize {
    mem_available_bytes().map_or(GIB, |m| (m / 4).min(4 * GIB))
}

/// KV bytes left on a GPU: `utilization` of its memory, less what is in use
/// (weights, the CUDA context) and a step's activations.
pub fn gpu_kv_budget(mem: &DeviceMemory, utilization: f32) -> usize {
    let allowed = (mem.total_bytes as f64 * utilization as f64) as usize;
    let used = mem.total_bytes.saturating_sub(mem.free_bytes);
    allowed
        .saturating_sub(used)
        .saturating_sub(mem.activation_bytes)
}

/// How many KV blocks a config gives for a model. `device`: the memory of
/// the model's GPU, whose budget replaces system memory's (None on CPU).
pub fn plan_num_blocks(
    spec: &ModelSpec,
    config: &EngineConfig,
    max_model_len: usize,
    device: Option<&DeviceMemory>,
) -> Result<usize, EngineError> {
    let bs = config.block_size;
    let block_bytes = spec.kv_block_bytes(bs).max(1);
    let needed = config
        .max_num_seqs
        .saturating_mul(max_model_len.div_ceil(bs));
    let blocks = match config.kv_cache_bytes {
        Some(bytes) => {
            let b = bytes / block_bytes;
            if b == 0 {
                return Err(EngineError::InvalidConfig(format!(
                    "kv_cache_bytes = {bytes} is smaller than one KV block ({block_bytes} bytes)"
                )));
            }
            b
        }
        None => match device {
            None => {
                let tokens = default_kv_cache_tokens(max_model_len);
                let model = tokens.div_ceil(bs);
                let machine = machine_kv_cache_bytes() / block_bytes;
                model.min(machine).min(needed).max(1)
            }
            Some(mem) => {
                let u = config.gpu_memory_utilization;
                let b = gpu_kv_budget(mem, u) / block_bytes;
                if b == 0 {
                    const MIB: usize = 1 << 20;
                    return Err(EngineError::InvalidConfig(format!(
                        "gpu_memory_utilization = {u} leaves no room for the KV cache: {} MiB of the GPU's {} MiB \
                         are in use after loading the model and a step needs about {} MiB more (raise it, or lower \
                         max_num_batched_tokens / max_num_seqs)",
                        mem.total_bytes.saturating_sub(mem.free_bytes) / MIB,
                        mem.total_bytes / MIB,
                        mem.activation_bytes / MIB
                    )));
                }
                b.min(needed).max(1)
            }
        },
    };
    // Slots (block * block_size + offset) must fit in u32.
    Ok(blocks.min((u32::MAX as usize - 1) / bs))
}

impl Engine {
    /// Allocate the KV pool through `model.allocate_kv_cache` and start the
    /// engine thread.
    pub fn start(
        mut model: Box<dyn Model>,
        decoder: Arc<dyn TokenDecoder>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let spec = model.spec().clone();
        let whole_media_items = model.bidirectional_media();
        let kv_window = crate::model::kv_window(&model.layer_windows());
        if config.block_size == 0 {
            return Err(EngineError::InvalidConfig(
                "block_size must be at least 1".into(),
            ));
        }
        if config.max_num_seqs == 0 {
            return Err(EngineError::InvalidConfig(
                "max_num_seqs must be at least 1".into(),
            ));
        }
        if config.max_num_batched_tokens == 0 {
            return Err(EngineError::InvalidConfig(
                "max_num_batched_tokens must be at least 1".into(),
            ));
        }
        if let Some(t @ (0 | MAX_THREADS_PLUS_ONE..)) = config.threads {
            return Err(EngineError::InvalidConfig(format!(
                "threads must be in 1..={MAX_THREADS}, got {t}"
            )));
        }
        let u = config.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(EngineError::InvalidConfig(format!(
                "gpu_memory_utilization must be in (0, 1], got {u}"
            )));
        }
        if spec.vocab_size == 0 {
            return Err(EngineError::InvalidConfig(
                "the model reports a vocabulary of 0 tokens".into(),
            ));
        }
        let max_model_len = match config.max_model_len {
            None => spec.max_model_len,
            Some(m) if m > spec.max_model_len => {
                return Err(EngineError::InvalidConfig(format!(
                    "max_model_len = {m} exceeds the model's maximum of {}",
                    spec.max_model_len
                )))
            }
            Some(m) => m,
        };
        if max_model_len < 2 {
            return Err(EngineError::InvalidConfig(format!(
                "max_model_len = {max_model_len} leaves no room to generate"
            )));
        }
        let device_memory = model.device_memory(config.max_num_batched_tokens, config.max_num_seqs);
        let num_blocks = plan_num_blocks(&spec, &config, max_model_len, device_memory.as_ref())?;
        model
            .allocate_kv_cache(num_blocks, config.block_size)
            .map_err(|e| EngineError::Model(e.to_string()))?;

        let mut config = config;
        config.max_model_len = Some(max_model_len);
        let threads = *config
            .threads
            .get_or_insert_with(crate::threads::physical_cores);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("candela-compute-{i}"))
            .build()
            .map_err(|e| {
                EngineError::InvalidConfig(format!("cannot start {threads} compute threads: {e}"))
            })?;
        let encoder_cache = Arc::new(Mutex::new(EncoderCache::new(config.encoder_cache_tokens)));
        let core = EngineCore::new(
            model,
            decoder,
            CoreConfig {
                scheduler: SchedulerConfig {
                    num_blocks,
                    block_size: config.block_size,
                    max_num_seqs: config.max_num_seqs,
                    max_num_batched_tokens: config.max_num_batched_tokens,
                    enable_prefix_caching: config.enable_prefix_caching,
                    // vLLM's encoder compute budget: a step's worth of tokens.
                    encoder_budget: config.max_num_batched_tokens,
                    whole_media_items,
                    kv_window,
                },
                eos_token_ids: config.eos_token_ids.clone(),
                max_model_len,
                vocab_size: spec.vocab_size,
                hidden_size: spec.hidden_size,
                encoder_cache: encoder_cache.clone(),
            },
        );
        core.publish_stats();
        let stats = core.published_stats();
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("candela-engine".into())
            .spawn(move || pool.install(|| engine_loop(core, cmd_rx)))
            .map_err(|e| {
                EngineError::InvalidConfig(format!("cannot spawn the engine thread: {e}"))
            })?;
        Ok(Engine {
            cmd_tx,
            thread: Mutex::new(Some(thread)),
            stats,
            encoder_cache,
            config,
            spec,
            whole_media_items,
            kv_window,
            num_blocks,
            max_model_len,
            next_id: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
        })
    }

    /// Validate and queue a request. Errors here are the caller's (bad input)
    /// or [`EngineError::Shutdown`].
    pub fn add_request(&self, req: EngineRequest) -> Result<RequestHandle, EngineError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(EngineError::Shutdown);
        }
        self.validate(&req)?;
        let req = self.resolve_cached_media(req)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = unbounded_channel();
        self.cmd_tx
            .send(Command::Add {
                id,
                req: Box::new(req),
                tx,
            })
            .map_err(|_| EngineError::Shutdown)?;
        Ok(RequestHandle { id, events })
    }

    fn validate(&self, req: &EngineRequest) -> Result<(), EngineError> {
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest(
                "the prompt must contain at least one token".into(),
            ));
        }
        req.params.validate().map_err(EngineError::InvalidRequest)?;
        if req.params.n > self.config.max_num_seqs {
            return Err(EngineError::InvalidRequest(format!(
                "n = {} exceeds the engine's max_num_seqs = {}",
                req.params.n, self.config.max_num_seqs
            )));
        }
        let vocab = self.spec.vocab_size;
        if let Some((pos, &t)) = req
            .prompt_token_ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(EngineError::InvalidRequest(format!(
                "token id {t} at prompt position {pos} is out of range for a vocabulary of {vocab} tokens"
            )));
        }
        let max_tokens = req.params.max_tokens;
        if prompt_len >= self.max_model_len
            || prompt_len.saturating_add(max_tokens) > self.max_model_len
        {
            return Err(EngineError::ContextLength {
                max_model_len: self.max_model_len,
                prompt_tokens: prompt_len,
                max_tokens,
            });
        }
        let capacity = self.num_blocks * self.config.block_size;
        let bs = self.config.block_size;
        if max_blocks_held(prompt_len + 1, bs, self.kv_window) > self.num_blocks {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {prompt_len} tokens but the KV cache holds only {capacity} tokens ({} blocks of {})",
                self.num_blocks, self.config.block_size
            )));
        }
        let mut items: Vec<&MmPlaceholder> = req.mm_items.iter().map(|m| &m.placeholder).collect();
        items.sort_by_key(|m| m.offset);
        for pair in items.windows(2) {
            if pair[0].offset + pair[0].length > pair[1].offset {
                return Err(EngineError::InvalidRequest(format!(
                    "media items '{}' and '{}' overlap in the prompt",
                    pair[0].hash, pair[1].hash
                )));
            }
        }
        for item in &req.mm_items {
            let length = item.placeholder.length;
            if self.whole_media_items && length > self.config.max_num_batched_tokens {
                return Err(EngineError::InvalidRequest(format!(
                    "media item '{}' takes {length} tokens, more than max_num_batched_tokens = {}; \
                     this model prefills each item in one step",
                    item.placeholder.hash, self.config.max_num_batched_tokens
                )));
            }
            // Prefilled in one step, the item's tokens and the window before
            // them must all be in the pool at once.
            if let Some(w) = self.kv_window.filter(|_| self.whole_media_items) {
                let blocks = (length + w - 1).div_ceil(bs) + 1;
                if blocks > self.num_blocks {
                    return Err(EngineError::InvalidRequest(format!(
                        "media item '{}' takes {length} tokens; with the {w}-token attention window \
                         its prefill needs {blocks} KV cache blocks, the pool has {}",
                        item.placeholder.hash, self.num_blocks
                    )));
                }
            }
            if let MmInput::Embeddings(t) = &item.input {
                let (length, hidden) = (item.placeholder.length, self.spec.hidden_size);
                if t.dims() != [length, hidden] {
                    return Err(EngineError::InvalidRequest(format!(
                        "embeddings for media item '{}' must have shape [{length}, {hidden}] (placeholder tokens, hidden size), got {:?}",
                        item.placeholder.hash,
                        t.dims()
                    )));
                }
            }
        }
        if let Some(m) = &req.mrope {
            if m.prompt.len() != prompt_len {
                return Err(EngineError::InvalidRequest(format!(
                    "M-RoPE positions cover {} tokens but the prompt has {prompt_len}",
                    m.prompt.len()
                )));
            }
        }
        for m in items {
            if m.length == 0 || m.offset.saturating_add(m.length) > prompt_len {
                return Err(EngineError::InvalidRequest(format!(
                    "media item '{}' covers prompt tokens {}..{} but the prompt has {prompt_len} tokens",
                    m.hash,
                    m.offset,
                    m.offset.saturating_add(m.length)
                )));
            }
        }
        Ok(())
    }

    /// Replace each data-less media item by the encoder cache's embeddings
    /// (taken now, so a later eviction cannot strand the request).
    fn resolve_cached_media(&self, mut req: EngineRequest) -> Result<EngineRequest, EngineError> {
        for item in &mut req.mm_items {
            if matches!(item.input, MmInput::Cached) {
                let hit = lock(&self.encoder_cache).get(&item.placeholder.hash);
                match hit {
                    Some(t) => item.input = MmInput::Embeddings(t),
                    None => {
                        return Err(EngineError::InvalidRequest(format!(
                            "media item '{}' was sent without data and is not in the encoder cache",
                            item.placeholder.hash
                        )))
                    }
                }
            }
        }
        Ok(req)
    }

    /// Placeholder tokens of a media item the encoder cache holds (so a
    /// caller can lay out a prompt for an item sent by reference only).
    pub fn encoder_cache_tokens(&self, hash: &str) -> Option<usize> {
        lock(&self.encoder_cache).tokens_of(hash)
    }

    /// Hold an item's embeddings in the encoder cache (precomputed ones a
    /// caller sent with a uuid, to be referenced by it later).
    pub fn insert_encoder_output(&self, hash: &str, embeds: candle_core::Tensor) {
        lock(&self.encoder_cache).insert(hash, embeds)
    }

    /// Whether the encoder cache is on.
    pub fn encoder_cache_enabled(&self) -> bool {
        lock(&self.encoder_cache).enabled()
    }

    /// Abort a request at any moment: its blocks go back to the pool before
    /// the next step and each unfinished sample gets `Finished { reason: Abort }`.
    /// Unknown or finished ids are ignored.
    pub fn abort(&self, id: u64) {
        let _ = self.cmd_tx.send(Command::Abort(id));
    }

    pub fn stats(&self) -> EngineStats {
        lock(&self.stats).clone()
    }

    /// The config in effect (`max_model_len` resolved).
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn model_spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Compute threads the engine's steps run on.
    pub fn threads(&self) -> usize {
        self.config.threads.unwrap_or(1)
    }

    /// Stop the engine thread; pending requests are aborted. Idempotent; also
    /// runs on drop. Waits for the current step to end.
    pub fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.cmd_tx.send(Command::Shutdown);
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns true on shutdown.
fn handle(core: &mut EngineCore, cmd: Command) -> bool {
    match cmd {
        Command::Add { id, req, tx } => core.add_request(id, *req, tx),
        Command::Abort(id) => core.abort_request(id),
        Command::Shutdown => return true,
    }
    false
}

fn engine_loop(mut core: EngineCore, rx: crossbeam_channel::Receiver<Command>) {
    let mut idle_wait = false;
    loop {
        let mut shutdown = false;
        if !core.has_work() {
            match rx.recv() {
                Ok(cmd) => shutdown |= handle(&mut core, cmd),
                Err(_) => shutdown = true,
            }
        } else if idle_wait {
            // Work is queued but nothing could be scheduled: wait a little
            // for a command instead of spinning.
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(cmd) => shutdown |= handle(&mut core, cmd),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => shutdown = true,
            }
        }
        while !shutdown {
            match rx.try_recv() {
                Ok(cmd) => shutdown |= handle(&mut core, cmd),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => shutdown = true,
            }
        }
        if shutdown {
            core.abort_all();
            core.publish_stats();
            return;
        }
        core.publish_stats();
        idle_wait = !core.step();
        core.publish_stats();
    }
}

#[cfg(test)]
mod gpu_budget_tests {
    use super::*;
    use candle_core::DType;

    fn spec() -> ModelSpec {
        ModelSpec {
            architecture: "Test".into(),
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 64,
            vocab_size: 100,
            hidden_size: 128,
            max_model_len: 1024,
            kv_dtype: DType::BF16,
        }
    }

    #[test]
    fn gpu_budget_is_utilization_less_used_and_activations() {
        const GIB: usize = 1 << 30;
        let mem = DeviceMemory {
            free_bytes: 70 * GIB,
            total_bytes: 80 * GIB,
            activation_bytes: 2 * GIB,
        };
        // 0.75 * 80 = 60 GiB allowed, 10 in use, 2 for activations.
        assert_eq!(gpu_kv_budget(&mem, 0.75), 48 * GIB);
        assert_eq!(gpu_kv_budget(&mem, 0.1), 0);
        let spec = spec();
        let block = spec.kv_block_bytes(16);
        // Enough memory: capped at what max_num_seqs full sequences need.
        let cfg = EngineConfig {
            max_num_seqs: 4,
            ..EngineConfig::default()
        };
        assert_eq!(
            plan_num_blocks(&spec, &cfg, 1024, Some(&mem)).unwrap(),
            4 * 1024 / 16
        );
        // Little memory: the budget decides.
        let tight = DeviceMemory {
            free_bytes: 10 * block + GIB,
            total_bytes: 10 * block + GIB,
            activation_bytes: GIB,
        };
        let cfg = EngineConfig {
            gpu_memory_utilization: 1.0,
            ..EngineConfig::default()
        };
        assert_eq!(
            plan_num_blocks(&spec, &cfg, 1024, Some(&tight)).unwrap(),
            10
        );
        // No room at all is a clear error.
        let cfg = EngineConfig {
            gpu_memory_utilization: 0.1,
            ..EngineConfig::default()
        };
        let err = plan_num_blocks(&spec, &cfg, 1024, Some(&mem))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpu_memory_utilization = 0.1"), "{err}");
        // An explicit kv_cache_bytes wins over the GPU budget.
        let cfg = EngineConfig {
            kv_cache_bytes: Some(3 * block),
            ..EngineConfig::default()
        };
        assert_eq!(plan_num_blocks(&spec, &cfg, 1024, Some(&mem)).unwrap(), 3);
    }

    #[test]
    fn cpu_default_follows_the_model_within_the_machine() {
        let spec = spec();
        let block = spec.kv_block_bytes(16);
        let machine = machine_kv_cache_bytes() / block;
        let cfg = EngineConfig::default();
        // Two full 8192-token contexts.
        assert_eq!(default_kv_cache_tokens(8192), 16384);
        assert_eq!(
            plan_num_blocks(&spec, &cfg, 8192, None).unwrap(),
            (16384 / 16).min(machine)
        );
        assert_eq!(
            plan_num_blocks(&spec, &cfg, 32768, None).unwrap(),
            (65536 / 16).min(machine)
        );
        // A short context still gets the minimum, unless max_num_seqs full
        // sequences need less.
        assert_eq!(default_kv_cache_tokens(128), MIN_DEFAULT_KV_TOKENS);
        let few = EngineConfig {
            max_num_seqs: 4,
            ..EngineConfig::default()
        };
        assert_eq!(
            plan_num_blocks(&spec, &few, 1024, None).unwrap(),
            (4 * 1024 / 16).min(machine)
        );
        // An explicit size wins.
        let cfg = EngineConfig {
            kv_cache_bytes: Some(5 * block),
            ..EngineConfig::default()
        };
        assert_eq!(plan_num_blocks(&spec, &cfg, 8192, None).unwrap(), 5);
    }
}
