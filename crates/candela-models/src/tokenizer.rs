//! Text <-> token ids, wrapping Hugging Face `tokenizers`.
//!
//! Sources: a model folder's `tokenizer.json` (+ `tokenizer_config.json` for
//! special-token names and BOS handling), or the `tokenizer.ggml.*`
//! metadata of a GGUF file. For GGUF byte-level BPE vocabularies
//! (`tokenizer.ggml.model = "gpt2"`) we rebuild the same pipeline as the
//! original `tokenizer.json`: the pre-tokenizer regexes llama.cpp uses for
//! each `tokenizer.ggml.pre`, applied as `Split` pre-tokenizers followed by
//! a regex-free `ByteLevel`, so both tokenize identically. SentencePiece
//! vocabularies (`"llama"`: pieces, scores, token types) become the BPE
//! pipeline transformers writes for them, merges derived from the scores.

use std::collections::HashMap;
use std::path::Path;

use candela_core::model::TokenDecoder;
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use tokenizers::processors::template::TemplateProcessing;

use crate::error::{ModelError, Result};

/// A tokenizer plus the special tokens that chat templates and stopping need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    /// Longest vocabulary entry in UTF-8 bytes: no token stands for more
    /// text than this (byte-level and SentencePiece spellings only inflate).
    max_token_bytes: usize,
}

fn longest_token(inner: &tokenizers::Tokenizer) -> usize {
    inner
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(1)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// A special token in `tokenizer_config.json`: a string or an AddedToken dict.
fn special_token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Tokenizer classes whose BOS/EOS handling transformers rebuilds from
/// `add_bos_token` / `add_eos_token` (their `update_post_processor`).
const BOS_FLAG_CLASSES: &[&str] = &[
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

impl Tokenizer {
    /// From `tokenizer.json` and, if present, `tokenizer_config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_path_buf(),
                file: "tokenizer.json",
            });
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            Some(read_json(&cfg_path, "tokenizer_config.json")?)
        } else {
            None
        };
        Self::from_file(&path, cfg.as_ref())
    }

    /// From a `tokenizer.json` file and an optional parsed `tokenizer_config.json`.
    pub fn from_file(tokenizer_json: &Path, config: Option<&Value>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
            ModelError::InvalidJson {
                what: "tokenizer.json",
                path: tokenizer_json.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        Self::from_parts(inner, config)
    }

    /// From an already built tokenizer and an optional `tokenizer_config.json`.
    pub fn from_parts(mut inner: tokenizers::Tokenizer, config: Option<&Value>) -> Result<Self> {
        let empty = Value::Null;
        let cfg = config.unwrap_or(&empty);
        let bos_token = special_token_name(cfg.get("bos_token"));
        let eos_token = special_token_name(cfg.get("eos_token"));
        let pad_token = special_token_name(cfg.get("pad_token"));
        let unk_token = special_token_name(cfg.get("unk_token"));

        let class = cfg
            .get("tokenizer_class")
            .and_then(|c| c.as_str())
            .unwrap_or("");
        if BOS_FLAG_CLASSES.contains(&class) {
            let add_bos = cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            let add_eos = cfg
                .get("add_eos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let bos = bos_token
                .as_deref()
                .and_then(|t| inner.token_to_id(t).map(|id| (t, id)));
            let eos = eos_token
                .as_deref()
                .and_then(|t| inner.token_to_id(t).map(|id| (t, id)));
            if let Some(pp) = bos_eos_template(
                add_bos.then_some(bos).flatten(),
                add_eos.then_some(eos).flatten(),
            )? {
                inner.with_post_processor(Some(pp));
            }
        }
        Ok(Self {
            max_token_bytes: longest_token(&inner),
            inner,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
        })
    }

    /// From GGUF `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`) or
    /// SentencePiece BPE (`llama`).
    pub fn from_gguf(metadata: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        let model = gguf_str(metadata, "tokenizer.ggml.model")?;
        let tokens = gguf_str_array(metadata, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|x| {
                    x.to_i32()
                        .map(|i| i as i64)
                        .or_else(|_| x.to_u32().map(|u| u as i64))
                })
                .collect::<candle_core::Result<_>>()
                .map_err(tok_err)?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer has {} tokens but {} token types",
                tokens.len(),
                types.len()
            )));
        }
        let mut vocab = serde_json::Map::new();
        for (id, t) in tokens.iter().enumerate() {
            vocab.insert((*t).to_string(), json!(id));
        }
        // Control tokens (3) are special added tokens; user-defined ones (4)
        // are added tokens that are not special, as in the original file.
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
            .map(|(id, (t, ty))| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": *ty != 3, "special": *ty == 3})
            })
            .collect();
        let unk = metadata
            .get("tokenizer.ggml.unknown_token_id")
            .and_then(|v| v.to_u32().ok())
            .and_then(|id| tokens.get(id as usize))
            .map(|t| t.to_string());
        let (spec, add_bos_default) = match model {
            "gpt2" => byte_level_spec(metadata, vocab, added, unk)?,
            "llama" => (sentencepiece_spec(metadata, &tokens, &types, vocab, added, unk)?, true),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF tokenizer model {other:?} is not supported (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece); \
                     use the model folder's tokenizer.json instead"
                )))
            }
        };
        let mut inner: tokenizers::Tokenizer = serde_json::from_value(spec)
            .map_err(|e| ModelError::Tokenizer(format!("GGUF tokenizer: {e}")))?;

        let token_of = |key: &str| -> Option<(String, u32)> {
            let id = metadata.get(key)?.to_u32().ok()?;
            tokens.get(id as usize).map(|t| (t.to_string(), id))
        };
        let bos = token_of("tokenizer.ggml.bos_token_id");
        let eos = token_of("tokenizer.ggml.eos_token_id");
        let add_bos = metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(add_bos_default);
        let add_eos = metadata
            .get("tokenizer.ggml.add_eos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos_ref = bos.as_ref().map(|(t, id)| (t.as_str(), *id));
        let eos_ref = eos.as_ref().map(|(t, id)| (t.as_str(), *id));
        if let Some(pp) = bos_eos_template(
            add_bos.then_some(bos_ref).flatten(),
            add_eos.then_some(eos_ref).flatten(),
        )? {
            inner.with_post_processor(Some(pp));
        }
        Ok(Self {
            max_token_bytes: longest_token(&inner),
            inner,
            bos_token: bos.map(|b| b.0),
            eos_token: eos.map(|e| e.0),
            pad_token: token_of("tokenizer.ggml.padding_token_id").map(|p| p.0),
            unk_token: token_of("tokenizer.ggml.unknown_token_id").map(|u| u.0),
        })
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's
    /// post-processor adds BOS (and EOS) where the model expects them;
    /// text rendered from a chat template already has them: pass false.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Bytes of text a single token can stand for, at most (see
    /// [`Self::min_tokens`]).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// A lower bound on the tokens of `bytes` bytes of text, known before
    /// tokenizing it: a prompt longer than the context is refused without
    /// the work (normalizers can shrink text, by at most ~3x for NFKC
    /// ligatures; the bound allows 4x).
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes / (4 * self.max_token_bytes)
    }

    /// The tokenizer as `tokenizer.json` would hold it (for readers of the
    /// vocabulary such as the structured-output grammar compiler).
    pub fn to_json(&self) -> Result<Value> {
        let text = self.inner.to_string(false).map_err(tok_err)?;
        serde_json::from_str(&text).map_err(tok_err)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The wrapped `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl TokenDecoder for Tokenizer {
    fn decode(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> std::result::Result<String, String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| e.to_string())
    }
}

/// A `TemplateProcessing` adding BOS before and/or EOS after each sequence.
fn bos_eos_template(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((b, id)) = bos {
        single.push(format!("{b}:0"));
        specials.push((b.to_string(), id));
    }
    single.push("$A:0".to_string());
    if let Some((e, id)) = eos {
        single.push(format!("{e}:0"));
        if !specials.iter().any(|(t, _)| t == e) {
            specials.push((e.to_string(), id));
        }
    }
    pair.extend(single.iter().cloned());
    if let Some((b, _)) = bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((e, _)) = eos {
        pair.push(format!("{e}:1"));
    }
    let tp = TemplateProcessing::builder()
        .try_single(single)
        .map_err(tok_err)?
        .try_pair(pair)
        .map_err(tok_err)?
        .special_tokens(specials)
        .build()
        .map_err(tok_err)?;
    Ok(Some(tp))
}

/// How a GGUF `tokenizer.ggml.pre` splits text before byte-level BPE.
struct PreTokenizerRecipe {
    /// Regexes applied in order, each isolating its matches.
    splits: &'static [&'static str],
    nfc: bool,
    ignore_merges: bool,
    add_bos_default: bool,
    /// SentencePiece-style BPE over `▁`-escaped spaces with byte fallback
    /// (Gemma's tokenizer.json, llama.cpp's `escape_whitespaces` types)
    /// instead of byte-level BPE.
    escape_whitespace: bool,
}

/// GPT-2's byte-level split (tokenizers' `ByteLevel` with `use_regex`).
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const SUPPORTED_PRE: &str =
    "gpt2, gpt-2, smollm, starcoder, refact, codeshell, llama3, llama-v3, llama-bpe, falcon3, qwen2, deepseek-r1-qwen, gemma4, granite-embed-multi-311m";

impl PreTokenizerRecipe {
    fn for_pre(pre: &str) -> Result<Self> {
        let r = |splits, nfc, ignore_merges, add_bos_default| Self {
            splits,
            nfc,
            ignore_merges,
            add_bos_default,
            escape_whitespace: false,
        };
        Ok(match pre {
            "gpt2" | "gpt-2" => r(&[GPT2_RE], false, false, false),
            // llama.cpp isolates every digit first, then applies GPT-2's
            // regex; tokenizers writes the same as Digits(individual) +
            // ByteLevel(use_regex).
            "smollm" | "starcoder" | "refact" | "codeshell" => {
                r(&[r"\p{N}", GPT2_RE], false, false, false)
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => r(&[LLAMA3_RE], false, true, true),
            "qwen2" | "deepseek-r1-qwen" => r(&[QWEN2_RE], true, false, false),
            // What llama.cpp's converter names a Gemma tokenizer.json
            // without tokenizer.model (its pre-tokenizer hash matches these).
            "gemma4" | "granite-embed-multi-311m" => Self {
                escape_whitespace: true,
                ..r(&[], false, false, true)
            },
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer {other:?} is not supported (supported: {SUPPORTED_PRE})"
                )))
            }
        })
    }
}

/// The byte-level BPE pipeline of a `gpt2` GGUF vocabulary (and Gemma's
/// `▁`-escaped BPE, which llama.cpp also files under `gpt2`), and whether
/// its models add BOS by default.
fn byte_level_spec(
    metadata: &HashMap<String, gguf_file::Value>,
    vocab: serde_json::Map<String, Value>,
    added: Vec<Value>,
    unk: Option<String>,
) -> Result<(Value, bool)> {
    let merges = gguf_str_array(metadata, "tokenizer.ggml.merges")?;
    let pre = metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(|s| s.as_str())
        .unwrap_or("default");
    let pipeline = PreTokenizerRecipe::for_pre(pre)?;

    let spec = if pipeline.escape_whitespace {
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab, "merges": known_merges(&merges, &vocab),
            }
        })
    } else {
        let mut pretoks: Vec<Value> = pipeline
            .splits
            .iter()
            .map(|re| {
                json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
            })
            .collect();
        pretoks.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
        let normalizer = if pipeline.nfc {
            json!({"type": "NFC"})
        } else {
            Value::Null
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretoks},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": pipeline.ignore_merges,
                "vocab": vocab, "merges": merges,
            }
        })
    };
    Ok((spec, pipeline.add_bos_default))
}

/// The pipeline of a SentencePiece BPE vocabulary (`tokenizer.ggml.model =
/// "llama"`), as the model's own `tokenizer.json` has it: `▁` for spaces,
/// one prepended to every text segment (also after special tokens, as
/// llama.cpp and Llama's legacy tokenizers do), `<0xXX>` byte fallback.
fn sentencepiece_spec(
    metadata: &HashMap<String, gguf_file::Value>,
    tokens: &[&str],
    types: &[i64],
    vocab: serde_json::Map<String, Value>,
    added: Vec<Value>,
    unk: Option<String>,
) -> Result<Value> {
    let scores: Vec<f32> = match metadata.get("tokenizer.ggml.scores") {
        Some(v) => v
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|s| s.to_f32())
            .collect::<candle_core::Result<_>>()
            .map_err(tok_err)?,
        None => vec![0.0; tokens.len()],
    };
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!(
            "GGUF tokenizer has {} tokens but {} scores",
            tokens.len(),
            scores.len()
        )));
    }
    let add_space_prefix = metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "split": false,
                          "prepend_scheme": if add_space_prefix { "always" } else { "never" }},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": usize::from(add_space_prefix), "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": spm_merges(tokens, types, &scores),
        }
    }))
}

/// BPE merges equivalent to SentencePiece's scores: every split of a normal
/// piece into two vocabulary pieces, the higher-scored merged piece first
/// (SentencePiece merges by the result's score), ties by vocabulary rank.
/// GGUFs converted from a `tokenizer.json` without `tokenizer.model` carry
/// one placeholder score for all pieces, so there the rank alone decides.
fn spm_merges<'a>(tokens: &[&'a str], types: &[i64], scores: &[f32]) -> Vec<[&'a str; 2]> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        ids.entry(t).or_insert(id);
    }
    let mut found: Vec<(usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(l), ids.get(r)) {
                found.push((id, l, r));
            }
        }
    }
    found.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]).then(a.cmp(b)));
    found
        .into_iter()
        .map(|(_, l, r)| [tokens[l], tokens[r]])
        .collect()
}

/// The merges whose parts and result are all in `vocab`: llama.cpp's
/// converter writes a Gemma tokenizer's whitespace-run tokens as added
/// tokens of plain spaces, so merges building `▁▁…` runs name tokens the
/// GGUF vocabulary spells otherwise (those runs come out as the added tokens).
fn known_merges<'a>(merges: &[&'a str], vocab: &serde_json::Map<String, Value>) -> Vec<&'a str> {
    merges
        .iter()
        .copied()
        .filter(|m| {
            m.split_once(' ').is_some_and(|(a, b)| {
                vocab.contains_key(a)
                    && vocab.contains_key(b)
                    && vocab.contains_key(&format!("{a}{b}"))
            })
        })
        .collect()
}

fn gguf_str<'a>(m: &'a HashMap<String, gguf_file::Value>, key: &str) -> Result<&'a str> {
    m.get(key)
        .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata has no {key}")))?
        .to_string()
        .map(|s| s.as_str())
        .map_err(|e| ModelError::Tokenizer(format!("{key}: {e}")))
}

fn gguf_str_array<'a>(m: &'a HashMap<String, gguf_file::Value>, key: &str) -> Result<Vec<&'a str>> {
    let arr = m
        .get(key)
        .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata has no {key}")))?
        .to_vec()
        .map_err(|e| ModelError::Tokenizer(format!("{key}: {e}")))?;
    arr.iter()
        .map(|v| v.to_string().map(|s| s.as_str()))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| ModelError::Tokenizer(format!("{key}: {e}")))
}

pub(crate) fn read_json(path: &Path, what: &'static str) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::InvalidJson {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value as G;

    /// A tiny byte-level vocabulary: bytes of "a b", "ab", " ab", and two control tokens.
    fn tiny_gguf(pre: &str, add_bos: bool) -> HashMap<String, G> {
        let tokens = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġab", "1", "2", "12"];
        let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1];
        let merges = ["a b", "Ġ ab", "1 2"];
        let mut m = HashMap::new();
        m.insert("tokenizer.ggml.model".into(), G::String("gpt2".into()));
        m.insert("tokenizer.ggml.pre".into(), G::String(pre.into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            G::Array(tokens.iter().map(|t| G::String(t.to_string())).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            G::Array(types.iter().map(|t| G::I32(*t)).collect()),
        );
        m.insert(
            "tokenizer.ggml.merges".into(),
            G::Array(merges.iter().map(|t| G::String(t.to_string())).collect()),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), G::U32(0));
        m.insert("tokenizer.ggml.eos_token_id".into(), G::U32(1));
        m.insert("tokenizer.ggml.add_bos_token".into(), G::Bool(add_bos));
        m
    }

    #[test]
    fn gguf_bpe_encodes_and_decodes() {
        let t = Tokenizer::from_gguf(&tiny_gguf("gpt2", false)).unwrap();
        assert_eq!(t.encode("ab ab", true).unwrap(), vec![5, 6]);
        assert_eq!(t.encode("ab</s>", false).unwrap(), vec![5, 1]);
        assert_eq!(t.decode(&[5, 6, 1], true).unwrap(), "ab ab");
        assert_eq!(t.decode(&[5, 6, 1], false).unwrap(), "ab ab</s>");
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token_id(), Some(1));
        // gpt2 keeps digit runs together, smollm splits them.
        assert_eq!(t.encode("12", false).unwrap(), vec![9]);
        let s = Tokenizer::from_gguf(&tiny_gguf("smollm", false)).unwrap();
        assert_eq!(s.encode("12", false).unwrap(), vec![7, 8]);
    }

    #[test]
    fn gguf_add_bos_token_is_honoured() {
        let t = Tokenizer::from_gguf(&tiny_gguf("gpt2", true)).unwrap();
        assert_eq!(t.encode("ab", true).unwrap(), vec![0, 5]);
        assert_eq!(t.encode("ab", false).unwrap(), vec![5]);
    }

    #[test]
    fn unknown_pre_and_model_are_clear_errors() {
        let err = Tokenizer::from_gguf(&tiny_gguf("mystery", false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mystery") && err.contains("smollm"), "{err}");
        let mut m = tiny_gguf("gpt2", false);
        m.insert("tokenizer.ggml.model".into(), G::String("rwkv".into()));
        let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
        assert!(err.contains("\"rwkv\" is not supported"), "{err}");
    }

    /// A tiny SentencePiece vocabulary; `scores` favour `ab` (id 10) over
    /// `▁a` (id 9) or the other way round.
    fn tiny_spm(ab_first: bool) -> HashMap<String, G> {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "a", "b", "▁a", "ab",
            "<image>",
        ];
        let types = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 4];
        let mut scores = [
            0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.0,
        ];
        if ab_first {
            scores.swap(9, 10);
        }
        let mut m = HashMap::new();
        m.insert("tokenizer.ggml.model".into(), G::String("llama".into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            G::Array(tokens.iter().map(|t| G::String(t.to_string())).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            G::Array(types.iter().map(|t| G::I32(*t)).collect()),
        );
        m.insert(
            "tokenizer.ggml.scores".into(),
            G::Array(scores.iter().map(|s| G::F32(*s)).collect()),
        );
        m.insert("tokenizer.ggml.unknown_token_id".into(), G::U32(0));
        m.insert("tokenizer.ggml.bos_token_id".into(), G::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".into(), G::U32(2));
        m
    }

    #[test]
    fn gguf_sentencepiece_encodes_and_decodes() {
        let t = Tokenizer::from_gguf(&tiny_spm(false)).unwrap();
        // BOS by default, `▁` before the text and after special tokens,
        // bytes for what the vocabulary lacks.
        assert_eq!(t.encode("a a", true).unwrap(), vec![1, 9, 9]);
        assert_eq!(t.encode("a\né", false).unwrap(), vec![9, 3, 4, 5]);
        assert_eq!(t.encode("<image>a</s>", false).unwrap(), vec![11, 9, 2]);
        assert_eq!(t.decode(&[1, 9, 3, 4, 5, 6, 8], true).unwrap(), "a\né b");
        assert_eq!(t.decode(&[1, 11, 9, 2], false).unwrap(), "<s><image> a</s>");
        assert_eq!(t.unk_token(), Some("<unk>"));
        assert_eq!(t.eos_token_id(), Some(2));
        // The merged piece's score orders the merges.
        assert_eq!(t.encode("ab", false).unwrap(), vec![9, 8]);
        let t = Tokenizer::from_gguf(&tiny_spm(true)).unwrap();
        assert_eq!(t.encode("ab", false).unwrap(), vec![6, 10]);
    }

    #[test]
    fn llama_class_config_controls_bos() {
        let t = Tokenizer::from_gguf(&tiny_gguf("gpt2", false)).unwrap();
        let cfg = json!({"tokenizer_class": "LlamaTokenizerFast", "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
        let t = Tokenizer::from_parts(t.inner.clone(), Some(&cfg)).unwrap();
        assert_eq!(t.encode("ab", true).unwrap(), vec![0, 5]);
        assert_eq!(t.bos_token(), Some("<s>"));
        let cfg = json!({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "add_bos_token": false, "add_eos_token": true, "eos_token": "</s>"});
        let t = Tokenizer::from_parts(t.inner.clone(), Some(&cfg)).unwrap();
        assert_eq!(t.encode("ab", true).unwrap(), vec![5, 1]);
    }
}
