//! Antialiased bicubic (and bilinear) resize of RGB8 images, bit-exact with
//! the implementations the reference processors use:
//!
//! - [`ResampleKernel::Pil`]: Pillow's `Image.resize(..., BICUBIC)` (what the
//!   PIL-based Qwen2-VL image processor calls).
//! - [`ResampleKernel::PilBilinear`]: Pillow's `Image.resize(..., BILINEAR)`
//!   (Gemma 3's image processor): the same machinery with a triangle filter
//!   of support 1.
//! - [`ResampleKernel::TorchUint8`]: torch's uint8 antialiased bicubic
//!   (`torchvision.transforms.v2.functional.resize(uint8, BICUBIC,
//!   antialias=True)` on CPU), which the Qwen2-VL video processor and
//!   qwen-vl-utils use for video frames.
//!
//! Both are the same separable convolution: a Keys cubic (a = -0.5) whose support
//! widens by the downscale factor, weights normalised per output pixel and turned
//! into fixed point, integer accumulation with a rounding bias, an arithmetic
//! shift and a clamp to 0..=255 after each 1-D pass. They differ in the fixed
//! point precision (Pillow: always 22 bits; torch: the most bits that keep the
//! largest weight below 2^15), in the float expression of the cubic, and in the
//! pass order (Pillow goes vertical-first when the height shrinks much more than
//! the width; torch always goes horizontal-first). Those differences move some
//! pixels by one level, which is why both exist.

/// Which reference implementation to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleKernel {
    Pil,
    PilBilinear,
    TorchUint8,
}

/// Pillow's fixed-point precision for 8-bit images: 32 bits minus 8 for the
/// value minus 2 of headroom for negative lobes and sums above 1.
const PIL_PRECISION_BITS: u32 = 22;

/// Per-output-pixel taps of one 1-D pass.
struct Taps {
    /// (first input index, tap count) per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output index (the first `count` used).
    weights: Vec<i32>,
    ksize: usize,
    precision: u32,
}

fn pil_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn pil_triangle(x: f64) -> f64 {
    (1.0 - x.abs()).max(0.0)
}

fn torch_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// C's `(int)(v + 0.5)` / `(int)(v - 0.5)`: round half away from zero.
#[inline]
fn round_away(v: f64) -> i32 {
    if v < 0.0 {
        (v - 0.5) as i32
    } else {
        (v + 0.5) as i32
    }
}

fn taps(in_size: usize, out_size: usize, kernel: ResampleKernel) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let (filter, filter_support): (fn(f64) -> f64, f64) = match kernel {
        ResampleKernel::Pil => (pil_cubic, 2.0),
        ResampleKernel::PilBilinear => (pil_triangle, 1.0),
        ResampleKernel::TorchUint8 => (torch_cubic, 2.0),
    };
    let support = filter_support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut wf = vec![0.0f64; out_size * ksize];
    let mut w_max = 0.0f64;
    for (xx, row) in wf.chunks_exact_mut(ksize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // Truncation toward zero, then clamping, as both C implementations do.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin).min(ksize);
        let mut total = 0.0;
        for (j, w) in row.iter_mut().take(count).enumerate() {
            *w = filter(((j + xmin) as f64 - center + 0.5) * inv);
            total += *w;
        }
        if total != 0.0 {
            for w in row.iter_mut().take(count) {
                *w /= total;
                w_max = w_max.max(*w);
            }
        }
        bounds.push((xmin, count));
    }

    let precision = match kernel {
        ResampleKernel::Pil | ResampleKernel::PilBilinear => PIL_PRECISION_BITS,
        ResampleKernel::TorchUint8 => {
            // torch: the largest precision (< 22) whose next step would push the
            // biggest weight to 2^15 or more (weights are int16 there).
            let mut p = 0u32;
            while p < 22 {
                if round_away(w_max * (1u64 << (p + 1)) as f64) >= 1 << 15 {
                    break;
                }
                p += 1;
            }
            p
        }
    };
    let one = (1u64 << precision) as f64;
    let weights = wf.iter().map(|&w| round_away(w * one)).collect();
    Taps {
        bounds,
        weights,
        ksize,
        precision,
    }
}

#[inline]
fn clip8(acc: i64, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Horizontal pass over rows `y0..y0 + rows` of a `w`-wide RGB8 image.
fn horizontal(src: &[u8], w: usize, y0: usize, rows: usize, t: &Taps) -> Vec<u8> {
    let out_w = t.bounds.len();
    let mut out = vec![0u8; out_w * rows * 3];
    let bias = 1i64 << (t.precision - 1);
    for y in 0..rows {
        let line = &src[(y0 + y) * w * 3..(y0 + y + 1) * w * 3];
        let dst = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (xx, &(xmin, count)) in t.bounds.iter().enumerate() {
            let k = &t.weights[xx * t.ksize..xx * t.ksize + count];
            let (mut r, mut g, mut b) = (bias, bias, bias);
            for (j, &kj) in k.iter().enumerate() {
                let p = (xmin + j) * 3;
                r += line[p] as i64 * kj as i64;
                g += line[p + 1] as i64 * kj as i64;
                b += line[p + 2] as i64 * kj as i64;
            }
            dst[xx * 3] = clip8(r, t.precision);
            dst[xx * 3 + 1] = clip8(g, t.precision);
            dst[xx * 3 + 2] = clip8(b, t.precision);
        }
    }
    out
}

/// Vertical pass; `y_offset` is the source row that `src`'s first row stands for.
fn vertical(src: &[u8], w: usize, y_offset: usize, t: &Taps) -> Vec<u8> {
    let out_h = t.bounds.len();
    let row_len = w * 3;
    let mut out = vec![0u8; out_h * row_len];
    let bias = 1i64 << (t.precision - 1);
    let mut acc = vec![0i64; row_len];
    for (yy, &(ymin, count)) in t.bounds.iter().enumerate() {
        acc.fill(bias);
        let k = &t.weights[yy * t.ksize..yy * t.ksize + count];
        for (j, &kj) in k.iter().enumerate() {
            let y = ymin + j - y_offset;
            let line = &src[y * row_len..(y + 1) * row_len];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += v as i64 * kj as i64;
            }
        }
        for (o, &a) in out[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *o = clip8(a, t.precision);
        }
    }
    out
}

/// Pillow's pass order: vertical first when the height shrinks more than
/// twice as much as the width (a speed choice that changes rounding); torch
/// always goes horizontal first.
fn horizontal_first(
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    kernel: ResampleKernel,
) -> bool {
    match kernel {
        ResampleKernel::Pil | ResampleKernel::PilBilinear => {
            !(h > out_h && (h - out_h) as i64 > (w as i64 - out_w as i64) * 2)
        }
        ResampleKernel::TorchUint8 => true,
    }
}

/// Resize an interleaved RGB8 image (`w * h * 3` bytes) to `out_w x out_h`.
/// The caller guarantees non-zero sizes and a buffer of the right length.
pub fn resize_rgb8(
    src: &[u8],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    kernel: ResampleKernel,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), w * h * 3);
    let need_h = out_w != w;
    let need_v = out_h != h;
    if !need_h && !need_v {
        return src.to_vec();
    }
    let tv = need_v.then(|| taps(h, out_h, kernel));
    let th = need_h.then(|| taps(w, out_w, kernel));
    match (th, tv) {
        (Some(th), None) => horizontal(src, w, 0, h, &th),
        (None, Some(tv)) => vertical(src, w, 0, &tv),
        (Some(th), Some(tv)) if horizontal_first(w, h, out_w, out_h, kernel) => {
            // Only the source rows the vertical pass reads (Pillow's
            // optimisation; it does not change any value).
            let (first, last) = rows_read(&tv, h);
            let tmp = horizontal(src, w, first, last - first, &th);
            vertical(&tmp, out_w, first, &tv)
        }
        (Some(th), Some(tv)) => {
            let tmp = vertical(src, w, 0, &tv);
            horizontal(&tmp, w, 0, out_h, &th)
        }
        (None, None) => src.to_vec(),
    }
}

/// The source rows `first..last` that a vertical pass reads.
fn rows_read(tv: &Taps, h: usize) -> (usize, usize) {
    let first = tv.bounds.first().map_or(0, |b| b.0);
    let last = tv.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(h);
    (first, last)
}

/// [`resize_rgb8`] fed one source row at a time, for decoders that give rows
/// (PNG): the full-size image never exists. It holds the first pass's output
/// (`out_w x h` horizontal first, `w x out_h` vertical first) and, vertical
/// first, a running sum per output row whose source rows are still coming.
/// Same integer arithmetic in the same passes, so the same pixels.
pub(crate) struct RowResizer {
    w: usize,
    out_w: usize,
    out_h: usize,
    th: Option<Taps>,
    tv: Option<Taps>,
    horizontal_first: bool,
    /// Source row index of the next `push`.
    y: usize,
    /// First pass output (or the rows themselves when nothing is resized).
    tmp: Vec<u8>,
    /// Vertical first: (output row, sums) of output rows begun, in order.
    open: std::collections::VecDeque<(usize, Vec<i64>)>,
    /// Vertical first: next output row to begin.
    next_out: usize,
}

impl RowResizer {
    /// A resizer whose first-pass buffer is allocated up front (exactly, and
    /// failing cleanly where the machine cannot give it).
    pub(crate) fn new(
        w: usize,
        h: usize,
        out_w: usize,
        out_h: usize,
        kernel: ResampleKernel,
    ) -> Result<Self, std::collections::TryReserveError> {
        let tv = (out_h != h).then(|| taps(h, out_h, kernel));
        let th = (out_w != w).then(|| taps(w, out_w, kernel));
        let horizontal_first =
            tv.is_none() || (th.is_some() && horizontal_first(w, h, out_w, out_h, kernel));
        let first_pass = match &tv {
            Some(tv) if horizontal_first => {
                let (first, last) = rows_read(tv, h);
                out_w * (last - first) * 3
            }
            Some(_) => w * out_h * 3,
            None => out_w * h * 3,
        };
        let mut tmp = Vec::new();
        tmp.try_reserve_exact(first_pass)?;
        Ok(RowResizer {
            w,
            out_w,
            out_h,
            th,
            tv,
            horizontal_first,
            y: 0,
            tmp,
            open: Default::default(),
            next_out: 0,
        })
    }

    /// Bytes this resizer holds at most besides its output (for the media budget).
    pub(crate) fn scratch_bytes(
        w: usize,
        h: usize,
        out_w: usize,
        out_h: usize,
        kernel: ResampleKernel,
    ) -> u64 {
        let vertical_first =
            out_h != h && (out_w == w || !horizontal_first(w, h, out_w, out_h, kernel));
        if vertical_first {
            // The first pass, and a running sum for each output row whose
            // window holds the current source row (8 bytes a sample).
            let support = (2.0 * (h as f64 / out_h as f64).max(1.0)).ceil() as usize * 2 + 1;
            let open = support * out_h / h + 2;
            (w * out_h * 3 + open * w * 3 * 8) as u64
        } else {
            (out_w * h * 3) as u64
        }
    }

    /// The next source row (`w * 3` bytes of RGB8).
    pub(crate) fn push(&mut self, row: &[u8]) {
        let y = self.y;
        self.y += 1;
        if self.horizontal_first {
            if let Some(tv) = &self.tv {
                let (first, last) = rows_read(tv, usize::MAX);
                if y < first || y >= last {
                    return;
                }
            }
            match &self.th {
                Some(th) => self.tmp.extend(horizontal(row, self.w, 0, 1, th)),
                None => self.tmp.extend_from_slice(row),
            }
            return;
        }
        let Some(tv) = &self.tv else { return };
        let bias = 1i64 << (tv.precision - 1);
        while self.next_out < tv.bounds.len() && tv.bounds[self.next_out].0 <= y {
            self.open.push_back((self.next_out, vec![bias; self.w * 3]));
            self.next_out += 1;
        }
        for (yy, acc) in self.open.iter_mut() {
            let (ymin, count) = tv.bounds[*yy];
            if y >= ymin && y < ymin + count {
                let k = tv.weights[*yy * tv.ksize + (y - ymin)] as i64;
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v as i64 * k;
                }
            }
        }
        // Output rows end in order: their windows' ends never decrease.
        while let Some((yy, _)) = self.open.front() {
            let (ymin, count) = tv.bounds[*yy];
            if ymin + count > y + 1 {
                break;
            }
            let (_, acc) = self.open.pop_front().expect("front exists");
            self.tmp.extend(acc.iter().map(|&a| clip8(a, tv.precision)));
        }
    }

    /// The resized image (`out_w * out_h * 3` bytes), once every row came.
    pub(crate) fn finish(self) -> Vec<u8> {
        if self.horizontal_first {
            match &self.tv {
                Some(tv) => {
                    let (first, _) = rows_read(tv, usize::MAX);
                    vertical(&self.tmp, self.out_w, first, tv)
                }
                None => self.tmp,
            }
        } else {
            match &self.th {
                Some(th) => horizontal(&self.tmp, self.w, 0, self.out_h, th),
                None => self.tmp,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant_images() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, ResampleKernel::Pil), src);
        // A flat image stays flat through any resize (weights sum to one).
        let flat = vec![200u8; 37 * 23 * 3];
        for k in [
            ResampleKernel::Pil,
            ResampleKernel::PilBilinear,
            ResampleKernel::TorchUint8,
        ] {
            for (ow, oh) in [(56, 28), (5, 3), (37, 56), (1, 1)] {
                let out = resize_rgb8(&flat, 37, 23, ow, oh, k);
                assert_eq!(out.len(), ow * oh * 3);
                assert!(out.iter().all(|&v| v == 200), "{k:?} {ow}x{oh}");
            }
        }
    }

    #[test]
    fn torch_precision_keeps_weights_in_int16() {
        for (i, o) in [(10, 3), (100, 7), (3, 100), (1000, 28)] {
            let t = taps(i, o, ResampleKernel::TorchUint8);
            assert!(t.weights.iter().all(|&w| w.abs() < 1 << 15), "{i}->{o}");
            assert!(t.precision > 0 && t.precision < 22);
        }
    }

    #[test]
    fn row_by_row_gives_the_same_pixels() {
        let (w, h) = (53, 71);
        let src: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * 37) ^ (i >> 5)) as u8)
            .collect();
        for k in [
            ResampleKernel::Pil,
            ResampleKernel::PilBilinear,
            ResampleKernel::TorchUint8,
        ] {
            // Both pass orders, each pass alone, none, and upscaling.
            for (ow, oh) in [
                (20, 9),
                (50, 8),
                (9, 70),
                (53, 20),
                (20, 71),
                (53, 71),
                (80, 100),
                (1, 1),
            ] {
                let mut r = RowResizer::new(w, h, ow, oh, k).unwrap();
                for row in src.chunks_exact(w * 3) {
                    r.push(row);
                }
                assert_eq!(
                    r.finish(),
                    resize_rgb8(&src, w, h, ow, oh, k),
                    "{k:?} {ow}x{oh}"
                );
            }
        }
    }
}
