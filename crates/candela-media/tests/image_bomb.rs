//! Decompression bombs: a header declaring a huge image is refused from the
//! header alone. A counting allocator proves no pixel buffer was allocated.
//! (Its own test binary: the allocator counts every thread of the process.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candela_media::image::{decode_image, ImageOptions};
use candela_media::MediaError;

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

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A valid PNG header for a w x h RGBA image with a few bytes of (unfinished)
/// zlib data: only the header says how big it is.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x62, 0x60, 0x18, 0x05]);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn gif_header(w: u16, h: u16) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
    g.extend_from_slice(&[0x2c, 0, 0, 0, 0]);
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.extend_from_slice(&[0, 2, 2, 0x4c, 0x01, 0, 0x3b]);
    g
}

fn bmp_header(w: i32, h: i32) -> Vec<u8> {
    let mut b = b"BM".to_vec();
    b.extend_from_slice(&(54u32 + 16).to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    b.extend_from_slice(&[0; 16]);
    b
}

/// The small JPEG fixture with its SOF0 size patched: a real stream whose
/// header lies.
fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/vision/small.jpg");
    let mut j = std::fs::read(p).unwrap();
    let sof = j.windows(2).position(|m| m == [0xFF, 0xC0]).expect("SOF0");
    j[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    j[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    j
}

#[test]
fn bomb_headers_are_refused_without_allocating_pixels() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("png 40000x40000", png_header(40000, 40000)),
        ("png 100000x2000", png_header(100_000, 2000)),
        ("gif 65535x65535", gif_header(65535, 65535)),
        ("bmp 30000x30000", bmp_header(30000, 30000)),
        ("jpeg 65000x65000", jpeg_header(65000, 65000)),
    ];
    for (what, bytes) in cases {
        let before = CURRENT.load(Ordering::SeqCst);
        PEAK.store(before, Ordering::SeqCst);
        let r = decode_image(&bytes, &ImageOptions::default());
        let grew = PEAK.load(Ordering::SeqCst) - before;
        let e = r.unwrap_err();
        eprintln!("{what}: {e} (peak extra allocation {grew} bytes)");
        assert!(matches!(e, MediaError::Invalid(_)), "{what}: {e:?}");
        assert!(e.message().contains("limit"), "{what}: {e}");
        assert_eq!(e.http_status(), 400);
        // Far below one row of pixels for most, and 16 MB in all cases.
        assert!(grew < 16 << 20, "{what}: allocated {grew} bytes");
    }

    // A lower limit applies to ordinary sizes too.
    let small = ImageOptions {
        max_pixels: 1000,
        ..Default::default()
    };
    let e = decode_image(&png_header(40, 30), &small).unwrap_err();
    assert!(matches!(e, MediaError::Invalid(_)), "{e:?}");
    // Under the limit, the same crafted header fails as a truncated image.
    let e = decode_image(&png_header(40, 30), &ImageOptions::default()).unwrap_err();
    assert!(matches!(e, MediaError::Corrupt(_)), "{e:?}");
}
