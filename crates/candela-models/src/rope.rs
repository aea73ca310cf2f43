//! Rotary position embeddings over a ragged batch.
//!
//! Tables of cos/sin (`[max_positions, head_dim / 2]`, model dtype) are built
//! once; each forward gathers the rows of its tokens' positions and rotates
//! q/k laid out as `[tokens, heads, head_dim]`.
//!
//! Two pairings of the rotated dimensions exist:
//! - [`RopeStyle::Neox`] (Hugging Face default): dim `i` pairs with
//!   `i + head_dim/2` ("rotate half").
//! - [`RopeStyle::Interleaved`]: dim `2i` pairs with `2i + 1`. llama.cpp's
//!   converter permutes the Q/K rows of llama checkpoints so that this
//!   pairing on the permuted weights equals rotate-half on the originals.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Neox,
    Interleaved,
}

/// How the base inverse frequencies are rescaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`inv_freq / factor`).
    Linear {
        factor: f32,
    },
    /// Llama 3.x: Hugging Face's `_compute_llama3_parameters`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors, as llama.cpp stores them (`rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct RopeConfig {
    pub theta: f32,
    pub head_dim: usize,
    pub max_positions: usize,
    pub scaling: RopeScaling,
    pub style: RopeStyle,
}

/// Inverse frequencies (`head_dim / 2` of them), computed in f32 in the same
/// order of operations as transformers so tables match to the last bit or so.
pub fn inv_freq(cfg: &RopeConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0f32 / cfg.theta.powf(e)
        })
        .collect();
    match &cfg.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::FreqFactors(ff) => base
            .iter()
            .zip(ff.iter().chain(std::iter::repeat(&1.0)))
            .map(|(f, d)| f / d)
            .collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_ctx = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let smooth = (old_ctx / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    max_positions: usize,
    /// Kept for M-RoPE rows, which mix positions per frequency.
    inv_freq: Vec<f32>,
}

/// The cos/sin rows of one batch's positions, `[tokens, 1, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeRows {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(cfg: &RopeConfig, dtype: DType, device: &Device) -> Result<Self> {
        if !cfg.head_dim.is_multiple_of(2) || cfg.head_dim == 0 {
            candle_core::bail!("rope: head_dim must be even, got {}", cfg.head_dim);
        }
        let inv = inv_freq(cfg);
        let half = inv.len();
        let n = cfg.max_positions.max(1);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            let pf = p as f32;
            for &f in &inv {
                // f32 angle as torch computes it; cos/sin of it rounded to f32.
                let a = (pf * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            style: cfg.style,
            max_positions: n,
            inv_freq: inv,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Gather the table rows of `positions` (u32 `[tokens]`).
    pub fn rows(&self, positions: &Tensor) -> Result<RopeRows> {
        let n = positions.dim(0)?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(positions, 0)?.reshape((n, 1, half))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((n, 1, half))?;
        Ok(RopeRows { cos, sin })
    }

    /// Rows for 3-D positions (Qwen2-VL's M-RoPE, HF's
    /// `apply_multimodal_rotary_pos_emb`): the first `section[0]` frequencies
    /// rotate by the temporal position, the next `section[1]` by the height
    /// one, the rest by the width one. Computed here rather than gathered:
    /// video time positions may lie past the table. Values equal the table's
    /// for equal positions (same f32 angle, cos/sin rounded from f64).
    pub fn mrope_rows(
        &self,
        positions: &[[u32; 3]],
        section: [usize; 3],
        device: &Device,
    ) -> Result<RopeRows> {
        let half = self.inv_freq.len();
        if section.iter().sum::<usize>() != half {
            candle_core::bail!("mrope_section {section:?} must sum to head_dim / 2 = {half}");
        }
        let axis: Vec<usize> = (0..half)
            .map(|j| {
                if j < section[0] {
                    0
                } else if j < section[0] + section[1] {
                    1
                } else {
                    2
                }
            })
            .collect();
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in positions {
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let a = (p[axis[j]] as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let dtype = self.cos.dtype();
        let cos = Tensor::from_vec(cos, (n, 1, half), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let sin = Tensor::from_vec(sin, (n, 1, half), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        Ok(RopeRows { cos, sin })
    }

    /// Rotate `x` (`[tokens, heads, head_dim]`) by its tokens' rows.
    pub fn apply(&self, x: &Tensor, rows: &RopeRows) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        // Seen as [batch=tokens, heads, seq=1, head_dim] with per-batch tables.
        let x4 = x.contiguous()?.reshape((t, h, 1, d))?;
        let y = match self.style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x4, &rows.cos, &rows.sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, &rows.cos, &rows.sin)?,
        };
        y.reshape((t, h, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(style: RopeStyle, scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            theta: 10000.0,
            head_dim: 8,
            max_positions: 32,
            scaling,
            style,
        }
    }

    /// Reference rotate-half on plain vectors.
    fn rotate_ref(x: &[f32], pos: usize, inv: &[f32], interleaved: bool) -> Vec<f32> {
        let d = x.len();
        let mut y = vec![0f32; d];
        for i in 0..d / 2 {
            let a = pos as f64 * inv[i] as f64;
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (i0, i1) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + d / 2)
            };
            y[i0] = x[i0] * c - x[i1] * s;
            y[i1] = x[i0] * s + x[i1] * c;
        }
        y
    }

    #[test]
    fn rotates_gathered_positions() -> Result<()> {
        let dev = Device::Cpu;
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let c = cfg(style, RopeScaling::None);
            let rope = RotaryEmbedding::new(&c, DType::F32, &dev)?;
            let inv = inv_freq(&c);
            let positions = [7u32, 0, 31, 3];
            let x: Vec<f32> = (0..4 * 2 * 8)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let xt = Tensor::from_slice(&x, (4, 2, 8), &dev)?;
            let rows = rope.rows(&Tensor::new(&positions, &dev)?)?;
            let y = rope.apply(&xt, &rows)?.flatten_all()?.to_vec1::<f32>()?;
            for t in 0..4 {
                for h in 0..2 {
                    let off = (t * 2 + h) * 8;
                    let want = rotate_ref(
                        &x[off..off + 8],
                        positions[t] as usize,
                        &inv,
                        style == RopeStyle::Interleaved,
                    );
                    for j in 0..8 {
                        assert!(
                            (y[off + j] - want[j]).abs() < 1e-5,
                            "{style:?} t{t} h{h} j{j}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn interleaved_on_permuted_equals_neox() -> Result<()> {
        // llama.cpp permutes each head's rows: new[2i] = old[i], new[2i+1] = old[i + d/2].
        let dev = Device::Cpu;
        let d = 8;
        let neox =
            RotaryEmbedding::new(&cfg(RopeStyle::Neox, RopeScaling::None), DType::F32, &dev)?;
        let inter = RotaryEmbedding::new(
            &cfg(RopeStyle::Interleaved, RopeScaling::None),
            DType::F32,
            &dev,
        )?;
        let x: Vec<f32> = (0..d).map(|i| i as f32 * 0.25 - 1.0).collect();
        let mut xp = vec![0f32; d];
        for i in 0..d / 2 {
            xp[2 * i] = x[i];
            xp[2 * i + 1] = x[i + d / 2];
        }
        let pos = Tensor::new(&[5u32], &dev)?;
        let y = neox
            .apply(&Tensor::from_slice(&x, (1, 1, d), &dev)?, &neox.rows(&pos)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let yp = inter
            .apply(
                &Tensor::from_slice(&xp, (1, 1, d), &dev)?,
                &inter.rows(&pos)?,
            )?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for i in 0..d / 2 {
            assert!((yp[2 * i] - y[i]).abs() < 1e-6);
            assert!((yp[2 * i + 1] - y[i + d / 2]).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn mrope_rows_take_each_frequency_from_its_axis() -> Result<()> {
        let dev = Device::Cpu;
        let c = cfg(RopeStyle::Neox, RopeScaling::None);
        let rope = RotaryEmbedding::new(&c, DType::F32, &dev)?;
        // Equal positions on all axes: exactly the 1-D table rows.
        let flat = rope.mrope_rows(&[[5, 5, 5], [0, 0, 0]], [1, 1, 2], &dev)?;
        let table = rope.rows(&Tensor::new(&[5u32, 0], &dev)?)?;
        assert_eq!(
            flat.cos.flatten_all()?.to_vec1::<f32>()?,
            table.cos.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(
            flat.sin.flatten_all()?.to_vec1::<f32>()?,
            table.sin.flatten_all()?.to_vec1::<f32>()?
        );
        // Mixed: frequency 0 from t, 1 from h, 2..4 from w.
        let mixed = rope
            .mrope_rows(&[[3, 7, 11]], [1, 1, 2], &dev)?
            .cos
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rows = |p: u32| {
            rope.rows(&Tensor::new(&[p], &dev).unwrap())
                .unwrap()
                .cos
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (t, h, w) = (rows(3), rows(7), rows(11));
        assert_eq!(mixed, vec![t[0], h[1], w[2], w[3]]);
        assert!(rope.mrope_rows(&[[0, 0, 0]], [1, 1, 1], &dev).is_err());
        Ok(())
    }

    #[test]
    fn llama3_scaling_matches_reference_values() {
        // The three bands of transformers' _compute_llama3_parameters for
        // head_dim 64, theta 500000, factor 8, low 1, high 4, original 8192.
        let c = RopeConfig {
            theta: 500000.0,
            head_dim: 64,
            max_positions: 4,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            style: RopeStyle::Neox,
        };
        let scaled = inv_freq(&c);
        let base = inv_freq(&RopeConfig {
            scaling: RopeScaling::None,
            ..c.clone()
        });
        // High frequencies untouched, lowest divided by the factor.
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[31] - base[31] / 8.0).abs() <= f32::EPSILON * base[31]);
        // Medium band: smoothly interpolated, strictly between the two.
        let mut saw_medium = false;
        for i in 0..32 {
            let wl = 2.0 * std::f32::consts::PI / base[i];
            if wl > 8192.0 / 4.0 && wl < 8192.0 {
                saw_medium = true;
                assert!(scaled[i] < base[i] && scaled[i] > base[i] / 8.0, "i={i}");
            }
        }
        assert!(saw_medium);
    }
}
