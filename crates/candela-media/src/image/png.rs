//! PNG straight to RGB8, row by row: 16-bit samples are cut to their high
//! byte and alpha is composited as each row comes out of the decoder, so an
//! image costs its RGB8 output (3 bytes a pixel) and one row, not a full
//! 16-bit RGBA buffer (8 bytes a pixel) and then the RGB8 copy. The pixels
//! are the same as `decode.rs`'s path through the `image` crate.
//! Interlaced (Adam7) images arrive in seven passes; those are decoded whole
//! at 8 bits first.

use std::io::Cursor;

use png::{ColorType, Decoder, DecodingError, Transformations};

use super::composite::over_background;
use super::decode::{check_pixels, DecodedImage, ImageOptions};
use crate::MediaError;

pub(super) fn decode_png(bytes: &[u8], opts: &ImageOptions) -> Result<DecodedImage, MediaError> {
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
    let out = w as u64 * h as u64 * 3;
    let frame = if interlaced {
        reader.output_buffer_size().ok_or_else(too_wide)?
    } else {
        line
    };
    let mut reservation = opts
        .budget
        .reserve(out + frame as u64, &format!("the {w}x{h} PNG image"))?;

    let mut rgb = Vec::new();
    rgb.try_reserve_exact(out as usize).map_err(|_| {
        MediaError::TooLarge(format!(
            "the {w}x{h} PNG image needs {out} bytes as RGB, more than this machine can allocate"
        ))
    })?;
    let bg = opts.rgba_background_color;
    if interlaced {
        let mut buf = vec![0u8; frame];
        reader.next_frame(&mut buf).map_err(png_error)?;
        for row in buf.chunks_exact(line) {
            push_row(&mut rgb, row, color, bg);
        }
    } else {
        while let Some(row) = reader.next_row().map_err(png_error)? {
            push_row(&mut rgb, row.data(), color, bg);
        }
    }
    if rgb.len() as u64 != out {
        return Err(MediaError::Corrupt(format!(
            "PNG image is truncated: {} of its {h} rows",
            rgb.len() as u64 / (w as u64 * 3)
        )));
    }
    reservation.shrink_to(out);
    Ok(DecodedImage::from_rgb8(w, h, rgb)?.holding(reservation))
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
