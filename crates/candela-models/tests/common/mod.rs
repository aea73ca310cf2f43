//! Shared by the multimodal parity tests (each test binary uses a part).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela_core::model::{ForwardBatch, MmEmbedSpan, SeqSlice};
use candela_core::request::{MmFeatures, MmInput, MropePositions};
use candela_core::{RequestEvent, RequestHandle};
use candela_models::input::{EngineCaches, PreparedPrompt};
use candela_models::LoadedModel;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// No engine and no caches: every item is processed from its data, as on a
/// first request.
pub struct NoCaches;

impl EngineCaches for NoCaches {
    fn caching(&self) -> bool {
        false
    }
    fn encoder_rows(&self, _: &str) -> Option<usize> {
        None
    }
    fn embedding_shape(&self) -> (usize, DType) {
        (0, DType::F32)
    }
    fn keep_embeddings(&self, _: &str, _: &Tensor) {}
}

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// A fixture's `reference.json` and `reference.safetensors`.
pub fn reference(dir: &Path) -> (Value, HashMap<String, Tensor>) {
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (json, tensors)
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `max |a - b|` relative to `max |b|`.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    max_diff(a, b) / scale.to_scalar::<f32>().unwrap().max(f32::MIN_POSITIVE)
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Each prepared item's offset and features.
pub fn features(p: &PreparedPrompt) -> Vec<(usize, Arc<MmFeatures>)> {
    p.items
        .iter()
        .map(|m| match &m.input {
            MmInput::Features(f) => (m.placeholder.offset, f.clone()),
            other => panic!("features expected, got {other:?}"),
        })
        .collect()
}

/// Logits of the last token of `ids`, media spliced in (spans cut at the
/// end of `ids`), on a fresh KV pool.
pub fn last_logits(
    loaded: &mut LoadedModel,
    ids: &[u32],
    spans: &[(usize, Tensor)],
    mrope: Option<&MropePositions>,
) -> Tensor {
    let bs = 16;
    let blocks = ids.len().div_ceil(bs);
    loaded.model.allocate_kv_cache(blocks, bs).unwrap();
    let n = ids.len();
    let batch = ForwardBatch {
        input_ids: ids.to_vec(),
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n as u32).collect(),
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: (0..blocks as u32).collect(),
            needs_logits: true,
        }],
        block_size: bs,
        mm_embeds: spans
            .iter()
            .filter(|(start, _)| *start < n)
            .map(|(start, e)| MmEmbedSpan {
                start: *start,
                embeds: e.narrow(0, 0, e.dim(0).unwrap().min(n - start)).unwrap(),
            })
            .collect(),
        mrope_positions: mrope.map(|m| (0..n).map(|i| m.at(i)).collect()),
    };
    loaded.model.forward(&batch).unwrap().squeeze(0).unwrap()
}

/// The token ids a request generates, until it finishes; its error panics.
pub fn drain_tokens(mut h: RequestHandle) -> Vec<u32> {
    let mut got = Vec::new();
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            RequestEvent::Tokens { token_ids, .. } => got.extend(token_ids),
            RequestEvent::Error { message } => panic!("{message}"),
            RequestEvent::Finished { .. } => {}
        }
    }
    got
}

/// llama.cpp's pair of files for a fixture, as scripts/make_gguf_fixtures.py
/// writes them: the language model converted to `ty` (f32, f16, q8_0) and
/// the mmproj (f16 beside a quantized LM). The F16 pairs are committed in
/// fixtures/gguf and must be there; the others are checked when
/// `CANDELA_GGUF_FIXTURES` names the folder the script wrote them to (None,
/// with a note, otherwise).
pub fn gguf_pair(name: &str, ty: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = if ty == "f16" {
        fixture_dir("gguf")
    } else if let Some(d) = std::env::var_os("CANDELA_GGUF_FIXTURES") {
        PathBuf::from(d)
    } else {
        eprintln!("SKIP {name} {ty}: CANDELA_GGUF_FIXTURES is not set (python scripts/make_gguf_fixtures.py)");
        return None;
    };
    let mm_ty = if ty.starts_with('q') { "f16" } else { ty };
    let text = dir.join(format!("{name}-{ty}.gguf"));
    let mmproj = dir.join(format!("mmproj-{name}-{mm_ty}.gguf"));
    assert!(
        text.is_file() && mmproj.is_file(),
        "no {} / {} (python scripts/make_gguf_fixtures.py)",
        text.display(),
        mmproj.display()
    );
    Some((text, mmproj))
}
