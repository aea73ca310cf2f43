//! Video files (fixtures/vision, made by scripts/make_vision_fixtures.py):
//! MP4/H.264 and WebM/VP9/VP8 decode to ffmpeg's frames in display order,
//! sampling while decoding, frame recovery, limits, hostile bytes. The
//! built-in decoders are named explicitly where a test is about them; the
//! default (ffmpeg when found, see video_ffmpeg.rs) elsewhere.
#![cfg(feature = "video-files")]

use std::path::PathBuf;

use candela_media::image::DecodedImage;
use candela_media::video::{
    decode_video, Qwen2VlVideoConfig, VideoDecodeOptions, VideoDecoder, VideoOverrides,
};
use candela_media::MediaError;
use safetensors::SafeTensors;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/vision")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn video_config() -> Qwen2VlVideoConfig {
    let json = String::from_utf8(fixture("video_preprocessor_config.json")).unwrap();
    Qwen2VlVideoConfig::from_preprocessor_config(&json).unwrap()
}

fn clip_reference(name: &str) -> Vec<Vec<u8>> {
    let bytes = fixture("clip_frames.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{name}.frames")).unwrap();
    let (shape, data) = (t.shape().to_vec(), t.data());
    let per = shape[1] * shape[2] * 3;
    (0..shape[0])
        .map(|i| data[i * per..(i + 1) * per].to_vec())
        .collect()
}

fn all(n: usize, _fps: Option<f64>) -> Result<Vec<usize>, MediaError> {
    Ok((0..n).collect())
}

/// Each file decodes to ffmpeg's frames, in display order, within the slack of
/// a different YUV -> RGB conversion.
#[test]
fn video_files_match_ffmpeg() {
    for (clip, codec, decoder) in [
        ("clip_h264.mp4", "H.264", VideoDecoder::BuiltIn),
        ("clip_h264_high.mp4", "H.264", VideoDecoder::BuiltIn),
        ("clip_vp9.webm", "VP9", VideoDecoder::BuiltIn),
        ("clip_vp8_key.webm", "VP8", VideoDecoder::BuiltIn),
        ("clip_h264.mp4", "H.264", VideoDecoder::Auto),
        ("clip_h264_high.mp4", "H.264", VideoDecoder::Auto),
        ("clip_vp9.webm", "VP9", VideoDecoder::Auto),
        ("clip_vp8_key.webm", "VP8", VideoDecoder::Auto),
    ] {
        let opts = VideoDecodeOptions {
            decoder: decoder.clone(),
            ..Default::default()
        };
        let v = decode_video(&fixture(clip), &opts, all).unwrap_or_else(|e| panic!("{clip}: {e}"));
        assert_eq!(v.codec, codec);
        assert_eq!(v.total_frames, 10, "{clip}");
        let fps = v.source_fps.unwrap();
        assert!((fps - 5.0).abs() < 0.05, "{clip}: fps {fps}");
        let want = clip_reference(clip);
        assert_eq!(v.frames.len(), want.len(), "{clip}");
        for (i, (f, w)) in v.frames.iter().zip(&want).enumerate() {
            assert_eq!((f.width, f.height), (64, 48), "{clip}");
            let diffs: Vec<i32> = f
                .rgb
                .iter()
                .zip(w)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .collect();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            let max = *diffs.iter().max().unwrap();
            // Frame order: each frame is much closer to its own reference than
            // to its neighbour's.
            if i + 1 < want.len() {
                let other: f64 = f
                    .rgb
                    .iter()
                    .zip(&want[i + 1])
                    .map(|(&a, &b)| (a as i32 - b as i32).abs() as f64)
                    .sum::<f64>()
                    / diffs.len() as f64;
                assert!(
                    other > 3.0 * mean,
                    "{clip} frame {i}: {mean} vs next {other}"
                );
            }
            eprintln!("{clip} ({decoder:?}) frame {i}: mean |diff| {mean:.3}, max {max}");
            assert!(
                mean < 2.0 && max <= 48,
                "{clip} frame {i}: mean {mean}, max {max}"
            );
        }
    }
}

/// Sampling while decoding: only the picked frames come back, and they are
/// the same pixels as a full decode.
#[test]
fn video_file_sampling_and_processing() {
    let cfg = video_config();
    let ov = VideoOverrides {
        fps: Some(2.0),
        min_pixels: Some(28 * 28 * 2),
        max_pixels: Some(28 * 28 * 6),
        ..Default::default()
    };
    let bytes = fixture("clip_vp9.webm");
    let v = decode_video(&bytes, &VideoDecodeOptions::default(), |n, fps| {
        cfg.sample_indices(n, fps, &ov)
    })
    .unwrap();
    // 10 frames at 5 fps = 2 s; 2 fps -> 4 frames.
    assert_eq!(v.frame_indices, vec![0, 2, 5, 7]);
    let full = decode_video(&bytes, &VideoDecodeOptions::default(), all).unwrap();
    for (f, &i) in v.frames.iter().zip(&v.frame_indices) {
        assert_eq!(f, &full.frames[i]);
    }
    let refs: Vec<&DecodedImage> = v.frames.iter().collect();
    let p = cfg
        .process_sampled(
            &refs,
            v.frame_indices.clone(),
            v.total_frames,
            v.source_fps,
            &ov,
        )
        .unwrap();
    assert_eq!(p.vision.grid_thw[0], 2);
    assert_eq!(p.vision.rows, p.vision.grid_thw.iter().product::<usize>());
}

#[test]
fn vp8_inter_frames_are_refused_clearly_by_the_built_in_decoder() {
    let builtin = VideoDecodeOptions {
        decoder: VideoDecoder::BuiltIn,
        ..Default::default()
    };
    let err = decode_video(&fixture("clip_vp8.webm"), &builtin, all).unwrap_err();
    assert!(matches!(err, MediaError::Unsupported(_)), "{err:?}");
    assert!(err.message().contains("VP8"), "{err}");
    // Its first frame is a key frame, so picking only that one works.
    let v = decode_video(&fixture("clip_vp8.webm"), &builtin, |_, _| Ok(vec![0])).unwrap();
    assert_eq!(v.frames.len(), 1);
}

/// A damaged packet: without frame recovery the picked frame is an error; with
/// it, the next decodable frame stands in.
#[test]
fn corrupt_video_frames_and_recovery() {
    let bytes = fixture("clip_vp8_key.webm");
    // Every VP8 packet here is a key frame starting with its 3-byte tag and
    // the start code 9d 01 2a; break the start code of the 4th one.
    let starts: Vec<usize> = bytes
        .windows(3)
        .enumerate()
        .filter(|(_, w)| *w == [0x9d, 0x01, 0x2a])
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 10, "key frame start codes");
    let mut broken = bytes.clone();
    broken[starts[3]] = 0x00;
    let builtin = VideoDecodeOptions {
        decoder: VideoDecoder::BuiltIn,
        ..Default::default()
    };
    let err = decode_video(&broken, &builtin, all).unwrap_err();
    assert!(matches!(err, MediaError::Corrupt(_)), "{err:?}");
    let rec = VideoDecodeOptions {
        frame_recovery: true,
        ..builtin.clone()
    };
    let v = decode_video(&broken, &rec, |_, _| Ok(vec![0, 3, 6])).unwrap();
    let full = decode_video(&bytes, &builtin, all).unwrap();
    assert_eq!(v.frame_indices, vec![0, 3, 6]);
    assert_eq!(v.frames[1], full.frames[4], "frame 3 replaced by frame 4");
    assert_eq!(v.frames[2], full.frames[6]);
    assert_eq!((v.recovered, v.dropped), (1, 0));
    // Frame 9 has no later frame to stand in: dropped, and counted.
    let mut last = bytes.clone();
    last[starts[9]] = 0x00;
    let v = decode_video(&last, &rec, |_, _| Ok(vec![0, 9])).unwrap();
    assert_eq!(
        (v.frame_indices.clone(), v.recovered, v.dropped),
        (vec![0], 0, 1)
    );

    // Losing more than half of the picked frames is an error, not a quiet answer.
    let mut ruined = bytes.clone();
    for &i in &starts[..6] {
        ruined[i] = 0x00;
    }
    for opts in [
        rec.clone(),
        VideoDecodeOptions {
            frame_recovery: true,
            ..Default::default()
        },
    ] {
        let err = decode_video(&ruined, &opts, |_, _| Ok(vec![0, 2, 4, 6, 8])).unwrap_err();
        assert!(
            err.message().starts_with("only 2 of the 5 sampled frames"),
            "{:?}: {err}",
            opts.decoder
        );
    }
    // ffmpeg (the default here) drops the broken frame and says how many.
    let v = decode_video(
        &broken,
        &VideoDecodeOptions {
            frame_recovery: true,
            ..Default::default()
        },
        all,
    )
    .unwrap();
    assert_eq!((v.frames.len(), v.dropped), (9, 1));
    let err = decode_video(&broken, &VideoDecodeOptions::default(), all).unwrap_err();
    assert!(
        err.message()
            .starts_with("1 of the 10 picked frames of the VP8 video cannot be decoded"),
        "{err}"
    );
}

#[test]
fn truncated_and_garbage_videos_are_errors_not_panics() {
    for clip in [
        "clip_h264.mp4",
        "clip_h264_high.mp4",
        "clip_vp9.webm",
        "clip_vp8_key.webm",
    ] {
        let bytes = fixture(clip);
        for cut in [16, 64, bytes.len() / 3, bytes.len() / 2, bytes.len() - 7] {
            match decode_video(&bytes[..cut], &VideoDecodeOptions::default(), all) {
                Ok(v) => assert!(!v.frames.is_empty()),
                Err(e) if e.message().contains("None") => panic!("{clip}[..{cut}]: {e}"),
                Err(e) => assert!(
                    matches!(
                        e,
                        MediaError::Corrupt(_) | MediaError::Unsupported(_) | MediaError::Empty(_)
                    ),
                    "{clip}[..{cut}]: {e:?}"
                ),
            }
        }
        // Flip bytes in the middle (coded data).
        let mut noisy = bytes.clone();
        for i in (bytes.len() / 2..bytes.len()).step_by(5) {
            noisy[i] ^= 0x5a;
        }
        let _ = decode_video(&noisy, &VideoDecodeOptions::default(), all);
    }
}

#[test]
fn video_limits_are_checked_before_decoding() {
    let bytes = fixture("clip_h264.mp4");
    let small = VideoDecodeOptions {
        max_pixels: 1000,
        ..Default::default()
    };
    let e = decode_video(&bytes, &small, all).unwrap_err();
    assert!(matches!(e, MediaError::Invalid(_)), "{e:?}");
    let budget = VideoDecodeOptions {
        max_output_bytes: 3 * 64 * 48 * 3,
        ..Default::default()
    };
    let e = decode_video(&bytes, &budget, all).unwrap_err();
    assert!(matches!(e, MediaError::Invalid(_)), "{e:?}");
    assert!(decode_video(&bytes, &budget, |_, _| Ok(vec![0, 5, 9])).is_ok());
}
