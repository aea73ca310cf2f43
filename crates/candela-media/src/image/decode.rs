//! Image file bytes -> RGB8, through the `image` crate (pure Rust).
//!
//! Formats: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF. Everything becomes
//! 8-bit RGB: grey is replicated, 16-bit keeps its high byte (what PIL's RGB
//! unpackers do), and alpha (RGBA, LA, palette with transparency) is composited
//! over a background colour with PIL's `Image.paste(..., mask=alpha)` rounding,
//! which is what vLLM does for RGBA. The header's width x height is checked
//! against `max_pixels`, and the decoded size reserved from the media budget,
//! before any pixel buffer exists (decompression bombs). PNG goes row by row
//! (png.rs).

use std::io::Cursor;

use ::image::error::{ImageError, LimitErrorKind};
use ::image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use std::sync::Arc;

use super::composite::over_background;
use crate::{MediaBudget, MediaError, Reservation};

/// PIL's `Image.MAX_IMAGE_PIXELS * 2`, the size above which PIL raises
/// `DecompressionBombError` instead of warning.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// How to turn an image file into RGB8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOptions {
    /// Colour that transparent pixels are composited over (vLLM's
    /// `rgba_background_color`). The caller validates user input (0..=255).
    pub rgba_background_color: [u8; 3],
    /// Largest width x height accepted, read from the header before decoding.
    pub max_pixels: u64,
    /// Rotate / flip by the EXIF orientation tag, like PIL's
    /// `ImageOps.exif_transpose`. Off by default: Hugging Face's Qwen2-VL image
    /// processor and vLLM's image loader take pixels as stored.
    pub apply_exif_orientation: bool,
    /// Memory the decoded image is reserved from, before its buffers exist
    /// (default: the process's [`MediaBudget::global`]).
    pub budget: MediaBudget,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            rgba_background_color: [255, 255, 255],
            max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            apply_exif_orientation: false,
            budget: MediaBudget::global().clone(),
        }
    }
}

/// A decoded image: interleaved RGB8, row-major, `width * height * 3` bytes.
/// A decoded file holds its pixels' share of the media budget until dropped.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    memory: Option<Arc<Reservation>>,
}

impl PartialEq for DecodedImage {
    fn eq(&self, o: &Self) -> bool {
        (self.width, self.height) == (o.width, o.height) && self.rgb == o.rgb
    }
}
impl Eq for DecodedImage {}

impl DecodedImage {
    /// Wrap raw RGB8 pixels (e.g. a decoded video frame), checking the length.
    pub fn from_rgb8(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self, MediaError> {
        if width == 0 || height == 0 {
            return Err(MediaError::Empty(format!(
                "image has no pixels ({width}x{height})"
            )));
        }
        let want = width as usize * height as usize * 3;
        if rgb.len() != want {
            return Err(MediaError::Invalid(format!(
                "RGB8 buffer for {width}x{height} must hold {want} bytes, got {}",
                rgb.len()
            )));
        }
        Ok(DecodedImage {
            width,
            height,
            rgb,
            memory: None,
        })
    }

    /// Keep `r` reserved for as long as these pixels live.
    pub(crate) fn holding(mut self, r: Reservation) -> Self {
        self.memory = Some(Arc::new(r));
        self
    }

    /// Width x height.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// The size an image of (width, height) is resized to, e.g. the processor's
/// `smart_resize`.
pub type TargetSize<'a> = &'a dyn Fn(u32, u32) -> Result<(u32, u32), MediaError>;

/// Decode an image file. Never panics: a panic inside a codec is reported as
/// `Corrupt`.
pub fn decode_image(bytes: &[u8], opts: &ImageOptions) -> Result<DecodedImage, MediaError> {
    decode_image_resized(bytes, opts, &|w, h| Ok((w, h)))
}

/// Decode an image file resized to `target(width, height)` with Pillow's
/// bicubic: the pixels of [`decode_image`] then [`super::resize_rgb8`], for
/// less memory. A PNG is resized row by row as it decodes (same pixels); a
/// baseline JPEG far larger than the target is decoded at a reduced scale
/// (jpeg.rs says when, and why the result stays close); everything else is
/// decoded whole, then resized.
pub fn decode_image_resized(
    bytes: &[u8],
    opts: &ImageOptions,
    target: TargetSize<'_>,
) -> Result<DecodedImage, MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Empty("image input is empty (0 bytes)".into()));
    }
    crate::error::guard_codec("image decoder", || decode_inner(bytes, opts, target))
}

/// The formats this build decodes, by name.
fn accepted(format: ImageFormat) -> Option<&'static str> {
    Some(match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => return None,
    })
}

fn decode_inner(
    bytes: &[u8],
    opts: &ImageOptions,
    target: TargetSize<'_>,
) -> Result<DecodedImage, MediaError> {
    let format = ::image::guess_format(bytes).map_err(|_| {
        MediaError::Unsupported(
            "not an image: no JPEG, PNG, WebP, GIF, BMP or TIFF signature found".into(),
        )
    })?;
    let name = accepted(format).ok_or_else(|| {
        MediaError::Unsupported(format!(
            "{format:?} images are not supported (accepted: JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ))
    })?;

    // PNG row by row, straight to RGB8 (EXIF orientation, rare in PNGs, goes the general way).
    if format == ImageFormat::Png && !opts.apply_exif_orientation {
        return super::png::decode_png(bytes, opts, target);
    }
    if format == ImageFormat::Jpeg && !opts.apply_exif_orientation {
        if let Some(img) = super::jpeg::decode_reduced(bytes, opts, target)? {
            return Ok(img);
        }
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits(opts.max_pixels));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_error(e, name, opts))?;

    // The header alone: refuse a bomb before the decoder allocates its output.
    let (w, h) = decoder.dimensions();
    check_pixels(w, h, opts.max_pixels)?;
    // The decoder's buffer, plus the RGB8 copy unless the decoder writes RGB8.
    let out = w as u64 * h as u64 * 3;
    let cost = if decoder.color_type() == ColorType::Rgb8 {
        out
    } else {
        decoder.total_bytes().saturating_add(out)
    };
    let mut reservation = opts
        .budget
        .reserve(cost, &format!("the {w}x{h} {name} image"))?;

    let orientation = if opts.apply_exif_orientation {
        decoder.orientation().ok()
    } else {
        None
    };
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_error(e, name, opts))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    let rgb = to_rgb8(img, opts.rgba_background_color)?;
    reservation.shrink_to(out);
    let (w, h) = (rgb.width, rgb.height);
    let (tw, th) = target(w, h)?;
    if (tw, th) == (w, h) {
        return Ok(rgb.holding(reservation));
    }
    let resized_bytes = tw as u64 * th as u64 * 3;
    let resized_memory = opts.budget.reserve(
        resized_bytes,
        &format!("the {w}x{h} {name} image resized to {tw}x{th}"),
    )?;
    let resized = super::resize::resize_rgb8(
        &rgb.rgb,
        w as usize,
        h as usize,
        tw as usize,
        th as usize,
        super::resize::ResampleKernel::Pil,
    );
    drop((rgb, reservation));
    Ok(DecodedImage::from_rgb8(tw, th, resized)?.holding(resized_memory))
}

/// Allocation limits for the decoder: the pixel cap turned into bytes for the
/// widest layout we may get (RGBA, 16 bits per channel), plus decoder slack.
fn decoder_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(
        max_pixels
            .saturating_mul(8)
            .saturating_add(64 * 1024 * 1024),
    );
    limits
}

/// Refuse images larger than `max_pixels` (or empty ones) by their declared size.
pub fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<(), MediaError> {
    if width == 0 || height == 0 {
        return Err(MediaError::Corrupt(format!(
            "image header declares no pixels ({width}x{height})"
        )));
    }
    let n = width as u64 * height as u64;
    if n > max_pixels {
        return Err(MediaError::Invalid(format!(
            "image is {width}x{height} = {n} pixels, above the limit of {max_pixels} \
             (refused before decoding: possible decompression bomb)"
        )));
    }
    Ok(())
}

fn map_error(e: ImageError, name: &str, opts: &ImageOptions) -> MediaError {
    match e {
        ImageError::Limits(l) => match l.kind() {
            LimitErrorKind::DimensionError => MediaError::Invalid(format!(
                "{name} image is larger than the limit of {} pixels",
                opts.max_pixels
            )),
            _ => MediaError::Invalid(format!(
                "{name} image needs more memory to decode than allowed ({} pixels max): {l}",
                opts.max_pixels
            )),
        },
        ImageError::Unsupported(u) => {
            MediaError::Unsupported(format!("unsupported {name} image: {u}"))
        }
        ImageError::IoError(io) => {
            MediaError::Corrupt(format!("{name} image is truncated or damaged: {io}"))
        }
        other => MediaError::Corrupt(format!("{name} image cannot be decoded: {other}")),
    }
}

/// Any decoded layout -> RGB8, compositing alpha over `bg`.
fn to_rgb8(img: DynamicImage, bg: [u8; 3]) -> Result<DecodedImage, MediaError> {
    let (width, height) = (img.width(), img.height());
    let n = width as usize * height as usize;
    let mut rgb = Vec::with_capacity(n * 3);
    match img {
        DynamicImage::ImageRgb8(b) => rgb = b.into_raw(),
        DynamicImage::ImageLuma8(b) => {
            for &l in b.as_raw() {
                rgb.extend_from_slice(&[l, l, l]);
            }
        }
        DynamicImage::ImageLumaA8(b) => {
            for p in b.as_raw().chunks_exact(2) {
                push_composited(&mut rgb, [p[0], p[0], p[0]], p[1], bg);
            }
        }
        DynamicImage::ImageRgba8(b) => {
            for p in b.as_raw().chunks_exact(4) {
                push_composited(&mut rgb, [p[0], p[1], p[2]], p[3], bg);
            }
        }
        DynamicImage::ImageLuma16(b) => {
            for &l in b.as_raw() {
                let l = hi(l);
                rgb.extend_from_slice(&[l, l, l]);
            }
        }
        DynamicImage::ImageLumaA16(b) => {
            for p in b.as_raw().chunks_exact(2) {
                let l = hi(p[0]);
                push_composited(&mut rgb, [l, l, l], hi(p[1]), bg);
            }
        }
        DynamicImage::ImageRgb16(b) => {
            rgb.extend(b.as_raw().iter().map(|&v| hi(v)));
        }
        DynamicImage::ImageRgba16(b) => {
            for p in b.as_raw().chunks_exact(4) {
                push_composited(&mut rgb, [hi(p[0]), hi(p[1]), hi(p[2])], hi(p[3]), bg);
            }
        }
        other => {
            // Float layouts (not produced by our formats today): via RGBA8.
            for p in other.to_rgba8().as_raw().chunks_exact(4) {
                push_composited(&mut rgb, [p[0], p[1], p[2]], p[3], bg);
            }
        }
    }
    DecodedImage::from_rgb8(width, height, rgb)
}

#[inline]
fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

#[inline]
fn push_composited(out: &mut Vec<u8>, fg: [u8; 3], alpha: u8, bg: [u8; 3]) {
    out.extend_from_slice(&[
        over_background(fg[0], alpha, bg[0]),
        over_background(fg[1], alpha, bg[1]),
        over_background(fg[2], alpha, bg[2]),
    ]);
}
