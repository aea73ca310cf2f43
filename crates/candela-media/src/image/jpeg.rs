//! A JPEG far larger than its target size, decoded at 1/2, 1/4 or 1/8 scale
//! (DCT scaling: each 8x8 block's inverse DCT keeps only its lowest
//! frequencies), then resized to the target with Pillow's bicubic. A huge
//! photo then costs about its reduced size rather than 3 bytes a pixel.
//!
//! The pixels differ from the reference's (PIL decodes at full size, then
//! resizes), so this path is kept to images where that difference drowns in
//! the resize: at least [`REDUCE_ABOVE_PIXELS`] pixels (a 4096x4096 photo, far
//! above what any test fixture or the default processor sizes need) and a
//! reduced image still at least [`MARGIN`] times the target on both sides.
//! Each output pixel then averages at least `MARGIN^2` reduced pixels, each
//! itself a low-pass of its block, where the full path averages the same area
//! with a smooth kernel: the difference is a fraction of a grey level on
//! average (tests/image_reduce.rs measures it). Progressive JPEGs keep every
//! coefficient while decoding whatever the scale, so they take the full path.

use std::io::Cursor;

use jpeg_decoder::{CodingProcess, Decoder, PixelFormat};

use super::decode::{check_pixels, DecodedImage, ImageOptions, TargetSize};
use super::resize::{resize_rgb8, ResampleKernel};
use crate::MediaError;

/// Images below this many pixels are always decoded at full size.
pub const REDUCE_ABOVE_PIXELS: u64 = 4096 * 4096;
/// The reduced image keeps at least this many pixels per target pixel, per side.
const MARGIN: u32 = 2;

/// The reduced decode, or None where it does not apply (small, progressive,
/// CMYK or 16-bit, not far larger than the target, unreadable header: the
/// full path decodes or reports those).
pub(super) fn decode_reduced(
    bytes: &[u8],
    opts: &ImageOptions,
    target: TargetSize<'_>,
) -> Result<Option<DecodedImage>, MediaError> {
    let mut d = Decoder::new(Cursor::new(bytes));
    if d.read_info().is_err() {
        return Ok(None);
    }
    let Some(info) = d.info() else {
        return Ok(None);
    };
    let (w, h) = (info.width as u32, info.height as u32);
    let channels = match info.pixel_format {
        PixelFormat::L8 => 1u64,
        PixelFormat::RGB24 => 3,
        PixelFormat::L16 | PixelFormat::CMYK32 => return Ok(None),
    };
    if (w as u64 * h as u64) < REDUCE_ABOVE_PIXELS
        || info.coding_process != CodingProcess::DctSequential
    {
        return Ok(None);
    }
    check_pixels(w, h, opts.max_pixels)?;
    let (tw, th) = target(w, h)?;
    let Some(k) = [8u32, 4, 2]
        .into_iter()
        .find(|k| w / k >= MARGIN * tw && h / k >= MARGIN * th)
    else {
        return Ok(None);
    };
    let (rw, rh) = (w.div_ceil(k), h.div_ceil(k));
    // The decoder's planes and output at the reduced size, its RGB8 copy, the result.
    let reduced = rw as u64 * rh as u64;
    let out = tw as u64 * th as u64 * 3;
    let mut reservation = opts.budget.reserve(
        reduced * channels * 2 + reduced * 3 + out,
        &format!("the {w}x{h} JPEG image (decoded at 1/{k} scale)"),
    )?;
    d.set_max_decoding_buffer_size(usize::try_from(reduced * channels * 2).unwrap_or(usize::MAX));
    let (sw, sh) = d
        .scale(rw as u16, rh as u16)
        .map_err(|e| MediaError::Corrupt(format!("JPEG image cannot be decoded: {e}")))?;
    let (sw, sh) = (sw as usize, sh as usize);
    let pixels = d
        .decode()
        .map_err(|e| MediaError::Corrupt(format!("JPEG image cannot be decoded: {e}")))?;
    if pixels.len() != sw * sh * channels as usize {
        return Err(MediaError::Corrupt(format!(
            "JPEG image is truncated: {} of its {} bytes at 1/{k} scale",
            pixels.len(),
            sw * sh * channels as usize
        )));
    }
    let rgb = if channels == 1 {
        pixels.iter().flat_map(|&l| [l, l, l]).collect()
    } else {
        pixels
    };
    let resized = resize_rgb8(&rgb, sw, sh, tw as usize, th as usize, ResampleKernel::Pil);
    drop(rgb);
    reservation.shrink_to(out);
    Ok(Some(
        DecodedImage::from_rgb8(tw, th, resized)?.holding(reservation),
    ))
}
