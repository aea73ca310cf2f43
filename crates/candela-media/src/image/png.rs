//! PNG straight to RGB8, row by row: 16-bit samples are cut to their high
//! byte and alpha is composited as each row comes out of the decoder, so an
//! image costs its RGB8 output (3 bytes a pixel) and one row, not a full
//! 16-bit RGBA buffer (8 bytes a pixel) and then the RGB8 copy. The pixels
//! are the same as `decode.rs`'s path through the `image` crate.
//! Interlaced (Adam7) images arrive in seven passes; those are decoded whole
//! at 8 bits first. With a target size (the processor's), each row goes
//! through the resizer as it comes, so only the resized image and the
//! resizer's first pass are ever held (resize.rs `RowResizer`, same pixels).

use std::io::Cursor;

use png::{ColorType, Decoder, DecodingError, Transformations};

use super::composite::over_background;
use super::decode::{check_pixels, DecodedImage, ImageOptions, TargetSize};
use super::resize::{ResampleKernel, RowResizer};
use crate::MediaError;

/// Decode, resized to `target(width, height)` with Pillow's bicubic.
pub(super) fn decode_png(
    bytes: &[u8],
    opts: &ImageOptions,
    target: TargetSize<'_>,
) -> Result<DecodedImage, MediaError> {
    let mut decoder = Decoder::new_with_limits(
        Cursor::new(bytes),
        // The decoder's own buffers (rows, chunks, an interlaced frame); the
        // output is accounted by the media budget.
        png::Limits {
            bytes: usize::try_from(opts.max_pixels.saturating_mul(4))
                .unwrap_or(usize::MAX)
                .saturating_add(64 << 20),
        },
    );
    decoder.set_transformations(Transformations::EXPAND | Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(png_error)?;
    let (w, h) = reader.info().size();
    check_pixels(w, h, opts.max_pixels)?;
    let interlaced = reader.info().interlaced;
    let (color, _) = reader.output_color_type();
    let line = reader.output_line_size(w).ok_or_else(too_wide)?;
    let (tw, th) = target(w, h)?;
    let (wu, hu, twu, thu) = (w as usize, h as usize, tw as usize, th as usize);
    let out = tw as u64 * th as u64 * 3;
    let same = (tw, th) == (w, h);
    // Besides the output: the decoder's frame (interlaced) or row, and when
    // resizing, one RGB8 row and the row resizer's buffers.
    let frame = if interlaced {
        reader.output_buffer_size().ok_or_else(too_wide)?
    } else {
        line
    };
    let scratch = if same {
        0
    } else {
        w as u64 * 3 + RowResizer::scratch_bytes(wu, hu, twu, thu, ResampleKernel::Pil)
    };
    let what = if same {
        format!("the {w}x{h} PNG image")
    } else {
        format!("the {w}x{h} PNG image (resized to {tw}x{th})")
    };
    let mut reservation = opts.budget.reserve(out + frame as u64 + scratch, &what)?;
    let bg = opts.rgba_background_color;
    let mut resizer = RowResizer::new(wu, hu, twu, thu, ResampleKernel::Pil).map_err(|_| {
        MediaError::TooLarge(format!(
            "the {w}x{h} PNG image needs {out} bytes as RGB, more than this machine can allocate"
        ))
    })?;
    let mut row_rgb = Vec::with_capacity(wu * 3);
    let mut rows = 0usize;
    let mut feed = |row: &[u8]| -> Result<(), MediaError> {
        row_rgb.clear();
        push_row(&mut row_rgb, row, color, bg);
        if row_rgb.len() != wu * 3 {
            return Err(truncated(rows, h));
        }
        resizer.push(&row_rgb);
        rows += 1;
        Ok(())
    };
    if interlaced {
        let mut buf = vec![0u8; frame];
        reader.next_frame(&mut buf).map_err(png_error)?;
        for row in buf.chunks_exact(line) {
            feed(row)?;
        }
    } else {
        while let Some(row) = reader.next_row().map_err(png_error)? {
            feed(row.data())?;
        }
    }
    if rows != hu {
        return Err(truncated(rows, h));
    }
    let rgb = resizer.finish();
    reservation.shrink_to(out);
    Ok(DecodedImage::from_rgb8(tw, th, rgb)?.holding(reservation))
}

fn truncated(rows: usize, h: u32) -> MediaError {
    MediaError::Corrupt(format!("PNG image is truncated: {rows} of its {h} rows"))
}

/// One decoded row (8 bits a sample, palette expanded) -> RGB8.
fn push_row(out: &mut Vec<u8>, row: &[u8], color: ColorType, bg: [u8; 3]) {
    match color {
        ColorType::Rgb => out.extend_from_slice(row),
        ColorType::Grayscale => {
            for &l in row {
                out.extend_from_slice(&[l, l, l]);
            }
        }
        ColorType::GrayscaleAlpha => {
            for p in row.chunks_exact(2) {
                out.extend_from_slice(&[
                    over_background(p[0], p[1], bg[0]),
                    over_background(p[0], p[1], bg[1]),
                    over_background(p[0], p[1], bg[2]),
                ]);
            }
        }
        // EXPAND turns a palette into RGB or RGBA: no indices come out (and
        // if they did, the short output is reported as truncated).
        ColorType::Indexed => {}
        ColorType::Rgba => {
            for p in row.chunks_exact(4) {
                out.extend_from_slice(&[
                    over_background(p[0], p[3], bg[0]),
                    over_background(p[1], p[3], bg[1]),
                    over_background(p[2], p[3], bg[2]),
                ]);
            }
        }
    }
}

fn too_wide() -> MediaError {
    MediaError::TooLarge("PNG image rows are larger than this machine can address".into())
}

fn png_error(e: DecodingError) -> MediaError {
    match e {
        DecodingError::IoError(io) => {
            MediaError::Corrupt(format!("PNG image is truncated or damaged: {io}"))
        }
        DecodingError::Format(f) => {
            MediaError::Corrupt(format!("PNG image cannot be decoded: {f}"))
        }
        DecodingError::Parameter(p) => {
            MediaError::Corrupt(format!("PNG image cannot be decoded: {p}"))
        }
        DecodingError::LimitsExceeded => MediaError::TooLarge(
            "PNG image needs more memory to decode than its size allows".into(),
        ),
    }
}
