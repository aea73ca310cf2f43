//! Whisper against transformers on the whisper-tiny-random fixture
//! (scripts/make_whisper_fixture.py: real multilingual Whisper tokenizer,
//! random weights): log-mel features, encoder output, decoder logits of the
//! forced prompt (at once and token by token through the cache), greedy
//! tokens for transcribe / translate / language detection / a text prompt,
//! batching, long audio in 30 s windows, and input errors.

use std::path::{Path, PathBuf};

use candela_media::audio::{decode_to_mono, split_audio, SplitOptions};
use candela_media::MediaError;
use candela_models::transcribe::{
    Task, TranscribeError, TranscribeOptions, Transcriber, Transcription,
};
use candela_models::{load, LoadOptions};
use candle_core::{Device, Tensor};
use serde_json::Value;

const ATOL: f32 = 1e-4;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/whisper-tiny-random")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

fn tensors() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

fn transcriber() -> Transcriber {
    Transcriber::load(
        &dir(),
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn speech() -> Vec<f32> {
    let bytes = std::fs::read(dir().join("../audio/speech_16k.wav")).unwrap();
    decode_to_mono(&bytes, Some("wav"), 16000).unwrap()
}

fn en() -> TranscribeOptions {
    TranscribeOptions {
        language: Some("en".into()),
        ..Default::default()
    }
}

/// The generated tokens the reference expects in a segment (no final EOT).
fn expected_tokens(case: &Value, eot: u32) -> Vec<u32> {
    let mut want = ids(&case["greedy_ids"]);
    if want.last() == Some(&eot) {
        want.pop();
    }
    want
}

#[test]
fn features_encoder_and_decoder_logits_match_transformers() {
    let r = reference();
    let t = tensors();
    let tr = transcriber();
    let samples = speech();
    assert_eq!(samples.len() as u64, r["samples"].as_u64().unwrap());

    let ours = tr.features(&samples).unwrap();
    let d = max_diff(&ours, &t["input_features"]);
    assert!(d <= ATOL, "log-mel features differ by {d}");

    let model = tr.model();
    let enc = model.encode(&t["input_features"]).unwrap();
    assert_eq!(enc.dims(), &[1500, 32]);
    let d = max_diff(&enc, &t["encoder_output"]);
    assert!(d <= ATOL, "encoder output differs by {d}");

    // The forced prompt in one step, every position's logits.
    let forced = ids(&r["forced_prompt"]);
    let cross = model.cross_kv(&enc).unwrap();
    let mut state = model.new_state(cross.clone());
    let all = model.decode(&mut [&mut state], &[&forced], false).unwrap();
    let d = max_diff(&all, &t["forced_logits"]);
    assert!(d <= ATOL, "forced-prompt logits differ by {d}");
    assert_eq!(state.len(), forced.len());

    // Token by token through the self-attention cache.
    let mut state = model.new_state(cross);
    for (i, tok) in forced.iter().enumerate() {
        let row = model
            .decode(&mut [&mut state], &[&[*tok]], true)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_diff(&row, &t["forced_logits"].get(i).unwrap());
        assert!(d <= ATOL, "cached step {i}: logits differ by {d}");
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    let r = reference();
    let tr = transcriber();
    let eot = tr.tokens().eot;
    assert_eq!(eot, 50257);
    assert!(tr.tokens().is_multilingual());
    let samples = speech();
    let cases = &r["cases"];
    let opts = |name: &str| -> TranscribeOptions {
        match name {
            "en_transcribe" => en(),
            "translate" => TranscribeOptions {
                language: Some("english".into()),
                task: Task::Translate,
                ..Default::default()
            },
            "detect" => TranscribeOptions::default(),
            "prompt" => TranscribeOptions {
                prompt: Some(cases["prompt"]["prompt_text"].as_str().unwrap().into()),
                ..en()
            },
            other => panic!("unknown case {other}"),
        }
    };
    for name in ["en_transcribe", "translate", "detect", "prompt"] {
        let case = &cases[name];
        let out = tr.transcribe(&samples, &opts(name)).unwrap();
        assert_eq!(out.segments.len(), 1, "{name}");
        let seg = &out.segments[0];
        assert_eq!(
            seg.tokens,
            expected_tokens(case, eot),
            "{name}: greedy tokens"
        );
        assert_eq!(
            out.text,
            case["text"].as_str().unwrap().trim(),
            "{name}: text"
        );
        assert_eq!(seg.start, 0.0);
        assert!((seg.end - out.duration).abs() < 1e-9);
        assert!((out.duration - samples.len() as f64 / 16000.0).abs() < 1e-9);
        assert!(
            seg.avg_logprob.is_finite() && seg.avg_logprob <= 0.0,
            "{name}: {}",
            seg.avg_logprob
        );
        let want_lang = if name == "detect" {
            case["language"].as_str().unwrap()
        } else {
            "en"
        };
        assert_eq!(out.language.as_deref(), Some(want_lang), "{name}: language");
    }
    // The fixture ran to the decoder's length cap: prompt + generated = max_target_positions.
    let en_case = &cases["en_transcribe"];
    let used = ids(&en_case["init_tokens"]).len() + ids(&en_case["greedy_ids"]).len();
    assert_eq!(used, tr.model().config().max_target_positions);
}

/// Equal results; log-probabilities to rounding (a batch changes GEMM shapes).
fn same(a: &[Transcription], b: &[Transcription]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (&x.text, &x.language, x.duration),
            (&y.text, &y.language, y.duration)
        );
        assert_eq!(x.segments.len(), y.segments.len());
        for (s, t) in x.segments.iter().zip(&y.segments) {
            assert_eq!(
                (&s.tokens, &s.text, s.start, s.end),
                (&t.tokens, &t.text, t.start, t.end)
            );
            assert!(
                (s.avg_logprob - t.avg_logprob).abs() < 1e-4,
                "{} vs {}",
                s.avg_logprob,
                t.avg_logprob
            );
        }
    }
}

#[test]
fn batched_requests_equal_one_at_a_time() {
    let tr = transcriber();
    let samples = speech();
    let half = &samples[..samples.len() / 2];
    let prompt = TranscribeOptions {
        prompt: Some("Quick brown fox.".into()),
        ..en()
    };
    let detect = TranscribeOptions::default();
    let english = en();
    let requests: Vec<(&[f32], &TranscribeOptions)> =
        vec![(&samples, &english), (half, &detect), (&samples, &prompt)];
    let alone: Vec<_> = requests
        .iter()
        .map(|(s, o)| tr.transcribe(s, o).unwrap())
        .collect();
    assert_eq!(tr.stats().max_batch, 1, "one at a time decodes alone");
    let together: Vec<_> = tr
        .transcribe_many(&requests)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(
        tr.stats().max_batch >= 2,
        "requests were not batched: {:?}",
        tr.stats()
    );
    same(&alone, &together);

    // Concurrent callers on their own threads share batches too.
    let threads: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = requests
            .iter()
            .map(|(smp, o)| s.spawn(|| tr.transcribe(smp, o).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    same(&alone, &threads);
    assert_ne!(
        alone[0].segments[0].tokens, alone[2].segments[0].tokens,
        "the prompt changes the output"
    );
}

#[test]
fn long_audio_is_transcribed_window_by_window() {
    let tr = transcriber();
    let clip = speech();
    // ~35 s: the clip ten times, then its first 2.6 s again.
    let mut long: Vec<f32> = clip.iter().copied().cycle().take(clip.len() * 10).collect();
    long.extend_from_slice(&clip[..clip.len() * 4 / 5]);
    assert!(long.len() > 30 * 16000);
    let ranges = split_audio(&long, 16000, SplitOptions::default()).unwrap();
    assert_eq!(ranges.len(), 2);

    let out = tr.transcribe(&long, &en()).unwrap();
    assert_eq!(out.segments.len(), ranges.len());
    assert!((out.duration - long.len() as f64 / 16000.0).abs() < 1e-9);
    for (seg, r) in out.segments.iter().zip(&ranges) {
        assert!((seg.start - r.start as f64 / 16000.0).abs() < 1e-9);
        assert!((seg.end - r.end as f64 / 16000.0).abs() < 1e-9);
        assert!(
            !seg.tokens.is_empty() && !seg.text.is_empty(),
            "window {} transcribed nothing",
            seg.id
        );
        // Each window equals that window transcribed on its own.
        let alone = tr.transcribe(&long[r.clone()], &en()).unwrap();
        assert_eq!(alone.segments[0].tokens, seg.tokens, "window {}", seg.id);
    }
    let joined: Vec<&str> = out.segments.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(out.text, joined.join(" "));
    assert!(
        tr.stats().max_batch >= 2,
        "the windows of one request decode together"
    );

    // Without a language, the first window's detection holds for all.
    let detected = tr.transcribe(&long, &TranscribeOptions::default()).unwrap();
    assert_eq!(detected.segments.len(), 2);
    let first_alone = tr
        .transcribe(&long[ranges[0].clone()], &TranscribeOptions::default())
        .unwrap();
    assert_eq!(detected.language, first_alone.language);
    assert_eq!(detected.segments[0].tokens, first_alone.segments[0].tokens);
}

fn a_greedy(tr: &Transcriber, samples: &[f32]) -> Vec<u32> {
    tr.transcribe_many(&[(samples, &en())])
        .pop()
        .unwrap()
        .unwrap()
        .segments[0]
        .tokens
        .clone()
}

#[test]
fn sampling_options_and_input_errors() {
    let tr = transcriber();
    let samples = speech();
    let hot = TranscribeOptions {
        temperature: 1.0,
        seed: Some(5),
        ..en()
    };
    let a = tr.transcribe(&samples, &hot).unwrap();
    let b = tr.transcribe(&samples, &hot).unwrap();
    assert_eq!(a, b, "the same seed samples the same tokens");
    let short = tr
        .transcribe(
            &samples,
            &TranscribeOptions {
                max_new_tokens: Some(3),
                ..en()
            },
        )
        .unwrap();
    assert_eq!(short.segments[0].tokens.len(), 3);

    let err = |r: Result<_, TranscribeError>| r.map(|_: Transcription| ()).unwrap_err();
    assert!(matches!(
        err(tr.transcribe(&[], &en())),
        TranscribeError::Media(MediaError::Empty(_))
    ));
    let e = err(tr.transcribe(
        &samples,
        &TranscribeOptions {
            language: Some("klingon".into()),
            ..Default::default()
        },
    ));
    assert!(
        matches!(&e, TranscribeError::Invalid(m) if m.contains("klingon")),
        "{e}"
    );
    let e = err(tr.transcribe(
        &samples,
        &TranscribeOptions {
            temperature: -1.0,
            ..en()
        },
    ));
    assert!(matches!(e, TranscribeError::Invalid(_)), "{e}");
    let e = err(tr.transcribe(
        &samples,
        &TranscribeOptions {
            prompt: Some("hi <|endoftext|>".into()),
            ..en()
        },
    ));
    assert!(matches!(e, TranscribeError::Invalid(_)), "{e}");
    let e = err(tr.transcribe_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage", None, &en()));
    assert!(
        matches!(&e, TranscribeError::Media(m) if m.http_status() == 422),
        "{e}"
    );
    let e = err(tr.transcribe(&[f32::NAN; 100], &en()));
    assert!(matches!(e, TranscribeError::Invalid(_)), "{e}");

    // A file: the stereo 44.1 kHz variant goes through decoding and resampling.
    let stereo = std::fs::read(dir().join("../audio/speech_44k_stereo.wav")).unwrap();
    let out = tr.transcribe_bytes(&stereo, None, &en()).unwrap();
    assert!(!out.segments[0].tokens.is_empty());
    assert!((out.duration - 3.24).abs() < 0.05, "{}", out.duration);

    // A cancelled request gives up and the transcriber goes on serving others.
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    assert!(matches!(
        err(tr.transcribe_cancellable(&samples, &en(), flag)),
        TranscribeError::Cancelled
    ));
    assert_eq!(
        tr.transcribe(&samples, &en()).unwrap().segments[0].tokens,
        a_greedy(&tr, &samples)
    );

    tr.close();
    assert!(matches!(
        err(tr.transcribe(&samples, &en())),
        TranscribeError::Closed
    ));
}

#[test]
fn the_engine_loader_points_whisper_to_the_transcriber() {
    assert!(candela_models::transcribe::is_whisper_model(&dir()));
    assert!(!candela_models::transcribe::is_whisper_model(
        &dir().join("../llama-tiny")
    ));
    let err = load(&dir(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Whisper") && err.contains("Transcriber"),
        "{err}"
    );
    let err = Transcriber::load(&dir().join("../llama-tiny"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a Whisper model"), "{err}");
}
