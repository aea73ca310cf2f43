//! Whisper's log-mel spectrogram, computed the way Hugging Face's
//! `WhisperFeatureExtractor` does (numbers match to ~1e-6):
//!
//! 1. pad (with `padding_value`) or truncate to `chunk_length` seconds, or keep
//!    the length as is (`Padding::Longest`);
//! 2. centred STFT: reflect-pad `n_fft / 2` on both sides, periodic Hann window,
//!    hop `hop_length`, power spectrum |X|^2;
//! 3. slaney-scale mel filter bank (0-8 kHz) with slaney area normalisation;
//! 4. log10 of max(mel, 1e-10); the last STFT frame is dropped;
//! 5. values below (global max - 8) are raised to it, then (x + 4) / 4.
//!
//! Everything is computed in f64 and stored as f32.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};
use serde::Deserialize;

use crate::MediaError;

/// How to size the input before the STFT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pad with `padding_value` / truncate to `chunk_length` seconds
    /// (HF's default `padding="max_length"`; what Whisper and Qwen2-Audio use).
    MaxLength,
    /// Keep the input's own length (HF's `padding="longest"` on one input).
    Longest,
}

/// Log-mel features of one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// `[n_mels, frames]`, row-major.
    pub data: Vec<f32>,
    pub n_mels: usize,
    pub frames: usize,
    /// Frames that carry audio rather than padding: HF's `attention_mask.sum()`,
    /// i.e. ceil(kept samples / hop), at most `frames`.
    pub attention_frames: usize,
}

impl Features {
    /// The value of mel bin `mel` at frame `frame`.
    pub fn at(&self, mel: usize, frame: usize) -> f32 {
        self.data[mel * self.frames + frame]
    }
}

/// The subset of `preprocessor_config.json` the extractor reads; missing fields
/// take HF's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct WhisperFeatureConfig {
    /// Number of mel bins (80 for Whisper up to large-v2, 128 for large-v3 and Qwen2-Audio).
    pub feature_size: usize,
    pub sampling_rate: u32,
    pub hop_length: usize,
    pub chunk_length: usize,
    pub n_fft: usize,
    pub padding_value: f64,
    /// HF adds Gaussian noise of this size; we never do (it is random, and 0 in
    /// every Whisper / Qwen2-Audio config), so it is read and ignored.
    pub dither: f64,
}

impl Default for WhisperFeatureConfig {
    fn default() -> Self {
        WhisperFeatureConfig {
            feature_size: 80,
            sampling_rate: 16000,
            hop_length: 160,
            chunk_length: 30,
            n_fft: 400,
            padding_value: 0.0,
            dither: 0.0,
        }
    }
}

/// Whisper log-mel feature extractor. Cheap to share: build once per model.
pub struct WhisperFeatureExtractor {
    config: WhisperFeatureConfig,
    /// Samples in one chunk: chunk_length * sampling_rate.
    n_samples: usize,
    window: Vec<f64>,
    /// `[n_mels, n_fft / 2 + 1]`, row-major.
    mel_filters: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for WhisperFeatureExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperFeatureExtractor")
            .field("config", &self.config)
            .finish()
    }
}

impl WhisperFeatureExtractor {
    /// Build from the text of a `preprocessor_config.json` (other keys are ignored).
    pub fn from_preprocessor_config(json: &str) -> Result<Self, MediaError> {
        let config: WhisperFeatureConfig = serde_json::from_str(json)
            .map_err(|e| MediaError::Invalid(format!("preprocessor_config.json: {e}")))?;
        Self::new(config)
    }

    pub fn new(config: WhisperFeatureConfig) -> Result<Self, MediaError> {
        let bad = |what: &str| {
            Err(MediaError::Invalid(format!(
                "preprocessor_config.json: {what}"
            )))
        };
        if config.feature_size == 0 {
            return bad("feature_size must be at least 1");
        }
        if config.sampling_rate == 0 {
            return bad("sampling_rate must be positive");
        }
        if config.n_fft < 2 {
            return bad("n_fft must be at least 2");
        }
        if config.hop_length == 0 {
            return bad("hop_length must be at least 1");
        }
        if config.chunk_length == 0 {
            return bad("chunk_length must be at least 1");
        }
        if !config.padding_value.is_finite() {
            return bad("padding_value must be finite");
        }
        let n_samples = config
            .chunk_length
            .checked_mul(config.sampling_rate as usize)
            .filter(|n| *n <= 1 << 31)
            .ok_or_else(|| {
                MediaError::Invalid("preprocessor_config.json: chunk_length is too long".into())
            })?;
        let n = config.n_fft;
        // Periodic Hann (torch.hann_window's default).
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        let mel_filters = mel_filter_bank(
            n / 2 + 1,
            config.feature_size,
            0.0,
            8000.0,
            config.sampling_rate,
        );
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n);
        Ok(WhisperFeatureExtractor {
            config,
            n_samples,
            window,
            mel_filters,
            fft,
        })
    }

    pub fn config(&self) -> &WhisperFeatureConfig {
        &self.config
    }

    pub fn n_mels(&self) -> usize {
        self.config.feature_size
    }

    pub fn sampling_rate(&self) -> u32 {
        self.config.sampling_rate
    }

    /// Samples in one padded chunk (480000 for 30 s at 16 kHz).
    pub fn n_samples(&self) -> usize {
        self.n_samples
    }

    /// Frames of a padded chunk (3000 for Whisper).
    pub fn max_frames(&self) -> usize {
        self.n_samples / self.config.hop_length
    }

    /// Log-mel features of mono `samples` at `sampling_rate()` Hz. With
    /// `Padding::Longest` an empty input gives zero frames.
    pub fn extract(&self, samples: &[f32], padding: Padding) -> Features {
        let hop = self.config.hop_length;
        let n_mels = self.config.feature_size;
        let kept = match padding {
            Padding::MaxLength => samples.len().min(self.n_samples),
            Padding::Longest => samples.len(),
        };
        let mut wave: Vec<f64> = samples[..kept].iter().map(|&v| v as f64).collect();
        if padding == Padding::MaxLength {
            wave.resize(self.n_samples, self.config.padding_value);
        }
        if wave.is_empty() {
            return Features {
                data: Vec::new(),
                n_mels,
                frames: 0,
                attention_frames: 0,
            };
        }
        let n_fft = self.config.n_fft;
        let half = n_fft / 2;
        // The centred STFT has 1 + (len + 2*half - n_fft) / hop frames; HF drops the last.
        let frames = (wave.len() + 2 * half - n_fft) / hop;
        let n_freq = n_fft / 2 + 1;

        let mut log_mel = vec![0f64; n_mels * frames];
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f64; n_freq];
        for f in 0..frames {
            let start = f * hop; // in padded coordinates: sample index start - half
            for (i, x) in input.iter_mut().enumerate() {
                let idx = (start + i) as i64 - half as i64;
                *x = wave[reflect(idx, wave.len())] * self.window[i];
            }
            // Lengths match by construction, so this cannot fail.
            if self
                .fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .is_err()
            {
                continue;
            }
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for m in 0..n_mels {
                let row = &self.mel_filters[m * n_freq..(m + 1) * n_freq];
                let e: f64 = row.iter().zip(&power).map(|(w, p)| w * p).sum();
                log_mel[m * frames + f] = e.max(1e-10).log10();
            }
        }
        // f64::max skips NaN, so a NaN sample cannot poison the floor of other bins.
        let floor = log_mel.iter().copied().fold(f64::NEG_INFINITY, f64::max) - 8.0;
        let data = log_mel
            .iter()
            .map(|&v| ((v.max(floor) + 4.0) / 4.0) as f32)
            .collect();
        let attention_frames = kept.div_ceil(hop).min(frames);
        Features {
            data,
            n_mels,
            frames,
            attention_frames,
        }
    }
}

/// numpy's "reflect" padding (edge not repeated), folded as often as needed so
/// inputs shorter than the pad work too.
fn reflect(idx: i64, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as i64 - 1);
    let m = idx.rem_euclid(period);
    (if m < len as i64 { m } else { period - m }) as usize
}

fn hz_to_mel_slaney(hz: f64) -> f64 {
    // Linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
    let logstep = 27.0 / 6.4f64.ln();
    if hz >= 1000.0 {
        15.0 + (hz / 1000.0).ln() * logstep
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hz_slaney(mel: f64) -> f64 {
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= 15.0 {
        1000.0 * ((mel - 15.0) * logstep).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// Triangular slaney-scale filters with slaney (area) normalisation, as
/// `[n_mels, n_freq]`; FFT bin k sits at k * (sr // 2) / (n_freq - 1) Hz.
fn mel_filter_bank(
    n_freq: usize,
    n_mels: usize,
    f_min: f64,
    f_max: f64,
    sampling_rate: u32,
) -> Vec<f64> {
    let (m_min, m_max) = (hz_to_mel_slaney(f_min), hz_to_mel_slaney(f_max));
    // n_mels + 2 band edges, evenly spaced in mel (numpy linspace).
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz_slaney(m_min + (m_max - m_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let nyquist = (sampling_rate / 2) as f64;
    let fft_freqs: Vec<f64> = (0..n_freq)
        .map(|k| nyquist * k as f64 / (n_freq - 1) as f64)
        .collect();
    let mut out = vec![0f64; n_mels * n_freq];
    for m in 0..n_mels {
        let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let down = (f - lo) / (mid - lo);
            let up = (hi - f) / (hi - mid);
            out[m * n_freq + k] = down.min(up).max(0.0) * enorm;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractor_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<WhisperFeatureExtractor>();
    }

    #[test]
    fn reflect_matches_numpy() {
        // np.pad([0,1,2,3], 5, mode="reflect") -> [1 2 3 2 1 | 0 1 2 3 | 2 1 0 1 2]
        let got: Vec<usize> = (-5..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(reflect(-3, 1), 0);
    }

    #[test]
    fn slaney_scale_round_trips() {
        for hz in [0.0, 100.0, 999.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hz_slaney(hz_to_mel_slaney(hz)) - hz).abs() < 1e-9);
        }
        assert!((hz_to_mel_slaney(1000.0) - 15.0).abs() < 1e-12);
    }

    #[test]
    fn shapes_and_padding() {
        let fe = WhisperFeatureExtractor::new(WhisperFeatureConfig::default()).unwrap();
        let x: Vec<f32> = (0..16_001).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let full = fe.extract(&x, Padding::MaxLength);
        assert_eq!(
            (full.n_mels, full.frames, full.attention_frames),
            (80, 3000, 101)
        );
        assert_eq!(full.data.len(), 80 * 3000);
        let own = fe.extract(&x, Padding::Longest);
        assert_eq!((own.frames, own.attention_frames), (100, 100));
        let silent = fe.extract(&[], Padding::MaxLength);
        // All padding: log10(1e-10) everywhere -> (-10 + 4) / 4.
        assert!(silent.data.iter().all(|v| (*v + 1.5).abs() < 1e-7));
        assert_eq!(silent.attention_frames, 0);
        assert_eq!(fe.extract(&[], Padding::Longest).frames, 0);
        // Shorter than the reflect pad: still works.
        assert_eq!(fe.extract(&[0.1, -0.2, 0.3], Padding::Longest).frames, 0);
        assert_eq!(fe.extract(&vec![0.1; 170], Padding::Longest).frames, 1);
        // Longer than a chunk: truncated.
        let long = vec![0.1f32; 500_000];
        let f = fe.extract(&long, Padding::MaxLength);
        assert_eq!((f.frames, f.attention_frames), (3000, 3000));
    }

    #[test]
    fn config_parsing_and_validation() {
        let fe = WhisperFeatureExtractor::from_preprocessor_config(
            r#"{"feature_extractor_type":"WhisperFeatureExtractor","feature_size":128,"sampling_rate":16000,
                "hop_length":160,"chunk_length":30,"n_fft":400,"padding_value":0.0,"return_attention_mask":true}"#,
        )
        .unwrap();
        assert_eq!(fe.n_mels(), 128);
        assert_eq!(fe.max_frames(), 3000);
        assert_eq!(
            WhisperFeatureExtractor::from_preprocessor_config("{}")
                .unwrap()
                .n_mels(),
            80
        );
        for bad in [
            r#"{"hop_length":0}"#,
            r#"{"feature_size":0}"#,
            r#"{"n_fft":1}"#,
            "not json",
            r#"{"n_fft":"x"}"#,
        ] {
            assert!(
                matches!(
                    WhisperFeatureExtractor::from_preprocessor_config(bad),
                    Err(MediaError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }
}
