//! What a caller submits to the engine.

use crate::params::SamplingParams;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A media item's placeholder tokens inside a prompt. Its hash feeds the
/// prefix-cache block hashes (so two prompts with the same placeholder tokens
/// but different images never share KV blocks) and keys the encoder cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MmPlaceholder {
    /// Content key of the item: the caller's uuid, or a hex blake3 of its
    /// bytes plus processor kwargs.
    pub hash: String,
    /// Index of the item's first placeholder token in the prompt.
    pub offset: usize,
    /// Number of placeholder tokens (the item's feature length).
    pub length: usize,
}

/// Model-ready tensors of one media item (e.g. `input_features` for audio,
/// `pixel_values` + `image_grid_thw` for images). The engine never looks
/// inside: it hands them to [`crate::model::Model::encode`].
#[derive(Debug, Clone, Default)]
pub struct MmFeatures {
    pub tensors: Vec<(String, Tensor)>,
}

impl MmFeatures {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    /// Bytes held (for the processor cache's budget).
    pub fn num_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// What the engine gets for a media item.
#[derive(Debug, Clone)]
pub enum MmInput {
    /// Preprocessed tensors; the model's encoder runs on them (unless the
    /// encoder cache already holds this item's output).
    Features(Arc<MmFeatures>),
    /// The encoder's output itself, `[length, hidden_size]` (precomputed
    /// embeddings sent by the caller).
    Embeddings(Tensor),
    /// Only a reference: the encoder cache must hold the item's output
    /// (checked when the request is added).
    Cached,
}

/// One media item of a request: where its placeholders are and its data.
#[derive(Debug, Clone)]
pub struct MmItem {
    pub placeholder: MmPlaceholder,
    pub input: MmInput,
}

/// Multimodal rotary positions (Qwen2-VL's M-RoPE): a (temporal, height,
/// width) position per prompt token, laid out by the model's processor from
/// the media grids. Generated tokens continue at `index + delta` on all
/// three axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    /// One entry per prompt token.
    pub prompt: Arc<[[u32; 3]]>,
    /// Position of token `i >= prompt.len()` is `i + delta` (negative when
    /// media compressed the position range).
    pub delta: i64,
}

impl MropePositions {
    /// The 3-D position of token `index` of the sequence.
    pub fn at(&self, index: usize) -> [u32; 3] {
        match self.prompt.get(index) {
            Some(p) => *p,
            None => {
                let p = (index as i64 + self.delta).max(0) as u32;
                [p, p, p]
            }
        }
    }
}

/// One generation request: a tokenized prompt, how to sample, and the media
/// items it carries.
#[derive(Debug, Clone, Default)]
pub struct EngineRequest {
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub mm_items: Vec<MmItem>,
    /// 3-D rotary positions, for models with M-RoPE (else None).
    pub mrope: Option<MropePositions>,
}

impl EngineRequest {
    /// A text-only request.
    pub fn new(prompt_token_ids: Vec<u32>, params: SamplingParams) -> Self {
        Self {
            prompt_token_ids,
            params,
            mm_items: Vec::new(),
            mrope: None,
        }
    }
}
