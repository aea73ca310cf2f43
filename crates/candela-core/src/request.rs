//! What a caller submits to the engine.

use crate::params::SamplingParams;
use serde::{Deserialize, Serialize};

/// A media item's placeholder tokens inside a prompt. Today it only feeds the
/// prefix-cache block hashes (so two prompts with the same placeholder tokens
/// but different images never share KV blocks); the encoder path uses it later.
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

/// One generation request: a tokenized prompt, how to sample, and the media
/// items it carries.
#[derive(Debug, Clone, Default)]
pub struct EngineRequest {
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub mm_items: Vec<MmPlaceholder>,
}

impl EngineRequest {
    /// A text-only request.
    pub fn new(prompt_token_ids: Vec<u32>, params: SamplingParams) -> Self {
        Self { prompt_token_ids, params, mm_items: Vec::new() }
    }
}
