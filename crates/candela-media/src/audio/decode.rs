//! Audio file bytes -> planar f32 samples, through symphonia (pure Rust).
//!
//! Containers: WAV (integer PCM 8/16/24/32-bit, float 32/64-bit, A-law/µ-law),
//! FLAC, MP3 and OGG/Vorbis; any number of channels. Decoding is lenient the way
//! ffmpeg is: a packet that fails to decode is skipped and a truncated file gives
//! the samples before the cut; only input that yields nothing is an error.
//! The samples are counted against the media budget while they decode.

use std::io::Cursor;

use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::{MediaBudget, MediaError};

/// Audio grows its media-budget reservation at least this much at a time.
const AUDIO_STEP: u64 = 8 << 20;

/// Decoded audio: one sample vector per channel (all the same length), in [-1, 1]
/// for integer sources.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    pub channels: Vec<Vec<f32>>,
    pub sample_rate: u32,
}

impl DecodedAudio {
    /// Samples per channel.
    pub fn frames(&self) -> usize {
        self.channels.first().map_or(0, Vec::len)
    }
}

/// Decode an audio file. `format_hint` is an extension or MIME type ("wav",
/// ".mp3", "audio/flac", "audio/ogg; codecs=vorbis"); it only speeds up probing,
/// the content decides. Never panics: a panic inside the codec is reported as
/// `Corrupt`.
pub fn decode_audio(bytes: &[u8], format_hint: Option<&str>) -> Result<DecodedAudio, MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Empty("audio input is empty (0 bytes)".into()));
    }
    let hint = format_hint.and_then(normalize_hint);
    crate::error::guard_codec("audio decoder", || decode_inner(bytes, hint))
}

/// Map the many spellings of our formats to the extension symphonia's probe knows.
/// Unknown hints are dropped rather than passed on: the probe then looks at every
/// registered format.
fn normalize_hint(raw: &str) -> Option<&'static str> {
    let s = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let s = s.trim_start_matches('.');
    let s = s.strip_prefix("audio/").unwrap_or(s);
    Some(match s {
        "wav" | "wave" | "x-wav" | "vnd.wave" | "x-pn-wav" => "wav",
        "mp3" | "mpeg" | "mpga" | "mpeg3" | "x-mpeg-3" | "x-mp3" => "mp3",
        "flac" | "x-flac" => "flac",
        "ogg" | "oga" | "vorbis" | "x-vorbis+ogg" | "x-ogg" => "ogg",
        _ => return None,
    })
}

/// The container its magic bytes claim, to word errors (the probe decides).
fn sniff(b: &[u8]) -> Option<&'static str> {
    if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WAVE" {
        Some("WAV")
    } else if b.starts_with(b"fLaC") {
        Some("FLAC")
    } else if b.starts_with(b"OggS") {
        Some("OGG")
    } else if b.starts_with(b"ID3") || (b.len() >= 2 && b[0] == 0xFF && b[1] & 0xE0 == 0xE0) {
        Some("MP3")
    } else {
        None
    }
}

fn probe_error(e: SymError, sniffed: Option<&str>, hint_ext: Option<&str>) -> MediaError {
    let not_audio = || {
        MediaError::Unsupported(format!(
            "not an audio file: no WAV, FLAC, MP3 or OGG/Vorbis stream found{}",
            hint_ext
                .map(|h| format!(" (format hint: {h})"))
                .unwrap_or_default()
        ))
    };
    match (e, sniffed) {
        (SymError::Unsupported(m), _) if m.contains("no suitable format reader") => not_audio(),
        (SymError::Unsupported(m), _) => MediaError::Unsupported(format!("unsupported audio: {m}")),
        (SymError::IoError(_), None) => not_audio(),
        (SymError::IoError(io), Some(f)) => {
            MediaError::Corrupt(format!("{f} file is truncated or damaged: {io}"))
        }
        (other, f) => MediaError::Corrupt(format!(
            "{} header is malformed: {other}",
            f.unwrap_or("audio")
        )),
    }
}

fn decode_inner(bytes: &[u8], hint_ext: Option<&'static str>) -> Result<DecodedAudio, MediaError> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = hint_ext {
        hint.with_extension(ext);
    }
    let sniffed = sniff(bytes);
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| probe_error(e, sniffed, hint_ext))?;
    let container = format.format_info().short_name;

    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| MediaError::Unsupported(format!("{container} file has no audio track")))?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| MediaError::Unsupported(format!("{container} file has no audio track")))?
        .clone();
    let registry = symphonia::default::get_codecs();
    let codec_name = registry
        .get_audio_decoder(params.codec)
        .map(|c| c.codec.info.short_name);
    let mut decoder = registry
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| match codec_name {
            // The codec is known but its parameters are not.
            Some(name) => {
                MediaError::Corrupt(format!("{container}: cannot open the {name} decoder: {e}"))
            }
            None => MediaError::Unsupported(format!(
                "{container}: audio codec {} is not supported (supported: PCM, FLAC, MP3, Vorbis)",
                params.codec
            )),
        })?;
    let codec = codec_name.unwrap_or("audio");
    let what = format!("{container}/{codec}");

    // Decoded samples are reserved from the media budget as they grow (a
    // small compressed file can hold hours): past the per-item share a 413.
    let budget = MediaBudget::global();
    let label = format!("the {what} audio");
    let mut memory = budget.reserve(0, &label)?;
    let mut channels: Vec<Vec<f32>> = Vec::new();
    let mut sample_rate = 0u32;
    let mut plane_buf: Vec<Vec<f32>> = Vec::new();
    let mut decoded_packets = 0usize;
    let mut first_error: Option<String> = None;

    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // A chained stream with new parameters: keep what the first one gave.
            Err(SymError::ResetRequired) => break,
            Err(e) => {
                // A truncated or damaged tail: the samples so far stand.
                first_error.get_or_insert_with(|| e.to_string());
                break;
            }
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(buf) => buf,
            Err(SymError::DecodeError(e)) => {
                first_error.get_or_insert_with(|| format!("malformed stream: {e}"));
                continue;
            }
            Err(SymError::IoError(e)) => {
                first_error.get_or_insert_with(|| e.to_string());
                continue;
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                break;
            }
        };
        let spec = buf.spec();
        let n_ch = spec.channels().count();
        if n_ch == 0 || spec.rate() == 0 {
            return Err(MediaError::Corrupt(format!(
                "{what}: stream declares no channels or a zero sample rate"
            )));
        }
        if channels.is_empty() {
            channels = vec![Vec::new(); n_ch];
            sample_rate = spec.rate();
        } else if n_ch != channels.len() || spec.rate() != sample_rate {
            return Err(MediaError::Unsupported(format!(
                "{what}: channel count or sample rate changes mid-stream ({} ch @ {} Hz, then {n_ch} ch @ {} Hz)",
                channels.len(),
                sample_rate,
                spec.rate()
            )));
        }
        if buf.frames() == 0 {
            continue;
        }
        buf.copy_to_vecs_planar::<f32>(&mut plane_buf);
        if plane_buf.len() != n_ch {
            return Err(MediaError::Corrupt(format!(
                "{what}: decoder returned {} planes for {n_ch} channels",
                plane_buf.len()
            )));
        }
        let held: u64 = channels
            .iter()
            .map(|c| (c.len() + buf.frames()) as u64 * 4)
            .sum();
        if held > memory.bytes() {
            // In steps of 8 MiB (or a quarter of what is held), not per packet.
            let step = (held - memory.bytes())
                .max(AUDIO_STEP)
                .max(memory.bytes() / 4);
            memory.grow(step, &label)?;
        }
        for (dst, src) in channels.iter_mut().zip(&plane_buf) {
            dst.extend_from_slice(src);
        }
        decoded_packets += 1;
    }

    let frames = channels.first().map_or(0, Vec::len);
    if frames == 0 {
        return Err(match first_error {
            Some(e) if decoded_packets == 0 => {
                MediaError::Corrupt(format!("{what}: could not decode any audio: {e}"))
            }
            _ => MediaError::Empty(format!("{what} stream contains no audio samples")),
        });
    }
    Ok(DecodedAudio {
        channels,
        sample_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_normalized() {
        assert_eq!(normalize_hint("WAV"), Some("wav"));
        assert_eq!(normalize_hint(".mp3"), Some("mp3"));
        assert_eq!(normalize_hint("audio/mpeg"), Some("mp3"));
        assert_eq!(normalize_hint("audio/ogg; codecs=vorbis"), Some("ogg"));
        assert_eq!(normalize_hint("audio/x-flac"), Some("flac"));
        assert_eq!(normalize_hint("m4a"), None);
    }
}
