//! Decoded images against the media memory budget: PNGs go row by row to
//! RGB8 (same pixels as the general path: 16-bit keeps its high byte, alpha
//! composited over the background), the decoded size is reserved before any
//! pixel buffer exists and held while the image lives, and a counting
//! allocator shows a 16-bit RGBA PNG costs about its RGB8 output.
//! (Its own test binary: the allocator counts every thread of the process.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use candela_media::image::{decode_image, over_background, ImageOptions};
use candela_media::MediaBudget;
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

struct Png {
    color: png::ColorType,
    depth: png::BitDepth,
    palette: Option<Vec<u8>>,
    trns: Option<Vec<u8>>,
}

fn encode(w: u32, h: u32, p: &Png, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = png::Encoder::new(&mut out, w, h);
    e.set_color(p.color);
    e.set_depth(p.depth);
    if let Some(pal) = &p.palette {
        e.set_palette(pal.clone());
    }
    if let Some(t) = &p.trns {
        e.set_trns(t.clone());
    }
    let mut wr = e.write_header().unwrap();
    wr.write_image_data(data).unwrap();
    wr.finish().unwrap();
    out
}

/// Deterministic bytes.
fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (s >> 16) as u8
        })
        .collect()
}

fn comp(fg: [u8; 3], a: u8, bg: [u8; 3]) -> [u8; 3] {
    [
        over_background(fg[0], a, bg[0]),
        over_background(fg[1], a, bg[1]),
        over_background(fg[2], a, bg[2]),
    ]
}

#[test]
fn png_layouts_decode_to_the_reference_rgb8() {
    use png::{BitDepth as D, ColorType as C};
    let (w, h) = (7u32, 5u32);
    let n = (w * h) as usize;
    let bg = [10, 200, 30];
    let opts = ImageOptions {
        rgba_background_color: bg,
        ..Default::default()
    };
    let plain = |color, depth| Png {
        color,
        depth,
        palette: None,
        trns: None,
    };
    // (layout, bytes per pixel, expected RGB of pixel i from its sample bytes)
    type Expect = Box<dyn Fn(&[u8]) -> [u8; 3]>;
    let cases: Vec<(Png, usize, Expect)> = vec![
        (plain(C::Rgb, D::Eight), 3, Box::new(|p| [p[0], p[1], p[2]])),
        (
            plain(C::Rgb, D::Sixteen),
            6,
            Box::new(|p| [p[0], p[2], p[4]]),
        ),
        (
            plain(C::Rgba, D::Eight),
            4,
            Box::new(move |p| comp([p[0], p[1], p[2]], p[3], bg)),
        ),
        (
            plain(C::Rgba, D::Sixteen),
            8,
            Box::new(move |p| comp([p[0], p[2], p[4]], p[6], bg)),
        ),
        (plain(C::Grayscale, D::Eight), 1, Box::new(|p| [p[0]; 3])),
        (plain(C::Grayscale, D::Sixteen), 2, Box::new(|p| [p[0]; 3])),
        (
            plain(C::GrayscaleAlpha, D::Eight),
            2,
            Box::new(move |p| comp([p[0]; 3], p[1], bg)),
        ),
        (
            plain(C::GrayscaleAlpha, D::Sixteen),
            4,
            Box::new(move |p| comp([p[0]; 3], p[2], bg)),
        ),
    ];
    for (seed, (layout, bpp, expect)) in cases.into_iter().enumerate() {
        let data = noise(n * bpp, seed as u32);
        let img = decode_image(&encode(w, h, &layout, &data), &opts).unwrap();
        let want: Vec<u8> = data.chunks_exact(bpp).flat_map(expect).collect();
        assert_eq!(img.rgb, want, "{:?} {:?}", layout.color, layout.depth);
    }

    // A palette with transparency (tRNS shorter than the palette: the rest opaque).
    let palette = noise(4 * 3, 99);
    let trns = vec![0u8, 128];
    let idx: Vec<u8> = (0..n).map(|i| (i % 4) as u8).collect();
    let layout = Png {
        color: C::Indexed,
        depth: D::Eight,
        palette: Some(palette.clone()),
        trns: Some(trns.clone()),
    };
    let img = decode_image(&encode(w, h, &layout, &idx), &opts).unwrap();
    let want: Vec<u8> = idx
        .iter()
        .flat_map(|&i| {
            let i = i as usize;
            let rgb = [palette[3 * i], palette[3 * i + 1], palette[3 * i + 2]];
            comp(rgb, trns.get(i).copied().unwrap_or(255), bg)
        })
        .collect();
    assert_eq!(img.rgb, want, "palette + tRNS");

    // 1-bit grey: 0 -> black, 1 -> white; 8 pixels a byte, rows padded.
    let row_bytes = (w as usize).div_ceil(8);
    let bits = noise(row_bytes * h as usize, 7);
    let img = decode_image(&encode(w, h, &plain(C::Grayscale, D::One), &bits), &opts).unwrap();
    for y in 0..h as usize {
        for x in 0..w as usize {
            let on = bits[y * row_bytes + x / 8] >> (7 - x % 8) & 1 == 1;
            let v = if on { 255 } else { 0 };
            assert_eq!(
                &img.rgb[(y * w as usize + x) * 3..][..3],
                &[v, v, v],
                "1-bit ({x}, {y})"
            );
        }
    }
}

#[test]
fn a_truncated_png_is_corrupt_not_short() {
    use png::{BitDepth as D, ColorType as C};
    let bytes = encode(
        64,
        64,
        &Png {
            color: C::Rgb,
            depth: D::Eight,
            palette: None,
            trns: None,
        },
        &noise(64 * 64 * 3, 1),
    );
    let e = decode_image(&bytes[..bytes.len() / 2], &ImageOptions::default()).unwrap_err();
    assert_eq!(e.http_status(), 422, "{e}");
}

#[test]
fn the_decoded_size_is_reserved_while_the_image_lives_and_refused_above_the_item_share() {
    use png::{BitDepth as D, ColorType as C};
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let budget = MediaBudget::new(1 << 20, 1 << 19, 4, Duration::from_millis(20));
    let opts = ImageOptions {
        budget: budget.clone(),
        ..Default::default()
    };
    let rgba16 = Png {
        color: C::Rgba,
        depth: D::Sixteen,
        palette: None,
        trns: None,
    };
    let img = decode_image(&encode(200, 100, &rgba16, &vec![0; 200 * 100 * 8]), &opts).unwrap();
    assert_eq!(
        budget.in_use(),
        200 * 100 * 3,
        "the RGB8 output, nothing else"
    );
    let copy = img.clone();
    drop(img);
    assert_eq!(budget.in_use(), 200 * 100 * 3, "a clone keeps it");
    drop(copy);
    assert_eq!(budget.in_use(), 0);

    // 500 x 400 x 3 = 600000 bytes > the 512 KiB item share: refused from the header.
    let e = decode_image(&encode(500, 400, &rgba16, &vec![0; 500 * 400 * 8]), &opts).unwrap_err();
    assert_eq!(e.http_status(), 413);
    assert_eq!(
        e.message(),
        "the 500x400 PNG image needs 0.6 MiB to decode, above the per-item media memory limit of 0.5 MiB \
         (half of --media-memory-budget); send it smaller"
    );
    // The general path (JPEG) reserves too.
    let mut jpg = Vec::new();
    ::image::DynamicImage::new_rgb8(600, 400)
        .write_to(
            &mut std::io::Cursor::new(&mut jpg),
            ::image::ImageFormat::Jpeg,
        )
        .unwrap();
    assert_eq!(decode_image(&jpg, &opts).unwrap_err().http_status(), 413);

    // A full budget: a second image waits, then 503; once the first is gone, it fits.
    let small = MediaBudget::new(200_000, 200_000, 4, Duration::from_millis(20));
    let opts = ImageOptions {
        budget: small.clone(),
        ..Default::default()
    };
    let png = encode(300, 200, &rgba16, &vec![0; 300 * 200 * 8]);
    let held = decode_image(&png, &opts).unwrap();
    let e = decode_image(&png, &opts).unwrap_err();
    assert_eq!(e.http_status(), 503, "{e}");
    drop(held);
    assert!(decode_image(&png, &opts).is_ok());
    assert_eq!(small.in_use(), 0);
}

#[test]
fn a_16_bit_rgba_png_costs_about_its_rgb8_output() {
    use png::{BitDepth as D, ColorType as C};
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (w, h) = (3000u32, 2000u32);
    let bytes = encode(
        w,
        h,
        &Png {
            color: C::Rgba,
            depth: D::Sixteen,
            palette: None,
            trns: None,
        },
        &vec![0; (w * h * 8) as usize],
    );
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let img = decode_image(&bytes, &ImageOptions::default()).unwrap();
    let grew = PEAK.load(Ordering::SeqCst) - before;
    let out = (w * h * 3) as usize;
    assert_eq!(img.rgb.len(), out);
    // The output plus decoder buffers of a few rows; a full 16-bit RGBA
    // frame (48 MB here) would come on top of the 18 MB output.
    assert!(
        grew < out + (2 << 20),
        "allocated {grew} bytes for an {out}-byte output"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    /// The row decoder on damaged PNGs of every layout: an image or a 4xx,
    /// and the reservation always given back.
    #[test]
    fn mutated_pngs_decode_or_fail_cleanly_and_free_their_reservation(
        layout in 0usize..5,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        cut in proptest::option::of(any::<usize>()),
    ) {
        use png::{BitDepth as D, ColorType as C};
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (color, depth, bpp) = [(C::Rgba, D::Sixteen, 8), (C::Rgb, D::Eight, 3), (C::GrayscaleAlpha, D::Eight, 2), (C::Grayscale, D::Sixteen, 2), (C::Rgb, D::Sixteen, 6)][layout];
        let mut bytes = encode(33, 17, &Png { color, depth, palette: None, trns: None }, &noise(33 * 17 * bpp, layout as u32));
        let n = bytes.len();
        for (at, v) in edits {
            bytes[at % n] ^= v | 1;
        }
        if let Some(c) = cut {
            bytes.truncate(c % n + 1);
        }
        let budget = MediaBudget::new(1 << 20, 1 << 20, 1, Duration::from_millis(10));
        let opts = ImageOptions { budget: budget.clone(), ..Default::default() };
        match decode_image(&bytes, &opts) {
            Ok(img) => prop_assert_eq!(img.rgb.len(), img.width as usize * img.height as usize * 3),
            Err(e) => prop_assert!((400..500).contains(&e.http_status()), "{e:?}"),
        }
        prop_assert_eq!(budget.in_use(), 0);
    }
}
