//! Resizing feature maps as torch's `F.interpolate(mode="bilinear",
//! align_corners=False)` does without antialiasing (LLaVA-OneVision pools
//! video frames and shrinks large tiled images this way).

use candle_core::{DType, Result, Tensor};

/// `[out, in]` weights: row `o` blends the two inputs nearest to `o`'s
/// centre, `src = (o + 0.5) * in / out - 0.5` clamped at 0 (torch's
/// `area_pixel_compute_source_index` for a given output size).
fn weights(inp: usize, out: usize) -> Vec<f32> {
    let scale = inp as f64 / out as f64;
    let mut w = vec![0f32; out * inp];
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let l = (src - i0 as f64) as f32;
        w[o * inp + i0] += 1.0 - l;
        w[o * inp + i1] += l;
    }
    w
}

/// `[channels, h, w]` -> `[channels, out_h, out_w]`, bilinear, in f32.
pub fn bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (c, h, w) = x.dims3()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        candle_core::bail!("bilinear resize of a {h}x{w} map to {out_h}x{out_w}");
    }
    let dev = x.device();
    let wh = Tensor::from_vec(weights(h, out_h), (out_h, h), dev)?;
    let ww = Tensor::from_vec(weights(w, out_w), (out_w, w), dev)?;
    let x = x.to_dtype(DType::F32)?;
    // Rows: [c, h, w] -> [c, out_h, w]; then columns: -> [c, out_h, out_w].
    let rows = wh.broadcast_left(c)?.matmul(&x)?;
    rows.matmul(&ww.t()?.broadcast_left(c)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values from torch 2.x: `F.interpolate(x, size, mode="bilinear")` of
    /// `x = arange(40).reshape(1, 2, 5, 4) ** 1.5 / 10`.
    #[test]
    fn matches_torch() {
        let x: Vec<f32> = (0..40).map(|i| (i as f32).powf(1.5) / 10.0).collect();
        let x = Tensor::from_vec(x, (2, 5, 4), &Device::Cpu).unwrap();
        let cases: [(usize, usize, &[f32]); 2] = [
            (
                3,
                3,
                &[
                    0.295_446_34,
                    0.558_902_2,
                    0.916_203_5,
                    2.335_618,
                    2.931_139,
                    3.567_285_7,
                    5.749_465_5,
                    6.536_267,
                    7.354_348_7,
                    9.998_74,
                    10.940_35,
                    11.908_193,
                    14.949_67,
                    16.024_328,
                    17.122_004,
                    20.582_174,
                    21.774_046,
                    22.986_727,
                ],
            ),
            (
                7,
                2,
                &[
                    0.05,
                    0.401_228_96,
                    0.569_438_3,
                    1.121_018,
                    1.393_975_4,
                    2.159_266_5,
                    2.481_371,
                    3.405_282_5,
                    3.867_584_2,
                    4.918_579,
                    5.400_314,
                    6.567_655,
                    6.704_640_4,
                    7.959_330_6,
                    9.283_84,
                    10.674_664,
                    10.909_517,
                    12.371_16,
                    13.011_01,
                    14.558_487,
                    15.216_593,
                    16.845_873,
                    17.582_953,
                    19.288_649,
                    20.039_616,
                    21.819_061,
                    22.053_11,
                    23.890_13,
                ],
            ),
        ];
        for (oh, ow, want) in cases {
            let got: Vec<f32> = bilinear(&x, oh, ow)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{oh}x{ow}: {g} vs {w}"
                );
            }
        }
        // Same size: the map itself.
        let same: Vec<f32> = bilinear(&x, 5, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(same, orig);
    }
}
