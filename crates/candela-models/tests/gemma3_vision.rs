//! Gemma 3 with images (`Gemma3ForConditionalGeneration`) against
//! transformers on the gemma3-vision-tiny fixture
//! (scripts/make_gemma3_vision_fixture.py), for a one-image and a two-image
//! prompt, through the production `InputPreparer`: pixel values (Pillow
//! bilinear), the chat template, `<start_of_image>` expansion (with the
//! tokenizer's newline merges), image features, last-position logits (image
//! tokens attending to each other both ways, no logit softcapping), and
//! greedy tokens through the engine: whole, in prefill chunks that stop
//! before an image they cannot hold, alone and batched.

mod common;

use common::{drain_tokens, features, fixture_dir, ids_of, last_logits, max_diff, reference};

use std::path::PathBuf;

use candela_core::model::{ForwardBatch, MmEmbedSpan, SeqSlice};
use candela_core::{Engine, EngineConfig, EngineError, EngineRequest, SamplingParams};
use candela_media::Modality;
use candela_models::input::{InputPreparer, MediaInput, PreparedPrompt};
use candela_models::processor::{DecodeOptions, MediaData};
use candela_models::{load, ChatRenderOptions, LoadOptions, LoadedModel};
use candle_core::Tensor;
use serde_json::Value;

const ATOL: f32 = 1e-4;

fn dir() -> PathBuf {
    fixture_dir("gemma3-vision-tiny")
}

fn load_f32() -> LoadedModel {
    load(
        &dir(),
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The case's prompt as production prepares it (the template writes <bos>).
fn prepare_case(loaded: &LoadedModel, case: &Value) -> PreparedPrompt {
    let messages = case["messages"].as_array().unwrap().clone();
    let opts = ChatRenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let rendered = loaded
        .require_chat_template()
        .unwrap()
        .render(&messages, &opts)
        .unwrap();
    assert_eq!(rendered, case["rendered"].as_str().unwrap());
    let ids = loaded.tokenizer.encode(&rendered, false).unwrap();
    let inputs: Vec<MediaInput> = case["media"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| MediaInput {
            modality: Modality::Image,
            data: Some(MediaData::Encoded {
                bytes: std::fs::read(dir().join(m.as_str().unwrap())).unwrap(),
                format: None,
            }),
            uuid: None,
            kwargs: Value::Null,
            embeds: None,
        })
        .collect();
    let prep = InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false);
    prep.prepare(&common::NoCaches, ids, &inputs).unwrap()
}

fn engine(chunk: usize) -> Engine {
    let LoadedModel {
        model,
        tokenizer,
        generation,
        ..
    } = load_f32();
    let cfg = EngineConfig {
        eos_token_ids: generation.eos_token_ids,
        max_num_batched_tokens: chunk,
        max_model_len: Some(256),
        ..Default::default()
    };
    Engine::start(model, tokenizer, cfg).unwrap()
}

fn request(p: PreparedPrompt) -> EngineRequest {
    EngineRequest {
        prompt_token_ids: p.ids,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        },
        mm_items: p.items,
        mrope: p.mrope,
    }
}

/// Greedy ids of each prompt, all submitted at once, prefill in `chunk`-token steps.
fn run_engine(prompts: Vec<PreparedPrompt>, chunk: usize) -> Vec<Vec<u32>> {
    let engine = engine(chunk);
    let handles: Vec<_> = prompts
        .into_iter()
        .map(|p| engine.add_request(request(p)).unwrap())
        .collect();
    handles.into_iter().map(drain_tokens).collect()
}

/// Last-position logits of `ids` prefilled in steps ending at `cuts`, the
/// image rows of each step spliced in (a fresh KV pool, block size 4).
fn chunked_last_logits(
    loaded: &mut LoadedModel,
    ids: &[u32],
    spans: &[(usize, Tensor)],
    cuts: &[usize],
) -> Tensor {
    let bs = 4;
    let blocks = ids.len().div_ceil(bs);
    loaded.model.allocate_kv_cache(blocks, bs).unwrap();
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < ids.len()));
    bounds.push(ids.len());
    let mut logits = None;
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let mm_embeds = spans
            .iter()
            .filter_map(|(o, e)| {
                let (a, b) = ((*o).max(lo), (o + e.dim(0).unwrap()).min(hi));
                (a < b).then(|| MmEmbedSpan {
                    start: a - lo,
                    embeds: e.narrow(0, a - o, b - a).unwrap(),
                })
            })
            .collect();
        let batch = ForwardBatch {
            input_ids: ids[lo..hi].to_vec(),
            positions: (lo as u32..hi as u32).collect(),
            slot_mapping: (lo as u32..hi as u32).collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: hi - lo,
                context_len: hi,
                block_table: (0..hi.div_ceil(bs) as u32).collect(),
                needs_logits: hi == ids.len(),
            }],
            block_size: bs,
            mm_embeds,
            mrope_positions: None,
        };
        logits = Some(loaded.model.forward(&batch).unwrap());
    }
    logits.unwrap().squeeze(0).unwrap()
}

#[test]
fn gemma3_vision_matches_transformers() {
    let (reference, tensors) = reference(&dir());
    let mut loaded = load_f32();
    assert_eq!(loaded.spec.architecture, "Gemma3ForConditionalGeneration");
    let cases = reference["cases"].as_object().unwrap().clone();
    let mut worst = (0f32, 0f32, 0f32);
    let mut prepared = Vec::new();
    for (name, case) in &cases {
        let p = prepare_case(&loaded, case);
        assert_eq!(p.ids, ids_of(&case["input_ids"]), "{name}: input ids");
        let items = features(&p);
        for (i, (_, it)) in items.iter().enumerate() {
            let d = max_diff(
                it.get("pixel_values").unwrap(),
                &tensors[&format!("{name}.item{i}.pixel_values")],
            );
            // Bit-exact resize and numpy's float order: equal up to f32 rounding.
            assert!(d <= 1e-6, "{name} item {i}: pixel values differ by {d}");
            worst.0 = worst.0.max(d);
        }
        let spans: Vec<(usize, Tensor)> = items
            .iter()
            .map(|(o, x)| (*o, loaded.model.encode(x).unwrap()))
            .collect();
        for (i, (_, e)) in spans.iter().enumerate() {
            let d = max_diff(e, &tensors[&format!("{name}.item{i}.embeds")]);
            assert!(
                d <= ATOL,
                "{name}: image features of item {i} differ by {d}"
            );
            worst.1 = worst.1.max(d);
        }
        let want = &tensors[&format!("{name}.last_logits")];
        let d = max_diff(&last_logits(&mut loaded, &p.ids, &spans, None), want);
        assert!(d <= ATOL, "{name}: last-position logits differ by {d}");
        worst.2 = worst.2.max(d);
        // Prefill in chunks that end right before and right after each
        // image (the chunking the scheduler allows): the same logits.
        let cuts: Vec<usize> = spans
            .iter()
            .flat_map(|(o, e)| [*o, o + e.dim(0).unwrap()])
            .collect();
        let d = max_diff(
            &chunked_last_logits(&mut loaded, &p.ids, &spans, &cuts),
            want,
        );
        assert!(d <= ATOL, "{name}: chunked prefill logits differ by {d}");
        worst.2 = worst.2.max(d);
        prepared.push((name.clone(), p));
    }
    eprintln!(
        "gemma3-vision-tiny: max |diff| pixels {:.2e}, image features {:.2e}, logits {:.2e}",
        worst.0, worst.1, worst.2
    );
    drop(loaded);

    // Whole prompts, then 20-token steps (chunks stop before an image that
    // does not fit, so images are never split) and 16-token steps (an image
    // exactly fills a step), alone and batched: the same greedy ids.
    let want: Vec<Vec<u32>> = cases.values().map(|c| ids_of(&c["greedy_ids"])).collect();
    for chunk in [256, 20, 16] {
        for ((name, p), want) in prepared.iter().zip(&want) {
            assert_eq!(
                &run_engine(vec![p.clone()], chunk)[0],
                want,
                "{name}: greedy ids alone, {chunk}-token steps"
            );
        }
    }
    let batched = run_engine(prepared.iter().map(|(_, p)| p.clone()).collect(), 20);
    assert_eq!(batched, want, "greedy ids batched");

    // A step too small for one image: refused, not split or stalled.
    let err = engine(15)
        .add_request(request(prepared[0].1.clone()))
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidRequest(m) if m.contains("max_num_batched_tokens")),
        "{err}"
    );
}

/// The fixture's weights under the other names checkpoints use: as google
/// released them (the tower as `vision_tower.vision_model.*`) and with every
/// part under `model.` (`model.language_model.*`, `model.vision_tower.*`,
/// `model.multi_modal_projector.*`). Same logits.
#[test]
fn other_weight_layouts_load() {
    let (reference, tensors) = reference(&dir());
    let src = dir();
    let stored =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    type Rename = fn(&str) -> String;
    let layouts: [(&str, Rename); 2] = [
        ("released", |k| {
            k.replace("vision_tower.", "vision_tower.vision_model.")
        }),
        ("model-prefixed", |k| {
            match k.strip_prefix("language_model.model.") {
                Some(r) => format!("model.language_model.{r}"),
                None => format!("model.{k}"),
            }
        }),
    ];
    let case = &reference["cases"]["one_image"];
    for (what, rename) in layouts {
        let tmp =
            std::env::temp_dir().join(format!("gemma3-vision-tiny-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() != "model.safetensors" {
                std::fs::copy(&p, tmp.join(p.file_name().unwrap())).unwrap();
            }
        }
        let renamed: std::collections::HashMap<String, Tensor> =
            stored.iter().map(|(k, v)| (rename(k), v.clone())).collect();
        candle_core::safetensors::save(&renamed, tmp.join("model.safetensors")).unwrap();
        let mut loaded = load(
            &tmp,
            &LoadOptions {
                dtype: Some("f32".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let p = prepare_case(&loaded, case);
        let spans: Vec<(usize, Tensor)> = features(&p)
            .iter()
            .map(|(o, x)| (*o, loaded.model.encode(x).unwrap()))
            .collect();
        let d = max_diff(
            &last_logits(&mut loaded, &p.ids, &spans, None),
            &tensors["one_image.last_logits"],
        );
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(
            d <= ATOL,
            "{what} names: last-position logits differ by {d}"
        );
    }
}
