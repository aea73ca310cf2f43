//! llama.cpp's text GGUF + mmproj pairs of the multimodal fixtures, made by
//! llama.cpp's own converters (scripts/make_gguf_fixtures.py, into
//! fixtures/gguf), against the safetensors folders they came from: the same
//! rendered prompt and input ids, image features and last-position logits
//! within 1e-4, and the same greedy ids through the engine with prefill
//! chunks. Gemma 3's F16 pair is committed (the fixture's weights are bf16
//! values, which F16 holds exactly); F32 pairs are checked too when
//! `CANDELA_GGUF_FIXTURES` names a folder the script wrote them to.
//! LLaVA-1.5's F16 pair is committed too (its language model GGUF carries a
//! SentencePiece `llama` tokenizer); a Q8_0 language model with the F16
//! mmproj is checked with `CANDELA_GGUF_FIXTURES`. Mismatched pairs are
//! refused naming both files.

mod common;

use common::{drain_tokens, features, fixture_dir, last_logits, max_diff, rel_diff};

use std::path::{Path, PathBuf};

use candela_core::{Engine, EngineConfig, EngineRequest, SamplingParams};
use candela_media::Modality;
use candela_models::input::{InputPreparer, MediaInput, PreparedPrompt};
use candela_models::processor::{DecodeOptions, MediaData};
use candela_models::{load, ChatRenderOptions, LoadOptions, LoadedModel, ModelError, Tokenizer};
use candle_core::quantized::gguf_file;
use candle_core::Tensor;
use serde_json::Value;

const ATOL: f32 = 1e-4;
/// Prompt and tower rows rounded to bf16 (8 significant bits) through every
/// layer, relative to the largest value (measured 0.15-0.6 %).
const BF16_RTOL: f32 = 0.02;

fn gguf(name: &str) -> PathBuf {
    fixture_dir("gguf").join(name)
}

/// Pairs of `fixture` to check, with the dtype to load them in: the
/// committed F16 one widened to f32 and kept 16-bit (`auto`: the language
/// model's and the mmproj's F16 matrices stay 16-bit on the CPU), and F32
/// when generated.
fn pairs(fixture: &str) -> Vec<(PathBuf, PathBuf, &'static str)> {
    let f16 = (
        gguf(&format!("{fixture}-f16.gguf")),
        gguf(&format!("mmproj-{fixture}-f16.gguf")),
    );
    let mut out = vec![
        (f16.0.clone(), f16.1.clone(), "f32"),
        (f16.0, f16.1, "auto"),
    ];
    if let Some(dir) = std::env::var_os("CANDELA_GGUF_FIXTURES") {
        let dir = PathBuf::from(dir);
        out.push((
            dir.join(format!("{fixture}-f32.gguf")),
            dir.join(format!("mmproj-{fixture}-f32.gguf")),
            "f32",
        ));
    }
    out
}

fn load_pair(text: &Path, mmproj: &Path) -> Result<LoadedModel, ModelError> {
    load_pair_as(text, mmproj, "f32")
}

fn load_pair_as(text: &Path, mmproj: &Path, dtype: &str) -> Result<LoadedModel, ModelError> {
    load(
        text,
        &LoadOptions {
            dtype: Some(dtype.into()),
            mmproj: Some(mmproj.to_path_buf()),
            ..Default::default()
        },
    )
}

fn load_folder(dir: &Path) -> LoadedModel {
    load(
        dir,
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A reference case's chat, rendered by the model's template and prepared
/// as production does (with BOS, as a plain-prompt request).
fn prepare(loaded: &LoadedModel, fixture: &Path, case: &Value) -> (String, PreparedPrompt) {
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
    let ids = loaded.tokenizer.encode(&rendered, true).unwrap();
    let inputs: Vec<MediaInput> = case["media"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| MediaInput {
            modality: Modality::Image,
            data: Some(MediaData::Encoded {
                bytes: std::fs::read(fixture.join(m.as_str().unwrap())).unwrap(),
                format: None,
            }),
            uuid: None,
            kwargs: Value::Null,
            embeds: None,
        })
        .collect();
    let prep = InputPreparer::new(loaded.processor.clone(), 0, DecodeOptions::default(), false);
    let p = prep.prepare(&common::NoCaches, ids, &inputs).unwrap();
    (rendered, p)
}

/// Image features and last-position logits of `p`.
fn outputs(loaded: &mut LoadedModel, p: &PreparedPrompt) -> (Vec<Tensor>, Tensor) {
    let spans: Vec<(usize, Tensor)> = features(p)
        .iter()
        .map(|(o, x)| (*o, loaded.model.encode(x).unwrap()))
        .collect();
    let logits = last_logits(loaded, &p.ids, &spans, None);
    (spans.into_iter().map(|(_, e)| e).collect(), logits)
}

/// Greedy ids of each prompt, submitted together, prefill in `chunk`-token steps.
fn greedy(loaded: LoadedModel, prompts: Vec<PreparedPrompt>, chunk: usize) -> Vec<Vec<u32>> {
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
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let handles: Vec<_> = prompts
        .into_iter()
        .map(|p| {
            engine
                .add_request(EngineRequest {
                    prompt_token_ids: p.ids,
                    params: params.clone(),
                    mm_items: p.items,
                    mrope: p.mrope,
                })
                .unwrap()
        })
        .collect();
    handles.into_iter().map(drain_tokens).collect()
}

/// Every case of `folder`'s reference through the folder and through each
/// pair: same prompt, ids, features and logits (1e-4; pairs kept 16-bit on
/// a CPU with the bf16 matrix engine: within [`BF16_RTOL`] of the largest
/// value) and greedy ids.
fn pair_matches_folder(folder: &Path, fixture: &Path, gguf_name: &str, chunk: usize) {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let cases: Vec<Value> = reference["cases"]
        .as_object()
        .unwrap()
        .values()
        .cloned()
        .collect();
    let mut want = load_folder(folder);
    let want_arch = want.spec.architecture.clone();
    let mut want_prompts = Vec::new();
    let mut want_out = Vec::new();
    for case in &cases {
        let (r, p) = prepare(&want, fixture, case);
        want_out.push((r, p.ids.clone(), outputs(&mut want, &p)));
        want_prompts.push(p);
    }
    let want_ids = greedy(want, want_prompts, chunk);
    for (text, mmproj, dtype) in pairs(gguf_name) {
        let mut got = load_pair_as(&text, &mmproj, dtype).unwrap();
        assert_eq!(got.spec.architecture, want_arch);
        let mut prompts = Vec::new();
        let bf16 = dtype == "auto" && candela_models::panel_gemm::bf16_engine().is_some();
        let diff = if bf16 { rel_diff } else { max_diff };
        let tol = if bf16 { BF16_RTOL } else { ATOL };
        let mut worst = (0f32, 0f32);
        for (case, (rendered, ids, (feats, logits))) in cases.iter().zip(&want_out) {
            let (r, p) = prepare(&got, fixture, case);
            assert_eq!(&r, rendered, "{}: rendered chat", text.display());
            assert_eq!(&p.ids, ids, "{}: input ids", text.display());
            let (f, l) = outputs(&mut got, &p);
            for (a, b) in f.iter().zip(feats) {
                worst.0 = worst.0.max(diff(a, b));
            }
            worst.1 = worst.1.max(diff(&l, logits));
            prompts.push(p);
        }
        eprintln!(
            "{} ({dtype}{}): max |diff| vs the folder: image features {:.2e}, logits {:.2e}",
            text.display(),
            if bf16 { ", bf16 engine, relative" } else { "" },
            worst.0,
            worst.1
        );
        assert!(worst.0 <= tol && worst.1 <= tol, "{worst:?}");
        assert_eq!(greedy(got, prompts, chunk), want_ids, "{}", text.display());
    }
}

/// GGUF stores neither Gemma 3's layer kinds nor `query_pre_attn_scalar`
/// (llama.cpp derives them: every sixth layer global, `1/sqrt(head_dim)`);
/// the fixture sets both otherwise, so the folder compared is the fixture
/// with those two fields as the GGUF implies them.
#[test]
fn gemma3_pair_matches_folder() {
    let fixture = fixture_dir("gemma3-vision-tiny");
    let tmp = std::env::temp_dir().join(format!("gemma3-gguf-folder-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for e in std::fs::read_dir(&fixture).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name != "config.json" {
            std::fs::copy(&p, tmp.join(name)).unwrap();
        }
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    let t = &mut config["text_config"];
    let layers = t["num_hidden_layers"].as_u64().unwrap() as usize;
    t["query_pre_attn_scalar"] = t["head_dim"].clone();
    t["layer_types"] = (0..layers)
        .map(|i| {
            if i % 6 < 5 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    std::fs::write(tmp.join("config.json"), config.to_string()).unwrap();
    pair_matches_folder(&tmp, &fixture, "gemma3-vision-tiny", 20);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn llava_pair_matches_folder() {
    let fixture = fixture_dir("llava-tiny");
    pair_matches_folder(&fixture, &fixture, "llava-tiny", 20);
}

/// The SentencePiece tokenizer read from the LLaVA GGUF (scores, token
/// types, byte pieces) against the folder's tokenizer.json: the same ids
/// for spaces, newlines, bytes the vocabulary lacks, added and special
/// tokens, and decoding gives the text back. (Runs of spaces are left out:
/// llama.cpp's converter, reading a tokenizer.json without tokenizer.model,
/// writes one placeholder score for every piece, and the folder ranks its
/// `▁▁…` pieces below their vocabulary rank.)
#[test]
fn llava_gguf_tokenizer_matches_folder() {
    let path = gguf("llava-tiny-f16.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let got = Tokenizer::from_gguf(&content.metadata).unwrap();
    let want = Tokenizer::from_dir(&fixture_dir("llava-tiny")).unwrap();
    for text in [
        "Hello world",
        " leading space",
        "line1\nline2\n\n indented\n",
        "\t tab and trailing ",
        "emoji 🦀 and 日本語 ünïcödé ∑",
        "USER: <image>\nWhat is in the image? ASSISTANT:",
        "x<image>y <image> z",
        "<s>hello</s> <unk>",
        "",
    ] {
        for special in [true, false] {
            let ids = got.encode(text, special).unwrap();
            assert_eq!(ids, want.encode(text, special).unwrap(), "{text:?}");
            let decoded = got.decode(&ids, false).unwrap();
            assert_eq!(decoded, want.decode(&ids, false).unwrap(), "{text:?}");
            // A leading space is the prefix SentencePiece strips again.
            if !text.starts_with(' ') && !text.contains('<') {
                assert_eq!(got.decode(&ids, true).unwrap(), text);
            }
        }
    }
    assert_eq!(got.bos_token(), want.bos_token());
    assert_eq!(got.eos_token(), want.eos_token());
    assert_eq!(got.vocab_size(), want.vocab_size());
}

/// A Q8_0 language model beside the F16 mmproj: the same prompt ids and
/// image features as the folder, logits near it, and an answer.
#[test]
fn llava_q8_0_language_model_with_f16_mmproj_answers() {
    let Some((text, mmproj)) = common::gguf_pair("llava-tiny", "q8_0") else {
        return;
    };
    let fixture = fixture_dir("llava-tiny");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let case = &reference["cases"]["one_image"];
    let mut want = load_folder(&fixture);
    let (want_prompt, want_p) = prepare(&want, &fixture, case);
    let (want_feats, want_logits) = outputs(&mut want, &want_p);
    let mut got = load_pair(&text, &mmproj).unwrap();
    let (prompt, p) = prepare(&got, &fixture, case);
    assert_eq!((&prompt, &p.ids), (&want_prompt, &want_p.ids));
    let (feats, logits) = outputs(&mut got, &p);
    assert!(max_diff(&feats[0], &want_feats[0]) <= ATOL);
    // Logits of this fixture span about +-6; q8_0 at load stays within 0.5.
    let d = max_diff(&logits, &want_logits);
    eprintln!("llava-tiny q8_0 GGUF: last logits max abs diff vs the folder {d:.3e}");
    assert!(d > 0.0 && d < 0.5, "logits drift by {d}");
    let ids = greedy(got, vec![p], 20);
    assert_eq!(ids[0].len(), 8);
}

#[test]
fn mismatched_pairs_are_refused_naming_both_files() {
    let expect = |text: &Path, mmproj: &Path, what: &str| {
        let err = load_pair(text, mmproj).unwrap_err().to_string();
        let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            err.contains(&name(text)) && err.contains(&name(mmproj)) && err.contains(what),
            "{err}"
        );
    };
    let gemma = gguf("gemma3-vision-tiny-f16.gguf");
    let llama = fixture_dir("llama-tiny.gguf");
    // Another family's projector.
    expect(
        &gemma,
        &gguf("mmproj-llava-tiny-f16.gguf"),
        "a gemma3 language model pairs with gemma3 mmproj files",
    );
    expect(
        &llama,
        &gguf("mmproj-gemma3-vision-tiny-f16.gguf"),
        "a llama language model pairs with llava mmproj files",
    );
    // The right family, but embeddings of another width (llama-tiny: 32).
    expect(
        &llama,
        &gguf("mmproj-llava-tiny-f16.gguf"),
        "the projector makes 64-wide embeddings, the language model's are 32",
    );
    // A text GGUF as the mmproj; an mmproj as the model.
    let err = load_pair(&gemma, &llama).unwrap_err().to_string();
    assert!(
        err.contains("llama-tiny.gguf") && err.contains("not an mmproj file"),
        "{err}"
    );
    let err = load(
        &gguf("mmproj-gemma3-vision-tiny-f16.gguf"),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is an mmproj file"), "{err}");
}
