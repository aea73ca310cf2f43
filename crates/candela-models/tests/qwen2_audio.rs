//! Qwen2-Audio against transformers on the qwen2-audio-tiny fixture
//! (scripts/make_qwen2_audio_fixture.py): chat template with audio parts,
//! placeholder expansion, log-mel features, encoder + projector + LM logits,
//! and greedy tokens through the engine (two audio items, multi-turn).

mod common;

use common::{drain_tokens, fixture_dir, ids_of, last_logits, max_diff, reference};

use std::path::PathBuf;
use std::sync::Arc;

use candela_core::request::{MmFeatures, MmInput};
use candela_core::{Engine, EngineConfig, EngineRequest, SamplingParams};
use candela_media::Modality;
use candela_models::input::{InputPreparer, MediaInput, PreparedPrompt};
use candela_models::processor::{DecodeOptions, MediaData};
use candela_models::{load, ChatRenderOptions, LoadOptions, LoadedModel};
use candle_core::Tensor;
use serde_json::Value;

const ATOL: f32 = 1e-4;

fn dir() -> PathBuf {
    fixture_dir("qwen2-audio-tiny")
}

struct Fixture {
    reference: Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let (reference, tensors) = reference(&dir());
    Fixture { reference, tensors }
}

/// The prompt as production prepares it: the chat template rendered and
/// tokenized, the WAV files decoded and processed, each `<|AUDIO|>` expanded.
fn prepare(loaded: &LoadedModel, f: &Fixture) -> PreparedPrompt {
    let messages = f.reference["messages"].as_array().unwrap().clone();
    let opts = ChatRenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let rendered = loaded
        .require_chat_template()
        .unwrap()
        .render(&messages, &opts)
        .unwrap();
    assert_eq!(rendered, f.reference["rendered"].as_str().unwrap());
    let ids = loaded.tokenizer.encode(&rendered, false).unwrap();
    let clips: Vec<MediaInput> = f.reference["clips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| MediaInput {
            modality: Modality::Audio,
            data: Some(MediaData::Encoded {
                bytes: std::fs::read(dir().join(c.as_str().unwrap())).unwrap(),
                format: Some("wav".into()),
            }),
            uuid: None,
            kwargs: Value::Null,
            embeds: None,
        })
        .collect();
    let prep = InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false);
    prep.prepare(&common::NoCaches, ids, &clips).unwrap()
}

fn load_f32(path: &std::path::Path) -> LoadedModel {
    load(
        path,
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn features_prompt_logits_and_greedy_tokens_match_transformers() {
    check_model(load_f32(&dir()));
}

/// llama.cpp's pair (a `qwen2` GGUF and a `qwen2a` mmproj) answers as the
/// folder does.
#[test]
fn gguf_pairs_match_transformers() {
    for ty in ["f32", "f16"] {
        let Some((text, mmproj)) = common::gguf_pair("qwen2-audio-tiny", ty) else {
            continue;
        };
        let loaded = load(
            &text,
            &LoadOptions {
                dtype: Some("f32".into()),
                mmproj: Some(mmproj),
                ..Default::default()
            },
        )
        .unwrap();
        eprintln!("qwen2-audio-tiny {ty} GGUF pair:");
        check_model(loaded);
    }
}

fn check_model(mut loaded: LoadedModel) {
    let f = fixture();
    assert_eq!(
        loaded.spec.architecture,
        "Qwen2AudioForConditionalGeneration"
    );
    let prepared = prepare(&loaded, &f);
    let items: Vec<Arc<MmFeatures>> = prepared
        .items
        .iter()
        .map(|m| match &m.input {
            MmInput::Features(x) => x.clone(),
            other => panic!("features expected, got {other:?}"),
        })
        .collect();
    let ranges: Vec<(usize, usize)> = prepared
        .items
        .iter()
        .map(|m| (m.placeholder.offset, m.placeholder.length))
        .collect();

    // Features: ours vs the reference's (the frames we keep).
    let ref_features = &f.tensors["input_features"];
    for (i, item) in items.iter().enumerate() {
        let ours = item.get("input_features").unwrap();
        let keep = ours.dim(1).unwrap();
        let theirs = ref_features.get(i).unwrap().narrow(1, 0, keep).unwrap();
        let d = max_diff(ours, &theirs);
        assert!(d <= ATOL, "clip {i}: log-mel features differ by {d}");
    }

    // Prompt: template + expansion give transformers' input ids.
    let ids = prepared.ids.clone();
    assert_eq!(ids, ids_of(&f.reference["input_ids"]));
    assert!(prepared.mrope.is_none());
    let counts: Vec<usize> = ranges.iter().map(|r| r.1).collect();
    assert_eq!(
        counts,
        ids_of(&f.reference["num_audio_tokens"])
            .iter()
            .map(|&c| c as usize)
            .collect::<Vec<_>>()
    );

    // Logits from the reference's own features (isolates the model) and from ours.
    let ref_items: Vec<Arc<MmFeatures>> = items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let keep = it.get("input_features").unwrap().dim(1).unwrap();
            let x = ref_features.get(i).unwrap().narrow(1, 0, keep).unwrap();
            let frames = it.get("feature_frames").unwrap().clone();
            Arc::new(MmFeatures {
                tensors: vec![
                    ("input_features".into(), x),
                    ("feature_frames".into(), frames),
                ],
            })
        })
        .collect();
    for (what, feats) in [
        ("reference features", ref_items.clone()),
        ("our features", items.clone()),
    ] {
        let spans: Vec<(usize, Tensor)> = ranges
            .iter()
            .zip(&feats)
            .map(|(r, x)| (r.0, loaded.model.encode(x).unwrap()))
            .collect();
        for (i, (_, e)) in spans.iter().enumerate() {
            let d = max_diff(e, &f.tensors[&format!("audio_embeds.{i}")]);
            assert!(
                d <= ATOL,
                "{what}: audio embeddings of clip {i} differ by {d}"
            );
        }
        let last = last_logits(&mut loaded, &ids, &spans, None);
        let d = max_diff(&last, &f.tensors["last_logits"]);
        eprintln!("{what}: last-position logits max |diff| {d:.2e}");
        assert!(d <= ATOL, "{what}: last-position logits differ by {d}");
        let audio_pos = ids
            .iter()
            .rposition(|&t| t == f.reference["audio_token_id"].as_u64().unwrap() as u32)
            .unwrap();
        let at_audio = last_logits(&mut loaded, &ids[..=audio_pos], &spans, None);
        let d = max_diff(&at_audio, &f.tensors["audio_logits"]);
        assert!(
            d <= ATOL,
            "{what}: logits at the last audio token differ by {d}"
        );
    }

    // Greedy tokens through the engine (encoder run by the engine, KV paged).
    let LoadedModel {
        model,
        tokenizer,
        generation,
        ..
    } = loaded;
    let cfg = EngineConfig {
        eos_token_ids: generation.eos_token_ids,
        max_num_batched_tokens: 48,
        ..Default::default()
    };
    let engine = Engine::start(model, tokenizer, cfg).unwrap();
    let mm_items = prepared.items;
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let got = drain_tokens(
        engine
            .add_request(EngineRequest {
                prompt_token_ids: ids.clone(),
                params,
                mm_items,
                mrope: None,
            })
            .unwrap(),
    );
    assert_eq!(got, ids_of(&f.reference["greedy_ids"]));
    assert_eq!(engine.stats().encoder_runs, 2);
}

#[test]
fn clips_too_short_for_one_audio_token_are_a_clear_400() {
    let loaded = load(
        &dir(),
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let prep = InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false);
    let clip = |n: usize| MediaInput {
        modality: Modality::Audio,
        data: Some(MediaData::Samples {
            channels: vec![vec![0.0; n]],
            rate: 16000,
        }),
        uuid: None,
        kwargs: Value::Null,
        embeds: None,
    };
    let audio = fixture().reference["audio_token_id"].as_u64().unwrap() as u32;
    for n in [1, 160, 320] {
        let err = prep
            .prepare(&common::NoCaches, vec![audio], &[clip(n)])
            .unwrap_err();
        assert_eq!(err.status(), 400, "{n} samples: {err}");
        assert!(
            err.to_string().contains("too short") && err.to_string().contains("321"),
            "{n} samples: {err}"
        );
    }
    // transformers: (3 - 1) // 2 + 1 = 2 conv frames, (2 - 2) // 2 + 1 = 1 token.
    let ok = prep
        .prepare(&common::NoCaches, vec![audio], &[clip(321)])
        .unwrap();
    assert_eq!(ok.items[0].placeholder.length, 1);
    assert_eq!(ok.ids, vec![audio]);
}
