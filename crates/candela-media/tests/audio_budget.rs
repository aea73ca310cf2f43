//! Decoded audio counts against the process's media budget while it
//! decodes: a small file that holds hours is a 413 naming the numbers, not an
//! allocation the size of its samples. (Its own test binary: it sets the
//! process-wide budget before the first decode.)

use candela_media::audio::decode_audio;
use candela_media::MediaBudget;

/// A 16-bit mono WAV of `seconds` of silence at `rate` Hz.
fn wav(seconds: u32, rate: u32) -> Vec<u8> {
    let data = seconds * rate * 2;
    let mut b = Vec::with_capacity(44 + data as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    b.resize(44 + data as usize, 0);
    b
}

#[test]
fn audio_past_the_item_share_is_a_413_and_the_budget_is_given_back() {
    // 16 MiB in all, 8 MiB for one item: 40 s at 48 kHz (7.3 MiB of f32) fit, 60 s (11 MiB) do not.
    std::env::set_var(candela_media::budget::BUDGET_ENV, (16u64 << 20).to_string());
    let budget = MediaBudget::global();
    assert_eq!(budget.per_item(), 8 << 20);
    let ok = decode_audio(&wav(40, 48_000), Some("wav")).unwrap();
    assert_eq!(ok.frames(), 40 * 48_000);
    assert_eq!(budget.in_use(), 0, "held only while decoding");
    let e = decode_audio(&wav(60, 48_000), Some("wav")).unwrap_err();
    assert_eq!(e.http_status(), 413, "{e}");
    assert!(
        e.message().starts_with("the wave/pcm_s16le audio needs ")
            && e.message()
                .contains("above the per-item media memory limit of 8.0 MiB"),
        "{e}"
    );
    assert_eq!(budget.in_use(), 0);
}
