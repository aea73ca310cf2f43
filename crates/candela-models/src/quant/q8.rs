//! Activations quantized to 8 bits: the other operand of the integer dot
//! products (ggml's Q8_0 layout, with f32 scales).
//!
//! Values are quantized per group of the weight format's block: 32 for the
//! 32-value formats (Q8_0's layout), 256 for the K-quants (one scale per
//! super-block, as ggml's Q8_K). The scale and sum are still stored per
//! 32-value block (a K-quant super-block's 8 blocks repeat its scale), so
//! every kernel reads one layout; the K-quant kernels rely on the shared
//! scale to sum a super-block's sub-blocks, times their integer scales, in
//! integers and convert once per 256 values.

/// Values per activation block.
pub const QK: usize = 32;

/// `m` rows of `k` values, `k` a multiple of [`QK`].
pub struct Q8Rows {
    k: usize,
    /// Quants in -127..=127, row after row.
    qs: Vec<i8>,
    /// Per block: the scale `d` (value ~ `d * q`).
    d: Vec<f32>,
    /// Per block: `d * sum(q)`, for weight formats with an offset (zero
    /// point or min): `sum_j (s w_j + o) x_j = s sum_j w_j x_j + o sum_j x_j`.
    dsum: Vec<f32>,
    /// Per 16 values: `sum(q)` (K-quants with 16-value scales take their
    /// offset from it in integers).
    sum16: Vec<i16>,
}

/// One quantized row.
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub dsum: &'a [f32],
    pub sum16: &'a [i16],
}

impl Q8Rows {
    /// Quantize `x` (`[m, k]` row-major) group by group (`group` values, a
    /// multiple of [`QK`] dividing `k`): `d = max|x| / 127`, `q = round(x / d)`.
    pub fn quantize(x: &[f32], k: usize, group: usize) -> Self {
        assert!(group.is_multiple_of(QK) && k.is_multiple_of(group));
        debug_assert!(x.len().is_multiple_of(k.max(1)));
        let nb = x.len() / QK;
        let mut qs = vec![0i8; x.len()];
        let (mut d, mut dsum) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        let mut sum16 = Vec::with_capacity(2 * nb);
        for (xg, qg) in x.chunks_exact(group).zip(qs.chunks_exact_mut(group)) {
            let amax = xg.iter().fold(0f32, |a, v| a.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let scale = amax / 127.0;
            for (xb, qb) in xg.chunks_exact(QK).zip(qg.chunks_exact_mut(QK)) {
                for (q, v) in qb.iter_mut().zip(xb) {
                    // |v * inv| <= 127 up to rounding; the clamp keeps it in range.
                    *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
                // At most 16 x 127 per half: an i16.
                let half = |h: &[i8]| h.iter().map(|&q| q as i16).sum::<i16>();
                let (s0, s1) = (half(&qb[..QK / 2]), half(&qb[QK / 2..]));
                sum16.extend([s0, s1]);
                d.push(scale);
                dsum.push(scale * (s0 as i32 + s1 as i32) as f32);
            }
        }
        Self {
            k,
            qs,
            d,
            dsum,
            sum16,
        }
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.k / QK;
        Q8Row {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            dsum: &self.dsum[i * nb..(i + 1) * nb],
            sum16: &self.sum16[2 * i * nb..2 * (i + 1) * nb],
        }
    }
}

#[cfg(test)]
impl Q8Rows {
    /// The values the quants stand for, `d * q`.
    pub fn dequantized(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(QK)
            .zip(&self.d)
            .flat_map(|(q, &d)| q.iter().map(move |&q| d * q as f32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let mut x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        x[32..64].fill(0.0); // an all-zero block
        let q = Q8Rows::quantize(&x, 96, QK);
        let r = q.row(0);
        assert_eq!(r.d[1], 0.0);
        for b in 0..3 {
            let mut sum = 0i32;
            for j in 0..QK {
                let (v, qv) = (x[b * QK + j], r.qs[b * QK + j]);
                assert!(
                    (v - r.d[b] * qv as f32).abs() <= r.d[b] * 0.5 + 1e-6,
                    "block {b} elem {j}"
                );
                sum += qv as i32;
            }
            assert_eq!(r.dsum[b], r.d[b] * sum as f32);
        }
        let amax = x[..32].iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(r.qs[..32].iter().any(|&q| q.unsigned_abs() == 127));
        assert_eq!(r.d[0], amax / 127.0);
    }

    #[test]
    fn a_group_shares_one_scale_across_its_blocks() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q = Q8Rows::quantize(&x, 512, 256);
        let r = q.row(0);
        for g in 0..2 {
            let amax = x[256 * g..256 * (g + 1)]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            for b in 8 * g..8 * g + 8 {
                assert_eq!(r.d[b], amax / 127.0, "block {b}");
                let sum: i32 = r.qs[b * QK..(b + 1) * QK].iter().map(|&q| q as i32).sum();
                assert_eq!(r.dsum[b], r.d[b] * sum as f32);
                for h in 0..2 {
                    let part = &r.qs[b * QK + 16 * h..b * QK + 16 * h + 16];
                    assert_eq!(
                        r.sum16[2 * b + h] as i32,
                        part.iter().map(|&q| q as i32).sum::<i32>()
                    );
                }
            }
        }
        let back = q.dequantized();
        for (v, b) in x.iter().zip(&back) {
            assert!((v - b).abs() <= r.d[0].max(r.d[8]) * 0.5 + 1e-6);
        }
    }
}
