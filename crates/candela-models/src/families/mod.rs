//! Model families, one module each (config, towers, projector, processor,
//! weight names), and the one table that finds a checkpoint's family: by a
//! folder's `config.json` `architectures`, a GGUF file's
//! `general.architecture`, or an mmproj file's projector type
//! (`clip.projector_type`; see [`crate::mmproj`]). Adding a family = its
//! module + one line in [`FAMILIES`].

pub mod gemma3;
pub mod llama;
pub mod llava;
pub mod llava_onevision;
pub mod qwen2;
pub mod qwen2_audio;
pub mod qwen2_vl;
pub mod qwen3;
pub mod whisper;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela_core::model::Model;
use candle_core::{DType, Device};
use serde_json::Value;

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::load_progress::LoadProgress;
use crate::mmproj::{BuiltPair, GgufPair};
use crate::nn::decoder::{DecoderConfig, DecoderLm};
use crate::processor::MmProcessor;
use crate::quantize::Quantization;
use crate::weights::{GgufWeights, Weights};
use crate::Tokenizer;

/// Every family candela loads, text-only first.
pub const FAMILIES: &[Family] = &[
    llama::FAMILY,
    qwen2::FAMILY,
    qwen3::FAMILY,
    gemma3::FAMILY,
    qwen2_vl::FAMILY,
    qwen2_audio::FAMILY,
    llava::FAMILY,
    llava_onevision::FAMILY,
    gemma3::VISION_FAMILY,
    whisper::FAMILY,
];

/// One family: the names it is found by and how it loads.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    /// `config.json` `architectures` names, e.g. `LlamaForCausalLM`.
    pub hf_architectures: &'static [&'static str],
    /// GGUF `general.architecture` names, e.g. `llama`.
    pub gguf_architectures: &'static [&'static str],
    pub load_folder: fn(&Checkpoint) -> Result<Built>,
    /// A GGUF language model's decoder config, from its metadata and the
    /// most positions to serve (its tensors load by llama.cpp's names).
    pub gguf_config: Option<GgufConfig>,
    /// The llama.cpp mmproj files whose towers this family loads.
    pub mmproj: Option<MmprojFamily>,
}

/// A decoder config from a GGUF file's metadata and the most positions to serve.
pub type GgufConfig = fn(&GgufWeights, Option<usize>) -> Result<DecoderConfig>;

/// How a family loads from a text GGUF + mmproj pair.
#[derive(Debug)]
pub struct MmprojFamily {
    /// `clip.projector_type` (or `clip.vision.projector_type` /
    /// `clip.audio.projector_type`) values, e.g. `mlp`, `gemma3`.
    pub projector_types: &'static [&'static str],
    /// `general.architecture` of the language-model GGUFs it pairs with.
    pub text_architectures: &'static [&'static str],
    pub load: fn(GgufPair) -> Result<BuiltPair>,
}

/// A model folder being loaded.
pub struct Checkpoint<'a> {
    pub dir: &'a Path,
    /// `config.json`, parsed.
    pub config: &'a Value,
    pub dtype: DType,
    pub device: &'a Device,
    /// Serve at most this many positions.
    pub max_model_len: Option<usize>,
    /// Quantize the language model's matrices to this block format.
    pub quantization: Option<Quantization>,
    /// Keep a bf16 / f16 checkpoint's matrices 16-bit on the CPU
    /// ([`Weights::keeping_half`]; `dtype: 'auto'`).
    pub keep_half: bool,
    /// Quantize the vision / audio towers' matrices too.
    pub quantize_towers: bool,
    /// Counts the parameters read, when the load is watched.
    pub progress: Option<Arc<LoadProgress>>,
    /// The checkpoint's tokenizer (processors that write text around an item
    /// tokenize it as the model's own processor does).
    pub tokenizer: &'a Tokenizer,
}

impl Checkpoint<'_> {
    /// The folder's safetensors.
    pub fn weights(&self) -> Result<Weights> {
        Weights::from_safetensors_dir(self.dir, self.dtype, self.device)?
            .quantized_at_load(self.quantization, self.quantize_towers)?
            .keeping_half(self.keep_half)
            .map(|w| w.with_progress(self.progress.clone()))
    }

    /// A JSON file of the folder as text, when present.
    pub fn read_optional(&self, file: &str) -> Result<Option<(PathBuf, String)>> {
        let p = self.dir.join(file);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
        Ok(Some((p, text)))
    }

    /// A file the family needs, or a clear error naming it.
    pub fn read_required(&self, file: &'static str) -> Result<(PathBuf, String)> {
        self.read_optional(file)?
            .ok_or_else(|| ModelError::MissingFile {
                dir: self.dir.to_path_buf(),
                file,
            })
    }
}

/// What a family's loader returns.
pub struct Built {
    pub model: Box<dyn Model>,
    /// Media preprocessing, for models that take more than text.
    pub processor: Option<Arc<dyn MmProcessor>>,
    /// The language model's config (special tokens, generation defaults).
    pub text: HfConfig,
}

/// The family of a folder whose `config.json` names `architecture`.
pub fn by_hf_architecture(architecture: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.hf_architectures.contains(&architecture))
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            name: architecture.to_string(),
            supported: FAMILIES
                .iter()
                .flat_map(|f| f.hf_architectures.iter().copied())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The family of a GGUF file whose `general.architecture` is `name`.
pub fn by_gguf_architecture(name: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.gguf_config.is_some() && f.gguf_architectures.contains(&name))
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            name: name.to_string(),
            supported: format!(
                "{} (GGUF general.architecture)",
                FAMILIES
                    .iter()
                    .flat_map(|f| f.gguf_architectures.iter().copied())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// The family of an mmproj file's projector type, or (as the error) the
/// projector types candela loads.
pub fn by_mmproj_projector(projector_type: &str) -> std::result::Result<&'static Family, String> {
    let registered = || FAMILIES.iter().filter_map(|f| f.mmproj.as_ref());
    FAMILIES
        .iter()
        .find(|f| {
            f.mmproj
                .as_ref()
                .is_some_and(|m| m.projector_types.contains(&projector_type))
        })
        .ok_or_else(|| {
            registered()
                .flat_map(|m| m.projector_types.iter().copied())
                .collect::<Vec<_>>()
                .join(", ")
        })
}

/// The families whose mmproj files pair with a `arch` language-model GGUF.
pub fn mmproj_families_for_text(arch: &str) -> Vec<&'static str> {
    FAMILIES
        .iter()
        .filter(|f| {
            f.mmproj
                .as_ref()
                .is_some_and(|m| m.text_architectures.contains(&arch))
        })
        .map(|f| f.name)
        .collect()
}

/// A text-only decoder from a folder: `config.json` as the LM's config.
fn text_folder(
    ck: &Checkpoint,
    config: fn(&HfConfig, Option<usize>) -> Result<DecoderConfig>,
) -> Result<Built> {
    let text = HfConfig::from_json_str(&ck.config.to_string())?;
    let model = DecoderLm::load(config(&text, ck.max_model_len)?, &ck.weights()?)?;
    Ok(Built {
        model: Box::new(model),
        processor: None,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(
            by_hf_architecture("Qwen3ForCausalLM").unwrap().name,
            "qwen3"
        );
        assert_eq!(
            by_hf_architecture("Qwen2_5_VLForConditionalGeneration")
                .unwrap()
                .name,
            "qwen2_vl"
        );
        assert_eq!(by_gguf_architecture("llama").unwrap().name, "llama");
        let err = by_hf_architecture("MambaForCausalLM")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MambaForCausalLM")
                && err.contains("LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
            "{err}"
        );
        assert_eq!(by_gguf_architecture("gemma3").unwrap().name, "gemma3");
        assert!(by_gguf_architecture("mamba")
            .unwrap_err()
            .to_string()
            .contains("llama, qwen2, qwen3, gemma3"));
        assert_eq!(by_mmproj_projector("mlp").unwrap().name, "llava");
        assert_eq!(by_mmproj_projector("gemma3").unwrap().name, "gemma3");
        assert_eq!(
            by_mmproj_projector("qwen2.5vl_merger").unwrap().name,
            "qwen2_vl"
        );
        assert_eq!(by_mmproj_projector("qwen2a").unwrap().name, "qwen2_audio");
        assert!(by_mmproj_projector("pixtral").unwrap_err().contains("mlp"));
    }

    #[test]
    fn every_name_belongs_to_one_family() {
        let mut seen = std::collections::HashSet::new();
        let mut projectors = std::collections::HashSet::new();
        for f in FAMILIES {
            for n in f.hf_architectures.iter().chain(f.gguf_architectures) {
                assert!(seen.insert(*n), "{n} is registered twice");
            }
            for p in f.mmproj.iter().flat_map(|m| m.projector_types.iter()) {
                assert!(projectors.insert(*p), "projector {p} is registered twice");
            }
        }
    }
}
