//! The videos people have, through the run-time ffmpeg: H.264 High with
//! B-frames and CABAC (libx264's defaults), HEVC, VP8 with inter frames, VP9
//! and AV1, in MP4 / MOV / WebM / MKV. The clips are encoded here by the same
//! ffmpeg from a synthetic source (`.ci/run` installs Debian's ffmpeg), and
//! the picked frames are compared with the source's own frames.

use std::path::PathBuf;
use std::process::Command;

use candela_media::video::{decode_video, FfmpegTools, VideoDecodeOptions, VideoDecoder};
use candela_media::MediaError;

const W: usize = 96;
const H: usize = 64;
const FRAMES: usize = 30;
const SOURCE: &str = "testsrc2=size=96x64:rate=10:duration=3";

fn tools() -> FfmpegTools {
    FfmpegTools::find()
        .expect("these tests need ffmpeg and ffprobe on PATH (apt-get install ffmpeg)")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candela-video-ffmpeg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn ffmpeg(args: &[&str]) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", SOURCE])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The source frames as RGB24.
fn source() -> Vec<Vec<u8>> {
    let raw = ffmpeg(&["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]);
    assert_eq!(raw.len(), FRAMES * W * H * 3);
    raw.chunks_exact(W * H * 3).map(<[u8]>::to_vec).collect()
}

fn encode(file: &str, codec: &[&str]) -> Vec<u8> {
    let path = tmp(file);
    let mut args = codec.to_vec();
    let p = path.to_string_lossy().into_owned();
    args.push(&p);
    ffmpeg(&args);
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    // Empty once the last encode of this process is read (fails harmlessly before).
    let _ = std::fs::remove_dir(path.parent().unwrap());
    bytes
}

fn mean_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as i32 - y as i32).abs() as f64)
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn every_common_codec_and_container_decodes_to_the_source_frames() {
    let src = source();
    let opts = VideoDecodeOptions {
        decoder: VideoDecoder::Ffmpeg(tools()),
        ..Default::default()
    };
    let picks = vec![0, 7, 13, 29];
    let x264 = ["-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p"];
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        // libx264's defaults: High profile, B-frames, CABAC.
        ("high.mp4", x264.to_vec(), "H.264"),
        ("high.mov", x264.to_vec(), "H.264"),
        ("high.mkv", x264.to_vec(), "H.264"),
        (
            "hevc.mp4",
            vec![
                "-c:v",
                "libx265",
                "-crf",
                "12",
                "-x265-params",
                "log-level=error",
                "-tag:v",
                "hvc1",
                "-pix_fmt",
                "yuv420p",
            ],
            "HEVC",
        ),
        (
            "hevc.mkv",
            vec![
                "-c:v",
                "libx265",
                "-crf",
                "12",
                "-x265-params",
                "log-level=error",
                "-pix_fmt",
                "yuv420p",
            ],
            "HEVC",
        ),
        (
            "vp8.webm",
            vec![
                "-c:v", "libvpx", "-b:v", "2M", "-crf", "8", "-g", "30", "-pix_fmt", "yuv420p",
            ],
            "VP8",
        ),
        (
            "vp9.webm",
            vec![
                "-c:v",
                "libvpx-vp9",
                "-b:v",
                "2M",
                "-crf",
                "10",
                "-pix_fmt",
                "yuv420p",
            ],
            "VP9",
        ),
        (
            "av1.mkv",
            vec![
                "-c:v",
                "libaom-av1",
                "-crf",
                "10",
                "-cpu-used",
                "8",
                "-pix_fmt",
                "yuv420p",
            ],
            "AV1",
        ),
        (
            "av1.mp4",
            vec![
                "-c:v",
                "libaom-av1",
                "-crf",
                "10",
                "-cpu-used",
                "8",
                "-pix_fmt",
                "yuv420p",
            ],
            "AV1",
        ),
    ];
    for (file, codec, name) in cases {
        let bytes = encode(file, &codec);
        let mut seen = None;
        let v = decode_video(&bytes, &opts, |n, fps| {
            seen = Some((n, fps));
            Ok(picks.clone())
        })
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let (n, fps) = seen.unwrap();
        assert_eq!(n, FRAMES, "{file}");
        assert!((fps.unwrap() - 10.0).abs() < 0.05, "{file}: fps {fps:?}");
        assert_eq!(
            (v.codec, v.total_frames, v.frame_indices.clone(), v.dropped),
            (name, FRAMES, picks.clone(), 0),
            "{file}"
        );
        for (f, &i) in v.frames.iter().zip(&picks) {
            assert_eq!((f.width as usize, f.height as usize), (W, H), "{file}");
            let own = mean_diff(&f.rgb, &src[i]);
            let next = mean_diff(&f.rgb, &src[(i + 5) % FRAMES]);
            assert!(
                own < 6.0 && next > 2.0 * own,
                "{file} frame {i}: {own:.2} vs {next:.2}"
            );
        }
    }
}

#[test]
fn the_built_in_decoder_refuses_what_ffmpeg_decodes_and_says_which_codec() {
    let bytes = encode(
        "hevc-b.mp4",
        &[
            "-c:v",
            "libx265",
            "-x265-params",
            "log-level=error",
            "-tag:v",
            "hvc1",
            "-pix_fmt",
            "yuv420p",
        ],
    );
    let builtin = VideoDecodeOptions {
        decoder: VideoDecoder::BuiltIn,
        ..Default::default()
    };
    let e = decode_video(&bytes, &builtin, |n, _| Ok((0..n).collect())).unwrap_err();
    assert!(matches!(e, MediaError::Unsupported(_)), "{e:?}");
    assert!(
        e.message()
            .starts_with("HEVC video (MP4 codec 'hvc1') is not supported by the built-in decoders"),
        "{e}"
    );
}

#[test]
fn not_a_video_and_garbage_after_a_video_signature_are_4xx() {
    let opts = VideoDecodeOptions {
        decoder: VideoDecoder::Ffmpeg(tools()),
        ..Default::default()
    };
    let e = decode_video(b"hello, world", &opts, |n, _| Ok((0..n).collect())).unwrap_err();
    assert_eq!(e.http_status(), 422);
    let mut junk = b"\x00\x00\x00\x18ftypmp42".to_vec();
    junk.extend(std::iter::repeat_n(0x5a, 4000));
    let e = decode_video(&junk, &opts, |n, _| Ok((0..n).collect())).unwrap_err();
    assert_eq!(e.http_status(), 422, "{e}");
    assert!(
        !e.message().contains("candela-video-"),
        "no temp path in: {e}"
    );
}
