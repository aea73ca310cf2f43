//! Decoding straight to the processor's target size (`decode_image_resized`):
//! PNGs are resized row by row with the same pixels as decoding whole then
//! resizing; a baseline JPEG far larger than its target is decoded at a DCT
//! scale and stays within a fraction of a grey level of the full path; images
//! of ordinary size take the exact path. A counting allocator shows a huge
//! image costs about its reduced size. (Its own test binary: the allocator
//! counts every thread of the process.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ::image::codecs::jpeg::JpegEncoder;
use ::image::ImageEncoder;
use candela_media::image::{
    decode_image, decode_image_resized, resize_rgb8, ImageOptions, ResampleKernel,
    REDUCE_ABOVE_PIXELS,
};
use candela_media::MediaError;
use proptest::prelude::*;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static A: Counting = Counting;
/// The allocation peak is process-wide: tests that measure it run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Bytes allocated at the peak of `f`, above what was held before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

/// A smooth photo-like RGB pattern with some fine texture.
fn photo(w: usize, h: usize) -> Vec<u8> {
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let tex = ((x * 7 + y * 13) % 17) as f32;
            px.push((255.0 * fx * 0.8 + tex) as u8);
            px.push((255.0 * (1.0 - fy) * 0.7 + tex) as u8);
            px.push((128.0 + 100.0 * (fx * 9.0 + fy * 5.0).sin()) as u8);
        }
    }
    px
}

fn jpeg(w: usize, h: usize, px: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(px, w as u32, h as u32, ::image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn png_rgba16(w: usize, h: usize, interlaced: bool) -> Vec<u8> {
    let data: Vec<u8> = (0..w * h * 8).map(|i| ((i * 31) ^ (i / 7)) as u8).collect();
    if !interlaced {
        let mut out = Vec::new();
        let mut e = png::Encoder::new(Cursor::new(&mut out), w as u32, h as u32);
        e.set_color(png::ColorType::Rgba);
        e.set_depth(png::BitDepth::Sixteen);
        let mut wr = e.write_header().unwrap();
        wr.write_image_data(&data).unwrap();
        wr.finish().unwrap();
        return out;
    }
    // The png crate writes no Adam7: the seven passes by hand, stored
    // (uncompressed) in zlib.
    let mut raw = Vec::new();
    for (r0, c0, dr, dc) in [
        (0, 0, 8, 8),
        (0, 4, 8, 8),
        (4, 0, 8, 4),
        (0, 2, 4, 4),
        (2, 0, 4, 2),
        (0, 1, 2, 2),
        (1, 0, 2, 1),
    ] {
        if w <= c0 || h <= r0 {
            continue;
        }
        for y in (r0..h).step_by(dr) {
            raw.push(0);
            for x in (c0..w).step_by(dc) {
                raw.extend_from_slice(&data[(y * w + x) * 8..(y * w + x + 1) * 8]);
            }
        }
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 1]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, body) in [(b"IHDR", ihdr), (b"IDAT", z), (b"IEND", Vec::new())] {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(&body);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in bytes {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The processor's way: decode whole, then Pillow's bicubic.
fn full_path(bytes: &[u8], tw: u32, th: u32) -> Vec<u8> {
    let d = decode_image(bytes, &ImageOptions::default()).unwrap();
    resize_rgb8(
        &d.rgb,
        d.width as usize,
        d.height as usize,
        tw as usize,
        th as usize,
        ResampleKernel::Pil,
    )
}

#[test]
fn pngs_resized_row_by_row_have_the_same_pixels() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for interlaced in [false, true] {
        let png = png_rgba16(97, 61, interlaced);
        // Both of Pillow's pass orders, one pass, none, and upscaling.
        for (tw, th) in [
            (28, 28),
            (84, 14),
            (14, 56),
            (97, 28),
            (56, 61),
            (97, 61),
            (140, 112),
        ] {
            let got =
                decode_image_resized(&png, &ImageOptions::default(), &|_, _| Ok((tw, th))).unwrap();
            assert_eq!((got.width, got.height), (tw, th));
            assert_eq!(
                got.rgb,
                full_path(&png, tw, th),
                "{tw}x{th} interlaced={interlaced}"
            );
        }
    }
}

#[test]
fn a_huge_png_costs_about_its_output_not_its_decoded_size() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 6000 x 6000 16-bit RGBA: 108 MB as RGB8, 288 MB as decoded.
    let (w, h) = (6000usize, 6000usize);
    let mut out = Vec::new();
    let mut e = png::Encoder::new(Cursor::new(&mut out), w as u32, h as u32);
    e.set_color(png::ColorType::Rgba);
    e.set_depth(png::BitDepth::Sixteen);
    e.set_compression(png::Compression::Fast);
    let mut wr = e.write_header().unwrap();
    wr.write_image_data(&vec![0x40; w * h * 8]).unwrap();
    wr.finish().unwrap();
    let (img, peak) = peak_of(|| {
        decode_image_resized(&out, &ImageOptions::default(), &|_, _| Ok((448, 448))).unwrap()
    });
    assert_eq!((img.width, img.height), (448, 448));
    // The first pass (448 x 6000 RGB8, 8 MB), rows, the output.
    assert!(peak < 12 << 20, "peak {} MB", peak >> 20);
}

#[test]
fn a_huge_jpeg_is_decoded_at_a_dct_scale_within_a_grey_level_of_the_full_path() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (w, h) = (4608usize, 4096usize);
    assert!((w * h) as u64 >= REDUCE_ABOVE_PIXELS);
    let bytes = jpeg(w, h, &photo(w, h));
    // 1/8 scale leaves 576 x 512, twice the target on each side.
    let (tw, th) = (280u32, 252u32);
    let (img, peak) = peak_of(|| {
        decode_image_resized(&bytes, &ImageOptions::default(), &|_, _| Ok((tw, th))).unwrap()
    });
    assert_eq!((img.width, img.height), (tw, th));
    // Full size is 57 MB as RGB8 (more inside the decoder); 1/8 scale, about 5 MB.
    assert!(peak < 8 << 20, "peak {} MB", peak >> 20);
    let full = full_path(&bytes, tw, th);
    let diffs: Vec<u32> = img
        .rgb
        .iter()
        .zip(&full)
        .map(|(&a, &b)| (a as i32 - b as i32).unsigned_abs())
        .collect();
    let mean = diffs.iter().sum::<u32>() as f64 / diffs.len() as f64;
    let max = *diffs.iter().max().unwrap();
    eprintln!("1/8-scale JPEG vs full decode: mean |diff| {mean:.3}, max {max}");
    assert!(mean < 1.0 && max <= 12, "mean {mean}, max {max}");
}

#[test]
fn ordinary_jpegs_take_the_exact_path() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Far larger than its target but below REDUCE_ABOVE_PIXELS: decoded whole.
    let (w, h) = (1024usize, 768usize);
    let bytes = jpeg(w, h, &photo(w, h));
    for (tw, th) in [(112, 84), (1008, 756), (28, 28)] {
        let got =
            decode_image_resized(&bytes, &ImageOptions::default(), &|_, _| Ok((tw, th))).unwrap();
        assert_eq!(got.rgb, full_path(&bytes, tw, th), "{tw}x{th}");
    }
}

#[test]
fn the_target_sees_the_stored_size_and_its_errors_pass_through() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let png = png_rgba16(30, 20, false);
    let e = decode_image_resized(&png, &ImageOptions::default(), &|w, h| {
        Err(MediaError::Invalid(format!("saw {w}x{h}")))
    })
    .unwrap_err();
    assert_eq!(e.message(), "saw 30x20");
}

/// A small JPEG whose frame header declares `w x h` (the scan is short).
fn declaring(w: u16, h: u16) -> Vec<u8> {
    let px = photo(64, 48);
    let mut bytes = jpeg(64, 48, &px);
    let sof = bytes.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// The reduced JPEG path on damaged input: pixels of the target size or
    /// a 4xx, never a panic.
    #[test]
    fn damaged_huge_jpegs_are_pixels_or_a_4xx(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..12),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = declaring(4800, 4000);
        let n = bytes.len();
        for (at, v) in edits {
            bytes[at % n] ^= v | 1;
        }
        if let Some(c) = cut {
            bytes.truncate(c % n + 1);
        }
        match decode_image_resized(&bytes, &ImageOptions::default(), &|_, _| Ok((56, 56))) {
            Ok(img) => prop_assert_eq!(img.rgb.len(), 56 * 56 * 3),
            Err(e) => prop_assert!((400..500).contains(&e.http_status()), "{e:?}"),
        }
    }
}
