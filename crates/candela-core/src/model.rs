//! What a model must provide to the engine: a forward pass over a ragged batch
//! whose keys and values live in a paged KV cache owned by the model.
//!
//! The engine (scheduler + block manager) decides which tokens run and where
//! their K/V go (slots); the model only executes. Nothing here names an
//! architecture.

use crate::request::MmFeatures;
use candle_core::{DType, Tensor};

/// Static facts about a loaded model that the engine needs for planning.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// `config.json` "architectures"[0], e.g. `LlamaForCausalLM`.
    pub architecture: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Width of the token embeddings (and of media embeddings that replace them).
    pub hidden_size: usize,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_model_len: usize,
    /// Element type of the KV cache.
    pub kv_dtype: DType,
}

impl ModelSpec {
    /// Bytes one KV block takes across all layers (K and V).
    pub fn kv_block_bytes(&self, block_size: usize) -> usize {
        2 * self.num_layers
            * block_size
            * self.num_kv_heads
            * self.head_dim
            * self.kv_dtype.size_in_bytes()
    }
}

/// One sequence's share of a [`ForwardBatch`].
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// Offset of this sequence's first new token in `ForwardBatch::input_ids`.
    pub query_start: usize,
    /// Number of new tokens this step (prefill chunk length, or 1 for decode).
    pub query_len: usize,
    /// Tokens in the KV cache for this sequence once this step's tokens are
    /// written (cached prefix + earlier chunks + `query_len`).
    pub context_len: usize,
    /// Physical block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
    /// Whether the logits of this sequence's last new token are wanted
    /// (false for a prefill chunk that does not reach the prompt's end).
    pub needs_logits: bool,
}

/// Media embeddings that replace the token embeddings of a run of batch
/// tokens (a media item's placeholders, or the part of them in this chunk).
#[derive(Debug, Clone)]
pub struct MmEmbedSpan {
    /// Index into `ForwardBatch::input_ids` of the first replaced token.
    pub start: usize,
    /// `[n, hidden_size]`: row `i` replaces token `start + i`.
    pub embeds: Tensor,
}

/// One step's work: the new tokens of every scheduled sequence, flattened.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    /// New token ids of all sequences, concatenated in `seqs` order.
    pub input_ids: Vec<u32>,
    /// Position of each new token within its sequence.
    pub positions: Vec<u32>,
    /// KV slot of each new token: `block_id * block_size + offset_in_block`.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    pub block_size: usize,
    /// Media embeddings to splice in, in increasing `start` order, non-overlapping.
    pub mm_embeds: Vec<MmEmbedSpan>,
    /// (temporal, height, width) rotary position of each new token when a
    /// sequence of the batch has M-RoPE positions (others get `[p, p, p]`);
    /// None otherwise.
    pub mrope_positions: Option<Vec<[u32; 3]>>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
    /// Number of rows the forward returns.
    pub fn num_logits(&self) -> usize {
        self.seqs.iter().filter(|s| s.needs_logits).count()
    }
}

/// A model the engine can drive. Implementations own their weights and the KV
/// pool tensors; they are moved onto the engine thread.
pub trait Model: Send {
    fn spec(&self) -> &ModelSpec;
    /// Preallocate the KV pool: `num_blocks` blocks of `block_size` tokens, all
    /// layers. Called once before the first forward.
    fn allocate_kv_cache(
        &mut self,
        num_blocks: usize,
        block_size: usize,
    ) -> candle_core::Result<()>;
    /// Write the batch's K/V into their slots, attend over each sequence's
    /// block table, and return f32 logits `[batch.num_logits(), vocab_size]`
    /// (one row per sequence with `needs_logits`, in `seqs` order).
    fn forward(&mut self, batch: &ForwardBatch) -> candle_core::Result<Tensor>;
    /// Whether one media item's tokens attend to each other both ways during
    /// prefill (Gemma 3's images): a prefill chunk must then never end
    /// inside an item.
    fn bidirectional_media(&self) -> bool {
        false
    }
    /// The keys each layer attends to, one entry per layer: `Some(w)` for a
    /// sliding-window layer (a token sees itself and the `w - 1` keys before
    /// it; a bidirectional span also sees its later keys, never earlier
    /// ones), `None` for full attention. Empty (the default): every layer
    /// attends to the whole context. When every layer slides, the engine
    /// frees the blocks behind the widest window (see [`kv_window`]).
    fn layer_windows(&self) -> Vec<Option<usize>> {
        Vec::new()
    }

    /// Run the media encoder (vision / audio tower + projector) on one item's
    /// preprocessed tensors, returning `[num_placeholder_tokens, hidden_size]`.
    /// Text-only models keep this default.
    fn encode(&mut self, features: &MmFeatures) -> candle_core::Result<Tensor> {
        let names: Vec<&str> = features.tensors.iter().map(|(n, _)| n.as_str()).collect();
        candle_core::bail!(
            "{} takes no media input (got {names:?})",
            self.spec().architecture
        )
    }
    /// Memory of the device the model runs on, read after its weights were
    /// loaded, with its estimate of the activations of a step of
    /// `max_num_batched_tokens` tokens and `max_num_seqs` logits rows. None on
    /// the CPU, where the KV budget comes from system memory instead.
    fn device_memory(
        &self,
        _max_num_batched_tokens: usize,
        _max_num_seqs: usize,
    ) -> Option<DeviceMemory> {
        None
    }
    /// Sample one token per entry of `rows` from `logits` (this model's
    /// forward output) on its device, returning only the ids. None when the
    /// model cannot (CPU models): the engine copies the rows and samples them.
    fn sample_on_device(
        &mut self,
        _logits: &Tensor,
        _rows: &[DeviceSampleRow],
    ) -> Option<candle_core::Result<Vec<u32>>> {
        None
    }
}

/// The window of the KV cache as a whole: the widest of [`Model::layer_windows`]
/// when every layer slides, else None (some layer reads every key, so no
/// block is ever behind all windows).
pub fn kv_window(layer_windows: &[Option<usize>]) -> Option<usize> {
    if layer_windows.is_empty() {
        return None;
    }
    layer_windows
        .iter()
        .try_fold(0, |widest, w| w.map(|w| widest.max(w)))
        .filter(|&w| w > 0)
}

/// See [`Model::device_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free_bytes: usize,
    pub total_bytes: usize,
    /// Bytes a step's activations need on top of weights and KV cache.
    pub activation_bytes: usize,
}

/// One row sampled by [`Model::sample_on_device`]: greedy below
/// [`crate::sampler::SAMPLING_EPS`], else temperature, min_p, top_k and top_p
/// (the host sampler's order) and a draw with `uniform`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampleRow {
    /// Row of the logits tensor.
    pub row: u32,
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    /// The sequence's uniform draw in [0, 1).
    pub uniform: f32,
}

/// Turns token ids back into text; implemented by the models crate's tokenizer.
pub trait TokenDecoder: Send + Sync {
    /// Decode ids to text. `skip_special_tokens` drops control tokens.
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String>;
}
