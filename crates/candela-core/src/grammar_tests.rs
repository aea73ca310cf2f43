//! Structured outputs end to end on the mock model, whose unconstrained
//! output is noise over a vocabulary of JSON pieces: with a grammar every
//! sample must match it, through forks, preemption and prefix caching.

use crate::detokenizer::tests::ByteDecoder;
use crate::grammar::{GrammarCompiler, GrammarSpec};
use crate::testing::{mock_block_bytes, MockModel, VOCAB};
use crate::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TryRecvError;

const EOS: u32 = VOCAB as u32 - 1;

/// 63 tokens of JSON pieces (some spanning several lexemes) and EOS.
fn vocab() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "{", "}", "[", "]", "\"", ":", ",", " ", "\n", "-", ".", "+", "\\", "true", "false",
        "null", "{\"", "\":", "\",", "\"}", " \"", "0", "1", "2", "3", "4", "5", "6", "7", "8",
        "9", "12", "0.5", "E",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.extend((b'a'..=b'z').map(|b| vec![b]));
    v.extend(["ab", "xyz", "\t"].iter().map(|s| s.as_bytes().to_vec()));
    assert_eq!(v.len(), VOCAB - 1);
    v.push(Vec::new()); // EOS: no text
    v
}

fn compiler() -> GrammarCompiler {
    let mut words = vocab();
    words[EOS as usize] = b"\xFF<eos>".to_vec();
    GrammarCompiler::new(words, VOCAB, &[EOS]).unwrap()
}

fn engine(num_blocks: usize, caching: bool) -> Engine {
    let cfg = EngineConfig {
        kv_cache_bytes: Some(num_blocks * mock_block_bytes(16)),
        enable_prefix_caching: caching,
        eos_token_ids: vec![EOS],
        ..EngineConfig::default()
    };
    Engine::start(
        Box::new(MockModel::new(512)),
        Arc::new(ByteDecoder(vocab())),
        cfg,
    )
    .unwrap()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 31 + i * 7 + i * i) % (VOCAB as u32 - 1))
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

fn collect(h: &mut RequestHandle) -> Result<Vec<Sample>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out: Vec<Sample> = Vec::new();
    loop {
        match h.events.try_recv() {
            Ok(RequestEvent::Tokens {
                index,
                token_ids,
                text,
                ..
            }) => {
                while out.len() <= index {
                    out.push(Sample {
                        tokens: vec![],
                        text: String::new(),
                        finish: None,
                    });
                }
                out[index].tokens.extend(token_ids);
                out[index].text.push_str(&text);
            }
            Ok(RequestEvent::Finished { index, reason, .. }) => out[index].finish = Some(reason),
            Ok(RequestEvent::Error { message }) => return Err(message),
            Err(TryRecvError::Disconnected) => return Ok(out),
            Err(TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "request did not finish in time");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn params(spec: &GrammarSpec, seed: u64, n: usize) -> SamplingParams {
    SamplingParams {
        n,
        seed: Some(seed),
        temperature: 1.0,
        max_tokens: 400,
        grammar: Some(compiler().compile(spec).unwrap()),
        ..SamplingParams::default()
    }
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
            "inner": {"type": "object", "properties": {"v": {"type": "null"}}, "required": ["v"], "additionalProperties": false}
        },
        "required": ["name", "age", "tags", "ok", "inner"],
        "additionalProperties": false
    })
}

/// Checks `schema()` by hand (the core has no JSON Schema validator).
fn check(text: &str) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let o = v.as_object().unwrap();
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["age", "inner", "name", "ok", "tags"], "{text}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 6);
    assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
    let tags = o["tags"].as_array().unwrap();
    assert!(
        tags.len() <= 3 && tags.iter().all(|t| t == "x" || t == "yz"),
        "{text}"
    );
    assert!(o["ok"].is_boolean());
    assert_eq!(o["inner"], json!({"v": null}));
}

#[test]
fn json_schema_holds_for_every_sample_and_ends_with_stop() {
    let e = engine(200, true);
    let spec = GrammarSpec::JsonSchema(schema());
    let mut handles: Vec<_> = (0..4)
        .map(|i| {
            e.add_request(EngineRequest::new(
                prompt(i, 20),
                params(&spec, i as u64, 3),
            ))
            .unwrap()
        })
        .collect();
    for h in &mut handles {
        let samples = collect(h).unwrap();
        assert_eq!(samples.len(), 3);
        for s in &samples {
            check(&s.text);
            assert_eq!(s.finish, Some(FinishReason::Stop));
        }
    }
    // The unconstrained output of the same requests is not JSON at all.
    let free = SamplingParams {
        grammar: None,
        ..params(&spec, 0, 1)
    };
    let mut h = e
        .add_request(EngineRequest::new(prompt(0, 20), free))
        .unwrap();
    let text = &collect(&mut h).unwrap()[0].text;
    assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");
}

#[test]
fn regex_and_choice_hold_and_stop_without_eos() {
    let e = engine(200, true);
    for seed in 0..6 {
        let spec = GrammarSpec::Choice(vec!["alpha".into(), "xyz".into(), "q\"uote".into()]);
        let mut h = e
            .add_request(EngineRequest::new(
                prompt(seed, 9),
                params(&spec, seed as u64, 1),
            ))
            .unwrap();
        let s = collect(&mut h).unwrap().remove(0);
        assert!(
            ["alpha", "xyz", "q\"uote"].contains(&s.text.as_str()),
            "{s:?}"
        );
        assert_eq!(s.finish, Some(FinishReason::Stop));
        assert!(!s.tokens.contains(&EOS));
        let spec = GrammarSpec::Regex("[a-c]{2,4}-[0-9]{3}".into());
        let mut h = e
            .add_request(EngineRequest::new(
                prompt(seed, 9),
                params(&spec, seed as u64, 1),
            ))
            .unwrap();
        let s = collect(&mut h).unwrap().remove(0);
        let b = s.text.as_bytes();
        let dash = s.text.find('-').unwrap_or_else(|| panic!("{s:?}"));
        assert!(
            (2..=4).contains(&dash) && b[..dash].iter().all(|c| (b'a'..=b'c').contains(c)),
            "{s:?}"
        );
        assert!(
            b.len() == dash + 4 && b[dash + 1..].iter().all(u8::is_ascii_digit),
            "{s:?}"
        );
        assert_eq!(s.finish, Some(FinishReason::Stop));
    }
}

#[test]
fn preemption_and_prefix_caching_keep_each_grammar_in_step() {
    let spec = GrammarSpec::JsonSchema(schema());
    let reqs: Vec<(Vec<u32>, u64)> = (0..8)
        .map(|i| (prompt(40 + i, 18 + i as usize), i as u64))
        .collect();
    let alone: Vec<Vec<Sample>> = reqs
        .iter()
        .map(|(p, seed)| {
            let e = engine(1000, false);
            let mut h = e
                .add_request(EngineRequest::new(p.clone(), params(&spec, *seed, 2)))
                .unwrap();
            collect(&mut h).unwrap()
        })
        .collect();
    for caching in [false, true] {
        // 12 blocks of 16 tokens for 8 requests of 2 samples: they preempt each other.
        let e = engine(12, caching);
        let mut handles: Vec<_> = reqs
            .iter()
            .map(|(p, seed)| {
                e.add_request(EngineRequest::new(p.clone(), params(&spec, *seed, 2)))
                    .unwrap()
            })
            .collect();
        for (i, h) in handles.iter_mut().enumerate() {
            let samples = collect(h).unwrap();
            for s in &samples {
                check(&s.text);
            }
            assert_eq!(samples, alone[i], "request {i}, caching {caching}");
        }
        let st = e.stats();
        assert!(st.preemptions > 0, "{st:?}");
        assert_eq!(st.kv_blocks_used, 0);
    }
}
