//! Video: frame sampling, the Qwen2-VL video processor, and MP4 / WebM file
//! decoding into the frames it samples.

mod decode;
mod ffmpeg;
mod qwen2_vl;
mod sample;
#[cfg_attr(not(feature = "video-files"), allow(dead_code))]
mod yuv;

pub use decode::{decode_video, DecodedVideo, VideoDecodeOptions, VideoDecoder};
pub use ffmpeg::{FfmpegTools, FFMPEG_ENV};
pub use qwen2_vl::{ProcessedVideo, Qwen2VlVideoConfig, VideoOverrides};
pub use sample::{sample_frame_indices, FrameSampling};
