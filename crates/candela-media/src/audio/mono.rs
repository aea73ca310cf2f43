//! Channel mixing: models that want mono get the average of all channels,
//! whatever layout the caller's samples come in.

use super::DecodedAudio;
use crate::MediaError;

/// How a 2-D raw sample array is laid out (vLLM accepts both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleLayout {
    /// (channels, time): each row is one channel (librosa, torchaudio).
    ChannelsFirst,
    /// (time, channels): each row is one frame (soundfile, interleaved PCM).
    ChannelsLast,
    /// The shorter axis is the channel axis (ties: channels first); audio has
    /// far more samples than channels, so this is right for anything real.
    Auto,
}

/// Average the channels of decoded audio into one.
pub fn to_mono(audio: &DecodedAudio) -> Vec<f32> {
    average(&audio.channels)
}

/// Average per-channel sample vectors; they must all have the same length.
pub fn mono_from_channels(channels: &[Vec<f32>]) -> Result<Vec<f32>, MediaError> {
    if channels.is_empty() {
        return Err(MediaError::Invalid("audio has no channels".into()));
    }
    let n = channels[0].len();
    if let Some((i, c)) = channels.iter().enumerate().find(|(_, c)| c.len() != n) {
        return Err(MediaError::Invalid(format!(
            "audio channels differ in length: channel 0 has {n} samples, channel {i} has {}",
            c.len()
        )));
    }
    Ok(average(channels))
}

/// Average interleaved frames (`[l0, r0, l1, r1, ...]`) of `channels` channels.
pub fn mono_from_interleaved(samples: &[f32], channels: usize) -> Result<Vec<f32>, MediaError> {
    if channels == 0 {
        return Err(MediaError::Invalid(
            "channel count must be at least 1".into(),
        ));
    }
    if !samples.len().is_multiple_of(channels) {
        return Err(MediaError::Invalid(format!(
            "{} interleaved samples do not divide into {channels} channels",
            samples.len()
        )));
    }
    if channels == 1 {
        return Ok(samples.to_vec());
    }
    let inv = 1.0 / channels as f32;
    Ok(samples
        .chunks_exact(channels)
        .map(|f| f.iter().sum::<f32>() * inv)
        .collect())
}

/// Mix a row-major 2-D array of shape `[rows, cols]` down to mono.
pub fn mono_from_2d(
    data: &[f32],
    shape: [usize; 2],
    layout: SampleLayout,
) -> Result<Vec<f32>, MediaError> {
    let [rows, cols] = shape;
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(MediaError::Invalid(format!(
            "audio array of {} samples does not have shape [{rows}, {cols}]",
            data.len()
        )));
    }
    let channels_first = match layout {
        SampleLayout::ChannelsFirst => true,
        SampleLayout::ChannelsLast => false,
        SampleLayout::Auto => rows <= cols,
    };
    if channels_first {
        if rows == 0 {
            return Err(MediaError::Invalid("audio has no channels".into()));
        }
        let chans: Vec<Vec<f32>> = data
            .chunks_exact(cols.max(1))
            .take(rows)
            .map(<[f32]>::to_vec)
            .collect();
        if cols == 0 {
            return Ok(Vec::new());
        }
        Ok(average(&chans))
    } else {
        if cols == 0 {
            return Err(MediaError::Invalid("audio has no channels".into()));
        }
        mono_from_interleaved(data, cols)
    }
}

/// Mean over channels, summed in f64 so many channels lose nothing; the length is
/// the shortest channel's.
fn average(channels: &[Vec<f32>]) -> Vec<f32> {
    match channels {
        [] => Vec::new(),
        [one] => one.clone(),
        _ => {
            let n = channels.iter().map(Vec::len).min().unwrap_or(0);
            let inv = 1.0 / channels.len() as f64;
            (0..n)
                .map(|i| (channels.iter().map(|c| c[i] as f64).sum::<f64>() * inv) as f32)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_agree() {
        // Two channels, three frames: L = 1,2,3 and R = 3,4,5.
        let planar = [1.0, 2.0, 3.0, 3.0, 4.0, 5.0];
        let inter = [1.0, 3.0, 2.0, 4.0, 3.0, 5.0];
        let want = vec![2.0, 3.0, 4.0];
        assert_eq!(
            mono_from_2d(&planar, [2, 3], SampleLayout::ChannelsFirst).unwrap(),
            want
        );
        assert_eq!(
            mono_from_2d(&planar, [2, 3], SampleLayout::Auto).unwrap(),
            want
        );
        assert_eq!(
            mono_from_2d(&inter, [3, 2], SampleLayout::ChannelsLast).unwrap(),
            want
        );
        assert_eq!(
            mono_from_2d(&inter, [3, 2], SampleLayout::Auto).unwrap(),
            want
        );
        assert_eq!(mono_from_interleaved(&inter, 2).unwrap(), want);
        let dec = DecodedAudio {
            channels: vec![vec![1.0, 2.0, 3.0], vec![3.0, 4.0, 5.0]],
            sample_rate: 8000,
        };
        assert_eq!(to_mono(&dec), want);
        assert_eq!(mono_from_channels(&dec.channels).unwrap(), want);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            mono_from_interleaved(&[1.0, 2.0, 3.0], 2),
            Err(MediaError::Invalid(_))
        ));
        assert!(matches!(
            mono_from_interleaved(&[1.0], 0),
            Err(MediaError::Invalid(_))
        ));
        assert!(matches!(
            mono_from_2d(&[1.0; 5], [2, 3], SampleLayout::Auto),
            Err(MediaError::Invalid(_))
        ));
        assert!(matches!(
            mono_from_channels(&[vec![1.0], vec![]]),
            Err(MediaError::Invalid(_))
        ));
        assert!(matches!(
            mono_from_channels(&[]),
            Err(MediaError::Invalid(_))
        ));
    }
}
