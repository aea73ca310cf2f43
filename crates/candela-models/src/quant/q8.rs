//! Activations quantized to 8 bits per 32-value block: the other operand of
//! the integer dot products (ggml's Q8_0 layout, with an f32 scale).
//!
//! One block size serves every weight format, K-quants included: 32 divides
//! each format's block and a K-quant sub-block (32 values, or two of 16 for
//! Q2_K, Q3_K and Q6_K) meets exactly one activation block, so each
//! activation block keeps its own scale. ggml quantizes K-quant activations per 256 values (Q8_K)
//! to fold the sub-block scales into integers; per-32 scales cost one f32
//! multiply-add per 32 values more and round less (a block's scale follows
//! its own largest value, not the super-block's).

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
}

/// One quantized row.
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub dsum: &'a [f32],
}

impl Q8Rows {
    /// Quantize `x` (`[m, k]` row-major) block by block: `d = max|x| / 127`,
    /// `q = round(x / d)`.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        debug_assert!(k.is_multiple_of(QK) && x.len().is_multiple_of(k.max(1)));
        let nb = x.len() / QK;
        let mut qs = vec![0i8; x.len()];
        let (mut d, mut dsum) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        for (xb, qb) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                // |v * inv| <= 127 up to rounding; the clamp keeps it in range.
                let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
                *q = r;
                sum += r as i32;
            }
            let scale = amax / 127.0;
            d.push(scale);
            dsum.push(scale * sum as f32);
        }
        Self { k, qs, d, dsum }
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.k / QK;
        Q8Row {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            dsum: &self.dsum[i * nb..(i + 1) * nb],
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
        let q = Q8Rows::quantize(&x, 96);
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
}
