//! Qwen2-VL and Qwen2.5-VL against transformers on the qwen2-vl-tiny and
//! qwen2_5-vl-tiny fixtures (scripts/make_qwen2_vl_fixtures.py), for a
//! one-image, a two-image interleaved and a video prompt: pixel values, chat
//! template + placeholder expansion, M-RoPE positions, vision embeddings,
//! last-position logits, and greedy tokens through the engine with prefill
//! chunks that split the media.

mod common;

use common::{drain_tokens, features, fixture_dir, ids_of, last_logits, max_diff, reference};

use candela_core::request::{MmFeatures, MropePositions};
use candela_core::{Engine, EngineConfig, EngineRequest, SamplingParams};
use candela_media::Modality;
use candela_models::input::{InputPreparer, MediaInput, PreparedPrompt};
use candela_models::processor::{DecodeOptions, MediaData};
use candela_models::{load, ChatRenderOptions, LoadOptions, LoadedModel};
use candle_core::{Device, Tensor};
use serde_json::Value;

const ATOL: f32 = 1e-4;
const PIXEL_ATOL: f32 = 1e-5;

struct Fixture {
    name: &'static str,
    reference: Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn fixture(name: &'static str) -> Fixture {
    let (reference, tensors) = reference(&fixture_dir(name));
    Fixture {
        name,
        reference,
        tensors,
    }
}

impl Fixture {
    fn file(&self, file: &str) -> Vec<u8> {
        std::fs::read(fixture_dir(self.name).join(file)).unwrap()
    }

    /// Reference pixel values of item `i` of `case` (image_a is stored once).
    fn ref_pixels(&self, case: &str, i: usize) -> &Tensor {
        let key = format!("{case}.item{i}.pixel_values");
        self.tensors
            .get(&key)
            .unwrap_or_else(|| &self.tensors["one_image.item0.pixel_values"])
    }
}

/// The case's prompt as production prepares it: template rendered and
/// tokenized, media decoded and processed, placeholders expanded, M-RoPE
/// positions laid out.
fn prepare_case(loaded: &LoadedModel, f: &Fixture, case: &Value) -> PreparedPrompt {
    prepare_case_with(loaded, f, case, &serde_json::json!({}))
}

/// [`prepare_case`] with processor kwargs for every item.
fn prepare_case_with(
    loaded: &LoadedModel,
    f: &Fixture,
    case: &Value,
    kwargs: &Value,
) -> PreparedPrompt {
    let with = |mut k: Value| {
        if let (Some(k), Some(extra)) = (k.as_object_mut(), kwargs.as_object()) {
            k.extend(extra.clone());
        }
        if k.as_object().is_some_and(|o| o.is_empty()) {
            Value::Null
        } else {
            k
        }
    };
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
        .map(|m| match m {
            Value::String(file) => MediaInput {
                modality: Modality::Image,
                data: Some(MediaData::Encoded {
                    bytes: f.file(file),
                    format: None,
                }),
                uuid: None,
                kwargs: with(serde_json::json!({})),
                embeds: None,
            },
            Value::Array(frames) => MediaInput {
                modality: Modality::Video,
                data: Some(MediaData::Frames(
                    frames.iter().map(|x| f.file(x.as_str().unwrap())).collect(),
                )),
                uuid: None,
                kwargs: with(serde_json::json!({ "fps": f.reference["frame_fps"] })),
                embeds: None,
            },
            other => panic!("bad media entry {other}"),
        })
        .collect();
    let prep = InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false);
    prep.prepare(&common::NoCaches, ids, &inputs).unwrap()
}

/// Each item's features and offset.
fn run_engine(loaded: LoadedModel, prepared: PreparedPrompt, chunk: usize) -> (Vec<u32>, u64) {
    let LoadedModel {
        model,
        tokenizer,
        generation,
        ..
    } = loaded;
    let cfg = EngineConfig {
        eos_token_ids: generation.eos_token_ids,
        max_num_batched_tokens: chunk,
        max_model_len: Some(256),
        ..Default::default()
    };
    let engine = Engine::start(model, tokenizer, cfg).unwrap();
    let PreparedPrompt {
        ids,
        items: mm_items,
        mrope,
        ..
    } = prepared;
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let req = EngineRequest {
        prompt_token_ids: ids,
        params,
        mm_items,
        mrope,
    };
    let got = drain_tokens(engine.add_request(req).unwrap());
    (got, engine.stats().encoder_runs)
}

fn load_f32(name: &str) -> LoadedModel {
    load(
        &fixture_dir(name),
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn check_fixture(name: &'static str, architecture: &str) {
    check_model(
        name,
        architecture,
        &|| load_f32(name),
        &serde_json::json!({}),
    );
}

/// llama.cpp's pair of a fixture, loaded as `Engine.load({ model, mmproj })` does.
fn load_gguf_pair(name: &str, ty: &str) -> Option<LoadedModel> {
    let (text, mmproj) = common::gguf_pair(name, ty)?;
    Some(
        load(
            &text,
            &LoadOptions {
                dtype: Some("f32".into()),
                mmproj: Some(mmproj),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// The pixel bounds of a fixture's preprocessor config, as processor kwargs
/// (an mmproj does not carry them: its processor has the released ones).
fn fixture_pixel_bounds(name: &str) -> Value {
    let pp: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir(name).join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    serde_json::json!({ "min_pixels": pp["min_pixels"], "max_pixels": pp["max_pixels"] })
}

fn check_gguf_pairs(name: &'static str, architecture: &str) {
    let kwargs = fixture_pixel_bounds(name);
    for ty in ["f32", "f16"] {
        if load_gguf_pair(name, ty).is_some() {
            eprintln!("{name} {ty} GGUF pair:");
            check_model(
                name,
                architecture,
                &|| load_gguf_pair(name, ty).unwrap(),
                &kwargs,
            );
        }
    }
}

/// Everything against the reference for a model loaded by `load_model`,
/// its items processed with `kwargs`.
fn check_model(
    name: &'static str,
    architecture: &str,
    load_model: &dyn Fn() -> LoadedModel,
    kwargs: &Value,
) {
    let f = fixture(name);
    let mut loaded = load_model();
    assert_eq!(loaded.spec.architecture, architecture);
    let cases = f.reference["cases"].as_object().unwrap().clone();
    let mut worst = (0f32, 0f32, 0f32);
    for (case_name, case) in &cases {
        let prepared = prepare_case_with(&loaded, &f, case, kwargs);
        let items = features(&prepared);
        let offsets: Vec<usize> = items.iter().map(|(o, _)| *o).collect();

        // Pixels and grids: our processor vs transformers' slow processor.
        let grids: Vec<Vec<u32>> = case["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids_of)
            .collect();
        for (i, (_, it)) in items.iter().enumerate() {
            let grid = candela_models::qwen2_vl::grid_of(it).unwrap();
            assert_eq!(
                grid.map(|x| x as u32).to_vec(),
                grids[i],
                "{name} {case_name} item {i} grid"
            );
            let d = max_diff(it.get("pixel_values").unwrap(), f.ref_pixels(case_name, i));
            assert!(
                d <= PIXEL_ATOL,
                "{name} {case_name} item {i}: pixel values differ by {d}"
            );
            worst.0 = worst.0.max(d);
        }

        // Prompt and 3-D positions.
        let ids = prepared.ids.clone();
        assert_eq!(
            ids,
            ids_of(&case["input_ids"]),
            "{name} {case_name}: input ids"
        );
        let mrope = prepared.mrope.clone().expect("M-RoPE positions");
        let ref_pos: Vec<Vec<u32>> = case["position_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids_of)
            .collect();
        for (axis, want) in ref_pos.iter().enumerate() {
            let got: Vec<u32> = mrope.prompt.iter().map(|p| p[axis]).collect();
            assert_eq!(&got, want, "{name} {case_name}: positions on axis {axis}");
        }
        assert_eq!(
            mrope.delta,
            case["rope_delta"].as_i64().unwrap(),
            "{name} {case_name}: rope delta"
        );

        // Vision embeddings from the reference's pixels and from ours, then logits.
        let ref_feats: Vec<MmFeatures> = items
            .iter()
            .enumerate()
            .map(|(i, (_, it))| {
                let mut t = it.tensors.clone();
                t[0].1 = f.ref_pixels(case_name, i).clone();
                MmFeatures { tensors: t }
            })
            .collect();
        let our_feats: Vec<MmFeatures> = items.iter().map(|(_, it)| (**it).clone()).collect();
        for (what, feats) in [("reference pixels", ref_feats), ("our pixels", our_feats)] {
            let spans: Vec<(usize, Tensor)> = offsets
                .iter()
                .zip(&feats)
                .map(|(&o, x)| (o, loaded.model.encode(x).unwrap()))
                .collect();
            for (i, (_, e)) in spans.iter().enumerate() {
                let d = max_diff(e, &f.tensors[&format!("{case_name}.item{i}.embeds")]);
                assert!(
                    d <= ATOL,
                    "{name} {case_name} {what}: embeddings of item {i} differ by {d}"
                );
                worst.1 = worst.1.max(d);
            }
            let last = last_logits(&mut loaded, &ids, &spans, Some(&mrope));
            let d = max_diff(&last, &f.tensors[&format!("{case_name}.last_logits")]);
            assert!(
                d <= ATOL,
                "{name} {case_name} {what}: last-position logits differ by {d}"
            );
            worst.2 = worst.2.max(d);
        }
    }
    eprintln!(
        "{name}: max |diff| pixels {:.2e}, embeddings {:.2e}, logits {:.2e}",
        worst.0, worst.1, worst.2
    );

    // Greedy tokens through the engine, prefill in chunks of 7 tokens (every
    // media item is split across steps), for each case.
    drop(loaded);
    for (case_name, case) in &cases {
        let loaded = load_model();
        let prepared = prepare_case_with(&loaded, &f, case, kwargs);
        let n = prepared.items.len() as u64;
        let (got, encoder_runs) = run_engine(loaded, prepared, 7);
        assert_eq!(
            got,
            ids_of(&case["greedy_ids"]),
            "{name} {case_name}: greedy ids"
        );
        assert_eq!(encoder_runs, n);
    }
}

#[test]
fn qwen2_vl_matches_transformers() {
    check_fixture("qwen2-vl-tiny", "Qwen2VLForConditionalGeneration");
}

#[test]
fn qwen2_5_vl_matches_transformers() {
    check_fixture("qwen2_5-vl-tiny", "Qwen2_5_VLForConditionalGeneration");
}

#[test]
fn qwen2_vl_gguf_pairs_match_transformers() {
    check_gguf_pairs("qwen2-vl-tiny", "Qwen2VLForConditionalGeneration");
}

#[test]
fn qwen2_5_vl_gguf_pairs_match_transformers() {
    check_gguf_pairs("qwen2_5-vl-tiny", "Qwen2_5_VLForConditionalGeneration");
}

#[test]
fn text_positions_equal_plain_rope() {
    // Text alone: 3-D positions (p, p, p) rotate exactly like 1-D positions.
    let mut loaded = load_f32("qwen2-vl-tiny");
    let ids = loaded
        .tokenizer
        .encode("A plain text prompt, no media at all.", false)
        .unwrap();
    let n = ids.len();
    let flat = MropePositions {
        prompt: (0..n as u32).map(|p| [p; 3]).collect::<Vec<_>>().into(),
        delta: 0,
    };
    let a = last_logits(&mut loaded, &ids, &[], None);
    let b = last_logits(&mut loaded, &ids, &[], Some(&flat));
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn different_images_give_different_logits_and_bad_features_are_errors() {
    let f = fixture("qwen2_5-vl-tiny");
    let mut loaded = load_f32("qwen2_5-vl-tiny");
    let case = &f.reference["cases"]["one_image"];
    let prepared = prepare_case(&loaded, &f, case);
    let (ids, mrope) = (prepared.ids.clone(), prepared.mrope.clone().unwrap());
    let items = features(&prepared);
    let (offset, feats) = (items[0].0, items[0].1.clone());
    let e = loaded.model.encode(&feats).unwrap();
    let a = last_logits(&mut loaded, &ids, &[(offset, e.clone())], Some(&mrope));
    // The same grid with other pixels.
    let mut other = (*feats).clone();
    other.tensors[0].1 = (other.tensors[0].1.clone() * -1.0).unwrap();
    let e2 = loaded.model.encode(&other).unwrap();
    let b = last_logits(&mut loaded, &ids, &[(offset, e2)], Some(&mrope));
    assert!(max_diff(&a, &b) > 1e-3);
    // A grid that does not fit the pixels is an error, not a panic.
    let mut bad = (*feats).clone();
    bad.tensors[1].1 = Tensor::new(&[1u32, 4, 4], &Device::Cpu).unwrap();
    let err = loaded.model.encode(&bad).unwrap_err().to_string();
    assert!(err.contains("grid_thw"), "{err}");
}
