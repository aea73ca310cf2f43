//! Alpha compositing with PIL's integer rounding, so an RGBA image over a
//! background gives the same bytes as vLLM's `rgba_to_rgb` (`Image.paste` with
//! the alpha band as mask).

/// `fg` at opacity `alpha` over `bg`: PIL's BLEND, i.e. round-to-nearest of
/// `(bg * (255 - alpha) + fg * alpha) / 255` through its shift trick for /255.
#[inline]
pub fn over_background(fg: u8, alpha: u8, bg: u8) -> u8 {
    let a = alpha as u32;
    let t = bg as u32 * (255 - a) + fg as u32 * a + 128;
    (((t >> 8) + t) >> 8) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_exact_rounding_of_the_blend() {
        for a in 0..=255u32 {
            for (fg, bg) in [(0u32, 255u32), (255, 0), (17, 200), (128, 128), (3, 250)] {
                let exact = (bg * (255 - a) + fg * a) as f64 / 255.0;
                let got = over_background(fg as u8, a as u8, bg as u8) as f64;
                assert!((got - exact).abs() <= 0.5 + 1e-9, "a={a} fg={fg} bg={bg}");
            }
        }
        assert_eq!(over_background(10, 255, 200), 10);
        assert_eq!(over_background(10, 0, 200), 200);
    }
}
