//! WAV sample formats decode to the exact values, bad input is a typed error
//! naming what failed, and no input (truncated, flipped, random) panics.

use std::path::PathBuf;

use candela_media::audio::{decode_audio, decode_to_mono};
use candela_media::MediaError;
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/audio")
            .join(name),
    )
    .unwrap()
}

/// A RIFF/WAVE file. `format`: 1 = PCM, 3 = IEEE float, 0xFFFE = extensible
/// (with that sub-format).
fn wav(format: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits / 8;
    let mut fmt = Vec::new();
    fmt.extend_from_slice(&format.to_le_bytes());
    fmt.extend_from_slice(&channels.to_le_bytes());
    fmt.extend_from_slice(&rate.to_le_bytes());
    fmt.extend_from_slice(&(rate * block as u32).to_le_bytes());
    fmt.extend_from_slice(&block.to_le_bytes());
    fmt.extend_from_slice(&bits.to_le_bytes());
    if format == 0xFFFE {
        fmt.extend_from_slice(&22u16.to_le_bytes());
        fmt.extend_from_slice(&bits.to_le_bytes()); // valid bits
        let mask: u32 = (1u32 << channels) - 1;
        fmt.extend_from_slice(&mask.to_le_bytes());
        // KSDATAFORMAT_SUBTYPE_PCM: 00000001-0000-0010-8000-00aa00389b71
        fmt.extend_from_slice(&[
            1, 0, 0, 0, 0, 0, 0x10, 0, 0x80, 0, 0, 0xaa, 0, 0x38, 0x9b, 0x71,
        ]);
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((4 + 8 + fmt.len() + 8 + data.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WAVE");
    out.extend_from_slice(b"fmt ");
    out.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
    out.extend_from_slice(&fmt);
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// A stereo test signal: frame i has left = a(i), right = -a(i) / 2, in [-1, 1).
fn signal(frames: usize) -> Vec<[f64; 2]> {
    (0..frames)
        .map(|i| {
            let a = ((i * 7919) % 2000) as f64 / 1000.0 - 1.0;
            [a, -a / 2.0]
        })
        .collect()
}

fn check(
    decoded: &candela_media::audio::DecodedAudio,
    want: &[Vec<f64>],
    rate: u32,
    tol: f64,
    what: &str,
) {
    assert_eq!(decoded.sample_rate, rate, "{what}");
    assert_eq!(decoded.channels.len(), want.len(), "{what}");
    for (c, (got, exp)) in decoded.channels.iter().zip(want).enumerate() {
        assert_eq!(got.len(), exp.len(), "{what} channel {c}");
        for (i, (g, e)) in got.iter().zip(exp).enumerate() {
            assert!(
                (*g as f64 - e).abs() <= tol,
                "{what} ch{c}[{i}]: {g} vs {e}"
            );
        }
    }
}

#[test]
fn wav_integer_and_float_formats_decode_exactly() {
    let sig = signal(1000);
    let rate = 22050;
    // (bits, format, encode one sample, exact decoded value)
    type Enc = fn(f64) -> (Vec<u8>, f64);
    let cases: [(u16, u16, Enc); 6] = [
        (8, 1, |x| {
            let q = ((x * 128.0).round() as i32 + 128).clamp(0, 255) as u8;
            (vec![q], (q as f64 - 128.0) / 128.0)
        }),
        (16, 1, |x| {
            let q = (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
            (q.to_le_bytes().to_vec(), q as f64 / 32768.0)
        }),
        (24, 1, |x| {
            let q = (x * 8388608.0).round().clamp(-8388608.0, 8388607.0) as i32;
            (q.to_le_bytes()[..3].to_vec(), q as f64 / 8388608.0)
        }),
        (32, 1, |x| {
            let q = (x * 2147483648.0)
                .round()
                .clamp(-2147483648.0, 2147483647.0) as i32;
            (q.to_le_bytes().to_vec(), q as f64 / 2147483648.0)
        }),
        (32, 3, |x| {
            ((x as f32).to_le_bytes().to_vec(), x as f32 as f64)
        }),
        (64, 3, |x| (x.to_le_bytes().to_vec(), x)),
    ];
    for (bits, format, enc) in cases {
        let mut data = Vec::new();
        let mut want = vec![Vec::new(), Vec::new()];
        for frame in &sig {
            for (c, &x) in frame.iter().enumerate() {
                let (b, v) = enc(x);
                data.extend_from_slice(&b);
                want[c].push(v);
            }
        }
        let what = format!("{bits}-bit format {format}");
        let d = decode_audio(&wav(format, 2, rate, bits, &data), Some("wav")).unwrap();
        // f32 output: exact for <= 24-bit, one f32 rounding for the rest.
        check(&d, &want, rate, 1e-7, &what);
        // Mono is the channel average.
        let mono = decode_to_mono(&wav(format, 2, rate, bits, &data), None, rate).unwrap();
        for (i, m) in mono.iter().enumerate() {
            assert!(
                (*m as f64 - (want[0][i] + want[1][i]) / 2.0).abs() <= 1e-6,
                "{what} mono[{i}]"
            );
        }
    }
}

#[test]
fn wav_extensible_with_many_channels() {
    let (ch, frames) = (6u16, 300usize);
    let mut data = Vec::new();
    let mut want = vec![Vec::new(); ch as usize];
    for i in 0..frames {
        for (c, w) in want.iter_mut().enumerate() {
            let v: i32 = (i as i32 * 52_711 + c as i32 * 1_000_003) % 16_777_216 - 8_388_608; // 24-bit range
            data.extend_from_slice(&v.to_le_bytes()[..3]);
            w.push(v as f64 / 8_388_608.0);
        }
    }
    let d = decode_audio(&wav(0xFFFE, ch, 48000, 24, &data), None).unwrap();
    check(&d, &want, 48000, 1e-7, "6-channel extensible 24-bit");
}

#[test]
fn bad_input_is_a_typed_error_naming_what_failed() {
    let err = |b: &[u8], h: Option<&str>| decode_audio(b, h).unwrap_err();

    let e = err(b"", Some("wav"));
    assert!(
        matches!(e, MediaError::Empty(_)) && e.http_status() == 400,
        "{e:?}"
    );

    let e = err(
        b"this is plainly a text file, not audio at all",
        Some("mp3"),
    );
    assert!(
        matches!(e, MediaError::Unsupported(_)) && e.http_status() == 422,
        "{e:?}"
    );
    assert!(e.to_string().contains("not an audio file"), "{e}");

    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
    assert!(err(png, None).to_string().contains("not an audio file"));

    // A WAV with a data chunk of zero samples.
    let e = err(&wav(1, 1, 16000, 16, &[]), None);
    assert!(matches!(e, MediaError::Empty(_)), "{e:?}");
    assert!(e.to_string().contains("no audio samples"), "{e}");

    // An unsupported WAV codec (0x0055: MP3-in-WAV).
    let e = err(&wav(0x0055, 1, 16000, 16, &[0; 64]), None);
    assert!(e.http_status() == 422, "{e:?}");
    assert!(e.to_string().to_lowercase().contains("wav"), "{e}");

    // A cut-off header.
    let full = fixture("speech_16k.wav");
    let e = err(&full[..30], None);
    assert_eq!(e.http_status(), 422, "{e:?}");
    assert!(e.to_string().contains("WAV"), "{e}");
}

#[test]
fn truncated_files_keep_what_was_decoded() {
    for name in [
        "speech_16k.wav",
        "speech_16k.flac",
        "speech_16k.mp3",
        "speech_16k.ogg",
    ] {
        let full = fixture(name);
        let whole = decode_audio(&full, None).unwrap().frames();
        // Packet (OGG: page) granularity: some audio, not all of it.
        let part = decode_audio(&full[..full.len() * 3 / 4], None)
            .unwrap()
            .frames();
        assert!(
            part > whole / 4 && part < whole,
            "{name}: {part} of {whole}"
        );
    }
}

/// Every result of decoding junk is Ok or one of the decode error kinds.
fn assert_sane(r: Result<candela_media::audio::DecodedAudio, MediaError>) {
    match r {
        Ok(a) => {
            assert!(!a.channels.is_empty() && a.sample_rate > 0);
            assert!(a.channels.iter().all(|c| c.len() == a.frames()));
        }
        Err(MediaError::Empty(m) | MediaError::Corrupt(m) | MediaError::Unsupported(m)) => {
            assert!(!m.is_empty())
        }
        Err(e) => panic!("unexpected error kind {e:?}"),
    }
}

#[test]
fn every_prefix_of_every_fixture_is_handled() {
    for name in [
        "speech_16k.wav",
        "speech_16k.flac",
        "speech_16k.mp3",
        "speech_16k_sox.mp3",
        "speech_16k.ogg",
    ] {
        let full = fixture(name);
        // Dense near the header, sparse after.
        let mut cuts: Vec<usize> = (0..200.min(full.len())).collect();
        cuts.extend((200..full.len()).step_by(997));
        for n in cuts {
            assert_sane(decode_audio(&full[..n], None));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), hint in 0usize..5) {
        let h = [None, Some("wav"), Some("mp3"), Some("flac"), Some("ogg")][hint];
        assert_sane(decode_audio(&bytes, h));
    }

    #[test]
    fn damaged_fixtures_never_panic(
        file in 0usize..4,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        cut in any::<usize>(),
    ) {
        let name = ["speech_16k.wav", "speech_16k.flac", "speech_16k.mp3", "speech_16k.ogg"][file];
        let mut b = fixture(name);
        // Damage the first 8 KB most (headers live there), anywhere sometimes.
        for (pos, val) in flips {
            let len = if pos % 4 == 0 { b.len() } else { b.len().min(8192) };
            let i = pos % len;
            b[i] ^= val | 1;
        }
        b.truncate(cut % (b.len() + 1));
        assert_sane(decode_audio(&b, None));
    }
}
