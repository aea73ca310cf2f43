//! Image decoding: options, layouts, and hostile input (corrupt, truncated,
//! random and mutated bytes) giving errors of the right kind, never panics.

use std::io::Cursor;
use std::path::PathBuf;

use ::image::{ImageBuffer, ImageEncoder, Luma, Rgb, Rgba};
use candela_media::image::{decode_image, ImageOptions};
use candela_media::MediaError;
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/vision")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const FILES: [&str; 10] = [
    "rgba_alpha.png",
    "la.png",
    "palette.gif",
    "small.jpg",
    "lossless.webp",
    "lossy.webp",
    "rgb.bmp",
    "rgb.tiff",
    "tall.png",
    "photo_1024x768.jpg",
];

fn png_bytes(img: ::image::DynamicImage) -> Vec<u8> {
    let mut c = Cursor::new(Vec::new());
    img.write_to(&mut c, ::image::ImageFormat::Png).unwrap();
    c.into_inner()
}

#[test]
fn background_colour_is_used_for_transparency() {
    let bytes = fixture("rgba_alpha.png");
    let white = decode_image(&bytes, &ImageOptions::default()).unwrap();
    let black = decode_image(
        &bytes,
        &ImageOptions {
            rgba_background_color: [0, 0, 0],
            ..Default::default()
        },
    )
    .unwrap();
    // (12, 7) is in the fully transparent hole; (35, 30) is opaque.
    let at = |img: &candela_media::image::DecodedImage, x: usize, y: usize| {
        let i = (y * img.width as usize + x) * 3;
        [img.rgb[i], img.rgb[i + 1], img.rgb[i + 2]]
    };
    assert_eq!(at(&white, 7, 12), [255, 255, 255]);
    assert_eq!(at(&black, 7, 12), [0, 0, 0]);
    assert_eq!(at(&white, 35, 30), at(&black, 35, 30));
    let green = decode_image(
        &bytes,
        &ImageOptions {
            rgba_background_color: [0, 255, 0],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(at(&green, 7, 12), [0, 255, 0]);
}

#[test]
fn sixteen_bit_and_grey_layouts_become_rgb8() {
    let grey16 = ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(5, 3, |x, y| {
        Luma([(x * 4000 + y * 300) as u16 + 0x1234])
    });
    let d = decode_image(&png_bytes(grey16.into()), &ImageOptions::default()).unwrap();
    assert_eq!((d.width, d.height, d.rgb.len()), (5, 3, 45));
    let v = ((4000u32 + 0x1234) >> 8) as u8;
    assert_eq!(&d.rgb[3..6], &[v, v, v]);

    let rgba16 = ImageBuffer::<Rgba<u16>, Vec<u16>>::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgba([0xFFFF, 0x8000, 0x0100, 0xFFFF])
        } else {
            Rgba([0xFFFF, 0xFFFF, 0xFFFF, 0])
        }
    });
    let d = decode_image(
        &png_bytes(rgba16.into()),
        &ImageOptions {
            rgba_background_color: [1, 2, 3],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(d.rgb, vec![255, 128, 1, 1, 2, 3]);

    let grey8 = ImageBuffer::<Luma<u8>, Vec<u8>>::from_fn(3, 2, |x, _| Luma([x as u8 * 100]));
    let d = decode_image(&png_bytes(grey8.into()), &ImageOptions::default()).unwrap();
    assert_eq!(&d.rgb[..9], &[0, 0, 0, 100, 100, 100, 200, 200, 200]);
}

/// A tiny TIFF-layout EXIF block: one IFD entry, Orientation = 6 (rotate 90 CW).
fn exif_orientation_6() -> Vec<u8> {
    let mut e = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    e.extend_from_slice(&[0x00, 0x01]);
    e.extend_from_slice(&[
        0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00,
    ]);
    e.extend_from_slice(&[0, 0, 0, 0]);
    e
}

#[test]
fn exif_orientation_is_opt_in() {
    let img = ImageBuffer::<Rgb<u8>, Vec<u8>>::from_fn(16, 8, |x, _| Rgb([(x * 15) as u8, 0, 0]));
    let mut jpg = Vec::new();
    let mut enc = ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95);
    enc.set_exif_metadata(exif_orientation_6()).unwrap();
    enc.write_image(img.as_raw(), 16, 8, ::image::ExtendedColorType::Rgb8)
        .unwrap();
    // HF's processor and vLLM take pixels as stored.
    let d = decode_image(&jpg, &ImageOptions::default()).unwrap();
    assert_eq!((d.width, d.height), (16, 8));
    let r = decode_image(
        &jpg,
        &ImageOptions {
            apply_exif_orientation: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((r.width, r.height), (8, 16));
    // Rotated 90 degrees clockwise: the left column (dark) ends up on top.
    assert!(
        r.rgb[0] < 40 && r.rgb[(15 * 8) * 3] > 180,
        "{} {}",
        r.rgb[0],
        r.rgb[(15 * 8) * 3]
    );
}

#[test]
fn not_images_and_unsupported_formats() {
    for (bytes, what) in [
        (b"hello, world".to_vec(), "text"),
        (vec![0u8; 100], "zeros"),
        (b"%PDF-1.4 ...".to_vec(), "pdf"),
    ] {
        let e = decode_image(&bytes, &ImageOptions::default()).unwrap_err();
        assert!(matches!(e, MediaError::Unsupported(_)), "{what}: {e:?}");
        assert_eq!(e.http_status(), 422);
    }
    assert!(matches!(
        decode_image(b"", &ImageOptions::default()),
        Err(MediaError::Empty(_))
    ));
    // A format image knows by its magic but this build does not accept.
    let qoi = b"qoif\x00\x00\x00\x10\x00\x00\x00\x10\x03\x00rest";
    let e = decode_image(qoi, &ImageOptions::default()).unwrap_err();
    assert!(matches!(e, MediaError::Unsupported(_)), "{e:?}");
    assert!(e.message().contains("Qoi"), "{e}");
}

#[test]
fn truncated_and_damaged_images_are_corrupt() {
    for f in FILES {
        let bytes = fixture(f);
        for cut in [8usize, 20, 40, bytes.len() / 2, bytes.len() - 1] {
            if cut >= bytes.len() {
                continue;
            }
            match decode_image(&bytes[..cut], &ImageOptions::default()) {
                // Some decoders return what they have (e.g. a GIF's first frame
                // before the cut): fine, as long as it is whole.
                Ok(d) => assert_eq!(d.rgb.len(), d.width as usize * d.height as usize * 3),
                Err(e) => assert!(
                    matches!(e, MediaError::Corrupt(_) | MediaError::Unsupported(_)),
                    "{f}[..{cut}]: {e:?}"
                ),
            }
        }
    }
    // A PNG whose IDAT is noise.
    let mut png = fixture("rgba_alpha.png");
    let n = png.len();
    for b in &mut png[60..n - 20] {
        *b ^= 0xA5;
    }
    let e = decode_image(&png, &ImageOptions::default()).unwrap_err();
    assert!(matches!(e, MediaError::Corrupt(_)), "{e:?}");
    assert_eq!(e.http_status(), 422);
}

fn check_no_panic(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode_image(bytes, &ImageOptions::default()) {
        Ok(d) => prop_assert_eq!(d.rgb.len(), d.width as usize * d.height as usize * 3),
        Err(e) => {
            prop_assert!(!matches!(e, MediaError::Invalid(_)) || e.message().contains("limit"))
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_no_panic(&bytes)?;
    }

    #[test]
    fn random_bytes_after_a_magic_never_panic(
        magic in 0usize..6,
        tail in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let heads: [&[u8]; 6] = [
            b"\x89PNG\r\n\x1a\n",
            b"\xff\xd8\xff\xe0",
            b"GIF89a",
            b"BM",
            b"II*\x00",
            b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        ];
        let mut bytes = heads[magic].to_vec();
        bytes.extend_from_slice(&tail);
        check_no_panic(&bytes)?;
    }

    #[test]
    fn mutated_fixtures_never_panic(
        file in 0usize..9,
        edits in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..12),
        cut in any::<u32>(),
    ) {
        let mut bytes = fixture(FILES[file]);
        for (at, v) in edits {
            let i = at as usize % bytes.len();
            bytes[i] = v;
        }
        let keep = bytes.len() - (cut as usize % (bytes.len() / 4 + 1));
        bytes.truncate(keep);
        check_no_panic(&bytes)?;
    }
}
