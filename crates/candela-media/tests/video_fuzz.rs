//! Fuzzing the video decoders (bounded cases, so CI stays fast): mutated and
//! truncated fixture clips (and HEVC / AV1 / MOV / MKV clips encoded here)
//! and random bytes behind a container signature, through the built-in
//! demuxers / decoders and through ffmpeg. Every
//! outcome is frames or a 4xx error; nothing panics, hangs or leaks its
//! media-budget reservation.
#![cfg(feature = "video-files")]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use candela_media::video::{decode_video, FfmpegTools, VideoDecodeOptions, VideoDecoder};
use candela_media::MediaBudget;
use proptest::prelude::*;

const CLIPS: [&str; 5] = [
    "clip_h264.mp4",
    "clip_h264_high.mp4",
    "clip_vp9.webm",
    "clip_vp8.webm",
    "clip_vp8_key.webm",
];

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/vision")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn options(decoder: VideoDecoder, recovery: bool) -> VideoDecodeOptions {
    VideoDecodeOptions {
        decoder,
        frame_recovery: recovery,
        budget: MediaBudget::new(64 << 20, 32 << 20, 4, Duration::from_secs(5)),
        ffmpeg_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn check(bytes: &[u8], opts: &VideoDecodeOptions) -> Result<(), TestCaseError> {
    match decode_video(bytes, opts, |n, _| Ok((0..n).step_by(2).collect())) {
        Ok(v) => {
            prop_assert!(!v.frames.is_empty());
            for f in &v.frames {
                prop_assert_eq!(f.rgb.len(), f.width as usize * f.height as usize * 3);
            }
        }
        Err(e) => prop_assert!((400..500).contains(&e.http_status()), "{e:?}"),
    }
    prop_assert_eq!(opts.budget.in_use(), 0, "every reservation is given back");
    Ok(())
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let n = bytes.len();
    for &(at, v) in edits {
        bytes[at % n] ^= v | 1;
    }
    if let Some(c) = cut {
        bytes.truncate(c % n + 1);
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn built_in_decoders_take_mutated_clips(
        clip in 0..CLIPS.len(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..24),
        cut in proptest::option::of(any::<usize>()),
        recovery in any::<bool>(),
    ) {
        let bytes = mutate(fixture(CLIPS[clip]), &edits, cut);
        check(&bytes, &options(VideoDecoder::BuiltIn, recovery))?;
    }

    #[test]
    fn built_in_demuxers_take_random_bytes_after_a_signature(
        webm in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut bytes = if webm { vec![0x1A, 0x45, 0xDF, 0xA3] } else { b"\0\0\0\x18ftypmp42".to_vec() };
        bytes.extend(tail);
        check(&bytes, &options(VideoDecoder::BuiltIn, false))?;
    }
}

proptest! {
    // Each case runs ffprobe and ffmpeg: few of them.
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn ffmpeg_takes_mutated_clips(
        clip in 0..CLIPS.len(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..24),
        cut in proptest::option::of(any::<usize>()),
        recovery in any::<bool>(),
    ) {
        let tools = FfmpegTools::find().expect("ffmpeg on PATH (apt-get install ffmpeg)");
        let bytes = mutate(fixture(CLIPS[clip]), &edits, cut);
        check(&bytes, &options(VideoDecoder::Ffmpeg(tools), recovery))?;
    }
}

/// Codecs and containers only ffmpeg reads (HEVC, AV1; MOV, MKV): small
/// clips encoded here once, from a synthetic source, with B-frames where the
/// codec has them.
fn ffmpeg_only_clips() -> &'static [Vec<u8>] {
    static CLIPS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CLIPS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("candela-video-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hevc = ["-c:v", "libx265", "-x265-params", "log-level=error"];
        let av1 = ["-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "40"];
        let h264 = ["-c:v", "libx264"];
        let cases: [(&str, &[&str]); 4] = [
            ("hevc.mp4", &hevc),
            ("hevc.mkv", &hevc),
            ("av1.mkv", &av1),
            ("h264.mov", &h264),
        ];
        let clips = cases
            .iter()
            .map(|(name, codec)| {
                let path = dir.join(name);
                let out = Command::new("ffmpeg")
                    .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
                    .arg("testsrc2=size=64x48:rate=10:duration=1")
                    .args(*codec)
                    .args(["-pix_fmt", "yuv420p"])
                    .arg(&path)
                    .output()
                    .expect("ffmpeg on PATH (apt-get install ffmpeg)");
                assert!(
                    out.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::fs::read(&path).unwrap()
            })
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        clips
    })
}

proptest! {
    // Each case runs ffprobe and ffmpeg: few of them.
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn ffmpeg_takes_mutated_hevc_av1_mov_mkv(
        clip in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..24),
        cut in proptest::option::of(any::<usize>()),
        recovery in any::<bool>(),
    ) {
        let tools = FfmpegTools::find().expect("ffmpeg on PATH (apt-get install ffmpeg)");
        let bytes = mutate(ffmpeg_only_clips()[clip].clone(), &edits, cut);
        check(&bytes, &options(VideoDecoder::Ffmpeg(tools), recovery))?;
    }
}

#[test]
fn a_truncated_webm_says_truncated() {
    let bytes = fixture("clip_vp9.webm");
    let builtin = options(VideoDecoder::BuiltIn, false);
    let mut said = Vec::new();
    for cut in (40..bytes.len()).step_by(97) {
        if let Err(e) = decode_video(&bytes[..cut], &builtin, |n, _| Ok((0..n).collect())) {
            assert!(!e.message().contains("None"), "[..{cut}]: {e}");
            said.push(e.message().to_string());
        }
    }
    assert!(
        said.iter().any(|m| m.starts_with("WebM file is truncated")),
        "{said:?}"
    );
}
