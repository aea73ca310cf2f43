//! Multimodal processors: what a model needs done to a media item before the
//! engine sees it (features, and how many placeholder tokens it fills), and
//! the expansion of each item's single placeholder token in a tokenized
//! prompt into that many tokens.
//!
//! Decoding (bytes -> samples / pixels) lives in candela-media; this layer
//! owns the per-model parts: feature sizes, token counts, placeholder ids.

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candela_media::audio::{Padding, WhisperFeatureExtractor};
use candle_core::{Device, Tensor};

use crate::audio_encoder::AudioEncoder;
use crate::error::{ModelError, Result};

/// One preprocessed item: model-ready tensors and its placeholder count.
#[derive(Debug, Clone)]
pub struct ProcessedItem {
    pub features: Arc<MmFeatures>,
    pub num_tokens: usize,
}

/// Audio preprocessing of a Whisper-encoder model (Qwen2-Audio).
pub struct AudioProcessor {
    pub extractor: WhisperFeatureExtractor,
    /// The token the chat template writes once per audio item.
    pub placeholder_token: u32,
    /// Stride-2 pooling after the encoder (Qwen2-Audio) halves the tokens.
    pub pooled: bool,
    pub max_source_positions: usize,
}

impl AudioProcessor {
    /// Sample rate the samples given to [`Self::process`] must have.
    pub fn sampling_rate(&self) -> u32 {
        self.extractor.sampling_rate()
    }

    /// Longest clip the encoder takes, in samples (30 s for Whisper).
    pub fn max_samples(&self) -> usize {
        self.extractor.n_samples()
    }

    /// Placeholder tokens for `frames` valid mel frames.
    pub fn num_tokens(&self, frames: usize) -> usize {
        let n = AudioEncoder::conv_output_len(frames);
        if self.pooled {
            n.saturating_sub(2) / 2 + 1
        } else {
            n
        }
    }

    /// Log-mel features of mono samples at [`Self::sampling_rate`], padded
    /// to the encoder's 30 s window like the reference processor; longer
    /// audio is cut at 30 s, as Qwen2-Audio's processor does.
    pub fn process(&self, samples: &[f32]) -> Result<ProcessedItem> {
        if samples.is_empty() {
            return Err(ModelError::Media("the audio has no samples".into()));
        }
        let f = self.extractor.extract(samples, Padding::MaxLength);
        let frames = f.attention_frames.max(1);
        if f.frames > 2 * self.max_source_positions {
            return Err(ModelError::Media(format!(
                "audio features have {} frames, the encoder takes at most {}",
                f.frames,
                2 * self.max_source_positions
            )));
        }
        // Only the frames the encoder reads for the kept positions (see
        // AudioEncoder::forward) are stored: the rest is padding.
        let keep = (2 * AudioEncoder::conv_output_len(frames) + 2).min(f.frames);
        let mut data = Vec::with_capacity(f.n_mels * keep);
        for row in f.data.chunks(f.frames) {
            data.extend_from_slice(&row[..keep]);
        }
        let x = Tensor::from_vec(data, (f.n_mels, keep), &Device::Cpu)?;
        let frames_t = Tensor::from_vec(vec![frames as u32], 1, &Device::Cpu)?;
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![
                    (crate::qwen2_audio::FEATURES.into(), x),
                    (crate::qwen2_audio::FEATURE_FRAMES.into(), frames_t),
                ],
            }),
            num_tokens: self.num_tokens(frames),
        })
    }
}

impl std::fmt::Debug for AudioProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioProcessor")
            .field("placeholder_token", &self.placeholder_token)
            .field("pooled", &self.pooled)
            .field("n_mels", &self.extractor.n_mels())
            .finish()
    }
}

/// What a loaded model accepts besides text.
#[derive(Debug, Default)]
pub struct MmProcessor {
    pub audio: Option<AudioProcessor>,
}

/// Processor cache: `mm_hash -> preprocessed item`, bounded in bytes, least
/// recently used out first. A repeated item skips decoding and feature
/// extraction.
#[derive(Debug)]
pub struct ProcessorCache {
    capacity_bytes: usize,
    used_bytes: usize,
    entries: std::collections::HashMap<String, (ProcessedItem, usize, u64)>,
    clock: u64,
    pub queries: u64,
    pub hits: u64,
}

impl ProcessorCache {
    /// A cache of at most `capacity_bytes`; 0 disables it.
    pub fn new(capacity_bytes: usize) -> Self {
        Self { capacity_bytes, used_bytes: 0, entries: Default::default(), clock: 0, queries: 0, hits: 0 }
    }

    pub fn enabled(&self) -> bool {
        self.capacity_bytes > 0
    }

    pub fn get(&mut self, hash: &str) -> Option<ProcessedItem> {
        if !self.enabled() {
            return None;
        }
        self.queries += 1;
        self.clock += 1;
        let e = self.entries.get_mut(hash)?;
        e.2 = self.clock;
        self.hits += 1;
        Some(e.0.clone())
    }

    pub fn insert(&mut self, hash: &str, item: ProcessedItem) {
        let bytes = item.features.num_bytes();
        if !self.enabled() || bytes > self.capacity_bytes {
            return;
        }
        if let Some(old) = self.entries.remove(hash) {
            self.used_bytes -= old.1;
        }
        while self.used_bytes + bytes > self.capacity_bytes {
            let Some(k) = self.entries.iter().min_by_key(|(_, e)| e.2).map(|(k, _)| k.clone()) else { break };
            if let Some(e) = self.entries.remove(&k) {
                self.used_bytes -= e.1;
            }
        }
        self.clock += 1;
        self.used_bytes += bytes;
        self.entries.insert(hash.to_string(), (item, bytes, self.clock));
    }

    /// `(items, bytes)` held.
    pub fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.used_bytes)
    }
}

/// Where one item's placeholders landed in an expanded prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaceholderRange {
    pub offset: usize,
    pub length: usize,
}

/// Replace the i-th occurrence of `token` in `ids` by `counts[i]` copies.
/// The number of occurrences must equal the number of items.
pub fn expand_placeholders(ids: &[u32], token: u32, counts: &[usize], what: &str) -> Result<(Vec<u32>, Vec<PlaceholderRange>)> {
    let found = ids.iter().filter(|&&t| t == token).count();
    if found != counts.len() {
        return Err(ModelError::Media(format!(
            "the prompt has {found} {what} placeholder(s) but {} {what} item(s) were given",
            counts.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut ranges = Vec::with_capacity(counts.len());
    let mut next = counts.iter();
    for &t in ids {
        if t == token {
            let n = *next.next().unwrap_or(&1);
            ranges.push(PlaceholderRange { offset: out.len(), length: n });
            out.extend(std::iter::repeat_n(token, n));
        } else {
            out.push(t);
        }
    }
    Ok((out, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(bytes: usize) -> ProcessedItem {
        let t = Tensor::zeros(bytes / 4, candle_core::DType::F32, &Device::Cpu).unwrap();
        ProcessedItem { features: Arc::new(MmFeatures { tensors: vec![("x".into(), t)] }), num_tokens: 1 }
    }

    #[test]
    fn processor_cache_is_bounded_in_bytes_lru_first() {
        let mut c = ProcessorCache::new(100);
        c.insert("a", item(40));
        c.insert("b", item(40));
        assert!(c.get("a").is_some());
        c.insert("c", item(40));
        assert!(c.get("b").is_none() && c.get("a").is_some() && c.get("c").is_some());
        assert_eq!(c.usage(), (2, 80));
        assert_eq!((c.queries, c.hits), (4, 3));
        c.insert("huge", item(400));
        assert_eq!(c.usage(), (2, 80));
    }

    #[test]
    fn placeholders_expand_in_order() {
        let (ids, r) = expand_placeholders(&[1, 9, 2, 9, 3], 9, &[3, 1], "audio").unwrap();
        assert_eq!(ids, vec![1, 9, 9, 9, 2, 9, 3]);
        assert_eq!(r, vec![PlaceholderRange { offset: 1, length: 3 }, PlaceholderRange { offset: 5, length: 1 }]);
        let err = expand_placeholders(&[1, 9], 9, &[2, 2], "audio").unwrap_err().to_string();
        assert!(err.contains("1 audio placeholder(s) but 2 audio item(s)"), "{err}");
    }
}
