//! Audio: bytes -> samples -> mono -> 16 kHz -> Whisper log-mel features, and
//! splitting long audio into model-sized clips.

mod decode;
mod mel;
mod mono;
mod resample;
mod split;

pub use decode::{decode_audio, DecodedAudio};
pub use mel::{Features, Padding, WhisperFeatureConfig, WhisperFeatureExtractor};
pub use mono::{mono_from_2d, mono_from_channels, mono_from_interleaved, to_mono, SampleLayout};
pub use resample::resample;
pub use split::{split_audio, SplitOptions, SplitPlan};

use crate::MediaError;

/// Decode a file and make it what speech models want: mono at `target_hz`.
pub fn decode_to_mono(
    bytes: &[u8],
    format_hint: Option<&str>,
    target_hz: u32,
) -> Result<Vec<f32>, MediaError> {
    let audio = decode_audio(bytes, format_hint)?;
    resample(&to_mono(&audio), audio.sample_rate, target_hz)
}
