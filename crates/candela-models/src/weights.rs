//! Where a model's tensors come from: a folder of safetensors (one file or
//! shards listed by `model.safetensors.index.json`) or one GGUF file.
//!
//! Model code asks for tensors by their Hugging Face names
//! (`model.layers.3.self_attn.q_proj`); the GGUF source maps them to
//! llama.cpp's names (`blk.3.attn_q`). Dense tensors come back in the model
//! dtype; GGUF matrices stay quantized inside [`Linear::Quantized`] on the
//! CPU and are dequantized to the model dtype on a GPU. A safetensors source
//! can quantize its language model's matrices into the same
//! [`Linear::Quantized`] while loading ([`Weights::quantized_at_load`]).
//! On the CPU with `dtype: 'auto'`, bf16 / f16 matrices (safetensors, GGUF
//! F16 / BF16) stay 16-bit in [`QuantWeight::Half`] ([`Weights::keeping_half`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{candle_message, ModelError, Result};
use crate::gguf_types::{explain_tensor_type, Iq4};
use crate::half_matmul::{HalfDType, HalfMatrix};
use crate::load_progress::LoadProgress;
use crate::quant::{Activations, BlockMatrix, BlockType};
use crate::quantize::Quantization;

/// A CPU matrix multiplied by our own kernels without widening it as a
/// whole: GGUF blocks ([`BlockMatrix`]; candle's `QMatMul` for block types
/// we have no kernel for) or 16-bit floats ([`HalfMatrix`]), with its role.
#[derive(Debug, Clone)]
pub enum QuantWeight {
    Blocks(Arc<BlockMatrix>, Role),
    Candle(QMatMul),
    Half(Arc<HalfMatrix>, Role),
}

/// What a matrix computes, which decides how each row of a product is
/// multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Decoder and encoder matrices: the rows of sequences decoding one
    /// token ([`DecodeRows`]) take the exact f32 kernels, or 8-bit
    /// activations where the block format has an integer kernel; the other
    /// rows (prompts, encoder inputs) take the bf16 matrix engine where the
    /// CPU has one ([`crate::panel_gemm`]), else 16-bit activations in
    /// integers for block formats ([`Activations::Int16`]), else f32.
    Body,
    /// The logits: prompt rows f32; decode rows of block-quantized heads 8-bit
    /// with the candidates for the top recomputed in f32
    /// ([`Activations::Int8Top`]: 8-bit rounding alone flips small models'
    /// answers, see the `quant` module comment).
    Logits,
}

/// The rows of a decoder step that belong to sequences decoding one token
/// (the others are prompt rows). How a row is multiplied follows its
/// sequence, not the step's size, so a sequence gets the same numbers alone
/// and batched with others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeRows {
    None,
    All,
    /// These rows (increasing) and no others.
    Some(Vec<u32>),
}

impl DecodeRows {
    /// The decode rows of a step whose sequences add `query_lens` tokens
    /// each, in order.
    pub fn of_step(query_lens: impl IntoIterator<Item = usize>) -> Self {
        Self::of_flags(
            query_lens
                .into_iter()
                .flat_map(|len| std::iter::repeat_n(len == 1, len)),
        )
    }

    /// The rows flagged `true`, of as many rows as there are flags.
    pub fn of_flags(flags: impl IntoIterator<Item = bool>) -> Self {
        let (mut rows, mut n) = (Vec::new(), 0usize);
        for decode in flags {
            if decode {
                rows.push(n as u32);
            }
            n += 1;
        }
        match rows.len() {
            0 => Self::None,
            k if k == n => Self::All,
            _ => Self::Some(rows),
        }
    }
}

impl QuantWeight {
    /// `x` as prompt or encoder rows (no decode rows).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_rows(x, &DecodeRows::None)
    }

    /// `x`, the activations of a decoder step, each row multiplied as its
    /// kind ([`DecodeRows`]) and this matrix's [`Role`] say.
    pub fn forward_rows(&self, x: &Tensor, rows: &DecodeRows) -> candle_core::Result<Tensor> {
        let engine = if crate::panel_gemm::bf16_engine().is_some() {
            Activations::Bf16
        } else {
            Activations::F32
        };
        let (decode, other) = match self {
            Self::Blocks(_, Role::Body) if engine == Activations::F32 => {
                (Activations::Int8, Activations::Int16)
            }
            Self::Blocks(_, Role::Body) => (Activations::Int8, engine),
            Self::Blocks(_, Role::Logits) => (Activations::Int8Top, Activations::F32),
            Self::Half(_, Role::Body) => (Activations::F32, engine),
            _ => (Activations::F32, Activations::F32),
        };
        match rows {
            _ if decode == other => self.product(x, other),
            DecodeRows::None => self.product(x, other),
            DecodeRows::All => self.product(x, decode),
            DecodeRows::Some(rows) => {
                let n = x.dim(0)?;
                let dev = x.device();
                let mut is_decode = vec![false; n];
                for &r in rows {
                    is_decode[r as usize] = true;
                }
                let rest: Vec<u32> = (0..n as u32).filter(|&r| !is_decode[r as usize]).collect();
                let pick = |idx: &[u32]| x.index_select(&Tensor::new(idx, dev)?, 0);
                let y = Tensor::cat(
                    &[
                        self.product(&pick(rows)?, decode)?,
                        self.product(&pick(&rest)?, other)?,
                    ],
                    0,
                )?;
                // Back to the step's row order.
                let mut back = vec![0u32; n];
                for (j, &r) in rows.iter().chain(&rest).enumerate() {
                    back[r as usize] = j as u32;
                }
                y.index_select(&Tensor::new(back.as_slice(), dev)?, 0)
            }
        }
    }

    fn product(&self, x: &Tensor, acts: Activations) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(b, _) => b.forward(x, acts),
            Self::Half(h, _) => h.forward(x, acts),
            Self::Candle(q) => q.forward(x),
        }
    }

    pub fn out_dim(&self) -> candle_core::Result<usize> {
        match self {
            Self::Blocks(b, _) => Ok(b.dims().0),
            Self::Half(h, _) => Ok(h.dims().0),
            Self::Candle(QMatMul::QTensor(q)) => q.shape().dims2().map(|d| d.0),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dim(0),
        }
    }
}

/// A projection `[tokens, in] -> [tokens, out]`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `weight` is `[out, in]` in the model dtype.
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// A GGUF block-quantized or 16-bit matrix, multiplied without widening it as a whole.
    Quantized {
        weight: QuantWeight,
        bias: Option<Tensor>,
    },
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_rows(x, &DecodeRows::None)
    }

    /// [`Linear::forward`] of a decoder step's activations ([`DecodeRows`]).
    pub fn forward_rows(&self, x: &Tensor, rows: &DecodeRows) -> candle_core::Result<Tensor> {
        let (y, bias) = match self {
            Self::Dense { weight, bias } => (x.matmul(&weight.t()?)?, bias),
            Self::Quantized { weight, bias } => (weight.forward_rows(x, rows)?, bias),
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The same projection as the logits ([`Role::Logits`]: f32 rows).
    pub fn for_logits(self) -> Self {
        match self {
            Self::Quantized {
                weight: QuantWeight::Blocks(b, _),
                bias,
            } => {
                b.prepare_logits();
                Self::Quantized {
                    weight: QuantWeight::Blocks(b, Role::Logits),
                    bias,
                }
            }
            Self::Quantized {
                weight: QuantWeight::Half(h, _),
                bias,
            } => Self::Quantized {
                weight: QuantWeight::Half(h, Role::Logits),
                bias,
            },
            other => other,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> candle_core::Result<usize> {
        match self {
            Self::Dense { weight, .. } => weight.dim(0),
            Self::Quantized { weight, .. } => weight.out_dim(),
        }
    }

    /// One projection computing all of `parts` (same input), their outputs
    /// side by side; `None` when they cannot be stacked (mixed kinds or
    /// quantization types, some with bias and some without).
    pub fn stack(parts: &[&Linear]) -> candle_core::Result<Option<Linear>> {
        if parts.is_empty() {
            return Ok(None);
        }
        let biases: Vec<Option<&Tensor>> = parts
            .iter()
            .map(|p| match p {
                Self::Dense { bias, .. } | Self::Quantized { bias, .. } => bias.as_ref(),
            })
            .collect();
        let bias = if biases.iter().all(|b| b.is_some()) {
            let bs: Vec<&Tensor> = biases.iter().flatten().copied().collect();
            Some(Tensor::cat(&bs, 0)?)
        } else if biases.iter().all(|b| b.is_none()) {
            None
        } else {
            return Ok(None);
        };
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match p {
                Self::Dense { weight, .. } => Some(weight),
                _ => None,
            })
            .collect();
        if let Some(ws) = dense {
            return Ok(Some(Self::Dense {
                weight: Tensor::cat(&ws, 0)?,
                bias,
            }));
        }
        let weights: Vec<&QuantWeight> = parts
            .iter()
            .filter_map(|p| match p {
                Self::Quantized { weight, .. } => Some(weight),
                _ => None,
            })
            .collect();
        if weights.len() != parts.len() {
            return Ok(None);
        }
        let blocks: Option<Vec<&BlockMatrix>> = weights
            .iter()
            .map(|w| match w {
                QuantWeight::Blocks(b, Role::Body) => Some(b.as_ref()),
                _ => None,
            })
            .collect();
        let halves: Option<Vec<&HalfMatrix>> = weights
            .iter()
            .map(|w| match w {
                QuantWeight::Half(h, Role::Body) => Some(h.as_ref()),
                _ => None,
            })
            .collect();
        let weight = if let Some(bs) = blocks {
            BlockMatrix::stack(&bs).map(|b| QuantWeight::Blocks(Arc::new(b), Role::Body))
        } else {
            halves
                .and_then(|hs| HalfMatrix::stack(&hs))
                .map(|h| QuantWeight::Half(Arc::new(h), Role::Body))
        };
        Ok(weight.map(|weight| Self::Quantized { weight, bias }))
    }
}

/// Projections of one input (q/k/v, gate/up) run as a single matmul when
/// their weights stack, else one by one.
#[derive(Debug, Clone)]
pub enum MultiLinear {
    Fused { linear: Linear, sizes: Vec<usize> },
    Separate(Vec<Linear>),
}

impl MultiLinear {
    pub fn new(parts: Vec<Linear>) -> candle_core::Result<Self> {
        let refs: Vec<&Linear> = parts.iter().collect();
        match Linear::stack(&refs)? {
            Some(linear) => {
                let sizes = parts
                    .iter()
                    .map(|p| p.out_dim())
                    .collect::<candle_core::Result<_>>()?;
                Ok(Self::Fused { linear, sizes })
            }
            None => Ok(Self::Separate(parts)),
        }
    }

    /// One `[tokens, out_i]` output per part.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.forward_rows(x, &DecodeRows::None)
    }

    /// [`MultiLinear::forward`] of a decoder step ([`DecodeRows`]).
    pub fn forward_rows(&self, x: &Tensor, rows: &DecodeRows) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward_rows(x, rows)).collect(),
            Self::Fused { linear, sizes } => {
                let y = linear.forward_rows(x, rows)?;
                let mut off = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(1, off, n);
                        off += n;
                        part
                    })
                    .collect()
            }
        }
    }
}

/// Token embeddings: a dense table, or GGUF blocks / 16-bit rows decoded
/// per looked-up row.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Blocks {
        table: Arc<BlockMatrix>,
        dtype: DType,
    },
    Half {
        table: Arc<HalfMatrix>,
        dtype: DType,
    },
}

impl Embedding {
    /// Rows of `ids` (u32 `[tokens]`) as `[tokens, hidden]` in the model dtype.
    pub fn forward(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(t) => t.index_select(&Tensor::from_slice(ids, ids.len(), device)?, 0),
            Self::Blocks { table, dtype } => table.embedding(ids, device)?.to_dtype(*dtype),
            Self::Half { table, dtype } => table.embedding(ids, device)?.to_dtype(*dtype),
        }
    }

    /// The same matrix as an output projection (tied embeddings).
    pub fn as_linear(&self) -> Linear {
        match self {
            Self::Dense(t) => Linear::Dense {
                weight: t.clone(),
                bias: None,
            },
            Self::Blocks { table, .. } => Linear::Quantized {
                weight: QuantWeight::Blocks(table.clone(), Role::Body),
                bias: None,
            },
            Self::Half { table, .. } => Linear::Quantized {
                weight: QuantWeight::Half(table.clone(), Role::Body),
                bias: None,
            },
        }
    }
}

/// A source of named tensors.
pub enum Weights {
    Safetensors {
        vb: VarBuilder<'static>,
        files: Vec<PathBuf>,
        /// Applied by [`Weights::linear`] and [`Weights::embedding`] now.
        quantize: Option<Quantization>,
        /// What [`Weights::for_language_model`] switches to.
        quantize_lm: Option<Quantization>,
        /// The checkpoint's 16-bit dtype when its matrices stay in it
        /// ([`Weights::keeping_half`]).
        half: Option<DType>,
        /// Counts the parameters read, when the load is watched.
        progress: Option<Arc<LoadProgress>>,
    },
    Gguf(GgufWeights),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Safetensors {
                files,
                vb,
                quantize_lm,
                half,
                ..
            } => f
                .debug_struct("Safetensors")
                .field("files", files)
                .field("dtype", &vb.dtype())
                .field("quantize_lm", quantize_lm)
                .field("half", half)
                .finish(),
            Self::Gguf(g) => f
                .debug_struct("Gguf")
                .field("path", &g.path)
                .field("dtype", &g.dtype)
                .finish(),
        }
    }
}

/// The safetensors files of a model folder: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`, else every
/// `model*.safetensors` (sorted).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::InvalidJson {
                what: "safetensors index",
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::InvalidJson {
                what: "safetensors index",
                path: index.clone(),
                message: "no weight_map object".into(),
            })?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut files = Vec::new();
        for name in names {
            // Shard names come from the file: keep them inside the folder.
            if name.contains('/') || name.contains('\\') || name.starts_with("..") {
                return Err(ModelError::InvalidJson {
                    what: "safetensors index",
                    path: index.clone(),
                    message: format!("shard name {name:?} is not a plain file name"),
                });
            }
            let p = dir.join(name);
            if !p.is_file() {
                return Err(ModelError::Weights {
                    path: p,
                    message: "shard listed in model.safetensors.index.json is missing".into(),
                });
            }
            files.push(p);
        }
        if files.is_empty() {
            return Err(ModelError::InvalidJson {
                what: "safetensors index",
                path: index,
                message: "weight_map lists no files".into(),
            });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "model.safetensors",
        });
    }
    Ok(files)
}

impl Weights {
    /// Memory-map the safetensors of a model folder; tensors are cast to
    /// `dtype` when fetched.
    pub fn from_safetensors_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        Self::from_safetensors_files(files, dtype, device)
    }

    pub fn from_safetensors_files(
        files: Vec<PathBuf>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // Read, not mapped: the process keeps only what the model holds.
        let reader = crate::safetensors_read::SafetensorsReader::open(&files)?;
        let vb = VarBuilder::from_backend(Box::new(reader), dtype, device.clone());
        Ok(Self::Safetensors {
            vb,
            files,
            quantize: None,
            quantize_lm: None,
            half: None,
            progress: None,
        })
    }

    /// The same source quantizing the language model's matrices (and, with
    /// `towers`, every matrix) to `q` as they are read. A GGUF source is
    /// quantized already: asking for it is an error.
    pub fn quantized_at_load(self, q: Option<Quantization>, towers: bool) -> Result<Self> {
        match self {
            Self::Safetensors {
                vb,
                files,
                half,
                progress,
                ..
            } => Ok(Self::Safetensors {
                vb,
                files,
                quantize: q.filter(|_| towers),
                quantize_lm: q,
                half,
                progress,
            }),
            Self::Gguf(g) if q.is_some() => Err(ModelError::Config(format!(
                "{} is a GGUF file, quantized already; quantization applies to safetensors checkpoints",
                g.path.display()
            ))),
            gguf => Ok(gguf),
        }
    }

    /// On the CPU, the same source keeping a bf16 / f16 checkpoint's
    /// matrices and embeddings 16-bit ([`HalfMatrix`], multiplied with
    /// activations in the model dtype) instead of casting them to it.
    /// Only for a checkpoint whose floating-point tensors all share one
    /// 16-bit dtype ([`checkpoint_dtype`]); others load as before.
    pub fn keeping_half(self, keep: bool) -> Result<Self> {
        match self {
            Self::Safetensors {
                vb,
                files,
                quantize,
                quantize_lm,
                progress,
                ..
            } => {
                let half = if keep && vb.device().is_cpu() {
                    checkpoint_dtype(&files)?.filter(|d| HalfDType::of(*d).is_some())
                } else {
                    None
                };
                Ok(Self::Safetensors {
                    vb,
                    files,
                    quantize,
                    quantize_lm,
                    half,
                    progress,
                })
            }
            Self::Gguf(mut g) => {
                g.keep_half = keep && g.device.is_cpu();
                Ok(Self::Gguf(g))
            }
        }
    }

    /// The same source counting the parameters it reads into `progress`.
    pub fn with_progress(self, progress: Option<Arc<LoadProgress>>) -> Self {
        match self {
            Self::Safetensors {
                vb,
                files,
                quantize,
                quantize_lm,
                half,
                ..
            } => Self::Safetensors {
                vb,
                files,
                quantize,
                quantize_lm,
                half,
                progress,
            },
            Self::Gguf(mut g) => {
                g.progress = progress;
                Self::Gguf(g)
            }
        }
    }

    /// The source of a language model's output head (and of its token
    /// embeddings when they are tied to it), when it differs from this one.
    pub fn for_output_head(&self) -> Option<Self> {
        match self {
            Self::Safetensors {
                vb,
                files,
                quantize: Some(q),
                quantize_lm,
                half,
                progress,
            } if q.output_head() != *q => Some(Self::Safetensors {
                vb: vb.clone(),
                files: files.clone(),
                quantize: Some(q.output_head()),
                quantize_lm: *quantize_lm,
                half: *half,
                progress: progress.clone(),
            }),
            _ => None,
        }
    }

    /// The source a language model loads from when it differs from this
    /// one: the same tensors, quantizing its matrices as asked at load.
    pub fn for_language_model(&self) -> Option<Self> {
        match self {
            Self::Safetensors {
                vb,
                files,
                quantize,
                quantize_lm,
                half,
                progress,
            } if quantize != quantize_lm => Some(Self::Safetensors {
                vb: vb.clone(),
                files: files.clone(),
                quantize: *quantize_lm,
                quantize_lm: *quantize_lm,
                half: *half,
                progress: progress.clone(),
            }),
            _ => None,
        }
    }

    pub fn from_gguf(gguf: GgufWeights) -> Self {
        Self::Gguf(gguf)
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Safetensors { vb, .. } => vb.dtype(),
            Self::Gguf(g) => g.dtype,
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Safetensors { vb, .. } => vb.device(),
            Self::Gguf(g) => &g.device,
        }
    }

    /// The same safetensors with every name looked up as `rename(name)`
    /// (a multimodal checkpoint's language model under its own prefix).
    pub fn renamed(&self, rename: impl Fn(&str) -> String + Send + Sync + 'static) -> Result<Self> {
        match self {
            Self::Safetensors {
                vb,
                files,
                quantize,
                quantize_lm,
                half,
                progress,
            } => Ok(Self::Safetensors {
                vb: vb.clone().rename_f(move |n: &str| rename(n)),
                files: files.clone(),
                quantize: *quantize,
                quantize_lm: *quantize_lm,
                half: *half,
                progress: progress.clone(),
            }),
            Self::Gguf(_) => Err(ModelError::Config(
                "multimodal GGUF checkpoints are not supported".into(),
            )),
        }
    }

    /// Dense `{prefix}.weight` and `{prefix}.bias` of a layer norm (`[dim]` each).
    pub fn layer_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
        Ok(candle_nn::LayerNorm::new(
            self.tensor(&format!("{prefix}.weight"), &[dim])?,
            self.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps,
        ))
    }

    /// Whether a tensor with this Hugging Face name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors { vb, .. } => vb.contains_tensor(name),
            Self::Gguf(g) => g.lookup(name).is_some(),
        }
    }

    /// A dense tensor in the model dtype, checked against `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Self::Safetensors {
                vb,
                files,
                progress,
                ..
            } => {
                if !vb.contains_tensor(name) {
                    return Err(ModelError::MissingTensor(name.to_string()));
                }
                let t = vb.get(shape, name).map_err(|e| ModelError::Weights {
                    path: files.first().cloned().unwrap_or_default(),
                    message: format!("{name}: {}", candle_message(&e)),
                })?;
                if let Some(p) = progress {
                    p.advance(t.elem_count() as u64);
                }
                Ok(t)
            }
            Self::Gguf(g) => {
                let q = g.qtensor(name)?;
                // llama.cpp's converter stores some vectors with an extra unit
                // axis (conv biases as [d, 1]): the same values, taken in the
                // shape asked for.
                let unit = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
                if unit(q.shape().dims()) != unit(shape) {
                    g.check_shape(name, &q, shape)?;
                }
                Ok(q.dequantize(&g.device)?.reshape(shape)?.to_dtype(g.dtype)?)
            }
        }
    }

    /// The token embedding table `name` (`[vocab, hidden]`).
    pub fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        if let Self::Gguf(g) = self {
            let gname = g
                .lookup(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            // Our block and 16-bit kernels are CPU code (`read_matrix` is
            // `None` on a GPU); elsewhere the table is dequantized.
            let dtype = g.dtype;
            match g.read_matrix(&[(&gname, vocab)], hidden)? {
                Some(QuantWeight::Blocks(table, _)) => {
                    return Ok(Embedding::Blocks { table, dtype })
                }
                Some(QuantWeight::Half(table, _)) => return Ok(Embedding::Half { table, dtype }),
                _ => {}
            }
            let q = g.qtensor_raw(&gname)?;
            g.check_shape(name, &q, &[vocab, hidden])?;
            return Ok(Embedding::Dense(q.dequantize(&g.device)?.to_dtype(dtype)?));
        }
        if let Some(h) = self.half_matrix(name, &[vocab, hidden])? {
            return Ok(Embedding::Half {
                table: Arc::new(h),
                dtype: self.dtype(),
            });
        }
        let table = self.matrix(name, &[vocab, hidden])?;
        Ok(match self.quantize_dense(&table)? {
            Some(b) => Embedding::Blocks {
                table: Arc::new(b),
                dtype: self.dtype(),
            },
            None => Embedding::Dense(table.to_dtype(self.dtype())?),
        })
    }

    /// Matrix `name` in the checkpoint's 16-bit dtype, when this source
    /// keeps it (and does not quantize).
    fn half_matrix(&self, name: &str, shape: &[usize]) -> Result<Option<HalfMatrix>> {
        match self {
            Self::Safetensors {
                quantize: None,
                half: Some(_),
                ..
            } => Ok(HalfMatrix::from_tensor(&self.matrix(name, shape)?)?),
            _ => Ok(None),
        }
    }

    /// Matrix `name` to keep or quantize: in the checkpoint's 16-bit dtype
    /// where it has one (quantizing widens row ranges itself, so a whole
    /// matrix is never widened at once), else in the model dtype.
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Self::Safetensors {
            vb,
            files,
            half: Some(dtype),
            progress,
            ..
        } = self
        else {
            return self.tensor(name, shape);
        };
        if !vb.contains_tensor(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        let t = vb
            .get_with_hints_dtype(shape, name, Default::default(), *dtype)
            .map_err(|e| ModelError::Weights {
                path: files.first().cloned().unwrap_or_default(),
                message: format!("{name}: {}", candle_message(&e)),
            })?;
        if let Some(p) = progress {
            p.advance(t.elem_count() as u64);
        }
        Ok(t)
    }

    /// A dense matrix as blocks when this source quantizes at load.
    fn quantize_dense(&self, w: &Tensor) -> Result<Option<BlockMatrix>> {
        match self {
            Self::Safetensors {
                quantize: Some(q), ..
            } => q.quantize(w),
            _ => Ok(None),
        }
    }

    /// Projections `parts` (prefix, output width) of one input width as one
    /// (q, k and v; gate and up). A GGUF file's matrices are read straight
    /// into the stacked matrix; other sources load each part and stack.
    pub fn stacked_linear(
        &self,
        parts: &[(&str, usize)],
        in_dim: usize,
        bias: bool,
    ) -> Result<MultiLinear> {
        if let Self::Gguf(g) = self {
            let names = parts
                .iter()
                .map(|&(prefix, rows)| {
                    let hf = format!("{prefix}.weight");
                    g.lookup(&hf)
                        .map(|n| (n, rows))
                        .ok_or(ModelError::MissingTensor(hf))
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<(&str, usize)> = names.iter().map(|(n, r)| (n.as_str(), *r)).collect();
            if let Some(weight) = g.read_matrix(&refs, in_dim)? {
                let bias = if bias {
                    let b = parts
                        .iter()
                        .map(|&(prefix, rows)| self.tensor(&format!("{prefix}.bias"), &[rows]))
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&b, 0)?)
                } else {
                    None
                };
                return Ok(MultiLinear::Fused {
                    linear: Linear::Quantized { weight, bias },
                    sizes: parts.iter().map(|p| p.1).collect(),
                });
            }
        }
        let linears = parts
            .iter()
            .map(|&(prefix, rows)| self.linear(prefix, in_dim, rows, bias))
            .collect::<Result<Vec<_>>>()?;
        Ok(MultiLinear::new(linears)?)
    }

    /// The projection `{prefix}.weight` (`[out, in]`) with an optional
    /// `{prefix}.bias` (`[out]`).
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let wname = format!("{prefix}.weight");
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        match self {
            Self::Safetensors { .. } => {
                if let Some(h) = self.half_matrix(&wname, &[out_dim, in_dim])? {
                    return Ok(Linear::Quantized {
                        weight: QuantWeight::Half(Arc::new(h), Role::Body),
                        bias,
                    });
                }
                let weight = self.matrix(&wname, &[out_dim, in_dim])?;
                Ok(match self.quantize_dense(&weight)? {
                    Some(b) => Linear::Quantized {
                        weight: QuantWeight::Blocks(Arc::new(b), Role::Body),
                        bias,
                    },
                    None => Linear::Dense {
                        weight: weight.to_dtype(self.dtype())?,
                        bias,
                    },
                })
            }
            Self::Gguf(g) => {
                let name = g
                    .lookup(&wname)
                    .ok_or_else(|| ModelError::MissingTensor(wname.clone()))?;
                if let Some(weight) = g.read_matrix(&[(&name, out_dim)], in_dim)? {
                    return Ok(Linear::Quantized { weight, bias });
                }
                let q = g.qtensor_raw(&name)?;
                g.check_shape(&wname, &q, &[out_dim, in_dim])?;
                Ok(g.linear_from_qtensor(q, bias)?)
            }
        }
    }
}

/// The one dtype of a safetensors checkpoint's floating-point tensors
/// (`None` when they mix dtypes), read from the files' headers alone.
pub fn checkpoint_dtype(files: &[PathBuf]) -> Result<Option<DType>> {
    let mut found: Option<DType> = None;
    for path in files {
        for t in crate::safetensors_read::read_header(path)?.tensors {
            let dtype = match crate::safetensors_read::dtype_of(&t.dtype) {
                Some(d) if d.is_float() => d,
                _ => continue,
            };
            match found {
                Some(d) if d != dtype => return Ok(None),
                _ => found = Some(dtype),
            }
        }
    }
    Ok(found)
}

/// [`Weights`] under a name prefix, as candle's `VarBuilder::pp`: a
/// module's loader names its tensors relative to itself (`w.pp("mlp")`,
/// then `linear("up_proj", ..)`), whatever the source (safetensors, or a
/// GGUF file, whose name map takes the full Hugging Face name).
#[derive(Clone)]
pub struct WeightsAt<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl Weights {
    /// These weights under `prefix`.
    pub fn pp(&self, prefix: impl std::fmt::Display) -> WeightsAt<'_> {
        WeightsAt {
            weights: self,
            prefix: prefix.to_string(),
        }
    }
}

impl<'a> WeightsAt<'a> {
    /// A deeper prefix (`pp("layers").pp(3)`).
    pub fn pp(&self, name: impl std::fmt::Display) -> WeightsAt<'a> {
        WeightsAt {
            weights: self.weights,
            prefix: self.name(&name.to_string()),
        }
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.name(name))
    }

    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.tensor(&self.name(name), shape)
    }

    pub fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        self.weights.linear(&self.name(name), in_dim, out_dim, bias)
    }

    /// [`Weights::stacked_linear`] under this prefix.
    pub fn stacked_linear(
        &self,
        parts: &[(&str, usize)],
        in_dim: usize,
        bias: bool,
    ) -> Result<MultiLinear> {
        let names: Vec<String> = parts.iter().map(|p| self.name(p.0)).collect();
        let parts: Vec<(&str, usize)> = names
            .iter()
            .zip(parts)
            .map(|(n, p)| (n.as_str(), p.1))
            .collect();
        self.weights.stacked_linear(&parts, in_dim, bias)
    }

    pub fn layer_norm(&self, name: &str, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
        self.weights.layer_norm(&self.name(name), dim, eps)
    }
}

/// Maps a Hugging Face tensor name to the names a GGUF file may store it
/// under, most specific first.
pub type NameMap = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// A parsed GGUF file with lazy tensor reads.
pub struct GgufWeights {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: Mutex<File>,
    pub dtype: DType,
    pub device: Device,
    /// F16 / BF16 matrices stay 16-bit on the CPU ([`Weights::keeping_half`]).
    keep_half: bool,
    /// Counts the parameters read, when the load is watched.
    pub progress: Option<Arc<LoadProgress>>,
    /// How Hugging Face names become this file's names (default: llama.cpp's
    /// decoder names, [`gguf_tensor_names`]).
    names: NameMap,
    /// Tensors stored as IQ4, listed in `content` as the Q8_0 they are read
    /// as ([`crate::gguf_types`]).
    iq4: std::collections::HashMap<String, Iq4>,
}

impl GgufWeights {
    /// Parse the header and metadata of a GGUF file; tensors are read when asked for.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let (content, iq4) =
            crate::gguf_types::read_content(&mut file).map_err(|e| ModelError::Gguf {
                path: path.to_path_buf(),
                message: explain_tensor_type(candle_message(&e)),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            dtype,
            device: device.clone(),
            keep_half: false,
            progress: None,
            names: Arc::new(gguf_tensor_names),
            iq4,
        })
    }

    /// Another GGUF file (an mmproj beside its language model) opened with
    /// this one's dtype, device and choice to keep 16-bit matrices 16-bit.
    pub fn open_beside(&self, path: &Path) -> Result<Self> {
        let mut g = Self::open(path, self.dtype, &self.device)?;
        g.keep_half = self.keep_half;
        Ok(g)
    }

    /// The same file read under another name map (an mmproj's towers).
    pub fn with_names(mut self, names: NameMap) -> Self {
        self.names = names;
        self
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// The GGUF name for a Hugging Face tensor name, if it exists in the file.
    fn lookup(&self, hf_name: &str) -> Option<String> {
        (self.names)(hf_name)
            .into_iter()
            .find(|n| self.content.tensor_infos.contains_key(n))
    }

    /// The shape of a tensor by its GGUF name.
    pub fn shape_of_raw(&self, gguf_name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(gguf_name)
            .map(|i| i.shape.dims().to_vec())
    }

    /// The shape of a tensor (Hugging Face name), without reading it.
    pub fn shape_of(&self, hf_name: &str) -> Option<Vec<usize>> {
        self.shape_of_raw(&self.lookup(hf_name)?)
    }

    /// Matrices `parts` (GGUF name, rows), each `[rows, k]`, read from the
    /// file straight into the CPU kernels' layout as one stacked matrix,
    /// with no intermediate copy (each copy of a multi-GB model into fresh
    /// memory costs seconds of page faults): block types, and F16 / BF16
    /// where kept 16-bit. `None` where the parts' types differ or are not
    /// such, and on other devices.
    pub fn read_matrix(&self, parts: &[(&str, usize)], k: usize) -> Result<Option<QuantWeight>> {
        let mut spans = Vec::with_capacity(parts.len());
        let mut dtype = None;
        for &(name, rows) in parts {
            let info = self
                .content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            if *info.shape.dims() != [rows, k] {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!(
                        "{name}: shape {:?}, expected [{rows}, {k}]",
                        info.shape.dims()
                    ),
                });
            }
            // IQ4 tensors are listed as Q8_0 (`gguf_types`): the type they
            // are stored as is the pair.
            let stored = (info.ggml_dtype, self.iq4.get(name).copied());
            if dtype.is_some_and(|d| d != stored) {
                return Ok(None);
            }
            dtype = Some(stored);
            spans.push((name, self.content.tensor_data_offset + info.offset));
        }
        let Some((dtype, iq4)) = dtype else {
            return Ok(None);
        };
        /// How our CPU kernels hold the matrix.
        enum Held {
            Half(HalfDType),
            Blocks(BlockType),
        }
        let held = match (dtype, iq4) {
            (_, Some(t)) => Some(Held::Blocks(t.block_type())),
            (GgmlDType::F16, None) => self.keep_half.then_some(Held::Half(HalfDType::F16)),
            (GgmlDType::BF16, None) => self.keep_half.then_some(Held::Half(HalfDType::Bf16)),
            (d, None) => BlockType::of_ggml(d).map(Held::Blocks),
        };
        let Some(held) = held.filter(|_| self.device.is_cpu()) else {
            return Ok(None);
        };
        let n = parts.iter().map(|p| p.1).sum::<usize>();
        // The header's shapes must fit the file before anything is allocated
        // for them (a hostile header could claim terabytes).
        let file_len = self
            .file
            .lock()
            .ok()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        for (&(name, rows), &(_, offset)) in parts.iter().zip(&spans) {
            let Some(bytes) = self.stored_bytes(name, rows, k, dtype) else {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!("{name}: rows of {k} values are not whole blocks"),
                });
            };
            if offset
                .checked_add(bytes as u64)
                .is_none_or(|end| end > file_len)
            {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!(
                        "{name}: [{rows}, {k}] {} runs past the end of the file",
                        self.iq4
                            .get(name)
                            .map_or(format!("{dtype:?}"), |t| t.name().into())
                    ),
                });
            }
        }
        // Each part's bytes at its share of the stacked buffer (rows are
        // equally long).
        let read = |dst: &mut [u8]| -> candle_core::Result<()> {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = self
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("file handle poisoned".into()))?;
            let row = dst.len() / n.max(1);
            let mut at = 0;
            for (&(_, rows), &(name, offset)) in parts.iter().zip(&spans) {
                let part = &mut dst[at..at + rows * row];
                let fail = |e: std::io::Error| candle_core::Error::Msg(format!("{name}: {e}"));
                file.seek(SeekFrom::Start(offset)).map_err(fail)?;
                file.read_exact(part).map_err(fail)?;
                at += rows * row;
            }
            Ok(())
        };
        let weight = match held {
            Held::Half(h) => {
                QuantWeight::Half(Arc::new(HalfMatrix::read(h, n, k, read)?), Role::Body)
            }
            Held::Blocks(b) => {
                QuantWeight::Blocks(Arc::new(BlockMatrix::read(b, n, k, read)?), Role::Body)
            }
        };
        if let Some(p) = &self.progress {
            p.advance((n * k) as u64);
        }
        Ok(Some(weight))
    }

    /// Read one tensor by its Hugging Face name.
    pub fn qtensor(&self, hf_name: &str) -> Result<Arc<QTensor>> {
        let name = self
            .lookup(hf_name)
            .ok_or_else(|| ModelError::MissingTensor(hf_name.to_string()))?;
        self.qtensor_raw(&name)
    }

    /// Bytes in the file of `rows` rows of `k` values of the tensor `name`,
    /// listed as `dtype`; `None` where rows are not whole blocks.
    fn stored_bytes(&self, name: &str, rows: usize, k: usize, dtype: GgmlDType) -> Option<usize> {
        match self.iq4.get(name) {
            Some(kind) => kind.stored_bytes(rows, k),
            None => k
                .is_multiple_of(dtype.block_size())
                .then(|| {
                    rows.checked_mul(k / dtype.block_size())?
                        .checked_mul(dtype.type_size())
                })
                .flatten(),
        }
    }

    /// Read one tensor by its GGUF name.
    pub fn qtensor_raw(&self, gguf_name: &str) -> Result<Arc<QTensor>> {
        let mut file = self.file.lock().map_err(|_| ModelError::Gguf {
            path: self.path.clone(),
            message: "file handle poisoned".into(),
        })?;
        let fail = |message: String| ModelError::Gguf {
            path: self.path.clone(),
            message: format!("{gguf_name}: {message}"),
        };
        let q = match (
            self.iq4.get(gguf_name),
            self.content.tensor_infos.get(gguf_name),
        ) {
            (Some(&kind), Some(info)) => self.read_iq4(&mut file, kind, info, &fail)?,
            _ => self
                .content
                .tensor(&mut *file, gguf_name, &self.device)
                .map_err(|e| fail(candle_message(&e)))?,
        };
        if let Some(p) = &self.progress {
            p.advance(q.shape().elem_count() as u64);
        }
        Ok(Arc::new(q))
    }

    /// An IQ4 tensor, transcoded to the Q8_0 it is listed as.
    fn read_iq4(
        &self,
        file: &mut File,
        kind: Iq4,
        info: &gguf_file::TensorInfo,
        fail: &dyn Fn(String) -> ModelError,
    ) -> Result<QTensor> {
        use std::io::{Seek, SeekFrom};
        let dims = info.shape.dims();
        let k = dims.last().copied().unwrap_or(1);
        let (rows, bytes) = dims[..dims.len().saturating_sub(1)]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|rows| Some((rows, kind.stored_bytes(rows, k)?)))
            .ok_or_else(|| {
                fail(format!(
                    "{} {dims:?}: rows of {k} values are not whole blocks",
                    kind.name()
                ))
            })?;
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        if (bytes as u64).saturating_add(start) > len {
            return Err(fail(format!(
                "{} {dims:?} runs past the end of the file",
                kind.name()
            )));
        }
        // Within the file (checked above), so `rows * k` does not overflow.
        let mut q8 = vec![0; Iq4::q8_0_bytes(rows * k)];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| kind.read_q8_0(file, rows, k, &mut q8))
            .map_err(|e| fail(e.to_string()))?;
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &q8,
            dims.to_vec(),
            &self.device,
        )
        .map_err(|e| fail(candle_message(&e)))
    }

    fn meta(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Gguf {
                path: self.path.clone(),
                message: format!("missing metadata key {key}"),
            })
    }

    fn bad_meta(&self, key: &str, e: candle_core::Error) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            message: format!("metadata {key}: {}", candle_message(&e)),
        }
    }

    /// An integer metadata value (any integer width).
    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        let n = match v {
            gguf_file::Value::U8(x) => *x as i128,
            gguf_file::Value::I8(x) => *x as i128,
            gguf_file::Value::U16(x) => *x as i128,
            gguf_file::Value::I16(x) => *x as i128,
            gguf_file::Value::U32(x) => *x as i128,
            gguf_file::Value::I32(x) => *x as i128,
            gguf_file::Value::U64(x) => *x as i128,
            gguf_file::Value::I64(x) => *x as i128,
            _ => {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!("metadata {key} is not an integer"),
                })
            }
        };
        usize::try_from(n).map_err(|_| ModelError::Gguf {
            path: self.path.clone(),
            message: format!("metadata {key} = {n} is out of range"),
        })
    }

    pub fn meta_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        if self.content.metadata.contains_key(key) {
            self.meta_usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let x = match v {
            gguf_file::Value::F32(x) => *x as f64,
            gguf_file::Value::F64(x) => *x,
            _ => self.meta_usize(key)? as f64,
        };
        Ok(Some(x))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| self.bad_meta(key, e))
    }

    pub fn meta_str_opt(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    /// A boolean metadata value.
    pub fn meta_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ModelError::Gguf {
                path: self.path.clone(),
                message: format!("metadata {key} is not a boolean"),
            }),
        }
    }

    /// An array of numbers.
    pub fn meta_f32_array_opt(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let items = v.to_vec().map_err(|e| self.bad_meta(key, e))?;
        items
            .iter()
            .map(|x| match x {
                gguf_file::Value::F32(f) => Ok(*f),
                gguf_file::Value::F64(f) => Ok(*f as f32),
                other => other
                    .to_u32()
                    .or_else(|_| other.to_i32().map(|i| i as u32))
                    .map(|i| i as f32)
                    .map_err(|e| self.bad_meta(key, e)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
    }

    pub fn has_raw(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    fn check_shape(&self, name: &str, q: &QTensor, shape: &[usize]) -> Result<()> {
        if q.shape().dims() != shape {
            return Err(ModelError::Gguf {
                path: self.path.clone(),
                message: format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    q.shape().dims()
                ),
            });
        }
        Ok(())
    }

    /// A projection from a GGUF matrix that [`Self::read_matrix`] did not
    /// take: float types become dense tensors in the model dtype, as does
    /// every type on a GPU (weights take f16 / bf16 size; cuBLAS GEMMs
    /// instead of candle's quantized CUDA kernels, whose prebuilt part
    /// targets one GPU generation only); other block types take candle's
    /// kernels.
    fn linear_from_qtensor(&self, q: Arc<QTensor>, bias: Option<Tensor>) -> Result<Linear> {
        match q.dtype() {
            _ if !self.device.is_cpu() => Ok(Linear::Dense {
                weight: q.dequantize(&self.device)?.to_dtype(self.dtype)?,
                bias,
            }),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(Linear::Dense {
                weight: q.dequantize(&self.device)?.to_dtype(self.dtype)?,
                bias,
            }),
            _ => Ok(Linear::Quantized {
                weight: QuantWeight::Candle(QMatMul::QTensor(q)),
                bias,
            }),
        }
    }
}

/// The names llama.cpp's converter may store a Hugging Face decoder tensor
/// under. `post_attention_layernorm` is the MLP's input norm (`ffn_norm`) in
/// llama-style blocks, but Gemma's sandwich blocks keep it as
/// `post_attention_norm` (their MLP input norm, `pre_feedforward_layernorm`,
/// is the `ffn_norm`): the sandwich name is tried first.
pub fn gguf_tensor_names(hf: &str) -> Vec<String> {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((layer, tail)) = rest.split_once(".post_attention_layernorm.") {
            return vec![
                format!("blk.{layer}.post_attention_norm.{tail}"),
                format!("blk.{layer}.ffn_norm.{tail}"),
            ];
        }
    }
    gguf_tensor_name(hf).into_iter().collect()
}

/// llama.cpp's tensor name for a Hugging Face decoder tensor name.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gg = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gg}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_gguf() {
        assert_eq!(
            gguf_tensor_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.12.self_attn.q_proj.bias").unwrap(),
            "blk.12.attn_q.bias"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.3.self_attn.k_norm.weight").unwrap(),
            "blk.3.attn_k_norm.weight"
        );
        assert!(gguf_tensor_name("model.layers.x.mlp.up_proj.weight").is_none());
        assert!(gguf_tensor_name("something.else").is_none());
    }

    #[test]
    fn dense_quantized_and_stacked_linears_agree() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 256), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 64, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (5, 256), &dev)?;
        let dense = Linear::Dense {
            weight: w.clone(),
            bias: Some(b.clone()),
        };
        // Reference: explicit sum.
        let (xv, wv, bv) = (
            x.to_vec2::<f32>()?,
            w.to_vec2::<f32>()?,
            b.to_vec1::<f32>()?,
        );
        let y = dense.forward(&x)?;
        let expect: f32 = (0..256).map(|k| xv[2][k] * wv[7][k]).sum::<f32>() + bv[7];
        assert!((y.to_vec2::<f32>()?[2][7] - expect).abs() < 1e-3);

        // The same weights quantized: candle's kernel and ours against the dequantized matrix.
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let wd = Linear::Dense {
            weight: q.dequantize(&dev)?,
            bias: Some(b.clone()),
        };
        let ours = Linear::Quantized {
            weight: QuantWeight::Blocks(
                Arc::new(BlockMatrix::from_qtensor(&q)?.expect("q8_0")),
                Role::Body,
            ),
            bias: Some(b.clone()),
        };
        let candle = Linear::Quantized {
            weight: QuantWeight::Candle(QMatMul::from_qtensor(q)?),
            bias: Some(b.clone()),
        };
        let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        let yd = wd.forward(&x)?;
        assert_eq!(ours.out_dim()?, 64);
        // Decode rows: our integer kernels (and candle's) quantize the
        // activations to 8 bits: close, not equal. Prompt rows take the bf16
        // engine where the CPU has one (close), else match the dequantized
        // matrix to rounding, as every row of the logits does.
        // Bounds relative to the largest output (random inputs).
        let scale = yd.abs()?.max_all()?.to_scalar::<f32>()?;
        let int8 = max_diff(&ours.forward_rows(&x, &DecodeRows::All)?, &yd)?;
        assert!(
            int8 < 0.02 * scale && int8 > 1e-4,
            "8-bit rows: {int8} of {scale}"
        );
        let candle_q8 = max_diff(&candle.forward(&x)?, &yd)?;
        assert!(candle_q8 < 0.02 * scale, "candle: {candle_q8} of {scale}");
        let prompt = max_diff(&ours.forward(&x)?, &yd)?;
        let bf16 = crate::panel_gemm::bf16_engine().is_some();
        if bf16 {
            assert!(
                prompt < 0.02 * scale && prompt > 1e-4,
                "bf16 prompt rows: {prompt} of {scale}"
            );
        } else {
            assert!(prompt < 1e-4, "f32 prompt rows: {prompt}");
        }
        // More than 8 prompt rows: without a bf16 engine, 16-bit activations
        // where the CPU has the integer prompt kernel.
        let x12 = Tensor::randn(0f32, 1.0, (12, 256), &dev)?;
        let want12 = wd.forward(&x12)?;
        let scale12 = want12.abs()?.max_all()?.to_scalar::<f32>()?;
        let prompt12 = max_diff(&ours.forward(&x12)?, &want12)?;
        if !bf16 && crate::quant::int16_kernel().is_some() {
            assert!(
                prompt12 < 1e-4 * scale12 && prompt12 > 0.0,
                "16-bit prompt rows: {prompt12} of {scale12}"
            );
        } else if !bf16 {
            assert!(prompt12 < 1e-4, "f32 prompt rows: {prompt12}");
        }
        // The logits: prompt rows f32; decode rows 8-bit but for the top
        // (`Activations::Int8Top`), which is the f32 product's.
        let logits = ours.clone().for_logits();
        let top = logits.forward_rows(&x, &DecodeRows::All)?;
        assert!(max_diff(&top, &yd)? < 0.02 * scale);
        let (best, want) = (top.argmax(1)?, yd.argmax(1)?);
        assert_eq!(best.to_vec1::<u32>()?, want.to_vec1::<u32>()?);
        let at = |t: &Tensor| t.gather(&want.unsqueeze(1)?, 1);
        assert!(max_diff(&at(&top)?, &at(&yd)?)? < 1e-4);
        assert!(max_diff(&logits.forward(&x)?, &yd)? < 1e-4);
        // A step mixing decode rows (1 and 3) with prompt rows: each row as
        // it would be alone, bit for bit where the kernel is the same for
        // any row count (the integer kernels, the bf16 engines); f32 prompt
        // rows take kernels by row count, equal up to summation order.
        let mixed = ours.forward_rows(&x, &DecodeRows::Some(vec![1, 3]))?;
        for r in 0..5 {
            let row = x.narrow(0, r, 1)?;
            let got = mixed.narrow(0, r, 1)?;
            let decode = r == 1 || r == 3;
            let alone = if decode {
                ours.forward_rows(&row, &DecodeRows::All)?
            } else {
                ours.forward(&row)?
            };
            if decode || bf16 {
                assert_eq!(got.to_vec2::<f32>()?, alone.to_vec2::<f32>()?, "row {r}");
            } else {
                let d = max_diff(&got, &alone)?;
                assert!(d < 1e-5 * scale, "f32 prompt row {r}: {d} of {scale}");
            }
        }
        assert_eq!(DecodeRows::of_step([1, 1]), DecodeRows::All);
        assert_eq!(DecodeRows::of_step([5, 7]), DecodeRows::None);
        assert_eq!(DecodeRows::of_step([1, 4, 1]), DecodeRows::Some(vec![0, 5]));

        // Stacking: one fused projection gives the parts side by side.
        let w2 = Tensor::randn(0f32, 1.0, (16, 256), &dev)?;
        let b2 = Tensor::randn(0f32, 1.0, 16, &dev)?;
        let second = Linear::Dense {
            weight: w2,
            bias: Some(b2),
        };
        let multi = MultiLinear::new(vec![dense.clone(), second.clone()])?;
        assert!(matches!(multi, MultiLinear::Fused { .. }));
        let outs = multi.forward(&x)?;
        // (GEMM blocking differs with the width: a few ulps on values ~30.)
        let d0 = max_diff(&outs[0], &dense.forward(&x)?)?;
        let d1 = max_diff(&outs[1], &second.forward(&x)?)?;
        assert!(
            d0 < 1e-4 && d1 < 1e-4,
            "stacked outputs differ by {d0}, {d1}"
        );
        // Mixed kinds stay separate.
        assert!(matches!(
            MultiLinear::new(vec![dense, ours])?,
            MultiLinear::Separate(_)
        ));
        Ok(())
    }

    #[test]
    fn missing_folder_files_are_reported() {
        let dir =
            std::env::temp_dir().join(format!("candela-weights-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = safetensors_files(&dir).unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
        std::fs::write(dir.join("model.safetensors"), b"garbage!garbage!").unwrap();
        let err = Weights::from_safetensors_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("not a valid safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
