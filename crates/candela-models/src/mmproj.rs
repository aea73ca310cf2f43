//! llama.cpp's multimodal pair: a language-model GGUF plus an mmproj GGUF
//! (`general.architecture = "clip"`) holding the media towers and projector
//! under `v.*` (vision), `a.*` (audio) and `mm.*` (projector) names, with
//! `clip.*` metadata (`clip.projector_type`, or `clip.vision.projector_type`
//! / `clip.audio.projector_type` in files with both). The family is found by
//! projector type ([`crate::families::by_mmproj_projector`]); it checks the
//! pair and builds its encoder from the mmproj and its language model from the
//! text GGUF.
//!
//! Tensors keep their stored type where our kernels take it: quantized
//! matrices (Q8_0, k-quants...) stay blocks run by `quant.rs` on the CPU;
//! F16 / BF16 / F32 matrices are widened to the model dtype at load (f32 on
//! the CPU unless `dtype` says otherwise), as a GGUF language model's are.

use std::path::Path;
use std::sync::Arc;

use crate::error::{ModelError, Result};
use crate::families::{self, Family};
use crate::nn::decoder::DecoderConfig;
use crate::processor::MmProcessor;
use crate::weights::{GgufWeights, NameMap, Weights};
use crate::Tokenizer;

/// `general.architecture` of every mmproj file.
pub const MMPROJ_ARCHITECTURE: &str = "clip";

/// Which tower a projector type belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Vision,
    Audio,
}

/// An opened mmproj file: its metadata, its tensors read on demand.
pub struct Mmproj {
    gguf: GgufWeights,
}

impl Mmproj {
    /// Open `path` beside the language model `text` (its dtype, device and
    /// 16-bit choice: F16 / BF16 matrices stay 16-bit on the CPU with
    /// `dtype: 'auto'`, quantized ones stay blocks) and check it is an
    /// mmproj file.
    pub fn open(path: &Path, text: &GgufWeights) -> Result<Self> {
        let gguf = text.open_beside(path)?;
        let arch = gguf.architecture()?;
        if arch != MMPROJ_ARCHITECTURE {
            return Err(ModelError::Gguf {
                path: path.to_path_buf(),
                message: format!(
                    "not an mmproj file: general.architecture is {arch:?}, an mmproj's is \"clip\""
                ),
            });
        }
        Ok(Self { gguf })
    }

    pub fn path(&self) -> &Path {
        &self.gguf.path
    }

    /// The file's metadata and tensors by their GGUF names.
    pub fn gguf(&self) -> &GgufWeights {
        &self.gguf
    }

    /// The projector type of each tower the file holds.
    pub fn projector_types(&self) -> Vec<(Tower, &str)> {
        let g = &self.gguf;
        let mut out = Vec::new();
        for (tower, key) in [
            (Tower::Vision, "clip.vision.projector_type"),
            (Tower::Audio, "clip.audio.projector_type"),
        ] {
            if let Some(t) = g.meta_str_opt(key) {
                out.push((tower, t));
            }
        }
        if out.is_empty() {
            if let Some(t) = g.meta_str_opt("clip.projector_type") {
                let audio = g
                    .meta_bool_opt("clip.has_audio_encoder")
                    .ok()
                    .flatten()
                    .unwrap_or(false)
                    && !g
                        .meta_bool_opt("clip.has_vision_encoder")
                        .ok()
                        .flatten()
                        .unwrap_or(false);
                out.push((if audio { Tower::Audio } else { Tower::Vision }, t));
            }
        }
        out
    }

    /// An integer `clip.{tower}.{key}`.
    pub fn usize(&self, tower: Tower, key: &str) -> Result<usize> {
        self.gguf.meta_usize(&tower_key(tower, key))
    }

    pub fn usize_opt(&self, tower: Tower, key: &str) -> Result<Option<usize>> {
        self.gguf.meta_usize_opt(&tower_key(tower, key))
    }

    pub fn f64_opt(&self, tower: Tower, key: &str) -> Result<Option<f64>> {
        self.gguf.meta_f64_opt(&tower_key(tower, key))
    }

    /// A 3-value array (`image_mean`, `image_std`).
    pub fn rgb(&self, tower: Tower, key: &str) -> Result<[f32; 3]> {
        let k = tower_key(tower, key);
        let v = self
            .gguf
            .meta_f32_array_opt(&k)?
            .ok_or_else(|| self.bad(format!("missing metadata key {k}")))?;
        <[f32; 3]>::try_from(v.as_slice())
            .map_err(|_| self.bad(format!("{k} has {} values, expected 3", v.len())))
    }

    /// The shape of a tensor by its GGUF name.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.gguf
            .shape_of_raw(name)
            .ok_or_else(|| self.bad(format!("missing tensor {name}")))
    }

    /// An error about this file's content.
    pub fn bad(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.gguf.path.clone(),
            message,
        }
    }

    /// The ViT tensor names of this file for a tower whose Hugging Face
    /// names sit under `prefix` (`v` or `a`): see [`vit_tensor_names`].
    /// llama.cpp's older CLIP converter (LLaVA-1.5's) wrote `mlp.fc1` as
    /// `ffn_down` and `mlp.fc2` as `ffn_up`; which one a file has is read
    /// from the first block's shapes, as clip.cpp does.
    pub fn vit_names(&self, prefix: &'static str, hidden: usize) -> NameMap {
        let swapped = self
            .gguf
            .shape_of_raw(&format!("{prefix}.blk.0.ffn_down.weight"))
            .is_some_and(|d| d.len() == 2 && d[1] == hidden && d[0] != hidden);
        Arc::new(move |n: &str| vit_tensor_names(prefix, n, swapped))
    }

    /// The tensors, read under `names` (names it does not map are looked
    /// up as they are: `mm.*` projector tensors).
    pub fn into_weights(self, names: NameMap) -> Weights {
        Weights::from_gguf(self.gguf.with_names(names))
    }
}

fn tower_key(tower: Tower, key: &str) -> String {
    match tower {
        Tower::Vision => format!("clip.vision.{key}"),
        Tower::Audio => format!("clip.audio.{key}"),
    }
}

/// llama.cpp's name for a CLIP / SigLIP tower tensor given by its Hugging
/// Face name under `prefix` (`v.embeddings.patch_embedding.weight` ->
/// `v.patch_embd.weight`, `v.encoder.layers.3.self_attn.q_proj.bias` ->
/// `v.blk.3.attn_q.bias`); any other name is returned unchanged.
pub fn vit_tensor_names(prefix: &str, hf: &str, ffn_swapped: bool) -> Vec<String> {
    let Some(rest) = hf.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
        return vec![hf.to_string()];
    };
    let fixed = match rest {
        "embeddings.patch_embedding.weight" => Some("patch_embd.weight"),
        "embeddings.patch_embedding.bias" => Some("patch_embd.bias"),
        "embeddings.class_embedding" => Some("class_embd"),
        "embeddings.position_embedding.weight" => Some("position_embd.weight"),
        "pre_layrnorm.weight" => Some("pre_ln.weight"),
        "pre_layrnorm.bias" => Some("pre_ln.bias"),
        "post_layernorm.weight" => Some("post_ln.weight"),
        "post_layernorm.bias" => Some("post_ln.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return vec![format!("{prefix}.{f}")];
    }
    let mapped = rest
        .strip_prefix("encoder.layers.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(layer, r)| {
            let (module, suffix) = r.rsplit_once('.')?;
            let gg = match module {
                "layer_norm1" => "ln1",
                "layer_norm2" => "ln2",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.out_proj" => "attn_out",
                "mlp.fc1" if ffn_swapped => "ffn_down",
                "mlp.fc1" => "ffn_up",
                "mlp.fc2" if ffn_swapped => "ffn_up",
                "mlp.fc2" => "ffn_down",
                _ => return None,
            };
            Some(format!("{prefix}.blk.{layer}.{gg}.{suffix}"))
        });
    vec![mapped.unwrap_or_else(|| hf.to_string())]
}

/// What an mmproj family's loader gets: both files, the text GGUF's
/// tokenizer, and the serving limits.
pub struct GgufPair<'a> {
    /// The language model's GGUF (metadata; its tensors are `text_weights`).
    pub text: &'a GgufWeights,
    pub text_weights: &'a Weights,
    pub mmproj: Mmproj,
    pub tokenizer: &'a Tokenizer,
    pub max_model_len: Option<usize>,
}

/// What an mmproj family builds.
pub struct BuiltPair {
    pub model: Box<dyn candela_core::model::Model>,
    pub processor: Arc<dyn MmProcessor>,
}

impl GgufPair<'_> {
    /// An error saying the two files do not belong together.
    pub fn mismatch(&self, message: String) -> ModelError {
        ModelError::MmprojMismatch {
            model: self.text.path.clone(),
            mmproj: self.mmproj.path().to_path_buf(),
            message,
        }
    }

    /// The decoder config of the text GGUF, by its own family.
    pub fn text_config(&self) -> Result<DecoderConfig> {
        let arch = self.text.architecture()?;
        let config = families::by_gguf_architecture(arch)?
            .gguf_config
            .ok_or_else(|| self.mismatch(format!("{arch} has no GGUF language model loader")))?;
        config(self.text, self.max_model_len)
    }

    /// Checks the projector's output rows are as wide as the language
    /// model's embeddings.
    pub fn check_embedding_size(&self, projector_out: usize, lm: &DecoderConfig) -> Result<()> {
        if projector_out != lm.hidden_size {
            return Err(self.mismatch(format!(
                "the projector makes {projector_out}-wide embeddings, the language model's are {}",
                lm.hidden_size
            )));
        }
        Ok(())
    }

    /// The id of a special token of the text GGUF's vocabulary.
    pub fn token_id(&self, token: &str) -> Result<u32> {
        self.tokenizer.token_to_id(token).ok_or_else(|| {
            self.mismatch(format!(
                "the language model's vocabulary has no {token:?} token"
            ))
        })
    }
}

/// Load a text GGUF (already open as `text`) with the mmproj at `mmproj_path`.
pub fn load_pair(
    text: &GgufWeights,
    text_weights: &Weights,
    mmproj_path: &Path,
    tokenizer: &Tokenizer,
    max_model_len: Option<usize>,
) -> Result<BuiltPair> {
    let mmproj = Mmproj::open(mmproj_path, text)?;
    let types: Vec<(Tower, String)> = mmproj
        .projector_types()
        .into_iter()
        .map(|(t, p)| (t, p.to_string()))
        .collect();
    if types.is_empty() {
        return Err(mmproj.bad("no clip.projector_type metadata".into()));
    }
    let mut family: Option<&'static Family> = None;
    for (_, t) in &types {
        let f = families::by_mmproj_projector(t).map_err(|supported| {
            mmproj.bad(format!(
                "projector type {t:?} is not supported (supported: {supported})"
            ))
        })?;
        if family.is_some_and(|g| !std::ptr::eq(g, f)) {
            return Err(mmproj.bad(format!(
                "its projectors {types:?} belong to different model families"
            )));
        }
        family = Some(f);
    }
    let family = family.expect("one projector type at least");
    let spec = family.mmproj.as_ref().expect("found by its mmproj entry");
    let arch = text.architecture()?.to_string();
    let pair = GgufPair {
        text,
        text_weights,
        mmproj,
        tokenizer,
        max_model_len,
    };
    if !spec.text_architectures.contains(&arch.as_str()) {
        let takers = families::mmproj_families_for_text(&arch);
        let hint = if takers.is_empty() {
            format!("no multimodal family candela loads takes a {arch} language model")
        } else {
            format!(
                "a {arch} language model pairs with {} mmproj files",
                takers.join(", ")
            )
        };
        return Err(pair.mismatch(format!(
            "the mmproj is {}'s (projector type {}), whose language model is {}; the GGUF is a {arch} model ({hint})",
            family.name,
            types
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(" + "),
            spec.text_architectures.join(" or "),
        )));
    }
    (spec.load)(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_names_follow_llama_cpp() {
        let n = |hf: &str, swapped| vit_tensor_names("v", hf, swapped);
        assert_eq!(
            n("v.embeddings.patch_embedding.weight", false),
            ["v.patch_embd.weight"]
        );
        assert_eq!(n("v.embeddings.class_embedding", false), ["v.class_embd"]);
        assert_eq!(n("v.pre_layrnorm.bias", false), ["v.pre_ln.bias"]);
        assert_eq!(
            n("v.encoder.layers.11.self_attn.out_proj.weight", false),
            ["v.blk.11.attn_out.weight"]
        );
        assert_eq!(
            n("v.encoder.layers.0.mlp.fc1.bias", false),
            ["v.blk.0.ffn_up.bias"]
        );
        // LLaVA-1.5's converter wrote fc1 as ffn_down.
        assert_eq!(
            n("v.encoder.layers.0.mlp.fc1.bias", true),
            ["v.blk.0.ffn_down.bias"]
        );
        assert_eq!(
            n("v.encoder.layers.0.mlp.fc2.weight", true),
            ["v.blk.0.ffn_up.weight"]
        );
        // Projector tensors are asked for by their GGUF names.
        assert_eq!(n("mm.0.weight", false), ["mm.0.weight"]);
        assert_eq!(
            vit_tensor_names("a", "a.encoder.layers.2.layer_norm1.weight", false),
            ["a.blk.2.ln1.weight"]
        );
    }
}
