//! Audio on real speech (fixtures/audio, made by scripts/make_audio_fixtures.py):
//! log-mel parity with transformers' WhisperFeatureExtractor, every container
//! decoding to the same samples, stereo 44.1 kHz -> mono 16 kHz.

use std::path::PathBuf;

use candela_media::audio::{
    decode_audio, resample, to_mono, DecodedAudio, Features, Padding, WhisperFeatureExtractor,
};
use safetensors::SafeTensors;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/audio")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        Reference {
            bytes: fixture("speech_16k.features.safetensors"),
        }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data) = self.tensor(name);
        (
            shape,
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }

    fn i64(&self, name: &str) -> i64 {
        let (_, data) = self.tensor(name);
        i64::from_le_bytes(data[..8].try_into().unwrap())
    }
}

fn speech_16k() -> Vec<f32> {
    let a = decode_audio(&fixture("speech_16k.wav"), Some("wav")).unwrap();
    assert_eq!((a.channels.len(), a.sample_rate), (1, 16000));
    a.channels.into_iter().next().unwrap()
}

fn extractor(n_mels: usize) -> WhisperFeatureExtractor {
    let json = String::from_utf8(fixture(&format!(
        "whisper{n_mels}_preprocessor_config.json"
    )))
    .unwrap();
    let fe = WhisperFeatureExtractor::from_preprocessor_config(&json).unwrap();
    assert_eq!(fe.n_mels(), n_mels);
    fe
}

/// Max |ours - reference| over frames `0..ref_frames` of a `[n_mels, ref_frames]` reference.
fn max_diff(ours: &Features, reference: &[f32], ref_frames: usize) -> f32 {
    let mut worst = 0f32;
    for m in 0..ours.n_mels {
        for f in 0..ref_frames {
            worst = worst.max((ours.at(m, f) - reference[m * ref_frames + f]).abs());
        }
    }
    worst
}

#[test]
fn whisper_features_match_transformers() {
    let x = speech_16k();
    let reference = Reference::load();
    for n_mels in [80usize, 128] {
        let fe = extractor(n_mels);
        let ours = fe.extract(&x, Padding::MaxLength);
        assert_eq!((ours.n_mels, ours.frames), (n_mels, 3000));
        assert_eq!(
            ours.attention_frames as i64,
            reference.i64(&format!("mel{n_mels}_attention_frames"))
        );

        let (shape, head) = reference.f32s(&format!("mel{n_mels}_max_head"));
        assert_eq!(shape[0], n_mels);
        let d = max_diff(&ours, &head, shape[1]);
        let (_, tail) = reference.f32s(&format!("mel{n_mels}_max_tail"));
        let mut d_tail = 0f32;
        for (m, t) in tail.iter().enumerate() {
            for f in shape[1]..3000 {
                d_tail = d_tail.max((ours.at(m, f) - t).abs());
            }
        }
        eprintln!("mel{n_mels} max_length: max abs diff {d:.3e} (audio frames), {d_tail:.3e} (padding frames)");
        assert!(d <= 1e-4 && d_tail <= 1e-4, "mel{n_mels}: {d} / {d_tail}");
    }

    let fe = extractor(80);
    let ours = fe.extract(&x, Padding::Longest);
    let (shape, longest) = reference.f32s("mel80_longest");
    assert_eq!((ours.n_mels, ours.frames), (shape[0], shape[1]));
    assert_eq!(ours.attention_frames, ours.frames);
    let d = max_diff(&ours, &longest, shape[1]);
    eprintln!("mel80 longest: max abs diff {d:.3e}");
    assert!(d <= 1e-4, "mel80 longest: {d}");
}

/// Best alignment of `b` against `a` within ±max_lag samples, and the SNR there (dB).
fn aligned_snr(a: &[f32], b: &[f32], max_lag: i64) -> (i64, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for lag in -max_lag..=max_lag {
        let (mut sig, mut err) = (0f64, 0f64);
        for (i, &va) in a.iter().enumerate() {
            let j = i as i64 + lag;
            let vb = if j >= 0 && (j as usize) < b.len() {
                b[j as usize]
            } else {
                0.0
            };
            sig += (va as f64).powi(2);
            err += (va as f64 - vb as f64).powi(2);
        }
        let snr = 10.0 * (sig / err.max(1e-30)).log10();
        if snr > best.1 {
            best = (lag, snr);
        }
    }
    best
}

#[test]
fn every_container_decodes_to_the_same_speech() {
    let wav = speech_16k();
    let flac = decode_audio(&fixture("speech_16k.flac"), Some("flac")).unwrap();
    assert_eq!((flac.sample_rate, flac.channels.len()), (16000, 1));
    assert_eq!(flac.channels[0], wav, "FLAC is lossless");

    // Lossy codecs: gapless decoding trims encoder delay and padding, so the
    // samples line up with the WAV one for one.
    for name in ["speech_16k.mp3", "speech_16k.ogg"] {
        // The content decides, not the hint: no hint, and a wrong one, decode the same.
        let a = decode_audio(&fixture(name), None).unwrap();
        let b = decode_audio(&fixture(name), Some("audio/wav")).unwrap();
        assert_eq!(a, b);
        assert_eq!((a.sample_rate, a.channels.len()), (16000, 1), "{name}");
        let got = &a.channels[0];
        let (lag, snr) = aligned_snr(&wav, got, 64);
        eprintln!(
            "{name}: {} samples (wav {}), lag {lag}, SNR {snr:.1} dB",
            got.len(),
            wav.len()
        );
        assert_eq!(got.len(), wav.len(), "{name}");
        assert_eq!(lag, 0, "{name}");
        assert!(snr >= 18.0, "{name}: SNR {snr:.1} dB");
    }

    // An MP3 without a LAME/Info tag cannot be trimmed: it starts 1105 samples late
    // (576 + 529 decoder delay) and is padded to whole 1152-sample frames.
    let a = decode_audio(&fixture("speech_16k_sox.mp3"), Some("mp3")).unwrap();
    let got = &a.channels[0];
    let (lag, snr) = aligned_snr(&wav, got, 1200);
    eprintln!(
        "speech_16k_sox.mp3: {} samples, lag {lag}, SNR {snr:.1} dB",
        got.len()
    );
    assert_eq!(lag, 1105);
    assert_eq!(got.len() % 1152, 0);
    assert!(snr >= 18.0, "SNR {snr:.1} dB");
}

#[test]
fn stereo_44k_mixes_and_resamples_to_the_16k_speech() {
    let wav = speech_16k();
    let st: DecodedAudio = decode_audio(&fixture("speech_44k_stereo.wav"), None).unwrap();
    assert_eq!((st.sample_rate, st.channels.len()), (44100, 2));
    // Right = 0.5 * left, up to 16-bit rounding.
    let q = 1.0 / 32768.0;
    for (l, r) in st.channels[0].iter().zip(&st.channels[1]) {
        assert!((r - 0.5 * l).abs() <= q, "{l} {r}");
    }
    let mono = to_mono(&st);
    assert_eq!(mono.len(), st.frames());
    for ((m, l), r) in mono.iter().zip(&st.channels[0]).zip(&st.channels[1]) {
        assert!((m - (l + r) / 2.0).abs() < 1e-7);
    }
    let back = resample(&mono, 44100, 16000).unwrap();
    assert_eq!(back.len(), wav.len());
    let scaled: Vec<f32> = wav.iter().map(|v| v * 0.75).collect();
    let (lag, snr) = aligned_snr(&scaled, &back, 4);
    eprintln!("stereo 44.1k -> mono 16k vs 0.75 * wav: lag {lag}, SNR {snr:.1} dB");
    assert_eq!(lag, 0);
    assert!(snr > 30.0, "SNR {snr:.1} dB");
}

#[test]
fn whisper_features_of_decoded_mp3_stay_close() {
    // Not parity (the codec changes the signal), but the pipeline runs and the
    // spectrogram of lossy speech stays near the original's.
    let fe = extractor(80);
    let a = fe.extract(&speech_16k(), Padding::MaxLength);
    let mp3 = decode_audio(&fixture("speech_16k.mp3"), None).unwrap();
    let b = fe.extract(&mp3.channels[0], Padding::MaxLength);
    let n = a.attention_frames.min(b.attention_frames);
    let mut mean = 0f64;
    for m in 0..80 {
        for f in 0..n {
            mean += (a.at(m, f) - b.at(m, f)).abs() as f64;
        }
    }
    mean /= (80 * n) as f64;
    eprintln!("mp3 vs wav log-mel mean abs diff {mean:.3}");
    assert!(mean < 0.1, "{mean}");
}
