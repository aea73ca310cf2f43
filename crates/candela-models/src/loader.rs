//! One call from a path to a runnable model: weights, tokenizer, chat
//! template and generation defaults.
//!
//! A path is either a model folder (`config.json`, safetensors, tokenizer
//! files) or a `.gguf` file (weights, tokenizer and template in one).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela_core::model::{Model, ModelSpec};
use candle_core::{DType, Device};
use serde_json::Value;

use crate::chat_template::{resolve_template_source, ChatTemplate};
use crate::config::GenerationConfig;
use crate::error::{ModelError, Result};
use crate::families::{self, Checkpoint};
use crate::nn::decoder::DecoderLm;
use crate::processor::MmProcessor;
use crate::quantize::Quantization;
use crate::tokenizer::{read_json, Tokenizer};
use crate::weights::{GgufWeights, Weights};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// "auto" (f32 on the CPU, bf16 on CUDA: not the checkpoint's own dtype
    /// yet), "f32"/"float32", "bf16"/"bfloat16", "f16"/"float16".
    pub dtype: Option<String>,
    /// "cpu", or (CUDA builds) "cuda" / "cuda:N".
    pub device: String,
    /// A template file path or the template text; overrides the model's.
    pub chat_template: Option<String>,
    /// Serve at most this many positions (default: the model's maximum).
    pub max_model_len: Option<usize>,
    /// Quantize a safetensors checkpoint's language model at load:
    /// "q8_0", "q6_k", "q5_k", "q4_k" or "q4_0" (CPU only).
    pub quantization: Option<String>,
    /// llama.cpp's mmproj file (media towers + projector) for a GGUF
    /// language model.
    pub mmproj: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            device: "cpu".into(),
            chat_template: None,
            max_model_len: None,
            quantization: None,
            mmproj: None,
        }
    }
}

/// Sampling and stopping defaults shipped with the model
/// (`generation_config.json`, or GGUF metadata).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Every token id that ends generation (generation config, config.json
    /// and the tokenizer's EOS, without duplicates).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

pub struct LoadedModel {
    pub model: Box<dyn Model>,
    pub tokenizer: Arc<Tokenizer>,
    /// None when the model ships no template and none was given.
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
    pub spec: ModelSpec,
    pub model_name: String,
    /// Media preprocessing, for models that take more than text.
    pub processor: Option<Arc<dyn MmProcessor>>,
    /// The block format the language model was quantized to at load.
    pub quantization: Option<Quantization>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model_name", &self.model_name)
            .field("spec", &self.spec)
            .field("generation", &self.generation)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl LoadedModel {
    /// The chat template, or a clear error when the model has none.
    pub fn require_chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!(
                "model {} has no chat template; pass one explicitly (chat_template option)",
                self.model_name
            ))
        })
    }
}

/// Parse a dtype name. `auto` (and None) is f32 on CPU.
pub fn parse_dtype(name: Option<&str>, device: &Device) -> Result<DType> {
    let n = name.unwrap_or("auto").trim().to_ascii_lowercase();
    Ok(match n.as_str() {
        "auto" => match device {
            Device::Cpu => DType::F32,
            _ => DType::BF16,
        },
        "f32" | "float32" | "float" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" | "half" => DType::F16,
        _ => return Err(ModelError::UnsupportedDType(n)),
    })
}

/// Parse a quantization name; block matrices run on the CPU only.
pub fn parse_quantization(name: Option<&str>, device: &Device) -> Result<Option<Quantization>> {
    let Some(q) = name.map(Quantization::parse).transpose()? else {
        return Ok(None);
    };
    if !device.is_cpu() {
        return Err(ModelError::UnsupportedQuantization(format!(
            "{q} on {device:?}: quantization at load is for the CPU; load 16-bit weights on a GPU"
        )));
    }
    Ok(Some(q))
}

/// Parse a device name: "cpu", or "cuda" / "gpu" / "cuda:N" (GPU N, default
/// 0), which needs a build with the `cuda` feature and a GPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let n = name.trim().to_ascii_lowercase();
    if n.is_empty() || n == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match n.as_str() {
        "cuda" | "gpu" => 0,
        _ => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => return Err(ModelError::UnsupportedDevice(name.to_string())),
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(ModelError::NoCuda(name.to_string()));
    }
    // One stream of its own rather than the per-thread default stream: the
    // forward runs on a rayon worker and sampling on the engine thread, and
    // their work must stay ordered on the GPU.
    Device::new_cuda_with_stream(ordinal).map_err(|e| ModelError::NoGpu {
        device: name.to_string(),
        message: crate::error::candle_message(&e),
    })
}

/// Why `device` cannot be used, or None when it can: the cheap probe behind
/// `device: 'auto'` (a CUDA context is created and dropped).
pub fn device_unavailable(device: &str) -> Option<String> {
    parse_device(device).err().map(|e| e.to_string())
}

/// Load a model folder or a `.gguf` file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(ModelError::MissingPath(path.to_path_buf()));
    }
    let device = parse_device(&opts.device)?;
    let dtype = parse_dtype(opts.dtype.as_deref(), &device)?;
    let quantization = parse_quantization(opts.quantization.as_deref(), &device)?;
    if let Some(mm) = &opts.mmproj {
        if !mm.is_file() {
            return Err(ModelError::MissingPath(mm.clone()));
        }
        if path.is_dir() {
            return Err(ModelError::Config(format!(
                "an mmproj file ({}) goes with a GGUF language model; {} is a model folder",
                mm.display(),
                path.display()
            )));
        }
    }
    if path.is_dir() {
        load_dir(path, dtype, &device, quantization, opts)
    } else if path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        if quantization.is_some() {
            return Err(ModelError::Config(format!(
                "{} is a GGUF file, quantized already; quantization applies to safetensors checkpoints",
                path.display()
            )));
        }
        load_gguf(path, dtype, &device, opts)
    } else {
        Err(ModelError::Config(format!(
            "{} is neither a model folder nor a .gguf file",
            path.display()
        )))
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

fn name_of(path: &Path) -> String {
    let p: PathBuf = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    p.file_stem()
        .or_else(|| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn load_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    quantization: Option<Quantization>,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "config.json",
        });
    }
    let raw: Value = read_json(&cfg_path, "config.json")?;
    let arch_name = raw
        .pointer("/architectures/0")
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::InvalidJson {
            what: "config.json",
            path: cfg_path.clone(),
            message: "no \"architectures\" entry".into(),
        })?;
    let family = families::by_hf_architecture(arch_name)?;

    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg: Option<Value> = if tok_cfg_path.is_file() {
        Some(read_json(&tok_cfg_path, "tokenizer_config.json")?)
    } else {
        None
    };
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "tokenizer.json",
        });
    }
    let tokenizer = Tokenizer::from_file(&tok_path, tok_cfg.as_ref())?;

    let gen_path = dir.join("generation_config.json");
    let gen = if gen_path.is_file() {
        GenerationConfig::from_file(&gen_path)?
    } else {
        GenerationConfig::default()
    };

    let template_src = resolve_template_source(
        opts.chat_template.as_deref(),
        Some(dir),
        tok_cfg.as_ref(),
        None,
    )?;
    let chat_template = template_src
        .map(|src| make_template(src, &tokenizer))
        .transpose()?;

    let ck = Checkpoint {
        dir,
        config: &raw,
        dtype,
        device,
        max_model_len: opts.max_model_len,
        quantization,
        tokenizer: &tokenizer,
    };
    let families::Built {
        model,
        processor,
        text: cfg,
    } = (family.load_folder)(&ck)?;
    let spec = model.spec().clone();

    let mut eos = Vec::new();
    for id in gen
        .eos_token_id
        .as_ref()
        .or(cfg.eos_token_id.as_ref())
        .map(|e| e.to_vec())
        .unwrap_or_default()
    {
        push_unique(&mut eos, id);
    }
    if let Some(id) = tokenizer.eos_token_id() {
        push_unique(&mut eos, id);
    }
    let generation = GenerationDefaults {
        eos_token_ids: eos,
        bos_token_id: gen
            .bos_token_id
            .as_ref()
            .or(cfg.bos_token_id.as_ref())
            .and_then(|b| b.first())
            .or_else(|| tokenizer.bos_token_id()),
        temperature: gen.temperature,
        top_p: gen.top_p,
        top_k: gen.top_k,
        min_p: gen.min_p,
        repetition_penalty: gen.repetition_penalty,
        max_new_tokens: gen.max_new_tokens,
    };
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        chat_template,
        generation,
        spec,
        model_name: name_of(dir),
        processor,
        quantization,
    })
}

fn make_template(src: String, tok: &Tokenizer) -> Result<ChatTemplate> {
    Ok(ChatTemplate::new(
        src,
        tok.bos_token().map(str::to_string),
        tok.eos_token().map(str::to_string),
    )?
    .with_token("unk_token", tok.unk_token())
    .with_token("pad_token", tok.pad_token()))
}

fn load_gguf(
    path: &Path,
    dtype: DType,
    device: &Device,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let gguf = GgufWeights::open(path, dtype, device)?;
    if gguf.architecture()? == crate::mmproj::MMPROJ_ARCHITECTURE {
        return Err(ModelError::Config(format!(
            "{} is an mmproj file (a multimodal model's media towers); load the language model's GGUF with it as mmproj",
            path.display()
        )));
    }
    let tokenizer = Tokenizer::from_gguf(gguf.metadata())?;
    let template_src = resolve_template_source(
        opts.chat_template.as_deref(),
        None,
        None,
        gguf.meta_str_opt("tokenizer.chat_template"),
    )?;
    let chat_template = template_src
        .map(|src| make_template(src, &tokenizer))
        .transpose()?;

    let mut eos = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = gguf.meta_usize_opt(key)? {
            push_unique(&mut eos, id as u32);
        }
    }
    let bos = gguf
        .meta_usize_opt("tokenizer.ggml.bos_token_id")?
        .map(|b| b as u32);

    let weights = Weights::from_gguf(gguf);
    let Weights::Gguf(g) = &weights else {
        return Err(ModelError::Config("internal: GGUF weights expected".into()));
    };
    let (model, processor): (Box<dyn Model>, Option<Arc<dyn MmProcessor>>) = match &opts.mmproj {
        Some(mm) => {
            let pair = crate::mmproj::load_pair(g, &weights, mm, &tokenizer, opts.max_model_len)?;
            (pair.model, Some(pair.processor))
        }
        None => {
            let family = families::by_gguf_architecture(g.architecture()?)?;
            let config = family.gguf_config.ok_or_else(|| {
                ModelError::Config(format!(
                    "internal: family {} has no GGUF loader",
                    family.name
                ))
            })?;
            let lm = DecoderLm::load(config(g, opts.max_model_len)?, &weights)?;
            (Box::new(lm), None)
        }
    };
    let spec = model.spec().clone();
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        chat_template,
        generation: GenerationDefaults {
            eos_token_ids: eos,
            bos_token_id: bos,
            ..Default::default()
        },
        spec,
        model_name: name_of(path),
        processor,
        quantization: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_and_device_names() {
        let cpu = Device::Cpu;
        assert_eq!(parse_dtype(None, &cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype(Some("auto"), &cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype(Some("bfloat16"), &cpu).unwrap(), DType::BF16);
        assert_eq!(parse_dtype(Some("F16"), &cpu).unwrap(), DType::F16);
        assert_eq!(parse_dtype(Some("float32"), &cpu).unwrap(), DType::F32);
        assert!(parse_dtype(Some("int8"), &cpu)
            .unwrap_err()
            .to_string()
            .contains("int8"));
        assert!(parse_device("cpu").is_ok());
        if cfg!(feature = "cuda") {
            // A CUDA build: either a GPU is there or the error says none was found.
            if let Err(e) = parse_device("cuda:1000") {
                assert!(e.to_string().contains("no CUDA GPU was found"), "{e}");
            }
        } else {
            assert!(parse_device("cuda")
                .unwrap_err()
                .to_string()
                .contains("this build has no CUDA support"));
            assert!(parse_device("cuda:1")
                .unwrap_err()
                .to_string()
                .contains("no CUDA support"));
            assert!(device_unavailable("gpu")
                .unwrap()
                .contains("no CUDA support"));
        }
        assert!(device_unavailable("cpu").is_none());
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }

    #[test]
    fn clear_errors_for_bad_paths() {
        let err = load(Path::new("/definitely/not/here"), &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, ModelError::MissingPath(_)), "{err}");

        let dir = std::env::temp_dir().join(format!("candela-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = load(&dir, &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");

        std::fs::write(
            dir.join("config.json"),
            r#"{"architectures":["GPTNeoXForCausalLM"],"hidden_size":8,"intermediate_size":8,
               "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":8}"#,
        )
        .unwrap();
        let err = load(&dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(
            err.contains("GPTNeoXForCausalLM") && err.contains("LlamaForCausalLM"),
            "{err}"
        );

        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        let err = load(&dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");

        let opts = LoadOptions {
            device: "cuda".into(),
            ..Default::default()
        };
        let err = load(&dir, &opts).unwrap_err().to_string();
        if !cfg!(feature = "cuda") {
            assert!(err.contains("no CUDA support"), "{err}");
        }

        let bogus = dir.join("model.gguf");
        std::fs::write(&bogus, b"GGUFnonsense").unwrap();
        let err = load(&bogus, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, ModelError::Gguf { .. }), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
