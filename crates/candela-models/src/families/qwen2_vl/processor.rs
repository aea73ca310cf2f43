//! Qwen2-VL / Qwen2.5-VL image and video processing (transformers'
//! `Qwen2VLImageProcessor` / video processor and qwen-vl-utils' per-item
//! keys): smart resize to the patch grid, patches flattened per merge
//! window, one `<|image_pad|>` / `<|video_pad|>` per merged patch, and the
//! prompt's M-RoPE positions from each item's grid.

use std::sync::Arc;

use candela_core::request::{MmFeatures, MropePositions};
use candela_media::image::{
    decode_image, decode_image_resized, DecodedImage, ImageOverrides, ProcessedVision,
    Qwen2VlProcessorConfig,
};
use candela_media::video::{
    decode_video, ProcessedVideo, Qwen2VlVideoConfig, VideoDecodeOptions, VideoOverrides,
};
use candela_media::{MediaError, Modality};
use candle_core::{Device, Tensor};

use super::positions::{mrope_positions, MediaSpan};
use crate::processor::{
    DecodeOptions, FrameLoss, ItemLayout, MediaData, MmProcessor, PlacedItem, ProcessedItem,
    PromptItems,
};

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
    /// Parse a JSON object (null: none given); unknown keys and bad values are errors.
    pub fn parse(v: &serde_json::Value) -> Result<Self, MediaError> {
        let bad = |m: String| MediaError::Invalid(m);
        if v.is_null() {
            return Ok(Self::default());
        }
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
        ImageOverrides {
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
        }
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

    /// A video given as its frames. Their rate is `kw.fps` (else the
    /// processor's default, 2, as qwen-vl-utils assumes); all are kept
    /// unless there are more than `max_frames`.
    pub fn process_frames(
        &self,
        frames: &[DecodedImage],
        kw: &VisionKwargs,
    ) -> Result<ProcessedItem, MediaError> {
        let fps = kw.fps.unwrap_or(self.video.fps);
        let ov = VideoOverrides {
            fps: Some(fps),
            ..kw.video()
        };
        let max_frames = kw.max_frames.unwrap_or(self.video.max_frames);
        let v = if frames.len() <= max_frames {
            let all: Vec<&DecodedImage> = frames.iter().collect();
            self.video.process_sampled(
                &all,
                (0..frames.len()).collect(),
                frames.len(),
                Some(fps),
                &ov,
            )?
        } else {
            self.video.process_video(frames, Some(fps), &ov)?
        };
        self.video_item(v, FrameLoss::default())
    }

    /// A video file (MP4 / WebM): frames sampled at `kw.fps` (default 2) from
    /// the container's timing, decoded, processed.
    pub fn process_video_file(
        &self,
        bytes: &[u8],
        opts: &VideoDecodeOptions,
        kw: &VisionKwargs,
    ) -> Result<ProcessedItem, MediaError> {
        let ov = kw.video();
        let d = decode_video(bytes, opts, |total, fps| {
            self.video.sample_indices(total, fps, &ov)
        })?;
        if d.frames.is_empty() {
            return Err(MediaError::Corrupt(
                "no frame of the video could be decoded".into(),
            ));
        }
        let frames: Vec<&DecodedImage> = d.frames.iter().collect();
        let v = self.video.process_sampled(
            &frames,
            d.frame_indices.clone(),
            d.total_frames,
            d.source_fps,
            &ov,
        )?;
        let lost = FrameLoss {
            recovered: d.recovered,
            dropped: d.dropped,
        };
        self.video_item(v, lost)
    }

    fn video_item(&self, v: ProcessedVideo, lost: FrameLoss) -> Result<ProcessedItem, MediaError> {
        self.item(
            v.vision,
            super::VIDEO_GRID_THW,
            Some(v.second_per_grid_t),
            lost,
        )
    }

    fn item(
        &self,
        v: ProcessedVision,
        grid_name: &str,
        second_per_grid_t: Option<f64>,
        frames: FrameLoss,
    ) -> Result<ProcessedItem, MediaError> {
        let embeds = self.image.num_placeholder_tokens(v.grid_thw);
        let dev = Device::Cpu;
        let grid: Vec<u32> = v.grid_thw.iter().map(|&x| x as u32).collect();
        let t = |r: candle_core::Result<Tensor>| {
            r.map_err(|e| MediaError::Invalid(format!("processed pixels: {e}")))
        };
        let mut tensors = vec![
            (
                super::PIXEL_VALUES.to_string(),
                t(Tensor::from_vec(v.pixel_values, (v.rows, v.cols), &dev))?,
            ),
            (grid_name.to_string(), t(Tensor::from_vec(grid, 3, &dev))?),
        ];
        if let Some(s) = second_per_grid_t {
            tensors.push((
                super::SECOND_PER_GRID_T.into(),
                t(Tensor::from_vec(vec![s as f32], 1, &dev))?,
            ));
        }
        let time_interval = match (second_per_grid_t, self.tokens_per_second) {
            // f32, as torch multiplies tokens_per_second by the tensor.
            (Some(spg), Some(tps)) => ((tps as f32) * (spg as f32)) as f64,
            _ => 1.0,
        };
        let layout = ItemLayout {
            embeds,
            grid_thw: Some(v.grid_thw),
            time_interval,
            frames,
        };
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures { tensors }),
            layout,
        })
    }

    fn span(&self, item: &PlacedItem) -> Result<MediaSpan, MediaError> {
        let grid_thw = item.layout.grid_thw.ok_or_else(|| {
            MediaError::Invalid(format!(
                "a {} item needs its (t, h, w) grid",
                item.modality.name()
            ))
        })?;
        let span = MediaSpan {
            offset: item.offset,
            grid_thw,
            time_interval: item.layout.time_interval,
        };
        let n = span.len(self.merge_size());
        if n != item.layout.embeds {
            return Err(MediaError::Invalid(format!(
                "a {} item has {} embedding rows but its grid {grid_thw:?} gives {n}",
                item.modality.name(),
                item.layout.embeds
            )));
        }
        Ok(span)
    }
}

impl MmProcessor for VisionProcessor {
    fn modalities(&self) -> &[Modality] {
        &[Modality::Image, Modality::Video]
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        match modality {
            Modality::Image => Some(self.image_token),
            Modality::Video => Some(self.video_token),
            Modality::Audio => None,
        }
    }

    fn kwargs_key(
        &self,
        modality: Modality,
        kwargs: &serde_json::Value,
    ) -> Result<String, MediaError> {
        Ok(VisionKwargs::parse(kwargs)?.canonical(modality))
    }

    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        kwargs: &serde_json::Value,
        opts: &DecodeOptions,
        _prompt: &PromptItems,
    ) -> Result<ProcessedItem, MediaError> {
        let kw = VisionKwargs::parse(kwargs)?;
        match (modality, data) {
            (Modality::Image, MediaData::Encoded { bytes, .. }) => {
                // Decoded straight to the size the processor resizes to.
                let ov = kw.image();
                let target = |w: u32, h: u32| {
                    let (rh, rw) = self.image.resized_size(h as usize, w as usize, &ov)?;
                    Ok((rw as u32, rh as u32))
                };
                let img = decode_image_resized(bytes, &opts.image, &target)?;
                let v = self.image.process_resized(&img)?;
                self.item(v, super::IMAGE_GRID_THW, None, FrameLoss::default())
            }
            (Modality::Video, MediaData::Frames(frames)) => {
                let frames = frames
                    .iter()
                    .map(|f| decode_image(f, &opts.image))
                    .collect::<Result<Vec<_>, _>>()?;
                self.process_frames(&frames, &kw)
            }
            (Modality::Video, MediaData::Encoded { bytes, .. }) => {
                self.process_video_file(bytes, &opts.video, &kw)
            }
            (m, _) => Err(MediaError::Invalid(format!(
                "a {} item needs its encoded data",
                m.name()
            ))),
        }
    }

    fn positions(
        &self,
        num_tokens: usize,
        items: &[PlacedItem],
    ) -> Result<Option<MropePositions>, MediaError> {
        let spans = items
            .iter()
            .map(|i| self.span(i))
            .collect::<Result<Vec<_>, _>>()?;
        mrope_positions(num_tokens, &spans, self.merge_size())
            .map(Some)
            .map_err(|e| MediaError::Invalid(e.to_string()))
    }

    fn embeddings_layout(
        &self,
        modality: Modality,
        rows: usize,
        grid_thw: Option<[usize; 3]>,
    ) -> Result<ItemLayout, MediaError> {
        if modality != Modality::Image {
            return Err(MediaError::Invalid(format!(
                "this model does not accept {} embeddings",
                modality.name()
            )));
        }
        let grid = grid_thw.ok_or_else(|| {
            MediaError::Invalid(
                "image_embeds needs image_grid_thw [t, h, w] (beside it in the part, or as a tensor in the safetensors blob)"
                    .into(),
            )
        })?;
        let merge = self.merge_size();
        let [t, h, w] = grid;
        if merge == 0 || h % merge != 0 || w % merge != 0 {
            return Err(MediaError::Invalid(format!(
                "image_grid_thw {grid:?}: h and w must be multiples of the spatial merge size {merge}"
            )));
        }
        let expected = t * (h / merge) * (w / merge);
        if rows != expected {
            return Err(MediaError::Invalid(format!(
                "image_embeds has {rows} feature tokens but image_grid_thw {grid:?} gives {expected} (t*h*w/{})",
                merge * merge
            )));
        }
        Ok(ItemLayout {
            embeds: rows,
            grid_thw: Some(grid),
            time_interval: 1.0,
            frames: FrameLoss::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vision_kwargs_parse_and_hash_per_modality() {
        let k = VisionKwargs::parse(
            &serde_json::json!({"max_pixels": 1000, "fps": 1.5, "min_pixels": null}),
        )
        .unwrap();
        assert_eq!(
            (k.max_pixels, k.fps, k.min_pixels),
            (Some(1000), Some(1.5), None)
        );
        assert_eq!(k.canonical(Modality::Image), r#"{"max_pixels":1000}"#);
        assert_eq!(
            k.canonical(Modality::Video),
            r#"{"fps":1.5,"max_pixels":1000}"#
        );
        assert_eq!(VisionKwargs::default().canonical(Modality::Image), "{}");
        for bad in [
            serde_json::json!({"max_pixels": -1}),
            serde_json::json!({"fps": 0}),
            serde_json::json!({"size": 3}),
            serde_json::json!(3),
        ] {
            assert!(
                matches!(VisionKwargs::parse(&bad), Err(MediaError::Invalid(_))),
                "{bad}"
            );
        }
    }

    fn processor() -> VisionProcessor {
        let image = Qwen2VlProcessorConfig::from_preprocessor_config("{}").unwrap();
        let video = Qwen2VlVideoConfig::from_preprocessor_config("{}").unwrap();
        VisionProcessor {
            image,
            video,
            image_token: 7,
            video_token: 8,
            tokens_per_second: None,
        }
    }

    #[test]
    fn embeddings_are_checked_against_their_grid() {
        let p = processor();
        assert_eq!(p.merge_size(), 2);
        let l = p
            .embeddings_layout(Modality::Image, 4, Some([1, 4, 4]))
            .unwrap();
        assert_eq!((l.embeds, l.grid_thw), (4, Some([1, 4, 4])));
        let e = p
            .embeddings_layout(Modality::Image, 5, Some([1, 4, 4]))
            .unwrap_err();
        assert!(
            e.message().contains("5 feature tokens") && e.message().contains("gives 4"),
            "{}",
            e.message()
        );
        assert!(p
            .embeddings_layout(Modality::Image, 4, None)
            .unwrap_err()
            .message()
            .contains("image_grid_thw"));
        assert!(p
            .embeddings_layout(Modality::Image, 4, Some([1, 3, 4]))
            .is_err());
        assert!(p
            .embeddings_layout(Modality::Video, 4, Some([1, 4, 4]))
            .is_err());
    }

    #[test]
    fn positions_follow_grids_and_reject_mismatched_rows() {
        let p = processor();
        let item = |offset, embeds| PlacedItem {
            modality: Modality::Image,
            offset,
            layout: ItemLayout {
                embeds,
                grid_thw: Some([1, 4, 4]),
                time_interval: 1.0,
                frames: FrameLoss::default(),
            },
        };
        let m = p.positions(7, &[item(1, 4)]).unwrap().unwrap();
        assert_eq!(m.prompt[1..5], [[1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]);
        assert_eq!(m.prompt[5], [3, 3, 3]);
        assert!(p
            .positions(7, &[item(1, 3)])
            .unwrap_err()
            .message()
            .contains("3 embedding rows"));
        let r = p
            .replacement(Modality::Video, &ItemLayout::rows(3))
            .unwrap();
        assert_eq!(
            (&r.tokens[..], r.embeds.len(), &r.embeds[0]),
            (&[8, 8, 8][..], 1, &(0..3))
        );
    }
}
