//! The one engine model for every multimodal family: a decoder language
//! model plus the family's media encoder (tower + projector), whose output
//! rows replace the embeddings of an item's placeholder tokens.

use candela_core::model::{DeviceMemory, DeviceSampleRow, ForwardBatch, Model, ModelSpec};
use candela_core::request::MmFeatures;
use candle_core::{Result, Tensor};

use crate::error::{ModelError, Result as MResult};
use crate::nn::decoder::DecoderLm;
use crate::weights::Weights;

/// A family's media side: preprocessed tensors of one item in,
/// `[rows, hidden_size]` embeddings out (any float dtype).
pub trait MediaEncoder: Send + Sync {
    fn encode(&self, features: &MmFeatures) -> Result<Tensor>;
}

pub struct MultimodalLm {
    lm: DecoderLm,
    encoder: Box<dyn MediaEncoder>,
    spec: ModelSpec,
}

impl MultimodalLm {
    /// `architecture` names the checkpoint in the spec (the LM's own config
    /// names the text model).
    pub fn new(lm: DecoderLm, encoder: Box<dyn MediaEncoder>, architecture: &str) -> Self {
        let mut spec = lm.spec().clone();
        spec.architecture = architecture.to_string();
        Self { lm, encoder, spec }
    }

    /// Every-position logits (parity checks).
    pub fn forward_all_logits(&mut self, batch: &ForwardBatch) -> Result<Tensor> {
        self.lm.forward_all_logits(batch)
    }
}

impl Model for MultimodalLm {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn allocate_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        self.lm.allocate_kv_cache(num_blocks, block_size)
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Tensor> {
        self.lm.forward(batch)
    }

    fn bidirectional_media(&self) -> bool {
        self.lm.bidirectional_media()
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.lm.layer_windows()
    }

    fn encode(&mut self, features: &MmFeatures) -> Result<Tensor> {
        let dtype = self.lm.dtype();
        // On the rayon pool, whose threads the towers' kernels split work over.
        rayon::scope(|_| self.encoder.encode(features)?.to_dtype(dtype))
    }

    // The language model owns the KV pool and the logits: GPU sizing and
    // sampling are its.
    fn device_memory(
        &self,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Option<DeviceMemory> {
        self.lm.device_memory(max_num_batched_tokens, max_num_seqs)
    }

    fn sample_on_device(
        &mut self,
        logits: &Tensor,
        rows: &[DeviceSampleRow],
    ) -> Option<Result<Vec<u32>>> {
        self.lm.sample_on_device(logits, rows)
    }
}

/// Where a `*ForConditionalGeneration` checkpoint keeps its parts: its
/// language model's weights under a plain decoder's names, and the root the
/// tower and projector sit under. Released files and transformers 5 write
/// `language_model.model.*` (root `""`); transformers 4.5x saves
/// `model.language_model.*` (root `"model."`).
pub fn language_model_weights(w: &Weights) -> MResult<(Weights, &'static str)> {
    if w.contains("model.language_model.embed_tokens.weight") {
        let lm = w.renamed(|n: &str| match n.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => n.to_string(),
        })?;
        Ok((lm, "model."))
    } else {
        Ok((w.renamed(|n: &str| format!("language_model.{n}"))?, ""))
    }
}

/// The prefix of a CLIP / SigLIP tower under `root`: with or without
/// `.vision_model` (as `*VisionModel` or `*VisionTransformer` was saved),
/// found by `probe`, a tensor name inside the tower.
pub fn vision_tower_prefix(w: &Weights, root: &str, probe: &str) -> MResult<String> {
    [
        format!("{root}vision_tower.vision_model"),
        format!("{root}vision_tower"),
    ]
    .into_iter()
    .find(|p| w.pp(p).contains(probe))
    .ok_or_else(|| ModelError::MissingTensor(format!("{root}vision_tower.vision_model.{probe}")))
}
