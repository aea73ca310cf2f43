//! Audio helpers exposed to JS that need no model: `splitAudio`'s cut points.

use candela_media::audio::{split_audio, SplitOptions};
use napi::bindgen_prelude::Float32Array;
use napi::Result;
use napi_derive::napi;

use crate::guard::{guard, invalid};

/// `splitAudio` options as JS passes them (all optional; numbers arrive as f64
/// so a bad value gets a message naming it).
#[napi(object)]
#[derive(Default, Clone)]
pub struct NativeSplitOptions {
    pub max_clip_duration_s: Option<f64>,
    pub overlap_duration_s: Option<f64>,
    pub min_energy_window_size: Option<f64>,
}

fn sample_rate_hz(v: f64) -> Result<u32> {
    if !v.is_finite() || v.fract() != 0.0 || v < 1.0 || v > u32::MAX as f64 {
        return Err(invalid(format!(
            "sampleRate must be a positive whole number of Hz, got {v}"
        )));
    }
    Ok(v as u32)
}

fn window_size(v: f64) -> Result<usize> {
    if !v.is_finite() || v.fract() != 0.0 || v < 1.0 {
        return Err(invalid(format!(
            "minEnergyWindowSize must be a whole number of samples, at least 1, got {v}"
        )));
    }
    Ok(v as usize)
}

/// Where `splitAudio` cuts: the end index of every chunk, in order (the last
/// is `samples.length`; none for empty input).
#[napi]
pub fn split_audio_bounds(
    samples: Float32Array,
    sample_rate: f64,
    options: Option<NativeSplitOptions>,
) -> Result<Vec<f64>> {
    guard("splitAudio", || {
        let sr = sample_rate_hz(sample_rate)?;
        let o = options.unwrap_or_default();
        let d = SplitOptions::default();
        let opts = SplitOptions {
            max_clip_duration_s: o.max_clip_duration_s.unwrap_or(d.max_clip_duration_s),
            overlap_duration_s: o.overlap_duration_s.unwrap_or(d.overlap_duration_s),
            min_energy_window_size: match o.min_energy_window_size {
                Some(v) => window_size(v)?,
                None => d.min_energy_window_size,
            },
        };
        let ranges = split_audio(&samples, sr, opts).map_err(|e| invalid(e.to_string()))?;
        Ok(ranges.into_iter().map(|r| r.end as f64).collect())
    })
}
