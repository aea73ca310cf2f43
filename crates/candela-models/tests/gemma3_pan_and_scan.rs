//! Gemma 3 pan-and-scan (`do_pan_and_scan` in `mm_processor_kwargs`)
//! against transformers on the gemma3-vision-tiny fixture
//! (scripts/make_gemma3_pan_and_scan_reference.py), through the production
//! `InputPreparer`: each image's and crop's pixel values, the prompt rewrite
//! (`Here is the original image ... and here are some crops ...`, one
//! `<start_of_image>` block per crop), last-position logits with each block
//! attending to itself both ways, and greedy ids through the engine in small
//! prefill steps, alone and batched; bad kwargs are 400s.

mod common;

use common::{drain_tokens, features, fixture_dir, ids_of, last_logits, max_diff};

use std::collections::HashMap;
use std::path::PathBuf;

use candela_core::{Engine, EngineConfig, EngineRequest, SamplingParams};
use candela_media::Modality;
use candela_models::input::{InputPreparer, MediaInput, PreparedPrompt};
use candela_models::processor::{DecodeOptions, MediaData};
use candela_models::{load, ChatRenderOptions, LoadOptions, LoadedModel};
use candle_core::{Device, Tensor};
use serde_json::Value;

const ATOL: f32 = 1e-4;

fn dir() -> PathBuf {
    fixture_dir("gemma3-vision-tiny")
}

fn reference() -> (Value, HashMap<String, Tensor>) {
    let json = std::fs::read_to_string(dir().join("reference_pan_and_scan.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        dir().join("reference_pan_and_scan.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (serde_json::from_str(&json).unwrap(), tensors)
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

fn inputs(case: &Value, kwargs: &Value) -> Vec<MediaInput> {
    case["media"]
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
            kwargs: kwargs.clone(),
            embeds: None,
        })
        .collect()
}

/// The case's template tokens (the template writes <bos>).
fn template_ids(loaded: &LoadedModel, case: &Value) -> Vec<u32> {
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
    loaded.tokenizer.encode(&rendered, false).unwrap()
}

fn preparer(loaded: &LoadedModel) -> InputPreparer {
    InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false)
}

fn run_engine(prompts: Vec<PreparedPrompt>, chunk: usize) -> Vec<Vec<u32>> {
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
    let engine = Engine::start(model, tokenizer, cfg).unwrap();
    let handles: Vec<_> = prompts
        .into_iter()
        .map(|p| {
            engine
                .add_request(EngineRequest {
                    prompt_token_ids: p.ids,
                    params: SamplingParams {
                        temperature: 0.0,
                        max_tokens: 8,
                        ignore_eos: true,
                        ..Default::default()
                    },
                    mm_items: p.items,
                    mrope: p.mrope,
                })
                .unwrap()
        })
        .collect();
    handles.into_iter().map(drain_tokens).collect()
}

#[test]
fn gemma3_pan_and_scan_matches_transformers() {
    let (reference, tensors) = reference();
    let mut loaded = load_f32();
    let (boi, soft) = (255999, 262144);
    let prep = preparer(&loaded);
    let mut prepared = Vec::new();
    for (name, case) in reference["cases"].as_object().unwrap() {
        let ids = template_ids(&loaded, case);
        let p = prep
            .prepare(&common::NoCaches, ids, &inputs(case, &case["kwargs"]))
            .unwrap();
        assert_eq!(p.ids, ids_of(&case["input_ids"]), "{name}: input ids");
        // One engine item per block: exactly its soft tokens, after its
        // <start_of_image>.
        let crops = ids_of(&case["crops"]);
        let blocks: usize = crops.iter().map(|&n| 1 + n as usize).sum();
        assert_eq!(p.items.len(), blocks, "{name}: one item per block");
        for m in &p.items {
            let (o, n) = (m.placeholder.offset, m.placeholder.length);
            assert_eq!(p.ids[o - 1], boi, "{name}: block at {o}");
            assert!(p.ids[o..o + n].iter().all(|&t| t == soft));
            assert_ne!(p.ids[o + n], soft);
        }
        let items = features(&p);
        let mut run = 0;
        for (i, &n) in crops.iter().enumerate() {
            let got: Vec<Tensor> = items[run..run + 1 + n as usize]
                .iter()
                .map(|(_, f)| f.get("pixel_values").unwrap().clone())
                .collect();
            let d = max_diff(
                &Tensor::stack(&got, 0).unwrap(),
                &tensors[&format!("{name}.item{i}.pixel_values")],
            );
            // Bit-exact crops and resize; numpy's float order: f32 rounding.
            assert!(d <= 1e-6, "{name} image {i}: pixel values differ by {d}");
            run += 1 + n as usize;
        }
        let spans: Vec<(usize, Tensor)> = items
            .iter()
            .map(|(o, x)| (*o, loaded.model.encode(x).unwrap()))
            .collect();
        let d = max_diff(
            &last_logits(&mut loaded, &p.ids, &spans, None),
            &tensors[&format!("{name}.last_logits")],
        );
        eprintln!("{name}: crops {crops:?}, last-position logits max |diff| {d:.2e}");
        assert!(d <= ATOL, "{name}: last-position logits differ by {d}");
        prepared.push((name.clone(), p));
    }
    drop(loaded);

    // 20-token steps: a step stops before a 16-token block it cannot hold.
    let want: Vec<Vec<u32>> = reference["cases"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| ids_of(&c["greedy_ids"]))
        .collect();
    for ((name, p), want) in prepared.iter().zip(&want) {
        assert_eq!(
            &run_engine(vec![p.clone()], 20)[0],
            want,
            "{name}: greedy ids"
        );
    }
    let batched = run_engine(prepared.iter().map(|(_, p)| p.clone()).collect(), 20);
    assert_eq!(batched, want, "greedy ids batched");
}

#[test]
fn pan_and_scan_kwargs_are_checked_and_keyed() {
    let (reference, _) = reference();
    let loaded = load_f32();
    let prep = preparer(&loaded);
    let case = &reference["cases"]["wide"];
    let ids = template_ids(&loaded, case);
    for bad in [
        serde_json::json!({"do_pan_and_scan": 1}),
        serde_json::json!({"pan_and_scan_min_crop_size": 0}),
        serde_json::json!({"pan_and_scan_max_num_crops": 1000}),
        serde_json::json!({"pan_and_scan_min_ratio_to_activate": "wide"}),
        serde_json::json!({"max_pixels": 1024}),
    ] {
        let err = prep
            .prepare(&common::NoCaches, ids.clone(), &inputs(case, &bad))
            .unwrap_err();
        assert_eq!(err.status(), 400, "{bad}: {err}");
    }
    // Off, the same image is one block, keyed apart from its cropped self.
    let off = prep
        .prepare(
            &common::NoCaches,
            ids.clone(),
            &inputs(case, &serde_json::json!({"do_pan_and_scan": false})),
        )
        .unwrap();
    let on = prep
        .prepare(&common::NoCaches, ids, &inputs(case, &case["kwargs"]))
        .unwrap();
    assert_eq!((off.items.len(), on.items.len()), (1, 4));
    let hashes: std::collections::HashSet<&str> = off
        .items
        .iter()
        .chain(&on.items)
        .map(|m| m.placeholder.hash.as_str())
        .collect();
    assert_eq!(hashes.len(), 5);
}
