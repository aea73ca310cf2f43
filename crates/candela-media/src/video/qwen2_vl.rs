//! The Qwen2-VL / Qwen2.5-VL video processor, matching Hugging Face's
//! `Qwen2VLVideoProcessor` (torch backend): frames sampled at `fps`,
//! `smart_resize` with the video pixel bounds (optionally capped by a per-video
//! `total_pixels` budget, as qwen-vl-utils and HF's `cap_pixels_per_frame` do),
//! torch's uint8 antialiased bicubic resize, fused rescale + normalise in f32,
//! frames padded to a multiple of `temporal_patch_size` by repeating the last
//! one, then the same patch layout as images with `grid_t = frames / 2`.

use super::sample::{sample_frame_indices, FrameSampling};
use crate::image::{
    patchify, resize_rgb8, smart_resize, DecodedImage, ImageOverrides, ProcessedVision,
    Qwen2VlProcessorConfig, RawConfig, ResampleKernel,
};
use crate::MediaError;

/// Video preprocessing constants of one checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlVideoConfig {
    /// Patch geometry, mean / std and the per-frame pixel bounds
    /// (`size.shortest_edge` / `size.longest_edge`).
    pub base: Qwen2VlProcessorConfig,
    /// Frames per second to sample when the request gives none (2, as vLLM and
    /// qwen-vl-utils default to).
    pub fps: f64,
    pub min_frames: usize,
    pub max_frames: usize,
}

/// Per-request video options (vLLM's `mm_processor_kwargs` for video).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VideoOverrides {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Pixel budget for the whole video: each frame may use at most
    /// `total_pixels * temporal_patch_size / frames` (never below
    /// `1.05 * min_pixels`).
    pub total_pixels: Option<u64>,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
}

/// A processed video: patches plus what the model and prompt need to place it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedVideo {
    pub vision: ProcessedVision,
    /// Indices of the source frames used, in order (before padding).
    pub frame_indices: Vec<usize>,
    /// Frames per second of the sampled sequence (HF's `sampled_fps`).
    pub sampled_fps: f64,
    /// Seconds one temporal patch spans (Qwen2.5-VL's `second_per_grid_ts`).
    pub second_per_grid_t: f64,
}

impl Default for Qwen2VlVideoConfig {
    /// The class defaults of `Qwen2VLVideoProcessor`.
    fn default() -> Self {
        Self::from_raw(RawConfig::default()).expect("class defaults are valid")
    }
}

impl Qwen2VlVideoConfig {
    /// Parse `video_preprocessor_config.json` (or, for checkpoints without one,
    /// `preprocessor_config.json`, which is what transformers falls back to).
    pub fn from_preprocessor_config(json: &str) -> Result<Self, MediaError> {
        Self::from_raw(RawConfig::parse(json)?)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, MediaError> {
        let fps = raw.fps.unwrap_or(2.0);
        let min_frames = raw.min_frames.unwrap_or(4);
        let max_frames = raw.max_frames.unwrap_or(768);
        let base = raw.into_config(128 * 28 * 28, 28 * 28 * 768)?;
        if !(fps.is_finite() && fps > 0.0) || max_frames == 0 {
            return Err(MediaError::Invalid(
                "preprocessor_config.json: fps must be positive and max_frames at least 1".into(),
            ));
        }
        Ok(Qwen2VlVideoConfig {
            base,
            fps,
            min_frames,
            max_frames,
        })
    }

    fn sampling(&self, ov: &VideoOverrides) -> FrameSampling {
        FrameSampling {
            fps: ov.fps.unwrap_or(self.fps),
            min_frames: self.min_frames,
            max_frames: ov.max_frames.unwrap_or(self.max_frames),
            temporal_patch_size: self.base.temporal_patch_size,
        }
    }

    /// Which of `total` frames (at `source_fps`, if known) to keep.
    pub fn sample_indices(
        &self,
        total: usize,
        source_fps: Option<f64>,
        ov: &VideoOverrides,
    ) -> Result<Vec<usize>, MediaError> {
        sample_frame_indices(total, source_fps, &self.sampling(ov))
    }

    /// The per-frame (height, width) for `n_frames` frames of this size.
    pub fn resized_size(
        &self,
        height: usize,
        width: usize,
        n_frames: usize,
        ov: &VideoOverrides,
    ) -> Result<(usize, usize), MediaError> {
        let (min, mut max) = self.base.bounds(&ImageOverrides {
            min_pixels: ov.min_pixels,
            max_pixels: ov.max_pixels,
        })?;
        if let Some(total) = ov.total_pixels {
            // HF: max(min(max_pixels, total * temporal_factor // frames),
            //         int(min_pixels * 1.05)).
            let share =
                total.saturating_mul(self.base.temporal_patch_size as u64) / n_frames.max(1) as u64;
            max = max.min(share).max((min as f64 * 1.05) as u64);
        }
        if !self.base.do_resize {
            return Ok((height, width));
        }
        smart_resize(height, width, self.base.factor(), min, max)
    }

    /// Sample `frames` (a decoded frame list at `source_fps`, if known) and
    /// process the kept ones.
    pub fn process_video(
        &self,
        frames: &[DecodedImage],
        source_fps: Option<f64>,
        ov: &VideoOverrides,
    ) -> Result<ProcessedVideo, MediaError> {
        let indices = self.sample_indices(frames.len(), source_fps, ov)?;
        let kept: Vec<&DecodedImage> = indices.iter().map(|&i| &frames[i]).collect();
        self.process_sampled(&kept, indices, frames.len(), source_fps, ov)
    }

    /// Process frames that were already sampled (e.g. by `decode_video`):
    /// `frame_indices` are their positions among `total_frames` source frames.
    pub fn process_sampled(
        &self,
        frames: &[&DecodedImage],
        frame_indices: Vec<usize>,
        total_frames: usize,
        source_fps: Option<f64>,
        ov: &VideoOverrides,
    ) -> Result<ProcessedVideo, MediaError> {
        let first = frames
            .first()
            .ok_or_else(|| MediaError::Empty("video has no frames".into()))?;
        let (w, h) = (first.width as usize, first.height as usize);
        if let Some(f) = frames
            .iter()
            .find(|f| (f.width, f.height) != (first.width, first.height))
        {
            return Err(MediaError::Invalid(format!(
                "all video frames must have one size: {}x{} and {}x{}",
                first.width, first.height, f.width, f.height
            )));
        }
        let (rh, rw) = self.resized_size(h, w, frames.len(), ov)?;
        let mut planes: Vec<Vec<f32>> = Vec::with_capacity(frames.len());
        for f in frames {
            let px = if (rh, rw) == (h, w) {
                f.rgb.clone()
            } else {
                resize_rgb8(&f.rgb, w, h, rw, rh, ResampleKernel::TorchUint8)
            };
            planes.push(self.base.normalize_torch(&px, rh, rw));
        }
        let tps = self.base.temporal_patch_size;
        let mut refs: Vec<&[f32]> = planes.iter().map(Vec::as_slice).collect();
        while !refs.len().is_multiple_of(tps) {
            let last = refs[refs.len() - 1];
            refs.push(last);
        }
        let vision = patchify(
            &refs,
            rh,
            rw,
            self.base.patch_size,
            self.base.merge_size,
            tps,
        )?;
        // HF's VideoMetadata.sampled_fps: kept / total * fps (24 when unknown).
        let sampled_fps = match source_fps {
            Some(fps) if total_frames > 0 => frame_indices.len() as f64 / total_frames as f64 * fps,
            _ => 24.0,
        };
        Ok(ProcessedVideo {
            vision,
            frame_indices,
            sampled_fps,
            second_per_grid_t: tps as f64 / sampled_fps,
        })
    }
}
