//! The engine driving a real model (the llama-tiny fixture): what continuous
//! batching, prefix caching and preemption may never change is the tokens
//! each request gets. Greedy decoding makes "the same tokens" exact.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela_core::{
    Engine, EngineConfig, EngineRequest, FinishReason, RequestEvent, SamplingParams,
};
use candela_models::{load, LoadOptions, LoadedModel};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn start(cfg: EngineConfig) -> (Engine, Arc<candela_models::Tokenizer>) {
    let LoadedModel {
        model,
        tokenizer,
        generation,
        ..
    } = load(&fixture("llama-tiny"), &LoadOptions::default()).expect("load llama-tiny");
    let cfg = EngineConfig {
        eos_token_ids: generation.eos_token_ids,
        ..cfg
    };
    let engine = Engine::start(model, tokenizer.clone(), cfg).expect("start engine");
    (engine, tokenizer)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Submit all prompts at once and collect each one's generated ids.
fn run_all(engine: &Engine, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .add_request(EngineRequest::new(p.clone(), greedy(max_tokens)))
                .expect("add")
        })
        .collect();
    handles
        .into_iter()
        .map(|mut h| {
            let mut ids = Vec::new();
            while let Some(ev) = h.events.blocking_recv() {
                match ev {
                    RequestEvent::Tokens { token_ids, .. } => ids.extend(token_ids),
                    RequestEvent::Finished { reason, .. } => {
                        assert_eq!(reason, FinishReason::Length)
                    }
                    RequestEvent::Error { message } => panic!("request failed: {message}"),
                }
            }
            ids
        })
        .collect()
}

/// Stats once the engine thread has published the step that finished the
/// last request (events reach the caller just before the snapshot updates).
fn settled_stats(engine: &Engine) -> candela_core::EngineStats {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let s = engine.stats();
        if (s.running == 0 && s.waiting == 0) || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn prompts(tok: &candela_models::Tokenizer) -> Vec<Vec<u32>> {
    [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived a",
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        "Hi",
        "naïve café — 東京 2024: the über-quick 🦊 jumps over the lazy dog again and again",
        "def fib(n):\n    return",
        "Paris, Berlin, Madrid, Rome,",
        "The quick brown fox",
    ]
    .iter()
    .map(|t| tok.encode(t, false).expect("encode"))
    .collect()
}

fn alone(cfg: EngineConfig, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let (engine, _) = start(cfg);
    prompts
        .iter()
        .map(|p| run_all(&engine, std::slice::from_ref(p), max_tokens).remove(0))
        .collect()
}

#[test]
fn a_ragged_batch_gives_each_prompt_its_solo_tokens() {
    let cfg = EngineConfig {
        enable_prefix_caching: false,
        ..Default::default()
    };
    let (engine, tok) = start(cfg.clone());
    let ps = prompts(&tok);
    let together = run_all(&engine, &ps, 24);
    assert!(
        engine.stats().steps < (ps.len() * 24) as u64,
        "requests were not batched"
    );
    assert_eq!(together, alone(cfg, &ps, 24));
}

#[test]
fn chunked_prefill_gives_the_same_tokens() {
    let cfg = EngineConfig {
        max_num_batched_tokens: 8,
        enable_prefix_caching: false,
        ..Default::default()
    };
    let (engine, tok) = start(cfg);
    let ps = prompts(&tok);
    let chunked = run_all(&engine, &ps, 12);
    assert_eq!(chunked, alone(EngineConfig::default(), &ps, 12));
}

#[test]
fn a_prefix_cache_hit_gives_the_same_tokens_as_a_miss() {
    let (engine, tok) = start(EngineConfig::default());
    // 40+ shared tokens = at least two full 16-token blocks to hit.
    let shared =
        "You are a helpful assistant. Answer briefly and precisely, and never make things up. ";
    let a = tok
        .encode(&format!("{shared}What is two plus two?"), false)
        .unwrap();
    let b = tok
        .encode(&format!("{shared}Name a colour."), false)
        .unwrap();
    let miss = run_all(&engine, std::slice::from_ref(&a), 16);
    let before = engine.stats();
    let hit = run_all(&engine, std::slice::from_ref(&a), 16);
    let other = run_all(&engine, std::slice::from_ref(&b), 16);
    let after = engine.stats();
    assert_eq!(hit, miss);
    assert!(
        after.prefix_cache_hits >= before.prefix_cache_hits + 32,
        "{before:?} -> {after:?}"
    );
    let uncached = alone(
        EngineConfig {
            enable_prefix_caching: false,
            ..Default::default()
        },
        &[b],
        16,
    );
    assert_eq!(other, uncached);
}

#[test]
fn preemption_completes_every_request_with_its_solo_tokens() {
    // 12 blocks of 16 tokens cannot hold 8 sequences of ~20 prompt + 40 new tokens.
    let block_bytes = {
        let (e, _) = start(EngineConfig::default());
        e.model_spec().kv_block_bytes(16)
    };
    let cfg = EngineConfig {
        kv_cache_bytes: Some(12 * block_bytes),
        ..Default::default()
    };
    let (engine, tok) = start(cfg);
    assert_eq!(engine.num_kv_blocks(), 12);
    let ps = prompts(&tok);
    let squeezed = run_all(&engine, &ps, 40);
    let stats = settled_stats(&engine);
    assert!(
        stats.preemptions > 0,
        "the pool was never exhausted: {stats:?}"
    );
    assert_eq!(stats.kv_blocks_used, 0, "blocks leaked: {stats:?}");
    assert_eq!(squeezed, alone(EngineConfig::default(), &ps, 40));
}
