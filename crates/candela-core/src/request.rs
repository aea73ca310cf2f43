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
        self.tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum()
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

/// One generation request: a tokenized prompt, how to sample, and the media
/// items it carries.
#[derive(Debug, Clone, Default)]
pub struct EngineRequest {
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub mm_items: Vec<MmItem>,
}

impl EngineRequest {
    /// A text-only request.
    pub fn new(prompt_token_ids: Vec<u32>, params: SamplingParams) -> Self {
        Self { prompt_token_ids, params, mm_items: Vec::new() }
    }
}
