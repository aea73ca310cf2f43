//! Qwen2-Audio's audio processing (transformers' `WhisperFeatureExtractor`
//! as `Qwen2AudioProcessor` uses it): mono at 16 kHz, log-mel features
//! padded to the encoder's 30 s window, one `<|AUDIO|>` per pooled frame.

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candela_media::audio::{
    decode_to_mono, mono_from_channels, resample, Padding, WhisperFeatureExtractor,
};
use candela_media::{MediaError, Modality};
use candle_core::{Device, Tensor};

use crate::nn::whisper_encoder::AudioEncoder;
use crate::processor::{
    DecodeOptions, ItemLayout, MediaData, MmProcessor, ProcessedItem, PromptItems,
};

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
    /// Sample rate the samples given to [`Self::process_samples`] must have.
    pub fn sampling_rate(&self) -> u32 {
        self.extractor.sampling_rate()
    }

    /// Placeholder tokens for `frames` valid mel frames: transformers'
    /// `(frames - 1) // 2 + 1` after the strided conv, then
    /// `(n - 2) // 2 + 1` after pooling, with Python's floor division (0
    /// tokens for clips of under 3 mel frames).
    pub fn num_tokens(&self, frames: usize) -> usize {
        let n = AudioEncoder::conv_output_len(frames);
        if self.pooled {
            (n as i64 - 2).div_euclid(2).saturating_add(1).max(0) as usize
        } else {
            n
        }
    }

    /// Log-mel features of mono samples at [`Self::sampling_rate`], padded
    /// to the encoder's 30 s window like the reference processor; longer
    /// audio is cut at 30 s, as Qwen2-Audio's processor does.
    pub fn process_samples(&self, samples: &[f32]) -> Result<ProcessedItem, MediaError> {
        if samples.is_empty() {
            return Err(MediaError::Empty("the audio has no samples".into()));
        }
        let f = self.extractor.extract(samples, Padding::MaxLength);
        let frames = f.attention_frames.max(1);
        let tokens = self.num_tokens(frames);
        if tokens == 0 {
            // The reference gives such a clip no audio token at all, and its
            // placeholder then has nothing to take: refuse it instead. Three
            // mel frames (one pooled position) need more than two hops.
            let least = 2 * self.extractor.config().hop_length + 1;
            let rate = self.sampling_rate() as f64;
            return Err(MediaError::Invalid(format!(
                "the audio is too short: {} samples ({:.4} s) at {} Hz; the audio encoder needs at least {least} ({:.4} s)",
                samples.len(),
                samples.len() as f64 / rate,
                self.sampling_rate(),
                least as f64 / rate
            )));
        }
        if f.frames > 2 * self.max_source_positions {
            return Err(MediaError::Invalid(format!(
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
        let t = |r: candle_core::Result<Tensor>| {
            r.map_err(|e| MediaError::Invalid(format!("audio features: {e}")))
        };
        let x = t(Tensor::from_vec(data, (f.n_mels, keep), &Device::Cpu))?;
        let frames_t = t(Tensor::from_vec(vec![frames as u32], 1, &Device::Cpu))?;
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![
                    (super::FEATURES.into(), x),
                    (super::FEATURE_FRAMES.into(), frames_t),
                ],
            }),
            layout: ItemLayout::rows(tokens),
        })
    }
}

impl MmProcessor for AudioProcessor {
    fn modalities(&self) -> &[Modality] {
        &[Modality::Audio]
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        (modality == Modality::Audio).then_some(self.placeholder_token)
    }

    fn kwargs_key(
        &self,
        _modality: Modality,
        kwargs: &serde_json::Value,
    ) -> Result<String, MediaError> {
        match kwargs {
            serde_json::Value::Null => Ok("{}".into()),
            serde_json::Value::Object(o) if o.values().all(|v| v.is_null()) => Ok("{}".into()),
            serde_json::Value::Object(o) => Err(MediaError::Invalid(format!(
                "audio items take no processor kwargs (got {})",
                o.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
            other => Err(MediaError::Invalid(format!(
                "processor kwargs must be an object, got {other}"
            ))),
        }
    }

    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        _kwargs: &serde_json::Value,
        _opts: &DecodeOptions,
        _prompt: &PromptItems,
    ) -> Result<ProcessedItem, MediaError> {
        let rate = self.sampling_rate();
        let mono = match (modality, data) {
            (Modality::Audio, MediaData::Encoded { bytes, format }) => {
                decode_to_mono(bytes, format.as_deref(), rate)?
            }
            (Modality::Audio, MediaData::Samples { channels, rate: sr }) => {
                resample(&mono_from_channels(channels)?, *sr, rate)?
            }
            (m, _) => {
                return Err(MediaError::Invalid(format!(
                    "a {} item needs its data",
                    m.name()
                )))
            }
        };
        self.process_samples(&mono)
    }

    /// Audio embeddings (vLLM's `audio_embeds`): the projected encoder
    /// output of one clip, one row per placeholder token, at most what a
    /// 30 s window gives.
    fn embeddings_layout(
        &self,
        modality: Modality,
        rows: usize,
        _grid_thw: Option<[usize; 3]>,
    ) -> Result<ItemLayout, MediaError> {
        if modality != Modality::Audio {
            return Err(MediaError::Invalid(format!(
                "this model does not accept {} embeddings",
                modality.name()
            )));
        }
        let most = self.num_tokens(2 * self.max_source_positions);
        if rows == 0 || rows > most {
            return Err(MediaError::Invalid(format!(
                "audio_embeds has {rows} rows; this model's audio takes 1 to {most} tokens per clip"
            )));
        }
        Ok(ItemLayout::rows(rows))
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
