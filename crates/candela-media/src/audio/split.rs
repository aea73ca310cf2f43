//! Splitting long audio into clips a fixed-window model (Whisper: 30 s) can take,
//! cutting where it is quiet so no word is cut in half.
//!
//! From the start of the remaining audio, a clip may be at most `max_clip` long.
//! If the rest fits, it is the last clip. Otherwise the cut goes inside the last
//! `overlap` of the clip: among all windows of `min_energy_window_size` samples
//! in that region (every offset), the cut lands in the middle of the one with the
//! lowest RMS (the latest one on ties, so clips stay long). The clips are
//! contiguous and disjoint: put back together they are exactly the input.

use std::ops::Range;

use crate::MediaError;

/// Options of [`split_audio`]; `Default` is vLLM's (30 s clips, 1 s search
/// region, 1600-sample windows = 0.1 s at 16 kHz).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitOptions {
    pub max_clip_duration_s: f64,
    pub overlap_duration_s: f64,
    pub min_energy_window_size: usize,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            max_clip_duration_s: 30.0,
            overlap_duration_s: 1.0,
            min_energy_window_size: 1600,
        }
    }
}

/// Sample counts derived from the options at one sample rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    /// Longest clip, in samples.
    pub max_clip: usize,
    /// Length of the search region at the end of a full clip, in samples.
    pub overlap: usize,
    pub window: usize,
}

impl SplitOptions {
    /// Check the options and turn them into sample counts. Errors name the
    /// offending option (in the JS spelling too, since JS callers see them).
    pub fn plan(&self, sample_rate: u32) -> Result<SplitPlan, MediaError> {
        let bad = |m: String| Err(MediaError::Invalid(m));
        if sample_rate == 0 {
            return bad("sampleRate must be a positive number of Hz, got 0".into());
        }
        let (max_s, ov_s) = (self.max_clip_duration_s, self.overlap_duration_s);
        if !max_s.is_finite() || max_s <= 0.0 {
            return bad(format!("maxClipDurationS (max_clip_duration_s) must be a positive number of seconds, got {max_s}"));
        }
        if !ov_s.is_finite() || ov_s < 0.0 {
            return bad(format!(
                "overlapDurationS (overlap_duration_s) must be zero or more seconds, got {ov_s}"
            ));
        }
        if ov_s >= max_s {
            return bad(format!(
                "overlapDurationS (overlap_duration_s, {ov_s}) must be shorter than maxClipDurationS (max_clip_duration_s, {max_s})"
            ));
        }
        if self.min_energy_window_size == 0 {
            return bad(
                "minEnergyWindowSize (min_energy_window_size) must be at least 1 sample, got 0"
                    .into(),
            );
        }
        let max_f = (max_s * sample_rate as f64).floor();
        if max_f < 1.0 {
            return bad(format!(
                "maxClipDurationS (max_clip_duration_s) of {max_s} s is shorter than one sample at {sample_rate} Hz"
            ));
        }
        if max_f > usize::MAX as f64 / 2.0 {
            return bad(format!(
                "maxClipDurationS (max_clip_duration_s) of {max_s} s is too large"
            ));
        }
        let max_clip = max_f as usize;
        // Strictly shorter than a clip, so every cut moves forward.
        let overlap = ((ov_s * sample_rate as f64).floor() as usize).min(max_clip - 1);
        Ok(SplitPlan {
            max_clip,
            overlap,
            window: self.min_energy_window_size,
        })
    }
}

/// Split `samples` into clips; see the module docs. Returns sample ranges that
/// tile `0..samples.len()` in order (none for empty input).
pub fn split_audio(
    samples: &[f32],
    sample_rate: u32,
    opts: SplitOptions,
) -> Result<Vec<Range<usize>>, MediaError> {
    let plan = opts.plan(sample_rate)?;
    let n = samples.len();
    let mut out = Vec::with_capacity(n / plan.max_clip + 1);
    let mut start = 0usize;
    while start < n {
        if n - start <= plan.max_clip {
            out.push(start..n);
            break;
        }
        let end = start + plan.max_clip;
        let cut = quietest_cut(samples, end - plan.overlap, end, plan.window);
        out.push(start..cut);
        start = cut;
    }
    Ok(out)
}

/// Cut point in `lo..=hi`: the middle of the quietest window of the region, or
/// exactly `hi` when there is no search region. Callers keep `lo` after the clip
/// start, so every cut moves forward.
fn quietest_cut(samples: &[f32], lo: usize, hi: usize, window: usize) -> usize {
    if lo >= hi {
        return hi;
    }
    let region = &samples[lo..hi];
    // A region shorter than one window is one window.
    let w = window.min(region.len());
    // Prefix sums of squares make every window position O(1). Non-finite samples
    // are counted apart so they cannot poison the sums; such windows rank last.
    let mut energy = Vec::with_capacity(region.len() + 1);
    let mut bad = Vec::with_capacity(region.len() + 1);
    let (mut e, mut b) = (0f64, 0u32);
    energy.push(e);
    bad.push(b);
    for &v in region {
        if v.is_finite() {
            e += v as f64 * v as f64;
        } else {
            b += 1;
        }
        energy.push(e);
        bad.push(b);
    }
    let mut best = (true, f64::INFINITY, 0usize);
    for s in 0..=region.len() - w {
        let cand = (bad[s + w] > bad[s], energy[s + w] - energy[s], s);
        // `<=`: the latest of equally quiet windows, so clips stay long.
        if (cand.0, cand.1) <= (best.0, best.1) || s == 0 {
            best = cand;
        }
    }
    // The middle of the quiet window leaves some of the quiet on both sides.
    lo + best.2 + w / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_tiling(ranges: &[Range<usize>], n: usize, max_clip: usize) {
        let mut pos = 0;
        for r in ranges {
            assert_eq!(r.start, pos);
            assert!(r.end > r.start, "empty chunk {r:?}");
            assert!(r.len() <= max_clip, "chunk {r:?} longer than {max_clip}");
            pos = r.end;
        }
        assert_eq!(pos, n);
    }

    #[test]
    fn short_audio_is_one_clip() {
        let x = vec![0.5f32; 16000 * 10];
        assert_eq!(
            split_audio(&x, 16000, SplitOptions::default()).unwrap(),
            vec![0..x.len()]
        );
        assert_eq!(
            split_audio(&[], 16000, SplitOptions::default()).unwrap(),
            Vec::<Range<usize>>::new()
        );
        let exact = vec![0.5f32; 16000 * 30];
        assert_eq!(
            split_audio(&exact, 16000, SplitOptions::default()).unwrap(),
            vec![0..exact.len()]
        );
    }

    #[test]
    fn cuts_in_the_silence() {
        // 70 s of loud noise-like signal with 0.1 s of silence at 29.5 s and 58.8 s.
        let sr = 16000;
        let mut x: Vec<f32> = (0..sr * 70)
            .map(|i| ((i as f32 * 12.9898).sin() * 43758.547).fract() - 0.5)
            .collect();
        for s in [29.5f64, 58.8] {
            let a = (s * sr as f64) as usize;
            x[a..a + 1600].iter_mut().for_each(|v| *v = 0.0);
        }
        let r = split_audio(&x, sr as u32, SplitOptions::default()).unwrap();
        check_tiling(&r, x.len(), 30 * sr);
        assert_eq!(r.len(), 3);
        // Each cut is the middle of a silent stretch.
        assert_eq!(r[0].end, (29.5 * sr as f64) as usize + 800);
        assert_eq!(r[1].end, (58.8 * sr as f64) as usize + 800);
    }

    #[test]
    fn silence_everywhere_keeps_clips_long() {
        let x = vec![0f32; 16000 * 65];
        let r = split_audio(&x, 16000, SplitOptions::default()).unwrap();
        check_tiling(&r, x.len(), 30 * 16000);
        // Latest window on ties: the cut is half a window before the clip limit.
        assert_eq!(r[0].end, 30 * 16000 - 800);
    }

    #[test]
    fn bad_options_name_the_option() {
        let x = [0f32; 10];
        let err = |o: SplitOptions, sr: u32| split_audio(&x, sr, o).unwrap_err().to_string();
        let d = SplitOptions::default();
        assert!(err(
            SplitOptions {
                max_clip_duration_s: 0.0,
                ..d
            },
            16000
        )
        .contains("maxClipDurationS"));
        assert!(err(
            SplitOptions {
                max_clip_duration_s: f64::NAN,
                ..d
            },
            16000
        )
        .contains("maxClipDurationS"));
        assert!(err(
            SplitOptions {
                overlap_duration_s: -1.0,
                ..d
            },
            16000
        )
        .contains("overlapDurationS"));
        assert!(err(
            SplitOptions {
                overlap_duration_s: 30.0,
                ..d
            },
            16000
        )
        .contains("overlapDurationS"));
        assert!(err(
            SplitOptions {
                min_energy_window_size: 0,
                ..d
            },
            16000
        )
        .contains("minEnergyWindowSize"));
        assert!(err(d, 0).contains("sampleRate"));
        assert!(err(
            SplitOptions {
                max_clip_duration_s: 1e-6,
                overlap_duration_s: 0.0,
                ..d
            },
            16000
        )
        .contains("one sample"));
    }

    #[test]
    fn nan_samples_do_not_break_splitting() {
        let mut x = vec![0.1f32; 100];
        x[40..60].iter_mut().for_each(|v| *v = f32::NAN);
        let o = SplitOptions {
            max_clip_duration_s: 30.0,
            overlap_duration_s: 10.0,
            min_energy_window_size: 4,
        };
        let r = split_audio(&x, 1, o).unwrap();
        check_tiling(&r, x.len(), 30);
    }

    proptest! {
        #[test]
        fn chunks_tile_the_input_within_limits(
            len in 0usize..5000,
            sr in 1u32..200_000,
            max_s in 0.0001f64..2.0,
            ov_frac in 0.0f64..1.0,
            window in 1usize..3000,
            seed in any::<u32>(),
        ) {
            let opts = SplitOptions { max_clip_duration_s: max_s, overlap_duration_s: max_s * ov_frac * 0.999, min_energy_window_size: window };
            let x: Vec<f32> = (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5).collect();
            match (opts.plan(sr), split_audio(&x, sr, opts)) {
                (Ok(plan), Ok(ranges)) => {
                    check_tiling(&ranges, len, plan.max_clip);
                    let joined: Vec<f32> = ranges.iter().flat_map(|r| x[r.clone()].iter().copied()).collect();
                    prop_assert_eq!(joined, x);
                    // Every clip but the last is cut inside its search region.
                    for r in ranges.iter().take(ranges.len().saturating_sub(1)) {
                        prop_assert!(r.len() + plan.overlap >= plan.max_clip);
                    }
                }
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a, b);
                }
                (p, s) => prop_assert!(false, "plan {:?} vs split {:?}", p, s),
            }
        }
    }
}
