//! Multimodal processors: what a model needs done to a media item before the
//! engine sees it (features, and how many placeholder tokens it fills), and
//! the expansion of each item's single placeholder token in a tokenized
//! prompt into that many tokens.
//!
//! Decoding (bytes -> samples / pixels) lives in candela-media; this layer
//! owns the per-model parts: feature sizes, token counts, placeholder ids.

use std::sync::Arc;

use candela_core::request::{MmFeatures, MropePositions};
use candela_media::audio::{Padding, WhisperFeatureExtractor};
use candela_media::image::{DecodedImage, ImageOverrides, ProcessedVision, Qwen2VlProcessorConfig};
use candela_media::video::{decode_video, ProcessedVideo, Qwen2VlVideoConfig, VideoDecodeOptions, VideoOverrides};
use candela_media::{MediaError, Modality};
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

/// Per-request image / video options (vLLM's `mm_processor_kwargs`, and
/// qwen-vl-utils' per-item keys). They change the item's tensors, so the
/// ones that apply to a modality are part of its `mm_hash`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VisionKwargs {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Video: pixel budget over all frames.
    pub total_pixels: Option<u64>,
    /// Video: frames per second to sample (for a list of frames: their rate).
    pub fps: Option<f64>,
    /// Video: most frames to keep.
    pub max_frames: Option<usize>,
}

impl VisionKwargs {
    /// Parse a JSON object; unknown keys and bad values are errors.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, MediaError> {
        let bad = |m: String| MediaError::Invalid(m);
        let Some(obj) = v.as_object() else {
            return Err(bad(format!("processor kwargs must be an object, got {v}")));
        };
        let mut k = Self::default();
        for (name, val) in obj {
            if val.is_null() {
                continue;
            }
            let pos_int = || {
                val.as_u64()
                    .filter(|&x| x > 0)
                    .ok_or_else(|| bad(format!("{name} must be a positive integer, got {val}")))
            };
            match name.as_str() {
                "min_pixels" => k.min_pixels = Some(pos_int()?),
                "max_pixels" => k.max_pixels = Some(pos_int()?),
                "total_pixels" => k.total_pixels = Some(pos_int()?),
                "max_frames" => k.max_frames = Some(pos_int()? as usize),
                "fps" => {
                    let f = val.as_f64().filter(|f| f.is_finite() && *f > 0.0);
                    k.fps = Some(f.ok_or_else(|| bad(format!("fps must be a positive number, got {val}")))?);
                }
                other => {
                    return Err(bad(format!(
                        "unknown processor kwarg {other:?} (min_pixels, max_pixels, total_pixels, fps, max_frames)"
                    )))
                }
            }
        }
        Ok(k)
    }

    /// The kwargs that shape `modality`'s tensors, as a stable string for
    /// `mm_hash` (`{}` when none).
    pub fn canonical(&self, modality: Modality) -> String {
        let mut parts: Vec<String> = Vec::new();
        let video = modality == Modality::Video;
        if video {
            if let Some(f) = self.fps {
                parts.push(format!("\"fps\":{f}"));
            }
            if let Some(m) = self.max_frames {
                parts.push(format!("\"max_frames\":{m}"));
            }
        }
        if let Some(m) = self.max_pixels {
            parts.push(format!("\"max_pixels\":{m}"));
        }
        if let Some(m) = self.min_pixels {
            parts.push(format!("\"min_pixels\":{m}"));
        }
        if video {
            if let Some(t) = self.total_pixels {
                parts.push(format!("\"total_pixels\":{t}"));
            }
        }
        format!("{{{}}}", parts.join(","))
    }

    fn image(&self) -> ImageOverrides {
        ImageOverrides { min_pixels: self.min_pixels, max_pixels: self.max_pixels }
    }

    fn video(&self) -> VideoOverrides {
        VideoOverrides {
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            total_pixels: self.total_pixels,
            fps: self.fps,
            max_frames: self.max_frames,
        }
    }
}

/// Image and video preprocessing of a Qwen2-VL-style model, plus the
/// prompt's M-RoPE positions (which depend on each item's grid).
#[derive(Debug, Clone)]
pub struct VisionProcessor {
    pub image: Qwen2VlProcessorConfig,
    pub video: Qwen2VlVideoConfig,
    /// `<|image_pad|>`: written once per image by the chat template.
    pub image_token: u32,
    /// `<|video_pad|>`.
    pub video_token: u32,
    /// Qwen2.5-VL: M-RoPE time positions per second of video. None
    /// (Qwen2-VL): one per temporal patch.
    pub tokens_per_second: Option<f64>,
}

impl VisionProcessor {
    pub fn merge_size(&self) -> usize {
        self.image.merge_size
    }

    /// One decoded image -> `pixel_values` + `image_grid_thw`.
    pub fn process_image(&self, img: &DecodedImage, kw: &VisionKwargs) -> std::result::Result<ProcessedItem, MediaError> {
        let v = self.image.process_image(img, &kw.image())?;
        self.item(v, crate::qwen2_vl::IMAGE_GRID_THW, None)
    }

    /// A video given as its frames. Their rate is `kw.fps` (else the
    /// processor's default, 2, as qwen-vl-utils assumes); all are kept
    /// unless there are more than `max_frames`.
    pub fn process_frames(&self, frames: &[DecodedImage], kw: &VisionKwargs) -> std::result::Result<ProcessedItem, MediaError> {
        let fps = kw.fps.unwrap_or(self.video.fps);
        let ov = VideoOverrides { fps: Some(fps), ..kw.video() };
        let max_frames = kw.max_frames.unwrap_or(self.video.max_frames);
        let v = if frames.len() <= max_frames {
            let all: Vec<&DecodedImage> = frames.iter().collect();
            self.video.process_sampled(&all, (0..frames.len()).collect(), frames.len(), Some(fps), &ov)?
        } else {
            self.video.process_video(frames, Some(fps), &ov)?
        };
        self.video_item(v)
    }

    /// A video file (MP4 / WebM): frames sampled at `kw.fps` (default 2) from
    /// the container's timing, decoded, processed.
    pub fn process_video_file(
        &self,
        bytes: &[u8],
        opts: &VideoDecodeOptions,
        kw: &VisionKwargs,
    ) -> std::result::Result<ProcessedItem, MediaError> {
        let ov = kw.video();
        let d = decode_video(bytes, opts, |total, fps| self.video.sample_indices(total, fps, &ov))?;
        if d.frames.is_empty() {
            return Err(MediaError::Corrupt("no frame of the video could be decoded".into()));
        }
        let frames: Vec<&DecodedImage> = d.frames.iter().collect();
        let v = self.video.process_sampled(&frames, d.frame_indices.clone(), d.total_frames, d.source_fps, &ov)?;
        self.video_item(v)
    }

    fn video_item(&self, v: ProcessedVideo) -> std::result::Result<ProcessedItem, MediaError> {
        self.item(v.vision, crate::qwen2_vl::VIDEO_GRID_THW, Some(v.second_per_grid_t))
    }

    fn item(
        &self,
        v: ProcessedVision,
        grid_name: &str,
        second_per_grid_t: Option<f64>,
    ) -> std::result::Result<ProcessedItem, MediaError> {
        let num_tokens = self.image.num_placeholder_tokens(v.grid_thw);
        let dev = Device::Cpu;
        let grid: Vec<u32> = v.grid_thw.iter().map(|&x| x as u32).collect();
        let t = |r: candle_core::Result<Tensor>| r.map_err(|e| MediaError::Invalid(format!("processed pixels: {e}")));
        let mut tensors = vec![
            (crate::qwen2_vl::PIXEL_VALUES.to_string(), t(Tensor::from_vec(v.pixel_values, (v.rows, v.cols), &dev))?),
            (grid_name.to_string(), t(Tensor::from_vec(grid, 3, &dev))?),
        ];
        if let Some(s) = second_per_grid_t {
            tensors.push((crate::qwen2_vl::SECOND_PER_GRID_T.into(), t(Tensor::from_vec(vec![s as f32], 1, &dev))?));
        }
        Ok(ProcessedItem { features: Arc::new(MmFeatures { tensors }), num_tokens })
    }

    /// Where an item with these features sits for M-RoPE (its placeholders
    /// start at `offset`).
    pub fn span_of(&self, offset: usize, features: &MmFeatures) -> Result<crate::qwen2_vl::MediaSpan> {
        let grid_thw = crate::qwen2_vl::grid_of(features)?;
        let video = features.get(crate::qwen2_vl::VIDEO_GRID_THW).is_some();
        let time_interval = match (video, self.tokens_per_second) {
            (true, Some(tps)) => {
                let spg = match features.get(crate::qwen2_vl::SECOND_PER_GRID_T) {
                    Some(t) => t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?.first().copied().unwrap_or(1.0),
                    None => 1.0,
                };
                // f32, as torch multiplies tokens_per_second by the tensor.
                ((tps as f32) * spg) as f64
            }
            _ => 1.0,
        };
        Ok(crate::qwen2_vl::MediaSpan { offset, grid_thw, time_interval })
    }

    /// The 3-D positions of a `num_tokens` prompt with these media spans
    /// (sorted by offset).
    pub fn mrope_positions(&self, num_tokens: usize, spans: &[crate::qwen2_vl::MediaSpan]) -> Result<MropePositions> {
        crate::qwen2_vl::mrope_positions(num_tokens, spans, self.merge_size())
    }
}

/// What a loaded model accepts besides text.
#[derive(Debug, Default)]
pub struct MmProcessor {
    pub audio: Option<AudioProcessor>,
    /// Images and videos (Qwen2-VL family).
    pub vision: Option<VisionProcessor>,
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
    fn vision_kwargs_parse_and_hash_per_modality() {
        let k = VisionKwargs::from_json(&serde_json::json!({"max_pixels": 1000, "fps": 1.5, "min_pixels": null})).unwrap();
        assert_eq!((k.max_pixels, k.fps, k.min_pixels), (Some(1000), Some(1.5), None));
        assert_eq!(k.canonical(Modality::Image), r#"{"max_pixels":1000}"#);
        assert_eq!(k.canonical(Modality::Video), r#"{"fps":1.5,"max_pixels":1000}"#);
        assert_eq!(VisionKwargs::default().canonical(Modality::Image), "{}");
        for bad in [serde_json::json!({"max_pixels": -1}), serde_json::json!({"fps": 0}), serde_json::json!({"size": 3}), serde_json::json!(3)] {
            assert!(matches!(VisionKwargs::from_json(&bad), Err(MediaError::Invalid(_))), "{bad}");
        }
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
