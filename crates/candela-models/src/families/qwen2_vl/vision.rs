//! The Qwen2-VL / Qwen2.5-VL vision tower, one media item at a time:
//! patch embedding, transformer blocks with 2-D rotary embeddings, and the
//! patch merger that turns each `merge x merge` group of patches into one
//! language-model token.
//!
//! Rows arrive in the processor's order: per temporal patch, merge blocks in
//! raster order, the `merge^2` patches of a block consecutive. Attention never
//! crosses a temporal patch (HF's `cu_seqlens` are per frame); Qwen2.5-VL's
//! windowed blocks further restrict it to windows of merged tokens, for which
//! rows are permuted window by window (HF's `window_index`) and put back after
//! the merger.

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::LayerNorm;

use super::config::{Variant, VisionConfig};
use crate::error::Result as MResult;
use crate::nn::activation::Activation;
use crate::nn::decoder::RmsNorm;
use crate::nn::fused_attention::{attention, Keys};
use crate::weights::{Linear, Weights, WeightsAt};

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(w: &WeightsAt, name: &str, dim: usize, variant: Variant) -> MResult<Self> {
        Ok(match variant {
            Variant::Qwen2Vl => Self::Layer(w.layer_norm(name, dim, NORM_EPS)?),
            Variant::Qwen25Vl => Self::Rms(RmsNorm::load(&w.pp(name), dim, NORM_EPS)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
enum Mlp {
    /// Qwen2-VL: fc2(act(fc1(x))).
    Plain { fc1: Linear, fc2: Linear },
    /// Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
    full_attention: bool,
}

/// The vision encoder plus merger of one checkpoint.
#[derive(Debug, Clone)]
pub struct VisionTower {
    cfg: VisionConfig,
    /// Conv3d weight flattened to `[embed, C * T * P * P]`: kernel = stride,
    /// so the convolution is one matmul over flattened patches.
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger_norm: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    act: Activation,
    /// `head_dim / 4` rotary frequencies, shared by the row and column axes.
    inv_freq: Vec<f32>,
}

/// The segments attention runs within, as `(start, len)` over rows.
type Segments = Vec<(usize, usize)>;

impl VisionTower {
    /// Load from `{prefix}.patch_embed`, `{prefix}.blocks.N`, `{prefix}.merger`.
    pub fn load(cfg: VisionConfig, w: &Weights, prefix: &str) -> MResult<Self> {
        let conv = w
            .pp(prefix)
            .tensor("patch_embed.proj.weight", &cfg.patch_embed_shape())?;
        Self::load_with_patch_embed(cfg, w, prefix, conv)
    }

    /// Load the blocks and merger from `w` with the patch embedding given as
    /// the Conv3d weight `[embed, C, T, P, P]` (llama.cpp's mmproj stores it
    /// as one Conv2d kernel per temporal slice).
    pub fn load_with_patch_embed(
        cfg: VisionConfig,
        w: &Weights,
        prefix: &str,
        conv: Tensor,
    ) -> MResult<Self> {
        let d = cfg.embed_dim;
        if conv.dims() != cfg.patch_embed_shape() {
            return Err(crate::error::ModelError::Config(format!(
                "patch embedding has shape {:?}, the vision config needs {:?}",
                conv.dims(),
                cfg.patch_embed_shape()
            )));
        }
        let patch_embed = conv.reshape((d, cfg.patch_dim()))?;
        let w = w.pp(prefix);
        let blocks_w = w.pp("blocks");
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = blocks_w.pp(i);
                let mlp = match cfg.variant {
                    Variant::Qwen2Vl => Mlp::Plain {
                        fc1: b.linear("mlp.fc1", d, cfg.mlp_dim, true)?,
                        fc2: b.linear("mlp.fc2", cfg.mlp_dim, d, true)?,
                    },
                    Variant::Qwen25Vl => Mlp::Gated {
                        gate: b.linear("mlp.gate_proj", d, cfg.mlp_dim, true)?,
                        up: b.linear("mlp.up_proj", d, cfg.mlp_dim, true)?,
                        down: b.linear("mlp.down_proj", cfg.mlp_dim, d, true)?,
                    },
                };
                Ok(Block {
                    norm1: Norm::load(&b, "norm1", d, cfg.variant)?,
                    norm2: Norm::load(&b, "norm2", d, cfg.variant)?,
                    qkv: qkv(&b.pp("attn"), d)?,
                    proj: b.linear("attn.proj", d, d, true)?,
                    mlp,
                    full_attention: cfg.variant == Variant::Qwen2Vl
                        || cfg.fullatt_block_indexes.contains(&i),
                })
            })
            .collect::<MResult<Vec<_>>>()?;
        let m2 = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let quarter = cfg.head_dim() / 4;
        let inv_freq = (0..quarter)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / (2 * quarter) as f32))
            .collect();
        Ok(Self {
            merger_norm: Norm::load(&w, "merger.ln_q", d, cfg.variant)?,
            merger_fc1: w.linear("merger.mlp.0", d * m2, d * m2, true)?,
            merger_fc2: w.linear("merger.mlp.2", d * m2, cfg.out_dim, true)?,
            act: Activation::parse(&cfg.hidden_act)?,
            patch_embed,
            blocks,
            inv_freq,
            cfg,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Merged tokens an item with this grid becomes.
    pub fn num_tokens(&self, grid_thw: [usize; 3]) -> usize {
        let m = self.cfg.spatial_merge_size;
        grid_thw[0] * (grid_thw[1] / m) * (grid_thw[2] / m)
    }

    /// Check that `pixel_values` fits `grid_thw` and this tower.
    pub fn check_input(&self, pixel_values: &Tensor, grid_thw: [usize; 3]) -> Result<()> {
        let (rows, cols) = pixel_values.dims2()?;
        let [t, h, w] = grid_thw;
        let m = self.cfg.spatial_merge_size;
        if t == 0 || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            bail!("grid_thw {grid_thw:?} must be positive with height and width multiples of the merge size {m}");
        }
        if t.checked_mul(h).and_then(|x| x.checked_mul(w)) != Some(rows) {
            bail!("pixel_values has {rows} rows but grid_thw {grid_thw:?} needs t * h * w of them");
        }
        if cols != self.cfg.patch_dim() {
            bail!(
                "pixel_values has {cols} columns, the vision tower takes {} (C * T * P * P)",
                self.cfg.patch_dim()
            );
        }
        Ok(())
    }

    /// Encode one item: `pixel_values` `[t * h * w, C * T * P * P]` (any
    /// float dtype) -> `[t * h/m * w/m, out_dim]` in the weights' dtype.
    pub fn forward(&self, pixel_values: &Tensor, grid_thw: [usize; 3]) -> Result<Tensor> {
        self.check_input(pixel_values, grid_thw)?;
        let dtype = self.patch_embed.dtype();
        let dev = self.patch_embed.device().clone();
        let x = pixel_values.to_device(&dev)?.to_dtype(dtype)?;
        let mut x = x.matmul(&self.patch_embed.t()?)?;

        let [t, h, w] = grid_thw;
        let m = self.cfg.spatial_merge_size;
        let m2 = m * m;
        let frame = h * w;
        let frames: Segments = (0..t).map(|i| (i * frame, frame)).collect();
        // Merged-token order (and window segments) for Qwen2.5-VL.
        let (order, windows) = match self.cfg.variant {
            Variant::Qwen2Vl => (None, frames.clone()),
            Variant::Qwen25Vl => {
                let win = self.cfg.window_size / m / self.cfg.patch_size;
                let (order, windows) = window_order(grid_thw, m, win);
                (Some(order), windows)
            }
        };
        let mut angles = self.rotary_angles(grid_thw);
        if let Some(order) = &order {
            let idx = unit_rows(order, m2, &dev)?;
            x = x.index_select(&idx, 0)?;
            angles = permute_rows(&angles, order, m2, self.inv_freq.len() * 2);
        }
        let half = self.inv_freq.len() * 2;
        let n = t * frame;
        let ang = Tensor::from_vec(angles, (n, half), &dev)?;
        let (cos, sin) = (
            ang.cos()?.reshape((n, 1, half))?,
            ang.sin()?.reshape((n, 1, half))?,
        );

        for b in &self.blocks {
            let segs = if b.full_attention { &frames } else { &windows };
            x = self.block_forward(b, &x, &cos, &sin, segs)?;
        }
        let x = self
            .merger_norm
            .forward(&x)?
            .reshape((n / m2, m2 * self.cfg.embed_dim))?;
        let x = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&x)?.gelu_erf()?)?;
        match order {
            // Merged row i came from merged token order[i]: undo the permutation.
            Some(order) => {
                let mut inverse = vec![0u32; order.len()];
                for (i, &o) in order.iter().enumerate() {
                    inverse[o] = i as u32;
                }
                let len = inverse.len();
                x.index_select(&Tensor::from_vec(inverse, len, &dev)?, 0)
            }
            None => Ok(x),
        }
    }

    /// Rotary angles per row (`[rows, head_dim / 2]`, f32): row and column
    /// frequencies side by side, as HF concatenates them.
    fn rotary_angles(&self, [t, h, w]: [usize; 3]) -> Vec<f32> {
        let m = self.cfg.spatial_merge_size;
        let q = self.inv_freq.len();
        let mut out = Vec::with_capacity(t * h * w * 2 * q);
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (y, x) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                            out.extend(self.inv_freq.iter().map(|f| y * f));
                            out.extend(self.inv_freq.iter().map(|f| x * f));
                        }
                    }
                }
            }
        }
        out
    }

    fn block_forward(
        &self,
        b: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segs: &Segments,
    ) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let heads = self.cfg.num_heads;
        let hd = d / heads;
        let h = b.norm1.forward(x)?;
        let qkv = b.qkv.forward(&h)?.reshape((n, 3, heads, hd))?;
        // Rotary in f32, as HF does whatever the model dtype.
        let rot = |i: usize| -> Result<Tensor> {
            let z = qkv
                .narrow(1, i, 1)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let z4 = z.reshape((n, heads, 1, hd))?;
            candle_nn::rotary_emb::rope(&z4, cos, sin)?.reshape((n, heads, hd))
        };
        let q = rot(0)?;
        let k = rot(1)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
        // Bidirectional within each frame / window, on [heads, n, hd] views.
        let heads_first = |t: &Tensor| t.transpose(0, 1);
        let a = attention(
            &heads_first(&q)?,
            &heads_first(&k)?,
            &heads_first(&v)?,
            (hd as f64).powf(-0.5),
            Keys::Segments(segs),
        )?
        .to_dtype(x.dtype())?;
        let x = (x + b.proj.forward(&a)?)?;
        let h = b.norm2.forward(&x)?;
        let h = match &b.mlp {
            Mlp::Plain { fc1, fc2 } => fc2.forward(&self.act.forward(&fc1.forward(&h)?)?)?,
            Mlp::Gated { gate, up, down } => {
                down.forward(&(self.act.forward(&gate.forward(&h)?)? * up.forward(&h)?)?)?
            }
        };
        let out = (x + h)?;
        debug_assert_eq!(out.dim(D::Minus1)?, d);
        Ok(out)
    }
}

/// The fused `{attn}.qkv` projection, or (llama.cpp's mmproj) one stacked
/// from `{attn}.q`, `{attn}.k` and `{attn}.v`.
fn qkv(attn: &WeightsAt, d: usize) -> MResult<Linear> {
    if attn.contains("qkv.weight") {
        return attn.linear("qkv", d, 3 * d, true);
    }
    let parts = ["q", "k", "v"]
        .iter()
        .map(|x| attn.linear(x, d, d, true))
        .collect::<MResult<Vec<_>>>()?;
    Linear::stack(&parts.iter().collect::<Vec<_>>())?.ok_or_else(|| {
        crate::error::ModelError::Config(
            "vision attention: q, k and v are stored in different types and cannot be stacked"
                .into(),
        )
    })
}

/// Qwen2.5-VL's window layout: the merged tokens of each frame visited
/// window by window (windows of `win` merged tokens a side in raster order,
/// partial ones at the bottom and right edges), and the resulting window
/// segments over patch rows.
fn window_order([t, h, w]: [usize; 3], m: usize, win: usize) -> (Vec<usize>, Segments) {
    let (lh, lw) = (h / m, w / m);
    let win = win.max(1);
    let m2 = m * m;
    let mut order = Vec::with_capacity(t * lh * lw);
    let mut segs = Vec::new();
    for ti in 0..t {
        let base = ti * lh * lw;
        for wy in (0..lh).step_by(win) {
            for wx in (0..lw).step_by(win) {
                let start = order.len();
                for y in wy..(wy + win).min(lh) {
                    for x in wx..(wx + win).min(lw) {
                        order.push(base + y * lw + x);
                    }
                }
                segs.push((start * m2, (order.len() - start) * m2));
            }
        }
    }
    (order, segs)
}

/// Row indices of whole merge units in `order` (`unit` rows each).
fn unit_rows(order: &[usize], unit: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let idx: Vec<u32> = order
        .iter()
        .flat_map(|&o| (0..unit).map(move |j| (o * unit + j) as u32))
        .collect();
    let len = idx.len();
    Tensor::from_vec(idx, len, dev)
}

fn permute_rows(rows: &[f32], order: &[usize], unit: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len());
    for &o in order {
        out.extend_from_slice(&rows[o * unit * width..(o + 1) * unit * width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_order_matches_hf_layout() {
        // A 1 x 6 x 10 grid with merge 2: 3 x 5 merged tokens; windows of 2.
        let (order, segs) = window_order([1, 6, 10], 2, 2);
        // Merged grid row-major ids 0..15; windows 2 x 2 in raster order.
        assert_eq!(
            order,
            vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
        );
        let sizes: Vec<usize> = segs.iter().map(|s| s.1 / 4).collect();
        assert_eq!(sizes, vec![4, 4, 2, 2, 2, 1]);
        assert_eq!(segs.iter().map(|s| s.1).sum::<usize>(), 60);
        // A second frame continues after the first.
        let (order, _) = window_order([2, 2, 2], 2, 2);
        assert_eq!(order, vec![0, 1]);
    }
}
