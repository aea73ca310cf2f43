//! Multi-head softmax attention that never materialises the score matrix:
//! the CLIP / SigLIP and Qwen2-VL vision towers, the Whisper audio encoder
//! (Whisper, Qwen2-Audio) and Whisper's small decoder.
//!
//! The towers attend over thousands of tokens (4,096 patches per head and
//! layer for Gemma 3 at 896 px). Writing the whole `[heads, n, n]` score
//! tensor, a softmax copy of it and reading it back for the second matmul is
//! bandwidth-bound and takes n^2 memory per head. On the CPU this runs
//! flash-attention style instead: a tile of [`Q_BLOCK`] query rows of one
//! head walks the keys [`K_BLOCK`] at a time, scores come from one small GEMM
//! into a buffer that stays in L2, an online softmax (running row maximum and
//! sum) rescales the output rows it accumulates, and a second GEMM adds the
//! block's weighted values. Tiles run in parallel; memory per thread is
//! O(Q_BLOCK x (K_BLOCK + head_dim)). Other devices take the materialised
//! form.

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Query rows per tile.
const Q_BLOCK: usize = 128;
/// Keys per step of a tile: a 128 x 256 f32 score block is 128 KiB, in L2
/// (64 x 256 and 128 x 512 measured no faster).
const K_BLOCK: usize = 256;

/// Which keys each query sees.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    /// Every key.
    All,
    /// Block-diagonal: queries and keys are the same tokens and a token sees
    /// the keys of its own `(start, len)` segment. The segments tile `0..n`
    /// in order (Qwen2-VL's frames and windows).
    Segments(&'a [(usize, usize)]),
    /// Causal over a cache: the `n` queries are the last `n` of the `m` key
    /// positions, and query `i` sees keys `0..m - n + i + 1`.
    Causal,
}

/// Softmax attention of `q` `[heads, n, head_dim]` over `k`, `v` `[heads, m,
/// head_dim]` (any strides with a unit last one, any float dtype; computed
/// in f32) with scores scaled by `scale`. Returns `[n, heads * head_dim]` in
/// `v`'s dtype: the heads concatenated per token, ready for the output
/// projection.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, keys: Keys) -> Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let (kh, m, kd) = k.dims3()?;
    if (kh, kd) != (heads, d) || v.dims() != k.dims() {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    match keys {
        Keys::All => {}
        Keys::Segments(segs) => {
            let mut at = 0;
            for &(start, len) in segs {
                if start != at {
                    bail!("attention: segment at {start} after {at} tokens");
                }
                at += len;
            }
            if at != n || m != n {
                bail!("attention: segments cover {at} tokens of {n} queries and {m} keys");
            }
        }
        Keys::Causal => {
            if m < n {
                bail!("attention: causal over {m} keys for {n} queries");
            }
        }
    }
    if n == 0 || heads == 0 || d == 0 {
        return Tensor::zeros((n, heads * d), v.dtype(), v.device());
    }
    if !q.device().is_cpu() {
        return materialised(q, k, v, scale, keys);
    }
    let (q32, k32, v32) = (unit_last(q)?, unit_last(k)?, unit_last(v)?);
    let (qs, ql) = q32.storage_and_layout();
    let (ks, kl) = k32.storage_and_layout();
    let (vs, vl) = v32.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(qd)),
        Storage::Cpu(CpuStorage::F32(kd)),
        Storage::Cpu(CpuStorage::F32(vd)),
    ) = (&*qs, &*ks, &*vs)
    else {
        bail!("attention: expected f32 CPU storage");
    };
    let shape = Shape {
        heads,
        n,
        m,
        d,
        scale: scale as f32,
        past: matches!(keys, Keys::Causal).then(|| m - n),
    };
    let out = fused(
        &shape,
        View::of(qd, ql),
        View::of(kd, kl),
        View::of(vd, vl),
        keys,
    );
    Tensor::from_vec(out, (n, heads * d), &Device::Cpu)?.to_dtype(v.dtype())
}

/// `t` in f32 with a unit stride on its last dimension (a copy only when
/// needed: head-split views of `[n, heads * d]` projections go in as they are).
fn unit_last(t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    if t.stride()[2] == 1 {
        Ok(t)
    } else {
        t.contiguous()
    }
}

struct Shape {
    heads: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
    /// Causal: query i is key position past + i.
    past: Option<usize>,
}

/// A `[heads, rows, d]` f32 operand: element `(h, i, c)` at `h * head + i *
/// row + c` of `data`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    head: usize,
    row: usize,
}

impl<'a> View<'a> {
    fn of(data: &'a [f32], l: &Layout) -> Self {
        Self {
            data: &data[l.start_offset()..],
            head: l.stride()[0],
            row: l.stride()[1],
        }
    }

    fn at(&self, h: usize, i: usize) -> usize {
        h * self.head + i * self.row
    }
}

/// Queries `q0..q0 + rows` of head `head` against keys `k0..k1` (fewer for
/// later rows' causal limits).
struct Tile {
    head: usize,
    q0: usize,
    rows: usize,
    k0: usize,
    k1: usize,
}

/// Per-thread buffers: scaled queries, one score block, running maxima and
/// sums.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The CPU kernel; returns `[n, heads, d]`.
fn fused(shape: &Shape, q: View, k: View, v: View, keys: Keys) -> Vec<f32> {
    let (n, m, d) = (shape.n, shape.m, shape.d);
    // (first query, queries, first key, end of keys)
    let spans: Vec<(usize, usize, usize, usize)> = match keys {
        Keys::All | Keys::Causal => vec![(0, n, 0, m)],
        Keys::Segments(segs) => segs
            .iter()
            .filter(|s| s.1 > 0)
            .map(|&(s, l)| (s, l, s, s + l))
            .collect(),
    };
    // Head-major, so a thread's consecutive tiles share one head's keys and
    // values in cache.
    let tiles: Vec<Tile> = (0..shape.heads)
        .flat_map(|head| {
            spans.iter().flat_map(move |&(start, len, k0, k1)| {
                (start..start + len).step_by(Q_BLOCK).map(move |q0| Tile {
                    head,
                    q0,
                    rows: Q_BLOCK.min(start + len - q0),
                    k0,
                    k1,
                })
            })
        })
        .collect();
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map_init(Scratch::default, |scratch, t| {
            tile(shape, q, k, v, t, scratch)
        })
        .collect();
    let mut out = vec![0f32; n * shape.heads * d];
    for (t, o) in tiles.iter().zip(results) {
        for r in 0..t.rows {
            out[((t.q0 + r) * shape.heads + t.head) * d..][..d].copy_from_slice(&o[r * d..][..d]);
        }
    }
    out
}

/// One tile's output rows, `[rows, d]`.
fn tile(shape: &Shape, q: View, k: View, v: View, t: &Tile, sc: &mut Scratch) -> Vec<f32> {
    let (d, rows) = (shape.d, t.rows);
    sc.q.clear();
    for r in 0..rows {
        let at = q.at(t.head, t.q0 + r);
        sc.q.extend(q.data[at..at + d].iter().map(|x| x * shape.scale));
    }
    sc.max.clear();
    sc.max.resize(rows, f32::NEG_INFINITY);
    sc.sum.clear();
    sc.sum.resize(rows, 0.0);
    sc.s.resize(rows * K_BLOCK, 0.0);
    let mut o = vec![0f32; rows * d];
    let k_end = shape.past.map_or(t.k1, |past| t.k1.min(past + t.q0 + rows));
    for kb in (t.k0..k_end).step_by(K_BLOCK) {
        let cols = K_BLOCK.min(k_end - kb);
        // Scores [rows, cols] = q [rows, d] . k[kb..kb + cols]^T.
        // SAFETY: sc.q is rows x d and sc.s holds rows x K_BLOCK; key rows
        // kb..kb + cols of this head lie inside k's storage (its layout).
        unsafe {
            crate::cpu::gemm_f32(
                (rows, cols, d),
                sc.s.as_mut_ptr(),
                cols,
                sc.q.as_ptr(),
                d,
                k.data.as_ptr().add(k.at(t.head, kb)),
                (1, k.row),
            );
        }
        for r in 0..rows {
            let row = &mut sc.s[r * cols..][..cols];
            if let Some(past) = shape.past {
                let sees = (past + t.q0 + r + 1).saturating_sub(kb).min(cols);
                row[sees..].fill(f32::NEG_INFINITY);
            }
            let new_max = sc.max[r].max(crate::softmax::max(row));
            if new_max == f32::NEG_INFINITY {
                // Nothing seen yet (only -inf scores): no weight.
                row.fill(0.0);
                continue;
            }
            // exp(-inf) = 0 on a row's first block: its zero sum and output
            // stay zero.
            let rescale = (sc.max[r] - new_max).exp();
            sc.sum[r] = sc.sum[r] * rescale + crate::softmax::exp_shifted_sum(row, new_max);
            sc.max[r] = new_max;
            if rescale != 1.0 {
                o[r * d..][..d].iter_mut().for_each(|x| *x *= rescale);
            }
        }
        // Output [rows, d] += weights [rows, cols] . v[kb..kb + cols].
        // SAFETY: as above, for o (rows x d) and this head's value rows.
        unsafe {
            crate::cpu::gemm_f32_add(
                (rows, d, cols),
                o.as_mut_ptr(),
                d,
                sc.s.as_ptr(),
                cols,
                v.data.as_ptr().add(v.at(t.head, kb)),
                (v.row, 1),
            );
        }
    }
    for (r, out) in o.chunks_exact_mut(d).enumerate() {
        let inv = 1.0 / sc.sum[r];
        out.iter_mut().for_each(|x| *x *= inv);
    }
    o
}

/// Scores materialised (GPU): one batched matmul per run of consecutive
/// equal-length segments, query rows chunked so one score tensor stays
/// within 2^26 floats (a GPU wants few, large launches).
fn materialised(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, keys: Keys) -> Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let m = k.dim(1)?;
    let whole = [(0, n)];
    let (segs, mask) = match keys {
        Keys::All => (&whole[..], None),
        Keys::Segments(segs) => (segs, None),
        Keys::Causal => (&whole[..], Some(causal_mask(n, m - n, q.device())?)),
    };
    const BUDGET: usize = 1 << 26;
    // Scaling q (n x d) rather than the scores (n x m) saves a pass over them.
    let q = (q.to_dtype(DType::F32)? * scale)?;
    let (k, v32) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let mut outs = Vec::new();
    let mut i = 0;
    while i < segs.len() {
        let (start, len) = segs[i];
        let mut j = i + 1;
        while j < segs.len() && segs[j].1 == len && segs[j].0 == segs[j - 1].0 + len {
            j += 1;
        }
        let runs = j - i;
        if len == 0 {
            i = j;
            continue;
        }
        // [runs, heads, len, d]; keys are the whole range unless segmented.
        let take = |z: &Tensor, rows: usize| -> Result<Tensor> {
            z.narrow(1, start, runs * rows)?
                .contiguous()?
                .reshape((heads, runs, rows, d))?
                .transpose(0, 1)?
                .contiguous()
        };
        let klen = if matches!(keys, Keys::Segments(_)) {
            len
        } else {
            m
        };
        let (qs, ks, vs) = if matches!(keys, Keys::Segments(_)) {
            (take(&q, len)?, take(&k, len)?, take(&v32, len)?)
        } else {
            (q.unsqueeze(0)?, k.unsqueeze(0)?, v32.unsqueeze(0)?)
        };
        let kt = ks.transpose(2, 3)?.contiguous()?;
        let chunk = (BUDGET / (runs * heads * klen).max(1)).clamp(1, len.max(1));
        let mut parts = Vec::with_capacity(len.div_ceil(chunk));
        for q0 in (0..len).step_by(chunk) {
            let rows = chunk.min(len - q0);
            let mut scores = qs.narrow(2, q0, rows)?.matmul(&kt)?;
            if let Some(mask) = &mask {
                scores = scores.broadcast_add(&mask.narrow(0, q0, rows)?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            parts.push(probs.matmul(&vs)?);
        }
        // [runs, heads, len, d] -> [runs * len, heads * d]
        outs.push(
            Tensor::cat(&parts, 2)?
                .transpose(1, 2)?
                .reshape((runs * len, heads * d))?,
        );
        i = j;
    }
    Tensor::cat(&outs, 0)?.to_dtype(v.dtype())
}

/// `[n, past + n]` additive mask: query j (at position past + j) sees keys
/// up to its own position.
fn causal_mask(n: usize, past: usize, device: &Device) -> Result<Tensor> {
    let total = past + n;
    let data: Vec<f32> = (0..n)
        .flat_map(|j| {
            (0..total).map(move |k| {
                if k <= past + j {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (n, total), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-2, 2].
    /// Seeded values in [-2, 2).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::test_values(len, seed)
            .iter()
            .map(|v| 2.0 * v)
            .collect()
    }

    /// Attention in f64, row by row, from `[heads, n, d]` / `[heads, m, d]`
    /// data; returns `[n, heads * d]`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (heads, n, m, d): (usize, usize, usize, usize),
        scale: f64,
        sees: impl Fn(usize, usize) -> bool,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * heads * d];
        for h in 0..heads {
            for i in 0..n {
                let s: Vec<f64> = (0..m)
                    .map(|j| {
                        if !sees(i, j) {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|c| q[(h * n + i) * d + c] as f64 * k[(h * m + j) * d + c] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(i * heads + h) * d + c] = (0..m)
                        .map(|j| e[j] * v[(h * m + j) * d + c] as f64)
                        .sum::<f64>()
                        / z;
                }
            }
        }
        out
    }

    fn check(got: &Tensor, want: &[f64], what: &str) {
        check_within(got, want, what, 2e-5)
    }

    fn check_within(got: &Tensor, want: &[f64], what: &str, tol: f64) {
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(worst < tol, "{what}: max error {worst}");
    }

    fn tensors(heads: usize, n: usize, m: usize, d: usize, seed: u64) -> [Tensor; 3] {
        let dev = Device::Cpu;
        let mk = |rows, s| {
            Tensor::from_vec(values(heads * rows * d, s), (heads, rows, d), &dev).unwrap()
        };
        [mk(n, seed), mk(m, seed + 1), mk(m, seed + 2)]
    }

    fn data(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn matches_f64_on_odd_shapes() {
        // n not a multiple of either block, one row, head dims of the towers.
        for (heads, n, d) in [
            (3, 300, 64),
            (2, 1, 72),
            (2, 577, 80),
            (1, 65, 128),
            (2, 257, 72),
        ] {
            let [q, k, v] = tensors(heads, n, n, d, n as u64);
            let scale = (d as f64).powf(-0.5);
            let want = reference(
                &data(&q),
                &data(&k),
                &data(&v),
                (heads, n, n, d),
                scale,
                |_, _| true,
            );
            check(
                &attention(&q, &k, &v, scale, Keys::All).unwrap(),
                &want,
                &format!("{heads}x{n}x{d}"),
            );
            check(
                &materialised(&q, &k, &v, scale, Keys::All).unwrap(),
                &want,
                "materialised",
            );
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores in the hundreds: the running maximum must rescale, not overflow.
        let [q, k, v] = tensors(2, 600, 600, 64, 7);
        let q = (q * 40.0).unwrap();
        let want = reference(
            &data(&q),
            &data(&k),
            &data(&v),
            (2, 600, 600, 64),
            0.125,
            |_, _| true,
        );
        // f32 scores of ~500 carry ~3e-5 of rounding into the exponent.
        check_within(
            &attention(&q, &k, &v, 0.125, Keys::All).unwrap(),
            &want,
            "large",
            2e-4,
        );
    }

    #[test]
    fn segments_are_block_diagonal() {
        // Unequal and equal runs, a segment longer than a query block and a
        // key block, and one of length 1.
        let segs = [
            (0, 64),
            (64, 64),
            (128, 300),
            (428, 1),
            (429, 50),
            (479, 50),
        ];
        let n = 529;
        let seg_of = |i: usize| segs.iter().position(|&(s, l)| i >= s && i < s + l).unwrap();
        for d in [72, 80] {
            let [q, k, v] = tensors(2, n, n, d, d as u64);
            let want = reference(
                &data(&q),
                &data(&k),
                &data(&v),
                (2, n, n, d),
                0.1,
                |i, j| seg_of(i) == seg_of(j),
            );
            check(
                &attention(&q, &k, &v, 0.1, Keys::Segments(&segs)).unwrap(),
                &want,
                "segments",
            );
            check(
                &materialised(&q, &k, &v, 0.1, Keys::Segments(&segs)).unwrap(),
                &want,
                "materialised segments",
            );
        }
    }

    #[test]
    fn causal_over_a_cache_and_cross_lengths() {
        let (heads, d) = (3, 64);
        // A prompt, a chunk after 400 cached keys, one decode step.
        for (n, m) in [(70, 70), (130, 530), (1, 531)] {
            let [q, k, v] = tensors(heads, n, m, d, m as u64);
            let past = m - n;
            let want = reference(
                &data(&q),
                &data(&k),
                &data(&v),
                (heads, n, m, d),
                0.125,
                |i, j| j <= past + i,
            );
            check(
                &attention(&q, &k, &v, 0.125, Keys::Causal).unwrap(),
                &want,
                &format!("causal {n}/{m}"),
            );
            check(
                &materialised(&q, &k, &v, 0.125, Keys::Causal).unwrap(),
                &want,
                "materialised causal",
            );
        }
        // Cross-attention: few queries over many keys, no mask.
        let [q, k, v] = tensors(heads, 5, 1500, d, 3);
        let want = reference(
            &data(&q),
            &data(&k),
            &data(&v),
            (heads, 5, 1500, d),
            0.125,
            |_, _| true,
        );
        check(
            &attention(&q, &k, &v, 0.125, Keys::All).unwrap(),
            &want,
            "cross",
        );
    }

    #[test]
    fn strided_and_half_inputs() -> Result<()> {
        // Head-split views of a [n, heads * d] projection, and bf16 operands
        // (computed in f32, returned in bf16).
        let (heads, n, d) = (4, 131, 72);
        let dev = Device::Cpu;
        let proj = |s| Tensor::from_vec(values(n * heads * d, s), (n, heads * d), &dev);
        let split = |t: Tensor| t.reshape((n, heads, d))?.transpose(0, 1);
        let (q, k, v) = (split(proj(1)?)?, split(proj(2)?)?, split(proj(3)?)?);
        assert!(!q.is_contiguous());
        let want = reference(
            &data(&q.contiguous()?),
            &data(&k.contiguous()?),
            &data(&v.contiguous()?),
            (heads, n, n, d),
            0.2,
            |_, _| true,
        );
        check(&attention(&q, &k, &v, 0.2, Keys::All)?, &want, "strided");
        let half = |t: &Tensor| t.to_dtype(DType::BF16);
        let got = attention(&half(&q)?, &half(&k)?, &half(&v)?, 0.2, Keys::All)?;
        assert_eq!(got.dtype(), DType::BF16);
        let got: Vec<f32> = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(worst < 0.05, "bf16: {worst}");
        Ok(())
    }

    #[test]
    fn bad_shapes_and_segments_are_errors() {
        let [q, k, v] = tensors(2, 10, 10, 8, 1);
        let err = |keys| attention(&q, &k, &v, 1.0, keys).unwrap_err().to_string();
        assert!(err(Keys::Segments(&[(0, 4), (5, 5)])).contains("segment at 5"));
        assert!(err(Keys::Segments(&[(0, 4), (4, 4)])).contains("cover 8"));
        let [q2, _, _] = tensors(2, 12, 12, 8, 1);
        assert!(attention(&q2, &k, &v, 1.0, Keys::Causal).is_err());
        let [_, k3, _] = tensors(3, 10, 10, 8, 1);
        assert!(attention(&q, &k3, &v, 1.0, Keys::All).is_err());
    }
}
