//! The contract between a model family and input preparation (in the spirit
//! of vLLM's multimodal processors with prompt replacement): which
//! modalities a model takes, how an item's options are checked and keyed,
//! how its bytes become model-ready tensors, what its placeholder token
//! expands to in the prompt, and (optionally) the prompt's positions.
//!
//! Decoding itself (bytes -> pixels / samples) lives in candela-media; a
//! family's processor owns the model-specific parts: sizes, token counts,
//! placeholder and wrapper tokens, position layouts.

pub mod cache;

use std::ops::Range;
use std::sync::Arc;

use candela_core::request::{MmFeatures, MropePositions};
use candela_media::image::ImageOptions;
use candela_media::video::VideoDecodeOptions;
use candela_media::{MediaError, Modality};

pub use cache::ProcessorCache;

/// An item's data as the caller gave it.
#[derive(Debug, Clone)]
pub enum MediaData {
    /// An encoded file (PNG, JPEG, WAV, MP3, MP4, WebM, ...) with an
    /// optional container / codec hint ("wav", a MIME type).
    Encoded {
        bytes: Vec<u8>,
        format: Option<String>,
    },
    /// A video as its frames, each an encoded image.
    Frames(Vec<Vec<u8>>),
    /// Raw audio, one array per channel.
    Samples { channels: Vec<Vec<f32>>, rate: u32 },
}

impl MediaData {
    /// Bytes that identify the content (hashed when there is no uuid).
    pub fn content_bytes(&self) -> Vec<u8> {
        match self {
            Self::Encoded { bytes, .. } => bytes.clone(),
            Self::Frames(frames) => {
                // Length-prefixed so that frame boundaries count.
                let mut out = Vec::new();
                for f in frames {
                    out.extend_from_slice(&(f.len() as u64).to_le_bytes());
                    out.extend_from_slice(f);
                }
                out
            }
            Self::Samples { channels, rate } => {
                let mut out = rate.to_le_bytes().to_vec();
                for c in channels {
                    out.extend_from_slice(&(c.len() as u64).to_le_bytes());
                    for v in c {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                out
            }
        }
    }
}

/// How files are decoded (alpha background, size limits, frame recovery).
#[derive(Debug, Clone, Default)]
pub struct DecodeOptions {
    pub image: ImageOptions,
    pub video: VideoDecodeOptions,
}

/// How one item sits in the prompt: enough to rebuild its replacement and
/// positions without its tensors (an item sent again by uuid only, whose
/// embeddings are in the encoder cache).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ItemLayout {
    /// Rows the encoder produces for the item.
    pub embeds: usize,
    /// (t, h, w) patch grid of a vision item, for families whose prompt
    /// layout or positions depend on it.
    pub grid_thw: Option<[usize; 3]>,
    /// Time positions per temporal patch (M-RoPE video); 1 otherwise.
    pub time_interval: f64,
    /// Sampled video frames that `frame_recovery` replaced or left out
    /// (kept with the layout: a cached item answers from the same frames).
    pub frames: FrameLoss,
}

/// Sampled frames of a video that failed to decode and that `frame_recovery`
/// replaced by a later frame (`recovered`) or left out (`dropped`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameLoss {
    pub recovered: usize,
    pub dropped: usize,
}

impl std::ops::Add for FrameLoss {
    type Output = FrameLoss;
    fn add(self, o: FrameLoss) -> FrameLoss {
        FrameLoss {
            recovered: self.recovered + o.recovered,
            dropped: self.dropped + o.dropped,
        }
    }
}

impl ItemLayout {
    /// A layout of `embeds` rows and nothing else.
    pub fn rows(embeds: usize) -> Self {
        Self {
            embeds,
            grid_thw: None,
            time_interval: 1.0,
            frames: FrameLoss::default(),
        }
    }
}

/// One preprocessed item: model-ready tensors and its layout.
#[derive(Debug, Clone)]
pub struct ProcessedItem {
    pub features: Arc<MmFeatures>,
    pub layout: ItemLayout,
}

impl ProcessedItem {
    /// Encoder rows (placeholder tokens that take embeddings).
    pub fn num_tokens(&self) -> usize {
        self.layout.embeds
    }
}

/// What one placeholder token of the rendered prompt expands to: token ids,
/// and the runs of them that take the encoder's rows (in order, not
/// overlapping). Tokens around the runs (wrappers such as Gemma 3's
/// `<start_of_image>`, the text between its pan-and-scan crops) stay text.
///
/// Each run reaches the engine as an item of its own (its own encoder call,
/// cache entry and bidirectional span): an item of several runs has feature
/// tensors whose first dimension holds one entry per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    pub tokens: Vec<u32>,
    pub embeds: Vec<Range<usize>>,
}

impl Replacement {
    /// Rows taken over all runs.
    pub fn rows(&self) -> usize {
        self.embeds.iter().map(|r| r.len()).sum()
    }
}

/// An item placed in the expanded prompt (for [`MmProcessor::positions`]).
#[derive(Debug, Clone, Copy)]
pub struct PlacedItem {
    pub modality: Modality,
    /// Index of the first token that takes the item's embeddings.
    pub offset: usize,
    pub layout: ItemLayout,
}

/// How many items of each modality the prompt holds: the context of each
/// of its items, for families that process an item differently when it
/// shares its prompt (LLaVA-OneVision tiles an image only when it is its
/// prompt's only one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptItems {
    counts: [usize; 3],
}

impl PromptItems {
    /// The counts of `modalities` (one entry per item).
    pub fn of(modalities: impl IntoIterator<Item = Modality>) -> Self {
        let mut p = Self::default();
        for m in modalities {
            p.counts[Self::slot(m)] += 1;
        }
        p
    }

    /// Items of `modality` in the prompt.
    pub fn count(&self, modality: Modality) -> usize {
        self.counts[Self::slot(modality)]
    }

    fn slot(m: Modality) -> usize {
        match m {
            Modality::Image => 0,
            Modality::Video => 1,
            Modality::Audio => 2,
        }
    }
}

/// A family's media processor.
pub trait MmProcessor: Send + Sync + std::fmt::Debug {
    /// The modalities the model takes.
    fn modalities(&self) -> &[Modality];

    /// The token the chat template writes once per item of `modality`.
    fn placeholder_token(&self, modality: Modality) -> Option<u32>;

    /// Check per-item options (vLLM's `mm_processor_kwargs`; `Null` when
    /// none) and return the canonical string of those that shape the item's
    /// tensors, which enters its `mm_hash`.
    fn kwargs_key(
        &self,
        modality: Modality,
        kwargs: &serde_json::Value,
    ) -> Result<String, MediaError>;

    /// The canonical string of what in the item's prompt (`prompt`) shapes
    /// its tensors, which enters its `mm_hash` (so that an item processed
    /// differently in another prompt has its own processor and encoder
    /// cache entries); empty (the default) when nothing does.
    fn prompt_key(&self, _modality: Modality, _prompt: &PromptItems) -> String {
        String::new()
    }

    /// Decode and preprocess one item (kwargs already checked by
    /// [`Self::kwargs_key`]) of a prompt holding `prompt`'s items.
    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        kwargs: &serde_json::Value,
        opts: &DecodeOptions,
        prompt: &PromptItems,
    ) -> Result<ProcessedItem, MediaError>;

    /// What the item's placeholder expands to; by default the placeholder
    /// repeated once per encoder row.
    fn replacement(
        &self,
        modality: Modality,
        layout: &ItemLayout,
    ) -> Result<Replacement, MediaError> {
        let token = self.placeholder_token(modality).ok_or_else(|| {
            MediaError::Invalid(format!(
                "this model does not accept {} input",
                modality.name()
            ))
        })?;
        Ok(Replacement {
            tokens: vec![token; layout.embeds],
            embeds: std::iter::once(0..layout.embeds).collect(),
        })
    }

    /// The one token the tokenizer writes for `left` followed by `right`
    /// where a replacement's text tokens meet the prompt's (Gemma 3's
    /// `"\n\n"` wrapper after the template's `"\n"` is one `"\n\n\n"`
    /// token when transformers tokenizes the expanded text); None keeps both.
    fn merge_at_boundary(&self, _left: u32, _right: u32) -> Option<u32> {
        None
    }

    /// Per-token positions of the expanded prompt, for families that lay
    /// them out themselves (M-RoPE); None keeps 1-D positions.
    fn positions(
        &self,
        _num_tokens: usize,
        _items: &[PlacedItem],
    ) -> Result<Option<MropePositions>, MediaError> {
        Ok(None)
    }

    /// The layout of precomputed embeddings of `rows` rows sent for an item
    /// (with the grid the caller gave, if any); families that do not accept
    /// embeddings keep this default.
    fn embeddings_layout(
        &self,
        modality: Modality,
        _rows: usize,
        _grid_thw: Option<[usize; 3]>,
    ) -> Result<ItemLayout, MediaError> {
        Err(MediaError::Invalid(format!(
            "this model does not accept {} embeddings",
            modality.name()
        )))
    }
}
