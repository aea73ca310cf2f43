//! Which frames of a video the model sees: Hugging Face's
//! `Qwen2VLVideoProcessor.sample_frames` (fps mode), with its float semantics.

use crate::MediaError;

/// Sampling parameters (the video processor's `fps`, `min_frames`,
/// `max_frames`, `temporal_patch_size`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameSampling {
    pub fps: f64,
    pub min_frames: usize,
    pub max_frames: usize,
    pub temporal_patch_size: usize,
}

/// Indices (into the decoded frame list) to keep.
///
/// With a known source fps: `total / source_fps * fps` frames, clamped to
/// `[min_frames, min(max_frames, total)]`, rounded down to a multiple of
/// `temporal_patch_size`, spread like `torch.arange(0, total, total / n).int()`.
/// Without one (a bare frame list), every frame is kept unless there are more
/// than `max_frames`, which are then spread the same way. A video shorter than
/// one temporal patch keeps all its frames (HF divides by zero there); the
/// processor pads the last patch by repeating the last frame.
pub fn sample_frame_indices(
    total: usize,
    source_fps: Option<f64>,
    s: &FrameSampling,
) -> Result<Vec<usize>, MediaError> {
    if total == 0 {
        return Err(MediaError::Empty("video has no frames".into()));
    }
    let tps = s.temporal_patch_size.max(1);
    if !(s.fps.is_finite() && s.fps > 0.0) {
        return Err(MediaError::Invalid(format!(
            "fps must be positive, got {}",
            s.fps
        )));
    }
    if s.max_frames == 0 {
        return Err(MediaError::Invalid("max_frames must be at least 1".into()));
    }
    let n: usize = match source_fps {
        Some(src) if src.is_finite() && src > 0.0 => {
            let cap = (s.max_frames.min(total) / tps * tps) as f64;
            let want = total as f64 / src * s.fps;
            let n = want.max(s.min_frames as f64).min(cap).min(total as f64);
            ((n / tps as f64).floor() * tps as f64) as usize
        }
        Some(src) => {
            return Err(MediaError::Invalid(format!(
                "source fps must be positive, got {src}"
            )))
        }
        None if total <= s.max_frames => return Ok((0..total).collect()),
        None => s.max_frames / tps * tps,
    };
    if n == 0 {
        return Ok((0..total.min(s.max_frames)).collect());
    }
    Ok(arange_int(total, n))
}

/// `torch.arange(0, total, total / n).int()`: float32 values computed from a
/// double start + i * step, truncated; length `ceil(total / step)`.
fn arange_int(total: usize, n: usize) -> Vec<usize> {
    let step = total as f64 / n as f64;
    let len = (total as f64 / step).ceil() as usize;
    (0..len)
        .map(|i| ((i as f64 * step) as f32) as usize)
        .filter(|&i| i < total)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(fps: f64, max_frames: usize) -> FrameSampling {
        FrameSampling {
            fps,
            min_frames: 4,
            max_frames,
            temporal_patch_size: 2,
        }
    }

    #[test]
    fn fps_sampling_like_hf() {
        // 30 frames at 10 fps = 3 s; 2 fps -> 6 frames, step 5.
        assert_eq!(
            sample_frame_indices(30, Some(10.0), &s(2.0, 768)).unwrap(),
            vec![0, 5, 10, 15, 20, 25]
        );
        // min_frames lifts a short clip to 4.
        assert_eq!(
            sample_frame_indices(10, Some(30.0), &s(2.0, 768)).unwrap(),
            vec![0, 2, 5, 7]
        );
        // max_frames caps, rounded down to the temporal patch.
        assert_eq!(
            sample_frame_indices(100, Some(1.0), &s(2.0, 5))
                .unwrap()
                .len(),
            4
        );
        // Shorter than one temporal patch: everything.
        assert_eq!(
            sample_frame_indices(1, Some(30.0), &s(2.0, 768)).unwrap(),
            vec![0]
        );
        // A bare frame list keeps all frames.
        assert_eq!(
            sample_frame_indices(7, None, &s(2.0, 768)).unwrap().len(),
            7
        );
        assert!(sample_frame_indices(0, None, &s(2.0, 768)).is_err());
        assert!(sample_frame_indices(5, Some(1.0), &s(0.0, 768)).is_err());
    }
}
