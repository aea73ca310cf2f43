//! LLaVA-1.5 against transformers on the llava-tiny fixture
//! (scripts/make_llava_fixture.py), for a one-image and a two-image prompt
//! (the second image an RGBA PNG), all through the production
//! `InputPreparer`: pixel values, chat template + `<image>` expansion, image
//! features, last-position logits, and greedy tokens through the engine with
//! prefill chunks that split the images, alone and batched.

mod common;

use common::{drain_tokens, features, fixture_dir, ids_of, last_logits, max_diff, reference};

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
    fixture_dir("llava-tiny")
}

struct Fixture {
    reference: Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let (reference, tensors) = reference(&dir());
    Fixture { reference, tensors }
}

/// The case's prompt as production prepares it.
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
    // With BOS, as transformers' processor and a plain-prompt request tokenize it.
    let ids = loaded.tokenizer.encode(&rendered, true).unwrap();
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

/// Greedy ids of each prompt, all submitted at once, prefill in `chunk`-token steps.
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
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let handles: Vec<_> = prompts
        .into_iter()
        .map(
            |PreparedPrompt {
                 ids, items, mrope, ..
             }| {
                engine
                    .add_request(EngineRequest {
                        prompt_token_ids: ids,
                        params: params.clone(),
                        mm_items: items,
                        mrope,
                    })
                    .unwrap()
            },
        )
        .collect();
    handles.into_iter().map(drain_tokens).collect()
}

#[test]
fn llava_matches_transformers() {
    let f = fixture();
    let mut loaded = load_f32();
    assert_eq!(loaded.spec.architecture, "LlavaForConditionalGeneration");
    let cases = f.reference["cases"].as_object().unwrap().clone();
    let mut worst = (0f32, 0f32, 0f32);
    let mut prepared = Vec::new();
    for (name, case) in &cases {
        let p = prepare_case(&loaded, case);
        assert_eq!(p.ids, ids_of(&case["input_ids"]), "{name}: input ids");
        assert!(p.mrope.is_none());
        let items = features(&p);
        for (i, (_, it)) in items.iter().enumerate() {
            let d = max_diff(
                it.get("pixel_values").unwrap(),
                &f.tensors[&format!("{name}.item{i}.pixel_values")],
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
            let d = max_diff(e, &f.tensors[&format!("{name}.item{i}.embeds")]);
            assert!(
                d <= ATOL,
                "{name}: image features of item {i} differ by {d}"
            );
            worst.1 = worst.1.max(d);
        }
        let d = max_diff(
            &last_logits(&mut loaded, &p.ids, &spans, None),
            &f.tensors[&format!("{name}.last_logits")],
        );
        assert!(d <= ATOL, "{name}: last-position logits differ by {d}");
        worst.2 = worst.2.max(d);
        prepared.push((name.clone(), p));
    }
    eprintln!(
        "llava-tiny: max |diff| pixels {:.2e}, image features {:.2e}, logits {:.2e}",
        worst.0, worst.1, worst.2
    );
    drop(loaded);

    // Alone, prefill in 7-token steps (every image split across steps), then
    // both at once: the same greedy ids.
    let want: Vec<Vec<u32>> = cases.values().map(|c| ids_of(&c["greedy_ids"])).collect();
    for ((name, p), want) in prepared.iter().zip(&want) {
        assert_eq!(
            &run_engine(vec![p.clone()], 7)[0],
            want,
            "{name}: greedy ids alone"
        );
    }
    let batched = run_engine(prepared.into_iter().map(|(_, p)| p).collect(), 7);
    assert_eq!(batched, want, "greedy ids batched");
}

/// The fixture's weights under other names transformers writes: as 4.5x saved
/// LLaVA (`model.language_model.*`, `model.vision_tower.vision_model.*`,
/// `model.multi_modal_projector.*`, `lm_head.*`) and as 5.x saves it (the
/// released names, but the tower as `vision_tower.*`). Same logits.
#[test]
fn other_weight_layouts_load() {
    let f = fixture();
    let src = dir();
    let stored =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    type Rename = fn(&str) -> String;
    let layouts: [(&str, Rename); 2] = [
        ("transformers 4.5x", |k| {
            if let Some(r) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = k.strip_prefix("language_model.") {
                r.to_string()
            } else {
                format!("model.{k}")
            }
        }),
        ("transformers 5", |k| {
            k.replace("vision_tower.vision_model.", "vision_tower.")
        }),
    ];
    let case = &f.reference["cases"]["one_image"];
    for (what, rename) in layouts {
        let tmp = std::env::temp_dir().join(format!(
            "llava-tiny-{}-{}",
            what.replace(' ', "-"),
            std::process::id()
        ));
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
            &f.tensors["one_image.last_logits"],
        );
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(
            d <= ATOL,
            "{what} names: last-position logits differ by {d}"
        );
    }
}

/// Quantized at load: the language model's matrices (64-value rows: q8_0
/// as is, q4_k falling back to q5_0) are quantized, the CLIP tower and the
/// projector are not (image features unchanged), and the logits stay near
/// the f32 reference.
#[test]
fn quantized_language_model_stays_near_f32() {
    let f = fixture();
    let case = &f.reference["cases"]["one_image"];
    // Logits of this fixture span about +-6.
    for (q, bound) in [("q8_0", 0.5), ("q4_k", 1.5)] {
        // f32: the bf16 fixture's tower widened, as the reference ran it.
        let mut loaded = load(
            &dir(),
            &LoadOptions {
                quantization: Some(q.into()),
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
        let d = max_diff(&spans[0].1, &f.tensors["one_image.item0.embeds"]);
        assert!(d <= ATOL, "{q}: image features differ by {d}");
        let d = max_diff(
            &last_logits(&mut loaded, &p.ids, &spans, None),
            &f.tensors["one_image.last_logits"],
        );
        eprintln!("llava-tiny {q}: last logits max abs diff vs f32 reference {d:.3e}");
        assert!(d > 0.0 && d < bound, "{q}: logits drift by {d}");
    }
}

/// Towers quantized too (`quantize_towers`): the CLIP tower's and the
/// projector's matrices are quantized (image features move off the f32
/// reference, a little), the logits stay near it, and the load's progress
/// reports grow to the checkpoint's total.
#[test]
fn quantized_towers_stay_near_f32() {
    let f = fixture();
    let case = &f.reference["cases"]["one_image"];
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = reports.clone();
    let mut loaded = load(
        &dir(),
        &LoadOptions {
            quantization: Some("q8_0".into()),
            quantize_towers: true,
            on_progress: Some(candela_models::load_progress::OnProgress(
                std::sync::Arc::new(move |a, b| r.lock().unwrap().push((a, b))),
            )),
            ..Default::default()
        },
    )
    .unwrap();
    let p = prepare_case(&loaded, case);
    let spans: Vec<(usize, Tensor)> = features(&p)
        .iter()
        .map(|(o, x)| (*o, loaded.model.encode(x).unwrap()))
        .collect();
    // Features of this fixture span about +-17 (std 5.5); q8_0 moved them
    // by 0.32 (2% of the span): bound at 5%.
    let d = max_diff(&spans[0].1, &f.tensors["one_image.item0.embeds"]);
    eprintln!("llava-tiny q8_0 towers: image features max abs diff vs f32 reference {d:.3e}");
    assert!(d > ATOL && d < 0.86, "image features differ by {d}");
    let d = max_diff(
        &last_logits(&mut loaded, &p.ids, &spans, None),
        &f.tensors["one_image.last_logits"],
    );
    eprintln!("llava-tiny q8_0 towers: last logits max abs diff vs f32 reference {d:.3e}");
    assert!(d > 0.0 && d < 0.5, "logits drift by {d}");
    let reports = reports.lock().unwrap();
    let total = reports[0].1;
    assert!(total > 0 && reports[0].0 == 0, "{reports:?}");
    assert!(reports
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[1].1 == total));
    assert_eq!(reports.last(), Some(&(total, total)));
    assert!(reports.len() > 2, "{reports:?}");

    // Asking for the towers without a quantization is an error.
    let err = load(
        &dir(),
        &LoadOptions {
            quantize_towers: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("needs a quantization"), "{err}");
}
