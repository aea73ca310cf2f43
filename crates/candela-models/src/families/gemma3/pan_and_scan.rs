//! Gemma 3's pan-and-scan (transformers' `Gemma3ImageProcessor.pan_and_scan`):
//! an image whose aspect ratio passes `min_ratio_to_activate` is also cut
//! into 2..=`max_num_crops` crops side by side along its long edge, each at
//! least `min_crop_size` pixels on both sides; the model then sees the whole
//! image and each crop, every one resized to the tower's square.
//!
//! The settings come from `preprocessor_config.json` (null: the processor's
//! defaults) and per request from `mm_processor_kwargs`, vLLM's keys.

use candela_media::MediaError;
use serde_json::Value;

/// Pan-and-scan settings; `enabled` false means the image alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PanAndScan {
    pub enabled: bool,
    pub min_crop_size: usize,
    pub max_num_crops: usize,
    pub min_ratio_to_activate: f64,
}

/// `Gemma3Processor`'s defaults (its `images_kwargs`).
impl Default for PanAndScan {
    fn default() -> Self {
        Self {
            enabled: false,
            min_crop_size: 256,
            max_num_crops: 4,
            min_ratio_to_activate: 1.2,
        }
    }
}

/// A crop: top-left corner and size, inside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// Most crops an image may be cut into: each is a tower input and
/// `mm_tokens_per_image` prompt tokens.
pub const MAX_NUM_CROPS: usize = 64;

const KEYS: &str = "do_pan_and_scan, pan_and_scan_min_crop_size, pan_and_scan_max_num_crops, \
                    pan_and_scan_min_ratio_to_activate";

impl PanAndScan {
    /// These settings with the pan-and-scan keys of `kwargs` (a JSON
    /// object, or null) applied; null values keep the setting. With
    /// `only_pan_and_scan`, any other key is an error (request kwargs);
    /// otherwise other keys are left to others (a preprocessor config).
    pub fn with(&self, kwargs: &Value, only_pan_and_scan: bool) -> Result<Self, MediaError> {
        let bad = |m: String| MediaError::Invalid(m);
        if kwargs.is_null() {
            return Ok(*self);
        }
        let Some(obj) = kwargs.as_object() else {
            return Err(bad(format!(
                "processor kwargs must be an object, got {kwargs}"
            )));
        };
        let mut s = *self;
        for (name, val) in obj {
            if val.is_null() {
                continue;
            }
            let pos_int = || {
                val.as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| x as usize)
                    .ok_or_else(|| bad(format!("{name} must be a positive integer, got {val}")))
            };
            match name.as_str() {
                "do_pan_and_scan" => {
                    s.enabled = val
                        .as_bool()
                        .ok_or_else(|| bad(format!("{name} must be true or false, got {val}")))?
                }
                "pan_and_scan_min_crop_size" => s.min_crop_size = pos_int()?,
                "pan_and_scan_max_num_crops" => {
                    s.max_num_crops = pos_int()?;
                    if s.max_num_crops > MAX_NUM_CROPS {
                        return Err(bad(format!(
                            "{name} must be at most {MAX_NUM_CROPS}, got {val}"
                        )));
                    }
                }
                "pan_and_scan_min_ratio_to_activate" => {
                    s.min_ratio_to_activate = val
                        .as_f64()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            bad(format!("{name} must be a positive number, got {val}"))
                        })?
                }
                other if only_pan_and_scan => {
                    return Err(bad(format!(
                        "unknown processor kwarg {other:?} for Gemma 3's images ({KEYS})"
                    )))
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// What shapes an image's tensors, as a stable string for `mm_hash`
    /// (`{}` without pan-and-scan, whatever its other settings).
    pub fn canonical(&self) -> String {
        if !self.enabled {
            return "{}".into();
        }
        format!(
            "{{\"pan_and_scan\":[{},{},{}]}}",
            self.min_crop_size, self.max_num_crops, self.min_ratio_to_activate
        )
    }

    /// The crops of a `width` x `height` image, row-major (none: the image
    /// alone). transformers' arithmetic: half-up rounding of the aspect
    /// ratio, crop sizes rounded up, so the last crop may be narrower; tiny
    /// crop sizes can leave it empty, which transformers fails on too.
    pub fn crops(&self, width: usize, height: usize) -> Result<Vec<Crop>, MediaError> {
        if !self.enabled || width == 0 || height == 0 {
            return Ok(Vec::new());
        }
        let (long, short) = (width.max(height), width.min(height));
        let ratio = long as f64 / short as f64;
        if ratio < self.min_ratio_to_activate {
            return Ok(Vec::new());
        }
        let n = ((ratio + 0.5).floor() as usize)
            .min(long / self.min_crop_size)
            .max(2)
            .min(self.max_num_crops);
        let (nw, nh) = if width >= height { (n, 1) } else { (1, n) };
        let (cw, ch) = (width.div_ceil(nw), height.div_ceil(nh));
        if cw.min(ch) < self.min_crop_size {
            return Ok(Vec::new());
        }
        if (nw - 1) * cw >= width || (nh - 1) * ch >= height {
            return Err(MediaError::Invalid(format!(
                "pan-and-scan into {n} crops of {cw}x{ch} leaves the last one of a \
                 {width}x{height} image empty; raise pan_and_scan_min_crop_size or lower \
                 pan_and_scan_max_num_crops"
            )));
        }
        Ok((0..nh)
            .flat_map(|i| (0..nw).map(move |j| (i * ch, j * cw)))
            .map(|(y, x)| Crop {
                x,
                y,
                width: cw.min(width - x),
                height: ch.min(height - y),
            })
            .collect())
    }
}

/// The `crop` of a `width`-pixel-wide RGB8 image, as its own RGB8 image.
pub fn crop_rgb8(rgb: &[u8], width: usize, crop: Crop) -> Vec<u8> {
    let mut out = Vec::with_capacity(crop.width * crop.height * 3);
    for y in crop.y..crop.y + crop.height {
        let row = (y * width + crop.x) * 3;
        out.extend_from_slice(&rgb[row..row + crop.width * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> PanAndScan {
        PanAndScan {
            enabled: true,
            ..Default::default()
        }
    }

    #[test]
    fn crops_follow_transformers_arithmetic() {
        // 800x300: ratio 2.67 rounds to 3, 800 / 256 allows 3; 267 px wide
        // (ceil), the last one 266.
        let c = on().crops(800, 300).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!((c[0].width, c[0].height, c[1].x), (267, 300, 267));
        assert_eq!((c[2].x, c[2].width), (534, 266));
        // Portrait: crops stacked, 2 at least even when the ratio rounds to 1.
        let tall = PanAndScan {
            min_crop_size: 32,
            ..on()
        };
        let c = tall.crops(64, 100).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[1].y, c[1].height, c[1].width), (50, 50, 64));
        // Below the ratio, or crops smaller than min_crop_size: none.
        assert!(on().crops(120, 90).unwrap().is_empty());
        assert!(on().crops(640, 200).unwrap().is_empty());
        assert!(PanAndScan::default().crops(800, 300).unwrap().is_empty());
        // Capped by max_num_crops.
        let capped = PanAndScan {
            max_num_crops: 2,
            ..on()
        };
        assert_eq!(capped.crops(2000, 300).unwrap().len(), 2);
        // 9x2 in 4 crops of 3 px: the fourth would start at 9.
        let tiny = PanAndScan {
            min_crop_size: 1,
            ..on()
        };
        assert!(tiny.crops(9, 2).is_err());
        let rgb: Vec<u8> = (0..4 * 2 * 3).map(|v| v as u8).collect();
        let crop = Crop {
            x: 1,
            y: 1,
            width: 2,
            height: 1,
        };
        assert_eq!(crop_rgb8(&rgb, 4, crop), vec![15, 16, 17, 18, 19, 20]);
    }

    #[test]
    fn kwargs_are_checked() {
        let d = PanAndScan::default();
        let s = d
            .with(
                &serde_json::json!({"do_pan_and_scan": true, "pan_and_scan_min_crop_size": 32,
                    "pan_and_scan_min_ratio_to_activate": 1.5, "pan_and_scan_max_num_crops": null}),
                true,
            )
            .unwrap();
        assert_eq!((s.enabled, s.min_crop_size, s.max_num_crops), (true, 32, 4));
        assert_eq!(s.canonical(), "{\"pan_and_scan\":[32,4,1.5]}");
        assert_eq!(d.canonical(), "{}");
        for bad in [
            serde_json::json!({"do_pan_and_scan": "yes"}),
            serde_json::json!({"pan_and_scan_min_crop_size": 0}),
            serde_json::json!({"pan_and_scan_max_num_crops": -1}),
            serde_json::json!({"pan_and_scan_max_num_crops": 2.5}),
            serde_json::json!({"pan_and_scan_max_num_crops": 65}),
            serde_json::json!({"pan_and_scan_min_ratio_to_activate": 0}),
            serde_json::json!({"max_pixels": 100}),
            serde_json::json!([1]),
        ] {
            assert!(d.with(&bad, true).is_err(), "{bad}");
        }
        // A preprocessor config's other keys are not ours to refuse.
        assert!(d.with(&serde_json::json!({"size": 896}), false).is_ok());
    }
}
