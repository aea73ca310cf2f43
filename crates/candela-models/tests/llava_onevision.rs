//! LLaVA-OneVision against transformers on the llava-onevision-tiny fixture
//! (scripts/make_llava_onevision_fixture.py): a wide image (tiled, unpadded
//! and shrunk by the anyres_max rule), a tall image (tiled and unpadded), a
//! 4-frame video, both images in one prompt (multi-image: base images and
//! one newline each, no tiles) and the tall image with the video (tiled:
//! videos do not count), all through the production `InputPreparer`: pixel
//! values, chat template + `<image>` / `<video>` expansion, packed features
//! (newline rows included), last-position logits, and greedy tokens through
//! the engine with prefill chunks that split every item, alone and batched.

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
    fixture_dir("llava-onevision-tiny")
}

fn read(f: &Value) -> Vec<u8> {
    std::fs::read(dir().join(f.as_str().unwrap())).unwrap()
}

/// The case's prompt as production prepares it.
fn prepare_case(loaded: &LoadedModel, case: &Value) -> PreparedPrompt {
    let prep = InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false);
    prepare_with(&prep, loaded, case)
}

fn prepare_with(prep: &InputPreparer, loaded: &LoadedModel, case: &Value) -> PreparedPrompt {
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
    let ids = loaded.tokenizer.encode(&rendered, true).unwrap();
    let item = |modality, data| MediaInput {
        modality,
        data: Some(data),
        uuid: None,
        kwargs: Value::Null,
        embeds: None,
    };
    // Images then the video, as the template places them.
    let mut inputs: Vec<MediaInput> = case
        .get("media")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|f| {
            item(
                Modality::Image,
                MediaData::Encoded {
                    bytes: read(f),
                    format: None,
                },
            )
        })
        .collect();
    if let Some(v) = case.get("video") {
        inputs.push(item(
            Modality::Video,
            MediaData::Frames(v.as_array().unwrap().iter().map(read).collect()),
        ));
    }
    assert!(!inputs.is_empty(), "a case has media or a video");
    prep.prepare(&common::NoCaches, ids, &inputs).unwrap()
}

/// The same image alone (tiled) and beside another (base image only) is
/// processed, keyed and cached apart.
#[test]
fn an_image_alone_and_in_a_multi_image_prompt_are_cached_apart() {
    let (reference, _) = reference(&dir());
    let loaded = load_f32();
    let prep = InputPreparer::new(
        loaded.processor.clone(),
        64 << 20,
        DecodeOptions::default(),
        false,
    );
    let cases = &reference["cases"];
    let rows = |p: &PreparedPrompt| -> Vec<usize> {
        p.items.iter().map(|i| i.placeholder.length).collect()
    };
    let alone = prepare_with(&prep, &loaded, &cases["wide_image"]);
    let both = prepare_with(&prep, &loaded, &cases["two_images"]);
    let again = prepare_with(&prep, &loaded, &cases["wide_image"]);
    assert_eq!(rows(&alone), vec![145]);
    assert_eq!(rows(&both), vec![50, 50]);
    assert_eq!(again.ids, alone.ids);
    assert_eq!(
        again.items[0].placeholder.hash,
        alone.items[0].placeholder.hash
    );
    assert_ne!(
        both.items[0].placeholder.hash,
        alone.items[0].placeholder.hash
    );
    // One hit: the wide image alone, the second time.
    let (queries, hits, items, _) = prep.cache_stats();
    assert_eq!((queries, hits, items), (4, 1, 3));
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
fn llava_onevision_matches_transformers() {
    let (reference, tensors) = reference(&dir());
    let mut loaded = load_f32();
    assert_eq!(
        loaded.spec.architecture,
        "LlavaOnevisionForConditionalGeneration"
    );
    let cases = reference["cases"].as_object().unwrap().clone();
    let mut worst = (0f32, 0f32, 0f32);
    let mut prepared = Vec::new();
    for (name, case) in &cases {
        let p = prepare_case(&loaded, case);
        assert_eq!(p.ids, ids_of(&case["input_ids"]), "{name}: input ids");
        assert!(p.mrope.is_none());
        let items = features(&p);
        // One number for a case of one item, one per item otherwise.
        let rows: Vec<u64> = match &case["item_rows"] {
            Value::Array(a) => a.iter().map(|r| r.as_u64().unwrap()).collect(),
            r => vec![r.as_u64().unwrap()],
        };
        assert_eq!(items.len(), rows.len(), "{name}: items");
        let mut spans = Vec::new();
        for (k, ((offset, f), rows)) in items.iter().zip(rows).enumerate() {
            let pixels = f
                .get("pixel_values")
                .or_else(|| f.get("pixel_values_videos"))
                .unwrap();
            let d = max_diff(pixels, &tensors[&format!("{name}.item{k}.pixel_values")]);
            // Images: bit-exact Pillow resize, numpy's float order; video
            // frames: torch's uint8 resize, then (x - 255 mean) / (255 std) in
            // torch against our (x / 255 - mean) / std: f32 rounding apart.
            assert!(d <= 1e-6, "{name} item {k}: pixel values differ by {d}");
            worst.0 = worst.0.max(d);
            let embeds = loaded.model.encode(f).unwrap();
            assert_eq!(embeds.dim(0).unwrap(), rows as usize, "{name} item {k}");
            let d = max_diff(&embeds, &tensors[&format!("{name}.item{k}.embeds")]);
            assert!(d <= ATOL, "{name} item {k}: features differ by {d}");
            worst.1 = worst.1.max(d);
            spans.push((*offset, embeds));
        }
        let d = max_diff(
            &last_logits(&mut loaded, &p.ids, &spans, None),
            &tensors[&format!("{name}.last_logits")],
        );
        assert!(d <= ATOL, "{name}: last-position logits differ by {d}");
        worst.2 = worst.2.max(d);
        prepared.push((name.clone(), p));
    }
    eprintln!(
        "llava-onevision-tiny: max |diff| pixels {:.2e}, item features {:.2e}, logits {:.2e}",
        worst.0, worst.1, worst.2
    );
    drop(loaded);

    // Alone, prefill in 16-token steps (every item split across steps),
    // then all at once: the same greedy ids.
    let want: Vec<Vec<u32>> = cases.values().map(|c| ids_of(&c["greedy_ids"])).collect();
    for ((name, p), want) in prepared.iter().zip(&want) {
        assert!(p.items.iter().all(|i| i.placeholder.length > 16));
        assert_eq!(
            &run_engine(vec![p.clone()], 16)[0],
            want,
            "{name}: greedy ids alone"
        );
    }
    let batched = run_engine(prepared.into_iter().map(|(_, p)| p).collect(), 16);
    assert_eq!(batched, want, "greedy ids batched");
}

/// The fixture's weights under the other names transformers writes: as
/// transformers 4.5x saved them (`model.language_model.*`,
/// `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
/// `model.image_newline`, `lm_head.*`) and as 5.x saves them (the released
/// names, but the tower as `vision_tower.*`). Same logits.
#[test]
fn other_weight_layouts_load() {
    let (reference, tensors) = reference(&dir());
    let src = dir();
    let stored =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    type Rename = fn(&str) -> String;
    let layouts: [(&str, Rename); 2] = [
        ("transformers 4.5x", |k| {
            match k.strip_prefix("language_model.model.") {
                Some(r) => format!("model.language_model.{r}"),
                None => format!("model.{k}"),
            }
        }),
        ("transformers 5", |k| {
            k.replace("vision_tower.vision_model.", "vision_tower.")
        }),
    ];
    for (what, rename) in layouts {
        let tmp = std::env::temp_dir().join(format!(
            "llava-onevision-tiny-{}-{}",
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
        let p = prepare_case(&loaded, &reference["cases"]["wide_image"]);
        let spans: Vec<(usize, Tensor)> = features(&p)
            .iter()
            .map(|(o, x)| (*o, loaded.model.encode(x).unwrap()))
            .collect();
        let d = max_diff(
            &last_logits(&mut loaded, &p.ids, &spans, None),
            &tensors["wide_image.last_logits"],
        );
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(d <= ATOL, "{what} names: logits differ by {d}");
    }
}
