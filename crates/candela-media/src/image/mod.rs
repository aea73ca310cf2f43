//! Images: bytes -> RGB8 (with decompression-bomb and alpha handling), the
//! PIL / torch bicubic resamplers, and the Qwen2-VL image processor.

mod composite;
mod decode;
mod jpeg;
mod png;
mod qwen2_vl;
mod resize;

pub use composite::over_background;
pub use decode::{
    check_pixels, decode_image, decode_image_resized, DecodedImage, ImageOptions, TargetSize,
    DEFAULT_MAX_IMAGE_PIXELS,
};
pub use jpeg::REDUCE_ABOVE_PIXELS;
pub use qwen2_vl::{
    num_placeholder_tokens, smart_resize, ImageOverrides, ProcessedVision, Qwen2VlProcessorConfig,
};
pub use resize::{resize_rgb8, ResampleKernel};

pub(crate) use qwen2_vl::{patchify, RawConfig};
